//! `Library`: one open library — its journal, projections, clock, applier and event bus.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use keel_journal::{Journal, JournalOptions, KdfParams, LibraryKey, Placement};
use keel_projections::{AppliedPosition, Counts, Projections};
use keel_schema::{ChangeId, Device, DeviceId, Epoch, HlcClock, LibraryId, Registry, Syncable};
use serde::Serialize;
use tokio::sync::broadcast;
use uuid::Uuid;

use crate::applier::{self, advance, ApplyState, Shared};
use crate::config::{valid_name, DeviceIdentity, Home, LibraryConfig, LIBRARY_CONFIG_VERSION};
use crate::error::{io_at, EngineError};
use crate::events::{Event, EVENT_BUS_CAPACITY};
use crate::replay::replay;
use crate::tx::Tx;

/// How a library's journal is reached when it opens.
#[derive(Clone, Copy)]
enum Opening {
    /// Just created: the journal is made now (a joining device's follows, from `follower`).
    Created { follower: Option<Epoch> },
    /// An existing library: a journal that holds nothing of it means its creation stopped.
    Existing,
}

/// A library created by pairing: it starts as a follower with no epoch, and its Device record
/// carries `device_name` when one was given.
#[derive(Debug, Clone, Copy)]
struct Joined<'a> {
    device_name: Option<&'a str>,
}

/// Options for creating a library.
#[derive(Debug, Clone, Copy)]
pub struct CreateOptions {
    /// Argon2id parameters for wrapping the library key.
    pub kdf: KdfParams,
}

impl Default for CreateOptions {
    fn default() -> Self {
        Self {
            kdf: KdfParams::RECOMMENDED,
        }
    }
}

/// What a successful `transact` wrote. Every change in it is durable.
#[derive(Debug, Clone)]
pub struct CommitReceipt {
    /// The ids of the changes, in order.
    pub change_ids: Vec<ChangeId>,
    /// Where each change was written, in order.
    pub placements: Vec<Placement>,
}

/// A transaction handed to the journal writer; acknowledged by [`PendingTransaction::wait`].
#[derive(Debug)]
#[must_use = "a pipelined transaction is acknowledged only by wait()"]
pub struct PendingTransaction<'a> {
    library: &'a Library,
    pending: Pending,
    change_ids: Vec<ChangeId>,
    /// Held until the changes are durable (see `crate::floor`).
    _in_flight: crate::floor::Ticket<'a>,
}

/// Where a pipelined transaction's changes went.
enum Pending {
    /// Nothing to commit.
    Nothing,
    /// To the journal writer.
    Journal(keel_journal::PendingCommit),
    /// To the leading node's core (see `crate::leader_commit`); the changes are kept for the
    /// journal in case the core does not write them.
    Leader {
        answer: crossbeam_channel::Receiver<crate::leader_commit::SequenceReply>,
        changes: Vec<keel_schema::Change>,
    },
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Pending::Nothing => f.write_str("Nothing"),
            Pending::Journal(p) => f.debug_tuple("Journal").field(p).finish(),
            Pending::Leader { changes, .. } => write!(f, "Leader({} changes)", changes.len()),
        }
    }
}

impl PendingTransaction<'_> {
    /// Waits until the changes are durable.
    pub fn wait(self) -> Result<CommitReceipt, EngineError> {
        let placements = match self.pending {
            Pending::Journal(p) => p.wait()?,
            Pending::Leader { answer, changes } => match sequenced(&answer) {
                Some(placements) => placements,
                None => self.library.journal()?.commit(changes)?,
            },
            Pending::Nothing => Vec::new(),
        };
        if let Ok(mut committed) = self.library.committed.lock() {
            for p in &placements {
                advance(&mut committed, *p);
            }
        }
        Ok(CommitReceipt {
            change_ids: self.change_ids,
            placements,
        })
    }
}

/// The oldest clock among `changes`.
fn oldest_clock(changes: &[keel_schema::Change]) -> Option<keel_schema::Hlc> {
    changes.iter().map(|c| c.hlc).min()
}

/// Waits for the core's answer to a sequencing request: the placements, or `None` when the
/// changes must go down the usual path (nothing was written, or writing the log failed and the
/// leader deduplicates them by id).
fn sequenced(
    answer: &crossbeam_channel::Receiver<crate::leader_commit::SequenceReply>,
) -> Option<Vec<Placement>> {
    use crate::leader_commit::SequenceReply;
    match answer.recv() {
        Ok(SequenceReply::Done(placements)) => Some(placements),
        Ok(SequenceReply::Failed(reason)) => {
            tracing::warn!(%reason, "the core could not append this commit; committing it to the offline journal");
            None
        }
        // Not leading, or the core stopped before it took the request: nothing written.
        Ok(SequenceReply::NotLeading) | Err(_) => None,
    }
}

/// A summary of a library for `keel status`.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "typescript", derive(ts_rs::TS))]
pub struct Status {
    /// Library name.
    pub name: String,
    /// Library id.
    pub library_id: String,
    /// This device's id (hex).
    pub device_id: String,
    /// Visible rows per model.
    pub counts: Counts,
    /// Journal counters.
    pub journal: JournalStatus,
    /// Last log position applied to the projections.
    pub applied_lsn: u64,
    /// Changes waiting for a dependency.
    pub parked: u64,
    /// The projection digest.
    pub digest: String,
    /// Bytes on disk, by part.
    pub disk: DiskUsage,
}

/// What a library takes on disk, by part (bytes).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "typescript", derive(ts_rs::TS))]
pub struct DiskUsage {
    /// The journal (`journal.redb`): the log, the offline journal, positions and jobs.
    pub journal: u64,
    /// The projections (`projections.sqlite` and its write-ahead log).
    pub projections: u64,
    /// The snapshot the compacted log lives on as (`snapshot.sqlite`, 0 until a compaction).
    pub snapshot: u64,
    /// Everything else in the library's folder (its configuration, the paired devices, a
    /// rebuild's or verify's aside projection while one runs).
    pub other: u64,
}

