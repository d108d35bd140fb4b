//! LAN discovery over mDNS/DNS-SD (the `mdns-sd` crate).
//!
//! A running node announces itself under [`LAN_SERVICE`] with an opaque instance name: a keyed hash
//! of the library id, its device id and the current ten-minute window ([`lan_tag`]). Only devices
//! that know the library id (paired devices) can tell which announcements are their library's;
//! a stranger sees random names that change every window, never the library's name or id. The
//! host name announced is the same tag, not the machine's name.
//!
//! A node browses the same service: an announcement whose name is the tag of a pinned device
//! (in this window or the ones either side, for clock skew) is dialed at once and wakes every
//! dialer. Everything read from the LAN is hostile: names are only compared with tags computed
//! here, at most [`ADDRS_PER_SERVICE_MAX`] addresses of one announcement are dialed, and the
//! TLS pin check decides who the peer is, never the announcement.
//!
//! While an invitation is open, the node also announces [`PAIRING_SERVICE`] under a random
//! name; [`find_inviter`] lets `pair join` find it with no address given. Nothing derived from
//! the code is announced (an eight-digit code's hash would be brute-forced offline).

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keel_schema::{DeviceId, LibraryId};
use mdns_sd::{IfKind, ServiceDaemon, ServiceEvent, ServiceInfo};

use super::net::Net;
use crate::error::NodeError;

/// The DNS-SD service type running nodes announce.
pub const LAN_SERVICE: &str = "_keel._udp.local.";
/// The DNS-SD service type of a node with an open invitation.
pub const PAIRING_SERVICE: &str = "_keel-pair._udp.local.";
/// The standard mDNS port.
pub const MDNS_PORT: u16 = 5353;
/// How long one announced name lives before it rotates.
pub(crate) const WINDOW_MS: u64 = 10 * 60 * 1000;
/// Bytes of the keyed hash in an instance name (hex: twice as many characters).
const TAG_BYTES: usize = 10;
/// Most addresses of one announcement that are dialed.
const ADDRS_PER_SERVICE_MAX: usize = 4;
/// Most inviting devices `find_inviter` keeps track of (the LAN may be hostile).
const INVITERS_MAX: usize = 8;
/// How often the discovery thread checks whether to stop or rotate its name.
const TICK: Duration = Duration::from_millis(250);
/// After the first inviting device answers, how long `find_inviter` listens for others.
const SETTLE: Duration = Duration::from_millis(400);

/// Where and how a node looks for its devices on the local network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discovery {
    /// The UDP port mDNS runs on ([`MDNS_PORT`]; tests use their own to stay apart).
    pub port: u16,
    /// Announce and browse on the loopback interface only (tests, one-machine setups).
    pub loopback_only: bool,
}

impl Default for Discovery {
    fn default() -> Self {
        Self {
            port: MDNS_PORT,
            loopback_only: false,
        }
    }
}

impl Discovery {
    /// Discovery on loopback only, on `port` (for tests and demos on one machine).
    pub fn loopback(port: u16) -> Self {
        Self {
            port,
            loopback_only: true,
        }
    }

    fn daemon(&self) -> Result<ServiceDaemon, NodeError> {
        let daemon = ServiceDaemon::new_with_port(self.port).map_err(mdns_failed)?;
        if self.loopback_only {
            daemon.disable_interface(IfKind::All).map_err(mdns_failed)?;
            daemon
                .enable_interface(IfKind::LoopbackV4)
                .map_err(mdns_failed)?;
        }
        Ok(daemon)
    }
}

fn mdns_failed(e: mdns_sd::Error) -> NodeError {
    NodeError::Discovery(e.to_string())
}

/// The ten-minute window `now_ms` falls in.
pub(crate) fn window(now_ms: u64) -> u64 {
    now_ms / WINDOW_MS
}

/// The instance name `device` announces for `library` in `window`: opaque to anyone who does
/// not know the library id, and different in every window.
pub fn lan_tag(library: LibraryId, device: DeviceId, window: u64) -> String {
    let key = blake3::derive_key("keel 2026 lan discovery v1", library.0.as_bytes());
    let mut hasher = blake3::Hasher::new_keyed(&key);
    hasher.update(&device.0);
    hasher.update(&window.to_le_bytes());
    let hash = hasher.finalize();
    hash.as_bytes()[..TAG_BYTES]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The instance part of a DNS-SD full name (`name._keel._udp.local.` gives `name`).
fn instance<'a>(fullname: &'a str, service: &str) -> Option<&'a str> {
    fullname
        .strip_suffix(service)
        .and_then(|rest| rest.strip_suffix('.'))
}

