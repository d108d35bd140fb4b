//! SQL generated from the model definitions: tables, indexes and the prepared statements.

use keel_schema::{FieldType, ModelDef};

use crate::derived::{holds_counts, COUNT_COLUMNS};

/// Projection schema version, stored in `PRAGMA user_version`. Version 2 made references
/// deferred and dropped `NOT NULL` (see [`create_table`]); version 3 keeps a content's derived
/// counts in its row instead of an index on `entry(content)` (see [`crate::derived`]); version 4
/// adds `_refused` (see [`crate::ownership`]); version 5 adds the `attestation` table and refuses
/// file facts no attestation vouches for (see [`crate::attest`]); version 6 adds `_lacking`, the
/// changes of models this build lacks; version 7 adds host models, `_registry` (the fingerprint
/// of the models the file was built for) and the version of a lacking change; version 10 has a
/// delete forget the fields it covers (see [`crate::apply`]) and stores clocks with a device
/// prefix (see [`crate::clocks`]); a version 9 file is migrated on open, see
/// [`FORGETS_DELETED_FROM`]. A projection of an older version, or built for other
/// models, is discarded on open and replayed from the journal.
pub(crate) const SCHEMA_VERSION: i64 = 10;

/// The first version whose deleted records hold no field written before their delete and whose
/// clocks are stored ones. A file of the version before it is migrated in place on open (a
/// compacted library's snapshot cannot be replayed), see `Projections::migrate_from_v9`.
pub(crate) const FORGETS_DELETED_FROM: i64 = 10;

/// Rows in one multi-row insert ([`ModelSql::insert_run`]). Instructions to apply 100k changes
/// (cachegrind, whole run of the scratch harness): 2.07 G for 4 rows, 1.98 G for 8, 2.02 G for 16,
/// 2.06 G for 32, 2.09 G for 64, against 2.50 G one row at a time; wall times were within noise.
/// On P8's indexing workload (100k files, whole run): 8.94 G for 16 rows, 8.86 G for 8.
pub(crate) const INSERT_ROWS: usize = 8;

fn sql_type(ty: FieldType) -> &'static str {
    match ty {
        FieldType::Bool | FieldType::Int => "INTEGER",
        FieldType::Text => "TEXT",
        FieldType::Bytes | FieldType::Uuid => "BLOB",
    }
}

/// `CREATE TABLE` for a model: uuid key, every field (nullable: a row may exist before all its
/// fields arrive), the clock blob, the tombstone clock and the visibility flag; a content's row
/// also holds its derived counts (see [`crate::derived`]).
///
/// References are `DEFERRABLE INITIALLY DEFERRED` and no column is `NOT NULL`: either would make
/// SQLite keep a statement journal for a multi-row insert (a copy of every page the statement
/// touches, in case it has to abort halfway), which cost more than the multi-row insert saves.
/// The apply code always writes the uuid, `_clocks` and `_live`; a deferred reference that is
/// still missing fails the commit, and the batch is then applied again checking each reference
/// (see [`crate::apply`]).
pub(crate) fn create_table(def: &ModelDef) -> String {
    let mut sql = format!(
        "CREATE TABLE IF NOT EXISTS {} (uuid BLOB PRIMARY KEY",
        def.name
    );
    for f in def.fields {
        sql.push_str(", ");
        sql.push_str(&column(f));
    }
    sql.push_str(", _clocks BLOB, _tomb BLOB, _live INTEGER");
    if holds_counts(def) {
        sql.push_str(", _entries INTEGER DEFAULT 0, _bytes INTEGER DEFAULT 0");
    }
    sql.push(')');
    sql
}

/// A partial index of a model's rows that hold a tombstone, in clock order: a horizon reads those
/// older than its bound (see `crate::collect`) without reading the whole table. Rows without one are not in it, so it costs
/// an insert nothing but the check.
pub(crate) fn create_deleted_index(def: &ModelDef) -> String {
    format!(
        "CREATE INDEX IF NOT EXISTS {0}_deleted ON {0}(_tomb) WHERE _tomb IS NOT NULL",
        def.name
    )
}

/// A field's column: its name, type and reference (as `CREATE TABLE` and `ALTER TABLE ADD
/// COLUMN` write it).
pub(crate) fn column(f: &keel_schema::FieldDef) -> String {
    let mut sql = format!("{} {}", f.name, sql_type(f.ty));
    if let Some(target) = f.references {
        sql.push_str(&format!(
            " REFERENCES {target}(uuid) DEFERRABLE INITIALLY DEFERRED"
        ));
    }
    sql
}

