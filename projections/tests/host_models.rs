//! Issue 25: a host's models in the projections: tables, dependency order, versions, upcasting,
//! and old journals replayed into a new schema.

use keel_projections::Projections;
use keel_schema::uuid::Uuid;
use keel_schema::{Change, ChangeId, DeviceId, Hlc, Op, Registry, Syncable, Value};
use proptest::prelude::*;

/// The host's album, referenced by its photos.
#[derive(Clone, Debug, PartialEq, Eq, Syncable)]
#[syncable(model = "album", code = 40, domain = "content")]
struct Album {
    #[syncable(uuid)]
    uuid: Uuid,
    name: String,
}

/// A photo as the app's first version wrote it.
#[derive(Clone, Debug, PartialEq, Eq, Syncable)]
#[syncable(model = "photo", code = 41, domain = "content")]
struct PhotoV0 {
    #[syncable(uuid)]
    uuid: Uuid,
    #[syncable(references = "album")]
    album: Uuid,
    title: String,
}

/// The third version: the title renamed to a caption, stars added in version 1 as a number
/// (five by default) and made text in version 2 (one `*` per star), by an upcaster.
#[derive(Clone, Debug, PartialEq, Eq, Syncable)]
#[syncable(
    model = "photo",
    code = 41,
    version = 2,
    domain = "content",
    upcast = "stars_as_text"
)]
struct Photo {
    #[syncable(uuid)]
    uuid: Uuid,
    #[syncable(references = "album")]
    album: Uuid,
    caption: String,
    #[syncable(since = 1, default = "five_stars")]
    stars: String,
}

fn five_stars() -> String {
    "*****".into()
}

/// Version 1 to 2: stars from a number to text.
#[allow(clippy::ptr_arg)] // an `Upcast` may add or drop fields; this one does not
fn stars_as_text(from: u8, fields: &mut Vec<(u8, Value)>) -> Result<(), String> {
    if from != 1 {
        return Ok(());
    }
    for (index, value) in fields.iter_mut().filter(|(i, _)| *i == 2) {
        let Value::Int(n) = value else {
            return Err(format!("field {index}: {value:?} is not a number"));
        };
        let n = usize::try_from(*n).map_err(|e| e.to_string())?.min(10);
        *value = Value::Text("*".repeat(n));
    }
    Ok(())
}

fn registry() -> Registry {
    Registry::builtin()
        .clone()
        .with::<Album>()
        .and_then(|r| r.with::<Photo>())
        .expect("registers")
}

fn hlc(ms: u64) -> Hlc {
    Hlc {
        physical_ms: ms,
        counter: 0,
        device: DeviceId([3; 32]),
    }
}

/// The album every photo is in, made at time 1.
fn album_change() -> Change {
    let album = Album {
        uuid: ALBUM,
        name: "a".into(),
    };
    Change::upsert(ChangeId::new(), hlc(1), &album).expect("ready")
}

fn open(dir: &tempfile::TempDir, name: &str, registry: &Registry) -> Projections {
    Projections::open_for(&dir.path().join(name), registry).expect("opens")
}

/// One step of a photo history, in the old app's terms.
#[derive(Clone, Debug)]
enum Step {
    /// A whole photo (the old app knows no stars).
    Create { photo: u8, title: String },
    /// A new caption only.
    Retitle { photo: u8, title: String },
    /// A delete.
    Delete { photo: u8 },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (0u8..4, "[a-z]{0,6}").prop_map(|(photo, title)| Step::Create { photo, title }),
        (0u8..4, "[a-z]{0,6}").prop_map(|(photo, title)| Step::Retitle { photo, title }),
        (0u8..4).prop_map(|photo| Step::Delete { photo }),
    ]
}

fn photo_uuid(photo: u8) -> Uuid {
    Uuid::from_u128(1000 + u128::from(photo))
}

const ALBUM: Uuid = Uuid::from_u128(7);

