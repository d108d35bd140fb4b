//! Reading and writing the leader log's table, whose values are [`LogPage`]s keyed by the
//! position of their first record: visiting records from a position, appending, truncating.

use std::ops::ControlFlow;

use redb::{ReadableTable, Table};

use keel_schema::Epoch;

use crate::binding::{link_of, BindingFault, PageKeys};
use crate::error::{storage, JournalError};
use crate::page::{LogPage, PageBuilder, LINK_LEN};
use crate::record::{LogRecord, RecordError};

/// What a visitor sees at one position: a record's bytes, or (once, at the page's first
/// position) why a whole page could not be read.
pub(crate) type Visited<'a> = Result<&'a [u8], RecordError>;

/// The key of the page holding `lsn`, if one does.
fn page_of<T: ReadableTable<u64, &'static [u8]>>(
    table: &T,
    lsn: u64,
) -> Result<Option<u64>, JournalError> {
    let Some(item) = table.range(..=lsn).map_err(storage)?.next_back() else {
        return Ok(None);
    };
    let (key, page) = item.map_err(storage)?;
    let key = key.value();
    let count = LogPage::positions(page.value());
    Ok((key.saturating_add(count) > lsn).then_some(key))
}

/// Visits the records from position `from` on, in order, until `visit` breaks. Page keys must
/// increase and pages must not overlap (a damaged tree could return them out of order, and a
/// reader that continues from the last key would then loop); a gap is left to the caller.
pub(crate) fn visit<T: ReadableTable<u64, &'static [u8]>>(
    table: &T,
    from: u64,
    mut visit: impl FnMut(u64, Visited<'_>) -> Result<ControlFlow<()>, JournalError>,
) -> Result<(), JournalError> {
    let start = page_of(table, from)?.unwrap_or(from);
    // Where the previous page ended: the next must start there or later.
    let mut end = start;
    for item in table.range(start..).map_err(storage)? {
        let (key, page) = item.map_err(storage)?;
        let key = key.value();
        if key < end {
            return Err(JournalError::Corrupt(format!(
                "log pages out of order at {key}"
            )));
        }
        match LogPage::parse(page.value()) {
            Ok(page) => {
                end = key.saturating_add(page.len());
                for (lsn, record) in (key..).zip(page.records()) {
                    if lsn < from {
                        continue;
                    }
                    if visit(lsn, Ok(record))?.is_break() {
                        return Ok(());
                    }
                }
            }
            Err(e) => {
                // Its true length is unknown: the next page's key tells where it ended.
                end = key.saturating_add(1);
                if key >= from && visit(key, Err(e))?.is_break() {
                    return Ok(());
                }
            }
        }
    }
    Ok(())
}

/// The record at `lsn`, copied.
pub(crate) fn get<T: ReadableTable<u64, &'static [u8]>>(
    table: &T,
    lsn: u64,
) -> Result<Option<Result<Vec<u8>, RecordError>>, JournalError> {
    let mut found = None;
    visit(table, lsn, |at, record| {
        if at == lsn {
            found = Some(record.map(<[u8]>::to_vec));
        }
        Ok(ControlFlow::Break(()))
    })?;
    Ok(found)
}

/// The last position in the log (0 if it is empty).
pub(crate) fn last_lsn<T: ReadableTable<u64, &'static [u8]>>(
    table: &T,
) -> Result<u64, JournalError> {
    let Some((key, page)) = table.last().map_err(storage)? else {
        return Ok(0);
    };
    let count = LogPage::positions(page.value());
    Ok(key.value().saturating_add(count - 1))
}

/// The last record (`None` if the log is empty or its last page is damaged).
pub(crate) fn last_record<T: ReadableTable<u64, &'static [u8]>>(
    table: &T,
) -> Result<Option<(u64, Vec<u8>)>, JournalError> {
    let Some((key, page)) = table.last().map_err(storage)? else {
        return Ok(None);
    };
    let Ok(parsed) = LogPage::parse(page.value()) else {
        return Ok(None);
    };
    let last = key.value() + parsed.len() - 1;
    Ok(parsed.records().last().map(|r| (last, r.to_vec())))
}

