//! `keel bench`, the multi-device figures: P4 initial sync, P5 live latency, P6 failover, and
//! the raw loopback QUIC throughput and round trip they are bounded by.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::workload::LibraryWorkload;
use anyhow::{ensure, Context, Result};
use keel_engine::{CreateOptions, Event, Home, KdfParams, Library};
use keel_node::{join, JoinOptions, Node, NodeOptions};
use keel_schema::{Change, DeviceId, Tag};
use keel_transport::{DeviceMessage, Endpoint, Identity, Pins, ReplicationMessage};
use serde_bytes::ByteBuf;
use serde_json::{json, Map, Value};
use uuid::Uuid;

use crate::bench::{peak_rss_mb, percentile, reset_peak_rss};

const PASSWORD: &str = "bench";

fn fast() -> CreateOptions {
    CreateOptions {
        kdf: KdfParams::INSECURE_FAST,
    }
}

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// A library of `files` files (an Entry and a ContentIdentity each) led by a node.
fn leader_with(dir: &Path, files: usize) -> Result<Node> {
    let home = Home::new(dir.join("leader"));
    let lib = Library::create(&home, "bench", PASSWORD, fast())?;
    let mut workload = LibraryWorkload::new(lib.id().0, DeviceId([0x42; 32]), 4);
    let header = workload.header();
    commit_all(&lib, header)?;
    let mut left = files;
    while left > 0 {
        let chunk = workload.files(left.min(10_000));
        left -= chunk.len() / 2;
        commit_all(&lib, chunk)?;
    }
    lib.flush()?;
    Ok(Node::start(lib, NodeOptions::default())?)
}

fn commit_all(lib: &Library, changes: Vec<Change>) -> Result<()> {
    lib.transact(|tx| {
        for c in changes {
            tx.push(c);
        }
        Ok(())
    })?;
    Ok(())
}

fn join_blocking(home: &Home, addr: SocketAddr, code: &str) -> Result<String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    Ok(rt.block_on(join(
        home,
        JoinOptions {
            addr,
            bind: None,
            code: code.into(),
            device_name: Some("bench follower".into()),
            password: PASSWORD.into(),
            create: fast(),
            // `KEEL_P4_SNAPSHOT=0` measures the initial sync by replication alone, for comparison.
            snapshot: std::env::var("KEEL_P4_SNAPSHOT").map_or(true, |v| v != "0"),
            progress: None,
        },
    ))?)
}

/// P4: a fresh device joins a library of `files` files and syncs it whole (log stored,
/// projections built). The joining side runs in its own process so its peak RSS is its own.
pub(crate) fn p4(dir: &Path, files: usize, out: &mut Map<String, Value>) -> Result<()> {
    let files = crate::bench::size_from_env("KEEL_P4_FILES", files);
    let leader = leader_with(dir, files)?;
    // The leader's library was just written (about 800 MB): its write-back must not run
    // during the join's timing, as it would not for a library that existed before.
    crate::bench::settle();
    let log_len = leader.status().log_len;
    let invite = leader.invite(true)?;
    let child = std::process::Command::new(std::env::current_exe()?)
        .args(["bench", "--json"])
        .env("KEEL_BENCH_ONLY", "p4join")
        .env("KEEL_BENCH_CHILD", "1")
        .env("KEEL_P4_ADDR", leader.local_addr().to_string())
        .env("KEEL_P4_CODE", invite.code.as_str())
        .env("KEEL_P4_HOME", dir.join("joiner"))
        .env("KEEL_P4_LOG", log_len.to_string())
        .stderr(std::process::Stdio::inherit())
        .output()?;
    ensure!(child.status.success(), "the joining process failed");
    let Value::Object(figures) =
        serde_json::from_str::<Value>(String::from_utf8(child.stdout)?.trim())?
    else {
        anyhow::bail!("the joining process printed no JSON object");
    };
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
    for (k, v) in figures {
        if k.starts_with("p4_") && k != "p4_digest" && k != "p4_counts" {
            out.insert(k, v);
        }
    }
    out.insert("p4_entries".into(), json!(files));
    out.insert("p4_log_entries".into(), json!(log_len));
    leader.stop()?;
    Ok(())
}

