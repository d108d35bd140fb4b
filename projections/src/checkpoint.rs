//! Checkpointing the WAL on a thread of its own, so that the thread that applies never stalls on
//! a checkpoint.
//!
//! With SQLite's automatic checkpoints, the commit that crosses the threshold copies the whole
//! WAL into the database and syncs it before it returns, which stalled live applies long enough
//! to set P5's p99 (decision 0027). Here the writer only counts the rows it wrote; a background
//! connection runs passive checkpoints (which never block the writer) when enough rows were
//! written or ten seconds went by. The writer keeps an automatic checkpoint far out as a
//! backstop, in case the background thread cannot keep up.
//!
//! A checkpoint still syncs the database file, and on the same disk that delays the journal's
//! own syncs (a durable commit): checkpointing every second showed as a burst of slow changes
//! each second, every ten seconds as none (decision 0027).

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::Connection;

use crate::error::ProjectionError;

/// Rows written that start a checkpoint at once.
pub const CHECKPOINT_ROWS: u64 = 32_768;
/// Rows written that start a checkpoint at once during a bulk load (see
/// [`crate::Projections::set_bulk_load`]): rows without secondary indexes are few pages each,
/// and each checkpoint syncs the file, which at [`CHECKPOINT_ROWS`] slowed a 1M-entry backfill's
/// writer by a fifth (decision 0056).
pub const BULK_CHECKPOINT_ROWS: u64 = 8 * CHECKPOINT_ROWS;
/// Longest time rows wait for a checkpoint (see the module docs for why not shorter).
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(10);
/// How often the checkpointer looks (it parks, and a drop wakes it at once).
const POLL: Duration = Duration::from_millis(50);

struct Shared {
    written: AtomicU64,
    /// Rows written that start a checkpoint at once.
    every: AtomicU64,
    stop: AtomicBool,
}

/// The background checkpointer of one projection file. Stops (after a last checkpoint) when
/// dropped.
pub(crate) struct Checkpointer {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Checkpointer {
    /// Opens a connection of its own to `path` and starts the thread.
    pub(crate) fn start(path: &Path) -> Result<Self, ProjectionError> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        let shared = Arc::new(Shared {
            written: AtomicU64::new(0),
            every: AtomicU64::new(CHECKPOINT_ROWS),
            stop: AtomicBool::new(false),
        });
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("keel-checkpoint".into())
                .spawn(move || run(&conn, &shared))
                .map_err(|e| ProjectionError::Thread(e.to_string()))?
        };
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// The writer committed `rows` rows.
    pub(crate) fn written(&self, rows: u64) {
        self.shared.written.fetch_add(rows, Ordering::Relaxed);
    }

    /// Checkpoints once `rows` rows were written (or the interval went by) from now on.
    pub(crate) fn every(&self, rows: u64) {
        self.shared.every.store(rows, Ordering::Relaxed);
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            // Woken now rather than at its next look: closing costs no wait.
            thread.thread().unpark();
            let _ = thread.join();
        }
    }
}

fn run(conn: &Connection, shared: &Shared) {
    let mut last = Instant::now();
    loop {
        // A wake-up before the time (an unpark, or a spurious one) only looks early.
        std::thread::park_timeout(POLL);
        let stopping = shared.stop.load(Ordering::Relaxed);
        let written = shared.written.load(Ordering::Relaxed);
        let every = shared.every.load(Ordering::Relaxed);
        let due = written >= every || (written > 0 && last.elapsed() >= CHECKPOINT_INTERVAL);
        if due || (stopping && written > 0) {
            shared.written.fetch_sub(written, Ordering::Relaxed);
            last = Instant::now();
            // Passive: copies what it can without waiting for the writer or readers. A failure
            // leaves the frames in the WAL for the next one (or the writer's backstop).
            if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                tracing::debug!(error = %e, "background checkpoint failed");
            }
        }
        if stopping {
            return;
        }
    }
}
