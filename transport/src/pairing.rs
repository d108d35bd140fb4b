//! Pairing: a short code shown on the inviting device, SPAKE2 over that code, bound to the
//! connection and to both certificates, with key confirmation; then the library key travels
//! sealed under the session key. Failed attempts are rate limited per address and a code is void
//! after [`CODE_FAILURES_MAX`] failures; a library has a device limit; the inviting user confirms.
//!
//! The protocol here is transport-independent: [`Joiner`] and [`Inviter`] turn
//! [`PairingMessage`]s into the next message. Time comes in as a parameter.

use std::collections::HashMap;
use std::net::IpAddr;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use keel_schema::{DeviceId, LibraryId};
use rand::{Rng, RngExt};
use serde_bytes::ByteBuf;
use spake2::{Ed25519Group, Identity as SpakeIdentity, Password, Spake2};

use crate::message::PairingMessage;

/// How long a code stays valid.
pub const CODE_TTL_MS: u64 = 5 * 60 * 1000;
/// Failed attempts after which a code is void.
pub const CODE_FAILURES_MAX: u32 = 5;
/// Failed attempts allowed per address within [`RATE_WINDOW_MS`].
pub const RATE_FAILURES_MAX: u32 = 3;
/// The rate-limiting window.
pub const RATE_WINDOW_MS: u64 = 60 * 1000;
/// Default device limit of a library.
pub const DEVICE_LIMIT_DEFAULT: usize = 16;

/// Why pairing failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PairingError {
    /// The code is wrong (key confirmation failed).
    #[error("wrong pairing code")]
    WrongCode,
    /// The code has expired.
    #[error("the pairing code has expired")]
    Expired,
    /// The code was voided after too many failures.
    #[error("the pairing code was voided after too many failed attempts")]
    Voided,
    /// Too many failures from this address recently.
    #[error("too many failed attempts from this address; try again later")]
    RateLimited,
    /// The library has reached its device limit.
    #[error("the library already has its maximum of {0} devices")]
    DeviceLimit(usize),
    /// The inviting user declined.
    #[error("the other device's user declined")]
    Declined,
    /// The device at that address has no open invitation (its code expired, was used or was
    /// voided): it refused the connection.
    #[error("that device has no open invitation (the code may have expired or been used)")]
    NoInvitation,
    /// The peer sent something out of order or malformed.
    #[error("pairing protocol error: {0}")]
    Protocol(String),
}

/// A pairing code: 8 digits, shown as `1234-5678`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PairingCode(String);

impl PairingCode {
    /// A fresh random code.
    pub fn generate() -> Self {
        let n: u32 = rand::rng().random_range(0..100_000_000);
        Self(format!("{:04}-{:04}", n / 10_000, n % 10_000))
    }

    /// Parses what a user typed (digits, with or without the dash).
    pub fn parse(text: &str) -> Option<Self> {
        let digits: String = text.chars().filter(|c| c.is_ascii_digit()).collect();
        let only_digits_and_dashes = text
            .chars()
            .all(|c| c.is_ascii_digit() || c == '-' || c == ' ');
        (digits.len() == 8 && only_digits_and_dashes)
            .then(|| Self(format!("{}-{}", &digits[..4], &digits[4..])))
    }

    /// The display form.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What binds a pairing run to one connection: the TLS exporter value and both device ids.
#[derive(Clone, Debug)]
pub struct Binding {
    /// TLS keying-material exporter output for this connection (same on both sides).
    pub exporter: [u8; 32],
    /// The inviting device (server side).
    pub inviter: DeviceId,
    /// The joining device (client side).
    pub joiner: DeviceId,
}

impl Binding {
    fn transcript(&self) -> Vec<u8> {
        let mut t = b"keel pairing v1".to_vec();
        t.extend_from_slice(&self.exporter);
        t.extend_from_slice(&self.inviter.0);
        t.extend_from_slice(&self.joiner.0);
        t
    }
}

fn start(code: &PairingCode, binding: &Binding) -> (Spake2<Ed25519Group>, Vec<u8>) {
    Spake2::<Ed25519Group>::start_symmetric(
        &Password::new(code.as_str().as_bytes()),
        &SpakeIdentity::new(&binding.transcript()),
    )
}

fn confirm_mac(key: &[u8; 32], role: &[u8], binding: &Binding) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new_keyed(key);
    hasher.update(role);
    hasher.update(&binding.transcript());
    *hasher.finalize().as_bytes()
}

