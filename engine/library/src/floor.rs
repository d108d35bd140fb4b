//! This device's clock floor: a clock that every change it will still push is at or after
//! (decision 0082). A leader collects the tombstones older than the least floor of every device
//! of the library (a [`keel_schema::Horizon`]), so a floor must never be above a change this
//! device could still push:
//!
//! - the changes in the offline journal (made here, not yet sequenced, or put back there by a
//!   truncation), each looked at;
//! - the changes of a commit that took its clock but has not reached the journal yet (in
//!   flight, registered before the clock is let go);
//! - every later change, whose clock comes after the clock's reading.
//!
//! With more than [`FLOOR_SCAN_MAX`] changes waiting in the offline journal, or one that cannot
//! be read, the floor is unknown and holds every collection back until they are sequenced.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use keel_schema::Hlc;

use crate::{EngineError, Library};

/// Most offline changes read for a floor; with more waiting, the floor is unknown.
pub(crate) const FLOOR_SCAN_MAX: usize = 1024;

/// The commits that took their clock and are not in the journal yet, and what the offline
/// journal held when last read.
#[derive(Default)]
pub(crate) struct FloorState {
    next: AtomicU64,
    commits: Mutex<HashMap<u64, Hlc>>,
    /// The offline journal's oldest clock, for its extent when it was read.
    waiting: Mutex<Option<(Extent, Waiting)>>,
}

/// The offline journal's record count and last sequence number (see
/// [`keel_journal::OfflineJournal::extent`]).
type Extent = (u64, Option<u64>);

/// What the offline journal holds, for a floor.
#[derive(Clone, Copy, Debug)]
enum Waiting {
    /// Nothing.
    None,
    /// Changes, the oldest with this clock.
    Oldest(Hlc),
    /// Too many to read, or one unreadable.
    Unknown,
}

impl FloorState {
    /// Registers a commit whose oldest change has clock `oldest`, until the ticket is dropped.
    pub(crate) fn begin(&self, oldest: Option<Hlc>) -> Ticket<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        if let (Some(oldest), Ok(mut commits)) = (oldest, self.commits.lock()) {
            commits.insert(id, oldest);
        }
        Ticket {
            in_flight: self,
            id,
        }
    }

    /// The oldest clock in flight; `Err` if the lock is poisoned.
    fn oldest(&self) -> Result<Option<Hlc>, EngineError> {
        let commits = self.commits.lock().map_err(|_| EngineError::Closed)?;
        Ok(commits.values().min().copied())
    }
}

/// A commit in flight (see [`FloorState::begin`]); dropped once its changes are in the journal
/// or the log, or failed.
#[derive(Debug)]
pub(crate) struct Ticket<'a> {
    in_flight: &'a FloorState,
    id: u64,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if let Ok(mut commits) = self.in_flight.commits.lock() {
            commits.remove(&self.id);
        }
    }
}

impl std::fmt::Debug for FloorState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FloorState")
    }
}

/// The least clock after `hlc` (by milliseconds and counter, as a floor compares).
fn after(hlc: Hlc) -> Hlc {
    match hlc.counter.checked_add(1) {
        Some(counter) => Hlc { counter, ..hlc },
        None => Hlc {
            physical_ms: hlc.physical_ms.saturating_add(1),
            counter: 0,
            ..hlc
        },
    }
}

impl Library {
    /// This device's clock floor (see the module docs): no change it will still push is
    /// older. `None` when it cannot tell (too many changes waiting in the offline journal, or one
    /// unreadable).
    pub fn clock_floor(&self) -> Result<Option<Hlc>, EngineError> {
        // In this order: a commit that took its clock before the reading is registered in
        // flight until its changes are in the journal, so it is seen in one place or the other.
        // Every later change ticks past the reading.
        let reading = after(self.clock()?.last());
        let in_flight = self.shared.floor.oldest()?;
        let floor = in_flight.map_or(reading, |c| c.min(reading));
        Ok(match self.oldest_waiting()? {
            Waiting::Unknown => None,
            Waiting::None => Some(floor),
            Waiting::Oldest(oldest) => Some(floor.min(oldest)),
        })
    }

    /// The oldest clock in the offline journal, read again only when it changed (see
    /// [`keel_journal::OfflineJournal::extent`]).
    fn oldest_waiting(&self) -> Result<Waiting, EngineError> {
        let offline = self.journal()?.offline();
        let extent = offline.extent()?;
        let mut cached = self
            .shared
            .floor
            .waiting
            .lock()
            .map_err(|_| EngineError::Closed)?;
        if let Some((at, waiting)) = *cached {
            if at == extent {
                return Ok(waiting);
            }
        }
        let entries = offline.read(0, FLOOR_SCAN_MAX + 1)?;
        let waiting = if entries.len() > FLOOR_SCAN_MAX {
            Waiting::Unknown
        } else {
            let mut oldest = Waiting::None;
            for entry in entries {
                let Ok((_, _, change)) = entry else {
                    oldest = Waiting::Unknown;
                    break;
                };
                oldest = match oldest {
                    Waiting::Oldest(o) => Waiting::Oldest(o.min(change.hlc)),
                    _ => Waiting::Oldest(change.hlc),
                };
            }
            oldest
        };
        *cached = Some((extent, waiting));
        Ok(waiting)
    }
}

impl Library {
    /// While the running node leads: appends a [`keel_schema::Horizon`] at `bound` to the log,
    /// which has every device collect the tombstones older than it where it applies it. The
    /// caller (the node) took `bound` from every device's floor. `false` when the node does
    /// not lead (nothing is written: a horizon is never pushed, and a leader refuses one).
    pub fn append_horizon(&self, bound: Hlc) -> Result<bool, EngineError> {
        let horizon = keel_schema::Horizon {
            uuid: uuid::Uuid::now_v7(),
            before_ms: i64::try_from(bound.physical_ms).unwrap_or(i64::MAX),
            before_counter: i64::from(bound.counter),
        };
        let change = {
            let mut clock = self.clock()?;
            let hlc = clock.tick(crate::library::now_ms());
            keel_schema::Change::upsert(keel_schema::ChangeId::new(), hlc, &horizon).ok_or_else(
                || keel_schema::SchemaError::Malformed("a horizon without a uuid".into()),
            )?
        };
        Ok(self.sequence_as_leader(&[change])?.is_some())
    }
}
