//! `Journal`: opening `journal.redb`, committing through the writer, reading, and verifying.

use std::ops::ControlFlow;
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::Sender;
use keel_schema::{Change, ChangeId, DeviceId, Epoch, Hlc, LibraryId, Lsn};
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableHandle,
};
use uuid::Uuid;

use crate::budget::ApplyBudget;
use crate::db::DbHandle;
use crate::error::{guarded, storage, JournalError, RecordPlace, WriteTxn};
use crate::log_table;
use crate::record::{LocalRecord, LogRecord, RecordError};
use crate::seal::{LibraryKey, Sealer};
use crate::tables::{
    CONFLICTS, DROPPED_LOG, JOBS, JOURNAL_FORMAT, LEGACY_CHANGE_INDEX, LEGACY_LOG, LOG, META,
    META_EPOCH, META_FORMAT, META_HLC, META_LIBRARY, META_OWN_CHANGES, META_PROJECTIONS_STALE,
    META_REPLAY_FROM, META_VOTED, OFFLINE, POSITIONS,
};
use crate::writer::{
    epoch_bytes, write_epoch, CommitRoute, CommittedBatch, Counters, LeadingHint, Placement,
    Request, Sealed, WriterState, QUEUE_REQUESTS_MAX,
};

/// redb's page cache for the journal (its default of 1 GiB would let replay memory grow with the
/// library). The journal is written at its end and read in order, so a small cache does: at 16 MiB
/// instead of 64, a 2M-entry initial sync and a 1M-change replay ran as fast, and their peak RSS
/// fell by about 100 MB.
pub const JOURNAL_CACHE_BYTES: usize = 16 * 1024 * 1024;
/// Room reserved for one sealed, framed record before it is written: a typical change with its
/// headers and tag fits without growing the buffer.
const RECORD_CAPACITY_HINT: usize = 320;

/// One decoded entry of the log or the local journal; a record that fails its checks is an `Err`
/// with its position, and is never applied.
pub type ReadEntry = Result<(Placement, Option<Epoch>, Change), JournalError>;

/// What `verify` found.
#[derive(Debug, Default, Clone)]
pub struct VerifyReport {
    /// Log records read.
    pub log_records: u64,
    /// Local records read.
    pub local_records: u64,
    /// Records that failed a check, with their position and reason.
    pub faults: Vec<(RecordPlace, String)>,
}

/// Counters shown by `status`.
#[derive(Debug, Default, Clone, Copy)]
pub struct JournalStats {
    /// Changes this device made.
    pub own_changes: u64,
    /// Changes in the local journal, not yet sequenced by a leader.
    pub offline: u64,
    /// Records in the leader log (after its compaction base).
    pub log_len: u64,
    /// The last log position (0 if empty).
    pub last_lsn: Lsn,
    /// The compaction base: positions up to it were dropped (0: never compacted).
    pub base: Lsn,
    /// Pages of a log that a compaction or a rebase dropped and the writer is still deleting,
    /// a slice at a time (0: none).
    pub dropped_log_pages: u64,
}

/// What [`Journal::check_log`] found in one stretch of the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogCheck {
    /// The first damaged record, if any.
    pub damaged: Option<Lsn>,
    /// Where the next stretch starts (`None`: the log ends here, or a record is damaged).
    pub next: Option<Lsn>,
}

/// Log entries checked by [`crate::ReplicatedLog::check`], ready for [`crate::ReplicatedLog::append_checked`].
#[derive(Debug)]
pub struct CheckedEntries {
    first: Lsn,
    entries: crate::writer::AppendEntries,
}

impl CheckedEntries {
    /// Appends these entries to `index` (which must end just before them).
    pub fn index_into(&self, index: &mut crate::LogIndex) {
        for (epoch, _, sealed) in &self.entries {
            index.push(*epoch, Sealer::peek_change_id(sealed));
        }
    }

    /// The position of the first entry.
    pub fn first(&self) -> Lsn {
        self.first
    }

    /// How many entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Appends `next`, which must start right after these.
    pub fn extend(&mut self, next: CheckedEntries) -> Result<(), JournalError> {
        let expected = Lsn(self.first.0 + self.entries.len() as u64);
        if next.first != expected {
            return Err(JournalError::NotContiguous {
                expected,
                found: next.first,
            });
        }
        self.entries.extend(next.entries);
        Ok(())
    }
}

/// Checks log entries from `first` with `check` (barriers, empty, pass unchecked); the first
/// failure fails them all.
fn check_each(
    first: Lsn,
    entries: Vec<(Epoch, Vec<u8>)>,
    check: impl Fn(RecordPlace, &[u8]) -> Result<Option<Change>, JournalError>,
) -> Result<CheckedEntries, JournalError> {
    let mut checked = Vec::with_capacity(entries.len());
    for (i, (epoch, bytes)) in entries.into_iter().enumerate() {
        let change = if bytes.is_empty() {
            None
        } else {
            check(RecordPlace::Log(Lsn(first.0 + i as u64)), &bytes)?
        };
        checked.push((epoch, change, bytes));
    }
    Ok(CheckedEntries {
        first,
        entries: checked,
    })
}

/// The current sealer, swapped when the library key rotates.
pub(crate) type SealerSlot = Arc<std::sync::RwLock<Arc<Sealer>>>;

/// The sealer in `slot` now.
pub(crate) fn current_sealer(slot: &SealerSlot) -> Arc<Sealer> {
    match slot.read() {
        Ok(sealer) => sealer.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    }
}

/// A library's journal. Cheap to share by reference across threads.
pub struct Journal {
    pub(crate) db: Arc<DbHandle>,
    library: LibraryId,
    /// This device: its own changes are not checked against its own clock.
    device: DeviceId,
    /// Swapped when the library key rotates (see [`Journal::set_key`]); shared with the writer,
    /// which binds log pages under it.
    sealer: SealerSlot,
    requests: Option<Sender<Request>>,
    writer: Option<JoinHandle<()>>,
    sent: Arc<std::sync::atomic::AtomicU64>,
    leading: LeadingHint,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Journal(library {})", self.library)
    }
}

/// A commit handed to the writer; see [`Journal::commit_pipelined`].
#[derive(Debug)]
#[must_use = "a pipelined commit is acknowledged only by wait()"]
pub struct PendingCommit {
    answer: crossbeam_channel::Receiver<Result<Vec<Placement>, JournalError>>,
}

impl PendingCommit {
    /// Waits until the batch is durable (`Ok`) or failed.
    pub fn wait(self) -> Result<Vec<Placement>, JournalError> {
        self.answer
            .recv()
            .map_err(|_| JournalError::WriterStopped)?
    }
}

