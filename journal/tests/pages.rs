//! The log stored in pages, on real redb files: many records per page read back by position,
//! a truncation in the middle of a page, and a format-1 journal (one key per record) moved into
//! pages on open with every record and position kept; pages bound to their positions, so that
//! a record moved, dropped or replaced by someone with the file is reported.

mod common;
use common::{change, Setup};
use keel_journal::{Journal, LogRecord, PAGE_BYTES_MAX};
use keel_schema::{Change, Epoch, Lsn};
use redb::{ReadableDatabase, ReadableTable};

const PAGES: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("log_pages");
const LEGACY: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("log");
const META: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("meta");

/// Every record from position 1, as stored.
fn all_raw(journal: &Journal) -> Vec<(Lsn, Vec<u8>)> {
    journal.log().read_raw(Lsn(1), usize::MAX).expect("reads")
}

fn page_keys(path: &std::path::Path) -> Vec<u64> {
    raw_pages(path).into_keys().collect()
}

#[test]
fn a_large_commit_fills_several_pages_and_every_position_reads_back() {
    let s = Setup::new();
    let journal = s.open();
    let changes: Vec<Change> = (0..2_000).map(|n| change(s.device, n)).collect();
    journal.commit(changes.clone()).expect("commits");
    journal
        .commit(vec![change(s.device, 9_999)])
        .expect("commits");
    let read = journal.log().read(Lsn(1), usize::MAX).expect("reads");
    assert_eq!(read.len(), 2_001);
    for (i, entry) in read.iter().take(2_000).enumerate() {
        let (_, _, got) = entry.as_ref().expect("sound");
        assert_eq!(got.id, changes[i].id, "position {}", i + 1);
    }
    // A read from the middle of a page starts at that position.
    let from_middle = journal.log().read_raw(Lsn(777), 3).expect("reads");
    assert_eq!(
        from_middle.iter().map(|(l, _)| l.0).collect::<Vec<_>>(),
        vec![777, 778, 779]
    );
    assert_eq!(
        journal.log().epoch_at(Lsn(1_500)).expect("reads"),
        Some(s.epoch)
    );
    assert_eq!(journal.log().epoch_at(Lsn(2_002)).expect("reads"), None);
    assert_eq!(journal.stats().expect("stats").log_len, 2_001);
    assert!(journal.verify().expect("verifies").faults.is_empty());
    journal.close();
    // 2,000 records of this size fill several pages; the single commit after them is its own.
    let keys = page_keys(&s.path);
    let record = LogRecord::decode(&all_raw(&s.open())[0].1)
        .expect("sound")
        .sealed
        .len();
    assert!(keys.len() as u64 >= (2_000 * record as u64) / PAGE_BYTES_MAX as u64);
    assert!(keys.len() < 100, "{} pages", keys.len());
    assert_eq!(keys.last(), Some(&2_001));
}

#[test]
fn a_truncation_in_the_middle_of_a_page_keeps_the_prefix_and_returns_the_rest() {
    let s = Setup::new();
    let journal = s.open();
    let changes: Vec<Change> = (0..1_000).map(|n| change(s.device, n)).collect();
    journal.commit(changes.clone()).expect("commits");
    let before = all_raw(&journal);
    // Keep 1..=333: the cut falls inside a page.
    let returned = journal
        .log()
        .truncate_after(Lsn(333), &[])
        .expect("truncates");
    assert_eq!(
        returned,
        changes[333..].iter().map(|c| c.id).collect::<Vec<_>>()
    );
    assert_eq!(all_raw(&journal), before[..333].to_vec());
    assert_eq!(journal.stats().expect("stats").last_lsn, Lsn(333));
    assert_eq!(journal.stats().expect("stats").offline, 667);
    // Appending continues right after the kept prefix.
    let segment: Vec<(Epoch, Vec<u8>)> = before[333..400]
        .iter()
        .map(|(_, bytes)| {
            let record = LogRecord::decode(bytes).expect("sound");
            (record.epoch, record.sealed.to_vec())
        })
        .collect();
    journal
        .log()
        .append(Lsn(334), segment)
        .expect("appends after the cut");
    assert_eq!(all_raw(&journal), before[..400].to_vec());
    assert!(journal.verify().expect("verifies").faults.is_empty());
    journal.close();
    // Reopened, the next position is still right.
    let journal = s.open();
    assert_eq!(journal.stats().expect("stats").last_lsn, Lsn(400));
}

