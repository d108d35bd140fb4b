//! Issue 28, "tombstones survive compaction until every device has passed them, then are
//! collected" (decision 0082): on real nodes over QUIC, a leader appends a horizon at the least
//! clock floor of every device; every device collects the tombstones older than it at the
//! horizon's log position. A device that is away holds back the tombstones newer than its last
//! floor, so its offline edit older than a delete still loses to it.

use std::time::{Duration, Instant};

use keel_engine::{Library, Tag};
use keel_node::Node;
use keel_tests::cluster::{converge, founder, joiner, restart, wait_status};
use keel_tests::{tag, PASSWORD};

const WAIT: Duration = Duration::from_secs(60);

/// Rows of `tag` that hold a tombstone.
fn tombstones(lib: &Library) -> i64 {
    lib.read(|p| {
        Ok(p.connection().query_row(
            "SELECT count(*) FROM tag WHERE _tomb IS NOT NULL",
            [],
            |r| r.get(0),
        )?)
    })
    .expect("counts")
}

fn names(lib: &Library) -> Vec<String> {
    let mut names: Vec<String> = lib
        .read(|p| p.query().select::<Tag, _>("1 = 1", []))
        .expect("reads")
        .into_iter()
        .map(|t| t.name)
        .collect();
    names.sort();
    names
}

/// Has the leader `a` compact (which appends a horizon once every device's floor allows one)
/// until `done` holds of every node after they converge.
fn compact_until(a: &Node, nodes: &[&Node], what: &str, done: impl Fn(&Node) -> bool) {
    let deadline = Instant::now() + WAIT;
    loop {
        a.compact().expect("compacts");
        converge(nodes, WAIT).unwrap_or_else(|r| panic!("{r}"));
        if nodes.iter().all(|n| done(n)) {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn deleted_records_are_collected_on_every_device_and_a_rebuild_agrees() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_ha, a) = founder(dir.path(), "a", "lib").expect("founds");
    let (_hb, b) = joiner(dir.path(), "b", &a).expect("joins");
    let kept = tag("kept");
    let gone: Vec<Tag> = (0..3).map(|i| tag(&format!("gone {i}"))).collect();
    a.library()
        .transact(|tx| {
            tx.upsert(&kept);
            for t in &gone {
                tx.upsert(t);
            }
            Ok(())
        })
        .expect("commits");
    a.library()
        .transact(|tx| {
            gone.iter().for_each(|t| tx.delete::<Tag>(t.uuid));
            Ok(())
        })
        .expect("deletes");
    converge(&[&a, &b], WAIT).unwrap_or_else(|r| panic!("{r}"));
    assert_eq!((tombstones(a.library()), tombstones(b.library())), (3, 3));

    compact_until(&a, &[&a, &b], "the tombstones to go", |n| {
        tombstones(n.library()) == 0
    });
    for node in [&a, &b] {
        assert_eq!(names(node.library()), vec!["kept".to_string()]);
    }
    // A horizon collects at its log position: a replay of the log collects the same rows.
    let digest = b.library().digest().expect("digest");
    b.library().rebuild(&mut |_, _| {}).expect("rebuilds");
    assert_eq!(b.library().digest().expect("digest"), digest);
    // A tag made again under a collected uuid shows as new, the same on both.
    a.library()
        .transact(|tx| Ok(tx.upsert(&gone[0])))
        .expect("commits");
    converge(&[&a, &b], WAIT).unwrap_or_else(|r| panic!("{r}"));
    assert_eq!(
        names(b.library()),
        vec!["gone 0".to_string(), "kept".into()]
    );
}

/// `b` renames a tag while it is away; `a` then deletes it. While `b` is away its last floor
/// (older than the delete) holds the tombstone back, so when `b` comes back its older rename
/// loses to the delete on both devices; once `b` has reported a newer floor the tombstone goes.
#[test]
fn an_away_device_holds_back_the_tombstones_its_offline_edits_could_lose_to() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_ha, a) = founder(dir.path(), "a", "lib").expect("founds");
    let (home_b, b) = joiner(dir.path(), "b", &a).expect("joins");
    let holiday = tag("holiday");
    a.library()
        .transact(|tx| Ok(tx.upsert(&holiday)))
        .expect("commits");
    converge(&[&a, &b], WAIT).unwrap_or_else(|r| panic!("{r}"));
    // b reports floors while connected; then it goes away.
    std::thread::sleep(Duration::from_millis(300));
    let listen = b.local_addr();
    b.stop().expect("b goes away");
    {
        let alone = Library::open(&home_b, "lib", PASSWORD).expect("b opens alone");
        let renamed = Tag {
            name: "renamed while away".into(),
            ..holiday.clone()
        };
        alone
            .transact(|tx| Ok(tx.upsert(&renamed)))
            .expect("b renames");
        alone.close().expect("closes");
    }
    std::thread::sleep(Duration::from_millis(5));
    a.library()
        .transact(|tx| {
            tx.delete::<Tag>(holiday.uuid);
            Ok(())
        })
        .expect("a deletes");
    // For a second, a horizon whenever the floors allow a newer one.
    for _ in 0..10 {
        a.library().flush().expect("flushes");
        a.collect_tombstones().expect("collects");
        std::thread::sleep(Duration::from_millis(100));
    }
    a.library().flush().expect("flushes");
    assert_eq!(
        tombstones(a.library()),
        1,
        "b's last floor is older than the delete: the tombstone stays"
    );

    let b = restart(&home_b, "lib", listen).expect("b comes back");
    converge(&[&a, &b], WAIT).unwrap_or_else(|r| panic!("{r}"));
    for node in [&a, &b] {
        assert!(names(node.library()).is_empty(), "the older rename loses");
    }
    compact_until(&a, &[&a, &b], "the tombstone to go", |n| {
        tombstones(n.library()) == 0
    });
    for node in [&a, &b] {
        assert!(names(node.library()).is_empty());
    }
}

