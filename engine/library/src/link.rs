//! The link between an open library and the node that keeps it in sync.
//!
//! A host app that only reads and writes its library never sees this. A sync runtime (the
//! `keel-node` crate) takes one [`NodeLink`] when it starts, through [`Library::link`], and holds
//! everything it needs of the library in it: the journal it replicates, the key it shares with
//! devices that pair, this device's commits as they become durable, and — while it leads — the
//! commits it sequences itself. Dropping the link detaches the node: commits go through the
//! offline journal again and nobody is told of them.

use std::sync::Arc;

use crossbeam_channel::Receiver;
use keel_journal::{Journal, LibraryKey};
use keel_projections::FrozenFile;
use keel_schema::{ChangeId, Lsn};

use crate::error::EngineError;
use crate::events::Event;
use crate::leader_commit::SequenceRequest;
use crate::library::Library;

/// How a node links to its library.
#[derive(Debug, Clone, Copy)]
pub struct LinkOptions {
    /// While the node leads, its core appends this device's commits to the log itself (one sync
    /// before followers are sent them). `false` sends them through the offline journal as on a
    /// follower.
    pub leader_commits: bool,
}

/// A running node's hold on its library; see [`Library::link`]. At most one per library.
pub struct NodeLink {
    library: Arc<Library>,
    offline_commits: Receiver<Vec<ChangeId>>,
    sequence_requests: Receiver<SequenceRequest>,
}

impl std::fmt::Debug for NodeLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NodeLink({:?})", self.library)
    }
}

impl Library {
    /// Links a node to this library (see [`NodeLink`]). Fails with [`EngineError::Linked`] if a
    /// node holds a link already.
    pub fn link(self: &Arc<Self>, options: LinkOptions) -> Result<NodeLink, EngineError> {
        let (commits_tx, offline_commits) = crossbeam_channel::unbounded();
        let (sequence_tx, sequence_requests) = if options.leader_commits {
            crossbeam_channel::unbounded()
        } else {
            // A sender whose receiver is gone: the library sees a node that does not sequence.
            let (tx, _) = crossbeam_channel::bounded(0);
            (tx, crossbeam_channel::never())
        };
        self.attach_node(commits_tx, sequence_tx)?;
        Ok(NodeLink {
            library: self.clone(),
            offline_commits,
            sequence_requests,
        })
    }
}

impl NodeLink {
    /// The linked library.
    pub fn library(&self) -> &Arc<Library> {
        &self.library
    }

    /// The ids of every change committed to the offline journal (this device's changes waiting
    /// for a leader), sent before they are applied. Unbounded: each message is one commit of
    /// this device, which the sender has already made durable.
    pub fn offline_commits(&self) -> &Receiver<Vec<ChangeId>> {
        &self.offline_commits
    }

    /// This device's commits to sequence while the node leads (empty forever when the link was
    /// made without `leader_commits`). Answer each one; see [`SequenceRequest`].
    pub fn sequence_requests(&self) -> &Receiver<SequenceRequest> {
        &self.sequence_requests
    }

    /// The journal the node replicates.
    pub fn journal(&self) -> Result<&Journal, EngineError> {
        self.library.journal()
    }

    /// The library key (shared with a device that pairs).
    pub fn key(&self) -> LibraryKey {
        self.library.key()
    }

    /// Records whether the node leads: while it does, [`Library::transact`] offers its commits
    /// to [`NodeLink::sequence_requests`] first.
    pub fn set_leading(&self, leading: bool) {
        self.library.set_leading(leading);
    }

    /// Tells the library that the leader's log reaches `leader_end`: when that is far ahead of
    /// what is applied (a device that just joined), the projections load without their
    /// secondary indexes until they reach it.
    pub fn catching_up(&self, leader_end: Lsn) -> Result<(), EngineError> {
        self.library.catching_up(leader_end)
    }

    /// Tells the library how far a catch-up is: the entries `first..=stored` were just stored
    /// here, and the leader's log ends at `leader_end` (a long catch-up is followed as a job,
    /// see [`Library::jobs`]).
    pub fn catch_up_progress(
        &self,
        first: Lsn,
        stored: Lsn,
        leader_end: Lsn,
    ) -> Result<(), EngineError> {
        self.library
            .catch_up_progress(first.0.saturating_sub(1), stored.0, leader_end.0)
    }

    /// Stops offering commits to [`NodeLink::sequence_requests`] (the node is stopping):
    /// commits go through the offline journal from here, and requests still queued may be
    /// dropped unanswered, which sends their callers that way too.
    pub fn stop_sequencing(&self) {
        self.library.stop_sequencing();
    }

    /// Publishes `event` on the library's bus.
    pub fn publish(&self, event: Event) {
        self.library.publish(event);
    }

    /// Freezes the projection file for copying to a device that joins; `None` if it cannot be
    /// frozen now.
    pub fn freeze_projections(&self) -> Result<Option<FrozenFile>, EngineError> {
        self.library.freeze_projections()
    }
}

impl Drop for NodeLink {
    fn drop(&mut self) {
        self.library.detach_node();
    }
}
