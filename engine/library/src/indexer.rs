//! The indexer: walks a folder as a Location and brings its entries up to date.
//!
//! A file becomes sync-ready only once its content is identified (hashed): its Entry and its
//! ContentIdentity are written together. Re-indexing keeps Entry uuids across changes and moves:
//! - **new**: a path not seen before (and not a move) gets a new Entry;
//! - **changed**: same path, new size or time: the Entry is kept (with its entry-scoped metadata)
//!   and linked to the re-identified content;
//! - **moved**: a path that disappeared and a new path with the same content: the Entry moves;
//! - **removed**: a path gone: the Entry and its entry-scoped metadata become tombstones.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, UNIX_EPOCH};

use crossbeam_channel::bounded;
use keel_schema::{
    content_uuid, ContentIdentity, Entry, EntryKind, Location, UserMetadata, UserMetadataTag, Value,
};
use uuid::Uuid;

use crate::error::{io_at, EngineError};
use crate::events::Event;
use crate::jobs::{JobKind, JobRun, JOB_SAVE_EVERY};
use crate::library::{now_ms, Library};

/// Most paths an index run lists as still being written (the rest are found by a later run).
pub const SETTLING_LISTED_MAX: usize = 4096;

/// Changes committed per transaction while indexing.
pub(crate) const INDEX_COMMIT_BATCH: usize = 4096;
/// Hashing threads.
const HASH_THREADS: usize = 2;
/// Most hashed files waiting for the walk to end (each holds its path and entry). Tiny in unit
/// tests, so that small trees go through the path where the hashers are full.
const HASHED_AHEAD_MAX: usize = if cfg!(test) { 2 } else { 16_384 };
/// Most files queued for the hashers.
const HASH_QUEUE_MAX: usize = if cfg!(test) { 2 } else { 4096 };

/// A file to hash, with its entry if it had one (boxed: jobs are moved through two channels,
/// and most have none).
type HashJob = (Item, Option<Box<Entry>>);
/// A hashed file: the job and `(hex hash, bytes)` or why it could not be read.
type Hashed = (Item, Option<Box<Entry>>, std::io::Result<(String, u64)>);

/// Most time between two progress reports of an indexing run (none in unit tests, so that
/// every step reports).
const PROGRESS_EVERY: Duration = if cfg!(test) {
    Duration::ZERO
} else {
    Duration::from_millis(100)
};

/// Progress of an indexing run.
#[derive(Debug, Clone, Copy, Default)]
pub struct IndexProgress {
    /// Files processed.
    pub done: u64,
    /// Files in all; while `walking`, the files found so far (the total grows).
    pub total: u64,
    /// Bytes hashed so far.
    pub bytes: u64,
    /// Whether the walk of the folder is still going on (so `total` is not final yet).
    pub walking: bool,
}

/// What an indexing run found.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct IndexReport {
    /// The location.
    pub location: Uuid,
    /// Files seen.
    pub files: u64,
    /// Directories seen.
    pub dirs: u64,
    /// New entries.
    pub new: u64,
    /// Entries whose content changed.
    pub changed: u64,
    /// Entries that moved.
    pub moved: u64,
    /// Entries removed.
    pub removed: u64,
    /// Entries unchanged.
    pub unchanged: u64,
    /// Paths that could not be read (skipped, with a warning).
    pub unreadable: u64,
    /// Bytes hashed.
    pub bytes_hashed: u64,
    /// Files left for a later run because they were still being written (modified within
    /// the settle time the watcher gives), at most [`SETTLING_LISTED_MAX`] listed.
    pub settling: Vec<PathBuf>,
    /// Files not found where they were, kept (not removed) because files were still being
    /// written: one of those may be one of these, moved and then edited. A later run over
    /// their folders decides.
    pub held: Vec<PathBuf>,
    /// Wall time.
    pub elapsed: Duration,
}

struct Item {
    path: PathBuf,
    relative_path: String,
    name: String,
    kind: EntryKind,
    size: i64,
    created_ms: i64,
    modified_ms: i64,
    /// Its inode and the device it is on, where the platform gives them.
    inode: Option<(i64, i64)>,
}

/// The inode of `meta` and the device it is on (unix), as stored in an entry.
#[cfg(unix)]
fn inode_of(meta: &std::fs::Metadata) -> Option<(i64, i64)> {
    use std::os::unix::fs::MetadataExt;
    Some((meta.ino() as i64, meta.dev() as i64))
}

/// Other platforms give no inode: moves are matched by content, then by name and size.
#[cfg(not(unix))]
fn inode_of(_meta: &std::fs::Metadata) -> Option<(i64, i64)> {
    None
}

impl Item {
    /// The item for what the walk found.
    fn found(found: crate::walk::Found) -> Self {
        let kind = if found.file_type.is_dir() {
            EntryKind::Directory
        } else if found.file_type.is_symlink() {
            EntryKind::Symlink
        } else {
            EntryKind::File
        };
        let meta = &found.metadata;
        Item {
            size: if kind == EntryKind::File {
                meta.len() as i64
            } else {
                0
            },
            created_ms: millis(meta.created()),
            modified_ms: millis(meta.modified()),
            inode: inode_of(meta),
            path: found.path,
            relative_path: found.relative_path,
            name: found.name,
            kind,
        }
    }

    /// A new Entry for this item (a fresh uuid), with `content` once identified.
    fn into_entry(self, location: Uuid, content: Option<Uuid>) -> Entry {
        Entry {
            uuid: Some(Uuid::now_v7()),
            location,
            relative_path: self.relative_path,
            name: self.name,
            kind: self.kind.code(),
            size: self.size,
            created_ms: self.created_ms,
            modified_ms: self.modified_ms,
            content,
            metadata: None,
            inode: self.inode.map(|(inode, _)| inode),
            volume: self.inode.map(|(_, volume)| volume),
        }
    }

