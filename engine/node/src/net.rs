//! The network side of a node: accepting and dialing QUIC connections, one session per
//! connection (Hello, then messages to and from the core), reconnecting with exponential backoff
//! and jitter. A peer that sends anything malformed loses its connection; the node runs on.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crossbeam_channel::Sender;
use keel_schema::{DeviceId, Epoch, LibraryId, Lsn};
use keel_transport::{Connection, DeviceMessage, Endpoint, PeerAddr, PEERS_MAX};
use rand::RngExt;

use super::core::CoreEvent;
use super::pairing::{self, Invitation};
use super::status::NodeStatus;

/// First reconnect delay.
pub const BACKOFF_MIN_MS: u64 = 100;
/// Longest reconnect delay: a device that stays away is retried twice a minute or so (a
/// network change or a discovery wakes every dialer at once: [`crate::Node::network_changed`]).
pub const BACKOFF_MAX_MS: u64 = 30_000;
/// How long a peer has to say Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How often a node tells its sessions where the library's other devices are.
const PEER_SHARE_INTERVAL: Duration = Duration::from_secs(2);
/// Connections from unpinned devices (pairing attempts) served at once.
pub(crate) const UNPINNED_MAX: usize = 8;
/// How long a node waits after a failed backfill before it tries again.
const BACKFILL_RETRY: Duration = Duration::from_secs(2);
/// How long it waits after its user cancelled a backfill (`keel jobs cancel`): the device
/// stays behind meanwhile, and a later backfill goes on from the last batch kept.
pub(crate) const BACKFILL_AFTER_CANCEL: Duration = Duration::from_secs(60);
/// Most addresses a node keeps dialing (one dialer each): a peer's word cannot grow it past.
const DIALERS_MAX: usize = 64;

/// The next delay: doubled, capped, with ±50% jitter so peers do not retry in lockstep.
pub fn backoff_delay(attempt: u32) -> Duration {
    let base = BACKOFF_MIN_MS
        .saturating_mul(1u64 << attempt.min(16))
        .min(BACKOFF_MAX_MS);
    let jitter = rand::rng().random_range(base / 2..=base + base / 2);
    Duration::from_millis(jitter)
}

/// Dials `peer` at `addr` for a talk outside the sync session (anti-entropy, backfill): the
/// connection, once the device that answers is `peer` and has said Hello for `library` (the
/// answering device speaks first; the caller's first message takes the place of its Hello).
pub(crate) async fn dial_for_talk(
    endpoint: &Endpoint,
    library: LibraryId,
    (peer, addr): (DeviceId, SocketAddr),
) -> Result<Connection, super::NodeError> {
    let failed = |what: &str| super::NodeError::Failed(format!("{}: {what}", peer.short()));
    let conn = tokio::time::timeout(CONNECT_TIMEOUT + HELLO_TIMEOUT, endpoint.connect(addr))
        .await
        .map_err(|_| failed("did not answer"))??;
    if conn.peer() != peer {
        conn.close("not the device asked for");
        return Err(failed("another device answered at its address"));
    }
    match tokio::time::timeout(HELLO_TIMEOUT, conn.recv()).await {
        Ok(Ok(DeviceMessage::Hello { library: l, .. })) if l == library => Ok(conn),
        _ => {
            conn.close("expected Hello for this library");
            Err(failed("did not say Hello for this library"))
        }
    }
}

