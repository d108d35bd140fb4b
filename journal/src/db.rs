//! The journal's redb database, behind a handle that can close and open it again.
//!
//! redb latches after an I/O error: every later call answers `PreviousIo` until the database is
//! closed and opened again (which repairs it from its last committed state). The handle does
//! that, so a journal whose disk failed once, or filled up and then got room, takes commits again
//! without a restart. Whoever writes calls [`DbHandle::reopen`] after a failed write; a handle
//! left closed (the open failed too) tries again at the next [`DbHandle::get`].

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use redb::Database;

use crate::error::{guarded, storage, JournalError};

use crate::store::JOURNAL_CACHE_BYTES;

/// How long a reopen waits for the readers still holding the old database.
const REOPEN_WAIT: Duration = Duration::from_secs(5);
/// How often, at most, a read tries to open a database left closed (an open repairs the file,
/// which reads all of it).
const RETRY_EVERY: Duration = Duration::from_millis(100);

/// What must be done to a database opened again before anyone reads it: take back a write
/// whose sync failed (see [`DbHandle::reopen_undoing`]).
pub(crate) type Undo = Box<dyn Fn(&Database) -> Result<(), JournalError> + Send + Sync>;

/// The open database, shared by the journal's handles and its writer.
pub(crate) struct DbHandle {
    /// `None` while closed after a failure that the reopen did not get past.
    slot: RwLock<Option<Arc<Database>>>,
    /// Run on the database at its next open, before it is handed out.
    undo: std::sync::Mutex<Option<Undo>>,
    /// When an open was last tried (see [`RETRY_EVERY`]).
    tried: std::sync::Mutex<Option<Instant>>,
    path: PathBuf,
    direct_writes: bool,
}

impl DbHandle {
    /// Opens (or creates) the file at `path`.
    pub(crate) fn open(path: &Path, direct_writes: bool) -> Result<Self, JournalError> {
        Ok(Self {
            slot: RwLock::new(Some(Arc::new(open_database(path, direct_writes)?))),
            undo: std::sync::Mutex::new(None),
            tried: std::sync::Mutex::new(None),
            path: path.to_path_buf(),
            direct_writes,
        })
    }

    /// The database; opens it again first if a failure left it closed (at most every
    /// [`RETRY_EVERY`]: between tries it answers `Unavailable` at once).
    pub(crate) fn get(&self) -> Result<Arc<Database>, JournalError> {
        if let Some(db) = self.read_slot()?.as_ref() {
            return Ok(db.clone());
        }
        {
            let mut tried = self.tried.lock().map_err(|_| poisoned())?;
            if tried.is_some_and(|at| at.elapsed() < RETRY_EVERY) {
                return Err(JournalError::Unavailable(
                    "the storage failed; the next try to open it again is due soon".into(),
                ));
            }
            *tried = Some(Instant::now());
        }
        self.get_or_open()
    }

    /// The database, opening it again now if a failure left it closed (the writer's: a
    /// commit after the fault cleared must not wait for the next try).
    pub(crate) fn get_or_open(&self) -> Result<Arc<Database>, JournalError> {
        if let Some(db) = self.read_slot()?.as_ref() {
            return Ok(db.clone());
        }
        self.reopen()?;
        self.read_slot()?
            .clone()
            .ok_or_else(|| JournalError::Unavailable("closed".into()))
    }

    fn read_slot(
        &self,
    ) -> Result<std::sync::RwLockReadGuard<'_, Option<Arc<Database>>>, JournalError> {
        self.slot.read().map_err(|_| poisoned())
    }

    /// Closes the database and opens it again (after a failed write: redb answers `PreviousIo`
    /// to everything until then). Waits a while for readers that still hold the old one. On
    /// failure the handle stays closed, and the next [`DbHandle::get`] tries again.
    pub(crate) fn reopen(&self) -> Result<(), JournalError> {
        let mut slot = self.slot.write().map_err(|_| poisoned())?;
        if let Some(old) = slot.take() {
            drop_guarded(sole(old)?);
        }
        let deadline = Instant::now() + REOPEN_WAIT;
        let db = loop {
            // Transactions still alive keep the file locked for a moment.
            match open_database(&self.path, self.direct_writes) {
                Ok(db) => break db,
                Err(JournalError::AlreadyOpen) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(e),
            }
        };
        let mut undo = self.undo.lock().map_err(|_| poisoned())?;
        if let Some(take_back) = undo.as_ref() {
            if let Err(e) = guarded(|| take_back(&db)) {
                drop_guarded(db);
                return Err(e);
            }
            *undo = None;
        }
        *slot = Some(Arc::new(db));
        tracing::info!(path = %self.path.display(), "journal opened again after a storage failure");
        Ok(())
    }

    /// [`DbHandle::reopen`] after a write whose outcome is in doubt: `undo` runs on the
    /// database as soon as it opens again (now or at a later open), before anyone else reads
    /// it, so nothing reads what the disk never confirmed.
    pub(crate) fn reopen_undoing(&self, undo: Undo) -> Result<(), JournalError> {
        *self.undo.lock().map_err(|_| poisoned())? = Some(undo);
        self.reopen()
    }

    /// Runs `write` on the database (inside `guarded`); if the storage fails, opens the
    /// database again, so the next write does not find redb refusing everything.
    pub(crate) fn write<T>(
        &self,
        write: impl FnOnce(&Database) -> Result<T, JournalError>,
    ) -> Result<T, JournalError> {
        let db = self.get()?;
        let result = guarded(|| write(&db));
        drop(db);
        match &result {
            Err(e) if e.is_storage_failure() => self.reopen_after(result),
            _ => result,
        }
    }

    /// [`DbHandle::reopen`] after `result` failed, logging a reopen that fails too; `result`
    /// unchanged.
    pub(crate) fn reopen_after<T>(
        &self,
        result: Result<T, JournalError>,
    ) -> Result<T, JournalError> {
        if let Err(failed) = &result {
            if let Err(error) = self.reopen() {
                tracing::error!(%failed, %error, "the journal could not be opened again after a failure; commits are refused until it can");
            }
        }
        result
    }
}

