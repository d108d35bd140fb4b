//! Initial sync by snapshot: a device that has just joined fetches the log and a copy of the
//! projections from the device it paired with, instead of replaying the whole log.
//!
//! The sender freezes its projection file in place (see [`keel_projections::FrozenFile`]; if it
//! cannot, it copies it with SQLite's online backup) and ships it with its log from position 1,
//! interleaving log segments and file chunks so the receiver stores the log while the file
//! arrives; it checks the file's structure (SQLite's `quick_check`) while sending it. The
//! receiver checks the log's seals on one thread and appends it verbatim on another, writes the
//! file beside its projection (past the page cache where it can, see `file_sink`), checks its
//! hash, and installs it only if the log it has applied is stored: until then the library is a
//! valid follower with a shorter log, and an interrupted fetch leaves nothing worse than a
//! slower catch-up.

use std::collections::BTreeMap;
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use keel_journal::{CheckedEntries, CommitRoute, Journal, JournalOptions, LibraryKey, LogIndex};
use keel_projections::Projections;
use keel_schema::{DeviceId, Epoch, Hlc, LibraryId, Lsn};
use keel_transport::{
    Connection, DeviceMessage, Endpoint, ReplicationMessage, WireLogEntry, RECORDS_PER_MESSAGE_MAX,
    SNAPSHOT_CHUNK_MAX,
};
use serde_bytes::ByteBuf;

use super::file_sink::FileSink;
use crate::core::CoreEvent;
use crate::error::{blocking, io_at, NodeError};
use crate::pacing::Pacing;
use crate::status::JoiningStatus;
use crossbeam_channel::Sender;
use keel_engine::{
    NodeLink, JOIN_FRAMES_FILE as FRAMES_FILE, JOIN_INCOMING_FILE as INCOMING_FILE, JOURNAL_FILE,
    PROJECTIONS_FILE,
};

/// How long either side waits for the next message.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// Log segments queued for the journal on the receiving side (each up to 16,384 entries).
const SEGMENTS_QUEUED: usize = 4;
/// Most log entries appended in one journal transaction on the receiving side.
const APPEND_BATCH: usize = 131_072;
/// Least number of journal transactions a join's log is stored in (when it spans several
/// segments): a join cut short keeps all but at most this fraction of what had arrived.
const APPEND_COMMITS_MIN: u64 = 8;
/// Most log-index entries reserved up front from the sender's announced log length.
const INDEX_RESERVE_MAX: u64 = 1 << 24;
/// Suffix of the sender's scratch copies (removed when a node starts).
pub(crate) const SCRATCH_SUFFIX: &str = ".snapshot-out";

/// How far a snapshot fetch has come (sent to [`crate::JoinOptions::progress`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JoinProgress {
    /// Log entries stored here.
    pub log_stored: u64,
    /// Log entries to store (the sender's log end).
    pub log_total: u64,
    /// Bytes of the projection file received.
    pub file_received: u64,
    /// Size of the projection file (0 until the sender's header arrives).
    pub file_total: u64,
    /// UDP bytes received on the connection so far, as QUIC counts them (headers,
    /// acknowledgements and retransmissions included).
    pub bytes: u64,
}

/// When a join leaves the projection file's copy for a backfill (decision 0075): a library
/// whose inviter compacted its log can be pulled as row images, about a third fewer bytes
/// than the packed file, but the joining device then writes every row itself. Over a slow
/// link the bytes decide and the backfill is faster; over a fast one the copy is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlowLink {
    /// Bytes received after the file's header over which the link's rate is measured.
    pub probe_bytes: u64,
    /// Below this rate (bytes a second) the join backfills; 0: never.
    pub backfill_below: u64,
}

impl Default for SlowLink {
    /// 512 KiB of probe; below 16 MB/s (about 130 Mbit/s) the join backfills. At 1M entries
    /// over 100 Mbit/s the backfill took 9.7 s at 96 bytes an entry against the copy's 10.3 s
    /// at 128 (decision 0075); the two cross near 17 MB/s on this machine.
    fn default() -> Self {
        Self {
            probe_bytes: 512 << 10,
            backfill_below: 16_000_000,
        }
    }
}

impl SlowLink {
    /// Always copy the file.
    pub fn never() -> Self {
        Self {
            probe_bytes: u64::MAX,
            backfill_below: 0,
        }
    }
}

/// Measures the link while the file arrives: from its header, the bytes received over the
/// time they took, once [`SlowLink::probe_bytes`] arrived. Only the time between two readings
/// with bytes between them counts: a sender that pauses (reading or packing its file) is not
/// a slow link, and a backfill would wait for it as long.
struct LinkProbe {
    rule: SlowLink,
    /// The bytes received when the header came; `None` before it.
    start: Option<u64>,
    /// The last reading: when, and the bytes received by then.
    last: Option<(Instant, u64)>,
    /// Time between readings that saw bytes arrive.
    flowing: Duration,
    decided: bool,
}

impl LinkProbe {
    fn new(rule: SlowLink) -> Self {
        Self {
            rule,
            start: None,
            last: None,
            flowing: Duration::ZERO,
            decided: false,
        }
    }

    /// Takes the bytes received so far once the file's header is in; returns the rate
    /// measured when it is below the rule's (the join should backfill), once.
    fn observe(&mut self, received: u64) -> Option<u64> {
        self.observe_at(received, Instant::now())
    }

    /// [`Self::observe`] at `now`.
    fn observe_at(&mut self, received: u64, now: Instant) -> Option<u64> {
        if self.decided || self.rule.backfill_below == 0 {
            return None;
        }
        let start = *self.start.get_or_insert(received);
        if let Some((at, before)) = self.last {
            if received > before {
                self.flowing += now.saturating_duration_since(at);
            }
        }
        self.last = Some((now, received));
        let bytes = received.saturating_sub(start);
        if bytes < self.rule.probe_bytes {
            return None;
        }
        self.decided = true;
        let secs = self.flowing.as_secs_f64().max(1e-6);
        let rate = (bytes as f64 / secs) as u64;
        (rate < self.rule.backfill_below).then_some(rate)
    }
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

fn node_error(what: impl std::fmt::Display) -> NodeError {
    NodeError::Failed(format!("snapshot: {what}"))
}

/// Joins being served now, by joining device, each with the serial of the serving that shows
/// it (what [`crate::Node::status`] shows as joining).
pub(crate) type ServedJoins = Arc<std::sync::Mutex<BTreeMap<DeviceId, (u64, JoiningStatus)>>>;

/// Most joins shown at once; more are served all the same.
const JOINS_SHOWN_MAX: usize = 64;

/// One join in [`ServedJoins`] while it is served; it leaves the map when dropped, unless a
/// later serving of the same device (a retry) took its place.
struct ServedJoin {
    joins: ServedJoins,
    device: DeviceId,
    serial: u64,
}

impl ServedJoin {
    fn start(joins: &ServedJoins, device: DeviceId) -> Self {
        static SERIAL: AtomicU64 = AtomicU64::new(0);
        let serial = SERIAL.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut map) = joins.lock() {
            if map.len() < JOINS_SHOWN_MAX || map.contains_key(&device) {
                let status = JoiningStatus {
                    device_id: device.to_hex(),
                    started_ms: keel_engine::now_ms(),
                    ..JoiningStatus::default()
                };
                map.insert(device, (serial, status));
            }
        }
        Self {
            joins: joins.clone(),
            device,
            serial,
        }
    }

