//! The journal's error type.

use keel_schema::{Lsn, SchemaError};

/// Errors from the journal: storage, sealing and integrity.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JournalError {
    /// The password does not unwrap the library key. Nothing was written.
    #[error("wrong password for this library")]
    WrongPassword,
    /// The key-derivation parameters stored with the wrapped key are out of the accepted range.
    #[error("key-derivation parameters out of range: {0}")]
    KdfParamsOutOfRange(String),
    /// The wrapped key or its parameters are malformed.
    #[error("malformed key material: {0}")]
    BadKeyMaterial(String),
    /// Library keys from a peer that contradict the ones held (same id, other bytes; or a
    /// generation too far ahead): none of them is taken.
    #[error("library keys refused: {0}")]
    KeyConflict(String),
    /// Another process holds the journal open.
    #[error("the journal is open in another process")]
    AlreadyOpen,
    /// The journal file is damaged beyond what redb repairs.
    #[error("journal file is corrupt: {0}")]
    Corrupt(String),
    /// The journal belongs to another library.
    #[error("journal belongs to library {found}, expected {expected}")]
    WrongLibrary {
        /// The library id recorded in the journal.
        found: String,
        /// The library id asked for.
        expected: String,
    },
    /// A log record failed its checksum, failed to open, or did not decode.
    #[error("bad record at {place}: {reason}")]
    BadRecord {
        /// Which table and position.
        place: RecordPlace,
        /// Why.
        reason: String,
    },
    /// A change from another device carries a clock further ahead of this device's than
    /// [`crate::CLOCK_AHEAD_MAX_MS`]: accepted, it would move every clock past it and make every
    /// later edit lose its last-writer-wins comparisons. Refused; the device that made it must
    /// fix its clock.
    #[error("a change at {place} is {ahead_ms} ms ahead of this device's clock")]
    ClockAhead {
        /// Which record.
        place: RecordPlace,
        /// How far ahead of this device's clock it is.
        ahead_ms: u64,
    },
    /// A record sealed under a library key this device does not hold (yet: a rotation's key
    /// travels apart from the records sealed under it, and may arrive after them).
    #[error("the record at {place} is sealed under key {key_id}, which this device does not hold")]
    UnknownKey {
        /// Which record.
        place: RecordPlace,
        /// The key id it names.
        key_id: u32,
    },
    /// A change could not be encoded or decoded.
    #[error(transparent)]
    Schema(#[from] SchemaError),
    /// The storage engine failed (I/O error, full disk, …).
    #[error("journal storage: {0}")]
    Storage(#[from] redb::Error),
    /// A group commit failed (for example a full disk); nothing in it was acknowledged.
    #[error("commit failed, nothing acknowledged: {0}")]
    CommitFailed(String),
    /// A leader-only operation on a device that is not leading.
    #[error("this device is not the leader")]
    NotLeader,
    /// A replicated segment does not start right after the local log.
    #[error("segment starts at {found}, the log continues at {expected}")]
    NotContiguous {
        /// The next position of the local log.
        expected: Lsn,
        /// Where the segment starts.
        found: Lsn,
    },
    /// A read asked for positions compacted away (at or before the log's base).
    #[error("log position {} was compacted (the log starts after {})", asked.0, base.0)]
    Compacted {
        /// The log's base.
        base: Lsn,
        /// The first position asked for.
        asked: Lsn,
    },
    /// A compaction that cannot be made as asked.
    #[error("cannot compact the log: {0}")]
    Compaction(String),
    /// The storage failed and the journal could not be opened again yet (see `db.rs`): nothing
    /// is read or committed until it can; each later call tries again.
    #[error("the journal is unavailable after a storage failure: {0}")]
    Unavailable(String),
    /// The writer thread has stopped (the journal is closing or crashed).
    #[error("the journal writer has stopped")]
    WriterStopped,
    /// An existing library's journal holds nothing of it: its creation stopped before the
    /// journal's first commit (see [`crate::JournalOptions::existing`]).
    #[error("the journal was never initialised: its library's creation or join did not finish")]
    Uninitialised,
    /// The journal was written by a newer format.
    #[error("journal format {found} is newer than this build reads ({supported})")]
    UnsupportedFormat {
        /// The format found.
        found: u64,
        /// The newest this build reads.
        supported: u64,
    },
}

impl JournalError {
    /// Whether this is the storage failing (I/O, a full disk, or redb refusing everything
    /// after one), after which the database must be opened again.
    pub fn is_storage_failure(&self) -> bool {
        matches!(
            self,
            JournalError::Storage(_) | JournalError::Unavailable(_)
        )
    }
}

/// Where a record lives, for error reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordPlace {
    /// The leader log at this position.
    Log(Lsn),
    /// The offline journal at this sequence number.
    Offline(u64),
    /// The n-th record of an incoming batch from a peer.
    Incoming(usize),
    /// The record of a job (nil: a key that is not a job id).
    Job(uuid::Uuid),
}