/// State shared by the network tasks.
pub(crate) struct Net {
    pub(crate) endpoint: Endpoint,
    pub(crate) core: Sender<CoreEvent>,
    pub(crate) library: LibraryId,
    pub(crate) device: DeviceId,
    pub(crate) status: Arc<Mutex<NodeStatus>>,
    pub(crate) invitation: Arc<tokio::sync::Mutex<Option<Invitation>>>,
    pub(crate) sessions: Mutex<HashMap<DeviceId, usize>>,
    pub(crate) addrs: Mutex<HashMap<DeviceId, SocketAddr>>,
    pub(crate) dialing: Mutex<HashSet<SocketAddr>>,
    pub(crate) next_conn: AtomicU64,
    pub(crate) library_dir: std::path::PathBuf,
    /// Cut off from the network (no sessions in or out) while set.
    pub(crate) offline: AtomicBool,
    /// Live sessions' connections, to close when going offline.
    pub(crate) live: Mutex<HashMap<u64, Arc<Connection>>>,
    /// The library, for serving snapshots to devices that join.
    pub(crate) link: std::sync::Weak<keel_engine::NodeLink>,
    /// Connections from unpinned devices served at once (pairing attempts): at most
    /// [`UNPINNED_MAX`].
    pub(crate) unpinned: Arc<tokio::sync::Semaphore>,
    /// Wakes every dialer from its backoff (a network change, a discovery).
    pub(crate) wake: tokio::sync::Notify,
    /// Addresses peers named for devices not pinned yet (their Device record has not arrived):
    /// dialed once they are. At most [`PEERS_MAX`].
    pub(crate) heard: Mutex<HashMap<DeviceId, SocketAddr>>,
    /// mDNS announcements and browsing (`None`: LAN discovery off or unavailable).
    pub(crate) lan: Option<Arc<super::discovery::Lan>>,
    /// Devices revoked by this node or named revoked by a peer's key message: never sent a
    /// key, even if something pins them again before the log's revocation arrives. Only
    /// devices that were pinned here enter it, so it is bounded by the library's devices.
    pub(crate) withheld: Mutex<HashSet<DeviceId>>,
    /// UDP bytes (sent, received) of the sync sessions that ended.
    pub(crate) ended_bytes: Mutex<(u64, u64)>,
    /// Devices being served a backfill now (at most one backfill each).
    pub(crate) backfilling: Arc<Mutex<HashSet<DeviceId>>>,
    /// Devices being sent their initial sync now, with how far each is.
    pub(crate) joins: super::snapshot::ServedJoins,
    /// How long the snapshot a backfill read stays unpacked after it (`NodeOptions`).
    pub(crate) snapshot_keep: Duration,
    /// The most log entries a joining device is sent as history (`NodeOptions::join_history`;
    /// `u64::MAX`: all).
    pub(crate) join_history: u64,
}

/// What a [`Net`] is made from at a node's start, beside its endpoint and core.
pub(crate) struct NetParts {
    pub(crate) status: Arc<Mutex<NodeStatus>>,
    pub(crate) link: std::sync::Weak<keel_engine::NodeLink>,
    pub(crate) lan: Option<Arc<super::discovery::Lan>>,
    pub(crate) snapshot_keep: Duration,
    pub(crate) join_history: u64,
}

impl Net {
    /// The network state of a node of `library` that listens on `endpoint` and reports to
    /// `core`: no sessions, invitations or dials yet.
    pub(crate) fn new(
        endpoint: Endpoint,
        core: Sender<CoreEvent>,
        library: &keel_engine::Library,
        parts: NetParts,
    ) -> Self {
        Net {
            endpoint,
            core,
            library: library.id(),
            device: library.device_id(),
            status: parts.status,
            invitation: Arc::new(tokio::sync::Mutex::new(None)),
            sessions: Mutex::new(HashMap::new()),
            addrs: Mutex::new(HashMap::new()),
            dialing: Mutex::new(HashSet::new()),
            next_conn: AtomicU64::new(0),
            library_dir: library.dir().to_path_buf(),
            offline: AtomicBool::new(false),
            live: Mutex::new(HashMap::new()),
            link: parts.link,
            heard: Mutex::new(HashMap::new()),
            unpinned: Arc::new(tokio::sync::Semaphore::new(UNPINNED_MAX)),
            wake: tokio::sync::Notify::new(),
            lan: parts.lan,
            withheld: Mutex::new(HashSet::new()),
            ended_bytes: Mutex::new((0, 0)),
            backfilling: Arc::new(Mutex::new(HashSet::new())),
            joins: Arc::default(),
            snapshot_keep: parts.snapshot_keep,
            join_history: parts.join_history,
        }
    }
}

