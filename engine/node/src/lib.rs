//! The node runtime: a [`Library`] kept in sync with its peers over QUIC.
//!
//! [`Node`] runs three things: the core thread (the replication state
//! machine over the journal: `core.rs`), a tokio runtime with the network tasks (accepting,
//! dialing with backoff, one session per connection: `net.rs`), and pairing (`pairing.rs`).
//! Messages from peers reach the core through one channel; the core answers through one
//! unbounded channel per session. Everything the core decides is durable before it is sent.

mod anti_entropy;
mod backfill;
mod core;
mod devices;
mod discovery;
mod error;
mod file_sink;
mod keys;
mod net;
mod pacing;
mod pairing;
mod quarantine;
mod scrub;
mod snapshot;
mod status;
#[cfg(feature = "typescript")]
mod typescript;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use keel_schema::DeviceId;
use keel_transport::{Endpoint, Identity, Inviter, Pins};
use tokio::sync::{mpsc, oneshot};

pub use anti_entropy::{AntiEntropyReport, RangeDiff, DEPTH_MAX, LEAF_ROWS};
pub use devices::{DevicesFile, PairedDevice};
pub use discovery::{find_inviter, lan_tag, Discovery, LAN_SERVICE, MDNS_PORT, PAIRING_SERVICE};
pub use net::{backoff_delay, BACKOFF_MAX_MS, BACKOFF_MIN_MS};
pub use pairing::{join, InviteHandle, JoinOptions, Question};
#[cfg(fuzzing)]
pub use snapshot::fuzz_receive;
pub use snapshot::{JoinProgress, SlowLink, SnapshotOutcome};
pub use status::{AppliedDomains, JoiningStatus, NodeStatus, PeerStatus};
#[cfg(feature = "typescript")]
pub use typescript::typescript;

use self::core::{Core, CoreEvent};
use self::net::Net;
use self::pairing::Invitation;
use crate::error::io_at;
pub use crate::error::NodeError;
use keel_engine::{now_ms, Library, LinkOptions, NodeLink};
use keel_replication::ReplicaConfig;

/// Default most devices per library.
pub const DEVICE_LIMIT_DEFAULT: usize = keel_transport::DEVICE_LIMIT_DEFAULT;

/// How a node runs.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// Where to listen (port 0: any).
    pub listen: SocketAddr,
    /// Peers to connect to (besides the addresses remembered in `devices.toml`).
    pub peers: Vec<SocketAddr>,
    /// Leader silent this long: elect another (plus up to as much again as jitter).
    pub election_timeout_ms: u64,
    /// Leader heartbeat and follower push interval.
    pub heartbeat_ms: u64,
    /// Most log entries per segment.
    pub segment_max: usize,
    /// Most segments sent to one follower and not yet acknowledged.
    pub segments_in_flight: usize,
    /// Most devices in the library.
    pub device_limit: usize,
    /// How long a pairing code lives.
    pub code_ttl_ms: u64,
    /// While the node leads, its core appends this device's commits to the log itself (one
    /// sync before followers are sent them; see `leader_commit.rs`). `false` sends them through
    /// the offline journal as on a follower (for comparison).
    pub leader_commits: bool,
    /// LAN discovery over mDNS: announce this device (under an opaque, rotating name) and dial
    /// paired devices found on the local network. `None` turns it off (tests that must not hear
    /// each other). If mDNS cannot start, the node runs without it and logs why.
    pub discovery: Option<Discovery>,
    /// Follow this device's locations on disk (see [`keel_engine::WatchOptions`]): files
    /// created, edited, moved and deleted become changes without anyone running `index`.
    /// `None` turns it off.
    pub watch: Option<keel_engine::WatchOptions>,
    /// Compact the log (see [`Node::compact`]) once it holds more than this many entries past
    /// its compaction position and every device has acknowledged more of it. `None` compacts
    /// only when asked.
    pub compact_after: Option<u64>,
    /// While leading, keep at most this many log entries for a device that has not
    /// acknowledged them: compaction passes a device further behind, which backfills from
    /// the snapshot when it comes back (see [`NodeStatus::behind_compaction`]). `None` keeps
    /// the log for every device however long it stays away.
    pub retain_for_absent: Option<u64>,
    /// How long a leader keeps its snapshot unpacked after the last backfill that read it
    /// ended, so that a device asking again meanwhile (a retry, a cut connection) is served
    /// from the same copy rather than a new one (the projection file's size, unpacked again).
    pub snapshot_keep: std::time::Duration,
    /// Read the whole log this often, a stretch at a time, checking every record's checksum
    /// and seal (the first pass a minute after the node starts, or sooner if this is shorter).
    /// A damaged record on a follower is fetched again from the leader (see
    /// [`Node::repair_log`]). `None` checks only when asked.
    pub scrub_every: Option<std::time::Duration>,
    /// Read the log found on disk back before this device stands for election (the start
    /// check; it still follows and votes meanwhile): a record damaged while the node was off
    /// is found and fetched again before this device could win with it. About 8k records per
    /// 10 ms pause plus the reading (see `NodeStatus::log_unchecked`). `false` stands at once
    /// with a log not read back (damage at rest is then found by the scrub or a read).
    pub check_log_at_start: bool,
    /// The most log entries a device joining through this node receives as history. A longer
    /// log (past the compaction base) starts the joiner's log at a base of its own: the
    /// projection file it receives, at the position this node applied, capped by what every
    /// other device of the library stored; the history before it stays on the devices that
    /// hold it, as after a compaction (decision 0079). A joiner whose app has other models
    /// than this node's always receives the whole log. `None`: always the whole log.
    pub join_history: Option<u64>,
}

