//! The applier thread: applies each durable batch from the journal writer to the projections,
//! records the applied position in the same SQLite transaction, and publishes events.

use std::sync::{Arc, Condvar, Mutex};

use crossbeam_channel::Receiver;
use keel_journal::{ApplyBudget, CommittedBatch, Placement, CLOCK_AHEAD_MAX_MS};
use keel_projections::{AppliedPosition, ProjectionError, Projections};
use keel_schema::{Change, ChangeId, Hlc, Lsn};
use tokio::sync::broadcast;

use crate::events::{ChangeKind, Event, EVENT_RECORDS_MAX};

/// Most changes applied in one SQLite transaction by the applier.
pub(crate) const APPLY_GROUP_MAX: usize = 65_536;

/// State shared by the library and its applier thread.
pub(crate) struct Shared {
    /// The writing connection: the applier, heal and rebuild.
    pub(crate) projections: Mutex<Projections>,
    /// A query-only connection for host-app reads, so they never wait for an apply.
    pub(crate) reader: Mutex<Projections>,
    pub(crate) applied: Mutex<ApplyState>,
    pub(crate) applied_changed: Condvar,
    pub(crate) events: broadcast::Sender<Event>,
    /// Where to announce this device's changes committed to the offline journal (the replication
    /// runtime pushes them to a leader).
    pub(crate) local_commits: Mutex<Option<crossbeam_channel::Sender<Vec<ChangeId>>>>,
    /// While a node runs: its core, which sequences this device's commits itself while it
    /// leads (see `crate::leader_commit`).
    pub(crate) sequencer:
        Mutex<Option<crossbeam_channel::Sender<crate::leader_commit::SequenceRequest>>>,
    /// Whether the running node leads (a hint: the core decides when it gets a request).
    pub(crate) leading: std::sync::atomic::AtomicBool,
    /// While catching up a long log: the position at which the projections get their secondary
    /// indexes back (`None` = not bulk loading). Locked after `projections`, never before.
    pub(crate) bulk_until: Mutex<Option<Lsn>>,
    /// Bounds the journal's queue of durable batches to the applier, in changes.
    pub(crate) budget: Arc<ApplyBudget>,
    /// The library's models (events name records by them).
    pub(crate) models: keel_schema::Registry,
    /// The jobs running in this process.
    pub(crate) jobs: crate::jobs::RunningJobs,
    /// The catch-up job under way, when and where it began.
    pub(crate) catch_up: Mutex<Option<(crate::jobs::Job, std::time::Instant, u64)>>,
    /// Held by an index run: two runs over one folder (a resumed job and the watcher's rescan)
    /// would each make an entry for a new file.
    pub(crate) indexing: Mutex<()>,
    /// Held by a compaction, and by a rebuild or verify while it replays the log aside: a
    /// compaction drops log positions such a replay has still to read, and two compactions
    /// would write the same scratch files. It holds the compaction's snapshot that waits
    /// for its position to be acknowledged (see `crate::compact`).
    pub(crate) history: Mutex<crate::compact::History>,
    /// The waiting snapshot's position as `history` holds it (0: none), readable without
    /// waiting for a compaction or a replay to let go of `history`.
    pub(crate) waiting_at: std::sync::atomic::AtomicU64,
    /// The snapshot backfills read while any does (see `crate::backfill`).
    pub(crate) serving: Mutex<std::sync::Weak<crate::backfill::SnapshotSource>>,
    /// The newest clock among the changes applied since a transaction last took it (at most
    /// [`CLOCK_AHEAD_MAX_MS`] ahead of this device's time, as the journal accepts them): the next transaction's clock
    /// observes it, so a change made after seeing another is ordered after it.
    pub(crate) clock_seen: Mutex<Option<Hlc>>,
    /// What this device's clock floor is made of (see `crate::floor`).
    pub(crate) floor: crate::floor::FloorState,
}

impl Shared {
    /// Takes in the clocks of `changes` as applied (see [`Shared::clock_seen`]).
    fn saw_clocks(&self, changes: &[Change]) {
        if let Some(newest) = changes.iter().map(|c| c.hlc).max() {
            self.saw_clock(newest);
        }
    }

    /// Takes in `newest` as a clock this device has seen: a change applied, or the high water
    /// of a snapshot taken in (see [`Shared::clock_seen`]).
    pub(crate) fn saw_clock(&self, newest: Hlc) {
        let cap = crate::library::now_ms().saturating_add(CLOCK_AHEAD_MAX_MS);
        let newest = if newest.physical_ms > cap {
            Hlc {
                physical_ms: cap,
                counter: 0,
                device: newest.device,
            }
        } else {
            newest
        };
        if let Ok(mut seen) = self.clock_seen.lock() {
            *seen = (*seen).max(Some(newest));
        }
    }

