//! The gateway reading the Kubernetes API: `testkit`'s fake API server stands in for a real one
//! (none can run here), reached by the real kube-rs client through a kubeconfig file passed as
//! `--kubeconfig`. Objects created, changed and deleted there change routing; a killed API
//! server leaves the last routes serving; readiness waits for the first full sync.
//!
//! The "pods" here answer any bytes with their name: the client sends a real rustls ClientHello
//! (what the gateway routes on) and reads the greeting, without finishing the handshake. The
//! full mutual-TLS path is covered by `e2e.rs`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use gateway::{Config, Gateway};
use serde_json::{Value, json};
use testkit::FakeApiServer;
use testkit::eventually;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A pod that reads the replayed ClientHello and answers `pod=<name>`.
async fn pod_at(addr: SocketAddr, name: &'static str) -> SocketAddr {
    let listener = TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                if s.read(&mut buf).await.unwrap_or(0) > 0 {
                    let _ = s.write_all(format!("pod={name}\n").as_bytes()).await;
                }
            });
        }
    });
    addr
}

fn client_hello(sni: &str) -> Vec<u8> {
    #[derive(Debug)]
    struct NoVerify;
    impl rustls::client::danger::ServerCertVerifier for NoVerify {
        fn verify_server_cert(
            &self,
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &[rustls::pki_types::CertificateDer<'_>],
            _: &rustls::pki_types::ServerName<'_>,
            _: &[u8],
            _: rustls::pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Err(rustls::Error::General("never used".into()))
        }
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Err(rustls::Error::General("never used".into()))
        }
        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Err(rustls::Error::General("never used".into()))
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            vec![rustls::SignatureScheme::ECDSA_NISTP256_SHA256]
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(NoVerify))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"istio".to_vec()];
    let name = rustls::pki_types::ServerName::try_from(sni.to_string()).unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut out = Vec::new();
    conn.write_tls(&mut out).unwrap();
    out
}

/// Which pod answers through the gateway for this SNI; `None` when the gateway refuses.
async fn call(gw: &Gateway, sni: &str) -> Option<String> {
    let mut s = TcpStream::connect(gw.proxy_addr).await.ok()?;
    s.write_all(&client_hello(sni)).await.ok()?;
    let mut out = Vec::new();
    let mut byte = [0u8];
    while s.read_exact(&mut byte).await.is_ok() && byte[0] != b'\n' {
        out.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&out).to_string();
    text.strip_prefix("pod=").map(str::to_string)
}

async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let code = out[9..12].parse().unwrap();
    let body = out.split_once("\r\n\r\n").map(|x| x.1.to_string());
    (code, body.unwrap_or_default())
}

fn slice(eps: &[(SocketAddr, &str)]) -> Value {
    let port = eps[0].0.port();
    let endpoints: Vec<Value> = eps
        .iter()
        .map(|(a, pod)| {
            json!({"addresses": [a.ip().to_string()], "conditions": {"ready": true},
                               "targetRef": {"kind": "Pod", "namespace": "bar", "name": pod}})
        })
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": "httpbin-1", "namespace": "bar",
                        "labels": {"kubernetes.io/service-name": "httpbin"}},
           "addressType": "IPv4", "endpoints": endpoints,
           "ports": [{"name": "http", "port": port}]})
}

fn mesh(fake: &FakeApiServer, v1: SocketAddr, v2: SocketAddr) {
    fake.apply(json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "httpbin", "namespace": "bar"},
        "spec": {"ports": [{"name": "http", "port": 8000}]}}));
    for (pod, version) in [("httpbin-v1", "v1"), ("httpbin-v2", "v2")] {
        fake.apply(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod, "namespace": "bar", "labels": {"app": "httpbin", "version": version}}}));
    }
    fake.apply(slice(&[(v1, "httpbin-v1"), (v2, "httpbin-v2")]));
    fake.apply(
        json!({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
        "metadata": {"name": "httpbin", "namespace": "bar"},
        "spec": {"host": "httpbin", "subsets": [{"name": "v1", "labels": {"version": "v1"}},
                                                {"name": "v2", "labels": {"version": "v2"}}]}}),
    );
    fake.apply(
        json!({"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceExport",
        "metadata": {"name": "httpbin", "namespace": "bar"}}),
    );
}

async fn two_pods() -> (SocketAddr, SocketAddr) {
    let v1 = pod_at(SocketAddr::from(([127, 0, 0, 2], 0)), "v1").await;
    let v2 = pod_at(SocketAddr::from(([127, 0, 0, 3], v1.port())), "v2").await;
    (v1, v2)
}

const V1: &str = "outbound_.8000_.v1_.httpbin.bar.global";
const V2: &str = "outbound_.8000_.v2_.httpbin.bar.global";