/// How often a node reads its whole log for damage by default.
pub const SCRUB_EVERY_DEFAULT: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// The log entries past the compaction position that start an automatic compaction by
/// default (about 0.4 GB of journal on the P4 workload).
pub const COMPACT_AFTER_DEFAULT: u64 = 1_000_000;
/// The most log entries a joining device receives as history by default: a tenth of
/// [`COMPACT_AFTER_DEFAULT`] (a join's history costs about 540 bytes an entry on the wire,
/// sealed changes that do not compress; the file after it about 140).
pub const JOIN_HISTORY_DEFAULT: u64 = 100_000;
/// The log entries a leader keeps for an absent device by default.
pub const RETAIN_FOR_ABSENT_DEFAULT: u64 = 2_000_000;
/// How long a leader keeps its snapshot unpacked after a backfill by default.
pub const SNAPSHOT_KEEP_DEFAULT: std::time::Duration = std::time::Duration::from_secs(30);
/// How often a node looks whether its log is due for compaction.
const COMPACT_CHECK: std::time::Duration = std::time::Duration::from_secs(5);
/// How long [`Node::compact`] waits for the devices to acknowledge its snapshot's position:
/// a few heartbeats.
pub const COMPACT_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

impl Default for NodeOptions {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            peers: Vec::new(),
            election_timeout_ms: 300,
            heartbeat_ms: 50,
            segment_max: 4096,
            segments_in_flight: 4,
            device_limit: DEVICE_LIMIT_DEFAULT,
            code_ttl_ms: keel_transport::CODE_TTL_MS,
            leader_commits: true,
            discovery: Some(Discovery::default()),
            watch: Some(keel_engine::WatchOptions::default()),
            compact_after: Some(COMPACT_AFTER_DEFAULT),
            retain_for_absent: Some(RETAIN_FOR_ABSENT_DEFAULT),
            snapshot_keep: SNAPSHOT_KEEP_DEFAULT,
            scrub_every: Some(SCRUB_EVERY_DEFAULT),
            check_log_at_start: true,
            join_history: Some(JOIN_HISTORY_DEFAULT),
        }
    }
}

/// A running node: the library, its replication core and its network side.
pub struct Node {
    /// Dropped before `library` is closed (it holds the library too).
    link: Arc<NodeLink>,
    library: Arc<Library>,
    net: Arc<Net>,
    status: Arc<Mutex<NodeStatus>>,
    core_tx: crossbeam_channel::Sender<CoreEvent>,
    core: Option<JoinHandle<()>>,
    rt: Option<tokio::runtime::Runtime>,
    device_limit: usize,
    code_ttl_ms: u64,
    /// Whether the device is in sync, as the core last said.
    in_sync: tokio::sync::watch::Receiver<bool>,
    /// The location watcher's thread and its stop signal (dropping the sender stops it).
    watcher: Option<(crossbeam_channel::Sender<()>, JoinHandle<()>)>,
    /// The thread running the jobs the last process left unfinished.
    resumed_jobs: Option<JoinHandle<()>>,
    /// The thread that compacts the log past its threshold, and its stop signal.
    compactor: Option<(crossbeam_channel::Sender<()>, JoinHandle<()>)>,
    scrubber: Option<(crossbeam_channel::Sender<()>, JoinHandle<()>)>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Node({:?})", self.library)
    }
}