    /// The newest clock applied since the last call, if any.
    pub(crate) fn take_clock_seen(&self) -> Option<Hlc> {
        self.clock_seen.lock().ok().and_then(|mut seen| seen.take())
    }
}

/// A catch-up bulk-loads when at least this many log entries are missing...
pub(crate) const CATCH_UP_BULK_MIN: u64 = 50_000;
/// ...and they are this many times what the projections hold already (rebuilding the indexes
/// costs in proportion to all the rows; maintaining them, to the rows added).
pub(crate) const CATCH_UP_BULK_FACTOR: u64 = 2;

/// Whether catching up from `applied` to `target` should load without secondary indexes.
pub(crate) fn worth_bulk_loading(applied: Lsn, target: Lsn) -> bool {
    let missing = target.0.saturating_sub(applied.0);
    missing >= CATCH_UP_BULK_MIN && missing >= CATCH_UP_BULK_FACTOR.saturating_mul(applied.0)
}

/// After an apply that reached `position`: if a bulk load was waiting for it, builds the
/// secondary indexes again (before the position is published, so whoever waits for it finds
/// the projections complete).
fn end_bulk_load_if_reached(
    shared: &Shared,
    projections: &mut Projections,
    position: AppliedPosition,
) -> Result<(), keel_projections::ProjectionError> {
    let reached = shared
        .bulk_until
        .lock()
        .is_ok_and(|until| until.is_some_and(|target| position.log >= target));
    if reached {
        // The build takes seconds, so `bulk_until` is not held meanwhile: the replication core
        // checks it for every segment it receives, and a core stalled that long looks like a
        // node whose leader went silent (it would start an election). Whoever holds the
        // projections' lock (this thread) is the only one that ends a bulk load, so the target
        // cannot be reached twice.
        let started = std::time::Instant::now();
        projections.set_bulk_load(false)?;
        if let Ok(mut until) = shared.bulk_until.lock() {
            *until = None;
        }
        tracing::info!(
            at = position.log.0,
            ms = started.elapsed().as_millis() as u64,
            "caught up: secondary indexes built"
        );
    }
    Ok(())
}

/// Where the applier is.
#[derive(Debug, Default, Clone)]
pub(crate) struct ApplyState {
    pub(crate) position: AppliedPosition,
    /// The number of the last journal batch handled (see `Journal::batches_sent`).
    pub(crate) batch: u64,
    pub(crate) error: Option<String>,
}

pub(crate) fn advance(position: &mut AppliedPosition, placement: Placement) {
    match placement {
        Placement::Log(lsn) => position.log = position.log.max(lsn),
        Placement::Offline(seq) => position.local = position.local.max(seq),
    }
}

fn announce_local(shared: &Shared, entries: &[(Placement, Change)]) {
    let Ok(mut slot) = shared.local_commits.lock() else {
        return;
    };
    let Some(tx) = slot.as_ref() else { return };
    let ids: Vec<ChangeId> = entries
        .iter()
        .filter(|(p, _)| matches!(p, Placement::Offline(_)))
        .map(|(_, c)| c.id)
        .collect();
    if !ids.is_empty() && tx.send(ids).is_err() {
        *slot = None;
    }
}

/// Closes the writer's budget when the applier stops, however it stops, so the writer never
/// waits for an applier that is gone.
struct CloseOnExit(Arc<ApplyBudget>);

