//! A projection of older models brought to the app's new ones in place (decision 0078).
//!
//! A projection built for other models is normally started over and replayed from the log
//! (see [`Projections::open_for`]). A compacted library cannot replay the positions before its
//! base: its snapshot holds them as rows. [`Projections::upgrade_models`] brings such a file
//! (a scratch copy: it is changed in place) to the new models:
//!
//! - a model the file lacks gets its table (empty: its changes were kept aside in `_lacking`);
//! - a model whose fields were extended (new fields after the old ones, each added in a later
//!   version) gets its table made again with the new columns in their place, and each of its rows written whole at the old version is
//!   upcast as its writer's change would be on a replay: defaults and the app's upcast steps,
//!   at the row's clock. A row whose old fields all carry one clock was written whole by one
//!   change, its last whole write: the upcast is the replay's exactly. A row whose fields
//!   were written at several clocks (a whole write, then partial edits) is upcast at its
//!   oldest clock with its current values: the replay's values for defaults, a clock no newer
//!   than the replay's; an app's upcast step sees the current values, not those of the last
//!   whole write ([`ModelsUpgrade::approximated`] counts them). A row never written whole is
//!   left as a replay leaves it;
//! - the changes kept aside in `_lacking` whose model and version the app now knows are
//!   applied, as a replay would apply them.
//!
//! A model whose fields were removed, renamed or reordered cannot be brought over: the rows
//! do not say what the old fields became ([`ProjectionError::ModelsNotUpgradable`]).

use std::path::Path;

use keel_schema::{Change, ChangeId, ModelDef, Op, Registry};
use rusqlite::{Connection, OptionalExtension};
use uuid::Uuid;

use crate::apply::read_value;
use crate::clocks::FieldClocks;
use crate::ddl::SCHEMA_VERSION;
use crate::{ProjectionError, Projections};

/// Rows upcast per applied batch.
const BATCH: usize = 4_096;

/// The internal columns of a model's table (see [`crate::ddl::create_table`]).
const INTERNAL_COLUMNS: &[&str] = &["uuid", "_clocks", "_tomb", "_live", "_entries", "_bytes"];

/// What [`Projections::upgrade_models`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ModelsUpgrade {
    /// Models whose fields were extended, and new models, by name.
    pub models: Vec<&'static str>,
    /// Rows upcast exactly as a replay would (one clock on every old field).
    pub upcast: u64,
    /// Rows upcast at their oldest clock (see the module docs).
    pub approximated: u64,
    /// Changes kept aside that the app now knows, applied.
    pub lacking_applied: u64,
}

/// A model whose table holds its first `old_fields` fields, written at version `old_version`.
struct Extended {
    def: &'static ModelDef,
    old_fields: usize,
    old_version: u8,
}

impl Projections {
    /// Whether the projection file at `path`, of this schema, was built for the models of
    /// `registry`; `None` if there is no such file, it cannot be read, or it is of another
    /// schema version (which opening migrates or starts over).
    pub fn built_for_models(path: &Path, registry: &Registry) -> Option<bool> {
        if !path.exists() {
            return None;
        }
        let conn = Connection::open(path).ok()?;
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .ok()?;
        if version != SCHEMA_VERSION {
            return None;
        }
        Self::built_for(&conn, registry).ok()
    }

    /// Brings the projection file at `path`, built by this schema for other models, to the
    /// models of `registry`, in place (see the module docs); `path` should be a scratch copy,
    /// moved into place once this returns. A file built for these models is left as it is.
    pub fn upgrade_models(
        path: &Path,
        registry: &Registry,
    ) -> Result<ModelsUpgrade, ProjectionError> {
        let mut report = ModelsUpgrade::default();
        let extended = {
            let conn = Self::connect(path)?;
            let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
            if version != SCHEMA_VERSION {
                return Err(ProjectionError::ModelsNotUpgradable(format!(
                    "the file is of projection schema {version}, not {SCHEMA_VERSION}"
                )));
            }
            if Self::built_for(&conn, registry)? {
                return Ok(report);
            }
            let extended = plan(&conn, registry, &mut report)?;
            rebuild_tables(&conn, &extended, registry)?;
            conn.close().map_err(|(_, e)| e)?;
            extended
        };
        // Stamped for the new models now: the new tables and indexes are made as at any open.
        let mut projections = Self::open_for(path, registry)?;
        for model in &extended {
            let (exact, approximated) = projections.upcast_rows(model)?;
            report.upcast += exact;
            report.approximated += approximated;
        }
        report.lacking_applied = projections.apply_known_lacking()?;
        Ok(report)
    }

    /// Folds the write-ahead log of the closed projection file at `path` into it, so that the
    /// file alone holds every commit (before it is copied or packed).
    pub fn checkpoint_file(path: &Path) -> Result<(), ProjectionError> {
        let conn = Connection::open(path)?;
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        conn.close().map_err(|(_, e)| e)?;
        Ok(())
    }

