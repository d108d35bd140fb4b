//! `Tx`: the changes of one `Library::transact` call, stamped with the device's clock.

use keel_schema::{Change, ChangeId, HlcClock, Syncable, Value};
use uuid::Uuid;

use crate::error::EngineError;

/// Collects the changes of one transaction. Nothing is written until `transact` commits them all.
pub struct Tx<'a> {
    clock: &'a mut HlcClock,
    now_ms: u64,
    pub(crate) changes: Vec<Change>,
}

impl<'a> Tx<'a> {
    pub(crate) fn new(clock: &'a mut HlcClock, now_ms: u64) -> Self {
        Self {
            clock,
            now_ms,
            changes: Vec::new(),
        }
    }

    /// Writes every synced field of `record`. Returns `false` (and writes nothing) if the record is
    /// not sync-ready (its uuid is `None`).
    pub fn upsert<M: Syncable>(&mut self, record: &M) -> bool {
        self.push_upsert(|id, hlc| Change::upsert(id, hlc, record))
    }

    /// [`Tx::upsert`] of a record it takes (its strings and bytes move into the change).
    pub fn upsert_owned<M: Syncable>(&mut self, record: M) -> bool {
        self.push_upsert(|id, hlc| Change::upsert_owned(id, hlc, record))
    }

    /// Adds the upsert that `build` makes with a new id and clock, if it makes one.
    fn push_upsert(
        &mut self,
        build: impl FnOnce(ChangeId, keel_schema::Hlc) -> Option<Change>,
    ) -> bool {
        let hlc = self.clock.tick(self.now_ms);
        match build(ChangeId::at(self.now_ms), hlc) {
            Some(change) => {
                self.changes.push(change);
                true
            }
            None => false,
        }
    }

    /// Writes some fields of record `uuid` of model `M`, by field name.
    pub fn update<M: Syncable>(
        &mut self,
        uuid: Uuid,
        fields: Vec<(&str, Value)>,
    ) -> Result<(), EngineError> {
        let hlc = self.clock.tick(self.now_ms);
        self.changes.push(Change::upsert_fields::<M>(
            ChangeId::at(self.now_ms),
            hlc,
            uuid,
            fields,
        )?);
        Ok(())
    }

    /// Deletes record `uuid` of model `M` (a tombstone: it never comes back through older writes).
    pub fn delete<M: Syncable>(&mut self, uuid: Uuid) {
        let hlc = self.clock.tick(self.now_ms);
        self.changes
            .push(Change::delete::<M>(ChangeId::at(self.now_ms), hlc, uuid));
    }

    /// Adds an already-built change (its clock is observed so later ticks stay ahead of it).
    pub fn push(&mut self, change: Change) {
        self.clock.observe(change.hlc);
        self.changes.push(change);
    }

    /// Changes collected so far.
    pub fn len(&self) -> usize {
        self.changes.len()
    }

    /// Whether no change was collected.
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }
}
