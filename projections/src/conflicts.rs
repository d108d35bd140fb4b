//! Conflicts: two devices' writes to one field, neither of which saw the other (decision 0051).
//!
//! A change carries its causal context, `Change::seen`: the log position its writer had
//! applied when it wrote it. The log orders every change the same way on every device, so a
//! write `y` at log position `p` to a field whose last log write `x` (at `q < p`) came from
//! another device is concurrent with it iff `y.seen < q`, and then, if their values differ,
//! both are recorded as a conflict. A device's own later write is concurrent with its earlier
//! one only if it was made with less of the log seen (`y.seen < x.seen`): a device's context
//! only grows, so that is a write a merge carried from another library (decision 0052).
//! Only log entries are looked at, in log order, and only fields a user edits (of models that
//! `ModelDef::user_edited` accepts, references left out: a tag set is a set of records, merged
//! by union). So every device records the same conflicts with the same ids, and a replay
//! records them again. The field's value itself
//! is still last-writer-wins, as everywhere: the conflict says what was overwritten.
//!
//! `_field_writes` keeps the last log write of each such field; `_conflicts` the record (both
//! created with the other internal tables, `crate::ddl::INTERNAL`).

use keel_schema::{Change, ChangeId, DeviceId, Hlc, ModelDef, Op, Registry, Value};
use rusqlite::{Connection, OptionalExtension};
use uuid::Uuid;

use crate::apply::{read_value, Param};
use crate::error::ProjectionError;

/// The default strategy: the later clock wins, as the field shows by last-writer-wins.
pub const LATEST_WINS: &str = "latest-wins";
/// A named device's value wins (`ConflictPolicy::device`); the field is set to it on every
/// device alike, without a change, as the conflict is found.
pub const PREFER_DEVICE: &str = "prefer-device";
/// The later clock shows until a user picks (`Library::resolve_conflict`).
pub const MANUAL: &str = "manual";
/// Most resolved conflicts kept as history (the oldest in the log are dropped first, the same
/// ones on every device). Unresolved ones are all kept.
pub const CONFLICT_HISTORY_MAX: usize = 1_000;

/// One side of a conflict: a write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConflictSide {
    /// The change.
    pub change: ChangeId,
    /// The device that wrote it.
    pub device: DeviceId,
    /// Its clock (`physical_ms` is when it was written).
    pub hlc: Hlc,
    /// The value it wrote.
    pub value: Value,
}

/// Two concurrent writes to one field, as recorded (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    /// Its id: the same on every device.
    pub id: Uuid,
    /// The log position of the later write, where it was found.
    pub position: u64,
    /// The model.
    pub model: &'static str,
    /// The record.
    pub record: Uuid,
    /// The field.
    pub field: &'static str,
    /// The earlier write in the log, then the later one.
    pub sides: [ConflictSide; 2],
    /// Which side's value won (an index into `sides`).
    pub winner: usize,
    /// The strategy that picked it.
    pub strategy: String,
    /// The first later write to the field made by a device that had seen the conflict (a
    /// pick, or any edit after it), and its log position: then it is resolved.
    pub resolved: Option<(ChangeId, u64)>,
}

/// The last log write of a field.
struct Written {
    pos: u64,
    /// The causal context it was written with (its `Change::seen`).
    seen: u64,
    change: Uuid,
    hlc: Hlc,
    value: Value,
}