    /// The fields that say where its bytes are: its inode and device.
    fn inode_fields(&self) -> [(&'static str, Value); 2] {
        let int = |v: Option<i64>| v.map_or(Value::Null, Value::Int);
        [
            ("inode", int(self.inode.map(|(inode, _)| inode))),
            ("volume", int(self.inode.map(|(_, volume)| volume))),
        ]
    }

    /// Whether `entry` records another inode than this item's.
    fn inode_differs(&self, entry: &Entry) -> bool {
        self.inode.map(|(i, _)| i) != entry.inode || self.inode.map(|(_, v)| v) != entry.volume
    }
}

enum Planned {
    Upsert(Box<Entry>),
    Content(Box<ContentIdentity>),
    Update(Uuid, Vec<(&'static str, Value)>),
    DeleteEntry(Uuid),
    DeleteMetadata(Uuid),
    DeleteTag(Uuid),
}

fn millis(time: std::io::Result<std::time::SystemTime>) -> i64 {
    time.ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A coarse kind and MIME type from the file extension.
pub(crate) fn kind_of(name: &str) -> (&'static str, Option<&'static str>) {
    // Lower-cased in a small buffer: no extension we know is longer than 4 bytes.
    let mut lower = [0u8; 4];
    let ext = name.rsplit_once('.').and_then(|(_, e)| {
        let slot = lower.get_mut(..e.len())?;
        slot.copy_from_slice(e.as_bytes());
        slot.make_ascii_lowercase();
        std::str::from_utf8(slot).ok()
    });
    match ext {
        Some("txt" | "md" | "rs" | "toml" | "json" | "csv" | "log") => ("text", Some("text/plain")),
        Some("jpg" | "jpeg") => ("image", Some("image/jpeg")),
        Some("png") => ("image", Some("image/png")),
        Some("gif") => ("image", Some("image/gif")),
        Some("mp4" | "mov" | "mkv") => ("video", Some("video/mp4")),
        Some("mp3" | "flac" | "wav") => ("audio", Some("audio/mpeg")),
        Some("pdf") => ("document", Some("application/pdf")),
        Some("zip" | "tar" | "gz") => ("archive", Some("application/zip")),
        _ => ("other", None),
    }
}

/// Sorts one walked item against what the location held (`existing`, keyed by path; the item's
/// entry is taken out of it). Unchanged items are counted; new directories and symlinks are
/// planned; files that need hashing are returned as a job.
fn classify(
    item: Item,
    existing: &mut HashMap<(String, String), Entry>,
    report: &mut IndexReport,
    planned: &mut Vec<Planned>,
    (location, rehash): (Uuid, bool),
) -> Option<HashJob> {
    // A first index has nothing to look up (and need not build the key).
    let previous = if existing.is_empty() {
        None
    } else {
        existing.remove(&(item.relative_path.clone(), item.name.clone()))
    };
    match item.kind {
        EntryKind::File => {
            report.files += 1;
            match previous {
                Some(prev)
                    if !rehash
                        && prev.kind == EntryKind::File.code()
                        && prev.size == item.size
                        && prev.modified_ms == item.modified_ms
                        && prev.content.is_some() =>
                {
                    report.unchanged += 1;
                    if item.inode_differs(&prev) {
                        // Indexed before entries kept inodes, or replaced in place.
                        let uuid = prev.uuid.unwrap_or_default();
                        planned.push(Planned::Update(uuid, item.inode_fields().to_vec()));
                    }
                    None
                }
                Some(prev) if prev.kind == EntryKind::File.code() => {
                    Some((item, Some(Box::new(prev))))
                }
                Some(prev) => {
                    // A directory became a file: the old entry goes, a new one comes.
                    existing.insert(
                        (prev.relative_path.clone(), format!("\0{}", prev.name)),
                        prev,
                    );
                    Some((item, None))
                }
                None => Some((item, None)),
            }
        }
        EntryKind::Directory | EntryKind::Symlink => {
            if item.kind == EntryKind::Directory {
                report.dirs += 1;
            }
            match previous {
                Some(prev) if prev.kind == item.kind.code() => report.unchanged += 1,
                other => {
                    if let Some(prev) = other {
                        existing.insert(
                            (prev.relative_path.clone(), format!("\0{}", prev.name)),
                            prev,
                        );
                    }
                    report.new += 1;
                    planned.push(Planned::Upsert(Box::new(item.into_entry(location, None))));
                }
            }
            None
        }
    }
}

/// What taking hashed files builds: the report, the planned changes and their commits.
struct Results<'a> {
    library: &'a Library,
    location: Uuid,
    report: IndexReport,
    planned: Vec<Planned>,
    contents: NewContents,
    /// Contents seen in this run.
    known_content: HashSet<Uuid>,
    /// Files of the location that the walk did not find: a new file with one of their inodes,
    /// or contents, is a move.
    gone: Gone,
    /// The last commit, not yet durable.
    in_flight: Option<crate::library::PendingTransaction<'a>>,
    /// The first error; once set, the remaining files are only counted.
    result: Result<(), EngineError>,
    /// Files processed.
    done: u64,
    /// The job this run is, whose checkpoints are the committed batches.
    job: Option<&'a JobRun<'a>>,
    /// Files modified after this (ms since the Unix epoch) are still being written: left for a
    /// later run.
    settle_after_ms: Option<i64>,
    /// Whether files whose size and time match are hashed again (a re-identify).
    rehash: bool,
    /// A re-identify job's place (see [`RehashPlace`]); `None` for other runs.
    place: Option<RehashPlace>,
}

/// Where a re-identify job stands, so that one interrupted goes on from there: the files sent
/// to be hashed and not yet taken back, in walk order, and the point an interrupted run left.
/// Walk order is the order of the path's components (each folder's names sorted), so it is
/// the same for every run over the same folders.
struct RehashPlace {
    /// Files before this one were re-identified by the run interrupted (they are indexed as
    /// usual, by size and time); `None`: from the start.
    from: Option<Vec<String>>,
    /// Files being hashed, by walk order.
    outstanding: BTreeSet<Vec<String>>,
    /// When the place was last saved.
    saved: Instant,
    /// Files taken back from the hashers.
    taken: u64,
}

/// A re-identify job's place is saved at least every this many files (and every
/// [`JOB_SAVE_EVERY`]): each save commits what is planned and waits for it.
const REHASH_SAVE_FILES: u64 = 2_048;

impl RehashPlace {
    /// The walk-order key of a file.
    fn key(relative_path: &str, name: &str) -> Vec<String> {
        let mut key: Vec<String> = relative_path
            .split('/')
            .filter(|c| !c.is_empty())
            .map(str::to_string)
            .collect();
        key.push(name.to_string());
        key
    }

    /// The checkpoint an interrupted run goes on from: `"relative_path\nname"` of the first
    /// file not yet re-identified.
    fn parse(checkpoint: &str) -> Option<Vec<String>> {
        let (relative_path, name) = checkpoint.split_once('\n')?;
        Some(Self::key(relative_path, name))
    }

    /// Whether the file at `key` is hashed again in this run.
    fn rehashes(&self, key: &[String]) -> bool {
        self.from.as_deref().is_none_or(|from| key >= from)
    }

    /// The checkpoint now: the first file still being hashed (everything taken back before it
    /// is committed by the caller first), or the end of the walk when none is.
    fn checkpoint(&self) -> String {
        match self.outstanding.first() {
            Some(key) => {
                let (name, path) = key
                    .split_last()
                    .map_or(("", &[][..]), |(n, p)| (n.as_str(), p));
                format!("{}\n{name}", path.join("/"))
            }
            None => "\u{10ffff}\n".to_string(),
        }
    }
}

/// How an index run treats files: see [`Library::reidentify`] and [`Library::index_scopes`].
#[derive(Clone, Copy, Default)]
pub(crate) struct RunMode {
    /// Files modified within this are left for a later run (the watcher's bursts).
    pub(crate) settle: Option<Duration>,
    /// Hash every file again, even those whose size and time match.
    pub(crate) rehash: bool,
}

impl Results<'_> {
    /// Whether `item` is a file still being written: then it is left as it is (its entry, if it
    /// has one, is neither changed nor removed) and listed for a later run.
    fn still_written(
        &mut self,
        item: &Item,
        existing: &mut HashMap<(String, String), Entry>,
    ) -> bool {
        let writing = self
            .settle_after_ms
            .is_some_and(|cutoff| item.kind == EntryKind::File && item.modified_ms > cutoff);
        if writing {
            existing.remove(&(item.relative_path.clone(), item.name.clone()));
            if self.report.settling.len() < SETTLING_LISTED_MAX {
                self.report.settling.push(item.path.clone());
            }
        }
        writing
    }

    /// Plans the change of one hashed file (new, changed or moved), and commits when a batch
    /// is full.
    fn take(&mut self, hashed: Hashed) {
        let key = self
            .place
            .as_ref()
            .map(|_| RehashPlace::key(&hashed.0.relative_path, &hashed.0.name));
        self.take_file(hashed);
        if let (Some(place), Some(key)) = (self.place.as_mut(), key) {
            place.outstanding.remove(&key);
        }
        let due = self.place.as_mut().is_some_and(|p| {
            p.taken += 1;
            p.taken % REHASH_SAVE_FILES == 0 || p.saved.elapsed() >= JOB_SAVE_EVERY
        });
        if self.result.is_ok() && due {
            // A point where the job may stop (pause, cancel, shutdown): nothing is pending.
            let saved = self
                .save_place()
                .and_then(|()| self.job.map_or(Ok(()), JobRun::checkpoint));
            if let Err(e) = saved {
                self.result = Err(e);
            }
        }
    }

    /// Commits what is planned, waits until it is durable, and saves the re-identify job's
    /// place: every file before it is re-identified and committed.
    fn save_place(&mut self) -> Result<(), EngineError> {
        self.library
            .commit_planned(&mut self.contents, &mut self.planned, &mut self.in_flight)?;
        if let Some(last) = self.in_flight.take() {
            last.wait()?;
        }
        let (Some(place), Some(job)) = (self.place.as_mut(), self.job) else {
            return Ok(());
        };
        place.saved = Instant::now();
        job.save_checkpoint(place.checkpoint(), (self.done, self.report.files))
    }

    fn take_file(&mut self, (item, prev, hashed): Hashed) {
        self.done += 1;
        if self.result.is_err() {
            return;
        }
        let (hash, n) = match hashed {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(path = %item.path.display(), error = %e, "skipping an unreadable file");
                self.report.unreadable += 1;
                // An existing entry (`prev`) is kept as it was rather than lost.
                return;
            }
        };
        self.report.bytes_hashed += n;
        let content = content_uuid(self.library.id().0, &hash);
        if self.known_content.insert(content) {
            // Whether it is new to the library is checked in one go before the commit.
            let (kind, mime) = kind_of(&item.name);
            self.contents.fresh.push(ContentIdentity {
                uuid: Some(content),
                content_hash: hash,
                mime: mime.map(str::to_string),
                kind: kind.into(),
                size: n as i64,
                entry_count: 0,
                total_size: 0,
            });
        }
        let moved_from = if prev.is_none() {
            self.gone.take_move(&item, content)
        } else {
            None
        };
        let same = prev.as_ref().is_some_and(|prev| {
            prev.content == Some(content)
                && prev.size == item.size
                && prev.modified_ms == item.modified_ms
        });
        if same {
            // Hashed again (a re-identify) and found as it was.
            self.report.unchanged += 1;
        } else if let Some(prev) = prev {
            self.report.changed += 1;
            let mut fields = vec![
                ("content", Value::Uuid(content)),
                ("size", Value::Int(item.size)),
                ("modified_ms", Value::Int(item.modified_ms)),
            ];
            fields.extend(item.inode_fields());
            self.planned
                .push(Planned::Update(prev.uuid.unwrap_or_default(), fields));
        } else if let Some(old) = moved_from {
            // Moved, and perhaps edited too: the entry keeps its uuid and metadata.
            self.report.moved += 1;
            let mut fields = vec![
                ("relative_path", Value::Text(item.relative_path.clone())),
                ("name", Value::Text(item.name.clone())),
                ("modified_ms", Value::Int(item.modified_ms)),
            ];
            if old.content != Some(content) {
                fields.push(("content", Value::Uuid(content)));
                fields.push(("size", Value::Int(item.size)));
            }
            fields.extend(item.inode_fields());
            self.planned
                .push(Planned::Update(old.uuid.unwrap_or_default(), fields));
        } else {
            self.report.new += 1;
            self.planned.push(Planned::Upsert(Box::new(
                item.into_entry(self.location, Some(content)),
            )));
        }
        if self.planned.len() + self.contents.fresh.len() >= INDEX_COMMIT_BATCH {
            let committed = self.library.commit_planned(
                &mut self.contents,
                &mut self.planned,
                &mut self.in_flight,
            );
            let checked = committed.and_then(|()| self.job.map_or(Ok(()), JobRun::checkpoint));
            if let Err(e) = checked {
                self.result = Err(e);
            }
        }
    }
}

/// Contents first seen by this index run, waiting for their commit.
struct NewContents {
    /// Whether the library may hold some of them already (then they are looked up).
    look_up: bool,
    /// The contents.
    fresh: Vec<ContentIdentity>,
}

/// Whether the entry at `relative_path`/`name` is one of the folders `scopes` or under one.
fn in_scopes(relative_path: &str, name: &str, scopes: &[String]) -> bool {
    let full = crate::ops::join_relative(relative_path, name);
    scopes.iter().any(|scope| {
        scope.is_empty()
            || full == *scope
            || full
                .strip_prefix(scope.as_str())
                .is_some_and(|rest| rest.starts_with('/'))
    })
}

fn hash_file(path: &Path) -> std::io::Result<(String, u64)> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = blake3::Hasher::new();
    let n = std::io::copy(&mut file, &mut hasher)?;
    Ok((hasher.finalize().to_hex().to_string(), n))
}

