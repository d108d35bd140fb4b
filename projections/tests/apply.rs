//! Apply semantics against a real SQLite file: order independence, parking, the two-step cycle,
//! tombstones, LWW.

use keel_projections::{AppliedPosition, Projections};
use keel_schema::{
    content_uuid, user_metadata_tag_uuid, Change, ChangeId, ContentIdentity, Device, DeviceId,
    Entry, EntryKind, Location, Lsn, Tag, UserMetadata, UserMetadataTag, Value,
};
use uuid::Uuid;

mod support;
use support::Gen;

/// A small library: device, location, content, an entry with entry-scoped metadata (the cycle),
/// content-scoped metadata with a tag, a second entry later deleted.
fn scenario() -> Vec<Change> {
    let device = support::device();
    let mut g = Gen { device, ms: 1000 };
    let lib = Uuid::new_v4();
    let dev = Device {
        uuid: device.record_uuid(),
        device_id: device.to_hex(),
        name: "laptop".into(),
        os: "linux".into(),
        created_ms: 1,
    };
    let loc = Location {
        uuid: Uuid::now_v7(),
        device: dev.uuid,
        path: "/data".into(),
        name: "data".into(),
        created_ms: 2,
    };
    let content = ContentIdentity {
        uuid: Some(content_uuid(lib, "abc")),
        content_hash: "abc".into(),
        mime: None,
        kind: "text".into(),
        size: 3,
        entry_count: 0,
        total_size: 0,
    };
    let entry_uuid = Uuid::now_v7();
    let meta = UserMetadata {
        uuid: Uuid::now_v7(),
        entry: Some(entry_uuid),
        content: None,
        notes: Some("entry note".into()),
        favorite: true,
        hidden: false,
        custom_data: None,
    };
    let entry = Entry {
        uuid: Some(entry_uuid),
        location: loc.uuid,
        relative_path: String::new(),
        name: "a.txt".into(),
        kind: EntryKind::File.code(),
        size: 3,
        created_ms: 0,
        modified_ms: 5,
        content: content.uuid,
        metadata: Some(meta.uuid),
        inode: None,
        volume: None,
    };
    let gone = Entry {
        uuid: Some(Uuid::now_v7()),
        name: "b.txt".into(),
        metadata: None,
        inode: None,
        volume: None,
        ..entry.clone()
    };
    let cmeta = UserMetadata {
        uuid: Uuid::now_v7(),
        entry: None,
        content: content.uuid,
        notes: Some("content note".into()),
        favorite: false,
        hidden: false,
        custom_data: None,
    };
    let tag = Tag {
        uuid: Uuid::now_v7(),
        name: "red".into(),
        color: None,
        created_ms: 3,
    };
    let umt = UserMetadataTag {
        uuid: user_metadata_tag_uuid(cmeta.uuid, tag.uuid),
        user_metadata: cmeta.uuid,
        tag: tag.uuid,
        created_ms: 4,
    };
    let mut out = Vec::new();
    let mut push = |c: Option<Change>| out.push(c.expect("sync-ready"));
    push(Change::upsert(ChangeId::new(), g.hlc(), &dev));
    push(Change::upsert(ChangeId::new(), g.hlc(), &loc));
    push(Change::upsert(ChangeId::new(), g.hlc(), &content));
    push(Change::upsert(ChangeId::new(), g.hlc(), &entry));
    push(Change::upsert(ChangeId::new(), g.hlc(), &meta));
    push(Change::upsert(ChangeId::new(), g.hlc(), &gone));
    push(Change::upsert(ChangeId::new(), g.hlc(), &cmeta));
    push(Change::upsert(ChangeId::new(), g.hlc(), &tag));
    push(Change::upsert(ChangeId::new(), g.hlc(), &umt));
    push(
        Change::upsert_fields::<UserMetadata>(
            ChangeId::new(),
            g.hlc(),
            cmeta.uuid,
            vec![("notes", Value::Text("edited".into()))],
        )
        .ok(),
    );
    push(Some(Change::delete::<Entry>(
        ChangeId::new(),
        g.hlc(),
        gone.uuid.unwrap_or_default(),
    )));
    out
}

/// The digest after applying `attestations`, then `changes` `batch` at a time.
fn digest_of(
    attestations: &[Change],
    changes: &[Change],
    batch: usize,
) -> (String, Projections, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut p = Projections::open(&dir.path().join("p.sqlite")).expect("opens");
    p.apply(attestations, None).expect("attestations apply");
    for chunk in changes.chunks(batch) {
        p.apply(chunk, None).expect("applies");
    }
    (p.query().digest().expect("digest"), p, dir)
}

