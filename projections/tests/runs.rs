//! Batches applied as multi-row inserts: exact outcomes when a run meets existing rows, one
//! change parked alone when a run misses a reference, and projections of an older schema.

use keel_projections::Projections;
use keel_schema::{
    content_uuid, Change, ChangeId, ContentIdentity, Device, DeviceId, Entry, EntryKind, Hlc,
    Location, Op, Tag, UserMetadata, Value,
};
use uuid::Uuid;

mod support;
use support::ApplyVouched;

/// More than one run of multi-row inserts.
const MANY: usize = 100;

struct Clock {
    device: DeviceId,
    ms: u64,
}

impl Clock {
    fn next(&mut self) -> Hlc {
        self.ms += 1;
        Hlc {
            physical_ms: self.ms,
            counter: 0,
            device: self.device,
        }
    }
}

fn clock() -> Clock {
    Clock {
        device: support::device(),
        ms: 1_000,
    }
}

fn tag(i: usize) -> Tag {
    Tag {
        uuid: Uuid::from_u128(0x1000 + i as u128),
        name: format!("tag-{i}"),
        color: None,
        created_ms: i as i64,
    }
}

fn upsert<T: keel_schema::Syncable>(clock: &mut Clock, record: &T) -> Change {
    Change::upsert(ChangeId::new(), clock.next(), record).expect("sync-ready")
}

fn open(dir: &tempfile::TempDir, name: &str) -> Projections {
    Projections::open(&dir.path().join(name)).expect("opens")
}

