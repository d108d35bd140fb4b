//! Storage faults for tests (feature `faults`): a redb backend that makes the Nth write, sync
//! or resize of a journal file fail, once or until cleared, with `ENOSPC` or `EIO`.
//!
//! A test registers a plan for a journal's path with [`inject`] before the journal opens (a
//! node opens its library's journal itself); every open of that path then goes through
//! [`Faulty`], below the zero-filling of growth, where the disk would fail. Nothing is faked
//! above it: redb, the file and the engine are the real ones.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use redb::StorageBackend;

/// A backend call that can be made to fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultOp {
    /// `write`.
    Write,
    /// `sync_data`.
    Sync,
    /// `set_len`.
    SetLen,
}

/// The error a failing call returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// The disk is full (`ENOSPC`).
    NoSpace,
    /// The device failed (`EIO`).
    Io,
}

impl FaultKind {
    fn error(self) -> io::Error {
        match self {
            // Linux and macOS share both numbers.
            FaultKind::NoSpace => io::Error::from_raw_os_error(28),
            FaultKind::Io => io::Error::from_raw_os_error(5),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Plan {
    op: FaultOp,
    kind: FaultKind,
    /// Calls of `op` still to succeed before one fails.
    after: u64,
    /// Every call of `op` fails once the first did, until [`Faults::clear`].
    persistent: bool,
    /// The first failure happened.
    tripped: bool,
}

/// One call that changed the file, as recorded (see [`Faults::record`]).
#[derive(Debug, Clone)]
enum Op {
    Write {
        offset: u64,
        data: Vec<u8>,
    },
    SetLen(u64),
    Sync,
    /// The file appears at its path (built aside and renamed there, the folder synced): before
    /// it, a power loss leaves no file at the path.
    Appear,
}

/// The faults planned for one journal file; shared by the test and the backend.
#[derive(Debug, Default)]
pub struct Faults {
    plan: Mutex<Option<Plan>>,
    injected: AtomicU64,
    /// Every write, resize and sync that went through, once [`Faults::record`] was called.
    recorded: Mutex<Option<Vec<Op>>>,
    syncs: AtomicU64,
}

/// What a power loss leaves of the writes made since the last sync (see
/// [`Faults::crash_image`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerLoss {
    /// Only what was synced.
    SyncedOnly,
    /// What was synced, and each later write or resize with even odds (`seed` picks which).
    SomeUnsynced {
        /// Picks the writes that made it.
        seed: u64,
    },
    /// What was synced and every later write, the last one torn after this many bytes.
    TornLast {
        /// Bytes of the last write that made it.
        bytes: usize,
    },
}

impl Faults {
    /// No fault planned yet.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// From now on: `after` more calls of `op` succeed, then one fails with `kind`; with
    /// `persistent`, every later call of `op` fails too, until [`Faults::clear`].
    pub fn fail(&self, op: FaultOp, after: u64, kind: FaultKind, persistent: bool) {
        if let Ok(mut plan) = self.plan.lock() {
            *plan = Some(Plan {
                op,
                kind,
                after,
                persistent,
                tripped: false,
            });
        }
    }

    /// Lets every call through again (the disk has room, the device recovered).
    pub fn clear(&self) {
        if let Ok(mut plan) = self.plan.lock() {
            *plan = None;
        }
    }

    /// How many calls failed so far.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::SeqCst)
    }

    /// Starts recording every write, resize and sync of the file from its creation (call it
    /// before the journal creates the file).
    pub fn record(&self) {
        if let Ok(mut recorded) = self.recorded.lock() {
            *recorded = Some(Vec::new());
        }
    }

    /// Syncs that completed so far.
    pub fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::SeqCst)
    }

    /// The file a power loss right after the `n`th sync (0: before the first) would leave,
    /// with `loss` deciding what of the writes after it reached the disk; `None` past the last
    /// sync recorded.
    ///
    /// An empty image: no file at the path yet (the journal is built aside and appears there
    /// only once redb has initialised it).
    pub fn crash_image(&self, n: u64, loss: PowerLoss) -> Option<Vec<u8>> {
        let recorded = self.recorded.lock().ok()?;
        let ops = recorded.as_ref()?;
        let mut image = Vec::new();
        let mut synced = 0u64;
        let mut at = 0usize;
        let mut appeared = !ops.iter().any(|op| matches!(op, Op::Appear));
        while synced < n {
            let op = ops.get(at)?;
            at += 1;
            match op {
                Op::Sync => synced += 1,
                Op::Appear => appeared = true,
                other => apply(&mut image, other, usize::MAX),
            }
        }
        if !appeared {
            return Some(Vec::new());
        }
        let pending: Vec<&Op> = ops[at..]
            .iter()
            .take_while(|op| !matches!(op, Op::Sync))
            .collect();
        match loss {
            PowerLoss::SyncedOnly => {}
            PowerLoss::SomeUnsynced { seed } => {
                let mut state = seed | 1;
                for op in pending {
                    // xorshift: the same seed picks the same writes.
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    if state & 1 == 1 {
                        apply(&mut image, op, usize::MAX);
                    }
                }
            }
            PowerLoss::TornLast { bytes } => {
                let last = pending.len().checked_sub(1);
                for (i, op) in pending.into_iter().enumerate() {
                    let limit = if Some(i) == last { bytes } else { usize::MAX };
                    apply(&mut image, op, limit);
                }
            }
        }
        Some(image)
    }

    /// Records that the file appeared at its path (see [`Op::Appear`]).
    pub(crate) fn appeared(&self) {
        self.note(Op::Appear);
    }

    fn note(&self, op: Op) {
        if let Ok(mut recorded) = self.recorded.lock() {
            if let Some(ops) = recorded.as_mut() {
                ops.push(op);
            }
        }
    }

    /// Whether this call of `op` fails, and with what.
    fn check(&self, op: FaultOp) -> Result<(), io::Error> {
        let Ok(mut guard) = self.plan.lock() else {
            return Ok(());
        };
        let Some(plan) = guard.as_mut().filter(|p| p.op == op) else {
            return Ok(());
        };
        if plan.tripped && !plan.persistent {
            return Ok(());
        }
        if !plan.tripped && plan.after > 0 {
            plan.after -= 1;
            return Ok(());
        }
        plan.tripped = true;
        self.injected.fetch_add(1, Ordering::SeqCst);
        Err(plan.kind.error())
    }
}