impl DiskUsage {
    /// The usage of library folder `dir` (files directly in it; a missing one counts 0).
    fn of(dir: &Path) -> Result<Self, EngineError> {
        let mut usage = Self::default();
        for item in std::fs::read_dir(dir).map_err(io_at(dir))? {
            let item = item.map_err(io_at(dir))?;
            // A file removed meanwhile (an aside projection moved into place) counts 0.
            let Ok(meta) = item.metadata() else { continue };
            if !meta.is_file() {
                continue;
            }
            let name = item.file_name();
            let name = name.to_string_lossy();
            if name == JOURNAL_FILE {
                usage.journal += meta.len();
            } else if name.starts_with(PROJECTIONS_FILE) {
                usage.projections += meta.len();
            } else if name == crate::compact::SNAPSHOT_FILE {
                usage.snapshot += meta.len();
            } else {
                usage.other += meta.len();
            }
        }
        Ok(usage)
    }

    /// All of it.
    pub fn total(&self) -> u64 {
        self.journal + self.projections + self.snapshot + self.other
    }
}

/// Journal counters in `status --json`.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "typescript", derive(ts_rs::TS))]
pub struct JournalStatus {
    /// Changes this device has made (all durable).
    pub local_changes: u64,
    /// Changes in the offline journal not yet sequenced by a leader.
    pub offline: u64,
    /// Records in the leader log (after its compaction position).
    pub log_len: u64,
    /// The last log position.
    pub last_lsn: u64,
    /// The compaction position: the log before it was dropped, its state kept in the snapshot
    /// (0: never compacted).
    pub compacted_to: u64,
    /// Pages of a dropped log still being deleted in the background after a compaction or a
    /// backfill (0: none); their disk space is reused once they are gone.
    pub dropped_log_pages: u64,
    /// The position of a snapshot a compaction made that waits for every device to
    /// acknowledge it (see [`crate::CompactReport::waiting_at`]); `None` when none waits.
    #[cfg_attr(feature = "typescript", ts(type = "number | null"))]
    pub snapshot_waiting_at: Option<u64>,
}

/// The current time in ms since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// An open library. Dropping it closes it cleanly (everything committed is applied first).
pub struct Library {
    name: String,
    dir: PathBuf,
    config: LibraryConfig,
    device: DeviceIdentity,
    journal: Option<Journal>,
    /// The library key; replaced when it rotates or keys arrive from a peer.
    key: Mutex<LibraryKey>,
    pub(crate) shared: Arc<Shared>,
    clock: Mutex<HlcClock>,
    /// Signs this device's file facts (see `attest.rs`).
    signer: keel_projections::Signer,
    committed: Mutex<AppliedPosition>,
    applier: Option<JoinHandle<()>>,
    /// The models it syncs: Keel's and the host's (see [`Home::with_model`]).
    models: Registry,
}

impl std::fmt::Debug for Library {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Library({} {})", self.name, self.config.library_id)
    }
}

/// The journal's file in a library folder.
pub const JOURNAL_FILE: &str = "journal.redb";
/// The projection's file in a library folder.
pub const PROJECTIONS_FILE: &str = "projections.sqlite";
/// The projection file a joining device receives, beside the projection until it is installed.
pub const JOIN_INCOMING_FILE: &str = "projections.sqlite.incoming";
/// The received file's chunks as they arrive packed, when the log comes from a compaction
/// base: moved to [`SNAPSHOT_FILE`](crate::SNAPSHOT_FILE) once the file is installed.
pub const JOIN_FRAMES_FILE: &str = "snapshot.sqlite.zst.incoming";

fn remove_projection_files(dir: &Path) -> Result<(), EngineError> {
    Ok(Projections::remove_files(&dir.join(PROJECTIONS_FILE))?)
}

/// Durable batches waiting for the applier before the journal writer waits for it. Memory is
/// bounded in changes ([`COMMITTED_QUEUE_CHANGES`]), so this bound only keeps small live
/// commits from waiting (decision 0036).
const COMMITTED_QUEUE_BATCHES: usize = 64;
/// Changes in durable batches waiting for the applier before the journal writer waits for it
/// (see [`keel_journal::ApplyBudget`]): during a catch-up, 64 batches of segments could hold
/// 250k decoded changes; this bounds them to 64k without holding back small live commits or
/// slowing a join (decision 0036). 64k rather than 32k lets the applier take three of a bulk
/// writer's 20,000-change commits in one SQLite transaction, where 32k let it take one: the
/// scale run's generate step 15% faster at 1M, 30% at 3M, 17% at 10M (decision 0069, fifth run).
pub(crate) const COMMITTED_QUEUE_CHANGES: u64 = 65_536;

impl Library {
    /// Creates library `name` in `home`, with its key wrapped under `password`.
    pub fn create(
        home: &Home,
        name: &str,
        password: &str,
        options: CreateOptions,
    ) -> Result<Self, EngineError> {
        let library = LibraryId(Uuid::new_v4());
        Self::create_with(
            home,
            name,
            password,
            library,
            &LibraryKey::generate(),
            options,
            None,
        )
    }

    /// Creates library `name` in `home` from a key received by pairing (see
    /// `keel_node::join`): same library id and key as the inviting device, wrapped under this
    /// device's `password`. The journal starts as a follower with no epoch: it learns the leader's
    /// log by replication. This device's Device record carries `device_name` (default: the home's
    /// device name).
    pub fn create_joined(
        home: &Home,
        name: &str,
        password: &str,
        library: LibraryId,
        key: &LibraryKey,
        options: CreateOptions,
        device_name: Option<&str>,
    ) -> Result<Self, EngineError> {
        let joined = Joined { device_name };
        Self::create_with(home, name, password, library, key, options, Some(joined))
    }

    fn create_with(
        home: &Home,
        name: &str,
        password: &str,
        library: LibraryId,
        key: &LibraryKey,
        options: CreateOptions,
        joined: Option<Joined<'_>>,
    ) -> Result<Self, EngineError> {
        if !valid_name(name) {
            return Err(EngineError::InvalidName(name.into()));
        }
        if password.is_empty() {
            return Err(EngineError::EmptyPassword);
        }
        let dir = home.library_dir(name);
        if dir.join("library.toml").exists() {
            return Err(EngineError::LibraryExists(name.into()));
        }
        let mut device = home.device()?;
        if let Some(name) = joined.and_then(|j| j.device_name) {
            device.name = name.into();
        }
        std::fs::create_dir_all(&dir).map_err(io_at(&dir))?;
        crate::config::make_private(&dir)?;
        let mut config = LibraryConfig {
            version: LIBRARY_CONFIG_VERSION,
            name: name.into(),
            library_id: library.0,
            created_ms: now_ms(),
            key: key.wrap(library, password, options.kdf)?,
            rotated: Vec::new(),
            check: None,
        };
        config.check = key_check(key, config.key.key_id, library);
        let others: Vec<u32> = key.key_ids().into_iter().skip(1).collect();
        for id in others {
            config.rotated.push(key.chain(library, key.key_id(), id)?);
        }
        config.write(&dir)?;
        Self::open_unlocked(
            name,
            dir,
            config,
            device,
            key,
            Opening::Created {
                follower: joined.map(|_| Epoch::default()),
            },
            home.models(),
        )
    }

