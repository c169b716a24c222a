//! The Kubernetes API source: the same snapshot as the directory source, from list/watch.
//!
//! ```text
//!  one task per (kind, namespace)     watch::run over kube::runtime::watcher: list in pages
//!   Service, EndpointSlice,             of 500 -> swap store; watch -> apply events; 410 Gone
//!   Pod (metadata only), Secret,        -> re-list (swapped in whole); errors -> backoff with
//!   ServiceEntry, DestinationRule,      jitter, last store keeps serving (custom kinds:
//!   ServiceExport                       discovery first; a missing CRD is reported once,
//!                                       counted as synced-empty, re-checked)
//!            |  objects trimmed and converted in the task, outside any lock
//!            v  Notify
//!  aggregator: debounce -> once every watch has synced, Snapshot::build -> SnapshotWriter
//! ```
//!
//! Readiness (the handle's `is_synced`) comes only after every watch's first full list. When
//! the API server is lost, the last snapshot keeps serving; the handle's `health()` turns
//! false and `SourceStatus::stale_since` / the `kube_source_*` metrics say since when.
//! The source stops when [`KubeSource::stop`] is called or every reader handle is dropped.

mod convert;
mod metrics;
mod watch;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Client;
use kube::api::{Api, DynamicObject, PartialObjectMeta};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde::Serialize;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use self::metrics::Metrics;
pub use self::watch::LIST_PAGE;
use self::watch::{Exit, Shared, Timing};
use super::{SnapshotHandle, SnapshotWriter};
use crate::objects::Kind;
use crate::snapshot::{Snapshot, SourceStatus};

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error(
        "cannot find Kubernetes credentials: {0}; run in a pod with a service account, or set \
         KUBECONFIG / pass --kubeconfig"
    )]
    Infer(#[source] kube::config::InferConfigError),
    #[error("cannot read kubeconfig {path}: {source}")]
    Kubeconfig {
        path: String,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("cannot build a Kubernetes client: {0}")]
    Client(#[source] kube::Error),
}

/// The Secrets a source reads: one namespace, one label selector (remote-secrets).
#[derive(Clone, Debug, Serialize)]
pub struct SecretSelector {
    pub namespace: String,
    /// e.g. `istio/multiCluster=true`.
    pub label_selector: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct KubeSourceConfig {
    /// The cluster's id: a metric label and the snapshot's `status.source`.
    pub cluster: String,
    /// Kinds to watch (not `Secret`: see `secrets`).
    pub kinds: Vec<Kind>,
    /// Namespaces to watch; empty for all.
    pub namespaces: Vec<String>,
    pub secrets: Option<SecretSelector>,
    /// Events within this window make one snapshot.
    pub debounce: Duration,
    /// How often an absent CRD is looked for again.
    pub crd_recheck: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// `timeoutSeconds` of a watch request (the API server ends it; it is resumed).
    pub watch_timeout: Duration,
}

impl KubeSourceConfig {
    /// The kinds the gateway routes with.
    pub const GATEWAY_KINDS: &[Kind] = &[
        Kind::Service,
        Kind::EndpointSlice,
        Kind::Pod,
        Kind::ServiceExport,
        Kind::DestinationRule,
    ];
    /// Every kind but Secret.
    pub const ALL_KINDS: &[Kind] = &[
        Kind::Service,
        Kind::EndpointSlice,
        Kind::Pod,
        Kind::ServiceEntry,
        Kind::DestinationRule,
        Kind::ServiceExport,
    ];

    pub fn new(cluster: &str, kinds: &[Kind], namespaces: Vec<String>) -> KubeSourceConfig {
        KubeSourceConfig {
            cluster: cluster.to_string(),
            kinds: kinds.to_vec(),
            namespaces,
            secrets: None,
            debounce: Duration::from_millis(75),
            crd_recheck: Duration::from_secs(30),
            backoff_min: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            watch_timeout: Duration::from_secs(290),
        }
    }
}

/// A client from in-cluster config, else `KUBECONFIG` / `~/.kube/config`.
pub async fn client_infer() -> Result<Client, KubeError> {
    let config = kube::Config::infer().await.map_err(KubeError::Infer)?;
    Client::try_from(config).map_err(KubeError::Client)
}

/// A client from a kubeconfig file (its current context).
pub async fn client_from_kubeconfig_file(path: &Path) -> Result<Client, KubeError> {
    let err = |source| KubeError::Kubeconfig {
        path: path.display().to_string(),
        source,
    };
    let kubeconfig = Kubeconfig::read_from(path).map_err(err)?;
    client_from_kubeconfig(kubeconfig, &path.display().to_string()).await
}

/// A client from a parsed kubeconfig (its current context); `origin` names it in errors.
pub async fn client_from_kubeconfig(
    kubeconfig: Kubeconfig,
    origin: &str,
) -> Result<Client, KubeError> {
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(|source| KubeError::Kubeconfig {
            path: origin.to_string(),
            source,
        })?;
    Client::try_from(config).map_err(KubeError::Client)
}

/// A running source.
#[derive(Debug)]
pub struct KubeSource {
    pub handle: SnapshotHandle,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl KubeSource {
    /// Start watching; returns at once. The handle is synced after every first list.
    pub fn start(client: Client, config: KubeSourceConfig, metrics: Arc<Metrics>) -> KubeSource {
        let (writer, handle) = super::channel();
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(client, config, metrics, writer, stop.clone()));
        KubeSource { handle, stop, task }
    }

    /// Start, feeding an existing writer (a caller that handed out the handle already).
    pub fn start_with_writer(
        client: Client,
        config: KubeSourceConfig,
        metrics: Arc<Metrics>,
        writer: SnapshotWriter,
    ) -> (CancellationToken, tokio::task::JoinHandle<()>) {
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(client, config, metrics, writer, stop.clone()));
        (stop, task)
    }

    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// The handle and the task, for a caller that ends the source by dropping every handle.
    pub fn into_parts(self) -> (SnapshotHandle, tokio::task::JoinHandle<()>) {
        (self.handle, self.task)
    }

    /// Stop and wait for every watch to end.
    pub async fn shutdown(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

async fn run(
    client: Client,
    config: KubeSourceConfig,
    metrics: Arc<Metrics>,
    writer: SnapshotWriter,
    stop: CancellationToken,
) {
    let changed = Arc::new(Notify::new());
    let timing = Timing {
        backoff_min: config.backoff_min,
        backoff_max: config.backoff_max,
        watch_timeout: config.watch_timeout,
    };
    let scopes: Vec<Option<String>> = if config.namespaces.is_empty() {
        vec![None]
    } else {
        config.namespaces.iter().cloned().map(Some).collect()
    };
    let mut watches = Vec::new();
    let mut tasks = JoinSet::new();
    let mut add = |kind: Kind, ns: Option<String>, selector: Option<String>| {
        let shared = Arc::new(Shared::new(
            &config.cluster,
            kind,
            ns,
            selector,
            metrics.clone(),
            changed.clone(),
        ));
        watches.push(shared.clone());
        tasks.spawn(watch_kind(
            client.clone(),
            shared,
            timing,
            config.crd_recheck,
            stop.clone(),
        ));
    };
    for kind in config.kinds.iter().filter(|k| **k != Kind::Secret) {
        for ns in &scopes {
            add(*kind, ns.clone(), None);
        }
    }
    if let Some(s) = &config.secrets {
        add(
            Kind::Secret,
            Some(s.namespace.clone()),
            Some(s.label_selector.clone()),
        );
    }
    info!(cluster = %config.cluster, kinds = ?config.kinds, namespaces = ?config.namespaces,
          secrets = ?config.secrets, "watching the Kubernetes API");
    let source = format!("kubernetes:{}", config.cluster);
    let labels = metrics::ClusterLabels {
        cluster: config.cluster.clone(),
    };
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = writer.closed() => break,
            _ = changed.notified() => {}
        }
        // Debounce: whatever else arrives in the window goes into the same snapshot.
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(config.debounce) => {}
        }
        if !watches.iter().all(|w| w.synced()) {
            continue;
        }
        let snapshot = build(&source, &watches);
        writer.set_healthy(snapshot.status.stale_since.is_none());
        metrics.snapshots.get_or_create(&labels).inc();
        writer.publish(snapshot);
    }
    stop.cancel();
    tasks.shutdown().await;
}

