//! Conflicts: concurrent writes to one field, found as the log is applied (see
//! `keel_projections`' conflicts and decision 0051).

use keel_projections::Conflict;
use keel_schema::Value;
use uuid::Uuid;

use crate::error::EngineError;
use crate::library::{CommitReceipt, Library};

impl Library {
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
