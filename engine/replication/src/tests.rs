//! Unit tests that drive one or two cores directly and assert the messages they emit.

use keel_schema::{ChangeId, DeviceId, Epoch, Lsn};
use uuid::Uuid;

use crate::machine::Machine;
use crate::types::{Input, Message, Output};
use crate::{Durable, ElectionRole, LogSlot, ReplicaConfig};

pub(crate) fn config(byte: u8) -> ReplicaConfig {
    ReplicaConfig {
        device: DeviceId([byte; 32]),
        election_timeout_ms: 100,
        heartbeat_ms: 10,
        segment_max: 100,
        segments_in_flight: 2,
    }
}

pub(crate) fn id(n: u128) -> ChangeId {
    ChangeId(Uuid::from_u128(n))
}

/// The founder's epoch in these tests (a device none of them is).
const FOUNDER: Epoch = Epoch {
    counter: 1,
    device: DeviceId([7; 32]),
};

/// A device's durable state right after it joined: the log's head (the founder's barrier),
/// as a snapshot gives it, and `epoch` and `voted`.
fn joined(epoch: Epoch, voted: Epoch) -> Durable {
    let mut log = crate::Log::default();
    log.push((FOUNDER, LogSlot::Barrier));
    Durable {
        epoch,
        voted,
        log,
        ..Durable::default()
    }
}

fn sent(outputs: &[Output]) -> Vec<&Message> {
    outputs
        .iter()
        .map(|Output::Send { message, .. }| message)
        .collect()
}

#[test]
fn a_follower_refuses_an_older_epoch_and_deposes_its_sender() {
    let old = Epoch {
        counter: 1,
        device: DeviceId([1; 32]),
    };
    let newer = Epoch {
        counter: 2,
        device: DeviceId([3; 32]),
    };
    let mut follower = Machine::new(
        config(2),
        Durable {
            epoch: newer,
            voted: newer,
            ..Durable::default()
        },
        0,
    );
    let out = follower.handle(
        Input::Received {
            from: old.device,
            message: Message::Append {
                epoch: old,
                prev: Lsn(0),
                prev_epoch: Epoch::default(),
                entries: vec![(old, LogSlot::Change(id(1)))],
                base: Lsn(0),
            },
        },
        1,
    );
    assert_eq!(sent(&out), vec![&Message::Stale { epoch: newer }]);
    assert!(
        follower.durable().log.is_empty(),
        "nothing from the stale epoch was stored"
    );

    let mut leader = Machine::founder(config(1), 0);
    assert_eq!(leader.role(), ElectionRole::Leader);
    leader.handle(
        Input::Received {
            from: newer.device,
            message: Message::Stale { epoch: newer },
        },
        2,
    );
    assert_ne!(leader.role(), ElectionRole::Leader);
}

#[test]
fn a_leader_sequences_pushed_changes_once() {
    let mut leader = Machine::founder(config(1), 0);
    let follower = DeviceId([2; 32]);
    leader.handle(Input::Connected(follower), 0);
    for _ in 0..2 {
        leader.handle(
            Input::Received {
                from: follower,
                message: Message::Push {
                    changes: vec![id(7), id(8)],
                },
            },
            1,
        );
    }
    let changes = leader
        .durable()
        .log
        .iter()
        .filter(|(_, e)| matches!(e, LogSlot::Change(_)))
        .count();
    assert_eq!(changes, 2);
}

#[test]
fn a_restarted_leader_still_sequences_a_change_it_holds_only_once() {
    // The journal keeps no change-id index: after a restart the core's own log (loaded from the
    // journal) is what makes a repeated push idempotent.
    let mut first = Machine::founder(config(1), 0);
    let follower = DeviceId([2; 32]);
    first.handle(Input::Connected(follower), 0);
    let push = Message::Push {
        changes: vec![id(7), id(8)],
    };
    first.handle(
        Input::Received {
            from: follower,
            message: push,
        },
        1,
    );
    let durable = first.durable().clone();
    let mut restarted = Machine::new(config(1), durable, 2);
    assert_eq!(restarted.role(), ElectionRole::Leader);
    restarted.handle(Input::Connected(follower), 3);
    restarted.handle(
        Input::Received {
            from: follower,
            message: Message::Push {
                changes: vec![id(8), id(9)],
            },
        },
        4,
    );
    let changes: Vec<ChangeId> = restarted
        .durable()
        .log
        .iter()
        .filter_map(|(_, e)| match e {
            LogSlot::Change(c) => Some(c),
            LogSlot::Barrier => None,
        })
        .collect();
    assert_eq!(changes, vec![id(7), id(8), id(9)]);
}

