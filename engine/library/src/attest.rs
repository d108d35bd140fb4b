//! Signing this device's file facts (decision 0043): each commit's changes that the owner rule
//! guards go out behind an attestation that lists their digests, signed with the device key
//! ([`keel_projections::Signer`], beside the check).

use keel_projections::Signer;
use keel_schema::{Change, ChangeId, HlcClock};

use crate::config::DeviceIdentity;
use crate::error::EngineError;

/// The signer of `device`.
pub(crate) fn signer(
    device: &DeviceIdentity,
    path: &std::path::Path,
) -> Result<Signer, EngineError> {
    Signer::new(&device.cert_der, &device.key_der).map_err(|e| EngineError::BadDeviceIdentity {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// `changes` behind their attestations, stamped by `clock` at `now_ms`.
pub(crate) fn attest(
    signer: &Signer,
    clock: &mut HlcClock,
    now_ms: u64,
    changes: Vec<Change>,
) -> Result<Vec<Change>, EngineError> {
    Ok(signer.attest(changes, || (ChangeId::at(now_ms), clock.tick(now_ms)))?)
}
