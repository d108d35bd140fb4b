//! Fast loading of an empty projection (a replay from the start): a rollback journal and no
//! syncs instead of WAL, guarded by a marker file.
//!
//! In WAL mode every page is written twice (to the WAL, then to the file by a checkpoint). A
//! replay into an empty projection needs neither the WAL's crash safety nor its concurrent
//! readers: if it stops halfway, starting it over is the recovery. So while it runs:
//! - a marker file `<projection>.loading` exists (written and synced before anything else);
//! - the connection uses `journal_mode=PERSIST` (a failed statement or transaction still rolls
//!   back) and `synchronous=OFF`: the rollback journal is a file the page cache holds, reused
//!   by each transaction, not heap memory (`MEMORY` held a copy of every page a transaction
//!   changed, which grows with the library: 703 MB of peak RSS replaying 10M entries);
//! - at the end the file is synced, the connection returns to WAL, and the marker is removed.
//!
//! A marker found by [`crate::Projections::open`] means a load was cut short and the file may be
//! damaged: the projection files are deleted and the projection starts empty, to be replayed.

use std::path::{Path, PathBuf};

use crate::checkpoint::Checkpointer;
use crate::error::ProjectionError;
use crate::store::Projections;

/// The marker of a fast load in progress, beside the projection file.
pub(crate) fn marker_path(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push(".loading");
    PathBuf::from(name)
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ProjectionError + '_ {
    move |source| ProjectionError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Syncs the folder holding `path`, so a created or removed name is durable.
fn sync_parent(path: &Path) -> Result<(), ProjectionError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io(dir))?;
    }
    Ok(())
}

/// If a fast load of `db` was cut short, deletes the projection files and the marker. Returns
/// whether it did.
pub(crate) fn discard_interrupted_load(db: &Path) -> Result<bool, ProjectionError> {
    let marker = marker_path(db);
    if !marker.exists() {
        return Ok(false);
    }
    tracing::warn!(
        path = %db.display(),
        "a replay into this projection was cut short; starting it over"
    );
    Projections::remove_files(db)?;
    std::fs::remove_file(&marker).map_err(io(&marker))?;
    sync_parent(db)?;
    Ok(true)
}