#[tokio::test]
async fn objects_on_the_api_server_change_routing() {
    let fake = FakeApiServer::start().await;
    let (v1, v2) = two_pods().await;
    mesh(&fake, v1, v2);
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(Config::for_tests_with_kubeconfig(
        fake.write_kubeconfig(dir.path()),
    ))
    .await
    .expect("gateway starts");
    eventually("ready", || async {
        http_get(gw.status_addr, "/healthz/ready").await.0 == 200
    })
    .await;
    assert_eq!(call(&gw, V1).await.as_deref(), Some("v1"));
    assert_eq!(call(&gw, V2).await.as_deref(), Some("v2"));

    // Modify: v2's pod moves to the v1 address; the subset follows the labels.
    fake.apply(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "httpbin-v1", "namespace": "bar", "labels": {"app": "httpbin", "version": "v2"}}}));
    eventually("subset v1 now empty", || async {
        call(&gw, V1).await.is_none()
    })
    .await;
    assert!(call(&gw, V2).await.is_some());

    // Delete the export: the service is no longer reachable through the gateway.
    fake.delete(
        "multicluster.x-k8s.io/v1alpha1",
        "ServiceExport",
        "bar",
        "httpbin",
    );
    eventually("unexported", || async { call(&gw, V2).await.is_none() }).await;

    // Add it back.
    fake.apply(
        json!({"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceExport",
        "metadata": {"name": "httpbin", "namespace": "bar"}}),
    );
    eventually("exported again", || async { call(&gw, V2).await.is_some() }).await;

    let (_, dump) = http_get(gw.admin_addr, "/config_dump").await;
    assert!(dump.contains("kubernetes:cluster-1"), "{dump}");
    gw.begin_termination();
    gw.wait().await;
}

#[tokio::test]
async fn a_lost_api_server_keeps_routes_then_catches_up() {
    let fake = FakeApiServer::start().await;
    let (v1, v2) = two_pods().await;
    mesh(&fake, v1, v2);
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(Config::for_tests_with_kubeconfig(
        fake.write_kubeconfig(dir.path()),
    ))
    .await
    .unwrap();
    eventually("routes", || async { call(&gw, V1).await.is_some() }).await;

    fake.kill();
    eventually("stale in metrics", || async {
        let (_, m) = http_get(gw.metrics_addr, "/metrics").await;
        m.lines()
            .any(|l| l.starts_with("kube_source_stale_since_seconds{") && !l.ends_with(" 0"))
    })
    .await;
    assert_eq!(
        call(&gw, V1).await.as_deref(),
        Some("v1"),
        "last routes kept"
    );
    assert_eq!(http_get(gw.status_addr, "/healthz/ready").await.0, 200);

    // Changed while it was away: only v2 stays.
    fake.apply(slice(&[(v2, "httpbin-v2")]));
    fake.restart().await;
    eventually("caught up", || async { call(&gw, V1).await.is_none() }).await;
    assert_eq!(call(&gw, V2).await.as_deref(), Some("v2"));
}

#[tokio::test]
async fn not_ready_until_the_first_full_sync() {
    let fake = FakeApiServer::start().await;
    let (v1, v2) = two_pods().await;
    mesh(&fake, v1, v2);
    fake.kill();
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(Config::for_tests_with_kubeconfig(
        fake.write_kubeconfig(dir.path()),
    ))
    .await
    .expect("starts without the API server");
    assert_eq!(http_get(gw.status_addr, "/healthz/ready").await.0, 503);
    assert_eq!(call(&gw, V1).await, None);
    fake.restart().await;
    eventually("ready", || async {
        http_get(gw.status_addr, "/healthz/ready").await.0 == 200
    })
    .await;
    assert_eq!(call(&gw, V1).await.as_deref(), Some("v1"));
}

/// A first sync that lands after termination began must not turn readiness back to 200: load
/// balancers would send new connections to a gateway about to close its listener.
#[tokio::test]
async fn never_ready_once_draining_even_if_the_first_sync_lands_later() {
    let fake = FakeApiServer::start().await;
    let (v1, v2) = two_pods().await;
    mesh(&fake, v1, v2);
    fake.kill();
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::for_tests_with_kubeconfig(fake.write_kubeconfig(dir.path()));
    // Long enough that the listeners stay open for the whole test.
    config.lifecycle.drain_duration = Duration::from_secs(60);
    let gw = Gateway::start(config)
        .await
        .expect("starts without the API server");
    assert_eq!(http_get(gw.status_addr, "/healthz/ready").await.0, 503);
    gw.begin_termination();
    fake.restart().await;
    // The sync landed and the table is built from it: connections are routed (the gateway
    // still accepts while it drains)...
    eventually("routes from the synced objects", || async {
        call(&gw, V1).await.as_deref() == Some("v1")
    })
    .await;
    // ...but readiness stays 503.
    assert_eq!(http_get(gw.status_addr, "/healthz/ready").await.0, 503);
}
