//! Sealing: the library key, its wrapping under the user's password, and per-change encryption.
//!
//! The library key is 32 random bytes, wrapped by a key derived from the password with Argon2id.
//! Payloads are sealed with XChaCha20-Poly1305 under a subkey of the library key, with a 192-bit
//! nonce (a random 16-byte head that a thread keeps for up to 65,536 records, and a random 8-byte
//! tail for each; see [`crate::xchacha`]) and `(library id, change id, key id)` as associated data,
//! so a ciphertext moved to another record fails to open.

use argon2::{Algorithm, Argon2, Params, Version};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use keel_schema::{ChangeId, LibraryId};
use rand::Rng;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::JournalError;

/// Length of a sealed record's header: key id, change id, nonce.
pub const SEAL_HEADER_LEN: usize = 4 + 16 + 24;
/// Length of the authentication tag.
pub const SEAL_TAG_LEN: usize = 16;

/// Argon2id cost parameters, stored beside the wrapped key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KdfParams {
    /// Memory in KiB.
    pub m_kib: u32,
    /// Passes.
    pub t: u32,
    /// Lanes.
    pub p: u32,
}

impl KdfParams {
    /// RFC 9106's second recommendation: 64 MiB, 3 passes, 4 lanes.
    pub const RECOMMENDED: KdfParams = KdfParams {
        m_kib: 64 * 1024,
        t: 3,
        p: 4,
    };
    /// Cheap parameters for tests and benchmarks only.
    pub const INSECURE_FAST: KdfParams = KdfParams {
        m_kib: 64,
        t: 1,
        p: 1,
    };
    /// The largest memory cost accepted when reading (1 GiB).
    pub const M_KIB_MAX: u32 = 1024 * 1024;
    /// The largest pass count accepted when reading.
    pub const T_MAX: u32 = 16;
    /// The largest lane count accepted when reading.
    pub const P_MAX: u32 = 16;

    /// Checks the parameters against the caps, so a tampered file cannot make opening hang or OOM.
    pub fn check(&self) -> Result<(), JournalError> {
        let ok = (1..=Self::P_MAX).contains(&self.p)
            && (1..=Self::T_MAX).contains(&self.t)
            && self.m_kib >= 8 * self.p
            && self.m_kib <= Self::M_KIB_MAX;
        if ok {
            Ok(())
        } else {
            Err(JournalError::KdfParamsOutOfRange(format!(
                "m={} KiB t={} p={} (caps: m<={} KiB, t<={}, p<={})",
                self.m_kib,
                self.t,
                self.p,
                Self::M_KIB_MAX,
                Self::T_MAX,
                Self::P_MAX
            )))
        }
    }
}

/// The library key wrapped under a password-derived key; stored in `library.toml`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WrappedKey {
    /// Argon2id parameters.
    pub kdf: KdfParams,
    /// Argon2id salt, hex.
    pub salt: String,
    /// XChaCha20-Poly1305 nonce, hex.
    pub nonce: String,
    /// The sealed library key, hex.
    pub sealed_key: String,
    /// Key id written into every sealed record.
    pub key_id: u32,
    /// The key's generation (see [`LibraryKey`]); 0 in files written before rotation existed.
    #[serde(default)]
    pub generation: u32,
}

/// Most keys a library keeps (the first and one per rotation); bounds what a peer can send.
pub const LIBRARY_KEYS_MAX: usize = 32;

/// The library's secret key, and the keys it replaced (which still open the records sealed
/// under them). Never written to disk unwrapped. A revocation rotates it: the new key gets the
/// next generation and a fresh random key id; records keep the key id they were sealed with.
#[derive(Clone)]
pub struct LibraryKey {
    bytes: [u8; 32],
    key_id: u32,
    generation: u32,
    /// The other keys of the library, each with an empty `previous`.
    previous: Vec<LibraryKey>,
}

impl Drop for LibraryKey {
    fn drop(&mut self) {
        // Key material does not outlive its holder in memory.
        zeroize::Zeroize::zeroize(&mut self.bytes);
    }
}

