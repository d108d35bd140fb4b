//! Job records: the engine's long-running jobs (state, progress, checkpoint), kept in the
//! journal's `jobs` table, sealed under the library key like changes (a job record names
//! folders). From [`Journal::jobs`].

use keel_schema::ChangeId;
use redb::{Durability, ReadableDatabase, ReadableTable};
use uuid::Uuid;

use crate::error::{guarded, storage, JournalError, RecordPlace, WriteTxn};
use crate::store::Journal;
use crate::tables::JOBS;

/// Largest job record stored or read (a checkpoint is small; anything larger is not ours).
pub const JOB_RECORD_MAX: usize = 64 * 1024;

impl Journal {
    /// The job records.
    pub fn jobs(&self) -> JobRecords<'_> {
        JobRecords { journal: self }
    }
}

/// The job records of a journal. From [`Journal::jobs`].
#[derive(Clone, Copy)]
pub struct JobRecords<'a> {
    journal: &'a Journal,
}

impl JobRecords<'_> {
    /// Durably stores the record of job `id` (replacing the one it had).
    pub fn put(&self, id: Uuid, record: &[u8]) -> Result<(), JournalError> {
        if record.len() > JOB_RECORD_MAX {
            return Err(JournalError::Corrupt(format!(
                "a job record of {} bytes (at most {JOB_RECORD_MAX})",
                record.len()
            )));
        }
        let sealed = self.journal.seal_bytes(ChangeId(id), record);
        let key = id.to_string();
        self.journal.db.write(|db| {
            let mut txn = WriteTxn::begin(db)?;
            txn.set_durability(Durability::Immediate).map_err(storage)?;
            {
                let mut jobs = txn.open_table(JOBS).map_err(storage)?;
                jobs.insert(key.as_str(), sealed.as_slice())
                    .map_err(storage)?;
            }
            txn.commit().map_err(storage)?;
            Ok(())
        })
    }

    /// Removes the record of job `id`.
    pub fn remove(&self, id: Uuid) -> Result<(), JournalError> {
        let key = id.to_string();
        self.journal.db.write(|db| {
            let mut txn = WriteTxn::begin(db)?;
            txn.set_durability(Durability::Immediate).map_err(storage)?;
            {
                let mut jobs = txn.open_table(JOBS).map_err(storage)?;
                jobs.remove(key.as_str()).map_err(storage)?;
            }
            txn.commit().map_err(storage)?;
            Ok(())
        })
    }

    /// Every job record, opened. A record that does not open (damaged, another library's) is
    /// an error naming it.
    pub fn all(&self) -> Result<Vec<(Uuid, Vec<u8>)>, JournalError> {
        let sealed: Vec<(String, Vec<u8>)> = guarded(|| {
            let txn = self.journal.db.get()?.begin_read().map_err(storage)?;
            let jobs = txn.open_table(JOBS).map_err(storage)?;
            let mut out = Vec::new();
            for row in jobs.iter().map_err(storage)? {
                let (key, value) = row.map_err(storage)?;
                out.push((key.value().to_string(), value.value().to_vec()));
            }
            Ok(out)
        })?;
        let mut out = Vec::with_capacity(sealed.len());
        for (key, sealed) in sealed {
            let id = Uuid::parse_str(&key).map_err(|e| JournalError::BadRecord {
                place: RecordPlace::Job(Uuid::nil()),
                reason: format!("key {key:?}: {e}"),
            })?;
            let bad = |reason: String| JournalError::BadRecord {
                place: RecordPlace::Job(id),
                reason,
            };
            if sealed.len() > JOB_RECORD_MAX + 128 {
                return Err(bad("too large".into()));
            }
            let (named, plain) = self.journal.open_bytes(&sealed).map_err(bad)?;
            if named != ChangeId(id) {
                return Err(bad("sealed for another job".into()));
            }
            out.push((id, plain));
        }
        Ok(out)
    }
}
