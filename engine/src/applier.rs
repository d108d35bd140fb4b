//! The applier thread: applies each durable batch from the journal writer to the projections,
//! records the applied position in the same SQLite transaction, and publishes events.

use std::sync::{Arc, Condvar, Mutex};

use crossbeam_channel::Receiver;
use keel_journal::{CommittedBatch, Placement};
use keel_projections::{AppliedPosition, Projections};
use keel_schema::{Change, ChangeId};
use tokio::sync::broadcast;

use crate::events::{ChangeKind, Event, EVENT_RECORDS_MAX};

/// Most changes applied in one SQLite transaction by the applier.
pub const APPLY_GROUP_MAX: usize = 65_536;

/// State shared by the library and its applier thread.
pub(crate) struct Shared {
    /// The writing connection: the applier, heal and rebuild.
    pub(crate) projections: Mutex<Projections>,
    /// A query-only connection for host-app reads, so they never wait for an apply.
    pub(crate) reader: Mutex<Projections>,
    pub(crate) applied: Mutex<ApplyState>,
    pub(crate) applied_changed: Condvar,
    pub(crate) events: broadcast::Sender<Event>,
    /// Where to announce this device's changes committed to the offline journal (the replication
    /// runtime pushes them to a leader).
    pub(crate) local_commits: Mutex<Option<crossbeam_channel::Sender<Vec<ChangeId>>>>,
}

/// Where the applier is.
#[derive(Debug, Default, Clone)]
pub(crate) struct ApplyState {
    pub(crate) position: AppliedPosition,
    /// The number of the last journal batch handled (see `Journal::batches_sent`).
    pub(crate) batch: u64,
    pub(crate) error: Option<String>,
}

pub(crate) fn advance(position: &mut AppliedPosition, placement: Placement) {
    match placement {
        Placement::Log(lsn) => position.log = position.log.max(lsn),
        Placement::Local(seq) => position.local = position.local.max(seq),
    }
}

fn announce_local(shared: &Shared, entries: &[(Placement, Change)]) {
    let Ok(mut slot) = shared.local_commits.lock() else {
        return;
    };
    let Some(tx) = slot.as_ref() else { return };
    let ids: Vec<ChangeId> = entries
        .iter()
        .filter(|(p, _)| matches!(p, Placement::Local(_)))
        .map(|(_, c)| c.id)
        .collect();
    if !ids.is_empty() && tx.send(ids).is_err() {
        *slot = None;
    }
}

/// Runs until the journal writer stops (its sender is dropped).
pub(crate) fn run(shared: Arc<Shared>, batches: Receiver<CommittedBatch>) {
    while let Ok(first) = batches.recv() {
        let mut entries = first.entries;
        let mut seq = first.seq;
        while entries.len() < APPLY_GROUP_MAX {
            match batches.try_recv() {
                Ok(more) => {
                    entries.extend(more.entries);
                    seq = seq.max(more.seq);
                }
                Err(_) => break,
            }
        }
        announce_local(&shared, &entries);
        let mut position = match shared.applied.lock() {
            Ok(state) => state.position,
            Err(_) => return,
        };
        for (placement, _) in &entries {
            advance(&mut position, *placement);
        }
        let changes: Vec<Change> = entries.into_iter().map(|(_, c)| c).collect();
        let result = match shared.projections.lock() {
            Ok(mut p) => p.apply(&changes, Some(position)),
            Err(_) => return,
        };
        let Ok(mut state) = shared.applied.lock() else {
            return;
        };
        state.batch = state.batch.max(seq);
        match result {
            Ok(_) => {
                state.position = position;
                if shared.events.receiver_count() > 0 {
                    let records = changes
                        .iter()
                        .take(EVENT_RECORDS_MAX)
                        .filter_map(|c| {
                            Some((c.model_def()?.name, c.record, ChangeKind::of(&c.op)))
                        })
                        .collect();
                    let _ = shared.events.send(Event::RecordsChanged {
                        records,
                        total: changes.len(),
                        applied: position.log,
                    });
                }
            }
            Err(e) => {
                let reason = e.to_string();
                tracing::error!(%reason, "applying to the projections failed; they will be healed from the journal on next open");
                state.error = Some(reason.clone());
                let _ = shared.events.send(Event::ApplyFailed { reason });
            }
        }
        drop(state);
        shared.applied_changed.notify_all();
    }
}
