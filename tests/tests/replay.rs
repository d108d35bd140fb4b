//! A full replay applies large batches, which prove their references ahead of the apply (SQLite
//! then skips looking them up): it must store exactly what a checked apply stores, in order or
//! not.

use keel_bench::workload::LibraryWorkload;
use keel_engine::replay;
use keel_journal::{CommitRoute, Journal, JournalOptions, LibraryKey};
use keel_projections::{AppliedPosition, Projections};
use keel_schema::{Change, DeviceId, Epoch, LibraryId};
use uuid::Uuid;

const DEVICE: DeviceId = DeviceId([0x42; 32]);

/// A leader's journal at `dir` holding `changes` in its log, in this order.
fn journal_of(dir: &std::path::Path, library: LibraryId, changes: &[Change]) -> Journal {
    let journal = Journal::open(
        &dir.join("journal.redb"),
        library,
        &LibraryKey::generate(),
        DEVICE,
        JournalOptions {
            committed: None,
            committed_budget: None,
            direct_writes: false,
            role: Some(CommitRoute::Log(Epoch {
                counter: 1,
                device: DEVICE,
            })),
            existing: false,
        },
    )
    .expect("opens the journal");
    for chunk in changes.chunks(5_000) {
        journal.commit(chunk.to_vec()).expect("commits");
    }
    journal
}

/// A new projection in `dir`, replayed from a journal whose log holds `log`.
fn replayed(
    dir: &std::path::Path,
    library: LibraryId,
    log: &[Change],
) -> (Projections, keel_engine::ReplayReport) {
    let journal = journal_of(dir, library, log);
    let mut fresh = Projections::open(&dir.join("replayed.sqlite")).expect("opens");
    let report = replay(
        &journal,
        &mut fresh,
        AppliedPosition::default(),
        &mut |_, _| {},
    )
    .expect("replays");
    (fresh, report)
}

/// The digest of `changes` applied in order, in small checked batches, to a new projection,
/// and the number of changes left parked.
fn checked_digest(path: &std::path::Path, changes: &[Change]) -> (String, u64) {
    let mut p = Projections::open(path).expect("opens");
    // Below the size at which a batch proves its own references: SQLite checks every one.
    for chunk in changes.chunks(keel_projections::SELF_PROOF_MIN / 2) {
        p.apply(chunk, None).expect("applies");
    }
    (p.query().digest().expect("digest"), p.parked_len())
}

/// An entry like the workload's `i`-th change (an entry) whose content never exists.
fn dangling_entry(changes: &[Change]) -> Change {
    let entry = keel_schema::code_of::<keel_schema::Entry>();
    let mut change = changes
        .iter()
        .find(|c| c.model == entry)
        .cloned()
        .expect("the workload has entries");
    change.id = keel_schema::ChangeId::new();
    change.record = Uuid::now_v7();
    let content = <keel_schema::Entry as keel_schema::Syncable>::DEF
        .field_index("content")
        .and_then(|i| u8::try_from(i).ok())
        .expect("entries have content");
    if let keel_schema::Op::Upsert(fields) = &mut change.op {
        for (i, v) in fields.iter_mut() {
            if *i == content {
                *v = keel_schema::Value::Uuid(Uuid::new_v4());
            }
        }
    }
    change
}

/// Changes in one replay batch (the engine's own batch size; each test checks that its replay
/// took more than one batch, which is what it relies on).
const REPLAY_APPLY_BATCH: usize = 65_536;

/// More changes than one replay batch, so the replay loads in bulk (signed, as a library signs
/// them), and the workload that made them (to sign more as its device).
fn workload(library: LibraryId) -> (Vec<Change>, LibraryWorkload) {
    let files = REPLAY_APPLY_BATCH / 2 + 4_000;
    let mut workload = LibraryWorkload::signed(library.0, 11);
    let mut changes = workload.header();
    changes.extend(workload.files(files));
    (changes, workload)
}

#[test]
fn a_replay_that_proves_every_reference_stores_what_a_checked_apply_stores() {
    let dir = tempfile::tempdir().expect("temp dir");
    let library = LibraryId(Uuid::new_v4());
    let (changes, _) = workload(library);
    let (fresh, report) = replayed(dir.path(), library, &changes);
    assert_eq!(report.changes, changes.len() as u64);
    assert!(report.batches >= 2, "one batch: {report:?}");
    assert_eq!(
        report.proven, report.changes,
        "in log order every reference is met before or with its change"
    );
    assert_eq!(fresh.parked_len(), 0);
    assert_eq!(
        (fresh.query().digest().expect("digest"), 0),
        checked_digest(&dir.path().join("checked.sqlite"), &changes)
    );
}

#[test]
fn a_replay_whose_references_come_late_parks_them_and_stores_what_an_ordered_apply_stores() {
    let dir = tempfile::tempdir().expect("temp dir");
    let library = LibraryId(Uuid::new_v4());
    let (ordered, mut signing) = workload(library);
    // The first 200 files' content identities move behind the first replay batch: their entries
    // arrive first and must be parked, then applied when the content arrives.
    let content = keel_schema::code_of::<keel_schema::ContentIdentity>();
    let late_ids: std::collections::HashSet<keel_schema::ChangeId> = ordered
        .iter()
        .filter(|c| c.model == content)
        .take(200)
        .map(|c| c.id)
        .collect();
    let is_late = |c: &Change| late_ids.contains(&c.id);
    let late: Vec<Change> = ordered.iter().filter(|c| is_late(c)).cloned().collect();
    assert_eq!(late.len(), 200);
    let mut log: Vec<Change> = ordered.iter().filter(|c| !is_late(c)).cloned().collect();
    let at = REPLAY_APPLY_BATCH + 1_000;
    log.splice(at..at, late);
    // And one entry whose content never comes (signed by its device): it stays parked, never
    // stored.
    let dangling = signing.sign(vec![dangling_entry(&ordered)]);
    log.splice(10..10, dangling.iter().cloned());
    let mut ordered = ordered;
    ordered.extend(dangling);
    let (fresh, report) = replayed(dir.path(), library, &log);
    assert_eq!(report.changes, log.len() as u64);
    assert!(report.batches >= 2, "one batch: {report:?}");
    assert!(
        report.proven < report.changes,
        "a batch with a missing reference is not proven"
    );
    assert_eq!(
        fresh.parked_len(),
        1,
        "the late content's entries were applied, the dangling one waits"
    );
    assert_eq!(
        (fresh.query().digest().expect("digest"), 1),
        checked_digest(&dir.path().join("checked.sqlite"), &ordered)
    );
}
