//! Real QUIC on 127.0.0.1: pinned devices talk, strangers are refused, a hostile frame costs only
//! its own connection.

use std::net::SocketAddr;
use std::time::Duration;

use keel_schema::Lsn;
use keel_transport::{
    DeviceMessage, Endpoint, Identity, Pins, ReplicationMessage, TransportError,
    SNAPSHOT_CHUNK_MAX, UDP_PAYLOAD_MAX,
};

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

/// `b` connected to `a` (each pinning the other): `b`'s side of the connection, then `a`'s.
async fn connected(
    a: &Identity,
    b: &Identity,
    pins_a: Pins,
    pins_b: Pins,
) -> (keel_transport::Connection, keel_transport::Connection) {
    let server = Endpoint::bind(a, localhost(), pins_a).expect("binds");
    let client = Endpoint::bind(b, localhost(), pins_b).expect("binds");
    let addr = server.local_addr().expect("addr");
    let accept = tokio::spawn({
        let server = server.clone();
        async move { server.accept().await }
    });
    let to_a = client.connect(addr).await.expect("connects");
    let to_b = accept
        .await
        .expect("task")
        .expect("incoming")
        .expect("authenticated");
    (to_a, to_b)
}

#[tokio::test]
async fn pinned_devices_exchange_messages() {
    let (a, b, pins_a, pins_b) = pair();
    let (to_a, to_b) = connected(&a, &b, pins_a, pins_b).await;
    assert_eq!(to_a.peer(), a.device());
    assert_eq!(to_b.peer(), b.device());

    let ask = DeviceMessage::SyncPullRequest {
        from: Lsn(7),
        limit: 100,
    };
    to_a.send(&ask).await.expect("sends");
    assert_eq!(to_b.recv().await.expect("receives"), ask);
    let answer = DeviceMessage::Replication(ReplicationMessage::Push {
        changes: Vec::new(),
    });
    to_b.send(&answer).await.expect("sends");
    assert_eq!(to_a.recv().await.expect("receives"), answer);
}