    /// Upcasts every row of `model` written whole at its old version (see the module docs):
    /// how many exactly, and how many at their oldest clock.
    fn upcast_rows(&mut self, model: &Extended) -> Result<(u64, u64), ProjectionError> {
        let def = model.def;
        let columns: Vec<&str> = def.fields[..model.old_fields]
            .iter()
            .map(|f| f.name)
            .collect();
        let select = format!(
            "SELECT rowid, uuid, _clocks, {} FROM {} WHERE rowid > ?1 ORDER BY rowid LIMIT {BATCH}",
            columns.join(", "),
            def.name
        );
        let restamp = format!("UPDATE {} SET _clocks = ?1 WHERE rowid = ?2", def.name);
        let (mut after, mut exact, mut approximated) = (0_i64, 0_u64, 0_u64);
        loop {
            let mut changes = Vec::with_capacity(BATCH);
            let mut restamps = Vec::with_capacity(BATCH);
            let mut last = None;
            {
                let mut stmt = self.conn.prepare(&select)?;
                let mut rows = stmt.query([after])?;
                while let Some(row) = rows.next()? {
                    let rowid = row.get::<_, i64>(0)?;
                    last = Some(rowid);
                    let Some(clocks) = old_clocks(model, row)? else {
                        continue;
                    };
                    restamps.push((rowid, restamped(model, &clocks)));
                    let Some((change, uniform)) = whole_row_change(model, row, &clocks)? else {
                        continue;
                    };
                    if uniform {
                        exact += 1;
                    } else {
                        approximated += 1;
                    }
                    changes.push(change);
                }
            }
            let Some(last) = last else {
                return Ok((exact, approximated));
            };
            after = last;
            {
                let tx = self.conn.unchecked_transaction()?;
                let mut stmt = tx.prepare_cached(&restamp)?;
                for (rowid, blob) in &restamps {
                    stmt.execute((blob, rowid))?;
                }
                drop(stmt);
                tx.commit()?;
            }
            if !changes.is_empty() {
                self.apply(&changes, None)?;
            }
        }
    }

    /// Applies the changes kept aside whose model and version the registry now knows, and
    /// removes them from `_lacking`: how many.
    fn apply_known_lacking(&mut self) -> Result<u64, ProjectionError> {
        let kept: Vec<(Vec<u8>, i64, i64, Vec<u8>)> = {
            let mut stmt = self
                .conn
                .prepare("SELECT id, model, version, change FROM _lacking ORDER BY id")?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?;
            rows.collect::<Result<_, _>>()?
        };
        let mut applied = 0;
        for chunk in kept.chunks(BATCH) {
            let mut changes = Vec::new();
            let mut ids = Vec::new();
            for (id, model, version, bytes) in chunk {
                let known = u8::try_from(*model)
                    .ok()
                    .and_then(|code| self.registry.get(code))
                    .is_some_and(|def| i64::from(def.version) >= *version);
                if !known {
                    continue;
                }
                changes.push(Change::decode(bytes)?);
                ids.push(id.clone());
            }
            if changes.is_empty() {
                continue;
            }
            self.apply(&changes, None)?;
            let mut delete = self
                .conn
                .prepare_cached("DELETE FROM _lacking WHERE id = ?1")?;
            for id in &ids {
                delete.execute([id])?;
            }
            applied += changes.len() as u64;
        }
        Ok(applied)
    }
}

/// The models of `registry` whose tables in `conn` hold fewer fields than the model now has;
/// the models without a table are noted in `report` (their tables are made at the next open).
fn plan(
    conn: &Connection,
    registry: &Registry,
    report: &mut ModelsUpgrade,
) -> Result<Vec<Extended>, ProjectionError> {
    let mut extended = Vec::new();
    for def in registry.iter() {
        let columns = table_columns(conn, def.name)?;
        if columns.is_empty() {
            report.models.push(def.name);
            continue;
        }
        let old_fields = columns.len();
        let names: Vec<&str> = def.fields.iter().map(|f| f.name).collect();
        let prefix =
            old_fields <= names.len() && columns.iter().zip(&names).all(|(c, n)| c.as_str() == *n);
        if !prefix {
            return Err(ProjectionError::ModelsNotUpgradable(format!(
                "model {}: its stored fields {columns:?} are not the first of {names:?} (a field was removed, renamed or moved)",
                def.name
            )));
        }
        if old_fields == names.len() {
            continue;
        }
        let old_version = def.fields[..old_fields]
            .iter()
            .map(|f| f.since)
            .max()
            .unwrap_or(0);
        if def.fields[old_fields..]
            .iter()
            .any(|f| f.since <= old_version)
        {
            return Err(ProjectionError::ModelsNotUpgradable(format!(
                "model {}: a field added after version {old_version} says it is older",
                def.name
            )));
        }
        report.models.push(def.name);
        extended.push(Extended {
            def,
            old_fields,
            old_version,
        });
    }
    Ok(extended)
}

