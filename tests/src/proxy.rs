//! A hostile link on loopback: a UDP proxy between one client node and a server node that
//! drops, duplicates, reorders, delays and corrupts QUIC datagrams, and cuts the link on
//! demand. Both nodes are real processes' endpoints (or this one's); only the wire is made bad.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How bad the link is, each in datagrams per thousand, each way.
#[derive(Debug, Clone, Copy)]
pub struct LinkFaults {
    /// Dropped.
    pub drop: u32,
    /// Sent twice.
    pub duplicate: u32,
    /// Held back and sent after the next one (or 5–30 ms later).
    pub reorder: u32,
    /// One byte flipped.
    pub corrupt: u32,
}

/// What the proxy did so far, both ways together.
#[derive(Debug, Default)]
pub struct LinkStats {
    /// Bytes received from either side (UDP payloads), whatever became of them.
    pub received_bytes: AtomicU64,
    /// Datagrams passed on.
    pub forwarded: AtomicU64,
    /// Dropped by the faults.
    pub dropped: AtomicU64,
    /// Dropped because the link was cut.
    pub cut: AtomicU64,
    /// Sent twice.
    pub duplicated: AtomicU64,
    /// Sent out of order or late.
    pub reordered: AtomicU64,
    /// Sent with a byte flipped.
    pub corrupted: AtomicU64,
}

/// Longest datagram a held link passes at any time (see [`Proxy::hold_after`]):
/// acknowledgements and keep-alives, not a full packet of data.
pub const HELD_PASS_MAX: usize = 160;
/// A held link passes one longer datagram each way this often: enough for each side to hear
/// the other before QUIC's idle timeout, a few kilobytes a second of data.
pub const HELD_TRICKLE_EVERY: Duration = Duration::from_millis(250);

/// A running proxy; stops when dropped.
pub struct Proxy {
    /// Where the client sends to.
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
    /// Received bytes (both ways) past which the link holds (see [`Proxy::hold_after`]).
    hold_at: Arc<AtomicU64>,
    held: Arc<AtomicBool>,
    stats: Arc<LinkStats>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

/// One direction's state: its randomness and the datagram it holds back.
struct Direction {
    rng: u64,
    held: Option<(Instant, Vec<u8>)>,
}

impl Direction {
    fn roll(&mut self) -> u32 {
        // xorshift64: the seed decides every fault.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng % 1000) as u32
    }