#[test]
fn truncated_changes_return_to_pending() {
    let a = Epoch {
        counter: 2,
        device: DeviceId([1; 32]),
    };
    let b = Epoch {
        counter: 3,
        device: DeviceId([3; 32]),
    };
    let base = Epoch {
        counter: 1,
        device: DeviceId([1; 32]),
    };
    // A deposed leader's log: a common prefix, then its own epoch-2 suffix.
    let durable = Durable {
        epoch: a,
        voted: a,
        log: vec![
            (base, LogSlot::Barrier),
            (a, LogSlot::Barrier),
            (a, LogSlot::Change(id(5))),
        ]
        .into(),
        offline: Vec::new(),
        vote_floor: None,
    };
    let mut node = Machine::new(config(1), durable, 0);
    let out = node.handle(
        Input::Received {
            from: b.device,
            message: Message::Append {
                epoch: b,
                prev: Lsn(1),
                prev_epoch: base,
                entries: vec![(b, LogSlot::Barrier)],
                base: Lsn(0),
            },
        },
        1,
    );
    assert_eq!(node.role(), ElectionRole::Follower);
    assert_eq!(
        node.durable().log,
        vec![(base, LogSlot::Barrier), (b, LogSlot::Barrier)].into()
    );
    assert_eq!(
        node.durable().offline,
        vec![id(5)],
        "the truncated change is resubmitted"
    );
    assert_eq!(
        sent(&out),
        vec![&Message::AppendReply {
            epoch: b,
            ok: true,
            last: Lsn(2)
        }]
    );
    // Committing now goes to pending and is pushed to the known leader.
    node.handle(Input::Connected(b.device), 2);
    let out = node.handle(Input::Commit(id(6)), 3);
    assert_eq!(
        sent(&out),
        vec![&Message::Push {
            changes: vec![id(6)]
        }]
    );
}

#[test]
fn a_heartbeat_or_a_resent_segment_keeps_the_entries_past_it() {
    // The leader leads epoch 2; its log holds epoch-1 entries it wrote before. The follower has
    // received 1..=6 (pipelined segments) but acknowledged only up to 3 when a heartbeat at 3 and
    // then the segment 2..=3 again arrive: nothing it holds may be truncated.
    let old = Epoch {
        counter: 1,
        device: DeviceId([2; 32]),
    };
    let leader = Epoch {
        counter: 2,
        device: DeviceId([2; 32]),
    };
    let log: Vec<(Epoch, LogSlot)> = (1..=6).map(|i| (old, LogSlot::Change(id(i)))).collect();
    let durable = Durable {
        epoch: leader,
        voted: leader,
        log: log.clone().into(),
        offline: Vec::new(),
        vote_floor: None,
    };
    let mut node = Machine::new(config(1), durable, 0);
    for (prev, entries) in [
        (3, vec![]),
        (
            1,
            vec![(old, LogSlot::Change(id(2))), (old, LogSlot::Change(id(3)))],
        ),
    ] {
        let out = node.handle(
            Input::Received {
                from: leader.device,
                message: Message::Append {
                    epoch: leader,
                    prev: Lsn(prev),
                    prev_epoch: old,
                    entries,
                    base: Lsn(0),
                },
            },
            1,
        );
        assert_eq!(node.durable().log, log.clone().into(), "after prev {prev}");
        assert!(node.durable().offline.is_empty());
        assert!(node.take_ops().is_empty(), "no truncation, no append");
        assert!(matches!(
            sent(&out).as_slice(),
            [Message::AppendReply { ok: true, .. }]
        ));
    }
}

#[test]
fn a_lone_device_keeps_committing_and_never_elects_itself() {
    let mut node = Machine::new(config(4), Durable::default(), 0);
    for t in 0..50 {
        node.handle(Input::Commit(id(t)), t as u64 * 10);
        assert!(node.handle(Input::Tick, t as u64 * 10).is_empty());
    }
    assert_eq!(node.role(), ElectionRole::Alone);
    assert_eq!(node.durable().offline.len(), 50);
    assert_eq!(
        node.durable().epoch,
        Epoch::default(),
        "no epoch inflation while alone"
    );
}

