//! Typed events for host apps, on a tokio broadcast bus.

use keel_schema::{Lsn, Op};
use uuid::Uuid;

/// Capacity of the event bus; a receiver that lags further loses the oldest events.
pub const EVENT_BUS_CAPACITY: usize = 1024;
/// Most records listed in one [`Event::RecordsChanged`].
pub const EVENT_RECORDS_MAX: usize = 4096;

/// What happened to one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[cfg_attr(feature = "typescript", derive(ts_rs::TS))]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    /// Created or updated.
    Upserted,
    /// Deleted.
    Deleted,
}

impl ChangeKind {
    pub(crate) fn of(op: &Op) -> Self {
        match op {
            Op::Upsert(_) => ChangeKind::Upserted,
            Op::Delete => ChangeKind::Deleted,
        }
    }
}

/// An event on the library's bus.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[cfg_attr(feature = "typescript", derive(ts_rs::TS))]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Event {
    /// Two devices wrote one field while neither had seen the other's write: recorded as a
    /// conflict (see [`crate::Library::conflicts`]); the same on every device.
    ConflictRecorded {
        /// The conflict's id.
        id: Uuid,
        /// Its model.
        model: &'static str,
        /// Its record.
        record: Uuid,
        /// Its field.
        field: &'static str,
    },
    /// Records changed in the projections (committed here or elsewhere).
    RecordsChanged {
        /// `(model name, record uuid, kind)`, at most [`EVENT_RECORDS_MAX`].
        records: Vec<(&'static str, Uuid, ChangeKind)>,
        /// How many changes the batch held in all.
        total: usize,
        /// The log position applied after this batch.
        applied: Lsn,
    },
    /// Progress of a long job (indexing, rebuild).
    JobProgress {
        /// The job's name.
        job: &'static str,
        /// Units done.
        done: u64,
        /// Units in all (0 if unknown).
        total: u64,
    },
    /// A job started, changed state, made progress (at most every second) or ended; see
    /// [`Library::jobs`](crate::Library::jobs).
    JobChanged {
        /// The job as now recorded.
        job: crate::jobs::Job,
    },
    /// A job finished.
    JobFinished {
        /// The job's name.
        job: &'static str,
        /// A one-line summary.
        summary: String,
    },
    /// Catching up with the leader (initial sync of a new device, or after being away): log
    /// entries stored so far and how many the leader has.
    SyncProgress {
        /// Last log position stored here.
        stored: u64,
        /// The leader's last log position.
        leader_end: u64,
        /// Bytes received in log segments since the node started.
        bytes: u64,
    },
    /// A session with another device of the library began (the first, if there are several).
    PeerConnected {
        /// The device.
        device: keel_schema::DeviceId,
    },
    /// The last session with that device ended.
    PeerGone {
        /// The device.
        device: keel_schema::DeviceId,
    },
    /// The leader this device knows of changed (`None`: none known, an election may run).
    LeaderChanged {
        /// The new leader.
        leader: Option<keel_schema::DeviceId>,
        /// Its epoch's counter.
        epoch: u64,
    },
    /// This device fell behind its leader (or lost it, or has changes to push): it is
    /// syncing. [`Event::SyncFinished`] follows when it is in sync again.
    SyncStarted,
    /// This device is in sync: it leads, or it follows a connected leader, has pushed every
    /// change it made and applied the whole log the leader said it has.
    SyncFinished {
        /// The log's length here.
        log_len: u64,
    },
    /// The applier failed. Nothing more is applied (reads answer with what was applied before);
    /// the next open heals the projection from the journal, from the last position applied.
    ApplyFailed {
        /// Why.
        reason: String,
    },
}