impl std::fmt::Debug for LibraryKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "LibraryKey(id {}, generation {}, {} older)",
            self.key_id,
            self.generation,
            self.previous.len()
        )
    }
}

/// A key of the library as devices hand it to each other (over a pinned TLS session, or sealed
/// in pairing).
#[derive(Clone, PartialEq, Eq)]
pub struct SharedKey {
    /// Its key id.
    pub key_id: u32,
    /// Its generation (0 for the library's first key, one more per rotation).
    pub generation: u32,
    /// The key.
    pub bytes: Vec<u8>,
}

impl Drop for SharedKey {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.bytes);
    }
}

impl std::fmt::Debug for SharedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SharedKey(id {}, generation {})",
            self.key_id, self.generation
        )
    }
}

/// A key of the library stored in `library.toml` sealed under the password-wrapped key (so the
/// password still guards it), named by `under`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainedKey {
    /// The key id it was sealed under.
    pub under: u32,
    /// Its key id.
    pub key_id: u32,
    /// Its generation.
    pub generation: u32,
    /// XChaCha20-Poly1305 nonce, hex.
    pub nonce: String,
    /// The sealed key, hex.
    pub sealed_key: String,
}

fn derive_kek(
    password: &str,
    salt: &[u8],
    kdf: KdfParams,
) -> Result<zeroize::Zeroizing<[u8; 32]>, JournalError> {
    kdf.check()?;
    let params = Params::new(kdf.m_kib, kdf.t, kdf.p, Some(32))
        .map_err(|e| JournalError::KdfParamsOutOfRange(e.to_string()))?;
    let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
    let mut kek = zeroize::Zeroizing::new([0u8; 32]);
    argon
        .hash_password_into(password.as_bytes(), salt, kek.as_mut())
        .map_err(|e| JournalError::BadKeyMaterial(e.to_string()))?;
    Ok(kek)
}

fn wrap_ad(library: LibraryId, key_id: u32) -> Vec<u8> {
    let mut ad = b"keel library key v1".to_vec();
    ad.extend_from_slice(library.0.as_bytes());
    ad.extend_from_slice(&key_id.to_be_bytes());
    ad
}

/// The context of the payload-sealing subkey.
const SEALING_CONTEXT: &str = "keel 2026-11 log payload sealing v1";
/// The context of the subkey that seals a library's other keys in `library.toml`.
const CHAIN_CONTEXT: &str = "keel 2026-12 library key chain v1";

fn key_bytes(bytes: &[u8]) -> Result<[u8; 32], JournalError> {
    bytes
        .try_into()
        .map_err(|_| JournalError::BadKeyMaterial(format!("a key of {} bytes", bytes.len())))
}

fn hex_field(name: &str, text: &str) -> Result<Vec<u8>, JournalError> {
    hex::decode(text).map_err(|e| JournalError::BadKeyMaterial(format!("{name}: {e}")))
}

impl LibraryKey {
    /// A fresh random key with key id 1, generation 0.
    pub fn generate() -> Self {
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        Self::single(bytes, 1, 0)
    }

    fn single(bytes: [u8; 32], key_id: u32, generation: u32) -> Self {
        Self {
            bytes,
            key_id,
            generation,
            previous: Vec::new(),
        }
    }

