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
    /// The model version that added this field (`#[syncable(since = N)]`; 0 for the first).
    pub since: u8,
    /// The value a whole record of an older version takes for this field when it is upcast
    /// (`#[syncable(default = "path")]`, else the type's `Default`).
    pub default: fn() -> Value,
}

/// A host's step from one version of a model's changes to the next (`#[syncable(upcast =
/// "path")]`): called with the version the fields are in and the fields, it rewrites them into
/// the next version's encoding (a changed type, say), or says why it cannot.
pub type Upcast = fn(from: u8, fields: &mut Vec<(u8, Value)>) -> Result<(), String>;

/// Everything the engine needs to know about a model, produced by `#[derive(Syncable)]`.
#[derive(Debug)]
pub struct ModelDef {
    /// The model's name (also its SQL table), e.g. `entry`.
    pub name: &'static str,
    /// Its stable code in changes (`#[syncable(code = N)]`): Keel's models hold 0 to
    /// [`crate::HOST_CODE_MIN`]` - 1`, a host's the codes from there to 254. Never reused.
    pub code: u8,
    /// The version of its changes this build writes (`#[syncable(version = N)]`, 0 first).
    pub version: u8,
    /// The host's upcaster, for versions that change more than adding fields.
    pub upcast: Option<Upcast>,
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

    /// Whether several devices may write its records (it is not always index-domain, where the
    /// owning device is the only writer).
    pub fn shared_writes(&self) -> bool {
        !matches!(self.domain, DomainRule::Fixed(SyncDomain::Index))
    }

    /// Whether users edit its records' values on several devices: it has
    /// [`ModelDef::shared_writes`] and is not one whose every value is derived, the same on
    /// every device (a ContentIdentity from a file's bytes, a RegisteredModel from an app's
    /// code). Writes to such models are looked at for conflicts, and carry their causal
    /// context ([`crate::Change::seen`]).
    pub fn user_edited(&self) -> bool {
        self.shared_writes() && !matches!(self.name, "content_identity" | "registered_model")
    }

    /// Brings the fields of a change written at version `from` to this build's version: the
    /// host's [`ModelDef::upcast`] one step at a time, then, if the change wrote every field its
    /// version had (a whole record), the fields added since, at their default (which is in this
    /// version's encoding, so no upcaster sees it). A partial change stays partial: it never
    /// overwrites a field its writer did not know. The fields come out sorted by index.
    pub fn upcast(
        &self,
        from: u8,
        fields: &mut Vec<(u8, Value)>,
    ) -> Result<(), crate::SchemaError> {
        if from > self.version {
            return Err(crate::SchemaError::NewerVersion {
                model: self.name,
                found: from,
                known: self.version,
            });
        }
        let whole = self.is_whole_at(from, fields);
        if let Some(step) = self.upcast {
            for version in from..self.version {
                step(version, fields).map_err(|reason| crate::SchemaError::Upcast {
                    model: self.name,
                    from: version,
                    reason,
                })?;
            }
        }
        if whole {
            for (i, field) in self.fields.iter().enumerate() {
                if let (true, Ok(i)) = (field.since > from, u8::try_from(i)) {
                    fields.push((i, (field.default)()));
                }
            }
        }
        fields.sort_by_key(|(i, _)| *i);
        Ok(())
    }

    /// Whether `fields` write every field version `version` of this model had.
    fn is_whole_at(&self, version: u8, fields: &[(u8, Value)]) -> bool {
        let had = self.fields.iter().filter(|f| f.since <= version).count();
        fields.len() == had
            && self
                .fields
                .iter()
                .enumerate()
                .filter(|(_, f)| f.since <= version)
                .all(|(i, _)| fields.iter().any(|(j, _)| usize::from(*j) == i))
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

#[cfg(test)]
mod tests {
    /// Index-domain models (one writer) never conflict; derived ones (the same values on every
    /// device) are not looked at; what users edit on several devices is.
    #[test]
    fn only_what_users_edit_on_several_devices_can_conflict() {
        let edited: Vec<&str> = crate::MODELS
            .iter()
            .filter(|d| d.user_edited())
            .map(|d| d.name)
            .collect();
        assert_eq!(
            edited,
            [
                "user_metadata",
                "tag",
                "user_metadata_tag",
                "conflict_policy"
            ]
        );
    }
}