impl Drop for CloseOnExit {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// Committed batches taken off the queue together: applied in one SQLite transaction.
struct Group {
    entries: Vec<(Placement, Change)>,
    seq: u64,
    log_through: Option<Lsn>,
    /// Where the group may be ahead of the journal (a batch sent while it committed).
    ahead_from: Option<Lsn>,
}

impl Group {
    /// The first batch and whatever else waits, up to [`APPLY_GROUP_MAX`] entries; the room of
    /// each batch goes back to the budget as it leaves the queue.
    fn take(
        first: CommittedBatch,
        batches: &Receiver<CommittedBatch>,
        budget: &ApplyBudget,
    ) -> Self {
        budget.give_back(first.entries.len() as u64);
        let mut group = Group {
            entries: first.entries,
            seq: first.seq,
            log_through: first.log_through,
            ahead_from: first.early,
        };
        while group.entries.len() < APPLY_GROUP_MAX {
            let Ok(more) = batches.try_recv() else { break };
            budget.give_back(more.entries.len() as u64);
            group.ahead_from = match (group.ahead_from, more.early) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            group.entries.extend(more.entries);
            group.seq = group.seq.max(more.seq);
            group.log_through = group.log_through.max(more.log_through);
        }
        group
    }
}

/// Runs until the journal writer stops (its sender is dropped). Gives the room of each batch
/// back to the budget as it takes the batch off the queue.
pub(crate) fn run(shared: Arc<Shared>, batches: Receiver<CommittedBatch>) {
    let budget = CloseOnExit(shared.budget.clone());
    while let Ok(first) = batches.recv() {
        let group = Group::take(first, &batches, &budget.0);
        announce_local(&shared, &group.entries);
        let mut position = match shared.applied.lock() {
            Ok(mut state) if state.error.is_some() => {
                // An earlier apply failed: applying this batch would record a position past
                // the changes that failed, and the next open would heal from there without
                // them. The projections stay where they were; the next open heals from there.
                state.batch = state.batch.max(group.seq);
                drop(state);
                shared.applied_changed.notify_all();
                continue;
            }
            Ok(state) => state.position,
            Err(_) => return,
        };
        for (placement, _) in &group.entries {
            advance(&mut position, *placement);
        }
        if let Some(through) = group.log_through {
            // Epoch barriers carry no change, but the position passes them too.
            advance(&mut position, Placement::Log(through));
        }
        let logged: Vec<Option<u64>> = group
            .entries
            .iter()
            .map(|(placement, _)| match placement {
                Placement::Log(lsn) => Some(lsn.0),
                Placement::Offline(_) => None,
            })
            .collect();
        let changes: Vec<Change> = group.entries.into_iter().map(|(_, c)| c).collect();
        let _apply = tracing::debug_span!(
            "apply_batch",
            changes = changes.len(),
            log = position.log.0,
            local = position.local
        )
        .entered();
        let result = match shared.projections.lock() {
            Ok(mut p) => {
                if let Some(from) = group.ahead_from {
                    p.mark_ahead_from(from);
                }
                p.apply_logged(&changes, &logged, Some(position))
                    .and_then(|stats| {
                        end_bulk_load_if_reached(&shared, &mut p, position).map(|()| stats)
                    })
                    .and_then(|stats| announce_conflicts(&shared, &p, stats.conflicts))
            }
            Err(_) => return,
        };
        if result.is_ok() {
            shared.saw_clocks(&changes);
        }
        if !record_result(&shared, group.seq, position, &changes, result.map(|_| ())) {
            return;
        }
    }
}

/// Announces the `recorded` conflicts an apply just recorded (at most [`EVENT_RECORDS_MAX`]).
fn announce_conflicts(
    shared: &Shared,
    projections: &Projections,
    recorded: u64,
) -> Result<(), ProjectionError> {
    if recorded == 0 || shared.events.receiver_count() == 0 {
        return Ok(());
    }
    let n = usize::try_from(recorded)
        .unwrap_or(usize::MAX)
        .min(EVENT_RECORDS_MAX);
    for conflict in projections.query().latest_conflicts(n)? {
        let _ = shared.events.send(Event::ConflictRecorded {
            id: conflict.id,
            model: conflict.model,
            record: conflict.record,
            field: conflict.field,
        });
    }
    Ok(())
}

/// Records how an apply went and tells waiters and subscribers. False when the state's lock is
/// poisoned (the applier then stops).
fn record_result(
    shared: &Shared,
    seq: u64,
    position: AppliedPosition,
    changes: &[Change],
    result: Result<(), ProjectionError>,
) -> bool {
    let Ok(mut state) = shared.applied.lock() else {
        return false;
    };
    state.batch = state.batch.max(seq);
    match result {
        Ok(()) => {
            state.position = position;
            if shared.events.receiver_count() > 0 {
                let records = changes
                    .iter()
                    .take(EVENT_RECORDS_MAX)
                    .filter_map(|c| {
                        let name = shared.models.get(c.model)?.name;
                        Some((name, c.record, ChangeKind::of(&c.op)))
                    })
                    .collect();
                let _ = shared.events.send(Event::RecordsChanged {
                    records,
                    total: changes.len(),
                    applied: position.log,
                });
            }
        }
        Err(e) => {
            let reason = e.to_string();
            tracing::error!(%reason, "applying to the projections failed; nothing more is applied until they are healed from the journal at the next open");
            state.error = Some(reason.clone());
            let _ = shared.events.send(Event::ApplyFailed { reason });
        }
    }
    drop(state);
    shared.applied_changed.notify_all();
    true
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::{CreateOptions, Home, KdfParams, Library};

    fn new_library(dir: &std::path::Path, name: &str) -> Result<Library, crate::EngineError> {
        let options = CreateOptions {
            kdf: KdfParams::INSECURE_FAST,
        };
        Library::create(&Home::new(dir.join("home")), name, "pw", options)
    }

    /// How many secondary indexes the projections have now (-1 if the query failed), leaving
    /// out the partial indexes of deleted rows, which a bulk load keeps (rows without a
    /// tombstone cost them nothing).
    pub(crate) fn index_count(lib: &Library) -> i64 {
        lib.read(|p| {
            Ok(p.connection().query_row(
                "SELECT count(*) FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL \
                 AND name NOT LIKE '%\\_deleted' ESCAPE '\\'",
                [],
                |r| r.get(0),
            )?)
        })
        .unwrap_or(-1)
    }

    fn tag(lib: &Library, name: &str) -> Result<(), crate::EngineError> {
        lib.transact(|tx| {
            tx.upsert(&keel_schema::Tag {
                uuid: keel_schema::tag_uuid(lib.id().0, name),
                name: name.into(),
                color: None,
                created_ms: 1,
            });
            Ok(())
        })
        .map(|_| ())
    }

    /// An apply that fails (here a trigger on the writing connection refuses new tags) must
    /// not be skipped over by a later apply that succeeds: the projection's applied position
    /// stays before it, so the next open heals from there and every committed change shows.
    #[test]
    fn after_a_failed_apply_later_batches_do_not_move_the_position_past_it(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let home = Home::new(dir.path().join("home"));
        let lib = new_library(dir.path(), "failing")?;
        tag(&lib, "before")?;
        lib.flush()?;
        if let Ok(p) = lib.shared.projections.lock() {
            p.connection().execute_batch(
                "CREATE TEMP TRIGGER refuse BEFORE INSERT ON tag \
                 BEGIN SELECT RAISE(ABORT, 'injected failure'); END;",
            )?;
        }
        tag(&lib, "refused")?;
        assert!(
            matches!(lib.flush(), Err(crate::EngineError::ApplyFailed(_))),
            "the failed apply is reported"
        );
        if let Ok(p) = lib.shared.projections.lock() {
            p.connection().execute_batch("DROP TRIGGER temp.refuse")?;
        }
        // Committed (durable) although the projections are failing: the journal has it.
        tag(&lib, "after")?;
        // Closing reports the failure too (it flushes first), and still closes.
        assert!(lib.close().is_err());

        let lib = Library::open(&home, "failing", "pw")?;
        lib.flush()?;
        let tags: Vec<String> = lib
            .read(|p| p.query().select::<keel_schema::Tag, _>("1 = 1", []))?
            .into_iter()
            .map(|t| t.name)
            .collect();
        for name in ["before", "refused", "after"] {
            assert!(tags.contains(&name.to_string()), "{name} missing: {tags:?}");
        }
        let (report, _) = lib.verify()?;
        assert!(report.faults.is_empty());
        Ok(())
    }

    #[test]
    fn only_a_long_catch_up_relative_to_what_is_applied_bulk_loads() {
        assert!(!worth_bulk_loading(Lsn(0), Lsn(CATCH_UP_BULK_MIN - 1)));
        assert!(worth_bulk_loading(Lsn(0), Lsn(CATCH_UP_BULK_MIN)));
        assert!(worth_bulk_loading(Lsn(100), Lsn(1_000_000)));
        // Far behind in absolute terms, but the projections already hold more than half of it.
        assert!(!worth_bulk_loading(Lsn(400_000), Lsn(1_000_000)));
        assert!(!worth_bulk_loading(Lsn(10), Lsn(5)));
    }

    #[test]
    fn a_catch_up_drops_the_secondary_indexes_and_the_apply_that_reaches_it_builds_them(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let lib = new_library(dir.path(), "catch-up")?;
        let with_indexes = index_count(&lib);
        assert!(with_indexes > 0, "the projections start with their indexes");

        // A short way behind: nothing changes.
        lib.catching_up(Lsn(lib.sync_state().applied_lsn().0 + 10))?;
        assert!(!lib.sync_state().bulk_loading());
        assert_eq!(index_count(&lib), with_indexes);

        // Far behind: the secondary indexes go, queries still answer.
        lib.catching_up(Lsn(CATCH_UP_BULK_MIN * 10))?;
        assert!(lib.sync_state().bulk_loading());
        assert_eq!(index_count(&lib), 0);
        assert_eq!(lib.status()?.counts.devices, 1);

        // Bring the target within reach (instead of writing half a million changes): the apply
        // that reaches it builds the indexes before its position is published.
        let target = Lsn(lib.sync_state().applied_lsn().0 + 2);
        if let Ok(mut until) = lib.shared.bulk_until.lock() {
            *until = Some(target);
        }
        for name in ["a", "b", "c"] {
            tag(&lib, name)?;
        }
        lib.flush()?;
        assert!(lib.sync_state().applied_lsn() >= target);
        assert!(!lib.sync_state().bulk_loading());
        assert_eq!(index_count(&lib), with_indexes);
        assert_eq!(lib.status()?.counts.tags, 3);
        Ok(())
    }

    #[test]
    fn a_barrier_that_ends_the_log_is_applied_past_and_ends_a_catch_up(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let lib = new_library(dir.path(), "barrier")?;
        lib.catching_up(Lsn(CATCH_UP_BULK_MIN * 10))?;
        assert!(lib.sync_state().bulk_loading());
        let journal = lib.journal()?;
        let barrier = Lsn(journal.stats()?.last_lsn.0 + 1);
        // The catch-up's target is a barrier (a new epoch's first entry, with no change).
        if let Ok(mut until) = lib.shared.bulk_until.lock() {
            *until = Some(barrier);
        }
        let epoch = journal
            .election()
            .epoch()?
            .ok_or("the founder has an epoch")?;
        journal.log().append(barrier, vec![(epoch, Vec::new())])?;
        lib.flush()?;
        assert_eq!(
            lib.sync_state().applied_lsn(),
            barrier,
            "the position passes the barrier"
        );
        assert!(
            !lib.sync_state().bulk_loading(),
            "the catch-up ended at the barrier"
        );
        Ok(())
    }

    #[test]
    fn more_changes_than_the_queue_budget_all_apply_and_the_budget_drains(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let lib = new_library(dir.path(), "budget")?;
        let per_batch = 8_192;
        let batches = 1 + crate::library::COMMITTED_QUEUE_CHANGES / per_batch;
        assert!(per_batch * batches > crate::library::COMMITTED_QUEUE_CHANGES);
        let mut pending = Vec::new();
        for b in 0..batches {
            pending.push(lib.transact_pipelined(|tx| {
                for i in 0..per_batch {
                    tx.upsert(&keel_schema::Tag {
                        uuid: uuid::Uuid::now_v7(),
                        name: format!("t{b}-{i}"),
                        color: None,
                        created_ms: 1,
                    });
                }
                Ok(())
            })?);
        }
        for p in pending {
            p.wait()?;
        }
        lib.flush()?;
        assert_eq!(lib.status()?.counts.tags, per_batch * batches);
        assert_eq!(lib.shared.budget.queued(), 0);
        Ok(())
    }

    /// An applied change from a clock at the end of time moves this device's clock at most
    /// [`CLOCK_AHEAD_MAX_MS`] ahead of its own time, and the next change is still after it.
    #[test]
    fn an_applied_clock_far_ahead_moves_the_clock_only_so_far(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let lib = new_library(dir.path(), "ahead")?;
        let end_of_time = Hlc {
            physical_ms: u64::MAX,
            counter: u32::MAX,
            device: keel_schema::DeviceId([7; 32]),
        };
        let tag = keel_schema::Tag {
            uuid: keel_schema::tag_uuid(lib.id().0, "late"),
            name: "late".into(),
            color: None,
            created_ms: 1,
        };
        let far = Change::upsert(ChangeId::new(), end_of_time, &tag).ok_or("sync-ready")?;
        lib.shared.saw_clocks(&[far]);
        let before = crate::library::now_ms();
        let (_, receipt) = lib.transact(|tx| {
            tx.upsert(&tag);
            Ok(())
        })?;
        let hlc = lib.journal()?.hlc_high_water()?.ok_or("a clock")?;
        assert!(!receipt.change_ids.is_empty());
        assert!(hlc.physical_ms >= before + CLOCK_AHEAD_MAX_MS, "{hlc:?}");
        assert!(
            hlc.physical_ms <= crate::library::now_ms() + CLOCK_AHEAD_MAX_MS,
            "{hlc:?}"
        );
        Ok(())
    }
}
