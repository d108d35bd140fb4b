//! Issue 28: compaction on real redb and SQLite files. The log is dropped up to a position,
//! its state kept as a snapshot; rebuild, verify and a lost projection start from it; a steady
//! rewrite workload stops growing the journal; compacting past what every device has is
//! refused.

use keel_engine::{EngineError, Library, Lsn, Tag};
use keel_tests::cluster::wait_status;
use keel_tests::{create_library, tag};

fn tags(lib: &Library, names: impl Iterator<Item = String>) -> Vec<Tag> {
    let tags: Vec<Tag> = names.map(|n| tag(&n)).collect();
    lib.transact(|tx| {
        for t in &tags {
            tx.upsert(t);
        }
        Ok(())
    })
    .expect("commits");
    tags
}

fn last(lib: &Library) -> Lsn {
    Lsn(lib.status().expect("status").journal.last_lsn)
}

#[test]
fn a_compacted_library_rebuilds_verifies_and_heals_from_its_snapshot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (home, lib) = create_library(dir.path(), "lib").expect("creates");
    let first = tags(&lib, (0..2_000).map(|i| format!("tag {i}")));
    lib.flush().expect("flushes");
    let before = lib.status().expect("status");
    assert_eq!(before.journal.compacted_to, 0);
    assert_eq!(before.disk.snapshot, 0);

    let report = lib.compact(last(&lib)).expect("compacts");
    let compacted_to = report.base;
    assert_eq!(report.base, before.journal.last_lsn);
    assert!(report.dropped >= 2_000, "{report:?}");
    assert!(report.snapshot_bytes > 0);
    let after = lib.status().expect("status");
    assert_eq!(after.journal.compacted_to, report.base);
    assert_eq!(
        (after.journal.log_len, after.digest.clone()),
        (0, before.digest.clone())
    );
    assert_eq!(after.disk.snapshot, report.snapshot_bytes);

    // A change feed from before the compaction is told where it may go on from; from there it
    // reads on.
    match lib
        .sync_state()
        .changes_since(keel_engine::FeedPosition::default(), 10)
    {
        Err(EngineError::FeedCompacted { base }) => assert_eq!(base, compacted_to),
        other => panic!("a feed from the start: {other:?}"),
    }
    let from_base = keel_engine::FeedPosition {
        log: Lsn(compacted_to),
        ..keel_engine::FeedPosition::default()
    };
    let empty = lib
        .sync_state()
        .changes_since(from_base, 10)
        .expect("reads");
    assert!(empty.changes.is_empty() && !empty.more);
    // Changes after the compaction, one of them to a compacted record.
    tags(&lib, (0..100).map(|i| format!("later {i}")));
    let mut renamed = first[7].clone();
    renamed.name = "renamed after the compaction".into();
    lib.transact(|tx| {
        tx.upsert(&renamed);
        Ok(())
    })
    .expect("commits");
    lib.flush().expect("flushes");
    let digest = lib.digest().expect("digest");

    // A rebuild replays the snapshot and the log after it, to the same digest.
    lib.rebuild(&mut |_, _| {}).expect("rebuilds");
    assert_eq!(lib.digest().expect("digest"), digest);
    let (report, outcome) = lib.verify().expect("verifies");
    assert!(report.faults.is_empty(), "{:?}", report.faults);
    assert_eq!(outcome.expect("projections match"), digest);
    lib.close().expect("closes");

    // A lost projection is healed from the snapshot when the library opens.
    keel_projections_files(&home, "lib").for_each(|f| std::fs::remove_file(f).expect("removes"));
    let lib = Library::open(&home, "lib", keel_tests::PASSWORD).expect("reopens");
    assert_eq!(lib.digest().expect("digest"), digest);
    assert_eq!(lib.sync_state().changes().expect("changes").len(), 101);
    lib.close().expect("closes");

    // Without the snapshot, the library says what is missing instead of a wrong projection.
    let lib_dir = home.library_dir("lib");
    std::fs::remove_file(lib_dir.join(keel_engine::SNAPSHOT_FILE)).expect("removes");
    keel_projections_files(&home, "lib").for_each(|f| std::fs::remove_file(f).expect("removes"));
    match Library::open(&home, "lib", keel_tests::PASSWORD) {
        Err(EngineError::SnapshotMissing { base, .. }) => assert_eq!(base, compacted_to),
        Err(other) => panic!("another error: {other}"),
        Ok(_) => panic!("opened without its snapshot"),
    }
}

/// The projection files of library `name` (the file and its WAL and shared memory).
fn keel_projections_files(
    home: &keel_engine::Home,
    name: &str,
) -> impl Iterator<Item = std::path::PathBuf> {
    std::fs::read_dir(home.library_dir(name))
        .expect("lists")
        .map(|e| e.expect("entry").path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(keel_engine::PROJECTIONS_FILE))
        })
        .collect::<Vec<_>>()
        .into_iter()
}

/// Rewrites every tag of `lib` `rounds` times, compacting after each round when `compact`;
/// returns the journal file's size after each round.
fn rewrite_rounds(lib: &Library, rounds: usize, compact: bool) -> Vec<u64> {
    let mut set = tags(lib, (0..2_000).map(|i| format!("tag {i}")));
    let mut sizes = Vec::new();
    for round in 0..rounds {
        for (i, t) in set.iter_mut().enumerate() {
            t.name = format!("tag {i} round {round}");
        }
        lib.transact(|tx| {
            for t in &set {
                tx.upsert(t);
            }
            Ok(())
        })
        .expect("rewrites");
        lib.flush().expect("flushes");
        if compact {
            lib.compact(last(lib)).expect("compacts");
        }
        sizes.push(lib.status().expect("status").disk.journal);
    }
    sizes
}

#[test]
fn a_steady_rewrite_workload_stops_growing_the_journal() {
    const ROUNDS: usize = 16;
    let dir = tempfile::tempdir().expect("tempdir");
    let (_home, lib) = create_library(dir.path(), "lib").expect("creates");
    let sizes = rewrite_rounds(&lib, ROUNDS, true);
    assert_eq!(lib.status().expect("status").counts.tags, 2_000);
    let (early, late) = sizes.split_at(ROUNDS / 2);
    let early_max = early.iter().copied().max().unwrap_or(0);
    let late_max = late.iter().copied().max().unwrap_or(0);
    // redb reuses the pages a compaction frees: the file moves within a band, it does not grow
    // with the rounds.
    assert!(
        late_max <= early_max + early_max / 2,
        "the journal kept growing: {sizes:?}"
    );
    // The same workload without compaction, for contrast: it grows round after round.
    let (_home, control) = create_library(&dir.path().join("control"), "lib").expect("creates");
    let grown = rewrite_rounds(&control, ROUNDS, false);
    let control_end = grown.last().copied().unwrap_or(0);
    assert!(
        control_end > 3 * late_max,
        "compacted {sizes:?}, not compacted {grown:?}"
    );
}

