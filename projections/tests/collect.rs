//! Horizons collect tombstones (decision 0082): at a horizon's log position, a row holding only
//! a tombstone older than its bound goes (unless a row references it), a row written again after
//! such a tombstone loses it, and two devices that held different rows for their own unsequenced
//! writes end with the same rows once those writes arrive.

use keel_projections::Projections;
use keel_schema::{Change, ChangeId, DeviceId, Hlc, Horizon, Tag, UserMetadata, UserMetadataTag};
use keel_schema::{Syncable, Value};
use uuid::Uuid;

const OLD: Uuid = Uuid::from_u128(0x01d);
const RECENT: Uuid = Uuid::from_u128(0x2ece);

fn at(ms: u64) -> Hlc {
    Hlc {
        physical_ms: ms,
        counter: 0,
        device: DeviceId([3; 32]),
    }
}

fn tag(uuid: Uuid, ms: u64) -> Change {
    let tag = Tag {
        uuid,
        name: format!("tag-{ms}"),
        color: Some("red".into()),
        created_ms: 1,
    };
    Change::upsert(ChangeId::new(), at(ms), &tag).expect("sync-ready")
}

fn delete<M: Syncable>(uuid: Uuid, ms: u64) -> Change {
    Change::delete::<M>(ChangeId::new(), at(ms), uuid)
}

fn rename(uuid: Uuid, ms: u64, name: &str) -> Change {
    Change::upsert_fields::<Tag>(
        ChangeId::new(),
        at(ms),
        uuid,
        vec![("name", Value::Text(name.into()))],
    )
    .expect("a tag field")
}

fn horizon(ms: u64, before_ms: u64) -> Change {
    let horizon = Horizon {
        uuid: Uuid::now_v7(),
        before_ms: before_ms as i64,
        before_counter: 0,
    };
    Change::upsert(ChangeId::new(), at(ms), &horizon).expect("sync-ready")
}

fn open(dir: &tempfile::TempDir, name: &str) -> Projections {
    Projections::open(&dir.path().join(name)).expect("opens")
}

/// Applies `changes` as log entries at positions `first`, `first + 1`, …
fn log(p: &mut Projections, first: u64, changes: &[Change]) -> keel_projections::ApplyStats {
    let logged: Vec<Option<u64>> = (first..).take(changes.len()).map(Some).collect();
    p.apply_logged(changes, &logged, None).expect("applies")
}

fn rows(p: &Projections, model: &str) -> i64 {
    p.connection()
        .query_row(&format!("SELECT count(*) FROM {model}"), [], |r| r.get(0))
        .expect("counts")
}

fn has_row(p: &Projections, model: &str, uuid: Uuid) -> bool {
    p.connection()
        .query_row(
            &format!("SELECT count(*) FROM {model} WHERE uuid = ?1"),
            [uuid.as_bytes().as_slice()],
            |r| r.get::<_, i64>(0),
        )
        .expect("counts")
        == 1
}

#[test]
fn a_horizon_removes_the_tombstones_older_than_its_bound_and_only_as_a_log_entry() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut p = open(&dir, "p.sqlite");
    log(
        &mut p,
        1,
        &[
            tag(OLD, 10),
            delete::<Tag>(OLD, 30),
            tag(RECENT, 40),
            delete::<Tag>(RECENT, 60),
        ],
    );
    assert_eq!(rows(&p, "tag"), 2);
    // Applied as a local change (not yet sequenced), a horizon collects nothing.
    let early = horizon(70, 50);
    let stats = p
        .apply(std::slice::from_ref(&early), None)
        .expect("applies");
    assert_eq!((stats.collected, rows(&p, "tag")), (0, 2));
    let stats = log(&mut p, 5, &[early]);
    assert_eq!(stats.collected, 1);
    assert!(!has_row(&p, "tag", OLD), "older than the bound: collected");
    assert!(has_row(&p, "tag", RECENT), "newer than the bound: kept");
    // A write newer than the collected tombstone starts the row a new record would.
    log(&mut p, 6, &[rename(OLD, 80, "back")]);
    let fresh = {
        let mut q = open(&dir, "q.sqlite");
        log(&mut q, 1, &[rename(OLD, 80, "back")]);
        q.query()
            .range_rows(Tag::DEF, keel_projections::KeyRange::ALL, None, 10)
            .expect("reads")
    };
    assert_eq!(
        p.query()
            .range_rows(Tag::DEF, keel_projections::KeyRange::ALL, None, 10)
            .expect("reads")[0],
        fresh[0]
    );
}

