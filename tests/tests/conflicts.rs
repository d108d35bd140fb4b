//! Issue 27, first part: concurrent edits are recorded as conflicts, the same on every device.

use std::time::Duration;

use keel_engine::{Home, Library, Tag};
use keel_node::Node;
use keel_tests::cluster::{converge, founder, joiner, restart};
use keel_tests::PASSWORD;

const WAIT: Duration = Duration::from_secs(60);

fn renamed(tag: &Tag, name: &str) -> Tag {
    Tag {
        name: name.into(),
        ..tag.clone()
    }
}

/// Two converged devices, `a` leading, and a tag `a` made; `setup` runs on `a` before they
/// converge.
fn two_devices_and_a_tag(
    root: &std::path::Path,
    setup: impl FnOnce(&Node, &Node),
) -> (Node, Home, Node, Tag) {
    let (_ha, a) = founder(root, "a", "lib").expect("founder");
    let (home_b, b) = joiner(root, "b", &a).expect("joins");
    let tag = keel_tests::tag("holiday");
    a.library()
        .transact(|tx| Ok(tx.upsert(&tag)))
        .expect("commits");
    setup(&a, &b);
    converge(&[&a, &b], WAIT).unwrap_or_else(|r| panic!("{r}"));
    (a, home_b, b, tag)
}

/// The name `node` shows for `tag`.
fn name_on(node: &Node, tag: &Tag) -> String {
    node.library()
        .get::<Tag>(tag.uuid)
        .expect("reads")
        .expect("the tag")
        .name
}

/// Renames `tag` to `name` in b's library, opened alone while its node is stopped.
fn rename_while_apart(home_b: &Home, tag: &Tag, name: &str) {
    let offline = Library::open(home_b, "lib", PASSWORD).expect("b opens alone");
    offline
        .transact(|tx| Ok(tx.upsert(&renamed(tag, name))))
        .expect("b renames while apart");
    offline.close().expect("closes");
}

/// Two devices rename one tag while apart: after they meet, each records one conflict, with the
/// same id, both values and the same winner, whose value the tag shows. A pick resolves it on
/// both; a rename made after seeing the other's is not a conflict; a replay finds the same.
#[test]
fn concurrent_edits_are_one_conflict_on_every_device() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, home_b, b, tag) = two_devices_and_a_tag(dir.path(), |_, _| {});
    let listen = b.local_addr();
    b.stop().expect("b goes away");
    a.library()
        .transact(|tx| Ok(tx.upsert(&renamed(&tag, "summer"))))
        .expect("a renames");
    rename_while_apart(&home_b, &tag, "beach");
    let heard = keel_tests::events_of(a.library());
    let b = restart(&home_b, "lib", listen).expect("b comes back");
    converge(&[&a, &b], WAIT).unwrap_or_else(|r| panic!("{r}"));
    let on_a = a.library().conflicts().expect("lists");
    // A host app hears of it.
    let deadline = std::time::Instant::now() + WAIT;
    let announced =
        std::iter::from_fn(|| heard.recv_deadline(deadline).ok()).find_map(|event| match event {
            keel_engine::Event::ConflictRecorded { id, field, .. } => Some((id, field)),
            _ => None,
        });
    assert_eq!(announced, on_a.first().map(|c| (c.id, "name")));
    let on_b = b.library().conflicts().expect("lists");
    assert_eq!(on_a.len(), 1, "{on_a:?}");
    assert_eq!(on_a, on_b, "the same conflict on both devices");
    let conflict = &on_a[0];
    assert_eq!((conflict.model, conflict.field), ("tag", "name"));
    assert_eq!(conflict.record, tag.uuid);
    let values: Vec<&keel_engine::schema::Value> =
        conflict.sides.iter().map(|s| &s.value).collect();
    assert!(values.contains(&&keel_engine::schema::Value::Text("summer".into())));
    assert!(values.contains(&&keel_engine::schema::Value::Text("beach".into())));
    assert_ne!(conflict.sides[0].device, conflict.sides[1].device);
    assert_eq!(
        keel_engine::schema::Value::Text(name_on(&a, &tag)),
        conflict.sides[conflict.winner].value,
        "the field shows the winner"
    );
    assert!(conflict.resolved.is_none());
    // A pick on b, of the value that lost: the field shows it everywhere and the conflict is
    // resolved on both devices, by the same change.
    let lost = conflict.sides[1 - conflict.winner].value.clone();
    b.library()
        .resolve_conflict(conflict.id, lost.clone())
        .expect("resolves");
    converge(&[&a, &b], WAIT).unwrap_or_else(|r| panic!("{r}"));
    for node in [&a, &b] {
        assert_eq!(keel_engine::schema::Value::Text(name_on(node, &tag)), lost);
    }
    let resolved = a.library().conflicts().expect("lists");
    assert_eq!(resolved, b.library().conflicts().expect("lists"));
    assert!(resolved[0].resolved.is_some(), "{resolved:?}");
    // Seen, then edited (the last write was b's): not concurrent.
    a.library()
        .transact(|tx| Ok(tx.upsert(&renamed(&tag, "beach 2026"))))
        .expect("a renames again");
    converge(&[&a, &b], WAIT).unwrap_or_else(|r| panic!("{r}"));
    assert_eq!(a.library().conflicts().expect("lists").len(), 1);
    // A replay finds the same conflict.
    b.library().rebuild(&mut |_, _| {}).expect("rebuilds");
    assert_eq!(
        b.library().conflicts().expect("lists"),
        a.library().conflicts().expect("lists")
    );
}

