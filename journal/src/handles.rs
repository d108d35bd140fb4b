//! Handles on the concepts a [`Journal`] holds, in the way redb layers a database and its
//! tables: [`ReplicatedLog`], [`OfflineJournal`] and [`Election`]. Each borrows the journal.

use keel_schema::{ChangeId, DeviceId, Epoch, Lsn};

use crate::error::JournalError;
use crate::log_index::LogIndex;
use crate::store::{CheckedEntries, Journal, ReadEntry};

impl Journal {
    /// The replicated log.
    pub fn log(&self) -> ReplicatedLog<'_> {
        ReplicatedLog { journal: self }
    }

    /// The offline journal.
    pub fn offline(&self) -> OfflineJournal<'_> {
        OfflineJournal { journal: self }
    }

    /// The election state.
    pub fn election(&self) -> Election<'_> {
        Election { journal: self }
    }
}

/// The replicated log of a journal: reading it, appending what a leader sent, truncating a
/// stale suffix, and its saved index. From [`Journal::log`].
#[derive(Clone, Copy)]
pub struct ReplicatedLog<'a> {
    journal: &'a Journal,
}

impl ReplicatedLog<'_> {
    /// Reads up to `limit` log entries from `from` (inclusive), decoded and opened.
    pub fn read(&self, from: Lsn, limit: usize) -> Result<Vec<ReadEntry>, JournalError> {
        self.journal.read_log(from, limit)
    }

    /// Reads up to `limit` raw log records from `from` (inclusive), unopened, barriers left out.
    /// A damaged log page shows as one empty record at its first position, which
    /// [`ReplicatedLog::open_records`] reports.
    pub fn read_raw(&self, from: Lsn, limit: usize) -> Result<Vec<(Lsn, Vec<u8>)>, JournalError> {
        self.journal.read_log_raw(from, limit)
    }

    /// Decodes raw log records (see [`ReplicatedLog::read_raw`]), one result each; used to open
    /// records on several threads.
    pub fn open_records(&self, raw: &[(Lsn, Vec<u8>)]) -> Vec<ReadEntry> {
        self.journal.open_log_records(raw)
    }

    /// Reads up to `limit` log entries from `from` (inclusive) as stored, barriers included (an
    /// empty payload), for shipping to followers: `(lsn, epoch, sealed)`. A record that fails its
    /// checksum is an error: it must not be shipped.
    pub fn entries(
        &self,
        from: Lsn,
        limit: usize,
    ) -> Result<Vec<(Lsn, Epoch, Vec<u8>)>, JournalError> {
        self.journal.log_entries(from, limit)
    }

    /// The id of every change in the journal, log and offline journal both (records that fail
    /// their checks are left out; `verify` reports them). Reads the whole journal.
    pub fn change_ids(&self) -> Result<std::collections::HashSet<ChangeId>, JournalError> {
        self.journal.change_ids()
    }

    /// The epoch of the log entry at `lsn` (`None` if there is none).
    pub fn epoch_at(&self, lsn: Lsn) -> Result<Option<Epoch>, JournalError> {
        self.journal.epoch_at(lsn)
    }

    /// Appends log entries verbatim at `first`, which must be the next position (a follower
    /// copying its leader's segment, or a leader writing what its replication core sequenced).
    /// An empty payload is an epoch barrier. Every record is checked first; a bad one fails the
    /// whole segment. Changes found in the offline journal are removed from it.
    pub fn append(&self, first: Lsn, entries: Vec<(Epoch, Vec<u8>)>) -> Result<(), JournalError> {
        self.journal.append_replicated(first, entries)
    }

    /// The checking half of [`ReplicatedLog::append`]: opens and decodes every record (a
    /// bad one fails them all). Checking the next entries on one thread while
    /// [`ReplicatedLog::append_checked`] stores these on another keeps both busy.
    pub fn check(
        &self,
        first: Lsn,
        entries: Vec<(Epoch, Vec<u8>)>,
    ) -> Result<CheckedEntries, JournalError> {
        self.journal.check_replicated(first, entries)
    }

    /// Like [`ReplicatedLog::check`], but only checks each record's seal (it was sealed
    /// under this library's key and is intact) without decoding its change: for the initial
    /// sync of a device whose offline journal holds nothing the log could contain. The records'
    /// clocks are not read, so the caller must raise the HLC high-water mark to the sender's
    /// ([`Journal::raise_hlc_high_water`]) once they are stored.
    pub fn check_seals(
        &self,
        first: Lsn,
        entries: Vec<(Epoch, Vec<u8>)>,
    ) -> Result<CheckedEntries, JournalError> {
        self.journal.check_seals(first, entries)
    }

    /// The storing half of [`ReplicatedLog::append`]: appends entries checked by
    /// [`ReplicatedLog::check`] in one durable transaction.
    pub fn append_checked(&self, checked: CheckedEntries) -> Result<(), JournalError> {
        self.journal.append_checked(checked)
    }

    /// Removes every log entry after `keep`, returning their changes but `dropped` (other
    /// devices' changes, which their maker resubmits) to the offline journal as pending, in one
    /// durable transaction. Returns the ids returned.
    pub fn truncate_after(
        &self,
        keep: Lsn,
        dropped: &[ChangeId],
    ) -> Result<Vec<ChangeId>, JournalError> {
        self.journal.truncate_after(keep, dropped)
    }

    /// The whole log as `(epoch, change id)` per position from 1 (`None` for a barrier or a
    /// record whose header cannot be read), without opening any payload: the replication core's
    /// view of the log. See [`ReplicatedLog::for_each_index`] to visit it without a copy.
    pub fn index(&self) -> Result<Vec<(Epoch, Option<ChangeId>)>, JournalError> {
        self.journal.log_index()
    }

    /// Visits the whole log as [`ReplicatedLog::index`] lists it, in order, without collecting it
    /// first (a log of millions of entries is not copied). Fails on a gap or a record whose
    /// header cannot be read. [`ReplicatedLog::load_index`] is faster when a saved copy exists.
    pub fn for_each_index(
        &self,
        visit: impl FnMut(Epoch, Option<ChangeId>),
    ) -> Result<(), JournalError> {
        self.journal.for_each_log_index(visit)
    }

    /// Saves `index` as the log index, for [`ReplicatedLog::load_index`]. It must be the index of
    /// this journal's log from position 1 (the load checks its last entry against the log and
    /// ignores it otherwise). Written in chunks over several transactions, so memory stays
    /// small: the old header goes first and the new one last, and chunks carry the save's id,
    /// so an interrupted save leaves no index rather than a mixed one. Not synced on its own (a
    /// cache: lost in a crash, the next start reads the log); the next durable commit makes it
    /// durable.
    pub fn save_index(&self, index: &LogIndex) -> Result<(), JournalError> {
        self.journal.save_log_index(index)
    }

    /// Drops every log entry up to and including `base` (which must be in the log), in one
    /// durable transaction, keeping `base` and its entry's epoch: what the library's snapshot
    /// holds must cover them. A base at or below the current one changes nothing. Reads from
    /// a compacted position fail with [`JournalError::Compacted`] from then on.
    pub fn compact(&self, base: Lsn) -> Result<crate::Compaction, JournalError> {
        self.journal.compact_log(base)
    }

    /// Makes this empty log start after `base`, whose entry has `epoch`, in a library whose
    /// log began with an entry of epoch `head` (its founder's): a device that joins by
    /// snapshot from a device whose log was compacted.
    pub fn start_after(&self, base: Lsn, epoch: Epoch, head: Epoch) -> Result<(), JournalError> {
        self.journal.start_log_after(base, epoch, head)
    }

    /// Drops the whole log and makes it start after `base` (whose entry has `epoch`, in a
    /// library whose log began with an entry of epoch `head`): a device behind its leader's
    /// compaction point, once the library holds a snapshot at `base`. The changes of entries
    /// in epochs `led_by` led go back to the offline journal as pending (only this device
    /// may hold them); returns their ids. `base` must be past the current base.
    pub fn rebase(
        &self,
        base: Lsn,
        epoch: Epoch,
        head: Epoch,
        led_by: DeviceId,
    ) -> Result<Vec<ChangeId>, JournalError> {
        self.journal.rebase_log(base, epoch, head, led_by)
    }

    /// Drops the whole log and its compaction base, as if no entry had arrived: a device whose
    /// join from a compacted device was cut after the log's base was stored and before the
    /// snapshot holding what came before it was (its leader then finds it behind the
    /// compaction point, and it backfills). The changes of entries in epochs `led_by` led go
    /// back to the offline journal as pending; returns their ids.
    pub fn forget(&self, led_by: DeviceId) -> Result<Vec<ChangeId>, JournalError> {
        self.journal.forget_log(led_by)
    }

    /// The epoch of the log's first entry (the founder's), kept when it was compacted away;
    /// `None` for an empty log.
    pub fn head(&self) -> Result<Option<Epoch>, JournalError> {
        self.journal.log_head()
    }

    /// The compaction base and its entry's epoch (`(0, default)` if never compacted).
    pub fn base(&self) -> Result<(Lsn, Epoch), JournalError> {
        self.journal.log_base()
    }

    /// The log index (see [`LogIndex`]): the saved copy, if it is sound and still matches the
    /// log, extended by the records after it; otherwise read from every record. Fails on a gap
    /// or on a record read whose header cannot be read.
    pub fn load_index(&self) -> Result<LogIndex, JournalError> {
        self.journal.load_log_index()
    }
}

