//! Conflicts: concurrent writes to one field, found as the log is applied (see
//! `keel_projections`' conflicts and decision 0051).

use keel_projections::Conflict;

use crate::error::EngineError;
use crate::library::Library;

impl Library {
    /// Every conflict recorded, in log order: two devices wrote one field while neither had
    /// seen the other's write. Every device records the same ones, with the same ids and
    /// winners; the field shows the winner's value.
    pub fn conflicts(&self) -> Result<Vec<Conflict>, EngineError> {
        self.read(|p| p.query().conflicts())
    }
}
