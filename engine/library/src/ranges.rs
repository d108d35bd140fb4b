//! What anti-entropy needs of a library (decision 0054): its models' rows cut into key ranges
//! with their digests, a range's rows as images, and the replacement of a range by another
//! device's rows. The node compares and repairs ranges with a peer (`keel_node::anti_entropy`).

use keel_projections::{KeyRange, RangeDigest};
use keel_schema::{Attestation, Lsn, ModelDef, Syncable};
use uuid::Uuid;

use crate::error::EngineError;
use crate::library::Library;

/// A library's rows by key range; from [`Library::ranges`].
#[derive(Clone, Copy)]
pub struct Ranges<'a> {
    library: &'a Library,
}

impl Library {
    /// Its rows by key range, for anti-entropy.
    pub fn ranges(&self) -> Ranges<'_> {
        Ranges { library: self }
    }
}

impl Ranges<'_> {
    /// The models two devices compare: every model but the attestations (proofs, not records;
    /// the digest leaves them out too), in code order.
    pub fn models(&self) -> Vec<&'static ModelDef> {
        self.library
            .models()
            .iter()
            .filter(|def| def.name != Attestation::DEF.name)
            .collect()
    }

    /// The model with code `code`, if it is compared.
    pub fn model(&self, code: u8) -> Result<&'static ModelDef, EngineError> {
        self.models()
            .into_iter()
            .find(|def| def.code == code)
            .ok_or_else(|| EngineError::NoSuchModel(format!("code {code}")))
    }

    /// The rows of `def` in `within`, cut into at most `parts` ranges of about equal row
    /// counts, with their digests, and the log position the projection has applied (read
    /// together).
    pub fn split(
        &self,
        def: &ModelDef,
        within: KeyRange,
        parts: usize,
    ) -> Result<(Lsn, Vec<(KeyRange, RangeDigest)>), EngineError> {
        self.library.read(|p| {
            Ok((
                p.applied_position()?.log,
                p.query().split_range(def, within, parts)?,
            ))
        })
    }

    /// The digests of `ranges` of `def`, and the log position the projection has applied.
    pub fn digests(
        &self,
        def: &ModelDef,
        ranges: &[KeyRange],
    ) -> Result<(Lsn, Vec<RangeDigest>), EngineError> {
        self.library.read(|p| {
            Ok((
                p.applied_position()?.log,
                p.query().range_digests(def, ranges)?,
            ))
        })
    }

    /// At most `limit` row images of `def` in `range` after `after`.
    pub fn rows(
        &self,
        def: &ModelDef,
        range: KeyRange,
        after: Option<Uuid>,
        limit: usize,
    ) -> Result<Vec<Vec<u8>>, EngineError> {
        self.library
            .read(|p| p.query().range_rows(def, range, after, limit))
    }

    /// Replaces the rows of `def` in `range` by `images` (another device's rows of that range,
    /// all of them); returns the rows written. Waits for what is committed to be applied
    /// first, and holds the applier back while it writes.
    pub fn replace(
        &self,
        def: &ModelDef,
        range: KeyRange,
        images: &[Vec<u8>],
    ) -> Result<u64, EngineError> {
        self.library.flush()?;
        let mut p = self
            .library
            .shared
            .projections
            .lock()
            .map_err(|_| EngineError::Closed)?;
        Ok(p.replace_range(def, range, images)?)
    }
}
