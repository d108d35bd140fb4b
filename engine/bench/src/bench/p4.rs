//! P4: initial sync of a device that joins.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use keel_engine::{Home, Library};
use keel_node::Node;
use serde_json::{json, Value};

use super::sync::{join_counting, leader_with, PASSWORD};
use super::{peak_rss_mb, reset_peak_rss, settle, Figures};

/// What P4 measures.
pub(crate) struct Options {
    /// Files in the leader's library.
    pub(crate) files: usize,
    /// Join by snapshot (the default); false: by replication alone, for comparison.
    pub(crate) snapshot: bool,
}

/// P4: a fresh device joins a library of `files` files and syncs it whole (log stored,
/// projections built). The joining side runs in its own process so its peak RSS is its own.
pub(crate) fn run(dir: &Path, options: &Options, out: &mut Figures) -> Result<()> {
    let files = options.files;
    let leader = leader_with(dir, files)?;
    // The leader's library was just written (about 800 MB): its write-back must not run
    // during the join's timing, as it would not for a library that existed before.
    settle();
    let log_len = leader.status().log_len;
    let direct = leader.local_addr();
    for (k, v) in join_once(
        &leader,
        &dir.join("joiner"),
        files,
        options.snapshot,
        direct,
    )? {
        out.insert(k, v);
    }
    // The same join from the leader once it compacted its log (what a library past
    // `compact_after` entries looks like): the file and the log after its base.
    super::sync::compact_whole_log(&leader, Duration::from_secs(60))?;
    settle();
    for (k, v) in join_once(&leader, &dir.join("joiner-compacted"), files, true, direct)? {
        if let Some(figure) = k.strip_prefix("p4_") {
            out.insert(format!("p4_compacted_{figure}"), v);
        }
    }
    // And over a home network: 100 Mbit/s, 2 ms round trip, a 50 ms router buffer.
    let relay = super::relay::Relay::start(direct, LIMITED_LINK)?;
    for (k, v) in join_once(
        &leader,
        &dir.join("joiner-limited"),
        files,
        true,
        relay.addr,
    )? {
        if let Some(figure) = k.strip_prefix("p4_") {
            out.insert(format!("p4_limited_{figure}"), v);
        }
    }
    // The first joiner, away since, comes back behind a compaction past everything: it
    // backfills the whole snapshot table by table.
    for (k, v) in super::backfill::measure(&leader, &dir.join("joiner"), files, direct)? {
        out.insert(k, v);
    }
    // The compacted joiner comes back the same way over the home network.
    let limited =
        super::backfill::measure(&leader, &dir.join("joiner-compacted"), files, relay.addr)?;
    for (k, v) in limited {
        if let Some(figure) = k.strip_prefix("p4_") {
            out.insert(format!("p4_limited_{figure}"), v);
        }
    }
    drop(relay);
    out.insert("p4_entries".into(), json!(files));
    out.insert("p4_log_entries".into(), json!(log_len));
    leader.stop()?;
    Ok(())
}

/// The link P4's last join crosses: 100 Mbit/s each way, 1 ms each way, 50 ms of buffer.
const LIMITED_LINK: super::relay::Shape = super::relay::Shape {
    rate: 100_000_000 / 8,
    delay: Duration::from_millis(1),
    queue: Duration::from_millis(50),
};

