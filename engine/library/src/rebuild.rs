//! Rebuild and verify: whole-journal replays into a projection *aside* (a file beside the live
//! one), run as jobs that pause, cancel and resume (decision 0049).
//!
//! The live projection serves reads and the applier while the replay runs. The aside file
//! records the position it reached with each batch, so a job stopped by a shutdown or a
//! `kill -9` resumes from there (a fast load is made durable every
//! [`crate::replay::FAST_LOAD_CHECKPOINT`] changes). A rebuild ends by replaying what was
//! committed meanwhile, with the projection locked, and moving the aside file into place; a
//! verify compares it with the live projection at the same position. A cancelled job deletes
//! its aside file and leaves the live projection as it was.

use std::path::Path;

use keel_journal::VerifyReport;
use keel_projections::Projections;
use uuid::Uuid;

use crate::error::{io_at, EngineError};
use crate::jobs::JobKind;
use crate::library::{Library, PROJECTIONS_FILE};
use crate::replay::{replay, replay_steered, ReplayReport};

/// The aside file of a rebuild, in the library's folder.
pub const REBUILD_FILE: &str = "projections.rebuild.sqlite";
/// The aside file of a verify, in the library's folder.
pub const VERIFY_FILE: &str = "projections.verify.sqlite";
/// Attempts at catching the live projection level with the journal's end, for a verify's
/// comparison, while commits go on.
const LEVEL_ATTEMPTS: usize = 20;

/// What a verify found: the journal's records checked, and how the projections compare.
pub type VerifyOutcome = (VerifyReport, Result<String, EngineError>);

impl Library {
    /// Checks every journal record, then replays the journal into a projection aside and compares
    /// its digest with the live one, and recounts each content's entries in both. Runs as a
    /// job: it can be paused, cancelled, and resumed after a stop.
    pub fn verify(&self) -> Result<VerifyOutcome, EngineError> {
        self.verify_with(&mut |_, _| {})
    }

