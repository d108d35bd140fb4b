//! Field values as they travel in changes, and their conversion to and from Rust field types.

use std::fmt;

use serde::de::{self, SeqAccess, Visitor};
use serde::ser::SerializeTuple;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

/// One field's value. Encoded as a compact `(tag, payload)` pair.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Value {
    /// No value.
    Null,
    /// A boolean.
    Bool(bool),
    /// A signed integer.
    Int(i64),
    /// UTF-8 text.
    Text(String),
    /// Raw bytes.
    Bytes(Vec<u8>),
    /// A uuid (a reference or an identity).
    Uuid(Uuid),
}

/// The storage type of a field, used for SQL columns and type checks.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum FieldType {
    /// [`Value::Bool`].
    Bool,
    /// [`Value::Int`].
    Int,
    /// [`Value::Text`].
    Text,
    /// [`Value::Bytes`].
    Bytes,
    /// [`Value::Uuid`].
    Uuid,
}

impl FieldType {
    /// Whether `value` fits this type (`Null` fits any).
    pub fn accepts(self, value: &Value) -> bool {
        matches!(
            (self, value),
            (_, Value::Null)
                | (FieldType::Bool, Value::Bool(_))
                | (FieldType::Int, Value::Int(_))
                | (FieldType::Text, Value::Text(_))
                | (FieldType::Bytes, Value::Bytes(_))
                | (FieldType::Uuid, Value::Uuid(_))
        )
    }

    /// A short name for errors and SQL.
    pub fn name(self) -> &'static str {
        match self {
            FieldType::Bool => "bool",
            FieldType::Int => "int",
            FieldType::Text => "text",
            FieldType::Bytes => "bytes",
            FieldType::Uuid => "uuid",
        }
    }
}

/// A Rust type that can be a synced field.
pub trait FieldValue: Sized {
    /// The storage type.
    const TYPE: FieldType;
    /// Whether the field accepts `Null` (an `Option`).
    const NULLABLE: bool = false;
    /// Converts to a [`Value`].
    fn to_value(&self) -> Value;
    /// Converts to a [`Value`], moving what it owns.
    fn into_value(self) -> Value {
        self.to_value()
    }
    /// Converts from a [`Value`]; `None` if the type does not match.
    fn from_value(value: &Value) -> Option<Self>;
}

impl FieldValue for bool {
    const TYPE: FieldType = FieldType::Bool;
    fn to_value(&self) -> Value {
        Value::Bool(*self)
    }
    fn from_value(value: &Value) -> Option<Self> {
        match value {
            Value::Bool(b) => Some(*b),
            Value::Null => Some(false),
            _ => None,
        }
    }
}

impl FieldValue for i64 {
    const TYPE: FieldType = FieldType::Int;
    fn to_value(&self) -> Value {
        Value::Int(*self)
    }
    fn from_value(value: &Value) -> Option<Self> {
        match value {
            Value::Int(i) => Some(*i),
            Value::Null => Some(0),
            _ => None,
        }
    }
}

impl FieldValue for String {
    const TYPE: FieldType = FieldType::Text;
    fn to_value(&self) -> Value {
        Value::Text(self.clone())
    }
    fn into_value(self) -> Value {
        Value::Text(self)
    }
    fn from_value(value: &Value) -> Option<Self> {
        match value {
            Value::Text(t) => Some(t.clone()),
            Value::Null => Some(String::new()),
            _ => None,
        }
    }
}

impl FieldValue for Vec<u8> {
    const TYPE: FieldType = FieldType::Bytes;
    fn to_value(&self) -> Value {
        Value::Bytes(self.clone())
    }
    fn into_value(self) -> Value {
        Value::Bytes(self)
    }
    fn from_value(value: &Value) -> Option<Self> {
        match value {
            Value::Bytes(b) => Some(b.clone()),
            Value::Null => Some(Vec::new()),
            _ => None,
        }
    }
}

impl FieldValue for Uuid {
    const TYPE: FieldType = FieldType::Uuid;
    fn to_value(&self) -> Value {
        Value::Uuid(*self)
    }
    fn from_value(value: &Value) -> Option<Self> {
        match value {
            Value::Uuid(u) => Some(*u),
            Value::Null => Some(Uuid::nil()),
            _ => None,
        }
    }
}

