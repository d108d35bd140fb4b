//! `Machine`: the election and replication rules over change ids (no payloads, no wire form;
//! [`crate::Replica`] wraps it with both).
//!
//! Rules, in brief:
//! - An epoch is `(counter, device)`; a candidate takes `max(counter seen) + 1` with its own id,
//!   so no two leaders share an epoch. A device votes once per counter, only for a log at least as
//!   up to date as its own (`(last epoch, last lsn)`), and only while it has reachable peers.
//! - A leader starts its epoch with a barrier entry, sequences its own and pushed changes
//!   (idempotent by change id) and ships entries to each follower from its next position,
//!   backing off on a mismatch.
//! - A follower refuses entries from an epoch below the highest it accepted (answering `Stale`,
//!   which deposes the sender). Entries that conflict with the leader's, and stale-epoch entries
//!   beyond the leader's, are truncated and their changes go back to `pending` to be resubmitted:
//!   epochs fence off log positions, never changes.
//! - Without a reachable leader a device keeps committing into `pending` and pushes when it can.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use keel_schema::{ChangeId, DeviceId, Epoch, Lsn};

use super::types::{Durable, ElectionRole, Input, LogOp, LogSlot, Message, Output};

/// How far above the highest epoch counter it knows a replica lets a peer's message go (see
/// `Machine::in_reach`).
const EPOCH_JUMP_MAX: u64 = 1 << 20;

/// Whether a segment's entries could come from the leader of `epoch`: their epochs never go
/// back (from `prev_epoch` on), none is above the segment's, and a barrier only starts an epoch.
fn well_formed(epoch: Epoch, prev: Lsn, prev_epoch: Epoch, entries: &[(Epoch, LogSlot)]) -> bool {
    if prev.0.checked_add(entries.len() as u64).is_none() {
        return false;
    }
    let mut last = if prev.0 == 0 {
        Epoch::default()
    } else {
        prev_epoch
    };
    for (e, slot) in entries {
        if *e > epoch || *e < last || (*slot == LogSlot::Barrier && *e == last) {
            return false;
        }
        last = *e;
    }
    true
}

/// Timing and sizing of a replica.
#[derive(Clone, Debug)]
pub struct ReplicaConfig {
    /// This device.
    pub device: DeviceId,
    /// How long without a leader before an election (plus up to the same again as jitter).
    pub election_timeout_ms: u64,
    /// How often a leader sends entries or heartbeats, and a follower pushes pending changes.
    pub heartbeat_ms: u64,
    /// Most entries per `Append`.
    pub segment_max: usize,
    /// Most `Append` segments sent to one follower and not yet acknowledged (at least 1). With
    /// more than one, the leader reads and sends the next segment while the follower stores
    /// the previous one.
    pub segments_in_flight: usize,
}

/// What a leader has sent to one follower beyond what it acknowledged.
#[derive(Clone, Copy, Debug)]
struct Flight {
    /// The last position sent.
    upto: u64,
    /// When the follower last made progress, or the first segment past it was sent: what is in
    /// flight is sent again after an election timeout without progress.
    since_ms: u64,
}

/// One device's replication state machine. No I/O: see [`Machine::handle`].
#[derive(Debug)]
pub(crate) struct Machine {
    config: ReplicaConfig,
    durable: Durable,
    role: ElectionRole,
    leader: Option<DeviceId>,
    connected: BTreeSet<DeviceId>,
    election_deadline_ms: u64,
    last_send_ms: u64,
    votes: BTreeSet<DeviceId>,
    /// A pre-vote in progress: the epoch this replica would stand in, and who would vote for it.
    pre_vote: Option<(Epoch, BTreeSet<DeviceId>)>,
    /// When this replica last heard its leader (an `Append` it accepted); while that is less than
    /// an election timeout ago it refuses pre-votes.
    heard_ms: Option<u64>,
    /// The highest epoch counter other devices said they took or voted in (pre-vote refusals):
    /// the next candidacy stands above it. Not durable; refusals teach it again.
    highest_seen: u64,
    next: BTreeMap<DeviceId, u64>,
    /// The last position each follower said it stored of this leader's log (while leading).
    matched: BTreeMap<DeviceId, u64>,
    /// The compaction base of the leader this replica follows, as its last segment said.
    leader_base: Lsn,
    /// While leading: how far it may compact, as the runtime last said (see
    /// [`crate::Replica::offer_compaction`]).
    offered: Lsn,
    /// Set when this device's log cannot continue the leader's: the leader's compaction base
    /// (what it lacks was compacted there, or its compacted history differs). Taken by the
    /// runtime, which backfills.
    behind: Option<Lsn>,
    /// Sent to each follower and not yet acknowledged.
    flights: BTreeMap<DeviceId, Flight>,
    /// The change ids in the log, kept only while leading (to sequence idempotently); built
    /// when needed, dropped on stepping down (a follower of a big library does not need it).
    in_log: Option<HashSet<ChangeId>>,
    ops: Vec<LogOp>,
    /// The most devices (this one included) reachable at once since this replica started.
    peak_electorate: usize,
    /// Whether this replica has followed or led a leader since it started.
    in_cluster: bool,
    /// This device's pending changes pushed to `pushed_to`, and when: each is pushed once, and
    /// again only after [`PUSH_RESEND_BEATS`] heartbeats without coming back in the log (a
    /// lost message), or to another leader, or after the link to it was lost.
    pushed: HashMap<ChangeId, u64>,
    /// The leader `pushed` was pushed to.
    pushed_to: Option<DeviceId>,
    /// The end of the log as it was on disk when this replica's node started, while the node
    /// has not read it back and checked it yet (see [`crate::Replica::hold_until_checked`]):
    /// damage at rest is known only once read, so the replica does not stand until then.
    unchecked: Option<Lsn>,
}

/// Heartbeats after which a pushed change that has not come back sequenced is pushed again.
pub(crate) const PUSH_RESEND_BEATS: u64 = 20;

