//! Wiring: the config source (a directory, or the Kubernetes API), the route-table writer, the listeners, and graceful termination.
//! Tests start a whole [`Gateway`] in-process on 127.0.0.1 port 0.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use registry::SnapshotHandle;
use registry::admin::{self, Readiness};
use registry::source::dir::{DirError, watch_dir};
use registry::source::kube::{self as kube_source, KubeError, KubeSource, KubeSourceConfig};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::{Config, ConfigError};
use crate::metrics::Metrics;
use crate::proxy::{Proxy, Settings};
use crate::route::RouteTable;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Source(#[from] DirError),
    #[error(transparent)]
    Kube(#[from] KubeError),
    #[error(transparent)]
    Bind(#[from] std::io::Error),
}

/// A running gateway.
pub struct Gateway {
    pub proxy_addr: SocketAddr,
    pub status_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub readiness: Readiness,
    terminate: CancellationToken,
    done: tokio::task::JoinHandle<()>,
}

impl Gateway {
    pub async fn start(config: Config) -> Result<Gateway, StartError> {
        config.validate()?;
        let config = Arc::new(config);
        let mut registry = Registry::default();
        let (snapshot, kube) = start_source(&config, &mut registry).await?;

        let metrics = Arc::new(Metrics::new(&mut registry));
        let routes = spawn_route_writer(snapshot.clone(), config.route_options(), metrics.clone());
        let routes_for_readiness = routes.clone();

        let workers = config.workers.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        });
        let listeners = bind_listeners(config.listen, workers, config.peek_timeout)?;
        let status = admin::bind(config.status_listen, "readiness (--status-listen)").await?;
        let metrics_l = admin::bind(config.metrics_listen, "metrics (--metrics-listen)").await?;
        let admin_l = admin::bind(config.admin_listen, "admin (--admin-listen)").await?;
        let gateway_addrs = (
            listeners[0].local_addr()?,
            status.local_addr()?,
            metrics_l.local_addr()?,
            admin_l.local_addr()?,
        );

        let readiness = Readiness::default();
        let admin_stop = CancellationToken::new();
        admin::spawn_http(
            status,
            admin::status_router(readiness.clone()),
            admin_stop.clone(),
        );
        admin::spawn_http(
            metrics_l,
            admin::metrics_router(Arc::new(registry)),
            admin_stop.clone(),
        );
        let admin_state = crate::admin::AdminState {
            config: config.clone(),
            snapshot: snapshot.clone(),
            routes: routes.clone(),
        };
        admin::spawn_http(
            admin_l,
            crate::admin::router(admin_state),
            admin_stop.clone(),
        );

        let proxy = Arc::new(Proxy::new(routes, metrics.clone(), settings(&config)));
        let accept_stop = CancellationToken::new();
        let conn_stop = CancellationToken::new();
        let tracker = TaskTracker::new();
        let limit = config.max_connections.map(|n| Arc::new(Semaphore::new(n)));
        for (i, listener) in listeners.into_iter().enumerate() {
            let (proxy, limit, tracker) = (proxy.clone(), limit.clone(), tracker.clone());
            let (accept_stop, conn_stop) = (accept_stop.clone(), conn_stop.clone());
            let metrics = metrics.clone();
            let heartbeat = heartbeat_period(&config);
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            std::thread::Builder::new()
                .name(format!("gateway-worker-{i}"))
                .spawn(move || {
                    runtime.block_on(async move {
                        tokio::spawn(heartbeat_loop(heartbeat));
                        let listener = match TcpListener::from_std(listener) {
                            Ok(l) => l,
                            Err(e) => {
                                warn!(error = %e, "worker could not register its listener");
                                return;
                            }
                        };
                        accept_loop(
                            listener,
                            proxy,
                            limit,
                            tracker.clone(),
                            accept_stop,
                            conn_stop,
                            metrics,
                        )
                        .await;
                        // This thread's connections run here: keep it until every one ended.
                        tracker.wait().await;
                    })
                })?;
        }

        // Ready once the source's first full sync is done (at once for a directory; for the
        // API, after every watched kind has been listed). Start does not wait for it.
        let terminate = CancellationToken::new();
        let ready_when_synced = {
            let (snapshot, readiness, terminate) =
                (snapshot.clone(), readiness.clone(), terminate.clone());
            let mut tables = routes_for_readiness;
            let listen = gateway_addrs.0;
            let cluster = config.cluster_id.clone();
            async move {
                tokio::select! {
                    _ = terminate.cancelled() => {}
                    _ = async {
                        snapshot.wait_synced().await;
                        // Ready means routing by the synced objects: wait for their table.
                        let synced = snapshot.current().status.version;
                        let _ = tables.wait_for(|t| t.version() >= synced).await;
                    } => {
                        readiness.set(true);
                        info!(%listen, %cluster, "gateway ready");
                    }
                }
            }
        };
        if snapshot.is_synced() {
            ready_when_synced.await;
        } else {
            info!("waiting for the first full sync of the Kubernetes API before reporting ready");
            tokio::spawn(ready_when_synced);
        }

        let done = tokio::spawn(lifecycle(
            terminate.clone(),
            readiness.clone(),
            config.clone(),
            accept_stop,
            tracker,
            conn_stop,
            admin_stop,
        ));
        let done = tokio::spawn(async move {
            let _ = done.await;
            if let Some(source) = kube {
                source.shutdown().await;
            }
        });
        Ok(Gateway {
            proxy_addr: gateway_addrs.0,
            status_addr: gateway_addrs.1,
            metrics_addr: gateway_addrs.2,
            admin_addr: gateway_addrs.3,
            readiness,
            terminate,
            done,
        })
    }

    /// Start graceful termination, as SIGTERM does: readiness 503, keep accepting for the drain
    /// duration, stop the listener, give in-flight connections until the deadline.
    pub fn begin_termination(&self) {
        self.terminate.cancel();
    }

    /// Wait until termination has finished.
    pub async fn wait(self) {
        let _ = self.done.await;
    }
}

