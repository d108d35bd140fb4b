//! The log scrub: a node reads its whole log now and then, a stretch at a time, checking every
//! record's checksum, seal and page binding, so that damage at rest (a bad sector, a flipped
//! bit, an edit) is found before a peer needs the record. A follower drops its log from the
//! first damaged record on and fetches it again from its leader (see
//! [`crate::Node::repair_log`]); a leader steps down first, and fetches from the next one.
//!
//! The same thread checks the log the node found on disk when it started (the start check,
//! [`crate::NodeOptions::check_log_at_start`]): at a brisker pace, since the
//! replica does not stand for election until it is done (see
//! `keel_replication::Replica::hold_until_checked`).

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use keel_engine::NodeLink;
use keel_schema::Lsn;

use crate::core::CoreEvent;
use crate::error::NodeError;
use crate::NodeStatus;

/// Records checked per stretch.
const STRETCH: usize = 8192;
/// The pause between stretches: the scrub reads about 80k records a second at most, so a
/// scrub of a large log stays in the background.
const PAUSE: Duration = Duration::from_millis(100);
/// The pause between stretches of the start check: it holds the replica from standing, so it
/// reads about 10 times faster than a scrub, still leaving the disk to the node between them.
const START_PAUSE: Duration = Duration::from_millis(10);
/// The first scrub starts this long after the node (or sooner if the period is shorter): not
/// while a join or a catch-up writes the log.
const FIRST_AFTER: Duration = Duration::from_secs(60);

/// How often a start check waiting for its device to stop leading looks again.
const LEADING_POLL: Duration = Duration::from_millis(100);

/// Starts the scrub thread: the start check of the log through `check_to`, if given, once the
/// device does not lead (at once, unless it resumed leading), and a pass every `every`, if
/// given, meanwhile and after; it stops when the returned sender is dropped. `status` tells it
/// whether the device leads.
pub(crate) fn start(
    link: Arc<NodeLink>,
    (core, status): (Sender<CoreEvent>, Arc<Mutex<NodeStatus>>),
    check_to: Option<Lsn>,
    every: Option<Duration>,
) -> Result<(Sender<()>, JoinHandle<()>), NodeError> {
    let (stop, stopped) = crossbeam_channel::bounded::<()>(1);
    let leading = move || {
        status
            .lock()
            .is_ok_and(|s| s.role == keel_replication::ElectionRole::Leader)
    };
    std::thread::Builder::new()
        .name("keel-scrub".into())
        .spawn(move || {
            let mut unchecked = check_to;
            let mut next = every.map(|every| Instant::now() + FIRST_AFTER.min(every));
            loop {
                if let Some(end) = unchecked.filter(|_| !leading()) {
                    unchecked = None;
                    match check_at_start(&link, &core, &stopped, end) {
                        Ok(true) => {
                            let _ = core.send(CoreEvent::LogChecked { through: end });
                        }
                        Ok(false) => return,
                        Err(error) => tracing::error!(
                            %error,
                            "the start check of the log stopped: this device does not stand \
                             for election until the node starts again"
                        ),
                    }
                    continue;
                }
                let wake = match (unchecked, next) {
                    (Some(_), Some(next)) => next.min(Instant::now() + LEADING_POLL),
                    (Some(_), None) => Instant::now() + LEADING_POLL,
                    (None, Some(next)) => next,
                    (None, None) => return,
                };
                if !wait_until(&stopped, wake) {
                    return;
                }
                if let (Some(due), Some(every)) = (next, every) {
                    if Instant::now() >= due {
                        scrub_once(&link, &core, &stopped);
                        next = Some(Instant::now() + every);
                    }
                }
            }
        })
        .map(|thread| (stop, thread))
        .map_err(|e| NodeError::Failed(format!("the scrub thread did not start: {e}")))
}

/// One periodic pass over the whole log, repairing the first damaged record it finds.
fn scrub_once(link: &NodeLink, core: &Sender<CoreEvent>, stopped: &Receiver<()>) {
    match pass(link, stopped, (Lsn(1), Lsn(u64::MAX)), PAUSE) {
        Ok(Some(damaged)) => repair(core, damaged),
        Ok(None) => {}
        Err(error) => tracing::warn!(%error, "the log scrub stopped"),
    }
}

/// The start check: reads the log through `end` (its end when the node started), repairing
/// each damaged record it meets (the log is cut there and fetched again, so what follows was
/// written by this run) and reading on after it. True when done; false if told to stop.
fn check_at_start(
    link: &NodeLink,
    core: &Sender<CoreEvent>,
    stopped: &Receiver<()>,
    end: Lsn,
) -> Result<bool, NodeError> {
    let started = Instant::now();
    let mut damages = 0u32;
    let mut from = Lsn(1);
    loop {
        match pass(link, stopped, (from, end), START_PAUSE)? {
            Some(damaged) if damages < MAX_REPAIRS_AT_START => {
                damages += 1;
                repair(core, damaged);
                from = damaged;
            }
            Some(damaged) => {
                return Err(NodeError::Failed(format!(
                    "log record {} is still damaged after {damages} repairs",
                    damaged.0
                )))
            }
            None if stopping(stopped) => return Ok(false),
            None => break,
        }
    }
    tracing::info!(
        through = end.0,
        damages,
        ms = started.elapsed().as_millis() as u64,
        "the log found at start is checked"
    );
    Ok(true)
}

/// Repairs the start check makes before it gives up (a disk that damages what it writes).
const MAX_REPAIRS_AT_START: u32 = 8;

/// Whether the thread was told to stop (its sender dropped).
fn stopping(stopped: &Receiver<()>) -> bool {
    !matches!(stopped.try_recv(), Err(TryRecvError::Empty))
}

/// Sleeps until `when`; false if told to stop meanwhile.
fn wait_until(stopped: &Receiver<()>, when: Instant) -> bool {
    let wait = when.saturating_duration_since(Instant::now());
    matches!(stopped.recv_timeout(wait), Err(RecvTimeoutError::Timeout))
}

/// One pass over the log from `from` through `end`, pausing `pause` between stretches: the
/// first damaged record, if any.
fn pass(
    link: &NodeLink,
    stopped: &Receiver<()>,
    (mut from, end): (Lsn, Lsn),
    pause: Duration,
) -> Result<Option<Lsn>, NodeError> {
    loop {
        let check = link.journal()?.check_log(from, STRETCH)?;
        if check.damaged.is_some() {
            return Ok(check.damaged);
        }
        let Some(next) = check.next.filter(|next| *next <= end) else {
            return Ok(None);
        };
        from = next;
        if !wait_until(stopped, Instant::now() + pause) {
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
