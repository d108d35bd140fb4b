//! Issue 26: the location watcher on real files (inotify here): creates, edits, renames, moves,
//! a move with an edit, deletes, a folder of many files moved, and what changed while nothing
//! watched. Each step waits for the watcher's events, then checks the projection.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use keel_engine::{Entry, Event, Library, Scope, WatchOptions};
use keel_tests::{create_library, events_of};

const WAIT: Duration = Duration::from_secs(20);

/// Waits, event by event, until `ready` holds.
fn wait_until(events: &Receiver<Event>, what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !ready() {
        let left = deadline.saturating_duration_since(Instant::now());
        match events.recv_timeout(left) {
            Ok(_) => {}
            Err(RecvTimeoutError::Timeout) => panic!("timed out waiting for {what}"),
            Err(RecvTimeoutError::Disconnected) => panic!("the event bus closed"),
        }
    }
}

/// Waits for the watcher's first report (its rescan at start: it watches from then on).
fn wait_watching(events: &Receiver<Event>) {
    let deadline = Instant::now() + WAIT;
    loop {
        match events.recv_deadline(deadline) {
            Ok(Event::JobFinished { job: "watcher", .. }) => return,
            Ok(_) => {}
            Err(_) => panic!("the watcher never started"),
        }
    }
}

fn entry(lib: &Library, path: &Path) -> Option<Entry> {
    lib.files().entry(path).ok()
}

fn note(lib: &Library, entry: &Entry) -> Option<String> {
    lib.files()
        .metadata(entry)
        .expect("metadata")
        .entry
        .and_then(|(m, _)| m.notes)
}

/// Runs `steps` while `lib` is watched, then stops the watcher.
fn watched(lib: &Library, steps: impl FnOnce(&Receiver<Event>)) {
    let options = WatchOptions {
        debounce: Duration::from_millis(100),
        ..WatchOptions::default()
    };
    watched_with(lib, &options, steps);
}

/// [`watched`] with its own options.
fn watched_with(lib: &Library, options: &WatchOptions, steps: impl FnOnce(&Receiver<Event>)) {
    let events = events_of(lib);
    let (stop, stopped) = crossbeam_channel::bounded::<()>(1);
    std::thread::scope(|scope| {
        let watcher = scope.spawn(|| lib.watch(options, &stopped));
        wait_watching(&events);
        steps(&events);
        drop(stop);
        watcher.join().expect("joins").expect("watches");
    });
}

#[test]
fn the_watcher_follows_creates_edits_renames_moves_and_deletes() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(dir.path().join("tree/sub")).expect("tree");
    let tree = dir.path().join("tree").canonicalize().expect("canonical");
    std::fs::write(tree.join("a.txt"), b"first").expect("file");
    let (_home, lib) = create_library(dir.path(), "lib").expect("creates");
    lib.index(&tree, &mut |_| {}).expect("indexes");
    lib.files()
        .note(&tree.join("a.txt"), "mine", Scope::Entry)
        .expect("notes");
    let original = entry(&lib, &tree.join("a.txt")).expect("indexed");
    watched(&lib, |events| {
        std::fs::write(tree.join("new.txt"), b"hello").expect("creates");
        wait_until(events, "a created file", || {
            entry(&lib, &tree.join("new.txt")).is_some()
        });
        let created = entry(&lib, &tree.join("new.txt")).expect("entry");
        std::fs::write(tree.join("new.txt"), b"hello, edited").expect("edits");
        wait_until(events, "an edit", || {
            entry(&lib, &tree.join("new.txt")).is_some_and(|e| e.content != created.content)
        });
        assert_eq!(
            entry(&lib, &tree.join("new.txt")).expect("entry").uuid,
            created.uuid
        );

        std::fs::rename(tree.join("a.txt"), tree.join("b.txt")).expect("renames");
        wait_until(events, "a rename", || {
            entry(&lib, &tree.join("b.txt")).is_some()
        });
        let renamed = entry(&lib, &tree.join("b.txt")).expect("entry");
        assert_eq!(renamed.uuid, original.uuid, "a rename keeps the entry");
        assert_eq!(note(&lib, &renamed).as_deref(), Some("mine"));

        std::fs::rename(tree.join("b.txt"), tree.join("sub/b.txt")).expect("moves");
        wait_until(events, "a move", || {
            entry(&lib, &tree.join("sub/b.txt")).is_some()
        });
        assert_eq!(
            entry(&lib, &tree.join("sub/b.txt")).expect("entry").uuid,
            original.uuid
        );

        std::fs::rename(tree.join("sub/b.txt"), tree.join("c.txt")).expect("moves");
        std::fs::write(tree.join("c.txt"), b"moved and edited").expect("edits");
        wait_until(events, "a move with an edit", || {
            entry(&lib, &tree.join("c.txt")).is_some_and(|e| e.content != original.content)
        });
        let moved = entry(&lib, &tree.join("c.txt")).expect("entry");
        assert_eq!(
            moved.uuid, original.uuid,
            "moved and edited, the entry is kept"
        );
        assert_eq!(
            note(&lib, &moved).as_deref(),
            Some("mine"),
            "and so is its note"
        );
        assert!(entry(&lib, &tree.join("sub/b.txt")).is_none());

        std::fs::remove_file(tree.join("c.txt")).expect("deletes");
        wait_until(events, "a delete", || {
            entry(&lib, &tree.join("c.txt")).is_none()
        });
    });
}