    /// Opens library `name` in `home`. A wrong password fails before anything is written.
    pub fn open(home: &Home, name: &str, password: &str) -> Result<Self, EngineError> {
        if !valid_name(name) {
            return Err(EngineError::InvalidName(name.into()));
        }
        let dir = home.library_dir(name);
        if !dir.exists() {
            return Err(EngineError::NoSuchLibrary(name.into()));
        }
        let mut config = LibraryConfig::read(&dir)?;
        let key = LibraryKey::unwrap_with(&config.key, config.library(), password)?
            .unchain(config.library(), &config.rotated)?;
        if config.check.is_none() {
            // A library made before key checks: it gets one now.
            config.check = key_check(&key, config.key.key_id, config.library());
            config.write(&dir)?;
        }
        Self::open_checked(home, name, dir, config, &key)
    }

    /// Opens library `name` in `home` with its keys as [`Library::export_keys`] gave them (a
    /// host that keeps them in its own keychain), instead of the password: no key derivation
    /// runs. Keys that are not this library's fail with [`EngineError::WrongKey`] before
    /// anything is read; so do any keys for a library that has no key check yet (open it once
    /// with its password).
    pub fn open_with_library_key(
        home: &Home,
        name: &str,
        keys: &[u8],
    ) -> Result<Self, EngineError> {
        if !valid_name(name) {
            return Err(EngineError::InvalidName(name.into()));
        }
        let dir = home.library_dir(name);
        if !dir.exists() {
            return Err(EngineError::NoSuchLibrary(name.into()));
        }
        let config = LibraryConfig::read(&dir)?;
        let given = LibraryKey::from_bytes(keys).ok_or(EngineError::WrongKey)?;
        let checked = config.check.is_some()
            && key_check(&given, config.key.key_id, config.library()) == config.check;
        if !checked {
            return Err(EngineError::WrongKey);
        }
        // Keys rotated since the host saved these are in the chain, sealed under the first.
        let key = given
            .unchain(config.library(), &config.rotated)
            .map_err(|_| EngineError::WrongKey)?;
        Self::open_checked(home, name, dir, config, &key)
    }

    /// The library's keys (all of them, current first), for a host to keep in its own keychain
    /// and open the library with ([`Library::open_with_library_key`]). Secret, like the
    /// password: whoever holds them reads every change.
    pub fn export_keys(&self) -> Vec<u8> {
        self.key().to_bytes()
    }

    /// Opens a library whose keys are unlocked and checked.
    fn open_checked(
        home: &Home,
        name: &str,
        dir: PathBuf,
        config: LibraryConfig,
        key: &LibraryKey,
    ) -> Result<Self, EngineError> {
        let journal_path = dir.join(JOURNAL_FILE);
        let journal_len = std::fs::metadata(&journal_path)
            .map(|m| m.len())
            .unwrap_or(0);
        if journal_len == 0 {
            let stored = [PROJECTIONS_FILE, crate::SNAPSHOT_FILE]
                .iter()
                .any(|f| dir.join(f).exists());
            return Err(if stored {
                EngineError::JournalMissing(journal_path)
            } else {
                EngineError::Unfinished(dir)
            });
        }
        let device = home.device()?;
        let opened = Self::open_unlocked(
            name,
            dir.clone(),
            config,
            device,
            key,
            Opening::Existing,
            home.models(),
        );
        match opened {
            Err(EngineError::Journal(keel_journal::JournalError::Uninitialised)) => {
                Err(EngineError::Unfinished(dir))
            }
            other => other,
        }
    }

    /// Changes the password: unwraps the library key with `old` and wraps it under `new` (fresh
    /// salt, same Argon2id parameters). The journal is not re-encrypted. The library must not be
    /// open elsewhere.
    pub fn change_password(
        home: &Home,
        name: &str,
        old: &str,
        new: &str,
        kdf: KdfParams,
    ) -> Result<(), EngineError> {
        if new.is_empty() {
            return Err(EngineError::EmptyPassword);
        }
        let dir = home.library_dir(name);
        if !dir.exists() {
            return Err(EngineError::NoSuchLibrary(name.into()));
        }
        let mut config = LibraryConfig::read(&dir)?;
        let key = LibraryKey::unwrap_with(&config.key, config.library(), old)?;
        config.key = key.wrap(config.library(), new, kdf)?;
        config.write(&dir)
    }

    /// Opens library `name` after discarding its projections, which are rebuilt from the journal.
    /// The way out of [`EngineError::ProjectionAhead`].
    pub fn open_rebuilding(home: &Home, name: &str, password: &str) -> Result<Self, EngineError> {
        let dir = home.library_dir(name);
        let config = LibraryConfig::read(&dir)?;
        // Check the password before touching anything.
        LibraryKey::unwrap_with(&config.key, config.library(), password)?;
        remove_projection_files(&dir)?;
        Self::open(home, name, password)
    }

