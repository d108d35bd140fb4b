//! Peak memory of long work stays bounded (issue 29). Measured in a child process, so the
//! figure is the work's alone; `keel bench` reports the same at 1M (`p7_peak_rss_mb` for a
//! replay, `p8_peak_rss_mb` for indexing, `p4_backfill_peak_rss_mb` for a backfill).

use std::process::Command;

use keel_tests::create_library;

/// Changes replayed.
const REPLAY_CHANGES: usize = 100_000;
/// Most resident memory the replay of [`REPLAY_CHANGES`] may take, in MiB. Measured (debug
/// build): 37 MiB at 20k changes, 128 at 100k, 186 at 200k; P7 replays 1M in about 200 MB
/// (release): the caches (SQLite's pages, redb's, the log index) fill and stop growing.
/// A replay that kept what it read would pass the bound well before 200k.
const REPLAY_BOUND_MB: u64 = 180;

#[test]
fn a_replay_of_100k_changes_stays_under_its_memory_bound() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (home, lib) = create_library(dir.path(), "lib").expect("creates");
    for chunk in 0..REPLAY_CHANGES / 10_000 {
        lib.transact(|tx| {
            for i in 0..10_000 {
                tx.upsert(&keel_tests::tag(&format!("replayed {chunk} {i}")));
            }
            Ok(())
        })
        .expect("commits");
    }
    lib.close().expect("closes");
    let out = Command::new(env!("CARGO_BIN_EXE_crash_child"))
        .arg(home.root())
        .arg("lib")
        .arg("rebuild")
        .output()
        .expect("the child runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let keel_tests::ChildReport {
        done,
        total,
        peak_mib,
    } = keel_tests::ChildReport::from_stdout(&out.stdout);
    assert!(
        done == total && total >= REPLAY_CHANGES,
        "replayed {done} of {total}"
    );
    eprintln!(
        "replay of {REPLAY_CHANGES} changes: peak RSS {} MiB (bound {REPLAY_BOUND_MB})",
        peak_mib
    );
    assert!(
        peak_mib <= REPLAY_BOUND_MB,
        "the replay of {REPLAY_CHANGES} changes peaked at {} MiB, over {REPLAY_BOUND_MB}",
        peak_mib
    );
}

/// Files indexed: 100k in the full tier (`KEEL_FULL=1`), 5k by default (making the files is
/// the slow part: 12–15 s for 20k to 100k here, the indexing itself 0.8 s for 20k and 3 s for
/// 100k in a debug build).
fn index_files() -> usize {
    if keel_tests::full_tier() {
        100_000
    } else {
        5_000
    }
}

/// Most resident memory indexing [`index_files`] files may take, in MiB. Measured (debug
/// build): 51–56 MiB for 20k files, 123 for 100k. P8 indexes 1M files (release) and reports
/// `p8_peak_rss_mb`.
const INDEX_BOUND_MB: u64 = 200;

#[test]
fn indexing_files_stays_under_its_memory_bound() {
    let files = index_files();
    let dir = tempfile::tempdir().expect("tempdir");
    let tree = dir.path().join("tree");
    for folder in 0..files.div_ceil(1_000) {
        let sub = tree.join(format!("d{folder}"));
        std::fs::create_dir_all(&sub).expect("a folder");
        for i in 0..1_000.min(files - folder * 1_000) {
            std::fs::write(sub.join(format!("f{i}.txt")), format!("file {folder} {i}"))
                .expect("a file");
        }
    }
    let (home, lib) = create_library(dir.path(), "lib").expect("creates");
    lib.close().expect("closes");
    let started = std::time::Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_crash_child"))
        .arg(home.root())
        .arg("lib")
        .arg("index")
        .arg(&tree)
        .output()
        .expect("the child runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let keel_tests::ChildReport { done, peak_mib, .. } =
        keel_tests::ChildReport::from_stdout(&out.stdout);
    assert!(done >= files, "indexed {done} of {files}");
    eprintln!(
        "indexing {files} files: peak RSS {} MiB (bound {INDEX_BOUND_MB}), {:.1} s",
        peak_mib,
        started.elapsed().as_secs_f64()
    );
    assert!(
        peak_mib <= INDEX_BOUND_MB,
        "indexing {files} files peaked at {} MiB, over {INDEX_BOUND_MB}",
        peak_mib
    );
}
