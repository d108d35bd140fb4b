//! The core thread: runs the protocol core ([`Replica`]) over the journal, following its
//! contract: inputs handled, events acted on, writes made durable, and only then messages sent.
//! A journal error restarts the replica from the journal (what is durable is the truth).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use keel_journal::{CommitRoute, Journal, JournalError, Placement, RecordPlace, Sealer};
use keel_schema::{ChangeId, DeviceId, Epoch, Lsn, SyncDomain};
use keel_transport::DeviceMessage;
use tokio::sync::mpsc::Sender;

use crate::error::NodeError;
use keel_engine::{Event, NodeLink, SequenceReply, SequenceRequest};
use keel_replication::wire::ClockFloor;
use keel_replication::{
    Durable, ElectionRole, Log, LogSlot, LogWrite, Opened, Replica, ReplicaConfig, ReplicaError,
    ReplicaEvent, ReplicationMessage, Store,
};

use super::status::{AppliedDomains, NodeStatus};

/// Time spent on one step beyond which a follower tells its replica it was busy, not deaf.
const SLOW_STEP_MS: u64 = 10;
/// Most queued events taken before one journal write and send.
const EVENTS_PER_FLUSH_MAX: usize = 256;
/// Most received log entries written in one journal transaction.
const ENTRIES_PER_FLUSH_MAX: usize = 16_384;
/// How often the pins are refreshed from the library's Device records.
const PIN_REFRESH_MS: u64 = 250;
/// Events queued for the core thread. Peers' messages beyond it are dropped (the protocol
/// resends); session changes wait for room.
pub(crate) const CORE_QUEUE_MAX: usize = 4096;
/// Messages queued for one session's sender; a peer that reads slower loses the rest.
pub(crate) const SESSION_QUEUE_MAX: usize = 256;
/// How often, at most, the status is published while things change.
const STATUS_MS: u64 = 10;
/// How often a core whose journal could not be read after a failed write tries again.
const STORAGE_RETRY_MS: u64 = 100;

/// What the network side tells the core.
pub(crate) enum CoreEvent {
    /// A replication message from an authenticated, pinned peer.
    Received {
        from: DeviceId,
        message: ReplicationMessage,
    },
    /// A session with `peer` is up; `tx` sends to it.
    Connected {
        peer: DeviceId,
        conn: u64,
        tx: Sender<DeviceMessage>,
    },
    /// That session ended.
    Disconnected { peer: DeviceId, conn: u64 },
    /// A backfill pulled the leader's snapshot: drop the log, start it again after the
    /// snapshot's base, and reload (see `crate::backfill`). Answered with the changes sent
    /// back to the offline journal.
    Rebase {
        plan: Box<keel_engine::BackfillPlan>,
        reply: crossbeam_channel::Sender<Result<u64, NodeError>>,
    },
    /// Fetch the log again from this damaged record on (see [`crate::Node::repair_log`]).
    RepairLog {
        damaged: Lsn,
        reply: crossbeam_channel::Sender<Result<Option<u64>, NodeError>>,
    },
    /// A join asks where the joiner's log may start: the position every other device of the
    /// library holds for good (see `Replica::compactable`), 0 unless leading.
    Settled {
        except: DeviceId,
        reply: crossbeam_channel::Sender<Lsn>,
    },
    /// The start check read the log back through this position and found it whole (see
    /// `keel_replication::Replica::hold_until_checked`).
    LogChecked { through: Lsn },
    /// Stop the core.
    Stop,
}

pub(crate) struct Core {
    link: Arc<NodeLink>,
    config: ReplicaConfig,
    replica: Replica,
    conns: HashMap<DeviceId, Vec<(u64, Sender<DeviceMessage>)>>,
    status: Arc<Mutex<NodeStatus>>,
    start: Instant,
    pins: keel_transport::Pins,
    last_pin_refresh: u64,
    last_status: u64,
    /// Something changed since the status was last published.
    status_dirty: bool,
    batch_entries: usize,
    /// This device's commits sequenced directly (see `crate::leader_commit`), answered once the
    /// next flush made them durable.
    sequenced: Vec<(Vec<Placement>, crossbeam_channel::Sender<SequenceReply>)>,
    /// Leaders whose entries did not open here, shut out for a while.
    shut_out: super::quarantine::Quarantine,
    /// Whether this device is in sync (see [`Core::publish_sync`]); hosts wait on it.
    in_sync: tokio::sync::watch::Sender<bool>,
    /// How far the leader last said its log goes (0: not said since the leader changed).
    leader_end: u64,
    /// The leader last announced in an event.
    announced_leader: Option<DeviceId>,
    /// The library's other devices this one trusts and has not revoked: what must have
    /// acknowledged a position before the log is compacted to it.
    members: Vec<DeviceId>,
    /// The other devices this one trusts and has not revoked, with a Device record here or not
    /// yet (a device a follower invited): each is pinned, and the horizon waits for each one's
    /// clock floor.
    awaited: Vec<DeviceId>,
    /// The device that led the log's first epoch (kept by the journal once that entry is
    /// compacted away).
    founder: Option<DeviceId>,
    /// The leader's compaction position when this device's log cannot continue the leader's
    /// (0: it can).
    behind_compaction: u64,
    /// Whether an unused backfill was looked for since this device was last behind.
    scratch_checked: bool,
    /// Log entries a leader keeps for a device that has not acknowledged them (see
    /// `NodeOptions::retain_for_absent`).
    retain: u64,
    /// Where to ask for a backfill from a leader (the node's backfill task; full: one runs).
    backfill: tokio::sync::mpsc::Sender<DeviceId>,
    /// When the journal last failed to load after a failed write (`None`: it loads). Until it
    /// loads again the replica's state is not the journal's: it takes no input and sends
    /// nothing, so it acknowledges nothing the disk does not hold.
    storage_failed_at: Option<u64>,
    /// A log record found damaged while preparing a message: repaired (see
    /// [`Core::repair_log`]) once the current step is done.
    damage_found: Option<Lsn>,
    /// A truncation dropped other devices' changes the projections may hold: they are rebuilt
    /// (see `Library::rebuild_if_stale`) on a thread of their own, one at a time.
    rebuild_wanted: bool,
    /// The rebuild running; it ends with whether it caught up with the truncations.
    rebuilding: Option<std::thread::JoinHandle<bool>>,
    /// Epoch changes seen since the start, and the last epoch seen.
    elections: (u64, Epoch),
    /// When each device's session was last up (wall-clock ms), for the status.
    last_seen: HashMap<DeviceId, u64>,
    /// When each follower last held the whole log (wall-clock ms), for the status.
    caught_up: HashMap<DeviceId, u64>,
}

