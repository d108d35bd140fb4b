//! Identifiers: devices, libraries, changes, log positions and epochs.

use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A device's identity: 32 bytes (the SHA-256 of its certificate once transport lands; random until then).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct DeviceId(pub [u8; 32]);

/// 32 bytes on the wire; hex in human-readable formats (JSON for a web view).
impl Serialize for DeviceId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&self.to_hex())
        } else {
            s.serialize_bytes(&self.0)
        }
    }
}

impl<'de> Deserialize<'de> for DeviceId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = DeviceId;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("32 bytes, or 64 hex digits")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<DeviceId, E> {
                DeviceId::from_hex(v)
                    .ok_or_else(|| E::invalid_value(serde::de::Unexpected::Str(v), &self))
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<DeviceId, E> {
                let array: [u8; 32] = v
                    .try_into()
                    .map_err(|_| E::invalid_length(v.len(), &self))?;
                Ok(DeviceId(array))
            }
        }
        if d.is_human_readable() {
            d.deserialize_str(V)
        } else {
            d.deserialize_bytes(V)
        }
    }
}

impl DeviceId {
    /// The id of the device whose TLS certificate (DER) is `cert_der`: its SHA-256. A peer's id
    /// is computed from the certificate it presents, so it cannot be claimed without the key.
    pub fn of_certificate(cert_der: &[u8]) -> Self {
        use sha2::Digest;
        DeviceId(sha2::Sha256::digest(cert_der).into())
    }

    /// A short readable form: the first 8 bytes in hex.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..8])
    }

    /// The full 64-hex-digit form.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses the 64-hex-digit form.
    pub fn from_hex(text: &str) -> Option<Self> {
        let bytes = hex::decode(text).ok()?;
        let array: [u8; 32] = bytes.try_into().ok()?;
        Some(Self(array))
    }

    /// The uuid of this device's `Device` record (UUIDv5 of the id).
    pub fn record_uuid(&self) -> Uuid {
        Uuid::new_v5(&DEVICE_NAMESPACE, &self.0)
    }
}

impl fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceId({})", self.short())
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.short())
    }
}

/// Namespace for device record uuids.
const DEVICE_NAMESPACE: Uuid = Uuid::from_u128(0x6b65_656c_2d64_6576_6963_6500_0000_0001);

/// A library's identity.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "typescript", derive(ts_rs::TS))]
pub struct LibraryId(pub Uuid);

impl fmt::Display for LibraryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A change's identity: a UUIDv7, unique across devices.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "typescript", derive(ts_rs::TS))]
pub struct ChangeId(pub Uuid);

thread_local! {
    /// The last millisecond and counter this thread made a change id with.
    static LAST_CHANGE_ID: std::cell::Cell<(u64, u64)> = const { std::cell::Cell::new((0, 0)) };
}

/// Bits of a UUIDv7's random part used as a counter within a millisecond (the rest stays random).
const COUNTER_BITS: u32 = 42;

impl ChangeId {
    /// A fresh, time-ordered id (see [`ChangeId::at`]).
    pub fn new() -> Self {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        Self::at(now_ms)
    }

    /// A fresh UUIDv7 stamped with `now_ms` (or the last millisecond this thread used, if that is
    /// later). Ids made on one thread increase; within a millisecond a 42-bit counter, starting
    /// at a random value, orders them, and 32 more random bits keep ids of different threads and
    /// devices apart. Cheaper than `Uuid::now_v7`, which reads the clock and takes a shared
    /// context for every id.
    pub fn at(now_ms: u64) -> Self {
        use rand::Rng;
        let mut rng = rand::rng();
        let (ms, counter) = LAST_CHANGE_ID.with(|last| {
            let (last_ms, last_counter) = last.get();
            let next = if now_ms > last_ms {
                // A new millisecond: the counter starts in its lower half, so it has room.
                (now_ms, rng.next_u64() >> (64 - COUNTER_BITS + 1))
            } else if last_counter + 1 < (1 << COUNTER_BITS) {
                (last_ms, last_counter + 1)
            } else {
                // The counter ran out within a millisecond: borrow the next one.
                (last_ms + 1, rng.next_u64() >> (64 - COUNTER_BITS + 1))
            };
            last.set(next);
            next
        });
        // rand_a (12 bits) and the top 30 bits of rand_b hold the counter, then 32 random bits;
        // the builder sets the version and variant bits around them.
        let mut random = [0u8; 10];
        let high = counter >> 30;
        random[0] = (high >> 8) as u8 & 0x0f;
        random[1] = high as u8;
        let low = (counter & ((1 << 30) - 1)) as u32;
        random[2..6].copy_from_slice(&low.to_be_bytes());
        random[6..].copy_from_slice(&rng.next_u32().to_be_bytes());
        Self(uuid::Builder::from_unix_timestamp_millis(ms, &random).into_uuid())
    }
}

impl Default for ChangeId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for ChangeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A position in the leader log; the first entry is 1, 0 means "nothing".
#[derive(
    Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default, Serialize, Deserialize,
)]
#[cfg_attr(feature = "typescript", derive(ts_rs::TS))]
pub struct Lsn(pub u64);

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A leadership term: `(counter, leader device)`, totally ordered so two leaders never share one.
#[derive(
    Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default, Serialize, Deserialize,
)]
#[cfg_attr(feature = "typescript", derive(ts_rs::TS))]
pub struct Epoch {
    /// Increases by one at each election.
    pub counter: u64,
    /// The device that leads in this epoch.
    pub device: DeviceId,
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.counter, self.device.short())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn change_ids_are_v7_stamped_with_their_millisecond_and_increase_on_a_thread() {
        let ms = 1_700_000_000_123;
        let ids: Vec<ChangeId> = (0..10_000).map(|_| ChangeId::at(ms)).collect();
        for id in &ids {
            assert_eq!(id.0.get_version_num(), 7);
            assert_eq!(id.0.get_variant(), uuid::Variant::RFC4122);
            let (secs, nanos) = id.0.get_timestamp().expect("v7 timestamp").to_unix();
            assert_eq!(secs * 1000 + u64::from(nanos) / 1_000_000, ms);
        }
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "increasing");
        // An earlier millisecond after a later one still gives a larger id.
        let later = ChangeId::at(ms + 5);
        assert!(ChangeId::at(ms) > later);
        assert!(
            ChangeId::new() > later,
            "the clock is far past the test's millisecond"
        );
    }

    #[test]
    fn change_ids_made_on_many_threads_in_one_millisecond_are_distinct() {
        let ms = 1_700_000_000_000;
        let per_thread: Vec<Vec<ChangeId>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| s.spawn(move || (0..25_000).map(|_| ChangeId::at(ms)).collect()))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("thread"))
                .collect()
        });
        let all: std::collections::HashSet<ChangeId> = per_thread.into_iter().flatten().collect();
        assert_eq!(all.len(), 100_000);
    }
}
