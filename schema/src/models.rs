//! The synced models of a library: the seven of the source design, and the attestations that
//! sign file facts.

use uuid::Uuid;

use crate::syncable::SyncDomain;
use crate::Syncable;

/// A device that belongs to the library.
#[derive(Clone, Debug, PartialEq, Eq, Syncable, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "typescript", derive(ts_rs::TS))]
#[syncable(
    model = "device",
    code = 0,
    domain = "index",
    priority = 0,
    permanent_delete
)]
pub struct Device {
    /// Record uuid (UUIDv5 of the device id).
    #[syncable(uuid)]
    pub uuid: Uuid,
    /// The device id in hex.
    pub device_id: String,
    /// A name the user recognises.
    pub name: String,
    /// Operating system.
    pub os: String,
    /// When the device joined, ms since the Unix epoch.
    pub created_ms: i64,
}

/// A folder on one device that the library indexes.
#[derive(Clone, Debug, PartialEq, Eq, Syncable, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "typescript", derive(ts_rs::TS))]
#[syncable(model = "location", code = 1, domain = "index", priority = 10)]
pub struct Location {
    /// Record uuid.
    #[syncable(uuid)]
    pub uuid: Uuid,
    /// The owning device's record uuid.
    #[syncable(references = "device")]
    pub device: Uuid,
    /// Absolute path on the owning device.
    pub path: String,
    /// Display name.
    pub name: String,
    /// When it was added, ms since the Unix epoch.
    pub created_ms: i64,
}

/// What an entry is on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryKind {
    /// A regular file.
    File = 0,
    /// A directory.
    Directory = 1,
    /// A symbolic link (not followed).
    Symlink = 2,
}

impl EntryKind {
    /// The stored code.
    pub fn code(self) -> i64 {
        self as i64
    }

    /// From the stored code; unknown codes read as `File`.
    pub fn from_code(code: i64) -> Self {
        match code {
            1 => EntryKind::Directory,
            2 => EntryKind::Symlink,
            _ => EntryKind::File,
        }
    }
}

/// One file or directory inside a location.
#[derive(Clone, Debug, PartialEq, Eq, Syncable, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "typescript", derive(ts_rs::TS))]
#[syncable(
    model = "entry",
    code = 2,
    version = 1,
    domain = "index",
    priority = 30
)]
pub struct Entry {
    /// Record uuid; `None` until the entry is identified (sync readiness).
    #[syncable(uuid)]
    pub uuid: Option<Uuid>,
    /// The location it is in.
    #[syncable(references = "location")]
    pub location: Uuid,
    /// The parent directory's path relative to the location root (`""` at the root).
    pub relative_path: String,
    /// File or directory name.
    pub name: String,
    /// [`EntryKind`] code.
    pub kind: i64,
    /// Size in bytes (0 for directories).
    pub size: i64,
    /// Creation time, ms since the Unix epoch (0 if unknown).
    pub created_ms: i64,
    /// Modification time, ms since the Unix epoch.
    pub modified_ms: i64,
    /// The content it holds, once identified.
    #[syncable(references = "content_identity")]
    pub content: Option<Uuid>,
    /// Its entry-scoped metadata; breaks the Entry ↔ UserMetadata cycle.
    #[syncable(references = "user_metadata", breaks_cycle)]
    pub metadata: Option<Uuid>,
    /// Its inode number, where the platform gives one: a file moved *and* edited while nobody
    /// watched is matched to its entry by it (with [`Entry::volume`]). Since version 1.
    #[syncable(since = 1)]
    pub inode: Option<i64>,
    /// The file system (device number) its inode is on. Since version 1.
    #[syncable(since = 1)]
    pub volume: Option<i64>,
}

/// A unique content, identified by hash; the same bytes give the same uuid on every device.
#[derive(Clone, Debug, PartialEq, Eq, Syncable, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "typescript", derive(ts_rs::TS))]
#[syncable(
    model = "content_identity",
    code = 3,
    domain = "content",
    priority = 20
)]
pub struct ContentIdentity {
    /// UUIDv5 of (library id, content hash); see [`content_uuid`](crate::content_uuid).
    #[syncable(uuid)]
    pub uuid: Option<Uuid>,
    /// BLAKE3 of the content, hex.
    pub content_hash: String,
    /// MIME type, when known.
    pub mime: Option<String>,
    /// A coarse kind (`text`, `image`, …).
    pub kind: String,
    /// Size of the content in bytes.
    pub size: i64,
    /// Number of entries with this content: derived by each projection, never synced.
    #[syncable(skip)]
    pub entry_count: i64,
    /// Total size of those entries: derived by each projection, never synced.
    #[syncable(skip)]
    pub total_size: i64,
}

