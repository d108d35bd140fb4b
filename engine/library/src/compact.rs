//! Compaction: the library keeps a snapshot of its projections (the rows with their clocks, as
//! SQLite holds them, packed with zstd: `snapshot.sqlite.zst`) and the journal drops the log up
//! to the position the snapshot applied, its base. A projection rebuilt, verified or healed from
//! scratch starts from the snapshot and replays the log after the base (decision 0055).
//!
//! The snapshot is never past what every device acknowledged (decision 0081): a truncation
//! below its position would leave the changes it dropped in the snapshot, for good. The
//! projections are copied at the position they applied, which may be past the caller's
//! `upto`; such a copy waits, packed, until a later call's `upto` reaches it, and is thrown
//! away if the log at its position changed meanwhile (a truncation) or the projections hold
//! changes a truncation dropped. The order keeps every crash recoverable: the new snapshot is
//! in place (synced, renamed) before the journal drops anything.

use std::path::Path;

use keel_projections::Projections;
use keel_schema::{Epoch, Lsn};
use serde::Serialize;
use uuid::Uuid;

use crate::error::{io_at, EngineError};
use crate::jobs::JobKind;
use crate::library::{Library, JOURNAL_FILE, PROJECTIONS_FILE};

/// The snapshot the log's compacted part lives on as, in the library's folder: a copy of the
/// projection file as one or more zstd frames.
pub const SNAPSHOT_FILE: &str = "snapshot.sqlite.zst";
/// The copy being made (packed into [`SNAPSHOT_FILE`], then removed).
const SNAPSHOT_COPY: &str = "snapshot.sqlite.incoming";
/// A snapshot being written (moved to [`SNAPSHOT_FILE`] once complete and synced).
const SNAPSHOT_PACKING: &str = "snapshot.sqlite.zst.incoming";
/// A snapshot past what every device acknowledged, packed, waiting (see [`History`]).
const SNAPSHOT_WAITING: &str = "snapshot.sqlite.zst.waiting";
/// The snapshot unpacked to be brought to new models (see [`upgrade_snapshot`]).
const SNAPSHOT_UPGRADING: &str = "snapshot.sqlite.upgrading";
/// zstd worker threads packing a snapshot. Measured on the 1M backfill's snapshot (decision
/// 0056).
const PACK_THREADS: u32 = 2;
/// zstd level of a snapshot at rest: the fast level the wire uses for the same file.
const SNAPSHOT_ZSTD_LEVEL: i32 = -1;

/// What a compaction did.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "typescript", derive(ts_rs::TS))]
pub struct CompactReport {
    /// The compaction position now: the log starts after it.
    #[cfg_attr(feature = "typescript", ts(type = "number"))]
    pub base: u64,
    /// Log records dropped by this compaction.
    pub dropped: u64,
    /// Bytes of the snapshot kept in their place.
    pub snapshot_bytes: u64,
    /// Bytes of the journal file before and after (redb reuses the space it frees: the file
    /// does not shrink, it stops growing).
    pub journal_bytes: (u64, u64),
    /// The position of a snapshot made but not put in place, because not every device has
    /// acknowledged it yet (it is past `upto`): a later compaction whose `upto` reaches it
    /// puts it in place. `None` when no snapshot waits.
    #[cfg_attr(feature = "typescript", ts(type = "number | null"))]
    pub waiting_at: Option<u64>,
}

/// What the history lock guards besides the log's compacted part: the snapshot a compaction
/// made past its `upto`, waiting for a later one (see the module's docs).
#[derive(Debug, Default)]
pub(crate) struct History {
    waiting: Option<Waiting>,
}

/// A packed snapshot ([`SNAPSHOT_WAITING`]) of the projections at `at`, whose log entry had
/// `epoch` when it was made: the same position and epoch later mean the same log up to it.
#[derive(Debug, Clone, Copy)]
struct Waiting {
    at: Lsn,
    epoch: Epoch,
}

impl History {
    /// Forgets the waiting snapshot and removes its file.
    pub(crate) fn discard_waiting(&mut self, dir: &Path) {
        if self.waiting.take().is_some() {
            let _ = std::fs::remove_file(dir.join(SNAPSHOT_WAITING));
        }
    }
}

