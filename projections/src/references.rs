//! Proving, ahead of an apply, that every reference of a batch will find its row.
//!
//! SQLite checks each reference of each inserted row (one index lookup per reference) so that
//! a change whose dependency is missing can be parked (see [`crate::apply`]). A large batch
//! usually carries what it references (a file's content identity beside its entry): those
//! references need no lookup, and the few others (the location of a folder of entries) are
//! looked up once each by [`crate::Projections::apply`] ([`references_outside`]). If all are
//! there, SQLite's checks are off for that batch's transaction. The rows are the same either
//! way: the check only decides whether the commit may fail, and for a proven batch it cannot.

use keel_schema::{Change, Op, Registry, Value};
use uuid::Uuid;

use crate::order::ApplyOrder;

/// For each model code of `registry`, each reference field: (field index, target model code).
fn reference_fields(registry: &Registry) -> Vec<Vec<(u8, usize)>> {
    let mut refs = vec![Vec::new(); registry.code_end()];
    for def in registry.iter() {
        refs[usize::from(def.code)] = def
            .fields
            .iter()
            .enumerate()
            .filter_map(|(i, field)| {
                let target = field.references.and_then(|t| registry.code(t))?;
                Some((u8::try_from(i).ok()?, usize::from(target)))
            })
            .collect();
    }
    refs
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

/// The references of `changes` that point at none of their records (`order` holds them, see
/// [`ApplyOrder::records_missing`]), without repeats, in apply order, as (target model code,
/// uuid). `None` if a reference is neither NULL nor a uuid, or if there are more than `limit`:
/// then checking each is not worth it.
///
/// Every change of a batch applied optimistically leaves a row for its record (an upsert
/// inserts or merges, a delete tombstones or leaves a placeholder; rows are never removed), so
/// a reference to a record of the same batch finds its row at commit.
pub(crate) fn references_outside(
    registry: &Registry,
    changes: &[Change],
    order: &ApplyOrder<'_>,
    limit: usize,
) -> Option<Vec<(usize, Uuid)>> {
    let refs = reference_fields(registry);
    // The last one taken answers the common repeat (entries of one location) at once.
    let mut wanted = Vec::new();
    let mut last = None;
    for change in changes {
        for reference in references_of(&refs, change) {
            let reference = reference.ok()?;
            if last != Some(reference) {
                last = Some(reference);
                wanted.push(reference);
            }
        }
    }
    let outside = order.records_missing(&wanted);
    (outside.len() <= limit).then_some(outside)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clocks::tests::hlc;
    use keel_schema::{ChangeId, ContentIdentity, Tag, UserMetadata};

    /// [`references_outside`] with every model at its own rank.
    fn outside_of(changes: &[Change], limit: usize) -> Option<Vec<(usize, Uuid)>> {
        let ranks: Vec<usize> = (0..keel_schema::MODELS.len()).collect();
        let registry = Registry::builtin();
        references_outside(registry, changes, &ApplyOrder::new(changes, &ranks), limit)
    }

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
    fn a_reference_to_a_record_of_the_same_batch_needs_no_lookup() {
        let (c1, c2) = (Uuid::new_v4(), Uuid::new_v4());
        let mut batch = content(c1);
        batch.push(metadata_of_content(Uuid::new_v4(), c1));
        // The reference comes first, its record later in the same batch.
        batch.push(metadata_of_content(Uuid::new_v4(), c2));
        batch.extend(content(c2));
        assert_eq!(outside_of(&batch, 0), Some(Vec::new()));
    }

    #[test]
    fn a_reference_to_another_model_or_elsewhere_is_outside() {
        let missing = Uuid::new_v4();
        let code = usize::from(keel_schema::model_code("content_identity").expect("model"));
        assert_eq!(
            outside_of(&[metadata_of_content(Uuid::new_v4(), missing)], 1),
            Some(vec![(code, missing)])
        );
        // A tag with the referenced uuid is not the content it names.
        let tag = Change::upsert(
            ChangeId::new(),
            hlc(3),
            &Tag {
                uuid: missing,
                name: "t".into(),
                color: None,
                created_ms: 0,
            },
        )
        .into_iter()
        .chain([metadata_of_content(Uuid::new_v4(), missing)])
        .collect::<Vec<_>>();
        assert_eq!(outside_of(&tag, 1), Some(vec![(code, missing)]));
    }

    #[test]
    fn references_outside_a_batch_are_listed_once_up_to_a_limit() {
        let (inside, outside) = (Uuid::new_v4(), Uuid::new_v4());
        let mut batch = content(inside);
        batch.push(metadata_of_content(Uuid::new_v4(), inside));
        batch.push(metadata_of_content(Uuid::new_v4(), outside));
        batch.push(metadata_of_content(Uuid::new_v4(), outside));
        let code = usize::from(keel_schema::model_code("content_identity").expect("model"));
        assert_eq!(outside_of(&batch, 1), Some(vec![(code, outside)]));
        assert_eq!(outside_of(&batch, 0), None, "over the limit");
        assert_eq!(outside_of(&content(inside), 0), Some(Vec::new()));
    }

    #[test]
    fn a_reference_that_is_not_a_uuid_is_not_proven() {
        let mut change = metadata_of_content(Uuid::new_v4(), Uuid::new_v4());
        if let Op::Upsert(fields) = &mut change.op {
            for (_, v) in fields.iter_mut() {
                if matches!(v, Value::Uuid(_)) {
                    *v = Value::Bytes(vec![0; 16]);
                }
            }
        }
        assert_eq!(outside_of(&[change], 10), None);
    }
}
