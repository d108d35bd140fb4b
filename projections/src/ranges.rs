//! Anti-entropy over key ranges (decision 0054): digests of a model's rows between two uuids,
//! the rows themselves as images (every column, clocks included), and the replacement of a
//! range's rows by another device's images.
//!
//! Two devices compare a model range by range: the asking device cuts its rows into ranges of
//! about equal row counts ([`Query::split_range`]), the other digests its own rows over the
//! same bounds ([`Query::range_digests`]), and a range that differs is cut again, down to a few
//! rows. A range hashes its rows exactly as [`Query::digest`] does, so equal ranges everywhere
//! mean equal digests.

use keel_schema::ModelDef;
use rusqlite::types::{Value as SqlValue, ValueRef};
use uuid::Uuid;

use crate::digest::hash_value;
use crate::error::ProjectionError;
use crate::queries::Query;
use crate::store::Projections;

/// Most ranges one split makes, and one digest request may name.
pub const RANGES_MAX: usize = 256;
/// Largest row image [`Projections::replace_range`] takes (a row is far smaller).
pub const ROW_IMAGE_MAX: usize = 1 << 20;

/// The uuids of one model from `start` (inclusive; `None`: the first) to `end` (exclusive;
/// `None`: past the last).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct KeyRange {
    /// First uuid in the range.
    pub start: Option<Uuid>,
    /// First uuid after the range.
    pub end: Option<Uuid>,
}

impl KeyRange {
    /// Every uuid.
    pub const ALL: KeyRange = KeyRange {
        start: None,
        end: None,
    };

    /// Whether `uuid` is in the range.
    pub fn holds(&self, uuid: Uuid) -> bool {
        self.start.is_none_or(|s| uuid >= s) && self.end.is_none_or(|e| uuid < e)
    }

    /// Whether it is a range at all (its start before its end).
    pub fn is_valid(&self) -> bool {
        match (self.start, self.end) {
            (Some(s), Some(e)) => s < e,
            _ => true,
        }
    }

    /// `WHERE` conditions on `uuid` (none, or `uuid >= ?n`, `uuid < ?m`) and their parameters.
    fn condition(&self, first_param: usize) -> (String, Vec<Vec<u8>>) {
        let mut parts = Vec::new();
        let mut params = Vec::new();
        if let Some(s) = self.start {
            parts.push(format!("uuid >= ?{}", first_param + params.len()));
            params.push(s.as_bytes().to_vec());
        }
        if let Some(e) = self.end {
            parts.push(format!("uuid < ?{}", first_param + params.len()));
            params.push(e.as_bytes().to_vec());
        }
        let sql = if parts.is_empty() {
            "1".to_string()
        } else {
            parts.join(" AND ")
        };
        (sql, params)
    }
}

/// The rows of one range: how many, and their digest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RangeDigest {
    /// Rows in the range.
    pub rows: u64,
    /// BLAKE3 over the rows (as [`Query::digest`] hashes them) and the model's name.
    pub digest: [u8; 32],
}

/// Hashes rows in uuid order into one [`RangeDigest`].
struct RangeHasher {
    hasher: blake3::Hasher,
    rows: u64,
}

impl RangeHasher {
    fn new(def: &ModelDef) -> Self {
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"keel range digest v1");
        hasher.update(def.name.as_bytes());
        Self { hasher, rows: 0 }
    }

    fn row(&mut self, row: &rusqlite::Row<'_>, columns: usize) -> Result<(), ProjectionError> {
        self.hasher.update(&[0xAA]);
        for i in 0..columns {
            hash_value(&mut self.hasher, row.get_ref(i)?);
        }
        self.rows += 1;
        Ok(())
    }

    fn finish(self) -> RangeDigest {
        RangeDigest {
            rows: self.rows,
            digest: *self.hasher.finalize().as_bytes(),
        }
    }
}

/// The uuid in a row's `uuid` column.
pub(crate) fn uuid_of(def: &ModelDef, value: ValueRef<'_>) -> Result<Uuid, ProjectionError> {
    value
        .as_blob()
        .ok()
        .and_then(|b| Uuid::from_slice(b).ok())
        .ok_or_else(|| ProjectionError::MalformedRow(format!("{} uuid", def.name)))
}