#[tokio::test]
async fn on_loopback_mtu_discovery_raises_the_packet_size_above_ethernets() {
    let (a, b, pins_a, pins_b) = pair();
    let (to_a, to_b) = connected(&a, &b, pins_a, pins_b).await;
    // Bulk data gives discovery its probes; it searches in a few round trips. (Each message is
    // sent whole before it is read, so it must fit in the stream's flow-control window.)
    let chunk = DeviceMessage::SnapshotChunk {
        offset: 0,
        data: serde_bytes::ByteBuf::from(vec![7u8; SNAPSHOT_CHUNK_MAX / 16]),
        raw_len: 0,
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while to_a.path_mtu() <= 1452 && tokio::time::Instant::now() < deadline {
        to_a.send(&chunk).await.expect("sends");
        assert_eq!(to_b.recv().await.expect("receives"), chunk);
    }
    let mtu = to_a.path_mtu();
    assert!(
        mtu > 1452 && mtu <= UDP_PAYLOAD_MAX,
        "path MTU {mtu} after bulk sends"
    );
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

/// Runs the pairing protocol over a real QUIC connection. Returns the joiner's outcome.
async fn pair_over_quic(
    inviter_endpoint: &Endpoint,
    joiner_endpoint: &Endpoint,
    inviter: std::sync::Arc<tokio::sync::Mutex<keel_transport::Inviter>>,
    code: keel_transport::PairingCode,
) -> Result<keel_transport::Joined, keel_transport::PairingError> {
    use keel_transport::{Binding, Joiner, PairingError};
    let addr = inviter_endpoint.local_addr().expect("addr");
    let server = inviter_endpoint.clone();
    let inviter_task = tokio::spawn(async move {
        let connection = server.accept().await.expect("incoming").expect("handshake");
        assert!(!connection.pinned(), "the joiner is not pinned yet");
        let binding = Binding {
            exporter: connection.exporter().expect("exporter"),
            inviter: server.device(),
            joiner: connection.peer(),
        };
        let DeviceMessage::Pairing(start) = connection.recv().await.expect("start") else {
            panic!("expected a pairing message");
        };
        let mut invitation = inviter.lock().await;
        let (mut run, reply) =
            match invitation.on_start(&start, binding, std::net::IpAddr::from([127, 0, 0, 1]), 1) {
                Ok(ok) => ok,
                Err(rejection) => {
                    connection
                        .send(&DeviceMessage::Pairing(rejection))
                        .await
                        .expect("send");
                    return;
                }
            };
        connection
            .send(&DeviceMessage::Pairing(reply))
            .await
            .expect("reply");
        let DeviceMessage::Pairing(confirm) = connection.recv().await.expect("confirm") else {
            panic!("expected a pairing message");
        };
        let (verdict, outcome) = invitation.on_confirm(&mut run, &confirm, 1, |_, _| true, 2);
        if let Ok(device) = outcome {
            server.pins().pin(device);
        }
        connection
            .send(&DeviceMessage::Pairing(verdict))
            .await
            .expect("verdict");
        // Keep the connection up until the joiner has read the verdict.
        let _ = connection.recv().await;
    });
    let connection = joiner_endpoint
        .connect_to_pair(addr)
        .await
        .expect("connects to pair");
    let binding = Binding {
        exporter: connection.exporter().expect("exporter"),
        inviter: connection.peer(),
        joiner: joiner_endpoint.device(),
    };
    let (mut joiner, start) = Joiner::start(&code, binding, "phone");
    connection
        .send(&DeviceMessage::Pairing(start))
        .await
        .expect("start");
    let outcome = async {
        let DeviceMessage::Pairing(reply) = connection
            .recv()
            .await
            .map_err(|e| PairingError::Protocol(e.to_string()))?
        else {
            return Err(PairingError::Protocol("not pairing".into()));
        };
        let confirm = joiner.on_reply(&reply)?;
        connection
            .send(&DeviceMessage::Pairing(confirm))
            .await
            .map_err(|e| PairingError::Protocol(e.to_string()))?;
        let DeviceMessage::Pairing(verdict) = connection
            .recv()
            .await
            .map_err(|e| PairingError::Protocol(e.to_string()))?
        else {
            return Err(PairingError::Protocol("not pairing".into()));
        };
        joiner.on_verdict(&verdict)
    }
    .await;
    connection.close("done");
    let _ = inviter_task.await;
    outcome
}

#[tokio::test]
async fn devices_pair_over_quic_with_a_code_then_talk_pinned() {
    use keel_schema::LibraryId;
    use keel_transport::{Inviter, PairingCode, PairingError};
    let inviter_id = Identity::generate("desk").expect("identity");
    let joiner_id = Identity::generate("phone").expect("identity");
    let inviter_pins = Pins::new();
    let joiner_pins = Pins::new();
    let inviter_endpoint =
        Endpoint::bind(&inviter_id, localhost(), inviter_pins.clone()).expect("binds");
    let joiner_endpoint =
        Endpoint::bind(&joiner_id, localhost(), joiner_pins.clone()).expect("binds");

    // Before an invitation is open, the stranger cannot even connect.
    let addr = inviter_endpoint.local_addr().expect("addr");
    let refusing = tokio::spawn({
        let server = inviter_endpoint.clone();
        async move { server.accept().await.map(|r| r.map(|_| ())) }
    });
    let early = tokio::time::timeout(Duration::from_secs(5), async {
        let c = joiner_endpoint.connect_to_pair(addr).await?;
        c.recv().await.map(|_| ())
    })
    .await
    .expect("does not hang");
    assert!(early.is_err());
    let refused = tokio::time::timeout(Duration::from_secs(5), refusing)
        .await
        .expect("does not hang")
        .expect("task");
    assert!(matches!(refused, Some(Err(_))));

    inviter_pins.set_pairing_open(true);
    let invitation = Inviter::new(LibraryId(uuid::Uuid::nil()), "family", vec![9u8; 32], 16, 0);
    let code = invitation.code().clone();
    let invitation = std::sync::Arc::new(tokio::sync::Mutex::new(invitation));

    let wrong = PairingCode::parse(if code.as_str() == "0000-0001" {
        "0000-0002"
    } else {
        "0000-0001"
    })
    .expect("valid");
    let failed = pair_over_quic(
        &inviter_endpoint,
        &joiner_endpoint,
        invitation.clone(),
        wrong,
    )
    .await;
    assert_eq!(failed, Err(PairingError::WrongCode));

    let joined = pair_over_quic(&inviter_endpoint, &joiner_endpoint, invitation, code)
        .await
        .expect("pairs");
    assert_eq!(joined.key, vec![9u8; 32]);
    assert_eq!(joined.inviter, inviter_id.device());
    inviter_pins.set_pairing_open(false);
    joiner_pins.pin(joined.inviter);
    assert!(inviter_pins.contains(&joiner_id.device()));

    // Now they talk as pinned peers.
    let accept = tokio::spawn({
        let server = inviter_endpoint.clone();
        async move { server.accept().await }
    });
    let connection = joiner_endpoint.connect(addr).await.expect("pinned connect");
    let back = accept.await.expect("task").expect("incoming").expect("ok");
    assert!(back.pinned() && connection.pinned());
    let hello = DeviceMessage::SyncPullRequest {
        from: Lsn(1),
        limit: 10,
    };
    connection.send(&hello).await.expect("sends");
    assert_eq!(back.recv().await.expect("receives"), hello);
}

/// Issue 24: while an invitation is open on `a`, `a` dialing an address (a `--peer` or a
/// remembered one) must still refuse a server that is not pinned: only the inviting side admits
/// unpinned peers, and only to pair.
#[tokio::test]
async fn an_outgoing_connection_refuses_an_unpinned_server_while_an_invitation_is_open() {
    let a = Identity::generate("a").expect("identity");
    let stranger = Identity::generate("stranger").expect("identity");
    let pins_a = Pins::new();
    pins_a.set_pairing_open(true);
    let pins_s = Pins::new();
    pins_s.pin(a.device());
    let server = Endpoint::bind(&stranger, localhost(), pins_s).expect("binds");
    let addr = server.local_addr().expect("addr");
    let accept = tokio::spawn({
        let server = server.clone();
        async move { server.accept().await }
    });
    let client = Endpoint::bind(&a, localhost(), pins_a).expect("binds");
    let outcome = tokio::time::timeout(Duration::from_secs(5), client.connect(addr)).await;
    assert!(
        matches!(outcome, Ok(Err(_))),
        "connected to a stranger while an invitation was open"
    );
    accept.abort();
}

/// Issue 24: a device unpinned after a first connection (revoked) cannot come back through TLS
/// session resumption, in either direction.
#[tokio::test]
async fn a_device_unpinned_after_a_session_cannot_resume_one() {
    let (a, b, pins_a, pins_b) = pair();
    let server = Endpoint::bind(&a, localhost(), pins_a.clone()).expect("binds");
    let client = Endpoint::bind(&b, localhost(), pins_b.clone()).expect("binds");
    let addr = server.local_addr().expect("addr");
    let serving = tokio::spawn({
        let server = server.clone();
        async move {
            let mut pinned = Vec::new();
            while let Some(incoming) = server.accept().await {
                pinned.push(incoming.map(|c| c.pinned()).unwrap_or(false));
                if pinned.len() == 2 {
                    break;
                }
            }
            pinned
        }
    });
    let first = client.connect(addr).await.expect("first connection");
    // Let the session tickets arrive before closing.
    tokio::time::sleep(Duration::from_millis(300)).await;
    first.close("done");
    // b stops trusting a: its next dial to a must fail.
    pins_b.unpin(a.device());
    let again = tokio::time::timeout(Duration::from_secs(5), client.connect(addr)).await;
    assert!(
        matches!(again, Ok(Err(_))),
        "reconnected to an unpinned server"
    );
    // a stops trusting b: a connection from b must not come in as pinned.
    pins_b.pin(a.device());
    pins_a.unpin(b.device());
    if let Ok(Ok(conn)) = tokio::time::timeout(Duration::from_secs(5), client.connect(addr)).await {
        conn.close("done");
    }
    let seen = tokio::time::timeout(Duration::from_secs(5), serving).await;
    if let Ok(Ok(pinned)) = seen {
        assert!(
            !pinned.get(1).copied().unwrap_or(false),
            "an unpinned client came in as pinned: {pinned:?}"
        );
    }
}

/// A client whose handshake stalls: its certificate check sleeps, so the server waits for the
/// rest of its handshake.
mod stalling {
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::time::Duration;

    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
    use rustls::{DigitallySignedStruct, SignatureScheme};

    #[derive(Debug)]
    struct Sleepy(Duration);

    impl ServerCertVerifier for Sleepy {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            std::thread::sleep(self.0);
            Ok(ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Ok(HandshakeSignatureValid::assertion())
        }

        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Ok(HandshakeSignatureValid::assertion())
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            rustls::crypto::ring::default_provider()
                .signature_verification_algorithms
                .supported_schemes()
        }
    }

    /// Starts a handshake with `server` on a thread of its own that stalls for `stall`.
    pub(super) fn start(server: SocketAddr, stall: Duration) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let certified =
                    rcgen::generate_simple_self_signed(vec!["stall.keel".into()]).expect("cert");
                let key = PrivatePkcs8KeyDer::from(certified.key_pair.serialize_der());
                let provider = Arc::new(rustls::crypto::ring::default_provider());
                let mut tls = rustls::ClientConfig::builder_with_provider(provider)
                    .with_protocol_versions(&[&rustls::version::TLS13])
                    .expect("tls 1.3")
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(Sleepy(stall)))
                    .with_client_auth_cert(vec![certified.cert.der().clone()], key.into())
                    .expect("client auth");
                tls.alpn_protocols = vec![keel_transport::ALPN.to_vec()];
                let config = quinn::ClientConfig::new(Arc::new(
                    quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("quic"),
                ));
                let mut endpoint =
                    quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0))).expect("binds");
                endpoint.set_default_client_config(config);
                if let Ok(connecting) = endpoint.connect(server, "keel") {
                    let _ = tokio::time::timeout(stall * 2, connecting).await;
                }
            });
        })
    }
}

