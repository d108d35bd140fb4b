//! A journal opened with `direct_writes` (large pages past the page cache) on a real redb file:
//! what it commits reads back the same, then and after reopening the ordinary way.

mod common;
use common::change;
use keel_journal::{CommitRoute, Journal, JournalOptions, LibraryKey};
use keel_schema::{Change, DeviceId, Epoch, LibraryId, Lsn};
use uuid::Uuid;

#[test]
fn a_journal_written_past_the_page_cache_reads_back_the_same() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("journal.redb");
    let (lib, key, device) = (
        LibraryId(Uuid::new_v4()),
        LibraryKey::generate(),
        DeviceId([3; 32]),
    );
    let open = |direct_writes: bool| {
        Journal::open(
            &path,
            lib,
            &key,
            device,
            JournalOptions {
                role: Some(CommitRoute::Log(Epoch { counter: 1, device })),
                direct_writes,
                ..JournalOptions::default()
            },
        )
        .expect("opens")
    };
    let mut all: Vec<Change> = Vec::new();
    {
        let journal = open(true);
        // Commits of many pages (gathered into large writes) and of one record.
        for round in 0..4u64 {
            let batch: Vec<Change> = (0..3_000)
                .map(|n| change(device, round * 10_000 + n))
                .collect();
            journal.commit(batch.clone()).expect("commits");
            all.extend(batch);
            let one = change(device, round * 10_000 + 9_999);
            journal.commit(vec![one.clone()]).expect("commits");
            all.push(one);
        }
        let read = journal.log().read(Lsn(1), usize::MAX).expect("reads");
        assert_eq!(read.len(), all.len());
    }
    let journal = open(false);
    let read = journal.log().read(Lsn(1), usize::MAX).expect("reads");
    let ids: Vec<_> = read
        .into_iter()
        .map(|entry| entry.expect("opens").2.id)
        .collect();
    let expected: Vec<_> = all.iter().map(|c| c.id).collect();
    assert_eq!(ids, expected, "every change, in order, after reopening");
    let report = journal.verify().expect("verifies");
    assert_eq!(report.log_records, all.len() as u64);
    assert!(report.faults.is_empty(), "no faults: {:?}", report.faults);
}
