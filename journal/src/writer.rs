//! The single writer: group-commits changes handed over a channel, durably, in arrival order.
//!
//! Callers seal their changes on their own thread and send them with a reply channel. The writer
//! drains every request waiting (up to [`BATCH_CHANGES_MAX`] changes), writes them in one redb
//! transaction with `Durability::Immediate`, and only then answers. An answer of `Ok` is the
//! acknowledgement: the change is durable.

use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};
use keel_schema::{Change, ChangeId, DeviceId, Epoch, Hlc, Lsn};
use redb::{Durability, ReadableDatabase, ReadableTable};

use crate::compact::LogStart;
use crate::db::DbHandle;
use crate::error::{guarded, storage, JournalError, WriteTxn};
use crate::log_table::PageWriter;
use crate::record::{LocalRecord, LogRecord, PushState, LOG_HEADER_LEN};
use crate::tables::{LOG, META, META_EPOCH, META_HLC, META_OWN_CHANGES, OFFLINE};

/// Most changes written in one transaction.
pub const BATCH_CHANGES_MAX: usize = 16 * 1024;
/// Most requests waiting for the writer before callers block.
pub const QUEUE_REQUESTS_MAX: usize = 4096;

/// Where a committed change was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Placement {
    /// In the leader log at this position.
    Log(Lsn),
    /// In the offline journal at this sequence number, waiting to be pushed to a leader.
    Offline(u64),
}

/// Where the writer puts this device's commits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitRoute {
    /// Into the log, stamped with this epoch: this device leads it.
    Log(Epoch),
    /// Into the offline journal, until a leader sequences them.
    Offline,
}

/// A change sealed by its caller, ready for the writer.
///
/// When the caller saw the writer leading, it also frames the log record (epoch and checksum) on
/// its own thread, so the single writer only inserts it; the writer re-frames it if its role
/// changed in between.
pub(crate) struct Sealed {
    pub(crate) change: Change,
    /// The sealed change, or the whole log record when `framed_for` is set.
    pub(crate) bytes: Vec<u8>,
    /// The epoch `bytes` is framed for as a log record.
    pub(crate) framed_for: Option<Epoch>,
}

impl Sealed {
    /// The sealed change alone.
    pub(crate) fn sealed(&self) -> &[u8] {
        match self.framed_for {
            Some(_) => self.bytes.get(LOG_HEADER_LEN..).unwrap_or_default(),
            None => &self.bytes,
        }
    }
}

/// The epoch the writer leads in (`None` while it follows), shared with the threads that seal, so
/// they can frame log records in advance. Only a hint: the writer checks it against its role.
pub(crate) type LeadingHint = Arc<std::sync::RwLock<Option<Epoch>>>;

/// A batch of changes that became durable, in order, for whoever applies them.
///
/// One exception: a follower's segment from its leader is sent while its transaction commits
/// (see [`CommittedBatch::early`]).
#[derive(Debug)]
pub struct CommittedBatch {
    /// Its number: batches are numbered 1, 2, … in the order they are sent
    /// (see [`crate::Journal::batches_sent`]).
    pub seq: u64,
    /// Each change with where it was written.
    pub entries: Vec<(Placement, Change)>,
    /// The last log position this batch wrote, epoch barriers included (`None`: it wrote no log
    /// entry). A barrier has no change, so without this whoever applies the batches would stop
    /// short of a barrier that ends the log.
    pub log_through: Option<Lsn>,
    /// `Some(first log position of the batch)` if it was sent before its transaction committed:
    /// log entries a follower copied from its leader, handed over while the commit writes and
    /// syncs them, so that applying them overlaps the sync. If the device stops before the
    /// commit ends, the projections may hold entries the journal does not; whoever applies such
    /// a batch records that (see `Projections::mark_ahead_from`), so the next open can tell
    /// this from a damaged journal. The next batch is only written after this one committed.
    pub early: Option<Lsn>,
}

/// Log entries to append: epoch, the change (`None` for a barrier) and its sealed bytes.
pub(crate) type AppendEntries = Vec<(Epoch, Option<Change>, Vec<u8>)>;
/// Changes written, with where.
type Placed = Vec<(Placement, Change)>;
/// An append waiting for the writer: first position, entries, reply.
type Append = (Lsn, AppendEntries, Sender<Result<(), JournalError>>);

/// The answer channel of one commit request.
pub(crate) type CommitReply = Sender<Result<Vec<Placement>, JournalError>>;

