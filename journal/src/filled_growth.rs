//! A redb storage backend that writes real zeros into the space a growing file gains.
//!
//! redb grows its file by doubling it with `set_len`, which leaves the new half a hole: no disk
//! blocks behind it yet. Every commit whose pages land there makes the file system allocate
//! blocks, and the commit's `fdatasync` then has to commit the file system's own journal as
//! well as write the data, which makes such a commit markedly slower (decision 0007). A live
//! follower would pay that on every change.
//!
//! So when the file grows, this backend writes zeros over the new space right away (up to
//! [`FILL_MAX`] bytes of it: redb allocates from the low end, and a bulk load that grows the
//! file by hundreds of megabytes writes its pages in order anyway). The file's contents are the
//! same either way (a hole reads as zeros), so a crash at any point leaves what it would have;
//! the zeros reach the disk with the next `sync_data`, once per growth.

use std::io;

use redb::backends::FileBackend;
use redb::StorageBackend;

/// Most bytes of one growth written as zeros.
pub(crate) const FILL_MAX: u64 = 8 << 20;
/// Zeros written per call.
const FILL_CHUNK: usize = 256 * 1024;

/// redb's file backend (or another below it), with the space a `set_len` adds written as zeros
/// (see the module docs).
#[derive(Debug)]
pub(crate) struct FilledGrowth<B = FileBackend> {
    inner: B,
}

impl FilledGrowth {
    /// Wraps `file`, opened for reading and writing.
    pub(crate) fn new(file: std::fs::File) -> Result<Self, redb::DatabaseError> {
        Ok(Self::over(FileBackend::new(file)?))
    }
}

impl<B: StorageBackend> FilledGrowth<B> {
    /// Wraps `inner`.
    pub(crate) fn over(inner: B) -> Self {
        Self { inner }
    }

    /// Writes zeros over `start..end`.
    fn fill(&self, start: u64, end: u64) -> Result<(), io::Error> {
        let zeros = vec![0u8; FILL_CHUNK];
        let mut at = start;
        while at < end {
            let n = (end - at).min(FILL_CHUNK as u64) as usize;
            self.inner.write(at, &zeros[..n])?;
            at += n as u64;
        }
        Ok(())
    }
}

impl<B: StorageBackend> StorageBackend for FilledGrowth<B> {
    fn len(&self) -> Result<u64, io::Error> {
        self.inner.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        self.inner.read(offset, out)
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        let old = self.inner.len()?;
        self.inner.set_len(len)?;
        if len > old {
            let end = len.min(old.saturating_add(FILL_MAX));
            // Only an optimization: a fill that fails (a nearly full disk) leaves a hole, which
            // reads the same. Failing the resize for it would latch redb on a file that is fine.
            if let Err(error) = self.fill(old, end) {
                tracing::warn!(%error, "zero-filling the journal's new space failed; left a hole");
            }
        }
        Ok(())
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        self.inner.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        self.inner.write(offset, data)
    }

    fn close(&self) -> Result<(), io::Error> {
        self.inner.close()
    }

    crate::backends::forward_range_locks!();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The zeros are only an optimization: a disk too full for them still grows the file (the
    /// space reads as zeros as a hole), instead of failing the resize and latching redb.
    #[cfg(feature = "faults")]
    #[test]
    fn a_fill_the_disk_has_no_room_for_still_grows_the_file() {
        use crate::faults::{FaultKind, FaultOp, Faults, Faulty};
        let dir = tempfile::tempdir().expect("tempdir");
        let (file, _) = crate::backends::new_file(dir.path());
        let faults = Faults::new();
        let b = FilledGrowth::over(Faulty::new(
            FileBackend::new(file).expect("wraps"),
            faults.clone(),
        ));
        faults.fail(FaultOp::Write, 0, FaultKind::NoSpace, true);
        b.set_len(1 << 20).expect("grows without its zeros");
        assert!(faults.injected() > 0, "the fill was tried");
        assert_eq!(b.len().expect("len"), 1 << 20);
        let mut grown = vec![1u8; 4096];
        b.read(0, &mut grown).expect("reads");
        assert!(grown.iter().all(|&x| x == 0));
    }

    fn backend(dir: &std::path::Path) -> (FilledGrowth, std::path::PathBuf) {
        let (file, path) = crate::backends::new_file(dir);
        (FilledGrowth::new(file).expect("wraps"), path)
    }

    /// Bytes of disk the file at `path` holds (a hole holds none).
    #[cfg(unix)]
    fn allocated(path: &std::path::Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).expect("metadata").blocks() * 512
    }

    #[test]
    fn growth_reads_as_zeros_and_keeps_what_was_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (b, _) = backend(dir.path());
        b.set_len(4096).expect("grows");
        b.write(0, &[7u8; 4096]).expect("writes");
        b.set_len(3 << 20).expect("grows");
        assert_eq!(b.len().expect("len"), 3 << 20);
        let mut head = vec![0u8; 4096];
        b.read(0, &mut head).expect("reads");
        assert!(head.iter().all(|&x| x == 7), "earlier bytes kept");
        let mut grown = vec![1u8; (3 << 20) - 4096];
        b.read(4096, &mut grown).expect("reads");
        assert!(grown.iter().all(|&x| x == 0), "new space reads as zeros");
        b.set_len(8192).expect("shrinks");
        assert_eq!(b.len().expect("len"), 8192);
    }

    #[cfg(unix)]
    #[test]
    fn growth_is_written_not_a_hole_up_to_the_cap() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (b, path) = backend(dir.path());
        b.set_len(1 << 20).expect("grows");
        assert!(
            allocated(&path) >= 1 << 20,
            "a growth within the cap is allocated: {} bytes",
            allocated(&path)
        );
        // A growth past the cap: only its first FILL_MAX bytes are written.
        let big = (1 << 20) + FILL_MAX + (16 << 20);
        b.set_len(big).expect("grows");
        assert_eq!(b.len().expect("len"), big);
        let held = allocated(&path);
        assert!(held >= (1 << 20) + FILL_MAX, "{held} bytes");
        assert!(held < big, "the rest stays a hole: {held} of {big} bytes");
        let mut tail = vec![1u8; 4096];
        b.read(big - 4096, &mut tail).expect("reads");
        assert!(tail.iter().all(|&x| x == 0));
    }
}
