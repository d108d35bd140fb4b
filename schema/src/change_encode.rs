//! A direct encoder for the canonical MessagePack form of a [`Change`] body.
//!
//! The canonical form is what rmp-serde writes for a `Change` (see [`crate::change_decode`] for
//! its shape). Going through serde cost about 3,000 instructions per change on the indexer's
//! changes; this writes the same bytes directly, with the same rules: integers in their
//! shortest form (signed ones as rmp's `write_sint` does), strings and byte strings with the
//! shortest length prefix. `tests::the_direct_encoder_writes_what_serde_writes` holds it to
//! serde's output.

use crate::change::{Change, Op};
use crate::value::{Value, TAG_BOOL, TAG_BYTES, TAG_INT, TAG_NULL, TAG_TEXT, TAG_UUID};

fn uint(out: &mut Vec<u8>, v: u64) {
    if v < 0x80 {
        out.push(v as u8);
    } else if v <= u64::from(u8::MAX) {
        out.extend_from_slice(&[0xcc, v as u8]);
    } else if v <= u64::from(u16::MAX) {
        out.push(0xcd);
        out.extend_from_slice(&(v as u16).to_be_bytes());
    } else if v <= u64::from(u32::MAX) {
        out.push(0xce);
        out.extend_from_slice(&(v as u32).to_be_bytes());
    } else {
        out.push(0xcf);
        out.extend_from_slice(&v.to_be_bytes());
    }
}

fn sint(out: &mut Vec<u8>, v: i64) {
    if v >= 0 {
        uint(out, v as u64);
    } else if v >= -32 {
        out.push(v as i8 as u8);
    } else if v >= i64::from(i8::MIN) {
        out.extend_from_slice(&[0xd0, v as i8 as u8]);
    } else if v >= i64::from(i16::MIN) {
        out.push(0xd1);
        out.extend_from_slice(&(v as i16).to_be_bytes());
    } else if v >= i64::from(i32::MIN) {
        out.push(0xd2);
        out.extend_from_slice(&(v as i32).to_be_bytes());
    } else {
        out.push(0xd3);
        out.extend_from_slice(&v.to_be_bytes());
    }
}

fn array(out: &mut Vec<u8>, len: usize) {
    if len < 16 {
        out.push(0x90 | len as u8);
    } else if let Ok(len) = u16::try_from(len) {
        out.push(0xdc);
        out.extend_from_slice(&len.to_be_bytes());
    } else {
        out.push(0xdd);
        out.extend_from_slice(&(len as u32).to_be_bytes());
    }
}

fn bin(out: &mut Vec<u8>, bytes: &[u8]) {
    let len = bytes.len();
    if let Ok(len) = u8::try_from(len) {
        out.extend_from_slice(&[0xc4, len]);
    } else if let Ok(len) = u16::try_from(len) {
        out.push(0xc5);
        out.extend_from_slice(&len.to_be_bytes());
    } else {
        out.push(0xc6);
        out.extend_from_slice(&(len as u32).to_be_bytes());
    }
    out.extend_from_slice(bytes);
}

fn str(out: &mut Vec<u8>, text: &str) {
    let len = text.len();
    if len < 32 {
        out.push(0xa0 | len as u8);
    } else if let Ok(len) = u8::try_from(len) {
        out.extend_from_slice(&[0xd9, len]);
    } else if let Ok(len) = u16::try_from(len) {
        out.push(0xda);
        out.extend_from_slice(&len.to_be_bytes());
    } else {
        out.push(0xdb);
        out.extend_from_slice(&(len as u32).to_be_bytes());
    }
    out.extend_from_slice(text.as_bytes());
}

fn value(out: &mut Vec<u8>, value: &Value) {
    array(out, 2);
    match value {
        Value::Null => out.extend_from_slice(&[TAG_NULL, 0xc0]),
        Value::Bool(b) => out.extend_from_slice(&[TAG_BOOL, if *b { 0xc3 } else { 0xc2 }]),
        Value::Int(i) => {
            out.push(TAG_INT);
            sint(out, *i);
        }
        Value::Text(text) => {
            out.push(TAG_TEXT);
            str(out, text);
        }
        Value::Bytes(bytes) => {
            out.push(TAG_BYTES);
            bin(out, bytes);
        }
        Value::Uuid(uuid) => {
            out.push(TAG_UUID);
            bin(out, uuid.as_bytes());
        }
    }
}

/// Appends the canonical body of `change` (everything after the format version) to `out`.
pub(crate) fn encode_body(change: &Change, out: &mut Vec<u8>) {
    // The version is a sixth element only when it or the causal context is not 0 (as serde
    // skips it), the causal context a seventh only when it is not 0.
    let elements = match (change.version, change.seen) {
        (0, 0) => 5,
        (_, 0) => 6,
        _ => 7,
    };
    array(out, elements);
    bin(out, change.id.0.as_bytes());
    array(out, 3);
    uint(out, change.hlc.physical_ms);
    uint(out, u64::from(change.hlc.counter));
    bin(out, &change.hlc.device.0);
    uint(out, u64::from(change.model));
    bin(out, change.record.as_bytes());
    match &change.op {
        Op::Delete => str(out, "Delete"),
        Op::Upsert(fields) => {
            // A one-entry map: the variant's name, then its fields.
            out.push(0x81);
            str(out, "Upsert");
            array(out, fields.len());
            for (index, v) in fields {
                array(out, 2);
                uint(out, u64::from(*index));
                value(out, v);
            }
        }
    }
    if elements >= 6 {
        uint(out, u64::from(change.version));
    }
    if elements == 7 {
        uint(out, change.seen);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change_decode::tests::change_with;
    use proptest::prelude::*;
    use serde::Serialize;

    fn serde_body(change: &Change) -> Vec<u8> {
        let mut out = Vec::new();
        let mut serializer = rmp_serde::Serializer::new(&mut out).with_binary();
        change.serialize(&mut serializer).expect("serializes");
        out
    }

    #[test]
    fn integers_at_every_boundary_match_serde() {
        let edges: Vec<i64> = [0i64, 31, 32, 127, 128, 255, 256, 65_535, 65_536]
            .into_iter()
            .chain([u32::MAX as i64, u32::MAX as i64 + 1, i64::MAX])
            .flat_map(|v| [v, -v, v - 1, -v - 1])
            .chain([i64::MIN, -33, -129, -32_769, i64::from(i32::MIN) - 1])
            .collect();
        for v in edges {
            let mut direct = Vec::new();
            value(&mut direct, &Value::Int(v));
            let mut serde = Vec::new();
            Value::Int(v)
                .serialize(&mut rmp_serde::Serializer::new(&mut serde).with_binary())
                .expect("serializes");
            assert_eq!(direct, serde, "{v}");
        }
    }

    proptest! {
        /// The direct encoder writes exactly serde's bytes: small and long strings and byte
        /// strings, many fields, every value type, deletes.
        #[test]
        fn the_direct_encoder_writes_what_serde_writes(change in change_with(40, 300)) {
            let mut direct = Vec::new();
            encode_body(&change, &mut direct);
            prop_assert_eq!(direct, serde_body(&change));
        }
    }
}
