//! `Replica`: the protocol core a runtime drives. It wraps the election rules ([`Machine`]) with
//! the payloads, the wire form of its messages, and the rule that nothing is sent before what it
//! depends on is durable. See the crate documentation for the contract.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use keel_schema::{ChangeId, DeviceId, Epoch, Lsn, SyncDomain};
use serde_bytes::ByteBuf;

use crate::machine::{Machine, ReplicaConfig};
use crate::types::{Durable, ElectionRole, Input, LogOp, LogSlot, Message, Output};
use crate::wire::{
    ClockFloor, DomainPosition, ReplicationMessage, WireLogEntry, ECHO_LEN, RECORDS_PER_MESSAGE_MAX,
};

/// What a replica reads from its device: the log and offline journal it asked to be written, the
/// projections' progress, and the sealing of changes. Reads only; writes are [`LogWrite`]s.
pub trait Store {
    /// Why a read failed.
    type Error: std::fmt::Display;
    /// The entries at positions `first..first + count` with their epochs, sealed (empty for a
    /// barrier).
    fn read_log(&mut self, first: Lsn, count: usize) -> Result<Vec<(Epoch, Vec<u8>)>, Self::Error>;
    /// This device's changes in the offline journal, sealed.
    fn read_offline(&mut self) -> Result<Vec<(ChangeId, Vec<u8>)>, Self::Error>;
    /// The last log position applied to the projections (what a follower acknowledges).
    fn applied(&mut self) -> Lsn;
    /// The change a sealed log entry names, read without opening it (entries from the leader are
    /// opened, and so checked, when applied).
    fn peek_change_id(&self, sealed: &[u8]) -> Option<ChangeId>;
    /// Opens a change a follower pushed: its id and origin if it is authentic, why not
    /// otherwise.
    fn open_pushed(&self, sealed: &[u8]) -> Result<Opened, String>;
    /// This device's clock floor, sent with each acknowledgement (see
    /// [`Replica::horizon`]); `None` when it cannot tell.
    fn floor(&mut self) -> Option<ClockFloor> {
        None
    }
}

/// What [`Store::open_pushed`] read from an authentic change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Opened {
    /// The change's id.
    pub id: ChangeId,
    /// The device that made it.
    pub origin: DeviceId,
}

/// A write the runtime makes durable, in the order polled, before [`Replica::written`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LogWrite {
    /// The election state: the highest epoch accepted and the highest voted for.
    Election {
        /// The epoch.
        epoch: Epoch,
        /// The vote.
        voted: Epoch,
    },
    /// Entries from position `at` on, at the end of the log, each with its epoch and sealed
    /// change (empty for a barrier). Their changes leave the offline journal.
    Append {
        /// Position of the first entry.
        at: Lsn,
        /// The entries.
        entries: Vec<(Epoch, Vec<u8>)>,
    },
    /// Every entry after `keep` is removed. Their changes go back to the offline journal, but
    /// for `dropped`: other devices' changes, which their maker still holds (in its log or
    /// offline journal) and resubmits, as a leader accepts a change only from its maker.
    Truncate {
        /// The last position kept.
        keep: Lsn,
        /// The removed changes that another device made (or that do not open): not returned.
        dropped: Vec<ChangeId>,
    },
}

/// A message to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    /// To whom.
    pub to: DeviceId,
    /// What.
    pub message: ReplicationMessage,
}

/// Something the runtime may act on or report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplicaEvent {
    /// The role, epoch or leader changed.
    RoleChanged {
        /// The role now.
        role: ElectionRole,
        /// The epoch now.
        epoch: Epoch,
        /// The leader now.
        leader: Option<DeviceId>,
    },
    /// A follower received entries: it is catching up to `leader_end`. Act on it before the
    /// next writes (the projections may prepare for a long replay).
    CatchingUp {
        /// The first position of the entries received.
        first: Lsn,
        /// The last position of the segment received.
        stored: Lsn,
        /// The leader's last position.
        leader_end: Lsn,
        /// Payload bytes received from leaders so far.
        bytes: u64,
    },
    /// This device's log cannot continue its leader's: what it lacks is at or before the
    /// leader's compaction `base` (compacted there), or its own compacted history differs. The
    /// runtime backfills the state at `base` or later from `leader`, then starts a new replica
    /// from the journal. Said once per message that shows it.
    BehindCompaction {
        /// The leader.
        leader: DeviceId,
        /// The leader's compaction base.
        base: Lsn,
    },
    /// Something a peer sent was dropped.
    Refused {
        /// The peer.
        from: DeviceId,
        /// Why.
        reason: String,
    },
}

