//! Keel's journal: one `journal.redb` per library holding the offline journal (local changes
//! waiting for a leader), the leader log (`Lsn → (Epoch, sealed change)`), positions, jobs,
//! conflicts and meta. Changes are sealed (encrypted) before they reach the disk.
//!
//! The journal knows nothing about SQLite or the network. Layout and commit protocol:
//! `docs/journal-format.md`.

mod aligned;
mod backends;
pub mod binding;
mod budget;
mod compact;
mod db;
#[cfg(unix)]
mod direct_writes;
mod error;
#[cfg(feature = "faults")]
pub mod faults;
mod filled_growth;
mod handles;
mod jobs;
mod log_index;
mod log_table;
mod page;
mod record;
mod replicate;
mod seal;
mod store;
mod tables;
#[cfg(all(test, feature = "faults"))]
mod tests_faults;
mod writer;
mod xchacha;

pub use aligned::{open_direct, AlignedBuffer, DIRECT_ALIGN};
pub use budget::ApplyBudget;
pub use compact::Compaction;
pub use error::{JournalError, RecordPlace};
pub use handles::{Election, OfflineJournal, ReplicatedLog};
pub use jobs::{JobRecords, JOB_RECORD_MAX};
pub use log_index::LogIndex;
pub use page::{
    LogPage, PageBuilder, PageTrailer, Records, LINK_LEN, PAGE_BYTES_MAX, PAGE_HEADER_LEN,
    PAGE_TRAILER_LEN, PAGE_VERSION, PAGE_VERSION_UNBOUND, TAG_LEN,
};
pub use record::{
    LocalRecord, LogRecord, PushState, RecordError, LOCAL_HEADER_LEN, LOG_HEADER_LEN,
    RECORD_LEN_MAX, RECORD_VERSION,
};
pub use seal::{
    ChainedKey, KdfParams, LibraryKey, Sealer, SharedKey, WrappedKey, LIBRARY_KEYS_MAX,
    SEAL_HEADER_LEN, SEAL_TAG_LEN,
};
pub use store::{
    CheckedEntries, Journal, JournalOptions, JournalStats, LogCheck, PendingCommit, ReadEntry,
    VerifyReport, CLOCK_AHEAD_MAX_MS, JOURNAL_CACHE_BYTES,
};
pub use tables::JOURNAL_FORMAT;
pub use writer::{CommitRoute, CommittedBatch, Placement, BATCH_CHANGES_MAX, QUEUE_REQUESTS_MAX};
