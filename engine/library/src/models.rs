//! What a host app asks of a library beyond records: its own models (recorded at open, checked
//! against the record, what this device lacks: decision 0045) and full-text search.

use keel_projections::SearchHit;
use keel_schema::{registered_model_uuid, RegisteredModel, Syncable};
use serde::{Deserialize, Serialize};

use crate::error::EngineError;
use crate::library::Library;

/// Changes of a model (or a newer version of one) that this device's app lacks: journaled and
/// kept, not applied, until an app that knows it opens the library.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "typescript", derive(ts_rs::TS))]
pub struct LackingModel {
    /// The model's code.
    pub code: u8,
    /// Its name, if a device that knows it recorded it in the library.
    pub name: Option<String>,
    /// The newest version of its changes kept here.
    pub version: u8,
    /// The version this app knows (`None`: it does not know the model at all).
    pub known_version: Option<u8>,
    /// How many changes are kept.
    pub changes: u64,
}

impl Library {
    /// Records each host model of the library's registry (see [`RegisteredModel`]): written
    /// when the library has no record of it or records an older version. Refused before
    /// anything is written if the library records another model under one of its codes.
    pub(crate) fn record_models(&self) -> Result<(), EngineError> {
        let mut missing = Vec::new();
        for def in self.models().host_models() {
            let uuid = registered_model_uuid(def.code);
            match self.get::<RegisteredModel>(uuid)? {
                Some(recorded) if recorded.name != def.name => {
                    return Err(EngineError::ModelClash {
                        code: def.code,
                        registered: def.name.into(),
                        recorded: recorded.name,
                    });
                }
                Some(recorded) if recorded.version >= i64::from(def.version) => {}
                _ => missing.push(RegisteredModel {
                    uuid,
                    code: i64::from(def.code),
                    name: def.name.into(),
                    version: i64::from(def.version),
                }),
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        self.transact(|tx| {
            for record in missing {
                tx.upsert_owned(record);
            }
            Ok(())
        })?;
        // Applied before the library is handed over, so what it records reads back at once.
        self.flush()
    }

    /// The models, or versions of models, whose changes this device keeps without applying
    /// them (its app lacks them), named where the library records their names.
    pub fn lacking_models(&self) -> Result<Vec<LackingModel>, EngineError> {
        let lacking = self.read(|p| p.query().lacking_models())?;
        let mut out = Vec::with_capacity(lacking.len());
        for l in lacking {
            let recorded = self.get::<RegisteredModel>(registered_model_uuid(l.model))?;
            out.push(LackingModel {
                code: l.model,
                name: recorded.map(|r| r.name),
                version: l.version,
                known_version: self.models().get(l.model).map(|d| d.version),
                changes: l.changes,
            });
        }
        Ok(out)
    }

    /// Visible entries whose name, or a note on them or on their content, has every word of
    /// `text` (see [`keel_projections::Query::search`]), at most `limit`. The first search
    /// builds the index (a pass over the entries and notes); every apply after keeps it current.
    pub fn search(&self, text: &str, limit: usize) -> Result<Vec<SearchHit>, EngineError> {
        if !self.read(|p| p.query().search_enabled())? {
            let mut writer = self
                .shared
                .projections
                .lock()
                .map_err(|_| EngineError::Closed)?;
            writer.enable_search()?;
        }
        self.read(|p| p.query().search(text, limit))
    }

    /// The host models this library records (from every device that opened it), in code order.
    pub fn recorded_models(&self) -> Result<Vec<RegisteredModel>, EngineError> {
        self.read(|p| {
            let mut models = p.query().select::<RegisteredModel, _>("1", [])?;
            models.sort_by_key(|m| m.code);
            Ok(models)
        })
    }
}

/// Keel's check that the registered-model record is one of Keel's models (it is read by code).
const _: () = assert!(RegisteredModel::DEF.code < keel_schema::HOST_CODE_MIN);
