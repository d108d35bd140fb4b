//! The core thread: runs the replication [`Replica`] over the journal. Each input is handled, the
//! replica's log operations and election state are made durable, and only then are its messages
//! sent. A journal error reloads the replica from the journal (what is durable is the truth).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use keel_journal::{CommitRoute, Journal, Placement, Sealer};
use keel_schema::SyncDomain;
use keel_schema::{ChangeId, DeviceId, Epoch, Lsn};
use keel_transport::{DeviceMessage, DomainPosition, ElectionMessage, WireLogEntry};
use serde_bytes::ByteBuf;
use tokio::sync::mpsc::UnboundedSender;

use crate::error::NodeError;
use keel_engine::Event;
use keel_engine::NodeLink;
use keel_engine::{SequenceReply, SequenceRequest};
use keel_replication::{
    Durable, ElectionRole, Input, Log, LogOp, LogSlot, Message, Output, Replica, ReplicaConfig,
};

use super::status::{AppliedDomains, NodeStatus};

/// How often the core ticks (timers: heartbeats, elections, pushes).
pub const TICK_MS: u64 = 10;
/// Most queued events taken before one journal write and send.
const EVENTS_PER_FLUSH_MAX: usize = 256;
/// Most received log entries written in one journal transaction.
const ENTRIES_PER_FLUSH_MAX: usize = 16_384;
/// How often the pins are refreshed from the library's Device records.
const PIN_REFRESH_MS: u64 = 250;

/// What the network side tells the core.
pub(crate) enum CoreEvent {
    /// A message from an authenticated, pinned peer.
    Received {
        from: DeviceId,
        message: DeviceMessage,
    },
    /// A session with `peer` is up; `tx` sends to it.
    Connected {
        peer: DeviceId,
        conn: u64,
        tx: UnboundedSender<DeviceMessage>,
    },
    /// That session ended.
    Disconnected { peer: DeviceId, conn: u64 },
    /// Stop the core.
    Stop,
}

pub(crate) struct Core {
    link: Arc<NodeLink>,
    config: ReplicaConfig,
    replica: Replica,
    payloads: HashMap<ChangeId, Vec<u8>>,
    conns: HashMap<DeviceId, Vec<(u64, UnboundedSender<DeviceMessage>)>>,
    persisted: (Epoch, Epoch),
    status: Arc<Mutex<NodeStatus>>,
    start: Instant,
    pins: keel_transport::Pins,
    last_pin_refresh: u64,
    received_bytes: u64,
    outbox: Vec<Output>,
    batch_entries: usize,
    /// Applied positions per domain that followers acknowledged (a leader's view).
    acknowledged: HashMap<DeviceId, AppliedDomains>,
    /// This device's commits sequenced directly (see `crate::leader_commit`), answered once the
    /// next flush made them durable.
    sequenced: Vec<(Vec<Placement>, crossbeam_channel::Sender<SequenceReply>)>,
}