impl Library {
    /// Adds `path` as a Location (if it is not one yet) and indexes it.
    ///
    /// The first index of a library without entries loads the projections without their
    /// secondary indexes and builds them once at the end, before this returns (maintaining them
    /// row by row was a sixth of the instructions of indexing 100k small files). Queries stay
    /// correct meanwhile, only slower; if the process stops first, the next open builds them.
    pub fn index(
        &self,
        path: &Path,
        progress: &mut dyn FnMut(IndexProgress),
    ) -> Result<IndexReport, EngineError> {
        let (location, folder) = self.index_target(path)?;
        self.index_as_job(&location, folder, None, RunMode::default(), progress)
    }

    /// Re-identifies the contents under `path` (a location of this device, or a folder or file
    /// in one): every file is hashed again, even one whose size and time match its entry (a
    /// change the file system's times hide, a suspected bit rot), and an entry whose content
    /// differs points to the new one, keeping its uuid and metadata. Runs as a job like
    /// [`Library::index`]: paused and cancelled at each committed batch; one resumed after a
    /// stop hashes from the start again (what it committed stays).
    pub fn reidentify(
        &self,
        path: &Path,
        progress: &mut dyn FnMut(IndexProgress),
    ) -> Result<IndexReport, EngineError> {
        let root = path.canonicalize().map_err(io_at(path))?;
        let inside = self
            .resolve_here(&root)
            .map_err(|_| EngineError::NotInLocation(root.clone()))?;
        let folder = crate::ops::join_relative(&inside.relative_path, &inside.name);
        let mode = RunMode {
            settle: None,
            rehash: true,
        };
        self.index_as_job(&inside.location, folder, None, mode, progress)
    }

