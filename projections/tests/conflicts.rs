//! Conflicts (issue 27): found in the log, in log order, from each change's causal context, so
//! the conflicts a device records do not depend on how the log reached it (in what batches) nor
//! on which of its own changes it applied early, before their log copies came.

use keel_projections::Projections;
use keel_schema::{Change, ChangeId, DeviceId, Hlc, Op, Tag, Value};
use proptest::prelude::*;
use uuid::Uuid;

const TAG: Uuid = Uuid::from_u128(0x7a6);

/// One write of a history: its device (0..3), its value (of a few, so that some are equal), how
/// far behind the log its writer was (0: it had seen every earlier entry) and its clock.
#[derive(Clone, Debug)]
struct Write {
    device: u8,
    value: u8,
    behind: u8,
    ms: u64,
}

fn device(n: u8) -> DeviceId {
    DeviceId([n + 1; 32])
}

/// The log of `writes`: a tag created at position 1, then each write renaming it.
fn log_of(writes: &[Write]) -> Vec<Change> {
    let tag = Tag {
        uuid: TAG,
        name: "start".into(),
        color: None,
        created_ms: 1,
    };
    let first = Hlc {
        physical_ms: 1,
        counter: 0,
        device: device(0),
    };
    let mut log = vec![Change::upsert(ChangeId::new(), first, &tag).expect("a tag")];
    let name = keel_schema::model_by_code(log[0].model)
        .and_then(|d| d.field_index("name"))
        .and_then(|i| u8::try_from(i).ok())
        .expect("name");
    // A device's context only grows: it never writes having seen less than before (a write
    // carried by a merge does; the rule test covers it).
    let mut seen_by = [0u64; 256];
    for (i, w) in writes.iter().enumerate() {
        let position = i as u64 + 2;
        let seen = &mut seen_by[usize::from(w.device)];
        *seen = (*seen).max((position - 1).saturating_sub(u64::from(w.behind)));
        let hlc = Hlc {
            physical_ms: w.ms,
            counter: i as u32,
            device: device(w.device),
        };
        log.push(Change {
            op: Op::Upsert(vec![(name, Value::Text(format!("name {}", w.value)))]),
            seen: *seen,
            ..Change::upsert(ChangeId::new(), hlc, &tag).expect("a tag")
        });
    }
    log
}

fn applied(batches: &[Vec<(Change, Option<u64>)>]) -> Vec<keel_projections::Conflict> {
    applied_with_digest(batches).0
}

/// The conflicts and the digest of a projection `batches` were applied to.
fn applied_with_digest(
    batches: &[Vec<(Change, Option<u64>)>],
) -> (Vec<keel_projections::Conflict>, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut p = Projections::open(&dir.path().join("p.sqlite")).expect("opens");
    for batch in batches {
        let changes: Vec<Change> = batch.iter().map(|(c, _)| c.clone()).collect();
        let logged: Vec<Option<u64>> = batch.iter().map(|(_, p)| *p).collect();
        p.apply_logged(&changes, &logged, None).expect("applies");
    }
    let conflicts = p.query().conflicts().expect("lists");
    (conflicts, p.query().digest().expect("digest"))
}

/// A policy record for tags, written first in the log.
fn tag_policy(strategy: &str, device: Option<DeviceId>) -> Change {
    let record = keel_schema::ConflictPolicy {
        uuid: keel_schema::conflict_policy_uuid("tag"),
        model: "tag".into(),
        strategy: strategy.into(),
        device: device.map(|d| d.to_hex()),
    };
    let hlc = Hlc {
        physical_ms: 1,
        counter: 0,
        device: DeviceId([9; 32]),
    };
    Change::upsert(ChangeId::new(), hlc, &record).expect("a policy")
}

