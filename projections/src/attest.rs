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

/// Digests in one generation of [`Attested`]: two are held at most, about 36 MB. An
/// attestation comes just before its members (in the same batch), so a digest is looked up
/// soon after it came; at 4M digests in one set (the bound before), a replay of 10M entries
/// held 142 MB for it and twice that while the set grew (decision 0069).
const GENERATION_DIGESTS: usize = 500_000;

/// The member digests of the attestations applied (and checked): the newest, in two
/// generations (when the current one is full it becomes the previous one, and the previous one
/// is dropped), and all of the table's newest once a change missed. Every digest taken in also
/// goes into a filter that can say a digest was never taken in, so that a change no attestation
/// lists (a forgery) is refused without a scan of the table, however many there are.
#[derive(Default)]
pub(crate) struct Attested {
    current: HashSet<[u8; DIGEST_LEN]>,
    previous: HashSet<[u8; DIGEST_LEN]>,
    /// Whether every attestation in the table has been read in since a generation was last
    /// dropped.
    loaded: bool,
    /// Whether a dropped generation held digests: only then can a digest be in the table and
    /// not here.
    evicted: bool,
    /// Every digest of the table and taken in since it was read (see [`Filter`]); built only
    /// for a table of more digests than two generations hold, the only kind that is scanned.
    ever: Filter,
    /// Scans of the table so far (what a forgery must not cost).
    scans: u64,
}

impl Attested {
    fn add(&mut self, members: &[u8]) {
        for digest in members.chunks_exact(DIGEST_LEN) {
            if self.current.len() >= GENERATION_DIGESTS {
                self.evicted |= !self.previous.is_empty();
                self.previous = std::mem::take(&mut self.current);
                self.loaded = false;
            }
            if let Ok(digest) = <[u8; DIGEST_LEN]>::try_from(digest) {
                self.current.insert(digest);
                if self.ever.is_built() && !self.ever.insert(&digest) {
                    // Full: the next miss reads the table into a filter twice the size.
                    self.loaded = false;
                }
            }
        }
    }

    /// Forgets that the table was read in (rows came into it another way).
    pub(crate) fn table_changed(&mut self) {
        self.loaded = false;
    }

    fn contains(&self, digest: &[u8; DIGEST_LEN]) -> bool {
        self.current.contains(digest) || self.previous.contains(digest)
    }

    /// Digests held now.
    #[cfg(test)]
    fn held(&self) -> usize {
        self.current.len() + self.previous.len()
    }
}

/// A Bloom filter of digests (which are uniform hashes already: their bytes are the probes):
/// "absent" is exact, "present" is wrong for about 0.3% of absent digests at the load it
/// allows (12 bits a digest, 8 probes). It grows by being built again at twice the size: when
/// full, [`Filter::insert`] says so and the caller reads the table into a new one.
#[derive(Default)]
struct Filter {
    bits: Vec<u64>,
    count: usize,
    /// Digests it takes before it is full.
    room: usize,
}

/// Bits per digest a filter is sized for, and its probes per digest.
const FILTER_BITS_PER_DIGEST: usize = 12;
const FILTER_PROBES: u64 = 8;
/// The smallest filter, in digests (12 KB).
const FILTER_MIN_DIGESTS: usize = 8_192;

impl Filter {
    /// The probes of `digest` into `words` words of bits: double hashing over its two halves.
    fn probes(words: usize, digest: &[u8; DIGEST_LEN]) -> impl Iterator<Item = usize> {
        let (a, b) = digest.split_at(8);
        let h1 = u64::from_le_bytes(a.try_into().unwrap_or_default());
        let h2 = u64::from_le_bytes(b.try_into().unwrap_or_default()) | 1;
        let m = (words * 64) as u64;
        (0..FILTER_PROBES).map(move |i| (h1.wrapping_add(i.wrapping_mul(h2)) % m) as usize)
    }

    /// An empty filter with room for `digests`.
    fn with_room(digests: usize) -> Self {
        let digests = digests.max(FILTER_MIN_DIGESTS);
        Filter {
            bits: vec![0; (digests * FILTER_BITS_PER_DIGEST).div_ceil(64)],
            count: 0,
            room: digests,
        }
    }

    /// Takes `digest` in; `false` if it held digests and was full: it is then built again,
    /// twice the size, holding this digest alone, and the caller reads the rest back in.
    fn insert(&mut self, digest: &[u8; DIGEST_LEN]) -> bool {
        let fits = self.count < self.room;
        let held = self.count > 0;
        if !fits {
            *self = Filter::with_room(self.room * 2);
        }
        for bit in Self::probes(self.bits.len(), digest) {
            self.bits[bit / 64] |= 1 << (bit % 64);
        }
        self.count += 1;
        fits || !held
    }

    /// Whether it was built (an empty default holds nothing and answers nothing).
    fn is_built(&self) -> bool {
        !self.bits.is_empty()
    }

