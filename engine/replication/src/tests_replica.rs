//! Unit tests of [`Replica`]: its contract (nothing sent before it is durable), its handling of
//! hostile payloads, its timeouts, and how it merges segments.

use keel_schema::{ChangeId, DeviceId, Epoch, Lsn};
use serde_bytes::ByteBuf;
use uuid::Uuid;

use crate::replica::coalesce;
use crate::tests::{config, id};
use crate::types::{LogSlot, Message, Output};
use crate::wire::WireLogEntry;
use crate::{
    Durable, ElectionRole, LogWrite, Opened, Replica, ReplicaEvent, ReplicationMessage, Store,
};

/// The device these tests' followers are, and that made the changes [`seal`] seals.
const MAKER: DeviceId = DeviceId([2; 32]);

/// Sealing for these tests: a marker, the change id, then the device that made it.
fn seal_by(id: ChangeId, origin: DeviceId) -> Vec<u8> {
    let mut sealed = b"test".to_vec();
    sealed.extend_from_slice(id.0.as_bytes());
    sealed.extend_from_slice(&origin.0);
    sealed
}

/// A change made by [`MAKER`], sealed.
fn seal(id: ChangeId) -> Vec<u8> {
    seal_by(id, MAKER)
}

/// An in-memory store: a log, an offline journal.
#[derive(Default)]
struct Memory {
    log: Vec<(Epoch, Vec<u8>)>,
    offline: Vec<(ChangeId, Vec<u8>)>,
}

impl Store for Memory {
    type Error = String;

    fn read_log(&mut self, first: Lsn, count: usize) -> Result<Vec<(Epoch, Vec<u8>)>, String> {
        let from = first.0.saturating_sub(1) as usize;
        self.log
            .get(from..from + count)
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
        if sealed.get(..4) != Some(&b"test"[..]) {
            return Err("bad seal".into());
        }
        let origin: [u8; 32] = sealed
            .get(20..52)
            .and_then(|o| o.try_into().ok())
            .ok_or("short")?;
        Ok(Opened {
            id: self.peek_change_id(sealed).ok_or("short")?,
            origin: DeviceId(origin),
        })
    }
}

impl Memory {
    fn write_all(&mut self, replica: &mut Replica) -> Vec<LogWrite> {
        let mut writes = Vec::new();
        while let Some(write) = replica.poll_log_write(self).expect("writes") {
            if let LogWrite::Append { entries, .. } = &write {
                self.log.extend(entries.iter().cloned());
            }
            writes.push(write);
        }
        writes
    }
}

#[test]
fn nothing_is_transmitted_before_the_writes_it_depends_on_are_confirmed() {
    let mut store = Memory::default();
    let mut leader = Replica::founder(config(1), 0);
    store.write_all(&mut leader);
    leader.written();
    let follower = DeviceId([2; 32]);
    leader.handle_connected(1, follower);
    leader.handle_commit(2, id(7), Some(seal(id(7))));
    // The commit's append is not polled yet: nothing goes out.
    assert_eq!(leader.poll_transmit(&mut store).expect("polls"), None);
    let writes = store.write_all(&mut leader);
    assert_eq!(
        writes,
        vec![LogWrite::Append {
            at: Lsn(2),
            entries: vec![(leader.durable().epoch, seal(id(7)))],
        }]
    );
    // Polled but not confirmed: still nothing.
    assert_eq!(leader.poll_transmit(&mut store).expect("polls"), None);
    leader.written();
    let sent = leader
        .poll_transmit(&mut store)
        .expect("polls")
        .expect("a segment");
    assert_eq!(sent.to, follower);
    let ReplicationMessage::LogSegment { entries, .. } = sent.message else {
        panic!("expected a segment, got {:?}", sent.message);
    };
    assert_eq!(entries.last().map(|e| e.sealed.to_vec()), Some(seal(id(7))));
}

#[test]
#[should_panic(expected = "not yet polled")]
fn confirming_writes_that_were_not_polled_is_a_bug() {
    let mut leader = Replica::founder(config(1), 0);
    leader.written();
}

