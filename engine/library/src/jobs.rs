//! Jobs: long work (indexing, rebuild, verify) with an id, a state, progress and a checkpoint,
//! kept in the journal's `jobs` table (decision 0048).
//!
//! A job's record is saved when it starts, at most every [`JOB_SAVE_EVERY`] while it runs, at
//! each state change and when it ends. A job the process left running (a crash, a shutdown) is
//! `interrupted` when the library opens again, and [`Library::resume_jobs`] runs it again from
//! its checkpoint: an index run skips what its committed batches recorded (the files whose size
//! and time match), a rebuild or a verify replays on from the position its aside projection
//! reached (see `rebuild.rs`). Every job pauses and cancels at its checkpoints: indexing at each
//! committed batch (what it committed stays), a rebuild or a verify at each applied batch (its
//! aside projection is deleted; the live one is untouched).

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::EngineError;
use crate::events::Event;
use crate::library::{now_ms, Library};

/// Most finished jobs kept as history (the oldest are dropped first).
pub const JOB_HISTORY_MAX: usize = 100;
/// Longest time between two saves of a running job's record.
pub const JOB_SAVE_EVERY: Duration = Duration::from_secs(1);
/// Log entries behind the leader that make catching up a job (fewer: a live sync).
pub const CATCH_UP_JOB_MIN: u64 = 1_000;

/// What a job does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "typescript", derive(ts_rs::TS))]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum JobKind {
    /// Indexes a folder of a location (empty: all of it).
    Index {
        /// The location.
        location: Uuid,
        /// The folder, relative to the location's root.
        folder: String,
    },
    /// Hashes every file of a folder of a location again (see [`Library::reidentify`]).
    Identify {
        /// The location.
        location: Uuid,
        /// The folder, relative to the location's root.
        folder: String,
    },
    /// Replays the journal into fresh projections.
    Rebuild,
    /// Checks every journal record and compares the projections with a fresh replay.
    Verify,
    /// Catches up with the leader's log (a device back after a long absence, or one that
    /// joined): progress is log entries stored against the leader's end.
    CatchUp,
    /// The initial sync of a device that joined: the inviter's log and projection file arrive
    /// (progress is log entries stored). Cut short, it goes on as a catch-up from the log stored.
    Join {
        /// The inviting device (its id, hex).
        inviter: String,
    },
    /// Compacts the log up to what the projections applied, at most `upto` (see
    /// [`Library::compact`]). Interrupted, it runs again with the same bound.
    Compact {
        /// The least position every device acknowledged when it started.
        upto: u64,
    },
    /// Pulls the leader's snapshot into this library, which fell behind the leader's
    /// compaction point (see [`Library::backfill`]); progress is rows. Interrupted, it goes on
    /// from its last batch when the node finds itself behind the same base again.
    Backfill {
        /// The device it pulls from (its id, hex).
        from: String,
        /// The log position the snapshot stands for.
        base: u64,
    },
    /// Carries another library's records into this one (see [`Library::merge_from`]).
    /// Interrupted, it goes on from its checkpoint when the same merge is asked again.
    Merge {
        /// The other library's name in this home.
        source: String,
        /// Its id.
        library: Uuid,
    },
}

/// Where a job stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "typescript", derive(ts_rs::TS))]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Working.
    Running,
    /// Waiting to be resumed.
    Paused,
    /// Done.
    Completed,
    /// Stopped by an error (its summary says which).
    Failed,
    /// Stopped on request; what it committed stays.
    Cancelled,
    /// The process stopped while it ran; [`Library::resume_jobs`] runs it again.
    Interrupted,
}

impl JobState {
    /// Whether the job is over (completed, failed or cancelled).
    pub fn is_finished(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }
}

/// How far a job is.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "typescript", derive(ts_rs::TS))]
pub struct Progress {
    /// Units done (files, changes).
    pub done: u64,
    /// Units in all (0 while unknown; it may grow while a walk goes on).
    pub total: u64,
    /// Units per second since the job started.
    pub per_second: u64,
    /// Time left at that rate, if it can be told.
    pub eta_ms: Option<u64>,
}