    /// Whether `digest` may have been taken in (`false`: it never was). Only for a built one.
    fn may_hold(&self, digest: &[u8; DIGEST_LEN]) -> bool {
        debug_assert!(self.is_built(), "an unbuilt filter asked");
        self.is_built()
            && Self::probes(self.bits.len(), digest)
                .all(|bit| self.bits[bit / 64] & (1 << (bit % 64)) != 0)
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
        if self.attested.borrow().contains(&digest) {
            return Ok(true);
        }
        if !self.attested.borrow().loaded {
            self.load_attested()?;
            if self.attested.borrow().contains(&digest) {
                return Ok(true);
            }
        }
        // Older than what is held (a library past two generations): looked for in the table
        // itself before a refusal. A scan of the table, so only when digests were dropped and
        // the filter of every digest taken in may hold it.
        let attested = self.attested.borrow();
        if !attested.evicted || (attested.ever.is_built() && !attested.ever.may_hold(&digest)) {
            return Ok(false);
        }
        drop(attested);
        self.attested.borrow_mut().scans += 1;
        self.attested_in_table(&digest)
    }

    /// Whether an applied attestation lists `digest` (a scan of the table's members).
    fn attested_in_table(&self, digest: &[u8; DIGEST_LEN]) -> Result<bool, ProjectionError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT members FROM attestation WHERE members IS NOT NULL AND instr(members, ?1) > 0",
        )?;
        let mut rows = stmt.query([&digest[..]])?;
        while let Some(row) = rows.next()? {
            let members: Vec<u8> = row.get(0)?;
            if members.chunks_exact(DIGEST_LEN).any(|d| d == digest) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Reads every applied attestation's members, oldest first, so the newest stay held (once
    /// after a miss: after a restart, or on a device that joined with a copy of another's
    /// projections).
    fn load_attested(&self) -> Result<(), ProjectionError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT members FROM attestation WHERE members IS NOT NULL ORDER BY rowid",
        )?;
        let rows = stmt.query_map([], |r| r.get::<_, Vec<u8>>(0))?;
        let digests: i64 = self.conn.query_row(
            "SELECT COALESCE(SUM(length(members)), 0) FROM attestation",
            [],
            |r| r.get(0),
        )?;
        let digests = usize::try_from(digests).unwrap_or(0) / DIGEST_LEN;
        let mut attested = self.attested.borrow_mut();
        // Room for all of them and as many again: no growth (which forgets) while reading. A
        // table that two generations hold is never scanned, and needs none.
        attested.ever = if attested.evicted || digests > 2 * GENERATION_DIGESTS {
            Filter::with_room(digests.saturating_mul(2))
        } else {
            Filter::default()
        };
        for members in rows {
            attested.add(&members?);
        }
        attested.loaded = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(n: usize) -> [u8; DIGEST_LEN] {
        let mut d = [0u8; DIGEST_LEN];
        d[..8].copy_from_slice(&(n as u64).to_be_bytes());
        d
    }

    #[test]
    fn the_newest_digests_stay_held_and_no_more_than_two_generations() {
        let mut attested = Attested::default();
        let total = GENERATION_DIGESTS * 5 / 2;
        let members: Vec<u8> = (0..total).flat_map(digest).collect();
        for part in members.chunks(512 * DIGEST_LEN) {
            attested.add(part);
            assert!(
                attested.held() <= 2 * GENERATION_DIGESTS,
                "{}",
                attested.held()
            );
        }
        // The newest generation and the one before it whole; the oldest dropped.
        assert!((total - GENERATION_DIGESTS..total).all(|n| attested.contains(&digest(n))));
        assert!(!attested.contains(&digest(0)));
        assert!(
            !attested.loaded,
            "a dropped generation asks for the table again"
        );
    }

    /// A device that signs: its Device record and one of its locations, and the attestation
    /// that vouches for them, applied to a new projection in `dir`.
    struct Vouched {
        device: DeviceId,
        changes: Vec<Change>,
        vouching: Vec<Change>,
        projections: crate::Projections,
    }

    fn hlc(device: DeviceId, ms: u64) -> keel_schema::Hlc {
        keel_schema::Hlc {
            physical_ms: ms,
            counter: 0,
            device,
        }
    }

    /// A location of `device`'s, as a change made at `ms`.
    fn location(device: DeviceId, name: &str, ms: u64) -> Change {
        let location = keel_schema::Location {
            uuid: uuid::Uuid::now_v7(),
            device: device.record_uuid(),
            path: format!("/{name}"),
            name: name.into(),
            created_ms: 2,
        };
        Change::upsert(keel_schema::ChangeId::new(), hlc(device, ms), &location).expect("ready")
    }

    fn vouched(dir: &std::path::Path) -> Vouched {
        use keel_schema::{code_of, ChangeId, Device};
        let certified =
            rcgen::generate_simple_self_signed(vec!["test.keel".into()]).expect("a certificate");
        let signer = Signer::new(certified.cert.der(), &certified.key_pair.serialize_der())
            .expect("a signer");
        let b = signer.device();
        let device = Device {
            uuid: b.record_uuid(),
            device_id: b.to_hex(),
            name: "d".into(),
            os: "linux".into(),
            created_ms: 1,
        };
        let changes = vec![
            Change::upsert(ChangeId::new(), hlc(b, 1), &device).expect("ready"),
            location(b, "b", 2),
        ];
        let mut ms = 10;
        let vouching: Vec<Change> = signer
            .attest(changes.clone(), || {
                ms += 1;
                (ChangeId::new(), hlc(b, ms))
            })
            .expect("signs")
            .into_iter()
            .take_while(|c| c.model == code_of::<Attestation>())
            .collect();
        assert_eq!(vouching.len(), 1);
        let mut projections = crate::Projections::open(&dir.join("p.sqlite")).expect("opens");
        projections.apply(&vouching, None).expect("applies");
        Vouched {
            device: b,
            changes,
            vouching,
            projections,
        }
    }

    /// Applies 200 changes of `device`'s no attestation lists: each is refused, and the filter
    /// answers for them without a scan (but for its rare false positives).
    fn forgeries_cost_no_scan(p: &mut crate::Projections, device: DeviceId) {
        let scans = p.attested.borrow().scans;
        for i in 0..200 {
            let forged = location(device, "c", 100 + i);
            assert_eq!(p.apply(&[forged], None).expect("applies").refused, 1);
        }
        let forged_scans = p.attested.borrow().scans - scans;
        assert!(
            forged_scans <= 8,
            "200 forgeries scanned the table {forged_scans} times"
        );
    }

    #[test]
    fn a_member_whose_digest_is_no_longer_held_is_found_in_the_table() {
        let dir = tempfile::tempdir().expect("tempdir");
        let Vouched {
            device,
            changes,
            vouching,
            projections: mut p,
        } = vouched(dir.path());
        {
            // Two generations came after it, and the table was read since: its digests are in
            // the filter of a table past two generations, not in the generations.
            let mut held = p.attested.borrow_mut();
            held.current.clear();
            held.previous.clear();
            held.loaded = true;
            held.evicted = true;
            held.ever = Filter::with_room(0);
            let members = check(&vouching[0]).expect("a sound attestation");
            for digest in members.chunks_exact(DIGEST_LEN) {
                let digest = <[u8; DIGEST_LEN]>::try_from(digest).expect("whole");
                assert!(held.ever.insert(&digest));
            }
        }
        let stats = p.apply(&changes, None).expect("applies");
        assert_eq!(stats.refused, 0, "{stats:?}");
        assert!(
            p.attested.borrow().scans >= 1,
            "found by a scan of the table"
        );
        // Changes no attestation lists are still refused.
        forgeries_cost_no_scan(&mut p, device);
    }

    /// A process that reads a table past two generations (after a restart) builds the filter
    /// from it: the oldest digests, no longer held, are found by a scan, and forgeries cost
    /// none.
    #[test]
    fn a_table_past_two_generations_is_read_into_the_filter() {
        let dir = tempfile::tempdir().expect("tempdir");
        let Vouched {
            device,
            changes,
            projections: mut p,
            ..
        } = vouched(dir.path());
        // Newer attestations of more digests than two generations hold, as rows.
        let per_row = 1_000;
        let rows = (2 * GENERATION_DIGESTS + GENERATION_DIGESTS / 5) / per_row;
        {
            let mut insert = p
                .conn
                .prepare("INSERT INTO attestation (uuid, members, _live) VALUES (?1, ?2, 1)")
                .expect("prepares");
            for row in 0..rows {
                let members: Vec<u8> = (0..per_row)
                    .flat_map(|i| digest(1 + row * per_row + i))
                    .collect();
                insert
                    .execute((uuid::Uuid::now_v7().as_bytes().as_slice(), members))
                    .expect("inserts");
            }
        }
        // A process that has not read the table yet.
        *p.attested.borrow_mut() = Attested::default();
        let stats = p.apply(&changes, None).expect("applies");
        assert_eq!(stats.refused, 0, "{stats:?}");
        {
            let held = p.attested.borrow();
            assert!(
                held.evicted && held.ever.is_built(),
                "read past two generations"
            );
            assert!(held.ever.count > 2 * GENERATION_DIGESTS);
            assert!(held.scans >= 1, "the oldest digest was found by a scan");
        }
        forgeries_cost_no_scan(&mut p, device);
    }

    #[test]
    fn the_filter_never_forgets_a_digest_and_rarely_claims_one() {
        let mut filter = Filter::default();
        assert!(!filter.is_built());
        let random = |n: u64| {
            let mut d = [0u8; DIGEST_LEN];
            d.copy_from_slice(&blake3::hash(&n.to_le_bytes()).as_bytes()[..DIGEST_LEN]);
            d
        };
        assert!(filter.insert(&random(0)), "the first digest builds it");
        let room = filter.room;
        for n in 1..room as u64 {
            assert!(filter.insert(&random(n)));
        }
        assert!((0..room as u64).all(|n| filter.may_hold(&random(n))));
        let claimed = (1_000_000..1_100_000u64)
            .filter(|n| filter.may_hold(&random(*n)))
            .count();
        assert!(
            claimed < 1_000,
            "{claimed} of 100,000 absent digests claimed"
        );
        assert!(!filter.insert(&random(room as u64)), "full: built again");
        assert_eq!((filter.count, filter.room), (1, 2 * room));
    }
}
