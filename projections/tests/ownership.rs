//! Issue 24: file facts are written only by the device that has the files. A change to a
//! Device record, or to a Location's or an Entry's file fields, from any device but its owner is
//! refused by every device: kept (the journal holds it), reported with the reason, never
//! applied. User data may be written by any device.

use keel_projections::Projections;
use keel_schema::{
    Change, ChangeId, Device, DeviceId, Entry, Hlc, Location, Tag, UserMetadata, Value,
};
use uuid::Uuid;

mod support;
use support::entry;

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

/// A location of device `id`, at `/name`.
fn location(id: DeviceId, name: &str) -> Location {
    Location {
        uuid: Uuid::now_v7(),
        device: id.record_uuid(),
        path: format!("/{name}"),
        name: name.into(),
        created_ms: 2,
    }
}

/// A scenario's changes, the ids every device must refuse, and devices A and B.
type Scenario = (Vec<Change>, Vec<ChangeId>, DeviceId, DeviceId);

/// B's files, then A's attempts on them (each signed by A: A made them).
fn scenario() -> Scenario {
    let (a, b) = (support::device(), support::device());
    let mut clock = Clock(1000);
    let upsert = |hlc: Hlc, record: &dyn Fn(Hlc) -> Option<Change>| record(hlc).expect("ready");
    let (b_loc, a_loc) = (location(b, "b"), location(a, "a"));
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
    (all, refused_ids, a, b)
}

/// Applies `attestations`, then `changes` `batch` at a time.
fn apply(
    attestations: &[Change],
    changes: &[Change],
    batch: usize,
) -> (Projections, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut p = Projections::open(&dir.path().join("p.sqlite")).expect("opens");
    p.apply(attestations, None).expect("attestations apply");
    for chunk in changes.chunks(batch) {
        p.apply(chunk, None).expect("applies");
    }
    (p, dir)
}

#[test]
fn another_devices_file_facts_are_refused_and_user_data_is_not() {
    let (changes, refused, a, b) = scenario();
    let (p, _dir) = apply(&support::attestations(&changes), &changes, 100);
    let mut found: Vec<ChangeId> = p
        .query()
        .refused()
        .expect("lists")
        .into_iter()
        .map(|r| {
            assert!(!r.reason.is_empty());
            assert_eq!(r.origin, a);
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
        .get(b.record_uuid())
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
    let (changes, ..) = scenario();
    let attestations = support::attestations(&changes);
    let (p, _dir) = apply(&attestations, &changes, 100);
    let digest = p.query().digest().expect("digest");
    let refused = p.query().refused().expect("lists");
    for batch in [1, 2, 3, 7] {
        let (q, _d) = apply(&attestations, &changes, batch);
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
    let (a, b) = (support::device(), support::device());
    let mut clock = Clock(1);
    let changes = vec![
        Change::upsert(ChangeId::new(), clock.at(b), &device(b)).expect("ready"),
        Change::delete::<Device>(ChangeId::new(), clock.at(a), b.record_uuid()),
    ];
    let (p, _dir) = apply(&support::attestations(&changes), &changes, 100);
    assert!(p.query().refused().expect("lists").is_empty());
    assert_eq!(
        p.query().deleted::<Device>().expect("reads"),
        vec![b.record_uuid()]
    );
}

/// Issue 24 (decision 0043): the device that relays a change (the leader) cannot make it look
/// like another device's. B's own file facts get in only behind B's attestation; the same
/// changes claimed for B by A (the leader forging B's origin, with no attestation of B's, or
/// with one A signed) are refused by every device, and B's file is untouched.
#[test]
fn a_change_claimed_for_another_device_without_its_signature_is_refused() {
    let (a, b) = (support::device(), support::device());
    let mut clock = Clock(1);
    let b_loc = location(b, "b");
    let b_file = entry(b_loc.uuid, "b.txt");
    let b_id = b_file.uuid.unwrap_or_default();
    let honest = vec![
        Change::upsert(ChangeId::new(), clock.at(b), &device(b)).expect("ready"),
        Change::upsert(ChangeId::new(), clock.at(b), &b_loc).expect("ready"),
        Change::upsert(ChangeId::new(), clock.at(b), &b_file).expect("ready"),
    ];
    let vouched = support::attestations(&honest);
    // A forges B's origin: a rename and a delete of B's file, "by B".
    let rename = Change::upsert_fields::<Entry>(
        ChangeId::new(),
        clock.at(b),
        b_id,
        vec![("name", Value::Text("forged.txt".into()))],
    )
    .expect("a change");
    let delete = Change::delete::<Entry>(ChangeId::new(), clock.at(b), b_id);
    // And tries to vouch for them with an attestation A signed but names B as its origin.
    let mut by_a = support::attestations(&{
        let mut as_a = vec![rename.clone(), delete.clone()];
        for c in &mut as_a {
            c.hlc.device = a;
        }
        as_a
    });
    for c in &mut by_a {
        c.hlc.device = b;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mut p = Projections::open(&dir.path().join("p.sqlite")).expect("opens");
    p.apply(&vouched, None).expect("applies");
    p.apply(&honest, None).expect("applies");
    p.apply(&by_a, None).expect("applies");
    let stats = p
        .apply(&[rename.clone(), delete.clone()], None)
        .expect("applies");
    assert_eq!(stats.refused, 2, "{stats:?}");
    let refused = p.query().refused().expect("lists");
    let reasons: Vec<(ChangeId, String)> =
        refused.iter().map(|r| (r.id, r.reason.clone())).collect();
    assert!(
        reasons.iter().any(|(_, r)| r.contains("certificate")),
        "{reasons:?}"
    );
    for forged in [rename.id, delete.id] {
        assert!(
            reasons
                .iter()
                .any(|(id, r)| *id == forged && r.contains("no attestation")),
            "{reasons:?}"
        );
    }
    let kept: Entry = p.query().get(b_id).expect("reads").expect("still there");
    assert_eq!(kept.name, "b.txt");
    // A tampered signature (its last byte) is refused as well.
    let mut tampered = support::attestations(&[Change::upsert_fields::<Entry>(
        ChangeId::new(),
        clock.at(b),
        b_id,
        vec![("name", Value::Text("tampered.txt".into()))],
    )
    .expect("a change")]);
    if let Some(keel_schema::Op::Upsert(fields)) = tampered.first_mut().map(|c| &mut c.op) {
        use keel_schema::Syncable;
        let signature = keel_schema::Attestation::DEF.field_index("signature");
        for (i, v) in fields.iter_mut() {
            if let (true, Value::Bytes(b)) = (Some(usize::from(*i)) == signature, v) {
                if let Some(last) = b.last_mut() {
                    *last ^= 1;
                }
            }
        }
    }
    let stats = p.apply(&tampered, None).expect("applies");
    assert_eq!(stats.refused, 1, "{stats:?}");
    let refused = p.query().refused().expect("lists");
    assert!(
        refused
            .iter()
            .any(|r| r.reason.contains("signature does not verify")),
        "{refused:?}"
    );
}
