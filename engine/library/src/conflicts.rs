//! Conflicts: concurrent writes to one field, found as the log is applied (see
//! `keel_projections`' conflicts and decision 0051).

use keel_projections::Conflict;
use keel_schema::{ConflictPolicy, DeviceId, Value};
use uuid::Uuid;

use crate::error::EngineError;
use crate::library::{CommitReceipt, Library};

/// How a model's conflicts are settled (see [`Library::set_conflict_strategy`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// The later write wins (the default).
    LatestWins,
    /// This device's write wins.
    PreferDevice(DeviceId),
    /// The later write shows until a user picks ([`Library::resolve_conflict`]).
    Manual,
}

impl Library {
    /// Sets how conflicts on `model` (a model's name; `None`: every model without its own) are
    /// settled, for every device: a synced record, taken in log order, so conflicts found after
    /// it are settled by it everywhere alike.
    pub fn set_conflict_strategy(
        &self,
        model: Option<&str>,
        strategy: Strategy,
    ) -> Result<(), EngineError> {
        let model = model.unwrap_or_default();
        if !model.is_empty() && !self.models().iter().any(|d| d.name == model) {
            return Err(EngineError::NoSuchModel(model.to_string()));
        }
        let (name, device) = match strategy {
            Strategy::LatestWins => (keel_projections::LATEST_WINS, None),
            Strategy::PreferDevice(device) => {
                (keel_projections::PREFER_DEVICE, Some(device.to_hex()))
            }
            Strategy::Manual => (keel_projections::MANUAL, None),
        };
        let policy = ConflictPolicy {
            uuid: keel_schema::conflict_policy_uuid(model),
            model: model.to_string(),
            strategy: name.to_string(),
            device,
        };
        self.transact(|tx| {
            tx.upsert(&policy);
            Ok(())
        })?;
        Ok(())
    }

    /// Every conflict recorded, in log order: two devices wrote one field while neither had
    /// seen the other's write. Every device records the same ones, with the same ids and
    /// winners; the field shows the winner's value.
    pub fn conflicts(&self) -> Result<Vec<Conflict>, EngineError> {
        self.read(|p| p.query().conflicts())
    }

    /// Resolves conflict `id` by writing `value` to its field: an ordinary change, made after
    /// the conflict was seen, so it wins on every device and marks the conflict resolved there
    /// once it is in the log. `value` may be either side's or another.
    pub fn resolve_conflict(&self, id: Uuid, value: Value) -> Result<CommitReceipt, EngineError> {
        let conflict = self
            .conflicts()?
            .into_iter()
            .find(|c| c.id == id)
            .ok_or(EngineError::NoSuchConflict(id))?;
        let def = self
            .models()
            .iter()
            .find(|d| d.name == conflict.model)
            .ok_or(EngineError::NoSuchConflict(id))?;
        let index = def
            .field_index(conflict.field)
            .and_then(|i| u8::try_from(i).ok())
            .ok_or(EngineError::NoSuchConflict(id))?;
        let (_, receipt) = self.transact(|tx| {
            tx.write_field(def, conflict.record, (index, value));
            Ok(())
        })?;
        Ok(receipt)
    }
}
