//! Compacting the log: positions up to a base are dropped once every device has them (their
//! state is kept by the library as a snapshot), and only the base with its epoch stays. A
//! joining device's empty log can also start after a base (the sender's).

use std::ops::ControlFlow;

use keel_schema::{ChangeId, DeviceId, Epoch, Lsn};
use redb::{Durability, ReadableTable};

use crate::error::{storage, JournalError, WriteTxn};
use crate::log_table;
use crate::record::LogRecord;
use crate::replicate::is_horizon;
use crate::seal::Sealer;
use crate::store::{decode_epoch, read_meta, Journal};
use crate::tables::{
    DROPPED_LOG, FRESH_LOG, LOG, LOG_INDEX, META, META_LOG_BASE, META_LOG_HEAD, OFFLINE,
};
use crate::writer::{epoch_bytes, Request, WriterState};

/// What a compaction did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compaction {
    /// The base now.
    pub base: Lsn,
    /// Its entry's epoch.
    pub base_epoch: Epoch,
    /// Records dropped.
    pub dropped: u64,
}

/// Where a rebased log starts: after `base`, whose entry has `epoch`, in a library whose log
/// began with an entry of epoch `head`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LogStart {
    pub(crate) base: Lsn,
    pub(crate) epoch: Epoch,
    pub(crate) head: Epoch,
}

/// A position and its entry's epoch as meta stores them: 8-byte position ‖ 40-byte epoch.
pub(crate) fn position_bytes(lsn: Lsn, epoch: Epoch) -> [u8; 48] {
    let mut out = [0u8; 48];
    out[..8].copy_from_slice(&lsn.0.to_be_bytes());
    out[8..].copy_from_slice(&epoch_bytes(epoch));
    out
}

/// A position stored in meta by [`position_bytes`] (0 and the default epoch when absent).
pub(crate) fn decode_base(bytes: Option<&[u8]>) -> Result<(Lsn, Epoch), JournalError> {
    let Some(bytes) = bytes else {
        return Ok((Lsn(0), Epoch::default()));
    };
    let lsn = bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes);
    match (lsn, bytes.get(8..).and_then(decode_epoch)) {
        (Some(lsn), Some(epoch)) => Ok((Lsn(lsn), epoch)),
        _ => Err(JournalError::Corrupt(
            "the log base in meta is malformed".into(),
        )),
    }
}

impl Journal {
    /// The log's compaction base and its entry's epoch (`(0, default)` if never compacted).
    pub fn log_base(&self) -> Result<(Lsn, Epoch), JournalError> {
        decode_base(read_meta(&*self.db.get()?, META_LOG_BASE)?.as_deref())
    }

    /// See [`crate::ReplicatedLog::compact`].
    pub(crate) fn compact_log(&self, base: Lsn) -> Result<Compaction, JournalError> {
        let sealer = self.sealer();
        let (compaction, moved) = self.db.write(|db| {
            let mut txn = WriteTxn::begin(db)?;
            txn.set_durability(Durability::Immediate).map_err(storage)?;
            // Read in the transaction that moves it: two compactions see each other's base.
            let (old, old_epoch) = {
                let meta = txn.open_table(META).map_err(storage)?;
                let value = meta.get(META_LOG_BASE).map_err(storage)?;
                decode_base(value.as_ref().map(|v| v.value()))?
            };
            if base <= old {
                // Dropped unused: redb aborts it.
                drop(txn);
                let nothing = Compaction {
                    base: old,
                    base_epoch: old_epoch,
                    dropped: 0,
                };
                return Ok((nothing, false));
            }
            let done = compact_in(&txn, base, sealer.page_keys())?;
            txn.commit().map_err(storage)?;
            Ok(done)
        })?;
        if moved {
            // Without a writer (none runs), the next open deletes it.
            let _ = self.ask(|reply| Request::DeleteDropped { reply });
        }
        Ok(compaction)
    }

    /// See [`crate::ReplicatedLog::start_after`].
    pub(crate) fn start_log_after(
        &self,
        base: Lsn,
        epoch: Epoch,
        head: Epoch,
    ) -> Result<(), JournalError> {
        self.ask(|reply| Request::StartAfter {
            base,
            epoch,
            head,
            reply,
        })
    }

    /// See [`crate::ReplicatedLog::rebase`].
    pub(crate) fn rebase_log(
        &self,
        base: Lsn,
        epoch: Epoch,
        head: Epoch,
        led_by: DeviceId,
    ) -> Result<Vec<ChangeId>, JournalError> {
        let (old, _) = self.log_base()?;
        if base <= old {
            return Err(JournalError::Compaction(format!(
                "a rebase to {} is not past the base {}",
                base.0, old.0
            )));
        }
        self.ask(|reply| Request::Rebase {
            to: Some(LogStart { base, epoch, head }),
            led_by,
            reply,
        })
    }

