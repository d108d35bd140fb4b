//! P8: indexing throughput.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use keel_engine::{CreateOptions, Home, KdfParams, Library};
use serde_json::json;

use super::{peak_rss_mb, reset_peak_rss, settle, Figures};
use crate::workload::write_tree;

/// What P8 measures.
pub(crate) struct Options {
    /// Files in the tree indexed.
    pub(crate) files: usize,
}

/// P8: indexing a tree of files, beside reading and hashing every file on one thread.
pub(crate) fn run(dir: &Path, options: &Options, out: &mut Figures) -> Result<()> {
    let files = options.files;
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