impl Machine {
    /// A replica starting (or restarting) from its durable state. A device whose stored epoch is its
    /// own resumes leading that epoch (the library's creator starts that way with epoch 1).
    pub(crate) fn new(config: ReplicaConfig, durable: Durable, now_ms: u64) -> Self {
        // Resume leading only an epoch this device actually won (its barrier is in the log); a
        // candidacy interrupted by a crash is simply abandoned.
        // The founder's epoch 1 needs no barrier (candidates always start at 2 or above).
        let won = durable.epoch.device == config.device
            && (durable.epoch.counter == 1
                || durable
                    .log
                    .iter()
                    .rev()
                    .any(|(e, entry)| e == durable.epoch && entry == LogSlot::Barrier)
                // Its barrier compacted away: the base is in its epoch.
                || (durable.log.base().0 > 0 && durable.log.base_epoch() == durable.epoch));
        let role = if won {
            ElectionRole::Leader
        } else {
            ElectionRole::Alone
        };
        let mut replica = Self {
            leader: (role == ElectionRole::Leader).then_some(config.device),
            config,
            durable,
            role,
            connected: BTreeSet::new(),
            election_deadline_ms: 0,
            last_send_ms: 0,
            votes: BTreeSet::new(),
            pre_vote: None,
            unchecked: None,
            heard_ms: None,
            highest_seen: 0,
            next: BTreeMap::new(),
            matched: BTreeMap::new(),
            leader_base: Lsn(0),
            offered: Lsn(0),
            behind: None,
            flights: BTreeMap::new(),
            in_log: None,
            pushed: HashMap::new(),
            pushed_to: None,
            ops: Vec::new(),
            peak_electorate: 1,
            in_cluster: false,
        };
        replica.reset_election_timer(now_ms);
        if replica.role == ElectionRole::Leader {
            for id in std::mem::take(&mut replica.durable.offline) {
                replica.sequence(id);
            }
        }
        replica
    }

    /// The creator of a library: leader of epoch `(1, device)` from the start.
    pub(crate) fn founder(config: ReplicaConfig, now_ms: u64) -> Self {
        let durable = Durable {
            epoch: Epoch {
                counter: 1,
                device: config.device,
            },
            voted: Epoch {
                counter: 1,
                device: config.device,
            },
            log: vec![(
                Epoch {
                    counter: 1,
                    device: config.device,
                },
                LogSlot::Barrier,
            )]
            .into(),
            offline: Vec::new(),
            vote_floor: None,
        };
        Self::new(config, durable, now_ms)
    }

    /// The state the runtime must keep durable (persist it after each `handle`, before sending).
    pub(crate) fn config(&self) -> &ReplicaConfig {
        &self.config
    }

    pub(crate) fn durable(&self) -> &Durable {
        &self.durable
    }

    /// The log changes made since the last call, in order: the runtime writes them to the journal
    /// (with [`Machine::durable`]'s epochs) before sending anything `handle` returned.
    pub(crate) fn take_ops(&mut self) -> Vec<LogOp> {
        std::mem::take(&mut self.ops)
    }

    /// The leader's compaction base when this device must backfill to follow it (once).
    pub(crate) fn take_behind(&mut self) -> Option<Lsn> {
        self.behind.take()
    }

    /// The compaction base of the leader this replica follows (0 when none or unknown).
    pub(crate) fn leader_base(&self) -> Lsn {
        if self.role == ElectionRole::Follower {
            self.leader_base
        } else {
            Lsn(0)
        }
    }

    /// Sets what segments offer followers to compact to (see [`Machine::compact_offer`]).
    pub(crate) fn offer_compaction(&mut self, upto: Lsn) {
        self.offered = upto;
    }

    /// The compaction position a segment to `peer` carries: this log's base, or how far this
    /// leader may compact if that is further, but never past what `peer` stored itself (so it
    /// never compacts a tail its leader would truncate).
    fn compact_offer(&self, peer: DeviceId) -> Lsn {
        let stored = Lsn(self.matched.get(&peer).copied().unwrap_or(0));
        self.durable.log.base().max(self.offered.min(stored))
    }

    /// The last position each follower stored of this leader's log, as it acknowledged
    /// (empty unless leading).
    pub(crate) fn matched(&self) -> &BTreeMap<DeviceId, u64> {
        &self.matched
    }

    /// Drops the log up to `base`, which the runtime compacted in the journal.
    pub(crate) fn compact(&mut self, base: Lsn) {
        self.durable.log.compact(base);
    }

    /// Whether `id` is in this replica's log.
    pub(crate) fn in_log(&self, id: &ChangeId) -> bool {
        self.in_log.as_ref().is_some_and(|set| set.contains(id))
    }

    /// The devices this replica counts as reachable.
    pub(crate) fn connected(&self) -> impl Iterator<Item = &DeviceId> {
        self.connected.iter()
    }

    /// Tells a follower that the time since `now_ms` went on its own work (writing what its
    /// leader sent), not on a silent leader: its election timer starts again.
    pub(crate) fn busy_until(&mut self, now_ms: u64) {
        if self.role == ElectionRole::Follower && self.leader.is_some() {
            self.reset_election_timer(now_ms);
        }
    }

    /// Most entries per `Append`.
    pub(crate) fn segment_max(&self) -> usize {
        self.config.segment_max
    }

    /// The current role.
    pub(crate) fn role(&self) -> ElectionRole {
        self.role
    }

    /// The leader this replica follows (itself when leading).
    pub(crate) fn leader(&self) -> Option<DeviceId> {
        self.leader
    }

    /// This replica's device.
    pub(crate) fn device(&self) -> DeviceId {
        self.config.device
    }

