//! `keel bench`: each figure measured next to its raw limit in the same run.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use crate::workload::{library_changes, write_tree, LibraryWorkload};
use anyhow::{Context, Result};
use keel_engine::{CreateOptions, Home, KdfParams, Library};
use keel_journal::{CommitRoute, Journal, JournalOptions, LibraryKey, LogRecord, PageBuilder};
use keel_projections::{configure_connection, AppliedPosition, Projections};
use keel_schema::{Change, ChangeId, DeviceId, Epoch, LibraryId, Lsn, Tag};
use serde_json::{json, Map, Value};
use uuid::Uuid;

/// Records read per call in P7's raw read of the log (the replay reads in chunks of this size).
const RAW_READ_CHUNK: usize = 8192;

struct Sizes {
    p1_commits: usize,
    p2_changes: usize,
    p3_files: usize,
    p7_files: usize,
    p8_files: usize,
    p4_files: usize,
    p5_changes: usize,
    p6_rounds: usize,
}

pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Resets the peak-RSS counter (Linux); later reads give the peak since now.
pub(crate) fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

pub(crate) fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

fn device() -> DeviceId {
    DeviceId([0x42; 32])
}

fn tag_change(i: u64) -> Change {
    let tag = Tag {
        uuid: Uuid::now_v7(),
        name: format!("tag-{i}"),
        color: Some("blue".into()),
        created_ms: i as i64,
    };
    let hlc = keel_schema::Hlc {
        physical_ms: 1_700_000_000_000 + i,
        counter: 0,
        device: device(),
    };
    Change::upsert(ChangeId::new(), hlc, &tag)
        .unwrap_or_else(|| unreachable!("tags always have a uuid"))
}

fn open_journal(dir: &Path, name: &str) -> Result<(Journal, LibraryKey, LibraryId)> {
    let library = LibraryId(Uuid::new_v4());
    let key = LibraryKey::generate();
    let journal = Journal::open(
        &dir.join(name),
        library,
        &key,
        device(),
        JournalOptions {
            committed: None,
            committed_budget: None,
            direct_writes: false,
            role: Some(CommitRoute::Log(Epoch {
                counter: 1,
                device: device(),
            })),
        },
    )?;
    Ok((journal, key, library))
}

