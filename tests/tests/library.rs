//! Library behaviour across crates: re-indexing semantics, events, clock monotonicity across
//! restarts, password change.

use std::time::Duration;

use keel_engine::{EngineError, Entry, Event, Home, Library, Scope, Tag};
use keel_schema::{Change, ChangeId, Hlc};
use keel_tests::{create_library, PASSWORD};
use uuid::Uuid;

#[test]
fn reindex_keeps_entries_across_change_and_move_and_tombstones_removals() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(tree.join("sub")).expect("mkdir");
    std::fs::write(tree.join("keep.txt"), b"keep").expect("write");
    std::fs::write(tree.join("change.txt"), b"before").expect("write");
    std::fs::write(tree.join("move.txt"), b"moving bytes").expect("write");
    std::fs::write(tree.join("gone.txt"), b"gone").expect("write");
    let (_home, lib) = create_library(dir.path(), "lib").expect("creates");
    let first = lib.index(&tree, &mut |_| {}).expect("indexes");
    assert_eq!((first.files, first.dirs, first.new), (4, 1, 5));

    lib.files()
        .note(&tree.join("change.txt"), "entry note", Scope::Entry)
        .expect("note");
    lib.files()
        .tag(&tree.join("change.txt"), &["old".into()], Scope::Content)
        .expect("tag");
    lib.files()
        .note(&tree.join("move.txt"), "follows the file", Scope::Entry)
        .expect("note");
    lib.files()
        .note(&tree.join("gone.txt"), "dies with the file", Scope::Entry)
        .expect("note");
    let changed_before = lib.files().entry(&tree.join("change.txt")).expect("entry");
    let moved_before = lib.files().entry(&tree.join("move.txt")).expect("entry");
    let old_content = changed_before.content.expect("identified");
    let metadata_before = lib.status().expect("status").counts.user_metadata;

    std::thread::sleep(Duration::from_millis(20));
    std::fs::write(tree.join("change.txt"), b"after, longer").expect("write");
    std::fs::rename(tree.join("move.txt"), tree.join("sub/moved.txt")).expect("rename");
    std::fs::remove_file(tree.join("gone.txt")).expect("remove");
    let second = lib.index(&tree, &mut |_| {}).expect("re-indexes");
    assert_eq!(
        (second.changed, second.moved, second.removed, second.new),
        (1, 1, 1, 0),
        "{second:?}"
    );

    let changed = lib.files().entry(&tree.join("change.txt")).expect("entry");
    assert_eq!(changed.uuid, changed_before.uuid, "the entry is preserved");
    assert_ne!(
        changed.content,
        Some(old_content),
        "the content is re-identified"
    );
    let md = lib.files().metadata(&changed).expect("metadata");
    assert_eq!(
        md.entry.map(|(m, _)| m.notes),
        Some(Some("entry note".into()))
    );
    assert!(
        md.content.is_none(),
        "content-scoped tags stay with the old content"
    );
    let old_tags = lib
        .read(|p| p.query().tags_of_content(old_content))
        .expect("tags");
    assert_eq!(old_tags.len(), 1);

    let moved = lib
        .files()
        .entry(&tree.join("sub/moved.txt"))
        .expect("entry");
    assert_eq!(moved.uuid, moved_before.uuid, "a move keeps the entry");
    let md = lib.files().metadata(&moved).expect("metadata");
    assert_eq!(
        md.entry.map(|(m, _)| m.notes),
        Some(Some("follows the file".into()))
    );

    assert!(lib.files().entry(&tree.join("gone.txt")).is_err());
    let status = lib.status().expect("status");
    assert_eq!(status.counts.entries, 4, "keep, change, sub, moved");
    assert_eq!(
        status.counts.user_metadata,
        metadata_before - 1,
        "the removed entry's metadata goes too"
    );
    let third = lib.index(&tree, &mut |_| {}).expect("re-indexes");
    assert_eq!(
        (third.changed, third.moved, third.removed, third.new),
        (0, 0, 0, 0)
    );
    let content = lib
        .read(|p| {
            p.query()
                .content_identity(moved.content.expect("identified"))
        })
        .expect("query")
        .expect("content");
    assert_eq!((content.entry_count, content.total_size), (1, 12));
}

#[test]
fn subscribers_see_applied_changes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_home, lib) = create_library(dir.path(), "lib").expect("creates");
    let mut events = lib.subscribe();
    let tag = Uuid::now_v7();
    lib.transact(|tx| {
        tx.upsert(&Tag {
            uuid: tag,
            name: "x".into(),
            color: None,
            created_ms: 0,
        });
        Ok(())
    })
    .expect("commit");
    lib.flush().expect("flush");
    let mut seen = false;
    while let Ok(event) = events.try_recv() {
        if let Event::RecordsChanged { records, .. } = event {
            seen |= records
                .iter()
                .any(|(model, uuid, _)| *model == "tag" && *uuid == tag);
        }
    }
    assert!(seen, "no RecordsChanged event for the tag");
}

