//! Helpers shared by Keel's cross-crate tests: libraries with cheap key derivation, and reading a
//! library's journal from outside.

use std::path::Path;

use keel_engine::{CreateOptions, EngineError, Home, KdfParams, Library};

/// The password every test library uses.
pub const PASSWORD: &str = "test password";

/// Whether the full test tier runs (`KEEL_FULL=1`): more simulator seeds and more kills. The
/// README's test command runs every test at the default size; the full tier enlarges them.
pub fn full_tier() -> bool {
    std::env::var("KEEL_FULL").is_ok_and(|v| v == "1")
}

/// Creates library `name` in a home under `root`, with cheap key derivation.
pub fn create_library(root: &Path, name: &str) -> Result<(Home, Library), EngineError> {
    create_in(Home::new(root.join("home")), name)
}

/// Creates library `name` in `home`, with cheap key derivation.
pub fn create_in(home: Home, name: &str) -> Result<(Home, Library), EngineError> {
    let lib = Library::create(
        &home,
        name,
        PASSWORD,
        CreateOptions {
            kdf: KdfParams::INSECURE_FAST,
        },
    )?;
    Ok((home, lib))
}

/// The library's events, forwarded to a channel that can be waited on with a timeout.
pub fn events_of(lib: &Library) -> crossbeam_channel::Receiver<keel_engine::Event> {
    let mut bus = lib.subscribe();
    let (tx, rx) = crossbeam_channel::unbounded();
    std::thread::spawn(move || {
        while let Ok(event) = bus.blocking_recv() {
            if tx.send(event).is_err() {
                return;
            }
        }
    });
    rx
}

/// A new tag named `name` with a random uuid.
pub fn tag(name: &str) -> keel_engine::Tag {
    keel_engine::Tag {
        uuid: uuid::Uuid::new_v4(),
        name: name.into(),
        color: None,
        created_ms: 1,
    }
}

/// The journal of the closed library `name` in `home`, opened with the library's keys, for a
/// test to change what a library's own code would not; and the library's device.
pub fn journal_of(home: &Home, name: &str) -> (keel_journal::Journal, keel_schema::DeviceId) {
    journal_opened_with(home, name, PASSWORD)
}

/// [`journal_of`] for a library whose password is `password`.
pub fn journal_opened_with(
    home: &Home,
    name: &str,
    password: &str,
) -> (keel_journal::Journal, keel_schema::DeviceId) {
    let lib = Library::open(home, name, password).expect("opens");
    let (dir, library, device) = (lib.dir().to_path_buf(), lib.id(), lib.device_id());
    let mut ring = Vec::new();
    for key in lib.shared_keys() {
        ring.extend_from_slice(&key.key_id.to_be_bytes());
        ring.extend_from_slice(&key.generation.to_be_bytes());
        ring.extend_from_slice(&key.bytes);
    }
    let key = keel_journal::LibraryKey::from_bytes(&ring).expect("keys");
    lib.close().expect("closes");
    let journal = keel_journal::Journal::open(
        &dir.join(keel_engine::JOURNAL_FILE),
        library,
        &key,
        device,
        keel_journal::JournalOptions::default(),
    )
    .expect("journal opens");
    (journal, device)
}

pub mod proxy;
pub mod shm;

/// What a crash-child run to its end printed (see `src/bin/crash_child.rs`): its last
/// `progress DONE TOTAL` and its peak resident memory (`peak_rss_kb N`), in MiB.
#[derive(Debug, Clone, Copy)]
pub struct ChildReport {
    /// The last progress: done.
    pub done: usize,
    /// The last progress: total.
    pub total: usize,
    /// Its peak resident memory, MiB.
    pub peak_mib: u64,
}

impl ChildReport {
    /// Reads the report from a child's standard output; panics (a test helper) if a part is
    /// missing.
    pub fn from_stdout(stdout: &[u8]) -> Self {
        let stdout = String::from_utf8_lossy(stdout);
        let (done, total) = stdout
            .lines()
            .filter_map(|l| l.strip_prefix("progress "))
            .filter_map(|l| l.split_once(' '))
            .filter_map(|(d, t)| Some((d.parse::<usize>().ok()?, t.parse::<usize>().ok()?)))
            .next_back()
            .expect("progress was reported");
        let kb: u64 = stdout
            .lines()
            .find_map(|l| l.strip_prefix("peak_rss_kb "))
            .and_then(|n| n.parse().ok())
            .expect("the child reported its peak memory");
        Self {
            done,
            total,
            peak_mib: kb / 1024,
        }
    }
}