/// The log as the journal saves it.
fn log_index(log: &Log) -> keel_journal::LogIndex {
    let mut index = keel_journal::LogIndex::default();
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
fn load(journal: &Journal) -> Result<(Durable, HashMap<ChangeId, Vec<u8>>), NodeError> {
    let epoch = journal.epoch()?.unwrap_or_default();
    let voted = journal.voted()?.unwrap_or(epoch);
    let (runs, ids) = journal.load_log_index()?.into_parts();
    let log = Log::from_runs(runs, ids);
    let pending = journal.offline_changes()?;
    let ids = pending.iter().map(|(id, _)| *id).collect();
    Ok((
        Durable {
            epoch,
            voted,
            log,
            offline: ids,
        },
        pending.into_iter().collect(),
    ))
}

impl Core {
    pub(crate) fn new(
        link: Arc<NodeLink>,
        config: ReplicaConfig,
        status: Arc<Mutex<NodeStatus>>,
        pins: keel_transport::Pins,
    ) -> Result<Self, NodeError> {
        let journal = link.journal()?;
        // The core sequences this device's changes: commits wait in the offline journal.
        journal.set_role(CommitRoute::Offline)?;
        let (durable, payloads) = load(journal)?;
        let persisted = (durable.epoch, durable.voted);
        let replica = Replica::new(config.clone(), durable, 0);
        let mut core = Self {
            link,
            config,
            replica,
            payloads,
            conns: HashMap::new(),
            persisted,
            status,
            start: Instant::now(),
            pins,
            last_pin_refresh: 0,
            received_bytes: 0,
            outbox: Vec::new(),
            batch_entries: 0,
            acknowledged: HashMap::new(),
            sequenced: Vec::new(),
        };
        core.link
            .set_leading(core.replica.role() == ElectionRole::Leader);
        core.persist()?;
        core.refresh_pins();
        core.publish_status();
        Ok(core)
    }

    fn now(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Runs until `Stop` or the event channel closes.
    pub(crate) fn run(mut self, events: Receiver<CoreEvent>) {
        let commits = self.link.offline_commits().clone();
        let mut to_sequence = self.link.sequence_requests().clone();
        let mut last_tick = 0;
        'run: loop {
            let wait = Duration::from_millis(TICK_MS);
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
            // Take whatever else is waiting, so one journal write covers all of it (within
            // bounds: a long write would look like a silent leader).
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
                    Ok(CoreEvent::Stop) => break 'run,
                    Ok(event) => self.on_event(event),
                    Err(_) => break,
                }
            }
            let now = self.now();
            if now >= last_tick + TICK_MS {
                last_tick = now;
                self.handle(Input::Tick);
                if now >= self.last_pin_refresh + PIN_REFRESH_MS {
                    self.last_pin_refresh = now;
                    self.refresh_pins();
                }
            }
            let _ = self.flush();
            if now == last_tick {
                self.publish_status();
            }
        }
        // Commits go by the offline journal again from here (requests still queued are dropped
        // unanswered, which sends their callers that way too).
        self.link.stop_sequencing();
        if self.flush() {
            self.save_log_index();
        }
        self.publish_status();
    }

    /// Saves the log index in the journal, so the next start need not read every record (see
    /// [`keel_journal::LogIndex`]). Only after a flush that succeeded: the log in memory is then
    /// the journal's.
    fn save_log_index(&self) {
        let Ok(journal) = self.link.journal() else {
            return;
        };
        let log = &self.replica.durable().log;
        if let Err(e) = journal.save_log_index(&log_index(log)) {
            tracing::warn!(error = %e, "saving the log index failed; the next start reads the whole log");
        }
    }

    /// Appends this device's commits to the log while leading; answered at the next flush.
    fn on_sequence(&mut self, request: SequenceRequest) {
        if self.replica.role() != ElectionRole::Leader {
            let _ = request.reply.send(SequenceReply::NotLeading);
            return;
        }
        let mut placements = Vec::with_capacity(request.changes.len());
        for (id, sealed) in request.changes {
            let before = self.replica.durable().log.len();
            self.payloads.insert(id, sealed);
            self.handle(Input::Commit(id));
            let log = &self.replica.durable().log;
            if log.len() > before {
                placements.push(Placement::Log(Lsn(log.len() as u64)));
                self.batch_entries += 1;
            }
        }
        self.sequenced.push((placements, request.reply));
    }

    fn on_commits(&mut self, ids: Vec<ChangeId>) {
        for id in ids {
            self.handle(Input::Commit(id));
        }
    }

    fn on_event(&mut self, event: CoreEvent) {
        match event {
            CoreEvent::Connected { peer, conn, tx } => {
                let list = self.conns.entry(peer).or_default();
                let first = list.is_empty();
                list.push((conn, tx));
                if first {
                    self.handle(Input::Connected(peer));
                }
            }
            CoreEvent::Disconnected { peer, conn } => {
                if let Some(list) = self.conns.get_mut(&peer) {
                    list.retain(|(c, _)| *c != conn);
                    if list.is_empty() {
                        self.conns.remove(&peer);
                        self.handle(Input::Disconnected(peer));
                    }
                }
            }
            CoreEvent::Received { from, message } => {
                let started = self.now();
                let message = self.incoming(from, message);
                let now = self.now();
                if now > started + TICK_MS {
                    // Preparing it waited (on the projections): what the leader sent meanwhile
                    // is still queued, so that silence was not the leader's.
                    self.replica.busy_until(now);
                }
                if let Some(message) = message {
                    self.handle(Input::Received { from, message });
                }
            }
            CoreEvent::Stop => {}
        }
    }

    /// Hands one input to the replica; what it wants sent waits for [`Core::flush`].
    fn handle(&mut self, input: Input) {
        let now = self.now();
        let before = (self.replica.role(), self.replica.durable().epoch);
        let out = self.replica.handle(input, now);
        self.outbox.extend(out);
        let after = (self.replica.role(), self.replica.durable().epoch);
        if after.0 != before.0 {
            self.link.set_leading(after.0 == ElectionRole::Leader);
        }
        if after != before {
            tracing::info!(
                role = ?after.0,
                epoch = after.1.counter,
                by = %after.1.device.short(),
                leader = ?self.replica.leader().map(|d| d.short()),
                "role or epoch changed"
            );
        }
    }

    /// Makes the replica's state durable, then sends what it asked for (contiguous `Append`s to one
    /// peer merged: see [`coalesce`]). Returns whether the state was written.
    fn flush(&mut self) -> bool {
        self.batch_entries = 0;
        let started = self.now();
        let persisted = self.persist();
        if self.now() > started + TICK_MS {
            self.replica.busy_until(self.now());
        }
        if let Err(e) = persisted {
            tracing::error!(error = %e, "writing replication state failed; reloading it from the journal");
            for (_, reply) in self.sequenced.drain(..) {
                let _ = reply.send(SequenceReply::Failed(e.to_string()));
            }
            self.outbox.clear();
            self.reload();
            return false;
        }
        // Durable now: the committers first (they wait), then the peers. Nothing is sent that the
        // replica asked to make durable and `persist` did not write.
        assert!(
            self.replica.take_ops().is_empty(),
            "log operations left unwritten"
        );
        for (placements, reply) in self.sequenced.drain(..) {
            let _ = reply.send(SequenceReply::Done(placements));
        }
        let outbox = coalesce(std::mem::take(&mut self.outbox), self.config.segment_max);
        for Output::Send { to, message } in outbox {
            if let Some(wire) = self.outgoing(message) {
                self.send(to, wire);
            }
        }
        true
    }

    fn reload(&mut self) {
        let Ok(journal) = self.link.journal() else {
            return;
        };
        match load(journal) {
            Ok((durable, payloads)) => {
                self.persisted = (durable.epoch, durable.voted);
                self.replica = Replica::new(self.config.clone(), durable, self.now());
                self.payloads.extend(payloads);
                // Its sessions are still up: tell the fresh replica (sent at the next flush).
                let peers: Vec<DeviceId> = self.conns.keys().copied().collect();
                for peer in peers {
                    self.handle(Input::Connected(peer));
                }
            }
            Err(e) => tracing::error!(error = %e, "reloading replication state failed"),
        }
    }

    fn send(&mut self, to: DeviceId, message: DeviceMessage) {
        if let Some((_, tx)) = self.conns.get(&to).and_then(|l| l.last()) {
            let _ = tx.send(message);
        }
    }

    /// Takes a payload for the log, from the cache or the offline journal.
    fn payload(&mut self, id: ChangeId) -> Result<Vec<u8>, NodeError> {
        if let Some(bytes) = self.payloads.remove(&id) {
            return Ok(bytes);
        }
        self.payloads
            .extend(self.link.journal()?.offline_changes()?);
        self.payloads
            .remove(&id)
            .ok_or_else(|| NodeError::Failed(format!("no payload for change {}", id.0)))
    }

    /// Makes the replica's new state durable: election state first, then log operations in order.
    fn persist(&mut self) -> Result<(), NodeError> {
        let durable = self.replica.durable();
        let election = (durable.epoch, durable.voted);
        let ops = self.replica.take_ops();
        let journal_epoch_changed = election != self.persisted;
        if journal_epoch_changed {
            self.link
                .journal()?
                .store_election(election.0, election.1)?;
            self.persisted = election;
        }
        let mut first: Option<Lsn> = None;
        let mut batch: Vec<(Epoch, Vec<u8>)> = Vec::new();
        for op in ops {
            match op {
                LogOp::Append { at, epoch, entry } => {
                    first.get_or_insert(at);
                    let bytes = match entry {
                        LogSlot::Barrier => Vec::new(),
                        LogSlot::Change(id) => self.payload(id)?,
                    };
                    batch.push((epoch, bytes));
                }
                LogOp::Truncate { keep } => {
                    if let Some(at) = first.take() {
                        self.link
                            .journal()?
                            .append_replicated(at, std::mem::take(&mut batch))?;
                    }
                    let returned = self.link.journal()?.truncate_after(keep)?;
                    tracing::info!(
                        keep = keep.0,
                        returned = returned.len(),
                        "log truncated after an epoch change; its changes will be resubmitted"
                    );
                    self.payloads
                        .extend(self.link.journal()?.offline_changes()?);
                }
            }
        }
        if let Some(at) = first {
            self.link.journal()?.append_replicated(at, batch)?;
        }
        Ok(())
    }

    /// Maps a core message to the wire, reading payloads from the journal.
    fn outgoing(&mut self, message: Message) -> Option<DeviceMessage> {
        Some(match message {
            Message::RequestVote { epoch, last } => {
                DeviceMessage::Election(ElectionMessage::RequestVote {
                    epoch,
                    last_epoch: last.0,
                    last_lsn: last.1,
                })
            }
            Message::Vote { epoch, granted } => {
                DeviceMessage::Election(ElectionMessage::Vote { epoch, granted })
            }
            Message::Stale { epoch } => DeviceMessage::Election(ElectionMessage::Stale { epoch }),
            Message::PreVote { epoch, last } => DeviceMessage::Election(ElectionMessage::PreVote {
                epoch,
                last_epoch: last.0,
                last_lsn: last.1,
            }),
            Message::PreVoteReply {
                epoch,
                granted,
                highest,
            } => DeviceMessage::Election(ElectionMessage::PreVoteReply {
                epoch,
                granted,
                highest,
            }),
            Message::AppendReply { epoch, ok, last } => {
                // Apply runs in log order, so both domains are applied through the same point.
                let applied = self.link.library().applied_lsn();
                DeviceMessage::SyncAck {
                    epoch,
                    ok,
                    stored: last,
                    positions: [SyncDomain::Index, SyncDomain::Content]
                        .into_iter()
                        .map(|domain| DomainPosition {
                            domain,
                            lsn: applied,
                        })
                        .collect(),
                }
            }
            Message::Push { changes } => {
                let changes =
                    &changes[..changes.len().min(keel_transport::RECORDS_PER_MESSAGE_MAX)];
                // One read of the offline journal covers every payload not cached yet.
                if changes.iter().any(|id| !self.payloads.contains_key(id)) {
                    if let Ok(local) = self.link.journal().and_then(|j| Ok(j.offline_changes()?)) {
                        self.payloads.extend(local);
                    }
                }
                let sealed = changes
                    .iter()
                    .filter_map(|id| self.payloads.get(id))
                    .map(|bytes| ByteBuf::from(bytes.clone()))
                    .collect();
                DeviceMessage::SyncChange { changes: sealed }
            }
            Message::Append {
                epoch,
                prev,
                prev_epoch,
                entries,
            } => {
                let first = Lsn(prev.0 + 1);
                let wire = if entries.is_empty() {
                    Vec::new()
                } else {
                    match self
                        .link
                        .journal()
                        .and_then(|j| Ok(j.log_entries(first, entries.len())?))
                    {
                        Ok(stored) => stored
                            .into_iter()
                            .map(|(_, e, sealed)| WireLogEntry {
                                epoch: e,
                                sealed: ByteBuf::from(sealed),
                            })
                            .collect(),
                        Err(e) => {
                            tracing::error!(error = %e, "reading the log to ship failed");
                            return None;
                        }
                    }
                };
                DeviceMessage::SyncLogSegment {
                    epoch,
                    first,
                    prev_epoch,
                    leader_end: self.replica.durable().last_lsn(),
                    entries: wire,
                }
            }
        })
    }

    /// Maps a wire message to a core message, caching payloads. `None` drops it (logged).
    fn incoming(&mut self, from: DeviceId, message: DeviceMessage) -> Option<Message> {
        match message {
            DeviceMessage::SyncLogSegment {
                epoch,
                first,
                prev_epoch,
                leader_end,
                entries,
            } => {
                let mut out = Vec::with_capacity(entries.len());
                self.batch_entries += entries.len();
                let known = self.replica.durable().last_lsn().0;
                let first = Lsn(first.0.max(1));
                for (i, entry) in entries.into_iter().enumerate() {
                    self.received_bytes += entry.sealed.len() as u64;
                    if entry.sealed.is_empty() {
                        out.push((entry.epoch, LogSlot::Barrier));
                        continue;
                    }
                    let Some(id) = Sealer::peek_change_id(&entry.sealed) else {
                        tracing::warn!(peer = %from.short(), "segment with an unreadable record dropped");
                        return None;
                    };
                    // Keep the payload unless this very entry is already in the log.
                    let position = first.0 + i as u64;
                    let have = position <= known
                        && self.replica.durable().log.get(position as usize - 1)
                            == Some((entry.epoch, LogSlot::Change(id)));
                    if !have {
                        self.payloads.insert(id, entry.sealed.into_vec());
                    }
                    out.push((entry.epoch, LogSlot::Change(id)));
                }
                if !out.is_empty() {
                    if let Err(e) = self.link.catching_up(leader_end) {
                        tracing::warn!(error = %e, "could not prepare the projections for a catch-up");
                    }
                    self.link.publish(Event::SyncProgress {
                        stored: first.0 + out.len() as u64 - 1,
                        leader_end: leader_end.0,
                        bytes: self.received_bytes,
                    });
                }
                Some(Message::Append {
                    epoch,
                    prev: Lsn(first.0.saturating_sub(1)),
                    prev_epoch,
                    entries: out,
                })
            }
            DeviceMessage::SyncChange { changes } => {
                let journal = self.link.journal().ok()?;
                let mut ids = Vec::with_capacity(changes.len());
                for sealed in changes {
                    match journal.check_sealed(&sealed) {
                        Ok(id) => {
                            if !self.replica.in_log(&id) {
                                self.payloads.insert(id, sealed.into_vec());
                            }
                            ids.push(id);
                        }
                        Err(e) => {
                            tracing::warn!(peer = %from.short(), error = %e, "a pushed change does not open; dropped");
                        }
                    }
                }
                Some(Message::Push { changes: ids })
            }
            DeviceMessage::SyncAck {
                epoch,
                ok,
                stored,
                positions,
            } => {
                let entry = self.acknowledged.entry(from).or_default();
                for p in positions {
                    match p.domain {
                        SyncDomain::Index => entry.index = entry.index.max(p.lsn.0),
                        SyncDomain::Content => entry.content = entry.content.max(p.lsn.0),
                    }
                }
                Some(Message::AppendReply {
                    epoch,
                    ok,
                    last: stored,
                })
            }
            DeviceMessage::Election(ElectionMessage::RequestVote {
                epoch,
                last_epoch,
                last_lsn,
            }) => Some(Message::RequestVote {
                epoch,
                last: (last_epoch, last_lsn),
            }),
            DeviceMessage::Election(ElectionMessage::Vote { epoch, granted }) => {
                Some(Message::Vote { epoch, granted })
            }
            DeviceMessage::Election(ElectionMessage::Stale { epoch }) => {
                Some(Message::Stale { epoch })
            }
            DeviceMessage::Election(ElectionMessage::PreVote {
                epoch,
                last_epoch,
                last_lsn,
            }) => Some(Message::PreVote {
                epoch,
                last: (last_epoch, last_lsn),
            }),
            DeviceMessage::Election(ElectionMessage::PreVoteReply {
                epoch,
                granted,
                highest,
            }) => Some(Message::PreVoteReply {
                epoch,
                granted,
                highest,
            }),
            _ => None,
        }
    }

    /// Pins every device with a Device record in the library (unless revoked).
    fn refresh_pins(&mut self) {
        let revoked = super::devices::DevicesFile::read(self.link.library().dir())
            .map(|f| f.revoked)
            .unwrap_or_default();
        if let Ok(devices) = self.link.library().devices() {
            for device in devices {
                if revoked.contains(&device.device_id) {
                    continue;
                }
                if let Some(id) = DeviceId::from_hex(&device.device_id) {
                    if id != self.replica.device() {
                        self.pins.pin(id);
                    }
                }
            }
        }
    }

    fn publish_status(&self) {
        let durable = self.replica.durable();
        if let Ok(mut status) = self.status.lock() {
            status.role = self.replica.role();
            status.epoch = durable.epoch;
            status.leader = self.replica.leader().map(|d| d.to_hex());
            status.log_len = durable.log.len() as u64;
            status.offline = durable.offline.len() as u64;
            status.connected = self.conns.keys().map(|d| d.to_hex()).collect();
            status.acknowledged = self
                .acknowledged
                .iter()
                .map(|(d, p)| (d.to_hex(), *p))
                .collect();
        }
    }
}

