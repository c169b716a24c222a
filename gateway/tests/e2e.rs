//! End to end through an in-process gateway: real sockets on 127.0.0.x, real rustls mutual TLS
//! between a client and "pod" servers, certificates from one generated root (rcgen). The
//! gateway never holds a key: the handshake and the data pass through it untouched.

use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use gateway::hello::{Parsed, parse_client_hello};
use gateway::{Config, Gateway};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, SanType};
use rustls::crypto::{ActiveKeyExchange, CryptoProvider, SharedSecret, SupportedKxGroup};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{NamedGroup, RootCertStore};
use testkit::eventually;
use testkit::tls::ServiceIdentityVerifier;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

// ---------------------------------------------------------------- PKI: one root, two leaves

struct Pki {
    root: CertificateDer<'static>,
    root_pem: String,
    server: (Vec<CertificateDer<'static>>, Arc<KeyPair>),
    client: (Vec<CertificateDer<'static>>, Arc<KeyPair>),
    client_pem: String,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn pki() -> &'static Pki {
    static PKI: std::sync::OnceLock<Pki> = std::sync::OnceLock::new();
    PKI.get_or_init(|| {
        // Distinct subject names: OpenSSL takes a leaf whose issuer equals its subject for
        // self-signed.
        let dn = |cn: &str| {
            let mut d = rcgen::DistinguishedName::new();
            d.push(rcgen::DnType::CommonName, cn);
            d
        };
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.distinguished_name = dn("mesh root");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let root = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
        let leaf = |dns: &str, spiffe: &str| {
            let mut p = CertificateParams::new(vec![dns.to_string()]).unwrap();
            p.distinguished_name = dn(dns);
            p.subject_alt_names
                .push(SanType::URI(spiffe.try_into().unwrap()));
            let key = KeyPair::generate().unwrap();
            let cert = p.signed_by(&key, &root).unwrap();
            ((vec![cert.der().clone()], Arc::new(key)), cert.pem())
        };
        let (server, _) = leaf(
            "httpbin.bar.svc.cluster.local",
            "spiffe://cluster.local/ns/bar/sa/httpbin",
        );
        let (client, client_pem) = leaf(
            "sleep.foo.svc.cluster.local",
            "spiffe://cluster.local/ns/foo/sa/sleep",
        );
        Pki {
            root: root.der().clone(),
            root_pem: root.pem(),
            server,
            client,
            client_pem,
        }
    })
}

fn key_der(k: &KeyPair) -> PrivateKeyDer<'static> {
    PrivateKeyDer::try_from(k.serialize_der()).unwrap()
}

fn roots() -> Arc<RootCertStore> {
    let mut r = RootCertStore::empty();
    r.add(pki().root.clone()).unwrap();
    Arc::new(r)
}

fn client_config(provider: Arc<CryptoProvider>, alpn: &[&str]) -> Arc<rustls::ClientConfig> {
    // As an Istio sidecar checks it: the shared root and the service identity, whatever SNI.
    let verifier =
        ServiceIdentityVerifier::new(roots(), provider.clone(), "httpbin.bar.svc.cluster.local")
            .unwrap();
    let (chain, key) = &pki().client;
    let mut c = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(chain.clone(), key_der(key))
        .unwrap();
    c.alpn_protocols = alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
    Arc::new(c)
}

fn server_config() -> Arc<rustls::ServerConfig> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(), provider())
        .build()
        .unwrap();
    let (chain, key) = &pki().server;
    Arc::new(
        rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key_der(key))
            .unwrap(),
    )
}

// ---------------------------------------------------------------- pods and the mesh config

/// A "pod" at `addr`: a TLS server requiring a client certificate from the root, that says
/// its name and then echoes.
async fn pod_at(addr: SocketAddr, name: &'static str) -> SocketAddr {
    let listener = TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(server_config());
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let _ = tls.write_all(format!("pod={name}\n").as_bytes()).await;
                let mut buf = [0u8; 4096];
                while let Ok(n) = tls.read(&mut buf).await {
                    if n == 0 || tls.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                let _ = tls.shutdown().await;
            });
        }
    });
    addr
}

