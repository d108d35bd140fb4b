//! Binding log pages to their positions, so that someone with the journal's file (but not the
//! library key) cannot move, drop or roll back records without `verify` noticing.
//!
//! Each record's CRC catches damage, and its seal ties it to its change id; neither ties it to
//! its place in the log. A version-2 page therefore ends with a trailer (see
//! `docs/journal-format.md`):
//!
//! - a **link**: the first [`LINK_LEN`] bytes of the BLAKE3 hash of the record just before the
//!   page's first (zeros at the log's start);
//! - the **key id** of the library key it was bound under;
//! - a **tag**: keyed BLAKE3, under a subkey of that library key, over the page's first
//!   position, its link, the key id and the page's header and records.
//!
//! So a page moved to other positions fails its tag; a record dropped from, added to or changed
//! in a page fails it too; a page replaced by an older one (a rollback, or a page from before a
//! truncation) breaks the link of the page after it; a page removed leaves a gap in the
//! positions. A rollback of the log's *tail* (the newest pages removed or replaced by older
//! ones, leaving a shorter log that is sound in itself) is not visible in the log alone: the
//! engine's verify compares the log's end with what the projections have applied.
//!
//! The link is a hash of the record, not the previous page's tag, so a page rewritten with the
//! same records (compaction keeping a page's tail, a truncation keeping its head) keeps every
//! later page's link valid.

use crate::page::{LogPage, PageTrailer, LINK_LEN, PAGE_TRAILER_LEN, TAG_LEN};

/// The context of the page-binding subkey of a library key.
pub(crate) const BINDING_CONTEXT: &str = "keel 2026-12 log page binding v1";

/// The link a page following `record` carries.
pub fn link_of(record: &[u8]) -> [u8; LINK_LEN] {
    let hash = blake3::hash(record);
    let mut link = [0; LINK_LEN];
    link.copy_from_slice(&hash.as_bytes()[..LINK_LEN]);
    link
}

/// Binding subkeys of a library's keys, by key id (the current one first).
#[derive(Clone)]
pub struct PageKeys {
    keys: std::sync::Arc<[(u32, [u8; 32])]>,
}

impl std::fmt::Debug for PageKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<u32> = self.keys.iter().map(|(id, _)| *id).collect();
        write!(f, "PageKeys({ids:?})")
    }
}

/// Why a page's binding does not hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BindingFault {
    /// The page's tag does not match its bytes at this position: moved, edited or forged.
    #[error("its tag does not match its records at this position (moved, edited or forged)")]
    Tag,
    /// The page was bound under a key this device does not hold.
    #[error("it was bound under key id {0}, which this device does not hold")]
    UnknownKey(u32),
    /// The page's link does not name the record before it: that record, or this page, was
    /// replaced (a rollback) or reordered.
    #[error("it does not follow the record before it (a page was replaced or rolled back)")]
    Link,
    /// Positions before the page are missing from the log.
    #[error("positions {from}..={to} before it are missing")]
    Gap {
        /// The first missing position.
        from: u64,
        /// The last missing position.
        to: u64,
    },
}

impl PageKeys {
    /// The subkeys of `keys` (`(key id, library key bytes)`, the current key first).
    pub(crate) fn derive<'k>(keys: impl Iterator<Item = (u32, &'k [u8; 32])>) -> Self {
        let keys: Vec<(u32, [u8; 32])> = keys
            .map(|(id, bytes)| (id, blake3::derive_key(BINDING_CONTEXT, bytes)))
            .collect();
        Self { keys: keys.into() }
    }

    fn tag(
        key: &[u8; 32],
        first: u64,
        link: &[u8; LINK_LEN],
        key_id: u32,
        bound: &[u8],
    ) -> [u8; TAG_LEN] {
        let mut hasher = blake3::Hasher::new_keyed(key);
        hasher.update(&first.to_be_bytes());
        hasher.update(link);
        hasher.update(&key_id.to_be_bytes());
        hasher.update(bound);
        let mut tag = [0; TAG_LEN];
        tag.copy_from_slice(&hasher.finalize().as_bytes()[..TAG_LEN]);
        tag
    }

    /// Writes `page`'s trailer (its last [`PAGE_TRAILER_LEN`] bytes, as
    /// [`crate::PageBuilder::take`] leaves them) for a page at `first` after a record whose
    /// link is `link`, under the current key.
    pub fn bind(&self, page: &mut [u8], first: u64, link: [u8; LINK_LEN]) {
        let Some(&(key_id, key)) = self.keys.first() else {
            return;
        };
        let Some(bound) = page.len().checked_sub(PAGE_TRAILER_LEN) else {
            return;
        };
        let tag = Self::tag(&key, first, &link, key_id, &page[..bound]);
        PageTrailer { link, key_id, tag }.write(page);
    }

    /// Checks the tag of `page`, stored at `first` (a version-1 page has none and passes).
    pub fn check(&self, page: &LogPage<'_>, first: u64) -> Result<(), BindingFault> {
        let Some(trailer) = page.trailer() else {
            return Ok(());
        };
        let key = self
            .keys
            .iter()
            .find(|(id, _)| *id == trailer.key_id)
            .map(|(_, key)| key)
            .ok_or(BindingFault::UnknownKey(trailer.key_id))?;
        let tag = Self::tag(
            key,
            first,
            &trailer.link,
            trailer.key_id,
            page.bound_bytes(),
        );
        // Not secret-dependent timing that matters here (a local check of local bytes).
        if tag != trailer.tag {
            return Err(BindingFault::Tag);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::page::PageBuilder;

    fn keys(id: u32, byte: u8) -> PageKeys {
        PageKeys::derive(std::iter::once((id, &[byte; 32])))
    }

    fn page(records: &[&[u8]]) -> Vec<u8> {
        let mut builder = PageBuilder::default();
        for r in records {
            builder.push(r);
        }
        builder.take()
    }

    #[test]
    fn a_bound_page_checks_only_at_its_position_under_its_key() {
        let keys = keys(7, 1);
        let mut bytes = page(&[b"one record", b"another"]);
        keys.bind(&mut bytes, 10, link_of(b"before"));
        let parsed = LogPage::parse(&bytes).expect("parses");
        assert_eq!(keys.check(&parsed, 10), Ok(()));
        assert_eq!(parsed.trailer().map(|t| t.link), Some(link_of(b"before")));
        // Moved.
        assert_eq!(keys.check(&parsed, 11), Err(BindingFault::Tag));
        // Another library's key, and a key id this device lacks.
        assert_eq!(self::keys(7, 2).check(&parsed, 10), Err(BindingFault::Tag));
        assert_eq!(
            self::keys(8, 1).check(&parsed, 10),
            Err(BindingFault::UnknownKey(7))
        );
        // Any flipped byte of the records or the trailer fails (or breaks the framing).
        for at in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[at] ^= 0x20;
            if let Ok(parsed) = LogPage::parse(&bad) {
                assert!(keys.check(&parsed, 10).is_err(), "flip at {at}");
            }
        }
        // An older key still checks what it bound after a rotation.
        let rotated = PageKeys::derive([(9, &[3u8; 32]), (7, &[1u8; 32])].into_iter());
        assert_eq!(rotated.check(&parsed, 10), Ok(()));
    }
}