#[test]
fn clock_never_goes_back_across_restarts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (home, lib) = create_library(dir.path(), "lib").expect("creates");
    let device = lib.device_id();
    let future_ms = keel_engine::now_ms() + 3_600_000;
    let future = Hlc {
        physical_ms: future_ms,
        counter: 5,
        device,
    };
    let tag = Tag {
        uuid: Uuid::now_v7(),
        name: "future".into(),
        color: None,
        created_ms: 0,
    };
    let change = Change::upsert(ChangeId::new(), future, &tag).expect("sync-ready");
    lib.transact(|tx| {
        tx.push(change);
        Ok(())
    })
    .expect("commit");
    lib.close().expect("close");
    let lib = Library::open(&home, "lib", PASSWORD).expect("reopen");
    let (_, receipt) = lib
        .transact(|tx| {
            tx.upsert(&Tag {
                uuid: Uuid::now_v7(),
                name: "after restart".into(),
                color: None,
                created_ms: 0,
            });
            Ok(())
        })
        .expect("commit");
    let changes = lib.sync_state().changes().expect("journal");
    let last = changes
        .iter()
        .find(|c| c.id == receipt.change_ids[0])
        .expect("in the journal");
    assert!(
        last.hlc > future,
        "{:?} is not after {:?}",
        last.hlc,
        future
    );
}

#[test]
fn password_change_rewraps_the_key_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (home, lib) = create_library(dir.path(), "lib").expect("creates");
    let digest = lib.digest().expect("digest");
    lib.close().expect("close");
    let journal = home.library_dir("lib").join("journal.redb");
    let before = std::fs::read(&journal).expect("read");
    let kdf = keel_engine::KdfParams::INSECURE_FAST;
    assert!(Library::change_password(&home, "lib", "wrong", "new", kdf).is_err());
    Library::change_password(&home, "lib", PASSWORD, "new password", kdf).expect("changes");
    assert_eq!(
        std::fs::read(&journal).expect("read"),
        before,
        "the log is not re-encrypted"
    );
    assert!(Library::open(&home, "lib", PASSWORD).is_err());
    let lib = Library::open(&Home::new(home.root()), "lib", "new password").expect("opens");
    assert_eq!(lib.digest().expect("digest"), digest);
}

/// A library "lib" with 20 indexed files, one tagged, closed. Returns its home and digest.
fn closed_library_of_20_files(dir: &std::path::Path) -> (Home, String) {
    let (home, lib) = create_library(dir, "lib").expect("creates");
    let tree = dir.join("tree");
    std::fs::create_dir_all(&tree).expect("mkdir");
    for i in 0..20 {
        std::fs::write(tree.join(format!("f{i}.txt")), format!("file {i}")).expect("write");
    }
    lib.index(&tree, &mut |_| {}).expect("indexes");
    lib.files()
        .tag(&tree.join("f3.txt"), &["kept".into()], Scope::Content)
        .expect("tags");
    let digest = lib.digest().expect("digest");
    lib.close().expect("closes");
    (home, digest)
}

#[test]
fn a_projection_whose_fast_load_was_cut_short_is_rebuilt_on_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (home, digest) = closed_library_of_20_files(dir.path());
    let lib_dir = home.library_dir("lib");

    // What a process killed during a replay's fast load leaves: the marker beside the file.
    std::fs::write(lib_dir.join("projections.sqlite.loading"), b"").expect("marker");
    let lib = Library::open(&home, "lib", PASSWORD).expect("reopens");
    assert!(!lib_dir.join("projections.sqlite.loading").exists());
    assert_eq!(
        lib.digest().expect("digest"),
        digest,
        "the projection was replayed from the journal"
    );
    assert_eq!(lib.status().expect("status").counts.entries, 20);
}

#[test]
fn a_projection_of_an_older_schema_is_replayed_on_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (home, digest) = closed_library_of_20_files(dir.path());
    let lib_dir = home.library_dir("lib");

    // A projection written by the previous build (schema 1), with rows that differ from the
    // journal's: only a replay from scratch brings back the digest.
    let projections = keel_projections::Projections::open(&lib_dir.join("projections.sqlite"))
        .expect("opens the projection");
    projections
        .connection()
        .execute_batch("UPDATE entry SET name = 'stale'; PRAGMA user_version = 1;")
        .expect("marks it as schema 1");
    drop(projections);
    let lib = Library::open(&home, "lib", PASSWORD).expect("reopens");
    assert_eq!(
        lib.digest().expect("digest"),
        digest,
        "the projection was replayed from the journal"
    );
    assert_eq!(lib.status().expect("status").counts.entries, 20);
}

