//! The journal's replication operations on real redb files: a follower appends a leader's
//! segment verbatim, a leader appends what its replication core sequenced, a deposed log truncates its suffix
//! into the offline journal, and hostile segments are refused whole.

mod common;
use common::change;
use keel_journal::{
    CommitRoute, Journal, JournalError, JournalOptions, LibraryKey, LogIndex, LogRecord,
};
use keel_schema::{Change, ChangeId, DeviceId, Epoch, Hlc, LibraryId, Lsn};
use uuid::Uuid;

fn open(
    dir: &std::path::Path,
    name: &str,
    lib: LibraryId,
    key: &LibraryKey,
    device: DeviceId,
    role: CommitRoute,
) -> Journal {
    Journal::open(&dir.join(name), lib, key, device, options(role)).expect("opens")
}

/// The options the journals of these tests open with: no applier, no direct writes.
fn options(role: CommitRoute) -> JournalOptions {
    JournalOptions {
        committed: None,
        committed_budget: None,
        direct_writes: false,
        role: Some(role),
        existing: false,
    }
}

/// A folder, a library with its key, a leader and a follower device, and the leader's epoch 1.
fn setup() -> (
    tempfile::TempDir,
    LibraryId,
    LibraryKey,
    (DeviceId, DeviceId),
    Epoch,
) {
    let l = DeviceId([1; 32]);
    let epoch = Epoch {
        counter: 1,
        device: l,
    };
    (
        tempfile::tempdir().expect("tempdir"),
        LibraryId(Uuid::new_v4()),
        LibraryKey::generate(),
        (l, DeviceId([2; 32])),
        epoch,
    )
}

/// The ids in the offline journal, in order.
fn pending(journal: &Journal) -> Vec<ChangeId> {
    journal
        .offline()
        .read(0, 10)
        .expect("reads")
        .into_iter()
        .map(|e| e.expect("sound").2.id)
        .collect()
}

fn segment(journal: &Journal, from: Lsn) -> Vec<(Epoch, Vec<u8>)> {
    journal
        .log()
        .read_raw(from, 1000)
        .expect("reads")
        .into_iter()
        .map(|(_, bytes)| {
            let record = LogRecord::decode(&bytes).expect("sound record");
            (record.epoch, record.sealed.to_vec())
        })
        .collect()
}

#[test]
fn follower_appends_leader_segments_and_its_pushed_changes_leave_the_offline_journal() {
    let (dir, lib, key, (l, f), epoch) = setup();
    let leader = open(dir.path(), "l.redb", lib, &key, l, CommitRoute::Log(epoch));
    let follower = open(dir.path(), "f.redb", lib, &key, f, CommitRoute::Offline);

    leader
        .commit((0..5).map(|n| change(l, n)).collect())
        .expect("commits");
    follower
        .log()
        .append(Lsn(1), segment(&leader, Lsn(1)))
        .expect("appends");
    assert_eq!(
        follower.log().read_raw(Lsn(1), 100).expect("reads"),
        leader.log().read_raw(Lsn(1), 100).expect("reads")
    );

    // The follower commits offline, then pushes; the leader's replication core sequences the
    // pushed record by appending it verbatim under its epoch (it deduplicates by id itself).
    let mine = change(f, 99);
    follower
        .commit(vec![mine.clone()])
        .expect("commits offline");
    let sealed: Vec<(Epoch, Vec<u8>)> = follower
        .offline()
        .read_sealed(0, 100)
        .expect("reads")
        .into_iter()
        .map(|(_, s)| (epoch, s))
        .collect();
    leader
        .log()
        .append(Lsn(6), sealed.clone())
        .expect("sequences");
    assert!(
        matches!(
            leader.log().append(Lsn(6), sealed),
            Err(JournalError::NotContiguous { .. })
        ),
        "a position is written once"
    );
    assert_eq!(leader.stats().expect("stats").log_len, 6);

    follower
        .log()
        .append(Lsn(6), segment(&leader, Lsn(6)))
        .expect("appends");
    let stats = follower.stats().expect("stats");
    assert_eq!(
        (stats.log_len, stats.offline),
        (6, 0),
        "sequenced, so no longer pending"
    );
    assert!(follower
        .log()
        .change_ids()
        .expect("reads ids")
        .contains(&mine.id));
    assert_eq!(follower.log().epoch_at(Lsn(6)).expect("reads"), Some(epoch));
}

