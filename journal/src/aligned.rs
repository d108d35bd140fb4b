//! A buffer aligned for direct I/O (`O_DIRECT` needs its buffer, offset and length aligned).

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
