//! Helpers shared by the `keel` command's tests: run the binary, serve a library, wait for
//! devices to agree.
#![allow(dead_code)] // each test binary uses some of them

use std::path::Path;
use std::process::{Command, Output};

pub(crate) fn keel(home: &Path, args: &[&str]) -> Output {
    keel_in(Path::new("."), home, args)
}

/// `keel` run from folder `cwd`.
pub(crate) fn keel_in(cwd: &Path, home: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_keel"))
        .current_dir(cwd)
        .arg("--home")
        .arg(home)
        .args(args)
        .env("KEEL_PASSWORD", "pw")
        .env("KEEL_INSECURE_FAST_KDF", "1")
        // Nodes in these tests find each other on loopback only.
        .env("KEEL_MDNS_LOOPBACK", "1")
        .output()
        .expect("keel runs")
}

pub(crate) fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "keel failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).expect("utf-8 stdout")
}

/// A `keel serve` child, killed when dropped.
pub(crate) struct Served(pub(crate) std::process::Child);

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn serve(home: &Path, listen: &str, peers: &[&str]) -> Served {
    let mut args = vec!["--listen", listen];
    for p in peers {
        args.extend(["--peer", p]);
    }
    serve_with(home, &args)
}

/// Starts `keel serve lib` with `args` and waits for its control socket.
pub(crate) fn serve_with(home: &Path, args: &[&str]) -> Served {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keel"));
    cmd.arg("--home")
        .arg(home)
        .args(["serve", "lib"])
        .args(args)
        .env("KEEL_MDNS_LOOPBACK", "1")
        .env("KEEL_PASSWORD", "pw")
        .env("KEEL_INSECURE_FAST_KDF", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let child = Served(cmd.spawn().expect("serve starts"));
    let sock = home.join("libraries/lib.keel/control.sock");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !sock.exists() {
        assert!(std::time::Instant::now() < deadline, "no control socket");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child
}

pub(crate) fn free_port() -> String {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("binds");
    socket.local_addr().expect("addr").to_string()
}

pub(crate) fn join_and_serve(home_a: &Path, addr_a: &str, home_b: &Path) -> Served {
    let code = ok(&keel(home_a, &["pair", "invite", "lib", "--yes"]));
    let code = code.lines().next().expect("a code").to_string();
    ok(&keel(
        home_b,
        &["pair", "join", "--addr", addr_a, "--code", &code],
    ));
    let served = serve(home_b, &free_port(), &[addr_a]);
    wait_same_digest(home_a, home_b);
    served
}

pub(crate) fn wait_same_digest(home_a: &Path, home_b: &Path) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let state = |home: &Path| {
            let status: serde_json::Value =
                serde_json::from_str(&ok(&keel(home, &["status", "lib", "--json"]))).expect("json");
            let offline = status["journal"]["offline"].as_u64();
            (
                status["digest"].clone(),
                status["applied_lsn"].clone(),
                offline,
            )
        };
        let (a, b) = (state(home_a), state(home_b));
        if a == b && a.2 == Some(0) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "no sync: {a:?} {b:?}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
