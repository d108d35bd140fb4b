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
    /// An empty password protects nothing: refused.
    #[error("the password is empty")]
    EmptyPassword,
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
    /// The library keys given (a host's keychain) are not this library's.
    #[error("these keys are not this library's (or it has no key check yet: open it once with its password)")]
    WrongKey,
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
    /// Applying committed changes to the projections failed. They are durable in the journal;
    /// nothing more is applied until the library is next opened, which applies them again from
    /// the last position applied before the failure.
    #[error("applying to the projections failed: {0}; reopen the library to heal them")]
    ApplyFailed(String),
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
    /// Stored derived counts of contents (`entry_count`, `total_size`) differ from counting
    /// their entries; `keel rebuild` recomputes them.
    #[error("{contents} content identities have entry counts that differ from their entries; run `keel rebuild`")]
    Miscounted {
        /// How many contents are miscounted.
        contents: usize,
    },
    /// The journal file of an existing library is missing or empty.
    #[error("the journal {0} is missing or empty; restore it from a backup (the projections alone cannot be trusted)")]
    JournalMissing(PathBuf),
    /// The library's folder holds its settings but no journal and no projections: its creation
    /// or its join stopped (a crash, a power loss) before anything was stored.
    #[error("the library in {0} holds nothing yet: its creation or join did not finish; remove the folder and create or join the library again")]
    Unfinished(PathBuf),
    /// The projections have applied more than the journal holds (the journal was truncated or
    /// replaced by an older copy).
    #[error("the projections are ahead of the journal (applied lsn {applied}, journal ends at {journal_last}); restore the journal, or run `keel rebuild` to accept it as it is")]
    ProjectionAhead {
        /// The applied log position.
        applied: u64,
        /// The journal's last log position.
        journal_last: u64,
    },
    /// The node (replication runtime) stopped or is not running.
    #[error("the node is not running")]
    NodeStopped,
    /// A node is linked to this library already (one at a time).
    #[error("a node is already linked to this library")]
    Linked,
    /// The library records another model under the code of a model the app registered.
    #[error("the library records model {recorded} under code {code}, which this app gives to {registered}; a model's code never changes")]
    ModelClash {
        /// The code.
        code: u8,
        /// The model this app registered under it.
        registered: String,
        /// The model the library records under it.
        recorded: String,
    },
    /// A location's folder is missing (an unplugged drive, a folder moved away): its entries
    /// are kept as they are until it is back.
    #[error("the folder of location {0} is missing; its entries are kept until it is back")]
    LocationMissing(PathBuf),
    /// No tag has this name.
    #[error("no tag is named {0}")]
    NoSuchTag(String),
    /// A tag has this name already (or the name is empty).
    #[error("a tag is named {0:?} already (or the name is empty)")]
    TagExists(String),
    /// No location has this uuid or root.
    #[error("no location {0}")]
    NoSuchLocation(uuid::Uuid),
    /// The location is another device's: only the device that has the files removes them.
    #[error("{0} is another device's location; remove it on that device")]
    NotYourLocation(PathBuf),
    /// A path lies in same-named locations of several other devices.
    #[error(
        "{path} is in a location of several devices ({devices}); say which with --device NAME"
    )]
    AmbiguousPath {
        /// The path.
        path: PathBuf,
        /// The devices' names.
        devices: String,
    },
    /// No device of the library has this name (or id prefix).
    #[error("no device of this library is named {0}")]
    NoSuchDevice(String),
    /// Several devices of the library match this name.
    #[error("several devices of this library are named {0}; give the start of its id instead")]
    AmbiguousDevice(String),
    /// A job stopped because it was cancelled (what it committed stays).
    #[error("the job was cancelled")]
    Cancelled,
    /// No job has this id.
    #[error("no job {0}")]
    NoSuchJob(uuid::Uuid),
    /// The library has no model of this name.
    #[error("no model named {0}")]
    NoSuchModel(String),
    /// No conflict has this id.
    #[error("no conflict {0}")]
    NoSuchConflict(uuid::Uuid),
    /// A library cannot be merged into itself (the same library id).
    #[error("library {0} is the library it would be merged into")]
    MergeIntoItself(String),
    /// The job is not running (nor paused, nor interrupted): nothing to pause, resume or cancel.
    #[error("job {0} is not running")]
    JobNotRunning(uuid::Uuid),
    /// The platform's file watcher could not start.
    #[error("the file watcher: {0}")]
    Watch(String),
    /// The journal was compacted but its snapshot is gone: the projections cannot be rebuilt.
    #[error("{}: the snapshot of the log's first {base} positions is missing (copy it back from a backup, or join the library again from another device)", path.display())]
    SnapshotMissing {
        /// Where it should be.
        path: PathBuf,
        /// The journal's compaction base.
        base: u64,
    },
    /// The change feed was asked for changes the log no longer holds (it was compacted).
    #[error("the change feed before log position {base} was compacted: read the state with queries, then go on from position {base}")]
    FeedCompacted {
        /// The log's compaction position: a feed may go on from it.
        base: u64,
    },
    /// The snapshot of the compacted log does not unpack.
    #[error("the snapshot is damaged: {0} (copy it back from a backup, or join the library again from another device)")]
    SnapshotDamaged(String),
    /// A backfill from the leader's snapshot failed (the library is unchanged; the next one
    /// goes on from its last batch).
    #[error("backfill: {0}")]
    Backfill(String),
    /// A request to a running node failed or timed out.
    #[error("{0}")]
    Node(String),
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