/// The projections are copied at the position they applied, which may be past what every
/// device acknowledged (`upto`): that copy waits, and goes in place, the log dropped up to its
/// position, once a compaction's `upto` reaches it (decision 0081). Never a snapshot past the
/// base a truncation could cut (`library::a_truncation_past_a_compaction_base_leaves_no_change_in_the_snapshot`).
#[test]
fn compaction_stops_at_what_every_device_acknowledged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_home, lib) = create_library(dir.path(), "lib").expect("creates");
    tags(&lib, (0..10).map(|i| format!("tag {i}")));
    lib.flush().expect("flushes");
    let end = last(&lib);
    let digest = lib.digest().expect("digest");
    // The projections applied `end`; the other devices acknowledged three positions less.
    let waiting = lib.compact(Lsn(end.0 - 3)).expect("compacts");
    assert_eq!((waiting.base, waiting.dropped), (0, 0), "{waiting:?}");
    assert_eq!(waiting.waiting_at, Some(end.0));
    assert_eq!(waiting.snapshot_bytes, 0, "no snapshot in place yet");
    let said = lib.status().expect("status").journal.snapshot_waiting_at;
    assert_eq!(said, Some(end.0), "the status says a snapshot waits");
    // Still short of it: still waiting.
    let again = lib.compact(Lsn(end.0 - 1)).expect("compacts");
    assert_eq!((again.dropped, again.waiting_at), (0, Some(end.0)));
    let done = lib.compact(end).expect("compacts");
    assert_eq!(
        (done.base, done.dropped, done.waiting_at),
        (end.0, end.0, None)
    );
    assert!(done.snapshot_bytes > 0);
    let status = lib.status().expect("status");
    assert_eq!(
        (
            status.journal.compacted_to,
            status.journal.log_len,
            status.journal.snapshot_waiting_at
        ),
        (end.0, 0, None)
    );
    // A rebuild starts from the snapshot, to the same.
    lib.rebuild(&mut |_, _| {}).expect("rebuilds");
    assert_eq!(lib.digest().expect("digest"), digest);
    let (_, verified) = lib.verify().expect("verifies");
    assert!(verified.is_ok(), "{verified:?}");
    // At or below the base, nothing happens.
    assert_eq!(lib.compact(Lsn(2)).expect("no-op").dropped, 0);
    assert_eq!(lib.compact(end).expect("no-op").dropped, 0);
}

#[test]
fn devices_compact_what_all_acknowledged_and_a_new_device_joins_from_the_compacted_log() {
    use keel_tests::cluster;
    use std::time::Duration;
    let dir = tempfile::tempdir().expect("tempdir");
    let (_ha, a) = cluster::founder_with_tags(dir.path(), "a", "lib", 3_000).expect("founds");
    let (_hb, b) = cluster::joiner(dir.path(), "b", &a).expect("joins");
    tags(a.library(), (0..500).map(|i| format!("after b {i}")));
    cluster::converge(&[&a, &b], Duration::from_secs(30)).expect("converges");
    // The leader may compact what b acknowledged storing: its whole log, once b said so.
    wait_status(&a, "b's acknowledgement", |s| s.compactable == s.log_len);
    let report = a.compact().expect("compacts");
    assert!(report.base > 3_000 && report.dropped > 3_000, "{report:?}");
    wait_status(&a, "the core to follow", |s| s.compacted_to == report.base);
    // The follower learns the leader's compaction position and compacts to it.
    wait_status(&b, "the leader's base", |s| s.compactable == report.base);
    let followed = b.compact().expect("compacts");
    assert_eq!(followed.base, report.base);

    // A new device joins from the compacted log: the file and the log after the base.
    let (_hc, c) = cluster::joiner(dir.path(), "c", &a).expect("joins a compacted library");
    tags(c.library(), (0..50).map(|i| format!("from c {i}")));
    let digest =
        cluster::converge(&[&a, &b, &c], Duration::from_secs(30)).expect("all three converge");
    let joined = c.library().status().expect("status");
    assert_eq!(joined.journal.compacted_to, report.base);
    assert!(
        joined.disk.snapshot > 0,
        "the received file is its snapshot"
    );
    assert_eq!(joined.counts.tags, 3_550);
    // Each device rebuilds from its own snapshot to the digest they share.
    for node in [&a, &b, &c] {
        node.library().rebuild(&mut |_, _| {}).expect("rebuilds");
        assert_eq!(node.library().digest().expect("digest"), digest);
    }
    for node in [c, b, a] {
        node.stop().expect("stops");
    }
}

