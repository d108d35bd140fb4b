//! Backfill (decision 0056): a device whose log cannot continue its leader's, because the
//! leader compacted past it, pulls the leader's snapshot table by table in batches, keeps it as
//! its own snapshot, drops its log and starts it again after the leader's base, and rebuilds
//! its projection from the snapshot (the log after the base then arrives as usual).
//!
//! The serving side reads its `snapshot.sqlite.zst`, unpacked while any backfill reads it
//! ([`SnapshotSource`]): a snapshot never changes, so every batch of one backfill reads the same
//! state. The pulling
//! side writes into a scratch file ([`BACKFILL_FILE`]) that keeps its checkpoint with each
//! batch: a cut backfill resumes from its last batch when the same base is asked again.
//!
//! The network is the node's: it drives [`Library::backfill`] with a [`BackfillSource`].

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use keel_journal::CLOCK_AHEAD_MAX_MS;
use keel_projections::{image_uuid, Part, PartCursor, Projections};
use keel_schema::{ChangeId, DeviceId, Epoch, Hlc, Lsn};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::compact::{pack, put_in_place, unpack, SNAPSHOT_FILE};
use crate::error::EngineError;
use crate::jobs::{JobKind, JobState};
use crate::library::Library;

/// The scratch projection a backfill writes (packed into the snapshot once whole).
pub const BACKFILL_FILE: &str = "backfill.sqlite";
/// Rows a backfill asks for at a time.
pub const BACKFILL_BATCH: usize = 4096;
/// The snapshot being packed from the scratch file.
pub(crate) const BACKFILL_PACKING: &str = "backfill.sqlite.zst.incoming";

/// What a backfill pulls: a snapshot and the log position it stands for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackfillPlan {
    /// The log position the snapshot stands for.
    pub base: Lsn,
    /// The epoch of the entry at `base`.
    pub base_epoch: Epoch,
    /// The epoch of the log's first entry (its founder's).
    pub head: Epoch,
    /// The serving device's clock high-water mark.
    pub hlc: Hlc,
    /// The snapshot's parts with their row counts, in the order they are taken.
    pub parts: Vec<(Part, u64)>,
}

impl BackfillPlan {
    /// Rows in every part (a leader's counts: at most `u64::MAX` in all).
    pub fn rows(&self) -> u64 {
        self.parts
            .iter()
            .fold(0u64, |all, (_, n)| all.saturating_add(*n))
    }
}

/// Where a backfill's rows come from (the node's connection to its leader).
pub trait BackfillSource {
    /// At most `limit` rows of `part` from `cursor` on, and whether they are its last.
    fn batch(
        &mut self,
        part: &Part,
        cursor: PartCursor,
        limit: usize,
    ) -> Result<(Vec<Vec<u8>>, bool), EngineError>;
}

/// What a backfill did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct BackfillReport {
    /// The log position the library now starts after.
    pub base: u64,
    /// Rows pulled in all.
    pub rows: u64,
    /// Rows this run pulled (fewer than `rows` when it resumed a cut one).
    pub pulled: u64,
    /// Changes of this device's own epochs that went back to the offline journal.
    pub resubmitted: u64,
}

/// A backfill's checkpoint, kept in the scratch file with each batch.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
struct Checkpoint {
    base: u64,
    part: usize,
    after: Option<Uuid>,
    skip: u64,
    done: u64,
    /// Every part is in.
    whole: bool,
}

/// A library's snapshot opened for backfills to read: unpacked once, shared while any reads,
/// removed when the last one ends.
pub struct SnapshotSource {
    plan: BackfillPlan,
    reader: Mutex<Projections>,
    path: PathBuf,
}

impl SnapshotSource {
    /// What it holds.
    pub fn plan(&self) -> &BackfillPlan {
        &self.plan
    }

    /// At most `limit` rows of `part` from `cursor` on (`part` must be one of the plan's).
    pub fn rows(
        &self,
        part: &Part,
        cursor: PartCursor,
        limit: usize,
    ) -> Result<Vec<Vec<u8>>, EngineError> {
        let reader = self.reader.lock().map_err(|_| EngineError::Closed)?;
        Ok(reader.query().part_rows(part, cursor, limit)?)
    }
}