fn p1(dir: &Path, n: usize, out: &mut Map<String, Value>) -> Result<()> {
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

fn p2(dir: &Path, n: usize, out: &mut Map<String, Value>) -> Result<()> {
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

fn p3(dir: &Path, files: usize, out: &mut Map<String, Value>) -> Result<()> {
    let changes = library_changes(Uuid::new_v4(), device(), files, 3);
    // Raw runs once before and once after the apply, each into a new file, and the figure is
    // the mean of both (the machine's speed drifts between the steps); each timed pass starts
    // with no write-back of the previous one pending.
    settle();
    let raw_before = p3_raw(&dir.join("p3-raw-before.sqlite"), &changes)?;
    settle();
    reset_peak_rss();
    let mut projections = Projections::open(&dir.join("p3.sqlite"))?;
    let t = Instant::now();
    for chunk in changes.chunks(65_536) {
        projections.apply(chunk, Some(AppliedPosition::default()))?;
    }
    let rate = changes.len() as f64 / t.elapsed().as_secs_f64();
    out.insert("p3_apply_rows_per_s".into(), json!(rate));
    out.insert("p3_peak_rss_mb".into(), json!(peak_rss_mb()));
    drop(projections);
    settle();
    let raw_after = p3_raw(&dir.join("p3-raw-after.sqlite"), &changes)?;
    out.insert("p3_raw_before_rows_per_s".into(), json!(raw_before));
    out.insert("p3_raw_after_rows_per_s".into(), json!(raw_after));
    out.insert(
        "p3_raw_sqlite_rows_per_s".into(),
        json!((raw_before + raw_after) / 2.0),
    );
    out.insert("p3_rows".into(), json!(changes.len()));
    Ok(())
}

/// P3's raw limit: the same rows into a new file at `path`, one table per model with the same
/// columns, uuid primary key only, one transaction, one prepared insert per model. Rows/s.
fn p3_raw(path: &Path, changes: &[keel_schema::Change]) -> Result<f64> {
    let conn = rusqlite::Connection::open(path)?;
    configure_connection(&conn)?;
    conn.pragma_update(None, "foreign_keys", "OFF")?;
    for def in keel_schema::MODELS.iter() {
        let cols: Vec<String> = def.fields.iter().map(|f| f.name.to_string()).collect();
        conn.execute_batch(&format!(
            "CREATE TABLE {} (uuid BLOB PRIMARY KEY NOT NULL, {})",
            def.name,
            cols.join(", ")
        ))?;
    }
    let t = Instant::now();
    let tx = conn.unchecked_transaction()?;
    {
        let mut stmts = Vec::new();
        for def in keel_schema::MODELS.iter() {
            let cols: Vec<&str> = def.fields.iter().map(|f| f.name).collect();
            let marks: Vec<String> = (1..=cols.len() + 1).map(|i| format!("?{i}")).collect();
            stmts.push(tx.prepare(&format!(
                "INSERT INTO {} (uuid, {}) VALUES ({})",
                def.name,
                cols.join(", "),
                marks.join(", ")
            ))?);
        }
        for change in changes {
            let keel_schema::Op::Upsert(fields) = &change.op else {
                continue;
            };
            let mut params: Vec<rusqlite::types::Value> =
                vec![change.record.as_bytes().to_vec().into()];
            for (_, v) in fields {
                params.push(match v {
                    keel_schema::Value::Null => rusqlite::types::Value::Null,
                    keel_schema::Value::Bool(b) => i64::from(*b).into(),
                    keel_schema::Value::Int(i) => (*i).into(),
                    keel_schema::Value::Text(t) => t.clone().into(),
                    keel_schema::Value::Bytes(b) => b.clone().into(),
                    keel_schema::Value::Uuid(u) => u.as_bytes().to_vec().into(),
                });
            }
            stmts[usize::from(change.model)].execute(rusqlite::params_from_iter(params))?;
        }
    }
    tx.commit()?;
    Ok(changes.len() as f64 / t.elapsed().as_secs_f64())
}

fn p7(dir: &Path, files: usize, out: &mut Map<String, Value>) -> Result<()> {
    // KEEL_P7_FILES overrides the size (for looking into how replay scales).
    let files = size_from_env("KEEL_P7_FILES", files);
    let (journal, _, library) = open_journal(dir, "p7.redb")?;
    let mut workload = LibraryWorkload::new(library.0, device(), 7);
    let header = workload.header();
    let mut n = header.len();
    journal.commit(header)?;
    let mut left = files;
    while left > 0 {
        let chunk = workload.files(left.min(5_000));
        left -= chunk.len() / 2;
        n += chunk.len();
        journal.commit(chunk)?;
    }
    // The reader's share alone: read and open every record (no apply).
    let t = Instant::now();
    let mut next = Lsn(1);
    let mut opened = 0usize;
    loop {
        let raw = journal.read_log_raw(next, RAW_READ_CHUNK)?;
        let Some((last, _)) = raw.last() else { break };
        next = Lsn(last.0 + 1);
        for (lsn, bytes) in &raw {
            opened += usize::from(journal.open_log_record(*lsn, bytes).is_ok());
        }
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

/// The size in environment variable `var` if it holds a number, else `default`.
pub(crate) fn size_from_env(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Writes dirty pages out (best effort), so that the kernel's write-back of what a step just
/// wrote does not run during the next step's timing.
pub(crate) fn settle() {
    let _ = std::process::Command::new("sync").status();
}

fn p8(dir: &Path, files: usize, out: &mut Map<String, Value>) -> Result<()> {
    let tree = dir.join("p8-tree");
    write_tree(&tree, files, 8)?;
    // Raw: read and hash every file, one thread; once before and once after the index, and the
    // mean of both is the figure (the machine's speed drifts between the two steps).
    let mut paths = Vec::with_capacity(files);
    for e in walkdir::WalkDir::new(&tree) {
        let e = e?;
        if e.file_type().is_file() {
            paths.push(e.into_path());
        }
    }
    let raw = |paths: &[std::path::PathBuf]| -> Result<f64> {
        let t = Instant::now();
        for p in paths {
            let bytes = std::fs::read(p).with_context(|| p.display().to_string())?;
            std::hint::black_box(blake3::hash(&bytes));
        }
        Ok(paths.len() as f64 / t.elapsed().as_secs_f64())
    };
    settle();
    let raw_before = raw(&paths)?;
    reset_peak_rss();
    let home = Home::new(dir.join("p8-home"));
    let lib = Library::create(
        &home,
        "p8",
        "bench",
        CreateOptions {
            kdf: KdfParams::INSECURE_FAST,
        },
    )?;
    let t = Instant::now();
    let report = lib.index(&tree, &mut |_| {})?;
    let secs = t.elapsed().as_secs_f64();
    anyhow::ensure!(
        report.files as usize == files,
        "indexed {} of {files} files",
        report.files
    );
    out.insert("p8_index_files_per_s".into(), json!(files as f64 / secs));
    out.insert("p8_files".into(), json!(files));
    out.insert("p8_peak_rss_mb".into(), json!(peak_rss_mb()));
    lib.close()?;
    settle();
    let raw_after = raw(&paths)?;
    out.insert("p8_raw_before_files_per_s".into(), json!(raw_before));
    out.insert("p8_raw_after_files_per_s".into(), json!(raw_after));
    out.insert(
        "p8_raw_read_hash_files_per_s".into(),
        json!((raw_before + raw_after) / 2.0),
    );
    Ok(())
}

/// Runs every benchmark and prints a table, or one JSON object with `--json`.
pub(crate) fn run(as_json: bool, quick: bool) -> Result<i32> {
    let sizes = if quick {
        Sizes {
            p1_commits: 300,
            p2_changes: 200_000,
            p3_files: 50_000,
            p7_files: 100_000,
            p8_files: 10_000,
            p4_files: 100_000,
            p5_changes: 1_000,
            p6_rounds: 2,
        }
    } else {
        Sizes {
            p1_commits: 2000,
            p2_changes: 1_000_000,
            p3_files: 250_000,
            p7_files: 500_000,
            p8_files: 100_000,
            p4_files: 1_000_000,
            p5_changes: 5_000,
            p6_rounds: 5,
        }
    };
    let mut out = Map::new();
    out.insert("quick".into(), json!(quick));
    let only = std::env::var("KEEL_BENCH_ONLY").unwrap_or_default();
    if std::env::var_os("KEEL_BENCH_CHILD").is_none() {
        // Each step runs in its own process, so its peak RSS is its own.
        for step in ["p1", "p2", "p3", "p4", "p5", "p6", "p7", "p8", "quic"] {
            if !only.is_empty() && !step.starts_with(&only.to_lowercase()) {
                continue;
            }
            if !as_json {
                eprintln!("running {step}…");
            }
            // The last step's files are gone, but not always its disk work: start each step
            // with nothing left to write back.
            settle();
            let mut cmd = std::process::Command::new(std::env::current_exe()?);
            cmd.args(["bench", "--json"]);
            if quick {
                cmd.arg("--quick");
            }
            let child = cmd
                .env("KEEL_BENCH_ONLY", step)
                .env("KEEL_BENCH_CHILD", "1")
                .stderr(std::process::Stdio::inherit())
                .output()?;
            anyhow::ensure!(child.status.success(), "benchmark step {step} failed");
            let text = String::from_utf8(child.stdout)?;
            let Value::Object(figures) = serde_json::from_str::<Value>(text.trim())? else {
                anyhow::bail!("benchmark step {step} printed no JSON object");
            };
            out.extend(figures);
        }
        print_figures(&out, as_json);
        return Ok(0);
    }
    let dir = tempfile::tempdir()?;
    type Step<'a> = &'a dyn Fn(&mut Map<String, Value>) -> Result<()>;
    if only == "p4join" {
        crate::bench_sync::p4_join(&mut out)?;
        print_figures(&out, true);
        return Ok(0);
    }
    let steps: [(&str, Step<'_>); 9] = [
        ("P1 durable commit", &|o| {
            p1(dir.path(), sizes.p1_commits, o)
        }),
        ("P2 group commit", &|o| p2(dir.path(), sizes.p2_changes, o)),
        ("P3 projection apply", &|o| {
            p3(dir.path(), sizes.p3_files, o)
        }),
        ("P4 initial sync", &|o| {
            crate::bench_sync::p4(dir.path(), sizes.p4_files, o)
        }),
        ("P5 live latency", &|o| {
            crate::bench_sync::p5(dir.path(), sizes.p5_changes, o)
        }),
        ("P6 failover", &|o| {
            crate::bench_sync::p6(dir.path(), sizes.p6_rounds, o)
        }),
        ("QUIC raw", &crate::bench_sync::quic_raw),
        ("P7 replay", &|o| p7(dir.path(), sizes.p7_files, o)),
        ("P8 indexing", &|o| p8(dir.path(), sizes.p8_files, o)),
    ];
    for (name, step) in steps {
        if !only.is_empty() && !name.to_lowercase().starts_with(&only.to_lowercase()) {
            continue;
        }
        step(&mut out)?;
    }
    print_figures(&out, true);
    Ok(0)
}

fn print_figures(out: &Map<String, Value>, as_json: bool) {
    if as_json {
        println!("{}", Value::Object(out.clone()));
    } else {
        for (k, v) in out {
            match v.as_f64() {
                Some(f) => println!("{k:<32} {f:>16.3}"),
                None => println!("{k:<32} {v:>16}"),
            }
        }
    }
}
