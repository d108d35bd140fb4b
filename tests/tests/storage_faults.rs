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
    let b = keel_node::Node::start(lib, cluster::options(vec![a.local_addr()]))
        .expect("a node with a damaged log record starts");
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
        ..cluster::options(vec![a.local_addr()])
    };
    let b = keel_node::Node::start(lib, options).expect("starts");
    fetched_again(&a, &b, end);
}

/// Copies the files of library folder `from` that a power loss leaves as they were into `to`
/// (the snapshot and the settings), with `journal` as the journal and `projections` (a copy
/// of the projection file) as the projections.
fn cut_library(
    from: &std::path::Path,
    to: &std::path::Path,
    journal: &[u8],
    projections: &std::path::Path,
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
    std::fs::copy(projections, to.join("projections.sqlite")).expect("copies the projections");
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
            cut_library(&folder, &cut_home.library_dir("lib"), &image, behind);
            let what = format!("power loss after sync {n} of {total}, {loss:?}");
            let due: Vec<_> = acked.iter().filter(|(s, _)| *s <= n).collect();
            let lib = Library::open(&cut_home, "lib", keel_tests::PASSWORD)
                .unwrap_or_else(|e| panic!("{what}: does not open: {e}"));
            for (_, id) in &due {
                assert!(
                    lib.get::<Tag>(*id).expect("reads").is_some(),
                    "{what}: acknowledged tag {id} is missing"
                );
                found += 1;
            }
            let (report, digest) = lib.verify().expect("verifies");
            assert!(report.faults.is_empty(), "{what}: {:?}", report.faults);
            digest.unwrap_or_else(|e| panic!("{what}: projections differ from a replay: {e}"));
            lib.close().expect("closes");
            std::fs::remove_dir_all(cut_home.root()).expect("removes");
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
