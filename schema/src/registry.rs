//! The registry of synced models: Keel's own, and a host app's registered when it opens a
//! library (decision 0045).
//!
//! A model's code is declared with it (`#[syncable(code = N)]`), so every device, every build
//! and every replay agrees on it without asking anyone; the library records the codes it has
//! seen and refuses a build that moved one (see `keel_engine`). Keel's models hold the codes
//! below [`HOST_CODE_MIN`]; 255 is never a model.

use std::sync::{Arc, OnceLock};

use crate::error::SchemaError;
use crate::models::{
    Attestation, ConflictPolicy, ContentIdentity, Device, Endorsement, Entry, Horizon, Location,
    RegisteredModel, Tag, UserMetadata, UserMetadataTag,
};
use crate::syncable::ModelDef;
use crate::Syncable;

/// Keel's own models, in code order; a model's code is its index here (append-only).
pub static MODELS: [&ModelDef; 12] = [
    Device::DEF,
    Location::DEF,
    Entry::DEF,
    ContentIdentity::DEF,
    UserMetadata::DEF,
    Tag::DEF,
    UserMetadataTag::DEF,
    Attestation::DEF,
    Endorsement::DEF,
    RegisteredModel::DEF,
    ConflictPolicy::DEF,
    Horizon::DEF,
];

/// The first code a host's model may take; the codes below are Keel's.
pub const HOST_CODE_MIN: u8 = 32;

/// Keel's model with this code (a host's models are in their library's [`Registry`]).
pub fn model_by_code(code: u8) -> Option<&'static ModelDef> {
    MODELS.get(usize::from(code)).copied()
}

/// The code of Keel's model with this name.
pub fn model_code(name: &str) -> Option<u8> {
    MODELS.iter().find(|m| m.name == name).map(|m| m.code)
}

/// The code of a `Syncable` type (declared by its derive).
pub fn code_of<M: Syncable>() -> u8 {
    M::DEF.code
}

/// The models one library syncs: Keel's and the host's, looked up by code in constant time.
#[derive(Clone)]
pub struct Registry {
    by_code: Arc<[Option<&'static ModelDef>; 256]>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.iter().map(|d| (d.code, d.name, d.version)))
            .finish()
    }
}

impl Default for Registry {
    fn default() -> Self {
        Self::builtin().clone()
    }
}