/// Notes and flags about one entry or one content (exactly one scope).
#[derive(Clone, Debug, PartialEq, Eq, Syncable, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "typescript", derive(ts_rs::TS))]
#[syncable(model = "user_metadata", code = 4, domain = "scope", priority = 40)]
pub struct UserMetadata {
    /// Record uuid.
    #[syncable(uuid)]
    pub uuid: Uuid,
    /// Entry scope.
    #[syncable(references = "entry")]
    pub entry: Option<Uuid>,
    /// Content scope.
    #[syncable(references = "content_identity")]
    pub content: Option<Uuid>,
    /// Free text notes.
    pub notes: Option<String>,
    /// Favourite flag.
    pub favorite: bool,
    /// Hidden flag.
    pub hidden: bool,
    /// Host-app data, JSON text.
    pub custom_data: Option<String>,
}

impl UserMetadata {
    /// Entry scope syncs in the Index domain, content scope in the Content domain.
    pub fn scope_domain(&self) -> SyncDomain {
        if self.entry.is_some() {
            SyncDomain::Index
        } else {
            SyncDomain::Content
        }
    }
}

/// A tag.
#[derive(Clone, Debug, PartialEq, Eq, Syncable, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "typescript", derive(ts_rs::TS))]
#[syncable(model = "tag", code = 5, domain = "content", priority = 20)]
pub struct Tag {
    /// Record uuid (UUIDv5 of the name, so devices agree on a tag; see [`tag_uuid`](crate::tag_uuid)).
    #[syncable(uuid)]
    pub uuid: Uuid,
    /// Tag name.
    pub name: String,
    /// Display colour.
    pub color: Option<String>,
    /// When it was created, ms since the Unix epoch.
    pub created_ms: i64,
}

/// A tag applied to a UserMetadata, keyed by (user metadata uuid, tag uuid).
#[derive(Clone, Debug, PartialEq, Eq, Syncable, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "typescript", derive(ts_rs::TS))]
#[syncable(
    model = "user_metadata_tag",
    code = 6,
    domain = "parent:user_metadata",
    priority = 50
)]
pub struct UserMetadataTag {
    /// UUIDv5 of the pair; see [`user_metadata_tag_uuid`](crate::user_metadata_tag_uuid).
    #[syncable(uuid)]
    pub uuid: Uuid,
    /// The UserMetadata.
    #[syncable(references = "user_metadata")]
    pub user_metadata: Uuid,
    /// The tag.
    #[syncable(references = "tag")]
    pub tag: Uuid,
    /// When it was applied, ms since the Unix epoch.
    pub created_ms: i64,
}

const CONTENT_NAMESPACE: Uuid = Uuid::from_u128(0x6b65_656c_2d63_6f6e_7465_6e74_0000_0001);
const TAG_NAMESPACE: Uuid = Uuid::from_u128(0x6b65_656c_2d74_6167_0000_0000_0000_0001);
const UMT_NAMESPACE: Uuid = Uuid::from_u128(0x6b65_656c_2d75_6d74_0000_0000_0000_0001);
const REGISTERED_MODEL_NAMESPACE: Uuid = Uuid::from_u128(0x6b65_656c_2d6d_6f64_656c_0000_0000_0001);

/// The deterministic uuid of a content: UUIDv5 of (library id, content hash).
pub fn content_uuid(library: Uuid, content_hash: &str) -> Uuid {
    uuid_v5(
        &CONTENT_NAMESPACE,
        &[library.as_bytes(), content_hash.as_bytes()],
    )
}

/// UUIDv5 of `namespace` and the concatenated `name` parts: the same uuid as
/// `Uuid::new_v5(namespace, parts.concat())`, hashed with a SHA-1 that uses the CPU's SHA
/// instructions where there are some (the indexer makes one per file).
fn uuid_v5(namespace: &Uuid, parts: &[&[u8]]) -> Uuid {
    use sha1::Digest;
    let mut hasher = sha1::Sha1::new();
    hasher.update(namespace.as_bytes());
    for part in parts {
        hasher.update(part);
    }
    let digest = hasher.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_sha1_bytes(bytes).into_uuid()
}

