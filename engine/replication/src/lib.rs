//! Leader election and replication as a state machine with no I/O.
//!
//! One [`Replica`] per device and library. It performs no I/O and reads no clock: time comes in
//! as an argument, and everything it wants done comes out as values.
//!
//! # The contract
//!
//! **Inputs.** [`Replica::handle`] takes one [`Input`] at a time with the current time in ms:
//! a message from a peer ([`Input::Received`]), a session up or down, a commit of this device
//! ([`Input::Commit`]), or a tick ([`Input::Tick`]).
//!
//! **Outputs.** `handle` returns the messages to send ([`Output::Send`]). Beside them the replica
//! holds what must be made durable first: its election state ([`Replica::durable`]'s `epoch`
//! and `voted`) and its log operations, drained with [`Replica::take_ops`] (appends at a
//! position, truncations after one), in order. [`Replica::poll_timeout`] says when the next tick
//! has something to do.
//!
//! **Order.** Several inputs may be handled before a flush. A flush writes the election state,
//! then every operation `take_ops` returns, durably, and only then sends the messages of the
//! inputs it covers. A runtime that fails to write reloads the replica from what is durable
//! ([`Replica::new`]) and drops the unsent messages: nothing is ever sent that is not durable.
//!
//! **Checked in the code.** Epochs never go back; a vote is given at most once per epoch
//! counter; the log is appended at its end only, with epochs that never decrease along it.
//! A violation is a bug and panics (`assert!`), in the runtime as in the simulator.
//!
//! The node runtime (`keel-node`, its `core.rs`) and the seeded simulator
//! (`tests/tests/simulator.rs`) drive it through exactly these calls; the simulator persists
//! exactly the operations `take_ops` returns and restarts replicas from them.

mod replica;
mod types;

pub use replica::{Replica, ReplicaConfig};
pub use types::{Durable, ElectionRole, Input, Log, LogOp, LogSlot, Message, Output};

#[cfg(test)]
mod tests;