/// Merges what a batch of inputs asked to send: an `Append` that continues the previous one to
/// the same peer (same epoch, its `prev` is where that one ends) joins it, up to `segment_max`
/// entries; a heartbeat (no entries) is dropped when that peer gets entries in the batch.
pub(crate) fn coalesce(outbox: Vec<Output>, segment_max: usize) -> Vec<Output> {
    let with_entries: HashSet<DeviceId> = outbox
        .iter()
        .filter_map(|Output::Send { to, message }| match message {
            Message::Append { entries, .. } if !entries.is_empty() => Some(*to),
            _ => None,
        })
        .collect();
    let mut merged: Vec<Output> = Vec::with_capacity(outbox.len());
    // Per peer: where its last `Append` sits in `merged`.
    let mut open: HashMap<DeviceId, usize> = HashMap::new();
    for Output::Send { to, message } in outbox {
        let Message::Append {
            epoch,
            prev,
            entries,
            ..
        } = &message
        else {
            // Nothing merges across another message to the same peer.
            open.remove(&to);
            merged.push(Output::Send { to, message });
            continue;
        };
        if entries.is_empty() && with_entries.contains(&to) {
            continue;
        }
        if let Some(Output::Send {
            message:
                Message::Append {
                    epoch: open_epoch,
                    prev: open_prev,
                    entries: open_entries,
                    ..
                },
            ..
        }) = open.get(&to).and_then(|&i| merged.get_mut(i))
        {
            let open_end = open_prev.0 + open_entries.len() as u64;
            if *open_epoch == *epoch
                && open_end == prev.0
                && open_entries.len() + entries.len() <= segment_max
            {
                open_entries.extend(entries.iter().copied());
                continue;
            }
        }
        open.insert(to, merged.len());
        merged.push(Output::Send { to, message });
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    fn append(to: u8, prev: u64, n: usize) -> Output {
        let epoch = Epoch {
            counter: 1,
            device: DeviceId([1; 32]),
        };
        Output::Send {
            to: DeviceId([to; 32]),
            message: Message::Append {
                epoch,
                prev: Lsn(prev),
                prev_epoch: epoch,
                entries: (0..n)
                    .map(|i| {
                        (
                            epoch,
                            LogSlot::Change(ChangeId(uuid::Uuid::from_u128(i as u128))),
                        )
                    })
                    .collect(),
            },
        }
    }

    fn shape(outbox: &[Output]) -> Vec<(u8, u64, usize)> {
        outbox
            .iter()
            .map(|Output::Send { to, message }| match message {
                Message::Append { prev, entries, .. } => (to.0[0], prev.0, entries.len()),
                _ => (to.0[0], u64::MAX, 0),
            })
            .collect()
    }

    #[test]
    fn contiguous_appends_to_a_peer_merge_and_heartbeats_give_way() {
        let stale = Output::Send {
            to: DeviceId([2; 32]),
            message: Message::Stale {
                epoch: Epoch::default(),
            },
        };
        let outbox = vec![
            append(2, 10, 0), // heartbeat: dropped, peer 2 gets entries
            append(2, 10, 1),
            append(3, 10, 1),
            append(2, 11, 1), // continues peer 2's
            append(2, 12, 3), // would exceed 4 entries: starts a new one
            stale,
            append(2, 15, 1), // after another message to peer 2: not merged across it
            append(3, 20, 1), // not contiguous with peer 3's
            append(4, 7, 0),  // a lone heartbeat stays
        ];
        assert_eq!(
            shape(&coalesce(outbox, 4)),
            vec![
                (2, 10, 2),
                (3, 10, 1),
                (2, 12, 3),
                (2, u64::MAX, 0),
                (2, 15, 1),
                (3, 20, 1),
                (4, 7, 0)
            ]
        );
    }
}
