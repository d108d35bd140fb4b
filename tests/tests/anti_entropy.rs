//! Issue 28, anti-entropy: two running devices compare their projections over key ranges
//! (real QUIC on loopback, real SQLite files); a row damaged on one device shows as one range,
//! and the repair rewrites that range alone.

use std::time::Duration;

use keel_node::{Node, LEAF_ROWS};
use keel_schema::{Syncable, Tag};
use keel_tests::cluster::{converge, founder_with_tags, joiner};

/// Enough tags that a first cut (256 ranges) leaves more than `LEAF_ROWS` rows per range, so a
/// differing range is cut again.
const TAGS: usize = 20_000;

/// Damages one tag row of `node`'s projection behind its back (as a bad disk or a hand edit
/// would); returns its uuid.
fn damage_one_tag(node: &Node) -> uuid::Uuid {
    let path = node.library().dir().join("projections.sqlite");
    let conn = rusqlite::Connection::open(&path).expect("opens the projection");
    conn.busy_timeout(Duration::from_secs(10)).expect("timeout");
    let uuid: Vec<u8> = conn
        .query_row(
            "SELECT uuid FROM tag ORDER BY uuid LIMIT 1 OFFSET 12345",
            [],
            |r| r.get(0),
        )
        .expect("a tag");
    let changed = conn
        .execute(
            "UPDATE tag SET name = 'damaged' WHERE uuid = ?1",
            [uuid.as_slice()],
        )
        .expect("damages");
    assert_eq!(changed, 1);
    uuid::Uuid::from_slice(&uuid).expect("a uuid")
}

#[test]
fn a_damaged_row_is_found_by_range_and_the_repair_touches_only_its_range() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_ha, a) = founder_with_tags(dir.path(), "a", "lib", TAGS).expect("founder");
    let (_hb, b) = joiner(dir.path(), "b", &a).expect("joiner");
    converge(&[&a, &b], Duration::from_secs(60)).expect("converges");
    let a_id = a.library().device_id().to_hex();

    let clean = b.verify_against(&a_id, false).expect("compares");
    assert!(clean.differing.is_empty(), "{clean:?}");
    assert!(clean.models >= 7 && clean.ranges_compared >= clean.models as u64);
    assert_eq!(clean.applied_here, clean.applied_there);

    let victim = damage_one_tag(&b);
    assert_ne!(
        a.library().digest().expect("digest"),
        b.library().digest().expect("digest")
    );
    let found = b.verify_against(&a_id, false).expect("compares");
    assert_eq!(found.differing.len(), 1, "{found:?}");
    let diff = &found.differing[0];
    assert_eq!(diff.model, Tag::DEF.name);
    assert!(diff.start.is_none_or(|s| victim >= s) && diff.end.is_none_or(|e| victim < e));
    assert!(diff.rows_here <= LEAF_ROWS && diff.rows_here == diff.rows_there);
    assert!(!found.repaired);
    assert!(
        found.ranges_compared > clean.ranges_compared,
        "the differing range was cut again: {found:?}"
    );

    let repaired = b.verify_against(&a_id, true).expect("repairs");
    eprintln!(
        "{} ranges compared clean, {} with the damage; {} rows written by the repair",
        clean.ranges_compared, found.ranges_compared, repaired.rows_written
    );
    assert!(repaired.repaired);
    assert_eq!(repaired.differing, found.differing);
    assert_eq!(repaired.rows_written, diff.rows_there);
    assert!(repaired.rows_written <= LEAF_ROWS, "{repaired:?}");
    assert_eq!(
        a.library().digest().expect("digest"),
        b.library().digest().expect("digest")
    );
    assert!(b
        .verify_against(&a_id, false)
        .expect("compares")
        .differing
        .is_empty());
    // A device cannot be compared with itself, nor with one never reached.
    assert!(b
        .verify_against(&b.library().device_id().to_hex(), false)
        .is_err());
    assert!(b.verify_against("ffffffff", false).is_err());
    b.stop().expect("stops");
    a.stop().expect("stops");
}
