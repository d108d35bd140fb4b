//! Log pages: the leader log stores runs of consecutive records together, one redb value per
//! run, keyed by the position of its first record (see `docs/journal-format.md`).
//!
//! One key per record made redb's B-tree work the largest cost of storing a long log (a device
//! that joins stores millions of records): packing the records of one transaction into pages of
//! up to [`PAGE_BYTES_MAX`] bytes cuts the keys by two orders of magnitude. Every record keeps
//! its own checksum, so a damaged record is still reported with its own position.
//!
//! A version-2 page ends with its binding (see [`crate::binding`]): a keyed tag over the page,
//! its first position and a link to the record before it, so that a record moved, dropped or
//! rolled back by someone with the file is found by `verify`. Version-1 pages (written before
//! the binding) are read as they are.

use crate::record::{RecordError, RECORD_LEN_MAX};

/// Version byte of a log page written today (bound to its position).
pub const PAGE_VERSION: u8 = 2;
/// Version byte of a page written before pages were bound (no trailer).
pub const PAGE_VERSION_UNBOUND: u8 = 1;
/// Bytes before the first record of a page: version, record count (u32 BE).
pub const PAGE_HEADER_LEN: usize = 1 + 4;
/// Bytes after the last record of a version-2 page: link (8), key id (u32 BE), tag (16).
pub const PAGE_TRAILER_LEN: usize = LINK_LEN + 4 + TAG_LEN;
/// Bytes of a page's link: the start of the BLAKE3 hash of the record before the page.
pub const LINK_LEN: usize = 8;
/// Bytes of a page's tag.
pub const TAG_LEN: usize = 16;
/// Most bytes in a page of more than one record (a single record may make a page larger). Just
/// under 64 KiB, so that a page and redb's leaf header fit one 64 KiB redb page: a page past it
/// makes redb use pages twice as large and the file grows to several times the records' size
/// (decision 0004).
pub const PAGE_BYTES_MAX: usize = 64_000;
/// Bytes before each record in a page: its length (u32 BE).
const LEN_PREFIX: usize = 4;

/// The trailer of a version-2 page: what binds it to its position (see [`crate::binding`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageTrailer {
    /// The start of the hash of the record before the page's first (zeros when the writer had
    /// none: the log's start, or the base of a compaction whose record is gone).
    pub link: [u8; LINK_LEN],
    /// The id of the library key whose subkey made the tag.
    pub key_id: u32,
    /// The keyed tag.
    pub tag: [u8; TAG_LEN],
}

impl PageTrailer {
    fn read(bytes: &[u8; PAGE_TRAILER_LEN]) -> Self {
        let (link, rest) = bytes.split_at(LINK_LEN);
        let (key_id, tag) = rest.split_at(4);
        let mut out = Self {
            link: [0; LINK_LEN],
            key_id: u32::from_be_bytes([key_id[0], key_id[1], key_id[2], key_id[3]]),
            tag: [0; TAG_LEN],
        };
        out.link.copy_from_slice(link);
        out.tag.copy_from_slice(tag);
        out
    }

    /// Writes the trailer into the last [`PAGE_TRAILER_LEN`] bytes of `page`.
    pub fn write(&self, page: &mut [u8]) {
        let Some(at) = page.len().checked_sub(PAGE_TRAILER_LEN) else {
            return;
        };
        let out = &mut page[at..];
        out[..LINK_LEN].copy_from_slice(&self.link);
        out[LINK_LEN..LINK_LEN + 4].copy_from_slice(&self.key_id.to_be_bytes());
        out[LINK_LEN + 4..].copy_from_slice(&self.tag);
    }
}

/// A checked log page: its framing (version, count, lengths) is sound, so iterating its
/// records cannot fail; each record is still checked when decoded
/// ([`crate::LogRecord::decode`]).
#[derive(Debug, Clone, Copy)]
pub struct LogPage<'a> {
    count: u32,
    body: &'a [u8],
    /// The header and records: what the tag covers.
    bound: &'a [u8],
    trailer: Option<PageTrailer>,
}