/// Joins `leader` (at `addr`: its own address, or a relay's) from a new process with its home at `home`; returns its `p4_` figures once
/// the leader has its Device record and the digests agree.
pub(crate) fn join_once(
    leader: &Node,
    home: &Path,
    files: usize,
    snapshot: bool,
    addr: SocketAddr,
) -> Result<serde_json::Map<String, Value>> {
    let log_len = leader.status().log_len;
    let invite = leader.invite(true)?;
    let join = Join {
        addr,
        code: invite.code.as_str().to_string(),
        home: home.to_path_buf(),
        log_len,
        entries: files as u64,
        snapshot,
    };
    // The code goes on the child's stdin, not its command line.
    let figures = super::child_figures(JOIN_STEP, &join)?;
    // The joiner's own Device record is the one entry it added: wait for it here too.
    let deadline = Instant::now() + Duration::from_secs(60);
    while leader.status().log_len < log_len + 1 {
        ensure!(
            Instant::now() < deadline,
            "the joiner's own record never arrived"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let digest = leader.library().digest()?;
    ensure!(
        figures.get("p4_digest").and_then(Value::as_str) == Some(digest.as_str()),
        "the joined device's digest differs from the leader's ({:?} there, {:?} here)",
        figures.get("p4_counts"),
        leader.library().status()?.counts
    );
    Ok(figures
        .into_iter()
        .filter(|(k, _)| k.starts_with("p4_") && k != "p4_digest" && k != "p4_counts")
        .collect())
}

/// What the joining process is told (as JSON on its stdin).
#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct Join {
    addr: SocketAddr,
    code: String,
    home: std::path::PathBuf,
    log_len: u64,
    /// File entries in the library: what the byte figures are per.
    entries: u64,
    snapshot: bool,
}

/// The step name of P4's joining side (`keel bench --step p4join`, reading a [`Join`] on stdin).
pub(crate) const JOIN_STEP: &str = "p4join";

/// The joining side of P4, in its own process.
pub(crate) fn run_join(out: &mut Figures) -> Result<()> {
    let mut text = String::new();
    std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)?;
    let Join {
        addr,
        code,
        home,
        log_len,
        entries,
        snapshot,
    } = serde_json::from_str(&text).context("reading what to join from stdin")?;
    let home = Home::new(home);
    super::child_tracing();
    reset_peak_rss();
    let t = Instant::now();
    let (name, received) = join_counting(&home, addr, &code, snapshot)?;
    // Pairing and the snapshot fetch; the rest is opening, starting and catching up.
    let joined_s = t.elapsed().as_secs_f64();
    let lib = Library::open(&home, &name, PASSWORD)?;
    let node = Node::start(lib, super::sync::node_options(vec![addr]))?;
    let deadline = Instant::now() + Duration::from_secs(600);
    // The joiner's own Device record adds one entry to the leader's log.
    let verbose = std::env::var_os("KEEL_LOG").is_some();
    let mut last_print = Instant::now();
    // Done when the joiner holds the leader's whole log, has applied it, and its projections
    // have their secondary indexes back (a catch-up loads without them; the apply that reaches
    // the leader's end, which may include the joiner's own record, builds them).
    while node.status().log_len < log_len || node.library().sync_state().bulk_loading() {
        ensure!(Instant::now() < deadline, "initial sync did not finish");
        std::thread::sleep(Duration::from_millis(5));
        if verbose && last_print.elapsed() >= Duration::from_secs(1) {
            last_print = Instant::now();
            tracing::info!(
                log = node.status().log_len,
                applied = node.library().sync_state().applied_lsn().0,
                "initial sync"
            );
        }
    }
    node.library().flush()?;
    let secs = t.elapsed().as_secs_f64();
    // What the node received catching up after the join, beside what the join's own
    // connection did: both crossed the link to bring the device level.
    let received = received + node.wire_bytes().1;
    out.insert("p4_initial_sync_s".into(), json!(secs));
    out.insert("p4_join_s".into(), json!(joined_s));
    out.insert("p4_changes_per_s".into(), json!(log_len as f64 / secs));
    out.insert("p4_peak_rss_mb".into(), json!(peak_rss_mb()));
    // What the initial sync carried (QUIC's UDP bytes), per file entry (an entry and its
    // content are two log entries).
    let entries = entries.max(1) as f64;
    out.insert(
        "p4_wire_bytes_per_entry".into(),
        json!(received as f64 / entries),
    );
    // Then its own Device record goes to the leader and comes back sequenced.
    while node.status().log_len < log_len + 1 || node.status().offline > 0 {
        ensure!(
            Instant::now() < deadline,
            "the joiner's own record was not sequenced"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // What the library takes on disk once joined, per file entry: journal, projections and
    // the snapshot a compacted log lives on as.
    let disk = node.library().status()?.disk;
    out.insert(
        "p4_disk_bytes_per_entry".into(),
        json!((disk.journal + disk.projections + disk.snapshot) as f64 / entries),
    );
    out.insert(
        "p4_disk_snapshot_bytes_per_entry".into(),
        json!(disk.snapshot as f64 / entries),
    );
    out.insert(
        "p4_disk_journal_bytes_per_entry".into(),
        json!(disk.journal as f64 / entries),
    );
    out.insert(
        "p4_disk_projections_bytes_per_entry".into(),
        json!(disk.projections as f64 / entries),
    );
    out.insert("p4_digest".into(), json!(node.library().digest()?));
    out.insert(
        "p4_counts".into(),
        json!(format!("{:?}", node.library().status()?.counts)),
    );
    node.stop()?;
    Ok(())
}
