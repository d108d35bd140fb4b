//! The registry of synced models: each model's stable code (its index here) and dependency order.

use crate::models::{
    Attestation, ContentIdentity, Device, Endorsement, Entry, Location, Tag, UserMetadata,
    UserMetadataTag,
};
use crate::syncable::ModelDef;
use crate::Syncable;

/// Every synced model; a model's code in a change is its index here (append-only).
pub static MODELS: [&ModelDef; 9] = [
    Device::DEF,
    Location::DEF,
    Entry::DEF,
    ContentIdentity::DEF,
    UserMetadata::DEF,
    Tag::DEF,
    UserMetadataTag::DEF,
    Attestation::DEF,
    Endorsement::DEF,
];

/// The model with this code.
pub fn model_by_code(code: u8) -> Option<&'static ModelDef> {
    MODELS.get(usize::from(code)).copied()
}

/// The code of the model with this name.
pub fn model_code(name: &str) -> Option<u8> {
    MODELS
        .iter()
        .position(|m| m.name == name)
        .and_then(|i| u8::try_from(i).ok())
}

/// The code of a `Syncable` type.
pub fn code_of<M: Syncable>() -> u8 {
    // The registry holds every derived model; a model outside it is a programming error.
    model_code(M::DEF.name).unwrap_or(u8::MAX)
}
