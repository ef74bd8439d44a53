//! TLS setup shared by the registry client and (later) the QUIC data plane: Beacon uses
//! rustls with the `ring` provider everywhere, installed once per process.

/// Installs `ring` as the process-wide rustls provider; later calls are no-ops.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
