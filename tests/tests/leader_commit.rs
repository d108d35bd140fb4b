//! Where a running node's own commits go: a leader appends them to its log itself (one durable
//! write before followers are sent them), a follower keeps them in its offline journal until the
//! leader has sequenced them.

use keel_replication::ElectionRole;
use std::time::{Duration, Instant};

use keel_engine::Library;
use keel_journal::Placement;
use keel_tests::cluster::{converge, founder, founder_with, joiner, options};
use keel_tests::{tag, PASSWORD};

const CONVERGE: Duration = Duration::from_secs(30);

/// Commits `tag` on `library`.
fn commit_tag(library: &Library, tag: &keel_schema::Tag) -> keel_engine::CommitReceipt {
    let (_, receipt) = library
        .transact(|tx| {
            tx.upsert(tag);
            Ok(())
        })
        .expect("commits");
    receipt
}

/// Whether every placement is in the log (`log`) or every one in the offline journal.
fn all_in(placements: &[Placement], log: bool) -> bool {
    placements.iter().all(|p| match p {
        Placement::Log(_) => log,
        Placement::Offline(_) => !log,
    })
}

#[test]
fn a_leader_commits_straight_into_its_log_and_a_follower_through_its_offline_journal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (home_a, a) = founder(dir.path(), "a", "photos").expect("founder");
    let (_home_b, b) = joiner(dir.path(), "b", &a).expect("b joins");
    let deadline = Instant::now() + CONVERGE;
    while a.status().role != ElectionRole::Leader || b.status().role != ElectionRole::Follower {
        assert!(Instant::now() < deadline, "no leader and follower");
        std::thread::sleep(Duration::from_millis(10));
    }

    let before = a.library().status().expect("status").journal;
    let on_a = tag("made on the leader");
    let receipt = commit_tag(a.library(), &on_a);
    assert!(
        all_in(&receipt.placements, true),
        "{:?}",
        receipt.placements
    );
    // In the log when `transact` returns, never in the offline journal, and counted as A's own.
    let after = a.library().status().expect("status").journal;
    assert_eq!(after.offline, 0);
    assert_eq!(after.log_len, before.log_len + 1);
    assert_eq!(after.local_changes, before.local_changes + 1);

    let on_b = tag("made on the follower");
    let receipt_b = commit_tag(b.library(), &on_b);
    assert!(
        all_in(&receipt_b.placements, false),
        "{:?}",
        receipt_b.placements
    );
    converge(&[&a, &b], CONVERGE).unwrap_or_else(|r| panic!("{r}"));
    assert_eq!(b.library().status().expect("status").journal.offline, 0);
    b.stop().expect("stops");
    a.stop().expect("stops");

    // Durable on the leader: its journal holds the change after a stop and a reopen.
    let lib = Library::open(&home_a, "photos", PASSWORD).expect("opens");
    let ids = lib.sync_state().change_ids().expect("reads");
    assert!(ids.contains(&receipt.change_ids[0]));
    assert!(ids.contains(&receipt_b.change_ids[0]));
    assert_eq!(lib.status().expect("status").counts.tags, 2);
}

#[test]
fn with_leader_commits_off_a_leader_commits_through_its_offline_journal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_home, a) = founder_with(
        dir.path(),
        "a",
        "photos",
        keel_node::NodeOptions {
            leader_commits: false,
            ..options(Vec::new())
        },
    )
    .expect("founder");
    let deadline = Instant::now() + CONVERGE;
    while a.status().role != ElectionRole::Leader {
        assert!(Instant::now() < deadline, "a never leads");
        std::thread::sleep(Duration::from_millis(10));
    }
    let receipt = commit_tag(a.library(), &tag("by the offline journal"));
    assert!(
        all_in(&receipt.placements, false),
        "{:?}",
        receipt.placements
    );
    // The core still sequences it into the log.
    while a.library().status().expect("status").journal.offline > 0 {
        assert!(Instant::now() < deadline, "never sequenced");
        std::thread::sleep(Duration::from_millis(10));
    }
    a.stop().expect("stops");
}

/// The indexer's pipelined commits too: on a leader they go straight into the log (one write,
/// one apply), not through the offline journal first. A folder indexed on the leader is all in
/// the log, and nothing of it is in the offline journal.
#[test]
fn a_leaders_pipelined_commits_and_its_index_go_straight_into_its_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_home, a) = founder(dir.path(), "a", "photos").expect("founder");
    let deadline = Instant::now() + CONVERGE;
    while a.status().role != ElectionRole::Leader {
        assert!(Instant::now() < deadline, "a never leads");
        std::thread::sleep(Duration::from_millis(10));
    }
    let pending = a
        .library()
        .transact_pipelined(|tx| {
            tx.upsert(&tag("pipelined"));
            Ok(())
        })
        .expect("hands over");
    let receipt = pending.wait().expect("durable");
    assert!(
        all_in(&receipt.placements, true) && !receipt.placements.is_empty(),
        "{:?}",
        receipt.placements
    );
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(&tree).expect("tree");
    for i in 0..50 {
        std::fs::write(tree.join(format!("{i}.txt")), format!("file {i}")).expect("file");
    }
    let before = a.library().status().expect("status").journal;
    a.library().index(&tree, &mut |_| {}).expect("indexes");
    let after = a.library().status().expect("status").journal;
    assert_eq!(after.offline, 0, "nothing waits in the offline journal");
    assert!(
        after.log_len >= before.log_len + 50,
        "{before:?} -> {after:?}"
    );
    a.stop().expect("stops");
}