/// What went wrong in the protocol core: a store that failed a read (`E` is its error), a
/// payload that is nowhere, or a message over the limits of [`crate::wire`].
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError<E: std::fmt::Display = std::convert::Infallible> {
    /// The store could not be read.
    #[error("reading the store failed: {0}")]
    Store(E),
    /// A change to write has no payload in memory nor in the offline journal.
    #[error("no payload for change {0}")]
    MissingPayload(ChangeId),
    /// A message breaks a limit (the peer that sent it is misbehaving).
    #[error("over a limit: {0}")]
    OverLimit(String),
}

/// One device's protocol core: election, replication, payloads and wire form. No I/O; see the
/// crate documentation for the contract.
#[derive(Debug)]
pub struct Replica {
    machine: Machine,
    segment_max: usize,
    /// Sealed changes on their way into the log (received, pushed, committed) or out of it
    /// (pushed to the leader). Bounded by what the runtime lets in between writes.
    payloads: HashMap<ChangeId, Vec<u8>>,
    /// Messages asked for since the last release, held until what they depend on is durable.
    outbox: Vec<Output>,
    /// Messages released, mapped to the wire one by one in `poll_transmit`.
    ready: VecDeque<Output>,
    /// Log operations not yet polled.
    ops: VecDeque<LogOp>,
    /// The election state last polled as a [`LogWrite::Election`].
    election_polled: (Epoch, Epoch),
    /// Writes were polled and not yet confirmed by [`Replica::written`].
    unconfirmed: bool,
    events: VecDeque<ReplicaEvent>,
    /// Applied positions per follower and domain, as the followers acknowledged them.
    acknowledged: BTreeMap<DeviceId, BTreeMap<SyncDomain, Lsn>>,
    /// Each follower's last clock floor, with the epoch it was acknowledged in.
    floors: BTreeMap<DeviceId, (Epoch, Option<ClockFloor>)>,
    received_bytes: u64,
    /// While leading: who pushed each change not yet shipped back to it. Its author gets the
    /// entry as an echo (the id alone: it holds the payload), so a change crosses its author's
    /// link once.
    authored: HashMap<ChangeId, DeviceId>,
}

/// Most changes remembered as pushed by their author (past it, an entry goes back whole).
const AUTHORED_MAX: usize = 1 << 20;

impl Replica {
    /// A replica starting (or restarting) from its durable state. A device whose stored epoch is
    /// its own resumes leading it (the library's creator starts that way with epoch 1).
    pub fn new(config: ReplicaConfig, durable: Durable, now_ms: u64) -> Self {
        let written = (durable.epoch, durable.voted);
        Self::wrap(Machine::new(config, durable, now_ms), written)
    }

    /// This replica started again from its durable state (after a write that failed, whose
    /// effects in memory are dropped), keeping what it learned of the cluster: how many devices
    /// it reached at once and whether it followed or led, which decide whether it may lead a
    /// partition of its own (see `Machine::may_lead_alone`). Its peers are not connected.
    pub fn restarted(&self, durable: Durable, now_ms: u64) -> Self {
        let mut machine = Machine::new(self.machine.config().clone(), durable, now_ms);
        machine.remember_cluster(&self.machine);
        let written = (machine.durable().epoch, machine.durable().voted);
        Self::wrap(machine, written)
    }

    /// The creator of a library: leader of epoch `(1, device)` from the start. Its first
    /// [`Replica::poll_log_write`]s write that epoch and the barrier.
    pub fn founder(config: ReplicaConfig, now_ms: u64) -> Self {
        let mut replica = Self::wrap(
            Machine::founder(config, now_ms),
            (Epoch::default(), Epoch::default()),
        );
        let epoch = replica.durable().epoch;
        replica.ops.push_back(LogOp::Append {
            at: Lsn(1),
            epoch,
            entry: LogSlot::Barrier,
        });
        replica
    }

    fn wrap(mut machine: Machine, election_polled: (Epoch, Epoch)) -> Self {
        let ops = machine.take_ops().into();
        Self {
            segment_max: machine.segment_max(),
            machine,
            payloads: HashMap::new(),
            authored: HashMap::new(),
            outbox: Vec::new(),
            ready: VecDeque::new(),
            ops,
            election_polled,
            unconfirmed: false,
            events: VecDeque::new(),
            acknowledged: BTreeMap::new(),
            floors: BTreeMap::new(),
            received_bytes: 0,
        }
    }

    /// How many payloads are held in memory (for tests of the memory bound).
    #[cfg(test)]
    pub(crate) fn payloads_len(&self) -> usize {
        self.payloads.len()
    }