impl Registry {
    /// Keel's models alone (shared; cloning is cheap).
    pub fn builtin() -> &'static Registry {
        static BUILTIN: OnceLock<Registry> = OnceLock::new();
        BUILTIN.get_or_init(|| {
            let mut by_code = [None; 256];
            for def in MODELS {
                by_code[usize::from(def.code)] = Some(def);
            }
            Registry {
                by_code: Arc::new(by_code),
            }
        })
    }

    /// This registry with host model `M` added. Refused: a code below [`HOST_CODE_MIN`], a code
    /// or name another model holds, a reference to a model not registered (register it first;
    /// a cycle-breaking reference may name a model registered after: see [`Registry::check`])
    /// or a dependency cycle no nullable reference breaks.
    pub fn with<M: Syncable>(self) -> Result<Self, SchemaError> {
        self.with_def(M::DEF)
    }

    /// [`Registry::with`] by definition.
    pub fn with_def(self, def: &'static ModelDef) -> Result<Self, SchemaError> {
        let refuse = |reason: String| SchemaError::Registry {
            model: def.name,
            reason,
        };
        if def.code < HOST_CODE_MIN || def.code == u8::MAX {
            return Err(refuse(format!(
                "code {} is not a host's (take {HOST_CODE_MIN} to 254)",
                def.code
            )));
        }
        if let Some(other) = self.get(def.code) {
            return Err(refuse(format!("code {} is {}'s", def.code, other.name)));
        }
        if self.code(def.name).is_some() {
            return Err(refuse("a model of that name is registered".into()));
        }
        if !is_identifier(def.name) || def.fields.iter().any(|f| !is_identifier(f.name)) {
            return Err(refuse(
                "names are lowercase ASCII letters, digits and '_' (they are SQL names)".into(),
            ));
        }
        if let Some(target) = def
            .fields
            .iter()
            .filter(|f| !f.breaks_cycle)
            .filter_map(|f| f.references)
            .find(|t| *t != def.name && self.code(t).is_none())
        {
            return Err(refuse(format!("it references {target}, not registered")));
        }
        let mut by_code = *self.by_code;
        by_code[usize::from(def.code)] = Some(def);
        let registry = Self {
            by_code: Arc::new(by_code),
        };
        crate::plan(&registry.defs())?;
        Ok(registry)
    }

    /// Checks that every reference names a registered model (a cycle-breaking reference may
    /// name one registered later, so it is checked once all are: when a library opens).
    pub fn check(&self) -> Result<(), SchemaError> {
        for def in self.host_models() {
            if let Some(target) = def
                .fields
                .iter()
                .filter_map(|f| f.references)
                .find(|t| self.code(t).is_none())
            {
                return Err(SchemaError::Registry {
                    model: def.name,
                    reason: format!("it references {target}, not registered"),
                });
            }
        }
        Ok(())
    }

    /// The model with this code.
    #[inline]
    pub fn get(&self, code: u8) -> Option<&'static ModelDef> {
        self.by_code[usize::from(code)]
    }

    /// The code of the model with this name (Keel's looked up first: they are most asked).
    pub fn code(&self, name: &str) -> Option<u8> {
        model_code(name).or_else(|| self.host_models().find(|d| d.name == name).map(|d| d.code))
    }

    /// Whether it holds model `M` (the same definition under its code).
    pub fn holds<M: Syncable>(&self) -> bool {
        self.get(M::DEF.code)
            .is_some_and(|def| std::ptr::eq(def, M::DEF) || def.name == M::DEF.name)
    }

    /// Every model, in code order.
    pub fn iter(&self) -> impl Iterator<Item = &'static ModelDef> + '_ {
        self.by_code.iter().flatten().copied()
    }

    /// Every model, in code order, as a list (for [`crate::plan`]).
    pub fn defs(&self) -> Vec<&'static ModelDef> {
        self.iter().collect()
    }

    /// One past the highest code in use (the length of a table indexed by code).
    pub fn code_end(&self) -> usize {
        self.iter().last().map_or(0, |d| usize::from(d.code) + 1)
    }

    /// The host's models (codes from [`HOST_CODE_MIN`]).
    pub fn host_models(&self) -> impl Iterator<Item = &'static ModelDef> + '_ {
        self.iter().filter(|d| d.code >= HOST_CODE_MIN)
    }

    /// A digest of everything a projection's tables depend on: each model's code, name,
    /// version and fields (names, types, references). A projection built under another
    /// fingerprint is replayed (a field added or renamed, a model added).
    pub fn fingerprint(&self) -> String {
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"keel registry v1");
        for def in self.iter() {
            let line = format!("{}:{}:{};", def.code, def.name, def.version);
            hasher.update(line.as_bytes());
            for f in def.fields {
                let field = format!(
                    "{}:{}:{}:{:?};",
                    f.name,
                    f.ty.name(),
                    f.nullable,
                    f.references
                );
                hasher.update(field.as_bytes());
            }
        }
        hasher.finalize().to_hex().to_string()
    }
}

