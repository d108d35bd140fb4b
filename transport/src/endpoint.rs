//! QUIC endpoints between paired devices: mutual TLS 1.3 with pinned certificates, no 0-RTT,
//! one framed `DeviceMessage` per unidirectional or request/response bidirectional stream.

use std::net::SocketAddr;
use std::sync::Arc;

use keel_schema::DeviceId;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};

use crate::error::TransportError;
use crate::frame::{encode_frame, frame_len, FRAME_HEADER_LEN};
use crate::identity::Identity;
use crate::message::DeviceMessage;
use crate::verifier::{PinnedClientVerifier, PinnedServerVerifier, Pins};

/// ALPN protocol id of Keel's wire protocol version 1.
pub const ALPN: &[u8] = b"keel/1";

/// A QUIC endpoint that accepts and makes connections with pinned devices only (and, while an
/// invitation is open, with unpinned devices for pairing).
#[derive(Debug, Clone)]
pub struct Endpoint {
    endpoint: quinn::Endpoint,
    device: DeviceId,
    pins: Pins,
    pairing_client: quinn::ClientConfig,
    /// Connections whose handshakes finished, from the task that runs them (see
    /// [`HANDSHAKES_MAX`]).
    accepted: Arc<tokio::sync::Mutex<tokio::sync::mpsc::Receiver<Accepted>>>,
}

/// A finished incoming handshake.
type Accepted = Result<Connection, TransportError>;

/// Incoming handshakes run at once; more are refused until one finishes. A peer that stalls
/// its handshake holds one of them for [`HANDSHAKE_TIMEOUT_MS`] at most, and nobody else's.
pub const HANDSHAKES_MAX: usize = 32;
/// Longest an incoming handshake may take.
pub const HANDSHAKE_TIMEOUT_MS: u64 = 5_000;

/// A connection to an authenticated device (pinned, or unpinned during pairing: check
/// [`Connection::pinned`] before acting on anything but pairing messages).
#[derive(Debug, Clone)]
pub struct Connection {
    connection: quinn::Connection,
    peer: DeviceId,
    pinned: bool,
}

fn tls(e: impl std::fmt::Display) -> TransportError {
    TransportError::Tls(e.to_string())
}

/// A peer silent for this long is gone (a killed process sends nothing).
pub const IDLE_TIMEOUT_MS: u64 = 3_000;
/// Keep-alive interval: an idle but healthy connection never reaches the idle timeout.
pub const KEEP_ALIVE_MS: u64 = 500;

/// Largest UDP payload this endpoint accepts and MTU discovery searches up to, in bytes.
///
/// Loopback (and jumbo-frame networks) carry datagrams far larger than Ethernet's 1,452-byte
/// default, and each packet costs a header, an encryption and an acknowledgement whatever its
/// size; on an Ethernet path discovery settles at that path's MTU (quinn probes with "don't
/// fragment" and keeps what is acknowledged). The bound is what quinn's batch of 10 packets per
/// send can use: a Linux GSO send must fit in one 64 KiB UDP datagram, and larger packets
/// stalled the transfer. quinn also sizes its receive buffer by it (bound × 64 segments × 32
/// receives), so UDP's own limit would cost about 130 MB there. Figures: decision 0036.
pub const UDP_PAYLOAD_MAX: u16 = 6_000;

fn transport_config() -> Arc<quinn::TransportConfig> {
    let mut config = quinn::TransportConfig::default();
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(UDP_PAYLOAD_MAX);
    config.mtu_discovery_config(Some(mtu));
    config.keep_alive_interval(Some(std::time::Duration::from_millis(KEEP_ALIVE_MS)));
    if let Ok(idle) =
        quinn::IdleTimeout::try_from(std::time::Duration::from_millis(IDLE_TIMEOUT_MS))
    {
        config.max_idle_timeout(Some(idle));
    }
    // Keel sends one message per unidirectional stream and never opens a bidirectional one:
    // what a peer can make this side buffer is bounded by these, not by quinn's defaults
    // (about 250 MB per connection).
    config.max_concurrent_bidi_streams(0u32.into());
    config.max_concurrent_uni_streams(UNI_STREAMS_MAX.into());
    config.stream_receive_window(STREAM_WINDOW_BYTES.into());
    config.receive_window(CONNECTION_WINDOW_BYTES.into());
    Arc::new(config)
}

/// Unidirectional streams (messages) a peer may have open at once.
const UNI_STREAMS_MAX: u32 = 16;
/// Bytes a peer may send on one stream ahead of this side's reading.
const STREAM_WINDOW_BYTES: u32 = 2 << 20;
/// Bytes a peer may send on one connection ahead of this side's reading.
const CONNECTION_WINDOW_BYTES: u32 = 8 << 20;
/// Body bytes read at a time: a body's buffer grows as its bytes arrive, not when its header
/// announces them.
const BODY_CHUNK: usize = 64 << 10;

