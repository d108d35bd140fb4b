//! The canonical digest: BLAKE3 over every row of every model table, sorted by uuid.
//!
//! Covers field values, clocks, tombstones and visibility; not the applied position or parked
//! changes (those describe progress, not state), nor the attestations (proofs checked as the
//! changes they vouch for are applied, not records: the same records signed in other commits
//! are the same library). Equal state gives an equal digest.

use rusqlite::types::ValueRef;

use crate::error::ProjectionError;
use crate::queries::Query;

pub(crate) fn hash_value(hasher: &mut blake3::Hasher, value: ValueRef<'_>) {
    match value {
        ValueRef::Null => {
            hasher.update(&[0]);
        }
        ValueRef::Integer(i) => {
            hasher.update(&[1]);
            hasher.update(&i.to_be_bytes());
        }
        ValueRef::Real(f) => {
            hasher.update(&[2]);
            hasher.update(&f.to_bits().to_be_bytes());
        }
        ValueRef::Text(t) => {
            hasher.update(&[3]);
            hasher.update(&(t.len() as u64).to_be_bytes());
            hasher.update(t);
        }
        ValueRef::Blob(b) => {
            hasher.update(&[4]);
            hasher.update(&(b.len() as u64).to_be_bytes());
            hasher.update(b);
        }
    }
}

impl Query<'_> {
    /// The digest of the whole projection, as 64 hex digits.
    pub fn digest(&self) -> Result<String, ProjectionError> {
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"keel projection digest v1");
        let attestation = <keel_schema::Attestation as keel_schema::Syncable>::DEF.name;
        for def in self.registry.iter().filter(|def| def.name != attestation) {
            hasher.update(def.name.as_bytes());
            let mut stmt = self
                .conn
                .prepare(&format!("SELECT * FROM {} ORDER BY uuid", def.name))?;
            let columns = stmt.column_count();
            let mut rows = stmt.query([])?;
            while let Some(row) = rows.next()? {
                hasher.update(&[0xAA]);
                for i in 0..columns {
                    hash_value(&mut hasher, row.get_ref(i)?);
                }
            }
        }
        Ok(hasher.finalize().to_hex().to_string())
    }
}
