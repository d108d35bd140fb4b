//! Backfill (decision 0056): a projection snapshot read and written table by table, in
//! batches, so that a device behind its leader's compaction point can pull the leader's
//! snapshot over the network and resume where a cut left it.
//!
//! A snapshot is cut into [`Part`]s: every model in the registry's order (dependency order),
//! keyed by uuid, then the internal tables a later apply reads (conflict bookkeeping, parked
//! and refused changes, the applied position), paged by their place in a fixed order (a
//! snapshot never changes while it is read). A row crosses as a row image (see
//! [`crate::ranges`]). The written side keeps its checkpoint in the file it writes, in the
//! transaction that writes the batch, so a batch is never half there nor written twice.

use rusqlite::types::ToSqlOutput;
use rusqlite::OptionalExtension;
use uuid::Uuid;

use crate::error::ProjectionError;
use crate::queries::Query;
use crate::ranges::{decode_row_ref, encode_row};
use crate::store::Projections;

/// The internal tables a snapshot's backfill carries after the models, with the order they
/// are read in.
const INTERNAL_PARTS: &[(&str, &str)] = &[
    ("_meta", "key"),
    ("_registry", "rowid"),
    ("_parked", "key"),
    ("_lacking", "id"),
    ("_field_writes", "model, record, field"),
    ("_conflicts", "model, record, field, id"),
    ("_policies", "record"),
    ("_refused", "id"),
];

/// Where the written side keeps its checkpoint (dropped by [`Projections::end_backfill`]).
const CHECKPOINT_TABLE: &str =
    "CREATE TABLE IF NOT EXISTS _backfill (key INTEGER PRIMARY KEY, value BLOB NOT NULL)";

/// One table of a snapshot, as a backfill reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Part {
    /// Its table.
    pub table: String,
    /// A model's code (its rows are paged by uuid); `None` for an internal table (paged by
    /// its place).
    pub model: Option<u8>,
}

/// Where a part's reading stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PartCursor {
    /// A model's last uuid read (`None`: from its first).
    pub after: Option<Uuid>,
    /// An internal table's rows read.
    pub skip: u64,
}

impl Projections {
    /// The parts of a snapshot of this projection, in the order a backfill takes them.
    pub fn backfill_parts(&self) -> Vec<Part> {
        let models = self.registry.iter().map(|def| Part {
            table: def.name.to_string(),
            model: Some(def.code),
        });
        let internal = INTERNAL_PARTS.iter().map(|(table, _)| Part {
            table: (*table).to_string(),
            model: None,
        });
        models.chain(internal).collect()
    }

    /// Writes `images` (the next rows of `part`) and `checkpoint` in one transaction. The
    /// first batch of a part (`first`) replaces whatever the table held. References are not
    /// checked: a snapshot is whole only once every part is in.
    pub fn put_backfill_rows(
        &mut self,
        part: &Part,
        first: bool,
        images: &[Vec<u8>],
        checkpoint: &[u8],
    ) -> Result<(), ProjectionError> {
        self.query().known_part(part)?;
        self.conn.execute(CHECKPOINT_TABLE, [])?;
        let columns = self
            .conn
            .prepare(&format!("SELECT * FROM {} LIMIT 0", part.table))?
            .column_count();
        let rows = images
            .iter()
            .map(|image| decode_row_ref(image, columns))
            .collect::<Result<Vec<_>, _>>()?;
        self.conn.pragma_update(None, "foreign_keys", "OFF")?;
        let written = (|| {
            let tx = self.conn.transaction()?;
            if first {
                tx.execute(&format!("DELETE FROM {}", part.table), [])?;
            }
            {
                let marks = vec!["?"; columns].join(", ");
                let mut insert = tx.prepare_cached(&format!(
                    "INSERT OR REPLACE INTO {} VALUES ({marks})",
                    part.table
                ))?;
                for cells in &rows {
                    let cells = cells.iter().map(|c| ToSqlOutput::Borrowed(*c));
                    insert.execute(rusqlite::params_from_iter(cells))?;
                }
            }
            tx.execute(
                "INSERT OR REPLACE INTO _backfill (key, value) VALUES (0, ?1)",
                [checkpoint],
            )?;
            tx.commit()
        })();
        self.conn.pragma_update(None, "foreign_keys", "ON")?;
        written?;
        if let Some(checkpointer) = &self.checkpointer {
            // Checkpointed on the background thread as the rows come, not all at the end.
            checkpointer.written(rows.len() as u64);
        }
        Ok(())
    }

