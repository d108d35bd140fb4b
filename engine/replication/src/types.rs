//! The vocabulary of the replication core: log entries, messages, inputs, outputs, durable state.

use keel_schema::{ChangeId, DeviceId, Epoch, Lsn};

/// One log entry: a sequenced change, or the barrier a new leader writes at the start of its epoch
/// (so every follower's log ends in the newest epoch once it has caught up).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LogSlot {
    /// A change, by id (the payload travels beside it in the real runtime).
    Change(ChangeId),
    /// The start of a leader's epoch.
    Barrier,
}

/// Messages between replication cores (mapped onto `DeviceMessage` by the runtime).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Message {
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
        entries: Vec<(Epoch, LogSlot)>,
        /// Where the follower may compact its own log up to: the leader's compaction base, or
        /// further, what every device stored this epoch (never past what this follower
        /// acknowledged).
        base: Lsn,
    },
    /// From the leader of `epoch`: what the follower lacks is before `base`, which the leader
    /// compacted (the entry at `base` has `base_epoch`); the follower must backfill.
    Compacted {
        /// The leader's epoch.
        epoch: Epoch,
        /// The leader's compaction base.
        base: Lsn,
        /// The epoch of the entry at `base`.
        base_epoch: Epoch,
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
    /// Before standing in `epoch`: would the receiver vote for the sender? Changes nothing on
    /// either side, so a device that cannot hear a live leader (cut off from it alone, or busy)
    /// does not depose it by bumping the epoch.
    PreVote {
        /// The epoch the sender would stand in.
        epoch: Epoch,
        /// Epoch and position of its last log entry.
        last: (Epoch, Lsn),
    },
    /// A pre-vote answer.
    PreVoteReply {
        /// The epoch asked about.
        epoch: Epoch,
        /// Whether a vote would be granted.
        granted: bool,
        /// The highest epoch the answering device has taken or voted in: a refused device
        /// stands above it next time (nothing else changes on its side).
        highest: Epoch,
    },
}

/// What happens to a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Input {
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
    /// The host found this device's log damaged: stop leading (see `Machine::abdicate`).
    Abdicate,
}

/// What a node asks its runtime to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Output {
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
pub(crate) enum LogOp {
    /// An entry was appended at position `at`.
    Append {
        /// Its position.
        at: Lsn,
        /// The epoch it carries.
        epoch: Epoch,
        /// The entry.
        entry: LogSlot,
    },
    /// Every entry after `keep` was removed (the changes this device made are pending again).
    Truncate {
        /// The last position kept.
        keep: Lsn,
        /// How many entries were removed.
        removed: u64,
    },
}

/// A replica's part in its library's election.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ElectionRole {
    /// Sequences changes for its epoch.
    Leader,
    /// Follows a leader.
    Follower,
    /// Asking for votes.
    Candidate,
    /// No leader and no reachable peer: commits wait in the offline journal.
    #[default]
    Alone,
}

impl ElectionRole {
    /// Its name in status output: `leader`, `follower`, `candidate` or `alone`.
    pub fn as_str(self) -> &'static str {
        match self {
            ElectionRole::Leader => "leader",
            ElectionRole::Follower => "follower",
            ElectionRole::Candidate => "candidate",
            ElectionRole::Alone => "alone",
        }
    }
}

impl std::fmt::Display for ElectionRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A log held compactly: one entry per position (a change id or a barrier, 17 bytes) and the
/// epochs as runs (a new run only where the epoch changes), so a million entries take ~17 MB.
///
/// A compacted log starts after its *base*: positions up to the base were dropped (their state
/// is in the journal's snapshot), and only the base's epoch is kept. Indexes are absolute:
/// entry `i` is at position `i + 1` whatever the base.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Log {
    /// Positions up to this one were compacted away.
    base: u64,
    /// The epoch of the entry at `base` (the default epoch when `base` is 0).
    base_epoch: Epoch,
    /// The entries after the base.
    entries: Vec<LogSlot>,
    /// `(index in entries of the first entry, epoch)`, increasing, no two neighbours with the
    /// same epoch.
    runs: Vec<(usize, Epoch)>,
}