    /// The durable state as this replica holds it (the journal's after the writes polled so
    /// far are made).
    pub fn durable(&self) -> &Durable {
        self.machine.durable()
    }

    /// The current role.
    pub fn role(&self) -> ElectionRole {
        self.machine.role()
    }

    /// The leader this replica follows (itself when leading).
    pub fn leader(&self) -> Option<DeviceId> {
        self.machine.leader()
    }

    /// This replica's device.
    pub fn device(&self) -> DeviceId {
        self.machine.device()
    }

    /// The devices this replica counts as reachable.
    pub fn connected(&self) -> impl Iterator<Item = &DeviceId> {
        self.machine.connected()
    }

    /// Applied positions per follower and domain, as the followers acknowledged them (a leader's
    /// view; a follower's own claims, not checked).
    pub fn acknowledged(&self) -> &BTreeMap<DeviceId, BTreeMap<SyncDomain, Lsn>> {
        &self.acknowledged
    }

    /// Leading: how far each follower said it stored this epoch's log (its match).
    pub fn stored(&self) -> &BTreeMap<DeviceId, u64> {
        self.machine.matched()
    }

    /// Tells a follower that the time until `now_ms` went on its own work (writing or applying
    /// what its leader sent), not on a silent leader: its election timer starts again.
    pub fn busy_until(&mut self, now_ms: u64) {
        self.machine.busy_until(now_ms);
    }

    /// The next time at which [`Replica::handle_timeout`] has something to do (an election
    /// timeout, a heartbeat or push, a segment to send again). A runtime sleeps until then or
    /// until the next input.
    pub fn poll_timeout(&self) -> u64 {
        self.machine.poll_timeout()
    }

    /// Time has passed: timers that are due fire.
    pub fn handle_timeout(&mut self, now_ms: u64) {
        self.step(Input::Tick, now_ms);
    }

    /// The log through `end` was on disk before this replica started and has not been read
    /// back since: a record damaged at rest (a bad sector, a flipped bit) is found only when
    /// read. Until [`Replica::log_checked`] reaches `end`, the replica neither stands nor asks
    /// for pre-votes, so a log damaged while the device was off never wins an election; it
    /// still follows and votes (its vote asks for at least its own log end: stricter, not
    /// weaker). A replica that resumes leading an epoch it won keeps leading meanwhile; a
    /// damaged record the check finds makes it step down ([`Replica::handle_abdicate`]).
    /// Carried over by [`Replica::restarted`]. A runtime that never calls this is never held.
    pub fn hold_until_checked(&mut self, end: Lsn) {
        self.machine.hold_until_checked(end);
    }

    /// The runtime read the log back through `through` and every record passed its checks
    /// (see [`Replica::hold_until_checked`]).
    pub fn log_checked(&mut self, through: Lsn) {
        self.machine.log_checked(through);
    }

    /// Whether the replica is still held from standing by an unchecked log (see
    /// [`Replica::hold_until_checked`]).
    pub fn is_unchecked(&self) -> bool {
        self.machine.is_unchecked()
    }

    /// The runtime found this device's log damaged (a record that fails its checks) and will
    /// cut it there. A leader stops leading, fenced by a new epoch of its own that it never
    /// won, so that it never writes at those positions again in its old epoch; poll the
    /// election-state write this asks for and make it durable before the cut. Returns the vote
    /// floor to store durably before the cut ([`Durable::vote_floor`]); then start a replica
    /// again from what is durable ([`Replica::restarted`]). The next leader is elected as
    /// usual, among the devices whose logs reach the floor.
    ///
    /// For a library of one device, nothing of this is needed: its log is nobody else's.
    pub fn handle_abdicate(&mut self, now_ms: u64) -> (Epoch, Lsn) {
        let floor = self.machine.floor_for_cut();
        self.step(Input::Abdicate, now_ms);
        floor
    }

    /// A session with `peer` came up.
    pub fn handle_connected(&mut self, now_ms: u64, peer: DeviceId) {
        self.step(Input::Connected(peer), now_ms);
    }

    /// The last session with `peer` went down.
    pub fn handle_disconnected(&mut self, now_ms: u64, peer: DeviceId) {
        self.step(Input::Disconnected(peer), now_ms);
        self.acknowledged.remove(&peer);
    }

    /// A change committed on this device. `sealed` is its payload when the runtime has it in
    /// hand (a leader sequences it at once); `None` when it waits in the offline journal, where
    /// the store reads it. Returns its log position if it was sequenced now.
    pub fn handle_commit(
        &mut self,
        now_ms: u64,
        id: ChangeId,
        sealed: Option<Vec<u8>>,
    ) -> Option<Lsn> {
        if let Some(sealed) = sealed {
            self.payloads.insert(id, sealed);
        }
        let before = self.durable().last_lsn();
        self.step(Input::Commit(id), now_ms);
        let after = self.durable().last_lsn();
        (after > before).then_some(after)
    }

