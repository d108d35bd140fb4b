//! Queries for host apps: typed rows by uuid, directory listings, metadata with both scopes, counts.

use keel_schema::{ContentIdentity, Entry, Location, Syncable, Tag, UserMetadata, Value, MODELS};
use std::collections::HashSet;

use rusqlite::{params_from_iter, OptionalExtension, Params, Statement};
use uuid::Uuid;

use crate::apply::read_value;
use crate::error::ProjectionError;
use crate::store::Projections;

/// Uuids looked up per statement by [`Query::existing`].
pub(crate) const EXISTING_CHUNK: usize = 256;

/// Visible rows per model (the `counts` object of `keel status --json`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[cfg_attr(feature = "typescript", derive(ts_rs::TS))]
pub struct Counts {
    /// Devices.
    pub devices: u64,
    /// Locations.
    pub locations: u64,
    /// Entries.
    pub entries: u64,
    /// Content identities.
    pub content_identities: u64,
    /// User metadata records.
    pub user_metadata: u64,
    /// Tags.
    pub tags: u64,
    /// Tag applications.
    pub user_metadata_tags: u64,
}

/// The metadata of an entry: its own, and its content's under it.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
#[cfg_attr(feature = "typescript", derive(ts_rs::TS))]
pub struct EntryMetadata {
    /// Entry-scoped metadata and its tags.
    pub entry: Option<(UserMetadata, Vec<Tag>)>,
    /// Content-scoped metadata and its tags.
    pub content: Option<(UserMetadata, Vec<Tag>)>,
}

/// Read-only queries on the projections: typed rows, listings, metadata, counts and the digest.
/// From [`Projections::query`]; it borrows the projections, so no apply runs meanwhile.
#[derive(Clone, Copy)]
pub struct Query<'a> {
    projections: &'a Projections,
}

impl std::ops::Deref for Query<'_> {
    type Target = Projections;

    fn deref(&self) -> &Projections {
        self.projections
    }
}

impl Projections {
    /// The queries.
    pub fn query(&self) -> Query<'_> {
        Query { projections: self }
    }
}

