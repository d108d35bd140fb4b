//! Test devices with real keys, whose changes attestations vouch for (decision 0043).

use std::sync::Mutex;

use keel_projections::{Projections, Signer};
use keel_schema::{Attestation, Change, ChangeId, DeviceId, Entry, EntryKind, Hlc, Syncable};
use uuid::Uuid;

static SIGNERS: Mutex<Vec<Signer>> = Mutex::new(Vec::new());

/// A new device with a real key pair (its id is its certificate's SHA-256).
pub(crate) fn device() -> DeviceId {
    let certified =
        rcgen::generate_simple_self_signed(vec!["test.keel".into()]).expect("a certificate");
    let signer =
        Signer::new(certified.cert.der(), &certified.key_pair.serialize_der()).expect("a signer");
    let id = signer.device();
    SIGNERS.lock().expect("signers").push(signer);
    id
}

/// The attestations that vouch for `changes`, by the test devices that made them: to apply
/// before them, as they come before them in a log.
pub(crate) fn attestations(changes: &[Change]) -> Vec<Change> {
    let attestation = keel_schema::code_of::<Attestation>();
    let signers = SIGNERS.lock().expect("signers");
    let mut out = Vec::new();
    for signer in signers.iter() {
        let stamp = || {
            let hlc = Hlc {
                physical_ms: 1,
                counter: 0,
                device: signer.device(),
            };
            (ChangeId::new(), hlc)
        };
        let signed = signer.attest(changes.to_vec(), stamp).expect("signs");
        out.extend(signed.into_iter().take_while(|c| c.model == attestation));
    }
    out
}

/// Applies the attestations of `changes` to `p` (a batch of their own).
#[allow(dead_code)]
pub(crate) fn vouch(p: &mut Projections, changes: &[Change]) {
    p.apply(&attestations(changes), None)
        .expect("attestations apply");
}

/// Applying with the attestations first, as a log delivers them.
#[allow(dead_code)]
pub(crate) trait ApplyVouched {
    /// Applies the attestations of `changes` (a batch of their own), then `changes`.
    fn apply_vouched(
        &mut self,
        changes: &[Change],
        position: Option<keel_projections::AppliedPosition>,
    ) -> Result<keel_projections::ApplyStats, keel_projections::ProjectionError>;
}

impl ApplyVouched for Projections {
    fn apply_vouched(
        &mut self,
        changes: &[Change],
        position: Option<keel_projections::AppliedPosition>,
    ) -> Result<keel_projections::ApplyStats, keel_projections::ProjectionError> {
        vouch(self, changes);
        self.apply(changes, position)
    }
}

/// Clock readings of one device, one millisecond apart.
#[allow(dead_code)]
pub(crate) struct Gen {
    /// The device.
    pub(crate) device: DeviceId,
    /// The last reading's milliseconds.
    pub(crate) ms: u64,
}

#[allow(dead_code)]
impl Gen {
    /// The next reading.
    pub(crate) fn hlc(&mut self) -> Hlc {
        self.ms += 1;
        Hlc {
            physical_ms: self.ms,
            counter: 0,
            device: self.device,
        }
    }

    /// An upsert of `record` at the next reading.
    pub(crate) fn upsert<M: Syncable>(&mut self, record: &M) -> Change {
        Change::upsert(ChangeId::new(), self.hlc(), record).expect("sync-ready")
    }
}

/// A file entry named `name` at the top of `location`, with no content.
#[allow(dead_code)]
pub(crate) fn entry(location: Uuid, name: &str) -> Entry {
    Entry {
        uuid: Some(Uuid::now_v7()),
        location,
        relative_path: String::new(),
        name: name.into(),
        kind: EntryKind::File.code(),
        size: 3,
        created_ms: 0,
        modified_ms: 5,
        content: None,
        metadata: None,
        inode: None,
        volume: None,
    }
}
