//! Several devices on loopback with real QUIC, redb and SQLite: pairing, replication, offline
//! writes, leader failover, partitions healing, hostile peers.

use std::time::Duration;

use keel_engine::Tag;
use keel_tests::cluster::{converge, founder, joiner};
use uuid::Uuid;

const CONVERGE: Duration = Duration::from_secs(30);

fn tag(name: &str) -> Tag {
    Tag {
        uuid: Uuid::new_v4(),
        name: name.into(),
        color: None,
        created_ms: 1,
    }
}

#[test]
fn three_devices_pair_and_replicate_both_ways() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_ha, a) = founder(dir.path(), "a", "photos").expect("founder");
    let (_hb, b) = joiner(dir.path(), "b", &a).expect("b joins");
    let (_hc, c) = joiner(dir.path(), "c", &a).expect("c joins");
    let from_a = tag("from a");
    let from_b = tag("from b");
    let from_c = tag("from c");
    a.library()
        .transact(|tx| {
            tx.upsert(&from_a);
            Ok(())
        })
        .expect("a commits");
    b.library()
        .transact(|tx| {
            tx.upsert(&from_b);
            Ok(())
        })
        .expect("b commits");
    c.library()
        .transact(|tx| {
            tx.upsert(&from_c);
            Ok(())
        })
        .expect("c commits");
    let digest =
        converge(&[&a, &b, &c], CONVERGE).unwrap_or_else(|r| panic!("no convergence:\n{r}"));
    for node in [&a, &b, &c] {
        for t in [&from_a, &from_b, &from_c] {
            assert_eq!(
                node.library().get::<Tag>(t.uuid).expect("reads").as_ref(),
                Some(t)
            );
        }
        assert_eq!(
            node.status().role == "leader",
            node.library().device_id() == a.library().device_id()
        );
    }
    assert_eq!(a.library().devices().expect("devices").len(), 3);
    assert!(!digest.is_empty());
}
