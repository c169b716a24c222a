//! `serve`: wires the sources, the multi-cluster registry, xDS and the admin endpoints, in the
//! process shell (source start-up, admin servers, readiness, SIGTERM lifecycle).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use process_shell::admin::{Servers, bind};
use process_shell::source::{SecretSelector, SourceError, SourceSpec};
use process_shell::{Lifecycle, Readiness, Source, Work};
use prometheus_client::registry::Registry;
use registry::source::dir::watch_dir;
use registry::source::kube::{self as kube_source, KubeSourceConfig};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::admin::{AdminState, router};
use crate::clusters::Clusters;
use crate::config::ServeConfig;
use crate::connector::KubeConnector;
use crate::eds::EdsOptions;
use crate::mesh_networks::{MeshNetworks, MeshNetworksError};
use crate::metrics::{ClusterMetrics, XdsMetrics};
use crate::secrets::{self, MULTICLUSTER_LABEL, RemoteConnector, SecretsController, SecretsStatus};
use crate::view::ClusterSource;
use crate::xds::{self, TlsFiles, XdsError, XdsService};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Dir(#[from] registry::source::dir::DirError),
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
    /// Everything but the xDS streams (sources, the registry, admin): cancelled last.
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    lifecycle: Lifecycle,
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
                config.source.watch_namespaces.clone(),
            ))
        });
        let xds_metrics = Arc::new(XdsMetrics::new(&mut registry));
        let cluster_metrics = Arc::new(ClusterMetrics::new(&mut registry));
        let readiness = Readiness::default();
        let options = EdsOptions {
            domain_suffix: config.domain_suffix.clone(),
            global_suffix: config.global_suffix.clone(),
            export_policy: config.export_policy,
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
        // Listeners first: nothing is started (no API watches) when one cannot be bound.
        let xds_listener = bind(config.xds_listen, "xDS (--xds-listen)").await?;
        let xds_tls_listener = match tls {
            Some(_) => Some(bind(config.xds_tls_listen, "xDS over mTLS (--xds-tls-listen)").await?),
            None => None,
        };
        let servers = Servers::bind(&config.listeners).await?;
        let admin_addrs = servers.addresses()?;

        let clusters = Clusters::start(
            config.cluster_id.clone(),
            Arc::new(networks),
            options.clone(),
            stop.clone(),
        );

        // Local cluster: a directory, else the Kubernetes API (with the kubeconfig Secrets).
        let spec = SourceSpec {
            cluster_id: &config.cluster_id,
            kinds: KubeSourceConfig::ALL_KINDS,
            secrets: Some(SecretSelector {
                namespace: config.secrets_namespace.clone(),
                label_selector: format!("{MULTICLUSTER_LABEL}=true"),
            }),
        };
        let source = Source::start(&config.source, spec, || source_metrics.clone()).await?;
        let local = source.handle.clone();
        let local_health = source.reports_health().then(|| local.health());
        clusters.attach(
            &config.cluster_id,
            ClusterSource::Local(Source::describe(&config.source)),
            Some(config.network.clone()),
            local.clone(),
            local_health,
        );
        // File-backed remotes: a vanished directory marks the cluster stale. Their pollers run
        // until termination ends them, with the local source.
        let mut dir_watchers = Vec::new();
        for r in &config.remote_config_dirs {
            let (handle, t) = watch_dir(r.dir.clone(), config.source.config_poll).await?;
            dir_watchers.push(t);
            let health = dir_health(r.dir.clone(), config.source.config_poll, stop.clone());
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
                config.source.config_poll,
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

        // xDS: the streams are the in-flight work of the lifecycle. After the drain they are
        // ended (never mid-push) and the listeners close; at the deadline what is left is cut.
        let work = Work::default();
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
            work.stop_accepting.clone(),
        );
        let xds_addr = xds_listener.local_addr()?;
        spawn_xds(service.clone(), xds_listener, None, &work);
        let mut xds_tls = None;
        if let (Some(tls), Some(l)) = (tls, xds_tls_listener) {
            xds_tls = Some(l.local_addr()?);
            spawn_xds(service, l, Some(tls), &work);
        }

        // Admin.
        let addresses = Addresses {
            xds: xds_addr,
            xds_tls,
            status: admin_addrs.status,
            metrics: admin_addrs.metrics,
            admin: admin_addrs.admin,
        };
        let admin_state = AdminState {
            config: Arc::new(config.clone()),
            clusters: clusters.clone(),
            secrets: secrets_rx,
            options: Arc::new(options),
        };
        tasks.extend(servers.serve(readiness.clone(), registry, router(admin_state), &stop));

        // Ready once the local cluster synced; never waits on a remote.
        readiness
            .become_ready_when(
                &local,
                {
                    let local = local.clone();
                    async move { local.wait_synced().await }
                },
                || info!("local cluster synced: ready"),
            )
            .await;
        info!(?addresses, "remote-secrets serving");
        let lifecycle = Lifecycle::spawn(
            "remote-secrets",
            readiness.clone(),
            &config.lifecycle,
            work,
            {
                let stop = stop.clone();
                async move {
                    stop.cancel();
                    source.shutdown().await;
                    for w in dir_watchers {
                        w.abort();
                    }
                }
            },
        );
        Ok(App {
            addresses,
            clusters,
            readiness,
            xds_metrics,
            stop,
            tasks,
            lifecycle,
        })
    }

    /// Start terminating, as SIGTERM does: readiness 503 and xDS served on for
    /// --drain-duration, then every stream is ended (clients reconnect to another replica)
    /// and the listeners close; streams still open at --termination-deadline are cut.
    pub fn begin_termination(&self) {
        self.lifecycle.begin();
    }

    /// Wait until termination has finished, then for every task.
    pub async fn wait_terminated(self) {
        self.lifecycle.wait().await;
        for t in self.tasks {
            let _ = t.await;
        }
    }

    /// Stop at once (tests): readiness 503, everything cancelled.
    pub fn stop(&self) {
        self.readiness.begin_drain();
        self.stop.cancel();
    }

    /// After [`App::stop`]: end every task now.
    pub async fn wait(self) {
        self.lifecycle.stop_now().await;
        for t in self.tasks {
            t.abort();
            let _ = t.await;
        }
    }
}

/// Serve xDS on `listener` as in-flight work: until the drain ends, then until its streams
/// have ended, or the deadline cuts them.
fn spawn_xds(
    service: XdsService,
    listener: tokio::net::TcpListener,
    tls: Option<tonic::transport::ServerTlsConfig>,
    work: &Work,
) {
    let (drain, force) = (work.stop_accepting.clone(), work.force.clone());
    work.in_flight.spawn(async move {
        tokio::select! {
            r = xds::serve(service, listener, tls, drain) => if let Err(e) = r {
                warn!(error = %e, "xDS server stopped");
            },
            _ = force.cancelled() => warn!("xDS streams still open at the termination deadline: closed"),
        }
    });
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
        let names = crate::gateways::hostnames_to_resolve(
            &views.borrow_and_update(),
            &options.domain_suffix,
        );
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
