//! The control plane in-process: two file-backed clusters on different networks, a tonic xDS
//! client in network1, over plaintext and mutual TLS.

use std::path::Path;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterLoadAssignment, lb_endpoint};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::{Struct, Value, value};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use prost::Message;
use remote_secrets::app::App;
use remote_secrets::config::ServeConfig;
use remote_secrets::xds::EDS_TYPE;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

const NAME: &str = "outbound|8000||httpbin.bar.global";
const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

struct Mesh {
    _dir: tempfile::TempDir,
    c2: std::path::PathBuf,
    app: App,
}

async fn start(tls: Option<&Path>) -> Mesh {
    start_with(tls, |_| {}).await
}

async fn start_with(tls: Option<&Path>, adjust: impl FnOnce(&mut ServeConfig)) -> Mesh {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let c1 = dir.path().join("cluster-1");
    let c2 = dir.path().join("cluster-2");
    copy_dir(&Path::new(FIXTURES).join("cluster-1"), &c1);
    copy_dir(&Path::new(FIXTURES).join("cluster-2"), &c2);
    let mut config = ServeConfig::for_tests("cluster-1", "network1", c1);
    config.remote_config_dirs = vec![format!("cluster-2={}", c2.display()).parse().unwrap()];
    config.mesh_networks = Some(Path::new(FIXTURES).join("mesh-networks.yaml"));
    if let Some(t) = tls {
        config.xds_tls_cert_chain = Some(t.join("server/cert-chain.pem"));
        config.xds_tls_key = Some(t.join("server/key.pem"));
        config.xds_tls_root_cert = Some(t.join("server/root-cert.pem"));
    }
    adjust(&mut config);
    let app = App::start(config).await.unwrap();
    Mesh { _dir: dir, c2, app }
}

fn node(network: &str) -> Option<Node> {
    let mut fields = std::collections::HashMap::new();
    fields.insert(
        "NETWORK".to_string(),
        Value {
            kind: Some(value::Kind::StringValue(network.into())),
        },
    );
    Some(Node {
        id: "sidecar~10.1.0.9~client.bar~bar.svc.cluster.local".into(),
        metadata: Some(Struct { fields }),
        ..Default::default()
    })
}

async fn next<T>(s: &mut Streaming<T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), s.next())
        .await
        .expect("a response within 10 s")
        .expect("stream open")
        .expect("not an error")
}

/// (zone, address, weight) of every endpoint.
fn endpoints(cla: &ClusterLoadAssignment) -> Vec<(String, String, u32)> {
    let mut out = Vec::new();
    for l in &cla.endpoints {
        for e in &l.lb_endpoints {
            let Some(lb_endpoint::HostIdentifier::Endpoint(ep)) = &e.host_identifier else {
                continue;
            };
            let Some(envoy_types::pb::envoy::config::core::v3::address::Address::SocketAddress(sa)) =
                ep.address.as_ref().and_then(|a| a.address.as_ref())
            else {
                continue;
            };
            let Some(
                envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier::PortValue(
                    p,
                ),
            ) = sa.port_specifier
            else {
                continue;
            };
            out.push((
                l.locality.clone().unwrap_or_default().zone,
                format!("{}:{p}", sa.address),
                e.load_balancing_weight.map(|w| w.value).unwrap_or(1),
            ));
        }
    }
    out
}

fn cla_of(r: &DiscoveryResponse) -> ClusterLoadAssignment {
    assert_eq!(r.type_url, EDS_TYPE);
    ClusterLoadAssignment::decode(r.resources[0].value.as_slice()).unwrap()
}

fn e(zone: &str, addr: &str, w: u32) -> (String, String, u32) {
    (zone.into(), addr.into(), w)
}

/// Add a third ready httpbin endpoint in cluster-2's zone-b.
fn scale_up_cluster_2(c2: &Path) {
    let path = c2.join("mesh.yaml");
    let text = std::fs::read_to_string(&path).unwrap().replace(
        "- addresses: [\"127.0.2.12\"]",
        "- addresses: [\"127.0.2.13\"]\n  conditions: {ready: true}\n  zone: zone-b\n  targetRef: {kind: Pod, name: httpbin-v2, namespace: bar}\n- addresses: [\"127.0.2.12\"]",
    );
    std::fs::write(path, text).unwrap();
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    let code = buf[9..12].parse().unwrap();
    (code, buf)
}

