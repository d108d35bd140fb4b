//! Keel's wire protocol: length-prefixed frames with a size limit checked before allocating, and
//! the versioned `DeviceMessage` set (hello, log segments, change pushes, acks, model batches,
//! leader election, pairing), device identities (self-signed certificates; the device id is
//! their SHA-256) and QUIC endpoints with mutual TLS that accept pinned devices only.
//!
//! Depends on `schema` only.

mod endpoint;
mod error;
mod frame;
mod identity;
mod message;
mod pairing;
mod verifier;

pub use endpoint::{
    Connection, Endpoint, ALPN, HANDSHAKES_MAX, HANDSHAKE_TIMEOUT_MS, IDLE_TIMEOUT_MS,
    KEEP_ALIVE_MS, UDP_PAYLOAD_MAX,
};
pub use error::TransportError;
pub use frame::{decode_frame, encode_frame, frame_len, FRAME_HEADER_LEN, FRAME_LEN_MAX};
pub use identity::Identity;
pub use keel_replication::ReplicationMessage;
pub use message::{
    DeviceMessage, DomainPosition, PairingMessage, PeerAddr, WireKey, WireLogEntry, WirePart,
    WireRange, WireRangeDigest, BACKFILL_PARTS_MAX, LIBRARY_KEYS_MAX, MESSAGE_VERSION, PEERS_MAX,
    POSITIONS_MAX, RANGES_PER_REQUEST_MAX, RECORDS_PER_MESSAGE_MAX, RECORD_BYTES_MAX, REVOKED_MAX,
    SNAPSHOT_CHUNK_MAX, TEXT_LEN_MAX,
};
pub use pairing::{
    Binding, InviteRun, Inviter, Joined, Joiner, PairingCode, PairingError, CODE_FAILURES_MAX,
    CODE_TTL_MS, DEVICE_LIMIT_DEFAULT, RATE_FAILURES_MAX, RATE_WINDOW_MS,
};
pub use verifier::Pins;