/// The changes of `steps` as the old app wrote them (`old`) or as the new one writes them.
fn history(steps: &[Step], old: bool) -> Vec<Change> {
    let album = Album {
        uuid: ALBUM,
        name: "trip".into(),
    };
    let mut out =
        vec![Change::upsert(ChangeId(Uuid::from_u128(1)), hlc(1), &album).expect("ready")];
    for (i, step) in steps.iter().enumerate() {
        let id = ChangeId(Uuid::from_u128(10 + i as u128));
        let at = hlc(10 + i as u64);
        let change = match (step, old) {
            (Step::Create { photo, title }, true) => {
                let record = PhotoV0 {
                    uuid: photo_uuid(*photo),
                    album: ALBUM,
                    title: title.clone(),
                };
                Change::upsert(id, at, &record).expect("ready")
            }
            (Step::Create { photo, title }, false) => {
                let record = Photo {
                    uuid: photo_uuid(*photo),
                    album: ALBUM,
                    caption: title.clone(),
                    stars: five_stars(),
                };
                Change::upsert(id, at, &record).expect("ready")
            }
            (Step::Retitle { photo, title }, true) => {
                let update = PhotoV0Update::new(photo_uuid(*photo)).title(title.clone());
                Change::upsert_update(id, at, update).expect("valid")
            }
            (Step::Retitle { photo, title }, false) => {
                let update = PhotoUpdate::new(photo_uuid(*photo)).caption(title.clone());
                Change::upsert_update(id, at, update).expect("valid")
            }
            (Step::Delete { photo }, true) => Change::delete::<PhotoV0>(id, at, photo_uuid(*photo)),
            (Step::Delete { photo }, false) => Change::delete::<Photo>(id, at, photo_uuid(*photo)),
        };
        out.push(change);
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// An old app's journal, replayed into the new schema (a field added with a default, a
    /// field renamed, a type changed through an upcaster), gives the digest of a library the new
    /// app wrote with the same changes; in any batch split.
    #[test]
    fn an_old_journal_replays_to_the_digest_of_a_new_one(
        steps in proptest::collection::vec(step(), 1..24),
        split in 0usize..24,
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let registry = registry();
        let mut old = open(&dir, "old.sqlite", &registry);
        let old_changes: Vec<Change> = history(&steps, true)
            .iter()
            .map(|c| Change::decode(&c.encode()).expect("decodes"))
            .collect();
        let split = split.min(old_changes.len());
        old.apply(&old_changes[..split], None).expect("applies");
        old.apply(&old_changes[split..], None).expect("applies");
        let mut new = open(&dir, "new.sqlite", &registry);
        new.apply(&history(&steps, false), None).expect("applies");
        prop_assert_eq!(old.query().digest().expect("digest"), new.query().digest().expect("digest"));
        prop_assert!(old.query().lacking_models().expect("lists").is_empty());
    }
}

/// A version-1 change (stars as a number) is upcast through the host's upcaster; one it cannot
/// upcast is refused with its reason, and the batch goes on.
#[test]
fn a_middle_version_is_upcast_and_a_bad_one_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut p = open(&dir, "p.sqlite", &registry());
    let album = album_change();
    let v1 = |id: u128, stars: Value| Change {
        id: ChangeId(Uuid::from_u128(id)),
        hlc: hlc(2),
        model: 41,
        record: photo_uuid(id as u8),
        op: Op::Upsert(vec![
            (0, Value::Uuid(ALBUM)),
            (1, Value::Text("x".into())),
            (2, stars),
        ]),
        version: 1,
        seen: 0,
    };
    let batch = vec![
        v1(1, Value::Text("three".into())),
        album,
        v1(2, Value::Int(3)),
    ];
    let stats = p.apply(&batch, None).expect("applies");
    assert_eq!((stats.applied, stats.refused), (2, 1), "{stats:?}");
    let photo: Photo = p
        .query()
        .get(photo_uuid(2))
        .expect("reads")
        .expect("a photo");
    assert_eq!(photo.stars, "***");
    let refused = p.query().refused().expect("lists");
    assert!(refused[0].reason.contains("not a number"), "{refused:?}");
}

/// Photos applied before their album in one batch wait for it (dependency order between a
/// host's models), and a change of a version newer than the registry's is kept aside.
#[test]
fn host_models_apply_in_dependency_order_and_newer_versions_wait() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut p = open(&dir, "p.sqlite", &registry());
    let photo = Photo {
        uuid: photo_uuid(1),
        album: ALBUM,
        caption: "c".into(),
        stars: "*".into(),
    };
    let mut newer = Change::upsert(ChangeId::new(), hlc(3), &photo).expect("ready");
    newer.version = 3;
    newer.record = photo_uuid(2);
    let batch = vec![
        Change::upsert(ChangeId::new(), hlc(2), &photo).expect("ready"),
        newer,
        Change::upsert(
            ChangeId::new(),
            hlc(1),
            &Album {
                uuid: ALBUM,
                name: "a".into(),
            },
        )
        .expect("ready"),
    ];
    let stats = p.apply(&batch, None).expect("applies");
    assert_eq!(
        (stats.applied, stats.parked, stats.lacking),
        (2, 0, 1),
        "{stats:?}"
    );
    let lacking = p.query().lacking_models().expect("lists");
    assert_eq!((lacking[0].model, lacking[0].version), (41, 3));
    assert_eq!(
        p.query().get::<Photo>(photo.uuid).expect("reads"),
        Some(photo)
    );
}

