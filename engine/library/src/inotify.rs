//! The watcher's platform side on Linux: inotify, watching what changes a file and nothing that
//! only reads one (decision 0057).
//!
//! `notify`'s inotify backend always asks for `IN_OPEN`, so every open of a file in a location
//! (the indexer hashing a burst, a backup reading the library) was an event: made by the kernel,
//! read and parsed by `notify`'s thread, then dropped by the watcher. A burst of 10,000 new
//! files cost about a sixth of its CPU that way, and a process reading many files could fill
//! the kernel's queue (an overflow, so a full rescan). This backend watches creates, deletes,
//! writes, attribute changes and moves only, and hands the watcher the same `notify` events
//! (other platforms keep `notify`'s recommended watcher).
//!
//! Folders are watched one by one (inotify has no recursive watch): a watched location's
//! folders at `watch`, and each folder created or moved in later, by the reading thread. Paths
//! are kept per watch and rewritten when a watched folder moves inside the location.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask, Watches};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use notify::event::{CreateKind, DataChange, MetadataKind, ModifyKind, RemoveKind, RenameMode};
use notify::{Event, EventHandler, EventKind};

/// What a folder's watch reports: no opens, no reads, no closes without a write.
const MASK: WatchMask = WatchMask::CREATE
    .union(WatchMask::DELETE)
    .union(WatchMask::MODIFY)
    .union(WatchMask::CLOSE_WRITE)
    .union(WatchMask::ATTRIB)
    .union(WatchMask::MOVED_FROM)
    .union(WatchMask::MOVED_TO)
    .union(WatchMask::ONLYDIR);

/// What a location's own folder reports besides: being deleted or moved itself (the folders
/// under it are reported by their parents).
const ROOT_MASK: WatchMask = MASK
    .union(WatchMask::DELETE_SELF)
    .union(WatchMask::MOVE_SELF);

/// How long the reading thread waits for a move in after a move out, before it reports the
/// move out alone.
const MOVE_IN_WAIT: Duration = Duration::from_millis(100);

/// The inotify descriptor's token in the reading thread's poll.
const EVENTS: Token = Token(0);
/// The token [`InotifyWatcher`] wakes the reading thread with, to stop it.
const STOP: Token = Token(1);

/// Bytes read from the kernel at once (about 2,000 events with short names).
const READ_BUFFER: usize = 64 * 1024;

/// The watched folders by watch, shared by the thread that adds watches and the reading one.
#[derive(Default)]
struct Folders {
    paths: HashMap<WatchDescriptor, PathBuf>,
}

impl Folders {
    /// Rewrites the paths of `from` and everything under it to start at `to`.
    fn moved(&mut self, from: &Path, to: &Path) {
        for path in self.paths.values_mut() {
            if let Ok(rest) = path.strip_prefix(from) {
                *path = if rest.as_os_str().is_empty() {
                    to.to_path_buf()
                } else {
                    to.join(rest)
                };
            }
        }
    }
}

/// An inotify watcher that passes its events to a `notify` handler (see the module docs).
pub(crate) struct InotifyWatcher {
    watches: Watches,
    folders: Arc<Mutex<Folders>>,
    stop: Arc<AtomicBool>,
    waker: Waker,
    reader: Option<JoinHandle<()>>,
}

impl InotifyWatcher {
    /// Starts the reading thread, which passes every event (or error) to `handler`.
    pub(crate) fn new<H: EventHandler>(handler: H) -> notify::Result<Self> {
        let inotify = Inotify::init().map_err(notify::Error::io)?;
        let poll = Poll::new().map_err(notify::Error::io)?;
        let fd = inotify.as_raw_fd();
        poll.registry()
            .register(&mut SourceFd(&fd), EVENTS, Interest::READABLE)
            .map_err(notify::Error::io)?;
        let waker = Waker::new(poll.registry(), STOP).map_err(notify::Error::io)?;
        let watches = inotify.watches();
        let folders = Arc::new(Mutex::new(Folders::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let mut reading = Reader {
            inotify,
            watches: watches.clone(),
            folders: folders.clone(),
            handler,
            moved_from: None,
        };
        let stopping = stop.clone();
        let reader = std::thread::Builder::new()
            .name("keel-inotify".into())
            .spawn(move || reading.run(poll, &stopping))
            .map_err(notify::Error::io)?;
        Ok(Self {
            watches,
            folders,
            stop,
            waker,
            reader: Some(reader),
        })
    }

    /// Watches `root` and every folder under it. The platform's watch limit is
    /// `ErrorKind::MaxFilesWatch`, as with `notify`.
    pub(crate) fn watch(&mut self, root: &Path) -> notify::Result<()> {
        add_tree(&mut self.watches, &self.folders, root, ROOT_MASK)
    }
}

impl Drop for InotifyWatcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(reader) = self.reader.take() {
            // Without the wake-up the reader would wait for the next file event: then it is
            // left to end on its own rather than blocking this drop.
            if self.waker.wake().is_ok() {
                let _ = reader.join();
            }
        }
    }
}

