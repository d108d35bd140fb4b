//! Collecting tombstones at a horizon (decision 0082).
//!
//! A [`keel_schema::Horizon`] in the log says that no change older than its bound can reach the
//! log any more. Applied at its log position, it has the projections forget every tombstone
//! older than the bound:
//!
//! - a row that holds only such a tombstone (and perhaps the owner field the delete kept) is
//!   removed, unless a row still references it: a missing row and a tombstone-only row answer
//!   every newer write alike (decision 0073), and no older write can come;
//! - a row written again after such a tombstone loses the tombstone and every field older than
//!   it (the owner field), so it equals the row a device that never saw the record builds from
//!   the same newer writes;
//! - a model whose deletes are permanent keeps its tombstones.
//!
//! *Invariant:* the result depends only on the rows and the bound, and every device holds the
//! same rows at a log position but for its own changes not yet sequenced, which are newer than
//! the bound (every device promised so, see the floor in `keel-replication`). So every device
//! collects the same rows, and a replay from any snapshot collects them again at the same place.

use std::collections::HashSet;

use keel_schema::{Change, Horizon, ModelDef, Op, Value};
use rusqlite::params;
use uuid::Uuid;

use crate::apply::{forget_before, Applier};
use crate::error::ProjectionError;

/// The bound of `change` if it is a horizon (a whole one, with values in range, and not past its
/// own clock: a leader's floor is never past its clock's reading, so a bound beyond the clock
/// it was made at is forged, and ignored).
pub(crate) fn horizon_bound(change: &Change) -> Option<(u64, u32)> {
    if change.model != keel_schema::code_of::<Horizon>() {
        return None;
    }
    let Op::Upsert(fields) = &change.op else {
        return None;
    };
    let field = |index: u8| {
        fields.iter().find_map(|(i, v)| match v {
            Value::Int(n) if *i == index => Some(*n),
            _ => None,
        })
    };
    let bound = Horizon {
        uuid: change.record,
        before_ms: field(0)?,
        before_counter: field(1)?,
    }
    .bound()?;
    (bound <= (change.hlc.physical_ms, change.hlc.counter)).then_some(bound)
}

/// The first horizon at or after `from` among `changes` that is a log entry (`logged[i]` set),
/// with its index and bound. A horizon applied as a local change does nothing: only its log copy,
/// applied after the same changes on every device, collects.
pub(crate) fn next_horizon(
    changes: &[Change],
    logged: &[Option<u64>],
    from: usize,
) -> Option<(usize, (u64, u32))> {
    (from..changes.len().min(logged.len())).find_map(|i| {
        logged[i]?;
        horizon_bound(&changes[i]).map(|bound| (i, bound))
    })
}

/// `bound` as the leading bytes of a stored clock: a stored tombstone compares below it (as
/// SQLite compares blobs) exactly when its time and counter are older.
fn bound_key(bound: (u64, u32)) -> [u8; 12] {
    let mut key = [0u8; 12];
    key[..8].copy_from_slice(&bound.0.to_be_bytes());
    key[8..].copy_from_slice(&bound.1.to_be_bytes());
    key
}

/// The uuids of the rows of `def` whose tombstone is older than `bound` (through the partial
/// index of deleted rows).
fn deleted_before(
    conn: &rusqlite::Connection,
    def: &ModelDef,
    bound: (u64, u32),
) -> Result<Vec<Uuid>, ProjectionError> {
    let select = format!(
        "SELECT uuid FROM {} WHERE _tomb IS NOT NULL AND _tomb < ?1",
        def.name
    );
    let mut stmt = conn.prepare(&select)?;
    let rows = stmt.query_map([bound_key(bound).as_slice()], |r| r.get::<_, Vec<u8>>(0))?;
    let mut uuids = Vec::new();
    for bytes in rows {
        uuids.push(
            Uuid::from_slice(&bytes?)
                .map_err(|_| ProjectionError::MalformedRow(format!("{} uuid", def.name)))?,
        );
    }
    Ok(uuids)
}