/// A projection built for Keel's models alone keeps a host's changes aside; opened for a
/// registry with the host's models it is started over, so the journal replays them.
#[test]
fn a_projection_built_for_other_models_is_started_over() {
    let dir = tempfile::tempdir().expect("tempdir");
    let album = album_change();
    let mut keels = open(&dir, "p.sqlite", Registry::builtin());
    let stats = keels
        .apply(
            &[album],
            Some(keel_projections::AppliedPosition {
                log: keel_schema::Lsn(1),
                local: 0,
            }),
        )
        .expect("applies");
    assert_eq!(stats.lacking, 1);
    drop(keels);
    let again = open(&dir, "p.sqlite", Registry::builtin());
    assert_eq!(
        again.applied_position().expect("reads").log.0,
        1,
        "same models: kept"
    );
    drop(again);
    let hosts = open(&dir, "p.sqlite", &registry());
    assert_eq!(
        hosts.applied_position().expect("reads").log.0,
        0,
        "other models: started over"
    );
    assert!(hosts.query().lacking_models().expect("lists").is_empty());
}

/// A person's favourite photo, and a photo's person: a cycle between two host models, broken by
/// a nullable reference as Keel's own Entry ↔ UserMetadata cycle is.
#[derive(Clone, Debug, PartialEq, Eq, Syncable)]
#[syncable(model = "person", code = 50, domain = "content")]
struct Person {
    #[syncable(uuid)]
    uuid: Uuid,
    name: String,
    #[syncable(references = "portrait", breaks_cycle)]
    favourite: Option<Uuid>,
}

/// A portrait of a person.
#[derive(Clone, Debug, PartialEq, Eq, Syncable)]
#[syncable(model = "portrait", code = 51, domain = "content")]
struct Portrait {
    #[syncable(uuid)]
    uuid: Uuid,
    #[syncable(references = "person")]
    person: Uuid,
}

#[test]
fn a_cycle_between_host_models_is_broken_by_its_nullable_reference() {
    let registry = Registry::builtin()
        .clone()
        .with::<Person>()
        .expect("a person may refer to a portrait not registered yet: the cycle's nullable side");
    let dir = tempfile::tempdir().expect("tempdir");
    let half = Projections::open_for(&dir.path().join("half.sqlite"), &registry);
    assert!(
        matches!(half, Err(keel_projections::ProjectionError::Schema(_))),
        "opened with a reference to no model"
    );
    let registry = registry.with::<Portrait>().expect("registers");
    let mut p = open(&dir, "p.sqlite", &registry);
    let (ada, portrait) = (Uuid::from_u128(1), Uuid::from_u128(2));
    let person = Person {
        uuid: ada,
        name: "Ada".into(),
        favourite: Some(portrait),
    };
    let picture = Portrait {
        uuid: portrait,
        person: ada,
    };
    // The person (with the reference to a portrait not yet there) comes after the portrait
    // that needs the person, in one batch and in the opposite order too.
    for batch in [
        vec![
            Change::upsert(ChangeId::new(), hlc(2), &picture).expect("ready"),
            Change::upsert(ChangeId::new(), hlc(1), &person).expect("ready"),
        ],
        vec![Change::upsert(ChangeId::new(), hlc(3), &person).expect("ready")],
    ] {
        let stats = p.apply(&batch, None).expect("applies");
        assert_eq!(stats.parked, 0, "{stats:?}");
    }
    assert_eq!(p.query().get::<Person>(ada).expect("reads"), Some(person));
    assert_eq!(
        p.query().get::<Portrait>(portrait).expect("reads"),
        Some(picture)
    );
}

/// A host model's field conflicts like a built-in one: two devices rename one album, the
/// second without having seen the first's rename.
#[test]
fn a_host_models_field_conflicts_like_a_built_in_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = registry();
    let mut p = open(&dir, "p.sqlite", &registry);
    let renamed = |device: u8, name: &str, seen: u64| {
        let album = Album {
            uuid: ALBUM,
            name: name.into(),
        };
        let hlc = Hlc {
            physical_ms: 10 + u64::from(device),
            counter: 0,
            device: DeviceId([device; 32]),
        };
        Change {
            seen,
            ..Change::upsert(ChangeId::new(), hlc, &album).expect("ready")
        }
    };
    let log = [
        album_change(),
        renamed(1, "trip", 1),
        renamed(2, "holiday", 1),
    ];
    p.apply_logged(&log, &[Some(1), Some(2), Some(3)], None)
        .expect("applies");
    let conflicts = p.query().conflicts().expect("lists");
    assert_eq!(conflicts.len(), 1, "{conflicts:?}");
    assert_eq!((conflicts[0].model, conflicts[0].field), ("album", "name"));
    assert_eq!(
        conflicts[0].sides[conflicts[0].winner].value,
        Value::Text("holiday".into())
    );
}