    /// A message from `from` (an authenticated peer of this library; its content is still
    /// hostile: payloads that do not open are dropped, with a [`ReplicaEvent::Refused`]).
    pub fn handle_message<S: Store>(
        &mut self,
        now_ms: u64,
        from: DeviceId,
        message: ReplicationMessage,
        store: &mut S,
    ) {
        let mut cached = Vec::new();
        let mut catching_up = None;
        let message = match message {
            ReplicationMessage::LogSegment {
                epoch,
                first,
                prev_epoch,
                leader_end,
                entries,
                base,
            } => match self.incoming_segment(from, first, entries, store, &mut cached) {
                Some(entries) => {
                    if !entries.is_empty() {
                        catching_up = Some(ReplicaEvent::CatchingUp {
                            first: Lsn(first.0.max(1)),
                            stored: Lsn(first.0.max(1).saturating_add(entries.len() as u64 - 1)),
                            leader_end,
                            bytes: self.received_bytes,
                        });
                    }
                    Message::Append {
                        epoch,
                        prev: Lsn(first.0.max(1) - 1),
                        prev_epoch,
                        entries,
                        base,
                    }
                }
                None => return,
            },
            ReplicationMessage::Push { changes } => Message::Push {
                changes: self.incoming_push(from, changes, store, &mut cached),
            },
            ReplicationMessage::Ack {
                epoch,
                ok,
                stored,
                positions,
                floor,
            } => {
                self.record_ack(from, &positions);
                self.floors.insert(from, (epoch, floor));
                Message::AppendReply {
                    epoch,
                    ok,
                    last: stored,
                }
            }
            other => match election_message(other) {
                Some(message) => message,
                None => return,
            },
        };
        self.step(Input::Received { from, message }, now_ms);
        if let Some(event) = catching_up {
            // Only a segment the rules accepted says how far the leader's log goes.
            let accepted = matches!(
                self.outbox.last(),
                Some(Output::Send { to, message: Message::AppendReply { ok: true, .. } }) if *to == from
            );
            if accepted {
                self.events.push_back(event);
            }
        }
        self.drop_unused(cached);
    }

    /// Maps a segment's entries to log slots, caching their payloads. `None` drops the segment.
    fn incoming_segment<S: Store>(
        &mut self,
        from: DeviceId,
        first: Lsn,
        entries: Vec<WireLogEntry>,
        store: &mut S,
        cached: &mut Vec<ChangeId>,
    ) -> Option<Vec<(Epoch, LogSlot)>> {
        let first = Lsn(first.0.max(1));
        let known = self.durable().last_lsn().0;
        let mut slots = Vec::with_capacity(entries.len());
        let mut offline = None;
        for (i, mut entry) in entries.into_iter().enumerate() {
            self.received_bytes += entry.sealed.len() as u64;
            if entry.sealed.is_empty() {
                slots.push((entry.epoch, LogSlot::Barrier));
                continue;
            }
            if entry.sealed.len() == ECHO_LEN {
                // This device's own change, named by id: its payload is here.
                let id = keel_schema::uuid::Uuid::from_slice(&entry.sealed)
                    .ok()
                    .map(ChangeId);
                let Some(payload) = id.and_then(|id| self.own_payload(id, store, &mut offline))
                else {
                    self.refuse(from, "an echo of a change this device does not hold");
                    return None;
                };
                entry.sealed = ByteBuf::from(payload);
            }
            let Some(id) = store.peek_change_id(&entry.sealed) else {
                self.refuse(from, "a segment with an unreadable entry");
                return None;
            };
            // Keep the payload unless this very entry is in the log already.
            let position = first.0.saturating_add(i as u64);
            // (At or below the compaction base it is settled here: the rules skip it.)
            let have = position <= self.durable().log.base().0
                || (position <= known
                    && self.durable().log.get(position as usize - 1)
                        == Some((entry.epoch, LogSlot::Change(id))));
            if !have {
                self.payloads.insert(id, entry.sealed.into_vec());
                cached.push(id);
            }
            slots.push((entry.epoch, LogSlot::Change(id)));
        }
        Some(slots)
    }

