//! Fuzz target: the protocol core (`keel_replication::Replica`) fed arbitrary messages from a
//! paired peer, as a leader and as a follower, driven through its whole contract (writes made
//! durable in an in-memory journal, then transmits). The core's own assertions (epochs never go
//! back, one vote per counter, appends at the end only, nothing sent before it is written) and
//! the journal's (an append lands at the end) must hold whatever the peer sends, and whenever
//! the runtime finds its log damaged and cuts it (abdicating first, keeping a vote floor).
#![no_main]

use keel_replication::wire::WireLogEntry;
use keel_replication::{
    Durable, ElectionRole, LogWrite, Opened, Replica, ReplicaConfig, ReplicationMessage, Store,
};
use keel_schema::{ChangeId, DeviceId, Epoch, Lsn};
use libfuzzer_sys::fuzz_target;
use serde_bytes::ByteBuf;
use uuid::Uuid;

/// Reads the fuzz input as numbers; zeros once it runs out.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn done(&self) -> bool {
        self.0.is_empty()
    }

    fn u8(&mut self) -> u8 {
        let Some((&b, rest)) = self.0.split_first() else {
            return 0;
        };
        self.0 = rest;
        b
    }

    fn u64(&mut self) -> u64 {
        // Mostly small numbers (positions, counters near the honest ones), sometimes any.
        match self.u8() % 4 {
            0 => u64::from_le_bytes(std::array::from_fn(|_| self.u8())),
            _ => u64::from(self.u8()),
        }
    }

    fn epoch(&mut self) -> Epoch {
        Epoch {
            counter: self.u64(),
            device: DeviceId([self.u8() % 3; 32]),
        }
    }

    fn sealed(&mut self) -> Vec<u8> {
        match self.u8() % 4 {
            0 => Vec::new(),
            1 => vec![self.u8(); usize::from(self.u8() % 24)],
            _ => seal(
                ChangeId(Uuid::from_u128(u128::from(self.u8()))),
                DeviceId([self.u8() % 3; 32]),
            ),
        }
    }

    fn message(&mut self) -> ReplicationMessage {
        let epoch = self.epoch();
        match self.u8() % 9 {
            0 => ReplicationMessage::Stale { epoch },
            7 => ReplicationMessage::Compacted {
                epoch,
                base: Lsn(self.u64()),
                base_epoch: self.epoch(),
            },
            1 => ReplicationMessage::RequestVote {
                epoch,
                last_epoch: self.epoch(),
                last_lsn: Lsn(self.u64()),
            },
            2 => ReplicationMessage::PreVote {
                epoch,
                last_epoch: self.epoch(),
                last_lsn: Lsn(self.u64()),
            },
            3 => ReplicationMessage::PreVoteReply {
                epoch,
                granted: self.u8() % 2 == 0,
                highest: self.epoch(),
            },
            4 => ReplicationMessage::Vote {
                epoch,
                granted: self.u8() % 2 == 0,
            },
            5 => ReplicationMessage::Ack {
                epoch,
                ok: self.u8() % 2 == 0,
                stored: Lsn(self.u64()),
                positions: Vec::new(),
                floor: (self.u8() % 2 == 0).then(|| keel_replication::wire::ClockFloor {
                    ms: self.u64(),
                    counter: u32::from(self.u8()),
                }),
            },
            6 => ReplicationMessage::Push {
                changes: (0..self.u8() % 4)
                    .map(|_| ByteBuf::from(self.sealed()))
                    .collect(),
            },
            _ => ReplicationMessage::LogSegment {
                epoch,
                first: Lsn(self.u64()),
                prev_epoch: self.epoch(),
                leader_end: Lsn(self.u64()),
                base: Lsn(self.u64()),
                entries: (0..self.u8() % 6)
                    .map(|_| WireLogEntry {
                        epoch: self.epoch(),
                        sealed: ByteBuf::from(self.sealed()),
                    })
                    .collect(),
            },
        }
    }
}

/// A marker, the change id, the device that made it.
fn seal(id: ChangeId, origin: DeviceId) -> Vec<u8> {
    let mut sealed = b"fuzz".to_vec();
    sealed.extend_from_slice(id.0.as_bytes());
    sealed.extend_from_slice(&origin.0);
    sealed
}

/// An in-memory journal.
#[derive(Default)]
struct Memory {
    election: (Epoch, Epoch),
    log: Vec<(Epoch, Vec<u8>)>,
    offline: Vec<(ChangeId, Vec<u8>)>,
    vote_floor: Option<(Epoch, Lsn)>,
}

impl Store for Memory {
    type Error = String;

    fn read_log(&mut self, first: Lsn, count: usize) -> Result<Vec<(Epoch, Vec<u8>)>, String> {
        let from = first.0.saturating_sub(1) as usize;
        self.log
            .get(from..from.saturating_add(count))
            .map(<[_]>::to_vec)
            .ok_or_else(|| "past the end".to_string())
    }

    fn read_offline(&mut self) -> Result<Vec<(ChangeId, Vec<u8>)>, String> {
        Ok(self.offline.clone())
    }

    fn applied(&mut self) -> Lsn {
        Lsn(self.log.len() as u64)
    }

    fn peek_change_id(&self, sealed: &[u8]) -> Option<ChangeId> {
        let id: [u8; 16] = sealed.get(4..20)?.try_into().ok()?;
        Some(ChangeId(Uuid::from_bytes(id)))
    }

