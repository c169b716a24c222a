use std::sync::Mutex;

use registry::snapshot::Labels;
use registry::source::dir::snapshot_from_yaml;
use registry::source::{SnapshotWriter, channel};

use super::*;
use crate::eds::EdsOptions;
use crate::kubeconfig::tests::istioctl_kubeconfig;
use crate::mesh_networks::MeshNetworks;
use testkit::eventually;

fn secret(data: &[(&str, String)], multicluster: bool) -> SecretInfo {
    let mut labels = Labels::new();
    if multicluster {
        labels.insert(MULTICLUSTER_LABEL.into(), "true".into());
    }
    SecretInfo {
        labels,
        annotations: Labels::new(),
        data: data
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone().into_bytes()))
            .collect(),
    }
}

fn kc(server: &str) -> String {
    istioctl_kubeconfig("c", server)
}

fn name(n: &str) -> ServiceName {
    ServiceName::new("istio-system", n)
}

fn kinds(actions: &[Action]) -> Vec<String> {
    actions
        .iter()
        .map(|a| match a {
            Action::Start { cluster, .. } => format!("start {cluster}"),
            Action::Replace { cluster, .. } => format!("replace {cluster}"),
            Action::Stop { cluster } => format!("stop {cluster}"),
        })
        .collect()
}

#[test]
fn lifecycle_add_change_delete() {
    let mut c = SecretsController::new("istio-system", "cluster-1", false);
    let mut secrets = BTreeMap::new();
    secrets.insert(name("s2"), secret(&[("cluster-2", kc("https://a"))], true));
    assert_eq!(kinds(&c.reconcile(&secrets)), ["start cluster-2"]);
    // Nothing changed: nothing to do.
    assert!(c.reconcile(&secrets).is_empty());
    // Changed kubeconfig: replace.
    secrets.insert(name("s2"), secret(&[("cluster-2", kc("https://b"))], true));
    assert_eq!(kinds(&c.reconcile(&secrets)), ["replace cluster-2"]);
    assert_eq!(c.status().clusters[0].server, "https://b");
    // A second key in the same secret, then the first key deleted.
    secrets.insert(
        name("s2"),
        secret(
            &[
                ("cluster-2", kc("https://b")),
                ("cluster-3", kc("https://c")),
            ],
            true,
        ),
    );
    assert_eq!(kinds(&c.reconcile(&secrets)), ["start cluster-3"]);
    secrets.insert(name("s2"), secret(&[("cluster-3", kc("https://c"))], true));
    assert_eq!(kinds(&c.reconcile(&secrets)), ["stop cluster-2"]);
    // The secret deleted.
    secrets.clear();
    assert_eq!(kinds(&c.reconcile(&secrets)), ["stop cluster-3"]);
    assert!(c.status().clusters.is_empty());
}

#[test]
fn only_labelled_secrets_in_the_namespace() {
    let mut c = SecretsController::new("istio-system", "cluster-1", false);
    let mut secrets = BTreeMap::new();
    secrets.insert(
        name("unlabelled"),
        secret(&[("cluster-2", kc("https://a"))], false),
    );
    secrets.insert(
        ServiceName::new("default", "elsewhere"),
        secret(&[("cluster-3", kc("https://a"))], true),
    );
    assert!(c.reconcile(&secrets).is_empty());
}

#[test]
fn duplicate_cluster_id_second_is_rejected() {
    let mut c = SecretsController::new("istio-system", "cluster-1", false);
    let mut secrets = BTreeMap::new();
    secrets.insert(
        name("b-first"),
        secret(&[("cluster-2", kc("https://a"))], true),
    );
    assert_eq!(kinds(&c.reconcile(&secrets)), ["start cluster-2"]);
    // A new secret sorting earlier claims the same id: the running one keeps it.
    secrets.insert(
        name("a-second"),
        secret(&[("cluster-2", kc("https://x"))], true),
    );
    assert!(c.reconcile(&secrets).is_empty());
    let st = c.status();
    assert_eq!(st.clusters[0].secret, "istio-system/b-first");
    assert_eq!(st.rejected.len(), 1);
    assert_eq!(st.rejected[0].secret, "istio-system/a-second");
    assert!(
        st.rejected[0]
            .reason
            .contains("already provided by Secret istio-system/b-first")
    );
}