struct Ep {
    addr: SocketAddr,
    pod: &'static str,
    version: &'static str,
}

/// Service + EndpointSlice + Pods for one service on port 8000, exported or not.
fn service_yaml(ns: &str, name: &str, exported: bool, eps: &[Ep]) -> String {
    let port = eps.first().map(|e| e.addr.port()).unwrap_or(1);
    let mut y = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\n\
         spec: {{ports: [{{name: http, port: 8000}}]}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: {name}-1, namespace: {ns}, labels: {{kubernetes.io/service-name: {name}}}}}\n\
         addressType: IPv4\nports: [{{name: http, port: {port}}}]\nendpoints:\n"
    );
    for e in eps {
        assert_eq!(e.addr.port(), port, "one slice, one port");
        y += &format!(
            "- addresses: [\"{}\"]\n  targetRef: {{kind: Pod, name: {}, namespace: {ns}}}\n",
            e.addr.ip(),
            e.pod
        );
    }
    for e in eps {
        y += &format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {}, namespace: {ns}, labels: {{app: {name}, version: {}}}}}\n",
            e.pod, e.version
        );
    }
    if exported {
        y += &format!(
            "---\napiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {{name: {name}, namespace: {ns}}}\n"
        );
    }
    y += &format!(
        "---\napiVersion: networking.istio.io/v1beta1\nkind: DestinationRule\n\
         metadata: {{name: {name}, namespace: {ns}}}\n\
         spec: {{host: {name}, subsets: [{{name: v1, labels: {{version: v1}}}}, {{name: v2, labels: {{version: v2}}}}]}}\n"
    );
    y
}

/// Pods on one port (as one EndpointSlice needs) at several loopback addresses.
async fn pods_on_one_port(specs: &[([u8; 4], &'static str, &'static str)]) -> Vec<Ep> {
    let mut port = 0;
    let mut eps = Vec::new();
    for (ip, name, version) in specs {
        let addr = pod_at(SocketAddr::from((*ip, port)), name).await;
        port = addr.port();
        eps.push(Ep {
            addr,
            pod: name,
            version,
        });
    }
    eps
}

async fn start_gateway(dir: &Path, tweak: impl FnOnce(&mut Config)) -> Gateway {
    let mut config = Config::for_tests(dir.to_path_buf());
    tweak(&mut config);
    Gateway::start(config).await.expect("gateway starts")
}

// ---------------------------------------------------------------- clients

/// Open mTLS through the gateway with this SNI, read the pod's greeting, check an echo.
async fn call<IO: AsyncRead + AsyncWrite + Unpin>(
    io: IO,
    sni: &str,
    config: Arc<rustls::ClientConfig>,
) -> Result<String, std::io::Error> {
    let name = ServerName::try_from(sni.to_string()).unwrap();
    let mut tls = TlsConnector::from(config).connect(name, io).await?;
    let mut line = Vec::new();
    let mut byte = [0u8];
    while tls.read_exact(&mut byte).await.is_ok() && byte[0] != b'\n' {
        line.push(byte[0]);
    }
    tls.write_all(b"ping").await?;
    tls.flush().await?;
    let mut echo = [0u8; 4];
    tls.read_exact(&mut echo).await?;
    assert_eq!(&echo, b"ping");
    tls.shutdown().await?;
    Ok(String::from_utf8(line).unwrap())
}

async fn call_gw(gw: &Gateway, sni: &str) -> Result<String, std::io::Error> {
    let tcp = TcpStream::connect(gw.proxy_addr).await?;
    call(tcp, sni, client_config(provider(), &["istio"])).await
}

/// The TLS alert the gateway answered with, from the rustls error.
fn alert_of(e: &std::io::Error) -> Option<rustls::AlertDescription> {
    let inner = e.get_ref()?.downcast_ref::<rustls::Error>()?;
    match inner {
        rustls::Error::AlertReceived(a) => Some(*a),
        _ => None,
    }
}

async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let code = out[9..12].parse().unwrap();
    let body = out
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    (code, body)
}

