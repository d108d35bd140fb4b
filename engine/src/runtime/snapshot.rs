//! Initial sync by snapshot: a device that has just joined fetches the log and a copy of the
//! projections from the device it paired with, instead of replaying the whole log.
//!
//! The sender copies its projection file with SQLite's online backup (one read transaction, while
//! its applier goes on) and ships it with its log from position 1, interleaving log segments and
//! file chunks so the receiver stores the log while the file arrives. The receiver appends the
//! log verbatim to its journal (one thread, contiguous and checked, as for any segment), writes
//! the file beside its projection, checks its hash, and installs it only once the log it has
//! applied is stored: until then the library is a valid follower with a shorter log, and an
//! interrupted fetch leaves nothing worse than a slower catch-up.

use std::io::{Read, Seek, SeekFrom, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use keel_journal::{Journal, JournalOptions, LibraryKey, Role};
use keel_projections::Projections;
use keel_schema::{DeviceId, Epoch, LibraryId, Lsn};
use keel_transport::{
    Connection, DeviceMessage, Endpoint, Pins, WireLogEntry, RECORDS_PER_MESSAGE_MAX,
    SNAPSHOT_CHUNK_MAX,
};
use serde_bytes::ByteBuf;

use crate::error::{io_at, EngineError};
use crate::library::{Library, JOURNAL_FILE, PROJECTIONS_FILE};

/// How long either side waits for the next message.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// Log segments queued for the journal on the receiving side (each up to 16,384 entries).
const SEGMENTS_QUEUED: usize = 4;
/// Most log entries appended in one journal transaction on the receiving side.
const APPEND_BATCH: usize = 131_072;
/// Suffix of the sender's scratch copies (removed when a node starts).
pub(crate) const SCRATCH_SUFFIX: &str = ".snapshot-out";
/// Name of the receiver's incoming file, beside the projection.
const INCOMING_FILE: &str = "projections.sqlite.incoming";

/// How far a snapshot fetch has come (sent to [`crate::runtime::JoinOptions::progress`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JoinProgress {
    /// Log entries stored here.
    pub log_stored: u64,
    /// Log entries to store (the sender's log end).
    pub log_total: u64,
    /// Bytes of the projection file received.
    pub file_received: u64,
    /// Size of the projection file (0 until the sender has copied it).
    pub file_total: u64,
    /// Bytes received on the connection so far.
    pub bytes: u64,
}

/// What a finished snapshot fetch did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotOutcome {
    /// Log entries stored.
    pub log_entries: u64,
    /// The log position the installed projection has applied.
    pub applied: Lsn,
    /// Size of the projection file.
    pub file_bytes: u64,
    /// How long it took.
    pub elapsed: Duration,
}

/// Removes the sender's scratch copies a stopped node left behind.
pub(crate) fn remove_scratch(dir: &Path) {
    let Ok(read) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in read.flatten() {
        if entry
            .file_name()
            .to_string_lossy()
            .ends_with(SCRATCH_SUFFIX)
        {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Removes a file when dropped.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
        let mut journal = self.0.clone().into_os_string();
        journal.push("-journal");
        let _ = std::fs::remove_file(journal);
    }
}

fn node_error(what: impl std::fmt::Display) -> EngineError {
    EngineError::Node(format!("snapshot: {what}"))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, EngineError> + Send + 'static,
) -> Result<T, EngineError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| node_error(format!("worker failed: {e}")))?
}

/// The sending side: answers a [`DeviceMessage::SnapshotRequest`] on `conn`, then waits for the
/// receiver to close the connection.
pub(crate) async fn serve(library: Weak<Library>, epoch: Epoch, conn: Connection) {
    let peer = conn.peer();
    let started = Instant::now();
    match send(library, epoch, &conn).await {
        Ok((entries, bytes)) => {
            tracing::info!(
                peer = %peer.short(),
                log_entries = entries,
                file_bytes = bytes,
                ms = started.elapsed().as_millis() as u64,
                "snapshot sent"
            );
            // The receiver closes once it has everything.
            let _ = tokio::time::timeout(STEP_TIMEOUT, conn.recv()).await;
        }
        Err(e) => {
            tracing::warn!(peer = %peer.short(), error = %e, "snapshot not sent");
            conn.close("snapshot failed");
        }
    }
}

