//! The node's error type.

use std::path::PathBuf;

use keel_engine::EngineError;
use keel_journal::JournalError;
use keel_projections::ProjectionError;
use keel_transport::{PairingError, TransportError};

/// Errors from a running node, its pairing and its joins. Every variant is a normal operating
/// condition with a defined recovery.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// The library failed (its own error says how to recover).
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// Journal failure.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// Projection failure.
    #[error(transparent)]
    Projection(#[from] ProjectionError),
    /// Network failure.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// Pairing failed: wrong code, refused, device limit, ...
    #[error(transparent)]
    Pairing(#[from] PairingError),
    /// The node was stopped, or its library closed under it.
    #[error("the node is not running")]
    Stopped,
    /// A join or sync step failed (what failed).
    #[error("{0}")]
    Failed(String),
    /// A join's projection file arrived slower than [`crate::SlowLink::backfill_below`]: the
    /// copy was left, and the device backfills from the inviter's snapshot once its node
    /// starts (decision 0075).
    #[error("the link is slow ({bytes_per_s} bytes/s): the device backfills instead of copying the file")]
    SlowLink {
        /// The rate measured.
        bytes_per_s: u64,
    },
    /// The device did not get in sync within the time given ([`crate::Node::wait_in_sync`]).
    #[error("not in sync within {0:?}")]
    NotInSync(std::time::Duration),
    /// LAN discovery (mDNS) could not start or found nothing usable (what happened).
    #[error("LAN discovery: {0}")]
    Discovery(String),
    /// `devices.toml` does not parse or holds invalid values.
    #[error("{path} is invalid: {reason}")]
    BadDevicesFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// File-system failure, with the path involved.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// Attaches a path to an I/O error.
pub(crate) fn io_at(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> NodeError {
    let path = path.into();
    move |source| NodeError::Io { path, source }
}

/// Runs blocking work (the journal, the projections) off the runtime's workers and waits for it.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, NodeError> + Send + 'static,
) -> Result<T, NodeError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| NodeError::Failed(format!("a worker thread failed: {e}")))?
}