/// A folder of many files moved is one burst of path updates: every entry keeps its uuid, and
/// no file is hashed again.
#[test]
fn a_folder_of_many_files_moved_keeps_every_entry() {
    let files = if keel_tests::full_tier() {
        10_000
    } else {
        2_000
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(tree.join("big")).expect("tree");
    std::fs::create_dir_all(tree.join("archive")).expect("tree");
    for i in 0..files {
        std::fs::write(tree.join(format!("big/{i}.txt")), format!("file {i}")).expect("file");
    }
    let tree = tree.canonicalize().expect("canonical");
    let (_home, lib) = create_library(dir.path(), "lib").expect("creates");
    lib.index(&tree, &mut |_| {}).expect("indexes");
    let before: Vec<Entry> = (0..files)
        .map(|i| entry(&lib, &tree.join(format!("big/{i}.txt"))).expect("indexed"))
        .collect();
    watched(&lib, |events| {
        std::fs::rename(tree.join("big"), tree.join("archive/big")).expect("moves");
        let last = tree.join(format!("archive/big/{}.txt", files - 1));
        wait_until(events, "the folder's move", || entry(&lib, &last).is_some());
    });
    for (i, old) in before.iter().enumerate() {
        let now = entry(&lib, &tree.join(format!("archive/big/{i}.txt"))).expect("moved");
        assert_eq!(now.uuid, old.uuid, "file {i}");
        assert_eq!(now.content, old.content);
    }
    assert!(entry(&lib, &tree.join("big/0.txt")).is_none());
}

/// What changed while nothing watched is found when the watcher starts.
#[test]
fn changes_made_while_nothing_watched_are_found_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(&tree).expect("tree");
    std::fs::write(tree.join("kept.txt"), b"kept").expect("file");
    std::fs::write(tree.join("gone.txt"), b"gone").expect("file");
    let tree = tree.canonicalize().expect("canonical");
    let (_home, lib) = create_library(dir.path(), "lib").expect("creates");
    lib.index(&tree, &mut |_| {}).expect("indexes");
    std::fs::remove_file(tree.join("gone.txt")).expect("deletes");
    std::fs::write(tree.join("added.txt"), b"added").expect("file");
    // Written a moment before the start, it may look still written to the first rescan, which
    // then looks again once it settles: no event from the disk is needed for that.
    watched(&lib, |events| {
        wait_until(events, "the file added", || {
            entry(&lib, &tree.join("added.txt")).is_some()
        });
    });
    assert!(entry(&lib, &tree.join("added.txt")).is_some());
    assert!(entry(&lib, &tree.join("gone.txt")).is_none());
    assert!(entry(&lib, &tree.join("kept.txt")).is_some());
}