impl Log {
    /// Number of entries held (after the base).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no entry is held after the base.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The last position: the base plus the entries held.
    pub fn end(&self) -> u64 {
        self.base + self.entries.len() as u64
    }

    /// The position up to which the log was compacted (0: never).
    pub fn base(&self) -> Lsn {
        Lsn(self.base)
    }

    /// The epoch of the entry at the base.
    pub fn base_epoch(&self) -> Epoch {
        self.base_epoch
    }

    /// Appends an entry.
    pub fn push(&mut self, (epoch, entry): (Epoch, LogSlot)) {
        if self.runs.last().map(|(_, e)| *e) != Some(epoch) {
            self.runs.push((self.entries.len(), epoch));
        }
        self.entries.push(entry);
    }

    /// The epoch of the held entry at `held` (an index into `entries`).
    fn epoch_of(&self, held: usize) -> Epoch {
        let run = self.runs.partition_point(|(start, _)| *start <= held);
        run.checked_sub(1)
            .and_then(|r| self.runs.get(r))
            .map(|(_, e)| *e)
            .unwrap_or_default()
    }

    /// The index into `entries` of absolute index `index`, if held.
    fn held(&self, index: usize) -> Option<usize> {
        index.checked_sub(usize::try_from(self.base).ok()?)
    }

    /// The entry at index `index` (position `index + 1`); `None` past the end or at or below
    /// the base.
    pub fn get(&self, index: usize) -> Option<(Epoch, LogSlot)> {
        let held = self.held(index)?;
        let entry = *self.entries.get(held)?;
        Some((self.epoch_of(held), entry))
    }

    /// The last entry held.
    pub fn last(&self) -> Option<(Epoch, LogSlot)> {
        let held = self.entries.len().checked_sub(1)?;
        Some((self.epoch_of(held), self.entries[held]))
    }

    /// Keeps the positions up to `len`. Never below the base: compacted positions are
    /// settled (every device acknowledged them).
    pub fn truncate(&mut self, len: usize) {
        let held = self
            .held(len)
            .expect("a truncation below the compaction base");
        self.entries.truncate(held);
        while self.runs.last().is_some_and(|(start, _)| *start >= held) {
            self.runs.pop();
        }
    }

    /// Removes and returns the entries from index `at` on (not below the base).
    pub fn split_off(&mut self, at: usize) -> Vec<(Epoch, LogSlot)> {
        let tail = self.range(at, self.end() as usize);
        self.truncate(at);
        tail
    }

    /// The entries with indexes `from..to` (clamped to what is held).
    pub fn range(&self, from: usize, to: usize) -> Vec<(Epoch, LogSlot)> {
        let to = to.min(self.end() as usize);
        let from = from.max(self.base as usize);
        (from.min(to)..to).filter_map(|i| self.get(i)).collect()
    }