#[test]
fn runs_that_meet_existing_rows_count_exactly_and_match_one_at_a_time() {
    let mut clock = clock();
    let first: Vec<Change> = (0..30).map(|i| upsert(&mut clock, &tag(i))).collect();
    let mut second: Vec<Change> = Vec::new();
    for i in 0..MANY {
        second.push(match first.get(i) {
            Some(existing) => existing.clone(),
            None => upsert(&mut clock, &tag(i)),
        });
        if i == 50 {
            // The same uuid again in the same run, newer: it must win.
            let renamed = Tag {
                name: "renamed".into(),
                ..tag(50)
            };
            second.push(upsert(&mut clock, &renamed));
        }
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mut batched = open(&dir, "batched.sqlite");
    let stats = batched.apply_vouched(&first, None).expect("applies");
    assert_eq!((stats.applied, stats.unchanged), (30, 0));
    let stats = batched.apply_vouched(&second, None).expect("applies");
    assert_eq!(
        (stats.applied, stats.unchanged, stats.parked),
        (70 + 1, 30, 0),
        "70 new rows, the newer duplicate merged, 30 already there"
    );
    let renamed: Tag = batched
        .query()
        .get(tag(50).uuid)
        .expect("query")
        .expect("visible");
    assert_eq!(renamed.name, "renamed");

    let mut single = open(&dir, "single.sqlite");
    for change in first.iter().chain(&second) {
        single
            .apply_vouched(std::slice::from_ref(change), None)
            .expect("applies");
    }
    assert_eq!(
        batched.query().digest().expect("digest"),
        single.query().digest().expect("digest")
    );
    assert_eq!(batched.query().counts().expect("counts").tags, MANY as u64);
}

/// An upsert of some fields of entry `uuid`, by name.
fn entry_fields(clock: &mut Clock, uuid: Uuid, fields: &[(&str, Value)]) -> Change {
    let code = keel_schema::model_code("entry").expect("entry model");
    let def = keel_schema::model_by_code(code).expect("entry model");
    Change {
        id: ChangeId::new(),
        hlc: clock.next(),
        model: code,
        record: uuid,
        op: Op::Upsert(
            fields
                .iter()
                .map(|(name, v)| {
                    let i = def.field_index(name).expect("entry field");
                    (u8::try_from(i).expect("field index"), v.clone())
                })
                .collect(),
        ),
        version: 0,
        seen: 0,
    }
}

fn delete_entry(clock: &mut Clock, uuid: Uuid) -> Change {
    Change {
        id: ChangeId::new(),
        hlc: clock.next(),
        model: keel_schema::model_code("entry").expect("entry model"),
        record: uuid,
        op: Op::Delete,
        version: 0,
        seen: 0,
    }
}

/// `(entry_count, total_size)` of a content.
fn counts_of(p: &Projections, content: Uuid) -> (i64, i64) {
    let c = p
        .query()
        .content_identity(content)
        .expect("query")
        .expect("visible");
    (c.entry_count, c.total_size)
}

#[test]
fn content_counts_follow_entries_through_runs_existing_rows_moves_and_deletes() {
    // The first two batches are large enough to prove their references, so their contents are
    // written after their entries (with their counts); the third is applied in dependency order.
    let files = keel_projections::SELF_PROOF_MIN;
    let mut clock = clock();
    let (parents, entries) = library_of(&mut clock, files, 0);
    let content = |i: usize| parents[2 + i].record;
    // 1. Contents and their entries in one batch, and the same entry twice in a run.
    let mut first: Vec<Change> = parents.iter().chain(&entries).cloned().collect();
    first.push(entries[3].clone());
    // 2. More entries naming contents that are already stored (their counts are updated), an
    //    entry already stored, an entry moved to another content and resized, one deleted,
    //    one deleted and then written again later.
    let (_, more) = library_of(&mut clock, MANY, 1);
    let mut second: Vec<Change> = more
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let Op::Upsert(fields) = &e.op else {
                panic!("an upsert");
            };
            let mut fields = fields.clone();
            let c = keel_schema::model_by_code(e.model)
                .and_then(|d| d.field_index("content"))
                .expect("content field");
            fields[c].1 = Value::Uuid(content(i % 5));
            Change {
                op: Op::Upsert(fields),
                ..e.clone()
            }
        })
        .collect();
    // Contents 0-9 again (stored already) among 20 new ones with their entries: the runs of
    // contents meet stored rows, whose counts must not go into a row that was not inserted.
    let (new_parents, new_entries) = library_of(&mut clock, 20, 2);
    second.extend(parents[2..12].iter().cloned());
    second.extend(new_parents[2..].iter().cloned());
    second.extend(new_entries.iter().cloned());
    second.push(entries[5].clone());
    second.push(entry_fields(
        &mut clock,
        entries[6].record,
        &[
            ("content", Value::Uuid(content(0))),
            ("size", Value::Int(1_000)),
        ],
    ));
    second.push(delete_entry(&mut clock, entries[7].record));
    second.push(delete_entry(&mut clock, entries[8].record));
    // Enough other files to make the batch large.
    let (other_parents, other_entries) = library_of(&mut clock, files, 3);
    second.extend(other_parents[2..].iter().chain(&other_entries).cloned());
    let third = vec![entry_fields(
        &mut clock,
        entries[8].record,
        &[("name", Value::Text("back.txt".into()))],
    )];

    let dir = tempfile::tempdir().expect("tempdir");
    let mut batched = open(&dir, "batched.sqlite");
    assert!(
        batched
            .apply_vouched(&first, None)
            .expect("applies")
            .references_proven
    );
    assert_eq!(counts_of(&batched, content(3)), (1, 3));
    assert_eq!(counts_of(&batched, content(7)), (1, 7));
    assert!(
        batched
            .apply_vouched(&second, None)
            .expect("applies")
            .references_proven
    );
    // Content 0: its own entry (size 0), twenty of the new ones (sizes 0, 5, ..., 95) and
    // entry 6 (1,000).
    assert_eq!(counts_of(&batched, content(0)), (22, 950 + 1_000));
    // Content 1: its own entry (1) and twenty new ones (1, 6, ..., 96).
    assert_eq!(counts_of(&batched, content(1)), (21, 1 + 970));
    assert_eq!(
        counts_of(&batched, content(6)),
        (0, 0),
        "entry 6 moved away"
    );
    assert_eq!(counts_of(&batched, content(7)), (0, 0), "entry 7 deleted");
    assert_eq!(counts_of(&batched, content(8)), (0, 0), "entry 8 deleted");
    assert_eq!(counts_of(&batched, content(50)), (1, 50));
    assert_eq!(counts_of(&batched, new_parents[2 + 3].record), (1, 3));
    assert!(
        !batched
            .apply_vouched(&third, None)
            .expect("applies")
            .references_proven
    );
    assert_eq!(
        counts_of(&batched, content(8)),
        (0, 0),
        "a rename of deleted entry 8 does not bring it back: its delete forgot its other fields"
    );
    // The whole entry written again after its tombstone: visible again.
    let fourth = vec![Change {
        id: ChangeId::new(),
        hlc: clock.next(),
        ..entries[8].clone()
    }];
    batched.apply_vouched(&fourth, None).expect("applies");
    assert_eq!(
        counts_of(&batched, content(8)),
        (1, 8),
        "entry 8 written whole after its tombstone is visible again"
    );
    assert_eq!(
        batched.query().miscounted_contents().expect("recount"),
        Vec::<Uuid>::new()
    );

    // In reverse, in small batches (SQLite checks every reference; entries wait for their
    // contents): the same rows, counts included.
    let mut single = open(&dir, "single.sqlite");
    let reversed: Vec<Change> = first
        .iter()
        .chain(&second)
        .chain(&third)
        .chain(&fourth)
        .rev()
        .cloned()
        .collect();
    for chunk in reversed.chunks(1_000) {
        single.apply_vouched(chunk, None).expect("applies");
    }
    assert_same_rows(&batched, &single);
}