    fn open_pushed(&self, sealed: &[u8]) -> Result<Opened, String> {
        if sealed.len() != 52 || sealed.get(..4) != Some(&b"fuzz"[..]) {
            return Err("does not open".into());
        }
        let origin: [u8; 32] = sealed[20..].try_into().map_err(|_| "no origin")?;
        Ok(Opened {
            id: self.peek_change_id(sealed).ok_or("no id")?,
            origin: DeviceId(origin),
        })
    }
}

impl Memory {
    /// What a restarted replica reads back.
    fn durable(&self) -> Durable {
        Durable {
            epoch: self.election.0,
            voted: self.election.1,
            log: self
                .log
                .iter()
                .map(|(e, p)| {
                    (
                        *e,
                        self.peek_change_id(p).map_or(
                            keel_replication::LogSlot::Barrier,
                            keel_replication::LogSlot::Change,
                        ),
                    )
                })
                .collect(),
            offline: self.offline.iter().map(|(id, _)| *id).collect(),
            vote_floor: self.vote_floor,
        }
    }

    /// The runtime found the record at `at` damaged: it cuts the log before it (this device's
    /// changes after it go back to pending), after storing `floor`.
    fn cut(&mut self, at: usize, floor: (Epoch, Lsn), device: u8) {
        self.vote_floor = Some(self.vote_floor.map_or(floor, |f| f.max(floor)));
        let keep = at.clamp(1, self.log.len().max(1));
        for (_, sealed) in self.log.split_off(keep.min(self.log.len())) {
            let own = sealed.get(20..) == Some(&[device; 32][..]);
            if let (Some(id), true) = (self.peek_change_id(&sealed), own) {
                self.offline.push((id, sealed));
            }
        }
    }

    fn apply(&mut self, write: LogWrite) {
        match write {
            LogWrite::Election { epoch, voted } => self.election = (epoch, voted),
            LogWrite::Append { at, entries } => {
                assert_eq!(at.0, self.log.len() as u64 + 1, "append not at the end");
                self.log.extend(entries);
            }
            LogWrite::Truncate { keep, dropped } => {
                for (_, sealed) in self.log.split_off(keep.0 as usize) {
                    if let Some(id) = self.peek_change_id(&sealed) {
                        if !dropped.contains(&id) {
                            self.offline.push((id, sealed));
                        }
                    }
                }
            }
        }
    }
}

/// Does what a runtime does after an input: events, writes, confirmation, transmits. A write
/// that cannot be prepared restarts the replica from what is durable, as the contract says.
fn drive(replica: &mut Replica, store: &mut Memory, device: u8, now: u64) {
    while replica.poll_event().is_some() {}
    loop {
        match replica.poll_log_write(store) {
            Ok(Some(write)) => store.apply(write),
            Ok(None) => break,
            Err(_) => {
                *replica = Replica::new(config(device), store.durable(), now);
                replica.handle_connected(now, DeviceId([2; 32]));
                return;
            }
        }
    }
    replica.written();
    while let Ok(Some(_)) = replica.poll_transmit(store) {}
}

fn config(byte: u8) -> ReplicaConfig {
    ReplicaConfig {
        device: DeviceId([byte; 32]),
        election_timeout_ms: 100,
        heartbeat_ms: 10,
        segment_max: 8,
        segments_in_flight: 2,
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let peer = DeviceId([2; 32]);
    // Each side: its replica, store, device byte, and whether it was held by the start check
    // while neither leading nor standing (it must then not stand until released).
    let mut leader = (Replica::founder(config(0), 0), Memory::default(), 0u8, false);
    let mut follower = (
        Replica::new(config(1), Durable::default(), 0),
        Memory::default(),
        1u8,
        false,
    );
    for (replica, store, device, _) in [&mut leader, &mut follower] {
        drive(replica, store, *device, 0);
        replica.handle_connected(0, peer);
        drive(replica, store, *device, 0);
    }
    let mut now = 1u64;
    while !input.done() {
        now += u64::from(input.u8());
        let (replica, store, device, held) = if input.u8() % 2 == 0 {
            &mut leader
        } else {
            &mut follower
        };
        match input.u8() % 10 {
            0 => replica.handle_timeout(now),
            9 => {
                // The start check: held from standing until the log through some end is read
                // back, or released by a check (that may fall short of it).
                let at = Lsn(u64::from(input.u8()));
                if input.u8() % 2 == 0 {
                    replica.hold_until_checked(at);
                    *held = replica.is_unchecked()
                        && !matches!(
                            replica.role(),
                            ElectionRole::Leader | ElectionRole::Candidate
                        );
                } else {
                    replica.log_checked(at);
                }
            }
            8 => {
                let floor = replica.handle_abdicate(now);
                drive(replica, store, *device, now);
                store.cut(usize::from(input.u8()), floor, *device);
                *replica = replica.restarted(store.durable(), now);
                replica.handle_connected(now, peer);
            }
            1 => {
                let id = ChangeId(Uuid::from_u128(u128::from(input.u8()) + 1000));
                replica.handle_commit(now, id, Some(seal(id, DeviceId([*device; 32]))));
            }
            _ => {
                let message = input.message();
                if message.check().is_ok() {
                    replica.handle_message(now, peer, message, store);
                }
            }
        }
        drive(replica, store, *device, now);
        *held &= replica.is_unchecked();
        assert!(
            !*held || !matches!(replica.role(), ElectionRole::Leader | ElectionRole::Candidate),
            "a replica held by the start check stood"
        );
    }
});
