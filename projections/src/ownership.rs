//! The owner rule at apply time (see [`keel_schema::Owner`]): a change to file facts from any
//! device but their owner is refused, recorded in `_refused` with the reason, and not applied.
//!
//! A record's owner is fixed by the first change that names it (a Location's `device`, an
//! Entry's `location`) in apply order, which is log order on every device, and never changes
//! after: a later change that names another owner is refused. A change whose owner cannot be
//! known yet (its record or location is not here) is parked until it can (see decision 0040).

use keel_schema::{Change, DeviceId, ModelDef, Op, Owner, Value};
use rusqlite::OptionalExtension;
use uuid::Uuid;

use crate::apply::{Applier, Row};
use crate::error::ProjectionError;

/// What the owner rule says of one change.
pub(crate) enum Verdict {
    /// Apply it.
    Allowed,
    /// Refuse it, for this reason.
    Refused(String),
    /// Its owner is not known yet: park it, waiting for this record.
    Unknown(String),
}

/// A refused change, as [`crate::Query::refused`] lists it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[cfg_attr(feature = "typescript", derive(ts_rs::TS))]
pub struct RefusedChange {
    /// The change.
    pub id: keel_schema::ChangeId,
    /// Its model's name.
    pub model: String,
    /// The record it would have written.
    pub record: Uuid,
    /// The device that made it.
    pub origin: DeviceId,
    /// Why it was refused.
    pub reason: String,
}

fn uuid_in(values: &[(u8, Value)], field: u8) -> Option<Uuid> {
    values.iter().find_map(|(i, v)| match v {
        Value::Uuid(u) if *i == field => Some(*u),
        _ => None,
    })
}

fn uuid_of_row(row: Option<&Row>, field: u8) -> Option<Uuid> {
    match row?.values.get(usize::from(field))? {
        Value::Uuid(u) => Some(*u),
        _ => None,
    }
}

/// The owner a change names and the owner its stored row has: the record's owner if they
/// agree (or only one is known).
fn settle(
    named: Option<Uuid>,
    stored: Option<Uuid>,
    origin: Uuid,
    what: &str,
    change: &Change,
) -> Verdict {
    match (named, stored) {
        (Some(n), Some(s)) if n != s => Verdict::Refused(format!(
            "it gives {what} {} to another device",
            change.record
        )),
        (_, Some(owner)) | (Some(owner), None) if owner == origin => Verdict::Allowed,
        (_, Some(_)) | (Some(_), None) => {
            Verdict::Refused(format!("{what} {} is another device's", change.record))
        }
        (None, None) => Verdict::Unknown(format!("owner of {what}:{}", change.record)),
    }
}

