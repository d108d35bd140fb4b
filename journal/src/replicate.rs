//! The writer's replication operations: appending log entries verbatim (a follower copying its
//! leader's segment, or a leader writing what its replication core sequenced), and truncating a
//! stale suffix with its changes returned to the offline journal (a deposed leader or a follower
//! of one). Each is one durable transaction.

use std::collections::HashSet;

use keel_schema::{Change, ChangeId, Epoch, Lsn};
use redb::{Durability, ReadableTable};

use crate::error::{storage, JournalError, WriteTxn};
use crate::log_table::split_off;
use crate::record::{LocalRecord, LogRecord, PushState};
use crate::seal::Sealer;
use crate::tables::{LOG, LOG_INDEX, META, META_PROJECTIONS_STALE, META_REPLAY_FROM, OFFLINE};
use crate::writer::{Placement, WriterState};

impl WriterState {
    /// Appends log entries at `first` (which must be the next position) inside the writer's
    /// transaction, together with any local commits waiting (one sync for both): a follower
    /// copying its leader's segment, or a leader writing what its replication core sequenced.
    /// Drops the matching changes from the offline journal (they are sequenced now). An entry
    /// without a change is an epoch barrier. On error the caller restores `next_lsn`.
    pub(crate) fn append_in(
        &mut self,
        txn: &redb::WriteTransaction,
        first: Lsn,
        entries: Vec<(Epoch, Option<Change>, Vec<u8>)>,
    ) -> Result<Vec<(Placement, Change)>, JournalError> {
        if first.0 != self.next_lsn {
            return Err(JournalError::NotContiguous {
                expected: Lsn(self.next_lsn),
                found: first,
            });
        }
        let mut appended = Vec::with_capacity(entries.len());
        let mut log = txn.open_table(LOG).map_err(storage)?;
        let mut local = txn.open_table(OFFLINE).map_err(storage)?;
        // Usually empty (a follower that wrote nothing offline): then no ids are collected and
        // nothing is scanned.
        let waiting = local.first().map_err(storage)?.is_some();
        let mut ids = std::collections::HashSet::new();
        let mut own = 0u64;
        let sealer = crate::store::current_sealer(&self.sealer);
        let mut pages = self.page_writer(&log, sealer.page_keys())?;
        for (epoch, change, sealed) in entries {
            let lsn = self.next_lsn;
            self.next_lsn += 1;
            pages.push_with(&mut log, |buf| {
                LogRecord::append_encoded(epoch, buf, |buf| buf.extend_from_slice(&sealed))
            })?;
            // A barrier (no change) only marks the start of an epoch.
            let Some(change) = change else { continue };
            own += u64::from(change.origin() == self.device);
            if waiting {
                ids.insert(change.id);
            }
            self.hlc_high_water = self.hlc_high_water.max(change.hlc);
            appended.push((Placement::Log(Lsn(lsn)), change));
        }
        pages.flush(&mut log)?;
        self.tail = Some(pages.tail());
        let mut sequenced = Vec::new();
        if !ids.is_empty() {
            for item in local.iter().map_err(storage)? {
                let (seq, bytes) = item.map_err(storage)?;
                let id = LocalRecord::decode(bytes.value())
                    .ok()
                    .and_then(|r| Sealer::peek_change_id(r.sealed));
                if id.is_some_and(|id| ids.contains(&id)) {
                    sequenced.push(seq.value());
                }
            }
        }
        // This device's changes that came through the offline journal were counted when they
        // were committed; the others (sequenced by its own leading node directly) count now.
        self.own_changes += own.saturating_sub(sequenced.len() as u64);
        for seq in sequenced {
            local.remove(seq).map_err(storage)?;
        }
        Ok(appended)
    }

