//! The dependency graph of models: topological batches, with cycles broken by nullable references.

use std::collections::{BTreeMap, BTreeSet};

use crate::error::SchemaError;
use crate::syncable::ModelDef;

/// The order in which models are applied or backfilled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncPlan {
    /// Levels of models; every model's dependencies are in earlier levels. Within a level, by priority.
    pub batches: Vec<Vec<&'static str>>,
    /// The second step: `(model, field)` nullable references set after every level is applied.
    pub deferred: Vec<(&'static str, &'static str)>,
}

impl SyncPlan {
    /// The rank of a model in the plan (its level), for sorting changes.
    pub fn rank(&self, model: &str) -> Option<usize> {
        self.batches.iter().position(|b| b.contains(&model))
    }
}

/// Builds the plan. References in `breaks_cycle` fields are left out of the ordering and deferred;
/// any other cycle is an error.
pub fn plan(models: &[&'static ModelDef]) -> Result<SyncPlan, SchemaError> {
    let names: BTreeSet<&'static str> = models.iter().map(|m| m.name).collect();
    let mut pending: BTreeMap<&'static str, BTreeSet<&'static str>> = models
        .iter()
        .map(|m| {
            let deps = m
                .dependencies()
                .filter(|d| names.contains(d) && *d != m.name)
                .collect();
            (m.name, deps)
        })
        .collect();
    let priority: BTreeMap<&'static str, u8> =
        models.iter().map(|m| (m.name, m.priority)).collect();
    let mut batches = Vec::new();
    while !pending.is_empty() {
        let mut ready: Vec<&'static str> = pending
            .iter()
            .filter(|(_, deps)| deps.is_empty())
            .map(|(name, _)| *name)
            .collect();
        if ready.is_empty() {
            let stuck: Vec<&str> = pending.keys().copied().collect();
            return Err(SchemaError::Cycle(stuck.join(", ")));
        }
        ready.sort_by_key(|n| (priority.get(n).copied().unwrap_or(u8::MAX), *n));
        for name in &ready {
            pending.remove(name);
        }
        for deps in pending.values_mut() {
            for name in &ready {
                deps.remove(name);
            }
        }
        batches.push(ready);
    }
    let deferred = models
        .iter()
        .flat_map(|m| m.nullable_references().map(move |(_, f)| (m.name, f.name)))
        .collect();
    Ok(SyncPlan { batches, deferred })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::MODELS;

    #[test]
    fn models_form_levels_with_the_cycle_deferred() {
        let plan = plan(&MODELS).expect("the models have no unbroken cycle");
        let rank = |m: &str| plan.rank(m).expect("every model is ranked");
        assert!(rank("device") < rank("location"));
        assert!(rank("location") < rank("entry"));
        assert!(rank("content_identity") < rank("entry"));
        assert!(rank("entry") < rank("user_metadata"));
        assert!(rank("user_metadata") < rank("user_metadata_tag"));
        assert!(rank("tag") < rank("user_metadata_tag"));
        assert_eq!(plan.deferred, vec![("entry", "metadata")]);
    }

    #[test]
    fn an_unbroken_cycle_is_an_error() {
        use crate::syncable::{DomainRule, FieldDef, SyncDomain};
        use crate::value::FieldType;
        static A: ModelDef = ModelDef {
            name: "a",
            code: 40,
            version: 0,
            upcast: None,
            uuid_field: "uuid",
            domain: DomainRule::Fixed(SyncDomain::Index),
            fields: &[FieldDef {
                name: "b",
                ty: FieldType::Uuid,
                nullable: false,
                references: Some("b"),
                breaks_cycle: false,
                since: 0,
                default: || crate::Value::Null,
            }],
            skipped: &[],
            priority: 0,
            permanent_delete: false,
        };
        static B: ModelDef = ModelDef {
            name: "b",
            code: 41,
            version: 0,
            upcast: None,
            uuid_field: "uuid",
            domain: DomainRule::Fixed(SyncDomain::Index),
            fields: &[FieldDef {
                name: "a",
                ty: FieldType::Uuid,
                nullable: false,
                references: Some("a"),
                breaks_cycle: false,
                since: 0,
                default: || crate::Value::Null,
            }],
            skipped: &[],
            priority: 0,
            permanent_delete: false,
        };
        assert!(matches!(plan(&[&A, &B]), Err(SchemaError::Cycle(_))));
    }
}
