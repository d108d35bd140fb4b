//! P1: durable commit latency.

use std::path::Path;
use std::time::Instant;

use anyhow::Result;
use keel_engine::{CreateOptions, Home, KdfParams, Library};
use keel_journal::LogRecord;
use keel_schema::Epoch;
use serde_json::json;

use super::{peak_rss_mb, percentile, reset_peak_rss, tag_change, Figures};

/// What P1 measures.
pub(crate) struct Options {
    /// Commits timed.
    pub(crate) commits: usize,
}

/// P1: one durable commit of one change at a time through `Library::transact`, beside a raw redb
/// commit of a record of the same size.
pub(crate) fn run(dir: &Path, options: &Options, out: &mut Figures) -> Result<()> {
    let n = options.commits;
    reset_peak_rss();
    let home = Home::new(dir.join("p1-home"));
    let lib = Library::create(
        &home,
        "p1",
        "bench",
        CreateOptions {
            kdf: KdfParams::INSECURE_FAST,
        },
    )?;
    let mut times = Vec::with_capacity(n);
    for i in 0..n {
        let change = tag_change(i as u64);
        let t = Instant::now();
        lib.transact(|tx| {
            tx.push(change);
            Ok(())
        })?;
        times.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    lib.close()?;
    times.sort_by(f64::total_cmp);
    out.insert("p1_commit_p50_ms".into(), json!(percentile(&times, 0.5)));
    out.insert("p1_commit_p99_ms".into(), json!(percentile(&times, 0.99)));
    out.insert("p1_peak_rss_mb".into(), json!(peak_rss_mb()));

    let db = redb::Database::create(dir.join("p1-raw.redb"))?;
    let table: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("raw");
    let payload = vec![7u8; LogRecord::encode(Epoch::default(), &[0; 150]).len()];
    let mut raw = Vec::with_capacity(n);
    for i in 0..n as u64 {
        let t = Instant::now();
        let txn = db.begin_write()?;
        {
            let mut tbl = txn.open_table(table)?;
            tbl.insert(i, payload.as_slice())?;
        }
        txn.commit()?;
        raw.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    raw.sort_by(f64::total_cmp);
    out.insert(
        "p1_raw_redb_commit_p50_ms".into(),
        json!(percentile(&raw, 0.5)),
    );
    Ok(())
}
