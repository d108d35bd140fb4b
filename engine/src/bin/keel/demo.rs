//! The demo (`keel demo`).

/// Runs the demo.
pub(crate) fn run() -> anyhow::Result<i32> {
    anyhow::bail!("demo is not built yet")
}
