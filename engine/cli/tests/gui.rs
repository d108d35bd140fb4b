//! Issue 30: the web inspector of `keel serve --gui` and its `/metrics`: the token, Prometheus'
//! format, and (with Chromium) an operator's session in a real browser.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, keel, ok, Served};

/// A `keel serve lib --gui` child, with the inspector's address and token read off its output.
struct Inspected {
    _served: Served,
    base: String,
    token: String,
}

fn serve_gui(home: &Path, args: &[&str]) -> Inspected {
    let mut child = Command::new(env!("CARGO_BIN_EXE_keel"))
        .arg("--home")
        .arg(home)
        .args(["serve", "lib", "--gui", "127.0.0.1:0"])
        .args(args)
        .env("KEEL_MDNS_LOOPBACK", "1")
        .env("KEEL_PASSWORD", "pw")
        .env("KEEL_INSECURE_FAST_KDF", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("serve starts");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let served = Served(child);
    let url = loop {
        let line = lines
            .next()
            .expect("serve printed the inspector's address")
            .expect("reads");
        if let Some(rest) = line.strip_prefix("inspector on ") {
            break rest.split_whitespace().next().expect("a URL").to_string();
        }
    };
    // Keep the pipe drained, so that the node never blocks on its output.
    std::thread::spawn(move || lines.for_each(drop));
    let (base, token) = url.split_once("/#token=").expect("a URL with its token");
    let sock = home.join("libraries/lib.keel/control.sock");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "no control socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    Inspected {
        _served: served,
        base: base.to_string(),
        token: token.to_string(),
    }
}

/// One HTTP/1.1 request; the status and body.
fn http(base: &str, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let addr = base.trim_start_matches("http://");
    let mut stream = TcpStream::connect(addr).expect("connects");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .expect("sends");
    let mut reply = String::new();
    stream.read_to_string(&mut reply).expect("reads");
    let (head, body) = reply.split_once("\r\n\r\n").expect("a head");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status");
    (status, body.to_string())
}

/// The states of the live stream at `base`, as they come.
fn live_states(base: &str, token: &str) -> impl Iterator<Item = serde_json::Value> {
    let addr = base.trim_start_matches("http://");
    let mut stream = TcpStream::connect(addr).expect("connects");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    write!(
        stream,
        "GET /events HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\r\n"
    )
    .expect("sends");
    let mut lines = BufReader::new(stream).lines();
    let status = lines.next().expect("a status line").expect("reads");
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    lines
        .map_while(Result::ok)
        .filter_map(|l| serde_json::from_str(l.strip_prefix("data: ")?).ok())
}

/// A library "lib" in `home` with a few indexed files (its index is a finished job).
fn library_with_files(dir: &Path, home: &Path) {
    let tree = dir.join("tree");
    std::fs::create_dir_all(&tree).expect("tree");
    for i in 0..5 {
        std::fs::write(tree.join(format!("f{i}.txt")), format!("{i}")).expect("file");
    }
    ok(&keel(home, &["init", "lib"]));
    ok(&keel(home, &["index", "lib", tree.to_str().expect("path")]));
}

/// One sample of a Prometheus exposition: name, labels, value.
type Sample = (String, Vec<(String, String)>, f64);

/// The samples of a Prometheus text exposition, checked line by line: every sample's name has
/// a `# TYPE` before it, labels are `key="value"`, values are numbers.
fn parse_metrics(text: &str) -> Vec<Sample> {
    let mut typed = std::collections::HashSet::new();
    let mut samples = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut words = rest.split_whitespace();
            let name = words.next().expect("a name");
            let kind = words.next().expect("a type");
            assert!(["gauge", "counter"].contains(&kind), "{line}");
            typed.insert(name.to_string());
            continue;
        }
        if line.starts_with("# HELP ") || line.is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("a value");
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("a number: {line}"));
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (name, rest.strip_suffix('}').expect("closed labels")),
            None => (series, ""),
        };
        assert!(typed.contains(name), "no # TYPE before {name}");
        let labels = labels
            .split(',')
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (k, v) = l.split_once('=').expect("key=value");
                let v = v.strip_prefix('"').and_then(|v| v.strip_suffix('"'));
                (k.to_string(), v.expect("a quoted value").to_string())
            })
            .collect();
        samples.push((name.to_string(), labels, value));
    }
    samples
}

