//! `serve`: wires the sources, the multi-cluster registry, xDS and the admin endpoints.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use registry::admin::{Readiness, bind, metrics_router, spawn_http, status_router};
use registry::source::dir::watch_dir;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::admin::{AdminState, router};
use crate::clusters::{ClusterSource, Clusters};
use crate::config::{ExportPolicy, ServeConfig};
use crate::connector::KubeConnector;
use crate::eds::{self, EdsOptions};
use crate::mesh_networks::{MeshNetworks, MeshNetworksError};
use crate::metrics::{ClusterMetrics, XdsMetrics};
use crate::secrets::{self, MULTICLUSTER_LABEL, RemoteConnector, SecretsController, SecretsStatus};
use crate::xds::{self, TlsFiles, XdsError, XdsService};
use registry::source::kube::{
    self as kube_source, KubeError, KubeSource, KubeSourceConfig, SecretSelector,
};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Dir(#[from] registry::source::dir::DirError),
    #[error(transparent)]
    Kube(#[from] KubeError),
    #[error(transparent)]
    MeshNetworks(#[from] MeshNetworksError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Xds(#[from] XdsError),
}

/// Where the running app listens (ports resolved), for tests and logs.
#[derive(Clone, Debug)]
pub struct Addresses {
    pub xds: SocketAddr,
    pub xds_tls: Option<SocketAddr>,
    pub status: SocketAddr,
    pub metrics: SocketAddr,
    pub admin: SocketAddr,
}

pub struct App {
    pub addresses: Addresses,
    pub clusters: Clusters,
    pub readiness: Readiness,
    pub xds_metrics: Arc<XdsMetrics>,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl App {
    /// Start; remote clusters from kubeconfig Secrets are watched through the Kubernetes API.
    pub async fn start(config: ServeConfig) -> Result<App, AppError> {
        Self::start_inner(config, None).await
    }

    /// Start with a given connector for kubeconfig Secrets.
    pub async fn start_with(
        config: ServeConfig,
        connector: Arc<dyn RemoteConnector>,
    ) -> Result<App, AppError> {
        Self::start_inner(config, Some(connector)).await
    }

    async fn start_inner(
        config: ServeConfig,
        connector: Option<Arc<dyn RemoteConnector>>,
    ) -> Result<App, AppError> {
        config.validate()?;
        let stop = CancellationToken::new();
        let mut tasks = Vec::new();
        let mut registry = Registry::default();
        let source_metrics = Arc::new(kube_source::Metrics::new(&mut registry));
        let connector = connector.unwrap_or_else(|| {
            Arc::new(KubeConnector::new(
                source_metrics.clone(),
                config.watch_namespaces.clone(),
            ))
        });
        let xds_metrics = Arc::new(XdsMetrics::new(&mut registry));
        let cluster_metrics = Arc::new(ClusterMetrics::new(&mut registry));
        let readiness = Readiness::default();
        let options = EdsOptions {
            domain_suffix: config.domain_suffix.clone(),
            global_suffix: config.global_suffix.clone(),
            require_export: config.export_policy == ExportPolicy::Exported,
        };
        let networks = match &config.mesh_networks {
            Some(p) => MeshNetworks::load(p)?,
            None => MeshNetworks::default(),
        };
        let tls = if config.tls_enabled() {
            let files = TlsFiles {
                cert_chain: config.xds_tls_cert_chain.clone().unwrap_or_default(),
                key: config.xds_tls_key.clone().unwrap_or_default(),
                root: config.xds_tls_root_cert.clone().unwrap_or_default(),
            };
            Some(files.server_config()?)
        } else {
            None
        };
        let clusters = Clusters::start(
            config.cluster_id.clone(),
            Arc::new(networks),
            options.clone(),
            stop.clone(),
        );

        // Local cluster: a directory, else the Kubernetes API (with the kubeconfig Secrets).
        let (local, local_source) = match &config.config_dir {
            Some(dir) => {
                let (local, t) = watch_dir(dir.clone(), config.config_poll).await?;
                tasks.push(t);
                (
                    local,
                    ClusterSource::Local(format!("dir:{}", dir.display())),
                )
            }
            None => {
                let client = match &config.kubeconfig {
                    Some(path) => kube_source::client_from_kubeconfig_file(path).await?,
                    None => kube_source::client_infer().await?,
                };
                let mut source_config = KubeSourceConfig::new(
                    &config.cluster_id,
                    KubeSourceConfig::ALL_KINDS,
                    config.watch_namespaces.clone(),
                );
                source_config.secrets = Some(SecretSelector {
                    namespace: config.secrets_namespace.clone(),
                    label_selector: format!("{MULTICLUSTER_LABEL}=true"),
                });
                let source = KubeSource::start(client, source_config, source_metrics.clone());
                let (local, task) = source.into_parts();
                tasks.push(task);
                (local, ClusterSource::Local("kubernetes".into()))
            }
        };
        let local_health = config.config_dir.is_none().then(|| local.health());
        clusters.attach(
            &config.cluster_id,
            local_source,
            Some(config.network.clone()),
            local.clone(),
            local_health,
        );
        // File-backed remotes: a vanished directory marks the cluster stale.
        for r in &config.remote_config_dirs {
            let (handle, t) = watch_dir(r.dir.clone(), config.config_poll).await?;
            tasks.push(t);
            let health = dir_health(r.dir.clone(), config.config_poll, stop.clone());
            clusters.attach(
                &r.cluster_id,
                ClusterSource::RemoteDir(r.dir.display().to_string()),
                None,
                handle,
                Some(health),
            );
        }
        if let Some(path) = config.mesh_networks.clone() {
            tasks.push(tokio::spawn(reload_networks(
                path,
                config.config_poll,
                clusters.clone(),
                stop.clone(),
            )));
        }
        tasks.push(tokio::spawn(resolve_dns(
            clusters.clone(),
            options.clone(),
            config.dns_refresh,
            stop.clone(),
        )));
        tasks.push(tokio::spawn(observe(
            clusters.clone(),
            cluster_metrics.clone(),
            stop.clone(),
        )));

        // Kubeconfig Secrets from the local cluster.
        let (secrets_tx, secrets_rx) = watch::channel(SecretsStatus::default());
        tasks.push(tokio::spawn(secrets::run(
            SecretsController::new(
                &config.secrets_namespace,
                &config.cluster_id,
                config.allow_kubeconfig_exec,
            ),
            local.clone(),
            connector,
            clusters.clone(),
            cluster_metrics,
            secrets_tx,
            stop.clone(),
        )));

        // xDS.
        let generations = xds::debounce::start(
            clusters.subscribe(),
            config.debounce,
            config.debounce_max,
            stop.clone(),
        );
        let service = XdsService::new(
            generations,
            options.clone(),
            config.default_network().to_string(),
            xds_metrics.clone(),
            stop.clone(),
        );
        let xds_listener = bind(config.xds_listen, "xDS (--xds-listen)").await?;
        let xds_addr = xds_listener.local_addr()?;
        tasks.push(spawn_xds(service.clone(), xds_listener, None, stop.clone()));
        let mut xds_tls = None;
        if let Some(tls) = tls {
            let l = bind(config.xds_tls_listen, "xDS over mTLS (--xds-tls-listen)").await?;
            xds_tls = Some(l.local_addr()?);
            tasks.push(spawn_xds(service, l, Some(tls), stop.clone()));
        }

        // Admin.
        let status = bind(config.status_listen, "readiness (--status-listen)").await?;
        let metrics = bind(config.metrics_listen, "metrics (--metrics-listen)").await?;
        let admin = bind(config.admin_listen, "admin (--admin-listen)").await?;
        let addresses = Addresses {
            xds: xds_addr,
            xds_tls,
            status: status.local_addr()?,
            metrics: metrics.local_addr()?,
            admin: admin.local_addr()?,
        };
        let admin_state = AdminState {
            config: Arc::new(config.clone()),
            clusters: clusters.clone(),
            secrets: secrets_rx,
            options: Arc::new(options),
        };
        tasks.push(spawn_http(
            status,
            status_router(readiness.clone()),
            stop.clone(),
        ));
        tasks.push(spawn_http(
            metrics,
            metrics_router(Arc::new(registry)),
            stop.clone(),
        ));
        tasks.push(spawn_http(admin, router(admin_state), stop.clone()));

        // Ready once the local cluster synced; never waits on a remote.
        let ready = readiness.clone();
        tasks.push(tokio::spawn(async move {
            local.wait_synced().await;
            ready.set(true);
            info!("local cluster synced: ready");
        }));
        info!(?addresses, "remote-secrets serving");
        Ok(App {
            addresses,
            clusters,
            readiness,
            xds_metrics,
            stop,
            tasks,
        })
    }

    pub fn stop(&self) {
        self.readiness.set(false);
        self.stop.cancel();
    }

    pub async fn wait(self) {
        for t in self.tasks {
            t.abort();
            let _ = t.await;
        }
    }
}

fn spawn_xds(
    service: XdsService,
    listener: tokio::net::TcpListener,
    tls: Option<tonic::transport::ServerTlsConfig>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if let Err(e) = xds::serve(service, listener, tls, stop).await {
            warn!(error = %e, "xDS server stopped");
        }
    })
}

/// `true` while the directory exists.
fn dir_health(dir: PathBuf, every: Duration, stop: CancellationToken) -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(dir.is_dir());
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            let up = dir.is_dir();
            if *tx.borrow() != up {
                if up {
                    info!(dir = %dir.display(), "remote cluster directory is back");
                } else {
                    warn!(dir = %dir.display(), "remote cluster directory is gone; keeping its last endpoints, marked stale");
                }
                tx.send_replace(up);
            }
        }
    });
    rx
}

