//! `Projections`: opening `projections.sqlite`, its pragmas and schema, the applied position.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use keel_schema::{plan, Lsn, Registry, SyncDomain};
use rusqlite::{Connection, OptionalExtension};
use uuid::Uuid;

use crate::checkpoint::Checkpointer;
use crate::ddl::{create_table, ModelSql, FORGETS_DELETED_FROM, INDEXES, INTERNAL, SCHEMA_VERSION};
use crate::error::ProjectionError;

/// Page cache of the projection connection, in KiB (random uuid keys thrash SQLite's 2 MB default;
/// larger caches moved memory, not apply rates: decision 0036).
pub const PAGE_CACHE_KIB: i64 = 32 * 1024;
/// WAL pages before a connection set up by [`configure_connection`] checkpoints by itself
/// (SQLite's default is 1000; large applies touch the same index pages again and again, so
/// checkpointing less often raises apply rates: decision 0036). Keel's own writer leaves checkpoints
/// to a background thread and keeps [`WAL_CHECKPOINT_BACKSTOP_PAGES`] instead.
pub const WAL_CHECKPOINT_PAGES: i64 = 16_384;
/// The writer's own automatic checkpoint, a backstop: the background checkpointer
/// ([`crate::CHECKPOINT_ROWS`]) normally checkpoints long before the WAL holds this many pages.
pub const WAL_CHECKPOINT_BACKSTOP_PAGES: i64 = 65_536;
/// Size the WAL file is truncated back to after a checkpoint, in bytes.
pub const WAL_SIZE_LIMIT: i64 = 64 * 1024 * 1024;
/// Page cache of a query-only connection, in KiB.
pub const READER_CACHE_KIB: i64 = 32 * 1024;
/// Page size of new projection files.
pub const PAGE_SIZE: i64 = 8192;
/// Helper threads SQLite's sorter may use while building indexes after a bulk load.
const SORT_THREADS: i64 = 2;
/// Page cache while building indexes after a bulk load, KiB: it also bounds each sorted run, and
/// with [`SORT_THREADS`] it built the indexes faster than the normal cache (decision 0036).
const SORT_CACHE_KIB: i64 = 4 * 1024;

/// How far the journal has been applied: the log position and the local-journal sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AppliedPosition {
    /// Last log position applied.
    pub log: Lsn,
    /// Last local-journal sequence applied.
    pub local: u64,
}

/// The SQLite views of one library.
pub struct Projections {
    pub(crate) conn: Connection,
    /// The library's models, Keel's and the host's.
    pub(crate) registry: Registry,
    /// Each model's statements, by code (a code no model holds has none: see [`ModelSql`]).
    pub(crate) sql: Vec<ModelSql>,
    pub(crate) ranks: Vec<usize>,
    pub(crate) parked: u64,
    pub(crate) domain_cache: HashMap<Uuid, SyncDomain>,
    /// Checkpoints the WAL in the background (the writer only; declared after `conn` so it
    /// closes last and makes the final checkpoint).
    pub(crate) checkpointer: Option<Checkpointer>,
    /// The projection file.
    pub(crate) path: PathBuf,
    /// Whether a fast load runs (see [`Projections::begin_fast_load`]).
    pub(crate) fast_load: bool,
    /// Set by [`Projections::mark_ahead_from`] for the next apply that records a position.
    pub(crate) ahead_from: Option<Lsn>,
    /// The attestations' member digests (see `attest.rs`).
    pub(crate) attested: std::cell::RefCell<crate::attest::Attested>,
}

impl std::fmt::Debug for Projections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Projections(parked {})", self.parked)
    }
}

/// Applies Keel's connection settings: WAL (and when to checkpoint it), `synchronous=NORMAL`,
/// foreign keys, page cache.
pub fn configure_connection(conn: &Connection) -> Result<(), rusqlite::Error> {
    // Takes effect only on a new, empty file; larger pages mean fewer splits for bulk inserts.
    conn.pragma_update(None, "page_size", PAGE_SIZE)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.pragma_update(None, "cache_size", -PAGE_CACHE_KIB)?;
    conn.pragma_update(None, "wal_autocheckpoint", WAL_CHECKPOINT_PAGES)?;
    conn.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT)?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    Ok(())
}

