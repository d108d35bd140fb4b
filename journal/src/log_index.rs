//! The log index: each log position's epoch and change id, without the payloads (what the
//! replication core holds in memory), and its saved copy in the `log_index` table.
//!
//! Reading the index from the log means reading every record, payloads included (decision 0003).
//! A node saves the index when it stops, and a device that received the log in an
//! initial sync saves what it built while storing it; loading then reads the saved copy and only
//! the records after it. The copy is only a cache:
//! - its header and each chunk carry a BLAKE3 checksum, and its last entry must match the log
//!   record at its position, otherwise the log is read in full;
//! - a truncation of the log deletes it in the same transaction (the only write that changes an
//!   existing position).

use keel_schema::{ChangeId, DeviceId, Epoch, Lsn};
use redb::{Durability, ReadableDatabase, ReadableTable};
use uuid::Uuid;

use crate::error::{guarded, storage, JournalError, WriteTxn};
use crate::record::LogRecord;
use crate::seal::Sealer;
use crate::store::Journal;
use crate::tables::{LOG, LOG_INDEX};

/// Version byte of the saved index.
const INDEX_VERSION: u8 = 1;
/// Bytes of one epoch run: start index, epoch counter, epoch device.
const RUN_LEN: usize = 8 + 8 + 32;
/// Bytes of one entry: a flag (1 = change, 0 = barrier or unreadable id) and the id.
const ENTRY_LEN: usize = 1 + 16;
/// Bytes of a header before its runs: version, save id, entry count, run count.
const HEADER_FIXED: usize = 1 + 8 + 8 + 8;
/// Entries per saved chunk (~1.1 MB).
const CHUNK_ENTRIES: usize = 65_536;
/// Chunks written per transaction (so the database's dirty pages stay small).
const CHUNKS_PER_TXN: u64 = 8;

/// Epoch runs: `(index of the first entry, epoch)`.
type Runs = Vec<(u64, Epoch)>;

/// Each log position's epoch and change id (`None` for a barrier), held compactly: the ids in
/// order and the epochs as runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogIndex {
    /// The compaction base the entries follow, with its entry's epoch (0: from position 1).
    base: (Lsn, Epoch),
    /// `(index of the first entry, epoch)`, increasing, no two neighbours with the same epoch.
    runs: Vec<(u64, Epoch)>,
    /// Entry `i` is at position `base + i + 1`.
    ids: Vec<Option<ChangeId>>,
}

impl LogIndex {
    /// Makes room for exactly `additional` more entries (an index of a long log built without
    /// it would hold up to twice its entries while its vector grows: 340 MB of ids at 20M).
    pub fn reserve_exact(&mut self, additional: usize) {
        self.ids.reserve_exact(additional);
    }

    /// Appends the entry of the next position.
    pub fn push(&mut self, epoch: Epoch, id: Option<ChangeId>) {
        if self.runs.last().map(|(_, e)| *e) != Some(epoch) {
            self.runs.push((self.ids.len() as u64, epoch));
        }
        self.ids.push(id);
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The epoch runs: `(index of the first entry, epoch)`.
    pub fn runs(&self) -> &[(u64, Epoch)] {
        &self.runs
    }

    /// The change id of each entry, in order.
    pub fn ids(&self) -> &[Option<ChangeId>] {
        &self.ids
    }

    /// An empty index of a log that starts after `base`, whose entry has `epoch`.
    pub fn after(base: Lsn, epoch: Epoch) -> Self {
        Self {
            base: (base, epoch),
            ..Self::default()
        }
    }

    /// The compaction base the entries follow and its entry's epoch (`(0, default)`: they
    /// start at position 1).
    pub fn base(&self) -> (Lsn, Epoch) {
        self.base
    }

    /// The epoch runs and the ids, taken apart (no copy).
    pub fn into_parts(self) -> (Vec<(u64, Epoch)>, Vec<Option<ChangeId>>) {
        (self.runs, self.ids)
    }

    /// Every entry with its epoch, in order.
    pub fn iter(&self) -> impl Iterator<Item = (Epoch, Option<ChangeId>)> + '_ {
        let mut run = 0usize;
        self.ids.iter().enumerate().map(move |(i, id)| {
            while self
                .runs
                .get(run + 1)
                .is_some_and(|(start, _)| *start <= i as u64)
            {
                run += 1;
            }
            let epoch = self.runs.get(run).map(|(_, e)| *e).unwrap_or_default();
            (epoch, *id)
        })
    }

