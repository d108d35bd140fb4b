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
    /// A thread could not be started (the background checkpointer).
    #[error("projection thread: {0}")]
    Thread(String),
    /// The schema's dependency graph is invalid.
    #[error(transparent)]
    Schema(#[from] keel_schema::SchemaError),
}