/// The offline journal: this device's changes that wait for a leader to sequence them. From
/// [`Journal::offline`].
#[derive(Clone, Copy)]
pub struct OfflineJournal<'a> {
    journal: &'a Journal,
}

impl OfflineJournal<'_> {
    /// Reads up to `limit` local (not yet sequenced) entries from `from` (inclusive).
    pub fn read(&self, from: u64, limit: usize) -> Result<Vec<ReadEntry>, JournalError> {
        self.journal.read_local(from, limit)
    }

    /// Reads up to `limit` local records from `from` (inclusive) as sealed payloads, for pushing
    /// to a leader. Records that fail their checks are skipped (`verify` reports them).
    pub fn read_sealed(
        &self,
        from: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, JournalError> {
        self.journal.read_local_sealed(from, limit)
    }

    /// How many records it holds and the sequence number of its last: a record added (a
    /// commit, a truncation's return) raises the last, and one removed lowers the count, so
    /// the pair tells a reader that caches what it read whether it changed.
    pub fn extent(&self) -> Result<(u64, Option<u64>), JournalError> {
        self.journal.offline_extent()
    }

    /// The offline journal's changes as `(change id, sealed)`, oldest first (to push to a leader).
    pub fn changes(&self) -> Result<Vec<(ChangeId, Vec<u8>)>, JournalError> {
        self.journal.offline_changes()
    }
}