impl Query<'_> {
    /// Cuts the rows of `def` in `within` into at most `parts` ranges of about equal row
    /// counts (one range if it has no rows), which cover `within` exactly, with their digests.
    pub fn split_range(
        &self,
        def: &ModelDef,
        within: KeyRange,
        parts: usize,
    ) -> Result<Vec<(KeyRange, RangeDigest)>, ProjectionError> {
        let (condition, params) = within.condition(1);
        let count: i64 = self.conn.query_row(
            &format!("SELECT COUNT(*) FROM {} WHERE {condition}", def.name),
            rusqlite::params_from_iter(params.iter()),
            |r| r.get(0),
        )?;
        let count = u64::try_from(count).unwrap_or(0);
        let per_part = count.div_ceil(parts.clamp(1, RANGES_MAX) as u64).max(1);
        let mut out = Vec::new();
        let mut start = within.start;
        let mut hasher = RangeHasher::new(def);
        self.visit_range(def, within, None, None, |row, columns| {
            if hasher.rows == per_part {
                let end = uuid_of(def, row.get_ref(0)?)?;
                let done = std::mem::replace(&mut hasher, RangeHasher::new(def));
                out.push((
                    KeyRange {
                        start,
                        end: Some(end),
                    },
                    done.finish(),
                ));
                start = Some(end);
            }
            hasher.row(row, columns)
        })?;
        out.push((
            KeyRange {
                start,
                end: within.end,
            },
            hasher.finish(),
        ));
        debug_assert!(out.len() <= RANGES_MAX);
        Ok(out)
    }

    /// The digests of the rows of `def` in each of `ranges`, which must be valid, in order and
    /// not overlap (at most [`RANGES_MAX`]; another device names them).
    pub fn range_digests(
        &self,
        def: &ModelDef,
        ranges: &[KeyRange],
    ) -> Result<Vec<RangeDigest>, ProjectionError> {
        check_ranges(ranges)?;
        let mut out = Vec::with_capacity(ranges.len());
        for range in ranges {
            let mut hasher = RangeHasher::new(def);
            self.visit_range(def, *range, None, None, |row, columns| {
                hasher.row(row, columns)
            })?;
            out.push(hasher.finish());
        }
        Ok(out)
    }

    /// At most `limit` rows of `def` in `range` after `after` (from the range's start without
    /// it), in uuid order, as images: every column, clocks and tombstone included.
    pub fn range_rows(
        &self,
        def: &ModelDef,
        range: KeyRange,
        after: Option<Uuid>,
        limit: usize,
    ) -> Result<Vec<Vec<u8>>, ProjectionError> {
        let mut out = Vec::new();
        self.visit_range(def, range, after, Some(limit), |row, columns| {
            let mut image = Vec::new();
            encode_row(row, columns, &mut image)?;
            out.push(image);
            Ok(())
        })?;
        Ok(out)
    }
}

impl Query<'_> {
    /// Visits the rows of `def` in `range` after `after`, at most `limit`, in uuid order, with
    /// every column (and their count).
    fn visit_range(
        &self,
        def: &ModelDef,
        range: KeyRange,
        after: Option<Uuid>,
        limit: Option<usize>,
        mut each: impl FnMut(&rusqlite::Row<'_>, usize) -> Result<(), ProjectionError>,
    ) -> Result<(), ProjectionError> {
        let (mut condition, mut params) = range.condition(1);
        if let Some(after) = after {
            condition.push_str(&format!(" AND uuid > ?{}", params.len() + 1));
            params.push(after.as_bytes().to_vec());
        }
        let limit = limit.map_or(-1, |l| i64::try_from(l).unwrap_or(i64::MAX));
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT * FROM {} WHERE {condition} ORDER BY uuid LIMIT {limit}",
            def.name
        ))?;
        let columns = stmt.column_count();
        let mut rows = stmt.query(rusqlite::params_from_iter(params.iter()))?;
        while let Some(row) = rows.next()? {
            each(row, columns)?;
        }
        Ok(())
    }
}