#[test]
fn truncation_returns_the_suffix_to_the_offline_journal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let lib = LibraryId(Uuid::new_v4());
    let key = LibraryKey::generate();
    let a = DeviceId([3; 32]);
    let journal = open(
        dir.path(),
        "a.redb",
        lib,
        &key,
        a,
        CommitRoute::Log(Epoch {
            counter: 2,
            device: a,
        }),
    );
    let changes: Vec<Change> = (0..7).map(|n| change(a, n)).collect();
    journal.commit(changes.clone()).expect("commits");
    let returned = journal
        .log()
        .truncate_after(Lsn(5), &[])
        .expect("truncates");
    assert_eq!(returned, vec![changes[5].id, changes[6].id]);
    let stats = journal.stats().expect("stats");
    assert_eq!((stats.log_len, stats.offline), (5, 2));
    let ids = journal.log().change_ids().expect("reads ids");
    assert!(
        ids.contains(&changes[6].id),
        "still in the journal: pending again"
    );
    assert_eq!(journal.log().index().expect("reads").len(), 5);
    assert_eq!(journal.replay_floor().expect("meta"), Some(Lsn(5)));
    assert_eq!(
        pending(&journal),
        returned,
        "nothing acknowledged is dropped"
    );
    journal.set_role(CommitRoute::Offline).expect("steps down");
    assert!(matches!(
        journal.log().append(Lsn(9), Vec::new()),
        Err(JournalError::NotContiguous { .. })
    ));
}

#[test]
fn a_tampered_or_foreign_segment_is_refused_whole() {
    let dir = tempfile::tempdir().expect("tempdir");
    let lib = LibraryId(Uuid::new_v4());
    let key = LibraryKey::generate();
    let (l, f) = (DeviceId([1; 32]), DeviceId([2; 32]));
    let leader = open(
        dir.path(),
        "l.redb",
        lib,
        &key,
        l,
        CommitRoute::Log(Epoch {
            counter: 1,
            device: l,
        }),
    );
    let follower = open(dir.path(), "f.redb", lib, &key, f, CommitRoute::Offline);
    leader
        .commit((0..3).map(|n| change(l, n)).collect())
        .expect("commits");
    let mut seg = segment(&leader, Lsn(1));
    let last = seg[1].1.len() - 1;
    seg[1].1[last] ^= 1;
    assert!(matches!(
        follower.log().append(Lsn(1), seg),
        Err(JournalError::BadRecord { .. })
    ));
    assert_eq!(
        follower.stats().expect("stats").log_len,
        0,
        "nothing written"
    );

    // Records sealed for another library never open here.
    let stranger = open(
        dir.path(),
        "s.redb",
        LibraryId(Uuid::new_v4()),
        &key,
        l,
        CommitRoute::Log(Epoch {
            counter: 1,
            device: l,
        }),
    );
    stranger.commit(vec![change(l, 9)]).expect("commits");
    assert!(follower
        .log()
        .append(Lsn(1), segment(&stranger, Lsn(1)))
        .is_err());
    assert!(leader
        .log()
        .append(
            Lsn(4),
            vec![(
                Epoch {
                    counter: 1,
                    device: l
                },
                vec![0u8; 10]
            )]
        )
        .is_err());
    assert_eq!(leader.stats().expect("stats").log_len, 3, "nothing written");
}

