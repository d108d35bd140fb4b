//! Who may write a record. File facts (a Device record; a Location; an Entry's path, name,
//! kind, size, times and content, and their deletion) are written only by the device that has
//! the files. User data (tags, notes, flags, an Entry's link to its metadata), content
//! identities and host-app models may be written by any device.
//!
//! Every device checks this rule when it applies a change (see `keel-projections`): a change
//! that breaks it is refused there, kept in the journal, reported, never applied. The origin it
//! checks is trustworthy because such a change is signed by the device that made it (see
//! [`crate::attestation`]).

use crate::change::{Change, Op};
use crate::syncable::ModelDef;

/// Whose a model's records are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Owner {
    /// Any device may write them.
    Anyone,
    /// A Device record: written only by the device it describes (its uuid is
    /// [`DeviceId::record_uuid`](crate::DeviceId::record_uuid) of the origin); deleted by any
    /// device, as revoking a device is the user's decision on any of theirs.
    Itself,
    /// A Location: owned by the device whose Device record uuid is in field `field`, which never
    /// changes once set.
    DeviceIn {
        /// The field's index.
        field: u8,
    },
    /// An Entry: owned by the owner of the Location in field `field`; field `shared` (its
    /// metadata link) may be written by any device.
    LocationIn {
        /// The location field's index.
        field: u8,
        /// The index of the field any device may write.
        shared: u8,
    },
    /// An Endorsement: written only by the device named (in hex) in field `field`, the device
    /// that vouches for another; never deleted.
    NamedIn {
        /// The field's index.
        field: u8,
    },
}

fn index(def: &ModelDef, name: &str) -> Option<u8> {
    def.field_index(name).and_then(|i| u8::try_from(i).ok())
}

impl Owner {
    /// The rule of model `code` (an unknown code: [`Owner::Anyone`]). Worked out once per
    /// model (by name, from the registry) and then looked up: it is asked for every change.
    pub fn of_model(code: u8) -> Self {
        static RULES: std::sync::OnceLock<Vec<Owner>> = std::sync::OnceLock::new();
        let rules =
            RULES.get_or_init(|| crate::MODELS.iter().map(|def| Self::of_def(def)).collect());
        rules
            .get(usize::from(code))
            .copied()
            .unwrap_or(Self::Anyone)
    }

    fn of_def(def: &ModelDef) -> Self {
        let rule = match def.name {
            "device" => Some(Self::Itself),
            "location" => index(def, "device").map(|field| Self::DeviceIn { field }),
            "entry" => index(def, "location")
                .zip(index(def, "metadata"))
                .map(|(field, shared)| Self::LocationIn { field, shared }),
            "endorsement" => index(def, "by").map(|field| Self::NamedIn { field }),
            _ => None,
        };
        rule.unwrap_or(Self::Anyone)
    }

    /// Whether `change` writes what only the owner may write (for [`Owner::Itself`], an upsert).
    pub fn guards(self, change: &Change) -> bool {
        match (self, &change.op) {
            (Self::Anyone, _) | (Self::Itself, Op::Delete) => false,
            (Self::LocationIn { shared, .. }, Op::Upsert(fields)) => {
                fields.iter().any(|(i, _)| *i != shared)
            }
            _ => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{code_of, ChangeId, Device, Entry, Location, Tag, Value};
    use uuid::Uuid;

    use crate::hlc::tests::hlc;

    #[test]
    fn file_facts_are_guarded_and_user_data_is_not() {
        assert_eq!(Owner::of_model(code_of::<Tag>()), Owner::Anyone);
        assert_eq!(Owner::of_model(code_of::<Device>()), Owner::Itself);
        assert!(matches!(
            Owner::of_model(code_of::<Location>()),
            Owner::DeviceIn { .. }
        ));
        let entry = Owner::of_model(code_of::<Entry>());
        let record = Uuid::now_v7();
        let link = Change::upsert_fields::<Entry>(
            ChangeId::new(),
            hlc(),
            record,
            vec![("metadata", Value::Uuid(Uuid::now_v7()))],
        )
        .expect("a change");
        assert!(!entry.guards(&link), "a metadata link is user data");
        let rename = Change::upsert_fields::<Entry>(
            ChangeId::new(),
            hlc(),
            record,
            vec![("name", Value::Text("x".into()))],
        )
        .expect("a change");
        assert!(entry.guards(&rename));
        assert!(entry.guards(&Change::delete::<Entry>(ChangeId::new(), hlc(), record)));
        let revoke = Change::delete::<Device>(ChangeId::new(), hlc(), record);
        assert!(!Owner::Itself.guards(&revoke), "any device may revoke");
    }
}
