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
/// Chunks read ahead of the applier (under one apply batch): at 16, the sealed changes in
/// flight held about 50 MB more at P7's peak for the same replay rate (decision 0069).
pub(crate) const REPLAY_QUEUE_CHUNKS: usize = 6;
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
    /// Each change's log position (`None` for an offline one): conflicts are found in them.
    logged: Vec<Option<u64>>,
    position: AppliedPosition,
    faults: Vec<String>,
}

/// Changes applied between two durable checkpoints of a steered replay's fast load (see
/// [`replay_steered`]): a `kill -9` loses at most this much of a rebuild or a verify.
pub(crate) const FAST_LOAD_CHECKPOINT: u64 = 262_144;

/// Applies every log record after `from.log` and every local record after `from.local`.
/// `progress(done, total)` is called after each applied batch.
pub fn replay(
    journal: &Journal,
    projections: &mut Projections,
    from: AppliedPosition,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ReplayReport, EngineError> {
    replay_with(journal, projections, from, None, &mut |done, total| {
        progress(done, total);
        Ok(())
    })
}

/// [`replay`] for a job: `step(done, total)` runs after each applied batch, when the batch's
/// position is stored, and stops the replay with its error (a pause blocks inside it). A fast
/// load is made durable every [`FAST_LOAD_CHECKPOINT`] changes and when `step` stops it, so the
/// projection is always left at a position it can be resumed from.
pub(crate) fn replay_steered(
    journal: &Journal,
    projections: &mut Projections,
    from: AppliedPosition,
    step: &mut dyn FnMut(u64, u64) -> Result<(), EngineError>,
) -> Result<ReplayReport, EngineError> {
    replay_with(journal, projections, from, Some(FAST_LOAD_CHECKPOINT), step)
}

fn replay_with(
    journal: &Journal,
    projections: &mut Projections,
    from: AppliedPosition,
    checkpoint_every: Option<u64>,
    step: &mut dyn FnMut(u64, u64) -> Result<(), EngineError>,
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
    let replayed = std::thread::scope(|scope| {
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
            pending_logged: Vec::with_capacity(REPLAY_APPLY_BATCH),
            done: 0,
            total,
            step,
            fast,
            checkpoint_every,
            since_checkpoint: 0,
        };
        // The reader stops once the receiver is gone, whatever stopped the applier.
        let applied = applier.apply_chunks(&rx, from);
        drop(rx);
        applied.map(|()| applier.report)
    });
    // A fast load ends durably even when a step stopped it: a job resumes from the position
    // stored. The secondary indexes come back whenever the replay ends, so a resumed one
    // (which is not a bulk load) ends with them too.
    if fast {
        projections.end_fast_load()?;
    }
    let report = replayed?;
    if bulk || checkpoint_every.is_some() {
        projections.set_bulk_load(false)?;
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
            logged: Vec::with_capacity(raw.len()),
            position,
            faults: Vec::new(),
        };
        for ((lsn, _), opened) in raw.iter().zip(journal.log().open_records(&raw)) {
            match opened {
                Ok((_, _, change)) => {
                    chunk.changes.push(change);
                    chunk.logged.push(Some(lsn.0));
                }
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
            logged: Vec::new(),
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
    /// The log positions of `pending`'s changes, as far as they are log entries (offline ones
    /// come after every log entry, so this is a prefix).
    pending_logged: Vec<Option<u64>>,
    done: u64,
    total: u64,
    step: &'a mut (dyn FnMut(u64, u64) -> Result<(), EngineError> + 'p),
    /// Whether the projection is in a fast load.
    fast: bool,
    /// Changes between durable checkpoints of a fast load (`None`: durable only at the end).
    checkpoint_every: Option<u64>,
    since_checkpoint: u64,
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
            self.pending_logged.extend(chunk.logged);
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
        let stats =
            self.projections
                .apply_logged(&self.pending, &self.pending_logged, Some(position))?;
        let n = self.pending.len() as u64;
        self.done += n;
        self.report.changes += n;
        self.report.batches += 1;
        if stats.references_proven {
            self.report.proven += n;
        }
        self.pending.clear();
        self.pending_logged.clear();
        self.since_checkpoint += n;
        if let Some(every) = self.checkpoint_every.filter(|_| self.fast) {
            if self.since_checkpoint >= every {
                // Durable here: a kill from now on resumes from this batch's position.
                self.projections.end_fast_load()?;
                self.fast = self.projections.begin_fast_load()?;
                self.since_checkpoint = 0;
            }
        }
        (self.step)(self.done, self.total)
    }
}
