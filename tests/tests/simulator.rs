//! A seeded simulator of 3–5 replication cores through partitions (two sides, or single links cut),
//! crashes and restarts (some halfway through writing), one device's log found damaged and cut
//! (again and again; also damaged while it was off, found by its start check), message loss, duplication, reordering,
//! delays and damaged pushes, each device's clock off by up to a day either way and jumping
//! back and forth by up to 2 s during the chaos. It drives each `Replica` through its whole
//! contract, as the node runtime does: wire messages with payloads (tag edits sealed under the
//! library's key, stamped by each device's hybrid clock), a `Store` over an in-memory journal,
//! writes made durable before anything is sent, and each device's projections, a real SQLite
//! file, fed as the applier feeds them (see `sim/projected.rs`). It checks after every step
//! that the "disk" holds the replica's own view (log, offline journal, election state), and
//! after healing: identical logs, projection digests equal on every device and equal to a
//! replay of the log, no pending change left, every acknowledged change present exactly once,
//! at most one leader per epoch, epochs that never go back, no node ever losing a change it
//! had, no cut log leading below its vote floor, and no log with damage nobody read yet
//! winning an election.
//!
//! `KEEL_SIM_SEED=N` runs one seed; `KEEL_SIM_SEEDS=N` sets how many (default 200; 1,000 in
//! the full tier, `KEEL_FULL=1`).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use keel_journal::Sealer;
use keel_replication::wire::{ClockFloor, WireLogEntry};
use keel_replication::{
    Durable, ElectionRole, LogSlot, LogWrite, Opened, Replica, ReplicaConfig, ReplicaEvent,
    ReplicationMessage, Store, Transmit,
};
use keel_schema::{Change, ChangeId, DeviceId, Epoch, HlcClock, Horizon, Lsn};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_bytes::ByteBuf;
use uuid::Uuid;

#[path = "sim/projected.rs"]
mod projected;
use projected::{open, seal, Projected};

const STEP_MS: u64 = 5;
/// A day, in ms: each device's clock is off the simulation's by up to this, either way.
const DAY_MS: i64 = 24 * 3600 * 1000;
/// Most a device's clock jumps back (or forward) at once during the chaos. The node runtime
/// feeds its replica a monotonic clock (time since it started), so a wall clock set back never
/// reaches it; here a jump checks that no safety decision reads the time. A replica's timers
/// are deadlines on its clock, so a clock set back by J delays them by J: with 60 s jumps, a
/// seed's follower did not push its pending changes within the 30 s the heal allows.
const JUMP_MS_MAX: i64 = 2_000;
const CHAOS_STEPS: usize = 2500;
const HEAL_STEPS_MAX: usize = 6000;
/// The hostile device of [`Sim::forge`].
const HOSTILE: DeviceId = DeviceId([0xee; 32]);

struct InFlight {
    at_ms: u64,
    from: usize,
    to: usize,
    message: ReplicationMessage,
}

/// What a device's runtime made durable: the journal, with payloads.
#[derive(Clone, Default)]
struct Disk {
    epoch: Epoch,
    voted: Epoch,
    log: Vec<(Epoch, Vec<u8>)>,
    offline: Vec<(ChangeId, Vec<u8>)>,
    /// Stored before the runtime cuts the log at a damaged record.
    vote_floor: Option<(Epoch, Lsn)>,
    /// Left by a truncation: the projections replay from no later than it at a restart.
    replay_floor: Option<Lsn>,
    /// A log record damaged while the device was off (its position), not found yet: the
    /// runtime's start check finds it (see [`Sim::finish_start_check`]).
    hidden_damage: Option<usize>,
    /// Records ever added to the offline journal (its last sequence number).
    local_seq: u64,
    /// Truncations that dropped other devices' changes since the projections were rebuilt
    /// (`Journal::projections_stale`).
    stale: u64,
    /// The oldest clock in `offline` (`None`: empty), for the offline journal as it was at
    /// `(records, local_seq)` (as `Library::clock_floor` caches it).
    oldest_offline: std::cell::RefCell<Option<OldestOffline>>,
}

/// The offline journal's `(records, local_seq)` and its oldest clock then.
type OldestOffline = ((usize, u64), Option<(u64, u32)>);

/// The disk of a device that has joined: the log's head (the founder's barrier), as its
/// snapshot gives it. Every log begins with it.
fn joined(founder: DeviceId) -> Disk {
    let epoch = Epoch {
        counter: 1,
        device: founder,
    };
    Disk {
        epoch,
        log: vec![(epoch, Vec::new())],
        ..Disk::default()
    }
}

/// The device that made a sealed change.
fn origin(sealed: &[u8]) -> Option<DeviceId> {
    open(sealed).map(|c| c.origin())
}

fn peek(sealed: &[u8]) -> Option<ChangeId> {
    Sealer::peek_change_id(sealed)
}

impl Disk {
    /// The replica's durable state, read back as a runtime reads its journal at start.
    fn durable(&self) -> Durable {
        Durable {
            epoch: self.epoch,
            voted: self.voted,
            log: self
                .log
                .iter()
                .map(|(e, p)| (*e, peek(p).map_or(LogSlot::Barrier, LogSlot::Change)))
                .collect(),
            offline: self.offline.iter().map(|(id, _)| *id).collect(),
            vote_floor: self.vote_floor,
        }
    }

