//! P2: group commit throughput.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use keel_journal::{LogRecord, PageBuilder};
use keel_schema::{Change, Epoch};
use serde_json::json;

use super::{open_journal, peak_rss_mb, reset_peak_rss, tag_change, Figures};

/// What P2 measures.
pub(crate) struct Options {
    /// Changes committed, by four writers in batches of 1,000.
    pub(crate) changes: usize,
}

/// P2: group commit through the journal by several writers, beside raw redb appends of the same
/// sealed records (one record per key, and packed in pages as the journal stores them).
pub(crate) fn run(dir: &Path, options: &Options, out: &mut Figures) -> Result<()> {
    let n = options.changes;
    const WRITERS: usize = 4;
    const BATCH: usize = 1000;
    reset_peak_rss();
    let (journal, key, library) = open_journal(dir, "p2.redb")?;
    let journal = Arc::new(journal);
    let per_writer = n / WRITERS;
    let batches: Vec<Vec<Vec<Change>>> = (0..WRITERS)
        .map(|w| {
            (0..per_writer / BATCH)
                .map(|b| {
                    (0..BATCH)
                        .map(|i| tag_change((w * per_writer + b * BATCH + i) as u64))
                        .collect()
                })
                .collect()
        })
        .collect();
    let total: usize = batches.iter().flatten().map(Vec::len).sum();
    let t = Instant::now();
    std::thread::scope(|s| -> Result<()> {
        let handles: Vec<_> = batches
            .into_iter()
            .map(|mine| {
                let journal = journal.clone();
                s.spawn(move || -> Result<()> {
                    for batch in mine {
                        journal.commit(batch)?;
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("writer thread panicked"))??;
        }
        Ok(())
    })?;
    let rate = total as f64 / t.elapsed().as_secs_f64();
    out.insert("p2_changes_per_s".into(), json!(rate));
    out.insert("p2_peak_rss_mb".into(), json!(peak_rss_mb()));

    // Raw: the same sealed record bytes appended in durable batches of the same size.
    let sealer = key.sealer(library);
    let records: Vec<Vec<u8>> = (0..total as u64)
        .map(|i| {
            let c = tag_change(i);
            LogRecord::encode(Epoch::default(), &sealer.seal(c.id, &c.encode()))
        })
        .collect();
    let db = redb::Database::create(dir.join("p2-raw.redb"))?;
    let table: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("raw");
    let t = Instant::now();
    for (b, chunk) in records.chunks(BATCH).enumerate() {
        let txn = db.begin_write()?;
        {
            let mut tbl = txn.open_table(table)?;
            for (i, r) in chunk.iter().enumerate() {
                tbl.insert((b * BATCH + i) as u64, r.as_slice())?;
            }
        }
        txn.commit()?;
    }
    out.insert(
        "p2_raw_redb_per_s".into(),
        json!(total as f64 / t.elapsed().as_secs_f64()),
    );
    // Raw again, the way the journal stores its log since format 2: each batch's records
    // packed into values of at most `PAGE_BYTES_MAX` bytes, one key per value.
    let db = redb::Database::create(dir.join("p2-raw-paged.redb"))?;
    let t = Instant::now();
    for (b, chunk) in records.chunks(BATCH).enumerate() {
        let txn = db.begin_write()?;
        {
            let mut tbl = txn.open_table(table)?;
            let mut first = (b * BATCH) as u64;
            let mut page = PageBuilder::default();
            for r in chunk {
                page.push(r);
                while let Some((bytes, count)) = page.take_full() {
                    tbl.insert(first, bytes.as_slice())?;
                    first += count;
                }
            }
            if !page.is_empty() {
                tbl.insert(first, page.take().as_slice())?;
            }
        }
        txn.commit()?;
    }
    out.insert(
        "p2_raw_redb_paged_per_s".into(),
        json!(total as f64 / t.elapsed().as_secs_f64()),
    );
    out.insert("p2_changes".into(), json!(total));
    Ok(())
}