#[test]
fn verify_finds_content_counts_that_differ_from_their_entries_and_rebuild_mends_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (home, digest) = closed_library_of_20_files(dir.path());
    let lib_dir = home.library_dir("lib");
    let lib = Library::open(&home, "lib", PASSWORD).expect("opens");
    let (_, outcome) = lib.verify().expect("verifies");
    assert_eq!(outcome.expect("sound"), digest);
    lib.close().expect("closes");

    let projections = keel_projections::Projections::open(&lib_dir.join("projections.sqlite"))
        .expect("opens the projection");
    projections
        .connection()
        .execute_batch("UPDATE content_identity SET _entries = _entries + 1 WHERE rowid <= 2")
        .expect("miscounts two contents");
    assert_eq!(
        projections
            .query()
            .miscounted_contents()
            .expect("recounts")
            .len(),
        2
    );
    drop(projections);

    let lib = Library::open(&home, "lib", PASSWORD).expect("reopens");
    let (_, outcome) = lib.verify().expect("verifies");
    assert!(
        matches!(outcome, Err(EngineError::Miscounted { contents: 2 })),
        "{outcome:?}"
    );
    lib.rebuild(&mut |_, _| {}).expect("rebuilds");
    let (_, outcome) = lib.verify().expect("verifies");
    assert_eq!(outcome.expect("sound again"), digest);
}

/// The log length of the closed library `lib` in `home`.
fn log_len(home: &Home) -> u64 {
    let lib = Library::open(home, "lib", PASSWORD).expect("opens");
    let len = lib.status().expect("status").journal.log_len;
    lib.close().expect("closes");
    len
}

/// Applies one more tag to the closed library's projection at log position `at` (past the
/// journal's end), marked as applied ahead of the journal from `ahead_from` if given: what a
/// follower leaves when it stops while its journal commits a segment already applied.
fn apply_past_the_journal(lib_dir: &std::path::Path, at: u64, ahead_from: Option<u64>) {
    let mut projections =
        keel_projections::Projections::open(&lib_dir.join("projections.sqlite")).expect("opens");
    let tag = Tag {
        uuid: Uuid::now_v7(),
        name: "not in the journal".into(),
        color: None,
        created_ms: 0,
    };
    let hlc = Hlc {
        physical_ms: 1,
        counter: 0,
        device: keel_schema::DeviceId([9; 32]),
    };
    let change = Change::upsert(ChangeId::new(), hlc, &tag).expect("change");
    let mut position = projections.applied_position().expect("position");
    position.log = keel_schema::Lsn(at);
    if let Some(from) = ahead_from {
        projections.mark_ahead_from(keel_schema::Lsn(from));
    }
    projections
        .apply(&[change], Some(position))
        .expect("applies");
}

#[test]
fn projections_ahead_by_a_segment_the_journal_was_storing_are_rebuilt_on_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (home, digest) = closed_library_of_20_files(dir.path());
    let lib_dir = home.library_dir("lib");
    let last = log_len(&home);
    apply_past_the_journal(&lib_dir, last + 1, Some(last + 1));

    let lib = Library::open(&home, "lib", PASSWORD).expect("reopens");
    assert_eq!(
        lib.digest().expect("digest"),
        digest,
        "the projection was rebuilt from the journal"
    );
    assert_eq!(lib.status().expect("status").applied_lsn, last);
}

#[test]
fn projections_ahead_of_a_journal_that_lost_more_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (home, _) = closed_library_of_20_files(dir.path());
    let lib_dir = home.library_dir("lib");
    let last = log_len(&home);
    // Not marked: the journal is an older copy, or was damaged.
    apply_past_the_journal(&lib_dir, last + 1, None);
    let refused = Library::open(&home, "lib", PASSWORD).map(|_| ());
    assert!(
        matches!(
            refused,
            Err(keel_engine::EngineError::ProjectionAhead { applied, journal_last })
                if applied == last + 1 && journal_last == last
        ),
        "{refused:?}"
    );
    // Marked, but the journal ends before the segment under way began: more than that
    // segment is missing.
    apply_past_the_journal(&lib_dir, last + 3, Some(last + 2));
    let refused = Library::open(&home, "lib", PASSWORD).map(|_| ());
    assert!(
        matches!(
            refused,
            Err(keel_engine::EngineError::ProjectionAhead { .. })
        ),
        "{refused:?}"
    );
}

/// The ids of the `count` log entries from position `first` (what a truncation there drops).
fn ids_from(journal: &keel_journal::Journal, first: u64, count: usize) -> Vec<ChangeId> {
    journal
        .log()
        .entries(keel_schema::Lsn(first), count)
        .expect("reads the tail")
        .iter()
        .filter_map(|(_, _, sealed)| keel_journal::Sealer::peek_change_id(sealed))
        .collect()
}

