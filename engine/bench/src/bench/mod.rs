//! `keel bench`: each figure measured next to its raw limit in the same run. One module per
//! figure, each with its options; this module runs them, each in its own process (so each peak
//! RSS is its own step's), and prints the figures.

mod backfill;
mod merge;
mod p1;
mod p2;
mod p3;
mod p4;
mod p5;
mod p6;
mod p7;
mod p8;
mod push;
mod quic;
mod relay;
mod scale;
mod sync;
mod watch;

use std::path::Path;

use anyhow::Result;
use keel_journal::{CommitRoute, Journal, JournalOptions, LibraryKey};
use keel_schema::{Change, ChangeId, DeviceId, Epoch, LibraryId, Tag};
use serde_json::{json, Map, Value};
use uuid::Uuid;

use crate::BenchOptions;

/// The figures of a run, by name (`keel bench --json` prints them as one object).
pub(crate) type Figures = Map<String, Value>;

/// The steps, in the order they run.
const STEPS: [&str; 12] = [
    "p1", "p2", "p3", "p4", "p5", "p6", "p7", "p8", "quic", "watch", "merge", "push",
];

/// Steps that run only when named whole (`--only scale`): not part of a full run.
const NAMED_STEPS: [&str; 1] = ["scale"];

/// The sizes of a full or a quick run.
struct Sizes {
    p1_commits: usize,
    p2_changes: usize,
    p3_files: usize,
    p4_files: usize,
    p5_changes: usize,
    p6_rounds: usize,
    p7_files: usize,
    p8_files: usize,
    watch_samples: usize,
    watch_burst: usize,
    merge_records: usize,
    push_changes: usize,
    scale_files: usize,
}

impl Sizes {
    fn of(options: &BenchOptions) -> Self {
        let base = if options.quick {
            Sizes {
                p1_commits: 300,
                p2_changes: 200_000,
                p3_files: 50_000,
                p4_files: 100_000,
                p5_changes: 1_000,
                p6_rounds: 2,
                p7_files: 100_000,
                p8_files: 10_000,
                watch_samples: 30,
                watch_burst: 2_000,
                merge_records: 20_000,
                push_changes: 5_000,
                scale_files: 100_000,
            }
        } else {
            Sizes {
                p1_commits: 2000,
                p2_changes: 1_000_000,
                p3_files: 250_000,
                p4_files: 1_000_000,
                p5_changes: 5_000,
                p6_rounds: 5,
                p7_files: 500_000,
                p8_files: 100_000,
                watch_samples: 100,
                watch_burst: 10_000,
                merge_records: 100_000,
                push_changes: 65_000,
                scale_files: 1_000_000,
            }
        };
        Sizes {
            p4_files: options.p4_files.unwrap_or(base.p4_files),
            p6_rounds: options.p6_rounds.unwrap_or(base.p6_rounds),
            p7_files: options.p7_files.unwrap_or(base.p7_files),
            scale_files: options.scale_files.unwrap_or(base.scale_files),
            ..base
        }
    }
}

/// Runs the benchmarks as `options` says: every step (or those `only` names), each in a child
/// process, or the one `step` in this process.
pub(crate) fn run(options: &BenchOptions) -> Result<i32> {
    match &options.step {
        Some(step) => run_step(step, options),
        None => run_all(options),
    }
}

fn run_all(options: &BenchOptions) -> Result<i32> {
    let mut out = Figures::new();
    out.insert("quick".into(), json!(options.quick));
    let only = options.only.as_deref().unwrap_or_default().to_lowercase();
    let named = NAMED_STEPS.into_iter().filter(|s| *s == only);
    for step in STEPS
        .into_iter()
        .filter(|s| s.starts_with(&only))
        .chain(named)
    {
        if !options.json {
            eprintln!("running {step}…");
        }
        // The last step's files are gone, but not always its disk work: start each step with
        // nothing left to write back.
        settle();
        let child = std::process::Command::new(std::env::current_exe()?)
            .args(["bench", "--json", "--step", step])
            .args(options.step_args())
            .stderr(std::process::Stdio::inherit())
            .output()?;
        anyhow::ensure!(child.status.success(), "benchmark step {step} failed");
        let text = String::from_utf8(child.stdout)?;
        let Value::Object(figures) = serde_json::from_str::<Value>(text.trim())? else {
            anyhow::bail!("benchmark step {step} printed no JSON object");
        };
        out.extend(figures);
    }
    print_figures(&out, options.json);
    Ok(0)
}