pub(crate) enum Request {
    Commit {
        sealed: Vec<Sealed>,
        reply: CommitReply,
    },
    SetRole {
        role: CommitRoute,
        reply: Sender<Result<(), JournalError>>,
    },
    AppendReplicated {
        first: Lsn,
        entries: AppendEntries,
        reply: Sender<Result<(), JournalError>>,
    },
    Truncate {
        keep: Lsn,
        /// Removed changes not to return to the offline journal.
        dropped: std::collections::HashSet<keel_schema::ChangeId>,
        reply: Sender<Result<Vec<keel_schema::ChangeId>, JournalError>>,
    },
    /// Makes an empty log start after a base (a joining device's, from its sender's).
    StartAfter {
        base: Lsn,
        epoch: Epoch,
        head: Epoch,
        reply: Sender<Result<(), JournalError>>,
    },
    /// Drops the whole log and makes it start after a base (a device behind its leader's
    /// compaction point, backfilled from a snapshot at that base).
    /// Without a base (`to: None`): drops the whole log and its base (a join cut before the
    /// snapshot that holds what came before the base was stored).
    Rebase {
        to: Option<LogStart>,
        led_by: DeviceId,
        reply: Sender<Result<Vec<ChangeId>, JournalError>>,
    },
    RaiseHlc {
        hlc: Hlc,
        reply: Sender<Result<(), JournalError>>,
    },
    /// Deletes the log a compaction moved aside, a slice at a time between requests; answered
    /// at once.
    DeleteDropped {
        reply: Sender<Result<(), JournalError>>,
    },
    /// Answered once every request before it is done (commits included).
    Barrier {
        reply: Sender<Result<(), JournalError>>,
    },
}

pub(crate) struct WriterState {
    pub(crate) db: Arc<DbHandle>,
    pub(crate) role: CommitRoute,
    pub(crate) next_lsn: u64,
    pub(crate) next_local: u64,
    pub(crate) hlc_high_water: Hlc,
    pub(crate) own_changes: u64,
    /// This device (its changes appended to the log without passing through the offline
    /// journal are counted in `own_changes` there).
    pub(crate) device: keel_schema::DeviceId,
    pub(crate) committed: Option<Sender<CommittedBatch>>,
    /// Bounds what `committed` holds, in changes.
    pub(crate) budget: Option<Arc<crate::ApplyBudget>>,
    /// How many batches were sent to `committed` (shared with the `Journal` handle).
    pub(crate) sent: Arc<std::sync::atomic::AtomicU64>,
    /// The role as the sealing threads see it.
    pub(crate) leading: LeadingHint,
    /// A write failed and the database was not read since: the counters may not be its own.
    pub(crate) stale: bool,
    /// The journal's sealer: log pages are bound under its keys.
    pub(crate) sealer: crate::store::SealerSlot,
    /// `next_lsn` and the link of the record before it, as this writer's last write left them:
    /// the next page's link without reading the last page back (after a join's direct writes
    /// it is not in the page cache: reading it before every append cost about 15% of a join).
    /// Forgotten whenever `next_lsn` moves otherwise.
    pub(crate) tail: Option<(u64, [u8; crate::page::LINK_LEN])>,
    /// A log a rebase or a compaction dropped is being deleted, a slice at a time, while no
    /// request waits.
    pub(crate) dropping: bool,
}

/// Durably records `epoch` as the current epoch.
pub(crate) fn write_epoch(db: &redb::Database, epoch: Epoch) -> Result<(), JournalError> {
    let mut txn = WriteTxn::begin(db)?;
    txn.set_durability(Durability::Immediate).map_err(storage)?;
    {
        let mut meta = txn.open_table(META).map_err(storage)?;
        meta.insert(META_EPOCH, &epoch_bytes(epoch)[..])
            .map_err(storage)?;
    }
    txn.commit().map_err(storage)?;
    Ok(())
}

pub(crate) fn epoch_bytes(epoch: Epoch) -> [u8; 40] {
    let mut out = [0u8; 40];
    out[..8].copy_from_slice(&epoch.counter.to_be_bytes());
    out[8..].copy_from_slice(&epoch.device.0);
    out
}

