//! Journal behaviour against a real redb file: commit, reopen, follower mode, verify.

use keel_journal::{
    CommitRoute, Journal, JournalError, JournalOptions, KdfParams, LibraryKey, Placement,
    RecordPlace,
};
use keel_schema::{Change, ChangeId, DeviceId, Epoch, Hlc, LibraryId, Lsn, Tag};
use uuid::Uuid;

fn tag_change(device: DeviceId, ms: u64, name: &str) -> Change {
    let tag = Tag {
        uuid: Uuid::now_v7(),
        name: name.into(),
        color: None,
        created_ms: 1,
    };
    let hlc = Hlc {
        physical_ms: ms,
        counter: 0,
        device,
    };
    Change::upsert(ChangeId::new(), hlc, &tag).expect("tag has a uuid")
}

#[test]
fn commits_survive_reopen_and_read_back_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("journal.redb");
    let lib = LibraryId(Uuid::new_v4());
    let key = LibraryKey::generate();
    let device = DeviceId([1; 32]);
    let changes: Vec<Change> = (0..10).map(|i| tag_change(device, 100 + i, "t")).collect();
    {
        let journal =
            Journal::open(&path, lib, &key, device, JournalOptions::default()).expect("opens");
        let placed = journal.commit(changes.clone()).expect("commits");
        assert_eq!(placed.first(), Some(&Placement::Log(Lsn(1))));
        assert_eq!(placed.last(), Some(&Placement::Log(Lsn(10))));
        journal.close();
    }
    let journal =
        Journal::open(&path, lib, &key, device, JournalOptions::default()).expect("reopens");
    let read: Vec<Change> = journal
        .log()
        .read(Lsn(1), 100)
        .expect("reads")
        .into_iter()
        .map(|e| e.expect("record is sound").2)
        .collect();
    assert_eq!(read, changes);
    assert_eq!(
        journal.election().epoch().expect("meta"),
        Some(Epoch { counter: 1, device })
    );
    assert_eq!(
        journal
            .hlc_high_water()
            .expect("meta")
            .map(|h| h.physical_ms),
        Some(109)
    );
    let ids = journal.log().change_ids().expect("reads ids");
    assert_eq!(ids.len(), changes.len());
    assert!(changes.iter().all(|c| ids.contains(&c.id)));
    let more = journal
        .commit(vec![tag_change(device, 200, "u")])
        .expect("commits");
    assert_eq!(more, vec![Placement::Log(Lsn(11))]);
}

#[test]
fn follower_changes_wait_in_the_local_journal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let lib = LibraryId(Uuid::new_v4());
    let key = LibraryKey::generate();
    let device = DeviceId([2; 32]);
    let journal = Journal::open(
        &dir.path().join("j.redb"),
        lib,
        &key,
        device,
        JournalOptions {
            committed: None,
            committed_budget: None,
            direct_writes: false,
            role: Some(CommitRoute::Offline),
            existing: false,
        },
    )
    .expect("opens");
    let placed = journal
        .commit(vec![tag_change(device, 5, "x")])
        .expect("commits");
    assert_eq!(placed, vec![Placement::Offline(1)]);
    let stats = journal.stats().expect("stats");
    assert_eq!((stats.offline, stats.log_len), (1, 0));
    assert_eq!(journal.offline().read(0, 10).expect("reads").len(), 1);
}