/// The socket addresses an announcement names, at most [`ADDRS_PER_SERVICE_MAX`], IPv4 first.
fn socket_addrs(ips: impl Iterator<Item = IpAddr>, port: u16) -> Vec<SocketAddr> {
    let mut ips: Vec<IpAddr> = ips.filter(|ip| !ip.is_unspecified()).collect();
    ips.sort_by_key(|ip| (ip.is_ipv6(), *ip));
    ips.dedup();
    ips.into_iter()
        .take(ADDRS_PER_SERVICE_MAX)
        .map(|ip| SocketAddr::new(ip, port))
        .collect()
}

/// A node's presence on the LAN: its announcement, its pairing announcement while an invitation
/// is open, and the thread that browses for its devices.
pub(crate) struct Lan {
    daemon: ServiceDaemon,
    library: LibraryId,
    device: DeviceId,
    port: u16,
    /// The full names registered now (this device's, and the pairing one while inviting).
    announced: Mutex<Announced>,
    stop: AtomicBool,
}

#[derive(Default)]
struct Announced {
    device: Option<(u64, String)>,
    pairing: Option<String>,
}

impl Lan {
    /// Starts mDNS for a node listening on `port`.
    pub(crate) fn start(
        discovery: &Discovery,
        library: LibraryId,
        device: DeviceId,
        port: u16,
    ) -> Result<Self, NodeError> {
        Ok(Self {
            daemon: discovery.daemon()?,
            library,
            device,
            port,
            announced: Mutex::new(Announced::default()),
            stop: AtomicBool::new(false),
        })
    }

    fn register(&self, service: &str, name: &str) -> Result<String, NodeError> {
        let host = format!("{name}.local.");
        let info = ServiceInfo::new(service, name, &host, "", self.port, None)
            .map_err(mdns_failed)?
            .enable_addr_auto();
        let fullname = info.get_fullname().to_string();
        self.daemon.register(info).map_err(mdns_failed)?;
        Ok(fullname)
    }

    fn unregister(&self, fullname: &str) {
        if let Err(e) = self.daemon.unregister(fullname) {
            tracing::debug!(error = %e, "mDNS unregister failed");
        }
    }

    /// Announces this device under the tag of the current window (again, if it rotated).
    fn announce(&self, now_ms: u64) {
        let now = window(now_ms);
        let Ok(mut announced) = self.announced.lock() else {
            return;
        };
        if announced.device.as_ref().is_some_and(|(w, _)| *w == now) {
            return;
        }
        if let Some((_, old)) = announced.device.take() {
            self.unregister(&old);
        }
        match self.register(LAN_SERVICE, &lan_tag(self.library, self.device, now)) {
            Ok(fullname) => announced.device = Some((now, fullname)),
            Err(e) => tracing::warn!(error = %e, "could not announce this device on the LAN"),
        }
    }

    /// Announces an open invitation (a random name: nothing about the code or the library).
    pub(crate) fn announce_invitation(&self) {
        let name: String = (0..TAG_BYTES)
            .map(|_| format!("{:02x}", rand::random::<u8>()))
            .collect();
        let Ok(mut announced) = self.announced.lock() else {
            return;
        };
        if let Some(old) = announced.pairing.take() {
            self.unregister(&old);
        }
        match self.register(PAIRING_SERVICE, &name) {
            Ok(fullname) => announced.pairing = Some(fullname),
            Err(e) => tracing::warn!(error = %e, "could not announce the invitation on the LAN"),
        }
    }

    /// Withdraws the invitation's announcement.
    pub(crate) fn withdraw_invitation(&self) {
        let old = self
            .announced
            .lock()
            .ok()
            .and_then(|mut a| a.pairing.take());
        if let Some(old) = old {
            self.unregister(&old);
        }
    }

    /// The pinned device (not this one) that announces `name` in this window or either side.
    fn device_named(&self, net: &Net, name: &str, now_ms: u64) -> Option<DeviceId> {
        let now = window(now_ms);
        let windows = [now.saturating_sub(1), now, now.saturating_add(1)];
        net.endpoint
            .pins()
            .all()
            .into_iter()
            .filter(|d| *d != self.device)
            .find(|d| {
                windows
                    .iter()
                    .any(|w| lan_tag(self.library, *d, *w) == name)
            })
    }