impl WriterState {
    pub(crate) fn run(mut self, requests: Receiver<Request>) {
        while let Some(first) = self.next_request(&requests) {
            let mut commits: Vec<(Vec<Sealed>, CommitReply)> = Vec::new();
            let mut pending = Some(first);
            let mut total = 0usize;
            while let Some(request) = pending.take() {
                match request {
                    Request::Commit { sealed, reply } => {
                        total += sealed.len();
                        commits.push((sealed, reply));
                    }
                    Request::SetRole { role, reply } => {
                        self.flush(&mut commits);
                        let result = guarded(|| self.set_role(role));
                        let _ = reply.send(self.reopened_after(result));
                    }
                    Request::AppendReplicated {
                        first,
                        entries,
                        reply,
                    } => {
                        // One transaction (one sync) for the waiting commits and the append.
                        self.flush_with(&mut commits, Some((first, entries, reply)));
                    }
                    Request::Truncate {
                        keep,
                        dropped,
                        reply,
                    } => {
                        self.flush(&mut commits);
                        let result = guarded(|| self.truncate_after(keep, &dropped));
                        let _ = reply.send(self.reopened_after(result));
                    }
                    Request::StartAfter {
                        base,
                        epoch,
                        head,
                        reply,
                    } => {
                        self.flush(&mut commits);
                        let result = guarded(|| self.start_after(base, epoch, head));
                        let _ = reply.send(self.reopened_after(result));
                    }
                    Request::Rebase { to, led_by, reply } => {
                        self.flush(&mut commits);
                        let rebased = guarded(|| self.rebase(to, led_by));
                        let rebased = self.reopened_after(rebased);
                        // The old log goes a slice at a time between requests (see
                        // `next_request`): deleting a long log whole held the next request up
                        // for about a second.
                        self.dropping |= rebased.is_ok();
                        let _ = reply.send(rebased);
                    }
                    Request::RaiseHlc { hlc, reply } => {
                        self.flush(&mut commits);
                        let result = guarded(|| self.raise_hlc(hlc));
                        let _ = reply.send(self.reopened_after(result));
                    }
                    Request::DeleteDropped { reply } => {
                        self.dropping = true;
                        let _ = reply.send(Ok(()));
                    }
                    Request::Barrier { reply } => {
                        self.flush(&mut commits);
                        let _ = reply.send(Ok(()));
                    }
                }
                if total < BATCH_CHANGES_MAX {
                    pending = requests.try_recv().ok();
                }
            }
            self.flush(&mut commits);
        }
    }

    /// The next request; while a dropped log is being deleted, a slice of it goes each time
    /// none waits. `None` once every sender is gone (the rest of a dropped log deleted first).
    fn next_request(&mut self, requests: &Receiver<Request>) -> Option<Request> {
        while self.dropping {
            match requests.try_recv() {
                Ok(request) => return Some(request),
                Err(crossbeam_channel::TryRecvError::Empty) => self.delete_a_dropped_slice(),
                Err(crossbeam_channel::TryRecvError::Disconnected) => {
                    while self.dropping {
                        self.delete_a_dropped_slice();
                    }
                    return None;
                }
            }
        }
        requests.recv().ok()
    }

    fn delete_a_dropped_slice(&mut self) {
        match guarded(|| self.delete_dropped_slice()) {
            Ok(more) => self.dropping = more,
            Err(e) => {
                // Left to the next open, which deletes it.
                tracing::warn!(error = %e, "deleting the dropped log failed");
                self.dropping = false;
            }
        }
    }

    /// Sends a durable batch to whoever applies it, numbered.
    pub(crate) fn send_batch(
        &mut self,
        entries: Vec<(Placement, Change)>,
        log_through: Option<Lsn>,
        early: Option<Lsn>,
    ) {
        use std::sync::atomic::Ordering;
        let Some(tx) = &self.committed else { return };
        let seq = self.sent.load(Ordering::SeqCst) + 1;
        let n = entries.len() as u64;
        if let Some(budget) = &self.budget {
            budget.take(n);
        }
        let batch = CommittedBatch {
            seq,
            entries,
            log_through,
            early,
        };
        if tx.send(batch).is_err() {
            if let Some(budget) = &self.budget {
                budget.give_back(n);
            }
            self.committed = None;
            return;
        }
        self.sent.store(seq, Ordering::SeqCst);
    }

    fn set_role(&mut self, role: CommitRoute) -> Result<(), JournalError> {
        if let CommitRoute::Log(epoch) = role {
            write_epoch(&*self.db.get()?, epoch)?;
        }
        self.role = role;
        self.publish_role();
        Ok(())
    }