impl<T: FieldValue> FieldValue for Option<T> {
    const TYPE: FieldType = T::TYPE;
    const NULLABLE: bool = true;
    fn to_value(&self) -> Value {
        match self {
            Some(v) => v.to_value(),
            None => Value::Null,
        }
    }
    fn into_value(self) -> Value {
        match self {
            Some(v) => v.into_value(),
            None => Value::Null,
        }
    }
    fn from_value(value: &Value) -> Option<Self> {
        match value {
            Value::Null => Some(None),
            other => T::from_value(other).map(Some),
        }
    }
}

// The tag written before each value's payload (also read by `change_decode`).
pub(crate) const TAG_NULL: u8 = 0;
pub(crate) const TAG_BOOL: u8 = 1;
pub(crate) const TAG_INT: u8 = 2;
pub(crate) const TAG_TEXT: u8 = 3;
pub(crate) const TAG_BYTES: u8 = 4;
pub(crate) const TAG_UUID: u8 = 5;

/// Wraps a byte slice so serde writes it as a MessagePack bin, not an array.
struct BinRef<'a>(&'a [u8]);

impl Serialize for BinRef<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.0)
    }
}

impl Serialize for Value {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut t = s.serialize_tuple(2)?;
        match self {
            Value::Null => {
                t.serialize_element(&TAG_NULL)?;
                t.serialize_element(&())?;
            }
            Value::Bool(b) => {
                t.serialize_element(&TAG_BOOL)?;
                t.serialize_element(b)?;
            }
            Value::Int(i) => {
                t.serialize_element(&TAG_INT)?;
                t.serialize_element(i)?;
            }
            Value::Text(text) => {
                t.serialize_element(&TAG_TEXT)?;
                t.serialize_element(text)?;
            }
            Value::Bytes(b) => {
                t.serialize_element(&TAG_BYTES)?;
                t.serialize_element(&BinRef(b))?;
            }
            Value::Uuid(u) => {
                t.serialize_element(&TAG_UUID)?;
                t.serialize_element(&BinRef(u.as_bytes()))?;
            }
        }
        t.end()
    }
}

/// Reads a MessagePack bin (or an array of bytes) into a `Vec<u8>`.
struct BinBuf(Vec<u8>);

impl<'de> Deserialize<'de> for BinBuf {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = BinBuf;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<BinBuf, E> {
                Ok(BinBuf(v.to_vec()))
            }
            fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<BinBuf, E> {
                Ok(BinBuf(v))
            }
        }
        d.deserialize_bytes(V)
    }
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Value;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a (tag, payload) pair")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
                let tag: u8 = seq
                    .next_element()?
                    .ok_or_else(|| de::Error::invalid_length(0, &self))?;
                let missing = || de::Error::invalid_length(1, &"a payload");
                let value = match tag {
                    TAG_NULL => {
                        seq.next_element::<()>()?.ok_or_else(missing)?;
                        Value::Null
                    }
                    TAG_BOOL => Value::Bool(seq.next_element()?.ok_or_else(missing)?),
                    TAG_INT => Value::Int(seq.next_element()?.ok_or_else(missing)?),
                    TAG_TEXT => Value::Text(seq.next_element()?.ok_or_else(missing)?),
                    TAG_BYTES => Value::Bytes(seq.next_element::<BinBuf>()?.ok_or_else(missing)?.0),
                    TAG_UUID => {
                        let bytes = seq.next_element::<BinBuf>()?.ok_or_else(missing)?.0;
                        let uuid = Uuid::from_slice(&bytes)
                            .map_err(|_| de::Error::invalid_length(bytes.len(), &"16 bytes"))?;
                        Value::Uuid(uuid)
                    }
                    other => {
                        return Err(de::Error::invalid_value(
                            de::Unexpected::Unsigned(other.into()),
                            &"a value tag 0..=5",
                        ))
                    }
                };
                Ok(value)
            }
        }
        d.deserialize_tuple(2, V)
    }
}
