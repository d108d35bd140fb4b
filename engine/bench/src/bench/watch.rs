//! The location watcher: a file written on one device to its row in the other device's
//! projection (latency), and how fast a burst of new files is absorbed against indexing the
//! same files.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use keel_engine::{Home, Library, Location, WatchOptions};
use keel_node::{Node, NodeOptions};
use serde_json::json;

use super::sync::{fast, follower_of, PASSWORD};
use super::{percentile, Figures};
use crate::workload::write_tree;

/// What the watcher step measures.
pub(crate) struct Options {
    /// Files written one at a time (each a latency sample).
    pub(crate) samples: usize,
    /// Files in the burst.
    pub(crate) burst: usize,
}

/// Longest wait for one file or the burst.
const WAIT: Duration = Duration::from_secs(120);

/// Runs the step: a watching leader and a follower on loopback.
pub(crate) fn run(dir: &Path, options: &Options, out: &mut Figures) -> Result<()> {
    let debounce = WatchOptions::default().debounce;
    let tree = dir.join("watched");
    std::fs::create_dir_all(&tree)?;
    let tree = tree.canonicalize()?;
    let lib = Library::create(&Home::new(dir.join("watch-a")), "bench", PASSWORD, fast())?;
    lib.index(&tree, &mut |_| {})?;
    let location = lib
        .files()
        .location(&tree)?
        .ok_or_else(|| anyhow::anyhow!("no location"))?;
    let a = Node::start(
        lib,
        NodeOptions {
            watch: Some(WatchOptions::default()),
            ..super::sync::node_options(Vec::new())
        },
    )?;
    let b = follower_of(&a, &dir.join("watch-b"))?;
    b.wait_in_sync(WAIT)?;
    let mut latencies = Vec::with_capacity(options.samples);
    for i in 0..options.samples {
        let name = format!("sample-{i}.txt");
        let started = Instant::now();
        std::fs::write(tree.join(&name), format!("sample {i}"))?;
        wait_for(b.library(), &location, "", &name)?;
        latencies.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    latencies.sort_by(f64::total_cmp);
    let burst_dir = dir.join("burst-source");
    write_tree(&burst_dir, options.burst, 11)?;
    let started = Instant::now();
    std::fs::rename(&burst_dir, tree.join("burst"))?;
    let absorbed = wait_for_count(a.library(), &location, options.samples + options.burst)?;
    let burst_secs = started.elapsed().as_secs_f64();
    a.stop()?;
    b.stop()?;
    let index_rate = index_rate(dir, &tree.join("burst"), options.burst)?;
    out.insert("watch_debounce_ms".into(), json!(debounce.as_millis()));
    out.insert("watch_samples".into(), json!(options.samples));
    out.insert(
        "watch_latency_p50_ms".into(),
        json!(percentile(&latencies, 0.5)),
    );
    out.insert(
        "watch_latency_p99_ms".into(),
        json!(percentile(&latencies, 0.99)),
    );
    out.insert("watch_burst_files".into(), json!(absorbed));
    out.insert(
        "watch_burst_files_per_s".into(),
        json!(options.burst as f64 / burst_secs),
    );
    // The debounce is a wait chosen on purpose, not work: the rate of the work after it.
    let working = (burst_secs - debounce.as_secs_f64()).max(f64::EPSILON);
    out.insert(
        "watch_burst_after_debounce_files_per_s".into(),
        json!(options.burst as f64 / working),
    );
    out.insert("watch_index_files_per_s".into(), json!(index_rate));
    Ok(())
}

/// Waits until `lib` has the entry `name` in folder `relative_path` of `location`.
fn wait_for(lib: &Library, location: &Location, relative_path: &str, name: &str) -> Result<()> {
    let deadline = Instant::now() + WAIT;
    loop {
        let found = lib.read(|p| p.query().entry_at(location.uuid, relative_path, name))?;
        if found.is_some() {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "{name} never arrived");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Waits until `lib` has at least `files` file entries in `location`; returns how many. It
/// looks when the library reports a change (a cheap count first), so that waiting does not
/// take CPU from the watcher it measures.
fn wait_for_count(lib: &Library, location: &Location, files: usize) -> Result<usize> {
    let deadline = Instant::now() + WAIT;
    let mut events = lib.subscribe();
    loop {
        if lib.read(|p| p.query().counts())?.entries >= files as u64 {
            let count = lib
                .read(|p| p.query().entries_of_location(location.uuid))?
                .iter()
                .filter(|e| e.content.is_some())
                .count();
            if count >= files {
                return Ok(count);
            }
        }
        ensure!(Instant::now() < deadline, "{files} files never absorbed");
        // Any event (or a lagged bus) is a reason to look again; none for a while, too.
        let until = Instant::now() + Duration::from_millis(100);
        while Instant::now() < until {
            match events.try_recv() {
                Ok(_) | Err(tokio::sync::broadcast::error::TryRecvError::Lagged(_)) => break,
                Err(_) => std::thread::sleep(Duration::from_millis(2)),
            }
        }
    }
}

/// Files per second `keel index` takes the same files at, in a fresh library.
fn index_rate(dir: &Path, files_dir: &Path, files: usize) -> Result<f64> {
    let lib = Library::create(
        &Home::new(dir.join("watch-index")),
        "bench",
        PASSWORD,
        fast(),
    )?;
    let started = Instant::now();
    let report = lib.index(files_dir, &mut |_| {})?;
    let secs = started.elapsed().as_secs_f64();
    ensure!(
        report.files as usize == files,
        "indexed {} of {files}",
        report.files
    );
    lib.close()?;
    Ok(files as f64 / secs)
}
