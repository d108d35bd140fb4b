//! Storage faults under a running node (issue 29): the disk of a follower fails while its
//! leader replicates to it. Real redb files, real QUIC on loopback; the faults come from the
//! journal's `faults` backend, below redb, where a disk fails.

use std::time::{Duration, Instant};

use keel_engine::{Home, Library};
use keel_journal::faults::{inject, FaultKind, FaultOp, Faults};
use keel_tests::{cluster, tag};

fn tags(lib: &Library, names: impl Iterator<Item = String>) {
    let tags: Vec<_> = names.map(|n| tag(&n)).collect();
    lib.transact(|tx| {
        for t in &tags {
            tx.upsert(t);
        }
        Ok(())
    })
    .expect("commits");
}

fn last_lsn(lib: &Library) -> u64 {
    lib.status().expect("status").journal.last_lsn
}

/// Test options for a node that does not read its log back when it starts: its damage at rest
/// is left for the test to find (`repair_log`, the scrub, a read).
fn without_start_check(
    listen: std::net::SocketAddr,
    peers: Vec<std::net::SocketAddr>,
) -> keel_node::NodeOptions {
    keel_node::NodeOptions {
        listen,
        check_log_at_start: false,
        ..cluster::options(peers)
    }
}

/// A follower whose every sync fails (`EIO`) stores nothing of what its leader sends: it
/// acknowledges none of it (the leader's view of what it holds stays where its disk stopped),
/// and refuses its own commits. Once the disk works again it opens its journal again by itself
/// (no restart) and catches up.
#[test]
fn a_follower_whose_disk_fails_acknowledges_nothing_and_catches_up_when_it_recovers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_ha, a) = cluster::founder(dir.path(), "a", "lib").expect("founds");
    let faults = Faults::new();
    let journal = Home::new(dir.path().join("b"))
        .library_dir("lib")
        .join("journal.redb");
    inject(&journal, faults.clone());
    let (_hb, b) = cluster::joiner(dir.path(), "b", &a).expect("joins");
    tags(a.library(), (0..50).map(|i| format!("before {i}")));
    cluster::converge(&[&a, &b], Duration::from_secs(30)).expect("converges");
    let stored = last_lsn(b.library());
    let b_hex = b.library().device_id().to_hex();
    // What a holds b to have stored (its log's match) and applied (its acknowledgement).
    let held = |a: &keel_node::Node| {
        let status = a.status();
        let peer = status.peers.iter().find(|p| p.device_id == b_hex);
        let stored = peer.and_then(|p| p.stored).unwrap_or(0);
        let applied = peer
            .and_then(|p| p.applied)
            .map_or(0, |p| p.index.max(p.content));
        (stored, applied)
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while held(&a) < (stored, stored) {
        assert!(
            Instant::now() < deadline,
            "b never acknowledged {stored}: {:?}",
            held(&a)
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    faults.fail(FaultOp::Sync, 0, FaultKind::Io, true);
    tags(a.library(), (0..100).map(|i| format!("during {i}")));
    a.library().flush().expect("flushes");
    let watch_until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < watch_until {
        let (matched, applied) = held(&a);
        assert!(
            matched <= stored && applied <= stored,
            "a holds b to have stored {matched} and applied {applied}; its disk stopped at {stored} ({} faults)",
            faults.injected()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(faults.injected() > 0, "b tried to store what a sent");
    assert!(b.status().storage_failed, "{:?}", b.status());
    let refused = b.library().transact(|tx| {
        tx.upsert(&tag("made on b on a failing disk"));
        Ok(())
    });
    assert!(
        refused.is_err(),
        "a commit on a failing disk was acknowledged"
    );

    faults.clear();
    let end = last_lsn(a.library());
    let deadline = Instant::now() + Duration::from_secs(60);
    // Until b's journal opens again its status is a typed error ("unavailable").
    let stored = |lib: &Library| lib.status().map_or(0, |s| s.journal.last_lsn);
    while stored(b.library()) < end || held(&a).0 < end {
        assert!(
            Instant::now() < deadline,
            "b never stored the log again: {} of {end}, {:?}",
            stored(b.library()),
            b.status()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!b.status().storage_failed);
    cluster::converge(&[&a, &b], Duration::from_secs(60)).expect("converges");
    tags(b.library(), std::iter::once("made on b after".to_string()));
    cluster::converge(&[&a, &b], Duration::from_secs(30)).expect("converges again");
}

/// A founder `a` and a follower `b` that stored 36 log entries, then stopped with a byte of
/// its record at position 24 flipped (as a bad sector or someone with the file would), which
/// `verify` reports: `a`, `b`'s home, the log's end and the damaged position.
fn a_follower_damaged_at_rest(dir: &std::path::Path) -> (keel_node::Node, Home, u64, u64) {
    let (_, a) = cluster::founder(dir, "a", "lib").expect("founds");
    let (hb, b) = cluster::joiner(dir, "b", &a).expect("joins");
    for round in 0..3 {
        tags(a.library(), (0..10).map(|i| format!("a {round} {i}")));
    }
    cluster::converge(&[&a, &b], Duration::from_secs(30)).expect("converges");
    let end = last_lsn(b.library());
    b.stop().expect("stops");
    let damaged = end - 12;
    keel_tests::edit_log_page(
        &hb.library_dir("lib").join("journal.redb"),
        damaged,
        |bytes, record| {
            bytes[record.end - 1] ^= 0x40;
        },
    );
    let lib = Library::open(&hb, "lib", keel_tests::PASSWORD).expect("opens");
    let (report, _) = lib.verify().expect("verifies");
    assert_eq!(
        report.faults.len(),
        1,
        "the damage is seen: {:?}",
        report.faults
    );
    lib.close().expect("closes");
    (a, hb, end, damaged)
}

/// Waits until `b` stored the log to `end` again, then checks its log is sound and its
/// projections equal a replay at `a`'s digest.
fn fetched_again(a: &keel_node::Node, b: &keel_node::Node, end: u64) {
    let digest = cluster::converge(&[a, b], Duration::from_secs(30)).expect("converges");
    let deadline = Instant::now() + Duration::from_secs(30);
    while last_lsn(b.library()) < end
        || !b.library().verify().expect("verifies").0.faults.is_empty()
    {
        assert!(
            Instant::now() < deadline,
            "b never stored a sound log again"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (report, replayed) = b.library().verify().expect("verifies");
    assert!(
        report.faults.is_empty(),
        "still damaged: {:?}",
        report.faults
    );
    assert_eq!(replayed.expect("projections equal a replay"), digest);
    // What went back to pending (the readable changes after the damage) is settled: nothing
    // stays pending for good.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let pending = b.library().status().expect("status").journal.offline;
        if pending == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{pending} changes stay pending on b"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A follower's log record damaged at rest: `repair_log` (what `keel verify --repair` on a
/// node runs) finds it, drops the log from it on (its readable changes of its own go back to
/// pending) and the leader sends it again: a sound log at the leader's digest.
#[test]
fn a_follower_with_a_damaged_log_record_fetches_it_again_from_its_leader() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, hb, end, damaged) = a_follower_damaged_at_rest(dir.path());
    let lib = Library::open(&hb, "lib", keel_tests::PASSWORD).expect("opens");
    let options = without_start_check(cluster::options(vec![]).listen, vec![a.local_addr()]);
    let b = keel_node::Node::start(lib, options).expect("a node with a damaged log record starts");
    assert_eq!(b.repair_log().expect("repairs"), Some(damaged));
    fetched_again(&a, &b, end);
    assert_eq!(
        b.repair_log().expect("checks"),
        None,
        "nothing left to repair"
    );
}

/// The same damage found by the node's own scrub, without anyone asking.
#[test]
fn a_follower_s_scrub_finds_a_damaged_log_record_and_fetches_it_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, hb, end, _) = a_follower_damaged_at_rest(dir.path());
    let lib = Library::open(&hb, "lib", keel_tests::PASSWORD).expect("opens");
    let options = keel_node::NodeOptions {
        scrub_every: Some(Duration::from_millis(200)),
        ..without_start_check(cluster::options(vec![]).listen, vec![a.local_addr()])
    };
    let b = keel_node::Node::start(lib, options).expect("starts");
    fetched_again(&a, &b, end);
}

/// Three devices whose leader `a` has a log record damaged at rest: they stop, the record is
/// damaged in `a`'s journal, and `a` and `b` start again, `a` first, leading its epoch as
/// before; `c` starts again too, unless `c_behind`: then it was stopped before the last 30
/// changes and is left stopped (its home is returned). Returns the nodes, `c`'s home, the log's
/// end and the damaged position.
fn a_damaged_leader(
    dir: &std::path::Path,
    c_behind: bool,
) -> (Vec<keel_node::Node>, Home, std::net::SocketAddr, u64, u64) {
    a_damaged_leader_with(dir, c_behind, |listen| {
        without_start_check(listen, Vec::new())
    })
}

/// [`a_damaged_leader`], `a` restarted with `a_options` (given its address).
fn a_damaged_leader_with(
    dir: &std::path::Path,
    c_behind: bool,
    a_options: impl Fn(std::net::SocketAddr) -> keel_node::NodeOptions,
) -> (Vec<keel_node::Node>, Home, std::net::SocketAddr, u64, u64) {
    use keel_replication::ElectionRole;
    let (ha, a) = cluster::founder(dir, "a", "lib").expect("founds");
    let (hb, b) = cluster::joiner(dir, "b", &a).expect("joins");
    let (hc, c) = cluster::joiner(dir, "c", &a).expect("joins");
    tags(b.library(), (0..5).map(|i| format!("b {i}")));
    cluster::converge(&[&a, &b, &c], Duration::from_secs(30)).expect("converges");
    let addrs = [a.local_addr(), b.local_addr(), c.local_addr()];
    let mut c = Some(c);
    if c_behind {
        if let Some(c) = c.take() {
            c.stop().expect("stops");
        }
    }
    for round in 0..3 {
        tags(a.library(), (0..10).map(|i| format!("a {round} {i}")));
    }
    cluster::converge(&[&a, &b], Duration::from_secs(30)).expect("converges");
    let end = last_lsn(a.library());
    for node in [Some(b), c, Some(a)].into_iter().flatten() {
        node.stop().expect("stops");
    }
    let damaged = end - 12;
    keel_tests::edit_log_page(
        &ha.library_dir("lib").join("journal.redb"),
        damaged,
        |bytes, record| bytes[record.end - 1] ^= 0x40,
    );
    let a = cluster::restart_with(&ha, "lib", a_options(addrs[0])).expect("a restarts");
    assert_eq!(
        a.status().role,
        ElectionRole::Leader,
        "a leads its epoch again"
    );
    let mut nodes = vec![
        a,
        cluster::restart(&hb, "lib", addrs[1]).expect("b restarts"),
    ];
    if !c_behind {
        nodes.push(cluster::restart(&hc, "lib", addrs[2]).expect("c restarts"));
    }
    let a_id = nodes[0].status().leader.expect("a leads");
    let deadline = Instant::now() + Duration::from_secs(30);
    while nodes[1..]
        .iter()
        .any(|n| n.status().leader.as_deref() != Some(a_id.as_str()))
    {
        assert!(Instant::now() < deadline, "the others never followed a");
        std::thread::sleep(Duration::from_millis(20));
    }
    (nodes, hc, addrs[2], end, damaged)
}

/// Waits until one of `others` leads, checking meanwhile that `cut` (the device whose log was
/// cut at a damaged record) never does; returns the leader.
fn another_leads<'n>(cut: &keel_node::Node, others: &[&'n keel_node::Node]) -> &'n keel_node::Node {
    use keel_replication::ElectionRole;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert_ne!(
            cut.status().role,
            ElectionRole::Leader,
            "the device with the cut log led again"
        );
        if let Some(n) = others
            .iter()
            .find(|n| n.status().role == ElectionRole::Leader)
        {
            return n;
        }
        assert!(
            Instant::now() < deadline,
            "no device leads: {:?}",
            std::iter::once(cut)
                .chain(others.iter().copied())
                .map(|n| {
                    let s = n.status();
                    (s.role, s.epoch.counter, s.leader, s.log_len, s.peers.len())
                })
                .collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The leader's own log record damaged at rest: `repair_log` on it (what `keel verify
/// --repair` and the scrub run) steps it down (a new epoch of its own that it never won);
/// another device leads, the damaged device's cut log wins no election, and it fetches the log
/// from the new leader: a sound log at the common digest, nothing left pending.
#[test]
fn a_leader_with_a_damaged_log_record_steps_down_and_fetches_it_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (nodes, _, _, end, damaged) = a_damaged_leader(dir.path(), false);
    let [a, b, c] = nodes.as_slice() else {
        unreachable!("three nodes")
    };
    assert_eq!(a.repair_log().expect("repairs"), Some(damaged));
    let leader = another_leads(a, &[b, c]);
    fetched_again(leader, a, end);
    assert_ne!(a.status().role, keel_replication::ElectionRole::Leader);
    assert_eq!(
        a.repair_log().expect("checks"),
        None,
        "nothing left to repair"
    );
    cluster::converge(&[a, b, c], Duration::from_secs(30)).expect("converges");
}

/// The same damage found by the leader itself when a follower needs the record: `c`, behind,
/// comes back and asks for the log past it. The damaged record is never sent; the leader
/// steps down on its own, and another device leads: `b` (the only one holding the whole log),
/// or `c` once it got it from `b`; `a` and `c` get the whole log.
#[test]
fn a_leader_that_finds_a_record_to_send_damaged_steps_down_and_another_serves_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (nodes, hc, c_addr, end, _) = a_damaged_leader(dir.path(), true);
    let [a, b] = nodes.as_slice() else {
        unreachable!("two nodes")
    };
    let c = cluster::restart(&hc, "lib", c_addr).expect("c restarts");
    let deadline = Instant::now() + Duration::from_secs(30);
    while a.status().role == keel_replication::ElectionRole::Leader {
        assert!(Instant::now() < deadline, "a never stepped down");
        std::thread::sleep(Duration::from_millis(20));
    }
    let leader = another_leads(a, &[b, &c]);
    fetched_again(leader, a, end);
    fetched_again(leader, &c, end);
    cluster::converge(&[a, b, &c], Duration::from_secs(30)).expect("converges");
}

/// A device that resumes leading at start leaves its start check for later: its log stays
/// unchecked while it leads (its disk and CPU go to its followers).
#[test]
fn a_resumed_leader_leaves_its_start_check_for_later() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ha, a) = cluster::founder(dir.path(), "a", "lib").expect("founds");
    tags(a.library(), (0..20).map(|i| format!("t {i}")));
    let listen = a.local_addr();
    a.stop().expect("stops");
    let a = cluster::restart(&ha, "lib", listen).expect("restarts");
    let until = Instant::now() + Duration::from_millis(500);
    while Instant::now() < until {
        let status = a.status();
        assert_eq!(status.role, keel_replication::ElectionRole::Leader);
        assert!(status.log_unchecked, "a leader ran its start check");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A leader that resumes its epoch at start is not held by the start check, which waits until
/// it stops leading; its periodic scrub still runs meanwhile, finds the record damaged while it
/// was off, and it steps down and fetches the record again.
#[test]
fn a_resumed_leader_s_scrub_still_runs_and_finds_its_damage() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (nodes, _, _, end, _) =
        a_damaged_leader_with(dir.path(), false, |listen| keel_node::NodeOptions {
            listen,
            scrub_every: Some(Duration::from_millis(200)),
            ..cluster::options(Vec::new())
        });
    let [a, b, c] = nodes.as_slice() else {
        unreachable!("three nodes")
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while a.status().role == keel_replication::ElectionRole::Leader {
        assert!(
            Instant::now() < deadline,
            "a's scrub never found its damage"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let leader = another_leads(a, &[b, c]);
    fetched_again(leader, a, end);
    cluster::converge(&[a, b, c], Duration::from_secs(30)).expect("converges");
}

/// A follower whose log record was damaged while the devices were off, and whose log is the
/// longest of those that start again: it reads its log back before it stands (the start
/// check), finds the damage by itself, cuts its log there with its vote floor, and never
/// leads; `c`, short of that floor, cannot win its vote either, so nobody leads until `a`,
/// holding the whole log, comes back and does. `b` fetches the log again from `a`.
#[test]
fn a_log_damaged_while_off_is_checked_before_its_device_stands_and_never_wins() {
    use keel_replication::ElectionRole;
    let dir = tempfile::tempdir().expect("tempdir");
    let (ha, a) = cluster::founder(dir.path(), "a", "lib").expect("founds");
    let (hb, b) = cluster::joiner(dir.path(), "b", &a).expect("joins");
    let (hc, c) = cluster::joiner(dir.path(), "c", &a).expect("joins");
    cluster::converge(&[&a, &b, &c], Duration::from_secs(30)).expect("converges");
    let addrs = [a.local_addr(), b.local_addr(), c.local_addr()];
    c.stop().expect("stops");
    for round in 0..3 {
        tags(a.library(), (0..10).map(|i| format!("a {round} {i}")));
    }
    cluster::converge(&[&a, &b], Duration::from_secs(30)).expect("converges");
    let end = last_lsn(b.library());
    b.stop().expect("stops");
    a.stop().expect("stops");
    let damaged = end - 12;
    keel_tests::edit_log_page(
        &hb.library_dir("lib").join("journal.redb"),
        damaged,
        |bytes, record| bytes[record.end - 1] ^= 0x40,
    );

    let b = cluster::restart(&hb, "lib", addrs[1]).expect("b restarts");
    let c = cluster::restart(&hc, "lib", addrs[2]).expect("c restarts");
    let deadline = Instant::now() + Duration::from_secs(30);
    while b.status().log_unchecked || last_lsn(b.library()) >= damaged {
        assert_ne!(b.status().role, ElectionRole::Leader, "b led unchecked");
        assert!(
            Instant::now() < deadline,
            "b never checked its log: {:?}",
            b.status()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // Three election timeouts and more without `a`: the cut log stands for nothing.
    let watch_until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < watch_until {
        assert_ne!(b.status().role, ElectionRole::Leader, "b's cut log led");
        std::thread::sleep(Duration::from_millis(20));
    }
    let vote_floor = b.library().vote_floor().expect("reads the floor");
    assert_eq!(
        vote_floor.map(|(_, _, at)| at),
        Some(end),
        "the floor is b's old end"
    );

    let a = cluster::restart(&ha, "lib", addrs[0]).expect("a restarts");
    let leader = another_leads(&b, &[&a, &c]);
    assert_eq!(
        leader.library().device_id(),
        a.library().device_id(),
        "a holds the whole log"
    );
    fetched_again(leader, &b, end);
    cluster::converge(&[&a, &b, &c], Duration::from_secs(30)).expect("converges");
}

/// Copies the files of library folder `from` that a power loss leaves as they were into `to`
/// (the snapshot and the settings), with `journal` as the journal and `projections` (file
/// name, bytes: the projection file and its write-ahead log) as the projections.
fn cut_library(
    from: &std::path::Path,
    to: &std::path::Path,
    journal: &[u8],
    projections: &[(&str, &[u8])],
) {
    std::fs::create_dir_all(to).expect("a folder");
    for entry in std::fs::read_dir(from).expect("lists") {
        let entry = entry.expect("an entry");
        let name = entry.file_name();
        let kept = !name.to_string_lossy().starts_with("projections") && name != "journal.redb";
        if entry.file_type().expect("a type").is_file() && kept {
            std::fs::copy(entry.path(), to.join(&name)).expect("copies");
        }
    }
    std::fs::write(to.join("journal.redb"), journal).expect("writes the journal");
    for (name, bytes) in projections {
        std::fs::write(to.join(name), bytes).expect("writes the projections");
    }
}

/// Opens the library `lib` of `home` (a cut copy, removed afterwards): it opens, holds every
/// tag of `acked`, and its projections equal a replay of its journal. Returns how many tags
/// it found.
fn opens_with_every_tag(home: &Home, what: &str, acked: impl Iterator<Item = uuid::Uuid>) -> u64 {
    let lib = Library::open(home, "lib", keel_tests::PASSWORD)
        .unwrap_or_else(|e| panic!("{what}: does not open: {e}"));
    lib.flush().expect("flushes");
    let mut found = 0;
    for id in acked {
        assert!(
            lib.get::<keel_engine::Tag>(id).expect("reads").is_some(),
            "{what}: acknowledged tag {id} is missing"
        );
        found += 1;
    }
    let (report, digest) = lib.verify().expect("verifies");
    assert!(report.faults.is_empty(), "{what}: {:?}", report.faults);
    digest.unwrap_or_else(|e| panic!("{what}: projections differ from a replay: {e}"));
    lib.close().expect("closes");
    std::fs::remove_dir_all(home.root()).expect("removes");
    found
}

/// The projection file and its write-ahead log as a power loss may leave them, beside a whole
/// journal. SQLite runs with `synchronous=NORMAL` in WAL mode: a commit is not synced, so a
/// power loss keeps any prefix of the log's bytes written since the last sync, a torn last
/// write, or none of them. After each round of commits (tags made, one deleted, a compaction)
/// the files are copied as they are; each copy is then opened as it is, with its write-ahead
/// log cut at a random byte, with its last 4 KiB zeroed, and without it. Every time the
/// library opens, holds every acknowledged tag, and its projections equal a replay of the
/// journal (caught up, or rebuilt where SQLite cannot read them).
#[test]
fn projections_cut_by_a_power_loss_catch_up_with_the_journal() {
    use keel_engine::Tag;
    let dir = tempfile::tempdir().expect("tempdir");
    let home = Home::new(dir.path().join("home"));
    let folder = home.library_dir("lib");
    let (_, lib) = keel_tests::create_in(home.clone(), "lib").expect("creates");
    let mut copies: Vec<Vec<(&str, Vec<u8>)>> = Vec::new();
    let mut acked: Vec<uuid::Uuid> = Vec::new();
    for round in 0..12u64 {
        acked.extend(commit_tags(&lib, round, 20));
        if round == 5 {
            let doomed = acked.remove(0);
            lib.transact(|tx| {
                tx.delete::<Tag>(doomed);
                Ok(())
            })
            .expect("deletes");
        }
        lib.flush().expect("flushes");
        if round == 8 {
            let end = lib.status().expect("status").journal.last_lsn;
            lib.compact(keel_engine::Lsn(end)).expect("compacts");
        }
        let files = ["projections.sqlite", "projections.sqlite-wal"]
            .into_iter()
            .filter_map(|name| Some((name, std::fs::read(folder.join(name)).ok()?)))
            .collect();
        copies.push(files);
    }
    lib.close().expect("closes");
    let journal = std::fs::read(folder.join("journal.redb")).expect("reads the journal");
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let (mut opened, mut found, mut with_wal) = (0u64, 0u64, 0u64);
    for (round, files) in copies.iter().enumerate() {
        let db = files.iter().find(|(n, _)| *n == "projections.sqlite");
        let wal = files.iter().find(|(n, _)| *n == "projections.sqlite-wal");
        let Some((_, db)) = db else { continue };
        let mut images: Vec<(String, Option<Vec<u8>>)> = vec![("as copied".into(), None)];
        if let Some((_, wal)) = wal.filter(|(_, w)| !w.is_empty()) {
            with_wal += 1;
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let cut = (rng % wal.len() as u64) as usize;
            let mut zeroed = wal.clone();
            let from = zeroed.len().saturating_sub(4096);
            zeroed[from..].fill(0);
            images = vec![
                ("as copied".into(), Some(wal.clone())),
                (
                    format!("its log cut at byte {cut}"),
                    Some(wal[..cut].to_vec()),
                ),
                ("its log's last 4 KiB zeroed".into(), Some(zeroed)),
                ("without its log".into(), None),
            ];
        }
        for (how, wal) in images {
            let what = format!("projections of round {round}, {how}");
            let cut_home = Home::new(dir.path().join(format!("cut-{opened}")));
            let mut projections: Vec<(&str, &[u8])> = vec![("projections.sqlite", db)];
            if let Some(wal) = &wal {
                projections.push(("projections.sqlite-wal", wal));
            }
            cut_library(
                &folder,
                &cut_home.library_dir("lib"),
                &journal,
                &projections,
            );
            found += opens_with_every_tag(&cut_home, &what, acked.iter().copied());
            opened += 1;
        }
    }
    eprintln!(
        "power-loss sweep (projections): {} copies ({with_wal} with a write-ahead log), {opened} libraries opened, {found} acknowledged tags found, 0 lost",
        copies.len()
    );
    assert!(
        with_wal > 0,
        "no copy had a write-ahead log: the cuts were not tried"
    );
}

/// A checkpoint of the projection file torn by a power loss. A checkpoint copies the write-ahead
/// log's pages into the main file and syncs it; the log is reset only by a later writer, once
/// that sync returned. So a power loss during one leaves the main file with any mix of old and
/// new pages, and sectors within a page, beside the whole log. After each round of commits the
/// files are copied as they are, the copy checkpointed, and the main file rebuilt from the
/// copies before and after, page by page (8 KiB) and sector by sector (512 B), at random; each
/// image opens with every acknowledged tag and projections equal to a replay of the journal.
#[test]
fn a_projection_checkpoint_torn_by_a_power_loss_is_recovered_from_its_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = Home::new(dir.path().join("home"));
    let folder = home.library_dir("lib");
    let (_, lib) = keel_tests::create_in(home.clone(), "lib").expect("creates");
    let mut acked: Vec<uuid::Uuid> = Vec::new();
    let mut before: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    for round in 0..4u64 {
        acked.extend(commit_tags(&lib, round, 200));
        lib.flush().expect("flushes");
        let read = |name: &str| std::fs::read(folder.join(name)).unwrap_or_default();
        before.push((read("projections.sqlite"), read("projections.sqlite-wal")));
    }
    lib.close().expect("closes");
    let journal = std::fs::read(folder.join("journal.redb")).expect("reads the journal");
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let (mut opened, mut found, mut pages_differing) = (0u64, 0u64, 0u64);
    for (round, (db, wal)) in before.iter().enumerate() {
        if wal.is_empty() {
            continue;
        }
        let checkpointed = checkpointed_copy(&dir.path().join(format!("ckpt-{round}")), db, wal);
        for (grain, images) in [(8192usize, 4), (512, 4)] {
            for image in 0..images {
                let mut torn = checkpointed.clone();
                for (at, chunk) in torn.chunks_mut(grain).enumerate() {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    let old = db.get(at * grain..(at * grain + chunk.len()).min(db.len()));
                    if let (true, Some(old)) = (rng & 1 == 1, old) {
                        pages_differing += u64::from(old != &chunk[..old.len()]);
                        chunk[..old.len()].copy_from_slice(old);
                    }
                }
                let what = format!("round {round}, {grain}-byte grain, image {image}");
                assert_sound(
                    &dir.path().join(format!("check-{opened}")),
                    &torn,
                    wal,
                    &what,
                );
                let cut_home = Home::new(dir.path().join(format!("torn-{opened}")));
                let projections: Vec<(&str, &[u8])> = vec![
                    ("projections.sqlite", &torn),
                    ("projections.sqlite-wal", wal),
                ];
                cut_library(
                    &folder,
                    &cut_home.library_dir("lib"),
                    &journal,
                    &projections,
                );
                let upto = 200 * (round + 1);
                found += opens_with_every_tag(&cut_home, &what, acked[..upto].iter().copied());
                opened += 1;
            }
        }
    }
    eprintln!(
        "power-loss sweep (torn checkpoints): {opened} projection files torn ({pages_differing} \
         pages and sectors taken from before the checkpoint), {found} acknowledged tags found, 0 lost"
    );
    assert!(
        pages_differing > 0,
        "no torn image differed from the checkpointed file: nothing was tried"
    );
}

/// `n` new tags of round `round`, committed in one transaction; their uuids.
fn commit_tags(lib: &Library, round: u64, n: usize) -> Vec<uuid::Uuid> {
    let made: Vec<keel_engine::Tag> = (0..n).map(|i| tag(&format!("r{round} {i}"))).collect();
    lib.transact(|tx| {
        for t in &made {
            tx.upsert(t);
        }
        Ok(())
    })
    .expect("commits");
    made.iter().map(|t| t.uuid).collect()
}

/// `db` and its `wal` written as a projection file in `dir`, opened with SQLite alone.
fn sqlite_copy(
    dir: &std::path::Path,
    db: &[u8],
    wal: &[u8],
) -> (std::path::PathBuf, rusqlite::Connection) {
    std::fs::create_dir_all(dir).expect("a folder");
    let path = dir.join("projections.sqlite");
    std::fs::write(&path, db).expect("writes");
    std::fs::write(dir.join("projections.sqlite-wal"), wal).expect("writes");
    let conn = rusqlite::Connection::open(&path).expect("opens the copy");
    (path, conn)
}

/// SQLite reads `db` beside `wal` (copies in `dir`) as sound: recovered from its log, not
/// rebuilt by Keel.
fn assert_sound(dir: &std::path::Path, db: &[u8], wal: &[u8], what: &str) {
    let (_, conn) = sqlite_copy(dir, db, wal);
    let check: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .expect("checks");
    assert_eq!(check, "ok", "{what}: SQLite finds the file damaged");
}

/// The main projection file after a checkpoint of `wal` into `db` (copies in `dir`).
fn checkpointed_copy(dir: &std::path::Path, db: &[u8], wal: &[u8]) -> Vec<u8> {
    let (path, conn) = sqlite_copy(dir, db, wal);
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
        .expect("checkpoints");
    // Read while the connection holds the log, which a last close would remove.
    let after = std::fs::read(&path).expect("reads");
    drop(conn);
    after
}

/// The tags of `lib`, by uuid.
fn tag_ids(lib: &Library) -> std::collections::BTreeSet<uuid::Uuid> {
    lib.read(|p| p.query().select::<keel_engine::Tag, _>("1 = 1", []))
        .expect("reads")
        .into_iter()
        .map(|t| t.uuid)
        .collect()
}

/// A joining device's journal cut by a power loss after each sync of its initial sync (only
/// what was synced, or with the last write torn at 4 KiB). The projection file the join
/// installs is there only in cuts whose journal holds the join's job as completed (the install
/// syncs it, and its folder, before that). A cut before the journal's first commit
/// (while redb made it, it is built aside and appears once made) stores nothing: the library
/// says its join did not finish (`Unfinished`), and never founds a library of its own. Every
/// later cut opens, its log is sound and a prefix of
/// the leader's (its tags are the leader's, and no more of them than the leader's log end),
/// its projections are a replay of it; and a node started on the first of them, the middle
/// sync's and the last catches up with the leader.
#[test]
fn a_join_cut_by_a_power_loss_keeps_a_prefix_of_the_log_and_catches_up() {
    use keel_journal::faults::PowerLoss;
    let dir = tempfile::tempdir().expect("tempdir");
    let (_ha, a) = cluster::founder(dir.path(), "a", "lib").expect("founds");
    for round in 0..8 {
        tags(a.library(), (0..150).map(|i| format!("a {round} {i}")));
    }
    a.library().flush().expect("flushes");
    let leader_tags = tag_ids(a.library());
    let home = Home::new(dir.path().join("b"));
    let folder = home.library_dir("lib");
    let faults = Faults::new();
    faults.record();
    inject(&folder.join("journal.redb"), faults.clone());
    let name = cluster::pair(&home, &a, a.local_addr()).expect("joins");
    assert_eq!(name, "lib");
    let total = faults.syncs();
    assert!(total >= 2, "the join synced {total} times: no cut to try");
    let (mut opened, mut unfinished, mut caught_up, mut installed) = (0u64, 0u64, 0u64, 0u64);
    let mut started = vec![total / 2, total];
    for n in 1..=total {
        for loss in [PowerLoss::SyncedOnly, PowerLoss::TornLast { bytes: 4096 }] {
            let what = format!("a join cut after sync {n} of {total}, {loss:?}");
            let image = faults.crash_image(n, loss).expect("a recorded sync");
            let cut_home = Home::new(dir.path().join(format!("cut-{n}-{loss:?}")));
            cut_library(&folder, &cut_home.library_dir("lib"), &image, &[]);
            // The same device: its identity is the home's, beside the library folders.
            copy_identity(&home, &cut_home);
            if join_completed(&cut_home) {
                install_received_projection(&folder, &cut_home.library_dir("lib"));
                installed += 1;
            }
            let opening = Library::open(&cut_home, "lib", keel_tests::PASSWORD);
            if let Err(keel_engine::EngineError::Unfinished(_)) = opening {
                // Cut before the journal's first commit (or before it appeared at all):
                // nothing stored. Never after a cut that opened.
                assert!(opened == 0, "{what}: unfinished after a cut that opened");
                unfinished += 1;
                continue;
            }
            let lib = opening.unwrap_or_else(|e| panic!("{what}: does not open: {e}"));
            lib.flush().expect("flushes");
            let (report, digest) = lib.verify().expect("verifies");
            assert!(report.faults.is_empty(), "{what}: {:?}", report.faults);
            digest.unwrap_or_else(|e| panic!("{what}: projections differ from a replay: {e}"));
            let end = last_lsn(&lib);
            let held = tag_ids(&lib);
            // The leader's log grows as devices join and start (their Device records).
            assert!(
                end <= last_lsn(a.library()),
                "{what}: a log past the leader's"
            );
            assert!(
                held.is_subset(&leader_tags),
                "{what}: tags the leader has not"
            );
            assert!(
                held.len() as u64 <= end,
                "{what}: more tags than log entries"
            );
            if loss == PowerLoss::SyncedOnly && (opened == 0 || started.contains(&n)) {
                started.push(n);
                catches_up(&a, lib, &leader_tags, &what);
                caught_up += 1;
            } else {
                lib.close().expect("closes");
            }
            std::fs::remove_dir_all(cut_home.root()).expect("removes");
            opened += 1;
        }
    }
    eprintln!(
        "power-loss sweep (join): {total} syncs x 2 ways, {opened} libraries opened ({installed} with the projection file the join installed), {unfinished} cut before the journal's first commit (Unfinished), {caught_up} caught up"
    );
    assert!(opened > 0 && unfinished > 0, "both kinds of cut were tried");
    assert!(
        installed > 0 && installed < opened,
        "cuts with and without the installed projection"
    );
    // The first cut that opened, the middle sync's and the last (two may be one).
    assert!(
        caught_up >= 2,
        "only {caught_up} cuts were started as nodes"
    );
}

/// A join from a compacted device (its projection file, then only the log after its base) cut
/// by a power loss after each of the joiner's journal syncs. The journal stores the base as
/// soon as the file begins to arrive; the file received (kept as the joiner's snapshot) and
/// the installed projection are durable only once the install syncs their folder, after which
/// the join's job is stored as completed: a cut whose journal holds no completed join lacks
/// them. Each cut opens (or is `Unfinished`, before the journal's first commit) and a node
/// started on it converges with the leader, holding every tag of it.
#[test]
fn a_compacted_join_cut_by_a_power_loss_opens_and_catches_up() {
    use keel_journal::faults::PowerLoss;
    let dir = tempfile::tempdir().expect("tempdir");
    let (_ha, a) = cluster::founder(dir.path(), "a", "lib").expect("founds");
    for round in 0..4 {
        tags(a.library(), (0..150).map(|i| format!("a {round} {i}")));
    }
    a.library().flush().expect("flushes");
    let compacted = a.compact().expect("compacts alone");
    assert!(compacted.base > 0, "{compacted:?}");
    tags(a.library(), (0..100).map(|i| format!("after the base {i}")));
    a.library().flush().expect("flushes");
    let leader_tags = tag_ids(a.library());
    let home = Home::new(dir.path().join("b"));
    let folder = home.library_dir("lib");
    let faults = Faults::new();
    faults.record();
    inject(&folder.join("journal.redb"), faults.clone());
    cluster::pair(&home, &a, a.local_addr()).expect("joins");
    assert!(
        folder.join(keel_engine::SNAPSHOT_FILE).exists(),
        "the join kept no snapshot: not a compacted join"
    );
    let total = faults.syncs();
    let (mut unfinished, mut caught_up, mut lost_files) = (0u64, 0u64, 0u64);
    for n in 1..=total {
        let what = format!("a compacted join cut after sync {n} of {total}");
        let image = faults
            .crash_image(n, PowerLoss::SyncedOnly)
            .expect("a recorded sync");
        let cut_home = Home::new(dir.path().join(format!("cut-{n}")));
        let cut = cut_home.library_dir("lib");
        cut_library(&folder, &cut, &image, &[]);
        copy_identity(&home, &cut_home);
        let completed = join_completed(&cut_home);
        if completed {
            install_received_projection(&folder, &cut);
        } else {
            let _ = std::fs::remove_file(cut.join(keel_engine::SNAPSHOT_FILE));
            // What was arriving, cut short (written, not synced: some of it may be there).
            for arriving in JOIN_ARRIVING {
                std::fs::write(cut.join(arriving), b"SQLite format 3\0 cut short").expect("writes");
            }
        }
        let lib = match Library::open(&cut_home, "lib", keel_tests::PASSWORD) {
            Err(keel_engine::EngineError::Unfinished(_)) => {
                assert_eq!(caught_up, 0, "{what}: unfinished after a cut that opened");
                unfinished += 1;
                continue;
            }
            opened => opened.unwrap_or_else(|e| panic!("{what}: does not open: {e}")),
        };
        catches_up(&a, lib, &leader_tags, &what);
        for arriving in JOIN_ARRIVING {
            assert!(!cut.join(arriving).exists(), "{what}: {arriving} is left");
        }
        std::fs::remove_dir_all(cut_home.root()).expect("removes");
        caught_up += 1;
        lost_files += u64::from(!completed);
    }
    eprintln!(
        "power-loss sweep (compacted join): {total} syncs, {unfinished} cut before the journal's first commit (Unfinished), {caught_up} opened and caught up, {lost_files} of them without the received files"
    );
    assert!(
        caught_up > lost_files && lost_files > 0,
        "both kinds of cut were tried"
    );
}

/// The files a join writes while they arrive: the projection file and, from a compacted
/// device, the same file as packed frames (kept as the snapshot).
const JOIN_ARRIVING: [&str; 2] = [
    keel_engine::JOIN_INCOMING_FILE,
    keel_engine::JOIN_FRAMES_FILE,
];

/// Puts the projection file a join installed in `joined` (nothing opened the library since)
/// into `cut`: it was durable before the join's job was stored as completed.
fn install_received_projection(joined: &std::path::Path, cut: &std::path::Path) {
    let file = keel_engine::PROJECTIONS_FILE;
    std::fs::copy(joined.join(file), cut.join(file)).expect("copies the installed projection");
}

/// Whether the library of `home` (a cut copy) holds its join's job as completed; looked at in
/// a copy of it, which is removed.
fn join_completed(home: &Home) -> bool {
    let look = Home::new(home.root().with_extension("look"));
    std::fs::create_dir_all(look.root()).expect("a folder");
    let copied = std::process::Command::new("cp")
        .args(["-a", "--"])
        .arg(home.root().join("."))
        .arg(look.root())
        .status()
        .expect("runs cp");
    assert!(copied.success(), "copies the cut");
    let completed = match Library::open(&look, "lib", keel_tests::PASSWORD) {
        Ok(lib) => lib.jobs().expect("jobs").iter().any(|j| {
            matches!(j.kind, keel_engine::JobKind::Join { .. })
                && j.state == keel_engine::JobState::Completed
        }),
        Err(_) => false,
    };
    std::fs::remove_dir_all(look.root()).expect("removes");
    completed
}

/// Starts a node on `lib` (a cut joiner) beside its leader `a`, which converges with it and
/// holds `leader_tags`; stops it.
fn catches_up(
    a: &keel_node::Node,
    lib: Library,
    leader_tags: &std::collections::BTreeSet<uuid::Uuid>,
    what: &str,
) {
    let b = keel_node::Node::start(lib, cluster::options(vec![a.local_addr()]))
        .unwrap_or_else(|e| panic!("{what}: the node does not start: {e}"));
    cluster::converge(&[a, &b], Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{what}: no catch-up: {e}"));
    assert_eq!(
        &tag_ids(b.library()),
        leader_tags,
        "{what}: after catching up"
    );
    b.stop().expect("stops");
}

/// Gives `cut`, a copy of `home`'s library, the same device identity (kept beside the library
/// folders).
fn copy_identity(home: &Home, cut: &Home) {
    let identity = cut.root().join("device");
    std::fs::create_dir_all(&identity).expect("a folder");
    let from = home.root().join("device").join("identity.toml");
    std::fs::copy(&from, identity.join("identity.toml")).expect("copies the identity");
}

/// A library's journal cut by a power loss after its Nth sync (only what was synced, or with
/// the last write torn at 4 KiB), beside projections as they were at an earlier moment (SQLite
/// syncs less often than the journal, so a power loss leaves them behind it): the library
/// opens, holds every tag acknowledged before the loss, and its projections equal a replay of
/// what the journal holds. The workload commits, deletes and compacts.
#[test]
fn a_library_cut_by_a_power_loss_opens_with_every_acknowledged_change() {
    use keel_engine::Tag;
    use keel_journal::faults::PowerLoss;
    let dir = tempfile::tempdir().expect("tempdir");
    let home = Home::new(dir.path().join("home"));
    let folder = home.library_dir("lib");
    let faults = Faults::new();
    faults.record();
    inject(&folder.join("journal.redb"), faults.clone());
    let (_, lib) = keel_tests::create_in(home.clone(), "lib").expect("creates");
    let copies = dir.path().join("projections");
    std::fs::create_dir(&copies).expect("a folder");
    // (syncs done, the projection file as it was then), oldest first.
    let mut projections: Vec<(u64, std::path::PathBuf)> = Vec::new();
    let mut acked: Vec<(u64, uuid::Uuid)> = Vec::new();
    for round in 0..16u64 {
        let copy = copies.join(format!("{round}.sqlite"));
        lib.flush().expect("flushes");
        let syncs = faults.syncs();
        keel_projections::Projections::snapshot(&folder.join("projections.sqlite"), &copy)
            .expect("copies the projections");
        projections.push((syncs, copy));
        let made: Vec<Tag> = (0..4).map(|i| tag(&format!("r{round} {i}"))).collect();
        lib.transact(|tx| {
            for t in &made {
                tx.upsert(t);
            }
            Ok(())
        })
        .expect("commits");
        let syncs = faults.syncs();
        acked.extend(made.iter().map(|t| (syncs, t.uuid)));
        if round == 6 {
            let doomed = acked.remove(0).1;
            lib.transact(|tx| {
                tx.delete::<Tag>(doomed);
                Ok(())
            })
            .expect("deletes");
        }
        if round == 10 {
            lib.flush().expect("flushes");
            let end = lib.status().expect("status").journal.last_lsn;
            lib.compact(keel_engine::Lsn(end)).expect("compacts");
        }
    }
    lib.close().expect("closes");
    let total = faults.syncs();
    let (mut opened, mut found) = (0u64, 0u64);
    for n in 1..=total {
        // The newest copy of the projections the journal had synced past.
        let Some((_, behind)) = projections.iter().rev().find(|(s, _)| *s <= n) else {
            continue;
        };
        for loss in [PowerLoss::SyncedOnly, PowerLoss::TornLast { bytes: 4096 }] {
            let image = faults.crash_image(n, loss).expect("a recorded sync");
            let cut_home = Home::new(dir.path().join(format!("cut-{n}-{opened}")));
            let behind = std::fs::read(behind).expect("reads the copy");
            cut_library(
                &folder,
                &cut_home.library_dir("lib"),
                &image,
                &[("projections.sqlite", &behind)],
            );
            let what = format!("power loss after sync {n} of {total}, {loss:?}");
            let due = acked.iter().filter(|(s, _)| *s <= n).map(|(_, id)| *id);
            found += opens_with_every_tag(&cut_home, &what, due);
            opened += 1;
        }
    }
    eprintln!(
        "power-loss sweep (library): {total} syncs x 2 ways, {opened} libraries opened, {found} acknowledged tags found, 0 lost"
    );
    assert!(
        opened >= total,
        "every cut after the library was made opens"
    );
}