    /// Every entry held, in order.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = (Epoch, LogSlot)> + '_ {
        (0..self.entries.len()).map(|held| (self.epoch_of(held), self.entries[held]))
    }

    /// Drops the positions up to `base` (which must be held or already compacted, and not past
    /// the end); a base at or below the current one changes nothing.
    pub fn compact(&mut self, base: Lsn) {
        assert!(base.0 <= self.end(), "a compaction base past the log's end");
        let Some(drop) = base.0.checked_sub(self.base).filter(|d| *d > 0) else {
            return;
        };
        let drop = drop as usize;
        let base_epoch = self.epoch_of(drop - 1);
        self.entries.drain(..drop);
        // The room of what was dropped goes back (20M entries are 340 MB), unless the log
        // still fills half of it.
        if self.entries.capacity() / 2 > self.entries.len() {
            self.entries.shrink_to_fit();
        }
        let mut runs = Vec::with_capacity(self.runs.len());
        for (start, epoch) in self.runs.drain(..) {
            let start = start.saturating_sub(drop);
            if runs.last().is_some_and(|(s, _)| *s == start) {
                runs.pop();
            }
            runs.push((start, epoch));
        }
        runs.retain(|(start, _)| *start < self.entries.len());
        self.runs = runs;
        self.base = base.0;
        self.base_epoch = base_epoch;
    }

    /// A log from its runs (the index at which each epoch starts, ascending) and its entries
    /// (`None` is a barrier): the form the journal saves it in. The ids are converted in place
    /// (same size), so a long log is not held twice.
    pub fn from_runs(runs: Vec<(u64, Epoch)>, ids: Vec<Option<ChangeId>>) -> Self {
        Self::from_parts((Lsn(0), Epoch::default()), runs, ids)
    }

    /// A compacted log: `base` with its epoch, then the entries after it as in
    /// [`Log::from_runs`] (run starts are indexes into `ids`).
    pub fn from_parts(
        (base, base_epoch): (Lsn, Epoch),
        runs: Vec<(u64, Epoch)>,
        ids: Vec<Option<ChangeId>>,
    ) -> Self {
        debug_assert!(runs.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 < w[1].1));
        Self {
            base: base.0,
            base_epoch,
            entries: ids
                .into_iter()
                .map(|id| id.map_or(LogSlot::Barrier, LogSlot::Change))
                .collect(),
            runs: runs
                .into_iter()
                .map(|(start, epoch)| (start as usize, epoch))
                .collect(),
        }
    }

    /// Every entry held, as a vector.
    pub fn to_vec(&self) -> Vec<(Epoch, LogSlot)> {
        self.iter().collect()
    }
}

impl FromIterator<(Epoch, LogSlot)> for Log {
    fn from_iter<I: IntoIterator<Item = (Epoch, LogSlot)>>(iter: I) -> Self {
        let mut log = Self::default();
        for item in iter {
            log.push(item);
        }
        log
    }
}

impl From<Vec<(Epoch, LogSlot)>> for Log {
    fn from(items: Vec<(Epoch, LogSlot)>) -> Self {
        items.into_iter().collect()
    }
}

/// The state that survives a crash (kept in the journal by the runtime). Every change to it is
/// made durable before any message that depends on it is sent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Durable {
    /// The highest epoch accepted.
    pub epoch: Epoch,
    /// The highest epoch voted for.
    pub voted: Epoch,
    /// The log: entry `i` is at position `i + 1`.
    pub log: Log,
    /// This device's changes not yet seen in the log (the offline journal).
    pub offline: Vec<ChangeId>,
    /// The log end (epoch and position of its last entry) this device vouched for before it
    /// last cut its log at a damaged record (see [`crate::Replica::handle_abdicate`]): it votes
    /// only for logs at least as up to date, and stands only once its own log is, so a log
    /// that lost entries never elects a leader that lacks them.
    pub vote_floor: Option<(Epoch, Lsn)>,
}

impl Durable {
    /// The last position.
    pub fn last_lsn(&self) -> Lsn {
        Lsn(self.log.end())
    }

    /// Epoch and position of the last entry (the "how up to date" order used in elections).
    pub fn last(&self) -> (Epoch, Lsn) {
        (
            self.log.last().map_or(self.log.base_epoch(), |(e, _)| e),
            self.last_lsn(),
        )
    }

    /// The epoch of the entry at `lsn` (`None` past the end or below the compaction base; the
    /// default epoch at 0).
    pub fn epoch_at(&self, lsn: Lsn) -> Option<Epoch> {
        if lsn == self.log.base() {
            return Some(self.log.base_epoch());
        }
        self.log
            .get(usize::try_from(lsn.0.checked_sub(1)?).ok()?)
            .map(|(e, _)| e)
    }
}