impl<'a> LogPage<'a> {
    /// Checks a page's framing. Never panics on any input.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, RecordError> {
        let (bytes, trailer) = match bytes.first() {
            Some(&PAGE_VERSION) => match bytes.split_last_chunk::<PAGE_TRAILER_LEN>() {
                Some((bound, trailer)) => (bound, Some(PageTrailer::read(trailer))),
                None => return Err(RecordError::TooShort(bytes.len())),
            },
            Some(&PAGE_VERSION_UNBOUND) => (bytes, None),
            Some(&other) => return Err(RecordError::Version(other)),
            None => return Err(RecordError::TooShort(0)),
        };
        if bytes.len() < PAGE_HEADER_LEN + LEN_PREFIX {
            return Err(RecordError::TooShort(bytes.len()));
        }
        let count = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
        let body = &bytes[PAGE_HEADER_LEN..];
        let mut rest = body;
        let mut seen = 0u32;
        while !rest.is_empty() {
            let (len, after) = split_len(rest).ok_or(RecordError::Framing)?;
            if len > RECORD_LEN_MAX {
                return Err(RecordError::TooLong(len));
            }
            if after.len() < len {
                return Err(RecordError::Framing);
            }
            rest = &after[len..];
            seen = seen.checked_add(1).ok_or(RecordError::Framing)?;
        }
        if seen != count || count == 0 {
            return Err(RecordError::Framing);
        }
        Ok(Self {
            count,
            body,
            bound: bytes,
            trailer,
        })
    }

    /// The trailer that binds the page to its position (`None`: a version-1 page).
    pub fn trailer(&self) -> Option<PageTrailer> {
        self.trailer
    }

    /// The bytes the trailer's tag covers: the header and the records.
    pub fn bound_bytes(&self) -> &'a [u8] {
        self.bound
    }

    /// How many positions a page's bytes cover: its record count once parsed; for a page whose
    /// framing is damaged, the count its header claims if that is plausible, else 1. Keeps the
    /// positions after a damaged page where they were.
    pub fn positions(bytes: &[u8]) -> u64 {
        if let Ok(page) = LogPage::parse(bytes) {
            return page.len();
        }
        let Some((head, _)) = bytes.split_first_chunk::<PAGE_HEADER_LEN>() else {
            return 1;
        };
        let claimed = u64::from(u32::from_be_bytes([head[1], head[2], head[3], head[4]]));
        let most = (bytes.len() / (LEN_PREFIX + crate::record::LOG_HEADER_LEN)) as u64;
        if (1..=most).contains(&claimed) {
            claimed
        } else {
            1
        }
    }

    /// How many records the page holds (at least one).
    pub fn len(&self) -> u64 {
        u64::from(self.count)
    }

    /// Always false: a page holds at least one record.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The records' bytes, in order.
    pub fn records(&self) -> Records<'a> {
        Records { rest: self.body }
    }
}

/// Iterator over the records of a [`LogPage`].
#[derive(Debug, Clone)]
pub struct Records<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Records<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        // The framing was checked by `LogPage::parse`; `get` keeps this total anyway.
        let (len, after) = split_len(self.rest)?;
        let record = after.get(..len)?;
        self.rest = &after[len..];
        Some(record)
    }
}

fn split_len(bytes: &[u8]) -> Option<(usize, &[u8])> {
    let (len, rest) = bytes.split_first_chunk::<LEN_PREFIX>()?;
    Some((u32::from_be_bytes(*len) as usize, rest))
}

/// Builds one page from records appended in order. Allocates nothing until the first record;
/// after a page is taken, the next one reserves the size of that page (a one-record commit
/// stays small, a bulk append fills pages without growing them).
#[derive(Debug, Default)]
pub struct PageBuilder {
    /// The page so far (empty until the first record, then the header and the records).
    buf: Vec<u8>,
    count: u32,
    /// Where the last record's length prefix starts.
    last: usize,
    /// Bytes to reserve when the next page begins.
    reserve: usize,
}

impl PageBuilder {
    /// Appends one record's bytes.
    pub fn push(&mut self, record: &[u8]) {
        self.push_with(|buf| buf.extend_from_slice(record));
    }

    /// Appends the record that `write` appends to the buffer it is given (no copy in between).
    pub fn push_with(&mut self, write: impl FnOnce(&mut Vec<u8>)) {
        if self.buf.is_empty() {
            self.buf.reserve(self.reserve.max(PAGE_HEADER_LEN + 512));
            self.buf.push(PAGE_VERSION);
            self.buf.extend_from_slice(&[0; 4]);
        }
        let at = self.buf.len();
        self.last = at;
        self.buf.extend_from_slice(&[0; LEN_PREFIX]);
        write(&mut self.buf);
        let len = (self.buf.len() - at - LEN_PREFIX) as u32;
        self.buf[at..at + LEN_PREFIX].copy_from_slice(&len.to_be_bytes());
        self.count += 1;
    }