async fn reload_networks(
    path: PathBuf,
    every: Duration,
    clusters: Clusters,
    stop: CancellationToken,
) {
    let stamp = |p: &PathBuf| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let mut last = stamp(&path);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let now = stamp(&path);
        if now == last {
            continue;
        }
        last = now;
        match MeshNetworks::load(&path) {
            Ok(n) => {
                info!(file = %path.display(), networks = n.networks.len(), "mesh networks reloaded");
                clusters.set_networks(Arc::new(n));
            }
            Err(e) => warn!(error = %e, "keeping the previous mesh networks"),
        }
    }
}

/// Resolve gateway host names: when the set of names changes, and every `refresh`.
async fn resolve_dns(
    clusters: Clusters,
    options: EdsOptions,
    refresh: Duration,
    stop: CancellationToken,
) {
    let mut views = clusters.subscribe();
    let mut known: BTreeSet<String> = BTreeSet::new();
    let mut deadline = tokio::time::Instant::now();
    loop {
        let names = eds::hostnames_to_resolve(&views.borrow_and_update(), &options);
        if names != known || tokio::time::Instant::now() >= deadline {
            let mut answers: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
            for name in &names {
                match tokio::net::lookup_host((name.as_str(), 0)).await {
                    Ok(addrs) => {
                        let mut ips: Vec<IpAddr> = addrs.map(|a| a.ip()).collect();
                        ips.sort();
                        ips.dedup();
                        answers.insert(name.clone(), ips);
                    }
                    Err(e) => warn!(host = %name, error = %e, "cannot resolve gateway host name"),
                }
            }
            if !names.is_empty() || !known.is_empty() {
                clusters.set_dns(Arc::new(answers));
            }
            known = names;
            deadline = tokio::time::Instant::now() + refresh;
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            r = views.changed() => if r.is_err() { return },
            _ = tokio::time::sleep_until(deadline) => {}
        }
    }
}

async fn observe(clusters: Clusters, metrics: Arc<ClusterMetrics>, stop: CancellationToken) {
    let mut views = clusters.subscribe();
    loop {
        metrics.observe(&views.borrow_and_update());
        tokio::select! {
            _ = stop.cancelled() => return,
            r = views.changed() => if r.is_err() { return },
        }
    }
}
