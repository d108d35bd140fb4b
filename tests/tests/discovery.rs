//! Issue 24: devices find each other on the local network (mDNS/DNS-SD on loopback, each test on
//! its own mDNS port), and `pair join` finds an inviting device with no address.

use std::time::{Duration, Instant};

use keel_engine::{Home, Library};
use keel_node::{Node, NodeError};
use keel_tests::cluster::{converge, founder_with, join_on_lan, lan_options, lan_port};
use keel_tests::{tag, PASSWORD};

const CONVERGE: Duration = Duration::from_secs(30);

fn restart_on_lan(home: &Home, name: &str, port: u16) -> Node {
    let lib = Library::open(home, name, PASSWORD).expect("opens");
    Node::start(lib, lan_options(port)).expect("restarts")
}

/// `pair join` with no address finds the inviting node by mDNS; then both devices restart on new
/// ports (as a laptop that changed networks) with no `--peer` and no address either of them knew:
/// they find each other again through their announcements and converge.
#[test]
fn paired_devices_find_each_other_on_the_lan_with_no_address_given() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = lan_port();
    let (home_a, a) = founder_with(dir.path(), "a", "pics", lan_options(port)).expect("a starts");
    let invite = a.invite(true).expect("invites");
    let home_b = Home::new(dir.path().join("b"));
    let name = join_on_lan(&home_b, port, invite.code.as_str()).expect("joins with no address");
    assert_eq!(name, "pics");
    let b = restart_on_lan(&home_b, &name, port);
    a.library()
        .transact(|tx| {
            tx.upsert(&tag("before the move"));
            Ok(())
        })
        .expect("commits");
    converge(&[&a, &b], CONVERGE).expect("a and b converge");

    // Both move: new ports, so every remembered address is stale.
    let (old_a, old_b) = (a.local_addr(), b.local_addr());
    a.stop().expect("a stops");
    b.stop().expect("b stops");
    let a = restart_on_lan(&home_a, "pics", port);
    let b = restart_on_lan(&home_b, "pics", port);
    assert_ne!(a.local_addr(), old_a);
    assert_ne!(b.local_addr(), old_b);
    let moved = tag("after the move");
    a.library()
        .transact(|tx| {
            tx.upsert(&moved);
            Ok(())
        })
        .expect("commits");
    converge(&[&a, &b], CONVERGE).expect("a and b find each other and converge");
    assert_eq!(
        b.library()
            .get::<keel_engine::Tag>(moved.uuid)
            .expect("reads"),
        Some(moved)
    );
}

/// What a stranger on the LAN sees: instance and host names that are the rotating tag, never the
/// library's name or id, and no TXT properties.
#[test]
fn a_strangers_browser_sees_only_opaque_rotating_names() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = lan_port();
    let (_home, a) =
        founder_with(dir.path(), "a", "holiday-pictures", lan_options(port)).expect("a starts");
    let stranger = mdns_sd::ServiceDaemon::new_with_port(port).expect("mdns");
    stranger
        .disable_interface(mdns_sd::IfKind::All)
        .expect("interfaces");
    stranger
        .enable_interface(mdns_sd::IfKind::LoopbackV4)
        .expect("loopback");
    let events = stranger.browse(keel_node::LAN_SERVICE).expect("browses");
    let deadline = Instant::now() + Duration::from_secs(10);
    let found = loop {
        let left = deadline
            .checked_duration_since(Instant::now())
            .expect("a's announcement is seen within 10 s");
        if let Ok(mdns_sd::ServiceEvent::ServiceResolved(found)) = events.recv_timeout(left) {
            break found;
        }
    };
    let _ = stranger.shutdown();
    let library = a.library().id();
    let window = keel_engine::now_ms() / (10 * 60 * 1000);
    let expected = keel_node::lan_tag(library, a.library().device_id(), window);
    let instance = found
        .fullname
        .strip_suffix(&format!(".{}", keel_node::LAN_SERVICE))
        .expect("an instance of the service");
    assert_eq!(instance, expected);
    assert_eq!(found.host, format!("{expected}.local."));
    assert_eq!(found.port, a.local_addr().port());
    let seen = format!("{}{}{:?}", found.fullname, found.host, found.txt_properties);
    assert!(!seen.contains("holiday"), "{seen}");
    assert!(!seen.contains(&library.0.simple().to_string()), "{seen}");
    assert!(!seen.contains(&library.0.to_string()), "{seen}");
    assert!(
        found.txt_properties.is_empty(),
        "{:?}",
        found.txt_properties
    );
}

/// With two devices inviting on the same LAN, `pair join` with no address refuses to guess (the
/// code would be tried against the wrong one) and says to give `--addr`; once one invitation
/// ends, its announcement is withdrawn and the join finds the other.
#[test]
fn join_with_no_address_refuses_to_guess_between_two_inviting_devices() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = lan_port();
    let (_h1, one) = founder_with(dir.path(), "one", "first", lan_options(port)).expect("starts");
    let (_h2, two) = founder_with(dir.path(), "two", "second", lan_options(port)).expect("starts");
    let _first = one.invite(true).expect("invites");
    let second = two.invite(true).expect("invites");
    let home = Home::new(dir.path().join("joiner"));
    match join_on_lan(&home, port, "0000-0000") {
        Err(NodeError::Discovery(why)) => assert!(why.contains("--addr"), "{why}"),
        other => panic!("expected a refusal to guess, got {other:?}"),
    }
    // `one`'s invitation ends (it is stopped); the join finds `two`, the only one left.
    one.stop().expect("stops");
    let name = join_on_lan(&home, port, second.code.as_str()).expect("joins the only inviter");
    assert_eq!(name, "second");
}

/// With nobody inviting, `pair join` with no address ends with a typed error that says what to do.
#[test]
fn join_with_no_address_and_nobody_inviting_says_to_give_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = lan_port();
    // A node runs (announcing itself) but has no invitation open.
    let (_home, _a) = founder_with(dir.path(), "a", "pics", lan_options(port)).expect("starts");
    let home = Home::new(dir.path().join("joiner"));
    match join_on_lan(&home, port, "1234-5678") {
        Err(NodeError::Discovery(why)) => assert!(why.contains("--addr"), "{why}"),
        other => panic!("expected no inviting device, got {other:?}"),
    }
}
