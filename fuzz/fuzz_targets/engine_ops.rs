//! Fuzz target: the engine (`keel_engine::Library`: journal, applier, projections) driven by
//! arbitrary operations against a simple model. Each input is a run of transactions of tag
//! upserts (whole records, or the name alone) and deletes; after each transaction (and
//! `flush`) the library's visible tags of the run equal the model's: on one device each write
//! is newer than the last, so a field keeps its last value, a delete hides the row and forgets
//! its fields, and a write after it shows it again with the fields written since (the
//! projections' rule), once every non-nullable field was written after the delete. Every
//! [`COMPACT_EVERY`] inputs the log is compacted (the library is alone: up to its end), so the
//! runs after it write over a snapshot. Every few thousand inputs the library is closed, opened
//! again, verified (every record sound, the projections equal a replay of the journal: the
//! snapshot and the log after it), rebuilt from the journal, and checked against the model of
//! all runs.
#![no_main]

#[path = "../../tests/src/shm.rs"]
mod scratch;

use std::collections::BTreeMap;

use keel_engine::{CreateOptions, Home, Library, Tag, TagUpdate};
use keel_journal::KdfParams;
use libfuzzer_sys::fuzz_target;
use uuid::Uuid;

const PASSWORD: &str = "fuzz";
/// Inputs one library takes before it is reopened, verified and made again.
const RUNS_PER_LIBRARY: u64 = 2048;
/// Inputs between two compactions of the log.
const COMPACT_EVERY: u64 = 512;

/// A tag in the model: each field's last value since its last delete, and whether a delete came
/// last.
#[derive(Clone, Default)]
struct ModelTag {
    name: Option<String>,
    color: Option<Option<String>>,
    created_ms: Option<i64>,
    deleted: bool,
}

impl ModelTag {
    fn visible(&self, uuid: Uuid) -> Option<Tag> {
        if self.deleted {
            return None;
        }
        Some(Tag {
            uuid,
            name: self.name.clone()?,
            color: self.color.clone().flatten(),
            created_ms: self.created_ms?,
        })
    }
}

struct Fixture {
    dir: tempfile::TempDir,
    lib: Option<Library>,
    /// Every tag written, by the model.
    model: BTreeMap<Uuid, ModelTag>,
    runs: u64,
}

impl Fixture {
    fn new() -> Self {
        let dir = scratch::dir("keel-fuzz");
        let options = CreateOptions {
            kdf: KdfParams::INSECURE_FAST,
        };
        let lib =
            Library::create(&Home::new(dir.path()), "lib", PASSWORD, options).expect("creates");
        Self {
            dir,
            lib: Some(lib),
            model: BTreeMap::new(),
            runs: 0,
        }
    }

    fn lib(&self) -> &Library {
        self.lib.as_ref().expect("open")
    }

    /// The library's visible tags among `uuids`.
    fn visible(&self, uuids: &[Uuid]) -> BTreeMap<Uuid, Tag> {
        uuids
            .iter()
            .filter_map(|u| self.lib().get::<Tag>(*u).expect("reads"))
            .map(|t| (t.uuid, t))
            .collect()
    }

    fn expected(&self, uuids: &[Uuid]) -> BTreeMap<Uuid, Tag> {
        uuids
            .iter()
            .filter_map(|u| self.model.get(u)?.visible(*u))
            .map(|t| (t.uuid, t))
            .collect()
    }

    /// Closes, opens again, verifies and checks every tag of every run.
    fn reopen_and_verify(&mut self) {
        if let Some(lib) = self.lib.take() {
            lib.close().expect("closes");
        }
        let lib = Library::open(&Home::new(self.dir.path()), "lib", PASSWORD).expect("opens");
        let (report, replayed) = lib.verify().expect("verifies");
        assert!(report.faults.is_empty(), "faults: {:?}", report.faults);
        let digest = lib.digest().expect("digest");
        assert_eq!(replayed.expect("a replay"), digest);
        lib.rebuild(&mut |_, _| {}).expect("rebuilds");
        assert_eq!(lib.digest().expect("digest"), digest, "after a rebuild");
        self.lib = Some(lib);
        let uuids: Vec<Uuid> = self.model.keys().copied().collect();
        assert_eq!(
            self.visible(&uuids),
            self.expected(&uuids),
            "after reopening and rebuilding"
        );
    }
}