    fn open_unlocked(
        name: &str,
        dir: PathBuf,
        config: LibraryConfig,
        device: DeviceIdentity,
        key: &LibraryKey,
        opening: Opening,
        models: &Registry,
    ) -> Result<Self, EngineError> {
        let (follower_epoch, existing) = match opening {
            Opening::Created { follower } => (follower, false),
            Opening::Existing => (None, true),
        };
        // Every reference names a registered model (before anything opens or is written).
        models.check()?;
        let (committed_tx, committed_rx) = crossbeam_channel::bounded(COMMITTED_QUEUE_BATCHES);
        let budget = Arc::new(keel_journal::ApplyBudget::new(COMMITTED_QUEUE_CHANGES));
        let journal = Journal::open(
            &dir.join(JOURNAL_FILE),
            config.library(),
            key,
            device.id,
            JournalOptions {
                committed: Some(committed_tx),
                role: follower_epoch.map(|_| keel_journal::CommitRoute::Offline),
                committed_budget: Some(budget.clone()),
                direct_writes: false,
                existing,
            },
        )?;
        if let Some(epoch) = follower_epoch {
            journal.election().store(epoch, epoch)?;
        }
        crate::compact::remove_scratch(&dir);
        let (projections, healed) = heal_projections(&journal, &dir, models, device.id)?;
        crate::config::make_private(&dir)?;
        let projections_path = dir.join(PROJECTIONS_FILE);
        let mut clock = HlcClock::new(device.id);
        if let Some(hwm) = journal.hlc_high_water()? {
            clock.observe(hwm);
        }
        let (events, _) = broadcast::channel(EVENT_BUS_CAPACITY);
        let reader = Projections::open_reader_for(&projections_path, models)?;
        let shared = Arc::new(Shared {
            projections: Mutex::new(projections),
            reader: Mutex::new(reader),
            applied: Mutex::new(ApplyState {
                position: healed.position,
                batch: 0,
                error: None,
            }),
            applied_changed: Condvar::new(),
            events,
            local_commits: Mutex::new(None),
            sequencer: Mutex::new(None),
            leading: std::sync::atomic::AtomicBool::new(false),
            bulk_until: Mutex::new(None),
            budget,
            models: models.clone(),
            jobs: Default::default(),
            indexing: Mutex::new(()),
            history: Mutex::new(crate::compact::History::default()),
            waiting_at: std::sync::atomic::AtomicU64::new(0),
            clock_seen: Mutex::new(None),
            floor: crate::floor::FloorState::default(),
            serving: Mutex::new(std::sync::Weak::new()),
            catch_up: Mutex::new(None),
        });
        let applier_shared = shared.clone();
        let applier = std::thread::Builder::new()
            .name("keel-applier".into())
            .spawn(move || applier::run(applier_shared, committed_rx))
            .map_err(io_at(&dir))?;
        let signer = crate::attest::signer(&device, &dir)?;
        let library = Self {
            name: name.into(),
            signer,
            dir,
            config,
            device,
            journal: Some(journal),
            key: Mutex::new(key.clone()),
            shared,
            clock: Mutex::new(clock),
            committed: Mutex::new(healed.position),
            applier: Some(applier),
            models: models.clone(),
        };
        library.register_device()?;
        library.record_models()?;
        library.mark_interrupted_jobs()?;
        Ok(library)
    }

    /// The models this library syncs: Keel's and the host's.
    pub fn models(&self) -> &Registry {
        &self.models
    }

    /// Makes sure this device has its Device record.
    fn register_device(&self) -> Result<(), EngineError> {
        let uuid = self.device.id.record_uuid();
        if self.get::<Device>(uuid)?.is_some() {
            return Ok(());
        }
        let device = Device {
            uuid,
            device_id: self.device.id.to_hex(),
            name: self.device.name.clone(),
            os: std::env::consts::OS.into(),
            created_ms: now_ms() as i64,
        };
        self.transact(|tx| {
            tx.upsert(&device);
            Ok(())
        })?;
        self.flush()
    }

    /// Freezes the projection file for copying to a device that joins (see
    /// [`keel_projections::FrozenFile`]); `None` if it cannot be frozen now.
    pub(crate) fn freeze_projections(
        &self,
    ) -> Result<Option<keel_projections::FrozenFile>, EngineError> {
        let projections = self
            .shared
            .projections
            .lock()
            .map_err(|_| EngineError::Closed)?;
        Ok(projections.freeze()?)
    }

    /// The journal (for the replication runtime).
    pub(crate) fn journal(&self) -> Result<&Journal, EngineError> {
        self.journal.as_ref().ok_or(EngineError::Closed)
    }