    /// Makes one write durable, as the journal does.
    fn apply(&mut self, i: usize, device: DeviceId, write: LogWrite) {
        match write {
            LogWrite::Election { epoch, voted } => {
                self.epoch = epoch;
                self.voted = voted;
            }
            LogWrite::Append { at, entries } => {
                assert_eq!(
                    at.0,
                    self.log.len() as u64 + 1,
                    "node {i}: append not at the end"
                );
                let ids: BTreeSet<ChangeId> = entries.iter().filter_map(|(_, p)| peek(p)).collect();
                self.offline.retain(|(id, _)| !ids.contains(id));
                self.log.extend(entries);
            }
            LogWrite::Truncate { keep, dropped } => {
                self.lower_replay_floor(keep);
                let removed = &self.log[(keep.0 as usize).min(self.log.len())..];
                if removed
                    .iter()
                    .any(|(_, p)| peek(p).is_some_and(|id| dropped.contains(&id)))
                {
                    self.stale += 1;
                }
                for (_, payload) in self.log.split_off(keep.0 as usize) {
                    let Some(id) = peek(&payload) else { continue };
                    // Only this device's changes return: others' are resubmitted by their maker.
                    // A horizon goes with the log: a leader refuses one pushed to it.
                    let own = origin(&payload) == Some(device) && !is_horizon(&payload);
                    assert_eq!(
                        dropped.contains(&id),
                        !own,
                        "node {i}: truncation misjudged {id:?}"
                    );
                    if own {
                        self.push_offline(id, payload);
                    }
                }
            }
        }
    }
}

impl Disk {
    fn push_offline(&mut self, id: ChangeId, sealed: Vec<u8>) {
        self.offline.push((id, sealed));
        self.local_seq += 1;
    }

    fn lower_replay_floor(&mut self, keep: Lsn) {
        self.replay_floor = Some(self.replay_floor.map_or(keep, |f| f.min(keep)));
    }
}

/// Makes one write durable on device `i`'s disk, then applies what it appended to its
/// projections (as the applier does once the journal committed), its clock observing it.
fn store(
    (disk, projected, hlc): (&mut Disk, &mut Projected, &mut HlcClock),
    i: usize,
    device: DeviceId,
    write: LogWrite,
) {
    if let LogWrite::Append { at, entries } = &write {
        for seen in projected.apply_log(*at, entries) {
            hlc.observe(seen);
        }
    }
    disk.apply(i, device, write);
}

/// What a replica reads: its disk, how far its projections applied, and its clock (for its
/// floor).
struct DiskStore<'a>(&'a Disk, Lsn, &'a HlcClock);

/// A device's clock floor, as `Library::clock_floor` finds it: one past its clock, or older for
/// a change waiting in its offline journal.
fn floor_of(disk: &Disk, hlc: &HlcClock) -> Option<ClockFloor> {
    let last = hlc.last();
    let mut floor = (last.physical_ms, last.counter.checked_add(1)?);
    let key = (disk.offline.len(), disk.local_seq);
    let mut cached = disk.oldest_offline.borrow_mut();
    let oldest = match *cached {
        Some((k, oldest)) if k == key => oldest,
        _ => {
            let oldest = disk
                .offline
                .iter()
                .filter_map(|(_, s)| open(s))
                .map(|c| (c.hlc.physical_ms, c.hlc.counter))
                .min();
            *cached = Some((key, oldest));
            oldest
        }
    };
    if let Some(oldest) = oldest {
        floor = floor.min(oldest);
    }
    Some(ClockFloor {
        ms: floor.0,
        counter: floor.1,
    })
}

/// Whether a sealed change is a horizon (a leader's own entry, never pushed).
fn is_horizon(sealed: &[u8]) -> bool {
    open(sealed).is_some_and(|c| c.model == keel_schema::code_of::<Horizon>())
}

impl Store for DiskStore<'_> {
    type Error = String;

    fn read_log(&mut self, first: Lsn, count: usize) -> Result<Vec<(Epoch, Vec<u8>)>, String> {
        let from = first.0.saturating_sub(1) as usize;
        self.0
            .log
            .get(from..from + count)
            .map(<[_]>::to_vec)
            .ok_or_else(|| format!("no entries {}..+{count}", first.0))
    }

    fn read_offline(&mut self) -> Result<Vec<(ChangeId, Vec<u8>)>, String> {
        Ok(self.0.offline.clone())
    }

    fn applied(&mut self) -> Lsn {
        self.1
    }

    fn floor(&mut self) -> Option<ClockFloor> {
        floor_of(self.0, self.2)
    }

    fn peek_change_id(&self, sealed: &[u8]) -> Option<ChangeId> {
        peek(sealed)
    }

    fn open_pushed(&self, sealed: &[u8]) -> Result<Opened, String> {
        let change = open(sealed).ok_or("does not open")?;
        if change.model == keel_schema::code_of::<Horizon>() {
            return Err("a horizon comes only from the leader that made it".into());
        }
        Ok(Opened {
            id: change.id,
            origin: change.origin(),
        })
    }
}

/// An input to one replica.
enum Input {
    Tick,
    Connected(DeviceId),
    Disconnected(DeviceId),
    Received(DeviceId, ReplicationMessage),
}

struct Sim {
    rng: StdRng,
    /// The simulation's time (starts two days in, so a clock a day behind stays positive).
    now_ms: u64,
    /// Each device's clock, as an offset from `now_ms`: skewed by up to a day, and jumping
    /// back and forth during the chaos. Only timers read it: no safety decision may.
    clocks: Vec<i64>,
    devices: Vec<DeviceId>,
    nodes: Vec<Option<Replica>>,
    disks: Vec<Disk>,
    /// Each device's projections (files in `dir`).
    projected: Vec<Projected>,
    /// Each device's hybrid logical clock, which stamps its changes.
    hlcs: Vec<HlcClock>,
    dir: tempfile::TempDir,
    /// `up[a][b]`: whether a and b can talk.
    up: Vec<Vec<bool>>,
    /// What each node believes is connected.
    views: Vec<BTreeSet<usize>>,
    flight: Vec<InFlight>,
    acked: Vec<ChangeId>,
    leaders: HashMap<Epoch, DeviceId>,
    max_epoch: Vec<Epoch>,
    /// The changes each node made: it never loses one (in its log or offline journal). Other
    /// devices' changes may leave it in a truncation; their maker resubmits them.
    made: Vec<BTreeSet<ChangeId>>,
    delivered: u64,
    refused: u64,
    /// A paired device that sends forged messages (see [`Sim::forge`]), while present.
    hostile: Option<DeviceId>,
    /// Whether each node has the hostile device as a session.
    hostile_seen: Vec<bool>,
    /// Steps at which some node followed the hostile device (its forgeries took effect).
    followed_hostile: u64,
    /// Logs found damaged and cut (see [`Sim::damage`]).
    damaged: u64,
    /// The device whose disk goes bad, once one did.
    damaged_device: Option<usize>,
    /// The epoch each node resumed leading at its last start, if it did: the only epoch it may
    /// lead with a damaged record its start check has not found.
    resumed: Vec<Option<Epoch>>,
    /// Damage at rest found by a start check.
    found_at_start: u64,
    /// Whether logs are damaged during the chaos (not beside a hostile device, whose test
    /// bounds how soon a leader follows its departure).
    with_damage: bool,
    /// Segments a follower applied before a crash stopped it storing them.
    applied_early: u64,
    /// The bound of the last horizon each node appended.
    horizons: Vec<Option<ClockFloor>>,
    /// Horizons appended.
    horizons_appended: u64,
    steps: u64,
}