/// With no tombstone to collect, a compaction appends no horizon: the log ends where every
/// device acknowledged it, so a device that is away does not hold the compaction back.
#[test]
fn a_compaction_with_nothing_to_collect_appends_no_horizon() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_ha, a) = founder(dir.path(), "a", "lib").expect("founds");
    let (_hb, b) = joiner(dir.path(), "b", &a).expect("joins");
    a.library()
        .transact(|tx| Ok(tx.upsert(&tag("kept"))))
        .expect("commits");
    converge(&[&a, &b], WAIT).unwrap_or_else(|r| panic!("{r}"));
    // b acknowledges floors and the whole log, then goes away.
    std::thread::sleep(Duration::from_millis(300));
    b.stop().expect("b goes away");
    let end = a.library().status().expect("status").journal.last_lsn;
    let deadline = Instant::now() + WAIT;
    while a.status().compactable < end || a.status().horizon.is_none() {
        assert!(Instant::now() < deadline, "{:?}", a.status());
        std::thread::sleep(Duration::from_millis(20));
    }
    let report = a.compact().expect("compacts");
    assert_eq!((report.base, report.waiting_at), (end, None), "{report:?}");
    assert!(!a.collect_tombstones().expect("collects"));
    assert_eq!(a.library().status().expect("status").journal.last_lsn, end);
}

/// A device's floor is never above a change waiting in its offline journal, however old its
/// clock (a change carried in from elsewhere keeps its own), and rises past it once it is
/// sequenced.
#[test]
fn a_floor_stays_at_or_below_every_change_waiting_to_be_pushed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_ha, a) = founder(dir.path(), "a", "lib").expect("founds");
    let (_hb, b) = joiner(dir.path(), "b", &a).expect("joins");
    converge(&[&a, &b], WAIT).unwrap_or_else(|r| panic!("{r}"));
    let floor = |n: &Node| n.library().clock_floor().expect("reads").expect("known");
    b.set_offline(true);
    let old = keel_schema::Hlc {
        physical_ms: 1_000,
        counter: 3,
        device: b.library().device_id(),
    };
    let carried = keel_schema::Change::upsert(keel_schema::ChangeId::new(), old, &tag("carried"))
        .expect("sync-ready");
    b.library()
        .transact(|tx| {
            tx.push(carried);
            Ok(())
        })
        .expect("commits while cut off");
    assert_eq!(b.library().status().expect("status").journal.offline, 1);
    assert_eq!(floor(&b), old, "the waiting change's own clock");
    b.set_offline(false);
    converge(&[&a, &b], WAIT).unwrap_or_else(|r| panic!("{r}"));
    assert!(floor(&b) > old, "{:?}", floor(&b));
}

/// A device a follower invited is waited for from its endorsement on, before its own Device
/// record reaches the leader: the leader has no horizon until the new device reports a clock
/// floor (a change it made offline meanwhile may be older than a tombstone), and has one again
/// once it does.
#[test]
fn the_horizon_waits_for_a_device_a_follower_invited() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_ha, a) = founder(dir.path(), "a", "lib").expect("founds");
    let (_hb, b) = joiner(dir.path(), "b", &a).expect("b joins");
    converge(&[&a, &b], WAIT).expect("converges");
    wait_status(&a, "a horizon over a and b", |s| s.horizon.is_some());

    let home_c = keel_engine::Home::new(dir.path().join("c"));
    let name = keel_tests::cluster::pair(&home_c, &b, b.local_addr()).expect("c pairs with b");
    let lib_c = Library::open(&home_c, &name, PASSWORD).expect("c opens");
    let c_id = lib_c.device_id().to_hex();
    wait_status(&a, "no horizon while c has not reported", |s| {
        s.horizon.is_none() && s.horizon_waits_for == [c_id.clone()]
    });

    let c =
        Node::start(lib_c, keel_tests::cluster::options(vec![b.local_addr()])).expect("c starts");
    converge(&[&a, &b, &c], WAIT).expect("the three converge");
    wait_status(&a, "a horizon over a, b and c", |s| {
        s.horizon.is_some() && s.horizon_waits_for.is_empty()
    });
}
