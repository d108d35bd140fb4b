//! A direct decoder for the canonical MessagePack form of a [`Change`] body.
//!
//! [`Change::encode`] writes its body with rmp-serde; decoding that body through serde costs
//! about 6,000 instructions per change (a visitor per value, an allocation per uuid). This
//! decoder reads exactly the shape [`Change::encode`] writes, with no intermediate buffers:
//!
//! ```text
//! [ id: bin16, [ physical_ms: uint, counter: uint, device: bin32 ], model: uint, record: bin16,
//!   "Delete" | { "Upsert": [ [index: uint, [tag: uint, payload]] … ] } (, version: uint)? ]
//! ```
//!
//! Anything else (another valid MessagePack spelling, or garbage) makes it return `None`, and the
//! caller falls back to serde, which gives the same value or the error. So the decoder can only
//! be faster, never more permissive; `tests::the_direct_decoder_agrees_with_serde` checks that
//! whenever it returns a change, serde returns the same one.

use uuid::Uuid;

use crate::change::{Change, Op, FIELDS_PER_CHANGE_MAX};
use crate::hlc::Hlc;
use crate::ids::{ChangeId, DeviceId};
use crate::value::{Value, TAG_BOOL, TAG_BYTES, TAG_INT, TAG_NULL, TAG_TEXT, TAG_UUID};

/// A cursor over the body. Every read returns `None` at the end of the input.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.bytes.split_first()?;
        self.bytes = rest;
        Some(b)
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.bytes.len() < n {
            return None;
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Some(head)
    }

    fn be<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }

    /// An array header; returns its length.
    fn array(&mut self) -> Option<usize> {
        match self.byte()? {
            m @ 0x90..=0x9f => Some(usize::from(m & 0x0f)),
            0xdc => Some(usize::from(u16::from_be_bytes(self.be()?))),
            0xdd => usize::try_from(u32::from_be_bytes(self.be()?)).ok(),
            _ => None,
        }
    }

    /// Any integer, as i128 (every MessagePack integer fits).
    fn int(&mut self) -> Option<i128> {
        Some(match self.byte()? {
            m @ 0x00..=0x7f => i128::from(m),
            m @ 0xe0..=0xff => i128::from(i8::from_be_bytes([m])),
            0xcc => i128::from(self.byte()?),
            0xcd => i128::from(u16::from_be_bytes(self.be()?)),
            0xce => i128::from(u32::from_be_bytes(self.be()?)),
            0xcf => i128::from(u64::from_be_bytes(self.be()?)),
            0xd0 => i128::from(i8::from_be_bytes(self.be()?)),
            0xd1 => i128::from(i16::from_be_bytes(self.be()?)),
            0xd2 => i128::from(i32::from_be_bytes(self.be()?)),
            0xd3 => i128::from(i64::from_be_bytes(self.be()?)),
            _ => return None,
        })
    }

    fn uint<T: TryFrom<i128>>(&mut self) -> Option<T> {
        T::try_from(self.int()?).ok()
    }

    fn bin(&mut self) -> Option<&'a [u8]> {
        let len = match self.byte()? {
            0xc4 => usize::from(self.byte()?),
            0xc5 => usize::from(u16::from_be_bytes(self.be()?)),
            0xc6 => usize::try_from(u32::from_be_bytes(self.be()?)).ok()?,
            _ => return None,
        };
        self.take(len)
    }

    fn str(&mut self) -> Option<&'a str> {
        let len = match self.byte()? {
            m @ 0xa0..=0xbf => usize::from(m & 0x1f),
            0xd9 => usize::from(self.byte()?),
            0xda => usize::from(u16::from_be_bytes(self.be()?)),
            0xdb => usize::try_from(u32::from_be_bytes(self.be()?)).ok()?,
            _ => return None,
        };
        std::str::from_utf8(self.take(len)?).ok()
    }

    fn uuid(&mut self) -> Option<Uuid> {
        Uuid::from_slice(self.bin()?).ok()
    }

    fn value(&mut self) -> Option<Value> {
        if self.array()? != 2 {
            return None;
        }
        Some(match self.uint::<u8>()? {
            TAG_NULL => {
                if self.byte()? != 0xc0 {
                    return None;
                }
                Value::Null
            }
            TAG_BOOL => match self.byte()? {
                0xc2 => Value::Bool(false),
                0xc3 => Value::Bool(true),
                _ => return None,
            },
            TAG_INT => Value::Int(self.uint::<i64>()?),
            TAG_TEXT => Value::Text(self.str()?.to_owned()),
            TAG_BYTES => Value::Bytes(self.bin()?.to_vec()),
            TAG_UUID => Value::Uuid(self.uuid()?),
            _ => return None,
        })
    }
}