    /// The keys received from another device in pairing (see [`LibraryKey::to_bytes`]); a lone
    /// 32-byte key is the first key. `None` if malformed.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if let Ok(key) = <[u8; 32]>::try_from(bytes) {
            return Some(Self::single(key, 1, 0));
        }
        let keys: Vec<SharedKey> = bytes
            .chunks(40)
            .map(|c| {
                Some(SharedKey {
                    key_id: u32::from_be_bytes(c.get(..4)?.try_into().ok()?),
                    generation: u32::from_be_bytes(c.get(4..8)?.try_into().ok()?),
                    bytes: c.get(8..40)?.to_vec(),
                })
            })
            .collect::<Option<_>>()?;
        if !bytes.len().is_multiple_of(40) || keys.is_empty() {
            return None;
        }
        Self::from_shared(&keys).ok()
    }

    /// Every key, to hand to a device being paired (sealed under the pairing session key):
    /// `(key id, generation, key)` each, 40 bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for key in self.shared() {
            out.extend_from_slice(&key.key_id.to_be_bytes());
            out.extend_from_slice(&key.generation.to_be_bytes());
            out.extend_from_slice(&key.bytes);
        }
        out
    }

    /// The key id written into sealed records.
    pub fn key_id(&self) -> u32 {
        self.key_id
    }

    /// The current key's generation.
    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// Every key of the library, the current one first.
    fn all(&self) -> impl Iterator<Item = &LibraryKey> {
        std::iter::once(self).chain(self.previous.iter())
    }

    /// The ids of every key of the library, the current one first.
    pub fn key_ids(&self) -> Vec<u32> {
        self.all().map(|k| k.key_id).collect()
    }

    /// Every key of the library, to send to a paired device.
    pub fn shared(&self) -> Vec<SharedKey> {
        self.all()
            .map(|k| SharedKey {
                key_id: k.key_id,
                generation: k.generation,
                bytes: k.bytes.to_vec(),
            })
            .collect()
    }

    /// A library key made of `keys` (at least one).
    fn from_shared(keys: &[SharedKey]) -> Result<Self, JournalError> {
        let first = keys
            .first()
            .ok_or_else(|| JournalError::BadKeyMaterial("no keys".into()))?;
        let mut ring = Self::single(key_bytes(&first.bytes)?, first.key_id, first.generation);
        ring.previous.extend(ring.learn_all(&keys[1..])?);
        Ok(ring.with_newest_current())
    }

    /// A new key for the library (after a revocation): the next generation, a fresh random id.
    /// This key becomes one of its previous keys.
    pub fn rotated(&self) -> Self {
        let ids = self.key_ids();
        let mut key_id = 0;
        while key_id == 0 || ids.contains(&key_id) {
            key_id = rand::rng().next_u32();
        }
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        let generation = self.all().map(|k| k.generation).max().unwrap_or(0) + 1;
        let mut next = Self::single(bytes, key_id, generation);
        next.previous = self
            .all()
            .map(|k| Self::single(k.bytes, k.key_id, k.generation))
            .collect();
        next
    }

    /// This library key with `keys` from a peer added: `None` if it had them all. A key whose id
    /// it holds with other bytes is [`JournalError::KeyConflict`]; a generation more than one
    /// past the highest held (after adding the lower ones) is refused the same way, so a peer
    /// cannot make a key current for good. The current key becomes the newest: the highest
    /// generation, then the highest id.
    pub fn learn(&self, keys: &[SharedKey]) -> Result<Option<Self>, JournalError> {
        let mut ring = self.clone();
        let added = ring.learn_all(keys)?;
        if added.is_empty() {
            return Ok(None);
        }
        ring.previous.extend(added);
        Ok(Some(ring.with_newest_current()))
    }

    /// The keys of `keys` this ring lacks, checked (see [`LibraryKey::learn`]).
    fn learn_all(&self, keys: &[SharedKey]) -> Result<Vec<LibraryKey>, JournalError> {
        if keys.len() + self.previous.len() >= LIBRARY_KEYS_MAX {
            return Err(JournalError::KeyConflict(format!(
                "more than {LIBRARY_KEYS_MAX} library keys"
            )));
        }
        let mut sorted: Vec<&SharedKey> = keys.iter().collect();
        sorted.sort_by_key(|k| (k.generation, k.key_id));
        let mut highest = self.all().map(|k| k.generation).max().unwrap_or(0);
        let mut added: Vec<LibraryKey> = Vec::new();
        for key in sorted {
            let bytes = key_bytes(&key.bytes)?;
            match self
                .all()
                .chain(added.iter())
                .find(|k| k.key_id == key.key_id)
            {
                Some(held) if held.bytes == bytes && held.generation == key.generation => continue,
                Some(_) => {
                    return Err(JournalError::KeyConflict(format!(
                        "key id {} is held with other bytes",
                        key.key_id
                    )))
                }
                None => {}
            }
            if key.generation > highest.saturating_add(1) {
                return Err(JournalError::KeyConflict(format!(
                    "generation {} is more than one past {highest}",
                    key.generation
                )));
            }
            highest = highest.max(key.generation);
            added.push(Self::single(bytes, key.key_id, key.generation));
        }
        Ok(added)
    }

    /// The same keys with the newest as the current one.
    fn with_newest_current(self) -> Self {
        let mut keys: Vec<LibraryKey> = self
            .all()
            .map(|k| Self::single(k.bytes, k.key_id, k.generation))
            .collect();
        keys.sort_by_key(|k| std::cmp::Reverse((k.generation, k.key_id)));
        let mut current = keys.remove(0);
        current.previous = keys;
        current
    }

    /// Seals the key `key_id` of this library under its key `under`, for `library.toml`.
    pub fn chain(
        &self,
        library: LibraryId,
        under: u32,
        key_id: u32,
    ) -> Result<ChainedKey, JournalError> {
        let find = |id: u32| {
            self.all()
                .find(|k| k.key_id == id)
                .ok_or_else(|| JournalError::BadKeyMaterial(format!("no key id {id}")))
        };
        let (sealing, key) = (find(under)?, find(key_id)?);
        let mut nonce = [0u8; 24];
        rand::rng().fill_bytes(&mut nonce);
        let cipher = XChaCha20Poly1305::new((&sealing.subkey(CHAIN_CONTEXT)).into());
        let sealed = cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: &key.bytes,
                    aad: &wrap_ad(library, key_id),
                },
            )
            .map_err(|_| JournalError::BadKeyMaterial("key chaining failed".into()))?;
        Ok(ChainedKey {
            under,
            key_id,
            generation: key.generation,
            nonce: hex::encode(nonce),
            sealed_key: hex::encode(sealed),
        })
    }

    /// This key with the keys of `chained` (from `library.toml`) opened and added.
    pub fn unchain(self, library: LibraryId, chained: &[ChainedKey]) -> Result<Self, JournalError> {
        let mut keys = Vec::with_capacity(chained.len());
        for link in chained {
            let under = self
                .all()
                .find(|k| k.key_id == link.under)
                .ok_or_else(|| JournalError::BadKeyMaterial(format!("no key id {}", link.under)))?;
            let nonce = hex_field("nonce", &link.nonce)?;
            let sealed = hex_field("sealed_key", &link.sealed_key)?;
            if nonce.len() != 24 {
                return Err(JournalError::BadKeyMaterial(
                    "chained key nonce length".into(),
                ));
            }
            let cipher = XChaCha20Poly1305::new((&under.subkey(CHAIN_CONTEXT)).into());
            let plain = cipher
                .decrypt(
                    XNonce::from_slice(&nonce),
                    Payload {
                        msg: &sealed,
                        aad: &wrap_ad(library, link.key_id),
                    },
                )
                .map_err(|_| JournalError::BadKeyMaterial("a chained key does not open".into()))?;
            keys.push(SharedKey {
                key_id: link.key_id,
                generation: link.generation,
                bytes: plain,
            });
        }
        Ok(self.learn(&keys)?.unwrap_or(self))
    }

    /// Wraps this key under `password` for `library`.
    pub fn wrap(
        &self,
        library: LibraryId,
        password: &str,
        kdf: KdfParams,
    ) -> Result<WrappedKey, JournalError> {
        let mut salt = [0u8; 16];
        let mut nonce = [0u8; 24];
        rand::rng().fill_bytes(&mut salt);
        rand::rng().fill_bytes(&mut nonce);
        let kek = derive_kek(password, &salt, kdf)?;
        let cipher = XChaCha20Poly1305::new((&*kek).into());
        let ad = wrap_ad(library, self.key_id);
        let sealed = cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: &self.bytes,
                    aad: &ad,
                },
            )
            .map_err(|_| JournalError::BadKeyMaterial("key wrap failed".into()))?;
        Ok(WrappedKey {
            kdf,
            salt: hex::encode(salt),
            nonce: hex::encode(nonce),
            sealed_key: hex::encode(sealed),
            key_id: self.key_id,
            generation: self.generation,
        })
    }

    /// Unwraps a key; a wrong password is [`JournalError::WrongPassword`].
    pub fn unwrap_with(
        wrapped: &WrappedKey,
        library: LibraryId,
        password: &str,
    ) -> Result<Self, JournalError> {
        let salt = hex_field("salt", &wrapped.salt)?;
        let nonce = hex_field("nonce", &wrapped.nonce)?;
        let sealed = hex_field("sealed_key", &wrapped.sealed_key)?;
        if salt.len() < 8 || nonce.len() != 24 || sealed.len() != 32 + SEAL_TAG_LEN {
            return Err(JournalError::BadKeyMaterial(
                "salt, nonce or sealed key has the wrong length".into(),
            ));
        }
        let kek = derive_kek(password, &salt, wrapped.kdf)?;
        let cipher = XChaCha20Poly1305::new((&*kek).into());
        let ad = wrap_ad(library, wrapped.key_id);
        let plain = cipher
            .decrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: &sealed,
                    aad: &ad,
                },
            )
            .map_err(|_| JournalError::WrongPassword)?;
        let bytes: [u8; 32] = plain.try_into().map_err(|_| {
            JournalError::BadKeyMaterial("unwrapped key has the wrong length".into())
        })?;
        Ok(Self::single(bytes, wrapped.key_id, wrapped.generation))
    }

    /// The sealer for log payloads (a per-purpose subkey).
    pub fn sealer(&self, library: LibraryId) -> Sealer {
        let subkey = |k: &LibraryKey| blake3::derive_key(SEALING_CONTEXT, &k.bytes);
        Sealer {
            library,
            key_id: self.key_id,
            key: subkey(self),
            older: self
                .previous
                .iter()
                .map(|k| (k.key_id, subkey(k)))
                .collect::<Vec<_>>()
                .into(),
            pages: crate::binding::PageKeys::derive(self.all().map(|k| (k.key_id, &k.bytes))),
        }
    }

    /// A subkey for another purpose (for example the pairing transfer), named by `context`.
    pub fn subkey(&self, context: &str) -> [u8; 32] {
        blake3::derive_key(context, &self.bytes)
    }
}

