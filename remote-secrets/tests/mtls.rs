//! Certificates from `certs` chain to one root: two clusters' leaves complete a rustls mTLS
//! handshake, and an xDS client from cluster-2 reaches cluster-1's control plane over mTLS.

use std::path::Path;
use std::sync::Arc;

use remote_secrets::certs::{CertsCommand, run};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn make_certs(dir: &Path) {
    run(&CertsCommand::Root {
        out_dir: dir.to_path_buf(),
        org: "mesh".into(),
        days: 10,
        force: false,
    })
    .unwrap();
    for c in ["cluster-1", "cluster-2"] {
        run(&CertsCommand::Intermediate {
            cluster: c.into(),
            root_dir: dir.to_path_buf(),
            out_dir: Some(dir.join(c)),
            days: 10,
            print_secret: false,
            force: false,
        })
        .unwrap();
    }
    let leaf = |cluster: &str, sa: &str, out: &str, dns: Vec<String>| {
        run(&CertsCommand::Workload {
            spiffe: format!("spiffe://cluster.local/ns/istio-system/sa/{sa}"),
            ca_dir: dir.join(cluster),
            out_dir: dir.join(out),
            dns,
            days: 1,
            force: false,
        })
        .unwrap();
    };
    leaf(
        "cluster-1",
        "istiod",
        "server",
        vec!["istiod.istio-system.svc".into()],
    );
    leaf("cluster-2", "sleep", "client", vec![]);
}

fn chain(p: &Path) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_file_iter(p)
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

fn key(p: &Path) -> PrivateKeyDer<'static> {
    PrivateKeyDer::from_pem_file(p).unwrap()
}

fn roots(p: &Path) -> Arc<rustls::RootCertStore> {
    let mut r = rustls::RootCertStore::empty();
    for c in chain(p) {
        r.add(c).unwrap();
    }
    Arc::new(r)
}

#[tokio::test]
async fn leaves_of_two_clusters_complete_mutual_tls() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_certs(d);
    let verifier = rustls::server::WebPkiClientVerifier::builder(roots(&d.join("root-cert.pem")))
        .build()
        .unwrap();
    let server = rustls::ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            chain(&d.join("server/cert-chain.pem")),
            key(&d.join("server/key.pem")),
        )
        .unwrap();
    let client = rustls::ClientConfig::builder()
        .with_root_certificates(roots(&d.join("client/root-cert.pem")))
        .with_client_auth_cert(
            chain(&d.join("client/cert-chain.pem")),
            key(&d.join("client/key.pem")),
        )
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let server_task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await.unwrap();
        let peer = tls.get_ref().1.peer_certificates().unwrap().len();
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.unwrap();
        tls.write_all(b"pong").await.unwrap();
        tls.shutdown().await.unwrap();
        peer
    });
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut tls = connector
        .connect(
            ServerName::try_from("istiod.istio-system.svc").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    tls.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    tls.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"pong");
    // The client sent leaf + its cluster's intermediate + root.
    assert_eq!(server_task.await.unwrap(), 3);
}

#[tokio::test]
async fn xds_over_mutual_tls() {
    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
    use envoy_types::pb::envoy::service::endpoint::v3::endpoint_discovery_service_client::EndpointDiscoveryServiceClient;
    use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_certs(d);
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut config = remote_secrets::config::ServeConfig::for_tests(
        "cluster-1",
        "network1",
        fixtures.join("cluster-1"),
    );
    config.xds_tls_cert_chain = Some(d.join("server/cert-chain.pem"));
    config.xds_tls_key = Some(d.join("server/key.pem"));
    config.xds_tls_root_cert = Some(d.join("server/root-cert.pem"));
    let app = remote_secrets::app::App::start(config).await.unwrap();
    let addr = app.addresses.xds_tls.unwrap();
    let read = |p: &str| std::fs::read(d.join(p)).unwrap();
    let tls = |with_identity: bool| {
        let mut t = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read("client/root-cert.pem")))
            .domain_name("istiod.istio-system.svc");
        if with_identity {
            t = t.identity(Identity::from_pem(
                read("client/cert-chain.pem"),
                read("client/key.pem"),
            ));
        }
        t
    };
    let channel = Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls(true))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let response = EndpointDiscoveryServiceClient::new(channel)
        .fetch_endpoints(DiscoveryRequest {
            resource_names: vec!["outbound|8000||httpbin.bar.global".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.resources.len(), 1);
    // Without a client certificate the handshake is refused.
    let refused = async {
        let channel = Channel::from_shared(format!("https://{addr}"))
            .unwrap()
            .tls_config(tls(false))
            .unwrap()
            .connect()
            .await?;
        EndpointDiscoveryServiceClient::new(channel)
            .fetch_endpoints(DiscoveryRequest::default())
            .await
            .map_err(|s| Box::new(s) as Box<dyn std::error::Error + Send + Sync>)?;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
    };
    assert!(refused.await.is_err());
    app.stop();
}