    /// Tells the sealing threads the current role.
    pub(crate) fn publish_role(&self) {
        let epoch = match self.role {
            CommitRoute::Log(epoch) => Some(epoch),
            CommitRoute::Offline => None,
        };
        match self.leading.write() {
            Ok(mut hint) => *hint = epoch,
            Err(poisoned) => *poisoned.into_inner() = epoch,
        }
    }

    fn flush(&mut self, commits: &mut Vec<(Vec<Sealed>, CommitReply)>) {
        self.flush_with(commits, None);
    }

    fn flush_with(
        &mut self,
        commits: &mut Vec<(Vec<Sealed>, CommitReply)>,
        append: Option<Append>,
    ) {
        if commits.is_empty() && append.is_none() {
            return;
        }
        let batch = std::mem::take(commits);
        let appended_through = append.as_ref().and_then(|(first, entries, _)| {
            (!entries.is_empty()).then(|| Lsn(first.0 + entries.len() as u64 - 1))
        });
        let (append, append_reply) = match append {
            Some((first, entries, reply)) => (Some((first, entries)), Some(reply)),
            None => (None, None),
        };
        let saved = self.counters();
        // A follower's segment alone goes to the applier while it commits (see
        // `CommittedBatch::early`); nothing of this device's own is in the transaction then.
        let early = append
            .as_ref()
            .filter(|_| {
                matches!(self.role, CommitRoute::Offline)
                    && batch.is_empty()
                    && self.committed.is_some()
            })
            .map(|(first, _)| *first);
        let written = self.refresh_if_stale().and_then(|()| {
            guarded(|| {
                let (txn, placements, appended) = self.write(&batch, append)?;
                let appended = if early.is_some() {
                    self.send_batch(appended, appended_through, early);
                    Vec::new()
                } else {
                    appended
                };
                txn.commit().map_err(storage)?;
                Ok((placements, appended))
            })
        });
        match written {
            Ok((placements, appended)) => {
                let mut entries = Vec::new();
                let mut offset = 0;
                for (sealed, reply) in batch {
                    let n = sealed.len();
                    let mine = placements[offset..offset + n].to_vec();
                    offset += n;
                    let _ = reply.send(Ok(mine.clone()));
                    if self.committed.is_some() {
                        entries.extend(mine.into_iter().zip(sealed.into_iter().map(|s| s.change)));
                    }
                }
                entries.extend(appended);
                // Appended entries are handed to the applier before their writer hears back, so
                // once `append_replicated` returns, `Journal::batches_sent` counts them (what
                // `Library::flush` waits for: replicated entries have no commit position).
                if early.is_none() && (!entries.is_empty() || appended_through.is_some()) {
                    self.send_batch(entries, appended_through, None);
                }
                if let Some(reply) = append_reply {
                    let _ = reply.send(Ok(()));
                }
            }
            Err(err) => {
                if err.is_storage_failure() {
                    self.recover_after_failure(saved);
                } else {
                    self.set_counters(saved);
                }
                let reason = err.to_string();
                // An early segment may be applied already: its positions are written again
                // when the leader sends it again (applying is idempotent), or the next open
                // finds the projections marked ahead.
                tracing::error!(%reason, "journal commit failed; nothing in this batch was acknowledged");
                for (_, reply) in batch {
                    let _ = reply.send(Err(JournalError::CommitFailed(reason.clone())));
                }
                if let Some(reply) = append_reply {
                    let _ = reply.send(Err(err));
                }
            }
        }
    }

    /// The counters as this writer holds them.
    fn counters(&self) -> Counters {
        Counters {
            next_lsn: self.next_lsn,
            next_local: self.next_local,
            hlc_high_water: self.hlc_high_water,
            own_changes: self.own_changes,
        }
    }

    fn set_counters(&mut self, counters: Counters) {
        self.tail = None;
        self.next_lsn = counters.next_lsn;
        self.next_local = counters.next_local;
        self.hlc_high_water = counters.hlc_high_water;
        self.own_changes = counters.own_changes;
    }

