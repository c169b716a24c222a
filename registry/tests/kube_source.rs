//! The Kubernetes source against `testkit`'s fake API server, which stands in for a real API
//! server (none can run here): the real kube-rs client lists and watches it over HTTP through a
//! kubeconfig file. The kind tests remain the check against a real cluster.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use registry::SnapshotHandle;
use registry::objects::Kind;
use registry::source::kube::{KubeSource, KubeSourceConfig, Metrics, SecretSelector};
use serde_json::{Value, json};
use testkit::FakeApiServer;
use testkit::eventually;
use testkit::fake_apiserver::Options;

fn service(ns: &str, name: &str, port: u16) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": name, "namespace": ns,
                        "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"}},
           "spec": {"selector": {"app": name}, "clusterIP": "10.96.0.10",
                    "ports": [{"name": "http", "port": port, "targetPort": 8080}]}})
}

fn slice(ns: &str, service: &str, ips: &[&str]) -> Value {
    let endpoints: Vec<Value> = ips
        .iter()
        .enumerate()
        .map(|(i, ip)| json!({"addresses": [ip], "conditions": {"ready": true},
                              "targetRef": {"kind": "Pod", "namespace": ns, "name": format!("{service}-{i}")}}))
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": format!("{service}-abc"), "namespace": ns,
                        "labels": {"kubernetes.io/service-name": service}},
           "addressType": "IPv4", "endpoints": endpoints,
           "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]})
}

fn pod(ns: &str, name: &str, version: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": ns, "labels": {"version": version}},
           "spec": {"containers": [{"name": "app", "image": "httpbin"}]}})
}

fn config(kinds: &[Kind], namespaces: &[&str]) -> KubeSourceConfig {
    let mut c = KubeSourceConfig::new(
        "cluster-1",
        kinds,
        namespaces.iter().map(|s| s.to_string()).collect(),
    );
    c.debounce = Duration::from_millis(50);
    c.backoff_min = Duration::from_millis(50);
    c.backoff_max = Duration::from_millis(400);
    c.crd_recheck = Duration::from_millis(200);
    c
}

struct Running {
    source: KubeSource,
    registry: Registry,
    _dir: tempfile::TempDir,
}

impl Running {
    fn handle(&self) -> &SnapshotHandle {
        &self.source.handle
    }
    fn metrics_text(&self) -> String {
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, &self.registry).unwrap();
        s
    }
}

async fn start(fake: &FakeApiServer, config: KubeSourceConfig) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = fake.write_kubeconfig(dir.path());
    let client = registry::source::kube::client_from_kubeconfig_file(&kubeconfig)
        .await
        .unwrap();
    let mut registry = Registry::default();
    let metrics = Arc::new(Metrics::new(&mut registry));
    Running {
        source: KubeSource::start(client, config, metrics),
        registry,
        _dir: dir,
    }
}