/// A file moved into another folder *and* edited while nothing watched keeps its entry and its
/// note: the rescan at start matches it by inode (its content is new, so content cannot). A new
/// file that may reuse a deleted file's inode is not taken for it.
#[test]
fn a_file_moved_and_edited_while_nothing_watched_keeps_its_entry() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(tree.join("from")).expect("tree");
    std::fs::create_dir_all(tree.join("to")).expect("tree");
    std::fs::write(tree.join("from/photo.jpg"), b"the photo").expect("file");
    std::fs::write(tree.join("from/old.txt"), b"an old file").expect("file");
    let tree = tree.canonicalize().expect("canonical");
    let (_home, lib) = create_library(dir.path(), "lib").expect("creates");
    lib.index(&tree, &mut |_| {}).expect("indexes");
    let before = entry(&lib, &tree.join("from/photo.jpg")).expect("the entry");
    let old = entry(&lib, &tree.join("from/old.txt")).expect("the entry");
    lib.files()
        .note(
            &tree.join("from/photo.jpg"),
            "beach, 2024",
            keel_engine::Scope::Entry,
        )
        .expect("notes");
    std::fs::rename(tree.join("from/photo.jpg"), tree.join("to/renamed.jpg")).expect("moves");
    std::fs::write(tree.join("to/renamed.jpg"), b"the photo, cropped").expect("edits");
    // Deleted, then a new file (the file system may give it the freed inode).
    std::fs::remove_file(tree.join("from/old.txt")).expect("deletes");
    std::fs::write(tree.join("to/new.txt"), b"a new file").expect("creates");
    // The rescan at start leaves files written this recently for its next run.
    watched(&lib, |events| {
        wait_until(events, "the rescan of the files just written", || {
            entry(&lib, &tree.join("to/renamed.jpg")).is_some()
                && entry(&lib, &tree.join("to/new.txt")).is_some()
        });
    });
    let after = entry(&lib, &tree.join("to/renamed.jpg")).expect("the moved entry");
    assert_eq!(after.uuid, before.uuid, "the entry is kept");
    assert_ne!(after.content, before.content, "with its new content");
    assert_eq!(note(&lib, &after).as_deref(), Some("beach, 2024"));
    assert!(entry(&lib, &tree.join("from/photo.jpg")).is_none());
    let new = entry(&lib, &tree.join("to/new.txt")).expect("the new file");
    assert_ne!(new.uuid, old.uuid, "a new file is not the deleted one");
    assert!(entry(&lib, &tree.join("from/old.txt")).is_none());
    let (report, digest) = lib.verify().expect("verifies");
    assert!(report.faults.is_empty());
    digest.expect("the projections match a replay");
}

/// A running node watches its locations: a file written on `a` reaches `b`'s projection with
/// nobody running `index`.
#[test]
fn a_file_written_on_a_watched_device_reaches_the_other() {
    use keel_tests::cluster::{converge, founder_with, joiner, options};
    let dir = tempfile::tempdir().expect("tempdir");
    let watching = keel_node::NodeOptions {
        watch: Some(WatchOptions {
            debounce: Duration::from_millis(100),
            ..WatchOptions::default()
        }),
        ..options(Vec::new())
    };
    let (_ha, a) = founder_with(dir.path(), "a", "lib", watching).expect("founder");
    let (_hb, b) = joiner(dir.path(), "b", &a).expect("joins");
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(&tree).expect("tree");
    let tree = tree.canonicalize().expect("canonical");
    a.library().index(&tree, &mut |_| {}).expect("indexes");
    converge(&[&a, &b], WAIT).unwrap_or_else(|r| panic!("{r}"));
    let location = a
        .library()
        .files()
        .location(&tree)
        .expect("reads")
        .expect("a location");
    let on_b = events_of(b.library());
    std::fs::write(tree.join("written.txt"), b"on a").expect("writes");
    wait_until(&on_b, "the file on b", || {
        b.library()
            .read(|p| p.query().entry_at(location.uuid, "", "written.txt"))
            .expect("reads")
            .is_some()
    });
}

