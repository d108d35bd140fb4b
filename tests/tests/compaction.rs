//! Issue 28: compaction on real redb and SQLite files. The log is dropped up to a position,
//! its state kept as a snapshot; rebuild, verify and a lost projection start from it; a steady
//! rewrite workload stops growing the journal; compacting past what every device has is
//! refused.

use keel_engine::{EngineError, Library, Lsn, Tag};
use keel_tests::{create_library, tag};

fn tags(lib: &Library, names: impl Iterator<Item = String>) -> Vec<Tag> {
    let tags: Vec<Tag> = names.map(|n| tag(&n)).collect();
    lib.transact(|tx| {
        for t in &tags {
            tx.upsert(t);
        }
        Ok(())
    })
    .expect("commits");
    tags
}

fn last(lib: &Library) -> Lsn {
    Lsn(lib.status().expect("status").journal.last_lsn)
}

#[test]
fn a_compacted_library_rebuilds_verifies_and_heals_from_its_snapshot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (home, lib) = create_library(dir.path(), "lib").expect("creates");
    let first = tags(&lib, (0..2_000).map(|i| format!("tag {i}")));
    lib.flush().expect("flushes");
    let before = lib.status().expect("status");
    assert_eq!(before.journal.compacted_to, 0);
    assert_eq!(before.disk.snapshot, 0);

    let report = lib.compact(last(&lib)).expect("compacts");
    let compacted_to = report.base;
    assert_eq!(report.base, before.journal.last_lsn);
    assert!(report.dropped >= 2_000, "{report:?}");
    assert!(report.snapshot_bytes > 0);
    let after = lib.status().expect("status");
    assert_eq!(after.journal.compacted_to, report.base);
    assert_eq!(
        (after.journal.log_len, after.digest.clone()),
        (0, before.digest.clone())
    );
    assert_eq!(after.disk.snapshot, report.snapshot_bytes);

    // Changes after the compaction, one of them to a compacted record.
    tags(&lib, (0..100).map(|i| format!("later {i}")));
    let mut renamed = first[7].clone();
    renamed.name = "renamed after the compaction".into();
    lib.transact(|tx| {
        tx.upsert(&renamed);
        Ok(())
    })
    .expect("commits");
    lib.flush().expect("flushes");
    let digest = lib.digest().expect("digest");

    // A rebuild replays the snapshot and the log after it, to the same digest.
    lib.rebuild(&mut |_, _| {}).expect("rebuilds");
    assert_eq!(lib.digest().expect("digest"), digest);
    let (report, outcome) = lib.verify().expect("verifies");
    assert!(report.faults.is_empty(), "{:?}", report.faults);
    assert_eq!(outcome.expect("projections match"), digest);
    lib.close().expect("closes");

    // A lost projection is healed from the snapshot when the library opens.
    keel_projections_files(&home, "lib").for_each(|f| std::fs::remove_file(f).expect("removes"));
    let lib = Library::open(&home, "lib", keel_tests::PASSWORD).expect("reopens");
    assert_eq!(lib.digest().expect("digest"), digest);
    assert_eq!(lib.sync_state().changes().expect("changes").len(), 101);
    lib.close().expect("closes");

    // Without the snapshot, the library says what is missing instead of a wrong projection.
    let lib_dir = home.library_dir("lib");
    std::fs::remove_file(lib_dir.join(keel_engine::SNAPSHOT_FILE)).expect("removes");
    keel_projections_files(&home, "lib").for_each(|f| std::fs::remove_file(f).expect("removes"));
    match Library::open(&home, "lib", keel_tests::PASSWORD) {
        Err(EngineError::SnapshotMissing { base, .. }) => assert_eq!(base, compacted_to),
        Err(other) => panic!("another error: {other}"),
        Ok(_) => panic!("opened without its snapshot"),
    }
}

/// The projection files of library `name` (the file and its WAL and shared memory).
fn keel_projections_files(
    home: &keel_engine::Home,
    name: &str,
) -> impl Iterator<Item = std::path::PathBuf> {
    std::fs::read_dir(home.library_dir(name))
        .expect("lists")
        .map(|e| e.expect("entry").path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(keel_engine::PROJECTIONS_FILE))
        })
        .collect::<Vec<_>>()
        .into_iter()
}

/// Rewrites every tag of `lib` `rounds` times, compacting after each round when `compact`;
/// returns the journal file's size after each round.
fn rewrite_rounds(lib: &Library, rounds: usize, compact: bool) -> Vec<u64> {
    let mut set = tags(lib, (0..2_000).map(|i| format!("tag {i}")));
    let mut sizes = Vec::new();
    for round in 0..rounds {
        for (i, t) in set.iter_mut().enumerate() {
            t.name = format!("tag {i} round {round}");
        }
        lib.transact(|tx| {
            for t in &set {
                tx.upsert(t);
            }
            Ok(())
        })
        .expect("rewrites");
        lib.flush().expect("flushes");
        if compact {
            lib.compact(last(lib)).expect("compacts");
        }
        sizes.push(lib.status().expect("status").disk.journal);
    }
    sizes
}

#[test]
fn a_steady_rewrite_workload_stops_growing_the_journal() {
    const ROUNDS: usize = 16;
    let dir = tempfile::tempdir().expect("tempdir");
    let (_home, lib) = create_library(dir.path(), "lib").expect("creates");
    let sizes = rewrite_rounds(&lib, ROUNDS, true);
    assert_eq!(lib.status().expect("status").counts.tags, 2_000);
    let (early, late) = sizes.split_at(ROUNDS / 2);
    let early_max = early.iter().copied().max().unwrap_or(0);
    let late_max = late.iter().copied().max().unwrap_or(0);
    // redb reuses the pages a compaction frees: the file moves within a band, it does not grow
    // with the rounds.
    assert!(
        late_max <= early_max + early_max / 2,
        "the journal kept growing: {sizes:?}"
    );
    // The same workload without compaction, for contrast: it grows round after round.
    let (_home, control) = create_library(&dir.path().join("control"), "lib").expect("creates");
    let grown = rewrite_rounds(&control, ROUNDS, false);
    let control_end = grown.last().copied().unwrap_or(0);
    assert!(
        control_end > 3 * late_max,
        "compacted {sizes:?}, not compacted {grown:?}"
    );
}

#[test]
fn compaction_stops_at_what_every_device_acknowledged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_home, lib) = create_library(dir.path(), "lib").expect("creates");
    tags(&lib, (0..10).map(|i| format!("tag {i}")));
    lib.flush().expect("flushes");
    let end = last(&lib);
    let digest = lib.digest().expect("digest");
    // The projections applied `end`; the other devices acknowledged three positions less.
    let report = lib.compact(Lsn(end.0 - 3)).expect("compacts");
    assert_eq!(report.base, end.0 - 3);
    let status = lib.status().expect("status");
    assert_eq!(
        (status.journal.compacted_to, status.journal.log_len),
        (end.0 - 3, 3)
    );
    // The snapshot applied past the base: a rebuild replays those three again, to the same.
    lib.rebuild(&mut |_, _| {}).expect("rebuilds");
    assert_eq!(lib.digest().expect("digest"), digest);
    // At or below the base, nothing happens.
    assert_eq!(lib.compact(Lsn(2)).expect("no-op").dropped, 0);
    assert_eq!(lib.compact(Lsn(end.0 - 3)).expect("no-op").dropped, 0);
    assert!(lib.compact(end).expect("compacts").dropped == 3);
}
