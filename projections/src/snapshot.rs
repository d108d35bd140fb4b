//! Projection snapshots, so a device that joins need not replay the whole log: a consistent copy
//! of the projection file taken with SQLite's online backup while the applier keeps writing,
//! and installing a received copy in place of a new device's projection.
//!
//! A copy is a pure function of the changes applied (apply is order-independent), so a copy
//! that has applied log positions `..=n` is what replaying those positions would build. The copy
//! may also hold the sender's own changes that are not in its log yet; they reach the log later,
//! and applying a change twice changes nothing.

use std::path::Path;

use keel_schema::Lsn;
use rusqlite::{Connection, OpenFlags};

use crate::ddl::{FORGETS_DELETED_FROM, SCHEMA_VERSION};
use crate::error::ProjectionError;
use crate::store::{configure_connection, AppliedPosition, Projections};

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ProjectionError + '_ {
    move |source| ProjectionError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn applied_in(conn: &Connection) -> Result<AppliedPosition, ProjectionError> {
    let read = |key: &str| -> Result<u64, ProjectionError> {
        let v: Option<i64> = conn
            .query_row("SELECT value FROM _meta WHERE key = ?1", [key], |r| {
                r.get(0)
            })
            .ok();
        Ok(v.and_then(|v| u64::try_from(v).ok()).unwrap_or(0))
    };
    Ok(AppliedPosition {
        log: Lsn(read("applied_lsn")?),
        local: read("applied_local")?,
    })
}

/// `file:` URI of `path`, opened immutable (its bytes read as they are, no WAL, no locks).
fn file_uri(path: &Path) -> Result<String, ProjectionError> {
    let text = path
        .to_str()
        .ok_or_else(|| ProjectionError::BadSnapshot(format!("{} is not UTF-8", path.display())))?;
    let mut uri = String::from("file:");
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"/._-~".contains(&byte) {
            uri.push(char::from(byte));
        } else {
            uri.push_str(&format!("%{byte:02X}"));
        }
    }
    uri.push_str("?immutable=1");
    Ok(uri)
}

/// A projection file frozen for copying. While this lives, SQLite writes nothing to the file:
/// it holds a read transaction that reads the file alone (the WAL was empty when it began), and
/// such a reader keeps every checkpoint from copying pages back. New commits wait in the WAL.
/// So the file's bytes, read with ordinary file reads, are one consistent state.
pub struct FrozenFile {
    /// The connection holding the read transaction.
    _conn: Connection,
    /// The file.
    pub path: std::path::PathBuf,
    /// Its length when frozen.
    pub len: u64,
    /// The position it has applied.
    pub applied: AppliedPosition,
}

impl std::fmt::Debug for FrozenFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FrozenFile({}, {} bytes)", self.path.display(), self.len)
    }
}