/// Indexes for the host-app queries and for SQLite's reference checks: `(name, CREATE
/// statement)`. Every reference has an index that starts with it, except an entry's `content`
/// (see [`crate::derived`]): with SQLite's checks on, a row inserted while some reference of the
/// transaction is still missing makes SQLite look up the rows that reference it, which without
/// such an index reads the whole referencing table.
pub(crate) const INDEXES: &[(&str, &str)] = &[
    (
        "location_device",
        "CREATE INDEX IF NOT EXISTS location_device ON location(device)",
    ),
    (
        "entry_dir",
        "CREATE INDEX IF NOT EXISTS entry_dir ON entry(location, relative_path)",
    ),
    (
        // Few entries name a metadata row (the cycle-breaking reference), so only those are in it.
        "entry_metadata",
        "CREATE INDEX IF NOT EXISTS entry_metadata ON entry(metadata) WHERE metadata IS NOT NULL",
    ),
    (
        "user_metadata_entry",
        "CREATE INDEX IF NOT EXISTS user_metadata_entry ON user_metadata(entry)",
    ),
    (
        "user_metadata_content",
        "CREATE INDEX IF NOT EXISTS user_metadata_content ON user_metadata(content)",
    ),
    (
        "user_metadata_tag_parent",
        "CREATE INDEX IF NOT EXISTS user_metadata_tag_parent ON user_metadata_tag(user_metadata)",
    ),
    (
        "user_metadata_tag_tag",
        "CREATE INDEX IF NOT EXISTS user_metadata_tag_tag ON user_metadata_tag(tag)",
    ),
];

/// Whether one of [`INDEXES`] starts with column `field` of table `table`.
pub(crate) fn indexed(table: &str, field: &str) -> bool {
    let on = format!(" ON {table}({field}");
    INDEXES.iter().any(|(_, sql)| sql.contains(&on))
}

/// Internal tables: the applied position, parked changes and changes the owner rule refused.
pub(crate) const INTERNAL: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS _meta (key TEXT PRIMARY KEY NOT NULL, value INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS _parked (key BLOB PRIMARY KEY NOT NULL, missing TEXT NOT NULL, change BLOB NOT NULL) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS _lacking (id BLOB PRIMARY KEY NOT NULL, model INTEGER NOT NULL, version INTEGER NOT NULL, change BLOB NOT NULL) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS _registry (fingerprint TEXT NOT NULL)",
    // Conflicts (see `crate::conflicts`): each user-edited field's last log write, and the
    // concurrent writes found.
    "CREATE TABLE IF NOT EXISTS _field_writes (model INTEGER NOT NULL, record BLOB NOT NULL, \
     field INTEGER NOT NULL, pos INTEGER NOT NULL, change BLOB NOT NULL, hlc BLOB NOT NULL, \
     value, seen INTEGER NOT NULL, PRIMARY KEY (model, record, field)) WITHOUT ROWID",
    // Keyed by field first: each user-edited write looks for the conflicts on its field that it
    // resolves (the id is a hash of the field and the two changes).
    "CREATE TABLE IF NOT EXISTS _conflicts (id BLOB NOT NULL, pos INTEGER NOT NULL, \
     model INTEGER NOT NULL, record BLOB NOT NULL, field INTEGER NOT NULL, \
     a_change BLOB NOT NULL, a_hlc BLOB NOT NULL, a_value, \
     b_change BLOB NOT NULL, b_hlc BLOB NOT NULL, b_value, \
     winner INTEGER NOT NULL, strategy TEXT NOT NULL, resolved_by BLOB, resolved_pos INTEGER, \
     PRIMARY KEY (model, record, field, id)) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS _policies (record BLOB PRIMARY KEY NOT NULL, model TEXT, \
     strategy TEXT, device TEXT) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS _refused (id BLOB PRIMARY KEY NOT NULL, model TEXT NOT NULL, record BLOB NOT NULL, origin BLOB NOT NULL, reason TEXT NOT NULL) WITHOUT ROWID",
    "CREATE VIEW IF NOT EXISTS content_identity_stats AS \
       SELECT uuid, _entries AS entry_count, _bytes AS total_size \
       FROM content_identity WHERE _live = 1",
];

