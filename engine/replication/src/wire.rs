//! The replication messages as devices send them: payloads included, limits checked.
//!
//! `keel-transport` carries them inside `DeviceMessage::Replication`; this crate maps them to and
//! from its own messages (see [`crate::Replica`]), so the simulator and the node drive the same
//! mapping.

use keel_schema::{Epoch, Lsn, SyncDomain};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use crate::replica::ReplicaError;

/// Most records in one segment or push (and, in `keel-transport`, in any batch message).
pub const RECORDS_PER_MESSAGE_MAX: usize = 16_384;
/// Largest single record in a message.
pub const RECORD_BYTES_MAX: usize = 1 << 20;
/// Most domain positions in one message.
pub const POSITIONS_MAX: usize = 16;

/// Deserializers that refuse a sequence longer than its limit while decoding it, so a hostile
/// message never becomes a huge vector first (millions of empty records fit in one frame). The
/// error says `over a limit`, which `keel-transport` reports as its `OverLimit`.
pub mod bounded {
    use std::marker::PhantomData;

    use serde::de::{Deserialize, Deserializer, Error, SeqAccess, Visitor};

    /// The marker of a limit error, for a decoder to recognise it.
    pub const OVER_LIMIT: &str = "over a limit";

    struct Bounded<T, const MAX: usize>(PhantomData<T>);

    impl<'de, T: Deserialize<'de>, const MAX: usize> Visitor<'de> for Bounded<T, MAX> {
        type Value = Vec<T>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "a sequence of at most {MAX} elements")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            if seq.size_hint().is_some_and(|n| n > MAX) {
                return Err(A::Error::custom(format!(
                    "{OVER_LIMIT}: more than {MAX} elements"
                )));
            }
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(MAX).min(4096));
            while let Some(item) = seq.next_element()? {
                if out.len() == MAX {
                    return Err(A::Error::custom(format!(
                        "{OVER_LIMIT}: more than {MAX} elements"
                    )));
                }
                out.push(item);
            }
            Ok(out)
        }
    }

    /// At most `MAX` elements.
    pub fn seq<'de, D: Deserializer<'de>, T: Deserialize<'de>, const MAX: usize>(
        deserializer: D,
    ) -> Result<Vec<T>, D::Error> {
        deserializer.deserialize_seq(Bounded::<T, MAX>(PhantomData))
    }

    /// At most [`super::RECORDS_PER_MESSAGE_MAX`] elements.
    pub fn records<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
        deserializer: D,
    ) -> Result<Vec<T>, D::Error> {
        seq::<D, T, { super::RECORDS_PER_MESSAGE_MAX }>(deserializer)
    }

    /// At most [`super::POSITIONS_MAX`] elements.
    pub fn positions<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
        deserializer: D,
    ) -> Result<Vec<T>, D::Error> {
        seq::<D, T, { super::POSITIONS_MAX }>(deserializer)
    }
}

/// A device's clock floor (see `Library::clock_floor` in the engine): every change it will still
/// push has a clock at or after `(ms, counter)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ClockFloor {
    /// Milliseconds of the clock.
    pub ms: u64,
    /// The counter within the millisecond.
    pub counter: u32,
}

/// A replication position in one sync domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainPosition {
    /// The domain.
    pub domain: SyncDomain,
    /// The last log position applied in it.
    pub lsn: Lsn,
}

/// Length of an entry's `sealed` that is an echo: the id of a change its receiver made and
/// pushed, which the receiver holds (a sealed change is longer; a barrier is empty).
pub const ECHO_LEN: usize = 16;

/// One log entry on the wire: the epoch that sequenced it and the sealed change (empty for the
/// barrier that starts an epoch; [`ECHO_LEN`] bytes, the change's id, when the receiver made it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireLogEntry {
    /// The sequencing epoch.
    pub epoch: Epoch,
    /// The sealed change, as stored in the journal.
    pub sealed: ByteBuf,
}

