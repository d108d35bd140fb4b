//! TypeScript declarations of the types whose JSON form is written by hand (feature
//! `typescript`): a device id is a hex string; a value is a `[tag, payload]` pair.

use ts_rs::TS;

use crate::ids::DeviceId;
use crate::value::Value;

impl TS for DeviceId {
    type WithoutGenerics = Self;
    type OptionInnerType = Self;

    fn name() -> String {
        "string".into()
    }

    fn inline() -> String {
        Self::name()
    }

    fn inline_flattened() -> String {
        Self::name()
    }

    fn decl() -> String {
        Self::name()
    }

    fn decl_concrete() -> String {
        Self::name()
    }
}

/// `[tag, payload]`, tags as in `value.rs` (bytes and uuids are arrays of byte values).
const VALUE: &str = "[0, null] | [1, boolean] | [2, number] | [3, string] | [4, Array<number>] \
                     | [5, Array<number>]";

impl TS for Value {
    type WithoutGenerics = Self;
    type OptionInnerType = Self;

    fn name() -> String {
        "Value".into()
    }

    fn inline() -> String {
        VALUE.into()
    }

    fn inline_flattened() -> String {
        VALUE.into()
    }

    fn decl() -> String {
        format!("type Value = {VALUE};")
    }

    fn decl_concrete() -> String {
        Self::decl()
    }
}
