//! The `keel` command-line contract that scripts depend on: exit codes, `error:` lines, the digest
//! format and the keys of `status --json` and `show --json`.

use std::path::Path;
use std::process::{Command, Output};

fn keel(home: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_keel"))
        .arg("--home")
        .arg(home)
        .args(args)
        .env("KEEL_PASSWORD", "pw")
        .env("KEEL_INSECURE_FAST_KDF", "1")
        .output()
        .expect("keel runs")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "keel failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).expect("utf-8 stdout")
}

fn fails_with_one_error_line(out: &Output) {
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "stderr: {stderr}");
    assert!(lines[0].starts_with("error:"), "stderr: {stderr}");
}

#[test]
fn index_tag_note_show_status_digest_rebuild() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join("home");
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(tree.join("sub")).expect("tree");
    std::fs::write(tree.join("a.txt"), b"same bytes").expect("file");
    std::fs::write(tree.join("sub/b.txt"), b"same bytes").expect("file");
    std::fs::write(tree.join("c.md"), b"other").expect("file");
    let tree_s = tree.to_str().expect("utf-8 path");
    let a = tree.join("a.txt");
    let b = tree.join("sub/b.txt");

    ok(&keel(&home, &["init", "lib"]));
    ok(&keel(&home, &["index", "lib", tree_s]));
    ok(&keel(
        &home,
        &["tag", "lib", a.to_str().expect("path"), "red", "blue"],
    ));
    ok(&keel(
        &home,
        &["note", "lib", b.to_str().expect("path"), "mine", "--entry"],
    ));

    // Content scope: b has the same bytes as a, so it shows a's tags.
    let show: serde_json::Value = serde_json::from_str(&ok(&keel(
        &home,
        &["show", "lib", b.to_str().expect("path"), "--json"],
    )))
    .expect("show --json is JSON");
    assert_eq!(
        show["content_metadata"]["tags"],
        serde_json::json!(["blue", "red"])
    );
    assert_eq!(show["entry_metadata"]["notes"], "mine");

    let status: serde_json::Value =
        serde_json::from_str(&ok(&keel(&home, &["status", "lib", "--json"]))).expect("JSON");
    for key in [
        "library_id",
        "device_id",
        "counts",
        "journal",
        "applied_lsn",
        "digest",
    ] {
        assert!(status.get(key).is_some(), "status lacks {key}");
    }
    for key in [
        "devices",
        "locations",
        "entries",
        "content_identities",
        "user_metadata",
        "tags",
        "user_metadata_tags",
    ] {
        assert!(status["counts"].get(key).is_some(), "counts lacks {key}");
    }
    assert_eq!(status["counts"]["entries"], 4);
    assert_eq!(status["counts"]["content_identities"], 2);
    assert!(status["journal"]["local_changes"].as_u64().is_some());
    assert!(status["journal"]["log_len"].as_u64().is_some());

    let digest = ok(&keel(&home, &["digest", "lib"]));
    let digest = digest.trim_end();
    assert_eq!(digest.len(), 64);
    assert!(digest.chars().all(|c| c.is_ascii_hexdigit()));
    assert_eq!(status["digest"], digest);

    ok(&keel(&home, &["rebuild", "lib"]));
    assert_eq!(ok(&keel(&home, &["digest", "lib"])).trim_end(), digest);
    ok(&keel(&home, &["verify", "lib"]));
    let ls = ok(&keel(&home, &["ls", "lib", tree_s]));
    assert!(ls.contains("a.txt") && ls.contains("sub"), "{ls}");
}

#[test]
fn failures_are_one_error_line_and_non_zero() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join("home");
    fails_with_one_error_line(&keel(&home, &["status", "nope"]));
    ok(&keel(&home, &["init", "lib"]));
    fails_with_one_error_line(&keel(&home, &["init", "lib"]));
    fails_with_one_error_line(&keel(
        &home,
        &["tag", "lib", "/definitely/not/indexed", "x"],
    ));
    let wrong = Command::new(env!("CARGO_BIN_EXE_keel"))
        .arg("--home")
        .arg(&home)
        .args(["status", "lib"])
        .env("KEEL_PASSWORD", "wrong")
        .output()
        .expect("runs");
    fails_with_one_error_line(&wrong);
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("wrong password"));
    fails_with_one_error_line(&keel(&home, &["init", "../escape"]));
}
