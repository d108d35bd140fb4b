//! Applying changes: per-field last-writer-wins, tombstones, dependency parking.
//!
//! The result is a function of the *set* of changes applied, whatever their order:
//! - each field keeps the value of its newest write by `(HLC, device)`;
//! - a delete is a tombstone clock that forgets the fields it covers: a field keeps its newest
//!   write only if that write is newer than the row's newest tombstone (an older field is NULL,
//!   without a clock), except the field naming the record's owner, which the owner rule fixes
//!   for good. A row is visible (`_live = 1`) when every non-nullable field was written after
//!   its tombstone (or it has none). So a row holding only a tombstone answers every newer
//!   write as a row that never existed would, but for its remembered owner (decision 0073);
//! - a change whose reference points at a row that does not exist yet is parked and applied when
//!   that row arrives; a missing cycle-breaking reference (`Entry.metadata`) is split off and
//!   parked alone, so the rest of the change applies now (the two-step apply).
//!
//! A batch is applied optimistically first: runs of [`INSERT_ROWS`] whole records of one model
//! go in as one multi-row insert, and references are not looked up by Keel (SQLite checks them,
//! deferred, at commit). A reference missing at commit means something must be parked: the
//! transaction is rolled back and the batch applied again, change by change, looking up each
//! reference first. Parked changes are always retried that careful way. When a batch's
//! references are proven present beforehand (see [`crate::references`]), SQLite's checks are off
//! for its transaction: the commit could not have failed, so the rows are the same.

use keel_schema::{Change, Hlc, ModelDef, Op, Owner, Registry, SyncDomain, Value};
use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{
    params_from_iter, CachedStatement, Connection, ErrorCode, OptionalExtension, Params, ToSql,
};
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use uuid::Uuid;

use crate::clocks::{decode_clock, encode_clock, stored, FieldClocks};
use crate::ddl::{ModelSql, INSERT_ROWS};
use crate::derived::{CountDeltas, CountPlan};
use crate::error::ProjectionError;
use crate::order::ApplyOrder;
use crate::ownership::Verdict;
use crate::store::{AppliedPosition, Projections};

/// Most parked changes retried in one pass.
const PARKED_RETRY_MAX: usize = 100_000;

/// Smallest batch whose references [`Projections::apply`] proves itself before applying it
/// with SQLite's checks off. Turning them off and on again makes SQLite prepare the batch's
/// statements again (a fraction of a millisecond), which a small batch does not win back.
pub const SELF_PROOF_MIN: usize = 4_096;

/// What one `apply` call did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ApplyStats {
    /// Changes that changed a row.
    pub applied: u64,
    /// Changes that changed nothing (already applied, or older than what is there).
    pub unchanged: u64,
    /// Changes parked for a missing dependency.
    pub parked: u64,
    /// Parked changes applied because their dependency arrived.
    pub unparked: u64,
    /// Changes refused by the owner rule (see [`keel_schema::Owner`] and
    /// [`crate::Query::refused`]).
    pub refused: u64,
    /// Changes of a model this build lacks: kept aside, not applied (see
    /// [`crate::Query::lacking_models`]).
    pub lacking: u64,
    /// Changes in the Index domain.
    pub index_domain: u64,
    /// Changes in the Content domain.
    pub content_domain: u64,
    /// Whether the batch's references were proven present, so SQLite did not look them up
    /// (see `references.rs`).
    pub references_proven: bool,
    /// Conflicts recorded (see [`crate::Query::conflicts`]).
    pub conflicts: u64,
    /// Rows removed or freed of their tombstone by horizons (see [`keel_schema::Horizon`]).
    pub collected: u64,
}

impl ApplyStats {
    /// Adds what a later part of the same batch did.
    fn absorb(&mut self, other: ApplyStats) {
        self.applied += other.applied;
        self.unchanged += other.unchanged;
        self.parked += other.parked;
        self.unparked += other.unparked;
        self.refused += other.refused;
        self.lacking += other.lacking;
        self.index_domain += other.index_domain;
        self.content_domain += other.content_domain;
        self.references_proven |= other.references_proven;
        self.conflicts += other.conflicts;
        self.collected += other.collected;
    }
}

/// A SQL parameter borrowed from a change or a row.
pub(crate) enum Param<'a> {
    Null,
    Value(&'a Value),
    Blob(&'a [u8]),
    Int(i64),
}

impl ToSql for Param<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match self {
            Param::Null => ValueRef::Null,
            Param::Blob(b) => ValueRef::Blob(b),
            Param::Int(i) => ValueRef::Integer(*i),
            Param::Value(v) => match v {
                Value::Null => ValueRef::Null,
                Value::Bool(b) => ValueRef::Integer(i64::from(*b)),
                Value::Int(i) => ValueRef::Integer(*i),
                Value::Text(t) => ValueRef::Text(t.as_bytes()),
                Value::Bytes(b) => ValueRef::Blob(b),
                Value::Uuid(u) => ValueRef::Blob(u.as_bytes()),
            },
        }))
    }
}

/// Reads a column into a [`Value`] of the field's type.
pub(crate) fn read_value(
    def: &ModelDef,
    index: usize,
    raw: ValueRef<'_>,
) -> Result<Value, ProjectionError> {
    use keel_schema::FieldType;
    let field = &def.fields[index];
    let bad = || ProjectionError::MalformedRow(format!("{}.{}", def.name, field.name));
    Ok(match (field.ty, raw) {
        (_, ValueRef::Null) => Value::Null,
        (FieldType::Bool, ValueRef::Integer(i)) => Value::Bool(i != 0),
        (FieldType::Int, ValueRef::Integer(i)) => Value::Int(i),
        (FieldType::Text, ValueRef::Text(t)) => {
            Value::Text(String::from_utf8(t.to_vec()).map_err(|_| bad())?)
        }
        (FieldType::Bytes, ValueRef::Blob(b)) => Value::Bytes(b.to_vec()),
        (FieldType::Uuid, ValueRef::Blob(b)) => {
            Value::Uuid(Uuid::from_slice(b).map_err(|_| bad())?)
        }
        _ => return Err(bad()),
    })
}

pub(crate) struct Row {
    pub(crate) values: Vec<Value>,
    pub(crate) clocks: FieldClocks,
    pub(crate) tomb: Option<Hlc>,
}

impl Row {
    /// Takes tombstone `tomb` (newer than the row's): every field written before it is
    /// forgotten (NULL, no clock), but the owner field of model `code`.
    fn delete(&mut self, code: u8, tomb: Hlc) {
        debug_assert!(self.tomb < Some(tomb), "a tombstone older than the row's");
        self.tomb = Some(tomb);
        forget_before(
            &mut self.values,
            &mut self.clocks,
            (tomb, owner_field(code)),
        );
    }
}