impl Endpoint {
    /// Binds `addr` (use port 0 for any) with `identity`, accepting and reaching only `pins`.
    pub fn bind(identity: &Identity, addr: SocketAddr, pins: Pins) -> Result<Self, TransportError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls)?
            .with_client_cert_verifier(Arc::new(PinnedClientVerifier {
                pins: pins.clone(),
                provider: provider.clone(),
            }))
            .with_single_cert(vec![identity.cert()], identity.key())
            .map_err(tls)?;
        server.alpn_protocols = vec![ALPN.to_vec()];
        server.max_early_data_size = 0;
        // No session resumption: a resumed handshake skips the certificate verifiers, so a
        // device unpinned (revoked) since would get back in with its ticket.
        server.send_tls13_tickets = 0;
        server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        let client_config =
            |pins: Pins, admit_unpinned: bool| -> Result<quinn::ClientConfig, TransportError> {
                let mut client = rustls::ClientConfig::builder_with_provider(provider.clone())
                    .with_protocol_versions(&[&rustls::version::TLS13])
                    .map_err(tls)?
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(PinnedServerVerifier {
                        pins,
                        admit_unpinned,
                        provider: provider.clone(),
                    }))
                    .with_client_auth_cert(vec![identity.cert()], identity.key())
                    .map_err(tls)?;
                client.alpn_protocols = vec![ALPN.to_vec()];
                client.enable_early_data = false;
                client.resumption = rustls::client::Resumption::disabled();
                let mut config = quinn::ClientConfig::new(Arc::new(
                    QuicClientConfig::try_from(client).map_err(tls)?,
                ));
                config.transport_config(transport_config());
                Ok(config)
            };
        // Joining: the inviter is not pinned yet; the PAKE binding authenticates it instead.
        let pairing_client = client_config(Pins::new(), true)?;
        let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(
            QuicServerConfig::try_from(server).map_err(tls)?,
        ));
        server_config.transport_config(transport_config());
        let mut endpoint_config = quinn::EndpointConfig::default();
        endpoint_config
            .max_udp_payload_size(UDP_PAYLOAD_MAX)
            .map_err(|e| TransportError::Io(format!("UDP payload limit: {e}")))?;
        let runtime = quinn::default_runtime()
            .ok_or_else(|| TransportError::io(std::io::Error::other("no async runtime")))?;
        let socket = std::net::UdpSocket::bind(addr).map_err(TransportError::io)?;
        let mut endpoint =
            quinn::Endpoint::new(endpoint_config, Some(server_config), socket, runtime)
                .map_err(TransportError::io)?;
        endpoint.set_default_client_config(client_config(pins.clone(), false)?);
        let (ready, accepted) = tokio::sync::mpsc::channel(HANDSHAKES_MAX);
        tokio::spawn(run_handshakes(endpoint.clone(), pins.clone(), ready));
        Ok(Self {
            endpoint,
            device: identity.device(),
            pins,
            pairing_client,
            accepted: Arc::new(tokio::sync::Mutex::new(accepted)),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> Result<SocketAddr, TransportError> {
        self.endpoint.local_addr().map_err(TransportError::io)
    }

    /// This endpoint's device.
    pub fn device(&self) -> DeviceId {
        self.device
    }

    /// Connects to `addr`; the peer must present a pinned certificate (checked in the
    /// handshake, and again once it is done).
    pub async fn connect(&self, addr: SocketAddr) -> Result<Connection, TransportError> {
        let connecting = self.endpoint.connect(addr, "keel").map_err(tls)?;
        let connection = connecting.await.map_err(tls)?;
        let connection = Connection::authenticated(connection, &self.pins)?;
        if !connection.pinned {
            connection.close("not paired");
            return Err(TransportError::Tls(format!(
                "device {} is not paired",
                connection.peer.short()
            )));
        }
        Ok(connection)
    }

    /// Connects to an inviting device that is not pinned yet, to pair with it.
    pub async fn connect_to_pair(&self, addr: SocketAddr) -> Result<Connection, TransportError> {
        let connecting = self
            .endpoint
            .connect_with(self.pairing_client.clone(), addr, "keel")
            .map_err(tls)?;
        let connection = connecting.await.map_err(tls)?;
        Connection::authenticated(connection, &self.pins)
    }

    /// The pins this endpoint checks.
    pub fn pins(&self) -> &Pins {
        &self.pins
    }

    /// Waits for the next incoming connection whose handshake finished (from a pinned device,
    /// or an unpinned one while an invitation is open: see [`Connection::pinned`]); `None` once
    /// closed. Handshakes run concurrently, so one that stalls delays no other.
    pub async fn accept(&self) -> Option<Result<Connection, TransportError>> {
        self.accepted.lock().await.recv().await
    }

    /// Closes the endpoint and its connections.
    pub fn close(&self) {
        self.endpoint.close(0u32.into(), b"bye");
    }
}

/// Runs incoming handshakes, at most [`HANDSHAKES_MAX`] at once, each for at most
/// [`HANDSHAKE_TIMEOUT_MS`]; a source whose address is not validated yet is asked to prove it
/// (a QUIC Retry) first, so a spoofed flood costs no handshake state.
async fn run_handshakes(
    endpoint: quinn::Endpoint,
    pins: Pins,
    ready: tokio::sync::mpsc::Sender<Accepted>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(HANDSHAKES_MAX));
    while let Some(incoming) = endpoint.accept().await {
        if !incoming.remote_address_validated() && incoming.may_retry() {
            let _ = incoming.retry();
            continue;
        }
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            incoming.refuse();
            continue;
        };
        let (ready, pins) = (ready.clone(), pins.clone());
        tokio::spawn(async move {
            let timeout = std::time::Duration::from_millis(HANDSHAKE_TIMEOUT_MS);
            let result = match tokio::time::timeout(timeout, incoming).await {
                Ok(Ok(connection)) => Connection::authenticated(connection, &pins),
                Ok(Err(e)) => Err(tls(e)),
                Err(_) => Err(TransportError::Tls("the handshake timed out".into())),
            };
            drop(slot);
            let _ = ready.send(result).await;
        });
    }
}