/// A name safe to put in SQL unquoted: lowercase ASCII letters, digits, '_', not starting with a
/// digit or '_' (Keel's own tables start with '_').
fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Change, ChangeId, Op, Value};
    use uuid::Uuid;

    /// A host's photo model, first version.
    #[derive(crate::Syncable)]
    #[syncable(model = "photo", code = 40, domain = "content")]
    struct PhotoV0 {
        #[syncable(uuid)]
        uuid: Uuid,
        title: String,
        #[syncable(references = "content_identity")]
        content: Uuid,
    }

    /// Its second version: a rating added with a default, the title renamed to a caption.
    #[derive(crate::Syncable)]
    #[syncable(model = "photo", code = 40, version = 1, domain = "content")]
    struct PhotoV1 {
        #[syncable(uuid)]
        uuid: Uuid,
        caption: String,
        #[syncable(references = "content_identity")]
        content: Uuid,
        #[syncable(since = 1, default = "three")]
        rating: i64,
    }

    fn three() -> i64 {
        3
    }

    /// Its third: the rating becomes text, through an upcaster.
    #[derive(crate::Syncable)]
    #[syncable(
        model = "photo",
        code = 40,
        version = 2,
        domain = "content",
        upcast = "stars"
    )]
    struct PhotoV2 {
        #[syncable(uuid)]
        uuid: Uuid,
        caption: String,
        #[syncable(references = "content_identity")]
        content: Uuid,
        #[syncable(since = 1, default = "three_stars")]
        rating: String,
    }

    fn three_stars() -> String {
        "***".into()
    }

    #[allow(clippy::ptr_arg)] // an `Upcast` may add or drop fields; this one does not
    fn stars(from: u8, fields: &mut Vec<(u8, Value)>) -> Result<(), String> {
        if from != 1 {
            return Ok(());
        }
        for (index, value) in fields.iter_mut() {
            if *index == 2 {
                let Value::Int(n) = value else {
                    return Err(format!("rating {value:?} is not a number"));
                };
                *value = Value::Text("*".repeat(usize::try_from(*n).map_err(|e| e.to_string())?));
            }
        }
        Ok(())
    }

    /// A model that references one nobody registered.
    #[derive(crate::Syncable)]
    #[syncable(model = "album_entry", code = 41, domain = "content")]
    struct AlbumEntry {
        #[syncable(uuid)]
        uuid: Uuid,
        #[syncable(references = "album")]
        album: Uuid,
    }

    /// A host model that claims one of Keel's codes.
    #[derive(crate::Syncable)]
    #[syncable(model = "clash", code = 5, domain = "content")]
    struct Clash {
        #[syncable(uuid)]
        uuid: Uuid,
    }

    use crate::hlc::tests::hlc;

    #[test]
    fn host_models_join_keels_and_clashes_are_refused() {
        let registry = Registry::builtin()
            .clone()
            .with::<PhotoV0>()
            .expect("registers");
        assert_eq!(registry.get(40).map(|d| d.name), Some("photo"));
        assert_eq!(registry.code("tag"), Some(5));
        assert!(registry.holds::<PhotoV0>());
        assert_eq!(registry.code_end(), 41);
        assert_eq!(registry.host_models().count(), 1);
        let plan = crate::plan(&registry.defs()).expect("plans");
        assert!(plan.rank("photo") > plan.rank("content_identity"));
        let again = registry.clone().with::<PhotoV1>();
        assert!(
            matches!(again, Err(SchemaError::Registry { .. })),
            "{again:?}"
        );
        let keels = Registry::builtin().clone().with::<Clash>();
        assert!(
            matches!(keels, Err(SchemaError::Registry { .. })),
            "{keels:?}"
        );
        let dangling = Registry::builtin().clone().with::<AlbumEntry>();
        assert!(
            matches!(dangling, Err(SchemaError::Registry { .. })),
            "{dangling:?}"
        );
        assert!(!Registry::builtin().holds::<PhotoV0>());
        let v1 = Registry::builtin()
            .clone()
            .with::<PhotoV1>()
            .expect("registers");
        assert_ne!(registry.fingerprint(), v1.fingerprint());
    }

    #[test]
    fn an_old_whole_record_takes_new_defaults_and_a_partial_one_stays_partial() {
        let (uuid, content) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let old = PhotoV0 {
            uuid,
            title: "beach".into(),
            content,
        };
        let Some(Change {
            op: Op::Upsert(mut fields),
            version,
            ..
        }) = Change::upsert(ChangeId::new(), hlc(), &old)
        else {
            panic!("an upsert");
        };
        assert_eq!(version, 0);
        PhotoV2::DEF.upcast(version, &mut fields).expect("upcasts");
        let new = PhotoV2 {
            uuid,
            caption: "beach".into(),
            content,
            rating: "***".into(),
        };
        assert_eq!(fields, crate::syncable::indexed(new.field_values()));
        let mut partial = vec![(0, Value::Text("sea".into()))];
        PhotoV2::DEF.upcast(0, &mut partial).expect("upcasts");
        assert_eq!(partial, vec![(0, Value::Text("sea".into()))]);
        let mut bad = vec![(2, Value::Bool(true))];
        assert!(matches!(
            PhotoV2::DEF.upcast(1, &mut bad),
            Err(SchemaError::Upcast { from: 1, .. })
        ));
        assert!(matches!(
            PhotoV1::DEF.upcast(2, &mut partial),
            Err(SchemaError::NewerVersion {
                found: 2,
                known: 1,
                ..
            })
        ));
    }

    #[test]
    fn a_versioned_change_round_trips_and_a_first_version_keeps_its_bytes() {
        let photo = PhotoV1 {
            uuid: Uuid::from_u128(1),
            caption: "x".into(),
            content: Uuid::from_u128(2),
            rating: 4,
        };
        let change = Change::upsert(ChangeId::new(), hlc(), &photo).expect("an upsert");
        assert_eq!(change.version, 1);
        assert_eq!(Change::decode(&change.encode()).expect("decodes"), change);
        let first = Change {
            version: 0,
            ..change.clone()
        };
        assert_eq!(first.encode().len() + 1, change.encode().len());
    }
}
