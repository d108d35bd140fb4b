//! Visible rows of any model as field values, in uuid order: what a library merge reads from
//! the library it carries over and looks up in the one it joins (see `keel_engine::merge`).

use std::collections::HashMap;

use keel_schema::{ModelDef, Value};
use rusqlite::params_from_iter;
use uuid::Uuid;

use crate::apply::read_value;
use crate::error::ProjectionError;
use crate::queries::{Query, EXISTING_CHUNK};

/// A visible record: its uuid and its synced fields' values, in the model's field order.
pub type RowValues = (Uuid, Vec<Value>);

impl Query<'_> {
    /// At most `limit` visible records of model `def` whose uuid sorts after `after` (from
    /// the first without it), in uuid order.
    pub fn rows_after(
        &self,
        def: &ModelDef,
        after: Option<Uuid>,
        limit: usize,
    ) -> Result<Vec<RowValues>, ProjectionError> {
        let from = after.map(|u| u.as_bytes().to_vec()).unwrap_or_default();
        let sql = format!(
            "SELECT uuid, {} FROM {} WHERE _live = 1 AND uuid > ?1 ORDER BY uuid LIMIT ?2",
            columns(def),
            def.name
        );
        let mut stmt = self.conn.prepare_cached(&sql)?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut rows = stmt.query((from.as_slice(), limit))?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            out.push(row_values(def, row)?);
        }
        Ok(out)
    }

    /// The visible records of model `def` among `uuids`, by uuid (256 per statement).
    pub fn rows_in(
        &self,
        def: &ModelDef,
        uuids: &[Uuid],
    ) -> Result<HashMap<Uuid, Vec<Value>>, ProjectionError> {
        let mut out = HashMap::with_capacity(uuids.len());
        for chunk in uuids.chunks(EXISTING_CHUNK) {
            let marks = vec!["?"; chunk.len()].join(",");
            let sql = format!(
                "SELECT uuid, {} FROM {} WHERE _live = 1 AND uuid IN ({marks})",
                columns(def),
                def.name
            );
            let mut stmt = self.conn.prepare_cached(&sql)?;
            let params = params_from_iter(chunk.iter().map(|u| u.as_bytes().as_slice()));
            let mut rows = stmt.query(params)?;
            while let Some(row) = rows.next()? {
                let (uuid, values) = row_values(def, row)?;
                out.insert(uuid, values);
            }
        }
        Ok(out)
    }

    /// How many visible records model `def` has.
    pub fn live_count(&self, def: &ModelDef) -> Result<u64, ProjectionError> {
        let sql = format!("SELECT COUNT(*) FROM {} WHERE _live = 1", def.name);
        let n: i64 = self.conn.query_row(&sql, [], |r| r.get(0))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }
}

fn columns(def: &ModelDef) -> String {
    let names: Vec<&str> = def.fields.iter().map(|f| f.name).collect();
    names.join(", ")
}

fn row_values(def: &ModelDef, row: &rusqlite::Row<'_>) -> Result<RowValues, ProjectionError> {
    let uuid = crate::ranges::uuid_of(def, row.get_ref(0)?)?;
    let mut values = Vec::with_capacity(def.fields.len());
    for i in 0..def.fields.len() {
        values.push(read_value(def, i, row.get_ref(i + 1)?)?);
    }
    Ok((uuid, values))
}
