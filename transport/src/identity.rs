//! Device identity: a key pair and a self-signed certificate; the device id is the SHA-256 of the
//! certificate (DER).

use keel_schema::DeviceId;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::error::TransportError;

/// A device's TLS identity.
#[derive(Debug)]
pub struct Identity {
    cert: CertificateDer<'static>,
    key_der: Vec<u8>,
    device: DeviceId,
}

impl Identity {
    /// A fresh key pair and self-signed certificate.
    pub fn generate(name: &str) -> Result<Self, TransportError> {
        let certified = rcgen::generate_simple_self_signed(vec![format!("{name}.keel")])
            .map_err(|e| TransportError::Tls(e.to_string()))?;
        let cert = certified.cert.der().clone();
        let key_der = certified.key_pair.serialize_der();
        Ok(Self::from_parts(cert.to_vec(), key_der))
    }

    /// An identity from stored DER bytes (certificate and PKCS#8 key).
    pub fn from_parts(cert: Vec<u8>, key_der: Vec<u8>) -> Self {
        let device = DeviceId::of_certificate(&cert);
        Self {
            cert: CertificateDer::from(cert),
            key_der,
            device,
        }
    }

    /// The device id.
    pub fn device(&self) -> DeviceId {
        self.device
    }

    /// The certificate (DER).
    pub fn cert_der(&self) -> &[u8] {
        self.cert.as_ref()
    }

    /// The private key (PKCS#8 DER), for storing.
    pub fn key_der(&self) -> &[u8] {
        &self.key_der
    }

    pub(crate) fn cert(&self) -> CertificateDer<'static> {
        self.cert.clone()
    }

    pub(crate) fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }
}
