//! Byte layout of journal records (see `docs/journal-format.md`), checked on every read.

use keel_schema::{DeviceId, Epoch};

use crate::seal::{SEAL_HEADER_LEN, SEAL_TAG_LEN};

/// Version byte of log and local records.
pub const RECORD_VERSION: u8 = 1;
/// Bytes before the sealed payload in a log record: version, epoch counter, epoch device, CRC32.
pub const LOG_HEADER_LEN: usize = 1 + 8 + 32 + 4;
/// Bytes before the sealed payload in a local record: version, push state, CRC32.
pub const LOCAL_HEADER_LEN: usize = 1 + 1 + 4;
/// Largest record accepted (a change is far smaller; this bounds allocations on hostile input).
pub const RECORD_LEN_MAX: usize = 1 << 20;

/// Why a record's bytes were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    /// Shorter than a header plus the smallest sealed payload.
    #[error("record too short ({0} bytes)")]
    TooShort(usize),
    /// Larger than [`RECORD_LEN_MAX`].
    #[error("record too long ({0} bytes)")]
    TooLong(usize),
    /// Unknown version byte.
    #[error("unknown record version {0}")]
    Version(u8),
    /// CRC32 mismatch.
    #[error("checksum mismatch (stored {stored:08x}, computed {computed:08x})")]
    Checksum {
        /// Stored checksum.
        stored: u32,
        /// Computed checksum.
        computed: u32,
    },
    /// Unknown push state.
    #[error("unknown push state {0}")]
    PushState(u8),
    /// A log page whose record lengths or count do not add up.
    #[error("log page framing is damaged")]
    Framing,
}

/// A leader-log record: the epoch that sequenced it and the sealed change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRecord<'a> {
    /// The epoch of the leader that sequenced it.
    pub epoch: Epoch,
    /// The sealed change.
    pub sealed: &'a [u8],
}

fn check_len(len: usize, header: usize) -> Result<(), RecordError> {
    if len < header + SEAL_HEADER_LEN + SEAL_TAG_LEN {
        return Err(RecordError::TooShort(len));
    }
    if len > RECORD_LEN_MAX {
        return Err(RecordError::TooLong(len));
    }
    Ok(())
}

fn crc_without(bytes: &[u8], crc_at: usize) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&bytes[..crc_at]);
    hasher.update(&bytes[crc_at + 4..]);
    hasher.finalize()
}

fn check_crc(bytes: &[u8], crc_at: usize) -> Result<(), RecordError> {
    let stored = u32::from_be_bytes([
        bytes[crc_at],
        bytes[crc_at + 1],
        bytes[crc_at + 2],
        bytes[crc_at + 3],
    ]);
    let computed = crc_without(bytes, crc_at);
    if stored != computed {
        return Err(RecordError::Checksum { stored, computed });
    }
    Ok(())
}

impl<'a> LogRecord<'a> {
    /// Encodes the record with its checksum.
    pub fn encode(epoch: Epoch, sealed: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(LOG_HEADER_LEN + sealed.len());
        Self::encode_into(epoch, &mut out, |buf| buf.extend_from_slice(sealed));
        out
    }

    /// Replaces the contents of `out` with what [`LogRecord::encode`] returns, for the sealed
    /// change that `write_sealed` appends to the buffer it is given.
    pub fn encode_into(epoch: Epoch, out: &mut Vec<u8>, write_sealed: impl FnOnce(&mut Vec<u8>)) {
        out.clear();
        Self::append_encoded(epoch, out, write_sealed);
    }

    /// Appends to `out` what [`LogRecord::encode`] returns, for the sealed change that
    /// `write_sealed` appends (a log page is built this way without a copy per record).
    pub fn append_encoded(
        epoch: Epoch,
        out: &mut Vec<u8>,
        write_sealed: impl FnOnce(&mut Vec<u8>),
    ) {
        let start = out.len();
        out.push(RECORD_VERSION);
        out.extend_from_slice(&epoch.counter.to_be_bytes());
        out.extend_from_slice(&epoch.device.0);
        out.extend_from_slice(&[0; 4]);
        write_sealed(out);
        let crc = crc_without(&out[start..], 41);
        out[start + 41..start + 45].copy_from_slice(&crc.to_be_bytes());
    }

