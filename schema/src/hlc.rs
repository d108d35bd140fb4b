//! Hybrid logical clocks: a total order of changes that follows wall time where it can.

use serde::{Deserialize, Serialize};

use crate::ids::DeviceId;

/// A hybrid logical clock reading. Ordered by `(physical_ms, counter, device)`.
#[derive(
    Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default, Serialize, Deserialize,
)]
#[cfg_attr(feature = "typescript", derive(ts_rs::TS))]
pub struct Hlc {
    /// Milliseconds since the Unix epoch (the larger of wall time and the last reading).
    pub physical_ms: u64,
    /// Breaks ties within one millisecond.
    pub counter: u32,
    /// The device that made the reading; breaks ties between devices.
    pub device: DeviceId,
}

impl Hlc {
    /// Encoded length of [`Hlc::to_bytes`].
    pub const ENCODED_LEN: usize = 44;

    /// A fixed-size big-endian encoding whose byte order is the clock order.
    pub fn to_bytes(&self) -> [u8; Self::ENCODED_LEN] {
        let mut out = [0u8; Self::ENCODED_LEN];
        out[..8].copy_from_slice(&self.physical_ms.to_be_bytes());
        out[8..12].copy_from_slice(&self.counter.to_be_bytes());
        out[12..].copy_from_slice(&self.device.0);
        out
    }

    /// Decodes [`Hlc::to_bytes`]; `None` if the slice has the wrong length.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != Self::ENCODED_LEN {
            return None;
        }
        let physical_ms = u64::from_be_bytes(bytes[..8].try_into().ok()?);
        let counter = u32::from_be_bytes(bytes[8..12].try_into().ok()?);
        let device = DeviceId(bytes[12..].try_into().ok()?);
        Some(Self {
            physical_ms,
            counter,
            device,
        })
    }
}

/// Hands out strictly increasing [`Hlc`] readings for one device.
///
/// Time comes in as a parameter so tests control it. Monotonic across restarts when the caller seeds
/// it with the durable high-water mark ([`HlcClock::observe`]).
#[derive(Debug, Clone)]
pub struct HlcClock {
    last: Hlc,
}

impl HlcClock {
    /// A clock for `device` that has seen nothing yet.
    pub fn new(device: DeviceId) -> Self {
        Self {
            last: Hlc {
                physical_ms: 0,
                counter: 0,
                device,
            },
        }
    }

    /// The next reading, strictly greater than every reading handed out or observed.
    pub fn tick(&mut self, now_ms: u64) -> Hlc {
        if now_ms > self.last.physical_ms {
            self.last.physical_ms = now_ms;
            self.last.counter = 0;
        } else if self.last.counter == u32::MAX {
            self.last.physical_ms += 1;
            self.last.counter = 0;
        } else {
            self.last.counter += 1;
        }
        self.last
    }

    /// Takes in a reading seen elsewhere (a remote change, or the durable high-water mark).
    pub fn observe(&mut self, seen: Hlc) {
        if (seen.physical_ms, seen.counter) > (self.last.physical_ms, self.last.counter) {
            self.last.physical_ms = seen.physical_ms;
            self.last.counter = seen.counter;
        }
    }

    /// The last reading handed out or observed (the high-water mark to persist).
    pub fn last(&self) -> Hlc {
        self.last
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A clock reading at 1 ms of device `[1; 32]` (shared by the crate's unit tests).
    pub(crate) fn hlc() -> Hlc {
        Hlc {
            physical_ms: 1,
            counter: 0,
            device: DeviceId([1; 32]),
        }
    }

    #[test]
    fn ticks_increase_even_when_time_goes_back() {
        let mut clock = HlcClock::new(DeviceId([1; 32]));
        let a = clock.tick(1000);
        let b = clock.tick(900);
        let c = clock.tick(1000);
        assert!(a < b && b < c);
        let bytes = c.to_bytes();
        assert_eq!(Hlc::from_bytes(&bytes), Some(c));
    }

    #[test]
    fn observe_moves_the_clock_forward() {
        let mut clock = HlcClock::new(DeviceId([1; 32]));
        clock.observe(Hlc {
            physical_ms: 5000,
            counter: 7,
            device: DeviceId([2; 32]),
        });
        let next = clock.tick(10);
        assert_eq!((next.physical_ms, next.counter), (5000, 8));
    }

    #[test]
    fn byte_order_is_clock_order() {
        let d = DeviceId([3; 32]);
        let a = Hlc {
            physical_ms: 1,
            counter: 300,
            device: d,
        };
        let b = Hlc {
            physical_ms: 2,
            counter: 0,
            device: d,
        };
        assert!(a.to_bytes() < b.to_bytes());
    }
}
