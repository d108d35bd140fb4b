//! The log scrub: a node reads its whole log now and then, a stretch at a time, checking every
//! record's checksum, seal and page binding, so that damage at rest (a bad sector, a flipped
//! bit, an edit) is found before a peer needs the record. A follower drops its log from the
//! first damaged record on and fetches it again from its leader (see
//! [`crate::Node::repair_log`]); a leader steps down first, and fetches from the next one.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use keel_engine::NodeLink;
use keel_schema::Lsn;

use crate::core::CoreEvent;
use crate::error::NodeError;

/// Records checked per stretch.
const STRETCH: usize = 8192;
/// The pause between stretches: the scrub reads about 80k records a second at most, so a
/// scrub of a large log stays in the background.
const PAUSE: Duration = Duration::from_millis(100);
/// The first scrub starts this long after the node (or sooner if the period is shorter): not
/// while a join or a catch-up writes the log.
const FIRST_AFTER: Duration = Duration::from_secs(60);

/// Starts the scrub thread: a pass every `every`; it stops when the returned sender is
/// dropped.
pub(crate) fn start(
    link: Arc<NodeLink>,
    core: Sender<CoreEvent>,
    every: Duration,
) -> Result<(Sender<()>, JoinHandle<()>), NodeError> {
    let (stop, stopped) = crossbeam_channel::bounded::<()>(1);
    std::thread::Builder::new()
        .name("keel-scrub".into())
        .spawn(move || {
            let mut next = Instant::now() + FIRST_AFTER.min(every);
            while wait_until(&stopped, next) {
                match pass(&link, &stopped) {
                    Ok(Some(damaged)) => repair(&core, damaged),
                    Ok(None) => {}
                    Err(error) => tracing::warn!(%error, "the log scrub stopped"),
                }
                next = Instant::now() + every;
            }
        })
        .map(|thread| (stop, thread))
        .map_err(|e| NodeError::Failed(format!("the scrub thread did not start: {e}")))
}

/// Sleeps until `when`; false if told to stop meanwhile.
fn wait_until(stopped: &Receiver<()>, when: Instant) -> bool {
    let wait = when.saturating_duration_since(Instant::now());
    matches!(stopped.recv_timeout(wait), Err(RecvTimeoutError::Timeout))
}

/// One pass over the log: the first damaged record, if any.
fn pass(link: &NodeLink, stopped: &Receiver<()>) -> Result<Option<Lsn>, NodeError> {
    let mut from = Lsn(1);
    loop {
        let check = link.journal()?.check_log(from, STRETCH)?;
        if check.damaged.is_some() {
            return Ok(check.damaged);
        }
        let Some(next) = check.next else {
            return Ok(None);
        };
        from = next;
        if !wait_until(stopped, Instant::now() + PAUSE) {
            return Ok(None);
        }
    }
}

/// Asks the core to fetch the log again from `damaged` on.
fn repair(core: &Sender<CoreEvent>, damaged: Lsn) {
    tracing::warn!(at = damaged.0, "the log scrub found a damaged record");
    let (reply, answer) = crossbeam_channel::bounded(1);
    if core.send(CoreEvent::RepairLog { damaged, reply }).is_err() {
        return;
    }
    match answer.recv() {
        Ok(Ok(Some(from))) => tracing::info!(from, "the damaged log is fetched again"),
        Ok(Ok(None)) => {}
        Ok(Err(error)) => tracing::error!(%error, "a damaged log record cannot be fetched again"),
        Err(_) => {}
    }
}
