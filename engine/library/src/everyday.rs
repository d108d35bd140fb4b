//! Everyday operations beside tagging and notes: untag, remove a note, favourite and hidden,
//! rename and recolour a tag, remove a location.

use std::path::Path;

use keel_schema::{
    tag_uuid, user_metadata_tag_uuid, Entry, Location, Tag, TagUpdate, UserMetadata,
    UserMetadataTag, UserMetadataUpdate,
};
use uuid::Uuid;

use crate::error::EngineError;
use crate::indexer::INDEX_COMMIT_BATCH;
use crate::library::Library;
use crate::ops::{Files, Scope};

impl Library {
    /// The tag named `name`: the one a rename gave that name, else the one made under it.
    pub fn tag_named(&self, name: &str) -> Result<Option<Tag>, EngineError> {
        let named = self.read(|p| p.query().select::<Tag, _>("name = ?1", [name]))?;
        if let Some(tag) = named.into_iter().min_by_key(|t| t.uuid) {
            return Ok(Some(tag));
        }
        Ok(None)
    }

    /// The uuid a tag named `name` has or gets (see [`Library::tag_named`]).
    pub(crate) fn tag_uuid_for(&self, name: &str) -> Result<Uuid, EngineError> {
        Ok(match self.tag_named(name)? {
            Some(tag) => tag.uuid,
            None => tag_uuid(self.id().0, name),
        })
    }

    /// Every tag, by name.
    pub fn tags(&self) -> Result<Vec<Tag>, EngineError> {
        let mut tags = self.read(|p| p.query().select::<Tag, _>("1", []))?;
        tags.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(tags)
    }

    /// The first `limit` tags by name (as [`Library::tags`] orders them), and how many tags
    /// there are.
    pub fn first_tags(&self, limit: usize) -> Result<(Vec<Tag>, u64), EngineError> {
        self.read(|p| p.query().first::<Tag>("name", limit))
    }

    /// Renames tag `old` to `new` on every device; its uses follow (they name it by uuid).
    pub fn rename_tag(&self, old: &str, new: &str) -> Result<(), EngineError> {
        let tag = self
            .tag_named(old)?
            .ok_or_else(|| EngineError::NoSuchTag(old.into()))?;
        if new.is_empty() || self.tag_named(new)?.is_some() {
            return Err(EngineError::TagExists(new.into()));
        }
        self.transact(|tx| tx.set(TagUpdate::new(tag.uuid).name(new.into())))?;
        self.flush()
    }

    /// Sets (or clears) the colour of tag `name`.
    pub fn recolor_tag(&self, name: &str, color: Option<&str>) -> Result<(), EngineError> {
        let tag = self
            .tag_named(name)?
            .ok_or_else(|| EngineError::NoSuchTag(name.into()))?;
        let color = color.map(str::to_string);
        self.transact(|tx| tx.set(TagUpdate::new(tag.uuid).color(color)))?;
        self.flush()
    }

    /// Removes this device's location `location`: it and every entry in it (with their
    /// entry-scoped metadata and its tags) become tombstones on every device; the files stay
    /// on disk. Returns the entries removed. Another device's location is refused (only the
    /// device that has the files may remove them).
    pub fn remove_location(&self, location: Uuid) -> Result<u64, EngineError> {
        let found: Option<Location> = self.get(location)?;
        let location = found.ok_or(EngineError::NoSuchLocation(location))?;
        if location.device != self.device_id().record_uuid() {
            return Err(EngineError::NotYourLocation(location.path.into()));
        }
        let entries = self.read(|p| p.query().entries_of_location(location.uuid))?;
        let removed = entries.len() as u64;
        for batch in entries.chunks(INDEX_COMMIT_BATCH / 4) {
            let mut doomed: Vec<(Uuid, Vec<Uuid>)> = Vec::with_capacity(batch.len());
            for entry in batch {
                let Some(uuid) = entry.uuid else { continue };
                doomed.push((uuid, self.entry_metadata_and_links(uuid)?));
            }
            self.transact(|tx| {
                for (entry, metadata) in &doomed {
                    for link in metadata.iter().skip(1) {
                        tx.delete::<UserMetadataTag>(*link);
                    }
                    if let Some(m) = metadata.first() {
                        tx.delete::<UserMetadata>(*m);
                    }
                    tx.delete::<Entry>(*entry);
                }
                Ok(())
            })?;
        }
        self.transact(|tx| {
            tx.delete::<Location>(location.uuid);
            Ok(())
        })?;
        self.flush()?;
        Ok(removed)
    }

    /// The entry-scoped metadata of `entry` (first) and its tag links, if it has any.
    fn entry_metadata_and_links(&self, entry: Uuid) -> Result<Vec<Uuid>, EngineError> {
        let metadata = self.read(|p| {
            p.query()
                .select::<UserMetadata, _>("entry = ?1", [entry.as_bytes().as_slice()])
        })?;
        let mut out = Vec::new();
        for m in metadata {
            out.push(m.uuid);
            let links = self.read(|p| {
                p.query().select::<UserMetadataTag, _>(
                    "user_metadata = ?1",
                    [m.uuid.as_bytes().as_slice()],
                )
            })?;
            out.extend(links.into_iter().map(|l| l.uuid));
        }
        Ok(out)
    }
}

impl Files<'_> {
    /// Removes `tags` from the file or folder at `path` in `scope` (tags it does not have are
    /// left alone).
    pub fn untag(&self, path: &Path, tags: &[String], scope: Scope) -> Result<(), EngineError> {
        let Some(metadata) = self.metadata_uuid(path, scope)? else {
            return Ok(());
        };
        let mut links = Vec::new();
        for name in tags {
            let link = user_metadata_tag_uuid(metadata, self.tag_uuid_for(name)?);
            if self.get::<UserMetadataTag>(link)?.is_some() {
                links.push(link);
            }
        }
        self.transact(|tx| {
            for link in links {
                tx.delete::<UserMetadataTag>(link);
            }
            Ok(())
        })?;
        self.flush()
    }

    /// Removes the note of the file or folder at `path` in `scope`.
    pub fn remove_note(&self, path: &Path, scope: Scope) -> Result<(), EngineError> {
        let Some(metadata) = self.metadata_uuid(path, scope)? else {
            return Ok(());
        };
        self.transact(|tx| tx.set(UserMetadataUpdate::new(metadata).notes(None)))?;
        self.flush()
    }

    /// Marks the file or folder at `path` favourite and/or hidden in `scope` (`None` leaves a
    /// flag as it is).
    pub fn set_flags(
        &self,
        path: &Path,
        scope: Scope,
        favorite: Option<bool>,
        hidden: Option<bool>,
    ) -> Result<(), EngineError> {
        let entry = self.entry(path)?;
        self.transact(|tx| {
            let metadata = self.ensure_metadata(tx, &entry, scope, path)?;
            let mut update = UserMetadataUpdate::new(metadata);
            if let Some(favorite) = favorite {
                update = update.favorite(favorite);
            }
            if let Some(hidden) = hidden {
                update = update.hidden(hidden);
            }
            tx.set(update)
        })?;
        self.flush()
    }
}