    /// The library key (for pairing a new device).
    pub(crate) fn key(&self) -> LibraryKey {
        match self.key.lock() {
            Ok(key) => key.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Rotates the library key (after a revocation): changes committed from now on are sealed
    /// under a new key that the revoked device never receives. The new key is stored in
    /// `library.toml` sealed under the password-wrapped key, and handed to paired devices by
    /// the node. Returns the new key id.
    pub fn rotate_key(&self) -> Result<u32, EngineError> {
        self.replace_key(|key| Ok(Some(key.rotated())))?;
        Ok(self.key().key_id())
    }

    /// Adds library keys a paired device sent (see [`Library::rotate_key`]). Returns whether
    /// any was new. Keys that contradict the held ones are refused, none taken.
    pub fn learn_keys(&self, keys: &[keel_journal::SharedKey]) -> Result<bool, EngineError> {
        self.replace_key(|key| Ok(key.learn(keys)?))
    }

    /// Every key of the library, to hand to a paired device over its pinned session.
    pub fn shared_keys(&self) -> Vec<keel_journal::SharedKey> {
        self.key().shared()
    }

    /// Replaces the library key with what `next` makes of it (`None`: unchanged), storing the
    /// keys not yet in `library.toml` there first.
    fn replace_key(
        &self,
        next: impl FnOnce(&LibraryKey) -> Result<Option<LibraryKey>, EngineError>,
    ) -> Result<bool, EngineError> {
        let mut key = self.key.lock().map_err(|_| EngineError::Closed)?;
        let Some(new) = next(&key)? else {
            return Ok(false);
        };
        let mut config = LibraryConfig::read(&self.dir)?;
        let base = config.key.key_id;
        let stored: Vec<u32> = config.rotated.iter().map(|c| c.key_id).collect();
        for id in new.key_ids() {
            if id != base && !stored.contains(&id) {
                config
                    .rotated
                    .push(new.chain(self.config.library(), base, id)?);
            }
        }
        config.write(&self.dir)?;
        self.journal()?.set_key(&new);
        tracing::info!(
            key_id = new.key_id(),
            generation = new.generation(),
            "library key replaced"
        );
        *key = new;
        Ok(true)
    }

    /// This device's identity.
    pub fn device(&self) -> &DeviceIdentity {
        &self.device
    }

    /// While the running node leads: has its core append `changes` to the log (see
    /// `crate::leader_commit`). `None` when the node does not lead or runs no more: nothing was
    /// written, and the caller commits by the usual path.
    pub(crate) fn sequence_as_leader(
        &self,
        changes: &[keel_schema::Change],
    ) -> Result<Option<Vec<Placement>>, EngineError> {
        match self.request_sequencing(changes)? {
            Some(answer) => Ok(sequenced(&answer)),
            None => Ok(None),
        }
    }

    /// Hands `changes` to the core to sequence, if the node leads: the answer arrives on the
    /// receiver (see [`sequenced`]). `None`: not leading, or no core; nothing was sent.
    fn request_sequencing(
        &self,
        changes: &[keel_schema::Change],
    ) -> Result<Option<crossbeam_channel::Receiver<crate::leader_commit::SequenceReply>>, EngineError>
    {
        use crate::leader_commit::SequenceRequest;
        if !self
            .shared
            .leading
            .load(std::sync::atomic::Ordering::Acquire)
        {
            return Ok(None);
        }
        let Some(sequencer) = self.shared.sequencer.lock().ok().and_then(|s| s.clone()) else {
            return Ok(None);
        };
        let journal = self.journal()?;
        let sealed = changes.iter().map(|c| (c.id, journal.seal(c))).collect();
        let (reply, answer) = crossbeam_channel::bounded(1);
        let request = SequenceRequest {
            changes: sealed,
            reply,
        };
        if sequencer.send(request).is_err() {
            return Ok(None);
        }
        Ok(Some(answer))
    }

    /// Attaches a node's channels (see [`crate::NodeLink`]); fails if one is attached already.
    pub(crate) fn attach_node(
        &self,
        offline_commits: crossbeam_channel::Sender<Vec<ChangeId>>,
        sequencer: crossbeam_channel::Sender<crate::leader_commit::SequenceRequest>,
    ) -> Result<(), EngineError> {
        let mut commits = self
            .shared
            .local_commits
            .lock()
            .map_err(|_| EngineError::Closed)?;
        let mut sequence = self
            .shared
            .sequencer
            .lock()
            .map_err(|_| EngineError::Closed)?;
        if commits.is_some() || sequence.is_some() {
            return Err(EngineError::Linked);
        }
        *commits = Some(offline_commits);
        *sequence = Some(sequencer);
        Ok(())
    }

    /// The log end this device held before it last cut its log at a damaged record, if it did
    /// (epoch counter, epoch's device, position): it votes only for logs reaching it and
    /// stands only once its own log does (see `Replica::handle_abdicate`).
    pub fn vote_floor(&self) -> Result<Option<(u64, DeviceId, u64)>, EngineError> {
        let floor = self.journal()?.election().vote_floor()?;
        Ok(floor.map(|(epoch, lsn)| (epoch.counter, epoch.device, lsn.0)))
    }

    /// Forgets the vote floor, on an operator's word: when the devices that held the entries
    /// past a cut all lost them (two disks damaged), no log reaches the floors and no leader can
    /// be elected; forgetting lets this device vote and stand again, and the entries no device
    /// holds are lost for good. Refused while a node holds the library (its replica keeps the
    /// floor): stop it first. Returns the floor forgotten.
    pub fn forget_vote_floor(&self) -> Result<Option<(u64, DeviceId, u64)>, EngineError> {
        let linked = self
            .shared
            .local_commits
            .lock()
            .map_err(|_| EngineError::Closed)?
            .is_some();
        if linked {
            return Err(EngineError::Linked);
        }
        let floor = self.journal()?.election().forget_vote_floor()?;
        if let Some((epoch, lsn)) = floor {
            tracing::warn!(
                epoch = epoch.counter,
                at = lsn.0,
                "the vote floor was forgotten by the operator"
            );
        }
        Ok(floor.map(|(epoch, lsn)| (epoch.counter, epoch.device, lsn.0)))
    }

    /// Commits go through the offline journal from here, never to the node's core.
    pub(crate) fn stop_sequencing(&self) {
        self.set_leading(false);
        if let Ok(mut slot) = self.shared.sequencer.lock() {
            *slot = None;
        }
    }

    /// Detaches the node: commits go through the offline journal and nobody is told of them.
    pub(crate) fn detach_node(&self) {
        self.stop_sequencing();
        if let Ok(mut slot) = self.shared.local_commits.lock() {
            *slot = None;
        }
    }

    /// Records whether the running node leads (read by [`Library::transact`]).
    pub(crate) fn set_leading(&self, leading: bool) {
        self.shared
            .leading
            .store(leading, std::sync::atomic::Ordering::Release);
    }

    /// Tells the library that the log reaches `leader_end` on the leader. When that is far ahead of
    /// what is applied (a device that just joined), the projections drop their secondary indexes
    /// and build them once when the applier reaches `leader_end` (or at the next open, if the
    /// process stops first): maintaining them row by row costs more than one sorted build.
    /// Queries stay correct meanwhile, only slower.
    pub(crate) fn catching_up(&self, leader_end: keel_schema::Lsn) -> Result<(), EngineError> {
        // Called for every segment: the usual answers come without waiting for an apply.
        {
            let mut until = self
                .shared
                .bulk_until
                .lock()
                .map_err(|_| EngineError::Closed)?;
            if let Some(target) = until.as_mut() {
                *target = (*target).max(leader_end);
                return Ok(());
            }
        }
        let applied = self.sync_state().applied_lsn();
        if !crate::applier::worth_bulk_loading(applied, leader_end) {
            return Ok(());
        }
        // Lock order: projections, then bulk_until (another segment may have started it).
        let mut projections = self
            .shared
            .projections
            .lock()
            .map_err(|_| EngineError::Closed)?;
        let mut until = self
            .shared
            .bulk_until
            .lock()
            .map_err(|_| EngineError::Closed)?;
        if until.is_none() {
            projections.set_bulk_load(true)?;
            *until = Some(leader_end);
            tracing::info!(
                applied = applied.0,
                leader_end = leader_end.0,
                "catching up: loading without secondary indexes"
            );
        }
        Ok(())
    }

    /// The devices of this library (their Device records), by device id.
    pub fn devices(&self) -> Result<Vec<Device>, EngineError> {
        self.read(|p| p.query().select::<Device, _>("1 = 1", []))
    }

    /// The library's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The library's folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The library id.
    pub fn id(&self) -> LibraryId {
        self.config.library()
    }

    /// This device's id.
    pub fn device_id(&self) -> DeviceId {
        self.device.id
    }

    /// This device's clock, past every change applied so far.
    pub(crate) fn clock(&self) -> Result<std::sync::MutexGuard<'_, HlcClock>, EngineError> {
        let clock = self.clock.lock().map_err(|_| EngineError::Closed)?;
        Ok(self.caught_up(clock))
    }

    /// [`Library::clock`] if no transaction holds it now (one holds it while its closure
    /// runs); `None` otherwise.
    pub(crate) fn clock_if_free(
        &self,
    ) -> Result<Option<std::sync::MutexGuard<'_, HlcClock>>, EngineError> {
        match self.clock.try_lock() {
            Ok(clock) => Ok(Some(self.caught_up(clock))),
            Err(std::sync::TryLockError::WouldBlock) => Ok(None),
            Err(std::sync::TryLockError::Poisoned(_)) => Err(EngineError::Closed),
        }
    }

