//! One connection: peek the ClientHello (bounded, with a deadline), decide, connect to an
//! endpoint (retrying others), replay the peeked bytes, then splice until both sides close.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, debug_span, field, info, warn};

use crate::alert::{self, AlertDescription};
use crate::balance::{self, Backend, Ejection};
use crate::budget::{ConnectionSlot, Exhausted, PeekBudget};
use crate::clock;
use crate::hello::{self, ClientHello, HelloError, Parsed};
use crate::metrics::Metrics;
use crate::route::{Route, RouteTable};
use crate::splice::{self, Ended, Transfer};

/// The per-connection settings, from `Config`.
#[derive(Clone, Debug)]
pub struct Settings {
    pub peek_timeout: Duration,
    pub connect_timeout: Duration,
    pub connect_attempts: u32,
    pub idle_timeout: Duration,
    pub ejection: Ejection,
}

/// What a connection keeps once routed: its upstream and what the access log needs. Every
/// open connection holds this for its whole life, so nothing else.
struct Routed {
    upstream: TcpStream,
    service: Arc<registry::ServiceName>,
    subset: Option<Arc<str>>,
    sni: Option<Box<str>>,
    endpoint: SocketAddr,
    pod: Option<Arc<str>>,
    /// Counts the connection on its endpoint (least-loaded balancing) until dropped.
    _active: balance::ActiveGuard,
}

/// What every connection shares.
pub struct Proxy {
    pub routes: watch::Receiver<Arc<RouteTable>>,
    pub metrics: Arc<Metrics>,
    pub settings: Settings,
    /// Connections still reading their ClientHello (--max-peeking[-per-source]).
    pub peeking: Arc<PeekBudget>,
    /// Routed connections (--max-connections).
    pub connections: Option<Arc<Semaphore>>,
    next_id: AtomicU64,
}

/// Why a connection ended before it was spliced.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("{}; is one client opening many connections that send nothing?", match .0 {
        Exhausted::Peeking => "too many connections are reading their ClientHello (--max-peeking)",
        Exhausted::SourcePeeking => "this source has too many connections reading their ClientHello (--max-peeking-per-source)",
    })]
    PeekBudget(Exhausted),
    #[error("--max-connections reached; raise it, or add gateway replicas")]
    MaxConnections,
    #[error("no complete ClientHello within {0:?}")]
    PeekTimeout(Duration),
    #[error("client closed before sending a complete ClientHello")]
    ClosedEarly,
    #[error("{0}")]
    Hello(#[from] HelloError),
    #[error("reading the ClientHello: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Rejected(#[from] crate::route::Reject),
    #[error(
        "could not connect to any endpoint of {service} (tried {tried}); last error: {last}; are its pods running and listening?"
    )]
    ConnectFailed {
        service: registry::ServiceName,
        tried: String,
        last: String,
    },
    #[error(
        "could not open a connection for {service}: {error}; the gateway is out of file descriptors, memory or local ports (check its ulimit -n and --max-connections); the endpoint is not ejected"
    )]
    LocalResources {
        service: registry::ServiceName,
        error: String,
    },
}

impl Failure {
    fn reason(&self) -> &'static str {
        match self {
            Failure::PeekBudget(e) => e.reason(),
            Failure::MaxConnections => "max_connections",
            Failure::PeekTimeout(_) => "peek_timeout",
            Failure::ClosedEarly => "closed_early",
            Failure::Hello(HelloError::NotTls) => "not_tls",
            Failure::Hello(HelloError::Malformed(_)) => "malformed_hello",
            Failure::Hello(HelloError::TooLarge) => "hello_too_large",
            Failure::Io(_) => "read_error",
            Failure::Rejected(r) => r.reason(),
            Failure::ConnectFailed { .. } => "connect_failed",
            Failure::LocalResources { .. } => "local_resources",
        }
    }

    fn alert(&self) -> Option<AlertDescription> {
        match self {
            Failure::Hello(HelloError::Malformed(_) | HelloError::TooLarge) => {
                Some(AlertDescription::DecodeError)
            }
            Failure::Rejected(r) => r.alert(),
            Failure::ConnectFailed { .. }
            | Failure::LocalResources { .. }
            | Failure::MaxConnections => Some(AlertDescription::InternalError),
            _ => None,
        }
    }

    fn service(&self) -> Option<&registry::ServiceName> {
        match self {
            Failure::Rejected(r) => r.service(),
            Failure::ConnectFailed { service, .. } | Failure::LocalResources { service, .. } => {
                Some(service)
            }
            _ => None,
        }
    }
}