/// While the leader writes on, each device compacts: its copy of the projections is past what
/// every device acknowledged, so it waits until they did (a heartbeat or two), and a follower
/// need not wait for its leader to compact first: the leader's segments offer what it may
/// compact itself (decision 0081). The devices then rebuild from their snapshots to the digest
/// they share.
#[test]
fn devices_compact_while_the_leader_writes_on() {
    use keel_tests::cluster;
    use std::time::Duration;
    let dir = tempfile::tempdir().expect("tempdir");
    let (_ha, a) = cluster::founder_with_tags(dir.path(), "a", "lib", 2_000).expect("founds");
    let (_hb, b) = cluster::joiner(dir.path(), "b", &a).expect("joins");
    cluster::converge(&[&a, &b], Duration::from_secs(30)).expect("converges");
    let a = std::sync::Arc::new(a);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (a, stop) = (a.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut round = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                tags(a.library(), (0..20).map(|i| format!("during {round} {i}")));
                round += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let followed = b.compact().expect("compacts");
    let led = a.compact().expect("compacts");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().expect("the writer ends");
    assert!(
        followed.dropped > 2_000 && followed.waiting_at.is_none(),
        "the follower compacts before its leader: {followed:?}"
    );
    assert!(
        led.dropped > 0 && led.waiting_at.is_none(),
        "the leader's snapshot went in place: {led:?}"
    );
    let a = std::sync::Arc::into_inner(a).expect("the writer let go");
    let digest = cluster::converge(&[&a, &b], Duration::from_secs(30)).expect("converges");
    for node in [&a, &b] {
        node.library().rebuild(&mut |_, _| {}).expect("rebuilds");
        assert_eq!(node.library().digest().expect("digest"), digest);
    }
    for node in [b, a] {
        node.stop().expect("stops");
    }
}

/// A join to a log longer than the leader's `join_history` starts the joiner's log at a base of
/// its own (decision 0079): the file is its snapshot at the position every other device holds
/// (here `b`'s acknowledgement caps it), and the history before it stays behind. The joiner
/// converges, rebuilds from its snapshot to the shared digest, verifies, and a device that
/// joins through it later gets the history it holds.
#[test]
fn a_join_to_a_long_log_starts_at_a_base_of_its_own() {
    use keel_tests::cluster;
    use std::time::Duration;
    let dir = tempfile::tempdir().expect("tempdir");
    let short_history = |peers| keel_node::NodeOptions {
        join_history: Some(100),
        ..cluster::options(peers)
    };
    let (_ha, a) =
        cluster::founder_with(dir.path(), "a", "lib", short_history(Vec::new())).expect("founds");
    let (_hb, b) = cluster::joiner(dir.path(), "b", &a).expect("joins a short log whole");
    assert_eq!(
        b.library().status().expect("status").journal.compacted_to,
        0
    );
    tags(a.library(), (0..400).map(|i| format!("before c {i}")));
    cluster::converge(&[&a, &b], Duration::from_secs(30)).expect("converges");
    wait_status(&a, "b's acknowledgement", |s| s.compactable == s.log_len);

    let (_hc, c) = cluster::joiner(dir.path(), "c", &a).expect("joins at a base");
    let joined = c.library().status().expect("status");
    let leader_end = last(a.library()).0;
    assert!(
        joined.journal.compacted_to > 400 && joined.journal.compacted_to <= leader_end,
        "c's log starts at {} of {leader_end}",
        joined.journal.compacted_to
    );
    assert!(
        joined.disk.snapshot > 0,
        "the received file is its snapshot"
    );
    assert_eq!(
        a.library().status().expect("status").journal.compacted_to,
        0,
        "the leader keeps its whole log"
    );
    tags(c.library(), (0..20).map(|i| format!("from c {i}")));
    let digest =
        cluster::converge(&[&a, &b, &c], Duration::from_secs(30)).expect("all three converge");
    assert_eq!(c.library().status().expect("status").counts.tags, 420);
    c.library().rebuild(&mut |_, _| {}).expect("rebuilds");
    assert_eq!(c.library().digest().expect("digest"), digest);
    let (report, replayed) = c.library().verify().expect("verifies");
    assert!(report.faults.is_empty(), "{:?}", report.faults);
    assert_eq!(replayed.expect("a replay"), digest);
    for node in [c, b, a] {
        node.stop().expect("stops");
    }
}

/// A join over a slow link leaves the file's copy once its probe measured the link, and the
/// device backfills from the inviter's snapshot when its node starts (decision 0075). Here
/// every link is slow: the rule's rate is above any.
#[test]
fn a_join_over_a_slow_link_backfills_instead_of_copying_the_file() {
    use keel_tests::cluster;
    use std::time::Duration;
    let dir = tempfile::tempdir().expect("tempdir");
    let (_ha, a) = cluster::founder_with_tags(dir.path(), "a", "lib", 3_000).expect("founds");
    a.library().flush().expect("flushes");
    let report = a.compact().expect("compacts");
    assert!(report.snapshot_bytes > 32 << 10, "{report:?}");
    wait_status(&a, "the core to follow", |s| s.compacted_to == report.base);
    tags(a.library(), (0..20).map(|i| format!("after the base {i}")));
    let slow = keel_node::SlowLink {
        probe_bytes: 16 << 10,
        backfill_below: u64::MAX,
    };
    let (_hc, c) = cluster::joiner_over(dir.path(), "c", &a, slow).expect("joins");
    cluster::converge(&[&a, &c], Duration::from_secs(60)).expect("converges");
    let jobs = c.library().jobs().expect("jobs");
    let state_of = |kind: fn(&keel_engine::JobKind) -> bool| {
        jobs.iter().find(|j| kind(&j.kind)).map(|j| j.state)
    };
    assert_eq!(
        state_of(|k| matches!(k, keel_engine::JobKind::Backfill { .. })),
        Some(keel_engine::JobState::Completed),
        "{jobs:?}"
    );
    assert_ne!(
        state_of(|k| matches!(k, keel_engine::JobKind::Join { .. })),
        Some(keel_engine::JobState::Completed),
        "the copy was left: {jobs:?}"
    );
    let status = c.library().status().expect("status");
    assert_eq!(status.journal.compacted_to, report.base);
    assert_eq!(status.counts.tags, 3_020);
    for node in [c, a] {
        node.stop().expect("stops");
    }
}

/// A bug found by the test above: a follower's own commits pass through its offline journal
/// and leave it once sequenced, so a rebuild's replay reached local position 0 and the
/// library's applied position went back to it; `flush` then waited forever for local commits
/// long applied.
#[test]
fn a_follower_that_rebuilt_still_flushes() {
    use keel_tests::cluster;
    use std::time::Duration;
    let dir = tempfile::tempdir().expect("tempdir");
    let (_ha, a) = cluster::founder_with_tags(dir.path(), "a", "lib", 10).expect("founds");
    let (_hb, b) = cluster::joiner(dir.path(), "b", &a).expect("joins");
    tags(b.library(), (0..5).map(|i| format!("from b {i}")));
    cluster::converge(&[&a, &b], Duration::from_secs(30)).expect("converges");
    b.library().rebuild(&mut |_, _| {}).expect("rebuilds");
    let (done, flushed) = crossbeam_channel::bounded(1);
    std::thread::scope(|s| {
        s.spawn(|| {
            let _ = done.send(b.library().flush());
        });
        match flushed.recv_timeout(Duration::from_secs(20)) {
            Ok(result) => result.expect("flushes"),
            Err(_) => {
                // Unblock the waiting thread so the scope can end: a commit moves the applier.
                tags(b.library(), std::iter::once("unblock".to_string()));
                panic!("flush did not return after a rebuild");
            }
        }
    });
    b.stop().expect("stops");
    a.stop().expect("stops");
}

/// Past `compact_after` entries a node compacts its log by itself (it looks every 5 s).
#[test]
fn a_node_compacts_on_its_own_past_its_threshold() {
    use keel_tests::cluster;
    let dir = tempfile::tempdir().expect("tempdir");
    let options = keel_node::NodeOptions {
        compact_after: Some(500),
        ..cluster::options(Vec::new())
    };
    let (_home, a) = cluster::founder_with(dir.path(), "a", "lib", options).expect("founds");
    tags(a.library(), (0..400).map(|i| format!("tag {i}")));
    // Below the threshold nothing happens; past it, the next look compacts.
    std::thread::sleep(std::time::Duration::from_secs(6));
    assert_eq!(a.status().compacted_to, 0, "compacted below its threshold");
    tags(a.library(), (0..200).map(|i| format!("more {i}")));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while a.library().status().expect("status").journal.compacted_to == 0 {
        assert!(std::time::Instant::now() < deadline, "never compacted");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let status = a.library().status().expect("status");
    assert!(status.disk.snapshot > 0);
    let jobs = a.library().jobs().expect("jobs");
    assert!(
        jobs.iter()
            .any(|j| matches!(j.kind, keel_engine::JobKind::Compact { .. })),
        "the compaction ran as a job"
    );
    a.stop().expect("stops");
}

/// `kill -9` at random moments of a child that commits and compacts over and over: every
/// acknowledged tag is there when the library opens, and the projections equal the snapshot
/// plus a replay of the log after the base.
#[test]
fn kill_9_during_compactions_loses_nothing_acknowledged() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().expect("tempdir");
    let (home, lib) = create_library(dir.path(), "lib").expect("creates");
    lib.close().expect("closes");
    let mut acknowledged = Vec::new();
    let mut compacted = 0;
    for round in 0..12u64 {
        let mut child = Command::new(env!("CARGO_BIN_EXE_crash_child"))
            .arg(home.root())
            .arg("lib")
            .arg("compact")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("child starts");
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = crossbeam_channel::unbounded::<String>();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        assert_eq!(
            rx.recv_timeout(std::time::Duration::from_secs(30))
                .as_deref(),
            Ok("ready"),
            "round {round}"
        );
        // A spread of moments: inside a commit, a snapshot copy or the journal's compaction.
        std::thread::sleep(std::time::Duration::from_millis(20 + (round * 37) % 150));
        child.kill().expect("SIGKILL");
        child.wait().expect("reaped");
        reader.join().expect("reader");
        acknowledged.extend(rx.try_iter().filter_map(|line| {
            line.strip_prefix("tag ")
                .map(|id| uuid::Uuid::parse_str(id).expect("a uuid"))
        }));
        let lib = Library::open(&home, "lib", keel_tests::PASSWORD).expect("opens after a kill");
        compacted = compacted.max(lib.status().expect("status").journal.compacted_to);
        lib.close().expect("closes");
    }
    assert!(compacted > 0, "no compaction ran before a kill");
    let lib = Library::open(&home, "lib", keel_tests::PASSWORD).expect("opens");
    let scratch: Vec<_> = std::fs::read_dir(home.library_dir("lib"))
        .expect("lists")
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|n| n.starts_with("snapshot") && n.contains("incoming"))
        .collect();
    assert!(scratch.is_empty(), "left by a cut compaction: {scratch:?}");
    for id in &acknowledged {
        assert!(
            lib.get::<Tag>(*id).expect("reads").is_some(),
            "acknowledged tag {id} is missing"
        );
    }
    let (report, outcome) = lib.verify().expect("verifies");
    assert!(report.faults.is_empty(), "{:?}", report.faults);
    let digest = outcome.expect("projections equal the snapshot plus a replay");
    lib.rebuild(&mut |_, _| {}).expect("rebuilds");
    assert_eq!(lib.digest().expect("digest"), digest);
    assert!(
        acknowledged.len() > 100,
        "{} acknowledged",
        acknowledged.len()
    );
}

