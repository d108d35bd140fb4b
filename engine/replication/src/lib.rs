//! Leader election and log replication as a state machine with no I/O.
//!
//! One [`Replica`] per device and library. It performs no I/O and reads no clock: time comes in
//! as an argument, reads go through a [`Store`] the runtime supplies, and everything it wants
//! done comes out of its polls. The node runtime (`keel-node`) and the seeded simulator
//! (`tests/tests/simulator.rs`) drive it through exactly these calls.
//!
//! # The contract
//!
//! **Inputs.** [`Replica::handle_message`] (a [`ReplicationMessage`] from an authenticated
//! peer), [`Replica::handle_connected`] and [`Replica::handle_disconnected`] (sessions),
//! [`Replica::handle_commit`] (a change committed on this device),
//! [`Replica::handle_abdicate`] (this device's log is damaged: stop leading) and
//! [`Replica::handle_timeout`] (time passed), each with the current time in ms.
//!
//! **Outputs**, polled after inputs, in this order:
//! 1. [`Replica::poll_event`]: role changes, catch-up progress, refused input. Act on a
//!    [`ReplicaEvent::CatchingUp`] before the writes that follow it.
//! 2. [`Replica::poll_log_write`] until `None`: the election state, then log appends and
//!    truncations, in order. Write them all durably, then call [`Replica::written`].
//! 3. [`Replica::poll_transmit`] until `None`: the messages, in wire form.
//! 4. [`Replica::poll_timeout`]: when to call `handle_timeout` next, a deadline.
//!
//! **Durable before sent.** `poll_transmit` returns nothing while a write is unpolled or polled
//! and not confirmed by `written`: no message goes out before the state it depends on is
//! durable. A runtime whose write fails never calls `written`; it drops the replica and starts
//! a new one ([`Replica::new`]) from what is durable, and the messages held are lost with it.
//!
//! **Checked in the code** (a violation is a bug and panics, in the runtime as in the
//! simulator): epochs never go back; a vote is given at most once per epoch counter; the log is
//! appended at its end only, with epochs that never decrease along it; `written` is called only
//! after every write was polled.
//!
//! **Hostile input.** Messages come checked against the limits of [`wire`] (the decoder calls
//! [`ReplicationMessage::check`]); payloads that do not open are dropped with a
//! [`ReplicaEvent::Refused`]; payloads the rules ignore are not kept in memory.

mod machine;
mod replica;
mod types;
pub mod wire;

pub use machine::ReplicaConfig;
pub use replica::{LogWrite, Opened, Replica, ReplicaError, ReplicaEvent, Store, Transmit};
pub use types::{Durable, ElectionRole, Log, LogSlot};
pub use wire::ReplicationMessage;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_compaction;
#[cfg(test)]
mod tests_replica;
