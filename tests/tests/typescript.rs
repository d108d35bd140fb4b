//! Issue 25: TypeScript declarations of what a web view receives, kept current, and checked by
//! the TypeScript compiler against the JSON of real values.

use std::path::{Path, PathBuf};
use std::process::Command;

use keel_engine::{EntryFilter, FeedPosition, Scope};
use keel_tests::cluster::founder;

/// The committed declarations.
fn committed() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../engine/node/keel.ts")
}

/// The declarations file is what `keel_node::typescript()` makes now (`KEEL_BLESS=1` writes
/// it after a type changed).
#[test]
fn the_typescript_declarations_are_current() {
    let made = keel_node::typescript();
    if std::env::var("KEEL_BLESS").is_ok_and(|v| v == "1") {
        std::fs::write(committed(), &made).expect("writes");
    }
    let held = std::fs::read_to_string(committed()).unwrap_or_default();
    assert!(
        held == made,
        "engine/node/keel.ts is out of date: run `KEEL_BLESS=1 cargo test -p keel-tests --test typescript`"
    );
    for name in [
        "Entry",
        "Event",
        "NodeStatus",
        "SearchHit",
        "Value",
        "Status",
    ] {
        assert!(made.contains(&format!("export type {name} =")), "{name}");
    }
    assert!(!made.contains("bigint"), "JSON numbers are numbers");
}

/// The TypeScript compiler: `KEEL_TSC`, else `target/tsc/node_modules/.bin/tsc` (where
/// `.ci/run` installs it).
fn tsc() -> PathBuf {
    std::env::var_os("KEEL_TSC")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tsc/node_modules/.bin/tsc")
        })
}

/// Type-checks `body` (TypeScript importing the declarations) in a scratch folder; the
/// compiler's output if it fails.
fn type_check(body: &str) -> Result<(), String> {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::copy(committed(), dir.path().join("keel.ts")).expect("copies");
    std::fs::write(dir.path().join("check.ts"), body).expect("writes");
    let out = Command::new(tsc())
        .args(["--strict", "--noEmit", "--target", "es2020", "check.ts"])
        .current_dir(dir.path())
        .output()
        .unwrap_or_else(|e| panic!("runs {}: {e}", tsc().display()));
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// The JSON of real values of each type, as TypeScript constants of that type.
fn real_values() -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_home, node) = founder(dir.path(), "a", "lib").expect("founder");
    let lib = node.library();
    let mut events = lib.subscribe();
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(&tree).expect("tree");
    std::fs::write(tree.join("beach.jpg"), b"sand").expect("file");
    lib.index(&tree, &mut |_| {}).expect("indexes");
    let file = tree.join("beach.jpg");
    lib.files()
        .tag(&file, &["sea".to_string()], Scope::Content)
        .expect("tags");
    lib.files()
        .note(&file, "sunset", Scope::Entry)
        .expect("notes");
    lib.flush().expect("flushes");
    let entry = lib.files().entry(&file).expect("entry");
    let mut recorded = Vec::new();
    while let Ok(event) = events.try_recv() {
        recorded.push(event);
    }
    let json = |v: &dyn erased::Json| v.json();
    let page = lib
        .read(|p| p.query().entries(&EntryFilter::default()))
        .expect("page");
    let values = [
        ("Status", json(&lib.status().expect("status"))),
        ("NodeStatus", json(&node.status())),
        ("Array<Event>", json(&recorded)),
        ("Entry", json(&entry)),
        (
            "EntryMetadata",
            json(&lib.files().metadata(&entry).expect("metadata")),
        ),
        ("EntryPage", json(&page)),
        (
            "Array<SearchHit>",
            json(&lib.search("sun", 10).expect("search")),
        ),
        (
            "ChangeFeed",
            json(
                &lib.sync_state()
                    .changes_since(FeedPosition::default(), 50)
                    .expect("feed"),
            ),
        ),
        (
            "Array<LackingModel>",
            json(&lib.lacking_models().expect("lacking")),
        ),
        (
            "Array<RegisteredModel>",
            json(&lib.recorded_models().expect("models")),
        ),
    ];
    assert!(recorded.len() >= 2, "{recorded:?}");
    let names: Vec<&str> = [
        "Status",
        "NodeStatus",
        "Event",
        "Entry",
        "EntryMetadata",
        "EntryPage",
        "SearchHit",
        "ChangeFeed",
        "LackingModel",
        "RegisteredModel",
        "Job",
    ]
    .to_vec();
    let mut body = format!("import type {{ {} }} from \"./keel\";\n", names.join(", "));
    for (i, (ty, value)) in values.iter().enumerate() {
        body.push_str(&format!("export const v{i}: {ty} = {value};\n"));
    }
    body
}

/// Serializing through a trait object.
mod erased {
    /// A value with a JSON form.
    pub(crate) trait Json {
        fn json(&self) -> String;
    }

    impl<T: serde::Serialize> Json for T {
        fn json(&self) -> String {
            serde_json::to_string(self).expect("serializes")
        }
    }
}

/// The JSON a host hands its web view type-checks against the declarations, in strict mode (a
/// missing or extra field, a wrong type is an error); a value with a misspelt field does not.
#[test]
#[ignore = "needs Node.js and the TypeScript compiler: .ci/run installs them and runs it"]
fn the_json_of_real_values_type_checks_against_the_declarations() {
    let body = real_values();
    if let Err(report) = type_check(&body) {
        panic!("{report}\n{body}");
    }
    let misspelt = body.replacen("\"log_len\"", "\"log_length\"", 1);
    assert_ne!(misspelt, body);
    assert!(
        type_check(&misspelt).is_err(),
        "a misspelt field type-checked"
    );
}