/// The projection file being sent.
struct Outgoing {
    file: std::fs::File,
    len: u64,
    offset: u64,
    hasher: blake3::Hasher,
    _scratch: Scratch,
}

async fn send(
    library: Weak<Library>,
    epoch: Epoch,
    conn: &Connection,
) -> Result<(u64, u64), EngineError> {
    let (dir, mut target) = {
        let lib = library.upgrade().ok_or(EngineError::Closed)?;
        let end = lib.journal()?.stats()?.last_lsn;
        (lib.dir().to_path_buf(), end)
    };
    let scratch = dir.join(format!("{:016x}{SCRATCH_SUFFIX}", rand::random::<u64>()));
    let copy = {
        let (src, dest) = (dir.join(PROJECTIONS_FILE), scratch.clone());
        tokio::task::spawn_blocking(move || Projections::snapshot(&src, &dest))
    };
    let mut copy = Some(copy);
    let mut scratch = Some(Scratch(scratch));
    let mut next = 1u64;
    let mut prev_epoch = Epoch::default();
    let mut outgoing: Option<Outgoing> = None;
    loop {
        if next <= target.0 {
            let (from, limit) = (Lsn(next), (target.0 - next + 1) as usize);
            let weak = library.clone();
            let entries = blocking(move || {
                let lib = weak.upgrade().ok_or(EngineError::Closed)?;
                Ok(lib
                    .journal()?
                    .log_entries(from, limit.min(RECORDS_PER_MESSAGE_MAX))?)
            })
            .await?;
            let Some(&(last, last_epoch, _)) = entries.last() else {
                return Err(node_error(format!("the log ends before {}", from.0)));
            };
            let message = DeviceMessage::SyncLogSegment {
                epoch,
                first: from,
                prev_epoch,
                leader_end: target,
                entries: entries
                    .into_iter()
                    .map(|(_, epoch, sealed)| WireLogEntry {
                        epoch,
                        sealed: ByteBuf::from(sealed),
                    })
                    .collect(),
            };
            conn.send(&message).await?;
            next = last.0 + 1;
            prev_epoch = last_epoch;
        }
        if outgoing.is_none()
            && copy
                .as_ref()
                .is_some_and(|c| c.is_finished() || next > target.0)
        {
            let Some(handle) = copy.take() else {
                continue;
            };
            let applied = handle
                .await
                .map_err(|e| node_error(format!("copy failed: {e}")))??;
            let Some(scratch) = scratch.take() else {
                continue;
            };
            let file = std::fs::File::open(&scratch.0).map_err(io_at(&scratch.0))?;
            let len = file.metadata().map_err(io_at(&scratch.0))?.len();
            // The log must reach what the copy has applied.
            target = target.max(applied.log);
            conn.send(&DeviceMessage::SnapshotBegin {
                epoch,
                applied: applied.log,
                log_end: target,
                file_bytes: len,
            })
            .await?;
            outgoing = Some(Outgoing {
                file,
                len,
                offset: 0,
                hasher: blake3::Hasher::new(),
                _scratch: scratch,
            });
        }
        if let Some(out) = outgoing.as_mut() {
            if out.offset < out.len {
                let size = (out.len - out.offset).min(SNAPSHOT_CHUNK_MAX as u64) as usize;
                let mut data = vec![0u8; size];
                out.file
                    .read_exact(&mut data)
                    .map_err(|e| node_error(format!("reading the copy: {e}")))?;
                out.hasher.update(&data);
                let offset = out.offset;
                out.offset += size as u64;
                conn.send(&DeviceMessage::SnapshotChunk {
                    offset,
                    data: ByteBuf::from(data),
                })
                .await?;
            } else if next > target.0 {
                let hash = out.hasher.finalize();
                conn.send(&DeviceMessage::SnapshotEnd {
                    file_hash: ByteBuf::from(hash.as_bytes().to_vec()),
                })
                .await?;
                return Ok((target.0, out.len));
            }
        }
    }
}