fn writes() -> impl Strategy<Value = Vec<Write>> {
    proptest::collection::vec(
        (0u8..3, 0u8..3, 0u8..4, 1u64..50).prop_map(|(device, value, behind, ms)| Write {
            device,
            value,
            behind,
            ms,
        }),
        1..24,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// The same log, in one batch, in random batches, and after a device applied its own
    /// changes early (without positions): the same conflicts, with the same ids and winners.
    #[test]
    fn the_conflicts_are_a_function_of_the_log(
        writes in writes(),
        cuts in proptest::collection::vec(1usize..6, 1..8),
        early_device in 0u8..3,
        strategy in 0u8..4,
    ) {
        let mut log = log_of(&writes);
        // Under every strategy (the last: none set), the rows too are the same.
        let policy = match strategy {
            0 => Some(tag_policy("latest-wins", None)),
            1 => Some(tag_policy("prefer-device", Some(device(early_device)))),
            2 => Some(tag_policy("manual", None)),
            _ => None,
        };
        if let Some(policy) = policy {
            for change in &mut log {
                change.seen += 1;
            }
            log.insert(0, policy);
        }
        let placed: Vec<(Change, Option<u64>)> = log
            .iter()
            .enumerate()
            .map(|(i, c)| (c.clone(), Some(i as u64 + 1)))
            .collect();
        let (whole, digest) = applied_with_digest(std::slice::from_ref(&placed));
        let mut batches = Vec::new();
        let mut rest = placed.as_slice();
        for cut in cuts.iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let (batch, tail) = rest.split_at((*cut).min(rest.len()));
            batches.push(batch.to_vec());
            rest = tail;
        }
        prop_assert_eq!(&applied_with_digest(&batches), &(whole.clone(), digest.clone()));
        // One device's own changes first, as it applies them before their log copies come.
        let first_writes = if strategy < 3 { 2 } else { 1 };
        let own: Vec<(Change, Option<u64>)> = placed
            .iter()
            .skip(first_writes)
            .filter(|(c, _)| c.hlc.device == device(early_device))
            .map(|(c, _)| (c.clone(), None))
            .collect();
        let early =
            applied_with_digest(&[placed[..first_writes].to_vec(), own, placed.clone()]);
        prop_assert_eq!(&early, &(whole.clone(), digest));
        // Each conflict is between two devices, neither of which saw the other's write.
        for conflict in &whole {
            prop_assert_ne!(conflict.sides[0].device, conflict.sides[1].device);
            prop_assert_ne!(&conflict.sides[0].value, &conflict.sides[1].value);
        }
    }
}

/// The rule, case by case: another device's write not seen is a conflict; a write that saw it,
/// the same device again (unless it had seen less than before), or the same value, is not.
#[test]
fn a_conflict_needs_another_device_an_unseen_write_and_another_value() {
    let w = |device, value, behind, ms| Write {
        device,
        value,
        behind,
        ms,
    };
    let conflicts = |writes: &[Write]| {
        let placed: Vec<(Change, Option<u64>)> = log_of(writes)
            .into_iter()
            .enumerate()
            .map(|(i, c)| (c, Some(i as u64 + 1)))
            .collect();
        applied(&[placed])
    };
    // Position 2 by device 1, then position 3 by device 2 that had not seen it.
    let found = conflicts(&[w(1, 1, 0, 10), w(2, 2, 1, 5)]);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].field, "name");
    assert_eq!(
        found[0].winner, 0,
        "the later clock wins: the first write's"
    );
    assert_eq!(found[0].position, 3);
    assert!(
        conflicts(&[w(1, 1, 0, 10), w(2, 2, 0, 5)]).is_empty(),
        "seen"
    );
    assert!(
        conflicts(&[w(1, 1, 0, 10), w(1, 2, 1, 5)]).is_empty(),
        "same device"
    );
    // The same device, with less of the log seen than its write before (what a merge carries
    // from another library: decision 0052): position 3 saw nothing, position 4 had seen 3.
    let mut log = log_of(&[w(0, 3, 0, 2), w(1, 1, 0, 10), w(1, 2, 0, 11)]);
    log[3].seen = 0;
    let placed: Vec<(Change, Option<u64>)> = log
        .into_iter()
        .enumerate()
        .map(|(i, c)| (c, Some(i as u64 + 1)))
        .collect();
    let carried = applied(&[placed]);
    assert_eq!(carried.len(), 1, "{carried:?}");
    assert_eq!(carried[0].position, 4);
    assert!(
        conflicts(&[w(1, 1, 0, 10), w(2, 1, 1, 5)]).is_empty(),
        "same value"
    );
}