impl Query<'_> {
    /// Visible records of model `M` matching `filter` (an SQL condition on its columns).
    pub fn select<M: Syncable, P: Params>(
        &self,
        filter: &str,
        params: P,
    ) -> Result<Vec<M>, ProjectionError> {
        self.select_ordered(filter, "uuid", params)
    }

    /// The first `limit` visible records of model `M` in the order of its field `field` (then
    /// uuid), and how many visible records it has: a page for a view that shows a few of many
    /// without reading them all.
    ///
    /// # Panics
    /// If `field` is not one of `M`'s fields (a caller's mistake, never data).
    pub fn first<M: Syncable>(
        &self,
        field: &'static str,
        limit: usize,
    ) -> Result<(Vec<M>, u64), ProjectionError> {
        assert!(
            M::DEF.fields.iter().any(|f| f.name == field),
            "{field} is not a field of {}",
            M::DEF.name
        );
        let order = format!("{field}, uuid LIMIT {limit}");
        let first = self.select_ordered("1", &order, [])?;
        Ok((first, self.live_count(M::DEF)?))
    }

    /// Like [`Query::select`], in the order (and with the `LIMIT`) `order` gives.
    pub(crate) fn select_ordered<M: Syncable, P: Params>(
        &self,
        filter: &str,
        order: &str,
        params: P,
    ) -> Result<Vec<M>, ProjectionError> {
        let def = M::DEF;
        let cols: Vec<&str> = def.fields.iter().map(|f| f.name).collect();
        let sql = format!(
            "SELECT uuid, {} FROM {} WHERE _live = 1 AND ({filter}) ORDER BY {order}",
            cols.join(", "),
            def.name
        );
        let mut stmt = self.conn.prepare_cached(&sql)?;
        let mut rows = stmt.query(params)?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            let uuid_bytes: Vec<u8> = row.get(0)?;
            let uuid = Uuid::from_slice(&uuid_bytes)
                .map_err(|_| ProjectionError::MalformedRow(format!("{} uuid", def.name)))?;
            let mut values: Vec<Value> = Vec::with_capacity(cols.len());
            for i in 0..cols.len() {
                values.push(read_value(def, i, row.get_ref(i + 1)?)?);
            }
            let record = M::from_field_values(uuid, &values)
                .ok_or_else(|| ProjectionError::MalformedRow(format!("{} {uuid}", def.name)))?;
            out.push(record);
        }
        Ok(out)
    }

    /// Which of `uuids` have a visible record of model `M`, in the order given. Looks them up
    /// 256 at a time in one statement (one statement per uuid was a large share of the indexer's
    /// main thread: decision 0036).
    pub fn existing<M: Syncable>(&self, uuids: &[Uuid]) -> Result<Vec<bool>, ProjectionError> {
        let mut live: HashSet<Uuid> = HashSet::with_capacity(uuids.len());
        for chunk in uuids.chunks(EXISTING_CHUNK) {
            let marks = vec!["?"; chunk.len()].join(",");
            let sql = format!(
                "SELECT uuid FROM {} WHERE _live = 1 AND uuid IN ({marks})",
                M::DEF.name
            );
            // Full chunks share one cached statement; the last, shorter one is prepared once.
            let (mut cached, mut fresh);
            let stmt: &mut Statement<'_> = if chunk.len() == EXISTING_CHUNK {
                cached = self.conn.prepare_cached(&sql)?;
                &mut cached
            } else {
                fresh = self.conn.prepare(&sql)?;
                &mut fresh
            };
            let params = params_from_iter(chunk.iter().map(|u| u.as_bytes().as_slice()));
            let mut rows = stmt.query(params)?;
            while let Some(row) = rows.next()? {
                let raw = row.get_ref(0)?;
                // A malformed key matches none of `uuids` anyway.
                if let Some(uuid) = raw.as_blob().ok().and_then(|b| Uuid::from_slice(b).ok()) {
                    live.insert(uuid);
                }
            }
        }
        Ok(uuids.iter().map(|u| live.contains(u)).collect())
    }

    /// The visible record of model `M` with this uuid.
    pub fn get<M: Syncable>(&self, uuid: Uuid) -> Result<Option<M>, ProjectionError> {
        Ok(self
            .select::<M, _>("uuid = ?1", [uuid.as_bytes().as_slice()])?
            .into_iter()
            .next())
    }

    /// The uuids of records of model `M` that were deleted (a tombstone, not visible).
    pub fn deleted<M: Syncable>(&self) -> Result<Vec<Uuid>, ProjectionError> {
        let sql = format!(
            "SELECT uuid FROM {} WHERE _live = 0 AND _tomb IS NOT NULL ORDER BY uuid",
            M::DEF.name
        );
        let mut stmt = self.conn.prepare_cached(&sql)?;
        let mut rows = stmt.query([])?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            let bytes: Vec<u8> = row.get(0)?;
            out.push(
                Uuid::from_slice(&bytes)
                    .map_err(|_| ProjectionError::MalformedRow(format!("{} uuid", M::DEF.name)))?,
            );
        }
        Ok(out)
    }

    /// All visible locations.
    pub fn locations(&self) -> Result<Vec<Location>, ProjectionError> {
        self.select::<Location, _>("1", [])
    }

    /// The entries directly inside directory `relative_path` of a location.
    pub fn children(
        &self,
        location: Uuid,
        relative_path: &str,
    ) -> Result<Vec<Entry>, ProjectionError> {
        self.select::<Entry, _>(
            "location = ?1 AND relative_path = ?2",
            (location.as_bytes().as_slice(), relative_path),
        )
    }

    /// Every entry of a location.
    pub fn entries_of_location(&self, location: Uuid) -> Result<Vec<Entry>, ProjectionError> {
        self.select::<Entry, _>("location = ?1", [location.as_bytes().as_slice()])
    }

    /// The entry at `relative_path`/`name` in a location.
    pub fn entry_at(
        &self,
        location: Uuid,
        relative_path: &str,
        name: &str,
    ) -> Result<Option<Entry>, ProjectionError> {
        Ok(self
            .select::<Entry, _>(
                "location = ?1 AND relative_path = ?2 AND name = ?3",
                (location.as_bytes().as_slice(), relative_path, name),
            )?
            .into_iter()
            .next())
    }

    /// A content identity with its derived `entry_count` and `total_size`.
    pub fn content_identity(&self, uuid: Uuid) -> Result<Option<ContentIdentity>, ProjectionError> {
        let Some(mut content) = self.get::<ContentIdentity>(uuid)? else {
            return Ok(None);
        };
        let stats: Option<(i64, i64)> = self
            .conn
            .query_row(
                "SELECT entry_count, total_size FROM content_identity_stats WHERE uuid = ?1",
                [uuid.as_bytes().as_slice()],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        if let Some((count, size)) = stats {
            content.entry_count = count;
            content.total_size = size;
        }
        Ok(Some(content))
    }

    /// Contents whose stored derived counts (`entry_count`, `total_size`, kept as entries are
    /// written, see `derived.rs`) differ from counting their visible entries now, in uuid order.
    /// Empty on a sound projection; a full scan of both tables, for checks and tests. Sizes add
    /// up wrapping around, as the stored counts do.
    pub fn miscounted_contents(&self) -> Result<Vec<Uuid>, ProjectionError> {
        let bad = || ProjectionError::MalformedRow("content uuid".into());
        let mut counted: std::collections::HashMap<Uuid, (i64, i64)> = Default::default();
        let mut stmt = self
            .conn
            .prepare("SELECT content, size FROM entry WHERE _live = 1 AND content IS NOT NULL")?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            let content = Uuid::from_slice(&row.get::<_, Vec<u8>>(0)?).map_err(|_| bad())?;
            let size: Option<i64> = row.get(1)?;
            let slot = counted.entry(content).or_default();
            slot.0 = slot.0.wrapping_add(1);
            slot.1 = slot.1.wrapping_add(size.unwrap_or(0));
        }
        let mut stmt = self
            .conn
            .prepare("SELECT uuid, _entries, _bytes FROM content_identity ORDER BY uuid")?;
        let mut rows = stmt.query([])?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            let uuid = Uuid::from_slice(&row.get::<_, Vec<u8>>(0)?).map_err(|_| bad())?;
            let stored: (Option<i64>, Option<i64>) = (row.get(1)?, row.get(2)?);
            let expected = counted.get(&uuid).copied().unwrap_or_default();
            if stored != (Some(expected.0), Some(expected.1)) {
                out.push(uuid);
            }
        }
        Ok(out)
    }

    /// The tags applied to a UserMetadata, by name.
    pub fn tags_of(&self, user_metadata: Uuid) -> Result<Vec<Tag>, ProjectionError> {
        let mut tags = self.select::<Tag, _>(
            "uuid IN (SELECT tag FROM user_metadata_tag WHERE _live = 1 AND user_metadata = ?1)",
            [user_metadata.as_bytes().as_slice()],
        )?;
        tags.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(tags)
    }

    /// The tags of a content (through its content-scoped metadata).
    pub fn tags_of_content(&self, content: Uuid) -> Result<Vec<Tag>, ProjectionError> {
        let mut tags = self.select::<Tag, _>(
            "uuid IN (SELECT t.tag FROM user_metadata_tag t JOIN user_metadata m ON m.uuid = t.user_metadata \
             WHERE t._live = 1 AND m._live = 1 AND m.content = ?1)",
            [content.as_bytes().as_slice()],
        )?;
        tags.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(tags)
    }

    /// An entry's metadata in both scopes, with tags.
    pub fn metadata_of(&self, entry: &Entry) -> Result<EntryMetadata, ProjectionError> {
        let mut out = EntryMetadata::default();
        if let Some(uuid) = entry.uuid {
            if let Some(m) = self
                .select::<UserMetadata, _>("entry = ?1", [uuid.as_bytes().as_slice()])?
                .into_iter()
                .next()
            {
                let tags = self.tags_of(m.uuid)?;
                out.entry = Some((m, tags));
            }
        }
        if let Some(content) = entry.content {
            if let Some(m) = self
                .select::<UserMetadata, _>("content = ?1", [content.as_bytes().as_slice()])?
                .into_iter()
                .next()
            {
                let tags = self.tags_of(m.uuid)?;
                out.content = Some((m, tags));
            }
        }
        Ok(out)
    }

    /// Visible rows per model.
    pub fn counts(&self) -> Result<Counts, ProjectionError> {
        let mut n = [0u64; 7];
        for (slot, def) in n.iter_mut().zip(MODELS.iter()) {
            *slot = self.live_count(def)?;
        }
        Ok(Counts {
            devices: n[0],
            locations: n[1],
            entries: n[2],
            content_identities: n[3],
            user_metadata: n[4],
            tags: n[5],
            user_metadata_tags: n[6],
        })
    }
}
