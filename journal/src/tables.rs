//! The redb tables of `journal.redb` and the keys of its meta table.

use redb::TableDefinition;

/// The leader log: `first lsn → log page` (consecutive log records, each with its epoch,
/// checksum and sealed change; see `crate::page`).
pub(crate) const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log_pages");
/// A log a rebase dropped, renamed in the rebase's transaction and deleted by the writer after
/// it replied, a slice at a time between requests (freeing a long log's pages whole took about
/// a second); a journal opened after a crash in between deletes the rest.
pub(crate) const DROPPED_LOG: TableDefinition<u64, &[u8]> =
    TableDefinition::new("log_pages_dropped");
/// The log after a compaction's base while the compaction copies it (see
/// `log_table::copy_after`); renamed to [`LOG`] in the same transaction, so never seen after a
/// commit.
pub(crate) const FRESH_LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log_pages_fresh");
/// The leader log of format 1, one record per key: `lsn → log record`. Opening a journal moves
/// it into [`LOG`].
pub(crate) const LEGACY_LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
/// Dropped: an index `change id → lsn` that early builds kept beside the log. Deduplication is
/// the replication core's (its log ids in memory), so opening a journal deletes this table.
pub(crate) const LEGACY_CHANGE_INDEX: TableDefinition<u128, u64> =
    TableDefinition::new("change_index");
/// The offline journal: `seq → record` (push state, checksum, sealed change). Its table keeps
/// the name "local" it was created with (format 1).
pub(crate) const OFFLINE: TableDefinition<u64, &[u8]> = TableDefinition::new("local");
/// Replication positions per peer and domain: `"peer/domain" → lsn`.
pub(crate) const POSITIONS: TableDefinition<&str, u64> = TableDefinition::new("positions");
/// Persisted jobs: `job id → state`.
pub(crate) const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");
/// Recorded conflicts: `conflict id → record`.
pub(crate) const CONFLICTS: TableDefinition<u128, &[u8]> = TableDefinition::new("conflicts");
/// A saved copy of the log index under key 0 (see `crate::log_index`), in a table of its own
/// so that reading a meta value never reads it; deleted by a truncation.
pub(crate) const LOG_INDEX: TableDefinition<u64, &[u8]> = TableDefinition::new("log_index");
/// Meta values: see the `META_*` keys.
pub(crate) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

/// Journal format version (u64 BE).
pub(crate) const META_FORMAT: &str = "format";
/// The library id (16 bytes).
pub(crate) const META_LIBRARY: &str = "library_id";
/// The current epoch (8-byte counter ‖ 32-byte device).
pub(crate) const META_EPOCH: &str = "epoch";
/// The highest epoch this device voted for (same layout as the epoch).
pub(crate) const META_VOTED: &str = "voted";
/// The log end this device held before it last cut its log at a damaged record: it votes only
/// for logs at least as up to date, and stands only once its log reaches it again. 8-byte
/// position ‖ its entry's epoch (40 bytes, as [`META_EPOCH`]). Absent: none.
pub(crate) const META_VOTE_FLOOR: &str = "vote_floor";
/// The HLC high-water mark (44 bytes, [`keel_schema::Hlc::to_bytes`]).
pub(crate) const META_HLC: &str = "hlc_high_water";
/// Count of changes this device made (u64 BE).
pub(crate) const META_OWN_CHANGES: &str = "own_changes";

/// After a truncation: replay after a crash must start no later than this log position (u64 BE).
pub(crate) const META_REPLAY_FROM: &str = "replay_from";
/// Truncations that dropped other devices' changes since the projections were last rebuilt
/// (u64 BE; absent: none). See [`crate::Journal::projections_stale`].
pub(crate) const META_PROJECTIONS_STALE: &str = "projections_stale";

/// The journal format this build writes: 2 stores the log in pages (format 1 had one key per
/// record, and is converted on open).
pub const JOURNAL_FORMAT: u64 = 2;

/// The log's compaction base: positions up to it were dropped (their state is in the library's
/// snapshot). 8-byte position ‖ its entry's epoch (40 bytes, as [`META_EPOCH`]). Absent: 0.
pub(crate) const META_LOG_BASE: &str = "log_base";
/// The epoch of the log's first entry (the founder's), kept once that entry is compacted away
/// (40 bytes, as [`META_EPOCH`]).
pub(crate) const META_LOG_HEAD: &str = "log_head";