#[tokio::test]
async fn ads_sotw_subscribe_update_ack_nack_unsubscribe() {
    let mesh = start(None).await;
    let mut client =
        AggregatedDiscoveryServiceClient::connect(format!("http://{}", mesh.app.addresses.xds))
            .await
            .unwrap();
    let (tx, rx) = mpsc::channel(8);
    let mut responses = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let request = |names: &[&str], version: &str, nonce: &str| DiscoveryRequest {
        node: node("network1"),
        type_url: EDS_TYPE.into(),
        resource_names: names.iter().map(|s| s.to_string()).collect(),
        version_info: version.into(),
        response_nonce: nonce.into(),
        ..Default::default()
    };
    tx.send(request(&[NAME], "", "")).await.unwrap();
    // The remote may still be loading: wait until network2's gateway is in the answer.
    let mut r = next(&mut responses).await;
    while !endpoints(&cla_of(&r))
        .iter()
        .any(|(_, a, _)| a == "127.0.2.100:15443")
    {
        tx.send(request(&[NAME], &r.version_info, &r.nonce))
            .await
            .unwrap();
        r = next(&mut responses).await;
    }
    assert_eq!(
        endpoints(&cla_of(&r)),
        vec![
            e("zone-a", "127.0.1.11:80", 1),
            e("zone-a", "127.0.2.100:15443", 1),
            e("zone-b", "127.0.2.100:15443", 1),
        ]
    );
    tx.send(request(&[NAME], &r.version_info, &r.nonce))
        .await
        .unwrap();
    // Endpoints change in cluster-2: the weight follows.
    scale_up_cluster_2(&mesh.c2);
    let r2 = next(&mut responses).await;
    assert_ne!(r2.version_info, r.version_info);
    assert_eq!(
        endpoints(&cla_of(&r2)),
        vec![
            e("zone-a", "127.0.1.11:80", 1),
            e("zone-a", "127.0.2.100:15443", 1),
            e("zone-b", "127.0.2.100:15443", 2),
        ]
    );
    // NACK it: counted, and no resend of the same thing.
    let mut nack = request(&[NAME], &r.version_info, &r2.nonce);
    nack.error_detail = Some(RpcStatus {
        code: 3,
        message: "test rejects this".into(),
        details: vec![],
    });
    tx.send(nack).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while mesh.app.xds_metrics.nacks("sotw") == 0 {
        assert!(tokio::time::Instant::now() < deadline, "NACK not counted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Unsubscribe everything: an empty answer.
    tx.send(request(&[], &r.version_info, &r2.nonce))
        .await
        .unwrap();
    let r3 = next(&mut responses).await;
    assert!(r3.resources.is_empty());
    // Readiness and the admin endpoints.
    let (code, _) = http_get(mesh.app.addresses.status, "/healthz/ready").await;
    assert_eq!(code, 200);
    let (code, body) = http_get(
        mesh.app.addresses.admin,
        "/debug/explain?host=httpbin.bar.global&network=network1",
    )
    .await;
    assert_eq!(code, 200);
    assert!(body.contains("127.0.2.100:15443"), "{body}");
    let (_, metrics) = http_get(mesh.app.addresses.metrics, "/metrics").await;
    assert!(
        metrics.contains("xds_nacks_total{kind=\"sotw\"} 1"),
        "{metrics}"
    );
    mesh.app.stop();
}

#[tokio::test]
async fn ads_delta_subscribe_update_unsubscribe_wildcard() {
    let mesh = start(None).await;
    let mut client =
        AggregatedDiscoveryServiceClient::connect(format!("http://{}", mesh.app.addresses.xds))
            .await
            .unwrap();
    let (tx, rx) = mpsc::channel(8);
    let mut responses = client
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let req = |sub: &[&str], unsub: &[&str], nonce: &str| DeltaDiscoveryRequest {
        node: node("network1"),
        type_url: EDS_TYPE.into(),
        resource_names_subscribe: sub.iter().map(|s| s.to_string()).collect(),
        resource_names_unsubscribe: unsub.iter().map(|s| s.to_string()).collect(),
        response_nonce: nonce.into(),
        ..Default::default()
    };
    let cla = |r: &DeltaDiscoveryResponse| {
        ClusterLoadAssignment::decode(r.resources[0].resource.as_ref().unwrap().value.as_slice())
            .unwrap()
    };
    tx.send(req(&[NAME], &[], "")).await.unwrap();
    let mut r = next(&mut responses).await;
    assert_eq!(r.resources[0].name, NAME);
    while !endpoints(&cla(&r))
        .iter()
        .any(|(_, a, _)| a == "127.0.2.100:15443")
    {
        tx.send(req(&[], &[], &r.nonce)).await.unwrap();
        r = next(&mut responses).await;
    }
    tx.send(req(&[], &[], &r.nonce)).await.unwrap();
    scale_up_cluster_2(&mesh.c2);
    let r2 = next(&mut responses).await;
    assert_eq!(r2.resources.len(), 1);
    assert_ne!(r2.resources[0].version, r.resources[0].version);
    assert!(endpoints(&cla(&r2)).contains(&e("zone-b", "127.0.2.100:15443", 2)));
    // Unsubscribe, then subscribe to everything: the wildcard set arrives, ours among them.
    tx.send(req(&[], &[NAME], &r2.nonce)).await.unwrap();
    tx.send(req(&["*"], &[], "")).await.unwrap();
    let r3 = next(&mut responses).await;
    let names: Vec<&str> = r3.resources.iter().map(|r| r.name.as_str()).collect();
    assert!(names.contains(&NAME), "{names:?}");
    assert!(
        names.contains(&"outbound|8000|v1|httpbin.bar.svc.cluster.local"),
        "{names:?}"
    );
    mesh.app.stop();
}

#[tokio::test]
async fn a_remote_that_disappears_keeps_its_endpoints_marked_stale() {
    let mesh = start(None).await;
    let admin = mesh.app.addresses.admin;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, body) = http_get(admin, "/config_dump").await;
        if body.contains("\"ready_endpoints\": 2") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "cluster-2 never loaded: {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    std::fs::remove_dir_all(&mesh.c2).unwrap();
    loop {
        let view = mesh.app.clusters.current();
        let c2 = &view.clusters["cluster-2"];
        if c2.stale {
            assert_eq!(c2.snapshot.services.len(), 2, "last known snapshot kept");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never marked stale");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, body) = http_get(
        admin,
        "/debug/explain?host=httpbin.bar.global&network=network1",
    )
    .await;
    assert!(body.contains("127.0.2.100:15443"), "{body}");
    let (_, metrics) = http_get(mesh.app.addresses.metrics, "/metrics").await;
    assert!(
        metrics.contains("remote_cluster_stale{cluster=\"cluster-2\"} 1"),
        "{metrics}"
    );
    mesh.app.stop();
}

/// SIGTERM's path: streams keep being served through the drain (readiness 503), then each ends
/// with UNAVAILABLE, the status gRPC clients and Envoy retry on another replica, and new
/// connections are refused. Both protocols, since they share the one stream loop.
#[tokio::test]
async fn draining_ends_every_stream_with_unavailable_after_the_drain_period() {
    let drain = Duration::from_millis(500);
    let mesh = start_with(None, |c| c.lifecycle.drain_duration = drain).await;
    let xds = format!("http://{}", mesh.app.addresses.xds);
    let mut client = AggregatedDiscoveryServiceClient::connect(xds.clone())
        .await
        .unwrap();
    let (sotw_tx, rx) = mpsc::channel(8);
    let mut sotw = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    sotw_tx
        .send(DiscoveryRequest {
            node: node("network1"),
            type_url: EDS_TYPE.into(),
            resource_names: vec![NAME.into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let (delta_tx, rx) = mpsc::channel(8);
    let mut delta = client
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    delta_tx
        .send(DeltaDiscoveryRequest {
            node: node("network1"),
            type_url: EDS_TYPE.into(),
            resource_names_subscribe: vec![NAME.into()],
            ..Default::default()
        })
        .await
        .unwrap();
    next(&mut sotw).await;
    next(&mut delta).await;

    let began = std::time::Instant::now();
    mesh.app.begin_termination();
    let (code, _) = http_get(mesh.app.addresses.status, "/healthz/ready").await;
    assert_eq!(
        code, 503,
        "readiness fails from the moment termination begins"
    );
    for (what, ended) in [
        ("sotw", end_status(&mut sotw).await),
        ("delta", end_status(&mut delta).await),
    ] {
        assert_eq!(ended.code(), tonic::Code::Unavailable, "{what}: {ended:?}");
        assert!(ended.message().contains("reconnect"), "{what}: {ended:?}");
    }
    assert!(
        began.elapsed() >= drain,
        "streams are served through the drain period, ended after {:?}",
        began.elapsed()
    );
    testkit::eventually("new xDS connections refused after the drain", || async {
        AggregatedDiscoveryServiceClient::connect(xds.clone())
            .await
            .is_err()
    })
    .await;
    // Every task ends (file-backed remotes' pollers included: they once kept a terminating
    // process alive until the kubelet's SIGKILL).
    tokio::time::timeout(Duration::from_secs(10), mesh.app.wait_terminated())
        .await
        .expect("terminated well before the deadline once every stream ended");
}

/// The status a stream ended with, past the pushes still served during the drain (a panic if
/// it ended cleanly).
async fn end_status<T: std::fmt::Debug>(s: &mut Streaming<T>) -> tonic::Status {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), s.next()).await {
            Ok(Some(Ok(_pushed_during_the_drain))) => continue,
            Ok(Some(Err(status))) => return status,
            other => panic!("expected the stream to end with a status, got {other:?}"),
        }
    }
}
