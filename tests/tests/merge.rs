//! Issue 27, second part: a library merged into another (SyncSetup).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use keel_engine::{Home, JobKind, JobState, Library, MergeReport, Scope};
use keel_node::Node;
use keel_schema::{ContentIdentity, Value};
use keel_tests::cluster::{self, converge, founder, pair};
use keel_tests::{create_in, PASSWORD};
use uuid::Uuid;

fn write(dir: &Path, files: &[(&str, &str)]) {
    std::fs::create_dir_all(dir).expect("mkdir");
    for (name, text) in files {
        std::fs::write(dir.join(name), text).expect("writes");
    }
}

fn tag(lib: &Library, path: &Path, tags: &[&str], scope: Scope) {
    let tags: Vec<String> = tags.iter().map(|t| t.to_string()).collect();
    lib.files().tag(path, &tags, scope).expect("tags");
}

/// The per-model line of a report.
fn line<'a>(report: &'a MergeReport, model: &str) -> &'a keel_engine::ModelMerge {
    report
        .models
        .iter()
        .find(|m| m.model == model)
        .unwrap_or_else(|| panic!("no {model} in {report:?}"))
}

/// Library `t` indexes `x/` (a: "hello", b: "world"), tags a red and b blue, notes "from t" on
/// hello; library `s` (same home) indexes `y/` (c: "hello", d: "other"), tags c red and green,
/// notes "from s" on hello and "d's note" on d's entry.
fn two_libraries(root: &Path) -> (Home, Library, Library) {
    let (home, t) = create_in(Home::new(root.join("home")), "t").expect("creates t");
    let (_, s) = create_in(home.clone(), "s").expect("creates s");
    let (x, y) = (root.join("x"), root.join("y"));
    write(&x, &[("a.txt", "hello"), ("b.txt", "world")]);
    write(&y, &[("c.txt", "hello"), ("d.txt", "other")]);
    t.index(&x, &mut |_| {}).expect("indexes x");
    tag(&t, &x.join("a.txt"), &["red"], Scope::Entry);
    tag(&t, &x.join("b.txt"), &["blue"], Scope::Entry);
    t.files()
        .note(&x.join("a.txt"), "from t", Scope::Content)
        .expect("notes");
    s.index(&y, &mut |_| {}).expect("indexes y");
    tag(&s, &y.join("c.txt"), &["red", "green"], Scope::Entry);
    s.files()
        .note(&y.join("c.txt"), "from s", Scope::Content)
        .expect("notes");
    s.files()
        .note(&y.join("d.txt"), "d's note", Scope::Entry)
        .expect("notes");
    t.flush().expect("flushes");
    s.flush().expect("flushes");
    (home, t, s)
}

/// Every visible record of every model, by model and uuid, without clocks: what two merges
/// that should agree are compared by.
fn records(lib: &Library) -> BTreeMap<(String, Uuid), Vec<Value>> {
    lib.flush().expect("flushes");
    let mut out = BTreeMap::new();
    for def in lib.models().iter() {
        if def.name == "attestation" {
            continue;
        }
        let mut after = None;
        loop {
            let rows = lib
                .read(|p| p.query().rows_after(def, after, 4096))
                .expect("reads");
            let Some((last, _)) = rows.last() else { break };
            after = Some(*last);
            for (uuid, values) in rows {
                out.insert((def.name.to_string(), uuid), values);
            }
        }
    }
    out
}

