//! What the sync figures (P4, P5, P6) share: a leader with a library, joining it.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::Result;
use keel_engine::{CreateOptions, Home, KdfParams, Library};
use keel_node::{join, JoinOptions, Node, NodeOptions};
use keel_schema::Change;

use crate::workload::LibraryWorkload;

/// The password of every benchmark library.
pub(crate) const PASSWORD: &str = "bench";

pub(crate) fn fast() -> CreateOptions {
    CreateOptions {
        kdf: KdfParams::INSECURE_FAST,
    }
}

pub(crate) fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// A library of `files` files (an Entry and a ContentIdentity each) led by a node.
pub(crate) fn leader_with(dir: &Path, files: usize) -> Result<Node> {
    let lib = generate_library(&dir.join("leader"), files)?;
    Ok(Node::start(lib, node_options(Vec::new()))?)
}

/// A library of `files` generated files (an entry and its content each) in home `home`.
pub(crate) fn generate_library(home: &Path, files: usize) -> Result<Library> {
    let home = Home::new(home);
    let lib = Library::create(&home, "bench", PASSWORD, fast())?;
    // This device's own files, which its library signs as it commits them.
    let mut workload = LibraryWorkload::new(lib.id().0, lib.device_id(), 4);
    let header = workload.header();
    commit_all(&lib, header)?;
    let mut left = files;
    while left > 0 {
        let take = left.min(10_000);
        let chunk = workload.files(take);
        left -= take;
        commit_all(&lib, chunk)?;
    }
    lib.flush()?;
    Ok(lib)
}

/// Compacts `leader`'s whole log once every device acknowledged it (waiting up to `wait`).
pub(crate) fn compact_whole_log(
    leader: &Node,
    wait: std::time::Duration,
) -> Result<keel_engine::CompactReport> {
    let deadline = std::time::Instant::now() + wait;
    while leader.status().compactable < leader.status().log_len {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the log was never acknowledged whole"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let compacted = leader.compact()?;
    anyhow::ensure!(compacted.base > 0, "the leader did not compact");
    Ok(compacted)
}

/// A benchmark node's options: loopback peers `peers`, no LAN discovery, no watcher, and no
/// compaction behind the benchmark's back (it times one thing).
pub(crate) fn node_options(peers: Vec<std::net::SocketAddr>) -> NodeOptions {
    NodeOptions {
        peers,
        discovery: None,
        watch: None,
        compact_after: None,
        ..NodeOptions::default()
    }
}

/// A second device joined to `leader` (by snapshot) in home `dir`, started as a follower
/// that neither discovers nor watches.
pub(crate) fn follower_of(leader: &Node, dir: &Path) -> Result<Node> {
    let invite = leader.invite(true)?;
    let home = Home::new(dir);
    let name = join_blocking(&home, leader.local_addr(), invite.code.as_str(), true)?;
    Ok(Node::start(
        Library::open(&home, &name, PASSWORD)?,
        node_options(vec![leader.local_addr()]),
    )?)
}

pub(crate) fn commit_all(lib: &Library, changes: Vec<Change>) -> Result<()> {
    lib.transact(|tx| {
        for c in changes {
            tx.push(c);
        }
        Ok(())
    })?;
    Ok(())
}

/// Pairs `home` with the node at `addr` and joins its library (by snapshot unless
/// `snapshot` is false: then by replication alone, for comparison).
pub(crate) fn join_blocking(
    home: &Home,
    addr: SocketAddr,
    code: &str,
    snapshot: bool,
) -> Result<String> {
    Ok(join_counting(home, addr, code, snapshot)?.0)
}

/// Like [`join_blocking`]; also returns the bytes the initial sync received (log entries and
/// projection file, as `JoinProgress` counts them).
pub(crate) fn join_counting(
    home: &Home,
    addr: SocketAddr,
    code: &str,
    snapshot: bool,
) -> Result<(String, u64)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (progress, mut heard) = tokio::sync::mpsc::unbounded_channel();
    let name = rt.block_on(join(
        home,
        JoinOptions {
            addr: Some(addr),
            discovery: keel_node::Discovery::default(),
            bind: None,
            code: code.into(),
            device_name: Some("bench follower".into()),
            password: PASSWORD.into(),
            create: fast(),
            snapshot,
            progress: Some(progress),
            slow_link: keel_node::SlowLink::default(),
        },
    ))?;
    let mut bytes = 0;
    while let Ok(p) = heard.try_recv() {
        bytes = bytes.max(p.bytes);
    }
    Ok((name, bytes))
}
