//! Compacting the log on a real redb file: the records up to a base are dropped (the cut falls
//! inside a page), the base and its epoch stay, reads below it fail with a typed error, the
//! log continues after it, and all of it survives a reopen.

mod common;
use common::{change, Setup};
use keel_journal::{CommitRoute, Journal, JournalError, JournalOptions};
use keel_schema::{Change, DeviceId, Epoch, Lsn};

fn ids_from(journal: &Journal, from: Lsn) -> Vec<uuid::Uuid> {
    journal
        .log()
        .read(from, usize::MAX)
        .expect("reads")
        .into_iter()
        .map(|e| e.expect("sound").2.id.0)
        .collect()
}

/// Opens `s`'s journal as a follower's (its commits go to the offline journal).
fn open_as_follower(s: &Setup, existing: bool) -> Journal {
    Journal::open(
        &s.path,
        s.lib,
        &s.key,
        s.device,
        JournalOptions {
            role: Some(CommitRoute::Offline),
            existing,
            ..JournalOptions::default()
        },
    )
    .expect("opens")
}

#[test]
fn a_compacted_log_keeps_its_base_and_continues_after_it() {
    let s = Setup::new();
    let journal = s.open();
    let changes: Vec<Change> = (0..1_000).map(|n| change(s.device, n)).collect();
    journal.commit(changes.clone()).expect("commits");
    let before = journal.stats().expect("stats");
    let compaction = journal.log().compact(Lsn(333)).expect("compacts");
    assert_eq!(
        (compaction.base, compaction.base_epoch, compaction.dropped),
        (Lsn(333), s.epoch, 333)
    );
    let stats = journal.stats().expect("stats");
    assert_eq!(
        (stats.base, stats.last_lsn, stats.log_len),
        (Lsn(333), before.last_lsn, 667)
    );
    assert_eq!(journal.log().base().expect("base"), (Lsn(333), s.epoch));
    assert_eq!(journal.log().head().expect("head"), Some(s.epoch), "kept");
    assert_eq!(
        journal.log().epoch_at(Lsn(333)).expect("reads"),
        Some(s.epoch)
    );
    assert_eq!(journal.log().epoch_at(Lsn(332)).expect("reads"), None);
    // What is left reads from the position after the base, and nothing before it.
    let expected: Vec<uuid::Uuid> = changes[333..].iter().map(|c| c.id.0).collect();
    assert_eq!(ids_from(&journal, Lsn(334)), expected);
    for from in [Lsn(1), Lsn(333)] {
        assert!(matches!(
            journal.log().read(from, 10),
            Err(JournalError::Compacted { base: Lsn(333), .. })
        ));
        assert!(journal.log().entries(from, 10).is_err());
    }
    // Settled positions are never truncated; after the base they still are.
    assert!(journal.log().truncate_after(Lsn(100), &[]).is_err());
    let index = journal.log().load_index().expect("loads");
    assert_eq!((index.base(), index.len()), ((Lsn(333), s.epoch), 667));
    assert!(journal.verify().expect("verifies").faults.is_empty());
    // A lower base changes nothing; commits go on after the end.
    assert_eq!(journal.log().compact(Lsn(10)).expect("no-op").dropped, 0);
    journal
        .commit(vec![change(s.device, 5_000)])
        .expect("commits");
    journal.close();

    let journal = s.open();
    assert_eq!(journal.stats().expect("stats").last_lsn, Lsn(1_001));
    assert_eq!(ids_from(&journal, Lsn(334)).len(), 668);
    // Compacted to its very end, the log still knows its last position, and continues.
    journal.log().compact(Lsn(1_001)).expect("compacts all");
    journal.close();
    let journal = s.open();
    let stats = journal.stats().expect("stats");
    assert_eq!(
        (stats.base, stats.last_lsn, stats.log_len),
        (Lsn(1_001), Lsn(1_001), 0)
    );
    journal
        .commit(vec![change(s.device, 6_000)])
        .expect("commits");
    assert_eq!(journal.stats().expect("stats").last_lsn, Lsn(1_002));
    assert_eq!(ids_from(&journal, Lsn(1_002)).len(), 1);
    // Past the end is refused.
    assert!(matches!(
        journal.log().compact(Lsn(5_000)),
        Err(JournalError::Compaction(_))
    ));
}