impl Progress {
    /// `done` of `total` units after `elapsed`, with the rate so far and the time left at it.
    fn at(done: u64, total: u64, elapsed: Duration) -> Self {
        let secs = elapsed.as_secs_f64();
        let per_second = if secs > 0.0 {
            (done as f64 / secs) as u64
        } else {
            0
        };
        let eta_ms = (per_second > 0 && total >= done)
            .then(|| (total - done).saturating_mul(1000) / per_second);
        Self {
            done,
            total,
            per_second,
            eta_ms,
        }
    }
}

/// One job, as kept in the journal and listed by [`Library::jobs`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "typescript", derive(ts_rs::TS))]
pub struct Job {
    /// Its id (a UUIDv7: ids sort by start).
    pub id: Uuid,
    /// What it does.
    pub kind: JobKind,
    /// Where it stands.
    pub state: JobState,
    /// How far it is.
    pub progress: Progress,
    /// When it started, ms since the Unix epoch.
    pub started_ms: u64,
    /// When its record was last saved.
    pub updated_ms: u64,
    /// What it did (once finished), or why it failed.
    pub summary: Option<String>,
    /// Where it goes on from when it runs again, in its kind's own terms (a merge: the model
    /// and the last record carried); `None` for kinds whose checkpoint is elsewhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<String>,
}

impl Job {
    /// A job of `kind` starting now, running.
    pub fn start(kind: JobKind) -> Self {
        let now = now_ms();
        Self {
            id: Uuid::now_v7(),
            kind,
            state: JobState::Running,
            progress: Progress::default(),
            started_ms: now,
            updated_ms: now,
            summary: None,
            checkpoint: None,
        }
    }

    /// Sets its progress: `done` of `total` units since it started.
    pub fn advance(&mut self, done: u64, total: u64) {
        let elapsed = now_ms().saturating_sub(self.started_ms);
        self.progress = Progress::at(done, total, Duration::from_millis(elapsed));
    }
}

/// Saves `job`'s record (stamped now) in `journal`, for work that runs before its library is
/// open (a join's initial sync). Announced to nobody: no library is open to announce it.
pub fn save_job_to(journal: &keel_journal::Journal, job: &mut Job) -> Result<(), EngineError> {
    job.updated_ms = now_ms();
    let bytes = rmp_serde::to_vec_named(&*job)
        .map_err(|e| EngineError::Node(format!("encoding a job: {e}")))?;
    journal.jobs().put(job.id, &bytes)?;
    Ok(())
}

/// What a running job was asked.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Wanted {
    Run,
    Pause,
    Cancel,
    /// Stop, to be resumed when the library opens again (a shutdown).
    Stop,
}

/// The handle a running job is steered by.
pub(crate) struct JobControl {
    wanted: Mutex<Wanted>,
    changed: Condvar,
}

/// The jobs running in this process, by id.
pub(crate) type RunningJobs = Mutex<HashMap<Uuid, Arc<JobControl>>>;

/// A job while it runs: what its work reports progress and checkpoints through.
pub(crate) struct JobRun<'a> {
    library: &'a Library,
    /// The checkpoint the interrupted run this one resumes left (see [`Job::checkpoint`]).
    pub(crate) resumed_from: Option<String>,
    job: Mutex<Job>,
    control: Arc<JobControl>,
    started: Instant,
    saved: Mutex<Instant>,
}