impl Library {
    /// Compacts the log up to `upto` or the position the projections have applied, whichever
    /// is lower. `upto` is the least position every device of the library acknowledged: a
    /// node knows it (see `keel_node::Node::compact`); a library with no other device may
    /// pass its log's end. Runs as a job. Compacting at or below the current base does
    /// nothing.
    pub fn compact(&self, upto: Lsn) -> Result<CompactReport, EngineError> {
        self.compact_as(None, upto)
    }

    /// [`Library::compact`] as a job (under `id` when it resumes one).
    pub(crate) fn compact_as(
        &self,
        id: Option<Uuid>,
        upto: Lsn,
    ) -> Result<CompactReport, EngineError> {
        let summary = |r: &CompactReport| {
            format!(
                "log compacted to {} ({} records dropped, snapshot {} bytes)",
                r.base, r.dropped, r.snapshot_bytes
            )
        };
        self.run_job(JobKind::Compact { upto: upto.0 }, id, summary, |_| {
            self.compact_now(upto)
        })
    }

    fn compact_now(&self, upto: Lsn) -> Result<CompactReport, EngineError> {
        // One compaction at a time, and none under a rebuild's or a verify's replay.
        let mut history = self.history()?;
        let report = self.compact_holding(&mut history, upto);
        self.publish_waiting(&history);
        report
    }

    /// The position of the snapshot that waits, if one does (see [`History`]).
    pub(crate) fn compaction_waiting(&self) -> Option<u64> {
        match self
            .shared
            .waiting_at
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            0 => None,
            at => Some(at),
        }
    }

    /// Makes what `history` holds readable by [`Library::compaction_waiting`].
    pub(crate) fn publish_waiting(&self, history: &History) {
        let at = history.waiting.map_or(0, |w| w.at.0);
        self.shared
            .waiting_at
            .store(at, std::sync::atomic::Ordering::Relaxed);
    }

    fn compact_holding(
        &self,
        history: &mut History,
        upto: Lsn,
    ) -> Result<CompactReport, EngineError> {
        let dir = self.dir().to_path_buf();
        let journal = self.journal()?;
        let journal_before = file_len(&dir.join(JOURNAL_FILE));
        let (old_base, _) = journal.log().base()?;
        if upto <= old_base {
            return Ok(self.nothing_compacted(old_base, journal_before, history));
        }
        if let Some(waiting) = history.waiting {
            if !self.still_holds(waiting)? || waiting.at <= old_base {
                history.discard_waiting(&dir);
            } else if waiting.at <= upto {
                history.waiting = None;
                return self.put_snapshot_in_place(waiting.at, journal_before);
            } else {
                return Ok(self.nothing_compacted(old_base, journal_before, history));
            }
        }
        if journal.projections_stale()? > 0 {
            // They hold changes a truncation dropped: a copy would keep them.
            tracing::info!("not compacting: the projections wait for a rebuild");
            return Ok(self.nothing_compacted(old_base, journal_before, history));
        }
        let incoming = dir.join(SNAPSHOT_COPY);
        // One read transaction: a consistent state at the position it has applied.
        let at = Projections::snapshot(&dir.join(PROJECTIONS_FILE), &incoming)?.log;
        let epoch = journal.log().epoch_at(at)?;
        let stale = journal.projections_stale()? > 0;
        let (Some(epoch), false, true) = (epoch, stale, at > old_base) else {
            Projections::remove_files(&incoming)?;
            return Ok(self.nothing_compacted(old_base, journal_before, history));
        };
        let packing = dir.join(SNAPSHOT_PACKING);
        let packed = pack(&incoming, &packing);
        Projections::remove_files(&incoming)?;
        packed?;
        std::fs::rename(&packing, dir.join(SNAPSHOT_WAITING)).map_err(io_at(&packing))?;
        if at <= upto {
            return self.put_snapshot_in_place(at, journal_before);
        }
        history.waiting = Some(Waiting { at, epoch });
        tracing::info!(
            at = at.0,
            upto = upto.0,
            "the snapshot waits until every device acknowledged its position"
        );
        Ok(self.nothing_compacted(old_base, journal_before, history))
    }

    /// Whether the log still holds the waiting snapshot's position with the same epoch, and
    /// no truncation since left the projections (so perhaps the copy) stale.
    fn still_holds(&self, waiting: Waiting) -> Result<bool, EngineError> {
        let journal = self.journal()?;
        Ok(journal.projections_stale()? == 0
            && journal.log().epoch_at(waiting.at)? == Some(waiting.epoch))
    }

    /// Puts the packed snapshot at `base` ([`SNAPSHOT_WAITING`]) in place and drops the log
    /// up to `base`.
    fn put_snapshot_in_place(
        &self,
        base: Lsn,
        journal_before: u64,
    ) -> Result<CompactReport, EngineError> {
        let dir = self.dir();
        put_in_place(&dir.join(SNAPSHOT_WAITING), &dir.join(SNAPSHOT_FILE))?;
        let dropping = std::time::Instant::now();
        let compaction = self.journal()?.log().compact(base)?;
        tracing::info!(
            base = base.0,
            dropped = compaction.dropped,
            ms = dropping.elapsed().as_millis() as u64,
            "log compacted"
        );
        Ok(CompactReport {
            base: compaction.base.0,
            dropped: compaction.dropped,
            snapshot_bytes: file_len(&dir.join(SNAPSHOT_FILE)),
            journal_bytes: (journal_before, file_len(&dir.join(JOURNAL_FILE))),
            waiting_at: None,
        })
    }

    /// The lock a compaction holds, and a replay of the log aside (see `Shared::history`).
    pub(crate) fn history(&self) -> Result<std::sync::MutexGuard<'_, History>, EngineError> {
        self.shared.history.lock().map_err(|_| EngineError::Closed)
    }

    fn nothing_compacted(&self, base: Lsn, journal_bytes: u64, history: &History) -> CompactReport {
        CompactReport {
            base: base.0,
            dropped: 0,
            snapshot_bytes: file_len(&self.dir().join(SNAPSHOT_FILE)),
            journal_bytes: (journal_bytes, journal_bytes),
            waiting_at: history.waiting.map(|w| w.at.0),
        }
    }
}