#[test]
fn malformed_and_exec_are_reported_and_leave_others_running() {
    let mut c = SecretsController::new("istio-system", "cluster-1", false);
    let exec = kc("https://e").replace(
        "    token: eyJhbGciOi.secret\n",
        "    exec:\n      command: aws\n",
    );
    let mut secrets = BTreeMap::new();
    secrets.insert(
        name("s"),
        secret(
            &[
                ("cluster-2", kc("https://ok")),
                ("cluster-3", "not: [a kubeconfig".into()),
                ("cluster-4", exec.clone()),
                ("cluster-1", kc("https://self")),
                ("Bad_Key", kc("https://k")),
            ],
            true,
        ),
    );
    assert_eq!(kinds(&c.reconcile(&secrets)), ["start cluster-2"]);
    let st = c.status();
    let reasons: BTreeMap<&str, &str> = st
        .rejected
        .iter()
        .map(|r| (r.cluster.as_str(), r.reason.as_str()))
        .collect();
    assert!(
        reasons["cluster-3"].contains("not a kubeconfig"),
        "{reasons:?}"
    );
    assert!(
        reasons["cluster-4"].contains("--allow-kubeconfig-exec"),
        "{reasons:?}"
    );
    assert!(reasons["cluster-1"].contains("own id"), "{reasons:?}");
    assert!(reasons["Bad_Key"].contains("DNS-1123"), "{reasons:?}");
    // Allowed by flag.
    let mut allowed = SecretsController::new("istio-system", "cluster-1", true);
    secrets.insert(name("s"), secret(&[("cluster-4", exec)], true));
    assert_eq!(kinds(&allowed.reconcile(&secrets)), ["start cluster-4"]);
}

#[test]
fn a_bad_rotation_keeps_the_running_client() {
    let mut c = SecretsController::new("istio-system", "cluster-1", false);
    let mut secrets = BTreeMap::new();
    secrets.insert(name("s"), secret(&[("cluster-2", kc("https://a"))], true));
    c.reconcile(&secrets);
    secrets.insert(
        name("s"),
        secret(&[("cluster-2", "garbage: [".into())], true),
    );
    assert!(c.reconcile(&secrets).is_empty(), "no stop, no replace");
    let st = c.status();
    assert_eq!(st.clusters[0].server, "https://a");
    assert!(st.rejected[0].reason.contains("keeps running"));
}

/// A connector handing out writers the test controls, by server URL.
#[derive(Default)]
struct FakeConnector {
    writers: Mutex<BTreeMap<String, SnapshotWriter>>,
}

impl RemoteConnector for FakeConnector {
    fn connect(&self, _: &str, client: &ClientConfig) -> Result<SnapshotHandle, ConnectError> {
        let (w, h) = channel();
        self.writers
            .lock()
            .unwrap()
            .insert(client.server.clone(), w);
        Ok(h)
    }
}

const REMOTE_A: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: ns}\nspec: {ports: [{port: 80}]}\n";
const REMOTE_B: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: b, namespace: ns}\nspec: {ports: [{port: 80}]}\n";