impl Node {
    /// Starts a node for `library`: binds `options.listen`, trusts the library's devices and
    /// the ones paired in `devices.toml`, and connects to `options.peers` and the remembered
    /// addresses.
    pub fn start(library: Library, options: NodeOptions) -> Result<Self, NodeError> {
        let library = Arc::new(library);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("keel-net")
            .enable_all()
            .build()
            .map_err(io_at(library.dir()))?;
        let file = DevicesFile::read(library.dir())?;
        snapshot::remove_scratch(library.dir());
        let pins = Pins::new();
        for id in file.ids().filter(|id| !file.is_revoked(id)) {
            pins.pin(id);
        }
        let endpoint = {
            let _guard = rt.enter();
            let device = library.device();
            let identity = Identity::from_parts(device.cert_der.clone(), device.key_der.clone());
            Endpoint::bind(&identity, options.listen, pins.clone())?
        };
        let listen = endpoint.local_addr()?;
        let status = Arc::new(Mutex::new(NodeStatus {
            listen: listen.to_string(),
            ..NodeStatus::default()
        }));
        let link = Arc::new(library.link(LinkOptions {
            leader_commits: options.leader_commits,
        })?);
        let started = start_core(&library, &link, &options, (status.clone(), pins))?;
        let lan = options.discovery.as_ref().and_then(|discovery| {
            discovery::Lan::start(discovery, library.id(), library.device_id(), listen.port())
                .map(Arc::new)
                .map_err(|e| tracing::warn!(error = %e, "LAN discovery is off"))
                .ok()
        });
        let parts = net::NetParts {
            status: status.clone(),
            link: Arc::downgrade(&link),
            lan: lan.clone(),
            snapshot_keep: options.snapshot_keep,
            join_history: options.join_history.unwrap_or(u64::MAX),
        };
        let net = Arc::new(Net::new(endpoint, started.tx.clone(), &library, parts));
        if let Some(lan) = lan {
            let (net, handle) = (net.clone(), rt.handle().clone());
            std::thread::Builder::new()
                .name("keel-lan".into())
                .spawn(move || lan.run(net, handle))
                .map_err(io_at(library.dir()))?;
        }
        {
            let _guard = rt.enter();
            rt.spawn(net.clone().accept_loop());
            rt.spawn(net.clone().share_peers_loop());
            rt.spawn(net.clone().backfill_loop(started.backfill));
            for addr in options.peers.iter().copied().chain(file.addrs()) {
                if addr != listen {
                    net.dial(addr);
                }
            }
        }
        let watcher = match &options.watch {
            Some(watch) => Some(start_watcher(&library, watch.clone())?),
            None => None,
        };
        let resumed_jobs = start_resuming_jobs(&library)?;
        let compactor = match options.compact_after {
            Some(after) => Some(start_compactor(&library, &status, after)?),
            None => None,
        };
        let scrubber = match (started.check_to, options.scrub_every) {
            (None, None) => None,
            (check_to, every) => Some(scrub::start(
                link.clone(),
                (started.tx.clone(), status.clone()),
                check_to,
                every,
            )?),
        };
        tracing::info!(%listen, device = %library.device_id().short(), "node started");
        Ok(Self {
            link,
            library,
            net,
            status,
            core_tx: started.tx,
            core: Some(started.thread),
            rt: Some(rt),
            device_limit: options.device_limit,
            code_ttl_ms: options.code_ttl_ms,
            in_sync: started.in_sync,
            watcher,
            resumed_jobs: Some(resumed_jobs),
            compactor,
            scrubber,
        })
    }

    /// Whether this device is in sync now: it leads, or it follows a connected leader, has
    /// pushed every change it made and applied the whole log the leader said it has. The same
    /// moments come as [`keel_engine::Event::SyncFinished`] and `SyncStarted` on the bus.
    pub fn is_in_sync(&self) -> bool {
        *self.in_sync.borrow()
    }