#[test]
fn sizes_that_overflow_a_contents_total_wrap_around_the_same_in_any_order() {
    let mut clock = clock();
    let (parents, entries) = library_of(&mut clock, 3, 0);
    let content = parents[2].record;
    // Three entries of content 0, each claiming the largest size: a made-up total.
    let huge: Vec<Change> = entries
        .iter()
        .map(|e| {
            entry_fields(
                &mut clock,
                e.record,
                &[
                    ("content", Value::Uuid(content)),
                    ("size", Value::Int(i64::MAX)),
                ],
            )
        })
        .collect();
    let all: Vec<Change> = parents
        .iter()
        .chain(&entries)
        .chain(&huge)
        .cloned()
        .collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut whole = open(&dir, "whole.sqlite");
    whole.apply_vouched(&all, None).expect("applies");
    assert_eq!(
        counts_of(&whole, content),
        (3, i64::MAX.wrapping_mul(3)),
        "wrapped, still an integer"
    );
    // The files first, then each size in a transaction of its own: the stored total overflows.
    let mut one_by_one = open(&dir, "one_by_one.sqlite");
    let files: Vec<Change> = parents.iter().chain(&entries).cloned().collect();
    one_by_one.apply_vouched(&files, None).expect("applies");
    for change in &huge {
        one_by_one
            .apply_vouched(std::slice::from_ref(change), None)
            .expect("applies");
    }
    assert_eq!(counts_of(&one_by_one, content), counts_of(&whole, content));
    assert_same_rows(&whole, &one_by_one);
}

/// Both projections hold the same rows (digest), nothing parked, and counts that match a
/// recount of their entries.
fn assert_same_rows(a: &Projections, b: &Projections) {
    for p in [a, b] {
        assert_eq!(p.parked_len(), 0);
        assert_eq!(
            p.query().miscounted_contents().expect("recount"),
            Vec::<Uuid>::new()
        );
    }
    assert_eq!(
        a.query().digest().expect("digest"),
        b.query().digest().expect("digest")
    );
}

/// A device, a location, `MANY` contents and one entry per content.
fn library(clock: &mut Clock) -> (Vec<Change>, Vec<Change>) {
    library_of(clock, MANY, 0)
}

/// A device, a location and `files` files (content identities after them in the first list,
/// their entries in the second); the files of another `set` are other records.
fn library_of(clock: &mut Clock, files: usize, set: u128) -> (Vec<Change>, Vec<Change>) {
    let library = Uuid::from_u128(7);
    let device = Device {
        uuid: clock.device.record_uuid(),
        device_id: clock.device.to_hex(),
        name: "laptop".into(),
        os: "linux".into(),
        created_ms: 1,
    };
    let location = Location {
        uuid: Uuid::from_u128(8),
        device: device.uuid,
        path: "/data".into(),
        name: "data".into(),
        created_ms: 2,
    };
    let mut parents = vec![upsert(clock, &device), upsert(clock, &location)];
    let mut entries = Vec::new();
    for i in 0..files {
        let hash = format!("{set}h{i}");
        let content = ContentIdentity {
            uuid: Some(content_uuid(library, &hash)),
            content_hash: hash,
            mime: None,
            kind: "text".into(),
            size: i as i64,
            entry_count: 0,
            total_size: 0,
        };
        parents.push(upsert(clock, &content));
        let entry = Entry {
            uuid: Some(Uuid::from_u128(0x9000 + (set << 32) + i as u128)),
            location: location.uuid,
            relative_path: String::new(),
            name: format!("f{i}.txt"),
            kind: EntryKind::File.code(),
            size: i as i64,
            created_ms: 0,
            modified_ms: 0,
            content: content.uuid,
            metadata: None,
            inode: None,
            volume: None,
        };
        entries.push(upsert(clock, &entry));
    }
    (parents, entries)
}