/// Fetches a snapshot from `addr` (a device of `library` that pinned this one) into the library
/// folder `dir`, whose journal must hold no log yet: stores the log, then installs the projection.
/// `progress` hears how far it has come.
pub(crate) async fn fetch(
    identity: &keel_transport::Identity,
    peer: DeviceId,
    addr: SocketAddr,
    library: LibraryId,
    key: &LibraryKey,
    dir: &Path,
    progress: Option<tokio::sync::mpsc::UnboundedSender<JoinProgress>>,
) -> Result<SnapshotOutcome, EngineError> {
    let started = Instant::now();
    let bind = if addr.is_ipv4() {
        SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        SocketAddr::from(([0u16; 8], 0))
    };
    let pins = Pins::new();
    pins.pin(peer);
    let endpoint = Endpoint::bind(identity, bind, pins)?;
    let conn = tokio::time::timeout(STEP_TIMEOUT, endpoint.connect(addr))
        .await
        .map_err(|_| node_error(format!("no answer from {addr}")))??;
    let journal = Journal::open(
        &dir.join(JOURNAL_FILE),
        library,
        key,
        identity.device(),
        JournalOptions {
            role: Some(Role::Follower),
            ..JournalOptions::default()
        },
    )?;
    let result = receive(&conn, library, journal, dir, progress).await;
    conn.close("snapshot received");
    endpoint.close();
    let incoming = dir.join(INCOMING_FILE);
    let (log_entries, file_bytes) = match result {
        Ok(done) => done,
        Err(e) => {
            let _ = Projections::remove_files(&incoming);
            return Err(e);
        }
    };
    let dest = dir.join(PROJECTIONS_FILE);
    tracing::debug!("snapshot: installing");
    let applied = blocking(move || {
        let applied = Projections::install_snapshot(&incoming, &dest);
        if applied.is_err() {
            let _ = Projections::remove_files(&incoming);
        }
        Ok(applied?)
    })
    .await?;
    if applied.0 > log_entries {
        return Err(node_error(format!(
            "the projection has applied {} but the log ends at {log_entries}",
            applied.0
        )));
    }
    Ok(SnapshotOutcome {
        log_entries,
        applied,
        file_bytes,
        elapsed: started.elapsed(),
    })
}

/// The receiving side's state for the projection file.
struct Incoming {
    file: std::fs::File,
    len: u64,
    written: u64,
    hasher: blake3::Hasher,
    log_end: Lsn,
}

