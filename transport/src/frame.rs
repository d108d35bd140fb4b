//! Length-prefixed frames: a `u32` big-endian length, then that many bytes. The length is checked
//! against [`FRAME_LEN_MAX`] before any buffer is allocated for the body.

use crate::error::TransportError;

/// Largest frame body accepted (a log segment of many records fits well below it).
pub const FRAME_LEN_MAX: usize = 16 * 1024 * 1024;
/// Bytes of the length prefix.
pub const FRAME_HEADER_LEN: usize = 4;

/// Prefixes `body` with its length. Bodies over [`FRAME_LEN_MAX`] are refused.
pub fn encode_frame(body: &[u8]) -> Result<Vec<u8>, TransportError> {
    if body.len() > FRAME_LEN_MAX {
        return Err(TransportError::FrameTooLarge(body.len() as u64));
    }
    let mut out = Vec::with_capacity(FRAME_HEADER_LEN + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(body);
    Ok(out)
}

/// The body length announced by a frame header, checked against the limit.
pub fn frame_len(header: [u8; FRAME_HEADER_LEN]) -> Result<usize, TransportError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > FRAME_LEN_MAX {
        return Err(TransportError::FrameTooLarge(len as u64));
    }
    Ok(len)
}

/// Splits a byte stream into frames as bytes arrive.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buffer: Vec<u8>,
}

impl FrameDecoder {
    /// A decoder with nothing buffered.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    /// The next complete frame body, `Ok(None)` if more bytes are needed, or an error (the stream is
    /// then unusable and the connection should close).
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, TransportError> {
        let Some(header) = self.buffer.get(..FRAME_HEADER_LEN) else {
            return Ok(None);
        };
        let mut prefix = [0u8; FRAME_HEADER_LEN];
        prefix.copy_from_slice(header);
        let len = frame_len(prefix)?;
        if self.buffer.len() < FRAME_HEADER_LEN + len {
            return Ok(None);
        }
        let body = self.buffer[FRAME_HEADER_LEN..FRAME_HEADER_LEN + len].to_vec();
        self.buffer.drain(..FRAME_HEADER_LEN + len);
        Ok(Some(body))
    }

    /// Bytes buffered but not yet returned.
    pub fn buffered(&self) -> usize {
        self.buffer.len()
    }
}

/// Decodes exactly one frame from `bytes` (no trailing bytes).
pub fn decode_frame(bytes: &[u8]) -> Result<&[u8], TransportError> {
    let Some(header) = bytes.get(..FRAME_HEADER_LEN) else {
        return Err(TransportError::Truncated {
            needed: FRAME_HEADER_LEN - bytes.len(),
        });
    };
    let mut prefix = [0u8; FRAME_HEADER_LEN];
    prefix.copy_from_slice(header);
    let len = frame_len(prefix)?;
    let body = &bytes[FRAME_HEADER_LEN..];
    if body.len() < len {
        return Err(TransportError::Truncated {
            needed: len - body.len(),
        });
    }
    if body.len() > len {
        return Err(TransportError::Malformed(format!(
            "{} bytes after the frame",
            body.len() - len
        )));
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_split_across_pushes() {
        let mut stream = encode_frame(b"hello").expect("small");
        stream.extend(encode_frame(b"").expect("small"));
        stream.extend(encode_frame(&[7u8; 300]).expect("small"));
        let mut decoder = FrameDecoder::new();
        let mut frames = Vec::new();
        for byte in stream {
            decoder.push(&[byte]);
            while let Some(frame) = decoder.next_frame().expect("valid") {
                frames.push(frame);
            }
        }
        assert_eq!(frames, vec![b"hello".to_vec(), Vec::new(), vec![7u8; 300]]);
        assert_eq!(decoder.buffered(), 0);
    }

    #[test]
    fn oversized_length_is_refused_before_allocating() {
        let mut decoder = FrameDecoder::new();
        decoder.push(&u32::MAX.to_be_bytes());
        assert_eq!(
            decoder.next_frame(),
            Err(TransportError::FrameTooLarge(u64::from(u32::MAX)))
        );
        assert!(decode_frame(&[0, 0, 0, 5, 1]).is_err());
        assert_eq!(decode_frame(&[0, 0, 0, 1, 9]), Ok(&[9u8][..]));
    }
}