/// Device x wrote the deleted tag again before its write was sequenced; device y did not see
/// that write until after the horizon. Once it arrives both hold the same rows, and a replay of
/// the log in one batch gives them too.
#[test]
fn a_write_after_a_delete_applied_early_ends_in_the_same_rows_as_on_a_device_that_collected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let before = [tag(OLD, 10), delete::<Tag>(OLD, 30)];
    let write = rename(OLD, 40, "again");
    let bound = horizon(50, 35);

    let mut x = open(&dir, "x.sqlite");
    log(&mut x, 1, &before);
    x.apply(std::slice::from_ref(&write), None)
        .expect("its own write, early");
    log(&mut x, 3, std::slice::from_ref(&bound));
    log(&mut x, 4, std::slice::from_ref(&write));

    let mut y = open(&dir, "y.sqlite");
    log(&mut y, 1, &before);
    let stats = log(&mut y, 3, std::slice::from_ref(&bound));
    assert_eq!(stats.collected, 1);
    assert!(!has_row(&y, "tag", OLD));
    log(&mut y, 4, std::slice::from_ref(&write));

    let mut replayed = open(&dir, "replayed.sqlite");
    let all = [before[0].clone(), before[1].clone(), bound, write];
    log(&mut replayed, 1, &all);

    let digest = x.query().digest().expect("digest");
    assert_eq!(digest, y.query().digest().expect("digest"));
    assert_eq!(digest, replayed.query().digest().expect("digest"));
    assert_eq!(
        x.query()
            .range_rows(Tag::DEF, keel_projections::KeyRange::ALL, None, 10)
            .expect("reads"),
        y.query()
            .range_rows(Tag::DEF, keel_projections::KeyRange::ALL, None, 10)
            .expect("reads")
    );
}

/// A deleted tag that a tag assignment still names stays until the assignment goes too; then one
/// horizon collects both, the assignment first.
#[test]
fn a_tombstone_only_row_that_a_row_references_stays_until_the_reference_goes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut p = open(&dir, "p.sqlite");
    let metadata = UserMetadata {
        uuid: Uuid::from_u128(0x3e7a),
        entry: None,
        content: None,
        notes: Some("a note".into()),
        favorite: false,
        hidden: false,
        custom_data: None,
    };
    let assignment = UserMetadataTag {
        uuid: Uuid::from_u128(0xa551),
        user_metadata: metadata.uuid,
        tag: OLD,
        created_ms: 1,
    };
    let upsert = |ms, record: &dyn Fn(Hlc) -> Option<Change>| record(at(ms)).expect("sync-ready");
    log(
        &mut p,
        1,
        &[
            upsert(10, &|h| Change::upsert(ChangeId::new(), h, &metadata)),
            tag(OLD, 11),
            upsert(12, &|h| Change::upsert(ChangeId::new(), h, &assignment)),
            delete::<Tag>(OLD, 30),
        ],
    );
    let stats = log(&mut p, 5, &[horizon(60, 50)]);
    assert_eq!(stats.collected, 0);
    assert!(has_row(&p, "tag", OLD), "referenced: kept");
    log(
        &mut p,
        6,
        &[
            delete::<UserMetadataTag>(assignment.uuid, 70),
            horizon(90, 80),
        ],
    );
    assert!(!has_row(&p, "user_metadata_tag", assignment.uuid));
    assert!(!has_row(&p, "tag", OLD));
    assert!(has_row(&p, "user_metadata", metadata.uuid));
}

/// A horizon whose bound is past the clock it was made at is forged (a leader's floor never is):
/// it collects nothing.
#[test]
fn a_horizon_bound_past_its_own_clock_collects_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut p = open(&dir, "p.sqlite");
    log(&mut p, 1, &[tag(OLD, 10), delete::<Tag>(OLD, 30)]);
    let stats = log(&mut p, 3, &[horizon(40, 1_000)]);
    assert_eq!(stats.collected, 0);
    assert!(has_row(&p, "tag", OLD));
    let stats = log(&mut p, 4, &[horizon(1_000, 1_000)]);
    assert_eq!(stats.collected, 1);
}
