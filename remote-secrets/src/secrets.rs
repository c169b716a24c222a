//! Kubeconfig Secrets (`istio/multiCluster=true` in the secrets namespace) -> remote clusters.
//!
//! [`SecretsController::reconcile`] is pure: from the local cluster's Secrets to actions.
//! - a new cluster id -> `Start`; its kubeconfig changed (hash) -> `Replace`; its key or Secret
//!   gone -> `Stop`;
//! - the same cluster id in two Secrets: the one already serving it (else the first by
//!   namespace/name) keeps it, the other is rejected and reported;
//! - a malformed kubeconfig, an invalid cluster id, the local cluster's own id, or an exec /
//!   auth-provider kubeconfig without `--allow-kubeconfig-exec` is rejected and reported; a
//!   cluster already running keeps its previous, good client.
//!
//! [`run`] carries the actions out through a [`RemoteConnector`]: a new client is attached to the
//! multi-cluster registry only once it has synced, so a rotated secret never leaves a gap.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

use registry::naming::is_dns1123_label;
use registry::snapshot::SecretInfo;
use registry::{ServiceName, SnapshotHandle};
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::clusters::Clusters;
use crate::kubeconfig::{self, ClientConfig};
use crate::metrics::{ClusterMetrics, SecretLabels};
use crate::view::ClusterSource;

pub const MULTICLUSTER_LABEL: &str = "istio/multiCluster";
/// What the status shows for a valid kubeconfig until the Kubernetes source exists.
pub const NEEDS_KUBERNETES_SOURCE: &str =
    "validated; watching through kubeconfig needs the Kubernetes source (issue 4)";

/// Starts watching a cluster from a kubeconfig: returns the handle of its snapshots.
pub trait RemoteConnector: Send + Sync + 'static {
    fn connect(
        &self,
        cluster_id: &str,
        client: &ClientConfig,
    ) -> Result<SnapshotHandle, ConnectError>;
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    #[error("{NEEDS_KUBERNETES_SOURCE}")]
    NeedsKubernetesSource,
    #[error("cannot connect to {server}: {reason}")]
    Failed { server: String, reason: String },
}

/// The connector until the Kubernetes source lands: validates, never pretends to connect.
#[derive(Debug, Default)]
pub struct PendingKubernetesSource;

impl RemoteConnector for PendingKubernetesSource {
    fn connect(&self, _: &str, _: &ClientConfig) -> Result<SnapshotHandle, ConnectError> {
        Err(ConnectError::NeedsKubernetesSource)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Start {
        cluster: String,
        secret: ServiceName,
        client: Box<ClientConfig>,
        hash: u64,
    },
    Replace {
        cluster: String,
        secret: ServiceName,
        client: Box<ClientConfig>,
        hash: u64,
    },
    Stop {
        cluster: String,
    },
}

/// One Secret entry that is not used, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Rejection {
    pub secret: String,
    pub cluster: String,
    pub reason: String,
}

/// A cluster served from a Secret.
#[derive(Clone, Debug, Serialize)]
pub struct SecretCluster {
    pub cluster: String,
    pub secret: String,
    #[serde(serialize_with = "hex")]
    pub hash: u64,
    pub server: String,
    /// `connecting`, `syncing`, `watching`, or why it is not watched.
    pub state: String,
}

fn hex<S: serde::Serializer>(h: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&format_args!("{h:016x}"))
}

/// What `/config_dump` shows about secrets.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SecretsStatus {
    pub namespace: String,
    pub clusters: Vec<SecretCluster>,
    pub rejected: Vec<Rejection>,
}

#[derive(Debug)]
pub struct SecretsController {
    namespace: String,
    local_cluster: String,
    allow_exec: bool,
    entries: BTreeMap<String, SecretCluster>,
    rejected: Vec<Rejection>,
}