/// Issue 24: handshakes that stall must not block every incoming connection (the accept loop
/// awaited each handshake in turn): a pinned device gets in within a second while ten strangers
/// stall.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_device_connects_while_strangers_stall_their_handshakes() {
    let (a, b, pins_a, pins_b) = pair();
    let server = Endpoint::bind(&a, localhost(), pins_a).expect("binds");
    let addr = server.local_addr().expect("addr");
    let stalls: Vec<_> = (0..10)
        .map(|_| stalling::start(addr, Duration::from_secs(5)))
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let accepting = tokio::spawn({
        let server = server.clone();
        async move {
            loop {
                match server.accept().await {
                    Some(Ok(conn)) if conn.pinned() => return Some(conn.peer()),
                    Some(_) => continue,
                    None => return None,
                }
            }
        }
    });
    let client = Endpoint::bind(&b, localhost(), pins_b).expect("binds");
    let started = std::time::Instant::now();
    let _to_a = client.connect(addr).await.expect("connects");
    let accepted = tokio::time::timeout(Duration::from_secs(10), accepting)
        .await
        .expect("accepted in time")
        .expect("task");
    assert_eq!(accepted, Some(b.device()));
    // The strangers stall for 5 s: a connect that waited for them took that long.
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the pinned device waited {:?}",
        started.elapsed()
    );
    drop(stalls);
}