impl Applier<'_> {
    /// The owner rule's verdict on `change`; `row` is its record's stored row, if any.
    pub(crate) fn verdict(
        &self,
        rule: Owner,
        change: &Change,
        row: Option<&Row>,
    ) -> Result<Verdict, ProjectionError> {
        let origin = self.origin_uuid(change.origin());
        let named = |field| match &change.op {
            Op::Upsert(fields) => uuid_in(fields, field),
            Op::Delete => None,
        };
        Ok(match rule {
            Owner::Anyone => Verdict::Allowed,
            Owner::Itself if change.record == origin => Verdict::Allowed,
            Owner::Itself => {
                Verdict::Refused("a Device record is written only by its device".into())
            }
            Owner::NamedIn { field } => {
                let named = match &change.op {
                    Op::Upsert(fields) => fields.iter().find_map(|(i, v)| match v {
                        Value::Text(t) if *i == field => Some(t.as_str()),
                        _ => None,
                    }),
                    Op::Delete => None,
                };
                if matches!(change.op, Op::Delete) {
                    Verdict::Refused("an endorsement is never deleted".into())
                } else if named == Some(change.origin().to_hex().as_str()) {
                    Verdict::Allowed
                } else {
                    Verdict::Refused("an endorsement is written only by its endorser".into())
                }
            }
            Owner::DeviceIn { field } => settle(
                named(field),
                uuid_of_row(row, field),
                origin,
                "location",
                change,
            ),
            Owner::LocationIn { field, .. } => {
                let named = named(field).map(|l| self.location_owner(l)).transpose()?;
                let stored = uuid_of_row(row, field)
                    .map(|l| self.location_owner(l))
                    .transpose()?;
                match (named, stored) {
                    // A location not here yet: its owner is not known.
                    (Some(None), _) | (_, Some(None)) => {
                        Verdict::Unknown(format!("owner of entry:{}", change.record))
                    }
                    (n, s) => settle(n.flatten(), s.flatten(), origin, "entry", change),
                }
            }
        })
    }

    /// Whether every change of a run of whole records (new rows) may be applied as is.
    pub(crate) fn run_allowed(
        &self,
        rule: Owner,
        run: &[&Change],
    ) -> Result<bool, ProjectionError> {
        if rule == Owner::Anyone {
            return Ok(true);
        }
        for change in run {
            if rule.guards(change) && !self.is_attested(change)? {
                return Ok(false);
            }
            if !matches!(self.verdict(rule, change, None)?, Verdict::Allowed) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The Device record uuid of `device` (a UUIDv5, so a SHA-1: remembered per device).
    fn origin_uuid(&self, device: DeviceId) -> Uuid {
        *self
            .origins
            .borrow_mut()
            .entry(device)
            .or_insert_with(|| device.record_uuid())
    }

    /// The device record uuid that owns location `uuid`; `None` if the location is not here.
    fn location_owner(&self, uuid: Uuid) -> Result<Option<Uuid>, ProjectionError> {
        if let Some(owner) = self.owners.borrow().get(&uuid) {
            return Ok(Some(*owner));
        }
        let mut stmt = self
            .conn
            .prepare_cached("SELECT device FROM location WHERE uuid = ?1")?;
        let owner: Option<Option<Vec<u8>>> = stmt
            .query_row([uuid.as_bytes().as_slice()], |r| r.get(0))
            .optional()?;
        let owner = owner.flatten().and_then(|b| Uuid::from_slice(&b).ok());
        if let Some(owner) = owner {
            self.owners.borrow_mut().insert(uuid, owner);
        }
        Ok(owner)
    }

    /// Records a refused change (once).
    pub(crate) fn refuse(
        &self,
        def: &ModelDef,
        change: &Change,
        reason: &str,
    ) -> Result<(), ProjectionError> {
        tracing::warn!(
            change = %change.id.0,
            origin = %change.origin().short(),
            model = def.name,
            %reason,
            "refused a change"
        );
        let mut stmt = self.conn.prepare_cached(
            "INSERT OR IGNORE INTO _refused (id, model, record, origin, reason) \
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        stmt.execute((
            change.id.0.as_bytes().as_slice(),
            def.name,
            change.record.as_bytes().as_slice(),
            change.origin().0.as_slice(),
            reason,
        ))?;
        Ok(())
    }
}

/// Changes of a model, or a version of one, that this library's app lacks: kept aside, not
/// applied (see [`crate::Query::lacking_models`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "typescript", derive(ts_rs::TS))]
pub struct Lacking {
    /// The model's code.
    pub model: u8,
    /// The newest version of its changes kept.
    pub version: u8,
    /// How many changes were kept.
    pub changes: u64,
}

impl crate::Query<'_> {
    /// The models (or model versions) whose changes this build lacks, by code, with how many
    /// changes of each were kept aside. Not applied: once the app registers the model or its
    /// newer version, the projection is built again from the journal and they are.
    pub fn lacking_models(&self) -> Result<Vec<Lacking>, ProjectionError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT model, max(version), count(*) FROM _lacking GROUP BY model ORDER BY model",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (model, version, count) = row?;
            let bad = || ProjectionError::MalformedRow("_lacking".into());
            out.push(Lacking {
                model: u8::try_from(model).map_err(|_| bad())?,
                version: u8::try_from(version).map_err(|_| bad())?,
                changes: u64::try_from(count).map_err(|_| bad())?,
            });
        }
        Ok(out)
    }

    /// The changes refused by the owner rule, oldest first.
    pub fn refused(&self) -> Result<Vec<RefusedChange>, ProjectionError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT id, model, record, origin, reason FROM _refused ORDER BY id")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, Vec<u8>>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Vec<u8>>(2)?,
                r.get::<_, Vec<u8>>(3)?,
                r.get::<_, String>(4)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, model, record, origin, reason) = row?;
            let bad = || ProjectionError::MalformedRow("_refused".into());
            out.push(RefusedChange {
                id: keel_schema::ChangeId(Uuid::from_slice(&id).map_err(|_| bad())?),
                model,
                record: Uuid::from_slice(&record).map_err(|_| bad())?,
                origin: DeviceId(origin.try_into().map_err(|_| bad())?),
                reason,
            });
        }
        Ok(out)
    }
}
