//! Helpers shared by the journal's integration tests.

use keel_journal::{CommitRoute, Journal, JournalOptions, LibraryKey};
use keel_schema::{Change, ChangeId, DeviceId, Epoch, Hlc, LibraryId, Tag};
use uuid::Uuid;

/// A journal file in a temporary folder, opened as the leader of epoch 1 of device 1.
pub(crate) struct Setup {
    _dir: tempfile::TempDir,
    pub(crate) path: std::path::PathBuf,
    pub(crate) lib: LibraryId,
    pub(crate) key: LibraryKey,
    pub(crate) device: DeviceId,
    pub(crate) epoch: Epoch,
}

impl Setup {
    /// A new folder, library id and key.
    #[allow(dead_code)]
    pub(crate) fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let device = DeviceId([1; 32]);
        Self {
            path: dir.path().join("journal.redb"),
            _dir: dir,
            lib: LibraryId(Uuid::new_v4()),
            key: LibraryKey::generate(),
            device,
            epoch: Epoch { counter: 1, device },
        }
    }

    /// Another journal file of the same library, key and device, in a folder of its own.
    #[allow(dead_code)]
    pub(crate) fn twin(&self) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        Self {
            path: dir.path().join("journal.redb"),
            _dir: dir,
            lib: self.lib,
            key: self.key.clone(),
            device: self.device,
            epoch: self.epoch,
        }
    }

    /// Opens the journal as the leader of epoch 1.
    #[allow(dead_code)]
    pub(crate) fn open(&self) -> Journal {
        self.open_as(CommitRoute::Log(self.epoch))
    }

    /// Opens the journal with commits going to the offline journal (a follower).
    #[allow(dead_code)]
    pub(crate) fn open_offline(&self) -> Journal {
        self.open_as(CommitRoute::Offline)
    }

    /// Opens the journal with commits going where `role` says.
    #[allow(dead_code)]
    pub(crate) fn open_as(&self, role: CommitRoute) -> Journal {
        Journal::open(
            &self.path,
            self.lib,
            &self.key,
            self.device,
            JournalOptions {
                role: Some(role),
                ..JournalOptions::default()
            },
        )
        .expect("opens")
    }
}

/// A tag upsert by `device`, its clock and name numbered by `n`.
pub(crate) fn change(device: DeviceId, n: u64) -> Change {
    let tag = Tag {
        uuid: Uuid::now_v7(),
        name: format!("t{n}"),
        color: None,
        created_ms: 0,
    };
    let hlc = Hlc {
        physical_ms: 1000 + n,
        counter: 0,
        device,
    };
    Change::upsert(ChangeId::new(), hlc, &tag).expect("sync-ready")
}