/// One snapshot from every watch's store: `Arc`s are collected under each short lock, the
/// snapshot is built after.
fn build(source: &str, watches: &[Arc<Shared>]) -> Snapshot {
    let mut objects = Vec::new();
    let mut status = SourceStatus {
        source: source.to_string(),
        ..SourceStatus::default()
    };
    for w in watches {
        {
            let store = w.store.lock().expect("store lock");
            objects.extend(store.objects.values().cloned());
            for ((ns, name), reason) in &store.errors {
                status
                    .errors
                    .push(format!("{} {ns}/{name}: {reason}", w.kind.as_str()));
            }
        }
        let ws = w.status.lock().expect("status lock").clone();
        if let Some(t) = &ws.stale_since
            && status.stale_since.as_ref().is_none_or(|s| t < s)
        {
            status.stale_since = Some(t.clone());
        }
        if let Some(t) = &ws.last_event
            && status.last_event.as_ref().is_none_or(|s| t > s)
        {
            status.last_event = Some(t.clone());
        }
        status.watches.push(ws);
    }
    // Deterministic order, so equal inputs build equal snapshots.
    objects.sort_by_cached_key(|o| o.key());
    Snapshot::build(objects.iter().map(|o| o.as_ref()), status)
}

/// One watch until stopped. Custom kinds look for their CRD first and again when it goes away.
async fn watch_kind(
    client: Client,
    shared: Arc<Shared>,
    timing: Timing,
    crd_recheck: Duration,
    stop: CancellationToken,
) {
    let kind = shared.kind;
    let ns = shared.namespace.clone();
    match convert::served(kind) {
        convert::Served::Typed => {
            shared.set_api_version(match kind {
                Kind::EndpointSlice => "discovery.k8s.io/v1",
                _ => "v1",
            });
            match kind {
                Kind::Service => {
                    let api: Api<Service> = scoped(client, &ns);
                    let conv = |s| Ok(convert::service(s));
                    watch::run(api, conv, &shared, timing, false, &stop).await;
                }
                Kind::EndpointSlice => {
                    let api: Api<EndpointSlice> = scoped(client, &ns);
                    let conv = |s| Ok(convert::endpoint_slice(s));
                    watch::run(api, conv, &shared, timing, false, &stop).await;
                }
                _ => {
                    let api: Api<Secret> = scoped(client, &ns);
                    let conv = |s| Ok(convert::secret(s));
                    watch::run(api, conv, &shared, timing, false, &stop).await;
                }
            }
        }
        convert::Served::MetadataOnly => {
            shared.set_api_version("v1");
            // `Api<PartialObjectMeta<_>>` lists and watches metadata-only.
            let api: Api<PartialObjectMeta<Pod>> = scoped(client, &ns);
            let conv = |p| Ok(convert::pod(p));
            watch::run(api, conv, &shared, timing, false, &stop).await;
        }
        convert::Served::Custom {
            group,
            versions,
            plural,
        } => {
            let mut backoff = watch::Backoff::new(timing.backoff_min, timing.backoff_max);
            let mut reported = false;
            loop {
                let found = tokio::select! {
                    _ = stop.cancelled() => return,
                    r = served_version(&client, group, versions, plural) => r,
                };
                let delay = match found {
                    Ok(Some(version)) => {
                        if reported {
                            info!(kind = kind.as_str(), %group, %version, "CRD is installed now; watching it");
                        }
                        reported = false;
                        backoff.reset();
                        shared.crd_found();
                        shared.set_api_version(&format!("{group}/{version}"));
                        let resource = convert::api_resource(kind, group, version, plural);
                        let api: Api<DynamicObject> = match &ns {
                            Some(n) => Api::namespaced_with(client.clone(), n, &resource),
                            None => Api::all_with(client.clone(), &resource),
                        };
                        let conv = |o| convert::custom(o, &resource);
                        match watch::run(api, conv, &shared, timing, true, &stop).await {
                            Exit::Stopped => return,
                            Exit::NotFound => continue,
                        }
                    }
                    Ok(None) => {
                        if !reported {
                            warn!(kind = kind.as_str(), %group, versions = ?versions,
                                  "CRD not installed: {} objects are not read until it is; the rest works. \
                                   Checking again every {crd_recheck:?}", kind.as_str());
                        }
                        shared.mark_missing(!reported);
                        reported = true;
                        crd_recheck
                    }
                    Err(e) => {
                        shared.error(format!("discovery of {group}: {}", watch::describe(&e)));
                        backoff.next_delay()
                    }
                };
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

fn scoped<K>(client: Client, ns: &Option<String>) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match ns {
        Some(n) => Api::namespaced(client, n),
        None => Api::all(client),
    }
}

/// The first of `versions` in which the group serves `plural`; `None` when none does.
async fn served_version(
    client: &Client,
    group: &str,
    versions: &'static [&'static str],
    plural: &str,
) -> Result<Option<&'static str>, kube::Error> {
    for version in versions {
        match client
            .list_api_group_resources(&format!("{group}/{version}"))
            .await
        {
            Ok(list) if list.resources.iter().any(|r| r.name == plural) => {
                return Ok(Some(version));
            }
            Ok(_) => {}
            Err(e) if watch::is_status(&e, 404) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}