    /// See [`crate::ReplicatedLog::forget`].
    pub(crate) fn forget_log(&self, led_by: DeviceId) -> Result<Vec<ChangeId>, JournalError> {
        self.ask(|reply| Request::Rebase {
            to: None,
            led_by,
            reply,
        })
    }

    /// See [`crate::ReplicatedLog::head`].
    pub(crate) fn log_head(&self) -> Result<Option<Epoch>, JournalError> {
        match read_meta(&*self.db.get()?, META_LOG_HEAD)? {
            Some(bytes) => Ok(decode_epoch(&bytes)),
            None => self.epoch_at(Lsn(1)),
        }
    }

    /// Whether reading from `from` reaches positions that were compacted away.
    pub(crate) fn check_not_compacted(&self, from: Lsn) -> Result<(), JournalError> {
        let (base, _) = self.log_base()?;
        if from.0 > 0 && from <= base {
            return Err(JournalError::Compacted { base, asked: from });
        }
        Ok(())
    }
}

/// Pages of a dropped log deleted in one transaction: a request that comes meanwhile waits
/// for one slice at most (decision 0072).
pub(crate) const DROPPED_SLICE_PAGES: usize = 64;

impl WriterState {
    /// Makes an empty log start after `base` (whose entry has `epoch`).
    pub(crate) fn start_after(
        &mut self,
        base: Lsn,
        epoch: Epoch,
        head: Epoch,
    ) -> Result<(), JournalError> {
        let mut txn = WriteTxn::begin(&*self.db.get()?)?;
        txn.set_durability(Durability::Immediate).map_err(storage)?;
        {
            let log = txn.open_table(LOG).map_err(storage)?;
            if log.first().map_err(storage)?.is_some() || self.next_lsn > 1 {
                return Err(JournalError::Compaction(
                    "only an empty log can start after a base".into(),
                ));
            }
            let mut meta = txn.open_table(META).map_err(storage)?;
            meta.insert(META_LOG_BASE, &position_bytes(base, epoch)[..])
                .map_err(storage)?;
            meta.insert(META_LOG_HEAD, &epoch_bytes(head)[..])
                .map_err(storage)?;
        }
        txn.commit().map_err(storage)?;
        self.next_lsn = base.0 + 1;
        self.tail = None;
        Ok(())
    }

    /// Drops every log entry and makes the log start after `to`'s base (whose entry has its
    /// epoch) in a library whose log began with an entry of its head epoch, or, without
    /// `to`, from position 1 with no base, in one durable transaction. The changes of
    /// entries in epochs `led_by` led (this device's own leadership, which no other device
    /// may hold) go back to the offline journal as pending, as a truncation returns them;
    /// the others are the leader's to keep. Returns the ids returned.
    pub(crate) fn rebase(
        &mut self,
        to: Option<LogStart>,
        led_by: DeviceId,
    ) -> Result<Vec<ChangeId>, JournalError> {
        let mut txn = WriteTxn::begin(&*self.db.get()?)?;
        txn.set_durability(Durability::Immediate).map_err(storage)?;
        let next_local_before = self.next_local;
        let mut returned = Vec::new();
        {
            let log = txn.open_table(LOG).map_err(storage)?;
            let mut local = txn.open_table(OFFLINE).map_err(storage)?;
            // Only the epochs this device led are read (a follower's log, none of it); the
            // rest goes with the table.
            let led = log_table::epoch_ranges(&log, |e| e.device == led_by)?;
            let sealer = crate::store::current_sealer(&self.sealer);
            for (first, last) in led {
                log_table::visit(&log, first, |lsn, record| {
                    if lsn > last {
                        return Ok(ControlFlow::Break(()));
                    }
                    let Ok(record) = record.and_then(LogRecord::decode) else {
                        return Ok(ControlFlow::Continue(()));
                    };
                    // A horizon is its leader's own entry: never pushed (a leader refuses one).
                    if record.epoch.device == led_by && !is_horizon(&sealer, record.sealed) {
                        if let Some(id) = Sealer::peek_change_id(record.sealed) {
                            self.resubmit(&mut local, record.sealed)?;
                            returned.push(id);
                        }
                    }
                    Ok(ControlFlow::Continue(()))
                })?;
            }
            drop(log);
            // Renamed, not deleted: the writer deletes it once it replied (see `DROPPED_LOG`).
            txn.delete_table(DROPPED_LOG).map_err(storage)?;
            txn.rename_table(LOG, DROPPED_LOG).map_err(storage)?;
            txn.open_table(LOG).map_err(storage)?;
            let mut meta = txn.open_table(META).map_err(storage)?;
            match to {
                Some(LogStart { base, epoch, head }) => {
                    meta.insert(META_LOG_BASE, &position_bytes(base, epoch)[..])
                        .map_err(storage)?;
                    meta.insert(META_LOG_HEAD, &epoch_bytes(head)[..])
                        .map_err(storage)?;
                }
                None => {
                    meta.remove(META_LOG_BASE).map_err(storage)?;
                    meta.remove(META_LOG_HEAD).map_err(storage)?;
                }
            }
            clear_saved_index(&txn)?;
        }
        if let Err(e) = txn.commit() {
            self.next_local = next_local_before;
            return Err(storage(e));
        }
        self.next_lsn = to.map_or(1, |to| to.base.0 + 1);
        self.tail = None;
        Ok(returned)
    }