/// What the replica reads: the journal, the projections' progress, the library key.
struct JournalStore<'a> {
    link: &'a NodeLink,
    journal: &'a Journal,
}

impl Store for JournalStore<'_> {
    type Error = NodeError;

    fn read_log(&mut self, first: Lsn, count: usize) -> Result<Vec<(Epoch, Vec<u8>)>, NodeError> {
        Ok(self
            .journal
            .log()
            .entries(first, count)?
            .into_iter()
            .map(|(_, epoch, sealed)| (epoch, sealed))
            .collect())
    }

    fn read_offline(&mut self) -> Result<Vec<(ChangeId, Vec<u8>)>, NodeError> {
        Ok(self.journal.offline().changes()?)
    }

    fn applied(&mut self) -> Lsn {
        self.link.library().sync_state().applied_lsn()
    }

    fn floor(&mut self) -> Option<ClockFloor> {
        own_floor(self.link.library())
    }

    fn peek_change_id(&self, sealed: &[u8]) -> Option<ChangeId> {
        Sealer::peek_change_id(sealed)
    }

    fn open_pushed(&self, sealed: &[u8]) -> Result<Opened, String> {
        let change = self
            .journal
            .check_sealed(sealed)
            .map_err(|e| e.to_string())?;
        if change.model == keel_schema::code_of::<keel_schema::Horizon>() {
            // Only a leader makes a horizon, from every device's floor (decision 0082).
            return Err("a horizon comes only from the leader that made it".into());
        }
        Ok(Opened {
            id: change.id,
            origin: change.origin(),
        })
    }
}

/// This device's clock floor as the replica sends it (see `Library::clock_floor`).
fn own_floor(library: &keel_engine::Library) -> Option<ClockFloor> {
    match library.clock_floor() {
        Ok(floor) => floor.map(|hlc| ClockFloor {
            ms: hlc.physical_ms,
            counter: hlc.counter,
        }),
        Err(error) => {
            tracing::warn!(%error, "reading this device's clock floor failed");
            None
        }
    }
}

/// A map by device as (hex, value) pairs, for the status.
fn by_hex<'a>(map: impl IntoIterator<Item = (&'a DeviceId, &'a u64)>) -> Vec<(String, u64)> {
    map.into_iter().map(|(d, v)| (d.to_hex(), *v)).collect()
}

fn from_replica(e: ReplicaError<NodeError>) -> NodeError {
    match e {
        ReplicaError::Store(e) => e,
        other => NodeError::Failed(other.to_string()),
    }
}

/// The log as the journal saves it.
fn log_index(log: &Log) -> keel_journal::LogIndex {
    let mut index = keel_journal::LogIndex::after(log.base(), log.base_epoch());
    for (epoch, entry) in log.iter() {
        index.push(
            epoch,
            match entry {
                LogSlot::Change(id) => Some(id),
                LogSlot::Barrier => None,
            },
        );
    }
    index
}

/// The replica's durable state as the journal holds it.
fn load(journal: &Journal) -> Result<Durable, NodeError> {
    let epoch = journal.election().epoch()?.unwrap_or_default();
    let voted = journal.election().voted()?.unwrap_or(epoch);
    let index = journal.log().load_index()?;
    let base = index.base();
    let (runs, ids) = index.into_parts();
    let log = Log::from_parts(base, runs, ids);
    let offline = journal
        .offline()
        .changes()?
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    Ok(Durable {
        epoch,
        voted,
        log,
        offline,
        vote_floor: journal.election().vote_floor()?,
    })
}

