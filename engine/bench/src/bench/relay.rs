//! A shaped link on loopback: a UDP relay between one client and a server that limits each
//! direction to a rate, with a drop-tail queue, and delays every datagram one way. P4 runs a
//! join through it to measure a home network (100 Mbit/s, 2 ms round trip) on this machine.

use std::collections::VecDeque;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How the relay shapes each direction.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Shape {
    /// Bytes per second.
    pub(crate) rate: u64,
    /// Added to each datagram, one way (the round trip gains twice this).
    pub(crate) delay: Duration,
    /// Most time's worth of bytes waiting for the link; past it a datagram is dropped, as a
    /// router's full buffer does.
    pub(crate) queue: Duration,
}

/// Datagrams waiting to leave, each with when it may.
type Queue = Arc<(Mutex<VecDeque<(Instant, Vec<u8>)>>, Condvar)>;

/// A running relay; stops when dropped.
pub(crate) struct Relay {
    /// Where clients send to.
    pub(crate) addr: SocketAddr,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Relay {
    /// A relay to `server` on 127.0.0.1 shaped by `shape` both ways. Datagrams from the server
    /// go to the client that sent last (one flow at a time, as a join is).
    pub(crate) fn start(server: SocketAddr, shape: Shape) -> std::io::Result<Self> {
        let front = UdpSocket::bind("127.0.0.1:0")?;
        let back = UdpSocket::bind("127.0.0.1:0")?;
        back.connect(server)?;
        for socket in [&front, &back] {
            socket.set_read_timeout(Some(Duration::from_millis(20)))?;
        }
        let addr = front.local_addr()?;
        let (front, back) = (Arc::new(front), Arc::new(back));
        let client: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (up, down): (Queue, Queue) = (Arc::default(), Arc::default());
        let mut threads = Vec::new();
        // Client to server.
        {
            let (front, up, stop, client) =
                (front.clone(), up.clone(), stop.clone(), client.clone());
            threads.push(std::thread::spawn(move || {
                shape_in(&stop, &up, shape, |buf| {
                    let (n, from) = front.recv_from(buf)?;
                    if let Ok(mut c) = client.lock() {
                        *c = Some(from);
                    }
                    Ok(n)
                })
            }));
        }
        {
            let (back, up, stop) = (back.clone(), up.clone(), stop.clone());
            threads.push(std::thread::spawn(move || {
                send_out(&stop, &up, |d| back.send(d).map(|_| ()))
            }));
        }
        // Server to client.
        {
            let (back, down, stop) = (back.clone(), down.clone(), stop.clone());
            threads.push(std::thread::spawn(move || {
                shape_in(&stop, &down, shape, |buf| back.recv(buf))
            }));
        }
        {
            let (front, stop) = (front.clone(), stop.clone());
            threads.push(std::thread::spawn(move || {
                send_out(&stop, &down, |d| {
                    let to = client.lock().ok().and_then(|c| *c);
                    match to {
                        Some(to) => front.send_to(d, to).map(|_| ()),
                        None => Ok(()),
                    }
                })
            }));
        }
        Ok(Self {
            addr,
            stop,
            threads,
        })
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        // Each thread looks at the flag at least every 20 ms.
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// Receives datagrams with `recv` and queues each for when the shaped link lets it out.
fn shape_in(
    stop: &AtomicBool,
    queue: &Queue,
    shape: Shape,
    mut recv: impl FnMut(&mut [u8]) -> std::io::Result<usize>,
) {
    let mut buf = vec![0u8; 65_536];
    // When the link finishes sending what it took so far.
    let mut free_at = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let n = match recv(&mut buf) {
            Ok(n) => n,
            Err(_) => continue,
        };
        let now = Instant::now();
        let start = free_at.max(now);
        if start.duration_since(now) > shape.queue {
            continue; // The buffer is full: dropped.
        }
        free_at = start + Duration::from_secs_f64(n as f64 / shape.rate as f64);
        let (lock, ready) = &**queue;
        if let Ok(mut q) = lock.lock() {
            q.push_back((free_at + shape.delay, buf[..n].to_vec()));
            ready.notify_one();
        }
    }
}

/// Sends queued datagrams with `send` when their time comes.
fn send_out(stop: &AtomicBool, queue: &Queue, mut send: impl FnMut(&[u8]) -> std::io::Result<()>) {
    let (lock, ready) = &**queue;
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut q) = lock.lock() else { return };
        let now = Instant::now();
        match q.front().map(|(at, _)| *at) {
            Some(at) if at <= now => {
                let due: Vec<Vec<u8>> = std::iter::from_fn(|| {
                    q.front()
                        .is_some_and(|(at, _)| *at <= now)
                        .then(|| q.pop_front().map(|(_, d)| d))
                        .flatten()
                })
                .collect();
                drop(q);
                for datagram in due {
                    let _ = send(&datagram);
                }
            }
            Some(at) => {
                let wait = at.duration_since(now).min(Duration::from_millis(20));
                let _ = ready.wait_timeout(q, wait);
            }
            None => {
                let _ = ready.wait_timeout(q, Duration::from_millis(20));
            }
        }
    }
}
