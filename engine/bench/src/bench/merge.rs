//! Merge: a library of `records` entries (each its own content) merged into another of as many,
//! half of whose contents and tag names they share (issue 27, SyncSetup).

use std::path::Path;
use std::time::Instant;

use anyhow::Result;
use keel_engine::{CreateOptions, Home, KdfParams, Library};
use keel_schema::{content_uuid, tag_uuid, ContentIdentity, Entry, Location, Tag, UserMetadata};
use serde_json::json;
use uuid::Uuid;

use super::{peak_rss_mb, reset_peak_rss, settle, Figures};

/// What the merge step measures.
pub(crate) struct Options {
    /// Entries in each library.
    pub(crate) records: usize,
}

/// Tags in each library; half of the names are shared.
const TAGS: usize = 1_000;
/// Records per transaction while the libraries are built.
const BUILD_BATCH: usize = 10_000;

fn create(home: &Home, name: &str) -> Result<Library> {
    let options = CreateOptions {
        kdf: KdfParams::INSECURE_FAST,
    };
    Ok(Library::create(home, name, "bench", options)?)
}

/// Fills `lib` with a location, `n` entries each with its own content (hashes from `first`
/// on: two libraries built from overlapping ranges share contents), tags `tag_first..` and a
/// note and a tag use on every tenth entry.
fn build(lib: &Library, dir: &Path, n: usize, first: usize) -> Result<()> {
    let library = lib.id().0;
    let location = Location {
        uuid: Uuid::now_v7(),
        device: lib.device_id().record_uuid(),
        path: dir.to_string_lossy().into_owned(),
        name: "files".into(),
        created_ms: 1,
    };
    let tags: Vec<Tag> = (first / 100..first / 100 + TAGS)
        .map(|i| Tag {
            uuid: tag_uuid(library, &format!("tag {i}")),
            name: format!("tag {i}"),
            color: None,
            created_ms: 1,
        })
        .collect();
    lib.transact(|tx| {
        tx.upsert(&location);
        for tag in &tags {
            tx.upsert(tag);
        }
        Ok(())
    })?;
    for start in (0..n).step_by(BUILD_BATCH) {
        lib.transact(|tx| {
            for i in start..(start + BUILD_BATCH).min(n) {
                let hash = blake3::hash(&(first + i).to_le_bytes())
                    .to_hex()
                    .to_string();
                let content = content_uuid(library, &hash);
                tx.upsert_owned(ContentIdentity {
                    uuid: Some(content),
                    content_hash: hash,
                    mime: None,
                    kind: "binary".into(),
                    size: 4096,
                    entry_count: 0,
                    total_size: 0,
                });
                let entry = Uuid::now_v7();
                let noted = i % 10 == 0;
                let metadata = noted.then(|| keel_schema::entry_metadata_uuid(entry));
                tx.upsert_owned(Entry {
                    uuid: Some(entry),
                    location: location.uuid,
                    relative_path: format!("d{}", i / 1000),
                    name: format!("f{i}"),
                    kind: 0,
                    size: 4096,
                    created_ms: 1,
                    modified_ms: 1,
                    content: Some(content),
                    metadata,
                    inode: None,
                    volume: None,
                });
                if let Some(metadata) = metadata {
                    tx.upsert_owned(UserMetadata {
                        uuid: metadata,
                        entry: Some(entry),
                        content: None,
                        notes: Some(format!("note {i}")),
                        favorite: false,
                        hidden: false,
                        custom_data: None,
                    });
                    let tag = tags[i % TAGS].uuid;
                    tx.upsert_owned(keel_schema::UserMetadataTag {
                        uuid: keel_schema::user_metadata_tag_uuid(metadata, tag),
                        user_metadata: metadata,
                        tag,
                        created_ms: 1,
                    });
                }
            }
            Ok(())
        })?;
    }
    lib.flush()?;
    Ok(())
}

/// Builds both libraries, then times the merge (and its peak RSS), beside committing as many
/// changes as the merge wrote into a fresh library (the raw cost of writing them).
pub(crate) fn run(dir: &Path, options: &Options, out: &mut Figures) -> Result<()> {
    let n = options.records;
    let home = Home::new(dir.join("merge-home"));
    let into = create(&home, "into")?;
    let source = create(&home, "source")?;
    build(&into, &dir.join("into-files"), n, 0)?;
    build(&source, &dir.join("source-files"), n, n / 2)?;
    settle();
    reset_peak_rss();
    let rss_before = peak_rss_mb();
    let t = Instant::now();
    let report = into.merge_from(&source, false, &mut |_, _| {})?;
    into.flush()?;
    let secs = t.elapsed().as_secs_f64();
    let rss = peak_rss_mb();
    let looked_at: u64 = report.models.iter().map(|m| m.source).sum();
    anyhow::ensure!(report.changes > 0, "the merge wrote nothing: {report:?}");
    into.close()?;
    source.close()?;
    // Raw: the same number of whole-record upserts, committed in the merge's batch size.
    let raw = create(&home, "raw")?;
    settle();
    let t = Instant::now();
    let batch = keel_engine::MERGE_BATCH as u64;
    for start in (0..report.changes).step_by(keel_engine::MERGE_BATCH) {
        raw.transact(|tx| {
            for i in start..(start + batch).min(report.changes) {
                tx.upsert_owned(Tag {
                    uuid: Uuid::now_v7(),
                    name: format!("raw {i}"),
                    color: None,
                    created_ms: 1,
                });
            }
            Ok(())
        })?;
    }
    raw.flush()?;
    let raw_secs = t.elapsed().as_secs_f64();
    raw.close()?;
    out.insert("library_merge_records".into(), json!(n));
    out.insert("library_merge_records_looked_at".into(), json!(looked_at));
    out.insert("library_merge_changes".into(), json!(report.changes));
    out.insert("library_merge_s".into(), json!(secs));
    out.insert(
        "library_merge_records_per_s".into(),
        json!(looked_at as f64 / secs),
    );
    out.insert("library_merge_peak_rss_mb".into(), json!(rss));
    out.insert("library_merge_rss_before_mb".into(), json!(rss_before));
    out.insert("library_merge_raw_commit_s".into(), json!(raw_secs));
    Ok(())
}
