//! Per-field last-writer-wins clocks, stored in one compact blob per row.
//!
//! Layout: a sequence of `(field index u8, Hlc 44 bytes)`. Index `0xFF` is a default clock for
//! every field not listed. The encoding is canonical (a function of the clocks alone), so two
//! projections that saw the same changes in any order store the same bytes.

use keel_schema::Hlc;

const ALL_FIELDS: u8 = 0xFF;
const ENTRY_LEN: usize = 1 + Hlc::ENCODED_LEN;

/// The clock of each field of one row (`None` = never written).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FieldClocks(pub(crate) Vec<Option<Hlc>>);

impl FieldClocks {
    /// Decodes a blob; `None` if it is malformed.
    pub(crate) fn decode(bytes: &[u8], fields: usize) -> Option<Self> {
        if !bytes.len().is_multiple_of(ENTRY_LEN) {
            return None;
        }
        let mut clocks = vec![None; fields];
        for chunk in bytes.chunks_exact(ENTRY_LEN) {
            let hlc = Hlc::from_bytes(&chunk[1..])?;
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
                out.extend_from_slice(&first.to_bytes());
                return out;
            }
        }
        let mut out = Vec::with_capacity(ENTRY_LEN * self.0.len());
        for (i, clock) in self.0.iter().enumerate() {
            if let (Some(hlc), Ok(index)) = (clock, u8::try_from(i)) {
                out.push(index);
                out.extend_from_slice(&hlc.to_bytes());
            }
        }
        out
    }

    /// The canonical encoding of "every field written at `hlc`" (what [`FieldClocks::encode`]
    /// gives for uniform clocks), without allocating.
    pub(crate) fn encode_uniform(hlc: &Hlc) -> [u8; ENTRY_LEN] {
        let mut out = [0u8; ENTRY_LEN];
        out[0] = ALL_FIELDS;
        out[1..].copy_from_slice(&hlc.to_bytes());
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
    use keel_schema::DeviceId;

    /// A clock at `ms` of a fixed device (shared by the crate's unit tests).
    pub(crate) fn hlc(ms: u64) -> Hlc {
        Hlc {
            physical_ms: ms,
            counter: 0,
            device: DeviceId([1; 32]),
        }
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