/// Two libraries with a shared content and a shared tag name merge to the union: one content
/// per hash, one tag per name, both locations, every entry; the tag uses re-pointed; the two
/// notes on the shared content kept as a conflict; a dry run first reports it and writes
/// nothing; merging again writes nothing.
#[test]
fn two_libraries_merge_to_the_union_and_merging_twice_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_home, t, s) = two_libraries(dir.path());
    let (entries_t, entries_s) = (
        t.status().expect("st").counts.entries,
        s.status().expect("st").counts.entries,
    );
    let before = t.digest().expect("digest");

    let dry = t.merge_from(&s, true, &mut |_, _| {}).expect("dry run");
    assert!(dry.dry_run);
    assert_eq!(dry.changes, 0);
    assert_eq!(
        t.digest().expect("digest"),
        before,
        "a dry run writes nothing"
    );
    let contents = line(&dry, "content_identity");
    assert_eq!((contents.added, contents.became_one), (1, 1), "{dry:?}");
    let tags = line(&dry, "tag");
    assert_eq!((tags.added, tags.became_one), (1, 1), "{dry:?}");
    assert_eq!(line(&dry, "location").added, 1, "{dry:?}");
    assert_eq!(line(&dry, "entry").added, entries_s, "{dry:?}");
    assert_eq!(dry.conflicting, 1, "the two notes on hello: {dry:?}");

    let report = t.merge_from(&s, false, &mut |_, _| {}).expect("merges");
    assert_eq!(
        report.models, dry.models,
        "the dry run told what the merge did"
    );
    assert!(report.changes > 0);
    let counts = t.status().expect("status").counts;
    assert_eq!(counts.locations, 2);
    assert_eq!(counts.entries, entries_t + entries_s);
    assert_eq!(counts.content_identities, 3, "hello, world, other");
    let names: Vec<String> = t
        .tags()
        .expect("tags")
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(names.len(), 3, "red, blue, green: {names:?}");
    let red = t.tag_named("red").expect("reads").expect("red");
    let y = dir.path().join("y");
    let c = t.files().entry(&y.join("c.txt")).expect("c is here");
    let meta = t.files().metadata(&c).expect("metadata");
    let (_, c_tags) = meta.entry.expect("c's own metadata");
    let mut c_tags: Vec<(String, Uuid)> = c_tags.into_iter().map(|t| (t.name, t.uuid)).collect();
    c_tags.sort();
    assert_eq!(
        c_tags[1],
        ("red".to_string(), red.uuid),
        "c's red is t's red"
    );
    assert_eq!(c_tags[0].0, "green");
    let (hello_meta, _) = meta.content.expect("hello's metadata");
    let a = t.files().entry(&dir.path().join("x/a.txt")).expect("a");
    assert_eq!(a.content, c.content, "one content for hello");
    let d = t.files().entry(&y.join("d.txt")).expect("d");
    let d_note = t
        .files()
        .metadata(&d)
        .expect("md")
        .entry
        .expect("d's")
        .0
        .notes;
    assert_eq!(d_note.as_deref(), Some("d's note"));
    // One device wrote both notes, in two libraries: still a conflict, both values kept.
    assert_eq!(
        hello_meta.notes.as_deref(),
        Some("from s"),
        "the later shows"
    );
    let conflicts = t.conflicts().expect("conflicts");
    assert_eq!(conflicts.len(), 1, "{conflicts:?}");
    let sides: Vec<&Value> = conflicts[0].sides.iter().map(|s| &s.value).collect();
    assert_eq!(
        sides,
        [&Value::Text("from t".into()), &Value::Text("from s".into())]
    );
    assert_eq!(conflicts[0].record, hello_meta.uuid);
    let hello = c.content.expect("identified");
    let content: ContentIdentity = t
        .read(|p| p.query().content_identity(hello))
        .expect("reads")
        .expect("hello");
    assert_eq!(
        content.entry_count, 2,
        "both entries count on the one content"
    );

    let digest = t.digest().expect("digest");
    let log = t.status().expect("status").journal.log_len;
    let again = t
        .merge_from(&s, false, &mut |_, _| {})
        .expect("merges again");
    assert_eq!(again.changes, 0, "{again:?}");
    assert_eq!(t.digest().expect("digest"), digest);
    assert_eq!(t.status().expect("status").journal.log_len, log);
    let jobs = t.jobs().expect("jobs");
    assert!(jobs
        .iter()
        .all(|j| !matches!(j.kind, JobKind::Merge { .. }) || j.state == JobState::Completed));
    assert!(matches!(
        t.merge_from(&t, false, &mut |_, _| {}),
        Err(keel_engine::EngineError::MergeIntoItself(_))
    ));
}

/// SyncSetup between two devices: b built a library of its own (named like a's), joins a's
/// (set up here as `lib-2`) and merges its own in; once they converge, both devices hold the
/// union and record the two notes on the shared content as one conflict, with the same id.
#[test]
fn a_device_joins_with_its_own_library_and_both_devices_hold_the_merge() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let (x, y) = (root.join("x"), root.join("y"));
    write(&x, &[("a.txt", "hello"), ("b.txt", "world")]);
    write(&y, &[("c.txt", "hello"), ("d.txt", "other")]);
    let (_home_a, a) = founder(root, "a", "lib").expect("founder");
    a.library().index(&x, &mut |_| {}).expect("indexes x");
    tag(a.library(), &x.join("a.txt"), &["red"], Scope::Entry);
    a.library()
        .files()
        .note(&x.join("a.txt"), "from a", Scope::Content)
        .expect("notes");
    let home_b = Home::new(root.join("b"));
    let (_, own) = create_in(home_b.clone(), "lib").expect("b's own library");
    own.index(&y, &mut |_| {}).expect("indexes y");
    tag(&own, &y.join("c.txt"), &["red", "green"], Scope::Entry);
    own.files()
        .note(&y.join("c.txt"), "from b", Scope::Content)
        .expect("notes");
    own.close().expect("closes");

    let joined = pair(&home_b, &a, a.local_addr()).expect("joins");
    assert_eq!(joined, "lib-2", "b's own library keeps its name");
    let lib = Library::open(&home_b, &joined, PASSWORD).expect("opens");
    let own = Library::open(&home_b, "lib", PASSWORD).expect("opens");
    let report = lib.merge_from(&own, false, &mut |_, _| {}).expect("merges");
    assert_eq!(report.conflicting, 1, "{report:?}");
    own.close().expect("closes");
    let b = Node::start(lib, cluster::options(vec![a.local_addr()])).expect("b starts");
    converge(&[&a, &b], Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e}"));

    let mut ids = Vec::new();
    for node in [&a, &b] {
        let lib = node.library();
        let counts = lib.status().expect("status").counts;
        assert_eq!(counts.locations, 2);
        assert_eq!(counts.content_identities, 3, "hello, world, other");
        assert_eq!(counts.tags, 2, "red, green");
        let conflicts = lib.conflicts().expect("conflicts");
        assert_eq!(conflicts.len(), 1, "{conflicts:?}");
        let sides: Vec<&Value> = conflicts[0].sides.iter().map(|s| &s.value).collect();
        assert_eq!(
            sides,
            [&Value::Text("from a".into()), &Value::Text("from b".into())]
        );
        ids.push(conflicts[0].id);
        let c = lib.files().entry(&y.join("c.txt")).expect("c is on both");
        let tags = lib.files().metadata(&c).expect("md").entry.expect("c's").1;
        assert_eq!(tags.len(), 2, "{tags:?}");
    }
    assert_eq!(ids[0], ids[1], "the same conflict on both devices");
}

