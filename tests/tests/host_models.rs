//! Issue 25: a host app's own models, synced across devices over real QUIC, redb and SQLite,
//! while one device still runs the app's older version.

use std::time::{Duration, Instant};

use keel_engine::{Home, Library, Syncable, Uuid};
use keel_node::Node;
use keel_tests::cluster::{converge, options, pair};
use keel_tests::PASSWORD;

const CONVERGE: Duration = Duration::from_secs(30);

/// A host's album: its first and only version.
#[derive(Clone, Debug, PartialEq, Eq, Syncable)]
#[syncable(model = "album", code = 40, domain = "content", priority = 10)]
struct Album {
    #[syncable(uuid)]
    uuid: Uuid,
    name: String,
}

/// The app's first version of a photo.
mod v1 {
    use super::*;

    /// A photo in an album.
    #[derive(Clone, Debug, PartialEq, Eq, Syncable)]
    #[syncable(model = "photo", code = 41, domain = "content", priority = 20)]
    pub(crate) struct Photo {
        #[syncable(uuid)]
        pub(crate) uuid: Uuid,
        #[syncable(references = "album")]
        pub(crate) album: Uuid,
        pub(crate) caption: String,
    }
}

/// The app's second version: a photo has stars, five unless said.
mod v2 {
    use super::*;

    /// A photo in an album, with stars.
    #[derive(Clone, Debug, PartialEq, Eq, Syncable)]
    #[syncable(
        model = "photo",
        code = 41,
        version = 1,
        domain = "content",
        priority = 20
    )]
    pub(crate) struct Photo {
        #[syncable(uuid)]
        pub(crate) uuid: Uuid,
        #[syncable(references = "album")]
        pub(crate) album: Uuid,
        pub(crate) caption: String,
        #[syncable(since = 1, default = "five")]
        pub(crate) stars: i64,
    }

    fn five() -> i64 {
        5
    }
}

/// A home under `root/<device>` with the album and version `new` (2) or 1 of the photo.
fn home(root: &std::path::Path, device: &str, new: bool) -> Home {
    let home = Home::new(root.join(device))
        .with_model::<Album>()
        .expect("album registers");
    if new {
        home.with_model::<v2::Photo>().expect("photo registers")
    } else {
        home.with_model::<v1::Photo>().expect("photo registers")
    }
}

/// Pairs the device of `home` with `inviter` and starts it.
fn join(home: &Home, inviter: &Node) -> Node {
    let name = pair(home, inviter, inviter.local_addr()).expect("pairs");
    let lib = Library::open(home, &name, PASSWORD).expect("opens");
    Node::start(lib, options(vec![inviter.local_addr()])).expect("starts")
}