/// Names of the tags a library holds.
fn tag_names(lib: &Library) -> std::collections::BTreeSet<String> {
    lib.read(|p| p.query().select::<Tag, _>("1 = 1", []))
        .expect("reads")
        .into_iter()
        .map(|t| t.name)
        .collect()
}

/// Deletes the tags of `lib` named in `names`.
fn delete_tags(lib: &Library, names: &[String]) {
    let doomed: Vec<Tag> = lib
        .read(|p| p.query().select::<Tag, _>("1 = 1", []))
        .expect("reads")
        .into_iter()
        .filter(|t| names.contains(&t.name))
        .collect();
    assert_eq!(doomed.len(), names.len());
    lib.transact(|tx| {
        for t in &doomed {
            tx.delete::<Tag>(t.uuid);
        }
        Ok(())
    })
    .expect("deletes");
}

/// A founder `a` that keeps `retain` log entries for an absent device, with tags named `bulk`,
/// and a device `b` that joined it, committed a tag (`made on b while away`) while cut off and
/// stopped: `a`'s home and node, `b`'s home and address.
fn founder_and_away_device(
    dir: &std::path::Path,
    retain: u64,
    bulk: &[String],
) -> (
    keel_engine::Home,
    keel_node::Node,
    keel_engine::Home,
    std::net::SocketAddr,
) {
    use keel_tests::cluster;
    let options = keel_node::NodeOptions {
        retain_for_absent: Some(retain),
        compact_after: None,
        ..cluster::options(Vec::new())
    };
    let (ha, a) = cluster::founder_with(dir, "a", "lib", options).expect("founds");
    tags(a.library(), bulk.iter().cloned());
    let (hb, b) = cluster::joiner(dir, "b", &a).expect("joins");
    cluster::converge(&[&a, &b], std::time::Duration::from_secs(30)).expect("converges");
    let b_addr = b.local_addr();
    // Acknowledged on b while it is cut off: it must reach a in the end.
    b.set_offline(true);
    tags(
        b.library(),
        std::iter::once("made on b while away".to_string()),
    );
    b.library().flush().expect("flushes");
    b.stop().expect("stops");
    (ha, a, hb, b_addr)
}

/// `a` compacts as soon as its rule passes the absent device (it keeps `retain` entries).
/// The end is the journal's: the node's status is published by its core, which may not have
/// seen the last commits yet.
fn compact_past_the_away_device(a: &keel_node::Node, retain: u64) -> keel_engine::CompactReport {
    a.library().flush().expect("flushes");
    let end = a.library().status().expect("status").journal.last_lsn;
    wait_status(a, "the rule to pass the absent device", |s| {
        s.log_len >= end && s.compactable + retain >= end
    });
    let report = a.compact().expect("compacts");
    assert!(
        report.base + retain >= end && report.dropped > 0,
        "{report:?}"
    );
    report
}

/// [`founder_and_away_device`] keeping 10 entries for the absent, then `tags_meanwhile` new
/// tags on the founder and a compaction past the away device: it must backfill `tags` rows and more.
fn away_past_compaction(
    dir: &std::path::Path,
    tags_meanwhile: usize,
) -> (
    keel_engine::Home,
    keel_node::Node,
    keel_engine::Home,
    std::net::SocketAddr,
) {
    let (ha, a, hb, b_addr) = founder_and_away_device(dir, 10, &[]);
    tags(
        a.library(),
        (0..tags_meanwhile).map(|i| format!("while b was away {i}")),
    );
    compact_past_the_away_device(&a, 10);
    (ha, a, hb, b_addr)
}

/// `lib`'s backfill job in `state`, if any.
fn backfill_job(lib: &Library, state: keel_engine::JobState) -> Option<keel_engine::Job> {
    lib.jobs()
        .expect("jobs")
        .into_iter()
        .find(|j| matches!(j.kind, keel_engine::JobKind::Backfill { .. }) && j.state == state)
}

/// A device away across two compactions (the leader keeps 50 entries for an absent device)
/// comes back behind the compaction point: it backfills from the leader's snapshot, starts
/// its log again after the base, pushes what it committed while away, and converges. What
/// was deleted meanwhile stays deleted there, and it rebuilds to the same digest.
#[test]
fn a_device_offline_across_two_compactions_catches_up_by_backfill() {
    use keel_tests::cluster;
    use std::time::Duration;
    let dir = tempfile::tempdir().expect("tempdir");
    let bulk: Vec<String> = (0..100).map(|i| format!("bulk {i}")).collect();
    let (_ha, a, hb, b_addr) = founder_and_away_device(dir.path(), 50, &bulk);

    let mut bases = Vec::new();
    for round in 0..2 {
        delete_tags(a.library(), &bulk[round * 10..round * 10 + 10]);
        tags(a.library(), (0..200).map(|i| format!("round {round} {i}")));
        bases.push(compact_past_the_away_device(&a, 50).base);
    }
    assert!(bases[1] > bases[0]);

    let b = cluster::restart(&hb, "lib", b_addr).expect("restarts");
    let digest = cluster::converge(&[&a, &b], Duration::from_secs(60)).expect("converges");
    wait_status(&b, "b's log to start after a base", |s| {
        s.compacted_to >= bases[1]
    });
    let names = tag_names(b.library());
    assert_eq!(names, tag_names(a.library()));
    assert!(
        names.contains("made on b while away"),
        "pushed after the backfill"
    );
    for gone in &bulk[..20] {
        assert!(!names.contains(gone), "{gone} came back");
    }
    assert_eq!(names.len(), 100 - 20 + 400 + 1);
    let jobs = b.library().jobs().expect("jobs");
    let backfill = jobs
        .iter()
        .find(|j| matches!(j.kind, keel_engine::JobKind::Backfill { .. }))
        .expect("a backfill job");
    assert_eq!(backfill.state, keel_engine::JobState::Completed);
    assert!(backfill.progress.total > 0);
    assert_eq!(
        backfill.progress.done, backfill.progress.total,
        "exact row counts"
    );
    b.library().rebuild(&mut |_, _| {}).expect("rebuilds");
    assert_eq!(b.library().digest().expect("digest"), digest);
    // The leader's unpacked copy goes once no backfill reads it.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !serving_copies(&a).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the leader kept its unpacked snapshot"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    b.stop().expect("stops");
    a.stop().expect("stops");
}