fn session_key(raw: &[u8]) -> [u8; 32] {
    blake3::derive_key("keel pairing v1 session key", raw)
}

fn seal_key(session: &[u8; 32], library: LibraryId, key: &[u8]) -> Vec<u8> {
    let k = blake3::derive_key("keel pairing v1 key transfer", session);
    let mut nonce = [0u8; 24];
    rand::rng().fill_bytes(&mut nonce);
    let cipher = XChaCha20Poly1305::new((&k).into());
    let sealed = cipher
        .encrypt(
            XNonce::from_slice(&nonce),
            Payload {
                msg: key,
                aad: library.0.as_bytes(),
            },
        )
        .unwrap_or_default();
    let mut out = nonce.to_vec();
    out.extend_from_slice(&sealed);
    out
}

fn open_key(session: &[u8; 32], library: LibraryId, sealed: &[u8]) -> Option<Vec<u8>> {
    let k = blake3::derive_key("keel pairing v1 key transfer", session);
    let (nonce, body) = (sealed.get(..24)?, sealed.get(24..)?);
    let cipher = XChaCha20Poly1305::new((&k).into());
    cipher
        .decrypt(
            XNonce::from_slice(nonce),
            Payload {
                msg: body,
                aad: library.0.as_bytes(),
            },
        )
        .ok()
}

/// The joining side of one pairing run.
pub struct Joiner {
    binding: Binding,
    spake: Option<Spake2<Ed25519Group>>,
    session: Option<[u8; 32]>,
}

impl std::fmt::Debug for Joiner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Joiner")
    }
}

/// What a successful join yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Joined {
    /// The library.
    pub library: LibraryId,
    /// Its name.
    pub name: String,
    /// The library key (to wrap under this device's password).
    pub key: Vec<u8>,
    /// The inviting device, to pin.
    pub inviter: DeviceId,
}

impl Joiner {
    /// Starts: returns the joiner and its first message.
    pub fn start(code: &PairingCode, binding: Binding, name: &str) -> (Self, PairingMessage) {
        let (spake, msg) = start(code, &binding);
        (
            Self {
                binding,
                spake: Some(spake),
                session: None,
            },
            PairingMessage::Start {
                spake: ByteBuf::from(msg),
                name: name.chars().take(64).collect(),
            },
        )
    }

    /// Takes the inviter's reply; returns the key-confirmation message.
    pub fn on_reply(&mut self, reply: &PairingMessage) -> Result<PairingMessage, PairingError> {
        let PairingMessage::Reply { spake } = reply else {
            return Err(rejected_or_protocol(reply));
        };
        let state = self
            .spake
            .take()
            .ok_or_else(|| PairingError::Protocol("reply twice".into()))?;
        let raw = state
            .finish(spake)
            .map_err(|_| PairingError::Protocol("bad SPAKE2 message".into()))?;
        let session = session_key(&raw);
        self.session = Some(session);
        Ok(PairingMessage::Confirm {
            mac: ByteBuf::from(confirm_mac(&session, b"joiner", &self.binding).to_vec()),
        })
    }

    /// Takes the inviter's verdict.
    pub fn on_verdict(&self, verdict: &PairingMessage) -> Result<Joined, PairingError> {
        let PairingMessage::Accepted {
            library,
            name,
            sealed_key,
        } = verdict
        else {
            return Err(rejected_or_protocol(verdict));
        };
        let session = self
            .session
            .ok_or_else(|| PairingError::Protocol("verdict before reply".into()))?;
        // Only a holder of the session key (so of the code) can seal this: it authenticates the
        // inviter in turn.
        let key = open_key(&session, *library, sealed_key).ok_or(PairingError::WrongCode)?;
        Ok(Joined {
            library: *library,
            name: name.clone(),
            key,
            inviter: self.binding.inviter,
        })
    }
}