    /// Indexes (or re-identifies, as `mode` says) `folder` of `location` as a job (under `id`
    /// when it resumes an interrupted one): listed, paused and cancelled at each committed
    /// batch, resumed after a crash.
    pub(crate) fn index_as_job(
        &self,
        location: &Location,
        folder: String,
        id: Option<Uuid>,
        mode: RunMode,
        progress: &mut dyn FnMut(IndexProgress),
    ) -> Result<IndexReport, EngineError> {
        let (location_id, folder_name) = (location.uuid, folder.clone());
        let kind = if mode.rehash {
            JobKind::Identify {
                location: location_id,
                folder: folder_name,
            }
        } else {
            JobKind::Index {
                location: location_id,
                folder: folder_name,
            }
        };
        let summary = |r: &IndexReport| {
            format!(
                "{} files, {} new, {} changed, {} moved, {} removed, {} as they were; {} bytes hashed",
                r.files, r.new, r.changed, r.moved, r.removed, r.unchanged, r.bytes_hashed
            )
        };
        self.run_job(kind, id, summary, |run| {
            self.index_run(location, folder, run, mode, progress)
        })
    }

    /// The work of an index job.
    fn index_run(
        &self,
        location: &Location,
        folder: String,
        run: &JobRun<'_>,
        mode: RunMode,
        progress: &mut dyn FnMut(IndexProgress),
    ) -> Result<IndexReport, EngineError> {
        let started = Instant::now();
        let bulk = !self.read(|p| p.has_rows::<Entry>())?;
        if bulk {
            self.set_bulk_load(true)?;
        }
        let mut observed = |p: IndexProgress| {
            progress(p);
            run.progress(p.done, p.total);
        };
        let report = self.index_folders(location, vec![folder], Some(run), mode, &mut observed);
        // The indexes come back whether or not the run succeeded.
        let rebuilt = if bulk {
            self.set_bulk_load(false)
        } else {
            Ok(())
        };
        let mut report = report?;
        rebuilt?;
        observed(IndexProgress {
            done: report.files,
            total: report.files,
            bytes: report.bytes_hashed,
            walking: false,
        });
        report.elapsed = started.elapsed();
        self.publish(Event::JobFinished {
            job: "indexer",
            summary: format!(
                "{} files, {} new, {} changed, {} moved, {} removed",
                report.files, report.new, report.changed, report.moved, report.removed
            ),
        });
        Ok(report)
    }

    /// Drops (`true`) or builds (`false`) the projections' secondary indexes for an indexing run.
    /// A catch-up that is bulk loading keeps them dropped: it builds them when it ends.
    fn set_bulk_load(&self, bulk: bool) -> Result<(), EngineError> {
        // Lock order: projections, then bulk_until.
        let mut projections = self
            .shared
            .projections
            .lock()
            .map_err(|_| EngineError::Closed)?;
        let catching_up = self
            .shared
            .bulk_until
            .lock()
            .map_err(|_| EngineError::Closed)?
            .is_some();
        if bulk || !catching_up {
            projections.set_bulk_load(bulk)?;
        }
        Ok(())
    }