/// The deterministic uuid of a tag in a library: UUIDv5 of (library id, name).
pub fn tag_uuid(library: Uuid, name: &str) -> Uuid {
    uuid_v5(&TAG_NAMESPACE, &[library.as_bytes(), name.as_bytes()])
}

/// The portable key of a UserMetadataTag: UUIDv5 of (user metadata uuid, tag uuid).
pub fn user_metadata_tag_uuid(user_metadata: Uuid, tag: Uuid) -> Uuid {
    uuid_v5(&UMT_NAMESPACE, &[user_metadata.as_bytes(), tag.as_bytes()])
}

/// The deterministic uuid of the content-scoped UserMetadata of a content (so devices share one).
pub fn content_metadata_uuid(content: Uuid) -> Uuid {
    uuid_v5(&CONTENT_NAMESPACE, &[content.as_bytes()])
}

/// The deterministic uuid of the entry-scoped UserMetadata of an entry.
pub fn entry_metadata_uuid(entry: Uuid) -> Uuid {
    uuid_v5(&UMT_NAMESPACE, &[entry.as_bytes()])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::syncable::{DomainLookup, DomainRule};
    use proptest::prelude::*;

    proptest! {
        /// The SHA-1 used for the deterministic uuids gives the uuid crate's UUIDv5.
        #[test]
        fn deterministic_uuids_are_the_uuid_crates_v5(
            namespace in any::<u128>(),
            parts in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..90), 0..4),
        ) {
            let namespace = Uuid::from_u128(namespace);
            let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
            prop_assert_eq!(uuid_v5(&namespace, &refs), Uuid::new_v5(&namespace, &parts.concat()));
        }
    }

    struct Lookup;
    impl DomainLookup for Lookup {
        fn domain_of(&self, model: &str, _uuid: Uuid) -> Option<SyncDomain> {
            (model == "user_metadata").then_some(SyncDomain::Index)
        }
    }

    #[test]
    fn derive_records_dependencies_skips_and_domains() {
        assert_eq!(ContentIdentity::DEF.skipped, &["entry_count", "total_size"]);
        assert!(ContentIdentity::DEF.field_index("entry_count").is_none());
        let deps: Vec<&str> = Entry::DEF.dependencies().collect();
        assert_eq!(deps, vec!["location", "content_identity"]);
        let cycle: Vec<&str> = Entry::DEF
            .nullable_references()
            .map(|(_, f)| f.name)
            .collect();
        assert_eq!(cycle, vec!["metadata"]);
        assert_eq!(UserMetadata::DEF.domain, DomainRule::ByScope);
        assert_eq!(
            UserMetadataTag::DEF.domain,
            DomainRule::ByParent("user_metadata")
        );
        let m = UserMetadata {
            uuid: Uuid::nil(),
            entry: None,
            content: Some(Uuid::nil()),
            notes: None,
            favorite: false,
            hidden: false,
            custom_data: None,
        };
        assert_eq!(m.sync_domain(&Lookup), SyncDomain::Content);
        let link = UserMetadataTag {
            uuid: Uuid::nil(),
            user_metadata: Uuid::nil(),
            tag: Uuid::nil(),
            created_ms: 0,
        };
        assert_eq!(link.sync_domain(&Lookup), SyncDomain::Index);
        let values = m.field_values();
        assert_eq!(
            UserMetadata::from_field_values(Uuid::nil(), &values),
            Some(m)
        );
    }
}

/// A device's signature over the changes of one commit that write file facts (see
/// [`crate::attestation`]): every device checks it before it applies them, so no device can
/// make another's file facts, not even the leader that relays them.
#[derive(Clone, Debug, PartialEq, Eq, Syncable, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "typescript", derive(ts_rs::TS))]
#[syncable(model = "attestation", code = 7, domain = "index", priority = 0)]
pub struct Attestation {
    /// Record uuid (random).
    #[syncable(uuid)]
    pub uuid: Uuid,
    /// The signing device's certificate (DER); its SHA-256 is the device id.
    pub cert: Vec<u8>,
    /// The digests of the changes it vouches for ([`crate::attestation::DIGEST_LEN`] bytes each).
    pub members: Vec<u8>,
    /// The device key's signature over [`crate::attestation::signed_message`].
    pub signature: Vec<u8>,
}