impl Core {
    pub(crate) fn new(
        link: Arc<NodeLink>,
        config: ReplicaConfig,
        status: Arc<Mutex<NodeStatus>>,
        pins: keel_transport::Pins,
        in_sync: tokio::sync::watch::Sender<bool>,
        (backfill, retain): (tokio::sync::mpsc::Sender<DeviceId>, u64),
    ) -> Result<Self, NodeError> {
        let journal = link.journal()?;
        // The core sequences this device's changes: commits wait in the offline journal.
        journal.set_role(CommitRoute::Offline)?;
        let replica = Replica::new(config.clone(), load(journal)?, 0);
        let founder = journal.log().head()?.map(|e| e.device);
        let mut core = Self {
            link,
            config,
            replica,
            conns: HashMap::new(),
            status,
            start: Instant::now(),
            pins,
            last_pin_refresh: 0,
            last_status: 0,
            status_dirty: true,
            batch_entries: 0,
            sequenced: Vec::new(),
            shut_out: Default::default(),
            in_sync,
            leader_end: 0,
            announced_leader: None,
            members: Vec::new(),
            awaited: Vec::new(),
            founder,
            behind_compaction: 0,
            scratch_checked: false,
            backfill,
            retain,
            storage_failed_at: None,
            damage_found: None,
            rebuild_wanted: false,
            rebuilding: None,
            elections: (0, Epoch::default()),
            last_seen: HashMap::new(),
            caught_up: HashMap::new(),
        };
        core.link
            .set_leading(core.replica.role() == ElectionRole::Leader);
        core.flush();
        core.refresh_pins();
        core.publish_status();
        Ok(core)
    }

    fn now(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// The next time something is due: the replica's timeout, a pin refresh, a status update.
    fn deadline(&self) -> u64 {
        let mut deadline = self
            .replica
            .poll_timeout()
            .min(self.last_pin_refresh + PIN_REFRESH_MS)
            .min(self.shut_out.next_end().unwrap_or(u64::MAX));
        if self.status_dirty {
            deadline = deadline.min(self.last_status + STATUS_MS);
        }
        deadline
    }

    /// Runs until `Stop` or the event channel closes.
    pub(crate) fn run(mut self, events: Receiver<CoreEvent>) {
        let commits = self.link.offline_commits().clone();
        let mut to_sequence = self.link.sequence_requests().clone();
        'run: loop {
            // Sleep until the next input or the next deadline (at least 1 ms, so that a
            // deadline in the past cannot spin the thread).
            let wait = Duration::from_millis(self.deadline().saturating_sub(self.now()).max(1));
            crossbeam_channel::select! {
                recv(events) -> event => match event {
                    Ok(CoreEvent::Stop) | Err(_) => break 'run,
                    Ok(event) => self.on_event(event),
                },
                recv(commits) -> ids => match ids {
                    Ok(ids) => self.on_commits(ids),
                    Err(_) => break 'run,
                },
                recv(to_sequence) -> request => match request {
                    Ok(request) => self.on_sequence(request),
                    // No sequencer attached (or detached): a closed channel is always ready, so
                    // stop watching it rather than spin.
                    Err(_) => to_sequence = crossbeam_channel::never(),
                },
                default(wait) => {}
            }
            if !self.take_waiting(&events, &commits, &to_sequence) {
                break 'run;
            }
            self.on_deadlines();
            self.flush();
            if let Some(damaged) = self.damage_found.take() {
                self.repair_found(damaged);
            }
            self.rebuild_if_wanted();
        }
        // Commits go by the offline journal again from here (requests still queued are dropped
        // unanswered, which sends their callers that way too).
        self.link.stop_sequencing();
        if self.flush() {
            self.save_log_index();
        }
        if let Some(rebuilding) = self.rebuilding.take() {
            // A rebuild stops at its next checkpoint; the next open rebuilds (the journal
            // still counts the truncation).
            let _ = self.link.library().stop_jobs();
            let _ = rebuilding.join();
        }
        self.publish_status();
    }

    /// Starts a rebuild of the projections after a truncation dropped changes they may hold,
    /// unless one runs (it is started again after it ends, since the truncation may have come
    /// after its last look at the journal).
    fn rebuild_if_wanted(&mut self) {
        if self.rebuilding.as_ref().is_some_and(|r| r.is_finished()) {
            let caught_up = self.rebuilding.take().map(|r| r.join());
            // Truncations kept coming: once more. (A failed one is left to the next open.)
            self.rebuild_wanted |= matches!(caught_up, Some(Ok(false)));
        }
        if !self.rebuild_wanted || self.rebuilding.is_some() {
            return;
        }
        self.rebuild_wanted = false;
        let library = self.link.library().clone();
        let spawned = std::thread::Builder::new()
            .name("keel-rebuild".into())
            .spawn(move || match library.rebuild_if_stale() {
                Ok(caught_up) => caught_up,
                Err(error) => {
                    tracing::warn!(%error, "rebuilding the projections after a truncation failed; the next open does");
                    true
                }
            });
        match spawned {
            Ok(handle) => self.rebuilding = Some(handle),
            Err(error) => {
                tracing::warn!(%error, "no thread to rebuild the projections; the next open does")
            }
        }
    }

