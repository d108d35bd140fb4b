//! A seeded simulator of 3–5 replication cores through partitions (two sides, or single links cut),
//! crashes and restarts, message loss, duplication, reordering and delays. After healing it checks:
//! identical logs and digests, no pending change left, every acknowledged change present exactly
//! once, at most one leader per epoch, epochs that never go back, and no node ever losing a change
//! it had.
//!
//! `KEEL_SIM_SEED=N` runs one seed; `KEEL_SIM_SEEDS=N` sets how many (default 200; 1,000 in
//! the full tier, `KEEL_FULL=1`).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use keel_replication::{
    Durable, ElectionRole, Input, LogOp, LogSlot, Message, Output, Replica, ReplicaConfig,
};
use keel_schema::{ChangeId, DeviceId, Epoch};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use uuid::Uuid;

const STEP_MS: u64 = 5;
const CHAOS_STEPS: usize = 2500;
const HEAL_STEPS_MAX: usize = 6000;

struct InFlight {
    at_ms: u64,
    from: usize,
    to: usize,
    message: Message,
}

struct Sim {
    rng: StdRng,
    now_ms: u64,
    devices: Vec<DeviceId>,
    nodes: Vec<Option<Replica>>,
    disks: Vec<Durable>,
    /// `up[a][b]`: whether a and b can talk.
    up: Vec<Vec<bool>>,
    /// What each node believes is connected.
    views: Vec<BTreeSet<usize>>,
    flight: Vec<InFlight>,
    acked: Vec<ChangeId>,
    leaders: HashMap<Epoch, DeviceId>,
    max_epoch: Vec<Epoch>,
    ever_had: Vec<BTreeSet<ChangeId>>,
    delivered: u64,
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
    fn new(seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let n = rng.gen_range(3..=5);
        let devices: Vec<DeviceId> = (0..n)
            .map(|i| {
                let mut id = [0u8; 32];
                id[0] = rng.gen();
                id[1] = i as u8;
                DeviceId(id)
            })
            .collect();
        let mut nodes = Vec::new();
        for (i, d) in devices.iter().enumerate() {
            let node = if i == 0 {
                Replica::founder(config(*d), 0)
            } else {
                Replica::new(config(*d), Durable::default(), 0)
            };
            nodes.push(Some(node));
        }
        let disks = nodes
            .iter()
            .map(|n| n.as_ref().map(|n| n.durable().clone()).unwrap_or_default())
            .collect();
        Self {
            rng,
            now_ms: 0,
            nodes,
            disks,
            up: vec![vec![true; n]; n],
            views: vec![BTreeSet::new(); n],
            flight: Vec::new(),
            acked: Vec::new(),
            leaders: HashMap::new(),
            max_epoch: vec![Epoch::default(); n],
            ever_had: vec![BTreeSet::new(); n],
            devices,
            delivered: 0,
        }
    }

    fn index_of(&self, device: DeviceId) -> usize {
        self.devices
            .iter()
            .position(|d| *d == device)
            .unwrap_or(usize::MAX)
    }