#[test]
fn the_compact_log_keeps_epochs_as_runs_and_truncates_them() {
    use super::Log;
    let e = |c: u64| Epoch {
        counter: c,
        device: DeviceId([c as u8; 32]),
    };
    let items = vec![
        (e(1), LogSlot::Barrier),
        (e(1), LogSlot::Change(id(1))),
        (e(2), LogSlot::Barrier),
        (e(2), LogSlot::Change(id(2))),
        (e(3), LogSlot::Barrier),
    ];
    let mut log = Log::from(items.clone());
    assert_eq!(log.to_vec(), items);
    assert_eq!(log.get(3), Some((e(2), LogSlot::Change(id(2)))));
    assert_eq!(log.split_off(3), items[3..].to_vec());
    assert_eq!(log, Log::from(items[..3].to_vec()), "runs stay canonical");
    log.truncate(1);
    log.push((e(2), LogSlot::Barrier));
    assert_eq!(log.to_vec(), vec![items[0], (e(2), LogSlot::Barrier)]);
    assert_eq!(log.last(), Some((e(2), LogSlot::Barrier)));
}

/// The `(prev, entry count)` of each `Append` in `outputs`.
fn appends(outputs: &[Output]) -> Vec<(u64, usize)> {
    sent(outputs)
        .into_iter()
        .filter_map(|m| match m {
            Message::Append { prev, entries, .. } => Some((prev.0, entries.len())),
            _ => None,
        })
        .collect()
}

#[test]
fn a_leader_keeps_segments_in_flight_and_resends_only_after_silence() {
    let peer = DeviceId([2; 32]);
    let mut leader = Machine::founder(config(1), 0);
    for n in 0..450 {
        leader.handle(Input::Commit(id(n + 1)), 0);
    }
    let epoch = leader.durable().epoch;
    leader.handle(Input::Connected(peer), 0);
    // The follower answers the opening probe: it has nothing.
    let reply = |ok: bool, last: u64| Input::Received {
        from: peer,
        message: Message::AppendReply {
            epoch,
            ok,
            last: Lsn(last),
        },
    };
    let out = leader.handle(reply(false, 0), 1);
    assert_eq!(
        appends(&out),
        vec![(0, 100), (100, 100)],
        "two segments go out without waiting (segments_in_flight = 2)"
    );
    // A heartbeat before the election timeout does not send them again.
    let out = leader.handle(Input::Tick, 20);
    assert_eq!(appends(&out), vec![(0, 0)], "only an empty heartbeat");
    // The first is acknowledged: the window moves by one segment.
    let out = leader.handle(reply(true, 100), 30);
    assert_eq!(appends(&out), vec![(200, 100)]);
    // A refusal of a segment sent after one still in flight changes nothing.
    let out = leader.handle(reply(false, 100), 31);
    assert!(appends(&out).is_empty(), "{out:?}");
    // Silence for an election timeout: what is in flight is sent again.
    let out = leader.handle(Input::Tick, 200);
    assert_eq!(appends(&out), vec![(100, 100), (200, 100)]);
}

#[test]
fn a_refusal_at_the_acknowledged_position_moves_the_leader_back() {
    let peer = DeviceId([2; 32]);
    let mut leader = Machine::founder(config(1), 0);
    for n in 0..50 {
        leader.handle(Input::Commit(id(n + 1)), 0);
    }
    let epoch = leader.durable().epoch;
    let last = leader.durable().last_lsn().0;
    let out = leader.handle(Input::Connected(peer), 0);
    assert_eq!(
        appends(&out),
        vec![(last - 1, 1)],
        "an optimistic probe at the end"
    );
    let out = leader.handle(
        Input::Received {
            from: peer,
            message: Message::AppendReply {
                epoch,
                ok: false,
                last: Lsn(20),
            },
        },
        1,
    );
    assert_eq!(
        appends(&out),
        vec![(20, (last - 20) as usize)],
        "resent from the follower's end"
    );
}

/// Hands every message in `outputs` addressed to `to` over to it; returns what it sends back.
fn deliver(from: DeviceId, outputs: &[Output], to: &mut Machine, now: u64) -> Vec<Output> {
    let mut back = Vec::new();
    for Output::Send { to: dest, message } in outputs {
        if *dest == to.device() {
            back.extend(to.handle(
                Input::Received {
                    from,
                    message: message.clone(),
                },
                now,
            ));
        }
    }
    back
}

