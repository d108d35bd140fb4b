//! The scale run (issue 28; not in the default run, nor in CI): a library of `files` entries
//! generated, replayed whole, compacted, and joined by a new device, each timed, with the
//! peak RSS of the leading process over each step and of the joining process, and the bytes
//! per entry on disk. Run at 1M and 10M entries, the times compare (each within 12× its 1M
//! time is the goal), as the memory bound does (≤ 500 MB throughout).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Result;
use keel_node::Node;
use serde_json::json;

use super::sync::{compact_whole_log, generate_library, node_options};
use super::{peak_rss_mb, reset_peak_rss, settle, Figures};

/// What the scale run measures.
pub(crate) struct Options {
    /// File entries in the library (each an entry and its content: two log entries).
    pub(crate) files: usize,
}

/// Records a step's time and the leading process's peak RSS since the step began.
fn step(out: &mut Figures, leader_peak: &mut f64, name: &str, secs: f64) {
    let rss = peak_rss_mb();
    *leader_peak = leader_peak.max(rss);
    out.insert(format!("scale_{name}_s"), json!(secs));
    out.insert(format!("scale_{name}_peak_rss_mb"), json!(rss));
}

/// Runs the scale run's steps in order on one leader.
pub(crate) fn run(dir: &Path, options: &Options, out: &mut Figures) -> Result<()> {
    let files = options.files;
    let entries = files.max(1) as f64;
    let mut leader_peak: f64 = 0.0;

    reset_peak_rss();
    let t = Instant::now();
    let lib = generate_library(&dir.join("leader"), files)?;
    step(out, &mut leader_peak, "generate", t.elapsed().as_secs_f64());
    settle();

    // Replay: the projections rebuilt from every change of the log.
    reset_peak_rss();
    let t = Instant::now();
    lib.rebuild(&mut |_, _| {})?;
    step(out, &mut leader_peak, "replay", t.elapsed().as_secs_f64());
    let log_len = lib.status()?.journal.last_lsn;
    settle();

    // Compaction, on a node as a running library would be (alone: up to its whole log).
    reset_peak_rss();
    let t = Instant::now();
    let leader = Node::start(lib, node_options(Vec::new()))?;
    compact_whole_log(&leader, Duration::from_secs(600))?;
    step(out, &mut leader_peak, "compact", t.elapsed().as_secs_f64());
    let disk = leader.library().status()?.disk;
    out.insert(
        "scale_leader_disk_bytes_per_entry".into(),
        json!((disk.journal + disk.projections + disk.snapshot) as f64 / entries),
    );
    settle();

    // A new device joins from the compacted log, in its own process.
    reset_peak_rss();
    let joined = super::p4::join_once(
        &leader,
        &dir.join("joiner"),
        files,
        true,
        leader.local_addr(),
    )?;
    let join_s = joined
        .get("p4_initial_sync_s")
        .and_then(serde_json::Value::as_f64)
        .unwrap_or(f64::NAN);
    step(out, &mut leader_peak, "join", join_s);
    for (k, v) in joined {
        if let Some(figure) = k.strip_prefix("p4_") {
            out.insert(format!("scale_joiner_{figure}"), v);
        }
    }
    out.insert("scale_files".into(), json!(files));
    out.insert("scale_log_entries".into(), json!(log_len));
    out.insert("scale_leader_peak_rss_mb".into(), json!(leader_peak));
    leader.stop()?;
    Ok(())
}
