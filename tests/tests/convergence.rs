//! Property tests: random operation sequences applied incrementally, then replayed in log order,
//! then replayed shuffled in random batches (behind their attestations), give one digest — and
//! match a simple in-memory model.

use std::collections::{BTreeMap, BTreeSet};

use keel_engine::{Entry, EntryKind, Library, Location, Tag, UserMetadata, UserMetadataTag};
use keel_projections::Projections;
use keel_schema::{
    content_metadata_uuid, content_uuid, tag_uuid, user_metadata_tag_uuid, ContentIdentity, Value,
};
use keel_tests::create_library;
use proptest::prelude::*;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};
use uuid::Uuid;

#[derive(Debug, Clone)]
enum Op {
    AddFile { name: u8, content: u8 },
    ChangeContent { file: u8, content: u8 },
    Remove { file: u8 },
    Tag { file: u8, tag: u8 },
    Untag { file: u8, tag: u8 },
    Note { file: u8, text: u8 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u8..12, 0u8..5).prop_map(|(name, content)| Op::AddFile { name, content }),
        1 => (0u8..12, 0u8..5).prop_map(|(file, content)| Op::ChangeContent { file, content }),
        1 => (0u8..12).prop_map(|file| Op::Remove { file }),
        2 => (0u8..12, 0u8..3).prop_map(|(file, tag)| Op::Tag { file, tag }),
        1 => (0u8..12, 0u8..3).prop_map(|(file, tag)| Op::Untag { file, tag }),
        1 => (0u8..12, 0u8..4).prop_map(|(file, text)| Op::Note { file, text }),
    ]
}

/// The reference model: files by name, tags and notes by content.
#[derive(Default, Debug)]
struct Model {
    files: BTreeMap<u8, (Uuid, Uuid)>,
    tags: BTreeMap<Uuid, BTreeSet<String>>,
    notes: BTreeMap<Uuid, String>,
    known_content: BTreeSet<Uuid>,
    known_tags: BTreeSet<Uuid>,
    metadata: BTreeSet<Uuid>,
}

fn run(lib: &Library, location: Uuid, ops: &[Op]) -> Model {
    let library = lib.id().0;
    let mut model = Model::default();
    for op in ops {
        lib.transact(|tx| {
            let ensure_content = |tx: &mut keel_engine::Tx<'_>, model: &mut Model, c: u8| -> Uuid {
                let hash = format!("hash-{c}");
                let uuid = content_uuid(library, &hash);
                if model.known_content.insert(uuid) {
                    tx.upsert(&ContentIdentity {
                        uuid: Some(uuid),
                        content_hash: hash,
                        mime: None,
                        kind: "text".into(),
                        size: i64::from(c),
                        entry_count: 0,
                        total_size: 0,
                    });
                }
                uuid
            };
            let ensure_metadata =
                |tx: &mut keel_engine::Tx<'_>, model: &mut Model, content: Uuid| -> Uuid {
                    let uuid = content_metadata_uuid(content);
                    if model.metadata.insert(uuid) {
                        tx.upsert(&UserMetadata {
                            uuid,
                            entry: None,
                            content: Some(content),
                            notes: None,
                            favorite: false,
                            hidden: false,
                            custom_data: None,
                        });
                    }
                    uuid
                };
            match *op {
                Op::AddFile { name, content } => {
                    if model.files.contains_key(&name) {
                        return Ok(());
                    }
                    let c = ensure_content(tx, &mut model, content);
                    let uuid = Uuid::now_v7();
                    tx.upsert(&Entry {
                        uuid: Some(uuid),
                        location,
                        relative_path: String::new(),
                        name: format!("f{name}"),
                        kind: EntryKind::File.code(),
                        size: i64::from(content),
                        created_ms: 0,
                        modified_ms: 0,
                        content: Some(c),
                        metadata: None,
                        inode: None,
                        volume: None,
                    });
                    model.files.insert(name, (uuid, c));
                }
                Op::ChangeContent { file, content } => {
                    let Some((uuid, _)) = model.files.get(&file).copied() else {
                        return Ok(());
                    };
                    let c = ensure_content(tx, &mut model, content);
                    tx.update::<Entry>(
                        uuid,
                        vec![
                            ("content", Value::Uuid(c)),
                            ("size", Value::Int(i64::from(content))),
                        ],
                    )?;
                    model.files.insert(file, (uuid, c));
                }
                Op::Remove { file } => {
                    if let Some((uuid, _)) = model.files.remove(&file) {
                        tx.delete::<Entry>(uuid);
                    }
                }
                Op::Tag { file, tag } => {
                    let Some((_, c)) = model.files.get(&file).copied() else {
                        return Ok(());
                    };
                    let m = ensure_metadata(tx, &mut model, c);
                    let name = format!("tag{tag}");
                    let t = tag_uuid(library, &name);
                    if model.known_tags.insert(t) {
                        tx.upsert(&Tag {
                            uuid: t,
                            name: name.clone(),
                            color: None,
                            created_ms: 0,
                        });
                    }
                    tx.upsert(&UserMetadataTag {
                        uuid: user_metadata_tag_uuid(m, t),
                        user_metadata: m,
                        tag: t,
                        created_ms: 0,
                    });
                    model.tags.entry(c).or_default().insert(name);
                }
                Op::Untag { file, tag } => {
                    let Some((_, c)) = model.files.get(&file).copied() else {
                        return Ok(());
                    };
                    let name = format!("tag{tag}");
                    if model.tags.get_mut(&c).is_some_and(|s| s.remove(&name)) {
                        let m = content_metadata_uuid(c);
                        tx.delete::<UserMetadataTag>(user_metadata_tag_uuid(
                            m,
                            tag_uuid(library, &name),
                        ));
                    }
                }
                Op::Note { file, text } => {
                    let Some((_, c)) = model.files.get(&file).copied() else {
                        return Ok(());
                    };
                    let m = ensure_metadata(tx, &mut model, c);
                    let note = format!("note {text}");
                    tx.update::<UserMetadata>(m, vec![("notes", Value::Text(note.clone()))])?;
                    model.notes.insert(c, note);
                }
            }
            Ok(())
        })
        .expect("commit");
    }
    model
}