#[test]
fn seal_checked_entries_are_stored_verbatim_and_the_raised_clock_survives_a_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (lib, key) = (LibraryId(Uuid::new_v4()), LibraryKey::generate());
    let epoch = Epoch {
        counter: 1,
        device: DeviceId([1; 32]),
    };
    let sender = open(
        dir.path(),
        "sender.redb",
        lib,
        &key,
        epoch.device,
        CommitRoute::Log(epoch),
    );
    sender
        .commit((0..5).map(|n| change(epoch.device, n)).collect())
        .expect("commits");
    let shipped: Vec<(Epoch, Vec<u8>)> = sender
        .log()
        .entries(Lsn(1), 100)
        .expect("reads")
        .into_iter()
        .map(|(_, e, sealed)| (e, sealed))
        .collect();
    let high = sender.hlc_high_water().expect("reads").expect("has one");

    let device = DeviceId([6; 32]);
    let reopen = || {
        open(
            dir.path(),
            "joiner.redb",
            lib,
            &key,
            device,
            CommitRoute::Offline,
        )
    };
    let joiner = reopen();
    let mut tampered = shipped.clone();
    if let Some(byte) = tampered[2].1.last_mut() {
        *byte ^= 1;
    }
    assert!(matches!(
        joiner.log().check_seals(Lsn(1), tampered),
        Err(JournalError::BadRecord { .. })
    ));
    let checked = joiner
        .log()
        .check_seals(Lsn(1), shipped.clone())
        .expect("checks");
    joiner.log().append_checked(checked).expect("appends");
    joiner.raise_hlc_high_water(high).expect("raises");
    let lower = Hlc {
        physical_ms: 1,
        ..high
    };
    joiner
        .raise_hlc_high_water(lower)
        .expect("a lower one is a no-op");
    joiner.close();

    let joiner = reopen();
    assert!(joiner.hlc_high_water().expect("reads") >= Some(high));
    let stored = joiner.log().read(Lsn(1), 100).expect("reads");
    assert_eq!(stored.len(), 5);
    assert!(stored.iter().all(|e| e.is_ok()), "every record opens");
    let sealed: Vec<(Epoch, Vec<u8>)> = joiner
        .log()
        .entries(Lsn(1), 100)
        .expect("reads")
        .into_iter()
        .map(|(_, e, s)| (e, s))
        .collect();
    assert_eq!(sealed, shipped);
}

/// The index read from every record.
fn scanned(journal: &Journal) -> Vec<(Epoch, Option<ChangeId>)> {
    journal.log().index().expect("reads the log")
}

/// The index as a node's start loads it (the saved copy, then the records after it).
fn loaded(journal: &Journal) -> Vec<(Epoch, Option<ChangeId>)> {
    journal.log().load_index().expect("loads").iter().collect()
}

#[test]
fn a_saved_log_index_is_used_only_while_it_matches_the_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let lib = LibraryId(Uuid::new_v4());
    let key = LibraryKey::generate();
    let a = DeviceId([3; 32]);
    let leader = CommitRoute::Log(Epoch {
        counter: 2,
        device: a,
    });
    let journal = open(dir.path(), "a.redb", lib, &key, a, leader);
    journal
        .commit((0..7).map(|n| change(a, n)).collect())
        .expect("commits");
    assert_eq!(journal.saved_log_index().expect("reads"), None);
    assert_eq!(loaded(&journal), scanned(&journal));

    // Saved, then extended: the copy is used and the records after it are read.
    let index = journal.log().load_index().expect("loads");
    journal.log().save_index(&index).expect("saves");
    journal
        .commit((7..10).map(|n| change(a, n)).collect())
        .expect("commits");
    drop(journal);
    let journal = open(dir.path(), "a.redb", lib, &key, a, leader);
    assert_eq!(journal.saved_log_index().expect("reads"), Some(index));
    assert_eq!(loaded(&journal).len(), 10);
    assert_eq!(loaded(&journal), scanned(&journal));

    // A truncation deletes it (it described positions that are gone).
    let index = journal.log().load_index().expect("loads");
    journal.log().save_index(&index).expect("saves");
    journal
        .log()
        .truncate_after(Lsn(4), &[])
        .expect("truncates");
    assert_eq!(journal.saved_log_index().expect("reads"), None);
    assert_eq!(loaded(&journal), scanned(&journal));
    assert_eq!(loaded(&journal).len(), 4);

    // A copy whose last entry is not the log's is ignored.
    let mut wrong = LogIndex::default();
    for (epoch, _) in scanned(&journal) {
        wrong.push(epoch, Some(ChangeId::new()));
    }
    journal.log().save_index(&wrong).expect("saves");
    assert_eq!(journal.saved_log_index().expect("reads"), None);
    assert_eq!(loaded(&journal), scanned(&journal));
}

