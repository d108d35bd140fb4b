//! Compaction in the protocol core: a log with a base, a leader that tells a follower behind
//! its base to backfill, and a follower that skips what it settled.

use keel_schema::{DeviceId, Epoch, Lsn};

use crate::machine::Machine;
use crate::tests::{config, id};
use crate::types::{Input, Message, Output};
use crate::{Durable, ElectionRole, Log, LogSlot};

fn epoch(counter: u64, device: u8) -> Epoch {
    Epoch {
        counter,
        device: DeviceId([device; 32]),
    }
}

/// A log of `n` changes after the founder's barrier, the first half in epoch 1, the rest in 2.
fn log_of(n: u128) -> Log {
    let mut log = Log::default();
    log.push((epoch(1, 1), LogSlot::Barrier));
    for i in 0..n {
        let e = if i < n / 2 { epoch(1, 1) } else { epoch(2, 1) };
        log.push((e, LogSlot::Change(id(i))));
    }
    log
}

fn messages_to(out: &[Output], peer: DeviceId) -> Vec<&Message> {
    out.iter()
        .filter_map(|Output::Send { to, message }| (*to == peer).then_some(message))
        .collect()
}

#[test]
fn a_compacted_log_keeps_positions_epochs_and_its_base_epoch() {
    let full = log_of(10);
    let mut log = full.clone();
    log.compact(Lsn(4));
    assert_eq!((log.base(), log.end(), log.len()), (Lsn(4), 11, 7));
    assert_eq!(log.base_epoch(), full.get(3).expect("held").0);
    assert_eq!(log.get(3), None, "position 4 is compacted");
    for i in 4..11 {
        assert_eq!(log.get(i), full.get(i), "index {i}");
    }
    // Across the epoch change, and again at a lower base (nothing happens).
    log.compact(Lsn(8));
    log.compact(Lsn(5));
    assert_eq!((log.base(), log.base_epoch()), (Lsn(8), epoch(2, 1)));
    assert_eq!(log.range(0, 11), full.range(8, 11));
    let durable = Durable {
        log: log.clone(),
        ..Durable::default()
    };
    assert_eq!(durable.epoch_at(Lsn(8)), Some(epoch(2, 1)));
    assert_eq!(durable.epoch_at(Lsn(7)), None, "below the base is unknown");
    assert_eq!(durable.last(), (epoch(2, 1), Lsn(11)));
    // Compacted to its very end, it still says how up to date it is.
    log.compact(Lsn(11));
    let durable = Durable {
        log,
        ..Durable::default()
    };
    assert_eq!(durable.last(), (epoch(2, 1), Lsn(11)));
    assert_eq!(durable.epoch_at(Lsn(11)), Some(epoch(2, 1)));
}

/// A leader at epoch 3 with `n` changes, compacted to `base`, with `peer` connected, and
/// what it sent on the connection.
fn compacted_leader(n: u128, base: u64, peer: DeviceId) -> (Machine, Vec<Output>) {
    let mut log = log_of(n);
    log.push((epoch(3, 1), LogSlot::Barrier));
    log.compact(Lsn(base));
    let durable = Durable {
        epoch: epoch(3, 1),
        voted: epoch(3, 1),
        log,
        offline: Vec::new(),
        vote_floor: None,
    };
    let mut leader = Machine::new(config(1), durable, 0);
    assert_eq!(leader.role(), ElectionRole::Leader, "its barrier is held");
    let out = leader.handle(Input::Connected(peer), 0);
    (leader, out)
}

#[test]
fn a_leader_tells_a_follower_behind_its_base_to_backfill() {
    let peer = DeviceId([2; 32]);
    let (mut leader, _) = compacted_leader(10, 6, peer);
    // The follower has only the founder's barrier: the leader walks back to it.
    let mut follower = Machine::new(
        config(2),
        Durable {
            log: log_of(0),
            ..Durable::default()
        },
        0,
    );
    let mut told = None;
    let mut inbox: Vec<(DeviceId, Message)> = Vec::new();
    let mut now = 1;
    leader.handle(Input::Tick, now);
    for _ in 0..20 {
        now += 10;
        let out = leader.handle(Input::Tick, now);
        inbox.extend(
            messages_to(&out, peer)
                .into_iter()
                .map(|m| (DeviceId([1; 32]), m.clone())),
        );
        for (from, message) in std::mem::take(&mut inbox) {
            if let Message::Compacted { base, .. } = &message {
                told = Some(*base);
            }
            let replies = follower.handle(Input::Received { from, message }, now);
            for Output::Send { message, .. } in replies {
                let out = leader.handle(
                    Input::Received {
                        from: peer,
                        message,
                    },
                    now,
                );
                inbox.extend(
                    messages_to(&out, peer)
                        .into_iter()
                        .map(|m| (DeviceId([1; 32]), m.clone())),
                );
            }
        }
        if told.is_some() {
            break;
        }
    }
    assert_eq!(told, Some(Lsn(6)), "the leader said where it compacted");
    assert_eq!(
        follower.take_behind(),
        Some(Lsn(6)),
        "the follower must backfill"
    );
    assert_eq!(follower.durable().last_lsn(), Lsn(1), "nothing was stored");
    assert_eq!(
        leader.matched().get(&peer).copied().unwrap_or(0),
        0,
        "nothing was acknowledged"
    );
}

