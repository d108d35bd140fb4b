//! Issue 25: full-text search over entry names and notes, kept current by every apply once built.

use keel_projections::{Projections, SearchMatch};
use keel_schema::uuid::Uuid;
use keel_schema::{Change, ChangeId, ContentIdentity, Entry, Location, UserMetadata};

mod support;
use support::{ApplyVouched, Gen};

fn entry(location: Uuid, name: &str, content: Option<Uuid>) -> Entry {
    Entry {
        content,
        ..support::entry(location, name)
    }
}

fn names(p: &Projections, text: &str) -> Vec<(String, SearchMatch)> {
    p.query()
        .search(text, 10)
        .expect("searches")
        .into_iter()
        .map(|h| (h.entry.name, h.matched))
        .collect()
}

#[test]
fn search_finds_names_and_notes_and_follows_every_change() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut p = Projections::open(&dir.path().join("p.sqlite")).expect("opens");
    let device = support::device();
    let mut g = Gen { device, ms: 1 };
    let location = Location {
        uuid: Uuid::now_v7(),
        device: device.record_uuid(),
        path: "/photos".into(),
        name: "photos".into(),
        created_ms: 1,
    };
    let content = ContentIdentity {
        uuid: Some(Uuid::now_v7()),
        content_hash: "h1".into(),
        mime: None,
        kind: "image".into(),
        size: 1,
        entry_count: 0,
        total_size: 0,
    };
    let beach = entry(location.uuid, "Café on the beach.jpg", content.uuid);
    let dunes = entry(location.uuid, "dunes.jpg", None);
    let mut device_record = keel_schema::Device {
        uuid: device.record_uuid(),
        device_id: device.to_hex(),
        name: "d".into(),
        os: "linux".into(),
        created_ms: 1,
    };
    device_record.name = "laptop".into();
    let first = vec![
        g.upsert(&device_record),
        g.upsert(&location),
        g.upsert(&content),
        g.upsert(&beach),
    ];
    p.apply_vouched(&first, None).expect("applies");
    assert!(
        names(&p, "beach").is_empty(),
        "no index before it is enabled"
    );
    p.enable_search().expect("builds");
    assert_eq!(
        names(&p, "cafe BEA"),
        vec![(beach.name.clone(), SearchMatch::Name)]
    );
    // Typed syntax is only text.
    for hostile in ["\"", "AND", "NEAR(", "*", "beach\" OR \"x", "^", ":"] {
        p.query()
            .search(hostile, 10)
            .expect("never an FTS5 syntax error");
    }
    // A note on the content finds the entry; a new entry is indexed as it is applied; a parked
    // one when it is applied later.
    let note = UserMetadata {
        uuid: Uuid::now_v7(),
        entry: None,
        content: content.uuid,
        notes: Some("sunset with grandma".into()),
        favorite: false,
        hidden: false,
        custom_data: None,
    };
    let late_location = Location {
        uuid: Uuid::now_v7(),
        path: "/late".into(),
        name: "late".into(),
        ..location.clone()
    };
    let late = entry(late_location.uuid, "grandma portrait.png", None);
    let second = vec![g.upsert(&note), g.upsert(&dunes), g.upsert(&late)];
    p.apply_vouched(&second, None).expect("applies");
    assert_eq!(
        names(&p, "grandma"),
        vec![(beach.name.clone(), SearchMatch::Note)],
        "the late entry waits for its location"
    );
    p.apply_vouched(&[g.upsert(&late_location)], None)
        .expect("applies");
    assert_eq!(
        names(&p, "grandma"),
        vec![
            ("grandma portrait.png".to_string(), SearchMatch::Name),
            (beach.name.clone(), SearchMatch::Note)
        ]
    );
    // A rename and a delete are followed.
    let renamed = Entry {
        name: "sand.jpg".into(),
        ..dunes.clone()
    };
    let gone = Change::delete::<Entry>(ChangeId::new(), g.hlc(), late.uuid.expect("uuid"));
    p.apply_vouched(&[g.upsert(&renamed), gone], None)
        .expect("applies");
    assert!(names(&p, "dunes").is_empty());
    assert_eq!(
        names(&p, "sand"),
        vec![("sand.jpg".to_string(), SearchMatch::Name)]
    );
    assert_eq!(names(&p, "portrait"), vec![]);
    // Reopened, the index is still kept.
    drop(p);
    let mut p = Projections::open(&dir.path().join("p.sqlite")).expect("reopens");
    let again = Entry {
        name: "sea.jpg".into(),
        ..renamed
    };
    p.apply_vouched(&[g.upsert(&again)], None).expect("applies");
    assert_eq!(
        names(&p, "sea"),
        vec![("sea.jpg".to_string(), SearchMatch::Name)]
    );
}
