//! Keel's domain schema: its own synced models, the registry a host's join, the `Syncable` trait and its derive, the
//! dependency graph, `Change`/`Op`, hybrid logical clocks, ids, and the canonical encoding.
//!
//! This crate does no I/O. Every other Keel crate depends on it.

extern crate self as keel_schema;

pub mod attestation;
mod change;
mod change_decode;
mod change_encode;
mod error;
mod graph;
mod hlc;
mod ids;
mod models;
mod ownership;
mod registry;
mod syncable;
#[cfg(feature = "typescript")]
mod typescript;
mod value;

pub use change::{Change, Op, CHANGE_FORMAT_VERSION, FIELDS_PER_CHANGE_MAX};
pub use error::SchemaError;
pub use graph::{plan, SyncPlan};
pub use hlc::{Hlc, HlcClock};
pub use ids::{ChangeId, DeviceId, Epoch, LibraryId, Lsn};
pub use keel_schema_derive::Syncable;
pub use models::{
    conflict_policy_uuid, content_metadata_uuid, content_uuid, entry_metadata_uuid,
    registered_model_uuid, tag_uuid, user_metadata_tag_uuid, Attestation, AttestationUpdate,
    ConflictPolicy, ConflictPolicyUpdate, ContentIdentity, ContentIdentityUpdate, Device,
    DeviceUpdate, Endorsement, EndorsementUpdate, Entry, EntryKind, EntryUpdate, Horizon,
    HorizonUpdate, Location, LocationUpdate, RegisteredModel, RegisteredModelUpdate, Tag,
    TagUpdate, UserMetadata, UserMetadataTag, UserMetadataTagUpdate, UserMetadataUpdate,
};
pub use ownership::Owner;
pub use registry::{code_of, model_by_code, model_code, Registry, HOST_CODE_MIN, MODELS};
pub use syncable::{
    DomainLookup, DomainRule, FieldDef, FieldUpdate, ModelDef, SyncDomain, Syncable, Upcast,
};
pub use uuid;
pub use value::{FieldType, FieldValue, Value};