/// A write made after a conflict was seen resolves it, on every device alike; resolved ones are
/// kept up to `CONFLICT_HISTORY_MAX`, the oldest dropped first, unresolved ones all kept.
#[test]
fn resolved_conflicts_are_bounded_history() {
    let extra = 3;
    let n = keel_projections::CONFLICT_HISTORY_MAX + extra;
    let write = |device: u8, record: u128, name: &str, seen: u64, ms: u64| {
        let tag = Tag {
            uuid: Uuid::from_u128(record),
            name: name.into(),
            color: None,
            created_ms: 1,
        };
        let hlc = Hlc {
            physical_ms: ms,
            counter: 0,
            device: DeviceId([device; 32]),
        };
        Change {
            seen,
            ..Change::upsert(ChangeId::new(), hlc, &tag).expect("a tag")
        }
    };
    let mut log = Vec::new();
    for k in 0..n as u128 {
        let at = log.len() as u64;
        log.push(write(1, k + 1, "x", at, 10));
        log.push(write(2, k + 1, "y", at, 11));
        // Seen both: resolves the conflict the second write made.
        log.push(write(1, k + 1, "y", at + 2, 12));
    }
    // One more, never resolved.
    let at = log.len() as u64;
    log.push(write(1, 99_999, "x", at, 10));
    log.push(write(2, 99_999, "y", at, 11));
    let logged: Vec<Option<u64>> = (1..=log.len() as u64).map(Some).collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut p = Projections::open(&dir.path().join("p.sqlite")).expect("opens");
    p.apply_logged(&log, &logged, None).expect("applies");
    let kept = p.query().conflicts().expect("lists");
    let resolved: Vec<_> = kept.iter().filter(|c| c.resolved.is_some()).collect();
    assert_eq!(resolved.len(), keel_projections::CONFLICT_HISTORY_MAX);
    assert_eq!(
        resolved[0].record,
        Uuid::from_u128(extra as u128 + 1),
        "the oldest went first"
    );
    let open: Vec<_> = kept.iter().filter(|c| c.resolved.is_none()).collect();
    assert_eq!(open.len(), 1);
    assert_eq!(open[0].record, Uuid::from_u128(99_999));
}

/// A policy taken from the log settles the conflicts found after it: prefer-device makes the
/// named device's value win and shows it (without a change), manual records the later one.
#[test]
fn a_policy_settles_the_conflicts_found_after_it() {
    let policy = |strategy: &str, device: Option<u8>| {
        tag_policy(strategy, device.map(|d| DeviceId([d; 32])))
    };
    let run = |first: Change| {
        // Device 1 renames at time 10, device 2 at time 5 without having seen it.
        let mut log = vec![first];
        log.extend(log_of(&[
            Write {
                device: 0,
                value: 1,
                behind: 1,
                ms: 10,
            },
            Write {
                device: 1,
                value: 2,
                behind: 1,
                ms: 5,
            },
        ]));
        let logged: Vec<Option<u64>> = (1..=log.len() as u64).map(Some).collect();
        let dir = tempfile::tempdir().expect("tempdir");
        let mut p = Projections::open(&dir.path().join("p.sqlite")).expect("opens");
        p.apply_logged(&log, &logged, None).expect("applies");
        let name = p
            .query()
            .get::<Tag>(TAG)
            .expect("reads")
            .expect("the tag")
            .name;
        (p.query().conflicts().expect("lists"), name)
    };
    // device(1) is DeviceId([2; 32]): the earlier clock, which latest-wins makes lose.
    let (found, shown) = run(policy("prefer-device", Some(2)));
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].strategy, "prefer-device");
    assert_eq!(found[0].sides[found[0].winner].device, DeviceId([2; 32]));
    assert_eq!(shown, "name 2", "the preferred value shows");
    let (found, shown) = run(policy("manual", None));
    assert_eq!(found[0].strategy, "manual");
    assert_eq!(found[0].sides[found[0].winner].device, DeviceId([1; 32]));
    assert_eq!(shown, "name 1", "the later value shows until a pick");
    let (found, shown) = run(policy("latest-wins", None));
    assert_eq!(found[0].strategy, "latest-wins");
    assert_eq!(shown, "name 1");
}
