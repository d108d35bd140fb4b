//! The location watcher: the library follows the disk without anyone running `index`.
//!
//! Each of this device's locations is watched with `notify` (inotify, FSEvents,
//! ReadDirectoryChangesW). Events are gathered into bursts (until the disk has been quiet for
//! [`WatchOptions::debounce`]), then each burst is applied in two steps:
//! 1. renames the platform reports with both paths move their entries (and everything under a
//!    folder) to the new path, keeping uuids and entry-scoped metadata, so a file moved *and*
//!    edited keeps its note;
//! 2. the folders that hold the touched paths are re-indexed ([`Library::index_scopes`]): new
//!    files get entries, modified ones are hashed again (the entry kept), deleted ones become
//!    tombstones.
//!
//! A full rescan at start finds what changed while nothing watched. A location that cannot be
//! watched (the platform's watch limit) is rescanned every [`WatchOptions::poll_every`]
//! instead, and said so; so is everything after the event queue overflows.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use keel_schema::{Entry, EntryUpdate, Location};
use notify::event::{ModifyKind, RenameMode};
use notify::EventKind;

use crate::error::EngineError;
use crate::events::Event;
use crate::library::Library;
use crate::ops::{join_relative, split_relative};

/// Events held between the platform and the watcher at most; past it, the burst ends with a
/// full rescan instead (nothing is lost, only found the slow way).
pub const WATCH_QUEUE_MAX: usize = 65_536;

/// How the watcher works.
#[derive(Debug, Clone)]
pub struct WatchOptions {
    /// Quiet time that ends a burst (a file being written is hashed once, after it).
    pub debounce: Duration,
    /// Longest burst: a disk that never goes quiet is still followed.
    pub burst_max: Duration,
    /// How often a location that cannot be watched is rescanned.
    pub poll_every: Duration,
    /// Whether to rescan every location when the watcher starts (what changed while it did not
    /// run).
    pub rescan_at_start: bool,
}

impl Default for WatchOptions {
    fn default() -> Self {
        Self {
            debounce: Duration::from_millis(200),
            burst_max: Duration::from_secs(2),
            poll_every: Duration::from_secs(60),
            rescan_at_start: true,
        }
    }
}

/// The platform's watcher: on Linux Keel's own inotify backend, which leaves out opens and
/// reads (see [`crate::inotify`]); elsewhere `notify`'s recommended one.
#[cfg(target_os = "linux")]
type PlatformWatcher = crate::inotify::InotifyWatcher;
#[cfg(not(target_os = "linux"))]
struct PlatformWatcher(notify::RecommendedWatcher);

#[cfg(not(target_os = "linux"))]
impl PlatformWatcher {
    fn new(handler: Handler) -> notify::Result<Self> {
        notify::recommended_watcher(handler).map(Self)
    }

    fn watch(&mut self, root: &Path) -> notify::Result<()> {
        use notify::Watcher as _;
        self.0.watch(root, notify::RecursiveMode::Recursive)
    }
}

/// How often the watcher looks for locations added meanwhile.
const LOCATIONS_EVERY: Duration = Duration::from_secs(1);

/// Passes platform events to the watcher, at most [`WATCH_QUEUE_MAX`] waiting.
struct Handler {
    events: crossbeam_channel::Sender<notify::Event>,
    overflowed: Arc<AtomicBool>,
    /// Set when the platform's watch limit refused a folder made after the start (one that
    /// `notify` tried to add to a recursive watch).
    limit_hit: Arc<AtomicBool>,
}

impl notify::EventHandler for Handler {
    fn handle_event(&mut self, event: notify::Result<notify::Event>) {
        match event {
            // Opening or reading a file changes nothing, and the indexer's own reads would
            // otherwise fill the queue (a burst of 100k files read is 100k events: an overflow
            // and a full rescan).
            Ok(event) if matches!(event.kind, EventKind::Access(_)) => {}
            Ok(event) => {
                if self.events.try_send(event).is_err() {
                    self.overflowed.store(true, Ordering::Relaxed);
                }
            }
            Err(error) => {
                tracing::warn!(%error, "the platform's watcher reported an error; rescanning");
                if matches!(error.kind, notify::ErrorKind::MaxFilesWatch) {
                    self.limit_hit.store(true, Ordering::Relaxed);
                }
                self.overflowed.store(true, Ordering::Relaxed);
            }
        }
    }
}

/// The watcher's state between bursts.
struct Watching {
    watcher: PlatformWatcher,
    /// This device's locations, watched or polled.
    locations: Vec<Location>,
    /// Locations that could not be watched, rescanned every `poll_every`.
    polled: Vec<Location>,
    last_poll: Instant,
    last_locations: Instant,
}