/// Found by the simulator (issue 29): a follower's log truncated below what its projections
/// applied, dropping only other devices' entries (their makers send them again), opened once
/// replays from the truncation point but left the projections' stored position past the log's
/// end; the next open refused the library as `ProjectionAhead`.
#[test]
fn a_log_truncated_below_what_the_projections_applied_opens_every_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (home, _) = closed_library_of_20_files(dir.path());
    let last = log_len(&home);
    let keep = last - 3;
    let (journal, _) = keel_tests::journal_of(&home, "lib");
    let dropped = ids_from(&journal, keep + 1, 3);
    assert_eq!(dropped.len(), 3);
    let returned = journal
        .log()
        .truncate_after(keel_schema::Lsn(keep), &dropped)
        .expect("truncates");
    assert!(returned.is_empty(), "{returned:?}");
    journal.close();

    for open in 1..=2 {
        let lib = Library::open(&home, "lib", PASSWORD)
            .unwrap_or_else(|e| panic!("open {open} refused the library: {e}"));
        assert_eq!(lib.status().expect("status").applied_lsn, keep);
        lib.close().expect("closes");
    }
}

/// Found by the simulator (issue 29): a truncation drops other devices' changes from the log,
/// and their makers send them again; but a follower's projections had applied them, and when
/// a maker never does (gone, or a paired device that forged them), they stayed in the
/// projections for good: the device differed from a replay of its own log, and from the others.
#[test]
fn changes_a_truncation_dropped_leave_the_projections() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (home, _) = closed_library_of_20_files(dir.path());
    let last = log_len(&home);
    let (journal, _) = keel_tests::journal_of(&home, "lib");
    let dropped = ids_from(&journal, last, 1);
    journal
        .log()
        .truncate_after(keel_schema::Lsn(last - 1), &dropped)
        .expect("truncates");
    journal.close();

    let lib = Library::open(&home, "lib", PASSWORD).expect("opens");
    let (_, outcome) = lib.verify().expect("verifies");
    assert!(
        outcome.is_ok(),
        "the projections differ from a replay of the log: {outcome:?}"
    );
}

/// A compaction copies the projections at the position they applied, which may be past its
/// `upto` (what every device acknowledged). Put in place there, the snapshot would keep the
/// changes a later truncation between the two drops, for good (the hazard of decision 0073's
/// last section; the fix is decision 0081): the copy waits until a compaction's `upto` reaches
/// it, and is thrown away if a truncation came first.
#[test]
fn a_truncation_past_a_compaction_base_leaves_no_change_in_the_snapshot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (home, _) = closed_library_of_20_files(&dir.path().join("a"));
    let last = log_len(&home);
    // The same library, never compacted: what the log gives once truncated.
    let twin = dir.path().join("twin");
    copy_dir(home.root(), &twin);
    let twin = Home::new(&twin);
    let (journal, _) = keel_tests::journal_of(&twin, "lib");
    let dropped = ids_from(&journal, last, 1);
    assert_eq!(dropped.len(), 1);
    journal
        .log()
        .truncate_after(keel_schema::Lsn(last - 1), &dropped)
        .expect("truncates");
    journal.close();
    let expected = Library::open(&twin, "lib", PASSWORD).expect("opens");
    let expected_digest = expected.digest().expect("digest");
    expected.close().expect("closes");

    let lib = std::sync::Arc::new(Library::open(&home, "lib", PASSWORD).expect("opens"));
    let report = lib.compact(keel_schema::Lsn(last - 3)).expect("compacts");
    assert_eq!((report.base, report.dropped), (0, 0), "{report:?}");
    assert_eq!(
        report.waiting_at,
        Some(last),
        "the copy waits at its position"
    );
    let link = lib
        .link(keel_engine::LinkOptions {
            leader_commits: false,
        })
        .expect("links");
    let journal = link.journal().expect("journal");
    journal
        .log()
        .truncate_after(keel_schema::Lsn(last - 1), &dropped)
        .expect("truncates");
    let report = lib.compact(keel_schema::Lsn(last - 1)).expect("compacts");
    assert_eq!(
        (report.base, report.dropped, report.waiting_at),
        (0, 0, None),
        "neither the waiting copy nor stale projections make a snapshot"
    );
    assert!(lib.rebuild_if_stale().expect("rebuilds"));
    let report = lib.compact(keel_schema::Lsn(last - 1)).expect("compacts");
    assert_eq!((report.base, report.waiting_at), (last - 1, None));
    assert!(report.dropped > 0);
    assert_eq!(lib.digest().expect("digest"), expected_digest);
    // A replay from the snapshot gives the same.
    let (_, verified) = lib.verify().expect("verifies");
    assert!(verified.is_ok(), "{verified:?}");
    drop(link);
}

/// Copies the folder `from` to `to`, recursively.
fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("reads").flatten() {
        let path = entry.path();
        if path.is_dir() {
            copy_dir(&path, &to.join(entry.file_name()));
        } else {
            std::fs::copy(&path, to.join(entry.file_name())).expect("copies");
        }
    }
}