#[test]
fn a_follower_that_cannot_hear_a_live_leader_does_not_depose_it() {
    let mut leader = Machine::founder(config(1), 0);
    let mut follower = Machine::new(config(2), Durable::default(), 0);
    let (l, f) = (leader.device(), follower.device());
    follower.handle(Input::Connected(l), 0);
    let beat = leader.handle(Input::Connected(f), 0);
    deliver(l, &beat, &mut follower, 1);
    assert_eq!(follower.leader(), Some(l));
    let epoch = leader.durable().epoch;

    // The follower hears nothing for long (busy, or its leader's messages are lost): it asks
    // before standing, and bumps no epoch.
    let out = follower.handle(Input::Tick, 1_000);
    assert!(
        matches!(sent(&out).as_slice(), [Message::PreVote { .. }]),
        "a pre-vote, not a vote request: {out:?}"
    );
    assert_eq!(follower.durable().epoch, epoch);
    assert_ne!(follower.role(), ElectionRole::Candidate);

    // The live leader refuses; nobody's epoch moves and the leader keeps leading.
    let reply = deliver(f, &out, &mut leader, 1_000);
    assert!(matches!(
        sent(&reply).as_slice(),
        [Message::PreVoteReply { granted: false, .. }]
    ));
    deliver(l, &reply, &mut follower, 1_001);
    assert_eq!(leader.role(), ElectionRole::Leader);
    assert_eq!(leader.durable().epoch, epoch);
    assert_eq!(follower.durable().epoch, epoch);
    assert_ne!(follower.role(), ElectionRole::Candidate);
}

/// A founder leading followers `b` and `c` (connected to each other), whom it reached at time 1.
fn leader_and_two_followers() -> (Machine, Machine, Machine) {
    let mut leader = Machine::founder(config(1), 0);
    let mut b = Machine::new(config(2), Durable::default(), 0);
    let mut c = Machine::new(config(3), Durable::default(), 0);
    let (l, bd, cd) = (leader.device(), b.device(), c.device());
    for (node, peers) in [(&mut b, [l, cd]), (&mut c, [l, bd])] {
        for p in peers {
            node.handle(Input::Connected(p), 0);
        }
    }
    let mut beat = leader.handle(Input::Connected(bd), 0);
    beat.extend(leader.handle(Input::Connected(cd), 0));
    deliver(l, &beat, &mut b, 1);
    deliver(l, &beat, &mut c, 1);
    (leader, b, c)
}

#[test]
fn followers_elect_a_new_leader_once_the_old_one_is_silent() {
    let (leader, mut b, mut c) = leader_and_two_followers();
    let (bd, cd) = (b.device(), c.device());

    // While c still hears the leader, b's pre-vote is refused by both.
    let ask = b.handle(Input::Tick, 400);
    let from_c = deliver(bd, &ask, &mut c, 50);
    assert!(matches!(
        sent(&from_c).as_slice(),
        [Message::PreVoteReply { granted: false, .. }]
    ));

    // The leader is gone (silent): c grants, b stands, c votes, b leads a new epoch.
    let ask = b.handle(Input::Tick, 1_000);
    let from_c = deliver(bd, &ask, &mut c, 1_000);
    assert!(matches!(
        sent(&from_c).as_slice(),
        [Message::PreVoteReply { granted: true, .. }]
    ));
    let request = deliver(cd, &from_c, &mut b, 1_000);
    assert!(
        sent(&request)
            .iter()
            .any(|m| matches!(m, Message::RequestVote { .. })),
        "a majority would vote: b stands"
    );
    let vote = deliver(bd, &request, &mut c, 1_001);
    deliver(cd, &vote, &mut b, 1_002);
    assert_eq!(b.role(), ElectionRole::Leader);
    assert!(b.durable().epoch > leader.durable().epoch);
}

#[test]
fn a_refused_pre_vote_teaches_the_higher_epoch_so_the_next_one_can_win() {
    // r voted in epoch 5 for a candidate that never won; p only knows epoch 1.
    let voted = Epoch {
        counter: 5,
        device: DeviceId([9; 32]),
    };
    let mut p = Machine::new(config(1), joined(FOUNDER, Epoch::default()), 0);
    let mut r = Machine::new(config(2), joined(voted, voted), 0);
    let (pd, rd) = (p.device(), r.device());
    p.handle(Input::Connected(rd), 0);
    r.handle(Input::Connected(pd), 0);

    let ask = p.handle(Input::Tick, 1_000);
    let refused = deliver(pd, &ask, &mut r, 1_000);
    assert!(matches!(
        sent(&refused).as_slice(),
        [Message::PreVoteReply { granted: false, highest, .. }] if *highest == voted
    ));
    deliver(rd, &refused, &mut p, 1_000);
    assert_eq!(p.durable().epoch, FOUNDER, "a refusal bumps nothing");

    // The next pre-vote proposes above epoch 5 and is granted; p stands and wins.
    let ask = p.handle(Input::Tick, 3_000);
    assert!(matches!(
        sent(&ask).as_slice(),
        [Message::PreVote { epoch, .. }] if epoch.counter == 6
    ));
    let granted = deliver(pd, &ask, &mut r, 3_000);
    let request = deliver(rd, &granted, &mut p, 3_000);
    let vote = deliver(pd, &request, &mut r, 3_000);
    deliver(rd, &vote, &mut p, 3_001);
    assert_eq!(p.role(), ElectionRole::Leader);
    assert_eq!(p.durable().epoch.counter, 6);
}

