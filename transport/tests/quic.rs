//! Real QUIC on 127.0.0.1: pinned devices talk, strangers are refused, a hostile frame costs only
//! its own connection.

use std::net::SocketAddr;
use std::time::Duration;

use keel_schema::Lsn;
use keel_transport::{DeviceMessage, Endpoint, Identity, Pins, TransportError};

fn localhost() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

fn pair() -> (Identity, Identity, Pins, Pins) {
    let a = Identity::generate("a").expect("identity");
    let b = Identity::generate("b").expect("identity");
    let pins_a = Pins::new();
    let pins_b = Pins::new();
    pins_a.pin(b.device());
    pins_b.pin(a.device());
    (a, b, pins_a, pins_b)
}

#[tokio::test]
async fn pinned_devices_exchange_messages() {
    let (a, b, pins_a, pins_b) = pair();
    let server = Endpoint::bind(&a, localhost(), pins_a).expect("binds");
    let client = Endpoint::bind(&b, localhost(), pins_b).expect("binds");
    let addr = server.local_addr().expect("addr");
    let accept = tokio::spawn({
        let server = server.clone();
        async move { server.accept().await }
    });
    let to_a = client.connect(addr).await.expect("connects");
    assert_eq!(to_a.peer(), a.device());
    let to_b = accept
        .await
        .expect("task")
        .expect("incoming")
        .expect("authenticated");
    assert_eq!(to_b.peer(), b.device());

    let ask = DeviceMessage::SyncPullRequest {
        from: Lsn(7),
        limit: 100,
    };
    to_a.send(&ask).await.expect("sends");
    assert_eq!(to_b.recv().await.expect("receives"), ask);
    let answer = DeviceMessage::SyncChange {
        changes: Vec::new(),
    };
    to_b.send(&answer).await.expect("sends");
    assert_eq!(to_a.recv().await.expect("receives"), answer);
}

#[tokio::test]
async fn an_unpinned_device_is_refused() {
    let (a, _b, pins_a, _) = pair();
    let stranger = Identity::generate("stranger").expect("identity");
    let server = Endpoint::bind(&a, localhost(), pins_a).expect("binds");
    // The stranger even pins the server: the server still refuses it.
    let stranger_pins = Pins::new();
    stranger_pins.pin(a.device());
    let client = Endpoint::bind(&stranger, localhost(), stranger_pins).expect("binds");
    let addr = server.local_addr().expect("addr");
    let server_side = tokio::spawn({
        let server = server.clone();
        async move { server.accept().await }
    });
    let outcome = tokio::time::timeout(Duration::from_secs(5), async {
        let connection = client.connect(addr).await?;
        // With TLS 1.3 the client may finish first; the refusal then closes the connection.
        connection.recv().await.map(|_| ())
    })
    .await
    .expect("does not hang");
    assert!(outcome.is_err(), "a stranger got through");
    let accepted = tokio::time::timeout(Duration::from_secs(5), server_side)
        .await
        .expect("does not hang")
        .expect("task");
    assert!(
        matches!(accepted, Some(Err(_))),
        "the server accepted a stranger"
    );

    // And the client refuses a server it has not pinned.
    let (c, d, pins_c, _) = pair();
    let lonely = Endpoint::bind(&d, localhost(), Pins::new()).expect("binds");
    let server_c = Endpoint::bind(&c, localhost(), pins_c).expect("binds");
    let addr_c = server_c.local_addr().expect("addr");
    tokio::spawn(async move { server_c.accept().await.map(|r| r.map(|_| ())) });
    let refused = tokio::time::timeout(Duration::from_secs(5), lonely.connect(addr_c))
        .await
        .expect("does not hang");
    assert!(matches!(refused, Err(TransportError::Tls(_))));
}

#[tokio::test]
async fn an_oversized_frame_is_refused_and_the_endpoint_keeps_serving() {
    let (a, b, pins_a, pins_b) = pair();
    let server = Endpoint::bind(&a, localhost(), pins_a).expect("binds");
    let client = Endpoint::bind(&b, localhost(), pins_b).expect("binds");
    let addr = server.local_addr().expect("addr");
    let accept = tokio::spawn({
        let server = server.clone();
        async move { server.accept().await }
    });
    let to_a = client.connect(addr).await.expect("connects");
    let to_b = accept.await.expect("task").expect("incoming").expect("ok");
    to_a.send_raw(&u32::MAX.to_be_bytes())
        .await
        .expect("raw send");
    assert!(matches!(
        to_b.recv().await,
        Err(TransportError::FrameTooLarge(_))
    ));
    to_a.send_raw(&[0, 0, 0, 3, 0xff, 0xff, 0xff])
        .await
        .expect("raw send");
    assert!(to_b.recv().await.is_err(), "garbage body refused");
    to_b.close("bad frames");

    // The server endpoint still accepts a fresh connection.
    let accept = tokio::spawn({
        let server = server.clone();
        async move { server.accept().await }
    });
    let again = client.connect(addr).await.expect("reconnects");
    let back = accept.await.expect("task").expect("incoming").expect("ok");
    let ping = DeviceMessage::SyncPullRequest {
        from: Lsn(1),
        limit: 1,
    };
    again.send(&ping).await.expect("sends");
    assert_eq!(back.recv().await.expect("receives"), ping);
}
