//! The simulator's changes and projections: tag edits sealed under a library key, and each
//! device's projections, a real SQLite file fed as the node's applier feeds it.
//!
//! - A follower's own commit is applied at once (the offline journal, then the applier); a
//!   leader's, when it is sequenced.
//! - A log append is applied once durable, or, for a segment from the leader, sometimes just
//!   before (`CommittedBatch::early`): a crash then leaves the projections ahead of the log.
//! - A truncation unapplies nothing: the changes it drops stay applied, and their makers
//!   send them again. It leaves a replay floor, as the journal does.
//! - A restart heals as `Library::open` does: projections ahead of the log are rebuilt,
//!   others replay the log from the lesser of their position and the replay floor.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use keel_journal::{LibraryKey, Sealer};
use keel_projections::{AppliedPosition, Projections};
use keel_schema::{Change, ChangeId, Epoch, Hlc, LibraryId, Lsn, Tag, Value};
use uuid::Uuid;

use super::Disk;

/// The simulated library's key: every device holds it (and so does the hostile paired device).
pub(crate) fn sealer() -> &'static Sealer {
    static SEALER: OnceLock<Sealer> = OnceLock::new();
    SEALER.get_or_init(|| LibraryKey::generate().sealer(LibraryId(Uuid::from_u128(0x5eed))))
}

/// Seals a change as a device's runtime does.
pub(crate) fn seal(change: &Change) -> Vec<u8> {
    sealer().seal(change.id, &change.encode())
}

/// Opens a sealed change, as the journal does before storing one.
pub(crate) fn open(sealed: &[u8]) -> Option<Change> {
    let (id, plain) = sealer().open(sealed).ok()?;
    let change = Change::decode(&plain).ok()?;
    (change.id == id).then_some(change)
}

/// The tags devices edit: few, so that concurrent edits meet on the same rows and fields.
pub(crate) const TAGS: u128 = 6;

/// An edit of one of the [`TAGS`] by `rolls` (random numbers): a delete, or an upsert of some
/// of its fields.
pub(crate) fn edit(id: ChangeId, hlc: Hlc, rolls: [u8; 3]) -> Change {
    let record = Uuid::from_u128((0x7a6 << 16) | (u128::from(rolls[0]) % TAGS));
    let name = || Value::Text(format!("tag {}", rolls[2] % 7));
    let color = || match rolls[2] % 3 {
        0 => Value::Null,
        n => Value::Text(format!("#{n}")),
    };
    let created = || Value::Int(i64::from(rolls[2]));
    let fields = match rolls[1] % 8 {
        0 => return Change::delete::<Tag>(id, hlc, record),
        1 => vec![("name", name())],
        2 => vec![("color", color())],
        3 => vec![("name", name()), ("color", color())],
        _ => vec![
            ("name", name()),
            ("color", color()),
            ("created_ms", created()),
        ],
    };
    Change::upsert_fields::<Tag>(id, hlc, record, fields).expect("Tag has these fields")
}

/// A projection file with the schema made, copied for each device (making one costs about
/// 100 ms, a copy well under one).
fn template() -> &'static Path {
    static TEMPLATE: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, path) = TEMPLATE.get_or_init(|| {
        let dir = scratch();
        let path = dir.path().join("template.sqlite");
        let projections = Projections::open(&path).expect("template projections");
        projections
            .connection()
            .execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
            .expect("checkpoint the template");
        drop(projections);
        (dir, path)
    });
    path
}

/// A folder for a seed's files (see [`keel_tests::shm`]).
pub(crate) fn scratch() -> tempfile::TempDir {
    keel_tests::shm::dir("keel-sim")
}

/// One device's projections and what they applied.
pub(crate) struct Projected {
    path: PathBuf,
    projections: Projections,
    position: AppliedPosition,
    /// Rebuilds at a restart, the projections found ahead of the log.
    pub(crate) rebuilt_ahead: u64,
    /// Rebuilds after a truncation dropped changes they may hold.
    pub(crate) rebuilt_stale: u64,
    /// Rows horizons collected here (removed, or freed of their tombstone).
    pub(crate) collected: u64,
}

impl Projected {
    /// Empty projections at `path`.
    pub(crate) fn new(path: PathBuf) -> Self {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
        std::fs::copy(template(), &path).expect("copy the template projections");
        let projections = Projections::open(&path).expect("open projections");
        Self {
            path,
            projections,
            position: AppliedPosition::default(),
            rebuilt_ahead: 0,
            rebuilt_stale: 0,
            collected: 0,
        }
    }

