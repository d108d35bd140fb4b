//! Prometheus metrics of a node (`/metrics` on the inspector's listener), in the text format.
//! Every series carries the library's name as `library`; per-device series add `peer` (the
//! device's short id) and per-job ones `job` and `kind`. Rates (commits, applies, bytes) are
//! counters or positions that Prometheus' `rate()` turns into speeds.

use std::fmt::Write;

use keel_engine::JobState;
use keel_node::Node;

/// The node's metrics in Prometheus' text format (version 0.0.4).
pub(crate) fn render(node: &Node) -> String {
    let library = node.library();
    let status = node.status();
    let mut out = Metrics {
        text: String::new(),
        library: escape(library.name()),
    };
    out.one(
        "keel_log_length",
        "gauge",
        "Last position of this device's log.",
        status.log_len,
    );
    out.one(
        "keel_log_compacted_to",
        "gauge",
        "Position the log is compacted to (entries up to it dropped).",
        status.compacted_to,
    );
    out.one(
        "keel_applied_position",
        "gauge",
        "Last log position applied to the projections (its rate is the apply rate).",
        library.sync_state().applied_lsn().0,
    );
    if let Ok(made) = library.sync_state().own_changes() {
        out.one(
            "keel_commits_total",
            "counter",
            "Changes this device made.",
            made,
        );
    }
    out.one(
        "keel_offline_pending",
        "gauge",
        "This device's changes waiting for a leader.",
        status.offline,
    );
    out.one(
        "keel_epoch",
        "gauge",
        "The highest epoch accepted.",
        status.epoch.counter,
    );
    out.one(
        "keel_elections_total",
        "counter",
        "Epoch changes seen since the node started.",
        status.elections,
    );
    out.one(
        "keel_leading",
        "gauge",
        "1 while this device leads.",
        u64::from(status.role.as_str() == "leader"),
    );
    out.one(
        "keel_storage_failed",
        "gauge",
        "1 while the journal cannot be written (nothing is acknowledged).",
        u64::from(status.storage_failed),
    );
    let (sent, received) = node.wire_bytes();
    out.one(
        "keel_wire_sent_bytes_total",
        "counter",
        "UDP bytes sent by sync sessions since the node started.",
        sent,
    );
    out.one(
        "keel_wire_received_bytes_total",
        "counter",
        "UDP bytes received by sync sessions since the node started.",
        received,
    );
    peers(&mut out, &status);
    jobs(&mut out, node);
    out.text
}

fn peers(out: &mut Metrics, status: &keel_node::NodeStatus) {
    out.head(
        "keel_peer_connected",
        "gauge",
        "1 while a session with the device is up.",
    );
    for peer in &status.peers {
        out.labelled(
            "keel_peer_connected",
            &[("peer", &short(&peer.device_id))],
            u64::from(peer.connected),
        );
    }
    out.head(
        "keel_peer_lag_entries",
        "gauge",
        "Entries of this leader's log the device has not acknowledged storing.",
    );
    for peer in &status.peers {
        if let Some(stored) = peer.stored {
            out.labelled(
                "keel_peer_lag_entries",
                &[("peer", &short(&peer.device_id))],
                status.log_len.saturating_sub(stored),
            );
        }
    }
    out.head(
        "keel_peer_last_seen_seconds",
        "gauge",
        "When a session with the device was last up (Unix time).",
    );
    for peer in &status.peers {
        if let Some(ms) = peer.last_seen_ms {
            out.labelled(
                "keel_peer_last_seen_seconds",
                &[("peer", &short(&peer.device_id))],
                ms / 1000,
            );
        }
    }
    out.head(
        "keel_join_file_sent_bytes",
        "gauge",
        "Bytes of the projection file sent to a device joining now (its initial sync).",
    );
    for join in &status.joining {
        out.labelled(
            "keel_join_file_sent_bytes",
            &[("peer", &short(&join.device_id))],
            join.file_sent,
        );
    }
}

fn jobs(out: &mut Metrics, node: &Node) {
    let Ok(jobs) = node.library().jobs() else {
        return;
    };
    let open: Vec<_> = jobs
        .iter()
        .filter(|j| matches!(j.state, JobState::Running | JobState::Paused))
        .collect();
    for (name, help, value) in [
        (
            "keel_job_done",
            "Items a running or paused job has done.",
            (|p: &keel_engine::Progress| p.done) as fn(&keel_engine::Progress) -> u64,
        ),
        (
            "keel_job_total",
            "Items a running or paused job has to do.",
            |p| p.total,
        ),
    ] {
        out.head(name, "gauge", help);
        for job in &open {
            let kind = serde_json::to_value(&job.kind)
                .ok()
                .and_then(|v| v.get("kind").and_then(|k| k.as_str()).map(String::from))
                .unwrap_or_default();
            let id = job.id.to_string();
            out.labelled(name, &[("job", &id), ("kind", &kind)], value(&job.progress));
        }
    }
}

fn short(hex: &str) -> String {
    hex.chars().take(8).collect()
}

/// Escapes a label value (backslash, quote, newline).
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

struct Metrics {
    text: String,
    library: String,
}

impl Metrics {
    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn one(&mut self, name: &str, kind: &str, help: &str, value: u64) {
        self.head(name, kind, help);
        self.labelled(name, &[], value);
    }

    fn labelled(&mut self, name: &str, labels: &[(&str, &str)], value: u64) {
        let _ = write!(self.text, "{name}{{library=\"{}\"", self.library);
        for (key, label) in labels {
            let _ = write!(self.text, ",{key}=\"{}\"", escape(label));
        }
        let _ = writeln!(self.text, "}} {value}");
    }
}
