//! A delete forgets the fields it covers (decision 0073): a write older than the delete is
//! dropped, a row holding only a tombstone answers every newer write as a row that never existed,
//! the result does not depend on the order, and a file of schema version 9 (which kept the
//! fields, and whole clocks) is migrated on open to the rows a replay gives.

use keel_projections::Projections;
use keel_schema::{Change, ChangeId, DeviceId, Hlc, Tag, Value};
use uuid::Uuid;

const RECORD: Uuid = Uuid::from_u128(0x7a9);

fn at(ms: u64) -> Hlc {
    Hlc {
        physical_ms: ms,
        counter: 0,
        device: DeviceId([3; 32]),
    }
}

fn whole(ms: u64) -> Change {
    let tag = Tag {
        uuid: RECORD,
        name: format!("whole-{ms}"),
        color: Some("red".into()),
        created_ms: 1,
    };
    Change::upsert(ChangeId::new(), at(ms), &tag).expect("sync-ready")
}

fn field(ms: u64, name: &str, value: Value) -> Change {
    Change::upsert_fields::<Tag>(ChangeId::new(), at(ms), RECORD, vec![(name, value)])
        .expect("a tag field")
}

fn delete(ms: u64) -> Change {
    Change::delete::<Tag>(ChangeId::new(), at(ms), RECORD)
}

fn open(dir: &tempfile::TempDir, name: &str) -> Projections {
    Projections::open(&dir.path().join(name)).expect("opens")
}

/// The row of the record as stored, every column but the uuid (`None`: no row).
fn stored(p: &Projections) -> Option<Vec<rusqlite::types::Value>> {
    use rusqlite::OptionalExtension;
    p.connection()
        .query_row(
            "SELECT name, color, created_ms, _clocks, _live FROM tag WHERE uuid = ?1",
            [RECORD.as_bytes().as_slice()],
            |r| (0..5).map(|i| r.get(i)).collect(),
        )
        .optional()
        .expect("reads")
}

fn visible(p: &Projections) -> Option<Tag> {
    p.query().get::<Tag>(RECORD).expect("reads")
}

#[test]
fn a_delete_forgets_what_it_covers_and_its_row_answers_newer_writes_as_no_row() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut deleted = open(&dir, "deleted.sqlite");
    let mut never = open(&dir, "never.sqlite");
    deleted
        .apply(&[whole(10), delete(30)], None)
        .expect("applies");
    let row = stored(&deleted).expect("the tombstone row");
    assert!(
        row[..3].iter().all(|v| *v == rusqlite::types::Value::Null),
        "every field written before the delete is forgotten: {row:?}"
    );

    // Older than the delete: dropped.
    deleted
        .apply(&[field(20, "name", Value::Text("late".into()))], None)
        .expect("applies");
    assert_eq!(
        stored(&deleted).expect("row")[0],
        rusqlite::types::Value::Null
    );

    // Newer than the delete, but not every required field: hidden, as on a device that never
    // held the record, with the same fields and clocks.
    let rename = field(40, "name", Value::Text("renamed".into()));
    deleted
        .apply(std::slice::from_ref(&rename), None)
        .expect("applies");
    never.apply(&[rename], None).expect("applies");
    assert_eq!(visible(&deleted), None, "a rename does not bring it back");
    assert_eq!(stored(&deleted), stored(&never));

    // The last required field: visible on both, the colour written before the delete gone.
    let created = field(50, "created_ms", Value::Int(7));
    deleted
        .apply(std::slice::from_ref(&created), None)
        .expect("applies");
    never.apply(&[created], None).expect("applies");
    let tag = visible(&deleted).expect("visible again");
    assert_eq!(
        (tag.name.as_str(), tag.color, tag.created_ms),
        ("renamed", None, 7)
    );
    assert_eq!(stored(&deleted), stored(&never));
}

