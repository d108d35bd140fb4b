//! `Change`: one write to one record, and its versioned canonical encoding.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::SchemaError;
use crate::hlc::Hlc;
use crate::ids::{ChangeId, DeviceId};
use crate::registry::{code_of, model_by_code};
use crate::syncable::ModelDef;
use crate::value::Value;
use crate::Syncable;

/// The newest change encoding this build writes and reads.
pub const CHANGE_FORMAT_VERSION: u8 = 1;

/// Upper bound on fields in one upsert (no model has more).
pub const FIELDS_PER_CHANGE_MAX: usize = 64;

/// What a change does to its record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "typescript", derive(ts_rs::TS))]
pub enum Op {
    /// Sets these fields (by index in the model's field list); other fields keep their values.
    Upsert(Vec<(u8, Value)>),
    /// Deletes the record (a tombstone, ordered like any write).
    Delete,
}

/// One write to one record, made by one device at one HLC reading.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "typescript", derive(ts_rs::TS))]
pub struct Change {
    /// Unique id (UUIDv7); pushing a change twice is idempotent by this id.
    pub id: ChangeId,
    /// When and where it was made; its `device` is the origin device.
    pub hlc: Hlc,
    /// The model's code (see [`Registry`](crate::Registry)).
    pub model: u8,
    /// The record's uuid.
    pub record: Uuid,
    /// What it does.
    pub op: Op,
    /// The version of the model its fields are written in ([`ModelDef::version`]); encoded only
    /// when not 0, so a change of a model's first version is the same bytes as before versions.
    #[serde(default, skip_serializing_if = "is_first")]
    pub version: u8,
    /// Its causal context: the log position its writer had applied when it wrote it (0: none
    /// known). A change at log position `p` that another device wrote was seen by this one iff
    /// `seen >= p`; two writes to one field, neither of which saw the other, are concurrent
    /// (see the conflicts in `keel_projections`). Encoded only when not 0, as a seventh element
    /// (the version then written even when 0), so a change without one keeps its bytes. Not
    /// in the serde form, which host apps read: only in the canonical encoding.
    #[serde(skip)]
    pub seen: u64,
}

fn is_first(version: &u8) -> bool {
    *version == 0
}

impl Change {
    /// The device that made the change.
    pub fn origin(&self) -> DeviceId {
        self.hlc.device
    }