    /// The checkpoint the last [`Projections::put_backfill_rows`] wrote, if any.
    pub fn backfill_checkpoint(&self) -> Result<Option<Vec<u8>>, ProjectionError> {
        let exists: Option<String> = self
            .conn
            .query_row(
                "SELECT name FROM sqlite_master WHERE name = '_backfill'",
                [],
                |r| r.get(0),
            )
            .optional()?;
        if exists.is_none() {
            return Ok(None);
        }
        Ok(self
            .conn
            .query_row("SELECT value FROM _backfill WHERE key = 0", [], |r| {
                r.get(0)
            })
            .optional()?)
    }

    /// Drops the checkpoint once every part is in, and moves everything into the main file
    /// (the WAL emptied): the file is a snapshot like any other, which may be copied while
    /// this connection stays open and idle.
    pub fn end_backfill(&mut self) -> Result<(), ProjectionError> {
        self.conn.execute("DROP TABLE IF EXISTS _backfill", [])?;
        self.conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        Ok(())
    }
}

impl Query<'_> {
    /// Rows in `part`.
    pub fn part_len(&self, part: &Part) -> Result<u64, ProjectionError> {
        let known = self.known_part(part)?;
        let n: i64 = self
            .conn
            .query_row(&format!("SELECT COUNT(*) FROM {known}"), [], |r| r.get(0))?;
        Ok(n.max(0) as u64)
    }

    /// At most `limit` row images of `part` from `cursor` on, in the part's order.
    pub fn part_rows(
        &self,
        part: &Part,
        cursor: PartCursor,
        limit: usize,
    ) -> Result<Vec<Vec<u8>>, ProjectionError> {
        let known = self.known_part(part)?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let (sql, params): (String, Vec<rusqlite::types::Value>) = match part.model {
            Some(_) => match cursor.after {
                Some(after) => (
                    format!("SELECT * FROM {known} WHERE uuid > ?1 ORDER BY uuid LIMIT {limit}"),
                    vec![after.as_bytes().to_vec().into()],
                ),
                None => (
                    format!("SELECT * FROM {known} ORDER BY uuid LIMIT {limit}"),
                    Vec::new(),
                ),
            },
            None => {
                let order = INTERNAL_PARTS
                    .iter()
                    .find(|(t, _)| *t == known)
                    .map_or("rowid", |(_, o)| o);
                let skip = i64::try_from(cursor.skip).unwrap_or(i64::MAX);
                (
                    format!("SELECT * FROM {known} ORDER BY {order} LIMIT {limit} OFFSET {skip}"),
                    Vec::new(),
                )
            }
        };
        let mut stmt = self.conn.prepare_cached(&sql)?;
        let columns = stmt.column_count();
        let mut rows = stmt.query(rusqlite::params_from_iter(params.iter()))?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            let mut image = Vec::new();
            encode_row(row, columns, &mut image)?;
            out.push(image);
        }
        Ok(out)
    }

    /// The table name of `part` if it is one of this projection's parts (a name from a peer
    /// is never put in SQL unchecked).
    fn known_part(&self, part: &Part) -> Result<String, ProjectionError> {
        self.backfill_parts()
            .into_iter()
            .find(|p| p == part)
            .map(|p| p.table)
            .ok_or_else(|| ProjectionError::MalformedRow(format!("no table {}", part.table)))
    }
}