    /// After a failed write whose counters were `before`: opens the database again (redb
    /// refuses everything after an I/O error until then), first taking back whatever of the
    /// write is in the file (its sync failed, so the disk never confirmed it: see
    /// [`take_back`]). If the database does not open, the next open takes it back, and the
    /// counters are read again before the next write ([`WriterState::refresh_if_stale`]).
    fn recover_after_failure(&mut self, before: Counters) {
        self.set_counters(before);
        self.stale = true;
        let device = self.device;
        let sealer = crate::store::current_sealer(&self.sealer);
        let undo = Box::new(move |db: &redb::Database| take_back(db, before, device, &sealer));
        if let Err(error) = self.db.reopen_undoing(undo) {
            tracing::error!(%error, "the journal could not be opened again after a failed write; commits are refused until it can");
            return;
        }
        let _ = self.refresh_if_stale();
    }

    /// Reads the counters from the database again if a failure left them in doubt.
    fn refresh_if_stale(&mut self) -> Result<(), JournalError> {
        if self.stale {
            let db = self.db.get_or_open()?;
            let counters = Counters::read(&db, self.device)?;
            self.set_counters(counters);
            self.stale = false;
        }
        Ok(())
    }

    /// `result` of a write made outside a group commit; after a failure, the database is
    /// opened again and the counters reread before the next write.
    fn reopened_after<T>(&mut self, result: Result<T, JournalError>) -> Result<T, JournalError> {
        match &result {
            Err(e) if e.is_storage_failure() => {
                self.stale = true;
                self.db.reopen_after(result)
            }
            _ => result,
        }
    }

    /// Writes `batch` and `append` in a new transaction and returns it uncommitted.
    fn write(
        &mut self,
        batch: &[(Vec<Sealed>, CommitReply)],
        append: Option<(Lsn, AppendEntries)>,
    ) -> Result<(WriteTxn, Vec<Placement>, Placed), JournalError> {
        let mut txn = WriteTxn::begin(&*self.db.get()?)?;
        txn.set_durability(Durability::Immediate).map_err(storage)?;
        let mut placements = Vec::new();
        {
            let mut log = txn.open_table(LOG).map_err(storage)?;
            let mut local = txn.open_table(OFFLINE).map_err(storage)?;
            let sealer = crate::store::current_sealer(&self.sealer);
            let mut pages = self.page_writer(&log, sealer.page_keys())?;
            for (sealed, _) in batch {
                for item in sealed {
                    if item.change.hlc > self.hlc_high_water {
                        self.hlc_high_water = item.change.hlc;
                    }
                    self.own_changes += 1;
                    match self.role {
                        CommitRoute::Log(epoch) => {
                            let lsn = self.next_lsn;
                            self.next_lsn += 1;
                            if item.framed_for == Some(epoch) {
                                pages.push(&mut log, &item.bytes)?;
                            } else {
                                pages.push_with(&mut log, |buf| {
                                    LogRecord::append_encoded(epoch, buf, |buf| {
                                        buf.extend_from_slice(item.sealed())
                                    })
                                })?;
                            }
                            placements.push(Placement::Log(Lsn(lsn)));
                        }
                        CommitRoute::Offline => {
                            let seq = self.next_local;
                            self.next_local += 1;
                            let record = LocalRecord::encode(PushState::Pending, item.sealed());
                            local.insert(seq, record.as_slice()).map_err(storage)?;
                            placements.push(Placement::Offline(seq));
                        }
                    }
                }
            }
            pages.flush(&mut log)?;
            self.tail = Some(pages.tail());
        }
        let appended = match append {
            Some((first, entries)) => self.append_in(&txn, first, entries)?,
            None => Vec::new(),
        };
        {
            let mut meta = txn.open_table(META).map_err(storage)?;
            meta.insert(META_HLC, &self.hlc_high_water.to_bytes()[..])
                .map_err(storage)?;
            meta.insert(META_OWN_CHANGES, &self.own_changes.to_be_bytes()[..])
                .map_err(storage)?;
        }
        Ok((txn, placements, appended))
    }
}