/// Decodes a change body (the bytes after the format version) written in the canonical shape;
/// `None` if the body has any other shape or trailing bytes. Does not validate the change.
pub(crate) fn decode_body(body: &[u8]) -> Option<Change> {
    let mut r = Reader { bytes: body };
    let elements = r.array()?;
    if !(5..=7).contains(&elements) {
        return None;
    }
    let id = ChangeId(r.uuid()?);
    if r.array()? != 3 {
        return None;
    }
    let physical_ms = r.uint::<u64>()?;
    let counter = r.uint::<u32>()?;
    let device = DeviceId(r.bin()?.try_into().ok()?);
    let model = r.uint::<u8>()?;
    let record = r.uuid()?;
    let op = if r.bytes.first() == Some(&0x81) {
        r.byte()?;
        if r.str()? != "Upsert" {
            return None;
        }
        let n = r.array()?;
        if n > FIELDS_PER_CHANGE_MAX {
            return None;
        }
        let mut fields = Vec::with_capacity(n);
        for _ in 0..n {
            if r.array()? != 2 {
                return None;
            }
            let index = r.uint::<u8>()?;
            fields.push((index, r.value()?));
        }
        Op::Upsert(fields)
    } else if r.str()? == "Delete" {
        Op::Delete
    } else {
        return None;
    };
    let version = if elements >= 6 { r.uint::<u8>()? } else { 0 };
    let seen = if elements == 7 { r.uint::<u64>()? } else { 0 };
    if !r.bytes.is_empty() {
        return None;
    }
    Some(Change {
        id,
        hlc: Hlc {
            physical_ms,
            counter,
            device,
        },
        model,
        record,
        op,
        version,
        seen,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::change::CHANGE_FORMAT_VERSION;
    use proptest::prelude::*;
    use serde::Deserialize;

    fn serde_decode(body: &[u8]) -> Option<Change> {
        let mut reader = body;
        let mut de = rmp_serde::Deserializer::new(&mut reader).with_binary();
        let change = Change::deserialize(&mut de).ok()?;
        reader.is_empty().then_some(change)
    }

    /// Any value; texts and byte strings up to `len` long.
    fn value(len: usize) -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::Int),
            proptest::string::string_regex(&format!(".{{0,{len}}}"))
                .unwrap_or_else(|_| unreachable!("a valid pattern"))
                .prop_map(Value::Text),
            proptest::collection::vec(any::<u8>(), 0..len).prop_map(Value::Bytes),
            any::<u128>().prop_map(|u| Value::Uuid(Uuid::from_u128(u))),
        ]
    }

    fn change() -> impl Strategy<Value = Change> {
        change_with(12, 40)
    }

    /// Any change: a delete, or an upsert of fewer than `fields` fields with values up to `len`
    /// long.
    pub(crate) fn change_with(fields: usize, len: usize) -> impl Strategy<Value = Change> {
        (
            any::<u128>(),
            any::<u64>(),
            any::<u32>(),
            any::<[u8; 32]>(),
            (any::<u8>(), prop_oneof![Just(0u8), any::<u8>()]),
            any::<u128>(),
            proptest::option::of(proptest::collection::vec(
                (any::<u8>(), value(len)),
                0..fields,
            )),
        )
            .prop_map(
                |(id, ms, counter, device, (model, version), record, fields)| Change {
                    id: ChangeId(Uuid::from_u128(id)),
                    hlc: Hlc {
                        physical_ms: ms,
                        counter,
                        device: DeviceId(device),
                    },
                    model,
                    record: Uuid::from_u128(record),
                    op: fields.map_or(Op::Delete, Op::Upsert),
                    version,
                    seen: 0,
                },
            )
    }

    proptest! {
        /// Every encoded change decodes directly to itself.
        #[test]
        fn encoded_changes_decode_directly(change in change()) {
            let bytes = change.encode();
            prop_assert_eq!(bytes[0], CHANGE_FORMAT_VERSION);
            prop_assert_eq!(decode_body(&bytes[1..]), Some(change));
        }

        /// Whenever the direct decoder accepts a body (a damaged one too), serde decodes the
        /// same change from it.
        #[test]
        fn the_direct_decoder_agrees_with_serde(
            change in change(),
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..4),
            cut in any::<usize>(),
        ) {
            let mut body = change.encode()[1..].to_vec();
            for (at, byte) in flips {
                let at = at % body.len();
                body[at] = byte;
            }
            body.truncate(body.len() - cut % 3);
            if let Some(direct) = decode_body(&body) {
                prop_assert_eq!(serde_decode(&body), Some(direct));
            }
        }

        /// Arbitrary bytes never panic, and anything accepted agrees with serde.
        #[test]
        fn arbitrary_bytes_never_panic(body in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Some(direct) = decode_body(&body) {
                prop_assert_eq!(serde_decode(&body), Some(direct));
            }
        }
    }
}