static FIXTURE: std::sync::Mutex<Option<Fixture>> = std::sync::Mutex::new(None);

/// One operation of a transaction, decoded from 3 bytes.
enum Operation {
    Upsert(Tag),
    Rename(Uuid, String),
    Delete(Uuid),
}

fn operation(run: u64, op: &[u8]) -> Operation {
    let uuid = Uuid::from_u128(u128::from(run) << 8 | u128::from(op[1] % 6));
    let name = format!("t{}", op[2] % 7);
    match op[0] % 4 {
        0 | 1 => Operation::Upsert(Tag {
            uuid,
            name,
            color: (op[2] % 2 == 0).then(|| format!("c{}", op[2] % 3)),
            created_ms: i64::from(op[2]),
        }),
        2 => Operation::Rename(uuid, name),
        _ => Operation::Delete(uuid),
    }
}

fuzz_target!(|data: &[u8]| {
    let mut slot = FIXTURE.lock().unwrap_or_else(|p| p.into_inner());
    let fixture = slot.get_or_insert_with(Fixture::new);
    fixture.runs += 1;
    let run = fixture.runs;
    let uuids: Vec<Uuid> = (0..6)
        .map(|n| Uuid::from_u128(u128::from(run) << 8 | n))
        .collect();
    // Transactions end at a byte 0xff.
    for transaction in data.split(|b| *b == 0xff).take(8) {
        let operations: Vec<Operation> = transaction
            .chunks_exact(3)
            .take(16)
            .map(|op| operation(run, op))
            .collect();
        if operations.is_empty() {
            continue;
        }
        // This run's tags only (a copy of the whole model per transaction cost more than the
        // library's commit), merged into the model once the transaction commits.
        let mut model: BTreeMap<Uuid, ModelTag> = uuids
            .iter()
            .filter_map(|u| Some((*u, fixture.model.get(u)?.clone())))
            .collect();
        fixture
            .lib()
            .transact(|tx| {
                for operation in &operations {
                    match operation {
                        Operation::Upsert(tag) => {
                            tx.upsert(tag);
                            model.insert(
                                tag.uuid,
                                ModelTag {
                                    name: Some(tag.name.clone()),
                                    color: Some(tag.color.clone()),
                                    created_ms: Some(tag.created_ms),
                                    deleted: false,
                                },
                            );
                        }
                        Operation::Rename(uuid, name) => {
                            tx.set(TagUpdate::new(*uuid).name(name.clone()))?;
                            let tag = model.entry(*uuid).or_default();
                            tag.name = Some(name.clone());
                            tag.deleted = false;
                        }
                        Operation::Delete(uuid) => {
                            tx.delete::<Tag>(*uuid);
                            model.insert(
                                *uuid,
                                ModelTag {
                                    deleted: true,
                                    ..ModelTag::default()
                                },
                            );
                        }
                    }
                }
                Ok(())
            })
            .expect("commits");
        fixture.model.extend(model);
        fixture.lib().flush().expect("flushes");
        assert_eq!(
            fixture.visible(&uuids),
            fixture.expected(&uuids),
            "the library differs from the model"
        );
    }
    if fixture.runs % COMPACT_EVERY == 0 {
        let report = fixture
            .lib()
            .compact(keel_engine::Lsn(u64::MAX))
            .expect("compacts");
        let uuids: Vec<Uuid> = fixture.model.keys().copied().collect();
        assert!(report.base > 0, "{report:?}");
        assert_eq!(
            fixture.visible(&uuids),
            fixture.expected(&uuids),
            "after compacting"
        );
    }
    if fixture.runs % RUNS_PER_LIBRARY == 0 {
        fixture.reopen_and_verify();
        *slot = None;
    }
});
