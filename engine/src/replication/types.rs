//! The vocabulary of the replication core: log entries, messages, inputs, outputs, durable state.

use keel_schema::{ChangeId, DeviceId, Epoch, Lsn};

/// One log entry: a sequenced change, or the barrier a new leader writes at the start of its epoch
/// (so every follower's log ends in the newest epoch once it has caught up).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Entry {
    /// A change, by id (the payload travels beside it in the real runtime).
    Change(ChangeId),
    /// The start of a leader's epoch.
    Barrier,
}

/// Messages between replication cores (mapped onto `DeviceMessage` by the runtime).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// A candidate asks for a vote.
    RequestVote {
        /// The epoch it would lead.
        epoch: Epoch,
        /// Epoch and position of its last log entry.
        last: (Epoch, Lsn),
    },
    /// A vote answer.
    Vote {
        /// The epoch voted on.
        epoch: Epoch,
        /// Granted or not.
        granted: bool,
    },
    /// Log entries from the leader of `epoch`, after position `prev` (whose entry has `prev_epoch`).
    Append {
        /// The leader's epoch.
        epoch: Epoch,
        /// Position before the first entry.
        prev: Lsn,
        /// Epoch of the entry at `prev` (ignored when `prev` is 0).
        prev_epoch: Epoch,
        /// The entries with their epochs.
        entries: Vec<(Epoch, Entry)>,
    },
    /// A follower's answer to `Append`.
    AppendReply {
        /// The follower's epoch.
        epoch: Epoch,
        /// Whether `prev` matched.
        ok: bool,
        /// The follower's last position (a hint where to continue).
        last: Lsn,
    },
    /// A follower's own changes (idempotent by id).
    Push {
        /// Change ids.
        changes: Vec<ChangeId>,
    },
    /// "My epoch is higher": the receiver's epoch is stale and it steps down.
    Stale {
        /// The sender's epoch.
        epoch: Epoch,
    },
}

/// What happens to a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    /// Time passes (timers fire).
    Tick,
    /// A message arrived.
    Received {
        /// From whom.
        from: DeviceId,
        /// What.
        message: Message,
    },
    /// A peer became reachable.
    Connected(DeviceId),
    /// A peer became unreachable.
    Disconnected(DeviceId),
    /// The host committed a change on this device (already durable in the local journal).
    Commit(ChangeId),
}

/// What a node asks its runtime to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// Send a message.
    Send {
        /// To whom.
        to: DeviceId,
        /// What.
        message: Message,
    },
}

/// One change a node made to its log, for the runtime to make durable in the same order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogOp {
    /// An entry was appended at position `at`.
    Append {
        /// Its position.
        at: Lsn,
        /// The epoch it carries.
        epoch: Epoch,
        /// The entry.
        entry: Entry,
    },
    /// Every entry after `keep` was removed (their changes are pending again).
    Truncate {
        /// The last position kept.
        keep: Lsn,
    },
}

/// The node's role.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Sequences changes for its epoch.
    Leader,
    /// Follows a leader.
    Follower,
    /// Asking for votes.
    Candidate,
    /// No leader and no reachable peer: commits wait in the local journal.
    Alone,
}

/// The state that survives a crash (kept in the journal by the runtime). Every change to it is
/// made durable before any message that depends on it is sent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Durable {
    /// The highest epoch accepted.
    pub epoch: Epoch,
    /// The highest epoch voted for.
    pub voted: Epoch,
    /// The log: `log[i]` is at position `i + 1`.
    pub log: Vec<(Epoch, Entry)>,
    /// This device's changes not yet seen in the log (the offline journal).
    pub pending: Vec<ChangeId>,
}

impl Durable {
    /// The last position.
    pub fn last_lsn(&self) -> Lsn {
        Lsn(self.log.len() as u64)
    }

    /// Epoch and position of the last entry (the "how up to date" order used in elections).
    pub fn last(&self) -> (Epoch, Lsn) {
        (
            self.log.last().map(|(e, _)| *e).unwrap_or_default(),
            self.last_lsn(),
        )
    }

    /// The epoch of the entry at `lsn` (`None` past the end; the default epoch at 0).
    pub fn epoch_at(&self, lsn: Lsn) -> Option<Epoch> {
        if lsn.0 == 0 {
            return Some(Epoch::default());
        }
        self.log.get(lsn.0 as usize - 1).map(|(e, _)| *e)
    }
}