/// Every order of `changes`, one change at a time.
fn orders(changes: &[Change]) -> Vec<Vec<Change>> {
    if changes.len() <= 1 {
        return vec![changes.to_vec()];
    }
    let mut out = Vec::new();
    for i in 0..changes.len() {
        let mut rest = changes.to_vec();
        let first = rest.remove(i);
        for mut order in orders(&rest) {
            order.insert(0, first.clone());
            out.push(order);
        }
    }
    out
}

#[test]
fn writes_and_deletes_give_the_same_row_in_every_order() {
    let changes = [
        whole(10),
        field(20, "color", Value::Text("blue".into())),
        delete(30),
        field(40, "name", Value::Text("renamed".into())),
        delete(35),
    ];
    let dir = tempfile::tempdir().expect("tempdir");
    let mut expected = None;
    for (i, order) in orders(&changes).into_iter().enumerate() {
        let mut p = open(&dir, &format!("{i}.sqlite"));
        for change in order {
            p.apply(&[change], None).expect("applies");
        }
        let got = (stored(&p), p.query().digest().expect("digest"));
        assert_eq!(
            expected.get_or_insert_with(|| got.clone()),
            &got,
            "order {i}"
        );
    }
    let (row, _) = expected.expect("orders ran");
    let row = row.expect("a row");
    assert_eq!(row[0], rusqlite::types::Value::Text("renamed".into()));
    assert_eq!(
        row[1],
        rusqlite::types::Value::Null,
        "blue was before a delete"
    );
    assert_eq!(
        row[4],
        rusqlite::types::Value::Integer(0),
        "created_ms forgotten"
    );
}

#[test]
fn a_version_9_projection_is_migrated_to_the_rows_a_replay_gives() {
    let dir = tempfile::tempdir().expect("tempdir");
    let changes = [
        whole(10),
        delete(30),
        field(40, "name", Value::Text("renamed".into())),
    ];
    // What version 9 held: the fields' newest writes whatever the delete, visible since a write
    // is newer than the tombstone. A projection without the delete has those fields; version 9
    // stored each clock whole, `(field index, Hlc::to_bytes)`, and the tombstone the same way.
    let mut undeleted = open(&dir, "undeleted.sqlite");
    undeleted
        .apply(&[changes[0].clone(), changes[2].clone()], None)
        .expect("applies");
    let old = stored(&undeleted).expect("a row");
    let index = |name: &str| -> u8 {
        let i = <Tag as keel_schema::Syncable>::DEF
            .field_index(name)
            .expect("a tag field");
        u8::try_from(i).expect("an index")
    };
    let mut v9_clocks = Vec::new();
    for (name, ms) in [("name", 40), ("color", 10), ("created_ms", 10)] {
        v9_clocks.push(index(name));
        v9_clocks.extend_from_slice(&at(ms).to_bytes());
    }
    let v9_tomb = at(30).to_bytes().to_vec();

    let path = dir.path().join("old.sqlite");
    {
        let mut p = Projections::open(&path).expect("opens");
        p.apply(&changes, None).expect("applies");
        assert_eq!(visible(&p), None);
        p.connection()
            .execute(
                "UPDATE tag SET name = ?1, color = ?2, created_ms = ?3, _clocks = ?4, _tomb = ?5, \
                 _live = 1 WHERE uuid = ?6",
                rusqlite::params![
                    old[0],
                    old[1],
                    old[2],
                    v9_clocks,
                    v9_tomb,
                    RECORD.as_bytes().as_slice()
                ],
            )
            .expect("puts back what version 9 kept");
        p.connection()
            .pragma_update(None, "user_version", 9)
            .expect("marks it version 9");
        assert!(visible(&p).is_some(), "version 9 showed it");
    }
    let migrated = Projections::open(&path).expect("migrates");
    let version: i64 = migrated
        .connection()
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .expect("version");
    assert_eq!(version, 10);
    assert_eq!(
        visible(&migrated),
        None,
        "created_ms was written before the delete"
    );

    let mut replayed = open(&dir, "replayed.sqlite");
    replayed.apply(&changes, None).expect("applies");
    assert_eq!(stored(&migrated), stored(&replayed));
    assert_eq!(
        migrated.query().digest().expect("digest"),
        replayed.query().digest().expect("digest")
    );
}