fn rejected_or_protocol(message: &PairingMessage) -> PairingError {
    match message {
        PairingMessage::Rejected { reason } => match reason.as_str() {
            "wrong code" => PairingError::WrongCode,
            "expired" => PairingError::Expired,
            "voided" => PairingError::Voided,
            "rate limited" => PairingError::RateLimited,
            "declined" => PairingError::Declined,
            "no invitation" => PairingError::NoInvitation,
            r if r.starts_with("device limit") => PairingError::DeviceLimit(
                r.rsplit(' ')
                    .next()
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0),
            ),
            other => PairingError::Protocol(other.to_string()),
        },
        _ => PairingError::Protocol("unexpected message".into()),
    }
}

fn reason(error: &PairingError) -> String {
    match error {
        PairingError::WrongCode => "wrong code".into(),
        PairingError::Expired => "expired".into(),
        PairingError::Voided => "voided".into(),
        PairingError::RateLimited => "rate limited".into(),
        PairingError::Declined => "declined".into(),
        PairingError::DeviceLimit(n) => format!("device limit {n}"),
        PairingError::NoInvitation => "no invitation".into(),
        PairingError::Protocol(p) => p.clone(),
    }
}

/// The inviting device's state: the open invitation, failure counts and rate limits.
#[derive(Debug)]
pub struct Inviter {
    code: PairingCode,
    expires_ms: u64,
    failures: u32,
    by_address: HashMap<IpAddr, Vec<u64>>,
    library: LibraryId,
    name: String,
    key: Vec<u8>,
    device_limit: usize,
}

/// One pairing run on the inviting side.
pub struct InviteRun {
    binding: Binding,
    address: IpAddr,
    joiner_name: String,
    spake: Option<Spake2<Ed25519Group>>,
    session: Option<[u8; 32]>,
    proven: Option<[u8; 32]>,
}

impl std::fmt::Debug for InviteRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "InviteRun({})", self.joiner_name)
    }
}

impl InviteRun {
    /// The name the joining device gave.
    pub fn joiner_name(&self) -> &str {
        &self.joiner_name
    }

    /// The joining device.
    pub fn joiner(&self) -> DeviceId {
        self.binding.joiner
    }
}

impl Inviter {
    /// Opens an invitation for `library` at time `now_ms`.
    pub fn new(
        library: LibraryId,
        name: &str,
        key: Vec<u8>,
        device_limit: usize,
        now_ms: u64,
    ) -> Self {
        Self {
            code: PairingCode::generate(),
            expires_ms: now_ms + CODE_TTL_MS,
            failures: 0,
            by_address: HashMap::new(),
            library,
            name: name.into(),
            key,
            device_limit,
        }
    }

    /// Makes the code expire `ttl_ms` after `now_ms` instead of the default.
    pub fn expiring(mut self, now_ms: u64, ttl_ms: u64) -> Self {
        self.expires_ms = now_ms + ttl_ms;
        self
    }

    /// The code to show.
    pub fn code(&self) -> &PairingCode {
        &self.code
    }

    fn refuse(&self, address: IpAddr, now_ms: u64) -> Option<PairingError> {
        if self.failures >= CODE_FAILURES_MAX {
            return Some(PairingError::Voided);
        }
        if now_ms >= self.expires_ms {
            return Some(PairingError::Expired);
        }
        let recent = self
            .by_address
            .get(&address)
            .map(|t| t.iter().filter(|&&at| at + RATE_WINDOW_MS > now_ms).count())
            .unwrap_or(0);
        (recent as u32 >= RATE_FAILURES_MAX).then_some(PairingError::RateLimited)
    }

    /// A joiner's first message: returns the run and the reply, or a rejection to send.
    pub fn on_start(
        &mut self,
        start_message: &PairingMessage,
        binding: Binding,
        address: IpAddr,
        now_ms: u64,
    ) -> Result<(InviteRun, PairingMessage), PairingMessage> {
        if let Some(e) = self.refuse(address, now_ms) {
            return Err(PairingMessage::Rejected { reason: reason(&e) });
        }
        let PairingMessage::Start { spake, name } = start_message else {
            return Err(PairingMessage::Rejected {
                reason: "unexpected message".into(),
            });
        };
        let (state, reply) = start(&self.code, &binding);
        let raw = state.finish(spake).map_err(|_| PairingMessage::Rejected {
            reason: "bad SPAKE2 message".into(),
        })?;
        Ok((
            InviteRun {
                binding,
                address,
                joiner_name: name.clone(),
                spake: None,
                session: Some(session_key(&raw)),
                proven: None,
            },
            PairingMessage::Reply {
                spake: ByteBuf::from(reply),
            },
        ))
    }