/// Waits until every node holds the same log and has nothing to push (digests may differ while
/// an old app lacks a version).
fn settle(nodes: &[&Node]) {
    let deadline = Instant::now() + CONVERGE;
    loop {
        let ids: Vec<_> = nodes
            .iter()
            .map(|n| n.library().sync_state().change_ids().expect("ids"))
            .collect();
        let pending = nodes.iter().map(|n| n.status().offline).sum::<u64>();
        if pending == 0 && ids.windows(2).all(|w| w[0] == w[1]) {
            return;
        }
        assert!(Instant::now() < deadline, "the devices never settled");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn photo2(node: &Node, uuid: Uuid) -> Option<v2::Photo> {
    node.library().get::<v2::Photo>(uuid).expect("reads")
}

/// Three devices share a library with the host's models; `b` runs the app's first version while
/// `a` and `c` run the second, which added a field. Every change reaches every journal; `b`
/// applies what its version knows and keeps the rest, naming what it lacks; `a` and `c` take
/// `b`'s old whole records with the new field's default and its partial edit without touching
/// the field it did not know. Once `b` runs the new version too, all three digests are equal,
/// and a rebuild gives the same digest.
#[test]
fn a_host_model_syncs_across_three_devices_and_two_app_versions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (home_a, a) = {
        let (home, lib) =
            keel_tests::create_in(home(dir.path(), "a", true), "photos").expect("creates");
        let node = Node::start(lib, options(Vec::new())).expect("starts");
        (home, node)
    };
    let home_b = home(dir.path(), "b", false);
    let b = join(&home_b, &a);
    let c = join(&home(dir.path(), "c", true), &a);

    let album = Album {
        uuid: Uuid::new_v4(),
        name: "Summer".into(),
    };
    let rated = v2::Photo {
        uuid: Uuid::new_v4(),
        album: album.uuid,
        caption: "beach".into(),
        stars: 3,
    };
    a.library()
        .transact(|tx| {
            tx.upsert(&album);
            tx.upsert(&rated);
            Ok(())
        })
        .expect("a commits");
    let from_c = v2::Photo {
        uuid: Uuid::new_v4(),
        album: album.uuid,
        caption: "dunes".into(),
        stars: 1,
    };
    c.library()
        .transact(|tx| Ok(tx.upsert(&from_c)))
        .expect("c commits");
    settle(&[&a, &b, &c]);
    let old = v1::Photo {
        uuid: Uuid::new_v4(),
        album: album.uuid,
        caption: "old app".into(),
    };
    b.library()
        .transact(|tx| {
            tx.upsert(&old);
            // A partial edit of a photo the new app rated: its stars must stay.
            tx.set(v1::PhotoUpdate::new(rated.uuid).caption("sunset".into()))
        })
        .expect("b commits");
    settle(&[&a, &b, &c]);

    // The new devices agree, and read b's changes in the new shape.
    let digest = converge(&[&a, &c], CONVERGE).unwrap_or_else(|r| panic!("{r}"));
    for node in [&a, &c] {
        let seen = photo2(node, old.uuid).expect("b's photo");
        assert_eq!((seen.caption.as_str(), seen.stars), ("old app", 5));
        let edited = photo2(node, rated.uuid).expect("a's photo");
        assert_eq!((edited.caption.as_str(), edited.stars), ("sunset", 3));
    }
    // The old device applied its version's changes, kept the others and says what it lacks.
    let lib_b = b.library();
    assert!(lib_b.get::<v1::Photo>(old.uuid).expect("reads").is_some());
    assert!(lib_b.get::<Album>(album.uuid).expect("reads").is_some());
    assert!(
        lib_b
            .get::<v1::Photo>(from_c.uuid)
            .expect("reads")
            .is_none(),
        "b applied a change of a version it does not know"
    );
    let lacking = lib_b.lacking_models().expect("lists");
    assert_eq!(lacking.len(), 1, "{lacking:?}");
    assert_eq!(lacking[0].name.as_deref(), Some("photo"));
    assert_eq!((lacking[0].version, lacking[0].known_version), (1, Some(0)));
    assert!(lacking[0].changes >= 2, "{lacking:?}");
    assert!(a.library().lacking_models().expect("lists").is_empty());

    // b upgrades: its projection is built again for the new models, from its journal.
    let listen = b.local_addr();
    b.stop().expect("b stops");
    let b = {
        let lib = Library::open(&home(dir.path(), "b", true), "photos", PASSWORD).expect("opens");
        Node::start(
            lib,
            keel_node::NodeOptions {
                listen,
                ..options(vec![a.local_addr()])
            },
        )
        .expect("b restarts")
    };
    assert_eq!(
        converge(&[&a, &b, &c], CONVERGE).unwrap_or_else(|r| panic!("{r}")),
        digest
    );
    assert!(b.library().lacking_models().expect("lists").is_empty());
    assert_eq!(
        photo2(&b, from_c.uuid).map(|p| p.stars),
        Some(1),
        "b lost c's photo"
    );
    b.library().rebuild(&mut |_, _| {}).expect("rebuilds");
    assert_eq!(b.library().digest().expect("digest"), digest);
    drop(home_a);
}

/// The library records which model a code names; an app that gives the code to another model
/// is refused at open, before it writes anything.
#[test]
fn an_app_that_moves_a_models_code_is_refused_at_open() {
    /// Another model under the album's code.
    #[derive(Clone, Debug, PartialEq, Eq, Syncable)]
    #[syncable(model = "sticker", code = 40, domain = "content")]
    struct Sticker {
        #[syncable(uuid)]
        uuid: Uuid,
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (_home, lib) =
        keel_tests::create_in(home(dir.path(), "a", true), "photos").expect("creates");
    let recorded = lib.recorded_models().expect("lists");
    let names: Vec<_> = recorded
        .iter()
        .map(|m| (m.code, m.name.as_str(), m.version))
        .collect();
    assert_eq!(names, vec![(40, "album", 0), (41, "photo", 1)]);
    lib.close().expect("closes");
    let moved = Home::new(dir.path().join("a"))
        .with_model::<Sticker>()
        .expect("registers");
    match Library::open(&moved, "photos", PASSWORD) {
        Err(keel_engine::EngineError::ModelClash { code, recorded, .. }) => {
            assert_eq!((code, recorded.as_str()), (40, "album"))
        }
        other => panic!("expected a clash, got {other:?}"),
    }
}

/// Found by the example: a host model's changes were left out of `RecordsChanged` (the event
/// named records through Keel's models alone), so a host never heard of its own records.
#[test]
fn a_host_models_records_are_in_the_change_events() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_home, lib) =
        keel_tests::create_in(home(dir.path(), "a", true), "photos").expect("creates");
    let mut events = lib.subscribe();
    let album = Album {
        uuid: Uuid::new_v4(),
        name: "Winter".into(),
    };
    lib.transact(|tx| Ok(tx.upsert(&album))).expect("commits");
    lib.flush().expect("flushes");
    let mut named = Vec::new();
    while let Ok(event) = events.try_recv() {
        if let keel_engine::Event::RecordsChanged { records, .. } = event {
            named.extend(records);
        }
    }
    assert!(
        named
            .iter()
            .any(|(model, uuid, _)| *model == "album" && *uuid == album.uuid),
        "{named:?}"
    );
}

