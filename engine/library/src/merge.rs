//! Merging another library into this one: the source design's SyncSetup (decision 0052).
//!
//! A device that built a library of its own and then joins another carries its records over
//! as its own changes, model by model in dependency order, each record translated:
//! - a content identity takes the uuid its hash has in this library, so the same bytes become
//!   one content; a tag takes the uuid of this library's tag of the same name (or the one its
//!   name gives here); the records derived from them (a content's metadata, a tag's use) take
//!   the uuids their new parts give, and every reference follows;
//! - this device's locations and their entries keep their uuids; another device's file facts
//!   are left (only the device that has the files writes them: each device merges its own),
//!   and so is what hangs on them; devices, attestations, endorsements, recorded models and
//!   conflict policies are the library's own and are left too.
//!
//! A record new here is written whole. A record already here (the same content, tag, or
//! metadata) keeps its fields, but those it lacks are filled, and a user-edited field the
//! other library sets to another value is written as a change that had seen nothing here
//! ([`Tx::unseen`](crate::Tx)): so every device records it as a conflict, both values kept.
//! A record's creation time (`created_ms`) stays as it is here. Nothing already equal is
//! written, and neither is a value a conflict here already holds, so merging again changes
//! nothing and a merge cut short goes on to the result an uninterrupted one gives.
//!
//! The merge is a job ([`JobKind::Merge`]); its checkpoint names the model and the last
//! record carried, and the same merge asked again goes on from there.

use std::collections::{HashMap, HashSet};

use keel_projections::{Conflict, RowValues};
use keel_schema::{ModelDef, Value};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::EngineError;
use crate::jobs::{JobKind, JobRun, JobState};
use crate::library::Library;

/// Records read, compared and written per transaction.
pub const MERGE_BATCH: usize = 2_048;

/// What a merge does (dry: would do) with the records of one model.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "typescript", derive(ts_rs::TS))]
pub struct ModelMerge {
    /// The model.
    pub model: String,
    /// Visible records of it in the other library (looked at by this run).
    pub source: u64,
    /// Records new here, written whole.
    pub added: u64,
    /// Records already here that some field of was written (filled, or a conflicting value).
    pub updated: u64,
    /// Records already here as they are there: nothing written.
    pub unchanged: u64,
    /// Of those added, updated or unchanged: records that became one with a record here of
    /// another uuid (a content of the same hash, a tag of the same name, what hangs on them).
    pub became_one: u64,
    /// Records not carried: another device's file facts and what hangs on them, and the
    /// library's own records (devices, attestations, endorsements, models, policies).
    pub left: u64,
}

/// What [`Library::merge_from`] did, or (dry run) would do.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "typescript", derive(ts_rs::TS))]
pub struct MergeReport {
    /// The other library's name.
    pub source: String,
    /// Whether nothing was written.
    pub dry_run: bool,
    /// Per model, in the order merged.
    pub models: Vec<ModelMerge>,
    /// Changes committed (0 in a dry run).
    pub changes: u64,
    /// Fields written over another value here: each is recorded as a conflict.
    pub conflicting: u64,
    /// Whether this run went on from an interrupted merge's checkpoint (what it carried
    /// before is not counted again).
    pub resumed: bool,
}

/// Models that belong to a library rather than to what it describes: never carried.
const LIBRARY_OWN: &[&str] = &[
    "device",
    "attestation",
    "endorsement",
    "registered_model",
    "conflict_policy",
];

/// How the other library's records are translated into this one's.
struct Carry {
    /// This library's id.
    here: Uuid,
    /// This device's Device record uuid.
    me: Uuid,
    /// Records whose uuid here differs from theirs.
    moved: HashMap<Uuid, Uuid>,
    /// Records not carried, so that what refers to them is not either.
    left: HashSet<Uuid>,
    /// This library's tags, by name.
    tags_here: HashMap<String, Uuid>,
}

/// A record's translation.
enum Fate {
    /// Not carried.
    Left,
    /// Carried as this record here.
    Carried(RowValues),
}

