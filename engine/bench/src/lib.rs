//! Keel's benchmarks (`keel bench`) and demo (`keel demo`), and the synthetic workloads they and
//! the tests share. The `keel` binary calls [`run_bench`] and [`run_demo`]; nothing here is part
//! of what a host app embeds.

mod bench;
mod demo;
mod demo_devices;
pub mod workload;

/// What `keel bench` runs. The defaults are the full run; each benchmark is a module of
/// `bench/` with its own options, filled from these.
#[derive(Clone, Debug, Default)]
pub struct BenchOptions {
    /// Print one JSON object instead of a table.
    pub json: bool,
    /// Smaller sizes (under five minutes).
    pub quick: bool,
    /// Only the steps whose name starts with this (`p1` … `p8`, `quic`, `watch`, `merge`,
    /// `push`; `scale` runs only when named whole).
    pub only: Option<String>,
    /// Run this one step in this process and print its figures as JSON (what `keel bench`
    /// runs each step as, so that each peak RSS is its own).
    pub step: Option<String>,
    /// Files in P4's library (default: 1,000,000; 100,000 with `quick`).
    pub p4_files: Option<usize>,
    /// P4 joins by replaying the log instead of receiving a projection snapshot (the older
    /// path, for comparison).
    pub p4_replication_only: bool,
    /// P5's load in changes per second (default 1,000).
    pub p5_rate: Option<u64>,
    /// P5's leader commits through its offline journal instead of sequencing them itself (the
    /// older path, for comparison).
    pub p5_through_offline_journal: bool,
    /// Started on P5's leader before the load and dropped after it: the `keel` command opens
    /// its inspector there, with a browser on it (`--p5-inspector`).
    pub p5_inspector: Option<Observer>,
    /// P6's rounds, one leader killed in each (default 5; 2 with `quick`).
    pub p6_rounds: Option<usize>,
    /// Files in P7's library (default 500,000; 100,000 with `quick`).
    pub p7_files: Option<usize>,
    /// Files in the scale run's library (`--only scale`; default 1,000,000, 100,000 with
    /// `quick`).
    pub scale_files: Option<usize>,
}

impl BenchOptions {
    /// The arguments of `keel bench` that carry these options to a step's process (all but
    /// `json`, `only` and `step`).
    fn step_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if self.quick {
            args.push("--quick".to_string());
        }
        if self.p4_replication_only {
            args.push("--p4-replication-only".into());
        }
        if self.p5_through_offline_journal {
            args.push("--p5-through-offline-journal".into());
        }
        if self.p5_inspector.is_some() {
            args.push("--p5-inspector".into());
        }
        let sizes = [
            ("--p4-files", self.p4_files.map(|n| n as u64)),
            ("--p5-rate", self.p5_rate),
            ("--p6-rounds", self.p6_rounds.map(|n| n as u64)),
            ("--p7-files", self.p7_files.map(|n| n as u64)),
            ("--scale-files", self.scale_files.map(|n| n as u64)),
        ];
        for (flag, value) in sizes {
            if let Some(value) = value {
                args.push(flag.into());
                args.push(value.to_string());
            }
        }
        args
    }
}

/// Something watching a node while a benchmark runs: called with the node, it returns what
/// keeps watching until dropped.
#[derive(Clone)]
pub struct Observer(pub std::sync::Arc<Watch>);

/// What an [`Observer`] calls.
pub type Watch =
    dyn Fn(std::sync::Arc<keel_node::Node>) -> anyhow::Result<Box<dyn std::any::Any>> + Send + Sync;

impl std::fmt::Debug for Observer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Observer")
    }
}

/// What `keel demo` runs.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// Files in the generated tree.
    pub files: usize,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self { files: 3000 }
    }
}

/// Runs the benchmarks (`keel bench`): every figure beside its raw limit, as a table or as one
/// JSON object. Returns the process exit code.
pub fn run_bench(options: &BenchOptions) -> anyhow::Result<i32> {
    bench::run(options)
}

/// Runs the demo (`keel demo`): several devices on this machine, syncing real files over QUIC
/// on loopback. Returns the process exit code.
pub fn run_demo(options: &DemoOptions) -> anyhow::Result<i32> {
    demo::run(options)
}