/// The directory source with --config-dir, else the Kubernetes API.
async fn start_source(
    config: &Config,
    registry: &mut Registry,
) -> Result<(SnapshotHandle, Option<KubeSource>), StartError> {
    if let Some(dir) = &config.config_dir {
        let (handle, _task) = watch_dir(dir.clone(), config.config_poll).await?;
        return Ok((handle, None));
    }
    let client = match &config.kubeconfig {
        Some(path) => kube_source::client_from_kubeconfig_file(path).await?,
        None => kube_source::client_infer().await?,
    };
    let metrics = Arc::new(kube_source::Metrics::new(registry));
    let source_config = KubeSourceConfig::new(
        &config.cluster_id,
        KubeSourceConfig::GATEWAY_KINDS,
        config.watch_namespaces.clone(),
    );
    let source = KubeSource::start(client, source_config, metrics);
    Ok((source.handle.clone(), Some(source)))
}

/// A timer that always fires within this period keeps the worker's timer wheel from ever
/// sleeping past a connection's connect (or peek) deadline. Without it, tokio wakes its own
/// event loop (an eventfd write and an extra epoll_wait) each time a connection arms a timer
/// earlier than the loop's planned wake-up: once per new connection, for its connect timeout.
fn heartbeat_period(config: &Config) -> Duration {
    config
        .connect_timeout
        .min(config.peek_timeout)
        .clamp(Duration::from_millis(100), Duration::from_secs(1))
}

async fn heartbeat_loop(period: Duration) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
    }
}

fn settings(config: &Config) -> Settings {
    Settings {
        peek_timeout: config.peek_timeout,
        connect_timeout: config.connect_timeout,
        connect_attempts: config.connect_attempts,
        idle_timeout: config.idle_timeout,
        ejection: config.ejection(),
        allow_source: config.allow_source.clone(),
    }
}

/// The single writer of the route table: rebuilds it on every snapshot change, off the data
/// path. New connections see the new table at once; established ones keep their endpoint.
fn spawn_route_writer(
    snapshot: registry::SnapshotHandle,
    options: crate::route::RouteOptions,
    metrics: Arc<Metrics>,
) -> watch::Receiver<Arc<RouteTable>> {
    let mut changes = snapshot.subscribe();
    let first = RouteTable::build(
        &changes.borrow_and_update(),
        &options,
        &RouteTable::default(),
    );
    metrics.route_tables.inc();
    let (tx, rx) = watch::channel(Arc::new(first));
    tokio::spawn(async move {
        while changes.changed().await.is_ok() {
            let current = changes.borrow_and_update().clone();
            let previous = tx.borrow().clone();
            let table = RouteTable::build(&current, &options, &previous);
            metrics.route_tables.inc();
            info!(
                version = current.status.version,
                hosts = table.hosts().count(),
                "route table updated"
            );
            if tx.send(Arc::new(table)).is_err() {
                return;
            }
        }
    });
    rx
}