/// Options for [`Journal::open`].
#[derive(Debug, Default)]
pub struct JournalOptions {
    /// Receives each durable batch, in order (the engine applies them to its projections).
    pub committed: Option<Sender<CommittedBatch>>,
    /// The role the writer starts in; `None` reads the stored epoch and leads if it names `device`.
    pub role: Option<CommitRoute>,
    /// Bounds, in changes, the batches sent to `committed` and not yet taken: the writer waits
    /// for room before sending (the receiver gives the room back as it takes batches).
    pub committed_budget: Option<Arc<ApplyBudget>>,
    /// Writes large pages past the page cache (`O_DIRECT`, Linux only): for a bulk load that
    /// nothing reads back soon, such as the log a joining device receives (see
    /// `direct_writes.rs`). Ignored where the platform or file system does not offer it.
    pub direct_writes: bool,
    /// The library exists already (it is being opened, not created): a journal that holds
    /// nothing of it (its creation stopped before the journal's first commit) is
    /// [`JournalError::Uninitialised`] instead of being made anew, and so never founds a
    /// library as this device's.
    pub existing: bool,
}

pub(crate) fn read_meta(db: &Database, key: &str) -> Result<Option<Vec<u8>>, JournalError> {
    guarded(|| {
        let txn = db.begin_read().map_err(storage)?;
        let meta = match txn.open_table(META) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(storage(e)),
        };
        Ok(meta.get(key).map_err(storage)?.map(|v| v.value().to_vec()))
    })
}

pub(crate) fn decode_epoch(bytes: &[u8]) -> Option<Epoch> {
    if bytes.len() != 40 {
        return None;
    }
    let counter = u64::from_be_bytes(bytes[..8].try_into().ok()?);
    let device = DeviceId(bytes[8..].try_into().ok()?);
    Some(Epoch { counter, device })
}

/// Checks that keys read from a range only increase (a damaged tree could return them out of
/// order, and a reader that continues from the last key would then loop).
fn check_order(previous: &mut Option<u64>, key: u64, from: u64) -> Result<(), JournalError> {
    let fine = match *previous {
        Some(p) => key > p,
        None => key >= from,
    };
    if !fine {
        return Err(JournalError::Corrupt(format!("keys out of order at {key}")));
    }
    *previous = Some(key);
    Ok(())
}