/// Refuses ranges that are too many, empty or reversed, out of order or overlapping.
fn check_ranges(ranges: &[KeyRange]) -> Result<(), ProjectionError> {
    let bad = |why: &str| Err(ProjectionError::MalformedRow(format!("key ranges: {why}")));
    if ranges.len() > RANGES_MAX {
        return bad("too many");
    }
    if !ranges.iter().all(KeyRange::is_valid) {
        return bad("a start after its end");
    }
    for pair in ranges.windows(2) {
        let ordered = match (pair[0].end, pair[1].start) {
            (Some(end), Some(start)) => end <= start,
            _ => false,
        };
        if !ordered {
            return bad("out of order or overlapping");
        }
    }
    Ok(())
}

impl Projections {
    /// Replaces every row of `def` in `range` by the rows of `images` (another device's
    /// [`Query::range_rows`] of the same range, all of them), in one transaction; returns how
    /// many rows it wrote. Each image is checked: its column count, a uuid in the range, uuids
    /// in increasing order. A reference to a row that is missing here fails the whole
    /// replacement, and nothing changes.
    pub fn replace_range(
        &mut self,
        def: &ModelDef,
        range: KeyRange,
        images: &[Vec<u8>],
    ) -> Result<u64, ProjectionError> {
        check_ranges(&[range])?;
        let columns = self
            .conn
            .prepare(&format!("SELECT * FROM {} LIMIT 0", def.name))?
            .column_count();
        let mut rows = Vec::with_capacity(images.len());
        let mut last: Option<Uuid> = None;
        for image in images {
            let cells = decode_row(image, columns)?;
            let uuid = match &cells[0] {
                SqlValue::Blob(b) => Uuid::from_slice(b).ok(),
                _ => None,
            }
            .filter(|u| range.holds(*u) && last.is_none_or(|l| l < *u))
            .ok_or_else(|| {
                ProjectionError::MalformedRow(format!(
                    "a {} row outside its range or out of order",
                    def.name
                ))
            })?;
            last = Some(uuid);
            rows.push(cells);
        }
        let (condition, params) = range.condition(1);
        let tx = self.conn.transaction()?;
        tx.execute(
            &format!("DELETE FROM {} WHERE {condition}", def.name),
            rusqlite::params_from_iter(params.iter()),
        )?;
        {
            let marks = vec!["?"; columns].join(", ");
            let mut insert = tx.prepare(&format!("INSERT INTO {} VALUES ({marks})", def.name))?;
            for cells in &rows {
                insert.execute(rusqlite::params_from_iter(cells.iter()))?;
            }
        }
        tx.commit()?;
        // Attestations that came this way were never taken in: the next miss reads the table.
        self.attested.borrow_mut().table_changed();
        Ok(rows.len() as u64)
    }
}

/// Cell tags of a row image.
const NULL: u8 = 0;
const INTEGER: u8 = 1;
const REAL: u8 = 2;
const TEXT: u8 = 3;
const BLOB: u8 = 4;

/// A row image: the column count (u16 BE), then each cell as a tag and its bytes (8 for a
/// number, a u32 BE length and the bytes for text and blobs).
pub(crate) fn encode_row(
    row: &rusqlite::Row<'_>,
    columns: usize,
    out: &mut Vec<u8>,
) -> Result<(), ProjectionError> {
    let count = u16::try_from(columns)
        .map_err(|_| ProjectionError::MalformedRow(format!("{columns} columns")))?;
    out.extend_from_slice(&count.to_be_bytes());
    for i in 0..columns {
        match row.get_ref(i)? {
            ValueRef::Null => out.push(NULL),
            ValueRef::Integer(v) => {
                out.push(INTEGER);
                out.extend_from_slice(&v.to_be_bytes());
            }
            ValueRef::Real(v) => {
                out.push(REAL);
                out.extend_from_slice(&v.to_bits().to_be_bytes());
            }
            ValueRef::Text(b) => put_bytes(out, TEXT, b)?,
            ValueRef::Blob(b) => put_bytes(out, BLOB, b)?,
        }
    }
    Ok(())
}

fn put_bytes(out: &mut Vec<u8>, tag: u8, bytes: &[u8]) -> Result<(), ProjectionError> {
    let len = u32::try_from(bytes.len())
        .map_err(|_| ProjectionError::MalformedRow("a cell over 4 GiB".into()))?;
    out.push(tag);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(bytes);
    Ok(())
}