    /// The last entry.
    fn last(&self) -> Option<(Epoch, Option<ChangeId>)> {
        let id = *self.ids.last()?;
        Some((self.runs.last().map(|(_, e)| *e).unwrap_or_default(), id))
    }

    /// Makes room for `additional` more entries.
    pub fn reserve(&mut self, additional: usize) {
        self.ids.reserve_exact(additional);
    }

    /// The saved header (key 0): version, save id, entry count, run count, the runs, and a
    /// BLAKE3 of all that.
    fn encode_header(&self, save: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_FIXED + self.runs.len() * RUN_LEN + 32);
        out.push(INDEX_VERSION);
        out.extend_from_slice(&save.to_be_bytes());
        out.extend_from_slice(&(self.ids.len() as u64).to_be_bytes());
        out.extend_from_slice(&(self.runs.len() as u64).to_be_bytes());
        for (start, epoch) in &self.runs {
            out.extend_from_slice(&start.to_be_bytes());
            out.extend_from_slice(&epoch.counter.to_be_bytes());
            out.extend_from_slice(&epoch.device.0);
        }
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        out
    }

    /// Decodes a header: `(save id, entry count, runs)`; `None` if anything is off.
    fn decode_header(bytes: &[u8]) -> Option<(u64, usize, Runs)> {
        let (body, sum) = bytes.split_at_checked(bytes.len().checked_sub(32)?)?;
        if blake3::hash(body).as_bytes() != sum {
            return None;
        }
        let (&version, rest) = body.split_first()?;
        if version != INDEX_VERSION {
            return None;
        }
        let save = u64_at(rest, 0)?;
        let len = usize::try_from(u64_at(rest, 8)?).ok()?;
        let runs_len = usize::try_from(u64_at(rest, 16)?).ok()?;
        let runs_part = rest.get(24..)?;
        if runs_part.len() != runs_len.checked_mul(RUN_LEN)? {
            return None;
        }
        let mut runs = Vec::with_capacity(runs_len);
        for run in runs_part.chunks_exact(RUN_LEN) {
            let start = u64_at(run, 0)?;
            let counter = u64_at(run, 8)?;
            let device = DeviceId(run[16..].try_into().ok()?);
            // Runs start at 0, increase, and each starts inside the entries.
            let fine = match runs.last() {
                None => start == 0,
                Some((previous, _)) => start > *previous && start < len as u64,
            };
            if !fine {
                return None;
            }
            runs.push((start, Epoch { counter, device }));
        }
        if runs.is_empty() != (len == 0) {
            return None;
        }
        Some((save, len, runs))
    }

    /// Chunk `number` (from 1) of save `save`: its entries, then a BLAKE3 of the save id, the
    /// chunk number and the entries (so a chunk of another save or place is refused).
    fn encode_chunk(&self, save: u64, number: u64) -> Vec<u8> {
        let from = (number as usize - 1) * CHUNK_ENTRIES;
        let ids = &self.ids[from..(from + CHUNK_ENTRIES).min(self.ids.len())];
        let mut out = Vec::with_capacity(ids.len() * ENTRY_LEN + 32);
        for id in ids {
            match id {
                Some(id) => {
                    out.push(1);
                    out.extend_from_slice(id.0.as_bytes());
                }
                None => out.extend_from_slice(&[0; ENTRY_LEN]),
            }
        }
        let sum = chunk_sum(save, number, &out);
        out.extend_from_slice(sum.as_bytes());
        out
    }

    /// Appends the entries of chunk `number` of save `save`, which must hold `expected`
    /// entries; `None` if anything is off.
    fn decode_chunk_into(
        &mut self,
        save: u64,
        number: u64,
        expected: usize,
        bytes: &[u8],
    ) -> Option<()> {
        let (body, sum) = bytes.split_at_checked(bytes.len().checked_sub(32)?)?;
        if chunk_sum(save, number, body).as_bytes() != sum || body.len() != expected * ENTRY_LEN {
            return None;
        }
        for entry in body.chunks_exact(ENTRY_LEN) {
            self.ids.push(match entry[0] {
                0 => None,
                1 => Some(ChangeId(Uuid::from_slice(&entry[1..]).ok()?)),
                _ => return None,
            });
        }
        Some(())
    }

    /// The number of chunks an index of `len` entries is saved in.
    fn chunks(len: usize) -> u64 {
        len.div_ceil(CHUNK_ENTRIES) as u64
    }
}