    fn dispatch(&mut self, from: usize, outputs: Vec<Output>, lossy: bool) {
        for Output::Send { to, message } in outputs {
            let to = self.index_of(to);
            if to == usize::MAX {
                continue;
            }
            if lossy && self.rng.gen_bool(0.02) {
                continue; // lost
            }
            let copies = if lossy && self.rng.gen_bool(0.03) {
                2
            } else {
                1
            };
            for _ in 0..copies {
                let delay = if lossy {
                    self.rng.gen_range(1..40)
                } else {
                    self.rng.gen_range(1..5)
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

    fn handle(&mut self, i: usize, input: Input, lossy: bool) {
        let now = self.now_ms;
        let Some(node) = self.nodes[i].as_mut() else {
            return;
        };
        let out = node.handle(input, now);
        self.persist(i);
        self.dispatch(i, out, lossy);
        self.check_node(i);
    }

    /// What a runtime does before sending: writes the node's log operations and epochs to its
    /// "disk". The disk log must then equal the node's own view, so a
    /// restart from the disk is a restart from exactly what the runtime would have written.
    fn persist(&mut self, i: usize) {
        let Some(node) = self.nodes[i].as_mut() else {
            return;
        };
        let disk = &mut self.disks[i];
        for op in node.take_ops() {
            match op {
                LogOp::Append { at, epoch, entry } => {
                    assert_eq!(
                        at.0,
                        disk.log.len() as u64 + 1,
                        "node {i}: append not at the end"
                    );
                    disk.log.push((epoch, entry));
                }
                LogOp::Truncate { keep } => disk.log.truncate(keep.0 as usize),
            }
        }
        let d = node.durable();
        // A cheap check on every step; the whole log is compared at each crash.
        assert_eq!(disk.log.len(), d.log.len(), "node {i}: log ops differ");
        assert_eq!(disk.log.last(), d.log.last(), "node {i}: log ops differ");
        disk.epoch = d.epoch;
        disk.voted = d.voted;
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
        }
    }

    fn check_nothing_lost(&mut self) {
        for i in 0..self.nodes.len() {
            let d = match &self.nodes[i] {
                Some(n) => n.durable().clone(),
                None => self.disks[i].clone(),
            };
            let now = changes_of(&d);
            let missing: Vec<_> = self.ever_had[i].difference(&now).collect();
            assert!(missing.is_empty(), "node {i} lost changes {missing:?}");
            self.ever_had[i] = now;
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
            self.views[i] = reachable;
        }
    }

    fn step(&mut self, chaos: bool) {
        self.now_ms += STEP_MS;
        let n = self.nodes.len();
        if chaos {
            if self.rng.gen_bool(0.01) {
                // A random partition into two sides.
                let side: Vec<bool> = (0..n).map(|_| self.rng.gen_bool(0.5)).collect();
                for a in 0..n {
                    for b in 0..n {
                        self.up[a][b] = side[a] == side[b];
                    }
                }
            }
            if self.rng.gen_bool(0.005) {
                // One link cut, the others kept: a device may lose its leader and still reach
                // the rest (what pre-vote is for).
                let a = self.rng.gen_range(0..n);
                let b = (a + self.rng.gen_range(1..n)) % n;
                self.up[a][b] = false;
                self.up[b][a] = false;
            }
            if self.rng.gen_bool(0.008) {
                self.up = vec![vec![true; n]; n];
            }
            if self.rng.gen_bool(0.004) {
                let i = self.rng.gen_range(0..n);
                if let Some(node) = self.nodes[i].take() {
                    assert_eq!(
                        self.disks[i].log,
                        node.durable().log,
                        "node {i}: disk differs"
                    );
                    // The disk holds the log as persisted after the last input; the offline
                    // journal is written by each commit itself.
                    self.disks[i].offline = node.durable().offline.clone();
                    self.views[i].clear();
                }
            }
            if self.rng.gen_bool(0.3) {
                let i = self.rng.gen_range(0..n);
                if self.nodes[i].is_some() {
                    let id = ChangeId(Uuid::from_u128(self.rng.gen()));
                    self.handle(i, Input::Commit(id), true);
                    // Commit is durable once handled: acknowledged.
                    self.acked.push(id);
                    self.ever_had[i].insert(id);
                }
            }
        }
        for i in 0..n {
            if self.nodes[i].is_none() && (!chaos || self.rng.gen_bool(0.02)) {
                let node =
                    Replica::new(config(self.devices[i]), self.disks[i].clone(), self.now_ms);
                self.nodes[i] = Some(node);
                self.persist(i);
            }
        }
        self.refresh_views(chaos);
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
            let k = self.rng.gen_range(0..due.len());
            let m = due.swap_remove(k);
            if self.up[m.from][m.to] && self.nodes[m.to].is_some() {
                self.delivered += 1;
                let from = self.devices[m.from];
                self.handle(
                    m.to,
                    Input::Received {
                        from,
                        message: m.message,
                    },
                    chaos,
                );
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

fn digest(d: &Durable) -> String {
    let mut hasher = blake3::Hasher::new();
    for id in changes_of(d) {
        hasher.update(id.0.as_bytes());
    }
    hasher.finalize().to_hex().to_string()
}

fn run(seed: u64) {
    let mut sim = Sim::new(seed);
    for step in 0..CHAOS_STEPS {
        sim.step(true);
        if step % 100 == 0 {
            sim.check_nothing_lost();
        }
    }
    let n = sim.nodes.len();
    sim.up = vec![vec![true; n]; n];
    let mut healed_after = None;
    for step in 0..HEAL_STEPS_MAX {
        sim.step(false);
        if sim.converged() {
            healed_after = Some(step);
            break;
        }
    }
    sim.check_nothing_lost();
    let Some(_) = healed_after else {
        let summary: Vec<String> = sim
            .nodes
            .iter()
            .flatten()
            .map(|n| {
                format!(
                    "{:?} epoch {} log {} pending {}",
                    n.role(),
                    n.durable().epoch,
                    n.durable().log.len(),
                    n.durable().offline.len()
                )
            })
            .collect();
        panic!("seed {seed}: no convergence after healing: {summary:?}");
    };
    let nodes: Vec<&Replica> = sim.nodes.iter().flatten().collect();
    let digests: BTreeSet<String> = nodes.iter().map(|n| digest(n.durable())).collect();
    assert_eq!(digests.len(), 1, "seed {seed}: digests differ");
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
    let tier_default = if keel_tests::full_tier() { 1_000 } else { 200 };
    let seeds: u64 = std::env::var("KEEL_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(tier_default);
    for seed in 0..seeds {
        let outcome = std::panic::catch_unwind(|| run(seed));
        if let Err(panic) = outcome {
            eprintln!("simulator failed with seed {seed}; rerun with KEEL_SIM_SEED={seed}");
            std::panic::resume_unwind(panic);
        }
    }
    eprintln!("simulator: {seeds} seeds converged");
}
