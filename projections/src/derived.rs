//! The derived counts of a content (`entry_count`, `total_size`): kept in the content's row.
//!
//! Each ContentIdentity row holds `_entries` (visible entries whose `content` names it) and
//! `_bytes` (the sum of their `size`). They are derived, never synced: whenever an Entry row is
//! written, the apply code adds what the row held before (with a minus) and what it holds now to
//! a per-content sum ([`CountDeltas`]), and the sums go into the content rows before the
//! transaction commits. A sum of differences does not depend on the order the entries were
//! written in, so the counts are the same on every device that saw the same changes, and the
//! digest (which covers every column) checks them.
//!
//! Why not count on read: that needs an index on `entry(content)`, and content uuids are random,
//! so every Entry insert landed on a random page of that index. It was a third of P3's apply
//! time (500k changes, interleaved rounds: 274–299k changes/s with it, 389–445k without).
//! Here, when a batch's references were proven beforehand (SQLite's checks off, see
//! `crate::references`), its content rows are written after its entries, since nothing looks a
//! reference up meanwhile: a content that arrives with its entries is inserted with its counts,
//! and only contents that were already there are updated, in uuid order. Any other pass keeps
//! dependency order and updates every content it counts.

use std::cell::RefCell;
use std::collections::HashMap;

use keel_schema::{model_code, Change, ModelDef, Value};
use uuid::Uuid;

/// The model whose rows hold the counts.
pub(crate) const COUNTED: &str = "content_identity";
/// The model whose rows are counted, and its fields that matter.
const COUNTING: &str = "entry";
const COUNTING_REFERENCE: &str = "content";
const COUNTING_SIZE: &str = "size";

/// The columns a counted row adds to its model's fields.
pub(crate) const COUNT_COLUMNS: &str = "_entries, _bytes";

/// Whether `def` is the model whose rows hold the counts.
pub(crate) fn holds_counts(def: &ModelDef) -> bool {
    def.name == COUNTED
}

/// Where the counts come from: model codes and field positions, looked up once.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CountPlan {
    /// Model code of the counted rows' model (ContentIdentity).
    pub(crate) counted: u8,
    /// Model code of the counting model (Entry).
    pub(crate) counting: u8,
    reference: usize,
    size: usize,
}

impl CountPlan {
    /// The plan for the registered models, looked up once; `None` if a model or field is
    /// missing (the counts then stay zero).
    pub(crate) fn get() -> Option<Self> {
        static PLAN: std::sync::OnceLock<Option<CountPlan>> = std::sync::OnceLock::new();
        *PLAN.get_or_init(Self::new)
    }

    fn new() -> Option<Self> {
        let counted = model_code(COUNTED)?;
        let counting = model_code(COUNTING)?;
        let def = keel_schema::model_by_code(counting)?;
        Some(Self {
            counted,
            counting,
            reference: def.field_index(COUNTING_REFERENCE)?,
            size: def.field_index(COUNTING_SIZE)?,
        })
    }

    /// What a row of model `code` adds to the counts: its content and size, if it is a visible
    /// entry that names a content. `value` gives the row's field at a position.
    pub(crate) fn share<'v>(
        &self,
        code: u8,
        live: bool,
        value: impl Fn(usize) -> Option<&'v Value>,
    ) -> Option<(Uuid, i64)> {
        if code != self.counting || !live {
            return None;
        }
        let Some(Value::Uuid(content)) = value(self.reference) else {
            return None;
        };
        let size = match value(self.size) {
            Some(Value::Int(size)) => *size,
            _ => 0,
        };
        Some((*content, size))
    }

    /// The share of a whole record upsert (every field, in order), written as a visible row.
    pub(crate) fn share_of_whole(&self, change: &Change) -> Option<(Uuid, i64)> {
        let keel_schema::Op::Upsert(fields) = &change.op else {
            return None;
        };
        self.share(change.model, true, |i| fields.get(i).map(|(_, v)| v))
    }

    /// `positions` (a batch in dependency order) with the counted model's changes moved to just
    /// after the counting model's, so that new content rows are written with their counts.
    /// Only for a pass in which nothing looks a reference up: references proven beforehand and
    /// SQLite's checks off (see `Projections::apply_checked`).
    pub(crate) fn counted_after_counting(
        &self,
        changes: &[Change],
        positions: &[usize],
    ) -> Vec<usize> {
        let model = |i: usize| changes.get(i).map(|c| c.model);
        let (counted, mut rest): (Vec<usize>, Vec<usize>) = positions
            .iter()
            .partition(|&&i| model(i) == Some(self.counted));
        let Some(last) = rest.iter().rposition(|&i| model(i) == Some(self.counting)) else {
            return positions.to_vec();
        };
        if counted.is_empty() {
            return positions.to_vec();
        }
        rest.splice(last + 1..last + 1, counted);
        rest
    }
}