/// Two compactions at once (a node's own and one asked through its control socket), and a
/// verify while compactions go on: each either compacts or finds nothing to do, none fails on
/// the other's files or on log positions dropped under it.
#[test]
fn compactions_at_once_and_a_verify_meanwhile_do_not_trip_on_each_other() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_home, lib) = create_library(dir.path(), "lib").expect("creates");
    tags(&lib, (0..2_000).map(|i| format!("tag {i}")));
    std::thread::scope(|s| {
        let compacting: Vec<_> = (0..2)
            .map(|t| {
                let lib = &lib;
                s.spawn(move || {
                    for round in 0..15 {
                        tags(lib, (0..100).map(|i| format!("t{t} r{round} {i}")));
                        lib.flush().expect("flushes");
                        lib.compact(last(lib)).expect("compacts");
                    }
                })
            })
            .collect();
        let verifying = s.spawn(|| {
            for _ in 0..5 {
                let (report, outcome) = lib.verify().expect("verifies");
                assert!(report.faults.is_empty(), "{:?}", report.faults);
                outcome.expect("projections match");
            }
        });
        for t in compacting {
            t.join().expect("a compaction thread");
        }
        verifying.join().expect("the verify thread");
    });
    assert_eq!(lib.status().expect("status").counts.tags, 5_000);
}

/// Reads another library's snapshot, at most `cap` rows at a time (as a leader caps a batch
/// by bytes), and is cut after `left` batches of tags.
struct CutSource {
    from: std::sync::Arc<keel_engine::SnapshotSource>,
    left: usize,
    given: u64,
    cap: usize,
}

impl keel_engine::BackfillSource for CutSource {
    fn batch(
        &mut self,
        part: &keel_engine::Part,
        cursor: keel_engine::PartCursor,
        limit: usize,
    ) -> Result<(Vec<Vec<u8>>, bool), EngineError> {
        if part.table == "tag" {
            if self.left == 0 {
                return Err(EngineError::Backfill("the connection was cut".into()));
            }
            self.left -= 1;
        }
        let rows = self.from.rows(part, cursor, limit.min(self.cap))?;
        self.given += rows.len() as u64;
        let done = rows.len() < limit.min(self.cap);
        Ok((rows, done))
    }
}

/// A compacted library with `n` tags, its snapshot as a backfill reads it, and a fresh
/// library to backfill (both under `dir`).
fn snapshot_and_fresh_library(
    dir: &std::path::Path,
    n: usize,
) -> (
    std::sync::Arc<keel_engine::SnapshotSource>,
    keel_engine::BackfillPlan,
    Library,
) {
    let (_ha, a) = create_library(&dir.join("a"), "lib").expect("creates");
    tags(&a, (0..n).map(|i| format!("tag {i}")));
    a.flush().expect("flushes");
    a.compact(last(&a)).expect("compacts");
    let source = a.snapshot_source().expect("a snapshot to read");
    let plan = source.plan().clone();
    let (_hb, b) = create_library(&dir.join("b"), "lib").expect("creates");
    (source, plan, b)
}

/// A backfill cut after two batches of tags fails, leaves the library as it was, and the next one
/// of the same snapshot goes on from its last batch.
#[test]
fn a_cut_backfill_resumes_from_its_last_batch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (source, plan, b) = snapshot_and_fresh_library(dir.path(), 10_000);
    assert!(plan.rows() > 10_000, "{}", plan.rows());
    let digest_before = b.digest().expect("digest");
    let from = keel_engine::DeviceId([7; 32]);
    let mut cut = CutSource {
        from: source.clone(),
        left: 2,
        given: 0,
        cap: usize::MAX,
    };
    let error = b
        .backfill(from, &plan, &mut cut, &mut |_, _| {})
        .expect_err("cut");
    assert!(matches!(error, EngineError::Backfill(_)), "{error}");
    assert_eq!(b.digest().expect("digest"), digest_before, "unchanged");
    let kept = cut.given;
    assert!(kept >= 2 * keel_engine::BACKFILL_BATCH as u64, "{kept}");
    let mut rest = CutSource {
        from: source,
        left: usize::MAX,
        given: 0,
        cap: usize::MAX,
    };
    let mut seen = Vec::new();
    let report = b
        .backfill(from, &plan, &mut rest, &mut |done, total| {
            seen.push((done, total))
        })
        .expect("goes on");
    assert_eq!(report.rows, plan.rows());
    assert_eq!(report.pulled, plan.rows() - kept, "what arrived was kept");
    assert_eq!(rest.given, report.pulled, "and not asked again");
    assert_eq!(seen.first().map(|s| s.0), Some(kept));
    assert_eq!(seen.last(), Some(&(plan.rows(), plan.rows())));
    assert!(b.dir().join(keel_engine::SNAPSHOT_FILE).exists());
    assert!(
        b.dir().join(keel_engine::BACKFILL_FILE).exists(),
        "kept for the rebase"
    );
}

/// A leader caps a batch by its bytes: a short batch that is not the last is followed by the
/// rest of its part.
#[test]
fn a_backfill_takes_short_batches_that_are_not_the_last() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (source, plan, b) = snapshot_and_fresh_library(dir.path(), 3_000);
    let mut capped = CutSource {
        from: source,
        left: usize::MAX,
        given: 0,
        cap: 1_000,
    };
    let report = b
        .backfill(
            keel_engine::DeviceId([7; 32]),
            &plan,
            &mut capped,
            &mut |_, _| {},
        )
        .expect("takes every batch");
    assert_eq!((report.rows, capped.given), (plan.rows(), plan.rows()));
}

/// `kill -9` of a device in the middle of its backfill, again and again: each start goes on
/// from the last batch it kept, and in the end it converges with nothing it acknowledged lost.
#[test]
fn a_backfill_killed_midway_goes_on_and_loses_nothing() {
    use keel_tests::cluster;
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    use std::time::Duration;
    let dir = tempfile::tempdir().expect("tempdir");
    let (_ha, a, hb, b_addr) = away_past_compaction(dir.path(), 15_000);

    let scratch = hb.library_dir("lib").join(keel_engine::BACKFILL_FILE);
    let mut cut = 0;
    for round in 0..10u64 {
        let mut child = Command::new(env!("CARGO_BIN_EXE_crash_child"))
            .arg(hb.root())
            .arg("lib")
            .arg("serve")
            .arg(a.local_addr().to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("child starts");
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = crossbeam_channel::unbounded::<String>();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(30)).as_deref(),
            Ok("ready"),
            "round {round}"
        );
        // A spread of moments: before the backfill, inside it, at its end.
        std::thread::sleep(Duration::from_millis(100 + (round * 97) % 700));
        child.kill().expect("SIGKILL");
        child.wait().expect("reaped");
        reader.join().expect("reader");
        if rx.try_iter().any(|line| line == "done") {
            break;
        }
        cut += usize::from(scratch.exists());
    }
    assert!(cut > 0, "no kill landed inside the backfill");
    let b = cluster::restart(&hb, "lib", b_addr).expect("restarts");
    let digest = cluster::converge(&[&a, &b], Duration::from_secs(60)).expect("converges");
    let names = tag_names(b.library());
    assert_eq!(names, tag_names(a.library()));
    assert!(
        names.contains("made on b while away"),
        "acknowledged, then killed"
    );
    assert!(backfill_job(b.library(), keel_engine::JobState::Completed).is_some());
    b.library().rebuild(&mut |_, _| {}).expect("rebuilds");
    assert_eq!(b.library().digest().expect("digest"), digest);
    b.stop().expect("stops");
    a.stop().expect("stops");
}