/// Rewrites the log page of the journal file at `path` that holds `lsn` with `edit`, which gets
/// the page's bytes and the byte range of that record within them (as damage at rest would
/// leave it, through redb). Returns the page's first position and record count.
pub fn edit_log_page(
    path: &Path,
    lsn: u64,
    edit: impl FnOnce(&mut Vec<u8>, std::ops::Range<usize>),
) -> (u64, u64) {
    use redb::ReadableTable;
    let db = redb::Database::open(path).expect("redb opens");
    let pages: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("log_pages");
    let txn = db.begin_write().expect("write");
    let found;
    {
        let mut table = txn.open_table(pages).expect("log table");
        let (first, mut bytes): (u64, Vec<u8>) = {
            let (k, v) = table
                .range(..=lsn)
                .expect("range")
                .next_back()
                .expect("a page holds it")
                .expect("reads");
            (k.value(), v.value().to_vec())
        };
        let page = keel_journal::LogPage::parse(&bytes).expect("a sound page");
        let record = page
            .records()
            .nth((lsn - first) as usize)
            .expect("the page holds the position");
        let at = record.as_ptr() as usize - bytes.as_ptr() as usize;
        let range = at..at + record.len();
        found = (first, page.len());
        edit(&mut bytes, range);
        table.insert(first, bytes.as_slice()).expect("insert");
    }
    txn.commit().expect("commit");
    found
}

/// Hostile peers for tests: messages written by hand and floods from unpaired devices.
pub mod hostile {
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::time::Duration;

    use keel_transport::{Endpoint, Identity, Pins, FRAME_HEADER_LEN, MESSAGE_VERSION};

    /// A framed `DeviceMessage::Replication(Push)` of `n` empty byte strings, written as
    /// MessagePack by hand (an enum is a one-entry map, a struct an array of its fields): small
    /// on the wire, huge once decoded into a vector.
    pub fn amplified_push(n: u32) -> Vec<u8> {
        let mut body = vec![MESSAGE_VERSION, 0x81, 0xab];
        body.extend_from_slice(b"Replication");
        body.extend_from_slice(&[0x81, 0xa4]);
        body.extend_from_slice(b"Push");
        body.extend_from_slice(&[0x91, 0xdd]);
        body.extend_from_slice(&n.to_be_bytes());
        for _ in 0..n {
            body.extend_from_slice(&[0xc4, 0x00]);
        }
        let mut framed = (body.len() as u32).to_be_bytes().to_vec();
        framed.extend_from_slice(&body);
        framed
    }