/// The field of model `code` that names its record's owner (see [`keel_schema::Owner`]), if
/// any: a delete keeps it, since the owner rule fixes a record's owner for good; it counts
/// towards visibility only when written after the tombstone, as every field does.
pub(crate) fn owner_field(code: u8) -> Option<usize> {
    match Owner::of_model(code) {
        Owner::DeviceIn { field } | Owner::LocationIn { field, .. } => Some(usize::from(field)),
        Owner::Anyone | Owner::Itself | Owner::NamedIn { .. } => None,
    }
}

/// Forgets each field (NULL value, no clock) whose write is older than `tomb`, but field `keep`.
pub(crate) fn forget_before(
    values: &mut [Value],
    clocks: &mut FieldClocks,
    (tomb, keep): (Hlc, Option<usize>),
) {
    let fields = values.iter_mut().zip(clocks.0.iter_mut()).enumerate();
    for (_, (value, clock)) in fields.filter(|(i, _)| Some(*i) != keep) {
        if clock.is_some_and(|c| c < tomb) {
            *value = Value::Null;
            *clock = None;
        }
    }
}

fn is_live(def: &ModelDef, clocks: &FieldClocks, tomb: Option<Hlc>) -> bool {
    if def.permanent_delete && tomb.is_some() {
        return false;
    }
    // A field counts when written after the tombstone (only an owner field outlives one).
    let complete = def
        .fields
        .iter()
        .zip(&clocks.0)
        .all(|(f, c)| f.nullable || c.is_some_and(|c| tomb.is_none_or(|t| c > t)));
    complete && tomb.is_none_or(|t| clocks.newest().is_some_and(|n| n > t))
}

/// Whether an upsert writes every one of the model's `n` fields, in order (a whole record).
fn is_whole(fields: &[(u8, Value)], n: usize) -> bool {
    fields.len() == n
        && fields
            .iter()
            .enumerate()
            .all(|(i, (f, _))| usize::from(*f) == i)
}

/// Whether `change` upserts a whole record of a model of `registry`, at its version (and, for a
/// host's model, with values of its fields' types: Keel's were checked as they were decoded).
fn is_whole_change(registry: &Registry, change: &Change) -> bool {
    match (&change.op, registry.get(change.model)) {
        (Op::Upsert(fields), Some(def)) => {
            def.version == change.version
                && is_whole(fields, def.fields.len())
                && (def.code < keel_schema::HOST_CODE_MIN || change.validate_as(def).is_ok())
        }
        _ => false,
    }
}

/// Whether `err` is SQLite's foreign-key constraint (at commit, for deferred references).
fn is_fk_violation(err: &rusqlite::Error) -> bool {
    matches!(err, rusqlite::Error::SqliteFailure(e, _)
        if e.code == ErrorCode::ConstraintViolation && e.extended_code == 787)
}

/// What the owner rule lets [`Applier::apply`] do with a change.
enum OwnerCheck {
    /// Apply it; the rule's read of its row, if it made one.
    Go(Option<Option<Row>>),
    /// Stop: it was refused or parked.
    Stop(Outcome),
}

enum Outcome {
    Applied,
    Unchanged,
    Parked,
    Refused,
    Lacking,
}

impl ApplyStats {
    fn count(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Applied => self.applied += 1,
            Outcome::Unchanged => self.unchanged += 1,
            Outcome::Parked => self.parked += 1,
            Outcome::Refused => self.refused += 1,
            Outcome::Lacking => self.lacking += 1,
        }
    }
}

pub(crate) struct Applier<'a> {
    pub(crate) conn: &'a Connection,
    sql: &'a [ModelSql],
    /// The library's models.
    registry: &'a Registry,
    /// Each model's insert statement, prepared once per `apply` call (looking it up in the
    /// connection's statement cache hashed its SQL text for every row).
    inserts: Vec<RefCell<Option<CachedStatement<'a>>>>,
    /// Each model's multi-row insert, prepared on first use.
    insert_runs: Vec<RefCell<Option<CachedStatement<'a>>>>,
    /// Whether references are looked up before a change is applied (see the module docs).
    careful: Cell<bool>,
    /// Where the derived counts of a content come from (see [`crate::derived`]).
    counts: Option<CountPlan>,
    /// Changes to those counts not yet written, written by [`Applier::write_counts`].
    deltas: CountDeltas,
    /// Locations' owners (device record uuids) looked up so far; an owner never changes.
    pub(crate) owners: RefCell<HashMap<Uuid, Uuid>>,
    /// Devices' Device record uuids computed so far.
    pub(crate) origins: RefCell<HashMap<keel_schema::DeviceId, Uuid>>,
    /// The attestations' member digests, kept by the projections across batches.
    pub(crate) attested: &'a RefCell<crate::attest::Attested>,
    /// The attestation model's code.
    attestation: u8,
    /// Set while the changes applied were checked against their attestation already: parked
    /// changes retried (checked before they were parked), parts of a split change.
    pub(crate) checked: Cell<bool>,
}

impl<'a> Applier<'a> {
    fn new(
        conn: &'a Connection,
        sql: &'a [ModelSql],
        registry: &'a Registry,
        careful: bool,
        attested: &'a RefCell<crate::attest::Attested>,
    ) -> Self {
        Self {
            conn,
            sql,
            registry,
            inserts: sql.iter().map(|_| RefCell::new(None)).collect(),
            insert_runs: sql.iter().map(|_| RefCell::new(None)).collect(),
            careful: Cell::new(careful),
            counts: CountPlan::get(),
            deltas: CountDeltas::default(),
            owners: RefCell::new(HashMap::new()),
            origins: RefCell::new(HashMap::new()),
            attested,
            attestation: keel_schema::code_of::<keel_schema::Attestation>(),
            checked: Cell::new(false),
        }
    }