/// Writes at most one byte per write, with a pause, so the gateway sees the ClientHello arrive
/// in one-byte TCP segments.
struct Trickle {
    inner: TcpStream,
    budget: usize,
    pause: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl AsyncRead for Trickle {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Trickle {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.budget == 0 {
            return Pin::new(&mut self.inner).poll_write(cx, buf);
        }
        if let Some(p) = self.pause.as_mut() {
            if p.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.pause = None;
        }
        let r = Pin::new(&mut self.inner).poll_write(cx, &buf[..1]);
        if let Poll::Ready(Ok(n)) = &r {
            self.budget -= n;
            self.pause = Some(Box::pin(tokio::time::sleep(Duration::from_micros(200))));
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

use std::future::Future;

/// A stand-in for X25519MLKEM768 with its real key-share size (1216 bytes): the ClientHello is
/// as large as a post-quantum one. The server cannot pick it and asks for X25519 by
/// HelloRetryRequest, so the handshake still completes.
#[derive(Debug)]
struct PqSizedGroup;

#[derive(Debug)]
struct PqSizedShare(Vec<u8>);

impl SupportedKxGroup for PqSizedGroup {
    fn start(&self) -> Result<Box<dyn ActiveKeyExchange>, rustls::Error> {
        Ok(Box::new(PqSizedShare(vec![0x42; 1216])))
    }
    fn name(&self) -> NamedGroup {
        NamedGroup::Unknown(0x11ec)
    }
}

impl ActiveKeyExchange for PqSizedShare {
    fn complete(self: Box<Self>, _peer: &[u8]) -> Result<SharedSecret, rustls::Error> {
        Err(rustls::Error::General(
            "test-only group cannot complete".into(),
        ))
    }
    fn pub_key(&self) -> &[u8] {
        &self.0
    }
    fn group(&self) -> NamedGroup {
        NamedGroup::Unknown(0x11ec)
    }
}

fn pq_sized_provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.kx_groups.insert(0, &PqSizedGroup);
    Arc::new(p)
}

/// The first flight a rustls client sends: a captured ClientHello.
fn capture_hello(config: Arc<rustls::ClientConfig>, sni: &str) -> Vec<u8> {
    let mut conn =
        rustls::ClientConnection::new(config, ServerName::try_from(sni.to_string()).unwrap())
            .unwrap();
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).unwrap();
    }
    out
}

// ---------------------------------------------------------------- tests

#[test]
fn captured_hellos_parse_on_every_prefix() {
    let sni = "outbound_.8000_.v2_.httpbin.bar.global";
    // Real clients' hellos, captured byte for byte (see fixtures/hellos/README.md), beside
    // the ones rustls makes here.
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/hellos");
    let mut hellos = vec![
        (
            "rustls ring".to_string(),
            capture_hello(client_config(provider(), &["istio"]), sni),
        ),
        (
            "rustls pq-sized".to_string(),
            capture_hello(client_config(pq_sized_provider(), &[]), sni),
        ),
    ];
    let mut captured: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "bin"))
        .collect();
    captured.sort();
    for p in captured {
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        hellos.push((name, std::fs::read(&p).unwrap()));
    }
    let names: Vec<&str> = hellos.iter().map(|(n, _)| n.as_str()).collect();
    for want in ["openssl", "curl", "python", "x25519mlkem768"] {
        assert!(
            names.iter().any(|n| n.contains(want)),
            "no {want} capture in {names:?}"
        );
    }
    for (what, bytes) in &hellos {
        for n in 0..bytes.len() {
            assert!(
                matches!(parse_client_hello(&bytes[..n]), Ok(Parsed::Incomplete)),
                "{what}: prefix of {n} bytes"
            );
        }
        let Ok(Parsed::Complete(h)) = parse_client_hello(bytes) else {
            panic!("{what} does not parse")
        };
        assert_eq!(h.sni.as_deref(), Some(sni), "{what}");
    }
    for (what, bytes) in &hellos[1..] {
        if what.contains("pq") || what.contains("mlkem") {
            assert!(bytes.len() > 1400, "{what} is {} bytes", bytes.len());
        }
    }
}