/// The uuid of a row image (its first cell), if it has one.
pub fn image_uuid(image: &[u8]) -> Option<Uuid> {
    match image.get(2..7)? {
        [BLOB, 0, 0, 0, 16] => Uuid::from_slice(image.get(7..23)?).ok(),
        _ => None,
    }
}

/// Reads a row image of exactly `columns` cells; never panics on any input.
pub(crate) fn decode_row(image: &[u8], columns: usize) -> Result<Vec<SqlValue>, ProjectionError> {
    Ok(decode_row_ref(image, columns)?
        .into_iter()
        .map(SqlValue::from)
        .collect())
}

/// [`decode_row`] without copying a cell: each borrows the image (what an insert binds).
pub(crate) fn decode_row_ref(
    image: &[u8],
    columns: usize,
) -> Result<Vec<ValueRef<'_>>, ProjectionError> {
    let bad = |why: &str| ProjectionError::MalformedRow(format!("row image: {why}"));
    if image.len() > ROW_IMAGE_MAX {
        return Err(bad("too large"));
    }
    let mut rest = image;
    let mut take = |n: usize| -> Result<&[u8], ProjectionError> {
        if rest.len() < n {
            return Err(bad("truncated"));
        }
        let (head, tail) = rest.split_at(n);
        rest = tail;
        Ok(head)
    };
    let count = u16::from_be_bytes(take(2)?.try_into().map_err(|_| bad("count"))?);
    if usize::from(count) != columns || columns == 0 {
        return Err(bad("wrong column count"));
    }
    let mut cells = Vec::with_capacity(columns);
    for _ in 0..columns {
        let tag = take(1)?[0];
        let cell = match tag {
            NULL => ValueRef::Null,
            INTEGER | REAL => {
                let v = u64::from_be_bytes(take(8)?.try_into().map_err(|_| bad("number"))?);
                if tag == INTEGER {
                    ValueRef::Integer(v as i64)
                } else {
                    ValueRef::Real(f64::from_bits(v))
                }
            }
            TEXT | BLOB => {
                let len = u32::from_be_bytes(take(4)?.try_into().map_err(|_| bad("length"))?);
                let bytes = take(len as usize)?;
                if tag == TEXT {
                    std::str::from_utf8(bytes).map_err(|_| bad("text"))?;
                    ValueRef::Text(bytes)
                } else {
                    ValueRef::Blob(bytes)
                }
            }
            _ => return Err(bad("unknown cell")),
        };
        cells.push(cell);
    }
    if !rest.is_empty() {
        return Err(bad("trailing bytes"));
    }
    Ok(cells)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hostile_row_image_is_an_error() {
        for image in [
            vec![],
            vec![0, 2, NULL],
            vec![0, 1, 9],
            vec![0, 1, TEXT, 0, 0, 0, 9, b'a'],
            vec![0, 1, TEXT, 0, 0, 0, 1, 0xFF],
            vec![0, 1, NULL, 7],
        ] {
            assert!(decode_row(&image, 1).is_err(), "{image:?}");
        }
        assert_eq!(image_uuid(&[0, 1, NULL]), None);
        let mut image = vec![0, 1, BLOB, 0, 0, 0, 16];
        image.extend_from_slice(Uuid::from_u128(5).as_bytes());
        assert_eq!(image_uuid(&image), Some(Uuid::from_u128(5)));
        assert_eq!(
            decode_row(&[0, 1, INTEGER, 0, 0, 0, 0, 0, 0, 0, 7], 1).expect("decodes"),
            vec![SqlValue::Integer(7)]
        );
    }

    #[test]
    fn ranges_out_of_order_or_reversed_are_refused() {
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let r = |s, e| KeyRange { start: s, end: e };
        assert!(check_ranges(&[r(Some(b), Some(a))]).is_err());
        assert!(check_ranges(&[r(None, Some(b)), r(Some(a), None)]).is_err());
        assert!(check_ranges(&[r(None, None), r(None, None)]).is_err());
        assert!(check_ranges(&[r(None, Some(a)), r(Some(b), None)]).is_ok());
        assert!(check_ranges(&vec![KeyRange::ALL; RANGES_MAX + 1]).is_err());
    }
}