/// Runs one step here and prints its figures as one JSON object.
fn run_step(step: &str, options: &BenchOptions) -> Result<i32> {
    child_tracing();
    let mut out = Figures::new();
    let sizes = Sizes::of(options);
    let dir = tempfile::tempdir()?;
    // `KEEL_BENCH_KEEP=1` keeps the step's folder (its path is logged) to inspect the files.
    let dir = if std::env::var_os("KEEL_BENCH_KEEP").is_some() {
        let kept = dir.keep();
        eprintln!("{step}: files kept in {}", kept.display());
        kept
    } else {
        dir.path().to_path_buf()
    };
    let dir = dir.as_path();
    match step {
        "p1" => p1::run(
            dir,
            &p1::Options {
                commits: sizes.p1_commits,
            },
            &mut out,
        )?,
        "p2" => p2::run(
            dir,
            &p2::Options {
                changes: sizes.p2_changes,
            },
            &mut out,
        )?,
        "p3" => p3::run(
            dir,
            &p3::Options {
                files: sizes.p3_files,
            },
            &mut out,
        )?,
        "p4" => p4::run(
            dir,
            &p4::Options {
                files: sizes.p4_files,
                snapshot: !options.p4_replication_only,
            },
            &mut out,
        )?,
        p4::JOIN_STEP => p4::run_join(&mut out)?,
        backfill::BACKFILL_STEP => backfill::run_backfill(&mut out)?,
        "p5" => p5::run(
            dir,
            &p5::Options {
                changes: sizes.p5_changes,
                rate: options.p5_rate.unwrap_or(1000),
                leader_commits: !options.p5_through_offline_journal,
                observer: options.p5_inspector.clone(),
            },
            &mut out,
        )?,
        "p6" => p6::run(
            dir,
            &p6::Options {
                rounds: sizes.p6_rounds,
            },
            &mut out,
        )?,
        "p7" => p7::run(
            dir,
            &p7::Options {
                files: sizes.p7_files,
            },
            &mut out,
        )?,
        "p8" => p8::run(
            dir,
            &p8::Options {
                files: sizes.p8_files,
            },
            &mut out,
        )?,
        "quic" => quic::run(&mut out)?,
        "watch" => watch::run(
            dir,
            &watch::Options {
                samples: sizes.watch_samples,
                burst: sizes.watch_burst,
            },
            &mut out,
        )?,
        "merge" => merge::run(
            dir,
            &merge::Options {
                records: sizes.merge_records,
            },
            &mut out,
        )?,
        "scale" => scale::run(
            dir,
            &scale::Options {
                files: sizes.scale_files,
            },
            &mut out,
        )?,
        "push" => push::run(
            dir,
            &push::Options {
                changes: sizes.push_changes,
            },
            &mut out,
        )?,
        other => anyhow::bail!("no benchmark step {other:?} (steps: {})", STEPS.join(", ")),
    }
    print_figures(&out, true);
    Ok(0)
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
            existing: false,
        },
    )?;
    Ok((journal, key, library))
}

/// Writes dirty pages out (best effort), so that the kernel's write-back of what a step just
/// wrote does not run during the next step's timing.
/// Runs `keel bench --json --step STEP` in a new process with `task` as JSON on its stdin
/// (nothing secret on its command line), and returns the figures it printed.
pub(crate) fn child_figures(
    step: &str,
    task: &impl serde::Serialize,
) -> Result<serde_json::Map<String, serde_json::Value>> {
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .args(["bench", "--json", "--step", step])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        use std::io::Write;
        stdin.write_all(serde_json::to_string(task)?.as_bytes())?;
    }
    let child = child.wait_with_output()?;
    anyhow::ensure!(child.status.success(), "the {step} process failed");
    match serde_json::from_str(String::from_utf8(child.stdout)?.trim())? {
        serde_json::Value::Object(figures) => Ok(figures),
        _ => anyhow::bail!("the {step} process printed no JSON object"),
    }
}

/// In a child process of a step: its log on stderr when `KEEL_LOG` says what to show
/// (diagnosing a slow sync).
pub(crate) fn child_tracing() {
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_env("KEEL_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_env_filter(filter)
            .try_init();
    }
}

pub(crate) fn settle() {
    let _ = std::process::Command::new("sync").status();
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
