//! Keel's wire protocol: length-prefixed frames with a size limit checked before allocating, and
//! the versioned `DeviceMessage` set (hello, log segments, change pushes, acks, model batches,
//! leader election, pairing). QUIC endpoints, device certificates and pairing build on this.
//!
//! Depends on `schema` only.

mod error;
mod frame;
mod message;

pub use error::TransportError;
pub use frame::{
    decode_frame, encode_frame, frame_len, FrameDecoder, FRAME_HEADER_LEN, FRAME_LEN_MAX,
};
pub use message::{
    DeviceMessage, DomainPosition, ElectionMessage, PairingMessage, WireLogEntry, MESSAGE_VERSION,
    POSITIONS_MAX, RECORDS_PER_MESSAGE_MAX, RECORD_BYTES_MAX, TEXT_LEN_MAX,
};