    fn caught_up<'a>(
        &self,
        mut clock: std::sync::MutexGuard<'a, HlcClock>,
    ) -> std::sync::MutexGuard<'a, HlcClock> {
        if let Some(seen) = self.shared.take_clock_seen() {
            clock.observe(seen);
        }
        clock
    }

    /// Runs `f` to collect changes, then commits them as one durable group. `Ok` means durable.
    /// The projections follow a moment later; call [`Library::flush`] to wait for them.
    pub fn transact<T>(
        &self,
        f: impl FnOnce(&mut Tx<'_>) -> Result<T, EngineError>,
    ) -> Result<(T, CommitReceipt), EngineError> {
        let changes = {
            let mut clock = self.clock()?;
            let now = now_ms();
            let mut tx = Tx::new(&mut clock, &self.models, now);
            let value = f(&mut tx)?;
            let unseen = tx.unseen;
            let mut changes = tx.finish()?;
            // Their causal context: what this device had applied of the log (see
            // `Change::seen`), on the changes that can conflict; none on unseen ones.
            let seen = if unseen {
                0
            } else {
                self.sync_state().applied_lsn().0
            };
            for change in &mut changes {
                if self
                    .models
                    .get(change.model)
                    .is_some_and(|d| d.user_edited())
                {
                    change.seen = seen;
                }
            }
            let changes = crate::attest::attest(&self.signer, &mut clock, now, changes)?;
            // Registered before the clock is let go (see `crate::floor`).
            let ticket = self.shared.floor.begin(oldest_clock(&changes));
            (value, changes, ticket)
        };
        let (value, changes, _in_flight) = changes;
        if changes.is_empty() {
            return Ok((
                value,
                CommitReceipt {
                    change_ids: Vec::new(),
                    placements: Vec::new(),
                },
            ));
        }
        let change_ids = changes.iter().map(|c| c.id).collect();
        let placements = match self.sequence_as_leader(&changes)? {
            Some(placements) => placements,
            None => self.journal()?.commit(changes)?,
        };
        if let Ok(mut committed) = self.committed.lock() {
            for p in &placements {
                advance(&mut committed, *p);
            }
        }
        Ok((
            value,
            CommitReceipt {
                change_ids,
                placements,
            },
        ))
    }

    /// Like [`Library::transact`], but returns as soon as the changes are handed to the journal
    /// writer; [`PendingTransaction::wait`] gives the acknowledgement. Lets a long job prepare its
    /// next batch while this one is written.
    pub fn transact_pipelined(
        &self,
        f: impl FnOnce(&mut Tx<'_>) -> Result<(), EngineError>,
    ) -> Result<PendingTransaction<'_>, EngineError> {
        let changes = {
            let mut clock = self.clock()?;
            let now = now_ms();
            let mut tx = Tx::new(&mut clock, &self.models, now);
            f(&mut tx)?;
            let changes = tx.finish()?;
            let changes = crate::attest::attest(&self.signer, &mut clock, now, changes)?;
            let ticket = self.shared.floor.begin(oldest_clock(&changes));
            (changes, ticket)
        };
        let (changes, in_flight) = changes;
        let change_ids = changes.iter().map(|c| c.id).collect();
        // A leading node sequences them into the log itself: one write and one apply, not a
        // commit to the offline journal and another to the log (decision 0047).
        let pending = if changes.is_empty() {
            Pending::Nothing
        } else if let Some(answer) = self.request_sequencing(&changes)? {
            Pending::Leader { answer, changes }
        } else {
            Pending::Journal(self.journal()?.commit_pipelined(changes)?)
        };
        Ok(PendingTransaction {
            library: self,
            pending,
            change_ids,
            _in_flight: in_flight,
        })
    }

    /// Waits until everything committed so far is applied to the projections (and everything
    /// applied is committed to the journal).
    pub fn flush(&self) -> Result<(), EngineError> {
        let mut target = *self.committed.lock().map_err(|_| EngineError::Closed)?;
        // Also everything the journal handed over so far (replicated segments included).
        let batches = self.journal()?.batches_sent();
        let behind = self
            .shared
            .applied
            .lock()
            .map_err(|_| EngineError::Closed)?
            .position
            .log
            < target.log;
        if behind {
            // A commit is durable before it counts here, so a position past the log's end
            // was truncated away (a node's new leader, or a damaged record): never applied.
            target.log = target.log.min(self.journal()?.stats()?.last_lsn);
        }
        let mut state = self
            .shared
            .applied
            .lock()
            .map_err(|_| EngineError::Closed)?;
        loop {
            if let Some(reason) = &state.error {
                return Err(EngineError::ApplyFailed(reason.clone()));
            }
            if state.position.log >= target.log
                && state.position.local >= target.local
                && state.batch >= batches
            {
                break;
            }
            state = self
                .shared
                .applied_changed
                .wait(state)
                .map_err(|_| EngineError::Closed)?;
        }
        drop(state);
        // A follower's last segment may be applied while the journal still commits it.
        self.journal()?.settle()?;
        Ok(())
    }

    /// Subscribes to the library's events.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.shared.events.subscribe()
    }

    /// Publishes an event (used by jobs).
    pub(crate) fn publish(&self, event: Event) {
        let _ = self.shared.events.send(event);
    }

    /// Runs `f` with the projections (read-only use: host-app queries).
    pub fn read<T>(
        &self,
        f: impl FnOnce(&Projections) -> Result<T, keel_projections::ProjectionError>,
    ) -> Result<T, EngineError> {
        let p = self.shared.reader.lock().map_err(|_| EngineError::Closed)?;
        Ok(f(&p)?)
    }

    /// The visible record of model `M` with this uuid.
    pub fn get<M: Syncable>(&self, uuid: Uuid) -> Result<Option<M>, EngineError> {
        self.read(|p| p.query().get::<M>(uuid))
    }

    /// The projection digest (after applying everything committed).
    pub fn digest(&self) -> Result<String, EngineError> {
        self.flush()?;
        self.read(|p| p.query().digest())
    }

    /// A summary of the library.
    pub fn status(&self) -> Result<Status, EngineError> {
        self.flush()?;
        let stats = self.journal()?.stats()?;
        let (counts, applied, parked, digest) = self.read(|p| {
            Ok((
                p.query().counts()?,
                p.applied_position()?,
                p.parked_len(),
                p.query().digest()?,
            ))
        })?;
        Ok(Status {
            name: self.name.clone(),
            library_id: self.config.library_id.to_string(),
            device_id: self.device.id.to_hex(),
            counts,
            journal: JournalStatus {
                local_changes: stats.own_changes,
                offline: stats.offline,
                log_len: stats.log_len,
                last_lsn: stats.last_lsn.0,
                compacted_to: stats.base.0,
                dropped_log_pages: stats.dropped_log_pages,
                snapshot_waiting_at: self.compaction_waiting(),
            },
            applied_lsn: applied.log.0,
            parked,
            digest,
            disk: DiskUsage::of(&self.dir)?,
        })
    }

    /// Closes the library: waits for the projections to catch up, stops the writer and applier.
    pub fn close(mut self) -> Result<(), EngineError> {
        let flushed = self.flush();
        self.shutdown();
        flushed
    }

    fn shutdown(&mut self) {
        if let Some(journal) = self.journal.take() {
            journal.close();
        }
        if let Some(handle) = self.applier.take() {
            let _ = handle.join();
        }
    }
}

