//! P6: failover time.

use std::path::Path;

use anyhow::Result;
use keel_engine::{Home, Library};
use serde_json::json;

use super::sync::fast;
use super::{percentile, Figures};

/// What P6 measures.
pub(crate) struct Options {
    /// Leaders killed, one per round.
    pub(crate) rounds: usize,
}

/// P6: three `keel serve` processes; the leader is killed (`kill -9`); time until another
/// device leads a new epoch (and so accepts changes), over `rounds` kills.
pub(crate) fn run(dir: &Path, options: &Options, out: &mut Figures) -> Result<()> {
    let rounds = options.rounds;
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