#[test]
fn a_push_that_does_not_open_is_refused_and_not_kept() {
    let mut store = Memory::default();
    let mut leader = Replica::founder(config(1), 0);
    store.write_all(&mut leader);
    leader.written();
    let from = DeviceId([2; 32]);
    leader.handle_connected(1, from);
    let mut forged = seal(id(9));
    forged[0] ^= 0xff;
    leader.handle_message(
        2,
        from,
        ReplicationMessage::Push {
            changes: vec![ByteBuf::from(forged), ByteBuf::from(seal(id(8)))],
        },
        &mut store,
    );
    let events: Vec<ReplicaEvent> = std::iter::from_fn(|| leader.poll_event()).collect();
    assert!(
        events
            .iter()
            .any(|e| matches!(e, ReplicaEvent::Refused { from: f, .. } if *f == from)),
        "{events:?}"
    );
    let writes = store.write_all(&mut leader);
    // Only the authentic change is sequenced.
    assert_eq!(
        writes,
        vec![LogWrite::Append {
            at: Lsn(2),
            entries: vec![(leader.durable().epoch, seal(id(8)))],
        }]
    );
    assert!(leader.payloads_len() == 0, "payloads left in memory");
}

#[test]
fn a_change_pushed_by_another_device_than_its_maker_is_refused() {
    let mut store = Memory::default();
    let mut leader = Replica::founder(config(1), 0);
    store.write_all(&mut leader);
    leader.written();
    let from = DeviceId([3; 32]);
    leader.handle_connected(1, from);
    leader.handle_message(
        2,
        from,
        ReplicationMessage::Push {
            changes: vec![
                ByteBuf::from(seal_by(id(9), MAKER)),
                ByteBuf::from(seal_by(id(8), from)),
            ],
        },
        &mut store,
    );
    let events: Vec<ReplicaEvent> = std::iter::from_fn(|| leader.poll_event()).collect();
    assert!(
        events.iter().any(|e| matches!(e,
            ReplicaEvent::Refused { from: f, reason } if *f == from && reason.contains("made by"))),
        "{events:?}"
    );
    // Only the pusher's own change is sequenced.
    assert_eq!(
        store.write_all(&mut leader),
        vec![LogWrite::Append {
            at: Lsn(2),
            entries: vec![(leader.durable().epoch, seal_by(id(8), from))],
        }]
    );
    assert_eq!(leader.payloads_len(), 0, "payloads left in memory");
}

#[test]
fn an_offline_change_with_no_payload_is_forgotten_not_pushed_forever() {
    // A truncation returned another device's change to `offline`, but the journal dropped it.
    let leader = DeviceId([1; 32]);
    let epoch = Epoch {
        counter: 1,
        device: leader,
    };
    let mut follower = Replica::new(
        config(2),
        Durable {
            epoch,
            voted: epoch,
            offline: vec![id(5)],
            ..Durable::default()
        },
        0,
    );
    let mut store = Memory::default();
    follower.handle_connected(1, leader);
    follower.handle_message(
        1,
        leader,
        segment(epoch, 1, Epoch::default(), vec![(epoch, Vec::new())]),
        &mut store,
    );
    store.write_all(&mut follower);
    follower.written();
    for now in [10_000, 20_000] {
        follower.handle_timeout(now);
        store.write_all(&mut follower);
        follower.written();
        while let Some(sent) = follower.poll_transmit(&mut store).expect("polls") {
            assert!(
                !matches!(sent.message, ReplicationMessage::Push { .. }),
                "pushed {:?}",
                sent.message
            );
        }
    }
    assert!(follower.durable().offline.is_empty(), "still pending");
}

#[test]
fn payloads_of_a_segment_the_rules_refuse_are_not_kept() {
    let mut store = Memory::default();
    let newer = Epoch {
        counter: 5,
        device: DeviceId([3; 32]),
    };
    let mut follower = Replica::new(
        config(2),
        Durable {
            epoch: newer,
            voted: newer,
            ..Durable::default()
        },
        0,
    );
    let stale = Epoch {
        counter: 2,
        device: DeviceId([1; 32]),
    };
    follower.handle_message(
        1,
        stale.device,
        ReplicationMessage::LogSegment {
            epoch: stale,
            first: Lsn(1),
            prev_epoch: Epoch::default(),
            leader_end: Lsn(2),
            base: Lsn(0),
            entries: (0..2)
                .map(|n| WireLogEntry {
                    epoch: stale,
                    sealed: ByteBuf::from(seal(id(n))),
                })
                .collect(),
        },
        &mut store,
    );
    assert_eq!(
        follower.payloads_len(),
        0,
        "a stale leader's payloads stayed in memory"
    );
    assert!(store.write_all(&mut follower).is_empty());
    follower.written();
    let sent = follower
        .poll_transmit(&mut store)
        .expect("polls")
        .expect("an answer");
    assert_eq!(sent.message, ReplicationMessage::Stale { epoch: newer });
}

