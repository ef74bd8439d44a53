//! TLS for the data plane without a CA: each side's certificate is self-signed with its
//! ed25519 identity key, and each side checks that the key in the peer's certificate is the
//! key of the peer it expects (client) or records whose key it is (server). The TLS 1.3
//! handshake signature proves the peer holds that key.

use std::sync::Arc;

use beacon_proto::{Keypair, PeerId, PublicKey};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::NetError;

/// The ALPN protocol of the data plane.
pub const ALPN: &[u8] = beacon_proto::INFER_PROTOCOL.as_bytes();

/// PKCS#8 v1 prefix of an ed25519 private key (RFC 8410); the 32-byte seed follows.
const ED25519_PKCS8_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];
/// OID 1.3.101.112 (id-Ed25519).
const ED25519_OID: &str = "1.3.101.112";

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A self-signed certificate for `key` and the matching rustls private key.
pub fn certificate(
    key: &Keypair,
) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), NetError> {
    let mut pkcs8 = ED25519_PKCS8_PREFIX.to_vec();
    pkcs8.extend_from_slice(&key.secret_bytes()[..]);
    let der = PrivatePkcs8KeyDer::from(pkcs8);
    let signing = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&der, &rcgen::PKCS_ED25519)
        .map_err(|e| NetError::Tls(format!("identity key: {e}")))?;
    let mut params = rcgen::CertificateParams::new(vec!["beacon".to_string()])
        .map_err(|e| NetError::Tls(e.to_string()))?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, key.peer_id().to_string());
    let cert = params
        .self_signed(&signing)
        .map_err(|e| NetError::Tls(format!("certificate: {e}")))?;
    Ok((cert.der().clone(), PrivateKeyDer::Pkcs8(der)))
}

/// The ed25519 key a certificate carries, as a `PeerId`.
pub fn peer_of(cert: &CertificateDer<'_>) -> Result<PeerId, rustls::Error> {
    let bad = |m: &str| rustls::Error::General(format!("peer certificate: {m}"));
    let (_, parsed) =
        x509_parser::parse_x509_certificate(cert.as_ref()).map_err(|_| bad("not X.509"))?;
    let spki = &parsed.tbs_certificate.subject_pki;
    if spki.algorithm.algorithm.to_id_string() != ED25519_OID {
        return Err(bad("key is not ed25519"));
    }
    let bytes: [u8; 32] = spki
        .subject_public_key
        .data
        .as_ref()
        .try_into()
        .map_err(|_| bad("ed25519 key is not 32 bytes"))?;
    let key = PublicKey::from_bytes(&bytes).map_err(|_| bad("invalid ed25519 key"))?;
    Ok(key.to_peer_id())
}

fn algorithms() -> WebPkiSupportedAlgorithms {
    rustls::crypto::ring::default_provider().signature_verification_algorithms
}

/// Only ed25519 handshake signatures are accepted: certificates hold identity keys.
fn schemes() -> Vec<SignatureScheme> {
    vec![SignatureScheme::ED25519]
}

fn verify_tls13(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    rustls::crypto::verify_tls13_signature(message, cert, dss, &algorithms())
}

/// Client side: the server must present the key of `expected`.
#[derive(Debug)]
struct ExpectPeer {
    expected: PeerId,
}

impl ServerCertVerifier for ExpectPeer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if !intermediates.is_empty() {
            return Err(rustls::Error::General(
                "peer certificate: unexpected chain".into(),
            ));
        }
        let peer = peer_of(end_entity)?;
        if peer != self.expected {
            return Err(rustls::Error::General(format!(
                "peer is {peer}, expected {}",
                self.expected
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not used".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        schemes()
    }
}

/// Server side: any client with a valid ed25519 certificate may connect; its `PeerId` is
/// read from the certificate after the handshake.
#[derive(Debug)]
struct AnyPeer;

impl ClientCertVerifier for AnyPeer {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if !intermediates.is_empty() {
            return Err(rustls::Error::General(
                "peer certificate: unexpected chain".into(),
            ));
        }
        peer_of(end_entity)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not used".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        schemes()
    }
}

/// A node's data-plane certificate and key, made once from its identity.
pub struct TlsIdentity {
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
}

impl TlsIdentity {
    pub fn new(key: &Keypair) -> Result<Self, NetError> {
        let (cert, key) = certificate(key)?;
        Ok(TlsIdentity { cert, key })
    }
}

/// rustls configuration of a data-plane server with this identity.
pub fn server_config(id: &TlsIdentity) -> Result<rustls::ServerConfig, NetError> {
    let (cert, private) = (id.cert.clone(), id.key.clone_key());
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| NetError::Tls(e.to_string()))?
        .with_client_cert_verifier(Arc::new(AnyPeer))
        .with_single_cert(vec![cert], private)
        .map_err(|e| NetError::Tls(e.to_string()))?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

/// rustls configuration of a data-plane client with this identity that only talks to
/// `expected`.
pub fn client_config(id: &TlsIdentity, expected: PeerId) -> Result<rustls::ClientConfig, NetError> {
    let (cert, private) = (id.cert.clone(), id.key.clone_key());
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| NetError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ExpectPeer { expected }))
        .with_client_auth_cert(vec![cert], private)
        .map_err(|e| NetError::Tls(e.to_string()))?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_carries_the_identity_key() {
        let key = Keypair::generate();
        let (cert, _) = certificate(&key).unwrap();
        assert_eq!(peer_of(&cert).unwrap(), key.peer_id());
        let other = Keypair::generate();
        assert_ne!(peer_of(&cert).unwrap(), other.peer_id());
        assert!(peer_of(&CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00])).is_err());
    }
}
