//! `devices.toml` in the library folder: the devices this one paired with (so it can reach and
//! trust them before their Device records replicate) and the devices revoked.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use keel_schema::DeviceId;
use serde::{Deserialize, Serialize};

use crate::error::{io_at, NodeError};
use keel_engine::write_atomic;

const DEVICES_FILE: &str = "devices.toml";
/// Largest `devices.toml` read.
const DEVICES_LEN_MAX: u64 = 1024 * 1024;

/// One paired device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairedDevice {
    /// Device id (hex).
    pub device_id: String,
    /// The name it gave when pairing.
    pub name: String,
    /// Where it listens, if known.
    pub addr: Option<SocketAddr>,
    /// When it paired (ms since the Unix epoch).
    pub paired_ms: u64,
}

/// The contents of `devices.toml`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevicesFile {
    /// Paired devices.
    #[serde(default)]
    pub paired: Vec<PairedDevice>,
    /// Revoked device ids (hex): never pinned again.
    #[serde(default)]
    pub revoked: Vec<String>,
}

impl DevicesFile {
    fn path(dir: &Path) -> PathBuf {
        dir.join(DEVICES_FILE)
    }

    /// Reads the file of the library in `dir` (empty if there is none).
    pub fn read(dir: &Path) -> Result<Self, NodeError> {
        let path = Self::path(dir);
        let meta = match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => return Err(io_at(&path)(e)),
        };
        let bad = |reason: String| NodeError::BadDevicesFile {
            path: path.clone(),
            reason,
        };
        if meta.len() > DEVICES_LEN_MAX {
            return Err(bad(format!("{} bytes is too large", meta.len())));
        }
        let text = std::fs::read_to_string(&path).map_err(io_at(&path))?;
        Self::parse(&text, &path)
    }

    /// Parses the text of a `devices.toml` (`path` names it in errors).
    pub fn parse(text: &str, path: &Path) -> Result<Self, NodeError> {
        toml::from_str(text).map_err(|e| NodeError::BadDevicesFile {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
    }

    /// Writes the file atomically.
    pub fn write(&self, dir: &Path) -> Result<(), NodeError> {
        let path = Self::path(dir);
        let text = toml::to_string(self).map_err(|e| NodeError::BadDevicesFile {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        Ok(write_atomic(&path, text.as_bytes())?)
    }

    /// Records a paired device (replacing an older entry for it).
    pub fn add(&mut self, device: DeviceId, name: &str, addr: Option<SocketAddr>, now_ms: u64) {
        let id = device.to_hex();
        self.paired.retain(|d| d.device_id != id);
        self.revoked.retain(|d| *d != id);
        self.paired.push(PairedDevice {
            device_id: id,
            name: name.into(),
            addr,
            paired_ms: now_ms,
        });
    }

    /// Records where `device` was last reached. A revoked device is never recorded (nor brought
    /// back): only pairing adds a device. Returns whether the file changed.
    pub fn remember_addr(&mut self, device: DeviceId, addr: SocketAddr) -> bool {
        if self.is_revoked(&device) {
            return false;
        }
        let id = device.to_hex();
        match self.paired.iter_mut().find(|d| d.device_id == id) {
            Some(entry) if entry.addr == Some(addr) => false,
            Some(entry) => {
                entry.addr = Some(addr);
                true
            }
            None => {
                self.paired.push(PairedDevice {
                    device_id: id,
                    name: String::new(),
                    addr: Some(addr),
                    paired_ms: 0,
                });
                true
            }
        }
    }

    /// Whether `device` was revoked.
    pub fn is_revoked(&self, device: &DeviceId) -> bool {
        let id = device.to_hex();
        self.revoked.contains(&id)
    }

    /// Revokes `device`: removed from the paired list, never pinned again.
    pub fn revoke(&mut self, device: DeviceId) {
        let id = device.to_hex();
        self.paired.retain(|d| d.device_id != id);
        if !self.revoked.contains(&id) {
            self.revoked.push(id);
        }
    }

    /// The paired devices' ids.
    pub fn ids(&self) -> impl Iterator<Item = DeviceId> + '_ {
        self.paired
            .iter()
            .filter_map(|d| DeviceId::from_hex(&d.device_id))
    }

    /// The revoked devices' ids.
    pub fn revoked_ids(&self) -> impl Iterator<Item = DeviceId> + '_ {
        self.revoked.iter().filter_map(|d| DeviceId::from_hex(d))
    }

    /// The known addresses of paired devices.
    pub fn addrs(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.paired.iter().filter_map(|d| d.addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 24: a session with a revoked device (one that got in before the revocation took
    /// effect everywhere) must not bring it back by recording its address.
    #[test]
    fn recording_an_address_never_unrevokes_a_device() {
        let device = DeviceId([7; 32]);
        let addr: SocketAddr = "127.0.0.1:4000".parse().expect("addr");
        let mut file = DevicesFile::default();
        file.add(device, "phone", None, 1);
        file.revoke(device);
        assert!(!file.remember_addr(device, addr));
        assert!(file.is_revoked(&device));
        assert!(file.paired.is_empty());
        let other = DeviceId([8; 32]);
        assert!(file.remember_addr(other, addr));
        assert!(
            !file.remember_addr(other, addr),
            "nothing changed the second time"
        );
        assert_eq!(file.addrs().collect::<Vec<_>>(), vec![addr]);
    }
}