#[test]
fn a_follower_with_offline_changes_and_no_leader_sets_no_deadline_in_the_past() {
    // A runtime sleeps until `poll_timeout`: a deadline that a tick does not move would spin it.
    let mut follower = Replica::new(config(2), Durable::default(), 0);
    follower.handle_connected(0, DeviceId([3; 32]));
    follower.handle_commit(0, id(1), Some(seal(id(1))));
    assert_eq!(follower.role(), ElectionRole::Follower);
    let now = 5_000;
    follower.handle_timeout(now);
    let mut store = Memory::default();
    store.write_all(&mut follower);
    follower.written();
    while follower.poll_transmit(&mut store).expect("polls").is_some() {}
    assert!(
        follower.poll_timeout() > now,
        "deadline {} is not after {now}",
        follower.poll_timeout()
    );
}

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
            base: Lsn(0),
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

fn segment(
    epoch: Epoch,
    first: u64,
    prev_epoch: Epoch,
    entries: Vec<(Epoch, Vec<u8>)>,
) -> ReplicationMessage {
    ReplicationMessage::LogSegment {
        epoch,
        first: Lsn(first),
        prev_epoch,
        leader_end: Lsn(first + entries.len() as u64 - 1),
        base: Lsn(0),
        entries: entries
            .into_iter()
            .map(|(epoch, sealed)| WireLogEntry {
                epoch,
                sealed: ByteBuf::from(sealed),
            })
            .collect(),
    }
}

/// Founder 1's epoch in these tests.
const FOUNDER: Epoch = Epoch {
    counter: 1,
    device: DeviceId([1; 32]),
};

/// A follower of founder 1 holding the founder's barrier and two changes, written.
fn follower_of_founder(store: &mut Memory) -> Replica {
    follower_holding(store, [seal(id(1)), seal(id(2))])
}

/// A follower of founder 1 holding the founder's barrier and `changes` (sealed), written.
fn follower_holding(store: &mut Memory, changes: [Vec<u8>; 2]) -> Replica {
    let mut entries = vec![(FOUNDER, Vec::new())];
    entries.extend(changes.into_iter().map(|sealed| (FOUNDER, sealed)));
    let mut follower = Replica::new(config(2), Durable::default(), 0);
    follower.handle_connected(0, FOUNDER.device);
    follower.handle_message(
        1,
        FOUNDER.device,
        segment(FOUNDER, 1, Epoch::default(), entries),
        store,
    );
    store.write_all(&mut follower);
    follower.written();
    while follower.poll_transmit(store).expect("polls").is_some() {}
    while follower.poll_event().is_some() {}
    assert_eq!(follower.durable().log.len(), 3);
    follower
}

/// Issue 24: a leader accepts a change only from its maker, so a truncation returns only this
/// device's own changes to `offline`; the write names the others, for the store to drop.
#[test]
fn a_truncation_returns_only_this_devices_changes() {
    let mut store = Memory::default();
    let founder = FOUNDER;
    let other = DeviceId([3; 32]);
    let mut follower = follower_holding(&mut store, [seal_by(id(1), MAKER), seal_by(id(2), other)]);
    let next = Epoch {
        counter: 2,
        device: other,
    };
    follower.handle_connected(2, other);
    follower.handle_message(
        3,
        other,
        segment(next, 2, founder, vec![(next, Vec::new())]),
        &mut store,
    );
    let writes = store.write_all(&mut follower);
    assert!(
        writes.contains(&LogWrite::Truncate {
            keep: Lsn(1),
            dropped: vec![id(2)],
        }),
        "{writes:?}"
    );
    assert_eq!(follower.durable().offline, vec![id(1)]);
}

