//! The projections crate's error type.

/// Errors from the SQLite projections.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProjectionError {
    /// SQLite failed (I/O, full disk, locked file, …).
    #[error("projection database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A stored row does not match the schema (the file was edited or is damaged).
    #[error("projection row is malformed: {0}")]
    MalformedRow(String),
    /// The projection was written by a newer schema.
    #[error("projection schema {found} is newer than this build ({supported})")]
    UnsupportedSchema {
        /// The version found.
        found: i64,
        /// The newest this build knows.
        supported: i64,
    },
    /// A file beside the projection (the fast-load marker) could not be written or removed.
    #[error("projection file {path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// SQLite would not return the file to WAL mode after a fast load.
    #[error("projection journal mode stayed {0} after a fast load")]
    JournalMode(String),
    /// A thread could not be started (the background checkpointer).
    #[error("projection thread: {0}")]
    Thread(String),
    /// A projection snapshot received from another device is not usable.
    #[error("projection snapshot: {0}")]
    BadSnapshot(String),
    /// A projection of older models cannot be brought to the app's models in place (see
    /// [`crate::Projections::upgrade_models`]): a field was removed, renamed or moved.
    #[error("the projection cannot be brought to the app's models: {0}")]
    ModelsNotUpgradable(String),
    /// An attestation could not be signed (the device key is unusable).
    #[error("signing: {0}")]
    Signing(String),
    /// The schema's dependency graph is invalid.
    #[error(transparent)]
    Schema(#[from] keel_schema::SchemaError),
}
