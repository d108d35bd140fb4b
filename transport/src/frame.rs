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

/// Decodes exactly one frame from `bytes` (no trailing bytes), with the checks
/// `Connection::recv` makes as it reads a stream: [`frame_len`] on the header before the body.
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
    fn oversized_length_is_refused_before_allocating() {
        assert_eq!(
            frame_len(u32::MAX.to_be_bytes()),
            Err(TransportError::FrameTooLarge(u64::from(u32::MAX)))
        );
        let frame = encode_frame(b"hello").expect("small");
        assert_eq!(decode_frame(&frame), Ok(&b"hello"[..]));
        assert!(decode_frame(&[0, 0, 0, 5, 1]).is_err());
        assert_eq!(decode_frame(&[0, 0, 0, 1, 9]), Ok(&[9u8][..]));
    }
}
