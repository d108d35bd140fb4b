//! The receiving side of a snapshot writes the projection file on a thread of its own, hashing
//! it on the way, so the loop that takes messages off the connection never waits on the disk.
//!
//! Where the file system allows it (Linux, not tmpfs), the file is written with `O_DIRECT`,
//! past the page cache: the file is hundreds of megabytes that nothing reads for a while, and
//! filling fresh page-cache pages was the largest cost of a join on our test machine (2.3 of
//! P4's 14 core-seconds in the kernel's copy into the page cache, where `O_DIRECT` writes reuse
//! one aligned buffer). Anything else writes through the page cache as before.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use keel_journal::{open_direct, AlignedBuffer, DIRECT_ALIGN};

use crate::error::{io_at, NodeError};

/// File chunks queued for the writing thread (each up to 4 MiB).
const CHUNKS_QUEUED: usize = 4;
/// Bytes gathered before one `O_DIRECT` write.
const DIRECT_BUFFER: usize = 4 << 20;

/// Writes a file in order, with `O_DIRECT` while it can.
struct Writer {
    path: PathBuf,
    file: std::fs::File,
    /// `Some` while writing with `O_DIRECT`: the buffer and its fill.
    direct: Option<(AlignedBuffer, usize)>,
}

impl Writer {
    fn create(path: &Path) -> std::io::Result<Self> {
        let mut create = std::fs::OpenOptions::new();
        create.write(true).create(true).truncate(true);
        if let Some(file) = open_direct(&mut create, path) {
            if let Some(buffer) = AlignedBuffer::new(DIRECT_BUFFER) {
                return Ok(Self {
                    path: path.to_path_buf(),
                    file,
                    direct: Some((buffer, 0)),
                });
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            file: std::fs::File::create(path)?,
            direct: None,
        })
    }

    fn write(&mut self, mut data: &[u8]) -> std::io::Result<()> {
        while !data.is_empty() {
            let Some((buffer, fill)) = self.direct.as_mut() else {
                return self.file.write_all(data);
            };
            let room = DIRECT_BUFFER - *fill;
            let n = room.min(data.len());
            buffer.as_mut_slice()[*fill..*fill + n].copy_from_slice(&data[..n]);
            *fill += n;
            data = &data[n..];
            if *fill == DIRECT_BUFFER {
                self.flush_direct()?;
            }
        }
        Ok(())
    }

    /// Writes the whole aligned blocks gathered; keeps a partial block's bytes in the buffer.
    fn flush_direct(&mut self) -> std::io::Result<()> {
        let Some((buffer, fill)) = self.direct.as_mut() else {
            return Ok(());
        };
        let whole = *fill / DIRECT_ALIGN * DIRECT_ALIGN;
        if whole == 0 {
            return Ok(());
        }
        match self.file.write_all(&buffer.as_slice()[..whole]) {
            Ok(()) => {
                buffer.as_mut_slice().copy_within(whole..*fill, 0);
                *fill -= whole;
                Ok(())
            }
            // The file system refused direct writes after all: go on through the page cache
            // (a failed direct write wrote nothing past the last whole block written).
            // (EINVAL is `InvalidInput`.)
            Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => self.leave_direct(),
            Err(e) => Err(e),
        }
    }

    /// Reopens the file for ordinary writes at its end, writing what the buffer holds.
    fn leave_direct(&mut self) -> std::io::Result<()> {
        let Some((buffer, fill)) = self.direct.take() else {
            return Ok(());
        };
        let written = self.file.metadata()?.len();
        let mut file = std::fs::OpenOptions::new().write(true).open(&self.path)?;
        file.set_len(written)?;
        std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(written))?;
        self.file = file;
        self.file.write_all(&buffer.as_slice()[..fill])
    }

    /// Writes everything and syncs it.
    fn finish(mut self) -> std::io::Result<()> {
        self.flush_direct()?;
        // The last partial block cannot be written directly.
        self.leave_direct()?;
        self.file.sync_all()
    }
}

/// A file written in order by its own thread.
pub(crate) struct FileSink {
    chunks: Option<crossbeam_channel::Sender<Vec<u8>>>,
    thread: Option<JoinHandle<Result<blake3::Hash, NodeError>>>,
}

impl FileSink {
    /// Creates (or truncates) `path` and starts the writing thread.
    pub(crate) fn create(path: &Path) -> Result<Self, NodeError> {
        let mut file = Writer::create(path).map_err(io_at(path))?;
        tracing::debug!(
            direct = file.direct.is_some(),
            "snapshot: writing the projection file"
        );
        let (chunks, queued) = crossbeam_channel::bounded::<Vec<u8>>(CHUNKS_QUEUED);
        let at: PathBuf = path.to_path_buf();
        let thread = std::thread::Builder::new()
            .name("keel-snapshot-file".into())
            .spawn(move || {
                let mut hasher = blake3::Hasher::new();
                for data in queued {
                    file.write(&data).map_err(io_at(&at))?;
                    hasher.update(&data);
                }
                file.finish().map_err(io_at(&at))?;
                Ok(hasher.finalize())
            })
            .map_err(io_at(path))?;
        Ok(Self {
            chunks: Some(chunks),
            thread: Some(thread),
        })
    }

    /// Queues the next bytes of the file (waits while the queue is full). `false` if the
    /// thread stopped (on an error, which [`FileSink::finish`] returns).
    pub(crate) fn write(&self, data: Vec<u8>) -> bool {
        self.chunks.as_ref().is_some_and(|c| c.send(data).is_ok())
    }

    /// Waits until everything queued is written and synced; returns the file's BLAKE3 hash,
    /// or the error that stopped the thread.
    pub(crate) fn finish(mut self) -> Result<blake3::Hash, NodeError> {
        self.chunks = None;
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(result)) => result,
            _ => Err(NodeError::Failed("the file writing thread failed".into())),
        }
    }
}

impl Drop for FileSink {
    /// An abandoned file: the thread writes what is queued, syncs, and is waited for.
    fn drop(&mut self) {
        self.chunks = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_land_in_order_with_their_hash_and_a_bad_path_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        let sink = FileSink::create(&path).expect("creates");
        let mut all = Vec::new();
        for i in 0..10u8 {
            let chunk = vec![i; 1000 + usize::from(i)];
            all.extend_from_slice(&chunk);
            assert!(sink.write(chunk));
        }
        assert_eq!(sink.finish().expect("written"), blake3::hash(&all));
        assert_eq!(std::fs::read(&path).expect("reads"), all);

        // Chunks that are not multiples of the block size, across several direct buffers,
        // land whole.
        let path = dir.path().join("g");
        let sink = FileSink::create(&path).expect("creates");
        let mut all = Vec::new();
        for i in 0..7u8 {
            let chunk = vec![i; DIRECT_BUFFER / 3 + 777 * usize::from(i)];
            all.extend_from_slice(&chunk);
            assert!(sink.write(chunk));
        }
        assert_eq!(sink.finish().expect("written"), blake3::hash(&all));
        assert_eq!(std::fs::read(&path).expect("reads"), all);

        // A file that cannot be created is an error at once.
        assert!(FileSink::create(&dir.path().join("missing/f")).is_err());
    }
}