fn config(device: DeviceId) -> ReplicaConfig {
    ReplicaConfig {
        device,
        election_timeout_ms: 150,
        heartbeat_ms: 25,
        segment_max: 16,
        segments_in_flight: 3,
    }
}

fn changes_of(d: &Durable) -> BTreeSet<ChangeId> {
    d.log
        .iter()
        .filter_map(|(_, e)| match e {
            LogSlot::Change(id) => Some(id),
            LogSlot::Barrier => None,
        })
        .chain(d.offline.iter().copied())
        .collect()
}

impl Sim {
    fn new(seed: u64, with_hostile: bool) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let n = rng.random_range(3..=5);
        let devices: Vec<DeviceId> = (0..n)
            .map(|i| {
                let mut id = [0u8; 32];
                id[0] = rng.random();
                id[1] = i as u8;
                DeviceId(id)
            })
            .collect();
        let clocks: Vec<i64> = (0..n).map(|_| rng.random_range(-DAY_MS..=DAY_MS)).collect();
        let start = 2 * DAY_MS;
        let nodes = devices
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let now = (start + clocks[i]) as u64;
                Some(if i == 0 {
                    Replica::founder(config(*d), now)
                } else {
                    Replica::new(config(*d), joined(devices[0]).durable(), now)
                })
            })
            .collect();
        let disks: Vec<Disk> = (0..n)
            .map(|i| {
                if i == 0 {
                    Disk::default()
                } else {
                    joined(devices[0])
                }
            })
            .collect();
        let dir = projected::scratch();
        let projected = (0..n)
            .map(|i| {
                let mut p = Projected::new(dir.path().join(format!("{i}.sqlite")));
                p.heal(&disks[i]);
                p
            })
            .collect();
        let mut sim = Self {
            rng,
            now_ms: start as u64,
            clocks,
            nodes,
            disks,
            projected,
            hlcs: devices.iter().map(|d| HlcClock::new(*d)).collect(),
            dir,
            up: vec![vec![true; n]; n],
            views: vec![BTreeSet::new(); n],
            flight: Vec::new(),
            acked: Vec::new(),
            leaders: HashMap::new(),
            max_epoch: vec![Epoch::default(); n],
            made: vec![BTreeSet::new(); n],
            devices,
            delivered: 0,
            refused: 0,
            hostile: with_hostile.then_some(HOSTILE),
            hostile_seen: vec![false; n],
            followed_hostile: 0,
            damaged: 0,
            damaged_device: None,
            resumed: vec![None; n],
            found_at_start: 0,
            with_damage: !with_hostile,
            applied_early: 0,
            horizons: vec![None; n],
            horizons_appended: 0,
            steps: 0,
        };
        // The founder's epoch and barrier.
        sim.flush(0, false);
        sim
    }

    fn index_of(&self, device: DeviceId) -> usize {
        self.devices
            .iter()
            .position(|d| *d == device)
            .unwrap_or(usize::MAX)
    }

    fn dispatch(&mut self, from: usize, outputs: Vec<Transmit>, lossy: bool) {
        for Transmit { to, mut message } in outputs {
            message
                .check()
                .expect("a replica sends only messages within the limits");
            let to = self.index_of(to);
            if to == usize::MAX {
                continue;
            }
            if lossy && self.rng.random_bool(0.02) {
                continue; // lost
            }
            if let ReplicationMessage::Push { changes } = &mut message {
                if lossy && !changes.is_empty() && self.rng.random_bool(0.01) {
                    changes[0][0] ^= 0xff; // damaged: the leader refuses it, the sender pushes again
                }
            }
            let copies = if lossy && self.rng.random_bool(0.03) {
                2
            } else {
                1
            };
            for _ in 0..copies {
                let delay = if lossy {
                    self.rng.random_range(1..40)
                } else {
                    self.rng.random_range(1..5)
                };
                self.flight.push(InFlight {
                    at_ms: self.now_ms + delay,
                    from,
                    to,
                    message: message.clone(),
                });
            }
        }
    }

    /// Hands one input to node `i`, then does what its runtime does (see `flush`). With `chaos`,
    /// the node sometimes crashes halfway through writing, before sending anything.
    fn handle(&mut self, i: usize, input: Input, chaos: bool) {
        let now = self.clock(i);
        let Some(node) = self.nodes[i].as_mut() else {
            return;
        };
        let mut store = DiskStore(&self.disks[i], self.projected[i].applied(), &self.hlcs[i]);
        match input {
            Input::Tick => node.handle_timeout(now),
            Input::Connected(peer) => node.handle_connected(now, peer),
            Input::Disconnected(peer) => node.handle_disconnected(now, peer),
            Input::Received(from, message) => node.handle_message(now, from, message, &mut store),
        }
        if chaos && self.rng.random_bool(0.001) {
            self.crash_while_writing(i);
        } else {
            self.flush(i, chaos);
        }
    }

    /// A commit on node `i`: through the offline journal, or (on a leader) sequenced directly,
    /// as the node runtime does. Acknowledged once durable.
    fn commit(&mut self, i: usize, id: ChangeId) {
        let now = self.clock(i);
        let rolls = self.rng.random();
        let Some(node) = self.nodes[i].as_mut() else {
            return;
        };
        let change = projected::edit(id, self.hlcs[i].tick(now), rolls);
        let sealed = seal(&change);
        if node.role() == ElectionRole::Leader {
            let placed = node.handle_commit(now, id, Some(sealed));
            assert!(
                placed.is_some(),
                "node {i}: a leader did not sequence a new change"
            );
        } else {
            self.disks[i].push_offline(id, sealed);
            self.projected[i].apply_local(&change, self.disks[i].local_seq);
            node.handle_commit(now, id, None);
        }
        self.flush(i, true);
        self.acked.push(id);
        self.made[i].insert(id);
    }

    /// A leading node appends a horizon at the least floor of every device, if newer than its
    /// last (as `Node::collect_tombstones` does): every device collects the tombstones older
    /// than it where it applies it.
    fn horizon(&mut self, i: usize, lossy: bool) {
        let now = self.clock(i);
        let floor = floor_of(&self.disks[i], &self.hlcs[i]);
        let Some(node) = self.nodes[i].as_mut() else {
            return;
        };
        let Some(bound) = node.horizon(&self.devices, floor) else {
            return;
        };
        if self.horizons[i].is_some_and(|last| last >= bound) {
            return;
        }
        self.horizons[i] = Some(bound);
        let horizon = Horizon {
            uuid: Uuid::from_u128(self.rng.random()),
            before_ms: bound.ms as i64,
            before_counter: i64::from(bound.counter),
        };
        let id = ChangeId(Uuid::from_u128(self.rng.random()));
        let change = Change::upsert(id, self.hlcs[i].tick(now), &horizon).expect("sync-ready");
        let placed = node.handle_commit(now, id, Some(seal(&change)));
        assert!(
            placed.is_some(),
            "node {i}: a leader did not sequence its horizon"
        );
        self.horizons_appended += 1;
        self.flush(i, lossy);
    }

    /// What the runtime does after inputs: events, then every write made durable, then the
    /// messages sent. The disk must then hold the node's own view, so a restart from the disk
    /// is a restart from exactly what the runtime wrote.
    fn flush(&mut self, i: usize, lossy: bool) {
        let Some(node) = self.nodes[i].as_mut() else {
            return;
        };
        while let Some(event) = node.poll_event() {
            if let ReplicaEvent::Refused { .. } = event {
                self.refused += 1;
            }
        }
        while let Some(write) = node
            .poll_log_write(&mut DiskStore(
                &self.disks[i],
                self.projected[i].applied(),
                &self.hlcs[i],
            ))
            .unwrap_or_else(|e| panic!("node {i}: {e}"))
        {
            let device = (
                &mut self.disks[i],
                &mut self.projected[i],
                &mut self.hlcs[i],
            );
            store(device, i, self.devices[i], write);
        }
        node.written();
        let mut out = Vec::new();
        while let Some(transmit) = node
            .poll_transmit(&mut DiskStore(
                &self.disks[i],
                self.projected[i].applied(),
                &self.hlcs[i],
            ))
            .unwrap_or_else(|e| panic!("node {i}: {e}"))
        {
            out.push(transmit);
        }
        if node.leader() == Some(HOSTILE) {
            self.followed_hostile += 1;
        }
        let d = node.durable();
        let disk = &self.disks[i];
        // A cheap check on every step; the whole log is compared at each crash.
        assert_eq!(disk.log.len(), d.log.len(), "node {i}: writes differ");
        assert_eq!(
            disk.log.last().map(|(e, p)| (*e, peek(p))),
            d.log.last().map(|(e, s)| (
                e,
                match s {
                    LogSlot::Change(id) => Some(id),
                    LogSlot::Barrier => None,
                }
            )),
            "node {i}: writes differ"
        );
        let on_disk: BTreeSet<ChangeId> = disk.offline.iter().map(|(id, _)| *id).collect();
        let in_memory: BTreeSet<ChangeId> = d.offline.iter().copied().collect();
        assert_eq!(on_disk, in_memory, "node {i}: offline journals differ");
        assert_eq!(
            (disk.epoch, disk.voted),
            (d.epoch, d.voted),
            "node {i}: election state differs"
        );
        self.dispatch(i, out, lossy);
        self.check_node(i);
    }

    /// Node `i` finds a record of its log damaged, at a random position past the head, and does
    /// what the node runtime does: it abdicates (if it leads), makes that durable, stores its
    /// vote floor, cuts its log before the damage (its own changes after it go back to its
    /// offline journal, others' are their makers' to resubmit), and starts again from its disk.
    fn damage(&mut self, i: usize) {
        let len = self.disks[i].log.len();
        if len >= 2 {
            let at = self.rng.random_range(2..=len);
            self.damage_at(i, at);
        }
    }

    /// Node `i` finds its log record at `at` (past the head) damaged: see [`Sim::damage`].
    fn damage_at(&mut self, i: usize, at: usize) {
        let now = self.clock(i);
        let Some(node) = self.nodes[i].as_mut() else {
            return;
        };
        let floor = node.handle_abdicate(now);
        self.flush(i, true);
        let device = self.devices[i];
        let disk = &mut self.disks[i];
        disk.vote_floor = Some(disk.vote_floor.map_or(floor, |f| f.max(floor)));
        disk.lower_replay_floor(Lsn(at as u64 - 1));
        for (_, payload) in disk.log.split_off(at - 1) {
            if is_horizon(&payload) {
                // Dropped with the log (the journal's truncation does it), never pushed.
                disk.stale += 1;
                continue;
            }
            if let (Some(id), Some(true)) = (peek(&payload), origin(&payload).map(|o| o == device))
            {
                disk.push_offline(id, payload);
            }
        }
        let durable = disk.durable();
        if let Some(node) = self.nodes[i].take() {
            self.nodes[i] = Some(node.restarted(durable, now));
        }
        self.views[i].clear();
        self.damaged += 1;
        self.flush(i, true);
    }

    /// While node `i` is off, a record of its log is damaged at rest, unless another device's
    /// disk is the bad one: nobody knows until its start check reads it.
    fn damage_at_rest(&mut self, i: usize) {
        let len = self.disks[i].log.len();
        if *self.damaged_device.get_or_insert(i) == i && len >= 2 {
            self.disks[i].hidden_damage = Some(self.rng.random_range(2..=len));
        }
    }

    /// Starts node `i` from its disk, held from standing until its start check is done (as the
    /// node runtime does).
    fn start_node(&mut self, i: usize) {
        let durable = self.disks[i].durable();
        let end = durable.last_lsn();
        let mut node = Replica::new(config(self.devices[i]), durable, self.clock(i));
        node.hold_until_checked(end);
        self.resumed[i] = (node.role() == ElectionRole::Leader).then(|| node.durable().epoch);
        self.nodes[i] = Some(node);
    }

    /// Node `i`'s start check reads its log back: it finds the damage at rest, if any is still
    /// in its log, and does what a found damage makes the runtime do; then the hold ends. It
    /// waits while the node leads (a leader resumed its epoch without standing).
    fn finish_start_check(&mut self, i: usize) {
        match &self.nodes[i] {
            Some(node) if node.is_unchecked() && node.role() != ElectionRole::Leader => {}
            _ => return,
        }
        if let Some(at) = self.disks[i].hidden_damage.take() {
            if at <= self.disks[i].log.len() {
                self.damage_at(i, at);
                self.found_at_start += 1;
            }
        }
        if let Some(node) = self.nodes[i].as_mut() {
            node.log_checked(Lsn(u64::MAX));
        }
    }

    /// Node `i` crashes after writing some of what it was asked: nothing was sent. A follower
    /// may have applied the segment being stored already (`CommittedBatch::early`).
    fn crash_while_writing(&mut self, i: usize) {
        let Some(mut node) = self.nodes[i].take() else {
            return;
        };
        let follower = node.role() != ElectionRole::Leader;
        let mut writes = Vec::new();
        while let Some(write) = node
            .poll_log_write(&mut DiskStore(
                &self.disks[i],
                self.projected[i].applied(),
                &self.hlcs[i],
            ))
            .unwrap_or_else(|e| panic!("node {i}: {e}"))
        {
            writes.push(write);
        }
        let done = self.rng.random_range(0..=writes.len());
        let early = follower && self.rng.random_bool(0.5);
        for (k, write) in writes.into_iter().enumerate() {
            if k < done {
                let device = (
                    &mut self.disks[i],
                    &mut self.projected[i],
                    &mut self.hlcs[i],
                );
                store(device, i, self.devices[i], write);
            } else if let (true, true, LogWrite::Append { at, entries }) =
                (k == done, early, &write)
            {
                self.projected[i].apply_early(*at, entries);
                self.applied_early += 1;
            }
        }
        self.views[i].clear();
    }

    fn check_node(&mut self, i: usize) {
        let Some(node) = self.nodes[i].as_ref() else {
            return;
        };
        let d = node.durable();
        assert!(d.epoch >= self.max_epoch[i], "node {i}: epoch went back");
        self.max_epoch[i] = d.epoch;
        if node.role() == ElectionRole::Leader {
            let leader = *self.leaders.entry(d.epoch).or_insert(node.device());
            assert_eq!(leader, node.device(), "two leaders in epoch {}", d.epoch);
            // A log with a damaged record nobody read yet never wins an election: only an
            // epoch it resumed at its start is led with it.
            if self.disks[i].hidden_damage.is_some() {
                assert_eq!(
                    self.resumed[i],
                    Some(d.epoch),
                    "node {i} won epoch {} with a damaged log record it had not read back",
                    d.epoch
                );
            }
            // A log cut at a damaged record never leads until it holds what it vouched for.
            if let Some(floor) = self.disks[i].vote_floor {
                assert!(
                    d.last() >= floor,
                    "node {i} leads with a cut log: {:?} below its floor {floor:?}",
                    d.last()
                );
            }
        }
    }

    fn check_nothing_lost(&mut self) {
        for i in 0..self.nodes.len() {
            let d = match &self.nodes[i] {
                Some(n) => n.durable().clone(),
                None => self.disks[i].durable(),
            };
            let now = changes_of(&d);
            let missing: Vec<_> = self.made[i].difference(&now).collect();
            assert!(
                missing.is_empty(),
                "node {i} lost changes it made {missing:?}"
            );
        }
    }

    /// Tells each live node which peers it can reach now.
    fn refresh_views(&mut self, lossy: bool) {
        let n = self.nodes.len();
        for i in 0..n {
            if self.nodes[i].is_none() {
                continue;
            }
            let reachable: BTreeSet<usize> = (0..n)
                .filter(|&j| j != i && self.up[i][j] && self.nodes[j].is_some())
                .collect();
            let gone: Vec<usize> = self.views[i].difference(&reachable).copied().collect();
            let new: Vec<usize> = reachable.difference(&self.views[i]).copied().collect();
            for j in gone {
                self.handle(i, Input::Disconnected(self.devices[j]), lossy);
            }
            for j in new {
                self.handle(i, Input::Connected(self.devices[j]), lossy);
            }
            // A node that crashed while handling these knows no one.
            self.views[i] = if self.nodes[i].is_some() {
                reachable
            } else {
                BTreeSet::new()
            };
            self.refresh_hostile(i, lossy);
        }
    }

    /// Connects node `i` to the hostile device while it is present, disconnects it after.
    fn refresh_hostile(&mut self, i: usize, lossy: bool) {
        if self.nodes[i].is_none() {
            self.hostile_seen[i] = false;
            return;
        }
        let hostile = HOSTILE;
        let present = self.hostile.is_some();
        if present != self.hostile_seen[i] {
            self.hostile_seen[i] = present;
            let input = if present {
                Input::Connected(hostile)
            } else {
                Input::Disconnected(hostile)
            };
            self.handle(i, input, lossy);
        }
    }

    /// A message a misbehaving paired device might send: forged epochs (near the honest ones,
    /// or far above), barriers and changes at random positions, votes and replies it has no
    /// business sending, junk pushes.
    /// A change with a new id, made by the hostile device or claiming to be another's, sealed
    /// under the library's key (a paired device holds it), stamped up to two days ahead.
    fn forged_change(&mut self, hostile: DeviceId) -> Vec<u8> {
        let id = ChangeId(Uuid::from_u128(self.rng.random()));
        let origin = if self.rng.random_bool(0.5) {
            hostile
        } else {
            self.devices[self.rng.random_range(0..self.devices.len())]
        };
        let hlc = keel_schema::Hlc {
            physical_ms: self.now_ms + self.rng.random_range(0..2 * DAY_MS as u64),
            counter: 0,
            device: origin,
        };
        seal(&projected::edit(id, hlc, self.rng.random()))
    }

    fn forge(&mut self, hostile: DeviceId) -> ReplicationMessage {
        let known = self
            .nodes
            .iter()
            .flatten()
            .map(|n| n.durable().epoch.counter)
            .max()
            .unwrap_or(1);
        let counter = match self.rng.random_range(0..10) {
            0 => u64::MAX - self.rng.random_range(0..3),
            1 => known.saturating_add(self.rng.random_range(1_000..1u64 << 40)),
            _ => known + self.rng.random_range(0..3),
        };
        let device = if self.rng.random_bool(0.8) {
            hostile
        } else {
            self.devices[self.rng.random_range(0..self.devices.len())]
        };
        let epoch = Epoch { counter, device };
        let lsn = Lsn(self.rng.random_range(0..800));
        match self.rng.random_range(0..9) {
            0 => ReplicationMessage::Stale { epoch },
            8 => ReplicationMessage::Compacted {
                epoch,
                base: lsn,
                base_epoch: epoch,
            },
            1 => ReplicationMessage::RequestVote {
                epoch,
                last_epoch: epoch,
                last_lsn: Lsn(u64::MAX),
            },
            2 => ReplicationMessage::PreVote {
                epoch,
                last_epoch: epoch,
                last_lsn: lsn,
            },
            3 => ReplicationMessage::PreVoteReply {
                epoch,
                granted: true,
                highest: epoch,
            },
            4 => ReplicationMessage::Vote {
                epoch,
                granted: true,
            },
            5 => ReplicationMessage::Ack {
                epoch,
                ok: self.rng.random_bool(0.5),
                stored: lsn,
                positions: Vec::new(),
                floor: self
                    .rng
                    .random_bool(0.5)
                    .then(|| keel_replication::wire::ClockFloor {
                        ms: self.rng.random(),
                        counter: self.rng.random(),
                    }),
            },
            6 => ReplicationMessage::Push {
                changes: (0..self.rng.random_range(0..4))
                    .map(|_| ByteBuf::from(self.forged_change(hostile)))
                    .collect(),
            },
            _ => {
                let entries = (0..self.rng.random_range(0..5))
                    .map(|_| WireLogEntry {
                        epoch: if self.rng.random_bool(0.7) {
                            epoch
                        } else {
                            Epoch {
                                counter: self.rng.random_range(0..=counter),
                                device,
                            }
                        },
                        sealed: ByteBuf::from(if self.rng.random_bool(0.3) {
                            Vec::new()
                        } else {
                            self.forged_change(hostile)
                        }),
                    })
                    .collect();
                ReplicationMessage::LogSegment {
                    epoch,
                    first: Lsn(lsn.0.max(1)),
                    prev_epoch: Epoch {
                        counter: self.rng.random_range(0..=counter.min(known + 2)),
                        device,
                    },
                    leader_end: Lsn(self.rng.random()),
                    entries,
                    base: Lsn(self.rng.random_range(0..=lsn.0)),
                }
            }
        }
    }

    /// Device `i`'s clock now.
    fn clock(&self, i: usize) -> u64 {
        u64::try_from(self.now_ms as i64 + self.clocks[i]).unwrap_or(0)
    }

    fn step(&mut self, chaos: bool) {
        self.now_ms += STEP_MS;
        self.steps += 1;
        let n = self.nodes.len();
        if chaos && self.rng.random_bool(0.01) {
            // A clock set back (or forward) by hand or by a time server.
            let i = self.rng.random_range(0..n);
            self.clocks[i] += self.rng.random_range(-JUMP_MS_MAX..=JUMP_MS_MAX);
        }
        if chaos {
            if self.rng.random_bool(0.01) {
                // A random partition into two sides.
                let side: Vec<bool> = (0..n).map(|_| self.rng.random_bool(0.5)).collect();
                for a in 0..n {
                    for b in 0..n {
                        self.up[a][b] = side[a] == side[b];
                    }
                }
            }
            if self.rng.random_bool(0.005) {
                // One link cut, the others kept: a device may lose its leader and still reach
                // the rest (what pre-vote is for).
                let a = self.rng.random_range(0..n);
                let b = (a + self.rng.random_range(1..n)) % n;
                self.up[a][b] = false;
                self.up[b][a] = false;
            }
            if self.rng.random_bool(0.008) {
                self.up = vec![vec![true; n]; n];
            }
            if self.rng.random_bool(0.004) {
                let i = self.rng.random_range(0..n);
                if let Some(node) = self.nodes[i].take() {
                    assert_eq!(
                        self.disks[i].durable().log,
                        node.durable().log,
                        "node {i}: disk differs"
                    );
                    self.views[i].clear();
                }
            }
            if self.rng.random_bool(0.3) {
                let i = self.rng.random_range(0..n);
                if self.nodes[i].is_some() {
                    let id = ChangeId(Uuid::from_u128(self.rng.random()));
                    self.commit(i, id);
                }
            }
            if self.with_damage && self.rng.random_bool(0.002) {
                // One device's disk goes bad, and stays its only bad one: with the logs of
                // two devices cut, the entries only they held may be gone everywhere, and no
                // device can then be elected safely (decision 0063).
                let i = *self
                    .damaged_device
                    .get_or_insert_with(|| self.rng.random_range(0..n));
                self.damage(i);
            }
        }
        if self.rng.random_bool(0.01) {
            let i = self.rng.random_range(0..n);
            self.horizon(i, chaos);
        }
        for i in 0..n {
            if self.nodes[i].is_none() && (!chaos || self.rng.random_bool(0.02)) {
                if chaos && self.with_damage && self.rng.random_bool(0.3) {
                    self.damage_at_rest(i);
                }
                // What `Library::open` does first.
                self.projected[i].heal(&self.disks[i]);
                self.disks[i].replay_floor = None;
                self.disks[i].stale = 0;
                self.start_node(i);
                self.flush(i, chaos);
            }
            // The start check reads a stretch at a time: done some steps later.
            if !chaos || self.rng.random_bool(0.05) {
                self.finish_start_check(i);
            }
            // A running node rebuilds its projections after a truncation dropped changes
            // they may hold, on a thread of its own: done some steps later.
            if self.nodes[i].is_some()
                && self.disks[i].stale > 0
                && (!chaos || self.rng.random_bool(0.1))
            {
                self.projected[i].rebuild(&self.disks[i]);
                self.disks[i].stale = 0;
            }
        }
        self.refresh_views(chaos);
        if let Some(hostile) = self.hostile {
            if chaos && self.rng.random_bool(0.3) {
                let i = self.rng.random_range(0..n);
                if self.nodes[i].is_some() {
                    let forged = self.forge(hostile);
                    self.handle(i, Input::Received(hostile, forged), chaos);
                }
            }
        }
        // Deliver what is due, in a random order among the due messages (reordering).
        let now = self.now_ms;
        let mut due: Vec<InFlight> = Vec::new();
        let mut later = Vec::new();
        for m in self.flight.drain(..) {
            if m.at_ms <= now {
                due.push(m);
            } else {
                later.push(m);
            }
        }
        self.flight = later;
        while !due.is_empty() {
            let k = self.rng.random_range(0..due.len());
            let m = due.swap_remove(k);
            if self.up[m.from][m.to] && self.nodes[m.to].is_some() {
                self.delivered += 1;
                let from = self.devices[m.from];
                self.handle(m.to, Input::Received(from, m.message), chaos);
            }
        }
        for i in 0..n {
            self.handle(i, Input::Tick, chaos);
        }
    }

    fn converged(&self) -> bool {
        let Some(first) = self.nodes[0].as_ref() else {
            return false;
        };
        let log = &first.durable().log;
        self.nodes.iter().all(|n| {
            n.as_ref()
                .is_some_and(|n| n.durable().log == *log && n.durable().offline.is_empty())
        }) && self
            .nodes
            .iter()
            .flatten()
            .filter(|n| n.role() == ElectionRole::Leader)
            .count()
            == 1
    }
}

