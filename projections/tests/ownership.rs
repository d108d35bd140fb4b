//! Issue 24: file facts are written only by the device that has the files. A change to a
//! Device record, or to a Location's or an Entry's file fields, from any device but its owner is
//! refused by every device: kept (the journal holds it), reported with the reason, never
//! applied. User data may be written by any device.

use keel_projections::Projections;
use keel_schema::{
    Change, ChangeId, Device, DeviceId, Entry, EntryKind, Hlc, Location, Tag, UserMetadata, Value,
};
use uuid::Uuid;

struct Clock(u64);

impl Clock {
    fn at(&mut self, device: DeviceId) -> Hlc {
        self.0 += 1;
        Hlc {
            physical_ms: self.0,
            counter: 0,
            device,
        }
    }
}

fn device(id: DeviceId) -> Device {
    Device {
        uuid: id.record_uuid(),
        device_id: id.to_hex(),
        name: "d".into(),
        os: "linux".into(),
        created_ms: 1,
    }
}

fn entry(location: Uuid, name: &str) -> Entry {
    Entry {
        uuid: Some(Uuid::now_v7()),
        location,
        relative_path: String::new(),
        name: name.into(),
        kind: EntryKind::File.code(),
        size: 3,
        created_ms: 0,
        modified_ms: 5,
        content: None,
        metadata: None,
    }
}

/// B's files, then A's attempts on them: `(changes, the ids every device must refuse)`.
fn scenario() -> (Vec<Change>, Vec<ChangeId>) {
    let (a, b) = (DeviceId([1; 32]), DeviceId([2; 32]));
    let mut clock = Clock(1000);
    let upsert = |hlc: Hlc, record: &dyn Fn(Hlc) -> Option<Change>| record(hlc).expect("ready");
    let b_loc = Location {
        uuid: Uuid::now_v7(),
        device: b.record_uuid(),
        path: "/b".into(),
        name: "b".into(),
        created_ms: 2,
    };
    let a_loc = Location {
        uuid: Uuid::now_v7(),
        device: a.record_uuid(),
        path: "/a".into(),
        name: "a".into(),
        created_ms: 2,
    };
    let b_file = entry(b_loc.uuid, "b.txt");
    let b_id = b_file.uuid.unwrap_or_default();
    let mut allowed = vec![
        upsert(clock.at(b), &|h| {
            Change::upsert(ChangeId::new(), h, &device(b))
        }),
        upsert(clock.at(a), &|h| {
            Change::upsert(ChangeId::new(), h, &device(a))
        }),
        upsert(clock.at(b), &|h| Change::upsert(ChangeId::new(), h, &b_loc)),
        upsert(clock.at(a), &|h| Change::upsert(ChangeId::new(), h, &a_loc)),
        upsert(clock.at(b), &|h| {
            Change::upsert(ChangeId::new(), h, &b_file)
        }),
    ];
    let field = |hlc: Hlc, record: Uuid, name: &str, value: Value| {
        Change::upsert_fields::<Entry>(ChangeId::new(), hlc, record, vec![(name, value)])
            .expect("a change")
    };
    let refused = vec![
        // A writes B's Device record (a way to pin a device without the user).
        upsert(clock.at(a), &|h| {
            Change::upsert(
                ChangeId::new(),
                h,
                &Device {
                    name: "mine now".into(),
                    ..device(b)
                },
            )
        }),
        // A renames B's location, and claims it.
        Change::upsert_fields::<Location>(
            ChangeId::new(),
            clock.at(a),
            b_loc.uuid,
            vec![("path", Value::Text("/elsewhere".into()))],
        )
        .expect("a change"),
        upsert(clock.at(a), &|h| {
            Change::upsert(
                ChangeId::new(),
                h,
                &Location {
                    device: a.record_uuid(),
                    ..b_loc.clone()
                },
            )
        }),
        // A renames, moves into its own location, and deletes B's file; adds one to B's folder.
        field(clock.at(a), b_id, "name", Value::Text("evil.txt".into())),
        field(clock.at(a), b_id, "location", Value::Uuid(a_loc.uuid)),
        Change::delete::<Entry>(ChangeId::new(), clock.at(a), b_id),
        upsert(clock.at(a), &|h| {
            Change::upsert(ChangeId::new(), h, &entry(b_loc.uuid, "planted.txt"))
        }),
        Change::delete::<Location>(ChangeId::new(), clock.at(a), b_loc.uuid),
    ];
    let refused_ids = refused.iter().map(|c| c.id).collect();
    // User data on B's file, and revoking a device, are anyone's.
    let tag = Tag {
        uuid: Uuid::now_v7(),
        name: "red".into(),
        color: None,
        created_ms: 3,
    };
    let mut user = vec![
        upsert(clock.at(a), &|h| Change::upsert(ChangeId::new(), h, &tag)),
        upsert(clock.at(a), &|h| {
            Change::upsert(
                ChangeId::new(),
                h,
                &UserMetadata {
                    uuid: keel_schema::entry_metadata_uuid(b_id),
                    entry: Some(b_id),
                    content: None,
                    notes: Some("from A".into()),
                    favorite: true,
                    hidden: false,
                    custom_data: None,
                },
            )
        }),
        field(
            clock.at(a),
            b_id,
            "metadata",
            Value::Uuid(keel_schema::entry_metadata_uuid(b_id)),
        ),
    ];
    allowed.append(&mut user);
    let mut all = allowed;
    all.extend(refused);
    (all, refused_ids)
}