    /// Passes `datagram` (if any) through the faults, calling `send` for what leaves now.
    fn pass(
        &mut self,
        datagram: Option<Vec<u8>>,
        faults: LinkFaults,
        stats: &LinkStats,
        send: &dyn Fn(&[u8]),
    ) {
        if let Some(mut data) = datagram {
            if self.roll() < faults.drop {
                stats.dropped.fetch_add(1, Ordering::Relaxed);
            } else {
                if self.roll() < faults.corrupt && !data.is_empty() {
                    let at = self.roll() as usize % data.len();
                    data[at] ^= 0x5A;
                    stats.corrupted.fetch_add(1, Ordering::Relaxed);
                }
                if self.held.is_none() && self.roll() < faults.reorder {
                    let delay = Duration::from_millis(5 + u64::from(self.roll() % 25));
                    self.held = Some((Instant::now() + delay, data));
                    stats.reordered.fetch_add(1, Ordering::Relaxed);
                } else {
                    send(&data);
                    stats.forwarded.fetch_add(1, Ordering::Relaxed);
                    if self.roll() < faults.duplicate {
                        send(&data);
                        stats.duplicated.fetch_add(1, Ordering::Relaxed);
                    }
                    // What was held goes after this one.
                    if let Some((_, held)) = self.held.take() {
                        send(&held);
                        stats.forwarded.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        if self
            .held
            .as_ref()
            .is_some_and(|(due, _)| Instant::now() >= *due)
        {
            if let Some((_, held)) = self.held.take() {
                send(&held);
                stats.forwarded.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

impl Proxy {
    /// A proxy to `server` on 127.0.0.1 with `faults` both ways, decided by `seed`. Datagrams
    /// from the server go to the client that sent last.
    pub fn start(server: SocketAddr, faults: LinkFaults, seed: u64) -> std::io::Result<Self> {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0")?);
        let back = Arc::new(UdpSocket::bind("127.0.0.1:0")?);
        back.connect(server)?;
        for socket in [&front, &back] {
            socket.set_read_timeout(Some(Duration::from_millis(5)))?;
        }
        let addr = front.local_addr()?;
        let client: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
        let (cut, stats, stop) = (Arc::default(), Arc::<LinkStats>::default(), Arc::default());
        let hold_at = Arc::new(AtomicU64::new(u64::MAX));
        let held = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for upward in [true, false] {
            let (front, back, client) = (front.clone(), back.clone(), client.clone());
            let (hold_at, held) = (hold_at.clone(), held.clone());
            let (cut, stats, stop): (Arc<AtomicBool>, Arc<LinkStats>, Arc<AtomicBool>) =
                (Arc::clone(&cut), stats.clone(), Arc::clone(&stop));
            let mut direction = Direction {
                rng: seed.wrapping_mul(2).wrapping_add(u64::from(upward)) | 1,
                held: None,
            };
            threads.push(std::thread::spawn(move || {
                let mut buf = vec![0u8; 65_536];
                let mut trickled = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    let received = if upward {
                        front.recv_from(&mut buf).map(|(n, from)| {
                            if let Ok(mut c) = client.lock() {
                                *c = Some(from);
                            }
                            n
                        })
                    } else {
                        back.recv(&mut buf)
                    };
                    let datagram = received.ok().map(|n| buf[..n].to_vec());
                    if let Some(d) = &datagram {
                        let len = d.len() as u64;
                        let total = stats.received_bytes.fetch_add(len, Ordering::Relaxed) + len;
                        if total >= hold_at.load(Ordering::Relaxed) {
                            held.store(true, Ordering::Relaxed);
                        }
                    }
                    let holding = held.load(Ordering::Relaxed)
                        && datagram.as_ref().is_some_and(|d| d.len() > HELD_PASS_MAX)
                        && trickled.elapsed() < HELD_TRICKLE_EVERY;
                    if held.load(Ordering::Relaxed) && !holding && datagram.is_some() {
                        trickled = Instant::now();
                    }
                    if datagram.is_some() && (cut.load(Ordering::Relaxed) || holding) {
                        stats.cut.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    let to = client.lock().ok().and_then(|c| *c);
                    let send = |d: &[u8]| {
                        let _ = if upward {
                            back.send(d)
                        } else if let Some(to) = to {
                            front.send_to(d, to)
                        } else {
                            Ok(0)
                        };
                    };
                    direction.pass(datagram, faults, &stats, &send);
                }
            }));
        }
        Ok(Self {
            addr,
            cut,
            hold_at,
            held,
            stats,
            stop,
            threads,
        })
    }

    /// Cuts the link (every datagram dropped, both ways) or restores it (and ends a hold).
    pub fn cut(&self, cut: bool) {
        if !cut {
            self.hold_at.store(u64::MAX, Ordering::Relaxed);
            self.held.store(false, Ordering::Relaxed);
        }
        self.cut.store(cut, Ordering::Relaxed);
    }

    /// Holds the link once it has received `bytes` more (both ways together): from then on
    /// datagrams of at most [`HELD_PASS_MAX`] bytes pass (acknowledgements and keep-alives)
    /// and one longer one each way every [`HELD_TRICKLE_EVERY`], so a QUIC connection stays
    /// up while its data all but stops where it was, however fast it ran.
    /// [`Proxy::cut`]`(false)` ends the hold.
    pub fn hold_after(&self, bytes: u64) {
        let now = self.stats.received_bytes.load(Ordering::Relaxed);
        self.hold_at
            .store(now.saturating_add(bytes), Ordering::Relaxed);
    }

    /// Whether a [`Proxy::hold_after`] has begun.
    pub fn holding(&self) -> bool {
        self.held.load(Ordering::Relaxed)
    }

    /// What it did so far.
    pub fn stats(&self) -> &LinkStats {
        &self.stats
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}
