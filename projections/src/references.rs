//! Proving, ahead of an apply, that every reference of a batch will find its row.
//!
//! SQLite checks each reference of each inserted row (one index lookup per reference) so that
//! a change whose dependency is missing can be parked (see [`crate::apply`]). A full replay into
//! an empty projection usually meets its references in order, and the thread reading the
//! journal has time to spare: a [`ReferenceTracker`] there remembers which records the replay
//! has created so far and tells, chunk by chunk, whether every reference points at one of them.
//! A batch made only of such chunks is applied with [`References::Present`], and SQLite skips
//! the lookups. The rows are the same either way: the check only decides whether the commit may
//! fail, and for a proven batch it cannot.
//!
//! Without a tracker, a large batch proves itself ([`references_outside`]): the references to
//! its own records need no lookup, and the few others (the location of a folder of entries) are
//! looked up once each by [`crate::Projections::apply_with`].

use std::collections::HashSet;

use keel_schema::{model_by_code, model_code, Change, Op, Value, MODELS};
use uuid::Uuid;

/// What the caller of [`crate::Projections::apply_with`] knows about a batch's references.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum References {
    /// Nothing: SQLite checks every reference, and a change whose dependency is missing is
    /// parked.
    #[default]
    Check,
    /// Every reference of the batch points at a row that exists once the batch is applied (as a
    /// [`ReferenceTracker`] proves it). SQLite does not look them up. Wrongly claimed, a dangling
    /// reference would be stored instead of parked; the projection falls back to
    /// [`References::Check`] while it holds parked changes.
    Present,
}

/// Remembers the records a replay into an empty projection has created, to prove chunks of
/// changes free of missing references (see the module docs).
///
/// The proof holds only when the projection was empty when tracking began and receives exactly
/// the observed changes, in order, each chunk applied in a batch together with the chunks after
/// it or alone (never split). Once a chunk fails, every later chunk fails too: a change of that
/// chunk may be parked, and then its record has no row although it was seen.
#[derive(Debug)]
pub struct ReferenceTracker {
    /// Records seen, per model code; `None` for a model that nothing references.
    seen: Vec<Option<HashSet<Uuid>>>,
    /// For each model code, each reference field: (field index, target model code).
    refs: Vec<Vec<(u8, usize)>>,
    /// Whether every chunk so far was proven.
    proving: bool,
}

impl Default for ReferenceTracker {
    fn default() -> Self {
        Self::new()
    }
}

/// For each model code, each reference field: (field index, target model code).
fn reference_fields() -> Vec<Vec<(u8, usize)>> {
    MODELS
        .iter()
        .map(|def| {
            def.fields
                .iter()
                .enumerate()
                .filter_map(|(i, field)| {
                    let target = field.references.and_then(model_code).map(usize::from)?;
                    Some((u8::try_from(i).ok()?, target))
                })
                .collect()
        })
        .collect()
}

/// Each reference of `change` (per `refs`, see [`reference_fields`]) that is not NULL, as
/// (target model code, uuid); `Err` if one is neither NULL nor a uuid (SQLite's to judge).
fn references_of<'a>(
    refs: &'a [Vec<(u8, usize)>],
    change: &'a Change,
) -> impl Iterator<Item = Result<(usize, Uuid), ()>> + 'a {
    let fields: &[(u8, Value)] = match &change.op {
        Op::Upsert(fields) => fields,
        Op::Delete => &[],
    };
    let model_refs: &[(u8, usize)] = refs
        .get(usize::from(change.model))
        .map_or(&[], Vec::as_slice);
    fields.iter().filter_map(move |(i, value)| {
        let &(_, target) = model_refs.iter().find(|(f, _)| f == i)?;
        match value {
            Value::Null => None,
            Value::Uuid(uuid) => Some(Ok((target, *uuid))),
            _ => Some(Err(())),
        }
    })
}

/// The references of `changes` that point at none of their records, without repeats, as
/// (target model code, uuid). `None` if a reference is neither NULL nor a uuid, or if there are
/// more than `limit`: then checking each is not worth it.
///
/// Every change of a batch applied optimistically leaves a row for its record (an upsert
/// inserts or merges, a delete tombstones or leaves a placeholder; rows are never removed), so
/// a reference to a record of the same batch finds its row at commit.
pub(crate) fn references_outside(changes: &[Change], limit: usize) -> Option<Vec<(usize, Uuid)>> {
    let refs = reference_fields();
    let records: HashSet<(usize, Uuid)> = changes
        .iter()
        .filter(|c| model_by_code(c.model).is_some())
        .map(|c| (usize::from(c.model), c.record))
        .collect();
    let mut outside = HashSet::new();
    for change in changes {
        for reference in references_of(&refs, change) {
            let reference = reference.ok()?;
            if !records.contains(&reference) && outside.insert(reference) && outside.len() > limit {
                return None;
            }
        }
    }
    Some(outside.into_iter().collect())
}

