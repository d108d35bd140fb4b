//! Two nodes over a hostile link (issue 29): a UDP proxy between them drops, duplicates,
//! reorders, delays and corrupts QUIC datagrams and cuts the link now and then, while both
//! commit. They converge to the same digest with every change on both.

use std::sync::atomic::Ordering;
use std::time::Duration;

use keel_engine::{Library, Tag};
use keel_tests::cluster;
use keel_tests::proxy::{LinkFaults, Proxy};

fn tag_count(lib: &Library) -> usize {
    lib.read(|p| p.query().select::<Tag, _>("1 = 1", []))
        .expect("reads")
        .len()
}

fn commit_tags(lib: &Library, prefix: &str, n: usize) {
    lib.transact(|tx| {
        for i in 0..n {
            tx.upsert(&keel_tests::tag(&format!("{prefix} {i}")));
        }
        Ok(())
    })
    .expect("commits");
}

#[test]
fn nodes_converge_over_a_link_that_drops_duplicates_reorders_corrupts_and_cuts() {
    let seed: u64 = std::env::var("KEEL_LINK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed);
    let dir = tempfile::tempdir().expect("tempdir");
    let (_ha, a) = cluster::founder(dir.path(), "a", "lib").expect("founds");
    let (hb, b) = cluster::joiner(dir.path(), "b", &a).expect("joins");
    b.stop().expect("stops");
    let faults = LinkFaults {
        drop: 50,
        duplicate: 30,
        reorder: 50,
        corrupt: 20,
    };
    let proxy = Proxy::start(a.local_addr(), faults, seed).expect("proxy");
    // b knows a only by the proxy: its record of where a listens (from the pairing) would let
    // it dial a directly, and a would then learn b's own address from that connection.
    let devices = hb.library_dir("lib").join("devices.toml");
    let text = std::fs::read_to_string(&devices).expect("b's devices file");
    let (real, proxied) = (a.local_addr().to_string(), proxy.addr.to_string());
    assert!(text.contains(&real), "b recorded where a listens: {text}");
    std::fs::write(&devices, text.replace(&real, &proxied)).expect("rewrites");
    let lib = Library::open(&hb, "lib", keel_tests::PASSWORD).expect("opens");
    let b = keel_node::Node::start(lib, cluster::options(vec![proxy.addr])).expect("starts");
    // At least 8 rounds, and more (up to 40) until every fault has hit a datagram: how many
    // datagrams a round takes varies with how QUIC packs them.
    let every_fault_seen = |p: &Proxy| {
        let st = p.stats();
        [&st.dropped, &st.duplicated, &st.reordered, &st.corrupted]
            .iter()
            .all(|n| n.load(Ordering::Relaxed) > 0)
    };
    let mut rounds = 0;
    while rounds < 8 || (rounds < 40 && !every_fault_seen(&proxy)) {
        let round = rounds;
        rounds += 1;
        commit_tags(a.library(), &format!("a {round}"), 150);
        commit_tags(b.library(), &format!("b {round}"), 150);
        if round % 3 == 1 {
            proxy.cut(true);
            std::thread::sleep(Duration::from_millis(400));
            proxy.cut(false);
        } else {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let digest = cluster::converge(&[&a, &b], Duration::from_secs(90)).unwrap_or_else(|e| {
        panic!("no convergence over the bad link (seed {seed}): {e}");
    });
    assert_eq!(tag_count(a.library()), rounds * 300, "every tag on a");
    assert_eq!(tag_count(b.library()), rounds * 300, "every tag on b");
    assert_eq!(b.library().digest().expect("digest"), digest);
    let stats = proxy.stats();
    let figures = [
        ("forwarded", stats.forwarded.load(Ordering::Relaxed)),
        ("dropped", stats.dropped.load(Ordering::Relaxed)),
        ("duplicated", stats.duplicated.load(Ordering::Relaxed)),
        ("reordered", stats.reordered.load(Ordering::Relaxed)),
        ("corrupted", stats.corrupted.load(Ordering::Relaxed)),
        ("lost to cuts", stats.cut.load(Ordering::Relaxed)),
    ];
    eprintln!("bad link (seed {seed}): {figures:?}");
    // Every byte of b's sync sessions crossed the proxy (none went to a directly): without
    // the address rewritten above, b moves more than the proxy sees.
    let (sent, received) = b.wire_bytes();
    let through = stats.received_bytes.load(Ordering::Relaxed);
    eprintln!("b's sessions: {sent} bytes sent, {received} received; through the proxy: {through}");
    assert!(sent > 0 && received > 0, "b's sessions moved nothing");
    assert!(
        sent + received <= through,
        "b moved {} bytes, only {through} through the proxy",
        sent + received
    );
    for (what, n) in figures {
        assert!(n > 0, "nothing {what}: the link was not as bad as asked");
    }
}