/// Looks at the log entries among `changes` (`logged[i]`: the log position of `changes[i]`,
/// `None` for a local one; missing entries are `None`), in order, and records the conflicts
/// they make. Returns how many it recorded. Runs in the caller's transaction.
pub(crate) fn observe(
    conn: &Connection,
    registry: &Registry,
    changes: &[Change],
    logged: &[Option<u64>],
) -> Result<u64, ProjectionError> {
    let mut recorded = 0;
    let policy_code = keel_schema::code_of::<keel_schema::ConflictPolicy>();
    for (change, pos) in changes.iter().zip(logged) {
        let (Some(pos), Some(def)) = (pos, registry.get(change.model)) else {
            continue;
        };
        if change.model == policy_code {
            // In log order, so that a conflict later in the same batch is settled by it.
            take_policy(conn, def, change)?;
        }
        if !def.user_edited() {
            continue;
        }
        let Op::Upsert(fields) = &change.op else {
            forget_writes_before(conn, change.model, change.record, change.hlc)?;
            continue;
        };
        for (index, value) in fields {
            let Some(field) = def.fields.get(usize::from(*index)) else {
                continue;
            };
            if field.references.is_some() {
                continue;
            }
            let previous = last_write(conn, def, change, *index)?;
            if previous.as_ref().is_some_and(|p| p.pos >= *pos) {
                // Seen already (the same entry applied again).
                continue;
            }
            if let Some(previous) = previous {
                // Another device's write not seen; or this device's own, made with less of
                // the log seen than the write it follows (a device's context only grows: such
                // a write was carried from another library by a merge, decision 0052).
                let unseen =
                    previous.hlc.device != change.hlc.device || change.seen < previous.seen;
                let concurrent = unseen && change.seen < previous.pos && previous.value != *value;
                if concurrent {
                    recorded += record(conn, def, change, (*pos, *index, value), &previous)?;
                }
            }
            if resolve(conn, change, (*pos, *index))? {
                prune(conn)?;
            }
            let mut stmt = conn.prepare_cached(
                "INSERT INTO _field_writes (model, record, field, pos, change, hlc, value, seen) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT (model, record, field) \
                 DO UPDATE SET pos = excluded.pos, change = excluded.change, hlc = excluded.hlc, \
                 value = excluded.value, seen = excluded.seen",
            )?;
            stmt.execute((
                i64::from(change.model),
                change.record.as_bytes().as_slice(),
                i64::from(*index),
                i64::try_from(*pos).unwrap_or(i64::MAX),
                change.id.0.as_bytes().as_slice(),
                change.hlc.to_bytes().as_slice(),
                Param::Value(value),
                i64::try_from(change.seen).unwrap_or(i64::MAX),
            ))?;
        }
    }
    Ok(recorded)
}

/// Forgets the last log writes of `record` made before its delete `tomb`, as its row forgets their
/// values (see [`crate::apply`]): a later write is then compared with what a record that never
/// existed would hold, so a device that collected the row records the same conflicts.
pub(crate) fn forget_writes_before(
    conn: &Connection,
    model: u8,
    record: Uuid,
    tomb: Hlc,
) -> Result<(), ProjectionError> {
    let key = (i64::from(model), record.as_bytes().as_slice());
    let mut older = Vec::new();
    {
        let mut stmt = conn.prepare_cached(
            "SELECT field, hlc FROM _field_writes WHERE model = ?1 AND record = ?2",
        )?;
        let mut rows = stmt.query(key)?;
        while let Some(r) = rows.next()? {
            let hlc = Hlc::from_bytes(&r.get::<_, Vec<u8>>(1)?)
                .ok_or_else(|| ProjectionError::MalformedRow("_field_writes".into()))?;
            if crate::clocks::stored(hlc) < tomb {
                older.push(r.get::<_, i64>(0)?);
            }
        }
    }
    let mut stmt = conn.prepare_cached(
        "DELETE FROM _field_writes WHERE model = ?1 AND record = ?2 AND field = ?3",
    )?;
    for field in older {
        stmt.execute((key.0, key.1, field))?;
    }
    Ok(())
}