/// Takes back from `db` what a write after `before` left in it (the positions past
/// `before`'s, in the log and the offline journal), in a durable transaction. A write whose
/// sync failed may be in the file without being on the disk; nothing may read it as stored.
fn take_back(
    db: &redb::Database,
    before: Counters,
    device: DeviceId,
    sealer: &crate::Sealer,
) -> Result<(), JournalError> {
    let now = Counters::read(db, device)?;
    if (now.next_lsn, now.next_local) == (before.next_lsn, before.next_local) {
        return Ok(());
    }
    let mut txn = WriteTxn::begin(db)?;
    txn.set_durability(Durability::Immediate).map_err(storage)?;
    {
        let mut log = txn.open_table(LOG).map_err(storage)?;
        crate::log_table::split_off(
            &mut log,
            before.next_lsn.saturating_sub(1),
            sealer.page_keys(),
        )?;
        let mut local = txn.open_table(OFFLINE).map_err(storage)?;
        let taken: Vec<u64> = local
            .range(before.next_local..)
            .map_err(storage)?
            .map(|item| item.map(|(k, _)| k.value()).map_err(storage))
            .collect::<Result<_, _>>()?;
        for key in taken {
            local.remove(key).map_err(storage)?;
        }
        let mut meta = txn.open_table(META).map_err(storage)?;
        meta.insert(META_OWN_CHANGES, &before.own_changes.to_be_bytes()[..])
            .map_err(storage)?;
        // The saved index may describe positions taken back.
        txn.open_table(crate::tables::LOG_INDEX)
            .map_err(storage)?
            .remove(0)
            .map_err(storage)?;
    }
    txn.commit().map_err(storage)?;
    tracing::warn!(
        log_from = before.next_lsn,
        offline_from = before.next_local,
        "took back a write whose sync failed"
    );
    Ok(())
}

/// Where the writer goes on from, as the database holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Counters {
    pub(crate) next_lsn: u64,
    pub(crate) next_local: u64,
    pub(crate) hlc_high_water: Hlc,
    pub(crate) own_changes: u64,
}

impl Counters {
    /// Reads them from `db`, for `device`'s writer.
    pub(crate) fn read(db: &redb::Database, device: DeviceId) -> Result<Self, JournalError> {
        use crate::store::{decode_u64, read_meta};
        let (next_lsn, next_local) = guarded(|| {
            let txn = db.begin_read().map_err(storage)?;
            let log = txn.open_table(LOG).map_err(storage)?;
            let local = txn.open_table(OFFLINE).map_err(storage)?;
            Ok((crate::log_table::last_lsn(&log)? + 1, next_key(&local)?))
        })?;
        // A log compacted to its very end continues after its base.
        let base = read_meta(db, crate::tables::META_LOG_BASE)?;
        let next_lsn = next_lsn.max(crate::compact::decode_base(base.as_deref())?.0 .0 + 1);
        let hlc_high_water = read_meta(db, META_HLC)?
            .and_then(|b| Hlc::from_bytes(&b))
            .unwrap_or(Hlc {
                physical_ms: 0,
                counter: 0,
                device,
            });
        let own_changes = read_meta(db, META_OWN_CHANGES)?
            .map(|b| decode_u64(&b))
            .unwrap_or(0);
        Ok(Self {
            next_lsn,
            next_local,
            hlc_high_water,
            own_changes,
        })
    }
}

impl WriterState {
    /// A page writer continuing the log at `next_lsn`: linked from [`WriterState::tail`] when it
    /// is there, else to the last record read back from `log`.
    pub(crate) fn page_writer<'k>(
        &self,
        log: &redb::Table<'_, u64, &'static [u8]>,
        keys: &'k crate::binding::PageKeys,
    ) -> Result<PageWriter<'k>, JournalError> {
        match self.tail {
            Some((at, link)) if at == self.next_lsn => Ok(PageWriter::new(at, link, keys)),
            _ => PageWriter::after(log, self.next_lsn, keys),
        }
    }

    /// Raises the HLC high-water mark to `hlc` (no-op if it is not higher), durably.
    fn raise_hlc(&mut self, hlc: Hlc) -> Result<(), JournalError> {
        if hlc <= self.hlc_high_water {
            return Ok(());
        }
        let mut txn = WriteTxn::begin(&*self.db.get()?)?;
        txn.set_durability(Durability::Immediate).map_err(storage)?;
        {
            let mut meta = txn.open_table(META).map_err(storage)?;
            meta.insert(META_HLC, &hlc.to_bytes()[..])
                .map_err(storage)?;
        }
        txn.commit().map_err(storage)?;
        self.hlc_high_water = hlc;
        Ok(())
    }
}

/// Reads the next free key of a `u64`-keyed table.
pub(crate) fn next_key<T: ReadableTable<u64, &'static [u8]>>(
    table: &T,
) -> Result<u64, JournalError> {
    Ok(table
        .last()
        .map_err(storage)?
        .map(|(k, _)| k.value() + 1)
        .unwrap_or(1))
}