    /// `root` (canonical) in one of this device's locations.
    fn resolve_here(&self, root: &Path) -> Result<crate::ops::ResolvedPath, EngineError> {
        let here = self.device_id().record_uuid();
        self.files().on(here).resolve(root)
    }

    /// What `path` indexes: a folder or a file inside one of this device's locations is that
    /// part of it; any other folder is (or becomes) a location, indexed whole.
    fn index_target(&self, path: &Path) -> Result<(Location, String), EngineError> {
        let root = path.canonicalize().map_err(io_at(path))?;
        let inside = self
            .resolve_here(&root)
            .ok()
            .filter(|inside| !inside.name.is_empty());
        if !root.is_dir() && inside.is_none() {
            return Err(EngineError::Io {
                path: root,
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "not a folder, nor a file in a location of this device",
                ),
            });
        }
        Ok(match inside {
            Some(inside) => {
                let folder = crate::ops::join_relative(&inside.relative_path, &inside.name);
                (inside.location, folder)
            }
            _ => (self.location_for(&root)?, String::new()),
        })
    }

    /// [`Library::index_folders`] outside a job (the watcher's bursts), leaving the files
    /// modified within `settle` for a later run (a file still being written is hashed once,
    /// when it stops changing).
    pub(crate) fn index_scopes(
        &self,
        location: &Location,
        scopes: Vec<String>,
        settle: Duration,
    ) -> Result<IndexReport, EngineError> {
        let mode = RunMode {
            settle: Some(settle),
            rehash: false,
        };
        self.index_folders(location, scopes, None, mode, &mut |_| {})
    }

    /// Indexes the folders `scopes` of `location` (relative to its root; empty for all of it;
    /// none nested in another): entries under them are compared with the disk, the rest of the
    /// location is left as it is. A file that moved between two scopes is a move. Under a job,
    /// each committed batch is a checkpoint (pause, cancel), and the run ends with a flush.
    fn index_folders<'a>(
        &'a self,
        location: &Location,
        scopes: Vec<String>,
        job: Option<&'a JobRun<'a>>,
        mode: RunMode,
        progress: &mut dyn FnMut(IndexProgress),
    ) -> Result<IndexReport, EngineError> {
        // One run at a time (a paused job holds the others back until it resumes).
        let _one_run = self
            .shared
            .indexing
            .lock()
            .map_err(|_| EngineError::Closed)?;
        let root = PathBuf::from(&location.path);
        // A folder that is gone (an unplugged drive) would look like every file removed.
        if !root.is_dir() {
            return Err(EngineError::LocationMissing(root));
        }
        let mut existing: HashMap<(String, String), Entry> = self
            .read(|p| p.query().entries_of_location(location.uuid))?
            .into_iter()
            .filter(|e| in_scopes(&e.relative_path, &e.name, &scopes))
            .map(|e| ((e.relative_path.clone(), e.name.clone()), e))
            .collect();
        let mut results = Results {
            library: self,
            location: location.uuid,
            report: IndexReport {
                location: location.uuid,
                ..IndexReport::default()
            },
            planned: Vec::new(),
            // A library without contents (the first index) has none to look up before adding
            // them: that lookup cost about a tenth of the walking thread's time. A content that
            // a peer adds meanwhile is then upserted twice, with the same values.
            contents: NewContents {
                look_up: self.read(|p| p.has_rows::<ContentIdentity>())?,
                fresh: Vec::new(),
            },
            known_content: HashSet::new(),
            gone: Gone::default(),
            in_flight: None,
            result: Ok(()),
            done: 0,
            job,
            rehash: mode.rehash,
            place: (mode.rehash && job.is_some()).then(|| RehashPlace {
                from: job
                    .and_then(|j| j.resumed_from.as_deref())
                    .and_then(RehashPlace::parse),
                outstanding: BTreeSet::new(),
                saved: Instant::now(),
                taken: 0,
            }),
            settle_after_ms: mode.settle.map(|settle| {
                let cutoff = now_ms().saturating_sub(settle.as_millis() as u64);
                i64::try_from(cutoff).unwrap_or(i64::MAX)
            }),
        };
        let mut gone = self.walk_and_hash(&root, &scopes, &mut existing, &mut results, progress);
        let Results {
            mut report,
            mut planned,
            mut contents,
            gone: gone_files,
            mut in_flight,
            result,
            ..
        } = results;
        result?;
        if report.settling.is_empty() {
            gone.extend(gone_files.into_rest());
        } else {
            // A file still being written may be one of the files not found (moved, then
            // edited): they stay, listed for the run that takes it.
            report.held = gone_files
                .into_rest()
                .map(|e| root.join(crate::ops::join_relative(&e.relative_path, &e.name)))
                .collect();
        }
        self.plan_removals(gone, &mut report, &mut planned)?;
        self.commit_planned(&mut contents, &mut planned, &mut in_flight)?;
        if let Some(last) = in_flight.take() {
            last.wait()?;
        }
        self.flush()?;
        Ok(report)
    }

    /// The location at `root`, created (and flushed) if the library has none there.
    fn location_for(&self, root: &Path) -> Result<Location, EngineError> {
        if let Some(location) = self.files().location(root)? {
            return Ok(location);
        }
        let location = Location {
            uuid: Uuid::now_v7(),
            device: self.device_id().record_uuid(),
            path: root.to_string_lossy().into_owned(),
            name: root
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "/".into()),
            created_ms: now_ms() as i64,
        };
        self.transact(|tx| {
            tx.upsert(&location);
            Ok(())
        })?;
        self.flush()?;
        Ok(location)
    }

    /// Walks `root` and hashes what is new or changed on [`HASH_THREADS`] threads, planning each
    /// file's change in `results`. Returns the entries that disappeared and cannot be moves
    /// (the files that may be are left in `results.gone`).
    fn walk_and_hash<'a>(
        &'a self,
        root: &Path,
        scopes: &[String],
        existing: &mut HashMap<(String, String), Entry>,
        results: &mut Results<'a>,
        progress: &mut dyn FnMut(IndexProgress),
    ) -> Vec<Entry> {
        // A file can only be a move when the location had entries before the walk. Otherwise
        // (a first index) hashed files are taken while the walk goes on; else they wait for the
        // walk's end, when the removals (and so the moves) are known.
        let take_while_walking = existing.is_empty();
        let location = results.location;
        let mut gone: Vec<Entry> = Vec::new();
        std::thread::scope(|scope| {
            let (work_tx, done_rx) = spawn_hashers(scope);
            // Jobs the hashers have no room for yet. The walk never blocks on them: the hashers
            // may be waiting for this thread to take their results, which it does after the walk.
            let mut waiting: VecDeque<HashJob> = VecDeque::new();
            let mut to_hash = 0u64;
            let mut unreadable_paths = 0u64;
            // The first file found is reported at once (a bar shows from the start), then at
            // most every `PROGRESS_EVERY`.
            let mut last_report: Option<Instant> = None;
            crate::walk::walk_under(
                root,
                scopes,
                &mut |found| {
                    // Files that need no hashing count as done as soon as they are found.
                    if last_report.is_none_or(|at| at.elapsed() >= PROGRESS_EVERY) {
                        last_report = Some(Instant::now());
                        // Those seen before are done unless hashing; the path found now is
                        // not done yet, but counts in the total.
                        let seen = results.report.files;
                        let done = results.done + seen.saturating_sub(to_hash);
                        self.report_progress(
                            progress,
                            IndexProgress {
                                done,
                                total: seen + 1,
                                bytes: results.report.bytes_hashed,
                                walking: true,
                            },
                        );
                    }
                    let item = Item::found(found);
                    if results.still_written(&item, existing) {
                        return;
                    }
                    let key = results
                        .place
                        .as_ref()
                        .map(|_| RehashPlace::key(&item.relative_path, &item.name));
                    let rehash = results.rehash
                        && match (&results.place, &key) {
                            (Some(place), Some(key)) => place.rehashes(key),
                            _ => true,
                        };
                    let Some(job) = classify(
                        item,
                        existing,
                        &mut results.report,
                        &mut results.planned,
                        (location, rehash),
                    ) else {
                        return;
                    };
                    if let (Some(place), Some(key)) = (results.place.as_mut(), key) {
                        place.outstanding.insert(key);
                    }
                    to_hash += 1;
                    waiting.push_back(job);
                    while let Some(job) = waiting.pop_front() {
                        if let Err(refused) = work_tx.try_send(job) {
                            waiting.push_front(refused.into_inner());
                            break;
                        }
                    }
                    if take_while_walking {
                        while let Ok(hashed) = done_rx.try_recv() {
                            results.take(hashed);
                        }
                    }
                },
                &mut |path, error| {
                    tracing::warn!(path = %path.display(), %error, "skipping an unreadable path");
                    unreadable_paths += 1;
                },
            );
            results.report.unreadable += unreadable_paths;
            scope.spawn(move || {
                for job in waiting {
                    if work_tx.send(job).is_err() {
                        return;
                    }
                }
            });
            // What is left in `existing` disappeared; files among them may reappear as moves.
            gone = sort_gone(existing, &mut results.gone);
            results.done += results.report.files - to_hash;
            self.take_hashed(done_rx, results, progress);
        });
        gone
    }

    /// Takes the hashers' results once the walk is done (the total is known), reporting progress.
    fn take_hashed(
        &self,
        done_rx: crossbeam_channel::Receiver<Hashed>,
        results: &mut Results<'_>,
        progress: &mut dyn FnMut(IndexProgress),
    ) {
        let total = results.report.files;
        progress(IndexProgress {
            done: results.done,
            total,
            bytes: results.report.bytes_hashed,
            walking: false,
        });
        let mut last_report = Instant::now();
        for hashed in done_rx {
            results.take(hashed);
            if last_report.elapsed() >= PROGRESS_EVERY {
                last_report = Instant::now();
                self.report_progress(
                    progress,
                    IndexProgress {
                        done: results.done,
                        total,
                        bytes: results.report.bytes_hashed,
                        walking: false,
                    },
                );
            }
        }
    }

    /// Plans the removal of entries that disappeared: each entry with its entry-scoped metadata
    /// and their tags.
    fn plan_removals(
        &self,
        gone: Vec<Entry>,
        report: &mut IndexReport,
        planned: &mut Vec<Planned>,
    ) -> Result<(), EngineError> {
        for entry in gone {
            let Some(uuid) = entry.uuid else { continue };
            report.removed += 1;
            let metadata = self.read(|p| {
                p.query()
                    .select::<UserMetadata, _>("entry = ?1", [uuid.as_bytes().as_slice()])
            })?;
            for m in metadata {
                for link in self.read(|p| {
                    p.query().select::<UserMetadataTag, _>(
                        "user_metadata = ?1",
                        [m.uuid.as_bytes().as_slice()],
                    )
                })? {
                    planned.push(Planned::DeleteTag(link.uuid));
                }
                planned.push(Planned::DeleteMetadata(m.uuid));
            }
            planned.push(Planned::DeleteEntry(uuid));
        }
        Ok(())
    }

    /// Hands a progress report to the caller and to subscribers (as `Event::JobProgress`).
    fn report_progress(&self, progress: &mut dyn FnMut(IndexProgress), report: IndexProgress) {
        progress(report);
        self.publish(Event::JobProgress {
            job: "indexer",
            done: report.done,
            total: report.total,
        });
    }

    /// Commits the planned changes, preceded by the contents that the library does not have yet.
    fn commit_planned<'a>(
        &'a self,
        contents: &mut NewContents,
        planned: &mut Vec<Planned>,
        in_flight: &mut Option<crate::library::PendingTransaction<'a>>,
    ) -> Result<(), EngineError> {
        if !contents.fresh.is_empty() {
            let exists = if contents.look_up {
                let uuids: Vec<Uuid> = contents.fresh.iter().filter_map(|c| c.uuid).collect();
                self.read(|p| p.query().existing::<ContentIdentity>(&uuids))?
            } else {
                vec![false; contents.fresh.len()]
            };
            let mut fresh: Vec<Planned> = std::mem::take(&mut contents.fresh)
                .into_iter()
                .zip(exists)
                .filter(|(_, exists)| !exists)
                .map(|(c, _)| Planned::Content(Box::new(c)))
                .collect();
            fresh.append(planned);
            *planned = fresh;
        }
        if planned.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(planned);
        let pending = self.transact_pipelined(|tx| {
            for op in batch {
                match op {
                    Planned::Upsert(entry) => {
                        tx.upsert_owned(*entry);
                    }
                    Planned::Content(content) => {
                        tx.upsert_owned(*content);
                    }
                    Planned::Update(uuid, fields) => tx.update::<Entry>(uuid, fields)?,
                    Planned::DeleteEntry(uuid) => tx.delete::<Entry>(uuid),
                    Planned::DeleteMetadata(uuid) => tx.delete::<UserMetadata>(uuid),
                    Planned::DeleteTag(uuid) => tx.delete::<UserMetadataTag>(uuid),
                }
            }
            Ok(())
        })?;
        // At most one batch in flight: the previous one must be durable before this one queues
        // behind it, so an error surfaces in order.
        if let Some(previous) = in_flight.replace(pending) {
            previous.wait()?;
        }
        Ok(())
    }
}