impl std::fmt::Display for RecordPlace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecordPlace::Log(lsn) => write!(f, "log lsn {lsn}"),
            RecordPlace::Offline(seq) => write!(f, "offline journal seq {seq}"),
            RecordPlace::Incoming(n) => write!(f, "incoming record #{n}"),
            RecordPlace::Job(id) => write!(f, "job record {id}"),
        }
    }
}

/// Converts any redb error into [`JournalError`].
pub(crate) fn storage<E: Into<redb::Error>>(err: E) -> JournalError {
    let err: redb::Error = err.into();
    match err {
        redb::Error::DatabaseAlreadyOpen => JournalError::AlreadyOpen,
        redb::Error::Corrupted(reason) => JournalError::Corrupt(reason),
        other => JournalError::Storage(other),
    }
}

/// Runs a read against the storage engine, turning a panic inside it (a damaged page it did not
/// expect) into [`JournalError::Corrupt`].
pub(crate) fn guarded<T>(f: impl FnOnce() -> Result<T, JournalError>) -> Result<T, JournalError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(result) => result,
        Err(_) => Err(JournalError::Corrupt(
            "the storage engine failed on a damaged page".into(),
        )),
    }
}

/// A redb write transaction whose drop, while its thread unwinds from a panic, runs inside
/// `catch_unwind`: on a damaged file redb's drop of the transaction can panic again, and a panic
/// escaping a destructor while unwinding aborts the process before [`guarded`] reports
/// [`JournalError::Corrupt`].
pub(crate) struct WriteTxn(Option<redb::WriteTransaction>);

impl WriteTxn {
    /// Begins a write transaction on `db`.
    pub(crate) fn begin(db: &redb::Database) -> Result<Self, JournalError> {
        Ok(Self(Some(db.begin_write().map_err(storage)?)))
    }

    /// Commits it.
    pub(crate) fn commit(mut self) -> Result<(), redb::CommitError> {
        // Only `commit` and `drop` take it, and both consume the wrapper.
        self.0.take().expect("a live transaction").commit()
    }
}

impl std::ops::Deref for WriteTxn {
    type Target = redb::WriteTransaction;

    fn deref(&self) -> &Self::Target {
        // Only `commit` and `drop` take it, and both consume the wrapper.
        self.0.as_ref().expect("a live transaction")
    }
}

impl std::ops::DerefMut for WriteTxn {
    fn deref_mut(&mut self) -> &mut Self::Target {
        self.0.as_mut().expect("a live transaction")
    }
}

impl Drop for WriteTxn {
    fn drop(&mut self) {
        if let Some(txn) = self.0.take() {
            if std::thread::panicking() {
                let dropped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(txn)));
                if dropped.is_err() {
                    tracing::error!("a write transaction on a damaged journal failed to abort");
                }
            }
        }
    }
}