/// Issue 24: one segment from a paired device with an epoch counter at `u64::MAX` left every
/// device in that epoch and made the next candidacy overflow: nobody could lead again.
#[test]
fn a_peer_cannot_push_the_epoch_to_its_limit() {
    let mut store = Memory::default();
    let mut follower = follower_of_founder(&mut store);
    let hostile = DeviceId([9; 32]);
    follower.handle_connected(2, hostile);
    let forged = Epoch {
        counter: u64::MAX,
        device: hostile,
    };
    follower.handle_message(
        3,
        hostile,
        segment(
            forged,
            4,
            Epoch {
                counter: 1,
                device: DeviceId([1; 32]),
            },
            vec![(forged, Vec::new())],
        ),
        &mut store,
    );
    follower.handle_message(
        4,
        hostile,
        ReplicationMessage::Stale { epoch: forged },
        &mut store,
    );
    assert!(
        follower.durable().epoch.counter < u64::MAX / 2,
        "adopted epoch {:?}",
        follower.durable().epoch
    );
    // Its timers still run an election without overflowing.
    follower.handle_disconnected(5, DeviceId([1; 32]));
    follower.handle_timeout(100_000);
    follower.handle_timeout(200_000);
}

/// Issue 24: a paired device could truncate every log from position 1 with a segment that
/// disagrees there. Every log begins with the founder's barrier (a device with no log never
/// stands for election, so no log begins with another), and a segment that disagrees at
/// position 1 is dropped.
#[test]
fn a_segment_that_disagrees_at_the_first_position_is_refused() {
    let mut store = Memory::default();
    let mut follower = follower_of_founder(&mut store);
    let hostile = DeviceId([9; 32]);
    let forged = Epoch {
        counter: 2,
        device: hostile,
    };
    follower.handle_connected(2, hostile);
    follower.handle_message(
        3,
        hostile,
        segment(forged, 1, Epoch::default(), vec![(forged, Vec::new())]),
        &mut store,
    );
    let writes = store.write_all(&mut follower);
    assert!(
        !writes
            .iter()
            .any(|w| matches!(w, LogWrite::Truncate { .. })),
        "{writes:?}"
    );
    assert_eq!(follower.durable().log.len(), 3);
}

/// Issue 24: entries whose epochs go back, exceed the segment's, or a barrier in the middle of
/// an epoch, make the whole segment refused.
#[test]
fn a_segment_with_impossible_epochs_is_refused() {
    let mut store = Memory::default();
    let mut follower = follower_of_founder(&mut store);
    let founder = FOUNDER;
    let later = Epoch {
        counter: 3,
        device: DeviceId([1; 32]),
    };
    let bad = [
        // An entry above the segment's epoch.
        segment(founder, 4, founder, vec![(later, seal(id(5)))]),
        // A barrier inside an epoch.
        segment(founder, 4, founder, vec![(founder, Vec::new())]),
    ];
    for message in bad {
        follower.handle_message(3, founder.device, message, &mut store);
        assert!(store.write_all(&mut follower).is_empty());
        assert_eq!(follower.durable().log.len(), 3);
    }
}

/// Issue 24: `leader_end` of a segment that is not accepted must not start a catch-up (a
/// catch-up drops the projections' secondary indexes until it is reached).
#[test]
fn a_refused_segment_announces_no_catch_up() {
    let mut store = Memory::default();
    let mut follower = follower_of_founder(&mut store);
    let founder = FOUNDER;
    let mut forged = segment(
        founder,
        10,
        Epoch {
            counter: 7,
            device: DeviceId([1; 32]),
        },
        vec![(founder, seal(id(9)))],
    );
    if let ReplicationMessage::LogSegment { leader_end, .. } = &mut forged {
        *leader_end = Lsn(u64::MAX);
    }
    follower.handle_message(3, founder.device, forged, &mut store);
    let events: Vec<ReplicaEvent> = std::iter::from_fn(|| follower.poll_event()).collect();
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, ReplicaEvent::CatchingUp { .. })),
        "{events:?}"
    );
}