fn hash_of(bytes: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

impl SecretsController {
    pub fn new(namespace: &str, local_cluster: &str, allow_exec: bool) -> SecretsController {
        SecretsController {
            namespace: namespace.into(),
            local_cluster: local_cluster.into(),
            allow_exec,
            entries: BTreeMap::new(),
            rejected: Vec::new(),
        }
    }

    pub fn status(&self) -> SecretsStatus {
        SecretsStatus {
            namespace: self.namespace.clone(),
            clusters: self.entries.values().cloned().collect(),
            rejected: self.rejected.clone(),
        }
    }

    pub fn set_state(&mut self, cluster: &str, hash: u64, state: &str) {
        if let Some(e) = self.entries.get_mut(cluster).filter(|e| e.hash == hash) {
            e.state = state.to_string();
        }
    }

    /// Compare the Secrets with what runs; return what to do. Rejections are recomputed.
    pub fn reconcile(&mut self, secrets: &BTreeMap<ServiceName, SecretInfo>) -> Vec<Action> {
        let mut rejected = Vec::new();
        // cluster id -> every (secret, kubeconfig bytes) offering it, in namespace/name order.
        let mut offers: BTreeMap<&str, Vec<(&ServiceName, &[u8])>> = BTreeMap::new();
        for (name, info) in secrets {
            if name.namespace != self.namespace
                || info.labels.get(MULTICLUSTER_LABEL).map(String::as_str) != Some("true")
            {
                continue;
            }
            for (key, value) in &info.data {
                offers.entry(key).or_default().push((name, value));
            }
        }
        let mut actions = Vec::new();
        let mut kept = BTreeSet::new();
        for (cluster, offers) in offers {
            let reject = |secret: &ServiceName, reason: String| Rejection {
                secret: secret.to_string(),
                cluster: cluster.to_string(),
                reason,
            };
            // The Secret already serving the id keeps it; else the first one.
            let running = self.entries.get(cluster).map(|e| e.secret.clone());
            let owner = offers
                .iter()
                .position(|(s, _)| Some(s.to_string()) == running)
                .unwrap_or(0);
            let (secret, bytes) = offers[owner];
            for (i, (other, _)) in offers.iter().enumerate() {
                if i != owner {
                    rejected.push(reject(
                        other,
                        format!("cluster id {cluster} is already provided by Secret {secret}"),
                    ));
                }
            }
            if !is_dns1123_label(cluster) {
                rejected.push(reject(
                    secret,
                    format!("key {cluster:?} is not a cluster id (a DNS-1123 label)"),
                ));
                continue;
            }
            if cluster == self.local_cluster {
                rejected.push(reject(
                    secret,
                    format!("{cluster} is this cluster's own id"),
                ));
                continue;
            }
            let hash = hash_of(bytes);
            if let Some(e) = self.entries.get(cluster)
                && e.hash == hash
                && e.secret == secret.to_string()
            {
                kept.insert(cluster.to_string());
                continue;
            }
            let client = std::str::from_utf8(bytes)
                .map_err(|_| kubeconfig::KubeconfigError::Parse("not UTF-8".into()))
                .and_then(kubeconfig::parse)
                .and_then(|k| kubeconfig::client_config(&k, None, self.allow_exec, false));
            let client = match client {
                Ok(c) => c,
                Err(e) => {
                    let keeps = if self.entries.contains_key(cluster) {
                        "; the cluster keeps running with its previous kubeconfig"
                    } else {
                        ""
                    };
                    rejected.push(reject(secret, format!("{e}{keeps}")));
                    if self.entries.contains_key(cluster) {
                        kept.insert(cluster.to_string());
                    }
                    continue;
                }
            };
            kept.insert(cluster.to_string());
            let entry = SecretCluster {
                cluster: cluster.to_string(),
                secret: secret.to_string(),
                hash,
                server: client.server.clone(),
                state: "connecting".into(),
            };
            let replacing = self.entries.insert(cluster.to_string(), entry).is_some();
            let (cluster, secret, client) = (cluster.to_string(), secret.clone(), Box::new(client));
            actions.push(if replacing {
                Action::Replace {
                    cluster,
                    secret,
                    client,
                    hash,
                }
            } else {
                Action::Start {
                    cluster,
                    secret,
                    client,
                    hash,
                }
            });
        }
        let gone: Vec<String> = self
            .entries
            .keys()
            .filter(|c| !kept.contains(*c))
            .cloned()
            .collect();
        for cluster in gone {
            self.entries.remove(&cluster);
            actions.push(Action::Stop { cluster });
        }
        self.rejected = rejected;
        actions
    }
}

enum Event {
    Synced {
        cluster: String,
        hash: u64,
        secret: ServiceName,
        handle: SnapshotHandle,
    },
}

/// Follow the local cluster's Secrets until `stop`; publish the status on `status`.
pub async fn run(
    mut controller: SecretsController,
    local: SnapshotHandle,
    connector: Arc<dyn RemoteConnector>,
    clusters: Clusters,
    metrics: Arc<ClusterMetrics>,
    status: watch::Sender<SecretsStatus>,
    stop: CancellationToken,
) {
    let mut snapshots = local.subscribe();
    snapshots.mark_changed();
    let (tx, mut rx) = mpsc::unbounded_channel::<Event>();
    let mut pending: BTreeMap<String, CancellationToken> = BTreeMap::new();
    let mut last_rejected: BTreeSet<(String, String, String)> = BTreeSet::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            r = snapshots.changed() => {
                if r.is_err() { return }
                let snapshot = snapshots.borrow_and_update().clone();
                for action in controller.reconcile(&snapshot.secrets) {
                    apply(action, &mut controller, connector.as_ref(), &clusters, &mut pending, &tx, &metrics, &stop);
                }
                let status_now = controller.status();
                for r in &status_now.rejected {
                    let key = (r.secret.clone(), r.cluster.clone(), r.reason.clone());
                    if !last_rejected.contains(&key) {
                        warn!(secret = %r.secret, cluster = %r.cluster, reason = %r.reason,
                              "remote secret rejected; other clusters are not affected");
                        metrics.secrets.get_or_create(&SecretLabels { outcome: "rejected" }).inc();
                    }
                }
                last_rejected = status_now.rejected.iter()
                    .map(|r| (r.secret.clone(), r.cluster.clone(), r.reason.clone())).collect();
            }
            Some(Event::Synced { cluster, hash, secret, handle }) = rx.recv() => {
                pending.remove(&cluster);
                info!(%cluster, %secret, "remote cluster synced; switching to its new client");
                let health = Some(handle.health());
                clusters.attach(&cluster, ClusterSource::Secret(secret.to_string()), None, handle, health);
                controller.set_state(&cluster, hash, "watching");
            }
        }
        status.send_replace(controller.status());
    }
}