    /// Opens pushed changes; a leader caches the payloads of those not yet in its log.
    fn incoming_push<S: Store>(
        &mut self,
        from: DeviceId,
        changes: Vec<ByteBuf>,
        store: &S,
        cached: &mut Vec<ChangeId>,
    ) -> Vec<ChangeId> {
        let leading = self.role() == ElectionRole::Leader;
        let mut ids = Vec::with_capacity(changes.len());
        for sealed in changes {
            match store.open_pushed(&sealed) {
                Ok(Opened { origin, .. }) if origin != from => self.refuse(
                    from,
                    &format!("it pushed a change made by device {}", origin.short()),
                ),
                Ok(Opened { id, .. }) => {
                    if leading && !self.machine.in_log(&id) {
                        self.payloads.insert(id, sealed.into_vec());
                        cached.push(id);
                        if self.authored.len() < AUTHORED_MAX {
                            self.authored.insert(id, from);
                        }
                    }
                    ids.push(id);
                }
                Err(reason) => {
                    self.refuse(from, &format!("a pushed change does not open: {reason}"))
                }
            }
        }
        ids
    }

    /// A log entry for `to` as it goes on the wire: the change's id alone when `to` made it
    /// and pushed it here (an echo, see [`ECHO_LEN`]), the sealed change otherwise.
    fn echo_or_whole<S: Store>(&mut self, to: DeviceId, store: &S, sealed: Vec<u8>) -> Vec<u8> {
        if self.authored.is_empty() || sealed.is_empty() {
            return sealed;
        }
        match store.peek_change_id(&sealed) {
            Some(id) if self.authored.get(&id) == Some(&to) => {
                // Once: a segment sent again goes whole.
                self.authored.remove(&id);
                id.0.as_bytes().to_vec()
            }
            _ => sealed,
        }
    }

    /// The payload of this device's own change `id`, echoed by its leader: from memory, or
    /// from the offline journal (read once per segment, into `offline`).
    fn own_payload<S: Store>(
        &self,
        id: ChangeId,
        store: &mut S,
        offline: &mut Option<HashMap<ChangeId, Vec<u8>>>,
    ) -> Option<Vec<u8>> {
        if let Some(payload) = self.payloads.get(&id) {
            return Some(payload.clone());
        }
        let offline = offline.get_or_insert_with(|| {
            // A journal that cannot be read holds nothing here: the segment is refused, and
            // the leader sends it again whole.
            store
                .read_offline()
                .map(|changes| changes.into_iter().collect())
                .unwrap_or_default()
        });
        offline.get(&id).cloned()
    }

    fn record_ack(&mut self, from: DeviceId, positions: &[DomainPosition]) {
        let known = self.acknowledged.entry(from).or_default();
        for p in positions {
            let lsn = known.entry(p.domain).or_default();
            *lsn = (*lsn).max(p.lsn);
        }
    }

    fn refuse(&mut self, from: DeviceId, reason: &str) {
        self.events.push_back(ReplicaEvent::Refused {
            from,
            reason: reason.to_string(),
        });
    }

    /// Forgets payloads cached for a message that the rules ignored (a stale segment, a
    /// duplicate): only what a pending write or the offline journal needs stays in memory.
    fn drop_unused(&mut self, cached: Vec<ChangeId>) {
        if cached.is_empty() {
            return;
        }
        let wanted: HashSet<ChangeId> = self
            .ops
            .iter()
            .filter_map(|op| match op {
                LogOp::Append {
                    entry: LogSlot::Change(id),
                    ..
                } => Some(*id),
                _ => None,
            })
            .chain(self.durable().offline.iter().copied())
            .collect();
        for id in cached {
            if !wanted.contains(&id) {
                self.payloads.remove(&id);
            }
        }
    }

    /// Hands one input to the rules; what they ask is queued for the polls.
    fn step(&mut self, input: Input, now_ms: u64) {
        let before = (self.role(), self.durable().epoch, self.leader());
        let out = self.machine.handle(input, now_ms);
        self.outbox.extend(out);
        self.ops.extend(self.machine.take_ops());
        if let (Some(base), Some(leader)) = (self.machine.take_behind(), self.leader()) {
            self.events
                .push_back(ReplicaEvent::BehindCompaction { leader, base });
        }
        let after = (self.role(), self.durable().epoch, self.leader());
        if after != before {
            self.events.push_back(ReplicaEvent::RoleChanged {
                role: after.0,
                epoch: after.1,
                leader: after.2,
            });
        }
    }

