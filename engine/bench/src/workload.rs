//! Synthetic workloads for benchmarks, the demo and tests: change streams and file trees.

use std::path::Path;

use keel_schema::{
    content_uuid, Change, ChangeId, ContentIdentity, Device, DeviceId, Entry, EntryKind, HlcClock,
    Location,
};
use rand::{Rng, RngExt, SeedableRng};
use uuid::Uuid;

/// A stream of changes shaped like an indexed library: one device, one location, then per file a
/// ContentIdentity and an Entry. Generated in chunks, so a large library never sits in memory.
pub struct LibraryWorkload {
    library: Uuid,
    device: DeviceId,
    /// Signs the file facts, as a device's library does when it commits (decision 0043);
    /// `None` when the changes go through a library, which signs them itself.
    signer: Option<keel_projections::Signer>,
    rng: rand::rngs::StdRng,
    clock: HlcClock,
    ms: u64,
    location: Uuid,
    next_file: usize,
}

impl LibraryWorkload {
    /// A workload for `library` written by `device`, reproducible from `seed`, unsigned: for
    /// committing through `device`'s own library, which signs it.
    pub fn new(library: Uuid, device: DeviceId, seed: u64) -> Self {
        Self {
            library,
            device,
            signer: None,
            rng: rand::rngs::StdRng::seed_from_u64(seed),
            clock: HlcClock::new(device),
            ms: 1_700_000_000_000,
            location: Uuid::now_v7(),
            next_file: 0,
        }
    }

    /// A workload for `library` by a new device with a real key, its file facts signed as a
    /// library signs them (for applying or journaling without a library).
    pub fn signed(library: Uuid, seed: u64) -> Self {
        let certified = rcgen::generate_simple_self_signed(vec!["bench.keel".into()])
            .unwrap_or_else(|e| panic!("a bench certificate: {e}"));
        let signer = keel_projections::Signer::new(
            certified.cert.der(),
            &certified.key_pair.serialize_der(),
        )
        .unwrap_or_else(|e| panic!("a bench signer: {e}"));
        let mut workload = Self::new(library, signer.device(), seed);
        workload.signer = Some(signer);
        workload
    }

    /// The device the changes come from.
    pub fn device(&self) -> DeviceId {
        self.device
    }

    /// `changes` (this workload's device's) behind their attestations, if this workload signs.
    pub fn sign(&mut self, changes: Vec<Change>) -> Vec<Change> {
        let Some(signer) = self.signer.take() else {
            return changes;
        };
        let signed = signer
            .attest(changes, || (ChangeId::new(), self.tick()))
            .unwrap_or_else(|e| panic!("signing the workload: {e}"));
        self.signer = Some(signer);
        signed
    }

    fn tick(&mut self) -> keel_schema::Hlc {
        self.ms += 1;
        self.clock.tick(self.ms)
    }

    /// The Device and Location records (two changes).
    pub fn header(&mut self) -> Vec<Change> {
        let dev = Device {
            uuid: self.device.record_uuid(),
            device_id: self.device.to_hex(),
            name: "bench".into(),
            os: "linux".into(),
            created_ms: 1,
        };
        let location = Location {
            uuid: self.location,
            device: dev.uuid,
            path: "/bench".into(),
            name: "bench".into(),
            created_ms: 1,
        };
        let mut out = Vec::with_capacity(2);
        out.extend(Change::upsert(ChangeId::new(), self.tick(), &dev));
        out.extend(Change::upsert(ChangeId::new(), self.tick(), &location));
        self.sign(out)
    }

    /// The next `files` files: a ContentIdentity and an Entry each.
    pub fn files(&mut self, files: usize) -> Vec<Change> {
        let mut out = Vec::with_capacity(files * 2);
        for _ in 0..files {
            let i = self.next_file;
            self.next_file += 1;
            let hash = format!("{:016x}{:016x}", self.rng.next_u64(), i);
            let content = content_uuid(self.library, &hash);
            let size = self.rng.random_range(100..1_000_000);
            let hlc = self.tick();
            out.extend(Change::upsert(
                ChangeId::new(),
                hlc,
                &ContentIdentity {
                    uuid: Some(content),
                    content_hash: hash,
                    mime: Some("image/jpeg".into()),
                    kind: "image".into(),
                    size,
                    entry_count: 0,
                    total_size: 0,
                },
            ));
            let hlc = self.tick();
            out.extend(Change::upsert(
                ChangeId::new(),
                hlc,
                &Entry {
                    uuid: Some(Uuid::now_v7()),
                    location: self.location,
                    relative_path: format!("photos/{:03}", i / 500),
                    name: format!("IMG_{i:07}.jpg"),
                    kind: EntryKind::File.code(),
                    size,
                    created_ms: 1_600_000_000_000,
                    modified_ms: 1_600_000_000_000 + i as i64,
                    content: Some(content),
                    metadata: None,
                    inode: None,
                    volume: None,
                },
            ));
        }
        self.sign(out)
    }
}

/// All of a signed [`LibraryWorkload`] at once: `2 × files + 2` changes, behind the
/// attestations of their file facts (one per 1,024 and per call of `header` and `files`).
pub fn library_changes(library: Uuid, files: usize, seed: u64) -> Vec<Change> {
    let mut workload = LibraryWorkload::signed(library, seed);
    let mut out = workload.header();
    out.extend(workload.files(files));
    out
}

/// Writes a tree of `files` small files (100 B to 4 KiB, about 1 in 20 duplicated) under `root`,
/// in folders of 100. Returns the bytes written.
pub fn write_tree(root: &Path, files: usize, seed: u64) -> std::io::Result<u64> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut bytes = 0u64;
    let mut buf = vec![0u8; 4096];
    for i in 0..files {
        let dir = root
            .join(format!("d{:03}", i / 1000))
            .join(format!("s{:02}", (i / 100) % 10));
        if i % 100 == 0 {
            std::fs::create_dir_all(&dir)?;
        }
        let len = rng.random_range(100..4096);
        if i % 20 == 0 {
            buf[..len].fill(7);
        } else {
            rng.fill_bytes(&mut buf[..len]);
        }
        let path = dir.join(format!("f{i:07}.txt"));
        std::fs::write(&path, &buf[..len])?;
        bytes += len as u64;
    }
    Ok(bytes)
}