/// Starts [`HASH_THREADS`] hashers in `scope`: jobs in, hashed files out (both bounded).
fn spawn_hashers<'scope>(
    scope: &'scope std::thread::Scope<'scope, '_>,
) -> (
    crossbeam_channel::Sender<HashJob>,
    crossbeam_channel::Receiver<Hashed>,
) {
    let (work_tx, work_rx) = bounded::<HashJob>(HASH_QUEUE_MAX);
    let (done_tx, done_rx) = bounded::<Hashed>(HASHED_AHEAD_MAX);
    for _ in 0..HASH_THREADS {
        let work_rx = work_rx.clone();
        let done_tx = done_tx.clone();
        scope.spawn(move || {
            for (item, prev) in work_rx {
                let hashed = hash_file(&item.path);
                if done_tx.send((item, prev, hashed)).is_err() {
                    return;
                }
            }
        });
    }
    (work_tx, done_rx)
}

/// Splits the entries the walk did not find: files with a content may reappear as moves (kept
/// by content), the rest are gone.
fn sort_gone(existing: &mut HashMap<(String, String), Entry>, files: &mut Gone) -> Vec<Entry> {
    let mut gone = Vec::new();
    for (_, entry) in existing.drain() {
        if entry.kind == EntryKind::File.code() && entry.content.is_some() {
            files.add(entry);
        } else {
            gone.push(entry);
        }
    }
    gone
}

