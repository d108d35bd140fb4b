//! A bound, counted in changes, on the durable batches handed to the applier and not yet taken.
//!
//! A bounded channel counts batches, and a batch can hold one change (a live commit) or thousands
//! (a replicated segment during a catch-up). Counting changes bounds the memory of a catch-up
//! without making small live commits wait behind a few large batches.

use std::sync::{Condvar, Mutex, PoisonError};

/// Changes the writer may have handed over that the applier has not taken yet.
#[derive(Debug)]
pub struct ApplyBudget {
    state: Mutex<BudgetState>,
    freed: Condvar,
    max: u64,
}

#[derive(Debug, Default)]
struct BudgetState {
    queued: u64,
    closed: bool,
}

impl ApplyBudget {
    /// A budget of `max` changes.
    pub fn new(max: u64) -> Self {
        Self {
            state: Mutex::new(BudgetState::default()),
            freed: Condvar::new(),
            max,
        }
    }

    /// Writer side: waits until `n` more changes fit, then counts them. A batch is always let
    /// through when nothing is queued (it may be larger than the budget), and at once once the
    /// applier has [closed](Self::close) the budget.
    pub fn take(&self, n: u64) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        while !state.closed && state.queued > 0 && state.queued.saturating_add(n) > self.max {
            state = self
                .freed
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        state.queued = state.queued.saturating_add(n);
    }

    /// Applier side: `n` changes were taken off the queue.
    pub fn give_back(&self, n: u64) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.queued = state.queued.saturating_sub(n);
        drop(state);
        self.freed.notify_all();
    }

    /// Applier side: it stopped; the writer never waits again.
    pub fn close(&self) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.closed = true;
        drop(state);
        self.freed.notify_all();
    }

    /// Changes queued now.
    pub fn queued(&self) -> u64 {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .queued
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn the_writer_waits_for_room_but_never_when_the_queue_is_empty_or_closed() {
        let budget = Arc::new(ApplyBudget::new(10));
        budget.take(25); // larger than the budget, but nothing is queued
        assert_eq!(budget.queued(), 25);
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let writer = {
            let budget = budget.clone();
            std::thread::spawn(move || {
                budget.take(1);
                let _ = done_tx.send(());
            })
        };
        assert!(
            done_rx.recv_timeout(Duration::from_millis(100)).is_err(),
            "the writer waits while the queue is over budget"
        );
        budget.give_back(25);
        done_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("room made: the writer goes on");
        writer.join().expect("writer thread");
        assert_eq!(budget.queued(), 1);

        budget.take(9);
        budget.close();
        budget.take(1_000); // closed: never waits
        assert_eq!(budget.queued(), 1_010);
    }
}