    /// Takes whatever else is waiting, so one journal write covers all of it (within bounds: a
    /// long write would look like a silent leader). False when told to stop.
    fn take_waiting(
        &mut self,
        events: &Receiver<CoreEvent>,
        commits: &Receiver<Vec<ChangeId>>,
        to_sequence: &Receiver<SequenceRequest>,
    ) -> bool {
        for _ in 0..EVENTS_PER_FLUSH_MAX {
            if self.batch_entries >= ENTRIES_PER_FLUSH_MAX {
                break;
            }
            if let Ok(ids) = commits.try_recv() {
                self.on_commits(ids);
                continue;
            }
            if let Ok(request) = to_sequence.try_recv() {
                self.on_sequence(request);
                continue;
            }
            match events.try_recv() {
                Ok(CoreEvent::Stop) => return false,
                Ok(event) => self.on_event(event),
                Err(_) => break,
            }
        }
        true
    }

    /// Fires what is due: the replica's timers, the pin refresh, the status.
    fn on_deadlines(&mut self) {
        let now = self.now();
        if self.storage_failed_at.is_none() && now >= self.replica.poll_timeout() {
            self.replica.handle_timeout(now);
            self.after_input();
        }
        if now >= self.last_pin_refresh + PIN_REFRESH_MS {
            self.last_pin_refresh = now;
            self.refresh_pins();
        }
        if self.status_dirty && now >= self.last_status + STATUS_MS {
            self.publish_status();
        }
        for device in self.shut_out.ended(now) {
            tracing::info!(peer = %device.short(), "a leader shut out is let back in");
            if self.conns.contains_key(&device) {
                self.replica.handle_connected(now, device);
                self.after_input();
            }
        }
    }

    /// Saves the log index in the journal, so the next start need not read every record (see
    /// [`keel_journal::LogIndex`]). Only after a flush that succeeded: the log in memory is then
    /// the journal's.
    fn save_log_index(&self) {
        let Ok(journal) = self.link.journal() else {
            return;
        };
        let log = &self.replica.durable().log;
        if let Err(e) = journal.log().save_index(&log_index(log)) {
            tracing::warn!(error = %e, "saving the log index failed; the next start reads the whole log");
        }
    }

    /// Appends this device's commits to the log while leading; answered at the next flush.
    fn on_sequence(&mut self, request: SequenceRequest) {
        if self.storage_failed_at.is_some() {
            let _ = request
                .reply
                .send(SequenceReply::Failed("the journal's storage failed".into()));
            return;
        }
        if self.replica.role() != ElectionRole::Leader {
            let _ = request.reply.send(SequenceReply::NotLeading);
            return;
        }
        let mut placements = Vec::with_capacity(request.changes.len());
        let now = self.now();
        for (id, sealed) in request.changes {
            if let Some(lsn) = self.replica.handle_commit(now, id, Some(sealed)) {
                placements.push(Placement::Log(lsn));
                self.batch_entries += 1;
            }
        }
        self.after_input();
        self.sequenced.push((placements, request.reply));
    }

    /// This device's commits that wait in the offline journal.
    fn on_commits(&mut self, ids: Vec<ChangeId>) {
        if self.storage_failed_at.is_some() {
            // In the offline journal: the replica finds them there when it loads again.
            return;
        }
        let now = self.now();
        for id in ids {
            self.replica.handle_commit(now, id, None);
        }
        self.after_input();
    }

    fn on_event(&mut self, event: CoreEvent) {
        let now = self.now();
        match event {
            CoreEvent::Connected { peer, conn, tx } => {
                let list = self.conns.entry(peer).or_default();
                let first = list.is_empty();
                list.push((conn, tx));
                if first {
                    self.link.publish(Event::PeerConnected { device: peer });
                }
                if first && !self.shut_out.is_out(&peer, now) {
                    self.replica.handle_connected(now, peer);
                }
            }
            CoreEvent::Disconnected { peer, conn } => {
                if let Some(list) = self.conns.get_mut(&peer) {
                    list.retain(|(c, _)| *c != conn);
                    if list.is_empty() {
                        self.conns.remove(&peer);
                        self.link.publish(Event::PeerGone { device: peer });
                        if !self.shut_out.is_out(&peer, now) {
                            self.replica.handle_disconnected(now, peer);
                        }
                    }
                }
            }
            CoreEvent::Received { from, .. } if self.shut_out.is_out(&from, now) => {}
            // Not stored, so not acknowledged: the sender sends it again.
            CoreEvent::Received { .. } if self.storage_failed_at.is_some() => {}
            CoreEvent::Received { from, message } => {
                if let ReplicationMessage::LogSegment { entries, .. } = &message {
                    self.batch_entries += entries.len();
                }
                if let Ok(journal) = self.link.journal() {
                    let mut store = JournalStore {
                        link: &self.link,
                        journal,
                    };
                    self.replica.handle_message(now, from, message, &mut store);
                }
            }
            CoreEvent::Rebase { plan, reply } => {
                let _ = reply.send(self.rebase(&plan));
            }
            CoreEvent::RepairLog { damaged, reply } => {
                let _ = reply.send(self.repair_log(damaged));
            }
            CoreEvent::Settled { except, reply } => {
                let _ = reply.send(self.settled(except));
            }
            CoreEvent::LogChecked { through } => {
                self.replica.log_checked(through);
                self.status_dirty = true;
            }
            CoreEvent::Stop => {}
        }
        self.after_input();
        let done = self.now();
        if done > now + SLOW_STEP_MS {
            // The step waited (on the projections): what the leader sent meanwhile is still
            // queued, so that silence was not the leader's.
            self.replica.busy_until(done);
        }
    }

