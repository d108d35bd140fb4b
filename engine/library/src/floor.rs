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
    /// One past the clock's last reading taken for a floor: still a floor's bound later (every
    /// later tick passes it), used while a transaction holds the clock.
    reading: Mutex<Option<Hlc>>,
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
        let Some(reading) = self.clock_reading()? else {
            return Ok(None);
        };
        let in_flight = self.shared.floor.oldest()?;
        let floor = in_flight.map_or(reading, |c| c.min(reading));
        Ok(match self.oldest_waiting()? {
            Waiting::Unknown => None,
            Waiting::None => Some(floor),
            Waiting::Oldest(oldest) => Some(floor.min(oldest)),
        })
    }

    /// One past the clock's reading. While a transaction holds the clock (its closure may run
    /// for a while), the last reading taken instead: the replication core, which asks for a
    /// floor with each acknowledgement, never waits on a host's closure. `None` before any.
    fn clock_reading(&self) -> Result<Option<Hlc>, EngineError> {
        let mut last = self
            .shared
            .floor
            .reading
            .lock()
            .map_err(|_| EngineError::Closed)?;
        if let Some(clock) = self.clock_if_free()? {
            *last = Some(after(clock.last()));
        }
        Ok(*last)
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::{CreateOptions, Home, KdfParams, Library};

    /// The replication core asks for a floor with each acknowledgement: it must not wait while
    /// a host's transaction holds the clock through its closure, and the last reading it gets
    /// meanwhile is still a floor.
    #[test]
    fn a_floor_does_not_wait_for_a_transaction_that_holds_the_clock(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let options = CreateOptions {
            kdf: KdfParams::INSECURE_FAST,
        };
        let lib = Library::create(&Home::new(dir.path().join("home")), "floor", "pw", options)?;
        let before = lib.clock_floor()?.ok_or("a floor")?;
        let (started, holding) = crossbeam_channel::bounded(1);
        let (release, released) = crossbeam_channel::bounded::<()>(1);
        let (answer, floor) = crossbeam_channel::bounded(1);
        std::thread::scope(|s| {
            let lib = &lib;
            let writer = s.spawn(move || {
                lib.transact(|tx| {
                    let _ = started.send(());
                    let _ = released.recv();
                    tx.upsert(&keel_schema::Tag {
                        uuid: keel_schema::tag_uuid(lib.id().0, "held"),
                        name: "held".into(),
                        color: None,
                        created_ms: 1,
                    });
                    Ok(())
                })
                .map(|_| ())
            });
            let _ = holding.recv_timeout(Duration::from_secs(10));
            s.spawn(move || {
                let _ = answer.send(lib.clock_floor().ok().flatten());
            });
            let during = floor.recv_timeout(Duration::from_secs(5));
            let _ = release.send(());
            assert_eq!(during, Ok(Some(before)), "the last reading, at once");
            assert!(writer.join().is_ok_and(|r| r.is_ok()));
        });
        assert!(lib.clock_floor()?.ok_or("a floor")? > before);
        Ok(())
    }
}
