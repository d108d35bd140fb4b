//! Crash test: a child process commits in a loop and prints each acknowledged change id; the
//! parent kills it with SIGKILL at random moments. Every printed id must be in the journal, and the
//! healed projection must equal a fresh replay.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use keel_engine::{Home, Library};
use keel_schema::ChangeId;
use keel_tests::{create_library, PASSWORD};
use rand::{RngExt, SeedableRng};
use uuid::Uuid;

/// Kills per run: 50 by default, 500 in the full tier.
fn kills() -> usize {
    if keel_tests::full_tier() {
        500
    } else {
        50
    }
}

#[test]
fn kill_9_loses_nothing_acknowledged() {
    let seed: u64 = std::env::var("KEEL_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    eprintln!("crash test seed {seed} (set KEEL_CRASH_SEED to reproduce the timing)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().expect("tempdir");
    let (home, lib) = create_library(dir.path(), "crash").expect("creates");
    lib.close().expect("closes");
    let child_bin = env!("CARGO_BIN_EXE_crash_child");
    let mut acknowledged: Vec<ChangeId> = Vec::new();
    let kills = kills();
    for round in 0..kills {
        let mut child = Command::new(child_bin)
            .arg(home.root())
            .arg("crash")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("child starts");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel::<String>();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        // Wait until the child is committing, then let it run a random while.
        let ready = rx.recv_timeout(Duration::from_secs(30));
        assert_eq!(
            ready.as_deref(),
            Ok("ready"),
            "round {round}: child did not start"
        );
        let run_for = Duration::from_micros(rng.random_range(0..40_000));
        let until = Instant::now() + run_for;
        while Instant::now() < until {
            std::thread::yield_now();
        }
        child.kill().expect("SIGKILL");
        let status = child.wait().expect("child reaped");
        assert!(
            !status.success(),
            "round {round}: the child was killed, not finished"
        );
        reader.join().expect("reader thread");
        for line in rx.try_iter() {
            // Only whole lines reach here; a line is printed after its commit returned Ok.
            let id = Uuid::parse_str(&line)
                .unwrap_or_else(|_| panic!("round {round}: bad line {line:?}"));
            acknowledged.push(ChangeId(id));
        }
    }
    assert!(
        acknowledged.len() > kills,
        "the children acknowledged only {} changes",
        acknowledged.len()
    );
    let lib =
        Library::open(&Home::new(home.root()), "crash", PASSWORD).expect("reopens after crashes");
    let durable = lib.sync_state().change_ids().expect("journal readable");
    for id in &acknowledged {
        assert!(
            durable.contains(id),
            "acknowledged change {id} is missing (seed {seed})"
        );
    }
    eprintln!(
        "crash test: {kills} kills, {} acknowledged changes all present",
        acknowledged.len()
    );
    let (report, digest) = lib.verify().expect("verify runs");
    assert!(
        report.faults.is_empty(),
        "journal faults after crashes: {:?}",
        report.faults
    );
    assert!(
        digest.is_ok(),
        "healed projection differs from a fresh replay: {digest:?}"
    );
    let status = lib.status().expect("status");
    assert!(status.counts.tags as usize >= acknowledged.len());
}

/// Node kills per run: 100 by default (what CI runs), 1,000 in the full tier.
fn node_kills() -> usize {
    if keel_tests::full_tier() {
        1_000
    } else {
        100
    }
}

/// Runs `crash_child HOME lib replicate ADDR` for a random while, kills it with SIGKILL, and
/// returns the tags it printed as acknowledged.
fn replicate_and_kill(home: &Home, leader: std::net::SocketAddr, run_for: Duration) -> Vec<Uuid> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_crash_child"))
        .arg(home.root())
        .arg("lib")
        .arg("replicate")
        .arg(leader.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("child starts");
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let ready = rx.recv_timeout(Duration::from_secs(30));
    assert_eq!(ready.as_deref(), Ok("ready"), "the node did not start");
    std::thread::sleep(run_for);
    child.kill().expect("SIGKILL");
    child.wait().expect("child reaped");
    reader.join().expect("reader thread");
    rx.try_iter()
        .filter_map(|line| line.strip_prefix("tag ").map(str::to_string))
        .map(|id| Uuid::parse_str(&id).expect("a uuid"))
        .collect()
}

/// `kill -9` of a node that writes and replicates (a child process following a leader in
/// this one, both committing), at random moments: after every kill its library opens, holds
/// every tag it acknowledged, and its projections equal a replay of its journal; at the end it
/// runs again and every tag it acknowledged reaches the leader.
#[test]
fn kill_9_of_a_replicating_node_loses_nothing_acknowledged() {
    use keel_engine::Tag;
    use keel_tests::cluster;
    let seed: u64 = std::env::var("KEEL_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    eprintln!("node soak seed {seed} (set KEEL_CRASH_SEED to reproduce the timing)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().expect("tempdir");
    let (_ha, a) = cluster::founder(dir.path(), "a", "lib").expect("founds");
    let (hb, b) = cluster::joiner(dir.path(), "b", &a).expect("joins");
    cluster::converge(&[&a, &b], Duration::from_secs(30)).expect("converges");
    b.stop().expect("stops");
    let kills = node_kills();
    let mut acknowledged = Vec::new();
    for round in 0..kills {
        a.library()
            .transact(|tx| {
                tx.upsert(&keel_tests::tag(&format!("leader {round}")));
                Ok(())
            })
            .expect("the leader commits");
        let run_for = Duration::from_millis(rng.random_range(5..60));
        let acked = replicate_and_kill(&hb, a.local_addr(), run_for);
        let lib = Library::open(&hb, "lib", PASSWORD)
            .unwrap_or_else(|e| panic!("round {round}: does not open after a kill: {e}"));
        for id in &acked {
            assert!(
                lib.get::<Tag>(*id).expect("reads").is_some(),
                "round {round}: acknowledged tag {id} is missing (seed {seed})"
            );
        }
        let (report, digest) = lib.verify().expect("verifies");
        assert!(
            report.faults.is_empty(),
            "round {round}: {:?}",
            report.faults
        );
        digest.unwrap_or_else(|e| panic!("round {round}: projections differ from a replay: {e}"));
        lib.close().expect("closes");
        acknowledged.extend(acked);
    }
    let lib = Library::open(&hb, "lib", PASSWORD).expect("opens");
    let b = keel_node::Node::start(lib, cluster::options(vec![a.local_addr()])).expect("starts");
    cluster::converge(&[&a, &b], Duration::from_secs(60)).expect("converges");
    for id in &acknowledged {
        assert!(
            a.library().get::<Tag>(*id).expect("reads").is_some(),
            "tag {id} acknowledged on b never reached the leader (seed {seed})"
        );
    }
    assert!(
        acknowledged.len() > kills,
        "{} acknowledged",
        acknowledged.len()
    );
    eprintln!(
        "node soak: {kills} kills of a replicating node, {} acknowledged tags all kept and replicated, projections equal a replay after every kill",
        acknowledged.len()
    );
}
