//! Commits of a leading node, sequenced by its replication core directly.
//!
//! Without this, a change made on the leader is written to the offline journal (one sync), then
//! the core sequences it into the log (a second sync) before any follower hears of it. While the
//! node leads, [`crate::Library::transact`] instead hands the sealed changes to the core, which
//! appends them to the log in one durable transaction and answers after it: one sync, and two
//! thread hand-offs fewer, between a commit and the moment followers are sent the change.
//!
//! Any answer but [`SequenceReply::Done`] sends the caller down the usual path (the offline
//! journal), which is safe: a core that no longer leads answers [`SequenceReply::NotLeading`]
//! and wrote nothing; a core that stopped dropped the request unanswered; and if writing the log
//! failed, the changes are committed again by id, which the leader deduplicates.

use keel_journal::Placement;
use keel_schema::ChangeId;

/// Sealed changes for the core to sequence, and where to answer.
pub struct SequenceRequest {
    /// Each change's id and its sealed payload, in commit order.
    pub changes: Vec<(ChangeId, Vec<u8>)>,
    /// Answered once the log entries are durable, or when nothing was written.
    pub reply: crossbeam_channel::Sender<SequenceReply>,
}

/// The core's answer to a [`SequenceRequest`].
pub enum SequenceReply {
    /// Durable in the log at these positions (one per change, in order).
    Done(Vec<Placement>),
    /// The node does not lead (any more): nothing was written.
    NotLeading,
    /// Writing the log failed (the reason).
    Failed(String),
}
