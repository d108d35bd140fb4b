//! Keel's projections: the SQLite views (`projections.sqlite`) of Device, Location, Entry,
//! ContentIdentity, UserMetadata, Tag and UserMetadataTag, materialized from the journal.
//!
//! Apply is order-independent (per-field LWW clocks, tombstones, dependency parking) and records
//! the applied position in the same transaction, so a projection can always be healed or rebuilt
//! from the journal. It knows nothing about redb or the network.

mod apply;
mod attest;
mod backfill;
mod checkpoint;
mod clocks;
mod collect;
mod conflicts;
mod ddl;
mod derived;
mod digest;
mod error;
mod filters;
mod order;
mod ownership;
mod queries;
mod ranges;
mod rebuild;
mod references;
mod rows;
mod search;
mod snapshot;
mod store;
mod upgrade;

pub use apply::{ApplyStats, SELF_PROOF_MIN};
pub use attest::Signer;
pub use backfill::{Part, PartCursor};
pub use checkpoint::{BULK_CHECKPOINT_ROWS, CHECKPOINT_INTERVAL, CHECKPOINT_ROWS};
pub use conflicts::{
    Conflict, ConflictSide, CONFLICT_HISTORY_MAX, LATEST_WINS, MANUAL, PREFER_DEVICE,
};
pub use error::ProjectionError;
pub use filters::{EntryFilter, EntryOrder, EntryPage, PageCursor, PageKey, PAGE_MAX};
pub use ownership::{Lacking, RefusedChange};
pub use queries::{Counts, EntryMetadata, Query};
pub use ranges::{image_uuid, KeyRange, RangeDigest, RANGES_MAX, ROW_IMAGE_MAX};
pub use rows::RowValues;
pub use search::{SearchHit, SearchMatch, SEARCH_TEXT_MAX, SEARCH_WORDS_MAX};
pub use snapshot::FrozenFile;
pub use store::{
    configure_connection, AppliedPosition, Projections, PAGE_CACHE_KIB, PAGE_SIZE,
    READER_CACHE_KIB, WAL_CHECKPOINT_BACKSTOP_PAGES, WAL_CHECKPOINT_PAGES, WAL_SIZE_LIMIT,
};
pub use upgrade::ModelsUpgrade;
