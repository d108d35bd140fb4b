//! The log index: each log position's epoch and change id, without the payloads (what the
//! replication core holds in memory), and its saved copy in the meta table.
//!
//! Reading the index from the log means reading every record (a 2M-entry log is ~640 MB and took
//! ~0.9 s). A node saves the index when it stops, and a device that received the log in an
//! initial sync saves what it built while storing it; loading then reads the saved copy and only
//! the records after it. The copy is only a cache:
//! - it carries a BLAKE3 checksum and its last entry must match the log record at its position,
//!   otherwise the log is read in full;
//! - a truncation of the log deletes it in the same transaction (the only write that changes an
//!   existing position).

use keel_schema::{ChangeId, DeviceId, Epoch, Lsn};
use redb::{Durability, ReadableDatabase};
use uuid::Uuid;

use crate::error::{guarded, storage, JournalError};
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

/// Each log position's epoch and change id (`None` for a barrier), held compactly: the ids in
/// order and the epochs as runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogIndex {
    /// `(index of the first entry, epoch)`, increasing, no two neighbours with the same epoch.
    runs: Vec<(u64, Epoch)>,
    /// Entry `i` is at position `i + 1`.
    ids: Vec<Option<ChangeId>>,
}

impl LogIndex {
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

    /// Bytes of [`LogIndex::encode_into`]'s output.
    fn encoded_len(&self) -> usize {
        1 + 16 + self.runs.len() * RUN_LEN + self.ids.len() * ENTRY_LEN + 32
    }

    /// Writes the saved form into `out`, exactly [`LogIndex::encoded_len`] bytes long: version,
    /// run count, entry count, the runs, the entries, and a BLAKE3 of all that.
    fn encode_into(&self, out: &mut [u8]) {
        let mut at = 0;
        let mut put = |bytes: &[u8]| {
            out[at..at + bytes.len()].copy_from_slice(bytes);
            at += bytes.len();
        };
        put(&[INDEX_VERSION]);
        put(&(self.runs.len() as u64).to_be_bytes());
        put(&(self.ids.len() as u64).to_be_bytes());
        for (start, epoch) in &self.runs {
            put(&start.to_be_bytes());
            put(&epoch.counter.to_be_bytes());
            put(&epoch.device.0);
        }
        for id in &self.ids {
            match id {
                Some(id) => {
                    put(&[1]);
                    put(id.0.as_bytes());
                }
                None => put(&[0; ENTRY_LEN]),
            }
        }
        let body = out.len() - 32;
        let sum = blake3::hash(&out[..body]);
        out[body..].copy_from_slice(sum.as_bytes());
    }

    #[cfg(test)]
    fn encode(&self) -> Vec<u8> {
        let mut out = vec![0; self.encoded_len()];
        self.encode_into(&mut out);
        out
    }

    /// Decodes [`LogIndex::encode`] output; `None` if anything is off.
    fn decode(bytes: &[u8]) -> Option<Self> {
        let (body, sum) = bytes.split_at_checked(bytes.len().checked_sub(32)?)?;
        if blake3::hash(body).as_bytes() != sum {
            return None;
        }
        let (&version, rest) = body.split_first()?;
        if version != INDEX_VERSION {
            return None;
        }
        let u64_at = |b: &[u8], at: usize| -> Option<u64> {
            Some(u64::from_be_bytes(b.get(at..at + 8)?.try_into().ok()?))
        };
        let runs_len = usize::try_from(u64_at(rest, 0)?).ok()?;
        let ids_len = usize::try_from(u64_at(rest, 8)?).ok()?;
        let runs_bytes = runs_len.checked_mul(RUN_LEN)?;
        let ids_bytes = ids_len.checked_mul(ENTRY_LEN)?;
        if rest.len() != 16usize.checked_add(runs_bytes)?.checked_add(ids_bytes)? {
            return None;
        }
        let (runs_part, ids_part) = rest[16..].split_at(runs_bytes);
        let mut runs = Vec::with_capacity(runs_len);
        for run in runs_part.chunks_exact(RUN_LEN) {
            let start = u64_at(run, 0)?;
            let counter = u64_at(run, 8)?;
            let device = DeviceId(run[16..].try_into().ok()?);
            // Runs start at 0, increase, and each starts inside the entries.
            let fine = match runs.last() {
                None => start == 0,
                Some((previous, _)) => start > *previous && start < ids_len as u64,
            };
            if !fine {
                return None;
            }
            runs.push((start, Epoch { counter, device }));
        }
        if runs.is_empty() != (ids_len == 0) {
            return None;
        }
        let mut ids = Vec::with_capacity(ids_len);
        for entry in ids_part.chunks_exact(ENTRY_LEN) {
            ids.push(match entry[0] {
                0 => None,
                1 => Some(ChangeId(Uuid::from_slice(&entry[1..]).ok()?)),
                _ => return None,
            });
        }
        Some(Self { runs, ids })
    }
}