/// What a hostile leader may send a backfill.
#[derive(Clone, Copy, Debug)]
enum Lie {
    /// The batches of tags in reverse order.
    OutOfOrder,
    /// A tag row twice.
    Repeated,
    /// The tags end early.
    Short,
    /// None: the rows as they are.
    None,
}

/// Reads another library's snapshot, and lies about the tags.
struct LyingSource {
    from: std::sync::Arc<keel_engine::SnapshotSource>,
    lie: Lie,
}

impl keel_engine::BackfillSource for LyingSource {
    fn batch(
        &mut self,
        part: &keel_engine::Part,
        cursor: keel_engine::PartCursor,
        limit: usize,
    ) -> Result<(Vec<Vec<u8>>, bool), EngineError> {
        let mut rows = self.from.rows(part, cursor, limit)?;
        let mut done = rows.len() < limit;
        if part.table == "tag" {
            match self.lie {
                Lie::OutOfOrder => rows.reverse(),
                Lie::Repeated => {
                    let first = rows[0].clone();
                    rows.insert(1, first);
                }
                Lie::Short => {
                    rows.truncate(rows.len() / 2);
                    done = true;
                }
                Lie::None => {}
            }
        }
        Ok((rows, done))
    }
}

/// Rows out of order, a row twice, a part that ends short of its count, or a plan of other
/// models: each stops the backfill with a typed error and leaves the library as it was.
#[test]
fn a_lying_leader_stops_the_backfill_and_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (source, plan, b) = snapshot_and_fresh_library(dir.path(), 500);
    let before = b.digest().expect("digest");
    let from = keel_engine::DeviceId([7; 32]);
    for lie in [Lie::OutOfOrder, Lie::Repeated, Lie::Short] {
        let mut lying = LyingSource {
            from: source.clone(),
            lie,
        };
        let error = b
            .backfill(from, &plan, &mut lying, &mut |_, _| {})
            .expect_err("refused");
        assert!(
            matches!(error, EngineError::Backfill(_)),
            "{lie:?}: {error}"
        );
        assert_eq!(b.digest().expect("digest"), before, "{lie:?}");
        assert!(
            !b.dir().join(keel_engine::SNAPSHOT_FILE).exists(),
            "{lie:?}"
        );
    }
    let mut other = plan.clone();
    other.parts.retain(|(p, _)| p.table != "tag");
    let mut honest = LyingSource {
        from: source,
        lie: Lie::Short,
    };
    let error = b
        .backfill(from, &other, &mut honest, &mut |_, _| {})
        .expect_err("refused");
    assert!(matches!(error, EngineError::Backfill(_)), "{error}");
}

/// A new device that joins a compacted library without the projection file (the initial sync
/// left to replication) is behind the compaction point from its first step: it backfills, and
/// converges.
#[test]
fn a_new_device_without_the_file_copy_joins_by_backfill() {
    use keel_tests::cluster;
    use std::time::Duration;
    let dir = tempfile::tempdir().expect("tempdir");
    let keeping = keel_node::NodeOptions {
        snapshot_keep: Duration::from_secs(60),
        ..cluster::options(Vec::new())
    };
    let (_ha, a) = cluster::founder_with(dir.path(), "a", "lib", keeping).expect("founds");
    tags(a.library(), (0..2_000).map(|i| format!("bulk {i}")));
    a.library().flush().expect("flushes");
    let report = a.compact().expect("compacts: alone, all of it");
    assert!(report.base > 2_000, "{report:?}");
    let joined = |device: &str| {
        let home = keel_engine::Home::new(dir.path().join(device));
        let code = a.invite(true).expect("invites").code.as_str().to_string();
        let name =
            cluster::join_with(&home, None, a.local_addr(), &code, None, false).expect("joins");
        let lib = Library::open(&home, &name, keel_tests::PASSWORD).expect("opens");
        keel_node::Node::start(lib, cluster::options(vec![a.local_addr()])).expect("starts")
    };
    let b = joined("b");
    cluster::converge(&[&a, &b], Duration::from_secs(60)).expect("converges");
    // The leader keeps its unpacked snapshot a while: the next backfill reads the same copy.
    let kept = serving_copies(&a);
    assert_eq!(kept.len(), 1, "one unpacked copy kept: {kept:?}");
    let c = joined("c");
    let digest = cluster::converge(&[&a, &b, &c], Duration::from_secs(60)).expect("converges");
    assert_eq!(
        serving_copies(&a),
        kept,
        "the second backfill read the kept copy"
    );
    c.stop().expect("stops");
    assert!(b.status().compacted_to >= report.base, "{:?}", b.status());
    assert_eq!(tag_names(b.library()), tag_names(a.library()));
    assert!(b.library().jobs().expect("jobs").iter().any(|j| matches!(
        j.kind,
        keel_engine::JobKind::Backfill { .. }
    ) && j.state
        == keel_engine::JobState::Completed));
    b.library().rebuild(&mut |_, _| {}).expect("rebuilds");
    assert_eq!(b.library().digest().expect("digest"), digest);
    b.stop().expect("stops");
    a.stop().expect("stops");
}

/// A backfill its user cancels stops: the device stays behind for a while, and keeps what it
/// pulled for the backfill that goes on later.
#[test]
fn a_cancelled_backfill_stops_and_keeps_what_it_pulled() {
    use keel_tests::cluster;
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().expect("tempdir");
    let (_ha, a, hb, b_addr) = away_past_compaction(dir.path(), 40_000);

    let b = cluster::restart(&hb, "lib", b_addr).expect("restarts");
    let backfill = |state| backfill_job(b.library(), state);
    let deadline = Instant::now() + Duration::from_secs(30);
    let running = loop {
        if let Some(job) = backfill(keel_engine::JobState::Running) {
            break job;
        }
        assert!(Instant::now() < deadline, "no backfill started");
        assert!(
            backfill(keel_engine::JobState::Completed).is_none(),
            "done before it could be cancelled"
        );
        std::thread::sleep(Duration::from_millis(2));
    };
    b.library().cancel_job(running.id).expect("cancels");
    let deadline = Instant::now() + Duration::from_secs(10);
    while backfill(keel_engine::JobState::Cancelled).is_none() {
        assert!(Instant::now() < deadline, "the cancel was not heard");
        std::thread::sleep(Duration::from_millis(10));
    }
    // It stays stopped (a node tries again only after a while), behind, with its batches kept.
    let quiet = Instant::now() + Duration::from_secs(4);
    while Instant::now() < quiet {
        assert!(
            backfill(keel_engine::JobState::Running).is_none(),
            "started again at once"
        );
        assert!(backfill(keel_engine::JobState::Completed).is_none());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(b.status().behind_compaction > 0, "{:?}", b.status());
    assert!(hb
        .library_dir("lib")
        .join(keel_engine::BACKFILL_FILE)
        .exists());
    b.stop().expect("stops");
    a.stop().expect("stops");
}

/// The unpacked snapshot copies in `node`'s library folder, by name.
fn serving_copies(node: &keel_node::Node) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(node.library().dir())
        .expect("lists")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("serving-") && name.ends_with(".from-snapshot"))
        .collect();
    names.sort();
    names
}