fn text(def: &ModelDef, values: &[Value], field: &str) -> Option<String> {
    match def.field_index(field).and_then(|i| values.get(i)) {
        Some(Value::Text(t)) => Some(t.clone()),
        _ => None,
    }
}

fn uuid_in(def: &ModelDef, values: &[Value], field: &str) -> Option<Uuid> {
    match def.field_index(field).and_then(|i| values.get(i)) {
        Some(Value::Uuid(u)) => Some(*u),
        _ => None,
    }
}

impl Carry {
    /// The record `uuid` of model `def` with `values`, as it is carried here.
    fn translate(&self, def: &ModelDef, uuid: Uuid, values: Vec<Value>) -> Fate {
        if LIBRARY_OWN.contains(&def.name) || self.left.contains(&uuid) {
            return Fate::Left;
        }
        let theirs = values.clone();
        let mut values = values;
        for (field, value) in def.fields.iter().zip(values.iter_mut()) {
            let Value::Uuid(target) = value else { continue };
            if field.references.is_none() {
                continue;
            }
            if self.left.contains(target) {
                return Fate::Left;
            }
            if let Some(here) = self.moved.get(target) {
                *value = Value::Uuid(*here);
            }
        }
        let uuid = match def.name {
            "location" if uuid_in(def, &values, "device") != Some(self.me) => {
                return Fate::Left;
            }
            "content_identity" => match text(def, &values, "content_hash") {
                Some(hash) => keel_schema::content_uuid(self.here, &hash),
                None => uuid,
            },
            "tag" => match text(def, &values, "name") {
                Some(name) => self
                    .tags_here
                    .get(&name)
                    .copied()
                    .unwrap_or_else(|| keel_schema::tag_uuid(self.here, &name)),
                None => uuid,
            },
            "user_metadata" => match (
                uuid_in(def, &theirs, "content"),
                uuid_in(def, &values, "content"),
            ) {
                (Some(old), Some(new)) if uuid == keel_schema::content_metadata_uuid(old) => {
                    keel_schema::content_metadata_uuid(new)
                }
                _ => uuid,
            },
            "user_metadata_tag" => {
                let pair =
                    |v: &[Value]| uuid_in(def, v, "user_metadata").zip(uuid_in(def, v, "tag"));
                match (pair(&theirs), pair(&values)) {
                    (Some((um, tag)), Some((new_um, new_tag)))
                        if uuid == keel_schema::user_metadata_tag_uuid(um, tag) =>
                    {
                        keel_schema::user_metadata_tag_uuid(new_um, new_tag)
                    }
                    _ => uuid,
                }
            }
            _ => uuid,
        };
        Fate::Carried((uuid, values))
    }

    /// Notes the fate of source record `uuid`, for the records that refer to it.
    fn note(&mut self, uuid: Uuid, fate: &Fate) {
        match fate {
            Fate::Left => {
                self.left.insert(uuid);
            }
            Fate::Carried((here, _)) if *here != uuid => {
                self.moved.insert(uuid, *here);
            }
            Fate::Carried(_) => {}
        }
    }
}

/// Values that a conflict here already holds, by (model, record, field).
type Held = HashMap<(&'static str, Uuid, &'static str), Vec<Value>>;

fn held(conflicts: Vec<Conflict>) -> Held {
    let mut held = Held::new();
    for c in conflicts {
        let values = held.entry((c.model, c.record, c.field)).or_default();
        for side in c.sides {
            values.push(side.value);
        }
    }
    held
}

/// The fields of a carried record to write here: all of them when it is new here (`None`),
/// else those this library lacks and the user-edited ones it holds another value of (see the
/// module docs).
fn fields_to_write(
    def: &'static ModelDef,
    (uuid, theirs): &RowValues,
    here: Option<&Vec<Value>>,
    held: &Held,
) -> Vec<(u8, Value)> {
    let indexed = theirs.iter().cloned().enumerate();
    let Some(here) = here else {
        return indexed
            .filter_map(|(i, v)| u8::try_from(i).ok().map(|i| (i, v)))
            .collect();
    };
    let mut out = Vec::new();
    for ((i, value), (field, mine)) in indexed.zip(def.fields.iter().zip(here)) {
        if value == *mine || value == Value::Null || field.name == "created_ms" {
            continue;
        }
        let write = if *mine == Value::Null {
            true
        } else {
            def.user_edited()
                && field.references.is_none()
                && value != Value::Bool(false)
                && !held
                    .get(&(def.name, *uuid, field.name))
                    .is_some_and(|values| values.contains(&value))
        };
        if let (true, Ok(i)) = (write, u8::try_from(i)) {
            out.push((i, value));
        }
    }
    out
}

