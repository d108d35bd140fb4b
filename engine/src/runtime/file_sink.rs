//! The receiving side of a snapshot writes the projection file on a thread of its own, hashing
//! it on the way, so the loop that takes messages off the connection never waits on the disk.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use crate::error::{io_at, EngineError};

/// File chunks queued for the writing thread (each up to 4 MiB).
const CHUNKS_QUEUED: usize = 4;

/// A file written in order by its own thread.
pub(crate) struct FileSink {
    chunks: Option<crossbeam_channel::Sender<Vec<u8>>>,
    thread: Option<JoinHandle<Result<blake3::Hash, EngineError>>>,
}

impl FileSink {
    /// Creates (or truncates) `path` and starts the writing thread.
    pub(crate) fn create(path: &Path) -> Result<Self, EngineError> {
        let mut file = std::fs::File::create(path).map_err(io_at(path))?;
        let (chunks, queued) = crossbeam_channel::bounded::<Vec<u8>>(CHUNKS_QUEUED);
        let at: PathBuf = path.to_path_buf();
        let thread = std::thread::Builder::new()
            .name("keel-snapshot-file".into())
            .spawn(move || {
                let mut hasher = blake3::Hasher::new();
                for data in queued {
                    file.write_all(&data).map_err(io_at(&at))?;
                    hasher.update(&data);
                }
                file.sync_all().map_err(io_at(&at))?;
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
    pub(crate) fn finish(mut self) -> Result<blake3::Hash, EngineError> {
        self.chunks = None;
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(result)) => result,
            _ => Err(EngineError::Node("the file writing thread failed".into())),
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

        // A file that cannot be created is an error at once.
        assert!(FileSink::create(&dir.path().join("missing/f")).is_err());
    }
}