#[test]
fn an_empty_log_starts_after_a_base_and_a_used_one_cannot() {
    let s = Setup::new();
    let journal = open_as_follower(&s, false);
    let other = Epoch {
        counter: 4,
        device: DeviceId([9; 32]),
    };
    let founder = Epoch {
        counter: 1,
        device: DeviceId([3; 32]),
    };
    journal
        .log()
        .start_after(Lsn(500), other, founder)
        .expect("starts after");
    assert_eq!(journal.log().head().expect("head"), Some(founder));
    assert_eq!(journal.stats().expect("stats").last_lsn, Lsn(500));
    // The next segment goes at 501 (and not at 1).
    assert!(journal
        .log()
        .append(Lsn(1), vec![(other, Vec::new())])
        .is_err());
    journal
        .log()
        .append(Lsn(501), vec![(other, Vec::new())])
        .expect("appends a barrier after the base");
    assert_eq!(journal.stats().expect("stats").last_lsn, Lsn(501));
    assert!(journal.log().start_after(Lsn(900), other, founder).is_err());

    // A join cut before its snapshot was stored forgets the log and its base: it starts at 1
    // again, and survives a reopen.
    assert!(journal.log().forget(s.device).expect("forgets").is_empty());
    assert_eq!(journal.log().base().expect("base").0, Lsn(0));
    assert_eq!(journal.log().head().expect("head"), None);
    assert_eq!(journal.stats().expect("stats").last_lsn, Lsn(0));
    drop(journal);
    let journal = open_as_follower(&s, true);
    assert_eq!(journal.log().base().expect("base").0, Lsn(0));
    assert!(journal
        .log()
        .append(Lsn(501), vec![(other, Vec::new())])
        .is_err());
    journal
        .log()
        .start_after(Lsn(700), other, founder)
        .expect("an empty log starts after a base again");
}

#[test]
fn a_rebase_drops_the_log_and_returns_only_the_changes_of_epochs_this_device_led() {
    let s = Setup::new();
    let journal = s.open();
    let changes: Vec<Change> = (0..100).map(|n| change(s.device, n)).collect();
    journal.commit(changes.clone()).expect("commits");
    journal.log().compact(Lsn(30)).expect("compacts");
    let leader = Epoch {
        counter: 7,
        device: DeviceId([9; 32]),
    };
    let founder = Epoch {
        counter: 1,
        device: DeviceId([3; 32]),
    };
    assert!(
        journal
            .log()
            .rebase(Lsn(30), leader, founder, s.device)
            .is_err(),
        "not past the base"
    );
    // Every entry left was sequenced in an epoch this device led: their changes go back.
    let returned = journal
        .log()
        .rebase(Lsn(500), leader, founder, s.device)
        .expect("rebases");
    let expected: Vec<_> = changes[30..].iter().map(|c| c.id).collect();
    assert_eq!(returned, expected);
    journal.close();

    let journal = s.open_offline();
    let stats = journal.stats().expect("stats");
    assert_eq!(
        (stats.base, stats.last_lsn, stats.log_len),
        (Lsn(500), Lsn(500), 0)
    );
    assert_eq!(journal.log().base().expect("base"), (Lsn(500), leader));
    assert_eq!(journal.log().head().expect("head"), Some(founder));
    let pending: Vec<_> = journal
        .offline()
        .changes()
        .expect("reads")
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(pending, expected, "pending again, to be pushed");
    journal
        .log()
        .append(Lsn(501), vec![(leader, Vec::new())])
        .expect("the log goes on after the new base");
    // Entries of another device's epochs are that leader's to keep: nothing returns.
    let returned = journal
        .log()
        .rebase(Lsn(900), leader, founder, DeviceId([5; 32]))
        .expect("rebases");
    assert!(returned.is_empty());
    assert_eq!(journal.stats().expect("stats").last_lsn, Lsn(900));
}

/// A log of several epochs, long enough that the rebase looks for this device's epochs by
/// bisection instead of reading every record: exactly the changes of the epochs it led come
/// back, in log order, and the rest of the log goes.
#[test]
fn a_rebase_finds_the_epochs_this_device_led_among_many() {
    let s = Setup::new();
    let other = DeviceId([9; 32]);
    // (leader, entries) of each epoch in turn.
    let epochs = [
        (other, 300),
        (s.device, 350),
        (other, 350),
        (s.device, 10),
        (other, 5),
        (s.device, 1),
    ];
    let mut led = Vec::new();
    let mut n = 0;
    for (counter, (device, entries)) in (1..).zip(epochs) {
        let journal = s.open_as(CommitRoute::Log(Epoch { counter, device }));
        let changes: Vec<Change> = (n..n + entries).map(|n| change(s.device, n)).collect();
        n += entries;
        journal.commit(changes.clone()).expect("commits");
        if device == s.device {
            led.extend(changes.iter().map(|c| c.id));
        }
        journal.close();
    }
    let journal = s.open_offline();
    let base_epoch = Epoch {
        counter: 9,
        device: other,
    };
    let returned = journal
        .log()
        .rebase(Lsn(5_000), base_epoch, base_epoch, s.device)
        .expect("rebases");
    assert_eq!(returned.len(), 361);
    assert_eq!(returned, led);
    let stats = journal.stats().expect("stats");
    assert_eq!((stats.base, stats.log_len), (Lsn(5_000), 0));
}