/// The files of a location an index run did not find where they were, each of which a new
/// file may turn out to be (a move): matched by inode and device where the platform gives
/// them, then by content, then (without inodes) by name and size.
#[derive(Default)]
struct Gone {
    entries: HashMap<Uuid, Entry>,
    by_inode: HashMap<(i64, i64), Uuid>,
    by_content: HashMap<Uuid, Vec<Uuid>>,
    by_name_size: HashMap<(String, i64), Vec<Uuid>>,
}

impl Gone {
    fn add(&mut self, entry: Entry) {
        let uuid = entry.uuid.unwrap_or_default();
        if let (Some(inode), Some(volume)) = (entry.inode, entry.volume) {
            self.by_inode.insert((inode, volume), uuid);
        }
        if let Some(content) = entry.content {
            self.by_content.entry(content).or_default().push(uuid);
        }
        self.by_name_size
            .entry((entry.name.clone(), entry.size))
            .or_default()
            .push(uuid);
        self.entries.insert(uuid, entry);
    }

    /// The gone entry that new file `item` (of `content`) is, if any; taken out.
    fn take_move(&mut self, item: &Item, content: Uuid) -> Option<Entry> {
        if let Some(uuid) = item.inode.and_then(|key| self.by_inode.remove(&key)) {
            // An inode is reused once its file is deleted: the same one is also born at the
            // same time (a move keeps its creation time), or, where that is unknown, keeps
            // its name.
            let same_file = self.entries.get(&uuid).is_some_and(|entry| {
                if entry.created_ms != 0 && item.created_ms != 0 {
                    entry.created_ms == item.created_ms
                } else {
                    entry.name == item.name
                }
            });
            if same_file {
                return self.entries.remove(&uuid);
            }
        }
        let by_content = self.by_content.get_mut(&content);
        if let Some(entry) = by_content.and_then(|uuids| take_one(uuids, &mut self.entries)) {
            return Some(entry);
        }
        if item.inode.is_some() {
            // Its inode matched none: a same name and size is another file.
            return None;
        }
        let key = (item.name.clone(), item.size);
        let by_name = self.by_name_size.get_mut(&key);
        by_name.and_then(|uuids| take_one(uuids, &mut self.entries))
    }

    /// The entries no new file turned out to be.
    fn into_rest(self) -> impl Iterator<Item = Entry> {
        self.entries.into_values()
    }
}