    /// Keel's model of this change (`None` for a host's model: see [`crate::Registry`]).
    pub fn model_def(&self) -> Option<&'static ModelDef> {
        model_by_code(self.model)
    }

    /// A full upsert of `record`; `None` if it is not sync-ready (no uuid yet).
    pub fn upsert<M: Syncable>(id: ChangeId, hlc: Hlc, record: &M) -> Option<Self> {
        let uuid = record.record_uuid()?;
        Some(Self::whole::<M>(
            id,
            hlc,
            uuid,
            crate::syncable::indexed(record.field_values()),
        ))
    }

    /// [`Change::upsert`] of a record it takes: the same change, without copying its strings
    /// and bytes.
    pub fn upsert_owned<M: Syncable>(id: ChangeId, hlc: Hlc, record: M) -> Option<Self> {
        let uuid = record.record_uuid()?;
        Some(Self::whole::<M>(
            id,
            hlc,
            uuid,
            record.into_indexed_values(),
        ))
    }

    /// The upsert of every field of record `uuid` of model `M`.
    fn whole<M: Syncable>(id: ChangeId, hlc: Hlc, uuid: Uuid, fields: Vec<(u8, Value)>) -> Self {
        Self {
            id,
            hlc,
            model: code_of::<M>(),
            record: uuid,
            op: Op::Upsert(fields),
            version: M::DEF.version,
            seen: 0,
        }
    }

    /// An upsert of some fields of model `M`, by name. Unknown names are a [`SchemaError`].
    pub fn upsert_fields<M: Syncable>(
        id: ChangeId,
        hlc: Hlc,
        record: Uuid,
        fields: Vec<(&str, Value)>,
    ) -> Result<Self, SchemaError> {
        let def = M::DEF;
        let mut indexed = Vec::with_capacity(fields.len());
        for (name, value) in fields {
            let index = def
                .field_index(name)
                .and_then(|i| u8::try_from(i).ok())
                .ok_or_else(|| {
                    SchemaError::Malformed(format!("{}.{name}: no such field", def.name))
                })?;
            indexed.push((index, value));
        }
        let change = Self {
            id,
            hlc,
            model: code_of::<M>(),
            record,
            op: Op::Upsert(indexed),
            version: def.version,
            seen: 0,
        };
        change.validate()?;
        Ok(change)
    }

    /// An upsert of the fields `update` writes (see [`crate::FieldUpdate`]).
    pub fn upsert_update<U: crate::FieldUpdate>(
        id: ChangeId,
        hlc: Hlc,
        update: U,
    ) -> Result<Self, SchemaError> {
        let change = Self {
            id,
            hlc,
            model: code_of::<U::Model>(),
            record: update.record(),
            op: Op::Upsert(update.into_fields()),
            version: <U::Model as Syncable>::DEF.version,
            seen: 0,
        };
        change.validate()?;
        Ok(change)
    }

    /// A delete of a record of model `M`.
    pub fn delete<M: Syncable>(id: ChangeId, hlc: Hlc, record: Uuid) -> Self {
        Self {
            id,
            hlc,
            model: code_of::<M>(),
            record,
            op: Op::Delete,
            version: M::DEF.version,
            seen: 0,
        }
    }

    /// Checks the field count and, for one of Keel's models at its version, the field indexes
    /// and value types. A change of a model this build lacks (a host's, a newer app's) or of a
    /// version it does not know is well formed if its size is: it is kept, and the projections
    /// check it against their library's registry ([`Change::validate_as`]) or say what they lack.
    pub fn validate(&self) -> Result<(), SchemaError> {
        if let Op::Upsert(fields) = &self.op {
            if fields.len() > FIELDS_PER_CHANGE_MAX {
                return Err(SchemaError::Malformed(format!(
                    "{} fields in one change (max {FIELDS_PER_CHANGE_MAX})",
                    fields.len()
                )));
            }
        }
        match model_by_code(self.model) {
            Some(def) if def.version == self.version => self.validate_as(def),
            _ => Ok(()),
        }
    }

    /// Checks the field indexes and value types against `def` (fields at `def`'s version).
    pub fn validate_as(&self, def: &'static ModelDef) -> Result<(), SchemaError> {
        if let Op::Upsert(fields) = &self.op {
            for (index, value) in fields {
                let field =
                    def.fields
                        .get(usize::from(*index))
                        .ok_or(SchemaError::UnknownField {
                            model: def.name,
                            index: *index,
                        })?;
                if !field.ty.accepts(value) || (matches!(value, Value::Null) && !field.nullable) {
                    return Err(SchemaError::WrongType {
                        model: def.name,
                        field: field.name,
                        expected: field.ty.name(),
                    });
                }
            }
        }
        Ok(())
    }

    /// The canonical encoding: a version byte, then MessagePack.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(160);
        self.encode_into(&mut out);
        out
    }

    /// Appends [`Change::encode`]'s bytes to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.push(CHANGE_FORMAT_VERSION);
        // The bytes rmp-serde would write, written directly (see `change_encode`).
        crate::change_encode::encode_body(self, out);
    }

    /// Decodes and validates [`Change::encode`] output. Never panics on any input.
    pub fn decode(bytes: &[u8]) -> Result<Self, SchemaError> {
        let (&version, body) = bytes.split_first().ok_or(SchemaError::Empty)?;
        if version != CHANGE_FORMAT_VERSION {
            return Err(SchemaError::UnsupportedVersion {
                found: version,
                supported: CHANGE_FORMAT_VERSION,
            });
        }
        if let Some(change) = crate::change_decode::decode_body(body) {
            change.validate()?;
            return Ok(change);
        }
        let mut reader = body;
        let mut deserializer = rmp_serde::Deserializer::new(&mut reader).with_binary();
        let change = Change::deserialize(&mut deserializer)
            .map_err(|e| SchemaError::Malformed(e.to_string()))?;
        let rest = reader.len();
        if rest != 0 {
            return Err(SchemaError::Malformed(format!("{rest} trailing bytes")));
        }
        change.validate()?;
        Ok(change)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::{Entry, EntryKind};

    fn sample() -> Change {
        let entry = Entry {
            uuid: Some(Uuid::now_v7()),
            location: Uuid::now_v7(),
            relative_path: "photos/2024".into(),
            name: "beach.jpg".into(),
            kind: EntryKind::File.code(),
            size: 123_456,
            created_ms: 1_700_000_000_000,
            modified_ms: 1_700_000_000_001,
            content: Some(Uuid::new_v4()),
            metadata: None,
            inode: None,
            volume: None,
        };
        let hlc = Hlc {
            physical_ms: 1_700_000_000_002,
            counter: 3,
            device: DeviceId([7; 32]),
        };
        Change::upsert(ChangeId::new(), hlc, &entry).expect("entry has a uuid")
    }

    /// Values of the types of `M`'s fields (Null for some nullable ones), for building records.
    fn values_of<M: Syncable>() -> impl proptest::strategy::Strategy<Value = Vec<Value>> {
        use crate::FieldType;
        use proptest::prelude::*;
        let per_field: Vec<BoxedStrategy<Value>> = M::DEF
            .fields
            .iter()
            .map(|f| {
                let value: BoxedStrategy<Value> = match f.ty {
                    FieldType::Bool => any::<bool>().prop_map(Value::Bool).boxed(),
                    FieldType::Int => any::<i64>().prop_map(Value::Int).boxed(),
                    FieldType::Text => "[a-z/é.]{0,24}".prop_map(Value::Text).boxed(),
                    FieldType::Bytes => proptest::collection::vec(any::<u8>(), 0..40)
                        .prop_map(Value::Bytes)
                        .boxed(),
                    FieldType::Uuid => any::<u128>()
                        .prop_map(|u| Value::Uuid(Uuid::from_u128(u)))
                        .boxed(),
                };
                if f.nullable {
                    prop_oneof![Just(Value::Null), value].boxed()
                } else {
                    value
                }
            })
            .collect();
        per_field
    }

    /// `upsert_owned` of a record built from `values` is `upsert` of the same record.
    fn owned_matches_borrowed<M: Syncable + Clone>(
        values: &[Value],
    ) -> Result<(), proptest::test_runner::TestCaseError> {
        let record = M::from_field_values(Uuid::now_v7(), values)
            .ok_or_else(|| proptest::test_runner::TestCaseError::fail("builds"))?;
        let (id, hlc) = (ChangeId::new(), sample().hlc);
        proptest::prop_assert_eq!(
            Change::upsert_owned(id, hlc, record.clone()),
            Change::upsert(id, hlc, &record)
        );
        Ok(())
    }

    proptest::proptest! {
        #[test]
        fn an_owned_upsert_is_the_same_change_for_every_model(
            device in values_of::<crate::Device>(),
            location in values_of::<crate::Location>(),
            entry in values_of::<Entry>(),
            content in values_of::<crate::ContentIdentity>(),
            metadata in values_of::<crate::UserMetadata>(),
            tag in values_of::<crate::Tag>(),
            link in values_of::<crate::UserMetadataTag>(),
        ) {
            owned_matches_borrowed::<crate::Device>(&device)?;
            owned_matches_borrowed::<crate::Location>(&location)?;
            owned_matches_borrowed::<Entry>(&entry)?;
            owned_matches_borrowed::<crate::ContentIdentity>(&content)?;
            owned_matches_borrowed::<crate::UserMetadata>(&metadata)?;
            owned_matches_borrowed::<crate::Tag>(&tag)?;
            owned_matches_borrowed::<crate::UserMetadataTag>(&link)?;
        }
    }

    #[test]
    fn round_trips_and_is_compact() {
        let change = sample();
        let bytes = change.encode();
        assert_eq!(bytes[0], CHANGE_FORMAT_VERSION);
        assert!(bytes.len() < 256, "encoded size {}", bytes.len());
        assert_eq!(Change::decode(&bytes).expect("decodes"), change);
    }

    #[test]
    fn a_causal_context_round_trips_and_costs_nothing_when_absent() {
        let mut change = sample();
        let without = change.encode();
        assert_eq!(without[1], 0x96, "version 1, no context: six elements");
        change.seen = 70_000;
        let with = change.encode();
        assert_eq!(with[1], 0x97, "a context is a seventh element");
        assert_eq!(Change::decode(&with).expect("decodes"), change);
        change.version = 0;
        let first_version = change.encode();
        assert_eq!(first_version[1], 0x97, "the version is written before it");
        assert_eq!(Change::decode(&first_version).expect("decodes"), change);
        change.seen = 0;
        assert_eq!(
            change.encode()[1],
            0x95,
            "neither: five elements, as before both"
        );
    }

    #[test]
    fn rejects_bad_versions_and_truncation() {
        let mut bytes = sample().encode();
        assert!(matches!(Change::decode(&[]), Err(SchemaError::Empty)));
        bytes[0] = 9;
        assert!(matches!(
            Change::decode(&bytes),
            Err(SchemaError::UnsupportedVersion { found: 9, .. })
        ));
        bytes[0] = CHANGE_FORMAT_VERSION;
        for cut in 1..bytes.len() {
            assert!(Change::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn rejects_wrong_types() {
        let mut change = sample();
        change.op = Op::Upsert(vec![(0, Value::Int(3))]);
        assert!(matches!(
            Change::decode(&change.encode()),
            Err(SchemaError::WrongType { .. })
        ));
        change.op = Op::Upsert(vec![(200, Value::Null)]);
        assert!(matches!(
            Change::decode(&change.encode()),
            Err(SchemaError::UnknownField { .. })
        ));
    }
}