#[tokio::test]
async fn mutual_tls_passes_through_by_sni_with_subsets() {
    let eps = pods_on_one_port(&[
        ([127, 0, 3, 1], "httpbin-v1", "v1"),
        ([127, 0, 3, 2], "httpbin-v2", "v2"),
    ])
    .await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("httpbin.yaml"),
        service_yaml("bar", "httpbin", true, &eps),
    )
    .unwrap();
    let gw = start_gateway(dir.path(), |_| {}).await;

    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..20 {
        seen.insert(
            call_gw(&gw, "outbound_.8000_._.httpbin.bar.global")
                .await
                .unwrap(),
        );
    }
    assert_eq!(seen.len(), 2, "both pods answer: {seen:?}");
    for _ in 0..5 {
        assert_eq!(
            call_gw(&gw, "outbound_.8000_.v2_.httpbin.bar.global")
                .await
                .unwrap(),
            "pod=httpbin-v2"
        );
    }
    // The plain host form works for a single-port service.
    assert!(
        call_gw(&gw, "httpbin.bar.global")
            .await
            .unwrap()
            .starts_with("pod=httpbin-v")
    );

    let (code, metrics) = http_get(gw.metrics_addr, "/metrics").await;
    assert_eq!(code, 200);
    assert!(
        metrics.contains("gateway_connections_opened_total{service=\"bar/httpbin\"} 26"),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "gateway_bytes_total{service=\"bar/httpbin\",direction=\"client_to_server\"}"
        )
    );
    let (code, _) = http_get(gw.status_addr, "/healthz/ready").await;
    assert_eq!(code, 200);
}

#[tokio::test]
async fn hello_in_one_byte_segments_and_pq_sized_hello() {
    let eps = pods_on_one_port(&[([127, 0, 4, 1], "httpbin-v1", "v1")]).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("m.yaml"),
        service_yaml("bar", "httpbin", true, &eps),
    )
    .unwrap();
    let gw = start_gateway(dir.path(), |_| {}).await;
    for provider in [provider(), pq_sized_provider()] {
        let tcp = TcpStream::connect(gw.proxy_addr).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let trickle = Trickle {
            inner: tcp,
            budget: 4096,
            pause: None,
        };
        let got = call(
            trickle,
            "outbound_.8000_._.httpbin.bar.global",
            client_config(provider, &[]),
        )
        .await
        .unwrap();
        assert_eq!(got, "pod=httpbin-v1");
    }
}

#[tokio::test]
async fn a_dead_endpoint_costs_the_client_nothing() {
    // 127.0.5.1 has nothing listening on the pods' port: connection refused at once.
    let live = pods_on_one_port(&[([127, 0, 5, 2], "httpbin-live", "v1")]).await;
    let dead = Ep {
        addr: SocketAddr::from(([127, 0, 5, 1], live[0].addr.port())),
        pod: "httpbin-dead",
        version: "v1",
    };
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("m.yaml"),
        service_yaml(
            "bar",
            "httpbin",
            true,
            &[dead, live.into_iter().next().unwrap()],
        ),
    )
    .unwrap();
    let gw = start_gateway(dir.path(), |c| c.eject_after = 2).await;
    for _ in 0..10 {
        assert_eq!(
            call_gw(&gw, "outbound_.8000_._.httpbin.bar.global")
                .await
                .unwrap(),
            "pod=httpbin-live"
        );
    }
    let (_, metrics) = http_get(gw.metrics_addr, "/metrics").await;
    assert!(
        metrics.contains("gateway_connect_failures_total{service=\"bar/httpbin\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("gateway_endpoint_ejections_total{service=\"bar/httpbin\"} 1"),
        "{metrics}"
    );
    let (_, dump) = http_get(gw.admin_addr, "/config_dump").await;
    assert!(dump.contains("\"ejected\": true"), "{dump}");
}