/// A location whose folder is gone (an unplugged drive) is not emptied by a rescan or an
/// index run: its entries stay, and the run says the folder is missing. The platform cannot
/// watch it, so the watcher says so and rescans it periodically: once the drive is back, its
/// changes are found.
#[test]
fn a_missing_location_folder_keeps_its_entries() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tree = dir.path().join("drive");
    std::fs::create_dir_all(&tree).expect("tree");
    std::fs::write(tree.join("kept.txt"), b"kept").expect("file");
    let tree = tree.canonicalize().expect("canonical");
    let (_home, lib) = create_library(dir.path(), "lib").expect("creates");
    lib.index(&tree, &mut |_| {}).expect("indexes");
    let unplugged = dir.path().join("unplugged");
    std::fs::rename(&tree, &unplugged).expect("unplugs");
    let location = lib
        .read(|p| p.query().locations())
        .expect("reads")
        .remove(0);
    let rescanned = lib.index(&tree, &mut |_| {});
    assert!(rescanned.is_err(), "{rescanned:?}");
    let polling = WatchOptions {
        debounce: Duration::from_millis(100),
        poll_every: Duration::from_millis(200),
        ..WatchOptions::default()
    };
    watched_with(&lib, &polling, |events| {
        let entries = lib
            .read(|p| p.query().entries_of_location(location.uuid))
            .expect("reads");
        assert_eq!(
            entries.len(),
            1,
            "the entries of a missing folder were removed"
        );
        std::fs::rename(&unplugged, &tree).expect("plugs back");
        std::fs::write(tree.join("new.txt"), b"new").expect("file");
        wait_until(events, "a periodic rescan", || {
            entry(&lib, &tree.join("new.txt")).is_some()
        });
        assert!(entry(&lib, &tree.join("kept.txt")).is_some());
    });
}

/// A large file written over several bursts is hashed once, when it stops changing: the
/// library never holds a content of it half written.
#[test]
fn a_file_being_written_is_hashed_once_when_it_stops_changing() {
    use std::io::Write;
    let megabytes = if keel_tests::full_tier() { 1024 } else { 48 };
    let dir = tempfile::tempdir().expect("tempdir");
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(&tree).expect("tree");
    let tree = tree.canonicalize().expect("canonical");
    let (_home, lib) = create_library(dir.path(), "lib").expect("creates");
    lib.index(&tree, &mut |_| {}).expect("indexes");
    // Bursts end every 300 ms while the file grows: each sees it still being written (its
    // last write less than the debounce ago). The writer never pauses longer than 40 ms, but a
    // loaded machine can hold it back longer: the debounce leaves it 250 ms.
    let options = WatchOptions {
        debounce: Duration::from_millis(250),
        burst_max: Duration::from_millis(300),
        ..WatchOptions::default()
    };
    let big = tree.join("big.bin");
    watched_with(&lib, &options, |events| {
        let mut file = std::fs::File::create(&big).expect("creates");
        let chunk = vec![7u8; 1024 * 1024];
        for i in 0..megabytes {
            file.write_all(&chunk).expect("writes");
            if i % 4 == 3 {
                std::thread::sleep(Duration::from_millis(40));
            }
        }
        drop(file);
        let expected = (megabytes as i64) * 1024 * 1024;
        wait_until(events, "the whole file", || {
            entry(&lib, &big).is_some_and(|e| e.size == expected && e.content.is_some())
        });
    });
    let contents = lib
        .read(|p| p.query().select::<keel_engine::ContentIdentity, _>("1", []))
        .expect("reads");
    assert_eq!(contents.len(), 1, "hashed more than once: {contents:?}");
}

/// A watcher run by `crash_child … watch` in a user namespace whose inotify watch limit is
/// `limit`, over a location of six subfolders (seven watches in all); its reports as lines.
struct LimitedWatcher {
    dir: tempfile::TempDir,
    tree: PathBuf,
    home: keel_engine::Home,
    child: std::process::Child,
    lines: Receiver<String>,
    /// New files and folders counted by every report read so far, matched or not.
    new_seen: std::cell::Cell<u64>,
}

/// The count of new files and folders in a report line (`… N new, …`), 0 when it has none.
fn new_in(line: &str) -> u64 {
    line.split_once(" new, ")
        .and_then(|(head, _)| head.rsplit(' ').next())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0)
}