/// What one seed did, for the figures and for checking each path was taken.
#[derive(Default)]
struct Ran {
    /// Damaged pushes the leaders refused.
    refused: u64,
    /// Steps at which a node followed the hostile device.
    followed_hostile: u64,
    /// Logs found damaged and cut.
    damaged: u64,
    /// Of them, damage at rest found by a start check.
    found_at_start: u64,
    /// Segments applied just before a crash stopped their storing.
    applied_early: u64,
    /// Projections rebuilt at a restart (found ahead of the log).
    rebuilt_ahead: u64,
    /// Projections rebuilt after a truncation dropped changes they may hold.
    rebuilt_stale: u64,
    /// Changes in the converged log.
    changes: u64,
    /// Horizons appended (some cut again by a truncation).
    horizons: u64,
    /// Rows the horizons collected, summed over devices.
    collected: u64,
    steps: u64,
}

impl Ran {
    fn add(&mut self, other: &Ran) {
        self.refused += other.refused;
        self.followed_hostile += other.followed_hostile;
        self.damaged += other.damaged;
        self.found_at_start += other.found_at_start;
        self.applied_early += other.applied_early;
        self.rebuilt_ahead += other.rebuilt_ahead;
        self.rebuilt_stale += other.rebuilt_stale;
        self.changes += other.changes;
        self.horizons += other.horizons;
        self.collected += other.collected;
        self.steps += other.steps;
    }