    /// What a row of model `code` adds to the derived counts (see [`CountPlan::share`]).
    fn share<'v>(
        &self,
        code: u8,
        live: bool,
        value: impl Fn(usize) -> Option<&'v Value>,
    ) -> Option<(Uuid, i64)> {
        self.counts.and_then(|plan| plan.share(code, live, value))
    }

    /// The library's models.
    pub(crate) fn registry(&self) -> &Registry {
        self.registry
    }

    /// Takes what a row removed added to the derived counts out of them.
    pub(crate) fn forget_share(&self, before: Option<(Uuid, i64)>) {
        self.deltas.replace(before, None);
    }

    /// The row of `uuid` in model `def`, if any.
    pub(crate) fn read_row(
        &self,
        def: &ModelDef,
        uuid: Uuid,
    ) -> Result<Option<Row>, ProjectionError> {
        self.read_row_with(def, &self.sql[usize::from(def.code)], uuid)
    }

    /// What a row read back adds to the derived counts.
    pub(crate) fn share_of_row(&self, def: &ModelDef, code: u8, row: &Row) -> Option<(Uuid, i64)> {
        let live = is_live(def, &row.clocks, row.tomb);
        self.share(code, live, |i| row.values.get(i))
    }

    /// Whether model `code` holds the derived counts.
    fn holds_counts(&self, code: u8) -> bool {
        self.counts.is_some_and(|plan| plan.counted == code)
    }

    /// Writes the derived counts still pending into their content rows, in uuid order. A content
    /// row that does not exist (its entry's reference is missing) takes nothing: the commit then
    /// fails on that reference, or the entry was parked and counted nothing. The sums wrap
    /// around in Rust, as the pending ones do, rather than in SQL, where an overflowing `+`
    /// turns into a float: sizes a peer made up stay integers, the same in any order.
    fn write_counts(&self) -> Result<(), ProjectionError> {
        let Some(plan) = self.counts else {
            return Ok(());
        };
        let pending = self.deltas.drain_sorted();
        if pending.is_empty() {
            return Ok(());
        }
        let Some((read, write)) = self
            .sql
            .get(usize::from(plan.counted))
            .and_then(|sql| sql.counts.as_ref())
        else {
            return Ok(());
        };
        let mut read = self.conn.prepare_cached(read)?;
        let mut write = self.conn.prepare_cached(write)?;
        for (content, entries, bytes) in pending {
            let key = content.as_bytes().as_slice();
            let stored: Option<(Option<i64>, Option<i64>)> = read
                .query_row([key], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            if let Some((stored_entries, stored_bytes)) = stored {
                write.execute((
                    key,
                    stored_entries.unwrap_or(0).wrapping_add(entries),
                    stored_bytes.unwrap_or(0).wrapping_add(bytes),
                ))?;
            }
        }
        Ok(())
    }

    /// The uuids of the `rows` rows model `code` inserted last. A new row's rowid is one more
    /// than the largest in its table (Keel never chooses a rowid, so the largest is far from
    /// SQLite's limit), so the rows a statement just inserted are the newest ones.
    fn newest(&self, code: u8, rows: usize) -> Result<HashSet<Uuid>, ProjectionError> {
        let Some(sql) = self.sql.get(usize::from(code)) else {
            return Ok(HashSet::new());
        };
        let mut stmt = self.conn.prepare_cached(&sql.newest)?;
        let uuids = stmt.query_map([i64::try_from(rows).unwrap_or(i64::MAX)], |r| {
            r.get::<_, Vec<u8>>(0)
        })?;
        let mut out = HashSet::with_capacity(rows);
        for uuid in uuids {
            let bytes = uuid?;
            let uuid = Uuid::from_slice(&bytes)
                .map_err(|_| ProjectionError::MalformedRow("uuid of a new row".into()))?;
            out.insert(uuid);
        }
        Ok(out)
    }

    /// Inserts the whole records of `run` ([`INSERT_ROWS`] upserts of model `code`, see
    /// [`is_whole`]) in one statement, each as a new row unless its uuid exists, and keeps the
    /// derived counts (see [`crate::derived`]). Returns the rows inserted.
    fn insert_run(&self, code: u8, run: &[&Change]) -> Result<usize, ProjectionError> {
        let holds_counts = self.holds_counts(code);
        let clocks: Vec<_> = run
            .iter()
            .map(|c| FieldClocks::encode_uniform(&c.hlc))
            .collect();
        // A content's pending counts go into its new row (a uuid twice in the run takes them
        // at its first row, the one inserted).
        let counts: Vec<(i64, i64)> = if holds_counts {
            run.iter().map(|c| self.deltas.take(c.record)).collect()
        } else {
            Vec::new()
        };
        let mut params: Vec<Param<'_>> = Vec::with_capacity(run.len() * 16);
        for (i, (change, clocks)) in run.iter().zip(&clocks).enumerate() {
            let Op::Upsert(fields) = &change.op else {
                return Ok(0);
            };
            params.push(Param::Blob(change.record.as_bytes()));
            params.extend(fields.iter().map(|(_, v)| Param::Value(v)));
            // Every field written and no tombstone: visible (see `is_live`); the statement
            // writes `_tomb` NULL and `_live` 1 itself.
            params.push(Param::Blob(clocks));
            if let Some(&(entries, bytes)) = counts.get(i) {
                params.push(Param::Int(entries));
                params.push(Param::Int(bytes));
            }
        }
        let inserted = self.execute_kept(
            &self.insert_runs,
            code,
            |sql| &sql.insert_run,
            params_from_iter(params),
        )?;
        let counted = self.counts.is_some_and(|plan| plan.counting == code);
        if !holds_counts && !counted {
            return Ok(inserted);
        }
        // Which changes of the run made a row: all, or the newest rows' uuids (each at its
        // first change in the run).
        let new = (inserted < run.len())
            .then(|| self.newest(code, inserted))
            .transpose()?;
        let mut seen = HashSet::new();
        for (i, change) in run.iter().enumerate() {
            let made_row = match &new {
                None => true,
                Some(new) => new.contains(&change.record) && seen.insert(change.record),
            };
            if holds_counts && !made_row {
                if let Some(&taken) = counts.get(i) {
                    self.deltas.put_back(change.record, taken);
                }
            }
            if counted && made_row {
                self.deltas
                    .add(self.counts.and_then(|p| p.share_of_whole(change)), 1);
            }
        }
        Ok(inserted)
    }

    /// Applies `order` (indexes into `changes`, in dependency order), a run of whole records at
    /// a time where it can (optimistic pass only), and adds the outcomes to `stats`.
    fn apply_all(
        &self,
        changes: &[Change],
        order: &[usize],
        stats: &mut ApplyStats,
    ) -> Result<(), ProjectionError> {
        let mut next = 0;
        while next < order.len() {
            let first = &changes[order[next]];
            let run = order.get(next..next + INSERT_ROWS).filter(|run| {
                !self.careful.get()
                    && first.model != self.attestation
                    && run.iter().all(|&i| {
                        changes[i].model == first.model
                            && is_whole_change(self.registry, &changes[i])
                    })
            });
            if let Some(run) = run {
                let run: Vec<&Change> = run.iter().map(|&i| &changes[i]).collect();
                if self.run_allowed(self.rule(first.model), &run)? {
                    self.apply_run(first.model, &run, stats)?;
                    next += INSERT_ROWS;
                    continue;
                }
            }
            stats.count(self.apply(first)?);
            next += 1;
        }
        Ok(())
    }

    /// Applies a run of whole records: one multi-row insert, then, if it skipped some (their
    /// uuid existed, or appears twice in the run), each change of the run on its own.
    fn apply_run(
        &self,
        code: u8,
        run: &[&Change],
        stats: &mut ApplyStats,
    ) -> Result<(), ProjectionError> {
        let inserted = self.insert_run(code, run)?;
        if inserted == run.len() {
            stats.applied += inserted as u64;
            return Ok(());
        }
        // Applied again one by one, a change whose row the run inserted finds its own clocks
        // there and comes back unchanged: count those as applied instead.
        let mut each = ApplyStats::default();
        for change in run {
            each.count(self.apply(change)?);
        }
        let inserted = inserted as u64;
        stats.applied += each.applied + inserted;
        stats.unchanged += each.unchanged.saturating_sub(inserted);
        stats.parked += each.parked;
        Ok(())
    }

    /// Whether a reference of `fields` points at a row that does not exist.
    fn misses_a_reference(
        &self,
        def: &ModelDef,
        fields: &[(u8, Value)],
    ) -> Result<bool, ProjectionError> {
        for (i, v) in fields {
            let Some(field) = def.fields.get(usize::from(*i)) else {
                continue;
            };
            if let (Some(target), Value::Uuid(target_uuid)) = (field.references, v) {
                if !self.exists(target, *target_uuid)? {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// Runs the insert statement of model `code` with `params`; returns the rows inserted.
    fn insert<P: Params>(&self, code: u8, params: P) -> rusqlite::Result<usize> {
        self.execute_kept(&self.inserts, code, |sql| &sql.insert, params)
    }

    /// Runs statement `text` of model `code`, prepared on first use and kept in `slots` for the
    /// rest of this `apply` call; returns the rows changed (0 for an unknown model).
    fn execute_kept<P: Params>(
        &self,
        slots: &[RefCell<Option<CachedStatement<'a>>>],
        code: u8,
        text: impl Fn(&ModelSql) -> &str,
        params: P,
    ) -> rusqlite::Result<usize> {
        let (Some(slot), Some(sql)) = (
            slots.get(usize::from(code)),
            self.sql.get(usize::from(code)),
        ) else {
            return Ok(0);
        };
        let mut slot = slot.borrow_mut();
        let stmt = match &mut *slot {
            Some(stmt) => stmt,
            None => slot.insert(self.conn.prepare_cached(text(sql))?),
        };
        stmt.execute(params)
    }

    fn read_row_with(
        &self,
        def: &ModelDef,
        sql: &ModelSql,
        uuid: Uuid,
    ) -> Result<Option<Row>, ProjectionError> {
        let mut stmt = self.conn.prepare_cached(&sql.select)?;
        let n = def.fields.len();
        let raw = stmt
            .query_row([uuid.as_bytes().as_slice()], |r| {
                let mut values = Vec::with_capacity(n);
                for i in 0..n {
                    values.push(read_value(def, i, r.get_ref(i)?));
                }
                let clocks: Vec<u8> = r.get(n)?;
                let tomb: Option<Vec<u8>> = r.get(n + 1)?;
                Ok((values, clocks, tomb))
            })
            .optional()?;
        let Some((values, clocks, tomb)) = raw else {
            return Ok(None);
        };
        let values = values.into_iter().collect::<Result<Vec<_>, _>>()?;
        let bad = || ProjectionError::MalformedRow(format!("{} clocks", def.name));
        let clocks = FieldClocks::decode(&clocks, n).ok_or_else(bad)?;
        let tomb = match tomb {
            Some(bytes) => Some(decode_clock(&bytes).ok_or_else(bad)?),
            None => None,
        };
        Ok(Some(Row {
            values,
            clocks,
            tomb,
        }))
    }

    /// Writes `row` over the row of `uuid`, which added `before` to the derived counts.
    pub(crate) fn write_row(
        &self,
        def: &ModelDef,
        code: u8,
        uuid: Uuid,
        row: &Row,
        before: Option<(Uuid, i64)>,
    ) -> Result<(), rusqlite::Error> {
        let sql = &self.sql[usize::from(code)];
        let clocks = row.clocks.encode();
        let tomb = row.tomb.map(|t| encode_clock(&t));
        let live = is_live(def, &row.clocks, row.tomb);
        self.deltas
            .replace(before, self.share(code, live, |i| row.values.get(i)));
        let mut params: Vec<Param<'_>> = Vec::with_capacity(def.fields.len() + 4);
        params.push(Param::Blob(uuid.as_bytes()));
        params.extend(row.values.iter().map(Param::Value));
        params.push(Param::Blob(&clocks));
        params.push(match &tomb {
            Some(t) => Param::Blob(t),
            None => Param::Null,
        });
        params.push(Param::Int(i64::from(live)));
        let mut stmt = self.conn.prepare_cached(&sql.update)?;
        stmt.execute(params_from_iter(params))?;
        Ok(())
    }

    fn rule(&self, code: u8) -> Owner {
        Owner::of_model(code)
    }

    /// Applies the owner rule to a change that writes file facts: stop with an outcome, or go
    /// on with its record's row if the rule read it (`Some(None)`: there is none).
    fn owner_check(
        &self,
        def: &ModelDef,
        sql: &ModelSql,
        change: &Change,
    ) -> Result<OwnerCheck, ProjectionError> {
        let rule = self.rule(change.model);
        if !rule.guards(change) {
            return Ok(OwnerCheck::Go(None));
        }
        if !self.is_attested(change)? {
            self.refuse(def, change, "no attestation of its device vouches for it")?;
            return Ok(OwnerCheck::Stop(Outcome::Refused));
        }
        let row = match rule {
            Owner::Itself => None,
            _ => Some(self.read_row_with(def, sql, change.record)?),
        };
        Ok(
            match self.verdict(rule, change, row.as_ref().and_then(Option::as_ref))? {
                Verdict::Allowed => OwnerCheck::Go(row),
                Verdict::Refused(reason) => {
                    self.refuse(def, change, &reason)?;
                    OwnerCheck::Stop(Outcome::Refused)
                }
                Verdict::Unknown(missing) => {
                    self.park(change, 0, &missing)?;
                    OwnerCheck::Stop(Outcome::Parked)
                }
            },
        )
    }

    /// An attestation: refused unless its signature checks out (and never deleted); its
    /// members are taken in; stored once (`None`: go on and insert it). One already stored (its
    /// log copy on the device that made it, a redelivery) is not checked again: its members
    /// were taken in when it was, and are read back from its row after a restart.
    fn take_attestation(
        &self,
        def: &ModelDef,
        change: &Change,
    ) -> Result<Option<Outcome>, ProjectionError> {
        if matches!(change.op, Op::Delete) {
            self.refuse(def, change, "an attestation is never deleted")?;
            return Ok(Some(Outcome::Refused));
        }
        if self.exists(def.name, change.record)? {
            return Ok(Some(Outcome::Unchanged));
        }
        match crate::attest::check(change) {
            Ok(members) => {
                self.attested_add(members);
                Ok(None)
            }
            Err(reason) => {
                self.refuse(def, change, &reason)?;
                Ok(Some(Outcome::Refused))
            }
        }
    }

    /// Applies one change: of a model (or a version of it) this library lacks, kept aside; of
    /// an older version, upcast first; of a host's model, checked against its definition.
    fn apply(&self, change: &Change) -> Result<Outcome, ProjectionError> {
        let Some(def) = self.registry.get(change.model) else {
            return self.keep_lacking(change);
        };
        if change.version > def.version {
            return self.keep_lacking(change);
        }
        if change.version < def.version {
            let mut upcast = change.clone();
            upcast.version = def.version;
            if let Op::Upsert(fields) = &mut upcast.op {
                if let Err(e) = def.upcast(change.version, fields) {
                    self.refuse(def, change, &e.to_string())?;
                    return Ok(Outcome::Refused);
                }
            }
            return self.apply_valid(def, &upcast, change);
        }
        self.apply_valid(def, change, change)
    }

    /// A change of a newer app's model or version, or another host's: kept aside, said (see
    /// [`crate::Query::lacking_models`]), applied by the replay once this build knows it.
    fn keep_lacking(&self, change: &Change) -> Result<Outcome, ProjectionError> {
        let mut stmt = self.conn.prepare_cached(
            "INSERT OR IGNORE INTO _lacking (id, model, version, change) VALUES (?1, ?2, ?3, ?4)",
        )?;
        stmt.execute((
            change.id.0.as_bytes().as_slice(),
            i64::from(change.model),
            i64::from(change.version),
            change.encode(),
        ))?;
        Ok(Outcome::Lacking)
    }

    /// Applies a change of model `def` at its version; one whose values do not fit the
    /// definition is refused (Keel's models were checked as they were decoded). `as_written` is
    /// the change as its writer made it (`change` may be it upcast): what an attestation vouches
    /// for, and what is parked or refused.
    fn apply_valid(
        &self,
        def: &'static ModelDef,
        change: &Change,
        as_written: &Change,
    ) -> Result<Outcome, ProjectionError> {
        if def.code >= keel_schema::HOST_CODE_MIN {
            if let Err(e) = change.validate_as(def) {
                self.refuse(def, change, &e.to_string())?;
                return Ok(Outcome::Refused);
            }
        }
        let sql = &self.sql[usize::from(change.model)];
        if change.model == self.attestation {
            if let Some(outcome) = self.take_attestation(def, change)? {
                return Ok(outcome);
            }
        }
        let read = match self.owner_check(def, sql, as_written)? {
            OwnerCheck::Go(read) => read,
            OwnerCheck::Stop(outcome) => return Ok(outcome),
        };
        let n = def.fields.len();
        match &change.op {
            Op::Upsert(fields) => {
                if self.careful.get() && self.misses_a_reference(def, fields)? {
                    return self.park_or_split(def, change);
                }
                if let Some(Some(row)) = read {
                    // The owner rule read the row: merge into it.
                    return self.merge_into(def, change, fields, row);
                }
                // Fast path: a new row, inserted in one statement; an existing one is merged.
                let inserted = if is_whole(fields, n) {
                    self.insert_whole(change, fields)?
                } else {
                    self.insert_partial(def, change, fields)?
                };
                if inserted == 1 {
                    Ok(Outcome::Applied)
                } else {
                    self.merge(def, sql, change, fields)
                }
            }
            Op::Delete => {
                let row = match read {
                    Some(row) => row,
                    None => self.read_row_with(def, sql, change.record)?,
                };
                match row {
                    Some(mut row) => {
                        let hlc = stored(change.hlc);
                        if row.tomb >= Some(hlc) {
                            return Ok(Outcome::Unchanged);
                        }
                        let before = self.share_of_row(def, change.model, &row);
                        row.delete(change.model, hlc);
                        self.write_row(def, change.model, change.record, &row, before)?;
                    }
                    None => {
                        // A tombstone for a row not seen yet: a hidden placeholder keeps the clock.
                        let tomb = encode_clock(&change.hlc);
                        let mut params: Vec<Param<'_>> = Vec::with_capacity(n + 4);
                        params.push(Param::Blob(change.record.as_bytes()));
                        params.extend((0..n).map(|_| Param::Null));
                        params.push(Param::Blob(&[]));
                        params.push(Param::Blob(&tomb));
                        params.push(Param::Int(0));
                        self.insert(change.model, params_from_iter(params))?;
                    }
                }
                Ok(Outcome::Applied)
            }
        }
    }

    /// Re-encodes the clocks of every row of `def` from schema version 9's whole clocks to
    /// stored ones (see [`crate::clocks`]), a chunk of rows at a time. Returns the rows.
    fn restamp_clocks(&self, def: &ModelDef) -> Result<u64, ProjectionError> {
        const CHUNK: i64 = 8_192;
        let n = def.fields.len();
        let bad = || ProjectionError::MalformedRow(format!("{} clocks", def.name));
        let select = format!(
            "SELECT rowid, _clocks, _tomb FROM {} WHERE rowid > ?1 ORDER BY rowid LIMIT {CHUNK}",
            def.name
        );
        let update = format!(
            "UPDATE {} SET _clocks = ?1, _tomb = ?2 WHERE rowid = ?3",
            def.name
        );
        let (mut after, mut rows) = (0_i64, 0_u64);
        loop {
            type Raw = (i64, Option<Vec<u8>>, Option<Vec<u8>>);
            let chunk: Vec<Raw> = {
                let mut stmt = self.conn.prepare_cached(&select)?;
                let found = stmt.query_map([after], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
                found.collect::<Result<_, _>>()?
            };
            let Some(last) = chunk.last() else {
                return Ok(rows);
            };
            after = last.0;
            let mut stmt = self.conn.prepare_cached(&update)?;
            for (rowid, clocks, tomb) in chunk {
                let clocks = match clocks {
                    Some(b) => Some(FieldClocks::decode_v9(&b, n).ok_or_else(bad)?.encode()),
                    None => None,
                };
                let tomb = match tomb {
                    Some(b) => Some(encode_clock(&Hlc::from_bytes(&b).ok_or_else(bad)?)),
                    None => None,
                };
                stmt.execute((clocks, tomb.as_ref().map(|t| t.as_slice()), rowid))?;
                rows += 1;
            }
        }
    }

    /// Has every deleted row of `def` forget the fields written before its tombstone (what
    /// [`Row::delete`] does as a delete is applied; files of schema version 9 kept them).
    /// Returns the rows changed.
    fn forget_deleted(&self, def: &ModelDef) -> Result<u64, ProjectionError> {
        let sql = &self.sql[usize::from(def.code)];
        let deleted: Vec<Vec<u8>> = {
            let select = format!("SELECT uuid FROM {} WHERE _tomb IS NOT NULL", def.name);
            let mut stmt = self.conn.prepare(&select)?;
            let rows = stmt.query_map([], |r| r.get(0))?;
            rows.collect::<Result<_, _>>()?
        };
        let mut changed = 0;
        for bytes in deleted {
            let uuid = Uuid::from_slice(&bytes)
                .map_err(|_| ProjectionError::MalformedRow(format!("{} uuid", def.name)))?;
            let Some(mut row) = self.read_row_with(def, sql, uuid)? else {
                continue;
            };
            let Some(tomb) = row.tomb else {
                continue;
            };
            if def.user_edited() {
                crate::conflicts::forget_writes_before(self.conn, def.code, uuid, tomb)?;
            }
            let before = self.share_of_row(def, def.code, &row);
            let clocks = row.clocks.clone();
            forget_before(
                &mut row.values,
                &mut row.clocks,
                (tomb, owner_field(def.code)),
            );
            if row.clocks != clocks {
                self.write_row(def, def.code, uuid, &row, before)?;
                changed += 1;
            }
        }
        Ok(changed)
    }

    /// Inserts a whole record (see [`is_whole`]) as a new row unless its uuid exists, with the
    /// parameters taken straight from the change (no allocation). Returns the rows inserted.
    fn insert_whole(&self, change: &Change, fields: &[(u8, Value)]) -> rusqlite::Result<usize> {
        let clocks = FieldClocks::encode_uniform(&change.hlc);
        // Every field written and no tombstone: visible (see `is_live`).
        let live = true;
        let params = std::iter::once(Param::Blob(change.record.as_bytes()))
            .chain(fields.iter().map(|(_, v)| Param::Value(v)))
            .chain([
                Param::Blob(&clocks),
                Param::Null,
                Param::Int(i64::from(live)),
            ]);
        let inserted = self.insert(change.model, params_from_iter(params))?;
        if inserted == 1 {
            let share = self.share(change.model, live, |i| fields.get(i).map(|(_, v)| v));
            self.deltas.add(share, 1);
        }
        Ok(inserted)
    }

    /// Inserts some fields of a record as a new row (the others NULL, without a clock) unless
    /// its uuid exists. Returns the rows inserted.
    fn insert_partial(
        &self,
        def: &ModelDef,
        change: &Change,
        fields: &[(u8, Value)],
    ) -> rusqlite::Result<usize> {
        let n = def.fields.len();
        let mut slots: Vec<Option<&Value>> = vec![None; n];
        for (i, v) in fields {
            if let Some(slot) = slots.get_mut(usize::from(*i)) {
                *slot = Some(v);
            }
        }
        let hlc = stored(change.hlc);
        let clocks = FieldClocks(slots.iter().map(|s| s.map(|_| hlc)).collect());
        let live = is_live(def, &clocks, None);
        let clock_bytes = clocks.encode();
        let mut params: Vec<Param<'_>> = Vec::with_capacity(n + 4);
        params.push(Param::Blob(change.record.as_bytes()));
        params.extend(slots.iter().map(|s| s.map_or(Param::Null, Param::Value)));
        params.push(Param::Blob(&clock_bytes));
        params.push(Param::Null);
        params.push(Param::Int(i64::from(live)));
        let inserted = self.insert(change.model, params_from_iter(params))?;
        if inserted == 1 {
            let share = self.share(change.model, live, |i| slots.get(i).copied().flatten());
            self.deltas.add(share, 1);
        }
        Ok(inserted)
    }

    /// Merges an upsert into the existing row, field by field (last writer wins).
    fn merge(
        &self,
        def: &ModelDef,
        sql: &ModelSql,
        change: &Change,
        fields: &[(u8, Value)],
    ) -> Result<Outcome, ProjectionError> {
        match self.read_row_with(def, sql, change.record)? {
            Some(row) => self.merge_into(def, change, fields, row),
            None => Ok(Outcome::Unchanged),
        }
    }

    /// Merges an upsert into `row`, its record's row as read, field by field.
    fn merge_into(
        &self,
        def: &ModelDef,
        change: &Change,
        fields: &[(u8, Value)],
        mut row: Row,
    ) -> Result<Outcome, ProjectionError> {
        let n = def.fields.len();
        let hlc = stored(change.hlc);
        // Written before the record's delete: forgotten, but for the owner field (kept by
        // last-writer-wins whatever the delete, see `owner_field`).
        let forgotten = row.tomb >= Some(hlc);
        let keep = owner_field(change.model);
        let before = self.share_of_row(def, change.model, &row);
        let mut changed = false;
        for (i, v) in fields {
            let i = usize::from(*i);
            if forgotten && Some(i) != keep {
                continue;
            }
            if i < n && row.clocks.0[i] < Some(hlc) {
                row.values[i] = v.clone();
                row.clocks.0[i] = Some(hlc);
                changed = true;
            }
        }
        if !changed {
            return Ok(Outcome::Unchanged);
        }
        self.write_row(def, change.model, change.record, &row, before)?;
        Ok(Outcome::Applied)
    }

    fn exists(&self, model: &str, uuid: Uuid) -> Result<bool, ProjectionError> {
        let Some(code) = self.registry.code(model) else {
            return Ok(false);
        };
        let mut stmt = self
            .conn
            .prepare_cached(&self.sql[usize::from(code)].exists)?;
        Ok(stmt.exists([uuid.as_bytes().as_slice()])?)
    }

    /// A reference is missing: park the change, or (for a cycle-breaking reference only) apply the
    /// rest now and park that field alone.
    fn park_or_split(&self, def: &ModelDef, change: &Change) -> Result<Outcome, ProjectionError> {
        let Op::Upsert(fields) = &change.op else {
            return Ok(Outcome::Unchanged);
        };
        let mut missing_hard = Vec::new();
        let mut missing_soft = Vec::new();
        for (i, v) in fields {
            let Some(field) = def.fields.get(usize::from(*i)) else {
                continue;
            };
            let (Some(target), Value::Uuid(target_uuid)) = (field.references, v) else {
                continue;
            };
            if !self.exists(target, *target_uuid)? {
                if field.breaks_cycle {
                    missing_soft.push((*i, target, *target_uuid));
                } else {
                    missing_hard.push(format!("{target}:{target_uuid}"));
                }
            }
        }
        if !missing_hard.is_empty() {
            self.park(change, 0, &missing_hard.join(","))?;
            return Ok(Outcome::Parked);
        }
        if missing_soft.is_empty() {
            // The violation was not ours to explain (should not happen): park to be safe.
            self.park(change, 0, "unknown")?;
            return Ok(Outcome::Parked);
        }
        let soft: Vec<u8> = missing_soft.iter().map(|(i, _, _)| *i).collect();
        let rest = Change {
            op: Op::Upsert(
                fields
                    .iter()
                    .filter(|(i, _)| !soft.contains(i))
                    .cloned()
                    .collect(),
            ),
            ..change.clone()
        };
        let deferred = Change {
            op: Op::Upsert(
                fields
                    .iter()
                    .filter(|(i, _)| soft.contains(i))
                    .cloned()
                    .collect(),
            ),
            ..change.clone()
        };
        let missing: Vec<String> = missing_soft
            .iter()
            .map(|(_, t, u)| format!("{t}:{u}"))
            .collect();
        self.park(&deferred, 1, &missing.join(","))?;
        if let Op::Upsert(f) = &rest.op {
            if !f.is_empty() {
                // A part of a change that passed its checks (its attestation among them).
                let checked = self.checked.replace(true);
                let applied = self.apply(&rest);
                self.checked.set(checked);
                applied?;
            }
        }
        Ok(Outcome::Parked)
    }

    fn park(&self, change: &Change, part: u8, missing: &str) -> Result<(), ProjectionError> {
        let mut key = change.id.0.as_bytes().to_vec();
        key.push(part);
        let mut stmt = self.conn.prepare_cached(
            "INSERT OR REPLACE INTO _parked (key, missing, change) VALUES (?1, ?2, ?3)",
        )?;
        stmt.execute((key, missing, change.encode()))?;
        Ok(())
    }

    /// Retries parked changes until a pass makes no progress. Returns how many were applied.
    fn retry_parked(&self) -> Result<u64, ProjectionError> {
        let careful = self.careful.replace(true);
        let checked = self.checked.replace(true);
        let unparked = self.retry_parked_carefully();
        self.careful.set(careful);
        self.checked.set(checked);
        unparked
    }

    fn retry_parked_carefully(&self) -> Result<u64, ProjectionError> {
        let mut unparked = 0;
        loop {
            let parked: Vec<(Vec<u8>, Vec<u8>)> = {
                let mut stmt = self
                    .conn
                    .prepare_cached("SELECT key, change FROM _parked ORDER BY key LIMIT ?1")?;
                let rows =
                    stmt.query_map([PARKED_RETRY_MAX as i64], |r| Ok((r.get(0)?, r.get(1)?)))?;
                rows.collect::<Result<_, _>>()?
            };
            let mut progress = 0;
            for (key, bytes) in parked {
                self.conn
                    .execute("DELETE FROM _parked WHERE key = ?1", [&key])?;
                let change = match Change::decode(&bytes) {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "dropping an undecodable parked change");
                        continue;
                    }
                };
                match self.apply(&change)? {
                    Outcome::Parked => {}
                    _ => progress += 1,
                }
            }
            unparked += progress;
            if progress == 0 {
                return Ok(unparked);
            }
        }
    }
}

impl Projections {
    /// Applies `changes` in one transaction, in dependency order, and records `position` with them.
    ///
    /// Optimistic first (multi-row inserts, references checked by SQLite at commit); if a
    /// reference is still missing at commit, that transaction rolls back and the batch is
    /// applied again change by change, parking what waits for a dependency (see the module
    /// docs). Either way the rows are the same, and so are the returned counts, except that
    /// a reference made later in the same batch is not counted as parked. A batch of at least
    /// [`SELF_PROOF_MIN`] changes whose references point at its own records or at a few existing
    /// rows (looked up here) runs without SQLite's checks (`ApplyStats::references_proven`).
    pub fn apply(
        &mut self,
        changes: &[Change],
        position: Option<AppliedPosition>,
    ) -> Result<ApplyStats, ProjectionError> {
        self.apply_logged(changes, &[], position)
    }

    /// [`Projections::apply`] of changes of which some are log entries: `logged[i]` is the log
    /// position of `changes[i]` (`None`, or missing, for a local change). The log entries are
    /// looked at for conflicts, in order (see [`crate::Query::conflicts`]).
    ///
    /// A horizon among the log entries (see [`keel_schema::Horizon`]) ends a part of the
    /// batch: what comes before it is applied and committed, then its tombstones are collected,
    /// then the rest is applied, so that it collects after the same changes on every device. The
    /// applied position is recorded with the last part only: a crash in between applies the
    /// whole batch again, which gives the same rows.
    pub fn apply_logged(
        &mut self,
        changes: &[Change],
        logged: &[Option<u64>],
        position: Option<AppliedPosition>,
    ) -> Result<ApplyStats, ProjectionError> {
        let mut stats = ApplyStats::default();
        let mut from = 0;
        while let Some((at, bound)) = crate::collect::next_horizon(changes, logged, from) {
            let part = self.apply_part(&changes[from..=at], &logged[from..=at], None)?;
            stats.absorb(part);
            stats.collected += self.collect_tombstones(bound)?;
            from = at + 1;
        }
        let rest = logged.get(from..).unwrap_or(&[]);
        let part = self.apply_part(&changes[from..], rest, position)?;
        stats.absorb(part);
        Ok(stats)
    }

    /// Collects the tombstones older than `bound` in one transaction (see `crate::collect`).
    /// Returns the rows changed.
    fn collect_tombstones(&mut self, bound: (u64, u32)) -> Result<u64, ProjectionError> {
        let tx = self.conn.unchecked_transaction()?;
        let applier = Applier::new(&tx, &self.sql, &self.registry, true, &self.attested);
        let mut defs: Vec<&ModelDef> = self.registry.iter().collect();
        // Referencing models first: a record's last reference may go in the same pass.
        defs.sort_by_key(|d| std::cmp::Reverse(self.ranks[usize::from(d.code)]));
        let mut changed = 0;
        for def in defs {
            changed += applier.collect_tombstones(def, bound)?;
        }
        applier.write_counts()?;
        drop(applier);
        tx.commit()?;
        Ok(changed)
    }

    /// [`Projections::apply_logged`] of a part of a batch that holds no horizon but maybe as
    /// its last change.
    fn apply_part(
        &mut self,
        changes: &[Change],
        logged: &[Option<u64>],
        position: Option<AppliedPosition>,
    ) -> Result<ApplyStats, ProjectionError> {
        if changes.is_empty() && position.is_none() {
            return Ok(ApplyStats::default());
        }
        let order = ApplyOrder::new(changes, &self.ranks);
        let unchecked = self.references_found(changes, &order)?;
        let positions = order.positions();
        if unchecked {
            // Outside a transaction (inside one the pragma does nothing); statements prepared
            // with the checks are prepared again without them. Parked changes retried in this
            // transaction are applied carefully, each reference looked up by Keel.
            self.conn.pragma_update(None, "foreign_keys", "OFF")?;
        }
        let applied = self.apply_checked(changes, (&positions, logged), unchecked, position);
        if position.is_some() {
            self.ahead_from = None;
        }
        if unchecked {
            self.conn.pragma_update(None, "foreign_keys", "ON")?;
        }
        applied.map(|stats| ApplyStats {
            references_proven: unchecked,
            ..stats
        })
    }

    /// Whether every reference of `changes`, a batch of at least [`SELF_PROOF_MIN`], points at
    /// a record of the batch or at an existing row (a few lookups here instead of one per
    /// reference in SQLite; see [`crate::references`]).
    fn references_found(
        &self,
        changes: &[Change],
        order: &ApplyOrder<'_>,
    ) -> Result<bool, ProjectionError> {
        if changes.len() < SELF_PROOF_MIN {
            return Ok(false);
        }
        let limit = changes.len() / 16;
        let Some(outside) =
            crate::references::references_outside(&self.registry, changes, order, limit)
        else {
            return Ok(false);
        };
        for (target, uuid) in outside {
            let Some(sql) = self.sql.get(target) else {
                return Ok(false);
            };
            let mut stmt = self.conn.prepare_cached(&sql.exists)?;
            if !stmt.exists([uuid.as_bytes().as_slice()])? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Applies `changes` in `order` (dependency order), optimistically and then carefully if a
    /// reference is missing at commit; `unchecked` says SQLite's reference checks are off.
    fn apply_checked(
        &mut self,
        changes: &[Change],
        (order, logged): (&[usize], &[Option<u64>]),
        unchecked: bool,
        position: Option<AppliedPosition>,
    ) -> Result<ApplyStats, ProjectionError> {
        let (mut index_domain, mut content_domain) = (0, 0);
        for change in changes {
            match self.domain_of(change) {
                SyncDomain::Index => index_domain += 1,
                SyncDomain::Content => content_domain += 1,
            }
        }
        // With the references proven and SQLite's checks off, nothing looks a reference up
        // while the batch is written, so contents may go in after their entries, each new
        // content row with its counts (see `crate::derived`). Not with the checks on: a content
        // inserted while an earlier row's reference is still missing makes SQLite look for that
        // content's entries, and without an index on `entry(content)` that reads every entry.
        // In dependency order, contents come before any row that has a reference.
        let optimistic = match CountPlan::get() {
            Some(plan) if unchecked => plan.counted_after_counting(changes, order),
            _ => order.to_vec(),
        };
        let (mut stats, parked) =
            match self.apply_in_transaction(changes, (&optimistic, logged), position, false) {
                Err(ProjectionError::Sqlite(e)) if is_fk_violation(&e) => {
                    // A reference still missing at commit (the transaction rolled back): apply the
                    // batch again, parking what waits for a dependency.
                    self.apply_in_transaction(changes, (order, logged), position, true)?
                }
                other => other?,
            };
        stats.index_domain = index_domain;
        stats.content_domain = content_domain;
        if let Some(checkpointer) = &self.checkpointer {
            checkpointer.written(stats.applied + stats.parked + stats.unparked + 1);
        }
        self.parked = parked;
        Ok(stats)
    }

    /// Applies `changes` in `order` in one transaction (optimistic or careful, see the module
    /// docs) and commits it. Returns the outcomes and the number of changes parked.
    fn apply_in_transaction(
        &mut self,
        changes: &[Change],
        (order, logged): (&[usize], &[Option<u64>]),
        position: Option<AppliedPosition>,
        careful: bool,
    ) -> Result<(ApplyStats, u64), ProjectionError> {
        let mut stats = ApplyStats::default();
        let tx = self.conn.unchecked_transaction()?;
        let applier = Applier::new(&tx, &self.sql, &self.registry, careful, &self.attested);
        applier.apply_all(changes, order, &mut stats)?;
        if (self.parked > 0 && stats.applied > 0) || stats.parked > 0 {
            stats.unparked = applier.retry_parked()?;
        }
        applier.write_counts()?;
        if !logged.is_empty() {
            stats.conflicts = crate::conflicts::observe(&tx, &self.registry, changes, logged)?;
        }
        if let Some(position) = position {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO _meta (key, value) VALUES ('applied_lsn', ?1), ('applied_local', ?2), \
                 ('ahead_from', ?3) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            )?;
            stmt.execute((
                i64::try_from(position.log.0).unwrap_or(i64::MAX),
                i64::try_from(position.local).unwrap_or(i64::MAX),
                self.ahead_from
                    .map_or(0, |lsn| i64::try_from(lsn.0).unwrap_or(i64::MAX)),
            ))?;
        }
        drop(applier);
        let parked: i64 = tx.query_row("SELECT count(*) FROM _parked", [], |r| r.get(0))?;
        tx.commit()?;
        Ok((stats, u64::try_from(parked).unwrap_or(0)))
    }

    /// Migrates a file of schema version 9: every row's clocks are re-encoded as stored clocks
    /// (see [`crate::clocks`]), every deleted record forgets the fields written before its
    /// delete, its visibility and the derived counts follow, and the file is stamped with the
    /// current version, in one transaction. Returns the deleted rows changed.
    pub(crate) fn migrate_from_v9(&self) -> Result<u64, ProjectionError> {
        let tx = self.conn.unchecked_transaction()?;
        let applier = Applier::new(&tx, &self.sql, &self.registry, true, &self.attested);
        let mut changed = 0;
        for def in self.registry.iter() {
            applier.restamp_clocks(def)?;
            changed += applier.forget_deleted(def)?;
        }
        applier.write_counts()?;
        drop(applier);
        tx.pragma_update(None, "user_version", crate::ddl::SCHEMA_VERSION)?;
        tx.commit()?;
        Ok(changed)
    }

    /// The domain of a change's record. UserMetadata by its scope; UserMetadataTag by its parent,
    /// whose domain is cached.
    pub fn domain_of(&mut self, change: &Change) -> SyncDomain {
        let Some(def) = self.registry.get(change.model) else {
            return SyncDomain::Index;
        };
        let scope_of = |fields: &[(u8, Value)]| -> Option<SyncDomain> {
            let entry = def.field_index("entry")?;
            fields
                .iter()
                .find(|(i, _)| usize::from(*i) == entry)
                .map(|(_, v)| {
                    if matches!(v, Value::Null) {
                        SyncDomain::Content
                    } else {
                        SyncDomain::Index
                    }
                })
        };
        match def.domain {
            keel_schema::DomainRule::Fixed(d) => d,
            keel_schema::DomainRule::ByScope => {
                let known = match &change.op {
                    Op::Upsert(fields) => scope_of(fields),
                    Op::Delete => None,
                };
                let domain = known
                    .or_else(|| self.domain_cache.get(&change.record).copied())
                    .or_else(|| self.lookup_user_metadata_domain(change.record))
                    .unwrap_or(SyncDomain::Content);
                self.cache_domain(change.record, domain);
                domain
            }
            keel_schema::DomainRule::ByParent(field) => {
                let parent = match (&change.op, def.field_index(field)) {
                    (Op::Upsert(fields), Some(index)) => fields.iter().find_map(|(i, v)| match v {
                        Value::Uuid(u) if usize::from(*i) == index => Some(*u),
                        _ => None,
                    }),
                    _ => None,
                };
                parent
                    .and_then(|p| {
                        self.domain_cache
                            .get(&p)
                            .copied()
                            .or_else(|| self.lookup_user_metadata_domain(p))
                    })
                    .unwrap_or(SyncDomain::Content)
            }
        }
    }

    fn cache_domain(&mut self, uuid: Uuid, domain: SyncDomain) {
        const DOMAIN_CACHE_MAX: usize = 100_000;
        if self.domain_cache.len() >= DOMAIN_CACHE_MAX {
            self.domain_cache.clear();
        }
        self.domain_cache.insert(uuid, domain);
    }

    fn lookup_user_metadata_domain(&self, uuid: Uuid) -> Option<SyncDomain> {
        self.conn
            .query_row(
                "SELECT entry IS NOT NULL FROM user_metadata WHERE uuid = ?1",
                [uuid.as_bytes().as_slice()],
                |r| r.get::<_, bool>(0),
            )
            .optional()
            .ok()
            .flatten()
            .map(|is_entry| {
                if is_entry {
                    SyncDomain::Index
                } else {
                    SyncDomain::Content
                }
            })
    }
}