impl Drop for SnapshotSource {
    fn drop(&mut self) {
        let _ = Projections::remove_files(&self.path);
    }
}

impl Library {
    /// This library's snapshot as a backfill reads it: unpacked from `snapshot.sqlite.zst`
    /// when no backfill reads it already, then shared with those that start meanwhile. Fails with
    /// [`EngineError::SnapshotMissing`] when the log was never compacted.
    pub fn snapshot_source(&self) -> Result<Arc<SnapshotSource>, EngineError> {
        let journal = self.journal()?;
        let mut serving = self
            .shared
            .serving
            .lock()
            .map_err(|_| EngineError::Closed)?;
        let (base, base_epoch) = journal.log().base()?;
        if let Some(source) = serving.upgrade().filter(|s| s.plan.base == base) {
            return Ok(source);
        }
        let snapshot = self.dir().join(SNAPSHOT_FILE);
        if base.0 == 0 || !snapshot.exists() {
            return Err(EngineError::SnapshotMissing {
                path: snapshot,
                base: base.0,
            });
        }
        // The snapshot and the base read together: no compaction moves them meanwhile.
        let _history = self.history()?;
        // A name of its own: the copy a last reader drops may still be going away.
        let path = self.dir().join(format!(
            "serving-{}-{}.from-snapshot",
            base.0,
            Uuid::new_v4().simple()
        ));
        unpack(&snapshot, &path)?;
        let reader = Projections::open_reader_for(&path, self.models())?;
        let mut parts = Vec::new();
        for part in reader.backfill_parts() {
            let rows = reader.query().part_len(&part)?;
            parts.push((part, rows));
        }
        let plan = BackfillPlan {
            base,
            base_epoch,
            head: journal.log().head()?.unwrap_or(base_epoch),
            hlc: journal.hlc_high_water()?.unwrap_or_default(),
            parts,
        };
        let source = Arc::new(SnapshotSource {
            plan,
            reader: Mutex::new(reader),
            path,
        });
        *serving = Arc::downgrade(&source);
        Ok(source)
    }