/// The field columns of table `name` in order (none if there is no such table).
fn table_columns(conn: &Connection, name: &str) -> Result<Vec<String>, ProjectionError> {
    let exists: Option<String> = conn
        .query_row(
            "SELECT name FROM sqlite_schema WHERE type = 'table' AND name = ?1",
            [name],
            |r| r.get(0),
        )
        .optional()?;
    if exists.is_none() {
        return Ok(Vec::new());
    }
    let mut stmt = conn.prepare(&format!("PRAGMA table_info({name})"))?;
    let columns = stmt.query_map([], |r| r.get::<_, String>(1))?;
    let mut out = Vec::new();
    for column in columns {
        let column = column?;
        if !INTERNAL_COLUMNS.contains(&column.as_str()) {
            out.push(column);
        }
    }
    Ok(out)
}

/// Makes the table of every extended model again with the new fields in their place (as
/// [`crate::ddl::create_table`] orders them: the digest, range digests and row images read
/// every column in order, so a column added at the end would make them differ from a replayed
/// file's), its rows copied with the new fields empty; and stamps the file for `registry`. One
/// transaction; references are not checked meanwhile (the rows are the same).
fn rebuild_tables(
    conn: &Connection,
    extended: &[Extended],
    registry: &Registry,
) -> Result<(), ProjectionError> {
    conn.pragma_update(None, "foreign_keys", "OFF")?;
    let mut sql = String::from("BEGIN;");
    for model in extended {
        let def = model.def;
        let scratch = format!("{}__upgrading", def.name);
        let create = crate::ddl::create_table(def).replacen(
            &format!("CREATE TABLE IF NOT EXISTS {} (", def.name),
            &format!("CREATE TABLE {scratch} ("),
            1,
        );
        let mut kept: Vec<&str> = vec!["uuid"];
        kept.extend(def.fields[..model.old_fields].iter().map(|f| f.name));
        kept.extend(["_clocks", "_tomb", "_live"]);
        if crate::derived::holds_counts(def) {
            kept.extend(["_entries", "_bytes"]);
        }
        let kept = kept.join(", ");
        sql.push_str(&format!(
            "DROP TABLE IF EXISTS {scratch}; {create}; \
             INSERT INTO {scratch} ({kept}) SELECT {kept} FROM {name}; \
             DROP TABLE {name}; ALTER TABLE {scratch} RENAME TO {name};",
            name = def.name
        ));
    }
    sql.push_str(&format!(
        "DELETE FROM _registry; INSERT INTO _registry (fingerprint) VALUES ('{}'); COMMIT;",
        registry.fingerprint()
    ));
    let done = conn.execute_batch(&sql);
    if done.is_err() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    conn.pragma_update(None, "foreign_keys", "ON")?;
    done?;
    Ok(())
}

/// `row`'s clocks, decoded for the model's old fields (`None` when the row has none).
fn old_clocks(
    model: &Extended,
    row: &rusqlite::Row<'_>,
) -> Result<Option<FieldClocks>, ProjectionError> {
    let Some(blob) = row.get::<_, Option<Vec<u8>>>(2)? else {
        return Ok(None);
    };
    let bad = || ProjectionError::MalformedRow(format!("{} clocks", model.def.name));
    FieldClocks::decode(&blob, model.old_fields)
        .ok_or_else(bad)
        .map(Some)
}

/// `clocks` encoded for the model's new fields: a blob of uniform clocks names every field at
/// once (`0xFF`), which the new fields would then seem to have been written at; encoded again
/// for the new field count, each old field is named.
fn restamped(model: &Extended, clocks: &FieldClocks) -> Vec<u8> {
    let mut clocks = clocks.clone();
    clocks.0.resize(model.def.fields.len(), None);
    clocks.encode()
}

/// The change that wrote `row` (whose old fields' clocks are `clocks`) whole at `model`'s old
/// version, and whether it is exactly that (one clock on every old field); `None` for a row
/// with an old field never written.
fn whole_row_change(
    model: &Extended,
    row: &rusqlite::Row<'_>,
    clocks: &FieldClocks,
) -> Result<Option<(Change, bool)>, ProjectionError> {
    let def = model.def;
    let uuid = crate::ranges::uuid_of(def, row.get_ref(1)?)?;
    let Some(written) = clocks.0.iter().copied().collect::<Option<Vec<_>>>() else {
        return Ok(None);
    };
    let Some(oldest) = written.iter().min().copied() else {
        return Ok(None);
    };
    let uniform = written.iter().all(|c| *c == oldest);
    let mut fields = Vec::with_capacity(model.old_fields);
    for i in 0..model.old_fields {
        let value = read_value(def, i, row.get_ref(i + 3)?)?;
        if let Ok(index) = u8::try_from(i) {
            fields.push((index, value));
        }
    }
    let id = {
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"keel upcast row");
        hasher.update(uuid.as_bytes());
        hasher.update(&crate::clocks::encode_clock(&oldest));
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&hasher.finalize().as_bytes()[..16]);
        ChangeId(Uuid::from_bytes(bytes))
    };
    let change = Change {
        id,
        hlc: oldest,
        model: def.code,
        record: uuid,
        op: Op::Upsert(fields),
        version: model.old_version,
        seen: 0,
    };
    Ok(Some((change, uniform)))
}