/// The election state a journal keeps durable: the highest epoch accepted and the highest voted
/// for. From [`Journal::election`].
#[derive(Clone, Copy)]
pub struct Election<'a> {
    journal: &'a Journal,
}

impl Election<'_> {
    /// The stored current epoch.
    pub fn epoch(&self) -> Result<Option<Epoch>, JournalError> {
        self.journal.epoch()
    }

    /// The highest epoch this device voted for, if it ever voted.
    pub fn voted(&self) -> Result<Option<Epoch>, JournalError> {
        self.journal.voted()
    }

    /// Durably stores the election state: the current epoch and the highest epoch voted for.
    pub fn store(&self, epoch: Epoch, voted: Epoch) -> Result<(), JournalError> {
        self.journal.store_election(epoch, voted)
    }

    /// The log end (epoch and position of its last entry) this device held before it last
    /// cut its log at a damaged record, if it ever did: it votes only for logs at least as up
    /// to date, and stands only once its own log is.
    pub fn vote_floor(&self) -> Result<Option<(Epoch, Lsn)>, JournalError> {
        self.journal.vote_floor()
    }

    /// Durably raises the vote floor to `floor` (it never goes down). Store it before the cut.
    pub fn store_vote_floor(&self, floor: (Epoch, Lsn)) -> Result<(), JournalError> {
        self.journal.store_vote_floor(floor)
    }

    /// Forgets the vote floor, an operator's decision (see `Library::forget_vote_floor`):
    /// returns the one forgotten.
    pub fn forget_vote_floor(&self) -> Result<Option<(Epoch, Lsn)>, JournalError> {
        self.journal.forget_vote_floor()
    }

    /// Stores the current epoch without changing the writer's role (used by followers).
    pub fn store_epoch(&self, epoch: Epoch) -> Result<(), JournalError> {
        self.journal.store_epoch(epoch)
    }
}