#[test]
fn any_order_gives_the_same_rows() {
    let changes = scenario();
    let atts = support::attestations(&changes);
    let (forward, p, _d) = digest_of(&atts, &changes, 100);
    let counts = p.query().counts().expect("counts");
    assert_eq!(counts.entries, 1, "the deleted entry is hidden");
    assert_eq!(counts.user_metadata, 2);
    assert_eq!(counts.user_metadata_tags, 1);
    assert_eq!(p.parked_len(), 0);
    let mut reversed = changes.clone();
    reversed.reverse();
    for batch in [1, 3, 100] {
        let (d, p2, _d2) = digest_of(&atts, &reversed, batch);
        assert_eq!(d, forward, "reversed, batch {batch}");
        assert_eq!(p2.parked_len(), 0);
    }
    // A rotation of one-at-a-time applies.
    for k in 1..changes.len() {
        let mut rotated = changes.clone();
        rotated.rotate_left(k);
        let (d, _, _dir) = digest_of(&atts, &rotated, 1);
        assert_eq!(d, forward, "rotation {k}");
    }
}

#[test]
fn entry_cycle_is_applied_in_two_steps() {
    let changes = scenario();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut p = Projections::open(&dir.path().join("p.sqlite")).expect("opens");
    support::vouch(&mut p, &changes);
    // Device, location, content, entry — but not the entry's metadata yet.
    p.apply(&changes[..4], None).expect("applies");
    let entry_uuid = changes[3].record;
    let entry: Entry = p
        .query()
        .get(entry_uuid)
        .expect("query")
        .expect("entry is visible");
    assert_eq!(entry.metadata, None, "the cycle reference waits");
    assert_eq!(p.parked_len(), 1);
    p.apply(&changes[4..5], None).expect("applies");
    let entry: Entry = p
        .query()
        .get(entry_uuid)
        .expect("query")
        .expect("entry is visible");
    assert_eq!(entry.metadata, Some(changes[4].record));
    assert_eq!(p.parked_len(), 0);
    let md = p.query().metadata_of(&entry).expect("metadata");
    assert_eq!(
        md.entry.map(|(m, _)| m.notes),
        Some(Some("entry note".into()))
    );
}

#[test]
fn a_change_without_its_dependency_waits_and_is_never_shown() {
    let changes = scenario();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut p = Projections::open(&dir.path().join("p.sqlite")).expect("opens");
    support::vouch(&mut p, &changes);
    // The entry before its location exists.
    let stats = p.apply(&changes[3..4], None).expect("applies");
    assert_eq!(stats.parked, 1);
    assert_eq!(p.query().counts().expect("counts").entries, 0);
    p.apply(
        &changes[..3],
        Some(AppliedPosition {
            log: Lsn(3),
            local: 0,
        }),
    )
    .expect("applies");
    assert_eq!(p.query().counts().expect("counts").entries, 1);
    assert_eq!(p.applied_position().expect("pos").log, Lsn(3));
}

#[test]
fn last_writer_wins_per_field_and_reapply_is_a_no_op() {
    let changes = scenario();
    let (before, mut p, _d) = digest_of(&support::attestations(&changes), &changes, 100);
    let stats = p.apply(&changes, None).expect("reapplies");
    assert_eq!(stats.applied, 0);
    assert_eq!(p.query().digest().expect("digest"), before);
    let cmeta = changes[6].record;
    let m: UserMetadata = p.query().get(cmeta).expect("query").expect("visible");
    assert_eq!(m.notes.as_deref(), Some("edited"));
    assert!(!m.favorite);
    let content = p
        .query()
        .content_identity(changes[2].record)
        .expect("query")
        .expect("visible");
    assert_eq!(
        (content.entry_count, content.total_size),
        (1, 3),
        "derived, not synced"
    );
}