#[test]
fn a_format_1_log_is_moved_into_pages_on_open_with_every_record_kept() {
    let s = Setup::new();
    let journal = s.open();
    for n in 0..5 {
        journal
            .commit((0..100).map(|i| change(s.device, n * 100 + i)).collect())
            .expect("commits");
    }
    let before = all_raw(&journal);
    let ids = journal.log().change_ids().expect("ids");
    journal.close();
    // Turn the file back into format 1: one key per record, format 1 in meta.
    {
        let db = redb::Database::open(&s.path).expect("redb opens");
        let txn = db.begin_write().expect("write");
        {
            let mut legacy = txn.open_table(LEGACY).expect("legacy");
            for (lsn, bytes) in &before {
                legacy.insert(lsn.0, bytes.as_slice()).expect("insert");
            }
            let mut meta = txn.open_table(META).expect("meta");
            meta.insert("format", &1u64.to_be_bytes()[..])
                .expect("insert");
        }
        assert!(txn.delete_table(PAGES).expect("deletes"));
        txn.commit().expect("commit");
    }
    let journal = s.open();
    assert_eq!(all_raw(&journal), before);
    assert_eq!(journal.log().change_ids().expect("ids"), ids);
    assert_eq!(journal.stats().expect("stats").last_lsn, Lsn(500));
    assert!(journal.verify().expect("verifies").faults.is_empty());
    journal
        .commit(vec![change(s.device, 1_000)])
        .expect("commits");
    assert_eq!(journal.stats().expect("stats").last_lsn, Lsn(501));
    journal.close();
    let db = redb::Database::open(&s.path).expect("redb opens");
    let txn = db.begin_read().expect("read");
    assert!(txn.open_table(LEGACY).is_err(), "the old table is gone");
    let meta = txn.open_table(META).expect("meta");
    let format = meta.get("format").expect("get").expect("stored");
    assert_eq!(
        format.value(),
        &keel_journal::JOURNAL_FORMAT.to_be_bytes()[..]
    );
}

#[test]
fn a_truncation_inside_a_damaged_page_leaves_no_gap_before_the_next_append() {
    let s = Setup::new();
    let journal = s.open();
    journal
        .commit((0..100).map(|n| change(s.device, n)).collect())
        .expect("commits");
    journal.close();
    // The page's record count no longer matches its records.
    {
        let db = redb::Database::open(&s.path).expect("redb opens");
        let txn = db.begin_write().expect("write");
        {
            let mut table = txn.open_table(PAGES).expect("pages");
            let mut bytes = table
                .get(1)
                .expect("get")
                .expect("the page at 1")
                .value()
                .to_vec();
            bytes[4] ^= 0x01;
            table.insert(1, bytes.as_slice()).expect("insert");
        }
        txn.commit().expect("commit");
    }
    let journal = s.open();
    assert_eq!(journal.verify().expect("verifies").faults.len(), 1);
    // Nothing after 50 can be read back, and the damaged page stays.
    assert!(journal
        .log()
        .truncate_after(Lsn(50), &[])
        .expect("truncates")
        .is_empty());
    journal
        .commit(vec![change(s.device, 1_000)])
        .expect("commits");
    assert_eq!(journal.stats().expect("stats").last_lsn, Lsn(51));
    assert_eq!(
        journal
            .log()
            .read_raw(Lsn(51), 10)
            .expect("reads")
            .iter()
            .map(|(l, b)| (l.0, b.is_empty()))
            .collect::<Vec<_>>(),
        vec![(51, false)]
    );
    let report = journal.verify().expect("verifies");
    assert_eq!(report.faults.len(), 1, "{:?}", report.faults);
    assert_eq!(report.faults[0].0, keel_journal::RecordPlace::Log(Lsn(1)));
}