    /// The joiner's key confirmation; `confirm_user` asks the local user (true = accept) and
    /// `devices` is how many devices the library has now. Returns the verdict to send and, on
    /// success, the device to pin.
    pub fn on_confirm(
        &mut self,
        run: &mut InviteRun,
        confirm: &PairingMessage,
        devices: usize,
        confirm_user: impl FnOnce(&str, DeviceId) -> bool,
        now_ms: u64,
    ) -> (PairingMessage, Result<DeviceId, PairingError>) {
        let outcome = self.check_confirm(run, confirm, devices, confirm_user, now_ms);
        match outcome {
            Ok(session) => (
                PairingMessage::Accepted {
                    library: self.library,
                    name: self.name.clone(),
                    sealed_key: ByteBuf::from(seal_key(&session, self.library, &self.key)),
                },
                Ok(run.binding.joiner),
            ),
            Err(e) => (PairingMessage::Rejected { reason: reason(&e) }, Err(e)),
        }
    }

    /// Confirmation in two steps, for an inviting user who answers asynchronously: first check
    /// the joiner's proof of the code and the device limit (the user is never asked about a
    /// wrong code)…
    pub fn check_proof(
        &mut self,
        run: &mut InviteRun,
        confirm: &PairingMessage,
        devices: usize,
        now_ms: u64,
    ) -> Result<(), (PairingMessage, PairingError)> {
        match self.check_confirm(run, confirm, devices, |_, _| true, now_ms) {
            Ok(session) => {
                run.proven = Some(session);
                Ok(())
            }
            Err(e) => Err((PairingMessage::Rejected { reason: reason(&e) }, e)),
        }
    }

    /// …then apply the user's answer: the verdict to send and, if accepted, the device to pin.
    pub fn decide(
        &self,
        run: &mut InviteRun,
        accepted: bool,
    ) -> (PairingMessage, Result<DeviceId, PairingError>) {
        match run.proven.take() {
            Some(session) if accepted => (
                PairingMessage::Accepted {
                    library: self.library,
                    name: self.name.clone(),
                    sealed_key: ByteBuf::from(seal_key(&session, self.library, &self.key)),
                },
                Ok(run.binding.joiner),
            ),
            Some(_) => (
                PairingMessage::Rejected {
                    reason: reason(&PairingError::Declined),
                },
                Err(PairingError::Declined),
            ),
            None => {
                let e = PairingError::Protocol("decide before a proven code".into());
                (PairingMessage::Rejected { reason: reason(&e) }, Err(e))
            }
        }
    }

    fn check_confirm(
        &mut self,
        run: &mut InviteRun,
        confirm: &PairingMessage,
        devices: usize,
        confirm_user: impl FnOnce(&str, DeviceId) -> bool,
        now_ms: u64,
    ) -> Result<[u8; 32], PairingError> {
        if let Some(e) = self.refuse(run.address, now_ms) {
            return Err(e);
        }
        let PairingMessage::Confirm { mac } = confirm else {
            return Err(PairingError::Protocol("unexpected message".into()));
        };
        let session = run
            .session
            .take()
            .ok_or_else(|| PairingError::Protocol("confirm twice".into()))?;
        let _ = run.spake.take();
        let expected = confirm_mac(&session, b"joiner", &run.binding);
        if !constant_time_eq(&expected, mac) {
            self.failures += 1;
            self.by_address.entry(run.address).or_default().push(now_ms);
            return Err(if self.failures >= CODE_FAILURES_MAX {
                PairingError::Voided
            } else {
                PairingError::WrongCode
            });
        }
        if devices >= self.device_limit {
            return Err(PairingError::DeviceLimit(self.device_limit));
        }
        if !confirm_user(&run.joiner_name, run.binding.joiner) {
            return Err(PairingError::Declined);
        }
        Ok(session)
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