/// The joining side of P4 (`KEEL_BENCH_ONLY=p4join`).
pub(crate) fn p4_join(out: &mut Map<String, Value>) -> Result<()> {
    let var = |k: &str| std::env::var(k).with_context(|| format!("{k} not set"));
    let addr: SocketAddr = var("KEEL_P4_ADDR")?.parse()?;
    let code = var("KEEL_P4_CODE")?;
    let home = Home::new(var("KEEL_P4_HOME")?);
    let log_len: u64 = var("KEEL_P4_LOG")?.parse()?;
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_env("KEEL_LOG") {
        // Diagnosing a slow sync: the joiner's log on stderr.
        let _ = tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_env_filter(filter)
            .try_init();
    }
    reset_peak_rss();
    let t = Instant::now();
    let name = join_blocking(&home, addr, &code)?;
    // Pairing and the snapshot fetch; the rest is opening, starting and catching up.
    let joined_s = t.elapsed().as_secs_f64();
    let lib = Library::open(&home, &name, PASSWORD)?;
    let node = Node::start(
        lib,
        NodeOptions {
            peers: vec![addr],
            ..NodeOptions::default()
        },
    )?;
    let deadline = Instant::now() + Duration::from_secs(600);
    // The joiner's own Device record adds one entry to the leader's log.
    let verbose = std::env::var_os("KEEL_LOG").is_some();
    let mut last_print = Instant::now();
    // Done when the joiner holds the leader's whole log, has applied it, and its projections
    // have their secondary indexes back (a catch-up loads without them; the apply that reaches
    // the leader's end, which may include the joiner's own record, builds them).
    while node.status().log_len < log_len || node.library().bulk_loading() {
        ensure!(Instant::now() < deadline, "initial sync did not finish");
        std::thread::sleep(Duration::from_millis(5));
        if verbose && last_print.elapsed() >= Duration::from_secs(1) {
            last_print = Instant::now();
            tracing::info!(
                log = node.status().log_len,
                applied = node.library().applied_lsn().0,
                "initial sync"
            );
        }
    }
    node.library().flush()?;
    let secs = t.elapsed().as_secs_f64();
    out.insert("p4_initial_sync_s".into(), json!(secs));
    out.insert("p4_join_s".into(), json!(joined_s));
    out.insert("p4_changes_per_s".into(), json!(log_len as f64 / secs));
    out.insert("p4_peak_rss_mb".into(), json!(peak_rss_mb()));
    // Then its own Device record goes to the leader and comes back sequenced.
    while node.status().log_len < log_len + 1 || node.status().offline > 0 {
        ensure!(
            Instant::now() < deadline,
            "the joiner's own record was not sequenced"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    out.insert("p4_digest".into(), json!(node.library().digest()?));
    out.insert(
        "p4_counts".into(),
        json!(format!("{:?}", node.library().status()?.counts)),
    );
    node.stop()?;
    Ok(())
}

/// P5: commit on the leader at about 1000 changes/s; latency until the row is in the
/// follower's projection (its apply event).
/// Threads committing P5's changes in turn (see the comment in [`p5`]).
const P5_COMMITTERS: usize = 2;

/// What one P5 committer did: each change's tag uuid with when its commit began, and each
/// commit's duration in ms.
type Committed = (Vec<(Uuid, Instant)>, Vec<f64>);

pub(crate) fn p5(dir: &Path, changes: usize, out: &mut Map<String, Value>) -> Result<()> {
    let home = Home::new(dir.join("p5-a"));
    // KEEL_P5_LEADER_COMMITS=0: the leader's commits go through its offline journal (the path
    // before the core sequenced them itself), for comparison.
    let leader_commits = std::env::var("KEEL_P5_LEADER_COMMITS").map_or(true, |v| v != "0");
    let a = Node::start(
        Library::create(&home, "bench", PASSWORD, fast())?,
        NodeOptions {
            leader_commits,
            ..NodeOptions::default()
        },
    )?;
    let invite = a.invite(true)?;
    let home_b = Home::new(dir.join("p5-b"));
    let name = join_blocking(&home_b, a.local_addr(), invite.code.as_str())?;
    let b = Node::start(
        Library::open(&home_b, &name, PASSWORD)?,
        NodeOptions {
            peers: vec![a.local_addr()],
            ..NodeOptions::default()
        },
    )?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while b.status().log_len < a.status().log_len || b.status().leader.is_none() {
        ensure!(Instant::now() < deadline, "the follower did not catch up");
        std::thread::sleep(Duration::from_millis(10));
    }
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
    // 1000 changes/s unless KEEL_P5_RATE says otherwise (for looking into latency vs load).
    let rate: u64 = std::env::var("KEEL_P5_RATE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let period = Duration::from_micros(1_000_000 / rate.max(1));
    let begin = Instant::now();
    // The load is open: change `i` is due at `begin + i × period`, whether or not the change
    // before it has committed. A durable commit takes about as long as the period, so one
    // committer alone fell behind (852-999 changes/s); P5_COMMITTERS threads take turns.
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
    b.stop()?;
    a.stop()?;
    drop(seen_rx);
    let _ = watcher.join();
    Ok(())
}

/// P6: three `keel serve` processes; the leader is killed (`kill -9`); time until another
/// device leads a new epoch (and so accepts changes), over `rounds` kills.
pub(crate) fn p6(dir: &Path, rounds: usize, out: &mut Map<String, Value>) -> Result<()> {
    // KEEL_P6_ROUNDS overrides the number of rounds (for looking at the spread).
    let rounds = crate::bench::size_from_env("KEEL_P6_ROUNDS", rounds);
    let mut times = Vec::with_capacity(rounds);
    for round in 0..rounds {
        let root = dir.join(format!("p6-{round}"));
        let home = Home::new(root.join("a"));
        Library::create(&home, "demo", crate::demo::PASSWORD, fast())?.close()?;
        times.push(crate::demo_devices::failover_ms(&root)?);
    }
    out.insert("p6_failover_rounds_ms".into(), json!(times));
    times.sort_by(f64::total_cmp);
    out.insert("p6_failover_p50_ms".into(), json!(percentile(&times, 0.5)));
    out.insert(
        "p6_failover_max_ms".into(),
        json!(times.last().copied().unwrap_or(0.0)),
    );
    Ok(())
}

/// Raw loopback QUIC with the same endpoints: bulk throughput and round-trip time.
pub(crate) fn quic_raw(out: &mut Map<String, Value>) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let a = Identity::generate("a")?;
        let b = Identity::generate("b")?;
        let pins_a = Pins::new();
        pins_a.pin(b.device());
        let pins_b = Pins::new();
        pins_b.pin(a.device());
        let server = Endpoint::bind(&a, loopback(), pins_a)?;
        let client = Endpoint::bind(&b, loopback(), pins_b)?;
        let addr = server.local_addr()?;
        let accept = tokio::spawn(async move {
            let conn = server.accept().await.context("no connection")??;
            // Echo small messages; count bytes of large ones.
            let mut bytes = 0usize;
            loop {
                match conn.recv().await {
                    Ok(DeviceMessage::Replication(ReplicationMessage::Push { changes }))
                        if changes.len() > 1 =>
                    {
                        bytes += changes.iter().map(|c| c.len()).sum::<usize>();
                        if bytes >= 256 << 20 {
                            conn.send(&DeviceMessage::Replication(ReplicationMessage::Push {
                                changes: Vec::new(),
                            }))
                            .await?;
                        }
                    }
                    Ok(m) => conn.send(&m).await?,
                    Err(_) => break,
                }
            }
            Ok::<_, anyhow::Error>(server)
        });
        let conn = client.connect(addr).await?;
        let ping = DeviceMessage::Replication(ReplicationMessage::Push {
            changes: vec![ByteBuf::from(vec![1u8; 64])],
        });
        let mut rtts = Vec::new();
        for _ in 0..300 {
            let t = Instant::now();
            conn.send(&ping).await?;
            conn.recv().await?;
            rtts.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        rtts.sort_by(f64::total_cmp);
        let block = DeviceMessage::Replication(ReplicationMessage::Push {
            changes: (0..16)
                .map(|_| ByteBuf::from(vec![7u8; 64 << 10]))
                .collect(),
        });
        let t = Instant::now();
        for _ in 0..256 {
            conn.send(&block).await?;
        }
        conn.recv().await?;
        let secs = t.elapsed().as_secs_f64();
        out.insert("quic_rtt_p50_ms".into(), json!(percentile(&rtts, 0.5)));
        out.insert("quic_mb_per_s".into(), json!(256.0 / secs));
        conn.close("done");
        client.close();
        let _ = accept.await;
        Ok::<_, anyhow::Error>(())
    })
}