#[test]
fn a_run_that_misses_a_reference_parks_that_change_alone() {
    misses_a_reference_in_a_run(false);
}

#[test]
fn a_run_that_misses_a_reference_parks_it_alone_in_a_fast_load_too() {
    // Without WAL (journal in memory) the failed commit must still roll back.
    misses_a_reference_in_a_run(true);
}

fn misses_a_reference_in_a_run(fast_load: bool) {
    let mut clock = clock();
    let (parents, entries) = library(&mut clock);
    // Content 7 is held back: entry 7, in the middle of a run, references nothing yet.
    let held_back = parents[2 + 7].clone();
    let mut batch: Vec<Change> = parents
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 2 + 7)
        .map(|(_, c)| c.clone())
        .collect();
    batch.extend(entries.iter().cloned());
    let dir = tempfile::tempdir().expect("tempdir");
    let mut p = open(&dir, "p.sqlite");
    if fast_load {
        assert!(p.begin_fast_load().expect("switches"));
    }
    let stats = p.apply_vouched(&batch, None).expect("applies");
    assert_eq!(stats.parked, 1);
    assert_eq!(stats.applied, batch.len() as u64 - 1);
    assert_eq!(p.parked_len(), 1);
    assert_eq!(p.query().counts().expect("counts").entries, MANY as u64 - 1);
    let missing = entries[7].record;
    assert!(p.query().get::<Entry>(missing).expect("query").is_none());

    let stats = p.apply_vouched(&[held_back], None).expect("applies");
    assert_eq!((stats.applied, stats.unparked), (1, 1));
    p.end_fast_load().expect("ends the fast load");
    assert_eq!(p.parked_len(), 0);
    assert_eq!(p.query().counts().expect("counts").entries, MANY as u64);

    let mut whole = open(&dir, "whole.sqlite");
    let all: Vec<Change> = parents.iter().chain(&entries).cloned().collect();
    whole.apply_vouched(&all, None).expect("applies");
    assert_eq!(
        p.query().digest().expect("digest"),
        whole.query().digest().expect("digest")
    );
}

#[test]
fn a_large_batch_proves_its_references_itself_and_still_parks_a_missing_one() {
    let files = keel_projections::SELF_PROOF_MIN;
    let mut clock = clock();
    let (parents, entries) = library_of(&mut clock, files, 0);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut p = open(&dir, "p.sqlite");
    // The device and the location first: the entries reference the location outside the batch.
    assert!(
        !p.apply_vouched(&parents[..2], None)
            .expect("applies")
            .references_proven
    );
    // Content 7 is held back: entry 7 references a row neither in the batch nor stored.
    let held_back = parents[2 + 7].clone();
    let mut batch: Vec<Change> = parents[2..]
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 7)
        .map(|(_, c)| c.clone())
        .collect();
    batch.extend(entries.iter().cloned());
    let stats = p.apply_vouched(&batch, None).expect("applies");
    assert!(!stats.references_proven, "a reference is missing");
    assert_eq!(stats.parked, 1);
    assert!(p
        .query()
        .get::<Entry>(entries[7].record)
        .expect("query")
        .is_none());
    // Another set of files, with the held-back content: every reference is in the batch or
    // stored (the location), so the batch is proven and SQLite skips the lookups.
    let (more_parents, more_entries) = library_of(&mut clock, files, 1);
    let more: Vec<Change> = more_parents[2..]
        .iter()
        .chain(&more_entries)
        .cloned()
        .collect();
    let mut second = vec![held_back];
    second.extend(more.iter().cloned());
    let stats = p.apply_vouched(&second, None).expect("applies");
    assert!(stats.references_proven, "{stats:?}");
    assert_eq!(stats.unparked, 1, "entry 7 found its content");
    assert_eq!(p.parked_len(), 0);
    // The same changes in small batches (SQLite checking every reference) give the same rows.
    let mut small = open(&dir, "small.sqlite");
    let all: Vec<Change> = parents
        .iter()
        .chain(&entries)
        .chain(&more)
        .cloned()
        .collect();
    for chunk in all.chunks(MANY) {
        small.apply_vouched(chunk, None).expect("applies");
    }
    assert_eq!(
        p.query().counts().expect("counts").content_identities,
        2 * files as u64
    );
    assert_same_rows(&p, &small);
}

