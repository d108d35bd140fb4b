//! A redb storage backend that writes large aligned pages past the page cache (`O_DIRECT`).
//!
//! A device that joins a library stores hundreds of megabytes of log that nothing reads back
//! for a while. Written through the page cache, each new page-cache page has to be filled by
//! the kernel, and that copy was most of the journal thread's time in a join (decision 0005).
//! This backend hands redb's large, block-aligned
//! writes to a second descriptor of the same file opened with `O_DIRECT`, through one aligned
//! buffer; everything else (small or unaligned writes, reads, length, sync, locks) goes to
//! redb's own [`FileBackend`] unchanged. Linux keeps the two coherent: a direct write first
//! writes back and then drops the cached pages it overlaps, so a later read sees it.
//!
//! A file system that refuses direct writes (tmpfs, some network file systems) answers
//! `EINVAL`; the backend then writes everything through the page cache from that point on.
//! `sync_data` on the ordinary descriptor flushes the device's cache for both descriptors'
//! writes (it is the same file).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use redb::backends::FileBackend;

use crate::aligned::{open_direct, AlignedBuffer, DIRECT_ALIGN};
use redb::StorageBackend;

/// Smallest write sent past the page cache (smaller ones are metadata pages: cheap to cache,
/// and likely to be read again soon).
const DIRECT_MIN: usize = 16 * 1024;
/// Size of the aligned buffer a direct write goes through (larger writes go in pieces).
const DIRECT_BUFFER: usize = 1 << 20;

/// redb's file backend, with large aligned writes sent past the page cache (see the module docs).
///
/// Consecutive direct writes are gathered in one buffer and written together (redb writes a
/// commit's pages one allocation at a time, mostly in file order): a direct write waits for the
/// device, so one write of a megabyte costs far less than sixteen of 64 KiB. The gathered bytes
/// are written before anything else touches the file: any read, length change, sync, smaller
/// write or close.
#[derive(Debug)]
pub(crate) struct DirectWrites {
    inner: FileBackend,
    direct: File,
    pending: Mutex<Pending>,
    /// Cleared when the file system refuses a direct write.
    enabled: AtomicBool,
}

/// Bytes gathered for one direct write at `offset`.
#[derive(Debug, Default)]
struct Pending {
    buffer: Option<AlignedBuffer>,
    offset: u64,
    fill: usize,
}

impl DirectWrites {
    /// Wraps `file` (opened for reading and writing) and `direct`, the same file opened again
    /// for direct writes ([`DirectWrites::open_direct`]).
    pub(crate) fn new(file: File, direct: File) -> Result<Self, redb::DatabaseError> {
        let inner = FileBackend::new(file)?;
        Ok(Self {
            inner,
            direct,
            pending: Mutex::new(Pending::default()),
            enabled: AtomicBool::new(true),
        })
    }

    /// Opens `path` again for direct writes; `None` if this platform or file system does not
    /// offer them.
    pub(crate) fn open_direct(path: &std::path::Path) -> Option<File> {
        open_direct(std::fs::OpenOptions::new().write(true), path)
    }

    fn lock(&self) -> io::Result<std::sync::MutexGuard<'_, Pending>> {
        self.pending
            .lock()
            .map_err(|_| io::Error::other("the direct-write buffer was poisoned"))
    }

    /// Writes what `pending` gathered: directly, or through the page cache if the file system
    /// refuses (then for good).
    fn flush(&self, pending: &mut Pending) -> io::Result<()> {
        let (Some(buffer), fill) = (pending.buffer.as_ref(), pending.fill) else {
            return Ok(());
        };
        if fill == 0 {
            return Ok(());
        }
        let bytes = &buffer.as_slice()[..fill];
        match self.direct.write_all_at(bytes, pending.offset) {
            Ok(()) => {}
            // EINVAL: this file system does not take direct writes.
            Err(e) if e.kind() == io::ErrorKind::InvalidInput => {
                tracing::debug!(
                    "the file system refused a direct write; writing through the cache"
                );
                self.enabled.store(false, Ordering::Relaxed);
                self.inner.write(pending.offset, bytes)?;
            }
            Err(e) => return Err(e),
        }
        pending.fill = 0;
        Ok(())
    }

    /// Writes what was gathered, before another operation on the file.
    fn settle(&self) -> io::Result<()> {
        let mut pending = self.lock()?;
        self.flush(&mut pending)
    }

    /// Gathers an aligned write of at least [`DIRECT_MIN`] bytes; `Ok(false)` if it must go
    /// through the page cache instead.
    fn gather(&self, offset: u64, data: &[u8]) -> io::Result<bool> {
        let mut pending = self.lock()?;
        let follows = pending.fill > 0 && offset == pending.offset + pending.fill as u64;
        if !follows || pending.fill + data.len() > DIRECT_BUFFER {
            self.flush(&mut pending)?;
            pending.offset = offset;
        }
        if pending.buffer.is_none() {
            pending.buffer = AlignedBuffer::new(DIRECT_BUFFER);
        }
        // Larger than the buffer: in pieces, each written at once.
        let mut at = offset;
        for piece in data.chunks(DIRECT_BUFFER) {
            if !self.enabled.load(Ordering::Relaxed) {
                // Refused on an earlier piece: the rest through the page cache.
                self.inner.write(at, &data[(at - offset) as usize..])?;
                return Ok(true);
            }
            let fill = pending.fill;
            let Some(buffer) = pending.buffer.as_mut() else {
                return Ok(false);
            };
            buffer.as_mut_slice()[fill..fill + piece.len()].copy_from_slice(piece);
            pending.fill = fill + piece.len();
            at += piece.len() as u64;
            if pending.fill == DIRECT_BUFFER {
                self.flush(&mut pending)?;
                pending.offset = at;
            }
        }
        Ok(true)
    }
}