async fn receive(
    conn: &Connection,
    library: LibraryId,
    journal: Journal,
    dir: &Path,
    progress: Option<tokio::sync::mpsc::UnboundedSender<JoinProgress>>,
) -> Result<(u64, u64), EngineError> {
    let hello = tokio::time::timeout(STEP_TIMEOUT, conn.recv())
        .await
        .map_err(|_| node_error("no Hello"))??;
    let log_total = match hello {
        DeviceMessage::Hello {
            library: l,
            log_end,
            ..
        } if l == library => log_end.0,
        _ => return Err(node_error("expected Hello for this library")),
    };
    conn.send(&DeviceMessage::SnapshotRequest { library })
        .await?;
    if journal.stats()?.last_lsn != Lsn(0) {
        return Err(node_error("this device's log is not empty"));
    }
    // The journal thread: appends segments in order, several per transaction.
    let stored = Arc::new(AtomicU64::new(0));
    let (segments, queue) =
        crossbeam_channel::bounded::<(Lsn, Vec<(Epoch, Vec<u8>)>)>(SEGMENTS_QUEUED);
    let appender = {
        let stored = stored.clone();
        std::thread::Builder::new()
            .name("keel-snapshot-log".into())
            .spawn(move || -> Result<(), EngineError> {
                while let Ok((first, mut entries)) = queue.recv() {
                    while entries.len() < APPEND_BATCH {
                        match queue.try_recv() {
                            Ok((_, more)) => entries.extend(more),
                            Err(_) => break,
                        }
                    }
                    let n = entries.len() as u64;
                    journal.append_replicated(first, entries)?;
                    stored.store(first.0 + n - 1, Ordering::Release);
                }
                journal.close();
                Ok(())
            })
            .map_err(io_at(dir))?
    };
    let incoming_path = dir.join(INCOMING_FILE);
    let mut incoming: Option<Incoming> = None;
    let mut next = 1u64;
    let mut bytes = 0u64;
    let report = |incoming: &Option<Incoming>, bytes: u64| {
        if let Some(tx) = &progress {
            let _ = tx.send(JoinProgress {
                log_stored: stored.load(Ordering::Acquire),
                log_total: incoming.as_ref().map_or(log_total, |i| i.log_end.0),
                file_received: incoming.as_ref().map_or(0, |i| i.written),
                file_total: incoming.as_ref().map_or(0, |i| i.len),
                bytes,
            });
        }
    };
    let outcome = loop {
        let message = tokio::time::timeout(STEP_TIMEOUT, conn.recv())
            .await
            .map_err(|_| node_error("the sender went silent"))??;
        match message {
            DeviceMessage::SyncLogSegment { first, entries, .. } => {
                if first.0 != next || entries.is_empty() {
                    break Err(node_error(format!(
                        "a segment at {} where {next} was next",
                        first.0
                    )));
                }
                next += entries.len() as u64;
                bytes += entries
                    .iter()
                    .map(|e| e.sealed.len() as u64 + 48)
                    .sum::<u64>();
                let entries = entries
                    .into_iter()
                    .map(|e| (e.epoch, e.sealed.into_vec()))
                    .collect();
                if segments.send((first, entries)).is_err() {
                    break Err(node_error("the journal stopped"));
                }
            }
            DeviceMessage::SnapshotBegin {
                applied,
                log_end,
                file_bytes,
                ..
            } => {
                if incoming.is_some() || applied > log_end {
                    break Err(node_error("a second or inconsistent header"));
                }
                tracing::debug!(
                    stored = stored.load(Ordering::Acquire),
                    received = next - 1,
                    file_bytes,
                    "snapshot: header"
                );
                let _ = Projections::remove_files(&incoming_path);
                let file = std::fs::File::create(&incoming_path).map_err(io_at(&incoming_path))?;
                incoming = Some(Incoming {
                    file,
                    len: file_bytes,
                    written: 0,
                    hasher: blake3::Hasher::new(),
                    log_end,
                });
            }
            DeviceMessage::SnapshotChunk { offset, data } => {
                let Some(inc) = incoming.as_mut() else {
                    break Err(node_error("a chunk before the header"));
                };
                if offset != inc.written || inc.written + data.len() as u64 > inc.len {
                    break Err(node_error(format!("a chunk at {offset} out of place")));
                }
                inc.file
                    .seek(SeekFrom::Start(offset))
                    .and_then(|_| inc.file.write_all(&data))
                    .map_err(io_at(&incoming_path))?;
                inc.hasher.update(&data);
                inc.written += data.len() as u64;
                bytes += data.len() as u64;
            }
            DeviceMessage::SnapshotEnd { file_hash } => {
                let Some(inc) = incoming.as_mut() else {
                    break Err(node_error("the end before the header"));
                };
                if inc.written != inc.len || next != inc.log_end.0 + 1 {
                    break Err(node_error("the end came early"));
                }
                if inc.hasher.finalize().as_bytes().as_slice() != file_hash.as_slice() {
                    break Err(node_error("the projection file does not match its hash"));
                }
                tracing::debug!(stored = stored.load(Ordering::Acquire), "snapshot: end");
                inc.file.sync_all().map_err(io_at(&incoming_path))?;
                break Ok((inc.log_end.0, inc.len));
            }
            other => {
                break Err(node_error(format!(
                    "unexpected message {:?}",
                    std::mem::discriminant(&other)
                )))
            }
        }
        report(&incoming, bytes);
    };
    drop(segments);
    let appended = tokio::task::spawn_blocking(move || appender.join())
        .await
        .map_err(|e| node_error(format!("worker failed: {e}")))?
        .map_err(|_| node_error("the journal thread panicked"))?;
    let outcome = outcome?;
    appended?;
    tracing::debug!("snapshot: log stored");
    report(&incoming, bytes);
    Ok(outcome)
}