impl JobRun<'_> {
    /// Records progress: saved and announced at most every [`JOB_SAVE_EVERY`].
    pub(crate) fn progress(&self, done: u64, total: u64) {
        let Ok(mut job) = self.job.lock() else { return };
        job.progress = Progress::at(done, total, self.started.elapsed());
        let due = self
            .saved
            .lock()
            .map(|mut saved| {
                let due = saved.elapsed() >= JOB_SAVE_EVERY;
                if due {
                    *saved = Instant::now();
                }
                due
            })
            .unwrap_or(false);
        if due {
            let _ = self.library.save_job(&mut job);
        }
    }

    /// Saves where the job goes on from if it stops now, with its progress.
    pub(crate) fn save_checkpoint(
        &self,
        checkpoint: String,
        (done, total): (u64, u64),
    ) -> Result<(), EngineError> {
        let mut job = self.job.lock().map_err(|_| EngineError::Closed)?;
        job.checkpoint = Some(checkpoint);
        job.progress = Progress::at(done, total, self.started.elapsed());
        self.library.save_job(&mut job)
    }

    /// The step of a replay this job runs: tells `progress`, records it, and stops at a pause
    /// or a cancel (see [`JobRun::checkpoint`]).
    pub(crate) fn replay_step<'b>(
        &'b self,
        progress: &'b mut dyn FnMut(u64, u64),
    ) -> impl FnMut(u64, u64) -> Result<(), EngineError> + 'b {
        move |done, total| {
            progress(done, total);
            self.progress(done, total);
            self.checkpoint()
        }
    }

    /// A point where the job may stop: blocks while it is paused (saved as paused), and
    /// returns [`EngineError::Cancelled`] once it is cancelled.
    pub(crate) fn checkpoint(&self) -> Result<(), EngineError> {
        let mut wanted = self
            .control
            .wanted
            .lock()
            .map_err(|_| EngineError::Closed)?;
        if *wanted == Wanted::Pause {
            self.set_state(JobState::Paused);
            while *wanted == Wanted::Pause {
                wanted = self
                    .control
                    .changed
                    .wait(wanted)
                    .map_err(|_| EngineError::Closed)?;
            }
            self.set_state(JobState::Running);
        }
        match *wanted {
            Wanted::Cancel => Err(EngineError::Cancelled),
            Wanted::Stop => Err(EngineError::Closed),
            _ => Ok(()),
        }
    }

    fn set_state(&self, state: JobState) {
        if let Ok(mut job) = self.job.lock() {
            job.state = state;
            let _ = self.library.save_job(&mut job);
        }
    }
}

impl Library {
    /// Runs `work` as a job of `kind` (under `id` when it resumes an interrupted one): its
    /// record is kept from start to end, its state follows the outcome, and the history is
    /// bounded to [`JOB_HISTORY_MAX`] finished jobs.
    pub(crate) fn run_job<T>(
        &self,
        kind: JobKind,
        id: Option<Uuid>,
        summary: impl FnOnce(&T) -> String,
        work: impl FnOnce(&JobRun<'_>) -> Result<T, EngineError>,
    ) -> Result<T, EngineError> {
        let mut job = Job::start(kind);
        job.id = id.unwrap_or(job.id);
        // A resumed run keeps the checkpoint it goes on from until it saves one of its own.
        if let Some(id) = id {
            job.checkpoint = self.job(id).ok().and_then(|j| j.checkpoint);
        }
        let resumed_from = job.checkpoint.clone();
        let control = Arc::new(JobControl {
            wanted: Mutex::new(Wanted::Run),
            changed: Condvar::new(),
        });
        let id = job.id;
        // Steerable before anyone hears of it.
        self.running_jobs()?.insert(id, control.clone());
        if let Err(e) = self.save_job(&mut job) {
            if let Ok(mut running) = self.running_jobs() {
                running.remove(&id);
            }
            return Err(e);
        }
        let run = JobRun {
            library: self,
            resumed_from,
            job: Mutex::new(job),
            control,
            started: Instant::now(),
            saved: Mutex::new(Instant::now()),
        };
        let result = work(&run);
        if let Ok(mut running) = self.running_jobs() {
            running.remove(&id);
        }
        let mut job = run.job.into_inner().map_err(|_| EngineError::Closed)?;
        (job.state, job.summary) = match &result {
            Ok(value) => (JobState::Completed, Some(summary(value))),
            Err(EngineError::Cancelled) => (JobState::Cancelled, None),
            Err(EngineError::Closed) => (JobState::Interrupted, None),
            Err(e) => (JobState::Failed, Some(e.to_string())),
        };
        self.save_job(&mut job)?;
        self.prune_jobs()?;
        result
    }

    /// Saves `job`'s record (stamped now) and announces it.
    fn save_job(&self, job: &mut Job) -> Result<(), EngineError> {
        save_job_to(self.journal()?, job)?;
        self.publish(Event::JobChanged { job: job.clone() });
        Ok(())
    }

    /// The jobs running in this process.
    fn running_jobs(
        &self,
    ) -> Result<std::sync::MutexGuard<'_, HashMap<Uuid, Arc<JobControl>>>, EngineError> {
        self.shared.jobs.lock().map_err(|_| EngineError::Closed)
    }

