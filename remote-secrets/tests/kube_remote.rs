//! remote-secrets reading its own cluster and a remote one through the Kubernetes API: two of
//! `testkit`'s fake API servers stand in for real ones (none can run here). The local one holds
//! the kubeconfig Secret of the remote one; the real kube-rs client watches both.

use base64::Engine;
use remote_secrets::app::App;
use remote_secrets::config::ServeConfig;
use serde_json::json;
use testkit::FakeApiServer;
use testkit::eventually;

fn httpbin(fake: &FakeApiServer, ips: &[&str]) {
    fake.apply(json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "httpbin", "namespace": "bar",
                     "labels": {"multicluster.x-k8s.io/exported": "true"}},
        "spec": {"ports": [{"name": "http", "port": 8000}]}}));
    let endpoints: Vec<_> = ips
        .iter()
        .map(|ip| json!({"addresses": [ip], "conditions": {"ready": true}}))
        .collect();
    fake.apply(
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "httpbin-1", "namespace": "bar",
                     "labels": {"kubernetes.io/service-name": "httpbin"}},
        "addressType": "IPv4", "endpoints": endpoints,
        "ports": [{"name": "http", "port": 8000}]}),
    );
}

fn endpoints(app: &App, cluster: &str) -> Option<usize> {
    let view = app.clusters.current();
    let c = view.clusters.get(cluster)?;
    let s = c.snapshot.service("bar", "httpbin")?;
    Some(s.endpoint_sets.iter().map(|e| e.endpoints.len()).sum())
}

#[tokio::test]
async fn remote_clusters_from_kubeconfig_secrets_over_the_api() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let local = FakeApiServer::start().await;
    let remote = FakeApiServer::start().await;
    httpbin(&local, &["127.0.1.10"]);
    httpbin(&remote, &["127.0.2.10"]);
    let b64 = base64::engine::general_purpose::STANDARD.encode(remote.kubeconfig());
    local.apply(json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "istio-remote-secret-cluster-2", "namespace": "istio-system",
                     "labels": {"istio/multiCluster": "true"}},
        "data": {"cluster-2": b64}}));

    let dir = tempfile::tempdir().unwrap();
    let mut config = ServeConfig::for_tests("cluster-1", "network1", dir.path().to_path_buf());
    config.source.config_dir = None;
    config.source.kubeconfig = Some(local.write_kubeconfig(dir.path()));
    let app = App::start(config).await.expect("starts");

    eventually("local ready", || app.readiness.is_ready()).await;
    assert_eq!(endpoints(&app, "cluster-1"), Some(1));
    eventually("remote attached once synced", || {
        endpoints(&app, "cluster-2") == Some(1)
    })
    .await;

    // A change in the remote cluster reaches the view.
    httpbin(&remote, &["127.0.2.10", "127.0.2.11"]);
    eventually("remote scaled", || endpoints(&app, "cluster-2") == Some(2)).await;

    // The remote API server dies: its endpoints stay, marked stale; it comes back.
    remote.kill();
    eventually("remote stale", || {
        app.clusters.current().clusters["cluster-2"].stale
    })
    .await;
    assert_eq!(endpoints(&app, "cluster-2"), Some(2), "last known kept");
    remote.restart().await;
    eventually("remote fresh again", || {
        !app.clusters.current().clusters["cluster-2"].stale
    })
    .await;

    // The secret is deleted: the cluster goes.
    local.delete(
        "v1",
        "Secret",
        "istio-system",
        "istio-remote-secret-cluster-2",
    );
    eventually("remote detached", || {
        !app.clusters.current().clusters.contains_key("cluster-2")
    })
    .await;
    app.stop();
}