#[test]
fn a_cycle_closed_in_the_same_batch_is_not_parked() {
    let mut clock = clock();
    let (parents, entries) = library(&mut clock);
    // Entry 3 points at metadata that points back at it. Entries apply before user metadata
    // (dependency order), so the entry's reference waits for the metadata; both are in the
    // batch, so the deferred reference is there by the commit.
    let metadata = UserMetadata {
        uuid: Uuid::from_u128(0x5000),
        entry: Some(entries[3].record),
        content: None,
        notes: Some("note".into()),
        favorite: false,
        hidden: false,
        custom_data: None,
    };
    let mut batch: Vec<Change> = parents.iter().chain(&entries).cloned().collect();
    batch.push(upsert(&mut clock, &metadata));
    batch.push(
        Change::upsert_fields::<Entry>(
            ChangeId::new(),
            clock.next(),
            entries[3].record,
            vec![("metadata", Value::Uuid(metadata.uuid))],
        )
        .expect("a field of Entry"),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let mut p = open(&dir, "p.sqlite");
    let stats = p.apply_vouched(&batch, None).expect("applies");
    assert_eq!((stats.applied, stats.parked), (batch.len() as u64, 0));
    assert_eq!(p.parked_len(), 0);
    let entry: Entry = p
        .query()
        .get(entries[3].record)
        .expect("query")
        .expect("visible");
    assert_eq!(entry.metadata, Some(metadata.uuid));
}

#[test]
fn a_projection_of_an_older_schema_is_started_over() {
    let mut clock = clock();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("p.sqlite");
    {
        let mut p = Projections::open(&path).expect("opens");
        let tags: Vec<Change> = (0..3).map(|i| upsert(&mut clock, &tag(i))).collect();
        p.apply(&tags, None).expect("applies");
        p.connection()
            .pragma_update(None, "user_version", 1)
            .expect("marks it as the previous schema");
    }
    let p = Projections::open(&path).expect("reopens");
    assert_eq!(
        p.query().counts().expect("counts").tags,
        0,
        "discarded, to be replayed"
    );
    let version: i64 = p
        .connection()
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .expect("version");
    assert!(version > 1);
}

/// A delete keeps the field naming an entry's owner (its location): a change to the entry
/// older than the delete, applied after it, is dropped, not parked waiting for an owner that
/// would never come back (found by `convergence::incremental_replayed_and_shuffled_agree`).
#[test]
fn a_deleted_entry_keeps_its_owner_and_a_late_older_write_is_dropped_not_parked() {
    let mut clock = clock();
    let (parents, entries) = library_of(&mut clock, 2, 0);
    let record = entries[0].record;
    let rename = entry_fields(&mut clock, record, &[("name", Value::Text("b.txt".into()))]);
    let delete = delete_entry(&mut clock, record);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut late = open(&dir, "late.sqlite");
    let mut ordered = open(&dir, "ordered.sqlite");
    late.apply_vouched(&parents, None).expect("applies");
    late.apply_vouched(&entries, None).expect("applies");
    late.apply_vouched(std::slice::from_ref(&delete), None)
        .expect("applies");
    let stats = late
        .apply_vouched(std::slice::from_ref(&rename), None)
        .expect("applies");
    assert_eq!((stats.parked, late.parked_len()), (0, 0), "{stats:?}");
    assert_eq!(stats.unchanged, 1, "older than the delete: dropped");
    let location: Option<Vec<u8>> = late
        .connection()
        .query_row(
            "SELECT location FROM entry WHERE uuid = ?1",
            [record.as_bytes().as_slice()],
            |r| r.get(0),
        )
        .expect("the deleted row");
    assert_eq!(location, Some(Uuid::from_u128(8).as_bytes().to_vec()));

    let all: Vec<Change> = parents
        .iter()
        .chain(&entries)
        .chain([&rename, &delete])
        .cloned()
        .collect();
    ordered.apply_vouched(&all, None).expect("applies");
    assert_eq!(
        late.query().digest().expect("digest"),
        ordered.query().digest().expect("digest")
    );
}