/// Found by the `replica` fuzz target: a segment naming one change twice made the second write
/// fail for want of its payload (the first had taken it), and a runtime restarts its replica on a
/// failed write, so a misbehaving leader could keep a follower restarting.
#[test]
fn a_segment_naming_a_change_twice_is_written_whole() {
    let mut store = Memory::default();
    let mut follower = follower_of_founder(&mut store);
    let founder = FOUNDER;
    follower.handle_message(
        3,
        founder.device,
        segment(
            founder,
            4,
            founder,
            vec![(founder, seal(id(7))), (founder, seal(id(7)))],
        ),
        &mut store,
    );
    let mut written = 0;
    while let Some(write) = follower.poll_log_write(&mut store).expect("no write fails") {
        if let LogWrite::Append { entries, .. } = &write {
            written += entries.len();
            store.log.extend(entries.iter().cloned());
        }
    }
    assert_eq!(written, 2);
    follower.written();
    assert_eq!(follower.payloads_len(), 0, "payloads left in memory");
}

/// Found by the `replica` fuzz target: an acknowledgement claiming position `u64::MAX` made
/// the leader's arithmetic overflow (a panic: the node's core thread would die).
#[test]
fn an_acknowledgement_past_every_position_is_harmless() {
    let mut store = Memory::default();
    let mut leader = Replica::founder(config(1), 0);
    store.write_all(&mut leader);
    leader.written();
    let peer = DeviceId([2; 32]);
    leader.handle_connected(1, peer);
    let epoch = leader.durable().epoch;
    for ok in [true, false] {
        leader.handle_message(
            2,
            peer,
            ReplicationMessage::Ack {
                epoch,
                ok,
                stored: Lsn(u64::MAX),
                positions: Vec::new(),
                floor: None,
            },
            &mut store,
        );
    }
    assert_eq!(leader.role(), ElectionRole::Leader);
}

/// Issue 24: in a library of two devices, the survivor of its leader leads its own partition
/// (its commits go into its log, a new device can join through it); the old leader, back,
/// learns the newer epoch and steps down.
#[test]
fn the_survivor_of_two_devices_leads_when_its_leader_is_gone() {
    let mut store = Memory::default();
    let mut follower = follower_of_founder(&mut store);
    let founder = DeviceId([1; 32]);
    follower.handle_disconnected(10, founder);
    for now in [500, 1_000, 2_000] {
        follower.handle_timeout(now);
        store.write_all(&mut follower);
        follower.written();
    }
    assert_eq!(follower.role(), ElectionRole::Leader);
    let sequenced = follower.handle_commit(2_001, id(50), Some(seal(id(50))));
    assert!(
        sequenced.is_some(),
        "the survivor sequences its own commits"
    );
    store.write_all(&mut follower);
    follower.written();
    // The old leader comes back still leading epoch 1: its segment is stale here.
    follower.handle_connected(2_100, founder);
    let old = Epoch {
        counter: 1,
        device: founder,
    };
    follower.handle_message(
        2_101,
        founder,
        segment(old, 4, old, vec![(old, seal(id(60)))]),
        &mut store,
    );
    store.write_all(&mut follower);
    follower.written();
    let stale = std::iter::from_fn(|| follower.poll_transmit(&mut store).expect("polls"))
        .any(|t| t.to == founder && matches!(t.message, ReplicationMessage::Stale { .. }));
    assert!(stale, "the old leader is told its epoch is stale");
    assert_eq!(follower.role(), ElectionRole::Leader);
}

/// With three or more devices a lone device stays alone: leading a partition of one would make
/// it depose the majority's leader when it came back (its epoch higher), re-sequencing the
/// majority's changes.
#[test]
fn a_lone_device_of_a_larger_library_does_not_lead() {
    let mut store = Memory::default();
    let mut follower = follower_of_founder(&mut store);
    let other = DeviceId([3; 32]);
    follower.handle_connected(5, other);
    follower.handle_disconnected(10, DeviceId([1; 32]));
    follower.handle_disconnected(11, other);
    for now in [500, 1_000, 2_000] {
        follower.handle_timeout(now);
        store.write_all(&mut follower);
        follower.written();
    }
    assert_eq!(follower.role(), ElectionRole::Alone);
}

