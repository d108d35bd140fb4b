//! Initial sync by snapshot on loopback with real QUIC, redb and SQLite: a device that joins
//! gets the inviter's whole log and a copy of its projections before its node starts, with
//! progress, and then converges with the others; the copy matches a replay of the log.

use std::time::Duration;

use keel_engine::{CreateOptions, Home, KdfParams, Library};
use keel_node::{join, JoinOptions, JoinProgress, Node};
use keel_tests::cluster::{converge, founder_with_tags, options};
use keel_tests::PASSWORD;

const CONVERGE: Duration = Duration::from_secs(30);

use keel_tests::tag;

#[test]
fn a_joining_device_gets_the_log_and_a_projection_copy_with_progress_then_converges() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_ha, a) = founder_with_tags(dir.path(), "a", "big", 3000).expect("founder");
    // The leader's core sequences its own commits into the log: wait for all of them (and for
    // the core to publish its status, which it does once per tick).
    let deadline = std::time::Instant::now() + CONVERGE;
    while a.library().status().expect("status").journal.offline > 0 || a.status().log_len < 3000 {
        assert!(std::time::Instant::now() < deadline, "never sequenced");
        std::thread::sleep(Duration::from_millis(10));
    }
    let leader_log = a.status().log_len;
    assert!(leader_log >= 3000, "{leader_log}");

    let home = Home::new(dir.path().join("b"));
    let invite = a.invite(true).expect("invites");
    let (progress, mut heard) = tokio::sync::mpsc::unbounded_channel();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let name = rt
        .block_on(join(
            &home,
            JoinOptions {
                addr: Some(a.local_addr()),
                discovery: keel_node::Discovery::default(),
                bind: None,
                code: invite.code.as_str().into(),
                device_name: Some("b".into()),
                password: PASSWORD.into(),
                create: CreateOptions {
                    kdf: KdfParams::INSECURE_FAST,
                },
                snapshot: true,
                progress: Some(progress),
                // Copy the file whatever the link: tests measure nothing.
                slow_link: keel_node::SlowLink::never(),
            },
        ))
        .expect("joins");

    // Progress: the log count only grows, and the last report has everything.
    let mut reports: Vec<JoinProgress> = Vec::new();
    while let Ok(p) = heard.try_recv() {
        reports.push(p);
    }
    let last = *reports.last().expect("progress reports");
    assert!(
        reports
            .windows(2)
            .all(|w| w[0].log_stored <= w[1].log_stored),
        "stored only grows"
    );
    assert!(last.log_total >= leader_log, "{last:?}");
    assert_eq!(last.log_stored, last.log_total, "{last:?}");
    assert!(
        last.file_total > 0 && last.file_received == last.file_total,
        "{last:?}"
    );
    // The file crosses the wire packed: fewer UDP bytes than its size, but some.
    assert!(last.bytes > 0 && last.bytes < last.file_total, "{last:?}");

    // Before any node runs, the library holds the log and projections that applied it.
    let lib = Library::open(&home, &name, PASSWORD).expect("opens");
    let status = lib.status().expect("status");
    assert_eq!(status.journal.log_len, last.log_total);
    assert_eq!(status.applied_lsn, last.log_total);
    assert_eq!(status.counts.tags, 3000);
    assert_eq!(status.counts.devices, 2, "the inviter's Device and its own");
    assert_eq!(
        lib.sync_state().saved_log_index_len().expect("reads"),
        Some(last.log_total),
        "the log index was saved with the log"
    );
    // The copy is what a replay of the log (and its own pending record) builds.
    let installed = lib.digest().expect("digest");
    let mut no_op = |_: u64, _: u64| {};
    lib.rebuild(&mut no_op).expect("rebuilds");
    assert_eq!(lib.digest().expect("digest"), installed);

    let b = Node::start(lib, options(vec![a.local_addr()])).expect("starts");
    b.library()
        .transact(|tx| {
            tx.upsert(&tag("made on b"));
            Ok(())
        })
        .expect("commits on b");
    let digest = converge(&[&a, &b], CONVERGE).unwrap_or_else(|r| panic!("{r}"));
    assert_eq!(b.library().digest().expect("digest"), digest);
    assert_eq!(a.library().status().expect("status").counts.tags, 3001);
    b.stop().expect("stops");
    a.stop().expect("stops");
    // A stopped node leaves its log index saved, whole.
    let lib = Library::open(&home, &name, PASSWORD).expect("opens");
    let log_len = lib.status().expect("status").journal.log_len;
    assert!(log_len > last.log_total);
    assert_eq!(
        lib.sync_state().saved_log_index_len().expect("reads"),
        Some(log_len)
    );
}

/// The inviter's status shows a device while it receives its initial sync (`joining`: how much
/// of the file and the log it was sent), and no longer once it is done. The link is cut for a
/// moment mid-join, through a proxy, so the state can be looked at.
#[test]
fn the_inviter_shows_a_device_joining_while_its_initial_sync_runs() {
    use keel_tests::proxy::{LinkFaults, Proxy};
    let dir = tempfile::tempdir().expect("tempdir");
    let (_ha, a) = founder_with_tags(dir.path(), "a", "big", 20_000).expect("founder");
    let deadline = std::time::Instant::now() + CONVERGE;
    while a.status().log_len < 20_000 {
        assert!(std::time::Instant::now() < deadline, "never sequenced");
        std::thread::sleep(Duration::from_millis(10));
    }
    let clean = LinkFaults {
        drop: 0,
        duplicate: 0,
        reorder: 0,
        corrupt: 0,
    };
    let proxy = Proxy::start(a.local_addr(), clean, 1).expect("proxy");
    let home = Home::new(dir.path().join("b"));
    let seen = std::thread::scope(|s| {
        let joined = s.spawn(|| keel_tests::cluster::pair(&home, &a, proxy.addr));
        let deadline = std::time::Instant::now() + CONVERGE;
        let seen = loop {
            if let Some(join) = a.status().joining.first().filter(|j| j.file_bytes > 0) {
                proxy.cut(true);
                break join.clone();
            }
            assert!(std::time::Instant::now() < deadline, "no join shown");
            std::thread::sleep(Duration::from_millis(1));
        };
        // Held where the cut left it.
        std::thread::sleep(Duration::from_millis(300));
        let held = a.status().joining;
        assert_eq!(held.len(), 1, "{held:?}");
        let held = &held[0];
        assert_eq!(held.device_id, seen.device_id);
        assert!(held.file_sent <= held.file_bytes, "{held:?}");
        assert!(held.log_sent <= held.log_end, "{held:?}");
        assert!(held.log_end >= 20_000, "{held:?}");
        assert!(held.started_ms > 0 && held.started_ms <= keel_engine::now_ms());
        proxy.cut(false);
        joined.join().expect("the join thread").expect("joins");
        seen
    });
    let b = Library::open(&home, "big", PASSWORD).expect("opens");
    assert_eq!(seen.device_id, b.device_id().to_hex(), "the joining device");
    let deadline = std::time::Instant::now() + CONVERGE;
    while !a.status().joining.is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the join is still shown: {:?}",
            a.status().joining
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    a.stop().expect("stops");
}
