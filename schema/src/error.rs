//! The schema crate's error type.

/// Errors from decoding or validating schema values.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SchemaError {
    /// The record starts with a format version this build does not know.
    #[error("unsupported format version {found} (this build reads up to {supported})")]
    UnsupportedVersion {
        /// The version byte found.
        found: u8,
        /// The newest version this build reads.
        supported: u8,
    },
    /// The record is empty.
    #[error("empty record")]
    Empty,
    /// The bytes are not a valid encoding.
    #[error("malformed encoding: {0}")]
    Malformed(String),
    /// A model code or name is unknown.
    #[error("unknown model {0}")]
    UnknownModel(String),
    /// A field index is out of range for its model.
    #[error("model {model} has no field #{index}")]
    UnknownField {
        /// The model.
        model: &'static str,
        /// The field index found.
        index: u8,
    },
    /// A value has the wrong type for its field.
    #[error("field {model}.{field}: expected {expected}")]
    WrongType {
        /// The model.
        model: &'static str,
        /// The field name.
        field: &'static str,
        /// What was expected.
        expected: &'static str,
    },
    /// A change of a model version newer than this build's: kept, not applied.
    #[error("{model} changes of version {found}: this build knows up to version {known}")]
    NewerVersion {
        /// The model.
        model: &'static str,
        /// The version of the change.
        found: u8,
        /// The newest version this build knows.
        known: u8,
    },
    /// A host's upcaster could not bring a change to the next version.
    #[error("{model} changes of version {from} could not be upcast: {reason}")]
    Upcast {
        /// The model.
        model: &'static str,
        /// The version it was in.
        from: u8,
        /// The upcaster's reason.
        reason: String,
    },
    /// Registering a model that clashes with one registered before.
    #[error("cannot register model {model}: {reason}")]
    Registry {
        /// The model.
        model: &'static str,
        /// What clashes.
        reason: String,
    },
    /// The dependency graph has a cycle that no nullable reference breaks.
    #[error("dependency cycle among models: {0}")]
    Cycle(String),
}