/// Takes a [`keel_schema::ConflictPolicy`] change into `_policies` (its fields merged into the
/// record's; a delete removes it).
fn take_policy(conn: &Connection, def: &ModelDef, change: &Change) -> Result<(), ProjectionError> {
    let record = change.record.as_bytes().as_slice();
    let Op::Upsert(fields) = &change.op else {
        conn.prepare_cached("DELETE FROM _policies WHERE record = ?1")?
            .execute([record])?;
        return Ok(());
    };
    conn.prepare_cached("INSERT OR IGNORE INTO _policies (record) VALUES (?1)")?
        .execute([record])?;
    for (index, value) in fields {
        let column = match def.fields.get(usize::from(*index)).map(|f| f.name) {
            Some("model") => "model",
            Some("strategy") => "strategy",
            Some("device") => "device",
            _ => continue,
        };
        let sql = format!("UPDATE _policies SET {column} = ?1 WHERE record = ?2");
        conn.prepare_cached(&sql)?
            .execute((Param::Value(value), record))?;
    }
    Ok(())
}

/// The strategy for conflicts on model `model` (its own policy, else the library's default,
/// else latest-wins) and, for prefer-device, the device (hex).
fn policy_for(conn: &Connection, model: &str) -> Result<(String, Option<String>), ProjectionError> {
    let mut stmt = conn.prepare_cached(
        "SELECT strategy, device FROM _policies WHERE model = ?1 OR model = '' \
         ORDER BY model = ?1 DESC LIMIT 1",
    )?;
    let found = stmt
        .query_row([model], |r| {
            Ok((
                r.get::<_, Option<String>>(0)?,
                r.get::<_, Option<String>>(1)?,
            ))
        })
        .optional()?;
    Ok(match found {
        Some((Some(strategy), device)) if [PREFER_DEVICE, MANUAL].contains(&strategy.as_str()) => {
            (strategy, device)
        }
        _ => (LATEST_WINS.to_string(), None),
    })
}

/// Sets field `index` of `record` to the winner's value where the row shows the conflict's later
/// write (its field clock is `latest`): a row that shows a write applied here before its log
/// copy came is left for that write's own turn, so every device ends alike.
fn settle(
    conn: &Connection,
    def: &ModelDef,
    record: Uuid,
    (index, value): (u8, &Value),
    latest: Hlc,
) -> Result<(), ProjectionError> {
    let select = format!("SELECT _clocks FROM {} WHERE uuid = ?1", def.name);
    let clocks: Option<Vec<u8>> = conn
        .prepare_cached(&select)?
        .query_row([record.as_bytes().as_slice()], |r| r.get(0))
        .optional()?
        .flatten();
    let shows_latest = clocks
        .and_then(|b| crate::clocks::FieldClocks::decode(&b, def.fields.len()))
        .and_then(|c| c.0.get(usize::from(index)).copied().flatten())
        == Some(crate::clocks::stored(latest));
    let Some(field) = def.fields.get(usize::from(index)).filter(|_| shows_latest) else {
        return Ok(());
    };
    let update = format!(
        "UPDATE {} SET {} = ?1 WHERE uuid = ?2",
        def.name, field.name
    );
    conn.prepare_cached(&update)?
        .execute((Param::Value(value), record.as_bytes().as_slice()))?;
    Ok(())
}

/// Marks the conflicts on field `index` of `change`'s record that its writer had seen as
/// resolved by it (at log position `pos`). Returns whether it marked any.
fn resolve(
    conn: &Connection,
    change: &Change,
    (pos, index): (u64, u8),
) -> Result<bool, ProjectionError> {
    if change.seen == 0 {
        return Ok(false);
    }
    let mut stmt = conn.prepare_cached(
        "UPDATE _conflicts SET resolved_by = ?1, resolved_pos = ?2 WHERE model = ?3 \
         AND record = ?4 AND field = ?5 AND resolved_by IS NULL AND pos <= ?6",
    )?;
    let marked = stmt.execute((
        change.id.0.as_bytes().as_slice(),
        i64::try_from(pos).unwrap_or(i64::MAX),
        i64::from(change.model),
        change.record.as_bytes().as_slice(),
        i64::from(index),
        i64::try_from(change.seen).unwrap_or(i64::MAX),
    ))?;
    Ok(marked > 0)
}