    /// Deletes up to [`DROPPED_SLICE_PAGES`] pages of the log a rebase or a compaction dropped,
    /// and the table
    /// once it is empty; returns whether pages are left. Not durable by itself: a crash before
    /// the next durable commit leaves the rest for the next open to delete.
    pub(crate) fn delete_dropped_slice(&mut self) -> Result<bool, JournalError> {
        let mut txn = WriteTxn::begin(&*self.db.get()?)?;
        txn.set_durability(Durability::None).map_err(storage)?;
        let mut deleted = 0;
        {
            let mut dropped = txn.open_table(DROPPED_LOG).map_err(storage)?;
            while deleted < DROPPED_SLICE_PAGES && dropped.pop_first().map_err(storage)?.is_some() {
                deleted += 1;
            }
        }
        let more = deleted == DROPPED_SLICE_PAGES;
        if !more {
            txn.delete_table(DROPPED_LOG).map_err(storage)?;
        }
        txn.commit().map_err(storage)?;
        Ok(more)
    }
}

/// Drops the log through `base` in `txn` and stores the base; returns what it did and whether
/// the log after the base was moved to a new table, leaving the old one to be deleted (it is
/// when that part is the shorter: the rest then goes a slice at a time on the writer,
/// decision 0072, instead of inside this transaction).
fn compact_in(
    txn: &redb::WriteTransaction,
    base: Lsn,
    keys: &crate::binding::PageKeys,
) -> Result<(Compaction, bool), JournalError> {
    let mut log = txn.open_table(LOG).map_err(storage)?;
    let last = log_table::last_lsn(&log)?;
    if base.0 > last {
        return Err(JournalError::Compaction(format!(
            "position {} is past the log's end ({last})",
            base.0
        )));
    }
    let corrupt = |e: String| JournalError::Corrupt(format!("log record {}: {e}", base.0));
    let record = log_table::get(&log, base.0)?
        .ok_or_else(|| corrupt("missing".into()))?
        .map_err(|e| corrupt(e.to_string()))?;
    let base_epoch = LogRecord::decode(&record)
        .map_err(|e| corrupt(e.to_string()))?
        .epoch;
    let head = log_table::get(&log, 1)?
        .and_then(Result::ok)
        .and_then(|bytes| LogRecord::decode(&bytes).ok().map(|r| r.epoch));
    let first = log
        .first()
        .map_err(storage)?
        .map_or(1, |(key, _)| key.value());
    let moved = last - base.0 < base.0.saturating_sub(first);
    let dropped = if moved {
        let mut fresh = txn.open_table(FRESH_LOG).map_err(storage)?;
        log_table::copy_after(&log, &mut fresh, base.0, keys)?
    } else {
        log_table::drop_through(&mut log, base.0, keys)?
    };
    drop(log);
    if moved {
        txn.delete_table(DROPPED_LOG).map_err(storage)?;
        txn.rename_table(LOG, DROPPED_LOG).map_err(storage)?;
        txn.rename_table(FRESH_LOG, LOG).map_err(storage)?;
    }
    let mut meta = txn.open_table(META).map_err(storage)?;
    if let Some(head) = head {
        meta.insert(META_LOG_HEAD, &epoch_bytes(head)[..])
            .map_err(storage)?;
    }
    meta.insert(META_LOG_BASE, &position_bytes(base, base_epoch)[..])
        .map_err(storage)?;
    drop(meta);
    // The saved index starts at position 1: it no longer describes the log.
    clear_saved_index(txn)?;
    let compaction = Compaction {
        base,
        base_epoch,
        dropped,
    };
    Ok((compaction, moved))
}

/// Removes the saved log index (it would describe positions that are gone).
fn clear_saved_index(txn: &redb::WriteTransaction) -> Result<(), JournalError> {
    let mut saved = txn.open_table(LOG_INDEX).map_err(storage)?;
    loop {
        let last = saved.last().map_err(storage)?.map(|(k, _)| k.value());
        let Some(key) = last else { break };
        saved.remove(key).map_err(storage)?;
    }
    Ok(())
}