#[tokio::test]
async fn refused_names_get_an_alert_and_a_metric() {
    let eps = pods_on_one_port(&[([127, 0, 6, 1], "private-1", "v1")]).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("m.yaml"),
        service_yaml("bar", "private", false, &eps),
    )
    .unwrap();
    let gw = start_gateway(dir.path(), |_| {}).await;

    let e = call_gw(&gw, "outbound_.8000_._.private.bar.global")
        .await
        .unwrap_err();
    assert_eq!(
        alert_of(&e),
        Some(rustls::AlertDescription::AccessDenied),
        "{e}"
    );
    let e = call_gw(&gw, "outbound_.8000_._.nothere.bar.global")
        .await
        .unwrap_err();
    assert_eq!(
        alert_of(&e),
        Some(rustls::AlertDescription::UnrecognisedName),
        "{e}"
    );
    let e = call_gw(&gw, "outbound_.8000_.v7_.private.bar.global")
        .await
        .unwrap_err();
    assert_eq!(
        alert_of(&e),
        Some(rustls::AlertDescription::AccessDenied),
        "{e}"
    );

    // Not TLS at all: closed without a byte.
    let mut s = TcpStream::connect(gw.proxy_addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());

    let (_, metrics) = http_get(gw.metrics_addr, "/metrics").await;
    for line in [
        "gateway_rejected_connections_total{reason=\"not_exported\",service=\"bar/private\"} 2",
        "gateway_rejected_connections_total{reason=\"unknown_service\",service=\"\"} 1",
        "gateway_rejected_connections_total{reason=\"not_tls\",service=\"\"} 1",
    ] {
        assert!(metrics.contains(line), "missing {line} in\n{metrics}");
    }
    let (_, explain) = http_get(
        gw.admin_addr,
        "/debug/explain?sni=outbound_.8000_._.private.bar.global",
    )
    .await;
    assert!(
        explain.contains("\"reason\": \"not_exported\""),
        "{explain}"
    );
    assert!(explain.contains("ServiceExport"), "{explain}");
}

#[tokio::test]
async fn config_changes_apply_to_new_connections_without_disturbing_old_ones() {
    let v1 = pods_on_one_port(&[([127, 0, 7, 1], "httpbin-a", "v1")]).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("m.yaml");
    std::fs::write(&file, service_yaml("bar", "httpbin", true, &v1)).unwrap();
    let gw = start_gateway(dir.path(), |_| {}).await;

    // An established connection, mid-stream.
    let tcp = TcpStream::connect(gw.proxy_addr).await.unwrap();
    let name = ServerName::try_from("outbound_.8000_._.httpbin.bar.global").unwrap();
    let mut old = TlsConnector::from(client_config(provider(), &[]))
        .connect(name, tcp)
        .await
        .unwrap();
    let mut greet = [0u8; 14];
    old.read_exact(&mut greet).await.unwrap();
    assert_eq!(&greet, b"pod=httpbin-a\n");

    // Replace the service's endpoints with another pod, and add a second service.
    let v2 = pods_on_one_port(&[([127, 0, 7, 2], "httpbin-b", "v1")]).await;
    std::fs::write(&file, service_yaml("bar", "httpbin", true, &v2)).unwrap();
    std::fs::write(
        dir.path().join("extra.yaml"),
        service_yaml("foo", "extra", true, &v2),
    )
    .unwrap();
    eventually("new endpoints are used", || async {
        call_gw(&gw, "outbound_.8000_._.httpbin.bar.global")
            .await
            .ok()
            .as_deref()
            == Some("pod=httpbin-b")
    })
    .await;
    assert_eq!(
        call_gw(&gw, "extra.foo.global").await.unwrap(),
        "pod=httpbin-b"
    );

    // The old connection still talks to the old pod.
    old.write_all(b"still").await.unwrap();
    let mut echo = [0u8; 5];
    old.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"still");
}

