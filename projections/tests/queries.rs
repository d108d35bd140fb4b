//! Issue 30: a page of a model's records for a live view, without reading them all.

use keel_projections::Projections;
use keel_schema::uuid::Uuid;
use keel_schema::{Change, ChangeId, Tag};

mod support;
use support::{ApplyVouched, Gen};

fn tag(name: &str) -> Tag {
    Tag {
        uuid: Uuid::now_v7(),
        name: name.into(),
        color: None,
        created_ms: 1,
    }
}

#[test]
fn first_gives_a_page_in_a_field_s_order_and_counts_only_visible_records() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut p = Projections::open(&dir.path().join("p.sqlite")).expect("opens");
    let mut g = Gen {
        device: support::device(),
        ms: 1,
    };
    let tags: Vec<Tag> = ["delta", "alpha", "charlie", "bravo", "echo"]
        .into_iter()
        .map(tag)
        .collect();
    let mut changes: Vec<Change> = tags.iter().map(|t| g.upsert(t)).collect();
    // "bravo" is deleted: neither listed nor counted.
    changes.push(Change::delete::<Tag>(
        ChangeId::new(),
        g.hlc(),
        tags[3].uuid,
    ));
    p.apply_vouched(&changes, None).expect("applies");

    let (first, total) = p.query().first::<Tag>("name", 2).expect("reads");
    let names: Vec<&str> = first.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["alpha", "charlie"]);
    assert_eq!(total, 4);
    let (all, total) = p.query().first::<Tag>("name", 100).expect("reads");
    assert_eq!(all.len(), 4);
    assert_eq!(total, 4);
    assert_eq!(
        all,
        p.query()
            .select::<Tag, _>("1", [])
            .map(|mut t| {
                t.sort_by(|a, b| a.name.cmp(&b.name));
                t
            })
            .expect("reads")
    );
}

#[test]
#[should_panic(expected = "is not a field of tag")]
fn first_refuses_an_order_that_is_not_a_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = Projections::open(&dir.path().join("p.sqlite")).expect("opens");
    let _ = p.query().first::<Tag>("name; DROP TABLE tag", 1);
}