/// Drops the oldest resolved conflicts beyond [`CONFLICT_HISTORY_MAX`].
fn prune(conn: &Connection) -> Result<(), ProjectionError> {
    let mut stmt = conn.prepare_cached(
        "DELETE FROM _conflicts WHERE id IN (SELECT id FROM _conflicts \
         WHERE resolved_by IS NOT NULL ORDER BY pos, id LIMIT max(0, \
         (SELECT count(*) FROM _conflicts WHERE resolved_by IS NOT NULL) - ?1))",
    )?;
    stmt.execute([i64::try_from(CONFLICT_HISTORY_MAX).unwrap_or(i64::MAX)])?;
    Ok(())
}

/// The last log write of field `index` of `change`'s record, if any.
fn last_write(
    conn: &Connection,
    def: &ModelDef,
    change: &Change,
    index: u8,
) -> Result<Option<Written>, ProjectionError> {
    let mut stmt = conn.prepare_cached(
        "SELECT pos, change, hlc, value, seen FROM _field_writes \
         WHERE model = ?1 AND record = ?2 AND field = ?3",
    )?;
    let raw = stmt
        .query_row(
            (
                i64::from(change.model),
                change.record.as_bytes().as_slice(),
                i64::from(index),
            ),
            |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, Vec<u8>>(1)?,
                    r.get::<_, Vec<u8>>(2)?,
                    read_value(def, usize::from(index), r.get_ref(3)?),
                    r.get::<_, i64>(4)?,
                ))
            },
        )
        .optional()?;
    let Some((pos, id, hlc, value, seen)) = raw else {
        return Ok(None);
    };
    let bad = || ProjectionError::MalformedRow("_field_writes".into());
    Ok(Some(Written {
        pos: u64::try_from(pos).map_err(|_| bad())?,
        seen: u64::try_from(seen).map_err(|_| bad())?,
        change: Uuid::from_slice(&id).map_err(|_| bad())?,
        hlc: Hlc::from_bytes(&hlc).ok_or_else(bad)?,
        value: value?,
    }))
}

/// Records the conflict between `previous` and `change` (writing `value` to field `index`, at
/// log position `pos`); returns 1 if it was new.
fn record(
    conn: &Connection,
    def: &ModelDef,
    change: &Change,
    (pos, index, value): (u64, u8, &Value),
    previous: &Written,
) -> Result<u64, ProjectionError> {
    let mut key = blake3::Hasher::new();
    key.update(b"keel conflict v1");
    key.update(&[change.model, index]);
    key.update(change.record.as_bytes());
    key.update(previous.change.as_bytes());
    key.update(change.id.0.as_bytes());
    let mut id = [0u8; 16];
    id.copy_from_slice(&key.finalize().as_bytes()[..16]);
    let latest = usize::from(change.hlc > previous.hlc);
    let (strategy, preferred) = policy_for(conn, def.name)?;
    let winner = match preferred.filter(|_| strategy == PREFER_DEVICE) {
        Some(device) if change.hlc.device.to_hex() == device => 1,
        Some(device) if previous.hlc.device.to_hex() == device => 0,
        _ => latest,
    };
    if winner != latest {
        let latest_hlc = if latest == 1 {
            change.hlc
        } else {
            previous.hlc
        };
        let kept = if winner == 1 { value } else { &previous.value };
        settle(conn, def, change.record, (index, kept), latest_hlc)?;
    }
    let winner = i64::try_from(winner).unwrap_or(0);
    let mut stmt = conn.prepare_cached(
        "INSERT OR IGNORE INTO _conflicts (id, pos, model, record, field, a_change, a_hlc, \
         a_value, b_change, b_hlc, b_value, winner, strategy) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
    )?;
    let inserted = stmt.execute(rusqlite::params![
        id.as_slice(),
        i64::try_from(pos).unwrap_or(i64::MAX),
        i64::from(def.code),
        change.record.as_bytes().as_slice(),
        i64::from(index),
        previous.change.as_bytes().as_slice(),
        previous.hlc.to_bytes().as_slice(),
        Param::Value(&previous.value),
        change.id.0.as_bytes().as_slice(),
        change.hlc.to_bytes().as_slice(),
        Param::Value(value),
        winner,
        strategy,
    ])?;
    Ok(inserted as u64)
}