/// Copies the closed library folder `name` of `from` into home `to` (its device identity too).
fn copy_home(from: &std::path::Path, to: &std::path::Path) {
    for entry in walk(from) {
        let target = to.join(entry.strip_prefix(from).expect("inside"));
        if entry.is_dir() {
            std::fs::create_dir_all(&target).expect("a folder");
        } else {
            std::fs::copy(&entry, &target).expect("copies");
        }
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![dir.to_path_buf()];
    for entry in std::fs::read_dir(dir).expect("lists") {
        let path = entry.expect("an entry").path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// An app upgraded after its library compacted its log (photos gain stars): the positions
/// before the base cannot be replayed for the new models, so the snapshot is brought to them
/// in place. The library opens, and its projections equal those of the same library, not
/// compacted, replayed from its whole log under the new models: photos written whole, a photo
/// written again since, a photo deleted, and one written after the base.
#[test]
fn a_compacted_library_opens_after_its_app_changes_its_models() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, lib) = keel_tests::create_in(home(dir.path(), "a", false), "photos").expect("creates");
    let album = Album {
        uuid: Uuid::new_v4(),
        name: "Summer".into(),
    };
    let photo = |caption: &str| v1::Photo {
        uuid: Uuid::new_v4(),
        album: album.uuid,
        caption: caption.into(),
    };
    let (beach, edited, gone) = (photo("beach"), photo("dunes"), photo("rain"));
    lib.transact(|tx| {
        tx.upsert(&album);
        for p in [&beach, &edited, &gone] {
            tx.upsert(p);
        }
        Ok(())
    })
    .expect("commits");
    lib.transact(|tx| {
        tx.upsert(&v1::Photo {
            caption: "dunes at dusk".into(),
            ..edited.clone()
        });
        tx.delete::<v1::Photo>(gone.uuid);
        Ok(())
    })
    .expect("commits");
    let base = keel_engine::Lsn(lib.status().expect("status").journal.last_lsn);
    lib.close().expect("closes");
    // The same library, never compacted: what a replay of the whole log gives.
    copy_home(&dir.path().join("a"), &dir.path().join("whole"));
    let lib = Library::open(&home(dir.path(), "a", false), "photos", PASSWORD).expect("opens");
    let report = lib.compact(base).expect("compacts");
    assert_eq!(report.base, base.0, "{report:?}");
    // And a change in the log after the base.
    let after = photo("after the base");
    lib.transact(|tx| Ok(tx.upsert(&after))).expect("commits");
    lib.close().expect("closes");

    let upgraded = Library::open(&home(dir.path(), "a", true), "photos", PASSWORD)
        .expect("opens with the new models");
    let seen = |uuid| upgraded.get::<v2::Photo>(uuid).expect("reads");
    let stars = |p: Option<v2::Photo>| p.map(|p| (p.caption, p.stars));
    assert_eq!(stars(seen(beach.uuid)), Some(("beach".into(), 5)));
    assert_eq!(stars(seen(edited.uuid)), Some(("dunes at dusk".into(), 5)));
    assert_eq!(stars(seen(after.uuid)), Some(("after the base".into(), 5)));
    assert_eq!(seen(gone.uuid), None);
    let replayed = Library::open(&home(dir.path(), "whole", true), "photos", PASSWORD)
        .expect("opens the copy with the new models");
    // Every row and clock of the app's models as a replay makes them (the libraries differ in
    // the record of the models' versions, which each wrote when it opened), but the photo
    // made after the base, which only the compacted library holds.
    let next = Uuid::from_u128(after.uuid.as_u128().wrapping_add(1));
    let around = [
        keel_engine::KeyRange {
            start: None,
            end: Some(after.uuid),
        },
        keel_engine::KeyRange {
            start: Some(next),
            end: None,
        },
    ];
    let digests = |lib: &Library| {
        [Album::DEF.code, v2::Photo::DEF.code].map(|code| {
            let def = lib.ranges().model(code).expect("a model");
            lib.ranges().digests(def, &around).expect("digests").1
        })
    };
    assert_eq!(
        digests(&upgraded),
        digests(&replayed),
        "the snapshot brought over equals a replay of the whole log"
    );
    // And it stays so: a rebuild starts from the snapshot brought over.
    let digest = upgraded.digest().expect("digest");
    upgraded.rebuild(&mut |_, _| {}).expect("rebuilds");
    assert_eq!(upgraded.digest().expect("digest"), digest);
    let (faults, from_replay) = upgraded.verify().expect("verifies");
    assert!(faults.faults.is_empty());
    assert_eq!(from_replay.expect("a replay"), digest);
}

/// A photo as an app that later dropped its `place` field wrote it.
mod v0 {
    use super::*;

    /// A photo with a place.
    #[derive(Clone, Debug, PartialEq, Eq, Syncable)]
    #[syncable(model = "photo", code = 41, domain = "content", priority = 20)]
    pub(crate) struct Photo {
        #[syncable(uuid)]
        pub(crate) uuid: Uuid,
        #[syncable(references = "album")]
        pub(crate) album: Uuid,
        pub(crate) caption: String,
        pub(crate) place: String,
    }
}

/// A compacted library whose app then dropped a field cannot be brought over (the rows do not
/// say what the field became): opening says so, and leaves the library as it was.
#[test]
fn a_compacted_library_whose_app_dropped_a_field_is_refused_with_a_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let old = Home::new(dir.path().join("a"))
        .with_model::<Album>()
        .and_then(|h| h.with_model::<v0::Photo>())
        .expect("registers");
    let (_, lib) = keel_tests::create_in(old.clone(), "photos").expect("creates");
    let album = Album {
        uuid: Uuid::new_v4(),
        name: "Summer".into(),
    };
    let photo = v0::Photo {
        uuid: Uuid::new_v4(),
        album: album.uuid,
        caption: "beach".into(),
        place: "Brittany".into(),
    };
    lib.transact(|tx| {
        tx.upsert(&album);
        tx.upsert(&photo);
        Ok(())
    })
    .expect("commits");
    lib.compact(keel_engine::Lsn(u64::MAX)).expect("compacts");
    lib.close().expect("closes");

    let Err(refused) = Library::open(&home(dir.path(), "a", false), "photos", PASSWORD) else {
        panic!("opened with a field of its rows gone");
    };
    assert!(
        refused.to_string().contains("photo") && refused.to_string().contains("place"),
        "{refused}"
    );
    let lib = Library::open(&old, "photos", PASSWORD).expect("opens with its own models");
    assert_eq!(
        lib.get::<v0::Photo>(photo.uuid).expect("reads"),
        Some(photo)
    );
}