/// Seals and opens change payloads for one library.
#[derive(Clone)]
pub struct Sealer {
    library: LibraryId,
    key_id: u32,
    /// The payload subkey (XChaCha20-Poly1305, see [`crate::xchacha`]).
    key: [u8; 32],
    /// The payload subkeys of the library's previous keys, by key id (opening only).
    older: std::sync::Arc<[(u32, [u8; 32])]>,
    /// The subkeys that bind log pages to their positions (see [`crate::binding`]).
    pages: crate::binding::PageKeys,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sealer(library {}, key {})", self.library, self.key_id)
    }
}

fn seal_ad(library: LibraryId, change: ChangeId, key_id: u32) -> [u8; 36] {
    let mut ad = [0u8; 36];
    ad[..16].copy_from_slice(library.0.as_bytes());
    ad[16..32].copy_from_slice(change.0.as_bytes());
    ad[32..].copy_from_slice(&key_id.to_be_bytes());
    ad
}

impl Sealer {
    /// Seals `plain` for change `change`: `key id ‖ change id ‖ nonce ‖ ciphertext+tag`.
    pub fn seal(&self, change: ChangeId, plain: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(SEAL_HEADER_LEN + plain.len() + SEAL_TAG_LEN);
        self.seal_into(change, &mut out, |buf| buf.extend_from_slice(plain));
        out
    }

