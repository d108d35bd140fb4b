//! Per-field last-writer-wins clocks, stored in one compact blob per row.
//!
//! A stored clock keeps the first [`DEVICE_PREFIX`] bytes of its device id ([`stored`]): a
//! device id is the SHA-256 of its certificate, so two devices of one library share eight
//! leading bytes with odds of about 2^-64 per pair, and finding a certificate that matches a
//! given prefix takes about 2^64 hashes. Clocks are compared as stored, so the order is
//! `(HLC time, counter, device prefix)`: the full order wherever prefixes differ. A clock is
//! [`CLOCK_LEN`] bytes (20, where [`Hlc::to_bytes`] takes 44; decision 0074).
//!
//! Layout of a row's blob: a sequence of `(field index u8, clock)`. Index `0xFF` is a default
//! clock for every field not listed. The encoding is canonical (a function of the clocks alone),
//! so two projections that saw the same changes in any order store the same bytes.

use keel_schema::{DeviceId, Hlc};

const ALL_FIELDS: u8 = 0xFF;
/// Bytes of a device id a stored clock keeps.
pub(crate) const DEVICE_PREFIX: usize = 8;
/// Encoded length of one stored clock: time, counter, device prefix.
pub(crate) const CLOCK_LEN: usize = 8 + 4 + DEVICE_PREFIX;
const ENTRY_LEN: usize = 1 + CLOCK_LEN;
/// Length of an entry of schema version 9's blob (a whole [`Hlc::to_bytes`]).
const V9_ENTRY_LEN: usize = 1 + Hlc::ENCODED_LEN;

/// `hlc` as a projection keeps it: its device id cut to [`DEVICE_PREFIX`] bytes, the rest zero.
/// Every clock is compared with stored ones in this form.
pub(crate) fn stored(hlc: Hlc) -> Hlc {
    let mut device = hlc.device.0;
    device[DEVICE_PREFIX..].fill(0);
    Hlc {
        device: DeviceId(device),
        ..hlc
    }
}

/// The stored encoding of `hlc` (of [`stored`]`(hlc)`: the same bytes), in clock order.
pub(crate) fn encode_clock(hlc: &Hlc) -> [u8; CLOCK_LEN] {
    let mut out = [0u8; CLOCK_LEN];
    out.copy_from_slice(&hlc.to_bytes()[..CLOCK_LEN]);
    out
}

/// Decodes [`encode_clock`]; `None` if the slice has the wrong length.
pub(crate) fn decode_clock(bytes: &[u8]) -> Option<Hlc> {
    if bytes.len() != CLOCK_LEN {
        return None;
    }
    let mut whole = [0u8; Hlc::ENCODED_LEN];
    whole[..CLOCK_LEN].copy_from_slice(bytes);
    Hlc::from_bytes(&whole)
}

/// The clock of each field of one row (`None` = never written).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FieldClocks(pub(crate) Vec<Option<Hlc>>);

impl FieldClocks {
    /// Decodes a blob; `None` if it is malformed.
    pub(crate) fn decode(bytes: &[u8], fields: usize) -> Option<Self> {
        Self::decode_as(bytes, fields, ENTRY_LEN, decode_clock)
    }

    /// Decodes a blob of schema version 9 (whole clocks); `None` if it is malformed.
    pub(crate) fn decode_v9(bytes: &[u8], fields: usize) -> Option<Self> {
        Self::decode_as(bytes, fields, V9_ENTRY_LEN, |b| {
            Hlc::from_bytes(b).map(stored)
        })
    }

    fn decode_as(
        bytes: &[u8],
        fields: usize,
        entry_len: usize,
        clock: impl Fn(&[u8]) -> Option<Hlc>,
    ) -> Option<Self> {
        if !bytes.len().is_multiple_of(entry_len) {
            return None;
        }
        let mut clocks = vec![None; fields];
        for chunk in bytes.chunks_exact(entry_len) {
            let hlc = clock(&chunk[1..])?;
            match chunk[0] {
                ALL_FIELDS => clocks.iter_mut().for_each(|c| *c = Some(hlc)),
                i => *clocks.get_mut(usize::from(i))? = Some(hlc),
            }
        }
        Some(Self(clocks))
    }