/// Visits the records from the newest back, page by page, until `visit` breaks; damaged pages
/// are skipped.
pub(crate) fn visit_back<T: ReadableTable<u64, &'static [u8]>>(
    table: &T,
    mut visit: impl FnMut(&[u8]) -> ControlFlow<()>,
) -> Result<(), JournalError> {
    for item in table.range(0..).map_err(storage)?.rev() {
        let (_, page) = item.map_err(storage)?;
        let Ok(parsed) = LogPage::parse(page.value()) else {
            continue;
        };
        let records: Vec<&[u8]> = parsed.records().collect();
        for record in records.into_iter().rev() {
            if visit(record).is_break() {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// The link a page starting at `first` carries: that of the record just before it, if `table`
/// holds it in a sound page (zeros otherwise: the log's start, or a record compacted away).
pub(crate) fn link_before<T: ReadableTable<u64, &'static [u8]>>(
    table: &T,
    first: u64,
) -> Result<[u8; LINK_LEN], JournalError> {
    let Some(item) = table.range(..first).map_err(storage)?.next_back() else {
        return Ok([0; LINK_LEN]);
    };
    let (key, page) = item.map_err(storage)?;
    let Ok(parsed) = LogPage::parse(page.value()) else {
        return Ok([0; LINK_LEN]);
    };
    if key.value().saturating_add(parsed.len()) != first {
        return Ok([0; LINK_LEN]);
    }
    Ok(parsed.records().last().map(link_of).unwrap_or_default())
}

/// Writes records at consecutive positions into a log table, packed into pages, each bound to
/// its position (see [`crate::binding`]).
pub(crate) struct PageWriter<'k> {
    first: u64,
    /// The link of the next page written.
    link: [u8; LINK_LEN],
    keys: &'k PageKeys,
    page: PageBuilder,
}

impl<'k> PageWriter<'k> {
    /// A writer whose first record goes at `first`, after the record whose link is `link`.
    pub(crate) fn new(first: u64, link: [u8; LINK_LEN], keys: &'k PageKeys) -> Self {
        Self {
            first,
            link,
            keys,
            page: PageBuilder::default(),
        }
    }

    /// A writer that appends to `table` at `first`, linked to the record before it.
    pub(crate) fn after<T: ReadableTable<u64, &'static [u8]>>(
        table: &T,
        first: u64,
        keys: &'k PageKeys,
    ) -> Result<Self, JournalError> {
        Ok(Self::new(first, link_before(table, first)?, keys))
    }

    /// The position the next record pushed goes to.
    pub(crate) fn next(&self) -> u64 {
        self.first + self.page.len()
    }

    /// After [`PageWriter::flush`]: the position that follows, and the link of the record before
    /// it (what a writer continuing there starts with).
    pub(crate) fn tail(&self) -> (u64, [u8; LINK_LEN]) {
        (self.first, self.link)
    }

    /// Binds `page` (of `count` records) to the next positions and inserts it.
    fn write(
        &mut self,
        table: &mut Table<'_, u64, &'static [u8]>,
        mut page: Vec<u8>,
        count: u64,
    ) -> Result<(), JournalError> {
        self.keys.bind(&mut page, self.first, self.link);
        if let Some(last) = LogPage::parse(&page).ok().and_then(|p| p.records().last()) {
            self.link = link_of(last);
        }
        table.insert(self.first, page.as_slice()).map_err(storage)?;
        self.first += count;
        Ok(())
    }

    /// Appends the record that `write` appends to the buffer it is given; writes the page out
    /// when it is full.
    pub(crate) fn push_with(
        &mut self,
        table: &mut Table<'_, u64, &'static [u8]>,
        write: impl FnOnce(&mut Vec<u8>),
    ) -> Result<(), JournalError> {
        self.page.push_with(write);
        while let Some((page, count)) = self.page.take_full() {
            self.write(table, page, count)?;
        }
        Ok(())
    }

    /// Appends one record's bytes.
    pub(crate) fn push(
        &mut self,
        table: &mut Table<'_, u64, &'static [u8]>,
        record: &[u8],
    ) -> Result<(), JournalError> {
        self.push_with(table, |buf| buf.extend_from_slice(record))
    }

    /// Writes out the records pushed since the last page was written.
    pub(crate) fn flush(
        &mut self,
        table: &mut Table<'_, u64, &'static [u8]>,
    ) -> Result<(), JournalError> {
        if self.page.is_empty() {
            return Ok(());
        }
        let count = self.page.len();
        let bytes = self.page.take();
        self.write(table, bytes, count)
    }
}

/// Checks the binding of every page holding a position in `from..=to` (see
/// [`crate::binding`]), and the link of the page after them: each fault at its page's first
/// position (a gap at its first missing position; a broken link at the first of the two pages,
/// either of which may have been replaced). A page whose framing is damaged, or whose tag fails
/// because one of its records fails its own checksum, is left to the record checks (which say
/// which record).
pub(crate) fn check_bindings<T: ReadableTable<u64, &'static [u8]>>(
    table: &T,
    from: u64,
    to: u64,
    keys: &PageKeys,
) -> Result<Vec<(u64, BindingFault)>, JournalError> {
    let start = page_of(table, from)?.unwrap_or(from);
    let mut faults = Vec::new();
    // The page before: its first position, where it ended, and the link of its last record
    // (`None` if that record is damaged: the damage, not a link, is then reported).
    let mut before: Option<(u64, u64, Option<[u8; LINK_LEN]>)> =
        match table.range(..start).map_err(storage)?.next_back() {
            Some(item) => {
                let (key, page) = item.map_err(storage)?;
                LogPage::parse(page.value())
                    .ok()
                    .and_then(|parsed| sound_end(key.value(), &parsed))
            }
            None => None,
        };
    for item in table.range(start..).map_err(storage)? {
        let (key, page) = item.map_err(storage)?;
        let key = key.value();
        let beyond = key > to;
        let Ok(parsed) = LogPage::parse(page.value()) else {
            if beyond {
                break;
            }
            before = None;
            continue;
        };
        if let Some((previous, end, link)) = before {
            if key > end && !beyond {
                faults.push((
                    end,
                    BindingFault::Gap {
                        from: end,
                        to: key - 1,
                    },
                ));
            } else if key == end
                && link.is_some_and(|link| parsed.trailer().is_some_and(|t| t.link != link))
            {
                faults.push((previous, BindingFault::Link));
            }
        }
        if beyond {
            break;
        }
        match keys.check(&parsed, key) {
            Err(BindingFault::Tag) if parsed.records().any(|r| LogRecord::decode(r).is_err()) => {}
            Err(fault) => faults.push((key, fault)),
            Ok(()) => {}
        }
        before = sound_end(key, &parsed);
    }
    Ok(faults)
}