#[test]
fn the_inspector_needs_its_token_and_its_metrics_parse() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join("a");
    library_with_files(dir.path(), &home);
    let gui = serve_gui(&home, &["--listen", &free_port()]);
    let token_file = home.join("libraries/lib.keel/gui.token");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&token_file)
            .expect("the token file")
            .permissions();
        assert_eq!(mode.mode() & 0o777, 0o600, "the token is its owner's alone");
        let stored = std::fs::read_to_string(&token_file).expect("reads");
        assert_eq!(stored, gui.token);
    }

    let (status, page) = http(&gui.base, "GET", "/", None);
    assert_eq!(status, 200);
    assert!(page.contains("Keel inspector"), "{page}");
    assert_eq!(http(&gui.base, "GET", "/app.js", None).0, 200);

    // Nothing of the library, and no change, without the token.
    let jobs: serde_json::Value =
        serde_json::from_str(&ok(&keel(&home, &["jobs", "lib", "--json"]))).expect("json");
    let job = jobs[0]["id"].as_str().expect("the index's job").to_string();
    for (method, path) in [
        ("GET", "/api/state".to_string()),
        ("GET", "/events".to_string()),
        ("POST", format!("/api/jobs/{job}/cancel")),
    ] {
        assert_eq!(http(&gui.base, method, &path, None).0, 401, "{path}");
        let wrong = "0".repeat(gui.token.len());
        assert_eq!(
            http(&gui.base, method, &path, Some(&wrong)).0,
            401,
            "{path}"
        );
    }
    let after: serde_json::Value =
        serde_json::from_str(&ok(&keel(&home, &["jobs", "lib", "--json"]))).expect("json");
    assert_eq!(after, jobs, "a refused request changed nothing");

    // With it: the state of a device alone, as `status --json` and `jobs --json` say.
    let (status, body) = http(&gui.base, "GET", "/api/state", Some(&gui.token));
    assert_eq!(status, 200, "{body}");
    let state: serde_json::Value = serde_json::from_str(&body).expect("json");
    let cli: serde_json::Value =
        serde_json::from_str(&ok(&keel(&home, &["status", "lib", "--json"]))).expect("json");
    assert_eq!(state["node"]["role"], cli["role"]);
    assert_eq!(state["applied_lsn"], cli["applied_lsn"]);
    assert_eq!(state["jobs"][0]["id"], job.as_str());
    assert_eq!(state["locations"].as_array().map(Vec::len), Some(1));
    let (status, _) = http(&gui.base, "POST", "/api/jobs/x/explode", Some(&gui.token));
    assert_eq!(status, 404);

    let (status, text) = http(&gui.base, "GET", "/metrics", None);
    assert_eq!(status, 200);
    let samples = parse_metrics(&text);
    let value = |name: &str| {
        samples
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, labels, v)| {
                assert_eq!(labels[0], ("library".to_string(), "lib".to_string()));
                *v
            })
            .unwrap_or_else(|| panic!("no {name} in {text}"))
    };
    let log_len = state["node"]["log_len"].as_f64().expect("a log length");
    assert_eq!(value("keel_log_length"), log_len);
    assert_eq!(value("keel_applied_position"), log_len);
    assert!(value("keel_commits_total") >= 5.0);
    assert_eq!(value("keel_epoch"), 1.0);
    assert_eq!(value("keel_leading"), 1.0);
    for name in [
        "keel_elections_total",
        "keel_offline_pending",
        "keel_wire_sent_bytes_total",
        "keel_wire_received_bytes_total",
        "keel_storage_failed",
    ] {
        value(name);
    }

    // The live stream: a state at once, then another when the library changes (a tag).
    let mut events = live_states(&gui.base, &gui.token);
    let first = events.next().expect("a first state");
    assert_eq!(first["library"], "lib");
    assert_eq!(first["applied_lsn"], state["applied_lsn"]);
    let file = dir.path().join("tree/f0.txt");
    ok(&keel(
        &home,
        &["tag", "lib", file.to_str().expect("path"), "streamed"],
    ));
    let tagged = events
        .find(|s| s["tags"].as_array().is_some_and(|t| !t.is_empty()))
        .expect("a state with the tag");
    assert_eq!(tagged["tags"][0]["name"], "streamed", "{tagged}");
    assert_eq!(tagged["tags_total"], 1);

    // The inspector's threads (the stream's among them) yield to the node's.
    let nice = threads_nice(gui._served.0.id());
    let of = |prefix: &str| -> Vec<i64> {
        nice.iter()
            .filter(|(name, _)| name.starts_with(prefix))
            .map(|(_, n)| *n)
            .collect()
    };
    let inspector = of("keel-gui");
    assert!(inspector.len() >= 2, "{nice:?}");
    assert!(inspector.iter().all(|n| *n == 19), "{nice:?}");
    assert!(of("keel-core").iter().all(|n| *n == 0), "{nice:?}");
    assert!(!of("keel-core").is_empty(), "{nice:?}");
}