/// Election and replication between the devices of one library.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplicationMessage {
    /// A candidate asks for a vote in `epoch`, showing how far its log goes.
    RequestVote {
        /// The epoch the candidate would lead.
        epoch: Epoch,
        /// The epoch of its last log entry.
        last_epoch: Epoch,
        /// Its last log position.
        last_lsn: Lsn,
    },
    /// The answer to a vote request.
    Vote {
        /// The epoch voted on.
        epoch: Epoch,
        /// Whether the vote is granted.
        granted: bool,
    },
    /// "My epoch is higher": the receiver's epoch is stale and it steps down.
    Stale {
        /// The sender's epoch.
        epoch: Epoch,
    },
    /// Before an election: would the receiver vote for the sender in `epoch`? Changes no state
    /// on either side (a device that cannot hear a live leader does not depose it).
    PreVote {
        /// The epoch the sender would stand in.
        epoch: Epoch,
        /// The epoch of its last log entry.
        last_epoch: Epoch,
        /// Its last log position.
        last_lsn: Lsn,
    },
    /// The answer to a pre-vote.
    PreVoteReply {
        /// The epoch asked about.
        epoch: Epoch,
        /// Whether a vote would be granted.
        granted: bool,
        /// The highest epoch the answering device has taken or voted in.
        highest: Epoch,
    },
    /// Log entries `first..` sequenced by the leader of `epoch` (none: a heartbeat).
    LogSegment {
        /// The sender's (leader's) epoch.
        epoch: Epoch,
        /// Position of the first entry.
        first: Lsn,
        /// Epoch of the entry before `first` (the follower checks its log agrees there).
        prev_epoch: Epoch,
        /// The leader's last log position (for catch-up progress).
        leader_end: Lsn,
        /// The entries (on the wire, their epochs as runs: see [`epoch_runs`]).
        #[serde(with = "epoch_runs")]
        entries: Vec<WireLogEntry>,
        /// The leader's compaction base: the follower may compact its own log up to it
        /// (0 from a leader that never compacted, or one that predates compaction).
        #[serde(default)]
        base: Lsn,
    },
    /// A follower's own changes (sealed), pushed to the leader; idempotent by change id.
    Push {
        /// Sealed changes.
        #[serde(deserialize_with = "bounded::records")]
        changes: Vec<ByteBuf>,
    },
    /// A follower's answer to a segment: what it stored and applied.
    Ack {
        /// The follower's epoch.
        epoch: Epoch,
        /// Whether the segment matched the follower's log (if not, `stored` hints where to
        /// resume).
        ok: bool,
        /// Last log position stored.
        stored: Lsn,
        /// Applied positions per domain.
        #[serde(deserialize_with = "bounded::positions")]
        positions: Vec<DomainPosition>,
        /// The follower's clock floor; none when it cannot tell (or predates floors).
        #[serde(default)]
        floor: Option<ClockFloor>,
    },
    /// From the leader of `epoch`: what the receiver lacks is at or before `base`, which the
    /// leader compacted (its entry at `base` has `base_epoch`). The receiver backfills from a
    /// snapshot, or answers with an `Ack` at `base` if its log holds that entry.
    Compacted {
        /// The sender's (leader's) epoch.
        epoch: Epoch,
        /// The leader's compaction base.
        base: Lsn,
        /// The epoch of the entry at `base`.
        base_epoch: Epoch,
    },
}

/// A segment's entries on the wire: each epoch once per run of entries that share it, then the
/// payloads, `(runs: [(start index, epoch)], sealed: [bytes])`. An epoch is 44 bytes encoded and
/// a segment's entries nearly all share one. Decoding checks the runs (the first starts at 0,
/// starts increase and fall inside the entries) and the limits before expanding them.
pub mod epoch_runs {
    use keel_schema::Epoch;
    use serde::de::Error;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use serde_bytes::ByteBuf;

    use super::{bounded, WireLogEntry, RECORDS_PER_MESSAGE_MAX};