/// The answer of the one `PreVoteReply` in `outputs`, if that is all they hold.
fn pre_vote_granted(outputs: &[Output]) -> Option<bool> {
    match sent(outputs).as_slice() {
        [Message::PreVoteReply { granted, .. }] => Some(*granted),
        _ => None,
    }
}

#[test]
fn two_followers_whose_timers_run_out_together_do_not_split_the_vote() {
    let (leader, mut b, mut c) = leader_and_two_followers();
    let (bd, cd) = (b.device(), c.device());

    // The leader goes silent and both timers run out in the same tick: each asks the other.
    let ask_b = b.handle(Input::Tick, 1_000);
    let ask_c = c.handle(Input::Tick, 1_000);
    let from_c = deliver(bd, &ask_b, &mut c, 1_000);
    let from_b = deliver(cd, &ask_c, &mut b, 1_000);
    // Same logs: the higher device id (c) is granted, b is refused.
    assert_eq!(pre_vote_granted(&from_b), Some(true));
    assert_eq!(pre_vote_granted(&from_c), Some(false));
    let not_standing = deliver(cd, &from_c, &mut b, 1_001);
    assert!(sent(&not_standing).is_empty(), "b does not stand");
    let request = deliver(bd, &from_b, &mut c, 1_001);
    assert_eq!(c.role(), ElectionRole::Candidate);
    let vote = deliver(cd, &request, &mut b, 1_002);
    assert!(matches!(
        sent(&vote).as_slice(),
        [Message::Vote { granted: true, .. }]
    ));
    deliver(bd, &vote, &mut c, 1_002);
    assert_eq!(c.role(), ElectionRole::Leader, "elected in the first round");
    assert!(c.durable().epoch > leader.durable().epoch);
}

#[test]
fn a_device_asking_for_votes_still_grants_one_with_a_longer_log() {
    let mut b = Machine::new(config(2), joined(FOUNDER, Epoch::default()), 0);
    let mut c = Machine::new(config(3), joined(FOUNDER, Epoch::default()), 0);
    let (bd, cd) = (b.device(), c.device());
    b.handle(Input::Connected(cd), 0);
    c.handle(Input::Connected(bd), 0);
    // b holds one entry more than c: c asks first, then b asks while c's pre-vote is open.
    let epoch = FOUNDER;
    let append = Message::Append {
        epoch,
        prev: Lsn(1),
        prev_epoch: FOUNDER,
        entries: vec![(epoch, LogSlot::Change(id(1)))],
        base: Lsn(0),
    };
    b.handle(
        Input::Received {
            from: epoch.device,
            message: append,
        },
        0,
    );
    assert!(b.durable().last() > c.durable().last());
    let ask_c = c.handle(Input::Tick, 1_000);
    let ask_b = b.handle(Input::Tick, 1_000);
    let from_b = deliver(cd, &ask_c, &mut b, 1_000);
    let from_c = deliver(bd, &ask_b, &mut c, 1_000);
    assert_eq!(pre_vote_granted(&from_c), Some(true));
    assert_eq!(pre_vote_granted(&from_b), Some(false));
}

#[test]
fn poll_timeout_is_the_next_time_a_tick_does_something() {
    // A lone device: nothing to do before its election timeout (100 ms plus jitter below 100).
    let mut alone = Machine::new(config(2), Durable::default(), 0);
    let deadline = alone.poll_timeout();
    assert!((100..200).contains(&deadline), "deadline {deadline}");
    assert!(sent(&alone.handle(Input::Tick, deadline - 1)).is_empty());
    assert_eq!(
        alone.poll_timeout(),
        deadline,
        "a tick before it changes nothing"
    );

    // A leader: its next heartbeat (10 ms after the last send).
    let mut leader = Machine::founder(config(1), 0);
    leader.handle(Input::Connected(DeviceId([2; 32])), 0);
    leader.handle(Input::Tick, 10);
    assert_eq!(leader.poll_timeout(), 20);
    let beat = leader.handle(Input::Tick, 20);
    assert!(!sent(&beat).is_empty(), "the heartbeat is due then");
    assert_eq!(leader.poll_timeout(), 30);
}

