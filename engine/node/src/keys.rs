//! Library keys between paired devices: every session starts with each side sending every key
//! it holds, and a rotation (after a revocation) sends them again to every session. A device
//! takes the keys it lacks (see `keel_engine::Library::learn_keys`) and passes them on. Keys
//! travel only inside pinned TLS sessions, so a revoked device never receives a key made after
//! its revocation.

use std::sync::Arc;

use keel_journal::SharedKey;
use keel_schema::DeviceId;
use keel_transport::{Connection, DeviceMessage, WireKey};

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
    /// The message with every key of the library, if the library is open.
    fn keys_message(&self) -> Option<DeviceMessage> {
        let link = self.link.upgrade()?;
        let keys = to_wire(link.library().shared_keys());
        Some(DeviceMessage::LibraryKeys { keys })
    }

    /// Sends every key of the library to one session.
    pub(crate) async fn send_keys(&self, conn: &Connection) {
        let Some(message) = self.keys_message() else {
            return;
        };
        if let Err(e) = conn.send(&message).await {
            tracing::debug!(peer = %conn.peer().short(), error = %e, "library keys not sent");
        }
    }

    /// Sends every key of the library to every session (after a rotation, or new keys).
    pub(crate) async fn share_keys(&self) {
        // Never to a device revoked a moment ago whose session is still closing.
        for conn in self.sessions_where(|d| self.endpoint.pins().contains(d)) {
            self.send_keys(&conn).await;
        }
    }

    /// Takes the keys a pinned peer sent; new ones are passed on to the other sessions.
    pub(crate) fn learn_keys(self: &Arc<Self>, from: DeviceId, keys: Vec<WireKey>) {
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