/// A joiner whose app has other models than its inviter's receives the whole log, however long
/// (the file would be replayed for its models, not kept as its snapshot); one with the same
/// models starts at a base of its own past the inviter's `join_history` (decision 0079).
#[test]
fn a_joiner_of_another_app_version_receives_the_whole_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, lib) = keel_tests::create_in(home(dir.path(), "a", true), "photos").expect("creates");
    let a = Node::start(
        lib,
        keel_node::NodeOptions {
            join_history: Some(10),
            ..options(Vec::new())
        },
    )
    .expect("starts");
    let album = Album {
        uuid: Uuid::new_v4(),
        name: "Summer".into(),
    };
    a.library()
        .transact(|tx| {
            tx.upsert(&album);
            for i in 0..50 {
                tx.upsert(&v2::Photo {
                    uuid: Uuid::new_v4(),
                    album: album.uuid,
                    caption: format!("photo {i}"),
                    stars: i % 5,
                });
            }
            Ok(())
        })
        .expect("commits");
    a.library()
        .transact(|tx| {
            tx.upsert(&Album {
                name: "Summer '26".into(),
                ..album.clone()
            });
            Ok(())
        })
        .expect("commits");
    let old_app = join(&home(dir.path(), "b", false), &a);
    let same_app = join(&home(dir.path(), "c", true), &a);
    let base = |node: &Node| {
        node.library()
            .status()
            .expect("status")
            .journal
            .compacted_to
    };
    assert_eq!(
        base(&old_app),
        0,
        "the older app's device holds the whole log"
    );
    assert!(
        base(&same_app) > 0,
        "the same app's device starts at a base"
    );
    // The same log end everywhere and nothing to push (`settle` compares change ids, which a
    // log started at a base does not all hold).
    let deadline = Instant::now() + CONVERGE;
    loop {
        let ends: Vec<_> = [&a, &old_app, &same_app]
            .iter()
            .map(|n| (n.status().log_len, n.status().offline))
            .collect();
        if ends.iter().all(|e| *e == (ends[0].0, 0)) {
            break;
        }
        assert!(Instant::now() < deadline, "never settled: {ends:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    for node in [&old_app, &same_app] {
        assert_eq!(
            node.library()
                .get::<Album>(album.uuid)
                .expect("reads")
                .map(|a| a.name),
            Some("Summer '26".to_string())
        );
    }
}