/// Issue 28: a follower pushes each pending change once, not on every heartbeat; again only
/// after `PUSH_RESEND_BEATS` heartbeats without it coming back in the log (a lost message), and
/// at once after the link to the leader was lost and is back.
#[test]
fn a_follower_pushes_each_change_once_until_it_may_have_been_lost() {
    let leader = FOUNDER.device;
    let mut follower = Machine::new(config(2), joined(FOUNDER, FOUNDER), 0);
    let heartbeat = |follower: &mut Machine, now: u64| {
        follower.handle(
            Input::Received {
                from: leader,
                message: Message::Append {
                    epoch: FOUNDER,
                    prev: Lsn(1),
                    prev_epoch: FOUNDER,
                    entries: Vec::new(),
                    base: Lsn(0),
                },
            },
            now,
        );
    };
    heartbeat(&mut follower, 0);
    follower.handle(Input::Connected(leader), 0);
    let pushed = |out: &[Output]| -> Vec<ChangeId> {
        sent(out)
            .into_iter()
            .filter_map(|m| match m {
                Message::Push { changes } => Some(changes.clone()),
                _ => None,
            })
            .flatten()
            .collect()
    };
    let mut first = Vec::new();
    for n in 1..=3 {
        first.extend(pushed(&follower.handle(Input::Commit(id(n)), 1)));
    }
    assert_eq!(
        first,
        vec![id(1), id(2), id(3)],
        "each pushed as it is committed"
    );
    let beat = config(2).heartbeat_ms;
    let resend = beat * crate::machine::PUSH_RESEND_BEATS;
    let mut now = 1;
    let mut again = Vec::new();
    while now + beat < 1 + resend {
        now += beat;
        heartbeat(&mut follower, now);
        again.extend(pushed(&follower.handle(Input::Tick, now)));
    }
    assert!(
        again.is_empty(),
        "pushed again within the resend time: {again:?}"
    );
    now = 1 + resend;
    heartbeat(&mut follower, now);
    let resent = pushed(&follower.handle(Input::Tick, now));
    assert_eq!(
        resent,
        vec![id(1), id(2), id(3)],
        "not back in the log: maybe lost"
    );
    // The link drops and comes back: everything pending goes again at the next beat.
    follower.handle(Input::Disconnected(leader), now + 1);
    heartbeat(&mut follower, now + 2);
    follower.handle(Input::Connected(leader), now + 2);
    now += 2 + beat;
    heartbeat(&mut follower, now);
    let after_reconnect = pushed(&follower.handle(Input::Tick, now));
    assert_eq!(after_reconnect, vec![id(1), id(2), id(3)]);
}