/// The same while the library runs (a node's truncation): `rebuild_if_stale` rebuilds it
/// aside, and the projections equal a replay again.
#[test]
fn a_running_library_rebuilds_without_the_changes_a_truncation_dropped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (home, _) = closed_library_of_20_files(dir.path());
    let last = log_len(&home);
    let lib = std::sync::Arc::new(Library::open(&home, "lib", PASSWORD).expect("opens"));
    assert!(lib.rebuild_if_stale().expect("nothing to rebuild"));
    let link = lib
        .link(keel_engine::LinkOptions {
            leader_commits: false,
        })
        .expect("links");
    let journal = link.journal().expect("journal");
    let dropped = ids_from(journal, last - 1, 2);
    journal
        .log()
        .truncate_after(keel_schema::Lsn(last - 2), &dropped)
        .expect("truncates");
    assert_eq!(journal.projections_stale().expect("reads"), 1);
    let (_, before) = lib.verify().expect("verifies");
    assert!(
        before.is_err(),
        "the projections still hold the dropped changes"
    );

    assert!(lib.rebuild_if_stale().expect("rebuilds"));
    assert_eq!(journal.projections_stale().expect("reads"), 0);
    let (_, after) = lib.verify().expect("verifies");
    assert!(after.is_ok(), "{after:?}");
}

/// Issue 24: a library's folder is its owner's alone from `init` (and `join`) on: the folder
/// 0700, `library.toml` (the wrapped key), the journal and the projections 0600.
#[cfg(unix)]
#[test]
fn a_new_library_is_private_to_its_owner() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let (home, lib) = create_library(dir.path(), "lib").expect("creates");
    lib.close().expect("close");
    let folder = home.library_dir("lib");
    let mode =
        |p: &std::path::Path| std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777;
    assert_eq!(mode(&folder), 0o700, "the library folder");
    for file in ["library.toml", "journal.redb", "projections.sqlite"] {
        assert_eq!(mode(&folder.join(file)), 0o600, "{file}");
    }
}

/// Issue 24: an empty password protects nothing: refused when creating and when changing.
#[test]
fn an_empty_password_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = Home::new(dir.path().join("home"));
    let options = keel_engine::CreateOptions {
        kdf: keel_engine::KdfParams::INSECURE_FAST,
    };
    assert!(matches!(
        Library::create(&home, "lib", "", options),
        Err(EngineError::EmptyPassword)
    ));
    let (home, lib) = create_library(dir.path(), "lib").expect("creates");
    lib.close().expect("close");
    assert!(matches!(
        Library::change_password(
            &home,
            "lib",
            PASSWORD,
            "",
            keel_engine::KdfParams::INSECURE_FAST
        ),
        Err(EngineError::EmptyPassword)
    ));
}

/// Issue 24: changing the password of a library made with the test-only key derivation moves it
/// to the parameters asked for (the CLI asks for the recommended ones).
#[test]
fn a_password_change_moves_the_key_to_the_kdf_asked_for() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (home, lib) = create_library(dir.path(), "lib").expect("creates");
    lib.close().expect("close");
    let recommended = keel_engine::KdfParams::RECOMMENDED;
    Library::change_password(&home, "lib", PASSWORD, "a real one", recommended).expect("changes");
    let config = keel_engine::LibraryConfig::read(&home.library_dir("lib")).expect("reads");
    assert_eq!(config.key.kdf, recommended);
}

/// A host app's own model, not registered with the library.
#[derive(Clone, Debug, PartialEq, Eq, keel_schema::Syncable)]
#[syncable(model = "host_note", code = 40, domain = "content", priority = 60)]
struct HostNote {
    #[syncable(uuid)]
    uuid: Uuid,
    text: String,
}

/// Issue 25: a model the library does not know was journaled and replicated under code 255,
/// ignored by the applier, and failed every later decode. `Tx` now refuses it with a typed
/// error and nothing of the transaction is journaled.
#[test]
fn a_model_the_library_does_not_know_is_refused_and_never_journaled() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_home, lib) = create_library(dir.path(), "host").expect("creates");
    let before = lib.sync_state().changes().expect("changes").len();
    let note = HostNote {
        uuid: Uuid::new_v4(),
        text: "hello".into(),
    };
    let tag = keel_tests::tag("alongside");
    let refused = lib.transact(|tx| {
        tx.upsert(&tag);
        tx.upsert(&note);
        Ok(())
    });
    match refused {
        Err(EngineError::Schema(keel_schema::SchemaError::UnknownModel(name))) => {
            assert!(name.contains("host_note"), "{name}");
        }
        other => panic!("expected an unknown-model error, got {other:?}"),
    }
    let refused = lib.transact(|tx| {
        tx.update::<HostNote>(
            note.uuid,
            vec![("text", keel_schema::Value::Text("x".into()))],
        )?;
        tx.delete::<HostNote>(note.uuid);
        Ok(())
    });
    assert!(
        matches!(
            refused,
            Err(EngineError::Schema(keel_schema::SchemaError::UnknownModel(
                _
            )))
        ),
        "{refused:?}"
    );
    // Nothing of either transaction was journaled, and the journal still reads whole.
    let changes = lib.sync_state().changes().expect("changes");
    assert_eq!(changes.len(), before);
    assert!(changes.iter().all(|c| c.model != u8::MAX));
    assert_eq!(lib.get::<Tag>(tag.uuid).expect("reads"), None);
}