/// Longest wait for one request or for sending its answer, when a device is served requests
/// in turn (backfill, anti-entropy).
pub(crate) const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// Answers a device's requests on `conn` in turn, starting with `first` if given, until it
/// closes the connection, goes quiet for [`STEP_TIMEOUT`], is refused an answer (`what` says
/// of what, in the log and the close reason) or has been answered `max` times.
pub(crate) async fn answer_each<F, Fut>(
    conn: &Connection,
    what: &str,
    first: Option<DeviceMessage>,
    max: usize,
    mut answer: F,
) where
    F: FnMut(DeviceMessage) -> Fut,
    Fut: std::future::Future<Output = Result<DeviceMessage, crate::error::NodeError>>,
{
    let peer = conn.peer().short();
    let mut next = first;
    for _ in 0..max {
        let request = match next.take() {
            Some(request) => request,
            None => match tokio::time::timeout(STEP_TIMEOUT, conn.recv()).await {
                Ok(Ok(request)) => request,
                // Closed by the asking device (done), or it went quiet.
                outcome => {
                    tracing::debug!(%peer, ?outcome, "{what} connection ended");
                    return;
                }
            },
        };
        let reply = match answer(request).await {
            Ok(reply) => reply,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "{what} request refused; closed");
                conn.close(&format!("bad {what} request"));
                return;
            }
        };
        if let Err(e) = send_in_time(conn, &reply).await {
            tracing::debug!(%peer, error = %e, "{what} answer not sent");
            return;
        }
    }
    conn.close("too many requests");
}

/// Sends `message` on `conn` unless the peer does not take it within [`STEP_TIMEOUT`].
pub(crate) async fn send_in_time(
    conn: &Connection,
    message: &DeviceMessage,
) -> Result<(), crate::error::NodeError> {
    match tokio::time::timeout(STEP_TIMEOUT, conn.send(message)).await {
        Ok(sent) => Ok(sent?),
        Err(_) => Err(crate::error::NodeError::Failed(
            "the peer does not read".into(),
        )),
    }
}

/// The next message on `conn`, unless none comes within [`STEP_TIMEOUT`].
pub(crate) async fn recv_in_time(
    conn: &Connection,
) -> Result<DeviceMessage, crate::error::NodeError> {
    match tokio::time::timeout(STEP_TIMEOUT, conn.recv()).await {
        Ok(received) => Ok(received?),
        Err(_) => Err(crate::error::NodeError::Failed("no answer".into())),
    }
}

/// A device's one backfill being served; the device may ask again once it is dropped.
pub(crate) struct BackfillSlot {
    held: Arc<Mutex<HashSet<DeviceId>>>,
    device: DeviceId,
}

impl BackfillSlot {
    /// The slot of `device` among those `held`, unless it holds it already.
    pub(crate) fn claim(held: &Arc<Mutex<HashSet<DeviceId>>>, device: DeviceId) -> Option<Self> {
        let mut devices = held.lock().ok()?;
        devices.insert(device).then(|| Self {
            held: held.clone(),
            device,
        })
    }
}

impl Drop for BackfillSlot {
    fn drop(&mut self) {
        if let Ok(mut devices) = self.held.lock() {
            devices.remove(&self.device);
        }
    }
}

impl Net {
    /// Wakes every dialer: the network may have changed.
    pub(crate) fn wake_dialers(&self) {
        self.wake.notify_waiters();
    }

    /// A pinned device announced itself on the LAN at `addrs`: dial it now, unless connected.
    pub(crate) fn found_on_lan(self: &Arc<Self>, device: DeviceId, addrs: &[SocketAddr]) {
        if self.is_offline() || self.connected(&device) {
            return;
        }
        for addr in addrs {
            self.dial(*addr);
        }
        self.wake_dialers();
    }

    /// Withdraws the LAN announcement of an invitation that ended.
    pub(crate) fn withdraw_invitation(&self) {
        if let Some(lan) = &self.lan {
            lan.withdraw_invitation();
        }
    }

    /// Cuts the node off (closing every session) or lets it reconnect.
    pub(crate) fn set_offline(&self, offline: bool) {
        self.offline.store(offline, Ordering::SeqCst);
        if !offline {
            self.wake_dialers();
            return;
        }
        for conn in self.sessions_where(|_| true) {
            conn.close("going offline");
        }
    }

    /// UDP bytes (sent, received) of every sync session since the node started.
    pub(crate) fn wire_bytes(&self) -> (u64, u64) {
        let (mut sent, mut received) = self.ended_bytes.lock().map(|e| *e).unwrap_or_default();
        for conn in self.sessions_where(|_| true) {
            let (s, r) = conn.wire_bytes();
            sent += s;
            received += r;
        }
        (sent, received)
    }