    fn figures(&self) -> String {
        format!(
            "{} steps, converged to equal projection digests, each equal to a replay of the \
             log; {} changes in the logs, 0 acknowledged changes lost; {} logs damaged and cut \
             ({} of them damaged while off, found by the start check); {} segments applied early, {} projections rebuilt for it at a restart; {} rebuilt \
             after a truncation dropped changes they held; {} horizons appended, {} rows \
             collected",
            self.steps,
            self.changes,
            self.damaged,
            self.found_at_start,
            self.applied_early,
            self.rebuilt_ahead,
            self.rebuilt_stale,
            self.horizons,
            self.collected
        )
    }
}

/// Runs one seed.
fn run(seed: u64) -> Ran {
    run_with(seed, false)
}

/// Runs one seed, with a hostile paired device during the chaos if `with_hostile` (it leaves
/// when the network heals).
fn run_with(seed: u64, with_hostile: bool) -> Ran {
    let mut sim = Sim::new(seed, with_hostile);
    for step in 0..CHAOS_STEPS {
        sim.step(true);
        if step % 100 == 0 {
            sim.check_nothing_lost();
        }
    }
    let n = sim.nodes.len();
    sim.up = vec![vec![true; n]; n];
    sim.hostile = None;
    let mut healed_after = None;
    let mut led_after = None;
    for step in 0..HEAL_STEPS_MAX {
        sim.step(false);
        let leaders = sim
            .nodes
            .iter()
            .flatten()
            .filter(|r| r.role() == ElectionRole::Leader)
            .count();
        if led_after.is_none() && leaders == 1 && sim.nodes.iter().all(Option::is_some) {
            led_after = Some(step);
        }
        if sim.converged() {
            healed_after = Some(step);
            break;
        }
    }
    if with_hostile {
        // Once the hostile device is gone, a leader within 10 election timeouts.
        let bound = 10 * 150 / STEP_MS as usize;
        let led = led_after.unwrap_or(usize::MAX);
        assert!(
            led <= bound,
            "seed {seed}: no single leader {led} steps after the hostile device left (bound {bound})"
        );
    }
    sim.check_nothing_lost();
    let Some(_) = healed_after else {
        for (i, disk) in sim.disks.iter().enumerate() {
            for (id, sealed) in &disk.offline {
                eprintln!("disk {i} offline {id:?} horizon {}", is_horizon(sealed));
            }
        }
        let summary: Vec<String> = sim
            .nodes
            .iter()
            .flatten()
            .map(|n| {
                format!(
                    "{:?} epoch {} log {} pending {} {:?}",
                    n.role(),
                    n.durable().epoch,
                    n.durable().log.len(),
                    n.durable().offline.len(),
                    n.durable().offline
                )
            })
            .collect();
        panic!("seed {seed}: no convergence after healing: {summary:?}");
    };
    let nodes: Vec<&Replica> = sim.nodes.iter().flatten().collect();
    let digests: BTreeSet<String> = sim.projected.iter().map(Projected::digest).collect();
    assert_eq!(digests.len(), 1, "seed {seed}: projection digests differ");
    let replayed = Projected::replayed(sim.dir.path(), &sim.disks[0].log);
    assert!(
        digests.contains(&replayed),
        "seed {seed}: the projections differ from a replay of the log"
    );
    let log = &nodes[0].durable().log;
    let mut counts: BTreeMap<ChangeId, usize> = BTreeMap::new();
    for (_, e) in log.iter() {
        if let LogSlot::Change(id) = e {
            *counts.entry(id).or_default() += 1;
        }
    }
    for id in &sim.acked {
        assert_eq!(
            counts.get(id),
            Some(&1),
            "seed {seed}: acknowledged change {id} not in the log once"
        );
    }
    assert!(sim.delivered > 0);
    Ran {
        refused: sim.refused,
        followed_hostile: sim.followed_hostile,
        damaged: sim.damaged,
        found_at_start: sim.found_at_start,
        applied_early: sim.applied_early,
        rebuilt_ahead: sim.projected.iter().map(|p| p.rebuilt_ahead).sum(),
        rebuilt_stale: sim.projected.iter().map(|p| p.rebuilt_stale).sum(),
        changes: counts.len() as u64,
        horizons: sim.horizons_appended,
        collected: sim.projected.iter().map(|p| p.collected).sum(),
        steps: sim.steps,
    }
}

