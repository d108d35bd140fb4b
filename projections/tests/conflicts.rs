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
    for (i, w) in writes.iter().enumerate() {
        let position = i as u64 + 2;
        let hlc = Hlc {
            physical_ms: w.ms,
            counter: i as u32,
            device: device(w.device),
        };
        log.push(Change {
            op: Op::Upsert(vec![(name, Value::Text(format!("name {}", w.value)))]),
            seen: (position - 1).saturating_sub(u64::from(w.behind)),
            ..Change::upsert(ChangeId::new(), hlc, &tag).expect("a tag")
        });
    }
    log
}

fn applied(batches: &[Vec<(Change, Option<u64>)>]) -> Vec<keel_projections::Conflict> {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut p = Projections::open(&dir.path().join("p.sqlite")).expect("opens");
    for batch in batches {
        let changes: Vec<Change> = batch.iter().map(|(c, _)| c.clone()).collect();
        let logged: Vec<Option<u64>> = batch.iter().map(|(_, p)| *p).collect();
        p.apply_logged(&changes, &logged, None).expect("applies");
    }
    p.query().conflicts().expect("lists")
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
    ) {
        let log = log_of(&writes);
        let placed: Vec<(Change, Option<u64>)> = log
            .iter()
            .enumerate()
            .map(|(i, c)| (c.clone(), Some(i as u64 + 1)))
            .collect();
        let whole = applied(std::slice::from_ref(&placed));
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
        prop_assert_eq!(&applied(&batches), &whole);
        // One device's own changes first, as it applies them before their log copies come.
        let own: Vec<(Change, Option<u64>)> = placed
            .iter()
            .skip(1)
            .filter(|(c, _)| c.hlc.device == device(early_device))
            .map(|(c, _)| (c.clone(), None))
            .collect();
        let early = applied(&[placed[..1].to_vec(), own, placed.clone()]);
        prop_assert_eq!(&early, &whole);
        // Each conflict is between two devices, neither of which saw the other's write.
        for conflict in &whole {
            prop_assert_ne!(conflict.sides[0].device, conflict.sides[1].device);
            prop_assert_ne!(&conflict.sides[0].value, &conflict.sides[1].value);
        }
    }
}

/// The rule, case by case: another device's write not seen is a conflict; a write that saw it,
/// the same device again, or the same value, is not.
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