    /// The live sessions' connections whose peer passes `keep`, taken out of the lock.
    pub(crate) fn sessions_where(&self, keep: impl Fn(&DeviceId) -> bool) -> Vec<Arc<Connection>> {
        self.live
            .lock()
            .map(|l| l.values().filter(|c| keep(&c.peer())).cloned().collect())
            .unwrap_or_default()
    }

    /// Closes every session with `device` (after revoking it).
    pub(crate) fn disconnect(&self, device: DeviceId) {
        for conn in self.sessions_where(|peer| *peer == device) {
            conn.close("revoked");
        }
    }

    fn is_offline(&self) -> bool {
        self.offline.load(Ordering::SeqCst)
    }

    fn connected(&self, device: &DeviceId) -> bool {
        self.sessions
            .lock()
            .map(|s| s.get(device).copied().unwrap_or(0) > 0)
            .unwrap_or(false)
    }

    /// Runs the backfills the core asks for, one at a time, while this device is still behind
    /// its leader's compaction point when one starts.
    pub(crate) async fn backfill_loop(
        self: Arc<Self>,
        mut wanted: tokio::sync::mpsc::Receiver<DeviceId>,
    ) {
        while let Some(leader) = wanted.recv().await {
            let behind = self
                .status
                .lock()
                .map(|s| s.behind_compaction > s.compacted_to)
                .unwrap_or(false);
            let addr = self.addrs.lock().ok().and_then(|a| a.get(&leader).copied());
            let (Some(link), true, Some(addr)) = (self.link.upgrade(), behind, addr) else {
                continue;
            };
            let pulled = super::backfill::pull(&self, link, (leader, addr)).await;
            match pulled {
                Ok(report) => {
                    tracing::info!(
                        base = report.base,
                        rows = report.rows,
                        resubmitted = report.resubmitted,
                        "backfilled from the leader's snapshot"
                    );
                    // Asked while this one ran: answered by it.
                    while wanted.try_recv().is_ok() {}
                }
                Err(super::NodeError::Engine(keel_engine::EngineError::Cancelled)) => {
                    tracing::info!(
                        secs = BACKFILL_AFTER_CANCEL.as_secs(),
                        "backfill cancelled; it goes on from its last batch after a while"
                    );
                    tokio::time::sleep(BACKFILL_AFTER_CANCEL).await;
                    while wanted.try_recv().is_ok() {}
                }
                Err(error) => {
                    tracing::warn!(%error, "backfill failed; it goes on from its last batch");
                    tokio::time::sleep(BACKFILL_RETRY).await;
                }
            }
        }
    }

    /// Accepts connections until the endpoint closes.
    pub(crate) async fn accept_loop(self: Arc<Self>) {
        while let Some(incoming) = self.endpoint.accept().await {
            if self.is_offline() {
                if let Ok(conn) = incoming {
                    conn.close("offline");
                }
                continue;
            }
            match incoming {
                Ok(conn) if conn.pinned() => {
                    tokio::spawn(self.clone().session(conn));
                }
                Ok(conn) => {
                    // Unpinned devices get in only to pair, and only a few at a time.
                    match self.unpinned.clone().try_acquire_owned() {
                        Ok(slot) => {
                            let net = self.clone();
                            tokio::spawn(async move {
                                pairing::serve_joiner(net, conn).await;
                                drop(slot);
                            });
                        }
                        Err(_) => conn.close("busy"),
                    }
                }
                Err(e) => tracing::debug!(error = %e, "incoming connection refused"),
            }
        }
    }

    /// Keeps a connection to `addr` up (no-op if a dialer for it runs already, or if
    /// [`DIALERS_MAX`] run already).
    pub(crate) fn dial(self: &Arc<Self>, addr: SocketAddr) {
        let fresh = self
            .dialing
            .lock()
            .map(|mut d| d.len() < DIALERS_MAX && d.insert(addr))
            .unwrap_or(false);
        if fresh {
            tokio::spawn(self.clone().dial_loop(addr));
        }
    }