/// A device that gets the log from its leader is not behind its compaction point: a backfill
/// it pulled before and never put to use (a new leader that still had the log) is removed.
#[test]
fn an_unused_backfill_goes_once_the_log_comes() {
    use keel_tests::cluster;
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().expect("tempdir");
    let (_ha, a, hb, b_addr) = founder_and_away_device(dir.path(), u64::MAX, &[]);
    let scratch = hb.library_dir("lib").join(keel_engine::BACKFILL_FILE);
    std::fs::write(&scratch, b"a backfill cut short").expect("writes");
    tags(
        a.library(),
        (0..10).map(|i| format!("while b was away {i}")),
    );
    let b = cluster::restart(&hb, "lib", b_addr).expect("restarts");
    cluster::converge(&[&a, &b], Duration::from_secs(30)).expect("converges");
    let deadline = Instant::now() + Duration::from_secs(10);
    while scratch.exists() {
        assert!(Instant::now() < deadline, "the unused backfill stayed");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(b.status().behind_compaction, 0);
    b.stop().expect("stops");
    a.stop().expect("stops");
}

/// Tags made while the device of [`a_backfill_of_100k_tags_stays_under_its_memory_bound`] is
/// away: its backfill pulls about four snapshot rows per tag, over all the snapshot's tables.
const BACKFILL_TAGS: usize = 100_000;
/// Most resident memory a device backfilling [`BACKFILL_TAGS`] tags may take, in MiB. Measured
/// (debug build): 50 MiB for 25k tags (100k rows), 72 for 100k (400k rows). `keel bench`
/// reports the same at 1M entries (`p4_backfill_peak_rss_mb`, about 190 MB in release).
const BACKFILL_BOUND_MB: u64 = 120;

/// A device away past a compaction of 100k tags backfills them in a child process whose peak
/// memory stays under a bound (issue 29): batches go to disk as they come, nothing holds the
/// whole snapshot.
#[test]
fn a_backfill_of_100k_tags_stays_under_its_memory_bound() {
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().expect("tempdir");
    let (_ha, a, hb, _) = away_past_compaction(dir.path(), BACKFILL_TAGS);
    let out = Command::new(env!("CARGO_BIN_EXE_crash_child"))
        .arg(hb.root())
        .arg("lib")
        .arg("serve")
        .arg(a.local_addr().to_string())
        .stderr(Stdio::null())
        .output()
        .expect("the child runs");
    assert!(out.status.success(), "the backfilling child failed");
    let keel_tests::ChildReport {
        done,
        total,
        peak_mib,
    } = keel_tests::ChildReport::from_stdout(&out.stdout);
    assert!(
        done == total && total >= BACKFILL_TAGS,
        "backfilled {done} of {total}"
    );
    eprintln!(
        "backfill of {total} rows: peak RSS {} MiB (bound {BACKFILL_BOUND_MB})",
        peak_mib
    );
    assert!(
        peak_mib <= BACKFILL_BOUND_MB,
        "the backfill of {total} rows peaked at {} MiB, over {BACKFILL_BOUND_MB}",
        peak_mib
    );
}

/// A paired device may ask the leader's snapshot for any batch in any order. The leader reads
/// the next batch in turn ahead of each request (decision 0070); an answer still holds exactly
/// the rows asked for, whether or not the request is the one read ahead; a streaming request
/// gets the rest of its part in turn (decision 0075); and a request outside the plan ends the
/// connection and nothing else.
#[test]
fn backfill_answers_hold_the_rows_asked_for_in_any_order() {
    use keel_transport::{DeviceMessage, Endpoint, Identity, Pins};
    let dir = tempfile::tempdir().expect("tempdir");
    let bulk: Vec<String> = (0..9_000).map(|i| format!("bulk {i}")).collect();
    let (_ha, a, hb, _) = founder_and_away_device(dir.path(), 10, &bulk);
    tags(a.library(), (0..20).map(|i| format!("later {i}")));
    compact_past_the_away_device(&a, 10);
    let source = a.library().snapshot_source().expect("a snapshot to read");
    let part = source
        .plan()
        .parts
        .iter()
        .map(|(p, _)| p.clone())
        .find(|p| p.table == "tag")
        .expect("tags in the plan");
    let expected = |after: Option<uuid::Uuid>, limit: usize| {
        let cursor = keel_engine::PartCursor { after, skip: 0 };
        source.rows(&part, cursor, limit).expect("reads")
    };
    let device = hb.device().expect("b's identity");
    let identity = Identity::from_parts(device.cert_der, device.key_der);
    let (library, leader, addr) = (a.library().id(), a.library().device_id(), a.local_addr());
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let pins = Pins::new();
        pins.pin(leader);
        let local = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        let endpoint = Endpoint::bind(&identity, local, pins).expect("binds");
        let conn = endpoint.connect(addr).await.expect("connects");
        assert!(matches!(conn.recv().await, Ok(DeviceMessage::Hello { .. })));
        let request = DeviceMessage::BackfillRequest { library };
        conn.send(&request).await.expect("asks");
        assert!(matches!(
            conn.recv().await,
            Ok(DeviceMessage::BackfillPlan { .. })
        ));
        let model = part.model.expect("a model's part");
        let ask_as = |model: u8, after: Option<uuid::Uuid>, limit: u32, stream: bool| {
            DeviceMessage::SyncPullModelBatchRequest {
                model,
                after,
                limit,
                range: None,
                table: None,
                skip: 0,
                stream,
            }
        };
        let ask = |model, after, limit| ask_as(model, after, limit, false);
        // In turn, then the start again, then what follows a short batch, then a batch
        // after the one read ahead, skipping it.
        let first = expected(None, 4096);
        let after_first = keel_engine::image_uuid(&first[4095]);
        let short_end = keel_engine::image_uuid(&first[99]);
        let skipped = expected(after_first, 4096);
        let beyond = keel_engine::image_uuid(&skipped[4095]);
        for (after, limit) in [
            (None, 4096),
            (None, 100),
            (short_end, 4096),
            (beyond, 4096),
            (after_first, 4096),
        ] {
            conn.send(&ask(model, after, limit)).await.expect("asks");
            let rows = match conn.recv().await.expect("an answer") {
                DeviceMessage::SyncPullModelBatchResponse {
                    packed, raw_len, ..
                } => unpack(&packed, raw_len),
                other => panic!("not rows: {other:?}"),
            };
            assert_eq!(rows, expected(after, limit as usize), "after {after:?}");
            assert!(!rows.is_empty());
        }
        // A stream from the short batch's end: every batch after it in turn, unasked, then
        // the connection answers a request again.
        conn.send(&ask_as(model, short_end, 4096, true))
            .await
            .expect("asks");
        let (mut rows, mut batches) = (Vec::new(), 0);
        loop {
            match conn.recv().await.expect("a batch") {
                DeviceMessage::SyncPullModelBatchResponse {
                    packed,
                    raw_len,
                    done,
                    ..
                } => {
                    rows.extend(unpack(&packed, raw_len));
                    batches += 1;
                    if done {
                        break;
                    }
                }
                other => panic!("not rows: {other:?}"),
            }
        }
        assert_eq!(
            rows,
            expected(short_end, 1 << 20),
            "the rest of the part, in order"
        );
        assert_eq!(batches, rows.len() / 4096 + 1);
        conn.send(&ask(model, None, 100)).await.expect("asks");
        assert!(matches!(
            conn.recv().await,
            Ok(DeviceMessage::SyncPullModelBatchResponse { .. })
        ));
        conn.send(&ask(200, None, 10)).await.expect("asks");
        assert!(
            conn.recv().await.is_err(),
            "a part outside the plan ends it"
        );
        endpoint.close();
    });
    assert_eq!(tag_names(a.library()).len(), 9_000 + 20);
    a.stop().expect("stops");
}