/// Watches `root` and the folders under it. Folders that vanish meanwhile are skipped; the
/// watch limit, or `root` itself failing, is an error.
fn add_tree(
    watches: &mut Watches,
    folders: &Mutex<Folders>,
    root: &Path,
    root_mask: WatchMask,
) -> notify::Result<()> {
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let is_root = dir == root;
        match watches.add(&dir, if is_root { root_mask } else { MASK }) {
            Ok(wd) => {
                let mut folders = folders.lock().map_err(|_| poisoned())?;
                folders.paths.insert(wd, dir.clone());
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                return Err(notify::Error::new(notify::ErrorKind::MaxFilesWatch).add_path(dir));
            }
            Err(e) if is_root => return Err(notify::Error::io_watch(e).add_path(dir)),
            // Gone, or not a folder any more: the event that says so comes on its own.
            Err(_) => continue,
        }
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                pending.push(entry.path());
            }
        }
    }
    Ok(())
}

fn poisoned() -> notify::Error {
    notify::Error::generic("the watcher's folder list is poisoned")
}

/// The reading thread's state.
struct Reader<H> {
    inotify: Inotify,
    watches: Watches,
    folders: Arc<Mutex<Folders>>,
    handler: H,
    /// A move out of a folder, waiting for its move in (the next event when both folders are
    /// watched): its cookie, path and whether it is a folder.
    moved_from: Option<(u32, PathBuf, bool)>,
}