    /// [`Library::verify`], telling `progress(done, total)` how far its replay is.
    pub fn verify_with(
        &self,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<VerifyOutcome, EngineError> {
        self.verify_as(None, progress)
    }

    /// [`Library::verify`] as a job (under `id` when it resumes one).
    pub(crate) fn verify_as(
        &self,
        id: Option<Uuid>,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<VerifyOutcome, EngineError> {
        let summary = |(report, digest): &VerifyOutcome| {
            let outcome = match digest {
                Ok(_) => "projections match a fresh replay".to_string(),
                Err(e) => e.to_string(),
            };
            format!("{} faults; {outcome}", report.faults.len())
        };
        self.run_job(JobKind::Verify, id, summary, |run| {
            self.verify_now(&mut run.replay_step(progress))
        })
    }

    fn verify_now(
        &self,
        step: &mut dyn FnMut(u64, u64) -> Result<(), EngineError>,
    ) -> Result<VerifyOutcome, EngineError> {
        // The log stays whole under the replay (no compaction meanwhile).
        let _history = self.history()?;
        let report = self.journal()?.verify()?;
        let (mut aside, _) = self.replay_aside(VERIFY_FILE, step)?;
        let compared = self.compare_level(&mut aside);
        drop(aside);
        Projections::remove_files(&self.dir().join(VERIFY_FILE))?;
        Ok((report, compared?))
    }

    /// Brings `aside` to the journal's end while the live projection is there too, and compares
    /// them (digest, then content counts).
    fn compare_level(
        &self,
        aside: &mut Projections,
    ) -> Result<Result<String, EngineError>, EngineError> {
        let mut attempts = 0;
        loop {
            self.flush()?;
            let live = self
                .shared
                .projections
                .lock()
                .map_err(|_| EngineError::Closed)?;
            let journal = self.journal()?;
            let end = journal.stats()?.last_lsn;
            let level = live.applied_position()?.log >= end;
            attempts += 1;
            if !level && attempts < LEVEL_ATTEMPTS {
                continue;
            }
            let from = aside.applied_position()?;
            replay(journal, aside, from, &mut |_, _| {})?;
            let found = live.query().digest()?;
            let expected = aside.query().digest()?;
            let miscounted = live
                .query()
                .miscounted_contents()?
                .len()
                .max(aside.query().miscounted_contents()?.len());
            return Ok(if miscounted > 0 {
                Err(EngineError::Miscounted {
                    contents: miscounted,
                })
            } else if expected == found {
                Ok(found)
            } else {
                Err(EngineError::DigestMismatch { found, expected })
            });
        }
    }

    /// Replays the journal into fresh projections and puts them in place of the live ones. Runs
    /// as a job: it can be paused, cancelled (the live projections stay as they were), and
    /// resumed after a stop.
    pub fn rebuild(&self, progress: &mut dyn FnMut(u64, u64)) -> Result<ReplayReport, EngineError> {
        self.rebuild_as(None, progress)
    }

    /// Rebuilds the projections if a truncation dropped changes they may have applied
    /// (see [`keel_journal::Journal::projections_stale`]), again while truncations come during
    /// the rebuild, up to three times (the next call goes on). Returns whether the projections
    /// are known to hold no dropped change now. A node calls it after such a truncation; an
    /// open does the same itself.
    pub fn rebuild_if_stale(&self) -> Result<bool, EngineError> {
        for _ in 0..3 {
            let stale = self.journal()?.projections_stale()?;
            if stale == 0 {
                return Ok(true);
            }
            let report = self.rebuild(&mut |_, _| {})?;
            tracing::info!(
                changes = report.changes,
                "rebuilt the projections without the changes a truncation dropped"
            );
            if self.journal()?.projections_rebuilt(stale)? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// [`Library::rebuild`] as a job (under `id` when it resumes one).
    pub(crate) fn rebuild_as(
        &self,
        id: Option<Uuid>,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<ReplayReport, EngineError> {
        let summary = |r: &ReplayReport| format!("{} changes replayed", r.changes);
        self.run_job(JobKind::Rebuild, id, summary, |run| {
            self.rebuild_now(&mut run.replay_step(progress))
        })
    }

    fn rebuild_now(
        &self,
        step: &mut dyn FnMut(u64, u64) -> Result<(), EngineError>,
    ) -> Result<ReplayReport, EngineError> {
        // The log stays whole under the replay (no compaction meanwhile).
        let _history = self.history()?;
        let (mut aside, mut report) = self.replay_aside(REBUILD_FILE, step)?;
        self.flush()?;
        let mut live = self
            .shared
            .projections
            .lock()
            .map_err(|_| EngineError::Closed)?;
        let mut reader = self.shared.reader.lock().map_err(|_| EngineError::Closed)?;
        // What was committed while the replay ran, with the applier held off: from no later
        // than a truncation point, since positions after it were reused.
        let mut from = aside.applied_position()?;
        if let Some(floor) = self.journal()?.replay_floor()? {
            from.log = from.log.min(floor);
        }
        let rest = replay(self.journal()?, &mut aside, from, &mut |_, _| {})?;
        report.changes += rest.changes;
        report.faults.extend(rest.faults);
        report.position = rest.position;
        drop(aside);
        // Close both live connections before their files go; placeholders stand in meanwhile.
        let placeholder_dir = tempfile::tempdir().map_err(io_at(self.dir()))?;
        let placeholder = placeholder_dir.path().join("placeholder.sqlite");
        drop(std::mem::replace(
            &mut *live,
            Projections::open(&placeholder)?,
        ));
        drop(std::mem::replace(
            &mut *reader,
            Projections::open_reader(&placeholder)?,
        ));
        let path = self.dir().join(PROJECTIONS_FILE);
        Projections::remove_files(&path)?;
        Projections::rename_files(&self.dir().join(REBUILD_FILE), &path)?;
        *live = Projections::open_for(&path, self.models())?;
        *reader = Projections::open_reader_for(&path, self.models())?;
        if let Ok(mut state) = self.shared.applied.lock() {
            // The new projection holds every local commit applied before: those sequenced
            // since are in the log it replayed, the others in the offline journal it
            // replayed. Only their counter is gone with the records that left the offline
            // journal, so the local position cannot go back (`flush` waits on it).
            state.position = keel_projections::AppliedPosition {
                log: report.position.log,
                local: report.position.local.max(state.position.local),
            };
        }
        Ok(report)
    }

    /// Replays the journal into the aside projection `file`, from the position it reached
    /// before (a resumed job) or from the start. `step(done, total)` counts from the start.
    /// A cancelled or failed replay deletes the file; a stopped one keeps it.
    fn replay_aside(
        &self,
        file: &str,
        step: &mut dyn FnMut(u64, u64) -> Result<(), EngineError>,
    ) -> Result<(Projections, ReplayReport), EngineError> {
        let path = self.dir().join(file);
        let mut aside = open_aside(&path, self)?;
        let journal = self.journal()?;
        let (base, _) = journal.log().base()?;
        let behind = aside.applied_position()?.log;
        if base.0 > 0 && behind < base {
            // The log before the base is gone: the replay starts from the snapshot.
            drop(aside);
            let last = journal.stats()?.last_lsn;
            crate::compact::start_from_snapshot(self.dir(), &path, behind, base, last)?;
            aside = open_aside(&path, self)?;
        }
        let from = aside.applied_position()?;
        let before = from.log.0 + from.local;
        let replayed = replay_steered(self.journal()?, &mut aside, from, &mut |done, total| {
            step(before + done, before + total)
        });
        match replayed {
            Ok(report) => Ok((aside, report)),
            Err(EngineError::Closed) => Err(EngineError::Closed),
            Err(e) => {
                drop(aside);
                Projections::remove_files(&path)?;
                Err(e)
            }
        }
    }

    /// Deletes the aside file a job of `kind` may have left (it is cancelled while stopped).
    pub(crate) fn remove_aside(&self, kind: &JobKind) -> Result<(), EngineError> {
        let file = match kind {
            JobKind::Rebuild => REBUILD_FILE,
            JobKind::Verify => VERIFY_FILE,
            _ => return Ok(()),
        };
        Ok(Projections::remove_files(&self.dir().join(file))?)
    }
}

/// Opens the aside projection at `path`; one that does not open is started over.
fn open_aside(path: &Path, library: &Library) -> Result<Projections, EngineError> {
    match Projections::open_for(path, library.models()) {
        Ok(aside) => Ok(aside),
        Err(error) => {
            tracing::warn!(%error, path = %path.display(), "an aside projection does not open; starting it over");
            Projections::remove_files(path)?;
            Ok(Projections::open_for(path, library.models())?)
        }
    }
}