    /// Waits until this device is in sync (see [`Node::is_in_sync`]); for async hosts, on any
    /// runtime. Returns at once if it is; [`NodeError::Stopped`] if the node stops first.
    pub async fn synced(&self) -> Result<(), NodeError> {
        let mut in_sync = self.in_sync.clone();
        let synced = in_sync.wait_for(|synced| *synced).await.is_ok();
        synced.then_some(()).ok_or(NodeError::Stopped)
    }

    /// Blocks until this device is in sync, at most `timeout` (see [`Node::is_in_sync`]).
    pub fn wait_in_sync(&self, timeout: std::time::Duration) -> Result<(), NodeError> {
        let rt = self.rt.as_ref().ok_or(NodeError::Stopped)?;
        let mut in_sync = self.in_sync.clone();
        let waited = block_on_here(rt, async move {
            let synced = in_sync.wait_for(|synced| *synced);
            tokio::time::timeout(timeout, async move { synced.await.is_ok() }).await
        });
        match waited {
            Ok(true) => Ok(()),
            Ok(false) => Err(NodeError::Stopped),
            Err(_) => Err(NodeError::NotInSync(timeout)),
        }
    }

    /// The library (commit, query and subscribe as usual; changes replicate by themselves).
    pub fn library(&self) -> &Library {
        &self.library
    }

    /// The address this node listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.net
            .endpoint
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// This node's replication state, with every known peer.
    pub fn status(&self) -> NodeStatus {
        let mut status = self.status.lock().map(|s| s.clone()).unwrap_or_default();
        // The offline journal itself says what waits to be pushed (the core's view lags a tick).
        if let Ok(pending) = self.library.sync_state().offline_len() {
            status.offline = pending;
        }
        let addrs = self.net.addrs.lock().map(|a| a.clone()).unwrap_or_default();
        let file = DevicesFile::read(self.library.dir()).unwrap_or_default();
        let mut known: Vec<DeviceId> = file.ids().collect();
        if let Ok(devices) = self.library.devices() {
            known.extend(
                devices
                    .iter()
                    .filter_map(|d| DeviceId::from_hex(&d.device_id)),
            );
        }
        known.extend(addrs.keys().copied());
        known.sort();
        known.dedup();
        let me = self.library.device_id();
        status.peers = known
            .into_iter()
            .filter(|d| *d != me && !file.is_revoked(d))
            .map(|d| {
                let hex = d.to_hex();
                let addr = addrs.get(&d).copied().or_else(|| {
                    file.paired
                        .iter()
                        .find(|p| p.device_id == hex)
                        .and_then(|p| p.addr)
                });
                let applied = status
                    .acknowledged
                    .iter()
                    .find(|(d, _)| *d == hex)
                    .map(|(_, p)| *p);
                let stored = status
                    .stored
                    .iter()
                    .find(|(d, _)| *d == hex)
                    .map(|(_, lsn)| *lsn);
                let at = |list: &[(String, u64)]| {
                    list.iter().find(|(d, _)| *d == hex).map(|(_, ms)| *ms)
                };
                let last_seen_ms = at(&status.last_seen);
                let caught_up_ms = at(&status.caught_up);
                PeerStatus {
                    applied,
                    stored,
                    last_seen_ms,
                    caught_up_ms,
                    connected: status.connected.contains(&hex),
                    device_id: hex,
                    addr: addr.map(|a| a.to_string()),
                }
            })
            .collect();
        status.joining = self
            .net
            .joins
            .lock()
            .map(|joins| joins.values().map(|(_, j)| j.clone()).collect())
            .unwrap_or_default();
        status
    }

    /// Cuts this node off the network (every session closed, none accepted or made) or brings it
    /// back. It keeps committing meanwhile; what it wrote is pushed when it is back.
    pub fn set_offline(&self, offline: bool) {
        self.net.set_offline(offline);
    }

    /// Tells the node the network may have changed (an interface came up, the device woke):
    /// every dialer retries now instead of when its backoff ends.
    pub fn network_changed(&self) {
        self.net.wake_dialers();
    }

    /// Connects to another peer (kept up with reconnects).
    pub fn add_peer(&self, addr: SocketAddr) {
        if let Some(rt) = &self.rt {
            let _guard = rt.enter();
            self.net.dial(addr);
        }
    }

