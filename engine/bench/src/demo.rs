//! `keel demo`: one device end to end on real files, a real redb journal and real SQLite
//! projections in a temporary home; then three devices syncing over QUIC on 127.0.0.1
//! (`demo_devices.rs`).

use std::time::Instant;

use crate::workload::write_tree;
use anyhow::{ensure, Result};
use keel_engine::{CreateOptions, Home, Library, Scope};

/// The demo libraries' password.
pub(crate) const PASSWORD: &str = "demo password";

pub(crate) fn step(n: &mut u32, text: &str) {
    *n += 1;
    println!("[{n}] {text}");
}

/// Runs the demo; exits non-zero if any digest differs.
pub(crate) fn run(options: &crate::DemoOptions) -> Result<i32> {
    let started = Instant::now();
    let dir = tempfile::tempdir()?;
    let home = Home::new(dir.path().join("a"));
    let tree = dir.path().join("photos");
    let mut n = 0;
    let file_count = options.files.max(40);

    step(
        &mut n,
        &format!("generating {file_count} files under {}", tree.display()),
    );
    let bytes = write_tree(&tree, file_count, 2026)?;
    println!("    {file_count} files, {:.1} MB", bytes as f64 / 1e6);

    step(
        &mut n,
        "creating library 'demo' (Argon2id key wrap, sealed journal)",
    );
    let t = Instant::now();
    let lib = Library::create(&home, "demo", PASSWORD, CreateOptions::default())?;
    println!(
        "    library {} on device {} in {:.0} ms",
        lib.id(),
        lib.device_id(),
        t.elapsed().as_secs_f64() * 1e3
    );

    step(&mut n, "indexing");
    let report = lib.index(&tree, &mut |_| {})?;
    println!(
        "    {} files, {} dirs, {} entries new, {:.0} files/s",
        report.files,
        report.dirs,
        report.new,
        report.files as f64 / report.elapsed.as_secs_f64()
    );

    step(
        &mut n,
        "tagging 20 files by content and annotating 5 entries",
    );
    let t = Instant::now();
    let files: Vec<_> = walkdir::WalkDir::new(&tree)
        .sort_by_file_name()
        .into_iter()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_file())
        .map(|e| e.into_path())
        .collect();
    for (i, path) in files.iter().step_by(files.len() / 20).take(20).enumerate() {
        let tags = vec![format!("album-{}", i % 3), "demo".to_string()];
        lib.files().tag(path, &tags, Scope::Content)?;
    }
    for path in files.iter().skip(7).step_by(files.len() / 5).take(5) {
        lib.files()
            .note(path, "checked on this device", Scope::Entry)?;
    }
    println!("    in {:.0} ms", t.elapsed().as_secs_f64() * 1e3);

    step(
        &mut n,
        "changing one file, removing one, moving one; re-indexing",
    );
    let changed = &files[1];
    let removed = &files[2];
    let moved = &files[7];
    std::fs::write(changed, b"new bytes for this file")?;
    std::fs::remove_file(removed)?;
    let moved_to = tree.join("moved.txt");
    std::fs::rename(moved, &moved_to)?;
    let report = lib.index(&tree, &mut |_| {})?;
    println!(
        "    {} changed, {} moved, {} removed, {} unchanged in {:.0} ms",
        report.changed,
        report.moved,
        report.removed,
        report.unchanged,
        report.elapsed.as_secs_f64() * 1e3
    );
    ensure!(
        report.changed == 1 && report.moved == 1 && report.removed == 1,
        "re-index missed a change"
    );
    let moved_entry = lib.files().entry(&moved_to)?;
    let note = lib
        .files()
        .metadata(&moved_entry)?
        .entry
        .and_then(|(m, _)| m.notes);
    ensure!(note.is_some(), "the moved entry lost its entry-scoped note");
    println!("    the moved file kept its entry and its note");

    let status = lib.status()?;
    println!(
        "    {} entries, {} contents, {} tags, {} tag links; journal {} changes",
        status.counts.entries,
        status.counts.content_identities,
        status.counts.tags,
        status.counts.user_metadata_tags,
        status.journal.log_len
    );
    let live = status.digest;

    step(&mut n, "rebuilding the projections from the journal");
    let t = Instant::now();
    let replay = lib.rebuild(&mut |_, _| {})?;
    let rebuilt = lib.digest()?;
    println!(
        "    {} changes replayed in {:.0} ms",
        replay.changes,
        t.elapsed().as_secs_f64() * 1e3
    );

    step(&mut n, "closing and reopening (a restart)");
    lib.close()?;
    let lib = Library::open(&home, "demo", PASSWORD)?;
    let reopened = lib.digest()?;
    lib.close()?;
    println!(
        "    digest live {}, rebuilt {}, reopened {}",
        &live[..16],
        &rebuilt[..16],
        &reopened[..16]
    );
    ensure!(
        live == rebuilt && rebuilt == reopened,
        "one device: digests differ (live {live}, rebuilt {rebuilt}, reopened {reopened})"
    );

    let ok = crate::demo_devices::run(&mut n, dir.path(), &tree, &files)?;
    println!("total {:.2} s", started.elapsed().as_secs_f64());
    if ok {
        println!("OK: all digests are equal");
        Ok(0)
    } else {
        println!("FAILED: digests differ");
        Ok(1)
    }
}
