//! Issue 26: every entry from every device. A device tags and notes another device's files by
//! path and by uuid; its own location wins a path both have; a path in several other devices'
//! locations asks which.

use std::time::Duration;

use keel_engine::{EngineError, Scope};
use keel_tests::cluster::{converge, founder, joiner};

const CONVERGE: Duration = Duration::from_secs(30);

fn tags_of(lib: &keel_engine::Library, entry: &keel_engine::Entry) -> Vec<String> {
    let metadata = lib.files().metadata(entry).expect("metadata");
    let mut names: Vec<String> = metadata
        .content
        .into_iter()
        .chain(metadata.entry)
        .flat_map(|(_, tags)| tags.into_iter().map(|t| t.name))
        .collect();
    names.sort();
    names
}

#[test]
fn devices_tag_and_note_each_others_files_by_path_and_by_uuid() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(&tree).expect("tree");
    std::fs::write(tree.join("beach.jpg"), b"sand").expect("file");
    let tree = tree.canonicalize().expect("canonical");
    let file = tree.join("beach.jpg");
    let (_ha, a) = founder(dir.path(), "a", "lib").expect("founder");
    let (_hb, b) = joiner(dir.path(), "b", &a).expect("b joins");
    let (_hc, c) = joiner(dir.path(), "c", &a).expect("c joins");
    // a and b each index the same folder (same path on this machine): two locations.
    a.library().index(&tree, &mut |_| {}).expect("a indexes");
    converge(&[&a, &b, &c], CONVERGE).unwrap_or_else(|r| panic!("{r}"));

    // b has no location there: the path resolves to a's, and b's tag reaches a's entry.
    b.library()
        .files()
        .tag(&file, &["from b".to_string()], Scope::Entry)
        .expect("b tags a's file");
    b.library().index(&tree, &mut |_| {}).expect("b indexes");
    converge(&[&a, &b, &c], CONVERGE).unwrap_or_else(|r| panic!("{r}"));
    let on_a = a.library().files().entry(&file).expect("a's entry");
    assert_eq!(tags_of(a.library(), &on_a), ["from b"]);

    // Now both have a location there: for each its own wins; for c, it is ambiguous.
    let on_b = b.library().files().entry(&file).expect("b's entry");
    assert_ne!(on_a.uuid, on_b.uuid);
    let asked = c.library().files().entry(&file);
    assert!(
        matches!(asked, Err(EngineError::AmbiguousPath { .. })),
        "{asked:?}"
    );
    // By the start of its id (a founder is named after its machine), and b by its name.
    let a_hex = a.library().device_id().to_hex();
    let device_a = c.library().device_named(&a_hex[..8]).expect("a by id");
    assert_eq!(device_a.device_id, a_hex);
    let device_b = c.library().device_named("b").expect("b by name");
    assert_eq!(device_b.uuid, b.library().device_id().record_uuid());
    c.library()
        .files()
        .on(device_a.uuid)
        .tag(&file, &["from c".to_string()], Scope::Entry)
        .expect("c tags a's file");
    // By uuid: c notes b's entry.
    let uuid = on_b.uuid.expect("uuid").to_string();
    c.library()
        .files()
        .note(std::path::Path::new(&uuid), "b's copy", Scope::Entry)
        .expect("c notes by uuid");
    converge(&[&a, &b, &c], CONVERGE).unwrap_or_else(|r| panic!("{r}"));
    assert_eq!(tags_of(a.library(), &on_a), ["from b", "from c"]);
    let note = b
        .library()
        .files()
        .metadata(&on_b)
        .expect("metadata")
        .entry
        .and_then(|(m, _)| m.notes);
    assert_eq!(note.as_deref(), Some("b's copy"));
    assert!(matches!(
        c.library().device_named("nobody"),
        Err(EngineError::NoSuchDevice(_))
    ));
}

/// Issue 26: the everyday operations, and what each does on the other device: untag, remove a
/// note, favourite and hidden, rename and recolour a tag, re-index one file, remove a location
/// (its entries become tombstones everywhere), list the libraries of a home.
#[test]
fn everyday_operations_reach_every_device() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(&tree).expect("tree");
    std::fs::write(tree.join("beach.jpg"), b"sand").expect("file");
    std::fs::write(tree.join("dunes.jpg"), b"wind").expect("file");
    let tree = tree.canonicalize().expect("canonical");
    let file = tree.join("beach.jpg");
    let (home_a, a) = founder(dir.path(), "a", "lib").expect("founder");
    let (_hb, b) = joiner(dir.path(), "b", &a).expect("b joins");
    let lib = a.library();
    lib.index(&tree, &mut |_| {}).expect("indexes");
    let files = lib.files();
    files
        .tag(&file, &["red".into(), "blue".into()], Scope::Content)
        .expect("tags");
    files.note(&file, "mine", Scope::Entry).expect("notes");
    files
        .untag(&file, &["blue".into()], Scope::Content)
        .expect("untags");
    files
        .remove_note(&file, Scope::Entry)
        .expect("removes the note");
    files
        .set_flags(&file, Scope::Entry, Some(true), Some(false))
        .expect("flags");
    lib.rename_tag("red", "crimson").expect("renames");
    assert!(matches!(
        lib.rename_tag("nothing", "x"),
        Err(EngineError::NoSuchTag(_))
    ));
    lib.recolor_tag("crimson", Some("#c00")).expect("recolours");
    // Tagging with the new name finds the renamed tag, not a new one.
    let other = tree.join("dunes.jpg");
    files
        .tag(&other, &["crimson".into()], Scope::Content)
        .expect("tags");
    assert_eq!(lib.tags().expect("tags").len(), 2, "crimson and blue");
    // One file re-indexed alone.
    std::fs::write(&other, b"more wind").expect("edits");
    let report = lib.index(&other, &mut |_| {}).expect("re-indexes one file");
    assert_eq!((report.files, report.changed), (1, 1), "{report:?}");
    converge(&[&a, &b], CONVERGE).unwrap_or_else(|r| panic!("{r}"));
    let on_b = b.library().files().entry(&file).expect("b sees a's entry");
    let metadata = b.library().files().metadata(&on_b).expect("metadata");
    let (content, tags) = metadata.content.expect("content metadata");
    assert_eq!(
        tags.iter()
            .map(|t| (t.name.as_str(), t.color.as_deref()))
            .collect::<Vec<_>>(),
        [("crimson", Some("#c00"))]
    );
    assert!(content.notes.is_none());
    let (entry, _) = metadata.entry.expect("entry metadata");
    assert_eq!(
        (entry.notes, entry.favorite, entry.hidden),
        (None, true, false)
    );
    // b cannot remove a's location; a can, and b sees its entries go.
    let location = lib
        .files()
        .location(&tree)
        .expect("reads")
        .expect("location");
    assert!(matches!(
        b.library().remove_location(location.uuid),
        Err(EngineError::NotYourLocation(_))
    ));
    assert_eq!(lib.remove_location(location.uuid).expect("removes"), 2);
    converge(&[&a, &b], CONVERGE).unwrap_or_else(|r| panic!("{r}"));
    assert!(b.library().files().entry(&file).is_err());
    assert!(b
        .library()
        .read(|p| p.query().locations())
        .expect("reads")
        .is_empty());
    assert!(std::fs::metadata(&file).is_ok(), "the files stay on disk");
    assert_eq!(home_a.libraries().expect("lists"), ["lib"]);
}
