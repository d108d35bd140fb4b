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
    /// The dependency graph has a cycle that no nullable reference breaks.
    #[error("dependency cycle among models: {0}")]
    Cycle(String),
}