/// Issue 25: models, events, statuses and query results reach a web view as they are (serde);
/// a device id is hex in JSON and stays 32 raw bytes on the wire.
#[test]
fn models_events_and_statuses_serialize_for_a_web_view() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_home, lib) = create_library(dir.path(), "view").expect("creates");
    let mut events = lib.subscribe();
    let tag = keel_tests::tag("json");
    commit_tag(&lib, &tag);
    lib.flush().expect("flushes");
    let json = serde_json::to_value(&tag).expect("a model serializes");
    assert_eq!(json["name"], "json");
    let back: Tag = serde_json::from_value(json).expect("and deserializes");
    assert_eq!(back, tag);
    let device = lib.devices().expect("devices").pop().expect("this device");
    assert_eq!(
        serde_json::to_value(&device).expect("serializes")["device_id"],
        lib.device_id().to_hex()
    );
    let event = events.try_recv().expect("an event");
    let json = serde_json::to_value(&event).expect("an event serializes");
    assert!(json["type"].is_string(), "{json}");
    let status = serde_json::to_value(lib.status().expect("status")).expect("serializes");
    assert!(status["counts"]["tags"].as_u64() >= Some(1), "{status}");
    // A device id: hex in JSON, both ways; 32 raw bytes in MessagePack (the wire's form).
    let id = lib.device_id();
    let json = serde_json::to_string(&id).expect("serializes");
    assert_eq!(json, format!("\"{}\"", id.to_hex()));
    assert_eq!(
        serde_json::from_str::<keel_schema::DeviceId>(&json).expect("parses"),
        id
    );
    let mut packed = Vec::new();
    serde::Serialize::serialize(&id, &mut rmp_serde::Serializer::new(&mut packed)).expect("packs");
    assert_eq!(packed.len(), 2 + 32, "bin8 header and 32 bytes");
}

/// Reads the whole feed from `from`, `limit` at a time: the changes in order and where it ended.
fn read_feed(
    lib: &Library,
    from: keel_engine::FeedPosition,
    limit: usize,
) -> (Vec<Change>, keel_engine::FeedPosition) {
    let mut at = from;
    let mut all = Vec::new();
    loop {
        let feed = lib
            .sync_state()
            .changes_since(at, limit)
            .expect("reads the feed");
        assert!(feed.changes.len() <= limit);
        all.extend(feed.changes);
        at = feed.next;
        if !feed.more {
            return (all, at);
        }
    }
}

/// Issue 25: after the event bus lagged, a host catches up from the change feed: every change
/// applied after its position, in order, none missed and none twice, and the position to go on.
#[test]
fn the_change_feed_catches_a_lagging_host_up_with_nothing_missed_or_twice() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_home, lib) = create_library(dir.path(), "feed").expect("creates");
    let mut events = lib.subscribe();
    let (before, at) = read_feed(&lib, keel_engine::FeedPosition::default(), 7);
    // More commits than the bus holds, each applied on its own (one event each; the applier
    // would otherwise take several queued commits in one apply, with one event): the host lags.
    for i in 0..(keel_engine::EVENT_BUS_CAPACITY + 100) {
        lib.transact(|tx| {
            tx.upsert(&keel_tests::tag(&format!("feed {i}")));
            Ok(())
        })
        .expect("commits");
        lib.flush().expect("flushes");
    }
    lib.flush().expect("flushes");
    let mut lagged = false;
    loop {
        match events.try_recv() {
            Ok(_) => {}
            Err(tokio::sync::broadcast::error::TryRecvError::Lagged(_)) => lagged = true,
            Err(_) => break,
        }
    }
    assert!(lagged, "the host's receiver lagged");
    let (after, end) = read_feed(&lib, at, 500);
    let tag_code = keel_schema::code_of::<Tag>();
    let tags: Vec<&Change> = after.iter().filter(|c| c.model == tag_code).collect();
    assert_eq!(
        tags.len(),
        keel_engine::EVENT_BUS_CAPACITY + 100,
        "every tag once"
    );
    let ids: std::collections::HashSet<ChangeId> =
        before.iter().chain(&after).map(|c| c.id).collect();
    assert_eq!(ids.len(), before.len() + after.len(), "nothing twice");
    assert_eq!(
        ids.len(),
        lib.sync_state().changes().expect("journal").len(),
        "nothing missed"
    );
    // In commit order, and nothing more past the end.
    assert!(after.windows(2).all(|w| w[0].hlc < w[1].hlc));
    let (none, again) = read_feed(&lib, end, 500);
    assert!(none.is_empty());
    assert_eq!(again, end);
}

