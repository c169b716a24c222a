//! The dns server reading ServiceEntries from the Kubernetes API: `testkit`'s fake API server
//! stands in for a real one (none can run here), reached by the real kube-rs client through a
//! kubeconfig file passed as `--kubeconfig` (KUBECONFIG is never set in this process).
//! ServiceEntries created, changed and deleted there change the answers; a killed API server
//! leaves the last answers serving; readiness waits for the first full list.

use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use dns::{Config, Dns};
use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use serde_json::{Value, json};
use testkit::FakeApiServer;
use testkit::eventually_within;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

/// How long any single network step may take before the test fails.
const STEP: Duration = Duration::from_secs(5);
/// How long the API source gets to converge (it backs off up to 30s after a lost server).
const CONVERGE: Duration = Duration::from_secs(40);

const HTTPBIN: &str = "httpbin.bar.global.";
const REVIEWS: &str = "reviews.bar.global.";

fn service_entry(namespace: &str, name: &str, host: &str, addresses: &[&str]) -> Value {
    let mut spec = json!({
        "hosts": [host],
        "location": "MESH_INTERNAL",
        "ports": [{"name": "http", "number": 8000, "protocol": "HTTP"}],
        "resolution": "DNS",
        "endpoints": [{"address": "172.18.0.10", "network": "network-2",
                       "ports": {"http": 15443}}],
    });
    if !addresses.is_empty() {
        spec["addresses"] = json!(addresses);
    }
    json!({"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
           "metadata": {"name": name, "namespace": namespace}, "spec": spec})
}

async fn start(fake: &FakeApiServer, dir: &tempfile::TempDir, namespaces: &[&str]) -> Dns {
    let mut config = Config::for_tests_with_kubeconfig(fake.write_kubeconfig(dir.path()));
    config.source.watch_namespaces = namespaces.iter().map(|s| s.to_string()).collect();
    // A drain long enough that answers go on for the rest of a test that begins termination.
    config.lifecycle.drain_duration = Duration::from_secs(60);
    tokio::time::timeout(STEP, Dns::start(config))
        .await
        .expect("dns did not start in time")
        .expect("dns starts")
}

/// One A query over UDP from a fresh socket: (rcode, addresses).
async fn a(server: SocketAddr, name: &str) -> (ResponseCode, Vec<String>) {
    let mut m = Message::query();
    m.metadata.id = 0x4242;
    m.add_query(Query::query(Name::from_str(name).unwrap(), RecordType::A));
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(&m.to_vec().unwrap(), server).await.unwrap();
    let mut buf = vec![0u8; 65535];
    let (n, _) = tokio::time::timeout(STEP, sock.recv_from(&mut buf))
        .await
        .expect("no UDP reply in time")
        .unwrap();
    let reply = Message::from_vec(&buf[..n]).expect("the reply decodes");
    assert_eq!(reply.metadata.id, m.metadata.id, "reply id matches");
    let addrs = reply
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.to_string()),
            _ => None,
        })
        .collect();
    (reply.metadata.response_code, addrs)
}

async fn addrs(dns: &Dns, name: &str) -> Vec<String> {
    a(dns.dns_addr, name).await.1
}

/// `GET path` over HTTP/1.1; (status, body).
async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(STEP, s.read_to_end(&mut raw))
        .await
        .expect("HTTP response in time")
        .unwrap();
    let text = String::from_utf8_lossy(&raw).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

async fn ready(dns: &Dns) -> bool {
    http_get(dns.status_addr, "/healthz/ready").await.0 == 200
}

#[tokio::test]
async fn service_entries_on_the_api_server_are_answered() {
    let fake = FakeApiServer::start().await;
    fake.apply(service_entry(
        "bar",
        "httpbin-bar",
        "httpbin.bar.global",
        &["240.0.0.2"],
    ));
    let dir = tempfile::tempdir().unwrap();
    let dns = start(&fake, &dir, &[]).await;
    eventually_within("ready", CONVERGE, || ready(&dns)).await;
    assert_eq!(
        a(dns.dns_addr, HTTPBIN).await,
        (ResponseCode::NoError, vec!["240.0.0.2".to_string()])
    );

    // Only ServiceEntries are watched: the dns ServiceAccount may read nothing else.
    let (_, metrics) = http_get(dns.metrics_addr, "/metrics").await;
    let synced: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("kube_source_synced{"))
        .collect();
    assert!(!synced.is_empty(), "{metrics}");
    for line in &synced {
        assert!(line.contains("kind=\"ServiceEntry\""), "{line}");
        assert!(line.contains("cluster=\"cluster-1\""), "{line}");
    }
    let (_, dump) = http_get(dns.admin_addr, "/config_dump").await;
    assert!(dump.contains("kubernetes:cluster-1"), "{dump}");

    // Modify: the answer follows the new address.
    fake.apply(service_entry(
        "bar",
        "httpbin-bar",
        "httpbin.bar.global",
        &["240.0.0.3"],
    ));
    eventually_within("the modified address is answered", CONVERGE, || async {
        addrs(&dns, HTTPBIN).await == ["240.0.0.3"]
    })
    .await;

    // Create one without addresses: a VIP from --vip-range.
    fake.apply(service_entry("bar", "reviews", "reviews.bar.global", &[]));
    eventually_within("a VIP for the new entry", CONVERGE, || async {
        let got = addrs(&dns, REVIEWS).await;
        got.len() == 1 && got[0].starts_with("240.240.")
    })
    .await;

    // Delete: the name is gone, the other stays.
    fake.delete(
        "networking.istio.io/v1",
        "ServiceEntry",
        "bar",
        "httpbin-bar",
    );
    eventually_within("the deleted entry is NXDOMAIN", CONVERGE, || async {
        a(dns.dns_addr, HTTPBIN).await.0 == ResponseCode::NXDomain
    })
    .await;
    assert_eq!(addrs(&dns, REVIEWS).await.len(), 1);
    assert!(ready(&dns).await);

    dns.shutdown().await;
}

