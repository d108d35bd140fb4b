//! What a running node reports (`keel status --json` adds these fields).

use keel_schema::Epoch;
use serde::{Deserialize, Serialize};

/// An epoch in JSON: `{counter, device}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochJson {
    /// The counter.
    pub counter: u64,
    /// The device that leads (led) it, hex.
    pub device: String,
}

impl From<Epoch> for EpochJson {
    fn from(epoch: Epoch) -> Self {
        Self {
            counter: epoch.counter,
            device: epoch.device.to_hex(),
        }
    }
}

/// One peer of a node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatus {
    /// Its device id, hex.
    pub device_id: String,
    /// Its last known address.
    pub addr: Option<String>,
    /// Whether a session with it is up.
    pub connected: bool,
    /// What it last acknowledged applying, per sync domain (reported to its leader).
    pub applied: Option<DomainsJson>,
}

/// Applied log positions per sync domain.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainsJson {
    /// Index domain (devices, locations, entries, entry-scoped metadata).
    pub index: u64,
    /// Content domain (contents, content-scoped metadata, tags).
    pub content: u64,
}

/// A running node's replication state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// `leader`, `follower`, `candidate` or `alone`.
    pub role: String,
    /// The highest epoch accepted.
    pub epoch: EpochJson,
    /// The leader followed (itself when leading), hex.
    pub leader: Option<String>,
    /// Known peers.
    pub peers: Vec<PeerStatus>,
    /// This device's changes not yet in the log.
    pub pending_push: u64,
    /// Entries in the log (changes and epoch barriers).
    pub log_len: u64,
    /// Where this node listens.
    pub listen: String,
    /// Devices with a session up, hex (also shown per peer in `peers`).
    #[serde(skip)]
    pub connected: Vec<String>,
    /// Applied positions followers acknowledged, by device hex (shown per peer in `peers`).
    #[serde(skip)]
    pub acknowledged: Vec<(String, DomainsJson)>,
}
