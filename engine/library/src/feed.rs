//! The change feed: every change in the journal past a position, in order, with the position
//! to go on from. What a host reads after its event receiver lagged, after a restart, or to keep
//! its own cache of the library.
//!
//! The feed walks the log (up to what the projections applied) and then this device's changes
//! that wait in the offline journal. A change made here may be delivered from the offline
//! journal and later reach the log, sequenced by a leader: the position remembers the newest
//! such change delivered (`own`), and the feed skips this device's log entries at or below it.

use keel_journal::Placement;
use keel_schema::{Change, Hlc, Lsn};
use serde::{Deserialize, Serialize};

use crate::error::EngineError;
use crate::library::SyncState;

/// Where a host stands in the change feed; `FeedPosition::default()` is the beginning.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "typescript", derive(ts_rs::TS))]
pub struct FeedPosition {
    /// The last log position delivered.
    pub log: Lsn,
    /// The last offline-journal sequence delivered.
    pub local: u64,
    /// The newest clock of this device's changes delivered from the offline journal.
    pub own: Option<Hlc>,
}

/// One read of the change feed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "typescript", derive(ts_rs::TS))]
pub struct ChangeFeed {
    /// The changes, in order: log order, then this device's changes not yet in the log.
    /// Attestations and endorsements are among them, and so are changes the owner rule
    /// refused (`Query::refused` lists those).
    pub changes: Vec<Change>,
    /// Where to go on from.
    pub next: FeedPosition,
    /// Whether the limit stopped the read before the end of what is applied.
    pub more: bool,
}

impl SyncState<'_> {
    /// Every change applied after `after`, at most `limit`, in order, with the position to
    /// continue from (see [`ChangeFeed`]). Reads the journal: for catching up, not per event.
    pub fn changes_since(
        &self,
        after: FeedPosition,
        limit: usize,
    ) -> Result<ChangeFeed, EngineError> {
        let applied = self.applied_position();
        let journal = self.journal()?;
        let (base, _) = journal.log().base()?;
        if after.log < base {
            // The changes before the base are gone from the log: only the state remains.
            return Err(EngineError::FeedCompacted { base: base.0 });
        }
        let me = self.device_id();
        let mut feed = ChangeFeed {
            next: after,
            ..ChangeFeed::default()
        };
        let limit = limit.max(1);
        while feed.next.log < applied.log {
            let want = (applied.log.0 - feed.next.log.0).min(limit as u64) as usize;
            let chunk = journal.log().read(Lsn(feed.next.log.0 + 1), want)?;
            if chunk.is_empty() {
                break;
            }
            for entry in chunk {
                if feed.changes.len() >= limit {
                    feed.more = true;
                    return Ok(feed);
                }
                let Ok((Placement::Log(lsn), _, change)) = entry else {
                    // A record that fails its checks (`verify` reports it) or a barrier.
                    feed.next.log = Lsn(feed.next.log.0 + 1);
                    continue;
                };
                if lsn > applied.log {
                    break;
                }
                feed.next.log = lsn;
                let delivered_here = change.origin() == me && Some(change.hlc) <= feed.next.own;
                if !delivered_here {
                    feed.changes.push(change);
                }
            }
        }
        // The log is read up to what is applied (a tail of barriers holds no change).
        feed.next.log = feed.next.log.max(applied.log);
        let room = limit - feed.changes.len() + 1;
        for entry in journal.offline().read(feed.next.local + 1, room)? {
            let Ok((Placement::Offline(seq), _, change)) = entry else {
                continue;
            };
            if seq > applied.local {
                break;
            }
            if feed.changes.len() >= limit {
                feed.more = true;
                return Ok(feed);
            }
            feed.next.local = seq;
            feed.next.own = feed.next.own.max(Some(change.hlc));
            feed.changes.push(change);
        }
        Ok(feed)
    }
}