/// Changes to the counts, per content, not yet written to its row.
#[derive(Debug, Default)]
pub(crate) struct CountDeltas(RefCell<HashMap<Uuid, (i64, i64)>>);

impl CountDeltas {
    /// Adds `share` (a row's content and size) with `sign` +1 (the row holds it now) or -1 (the
    /// row held it before).
    pub(crate) fn add(&self, share: Option<(Uuid, i64)>, sign: i64) {
        if let Some((content, size)) = share {
            let mut map = self.0.borrow_mut();
            let slot = map.entry(content).or_default();
            slot.0 = slot.0.wrapping_add(sign);
            slot.1 = slot.1.wrapping_add(sign.wrapping_mul(size));
        }
    }

    /// A row that held `before` now holds `after`.
    pub(crate) fn replace(&self, before: Option<(Uuid, i64)>, after: Option<(Uuid, i64)>) {
        if before != after {
            self.add(before, -1);
            self.add(after, 1);
        }
    }

    /// Takes the sums of `content` out, to be written with its new row: `(entries, bytes)`.
    pub(crate) fn take(&self, content: Uuid) -> (i64, i64) {
        self.0.borrow_mut().remove(&content).unwrap_or_default()
    }

    /// Puts back sums taken for a row that was not written after all.
    pub(crate) fn put_back(&self, content: Uuid, (entries, bytes): (i64, i64)) {
        if (entries, bytes) != (0, 0) {
            let mut map = self.0.borrow_mut();
            let slot = map.entry(content).or_default();
            slot.0 = slot.0.wrapping_add(entries);
            slot.1 = slot.1.wrapping_add(bytes);
        }
    }

    /// Every non-zero sum, in uuid order (the order of the content rows' index), emptied.
    pub(crate) fn drain_sorted(&self) -> Vec<(Uuid, i64, i64)> {
        let mut out: Vec<(Uuid, i64, i64)> = self
            .0
            .borrow_mut()
            .drain()
            .filter(|(_, sums)| *sums != (0, 0))
            .map(|(uuid, (entries, bytes))| (uuid, entries, bytes))
            .collect();
        out.sort_unstable_by_key(|(uuid, _, _)| *uuid);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_cancel_out_and_come_out_in_uuid_order() {
        let deltas = CountDeltas::default();
        let (a, b) = (Uuid::from_u128(2), Uuid::from_u128(1));
        deltas.add(Some((a, 10)), 1);
        deltas.add(Some((b, 5)), 1);
        deltas.replace(Some((a, 10)), Some((a, 12)));
        deltas.replace(Some((b, 5)), Some((b, 5)));
        deltas.add(None, 1);
        assert_eq!(deltas.take(a), (1, 12));
        deltas.put_back(a, (1, 12));
        deltas.add(Some((b, 5)), -1);
        assert_eq!(deltas.drain_sorted(), vec![(a, 1, 12)]);
        assert!(deltas.drain_sorted().is_empty());
    }

    /// Why an entry's `content` needs no index (see `crate::ddl::INDEXES`): with SQLite's checks
    /// on, a batch goes in dependency order, and contents come before every row that has a
    /// reference, so no reference can be missing yet when a content is inserted.
    #[test]
    fn in_dependency_order_contents_come_before_every_model_with_a_reference() {
        let plan = keel_schema::plan(&keel_schema::MODELS).expect("a plan");
        let key = |def: &ModelDef| (plan.rank(def.name), model_code(def.name));
        let counted = keel_schema::MODELS
            .iter()
            .find(|d| d.name == COUNTED)
            .expect("the counted model");
        assert!(counted.fields.iter().all(|f| f.references.is_none()));
        for def in keel_schema::MODELS
            .iter()
            .filter(|d| d.fields.iter().any(|f| f.references.is_some()))
        {
            assert!(key(counted) < key(def), "{} comes first", def.name);
        }
    }

    #[test]
    fn counted_changes_move_after_the_counting_ones_and_nothing_else_moves() {
        let Some(plan) = CountPlan::get() else {
            panic!("the registry has Entry and ContentIdentity");
        };
        let other = (0..7u8)
            .find(|c| *c != plan.counted && *c != plan.counting)
            .unwrap_or(0);
        let change = |model: u8| Change {
            id: keel_schema::ChangeId(Uuid::from_u128(9)),
            hlc: crate::clocks::tests::hlc(1),
            model,
            record: Uuid::from_u128(1),
            op: keel_schema::Op::Delete,
            version: 0,
            seen: 0,
        };
        let changes = vec![
            change(other),
            change(plan.counted),
            change(plan.counted),
            change(plan.counting),
            change(other),
        ];
        assert_eq!(
            plan.counted_after_counting(&changes, &[0, 1, 2, 3, 4]),
            vec![0, 3, 1, 2, 4]
        );
        // No counting change: the order stays.
        assert_eq!(
            plan.counted_after_counting(&changes, &[0, 1, 2, 4]),
            vec![0, 1, 2, 4]
        );
    }
}
