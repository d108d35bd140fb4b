//! `Tx`: the changes of one `Library::transact` call, stamped with the device's clock.

use keel_schema::{Change, ChangeId, HlcClock, ModelDef, Registry, Syncable, Value};
use uuid::Uuid;

use crate::error::EngineError;

/// Collects the changes of one transaction. Nothing is written until `transact` commits them all.
/// A change to a model the library does not know fails the whole transaction
/// ([`SchemaError::UnknownModel`](keel_schema::SchemaError::UnknownModel)) and journals nothing.
pub struct Tx<'a> {
    clock: &'a mut HlcClock,
    /// The library's models.
    models: &'a Registry,
    now_ms: u64,
    pub(crate) changes: Vec<Change>,
    /// The first model written that the library does not know.
    unknown: Option<String>,
    /// Whether its changes were made without seeing this library's log (see [`Tx::unseen`]).
    pub(crate) unseen: bool,
}

impl<'a> Tx<'a> {
    pub(crate) fn new(clock: &'a mut HlcClock, models: &'a Registry, now_ms: u64) -> Self {
        Self {
            clock,
            models,
            now_ms,
            changes: Vec::new(),
            unknown: None,
            unseen: false,
        }
    }

    /// Keeps `change`, unless its model is one the library does not know: then it remembers
    /// that model (the first such) and the transaction fails when it finishes. A change built
    /// from a model type (`written_as`) must be of the registered definition and version; an
    /// already built one ([`Tx::push`]), of a version the library knows.
    fn keep(&mut self, change: Change, written_as: Option<&'static ModelDef>) -> bool {
        let known = self
            .models
            .get(change.model)
            .is_some_and(|def| match written_as {
                Some(written) => written.name == def.name && written.version == def.version,
                None => change.version <= def.version,
            });
        if !known {
            if self.unknown.is_none() {
                self.unknown = Some(match written_as {
                    Some(def) => {
                        format!("{} (code {}, version {})", def.name, def.code, def.version)
                    }
                    None => format!("code {} version {}", change.model, change.version),
                });
            }
            return false;
        }
        self.changes.push(change);
        true
    }

    /// The transaction's changes, or the error that refuses them all (a model the library does
    /// not know).
    pub(crate) fn finish(self) -> Result<Vec<Change>, EngineError> {
        match self.unknown {
            Some(name) => Err(keel_schema::SchemaError::UnknownModel(name).into()),
            None => Ok(self.changes),
        }
    }

    /// Writes every synced field of `record`. Returns `false` (and writes nothing) if the record is
    /// not sync-ready (its uuid is `None`).
    pub fn upsert<M: Syncable>(&mut self, record: &M) -> bool {
        self.push_upsert::<M>(|id, hlc| Change::upsert(id, hlc, record))
    }

    /// [`Tx::upsert`] of a record it takes (its strings and bytes move into the change).
    pub fn upsert_owned<M: Syncable>(&mut self, record: M) -> bool {
        self.push_upsert::<M>(|id, hlc| Change::upsert_owned(id, hlc, record))
    }

    /// Writes `value` to field `index` of record `record` of the model with code `model` (a
    /// model known only by its code: a conflict's pick).
    pub(crate) fn write_field(
        &mut self,
        def: &'static ModelDef,
        record: Uuid,
        (index, value): (u8, Value),
    ) -> bool {
        self.write_fields(def, record, vec![(index, value)])
    }

    /// Writes `fields` (sorted by index) of record `record` of model `def`, known by its
    /// definition (a merge carrying records of any model).
    pub(crate) fn write_fields(
        &mut self,
        def: &'static ModelDef,
        record: Uuid,
        fields: Vec<(u8, Value)>,
    ) -> bool {
        debug_assert!(fields.windows(2).all(|w| w[0].0 < w[1].0), "sorted fields");
        let hlc = self.clock.tick(self.now_ms);
        let change = Change {
            id: ChangeId::at(self.now_ms),
            hlc,
            model: def.code,
            record,
            op: keel_schema::Op::Upsert(fields),
            version: def.version,
            seen: 0,
        };
        self.keep(change, Some(def))
    }

    /// Marks this transaction's changes as made without seeing this library's log (a merge
    /// carries another library's records): their causal context stays empty
    /// ([`Change::seen`] 0), so a write of theirs to a field this library already holds
    /// another value of is a conflict.
    pub(crate) fn unseen(&mut self) {
        self.unseen = true;
    }

    /// Adds the upsert of model `M` that `build` makes with a new id and clock, if it makes one.
    fn push_upsert<M: Syncable>(
        &mut self,
        build: impl FnOnce(ChangeId, keel_schema::Hlc) -> Option<Change>,
    ) -> bool {
        let hlc = self.clock.tick(self.now_ms);
        match build(ChangeId::at(self.now_ms), hlc) {
            Some(change) => self.keep(change, Some(M::DEF)),
            None => false,
        }
    }

    /// Writes some fields of record `uuid` of model `M`, by field name (prefer the typed
    /// [`Tx::set`]).
    pub fn update<M: Syncable>(
        &mut self,
        uuid: Uuid,
        fields: Vec<(&str, Value)>,
    ) -> Result<(), EngineError> {
        let hlc = self.clock.tick(self.now_ms);
        let change = Change::upsert_fields::<M>(ChangeId::at(self.now_ms), hlc, uuid, fields)?;
        self.keep(change, Some(M::DEF));
        Ok(())
    }

    /// Writes the fields `update` sets (typed: `TagUpdate::new(uuid).name(…)`, made by
    /// `#[derive(Syncable)]`; see [`keel_schema::FieldUpdate`]).
    pub fn set<U: keel_schema::FieldUpdate>(&mut self, update: U) -> Result<(), EngineError> {
        let hlc = self.clock.tick(self.now_ms);
        let change = Change::upsert_update(ChangeId::at(self.now_ms), hlc, update)?;
        self.keep(change, Some(<U::Model as Syncable>::DEF));
        Ok(())
    }

    /// Deletes record `uuid` of model `M` (a tombstone: it never comes back through older writes).
    pub fn delete<M: Syncable>(&mut self, uuid: Uuid) {
        let hlc = self.clock.tick(self.now_ms);
        let change = Change::delete::<M>(ChangeId::at(self.now_ms), hlc, uuid);
        self.keep(change, Some(M::DEF));
    }

    /// Adds an already-built change (its clock is observed so later ticks stay ahead of it).
    pub fn push(&mut self, change: Change) {
        let hlc = change.hlc;
        if self.keep(change, None) {
            self.clock.observe(hlc);
        }
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