/// A long log a rebase dropped is deleted after the rebase replied, a slice at a time between
/// other requests (decision 0072): the log goes on right after the rebase, the journal closes
/// with nothing of the old log left in its file, and opens again after the base.
#[test]
fn a_dropped_log_goes_between_requests_and_is_gone_once_closed() {
    let s = Setup::new();
    let journal = s.open();
    // Several slices of 64 KiB pages.
    for from in (0..60_000).step_by(10_000) {
        let changes: Vec<Change> = (from..from + 10_000).map(|n| change(s.device, n)).collect();
        journal.commit(changes).expect("commits");
    }
    let leader = Epoch {
        counter: 7,
        device: DeviceId([9; 32]),
    };
    let elsewhere = DeviceId([5; 32]);
    journal
        .log()
        .rebase(Lsn(100_000), leader, leader, elsewhere)
        .expect("rebases");
    journal
        .log()
        .append(Lsn(100_001), vec![(leader, Vec::new())])
        .expect("the log goes on at once");
    journal.close();

    let tables = table_names(&s.path);
    assert!(tables.iter().any(|t| t == "log_pages"), "{tables:?}");
    assert!(
        !tables.iter().any(|t| t == "log_pages_dropped"),
        "the dropped log is left: {tables:?}"
    );
    let journal = s.open_offline();
    let stats = journal.stats().expect("stats");
    assert_eq!(
        (stats.base, stats.last_lsn, stats.log_len),
        (Lsn(100_000), Lsn(100_001), 1)
    );
}

/// A compaction whose base leaves the shorter part after it copies that part into a new table
/// and drops the old one whole, a slice at a time on the writer (decision 0072): the same log
/// after the base as a compaction that deletes pages, its pages still bound (the cut falls
/// inside a page), readable, indexable, verified, and the old table gone once closed.
#[test]
fn a_compaction_that_keeps_the_short_end_moves_it_and_drops_the_rest() {
    let s = Setup::new();
    let journal = s.open();
    let changes: Vec<Change> = (0..3_000).map(|n| change(s.device, n)).collect();
    journal.commit(changes.clone()).expect("commits");
    for base in [2_501u64, 2_900] {
        let compaction = journal.log().compact(Lsn(base)).expect("compacts");
        assert_eq!(compaction.base, Lsn(base));
        let stats = journal.stats().expect("stats");
        assert_eq!(
            (stats.base, stats.last_lsn, stats.log_len),
            (Lsn(base), Lsn(3_000), 3_000 - base)
        );
        let expected: Vec<uuid::Uuid> = changes[base as usize..].iter().map(|c| c.id.0).collect();
        assert_eq!(ids_from(&journal, Lsn(base + 1)), expected);
        assert!(matches!(
            journal.log().read(Lsn(base), 10),
            Err(JournalError::Compacted { .. })
        ));
        assert_eq!(
            journal.log().epoch_at(Lsn(base)).expect("reads"),
            Some(s.epoch)
        );
        let index = journal.log().load_index().expect("loads");
        assert_eq!(index.len() as u64, 3_000 - base);
        let report = journal.verify().expect("verifies");
        assert!(report.faults.is_empty(), "{:?}", report.faults);
    }
    assert_eq!(
        journal.log().compact(Lsn(2_501)).expect("compacts").dropped,
        0
    );
    // The writer deletes the moved-aside log while nothing else waits.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while journal.stats().expect("stats").dropped_log_pages > 0 {
        assert!(std::time::Instant::now() < deadline, "never deleted");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    journal
        .commit(vec![change(s.device, 9_000)])
        .expect("commits after");
    journal.close();

    let tables = table_names(&s.path);
    assert!(
        !tables.iter().any(|t| t.starts_with("log_pages_")),
        "a moved-aside log is left: {tables:?}"
    );
    let journal = s.open();
    assert_eq!(ids_from(&journal, Lsn(2_901)).len(), 101);
    assert!(journal.verify().expect("verifies").faults.is_empty());
}

/// The tables of the closed journal at `path`, read with redb itself.
fn table_names(path: &std::path::Path) -> Vec<String> {
    use redb::{ReadableDatabase, TableHandle};
    let db = redb::Database::open(path).expect("opens");
    let read = db.begin_read().expect("reads");
    let names = read
        .list_tables()
        .expect("lists")
        .map(|t| t.name().to_string())
        .collect();
    names
}

/// A horizon this device appended while it led never goes back to the offline journal: a
/// leader refuses one pushed to it, so it would wait there for good (decision 0082).
#[test]
fn a_rebase_returns_no_horizon() {
    let s = Setup::new();
    let journal = s.open();
    let plain = change(s.device, 1);
    let horizon = keel_schema::Horizon {
        uuid: uuid::Uuid::from_u128(0x4021),
        before_ms: 1,
        before_counter: 0,
    };
    let horizon =
        Change::upsert(keel_schema::ChangeId::new(), plain.hlc, &horizon).expect("sync-ready");
    journal
        .commit(vec![plain.clone(), horizon, change(s.device, 2)])
        .expect("commits");
    let founder = Epoch {
        counter: 1,
        device: DeviceId([3; 32]),
    };
    let returned = journal
        .log()
        .rebase(Lsn(10), founder, founder, s.device)
        .expect("rebases");
    assert_eq!(returned.len(), 2, "{returned:?}");
    assert_eq!(returned[0], plain.id);
    journal.close();
    let journal = s.open_offline();
    assert_eq!(journal.offline().changes().expect("reads").len(), 2);
}