    /// The last log position applied (what a follower acknowledges).
    pub(crate) fn applied(&self) -> Lsn {
        self.position.log
    }

    /// Applies a local commit, the offline journal's `seq`-th record.
    pub(crate) fn apply_local(&mut self, change: &Change, seq: u64) {
        self.position.local = seq;
        self.projections
            .apply(std::slice::from_ref(change), Some(self.position))
            .expect("apply a local change");
    }

    /// Applies a segment before the journal stored it (`CommittedBatch::early`), marked so.
    pub(crate) fn apply_early(&mut self, at: Lsn, entries: &[(Epoch, Vec<u8>)]) {
        self.projections.mark_ahead_from(at);
        self.apply_log(at, entries);
    }

    /// Applies log entries from position `at` (barriers hold nothing); returns the changes,
    /// for the device's clock to observe.
    pub(crate) fn apply_log(&mut self, at: Lsn, entries: &[(Epoch, Vec<u8>)]) -> Vec<Hlc> {
        let mut changes = Vec::new();
        let mut logged = Vec::new();
        for (k, (_, sealed)) in entries.iter().enumerate() {
            if sealed.is_empty() {
                continue;
            }
            let change = open(sealed).expect("only changes that open reach a log");
            changes.push(change);
            logged.push(Some(at.0 + k as u64));
        }
        self.position.log = Lsn(at.0 + entries.len() as u64 - 1);
        let stats = self
            .projections
            .apply_logged(&changes, &logged, Some(self.position))
            .expect("apply log entries");
        self.collected += stats.collected;
        changes.iter().map(|c| c.hlc).collect()
    }

    /// What `Library::open` does with the projections at a restart, from what `disk` holds.
    pub(crate) fn heal(&mut self, disk: &Disk) {
        if disk.stale > 0 {
            // A truncation dropped changes they may hold: made again from the journal.
            self.rebuild(disk);
            return;
        }
        // What the file holds, as an open reads it.
        self.position = self
            .projections
            .applied_position()
            .expect("applied position");
        let mut from = self
            .position
            .log
            .min(disk.replay_floor.unwrap_or(Lsn(u64::MAX)));
        let last = disk.log.len() as u64;
        if from.0 > last {
            let ahead = self.projections.ahead_from().expect("ahead_from");
            assert!(
                ahead.is_some_and(|a| a.0 <= last + 1),
                "projections applied {} but the log ends at {last} (ahead from {ahead:?}): \
                 the library would not open (ProjectionAhead)",
                from.0
            );
            // Stopped while the journal stored a segment applied early: rebuilt.
            self.rebuilt_ahead += 1;
            self.start_over();
            from = Lsn(0);
        }
        self.position.log = from;
        let start = from.0 as usize;
        if start < disk.log.len() {
            self.apply_log(Lsn(from.0 + 1), &disk.log[start..]);
        }
        if disk.local_seq > self.position.local {
            // Records the offline journal gained (a truncation returns this device's own).
            self.apply_offline(disk);
        }
        let stored = self.projections.applied_position().expect("position");
        if disk.replay_floor.is_some() && stored.log > self.position.log {
            // The position past the cut is not kept (see `Library::open`).
            self.projections
                .apply(&[], Some(self.position))
                .expect("store the position");
        }
    }

    /// `Library::rebuild_if_stale`: the projections made again from the log and the offline
    /// journal.
    pub(crate) fn rebuild(&mut self, disk: &Disk) {
        self.start_over();
        self.rebuilt_stale += 1;
        if !disk.log.is_empty() {
            self.apply_log(Lsn(1), &disk.log);
        }
        self.apply_offline(disk);
    }

    fn start_over(&mut self) {
        let fresh = Self::new(self.path.clone());
        self.projections = fresh.projections;
        self.position = fresh.position;
    }

    fn apply_offline(&mut self, disk: &Disk) {
        self.position.local = disk.local_seq;
        let changes: Vec<Change> = disk.offline.iter().filter_map(|(_, s)| open(s)).collect();
        self.projections
            .apply(&changes, Some(self.position))
            .expect("apply the offline journal");
    }

    /// The projections' digest.
    pub(crate) fn digest(&self) -> String {
        self.projections.query().digest().expect("digest")
    }

    /// The digest of a fresh replay of `log` (what `keel verify` compares against).
    pub(crate) fn replayed(dir: &Path, log: &[(Epoch, Vec<u8>)]) -> String {
        let mut fresh = Self::new(dir.join("replay.sqlite"));
        if !log.is_empty() {
            fresh.apply_log(Lsn(1), log);
        }
        fresh.digest()
    }
}