/// Where a merge goes on from: a model and the last of its records carried.
fn parse_checkpoint(checkpoint: Option<&str>) -> Option<(String, Uuid)> {
    let (model, uuid) = checkpoint?.split_once(' ')?;
    Some((model.to_string(), uuid.parse().ok()?))
}

impl Library {
    /// Merges library `source` (another library of this home, open) into this one: see the
    /// module docs of `merge.rs` for what is carried and how. `dry_run`: writes nothing and
    /// reports what it would do. Otherwise it runs as a [`JobKind::Merge`] job, and if an
    /// earlier merge of `source` was interrupted, it goes on from that one's checkpoint.
    /// `progress` hears (records looked at, records in all).
    pub fn merge_from(
        &self,
        source: &Library,
        dry_run: bool,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<MergeReport, EngineError> {
        if source.id() == self.id() {
            return Err(EngineError::MergeIntoItself(source.name().into()));
        }
        source.flush()?;
        self.flush()?;
        let order = self.merge_order()?;
        let carry = self.carry_from(source, &order)?;
        let mut report = MergeReport {
            source: source.name().into(),
            dry_run,
            ..MergeReport::default()
        };
        if dry_run {
            self.merge_pass(source, (&order, &carry), None, &mut report, progress)?;
            return Ok(report);
        }
        let resumed = self.jobs()?.into_iter().rev().find(|j| {
            j.state == JobState::Interrupted
                && matches!(&j.kind, JobKind::Merge { library, .. } if *library == source.id().0)
        });
        report.resumed = resumed.is_some();
        // Its checkpoint comes back as the run's `resumed_from`.
        let kind = JobKind::Merge {
            source: source.name().into(),
            library: source.id().0,
        };
        let id = resumed.map(|j| j.id);
        let summary = |r: &MergeReport| {
            format!(
                "merged {}: {} changes, {} conflicting",
                r.source, r.changes, r.conflicting
            )
        };
        self.run_job(kind, id, summary, |run| {
            let mut report = report;
            let steps = (order.as_slice(), &carry);
            self.merge_pass(source, steps, Some(run), &mut report, progress)?;
            Ok(report)
        })
    }

    /// This library's models in dependency order.
    fn merge_order(&self) -> Result<Vec<&'static ModelDef>, EngineError> {
        let plan = keel_schema::plan(&self.models().defs())?;
        Ok(plan
            .batches
            .iter()
            .flatten()
            .filter_map(|name| self.models().code(name))
            .filter_map(|code| self.models().get(code))
            .collect())
    }