impl ReferenceTracker {
    /// A tracker that has seen nothing (for a projection that holds nothing).
    pub fn new() -> Self {
        let refs = reference_fields();
        let mut seen: Vec<Option<HashSet<Uuid>>> = MODELS.iter().map(|_| None).collect();
        for &(_, target) in refs.iter().flatten() {
            if let Some(slot) = seen.get_mut(target) {
                slot.get_or_insert_with(HashSet::new);
            }
        }
        Self {
            seen,
            refs,
            proving: true,
        }
    }

    /// Records the records of `chunk` and returns whether every reference in it points at a
    /// record seen so far (this chunk included). `false` from then on, once it has failed.
    pub fn observe(&mut self, chunk: &[Change]) -> bool {
        if !self.proving {
            return false;
        }
        for change in chunk {
            if model_by_code(change.model).is_none() {
                continue;
            }
            if let Some(Some(set)) = self.seen.get_mut(usize::from(change.model)) {
                set.insert(change.record);
            }
        }
        self.proving = chunk.iter().all(|change| self.proves(change));
        if !self.proving {
            // Nothing will be proven again: free the sets.
            self.seen.iter_mut().for_each(|s| *s = None);
        }
        self.proving
    }

    /// Whether every reference of `change` points at a seen record.
    fn proves(&self, change: &Change) -> bool {
        references_of(&self.refs, change).all(|reference| {
            reference.is_ok_and(|(target, uuid)| {
                self.seen
                    .get(target)
                    .and_then(Option::as_ref)
                    .is_some_and(|set| set.contains(&uuid))
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clocks::tests::hlc;
    use keel_schema::{ChangeId, ContentIdentity, Tag, UserMetadata};

    fn content(uuid: Uuid) -> Vec<Change> {
        Change::upsert(
            ChangeId::new(),
            hlc(1),
            &ContentIdentity {
                uuid: Some(uuid),
                content_hash: "h".into(),
                mime: None,
                kind: "image".into(),
                size: 1,
                entry_count: 0,
                total_size: 0,
            },
        )
        .into_iter()
        .collect()
    }

    fn metadata_of_content(uuid: Uuid, content: Uuid) -> Change {
        Change::upsert_fields::<UserMetadata>(
            ChangeId::new(),
            hlc(2),
            uuid,
            vec![("entry", Value::Null), ("content", Value::Uuid(content))],
        )
        .expect("fields exist")
    }

    #[test]
    fn a_reference_to_a_record_seen_before_or_in_the_same_chunk_is_proven() {
        let mut t = ReferenceTracker::new();
        let (c1, c2) = (Uuid::new_v4(), Uuid::new_v4());
        assert!(t.observe(&content(c1)));
        assert!(t.observe(&[metadata_of_content(Uuid::new_v4(), c1)]));
        // The reference comes first, its record later in the same chunk.
        let mut chunk = vec![metadata_of_content(Uuid::new_v4(), c2)];
        chunk.extend(content(c2));
        assert!(t.observe(&chunk));
    }

    #[test]
    fn a_missing_reference_fails_that_chunk_and_every_later_one() {
        let mut t = ReferenceTracker::new();
        let missing = Uuid::new_v4();
        assert!(!t.observe(&[metadata_of_content(Uuid::new_v4(), missing)]));
        // Its record arrives now, but the earlier change may have been parked: no proof again.
        assert!(!t.observe(&content(missing)));
        let tag = Change::upsert(
            ChangeId::new(),
            hlc(3),
            &Tag {
                uuid: Uuid::new_v4(),
                name: "t".into(),
                color: None,
                created_ms: 0,
            },
        )
        .into_iter()
        .collect::<Vec<_>>();
        assert!(!t.observe(&tag));
    }

    #[test]
    fn references_outside_a_batch_are_listed_once_up_to_a_limit() {
        let (inside, outside) = (Uuid::new_v4(), Uuid::new_v4());
        let mut batch = content(inside);
        batch.push(metadata_of_content(Uuid::new_v4(), inside));
        batch.push(metadata_of_content(Uuid::new_v4(), outside));
        batch.push(metadata_of_content(Uuid::new_v4(), outside));
        let code = usize::from(model_code("content_identity").expect("model"));
        assert_eq!(references_outside(&batch, 1), Some(vec![(code, outside)]));
        assert_eq!(references_outside(&batch, 0), None, "over the limit");
        assert_eq!(references_outside(&content(inside), 0), Some(Vec::new()));
    }

    #[test]
    fn a_reference_that_is_not_a_uuid_is_not_proven() {
        let mut t = ReferenceTracker::new();
        let mut change = metadata_of_content(Uuid::new_v4(), Uuid::new_v4());
        if let Op::Upsert(fields) = &mut change.op {
            for (_, v) in fields.iter_mut() {
                if matches!(v, Value::Uuid(_)) {
                    *v = Value::Bytes(vec![0; 16]);
                }
            }
        }
        assert!(!t.observe(std::slice::from_ref(&change)));
        assert_eq!(references_outside(&[change], 10), None);
    }
}
