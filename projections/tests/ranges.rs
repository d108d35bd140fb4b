//! Anti-entropy over key ranges against real SQLite files: two projections of the same changes
//! agree range by range; a damaged row shows in exactly its range, and replacing that range
//! with the other's rows restores the digest without touching the rest.

use keel_projections::{KeyRange, Projections, RangeDigest, RANGES_MAX};
use keel_schema::{Change, Syncable, Tag};
use uuid::Uuid;

mod support;
use support::Gen;

fn tags(n: usize) -> Vec<Change> {
    let mut g = Gen {
        device: support::device(),
        ms: 1000,
    };
    (0..n)
        .map(|i| {
            g.upsert(&Tag {
                uuid: Uuid::new_v4(),
                name: format!("tag {i}"),
                color: None,
                created_ms: i as i64,
            })
        })
        .collect()
}

fn projection(dir: &tempfile::TempDir, name: &str, changes: &[Change]) -> Projections {
    let mut p = Projections::open(&dir.path().join(name)).expect("opens");
    p.apply(changes, None).expect("applies");
    p
}

/// `here` cuts its tag rows, `there` digests its own over the same bounds: the cut, and the
/// ranges whose digests differ.
fn compare(
    here: &Projections,
    there: &Projections,
) -> (Vec<(KeyRange, RangeDigest)>, Vec<KeyRange>) {
    let split = here
        .query()
        .split_range(Tag::DEF, KeyRange::ALL, RANGES_MAX)
        .expect("splits");
    let bounds: Vec<KeyRange> = split.iter().map(|(r, _)| *r).collect();
    let theirs = there
        .query()
        .range_digests(Tag::DEF, &bounds)
        .expect("digests");
    let differing = split
        .iter()
        .zip(&theirs)
        .filter(|((_, d), t)| d != *t)
        .map(|((r, _), _)| *r)
        .collect();
    (split, differing)
}

#[test]
fn a_damaged_row_differs_in_its_range_alone_and_its_repair_restores_the_digest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let changes = tags(2_000);
    let a = projection(&dir, "a.sqlite", &changes);
    let mut b = projection(&dir, "b.sqlite", &changes);
    let def = Tag::DEF;
    assert_eq!(
        a.query().digest().expect("works"),
        b.query().digest().expect("works")
    );

    // B cuts, A digests over B's bounds: all equal.
    let (split, differing) = compare(&b, &a);
    assert_eq!(split.len(), 250, "2,000 rows in ranges of 8");
    assert_eq!(split.iter().map(|(_, d)| d.rows).sum::<u64>(), 2_000);
    assert!(differing.is_empty());

    // Damage one row of B.
    let victim = split[100].0.start.expect("a start");
    b.connection()
        .execute(
            "UPDATE tag SET name = 'damaged' WHERE uuid = ?1",
            [victim.as_bytes().as_slice()],
        )
        .expect("works");
    assert_ne!(
        a.query().digest().expect("works"),
        b.query().digest().expect("works")
    );
    let (_, differing) = compare(&b, &a);
    assert_eq!(differing.len(), 1);
    assert!(differing[0].holds(victim));

    // Repair: A's rows of that range replace B's; the other rows keep their rowids.
    let rowids = |p: &Projections| -> Vec<(Vec<u8>, i64)> {
        let mut stmt = p
            .connection()
            .prepare("SELECT uuid, rowid FROM tag ORDER BY uuid")
            .expect("works");
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .expect("works")
            .collect::<Result<Vec<_>, _>>()
            .expect("works");
        rows
    };
    let before = rowids(&b);
    let images = a
        .query()
        .range_rows(def, differing[0], None, 10_000)
        .expect("works");
    assert_eq!(images.len(), 8);
    let written = b.replace_range(def, differing[0], &images).expect("works");
    assert_eq!(written, 8);
    assert_eq!(
        a.query().digest().expect("works"),
        b.query().digest().expect("works")
    );
    let after = rowids(&b);
    let moved: Vec<_> = before
        .iter()
        .zip(&after)
        .filter(|(x, y)| x != y)
        .map(|(x, _)| Uuid::from_slice(&x.0).expect("works"))
        .collect();
    assert!(!moved.is_empty() && moved.len() <= 8);
    assert!(moved.iter().all(|u| differing[0].holds(*u)));
}

#[test]
fn rows_outside_the_range_or_malformed_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let changes = tags(50);
    let a = projection(&dir, "a.sqlite", &changes);
    let mut b = projection(&dir, "b.sqlite", &changes);
    let def = Tag::DEF;
    let split = a.query().split_range(def, KeyRange::ALL, 4).expect("works");
    assert_eq!(split.len(), 4);
    let (first, second) = (split[0].0, split[1].0);
    let images = a.query().range_rows(def, second, None, 100).expect("works");
    let digest = b.query().digest().expect("works");
    assert!(
        b.replace_range(def, first, &images).is_err(),
        "rows of another range"
    );
    let mut reversed = images.clone();
    reversed.reverse();
    assert!(
        b.replace_range(def, second, &reversed).is_err(),
        "out of order"
    );
    assert!(
        b.replace_range(def, second, &[vec![0, 1, 9]]).is_err(),
        "malformed"
    );
    assert_eq!(b.query().digest().expect("works"), digest);
    // Paging by `after` returns the range in pieces.
    let head = a.query().range_rows(def, second, None, 3).expect("works");
    assert_eq!(head.len(), 3);
    assert_eq!(head[..], images[..3]);
}