/// How many seeds a test runs: `KEEL_SIM_SEEDS`, else 200 (the fast tier sets fewer), or
/// `full` in the full tier.
fn seeds(full: u64) -> u64 {
    let tier_default = if keel_tests::full_tier() { full } else { 200 };
    std::env::var("KEEL_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(tier_default)
}

/// Runs seeds `0..seeds` of `hostile` simulations on `KEEL_SIM_THREADS` threads (default 1: the
/// test harness runs the two simulations side by side already), and adds up what they did. A
/// failed seed is named with the variable that runs it alone, and fails the test.
fn run_seeds(seeds: u64, hostile: bool) -> Ran {
    let threads: u64 = std::env::var("KEEL_SIM_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let next = std::sync::atomic::AtomicU64::new(0);
    let total = std::sync::Mutex::new(Ran::default());
    let rerun = if hostile {
        "KEEL_SIM_HOSTILE_SEED"
    } else {
        "KEEL_SIM_SEED"
    };
    std::thread::scope(|scope| {
        for _ in 0..threads.max(1) {
            scope.spawn(|| loop {
                let seed = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if seed >= seeds {
                    return;
                }
                match std::panic::catch_unwind(|| run_with(seed, hostile)) {
                    Ok(ran) => total.lock().expect("a seed panicked holding it").add(&ran),
                    Err(panic) => {
                        eprintln!("simulator failed with seed {seed}; rerun with {rerun}={seed}");
                        // The others stop at their next seed.
                        next.store(seeds, std::sync::atomic::Ordering::Relaxed);
                        std::panic::resume_unwind(panic);
                    }
                }
            });
        }
    });
    total.into_inner().expect("a seed panicked holding it")
}

#[test]
fn seeded_simulation_converges_and_loses_nothing() {
    if let Some(seed) = std::env::var("KEEL_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        run(seed);
        return;
    }
    let seeds = seeds(1_000);
    let total = run_seeds(seeds, false);
    assert!(
        total.refused > 0,
        "no damaged push was ever refused: that path went untested"
    );
    assert!(
        total.damaged > 0,
        "no log was ever damaged: that path went untested"
    );
    assert!(
        total.applied_early > 0 && total.rebuilt_ahead > 0,
        "no crash left projections ahead of their log: that path went untested"
    );
    assert!(
        total.rebuilt_stale > 0,
        "no truncation dropped applied changes: that path went untested"
    );
    assert!(
        total.horizons > 0 && total.collected > 0,
        "no horizon ever collected a row: collection went untested"
    );
    eprintln!("simulator: {seeds} seeds, {}", total.figures());
}

#[test]
fn seeded_simulation_with_a_hostile_peer_converges_and_loses_nothing() {
    if let Some(seed) = std::env::var("KEEL_SIM_HOSTILE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        run_with(seed, true);
        return;
    }
    let seeds = seeds(2_000);
    let total = run_seeds(seeds, true);
    assert!(
        total.followed_hostile > 0,
        "no node ever followed the hostile device: its forgeries never took"
    );
    eprintln!(
        "simulator with a hostile peer: {seeds} seeds, {}",
        total.figures()
    );
}