    /// Acts on the replica's events (before its writes, as the contract asks).
    fn after_input(&mut self) {
        self.status_dirty = true;
        while let Some(event) = self.replica.poll_event() {
            match event {
                ReplicaEvent::RoleChanged {
                    role,
                    epoch,
                    leader,
                } => {
                    self.link.set_leading(role == ElectionRole::Leader);
                    if leader != self.announced_leader {
                        self.announced_leader = leader;
                        self.leader_end = 0;
                        // Behind one leader's base says nothing of the next one's.
                        self.behind_compaction = 0;
                        self.link.publish(Event::LeaderChanged {
                            leader,
                            epoch: epoch.counter,
                        });
                    }
                    if epoch != self.elections.1 {
                        self.elections = (self.elections.0 + 1, epoch);
                    }
                    let _election =
                        tracing::info_span!("election", epoch = epoch.counter).entered();
                    tracing::info!(
                        role = %role,
                        epoch = epoch.counter,
                        by = %epoch.device.short(),
                        leader = ?leader.map(|d| d.short()),
                        "role or epoch changed"
                    );
                }
                ReplicaEvent::CatchingUp {
                    first,
                    stored,
                    leader_end,
                    bytes,
                } => {
                    let _catch_up = tracing::debug_span!(
                        "catch_up",
                        stored = stored.0,
                        leader_end = leader_end.0
                    )
                    .entered();
                    self.leader_end = leader_end.0;
                    if !self.scratch_checked {
                        // Entries from a leader: this device is not behind its compaction
                        // point, so a backfill it pulled before is of no use.
                        self.scratch_checked = true;
                        if let Err(e) = self.link.library().discard_backfill() {
                            tracing::warn!(error = %e, "could not remove an unused backfill");
                        }
                    }
                    if let Err(e) = self.link.catching_up(leader_end) {
                        tracing::warn!(error = %e, "could not prepare the projections for a catch-up");
                    }
                    if let Err(e) = self.link.catch_up_progress(first, stored, leader_end) {
                        tracing::warn!(error = %e, "could not record the catch-up job");
                    }
                    self.link.publish(Event::SyncProgress {
                        stored: stored.0,
                        leader_end: leader_end.0,
                        bytes,
                    });
                }
                ReplicaEvent::Refused { from, reason } => {
                    tracing::warn!(peer = %from.short(), %reason, "dropped input from a peer");
                }
                ReplicaEvent::BehindCompaction { leader, base } => {
                    if self.behind_compaction != base.0 {
                        tracing::warn!(
                            leader = %leader.short(),
                            base = base.0,
                            "behind the leader's compaction point: this device must backfill"
                        );
                    }
                    self.behind_compaction = base.0;
                    self.scratch_checked = false;
                    // Full: a backfill is under way (it looks again whether it is needed).
                    let _ = self.backfill.try_send(leader);
                }
            }
        }
    }

    /// Makes the replica's writes durable, then sends what it releases. Returns whether the
    /// writes succeeded.
    fn flush(&mut self) -> bool {
        self.batch_entries = 0;
        if !self.storage_works() {
            return false;
        }
        let started = self.now();
        let written = self.write();
        if self.now() > started + SLOW_STEP_MS {
            self.replica.busy_until(self.now());
        }
        if let Err(e) = written {
            tracing::error!(error = %e, "writing replication state failed; reloading it from the journal");
            self.shut_out_a_leader_to_blame(&e);
            for (_, reply) in self.sequenced.drain(..) {
                let _ = reply.send(SequenceReply::Failed(e.to_string()));
            }
            self.reload();
            return false;
        }
        self.replica.written();
        // Durable now: the committers first (they wait), then the peers.
        for (placements, reply) in self.sequenced.drain(..) {
            let _ = reply.send(SequenceReply::Done(placements));
        }
        self.transmit();
        true
    }

    /// After a write that failed on what the leader sent (an entry that does not open here, or
    /// from a clock far ahead: see [`crate::quarantine`]), shuts that leader out. Not for a
    /// key not held yet: the key is on its way.
    fn shut_out_a_leader_to_blame(&mut self, error: &NodeError) {
        use keel_journal::JournalError;
        let blamed = matches!(
            error,
            NodeError::Journal(JournalError::BadRecord { .. } | JournalError::ClockAhead { .. })
        );
        let leader = self.replica.leader().filter(|l| *l != self.config.device);
        if let (true, Some(leader)) = (blamed, leader) {
            let ms = self.shut_out.shut_out(leader, self.now());
            tracing::warn!(peer = %leader.short(), ms, error = %error, "the leader's entries do not open here; it is shut out for a while");
        }
    }