/// Where a library's sync stands: what is applied, what waits offline, what the journal holds.
/// For status, tests and operators; from [`Library::sync_state`].
#[derive(Clone, Copy)]
pub struct SyncState<'a> {
    library: &'a Library,
}

impl std::ops::Deref for SyncState<'_> {
    type Target = Library;

    fn deref(&self) -> &Library {
        self.library
    }
}

impl Library {
    /// Where this library's sync stands.
    pub fn sync_state(&self) -> SyncState<'_> {
        SyncState { library: self }
    }
}

impl SyncState<'_> {
    /// The last log position and offline-journal sequence applied to the projections.
    pub(crate) fn applied_position(&self) -> keel_projections::AppliedPosition {
        self.shared
            .applied
            .lock()
            .map(|s| s.position)
            .unwrap_or_default()
    }

    /// The last log position applied to the projections.
    pub fn applied_lsn(&self) -> keel_schema::Lsn {
        self.shared
            .applied
            .lock()
            .map(|s| s.position.log)
            .unwrap_or_default()
    }

    /// Whether the projections are loading without their secondary indexes (a catch-up).
    pub fn bulk_loading(&self) -> bool {
        self.shared
            .bulk_until
            .lock()
            .map(|u| u.is_some())
            .unwrap_or(false)
    }

    /// How many of this device's changes wait in the offline journal for a leader.
    pub fn offline_len(&self) -> Result<u64, EngineError> {
        Ok(self.journal()?.stats()?.offline)
    }

    /// How many changes this device made, ever (a counter for metrics).
    pub fn own_changes(&self) -> Result<u64, EngineError> {
        Ok(self.journal()?.stats()?.own_changes)
    }

    /// Pages of a dropped log the journal is still deleting in the background (see
    /// [`JournalStatus::dropped_log_pages`]).
    pub fn dropped_log_pages(&self) -> Result<u64, EngineError> {
        Ok(self.journal()?.stats()?.dropped_log_pages)
    }

    /// The id of every change durable in this library's journal (log and offline journal both).
    /// Reads the whole journal: for checks and tools, not for a hot path.
    pub fn change_ids(&self) -> Result<std::collections::HashSet<ChangeId>, EngineError> {
        Ok(self.journal()?.log().change_ids()?)
    }

    /// How many log positions the journal's saved log index covers (`None`: none saved, or it no
    /// longer matches the log). A node saves it when it stops and an initial sync saves it with
    /// the log, so that starting a node need not read every record. For checks and tools.
    pub fn saved_log_index_len(&self) -> Result<Option<u64>, EngineError> {
        Ok(self
            .journal()?
            .saved_log_index()?
            .map(|index| index.len() as u64))
    }

    /// Every change in the journal (the log after its compaction base, then local), in order,
    /// for tests and tools. Records that fail their checks are skipped (and reported by
    /// `verify`).
    pub fn changes(&self) -> Result<Vec<keel_schema::Change>, EngineError> {
        let journal = self.journal()?;
        let mut out = Vec::new();
        let mut next = keel_schema::Lsn(journal.log().base()?.0 .0 + 1);
        loop {
            let chunk = journal.log().read(next, crate::replay::REPLAY_READ_CHUNK)?;
            if chunk.is_empty() {
                break;
            }
            for entry in chunk {
                if let Ok((placement, _, change)) = entry {
                    if let Placement::Log(lsn) = placement {
                        next = keel_schema::Lsn(lsn.0 + 1);
                    }
                    out.push(change);
                } else {
                    next = keel_schema::Lsn(next.0 + 1);
                }
            }
        }
        out.extend(
            journal
                .offline()
                .read(0, usize::MAX)?
                .into_iter()
                .filter_map(Result::ok)
                .map(|(_, _, c)| c),
        );
        Ok(out)
    }
}