    /// Appends to `out` what [`Sealer::seal`] returns, for the plaintext that `write_plain`
    /// appends to the buffer it is given (so the plaintext is sealed where it was written,
    /// without a copy).
    pub fn seal_into(
        &self,
        change: ChangeId,
        out: &mut Vec<u8>,
        write_plain: impl FnOnce(&mut Vec<u8>),
    ) {
        let ad = seal_ad(self.library, change, self.key_id);
        let start = out.len();
        out.extend_from_slice(&self.key_id.to_be_bytes());
        out.extend_from_slice(change.0.as_bytes());
        // The nonce is chosen by the sealing step; its place is filled in after.
        out.extend_from_slice(&[0u8; crate::xchacha::NONCE_LEN]);
        write_plain(out);
        // Encryption of an in-memory buffer with a valid key fails only past ChaCha20's length
        // limit (256 GiB); records are capped at 1 MiB long before that. Should it ever fail,
        // the record is left without a tag, so it fails to open rather than leaking plaintext.
        let from = start + SEAL_HEADER_LEN;
        match crate::xchacha::seal_in_place(&self.key, &ad, out, from) {
            Some(nonce) => out[from - nonce.len()..from].copy_from_slice(&nonce),
            None => out.truncate(from),
        }
    }

    /// The change id in a sealed payload's header, without opening it.
    pub fn peek_change_id(sealed: &[u8]) -> Option<ChangeId> {
        let id: [u8; 16] = sealed.get(4..20)?.try_into().ok()?;
        Some(ChangeId(Uuid::from_bytes(id)))
    }