impl<H: EventHandler> Reader<H> {
    fn run(&mut self, mut poll: Poll, stop: &AtomicBool) {
        let mut buffer = vec![0u8; READ_BUFFER];
        let mut ready = Events::with_capacity(2);
        while !stop.load(Ordering::Relaxed) {
            // A move out waits a little for its move in; otherwise the wait has no end.
            let wait = self.moved_from.as_ref().map(|_| MOVE_IN_WAIT);
            if let Err(e) = poll.poll(&mut ready, wait) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                self.handler.handle_event(Err(notify::Error::io(e)));
                return;
            }
            if ready.is_empty() {
                // Nothing came: a move out not followed by a move in.
                self.flush_moved_from();
                continue;
            }
            // The descriptor is polled edge-triggered: read until the kernel has no more.
            if let Err(e) = self.drain(&mut buffer) {
                self.handler.handle_event(Err(notify::Error::io(e)));
                return;
            }
        }
    }

    /// Reads and takes every event the kernel holds.
    fn drain(&mut self, buffer: &mut [u8]) -> io::Result<()> {
        loop {
            let events: Vec<(WatchDescriptor, EventMask, u32, Option<PathBuf>)> =
                match self.inotify.read_events(buffer) {
                    Ok(events) => events
                        .map(|e| (e.wd, e.mask, e.cookie, e.name.map(name_path)))
                        .collect(),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                };
            for (wd, mask, cookie, name) in events {
                self.take(wd, mask, cookie, name);
            }
        }
    }

    /// Turns one kernel event into `notify` events for the handler.
    fn take(&mut self, wd: WatchDescriptor, mask: EventMask, cookie: u32, name: Option<PathBuf>) {
        if mask.contains(EventMask::Q_OVERFLOW) {
            self.flush_moved_from();
            let overflow = notify::Error::generic("the kernel's event queue overflowed");
            self.handler.handle_event(Err(overflow));
            return;
        }
        let folder = match self.folders.lock() {
            Ok(folders) => folders.paths.get(&wd).cloned(),
            Err(_) => return self.handler.handle_event(Err(poisoned())),
        };
        if mask.contains(EventMask::IGNORED) {
            if let Ok(mut folders) = self.folders.lock() {
                folders.paths.remove(&wd);
            }
            return;
        }
        let Some(folder) = folder else {
            return;
        };
        let path = name.map_or_else(|| folder.clone(), |n| folder.join(n));
        let is_dir = mask.contains(EventMask::ISDIR);
        if mask.contains(EventMask::MOVED_TO) {
            return self.moved_to(cookie, path, is_dir);
        }
        self.flush_moved_from();
        if mask.contains(EventMask::MOVED_FROM) {
            self.moved_from = Some((cookie, path, is_dir));
            return;
        }
        let kind = if mask.contains(EventMask::CREATE) {
            if is_dir {
                self.watch_new_folder(&path);
                EventKind::Create(CreateKind::Folder)
            } else {
                EventKind::Create(CreateKind::File)
            }
        } else if mask.contains(EventMask::DELETE) || mask.contains(EventMask::DELETE_SELF) {
            EventKind::Remove(RemoveKind::Any)
        } else if mask.contains(EventMask::MOVE_SELF) {
            EventKind::Modify(ModifyKind::Name(RenameMode::Any))
        } else if mask.contains(EventMask::ATTRIB) {
            EventKind::Modify(ModifyKind::Metadata(MetadataKind::Any))
        } else {
            EventKind::Modify(ModifyKind::Data(DataChange::Any))
        };
        self.handler
            .handle_event(Ok(Event::new(kind).add_path(path)));
    }

    /// A move into a watched folder: the other half of a move out just before it (a rename
    /// with both paths), or something moved in from outside.
    fn moved_to(&mut self, cookie: u32, to: PathBuf, is_dir: bool) {
        match self.moved_from.take() {
            Some((from_cookie, from, _)) if from_cookie == cookie => {
                if is_dir {
                    if let Ok(mut folders) = self.folders.lock() {
                        folders.moved(&from, &to);
                    }
                }
                let kind = EventKind::Modify(ModifyKind::Name(RenameMode::Both));
                let event = Event::new(kind).add_path(from).add_path(to);
                self.handler.handle_event(Ok(event));
            }
            other => {
                self.moved_from = other;
                self.flush_moved_from();
                if is_dir {
                    self.watch_new_folder(&to);
                }
                let kind = EventKind::Modify(ModifyKind::Name(RenameMode::To));
                self.handler.handle_event(Ok(Event::new(kind).add_path(to)));
            }
        }
    }

    /// Reports a move out that no move in followed: what moved left the watched folders.
    fn flush_moved_from(&mut self) {
        let Some((_, from, is_dir)) = self.moved_from.take() else {
            return;
        };
        if is_dir {
            self.unwatch_under(&from);
        }
        let kind = EventKind::Modify(ModifyKind::Name(RenameMode::From));
        self.handler
            .handle_event(Ok(Event::new(kind).add_path(from)));
    }

    /// Watches a folder made (or moved in) after the start, and everything already in it.
    fn watch_new_folder(&mut self, dir: &Path) {
        if let Err(error) = add_tree(&mut self.watches, &self.folders, dir, MASK) {
            if matches!(error.kind, notify::ErrorKind::MaxFilesWatch) {
                self.handler.handle_event(Err(error));
            }
        }
    }

    /// Stops watching `dir` and the folders under it (moved out of the locations).
    fn unwatch_under(&mut self, dir: &Path) {
        let gone: Vec<WatchDescriptor> = match self.folders.lock() {
            Ok(mut folders) => {
                let gone: Vec<WatchDescriptor> = folders
                    .paths
                    .iter()
                    .filter(|(_, path)| path.starts_with(dir))
                    .map(|(wd, _)| wd.clone())
                    .collect();
                for wd in &gone {
                    folders.paths.remove(wd);
                }
                gone
            }
            Err(_) => return,
        };
        for wd in gone {
            // Already gone with its folder, or not: either way nothing is left to report.
            let _ = self.watches.remove(wd);
        }
    }
}

