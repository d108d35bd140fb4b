//! Leaders shut out for a while: a leader whose log entries do not open here (tampered, or from
//! a clock far ahead) would otherwise hold this follower still for good, the same segment sent,
//! refused and sent again. While shut out, its replication messages are dropped and the
//! replica counts it as gone, so this device and the others it reaches elect a leader among
//! themselves. Each time again doubles the time, up to [`SHUT_OUT_MAX_MS`].

use std::collections::HashMap;

use keel_schema::DeviceId;

/// The first time a leader is shut out.
pub(crate) const SHUT_OUT_MIN_MS: u64 = 5_000;
/// The longest.
pub(crate) const SHUT_OUT_MAX_MS: u64 = 10 * 60_000;
/// Most devices remembered (only pinned devices that led get here).
const REMEMBERED_MAX: usize = 64;

/// Who is shut out, until when, and for how long the next time.
#[derive(Default)]
pub(crate) struct Quarantine {
    /// Device → (shut out until, length of the last time), in the core's ms.
    devices: HashMap<DeviceId, (u64, u64)>,
}

impl Quarantine {
    /// Shuts `device` out from `now`, twice as long as the last time. Returns for how long.
    pub(crate) fn shut_out(&mut self, device: DeviceId, now: u64) -> u64 {
        if self.devices.len() >= REMEMBERED_MAX && !self.devices.contains_key(&device) {
            // Forget the one whose time ended first.
            if let Some(oldest) = self
                .devices
                .iter()
                .min_by_key(|(_, (u, _))| *u)
                .map(|(d, _)| *d)
            {
                self.devices.remove(&oldest);
            }
        }
        let last = self.devices.get(&device).map_or(0, |(_, length)| *length);
        let length = last
            .saturating_mul(2)
            .clamp(SHUT_OUT_MIN_MS, SHUT_OUT_MAX_MS);
        self.devices
            .insert(device, (now.saturating_add(length), length));
        length
    }

    /// Whether `device` is shut out at `now`.
    pub(crate) fn is_out(&self, device: &DeviceId, now: u64) -> bool {
        self.devices
            .get(device)
            .is_some_and(|(until, _)| now < *until)
    }

    /// The devices whose time ended by `now` and were not let back yet: each is returned once.
    pub(crate) fn ended(&mut self, now: u64) -> Vec<DeviceId> {
        let mut ended = Vec::new();
        for (device, (until, _)) in self.devices.iter_mut() {
            if *until != 0 && now >= *until {
                // Let back in; the length stays, so a repeat is shut out longer.
                *until = 0;
                ended.push(*device);
            }
        }
        ended
    }

    /// When the next time ends, if someone is shut out.
    pub(crate) fn next_end(&self) -> Option<u64> {
        self.devices
            .values()
            .map(|(until, _)| *until)
            .filter(|u| *u != 0)
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeat_is_shut_out_longer_up_to_the_cap_and_each_end_is_told_once() {
        let mut q = Quarantine::default();
        let d = DeviceId([1; 32]);
        assert_eq!(q.shut_out(d, 0), SHUT_OUT_MIN_MS);
        assert!(q.is_out(&d, SHUT_OUT_MIN_MS - 1));
        assert!(!q.is_out(&d, SHUT_OUT_MIN_MS));
        assert_eq!(q.next_end(), Some(SHUT_OUT_MIN_MS));
        assert_eq!(q.ended(SHUT_OUT_MIN_MS), vec![d]);
        assert!(q.ended(SHUT_OUT_MIN_MS + 1).is_empty());
        assert_eq!(q.next_end(), None);
        assert_eq!(q.shut_out(d, 10), 2 * SHUT_OUT_MIN_MS);
        for _ in 0..20 {
            q.shut_out(d, 10);
        }
        assert_eq!(q.shut_out(d, 10), SHUT_OUT_MAX_MS);
        for i in 0..200u8 {
            q.shut_out(DeviceId([i; 32]), 20);
        }
        assert!(q.devices.len() <= REMEMBERED_MAX);
    }
}