    /// A paired device (`identity`, of `library`, which trusts `node`) floods the node at
    /// `addr` over sync sessions for `secs` seconds: `connections` connections, each saying
    /// Hello and then sending, on 16 streams at once, 1.2 MB frames of junk, amplified
    /// `Push`es and pushes of changes as large as the limits allow that do not open. Returns
    /// how many sessions the node accepted.
    pub async fn paired_flood(
        addr: SocketAddr,
        (identity, library, node): (Identity, keel_schema::LibraryId, keel_schema::DeviceId),
        connections: usize,
        secs: u64,
    ) -> usize {
        use keel_transport::DeviceMessage;
        let pins = Pins::new();
        pins.pin(node);
        let localhost = SocketAddr::from(([127, 0, 0, 1], 0));
        let Ok(endpoint) = Endpoint::bind(&identity, localhost, pins) else {
            return 0;
        };
        let mut big = 1_200_000u32.to_be_bytes().to_vec();
        big.resize(FRAME_HEADER_LEN + 1_200_000, 7);
        let junk = DeviceMessage::Replication(keel_replication::ReplicationMessage::Push {
            changes: (0..64)
                .map(|i| serde_bytes::ByteBuf::from(vec![i as u8; 60_000]))
                .collect(),
        });
        let Ok(junk) = junk.encode() else {
            return 0;
        };
        let frames = Arc::new([big, amplified_push(8_000_000), junk]);
        let hello = DeviceMessage::Hello {
            device: identity.device(),
            library,
            epoch: keel_schema::Epoch::default(),
            log_end: keel_schema::Lsn(0),
            positions: Vec::new(),
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        let (endpoint, hello) = (Arc::new(endpoint), Arc::new(hello));
        let sessions = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut all = tokio::task::JoinSet::new();
        for _ in 0..connections {
            let (endpoint, hello, frames, sessions) = (
                endpoint.clone(),
                hello.clone(),
                frames.clone(),
                sessions.clone(),
            );
            // A session the node closes (on a frame over the limits) is opened again.
            all.spawn(async move {
                while tokio::time::Instant::now() < deadline {
                    let Ok(conn) = endpoint.connect(addr).await else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    if conn.send(&hello).await.is_err() || conn.recv().await.is_err() {
                        continue;
                    }
                    sessions.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let conn = Arc::new(conn);
                    let mut sends = tokio::task::JoinSet::new();
                    for stream in 0..16 {
                        let (conn, frames) = (conn.clone(), frames.clone());
                        sends.spawn(async move {
                            let mut n = stream;
                            while tokio::time::Instant::now() < deadline {
                                let frame = &frames[n % frames.len()];
                                n += 1;
                                let sent = tokio::time::timeout(
                                    Duration::from_secs(1),
                                    conn.send_raw(frame),
                                )
                                .await;
                                if matches!(sent, Ok(Err(_))) {
                                    return;
                                }
                            }
                        });
                    }
                    while sends.join_next().await.is_some() {}
                }
            });
        }
        while all.join_next().await.is_some() {}
        sessions.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// `strangers` unpaired devices connect to `addr` to pair (an invitation must be open); each
    /// opens `streams` streams of 1.2 MB of junk at once, sends a 16 MiB amplified `Push`, and
    /// gives up after 3 s.
    pub async fn flood(addr: SocketAddr, strangers: usize, streams: usize) {
        let mut big = 1_200_000u32.to_be_bytes().to_vec();
        big.resize(FRAME_HEADER_LEN + 1_200_000, 7);
        let (big, push) = (Arc::new(big), Arc::new(amplified_push(8_000_000)));
        let mut all = tokio::task::JoinSet::new();
        for i in 0..strangers {
            let (big, push) = (big.clone(), push.clone());
            all.spawn(async move {
                let Ok(identity) = Identity::generate(&format!("stranger {i}")) else {
                    return;
                };
                let localhost = SocketAddr::from(([127, 0, 0, 1], 0));
                let Ok(endpoint) = Endpoint::bind(&identity, localhost, Pins::new()) else {
                    return;
                };
                let Ok(conn) = endpoint.connect_to_pair(addr).await else {
                    return;
                };
                let conn = Arc::new(conn);
                let mut sends = tokio::task::JoinSet::new();
                for _ in 0..streams {
                    let (conn, big) = (conn.clone(), big.clone());
                    sends.spawn(async move {
                        let _ = conn.send_raw(&big).await;
                    });
                }
                let _ = conn.send_raw(&push).await;
                let _ = tokio::time::timeout(Duration::from_secs(3), async {
                    while sends.join_next().await.is_some() {}
                })
                .await;
            });
        }
        while all.join_next().await.is_some() {}
    }
}

/// Multi-device helpers: nodes on 127.0.0.1 with their own homes under one folder.
pub mod cluster {
    use std::net::SocketAddr;
    use std::path::Path;
    use std::time::{Duration, Instant};

    use keel_engine::{CreateOptions, Home, KdfParams, Library};
    use keel_node::{join, JoinOptions, Node, NodeError, NodeOptions};

    use super::PASSWORD;

    /// Options for test nodes: loopback, any port.
    pub fn options(peers: Vec<SocketAddr>) -> NodeOptions {
        NodeOptions {
            peers,
            // Test nodes do not look for each other on the LAN unless a test says so, nor
            // watch their locations.
            discovery: None,
            watch: None,
            // A leader's unpacked snapshot goes soon after a backfill (tests that look at the
            // keeping set their own).
            snapshot_keep: std::time::Duration::from_millis(100),
            // Nor read their logs for damage unless a test says so.
            scrub_every: None,
            ..NodeOptions::default()
        }
    }

    /// Creates library `name` in home `root/<device>` and starts it as a node (the founder, so
    /// the leader of epoch 1).
    pub fn founder(root: &Path, device: &str, name: &str) -> Result<(Home, Node), NodeError> {
        founder_with(root, device, name, options(Vec::new()))
    }

    /// Like [`founder`], with its own node options.
    pub fn founder_with(
        root: &Path,
        device: &str,
        name: &str,
        options: NodeOptions,
    ) -> Result<(Home, Node), NodeError> {
        let (home, lib) = super::create_in(Home::new(root.join(device)), name)?;
        Ok((home, Node::start(lib, options)?))
    }

    /// Like [`founder`], with `tags` tags committed (named `bulk 0`, `bulk 1`, …).
    pub fn founder_with_tags(
        root: &Path,
        device: &str,
        name: &str,
        tags: usize,
    ) -> Result<(Home, Node), NodeError> {
        let (home, node) = founder(root, device, name)?;
        node.library().transact(|tx| {
            for i in 0..tags {
                tx.upsert(&crate::tag(&format!("bulk {i}")));
            }
            Ok(())
        })?;
        Ok((home, node))
    }

    /// Waits until `ready` holds of `node`'s status, at most 60 s; panics saying `what`
    /// otherwise, with the status.
    pub fn wait_status(node: &Node, what: &str, ready: impl Fn(&keel_node::NodeStatus) -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !ready(&node.status()) {
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {what}: {:?}",
                node.status()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Opens library `name` in `home` again and starts it as a node listening on `listen` (a
    /// device coming back on the address it had).
    pub fn restart(home: &Home, name: &str, listen: SocketAddr) -> Result<Node, NodeError> {
        restart_with(
            home,
            name,
            NodeOptions {
                listen,
                ..options(Vec::new())
            },
        )
    }

    /// Opens library `name` of `home` again and starts it as a node with `options`.
    pub fn restart_with(home: &Home, name: &str, options: NodeOptions) -> Result<Node, NodeError> {
        Node::start(Library::open(home, name, PASSWORD)?, options)
    }

    /// Pairs a new device (home `root/<device>`) with `inviter` using a code, then opens the
    /// joined library and starts it as a node connected to the inviter.
    pub fn joiner(root: &Path, device: &str, inviter: &Node) -> Result<(Home, Node), NodeError> {
        let home = Home::new(root.join(device));
        let name = pair(&home, inviter, inviter.local_addr())?;
        let lib = Library::open(&home, &name, PASSWORD)?;
        let node = Node::start(lib, options(vec![inviter.local_addr()]))?;
        Ok((home, node))
    }

    /// [`joiner`], the join's file copy left for a backfill by `slow_link`'s rule.
    pub fn joiner_over(
        root: &Path,
        device: &str,
        inviter: &Node,
        slow_link: keel_node::SlowLink,
    ) -> Result<(Home, Node), NodeError> {
        let home = Home::new(root.join(device));
        let invite = inviter.invite(true)?;
        let joining = JoinOptions {
            addr: Some(inviter.local_addr()),
            slow_link,
            ..join_options(invite.code.as_str(), Some(device.to_string()), true)
        };
        let name = run_join(&home, joining)?;
        let lib = Library::open(&home, &name, PASSWORD)?;
        let node = Node::start(lib, options(vec![inviter.local_addr()]))?;
        Ok((home, node))
    }

    /// Opens an auto-accepting invitation on `inviter` and joins it from `home` at `addr`. The
    /// joining device names itself after its home's folder (`b` for `root/b`).
    pub fn pair(home: &Home, inviter: &Node, addr: SocketAddr) -> Result<String, NodeError> {
        let invite = inviter.invite(true)?;
        let name = home
            .root()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned());
        join_as(home, None, addr, invite.code.as_str(), name)
    }

    /// Joins the node at `addr` with `code` from `home`.
    pub fn join_with_code(home: &Home, addr: SocketAddr, code: &str) -> Result<String, NodeError> {
        join_from(home, None, addr, code)
    }

    /// Joins the node at `addr` with `code` from `home`, pairing from local address `bind`.
    pub fn join_from(
        home: &Home,
        bind: Option<SocketAddr>,
        addr: SocketAddr,
        code: &str,
    ) -> Result<String, NodeError> {
        join_as(home, bind, addr, code, None)
    }

    /// Joins the node at `addr` with `code` from `home` under `device_name` (default: the home's
    /// device name), pairing from local address `bind`; the initial sync is by snapshot.
    pub fn join_as(
        home: &Home,
        bind: Option<SocketAddr>,
        addr: SocketAddr,
        code: &str,
        device_name: Option<String>,
    ) -> Result<String, NodeError> {
        join_with(home, bind, addr, code, device_name, true)
    }

    /// A UDP port for one test's mDNS, apart from the standard one and (very likely) from the
    /// other tests running at the same time.
    pub fn lan_port() -> u16 {
        static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let spread = (std::process::id() as u16)
            .wrapping_mul(31)
            .wrapping_add(n.wrapping_mul(7));
        20_000 + spread % 30_000
    }

    /// Options for a test node that announces itself and finds its devices on loopback, with
    /// mDNS on `port`.
    pub fn lan_options(port: u16) -> NodeOptions {
        NodeOptions {
            discovery: Some(keel_node::Discovery::loopback(port)),
            ..options(Vec::new())
        }
    }

    /// Joins with `code` from `home` with no address: the inviting device is found by mDNS on
    /// loopback, on `port`.
    pub fn join_on_lan(home: &Home, port: u16, code: &str) -> Result<String, NodeError> {
        let options = JoinOptions {
            addr: None,
            discovery: keel_node::Discovery::loopback(port),
            ..join_options(code, None, true)
        };
        run_join(home, options)
    }

    /// Like [`join_as`], with the initial sync by snapshot (`snapshot`) or left to replication.
    pub fn join_with(
        home: &Home,
        bind: Option<SocketAddr>,
        addr: SocketAddr,
        code: &str,
        device_name: Option<String>,
        snapshot: bool,
    ) -> Result<String, NodeError> {
        let options = JoinOptions {
            addr: Some(addr),
            bind,
            ..join_options(code, device_name, snapshot)
        };
        run_join(home, options)
    }

    /// A test join's options: the test password, the fast KDF, no address yet.
    fn join_options(code: &str, device_name: Option<String>, snapshot: bool) -> JoinOptions {
        JoinOptions {
            addr: None,
            discovery: keel_node::Discovery::default(),
            bind: None,
            code: code.into(),
            device_name,
            password: PASSWORD.into(),
            create: CreateOptions {
                kdf: KdfParams::INSECURE_FAST,
            },
            snapshot,
            progress: None,
            // Copy the file whatever the link: tests measure nothing.
            slow_link: keel_node::SlowLink::never(),
        }
    }

    fn run_join(home: &Home, options: JoinOptions) -> Result<String, NodeError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| NodeError::Failed(e.to_string()))?;
        rt.block_on(join(home, options))
    }

    /// Waits until every node has the same digest, nothing waits to be pushed, and all agree on
    /// the leader. Returns the digest, or a report of where each node stands.
    pub fn converge(nodes: &[&Node], timeout: Duration) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut digests = Vec::new();
            let mut report = String::new();
            for node in nodes {
                let status = node.status();
                let digest = node.library().digest().map_err(|e| e.to_string())?;
                report.push_str(&format!(
                    "{} role {} epoch {} leader {:?} log {} pending {} digest {}\n",
                    &node.library().device_id().to_hex()[..8],
                    status.role,
                    status.epoch.counter,
                    status.leader.as_deref().map(|l| &l[..8]),
                    status.log_len,
                    status.offline,
                    &digest[..12]
                ));
                digests.push((digest, status));
            }
            let same_digest = digests.windows(2).all(|w| w[0].0 == w[1].0);
            let nothing_pending = digests.iter().all(|(_, s)| s.offline == 0);
            let one_leader = digests.windows(2).all(|w| w[0].1.leader == w[1].1.leader)
                && digests[0].1.leader.is_some();
            let same_log = digests.windows(2).all(|w| w[0].1.log_len == w[1].1.log_len);
            if same_digest && nothing_pending && one_leader && same_log {
                return Ok(digests[0].0.clone());
            }
            if Instant::now() > deadline {
                return Err(report);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Runs `CHILD HOME lib ARGS…` (the `crash_child` binary) and kills it (`SIGKILL`) at the first
/// `progress DONE TOTAL` line that `stop` accepts; returns that progress. Panics if the child
/// ends first.
pub fn kill_child_at(
    child: &Path,
    home: &Home,
    args: &[&str],
    stop: impl Fn(u64, u64) -> bool,
) -> (u64, u64) {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let mode = args.first().copied().unwrap_or_default();
    let mut child = Command::new(child)
        .arg(home.root())
        .arg("lib")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("child starts");
    let stdout = child.stdout.take().expect("piped");
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("reads");
        assert_ne!(line, "done", "the {mode} ended before the kill");
        let mut numbers = line
            .strip_prefix("progress ")
            .unwrap_or_default()
            .split(' ')
            .filter_map(|n| n.parse::<u64>().ok());
        if let (Some(done), Some(total)) = (numbers.next(), numbers.next()) {
            if stop(done, total) {
                child.kill().expect("SIGKILL");
                child.wait().expect("reaped");
                return (done, total);
            }
        }
    }
    child.wait().expect("reaped");
    panic!("the {mode} ended without the progress awaited");
}