/// Whether the log holds the barrier of `epoch` (searching back until an older epoch).
fn won(db: &Database, epoch: Epoch) -> Result<bool, JournalError> {
    let txn = db.begin_read().map_err(storage)?;
    let log = txn.open_table(LOG).map_err(storage)?;
    let mut won = false;
    log_table::visit_back(&log, |bytes| {
        let Ok(record) = LogRecord::decode(bytes) else {
            return ControlFlow::Continue(());
        };
        if record.epoch < epoch {
            return ControlFlow::Break(());
        }
        if record.epoch == epoch && LogRecord::is_barrier(bytes) {
            won = true;
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    })?;
    Ok(won)
}

/// The error for a log page whose framing is damaged, at its first position.
fn damaged_page(lsn: Lsn, e: &RecordError) -> JournalError {
    JournalError::BadRecord {
        place: RecordPlace::Log(lsn),
        reason: format!("its log page is unreadable ({e}); the page's records are lost"),
    }
}

/// Moves a format-1 log (one key per record) into pages, keeping every record's bytes and
/// position, and drops the old table. Returns how many records moved.
fn migrate_legacy_log(
    txn: &redb::WriteTransaction,
    keys: &crate::binding::PageKeys,
) -> Result<u64, JournalError> {
    // Looked up, not opened: opening would create it (a write on every open, and on a file
    // whose page allocator is damaged, a panic with the log table open, whose drop then
    // panics again while unwinding: an abort).
    let legacy = txn
        .list_tables()
        .map_err(storage)?
        .any(|table| table.name() == LEGACY_LOG.name());
    if !legacy {
        return Ok(0);
    }
    let mut log = txn.open_table(LOG).map_err(storage)?;
    let mut moved = 0u64;
    {
        let legacy = txn.open_table(LEGACY_LOG).map_err(storage)?;
        let mut writer: Option<log_table::PageWriter> = None;
        for item in legacy.range(0..).map_err(storage)? {
            let (key, record) = item.map_err(storage)?;
            let key = key.value();
            // Pages hold consecutive positions: a gap starts a new page.
            let fresh = writer.as_ref().is_none_or(|w| w.next() != key);
            if fresh {
                if let Some(mut w) = writer.take() {
                    w.flush(&mut log)?;
                }
                writer = Some(log_table::PageWriter::after(&log, key, keys)?);
            }
            if let Some(w) = writer.as_mut() {
                w.push(&mut log, record.value())?;
            }
            moved += 1;
        }
        if let Some(mut w) = writer {
            w.flush(&mut log)?;
        }
    }
    txn.delete_table(LEGACY_LOG).map_err(storage)?;
    if moved > 0 {
        tracing::info!(
            records = moved,
            "moved the log into pages (journal format 2)"
        );
    }
    Ok(moved)
}

pub(crate) fn decode_u64(bytes: &[u8]) -> u64 {
    bytes.try_into().map(u64::from_be_bytes).unwrap_or(0)
}

/// How far ahead of this device's clock another device's change may be (a day): clocks drift,
/// and devices come back from long trips, but a change further ahead would drag every clock of
/// the library with it (see [`JournalError::ClockAhead`]).
pub const CLOCK_AHEAD_MAX_MS: u64 = 24 * 60 * 60 * 1000;

/// Milliseconds since the Unix epoch (0 if the clock is before it).
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Journal {
    /// Opens or creates `journal.redb` at `path` for `library`, owned by `device`.
    ///
    /// Checks the format, the library id and the HLC high-water mark before starting the writer.
    pub fn open(
        path: &Path,
        library: LibraryId,
        key: &LibraryKey,
        device: DeviceId,
        options: JournalOptions,
    ) -> Result<Self, JournalError> {
        let handle = Arc::new(DbHandle::open(path, options.direct_writes)?);
        let db = handle.get()?;
        let sealer = key.sealer(library);
        // A new journal stores its first epoch with its library id, in one commit: this
        // device's epoch 1 (it founds the library) unless a role is given (a joining device
        // follows). No state holds the library id without an epoch.
        let first_epoch = match options.role {
            None => Epoch { counter: 1, device },
            Some(CommitRoute::Log(epoch)) => epoch,
            Some(CommitRoute::Offline) => Epoch::default(),
        };
        guarded(|| {
            Self::init_tables(
                &db,
                library,
                sealer.page_keys(),
                (first_epoch, options.existing),
            )
        })?;

        let stored_epoch = read_meta(&db, META_EPOCH)?.and_then(|b| decode_epoch(&b));
        let role = match options.role {
            Some(role) => role,
            None => initial_route(&db, stored_epoch, device)?,
        };
        let Counters {
            next_lsn,
            next_local,
            mut hlc_high_water,
            own_changes,
        } = Counters::read(&db, device)?;
        drop(db);

        let (tx, rx) = crossbeam_channel::bounded(QUEUE_REQUESTS_MAX);
        let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let leading = LeadingHint::default();
        let mut journal = Self {
            sent: sent.clone(),
            leading: leading.clone(),
            db: handle.clone(),
            library,
            device,
            sealer: Arc::new(std::sync::RwLock::new(Arc::new(sealer))),
            requests: Some(tx),
            writer: None,
        };
        // The high-water mark must cover the newest record; heal it if a record is newer.
        if let Some(last) = guarded(|| journal.last_change_hlc())? {
            if last > hlc_high_water {
                tracing::warn!("HLC high-water mark was behind the newest record; raised");
                hlc_high_water = last;
            }
        }
        let state = WriterState {
            db: handle,
            role,
            next_lsn,
            next_local,
            hlc_high_water,
            own_changes,
            device,
            committed: options.committed,
            budget: options.committed_budget,
            sent: sent.clone(),
            leading,
            stale: false,
            sealer: journal.sealer.clone(),
            tail: None,
            dropping: false,
        };
        state.publish_role();
        let handle = std::thread::Builder::new()
            .name("keel-journal-writer".into())
            .spawn(move || state.run(rx))
            .map_err(|e| JournalError::Storage(redb::Error::Io(e)))?;
        journal.writer = Some(handle);
        if let CommitRoute::Log(epoch) = role {
            if stored_epoch != Some(epoch) {
                journal.set_role(role)?;
            }
        }
        Ok(journal)
    }

    /// Creates the tables, checks the format and the library id, and on a new journal stores
    /// the library id with `first_epoch` (unless `existing`: then a new journal is refused).
    fn init_tables(
        db: &Database,
        library: LibraryId,
        keys: &crate::binding::PageKeys,
        (first_epoch, existing): (Epoch, bool),
    ) -> Result<(), JournalError> {
        let mut txn = WriteTxn::begin(db)?;
        txn.set_durability(Durability::Immediate).map_err(storage)?;
        {
            txn.delete_table(LEGACY_CHANGE_INDEX).map_err(storage)?;
            txn.delete_table(DROPPED_LOG).map_err(storage)?;
            txn.open_table(LOG).map_err(storage)?;
            txn.open_table(OFFLINE).map_err(storage)?;
            txn.open_table(POSITIONS).map_err(storage)?;
            txn.open_table(JOBS).map_err(storage)?;
            txn.open_table(CONFLICTS).map_err(storage)?;
            let mut meta = txn.open_table(META).map_err(storage)?;
            let format = meta
                .get(META_FORMAT)
                .map_err(storage)?
                .map(|v| decode_u64(v.value()));
            match format {
                Some(found) if found > JOURNAL_FORMAT => {
                    return Err(JournalError::UnsupportedFormat {
                        found,
                        supported: JOURNAL_FORMAT,
                    })
                }
                Some(found) if found == JOURNAL_FORMAT => {}
                _ => {
                    meta.insert(META_FORMAT, &JOURNAL_FORMAT.to_be_bytes()[..])
                        .map_err(storage)?;
                }
            }
            let stored = meta
                .get(META_LIBRARY)
                .map_err(storage)?
                .map(|v| v.value().to_vec());
            match stored {
                Some(bytes) => {
                    let found = Uuid::from_slice(&bytes).map_err(|_| {
                        JournalError::Corrupt("library id in meta is malformed".into())
                    })?;
                    if found != library.0 {
                        return Err(JournalError::WrongLibrary {
                            found: found.to_string(),
                            expected: library.0.to_string(),
                        });
                    }
                }
                None if existing => return Err(JournalError::Uninitialised),
                None => {
                    meta.insert(META_LIBRARY, library.0.as_bytes().as_slice())
                        .map_err(storage)?;
                    if meta.get(META_EPOCH).map_err(storage)?.is_none() {
                        let epoch = epoch_bytes(first_epoch);
                        meta.insert(META_EPOCH, &epoch[..]).map_err(storage)?;
                        meta.insert(META_VOTED, &epoch[..]).map_err(storage)?;
                    }
                }
            }
        }
        // After the format check: a newer format is refused before anything moves.
        migrate_legacy_log(&txn, keys)?;
        txn.commit().map_err(storage)?;
        Ok(())
    }

    fn last_change_hlc(&self) -> Result<Option<Hlc>, JournalError> {
        let txn = self.db.get()?.begin_read().map_err(storage)?;
        let mut newest = None;
        let log = txn.open_table(LOG).map_err(storage)?;
        let local = txn.open_table(OFFLINE).map_err(storage)?;
        let last_log =
            log_table::last_record(&log)?.map(|(lsn, bytes)| (Placement::Log(Lsn(lsn)), bytes));
        let last_local = local
            .last()
            .map_err(storage)?
            .map(|(k, v)| (Placement::Offline(k.value()), v.value().to_vec()));
        let sealer = self.sealer();
        for (place, bytes) in last_log.into_iter().chain(last_local) {
            if let Ok((_, _, change)) = Self::decode_entry(&sealer, place, &bytes) {
                newest = newest.max(Some(change.hlc));
            }
        }
        Ok(newest)
    }

    /// How many committed batches the writer has sent so far (each carries its number in
    /// [`CommittedBatch::seq`]): whoever applies them is caught up once it applied this one.
    pub fn batches_sent(&self) -> u64 {
        self.sent.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Returns once the writer has finished everything asked of it before this call: every
    /// batch sent so far is committed then, including one sent while it committed
    /// ([`CommittedBatch::early`]).
    pub fn settle(&self) -> Result<(), JournalError> {
        self.ask(|reply| Request::Barrier { reply })
    }

    /// The library this journal belongs to.
    pub fn library(&self) -> LibraryId {
        self.library
    }

    /// Seals `change` under this library's key, as the log stores it (for a replication core
    /// that appends this device's changes to the log itself).
    pub fn seal(&self, change: &Change) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(RECORD_CAPACITY_HINT);
        self.sealer()
            .seal_into(change.id, &mut bytes, |plain| change.encode_into(plain));
        bytes
    }

    /// Seals `plain` under this library's key, bound to `id` (records beside the changes: jobs).
    pub(crate) fn seal_bytes(&self, id: ChangeId, plain: &[u8]) -> Vec<u8> {
        self.sealer().seal(id, plain)
    }

    /// Opens what [`Journal::seal_bytes`] sealed: the id it is bound to and the plaintext.
    pub(crate) fn open_bytes(&self, sealed: &[u8]) -> Result<(ChangeId, Vec<u8>), String> {
        self.sealer().open(sealed)
    }

    /// The sealer of the current library key.
    pub(crate) fn sealer(&self) -> Arc<Sealer> {
        current_sealer(&self.sealer)
    }

    /// Seals from now on with `key`'s current key, and opens under any of its keys (after a
    /// rotation, or keys learned from a peer).
    pub fn set_key(&self, key: &LibraryKey) {
        let sealer = Arc::new(key.sealer(self.library));
        match self.sealer.write() {
            Ok(mut slot) => *slot = sealer,
            Err(poisoned) => *poisoned.into_inner() = sealer,
        }
    }

    /// Seals and durably commits `changes` as one group. `Ok` means every change is durable.
    pub fn commit(&self, changes: Vec<Change>) -> Result<Vec<Placement>, JournalError> {
        self.commit_pipelined(changes)?.wait()
    }

    /// Seals `changes` and hands them to the writer without waiting: the caller may prepare its
    /// next batch while this one is written. Nothing is acknowledged until
    /// [`PendingCommit::wait`] returns `Ok`. Batches are written in the order they are handed over.
    pub fn commit_pipelined(&self, changes: Vec<Change>) -> Result<PendingCommit, JournalError> {
        let framed_for = match self.leading.read() {
            Ok(hint) => *hint,
            Err(poisoned) => *poisoned.into_inner(),
        };
        let sealer = self.sealer();
        let sealed = changes
            .into_iter()
            .map(|change| {
                // One buffer: the record header (if framed), the seal header, the encoding
                // (sealed in place), the tag.
                let mut bytes = Vec::with_capacity(RECORD_CAPACITY_HINT);
                let seal = |buf: &mut Vec<u8>| {
                    sealer.seal_into(change.id, buf, |plain| change.encode_into(plain))
                };
                match framed_for {
                    Some(epoch) => LogRecord::encode_into(epoch, &mut bytes, seal),
                    None => seal(&mut bytes),
                }
                Sealed {
                    change,
                    bytes,
                    framed_for,
                }
            })
            .collect();
        let (reply, answer) = crossbeam_channel::bounded(1);
        self.requests
            .as_ref()
            .ok_or(JournalError::WriterStopped)?
            .send(Request::Commit { sealed, reply })
            .map_err(|_| JournalError::WriterStopped)?;
        Ok(PendingCommit { answer })
    }

    /// Switches the writer's role; becoming leader durably records the epoch first.
    pub fn set_role(&self, role: CommitRoute) -> Result<(), JournalError> {
        let (reply, answer) = crossbeam_channel::bounded(1);
        self.requests
            .as_ref()
            .ok_or(JournalError::WriterStopped)?
            .send(Request::SetRole { role, reply })
            .map_err(|_| JournalError::WriterStopped)?;
        answer.recv().map_err(|_| JournalError::WriterStopped)?
    }

    /// See [`Election::epoch`].
    pub(crate) fn epoch(&self) -> Result<Option<Epoch>, JournalError> {
        Ok(read_meta(&*self.db.get()?, META_EPOCH)?.and_then(|b| decode_epoch(&b)))
    }

    /// The HLC high-water mark: seed the device's clock with it so it never goes back.
    pub fn hlc_high_water(&self) -> Result<Option<Hlc>, JournalError> {
        let stored = read_meta(&*self.db.get()?, META_HLC)?.and_then(|b| Hlc::from_bytes(&b));
        Ok(stored.max(self.last_change_hlc()?))
    }

    fn decode_entry(sealer: &Sealer, place: Placement, bytes: &[u8]) -> ReadEntry {
        let (record_place, epoch, sealed) = match place {
            Placement::Log(lsn) => {
                let rec = LogRecord::decode(bytes).map_err(|e| JournalError::BadRecord {
                    place: RecordPlace::Log(lsn),
                    reason: e.to_string(),
                })?;
                (RecordPlace::Log(lsn), Some(rec.epoch), rec.sealed)
            }
            Placement::Offline(seq) => {
                let rec = LocalRecord::decode(bytes).map_err(|e| JournalError::BadRecord {
                    place: RecordPlace::Offline(seq),
                    reason: e.to_string(),
                })?;
                (RecordPlace::Offline(seq), None, rec.sealed)
            }
        };
        let bad = |reason: String| JournalError::BadRecord {
            place: record_place,
            reason,
        };
        let (id, plain) = sealer.open(sealed).map_err(bad)?;
        let change = Change::decode(&plain).map_err(|e| bad(e.to_string()))?;
        if change.id != id {
            return Err(bad("change id differs from the sealed header".into()));
        }
        Ok((place, epoch, change))
    }

    /// See [`crate::ReplicatedLog::read`].
    pub(crate) fn read_log(&self, from: Lsn, limit: usize) -> Result<Vec<ReadEntry>, JournalError> {
        self.check_not_compacted(from)?;
        guarded(|| {
            let txn = self.db.get()?.begin_read().map_err(storage)?;
            let log = txn.open_table(LOG).map_err(storage)?;
            let mut out = Vec::with_capacity(limit.min(65_536));
            let sealer = self.sealer();
            log_table::visit(&log, from.0, |lsn, record| {
                if out.len() >= limit {
                    return Ok(ControlFlow::Break(()));
                }
                match record {
                    Ok(bytes) if LogRecord::is_barrier(bytes) => {}
                    Ok(bytes) => {
                        out.push(Self::decode_entry(&sealer, Placement::Log(Lsn(lsn)), bytes))
                    }
                    Err(e) => out.push(Err(damaged_page(Lsn(lsn), &e))),
                }
                Ok(ControlFlow::Continue(()))
            })?;
            Ok(out)
        })
    }

    /// See [`crate::ReplicatedLog::read_raw`].
    pub(crate) fn read_log_raw(
        &self,
        from: Lsn,
        limit: usize,
    ) -> Result<Vec<(Lsn, Vec<u8>)>, JournalError> {
        self.check_not_compacted(from)?;
        guarded(|| {
            let txn = self.db.get()?.begin_read().map_err(storage)?;
            let log = txn.open_table(LOG).map_err(storage)?;
            let mut out: Vec<(Lsn, Vec<u8>)> = Vec::with_capacity(limit.min(65_536));
            log_table::visit(&log, from.0, |lsn, record| {
                if out.len() >= limit {
                    return Ok(ControlFlow::Break(()));
                }
                match record {
                    Ok(bytes) if LogRecord::is_barrier(bytes) => {}
                    Ok(bytes) => out.push((Lsn(lsn), bytes.to_vec())),
                    Err(_) => out.push((Lsn(lsn), Vec::new())),
                }
                Ok(ControlFlow::Continue(()))
            })?;
            Ok(out)
        })
    }

    /// See [`crate::ReplicatedLog::open_records`].
    pub(crate) fn open_log_records(&self, raw: &[(Lsn, Vec<u8>)]) -> Vec<ReadEntry> {
        let sealer = self.sealer();
        raw.iter()
            .map(|(lsn, bytes)| {
                if bytes.is_empty() {
                    return Err(damaged_page(*lsn, &RecordError::Framing));
                }
                Self::decode_entry(&sealer, Placement::Log(*lsn), bytes)
            })
            .collect()
    }

    /// See [`OfflineJournal::read`].
    pub(crate) fn read_local(
        &self,
        from: u64,
        limit: usize,
    ) -> Result<Vec<ReadEntry>, JournalError> {
        guarded(|| {
            let txn = self.db.get()?.begin_read().map_err(storage)?;
            let local = txn.open_table(OFFLINE).map_err(storage)?;
            let mut out = Vec::new();
            let mut previous = None;
            let sealer = self.sealer();
            for item in local.range(from..).map_err(storage)?.take(limit) {
                let (k, v) = item.map_err(storage)?;
                check_order(&mut previous, k.value(), from)?;
                out.push(Self::decode_entry(
                    &sealer,
                    Placement::Offline(k.value()),
                    v.value(),
                ));
            }
            Ok(out)
        })
    }

    /// See [`OfflineJournal::read_sealed`].
    pub(crate) fn read_local_sealed(
        &self,
        from: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, JournalError> {
        guarded(|| {
            let txn = self.db.get()?.begin_read().map_err(storage)?;
            let local = txn.open_table(OFFLINE).map_err(storage)?;
            let mut out = Vec::new();
            let mut previous = None;
            for item in local.range(from..).map_err(storage)?.take(limit) {
                let (k, v) = item.map_err(storage)?;
                check_order(&mut previous, k.value(), from)?;
                if let Ok(record) = LocalRecord::decode(v.value()) {
                    out.push((k.value(), record.sealed.to_vec()));
                }
            }
            Ok(out)
        })
    }

    /// See [`crate::ReplicatedLog::change_ids`].
    pub(crate) fn change_ids(&self) -> Result<std::collections::HashSet<ChangeId>, JournalError> {
        let mut ids = std::collections::HashSet::new();
        self.for_each_log_index(|_, id| ids.extend(id))?;
        ids.extend(self.offline_changes()?.into_iter().map(|(id, _)| id));
        Ok(ids)
    }

    /// Counters for `status`.
    pub fn stats(&self) -> Result<JournalStats, JournalError> {
        guarded(|| {
            let txn = self.db.get()?.begin_read().map_err(storage)?;
            let log = txn.open_table(LOG).map_err(storage)?;
            let local = txn.open_table(OFFLINE).map_err(storage)?;
            let (base, _) = self.log_base()?;
            let last_lsn = log_table::last_lsn(&log)?.max(base.0);
            let own_changes = read_meta(&*self.db.get()?, META_OWN_CHANGES)?
                .map(|b| decode_u64(&b))
                .unwrap_or(0);
            let dropped_log_pages = match txn.open_table(DROPPED_LOG) {
                Ok(dropped) => dropped.len().map_err(storage)?,
                Err(redb::TableError::TableDoesNotExist(_)) => 0,
                Err(e) => return Err(storage(e)),
            };
            Ok(JournalStats {
                own_changes,
                offline: local.len().map_err(storage)?,
                // The log is contiguous from its base.
                log_len: last_lsn - base.0,
                last_lsn: Lsn(last_lsn),
                base,
                dropped_log_pages,
            })
        })
    }

    /// Reads every record, checking checksums, seals and encodings, and every log page's
    /// binding to its position (see [`crate::binding`]). Reports each fault with its position;
    /// never stops at the first.
    pub fn verify(&self) -> Result<VerifyReport, JournalError> {
        let mut report = VerifyReport::default();
        let first = Lsn(self.log_base()?.0 .0 + 1);
        for (at, fault) in self.binding_faults(first, Lsn(u64::MAX))? {
            report.faults.push((
                RecordPlace::Log(Lsn(at)),
                format!("log page at {at}: {fault}"),
            ));
        }
        let mut from = first;
        loop {
            let chunk = self.read_log_raw(from, 8192)?;
            let Some((last, _)) = chunk.last() else { break };
            from = Lsn(last.0 + 1);
            for ((lsn, _), opened) in chunk.iter().zip(self.open_log_records(&chunk)) {
                report.log_records += 1;
                if let Err(err) = opened {
                    report
                        .faults
                        .push((RecordPlace::Log(*lsn), err.to_string()));
                }
            }
        }
        for entry in self.read_local(0, usize::MAX)? {
            report.local_records += 1;
            if let Err(JournalError::BadRecord { place, reason }) = entry {
                report.faults.push((place, reason));
            }
        }
        Ok(report)
    }

    /// The first log record that is damaged (its page unreadable, or it fails its checksum,
    /// its seal or its encoding), reading the whole log; `None` if every one is sound. A record
    /// sealed under a key this device does not hold yet is not damaged.
    pub fn first_damaged_log_record(&self) -> Result<Option<Lsn>, JournalError> {
        let mut from = Lsn(self.log_base()?.0 .0 + 1);
        loop {
            match self.check_log(from, 8192)? {
                LogCheck {
                    damaged: Some(lsn), ..
                } => return Ok(Some(lsn)),
                LogCheck {
                    next: Some(next), ..
                } => from = next,
                LogCheck { .. } => return Ok(None),
            }
        }
    }

    /// Checks up to `limit` log records from `from` (a position compacted away starts at the
    /// base): the first damaged one, or where to go on (`None` at the log's end).
    pub fn check_log(&self, from: Lsn, limit: usize) -> Result<LogCheck, JournalError> {
        let from = from.max(Lsn(self.log_base()?.0 .0 + 1));
        let chunk = match self.read_log_raw(from, limit) {
            Ok(chunk) => chunk,
            Err(JournalError::BadRecord {
                place: RecordPlace::Log(lsn),
                ..
            }) => {
                return Ok(LogCheck {
                    damaged: Some(lsn),
                    next: None,
                })
            }
            Err(e) => return Err(e),
        };
        let record =
            chunk
                .iter()
                .zip(self.open_log_records(&chunk))
                .find_map(|((lsn, _), opened)| {
                    matches!(opened, Err(JournalError::BadRecord { .. })).then_some(*lsn)
                });
        let Some((to, _)) = chunk.last() else {
            return Ok(LogCheck {
                damaged: None,
                next: None,
            });
        };
        let bound = self
            .binding_faults(from, *to)?
            .first()
            .map(|(at, _)| Lsn(*at));
        match record.into_iter().chain(bound).min() {
            Some(damaged) => Ok(LogCheck {
                damaged: Some(damaged),
                next: None,
            }),
            None => Ok(LogCheck {
                damaged: None,
                next: Some(Lsn(to.0 + 1)),
            }),
        }
    }

    /// The pages holding `from..=to` whose binding to their positions fails (see
    /// [`crate::binding`]), sorted by position.
    fn binding_faults(
        &self,
        from: Lsn,
        to: Lsn,
    ) -> Result<Vec<(u64, crate::binding::BindingFault)>, JournalError> {
        let sealer = self.sealer();
        let mut faults = guarded(|| {
            let txn = self.db.get()?.begin_read().map_err(storage)?;
            let log = txn.open_table(LOG).map_err(storage)?;
            log_table::check_bindings(&log, from.0, to.0, sealer.page_keys())
        })?;
        faults.sort_by_key(|(at, _)| *at);
        Ok(faults)
    }

    fn open_incoming(&self, place: RecordPlace, sealed: &[u8]) -> Result<Change, JournalError> {
        let bad = |reason: String| JournalError::BadRecord { place, reason };
        let sealer = self.sealer();
        if let Some(key_id) = sealer.unknown_key(sealed) {
            return Err(JournalError::UnknownKey { place, key_id });
        }
        let (id, plain) = sealer.open(sealed).map_err(bad)?;
        let change = Change::decode(&plain).map_err(|e| bad(e.to_string()))?;
        if change.id != id {
            return Err(bad("change id differs from the sealed header".into()));
        }
        // Another device's change only: this device's own clock may be ahead (its changes then
        // wait elsewhere, refused by the others, until it is fixed) but it never refuses them.
        let now = now_ms();
        if change.origin() != self.device
            && change.hlc.physical_ms > now.saturating_add(CLOCK_AHEAD_MAX_MS)
        {
            return Err(JournalError::ClockAhead {
                place,
                ahead_ms: change.hlc.physical_ms - now,
            });
        }
        Ok(change)
    }

    pub(crate) fn ask<T>(
        &self,
        make: impl FnOnce(crossbeam_channel::Sender<Result<T, JournalError>>) -> Request,
    ) -> Result<T, JournalError> {
        let (reply, answer) = crossbeam_channel::bounded(1);
        self.requests
            .as_ref()
            .ok_or(JournalError::WriterStopped)?
            .send(make(reply))
            .map_err(|_| JournalError::WriterStopped)?;
        answer.recv().map_err(|_| JournalError::WriterStopped)?
    }

    /// See [`crate::ReplicatedLog::append`].
    pub(crate) fn append_replicated(
        &self,
        first: Lsn,
        entries: Vec<(Epoch, Vec<u8>)>,
    ) -> Result<(), JournalError> {
        let checked = self.check_replicated(first, entries)?;
        self.append_checked(checked)
    }

    /// See [`crate::ReplicatedLog::check`].
    pub(crate) fn check_replicated(
        &self,
        first: Lsn,
        entries: Vec<(Epoch, Vec<u8>)>,
    ) -> Result<CheckedEntries, JournalError> {
        check_each(first, entries, |place, bytes| {
            self.open_incoming(place, bytes).map(Some)
        })
    }

    /// See [`crate::ReplicatedLog::check_seals`].
    pub(crate) fn check_seals(
        &self,
        first: Lsn,
        entries: Vec<(Epoch, Vec<u8>)>,
    ) -> Result<CheckedEntries, JournalError> {
        let sealer = self.sealer();
        check_each(first, entries, |place, bytes| {
            sealer
                .open(bytes)
                .map(|_| None)
                .map_err(|reason| JournalError::BadRecord { place, reason })
        })
    }

    /// Raises the HLC high-water mark (what this device's clock starts from) to `hlc`, durably;
    /// a lower `hlc` changes nothing.
    pub fn raise_hlc_high_water(&self, hlc: Hlc) -> Result<(), JournalError> {
        self.ask(|reply| Request::RaiseHlc { hlc, reply })
    }

    /// See [`crate::ReplicatedLog::append_checked`].
    pub(crate) fn append_checked(&self, checked: CheckedEntries) -> Result<(), JournalError> {
        let CheckedEntries { first, entries } = checked;
        self.ask(|reply| Request::AppendReplicated {
            first,
            entries,
            reply,
        })
    }

    /// See [`crate::ReplicatedLog::truncate_after`].
    pub(crate) fn truncate_after(
        &self,
        keep: Lsn,
        dropped: &[ChangeId],
    ) -> Result<Vec<ChangeId>, JournalError> {
        // Compacted positions are settled: never truncated.
        let (base, _) = self.log_base()?;
        if keep < base {
            return Err(JournalError::Compacted { base, asked: keep });
        }
        let dropped = dropped.iter().copied().collect();
        self.ask(|reply| Request::Truncate {
            keep,
            dropped,
            reply,
        })
    }

    /// See [`crate::ReplicatedLog::epoch_at`].
    pub(crate) fn epoch_at(&self, lsn: Lsn) -> Result<Option<Epoch>, JournalError> {
        let (base, base_epoch) = self.log_base()?;
        if lsn == base && base.0 > 0 {
            return Ok(Some(base_epoch));
        }
        if lsn < base {
            return Ok(None);
        }
        guarded(|| {
            let txn = self.db.get()?.begin_read().map_err(storage)?;
            let log = txn.open_table(LOG).map_err(storage)?;
            let Some(bytes) = log_table::get(&log, lsn.0)? else {
                return Ok(None);
            };
            let bytes = bytes.map_err(|e| damaged_page(lsn, &e))?;
            let record = LogRecord::decode(&bytes).map_err(|e| JournalError::BadRecord {
                place: RecordPlace::Log(lsn),
                reason: e.to_string(),
            })?;
            Ok(Some(record.epoch))
        })
    }

    /// After a truncation, the position replay must start from (at most); cleared by
    /// [`Journal::clear_replay_floor`] once the projections have caught up.
    pub fn replay_floor(&self) -> Result<Option<Lsn>, JournalError> {
        Ok(read_meta(&*self.db.get()?, META_REPLAY_FROM)?.map(|b| Lsn(decode_u64(&b))))
    }

    /// Forgets the replay floor.
    pub fn clear_replay_floor(&self) -> Result<(), JournalError> {
        self.db.write(|db| {
            let mut txn = WriteTxn::begin(db)?;
            txn.set_durability(Durability::Immediate).map_err(storage)?;
            {
                let mut meta = txn.open_table(META).map_err(storage)?;
                meta.remove(META_REPLAY_FROM).map_err(storage)?;
            }
            txn.commit().map_err(storage)?;
            Ok(())
        })
    }

    /// How many truncations dropped other devices' changes since the projections were last
    /// rebuilt (0: none). Projections may have applied those changes, and then show what no
    /// log holds until their makers send them again, or for good if they never do (a device
    /// gone, or a paired device that forged them): rebuild them from the journal, then call
    /// [`Journal::projections_rebuilt`] with the count read before.
    pub fn projections_stale(&self) -> Result<u64, JournalError> {
        Ok(read_meta(&*self.db.get()?, META_PROJECTIONS_STALE)?.map_or(0, |b| decode_u64(&b)))
    }

    /// Forgets the count of [`Journal::projections_stale`] if it is still `seen`; returns
    /// whether it did (if not, a truncation since then wants another rebuild).
    pub fn projections_rebuilt(&self, seen: u64) -> Result<bool, JournalError> {
        self.db.write(|db| {
            let mut txn = WriteTxn::begin(db)?;
            txn.set_durability(Durability::Immediate).map_err(storage)?;
            let cleared = {
                let mut meta = txn.open_table(META).map_err(storage)?;
                let now = meta
                    .get(META_PROJECTIONS_STALE)
                    .map_err(storage)?
                    .map_or(0, |v| decode_u64(v.value()));
                if now == seen {
                    meta.remove(META_PROJECTIONS_STALE).map_err(storage)?;
                }
                now == seen
            };
            txn.commit().map_err(storage)?;
            Ok(cleared)
        })
    }

    /// See [`Election::store_epoch`].
    pub(crate) fn store_epoch(&self, epoch: Epoch) -> Result<(), JournalError> {
        self.db.write(|db| write_epoch(db, epoch))
    }

    /// Checks a sealed change received from a peer (it opens under this library's key and
    /// decodes) and returns it.
    pub fn check_sealed(&self, sealed: &[u8]) -> Result<Change, JournalError> {
        self.open_incoming(RecordPlace::Incoming(0), sealed)
    }

    /// See [`Election::store`].
    pub(crate) fn store_election(&self, epoch: Epoch, voted: Epoch) -> Result<(), JournalError> {
        self.db.write(|db| {
            let mut txn = WriteTxn::begin(db)?;
            txn.set_durability(Durability::Immediate).map_err(storage)?;
            {
                let mut meta = txn.open_table(META).map_err(storage)?;
                meta.insert(META_EPOCH, &epoch_bytes(epoch)[..])
                    .map_err(storage)?;
                meta.insert(META_VOTED, &epoch_bytes(voted)[..])
                    .map_err(storage)?;
            }
            txn.commit().map_err(storage)?;
            Ok(())
        })
    }

    /// See [`Election::vote_floor`].
    pub(crate) fn vote_floor(&self) -> Result<Option<(Epoch, Lsn)>, JournalError> {
        let bytes = read_meta(&*self.db.get()?, crate::tables::META_VOTE_FLOOR)?;
        match bytes {
            None => Ok(None),
            Some(bytes) => crate::compact::decode_base(Some(&bytes)).map(|(lsn, e)| Some((e, lsn))),
        }
    }

    /// See [`Election::store_vote_floor`].
    pub(crate) fn store_vote_floor(&self, floor: (Epoch, Lsn)) -> Result<(), JournalError> {
        let floor = self.vote_floor()?.map_or(floor, |stored| stored.max(floor));
        self.db.write(|db| {
            let mut txn = WriteTxn::begin(db)?;
            txn.set_durability(Durability::Immediate).map_err(storage)?;
            txn.open_table(META)
                .map_err(storage)?
                .insert(
                    crate::tables::META_VOTE_FLOOR,
                    &crate::compact::position_bytes(floor.1, floor.0)[..],
                )
                .map_err(storage)?;
            txn.commit().map_err(storage)?;
            Ok(())
        })
    }

    /// See [`Election::forget_vote_floor`].
    pub(crate) fn forget_vote_floor(&self) -> Result<Option<(Epoch, Lsn)>, JournalError> {
        let floor = self.vote_floor()?;
        if floor.is_some() {
            self.db.write(|db| {
                let mut txn = WriteTxn::begin(db)?;
                txn.set_durability(Durability::Immediate).map_err(storage)?;
                txn.open_table(META)
                    .map_err(storage)?
                    .remove(crate::tables::META_VOTE_FLOOR)
                    .map_err(storage)?;
                txn.commit().map_err(storage)?;
                Ok(())
            })?;
        }
        Ok(floor)
    }

    /// See [`Election::voted`].
    pub(crate) fn voted(&self) -> Result<Option<Epoch>, JournalError> {
        Ok(read_meta(&*self.db.get()?, META_VOTED)?.and_then(|b| decode_epoch(&b)))
    }

    /// See [`crate::ReplicatedLog::entries`].
    pub(crate) fn log_entries(
        &self,
        from: Lsn,
        limit: usize,
    ) -> Result<Vec<(Lsn, Epoch, Vec<u8>)>, JournalError> {
        self.check_not_compacted(from)?;
        guarded(|| {
            let txn = self.db.get()?.begin_read().map_err(storage)?;
            let log = txn.open_table(LOG).map_err(storage)?;
            let mut out = Vec::with_capacity(limit.min(65_536));
            log_table::visit(&log, from.0, |lsn, record| {
                if out.len() >= limit {
                    return Ok(ControlFlow::Break(()));
                }
                let lsn = Lsn(lsn);
                let bytes = record.map_err(|e| damaged_page(lsn, &e))?;
                let record = LogRecord::decode(bytes).map_err(|e| JournalError::BadRecord {
                    place: RecordPlace::Log(lsn),
                    reason: e.to_string(),
                })?;
                out.push((lsn, record.epoch, record.sealed.to_vec()));
                Ok(ControlFlow::Continue(()))
            })?;
            Ok(out)
        })
    }

    /// See [`crate::ReplicatedLog::index`].
    pub(crate) fn log_index(&self) -> Result<Vec<(Epoch, Option<ChangeId>)>, JournalError> {
        let mut out = Vec::new();
        self.for_each_log_index(|epoch, id| out.push((epoch, id)))?;
        Ok(out)
    }

    /// See [`crate::ReplicatedLog::for_each_index`].
    pub(crate) fn for_each_log_index(
        &self,
        visit: impl FnMut(Epoch, Option<ChangeId>),
    ) -> Result<(), JournalError> {
        let (base, _) = self.log_base()?;
        self.for_each_log_index_from(Lsn(base.0 + 1), visit)
    }

    /// [`crate::ReplicatedLog::for_each_index`] from position `from` on.
    pub(crate) fn for_each_log_index_from(
        &self,
        from: Lsn,
        mut visit: impl FnMut(Epoch, Option<ChangeId>),
    ) -> Result<(), JournalError> {
        guarded(|| {
            let txn = self.db.get()?.begin_read().map_err(storage)?;
            let log = txn.open_table(LOG).map_err(storage)?;
            let mut expected = from.0;
            log_table::visit(&log, from.0, |lsn, record| {
                if lsn != expected {
                    return Err(JournalError::Corrupt(format!(
                        "a gap in the log at {expected}"
                    )));
                }
                expected += 1;
                let bytes = record.map_err(|e| damaged_page(Lsn(lsn), &e))?;
                let record = LogRecord::decode(bytes).map_err(|e| JournalError::BadRecord {
                    place: RecordPlace::Log(Lsn(lsn)),
                    reason: e.to_string(),
                })?;
                visit(record.epoch, Sealer::peek_change_id(record.sealed));
                Ok(ControlFlow::Continue(()))
            })?;
            Ok(())
        })
    }

    /// See [`OfflineJournal::changes`].
    /// See [`crate::OfflineJournal::extent`].
    pub(crate) fn offline_extent(&self) -> Result<(u64, Option<u64>), JournalError> {
        guarded(|| {
            let txn = self.db.get()?.begin_read().map_err(storage)?;
            let local = txn.open_table(OFFLINE).map_err(storage)?;
            let last = local.last().map_err(storage)?.map(|(k, _)| k.value());
            Ok((local.len().map_err(storage)?, last))
        })
    }

    pub(crate) fn offline_changes(&self) -> Result<Vec<(ChangeId, Vec<u8>)>, JournalError> {
        Ok(self
            .read_local_sealed(0, usize::MAX)?
            .into_iter()
            .filter_map(|(_, sealed)| Some((Sealer::peek_change_id(&sealed)?, sealed)))
            .collect())
    }

    /// Stops the writer after it has answered every request already sent.
    pub fn close(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.requests = None;
        if let Some(handle) = self.writer.take() {
            let _ = handle.join();
        }
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Where commits go when the caller does not say: a device leads only an epoch it won (the
/// founder's epoch 1, or one whose barrier is in the log; a candidacy interrupted by a crash is
/// not a win); a new journal is the founder's.
fn initial_route(
    db: &Database,
    stored_epoch: Option<Epoch>,
    device: DeviceId,
) -> Result<CommitRoute, JournalError> {
    Ok(match stored_epoch {
        Some(epoch) if epoch.device == device => {
            if epoch.counter == 1 || guarded(|| won(db, epoch))? {
                CommitRoute::Log(epoch)
            } else {
                CommitRoute::Offline
            }
        }
        Some(_) => CommitRoute::Offline,
        // No epoch stored: a new journal founds the library; one that holds a log already (a
        // joining device's, cut before its epoch was stored) follows whoever leads it.
        None if guarded(|| log_is_empty(db))? => CommitRoute::Log(Epoch { counter: 1, device }),
        None => CommitRoute::Offline,
    })
}

/// Whether the log holds nothing and starts at the beginning (no compaction base).
fn log_is_empty(db: &Database) -> Result<bool, JournalError> {
    let txn = db.begin_read().map_err(storage)?;
    let log = txn.open_table(LOG).map_err(storage)?;
    let no_base = read_meta(db, crate::tables::META_LOG_BASE)?.is_none();
    Ok(log.first().map_err(storage)?.is_none() && no_base)
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_schema::Tag;

    #[test]
    fn a_record_framed_for_a_stale_epoch_is_reframed_for_the_writers_epoch() {
        let dir = tempfile::tempdir().expect("tempdir");
        let device = DeviceId([5; 32]);
        let journal = Journal::open(
            &dir.path().join("journal.redb"),
            LibraryId(Uuid::new_v4()),
            &LibraryKey::generate(),
            device,
            JournalOptions::default(),
        )
        .expect("opens");
        let current = Epoch { counter: 3, device };
        journal.set_role(CommitRoute::Log(current)).expect("leads");
        let tag = Tag {
            uuid: Uuid::now_v7(),
            name: "t".into(),
            color: None,
            created_ms: 1,
        };
        let hlc = Hlc {
            physical_ms: 10,
            counter: 0,
            device,
        };
        let change = Change::upsert(ChangeId::new(), hlc, &tag).expect("tag has a uuid");
        // Sealed while the writer led epoch 1 (as a sealing thread could see it in a race).
        let stale = Epoch { counter: 1, device };
        let sealed = journal.sealer().seal(change.id, &change.encode());
        let (reply, answer) = crossbeam_channel::bounded(1);
        journal
            .requests
            .as_ref()
            .expect("writer runs")
            .send(Request::Commit {
                sealed: vec![Sealed {
                    change: change.clone(),
                    bytes: LogRecord::encode(stale, &sealed),
                    framed_for: Some(stale),
                }],
                reply,
            })
            .expect("sent");
        let placed = answer.recv().expect("answered").expect("durable");
        assert_eq!(placed, vec![Placement::Log(Lsn(1))]);
        let read = journal.read_log(Lsn(1), 10).expect("reads");
        let (place, epoch, read_change) = read
            .into_iter()
            .next()
            .expect("one change")
            .expect("record is sound");
        assert_eq!(place, Placement::Log(Lsn(1)));
        assert_eq!(epoch, Some(current));
        assert_eq!(read_change, change);
        // And a commit through the API is framed for the current epoch directly.
        journal.commit(vec![change.clone()]).expect("commits");
        assert_eq!(
            *journal.leading.read().expect("hint"),
            Some(current),
            "the sealing threads see the writer's epoch"
        );
        journal.close();
    }

    #[test]
    fn opening_drops_the_legacy_change_index() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("journal.redb");
        let (library, key, device) = (
            LibraryId(Uuid::new_v4()),
            LibraryKey::generate(),
            DeviceId([6; 32]),
        );
        Journal::open(&path, library, &key, device, JournalOptions::default())
            .expect("creates")
            .close();
        {
            // What an early build left: an index table beside the log.
            let db = Database::create(&path).expect("opens the file");
            let txn = db.begin_write().expect("write txn");
            txn.open_table(LEGACY_CHANGE_INDEX)
                .expect("table")
                .insert(7u128, 1u64)
                .expect("inserts");
            txn.commit().expect("commits");
        }
        Journal::open(&path, library, &key, device, JournalOptions::default())
            .expect("reopens")
            .close();
        let db = Database::create(&path).expect("opens the file");
        let txn = db.begin_read().expect("read txn");
        assert!(matches!(
            txn.open_table(LEGACY_CHANGE_INDEX),
            Err(redb::TableError::TableDoesNotExist(_))
        ));
    }
}