    /// Announces this device and dials its pinned devices as they are found, until stopped.
    /// Runs on its own thread (mDNS events arrive on a blocking channel).
    pub(crate) fn run(self: Arc<Self>, net: Arc<Net>, rt: tokio::runtime::Handle) {
        let events = match self.daemon.browse(LAN_SERVICE) {
            Ok(events) => events,
            Err(e) => {
                tracing::warn!(error = %e, "LAN discovery is off: browsing failed");
                return;
            }
        };
        while !self.stop.load(Ordering::SeqCst) {
            self.announce(keel_engine::now_ms());
            let Ok(event) = events.recv_timeout(TICK) else {
                continue;
            };
            let ServiceEvent::ServiceResolved(found) = event else {
                continue;
            };
            let Some(name) = instance(&found.fullname, LAN_SERVICE) else {
                continue;
            };
            let Some(device) = self.device_named(&net, name, keel_engine::now_ms()) else {
                continue;
            };
            let addrs = socket_addrs(found.addresses.iter().map(|a| a.to_ip_addr()), found.port);
            tracing::debug!(device = %device.short(), ?addrs, "found a paired device on the LAN");
            let _guard = rt.enter();
            net.found_on_lan(device, &addrs);
        }
    }

    /// Withdraws every announcement and stops the mDNS daemon and the discovery thread.
    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let names: Vec<String> = self
            .announced
            .lock()
            .map(|mut a| {
                let mut names: Vec<String> = a.device.take().map(|(_, n)| n).into_iter().collect();
                names.extend(a.pairing.take());
                names
            })
            .unwrap_or_default();
        for name in names {
            self.unregister(&name);
        }
        let _ = self.daemon.shutdown();
    }
}

/// Looks on the LAN for a node with an open invitation, for up to `wait`: its addresses, for
/// `pair join` with no address. Two or more inviting devices are an error (the code would be
/// tried against the wrong one): the user gives `--addr` then.
pub async fn find_inviter(
    discovery: &Discovery,
    wait: Duration,
) -> Result<Vec<SocketAddr>, NodeError> {
    let discovery = discovery.clone();
    tokio::task::spawn_blocking(move || find_inviter_blocking(&discovery, wait))
        .await
        .map_err(|e| NodeError::Discovery(e.to_string()))?
}

fn find_inviter_blocking(
    discovery: &Discovery,
    wait: Duration,
) -> Result<Vec<SocketAddr>, NodeError> {
    let daemon = discovery.daemon()?;
    let events = daemon.browse(PAIRING_SERVICE).map_err(mdns_failed)?;
    let started = Instant::now();
    let mut deadline = started + wait;
    let mut found: HashMap<String, Vec<SocketAddr>> = HashMap::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        let Ok(event) = events.recv_timeout(left) else {
            break;
        };
        if let ServiceEvent::ServiceResolved(service) = event {
            let addrs = socket_addrs(
                service.addresses.iter().map(|a| a.to_ip_addr()),
                service.port,
            );
            if addrs.is_empty() || found.len() >= INVITERS_MAX {
                continue;
            }
            if found.is_empty() {
                deadline = deadline.min(Instant::now() + SETTLE);
            }
            found.insert(service.fullname.clone(), addrs);
        }
    }
    let _ = daemon.shutdown();
    let distinct: HashSet<Vec<SocketAddr>> = found.into_values().collect();
    let mut distinct: Vec<Vec<SocketAddr>> = distinct.into_iter().collect();
    match distinct.len() {
        0 => Err(NodeError::Discovery(format!(
            "no device with an open invitation answered on the local network within {} s; give its address with --addr",
            wait.as_secs()
        ))),
        1 => Ok(distinct.remove(0)),
        n => Err(NodeError::Discovery(format!(
            "{n} devices with an open invitation answered ({}); give the right one with --addr",
            distinct
                .iter()
                .filter_map(|a| a.first().map(|a| a.to_string()))
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tag_is_opaque_and_rotates_with_the_window() {
        let library = LibraryId(uuid::Uuid::from_u128(7));
        let device = DeviceId([3; 32]);
        let a = lan_tag(library, device, 100);
        assert_eq!(a.len(), TAG_BYTES * 2);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(a, lan_tag(library, device, 100), "deterministic");
        assert_ne!(a, lan_tag(library, device, 101), "rotates");
        assert_ne!(a, lan_tag(LibraryId(uuid::Uuid::from_u128(8)), device, 100));
        assert_ne!(a, lan_tag(library, DeviceId([4; 32]), 100));
        assert!(!a.contains(&library.0.simple().to_string()[..8]));
    }

    #[test]
    fn hostile_announcements_are_cut_down_to_a_few_addresses() {
        let ips = (0..50u8).map(|i| IpAddr::from([10, 0, 0, i]));
        let addrs = socket_addrs(ips.chain([IpAddr::from([0, 0, 0, 0])]), 9);
        assert_eq!(addrs.len(), ADDRS_PER_SERVICE_MAX);
        assert!(addrs
            .iter()
            .all(|a| a.port() == 9 && !a.ip().is_unspecified()));
        assert_eq!(instance("abc._keel._udp.local.", LAN_SERVICE), Some("abc"));
        assert_eq!(instance("abc._other._udp.local.", LAN_SERVICE), None);
    }
}