impl crate::Query<'_> {
    /// Whether any row holds a tombstone older than `(ms, counter)` that a horizon there would
    /// look at (models whose deletes are permanent left out): a leader appends one only then.
    pub fn holds_tombstones_before(&self, ms: u64, counter: u32) -> Result<bool, ProjectionError> {
        let key = bound_key((ms, counter));
        for def in self.registry.iter().filter(|d| !d.permanent_delete) {
            let mut stmt = self.connection().prepare_cached(&format!(
                "SELECT 1 FROM {} WHERE _tomb IS NOT NULL AND _tomb < ?1 LIMIT 1",
                def.name
            ))?;
            if stmt.exists([key.as_slice()])? {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

impl Applier<'_> {
    /// Collects the tombstones of `def` older than `bound` (see the module docs). Returns the
    /// rows removed and the rows that lost their tombstone.
    pub(crate) fn collect_tombstones(
        &self,
        def: &ModelDef,
        bound: (u64, u32),
    ) -> Result<u64, ProjectionError> {
        if def.permanent_delete {
            return Ok(0);
        }
        let mut changed = 0;
        let mut only_tombstones = Vec::new();
        for uuid in deleted_before(self.conn, def, bound)? {
            let Some(mut row) = self.read_row(def, uuid)? else {
                continue;
            };
            let Some(tomb) = row.tomb else {
                continue;
            };
            if (tomb.physical_ms, tomb.counter) >= bound {
                continue;
            }
            let before = self.share_of_row(def, def.code, &row);
            forget_before(&mut row.values, &mut row.clocks, (tomb, None));
            row.tomb = None;
            if row.clocks.newest().is_none() {
                only_tombstones.push((uuid, before));
            } else {
                self.write_row(def, def.code, uuid, &row, before)?;
                changed += 1;
            }
        }
        let candidates: HashSet<Uuid> = only_tombstones.iter().map(|(u, _)| *u).collect();
        let referenced = self.referenced(def, &candidates)?;
        let mut remove = self
            .conn
            .prepare_cached(&format!("DELETE FROM {} WHERE uuid = ?1", def.name))?;
        for (uuid, before) in only_tombstones {
            if referenced.contains(&uuid) {
                continue;
            }
            remove.execute(params![uuid.as_bytes().as_slice()])?;
            self.forget_share(before);
            changed += 1;
        }
        Ok(changed)
    }

    /// Which of `candidates`, rows of `target`, a row of any model still references.
    fn referenced(
        &self,
        target: &ModelDef,
        candidates: &HashSet<Uuid>,
    ) -> Result<HashSet<Uuid>, ProjectionError> {
        let mut found = HashSet::new();
        if candidates.is_empty() {
            return Ok(found);
        }
        for def in self.registry().iter() {
            for field in def
                .fields
                .iter()
                .filter(|f| f.references == Some(target.name))
            {
                if crate::ddl::indexed(def.name, field.name) {
                    let mut stmt = self.conn.prepare_cached(&format!(
                        "SELECT 1 FROM {} WHERE {} = ?1 LIMIT 1",
                        def.name, field.name
                    ))?;
                    for uuid in candidates {
                        if stmt.exists([uuid.as_bytes().as_slice()])? {
                            found.insert(*uuid);
                        }
                    }
                } else {
                    // No index starts with the reference: one pass over the table.
                    let mut stmt = self.conn.prepare(&format!(
                        "SELECT {0} FROM {1} WHERE {0} IS NOT NULL",
                        field.name, def.name
                    ))?;
                    let mut rows = stmt.query([])?;
                    while let Some(row) = rows.next()? {
                        let bytes: Vec<u8> = row.get(0)?;
                        if let Ok(uuid) = Uuid::from_slice(&bytes) {
                            if candidates.contains(&uuid) {
                                found.insert(uuid);
                            }
                        }
                    }
                }
            }
        }
        Ok(found)
    }
}