/// Each thread of process `pid`: its name and nice value (Linux' `/proc`).
fn threads_nice(pid: u32) -> Vec<(String, i64)> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("the process' threads");
    tasks
        .filter_map(|task| {
            let stat = std::fs::read_to_string(task.ok()?.path().join("stat")).ok()?;
            let (name, rest) = stat.split_once(" (")?.1.rsplit_once(") ")?;
            // After the name: state is field 3 and nice field 19 of proc(5).
            let nice = rest.split_whitespace().nth(16)?.parse().ok()?;
            Some((name.to_string(), nice))
        })
        .collect()
}

/// The node's role, leader and epoch as `keel status --json` gives them.
/// Starts `keel pair join` from `home` to the node of `inviter_home` (listening at `addr`)
/// through a proxy that holds the link a little way into the initial sync (the connection
/// stays up, its data stops), and waits until the inviter shows the device joining: the join
/// stays in progress (its steps wait up to 30 s) until the hold ends.
fn join_held_mid_way(
    inviter_home: &Path,
    home: &Path,
    addr: &str,
) -> (std::process::Child, keel_tests::proxy::Proxy) {
    use keel_tests::proxy::{LinkFaults, Proxy};
    let clean = LinkFaults {
        drop: 0,
        duplicate: 0,
        reorder: 0,
        corrupt: 0,
    };
    let proxy = Proxy::start(addr.parse().expect("an address"), clean, 7).expect("proxy");
    // Pairing takes a few kilobytes; the library's projection file is several megabytes.
    proxy.hold_after(256 * 1024);
    let invite = ok(&keel(inviter_home, &["pair", "invite", "lib", "--yes"]));
    let code = invite.lines().next().expect("a code").to_string();
    let mut join = Command::new(env!("CARGO_BIN_EXE_keel"))
        .arg("--home")
        .arg(home)
        .args([
            "pair",
            "join",
            "--addr",
            &proxy.addr.to_string(),
            "--code",
            &code,
        ])
        .env("KEEL_PASSWORD", "pw")
        .env("KEEL_INSECURE_FAST_KDF", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("join runs");
    let deadline = Instant::now() + Duration::from_secs(60);
    let shown = loop {
        let joining = proxy.holding()
            && status_of(inviter_home)["joining"]
                .as_array()
                .is_some_and(|j| j.iter().any(|j| j["file_bytes"].as_u64() > Some(0)));
        if joining || Instant::now() >= deadline {
            break joining;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    if !shown {
        let _ = join.kill();
        let _ = join.wait();
        panic!("the join never showed");
    }
    (join, proxy)
}

/// The device id of the library `lib` of `home` (no node running there).
fn joiner_device(home: &Path) -> String {
    status_of(home)["device_id"]
        .as_str()
        .expect("an id")
        .to_string()
}

fn status_of(home: &Path) -> serde_json::Value {
    serde_json::from_str(&ok(&keel(home, &["status", "lib", "--json"]))).expect("json")
}

/// Where Playwright was installed (`.ci/run`: `npm install --prefix target/playwright
/// playwright-core@1`), if it was.
fn playwright() -> Option<std::path::PathBuf> {
    let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/playwright");
    target
        .join("node_modules/playwright-core")
        .is_dir()
        .then_some(target)
}

/// Issue 30: an operator's session in headless Chromium, driven by Playwright. Three devices
/// serve one library; the browser opens the leader's inspector, sees the three devices and
/// which leads, keeps one side of an open conflict, pauses a running index, finds a file's
/// tag in the library's browser, and opens a follower's inspector and that of a library alone
/// on its device. The results are then read
/// through the command line (`status`, `conflicts`, `jobs` with `--json`).
#[test]
#[ignore = "needs Chromium (/usr/bin/chromium) and playwright-core: .ci/run installs both and runs it"]
fn an_operator_resolves_a_conflict_and_pauses_a_job_in_a_real_browser() {
    let modules = playwright().expect("playwright-core in target/playwright (see .ci/run)");
    let dir = tempfile::tempdir().expect("tempdir");
    let homes: Vec<std::path::PathBuf> =
        ["a", "b", "c"].iter().map(|n| dir.path().join(n)).collect();
    library_with_files(dir.path(), &homes[0]);
    let file = dir.path().join("tree/f1.txt");
    ok(&keel(
        &homes[0],
        &["tag", "lib", file.to_str().expect("path"), "holiday"],
    ));
    let addrs: Vec<String> = (0..3).map(|_| free_port()).collect();
    let a = serve_gui(&homes[0], &["--listen", &addrs[0]]);
    let mut others = Vec::new();
    for (home, addr) in homes[1..].iter().zip(&addrs[1..]) {
        let invite = ok(&keel(&homes[0], &["pair", "invite", "lib", "--yes"]));
        let code = invite.lines().next().expect("a code").to_string();
        ok(&keel(
            home,
            &["pair", "join", "--addr", &addrs[0], "--code", &code],
        ));
        others.push(common::serve(home, addr, &[&addrs[0]]));
        common::wait_same_digest(&homes[0], home);
    }
    // b renames the tag while stopped, a while b is away: a conflict once b is back.
    let b_home = &homes[1];
    drop(others.remove(0));
    let _ = std::fs::remove_file(b_home.join("libraries/lib.keel/control.sock"));
    ok(&keel(
        &homes[0],
        &["tags", "lib", "rename", "holiday", "summer"],
    ));
    ok(&keel(
        b_home,
        &["tags", "lib", "rename", "holiday", "beach"],
    ));
    let b = serve_gui(b_home, &["--listen", &addrs[1], "--peer", &addrs[0]]);
    common::wait_same_digest(&homes[0], b_home);
    let b_id = status_of(b_home)["device_id"]
        .as_str()
        .expect("an id")
        .to_string();

    // A big folder, indexed through a's node while the browser watches: a job to pause. Big
    // enough to outlast the page's click: 20,000 files were indexed in under a second here,
    // and the job sometimes ended before the pause came ("job ... is not running").
    let big = dir.path().join("big");
    std::fs::create_dir_all(&big).expect("big");
    for i in 0..100_000 {
        std::fs::write(big.join(format!("file{i:06}.txt")), format!("{i}")).expect("file");
    }
    // A library alone on a device of its own.
    let lone_home = dir.path().join("d");
    ok(&keel(&lone_home, &["init", "lib"]));
    let lone = serve_gui(&lone_home, &["--listen", &free_port(), "--no-discovery"]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/gui/operator.cjs");
    // Kept under the target folder, to be looked at.
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("inspector.png");
    let _ = std::fs::remove_file(&shot);
    let mut browser = Command::new("node")
        .arg(&script)
        .env("NODE_PATH", modules.join("node_modules"))
        .env("KEEL_GUI_URL", format!("{}/#token={}", a.base, a.token))
        .env("KEEL_KEEP_DEVICE", &b_id)
        .env(
            "KEEL_FOLLOWER_URL",
            format!("{}/#token={}", b.base, b.token),
        )
        .env(
            "KEEL_ALONE_URL",
            format!("{}/#token={}", lone.base, lone.token),
        )
        .env("KEEL_SCREENSHOT", &shot)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("node runs the browser script");
    // The index starts once the browser waits for a job (it says so on a line of its own).
    let mut said = BufReader::new(browser.stdout.take().expect("stdout")).lines();
    let mut report = Vec::new();
    for line in said.by_ref() {
        let line = line.expect("reads");
        let ready = line == "waiting for a job";
        report.push(line);
        if ready {
            break;
        }
    }
    let index = Command::new(env!("CARGO_BIN_EXE_keel"))
        .arg("--home")
        .arg(&homes[0])
        .args(["index", "lib", big.to_str().expect("path")])
        .env("KEEL_PASSWORD", "pw")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("index runs");
    // Then a device joins a through a link held cut mid-join, once the browser waits for it.
    for line in said.by_ref() {
        let line = line.expect("reads");
        let ready = line == "waiting for a join";
        report.push(line);
        if ready {
            break;
        }
    }
    let joiner_home = dir.path().join("e");
    let (join, proxy) = join_held_mid_way(&homes[0], &joiner_home, &addrs[0]);
    report.extend(said.map_while(Result::ok));
    let out = browser.wait_with_output().expect("the browser script ends");
    // The join is held where the cut left it: what the page drew is what the node says.
    let held = status_of(&homes[0])["joining"][0].clone();
    proxy.cut(false);
    let joined = join.wait_with_output().expect("the join ends");
    assert!(
        joined.status.success(),
        "the held join failed: {}",
        String::from_utf8_lossy(&joined.stderr)
    );
    assert!(
        out.status.success(),
        "browser script failed: {report:?}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: serde_json::Value =
        serde_json::from_str(report.last().map_or("", String::as_str)).expect("a JSON report");

    // What the browser saw and did, through the command line.
    let status = status_of(&homes[0]);
    assert_eq!(seen["devices"], 3, "{seen}");
    assert_eq!(seen["followerRole"], "follower", "{seen}");
    assert_eq!(seen["aloneDevices"], 1, "{seen}");
    let joiner_id = joiner_device(&joiner_home);
    assert_eq!(seen["joining"].as_str(), Some(&joiner_id[..8]), "{seen}");
    assert!(
        seen["joinText"]
            .as_str()
            .is_some_and(|t| t.starts_with("initial sync: file")),
        "{seen}"
    );
    let sent = held["file_sent"].as_f64().expect("bytes sent")
        / held["file_bytes"].as_f64().expect("bytes");
    let bar = seen["joinBar"].as_f64().expect("a bar");
    assert!((bar - sent).abs() < 0.03, "bar {bar}, sent {sent}: {held}");
    assert_eq!(
        seen["leader"].as_str(),
        status["leader"].as_str().map(|l| &l[..8]),
        "{seen}"
    );
    let jobs: serde_json::Value =
        serde_json::from_str(&ok(&keel(&homes[0], &["jobs", "lib", "--json"]))).expect("json");
    let paused = jobs
        .as_array()
        .expect("jobs")
        .iter()
        .find(|j| j["id"] == seen["paused"])
        .unwrap_or_else(|| panic!("no job {} in {jobs}", seen["paused"]));
    assert_eq!(paused["state"], "paused", "{paused}");
    // The bar drawn for it is as long as its progress (the page's own figures).
    let (bar, share) = (
        seen["pausedBar"].as_f64().expect("a bar"),
        seen["pausedShare"].as_f64().expect("a share"),
    );
    assert!((bar - share).abs() < 0.03, "bar {bar}, progress {share}");
    ok(&keel(
        &homes[0],
        &[
            "jobs",
            "lib",
            "cancel",
            paused["id"].as_str().expect("an id"),
        ],
    ));
    let mut index = index;
    let _ = index.wait();
    for home in &homes {
        common::wait_same_digest(&homes[0], home);
        let conflict: serde_json::Value =
            serde_json::from_str(ok(&keel(home, &["conflicts", "lib", "--json"])).trim())
                .expect("one conflict");
        assert!(conflict["resolved_by"].is_string(), "{conflict}");
        let tags = ok(&keel(home, &["tags", "lib"]));
        assert!(tags.starts_with("beach"), "b's value was kept: {tags}");
    }
    assert!(shot.exists(), "the browser took no screenshot");
}