impl Library {
    /// Watches this device's locations until `stop` receives a message or its sender is
    /// dropped, keeping the library current (see the module docs). Blocks the calling thread;
    /// each burst applied is announced as [`Event::JobFinished`] with job `watcher`, and so is
    /// an error that stops it (a location that cannot be read, the journal failing).
    pub fn watch(&self, options: &WatchOptions, stop: &Receiver<()>) -> Result<(), EngineError> {
        let watched = self.watch_until(options, stop);
        if let Err(error) = &watched {
            self.publish(Event::JobFinished {
                job: "watcher",
                summary: format!("the watcher stopped: {error}"),
            });
        }
        watched
    }

    fn watch_until(&self, options: &WatchOptions, stop: &Receiver<()>) -> Result<(), EngineError> {
        let (events_tx, events) = crossbeam_channel::bounded(WATCH_QUEUE_MAX);
        let overflowed = Arc::new(AtomicBool::new(false));
        let limit_hit = Arc::new(AtomicBool::new(false));
        let handler = Handler {
            events: events_tx,
            overflowed: overflowed.clone(),
            limit_hit: limit_hit.clone(),
        };
        let watcher = PlatformWatcher::new(handler).map_err(watch_error)?;
        let mut state = Watching {
            watcher,
            locations: Vec::new(),
            polled: Vec::new(),
            last_poll: Instant::now(),
            last_locations: Instant::now(),
        };
        let settle = options.debounce;
        let fresh = self.watch_new_locations(&mut state)?;
        // Files still being written, looked at again once they stop changing.
        let mut deferred: Vec<PathBuf> = Vec::new();
        if options.rescan_at_start {
            deferred = self.rescan(&fresh, "changes made while nothing watched", settle)?;
        }
        loop {
            let wait = if deferred.is_empty() {
                LOCATIONS_EVERY
            } else {
                options.debounce
            };
            let first = crossbeam_channel::select! {
                recv(stop) -> _ => return Ok(()),
                recv(events) -> event => event.ok(),
                default(wait) => None,
            };
            if limit_hit.swap(false, Ordering::Relaxed) {
                // Some folder made since the start is not watched: every location is rescanned
                // periodically from now on (which one holds it, the platform does not say).
                self.poll_all(&mut state, "the watch limit was reached by a new folder");
            }
            if first.is_some() || !deferred.is_empty() || overflowed.load(Ordering::Relaxed) {
                let gathering = Instant::now();
                let burst = first.map_or_else(Vec::new, |first| gather(first, &events, options));
                let overflow = overflowed.swap(false, Ordering::Relaxed);
                let again = std::mem::take(&mut deferred);
                let (events, gathered) = (burst.len(), gathering.elapsed());
                deferred = self.apply_burst(&state.locations, burst, again, overflow, settle)?;
                tracing::debug!(
                    events,
                    gather_ms = gathered.as_millis() as u64,
                    apply_ms = (gathering.elapsed() - gathered).as_millis() as u64,
                    "burst applied"
                );
            }
            if state.last_locations.elapsed() >= LOCATIONS_EVERY {
                let added = self.watch_new_locations(&mut state)?;
                let writing = self.rescan(&added, "a location added while watching", settle)?;
                deferred.extend(writing);
            }
            if !state.polled.is_empty() && state.last_poll.elapsed() >= options.poll_every {
                state.last_poll = Instant::now();
                let why = "a location the platform cannot watch";
                deferred.extend(self.rescan(&state.polled, why, settle)?);
            }
        }
    }

    /// Starts watching this device's locations not watched yet; returns them. One the platform
    /// refuses (its watch limit) is polled instead, and said so.
    fn watch_new_locations(&self, state: &mut Watching) -> Result<Vec<Location>, EngineError> {
        state.last_locations = Instant::now();
        let device = self.device_id().record_uuid();
        let mut added = Vec::new();
        for location in self.read(|p| p.query().locations())? {
            let known = state.locations.iter().any(|l| l.uuid == location.uuid);
            if location.device != device || known {
                continue;
            }
            let path = PathBuf::from(&location.path);
            if let Err(error) = state.watcher.watch(&path) {
                tracing::warn!(location = %location.path, %error, "cannot watch a location");
                self.say_polled(&location, &error.to_string(), limit_hint(&error));
                state.polled.push(location.clone());
            }
            state.locations.push(location.clone());
            added.push(location);
        }
        // Longest root first, so a path is matched to the innermost location.
        state
            .locations
            .sort_by_key(|l| std::cmp::Reverse(l.path.len()));
        Ok(added)
    }

