//! Full-text search over entry names and notes (SQLite FTS5).
//!
//! The index costs every apply a tokenized insert per entry and note, so it exists only once
//! someone searches: [`Projections::enable_search`] builds it from the rows, and from then on
//! triggers keep it current inside each apply's transaction, whatever path a row takes (a
//! multi-row insert, a merge, a parked change applied later). A rebuilt projection has no index
//! until the next search.

use rusqlite::OptionalExtension;
use serde::{Deserialize, Serialize};

use crate::error::ProjectionError;
use crate::queries::Query;
use crate::store::Projections;
use keel_schema::Entry;

/// Words of one search taken at most (the rest are ignored).
pub const SEARCH_WORDS_MAX: usize = 16;
/// Bytes of one search text read at most.
pub const SEARCH_TEXT_MAX: usize = 512;

/// The index and the triggers that keep it current. Diacritics are folded, so `cafe` finds
/// `Café`.
const ENABLE: &str = "
    CREATE VIRTUAL TABLE IF NOT EXISTS entry_search
        USING fts5(name, tokenize = 'unicode61 remove_diacritics 2');
    CREATE VIRTUAL TABLE IF NOT EXISTS note_search
        USING fts5(notes, tokenize = 'unicode61 remove_diacritics 2');
    DELETE FROM entry_search;
    DELETE FROM note_search;
    INSERT INTO entry_search (rowid, name)
        SELECT rowid, name FROM entry WHERE _live = 1 AND name IS NOT NULL;
    INSERT INTO note_search (rowid, notes)
        SELECT rowid, notes FROM user_metadata WHERE _live = 1 AND notes IS NOT NULL;
    CREATE TRIGGER IF NOT EXISTS entry_search_insert AFTER INSERT ON entry
        WHEN new._live = 1 AND new.name IS NOT NULL
        BEGIN INSERT INTO entry_search (rowid, name) VALUES (new.rowid, new.name); END;
    CREATE TRIGGER IF NOT EXISTS entry_search_update AFTER UPDATE ON entry BEGIN
        DELETE FROM entry_search WHERE rowid = old.rowid;
        INSERT INTO entry_search (rowid, name)
            SELECT new.rowid, new.name WHERE new._live = 1 AND new.name IS NOT NULL;
    END;
    CREATE TRIGGER IF NOT EXISTS note_search_insert AFTER INSERT ON user_metadata
        WHEN new._live = 1 AND new.notes IS NOT NULL
        BEGIN INSERT INTO note_search (rowid, notes) VALUES (new.rowid, new.notes); END;
    CREATE TRIGGER IF NOT EXISTS note_search_update AFTER UPDATE ON user_metadata BEGIN
        DELETE FROM note_search WHERE rowid = old.rowid;
        INSERT INTO note_search (rowid, notes)
            SELECT new.rowid, new.notes WHERE new._live = 1 AND new.notes IS NOT NULL;
    END;
    INSERT INTO _meta (key, value) VALUES ('search', 1)
        ON CONFLICT(key) DO UPDATE SET value = excluded.value;
";

/// Why an entry matched a search.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "typescript", derive(ts_rs::TS))]
pub enum SearchMatch {
    /// Its name.
    Name,
    /// A note on it, or on its content.
    Note,
}

/// One entry a search found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "typescript", derive(ts_rs::TS))]
pub struct SearchHit {
    /// The entry.
    pub entry: Entry,
    /// What matched.
    pub matched: SearchMatch,
}

impl Projections {
    /// Builds the search index, once (later applies keep it current). Needs the writing
    /// connection.
    pub fn enable_search(&mut self) -> Result<(), ProjectionError> {
        if self.query().search_enabled()? {
            return Ok(());
        }
        let tx = self.conn.unchecked_transaction()?;
        tx.execute_batch(ENABLE)?;
        tx.commit()?;
        Ok(())
    }
}

/// The FTS5 query of what a user typed: each word a quoted prefix, all required. Quotes inside a
/// word are doubled, so no text is FTS5 syntax (`AND`, `NEAR(`, `*`, `"` are words like others).
/// `None` if it has no word.
fn match_expression(text: &str) -> Option<String> {
    let mut end = text.len().min(SEARCH_TEXT_MAX);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let words: Vec<String> = text[..end]
        .split_whitespace()
        .take(SEARCH_WORDS_MAX)
        .map(|w| format!("\"{}\"*", w.replace('"', "\"\"")))
        .collect();
    (!words.is_empty()).then(|| words.join(" "))
}

impl Query<'_> {
    /// Whether the search index exists (see [`Projections::enable_search`]).
    pub fn search_enabled(&self) -> Result<bool, ProjectionError> {
        let on: Option<i64> = self
            .conn
            .query_row("SELECT value FROM _meta WHERE key = 'search'", [], |r| {
                r.get(0)
            })
            .optional()?;
        Ok(on == Some(1))
    }

    /// Visible entries whose name, or a note on them or on their content, has every word of
    /// `text` (as a word or a word's start; case and diacritics ignored): the `limit` best name
    /// matches in name order, then note matches, at most `limit` in all. Empty if the index does
    /// not exist yet.
    pub fn search(&self, text: &str, limit: usize) -> Result<Vec<SearchHit>, ProjectionError> {
        let Some(expression) = match_expression(text) else {
            return Ok(Vec::new());
        };
        if limit == 0 || !self.search_enabled()? {
            return Ok(Vec::new());
        }
        let limit_sql = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut hits: Vec<SearchHit> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut add = |entries: Vec<Entry>, matched: SearchMatch| {
            for entry in entries {
                if hits.len() < limit && entry.uuid.is_some_and(|u| seen.insert(u)) {
                    hits.push(SearchHit { entry, matched });
                }
            }
        };
        let named = self.select_ordered::<Entry, _>(
            "rowid IN (SELECT rowid FROM entry_search WHERE entry_search MATCH ?1 \
             ORDER BY rank LIMIT ?2)",
            "name, uuid",
            (expression.as_str(), limit_sql),
        )?;
        add(named, SearchMatch::Name);
        let noted = self.select_ordered::<Entry, _>(
            "uuid IN (SELECT m.entry FROM note_search JOIN user_metadata m \
                 ON m.rowid = note_search.rowid WHERE note_search MATCH ?1 AND m.entry IS NOT NULL \
                 LIMIT ?2) \
             OR content IN (SELECT m.content FROM note_search JOIN user_metadata m \
                 ON m.rowid = note_search.rowid WHERE note_search MATCH ?1 AND m.content IS NOT NULL \
                 LIMIT ?2)",
            &format!("name, uuid LIMIT {limit_sql}"),
            (expression.as_str(), limit_sql),
        )?;
        add(noted, SearchMatch::Note);
        Ok(hits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_text_becomes_quoted_prefixes_and_never_syntax() {
        assert_eq!(match_expression("  "), None);
        assert_eq!(
            match_expression("beach 2024"),
            Some("\"beach\"* \"2024\"*".into())
        );
        assert_eq!(
            match_expression("a\"b NEAR("),
            Some("\"a\"\"b\"* \"NEAR(\"*".into())
        );
        let long = "é".repeat(SEARCH_TEXT_MAX);
        assert!(match_expression(&long).is_some());
        let many = "w ".repeat(100);
        assert_eq!(
            match_expression(&many).map(|e| e.matches('*').count()),
            Some(SEARCH_WORDS_MAX)
        );
    }
}