/// Issue 25: a host keeps the library's keys in its own keychain and opens the library with
/// them, no password and no key derivation; keys rotated since it saved them come from the
/// chain; keys of another library, or garbage, are refused before anything is read.
#[test]
fn a_host_opens_the_library_with_keys_from_its_keychain() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (home, lib) = create_library(dir.path(), "keychain").expect("creates");
    let first = keel_tests::tag("before the rotation");
    commit_tag(&lib, &first);
    let saved = lib.export_keys();
    lib.rotate_key().expect("rotates");
    let second = keel_tests::tag("after the rotation");
    commit_tag(&lib, &second);
    lib.close().expect("closes");
    // The keys saved before the rotation still open it, and read what came after.
    let lib = Library::open_with_library_key(&home, "keychain", &saved).expect("opens with keys");
    assert_eq!(
        lib.get::<Tag>(first.uuid).expect("reads"),
        Some(first.clone())
    );
    assert_eq!(
        lib.get::<Tag>(second.uuid).expect("reads"),
        Some(second.clone())
    );
    lib.close().expect("closes");
    // Another library's keys, a random key and garbage are refused.
    let (_other_home, other) = create_library(&dir.path().join("other"), "other").expect("creates");
    let foreign = other.export_keys();
    other.close().expect("closes");
    for keys in [foreign, vec![7u8; 32], vec![1, 2, 3]] {
        match Library::open_with_library_key(&home, "keychain", &keys) {
            Err(EngineError::WrongKey) => {}
            other => panic!("expected WrongKey, got {other:?}"),
        }
    }
    // A library from before key checks: refused until it opens once with its password.
    let toml = home.library_dir("keychain").join("library.toml");
    let text = std::fs::read_to_string(&toml).expect("reads");
    let without: String = text
        .lines()
        .filter(|l| !l.starts_with("check"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_ne!(without, text, "library.toml had a check");
    std::fs::write(&toml, without).expect("writes");
    assert!(matches!(
        Library::open_with_library_key(&home, "keychain", &saved),
        Err(EngineError::WrongKey)
    ));
    Library::open(&home, "keychain", PASSWORD)
        .expect("opens with the password")
        .close()
        .expect("closes");
    Library::open_with_library_key(&home, "keychain", &saved)
        .expect("the check is back")
        .close()
        .expect("closes");
}

/// Commits `tag` alone.
fn commit_tag(lib: &Library, tag: &Tag) {
    lib.transact(|tx| {
        tx.upsert(tag);
        Ok(())
    })
    .expect("commits");
}

/// Issue 25: typed writes: `#[derive(Syncable)]` makes `TagUpdate` with a setter per field
/// (a misspelt one does not compile: `schema/tests/ui/misspelt_field_update.rs`).
#[test]
fn a_typed_update_writes_the_fields_it_sets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_home, lib) = create_library(dir.path(), "typed").expect("creates");
    let tag = keel_tests::tag("before");
    commit_tag(&lib, &tag);
    lib.transact(|tx| {
        tx.set(
            keel_engine::TagUpdate::new(tag.uuid)
                .name("after".into())
                .color(Some("#00ff00".into())),
        )
    })
    .expect("commits");
    lib.flush().expect("flushes");
    let got = lib.get::<Tag>(tag.uuid).expect("reads").expect("there");
    assert_eq!(got.name, "after");
    assert_eq!(got.color.as_deref(), Some("#00ff00"));
    assert_eq!(got.created_ms, tag.created_ms, "fields not set are kept");
    // A host model the library does not know is refused through the typed path too.
    let refused = lib.transact(|tx| tx.set(HostNoteUpdate::new(Uuid::new_v4()).text("x".into())));
    assert!(matches!(
        refused,
        Err(EngineError::Schema(keel_schema::SchemaError::UnknownModel(
            _
        )))
    ));
}