/// With a policy that prefers b, set on a before the devices part, b's value wins the next
/// conflict and shows on both, whichever clock is later.
#[test]
fn a_preferred_devices_value_wins_on_every_device() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, home_b, b, tag) = two_devices_and_a_tag(dir.path(), |a, b| {
        let prefer_b = keel_engine::Strategy::PreferDevice(b.library().device_id());
        a.library()
            .set_conflict_strategy(Some("tag"), prefer_b)
            .expect("sets");
    });
    let listen = b.local_addr();
    b.stop().expect("b goes away");
    rename_while_apart(&home_b, &tag, "b's name");
    // a writes later, so latest-wins would keep a's name.
    std::thread::sleep(Duration::from_millis(5));
    a.library()
        .transact(|tx| Ok(tx.upsert(&renamed(&tag, "a's name"))))
        .expect("a renames");
    let b = restart(&home_b, "lib", listen).expect("b comes back");
    converge(&[&a, &b], WAIT).unwrap_or_else(|r| panic!("{r}"));
    let conflicts = a.library().conflicts().expect("lists");
    assert_eq!(conflicts, b.library().conflicts().expect("lists"));
    assert_eq!(conflicts.len(), 1, "{conflicts:?}");
    assert_eq!(conflicts[0].strategy, "prefer-device");
    for node in [&a, &b] {
        assert_eq!(name_on(node, &tag), "b's name");
    }
    assert!(matches!(
        a.library()
            .set_conflict_strategy(Some("no such model"), keel_engine::Strategy::Manual),
        Err(keel_engine::EngineError::NoSuchModel(_))
    ));
}

/// A device whose clock runs ten minutes behind renames a tag after it has seen the rename of a
/// device whose clock runs ahead: its rename was made later, so it wins on both, as a user who
/// renames what they see expects (the clock observes every change the device applies).
#[test]
fn a_rename_made_after_seeing_one_from_a_clock_ahead_wins() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, _home_b, b, tag) = two_devices_and_a_tag(dir.path(), |_, _| {});
    let ahead = keel_schema::Hlc {
        physical_ms: keel_engine::now_ms() + 600_000,
        counter: 0,
        device: a.library().device_id(),
    };
    let change = keel_schema::Change::upsert(
        keel_schema::ChangeId::new(),
        ahead,
        &renamed(&tag, "from a clock ahead"),
    )
    .expect("sync-ready");
    a.library()
        .transact(|tx| {
            tx.push(change);
            Ok(())
        })
        .expect("a renames");
    converge(&[&a, &b], WAIT).unwrap_or_else(|r| panic!("{r}"));
    assert_eq!(name_on(&b, &tag), "from a clock ahead");
    b.library()
        .transact(|tx| Ok(tx.upsert(&renamed(&tag, "seen and renamed"))))
        .expect("b renames what it sees");
    converge(&[&a, &b], WAIT).unwrap_or_else(|r| panic!("{r}"));
    for node in [&a, &b] {
        assert_eq!(name_on(node, &tag), "seen and renamed");
    }
}