    async fn dial_loop(self: Arc<Self>, addr: SocketAddr) {
        let mut attempt = 0u32;
        let mut known: Option<DeviceId> = None;
        loop {
            if self.is_offline() || known.is_some_and(|d| self.connected(&d)) {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            // Registered before the attempt, so a wake during it is not missed.
            let woken = self.wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let attempted = tokio::select! {
                result = tokio::time::timeout(CONNECT_TIMEOUT, self.endpoint.connect(addr)) => result,
                _ = &mut woken => {
                    attempt = 0;
                    continue;
                }
            };
            match attempted {
                Ok(Ok(conn)) => {
                    attempt = 0;
                    known = Some(conn.peer());
                    self.clone().session(conn).await;
                    continue;
                }
                Ok(Err(e)) => tracing::debug!(%addr, error = %e, "connecting failed"),
                Err(_) => tracing::debug!(%addr, "connecting timed out"),
            }
            // Failed or timed out: wait (longer each time) unless woken.
            tokio::select! {
                _ = tokio::time::sleep(backoff_delay(attempt)) => {
                    attempt = attempt.saturating_add(1);
                }
                _ = &mut woken => attempt = 0,
            }
        }
    }

    /// Runs one session: Hello both ways, then messages until the connection ends.
    pub(crate) async fn session(self: Arc<Self>, conn: Connection) {
        let peer = conn.peer();
        let (epoch, log_end) = self
            .status
            .lock()
            .map(|s| (s.epoch, Lsn(s.log_len)))
            .unwrap_or_default();
        match self.greet(&conn, epoch, log_end).await {
            Greeting::Sync => {}
            Greeting::Snapshot(models) => {
                // A device that has just joined: a snapshot, outside the replication core.
                let asker = super::snapshot::Asker {
                    conn,
                    models,
                    history: self.join_history,
                };
                super::snapshot::serve((self.link.clone(), &self.core), epoch, asker, &self.joins)
                    .await;
                return;
            }
            Greeting::Backfill => {
                // One at a time per device: each holds a thread reading the snapshot.
                let Some(_slot) = BackfillSlot::claim(&self.backfilling, peer) else {
                    tracing::warn!(peer = %peer.short(), "a second backfill of one device; closed");
                    conn.close("a backfill of this device is being served");
                    return;
                };
                super::backfill::serve(self.link.clone(), conn, self.snapshot_keep).await;
                return;
            }
            Greeting::AntiEntropy(first) => {
                let (link, library) = (self.link.clone(), self.library);
                super::anti_entropy::serve(link, library, conn, *first).await;
                return;
            }
            Greeting::Closed => return,
        }
        let addr = conn.remote_address();
        if let Ok(mut addrs) = self.addrs.lock() {
            addrs.insert(peer, addr);
        }
        self.remember_addr(peer, addr);
        let conn = Arc::new(conn);
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut live) = self.live.lock() {
            live.insert(id, conn.clone());
        }
        let (tx, mut rx) =
            tokio::sync::mpsc::channel::<DeviceMessage>(super::core::SESSION_QUEUE_MAX);
        if let Ok(mut sessions) = self.sessions.lock() {
            *sessions.entry(peer).or_default() += 1;
        }
        let _ = self.core.send(CoreEvent::Connected { peer, conn: id, tx });
        // Tell everyone (this new peer included) where the others are; give the new peer
        // every library key (it may have missed a rotation).
        tokio::spawn({
            let net = self.clone();
            let conn = conn.clone();
            async move {
                net.send_keys(&conn).await;
                net.share_peers().await
            }
        });
        let writer_conn = conn.clone();
        let writer = tokio::spawn(async move {
            while let Some(message) = rx.recv().await {
                if let Err(e) = writer_conn.send(&message).await {
                    tracing::debug!(error = %e, "send failed");
                    break;
                }
            }
        });
        self.receive(peer, &conn).await;
        writer.abort();
        if let Ok(mut live) = self.live.lock() {
            live.remove(&id);
        }
        if let Ok(mut ended) = self.ended_bytes.lock() {
            let (sent, received) = conn.wire_bytes();
            ended.0 += sent;
            ended.1 += received;
        }
        if let Ok(mut sessions) = self.sessions.lock() {
            if let Some(n) = sessions.get_mut(&peer) {
                *n = n.saturating_sub(1);
            }
        }
        let _ = self.core.send(CoreEvent::Disconnected { peer, conn: id });
    }