    /// Whether these stored bytes are an epoch barrier (a record with no change: the first entry
    /// a new leader writes). Readers of changes skip barriers.
    pub fn is_barrier(bytes: &[u8]) -> bool {
        bytes.len() == LOG_HEADER_LEN
    }

    /// Decodes and checks a record (a barrier decodes with an empty `sealed`). Never panics on
    /// any input.
    pub fn decode(bytes: &'a [u8]) -> Result<Self, RecordError> {
        if !Self::is_barrier(bytes) {
            check_len(bytes.len(), LOG_HEADER_LEN)?;
        }
        if bytes[0] != RECORD_VERSION {
            return Err(RecordError::Version(bytes[0]));
        }
        check_crc(bytes, 41)?;
        let mut counter = [0u8; 8];
        counter.copy_from_slice(&bytes[1..9]);
        let mut device = [0u8; 32];
        device.copy_from_slice(&bytes[9..41]);
        Ok(Self {
            epoch: Epoch {
                counter: u64::from_be_bytes(counter),
                device: DeviceId(device),
            },
            sealed: &bytes[LOG_HEADER_LEN..],
        })
    }
}

/// Push state of a local (not yet sequenced) change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushState {
    /// Durable here, not yet sent to a leader.
    Pending = 0,
    /// Sent to a leader, not yet seen in its log.
    Sent = 1,
}

/// A local-journal record: a change committed while this device is not the leader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalRecord<'a> {
    /// Its push state.
    pub state: PushState,
    /// The sealed change.
    pub sealed: &'a [u8],
}

impl<'a> LocalRecord<'a> {
    /// Encodes the record with its checksum.
    pub fn encode(state: PushState, sealed: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(LOCAL_HEADER_LEN + sealed.len());
        out.push(RECORD_VERSION);
        out.push(state as u8);
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(sealed);
        let crc = crc_without(&out, 2);
        out[2..6].copy_from_slice(&crc.to_be_bytes());
        out
    }

    /// Decodes and checks a record. Never panics on any input.
    pub fn decode(bytes: &'a [u8]) -> Result<Self, RecordError> {
        check_len(bytes.len(), LOCAL_HEADER_LEN)?;
        if bytes[0] != RECORD_VERSION {
            return Err(RecordError::Version(bytes[0]));
        }
        check_crc(bytes, 2)?;
        let state = match bytes[1] {
            0 => PushState::Pending,
            1 => PushState::Sent,
            other => return Err(RecordError::PushState(other)),
        };
        Ok(Self {
            state,
            sealed: &bytes[LOCAL_HEADER_LEN..],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_record_round_trip_and_every_bit_flip_is_caught() {
        let epoch = Epoch {
            counter: 7,
            device: DeviceId([9; 32]),
        };
        let sealed = vec![5u8; 80];
        let bytes = LogRecord::encode(epoch, &sealed);
        let rec = LogRecord::decode(&bytes).expect("decodes");
        assert_eq!(rec.epoch, epoch);
        assert_eq!(rec.sealed, &sealed[..]);
        for i in 0..bytes.len() * 8 {
            let mut bad = bytes.clone();
            bad[i / 8] ^= 1 << (i % 8);
            assert!(
                LogRecord::decode(&bad).is_err(),
                "flip of bit {i} not caught"
            );
        }
        for cut in 0..bytes.len() {
            assert!(LogRecord::decode(&bytes[..cut]).is_err());
        }
    }

    #[test]
    fn local_record_round_trip() {
        let sealed = vec![1u8; 70];
        let bytes = LocalRecord::encode(PushState::Sent, &sealed);
        let rec = LocalRecord::decode(&bytes).expect("decodes");
        assert_eq!(rec.state, PushState::Sent);
        let mut bad = bytes.clone();
        bad[1] = 0;
        assert!(LocalRecord::decode(&bad).is_err());
    }
}