    /// Records appended so far.
    pub fn len(&self) -> u64 {
        u64::from(self.count)
    }

    /// Whether no record was appended.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bytes of the page so far.
    pub fn bytes(&self) -> usize {
        self.buf.len()
    }

    /// If the page (with its trailer) has passed [`PAGE_BYTES_MAX`], returns the page to write:
    /// every record but the last, which starts the next page (or all of them, if there is only
    /// one), with its record count.
    pub fn take_full(&mut self) -> Option<(Vec<u8>, u64)> {
        let with_trailer = self.buf.len() + PAGE_TRAILER_LEN;
        if with_trailer < PAGE_BYTES_MAX {
            return None;
        }
        if self.count == 1 || with_trailer == PAGE_BYTES_MAX {
            let count = self.len();
            return Some((self.take(), count));
        }
        // The last record (with its length prefix) starts the next page.
        let last = self.buf.split_off(self.last);
        self.count -= 1;
        let count = self.len();
        let page = self.take();
        self.push_with(|buf| buf.extend_from_slice(&last[LEN_PREFIX..]));
        Some((page, count))
    }

    /// The page's bytes (empty if no record was appended), its trailer zeros until a writer
    /// binds it ([`crate::binding`]); the builder is empty again afterwards.
    pub fn take(&mut self) -> Vec<u8> {
        let count = std::mem::take(&mut self.count);
        let mut page = std::mem::take(&mut self.buf);
        if let Some(header) = page.get_mut(1..PAGE_HEADER_LEN) {
            header.copy_from_slice(&count.to_be_bytes());
            page.extend_from_slice(&[0; PAGE_TRAILER_LEN]);
        }
        self.last = 0;
        self.reserve = page.len().min(PAGE_BYTES_MAX + 1024);
        page
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_page_moves_its_last_record_to_the_next_and_stays_under_the_limit() {
        let mut builder = PageBuilder::default();
        let record = vec![3u8; 1_000];
        let mut pages = Vec::new();
        for _ in 0..200 {
            builder.push(&record);
            if let Some((page, count)) = builder.take_full() {
                assert_eq!(LogPage::parse(&page).expect("parses").len(), count);
                pages.push(page);
            }
        }
        pages.push(builder.take());
        let mut total = 0;
        for page in &pages {
            assert!(page.len() <= PAGE_BYTES_MAX, "{}", page.len());
            let parsed = LogPage::parse(page).expect("parses");
            assert!(parsed.records().all(|r| r == record.as_slice()));
            total += parsed.len();
        }
        assert_eq!(total, 200);
        // One record larger than a page is a page of its own.
        let big = vec![4u8; PAGE_BYTES_MAX + 10];
        builder.push(&record);
        builder.push(&big);
        let (first, count) = builder.take_full().expect("full");
        assert_eq!(
            (LogPage::parse(&first).expect("parses").len(), count),
            (1, 1)
        );
        let (second, count) = builder.take_full().expect("still full");
        assert_eq!(
            (LogPage::parse(&second).expect("parses").len(), count),
            (1, 1)
        );
        assert!(builder.is_empty());
    }

    #[test]
    fn a_page_round_trips_and_damaged_framing_is_refused() {
        let records: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 10 + usize::from(i)]).collect();
        let mut builder = PageBuilder::default();
        for r in &records {
            builder.push(r);
        }
        assert_eq!(builder.len(), 5);
        let bytes = builder.take();
        assert!(builder.is_empty());
        let page = LogPage::parse(&bytes).expect("parses");
        assert_eq!(page.len(), 5);
        let read: Vec<&[u8]> = page.records().collect();
        assert_eq!(read, records.iter().map(Vec::as_slice).collect::<Vec<_>>());
        for cut in 0..bytes.len() {
            assert!(LogPage::parse(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        // A wrong count, version or length is refused.
        for at in [0usize, 4, 5, 8] {
            let mut bad = bytes.clone();
            bad[at] ^= 0x01;
            assert!(LogPage::parse(&bad).is_err(), "flip at {at}");
        }
        let mut empty = PageBuilder::default();
        assert!(LogPage::parse(&empty.take()).is_err());
    }
}