/// A leader whose log is found damaged abdicates: it stops leading, fenced by a new epoch of
/// its own that it never won, so that a restart from its durable state does not lead the old
/// epoch again. With its log cut before the damage, it cannot win a vote from the followers
/// holding more; one of them leads, and the cut device follows it.
#[test]
fn a_leader_with_a_damaged_log_abdicates_and_its_cut_log_never_wins() {
    let (mut a, mut b, mut c) = leader_and_two_followers();
    let (ad, bd, cd) = (a.device(), b.device(), c.device());
    let old = a.durable().epoch;
    let out = a.handle(Input::Commit(id(1)), 2);
    let from_b = deliver(ad, &out, &mut b, 3);
    let from_c = deliver(ad, &out, &mut c, 3);
    deliver(bd, &from_b, &mut a, 4);
    deliver(cd, &from_c, &mut a, 4);
    assert_eq!(b.durable().last(), a.durable().last());
    assert_eq!(c.durable().last(), a.durable().last());

    // A follower's abdication changes nothing.
    b.handle(Input::Abdicate, 5);
    assert_eq!((b.role(), b.durable().epoch), (ElectionRole::Follower, old));

    // Both followers acknowledged everything: the floor is the whole log.
    let floor = a.floor_for_cut();
    assert_eq!(floor, a.durable().last());
    a.handle(Input::Abdicate, 5);
    assert_ne!(a.role(), ElectionRole::Leader);
    assert_eq!(a.leader(), None);
    let fence = a.durable().epoch;
    assert!(fence > old && fence.device == ad && a.durable().voted == fence);
    // Restarted from what is durable, it does not lead: it never won `fence`.
    assert_ne!(
        Machine::new(config(1), a.durable().clone(), 6).role(),
        ElectionRole::Leader
    );

    // Its log cut before the damaged entry, with its floor: it does not even ask for votes.
    let mut cut = a.durable().clone();
    cut.log.truncate(cut.log.len() - 1);
    cut.vote_floor = Some(floor);
    let mut a = Machine::new(config(1), cut.clone(), 6);
    for peer in [bd, cd] {
        a.handle(Input::Connected(peer), 6);
    }
    let ask = a.handle(Input::Tick, 2_000);
    assert!(sent(&ask).is_empty(), "{ask:?}");
    // Without the floor it would ask, and be refused by both (their logs are longer).
    let mut unfloored = Machine::new(
        config(1),
        Durable {
            vote_floor: None,
            ..cut
        },
        6,
    );
    for peer in [bd, cd] {
        unfloored.handle(Input::Connected(peer), 6);
    }
    let ask = unfloored.handle(Input::Tick, 2_000);
    for node in [&mut b, &mut c] {
        let reply = deliver(ad, &ask, node, 2_000);
        assert_eq!(
            pre_vote_granted(&reply),
            Some(false),
            "a cut log wins no vote"
        );
    }
    assert_ne!(a.role(), ElectionRole::Leader);

    // b asks: c grants, b stands and wins a newer epoch than the fence, and a follows it.
    let ask = b.handle(Input::Tick, 3_000);
    let from_c = deliver(bd, &ask, &mut c, 3_000);
    assert_eq!(pre_vote_granted(&from_c), Some(true));
    let request = deliver(cd, &from_c, &mut b, 3_001);
    let vote = deliver(bd, &request, &mut c, 3_002);
    let beats = deliver(cd, &vote, &mut b, 3_003);
    assert_eq!(b.role(), ElectionRole::Leader);
    assert!(
        b.durable().epoch > fence,
        "{:?} {fence:?}",
        b.durable().epoch
    );
    deliver(bd, &beats, &mut a, 3_004);
    assert_eq!(a.leader(), Some(bd));
}

/// A device that cut its log votes as if it still held what it vouched for: a candidate
/// whose log is shorter than its floor (but longer than its cut log) gets no vote, one that
/// reaches the floor does.
/// A paired peer that misbehaves names epoch 1 of this device's in a message: epoch 1 is the
/// founder's, made only by founding, and a replica holding it as its own resumes leading at
/// its next start, beside the real founder (found by the `replica` fuzz target).
#[test]
fn a_peer_cannot_hand_a_replica_the_founders_epoch_of_its_own() {
    let me = DeviceId([9; 32]);
    let peer = DeviceId([2; 32]);
    let own = |counter| Epoch {
        counter,
        device: me,
    };
    let forged = [
        Message::Stale { epoch: own(1) },
        Message::AppendReply {
            epoch: own(1),
            ok: true,
            last: Lsn(1),
        },
        Message::RequestVote {
            epoch: own(1),
            last: (FOUNDER, Lsn(1)),
        },
        Message::Append {
            epoch: own(3),
            prev: Lsn(1),
            prev_epoch: FOUNDER,
            entries: vec![],
            base: Lsn(0),
        },
    ];
    for message in forged {
        let mut victim = Machine::new(config(9), joined(FOUNDER, Epoch::default()), 0);
        victim.handle(Input::Connected(peer), 0);
        let what = format!("{message:?}");
        victim.handle(
            Input::Received {
                from: peer,
                message,
            },
            10,
        );
        assert_ne!(
            victim.durable().epoch,
            own(1),
            "took epoch 1 of its own from {what}"
        );
        let restarted = Machine::new(config(9), victim.durable().clone(), 20);
        assert_ne!(restarted.role(), ElectionRole::Leader, "leads after {what}");
    }
}

/// A leader's epoch is its own: an `Append` or `Compacted` from `peer` naming another device's
/// epoch is forged, and is not followed.
#[test]
fn an_append_in_an_epoch_of_another_device_is_not_followed() {
    let peer = DeviceId([2; 32]);
    let other = Epoch {
        counter: 3,
        device: DeviceId([5; 32]),
    };
    let mut follower = Machine::new(config(1), joined(FOUNDER, Epoch::default()), 0);
    follower.handle(Input::Connected(peer), 0);
    follower.handle(
        Input::Received {
            from: peer,
            message: Message::Append {
                epoch: other,
                prev: Lsn(1),
                prev_epoch: FOUNDER,
                entries: vec![(other, LogSlot::Barrier)],
                base: Lsn(0),
            },
        },
        10,
    );
    assert_eq!(follower.durable().epoch, FOUNDER);
    assert_eq!(follower.durable().last_lsn(), Lsn(1), "nothing stored");
    assert_eq!(follower.leader(), None);
}