/// A leader ships a pushed change back to its author as its id alone (the author holds it) and
/// whole to everyone else; the author stores it whole, from its own copy. Sent again, the entry
/// goes whole. An echo of a change the receiver does not hold is refused.
#[test]
fn a_pushed_change_goes_back_to_its_author_as_its_id_alone() {
    let mut store = Memory::default();
    let mut leader = Replica::founder(config(1), 0);
    store.write_all(&mut leader);
    leader.written();
    let other = DeviceId([3; 32]);
    leader.handle_connected(1, MAKER);
    leader.handle_connected(1, other);
    let pushed = seal(id(21));
    leader.handle_message(
        2,
        MAKER,
        ReplicationMessage::Push {
            changes: vec![ByteBuf::from(pushed.clone())],
        },
        &mut store,
    );
    store.write_all(&mut leader);
    leader.written();
    let mut to = std::collections::HashMap::new();
    while let Some(sent) = leader.poll_transmit(&mut store).expect("polls") {
        if let ReplicationMessage::LogSegment { entries, first, .. } = sent.message {
            if let Some(last) = entries.last() {
                to.insert(sent.to, (first, last.sealed.to_vec()));
            }
        }
    }
    let (_, echo) = to.get(&MAKER).cloned().expect("a segment to the author");
    assert_eq!(echo, id(21).0.as_bytes().to_vec(), "the id alone");
    assert_eq!(to.get(&other).map(|(_, s)| s.clone()), Some(pushed.clone()));
    let epoch = leader.durable().epoch;
    let log = vec![(epoch, Vec::new()), (epoch, echo.clone())];

    // The author stores the change whole, from its offline journal.
    let mut author_store = Memory {
        offline: vec![(id(21), pushed.clone())],
        ..Memory::default()
    };
    let mut author = Replica::new(config(2), Durable::default(), 0);
    author.handle_connected(0, epoch.device);
    author.handle_message(
        3,
        epoch.device,
        segment(epoch, 1, Epoch::default(), log.clone()),
        &mut author_store,
    );
    author_store.write_all(&mut author);
    assert_eq!(
        author_store.log,
        vec![(epoch, Vec::new()), (epoch, pushed.clone())]
    );

    // A device that does not hold the change refuses the echo and stores nothing.
    let mut stranger_store = Memory::default();
    let mut stranger = Replica::new(config(4), Durable::default(), 0);
    stranger.handle_connected(0, epoch.device);
    stranger.handle_message(
        3,
        epoch.device,
        segment(epoch, 1, Epoch::default(), log),
        &mut stranger_store,
    );
    stranger_store.write_all(&mut stranger);
    assert!(stranger_store.log.is_empty());
    let events: Vec<ReplicaEvent> = std::iter::from_fn(|| stranger.poll_event()).collect();
    assert!(
        events
            .iter()
            .any(|e| matches!(e, ReplicaEvent::Refused { reason, .. } if reason.contains("echo"))),
        "{events:?}"
    );
}

#[test]
fn a_leader_compacts_what_all_acknowledged_but_retains_no_more_than_asked_for_the_absent() {
    let mut store = Memory::default();
    let mut leader = Replica::founder(config(1), 0);
    store.write_all(&mut leader);
    leader.written();
    for n in 0..20 {
        leader.handle_commit(1, id(n), Some(seal(id(n))));
    }
    store.write_all(&mut leader);
    leader.written();
    let end = leader.durable().last_lsn();
    assert_eq!(end, Lsn(21));
    let absent = DeviceId([2; 32]);
    assert_eq!(leader.compactable(&[], u64::MAX), end, "alone: all of it");
    assert_eq!(
        leader.compactable(&[absent], u64::MAX),
        Lsn(0),
        "an absent device holds the whole log back"
    );
    assert_eq!(
        leader.compactable(&[absent], 5),
        end,
        "but not once more than 5 entries behind: what the others stored"
    );
    let near = DeviceId([3; 32]);
    leader.handle_connected(1, near);
    let epoch = leader.durable().epoch;
    let ack = ReplicationMessage::Ack {
        epoch,
        ok: true,
        stored: Lsn(18),
        positions: Vec::new(),
        floor: None,
    };
    leader.handle_message(2, near, ack, &mut store);
    assert_eq!(
        leader.compactable(&[absent, near], 5),
        Lsn(18),
        "a device within 5 entries holds the log back"
    );
    assert_eq!(leader.compactable(&[absent], 100), Lsn(0));
}