impl Proxy {
    pub fn new(
        routes: watch::Receiver<Arc<RouteTable>>,
        metrics: Arc<Metrics>,
        settings: Settings,
        peeking: Arc<PeekBudget>,
        connections: Option<Arc<Semaphore>>,
    ) -> Proxy {
        Proxy {
            routes,
            metrics,
            settings,
            peeking,
            connections,
            next_id: AtomicU64::new(1),
        }
    }

    /// Serve one accepted connection to its end. `stop` closes it early (termination deadline).
    /// A plain function
    /// returning the one future, so no wrapper future keeps a second copy of the arguments
    /// for the connection's whole life.
    pub fn serve(
        self: Arc<Self>,
        mut client: TcpStream,
        peer: SocketAddr,
        stop: CancellationToken,
    ) -> impl Future<Output = ()> + Send + 'static {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        // Debug level: at the default level a span would cost every open connection its
        // formatted fields (a few hundred bytes); the access log line carries them instead.
        let span = debug_span!("conn", id, %peer, sni = field::Empty, service = field::Empty);
        // An async block that uses the arguments where they are: an `async fn` would move each
        // argument into a local of its own and keep both copies in every connection's state.
        async move {
            let start_ms = clock::now_ms();
            // Boxed: the routing phase's futures (peek and connect, with their timers) are
            // larger than the copy phase's, and an unboxed state would keep that size for the
            // whole life of every connection.
            let (routed, permit) = match Box::pin(self.route(&mut client, peer)).await {
                Ok(r) => r,
                // Boxed too, for the same reason: its alert write and timer would otherwise have
                // their own room in every connection's state.
                Err(failure) => return Box::pin(self.refuse(client, failure)).await,
            };
            // Its place under --max-connections until the block ends, in 8 bytes of this state
            // rather than a permit's 16 (the state's budget is in the test below).
            let _slot = ConnectionSlot::hold(permit, self.connections.as_deref());
            let counters = self.metrics.service(&routed.service);
            self.metrics.active.inc();
            counters.opened.inc();
            let transfer = Transfer::default();
            let ended = tokio::select! {
                r = splice::copy_bidirectional(&client, &routed.upstream, self.settings.idle_timeout, &transfer) => r,
                _ = stop.cancelled() => Err(std::io::Error::other("gateway terminating: deadline for in-flight connections passed")),
            };
            self.metrics.active.dec();
            let up = transfer.up.load(Ordering::Relaxed);
            let down = transfer.down.load(Ordering::Relaxed);
            let (outcome, outcome_counter) = match &ended {
                Ok(Ended::Closed) => ("closed", &counters.closed),
                Ok(Ended::IdleTimeout) => ("idle_timeout", &counters.idle_timeout),
                Err(_) => ("error", &counters.error),
            };
            counters.bytes_up.inc_by(up);
            counters.bytes_down.inc_by(down);
            outcome_counter.inc();
            info!(
                target: "access",
                %peer,
                sni = routed.sni.as_deref().unwrap_or(""),
                service = %routed.service,
                subset = routed.subset.as_deref().unwrap_or(""),
                endpoint = %routed.endpoint,
                pod = routed.pod.as_deref().unwrap_or(""),
                bytes_up = up,
                bytes_down = down,
                duration_ms = clock::now_ms().saturating_sub(start_ms),
                outcome,
                error = ended.as_ref().err().map(|e| e.to_string()).unwrap_or_default(),
                "connection"
            );
        }
        .instrument(span)
    }

    /// Count and log a refused connection, and tell the client why with a TLS alert.
    async fn refuse(&self, mut client: TcpStream, failure: Failure) {
        self.metrics.reject(failure.reason(), failure.service());
        if let Failure::LocalResources { .. } = failure {
            warn_local_resources(&failure);
        } else {
            debug!(reason = failure.reason(), "refused: {failure}");
        }
        if let Some(alert) = failure.alert() {
            let record = alert::alert_record(alert);
            let _ = tokio::time::timeout(Duration::from_secs(1), client.write_all(&record)).await;
        }
    }

    /// Everything before the splice. On success the peeked bytes are already replayed.
    /// With the connection's place under --max-connections, if there is a limit.
    async fn route(
        &self,
        client: &mut TcpStream,
        peer: SocketAddr,
    ) -> Result<(Routed, Option<OwnedSemaphorePermit>), Failure> {
        self.metrics.accepted.inc();
        self.routes.borrow().admit_source(peer.ip())?;
        let peeking = self.peeking.enter(peer.ip()).map_err(Failure::PeekBudget)?;
        let _ = client.set_nodelay(true);
        let started = Instant::now();
        let (peeked, hello) = tokio::time::timeout(self.settings.peek_timeout, read_hello(client))
            .await
            .map_err(|_| Failure::PeekTimeout(self.settings.peek_timeout))??;
        drop(peeking);
        self.metrics
            .peek_seconds
            .observe(started.elapsed().as_secs_f64());
        let span = tracing::Span::current();
        span.record("sni", hello.sni.as_deref().unwrap_or(""));
        // One cheap clone of the current table; never held across a reload.
        let table = self.routes.borrow().clone();
        let route = table.decide(&hello)?;
        span.record("service", field::display(&route.service));
        let permit = match &self.connections {
            None => None,
            Some(limit) => Some(
                limit
                    .clone()
                    .try_acquire_owned()
                    .map_err(|_| Failure::MaxConnections)?,
            ),
        };
        let (upstream, backend) = self.connect(&route, &peeked).await?;
        // Keep only what the access log needs: not the whole parsed hello, nor the route's
        // endpoint list.
        Ok((
            Routed {
                upstream,
                service: route.service,
                subset: route.subset,
                sni: hello.sni.map(String::into_boxed_str),
                endpoint: backend.addr,
                _active: backend.state.open(),
                pod: backend.pod,
            },
            permit,
        ))
    }

    /// Connect to a ready endpoint and replay the ClientHello; on failure try up to
    /// `connect_attempts - 1` others, so one dead pod costs the client nothing. A failure that
    /// is the gateway's own (out of descriptors, memory or local ports) is not held against
    /// the endpoint and is not retried elsewhere: every endpoint would fail the same way.
    async fn connect(&self, route: &Route, peeked: &[u8]) -> Result<(TcpStream, Backend), Failure> {
        let mut tried: Vec<SocketAddr> = Vec::new();
        let mut last = String::from("no endpoint to try");
        let counters = self.metrics.service(&route.service);
        for _ in 0..self.settings.connect_attempts {
            let Some(backend) = balance::pick(&route.backends, &tried, clock::now_ms()) else {
                break;
            };
            tried.push(backend.addr);
            let started = Instant::now();
            match self.connect_one(backend.addr, peeked).await {
                Ok(stream) => {
                    self.metrics
                        .connect_seconds
                        .observe(started.elapsed().as_secs_f64());
                    backend.state.record_success();
                    return Ok((stream, backend.clone()));
                }
                Err(ConnectError {
                    local: true,
                    message,
                }) => {
                    return Err(Failure::LocalResources {
                        service: registry::ServiceName::clone(&route.service),
                        error: message,
                    });
                }
                Err(ConnectError { message, .. }) => {
                    counters.connect_failures.inc();
                    debug!(endpoint = %backend.addr, error = %message, "connect failed; trying another endpoint");
                    if let Some(time) = backend
                        .state
                        .record_failure(&self.settings.ejection, clock::now_ms())
                    {
                        counters.ejections.inc();
                        warn!(endpoint = %backend.addr, service = %route.service, ?time,
                            "endpoint ejected after consecutive connect failures; is the pod healthy?");
                    }
                    last = message;
                }
            }
        }
        Err(Failure::ConnectFailed {
            service: registry::ServiceName::clone(&route.service),
            tried: tried
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            last,
        })
    }

    async fn connect_one(
        &self,
        addr: SocketAddr,
        peeked: &[u8],
    ) -> Result<TcpStream, ConnectError> {
        let timeout = self.settings.connect_timeout;
        let mut stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                return Err(ConnectError {
                    local: is_local_resource_error(&e),
                    message: format!("connect to {addr}: {e}"),
                });
            }
            Err(_) => {
                return Err(ConnectError {
                    local: false,
                    message: format!("connect to {addr} timed out after {timeout:?}"),
                });
            }
        };
        let _ = stream.set_nodelay(true);
        stream.write_all(peeked).await.map_err(|e| ConnectError {
            local: false,
            message: format!("replaying the ClientHello to {addr}: {e}"),
        })?;
        Ok(stream)
    }
}

