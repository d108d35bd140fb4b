//! Library operations for host apps and the CLI: locations, path lookup, tags and notes in both
//! scopes.

use std::path::{Path, PathBuf};

use keel_projections::EntryMetadata;
use keel_schema::{
    content_metadata_uuid, entry_metadata_uuid, tag_uuid, user_metadata_tag_uuid, Entry, Location,
    Tag, UserMetadata, UserMetadataTag, Value,
};
use uuid::Uuid;

use crate::error::{io_at, EngineError};
use crate::library::{now_ms, Library};
use crate::tx::Tx;

/// Which record a tag or note attaches to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The content: every file with the same bytes, on every device.
    Content,
    /// This entry only.
    Entry,
}

/// A filesystem path resolved inside a location.
#[derive(Debug, Clone)]
pub struct ResolvedPath {
    /// The location.
    pub location: Location,
    /// Parent directory relative to the location root (`""` at the root).
    pub relative_path: String,
    /// Name (`""` for the location root itself).
    pub name: String,
}

/// Splits a path relative to a location root into `(parent, name)` with `/` separators.
pub(crate) fn split_relative(rel: &Path) -> (String, String) {
    let parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    match parts.split_last() {
        Some((name, parent)) => (parent.join("/"), name.clone()),
        None => (String::new(), String::new()),
    }
}

/// The path of `name` in folder `relative_path` (both relative to a location's root).
pub(crate) fn join_relative(relative_path: &str, name: &str) -> String {
    if relative_path.is_empty() {
        name.to_string()
    } else {
        format!("{relative_path}/{name}")
    }
}

/// A library's files by path: locations, entries, their metadata, tags and notes. From
/// [`Library::files`].
#[derive(Clone, Copy)]
pub struct Files<'a> {
    library: &'a Library,
}

impl std::ops::Deref for Files<'_> {
    type Target = Library;

    fn deref(&self) -> &Library {
        self.library
    }
}

impl Library {
    /// The library's files by path.
    pub fn files(&self) -> Files<'_> {
        Files { library: self }
    }
}

impl Files<'_> {
    /// The location whose root is `path` on this device, if any.
    pub fn location(&self, path: &Path) -> Result<Option<Location>, EngineError> {
        let path_text = path.to_string_lossy().into_owned();
        let device = self.device_id().record_uuid();
        Ok(self
            .read(|p| p.query().locations())?
            .into_iter()
            .find(|l| l.device == device && l.path == path_text))
    }

    /// Resolves a filesystem path to its location and relative position.
    pub fn resolve(&self, path: &Path) -> Result<ResolvedPath, EngineError> {
        let absolute = std::path::absolute(path).map_err(io_at(path))?;
        let canonical = absolute.canonicalize().unwrap_or(absolute);
        let device = self.device_id().record_uuid();
        let mut best: Option<(Location, PathBuf)> = None;
        for location in self.read(|p| p.query().locations())? {
            if location.device != device {
                continue;
            }
            if let Ok(rel) = canonical.strip_prefix(&location.path) {
                let better = best
                    .as_ref()
                    .is_none_or(|(l, _)| location.path.len() > l.path.len());
                if better {
                    best = Some((location, rel.to_path_buf()));
                }
            }
        }
        let (location, rel) = best.ok_or_else(|| EngineError::NotInLocation(canonical.clone()))?;
        let (relative_path, name) = split_relative(&rel);
        Ok(ResolvedPath {
            location,
            relative_path,
            name,
        })
    }

    /// The entry at a filesystem path.
    pub fn entry(&self, path: &Path) -> Result<Entry, EngineError> {
        let resolved = self.resolve(path)?;
        self.read(|p| {
            p.query().entry_at(
                resolved.location.uuid,
                &resolved.relative_path,
                &resolved.name,
            )
        })?
        .ok_or_else(|| EngineError::NotIndexed(path.to_path_buf()))
    }

    /// An entry's metadata in both scopes.
    pub fn metadata(&self, entry: &Entry) -> Result<EntryMetadata, EngineError> {
        self.read(|p| p.query().metadata_of(entry))
    }

    /// Ensures the UserMetadata of `entry` in `scope` exists within `tx`; returns its uuid.
    fn ensure_metadata(
        &self,
        tx: &mut Tx<'_>,
        entry: &Entry,
        scope: Scope,
        path: &Path,
    ) -> Result<Uuid, EngineError> {
        let entry_uuid = entry
            .uuid
            .ok_or_else(|| EngineError::NotIndexed(path.to_path_buf()))?;
        let (uuid, scope_entry, scope_content) = match scope {
            Scope::Entry => (entry_metadata_uuid(entry_uuid), Some(entry_uuid), None),
            Scope::Content => {
                let content = entry
                    .content
                    .ok_or_else(|| EngineError::NoContent(path.to_path_buf()))?;
                (content_metadata_uuid(content), None, Some(content))
            }
        };
        if self.get::<UserMetadata>(uuid)?.is_none() {
            tx.update::<UserMetadata>(
                uuid,
                vec![
                    ("entry", scope_entry.map_or(Value::Null, Value::Uuid)),
                    ("content", scope_content.map_or(Value::Null, Value::Uuid)),
                    ("favorite", Value::Bool(false)),
                    ("hidden", Value::Bool(false)),
                ],
            )?;
            if scope == Scope::Entry {
                // Second half of the Entry ↔ UserMetadata cycle.
                tx.update::<Entry>(entry_uuid, vec![("metadata", Value::Uuid(uuid))])?;
            }
        }
        Ok(uuid)
    }

    /// Tags the file or directory at `path` with `tags` in `scope`.
    pub fn tag(&self, path: &Path, tags: &[String], scope: Scope) -> Result<(), EngineError> {
        let entry = self.entry(path)?;
        let library = self.id().0;
        self.transact(|tx| {
            let metadata = self.ensure_metadata(tx, &entry, scope, path)?;
            for name in tags {
                let tag = tag_uuid(library, name);
                if self.get::<Tag>(tag)?.is_none() {
                    tx.upsert(&Tag {
                        uuid: tag,
                        name: name.clone(),
                        color: None,
                        created_ms: now_ms() as i64,
                    });
                }
                tx.upsert(&UserMetadataTag {
                    uuid: user_metadata_tag_uuid(metadata, tag),
                    user_metadata: metadata,
                    tag,
                    created_ms: now_ms() as i64,
                });
            }
            Ok(())
        })?;
        self.flush()
    }

    /// Sets the note of the file or directory at `path` in `scope`.
    pub fn note(&self, path: &Path, text: &str, scope: Scope) -> Result<(), EngineError> {
        let entry = self.entry(path)?;
        self.transact(|tx| {
            let metadata = self.ensure_metadata(tx, &entry, scope, path)?;
            tx.update::<UserMetadata>(metadata, vec![("notes", Value::Text(text.into()))])
        })?;
        self.flush()
    }
}