#[allow(clippy::too_many_arguments)]
fn apply(
    action: Action,
    controller: &mut SecretsController,
    connector: &dyn RemoteConnector,
    clusters: &Clusters,
    pending: &mut BTreeMap<String, CancellationToken>,
    tx: &mpsc::UnboundedSender<Event>,
    metrics: &ClusterMetrics,
    stop: &CancellationToken,
) {
    match action {
        Action::Stop { cluster } => {
            if let Some(t) = pending.remove(&cluster) {
                t.cancel();
            }
            info!(%cluster, "remote secret deleted; dropping the cluster");
            clusters.detach(&cluster);
        }
        Action::Start {
            cluster,
            secret,
            client,
            hash,
        }
        | Action::Replace {
            cluster,
            secret,
            client,
            hash,
        } => {
            metrics
                .secrets
                .get_or_create(&SecretLabels {
                    outcome: "accepted",
                })
                .inc();
            if let Some(t) = pending.remove(&cluster) {
                t.cancel();
            }
            match connector.connect(&cluster, &client) {
                Err(e) => {
                    info!(%cluster, %secret, server = %client.server, "{e}");
                    controller.set_state(&cluster, hash, &e.to_string());
                }
                Ok(handle) => {
                    controller.set_state(&cluster, hash, "syncing");
                    let token = stop.child_token();
                    pending.insert(cluster.clone(), token.clone());
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        tokio::select! {
                            _ = token.cancelled() => {}
                            _ = handle.wait_synced() => {
                                let _ = tx.send(Event::Synced { cluster, hash, secret, handle });
                            }
                        }
                    });
                }
            }
        }
    }
}

#[cfg(test)]
#[path = "secrets/tests.rs"]
mod tests;