#[test]
fn wrong_library_and_foreign_key_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("journal.redb");
    let lib = LibraryId(Uuid::new_v4());
    let key = LibraryKey::generate();
    let device = DeviceId([3; 32]);
    {
        let journal =
            Journal::open(&path, lib, &key, device, JournalOptions::default()).expect("opens");
        journal
            .commit(vec![tag_change(device, 1, "a")])
            .expect("commits");
    }
    let other = LibraryId(Uuid::new_v4());
    assert!(matches!(
        Journal::open(&path, other, &key, device, JournalOptions::default()),
        Err(JournalError::WrongLibrary { .. })
    ));
    // Opening with another key: records do not open, their page's binding fails, and verify
    // says where.
    let stranger = LibraryKey::generate();
    let journal =
        Journal::open(&path, lib, &stranger, device, JournalOptions::default()).expect("opens");
    let report = journal.verify().expect("verifies");
    assert_eq!(report.log_records, 1);
    assert_eq!(report.faults.len(), 2, "{:?}", report.faults);
    assert!(report
        .faults
        .iter()
        .all(|(place, _)| *place == RecordPlace::Log(Lsn(1))));
    let _ = KdfParams::INSECURE_FAST;
}

/// Job records survive a reopen, are sealed (the file never holds them in the clear), are
/// replaced and removed, and are bounded in size.
#[test]
fn job_records_are_sealed_kept_and_bounded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("journal.redb");
    let lib = LibraryId(Uuid::new_v4());
    let key = LibraryKey::generate();
    let device = DeviceId([1; 32]);
    let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
    let secret = b"index /home/someone/Private Photos".to_vec();
    {
        let journal =
            Journal::open(&path, lib, &key, device, JournalOptions::default()).expect("opens");
        journal.jobs().put(a, &secret).expect("puts");
        journal.jobs().put(b, b"first").expect("puts");
        journal.jobs().put(b, b"second").expect("replaces");
        let too_big = vec![0u8; keel_journal::JOB_RECORD_MAX + 1];
        assert!(journal.jobs().put(a, &too_big).is_err());
        journal.close();
    }
    let bytes = std::fs::read(&path).expect("reads the file");
    assert!(
        !bytes.windows(secret.len()).any(|w| w == secret.as_slice()),
        "a job record is in the clear"
    );
    let journal =
        Journal::open(&path, lib, &key, device, JournalOptions::default()).expect("reopens");
    let mut all = journal.jobs().all().expect("reads");
    all.sort();
    assert_eq!(all, vec![(a, secret), (b, b"second".to_vec())]);
    journal.jobs().remove(a).expect("removes");
    assert_eq!(journal.jobs().all().expect("reads").len(), 1);
    journal.close();
}

/// A new journal stores its first epoch with its library id, in one commit: this device's
/// epoch 1 when it founds the library, none of its own when it joins one (a joining device's
/// journal cut before its epoch was stored once founded a library of its own). An existing
/// library's journal that holds nothing of it is `Uninitialised`, never made anew.
#[test]
fn a_new_journal_stores_its_first_epoch_and_an_existing_one_must_hold_its_library() {
    let dir = tempfile::tempdir().expect("tempdir");
    let lib = LibraryId(Uuid::new_v4());
    let key = LibraryKey::generate();
    let device = DeviceId([4; 32]);
    let open = |name: &str, role: Option<CommitRoute>, existing: bool| {
        Journal::open(
            &dir.path().join(name),
            lib,
            &key,
            device,
            JournalOptions {
                role,
                existing,
                ..JournalOptions::default()
            },
        )
    };
    let founder = open("founder.redb", None, false).expect("opens");
    assert_eq!(
        founder.election().epoch().expect("reads"),
        Some(Epoch { counter: 1, device })
    );
    founder.close();
    let joiner = open("joiner.redb", Some(CommitRoute::Offline), false).expect("opens");
    assert_eq!(
        joiner.election().epoch().expect("reads"),
        Some(Epoch::default())
    );
    joiner.close();
    // Reopened as existing libraries: as they were.
    let joiner = open("joiner.redb", None, true).expect("reopens");
    assert_eq!(
        joiner.election().epoch().expect("reads"),
        Some(Epoch::default())
    );
    joiner.close();
    assert!(matches!(
        open("never.redb", None, true),
        Err(JournalError::Uninitialised)
    ));
    // Refused, not made: it stays so.
    assert!(matches!(
        open("never.redb", None, true),
        Err(JournalError::Uninitialised)
    ));
}