    /// The position up to which this device may compact its log, as far as the protocol
    /// knows: a leader, the least position every device in `devices` (the library's other
    /// devices) acknowledged storing of its log this epoch (0 if any has not), leaving out a
    /// device more than `retain` entries behind the log's end: it no longer holds the log
    /// back, and backfills from the snapshot when it comes back; a follower, what its
    /// leader's last segment offered (see [`Replica::offer_compaction`]). Never past this
    /// log's end. The runtime also keeps it at or below what its projections applied.
    pub fn compactable(&self, devices: &[DeviceId], retain: u64) -> Lsn {
        let end = self.durable().last_lsn();
        let upto = match self.role() {
            ElectionRole::Leader => {
                let matched = self.machine.matched();
                let floor = end.0.saturating_sub(retain);
                devices
                    .iter()
                    .filter(|d| **d != self.machine.device())
                    .map(|d| matched.get(d).copied().unwrap_or(0))
                    .filter(|m| *m >= floor)
                    .min()
                    .map_or(end, Lsn)
            }
            _ => self.machine.leader_base(),
        };
        upto.min(end)
    }

    /// For a leading replica: the least clock floor of this device (`own`) and of every other
    /// of `devices` (the devices the runtime trusts and has not revoked), each as acknowledged
    /// this epoch. No change older can still reach the log, so the tombstones older may be
    /// collected (a `Horizon` appended to the log). `None` unless leading, or while any device
    /// has not acknowledged a floor this epoch: a device that is away holds collection back
    /// until it comes back, as it must (its offline changes may be older).
    pub fn horizon(&self, devices: &[DeviceId], own: Option<ClockFloor>) -> Option<ClockFloor> {
        if self.role() != ElectionRole::Leader {
            return None;
        }
        let epoch = self.durable().epoch;
        let mut least = own?;
        for device in devices.iter().filter(|d| **d != self.machine.device()) {
            match self.floors.get(device) {
                Some((e, Some(floor))) if *e == epoch => least = least.min(*floor),
                _ => return None,
            }
        }
        Some(least)
    }

    /// For a leading replica: the devices of `devices`, besides this one, that have not
    /// acknowledged a clock floor this epoch, which [`Replica::horizon`] waits for (in the
    /// order given). Empty unless leading.
    pub fn floors_missing(&self, devices: &[DeviceId]) -> Vec<DeviceId> {
        if self.role() != ElectionRole::Leader {
            return Vec::new();
        }
        let epoch = self.durable().epoch;
        devices
            .iter()
            .copied()
            .filter(|d| *d != self.machine.device())
            .filter(|d| !matches!(self.floors.get(d), Some((e, Some(_))) if *e == epoch))
            .collect()
    }

    /// Tells a leading replica how far it may compact (its [`Replica::compactable`]): its
    /// segments offer followers to compact up to it, each never past what it stored itself,
    /// so a follower's snapshot waits no longer than the leader's. Ignored unless leading; an
    /// election forgets it.
    pub fn offer_compaction(&mut self, upto: Lsn) {
        if self.role() == ElectionRole::Leader {
            self.machine.offer_compaction(upto);
        }
    }