impl Projections {
    /// Opens or creates the projection file of Keel's models alone and migrates its schema.
    pub fn open(path: &Path) -> Result<Self, ProjectionError> {
        Self::open_for(path, Registry::builtin())
    }

    /// Opens or creates the projection file of the models of `registry`. A file built for
    /// other models (a field added or renamed, a model added, an older build) is started over:
    /// the journal replays into it.
    pub fn open_for(path: &Path, registry: &Registry) -> Result<Self, ProjectionError> {
        Self::open_with(path, registry, false)
    }

    /// Opens a second, query-only connection to a projection that [`Projections::open`] has
    /// created. In WAL mode it reads committed state while the writer applies, without waiting.
    pub fn open_reader(path: &Path) -> Result<Self, ProjectionError> {
        Self::open_reader_for(path, Registry::builtin())
    }

    /// [`Projections::open_reader`] of a projection of the models of `registry`.
    pub fn open_reader_for(path: &Path, registry: &Registry) -> Result<Self, ProjectionError> {
        Self::open_with(path, registry, true)
    }

    /// The models this projection holds.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Whether the file was built for the models of `registry` (its fingerprint, see
    /// [`Registry::fingerprint`], is the one recorded).
    pub(crate) fn built_for(
        conn: &Connection,
        registry: &Registry,
    ) -> Result<bool, ProjectionError> {
        let recorded: Option<String> = conn
            .query_row("SELECT fingerprint FROM _registry", [], |r| r.get(0))
            .optional()
            .or_else(|e| match e {
                // A file of an older build, with no such table.
                rusqlite::Error::SqliteFailure(..) => Ok(None),
                other => Err(other),
            })?;
        Ok(recorded.as_deref() == Some(registry.fingerprint().as_str()))
    }