/// A follower's segment reaches the applier's channel marked early (sent while it commits),
/// with its first position; once `append_replicated` (or `settle`) returns it is in the log.
/// Its own offline commits, and everything a leader writes, are sent only once durable.
#[test]
fn a_followers_segment_is_sent_early_and_committed_by_the_time_append_returns() {
    let (dir, lib, key, (l, f), epoch) = setup();
    let with_channel = |name: &str, device, role| {
        let (tx, rx) = crossbeam_channel::unbounded();
        let options = JournalOptions {
            committed: Some(tx),
            ..options(role)
        };
        let journal =
            Journal::open(&dir.path().join(name), lib, &key, device, options).expect("opens");
        (journal, rx)
    };
    let (leader, leader_rx) = with_channel("l.redb", l, CommitRoute::Log(epoch));
    let (follower, follower_rx) = with_channel("f.redb", f, CommitRoute::Offline);

    leader
        .commit((0..3).map(|n| change(l, n)).collect())
        .expect("commits");
    // Sent after the committers are answered: it may come a moment later.
    let wait = std::time::Duration::from_secs(10);
    let sent = leader_rx.recv_timeout(wait).expect("the leader's batch");
    assert_eq!(sent.early, None, "a leader's commit is sent once durable");

    follower
        .log()
        .append(Lsn(1), segment(&leader, Lsn(1)))
        .expect("appends");
    let sent = follower_rx.try_recv().expect("the segment");
    assert_eq!(sent.early, Some(Lsn(1)));
    assert_eq!(sent.entries.len(), 3);
    follower.settle().expect("settles");
    assert_eq!(follower.stats().expect("stats").last_lsn, Lsn(3));

    leader
        .commit((3..5).map(|n| change(l, n)).collect())
        .expect("commits");
    follower
        .log()
        .append(Lsn(4), segment(&leader, Lsn(4)))
        .expect("appends");
    let sent = follower_rx.try_recv().expect("the second segment");
    assert_eq!(sent.early, Some(Lsn(4)));

    follower
        .commit(vec![change(f, 9)])
        .expect("commits offline");
    let sent = follower_rx.recv_timeout(wait).expect("the offline commit");
    assert_eq!(sent.early, None, "an offline commit is sent once durable");
}

/// Issue 24: a leader accepts a change only from the device that made it, so a deposed log
/// returns only this device's changes to the offline journal: the replication core names the
/// others (`LogWrite::Truncate::dropped`). Another device's change would be refused by every
/// leader and pushed forever; its maker still holds it and resubmits it.
#[test]
fn truncation_returns_only_this_devices_changes() {
    let (dir, lib, key, (l, f), epoch) = setup();
    let leader = open(dir.path(), "l.redb", lib, &key, l, CommitRoute::Log(epoch));
    let mine = change(l, 1);
    leader.commit(vec![mine.clone()]).expect("commits");
    let theirs = change(f, 2);
    let next = Lsn(leader.stats().expect("stats").log_len + 1);
    leader
        .log()
        .append(next, vec![(epoch, leader.seal(&theirs))])
        .expect("sequences a pushed change");
    let returned = leader
        .log()
        .truncate_after(Lsn(0), &[theirs.id])
        .expect("truncates");
    assert_eq!(returned, vec![mine.id]);
    assert_eq!(pending(&leader), vec![mine.id]);
}

/// A horizon (decision 0082) goes with a truncated log, whoever made it, and the projections
/// that applied it are marked stale: a leader refuses one pushed to it, so back in the offline
/// journal it would wait there for good.
#[test]
fn truncation_drops_a_horizon_and_marks_the_projections_stale() {
    let (dir, lib, key, (l, _), epoch) = setup();
    let leader = open(dir.path(), "l.redb", lib, &key, l, CommitRoute::Log(epoch));
    let mine = change(l, 1);
    let horizon = keel_schema::Horizon {
        uuid: uuid::Uuid::from_u128(0x4021),
        before_ms: 1,
        before_counter: 0,
    };
    let horizon = keel_schema::Change::upsert(keel_schema::ChangeId::new(), mine.hlc, &horizon)
        .expect("sync-ready");
    leader.commit(vec![mine.clone(), horizon]).expect("commits");
    assert_eq!(leader.projections_stale().expect("reads"), 0);
    let returned = leader.log().truncate_after(Lsn(0), &[]).expect("truncates");
    assert_eq!(returned, vec![mine.id]);
    assert_eq!(pending(&leader), vec![mine.id]);
    assert_eq!(leader.projections_stale().expect("reads"), 1);
}