impl Drop for Library {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The check value of the key `base` of `key` for `library` (see [`LibraryConfig::check`]);
/// `None` if `key` does not hold that key.
fn key_check(key: &LibraryKey, base: u32, library: keel_schema::LibraryId) -> Option<String> {
    let base = key.shared().into_iter().find(|k| k.key_id == base)?;
    let derived = blake3::derive_key("keel 2026 library key check v1", &base.bytes);
    let hash = blake3::keyed_hash(&derived, library.0.as_bytes());
    Some(hex::encode(&hash.as_bytes()[..16]))
}

/// Opens the projections beside the journal (rebuilding them when unreadable or ahead of the
/// journal) and heals them: applies whatever the journal holds beyond their applied position.
fn heal_projections(
    journal: &Journal,
    dir: &Path,
    models: &Registry,
    device: keel_schema::DeviceId,
) -> Result<(Projections, crate::replay::ReplayReport), EngineError> {
    let stale = journal.projections_stale()?;
    let (projections, base, journal_last) =
        open_for_healing(journal, dir, models, device, stale > 0)?;
    // Heal: apply whatever the journal holds beyond the applied position — from no later than
    // a truncation point, since positions after it were reused (apply is idempotent).
    let floor = journal.replay_floor()?;
    let (mut projections, from) =
        heal_start(dir, models, projections, (base, journal_last), floor)?;
    let healed = replay(journal, &mut projections, from, &mut |_, _| {})?;
    if floor.is_some() {
        // A replay with nothing after the floor stores no position: the one past the cut
        // would stay, and the next open would find the projections ahead of the log.
        if projections.applied_position()?.log > healed.position.log {
            projections.apply(&[], Some(healed.position))?;
        }
        debug_assert!(projections.applied_position()?.log <= journal_last);
        journal.clear_replay_floor()?;
    }
    if stale > 0 {
        journal.projections_rebuilt(stale)?;
    }
    if healed.changes > 0 {
        tracing::info!(
            changes = healed.changes,
            "healed projections from the journal"
        );
    }
    Ok((projections, healed))
}

/// Opens the projections for [`heal_projections`]: from scratch when `stale` (a truncation
/// dropped changes they applied) or unreadable, and from the snapshot when behind the
/// compaction base. Returns them, the log's base and its last position.
fn open_for_healing(
    journal: &Journal,
    dir: &Path,
    models: &Registry,
    device: keel_schema::DeviceId,
    stale: bool,
) -> Result<(Projections, keel_schema::Lsn, keel_schema::Lsn), EngineError> {
    // Projections are disposable: one that may hold changes a truncation dropped, or that
    // cannot be opened, is rebuilt from the journal.
    let projections_path = dir.join(PROJECTIONS_FILE);
    if stale {
        tracing::warn!(
            "a truncation dropped changes the projections had applied; rebuilding them from the journal"
        );
        remove_projection_files(dir)?;
    }
    if journal.log().base()?.0 .0 > 0
        && Projections::built_for_models(&projections_path, models) == Some(false)
    {
        // The app's models changed since the library compacted: the positions before the base
        // cannot be replayed for them, so the snapshot is brought to them in place, and the
        // projections start again from it and the log after the base.
        crate::compact::upgrade_snapshot(dir, models)?;
        remove_projection_files(dir)?;
    }
    let mut projections = match Projections::open_for(&projections_path, models) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %e, "projection unreadable; rebuilding it from the journal");
            remove_projection_files(dir)?;
            Projections::open_for(&projections_path, models)?
        }
    };
    // A projection behind the compaction base (a new or unreadable file) starts from the
    // snapshot: the log before the base is gone.
    let (mut base, _) = journal.log().base()?;
    let behind = projections.applied_position()?.log;
    if base.0 > 0 && behind < base && crate::compact::join_cut_before_its_snapshot(journal, dir)? {
        tracing::warn!(
            base = base.0,
            "the join was cut before the snapshot of the log's first positions was stored: the log is dropped, and the node backfills from the leader"
        );
        journal.log().forget(device)?;
        base = keel_schema::Lsn(0);
    }
    let journal_last = journal.stats()?.last_lsn;
    if base.0 > 0 && behind < base {
        drop(projections);
        crate::compact::start_from_snapshot(dir, &projections_path, behind, base, journal_last)?;
        projections = Projections::open_for(&projections_path, models)?;
    }
    Ok((projections, base, journal_last))
}

/// Where [`heal_projections`] replays from: the applied position, no later than the replay
/// `floor`. Projections ahead of the journal because the device stopped while the journal
/// stored a segment they had applied start again from the snapshot; ahead for any other
/// reason, or behind the base, they are an error.
fn heal_start(
    dir: &Path,
    models: &Registry,
    mut projections: Projections,
    (base, journal_last): (keel_schema::Lsn, keel_schema::Lsn),
    floor: Option<keel_schema::Lsn>,
) -> Result<(Projections, AppliedPosition), EngineError> {
    let mut from = projections.applied_position()?;
    if let Some(floor) = floor {
        from.log = from.log.min(floor);
    }
    if from.log > journal_last {
        // Stopped while the journal committed a segment the projections had applied
        // already (see `CommittedBatch::early`): nothing before it is missing from the
        // journal, and the leader sends the rest again. Projections are disposable.
        let stopped_mid_commit = projections
            .ahead_from()?
            .is_some_and(|ahead| ahead.0 <= journal_last.0 + 1);
        if !stopped_mid_commit {
            return Err(EngineError::ProjectionAhead {
                applied: from.log.0,
                journal_last: journal_last.0,
            });
        }
        tracing::warn!(
            applied = from.log.0,
            journal_last = journal_last.0,
            "the device stopped while the journal stored a segment already applied; rebuilding the projections from the journal"
        );
        drop(projections);
        remove_projection_files(dir)?;
        let projections_path = dir.join(PROJECTIONS_FILE);
        crate::compact::start_from_snapshot(
            dir,
            &projections_path,
            keel_schema::Lsn(0),
            base,
            journal_last,
        )?;
        projections = Projections::open_for(&projections_path, models)?;
        from = projections.applied_position()?;
    }
    if from.log < base {
        // The snapshot was built for other models (the host's changed): nothing can replay
        // the positions before the base.
        return Err(EngineError::SnapshotMissing {
            path: dir.join(crate::compact::SNAPSHOT_FILE),
            base: base.0,
        });
    }
    Ok((projections, from))
}
