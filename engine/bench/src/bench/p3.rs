//! P3: projection apply throughput.

use std::path::Path;
use std::time::Instant;

use anyhow::Result;
use keel_projections::{configure_connection, AppliedPosition, Projections};
use serde_json::json;
use uuid::Uuid;

use super::{peak_rss_mb, reset_peak_rss, settle, Figures};
use crate::workload::library_changes;

/// What P3 measures.
pub(crate) struct Options {
    /// Files in the synthetic library (about three rows each).
    pub(crate) files: usize,
}

/// P3: applying a library's changes to the projections, beside raw SQLite inserts of the same
/// rows.
pub(crate) fn run(dir: &Path, options: &Options, out: &mut Figures) -> Result<()> {
    let files = options.files;
    let changes = library_changes(Uuid::new_v4(), files, 3);
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