    /// The canonical encoding.
    pub(crate) fn encode(&self) -> Vec<u8> {
        if let Some(Some(first)) = self.0.first() {
            if self.0.iter().all(|c| *c == Some(*first)) {
                let mut out = Vec::with_capacity(ENTRY_LEN);
                out.push(ALL_FIELDS);
                out.extend_from_slice(&encode_clock(first));
                return out;
            }
        }
        let mut out = Vec::with_capacity(ENTRY_LEN * self.0.len());
        for (i, clock) in self.0.iter().enumerate() {
            if let (Some(hlc), Ok(index)) = (clock, u8::try_from(i)) {
                out.push(index);
                out.extend_from_slice(&encode_clock(hlc));
            }
        }
        out
    }

    /// The canonical encoding of "every field written at `hlc`" (what [`FieldClocks::encode`]
    /// gives for uniform clocks), without allocating.
    pub(crate) fn encode_uniform(hlc: &Hlc) -> [u8; ENTRY_LEN] {
        let mut out = [0u8; ENTRY_LEN];
        out[0] = ALL_FIELDS;
        out[1..].copy_from_slice(&encode_clock(hlc));
        out
    }

    /// The newest clock of any field.
    pub(crate) fn newest(&self) -> Option<Hlc> {
        self.0.iter().flatten().max().copied()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A clock at `ms` of a fixed device, as stored (shared by the crate's unit tests).
    pub(crate) fn hlc(ms: u64) -> Hlc {
        stored(Hlc {
            physical_ms: ms,
            counter: 0,
            device: DeviceId([1; 32]),
        })
    }

    #[test]
    fn a_stored_clock_keeps_the_device_prefix_in_clock_order() {
        let full = Hlc {
            physical_ms: 7,
            counter: 3,
            device: DeviceId([0xAB; 32]),
        };
        let bytes = encode_clock(&full);
        assert_eq!(bytes.len(), 20);
        assert_eq!(
            encode_clock(&stored(full)),
            bytes,
            "one encoding either way"
        );
        assert_eq!(decode_clock(&bytes), Some(stored(full)));
        assert_eq!(decode_clock(&bytes[1..]), None);
        // Devices whose prefixes differ keep their order; later times come later.
        let mut other = full;
        other.device.0[7] = 0xAC;
        assert!(stored(full) < stored(other) && full < other);
        assert!(encode_clock(&full) < encode_clock(&other));
        let later = Hlc { counter: 4, ..full };
        assert!(encode_clock(&full) < encode_clock(&later));
        // Schema version 9's whole clocks decode to the stored form.
        let mut v9 = vec![ALL_FIELDS];
        v9.extend_from_slice(&full.to_bytes());
        assert_eq!(
            FieldClocks::decode_v9(&v9, 2),
            Some(FieldClocks(vec![Some(stored(full)); 2]))
        );
        assert_eq!(FieldClocks::decode_v9(&v9[1..], 2), None);
    }

    #[test]
    fn uniform_clocks_encode_compactly_and_round_trip() {
        let uniform = FieldClocks(vec![Some(hlc(5)); 4]);
        assert_eq!(uniform.encode().len(), ENTRY_LEN);
        assert_eq!(
            FieldClocks::decode(&uniform.encode(), 4),
            Some(uniform.clone())
        );
        let mixed = FieldClocks(vec![Some(hlc(5)), None, Some(hlc(7)), Some(hlc(5))]);
        assert_eq!(FieldClocks::decode(&mixed.encode(), 4), Some(mixed.clone()));
        assert_eq!(mixed.newest(), Some(hlc(7)));
        assert_eq!(FieldClocks::decode(&[1, 2, 3], 4), None);
        assert_eq!(
            FieldClocks::encode_uniform(&hlc(5)).as_slice(),
            uniform.encode().as_slice()
        );
    }
}