    /// Pulls the snapshot of `plan` from `source` into the scratch file, batch by batch (a
    /// checkpoint with each), resuming a cut backfill of the same base, then keeps it as this
    /// library's snapshot. Runs as a job; `progress(rows, of)`. The library is unchanged
    /// until [`Library::rebase_onto`] puts the snapshot to use.
    pub fn backfill(
        &self,
        from: DeviceId,
        plan: &BackfillPlan,
        source: &mut dyn BackfillSource,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<BackfillReport, EngineError> {
        check_plan_clock(plan)?;
        let kind = JobKind::Backfill {
            from: from.to_hex(),
            base: plan.base.0,
        };
        let summary = |r: &BackfillReport| {
            format!(
                "{} rows of the snapshot at {} ({} pulled by this run)",
                r.rows, r.base, r.pulled
            )
        };
        self.run_job(kind, None, summary, |run| {
            let mut step = run.replay_step(progress);
            self.pull_snapshot(plan, source, &mut step)
        })
    }

    fn pull_snapshot(
        &self,
        plan: &BackfillPlan,
        source: &mut dyn BackfillSource,
        step: &mut dyn FnMut(u64, u64) -> Result<(), EngineError>,
    ) -> Result<BackfillReport, EngineError> {
        let path = self.dir().join(BACKFILL_FILE);
        let mut scratch = open_scratch(&path, self, plan)?;
        let ours = scratch.backfill_parts();
        if ours.len() != plan.parts.len() || ours.iter().zip(&plan.parts).any(|(a, (b, _))| a != b)
        {
            return Err(EngineError::Backfill(
                "the leader's snapshot holds other models than this library".into(),
            ));
        }
        let mut at = read_checkpoint(&scratch)?.unwrap_or(Checkpoint {
            base: plan.base.0,
            ..Checkpoint::default()
        });
        let (total, resumed_at) = (plan.rows(), at.done);
        // Indexes are built once at the end, by sorting, rather than row by row.
        scratch.set_bulk_load(true)?;
        let started = std::time::Instant::now();
        while !at.whole {
            step(at.done, total)?;
            at = pull_batch(&mut scratch, plan, at, source)?;
        }
        step(at.done, total)?;
        let pulled_ms = started.elapsed().as_millis();
        scratch.end_backfill()?;
        let ended_ms = started.elapsed().as_millis();
        // Kept as this library's snapshot without its secondary indexes (smaller, and an open
        // builds them), then the scratch file gets them for `rebase_onto`.
        let packing = self.dir().join(BACKFILL_PACKING);
        pack(&path, &packing)?;
        put_in_place(&packing, &self.dir().join(SNAPSHOT_FILE))?;
        let packed_ms = started.elapsed().as_millis();
        scratch.set_bulk_load(false)?;
        drop(scratch);
        tracing::info!(
            rows = at.done,
            pulled_ms,
            ended_ms,
            packed_ms,
            indexed_ms = started.elapsed().as_millis(),
            "backfill pulled the snapshot"
        );
        Ok(BackfillReport {
            base: plan.base.0,
            rows: at.done,
            pulled: at.done - resumed_at,
            resubmitted: 0,
        })
    }

    /// Removes what a backfill pulled and never put to use (a device that stopped being
    /// behind its leader's compaction point before its backfill ended: a new leader that
    /// still has the log), unless a backfill is running. Returns whether there was a file.
    pub fn discard_backfill(&self) -> Result<bool, EngineError> {
        let path = self.dir().join(BACKFILL_FILE);
        if !path.exists() {
            return Ok(false);
        }
        let running = self.jobs()?.iter().any(|job| {
            matches!(job.kind, JobKind::Backfill { .. }) && job.state == JobState::Running
        });
        if running {
            return Ok(false);
        }
        Projections::remove_files(&path)?;
        tracing::info!("removed a backfill this device no longer needs");
        Ok(true)
    }

    /// Puts a backfilled snapshot to use: the log is dropped and starts again after
    /// `plan.base` (the changes of epochs `led_by` led go back to the offline journal), the
    /// clock is raised to the leader's, and the projection is rebuilt from the backfilled file
    /// (or the snapshot, if it is gone) and the offline journal. The replication runtime must
    /// not write the log meanwhile, and reloads its state from the journal afterwards. Returns
    /// the changes sent back.
    pub fn rebase_onto(
        &self,
        plan: &BackfillPlan,
        led_by: DeviceId,
    ) -> Result<Vec<ChangeId>, EngineError> {
        self.check_plan(plan)?;
        let journal = self.journal()?;
        let started = std::time::Instant::now();
        let returned = {
            let mut history = self.history()?;
            // A copy of the projections this backfill replaces.
            history.discard_waiting(self.dir());
            self.publish_waiting(&history);
            journal.raise_hlc_high_water(plan.hlc)?;
            self.shared.saw_clock(plan.hlc);
            let returned = journal
                .log()
                .rebase(plan.base, plan.base_epoch, plan.head, led_by)?;
            tracing::debug!(ms = started.elapsed().as_millis() as u64, "log rebased");
            // The pulled file is the snapshot unpacked: the rebuild starts from it.
            let scratch = self.dir().join(BACKFILL_FILE);
            if scratch.exists() {
                Projections::replay_from(&scratch, plan.base)?;
                let aside = self.dir().join(crate::rebuild::REBUILD_FILE);
                Projections::install_snapshot(&scratch, &aside, plan.base)?;
            }
            returned
        };
        tracing::info!(
            base = plan.base.0,
            resubmitted = returned.len(),
            ms = started.elapsed().as_millis() as u64,
            "log started again after the leader's compaction point"
        );
        self.rebuild(&mut |_, _| {})?;
        tracing::debug!(
            ms = started.elapsed().as_millis() as u64,
            "rebuilt on the backfill"
        );
        Ok(returned)
    }

    /// Refuses a leader's plan this device must not start its log from: [`check_plan_clock`],
    /// a base entry of an epoch past any this device accepted (it follows the leader whose
    /// plan this is, so it accepted that leader's epoch), or a log that began (`head`) after
    /// its base's epoch. Its elections would start from those epochs.
    fn check_plan(&self, plan: &BackfillPlan) -> Result<(), EngineError> {
        check_plan_clock(plan)?;
        let refused = |why: String| Err(EngineError::Backfill(format!("the leader's plan {why}")));
        let accepted = self.journal()?.election().epoch()?.unwrap_or_default();
        if plan.base_epoch > accepted {
            return refused(format!(
                "starts after an entry of epoch {}, past this device's {accepted}",
                plan.base_epoch
            ));
        }
        if plan.head > plan.base_epoch {
            return refused(format!(
                "has a log that began in epoch {}, after its base's {}",
                plan.head, plan.base_epoch
            ));
        }
        Ok(())
    }
}

/// Refuses a leader's plan whose clock is further ahead of this device's time than the
/// journal accepts a change's ([`CLOCK_AHEAD_MAX_MS`]): the device's clock would start from it.
fn check_plan_clock(plan: &BackfillPlan) -> Result<(), EngineError> {
    let limit = crate::library::now_ms().saturating_add(CLOCK_AHEAD_MAX_MS);
    if plan.hlc.physical_ms > limit {
        return Err(EngineError::Backfill(format!(
            "the leader's plan has a clock ({} ms) more than {} h ahead of this device's",
            plan.hlc.physical_ms,
            CLOCK_AHEAD_MAX_MS / 3_600_000
        )));
    }
    Ok(())
}

/// Opens the scratch file; one of another base, or one that does not open, starts over.
fn open_scratch(
    path: &Path,
    library: &Library,
    plan: &BackfillPlan,
) -> Result<Projections, EngineError> {
    if let Ok(scratch) = Projections::open_for(path, library.models()) {
        if read_checkpoint(&scratch)
            .ok()
            .flatten()
            .is_none_or(|c| c.base == plan.base.0)
        {
            return Ok(scratch);
        }
    }
    Projections::remove_files(path)?;
    Ok(Projections::open_for(path, library.models())?)
}

fn read_checkpoint(scratch: &Projections) -> Result<Option<Checkpoint>, EngineError> {
    match scratch.backfill_checkpoint()? {
        None => Ok(None),
        Some(bytes) => rmp_serde::from_slice(&bytes)
            .map(Some)
            .map_err(|e| EngineError::Backfill(format!("a damaged checkpoint: {e}"))),
    }
}

/// Pulls and writes the next batch at `at`; returns where the backfill stands after it.
fn pull_batch(
    scratch: &mut Projections,
    plan: &BackfillPlan,
    at: Checkpoint,
    source: &mut dyn BackfillSource,
) -> Result<Checkpoint, EngineError> {
    let Some((part, rows)) = plan.parts.get(at.part) else {
        return Ok(Checkpoint { whole: true, ..at });
    };
    let cursor = PartCursor {
        after: at.after,
        skip: at.skip,
    };
    let (images, last) = source.batch(part, cursor, BACKFILL_BATCH)?;
    let bad = |why: &str| EngineError::Backfill(format!("{} from the leader: {why}", part.table));
    if images.len() > BACKFILL_BATCH || at.skip + images.len() as u64 > *rows {
        return Err(bad("more rows than its snapshot holds"));
    }
    let mut after = at.after;
    if part.model.is_some() {
        for image in &images {
            let uuid = image_uuid(image).ok_or_else(|| bad("a row without a uuid"))?;
            if after.is_some_and(|a| a >= uuid) {
                return Err(bad("rows out of order"));
            }
            after = Some(uuid);
        }
    }
    let skip = at.skip + images.len() as u64;
    // Only the source says a part ended: a leader caps a batch by its bytes too.
    let ended = last;
    if ended && skip != *rows {
        return Err(bad(&format!("{skip} rows where its snapshot holds {rows}")));
    }
    let next = if ended {
        Checkpoint {
            part: at.part + 1,
            after: None,
            skip: 0,
            done: at.done + images.len() as u64,
            whole: at.part + 1 == plan.parts.len(),
            ..at
        }
    } else {
        Checkpoint {
            after,
            skip,
            done: at.done + images.len() as u64,
            ..at
        }
    };
    let bytes = rmp_serde::to_vec(&next)
        .map_err(|e| EngineError::Backfill(format!("encoding a checkpoint: {e}")))?;
    scratch.put_backfill_rows(part, at.skip == 0, &images, &bytes)?;
    Ok(next)
}
