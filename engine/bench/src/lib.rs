//! Keel's benchmarks (`keel bench`) and demo (`keel demo`), and the synthetic workloads they and
//! the tests share. The `keel` binary calls [`run_bench`] and [`run_demo`]; nothing here is part
//! of what a host app embeds.

mod bench;
mod bench_sync;
mod demo;
mod demo_devices;
pub mod workload;

/// Runs the benchmarks (`keel bench`): every figure beside its raw limit, as a table or as one
/// JSON object. `quick` runs smaller sizes. Returns the process exit code.
pub fn run_bench(as_json: bool, quick: bool) -> anyhow::Result<i32> {
    bench::run(as_json, quick)
}

/// Runs the demo (`keel demo`): several devices on this machine, syncing real files over QUIC
/// on loopback. Returns the process exit code.
pub fn run_demo() -> anyhow::Result<i32> {
    demo::run()
}