impl LimitedWatcher {
    /// `None` where user namespaces are not available (`unshare -U -r` fails): said on stderr.
    fn start(limit: u32) -> Option<Self> {
        use std::io::{BufRead, BufReader};
        use std::process::{Command, Stdio};
        let set_limit = format!("echo {limit} > /proc/sys/user/max_inotify_watches");
        let probe = Command::new("unshare")
            .args(["-U", "-r", "sh", "-c", &set_limit])
            .status();
        if !probe.is_ok_and(|s| s.success()) {
            eprintln!("skipped: no user namespace to set a watch limit in (unshare -U -r)");
            return None;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let tree = dir.path().join("tree");
        for i in 0..6 {
            std::fs::create_dir_all(tree.join(format!("sub{i}"))).expect("tree");
            std::fs::write(tree.join(format!("sub{i}/old.txt")), format!("{i}")).expect("file");
        }
        let tree = tree.canonicalize().expect("canonical");
        let (home, lib) = create_library(dir.path(), "lib").expect("creates");
        lib.index(&tree, &mut |_| {}).expect("indexes");
        lib.close().expect("closes");
        let script = format!(
            "{set_limit} && exec '{}' '{}' lib watch",
            env!("CARGO_BIN_EXE_crash_child"),
            home.root().display()
        );
        let mut child = Command::new("unshare")
            .args(["-U", "-r", "sh", "-c", &script])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("the watcher starts");
        let stdout = child.stdout.take().expect("piped");
        let (lines_tx, lines) = crossbeam_channel::unbounded();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = lines_tx.send(line);
            }
        });
        Some(Self {
            dir,
            tree,
            home,
            child,
            lines,
            new_seen: std::cell::Cell::new(0),
        })
    }

    /// The first report `matches` accepts; every report read on the way is counted.
    fn wait_for(&self, what: &str, matches: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            match self.lines.recv_deadline(deadline) {
                Ok(line) => {
                    self.new_seen.set(self.new_seen.get() + new_in(&line));
                    if matches(&line) {
                        return line;
                    }
                }
                Err(_) => panic!("the watcher never reported {what}"),
            }
        }
    }

    /// The count of new files and folders in the reports read so far.
    fn new_so_far(&self) -> u64 {
        self.new_seen.get()
    }

    /// Waits until the reports read since the start count `n` new files and folders in all.
    fn wait_for_new(&self, n: u64) {
        while self.new_seen.get() < n {
            self.wait_for("the new files", |l| l.contains(" new, "));
        }
    }

    /// Stops the watcher (`kill -9`) and opens the library.
    fn stop(mut self) -> (tempfile::TempDir, Library) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reaped");
        let lib = Library::open(&self.home, "lib", keel_tests::PASSWORD).expect("reopens");
        (self.dir, lib)
    }
}

/// The platform's watch limit, for real (limit 0: nothing can be watched). Keel says so,
/// naming the limit and how to raise it, and rescans the location periodically: files added
/// after the rescan at start (no event can tell of them) are found.
#[test]
fn a_location_past_the_watch_limit_is_rescanned_periodically() {
    let Some(watcher) = LimitedWatcher::start(0) else {
        return;
    };
    let tree = watcher.tree.clone();
    let said = watcher.wait_for("the limit", |l| l.contains("cannot watch"));
    assert!(
        said.contains(tree.to_str().expect("utf-8")) && said.contains("max_user_watches"),
        "{said}"
    );
    watcher.wait_for("the rescan at start", |l| {
        l.contains("changes made while nothing watched")
    });
    // Only a periodic rescan (or the look again it schedules for a file that seemed still
    // written) can find them.
    let before = watcher.new_so_far();
    for i in 0..6 {
        std::fs::write(tree.join(format!("sub{i}/new.txt")), b"new").expect("file");
    }
    watcher.wait_for_new(before + 6);
    let (_dir, lib) = watcher.stop();
    for i in 0..6 {
        let path = tree.join(format!("sub{i}/new.txt"));
        assert!(entry(&lib, &path).is_some(), "sub{i}");
    }
}

/// The limit reached after the start (limit 7: the location's seven folders are watched, a new
/// one is not): Keel says so and rescans periodically from then on, so a file in the new folder,
/// which sends no event, is found.
#[test]
fn a_new_folder_past_the_watch_limit_turns_the_location_to_rescans() {
    let Some(watcher) = LimitedWatcher::start(7) else {
        return;
    };
    let tree = watcher.tree.clone();
    watcher.wait_for("the rescan at start", |l| {
        l.contains("changes made while nothing watched")
    });
    let before = watcher.new_so_far();
    std::fs::create_dir(tree.join("later")).expect("a new folder");
    let said = watcher.wait_for("the limit", |l| l.contains("cannot watch"));
    assert!(
        said.contains("reached by a new folder") && said.contains("max_user_watches"),
        "{said}"
    );
    std::fs::write(tree.join("later/unwatched.txt"), b"no event").expect("file");
    // The folder and the file, whichever reports (the folder's burst or a rescan) count them:
    // reports read while waiting for the limit count too.
    watcher.wait_for_new(before + 2);
    let (_dir, lib) = watcher.stop();
    assert!(entry(&lib, &tree.join("later/unwatched.txt")).is_some());
}