/// `workers` listeners on one address with SO_REUSEPORT, so each worker thread accepts on its
/// own and the kernel spreads connections over them (nginx's `reuseport`). The first bind says
/// which flag to change when the address is taken; the others take the port it got.
fn bind_listeners(
    addr: SocketAddr,
    workers: usize,
    peek_timeout: Duration,
) -> Result<Vec<std::net::TcpListener>, std::io::Error> {
    use socket2::{Domain, Protocol, Socket, Type};
    let mut out: Vec<std::net::TcpListener> = Vec::with_capacity(workers);
    for _ in 0..workers.max(1) {
        let at = match out.first() {
            Some(first) => first.local_addr()?,
            None => addr,
        };
        let bind = || -> std::io::Result<std::net::TcpListener> {
            let socket = Socket::new(Domain::for_address(at), Type::STREAM, Some(Protocol::TCP))?;
            socket.set_reuse_address(true)?;
            #[cfg(unix)]
            socket.set_reuse_port(true)?;
            socket.set_nonblocking(true)?;
            socket.bind(&at.into())?;
            socket.listen(1024)?;
            let listener: std::net::TcpListener = socket.into();
            defer_accept(&listener, peek_timeout);
            Ok(listener)
        };
        out.push(bind().map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!(
                    "cannot listen on {at} for the TLS passthrough listener (--listen): {e}; is another process using it?"
                ),
            )
        })?);
    }
    Ok(out)
}

/// Hand us a connection only once its first bytes (the ClientHello) have arrived, as nginx's
/// `deferred` does: TLS clients speak first, so this saves a read that would find nothing and
/// a wake-up per connection, and a client that never speaks costs the gateway nothing. The
/// kernel still passes on a silent connection after about `peek_timeout` (then the peek
/// deadline applies as usual).
fn defer_accept(listener: &std::net::TcpListener, peek_timeout: Duration) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let secs = peek_timeout.as_secs().clamp(1, i32::MAX as u64) as libc::c_int;
        // SAFETY: a valid socket and a pointer to an int of the size passed.
        let rc = unsafe {
            libc::setsockopt(
                listener.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_DEFER_ACCEPT,
                (&secs as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            warn!(error = %std::io::Error::last_os_error(), "TCP_DEFER_ACCEPT not set; connections are accepted before their first bytes");
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (listener, peek_timeout);
}

async fn accept_loop(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    limit: Option<Arc<Semaphore>>,
    tracker: TaskTracker,
    stop: CancellationToken,
    conn_stop: CancellationToken,
    metrics: Arc<Metrics>,
) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Usually out of file descriptors: back off instead of spinning.
                warn!(error = %e, "accept failed; is the file descriptor limit too low?");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let permit = match &limit {
            None => None,
            Some(sem) => match sem.clone().try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => {
                    metrics.reject("max_connections", None);
                    tracing::debug!(%peer, "refused: --max-connections reached");
                    continue;
                }
            },
        };
        tracker.spawn(proxy.clone().serve(stream, peer, conn_stop.clone(), permit));
    }
}

async fn lifecycle(
    terminate: CancellationToken,
    readiness: Readiness,
    config: Arc<Config>,
    accept_stop: CancellationToken,
    tracker: TaskTracker,
    conn_stop: CancellationToken,
    admin_stop: CancellationToken,
) {
    terminate.cancelled().await;
    readiness.set(false);
    info!(drain = ?config.drain_duration, "terminating: readiness is now 503; still accepting while load balancers move away");
    tokio::time::sleep(config.drain_duration).await;
    accept_stop.cancel();
    tracker.close();
    info!(in_flight = tracker.len(), deadline = ?config.termination_deadline, "listener closed; waiting for in-flight connections");
    if tokio::time::timeout(config.termination_deadline, tracker.wait())
        .await
        .is_err()
    {
        warn!(
            in_flight = tracker.len(),
            "termination deadline passed; closing the remaining connections"
        );
        conn_stop.cancel();
        tracker.wait().await;
    }
    admin_stop.cancel();
    info!("gateway stopped");
}