fn apply(changes: &[Change], batch: usize) -> (Projections, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut p = Projections::open(&dir.path().join("p.sqlite")).expect("opens");
    for chunk in changes.chunks(batch) {
        p.apply(chunk, None).expect("applies");
    }
    (p, dir)
}

#[test]
fn another_devices_file_facts_are_refused_and_user_data_is_not() {
    let (changes, refused) = scenario();
    let (p, _dir) = apply(&changes, 100);
    let mut found: Vec<ChangeId> = p
        .query()
        .refused()
        .expect("lists")
        .into_iter()
        .map(|r| {
            assert!(!r.reason.is_empty());
            assert_eq!(r.origin, DeviceId([1; 32]));
            r.id
        })
        .collect();
    found.sort();
    let mut expected = refused.clone();
    expected.sort();
    assert_eq!(found, expected);
    let b_file = changes[4].record;
    let kept: Entry = p.query().get(b_file).expect("reads").expect("still there");
    assert_eq!(kept.name, "b.txt");
    assert_eq!(
        kept.metadata,
        Some(keel_schema::entry_metadata_uuid(b_file)),
        "a metadata link is user data"
    );
    let b_device: Device = p
        .query()
        .get(DeviceId([2; 32]).record_uuid())
        .expect("reads")
        .expect("there");
    assert_eq!(b_device.name, "d");
    assert_eq!(p.query().counts().expect("counts").entries, 1);
}

/// Every device applies the same log in the same order, in batches of its own sizes: each
/// refuses the same changes and ends with the same rows. (Who owns a record is decided by the
/// first claim in log order; see decision 0040.)
#[test]
fn every_batching_refuses_the_same_changes() {
    let (changes, _) = scenario();
    let (p, _dir) = apply(&changes, 100);
    let digest = p.query().digest().expect("digest");
    let refused = p.query().refused().expect("lists");
    for batch in [1, 2, 3, 7] {
        let (q, _d) = apply(&changes, batch);
        assert_eq!(q.query().digest().expect("digest"), digest, "batch {batch}");
        assert_eq!(
            q.query().refused().expect("lists"),
            refused,
            "batch {batch}"
        );
    }
}

#[test]
fn a_device_may_delete_another_devices_record_to_revoke_it() {
    let (a, b) = (DeviceId([1; 32]), DeviceId([2; 32]));
    let mut clock = Clock(1);
    let changes = vec![
        Change::upsert(ChangeId::new(), clock.at(b), &device(b)).expect("ready"),
        Change::delete::<Device>(ChangeId::new(), clock.at(a), b.record_uuid()),
    ];
    let (p, _dir) = apply(&changes, 100);
    assert!(p.query().refused().expect("lists").is_empty());
    assert_eq!(
        p.query().deleted::<Device>().expect("reads"),
        vec![b.record_uuid()]
    );
}
