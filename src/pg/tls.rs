//! The rustls client configuration behind each `sslmode`, for the regular
//! connections (tokio-postgres). The replication connections get the same settings
//! through pgwire-replication's own `TlsConfig` (see [`super::PgTarget::replication_tls`]).
//!
//! | sslmode     | chain verified | host name verified | plain text allowed          |
//! |-------------|----------------|--------------------|-----------------------------|
//! | disable     | —              | —                  | always                      |
//! | prefer      | no             | no                 | if the server refuses TLS   |
//! | require     | no             | no                 | no                          |
//! | verify-ca   | yes            | no                 | no                          |
//! | verify-full | yes            | yes                | no                          |
//!
//! Invariant: under verify-ca and verify-full the only trusted roots are the ones in
//! `sslrootcert`; nothing falls back to a weaker mode.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use super::{SslMode, TlsSettings};

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds the client configuration for `settings`, reading the certificate files now
/// (so that a rotated certificate is picked up by the next connection).
pub(super) fn client_config(settings: &TlsSettings) -> Result<ClientConfig, String> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?;
    let builder = match settings.mode {
        SslMode::VerifyFull => builder.with_root_certificates(root_store(settings)?),
        SslMode::VerifyCa => {
            let inner = WebPkiServerVerifier::builder_with_provider(
                Arc::new(root_store(settings)?),
                provider,
            )
            .build()
            .map_err(|e| format!("TLS setup: {e}"))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(ChainOnly { inner }))
        }
        SslMode::Disable | SslMode::Prefer | SslMode::Require => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification { provider })),
    };
    match (&settings.client_cert, &settings.client_key) {
        (Some(cert), Some(key)) => {
            let chain = certificates(cert, "sslcert")?;
            let private_key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| format!("cannot read the client key sslkey={}: {e}", key.display()))?;
            builder
                .with_client_auth_cert(chain, private_key)
                .map_err(|e| {
                    // rustls speaks of a "peer certificate" and shows its reason as Rust
                    // debug text; this one is the relay's own.
                    let reason = match &e {
                        rustls::Error::InvalidCertificate(rustls::CertificateError::Other(
                            other,
                        )) if format!("{other:?}").contains("UnsupportedCertVersion") => {
                            "it is an X.509 version 1 certificate, which the relay's TLS library \
                         (rustls) does not take: issue it as version 3 (`openssl x509 -req` \
                         with `-extfile` naming at least `basicConstraints=CA:FALSE`)"
                                .to_string()
                        }
                        rustls::Error::InvalidCertificate(reason) => format!("{reason:?}"),
                        other => other.to_string(),
                    };
                    format!(
                    "the client certificate sslcert={} and key sslkey={} cannot be used: {reason}",
                    cert.display(),
                    key.display()
                )
                })
        }
        (None, None) => Ok(builder.with_no_client_auth()),
        _ => Err("sslcert and sslkey must be given together".to_string()),
    }
}

fn certificates(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("cannot read {what}={}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{what}={} holds no PEM certificate",
            path.display()
        ));
    }
    Ok(certs)
}

fn root_store(settings: &TlsSettings) -> Result<RootCertStore, String> {
    let Some(path) = &settings.root_cert else {
        return Err(format!(
            "sslmode={} needs sslrootcert=/path/to/ca.pem (the CA that signed the server's certificate)",
            settings.mode
        ));
    };
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(certificates(path, "sslrootcert")?);
    if added == 0 {
        return Err(format!(
            "sslrootcert={} holds no usable CA certificate",
            path.display()
        ));
    }
    Ok(roots)
}

/// verify-ca: the chain must lead to a trusted root; the name in the certificate is
/// not compared with the host connected to.
#[derive(Debug)]
struct ChainOnly {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
            | Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// prefer and require: encryption against passive listeners only. The certificate is
/// not checked (libpq does the same), but the handshake signatures still are.
#[derive(Debug)]
struct NoVerification {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
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
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
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