/// Takes out of `entries` one of `uuids` still in it (the last added).
fn take_one(uuids: &mut Vec<Uuid>, entries: &mut HashMap<Uuid, Entry>) -> Option<Entry> {
    while let Some(uuid) = uuids.pop() {
        if let Some(entry) = entries.remove(&uuid) {
            return Some(entry);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use crate::{CreateOptions, Home, KdfParams, Library};

    fn library(dir: &std::path::Path) -> Library {
        Library::create(
            &Home::new(dir.join("home")),
            "lib",
            "pw",
            CreateOptions {
                kdf: KdfParams::INSECURE_FAST,
            },
        )
        .expect("creates")
    }

    /// `files` small files spread over `dirs` folders under `dir/tree`.
    fn small_tree(dir: &std::path::Path, files: usize, dirs: usize) -> std::path::PathBuf {
        let tree = dir.join("tree");
        for i in 0..files {
            let sub = tree.join(format!("d{}", i % dirs));
            std::fs::create_dir_all(&sub).expect("mkdir");
            std::fs::write(sub.join(format!("f{i}.txt")), format!("file {i}")).expect("write");
        }
        tree
    }

    #[test]
    fn hashing_during_the_walk_still_finds_every_new_changed_moved_and_removed_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tree = small_tree(dir.path(), 300, 7);
        let lib = library(dir.path());
        let first = lib.index(&tree, &mut |_| {}).expect("indexes");
        assert_eq!((first.files, first.dirs, first.new), (300, 7, 307));
        assert_eq!(lib.status().expect("status").counts.entries, 307);

        std::fs::rename(tree.join("d0/f0.txt"), tree.join("d1/moved.txt")).expect("rename");
        std::fs::remove_file(tree.join("d2/f2.txt")).expect("remove");
        std::fs::write(tree.join("d3/f3.txt"), b"changed, and longer").expect("write");
        let second = lib.index(&tree, &mut |_| {}).expect("re-indexes");
        assert_eq!(
            (second.changed, second.moved, second.removed, second.new),
            (1, 1, 1, 0),
            "{second:?}"
        );
        assert_eq!(second.unchanged, 297 + 7);
        assert_eq!(lib.status().expect("status").counts.entries, 306);
    }

    #[test]
    fn a_first_index_loads_without_secondary_indexes_and_builds_them_before_it_returns() {
        use crate::applier::tests::index_count;
        let dir = tempfile::tempdir().expect("tempdir");
        let tree = small_tree(dir.path(), 60, 3);
        let lib = library(dir.path());
        let all = index_count(&lib);
        assert!(all >= 6, "{all} secondary indexes");
        // A failed run gives them back too.
        assert!(lib.index(&dir.path().join("missing"), &mut |_| {}).is_err());
        assert_eq!(index_count(&lib), all);

        let mut fewest = i64::MAX;
        lib.index(&tree, &mut |p| {
            if p.walking {
                fewest = fewest.min(index_count(&lib));
            }
        })
        .expect("indexes");
        assert!(fewest < all, "the first index kept its indexes ({fewest})");
        assert_eq!(index_count(&lib), all, "built again before index returned");

        // The library has entries now: a re-index keeps its indexes all along.
        std::fs::write(tree.join("d0/new.txt"), b"new").expect("write");
        let mut fewest = i64::MAX;
        let again = lib
            .index(&tree, &mut |_| fewest = fewest.min(index_count(&lib)))
            .expect("re-indexes");
        assert_eq!((again.new, fewest), (1, all));
        let children = lib
            .read(|p| p.query().entries_of_location(again.location))
            .expect("reads");
        assert_eq!(children.len(), 64);
    }

    /// Checks a run's progress reports: the walk's first (its total growing), then the final
    /// total; never more done than known; the last one complete. Returns the walk's reports.
    fn check_progress(reports: &[super::IndexProgress], files: u64) -> Vec<super::IndexProgress> {
        let walking: Vec<_> = reports.iter().copied().filter(|p| p.walking).collect();
        let after = reports
            .iter()
            .position(|p| !p.walking)
            .expect("a final report");
        assert!(
            reports[after..]
                .iter()
                .all(|p| !p.walking && p.total == files),
            "after the walk the total is final"
        );
        assert!(reports.iter().all(|p| p.done <= p.total), "{reports:?}");
        assert!(walking.windows(2).all(|w| w[0].total <= w[1].total));
        assert!(walking.iter().all(|p| p.total <= files));
        let last = reports.last().expect("reports");
        assert_eq!((last.done, last.total), (files, files));
        walking
    }

    #[test]
    fn kinds_come_from_the_extension_in_any_case() {
        use super::kind_of;
        assert_eq!(kind_of("a.txt"), ("text", Some("text/plain")));
        assert_eq!(kind_of("Photo.JPEG"), ("image", Some("image/jpeg")));
        assert_eq!(kind_of("x.tar.Gz"), ("archive", Some("application/zip")));
        for other in [
            "README",
            "a.jpegg",
            "a.",
            ".hidden",
            "long.extension",
            "é.ÉÉ",
        ] {
            assert_eq!(kind_of(other), ("other", None), "{other}");
        }
    }

    #[test]
    fn progress_is_reported_while_the_walk_goes_on() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tree = small_tree(dir.path(), 200, 5);
        let lib = library(dir.path());
        let mut reports = Vec::new();
        lib.index(&tree, &mut |p| reports.push(p)).expect("indexes");
        let walking = check_progress(&reports, 200);
        assert!(
            walking.len() >= 100,
            "a first index reports while it walks ({} reports)",
            walking.len()
        );
        assert!(walking.iter().any(|p| p.total >= 100 && p.total < 200));

        // A second run: unchanged files count as done as soon as the walk finds them.
        let mut again = Vec::new();
        lib.index(&tree, &mut |p| again.push(p))
            .expect("indexes again");
        let walking = check_progress(&again, 200);
        assert!(walking.iter().any(|p| p.done >= 100 && p.done < 200));
    }

    #[test]
    fn a_content_is_added_once_whether_the_library_had_contents_or_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let lib = library(dir.path());
        // This device's changes but the attestations that sign them (one per commit).
        let attestation = keel_schema::code_of::<keel_schema::Attestation>();
        let changes = || {
            lib.sync_state()
                .changes()
                .expect("changes")
                .iter()
                .filter(|c| c.model != attestation)
                .count()
        };
        // First index, no contents yet (nothing looked up): three files, two contents.
        let first = dir.path().join("first");
        std::fs::create_dir_all(&first).expect("mkdir");
        for (name, text) in [("a", "x"), ("b", "y"), ("c", "x")] {
            std::fs::write(first.join(name), text).expect("write");
        }
        let before = changes();
        lib.index(&first, &mut |_| {}).expect("indexes");
        assert_eq!(changes() - before, 1 + 3 + 2, "location, entries, contents");
        // A second location with one known content and one new (looked up).
        let second = dir.path().join("second");
        std::fs::create_dir_all(&second).expect("mkdir");
        for (name, text) in [("d", "x"), ("e", "z")] {
            std::fs::write(second.join(name), text).expect("write");
        }
        let before = changes();
        lib.index(&second, &mut |_| {}).expect("indexes");
        assert_eq!(
            changes() - before,
            1 + 2 + 1,
            "location, entries, the new content"
        );
        assert_eq!(lib.status().expect("status").counts.content_identities, 3);
    }
}
