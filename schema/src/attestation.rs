//! Which changes a device signs, and what it signs (decision 0043).
//!
//! Every change whose origin the owner rule depends on ([`Owner::guards`]) must be vouched
//! for by an [`Attestation`](crate::Attestation) of its origin: a record, committed before its
//! members, that lists their digests and is signed with the origin's device key (the one its
//! TLS certificate certifies). Sealing under the library key proves only that some paired
//! device made a change; the attestation proves which one. The signing and the checking live
//! with their keys (`keel-engine` signs, `keel-projections` checks); this module is the part
//! both must agree on.

use crate::{Change, DeviceId, Op, Owner, Value};

/// Bytes of a member digest (BLAKE3, truncated: a forger would need a second preimage).
pub const DIGEST_LEN: usize = 16;
/// Most changes one attestation vouches for (a commit of more is signed in parts).
pub const MEMBERS_MAX: usize = 1024;

/// Whether `change` must be vouched for by an attestation of its origin.
pub fn needs_attestation(change: &Change) -> bool {
    Owner::of_model(change.model).guards(change)
}

/// The digest of `change` an attestation lists: BLAKE3 of every part of the change (id, clock,
/// model, record, operation and each field's index, type and value), each length-prefixed, in
/// a flat form cheaper to write than the canonical encoding.
pub fn member_digest(change: &Change) -> [u8; DIGEST_LEN] {
    thread_local! {
        static FLAT: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    FLAT.with(|flat| {
        let mut flat = flat.borrow_mut();
        flat.clear();
        write_flat(&mut flat, change);
        let hash = blake3::hash(&flat);
        let mut digest = [0u8; DIGEST_LEN];
        digest.copy_from_slice(&hash.as_bytes()[..DIGEST_LEN]);
        digest
    })
}

fn write_flat(out: &mut Vec<u8>, change: &Change) {
    out.extend_from_slice(change.id.0.as_bytes());
    out.extend_from_slice(&change.hlc.physical_ms.to_le_bytes());
    out.extend_from_slice(&change.hlc.counter.to_le_bytes());
    out.extend_from_slice(&change.hlc.device.0);
    out.push(change.model);
    out.extend_from_slice(change.record.as_bytes());
    match &change.op {
        Op::Delete => out.push(0),
        Op::Upsert(fields) => {
            out.push(1);
            out.extend_from_slice(&(fields.len() as u64).to_le_bytes());
            for (index, value) in fields {
                out.push(*index);
                write_value(out, value);
            }
        }
    }
}

fn write_value(out: &mut Vec<u8>, value: &Value) {
    let bytes = |out: &mut Vec<u8>, tag: u8, b: &[u8]| {
        out.push(tag);
        out.extend_from_slice(&(b.len() as u64).to_le_bytes());
        out.extend_from_slice(b);
    };
    match value {
        Value::Null => out.push(0),
        Value::Bool(b) => out.extend_from_slice(&[1, u8::from(*b)]),
        Value::Int(i) => {
            out.push(2);
            out.extend_from_slice(&i.to_le_bytes());
        }
        Value::Text(t) => bytes(out, 3, t.as_bytes()),
        Value::Bytes(b) => bytes(out, 4, b),
        Value::Uuid(u) => {
            out.push(5);
            out.extend_from_slice(u.as_bytes());
        }
    }
}

/// What the origin signs: a domain tag, the origin, the attestation's record uuid and the
/// member digests.
pub fn signed_message(origin: DeviceId, record: uuid::Uuid, members: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(64 + members.len());
    message.extend_from_slice(b"keel attestation v1\0");
    message.extend_from_slice(&origin.0);
    message.extend_from_slice(record.as_bytes());
    message.extend_from_slice(members);
    message
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ChangeId, Entry, EntryKind, Hlc, Tag};

    fn entry_change() -> Change {
        let entry = Entry {
            uuid: Some(uuid::Uuid::from_u128(1)),
            location: uuid::Uuid::from_u128(2),
            relative_path: "a".into(),
            name: "b.txt".into(),
            kind: EntryKind::File.code(),
            size: 3,
            created_ms: 4,
            modified_ms: 5,
            content: None,
            metadata: None,
            inode: None,
            volume: None,
        };
        let hlc = Hlc {
            physical_ms: 6,
            counter: 7,
            device: DeviceId([8; 32]),
        };
        Change::upsert(ChangeId(uuid::Uuid::from_u128(9)), hlc, &entry).expect("ready")
    }

    #[test]
    fn a_digest_changes_with_every_part_of_the_change() {
        let change = entry_change();
        let digest = member_digest(&change);
        assert_eq!(digest, member_digest(&change.clone()));
        let mut other = change.clone();
        other.hlc.device = DeviceId([9; 32]);
        assert_ne!(member_digest(&other), digest, "origin");
        let mut other = change.clone();
        other.id = ChangeId(uuid::Uuid::from_u128(10));
        assert_ne!(member_digest(&other), digest, "id");
        let mut other = change.clone();
        if let Op::Upsert(fields) = &mut other.op {
            fields[1].1 = Value::Text("c.txt".into());
        }
        assert_ne!(member_digest(&other), digest, "a field");
        let mut other = change.clone();
        other.op = Op::Delete;
        assert_ne!(member_digest(&other), digest, "the operation");
        // Length prefixes: moving a byte from one text to the next changes the digest.
        let mut a = change.clone();
        let mut b = change;
        if let (Op::Upsert(fa), Op::Upsert(fb)) = (&mut a.op, &mut b.op) {
            fa[0].1 = Value::Text("ab".into());
            fa[1].1 = Value::Text("c".into());
            fb[0].1 = Value::Text("a".into());
            fb[1].1 = Value::Text("bc".into());
        }
        assert_ne!(member_digest(&a), member_digest(&b));
    }

    #[test]
    fn file_facts_need_an_attestation_and_user_data_does_not() {
        assert!(needs_attestation(&entry_change()));
        let tag = Tag {
            uuid: uuid::Uuid::from_u128(1),
            name: "red".into(),
            color: None,
            created_ms: 1,
        };
        let hlc = Hlc {
            physical_ms: 1,
            counter: 0,
            device: DeviceId([1; 32]),
        };
        let change = Change::upsert(ChangeId(uuid::Uuid::from_u128(2)), hlc, &tag).expect("ready");
        assert!(!needs_attestation(&change));
    }
}