impl Connection {
    fn authenticated(connection: quinn::Connection, pins: &Pins) -> Result<Self, TransportError> {
        let certs = connection
            .peer_identity()
            .and_then(|any| {
                any.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                    .ok()
            })
            .ok_or_else(|| TransportError::Tls("peer presented no certificate".into()))?;
        let first = certs
            .first()
            .ok_or_else(|| TransportError::Tls("peer presented no certificate".into()))?;
        let peer = DeviceId::of_certificate(first.as_ref());
        Ok(Self {
            pinned: pins.contains(&peer),
            peer,
            connection,
        })
    }

    /// Whether the peer was pinned when the connection was made.
    pub fn pinned(&self) -> bool {
        self.pinned
    }

    /// 32 bytes of TLS keying material unique to this connection (the same on both ends), for
    /// binding pairing to it.
    pub fn exporter(&self) -> Result<[u8; 32], TransportError> {
        let mut out = [0u8; 32];
        self.connection
            .export_keying_material(&mut out, b"EXPORTER-keel-pairing-v1", b"")
            .map_err(|_| TransportError::Tls("keying material export failed".into()))?;
        Ok(out)
    }

    /// The peer's address (for a Keel node, the address it listens on: one socket serves both).
    pub fn remote_address(&self) -> SocketAddr {
        self.connection.remote_address()
    }

    /// The largest UDP payload the path to the peer carries, as MTU discovery has found it so
    /// far (1,200 at first, at most [`UDP_PAYLOAD_MAX`]).
    pub fn path_mtu(&self) -> u16 {
        self.connection.stats().path.current_mtu
    }

    /// The UDP bytes this connection has sent and received so far (QUIC's own counters:
    /// headers, acknowledgements and retransmissions included).
    pub fn wire_bytes(&self) -> (u64, u64) {
        let stats = self.connection.stats();
        (stats.udp_tx.bytes, stats.udp_rx.bytes)
    }

    /// The authenticated peer.
    pub fn peer(&self) -> DeviceId {
        self.peer
    }

    /// Sends one message on a new unidirectional stream.
    pub async fn send(&self, message: &DeviceMessage) -> Result<(), TransportError> {
        let frame = encode_frame(&message.encode()?)?;
        let mut stream = self.connection.open_uni().await.map_err(tls)?;
        stream.write_all(&frame).await.map_err(tls)?;
        stream.finish().map_err(tls)?;
        Ok(())
    }

    /// Sends raw bytes on a new unidirectional stream (tests of hostile input use this).
    pub async fn send_raw(&self, bytes: &[u8]) -> Result<(), TransportError> {
        let mut stream = self.connection.open_uni().await.map_err(tls)?;
        stream.write_all(bytes).await.map_err(tls)?;
        stream.finish().map_err(tls)?;
        Ok(())
    }

    /// Receives the next message sent with [`Connection::send`]. A malformed or oversized frame
    /// is an error; the caller closes this connection only.
    pub async fn recv(&self) -> Result<DeviceMessage, TransportError> {
        let mut stream = self.connection.accept_uni().await.map_err(tls)?;
        let mut header = [0u8; FRAME_HEADER_LEN];
        stream.read_exact(&mut header).await.map_err(tls)?;
        let len = frame_len(header)?;
        let mut body = Vec::with_capacity(len.min(BODY_CHUNK));
        while body.len() < len {
            let start = body.len();
            body.resize(start + (len - start).min(BODY_CHUNK), 0);
            stream.read_exact(&mut body[start..]).await.map_err(tls)?;
        }
        DeviceMessage::decode(&body)
    }

    /// Closes the connection with a reason the peer can log.
    pub fn close(&self, reason: &str) {
        self.connection.close(1u32.into(), reason.as_bytes());
    }
}
