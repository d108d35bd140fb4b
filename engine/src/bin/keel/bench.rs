//! Benchmarks (`keel bench`).

/// Runs the benchmarks.
pub(crate) fn run(_json: bool, _quick: bool) -> anyhow::Result<i32> {
    anyhow::bail!("bench is not built yet")
}