impl Drop for DbHandle {
    fn drop(&mut self) {
        let db = match self.slot.get_mut() {
            Ok(slot) => slot.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        if let Some(db) = db.and_then(|db| Arc::try_unwrap(db).ok()) {
            drop_guarded(db);
        }
    }
}

/// The database once nobody else holds it (readers hold it for the length of one call).
fn sole(mut db: Arc<Database>) -> Result<Database, JournalError> {
    let deadline = Instant::now() + REOPEN_WAIT;
    loop {
        match Arc::try_unwrap(db) {
            Ok(db) => return Ok(db),
            Err(shared) if Instant::now() < deadline => {
                db = shared;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(_) => {
                return Err(JournalError::Unavailable(
                    "still in use by a reader; not opened again yet".into(),
                ))
            }
        }
    }
}

fn poisoned() -> JournalError {
    JournalError::Unavailable("a thread panicked while opening it".into())
}

/// Drops `db` inside `catch_unwind`: closing a file whose pages were damaged must not take the
/// process down.
fn drop_guarded(db: Database) {
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(db)));
}

/// Creates an empty journal at `path` so that the file appears there only once redb has
/// initialised it. redb writes its header, syncs, then writes its magic number and syncs
/// again: a file cut by a power loss between the two is refused ever after ("not a redb
/// database"). Built beside it under another name, synced, renamed, and the folder synced.
fn create_aside(path: &Path) -> Result<(), JournalError> {
    let io = |e: std::io::Error| JournalError::Storage(redb::Error::Io(e));
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".creating");
    let aside = path.with_file_name(name);
    match std::fs::remove_file(&aside) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
        _ => {}
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&aside)
        .map_err(io)?;
    let backend = redb::backends::FileBackend::new(file).map_err(storage)?;
    #[cfg(feature = "faults")]
    let planned = crate::faults::planned_for(path);
    #[cfg(feature = "faults")]
    if let Some(faults) = planned.clone() {
        let faulty = crate::faults::Faulty::new(backend, faults);
        drop(
            Database::builder()
                .create_with_backend(faulty)
                .map_err(storage)?,
        );
    } else {
        drop(
            Database::builder()
                .create_with_backend(backend)
                .map_err(storage)?,
        );
    }
    #[cfg(not(feature = "faults"))]
    drop(
        Database::builder()
            .create_with_backend(backend)
            .map_err(storage)?,
    );
    std::fs::rename(&aside, path).map_err(io)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
    }
    #[cfg(feature = "faults")]
    if let Some(faults) = planned {
        faults.appeared();
    }
    Ok(())
}

/// Opens (or creates) the redb file, with direct writes when asked and possible. The storage
/// engine may panic on a damaged file: that is a typed error here.
fn open_database(path: &Path, direct_writes: bool) -> Result<Database, JournalError> {
    let absent = std::fs::metadata(path).map_or(true, |m| m.len() == 0);
    if absent {
        create_aside(path)?;
    }
    let opened = std::panic::catch_unwind(|| {
        let mut builder = Database::builder();
        builder.set_cache_size(JOURNAL_CACHE_BYTES);
        // As `create` opens it.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        #[cfg(feature = "faults")]
        if let Some(faults) = crate::faults::planned_for(path) {
            let inner = redb::backends::FileBackend::new(file)?;
            return builder.create_with_backend(crate::filled_growth::FilledGrowth::over(
                crate::faults::Faulty::new(inner, faults),
            ));
        }
        #[cfg(unix)]
        if direct_writes {
            use crate::direct_writes::DirectWrites;
            if let Some(direct) = DirectWrites::open_direct(path) {
                return builder.create_with_backend(DirectWrites::new(file, direct)?);
            }
        }
        builder.create_with_backend(crate::filled_growth::FilledGrowth::new(file)?)
    });
    let db = match opened {
        Ok(result) => result.map_err(storage)?,
        Err(_) => {
            return Err(JournalError::Corrupt(
                "the storage engine refused the file".into(),
            ))
        }
    };
    Ok(db)
}