    /// Every job kept: running, paused, interrupted, and the finished history; oldest first.
    pub fn jobs(&self) -> Result<Vec<Job>, EngineError> {
        let mut jobs = Vec::new();
        for (id, bytes) in self.journal()?.jobs().all()? {
            let job: Job = rmp_serde::from_slice(&bytes).map_err(|e| {
                EngineError::Journal(keel_journal::JournalError::BadRecord {
                    place: keel_journal::RecordPlace::Job(id),
                    reason: e.to_string(),
                })
            })?;
            jobs.push(job);
        }
        jobs.sort_by_key(|j| j.id);
        Ok(jobs)
    }

    /// The job with this id.
    pub fn job(&self, id: Uuid) -> Result<Job, EngineError> {
        self.jobs()?
            .into_iter()
            .find(|j| j.id == id)
            .ok_or(EngineError::NoSuchJob(id))
    }

    /// Drops the oldest finished jobs beyond [`JOB_HISTORY_MAX`].
    fn prune_jobs(&self) -> Result<(), EngineError> {
        let finished: Vec<Uuid> = self
            .jobs()?
            .into_iter()
            .filter(|j| j.state.is_finished())
            .map(|j| j.id)
            .collect();
        let excess = finished.len().saturating_sub(JOB_HISTORY_MAX);
        for id in finished.into_iter().take(excess) {
            self.journal()?.jobs().remove(id)?;
        }
        Ok(())
    }

    /// Marks the jobs a previous process left running or paused as interrupted (at open).
    pub(crate) fn mark_interrupted_jobs(&self) -> Result<(), EngineError> {
        for mut job in self.jobs()? {
            if matches!(job.state, JobState::Running | JobState::Paused) {
                job.state = JobState::Interrupted;
                self.save_job(&mut job)?;
            }
        }
        Ok(())
    }

    /// Asks running job `id` to pause at its next checkpoint.
    pub fn pause_job(&self, id: Uuid) -> Result<(), EngineError> {
        self.steer(id, Wanted::Pause)
    }

    /// Resumes job `id`: a paused one goes on; an interrupted one runs again on the calling
    /// thread, from its checkpoint, until it ends.
    pub fn resume_job(&self, id: Uuid) -> Result<(), EngineError> {
        if self.steer(id, Wanted::Run).is_ok() {
            return Ok(());
        }
        let job = self.job(id)?;
        if job.state != JobState::Interrupted {
            return Err(EngineError::JobNotRunning(id));
        }
        self.run_again(job)
    }

    /// Cancels job `id`: a running or paused one stops at its next checkpoint (what it
    /// committed stays); an interrupted one is marked cancelled.
    pub fn cancel_job(&self, id: Uuid) -> Result<(), EngineError> {
        if self.steer(id, Wanted::Cancel).is_ok() {
            return Ok(());
        }
        let mut job = self.job(id)?;
        if job.state != JobState::Interrupted {
            return Err(EngineError::JobNotRunning(id));
        }
        self.remove_aside(&job.kind)?;
        job.state = JobState::Cancelled;
        self.save_job(&mut job)
    }

    /// Asks every running job to stop at its next checkpoint, to be resumed when the library
    /// opens again (a shutdown).
    pub fn stop_jobs(&self) -> Result<(), EngineError> {
        let ids: Vec<Uuid> = self.running_jobs()?.keys().copied().collect();
        for id in ids {
            // A job that ended meanwhile is gone.
            let _ = self.steer(id, Wanted::Stop);
        }
        Ok(())
    }

    /// Follows a catch-up (the node reports each segment stored: the log here was at `before`,
    /// now at `stored`): a job starts when this device was at least [`CATCH_UP_JOB_MIN`] entries
    /// behind, its progress is saved at most every [`JOB_SAVE_EVERY`], and it completes when
    /// the log here reaches the leader's end.
    pub(crate) fn catch_up_progress(
        &self,
        before: u64,
        stored: u64,
        leader_end: u64,
    ) -> Result<(), EngineError> {
        let mut current = self
            .shared
            .catch_up
            .lock()
            .map_err(|_| EngineError::Closed)?;
        if current.is_none() {
            if leader_end.saturating_sub(before) < CATCH_UP_JOB_MIN {
                return Ok(());
            }
            let mut job = Job::start(JobKind::CatchUp);
            self.save_job(&mut job)?;
            *current = Some((job, Instant::now(), before));
        }
        let Some((job, started, from)) = current.as_mut() else {
            return Ok(());
        };
        let (done, total) = (
            stored - (*from).min(stored),
            leader_end - (*from).min(leader_end),
        );
        job.progress = Progress::at(done, total, started.elapsed());
        if stored >= leader_end {
            job.state = JobState::Completed;
            job.summary = Some(format!("caught up to log position {leader_end}"));
            self.save_job(job)?;
            *current = None;
            return self.prune_jobs();
        }
        if now_ms().saturating_sub(job.updated_ms) >= JOB_SAVE_EVERY.as_millis() as u64 {
            self.save_job(job)?;
        }
        Ok(())
    }