    /// Opens an invitation: unpinned devices may connect to pair with the returned code until
    /// one succeeds, the code expires or is voided. With `auto_accept` the first device that
    /// proves the code is accepted; otherwise each one arrives in `questions` to be answered.
    pub fn invite(&self, auto_accept: bool) -> Result<InviteHandle, NodeError> {
        let rt = self.rt.as_ref().ok_or(NodeError::Stopped)?;
        let devices = self.device_count()?;
        if devices >= self.device_limit {
            return Err(keel_transport::PairingError::DeviceLimit(self.device_limit).into());
        }
        let inviter = Inviter::new(
            self.library.id(),
            self.library.name(),
            self.link.key().to_bytes(),
            self.device_limit,
            now_ms(),
        )
        .expiring(now_ms(), self.code_ttl_ms);
        let code = inviter.code().clone();
        let (questions_tx, questions) = mpsc::unbounded_channel();
        let (outcome_tx, outcome) = oneshot::channel();
        let invitation = Invitation {
            inviter,
            questions: (!auto_accept).then_some(questions_tx),
            outcome: Some(outcome_tx),
            devices,
        };
        let slot = self.net.invitation.clone();
        block_on_here(rt, async move {
            *slot.lock().await = Some(invitation);
        });
        self.net.endpoint.pins().set_pairing_open(true);
        if let Some(lan) = &self.net.lan {
            lan.announce_invitation();
        }
        // The invitation ends when its code expires, whether or not anyone tried it.
        let net = self.net.clone();
        let expired = code.clone();
        let ttl = std::time::Duration::from_millis(self.code_ttl_ms);
        rt.spawn(async move {
            tokio::time::sleep(ttl).await;
            pairing::end_invitation(&net, &expired, keel_transport::PairingError::Expired).await;
        });
        Ok(InviteHandle {
            code,
            questions,
            outcome,
        })
    }

    /// Whether an invitation is open (unpinned devices may connect, to pair only).
    pub fn invitation_open(&self) -> bool {
        self.net.endpoint.pins().pairing_open()
    }

    /// How many devices the library has (its Device records and paired devices).
    pub fn device_count(&self) -> Result<usize, NodeError> {
        let file = DevicesFile::read(self.library.dir())?;
        let mut ids: Vec<String> = self
            .library
            .devices()?
            .into_iter()
            .map(|d| d.device_id)
            .collect();
        ids.extend(file.paired.iter().map(|p| p.device_id.clone()));
        ids.sort();
        ids.dedup();
        ids.retain(|id| !file.revoked.contains(id));
        Ok(ids.len())
    }

    /// Revokes a device: it is unpinned and its sessions are closed at once (a new handshake
    /// fails), it is recorded as revoked, and its Device record is deleted so every device drops
    /// it. Then the library key rotates: changes sealed from now on use a key sent only to the
    /// devices still paired.
    pub fn revoke(&self, device: DeviceId) -> Result<(), NodeError> {
        revoke_in(&self.library, device)?;
        if let Ok(mut withheld) = self.net.withheld.lock() {
            withheld.insert(device);
        }
        self.net.endpoint.pins().unpin(device);
        self.net.disconnect(device);
        self.library.rotate_key()?;
        if let Some(rt) = self.rt.as_ref() {
            let net = self.net.clone();
            rt.spawn(async move { net.share_keys().await });
        }
        Ok(())
    }

    /// Compares this device's projection with the one of `peer` (a device name, or the start
    /// of its id in hex), which must be connected, over key ranges; with `repair`, replaces the
    /// rows of every range that differs by the peer's (both must have applied the same log
    /// position). See decision 0054.
    pub fn verify_against(&self, peer: &str, repair: bool) -> Result<AntiEntropyReport, NodeError> {
        let record = self.library.files().device_named(peer)?;
        let device = DeviceId::from_hex(&record.device_id)
            .ok_or_else(|| NodeError::Failed(format!("{peer} has no valid device id")))?;
        if device == self.library.device_id() {
            return Err(NodeError::Failed(format!("{peer} is this device")));
        }
        let addr = self
            .net
            .addrs
            .lock()
            .ok()
            .and_then(|addrs| addrs.get(&device).copied())
            .ok_or_else(|| NodeError::Failed(format!("{peer} has not been reached")))?;
        self.library.flush()?;
        let (net, link) = (self.net.clone(), self.link.clone());
        self.block_on(async move {
            anti_entropy::compare(&net.endpoint, link, net.library, (device, addr), repair).await
        })?
    }

