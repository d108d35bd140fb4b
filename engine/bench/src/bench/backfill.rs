//! P4's backfill: a device that joined the library is away while the leader compacts past it;
//! back, it pulls the leader's whole snapshot table by table (decision 0056) and catches up.
//! The returning side runs in its own process so its peak RSS is its own.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use keel_engine::{Home, Library};
use keel_node::Node;
use serde_json::{json, Value};

use super::sync::PASSWORD;
use super::{peak_rss_mb, reset_peak_rss};

/// The step name of the returning side (`keel bench --step p4backfill`, reading a
/// [`Backfill`] on stdin).
pub(crate) const BACKFILL_STEP: &str = "p4backfill";

/// What the returning process is told (as JSON on its stdin).
#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct Backfill {
    addr: SocketAddr,
    home: std::path::PathBuf,
    /// The leader's compaction base: the device is behind it.
    base: u64,
    /// The leader's log end.
    log_len: u64,
    /// File entries in the library: what the byte figures are per.
    entries: u64,
}

/// Leaves the device at `home` (stopped, joined earlier) behind `leader`'s compaction point,
/// runs its return in a new process that reaches the leader at `addr` (its own address, or a
/// relay's), and returns its `p4_backfill_` figures once its digest is the leader's.
pub(crate) fn measure(
    leader: &Node,
    home: &Path,
    entries: usize,
    addr: SocketAddr,
) -> Result<serde_json::Map<String, Value>> {
    // A change the away device lacks, then a compaction past everything (the rule that keeps
    // the log for absent devices is the node's; the library compacts where it is told).
    leader.library().transact(|tx| {
        tx.upsert(&keel_engine::Tag {
            uuid: uuid::Uuid::now_v7(),
            name: "while away".into(),
            color: None,
            created_ms: 0,
        });
        Ok(())
    })?;
    leader.library().flush()?;
    let end = leader.library().status()?.journal.last_lsn;
    let report = leader.library().compact(keel_engine::Lsn(end))?;
    ensure!(
        report.base == end,
        "the leader compacted to {}",
        report.base
    );
    // The leader deletes the log it compacted away in the background: not during the measure.
    let deadline = Instant::now() + Duration::from_secs(120);
    while leader.library().sync_state().dropped_log_pages()? > 0 {
        ensure!(
            Instant::now() < deadline,
            "the leader's dropped log is still there"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    super::settle();
    let task = Backfill {
        addr,
        home: home.to_path_buf(),
        base: report.base,
        log_len: end,
        entries: entries as u64,
    };
    let figures = super::child_figures(BACKFILL_STEP, &task)?;
    let digest = leader.library().digest()?;
    ensure!(
        figures.get("p4_backfill_digest").and_then(Value::as_str) == Some(digest.as_str()),
        "the backfilled device's digest differs from the leader's"
    );
    Ok(figures
        .into_iter()
        .filter(|(k, _)| k.starts_with("p4_") && k != "p4_backfill_digest")
        .collect())
}

/// The returning side, in its own process: starts the node, waits for the backfill and the
/// log after the base, and reports.
pub(crate) fn run_backfill(out: &mut super::Figures) -> Result<()> {
    let mut text = String::new();
    std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)?;
    let Backfill {
        addr,
        home,
        base,
        log_len,
        entries,
    } = serde_json::from_str(&text).context("reading what to backfill from stdin")?;
    super::child_tracing();
    reset_peak_rss();
    let t = Instant::now();
    let lib = Library::open(&Home::new(home), "bench", PASSWORD)?;
    let node = Node::start(lib, super::sync::node_options(vec![addr]))?;
    let deadline = Instant::now() + Duration::from_secs(600);
    let caught_up = |node: &Node| {
        let status = node.status();
        status.compacted_to >= base
            && status.log_len >= log_len
            && node.library().sync_state().applied_lsn().0 >= log_len
    };
    while !caught_up(&node) {
        ensure!(Instant::now() < deadline, "the backfill did not finish");
        std::thread::sleep(Duration::from_millis(5));
    }
    node.library().flush()?;
    let secs = t.elapsed().as_secs_f64();
    let rows = node
        .library()
        .jobs()?
        .into_iter()
        .rev()
        .find(|j| matches!(j.kind, keel_engine::JobKind::Backfill { .. }))
        .map(|j| j.progress.total)
        .context("no backfill job ran")?;
    let entries = entries.max(1) as f64;
    out.insert("p4_backfill_s".into(), json!(secs));
    out.insert("p4_backfill_rows".into(), json!(rows));
    out.insert("p4_backfill_peak_rss_mb".into(), json!(peak_rss_mb()));
    out.insert(
        "p4_backfill_wire_bytes_per_entry".into(),
        json!(node.wire_bytes().1 as f64 / entries),
    );
    let disk = node.library().status()?.disk;
    out.insert(
        "p4_backfill_disk_bytes_per_entry".into(),
        json!((disk.journal + disk.projections + disk.snapshot) as f64 / entries),
    );
    out.insert("p4_backfill_digest".into(), json!(node.library().digest()?));
    node.stop()?;
    Ok(())
}
