//! Library operations for host apps and the CLI: locations, path lookup, tags and notes in both
//! scopes.

use std::path::{Path, PathBuf};

use keel_projections::EntryMetadata;
use keel_schema::{
    content_metadata_uuid, entry_metadata_uuid, user_metadata_tag_uuid, Device, Entry, Location,
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
    /// Paths resolve in this device's locations only (its Device record uuid), when set.
    device: Option<Uuid>,
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
        Files {
            library: self,
            device: None,
        }
    }

    /// The device of the library named `name` (its Device record's name, or the start of its
    /// id in hex).
    pub fn device_named(&self, name: &str) -> Result<Device, EngineError> {
        let mut found: Vec<Device> = self
            .devices()?
            .into_iter()
            .filter(|d| d.name == name || (name.len() >= 4 && d.device_id.starts_with(name)))
            .collect();
        match found.len() {
            1 => Ok(found.remove(0)),
            0 => Err(EngineError::NoSuchDevice(name.into())),
            _ => Err(EngineError::AmbiguousDevice(name.into())),
        }
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

    /// These files as they are on one device (its Device record uuid): paths resolve in its
    /// locations only.
    pub fn on(self, device: Uuid) -> Self {
        Self {
            device: Some(device),
            ..self
        }
    }

    /// Resolves a path to its location and relative position: in this device's locations
    /// first (the innermost), else in the other devices' (as `keel ls` lists them), unless
    /// [`Files::on`] named a device. A path in same-named locations of several other devices
    /// is ambiguous ([`EngineError::AmbiguousPath`]): name the device.
    pub fn resolve(&self, path: &Path) -> Result<ResolvedPath, EngineError> {
        let absolute = std::path::absolute(path).map_err(io_at(path))?;
        let canonical = absolute.canonicalize().unwrap_or(absolute);
        let here = self.device_id().record_uuid();
        let mut inside: Vec<(Location, PathBuf)> = self
            .read(|p| p.query().locations())?
            .into_iter()
            .filter(|l| self.device.is_none_or(|d| l.device == d))
            .filter_map(|l| {
                let rel = canonical.strip_prefix(&l.path).ok()?.to_path_buf();
                Some((l, rel))
            })
            .collect();
        // This device's first, then the innermost location.
        inside.sort_by_key(|(l, _)| (l.device != here, std::cmp::Reverse(l.path.len())));
        let (location, rel) = match inside.first() {
            Some((first, _)) if first.device != here => {
                let same: Vec<Uuid> = inside
                    .iter()
                    .filter(|(l, _)| l.path == first.path)
                    .map(|(l, _)| l.device)
                    .collect();
                if same.len() > 1 {
                    return Err(self.ambiguous(&canonical, &same));
                }
                inside.swap_remove(0)
            }
            Some(_) => inside.swap_remove(0),
            None => return Err(EngineError::NotInLocation(canonical.clone())),
        };
        let (relative_path, name) = split_relative(&rel);
        Ok(ResolvedPath {
            location,
            relative_path,
            name,
        })
    }

    /// [`EngineError::AmbiguousPath`] for `path`, naming the devices.
    fn ambiguous(&self, path: &Path, devices: &[Uuid]) -> EngineError {
        let names: Vec<String> = self
            .devices()
            .unwrap_or_default()
            .into_iter()
            .filter(|d| devices.contains(&d.uuid))
            .map(|d| d.name)
            .collect();
        EngineError::AmbiguousPath {
            path: path.to_path_buf(),
            devices: names.join(", "),
        }
    }

    /// The entry at a path (see [`Files::resolve`]), or with this uuid (a path that is one).
    pub fn entry(&self, path: &Path) -> Result<Entry, EngineError> {
        if let Some(uuid) = path.to_str().and_then(|s| Uuid::parse_str(s).ok()) {
            if let Some(entry) = self.get::<Entry>(uuid)? {
                return Ok(entry);
            }
        }
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

    /// The uuid of the UserMetadata of the entry at `path` in `scope`, if it exists.
    pub(crate) fn metadata_uuid(
        &self,
        path: &Path,
        scope: Scope,
    ) -> Result<Option<Uuid>, EngineError> {
        let entry = self.entry(path)?;
        let uuid = match (scope, entry.uuid, entry.content) {
            (Scope::Entry, Some(uuid), _) => entry_metadata_uuid(uuid),
            (Scope::Content, _, Some(content)) => content_metadata_uuid(content),
            (Scope::Content, _, None) => return Err(EngineError::NoContent(path.to_path_buf())),
            (Scope::Entry, None, _) => return Err(EngineError::NotIndexed(path.to_path_buf())),
        };
        Ok(self.get::<UserMetadata>(uuid)?.map(|m| m.uuid))
    }

    /// Ensures the UserMetadata of `entry` in `scope` exists within `tx`; returns its uuid.
    pub(crate) fn ensure_metadata(
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
        self.transact(|tx| {
            let metadata = self.ensure_metadata(tx, &entry, scope, path)?;
            for name in tags {
                let tag = self.tag_uuid_for(name)?;
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