/// Issue 24: a change from a peer whose clock is far in the future (`Hlc { u64::MAX, .. }`)
/// would raise every device's clock past it, and every later local edit would lose its LWW
/// comparisons. Such a change is refused (pushed or in a segment) with a typed error, and the
/// clock is not moved.
#[test]
fn a_change_from_a_clock_far_ahead_is_refused() {
    let (dir, lib, key, (l, f), epoch) = setup();
    let leader = open(dir.path(), "l.redb", lib, &key, l, CommitRoute::Log(epoch));
    let before = leader.hlc_high_water().expect("reads");
    let mut ahead = change(f, 1);
    ahead.hlc = Hlc {
        physical_ms: u64::MAX,
        counter: u32::MAX,
        device: f,
    };
    let sealed = leader.seal(&ahead);
    assert!(matches!(
        leader.check_sealed(&sealed),
        Err(JournalError::ClockAhead { .. })
    ));
    // On a follower, a change of the leader's from far ahead is refused too.
    let follower = open(dir.path(), "f.redb", lib, &key, f, CommitRoute::Offline);
    let mut from_leader = ahead.clone();
    from_leader.hlc.device = l;
    let mut entries = segment(&leader, Lsn(1));
    entries.push((epoch, leader.seal(&from_leader)));
    assert!(matches!(
        follower.log().append(Lsn(1), entries),
        Err(JournalError::ClockAhead { .. })
    ));
    assert_eq!(leader.hlc_high_water().expect("reads"), before);
    assert!(follower
        .hlc_high_water()
        .expect("reads")
        .is_none_or(|h| h.physical_ms < u64::MAX / 2));
}

/// A device whose own clock is far ahead (its high-water mark was) still appends its own
/// changes to its own log: the clock check is for other devices' changes. Before, a leader with
/// a clock two days ahead refused its own commits and reloaded its replica a thousand times a
/// second (found by `devices.rs::a_leader_whose_entries_do_not_open_here_is_shut_out...`).
#[test]
fn a_devices_own_change_from_its_own_clock_far_ahead_is_appended() {
    let (dir, lib, key, (l, _f), epoch) = setup();
    let leader = open(dir.path(), "l.redb", lib, &key, l, CommitRoute::Offline);
    let mut own = change(l, 1);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    own.hlc.physical_ms = now + 2 * 24 * 3600 * 1000;
    let sealed = leader.seal(&own);
    leader
        .check_sealed(&sealed)
        .expect("its own change is no stranger's clock");
    leader
        .log()
        .append(Lsn(1), vec![(epoch, Vec::new()), (epoch, sealed)])
        .expect("appends its own change");
}

/// Issue 25: a device that lacks a model the library uses (an older app, or one without a
/// host's model) keeps the changes of that model: a segment holding one is stored whole, not
/// refused (refusing it would hold this follower still and shut its leader out).
#[test]
fn a_segment_with_a_model_this_device_lacks_is_stored_whole() {
    let (dir, lib, key, (l, f), epoch) = setup();
    let leader = open(dir.path(), "l.redb", lib, &key, l, CommitRoute::Log(epoch));
    let follower = open(dir.path(), "f.redb", lib, &key, f, CommitRoute::Offline);
    let mut newer = change(l, 1);
    newer.model = 200;
    let mut entries = segment(&leader, Lsn(1));
    entries.push((epoch, leader.seal(&newer)));
    let n = entries.len() as u64;
    follower
        .log()
        .append(Lsn(1), entries)
        .expect("a model this device lacks is kept, not refused");
    assert_eq!(follower.log().read(Lsn(n), 1).expect("reads").len(), 1);
}