impl Projections {
    /// Deletes the projection file at `db` and SQLite's files beside it (`-wal`, `-shm`,
    /// `-journal`); missing ones are fine. No connection may be open on it.
    pub fn remove_files(db: &Path) -> Result<(), ProjectionError> {
        for suffix in ["", "-wal", "-shm", "-journal"] {
            let mut name = db.as_os_str().to_owned();
            name.push(suffix);
            let file = PathBuf::from(name);
            match std::fs::remove_file(&file) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(&file)(e)),
            }
        }
        Ok(())
    }

    /// Moves the projection file at `from` and SQLite's files beside it to `to` (whose files must
    /// be gone), and syncs the folder. No connection may be open on either.
    pub fn rename_files(from: &Path, to: &Path) -> Result<(), ProjectionError> {
        // The main file last: until it moves, `to` has no database, only leftovers SQLite
        // ignores without one.
        for suffix in ["-wal", "-shm", "-journal", ""] {
            let (mut source, mut target) = (from.as_os_str().to_owned(), to.as_os_str().to_owned());
            source.push(suffix);
            target.push(suffix);
            match std::fs::rename(&source, &target) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && !suffix.is_empty() => {}
                Err(e) => return Err(io(Path::new(&source))(e)),
            }
        }
        sync_parent(to)
    }

    /// Starts a fast load (see the module docs) of this projection, which must be empty and the
    /// only connection to its file. Returns `false`, changing nothing, when another connection
    /// holds the file (SQLite then keeps WAL mode). End it with [`Projections::end_fast_load`].
    pub fn begin_fast_load(&mut self) -> Result<bool, ProjectionError> {
        if self.fast_load {
            return Ok(true);
        }
        let marker = marker_path(&self.path);
        std::fs::File::create(&marker)
            .and_then(|f| f.sync_all())
            .map_err(io(&marker))?;
        sync_parent(&marker)?;
        // The checkpointer's connection would keep the file in WAL mode.
        self.checkpointer = None;
        // Another connection to the file makes SQLite refuse (busy) or keep WAL mode.
        let switched = match self
            .conn
            .query_row("PRAGMA journal_mode=PERSIST", [], |r| r.get::<_, String>(0))
        {
            Ok(mode) => Ok(mode.eq_ignore_ascii_case("persist")),
            Err(rusqlite::Error::SqliteFailure(e, _))
                if matches!(
                    e.code,
                    rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
                ) =>
            {
                Ok(false)
            }
            Err(e) => Err(e),
        };
        if switched.as_ref().map_or(true, |on| !on) {
            std::fs::remove_file(&marker).map_err(io(&marker))?;
            self.checkpointer = Some(Checkpointer::start(&self.path)?);
            return switched.map_err(ProjectionError::from);
        }
        self.conn.pragma_update(None, "synchronous", "OFF")?;
        self.fast_load = true;
        tracing::info!(path = %self.path.display(), "loading without WAL (fast load)");
        Ok(true)
    }

    /// Ends a fast load: syncs the file, returns to WAL mode and `synchronous=NORMAL`, removes the
    /// marker and restarts the background checkpointer. Does nothing if none runs.
    pub fn end_fast_load(&mut self) -> Result<(), ProjectionError> {
        if !self.fast_load {
            return Ok(());
        }
        self.conn.pragma_update(None, "synchronous", "NORMAL")?;
        let mode: String = self
            .conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(ProjectionError::JournalMode(mode));
        }
        std::fs::File::open(&self.path)
            .and_then(|f| f.sync_all())
            .map_err(io(&self.path))?;
        let marker = marker_path(&self.path);
        std::fs::remove_file(&marker).map_err(io(&marker))?;
        sync_parent(&marker)?;
        self.checkpointer = Some(Checkpointer::start(&self.path)?);
        self.fast_load = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn journal_mode(p: &Projections) -> String {
        p.connection()
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .expect("mode")
    }

    #[test]
    fn a_lone_connection_loads_fast_and_returns_to_wal() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("p.sqlite");
        let mut p = Projections::open(&path).expect("opens");
        assert!(p.begin_fast_load().expect("switches"));
        assert!(marker_path(&path).exists());
        assert_eq!(journal_mode(&p), "persist");
        p.connection()
            .execute_batch("INSERT INTO _meta (key, value) VALUES ('applied_lsn', 42)")
            .expect("writes");
        p.end_fast_load().expect("ends");
        assert!(!marker_path(&path).exists());
        assert_eq!(journal_mode(&p), "wal");
        // The rollback journal the load wrote goes with it.
        assert!(!dir.path().join("p.sqlite-journal").exists());
    }

    #[test]
    fn a_load_cut_short_is_discarded_on_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("p.sqlite");
        {
            let mut p = Projections::open(&path).expect("opens");
            assert!(p.begin_fast_load().expect("switches"));
            p.connection()
                .execute_batch("INSERT INTO _meta (key, value) VALUES ('applied_lsn', 42)")
                .expect("writes");
            // Dropped without `end_fast_load`: the process stopped mid-load.
        }
        assert!(marker_path(&path).exists());
        let p = Projections::open(&path).expect("reopens");
        assert!(!marker_path(&path).exists(), "the marker is cleared");
        assert_eq!(
            p.applied_position().expect("reads").log.0,
            0,
            "the partial load is gone: the projection starts empty"
        );
        assert_eq!(journal_mode(&p), "wal");
    }

    #[test]
    fn a_second_connection_keeps_wal_and_no_marker() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("p.sqlite");
        let mut p = Projections::open(&path).expect("opens");
        let reader = Projections::open_reader(&path).expect("reader");
        // The reader must hold the file: a read transaction keeps it in WAL mode.
        let _: i64 = reader
            .connection()
            .query_row("SELECT count(*) FROM entry", [], |r| r.get(0))
            .expect("reads");
        assert!(!p.begin_fast_load().expect("answers"));
        assert!(!marker_path(&path).exists());
        assert_eq!(journal_mode(&p), "wal");
    }
}
