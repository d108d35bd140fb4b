//! The transport crate's error type.

impl TransportError {
    pub(crate) fn io(e: std::io::Error) -> Self {
        TransportError::Io(e.to_string())
    }
}

/// Errors from framing and message decoding. Each closes the connection it came from, and only it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// A frame announced more bytes than [`FRAME_LEN_MAX`](crate::FRAME_LEN_MAX).
    #[error("frame of {0} bytes exceeds the limit")]
    FrameTooLarge(u64),
    /// A frame ended early.
    #[error("truncated frame: {needed} more bytes needed")]
    Truncated {
        /// Bytes still missing.
        needed: usize,
    },
    /// The message starts with a version this build does not speak.
    #[error("unsupported message version {0}")]
    Version(u8),
    /// The message does not decode.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// TLS or QUIC failed (handshake, unpinned peer, closed connection, …).
    #[error("connection: {0}")]
    Tls(String),
    /// A socket failed.
    #[error("socket: {0}")]
    Io(String),
    /// The message decodes but breaks a limit (too many records, a record too long, …).
    #[error("message over a limit: {0}")]
    OverLimit(String),
}

impl TransportError {
    /// Whether the peer sent something malformed or oversized (as opposed to the connection
    /// simply ending): the connection is closed with a logged reason.
    pub fn is_hostile(&self) -> bool {
        matches!(
            self,
            Self::FrameTooLarge(_)
                | Self::Truncated { .. }
                | Self::Version(_)
                | Self::Malformed(_)
                | Self::OverLimit(_)
        )
    }
}

impl From<keel_replication::ReplicaError> for TransportError {
    fn from(e: keel_replication::ReplicaError) -> Self {
        match e {
            keel_replication::ReplicaError::OverLimit(what) => Self::OverLimit(what),
            keel_replication::ReplicaError::MissingPayload(id) => {
                Self::Malformed(format!("no payload for change {id}"))
            }
            keel_replication::ReplicaError::Store(never) => match never {},
        }
    }
}