impl Projections {
    /// Freezes this projection's file for copying (see [`FrozenFile`]); no apply may run
    /// meanwhile, which `&self` on the writer ensures. Checkpoints the WAL into the file first.
    /// Returns `None` when the file cannot be frozen (not in WAL mode, or a reader kept the
    /// checkpoint from finishing): copy it with [`Projections::snapshot`] then.
    pub fn freeze(&self) -> Result<Option<FrozenFile>, ProjectionError> {
        let mode: String = self
            .conn
            .pragma_query_value(None, "journal_mode", |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Ok(None);
        }
        let (busy, log, done): (i64, i64, i64) =
            self.conn
                .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })?;
        if busy != 0 || log != done {
            return Ok(None);
        }
        let conn = Connection::open(&self.path)?;
        conn.pragma_update(None, "query_only", "ON")?;
        conn.execute_batch("BEGIN")?;
        // The first read starts the transaction, on the file alone: the WAL is empty.
        let applied = applied_in(&conn)?;
        let len = std::fs::metadata(&self.path).map_err(io(&self.path))?.len();
        Ok(Some(FrozenFile {
            _conn: conn,
            path: self.path.clone(),
            len,
            applied,
        }))
    }

    /// Copies the projection file `src` (open elsewhere, in WAL mode) into the new file `dest`,
    /// as of one read transaction, and returns the position the copy has applied. `dest` is a
    /// scratch file: it is written without a journal or syncs, and must be removed by the caller.
    pub fn snapshot(src: &Path, dest: &Path) -> Result<AppliedPosition, ProjectionError> {
        let source = Connection::open_with_flags(
            src,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        source.busy_timeout(std::time::Duration::from_secs(5))?;
        if dest.exists() {
            std::fs::remove_file(dest).map_err(io(dest))?;
        }
        let mut copy = Connection::open(dest)?;
        copy.pragma_update(None, "journal_mode", "OFF")?;
        copy.pragma_update(None, "synchronous", "OFF")?;
        {
            let backup = rusqlite::backup::Backup::new(&source, &mut copy)?;
            // All pages in one step: one read transaction on the source, so one consistent state.
            match backup.step(-1)? {
                rusqlite::backup::StepResult::Done => {}
                other => {
                    return Err(ProjectionError::BadSnapshot(format!(
                        "the copy did not finish ({other:?})"
                    )))
                }
            }
        }
        let applied = applied_in(&copy)?;
        copy.close().map_err(|(_, e)| e)?;
        Ok(applied)
    }

    /// Checks the structure of the projection file at `path` (SQLite's `quick_check`), as its
    /// bytes are on disk: the file is opened immutable, so a WAL beside it is not read. Meant
    /// for a [`FrozenFile`] (whose bytes do not change while it lives) or a copy: the sending
    /// side checks what it sends while it sends it, and the receiver, which checks the bytes
    /// it got against the sender's hash, need not read the whole file back.
    pub fn check_file(path: &Path) -> Result<(), ProjectionError> {
        let conn = Connection::open_with_flags(
            file_uri(path)?,
            OpenFlags::SQLITE_OPEN_READ_ONLY
                | OpenFlags::SQLITE_OPEN_URI
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        let check: String = conn.pragma_query_value(None, "quick_check", |r| r.get(0))?;
        if check != "ok" {
            return Err(ProjectionError::BadSnapshot(format!(
                "the file is damaged: {check}"
            )));
        }
        Ok(())
    }

    /// Makes the copy `path` (made by [`Projections::snapshot`], not open elsewhere) claim no
    /// more than log position `at` as applied, so that a replay goes over the positions after
    /// `at` again (applying a change twice changes nothing): a snapshot taken past its log's
    /// compaction base replays from the base, whatever the log after it became.
    pub fn replay_from(path: &Path, at: Lsn) -> Result<(), ProjectionError> {
        let conn = Connection::open(path)?;
        let at = i64::try_from(at.0).map_err(|_| {
            ProjectionError::BadSnapshot(format!("position {} is out of range", at.0))
        })?;
        conn.execute(
            "UPDATE _meta SET value = min(value, ?1) WHERE key = 'applied_lsn'",
            [at],
        )?;
        conn.close().map_err(|(_, e)| e)?;
        Ok(())
    }

    /// Installs `incoming`, a file made by [`Projections::snapshot`] on another device of the
    /// library and received whole, as the projection file `dest`, replacing whatever `dest` held.
    /// Checks it is a projection of this schema, records that none of this device's own
    /// changes are applied in it (they are applied again from the journal on open), syncs it and
    /// moves it in place. Returns the log position it has applied, which must not be past
    /// `stored` (the end of the log this device holds): such a file is refused before it
    /// replaces anything, since the library could not open with it.
    pub fn install_snapshot(
        incoming: &Path,
        dest: &Path,
        stored: Lsn,
    ) -> Result<Lsn, ProjectionError> {
        let applied = {
            let conn = Connection::open(incoming)?;
            let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
            // A version 9 file is migrated when it is opened (see `FORGETS_DELETED_FROM`).
            if version != SCHEMA_VERSION && version != FORGETS_DELETED_FROM - 1 {
                return Err(ProjectionError::BadSnapshot(format!(
                    "schema version {version}, this build has {SCHEMA_VERSION}"
                )));
            }
            configure_connection(&conn)?;
            let applied = applied_in(&conn)?.log;
            if applied > stored {
                return Err(ProjectionError::BadSnapshot(format!(
                    "it has applied log position {} but the log here ends at {}",
                    applied.0, stored.0
                )));
            }
            conn.execute(
                "INSERT OR REPLACE INTO _meta (key, value) VALUES ('applied_local', 0)",
                [],
            )?;
            conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
            conn.close().map_err(|(_, e)| e)?;
            applied
        };
        std::fs::File::open(incoming)
            .and_then(|f| f.sync_all())
            .map_err(io(incoming))?;
        Projections::remove_files(dest)?;
        std::fs::rename(incoming, dest).map_err(io(dest))?;
        if let Some(dir) = dest.parent() {
            // The rename is durable once the folder is synced.
            let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
        }
        Ok(applied)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set_applied(p: &Projections, lsn: i64) {
        p.conn
            .execute(
                "INSERT OR REPLACE INTO _meta (key, value) VALUES ('applied_lsn', ?1)",
                [lsn],
            )
            .expect("writes");
    }

    fn file_hash(path: &Path) -> blake3::Hash {
        blake3::hash(&std::fs::read(path).expect("reads"))
    }

    #[test]
    fn a_frozen_file_does_not_change_while_commits_and_checkpoints_go_on() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("p.sqlite");
        let p = Projections::open(&path).expect("opens");
        set_applied(&p, 7);
        let frozen = p.freeze().expect("freezes").expect("in WAL mode");
        assert_eq!(frozen.applied.log, Lsn(7));
        let before = file_hash(&path);
        assert_eq!(std::fs::metadata(&path).expect("meta").len(), frozen.len);
        for lsn in 8..200 {
            set_applied(&p, lsn);
        }
        let (busy, log, done): (i64, i64, i64) = p
            .conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .expect("checkpoint runs");
        assert!(
            log > 0 && done == 0,
            "nothing copied back: {busy} {log} {done}"
        );
        assert_eq!(file_hash(&path), before, "the file did not change");
        // The writer sees its own commits all along.
        assert_eq!(p.applied_position().expect("reads").log, Lsn(199));
        drop(frozen);
        p.conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .expect("checkpoints");
        assert_ne!(file_hash(&path), before, "after thawing, checkpoints go on");
    }

    #[test]
    fn the_check_reads_a_frozen_file_as_frozen_and_finds_a_damaged_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Characters a file: URI must escape.
        let path = dir.path().join("p q%#?.sqlite");
        let p = Projections::open(&path).expect("opens");
        for lsn in 1..50 {
            set_applied(&p, lsn);
        }
        let frozen = p.freeze().expect("freezes").expect("in WAL mode");
        for lsn in 50..100 {
            set_applied(&p, lsn);
        }
        Projections::check_file(&frozen.path).expect("a sound file");
        drop(frozen);
        drop(p);
        // Garbage over the second page (the first table's root) is found.
        let mut bytes = std::fs::read(&path).expect("reads");
        assert!(bytes.len() >= 3 * 4096, "{} bytes", bytes.len());
        for b in &mut bytes[4096 + 8..2 * 4096] {
            *b = 0xa5;
        }
        let damaged = dir.path().join("damaged.sqlite");
        std::fs::write(&damaged, &bytes).expect("writes");
        let error = Projections::check_file(&damaged).expect_err("damaged");
        assert!(
            matches!(
                error,
                ProjectionError::Sqlite(_) | ProjectionError::BadSnapshot(_)
            ),
            "{error}"
        );
    }

    #[test]
    fn a_copy_installs_with_no_local_changes_applied_and_garbage_does_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("src.sqlite");
        let p = Projections::open(&src).expect("opens");
        set_applied(&p, 42);
        p.conn
            .execute(
                "INSERT OR REPLACE INTO _meta (key, value) VALUES ('applied_local', 9)",
                [],
            )
            .expect("writes");
        let copy = dir.path().join("copy.sqlite");
        assert_eq!(
            Projections::snapshot(&src, &copy).expect("copies").log,
            Lsn(42)
        );
        let dest = dir.path().join("dest.sqlite");
        drop(Projections::open(&dest).expect("creates"));
        let ahead = Projections::install_snapshot(&copy, &dest, Lsn(41)).expect_err("refused");
        assert!(matches!(ahead, ProjectionError::BadSnapshot(_)), "{ahead}");
        assert!(copy.exists(), "nothing was moved");
        assert_eq!(
            Projections::install_snapshot(&copy, &dest, Lsn(42)).expect("installs"),
            Lsn(42)
        );
        let installed = Projections::open(&dest).expect("opens");
        let applied = installed.applied_position().expect("reads");
        assert_eq!((applied.log, applied.local), (Lsn(42), 0));
        assert!(!copy.exists(), "moved in place");

        let garbage = dir.path().join("garbage.sqlite");
        std::fs::write(&garbage, vec![0x5a; 8192]).expect("writes");
        let error = Projections::install_snapshot(&garbage, &dest, Lsn(100)).expect_err("refused");
        assert!(
            matches!(
                error,
                ProjectionError::Sqlite(_) | ProjectionError::BadSnapshot(_)
            ),
            "{error}"
        );
        drop(installed);
        let still = Projections::open(&dest).expect("opens");
        assert_eq!(still.applied_position().expect("reads").log, Lsn(42));
    }
}