    /// Works out how every record of `source` is translated (a pass over it that writes
    /// nothing), so a merge that goes on from a checkpoint translates as the first run did.
    fn carry_from(
        &self,
        source: &Library,
        order: &[&'static ModelDef],
    ) -> Result<Carry, EngineError> {
        let tags: Vec<keel_schema::Tag> = self.read(|p| p.query().select("1", []))?;
        let mut carry = Carry {
            here: self.id().0,
            me: self.device_id().record_uuid(),
            moved: HashMap::new(),
            left: HashSet::new(),
            tags_here: tags.into_iter().map(|t| (t.name, t.uuid)).collect(),
        };
        for &def in order {
            if LIBRARY_OWN.contains(&def.name) {
                continue;
            }
            let mut after = None;
            loop {
                let rows = source.read(|p| p.query().rows_after(def, after, MERGE_BATCH))?;
                let Some((last, _)) = rows.last() else { break };
                after = Some(*last);
                for (uuid, values) in rows {
                    let fate = carry.translate(def, uuid, values);
                    carry.note(uuid, &fate);
                }
            }
        }
        Ok(carry)
    }

    /// Carries every model in `order` (dry: counts what it would carry), a batch per
    /// transaction. Under a job, it checkpoints `run` after each batch, and a resumed run goes
    /// on from the checkpoint it left (a model and the last record carried).
    fn merge_pass(
        &self,
        source: &Library,
        (order, carry): (&[&'static ModelDef], &Carry),
        run: Option<&JobRun<'_>>,
        report: &mut MergeReport,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<(), EngineError> {
        let from = run.and_then(|r| parse_checkpoint(r.resumed_from.as_deref()));
        let mut total = 0;
        for &def in order {
            total += source.read(|p| p.query().live_count(def))?;
        }
        let skip_to = from
            .as_ref()
            .and_then(|(model, _)| order.iter().position(|d| d.name == model.as_str()));
        let held = held(self.conflicts()?);
        let mut done = 0;
        for (rank, &def) in order.iter().enumerate() {
            let mut counts = ModelMerge {
                model: def.name.into(),
                ..ModelMerge::default()
            };
            let mut after = match (skip_to, &from) {
                (Some(at), Some((_, uuid))) if rank == at => Some(*uuid),
                (Some(at), _) if rank < at => {
                    done += source.read(|p| p.query().live_count(def))?;
                    continue;
                }
                _ => None,
            };
            loop {
                let rows = source.read(|p| p.query().rows_after(def, after, MERGE_BATCH))?;
                let Some((last, _)) = rows.last() else { break };
                let last = *last;
                done += rows.len() as u64;
                let writes = self.merge_batch(def, carry, rows, &held, &mut counts)?;
                report.conflicting += writes.1;
                if !report.dry_run && !writes.0.is_empty() {
                    report.changes += writes.0.len() as u64;
                    self.transact(|tx| {
                        tx.unseen();
                        for (uuid, fields) in writes.0 {
                            tx.write_fields(def, uuid, fields);
                        }
                        Ok(())
                    })?;
                }
                after = Some(last);
                if let Some(run) = run {
                    // Saved with each batch: what the batch committed is never looked at again.
                    run.save_checkpoint(format!("{} {last}", def.name), (done, total))?;
                }
                progress(done, total);
                if let Some(run) = run {
                    run.checkpoint()?;
                }
            }
            report.models.push(counts);
        }
        Ok(())
    }

    /// Translates a batch of the other library's records of model `def`, compares them with
    /// this library's, counts them, and returns the writes they need (record, fields) and how
    /// many of those fields overwrite another value here.
    #[allow(clippy::type_complexity)]
    fn merge_batch(
        &self,
        def: &'static ModelDef,
        carry: &Carry,
        rows: Vec<RowValues>,
        held: &Held,
        counts: &mut ModelMerge,
    ) -> Result<(Vec<(Uuid, Vec<(u8, Value)>)>, u64), EngineError> {
        counts.source += rows.len() as u64;
        let mut carried = Vec::with_capacity(rows.len());
        for (uuid, values) in rows {
            match carry.translate(def, uuid, values) {
                Fate::Left => counts.left += 1,
                Fate::Carried(row) => carried.push((uuid, row)),
            }
        }
        let uuids: Vec<Uuid> = carried.iter().map(|(_, (u, _))| *u).collect();
        let here = self.read(|p| p.query().rows_in(def, &uuids))?;
        let mut writes = Vec::new();
        let mut conflicting = 0;
        for (theirs, row) in carried {
            let mine = here.get(&row.0);
            let fields = fields_to_write(def, &row, mine, held);
            match (mine, fields.is_empty()) {
                (None, _) => counts.added += 1,
                (Some(_), true) => counts.unchanged += 1,
                (Some(mine), false) => {
                    counts.updated += 1;
                    conflicting += fields
                        .iter()
                        .filter(|(i, _)| mine[usize::from(*i)] != Value::Null)
                        .count() as u64;
                }
            }
            if mine.is_some() && theirs != row.0 {
                counts.became_one += 1;
            }
            if !fields.is_empty() {
                writes.push((row.0, fields));
            }
        }
        Ok((writes, conflicting))
    }
}