/// For a page at `key` whose framing is sound: its key, where it ends, and the link of its
/// last record (`None` if that record fails its own checks).
fn sound_end(key: u64, parsed: &LogPage<'_>) -> Option<(u64, u64, Option<[u8; LINK_LEN]>)> {
    let last = parsed.records().last()?;
    let link = LogRecord::decode(last).is_ok().then(|| link_of(last));
    Some((key, key.saturating_add(parsed.len()), link))
}

/// Removes every record after `keep` and returns them (a damaged page's records cannot be
/// read: one after `keep` is dropped, one that starts at or before `keep` is left as it is).
/// The page holding `keep` keeps its records up to `keep`.
pub(crate) fn split_off(
    table: &mut Table<'_, u64, &'static [u8]>,
    keep: u64,
    keys: &PageKeys,
) -> Result<Vec<Vec<u8>>, JournalError> {
    let mut suffix = Vec::new();
    let mut pages = Vec::new();
    let mut kept: Vec<Vec<u8>> = Vec::new();
    let start = page_of(table, keep + 1)?.unwrap_or(keep + 1);
    for item in table.range(start..).map_err(storage)? {
        let (key, page) = item.map_err(storage)?;
        let key = key.value();
        let Ok(parsed) = LogPage::parse(page.value()) else {
            // Unreadable: its records after `keep` are lost with it, but a damaged page that
            // starts at or before `keep` stays, so the kept log has no gap.
            if key > keep {
                pages.push(key);
            }
            continue;
        };
        pages.push(key);
        for (lsn, record) in (key..).zip(parsed.records()) {
            if lsn <= keep {
                kept.push(record.to_vec());
            } else {
                suffix.push(record.to_vec());
            }
        }
    }
    for key in &pages {
        table.remove(*key).map_err(storage)?;
    }
    if !kept.is_empty() {
        let mut writer = PageWriter::after(table, start, keys)?;
        for record in &kept {
            writer.push(table, record)?;
        }
        writer.flush(table)?;
    }
    Ok(suffix)
}

/// The position ranges `(first, last)` of the log that may hold records of an epoch
/// `wanted` accepts, found by bisection: epochs never decrease along the log, so a range whose
/// two ends have the same epoch holds only that epoch, and only the epochs' boundaries are
/// looked at (a few pages per epoch), not every page. A position that cannot be read makes
/// its range one to look at.
pub(crate) fn epoch_ranges<T: ReadableTable<u64, &'static [u8]>>(
    table: &T,
    wanted: impl Fn(Epoch) -> bool,
) -> Result<Vec<(u64, u64)>, JournalError> {
    let Some((first, _)) = table.first().map_err(storage)? else {
        return Ok(Vec::new());
    };
    let (first, last) = (first.value(), last_lsn(table)?);
    let epoch_at = |lsn: u64| -> Result<Option<Epoch>, JournalError> {
        Ok(match get(table, lsn)? {
            Some(Ok(bytes)) => LogRecord::decode(&bytes).ok().map(|r| r.epoch),
            _ => None,
        })
    };
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    let mut pending = vec![(first, last)];
    while let Some((a, b)) = pending.pop() {
        let (ea, eb) = (epoch_at(a)?, epoch_at(b)?);
        match (ea, eb) {
            (Some(ea), Some(eb)) if ea == eb => {
                if wanted(ea) {
                    ranges.push((a, b));
                }
            }
            _ if b - a < BISECT_MIN => ranges.push((a, b)),
            _ => {
                let mid = a + (b - a) / 2;
                pending.push((mid + 1, b));
                pending.push((a, mid));
            }
        }
    }
    ranges.sort_unstable();
    Ok(ranges)
}