/// Why one connect attempt failed.
struct ConnectError {
    /// The gateway's own resources ran out; the endpoint is not to blame.
    local: bool,
    message: String,
}

/// Errors that say the gateway itself is out of something (descriptors, memory, buffers,
/// local ports), not that the endpoint failed.
fn is_local_resource_error(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EADDRNOTAVAIL)
    )
}

/// Log local resource exhaustion at most once a second: it tends to come in floods.
fn warn_local_resources(failure: &Failure) {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = clock::now_ms();
    let last = LAST.load(Ordering::Relaxed);
    if (last == 0 || now.saturating_sub(last) >= 1000)
        && LAST
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        warn!("{failure}");
    }
}

/// Read until the buffer holds a complete ClientHello. The buffer grows as needed and never
/// past one maximum TLS record; it is dropped once replayed.
async fn read_hello(client: &mut TcpStream) -> Result<(Vec<u8>, ClientHello), Failure> {
    let mut buf: Vec<u8> = Vec::with_capacity(2048);
    loop {
        if buf.len() == buf.capacity() {
            let room = hello::MAX_HELLO_BYTES.saturating_sub(buf.len()).max(1);
            buf.reserve_exact(room.min(buf.len().max(2048)));
        }
        let n = client.read_buf(&mut buf).await?;
        match hello::parse_client_hello(&buf)? {
            Parsed::Complete(h) => return Ok((buf, h)),
            Parsed::Incomplete if n == 0 => return Err(Failure::ClosedEarly),
            Parsed::Incomplete => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::gauge::Gauge;

    /// Every open connection is one tokio task holding this future. Tokio adds about 104
    /// bytes of its own and aligns the task to 128; jemalloc then serves it from a size class
    /// (..., 896, 1,024, 1,280). Up to 920 bytes of future make a 1,024-byte task, a few more
    /// a 1,280-byte one: a quarter more memory per idle connection (issue 7, BENCHMARKS.md).
    /// Measured with Rust 1.95: 888 bytes in release, 912 in a test build.
    #[tokio::test]
    async fn a_connection_state_fits_its_memory_budget() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = TcpStream::connect(addr).await.unwrap();
        let options = crate::route::RouteOptions {
            global_suffix: "global".into(),
            domain_suffix: "cluster.local".into(),
            export_policy: crate::route::ExportPolicy::Exported,
            accept_cluster_local: false,
            require_istio_alpn: false,
            allow_source: Vec::new(),
        };
        let empty = RouteTable::empty(Arc::new(options));
        let (_tx, routes) = watch::channel(Arc::new(empty));
        let metrics = Arc::new(Metrics::new(&mut Default::default()));
        let settings = Settings {
            peek_timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(1),
            connect_attempts: 1,
            idle_timeout: Duration::from_secs(1),
            ejection: Ejection {
                after_failures: 1,
                base: Duration::from_secs(1),
                max: Duration::from_secs(1),
            },
        };
        let budget = PeekBudget::new(1, 1, Gauge::default());
        let proxy = Arc::new(Proxy::new(routes, metrics, settings, budget, None));
        let serve = proxy.serve(client, addr, CancellationToken::new());
        let size = std::mem::size_of_val(&serve);
        assert!(
            size <= 920,
            "a connection's future grew to {size} bytes (budget 920)"
        );
    }

    #[test]
    fn running_out_of_local_resources_is_not_the_endpoints_fault() {
        for errno in [
            libc::EMFILE,
            libc::ENFILE,
            libc::ENOBUFS,
            libc::ENOMEM,
            libc::EADDRNOTAVAIL,
        ] {
            assert!(is_local_resource_error(&std::io::Error::from_raw_os_error(
                errno
            )));
        }
        for errno in [
            libc::ECONNREFUSED,
            libc::ETIMEDOUT,
            libc::EHOSTUNREACH,
            libc::ECONNRESET,
        ] {
            assert!(!is_local_resource_error(
                &std::io::Error::from_raw_os_error(errno)
            ));
        }
        assert!(!is_local_resource_error(&std::io::Error::other("x")));
    }
}
