//! Direct I/O helpers: opening a file with `O_DIRECT`, and a buffer aligned for it (`O_DIRECT`
//! needs its buffer, offset and length aligned).

/// Alignment of a direct write: its buffer, file offset and length.
pub const DIRECT_ALIGN: usize = 4096;

/// A zeroed buffer of a given length whose start is aligned to [`DIRECT_ALIGN`].
pub struct AlignedBuffer {
    bytes: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuffer {
    /// A buffer of `len` bytes, or `None` if no aligned start could be found.
    pub fn new(len: usize) -> Option<Self> {
        let bytes = vec![0u8; len + DIRECT_ALIGN];
        let start = bytes.as_ptr().align_offset(DIRECT_ALIGN);
        (start < DIRECT_ALIGN).then_some(Self { bytes, start, len })
    }

    /// The buffer's bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[self.start..self.start + self.len]
    }

    /// The buffer's bytes, to fill.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.bytes[self.start..self.start + self.len]
    }
}

/// Opens `path` with `options` plus `O_DIRECT` (writes past the page cache), if this platform
/// and the file system allow it; `None` otherwise (the caller then writes the ordinary way).
#[cfg(target_os = "linux")]
pub fn open_direct(
    options: &mut std::fs::OpenOptions,
    path: &std::path::Path,
) -> Option<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    options.custom_flags(libc::O_DIRECT).open(path).ok()
}

/// Direct I/O is used on Linux only.
#[cfg(not(target_os = "linux"))]
pub fn open_direct(
    _options: &mut std::fs::OpenOptions,
    _path: &std::path::Path,
) -> Option<std::fs::File> {
    None
}

impl std::fmt::Debug for AlignedBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuffer({} bytes)", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_buffer_starts_aligned_and_has_its_length() {
        let mut b = AlignedBuffer::new(10_000).expect("aligned");
        assert_eq!(b.as_slice().as_ptr() as usize % DIRECT_ALIGN, 0);
        assert_eq!(b.as_mut_slice().len(), 10_000);
    }
}