#[test]
fn a_log_not_read_back_since_the_start_does_not_stand_until_checked() {
    let stands = |outputs: &[Output]| {
        sent(outputs)
            .iter()
            .any(|m| matches!(m, Message::PreVote { .. } | Message::RequestVote { .. }))
    };
    let mut held = Machine::new(config(1), joined(FOUNDER, Epoch::default()), 0);
    held.hold_until_checked(Lsn(1));
    held.handle(Input::Connected(DeviceId([2; 32])), 0);
    // Election timeouts pass with no leader: a held replica asks nobody.
    for now in (100..2_000).step_by(50) {
        assert!(
            !stands(&held.handle(Input::Tick, now)),
            "stood at {now} ms unchecked"
        );
    }
    assert!(held.is_unchecked());
    // A check short of the end found at the start does not release it.
    held.log_checked(Lsn(0));
    assert!(held.is_unchecked());
    // Held while a pre-vote of its own was out: a majority granting it afterwards does not
    // make it stand.
    let mut late = Machine::new(config(1), joined(FOUNDER, Epoch::default()), 0);
    let peer = DeviceId([2; 32]);
    late.handle(Input::Connected(peer), 0);
    let asked = (100..2_000)
        .step_by(50)
        .find_map(|now| {
            sent(&late.handle(Input::Tick, now))
                .into_iter()
                .find_map(|m| match m {
                    Message::PreVote { epoch, .. } => Some((*epoch, now)),
                    _ => None,
                })
        })
        .expect("an unheld replica asks for pre-votes");
    late.hold_until_checked(Lsn(1));
    let granted = late.handle(
        Input::Received {
            from: peer,
            message: Message::PreVoteReply {
                epoch: asked.0,
                granted: true,
                highest: FOUNDER,
            },
        },
        asked.1 + 1,
    );
    assert!(
        !stands(&granted),
        "stood on a pre-vote granted after the hold"
    );
    // Still a voter meanwhile: it grants a pre-vote to a log as up to date as its own.
    let ask = Input::Received {
        from: DeviceId([2; 32]),
        message: Message::PreVote {
            epoch: Epoch {
                counter: 2,
                device: DeviceId([2; 32]),
            },
            last: (FOUNDER, Lsn(1)),
        },
    };
    assert_eq!(pre_vote_granted(&held.handle(ask, 2_000)), Some(true));
    // Checked through the end: it stands at its next timeout.
    held.log_checked(Lsn(1));
    assert!(!held.is_unchecked());
    let stood = (2_000..4_000)
        .step_by(50)
        .any(|now| stands(&held.handle(Input::Tick, now)));
    assert!(stood, "a checked log stands again");
}

#[test]
fn a_cut_log_votes_only_for_logs_reaching_its_floor() {
    let epoch = FOUNDER;
    let mut cut = joined(epoch, Epoch::default());
    cut.vote_floor = Some((epoch, Lsn(5)));
    let mut voter = Machine::new(config(1), cut, 0);
    let ask = |counter: u64, last: u64, device: u8| Input::Received {
        from: DeviceId([device; 32]),
        message: Message::PreVote {
            epoch: Epoch {
                counter,
                device: DeviceId([device; 32]),
            },
            last: (epoch, Lsn(last)),
        },
    };
    for peer in [2, 3] {
        voter.handle(Input::Connected(DeviceId([peer; 32])), 0);
    }
    let short = voter.handle(ask(2, 4, 2), 1_000);
    assert_eq!(pre_vote_granted(&short), Some(false), "short of the floor");
    let reaching = voter.handle(ask(2, 5, 3), 1_000);
    assert_eq!(pre_vote_granted(&reaching), Some(true), "at the floor");

    // Forgotten by the operator (`keel vote-floor --forget`, when every device that held the
    // entries past the cut lost them): the short log gets the vote again.
    let mut forgotten = Machine::new(config(1), joined(epoch, Epoch::default()), 0);
    forgotten.handle(Input::Connected(DeviceId([2; 32])), 0);
    let short = forgotten.handle(ask(2, 4, 2), 1_000);
    assert_eq!(pre_vote_granted(&short), Some(true), "no floor");
}