impl Journal {
    /// The log index (see [`LogIndex`]): the saved copy, if it is sound and still matches the
    /// log, extended by the records after it; otherwise read from every record. Fails on a gap
    /// or on a record read whose header cannot be read.
    pub fn load_log_index(&self) -> Result<LogIndex, JournalError> {
        let mut index = self.saved_log_index()?.unwrap_or_default();
        self.for_each_log_index_from(Lsn(index.len() as u64 + 1), |epoch, id| {
            index.push(epoch, id)
        })?;
        Ok(index)
    }

    /// The saved index, if there is one, it decodes, and its last entry is the log's at that
    /// position (what [`Journal::load_log_index`] starts from).
    pub fn saved_log_index(&self) -> Result<Option<LogIndex>, JournalError> {
        guarded(|| {
            let txn = self.db.begin_read().map_err(storage)?;
            let saved = match txn.open_table(LOG_INDEX) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
                Err(e) => return Err(storage(e)),
            };
            let Some(bytes) = saved.get(0).map_err(storage)? else {
                return Ok(None);
            };
            let Some(index) = LogIndex::decode(bytes.value()) else {
                tracing::warn!("the saved log index is damaged; reading the whole log");
                return Ok(None);
            };
            let Some(last) = index.last() else {
                return Ok(None);
            };
            let log = txn.open_table(LOG).map_err(storage)?;
            let at = index.len() as u64;
            let matches = log
                .get(at)
                .map_err(storage)?
                .and_then(|v| {
                    LogRecord::decode(v.value())
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

    /// Saves `index` as the log index, for [`Journal::load_log_index`]. It must be the index of
    /// this journal's log from position 1 (the load checks its last entry against the log and
    /// ignores it otherwise). Not synced on its own (a cache: lost in a crash, the next start
    /// reads the log); the next durable commit makes it durable.
    pub fn save_log_index(&self, index: &LogIndex) -> Result<(), JournalError> {
        if index.is_empty() {
            return Ok(());
        }
        guarded(|| {
            let mut txn = self.db.begin_write().map_err(storage)?;
            txn.set_durability(Durability::None).map_err(storage)?;
            {
                let mut saved = txn.open_table(LOG_INDEX).map_err(storage)?;
                // Written in place: no second copy of a large index in memory.
                let mut value = saved
                    .insert_reserve(0, index.encoded_len())
                    .map_err(storage)?;
                index.encode_into(value.as_mut());
            }
            txn.commit().map_err(storage)
        })
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
        let bytes = index.encode();
        assert_eq!(LogIndex::decode(&bytes), Some(index.clone()));
        let listed: Vec<_> = index.iter().collect();
        assert_eq!(listed[1], (epoch(1), Some(ChangeId(Uuid::from_u128(2)))));
        assert_eq!(listed[2], (epoch(2), None));
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x40;
            assert_eq!(LogIndex::decode(&bad), None, "flipped byte {i}");
        }
        for len in 0..bytes.len() {
            assert_eq!(LogIndex::decode(&bytes[..len]), None, "cut at {len}");
        }
    }
}
