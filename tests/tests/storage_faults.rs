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
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("KEEL_LOG"))
        .with_test_writer()
        .try_init();
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
    while last_lsn(b.library()) < end || held(&a).0 < end {
        assert!(
            Instant::now() < deadline,
            "b never stored the log again: {} of {end}, {:?}",
            last_lsn(b.library()),
            b.status()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!b.status().storage_failed);
    cluster::converge(&[&a, &b], Duration::from_secs(60)).expect("converges");
    tags(b.library(), std::iter::once("made on b after".to_string()));
    cluster::converge(&[&a, &b], Duration::from_secs(30)).expect("converges again");
}
