//! Push: the wire bytes of a follower's offline changes merged into the leader's log (issue
//! 28): `changes` tags committed while the follower was stopped, then it comes back.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use keel_engine::{Home, Library, Tag};
use keel_node::Node;
use serde_json::json;
use uuid::Uuid;

use super::sync::{follower_of, leader_with, PASSWORD};
use super::Figures;

/// What the push step measures.
pub(crate) struct Options {
    /// Changes the follower commits while stopped.
    pub(crate) changes: usize,
}

/// Longest wait for the merge.
const WAIT: Duration = Duration::from_secs(300);

/// Runs the step: a leader and a follower on loopback; the follower stops, commits, restarts.
pub(crate) fn run(dir: &Path, options: &Options, out: &mut Figures) -> Result<()> {
    let a = leader_with(&dir.join("push-a"), 0)?;
    let b = follower_of(&a, &dir.join("push-b"))?;
    b.wait_in_sync(WAIT)?;
    let home = Home::new(dir.join("push-b"));
    let name = b.library().name().to_string();
    b.stop()?;
    let lib = Library::open(&home, &name, PASSWORD)?;
    let mut ids = std::collections::HashSet::new();
    for start in (0..options.changes).step_by(1_000) {
        let (_, receipt) = lib.transact(|tx| {
            for i in start..(start + 1_000).min(options.changes) {
                tx.upsert_owned(Tag {
                    uuid: Uuid::now_v7(),
                    name: format!("offline {i}"),
                    color: Some("blue".into()),
                    created_ms: i as i64,
                });
            }
            Ok(())
        })?;
        ensure!(!receipt.change_ids.is_empty(), "nothing committed");
        ids.extend(receipt.change_ids);
    }
    let encoded: u64 = lib
        .sync_state()
        .changes()?
        .iter()
        .filter(|c| ids.contains(&c.id))
        .map(|c| c.encode().len() as u64)
        .sum();
    let log_before = a.status().log_len;
    lib.close()?;
    let b = Node::start(
        Library::open(&home, &name, PASSWORD)?,
        super::sync::node_options(vec![a.local_addr()]),
    )?;
    let t = Instant::now();
    let want = log_before + options.changes as u64;
    while a.status().log_len < want || b.status().offline > 0 || b.status().log_len < want {
        ensure!(t.elapsed() < WAIT, "the follower's changes never merged");
        std::thread::sleep(Duration::from_millis(5));
    }
    let secs = t.elapsed().as_secs_f64();
    let (sent, received) = b.wire_bytes();
    let n = options.changes as f64;
    out.insert("push_changes".into(), json!(options.changes));
    out.insert("push_s".into(), json!(secs));
    out.insert(
        "merge_wire_bytes_per_change".into(),
        json!((sent + received) as f64 / n),
    );
    out.insert("push_sent_bytes_per_change".into(), json!(sent as f64 / n));
    out.insert(
        "push_received_bytes_per_change".into(),
        json!(received as f64 / n),
    );
    // Raw: each change encoded once, before sealing (the least a link could carry unpacked).
    out.insert(
        "push_raw_change_bytes".into(),
        json!(encoded as f64 / ids.len().max(1) as f64),
    );
    b.stop()?;
    a.stop()?;
    Ok(())
}
