//! Certificate verifiers that accept only pinned device ids (mutual TLS), and still check every
//! handshake signature against the presented certificate.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};

use keel_schema::DeviceId;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, Error, SignatureScheme};

/// The set of device ids this device talks to. Shared so pairing can add to it while running.
/// While an invitation is open, unpinned devices may connect too — for pairing only.
#[derive(Debug, Clone, Default)]
pub struct Pins {
    inner: Arc<RwLock<HashSet<DeviceId>>>,
    pairing_open: Arc<std::sync::atomic::AtomicBool>,
}

impl Pins {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a device.
    pub fn pin(&self, device: DeviceId) {
        if let Ok(mut set) = self.inner.write() {
            set.insert(device);
        }
    }

    /// Removes a device (revocation).
    pub fn unpin(&self, device: DeviceId) {
        if let Ok(mut set) = self.inner.write() {
            set.remove(&device);
        }
    }

    /// Lets unpinned devices connect (to pair) or stops it.
    pub fn set_pairing_open(&self, open: bool) {
        self.pairing_open
            .store(open, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether unpinned devices may connect to pair.
    pub fn pairing_open(&self) -> bool {
        self.pairing_open.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Every pinned device.
    pub fn all(&self) -> Vec<DeviceId> {
        self.inner
            .read()
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Whether a device is pinned.
    pub fn contains(&self, device: &DeviceId) -> bool {
        self.inner
            .read()
            .map(|s| s.contains(device))
            .unwrap_or(false)
    }
}

/// Accepts a pinned device, or any device when `admit_unpinned` (to pair, nothing else).
fn check_pinned(pins: &Pins, cert: &CertificateDer<'_>, admit_unpinned: bool) -> Result<(), Error> {
    let device = DeviceId::of_certificate(cert.as_ref());
    if pins.contains(&device) || admit_unpinned {
        Ok(())
    } else {
        Err(Error::General(format!(
            "device {} is not paired",
            device.short()
        )))
    }
}

/// Verifies the peer of an outgoing connection (the server side of the handshake). An outgoing
/// connection reaches only pinned devices, whatever the invitation state: only the one a joiner
/// makes to pair (`admit_unpinned`) reaches a device it does not know yet, which the PAKE then
/// authenticates.
#[derive(Debug)]
pub(crate) struct PinnedServerVerifier {
    pub(crate) pins: Pins,
    pub(crate) admit_unpinned: bool,
    pub(crate) provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        check_pinned(&self.pins, end_entity, self.admit_unpinned)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Verifies the peer of an incoming connection (the client side of the handshake).
#[derive(Debug)]
pub(crate) struct PinnedClientVerifier {
    pub(crate) pins: Pins,
    pub(crate) provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for PinnedClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        // The inviting side admits unpinned devices while an invitation is open (to pair only).
        check_pinned(&self.pins, end_entity, self.pins.pairing_open())?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