/// A range this short is read whole rather than bisected further.
const BISECT_MIN: u64 = 64;

/// Copies the log after `base` from `from` into the empty table `to`: the page straddling
/// the base rewritten from its first record after it (bound again, as in [`drop_through`]),
/// the pages after it as they are (a page's binding is to its position, not its table).
/// Returns the positions at or below the base, which stay in `from` for it to be dropped
/// whole; they are counted from the first page's key, the log being gap-free.
pub(crate) fn copy_after(
    from: &Table<'_, u64, &'static [u8]>,
    to: &mut Table<'_, u64, &'static [u8]>,
    base: u64,
    keys: &PageKeys,
) -> Result<u64, JournalError> {
    let Some(first) = from.first().map_err(storage)?.map(|(key, _)| key.value()) else {
        return Ok(0);
    };
    if let Some(item) = from.range(..=base).map_err(storage)?.next_back() {
        let (key, page) = item.map_err(storage)?;
        let key = key.value();
        if key.saturating_add(LogPage::positions(page.value())) > base.saturating_add(1) {
            let split = split_at_base(key, page.value(), base)?;
            rewrite_after_base(to, base, split.link, &split.after, keys)?;
        }
    }
    for item in from.range(base.saturating_add(1)..).map_err(storage)? {
        let (key, page) = item.map_err(storage)?;
        to.insert(key.value(), page.value()).map_err(storage)?;
    }
    Ok(base.saturating_add(1).saturating_sub(first))
}

/// A page that straddles a compaction base, split there.
struct Split {
    /// The link of the record at the base (zeros if the page starts after it).
    link: [u8; LINK_LEN],
    /// The records after the base.
    after: Vec<Vec<u8>>,
    /// How many records are at or below the base.
    before: u64,
}

/// The page at `key` that straddles `base`, split there.
fn split_at_base(key: u64, page: &[u8], base: u64) -> Result<Split, JournalError> {
    let parsed = LogPage::parse(page).map_err(|e| {
        JournalError::Corrupt(format!("the log page at {key} cannot be compacted: {e}"))
    })?;
    let (mut link, mut after, mut before) = ([0; LINK_LEN], Vec::new(), 0);
    for (lsn, record) in (key..).zip(parsed.records()) {
        if lsn == base {
            link = link_of(record);
        }
        if lsn <= base {
            before += 1;
        } else {
            after.push(record.to_vec());
        }
    }
    Ok(Split {
        link,
        after,
        before,
    })
}

/// Writes `records` from `base + 1` on, after the record whose link is `link`, bound again.
fn rewrite_after_base(
    table: &mut Table<'_, u64, &'static [u8]>,
    base: u64,
    link: [u8; LINK_LEN],
    records: &[Vec<u8>],
    keys: &PageKeys,
) -> Result<(), JournalError> {
    if records.is_empty() {
        return Ok(());
    }
    let mut writer = PageWriter::new(base + 1, link, keys);
    for record in records {
        writer.push(table, record)?;
    }
    writer.flush(table)
}

/// Removes every record up to and including `base`, returning how many; the page holding
/// `base + 1` keeps its records after `base` (rewritten under the key `base + 1`). A damaged
/// page that ends at or before `base` goes with the rest; one that holds `base + 1` stays.
pub(crate) fn drop_through(
    table: &mut Table<'_, u64, &'static [u8]>,
    base: u64,
    keys: &PageKeys,
) -> Result<u64, JournalError> {
    let mut dropped = 0u64;
    let mut pages = Vec::new();
    let mut kept: Vec<Vec<u8>> = Vec::new();
    // The link of the record at `base`, which a rewritten page follows.
    let mut link = [0; LINK_LEN];
    for item in table.range(..=base).map_err(storage)? {
        let (key, page) = item.map_err(storage)?;
        let key = key.value();
        let count = LogPage::positions(page.value());
        let end = key.saturating_add(count);
        if end <= base.saturating_add(1) {
            pages.push(key);
            dropped += count;
            continue;
        }
        // The page straddles the base.
        pages.push(key);
        let split = split_at_base(key, page.value(), base)?;
        (link, kept) = (split.link, split.after);
        dropped += split.before;
    }
    for key in &pages {
        table.remove(*key).map_err(storage)?;
    }
    rewrite_after_base(table, base, link, &kept, keys)?;
    Ok(dropped)
}