/// The conflicts recorded, oldest first; the newest `limit` of them when it is given.
fn all(
    conn: &Connection,
    registry: &Registry,
    limit: Option<usize>,
) -> Result<Vec<Conflict>, ProjectionError> {
    let mut stmt = conn.prepare_cached(
        "SELECT * FROM (SELECT id, pos, model, record, field, a_change, a_hlc, a_value, \
         b_change, b_hlc, b_value, winner, strategy, resolved_by, resolved_pos FROM _conflicts \
         ORDER BY pos DESC, id DESC LIMIT ?1) ORDER BY pos, id",
    )?;
    let limit = limit.map_or(-1, |n| i64::try_from(n).unwrap_or(i64::MAX));
    let mut rows = stmt.query([limit])?;
    let mut conflicts = Vec::new();
    let bad = || ProjectionError::MalformedRow("_conflicts".into());
    while let Some(r) = rows.next()? {
        let code = u8::try_from(r.get::<_, i64>(2)?).map_err(|_| bad())?;
        let index = usize::try_from(r.get::<_, i64>(4)?).map_err(|_| bad())?;
        let def = registry.get(code).ok_or_else(bad)?;
        let field = def.fields.get(index).ok_or_else(bad)?;
        let side =
            |change: usize, hlc: usize, value: usize| -> Result<ConflictSide, ProjectionError> {
                let hlc = Hlc::from_bytes(&r.get::<_, Vec<u8>>(hlc)?).ok_or_else(bad)?;
                Ok(ConflictSide {
                    change: ChangeId(
                        Uuid::from_slice(&r.get::<_, Vec<u8>>(change)?).map_err(|_| bad())?,
                    ),
                    device: hlc.device,
                    hlc,
                    value: read_value(def, index, r.get_ref(value)?)?,
                })
            };
        conflicts.push(Conflict {
            id: Uuid::from_slice(&r.get::<_, Vec<u8>>(0)?).map_err(|_| bad())?,
            position: u64::try_from(r.get::<_, i64>(1)?).map_err(|_| bad())?,
            model: def.name,
            record: Uuid::from_slice(&r.get::<_, Vec<u8>>(3)?).map_err(|_| bad())?,
            field: field.name,
            sides: [side(5, 6, 7)?, side(8, 9, 10)?],
            winner: usize::from(r.get::<_, i64>(11)? != 0),
            strategy: r.get(12)?,
            resolved: match (
                r.get::<_, Option<Vec<u8>>>(13)?,
                r.get::<_, Option<i64>>(14)?,
            ) {
                (Some(by), Some(at)) => Some((
                    ChangeId(Uuid::from_slice(&by).map_err(|_| bad())?),
                    u64::try_from(at).map_err(|_| bad())?,
                )),
                _ => None,
            },
        });
    }
    Ok(conflicts)
}

impl crate::Query<'_> {
    /// Every conflict recorded, in log order (see the module docs of `conflicts`).
    pub fn conflicts(&self) -> Result<Vec<Conflict>, ProjectionError> {
        all(self.connection(), &self.registry, None)
    }

    /// The newest `n` conflicts recorded, in log order.
    pub fn latest_conflicts(&self, n: usize) -> Result<Vec<Conflict>, ProjectionError> {
        all(self.connection(), &self.registry, Some(n))
    }
}