    /// Removes every log entry after `keep`; their changes but `dropped` go back to the offline
    /// journal as pending (to be resubmitted), and replay after a crash starts no later than
    /// `keep`. Horizons are dropped too, whoever made them. `dropped` are other devices' changes: a leader accepts a change only from its
    /// maker, which still holds it and resubmits it (the replication core names them). Until
    /// it does, and for good if it never does, projections that applied one show what no log
    /// holds: a truncation that drops any counts in [`META_PROJECTIONS_STALE`].
    pub(crate) fn truncate_after(
        &mut self,
        keep: Lsn,
        dropped: &HashSet<ChangeId>,
    ) -> Result<Vec<ChangeId>, JournalError> {
        let mut txn = WriteTxn::begin(&*self.db.get()?)?;
        txn.set_durability(Durability::Immediate).map_err(storage)?;
        let mut returned = Vec::new();
        let mut dropped_any = false;
        let next_local_before = self.next_local;
        {
            let mut log = txn.open_table(LOG).map_err(storage)?;
            let mut local = txn.open_table(OFFLINE).map_err(storage)?;
            let sealer = crate::store::current_sealer(&self.sealer);
            for bytes in split_off(&mut log, keep.0, sealer.page_keys())? {
                // A record that fails its checks cannot be resubmitted; `verify` reports it.
                let Ok(record) = LogRecord::decode(&bytes) else {
                    continue;
                };
                let Some(id) = Sealer::peek_change_id(record.sealed) else {
                    continue;
                };
                // A horizon goes with the log, whoever made it: a leader refuses one pushed to
                // it, so it would wait in the offline journal for good (decision 0082).
                if dropped.contains(&id) || is_horizon(&sealer, record.sealed) {
                    dropped_any = true;
                    continue;
                }
                self.resubmit(&mut local, record.sealed)?;
                returned.push(id);
            }
            let mut meta = txn.open_table(META).map_err(storage)?;
            let floor = meta
                .get(META_REPLAY_FROM)
                .map_err(storage)?
                .and_then(|v| v.value().try_into().ok().map(u64::from_be_bytes))
                .unwrap_or(u64::MAX)
                .min(keep.0);
            meta.insert(META_REPLAY_FROM, &floor.to_be_bytes()[..])
                .map_err(storage)?;
            if dropped_any {
                let stale = meta
                    .get(META_PROJECTIONS_STALE)
                    .map_err(storage)?
                    .and_then(|v| v.value().try_into().ok().map(u64::from_be_bytes))
                    .unwrap_or(0)
                    .saturating_add(1);
                meta.insert(META_PROJECTIONS_STALE, &stale.to_be_bytes()[..])
                    .map_err(storage)?;
            }
            // The saved index may describe removed positions.
            txn.open_table(LOG_INDEX)
                .map_err(storage)?
                .remove(0)
                .map_err(storage)?;
        }
        if let Err(e) = txn.commit() {
            self.next_local = next_local_before;
            return Err(storage(e));
        }
        self.next_lsn = keep.0 + 1;
        self.tail = None;
        Ok(returned)
    }
}

impl WriterState {
    /// Puts a change dropped from the log back in the offline journal as pending, inside the
    /// caller's transaction (its maker pushes it again).
    pub(crate) fn resubmit(
        &mut self,
        offline: &mut redb::Table<'_, u64, &'static [u8]>,
        sealed: &[u8],
    ) -> Result<(), JournalError> {
        let seq = self.next_local;
        self.next_local += 1;
        offline
            .insert(
                seq,
                LocalRecord::encode(PushState::Pending, sealed).as_slice(),
            )
            .map_err(storage)?;
        Ok(())
    }
}

/// Whether `sealed` opens to a [`keel_schema::Horizon`] (decision 0082).
pub(crate) fn is_horizon(sealer: &crate::seal::Sealer, sealed: &[u8]) -> bool {
    sealer
        .open(sealed)
        .ok()
        .and_then(|(_, plain)| keel_schema::Change::decode(&plain).ok())
        .is_some_and(|c| c.model == keel_schema::code_of::<keel_schema::Horizon>())
}
