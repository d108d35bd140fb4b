//! Checking attestations at apply time (decision 0043): a change the owner rule guards is
//! applied only if an attestation of its origin, with a valid signature by that device's key,
//! lists its digest. Attestations are committed before their members and sort first in a batch,
//! so the digests are here when the members come; a change none vouches for was not made by
//! the device it names, and is refused like any other owner-rule refusal.

use std::collections::HashSet;

use keel_schema::attestation::{
    member_digest, needs_attestation, signed_message, DIGEST_LEN, MEMBERS_MAX,
};
use keel_schema::{Attestation, Change, ChangeId, DeviceId, Hlc, Op, Syncable, Value};
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};

use crate::apply::Applier;
use crate::error::ProjectionError;

/// A device's signer of attestations: its TLS key (ECDSA P-256) and certificate.
pub struct Signer {
    key: EcdsaKeyPair,
    cert: Vec<u8>,
    device: DeviceId,
    rng: SystemRandom,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Signer({})", self.device.short())
    }
}

impl Signer {
    /// The signer of the device with certificate `cert_der` and key `key_der` (PKCS#8).
    pub fn new(cert_der: &[u8], key_der: &[u8]) -> Result<Self, ProjectionError> {
        let rng = SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, key_der, &rng)
            .map_err(|e| ProjectionError::Signing(format!("the device key cannot sign: {e}")))?;
        Ok(Self {
            key,
            cert: cert_der.to_vec(),
            device: DeviceId::of_certificate(cert_der),
            rng,
        })
    }

    /// The device it signs for.
    pub fn device(&self) -> DeviceId {
        self.device
    }

    /// `changes` behind the attestations of those that need one and were made by this device
    /// (at most [`MEMBERS_MAX`] each), each attestation stamped by `stamp`. Unchanged if none
    /// needs one.
    pub fn attest(
        &self,
        changes: Vec<Change>,
        mut stamp: impl FnMut() -> (ChangeId, Hlc),
    ) -> Result<Vec<Change>, ProjectionError> {
        let digests: Vec<[u8; DIGEST_LEN]> = changes
            .iter()
            .filter(|c| c.origin() == self.device && needs_attestation(c))
            .map(member_digest)
            .collect();
        if digests.is_empty() {
            return Ok(changes);
        }
        let mut out = Vec::with_capacity(changes.len() + digests.len().div_ceil(MEMBERS_MAX));
        for part in digests.chunks(MEMBERS_MAX) {
            let members: Vec<u8> = part.concat();
            let uuid = uuid::Uuid::new_v4();
            let signature = self
                .key
                .sign(&self.rng, &signed_message(self.device, uuid, &members))
                .map_err(|e| ProjectionError::Signing(format!("signing failed: {e}")))?;
            let record = Attestation {
                uuid,
                cert: self.cert.clone(),
                members,
                signature: signature.as_ref().to_vec(),
            };
            let (id, hlc) = stamp();
            out.extend(Change::upsert_owned(id, hlc, record));
        }
        out.extend(changes);
        Ok(out)
    }
}

/// Digests held in memory at most; past it they are dropped and read again from the
/// attestation table when a change misses.
const DIGESTS_HELD_MAX: usize = 4_000_000;

/// The member digests of the attestations applied (and checked): those applied by this process,
/// and all of the table's once a change missed.
#[derive(Default)]
pub(crate) struct Attested {
    digests: HashSet<[u8; DIGEST_LEN]>,
    /// Whether every attestation in the table has been read in.
    loaded: bool,
}

impl Attested {
    fn add(&mut self, members: &[u8]) {
        if self.digests.len() >= DIGESTS_HELD_MAX {
            self.digests.clear();
            self.loaded = false;
        }
        for digest in members.chunks_exact(DIGEST_LEN) {
            if let Ok(digest) = <[u8; DIGEST_LEN]>::try_from(digest) {
                self.digests.insert(digest);
            }
        }
    }
}

/// The field of an attestation change named `name`, as bytes.
fn bytes_field<'c>(change: &'c Change, name: &str) -> Option<&'c [u8]> {
    let index = Attestation::DEF.field_index(name)?;
    let Op::Upsert(fields) = &change.op else {
        return None;
    };
    fields.iter().find_map(|(i, v)| match v {
        Value::Bytes(b) if usize::from(*i) == index => Some(b.as_slice()),
        _ => None,
    })
}

/// Checks an attestation change: made by the device its certificate names, signed by that
/// device's key over its members. Returns the members, or why it is refused.
pub(crate) fn check(change: &Change) -> Result<&[u8], String> {
    let (Some(cert), Some(members), Some(signature)) = (
        bytes_field(change, "cert"),
        bytes_field(change, "members"),
        bytes_field(change, "signature"),
    ) else {
        return Err("an attestation must give its certificate, members and signature".into());
    };
    if DeviceId::of_certificate(cert) != change.origin() {
        return Err("the attestation's certificate is not its device's".into());
    }
    if members.len() % DIGEST_LEN != 0 {
        return Err("the attestation's members are not whole digests".into());
    }
    let der = rustls_pki_types::CertificateDer::from(cert);
    let cert = webpki::EndEntityCert::try_from(&der)
        .map_err(|e| format!("the attestation's certificate does not parse: {e}"))?;
    let message = signed_message(change.origin(), change.record, members);
    cert.verify_signature(webpki::ring::ECDSA_P256_SHA256, &message, signature)
        .map_err(|e| format!("the attestation's signature does not verify: {e}"))?;
    Ok(members)
}

impl Applier<'_> {
    /// Takes in the members of an attestation that passed [`check`].
    pub(crate) fn attested_add(&self, members: &[u8]) {
        self.attested.borrow_mut().add(members);
    }

    /// Whether an attestation of its origin vouches for `change`. A change taken back from
    /// `_parked` was checked before it was parked, and a part of a change split by the applier
    /// (the two-step apply) carries the id of a change that was checked.
    pub(crate) fn is_attested(&self, change: &Change) -> Result<bool, ProjectionError> {
        if self.checked.get() {
            return Ok(true);
        }
        let digest = member_digest(change);
        if self.attested.borrow().digests.contains(&digest) {
            return Ok(true);
        }
        if self.attested.borrow().loaded {
            return Ok(false);
        }
        self.load_attested()?;
        Ok(self.attested.borrow().digests.contains(&digest))
    }

    /// Reads every applied attestation's members (once, after a miss: after a restart, or on a
    /// device that joined with a copy of another's projections).
    fn load_attested(&self) -> Result<(), ProjectionError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT members FROM attestation WHERE members IS NOT NULL")?;
        let rows = stmt.query_map([], |r| r.get::<_, Vec<u8>>(0))?;
        let mut attested = self.attested.borrow_mut();
        for members in rows {
            attested.add(&members?);
        }
        attested.loaded = true;
        Ok(())
    }
}
