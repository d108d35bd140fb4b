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
}

/// The library's secret key. Never written to disk unwrapped.
#[derive(Clone)]
pub struct LibraryKey {
    bytes: [u8; 32],
    key_id: u32,
}

impl Drop for LibraryKey {
    fn drop(&mut self) {
        // Key material does not outlive its holder in memory.
        zeroize::Zeroize::zeroize(&mut self.bytes);
    }
}

impl std::fmt::Debug for LibraryKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LibraryKey(id {})", self.key_id)
    }
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

fn hex_field(name: &str, text: &str) -> Result<Vec<u8>, JournalError> {
    hex::decode(text).map_err(|e| JournalError::BadKeyMaterial(format!("{name}: {e}")))
}

impl LibraryKey {
    /// A fresh random key with key id 1.
    pub fn generate() -> Self {
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        Self { bytes, key_id: 1 }
    }

    /// A key received from another device (pairing), with key id 1. `None` unless 32 bytes.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        Some(Self {
            bytes: bytes.try_into().ok()?,
            key_id: 1,
        })
    }

    /// The raw key, to hand to a device being paired (sealed under the pairing session key).
    pub fn to_bytes(&self) -> Vec<u8> {
        self.bytes.to_vec()
    }

    /// The key id written into sealed records.
    pub fn key_id(&self) -> u32 {
        self.key_id
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
        Ok(Self {
            bytes,
            key_id: wrapped.key_id,
        })
    }

    /// The sealer for log payloads (a per-purpose subkey).
    pub fn sealer(&self, library: LibraryId) -> Sealer {
        let subkey = blake3::derive_key("keel 2026-11 log payload sealing v1", &self.bytes);
        Sealer {
            library,
            key_id: self.key_id,
            key: subkey,
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

    /// Opens a sealed payload; any tampering, truncation or foreign key is an error.
    pub fn open(&self, sealed: &[u8]) -> Result<(ChangeId, Vec<u8>), String> {
        if sealed.len() < SEAL_HEADER_LEN + SEAL_TAG_LEN {
            return Err(format!("sealed payload too short ({} bytes)", sealed.len()));
        }
        let key_id = u32::from_be_bytes([sealed[0], sealed[1], sealed[2], sealed[3]]);
        if key_id != self.key_id {
            return Err(format!("sealed with unknown key id {key_id}"));
        }
        let change = Self::peek_change_id(sealed).ok_or("short header")?;
        let nonce: &[u8; crate::xchacha::NONCE_LEN] = sealed
            .get(20..SEAL_HEADER_LEN)
            .and_then(|n| n.try_into().ok())
            .ok_or("short header")?;
        let ad = seal_ad(self.library, change, key_id);
        let plain = crate::xchacha::open(&self.key, nonce, &ad, &sealed[SEAL_HEADER_LEN..])
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
}