    /// Writes what the replica asks, in order.
    fn write(&mut self) -> Result<(), NodeError> {
        let journal = self.link.journal()?;
        let mut store = JournalStore {
            link: &self.link,
            journal,
        };
        while let Some(write) = self
            .replica
            .poll_log_write(&mut store)
            .map_err(from_replica)?
        {
            match write {
                LogWrite::Election { epoch, voted } => journal.election().store(epoch, voted)?,
                LogWrite::Append { at, entries } => journal.log().append(at, entries)?,
                LogWrite::Truncate { keep, dropped } => {
                    let returned = journal.log().truncate_after(keep, &dropped)?;
                    self.rebuild_wanted |= !dropped.is_empty();
                    tracing::info!(
                        keep = keep.0,
                        returned = returned.len(),
                        "log truncated after an epoch change; its changes will be resubmitted"
                    );
                }
            }
        }
        Ok(())
    }

    /// Sends every message the replica releases.
    fn transmit(&mut self) {
        let Ok(journal) = self.link.journal() else {
            return;
        };
        let mut store = JournalStore {
            link: &self.link,
            journal,
        };
        loop {
            match self.replica.poll_transmit(&mut store) {
                Ok(Some(transmit)) => {
                    if let Some((_, tx)) = self.conns.get(&transmit.to).and_then(|l| l.last()) {
                        // A peer that does not keep up loses messages, never this node's
                        // memory: the protocol sends again what goes unacknowledged.
                        if tx
                            .try_send(DeviceMessage::Replication(transmit.message))
                            .is_err()
                        {
                            tracing::debug!(peer = %transmit.to.short(), "send queue full; message dropped");
                        }
                    }
                }
                Ok(None) => break,
                Err(ReplicaError::Store(NodeError::Journal(JournalError::BadRecord {
                    place: RecordPlace::Log(lsn),
                    reason,
                }))) => {
                    // Never served: repaired after this step (a leader steps down first).
                    tracing::error!(at = lsn.0, %reason, "a log record to send is damaged");
                    self.damage_found = Some(self.damage_found.map_or(lsn, |d| d.min(lsn)));
                    break;
                }
                Err(e) => tracing::error!(error = %e, "a message could not be prepared; dropped"),
            }
        }
    }

    /// Repairs the log from a record found damaged on a read (see [`Core::repair_log`]).
    fn repair_found(&mut self, damaged: Lsn) {
        match self.repair_log(damaged) {
            Ok(Some(_)) => {}
            Ok(None) => tracing::debug!(at = damaged.0, "the damaged record was repaired already"),
            Err(e) => {
                tracing::error!(at = damaged.0, error = %e, "a damaged log record could not be repaired")
            }
        }
    }

    /// Puts a backfilled snapshot to use (see [`CoreEvent::Rebase`]): nothing else writes the
    /// log meanwhile, since this thread does all its writes.
    fn rebase(&mut self, plan: &keel_engine::BackfillPlan) -> Result<u64, NodeError> {
        self.flush();
        if plan.base <= self.replica.durable().log.base() {
            return Err(NodeError::Failed(format!(
                "backfill: the log is compacted to {} already",
                self.replica.durable().log.base().0
            )));
        }
        let returned = self.link.library().rebase_onto(plan, self.config.device)?;
        self.behind_compaction = 0;
        self.reload();
        // Trust starts from the log's head, which only the journal knows now.
        if let Ok(journal) = self.link.journal() {
            self.founder = journal.log().head().ok().flatten().map(|e| e.device);
        }
        // Now, not at the next tick: the backfill task looks at it before another backfill.
        self.publish_status();
        Ok(returned.len() as u64)
    }

    /// The log position every device of the library but `except` stored this epoch, while
    /// leading (the least of what they acknowledged; this log's end if there is no other): no
    /// election can truncate it, since every device that could win holds it. 0 otherwise.
    fn settled(&self, except: DeviceId) -> Lsn {
        if self.replica.role() != ElectionRole::Leader {
            return Lsn(0);
        }
        let others: Vec<DeviceId> = self
            .members
            .iter()
            .copied()
            .filter(|d| *d != except)
            .collect();
        self.replica.compactable(&others, u64::MAX)
    }

    /// Holds the replica from standing until the log it found on disk is read back (see
    /// `keel_replication::Replica::hold_until_checked`): returns that log's end, or `None` if
    /// there is no log.
    pub(crate) fn hold_until_checked(&mut self) -> Option<Lsn> {
        let end = self.replica.durable().last_lsn();
        let held = (end.0 > self.replica.durable().log.base().0).then(|| {
            self.replica.hold_until_checked(end);
            end
        });
        // Published before the check's thread starts: it must see a resumed leader as one.
        self.publish_status();
        held
    }

