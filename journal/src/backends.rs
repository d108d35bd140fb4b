//! What Keel's redb storage backends share: their file-range locks, forwarded to the wrapped
//! backend, and (in tests) a fresh file to wrap.

/// Implements the range-lock methods of [`redb::StorageBackend`] by calling the same methods
/// on `self.inner` (redb's own `FileBackend`, which takes the locks on the file).
macro_rules! forward_range_locks {
    () => {
        fn try_lock_range(
            &self,
            start: std::ops::Bound<u64>,
            end: std::ops::Bound<u64>,
        ) -> Result<bool, redb::BackendError> {
            self.inner.try_lock_range(start, end)
        }

        fn try_lock_shared_range(
            &self,
            start: std::ops::Bound<u64>,
            end: std::ops::Bound<u64>,
        ) -> Result<bool, redb::BackendError> {
            self.inner.try_lock_shared_range(start, end)
        }

        fn lock_range(
            &self,
            start: std::ops::Bound<u64>,
            end: std::ops::Bound<u64>,
        ) -> Result<(), redb::BackendError> {
            self.inner.lock_range(start, end)
        }

        fn lock_shared_range(
            &self,
            start: std::ops::Bound<u64>,
            end: std::ops::Bound<u64>,
        ) -> Result<(), redb::BackendError> {
            self.inner.lock_shared_range(start, end)
        }

        fn unlock_range(
            &self,
            start: std::ops::Bound<u64>,
            end: std::ops::Bound<u64>,
        ) -> Result<(), redb::BackendError> {
            self.inner.unlock_range(start, end)
        }

        fn query_lock_range(
            &self,
            start: std::ops::Bound<u64>,
            end: std::ops::Bound<u64>,
        ) -> Result<bool, redb::BackendError> {
            self.inner.query_lock_range(start, end)
        }
    };
}

pub(crate) use forward_range_locks;

/// A new, empty file `f` in `dir`, opened for reading and writing, and its path.
#[cfg(test)]
pub(crate) fn new_file(dir: &std::path::Path) -> (std::fs::File, std::path::PathBuf) {
    let path = dir.join("f");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .expect("creates");
    (file, path)
}