/// Length-prefixed row images from one zstd frame.
fn unpack(packed: &[u8], raw_len: u32) -> Vec<Vec<u8>> {
    let raw = zstd::bulk::decompress(packed, raw_len as usize).expect("unpacks");
    let mut rows = Vec::new();
    let mut rest = &raw[..];
    while let Some((len, tail)) = rest.split_first_chunk::<4>() {
        let len = u32::from_be_bytes(*len) as usize;
        rows.push(tail[..len].to_vec());
        rest = &tail[len..];
    }
    rows
}

/// A tag renamed on `a` with a clock ten minutes ahead, then compacted into `a`'s snapshot to
/// its log's end: the rename crosses only inside a snapshot.
fn rename_ahead_and_compact(a: &keel_node::Node, tag: &Tag) {
    let ahead = keel_schema::Hlc {
        physical_ms: keel_engine::now_ms() + 600_000,
        counter: 0,
        device: a.library().device_id(),
    };
    let renamed = Tag {
        name: "from a clock ahead".into(),
        ..tag.clone()
    };
    let change = keel_schema::Change::upsert(keel_schema::ChangeId::new(), ahead, &renamed)
        .expect("sync-ready");
    a.library()
        .transact(|tx| {
            tx.push(change);
            Ok(())
        })
        .expect("a renames");
    a.library().flush().expect("flushes");
    let end = last(a.library());
    let report = a.library().compact(end).expect("compacts");
    assert_eq!(report.base, end.0, "{report:?}");
}

/// Renames `tag` on `node` to what it now reads there, then checks that every node holds the
/// new name once converged.
fn rename_after_seeing(node: &keel_node::Node, all: &[&keel_node::Node], tag: &Tag) {
    let seen = node
        .library()
        .get::<Tag>(tag.uuid)
        .expect("reads")
        .expect("the tag");
    assert_eq!(seen.name, "from a clock ahead");
    let name = format!("seen on {} and renamed", node.library().device_id());
    node.library()
        .transact(|tx| {
            tx.upsert(&Tag {
                name: name.clone(),
                ..seen
            });
            Ok(())
        })
        .expect("renames what it sees");
    keel_tests::cluster::converge(all, std::time::Duration::from_secs(60)).expect("converges");
    for n in all {
        let now = n.library().get::<Tag>(tag.uuid).expect("reads");
        assert_eq!(
            now.map(|t| t.name),
            Some(name.clone()),
            "the later rename lost"
        );
    }
}

/// A device's clock observes the clocks of a snapshot it takes in, as it does those of the
/// changes it applies: a device that came back by backfill, and a new device that joined from
/// the file copy, each rename a tag after seeing a rename stamped ten minutes ahead that
/// reached them only inside the leader's snapshot. Their renames were made later and win.
#[test]
fn a_rename_made_after_a_snapshot_from_a_clock_ahead_wins() {
    use keel_tests::cluster;
    use std::time::Duration;
    let dir = tempfile::tempdir().expect("tempdir");
    let bulk = vec!["holiday".to_string()];
    let (_ha, a, hb, b_addr) = founder_and_away_device(dir.path(), 10, &bulk);
    let tag = a
        .library()
        .read(|p| p.query().select::<Tag, _>("name = 'holiday'", []))
        .expect("reads")
        .remove(0);
    rename_ahead_and_compact(&a, &tag);

    let b = cluster::restart(&hb, "lib", b_addr).expect("restarts");
    cluster::converge(&[&a, &b], Duration::from_secs(60)).expect("converges");
    assert!(
        backfill_job(b.library(), keel_engine::JobState::Completed).is_some(),
        "b came back by backfill"
    );
    rename_after_seeing(&b, &[&a, &b], &tag);

    rename_ahead_and_compact(&a, &tag);
    let (_hc, c) = cluster::joiner(dir.path(), "c", &a).expect("joins");
    cluster::converge(&[&a, &b, &c], Duration::from_secs(60)).expect("converges");
    rename_after_seeing(&c, &[&a, &b, &c], &tag);
    for node in [c, b, a] {
        node.stop().expect("stops");
    }
}

/// A leader's backfill plan whose clock is further ahead than the journal accepts a change's
/// (`CLOCK_AHEAD_MAX_MS`) is refused, and this device's clock stays where it was: a device
/// that misbehaves cannot push another's clock years ahead, where every later change of it
/// would win.
#[test]
fn a_backfill_plan_with_a_clock_far_ahead_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (source, mut plan, b) = snapshot_and_fresh_library(dir.path(), 50);
    let ahead = keel_engine::now_ms() + keel_journal::CLOCK_AHEAD_MAX_MS + 3_600_000;
    plan.hlc.physical_ms = ahead;
    let from = keel_engine::DeviceId([7; 32]);
    let mut honest = LyingSource {
        from: source,
        lie: Lie::None,
    };
    let refused = b
        .backfill(from, &plan, &mut honest, &mut |_, _| {})
        .and_then(|_| b.rebase_onto(&plan, from).map(|_| ()));
    assert!(
        matches!(refused, Err(EngineError::Backfill(_))),
        "{refused:?}"
    );
    let floor = b.clock_floor().expect("a floor").expect("known");
    assert!(
        floor.physical_ms < ahead - 3_600_000,
        "the clock moved to the plan's: {floor:?}"
    );
}

/// A backfill plan whose base entry's epoch is past the epoch this device follows, or whose
/// log began in an epoch after its base's, is refused, and the log stays where it was: a leader
/// that misbehaves cannot start another device's log in an epoch no election made, which it
/// would then vote and stand from.
#[test]
fn a_backfill_plan_with_epochs_past_this_device_s_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (source, plan, b) = snapshot_and_fresh_library(dir.path(), 50);
    let from = keel_engine::DeviceId([7; 32]);
    let far = keel_schema::Epoch {
        counter: u64::MAX,
        device: from,
    };
    let mut past_ours = plan.clone();
    past_ours.base_epoch = far;
    past_ours.head = far;
    let mut head_after_base = plan.clone();
    head_after_base.head = far;
    for (what, lie) in [("base", past_ours), ("head", head_after_base)] {
        let mut honest = LyingSource {
            from: source.clone(),
            lie: Lie::None,
        };
        let refused = b
            .backfill(from, &lie, &mut honest, &mut |_, _| {})
            .and_then(|_| b.rebase_onto(&lie, from).map(|_| ()));
        assert!(
            matches!(refused, Err(EngineError::Backfill(_))),
            "{what}: {refused:?}"
        );
        let status = b.status().expect("status");
        assert_eq!(status.journal.compacted_to, 0, "{what}: the log moved");
    }
}

/// A plan whose row counts add up past `u64::MAX` is refused with a typed error (its parts end
/// short of their counts), not a panic on the total.
#[test]
fn a_backfill_plan_with_counts_past_u64_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (source, mut plan, b) = snapshot_and_fresh_library(dir.path(), 50);
    for (_, rows) in plan.parts.iter_mut() {
        *rows = u64::MAX;
    }
    let mut honest = LyingSource {
        from: source,
        lie: Lie::None,
    };
    let refused = b.backfill(
        keel_engine::DeviceId([7; 32]),
        &plan,
        &mut honest,
        &mut |_, _| {},
    );
    assert!(
        matches!(refused, Err(EngineError::Backfill(_))),
        "{refused:?}"
    );
}