fn ips(h: &SnapshotHandle, ns: &str, name: &str) -> Vec<String> {
    let snap = h.current();
    let Some(s) = snap.service(ns, name) else {
        return Vec::new();
    };
    let mut v: Vec<String> = s
        .endpoint_sets
        .iter()
        .flat_map(|set| set.endpoints.iter().map(|e| e.address.to_string()))
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn initial_sync_then_add_modify_delete() {
    let fake = FakeApiServer::start().await;
    fake.apply(service("bar", "httpbin", 8000));
    fake.apply(slice("bar", "httpbin", &["10.1.0.1", "10.1.0.2"]));
    fake.apply(pod("bar", "httpbin-0", "v1"));
    fake.apply(pod("bar", "httpbin-1", "v2"));
    fake.apply(
        json!({"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceExport",
                      "metadata": {"name": "httpbin", "namespace": "bar"}}),
    );
    fake.apply(json!({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
                      "metadata": {"name": "httpbin", "namespace": "bar"},
                      "spec": {"host": "httpbin", "subsets": [{"name": "v2", "labels": {"version": "v2"}}]}}));
    fake.apply(
        json!({"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
                      "metadata": {"name": "httpbin-global", "namespace": "bar"},
                      "spec": {"hosts": ["httpbin.bar.global"], "addresses": ["240.0.0.2"]}}),
    );
    let r = start(&fake, config(KubeSourceConfig::ALL_KINDS, &[])).await;
    tokio::time::timeout(Duration::from_secs(30), r.handle().wait_synced())
        .await
        .expect("first sync");

    let snap = r.handle().current();
    let svc = snap.service("bar", "httpbin").expect("service synced");
    assert!(svc.exported, "ServiceExport read");
    assert_eq!(svc.subsets["v2"]["version"], "v2", "DestinationRule read");
    let labels: Vec<&str> = svc.endpoint_sets[0]
        .endpoints
        .iter()
        .map(|e| e.labels["version"].as_str())
        .collect();
    assert_eq!(
        labels,
        ["v1", "v2"],
        "pod labels through the metadata-only watch"
    );
    assert_eq!(snap.service_entries[0].hosts, ["httpbin.bar.global"]);
    assert_eq!(snap.status.source, "kubernetes:cluster-1");
    assert!(
        snap.status
            .watches
            .iter()
            .all(|w| w.synced && w.state == "watching")
    );
    assert!(snap.status.stale_since.is_none());

    // Add.
    fake.apply(service("bar", "echo", 9000));
    fake.apply(slice("bar", "echo", &["10.1.0.9"]));
    eventually("new service", || {
        ips(r.handle(), "bar", "echo") == ["10.1.0.9"]
    })
    .await;
    // Modify.
    fake.apply(slice("bar", "httpbin", &["10.1.0.1", "10.1.0.3"]));
    eventually("modified slice", || {
        ips(r.handle(), "bar", "httpbin") == ["10.1.0.1", "10.1.0.3"]
    })
    .await;
    // Delete.
    fake.delete("v1", "Service", "bar", "echo");
    eventually("deleted service", || {
        r.handle().current().service("bar", "echo").is_none()
    })
    .await;
    assert!(r.handle().current().status.last_event.is_some());
    let text = r.metrics_text();
    assert!(
        text.contains(r#"kube_source_synced{cluster="cluster-1",kind="Service",namespace="*"} 1"#),
        "{text}"
    );
}

#[tokio::test]
async fn relists_after_410_gone_and_swaps_the_list_in_whole() {
    let fake = FakeApiServer::start().await;
    fake.apply(service("bar", "a", 80));
    fake.apply(service("bar", "b", 80));
    let r = start(&fake, config(&[Kind::Service], &[])).await;
    r.handle().wait_synced().await;
    // The API server goes away; meanwhile objects change and etcd compacts its history, so
    // the version the client resumes from is too old when it is back.
    fake.kill();
    fake.delete("v1", "Service", "bar", "a");
    fake.apply(service("bar", "c", 80));
    fake.compact();
    fake.restart().await;
    eventually("re-listed", || {
        let s = r.handle().current();
        s.service("bar", "a").is_none() && s.service("bar", "c").is_some()
    })
    .await;
    assert!(r.handle().current().service("bar", "b").is_some());
    let text = r.metrics_text();
    assert!(
        text.contains(
            r#"kube_source_relists_total{cluster="cluster-1",kind="Service",namespace="*"} 1"#
        ),
        "{text}"
    );
}

#[tokio::test]
async fn large_lists_are_read_in_pages_and_an_expired_page_starts_over() {
    let fake = FakeApiServer::start().await;
    let n = 2 * registry::source::kube::LIST_PAGE as usize + 7;
    for i in 0..n {
        fake.apply(service(&format!("ns{}", i % 7), &format!("s{i}"), 80));
    }
    // The token handed out with the first page has expired by the time it is used.
    fake.expire_next_continue();
    let r = start(&fake, config(&[Kind::Service], &[])).await;
    r.handle().wait_synced().await;
    let snap = r.handle().current();
    for i in 0..n {
        assert!(
            snap.service(&format!("ns{}", i % 7), &format!("s{i}"))
                .is_some(),
            "s{i} missing"
        );
    }
    // One page before the expired token, then three pages from the start.
    assert!(fake.paged_lists() >= 4, "{} pages", fake.paged_lists());
}

#[tokio::test]
async fn api_server_killed_keeps_serving_then_resyncs() {
    let fake = FakeApiServer::start().await;
    fake.apply(service("bar", "a", 80));
    let r = start(&fake, config(&[Kind::Service, Kind::EndpointSlice], &[])).await;
    r.handle().wait_synced().await;
    let health = r.handle().health();
    fake.kill();
    eventually("marked stale", || {
        !*health.borrow() && r.handle().current().status.stale_since.is_some()
    })
    .await;
    assert!(
        r.handle().current().service("bar", "a").is_some(),
        "last-known objects keep serving"
    );
    let text = r.metrics_text();
    assert!(
        !text
            .contains(r#"stale_since_seconds{cluster="cluster-1",kind="Service",namespace="*"} 0"#),
        "{text}"
    );
    // Changed while it was down; seen once it is back.
    fake.apply(service("bar", "b", 80));
    fake.restart().await;
    eventually("resynced", || {
        let s = r.handle().current();
        *health.borrow() && s.status.stale_since.is_none() && s.service("bar", "b").is_some()
    })
    .await;
    assert!(r.handle().current().service("bar", "a").is_some());
}

#[tokio::test]
async fn dropped_watch_connections_resume_without_loss() {
    let fake = FakeApiServer::start().await;
    let r = start(&fake, config(&[Kind::Service], &[])).await;
    r.handle().wait_synced().await;
    for i in 0..5 {
        fake.drop_watches();
        fake.apply(service("bar", &format!("s{i}"), 80));
    }
    eventually("all five", || r.handle().current().services.len() == 5).await;
}

#[tokio::test]
async fn missing_crds_are_not_fatal_and_are_picked_up_once_installed() {
    let fake = FakeApiServer::start_with(Options {
        istio_versions: vec![],
        mcs: false,
        ..Options::default()
    })
    .await;
    fake.apply(service("bar", "a", 80));
    let r = start(&fake, config(KubeSourceConfig::ALL_KINDS, &[])).await;
    tokio::time::timeout(Duration::from_secs(30), r.handle().wait_synced())
        .await
        .expect("synced without the CRDs");
    let snap = r.handle().current();
    assert!(snap.service("bar", "a").is_some());
    let missing: Vec<&str> = snap
        .status
        .watches
        .iter()
        .filter(|w| w.state == "crd not installed")
        .map(|w| w.kind.as_str())
        .collect();
    assert_eq!(
        missing,
        ["ServiceEntry", "DestinationRule", "ServiceExport"]
    );
    // Installed later, served as v1beta1 only: found and read in that version.
    fake.install("networking.istio.io", &["v1beta1"]);
    fake.apply(
        json!({"apiVersion": "networking.istio.io/v1beta1", "kind": "ServiceEntry",
                      "metadata": {"name": "se", "namespace": "bar"},
                      "spec": {"hosts": ["a.bar.global"]}}),
    );
    eventually("service entry after install", || {
        r.handle().current().service_entries.len() == 1
    })
    .await;
    let snap = r.handle().current();
    let w = snap
        .status
        .watches
        .iter()
        .find(|w| w.kind == "ServiceEntry")
        .unwrap();
    assert_eq!(w.api_version, "networking.istio.io/v1beta1");
    assert!(r.metrics_text().contains(
        r#"kube_source_crd_missing{cluster="cluster-1",kind="ServiceExport",namespace="*"} 1"#
    ));
}

#[tokio::test]
async fn namespaces_and_secret_selector_scope_what_is_read() {
    let fake = FakeApiServer::start().await;
    fake.apply(service("a", "s", 80));
    fake.apply(service("b", "s", 80));
    fake.apply(service("c", "s", 80));
    let secret = |ns: &str, name: &str, labelled: bool| {
        let labels = if labelled {
            json!({"istio/multiCluster": "true"})
        } else {
            json!({})
        };
        json!({"apiVersion": "v1", "kind": "Secret",
               "metadata": {"name": name, "namespace": ns, "labels": labels,
                            "annotations": {"networking.istio.io/cluster": "cluster-2"}},
               "data": {"cluster-2": "a3ViZWNvbmZpZw=="}})
    };
    fake.apply(secret("istio-system", "remote", true));
    fake.apply(secret("istio-system", "other", false));
    fake.apply(secret("a", "remote", true));
    let mut c = config(&[Kind::Service], &["a", "b"]);
    c.secrets = Some(SecretSelector {
        namespace: "istio-system".into(),
        label_selector: "istio/multiCluster=true".into(),
    });
    let r = start(&fake, c).await;
    r.handle().wait_synced().await;
    let snap = r.handle().current();
    let names: Vec<String> = snap.services.keys().map(|k| k.to_string()).collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(snap.service("c", "s").is_none());
    let secrets: Vec<String> = snap.secrets.keys().map(|k| k.to_string()).collect();
    assert_eq!(secrets.len(), 1, "{secrets:?}");
    let s = snap.secrets.values().next().unwrap();
    assert_eq!(s.data["cluster-2"], b"kubeconfig");
    assert_eq!(s.annotations["networking.istio.io/cluster"], "cluster-2");
}

#[tokio::test]
async fn dropping_every_handle_stops_the_source() {
    let fake = FakeApiServer::start().await;
    let r = start(&fake, config(&[Kind::Service], &[])).await;
    r.handle().wait_synced().await;
    let Running { source, .. } = r;
    let (handle, task) = source.into_parts();
    drop(handle);
    tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("source stops once no reader is left")
        .unwrap();
}