fn name_path(name: &OsStr) -> PathBuf {
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crossbeam_channel::{Receiver, Sender};

    /// Longest wait for an event that must come.
    const WAIT: Duration = Duration::from_secs(10);

    struct Collect(Sender<notify::Result<Event>>);

    impl EventHandler for Collect {
        fn handle_event(&mut self, event: notify::Result<Event>) {
            let _ = self.0.send(event);
        }
    }

    fn watching(root: &Path) -> (InotifyWatcher, Receiver<notify::Result<Event>>) {
        let (tx, rx) = crossbeam_channel::unbounded();
        let mut watcher = InotifyWatcher::new(Collect(tx)).expect("watcher");
        watcher.watch(root).expect("watch");
        (watcher, rx)
    }

    /// The next event whose paths include `path`; the events before it are returned too.
    fn until(rx: &Receiver<notify::Result<Event>>, path: &Path) -> (Event, Vec<Event>) {
        let mut before = Vec::new();
        loop {
            let event = rx.recv_timeout(WAIT).expect("an event").expect("no error");
            if event.paths.iter().any(|p| p == path) {
                return (event, before);
            }
            before.push(event);
        }
    }

    /// Renames `from` to `to` and returns the event that reports `from`, which must be a
    /// rename of `mode`.
    fn renamed(
        rx: &Receiver<notify::Result<Event>>,
        from: &Path,
        to: &Path,
        mode: RenameMode,
    ) -> Event {
        std::fs::rename(from, to).expect("rename");
        let (event, _) = until(rx, from);
        assert_eq!(event.kind, EventKind::Modify(ModifyKind::Name(mode)));
        event
    }

    #[test]
    fn reading_files_is_no_event_and_writing_one_is() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().canonicalize().expect("canonical");
        let read = root.join("read.txt");
        std::fs::write(&read, b"read me").expect("write");
        let (_watcher, rx) = watching(&root);
        for _ in 0..100 {
            assert_eq!(std::fs::read(&read).expect("read"), b"read me");
        }
        let written = root.join("written.txt");
        std::fs::write(&written, b"new").expect("write");
        let (event, before) = until(&rx, &written);
        assert!(matches!(event.kind, EventKind::Create(CreateKind::File)));
        assert!(before.is_empty(), "reads were reported: {before:?}");
    }

    #[test]
    fn a_folder_moved_inside_is_followed_under_its_new_path_and_a_new_one_is_watched() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().canonicalize().expect("canonical");
        std::fs::create_dir_all(root.join("a/deep")).expect("dirs");
        let (_watcher, rx) = watching(&root);
        let event = renamed(&rx, &root.join("a"), &root.join("b"), RenameMode::Both);
        assert_eq!(event.paths, vec![root.join("a"), root.join("b")]);
        // A file in a folder under the moved one is reported where it is now.
        let file = root.join("b/deep/file.txt");
        std::fs::write(&file, b"x").expect("write");
        until(&rx, &file);
        // A folder made after the start, and one made inside it at once: the inner one is
        // watched too, found by the walk of the new folder or by its own create event, which
        // may come after the new folder's (so a write in it is tried until it is reported).
        std::fs::create_dir_all(root.join("new/inner")).expect("dirs");
        let inner_file = root.join("new/inner/file.txt");
        until(&rx, &root.join("new"));
        let deadline = std::time::Instant::now() + WAIT;
        'reported: loop {
            assert!(std::time::Instant::now() < deadline, "never reported");
            std::fs::write(&inner_file, b"y").expect("write");
            while let Ok(event) = rx.recv_timeout(Duration::from_millis(200)) {
                if event.expect("no error").paths.contains(&inner_file) {
                    break 'reported;
                }
            }
        }
    }

    #[test]
    fn a_folder_moved_out_is_a_move_out_and_no_longer_watched() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().canonicalize().expect("canonical");
        let watched = root.join("watched");
        std::fs::create_dir_all(watched.join("gone")).expect("dirs");
        let (watcher, rx) = watching(&watched);
        let event = renamed(
            &rx,
            &watched.join("gone"),
            &root.join("away"),
            RenameMode::From,
        );
        assert_eq!(event.paths, vec![watched.join("gone")]);
        let folders = watcher.folders.lock().expect("folders");
        assert_eq!(folders.paths.len(), 1, "only the root is watched");
    }
}
