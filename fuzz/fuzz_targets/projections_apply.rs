//! Fuzz target: `Projections::apply` on arbitrary changes to a few tags (whole and partial
//! upserts, deletes, from three devices, at arbitrary clocks), against a reference model of its
//! documented rule (`projections/src/apply.rs`): each field keeps its newest write by clock if
//! that write is newer than the record's newest delete (a delete forgets the fields it covers);
//! a row is visible when its non-nullable fields were written after its newest delete. The same changes applied in another order and other batches give the
//! same rows (the result is a function of the set of changes).
//!
//! Opening projections costs about 100 ms (their schema), so one pair serves many inputs, each
//! on records of its own, and is made again every few thousand inputs (when the digests of the
//! two, every change applied in both, must also agree).
#![no_main]

#[path = "../../tests/src/shm.rs"]
mod scratch;

use std::collections::BTreeMap;

use keel_projections::Projections;
use keel_schema::{Change, ChangeId, DeviceId, Hlc, Syncable, Tag, Value};
use libfuzzer_sys::fuzz_target;
use uuid::Uuid;

/// A tag's fields in the model: each with the clock of its newest write.
#[derive(Default)]
struct ModelRow {
    name: Option<(Hlc, String)>,
    color: Option<(Hlc, Option<String>)>,
    created: Option<(Hlc, i64)>,
    deleted: Option<Hlc>,
}

impl ModelRow {
    fn write<T>(slot: &mut Option<(Hlc, T)>, hlc: Hlc, value: T) {
        if slot.as_ref().is_none_or(|(at, _)| *at < hlc) {
            *slot = Some((hlc, value));
        }
    }

    /// A field's newest write, unless the newest delete came after it.
    fn kept<'a, T>(&self, slot: &'a Option<(Hlc, T)>) -> Option<&'a T> {
        let (at, value) = slot.as_ref()?;
        self.deleted.is_none_or(|d| *at > d).then_some(value)
    }

    /// The visible tag, if any.
    fn visible(&self, uuid: Uuid) -> Option<Tag> {
        Some(Tag {
            uuid,
            name: self.kept(&self.name)?.clone(),
            color: self.kept(&self.color).cloned().flatten(),
            created_ms: *self.kept(&self.created)?,
        })
    }
}

fn uuid_of(run: u64, n: u8) -> Uuid {
    Uuid::from_u128(u128::from(run) << 8 | u128::from(n % 4))
}

/// Decodes the input into changes (to records of run `run`), each with a clock of its own.
fn changes(run: u64, data: &[u8]) -> Vec<Change> {
    let mut out = Vec::new();
    for (i, op) in data.chunks_exact(4).take(64).enumerate() {
        let hlc = Hlc {
            physical_ms: u64::from(op[1] % 16),
            counter: i as u32,
            device: DeviceId([op[2] % 3; 32]),
        };
        let id = ChangeId(Uuid::from_u128(u128::from(run) << 16 | (i as u128 + 1)));
        let uuid = uuid_of(run, op[0]);
        let name = || Value::Text(format!("t{}", op[3] % 5));
        let color = || match op[3] % 3 {
            0 => Value::Null,
            n => Value::Text(format!("c{n}")),
        };
        let created = || Value::Int(i64::from(op[3]));
        let fields = match op[0] >> 2 & 7 {
            0 => {
                out.push(Change::delete::<Tag>(id, hlc, uuid));
                continue;
            }
            1 => vec![("name", name())],
            2 => vec![("color", color())],
            3 => vec![("created_ms", created())],
            4 => vec![("name", name()), ("color", color())],
            _ => vec![
                ("name", name()),
                ("color", color()),
                ("created_ms", created()),
            ],
        };
        if let Ok(change) = Change::upsert_fields::<Tag>(id, hlc, uuid, fields) {
            out.push(change);
        }
    }
    out
}

fn model(changes: &[Change]) -> BTreeMap<Uuid, Tag> {
    let index = |name: &str| Tag::DEF.field_index(name).expect("a field of Tag");
    let (name, color, created) = (index("name"), index("color"), index("created_ms"));
    let mut rows: BTreeMap<Uuid, ModelRow> = BTreeMap::new();
    for change in changes {
        let row = rows.entry(change.record).or_default();
        match &change.op {
            keel_schema::Op::Delete => {
                if row.deleted.is_none_or(|d| d < change.hlc) {
                    row.deleted = Some(change.hlc);
                }
            }
            keel_schema::Op::Upsert(fields) => {
                for (index, value) in fields {
                    let index = usize::from(*index);
                    match value {
                        Value::Text(t) if index == name => {
                            ModelRow::write(&mut row.name, change.hlc, t.clone())
                        }
                        Value::Text(t) if index == color => {
                            ModelRow::write(&mut row.color, change.hlc, Some(t.clone()))
                        }
                        Value::Null if index == color => {
                            ModelRow::write(&mut row.color, change.hlc, None)
                        }
                        Value::Int(n) if index == created => {
                            ModelRow::write(&mut row.created, change.hlc, *n)
                        }
                        other => panic!("a field the decoder does not make: {index} {other:?}"),
                    }
                }
            }
        }
    }
    rows.into_iter()
        .filter_map(|(uuid, row)| Some((uuid, row.visible(uuid)?)))
        .collect()
}

/// The two projections inputs are applied to, and how many inputs they took.
struct Pair {
    _dir: tempfile::TempDir,
    forward: Projections,
    backward: Projections,
    runs: u64,
}

impl Pair {
    fn new() -> Self {
        let dir = scratch::dir("keel-fuzz");
        let open = |name: &str| Projections::open(&dir.path().join(name)).expect("opens");
        Self {
            forward: open("forward.sqlite"),
            backward: open("backward.sqlite"),
            _dir: dir,
            runs: 0,
        }
    }
}

/// Inputs a pair of projections takes before it is made again.
const RUNS_PER_PAIR: u64 = 4096;

static PAIR: std::sync::Mutex<Option<(Pair, u64)>> = std::sync::Mutex::new(None);

fuzz_target!(|data: &[u8]| {
    let mut slot = PAIR.lock().unwrap_or_else(|p| p.into_inner());
    let (pair, run) = slot.get_or_insert_with(|| (Pair::new(), 0));
    *run += 1;
    let changes = changes(*run, data);
    pair.forward.apply(&changes, None).expect("applies");
    let split = data.first().map_or(1, |b| usize::from(*b % 4) + 1);
    let reversed: Vec<Change> = changes.iter().rev().cloned().collect();
    for batch in reversed.chunks(split) {
        pair.backward.apply(batch, None).expect("applies");
    }
    let expected = model(&changes);
    let (low, high) = (uuid_of(*run, 0), uuid_of(*run, 3));
    let read = |p: &Projections| -> BTreeMap<Uuid, Tag> {
        p.query()
            .select::<Tag, _>(
                "uuid BETWEEN ?1 AND ?2",
                [low.as_bytes().as_slice(), high.as_bytes().as_slice()],
            )
            .expect("reads")
            .into_iter()
            .map(|t| (t.uuid, t))
            .collect()
    };
    assert_eq!(
        read(&pair.forward),
        expected,
        "the projection differs from the model"
    );
    assert_eq!(
        read(&pair.backward),
        expected,
        "another order gave other rows"
    );
    pair.runs += 1;
    if pair.runs >= RUNS_PER_PAIR {
        assert_eq!(
            pair.forward.query().digest().expect("digest"),
            pair.backward.query().digest().expect("digest"),
            "another order gave another projection"
        );
        *slot = None;
    }
});
