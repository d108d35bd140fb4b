//! The example runs as a host app would run it, and does what its output says: B joins, hears
//! A's album on its event bus, and reads it back. Part of `cargo test --workspace`, so the
//! example is built with the tests' dependencies instead of on its own.

use std::process::Command;

#[test]
fn the_example_syncs_an_album_between_two_devices() {
    let out = Command::new(env!("CARGO_BIN_EXE_keel-example"))
        .output()
        .expect("the example starts");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the example failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "A invites with code ",
        "is in sync",
        "B heard ",
        "B has the album \"Holidays\"",
    ] {
        assert!(stdout.contains(line), "no {line:?} in:\n{stdout}");
    }
}