/// Every page, by key, as stored.
fn raw_pages(path: &std::path::Path) -> std::collections::BTreeMap<u64, Vec<u8>> {
    let db = redb::Database::open(path).expect("redb opens");
    let txn = db.begin_read().expect("read");
    let table = txn.open_table(PAGES).expect("pages");
    table
        .range(0..)
        .expect("range")
        .map(|item| {
            let (k, v) = item.expect("reads");
            (k.value(), v.value().to_vec())
        })
        .collect()
}

/// Replaces the log's pages with `pages`.
fn put_pages(path: &std::path::Path, pages: &std::collections::BTreeMap<u64, Vec<u8>>) {
    let db = redb::Database::open(path).expect("redb opens");
    let txn = db.begin_write().expect("write");
    {
        let mut table = txn.open_table(PAGES).expect("pages");
        table.retain(|_, _| false).expect("clears");
        for (key, bytes) in pages {
            table.insert(*key, bytes.as_slice()).expect("insert");
        }
    }
    txn.commit().expect("commit");
}

/// Someone with the file (but not the key) edits the log in ways every record's checksum and
/// seal still accept: a record moved to another position, a page dropped, a page replaced by
/// another one of the same library at the same position (what a rollback to an older copy
/// leaves). Each is reported by `verify` and by the log check (the scrub's), at or before the
/// edit; the untouched log has no fault.
#[test]
fn a_record_moved_dropped_or_replaced_is_reported_by_its_page_binding() {
    let s = Setup::new();
    let twin = s.twin();
    for (setup, offset) in [(&s, 0), (&twin, 100)] {
        let journal = setup.open();
        for n in 0..6 {
            // One commit, one page.
            journal
                .commit(vec![change(s.device, offset + n)])
                .expect("commits");
        }
        journal.close();
    }
    let original = raw_pages(&s.path);
    let theirs = raw_pages(&twin.path);
    assert_eq!(
        original.keys().copied().collect::<Vec<_>>(),
        (1..=6).collect::<Vec<_>>()
    );

    let journal = s.open();
    assert!(journal.verify().expect("verifies").faults.is_empty());
    assert_eq!(journal.first_damaged_log_record().expect("checks"), None);
    journal.close();

    let moved = {
        let mut pages = original.clone();
        pages.insert(4, original[&3].clone());
        pages
    };
    let dropped = {
        let mut pages = original.clone();
        pages.remove(&3);
        pages
    };
    let replaced = {
        let mut pages = original.clone();
        pages.insert(3, theirs[&3].clone());
        pages
    };
    // (edit, first damaged position, what verify says of it)
    let cases = [
        (moved, 3, "tag does not match"),
        (dropped, 3, "positions 3..=3 before it are missing"),
        (replaced, 2, "does not follow the record before it"),
    ];
    for (pages, first, says) in cases {
        put_pages(&s.path, &pages);
        let journal = s.open();
        // The records alone pass: each still opens where it now is.
        for (lsn, entry) in journal
            .log()
            .read(Lsn(1), usize::MAX)
            .expect("reads")
            .iter()
            .enumerate()
        {
            assert!(entry.is_ok(), "record {} of {says:?}", lsn + 1);
        }
        let report = journal.verify().expect("verifies");
        assert!(
            report
                .faults
                .iter()
                .any(|(_, reason)| reason.contains(says)),
            "{says:?}: {:?}",
            report.faults
        );
        assert_eq!(
            journal.first_damaged_log_record().expect("checks"),
            Some(Lsn(first)),
            "{says:?}"
        );
        journal.close();
    }
    // A record damaged at rest (its checksum fails) that ends a page is reported once, as a
    // record: the next page's link to it is not a second fault.
    let mut damaged = original.clone();
    if let Some(page) = damaged.get_mut(&3) {
        let at = page.len() - keel_journal::PAGE_TRAILER_LEN - 1;
        page[at] ^= 0x40;
    }
    put_pages(&s.path, &damaged);
    let journal = s.open();
    let faults = journal.verify().expect("verifies").faults;
    assert_eq!(faults.len(), 1, "{faults:?}");
    assert!(faults[0].1.contains("checksum"), "{faults:?}");
    assert_eq!(
        journal.first_damaged_log_record().expect("checks"),
        Some(Lsn(3))
    );
    journal.close();
    put_pages(&s.path, &original);
    assert!(s.open().verify().expect("verifies").faults.is_empty());
}