#[tokio::test]
async fn a_lost_api_server_keeps_answers_then_catches_up() {
    let fake = FakeApiServer::start().await;
    fake.apply(service_entry(
        "bar",
        "httpbin-bar",
        "httpbin.bar.global",
        &["240.0.0.2"],
    ));
    let dir = tempfile::tempdir().unwrap();
    let dns = start(&fake, &dir, &[]).await;
    eventually_within("answered", CONVERGE, || async {
        addrs(&dns, HTTPBIN).await == ["240.0.0.2"]
    })
    .await;

    fake.kill();
    eventually_within("stale in metrics", CONVERGE, || async {
        let (_, m) = http_get(dns.metrics_addr, "/metrics").await;
        m.lines()
            .any(|l| l.starts_with("kube_source_stale_since_seconds{") && !l.ends_with(" 0"))
    })
    .await;
    // The last-known snapshot keeps serving, and the server stays ready.
    for _ in 0..5 {
        assert_eq!(
            a(dns.dns_addr, HTTPBIN).await,
            (ResponseCode::NoError, vec!["240.0.0.2".to_string()]),
            "last answers kept"
        );
    }
    assert!(ready(&dns).await);

    // Changed while it was away.
    fake.apply(service_entry(
        "bar",
        "httpbin-bar",
        "httpbin.bar.global",
        &["240.0.0.9"],
    ));
    fake.restart().await;
    eventually_within("caught up", CONVERGE, || async {
        addrs(&dns, HTTPBIN).await == ["240.0.0.9"]
    })
    .await;

    dns.shutdown().await;
}

#[tokio::test]
async fn not_ready_until_the_first_full_list() {
    let fake = FakeApiServer::start().await;
    fake.apply(service_entry(
        "bar",
        "httpbin-bar",
        "httpbin.bar.global",
        &["240.0.0.2"],
    ));
    fake.kill();
    let dir = tempfile::tempdir().unwrap();
    let dns = start(&fake, &dir, &[]).await;
    assert_eq!(
        http_get(dns.status_addr, "/healthz/ready").await.0,
        503,
        "not ready before the first list"
    );
    assert!(addrs(&dns, HTTPBIN).await.is_empty());

    fake.restart().await;
    eventually_within("ready", CONVERGE, || ready(&dns)).await;
    assert_eq!(addrs(&dns, HTTPBIN).await, ["240.0.0.2"]);

    // Draining: 503 and it stays so, answers continue until shutdown.
    dns.begin_termination();
    assert_eq!(http_get(dns.status_addr, "/healthz/ready").await.0, 503);
    assert_eq!(addrs(&dns, HTTPBIN).await, ["240.0.0.2"]);
    dns.shutdown().await;
}

#[tokio::test]
async fn watch_namespace_limits_what_is_read() {
    let fake = FakeApiServer::start().await;
    fake.apply(service_entry(
        "bar",
        "httpbin-bar",
        "httpbin.bar.global",
        &["240.0.0.2"],
    ));
    fake.apply(service_entry(
        "other",
        "reviews",
        "reviews.bar.global",
        &["240.0.0.5"],
    ));
    let dir = tempfile::tempdir().unwrap();
    let dns = start(&fake, &dir, &["bar"]).await;
    eventually_within("ready", CONVERGE, || ready(&dns)).await;
    assert_eq!(addrs(&dns, HTTPBIN).await, ["240.0.0.2"]);
    assert_eq!(
        a(dns.dns_addr, REVIEWS).await.0,
        ResponseCode::NXDomain,
        "an entry outside --watch-namespace is not read"
    );
    dns.shutdown().await;
}

#[tokio::test]
async fn an_unreadable_kubeconfig_is_a_start_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    std::fs::write(&path, "this: [is not a kubeconfig").unwrap();
    let config = Config::for_tests_with_kubeconfig(path.clone());
    let err = match Dns::start(config).await {
        Ok(_) => panic!("started with a broken kubeconfig"),
        Err(e) => e,
    };
    // As `anyhow` prints it in main: the error, then its causes.
    let mut chain = vec![err.to_string()];
    let mut cause = std::error::Error::source(&err);
    while let Some(c) = cause {
        chain.push(c.to_string());
        cause = c.source();
    }
    let text = chain.join("\n");
    assert!(chain[0].contains("Kubernetes API source"), "{text}");
    assert!(
        text.contains(&format!("cannot read kubeconfig {}", path.display())),
        "{text}"
    );
}
