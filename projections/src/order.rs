//! The order a batch is applied in, and lookups of the batch's own records.
//!
//! A batch goes in dependency order (each model's rank in the dependency plan) and, within a
//! model, by record uuid: the inserts then walk each uuid index in order instead of jumping
//! around it, so the pages they touch stay in the CPU caches (decision 0023). The sort keys are
//! computed once, as integers, and the sorted keys answer "which of these references name no
//! record of the batch?" by a merge with the sorted references ([`crate::references`]), with no
//! hashing and no worst case an adversary could pick.

use keel_schema::Change;
use uuid::Uuid;

/// One change's sort key: (rank and model, record uuid as a big-endian integer, position in
/// the batch). The uuid's integer order is its byte order.
type Key = (u64, u128, usize);

/// A batch's changes sorted into apply order.
pub(crate) struct ApplyOrder<'a> {
    keys: Vec<Key>,
    /// Each model code's rank in the dependency plan.
    ranks: &'a [usize],
    /// The attestation model's code (its changes go first).
    attestation: usize,
}

impl<'a> ApplyOrder<'a> {
    /// Sorts `changes` by (rank of their model in `ranks`, model, record uuid, position). A
    /// model code with no rank goes last.
    pub(crate) fn new(changes: &[Change], ranks: &'a [usize]) -> Self {
        let mut order = Self {
            keys: Vec::with_capacity(changes.len()),
            ranks,
            attestation: usize::from(keel_schema::code_of::<keel_schema::Attestation>()),
        };
        for (i, change) in changes.iter().enumerate() {
            let group = order.group(usize::from(change.model));
            order.keys.push((group, change.record.as_u128(), i));
        }
        order.keys.sort_unstable();
        order
    }

    /// The sort group of model `code`: its rank, then the code itself (two models may share
    /// a rank).
    fn group(&self, code: usize) -> u64 {
        // Attestations first: the changes they vouch for are checked against them.
        if code == self.attestation {
            return 0;
        }
        let rank = self
            .ranks
            .get(code)
            .copied()
            .unwrap_or(usize::MAX)
            .saturating_add(1);
        let rank = u64::try_from(rank)
            .unwrap_or(u64::MAX >> 8)
            .min(u64::MAX >> 8);
        (rank << 8) | u64::try_from(code & 0xFF).unwrap_or(0)
    }

    /// The positions of the changes, in apply order.
    pub(crate) fn positions(&self) -> Vec<usize> {
        self.keys.iter().map(|k| k.2).collect()
    }

    /// Of the references `wanted` (model code, uuid), those that name no record of the batch
    /// (a record of a model with a rank, one this library knows, with a change in it), each
    /// once, in apply order. They are
    /// sorted and walked beside the batch's keys in one pass: a binary search per reference
    /// jumped around keys that outgrow the CPU caches (2 MiB for 65,536 changes).
    pub(crate) fn records_missing(&self, wanted: &[(usize, Uuid)]) -> Vec<(usize, Uuid)> {
        let mut keyed: Vec<(u64, u128, usize)> = wanted
            .iter()
            .map(|&(code, uuid)| (self.group(code), uuid.as_u128(), code))
            .collect();
        keyed.sort_unstable();
        keyed.dedup();
        let mut at = 0;
        let mut missing = Vec::new();
        for (group, uuid, code) in keyed {
            while self
                .keys
                .get(at)
                .is_some_and(|k| (k.0, k.1) < (group, uuid))
            {
                at += 1;
            }
            let known = self.ranks.get(code).is_some_and(|rank| *rank != usize::MAX);
            let held = self
                .keys
                .get(at)
                .is_some_and(|k| (k.0, k.1) == (group, uuid));
            if !(known && held) {
                missing.push((code, Uuid::from_u128(uuid)));
            }
        }
        missing
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clocks::tests::hlc;
    use keel_schema::{model_code, ChangeId, Tag, MODELS};

    fn tag(uuid: Uuid, ms: u64) -> Change {
        Change::upsert(
            ChangeId::new(),
            hlc(ms),
            &Tag {
                uuid,
                name: "t".into(),
                color: None,
                created_ms: 0,
            },
        )
        .into_iter()
        .next()
        .expect("one change")
    }

    #[test]
    fn changes_sort_by_rank_then_uuid_then_position() {
        let (low, high) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let batch = vec![tag(high, 1), tag(low, 2), tag(high, 3)];
        let ranks: Vec<usize> = (0..MODELS.len()).collect();
        let order = ApplyOrder::new(&batch, &ranks);
        assert_eq!(order.positions(), vec![1, 0, 2]);
    }

    #[test]
    fn a_record_is_found_only_under_its_own_model() {
        let uuid = Uuid::new_v4();
        let batch = vec![tag(Uuid::new_v4(), 1), tag(uuid, 2)];
        // Every model at one rank: the model code must still tell them apart.
        let ranks = vec![0; MODELS.len()];
        let order = ApplyOrder::new(&batch, &ranks);
        let tag_code = usize::from(model_code("tag").expect("model"));
        let content = usize::from(model_code("content_identity").expect("model"));
        let other = Uuid::new_v4();
        let wanted = [
            (tag_code, uuid),
            (content, uuid),
            (tag_code, other),
            (999, uuid),
        ];
        let mut missing = order.records_missing(&wanted);
        missing.sort();
        let mut expected = vec![(content, uuid), (tag_code, other), (999, uuid)];
        expected.sort();
        assert_eq!(missing, expected);
    }

    #[test]
    fn missing_records_are_found_among_many_references_in_any_order_and_repeated() {
        let held: Vec<Uuid> = (0..200).map(|_| Uuid::new_v4()).collect();
        let absent: Vec<Uuid> = (0..50).map(|_| Uuid::new_v4()).collect();
        let batch: Vec<Change> = held.iter().map(|u| tag(*u, 1)).collect();
        let ranks: Vec<usize> = (0..MODELS.len()).collect();
        let order = ApplyOrder::new(&batch, &ranks);
        let code = usize::from(model_code("tag").expect("model"));
        // Absent and held interleaved, each absent one asked for three times.
        let mut wanted = Vec::new();
        for (i, u) in held.iter().enumerate() {
            wanted.push((code, *u));
            if let Some(a) = absent.get(i % absent.len()) {
                wanted.push((code, *a));
            }
        }
        wanted.reverse();
        let mut missing = order.records_missing(&wanted);
        assert!(
            missing.windows(2).all(|w| w[0].1 < w[1].1),
            "once each, in order"
        );
        missing.sort();
        let mut expected: Vec<(usize, Uuid)> = absent.iter().map(|u| (code, *u)).collect();
        expected.sort();
        assert_eq!(missing, expected);
    }
}
