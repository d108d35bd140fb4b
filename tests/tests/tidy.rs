//! Tidy: every Rust file starts with a `//!` doc, and no debugging leftovers remain.

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(read) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in read.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if path.is_dir() {
            if name == "target" || name.starts_with('.') || name == "corpus" || name == "artifacts"
            {
                continue;
            }
            rust_files(&path, out);
        } else if name.ends_with(".rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_module_is_documented_and_tidy() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    assert!(files.len() > 20, "found only {} Rust files", files.len());
    let banned = [
        concat!("dbg", "!("),
        concat!("todo", "!("),
        concat!("unimplemented", "!("),
    ];
    let mut problems = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).expect("readable");
        // trybuild inputs are deliberately broken crates; they still need a doc line.
        let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
        if !first.starts_with("//!") {
            problems.push(format!("{}: first line is not a //! doc", file.display()));
        }
        for b in banned {
            if text.contains(b) {
                problems.push(format!("{}: contains {b}", file.display()));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "tidy problems:\n{}",
        problems.join("\n")
    );
}

/// The crates a package compiles for its users (`cargo tree -e normal`), by name.
fn normal_dependencies(package: &str) -> std::collections::BTreeSet<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = std::process::Command::new(cargo)
        .current_dir(&root)
        .args([
            "tree",
            "--offline",
            "-e",
            "normal",
            "--prefix",
            "none",
            "-p",
            package,
        ])
        .output()
        .expect("cargo tree runs");
    assert!(
        out.status.success(),
        "cargo tree -p {package}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("UTF-8");
    let names: std::collections::BTreeSet<String> = text
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    assert!(names.contains(package), "{package} not in its own tree");
    names
}

/// Checks that `package` compiles none of `banned`.
fn assert_free_of(package: &str, banned: &[&str]) {
    let names = normal_dependencies(package);
    let found: Vec<&&str> = banned.iter().filter(|b| names.contains(**b)).collect();
    assert!(found.is_empty(), "{package} depends on {found:?}");
}

/// The tools of the command line, benchmarks and tests, which an embedding app never needs.
/// (`walkdir` left this list with the location watcher: `notify` walks a watched folder with it;
/// the indexer still walks with its own `walk.rs`.)
const TOOLING: &[&str] = &[
    "clap",
    "indicatif",
    "rpassword",
    "anyhow",
    "mimalloc",
    "tracing-subscriber",
    "criterion",
    "serde_json",
    "keel-bench",
];

#[test]
fn the_library_a_host_app_embeds_compiles_no_tooling_and_no_runtime() {
    let mut banned = TOOLING.to_vec();
    // No network stack either: the node brings QUIC; the library only stores the device's
    // certificate and key.
    banned.extend([
        "keel-node",
        "keel-replication",
        "keel-transport",
        "quinn",
        "rustls",
    ]);
    assert_free_of("keel-engine", &banned);
    assert_free_of("keel-node", TOOLING);
}

#[test]
fn the_protocol_core_depends_on_nothing_that_does_io() {
    assert_free_of(
        "keel-replication",
        &[
            "tokio",
            "quinn",
            "redb",
            "rusqlite",
            "keel-journal",
            "keel-projections",
            "keel-transport",
            "keel-engine",
        ],
    );
}

#[test]
fn storage_and_network_crates_do_not_import_each_other() {
    let keel = |p: &str| -> Vec<String> {
        normal_dependencies(p)
            .into_iter()
            .filter(|n| n.starts_with("keel-") && n != p && n != "keel-schema-derive")
            .collect()
    };
    for package in ["keel-journal", "keel-projections"] {
        assert_eq!(keel(package), ["keel-schema"], "{package}");
    }
    // The wire carries the protocol core's messages; the core itself knows no other crate.
    assert_eq!(keel("keel-transport"), ["keel-replication", "keel-schema"]);
    assert_eq!(keel("keel-replication"), ["keel-schema"]);
}