    fn update(&self, f: impl FnOnce(&mut JoiningStatus)) {
        if let Ok(mut map) = self.joins.lock() {
            if let Some((serial, status)) = map.get_mut(&self.device) {
                if *serial == self.serial {
                    f(status);
                }
            }
        }
    }
}

impl Drop for ServedJoin {
    fn drop(&mut self) {
        if let Ok(mut map) = self.joins.lock() {
            if map
                .get(&self.device)
                .is_some_and(|(s, _)| *s == self.serial)
            {
                map.remove(&self.device);
            }
        }
    }
}

/// A device asking for a snapshot: its connection, its models' fingerprint, and the most log
/// entries it is sent as history (see `NodeOptions::join_history`).
pub(crate) struct Asker {
    pub(crate) conn: Connection,
    pub(crate) models: String,
    pub(crate) history: u64,
}

/// The sending side: answers a [`DeviceMessage::SnapshotRequest`] on `conn`, then waits for the
/// receiver to close the connection. The join shows in `joins` meanwhile.
pub(crate) async fn serve(
    (library, core): (Weak<NodeLink>, &Sender<CoreEvent>),
    epoch: Epoch,
    asker: Asker,
    joins: &ServedJoins,
) {
    let Asker {
        conn,
        models,
        history,
    } = asker;
    let peer = conn.peer();
    let started = Instant::now();
    let shown = ServedJoin::start(joins, peer);
    match send((library, core), epoch, (&conn, &models, history), &shown).await {
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

/// What keeps the bytes being sent stable.
enum Source {
    /// The projection file itself, frozen.
    Frozen(keel_projections::FrozenFile),
    /// A scratch copy, removed when sent.
    Copy { _scratch: Scratch },
}

/// The projection file being sent.
struct Outgoing {
    path: PathBuf,
    file: std::fs::File,
    len: u64,
    offset: u64,
    hasher: blake3::Hasher,
    _source: Source,
}

/// Opens what to send: the projection file frozen in place, or else (it could not be frozen) a
/// scratch copy made with SQLite's online backup. Returns it with the position it has applied.
async fn projection_source(
    library: &Weak<NodeLink>,
) -> Result<(Outgoing, keel_projections::AppliedPosition), NodeError> {
    let weak = library.clone();
    blocking(move || {
        let lib = weak.upgrade().ok_or(NodeError::Stopped)?;
        let (path, applied, source) = match lib.freeze_projections()? {
            Some(frozen) => (frozen.path.clone(), frozen.applied, Source::Frozen(frozen)),
            None => {
                let dir = lib.library().dir().to_path_buf();
                drop(lib);
                let scratch = dir.join(format!("{:016x}{SCRATCH_SUFFIX}", rand::random::<u64>()));
                let scratch = Scratch(scratch);
                let applied = Projections::snapshot(&dir.join(PROJECTIONS_FILE), &scratch.0)?;
                (
                    scratch.0.clone(),
                    applied,
                    Source::Copy { _scratch: scratch },
                )
            }
        };
        let file = std::fs::File::open(&path).map_err(io_at(&path))?;
        let len = match &source {
            Source::Frozen(frozen) => frozen.len,
            Source::Copy { .. } => file.metadata().map_err(io_at(&path))?.len(),
        };
        let outgoing = Outgoing {
            path,
            file,
            len,
            offset: 0,
            hasher: blake3::Hasher::new(),
            _source: source,
        };
        Ok((outgoing, applied))
    })
    .await
}

/// Sends one message, giving up if the receiver takes longer than [`STEP_TIMEOUT`] to make room
/// for it: a receiver that stalls must not keep the projection frozen (and its WAL growing).
async fn send_within(conn: &Connection, message: &DeviceMessage) -> Result<(), NodeError> {
    tokio::time::timeout(STEP_TIMEOUT, conn.send(message))
        .await
        .map_err(|_| node_error("the receiver stopped reading"))??;
    Ok(())
}

/// The log position every device of the library but `joiner` holds for good, as the core
/// knows it (0 if it cannot tell): see [`join_base`].
async fn settled_for(core: &Sender<CoreEvent>, joiner: DeviceId) -> Lsn {
    let (reply, answer) = crossbeam_channel::bounded(1);
    if core
        .send(CoreEvent::Settled {
            except: joiner,
            reply,
        })
        .is_err()
    {
        return Lsn(0);
    }
    tokio::task::spawn_blocking(move || answer.recv_timeout(STEP_TIMEOUT).unwrap_or(Lsn(0)))
        .await
        .unwrap_or(Lsn(0))
}

/// Where the log of a joiner of an uncompacted log starts (decision 0079): at `upto`, the
/// file's position capped by what every other device holds for good (no election can
/// truncate it), so the file sent is the joiner's snapshot there and the history before it
/// stays behind; `kept` (no base) when `upto` is 0 or not in the log.
fn join_base(
    library: &Weak<NodeLink>,
    kept: (Lsn, Epoch),
    upto: Lsn,
) -> Result<(Lsn, Epoch), NodeError> {
    if upto.0 == 0 {
        return Ok(kept);
    }
    let lib = library.upgrade().ok_or(NodeError::Stopped)?;
    Ok(lib
        .journal()?
        .log()
        .epoch_at(upto)?
        .map_or(kept, |epoch| (upto, epoch)))
}

async fn send(
    (library, core): (Weak<NodeLink>, &Sender<CoreEvent>),
    epoch: Epoch,
    (conn, models, history): (&Connection, &str, u64),
    shown: &ServedJoin,
) -> Result<(u64, u64), NodeError> {
    let (out, applied) = projection_source(&library).await?;
    // The file's structure is checked here, while it is sent (its bytes do not change until
    // `out` is dropped): the receiver checks only that it got these bytes.
    let checked = {
        let path = out.path.clone();
        tokio::task::spawn_blocking(move || keel_projections::Projections::check_file(&path))
    };
    let (target, hlc, kept, head, same_models) = {
        let lib = library.upgrade().ok_or(NodeError::Stopped)?;
        let journal = lib.journal()?;
        // The log must reach what the copy has applied.
        let target = journal.stats()?.last_lsn.max(applied.log);
        // Read after the log end: it covers every entry up to there.
        let hlc = journal.hlc_high_water()?.unwrap_or_default();
        // A compacted log is sent from its base: the file holds what came before.
        let kept = journal.log().base()?;
        let head = journal.log().head()?.unwrap_or_default();
        let same_models = lib.library().models().fingerprint() == models;
        (target, hlc, kept, head, same_models)
    };
    // An uncompacted log longer than the join's history, to an asker of these models (a file
    // of other models is replayed, not kept), starts the joiner at a base of its own; a short
    // history is sent whole (the joiner can replay it for other models, and serve it).
    let own_base = kept.0 .0 == 0 && target.0 > history && same_models;
    let (base, base_epoch) = if own_base {
        let upto = applied.log.min(settled_for(core, conn.peer()).await);
        join_base(&library, kept, upto)?
    } else {
        kept
    };
    let base_kept = kept.0 .0 > 0;
    send_within(
        conn,
        &DeviceMessage::SnapshotBegin {
            epoch,
            applied: applied.log,
            log_end: target,
            file_bytes: out.len,
            hlc,
            base,
            base_epoch,
            head,
            base_kept,
        },
    )
    .await?;
    shown.update(|s| {
        s.file_bytes = out.len;
        s.log_end = target.0;
        s.log_sent = base.0;
    });
    let mut next = base.0 + 1;
    let mut prev_epoch = base_epoch;
    let mut file = FileSender::new(out);
    // Log segments and file chunks alternate, so the receiver stores the log while the file
    // arrives.
    while next <= target.0 || file.sending() {
        if next <= target.0 {
            let (last, last_epoch) =
                send_segment(&library, conn, epoch, (Lsn(next), prev_epoch), target).await?;
            next = last.0 + 1;
            prev_epoch = last_epoch;
            shown.update(|s| s.log_sent = last.0);
        }
        if let Some(sent) = file.send_next(conn).await? {
            shown.update(|s| s.file_sent = sent);
        }
    }
    let out = file.sent()?;
    checked
        .await
        .map_err(|e| node_error(format!("the file check failed: {e}")))?
        .map_err(|e| node_error(format!("the projection file failed its check: {e}")))?;
    let hash = out.hasher.finalize();
    let end = DeviceMessage::SnapshotEnd {
        file_hash: ByteBuf::from(hash.as_bytes().to_vec()),
    };
    send_within(conn, &end).await?;
    Ok((target.0, out.len))
}

/// The projection file's chunks on their way: the next is read and packed on a blocking
/// thread while the one before it is sent, harder while the link is what holds the sending
/// back ([`Pacing`]).
struct FileSender {
    packing: Option<tokio::task::JoinHandle<Result<(Outgoing, DeviceMessage), NodeError>>>,
    /// The file once its last chunk is packed.
    done: Option<Outgoing>,
    pacing: Pacing,
}

impl FileSender {
    fn new(out: Outgoing) -> Self {
        let mut sender = Self {
            packing: None,
            done: None,
            pacing: Pacing::default(),
        };
        sender.pack_or_end(out);
        sender
    }

    fn pack_or_end(&mut self, out: Outgoing) {
        if out.offset < out.len {
            let level = self.pacing.level();
            self.packing = Some(tokio::task::spawn_blocking(move || next_chunk(out, level)));
        } else {
            self.done = Some(out);
        }
    }

    /// Whether a chunk is still to be sent.
    fn sending(&self) -> bool {
        self.packing.is_some()
    }

    /// Sends the next chunk, if any; returns how far into the file it reaches.
    async fn send_next(&mut self, conn: &Connection) -> Result<Option<u64>, NodeError> {
        let Some(packed) = self.packing.take() else {
            return Ok(None);
        };
        let waited = Instant::now();
        let (rest, chunk) = packed
            .await
            .map_err(|e| node_error(format!("packing a chunk failed: {e}")))??;
        let packing_wait = waited.elapsed();
        let (sent, level) = (rest.offset, self.pacing.level());
        let sending = Instant::now();
        self.pack_or_end(rest);
        send_within(conn, &chunk).await?;
        self.pacing.heard(packing_wait, sending.elapsed());
        if self.pacing.level() != level {
            tracing::debug!(
                level = self.pacing.level(),
                at = sent,
                "snapshot: packing level"
            );
        }
        Ok(Some(sent))
    }

    /// The file, every chunk sent.
    fn sent(self) -> Result<Outgoing, NodeError> {
        debug_assert!(self.packing.is_none(), "chunks left to send");
        self.done
            .ok_or_else(|| node_error("the projection file was empty"))
    }
}

/// Sends the log segment that starts at `from` (after an entry of `prev_epoch`), up to
/// `target`. Returns the position and epoch of its last entry.
async fn send_segment(
    library: &Weak<NodeLink>,
    conn: &Connection,
    epoch: Epoch,
    (from, prev_epoch): (Lsn, Epoch),
    target: Lsn,
) -> Result<(Lsn, Epoch), NodeError> {
    let limit = ((target.0 - from.0 + 1) as usize).min(RECORDS_PER_MESSAGE_MAX);
    let weak = library.clone();
    let entries = blocking(move || {
        let lib = weak.upgrade().ok_or(NodeError::Stopped)?;
        Ok(lib.journal()?.log().entries(from, limit)?)
    })
    .await?;
    let Some(&(last, last_epoch, _)) = entries.last() else {
        return Err(node_error(format!("the log ends before {}", from.0)));
    };
    let message = DeviceMessage::Replication(ReplicationMessage::LogSegment {
        epoch,
        first: from,
        prev_epoch,
        leader_end: target,
        base: Lsn(0),
        entries: entries
            .into_iter()
            .map(|(_, epoch, sealed)| WireLogEntry {
                epoch,
                sealed: ByteBuf::from(sealed),
            })
            .collect(),
    });
    send_within(conn, &message).await?;
    Ok((last, last_epoch))
}

/// Sends the next chunk of the projection file, hashing it on the way.
/// Reads, hashes and packs the file's next chunk; returns the file with it (it moves between
/// threads).
fn next_chunk(mut out: Outgoing, level: i32) -> Result<(Outgoing, DeviceMessage), NodeError> {
    let size = (out.len - out.offset).min(SNAPSHOT_CHUNK_MAX as u64) as usize;
    let mut data = vec![0u8; size];
    out.file
        .read_exact(&mut data)
        .map_err(|e| node_error(format!("reading the projection: {e}")))?;
    out.hasher.update(&data);
    let offset = out.offset;
    out.offset += size as u64;
    Ok((out, compressed_chunk(offset, data, level)))
}

/// zstd level of a chunk that came unpacked and is kept packed, and of the first chunk sent
/// (the sender's [`Pacing`] goes from there): -1 (the fastest of the "fast" levels that packs
/// as well as level 1) packs the P4 file to about a third in 75% of level 1's time.
pub(crate) const WIRE_ZSTD_LEVEL: i32 = crate::pacing::LEVELS[0];

/// A chunk of the file at `offset`, compressed at `level` when that makes it smaller.
fn compressed_chunk(offset: u64, data: Vec<u8>, level: i32) -> DeviceMessage {
    match zstd::bulk::compress(&data, level) {
        Ok(packed) if packed.len() < data.len() => DeviceMessage::SnapshotChunk {
            offset,
            raw_len: data.len() as u32,
            data: ByteBuf::from(packed),
        },
        _ => DeviceMessage::SnapshotChunk {
            offset,
            raw_len: 0,
            data: ByteBuf::from(data),
        },
    }
}

/// The bytes of a chunk: `data` itself, or unpacked to exactly `raw_len` bytes (never more:
/// the bound is the transport's limit, checked when the message was decoded).
fn unpacked(data: ByteBuf, raw_len: u32) -> Result<Chunk, NodeError> {
    if raw_len == 0 {
        return Ok(Chunk {
            bytes: data.into_vec(),
            frame: None,
        });
    }
    let raw = zstd::bulk::decompress(&data, raw_len as usize)
        .map_err(|e| node_error(format!("a chunk that does not unpack: {e}")))?;
    if raw.len() != raw_len as usize {
        return Err(node_error(format!(
            "a chunk that unpacks to {} bytes, not {raw_len}",
            raw.len()
        )));
    }
    Ok(Chunk {
        bytes: raw,
        frame: Some(data.into_vec()),
    })
}

/// A chunk of the file as received: its bytes, and the zstd frame they came in, if packed.
struct Chunk {
    bytes: Vec<u8>,
    frame: Option<Vec<u8>>,
}

/// Fetches a snapshot from `addr` (device `peer` of `library`, which pinned this one) over
/// `endpoint` into the library folder `dir`, whose journal must hold no log yet: stores the log,
/// then installs the projection. `progress` hears how far it has come.
pub(crate) async fn fetch(
    endpoint: &Endpoint,
    peer: DeviceId,
    addr: SocketAddr,
    (library, models): (LibraryId, &str),
    key: &LibraryKey,
    (dir, slow_link): (&Path, SlowLink),
    progress: Option<tokio::sync::mpsc::UnboundedSender<JoinProgress>>,
) -> Result<SnapshotOutcome, NodeError> {
    let started = Instant::now();
    endpoint.pins().pin(peer);
    let conn = tokio::time::timeout(STEP_TIMEOUT, endpoint.connect(addr))
        .await
        .map_err(|_| node_error(format!("no answer from {addr}")))??;
    let journal = Journal::open(
        &dir.join(JOURNAL_FILE),
        library,
        key,
        endpoint.device(),
        JournalOptions {
            role: Some(CommitRoute::Offline),
            // The whole log arrives at once, and nothing reads it back before the node starts.
            direct_writes: true,
            // Made when the library was created for the join.
            existing: true,
            ..JournalOptions::default()
        },
    )?;
    let result = receive(
        &conn,
        (library, models, peer),
        journal,
        (dir, slow_link),
        progress,
    )
    .await;
    conn.close("snapshot received");
    let incoming = dir.join(INCOMING_FILE);
    let Received {
        log_entries,
        file_bytes,
        index_saved,
        mut job,
        compacted,
    } = match result {
        Ok(done) => done,
        Err(e) => {
            let _ = Projections::remove_files(&incoming);
            let _ = std::fs::remove_file(dir.join(FRAMES_FILE));
            return Err(e);
        }
    };
    let dest = dir.join(PROJECTIONS_FILE);
    tracing::debug!("snapshot: installing");
    let stored = Lsn(log_entries);
    let (frames, snapshot) = (dir.join(FRAMES_FILE), dir.join(keel_engine::SNAPSHOT_FILE));
    let applied = blocking(move || {
        if compacted {
            // The log before the base is not here: the file, packed as it arrived, is what
            // rebuilds start from.
            std::fs::File::open(&frames)
                .and_then(|f| f.sync_all())
                .map_err(io_at(&frames))?;
            std::fs::rename(&frames, &snapshot).map_err(io_at(&snapshot))?;
        }
        let applied = Projections::install_snapshot(&incoming, &dest, stored);
        if applied.is_err() {
            let _ = Projections::remove_files(&incoming);
        }
        index_saved
            .join()
            .map_err(|_| node_error("the thread saving the log index panicked"))?;
        Ok(applied?)
    })
    .await;
    // The log is all stored either way: without the projection, the node replays it.
    job.end(Ok(log_entries)).await;
    // The journal is closed when this returns.
    drop(job);
    let applied = applied?;
    Ok(SnapshotOutcome {
        log_entries,
        applied,
        file_bytes,
        elapsed: started.elapsed(),
    })
}

/// The receiving side's state for the projection file.
struct Incoming {
    /// Writes and hashes the file on its own thread.
    sink: FileSink,
    len: u64,
    written: u64,
    log_end: Lsn,
    hlc: Hlc,
}

async fn receive(
    conn: &Connection,
    (library, models, inviter): (LibraryId, &str, DeviceId),
    journal: Journal,
    (dir, slow_link): (&Path, SlowLink),
    progress: Option<tokio::sync::mpsc::UnboundedSender<JoinProgress>>,
) -> Result<Received, NodeError> {
    let log_total = ask_for_snapshot(conn, (library, models), &journal).await?;
    let journal = Arc::new(journal);
    let mut job = JoinJob::start(journal.clone(), inviter).await?;
    let writers = LogWriters::start(journal.clone(), log_total, dir)?;
    let mut reader = SnapshotReader::new(dir, writers.segments.clone());
    let mut probe = LinkProbe::new(slow_link);
    let stored = writers.stored.clone();
    let report = |seen: Option<(u64, u64, u64)>| {
        let bytes = conn.wire_bytes().1;
        if let Some(tx) = &progress {
            let (log_end, file_received, file_total) = seen.unwrap_or((log_total, 0, 0));
            let _ = tx.send(JoinProgress {
                log_stored: stored.load(Ordering::Acquire),
                log_total: log_end,
                file_received,
                file_total,
                bytes,
            });
        }
    };
    let outcome = loop {
        let message = match next_message(conn, &mut probe, reader.measures_link()).await {
            Ok(Next::Message(message)) => message,
            Ok(Next::Slow(bytes_per_s)) => break Err(NodeError::SlowLink { bytes_per_s }),
            Err(e) => break Err(e),
        };
        match reader.on_message(message) {
            Ok(Some(end)) => break Ok(end),
            Ok(None) => report(reader.seen),
            Err(e) => break Err(e),
        }
        // And at each message, for a link fast enough to bring a chunk between two ticks.
        if reader.measures_link() {
            if let Some(bytes_per_s) = probe.observe(conn.wire_bytes().1) {
                break Err(NodeError::SlowLink { bytes_per_s });
            }
        }
        if std::mem::take(&mut reader.start_after) {
            // Before any segment is appended: the log starts after the sender's base.
            let (journal, (base, epoch, head)) = (journal.clone(), reader.base);
            let started = blocking(move || Ok(journal.log().start_after(base, epoch, head)?));
            if let Err(e) = started.await {
                break Err(e);
            }
            // The positions up to the base are held: in the file, which becomes the snapshot.
            stored.fetch_max(base.0, Ordering::AcqRel);
        }
        let (log_end, stored) = (reader.log_end(log_total), stored.load(Ordering::Acquire));
        if let Err(e) = job.follow(reader.hlc(), stored, log_end).await {
            break Err(e);
        }
    };
    // Every exit from the loop stops the journal threads; an unfinished file's thread first.
    drop(reader.incoming.take());
    drop(reader.segments);
    let finished = writers.finish().await;
    // A journal thread's error is the cause of whatever the receiving loop saw: checked first.
    let (index, (hlc, log_entries, file_bytes)) =
        match finished.and_then(|index| outcome.map(|end| (index, end))) {
            Ok(done) => done,
            Err(e) => {
                job.end(Err(&e)).await;
                return Err(e);
            }
        };
    job.follow(Some(hlc), log_entries, log_entries).await?;
    tracing::debug!("snapshot: log stored");
    report(reader.seen);
    // Saving the index (a large write, most of it new memory) overlaps the install. A log
    // that starts after a base has no saved index (it describes positions from 1).
    let compacted = reader.base.0 .0 > 0;
    let index_saved = std::thread::Builder::new()
        .name("keel-snapshot-index".into())
        .spawn(move || {
            if compacted {
                return;
            }
            if let Err(e) = journal.log().save_index(&index) {
                tracing::warn!(error = %e, "saving the log index failed; the first start reads the whole log");
            }
        })
        .map_err(io_at(dir))?;
    Ok(Received {
        log_entries,
        file_bytes,
        index_saved,
        job,
        compacted,
    })
}

/// What the receiving side waits for next.
enum Next {
    Message(DeviceMessage),
    /// The link measured slow (bytes a second): the join backfills instead.
    Slow(u64),
}

/// How often the link is measured while a message arrives (a chunk is megabytes).
const PROBE_TICK: Duration = Duration::from_millis(5);

/// The next message from `conn`; while `watch`, the link is measured meanwhile by `probe`, so
/// a slow one is found within [`SlowLink::probe_bytes`] and not at a chunk's end.
async fn next_message(
    conn: &Connection,
    probe: &mut LinkProbe,
    watch: bool,
) -> Result<Next, NodeError> {
    let recv = tokio::time::timeout(STEP_TIMEOUT, conn.recv());
    tokio::pin!(recv);
    let mut tick = tokio::time::interval(PROBE_TICK);
    loop {
        tokio::select! {
            got = &mut recv => return match got {
                Ok(Ok(message)) => Ok(Next::Message(message)),
                Ok(Err(e)) => Err(e.into()),
                Err(_) => Err(node_error("the sender went silent")),
            },
            _ = tick.tick(), if watch => {
                if let Some(rate) = probe.observe(conn.wire_bytes().1) {
                    return Ok(Next::Slow(rate));
                }
            }
        }
    }
}

/// The join's job record in the new library's journal (see `keel_engine::JobKind::Join`): saved
/// when the fetch starts, at most every [`keel_engine::JOB_SAVE_EVERY`] while the log arrives,
/// and when it ends. It also raises this device's clock mark to the sender's as soon as the
/// header brings it, so a log cut short is covered too.
struct JoinJob {
    journal: Arc<Journal>,
    job: keel_engine::Job,
    saved: Instant,
    clock_raised: bool,
}

impl JoinJob {
    async fn start(journal: Arc<Journal>, inviter: DeviceId) -> Result<Self, NodeError> {
        let mut job = keel_engine::Job::start(keel_engine::JobKind::Join {
            inviter: inviter.to_hex(),
        });
        let job = {
            let journal = journal.clone();
            blocking(move || {
                keel_engine::save_job_to(&journal, &mut job)?;
                Ok(job)
            })
            .await?
        };
        Ok(Self {
            journal,
            job,
            saved: Instant::now(),
            clock_raised: false,
        })
    }

    /// Follows the fetch: `stored` of `log_end` entries; `hlc` once the header is in.
    async fn follow(
        &mut self,
        hlc: Option<Hlc>,
        stored: u64,
        log_end: u64,
    ) -> Result<(), NodeError> {
        if let Some(hlc) = hlc.filter(|_| !self.clock_raised) {
            let journal = self.journal.clone();
            blocking(move || Ok(journal.raise_hlc_high_water(hlc)?)).await?;
            self.clock_raised = true;
        }
        self.job.advance(stored, log_end);
        if self.saved.elapsed() >= keel_engine::JOB_SAVE_EVERY {
            self.save().await?;
        }
        Ok(())
    }

    /// Ends the job: completed with the log stored, or failed with why (best effort: the
    /// journal may be what failed).
    async fn end(&mut self, outcome: Result<u64, &NodeError>) {
        (self.job.state, self.job.summary) = match outcome {
            Ok(entries) => (
                keel_engine::JobState::Completed,
                Some(format!("{entries} log entries stored")),
            ),
            Err(e) => (
                keel_engine::JobState::Failed,
                Some(format!("{e}; the node catches up by replication instead")),
            ),
        };
        if let Err(e) = self.save().await {
            tracing::warn!(error = %e, "could not record the end of the join's job");
        }
    }

    async fn save(&mut self) -> Result<(), NodeError> {
        let (journal, mut job) = (self.journal.clone(), self.job.clone());
        blocking(move || Ok(keel_engine::save_job_to(&journal, &mut job)?)).await?;
        self.saved = Instant::now();
        Ok(())
    }
}

/// Waits for the sender's `Hello`, checks this device's log is empty and asks for the
/// snapshot. Returns the sender's log end (its word: a hint for progress and sizing only).
async fn ask_for_snapshot(
    conn: &Connection,
    (library, models): (LibraryId, &str),
    journal: &Journal,
) -> Result<u64, NodeError> {
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
    if journal.stats()?.last_lsn != Lsn(0) {
        return Err(node_error("this device's log is not empty"));
    }
    conn.send(&DeviceMessage::SnapshotRequest {
        library,
        models: models.to_string(),
    })
    .await?;
    Ok(log_total)
}

/// A segment on its way to the journal: its first position and its entries, sealed.
type Segment = (Lsn, Vec<(Epoch, Vec<u8>)>);

/// Two journal threads: one checks each segment's seals, the other appends checked segments in
/// order, several per transaction. The changes are not decoded (their clocks are covered by the
/// sender's high-water mark, raised after): this device's offline journal holds only its own
/// Device record, which no log can contain yet.
struct LogWriters {
    /// Segments to check, in order.
    segments: crossbeam_channel::Sender<Segment>,
    /// The last position appended.
    stored: Arc<AtomicU64>,
    checker: std::thread::JoinHandle<Result<(), NodeError>>,
    appender: std::thread::JoinHandle<Result<LogIndex, NodeError>>,
}

impl LogWriters {
    fn start(journal: Arc<Journal>, log_total: u64, dir: &Path) -> Result<Self, NodeError> {
        let stored = Arc::new(AtomicU64::new(0));
        let (segments, raw) = crossbeam_channel::bounded::<Segment>(SEGMENTS_QUEUED);
        let (checked_tx, checked_rx) = crossbeam_channel::bounded::<CheckedEntries>(2);
        let checker = {
            let journal = journal.clone();
            std::thread::Builder::new()
                .name("keel-snapshot-check".into())
                .spawn(move || -> Result<(), NodeError> {
                    while let Ok((first, entries)) = raw.recv() {
                        let checked = journal.log().check_seals(first, entries)?;
                        if checked_tx.send(checked).is_err() {
                            break;
                        }
                    }
                    Ok(())
                })
                .map_err(io_at(dir))?
        };
        let appender = {
            let stored = stored.clone();
            std::thread::Builder::new()
                .name("keel-snapshot-log".into())
                .spawn(move || append_checked(&journal, log_total, &checked_rx, &stored))
                .map_err(io_at(dir))?
        };
        Ok(Self {
            segments,
            stored,
            checker,
            appender,
        })
    }

    /// Waits for both threads (the segment sender must be dropped first) and returns the log
    /// index built on the way.
    async fn finish(self) -> Result<LogIndex, NodeError> {
        drop(self.segments);
        let (checker, appender) = (self.checker, self.appender);
        let (checked, appended) =
            tokio::task::spawn_blocking(move || (checker.join(), appender.join()))
                .await
                .map_err(|e| node_error(format!("worker failed: {e}")))?;
        let panicked = || node_error("a journal thread panicked");
        checked.map_err(|_| panicked())??;
        appended.map_err(|_| panicked())?
    }
}

/// The appending thread: checked segments in order, several per transaction. The log index,
/// built on the way, is saved with the log, so the node's first start need not read every
/// record back.
fn append_checked(
    journal: &Journal,
    log_total: u64,
    checked: &crossbeam_channel::Receiver<CheckedEntries>,
    stored: &AtomicU64,
) -> Result<LogIndex, NodeError> {
    let mut index = LogIndex::default();
    // The sender's word, so bounded (beyond it the index grows as needed).
    index.reserve(log_total.min(INDEX_RESERVE_MAX) as usize);
    let most = append_batch(log_total);
    while let Ok(mut batch) = checked.recv() {
        while batch.len() < most {
            match checked.try_recv() {
                Ok(more) => batch.extend(more)?,
                Err(_) => break,
            }
        }
        let last = batch.first().0 + batch.len() as u64 - 1;
        batch.index_into(&mut index);
        journal.log().append_checked(batch)?;
        stored.store(last, Ordering::Release);
    }
    Ok(index)
}

/// Most entries appended in one transaction for a log of `log_total` entries: at least
/// [`APPEND_COMMITS_MIN`] transactions, none smaller than a segment, none over [`APPEND_BATCH`].
fn append_batch(log_total: u64) -> usize {
    let share = (log_total / APPEND_COMMITS_MIN) as usize;
    share.clamp(RECORDS_PER_MESSAGE_MAX, APPEND_BATCH)
}

/// The receiving loop's state: where the log continues, the projection file coming in.
struct SnapshotReader {
    incoming_path: PathBuf,
    incoming: Option<Incoming>,
    /// The next log position expected.
    next: u64,
    /// (log end, file bytes received, file length), kept after the file is done.
    seen: Option<(u64, u64, u64)>,
    /// The sender's compaction position, its epoch and the log's head epoch, from the header
    /// (the base 0: the log comes from position 1).
    base: (Lsn, Epoch, Epoch),
    /// Set by a header with a base, until this device's empty log is made to start there.
    start_after: bool,
    /// Whether the sender keeps its snapshot at the base (a backfill could pull it).
    base_kept: bool,
    /// With a base: where the chunks go packed, to become the library's snapshot.
    frames: Option<(PathBuf, std::fs::File)>,
    segments: crossbeam_channel::Sender<Segment>,
}

impl SnapshotReader {
    /// A reader writing the file into `dir` and handing log segments to `segments`, expecting
    /// the log from position 1 until a header names a base.
    fn new(dir: &Path, segments: crossbeam_channel::Sender<Segment>) -> Self {
        Self {
            incoming_path: dir.join(INCOMING_FILE),
            incoming: None,
            next: 1,
            seen: None,
            base: (Lsn(0), Epoch::default(), Epoch::default()),
            start_after: false,
            base_kept: false,
            frames: None,
            segments,
        }
    }

    /// Whether the link is measured for [`SlowLink`]: only a compacted sender has a snapshot
    /// to backfill from, and only from the file's header on, while its chunks arrive.
    fn measures_link(&self) -> bool {
        self.base_kept && self.incoming.is_some()
    }

    /// The sender's clock mark, once its header is in.
    fn hlc(&self) -> Option<Hlc> {
        self.incoming.as_ref().map(|i| i.hlc)
    }

    /// The log's end: the header's, or the `Hello`'s before it.
    fn log_end(&self, hello: u64) -> u64 {
        self.seen.map_or(hello, |(end, _, _)| end)
    }

    /// Takes one message; at the end, returns the sender's HLC mark, the log end and the file
    /// length.
    fn on_message(&mut self, message: DeviceMessage) -> Result<Option<(Hlc, u64, u64)>, NodeError> {
        match message {
            DeviceMessage::Replication(ReplicationMessage::LogSegment {
                first, entries, ..
            }) => self.on_segment(first, entries)?,
            DeviceMessage::SnapshotBegin {
                applied,
                log_end,
                file_bytes,
                hlc,
                base,
                base_epoch,
                head,
                base_kept,
                ..
            } => {
                if base > applied || self.next != 1 {
                    return Err(node_error("a base past the file's position, or late"));
                }
                self.on_begin(applied, log_end, file_bytes, hlc)?;
                if base.0 > 0 {
                    self.base_kept = base_kept;
                    self.base = (base, base_epoch, head);
                    self.next = base.0 + 1;
                    self.start_after = true;
                    let path = self.incoming_path.with_file_name(FRAMES_FILE);
                    let file = std::fs::File::create(&path).map_err(io_at(&path))?;
                    self.frames = Some((path, file));
                }
            }
            DeviceMessage::SnapshotChunk {
                offset,
                data,
                raw_len,
            } => {
                let raw = unpacked(data, raw_len)?;
                self.keep_frame(&raw)?;
                self.on_chunk(offset, raw.bytes)?
            }
            DeviceMessage::SnapshotEnd { file_hash } => return self.on_end(&file_hash).map(Some),
            other => {
                return Err(node_error(format!(
                    "unexpected message {:?}",
                    std::mem::discriminant(&other)
                )))
            }
        }
        self.seen = self
            .incoming
            .as_ref()
            .map(|i| (i.log_end.0, i.written, i.len))
            .or(self.seen);
        Ok(None)
    }

    fn on_segment(&mut self, first: Lsn, entries: Vec<WireLogEntry>) -> Result<(), NodeError> {
        if first.0 != self.next || entries.is_empty() {
            return Err(node_error(format!(
                "a segment at {} where {} was next",
                first.0, self.next
            )));
        }
        self.next += entries.len() as u64;
        let entries = entries
            .into_iter()
            .map(|e| (e.epoch, e.sealed.into_vec()))
            .collect();
        self.segments
            .send((first, entries))
            .map_err(|_| node_error("the journal stopped"))
    }

    fn on_begin(
        &mut self,
        applied: Lsn,
        log_end: Lsn,
        file_bytes: u64,
        hlc: Hlc,
    ) -> Result<(), NodeError> {
        if self.incoming.is_some() || applied > log_end {
            return Err(node_error("a second or inconsistent header"));
        }
        // The sender's clock mark becomes this device's: not one far ahead of it.
        if hlc.physical_ms > keel_engine::now_ms().saturating_add(keel_journal::CLOCK_AHEAD_MAX_MS)
        {
            return Err(node_error("the sender's clock is too far ahead"));
        }
        tracing::debug!(received = self.next - 1, file_bytes, "snapshot: header");
        let _ = Projections::remove_files(&self.incoming_path);
        self.incoming = Some(Incoming {
            sink: FileSink::create(&self.incoming_path)?,
            len: file_bytes,
            written: 0,
            log_end,
            hlc,
        });
        Ok(())
    }

    /// With a base, appends the chunk to the frames kept as the snapshot: as it came when it
    /// came packed (a checked frame), packed here otherwise.
    fn keep_frame(&mut self, chunk: &Chunk) -> Result<(), NodeError> {
        use std::io::Write;
        let Some((path, file)) = self.frames.as_mut() else {
            return Ok(());
        };
        let packed_here;
        let frame = match &chunk.frame {
            Some(frame) => frame,
            None => {
                packed_here = zstd::bulk::compress(&chunk.bytes, WIRE_ZSTD_LEVEL)
                    .map_err(io_at(path.as_path()))?;
                &packed_here
            }
        };
        file.write_all(frame).map_err(io_at(path.as_path()))
    }

    fn on_chunk(&mut self, offset: u64, data: Vec<u8>) -> Result<(), NodeError> {
        let Some(inc) = self.incoming.as_mut() else {
            return Err(node_error("a chunk before the header"));
        };
        if offset != inc.written || inc.written + data.len() as u64 > inc.len {
            return Err(node_error(format!("a chunk at {offset} out of place")));
        }
        let len = data.len() as u64;
        if !inc.sink.write(data) {
            // The writing thread stopped on an error: `finish` gives it.
            let Some(inc) = self.incoming.take() else {
                return Err(node_error("the incoming file went away"));
            };
            return Err(inc
                .sink
                .finish()
                .err()
                .unwrap_or_else(|| node_error("the incoming file stopped")));
        }
        inc.written += len;
        Ok(())
    }

    fn on_end(&mut self, file_hash: &[u8]) -> Result<(Hlc, u64, u64), NodeError> {
        let Some(inc) = self.incoming.take() else {
            return Err(node_error("the end before the header"));
        };
        if inc.written != inc.len || self.next != inc.log_end.0 + 1 {
            return Err(node_error("the end came early"));
        }
        let (log_end, len, hlc) = (inc.log_end, inc.len, inc.hlc);
        self.seen = Some((log_end.0, len, len));
        // Written, synced and hashed by the file's thread.
        let hash = inc.sink.finish()?;
        if hash.as_bytes().as_slice() != file_hash {
            return Err(node_error("the projection file does not match its hash"));
        }
        tracing::debug!("snapshot: end");
        Ok((hlc, log_end.0, len))
    }
}

/// Feeds `messages` to a snapshot receiver writing into `dir`, as a joining device's receiving
/// loop does, until one is refused or the snapshot ends: the log entries it handed to the
/// journal, and the log end and file length it reached (`Ok(None)`: not the end yet). For the
/// `snapshot_receiver` fuzz target only (built by cargo-fuzz, which sets `cfg(fuzzing)`).
#[cfg(fuzzing)]
pub fn fuzz_receive(
    dir: &Path,
    messages: impl IntoIterator<Item = DeviceMessage>,
) -> (u64, Result<Option<(u64, u64)>, String>) {
    let (segments, stored) = crossbeam_channel::unbounded();
    let mut reader = SnapshotReader::new(dir, segments);
    let mut entries = 0u64;
    for message in messages {
        let step = reader.on_message(message);
        entries += stored.try_iter().map(|(_, e)| e.len() as u64).sum::<u64>();
        match step {
            Ok(Some((_, log_end, len))) => return (entries, Ok(Some((log_end, len)))),
            Ok(None) => {}
            Err(e) => return (entries, Err(e.to_string())),
        }
    }
    (entries, Ok(None))
}

/// What [`receive`] stored.
struct Received {
    log_entries: u64,
    file_bytes: u64,
    /// The thread saving the log index; it holds the journal open until it ends.
    index_saved: std::thread::JoinHandle<()>,
    /// The join's job, ended once the projection is installed (it holds the journal open).
    job: JoinJob,
    /// Whether the log arrived from a compaction base: the file received is also the
    /// library's snapshot of what came before it.
    compacted: bool,
}

#[cfg(test)]
mod tests {
    //! A hostile or broken sender: every bad snapshot is refused with an error, nothing is
    //! installed, and the library opens as it was.

    use super::*;
    use keel_engine::{CreateOptions, Home, KdfParams, Library};
    use keel_transport::{Identity, Pins};

    /// Feeds `probe` `(milliseconds, bytes received)` readings; returns what it decided.
    fn probe_readings(probe: &mut LinkProbe, readings: &[(u64, u64)]) -> Option<u64> {
        let start = Instant::now();
        readings.iter().find_map(|&(ms, received)| {
            probe.observe_at(received, start + Duration::from_millis(ms))
        })
    }

    #[test]
    fn a_sender_that_pauses_before_its_first_bytes_does_not_make_a_fast_link_slow() {
        // The header in, then 200 ms of nothing (the sender reading its file), then 1 MiB
        // in 20 ms: 50 MB/s while bytes flow.
        let mut readings: Vec<(u64, u64)> = (0..=40).map(|tick| (tick * 5, 100)).collect();
        readings.extend((1..=4).map(|tick| (200 + tick * 5, 100 + tick * (256 << 10))));
        let mut probe = LinkProbe::new(SlowLink::default());
        assert_eq!(probe_readings(&mut probe, &readings), None);
        assert!(probe.decided, "the probe measured its bytes");
    }

    #[test]
    fn a_link_slower_than_the_rule_is_found_slow_while_bytes_flow() {
        // 8 MB/s, steady: 40 KB every 5 ms.
        let readings: Vec<(u64, u64)> = (0..=100).map(|tick| (tick * 5, tick * 40_000)).collect();
        let mut probe = LinkProbe::new(SlowLink::default());
        let rate = probe_readings(&mut probe, &readings).expect("found slow");
        assert!((7_000_000..9_000_000).contains(&rate), "{rate}");
    }

    /// A joined (follower) library with an empty log, closed; returns its folder and key.
    fn joined_library(root: &Path) -> (Home, PathBuf, LibraryId, LibraryKey) {
        let home = Home::new(root.join("joiner"));
        let library = LibraryId(uuid::Uuid::new_v4());
        let key = LibraryKey::generate();
        let options = CreateOptions {
            kdf: KdfParams::INSECURE_FAST,
        };
        let lib = Library::create_joined(&home, "lib", "pw", library, &key, options, None)
            .expect("creates");
        let dir = lib.dir().to_path_buf();
        lib.close().expect("closes");
        (home, dir, library, key)
    }

    /// Runs `fetch` against a fake sender that answers the request with `script`.
    fn fetch_from_fake(
        root: &Path,
        script: Vec<DeviceMessage>,
    ) -> Result<SnapshotOutcome, NodeError> {
        let (home, dir, library, key) = joined_library(root);
        let joiner = home.device().expect("device");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let sender = Identity::generate("sender").expect("identity");
            let pins = Pins::new();
            pins.pin(joiner.id);
            let endpoint = Endpoint::bind(&sender, SocketAddr::from(([127, 0, 0, 1], 0)), pins)
                .expect("binds");
            let addr = endpoint.local_addr().expect("addr");
            let device = sender.device();
            let serving = tokio::spawn(async move {
                let Some(Ok(conn)) = endpoint.accept().await else {
                    return;
                };
                let hello = DeviceMessage::Hello {
                    device,
                    library,
                    epoch: Epoch::default(),
                    log_end: Lsn(1),
                    positions: Vec::new(),
                };
                if conn.send(&hello).await.is_err() {
                    return;
                }
                if !matches!(conn.recv().await, Ok(DeviceMessage::SnapshotRequest { .. })) {
                    return;
                }
                for message in script {
                    if conn.send(&message).await.is_err() {
                        return;
                    }
                }
                let _ = conn.recv().await;
            });
            let local = SocketAddr::from(([127, 0, 0, 1], 0));
            let joiner = Identity::from_parts(joiner.cert_der.clone(), joiner.key_der.clone());
            let ours = Endpoint::bind(&joiner, local, Pins::new()).expect("binds");
            let result = fetch(
                &ours,
                device,
                addr,
                (library, ""),
                &key,
                (&dir, SlowLink::never()),
                None,
            )
            .await;
            ours.close();
            serving.abort();
            result
        })
    }

    fn begin(file_bytes: u64) -> DeviceMessage {
        DeviceMessage::SnapshotBegin {
            epoch: Epoch::default(),
            applied: Lsn(0),
            log_end: Lsn(0),
            file_bytes,
            hlc: Hlc::default(),
            base: Lsn(0),
            base_epoch: Epoch::default(),
            head: Epoch::default(),
            base_kept: false,
        }
    }

    fn chunk(data: &[u8]) -> DeviceMessage {
        DeviceMessage::SnapshotChunk {
            offset: 0,
            data: ByteBuf::from(data.to_vec()),
            raw_len: 0,
        }
    }

    fn end(data: &[u8]) -> DeviceMessage {
        DeviceMessage::SnapshotEnd {
            file_hash: ByteBuf::from(blake3::hash(data).as_bytes().to_vec()),
        }
    }

    /// The library still opens with its own projection and an empty log.
    fn assert_untouched(root: &Path) {
        let dir = root.join("joiner").join("libraries").join("lib.keel");
        assert!(
            !dir.join(INCOMING_FILE).exists(),
            "the incoming file is removed"
        );
        let lib = Library::open(&Home::new(root.join("joiner")), "lib", "pw").expect("opens");
        let status = lib.status().expect("status");
        assert_eq!(status.journal.log_len, 0);
        assert_eq!(
            status.counts.devices, 1,
            "its own Device record is still there"
        );
        lib.close().expect("closes");
    }

    #[test]
    fn a_file_that_does_not_match_its_hash_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = b"0123456789";
        let error = fetch_from_fake(dir.path(), vec![begin(10), chunk(data), end(b"other")])
            .expect_err("refused");
        assert!(error.to_string().contains("hash"), "{error}");
        assert_untouched(dir.path());
    }

    #[test]
    fn a_file_that_is_not_a_projection_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = vec![7u8; 8192];
        let error = fetch_from_fake(dir.path(), vec![begin(8192), chunk(&data), end(&data)])
            .expect_err("refused");
        assert!(
            matches!(error, NodeError::Projection(_)),
            "a typed projection error: {error}"
        );
        assert_untouched(dir.path());
    }

    #[test]
    fn a_packed_chunk_that_does_not_unpack_to_its_length_is_refused() {
        let data = vec![7u8; 8192];
        let DeviceMessage::SnapshotChunk {
            data: packed,
            raw_len,
            ..
        } = compressed_chunk(0, data.clone(), WIRE_ZSTD_LEVEL)
        else {
            panic!("a chunk");
        };
        assert!(
            raw_len == 8192 && packed.len() < 100,
            "{raw_len} {}",
            packed.len()
        );
        assert_eq!(
            unpacked(packed.clone(), raw_len).expect("unpacks").bytes,
            data
        );
        // Claiming fewer bytes than the frame holds, or more, or a frame that is not one.
        for (bytes, claimed) in [
            (packed.clone(), 8191),
            (packed.clone(), 8193),
            (ByteBuf::from(vec![1u8; 64]), 64),
        ] {
            let dir = tempfile::tempdir().expect("tempdir");
            let lying = DeviceMessage::SnapshotChunk {
                offset: 0,
                data: bytes,
                raw_len: claimed,
            };
            let error = fetch_from_fake(dir.path(), vec![begin(8192), lying, end(&data)])
                .expect_err("refused");
            assert!(error.to_string().contains("chunk"), "{error}");
            assert_untouched(dir.path());
        }
    }

    #[test]
    fn a_chunk_out_of_place_or_past_the_end_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let error =
            fetch_from_fake(dir.path(), vec![begin(4), chunk(b"too long")]).expect_err("refused");
        assert!(error.to_string().contains("out of place"), "{error}");
        assert_untouched(dir.path());
        let dir = tempfile::tempdir().expect("tempdir");
        let error = fetch_from_fake(dir.path(), vec![chunk(b"no header")]).expect_err("refused");
        assert!(error.to_string().contains("before the header"), "{error}");
        assert_untouched(dir.path());
    }

    #[test]
    fn a_log_record_that_does_not_open_is_refused_and_nothing_is_stored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let segment = DeviceMessage::Replication(ReplicationMessage::LogSegment {
            epoch: Epoch::default(),
            first: Lsn(1),
            prev_epoch: Epoch::default(),
            leader_end: Lsn(1),
            base: Lsn(0),
            entries: vec![WireLogEntry {
                epoch: Epoch::default(),
                sealed: ByteBuf::from(vec![1u8; 120]),
            }],
        });
        let data = vec![7u8; 16];
        let error = fetch_from_fake(
            dir.path(),
            vec![
                DeviceMessage::SnapshotBegin {
                    epoch: Epoch::default(),
                    applied: Lsn(0),
                    log_end: Lsn(1),
                    file_bytes: 16,
                    hlc: Hlc::default(),
                    base: Lsn(0),
                    base_epoch: Epoch::default(),
                    head: Epoch::default(),
                    base_kept: false,
                },
                segment,
                chunk(&data),
                end(&data),
            ],
        )
        .expect_err("refused");
        assert!(matches!(error, NodeError::Journal(_)), "{error}");
        assert_untouched(dir.path());
    }
}