    /// Says that `location` is rescanned every `poll_every` because `why`.
    fn say_polled(&self, location: &Location, why: &str, hint: &str) {
        let summary = format!(
            "cannot watch {} ({why}); it is rescanned periodically instead{hint}",
            location.path
        );
        self.publish(Event::JobFinished {
            job: "watcher",
            summary,
        });
    }

    /// Rescans every watched location periodically from now on, and says so.
    fn poll_all(&self, state: &mut Watching, why: &str) {
        for location in &state.locations {
            if !state.polled.iter().any(|l| l.uuid == location.uuid) {
                self.say_polled(location, why, LIMIT_HINT);
                state.polled.push(location.clone());
            }
        }
    }

    /// Re-indexes `locations` whole. A location whose folder is missing is left as it is (and
    /// said so); the others go on. Returns the files still being written.
    fn rescan(
        &self,
        locations: &[Location],
        why: &str,
        settle: Duration,
    ) -> Result<Vec<PathBuf>, EngineError> {
        let mut writing = Vec::new();
        for location in locations {
            let report = match self.index_scopes(location, vec![String::new()], settle) {
                Ok(report) => report,
                Err(missing @ EngineError::LocationMissing(_)) => {
                    tracing::warn!(location = %location.path, "a location's folder is missing");
                    self.publish(Event::JobFinished {
                        job: "watcher",
                        summary: missing.to_string(),
                    });
                    continue;
                }
                Err(e) => return Err(e),
            };
            self.publish(Event::JobFinished {
                job: "watcher",
                summary: format!(
                    "rescanned {} ({why}): {} new, {} changed, {} moved, {} removed",
                    location.path, report.new, report.changed, report.moved, report.removed
                ),
            });
            writing.extend(report.settling);
            writing.extend(report.held);
        }
        Ok(writing)
    }

    /// Applies one burst (and the paths `again` left from the last one): renames first, then
    /// the folders that hold what was touched. Returns the files still being written.
    fn apply_burst(
        &self,
        locations: &[Location],
        burst: Vec<notify::Event>,
        again: Vec<PathBuf>,
        overflow: bool,
        settle: Duration,
    ) -> Result<Vec<PathBuf>, EngineError> {
        if overflow {
            return self.rescan(locations, "more events than the watcher holds", settle);
        }
        let mut touched: Vec<PathBuf> = again;
        let mut moved = 0u64;
        for event in burst {
            match event.kind {
                EventKind::Modify(ModifyKind::Name(RenameMode::Both)) if event.paths.len() == 2 => {
                    let (from, to) = (&event.paths[0], &event.paths[1]);
                    moved += self.move_path(locations, from, to)?;
                    touched.extend(event.paths);
                }
                _ => touched.extend(event.paths),
            }
        }
        if moved > 0 {
            // The re-index reads the entries where the renames put them.
            self.flush()?;
        }
        let mut report = crate::indexer::IndexReport::default();
        for location in locations {
            let scopes = scopes_of(location, &touched);
            if scopes.is_empty() {
                continue;
            }
            let r = match self.index_scopes(location, scopes, settle) {
                Err(EngineError::LocationMissing(_)) => continue,
                other => other?,
            };
            report.settling.extend(r.settling);
            report.held.extend(r.held);
            report.new += r.new;
            report.changed += r.changed;
            report.moved += r.moved;
            report.removed += r.removed;
        }
        self.publish(Event::JobFinished {
            job: "watcher",
            summary: format!(
                "{} renamed, {} new, {} changed, {} moved, {} removed, {} still being written",
                moved,
                report.new,
                report.changed,
                report.moved,
                report.removed,
                report.settling.len()
            ),
        });
        report.settling.extend(report.held);
        Ok(report.settling)
    }