    pub(crate) fn connect(path: &Path) -> Result<Connection, ProjectionError> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        configure_connection(&conn)?;
        Ok(conn)
    }

    fn open_with(path: &Path, registry: &Registry, reader: bool) -> Result<Self, ProjectionError> {
        if !reader {
            crate::rebuild::discard_interrupted_load(path)?;
        }
        let mut conn = Self::connect(path)?;
        let mut version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        // Version 9 kept whole clocks and the fields a delete covers: its rows are migrated, not
        // replayed (a compacted library's snapshot cannot be replayed), see `migrate_from_v9`.
        let mut migrate = !reader && version == FORGETS_DELETED_FROM - 1;
        if migrate {
            version = SCHEMA_VERSION;
        }
        let other_models =
            version == SCHEMA_VERSION && !reader && !Self::built_for(&conn, registry)?;
        if !reader && version > 0 && (version < SCHEMA_VERSION || other_models) {
            // Written by an older build or for other models: a projection is disposable, the
            // journal replays it.
            tracing::warn!(
                path = %path.display(),
                found = version,
                current = SCHEMA_VERSION,
                other_models,
                "projection schema is not this build's; starting it over"
            );
            conn.close().map_err(|(_, e)| e)?;
            Self::remove_files(path)?;
            conn = Self::connect(path)?;
            version = 0;
            migrate = false;
        }
        if version > SCHEMA_VERSION {
            return Err(ProjectionError::UnsupportedSchema {
                found: version,
                supported: SCHEMA_VERSION,
            });
        }
        registry.check()?;
        let plan = plan(&registry.defs())?;
        let mut ranks = vec![usize::MAX; registry.code_end()];
        let mut sql = vec![ModelSql::default(); registry.code_end()];
        let mut ddl = String::from("BEGIN;");
        for def in registry.iter() {
            let code = usize::from(def.code);
            ranks[code] = plan.rank(def.name).unwrap_or(usize::MAX);
            sql[code] = ModelSql::new(def);
            ddl.push_str(&create_table(def));
            ddl.push(';');
            ddl.push_str(&crate::ddl::create_deleted_index(def));
            ddl.push(';');
        }
        for stmt in INDEXES.iter().map(|(_, sql)| sql).chain(INTERNAL) {
            ddl.push_str(stmt);
            ddl.push(';');
        }
        ddl.push_str(&format!(
            "DELETE FROM _registry; INSERT INTO _registry (fingerprint) VALUES ('{}');",
            registry.fingerprint()
        ));
        // A migrating file keeps its old version until its rows are migrated.
        let stamped = if migrate {
            FORGETS_DELETED_FROM - 1
        } else {
            SCHEMA_VERSION
        };
        ddl.push_str(&format!("PRAGMA user_version = {stamped}; COMMIT;"));
        let checkpointer = if reader {
            conn.pragma_update(None, "query_only", "ON")?;
            conn.pragma_update(None, "cache_size", -READER_CACHE_KIB)?;
            None
        } else {
            conn.execute_batch(&ddl)?;
            conn.pragma_update(None, "wal_autocheckpoint", WAL_CHECKPOINT_BACKSTOP_PAGES)?;
            Some(Checkpointer::start(path)?)
        };
        let parked: i64 = conn.query_row("SELECT count(*) FROM _parked", [], |r| r.get(0))?;
        let projections = Self {
            conn,
            registry: registry.clone(),
            sql,
            ranks,
            parked: u64::try_from(parked).unwrap_or(0),
            domain_cache: HashMap::new(),
            checkpointer,
            path: path.to_path_buf(),
            fast_load: false,
            ahead_from: None,
            attested: Default::default(),
        };
        if migrate {
            let rows = projections.migrate_from_v9()?;
            tracing::info!(
                path = %path.display(),
                rows,
                "projection migrated from version 9: stored clocks, deleted records forget their fields"
            );
        }
        Ok(projections)
    }

    /// The position applied so far (saved in the same transaction as the rows).
    pub fn applied_position(&self) -> Result<AppliedPosition, ProjectionError> {
        let read = |key: &str| -> Result<u64, ProjectionError> {
            let v: Option<i64> = self
                .conn
                .query_row("SELECT value FROM _meta WHERE key = ?1", [key], |r| {
                    r.get(0)
                })
                .optional()?;
            Ok(v.and_then(|v| u64::try_from(v).ok()).unwrap_or(0))
        };
        Ok(AppliedPosition {
            log: Lsn(read("applied_lsn")?),
            local: read("applied_local")?,
        })
    }

    /// Marks the next apply that records a position as possibly ahead of the journal from log
    /// position `from` on: its changes were handed over before the journal's commit of them had
    /// ended (a follower's segment, applied while it syncs). Recorded in the same transaction;
    /// any later apply that records a position clears it. See [`Projections::ahead_from`].
    pub fn mark_ahead_from(&mut self, from: Lsn) {
        self.ahead_from = Some(from);
    }

    /// Where the last apply that recorded a position may be ahead of the journal (see
    /// [`Projections::mark_ahead_from`]); `None` if it was applied from durable entries. If the
    /// journal ends before the applied position, this tells whether the device stopped while
    /// that commit was under way (the journal ends at `from - 1` or later: rebuild from it) or
    /// something else happened to the journal (an older copy put back, say).
    pub fn ahead_from(&self) -> Result<Option<Lsn>, ProjectionError> {
        let v: Option<i64> = self
            .conn
            .query_row(
                "SELECT value FROM _meta WHERE key = 'ahead_from'",
                [],
                |r| r.get(0),
            )
            .optional()?;
        Ok(v.and_then(|v| u64::try_from(v).ok())
            .filter(|v| *v > 0)
            .map(Lsn))
    }

    /// Whether no model table has a row (a fresh projection).
    pub fn is_empty(&self) -> Result<bool, ProjectionError> {
        for def in self.registry.iter() {
            if self.table_has_rows(def.name)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Whether the table of model `M` has a row, visible or not.
    pub fn has_rows<M: keel_schema::Syncable>(&self) -> Result<bool, ProjectionError> {
        self.table_has_rows(M::DEF.name)
    }

    fn table_has_rows(&self, table: &str) -> Result<bool, ProjectionError> {
        Ok(self
            .conn
            .query_row(&format!("SELECT EXISTS (SELECT 1 FROM {table})"), [], |r| {
                r.get(0)
            })?)
    }

    /// Bulk loading: drops the secondary indexes (`true`) or builds them again (`false`).
    ///
    /// Building an index once by sorting is much faster than maintaining it row by row, so a full
    /// replay into an empty projection loads without them. If the process stops in between, the
    /// next [`Projections::open`] builds them.
    pub fn set_bulk_load(&mut self, bulk: bool) -> Result<(), ProjectionError> {
        let mut sql = String::new();
        for (name, create) in INDEXES {
            if bulk {
                sql.push_str(&format!("DROP INDEX IF EXISTS {name};"));
            } else {
                sql.push_str(create);
                sql.push(';');
            }
        }
        if let Some(checkpointer) = &self.checkpointer {
            let every = if bulk {
                crate::checkpoint::BULK_CHECKPOINT_ROWS
            } else {
                crate::CHECKPOINT_ROWS
            };
            checkpointer.every(every);
        }
        if bulk {
            self.conn.execute_batch(&sql)?;
            return Ok(());
        }
        // The index sorts spill to a temporary file rather than memory: building the indexes of a
        // million entries in memory added about 90 MB to the peak. With a small page cache the
        // sorter cuts its input into several runs, which a helper thread sorts while the
        // connection reads on (a single run is sorted on the connection's thread alone).
        self.conn.pragma_update(None, "temp_store", "FILE")?;
        self.conn.pragma_update(None, "threads", SORT_THREADS)?;
        self.conn
            .pragma_update(None, "cache_size", -SORT_CACHE_KIB)?;
        let built = self.conn.execute_batch(&sql);
        self.conn
            .pragma_update(None, "cache_size", -PAGE_CACHE_KIB)?;
        self.conn.pragma_update(None, "threads", 0)?;
        self.conn.pragma_update(None, "temp_store", "MEMORY")?;
        built?;
        if let Some(checkpointer) = &self.checkpointer {
            // The new indexes are a lot of pages: checkpoint them soon.
            checkpointer.written(crate::CHECKPOINT_ROWS);
        }
        Ok(())
    }

    /// Changes waiting for a dependency.
    pub fn parked_len(&self) -> u64 {
        self.parked
    }

    /// The underlying connection, for host-app queries beyond the ones provided.
    pub fn connection(&self) -> &Connection {
        &self.conn
    }
}

#[cfg(test)]
mod tests {
    /// The workspace's `.cargo/config.toml` builds the bundled SQLite without memory statistics
    /// and without shared memory management (see the comment there); this shows it took effect.
    #[test]
    fn the_bundled_sqlite_has_the_build_options_of_the_workspace() {
        let conn = rusqlite::Connection::open_in_memory().expect("opens");
        let mut stmt = conn.prepare("PRAGMA compile_options").expect("prepares");
        let options: Vec<String> = stmt
            .query_map([], |r| r.get(0))
            .expect("queries")
            .collect::<Result<_, _>>()
            .expect("reads");
        assert!(
            options.iter().any(|o| o == "DEFAULT_MEMSTATUS=0"),
            "{options:?}"
        );
        assert!(
            !options.iter().any(|o| o == "ENABLE_MEMORY_MANAGEMENT"),
            "{options:?}"
        );
        assert!(options.iter().any(|o| o == "THREADSAFE=1"), "{options:?}");
    }
}