/// `kill -9` in the middle of a merge: the job is interrupted with a checkpoint; the same merge
/// asked again goes on from it, and ends with exactly the records an uninterrupted merge into a
/// copy of the same library gives.
#[test]
fn a_merge_killed_midway_resumes_to_the_uninterrupted_result() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (home, t, s) = two_libraries(dir.path());
    s.transact(|tx| {
        for i in 0..3 * keel_engine::MERGE_BATCH {
            tx.upsert(&keel_tests::tag(&format!("tag {i}")));
        }
        Ok(())
    })
    .expect("commits");
    t.close().expect("closes");
    s.close().expect("closes");
    // The uninterrupted merge, into a copy of the home (the same device, the same libraries).
    let other = Home::new(dir.path().join("other"));
    copy_dir(home.root(), other.root());
    let reference = {
        let t = Library::open(&other, "t", PASSWORD).expect("opens");
        let s = Library::open(&other, "s", PASSWORD).expect("opens");
        t.merge_from(&s, false, &mut |_, _| {}).expect("merges");
        records(&t)
    };
    // `crash_child` merges into library "lib": the same library under that name.
    std::fs::rename(home.library_dir("t"), home.library_dir("lib")).expect("renames");
    let child = Path::new(env!("CARGO_BIN_EXE_crash_child"));
    let (done, total) = keel_tests::kill_child_at(child, &home, &["merge", "s"], |done, total| {
        done > keel_engine::MERGE_BATCH as u64 && done + keel_engine::MERGE_BATCH as u64 <= total
    });
    assert!(done < total);
    let t = Library::open(&home, "lib", PASSWORD).expect("reopens");
    let job = t.jobs().expect("jobs").pop().expect("the merge");
    assert!(matches!(job.kind, JobKind::Merge { .. }), "{job:?}");
    assert_eq!(job.state, JobState::Interrupted);
    assert_eq!(
        t.resume_jobs().expect("resumes"),
        0,
        "a merge waits to be asked again"
    );
    let s = Library::open(&home, "s", PASSWORD).expect("opens");
    let report = t.merge_from(&s, false, &mut |_, _| {}).expect("goes on");
    assert!(report.resumed, "{report:?}");
    let looked_at: u64 = report.models.iter().map(|m| m.source).sum();
    assert!(
        looked_at + keel_engine::MERGE_BATCH as u64 <= total,
        "it went on from its checkpoint: {looked_at} of {total} looked at again"
    );
    assert_eq!(t.job(job.id).expect("job").state, JobState::Completed);
    assert_same(&records(&t), &reference);
}

/// Fails with the records that differ (not the whole libraries).
fn assert_same(
    got: &BTreeMap<(String, Uuid), Vec<Value>>,
    want: &BTreeMap<(String, Uuid), Vec<Value>>,
) {
    let missing: Vec<_> = want
        .iter()
        .filter(|(k, v)| got.get(*k) != Some(*v))
        .take(5)
        .collect();
    let extra: Vec<_> = got
        .iter()
        .filter(|(k, v)| want.get(*k) != Some(*v))
        .take(5)
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{} records against {}; lacking {missing:?}; differing or extra {extra:?}",
        got.len(),
        want.len()
    );
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for item in std::fs::read_dir(from).expect("lists") {
        let item = item.expect("item");
        let target = to.join(item.file_name());
        if item.file_type().expect("type").is_dir() {
            copy_dir(&item.path(), &target);
        } else {
            std::fs::copy(item.path(), target).expect("copies");
        }
    }
}