fn secrets_yaml(server: Option<&str>) -> String {
    match server {
        None => String::new(),
        Some(s) => format!(
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: istio-remote-secret-cluster-2\n  namespace: istio-system\n  labels: {{istio/multiCluster: \"true\"}}\nstringData:\n  cluster-2: |\n{}",
            kc(s)
                .lines()
                .map(|l| format!("    {l}\n"))
                .collect::<String>()
        ),
    }
}

fn services(clusters: &Clusters, id: &str) -> Option<Vec<String>> {
    let view = clusters.current();
    let c = view.clusters.get(id)?;
    Some(c.snapshot.services.keys().map(|k| k.name.clone()).collect())
}

#[tokio::test]
async fn rotation_switches_only_after_the_new_client_synced() {
    let stop = CancellationToken::new();
    let clusters = Clusters::start(
        "cluster-1".into(),
        Arc::new(MeshNetworks::default()),
        EdsOptions::default(),
        stop.clone(),
    );
    let (local_writer, local) = channel();
    let connector = Arc::new(FakeConnector::default());
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Arc::new(ClusterMetrics::new(&mut registry));
    let (status_tx, status) = watch::channel(SecretsStatus::default());
    tokio::spawn(run(
        SecretsController::new("istio-system", "cluster-1", false),
        local,
        connector.clone(),
        clusters.clone(),
        metrics,
        status_tx,
        stop.clone(),
    ));
    // Added: attached once its first sync is done.
    local_writer.publish(snapshot_from_yaml(&secrets_yaml(Some("https://a"))));
    let writer_a = eventually("connect a", || {
        connector.writers.lock().unwrap().remove("https://a")
    })
    .await;
    assert_eq!(status.borrow().clusters[0].state, "syncing");
    assert!(
        services(&clusters, "cluster-2").is_none(),
        "not before its sync"
    );
    writer_a.publish(snapshot_from_yaml(REMOTE_A));
    eventually("cluster-2 attached", || {
        services(&clusters, "cluster-2").filter(|s| s == &["a"])
    })
    .await;
    // Rotated: the old client keeps serving until the new one has synced.
    local_writer.publish(snapshot_from_yaml(&secrets_yaml(Some("https://b"))));
    let writer_b = eventually("connect b", || {
        connector.writers.lock().unwrap().remove("https://b")
    })
    .await;
    writer_a.publish(snapshot_from_yaml(REMOTE_A));
    eventually("status syncing", || {
        (status.borrow().clusters[0].state == "syncing").then_some(())
    })
    .await;
    assert_eq!(services(&clusters, "cluster-2").unwrap(), ["a"], "no gap");
    writer_b.publish(snapshot_from_yaml(REMOTE_B));
    eventually("switched to b", || {
        services(&clusters, "cluster-2").filter(|s| s == &["b"])
    })
    .await;
    // Updates from the replaced client are ignored.
    writer_a.publish(snapshot_from_yaml(REMOTE_A));
    writer_b.publish(snapshot_from_yaml(REMOTE_B));
    eventually("still b", || {
        services(&clusters, "cluster-2").filter(|s| s == &["b"])
    })
    .await;
    // Deleted: dropped.
    local_writer.publish(snapshot_from_yaml(&secrets_yaml(None)));
    eventually("dropped", || {
        services(&clusters, "cluster-2").is_none().then_some(())
    })
    .await;
    stop.cancel();
}

#[tokio::test]
async fn without_the_kubernetes_source_a_valid_secret_is_reported_honestly() {
    let stop = CancellationToken::new();
    let clusters = Clusters::start(
        "cluster-1".into(),
        Arc::new(MeshNetworks::default()),
        EdsOptions::default(),
        stop.clone(),
    );
    let (local_writer, local) = channel();
    let mut registry = prometheus_client::registry::Registry::default();
    let (status_tx, mut status) = watch::channel(SecretsStatus::default());
    tokio::spawn(run(
        SecretsController::new("istio-system", "cluster-1", false),
        local,
        Arc::new(PendingKubernetesSource),
        clusters.clone(),
        Arc::new(ClusterMetrics::new(&mut registry)),
        status_tx,
        stop.clone(),
    ));
    local_writer.publish(snapshot_from_yaml(&secrets_yaml(Some("https://a"))));
    let st = status
        .wait_for(|s| !s.clusters.is_empty())
        .await
        .unwrap()
        .clone();
    assert_eq!(st.clusters[0].state, NEEDS_KUBERNETES_SOURCE);
    assert!(clusters.current().clusters.is_empty());
    stop.cancel();
}