    fn reset_election_timer(&mut self, now_ms: u64) {
        // Jitter from the device, the epoch and the time (deterministic, so a simulation
        // replays exactly), so that replicas do not time out together again and again.
        let mut seed = self
            .config
            .device
            .0
            .iter()
            .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
            });
        seed ^= self
            .durable
            .epoch
            .counter
            .wrapping_mul(0x9e37_79b9_7f4a_7c15);
        seed ^= now_ms.wrapping_mul(0xbf58_476d_1ce4_e5b9);
        seed = (seed ^ (seed >> 31)).wrapping_mul(0x94d0_49bb_1331_11eb);
        seed ^= seed >> 29;
        let jitter = seed % self.config.election_timeout_ms.max(1);
        self.election_deadline_ms = now_ms + self.config.election_timeout_ms + jitter;
    }

    fn send(out: &mut Vec<Output>, to: DeviceId, message: Message) {
        out.push(Output::Send { to, message });
    }

    fn idle_role(&self) -> ElectionRole {
        if self.connected.is_empty() {
            ElectionRole::Alone
        } else {
            ElectionRole::Follower
        }
    }

    /// Handles one input at time `now_ms`; returns what to send. Before sending any of it, make
    /// [`Machine::durable`]'s epoch and vote and every operation of [`Machine::take_ops`] durable.
    pub(crate) fn handle(&mut self, input: Input, now_ms: u64) -> Vec<Output> {
        let (epoch_before, voted_before) = (self.durable.epoch, self.durable.voted);
        let out = self.dispatch(input, now_ms);
        // Epochs never go back, and a vote is given at most once per epoch counter.
        assert!(self.durable.epoch >= epoch_before, "the epoch went back");
        assert!(
            self.durable.voted == voted_before || self.durable.voted.counter > voted_before.counter,
            "a second vote in epoch counter {}",
            voted_before.counter
        );
        out
    }

    /// The next time at which [`Input::Tick`] has something to do (an election timeout, a
    /// heartbeat or push, a segment to send again): a runtime may sleep until then, or until
    /// the next input, whichever comes first.
    pub(crate) fn poll_timeout(&self) -> u64 {
        let heartbeat = self.last_send_ms + self.config.heartbeat_ms;
        match self.role {
            ElectionRole::Leader => heartbeat,
            // A push is due only with a leader to push to (without one, the tick does nothing
            // for it and a past deadline would spin the runtime).
            _ if !self.durable.offline.is_empty()
                && self.leader.is_some_and(|l| self.connected.contains(&l)) =>
            {
                heartbeat.min(self.election_deadline_ms)
            }
            _ => self.election_deadline_ms,
        }
    }

    fn dispatch(&mut self, input: Input, now_ms: u64) -> Vec<Output> {
        let mut out = Vec::new();
        match input {
            Input::Tick => self.tick(now_ms, &mut out),
            Input::Abdicate => self.abdicate(now_ms),
            Input::Connected(peer) => {
                if peer != self.config.device {
                    self.connected.insert(peer);
                    self.peak_electorate = self.peak_electorate.max(self.connected.len() + 1);
                    if self.role == ElectionRole::Leader {
                        self.next.insert(peer, self.durable.last_lsn().0);
                        self.flights.remove(&peer);
                        self.append_to(peer, now_ms, true, &mut out);
                    } else if self.role == ElectionRole::Alone {
                        self.role = ElectionRole::Follower;
                        self.reset_election_timer(now_ms);
                    }
                }
            }
            Input::Disconnected(peer) => {
                self.connected.remove(&peer);
                self.next.remove(&peer);
                self.flights.remove(&peer);
                self.votes.remove(&peer);
                if self.leader == Some(peer) {
                    self.leader = None;
                }
                if self.pushed_to == Some(peer) {
                    // What was in flight on that link may be lost: pushed again when it is back.
                    self.pushed.clear();
                    self.pushed_to = None;
                }
                if self.role != ElectionRole::Leader && self.connected.is_empty() {
                    self.role = ElectionRole::Alone;
                }
            }
            Input::Commit(id) => {
                if self.role == ElectionRole::Leader {
                    self.sequence(id);
                    let peers: Vec<DeviceId> = self.connected.iter().copied().collect();
                    for peer in peers {
                        self.append_to(peer, now_ms, false, &mut out);
                    }
                } else {
                    self.durable.offline.push(id);
                    if let Some(leader) = self.leader.filter(|l| self.connected.contains(l)) {
                        self.mark_pushed(leader, &[id], now_ms);
                        Self::send(&mut out, leader, Message::Push { changes: vec![id] });
                    }
                }
            }
            Input::Received { from, message } => self.receive(from, message, now_ms, &mut out),
        }
        out
    }

    fn tick(&mut self, now_ms: u64, out: &mut Vec<Output>) {
        let beat = now_ms >= self.last_send_ms + self.config.heartbeat_ms;
        match self.role {
            ElectionRole::Leader => {
                if beat {
                    self.last_send_ms = now_ms;
                    let peers: Vec<DeviceId> = self.connected.iter().copied().collect();
                    for peer in peers {
                        self.append_to(peer, now_ms, true, out);
                    }
                }
            }
            ElectionRole::Follower | ElectionRole::Candidate | ElectionRole::Alone => {
                if beat && !self.durable.offline.is_empty() {
                    if let Some(leader) = self.leader.filter(|l| self.connected.contains(l)) {
                        self.last_send_ms = now_ms;
                        let due = self.push_due(leader, now_ms);
                        if !due.is_empty() {
                            self.mark_pushed(leader, &due, now_ms);
                            Self::send(out, leader, Message::Push { changes: due });
                        }
                    }
                }
                if now_ms >= self.election_deadline_ms {
                    if self.durable.last_lsn().0 == 0 {
                        // No log yet, so not the founder's head either: a device that leads
                        // must start from the library's log, never a log of its own.
                        self.reset_election_timer(now_ms);
                    } else if self.connected.is_empty() && self.may_lead_alone() && self.may_stand()
                    {
                        // Nobody to ask: its own vote is the majority of one.
                        self.start_election(now_ms, out);
                    } else if self.connected.is_empty() {
                        self.role = ElectionRole::Alone;
                        self.reset_election_timer(now_ms);
                    } else {
                        self.start_pre_vote(now_ms, out);
                    }
                }
            }
        }
    }

    /// Takes over what `old` learned of the cluster (see [`Machine::may_lead_alone`]).
    pub(crate) fn remember_cluster(&mut self, old: &Machine) {
        self.peak_electorate = self.peak_electorate.max(old.peak_electorate);
        self.in_cluster |= old.in_cluster;
        self.unchecked = old.unchecked;
    }

    /// Holds standing until the log through `end` is checked (see
    /// [`crate::Replica::hold_until_checked`]).
    pub(crate) fn hold_until_checked(&mut self, end: Lsn) {
        self.unchecked = (end.0 > 0).then_some(end);
    }

    /// The node read the log back through `through` and found it whole.
    pub(crate) fn log_checked(&mut self, through: Lsn) {
        if self.unchecked.is_some_and(|end| through >= end) {
            self.unchecked = None;
        }
    }

    /// Whether the log is still held back as unchecked (see [`Machine::hold_until_checked`]).
    pub(crate) fn is_unchecked(&self) -> bool {
        self.unchecked.is_some()
    }

    /// Whether this replica, with nobody reachable, leads a partition of its own: only the
    /// survivor of a library of two devices (the most it ever reached at once was one other),
    /// and only after following or leading that other, with a log. In a larger library a lone
    /// device leading would depose the majority's leader when it came back (its epoch higher)
    /// and make the majority's changes be sequenced again; and a device that has not joined the
    /// cluster's log yet would start a log of its own.
    fn may_lead_alone(&self) -> bool {
        self.peak_electorate == 2 && self.in_cluster && self.durable.last_lsn().0 > 0
    }

    /// The highest epoch counter this replica knows of (taken, voted in or heard of).
    fn known_counter(&self) -> u64 {
        self.durable
            .epoch
            .counter
            .max(self.durable.voted.counter)
            .max(self.highest_seen)
    }

    /// Whether `epoch` is within reach: at most [`EPOCH_JUMP_MAX`] above what this replica
    /// knows. Elections raise the counter one at a time; a peer that names an epoch far above
    /// is misbehaving, and adopting it would bring every counter near its limit. Nor is a
    /// founder's epoch of this device's that it does not hold.
    fn in_reach(&self, epoch: Epoch) -> bool {
        epoch.counter <= self.known_counter().saturating_add(EPOCH_JUMP_MAX)
            && !self.founders_epoch_forged(epoch)
    }

    /// Whether `epoch`, named by a peer, is epoch 1 of this device while this device does not
    /// hold it: epoch 1 is the founder's, made only by founding, and a replica that held it as
    /// its own would resume leading at its next start (see [`Machine::new`]).
    fn founders_epoch_forged(&self, epoch: Epoch) -> bool {
        epoch.counter == 1 && epoch.device == self.config.device && epoch > self.durable.epoch
    }

    /// Whether every epoch `message` names is within reach (see [`Machine::in_reach`]).
    fn plausible(&self, message: &Message) -> bool {
        match message {
            Message::RequestVote { epoch, last } | Message::PreVote { epoch, last } => {
                self.in_reach(*epoch) && self.in_reach(last.0)
            }
            Message::PreVoteReply { epoch, highest, .. } => {
                self.in_reach(*epoch) && self.in_reach(*highest)
            }
            Message::Vote { epoch, .. }
            | Message::Stale { epoch }
            | Message::AppendReply { epoch, .. } => self.in_reach(*epoch),
            Message::Append {
                epoch,
                prev_epoch,
                entries,
                ..
            } => {
                self.in_reach(*epoch)
                    && self.in_reach(*prev_epoch)
                    && entries.iter().all(|(e, _)| self.in_reach(*e))
            }
            Message::Compacted {
                epoch, base_epoch, ..
            } => self.in_reach(*epoch) && self.in_reach(*base_epoch),
            Message::Push { .. } => true,
        }
    }

    /// The epoch this replica would stand in next.
    fn next_epoch(&self) -> Epoch {
        // Epoch 1 belongs to the founder: a candidate never takes it. Saturating: counters stay
        // far below the limit (see `in_reach`), and a replica at it simply never stands.
        let counter = self.known_counter().max(1).saturating_add(1);
        Epoch {
            counter,
            device: self.config.device,
        }
    }

    /// Stops leading, for good: the epoch moves to a new one of this device's, as when standing,
    /// but without asking for votes, so that neither this replica nor one restarted from its
    /// durable state leads the old epoch again (it never won the new one, whose barrier is not
    /// in its log). Its log may then be cut like a follower's (no entry is ever written again
    /// at a position of the old epoch), and the next leader is elected as usual: by the
    /// election rule, one whose log holds every committed entry. A no-op unless leading.
    fn abdicate(&mut self, now_ms: u64) {
        if self.role != ElectionRole::Leader {
            return;
        }
        let epoch = self.next_epoch();
        self.durable.epoch = epoch;
        self.durable.voted = epoch;
        self.role = self.idle_role();
        self.leader = None;
        self.votes.clear();
        self.pre_vote = None;
        self.next.clear();
        self.flights.clear();
        self.reset_election_timer(now_ms);
    }

    /// Asks the reachable devices whether they would vote, before bumping any epoch: only when a
    /// majority would does the election start (see [`Message::PreVote`]).
    fn start_pre_vote(&mut self, now_ms: u64, out: &mut Vec<Output>) {
        if !self.may_stand() {
            self.reset_election_timer(now_ms);
            return;
        }
        let epoch = self.next_epoch();
        self.pre_vote = Some((epoch, BTreeSet::from([self.config.device])));
        self.reset_election_timer(now_ms);
        let last = self.durable.last();
        self.to_all(Message::PreVote { epoch, last }, out);
        self.maybe_stand(now_ms, out);
    }

    /// Starts the election once a majority would vote in the pre-vote, if this replica may
    /// still stand (a hold or a floor may have come since the pre-vote began).
    fn maybe_stand(&mut self, now_ms: u64, out: &mut Vec<Output>) {
        let electorate = self.connected.len() + 1;
        if !self.may_stand() {
            self.pre_vote = None;
            return;
        }
        if let Some((epoch, yes)) = &self.pre_vote {
            if *epoch == self.next_epoch() && yes.len() * 2 > electorate {
                self.pre_vote = None;
                self.start_election(now_ms, out);
            }
        }
    }

    fn start_election(&mut self, now_ms: u64, out: &mut Vec<Output>) {
        let epoch = self.next_epoch();
        self.durable.epoch = epoch;
        self.durable.voted = epoch;
        self.role = ElectionRole::Candidate;
        self.leader = None;
        self.votes = BTreeSet::from([self.config.device]);
        self.reset_election_timer(now_ms);
        let last = self.durable.last();
        self.to_all(Message::RequestVote { epoch, last }, out);
        self.maybe_win(now_ms, out);
    }

    fn maybe_win(&mut self, now_ms: u64, out: &mut Vec<Output>) {
        let electorate = self.connected.len() + 1;
        if self.role == ElectionRole::Candidate && self.votes.len() * 2 > electorate {
            self.become_leader(now_ms, out);
        }
    }

    fn become_leader(&mut self, now_ms: u64, out: &mut Vec<Output>) {
        self.in_cluster = true;
        let epoch = self.durable.epoch;
        self.role = ElectionRole::Leader;
        self.leader = Some(self.config.device);
        self.offered = Lsn(0);
        self.record_push(epoch, LogSlot::Barrier);
        for id in std::mem::take(&mut self.durable.offline) {
            self.sequence(id);
        }
        let barrier = self.durable.last_lsn().0;
        self.next = self.connected.iter().map(|p| (*p, barrier)).collect();
        self.flights.clear();
        self.last_send_ms = now_ms;
        let peers: Vec<DeviceId> = self.connected.iter().copied().collect();
        for peer in peers {
            self.append_to(peer, now_ms, true, out);
        }
    }

    /// Forgets offline changes that no payload backs (see `Replica::outgoing`).
    pub(crate) fn forget_offline(&mut self, gone: &HashSet<ChangeId>) {
        self.durable.offline.retain(|id| !gone.contains(id));
    }

    /// Appends a change to the leader's log unless it is there already.
    fn sequence(&mut self, id: ChangeId) {
        let log = &self.durable.log;
        let in_log = self.in_log.get_or_insert_with(|| {
            log.iter()
                .filter_map(|(_, e)| match e {
                    LogSlot::Change(id) => Some(id),
                    LogSlot::Barrier => None,
                })
                .collect()
        });
        if in_log.insert(id) {
            self.durable.offline.retain(|p| *p != id);
            self.record_push(self.durable.epoch, LogSlot::Change(id));
        }
    }

    /// Sends a follower what it lacks: segments from its acknowledged position, at most
    /// `segments_in_flight` of them unacknowledged. `beat` (a heartbeat is due): when nothing new
    /// goes out, an empty `Append` at the acknowledged position does; and if nothing was
    /// acknowledged for an election timeout, what is in flight is sent again (a message was lost).
    fn append_to(&mut self, peer: DeviceId, now_ms: u64, beat: bool, out: &mut Vec<Output>) {
        let last = self.durable.last_lsn().0;
        let next = self
            .next
            .get(&peer)
            .copied()
            .unwrap_or(last + 1)
            .clamp(1, last + 1);
        let acked = next - 1;
        let base = self.durable.log.base();
        if acked < base.0 {
            // What the follower lacks was compacted here: it must backfill from a snapshot.
            if beat || !self.flights.contains_key(&peer) {
                Self::send(
                    out,
                    peer,
                    Message::Compacted {
                        epoch: self.durable.epoch,
                        base,
                        base_epoch: self.durable.log.base_epoch(),
                    },
                );
                self.flights.insert(
                    peer,
                    Flight {
                        upto: acked,
                        since_ms: now_ms,
                    },
                );
            }
            return;
        }
        let fresh = Flight {
            upto: acked,
            since_ms: now_ms,
        };
        let mut flight = self
            .flights
            .get(&peer)
            .copied()
            .filter(|f| f.upto >= acked && f.upto <= last)
            .unwrap_or(fresh);
        if beat
            && flight.upto > acked
            && now_ms >= flight.since_ms + self.config.election_timeout_ms
        {
            flight = fresh;
        }
        let segment = self.config.segment_max.max(1) as u64;
        let window = segment.saturating_mul(self.config.segments_in_flight.max(1) as u64);
        let limit = last.min(acked.saturating_add(window));
        let mut sent = false;
        while flight.upto < limit {
            if flight.upto == acked {
                flight.since_ms = now_ms;
            }
            let end = (flight.upto + segment).min(limit);
            self.send_segment(peer, flight.upto, end, out);
            flight.upto = end;
            sent = true;
        }
        if beat && !sent {
            self.send_segment(peer, acked, acked, out);
        }
        self.flights.insert(peer, flight);
    }

    /// Sends the log entries after `after` up to `end` (none: a heartbeat).
    fn send_segment(&self, peer: DeviceId, after: u64, end: u64, out: &mut Vec<Output>) {
        let prev = Lsn(after);
        Self::send(
            out,
            peer,
            Message::Append {
                epoch: self.durable.epoch,
                prev,
                prev_epoch: self.durable.epoch_at(prev).unwrap_or_default(),
                entries: self.durable.log.range(after as usize, end as usize),
                base: self.compact_offer(peer),
            },
        );
    }

    fn step_down(&mut self, epoch: Epoch, leader: Option<DeviceId>, now_ms: u64) {
        if epoch > self.durable.epoch {
            self.durable.epoch = epoch;
        }
        if self.role == ElectionRole::Leader {
            // Own changes this leader sequenced are safe: they stay in its log until the new
            // leader's entries truncate them, and truncation returns them to `pending`.
            self.next.clear();
            self.matched.clear();
            self.flights.clear();
            self.in_log = None;
        }
        self.role = self.idle_role();
        self.leader = leader;
        self.votes.clear();
        self.pre_vote = None;
        self.heard_ms = None;
        self.reset_election_timer(now_ms);
    }

    /// Whether this replica would vote for `from` standing in `epoch` with a log ending at `last`:
    /// one vote per counter, only for the candidate's own epoch, only for a log at least as up to
    /// date. `RequestVote` grants by it; `PreVote` also asks that no live leader be known.
    fn would_vote(&self, from: DeviceId, epoch: Epoch, last: (Epoch, Lsn)) -> bool {
        epoch.counter > self.durable.voted.counter
            && epoch >= self.durable.epoch
            && last >= self.vouched()
            && epoch.device == from
    }

    /// The log end this replica vouches for in elections: its own, or the end it held before
    /// it cut its log at a damaged record, whichever is more up to date.
    fn vouched(&self) -> (Epoch, Lsn) {
        let own = self.durable.last();
        self.durable.vote_floor.map_or(own, |floor| floor.max(own))
    }

    /// Whether this replica may stand: not while its log is short of what it vouched for
    /// before cutting it (it would win without entries it had, and others may have counted on),
    /// and not while the log it found on disk is unchecked (a damaged record nobody read yet
    /// would make it win with a log it does not have).
    fn may_stand(&self) -> bool {
        self.unchecked.is_none()
            && self
                .durable
                .vote_floor
                .is_none_or(|floor| self.durable.last() >= floor)
    }

    /// The vote floor to store with a cut of this replica's log at a damaged record (see
    /// [`crate::Replica::handle_abdicate`]): its own log end; for a leader, the furthest
    /// position a follower acknowledged this epoch (every committed entry is at or before it,
    /// and a device holding it can win this replica's vote), or its own end if none did.
    pub(crate) fn floor_for_cut(&self) -> (Epoch, Lsn) {
        let own = self.durable.last();
        let floor = match self.role {
            ElectionRole::Leader => self
                .matched
                .values()
                .copied()
                .max()
                .filter(|m| *m > 0 && *m < own.1 .0)
                .and_then(|m| Some((self.durable.epoch_at(Lsn(m))?, Lsn(m))))
                .unwrap_or(own),
            _ => own,
        };
        self.durable.vote_floor.map_or(floor, |f| f.max(floor))
    }

    /// Sends `message` to every reachable device.
    fn to_all(&self, message: Message, out: &mut Vec<Output>) {
        for peer in self.connected.iter().copied() {
            Self::send(out, peer, message.clone());
        }
    }

    fn receive(&mut self, from: DeviceId, message: Message, now_ms: u64, out: &mut Vec<Output>) {
        if !self.plausible(&message) {
            return;
        }
        match message {
            Message::RequestVote { epoch, last } => {
                self.on_request_vote(from, epoch, last, now_ms, out)
            }
            Message::PreVote { epoch, last } => self.on_pre_vote(from, epoch, last, now_ms, out),
            Message::PreVoteReply {
                epoch,
                granted,
                highest,
            } => self.on_pre_vote_reply(from, epoch, granted, highest, now_ms, out),
            Message::Vote { epoch, granted } => {
                if self.role == ElectionRole::Candidate && epoch == self.durable.epoch && granted {
                    self.votes.insert(from);
                    self.maybe_win(now_ms, out);
                }
            }
            Message::Stale { epoch } => {
                if epoch > self.durable.epoch {
                    self.step_down(epoch, None, now_ms);
                }
            }
            Message::Push { changes } => self.on_push(changes, now_ms, out),
            Message::AppendReply { epoch, ok, last } => {
                self.on_append_reply(from, epoch, ok, last, now_ms, out)
            }
            Message::Append {
                epoch,
                prev,
                prev_epoch,
                entries,
                base,
            } => {
                if self.follow(from, epoch, out) {
                    self.on_append(from, epoch, (prev, prev_epoch), entries, now_ms, out);
                    if self.leader == Some(from) {
                        self.leader_base = base;
                    }
                }
            }
            Message::Compacted {
                epoch,
                base,
                base_epoch,
            } => {
                if self.follow(from, epoch, out) {
                    self.heard_leader(from, epoch, now_ms);
                    self.on_compacted(from, base, base_epoch, out);
                }
            }
        }
    }

    fn on_request_vote(
        &mut self,
        from: DeviceId,
        epoch: Epoch,
        last: (Epoch, Lsn),
        now_ms: u64,
        out: &mut Vec<Output>,
    ) {
        let granted = self.would_vote(from, epoch, last);
        if granted {
            self.durable.voted = epoch;
            self.step_down(epoch, None, now_ms);
        } else if epoch > self.durable.epoch {
            // Learn the newer epoch even when refusing (a better log then proposes above
            // it), without resetting the election timer.
            let deadline = self.election_deadline_ms;
            self.step_down(epoch, None, now_ms);
            self.election_deadline_ms = deadline;
        }
        Self::send(out, from, Message::Vote { epoch, granted });
    }

    fn on_pre_vote(
        &mut self,
        from: DeviceId,
        epoch: Epoch,
        last: (Epoch, Lsn),
        now_ms: u64,
        out: &mut Vec<Output>,
    ) {
        // Would vote as for `RequestVote`, unless a live leader is known: this replica
        // leads, or heard its leader less than an election timeout ago.
        let leader_alive = self.role == ElectionRole::Leader
            || (self.leader.is_some()
                && self
                    .heard_ms
                    .is_some_and(|h| now_ms < h.saturating_add(self.config.election_timeout_ms)));
        // Two devices whose timers ran out together would each grant the other's
        // pre-vote, both stand in the same counter, vote for themselves and split it,
        // and wait a second election timeout (decision 0036). A device asking for
        // votes itself grants only an asker that outranks it: a better log, or the same
        // log and a higher device id. Pre-votes change nothing durable, so refusing
        // more of them costs liveness at most, never safety; one of any two askers
        // outranks the other.
        let outranked =
            self.pre_vote.is_some() && (last, from) < (self.durable.last(), self.config.device);
        let granted = !leader_alive && !outranked && self.would_vote(from, epoch, last);
        let highest = self.durable.epoch.max(self.durable.voted);
        Self::send(
            out,
            from,
            Message::PreVoteReply {
                epoch,
                granted,
                highest,
            },
        );
    }

    #[allow(clippy::too_many_arguments)]
    fn on_pre_vote_reply(
        &mut self,
        from: DeviceId,
        epoch: Epoch,
        granted: bool,
        highest: Epoch,
        now_ms: u64,
        out: &mut Vec<Output>,
    ) {
        // A device that voted in a higher epoch than this one knows refuses every
        // proposal up to it: the next one goes above.
        self.highest_seen = self.highest_seen.max(highest.counter);
        if !granted || self.role == ElectionRole::Leader {
            return;
        }
        if let Some((asked, yes)) = &mut self.pre_vote {
            if *asked == epoch {
                yes.insert(from);
                self.maybe_stand(now_ms, out);
            }
        }
    }

    /// The pending changes to push to `leader` now (at most one message's worth): those not
    /// pushed to it yet, or pushed [`PUSH_RESEND_BEATS`] heartbeats ago and not back in the
    /// log since.
    fn push_due(&mut self, leader: DeviceId, now_ms: u64) -> Vec<ChangeId> {
        self.pushing_to(leader);
        if self.pushed.len() > self.durable.offline.len() {
            // Some came back sequenced: forget them.
            let pending: HashSet<ChangeId> = self.durable.offline.iter().copied().collect();
            self.pushed.retain(|id, _| pending.contains(id));
        }
        let resend = self.config.heartbeat_ms.saturating_mul(PUSH_RESEND_BEATS);
        // One message's worth per beat: more would be cut off by the message's bound, and the
        // rest counted as pushed.
        self.durable
            .offline
            .iter()
            .filter(|id| {
                self.pushed
                    .get(*id)
                    .is_none_or(|at| now_ms >= at.saturating_add(resend))
            })
            .take(crate::wire::RECORDS_PER_MESSAGE_MAX)
            .copied()
            .collect()
    }

    /// Forgets what was pushed to another leader than `leader`.
    fn pushing_to(&mut self, leader: DeviceId) {
        if self.pushed_to != Some(leader) {
            self.pushed.clear();
            self.pushed_to = Some(leader);
        }
    }

    /// Records `changes` as pushed to `leader` at `now_ms`.
    fn mark_pushed(&mut self, leader: DeviceId, changes: &[ChangeId], now_ms: u64) {
        self.pushing_to(leader);
        for id in changes {
            self.pushed.insert(*id, now_ms);
        }
    }

    /// A follower's changes: a leader sequences those not in its log and ships them.
    fn on_push(&mut self, changes: Vec<ChangeId>, now_ms: u64, out: &mut Vec<Output>) {
        if self.role == ElectionRole::Leader {
            let before = self.durable.log.len();
            for id in changes {
                self.sequence(id);
            }
            if self.durable.log.len() > before {
                let peers: Vec<DeviceId> = self.connected.iter().copied().collect();
                for peer in peers {
                    self.append_to(peer, now_ms, false, out);
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_append_reply(
        &mut self,
        from: DeviceId,
        epoch: Epoch,
        ok: bool,
        last: Lsn,
        now_ms: u64,
        out: &mut Vec<Output>,
    ) {
        if epoch > self.durable.epoch {
            self.step_down(epoch, None, now_ms);
            return;
        }
        if self.role != ElectionRole::Leader || epoch != self.durable.epoch {
            return;
        }
        let log_len = self.durable.last_lsn().0;
        // A follower's word: what it stored of this leader's log cannot pass its end.
        let last = Lsn(last.0.min(log_len));
        let next = self.next.entry(from).or_insert(log_len + 1);
        if ok {
            if last.0 + 1 > *next {
                // Progress: the retransmission clock starts again.
                if let Some(flight) = self.flights.get_mut(&from) {
                    flight.since_ms = now_ms;
                }
            }
            *next = (last.0 + 1).max(*next).min(log_len + 1);
            let matched = self.matched.entry(from).or_default();
            *matched = (*matched).max(last.0);
            if *next <= log_len {
                self.append_to(from, now_ms, false, out);
            }
        } else {
            // A refusal that reaches at or past `next` answers a segment sent after one
            // still in flight (it was refused because that one had not arrived yet, or
            // for what the one in flight will settle): the reply to that one decides.
            let in_flight = self.flights.get(&from).is_some_and(|f| f.upto >= *next);
            if in_flight && last.0 + 1 >= *next {
                return;
            }
            *next = (last.0 + 1).min(next.saturating_sub(1)).max(1);
            self.flights.remove(&from);
            self.append_to(from, now_ms, false, out);
        }
    }

    /// Whether `from`, claiming to lead `epoch`, is followed: a stale epoch is answered with
    /// `Stale`; a message that cannot come from that epoch's leader is dropped.
    fn follow(&mut self, from: DeviceId, epoch: Epoch, out: &mut Vec<Output>) -> bool {
        if epoch < self.durable.epoch {
            Self::send(
                out,
                from,
                Message::Stale {
                    epoch: self.durable.epoch,
                },
            );
            return false;
        }
        if epoch.device != from {
            return false;
        }
        true
    }

    /// Takes `from` as the leader of `epoch` (a message from it was accepted).
    fn heard_leader(&mut self, from: DeviceId, epoch: Epoch, now_ms: u64) {
        if self.role != ElectionRole::Follower
            || self.leader != Some(from)
            || epoch > self.durable.epoch
        {
            self.step_down(epoch, Some(from), now_ms);
            self.role = ElectionRole::Follower;
        }
        self.reset_election_timer(now_ms);
        self.heard_ms = Some(now_ms);
        self.pre_vote = None;
        self.in_cluster = true;
    }

    /// Entries from the leader of `epoch` after `prev` (whose entry has `prev_epoch`); `follow`
    /// accepted the epoch.
    fn on_append(
        &mut self,
        from: DeviceId,
        epoch: Epoch,
        (prev, prev_epoch): (Lsn, Epoch),
        entries: Vec<(Epoch, LogSlot)>,
        now_ms: u64,
        out: &mut Vec<Output>,
    ) {
        if !well_formed(epoch, prev, prev_epoch, &entries) || !self.keeps_the_head(prev, &entries) {
            return;
        }
        self.heard_leader(from, epoch, now_ms);
        let Some((prev, prev_epoch, entries)) = self.past_the_base(prev, prev_epoch, entries)
        else {
            return;
        };
        if self.durable.epoch_at(prev) != Some(prev_epoch) {
            let hint = Lsn(self.durable.last_lsn().0.min(prev.0.saturating_sub(1)));
            self.reply(from, false, hint, out);
            return;
        }
        let end = prev.0 + entries.len() as u64;
        self.store_segment(prev, entries);
        self.reply(from, true, Lsn(end), out);
    }

    /// Answers the leader `from`: whether its segment matched, and where this log stands.
    fn reply(&self, from: DeviceId, ok: bool, last: Lsn, out: &mut Vec<Output>) {
        Self::send(
            out,
            from,
            Message::AppendReply {
                epoch: self.durable.epoch,
                ok,
                last,
            },
        );
    }

    /// A segment's part after this log's compaction base: positions up to the base are settled
    /// here, so the entries before it are skipped, after checking the epoch at the base where
    /// the segment reaches it. `None` when the segment disagrees at the base (this device must
    /// backfill: said by [`Machine::behind`]).
    #[allow(clippy::type_complexity)]
    fn past_the_base(
        &mut self,
        prev: Lsn,
        prev_epoch: Epoch,
        mut entries: Vec<(Epoch, LogSlot)>,
    ) -> Option<(Lsn, Epoch, Vec<(Epoch, LogSlot)>)> {
        let base = self.durable.log.base();
        if prev >= base {
            return Some((prev, prev_epoch, entries));
        }
        let skip = (base.0 - prev.0) as usize;
        if entries.len() < skip {
            // All of it is settled here: an empty segment at the base asks for what follows.
            return Some((base, self.durable.log.base_epoch(), Vec::new()));
        }
        if entries[skip - 1].0 != self.durable.log.base_epoch() {
            self.behind = Some(base);
            return None;
        }
        let rest = entries.split_off(skip);
        Some((base, self.durable.log.base_epoch(), rest))
    }

    /// The leader's word that what this device lacks is before its compaction `base`: a log
    /// that holds `base` with the same epoch continues from there; any other must backfill.
    fn on_compacted(
        &mut self,
        from: DeviceId,
        base: Lsn,
        base_epoch: Epoch,
        out: &mut Vec<Output>,
    ) {
        if self.durable.epoch_at(base) == Some(base_epoch) {
            self.reply(from, true, base, out);
        } else {
            self.behind = Some(base);
        }
    }

    /// Whether a segment from `prev` keeps the head of this log: every log begins with the
    /// founder's barrier (epoch 1), so a segment that disagrees at position 1 is forged, and
    /// would otherwise truncate the whole log. (A device with no log yet takes any head: it has
    /// not seen the founder's.)
    fn keeps_the_head(&self, prev: Lsn, entries: &[(Epoch, LogSlot)]) -> bool {
        match (prev.0, entries.first(), self.durable.log.get(0)) {
            (0, Some(theirs), Some(ours)) => *theirs == ours,
            _ => true,
        }
    }

    /// Stores a segment that follows `prev`: entries already there are kept, the first that
    /// differs truncates the log from it. The segment's changes leave the offline journal.
    fn store_segment(&mut self, prev: Lsn, entries: Vec<(Epoch, LogSlot)>) {
        let mut sequenced = Vec::new();
        for (i, (entry_epoch, entry)) in entries.into_iter().enumerate() {
            if let LogSlot::Change(id) = entry {
                sequenced.push(id);
            }
            let at = prev.0 as usize + i;
            match self.durable.log.get(at) {
                Some((e, existing)) if e == entry_epoch && existing == entry => {}
                Some(_) => {
                    self.truncate_from(at);
                    self.push_entry(entry_epoch, entry);
                }
                None => self.push_entry(entry_epoch, entry),
            }
        }
        // Entries past the segment stay, whatever their epoch: with segments in flight
        // they are usually the leader's own next entries, and a heartbeat carries none.
        // A deposed leader's stale suffix still goes: every leader starts its epoch with
        // a barrier, so the new leader's entries conflict with that suffix at the barrier
        // or before it, and the conflict above truncates it.
        // The segment's changes are sequenced now (including any a truncation above
        // just returned): one pass over `pending` per segment.
        if !self.durable.offline.is_empty() && !sequenced.is_empty() {
            let sequenced: HashSet<ChangeId> = sequenced.into_iter().collect();
            self.durable.offline.retain(|p| !sequenced.contains(p));
        }
    }

    /// Appends a leader's entry (its change leaves `pending` when the segment is done: see
    /// `store_segment`, one pass per segment rather than one per entry).
    fn push_entry(&mut self, epoch: Epoch, entry: LogSlot) {
        if let LogSlot::Change(id) = entry {
            if let Some(set) = &mut self.in_log {
                set.insert(id);
            }
        }
        self.record_push(epoch, entry);
    }

    fn record_push(&mut self, epoch: Epoch, entry: LogSlot) {
        // Appends go at the end only, and a log's epochs never decrease along it.
        let last = self.durable.last();
        assert!(
            epoch >= last.0,
            "an entry of epoch {epoch:?} after one of {:?}",
            last.0
        );
        self.durable.log.push((epoch, entry));
        assert_eq!(
            self.durable.last_lsn().0,
            last.1 .0 + 1,
            "append not at the end"
        );
        self.ops.push(LogOp::Append {
            at: self.durable.last_lsn(),
            epoch,
            entry,
        });
    }

    /// Removes `log[at..]`, returning their changes to `pending` (resubmitted, never dropped).
    fn truncate_from(&mut self, at: usize) {
        let removed = self.durable.log.split_off(at);
        self.ops.push(LogOp::Truncate {
            keep: Lsn(at as u64),
            removed: removed.len() as u64,
        });
        for (_, entry) in removed {
            if let LogSlot::Change(id) = entry {
                if let Some(set) = &mut self.in_log {
                    set.remove(&id);
                }
                if !self.durable.offline.contains(&id) {
                    self.durable.offline.push(id);
                }
            }
        }
    }
}