/// Removes what a compaction, a backfill or a join cut short left in `dir` (a copy, a packing
/// or a received file never moved in place; the snapshot in place is whole, since it is
/// renamed only once synced).
pub(crate) fn remove_scratch(dir: &Path) {
    let unpacked = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == FROM_SNAPSHOT));
    let scratch: Vec<_> = [
        SNAPSHOT_COPY,
        SNAPSHOT_PACKING,
        // A waiting snapshot is known only to the process that made it.
        SNAPSHOT_WAITING,
        SNAPSHOT_UPGRADING,
        crate::backfill::BACKFILL_PACKING,
        // A join cut short (its journal is closed: the library opens).
        crate::JOIN_INCOMING_FILE,
        crate::JOIN_FRAMES_FILE,
    ]
    .iter()
    .map(|name| dir.join(name))
    .chain(unpacked)
    .collect();
    for path in scratch {
        if path.exists() {
            tracing::info!(path = %path.display(), "removing what a compaction, a backfill or a join cut short left");
            let _ = Projections::remove_files(&path);
        }
    }
}

/// The extension of a snapshot being unpacked in place of a projection.
const FROM_SNAPSHOT: &str = "from-snapshot";

/// Packs `file` into `dest` (one zstd stream).
pub(crate) fn pack(file: &Path, dest: &Path) -> Result<(), EngineError> {
    let mut from = std::fs::File::open(file).map_err(io_at(file))?;
    let to = std::fs::File::create(dest).map_err(io_at(dest))?;
    let mut encoder = zstd::stream::Encoder::new(std::io::BufWriter::new(to), SNAPSHOT_ZSTD_LEVEL)
        .map_err(io_at(dest))?;
    // zstd's workers compress while this thread reads (the frames are the same format).
    encoder.multithread(PACK_THREADS).map_err(io_at(dest))?;
    std::io::copy(&mut from, &mut encoder).map_err(io_at(dest))?;
    let mut to = encoder.finish().map_err(io_at(dest))?;
    std::io::Write::flush(&mut to).map_err(io_at(dest))?;
    Ok(())
}

/// Unpacks the zstd frames of `file` into the new file `dest`.
pub(crate) fn unpack(file: &Path, dest: &Path) -> Result<(), EngineError> {
    let from = std::fs::File::open(file).map_err(io_at(file))?;
    let mut decoder = zstd::stream::Decoder::new(from).map_err(io_at(file))?;
    let mut to = std::io::BufWriter::new(std::fs::File::create(dest).map_err(io_at(dest))?);
    std::io::copy(&mut decoder, &mut to)
        .map_err(|e| EngineError::SnapshotDamaged(format!("{}: {e}", file.display())))?;
    std::io::Write::flush(&mut to).map_err(io_at(dest))?;
    Ok(())
}