/// A device's word that another device belongs to the library: written by the inviting device
/// once its user confirmed the joiner. A device trusts (pins) another only through a chain of
/// endorsements from the library's founder, so a Device record alone, which its own device
/// writes and signs, lets nobody in.
#[derive(Clone, Debug, PartialEq, Eq, Syncable, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "typescript", derive(ts_rs::TS))]
#[syncable(model = "endorsement", code = 8, domain = "index", priority = 0)]
pub struct Endorsement {
    /// Record uuid (random).
    #[syncable(uuid)]
    pub uuid: Uuid,
    /// The endorsed device's id, hex.
    pub device_id: String,
    /// The endorsing device's id, hex (the change's origin: see `Owner::NamedIn`).
    pub by: String,
    /// When, ms since the Unix epoch.
    pub created_ms: i64,
}

/// A host's model as the library records it: which model a code names and the newest version
/// of its changes written. Every device that opens the library with the model registered
/// writes it (the same record, so it converges), and checks that no other model holds its code;
/// a device that lacks the model tells its name from here.
#[derive(Clone, Debug, PartialEq, Eq, Syncable, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "typescript", derive(ts_rs::TS))]
#[syncable(model = "registered_model", code = 9, domain = "content", priority = 0)]
pub struct RegisteredModel {
    /// Record uuid ([`registered_model_uuid`] of the code).
    #[syncable(uuid)]
    pub uuid: Uuid,
    /// The model's code.
    pub code: i64,
    /// Its name.
    pub name: String,
    /// The newest version of its changes written in the library.
    pub version: i64,
}

/// The uuid of the [`RegisteredModel`] record of code `code` (the same in every library and on
/// every device, so that two devices recording one model write one record).
pub fn registered_model_uuid(code: u8) -> Uuid {
    uuid_v5(&REGISTERED_MODEL_NAMESPACE, &[&[code]])
}

/// How the conflicts on one model's records are settled (or, with an empty `model`, on every
/// model without one of its own): a record synced like any other, so every device settles them
/// alike (see decision 0051). Its uuid is [`conflict_policy_uuid`] of the model, so two devices
/// setting one model's policy write one record.
#[derive(Clone, Debug, PartialEq, Eq, Syncable, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "typescript", derive(ts_rs::TS))]
#[syncable(model = "conflict_policy", code = 10, domain = "content", priority = 0)]
pub struct ConflictPolicy {
    /// Record uuid ([`conflict_policy_uuid`] of the model).
    #[syncable(uuid)]
    pub uuid: Uuid,
    /// The model's name; empty for the library's default.
    pub model: String,
    /// `latest-wins`, `prefer-device` or `manual`.
    pub strategy: String,
    /// For `prefer-device`: the device whose value wins, hex.
    pub device: Option<String>,
}

/// A leader's word that no change older than a clock can reach the log any more: every device
/// of the library reported that whatever it will still push is at or after it. Applied at its
/// log position (never as a local change), it has every device collect the tombstones older
/// than that clock: the same rows on every device, since it is applied after the same changes
/// (see decision 0082). Only a leader makes one, and a leader refuses one pushed to it.
#[derive(Clone, Debug, PartialEq, Eq, Syncable, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "typescript", derive(ts_rs::TS))]
#[syncable(model = "horizon", code = 11, domain = "index", priority = 0)]
pub struct Horizon {
    /// Record uuid (random).
    #[syncable(uuid)]
    pub uuid: Uuid,
    /// The clock's milliseconds: tombstones before `(before_ms, before_counter)` are collected.
    pub before_ms: i64,
    /// The clock's counter within its millisecond.
    pub before_counter: i64,
}

impl Horizon {
    /// The bound as a clock reading `(milliseconds, counter)`; `None` for values out of range.
    pub fn bound(&self) -> Option<(u64, u32)> {
        Some((
            u64::try_from(self.before_ms).ok()?,
            u32::try_from(self.before_counter).ok()?,
        ))
    }
}

/// Namespace of [`ConflictPolicy`] uuids.
const CONFLICT_POLICY_NAMESPACE: Uuid = Uuid::from_u128(0x6b65_656c_636f_6e66_6c69_6374_706f_6c69);

/// The uuid of the [`ConflictPolicy`] of model `model` (empty: the library's default).
pub fn conflict_policy_uuid(model: &str) -> Uuid {
    uuid_v5(&CONFLICT_POLICY_NAMESPACE, &[model.as_bytes()])
}