    /// Sends this device's Hello and reads the peer's: a sync session, a snapshot request from a
    /// device that has just joined, or a connection closed with the reason.
    async fn greet(&self, conn: &Connection, epoch: Epoch, log_end: Lsn) -> Greeting {
        let peer = conn.peer();
        let hello = DeviceMessage::Hello {
            device: self.device,
            library: self.library,
            epoch,
            log_end,
            positions: Vec::new(),
        };
        if let Err(e) = conn.send(&hello).await {
            tracing::debug!(peer = %peer.short(), error = %e, "hello not sent");
            return Greeting::Closed;
        }
        match tokio::time::timeout(HELLO_TIMEOUT, conn.recv()).await {
            Ok(Ok(DeviceMessage::Hello {
                device, library, ..
            })) if device == peer && library == self.library => Greeting::Sync,
            Ok(Ok(DeviceMessage::SnapshotRequest { library, models }))
                if library == self.library =>
            {
                Greeting::Snapshot(models)
            }
            Ok(Ok(DeviceMessage::BackfillRequest { library })) if library == self.library => {
                Greeting::Backfill
            }
            Ok(Ok(request @ DeviceMessage::RangeDigestsRequest { library, .. }))
                if library == self.library =>
            {
                Greeting::AntiEntropy(Box::new(request))
            }
            Ok(Ok(_)) => {
                tracing::warn!(peer = %peer.short(), "peer did not say Hello for this library; closed");
                conn.close("expected Hello for this library");
                Greeting::Closed
            }
            Ok(Err(e)) => {
                tracing::warn!(peer = %peer.short(), error = %e, "peer's Hello unreadable; closed");
                conn.close("malformed message");
                Greeting::Closed
            }
            Err(_) => {
                conn.close("no Hello");
                Greeting::Closed
            }
        }
    }

    /// Hands the peer's replication messages to the core until the connection ends.
    async fn receive(self: &Arc<Self>, peer: DeviceId, conn: &Connection) {
        loop {
            match conn.recv().await {
                Ok(DeviceMessage::Replication(message)) => {
                    let received = CoreEvent::Received {
                        from: peer,
                        message,
                    };
                    match self.core.try_send(received) {
                        Ok(()) => {}
                        Err(crossbeam_channel::TrySendError::Full(_)) => {
                            tracing::debug!(peer = %peer.short(), "core queue full; message dropped");
                        }
                        Err(crossbeam_channel::TrySendError::Disconnected(_)) => return,
                    }
                }
                Ok(DeviceMessage::Peers { peers }) => self.learn_peers(peer, peers),
                Ok(DeviceMessage::LibraryKeys { keys, revoked }) => {
                    self.learn_keys(peer, keys, revoked)
                }
                Ok(other) => {
                    tracing::debug!(peer = %peer.short(), message = ?std::mem::discriminant(&other), "a message that has no place in a sync session; ignored");
                }
                Err(e) => {
                    if e.is_hostile() {
                        tracing::warn!(peer = %peer.short(), error = %e, "peer sent a malformed or oversized message; connection closed");
                        conn.close("malformed message");
                    } else {
                        tracing::debug!(peer = %peer.short(), error = %e, "connection ended");
                    }
                    return;
                }
            }
        }
    }

    /// Every [`PEER_SHARE_INTERVAL`], tells each session where the library's other devices
    /// were reached, so that devices paired through this one find each other.
    pub(crate) async fn share_peers_loop(self: Arc<Self>) {
        loop {
            tokio::time::sleep(PEER_SHARE_INTERVAL).await;
            if !self.is_offline() {
                self.close_unpinned();
                self.dial_heard();
                self.share_peers().await;
            }
        }
    }

    /// Closes the sessions of devices that are no longer pinned (revoked, here or elsewhere).
    fn close_unpinned(&self) {
        let pins = self.endpoint.pins();
        for conn in self.sessions_where(|peer| !pins.contains(peer)) {
            tracing::info!(peer = %conn.peer().short(), "closing the session of a revoked device");
            conn.close("revoked");
        }
    }

    /// Dials the devices heard of that are pinned by now.
    fn dial_heard(self: &Arc<Self>) {
        let ready: Vec<(DeviceId, SocketAddr)> = self
            .heard
            .lock()
            .map(|mut heard| {
                let pins = self.endpoint.pins();
                let ready: Vec<_> = heard
                    .iter()
                    .filter(|(d, _)| pins.contains(d))
                    .map(|(d, a)| (*d, *a))
                    .collect();
                for (d, _) in &ready {
                    heard.remove(d);
                }
                ready
            })
            .unwrap_or_default();
        for (device, addr) in ready {
            if !self.connected(&device) {
                self.remember_addr(device, addr);
                self.dial(addr);
            }
        }
    }