    /// The key id a sealed record names, if this sealer does not hold that key (`None`: it
    /// holds it, or the record is too short to name one).
    pub fn unknown_key(&self, sealed: &[u8]) -> Option<u32> {
        let key_id = u32::from_be_bytes(sealed.get(..4)?.try_into().ok()?);
        let held = key_id == self.key_id || self.older.iter().any(|(id, _)| *id == key_id);
        (!held).then_some(key_id)
    }

    /// The keys that bind log pages to their positions (see [`crate::binding`]).
    pub fn page_keys(&self) -> &crate::binding::PageKeys {
        &self.pages
    }

    /// Opens a sealed payload; any tampering, truncation or foreign key is an error.
    pub fn open(&self, sealed: &[u8]) -> Result<(ChangeId, Vec<u8>), String> {
        if sealed.len() < SEAL_HEADER_LEN + SEAL_TAG_LEN {
            return Err(format!("sealed payload too short ({} bytes)", sealed.len()));
        }
        let key_id = u32::from_be_bytes([sealed[0], sealed[1], sealed[2], sealed[3]]);
        let key = if key_id == self.key_id {
            &self.key
        } else {
            self.older
                .iter()
                .find(|(id, _)| *id == key_id)
                .map(|(_, k)| k)
                .ok_or_else(|| format!("sealed with unknown key id {key_id}"))?
        };
        let change = Self::peek_change_id(sealed).ok_or("short header")?;
        let nonce: &[u8; crate::xchacha::NONCE_LEN] = sealed
            .get(20..SEAL_HEADER_LEN)
            .and_then(|n| n.try_into().ok())
            .ok_or("short header")?;
        let ad = seal_ad(self.library, change, key_id);
        let plain = crate::xchacha::open(key, nonce, &ad, &sealed[SEAL_HEADER_LEN..])
            .ok_or_else(|| "payload failed to open (tampered or foreign)".to_string())?;
        Ok((change, plain))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn library() -> LibraryId {
        LibraryId(Uuid::new_v4())
    }

    #[test]
    fn wrap_unwrap_and_wrong_password() {
        let lib = library();
        let key = LibraryKey::generate();
        let wrapped = key
            .wrap(lib, "hunter2", KdfParams::INSECURE_FAST)
            .expect("wraps");
        let back = LibraryKey::unwrap_with(&wrapped, lib, "hunter2").expect("unwraps");
        assert_eq!(back.bytes, key.bytes);
        assert!(matches!(
            LibraryKey::unwrap_with(&wrapped, lib, "hunter3"),
            Err(JournalError::WrongPassword)
        ));
        assert!(matches!(
            LibraryKey::unwrap_with(&wrapped, library(), "hunter2"),
            Err(JournalError::WrongPassword)
        ));
    }

    #[test]
    fn oversized_kdf_params_are_refused_before_hashing() {
        let lib = library();
        let key = LibraryKey::generate();
        let mut wrapped = key
            .wrap(lib, "pw", KdfParams::INSECURE_FAST)
            .expect("wraps");
        wrapped.kdf.m_kib = u32::MAX;
        assert!(matches!(
            LibraryKey::unwrap_with(&wrapped, lib, "pw"),
            Err(JournalError::KdfParamsOutOfRange(_))
        ));
    }

    #[test]
    fn sealed_payload_is_bound_to_its_change() {
        let lib = library();
        let sealer = LibraryKey::generate().sealer(lib);
        let id = ChangeId::new();
        let sealed = sealer.seal(id, b"hello");
        assert_eq!(
            sealer.open(&sealed).expect("opens"),
            (id, b"hello".to_vec())
        );
        let mut moved = sealed.clone();
        moved[4..20].copy_from_slice(ChangeId::new().0.as_bytes());
        assert!(sealer.open(&moved).is_err());
        let mut flipped = sealed;
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert!(sealer.open(&flipped).is_err());
    }

    /// Issue 24: revocation rotates the library key. Records sealed after it cannot be opened
    /// with the keys a revoked device holds; old records keep their key id and still open.
    #[test]
    fn a_rotated_key_seals_what_the_old_keys_cannot_open() {
        let lib = library();
        let first = LibraryKey::generate();
        let old = first.sealer(lib);
        let before = old.seal(ChangeId::new(), b"before");
        let next = first.rotated();
        assert_eq!(next.generation(), 1);
        assert_ne!(next.key_id(), first.key_id());
        let after = next.sealer(lib).seal(ChangeId::new(), b"after");
        assert!(
            old.open(&after).is_err(),
            "the revoked device's key opens it"
        );
        assert!(
            next.sealer(lib).open(&before).is_ok(),
            "old records still open"
        );
        // Another device learns the new key from a peer, and then opens both.
        let other = first
            .learn(&next.shared())
            .expect("learns")
            .expect("new keys");
        assert_eq!(other.key_id(), next.key_id(), "the newest key is current");
        assert!(other.sealer(lib).open(&after).is_ok());
        assert!(other.learn(&next.shared()).expect("learns").is_none());
        // Pairing hands over every key; library.toml chains them under the wrapped one.
        let joined = LibraryKey::from_bytes(&next.to_bytes()).expect("decodes");
        assert_eq!(joined.key_ids(), next.key_ids());
        let chained = next
            .chain(lib, first.key_id(), next.key_id())
            .expect("chains");
        let reopened = first.clone().unchain(lib, &[chained]).expect("unchains");
        assert_eq!(reopened.key_id(), next.key_id());
    }

    #[test]
    fn keys_from_a_peer_that_contradict_the_held_ones_are_refused() {
        let first = LibraryKey::generate();
        let mut forged = first.shared();
        forged[0].bytes = vec![9; 32];
        assert!(matches!(
            first.learn(&forged),
            Err(JournalError::KeyConflict(_))
        ));
        let far = SharedKey {
            key_id: 77,
            generation: u32::MAX,
            bytes: vec![1; 32],
        };
        assert!(matches!(
            first.learn(&[far]),
            Err(JournalError::KeyConflict(_))
        ));
        let many: Vec<SharedKey> = (0..LIBRARY_KEYS_MAX as u32)
            .map(|i| SharedKey {
                key_id: 100 + i,
                generation: 1,
                bytes: vec![2; 32],
            })
            .collect();
        assert!(first.learn(&many).is_err());
    }
}
