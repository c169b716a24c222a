//! Wiring: the UDP and TCP listeners with their threads, the answer-table writer, and the
//! process shell's parts (source, admin servers, readiness, SIGTERM lifecycle) around them.
//! Tests start a whole [`Dns`] in-process on 127.0.0.1 port 0.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;

use process_shell::admin::Servers;
use process_shell::readiness::synced_and_built;
use process_shell::source::{SourceError, SourceSpec};
use process_shell::{ConfigError, Lifecycle, Readiness, Source, Work};
use prometheus_client::registry::Registry;
use registry::SnapshotHandle;
use registry::objects::Kind;
use registry::source::kube as kube_source;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::answers::Answers;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::server::{Handler, serve_tcp, serve_udp};
use crate::table::{Table, TableOptions};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Source(#[from] SourceError),
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
    lifecycle: Lifecycle,
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
        let servers = Servers::bind(&config.listeners).await?;
        let addresses = servers.addresses()?;

        let mut registry = Registry::default();
        let spec = SourceSpec {
            cluster_id: &config.cluster_id,
            kinds: DNS_KINDS,
            secrets: None,
        };
        let source = Source::start(&config.source, spec, || {
            Arc::new(kube_source::Metrics::new(&mut registry))
        })
        .await?;
        let snapshot = source.handle.clone();

        let metrics = Arc::new(Metrics::new(&mut registry));
        let work = Work::default();
        // Cancelled last, once every query is answered: the admin servers and the table writer.
        let stopped = CancellationToken::new();
        let answers = spawn_table_writer(
            snapshot.clone(),
            config.table_options(),
            metrics.clone(),
            stopped.clone(),
        );
        let handler = Handler::new(answers.clone(), metrics, config.max_udp_payload);

        let readiness = Readiness::default();
        let admin_state = crate::admin::AdminState {
            config: config.clone(),
            snapshot: snapshot.clone(),
            answers: answers.clone(),
        };
        servers.serve(
            readiness.clone(),
            registry,
            crate::admin::router(admin_state),
            &stopped,
        );

        // UDP answers until the drain is over; TCP connections are in-flight work.
        let udp_workers = udp
            .into_iter()
            .enumerate()
            .map(|(i, socket)| {
                spawn_udp_worker(i, socket, handler.clone(), work.stop_accepting.clone())
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        let tcp = tokio::spawn(serve_tcp(
            tcp_listener,
            handler.clone(),
            config.tcp_idle_timeout,
            work.clone(),
        ));

        // Ready once the source's first full sync is done and the table is built from it: at
        // once for a directory; for the API, after ServiceEntries have been listed. Start does
        // not wait for the API: until then, names are answered from an empty table (NXDOMAIN)
        // and readiness is 503.
        if !snapshot.is_synced() {
            info!(
                listen = %dns_addr,
                "answering; waiting for the first full list of ServiceEntries from the \
                 Kubernetes API before reporting ready"
            );
        }
        let zones = config.zones.clone();
        readiness
            .become_ready_when(
                &snapshot,
                synced_and_built(snapshot.clone(), answers, |a| a.version()),
                move || {
                    info!(
                        listen = %dns_addr,
                        status = %addresses.status,
                        metrics = %addresses.metrics,
                        admin = %addresses.admin,
                        ?zones,
                        "dns ready (UDP and TCP)"
                    )
                },
            )
            .await;

        let lifecycle = Lifecycle::spawn(
            "dns",
            readiness.clone(),
            &config.lifecycle,
            work,
            async move {
                if let Err(e) = tcp.await {
                    warn!(error = %e, "TCP accept loop ended abnormally");
                }
                for worker in udp_workers {
                    let _ = tokio::task::spawn_blocking(move || worker.join()).await;
                }
                stopped.cancel();
                source.shutdown().await;
            },
        );
        Ok(Dns {
            dns_addr,
            status_addr: addresses.status,
            metrics_addr: addresses.metrics,
            admin_addr: addresses.admin,
            readiness,
            handler,
            lifecycle,
        })
    }

    /// Start terminating, as SIGTERM does: readiness 503 (and it stays so), answers continue
    /// for --drain-duration; then the listeners close and TCP queries in flight have until
    /// --termination-deadline.
    pub fn begin_termination(&self) {
        self.lifecycle.begin();
    }

    /// Wait until termination has finished.
    pub async fn wait(self) {
        self.lifecycle.wait().await;
    }

    /// Stop now (tests): no drain, no deadline.
    pub async fn shutdown(self) {
        self.lifecycle.stop_now().await;
    }
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

/// The single writer of the answers: rebuilds them on every snapshot change, off the request
/// path, and swaps them in whole. Conflicts and notes are logged when they change.
fn spawn_table_writer(
    snapshot: SnapshotHandle,
    options: TableOptions,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) -> watch::Receiver<Arc<Answers>> {
    let mut changes = snapshot.subscribe();
    let first = Answers::build(&changes.borrow_and_update(), &options);
    let mut reported = BTreeSet::new();
    report(&first.table, &metrics, &mut reported);
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
            let Ok(answers) =
                tokio::task::spawn_blocking(move || Answers::build(&current, &opts)).await
            else {
                return;
            };
            let table = &answers.table;
            report(table, &metrics, &mut reported);
            info!(
                version = table.version,
                entries = table.entries_served,
                names = table.names().len(),
                conflicts = table.conflicts.len(),
                "answer table updated"
            );
            if tx.send(Arc::new(answers)).is_err() {
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
