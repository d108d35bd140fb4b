//! What a running node reports (`keel status --json` adds these fields).

use keel_replication::ElectionRole;
use keel_schema::Epoch;
use serde::{Serialize, Serializer};

/// Serializes an epoch as `{counter, device}`, the device in hex.
fn epoch_fields<S: Serializer>(epoch: &Epoch, serializer: S) -> Result<S::Ok, S::Error> {
    #[derive(Serialize)]
    struct Fields {
        counter: u64,
        device: String,
    }
    Fields {
        counter: epoch.counter,
        device: epoch.device.to_hex(),
    }
    .serialize(serializer)
}

/// Serializes a role by its name (`leader`, `follower`, `candidate`, `alone`).
fn role_name<S: Serializer>(role: &ElectionRole, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(role.as_str())
}

/// One peer of a node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "typescript", derive(ts_rs::TS))]
pub struct PeerStatus {
    /// Its device id, hex.
    pub device_id: String,
    /// Its last known address.
    pub addr: Option<String>,
    /// Whether a session with it is up.
    pub connected: bool,
    /// What it last acknowledged applying, per sync domain (reported to its leader).
    pub applied: Option<AppliedDomains>,
    /// How far it acknowledged storing this node's log (leading, this epoch).
    pub stored: Option<u64>,
    /// When a session with it was last up (ms since the Unix epoch), since this node started.
    pub last_seen_ms: Option<u64>,
    /// When it last held this leader's whole log (ms since the Unix epoch; leading, since this
    /// node started): how long it has been behind, beside `stored`.
    pub caught_up_ms: Option<u64>,
}

/// A device this node is sending its initial sync to (a snapshot join): how far it is.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "typescript", derive(ts_rs::TS))]
pub struct JoiningStatus {
    /// The joining device's id, hex.
    pub device_id: String,
    /// Bytes of the projection file sent.
    pub file_sent: u64,
    /// Bytes of the projection file in all.
    pub file_bytes: u64,
    /// The last log position sent.
    pub log_sent: u64,
    /// The log position the join sends up to.
    pub log_end: u64,
    /// When the join began (ms since the Unix epoch).
    pub started_ms: u64,
}

/// Applied log positions per sync domain.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "typescript", derive(ts_rs::TS))]
pub struct AppliedDomains {
    /// Index domain (devices, locations, entries, entry-scoped metadata).
    pub index: u64,
    /// Content domain (contents, content-scoped metadata, tags).
    pub content: u64,
}

/// A running node's replication state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "typescript", derive(ts_rs::TS))]
pub struct NodeStatus {
    /// Its part in the election.
    #[serde(serialize_with = "role_name")]
    #[cfg_attr(
        feature = "typescript",
        ts(type = "\"leader\" | \"follower\" | \"candidate\" | \"alone\"")
    )]
    pub role: ElectionRole,
    /// The highest epoch accepted.
    #[serde(serialize_with = "epoch_fields")]
    #[cfg_attr(
        feature = "typescript",
        ts(type = "{ counter: number, device: string }")
    )]
    pub epoch: Epoch,
    /// The leader followed (itself when leading), hex.
    pub leader: Option<String>,
    /// Known peers.
    pub peers: Vec<PeerStatus>,
    /// Devices receiving their initial sync from this node now (joining).
    pub joining: Vec<JoiningStatus>,
    /// This device's changes not yet in the log.
    pub offline: u64,
    /// The log's last position: its entries (changes and epoch barriers), the compacted ones
    /// included.
    pub log_len: u64,
    /// The compaction position: the log up to it was dropped (0: never compacted).
    pub compacted_to: u64,
    /// How far the log may be compacted as far as replication knows: leading, the least
    /// position every other device of the library acknowledged this epoch (0 if one has not);
    /// following, the leader's compaction position.
    pub compactable: u64,
    /// Leading: the least clock floor of every device of the library this epoch (see
    /// `Replica::horizon`), before which tombstones may be collected; `None` otherwise, or
    /// while a device has not reported one (a device away since this epoch began holds it).
    #[cfg_attr(
        feature = "typescript",
        ts(type = "{ ms: number, counter: number } | null")
    )]
    pub horizon: Option<keel_replication::wire::ClockFloor>,
    /// Leading: the devices (hex ids) the horizon waits for, which have not reported a clock
    /// floor this epoch: away, or paired and not joined yet. Empty otherwise. Revoking a device
    /// that will not come back lets collection go on.
    #[serde(default)]
    pub horizon_waits_for: Vec<String>,
    /// The bound of the last horizon this node appended (see `append_horizon`).
    #[serde(skip)]
    #[cfg_attr(feature = "typescript", ts(skip))]
    pub horizon_appended: Option<keel_replication::wire::ClockFloor>,
    /// Non-zero when this device's log cannot continue its leader's: the leader compacted up to
    /// this position, which this device lacks (or holds with another history). Replication is
    /// stopped until it has backfilled from the leader's snapshot (a `Backfill` job).
    pub behind_compaction: u64,
    /// The journal's storage failed and could not be opened again yet: replication is stopped
    /// (nothing is stored, so nothing is acknowledged) and commits are refused; the node tries
    /// again by itself and goes on once the disk works.
    pub storage_failed: bool,
    /// The log this node found on disk when it started is still being read back for damage
    /// (see [`crate::NodeOptions::check_log_at_start`]): until it is, this device does not
    /// stand for election.
    pub log_unchecked: bool,
    /// Where this node listens.
    pub listen: String,
    /// Epoch changes this node saw since it started (elections won by anyone, and a damaged
    /// leader's step down).
    pub elections: u64,
    /// Devices with a session up, hex (also shown per peer in `peers`).
    #[serde(skip)]
    pub connected: Vec<String>,
    /// Applied positions followers acknowledged, by device hex (shown per peer in `peers`).
    #[serde(skip)]
    pub acknowledged: Vec<(String, AppliedDomains)>,
    /// Log positions followers acknowledged storing, by device hex (shown per peer in `peers`).
    #[serde(skip)]
    pub stored: Vec<(String, u64)>,
    /// When each device's session was last up, by device hex (shown per peer in `peers`).
    #[serde(skip)]
    pub last_seen: Vec<(String, u64)>,
    /// When each follower last held the whole log, by device hex (shown per peer in `peers`).
    #[serde(skip)]
    pub caught_up: Vec<(String, u64)>,
}