    /// Runs `f` on the node's tokio runtime (for async work such as answering questions) and
    /// waits for it. Blocks the calling thread; safe from inside a host's runtime too (`f` then
    /// runs from a thread of its own), though an async host should rather call it from
    /// `spawn_blocking`.
    pub fn block_on<F>(&self, f: F) -> Result<F::Output, NodeError>
    where
        F: std::future::Future + Send,
        F::Output: Send,
    {
        let rt = self.rt.as_ref().ok_or(NodeError::Stopped)?;
        Ok(block_on_here(rt, f))
    }

    /// UDP bytes (sent, received) of this node's sync sessions and backfills since it
    /// started, QUIC's headers, acknowledgements and retransmissions included (pairing and the
    /// initial sync of a joining device are not sync sessions).
    pub fn wire_bytes(&self) -> (u64, u64) {
        self.net.wire_bytes()
    }

    /// Checks every record of this device's log (checksums and seals: it reads the whole
    /// log) and, if one is damaged, drops the log from it on and fetches it again from the
    /// leader; this device's own readable changes after it go back to pending and are pushed
    /// again. Returns the first damaged position, if any. A leading device first steps down
    /// (see `Replica::handle_abdicate`): another device leads, and this one fetches from it.
    pub fn repair_log(&self) -> Result<Option<u64>, NodeError> {
        // The scan reads the whole log: here, not on the core's thread.
        let Some(damaged) = self.link.journal()?.first_damaged_log_record()? else {
            return Ok(None);
        };
        let (reply, answer) = crossbeam_channel::bounded(1);
        self.core_tx
            .send(CoreEvent::RepairLog { damaged, reply })
            .map_err(|_| NodeError::Failed("the node is stopping".into()))?;
        answer
            .recv()
            .map_err(|_| NodeError::Failed("the node is stopping".into()))?
    }

    /// Compacts the log now (see [`Library::compact`]) up to what every device of the
    /// library has acknowledged storing and this device has applied, as a job. A device that
    /// leads knows what its followers acknowledged this epoch; one that follows compacts as far
    /// as its leader offers. Nothing happens while that is not past the current one. A
    /// snapshot made past it waits up to [`COMPACT_WAIT`] for the devices to acknowledge its
    /// position; the report says if it still waits (the node's compactor finishes it later).
    /// Then, leading, it appends a horizon if the devices' floors let one collect tombstones
    /// (see [`Node::collect_tombstones`]).
    pub fn compact(&self) -> Result<keel_engine::CompactReport, NodeError> {
        let report = self.compact_log()?;
        // After the compaction: a horizon is a new entry, which the snapshot of this one
        // would have to wait for every device to hold. The next compaction keeps what it
        // collected.
        self.collect_tombstones()?;
        Ok(report)
    }

    fn compact_log(&self) -> Result<keel_engine::CompactReport, NodeError> {
        let upto = self.status().compactable;
        let report = self.library.compact(keel_schema::Lsn(upto))?;
        let Some(at) = report.waiting_at else {
            return Ok(report);
        };
        let deadline = std::time::Instant::now() + COMPACT_WAIT;
        while self.status().compactable < at && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let upto = self.status().compactable;
        Ok(self.library.compact(keel_schema::Lsn(upto))?)
    }

    /// While leading: appends a horizon at the least clock floor every device of the library
    /// reported this epoch, if it is newer than the last one, so that every device collects
    /// the tombstones older than it (decision 0082), if any row holds one. [`Node::compact`]
    /// and the node's compactor do this after each compaction. `false` when nothing was appended (not leading, a device has
    /// not reported a floor, or no newer one).
    pub fn collect_tombstones(&self) -> Result<bool, NodeError> {
        append_horizon(&self.library, &self.status)
    }

    /// Stops the node cleanly: connections closed, core stopped, library closed (everything
    /// committed is applied first).
    pub fn stop(mut self) -> Result<(), NodeError> {
        self.shutdown();
        let library = self.library.clone();
        drop(self);
        match Arc::try_unwrap(library) {
            Ok(library) => Ok(library.close()?),
            Err(_) => Err(NodeError::Failed("the library is still in use".into())),
        }
    }