    async fn share_peers(&self) {
        let known: Vec<PeerAddr> = self
            .addrs
            .lock()
            .map(|a| {
                a.iter()
                    .map(|(device, addr)| PeerAddr {
                        device: *device,
                        addr: *addr,
                    })
                    .collect()
            })
            .unwrap_or_default();
        for conn in self.sessions_where(|_| true) {
            let peers: Vec<PeerAddr> = known
                .iter()
                .filter(|p| p.device != conn.peer())
                .take(PEERS_MAX)
                .copied()
                .collect();
            if peers.is_empty() {
                continue;
            }
            if let Err(e) = conn.send(&DeviceMessage::Peers { peers }).await {
                tracing::debug!(peer = %conn.peer().short(), error = %e, "peers not sent");
            }
        }
    }

    /// Dials the devices `from` says it reached, if they are pinned (paired and not revoked)
    /// and not connected already; remembers where they were.
    fn learn_peers(self: &Arc<Self>, from: DeviceId, peers: Vec<PeerAddr>) {
        for PeerAddr { device, addr } in peers {
            if device == self.device || self.connected(&device) {
                continue;
            }
            if !self.endpoint.pins().contains(&device) {
                // Its Device record may not have arrived yet: dialed once it is pinned.
                if let Ok(mut heard) = self.heard.lock() {
                    if heard.len() < PEERS_MAX || heard.contains_key(&device) {
                        heard.insert(device, addr);
                    }
                }
                continue;
            }
            tracing::debug!(peer = %from.short(), device = %device.short(), %addr, "learned where a device is");
            self.remember_addr(device, addr);
            self.dial(addr);
            self.wake_dialers();
        }
    }

    /// Records where a paired device listens, so `serve` reaches it next time without `--peer`.
    fn remember_addr(&self, peer: DeviceId, addr: SocketAddr) {
        let Ok(mut file) = super::devices::DevicesFile::read(&self.library_dir) else {
            return;
        };
        if !file.remember_addr(peer, addr) {
            return;
        }
        if let Err(e) = file.write(&self.library_dir) {
            tracing::warn!(error = %e, "could not record a peer's address");
        }
    }
}

/// How a connection's first exchange went.
enum Greeting {
    /// Both said Hello for this library: a sync session.
    Sync,
    /// The peer asked for a snapshot (it has just joined), for models of this fingerprint.
    Snapshot(String),
    /// The peer asked for this device's snapshot (it is behind the compaction point).
    Backfill,
    /// The peer asked for range digests (anti-entropy): its first request.
    AntiEntropy(Box<DeviceMessage>),
    /// Closed (the reason is logged and sent).
    Closed,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_with_jitter_around_it() {
        for attempt in 0..20 {
            let base = (BACKOFF_MIN_MS << attempt.min(16)).min(BACKOFF_MAX_MS);
            let delays: Vec<u64> = (0..50)
                .map(|_| backoff_delay(attempt).as_millis() as u64)
                .collect();
            assert!(delays
                .iter()
                .all(|d| *d >= base / 2 && *d <= base + base / 2));
            // Jitter: not every delay is the same.
            assert!(delays.iter().any(|d| *d != delays[0]), "attempt {attempt}");
        }
        assert!(backoff_delay(30).as_millis() as u64 <= BACKOFF_MAX_MS * 3 / 2);
    }

    #[test]
    fn a_device_holds_one_backfill_slot_at_a_time() {
        let held = Arc::new(Mutex::new(HashSet::new()));
        let (a, b) = (DeviceId([1; 32]), DeviceId([2; 32]));
        let first = BackfillSlot::claim(&held, a).expect("free");
        assert!(
            BackfillSlot::claim(&held, a).is_none(),
            "a second one refused"
        );
        let other = BackfillSlot::claim(&held, b).expect("another device's is its own");
        drop(first);
        assert!(
            BackfillSlot::claim(&held, a).is_some(),
            "free again once it ended"
        );
        drop(other);
        assert!(held.lock().expect("lock").is_empty());
    }
}
