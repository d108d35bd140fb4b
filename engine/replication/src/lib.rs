//! Leader election and replication as a state machine with no I/O.
//!
//! [`Replica::handle`] takes an [`Input`] and the current time and returns the [`Output`]s to carry
//! out: messages to send and facts to make durable. A runtime performs them against the journal
//! and QUIC; a seeded simulator (`tests/tests/simulator.rs`) runs many nodes through partitions,
//! crashes, duplication and reordering and checks the invariants. [`Replica::take_ops`] lists the log
//! changes to make durable; `crate::runtime` runs a node over the journal, projections and QUIC.

mod replica;
mod types;

pub use replica::{Replica, ReplicaConfig};
pub use types::{Durable, ElectionRole, Input, Log, LogOp, LogSlot, Message, Output};

#[cfg(test)]
mod tests;
