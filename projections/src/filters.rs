//! Typed entry queries: filters, an order and pages by key, without SQL strings (the raw
//! connection stays available for what they lack).

use keel_schema::Entry;
use rusqlite::types::Value as Sql;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::ProjectionError;
use crate::queries::Query;

/// The order of [`Query::entries`]; ties go by record uuid.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "typescript", derive(ts_rs::TS))]
#[serde(rename_all = "snake_case")]
pub enum EntryOrder {
    /// By name.
    #[default]
    Name,
    /// By size in bytes.
    Size,
    /// By modification time.
    Modified,
}

impl EntryOrder {
    fn column(self) -> &'static str {
        match self {
            Self::Name => "name",
            Self::Size => "size",
            Self::Modified => "modified_ms",
        }
    }

    fn key(self, entry: &Entry) -> PageKey {
        match self {
            Self::Name => PageKey::Text(entry.name.clone()),
            Self::Size => PageKey::Int(entry.size),
            Self::Modified => PageKey::Int(entry.modified_ms),
        }
    }
}

/// The order key of the last entry of a page.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "typescript", derive(ts_rs::TS))]
#[serde(untagged)]
pub enum PageKey {
    /// A text key (a name).
    Text(String),
    /// A number key (a size, a time).
    Int(i64),
}

/// Where the next page starts: after this key and record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "typescript", derive(ts_rs::TS))]
pub struct PageCursor {
    /// The last entry's order key.
    pub key: PageKey,
    /// The last entry's uuid.
    pub uuid: Uuid,
}

/// What [`Query::entries`] selects: every condition given holds for each entry.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "typescript", derive(ts_rs::TS))]
pub struct EntryFilter {
    /// In this location.
    pub location: Option<Uuid>,
    /// Whose relative path starts with this.
    pub path_prefix: Option<String>,
    /// Tagged with this tag, on the entry or on its content.
    pub tag: Option<Uuid>,
    /// Whose content is of this kind (`image`, `text`, …).
    pub content_kind: Option<String>,
    /// At least this many bytes.
    pub size_min: Option<i64>,
    /// At most this many bytes.
    pub size_max: Option<i64>,
    /// Modified at or after this time (ms since the Unix epoch).
    pub modified_from: Option<i64>,
    /// Modified before this time.
    pub modified_until: Option<i64>,
    /// The order.
    pub order: EntryOrder,
    /// The page after this cursor (`None`: the first page).
    pub after: Option<PageCursor>,
    /// At most this many entries (0: 100).
    pub limit: usize,
}

/// One page of [`Query::entries`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "typescript", derive(ts_rs::TS))]
pub struct EntryPage {
    /// The entries, in order.
    pub entries: Vec<Entry>,
    /// Where the next page starts; `None` on the last page.
    pub next: Option<PageCursor>,
}

/// Most entries in one page.
pub const PAGE_MAX: usize = 10_000;

impl EntryFilter {
    /// The SQL condition and its parameters.
    fn condition(&self) -> (String, Vec<Sql>) {
        let mut terms: Vec<String> = Vec::new();
        let mut params: Vec<Sql> = Vec::new();
        let mut term = |sql: &str, values: Vec<Sql>| {
            let mut sql = sql.to_string();
            for value in values {
                params.push(value);
                sql = sql.replacen('#', &format!("?{}", params.len()), 1);
            }
            terms.push(sql);
        };
        let blob = |u: &Uuid| Sql::Blob(u.as_bytes().to_vec());
        if let Some(l) = &self.location {
            term("location = #", vec![blob(l)]);
        }
        if let Some(p) = &self.path_prefix {
            term(
                "substr(relative_path, 1, length(#)) = #",
                vec![Sql::Text(p.clone()), Sql::Text(p.clone())],
            );
        }
        if let Some(t) = &self.tag {
            term(
                "(metadata IN (SELECT user_metadata FROM user_metadata_tag WHERE _live = 1 AND tag = #) \
                 OR content IN (SELECT m.content FROM user_metadata m JOIN user_metadata_tag t \
                 ON t.user_metadata = m.uuid WHERE t._live = 1 AND m._live = 1 AND t.tag = #))",
                vec![blob(t), blob(t)],
            );
        }
        if let Some(k) = &self.content_kind {
            term(
                "content IN (SELECT uuid FROM content_identity WHERE _live = 1 AND kind = #)",
                vec![Sql::Text(k.clone())],
            );
        }
        let ints = [
            ("size >= #", self.size_min),
            ("size <= #", self.size_max),
            ("modified_ms >= #", self.modified_from),
            ("modified_ms < #", self.modified_until),
        ];
        for (sql, value) in ints {
            if let Some(v) = value {
                term(sql, vec![Sql::Integer(v)]);
            }
        }
        if let Some(after) = &self.after {
            let key = match &after.key {
                PageKey::Text(t) => Sql::Text(t.clone()),
                PageKey::Int(i) => Sql::Integer(*i),
            };
            let column = self.order.column();
            term(
                &format!("({column} > # OR ({column} = # AND uuid > #))"),
                vec![key.clone(), key, blob(&after.uuid)],
            );
        }
        if terms.is_empty() {
            terms.push("1 = 1".into());
        }
        (terms.join(" AND "), params)
    }
}

impl Query<'_> {
    /// The entries that `filter` selects, one page in its order (see [`EntryFilter`]).
    pub fn entries(&self, filter: &EntryFilter) -> Result<EntryPage, ProjectionError> {
        let limit = match filter.limit {
            0 => 100,
            n => n.min(PAGE_MAX),
        };
        let (condition, params) = filter.condition();
        let order = format!(
            "{} , uuid LIMIT {}",
            filter.order.column(),
            limit.saturating_add(1)
        );
        let mut entries: Vec<Entry> =
            self.select_ordered(&condition, &order, rusqlite::params_from_iter(params))?;
        let more = entries.len() > limit;
        entries.truncate(limit);
        let next = more.then(|| entries.last()).flatten().and_then(|last| {
            Some(PageCursor {
                key: filter.order.key(last),
                uuid: last.uuid?,
            })
        });
        Ok(EntryPage { entries, next })
    }
}