    /// Drops the log up to `base` in memory, after the runtime compacted the journal to it
    /// (at most [`Replica::compactable`] when it chose it). A base at or below the current
    /// one changes nothing.
    pub fn compacted(&mut self, base: Lsn) {
        assert!(
            base <= self.durable().last_lsn(),
            "a compaction past the log's end"
        );
        self.machine.compact(base);
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<ReplicaEvent> {
        self.events.pop_front()
    }

    /// The next write to make durable, in order: the election state first when it changed, then
    /// the log operations (contiguous appends as one). After the last one (`Ok(None)`), the
    /// runtime writes them all durably and calls [`Replica::written`]; if writing fails it drops
    /// this replica and starts a new one from what is durable.
    pub fn poll_log_write<S: Store>(
        &mut self,
        store: &mut S,
    ) -> Result<Option<LogWrite>, ReplicaError<S::Error>> {
        let durable = self.durable();
        let election = (durable.epoch, durable.voted);
        if election != self.election_polled {
            self.election_polled = election;
            self.unconfirmed = true;
            return Ok(Some(LogWrite::Election {
                epoch: election.0,
                voted: election.1,
            }));
        }
        let Some(op) = self.ops.pop_front() else {
            return Ok(None);
        };
        self.unconfirmed = true;
        let (at, epoch, entry) = match op {
            LogOp::Truncate { keep, removed } => {
                let dropped = self.others_changes(keep, removed, store)?;
                return Ok(Some(LogWrite::Truncate { keep, dropped }));
            }
            LogOp::Append { at, epoch, entry } => (at, epoch, entry),
        };
        let mut slots = vec![(epoch, entry)];
        while let Some(LogOp::Append {
            at: next,
            epoch,
            entry,
        }) = self.ops.front().copied()
        {
            if next.0 != at.0 + slots.len() as u64 {
                break;
            }
            self.ops.pop_front();
            slots.push((epoch, entry));
        }
        let mut entries: Vec<(Epoch, Vec<u8>)> = Vec::with_capacity(slots.len());
        for (i, (epoch, entry)) in slots.iter().enumerate() {
            let payload = match self.take_payload(*entry, store) {
                // A (misbehaving) leader named this change twice: the first took its payload.
                Err(ReplicaError::MissingPayload(id)) => slots[..i]
                    .iter()
                    .position(|(_, earlier)| earlier == entry)
                    .and_then(|j| entries.get(j))
                    .map(|(_, payload)| payload.clone())
                    .ok_or(ReplicaError::MissingPayload(id))?,
                other => other?,
            };
            entries.push((*epoch, payload));
        }
        Ok(Some(LogWrite::Append { at, entries }))
    }

    /// Of the `removed` entries after `keep` that a truncation takes out of the log, the changes
    /// another device made (or that do not open), forgotten from `offline`: the store drops them
    /// too (see [`LogWrite::Truncate`]). The store still holds the entries: every earlier write
    /// was made durable before this input.
    fn others_changes<S: Store>(
        &mut self,
        keep: Lsn,
        removed: u64,
        store: &mut S,
    ) -> Result<Vec<ChangeId>, ReplicaError<S::Error>> {
        let device = self.machine.device();
        let mut others = Vec::new();
        let mut first = keep.0 + 1;
        let end = keep.0 + 1 + removed;
        while first < end {
            let count = (end - first).min(self.segment_max.max(1) as u64);
            let entries = store
                .read_log(Lsn(first), count as usize)
                .map_err(ReplicaError::Store)?;
            for (_, sealed) in entries.iter().filter(|(_, s)| !s.is_empty()) {
                match store.open_pushed(sealed) {
                    Ok(opened) if opened.origin == device => {}
                    Ok(opened) => others.push(opened.id),
                    Err(_) => others.extend(store.peek_change_id(sealed)),
                }
            }
            first += count;
        }
        self.machine
            .forget_offline(&others.iter().copied().collect::<HashSet<_>>());
        Ok(others)
    }

    /// Takes the sealed payload of an entry to write (empty for a barrier) from memory, or from
    /// the offline journal.
    fn take_payload<S: Store>(
        &mut self,
        entry: LogSlot,
        store: &mut S,
    ) -> Result<Vec<u8>, ReplicaError<S::Error>> {
        let LogSlot::Change(id) = entry else {
            return Ok(Vec::new());
        };
        if let Some(payload) = self.payloads.remove(&id) {
            return Ok(payload);
        }
        self.payloads
            .extend(store.read_offline().map_err(ReplicaError::Store)?);
        self.payloads
            .remove(&id)
            .ok_or(ReplicaError::MissingPayload(id))
    }

    /// Every write polled so far is durable: the messages that waited for them may go.
    pub fn written(&mut self) {
        assert!(
            self.ops.is_empty(),
            "written() with log operations not yet polled"
        );
        self.unconfirmed = false;
    }

    /// Whether every write asked for has been polled and confirmed.
    fn all_durable(&self) -> bool {
        let durable = self.durable();
        !self.unconfirmed
            && self.ops.is_empty()
            && (durable.epoch, durable.voted) == self.election_polled
    }

    /// The next message to send. Nothing comes out while a write is pending or unconfirmed:
    /// a message never goes before the state it depends on is durable. Contiguous segments to
    /// one peer are merged. An error drops that one message (a segment is
    /// sent again when the follower does not acknowledge it).
    pub fn poll_transmit<S: Store>(
        &mut self,
        store: &mut S,
    ) -> Result<Option<Transmit>, ReplicaError<S::Error>> {
        if !self.all_durable() {
            return Ok(None);
        }
        if self.ready.is_empty() && !self.outbox.is_empty() {
            let outbox = std::mem::take(&mut self.outbox);
            self.ready = coalesce(outbox, self.segment_max).into();
        }
        let Some(Output::Send { to, message }) = self.ready.pop_front() else {
            return Ok(None);
        };
        match self.outgoing(to, message, store)? {
            Some(message) => Ok(Some(Transmit { to, message })),
            None => self.poll_transmit(store),
        }
    }

    /// The wire form of a message, with payloads read from memory or the store.
    fn outgoing<S: Store>(
        &mut self,
        to: DeviceId,
        message: Message,
        store: &mut S,
    ) -> Result<Option<ReplicationMessage>, ReplicaError<S::Error>> {
        Ok(Some(match message {
            Message::AppendReply { epoch, ok, last } => {
                // Apply runs in log order, so both domains are applied through the same point.
                let applied = store.applied();
                ReplicationMessage::Ack {
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
                    floor: store.floor(),
                }
            }
            Message::Push { changes } => {
                let changes = &changes[..changes.len().min(RECORDS_PER_MESSAGE_MAX)];
                if changes.iter().any(|id| !self.payloads.contains_key(id)) {
                    // One read of the offline journal covers every payload not in memory.
                    self.payloads
                        .extend(store.read_offline().map_err(ReplicaError::Store)?);
                }
                let (found, gone): (Vec<&ChangeId>, Vec<&ChangeId>) = changes
                    .iter()
                    .partition(|id| self.payloads.contains_key(id));
                if !gone.is_empty() {
                    // Neither in memory nor in the offline journal (which every write polled
                    // so far has reached): another device's change that a truncation did not
                    // return (see `LogWrite::Truncate`). Nothing here can push it.
                    let gone: HashSet<ChangeId> = gone.into_iter().copied().collect();
                    self.machine.forget_offline(&gone);
                }
                let sealed = found
                    .into_iter()
                    .filter_map(|id| self.payloads.get(id))
                    .map(|bytes| ByteBuf::from(bytes.clone()))
                    .collect::<Vec<_>>();
                if sealed.is_empty() {
                    return Ok(None);
                }
                ReplicationMessage::Push { changes: sealed }
            }
            Message::Append {
                epoch,
                prev,
                prev_epoch,
                entries,
                base,
            } => {
                let first = Lsn(prev.0 + 1);
                let stored = if entries.is_empty() {
                    Vec::new()
                } else {
                    store
                        .read_log(first, entries.len())
                        .map_err(ReplicaError::Store)?
                };
                ReplicationMessage::LogSegment {
                    epoch,
                    first,
                    prev_epoch,
                    leader_end: self.durable().last_lsn(),
                    base,
                    entries: stored
                        .into_iter()
                        .map(|(epoch, sealed)| WireLogEntry {
                            epoch,
                            sealed: ByteBuf::from(self.echo_or_whole(to, store, sealed)),
                        })
                        .collect(),
                }
            }
            election => return Ok(election_wire(election)),
        }))
    }
}

/// The rules' form of an election message (`None` for the kinds `handle_message` maps itself).
fn election_message(message: ReplicationMessage) -> Option<Message> {
    Some(match message {
        ReplicationMessage::RequestVote {
            epoch,
            last_epoch,
            last_lsn,
        } => Message::RequestVote {
            epoch,
            last: (last_epoch, last_lsn),
        },
        ReplicationMessage::Vote { epoch, granted } => Message::Vote { epoch, granted },
        ReplicationMessage::Stale { epoch } => Message::Stale { epoch },
        ReplicationMessage::PreVote {
            epoch,
            last_epoch,
            last_lsn,
        } => Message::PreVote {
            epoch,
            last: (last_epoch, last_lsn),
        },
        ReplicationMessage::PreVoteReply {
            epoch,
            granted,
            highest,
        } => Message::PreVoteReply {
            epoch,
            granted,
            highest,
        },
        ReplicationMessage::Compacted {
            epoch,
            base,
            base_epoch,
        } => Message::Compacted {
            epoch,
            base,
            base_epoch,
        },
        ReplicationMessage::LogSegment { .. }
        | ReplicationMessage::Push { .. }
        | ReplicationMessage::Ack { .. } => return None,
    })
}

/// The wire form of an election message (`None` for the kinds `outgoing` maps itself).
fn election_wire(message: Message) -> Option<ReplicationMessage> {
    Some(match message {
        Message::RequestVote { epoch, last } => ReplicationMessage::RequestVote {
            epoch,
            last_epoch: last.0,
            last_lsn: last.1,
        },
        Message::Vote { epoch, granted } => ReplicationMessage::Vote { epoch, granted },
        Message::Stale { epoch } => ReplicationMessage::Stale { epoch },
        Message::PreVote { epoch, last } => ReplicationMessage::PreVote {
            epoch,
            last_epoch: last.0,
            last_lsn: last.1,
        },
        Message::PreVoteReply {
            epoch,
            granted,
            highest,
        } => ReplicationMessage::PreVoteReply {
            epoch,
            granted,
            highest,
        },
        Message::Compacted {
            epoch,
            base,
            base_epoch,
        } => ReplicationMessage::Compacted {
            epoch,
            base,
            base_epoch,
        },
        Message::Append { .. } | Message::AppendReply { .. } | Message::Push { .. } => return None,
    })
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