/// The saved index as stored (header and every chunk sound), not yet checked against the log;
/// room made at once for at most `room` entries.
fn read_saved(txn: &redb::ReadTransaction, room: usize) -> Result<Option<LogIndex>, JournalError> {
    let saved = match txn.open_table(LOG_INDEX) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
        Err(e) => return Err(storage(e)),
    };
    let Some(header) = saved.get(0).map_err(storage)?.map(|h| h.value().to_vec()) else {
        return Ok(None);
    };
    let index = LogIndex::decode_saved(&header, room, |number| -> Result<_, JournalError> {
        Ok(saved
            .get(number)
            .map_err(storage)?
            .map(|chunk| chunk.value().to_vec()))
    })?;
    if index.is_none() {
        tracing::warn!("the saved log index is damaged; reading the whole log");
    }
    Ok(index)
}

impl LogIndex {
    /// Decodes a saved index from its header and its chunks (`chunk(n)` gives chunk `n`, from
    /// 1, if there is one): `Ok(None)` if the header or any chunk is damaged, missing or of
    /// another save. Bounded by what `chunk` gives, whatever the header claims; room is made
    /// at once for `room` entries (the log's length) when the header's count fits in it, else
    /// it grows with the chunks actually read. Public for fuzzing.
    pub fn decode_saved<E>(
        header: &[u8],
        room: usize,
        mut chunk: impl FnMut(u64) -> Result<Option<Vec<u8>>, E>,
    ) -> Result<Option<LogIndex>, E> {
        let Some((save, len, runs)) = LogIndex::decode_header(header) else {
            return Ok(None);
        };
        let mut index = LogIndex {
            base: Default::default(),
            runs,
            // The count is the file's word: within `room` (the whole log, so that the entries
            // read after the saved ones fit too), else room grows with the chunks read.
            ids: Vec::with_capacity(if len <= room {
                room
            } else {
                len.min(CHUNK_ENTRIES)
            }),
        };
        for number in 1..=LogIndex::chunks(len) {
            let expected = (len - index.ids.len()).min(CHUNK_ENTRIES);
            let sound = chunk(number)?
                .and_then(|bytes| index.decode_chunk_into(save, number, expected, &bytes));
            if sound.is_none() {
                return Ok(None);
            }
        }
        Ok(Some(index))
    }
}

fn u64_at(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
}

fn chunk_sum(save: u64, number: u64, body: &[u8]) -> blake3::Hash {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&save.to_be_bytes());
    hasher.update(&number.to_be_bytes());
    hasher.update(body);
    hasher.finalize()
}

impl Journal {
    /// See [`crate::ReplicatedLog::load_index`].
    pub(crate) fn load_log_index(&self) -> Result<LogIndex, JournalError> {
        let (base, base_epoch) = self.log_base()?;
        let mut index = if base.0 > 0 {
            // A compacted log has no saved index (it describes positions from 1).
            LogIndex::after(base, base_epoch)
        } else {
            self.saved_log_index()?.unwrap_or_default()
        };
        let from = base.0 + index.len() as u64 + 1;
        let last = self.stats()?.last_lsn;
        index.reserve_exact(
            usize::try_from(last.0.saturating_add(1).saturating_sub(from)).unwrap_or(0),
        );
        self.for_each_log_index_from(Lsn(from), |epoch, id| index.push(epoch, id))?;
        Ok(index)
    }

