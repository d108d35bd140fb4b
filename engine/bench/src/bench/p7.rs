//! P7: replay throughput.

use std::path::Path;
use std::time::Instant;

use anyhow::Result;
use keel_projections::{AppliedPosition, Projections};
use keel_schema::Lsn;
use serde_json::json;

use super::{open_journal, peak_rss_mb, reset_peak_rss, settle, Figures};
use crate::workload::LibraryWorkload;

/// Records read per call in P7's raw read of the log (the replay reads in chunks of this size).
const RAW_READ_CHUNK: usize = 8192;

/// What P7 measures.
pub(crate) struct Options {
    /// Files in the synthetic library whose log is replayed.
    pub(crate) files: usize,
}

/// P7: replaying a whole log into empty projections, beside reading and opening every record.
pub(crate) fn run(dir: &Path, options: &Options, out: &mut Figures) -> Result<()> {
    let files = options.files;
    let (journal, _, library) = open_journal(dir, "p7.redb")?;
    let mut workload = LibraryWorkload::signed(library.0, 7);
    let header = workload.header();
    let mut n = header.len();
    journal.commit(header)?;
    let mut left = files;
    while left > 0 {
        let take = left.min(5_000);
        let chunk = workload.files(take);
        left -= take;
        n += chunk.len();
        journal.commit(chunk)?;
    }
    // The reader's share alone: read and open every record (no apply).
    let t = Instant::now();
    let mut next = Lsn(1);
    let mut opened = 0usize;
    loop {
        let raw = journal.log().read_raw(next, RAW_READ_CHUNK)?;
        let Some((last, _)) = raw.last() else { break };
        next = Lsn(last.0 + 1);
        opened += journal
            .log()
            .open_records(&raw)
            .iter()
            .filter(|r| r.is_ok())
            .count();
    }
    anyhow::ensure!(opened == n, "opened {opened} of {n}");
    out.insert(
        "p7_read_open_changes_per_s".into(),
        json!(n as f64 / t.elapsed().as_secs_f64()),
    );
    // The journal was just written: its write-back must not run during the replay's timing.
    settle();
    reset_peak_rss();
    let mut projections = Projections::open(&dir.join("p7.sqlite"))?;
    let t = Instant::now();
    let report = keel_engine::replay(
        &journal,
        &mut projections,
        AppliedPosition::default(),
        &mut |_, _| {},
    )?;
    let secs = t.elapsed().as_secs_f64();
    anyhow::ensure!(
        report.changes as usize == n,
        "replay applied {} of {n}",
        report.changes
    );
    anyhow::ensure!(report.position.log == Lsn(n as u64), "replay stopped early");
    out.insert("p7_replay_changes_per_s".into(), json!(n as f64 / secs));
    out.insert("p7_proven_changes".into(), json!(report.proven));
    out.insert("p7_changes".into(), json!(n));
    out.insert("p7_peak_rss_mb".into(), json!(peak_rss_mb()));
    Ok(())
}