impl StorageBackend for DirectWrites {
    fn len(&self) -> Result<u64, io::Error> {
        self.settle()?;
        self.inner.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        self.settle()?;
        self.inner.read(offset, out)
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        self.settle()?;
        self.inner.set_len(len)
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        self.settle()?;
        self.inner.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        let aligned =
            offset.is_multiple_of(DIRECT_ALIGN as u64) && data.len().is_multiple_of(DIRECT_ALIGN);
        if aligned
            && data.len() >= DIRECT_MIN
            && self.enabled.load(Ordering::Relaxed)
            && self.gather(offset, data)?
        {
            return Ok(());
        }
        self.settle()?;
        self.inner.write(offset, data)
    }

    fn close(&self) -> Result<(), io::Error> {
        let settled = self.settle();
        let closed = self.inner.close();
        settled.and(closed)
    }

    crate::backends::forward_range_locks!();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backend on a new file in `dir` (on a file system with direct writes, or it says so).
    fn backend(dir: &std::path::Path) -> Option<(DirectWrites, std::path::PathBuf)> {
        let (file, path) = crate::backends::new_file(dir);
        let backend = DirectWrites::open_direct(&path)
            .map(|direct| DirectWrites::new(file, direct).expect("wraps"));
        if backend.is_none() {
            eprintln!("no direct writes here: the backend is not used");
        }
        backend.map(|b| (b, path))
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8 ^ seed).collect()
    }

    #[test]
    fn gathered_and_ordinary_writes_read_back_in_any_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let Some((b, path)) = backend(dir.path()) else {
            return;
        };
        let size = 4 * DIRECT_BUFFER + 3 * DIRECT_ALIGN;
        b.set_len(size as u64).expect("sets the length");
        let mut expected = vec![0u8; size];
        let mut put = |offset: usize, data: Vec<u8>| {
            b.write(offset as u64, &data).expect("writes");
            expected[offset..offset + data.len()].copy_from_slice(&data);
        };
        // Consecutive large pages (gathered), one past the buffer's size (in pieces), a small
        // unaligned write inside gathered bytes, and a rewrite of a gathered range.
        put(0, pattern(DIRECT_MIN, 1));
        put(DIRECT_MIN, pattern(DIRECT_MIN * 2, 2));
        put(DIRECT_MIN + 100, pattern(300, 3));
        put(DIRECT_BUFFER, pattern(DIRECT_BUFFER + 2 * DIRECT_ALIGN, 4));
        put(0, pattern(DIRECT_MIN, 5));
        put(3 * DIRECT_BUFFER, pattern(DIRECT_MIN * 4, 6));
        // A read sees what is still gathered.
        let mut out = vec![0u8; DIRECT_MIN * 4];
        b.read(3 * DIRECT_BUFFER as u64, &mut out).expect("reads");
        assert_eq!(out, pattern(DIRECT_MIN * 4, 6));
        put(3 * DIRECT_BUFFER + DIRECT_MIN * 4, pattern(DIRECT_MIN, 7));
        b.sync_data().expect("syncs");
        b.close().expect("closes");
        drop(b);
        assert_eq!(std::fs::read(&path).expect("reads the file"), expected);
    }

    #[test]
    fn a_refused_direct_write_goes_through_the_cache_and_direct_writes_stop() {
        let dir = tempfile::tempdir().expect("tempdir");
        let Some((b, path)) = backend(dir.path()) else {
            return;
        };
        // A misaligned offset: the kernel refuses it with EINVAL, as a file system without
        // direct I/O would.
        let mut buffer = AlignedBuffer::new(DIRECT_ALIGN).expect("aligned");
        buffer
            .as_mut_slice()
            .copy_from_slice(&pattern(DIRECT_ALIGN, 9));
        let mut pending = Pending {
            buffer: Some(buffer),
            offset: 1,
            fill: DIRECT_ALIGN,
        };
        b.flush(&mut pending).expect("written the ordinary way");
        assert!(!b.enabled.load(Ordering::Relaxed), "direct writes stopped");
        // Later large writes go through the cache too, and everything reads back.
        b.write(2 * DIRECT_MIN as u64, &pattern(DIRECT_MIN, 4))
            .expect("writes");
        b.sync_data().expect("syncs");
        let file = std::fs::read(&path).expect("reads the file");
        assert_eq!(
            &file[1..1 + DIRECT_ALIGN],
            pattern(DIRECT_ALIGN, 9).as_slice()
        );
        assert_eq!(
            &file[2 * DIRECT_MIN..3 * DIRECT_MIN],
            pattern(DIRECT_MIN, 4).as_slice()
        );
    }

    #[test]
    fn the_length_counts_gathered_bytes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let Some((b, _path)) = backend(dir.path()) else {
            return;
        };
        b.write(0, &pattern(DIRECT_MIN, 1)).expect("writes");
        assert_eq!(b.len().expect("length"), DIRECT_MIN as u64);
    }
}
