//! How a sidecar checks the server it reached through an east-west gateway: the certificate
//! chains to the mesh's shared root and names the service the client meant to call, whatever
//! SNI it sent (the SNI, `outbound_.8000_._.httpbin.bar.global`, names a route through the
//! gateway, not a certificate). Used by the gateway's end-to-end tests and by kind-tests'
//! sidecar stand-in and demo.

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

/// Why a [`ServiceIdentityVerifier`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("the mesh root cannot verify servers: {0}; is root-cert.pem a CA certificate?")]
    Roots(#[from] rustls::client::VerifierBuilderError),
    #[error("{name:?} is not a DNS name a service certificate could carry")]
    Identity { name: String },
}

/// Verifies the server against the mesh root and the expected service identity (a DNS name
/// in its certificate, e.g. `httpbin.bar.svc.cluster.local`), ignoring the SNI sent.
#[derive(Debug)]
pub struct ServiceIdentityVerifier {
    webpki: Arc<WebPkiServerVerifier>,
    expect: ServerName<'static>,
}

impl ServiceIdentityVerifier {
    pub fn new(
        roots: Arc<RootCertStore>,
        provider: Arc<CryptoProvider>,
        expect: &str,
    ) -> Result<Arc<Self>, TlsError> {
        let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider).build()?;
        let expect = ServerName::try_from(expect.to_string()).map_err(|_| TlsError::Identity {
            name: expect.into(),
        })?;
        Ok(Arc::new(ServiceIdentityVerifier { webpki, expect }))
    }
}

impl ServerCertVerifier for ServiceIdentityVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _sni: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.webpki
            .verify_server_cert(end_entity, intermediates, &self.expect, ocsp, now)
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    use rustls::pki_types::PrivateKeyDer;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn provider() -> Arc<CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    /// A root, and a server leaf for `dns` signed by it.
    fn pki(dns: &str) -> (Arc<RootCertStore>, Arc<rustls::ServerConfig>) {
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let root = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
        let key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec![dns.to_string()])
            .unwrap()
            .signed_by(&key, &root)
            .unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(root.der().clone()).unwrap();
        let server = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
            )
            .unwrap();
        (Arc::new(roots), Arc::new(server))
    }

    /// A real handshake over 127.0.0.1 with Istio's SNI; the server's identity decides.
    async fn handshake(server_name: &str, expect: &str) -> Result<(), std::io::Error> {
        let (roots, server) = pki(server_name);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(server);
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            if let Ok(mut tls) = acceptor.accept(tcp).await {
                let _ = tls.write_all(b"hi").await;
                let _ = tls.shutdown().await;
            }
        });
        let verifier = ServiceIdentityVerifier::new(roots, provider(), expect).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        let sni = ServerName::try_from("outbound_.8000_._.httpbin.bar.global").unwrap();
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(client))
            .connect(sni, tcp)
            .await?;
        let mut got = Vec::new();
        tls.read_to_end(&mut got).await?;
        assert_eq!(got, b"hi");
        Ok(())
    }

    #[tokio::test]
    async fn the_service_identity_decides_not_the_sni() {
        let svc = "httpbin.bar.svc.cluster.local";
        handshake(svc, svc).await.expect("the expected service");
        let e = handshake("ratings.bar.svc.cluster.local", svc)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("not valid for name"), "{e}");
    }

    #[test]
    fn a_bad_identity_is_reported() {
        let (roots, _) = pki("a.b");
        let e = ServiceIdentityVerifier::new(roots, provider(), "not a name").unwrap_err();
        assert!(matches!(e, TlsError::Identity { .. }), "{e}");
    }
}
