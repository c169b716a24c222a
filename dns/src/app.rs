//! Wiring: the config source (a directory, or the Kubernetes API), the table writer, the UDP
//! and TCP listeners, the admin endpoints.
//! Tests start a whole [`Dns`] in-process on 127.0.0.1 port 0.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;

use prometheus_client::registry::Registry;
use registry::SnapshotHandle;
use registry::admin::{self, Readiness};
use registry::objects::Kind;
use registry::source::dir::{DirError, watch_dir};
use registry::source::kube::{self as kube_source, KubeError, KubeSource, KubeSourceConfig};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::{Config, ConfigError};
use crate::metrics::Metrics;
use crate::server::{Handler, serve_tcp, serve_udp};
use crate::table::{Table, TableOptions};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Source(#[from] DirError),
    /// The cause follows in the error's source chain (as `anyhow` prints it).
    #[error(
        "cannot start the Kubernetes API source for ServiceEntries (used without --config-dir)"
    )]
    Kube(#[from] KubeError),
    #[error(transparent)]
    Bind(#[from] std::io::Error),
}

/// A running dns server.
pub struct Dns {
    /// UDP and TCP.
    pub dns_addr: SocketAddr,
    pub status_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub readiness: Readiness,
    pub handler: Handler,
    stop: CancellationToken,
    tcp: tokio::task::JoinHandle<()>,
    tcp_connections: TaskTracker,
    udp: Vec<std::thread::JoinHandle<()>>,
    source: Source,
    /// Cancelled when draining starts: a first sync that lands later does not report ready.
    draining: CancellationToken,
}

/// What feeds the snapshot; kept for the server's lifetime and stopped on shutdown.
enum Source {
    Dir(tokio::task::JoinHandle<()>),
    Kube(KubeSource),
}

/// The ServiceEntries a dns server reads, and nothing else: its RBAC allows list/watch of
/// `serviceentries` only.
const DNS_KINDS: &[Kind] = &[Kind::ServiceEntry];

impl Dns {
    pub async fn start(config: Config) -> Result<Dns, StartError> {
        config.validate()?;
        let config = Arc::new(config);
        // Listeners first: nothing is started (no API watches) when one cannot be bound.
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
        let (udp, tcp_listener) = bind_dns(config.listen, workers).await?;
        let dns_addr = tcp_listener.local_addr()?;
        let status = admin::bind(config.status_listen, "readiness (--status-listen)").await?;
        let metrics_l = admin::bind(config.metrics_listen, "metrics (--metrics-listen)").await?;
        let admin_l = admin::bind(config.admin_listen, "admin (--admin-listen)").await?;
        let (status_addr, metrics_addr, admin_addr) = (
            status.local_addr()?,
            metrics_l.local_addr()?,
            admin_l.local_addr()?,
        );

        let mut registry = Registry::default();
        let (snapshot, source) = start_source(&config, &mut registry).await?;

        let metrics = Arc::new(Metrics::new(&mut registry));
        let stop = CancellationToken::new();
        let table = spawn_table_writer(
            snapshot.clone(),
            config.table_options(),
            metrics.clone(),
            stop.clone(),
        );
        let handler = Handler::new(table.clone(), metrics, config.max_udp_payload);
        let table_for_readiness = table.clone();

        let readiness = Readiness::default();
        admin::spawn_http(
            status,
            admin::status_router(readiness.clone()),
            stop.clone(),
        );
        admin::spawn_http(
            metrics_l,
            admin::metrics_router(Arc::new(registry)),
            stop.clone(),
        );
        let admin_state = crate::admin::AdminState {
            config: config.clone(),
            snapshot: snapshot.clone(),
            table,
        };
        admin::spawn_http(admin_l, crate::admin::router(admin_state), stop.clone());

        let udp_tasks = udp
            .into_iter()
            .enumerate()
            .map(|(i, socket)| spawn_udp_worker(i, socket, handler.clone(), stop.clone()))
            .collect::<std::io::Result<Vec<_>>>()?;
        let tcp_connections = TaskTracker::new();
        let tcp = tokio::spawn(serve_tcp(
            tcp_listener,
            handler.clone(),
            config.tcp_idle_timeout,
            stop.clone(),
            tcp_connections.clone(),
        ));

        // Ready once the source's first full sync is done: at once for a directory; for the
        // API, after ServiceEntries have been listed. Start does not wait for the API: until
        // then, names are answered from an empty table (NXDOMAIN) and readiness is 503.
        let draining = CancellationToken::new();
        let ready_when_synced = {
            let (snapshot, readiness, draining) =
                (snapshot.clone(), readiness.clone(), draining.clone());
            let mut tables = table_for_readiness;
            let (status, metrics, admin) = (status_addr, metrics_addr, admin_addr);
            let zones = config.zones.clone();
            async move {
                tokio::select! {
                    _ = draining.cancelled() => {}
                    _ = async {
                        snapshot.wait_synced().await;
                        // Ready means answering from the synced objects: wait for the table
                        // built from them (it is built off the runtime, a little later).
                        let synced = snapshot.current().status.version;
                        let _ = tables.wait_for(|t| t.version >= synced).await;
                    } => {
                        readiness.set(true);
                        if draining.is_cancelled() {
                            readiness.set(false);
                            return;
                        }
                        info!(
                            listen = %dns_addr,
                            %status,
                            %metrics,
                            %admin,
                            ?zones,
                            "dns ready (UDP and TCP)"
                        );
                    }
                }
            }
        };
        if snapshot.is_synced() {
            ready_when_synced.await;
        } else {
            info!(
                listen = %dns_addr,
                "answering; waiting for the first full list of ServiceEntries from the \
                 Kubernetes API before reporting ready"
            );
            tokio::spawn(ready_when_synced);
        }
        Ok(Dns {
            dns_addr,
            status_addr,
            metrics_addr,
            admin_addr,
            readiness,
            handler,
            stop,
            tcp,
            tcp_connections,
            udp: udp_tasks,
            source,
            draining,
        })
    }

    /// Start draining, as SIGTERM does: readiness 503 (and it stays so), answers continue.
    pub fn begin_drain(&self) {
        self.draining.cancel();
        self.readiness.set(false);
    }

    /// Stop answering and close every listener. In-flight TCP queries finish first; then the
    /// source is stopped.
    pub async fn shutdown(self) {
        self.begin_drain();
        self.stop.cancel();
        if let Err(e) = self.tcp.await {
            warn!(error = %e, "TCP accept loop ended abnormally");
        }
        self.tcp_connections.close();
        // A slow client could hold a connection for two idle timeouts (body, then reply);
        // never let that outlast the pod's termination grace period.
        if tokio::time::timeout(TCP_SHUTDOWN_GRACE, self.tcp_connections.wait())
            .await
            .is_err()
        {
            warn!(
                open = self.tcp_connections.len(),
                grace = ?TCP_SHUTDOWN_GRACE,
                "TCP connections still mid-query at shutdown: closed"
            );
        }
        for worker in self.udp {
            let _ = tokio::task::spawn_blocking(move || worker.join()).await;
        }
        match self.source {
            Source::Dir(task) => task.abort(),
            Source::Kube(source) => source.shutdown().await,
        }
    }
}

/// How long shutdown waits for TCP queries in flight.
const TCP_SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// The directory source with --config-dir, else the Kubernetes API (ServiceEntries only).
async fn start_source(
    config: &Config,
    registry: &mut Registry,
) -> Result<(SnapshotHandle, Source), StartError> {
    if let Some(dir) = &config.config_dir {
        let (handle, task) = watch_dir(dir.clone(), config.config_poll).await?;
        return Ok((handle, Source::Dir(task)));
    }
    let client = match &config.kubeconfig {
        Some(path) => kube_source::client_from_kubeconfig_file(path).await?,
        None => kube_source::client_infer().await?,
    };
    let metrics = Arc::new(kube_source::Metrics::new(registry));
    let source_config = KubeSourceConfig::new(
        &config.cluster_id,
        DNS_KINDS,
        config.watch_namespaces.clone(),
    );
    info!(
        cluster = %config.cluster_id,
        namespaces = ?config.watch_namespaces,
        "reading ServiceEntries from the Kubernetes API"
    );
    let source = KubeSource::start(client, source_config, metrics);
    Ok((source.handle.clone(), Source::Kube(source)))
}

/// Bind TCP and `udp_sockets` UDP sockets on one address. With port 0, find a port free for
/// both. The UDP sockets share the port with SO_REUSEPORT, one per worker: the kernel spreads
/// clients over them, and a datagram wakes only the worker whose socket it reached (one shared
/// socket woke every worker for each datagram, a third of the CPU at low rates).
async fn bind_dns(
    addr: SocketAddr,
    udp_sockets: usize,
) -> std::io::Result<(Vec<std::net::UdpSocket>, TcpListener)> {
    let explain = |e: std::io::Error, proto: &str, at: SocketAddr| {
        std::io::Error::new(
            e.kind(),
            format!(
                "cannot listen on {at} ({proto}) for DNS (--listen): {e}; is another DNS server \
                 running there, or does port 53 need CAP_NET_BIND_SERVICE?"
            ),
        )
    };
    let attempts = if addr.port() == 0 { 20 } else { 1 };
    let mut last = None;
    for _ in 0..attempts {
        let first = bind_udp(addr).map_err(|e| explain(e, "UDP", addr))?;
        let at = first.local_addr()?;
        // TCP binds without SO_REUSEPORT: a port another server holds fails here, so the UDP
        // port is never shared with it either.
        let tcp = match TcpListener::bind(at).await {
            Ok(tcp) => tcp,
            Err(e) => {
                last = Some(explain(e, "TCP", at));
                continue;
            }
        };
        let mut udp = vec![first];
        for _ in 1..udp_sockets {
            udp.push(bind_udp(at).map_err(|e| explain(e, "UDP", at))?);
        }
        return Ok((udp, tcp));
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no port free for UDP and TCP")))
}

/// One thread per UDP socket, each with its own single-threaded event loop, as knot's UDP
/// workers: a datagram wakes only the thread whose socket it reached, and no work moves
/// between threads (tokio's shared pool could hand a woken socket's task to another worker).
fn spawn_udp_worker(
    i: usize,
    socket: std::net::UdpSocket,
    handler: Handler,
    stop: CancellationToken,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name(format!("dns-udp-{i}"))
        .spawn(move || runtime.block_on(serve_udp(socket, handler, stop)))
}

/// A nonblocking UDP socket with SO_REUSEPORT, bound to `addr` (registered with an event loop
/// by the worker that serves it).
fn bind_udp(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// The single writer of the answer table: rebuilds it on every snapshot change, off the request
/// path, and swaps it in whole. Conflicts and notes are logged when they change.
fn spawn_table_writer(
    snapshot: SnapshotHandle,
    options: TableOptions,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) -> watch::Receiver<Arc<Table>> {
    let mut changes = snapshot.subscribe();
    let first = Table::build(&changes.borrow_and_update(), &options);
    let mut reported = BTreeSet::new();
    report(&first, &metrics, &mut reported);
    let (tx, rx) = watch::channel(Arc::new(first));
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                changed = changes.changed() => if changed.is_err() { return },
            }
            let current = changes.borrow_and_update().clone();
            // Off the runtime: with the prebuilt wire answers a large table takes a while,
            // and the UDP workers share these threads.
            let opts = options.clone();
            let Ok(table) =
                tokio::task::spawn_blocking(move || Table::build(&current, &opts)).await
            else {
                return;
            };
            report(&table, &metrics, &mut reported);
            info!(
                version = table.version,
                entries = table.entries_served,
                names = table.names().len(),
                conflicts = table.conflicts.len(),
                "answer table updated"
            );
            if tx.send(Arc::new(table)).is_err() {
                return;
            }
        }
    });
    rx
}

/// Log conflicts and notes that are new since the last table, and set the gauges.
fn report(table: &Table, metrics: &Metrics, reported: &mut BTreeSet<String>) {
    metrics.table_built(table);
    let now: BTreeSet<String> = table
        .conflicts
        .iter()
        .map(|c| c.to_string())
        .chain(table.notes.iter().cloned())
        .collect();
    for line in now.difference(reported) {
        warn!("{line}");
    }
    *reported = now;
}
