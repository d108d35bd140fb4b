//! The `Syncable` trait: what each model declares about itself so the engine can sync it.

use uuid::Uuid;

use crate::value::{FieldType, Value};

/// The sync domain of a record: who may write it and how conflicts are treated.
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum SyncDomain {
    /// Device-owned index data (Device, Location, Entry, entry-scoped metadata): one writer, no conflicts.
    Index,
    /// Content-universal data (ContentIdentity, content-scoped metadata, Tag): any device writes.
    Content,
}

/// How a model's domain is decided.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum DomainRule {
    /// Always this domain.
    Fixed(SyncDomain),
    /// Decided per record by [`Syncable::sync_domain`] (UserMetadata by its scope).
    ByScope,
    /// The domain of the parent record named by this field (UserMetadataTag by its UserMetadata).
    ByParent(&'static str),
}

/// One synced field of a model.
#[derive(Clone, Copy, Debug)]
pub struct FieldDef {
    /// The field's name (also its SQL column).
    pub name: &'static str,
    /// Its storage type.
    pub ty: FieldType,
    /// Whether it may be `Null`.
    pub nullable: bool,
    /// The model this field references, if it is a reference.
    pub references: Option<&'static str>,
    /// A nullable reference that breaks a dependency cycle: applied in a second step.
    pub breaks_cycle: bool,
}

/// Everything the engine needs to know about a model, produced by `#[derive(Syncable)]`.
#[derive(Debug)]
pub struct ModelDef {
    /// The model's name (also its SQL table), e.g. `entry`.
    pub name: &'static str,
    /// The Rust field that holds the record uuid.
    pub uuid_field: &'static str,
    /// How the domain is decided.
    pub domain: DomainRule,
    /// Synced fields in their stable order; a change names a field by its index here.
    pub fields: &'static [FieldDef],
    /// Fields present on the struct but never synced (derived or local).
    pub skipped: &'static [&'static str],
    /// Sync priority: lower goes first within one dependency level.
    pub priority: u8,
    /// A deleted record stays deleted, whatever upsert comes after (`#[syncable(permanent_delete)]`):
    /// a revoked device's Device record, which that device could otherwise write again.
    pub permanent_delete: bool,
}

impl ModelDef {
    /// The models this one depends on (excluding cycle-breaking references).
    pub fn dependencies(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.fields
            .iter()
            .filter(|f| !f.breaks_cycle)
            .filter_map(|f| f.references)
    }

    /// The fields that are nullable cycle-breaking references.
    pub fn nullable_references(&self) -> impl Iterator<Item = (usize, &FieldDef)> + '_ {
        self.fields
            .iter()
            .enumerate()
            .filter(|(_, f)| f.breaks_cycle)
    }

    /// The index of a field by name.
    pub fn field_index(&self, name: &str) -> Option<usize> {
        self.fields.iter().position(|f| f.name == name)
    }
}

/// Looks up the cached domain of a parent record (for [`DomainRule::ByParent`]).
pub trait DomainLookup {
    /// The domain of record `uuid` of model `model`, if known.
    fn domain_of(&self, model: &str, uuid: Uuid) -> Option<SyncDomain>;
}

/// A typed update of some fields of one record: `#[derive(Syncable)]` makes one per model,
/// named after it (`TagUpdate` for `Tag`), with a setter per field, so a field name cannot be
/// misspelt.
pub trait FieldUpdate {
    /// The model it updates.
    type Model: Syncable;
    /// The record it updates.
    fn record(&self) -> Uuid;
    /// The fields it writes, by index.
    fn into_fields(self) -> Vec<(u8, crate::Value)>;
}

/// A model that Keel syncs. Implement it with `#[derive(Syncable)]`.
pub trait Syncable: Sized {
    /// The model's static description.
    const DEF: &'static ModelDef;

    /// The record uuid; `None` while the record is not sync-ready (it is then never sent).
    fn record_uuid(&self) -> Option<Uuid>;

    /// The synced field values in [`ModelDef::fields`] order.
    fn field_values(&self) -> Vec<Value>;

    /// The synced field values with their indexes in [`ModelDef::fields`], taken from the record
    /// (strings and bytes move instead of being copied).
    fn into_indexed_values(self) -> Vec<(u8, Value)> {
        indexed(self.field_values())
    }

    /// Builds a record from its uuid and synced field values in [`ModelDef::fields`] order.
    /// Skipped fields take their `Default`.
    fn from_field_values(uuid: Uuid, values: &[Value]) -> Option<Self>;

    /// This record's domain. For [`DomainRule::ByParent`] the parent's domain comes from `lookup`
    /// (Index when unknown).
    fn sync_domain(&self, lookup: &dyn DomainLookup) -> SyncDomain;
}

/// Field values in [`ModelDef::fields`] order, paired with their indexes (a change names fields
/// by a `u8` index; the derive refuses models with more fields than that).
pub(crate) fn indexed(values: Vec<Value>) -> Vec<(u8, Value)> {
    values
        .into_iter()
        .enumerate()
        .filter_map(|(i, v)| u8::try_from(i).ok().map(|i| (i, v)))
        .collect()
}