fn check_against_model(p: &Projections, location: Uuid, model: &Model) {
    let entries = p.query().entries_of_location(location).expect("query");
    let mut seen: BTreeMap<String, Option<Uuid>> = BTreeMap::new();
    for e in &entries {
        seen.insert(e.name.clone(), e.content);
    }
    let expected: BTreeMap<String, Option<Uuid>> = model
        .files
        .iter()
        .map(|(n, (_, c))| (format!("f{n}"), Some(*c)))
        .collect();
    assert_eq!(seen, expected, "entries differ from the model");
    for (content, tags) in &model.tags {
        let names: BTreeSet<String> = p
            .query()
            .tags_of_content(*content)
            .expect("query")
            .into_iter()
            .map(|t| t.name)
            .collect();
        assert_eq!(&names, tags, "tags of {content}");
    }
    // Each content's derived counts: its files in the model (a file's size is its content's).
    for content in &model.known_content {
        let files = model.files.values().filter(|(_, c)| c == content).count();
        let c = p
            .query()
            .content_identity(*content)
            .expect("query")
            .expect("content visible");
        assert_eq!(
            (c.entry_count, c.total_size),
            (files as i64, files as i64 * c.size),
            "counts of {content}"
        );
    }
    assert_eq!(
        p.query().miscounted_contents().expect("recount"),
        Vec::<Uuid>::new()
    );
    for (content, note) in &model.notes {
        let m: UserMetadata = p
            .query()
            .get(content_metadata_uuid(*content))
            .expect("query")
            .expect("metadata visible");
        assert_eq!(m.notes.as_deref(), Some(note.as_str()));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    #[test]
    fn incremental_replayed_and_shuffled_agree(ops in proptest::collection::vec(op(), 1..40), seed in any::<u64>()) {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_home, lib) = create_library(dir.path(), "prop").expect("creates");
        let location = Location {
            uuid: Uuid::now_v7(),
            device: lib.device_id().record_uuid(),
            path: "/prop".into(),
            name: "prop".into(),
            created_ms: 0,
        };
        lib.transact(|tx| { tx.upsert(&location); Ok(()) }).expect("location");
        let model = run(&lib, location.uuid, &ops);
        let incremental = lib.digest().expect("digest");
        lib.read(|p| { check_against_model(p, location.uuid, &model); Ok(()) }).expect("read");
        let changes = lib.sync_state().changes().expect("journal");

        let replayed = {
            let mut p = Projections::open(&dir.path().join("replay.sqlite")).expect("opens");
            p.apply(&changes, None).expect("applies");
            check_against_model(&p, location.uuid, &model);
            p.query().digest().expect("digest")
        };
        prop_assert_eq!(&replayed, &incremental);

        // In any order behind the attestations, which every log puts before the changes they
        // vouch for (decision 0043): a change applied before its attestation is refused.
        let shuffled = {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let attestation = keel_schema::code_of::<keel_schema::Attestation>();
            let (attestations, mut order): (Vec<_>, Vec<_>) =
                changes.iter().cloned().partition(|c| c.model == attestation);
            order.shuffle(&mut rng);
            let mut p = Projections::open(&dir.path().join("shuffled.sqlite")).expect("opens");
            p.apply(&attestations, None).expect("attestations apply");
            let mut rest = &order[..];
            while !rest.is_empty() {
                let n = rng.random_range(1..=rest.len().min(7));
                p.apply(&rest[..n], None).expect("applies");
                rest = &rest[n..];
            }
            prop_assert_eq!(p.parked_len(), 0, "every dependency arrived");
            check_against_model(&p, location.uuid, &model);
            p.query().digest().expect("digest")
        };
        prop_assert_eq!(&shuffled, &incremental);

        lib.rebuild(&mut |_, _| {}).expect("rebuilds");
        prop_assert_eq!(lib.digest().expect("digest"), incremental);
    }
}
