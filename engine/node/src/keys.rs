//! Library keys between paired devices: every session starts with each side sending every key
//! it holds, and a rotation (after a revocation) sends them again to every session. A device
//! takes the keys it lacks (see `keel_engine::Library::learn_keys`) and passes them on. Keys
//! travel only inside pinned TLS sessions, never to a revoked device, and a key message names
//! the sender's revocations, which the receiver applies before it takes or passes on the keys:
//! a key made after a revocation reaches a device no sooner than the revocation does, so it
//! never reaches the revoked device.

use std::collections::HashSet;
use std::sync::Arc;

use keel_journal::SharedKey;
use keel_schema::DeviceId;
use keel_transport::{Connection, DeviceMessage, WireKey, REVOKED_MAX};

use crate::devices::DevicesFile;

use super::net::Net;

fn to_wire(keys: Vec<SharedKey>) -> Vec<WireKey> {
    keys.iter()
        .map(|k| WireKey {
            key_id: k.key_id,
            generation: k.generation,
            key: serde_bytes::ByteBuf::from(k.bytes.clone()),
        })
        .collect()
}

impl Net {
    /// The devices keys are never sent to: those revoked in `devices.toml` and those a peer's
    /// key message named (see [`Net::take_revocations`]).
    fn withheld_from(&self) -> HashSet<DeviceId> {
        let mut withheld = self.withheld.lock().map(|w| w.clone()).unwrap_or_default();
        if let Ok(file) = DevicesFile::read(&self.library_dir) {
            withheld.extend(file.revoked_ids());
        }
        withheld
    }

    /// The message with every key of the library and the latest revocations, if the library
    /// is open.
    fn keys_message(&self, withheld: &HashSet<DeviceId>) -> Option<DeviceMessage> {
        let link = self.link.upgrade()?;
        let keys = to_wire(link.library().shared_keys());
        let mut revoked: Vec<DeviceId> = withheld.iter().copied().collect();
        revoked.sort_unstable_by_key(|d| d.0);
        revoked.truncate(REVOKED_MAX);
        Some(DeviceMessage::LibraryKeys { keys, revoked })
    }

    /// Sends every key of the library to one session, unless its device is revoked.
    pub(crate) async fn send_keys(&self, conn: &Arc<Connection>) {
        self.send_keys_to(std::slice::from_ref(conn)).await;
    }

    /// Sends every key of the library to every session (after a rotation, or new keys).
    pub(crate) async fn share_keys(&self) {
        // Never to a device revoked a moment ago whose session is still closing.
        let sessions = self.sessions_where(|d| self.endpoint.pins().contains(d));
        self.send_keys_to(&sessions).await;
    }

    /// Sends one key message to each of `sessions` whose device is not revoked.
    async fn send_keys_to(&self, sessions: &[Arc<Connection>]) {
        let withheld = self.withheld_from();
        let Some(message) = self.keys_message(&withheld) else {
            return;
        };
        for conn in sessions.iter().filter(|c| !withheld.contains(&c.peer())) {
            if let Err(e) = conn.send(&message).await {
                tracing::debug!(peer = %conn.peer().short(), error = %e, "library keys not sent");
            }
        }
    }

    /// Revokes here the devices a pinned peer's key message says it revoked: unpinned, cut
    /// off, recorded, and never sent a key, before the keys that came with it are taken or
    /// passed on. (A paired device may revoke any device through the log anyway; this only
    /// makes the revocation arrive with the key made after it.)
    fn take_revocations(&self, from: DeviceId, revoked: &[DeviceId]) {
        let fresh: Vec<DeviceId> = {
            let Ok(mut withheld) = self.withheld.lock() else {
                return;
            };
            // Only devices pinned here: a device not pinned is sent no key anyway, and the set
            // stays as small as the library's devices whatever a peer names.
            revoked
                .iter()
                .filter(|d| **d != self.device && self.endpoint.pins().contains(d))
                .filter(|d| withheld.insert(**d))
                .copied()
                .collect()
        };
        if fresh.is_empty() {
            return;
        }
        for device in &fresh {
            self.endpoint.pins().unpin(*device);
            self.disconnect(*device);
        }
        match DevicesFile::read(&self.library_dir) {
            Ok(mut file) => {
                for device in &fresh {
                    file.revoke(*device);
                }
                if let Err(e) = file.write(&self.library_dir) {
                    tracing::warn!(error = %e, "could not record a revoked device");
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not record a revoked device"),
        }
        tracing::info!(peer = %from.short(), devices = fresh.len(), "revocations that came with library keys");
    }

    /// Takes the keys a pinned peer sent, after the revocations that came with them; new ones
    /// are passed on to the other sessions.
    pub(crate) fn learn_keys(
        self: &Arc<Self>,
        from: DeviceId,
        keys: Vec<WireKey>,
        revoked: Vec<DeviceId>,
    ) {
        self.take_revocations(from, &revoked);
        let Some(link) = self.link.upgrade() else {
            return;
        };
        let keys: Vec<SharedKey> = keys
            .iter()
            .map(|k| SharedKey {
                key_id: k.key_id,
                generation: k.generation,
                bytes: k.key.to_vec(),
            })
            .collect();
        match link.library().learn_keys(&keys) {
            Ok(true) => {
                tracing::info!(peer = %from.short(), "new library keys from a paired device");
                let net = self.clone();
                tokio::spawn(async move { net.share_keys().await });
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(peer = %from.short(), error = %e, "library keys from a peer refused")
            }
        }
    }
}