/// Syncs `file` and moves it to `dest` durably.
pub(crate) fn put_in_place(file: &Path, dest: &Path) -> Result<(), EngineError> {
    std::fs::File::open(file)
        .and_then(|f| f.sync_all())
        .map_err(io_at(file))?;
    std::fs::rename(file, dest).map_err(io_at(dest))?;
    if let Some(parent) = dest.parent() {
        // The rename is durable once the folder is synced.
        let _ = std::fs::File::open(parent).and_then(|d| d.sync_all());
    }
    Ok(())
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// Puts a copy of the library's snapshot at `dest` (replacing what is there) when the journal
/// is compacted past `applied`, what the projection at `dest` has applied: the log before the
/// base is gone, so a projection behind it starts from the snapshot. Returns whether it did.
/// Whether this library's join, from a device whose log was compacted, was cut before the
/// snapshot of the positions up to the base was stored: the journal stored the base when the
/// file began to arrive, the snapshot is not here, and the join's job never completed. The
/// inviter holds that snapshot, so the device can fetch it again (a backfill), where a library
/// that lost its own snapshot cannot.
pub(crate) fn join_cut_before_its_snapshot(
    journal: &keel_journal::Journal,
    dir: &Path,
) -> Result<bool, EngineError> {
    if dir.join(SNAPSHOT_FILE).exists() {
        return Ok(false);
    }
    for (_, bytes) in journal.jobs().all()? {
        let Ok(job) = rmp_serde::from_slice::<crate::Job>(&bytes) else {
            continue;
        };
        if matches!(job.kind, crate::JobKind::Join { .. })
            && job.state != crate::JobState::Completed
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Brings the library's snapshot to the app's `models` when it was built for others (an app
/// upgraded after its library compacted: the log before the base cannot be replayed for the
/// new models; see `Projections::upgrade_models`), and puts it back in place packed. Returns
/// what it did, or `None` when there is no snapshot or it is built for `models` already.
pub(crate) fn upgrade_snapshot(
    dir: &Path,
    models: &keel_schema::Registry,
) -> Result<Option<keel_projections::ModelsUpgrade>, EngineError> {
    let snapshot = dir.join(SNAPSHOT_FILE);
    if !snapshot.exists() {
        return Ok(None);
    }
    let copy = dir.join(SNAPSHOT_UPGRADING);
    unpack(&snapshot, &copy)?;
    if Projections::built_for_models(&copy, models) != Some(false) {
        Projections::remove_files(&copy)?;
        return Ok(None);
    }
    let upgraded = Projections::upgrade_models(&copy, models);
    let packing = dir.join(SNAPSHOT_PACKING);
    let packed = upgraded.and_then(|report| {
        // The copy is closed: its write-ahead log folded in before it is packed.
        Projections::checkpoint_file(&copy)?;
        Ok(report)
    });
    let report = match packed {
        Ok(report) => report,
        Err(e) => {
            Projections::remove_files(&copy)?;
            return Err(e.into());
        }
    };
    let result = pack(&copy, &packing);
    Projections::remove_files(&copy)?;
    result?;
    put_in_place(&packing, &snapshot)?;
    tracing::info!(
        models = ?report.models,
        upcast = report.upcast,
        approximated = report.approximated,
        lacking_applied = report.lacking_applied,
        "the snapshot was brought to the app's new models"
    );
    Ok(Some(report))
}

pub(crate) fn start_from_snapshot(
    dir: &Path,
    dest: &Path,
    applied: Lsn,
    base: Lsn,
    journal_last: Lsn,
) -> Result<bool, EngineError> {
    if base.0 == 0 || applied >= base {
        return Ok(false);
    }
    let snapshot = dir.join(SNAPSHOT_FILE);
    if !snapshot.exists() {
        return Err(EngineError::SnapshotMissing {
            path: snapshot,
            base: base.0,
        });
    }
    let copy = dest.with_extension(FROM_SNAPSHOT);
    unpack(&snapshot, &copy)?;
    // What the snapshot applied past the base is replayed again from the log.
    Projections::replay_from(&copy, base)?;
    Projections::install_snapshot(&copy, dest, journal_last)?;
    tracing::info!(base = base.0, dest = %dest.display(), "projection started from the snapshot");
    Ok(true)
}