    /// The saved index, if there is one, it decodes, and its last entry is the log's at that
    /// position (what [`crate::ReplicatedLog::load_index`] starts from).
    pub fn saved_log_index(&self) -> Result<Option<LogIndex>, JournalError> {
        guarded(|| {
            let txn = self.db.get()?.begin_read().map_err(storage)?;
            let log = txn.open_table(LOG).map_err(storage)?;
            // Room for the log's entries, and not for more whatever the saved header says.
            let room = usize::try_from(crate::log_table::last_lsn(&log)?).unwrap_or(usize::MAX);
            let Some(index) = read_saved(&txn, room)? else {
                return Ok(None);
            };
            let Some(last) = index.last() else {
                return Ok(None);
            };
            let at = index.len() as u64;
            let matches = crate::log_table::get(&log, at)?
                .and_then(Result::ok)
                .and_then(|bytes| {
                    LogRecord::decode(&bytes)
                        .ok()
                        .map(|r| (r.epoch, Sealer::peek_change_id(r.sealed)))
                })
                .is_some_and(|found| found == last);
            if !matches {
                tracing::warn!(
                    at,
                    "the saved log index does not match the log; reading the whole log"
                );
                return Ok(None);
            }
            Ok(Some(index))
        })
    }

    /// See [`crate::ReplicatedLog::save_index`].
    pub(crate) fn save_log_index(&self, index: &LogIndex) -> Result<(), JournalError> {
        // The saved form starts at position 1: a compacted log's index is read from the log.
        if index.is_empty() || index.base.0 .0 > 0 {
            return Ok(());
        }
        let save: u64 = rand::random();
        let chunks = LogIndex::chunks(index.len());
        let write = |from: u64, to: u64, header: bool| {
            self.db.write(|db| {
                let mut txn = WriteTxn::begin(db)?;
                txn.set_durability(Durability::None).map_err(storage)?;
                {
                    let mut saved = txn.open_table(LOG_INDEX).map_err(storage)?;
                    if from == 1 {
                        saved.remove(0).map_err(storage)?;
                    }
                    for number in from..to {
                        saved
                            .insert(number, index.encode_chunk(save, number).as_slice())
                            .map_err(storage)?;
                    }
                    if header {
                        // Chunks of an older, longer save are no longer needed.
                        loop {
                            let last = saved.last().map_err(storage)?.map(|(k, _)| k.value());
                            match last {
                                Some(stale) if stale > chunks => {
                                    saved.remove(stale).map_err(storage)?;
                                }
                                _ => break,
                            }
                        }
                        saved
                            .insert(0, index.encode_header(save).as_slice())
                            .map_err(storage)?;
                    }
                }
                txn.commit().map_err(storage)
            })
        };
        let mut from = 1;
        while from <= chunks {
            let to = (from + CHUNKS_PER_TXN).min(chunks + 1);
            write(from, to, false)?;
            from = to;
        }
        write(chunks + 1, chunks + 1, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn epoch(counter: u64) -> Epoch {
        Epoch {
            counter,
            device: DeviceId([counter as u8; 32]),
        }
    }

    #[test]
    fn an_index_round_trips_and_any_damage_is_refused() {
        let mut index = LogIndex::default();
        index.push(epoch(1), Some(ChangeId(Uuid::from_u128(1))));
        index.push(epoch(1), Some(ChangeId(Uuid::from_u128(2))));
        index.push(epoch(2), None);
        index.push(epoch(2), Some(ChangeId(Uuid::from_u128(3))));
        assert_eq!(index.runs().len(), 2);
        let listed: Vec<_> = index.iter().collect();
        assert_eq!(listed[1], (epoch(1), Some(ChangeId(Uuid::from_u128(2)))));
        assert_eq!(listed[2], (epoch(2), None));

        let header = index.encode_header(7);
        assert_eq!(
            LogIndex::decode_header(&header),
            Some((7, 4, index.runs().to_vec()))
        );
        let chunk = index.encode_chunk(7, 1);
        let mut back = LogIndex {
            base: Default::default(),
            runs: index.runs().to_vec(),
            ids: Vec::new(),
        };
        assert_eq!(back.decode_chunk_into(7, 1, 4, &chunk), Some(()));
        assert_eq!(back, index);

        for i in 0..header.len() {
            let mut bad = header.clone();
            bad[i] ^= 0x40;
            assert_eq!(
                LogIndex::decode_header(&bad),
                None,
                "flipped header byte {i}"
            );
        }
        for len in 0..header.len() {
            assert_eq!(
                LogIndex::decode_header(&header[..len]),
                None,
                "cut at {len}"
            );
        }
        let mut scratch = LogIndex::default();
        for i in 0..chunk.len() {
            let mut bad = chunk.clone();
            bad[i] ^= 0x40;
            assert_eq!(scratch.decode_chunk_into(7, 1, 4, &bad), None, "byte {i}");
        }
        // A chunk of another save, in another place, or of another length is refused.
        assert_eq!(scratch.decode_chunk_into(8, 1, 4, &chunk), None);
        assert_eq!(scratch.decode_chunk_into(7, 2, 4, &chunk), None);
        assert_eq!(scratch.decode_chunk_into(7, 1, 3, &chunk), None);
    }

    use redb::ReadableTableMetadata;

    /// A journal file with no log, for saving synthetic indexes.
    fn journal(dir: &std::path::Path) -> Journal {
        let device = DeviceId([3; 32]);
        Journal::open(
            &dir.join("j.redb"),
            keel_schema::LibraryId(Uuid::new_v4()),
            &crate::LibraryKey::generate(),
            device,
            crate::JournalOptions::default(),
        )
        .expect("opens")
    }

    fn read(journal: &Journal) -> Option<LogIndex> {
        let txn = journal.db.get().expect("open").begin_read().expect("reads");
        read_saved(&txn, CHUNK_ENTRIES).expect("reads")
    }

    fn synthetic(len: usize, salt: u128) -> LogIndex {
        let mut index = LogIndex::default();
        for i in 0..len {
            let id = (i % 1000 != 0).then(|| ChangeId(Uuid::from_u128(salt + i as u128)));
            index.push(epoch(1 + (i / 50_000) as u64), id);
        }
        index
    }

    #[test]
    fn a_long_index_is_saved_in_chunks_and_a_shorter_save_replaces_it_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let journal = journal(dir.path());
        let long = synthetic(3 * CHUNK_ENTRIES + 5, 1 << 64);
        journal.save_log_index(&long).expect("saves");
        assert_eq!(read(&journal).as_ref(), Some(&long));

        let short = synthetic(CHUNK_ENTRIES + 1, 1 << 80);
        journal.save_log_index(&short).expect("saves");
        assert_eq!(read(&journal).as_ref(), Some(&short));
        let txn = journal.db.get().expect("open").begin_read().expect("reads");
        let saved = txn.open_table(LOG_INDEX).expect("table");
        assert_eq!(
            saved.len().expect("len"),
            1 + LogIndex::chunks(short.len()),
            "the longer save's chunks are gone"
        );
        drop(saved);
        drop(txn);

        // A missing chunk voids the whole copy.
        let txn = journal
            .db
            .get()
            .expect("open")
            .begin_write()
            .expect("writes");
        txn.open_table(LOG_INDEX)
            .expect("table")
            .remove(2)
            .expect("removes");
        txn.commit().expect("commits");
        assert_eq!(read(&journal), None);
    }

    /// A header whose checksum is sound (it is not keyed: anyone with the file can write one)
    /// claiming 2^40 entries: the saved index is refused when its chunks are missing, without
    /// reserving room for the entries it claims first (about 26 TB: the allocation would abort
    /// the process).
    #[test]
    fn a_header_claiming_a_huge_index_is_refused_without_reserving_for_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let journal = journal(dir.path());
        let claimed: u64 = 1 << 40;
        let mut header = vec![INDEX_VERSION];
        header.extend_from_slice(&7u64.to_be_bytes());
        header.extend_from_slice(&claimed.to_be_bytes());
        header.extend_from_slice(&1u64.to_be_bytes());
        header.extend_from_slice(&0u64.to_be_bytes());
        header.extend_from_slice(&epoch(1).counter.to_be_bytes());
        header.extend_from_slice(&epoch(1).device.0);
        let sum = blake3::hash(&header);
        header.extend_from_slice(sum.as_bytes());
        assert!(LogIndex::decode_header(&header).is_some(), "a sound header");
        let txn = journal
            .db
            .get()
            .expect("open")
            .begin_write()
            .expect("writes");
        txn.open_table(LOG_INDEX)
            .expect("table")
            .insert(0, header.as_slice())
            .expect("inserts");
        txn.commit().expect("commits");
        assert_eq!(read(&journal), None);
    }
}
