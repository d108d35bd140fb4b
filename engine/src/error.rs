//! The engine's error type.

use std::path::PathBuf;

use keel_journal::JournalError;
use keel_projections::ProjectionError;
use keel_schema::SchemaError;

/// Errors from the engine. Every variant is a normal operating condition with a defined recovery.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// No library of that name in this home.
    #[error("no library named '{0}' (create it with `keel init {0}`)")]
    NoSuchLibrary(String),
    /// A library of that name already exists.
    #[error("a library named '{0}' already exists")]
    LibraryExists(String),
    /// The library name is not usable as a folder name.
    #[error("invalid library name '{0}': use letters, digits, '-', '_' or '.'")]
    InvalidName(String),
    /// `library.toml` is missing.
    #[error("library.toml is missing in {0} (the library folder is incomplete)")]
    MissingConfig(PathBuf),
    /// `library.toml` does not parse or holds invalid values.
    #[error("library.toml in {path} is invalid: {reason}")]
    BadConfig {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The device identity file is invalid.
    #[error("device identity in {path} is invalid: {reason}")]
    BadDeviceIdentity {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A path is not inside any indexed location.
    #[error("{0} is not inside an indexed location of this library")]
    NotInLocation(PathBuf),
    /// A path is inside a location but has no entry (not indexed yet?).
    #[error("{0} is not indexed (run `keel index` on its location)")]
    NotIndexed(PathBuf),
    /// A content-scoped operation on an entry without content (a directory).
    #[error("{0} has no content (a directory?); use --entry to attach to the entry itself")]
    NoContent(PathBuf),
    /// The library is closed or its background threads stopped.
    #[error("the library is closed")]
    Closed,
    /// A projection was found different from a fresh replay of the journal.
    #[error("projection digest {found} differs from the journal's {expected}")]
    DigestMismatch {
        /// The projection's digest.
        found: String,
        /// The digest of a fresh replay.
        expected: String,
    },
    /// Journal failure.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// Projection failure.
    #[error(transparent)]
    Projection(#[from] ProjectionError),
    /// Schema failure.
    #[error(transparent)]
    Schema(#[from] SchemaError),
    /// File-system failure, with the path involved.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// Attaches a path to an I/O error.
pub(crate) fn io_at(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> EngineError {
    let path = path.into();
    move |source| EngineError::Io { path, source }
}
