//! Replay: streaming the journal into projections, to heal after a crash or to rebuild.
//!
//! A reader thread reads and opens records (decryption is the costly part) while the calling
//! thread applies them, so the two cores work at once. Memory is bounded by the batch sizes.

use crossbeam_channel::bounded;
use keel_journal::{Journal, JournalError, Placement};
use keel_projections::{AppliedPosition, Projections};
use keel_schema::{Change, Lsn};

use crate::error::EngineError;

/// Records read per journal read.
pub(crate) const REPLAY_READ_CHUNK: usize = 8192;
/// Chunks read ahead of the applier.
pub(crate) const REPLAY_QUEUE_CHUNKS: usize = 16;
/// Changes applied per SQLite transaction during replay.
pub(crate) const REPLAY_APPLY_BATCH: usize = 65_536;

/// What a replay did.
#[derive(Debug, Default, Clone)]
pub struct ReplayReport {
    /// Changes applied.
    pub changes: u64,
    /// Records skipped because they failed their checks (never applied), with the reason.
    pub faults: Vec<String>,
    /// The position reached.
    pub position: AppliedPosition,
    /// Changes applied in batches whose references were proven beforehand, so SQLite did not
    /// look them up (see `keel_projections::ApplyStats::references_proven`).
    pub proven: u64,
    /// Batches applied (each one SQLite transaction).
    pub batches: u64,
}

struct Chunk {
    changes: Vec<Change>,
    position: AppliedPosition,
    faults: Vec<String>,
}

/// Applies every log record after `from.log` and every local record after `from.local`.
/// `progress(done, total)` is called after each applied batch.
pub fn replay(
    journal: &Journal,
    projections: &mut Projections,
    from: AppliedPosition,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ReplayReport, EngineError> {
    let stats = journal.stats()?;
    let total = stats.last_lsn.0.saturating_sub(from.log.0) + stats.offline;
    let bulk = from == AppliedPosition::default()
        && total > REPLAY_APPLY_BATCH as u64
        && projections.is_empty()?;
    // Only a projection with no other connection loads fast; otherwise it stays in WAL mode.
    let fast = bulk && projections.begin_fast_load()?;
    if bulk {
        projections.set_bulk_load(true)?;
    }
    let report = std::thread::scope(|scope| {
        let (tx, rx) = bounded::<Result<Chunk, JournalError>>(REPLAY_QUEUE_CHUNKS);
        scope.spawn(move || {
            if let Err(e) = read_chunks(journal, from, &tx) {
                let _ = tx.send(Err(e));
            }
        });
        let mut applier = Applier {
            projections,
            report: ReplayReport {
                position: from,
                ..ReplayReport::default()
            },
            pending: Vec::with_capacity(REPLAY_APPLY_BATCH),
            done: 0,
            total,
            progress,
        };
        applier.apply_chunks(&rx, from)?;
        Ok::<_, EngineError>(applier.report)
    })?;
    if bulk {
        projections.set_bulk_load(false)?;
    }
    if fast {
        projections.end_fast_load()?;
    }
    Ok(report)
}

/// The reader thread: log records after `from.log`, then offline records after `from.local`,
/// opened, in chunks. Stops early when the applier hangs up.
fn read_chunks(
    journal: &Journal,
    from: AppliedPosition,
    tx: &crossbeam_channel::Sender<Result<Chunk, JournalError>>,
) -> Result<(), JournalError> {
    let mut position = from;
    let mut next = Lsn(from.log.0 + 1);
    loop {
        let raw = journal.log().read_raw(next, REPLAY_READ_CHUNK)?;
        let Some((last, _)) = raw.last() else { break };
        next = Lsn(last.0 + 1);
        let mut chunk = Chunk {
            changes: Vec::with_capacity(raw.len()),
            position,
            faults: Vec::new(),
        };
        for ((lsn, _), opened) in raw.iter().zip(journal.log().open_records(&raw)) {
            match opened {
                Ok((_, _, change)) => chunk.changes.push(change),
                Err(e) => chunk.faults.push(e.to_string()),
            }
            chunk.position.log = *lsn;
        }
        position = chunk.position;
        if tx.send(Ok(chunk)).is_err() {
            return Ok(());
        }
    }
    let mut seq = from.local + 1;
    loop {
        let entries = journal.offline().read(seq, REPLAY_READ_CHUNK)?;
        if entries.is_empty() {
            return Ok(());
        }
        let mut chunk = Chunk {
            changes: Vec::with_capacity(entries.len()),
            position,
            faults: Vec::new(),
        };
        for entry in entries {
            match entry {
                Ok((Placement::Offline(s), _, change)) => {
                    chunk.changes.push(change);
                    chunk.position.local = s;
                    seq = s + 1;
                }
                Ok(_) => {}
                Err(JournalError::BadRecord { place, reason }) => {
                    if let keel_journal::RecordPlace::Offline(s) = place {
                        chunk.position.local = s;
                        seq = s + 1;
                    }
                    chunk
                        .faults
                        .push(format!("bad record at {place}: {reason}"));
                }
                Err(e) => return Err(e),
            }
        }
        position = chunk.position;
        if tx.send(Ok(chunk)).is_err() {
            return Ok(());
        }
    }
}

/// The applying side: batches of chunks into the projections.
struct Applier<'a, 'p> {
    projections: &'a mut Projections,
    report: ReplayReport,
    pending: Vec<Change>,
    done: u64,
    total: u64,
    progress: &'a mut (dyn FnMut(u64, u64) + 'p),
}

impl Applier<'_, '_> {
    fn apply_chunks(
        &mut self,
        rx: &crossbeam_channel::Receiver<Result<Chunk, JournalError>>,
        from: AppliedPosition,
    ) -> Result<(), EngineError> {
        let mut pending_position = from;
        for chunk in rx.iter() {
            let chunk = chunk?;
            for fault in &chunk.faults {
                tracing::error!(%fault, "skipping a journal record that failed its checks");
            }
            self.report.faults.extend(chunk.faults);
            self.pending.extend(chunk.changes);
            pending_position = chunk.position;
            // A full batch, or the reader has nothing more yet: at the start that means applying
            // the first chunks instead of waiting for a whole batch to be read.
            let idle = rx.is_empty() && self.pending.len() >= REPLAY_READ_CHUNK;
            if self.pending.len() >= REPLAY_APPLY_BATCH || idle {
                self.apply_batch(pending_position)?;
            }
        }
        if !self.pending.is_empty() || pending_position != from {
            self.apply_batch(pending_position)?;
        }
        self.report.position = pending_position;
        Ok(())
    }

    /// Applies what is pending in one transaction that records `position`.
    fn apply_batch(&mut self, position: AppliedPosition) -> Result<(), EngineError> {
        let stats = self.projections.apply(&self.pending, Some(position))?;
        let n = self.pending.len() as u64;
        self.done += n;
        self.report.changes += n;
        self.report.batches += 1;
        if stats.references_proven {
            self.report.proven += n;
        }
        self.pending.clear();
        (self.progress)(self.done, self.total);
        Ok(())
    }
}