    /// Drops the log from `damaged` on (found by a scan or a read; checked again here, one
    /// record), so the leader sends it again; this device's readable changes after it go back
    /// to pending. Before the cut, a leader hands over: it abdicates (a new epoch of its own,
    /// never won, made durable first), so it never writes at those positions again in its old
    /// epoch; and every device stores its vote floor, so its cut log neither wins an election
    /// nor elects a leader lacking what it held (see `Replica::handle_abdicate`). The only
    /// device of a library just cuts its log: nobody else holds it.
    fn repair_log(&mut self, damaged: Lsn) -> Result<Option<u64>, NodeError> {
        self.flush();
        if self.link.journal()?.check_log(damaged, 1)?.damaged != Some(damaged) {
            return Ok(None);
        }
        let alone = self.link.library().devices()?.len() <= 1;
        if !alone {
            let leading = self.replica.role() == ElectionRole::Leader;
            let floor = self.replica.handle_abdicate(self.now());
            if leading {
                tracing::warn!(
                    damaged = damaged.0,
                    "a damaged log record on the leader: it steps down so that another device leads"
                );
                self.after_input();
                if !self.flush() {
                    return Err(NodeError::Failed(format!(
                        "log record {} is damaged, and stepping down could not be written",
                        damaged.0
                    )));
                }
            }
            self.link.journal()?.election().store_vote_floor(floor)?;
        }
        let keep = Lsn(damaged.0.saturating_sub(1));
        let returned = self.link.journal()?.log().truncate_after(keep, &[])?;
        tracing::warn!(
            damaged = damaged.0,
            returned = returned.len(),
            "a damaged log record: the log from it on is dropped and fetched again from the leader"
        );
        self.reload();
        self.publish_status();
        Ok(Some(damaged.0))
    }

    /// Starts the replica again from the journal after a failed write.
    fn reload(&mut self) {
        let Ok(journal) = self.link.journal() else {
            return;
        };
        match load(journal) {
            Ok(durable) => {
                let now = self.now();
                self.replica = self.replica.restarted(durable, now);
                // Its sessions are still up: tell the fresh replica.
                let peers: Vec<DeviceId> = self.conns.keys().copied().collect();
                for peer in peers {
                    if !self.shut_out.is_out(&peer, now) {
                        self.replica.handle_connected(now, peer);
                    }
                }
                self.after_input();
                if self.storage_failed_at.take().is_some() {
                    tracing::info!("the journal loads again; replication goes on");
                }
            }
            Err(e) => {
                if self.storage_failed_at.is_none() {
                    tracing::error!(error = %e, "reloading replication state failed; replication stops until the journal loads again");
                }
                self.storage_failed_at = Some(self.now());
                self.status_dirty = true;
            }
        }
    }

    /// Whether the journal works (the replica's state is the journal's). While it does not,
    /// loads it again every [`STORAGE_RETRY_MS`].
    fn storage_works(&mut self) -> bool {
        match self.storage_failed_at {
            None => true,
            Some(at) if self.now() >= at + STORAGE_RETRY_MS => {
                self.reload();
                self.storage_failed_at.is_none()
            }
            Some(_) => false,
        }
    }

    /// Pins every device this one trusts (unless revoked), and unpins the devices whose Device
    /// record was deleted (revoked on some device): they are recorded as revoked here too, so a
    /// Device record they write again does not bring them back. Net closes the sessions of
    /// devices no longer pinned. A trusted device is pinned before its Device record is here:
    /// a device a follower invited brings its record with its first push to the leader.
    fn refresh_pins(&mut self) {
        let dir = self.link.library().dir().to_path_buf();
        let mut file = super::devices::DevicesFile::read(&dir).unwrap_or_default();
        let deleted: std::collections::HashSet<uuid::Uuid> = self
            .link
            .library()
            .read(|p| p.query().deleted::<keel_schema::Device>())
            .map(|ids| ids.into_iter().collect())
            .unwrap_or_default();
        let mut newly_revoked = false;
        for id in file.ids().collect::<Vec<_>>() {
            if deleted.contains(&id.record_uuid()) && !file.is_revoked(&id) {
                file.revoke(id);
                newly_revoked = true;
            }
        }
        self.follow_compaction();
        let trusted = self.trusted(&file);
        let me = self.replica.device();
        self.awaited = trusted
            .iter()
            .copied()
            .filter(|id| *id != me && !file.is_revoked(id) && !deleted.contains(&id.record_uuid()))
            .collect();
        self.awaited.sort();
        for id in &self.awaited {
            self.pins.pin(*id);
        }
        // Members: those of them whose Device record is here (a deleted one is not listed).
        if let Ok(devices) = self.link.library().devices() {
            self.members = devices
                .iter()
                .filter_map(|d| DeviceId::from_hex(&d.device_id))
                .filter(|id| self.awaited.binary_search(id).is_ok())
                .collect();
        }
        for id in self.pinned_and_deleted(&deleted) {
            file.revoke(id);
            newly_revoked = true;
        }
        if newly_revoked {
            for id in file.revoked_ids() {
                self.pins.unpin(id);
            }
            if let Err(e) = file.write(&dir) {
                tracing::warn!(error = %e, "could not record a revoked device");
            }
        }
    }

    /// Drops from the replica's log what the journal compacted (a compaction job ran).
    fn follow_compaction(&mut self) {
        let Ok(journal) = self.link.journal() else {
            return;
        };
        let Ok((base, _)) = journal.log().base() else {
            return;
        };
        if base > self.replica.durable().log.base() && base <= self.replica.durable().last_lsn() {
            if self.founder.is_none() {
                self.founder = journal.log().head().ok().flatten().map(|e| e.device);
            }
            self.replica.compacted(base);
            self.status_dirty = true;
        }
    }