    /// Moves the entry at `from` (and, for a folder, every entry under it) to `to`, both in one
    /// location; returns the entries moved. Nothing when either path is outside the locations,
    /// when `from` has no entry, or when `to` has one already (a rename over a file: the
    /// re-index decides).
    fn move_path(
        &self,
        locations: &[Location],
        from: &Path,
        to: &Path,
    ) -> Result<u64, EngineError> {
        let (Some((location, from)), Some((to_location, to))) =
            (locate(locations, from), locate(locations, to))
        else {
            return Ok(0);
        };
        if location.uuid != to_location.uuid || from.is_empty() || to.is_empty() {
            return Ok(0);
        }
        let at = |rel: &str| {
            let (relative_path, name) = split_relative(Path::new(rel));
            self.read(|p| p.query().entry_at(location.uuid, &relative_path, &name))
        };
        let (Some(entry), None) = (at(&from)?, at(&to)?) else {
            return Ok(0);
        };
        let Some(uuid) = entry.uuid else {
            return Ok(0);
        };
        let under = self.read(|p| {
            p.query().select::<Entry, _>(
                "location = ?1 AND (relative_path = ?2 OR substr(relative_path, 1, length(?2) + 1) = ?2 || '/')",
                (location.uuid.as_bytes().as_slice(), from.as_str()),
            )
        })?;
        let (relative_path, name) = split_relative(Path::new(&to));
        let count = 1 + under.len() as u64;
        self.transact(|tx| {
            tx.set(
                EntryUpdate::new(uuid)
                    .relative_path(relative_path)
                    .name(name),
            )?;
            for child in under {
                let Some(child_uuid) = child.uuid else {
                    continue;
                };
                let rest = child.relative_path.get(from.len()..).unwrap_or_default();
                tx.set(EntryUpdate::new(child_uuid).relative_path(format!("{to}{rest}")))?;
            }
            Ok(())
        })?;
        Ok(count)
    }
}

/// The rest of a burst that began with `first`: events until the disk is quiet for the
/// debounce time, or the burst is as long as it may be.
fn gather(
    first: notify::Event,
    events: &Receiver<notify::Event>,
    options: &WatchOptions,
) -> Vec<notify::Event> {
    let started = Instant::now();
    let mut burst = vec![first];
    while started.elapsed() < options.burst_max {
        match events.recv_timeout(options.debounce) {
            Ok(event) => burst.push(event),
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
        }
    }
    burst
}

/// The location holding `path` (the innermost: `locations` are longest root first) and the
/// path relative to its root, `/`-separated.
fn locate<'a>(locations: &'a [Location], path: &Path) -> Option<(&'a Location, String)> {
    locations.iter().find_map(|location| {
        let rel = path.strip_prefix(&location.path).ok()?;
        let (relative_path, name) = split_relative(rel);
        Some((location, join_relative(&relative_path, &name)))
    })
}

/// The folders of `location` to re-index for the paths `touched`: for each path in it, the
/// nearest folder above it that still exists; none nested in another.
fn scopes_of(location: &Location, touched: &[PathBuf]) -> Vec<String> {
    let root = Path::new(&location.path);
    let mut scopes = BTreeSet::new();
    for path in touched {
        let parent_dir = path
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir));
        if parent_dir || path.strip_prefix(root).is_err() {
            continue;
        }
        let mut dir = path.parent();
        while let Some(d) = dir {
            if d.strip_prefix(root).is_err() {
                break;
            }
            if d.is_dir() {
                let (relative_path, name) = split_relative(d.strip_prefix(root).unwrap_or(d));
                scopes.insert(join_relative(&relative_path, &name));
                break;
            }
            dir = d.parent();
        }
    }
    // Sorted, a folder comes right before what is under it: keep each that is under no kept one.
    let mut kept: Vec<String> = Vec::new();
    for scope in scopes {
        let nested = kept.iter().any(|k| {
            k.is_empty()
                || scope
                    .strip_prefix(k.as_str())
                    .is_some_and(|rest| rest.starts_with('/'))
        });
        if !nested {
            kept.push(scope);
        }
    }
    kept
}

/// What to do about the platform's watch limit.
const LIMIT_HINT: &str =
    " (on Linux, raise fs.inotify.max_user_watches to watch it: sysctl fs.inotify.max_user_watches=N)";

/// [`LIMIT_HINT`] if `error` is the platform's watch limit, else nothing.
fn limit_hint(error: &notify::Error) -> &'static str {
    if matches!(error.kind, notify::ErrorKind::MaxFilesWatch) {
        LIMIT_HINT
    } else {
        ""
    }
}

fn watch_error(error: notify::Error) -> EngineError {
    EngineError::Watch(error.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn touched_paths_become_the_outermost_existing_folders() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        std::fs::create_dir_all(root.join("a/b")).expect("dirs");
        std::fs::create_dir_all(root.join("c")).expect("dirs");
        let location = Location {
            uuid: uuid::Uuid::nil(),
            device: uuid::Uuid::nil(),
            path: root.to_string_lossy().into_owned(),
            name: "root".into(),
            created_ms: 0,
        };
        let touched = vec![
            root.join("a/b/new.txt"),
            root.join("a/b"),
            root.join("c/gone/deeper/file"),
            root.join("../outside"),
        ];
        assert_eq!(scopes_of(&location, &touched), vec!["a", "c"]);
        let top = vec![root.join("top.txt"), root.join("a/b/x")];
        assert_eq!(scopes_of(&location, &top), vec![String::new()]);
    }
}