    fn shutdown(&mut self) {
        // Running jobs stop at their next checkpoint, to resume at the next open.
        let _ = self.library.stop_jobs();
        if let Some(jobs) = self.resumed_jobs.take() {
            let _ = jobs.join();
        }
        if let Some((stop, watcher)) = self.watcher.take() {
            drop(stop);
            let _ = watcher.join();
        }
        if let Some((stop, compactor)) = self.compactor.take() {
            drop(stop);
            let _ = compactor.join();
        }
        if let Some((stop, scrubber)) = self.scrubber.take() {
            drop(stop);
            let _ = scrubber.join();
        }
        if let Some(lan) = &self.net.lan {
            lan.stop();
        }
        self.net.endpoint.close();
        let _ = self.core_tx.send(CoreEvent::Stop);
        if let Some(core) = self.core.take() {
            let _ = core.join();
        }
        if let Some(rt) = self.rt.take() {
            let shut = move || rt.shutdown_timeout(std::time::Duration::from_secs(2));
            if tokio::runtime::Handle::try_current().is_ok() {
                // Inside a host's runtime a runtime may not be shut down (nor dropped) in place.
                std::thread::scope(|s| {
                    s.spawn(shut);
                });
            } else {
                shut();
            }
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The replication core of a node, started on its own thread.
struct StartedCore {
    /// Its queue of events.
    tx: crossbeam_channel::Sender<CoreEvent>,
    thread: JoinHandle<()>,
    /// Whether this device is in sync, as the core sees it.
    in_sync: tokio::sync::watch::Receiver<bool>,
    /// Where the core asks for a backfill from a leader.
    backfill: mpsc::Receiver<DeviceId>,
    /// The position the log is checked to before this device may stand (see
    /// `NodeOptions::check_log_at_start`).
    check_to: Option<keel_schema::Lsn>,
}

/// Starts `library`'s replication core on a thread of its own, with the devices in `pins`.
fn start_core(
    library: &Library,
    link: &Arc<NodeLink>,
    options: &NodeOptions,
    (status, pins): (Arc<Mutex<NodeStatus>>, Pins),
) -> Result<StartedCore, NodeError> {
    let config = ReplicaConfig {
        device: library.device_id(),
        election_timeout_ms: options.election_timeout_ms,
        heartbeat_ms: options.heartbeat_ms,
        segment_max: options.segment_max,
        segments_in_flight: options.segments_in_flight,
    };
    let (in_sync_tx, in_sync) = tokio::sync::watch::channel(false);
    let (backfill_tx, backfill) = mpsc::channel(1);
    let mut core = Core::new(
        link.clone(),
        config,
        status,
        pins,
        in_sync_tx,
        (backfill_tx, options.retain_for_absent.unwrap_or(u64::MAX)),
    )?;
    let check_to = options
        .check_log_at_start
        .then(|| core.hold_until_checked())
        .flatten();
    let (tx, rx) = crossbeam_channel::bounded(self::core::CORE_QUEUE_MAX);
    let thread = std::thread::Builder::new()
        .name("keel-core".into())
        .spawn(move || core.run(rx))
        .map_err(io_at(library.dir()))?;
    Ok(StartedCore {
        tx,
        thread,
        in_sync,
        backfill,
        check_to,
    })
}

/// Resumes `library`'s interrupted jobs on a thread of its own.
fn start_resuming_jobs(library: &Arc<Library>) -> Result<JoinHandle<()>, NodeError> {
    let resuming = library.clone();
    std::thread::Builder::new()
        .name("keel-jobs".into())
        .spawn(move || match resuming.resume_jobs() {
            Ok(0) => {}
            Ok(n) => tracing::info!(jobs = n, "resumed interrupted jobs"),
            Err(error) => tracing::warn!(%error, "an interrupted job failed again"),
        })
        .map_err(io_at(library.dir()))
}

/// Starts the thread that compacts `library`'s log once it holds more than `after` entries
/// past the compaction position (see [`Node::compact`]).
fn start_compactor(
    library: &Arc<Library>,
    status: &Arc<Mutex<NodeStatus>>,
    after: u64,
) -> Result<(crossbeam_channel::Sender<()>, JoinHandle<()>), NodeError> {
    let (stop, stopped) = crossbeam_channel::bounded::<()>(1);
    let (library, status) = (library.clone(), status.clone());
    let dir = library.dir().to_path_buf();
    std::thread::Builder::new()
        .name("keel-compact".into())
        .spawn(move || {
            while let Err(crossbeam_channel::RecvTimeoutError::Timeout) =
                stopped.recv_timeout(COMPACT_CHECK)
            {
                let Some(upto) = status.lock().ok().and_then(|s| compaction_due(&s, after)) else {
                    continue;
                };
                match library.compact(keel_schema::Lsn(upto)) {
                    Ok(report) if report.dropped > 0 => {
                        tracing::info!(
                            base = report.base,
                            dropped = report.dropped,
                            "compacted the log"
                        )
                    }
                    Ok(_) => {}
                    Err(error) => tracing::warn!(%error, "compacting the log failed"),
                }
                if let Err(error) = append_horizon(&library, &status) {
                    tracing::warn!(%error, "appending a horizon failed");
                }
            }
        })
        .map(|thread| (stop, thread))
        .map_err(io_at(dir))
}

/// While leading, and every device of the library reported a clock floor newer than the last
/// horizon's: appends a horizon at the least floor, which has every device collect the
/// tombstones older than it (decision 0082). Returns whether one was appended.
fn append_horizon(library: &Library, status: &Mutex<NodeStatus>) -> Result<bool, NodeError> {
    let Some(floor) = status.lock().ok().and_then(|s| {
        let floor = s.horizon?;
        s.horizon_appended
            .is_none_or(|last| last < floor)
            .then_some(floor)
    }) else {
        return Ok(false);
    };
    // Nothing to collect: no entry (each makes a snapshot wait for every device to hold it).
    if !library.read(|p| p.query().holds_tombstones_before(floor.ms, floor.counter))? {
        return Ok(false);
    }
    if let Ok(mut s) = status.lock() {
        s.horizon_appended = Some(floor);
    }
    let bound = keel_schema::Hlc {
        physical_ms: floor.ms,
        counter: floor.counter,
        device: keel_schema::DeviceId([0; 32]),
    };
    let appended = library.append_horizon(bound)?;
    if !appended {
        if let Ok(mut s) = status.lock() {
            s.horizon_appended = None;
        }
    }
    Ok(appended)
}

/// Where to compact to, if the log holds more than `after` entries past its compaction
/// position and more of it may go.
fn compaction_due(status: &NodeStatus, after: u64) -> Option<u64> {
    let held = status.log_len.saturating_sub(status.compacted_to);
    (held > after && status.compactable > status.compacted_to).then_some(status.compactable)
}

/// Starts the location watcher of `library` on a thread of its own; it stops when the returned
/// sender is dropped. A watcher that fails is logged (and announced by the library); the node
/// goes on without it.
fn start_watcher(
    library: &Arc<Library>,
    options: keel_engine::WatchOptions,
) -> Result<(crossbeam_channel::Sender<()>, JoinHandle<()>), NodeError> {
    let (stop, stopped) = crossbeam_channel::bounded(1);
    let watched = library.clone();
    let thread = std::thread::Builder::new()
        .name("keel-watch".into())
        .spawn(move || {
            if let Err(error) = watched.watch(&options, &stopped) {
                tracing::error!(%error, "the location watcher stopped");
            }
        })
        .map_err(io_at(library.dir()))?;
    Ok((stop, thread))
}

/// Runs `f` to completion on `rt` and returns its output. From inside another runtime (a host
/// app's), whose workers may not block on a runtime, it runs from a thread of its own while the
/// caller waits.
fn block_on_here<F>(rt: &tokio::runtime::Runtime, f: F) -> F::Output
where
    F: std::future::Future + Send,
    F::Output: Send,
{
    if tokio::runtime::Handle::try_current().is_err() {
        return rt.block_on(f);
    }
    std::thread::scope(|s| match s.spawn(|| rt.block_on(f)).join() {
        Ok(output) => output,
        Err(panic) => std::panic::resume_unwind(panic),
    })
}

/// Revokes `device` in `library` without a running node (`keel devices remove`).
pub fn revoke_in(library: &Library, device: DeviceId) -> Result<(), NodeError> {
    let mut file = DevicesFile::read(library.dir())?;
    file.revoke(device);
    file.write(library.dir())?;
    let uuid = device.record_uuid();
    if library.get::<keel_schema::Device>(uuid)?.is_some() {
        library.transact(|tx| {
            tx.delete::<keel_schema::Device>(uuid);
            Ok(())
        })?;
    }
    Ok(())
}
