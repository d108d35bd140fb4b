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