    /// The devices this one trusts: the library's founder (who led epoch 1, at the head of the
    /// log), this device, the devices it paired with itself (`devices.toml`), and every device
    /// endorsed by a trusted one (`Endorsement`, written by the inviter once its user let the
    /// joiner in). A Device record alone trusts nobody: its device writes it.
    fn trusted(&self, file: &super::devices::DevicesFile) -> std::collections::HashSet<DeviceId> {
        let mut trusted: std::collections::HashSet<DeviceId> = file.ids().collect();
        trusted.insert(self.replica.device());
        let log = &self.replica.durable().log;
        let head = if log.base().0 == 0 {
            log.iter().next().map(|(e, _)| e.device)
        } else {
            self.founder
        };
        trusted.extend(head);
        let endorsements: Vec<(DeviceId, DeviceId)> = self
            .link
            .library()
            .read(|p| p.query().select::<keel_schema::Endorsement, _>("1 = 1", []))
            .unwrap_or_default()
            .into_iter()
            .filter_map(|e| {
                Some((
                    DeviceId::from_hex(&e.by)?,
                    DeviceId::from_hex(&e.device_id)?,
                ))
            })
            .collect();
        loop {
            let before = trusted.len();
            for (by, device) in &endorsements {
                if trusted.contains(by) {
                    trusted.insert(*device);
                }
            }
            if trusted.len() == before {
                return trusted;
            }
        }
    }

    /// The pinned devices whose Device record was deleted.
    fn pinned_and_deleted(&self, deleted: &std::collections::HashSet<uuid::Uuid>) -> Vec<DeviceId> {
        self.pins
            .all()
            .into_iter()
            .filter(|id| deleted.contains(&id.record_uuid()))
            .collect()
    }

    /// Tells hosts whether this device is in sync, and publishes the change as an event: it
    /// leads, or it follows a connected leader, has pushed every change it made, stored as much
    /// log as the leader last said it has, and applied all of it.
    fn publish_sync(&mut self) {
        let durable = self.replica.durable();
        let log_len = durable.log.len() as u64;
        let led = match self.replica.role() {
            ElectionRole::Leader => true,
            _ => self
                .replica
                .leader()
                .is_some_and(|l| self.conns.contains_key(&l)),
        };
        let applied = self.link.library().sync_state().applied_lsn().0;
        let in_sync =
            led && durable.offline.is_empty() && log_len >= self.leader_end && applied >= log_len;
        let was = *self.in_sync.borrow();
        if in_sync != was {
            self.in_sync.send_replace(in_sync);
            self.link.publish(if in_sync {
                Event::SyncFinished { log_len }
            } else {
                Event::SyncStarted
            });
        }
    }

    fn publish_status(&mut self) {
        self.last_status = self.now();
        self.status_dirty = false;
        self.publish_sync();
        // Followers may compact as far as this leader may (their snapshots wait for it).
        let compactable = self.replica.compactable(&self.members, self.retain);
        self.replica.offer_compaction(compactable);
        let horizon = match self.replica.role() {
            ElectionRole::Leader => self
                .replica
                .horizon(&self.awaited, own_floor(self.link.library())),
            _ => None,
        };
        let waits_for = self.replica.floors_missing(&self.awaited);
        let durable = self.replica.durable();
        if let Ok(mut status) = self.status.lock() {
            status.role = self.replica.role();
            status.epoch = durable.epoch;
            status.leader = self.replica.leader().map(|d| d.to_hex());
            status.log_len = durable.last_lsn().0;
            status.compacted_to = durable.log.base().0;
            status.compactable = compactable.0;
            status.horizon = horizon;
            status.horizon_waits_for = waits_for.iter().map(|d| d.to_hex()).collect();
            // Backfilled to the leader's base (or past it), it is not behind any more.
            if self.replica.durable().log.base().0 >= self.behind_compaction {
                self.behind_compaction = 0;
            }
            status.behind_compaction = self.behind_compaction;
            status.storage_failed = self.storage_failed_at.is_some();
            status.log_unchecked = self.replica.is_unchecked();
            status.offline = durable.offline.len() as u64;
            status.connected = self.conns.keys().map(|d| d.to_hex()).collect();
            let now = keel_engine::now_ms();
            for peer in self.conns.keys() {
                self.last_seen.insert(*peer, now);
            }
            let end = durable.last_lsn();
            for (device, stored) in self.replica.stored() {
                if *stored >= end.0 {
                    self.caught_up.insert(*device, now);
                }
            }
            status.elections = self.elections.0;
            status.last_seen = by_hex(&self.last_seen);
            status.caught_up = by_hex(&self.caught_up);
            status.stored = by_hex(self.replica.stored());
            status.acknowledged = self
                .replica
                .acknowledged()
                .iter()
                .map(|(d, domains)| {
                    let at = |domain| domains.get(&domain).map_or(0, |l: &Lsn| l.0);
                    (
                        d.to_hex(),
                        AppliedDomains {
                            index: at(SyncDomain::Index),
                            content: at(SyncDomain::Content),
                        },
                    )
                })
                .collect();
        }
    }
}