#[test]
fn a_follower_that_holds_the_base_continues_after_it() {
    let peer = DeviceId([2; 32]);
    let leader_device = DeviceId([1; 32]);
    let mut follower = Machine::new(
        config(2),
        Durable {
            log: log_of(10),
            ..Durable::default()
        },
        0,
    );
    let base_epoch = log_of(10).get(5).expect("held").0;
    let out = follower.handle(
        Input::Received {
            from: leader_device,
            message: Message::Compacted {
                epoch: epoch(3, 1),
                base: Lsn(6),
                base_epoch,
            },
        },
        1,
    );
    assert_eq!(follower.take_behind(), None);
    assert_eq!(
        messages_to(&out, leader_device),
        vec![&Message::AppendReply {
            epoch: epoch(3, 1),
            ok: true,
            last: Lsn(6)
        }]
    );
    // The leader's entries after its base reach the follower, which acknowledges them.
    let (mut leader, out) = compacted_leader(10, 6, peer);
    for message in messages_to(&out, peer) {
        let replies = follower.handle(
            Input::Received {
                from: leader_device,
                message: message.clone(),
            },
            3,
        );
        for Output::Send { message, .. } in replies {
            leader.handle(
                Input::Received {
                    from: peer,
                    message,
                },
                3,
            );
        }
    }
    assert_eq!(leader.matched().get(&peer), Some(&12));
    assert_eq!(follower.durable().log, {
        let mut log = log_of(10);
        log.push((epoch(3, 1), LogSlot::Barrier));
        log
    });
}

#[test]
fn a_compacted_follower_skips_what_it_settled_and_never_truncates_below_its_base() {
    let leader_device = DeviceId([1; 32]);
    let mut log = log_of(10);
    log.compact(Lsn(8));
    let mut follower = Machine::new(
        config(2),
        Durable {
            log,
            ..Durable::default()
        },
        0,
    );
    // A segment from the start: the part up to the base is skipped, the rest checked and kept.
    let full = log_of(10);
    let mut entries = full.range(0, 11);
    entries.push((epoch(3, 1), LogSlot::Barrier));
    let out = follower.handle(
        Input::Received {
            from: leader_device,
            message: Message::Append {
                epoch: epoch(3, 1),
                prev: Lsn(0),
                prev_epoch: Epoch::default(),
                entries: entries.clone(),
                base: Lsn(4),
            },
        },
        1,
    );
    assert_eq!(
        messages_to(&out, leader_device),
        vec![&Message::AppendReply {
            epoch: epoch(3, 1),
            ok: true,
            last: Lsn(12)
        }]
    );
    assert_eq!(follower.durable().last_lsn(), Lsn(12));
    assert_eq!(follower.leader_base(), Lsn(4));
    // A segment whose entry at the base has another epoch: a different compacted history. It
    // is not stored, nothing is truncated, and the follower must backfill.
    let mut forged = entries;
    for e in &mut forged[7..11] {
        e.0 = epoch(2, 5);
    }
    let before = follower.durable().clone();
    let out = follower.handle(
        Input::Received {
            from: leader_device,
            message: Message::Append {
                epoch: epoch(3, 1),
                prev: Lsn(0),
                prev_epoch: Epoch::default(),
                entries: forged,
                base: Lsn(4),
            },
        },
        2,
    );
    assert!(messages_to(&out, leader_device).is_empty());
    assert_eq!(follower.durable(), &before);
    assert_eq!(follower.take_behind(), Some(Lsn(8)));
}

#[test]
fn a_replica_restarted_on_a_log_compacted_past_its_barrier_still_leads() {
    let mut log = log_of(4);
    log.compact(Lsn(5));
    let durable = Durable {
        epoch: epoch(2, 1),
        voted: epoch(2, 1),
        log,
        offline: vec![id(99)],
        vote_floor: None,
    };
    let leader = Machine::new(config(1), durable, 0);
    assert_eq!(leader.role(), ElectionRole::Leader);
    assert_eq!(
        leader.durable().log.get(5),
        Some((epoch(2, 1), LogSlot::Change(id(99)))),
        "its pending change is sequenced after the base"
    );
}
