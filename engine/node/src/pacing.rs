//! How hard to pack what a sender streams: the zstd level of each next piece, raised while the
//! link holds the sending back and lowered while the packing does (decision 0071).
//!
//! A sender packs one piece on a blocking thread while it sends the one before. When packing
//! ends first, the sender waits on the link: time to spare for a higher level, and fewer bytes
//! on a link that slow. When sending ends first, it waits on the packing: a lower level. On
//! loopback or a fast LAN the level stays at the fastest; on a 100 Mbit/s link it climbs.

use std::time::Duration;

/// The levels tried, fastest first: -1 packs the P4 file to about a third at the speed of
/// memory; 9 to about four fifths of that, about ten times slower (decision 0059).
pub(crate) const LEVELS: [i32; 5] = [-1, 1, 3, 6, 9];

/// The level of the next piece, from what held the last one back.
#[derive(Debug, Default)]
pub(crate) struct Pacing {
    /// An index into [`LEVELS`].
    step: usize,
}

impl Pacing {
    /// The zstd level to pack the next piece at.
    pub(crate) fn level(&self) -> i32 {
        LEVELS[self.step]
    }

    /// Hears how long the sender waited for a piece's packing (`packing`) and then for the
    /// link to take it (`sending`). A send at least twice the packing wait means the link is
    /// the bottleneck: one level up. A packing wait longer than the send: one level down.
    pub(crate) fn heard(&mut self, packing: Duration, sending: Duration) {
        if sending >= packing.saturating_mul(2) && sending >= MEANINGFUL {
            self.step = (self.step + 1).min(LEVELS.len() - 1);
        } else if packing > sending {
            self.step = self.step.saturating_sub(1);
        }
        debug_assert!(self.step < LEVELS.len());
    }
}

/// A send shorter than this says nothing about the link (a socket buffer took it).
const MEANINGFUL: Duration = Duration::from_millis(2);

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_slow_link_raises_the_level_to_the_highest_and_no_further() {
        let mut pacing = Pacing::default();
        assert_eq!(pacing.level(), -1);
        for expected in [1, 3, 6, 9, 9] {
            pacing.heard(Duration::ZERO, 100 * MS);
            assert_eq!(pacing.level(), expected);
        }
    }

    #[test]
    fn slow_packing_lowers_it_to_the_fastest_and_no_further() {
        let mut pacing = Pacing { step: 3 };
        for expected in [3, 1, -1, -1] {
            pacing.heard(50 * MS, 10 * MS);
            assert_eq!(pacing.level(), expected);
        }
    }

    #[test]
    fn a_balance_or_a_buffered_send_keeps_the_level() {
        let mut pacing = Pacing { step: 2 };
        pacing.heard(30 * MS, 40 * MS);
        pacing.heard(Duration::ZERO, MS);
        assert_eq!(pacing.level(), 3);
    }
}