#[tokio::test]
async fn termination_drains_then_closes_the_listener_and_waits_for_connections() {
    let eps = pods_on_one_port(&[([127, 0, 8, 1], "httpbin-a", "v1")]).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("m.yaml"),
        service_yaml("bar", "httpbin", true, &eps),
    )
    .unwrap();
    let gw = start_gateway(dir.path(), |c| {
        c.lifecycle.drain_duration = Duration::from_millis(300);
        c.lifecycle.termination_deadline = Duration::from_secs(20);
    })
    .await;
    let tcp = TcpStream::connect(gw.proxy_addr).await.unwrap();
    let name = ServerName::try_from("outbound_.8000_._.httpbin.bar.global").unwrap();
    let mut inflight = TlsConnector::from(client_config(provider(), &[]))
        .connect(name, tcp)
        .await
        .unwrap();

    gw.begin_termination();
    let (status, proxy) = (gw.status_addr, gw.proxy_addr);
    eventually("readiness turns 503", || async {
        http_get(status, "/healthz/ready").await.0 == 503
    })
    .await;
    eventually("the listener closes after the drain", || async {
        TcpStream::connect(proxy).await.is_err()
    })
    .await;
    // The in-flight connection still works, and termination waits for it.
    inflight.write_all(b"hello").await.unwrap();
    let mut buf = vec![0u8; 14 + 5];
    inflight.read_exact(&mut buf).await.unwrap();
    assert!(buf.ends_with(b"hello"));
    let waiting = tokio::spawn(gw.wait());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !waiting.is_finished(),
        "termination must wait for the in-flight connection"
    );
    inflight.shutdown().await.unwrap();
    drop(inflight);
    tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn openssl_s_client_reaches_the_pod() {
    if std::process::Command::new("openssl")
        .arg("version")
        .output()
        .is_err()
    {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "openssl is required in CI"
        );
        eprintln!("SKIPPED: openssl not installed");
        return;
    }
    let eps = pods_on_one_port(&[([127, 0, 9, 1], "httpbin-a", "v1")]).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("m.yaml"),
        service_yaml("bar", "httpbin", true, &eps),
    )
    .unwrap();
    let gw = start_gateway(dir.path(), |_| {}).await;
    let (_, key) = &pki().client;
    std::fs::write(dir.path().join("cert.pem"), &pki().client_pem).unwrap();
    std::fs::write(dir.path().join("key.pem"), key.serialize_pem()).unwrap();
    std::fs::write(dir.path().join("root.pem"), &pki().root_pem).unwrap();
    let d = dir.path().to_path_buf();
    let proxy = gw.proxy_addr.to_string();
    // s_client prints what the pod sends; once the greeting is read (or 20 s passed), end the
    // process we started.
    let (stdout, stderr) = tokio::task::spawn_blocking(move || {
        use std::io::{BufRead, Read};
        let mut child = std::process::Command::new("openssl")
            .args(["s_client", "-connect", &proxy])
            .args(["-servername", "outbound_.8000_._.httpbin.bar.global"])
            .arg("-cert")
            .arg(d.join("cert.pem"))
            .arg("-key")
            .arg(d.join("key.pem"))
            .arg("-CAfile")
            .arg(d.join("root.pem"))
            .args([
                "-verify_return_error",
                "-verify_hostname",
                "httpbin.bar.svc.cluster.local",
            ])
            .arg("-quiet")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut first = String::new();
            let _ = std::io::BufReader::new(out).read_line(&mut first);
            let _ = tx.send(first);
        });
        let first = rx.recv_timeout(Duration::from_secs(20)).unwrap_or_default();
        let _ = child.kill();
        let _ = child.wait();
        let mut err = String::new();
        let _ = child.stderr.take().unwrap().read_to_string(&mut err);
        (first, err)
    })
    .await
    .unwrap();
    assert_eq!(stdout.trim(), "pod=httpbin-a", "stderr: {stderr}");
}

/// A connection from `source` (a 127.0.0.x address) to the gateway.
async fn connect_from(source: [u8; 4], gw: &Gateway) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((source, 0))).unwrap();
    socket.connect(gw.proxy_addr).await.unwrap()
}

/// A client that starts a ClientHello and stops after its first byte (one that sends nothing
/// at all is not even accepted: the listener uses TCP_DEFER_ACCEPT).
async fn dribbler(source: [u8; 4], gw: &Gateway) -> TcpStream {
    let mut s = connect_from(source, gw).await;
    s.write_all(&[0x16]).await.unwrap();
    s
}

