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
    let mut report = ReplayReport {
        position: from,
        ..ReplayReport::default()
    };
    let bulk = from == AppliedPosition::default()
        && total > REPLAY_APPLY_BATCH as u64
        && projections.is_empty()?;
    // Only a projection with no other connection loads fast; otherwise it stays in WAL mode.
    let fast = bulk && projections.begin_fast_load()?;
    if bulk {
        projections.set_bulk_load(true)?;
    }
    std::thread::scope(|scope| -> Result<(), EngineError> {
        let (tx, rx) = bounded::<Result<Chunk, JournalError>>(REPLAY_QUEUE_CHUNKS);
        scope.spawn(move || {
            let mut position = from;
            let mut next = Lsn(from.log.0 + 1);
            loop {
                let raw = match journal.read_log_raw(next, REPLAY_READ_CHUNK) {
                    Ok(raw) => raw,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                let Some((last, _)) = raw.last() else { break };
                next = Lsn(last.0 + 1);
                let mut chunk = Chunk {
                    changes: Vec::with_capacity(raw.len()),
                    position,
                    faults: Vec::new(),
                };
                for (lsn, bytes) in &raw {
                    match journal.open_log_record(*lsn, bytes) {
                        Ok((_, _, change)) => chunk.changes.push(change),
                        Err(e) => chunk.faults.push(e.to_string()),
                    }
                    chunk.position.log = *lsn;
                }
                position = chunk.position;
                if tx.send(Ok(chunk)).is_err() {
                    return;
                }
            }
            let mut seq = from.local + 1;
            loop {
                let entries = match journal.read_local(seq, REPLAY_READ_CHUNK) {
                    Ok(e) => e,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                if entries.is_empty() {
                    break;
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
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return;
                        }
                    }
                }
                position = chunk.position;
                if tx.send(Ok(chunk)).is_err() {
                    return;
                }
            }
        });
        let mut pending: Vec<Change> = Vec::with_capacity(REPLAY_APPLY_BATCH);
        let mut pending_position = from;
        let mut done = 0u64;
        for chunk in rx.iter() {
            let chunk = chunk?;
            for fault in &chunk.faults {
                tracing::error!(%fault, "skipping a journal record that failed its checks");
            }
            report.faults.extend(chunk.faults);
            pending.extend(chunk.changes);
            pending_position = chunk.position;
            // A full batch, or the reader has nothing more yet: at the start that means applying
            // the first chunks instead of waiting for a whole batch to be read.
            let idle = rx.is_empty() && pending.len() >= REPLAY_READ_CHUNK;
            if pending.len() >= REPLAY_APPLY_BATCH || idle {
                let stats = projections.apply(&pending, Some(pending_position))?;
                done += pending.len() as u64;
                report.changes += pending.len() as u64;
                report.batches += 1;
                if stats.references_proven {
                    report.proven += pending.len() as u64;
                }
                pending.clear();
                progress(done, total);
            }
        }
        if !pending.is_empty() || pending_position != from {
            let stats = projections.apply(&pending, Some(pending_position))?;
            done += pending.len() as u64;
            report.changes += pending.len() as u64;
            report.batches += 1;
            if stats.references_proven {
                report.proven += pending.len() as u64;
            }
            progress(done, total);
        }
        report.position = pending_position;
        Ok(())
    })?;
    if bulk {
        projections.set_bulk_load(false)?;
    }
    if fast {
        projections.end_fast_load()?;
    }
    Ok(report)
}