#[test]
fn a_background_checkpoint_moves_applied_rows_into_the_database_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("p.sqlite");
    let mut p = Projections::open(&path).expect("opens");
    let size = || std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    let before = size();
    let device = DeviceId([9; 32]);
    let mut g = Gen { device, ms: 1 };
    let changes: Vec<Change> = (0..2_000)
        .map(|i| {
            let tag = Tag {
                uuid: Uuid::now_v7(),
                name: format!("t{i}"),
                color: None,
                created_ms: 1,
            };
            Change::upsert(ChangeId::new(), g.hlc(), &tag).expect("tag has a uuid")
        })
        .collect();
    p.apply(&changes, Some(AppliedPosition::default()))
        .expect("applies");
    // The apply itself left its pages in the WAL; the checkpointer copies them within about
    // `CHECKPOINT_INTERVAL`, without the writer doing anything more.
    let deadline = std::time::Instant::now() + keel_projections::CHECKPOINT_INTERVAL * 3;
    while size() <= before {
        assert!(
            std::time::Instant::now() < deadline,
            "no checkpoint: the database file stayed at {before} bytes"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(p.query().counts().expect("counts").tags, 2_000);
}

#[test]
fn existing_answers_for_many_uuids_in_order_and_skips_tombstones() {
    let mut g = Gen {
        device: DeviceId([5; 32]),
        ms: 1,
    };
    let lib = Uuid::new_v4();
    // More than one lookup chunk: 600 contents, every third deleted, and 300 never written.
    let contents: Vec<ContentIdentity> = (0..600)
        .map(|i| ContentIdentity {
            uuid: Some(content_uuid(lib, &format!("h{i}"))),
            content_hash: format!("h{i}"),
            mime: None,
            kind: "text".into(),
            size: i,
            entry_count: 0,
            total_size: 0,
        })
        .collect();
    let mut changes = Vec::new();
    for c in &contents {
        changes.extend(Change::upsert(ChangeId::new(), g.hlc(), c));
    }
    for c in contents.iter().step_by(3) {
        changes.push(Change::delete::<ContentIdentity>(
            ChangeId::new(),
            g.hlc(),
            c.uuid.unwrap_or_default(),
        ));
    }
    let (_, p, _dir) = digest_of(&[], &changes, 1000);
    let mut asked: Vec<Uuid> = contents.iter().filter_map(|c| c.uuid).collect();
    asked.extend((0..300).map(|i| content_uuid(lib, &format!("missing{i}"))));
    asked.reverse();
    let got = p
        .query()
        .existing::<ContentIdentity>(&asked)
        .expect("looks up");
    let expected: Vec<bool> = asked
        .iter()
        .map(|u| {
            contents
                .iter()
                .position(|c| c.uuid == Some(*u))
                .is_some_and(|i| i % 3 != 0)
        })
        .collect();
    assert_eq!(got, expected);
    assert_eq!(got.iter().filter(|x| **x).count(), 400);
}

/// Issue 24: a deleted Device record stays deleted. Revoking a device deletes its record; an
/// upsert the revoked device writes afterwards (a newer clock) must not bring it back on any
/// device, including ones that join later and replay the whole log.
#[test]
fn a_deleted_device_record_stays_deleted_whatever_comes_after() {
    let dir = tempfile::tempdir().expect("tempdir");
    let device = support::device();
    let mut g = Gen { device, ms: 1000 };
    let dev = Device {
        uuid: device.record_uuid(),
        device_id: device.to_hex(),
        name: "phone".into(),
        os: "android".into(),
        created_ms: 1,
    };
    let upsert = |hlc| Change::upsert(ChangeId::new(), hlc, &dev).expect("upsert");
    let changes = vec![
        upsert(g.hlc()),
        Change::delete::<Device>(ChangeId::new(), g.hlc(), dev.uuid),
        upsert(g.hlc()),
    ];
    let orders: [Vec<Change>; 2] = [changes.clone(), changes.iter().rev().cloned().collect()];
    for (i, order) in orders.iter().enumerate() {
        let mut p = Projections::open(&dir.path().join(format!("p{i}.sqlite"))).expect("opens");
        support::vouch(&mut p, order);
        p.apply(order, Some(AppliedPosition::default()))
            .expect("applies");
        assert!(
            p.query().get::<Device>(dev.uuid).expect("reads").is_none(),
            "a revoked device's record came back"
        );
    }
}

/// Issue 25: a change of a model this build lacks (a newer app's, another host's) is kept aside
/// with its model named, never applied and never an error; once is enough however often it
/// comes.
#[test]
fn a_change_of_a_model_this_build_lacks_is_kept_aside_and_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut p = Projections::open(&dir.path().join("p.sqlite")).expect("opens");
    let mut g = Gen {
        device: DeviceId([5; 32]),
        ms: 1,
    };
    let tag = Tag {
        uuid: Uuid::now_v7(),
        name: "from a newer app".into(),
        color: None,
        created_ms: 1,
    };
    let mut newer = Change::upsert(ChangeId::new(), g.hlc(), &tag).expect("ready");
    newer.model = 200;
    let decoded = Change::decode(&newer.encode()).expect("a model this build lacks decodes");
    for _ in 0..2 {
        let stats = p
            .apply(std::slice::from_ref(&decoded), None)
            .expect("applies");
        assert_eq!(stats.lacking, 1, "{stats:?}");
    }
    assert_eq!(
        p.query().lacking_models().expect("lists"),
        vec![keel_projections::Lacking {
            model: 200,
            version: 0,
            changes: 1
        }]
    );
    assert_eq!(p.query().counts().expect("counts").tags, 0);
}