/// Closed by the gateway without a byte (within a few seconds, far inside --peek-timeout).
async fn closed_silently(mut s: TcpStream) -> bool {
    let mut rest = Vec::new();
    matches!(
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

#[tokio::test]
async fn silent_clients_cannot_take_the_peek_budget_from_good_ones() {
    let eps = pods_on_one_port(&[([127, 0, 6, 21], "budget-1", "v1")]).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("m.yaml"),
        service_yaml("bar", "budget", true, &eps),
    )
    .unwrap();
    let gw = start_gateway(dir.path(), |c| {
        c.peek_timeout = Duration::from_secs(60);
        c.max_peeking = 5;
        c.max_peeking_per_source = 3;
    })
    .await;
    let sni = "outbound_.8000_._.budget.bar.global";
    // Three dribbling connections from one source take its whole share...
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(dribbler([127, 0, 7, 1], &gw).await);
    }
    let counted = |m: &str, reason: &str, n: u32| {
        m.contains(&format!(
            "gateway_rejected_connections_total{{reason=\"{reason}\",service=\"\"}} {n}"
        ))
    };
    let peeking = |n: u32| {
        let gw = &gw;
        move || async move {
            let (_, m) = http_get(gw.metrics_addr, "/metrics").await;
            m.contains(&format!("gateway_peeking_connections {n}\n"))
        }
    };
    eventually("three peeking", peeking(3)).await;
    // ... so a fourth from it is closed at once, and counted,
    assert!(closed_silently(dribbler([127, 0, 7, 1], &gw).await).await);
    let (_, m) = http_get(gw.metrics_addr, "/metrics").await;
    assert!(counted(&m, "source_peek_budget", 1), "{m}");
    // while a good client elsewhere still gets through.
    let tls = client_config(provider(), &["istio"]);
    let good = connect_from([127, 0, 7, 9], &gw).await;
    assert_eq!(call(good, sni, tls.clone()).await.unwrap(), "pod=budget-1");

    // Two more dribbling sources fill the whole budget: then even a good client waits its turn
    // (closed, counted), and is served again as soon as the silent ones leave.
    silent.push(dribbler([127, 0, 7, 2], &gw).await);
    silent.push(dribbler([127, 0, 7, 3], &gw).await);
    eventually("five peeking", peeking(5)).await;
    assert!(closed_silently(dribbler([127, 0, 7, 9], &gw).await).await);
    let (_, m) = http_get(gw.metrics_addr, "/metrics").await;
    assert!(counted(&m, "peek_budget", 1), "{m}");
    drop(silent);
    let gw = &gw;
    eventually("a good call after the silent ones left", move || {
        let tls = tls.clone();
        async move {
            let s = connect_from([127, 0, 7, 1], gw).await;
            call(s, sni, tls).await.is_ok()
        }
    })
    .await;
}

#[tokio::test]
async fn max_connections_counts_routed_connections_and_refuses_with_an_alert() {
    let eps = pods_on_one_port(&[([127, 0, 6, 22], "limit-1", "v1")]).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("m.yaml"),
        service_yaml("bar", "limit", true, &eps),
    )
    .unwrap();
    let gw = start_gateway(dir.path(), |c| c.max_connections = Some(1)).await;
    let sni = "outbound_.8000_._.limit.bar.global";
    let tls = client_config(provider(), &["istio"]);

    // A connection still sending its ClientHello is not routed: it does not count.
    let _silent = dribbler([127, 0, 7, 20], &gw).await;
    // One open call holds the only place...
    let name = ServerName::try_from(sni.to_string()).unwrap();
    let tcp = TcpStream::connect(gw.proxy_addr).await.unwrap();
    let mut held = TlsConnector::from(tls.clone())
        .connect(name, tcp)
        .await
        .unwrap();
    let mut byte = [0u8];
    held.read_exact(&mut byte).await.unwrap();
    // ... so the next is refused with an alert,
    let e = call_gw(&gw, sni).await.unwrap_err();
    assert_eq!(
        alert_of(&e),
        Some(rustls::AlertDescription::InternalError),
        "{e}"
    );
    let (_, m) = http_get(gw.metrics_addr, "/metrics").await;
    assert!(
        m.contains("gateway_rejected_connections_total{reason=\"max_connections\",service=\"\"} 1"),
        "{m}"
    );
    // and served once the first ends.
    drop(held);
    eventually("the place given back", || async {
        call_gw(&gw, sni).await.is_ok()
    })
    .await;
}
