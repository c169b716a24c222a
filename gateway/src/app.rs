//! Wiring: the gateway's listeners and worker threads, the route-table writer, and the process
//! shell's parts (source, admin servers, readiness, SIGTERM lifecycle) around them.
//! Tests start a whole [`Gateway`] in-process on 127.0.0.1 port 0.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use process_shell::admin::Servers;
use process_shell::readiness::synced_and_built;
use process_shell::source::{SourceError, SourceSpec};
use process_shell::{ConfigError, Lifecycle, Readiness, Source, Work};
use prometheus_client::registry::Registry;
use registry::source::kube::{self as kube_source, KubeSourceConfig};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::budget::PeekBudget;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::proxy::{Proxy, Settings};
use crate::route::{RouteOptions, RouteTable};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Source(#[from] SourceError),
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
    lifecycle: Lifecycle,
}

impl Gateway {
    pub async fn start(config: Config) -> Result<Gateway, StartError> {
        config.validate()?;
        let config = Arc::new(config);
        // Listeners first: nothing is started (no API watches) when one cannot be bound.
        let workers = config.workers.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        });
        let listeners = bind_listeners(config.listen, workers, config.peek_timeout)?;
        let proxy_addr = listeners[0].local_addr()?;
        let servers = Servers::bind(&config.listeners).await?;
        let addresses = servers.addresses()?;

        let mut registry = Registry::default();
        let spec = SourceSpec {
            cluster_id: &config.cluster_id,
            kinds: KubeSourceConfig::GATEWAY_KINDS,
            secrets: None,
        };
        let source = Source::start(&config.source, spec, || {
            Arc::new(kube_source::Metrics::new(&mut registry))
        })
        .await?;
        let snapshot = source.handle.clone();
        let metrics = Arc::new(Metrics::new(&mut registry));
        let routes = spawn_route_writer(snapshot.clone(), config.route_options(), metrics.clone());

        let readiness = Readiness::default();
        let admin_stop = CancellationToken::new();
        let admin_state = crate::admin::AdminState {
            config: config.clone(),
            snapshot: snapshot.clone(),
            routes: routes.clone(),
        };
        servers.serve(
            readiness.clone(),
            registry,
            crate::admin::router(admin_state),
            &admin_stop,
        );

        let proxy = Arc::new(Proxy::new(
            routes.clone(),
            metrics.clone(),
            settings(&config),
            PeekBudget::new(
                config.max_peeking,
                config.max_peeking_per_source,
                metrics.peeking.clone(),
            ),
            config.max_connections.map(|n| Arc::new(Semaphore::new(n))),
        ));
        let work = Work::default();
        for (i, listener) in listeners.into_iter().enumerate() {
            let (proxy, work) = (proxy.clone(), work.clone());
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
                        accept_loop(listener, proxy, &work).await;
                        // This thread's connections run here: keep it until every one ended.
                        work.in_flight.wait().await;
                    })
                })?;
        }

        // Ready once the source's first full sync is done (at once for a directory; for the
        // API, after every watched kind has been listed) and the route table is built from it.
        if !snapshot.is_synced() {
            info!("waiting for the first full sync of the Kubernetes API before reporting ready");
        }
        let cluster = config.cluster_id.clone();
        readiness
            .become_ready_when(
                &snapshot,
                synced_and_built(snapshot.clone(), routes, |t| t.version()),
                move || info!(listen = %proxy_addr, %cluster, "gateway ready"),
            )
            .await;

        let lifecycle = Lifecycle::spawn(
            "gateway",
            readiness.clone(),
            &config.lifecycle,
            work,
            async move {
                admin_stop.cancel();
                source.shutdown().await;
            },
        );
        Ok(Gateway {
            proxy_addr,
            status_addr: addresses.status,
            metrics_addr: addresses.metrics,
            admin_addr: addresses.admin,
            readiness,
            lifecycle,
        })
    }

    /// Start graceful termination, as SIGTERM does: readiness 503, keep accepting for the drain
    /// duration, stop the listener, give in-flight connections until the deadline.
    pub fn begin_termination(&self) {
        self.lifecycle.begin();
    }

    /// Wait until termination has finished.
    pub async fn wait(self) {
        self.lifecycle.wait().await;
    }
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
    }
}

/// The single writer of the route table: rebuilds it on every snapshot change, off the data
/// path. New connections see the new table at once; established ones keep their endpoint.
fn spawn_route_writer(
    snapshot: registry::SnapshotHandle,
    options: Arc<RouteOptions>,
    metrics: Arc<Metrics>,
) -> watch::Receiver<Arc<RouteTable>> {
    let mut changes = snapshot.subscribe();
    let first = RouteTable::build(&changes.borrow_and_update(), &options, None);
    metrics.route_tables.inc();
    let (tx, rx) = watch::channel(Arc::new(first));
    tokio::spawn(async move {
        while changes.changed().await.is_ok() {
            let current = changes.borrow_and_update().clone();
            let previous = tx.borrow().clone();
            let table = RouteTable::build(&current, &options, Some(&previous));
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
#[allow(unsafe_code)] // setsockopt(TCP_DEFER_ACCEPT) has no safe wrapper
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

async fn accept_loop(listener: TcpListener, proxy: Arc<Proxy>, work: &Work) {
    loop {
        let accepted = tokio::select! {
            _ = work.stop_accepting.cancelled() => return,
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
        work.in_flight
            .spawn(proxy.clone().serve(stream, peer, work.force.clone()));
    }
}