/// The prepared statements of one model. The default, with no statements, stands for a code no
/// model holds: the apply code looks the model up in the registry first and never reaches it.
#[derive(Debug, Clone, Default)]
pub(crate) struct ModelSql {
    /// Insert a new row; does nothing if the uuid exists.
    pub(crate) insert: String,
    /// Insert [`INSERT_ROWS`] new, visible rows without tombstones in one statement, each unless
    /// its uuid exists: each row binds its uuid, its fields and its clocks (and, for a content,
    /// its derived counts).
    pub(crate) insert_run: String,
    /// Read a row's fields, clocks and tombstone.
    pub(crate) select: String,
    /// Write a row's fields, clocks, tombstone and visibility.
    pub(crate) update: String,
    /// Whether a uuid exists (visible or not).
    pub(crate) exists: String,
    /// The uuids of the newest rows (by rowid, newest first), as many as `?1`.
    pub(crate) newest: String,
    /// Reads the derived counts of row `?1`, and sets them to `?2` entries and `?3` bytes (only
    /// for the model that holds them, see [`crate::derived`]).
    pub(crate) counts: Option<(String, String)>,
}

impl ModelSql {
    pub(crate) fn new(def: &ModelDef) -> Self {
        let cols: Vec<&str> = def.fields.iter().map(|f| f.name).collect();
        let n = cols.len();
        // A statement inserting `rows` rows, numbered `?1` onwards, skipping existing uuids.
        // With `fresh`, every row is visible and has no tombstone: `_tomb` and `_live` are
        // written as constants, and each row binds `n + 2` values (uuid, fields, clocks), then
        // for the model that holds derived counts two more (see [`crate::derived`]).
        let counts = holds_counts(def);
        let insert_rows = |rows: usize, fresh: bool| -> String {
            let width = match (fresh, counts) {
                (true, false) => n + 2,
                _ => n + 4,
            };
            let values: Vec<String> = (0..rows)
                .map(|row| {
                    let marks = |from: usize, to: usize| -> String {
                        let marks: Vec<String> = (from..=to)
                            .map(|i| format!("?{}", row * width + i))
                            .collect();
                        marks.join(", ")
                    };
                    match (fresh, counts) {
                        (true, true) => {
                            format!("({}, NULL, 1, {})", marks(1, n + 2), marks(n + 3, n + 4))
                        }
                        (true, false) => format!("({}, NULL, 1)", marks(1, n + 2)),
                        (false, _) => format!("({})", marks(1, n + 4)),
                    }
                })
                .collect();
            let extra = if fresh && counts {
                format!(", {COUNT_COLUMNS}")
            } else {
                String::new()
            };
            format!(
                "INSERT INTO {} (uuid, {}, _clocks, _tomb, _live{extra}) VALUES {} ON CONFLICT(uuid) DO NOTHING",
                def.name,
                cols.join(", "),
                values.join(", ")
            )
        };
        let insert = insert_rows(1, false);
        let insert_run = insert_rows(INSERT_ROWS, true);
        let select = format!(
            "SELECT {}, _clocks, _tomb FROM {} WHERE uuid = ?1",
            cols.join(", "),
            def.name
        );
        let sets: Vec<String> = cols
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c} = ?{}", i + 2))
            .collect();
        let update = format!(
            "UPDATE {} SET {}, _clocks = ?{}, _tomb = ?{}, _live = ?{} WHERE uuid = ?1",
            def.name,
            sets.join(", "),
            n + 2,
            n + 3,
            n + 4
        );
        let exists = format!("SELECT 1 FROM {} WHERE uuid = ?1", def.name);
        let newest = format!("SELECT uuid FROM {} ORDER BY rowid DESC LIMIT ?1", def.name);
        let counts = counts.then(|| {
            (
                format!("SELECT _entries, _bytes FROM {} WHERE uuid = ?1", def.name),
                format!(
                    "UPDATE {} SET _entries = ?2, _bytes = ?3 WHERE uuid = ?1",
                    def.name
                ),
            )
        });
        Self {
            insert,
            insert_run,
            select,
            update,
            exists,
            newest,
            counts,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_schema::MODELS;

    #[test]
    fn every_reference_but_an_entrys_content_has_an_index_that_starts_with_it() {
        let mut unindexed = Vec::new();
        for def in MODELS.iter() {
            for field in def.fields.iter().filter(|f| f.references.is_some()) {
                let start = format!("ON {}({}", def.name, field.name);
                if !INDEXES.iter().any(|(_, sql)| sql.contains(&start)) {
                    unindexed.push(format!("{}.{}", def.name, field.name));
                }
            }
        }
        assert_eq!(unindexed, vec!["entry.content".to_string()]);
    }
}
