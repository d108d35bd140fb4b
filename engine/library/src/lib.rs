//! Keel: a sync engine that keeps a file library's metadata identical across a person's devices.
//!
//! A [`Library`] holds an append-only, sealed journal (redb) and its SQLite projections. Every
//! change goes through [`Library::transact`]: when it returns `Ok`, the change is durable. The
//! projections are rebuilt from the journal at will ([`Library::rebuild`]) to the same digest.
//!
//! # Embedding Keel
//!
//! ```
//! use keel_engine::{CreateOptions, Home, Library, Scope};
//! use keel_engine::KdfParams;
//!
//! # fn main() -> Result<(), keel_engine::EngineError> {
//! let dir = tempfile::tempdir().expect("temp dir");
//! let home = Home::new(dir.path().join("home"));
//! let photos = dir.path().join("photos");
//! std::fs::create_dir_all(&photos).expect("folder");
//! std::fs::write(photos.join("beach.jpg"), b"sand and sea").expect("file");
//!
//! // Tests use cheap key derivation; real libraries keep the default.
//! let options = CreateOptions { kdf: KdfParams::INSECURE_FAST };
//! let library = Library::create(&home, "family", "correct horse", options)?;
//! let mut events = library.subscribe();
//! library.index(&photos, &mut |_progress| {})?;
//! library.files().tag(&photos.join("beach.jpg"), &["holiday".to_string()], Scope::Content)?;
//! let entry = library.files().entry(&photos.join("beach.jpg"))?;
//! let tags = library.files().metadata(&entry)?.content.map(|(_, tags)| tags).unwrap_or_default();
//! assert_eq!(tags[0].name, "holiday");
//! assert!(events.try_recv().is_ok());
//! library.close()?;
//! # Ok(())
//! # }
//! ```

mod applier;
mod attest;
mod backfill;
mod compact;
mod config;
mod conflicts;
mod error;
mod events;
mod everyday;
mod feed;
mod floor;
mod indexer;
#[cfg(target_os = "linux")]
mod inotify;
mod jobs;
mod leader_commit;
mod library;
mod link;
mod merge;
mod models;
mod ops;
mod ranges;
mod rebuild;
mod replay;
mod tx;
mod walk;
mod watch;

pub use backfill::{
    BackfillPlan, BackfillReport, BackfillSource, SnapshotSource, BACKFILL_BATCH, BACKFILL_FILE,
};
pub use compact::{CompactReport, SNAPSHOT_FILE};
pub use config::{write_atomic, DeviceIdentity, Home, LibraryConfig, LIBRARY_CONFIG_VERSION};
pub use conflicts::Strategy;
pub use error::EngineError;
pub use events::{ChangeKind, Event, EVENT_BUS_CAPACITY, EVENT_RECORDS_MAX};
pub use feed::{ChangeFeed, FeedPosition};
pub use indexer::{IndexProgress, IndexReport, SETTLING_LISTED_MAX};
pub use jobs::{
    save_job_to, Job, JobKind, JobState, Progress, CATCH_UP_JOB_MIN, JOB_HISTORY_MAX,
    JOB_SAVE_EVERY,
};
pub use keel_journal::KdfParams;
pub use keel_projections::Counts;
pub use keel_projections::{
    image_uuid, Conflict, ConflictSide, EntryFilter, EntryMetadata, EntryOrder, EntryPage,
    KeyRange, PageCursor, PageKey, Part, PartCursor, RangeDigest, RefusedChange, SearchHit,
    SearchMatch, RANGES_MAX,
};
/// Keel's schema crate, whole: `#[derive(Syncable)]` in a crate that depends on `keel-engine`
/// alone generates paths through it.
pub use keel_schema as schema;
/// What a host app writes and reads, so that `keel-engine` is the one dependency it needs.
pub use keel_schema::{
    content_metadata_uuid, content_uuid, entry_metadata_uuid, tag_uuid, user_metadata_tag_uuid,
    uuid, uuid::Uuid, ChangeId, ContentIdentity, ContentIdentityUpdate, Device, DeviceId, Entry,
    EntryKind, EntryUpdate, FieldUpdate, LibraryId, Location, LocationUpdate, Lsn, RegisteredModel,
    Registry, Syncable, Tag, TagUpdate, Upcast, UserMetadata, UserMetadataTag,
    UserMetadataTagUpdate, UserMetadataUpdate, Value, HOST_CODE_MIN,
};
pub use leader_commit::{SequenceReply, SequenceRequest};
pub use library::{
    now_ms, CommitReceipt, CreateOptions, DiskUsage, JournalStatus, Library, PendingTransaction,
    Status, SyncState, JOIN_FRAMES_FILE, JOIN_INCOMING_FILE, JOURNAL_FILE, PROJECTIONS_FILE,
};
pub use link::{LinkOptions, NodeLink};
pub use merge::{MergeReport, ModelMerge, MERGE_BATCH};
pub use models::LackingModel;
pub use ops::{Files, ResolvedPath, Scope};
pub use ranges::Ranges;
pub use rebuild::{VerifyOutcome, REBUILD_FILE, VERIFY_FILE};
pub use replay::{replay, ReplayReport};
pub use tx::Tx;
pub use watch::{WatchOptions, WATCH_QUEUE_MAX};