    /// Runs again, one after the other on the calling thread, every job the last process left
    /// unfinished, but a merge (it needs its other library: it goes on when the same merge is
    /// asked again). Returns how many ran.
    pub fn resume_jobs(&self) -> Result<usize, EngineError> {
        let interrupted: Vec<Job> = self
            .jobs()?
            .into_iter()
            .filter(|j| j.state == JobState::Interrupted)
            .filter(|j| !matches!(j.kind, JobKind::Merge { .. }))
            .collect();
        for job in &interrupted {
            self.run_again(job.clone())?;
        }
        Ok(interrupted.len())
    }

    /// Runs an interrupted job again under its id.
    fn run_again(&self, job: Job) -> Result<(), EngineError> {
        let rehash = matches!(job.kind, JobKind::Identify { .. });
        match job.kind {
            JobKind::Index { location, folder } | JobKind::Identify { location, folder } => {
                let location = self
                    .read(|p| p.query().locations())?
                    .into_iter()
                    .find(|l| l.uuid == location)
                    .ok_or(EngineError::NoSuchJob(job.id))?;
                let mode = crate::indexer::RunMode {
                    settle: None,
                    rehash,
                };
                self.index_as_job(&location, folder, Some(job.id), mode, &mut |_| {})?;
            }
            JobKind::Rebuild => {
                // From the position its aside projection reached.
                self.rebuild_as(Some(job.id), &mut |_, _| {})?;
            }
            JobKind::Verify => {
                // Its outcome is in the job's summary.
                let (_report, _outcome) = self.verify_as(Some(job.id), &mut |_, _| {})?;
            }
            JobKind::CatchUp => {
                // Replication goes on from the log stored here when the node reconnects, under
                // a catch-up job of its own: this one ends.
                let mut job = job;
                job.state = JobState::Cancelled;
                job.summary = Some("interrupted; the next catch-up goes on from here".into());
                self.save_job(&mut job)?;
            }
            JobKind::Join { .. } => {
                // What arrived is stored; the node catches up the rest from there (a catch-up
                // job of its own when it is long), not from the start.
                let mut job = job;
                let stored = self.journal()?.stats()?.last_lsn.0;
                job.state = JobState::Completed;
                job.summary = Some(format!(
                    "cut at log position {stored} of {}; the rest arrives by catch-up",
                    job.progress.total
                ));
                self.save_job(&mut job)?;
            }
            JobKind::Compact { upto } => {
                self.compact_as(Some(job.id), keel_schema::Lsn(upto))?;
            }
            JobKind::Backfill { .. } => {
                // It needs the leader: the node goes on from the scratch file's checkpoint
                // when it finds itself behind the same base again, under a job of its own.
                let mut job = job;
                job.state = JobState::Cancelled;
                job.summary = Some("interrupted; the next backfill goes on from here".into());
                self.save_job(&mut job)?;
            }
            JobKind::Merge { .. } => {
                // It needs the other library open: it goes on when the same merge is asked
                // again (`Library::merge_from`), from its checkpoint.
            }
        }
        Ok(())
    }

    /// Sets what running job `id` is asked to do.
    fn steer(&self, id: Uuid, wanted: Wanted) -> Result<(), EngineError> {
        let control = self
            .running_jobs()?
            .get(&id)
            .cloned()
            .ok_or(EngineError::JobNotRunning(id))?;
        let mut current = control.wanted.lock().map_err(|_| EngineError::Closed)?;
        if *current == Wanted::Cancel {
            return Err(EngineError::JobNotRunning(id));
        }
        *current = wanted;
        control.changed.notify_all();
        Ok(())
    }
}
