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

use crate::ddl::SCHEMA_VERSION;
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

impl Projections {
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

    /// Installs `incoming`, a file made by [`Projections::snapshot`] on another device of the
    /// library and received whole, as the projection file `dest`, replacing whatever `dest` held.
    /// Checks it is a projection of this schema, records that none of this device's own
    /// changes are applied in it (they are applied again from the journal on open), syncs it and
    /// moves it in place. Returns the log position it has applied; the caller must hold the log
    /// up to there, or opening the library fails with a projection ahead of the journal.
    pub fn install_snapshot(incoming: &Path, dest: &Path) -> Result<Lsn, ProjectionError> {
        let applied = {
            let conn = Connection::open(incoming)?;
            let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
            if version != SCHEMA_VERSION {
                return Err(ProjectionError::BadSnapshot(format!(
                    "schema version {version}, this build has {SCHEMA_VERSION}"
                )));
            }
            let check: String = conn.pragma_query_value(None, "quick_check", |r| r.get(0))?;
            if check != "ok" {
                return Err(ProjectionError::BadSnapshot(format!(
                    "the file is damaged: {check}"
                )));
            }
            configure_connection(&conn)?;
            let applied = applied_in(&conn)?.log;
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