/// Applies `op` to `image`, writing at most `limit` bytes of a write.
fn apply(image: &mut Vec<u8>, op: &Op, limit: usize) {
    match op {
        Op::Write { offset, data } => {
            let Ok(start) = usize::try_from(*offset) else {
                return;
            };
            let data = &data[..data.len().min(limit)];
            let end = start + data.len();
            if image.len() < end {
                image.resize(end, 0);
            }
            image[start..end].copy_from_slice(data);
        }
        Op::SetLen(len) => image.resize(usize::try_from(*len).unwrap_or(usize::MAX), 0),
        Op::Sync | Op::Appear => {}
    }
}

/// The plans registered by path (the file's folder made canonical, and its name).
static PLANS: Mutex<Vec<(PathBuf, Arc<Faults>)>> = Mutex::new(Vec::new());

/// `path` with its longest existing ancestor made canonical (a test registers a path before
/// the library's folder exists).
fn key(path: &Path) -> PathBuf {
    let mut rest = Vec::new();
    let mut at = path;
    loop {
        if let Ok(real) = at.canonicalize() {
            return rest.iter().rev().fold(real, |p, part| p.join(part));
        }
        match (at.parent(), at.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                at = parent;
            }
            _ => return path.to_path_buf(),
        }
    }
}

/// Makes every open of the journal file at `path` (from now on) go through `faults`.
pub fn inject(path: &Path, faults: Arc<Faults>) {
    let key = key(path);
    if let Ok(mut plans) = PLANS.lock() {
        plans.retain(|(p, _)| *p != key);
        plans.push((key, faults));
    }
}

/// The faults registered for `path`, if any.
pub(crate) fn planned_for(path: &Path) -> Option<Arc<Faults>> {
    let key = key(path);
    PLANS
        .lock()
        .ok()?
        .iter()
        .find(|(p, _)| *p == key)
        .map(|(_, f)| f.clone())
}

/// A backend whose calls fail as its [`Faults`] plan.
#[derive(Debug)]
pub(crate) struct Faulty<B> {
    inner: B,
    faults: Arc<Faults>,
}

impl<B> Faulty<B> {
    pub(crate) fn new(inner: B, faults: Arc<Faults>) -> Self {
        Self { inner, faults }
    }
}

impl<B: StorageBackend> StorageBackend for Faulty<B> {
    fn len(&self) -> Result<u64, io::Error> {
        self.inner.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        self.inner.read(offset, out)
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        self.faults.check(FaultOp::SetLen)?;
        self.inner.set_len(len)?;
        self.faults.note(Op::SetLen(len));
        Ok(())
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        self.faults.check(FaultOp::Sync)?;
        self.inner.sync_data()?;
        self.faults.note(Op::Sync);
        self.faults.syncs.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        self.faults.check(FaultOp::Write)?;
        self.inner.write(offset, data)?;
        self.faults.note(Op::Write {
            offset,
            data: data.to_vec(),
        });
        Ok(())
    }

    fn close(&self) -> Result<(), io::Error> {
        self.inner.close()
    }

    crate::backends::forward_range_locks!();
}