    #[derive(Serialize)]
    struct Out<'a>(Vec<(u32, Epoch)>, Vec<&'a ByteBuf>);

    #[derive(Deserialize)]
    struct In(
        #[serde(deserialize_with = "bounded::records")] Vec<(u32, Epoch)>,
        #[serde(deserialize_with = "bounded::records")] Vec<ByteBuf>,
    );

    /// Writes `entries` as runs and payloads.
    pub fn serialize<S: Serializer>(entries: &[WireLogEntry], s: S) -> Result<S::Ok, S::Error> {
        let mut runs: Vec<(u32, Epoch)> = Vec::new();
        for (i, entry) in entries.iter().enumerate() {
            if runs.last().map(|(_, e)| *e) != Some(entry.epoch) {
                // At most RECORDS_PER_MESSAGE_MAX entries: the index fits.
                runs.push((u32::try_from(i).unwrap_or(u32::MAX), entry.epoch));
            }
        }
        Out(runs, entries.iter().map(|e| &e.sealed).collect()).serialize(s)
    }

    /// Reads runs and payloads back into entries, refusing runs that do not describe them.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<WireLogEntry>, D::Error> {
        let In(runs, sealed) = In::deserialize(d)?;
        debug_assert!(sealed.len() <= RECORDS_PER_MESSAGE_MAX);
        let starts_right = match runs.first() {
            None => sealed.is_empty(),
            Some((first, _)) => *first == 0,
        };
        let increasing = runs.windows(2).all(|w| w[0].0 < w[1].0);
        let inside = runs
            .last()
            .is_none_or(|(at, _)| (*at as usize) < sealed.len());
        if !(starts_right && increasing && inside) {
            return Err(D::Error::custom("epoch runs that do not fit the entries"));
        }
        let mut entries = Vec::with_capacity(sealed.len());
        let mut run = 0;
        for (i, sealed) in sealed.into_iter().enumerate() {
            while runs.get(run + 1).is_some_and(|(at, _)| *at as usize <= i) {
                run += 1;
            }
            let epoch = runs.get(run).map(|(_, e)| *e).unwrap_or_default();
            entries.push(WireLogEntry { epoch, sealed });
        }
        Ok(entries)
    }
}

/// Checks a batch of blobs against the record limits.
pub fn check_records<'a>(
    what: &str,
    blobs: impl ExactSizeIterator<Item = &'a ByteBuf>,
) -> Result<(), ReplicaError> {
    if blobs.len() > RECORDS_PER_MESSAGE_MAX {
        return Err(ReplicaError::OverLimit(format!(
            "{} {what} (max {RECORDS_PER_MESSAGE_MAX})",
            blobs.len()
        )));
    }
    for blob in blobs {
        if blob.len() > RECORD_BYTES_MAX {
            return Err(ReplicaError::OverLimit(format!(
                "a {what} of {} bytes",
                blob.len()
            )));
        }
    }
    Ok(())
}

/// Checks a list of domain positions against [`POSITIONS_MAX`].
pub fn check_positions(positions: &[DomainPosition]) -> Result<(), ReplicaError> {
    if positions.len() > POSITIONS_MAX {
        return Err(ReplicaError::OverLimit(format!(
            "{} positions",
            positions.len()
        )));
    }
    Ok(())
}

impl ReplicationMessage {
    /// Checks the limits (the decoder calls it on every message from a peer).
    pub fn check(&self) -> Result<(), ReplicaError> {
        match self {
            ReplicationMessage::LogSegment { entries, .. } => {
                check_records("log entries", entries.iter().map(|e| &e.sealed))
            }
            ReplicationMessage::Push { changes } => check_records("changes", changes.iter()),
            ReplicationMessage::Ack { positions, .. } => check_positions(positions),
            ReplicationMessage::RequestVote { .. }
            | ReplicationMessage::Vote { .. }
            | ReplicationMessage::Stale { .. }
            | ReplicationMessage::PreVote { .. }
            | ReplicationMessage::PreVoteReply { .. }
            | ReplicationMessage::Compacted { .. } => Ok(()),
        }
    }
}