/// Issue 25: typed queries: filters on location, path prefix, tag, content kind, size and time,
/// an order, and pages by key that together give every entry once.
#[test]
fn typed_entry_queries_filter_order_and_page_by_key() {
    use keel_engine::{EntryFilter, EntryOrder};
    let dir = tempfile::tempdir().expect("tempdir");
    let (_home, lib) = create_library(dir.path(), "query").expect("creates");
    let tree = dir.path().join("tree");
    for folder in ["photos", "docs"] {
        std::fs::create_dir_all(tree.join(folder)).expect("mkdir");
        for i in 0..7 {
            let body = "x".repeat(i + 1);
            std::fs::write(tree.join(folder).join(format!("{folder}{i}.txt")), body)
                .expect("writes");
        }
    }
    lib.index(&tree, &mut |_| {}).expect("indexes");
    lib.files()
        .tag(&tree.join("docs/docs3.txt"), &["keep".into()], Scope::Entry)
        .expect("tags");
    lib.flush().expect("flushes");
    let query = |filter: &EntryFilter| lib.read(|p| p.query().entries(filter)).expect("queries");
    let files = |filter: EntryFilter| -> Vec<String> {
        query(&filter)
            .entries
            .into_iter()
            .filter(|e| e.name.ends_with(".txt"))
            .map(|e| e.name)
            .collect()
    };
    // Pages of 4 by size: every entry once, in (size, uuid) order.
    let mut paged = Vec::new();
    let mut filter = EntryFilter {
        order: EntryOrder::Size,
        limit: 4,
        ..EntryFilter::default()
    };
    loop {
        let page = query(&filter);
        assert!(page.entries.len() <= 4);
        paged.extend(page.entries);
        match page.next {
            Some(next) => filter.after = Some(next),
            None => break,
        }
    }
    let all = lib
        .read(|p| p.query().select::<Entry, _>("1 = 1", []))
        .expect("reads");
    assert_eq!(paged.len(), all.len(), "every entry once");
    let keys: Vec<(i64, Option<Uuid>)> = paged.iter().map(|e| (e.size, e.uuid)).collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted, "in order");
    // Filters.
    let photos = files(EntryFilter {
        path_prefix: Some("photos".into()),
        ..EntryFilter::default()
    });
    assert_eq!(photos.len(), 7);
    assert!(photos.iter().all(|n| n.starts_with("photos")));
    let mid = files(EntryFilter {
        size_min: Some(3),
        size_max: Some(4),
        ..EntryFilter::default()
    });
    assert_eq!(mid.len(), 4, "{mid:?}");
    assert_eq!(
        files(EntryFilter {
            tag: Some(keel_schema::tag_uuid(lib.id().0, "keep")),
            ..EntryFilter::default()
        }),
        vec!["docs3.txt".to_string()]
    );
    let kind = all
        .iter()
        .find_map(|e| e.content)
        .and_then(|c| lib.read(|p| p.query().content_identity(c)).ok().flatten())
        .expect("a content")
        .kind;
    assert_eq!(
        files(EntryFilter {
            content_kind: Some(kind),
            ..EntryFilter::default()
        })
        .len(),
        14
    );
    let location = all[0].location;
    assert_eq!(
        files(EntryFilter {
            location: Some(location),
            modified_until: Some(0),
            ..EntryFilter::default()
        }),
        Vec::<String>::new()
    );
}

/// Issue 26: `index` on a folder inside a location re-indexes that part of it, instead of
/// making a second, nested location; the rest of the location is left as it is.
#[test]
fn indexing_a_folder_inside_a_location_reindexes_that_part() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(tree.join("sub/deeper")).expect("tree");
    std::fs::write(tree.join("top.txt"), b"top").expect("file");
    std::fs::write(tree.join("sub/x.txt"), b"x").expect("file");
    let tree = tree.canonicalize().expect("canonical");
    let (_home, lib) = create_library(dir.path(), "lib").expect("creates");
    lib.index(&tree, &mut |_| {}).expect("indexes");
    let x = lib.files().entry(&tree.join("sub/x.txt")).expect("indexed");
    std::fs::remove_file(tree.join("top.txt")).expect("removes");
    std::fs::write(tree.join("sub/deeper/y.txt"), b"y").expect("file");
    std::fs::write(tree.join("sub/x.txt"), b"x, edited").expect("file");
    let report = lib.index(&tree.join("sub"), &mut |_| {}).expect("indexes");
    assert_eq!(
        (report.new, report.changed, report.removed),
        (1, 1, 0),
        "{report:?}"
    );
    assert_eq!(lib.read(|p| p.query().locations()).expect("reads").len(), 1);
    assert!(lib.files().entry(&tree.join("sub/deeper/y.txt")).is_ok());
    assert_eq!(
        lib.files()
            .entry(&tree.join("sub/x.txt"))
            .expect("kept")
            .uuid,
        x.uuid
    );
    assert!(
        lib.files().entry(&tree.join("top.txt")).is_ok(),
        "outside the folder, nothing was looked at"
    );
}

/// Issue 28: `status` tells what the library takes on disk, by part: the journal, the
/// projections (with their write-ahead log) and the rest of the folder's files.
#[test]
fn status_tells_the_disk_bytes_by_part() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_home, lib) = create_library(dir.path(), "lib").expect("creates");
    lib.transact(|tx| {
        for i in 0..1_000 {
            tx.upsert(&keel_tests::tag(&format!("t{i}")));
        }
        Ok(())
    })
    .expect("commits");
    let disk = lib.status().expect("status").disk;
    assert!(
        disk.journal > 0 && disk.projections > 0 && disk.other > 0,
        "{disk:?}"
    );
    // The journal and the rest are still once the status is read; a WAL checkpoint may run
    // on the projections meanwhile.
    let size = |name: &str| {
        std::fs::metadata(lib.dir().join(name))
            .expect("a file")
            .len()
    };
    assert_eq!(disk.journal, size(keel_engine::JOURNAL_FILE));
    let other: u64 = std::fs::read_dir(lib.dir())
        .expect("lists")
        .filter_map(|e| e.ok())
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name != keel_engine::JOURNAL_FILE && !name.starts_with(keel_engine::PROJECTIONS_FILE)
        })
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum();
    assert_eq!(disk.other, other, "{disk:?}");
    assert!(
        disk.projections >= size(keel_engine::PROJECTIONS_FILE) / 2,
        "{disk:?}"
    );
}
