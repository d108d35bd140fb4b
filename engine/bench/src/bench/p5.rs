//! P5: live replication latency.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use keel_engine::{Event, Home, Library};
use keel_node::{Node, NodeOptions};
use keel_schema::Tag;
use serde_json::json;
use uuid::Uuid;

use super::sync::{fast, follower_of, PASSWORD};
use super::{percentile, Figures};

/// What P5 measures.
pub(crate) struct Options {
    /// Changes committed.
    pub(crate) changes: usize,
    /// Changes per second (an open load).
    pub(crate) rate: u64,
    /// The leader's node sequences its own commits (the default); false: they go through its
    /// offline journal, for comparison.
    pub(crate) leader_commits: bool,
    /// Watches the leader during the load (see [`crate::BenchOptions::p5_inspector`]).
    pub(crate) observer: Option<crate::Observer>,
}

/// Threads committing P5's changes in turn (see the comment in [`run`]).
const P5_COMMITTERS: usize = 2;

/// What one P5 committer did: each change's tag uuid with when its commit began, and each
/// commit's duration in ms.
type Committed = (Vec<(Uuid, Instant)>, Vec<f64>);

/// P5: commit on the leader at `rate` changes/s; latency until the row is in the follower's
/// projection (its apply event).
pub(crate) fn run(dir: &Path, options: &Options, out: &mut Figures) -> Result<()> {
    let changes = options.changes;
    let home = Home::new(dir.join("p5-a"));
    let leader_commits = options.leader_commits;
    let a = std::sync::Arc::new(Node::start(
        Library::create(&home, "bench", PASSWORD, fast())?,
        NodeOptions {
            leader_commits,
            ..super::sync::node_options(Vec::new())
        },
    )?);
    let b = follower_of(&a, &dir.join("p5-b"))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while b.status().log_len < a.status().log_len || b.status().leader.is_none() {
        ensure!(Instant::now() < deadline, "the follower did not catch up");
        std::thread::sleep(Duration::from_millis(10));
    }
    let watching = match &options.observer {
        Some(observer) => Some((observer.0)(a.clone())?),
        None => None,
    };
    out.insert("p5_inspector_open".into(), json!(watching.is_some()));
    let mut events = b.library().subscribe();
    let (seen_tx, seen_rx) = std::sync::mpsc::channel::<(Uuid, Instant)>();
    let watcher = std::thread::spawn(move || {
        while let Ok(event) = events.blocking_recv() {
            if let Event::RecordsChanged { records, .. } = event {
                let now = Instant::now();
                for (_, uuid, _) in records {
                    if seen_tx.send((uuid, now)).is_err() {
                        return;
                    }
                }
            }
        }
    });
    let (mut started, mut commit_ms, committed_in) = commit_at_rate(&a, changes, options.rate)?;
    let mut latencies = Vec::with_capacity(changes);
    let deadline = Instant::now() + Duration::from_secs(30);
    while latencies.len() < changes && Instant::now() < deadline {
        if let Ok((uuid, at)) = seen_rx.recv_timeout(Duration::from_millis(100)) {
            if let Some(t0) = started.remove(&uuid) {
                latencies.push(at.duration_since(t0).as_secs_f64() * 1000.0);
            }
        }
    }
    ensure!(
        latencies.len() == changes,
        "{} of {changes} changes reached the follower",
        latencies.len()
    );
    latencies.sort_by(f64::total_cmp);
    out.insert(
        "p5_latency_p50_ms".into(),
        json!(percentile(&latencies, 0.5)),
    );
    out.insert(
        "p5_latency_p99_ms".into(),
        json!(percentile(&latencies, 0.99)),
    );
    // For telling one long stall from scattered slow changes when p99 misses its target.
    out.insert(
        "p5_latency_max_ms".into(),
        json!(latencies.last().copied().unwrap_or(0.0)),
    );
    out.insert(
        "p5_over_20ms".into(),
        json!(latencies.iter().filter(|&&l| l > 20.0).count()),
    );
    // How long the leader's own commit took (durable), beside the latency to the follower.
    commit_ms.sort_by(f64::total_cmp);
    out.insert(
        "p5_commit_p50_ms".into(),
        json!(percentile(&commit_ms, 0.5)),
    );
    out.insert(
        "p5_rate_per_s".into(),
        json!(changes as f64 / committed_in.as_secs_f64()),
    );
    drop(watching);
    b.stop()?;
    match std::sync::Arc::try_unwrap(a) {
        Ok(a) => a.stop()?,
        Err(_) => anyhow::bail!("P5's leader is still held after its watcher stopped"),
    }
    drop(seen_rx);
    let _ = watcher.join();
    Ok(())
}

/// Commits `changes` tags on `a` at `rate` per second on [`P5_COMMITTERS`] threads. Returns when
/// each change's commit began (by tag uuid), each commit's duration in ms, and how long it took.
fn commit_at_rate(
    a: &Node,
    changes: usize,
    rate: u64,
) -> Result<(HashMap<Uuid, Instant>, Vec<f64>, Duration)> {
    let period = Duration::from_micros(1_000_000 / rate.max(1));
    let begin = Instant::now();
    // The load is open: change `i` is due at `begin + i × period`, whether or not the change
    // before it has committed. A durable commit takes about as long as the period, so one
    // committer alone fell behind the rate; P5_COMMITTERS threads take turns.
    let committed: Vec<Result<Committed>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..P5_COMMITTERS)
            .map(|first| {
                let a = &a;
                scope.spawn(move || -> Result<Committed> {
                    let mut started = Vec::with_capacity(changes / P5_COMMITTERS + 1);
                    let mut commit_ms = Vec::with_capacity(changes / P5_COMMITTERS + 1);
                    for i in (first..changes).step_by(P5_COMMITTERS) {
                        let due = begin + period * i as u32;
                        if let Some(wait) = due.checked_duration_since(Instant::now()) {
                            std::thread::sleep(wait);
                        }
                        let tag = Tag {
                            uuid: Uuid::now_v7(),
                            name: format!("live {i}"),
                            color: None,
                            created_ms: i as i64,
                        };
                        let t0 = Instant::now();
                        started.push((tag.uuid, t0));
                        a.library().transact(|tx| {
                            tx.upsert(&tag);
                            Ok(())
                        })?;
                        commit_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
                    }
                    Ok((started, commit_ms))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a committer panicked")))
            })
            .collect()
    });
    let committed_in = begin.elapsed();
    let mut started: HashMap<Uuid, Instant> = HashMap::with_capacity(changes);
    let mut commit_ms = Vec::with_capacity(changes);
    for part in committed {
        let (s, c) = part?;
        started.extend(s);
        commit_ms.extend(c);
    }
    Ok((started, commit_ms, committed_in))
}
