//! One connection: peek the ClientHello (bounded, with a deadline), decide, connect to an
//! endpoint (retrying others), replay the peeked bytes, then splice until both sides close.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use registry::Cidr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, field, info, info_span, warn};

use crate::balance::{self, Backend, Ejection};
use crate::hello::{self, AlertDescription, ClientHello, HelloError, Parsed};
use crate::metrics::{BytesLabels, ClosedLabels, Metrics, ServiceLabels};
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
    pub allow_source: Vec<Cidr>,
}

/// What every connection shares.
pub struct Proxy {
    pub routes: watch::Receiver<Arc<RouteTable>>,
    pub metrics: Arc<Metrics>,
    pub settings: Settings,
    next_id: AtomicU64,
}

/// Why a connection ended before it was spliced.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("source {0} is not in --allow-source")]
    SourceDenied(std::net::IpAddr),
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
}

impl Failure {
    fn reason(&self) -> &'static str {
        match self {
            Failure::SourceDenied(_) => "source_denied",
            Failure::PeekTimeout(_) => "peek_timeout",
            Failure::ClosedEarly => "closed_early",
            Failure::Hello(HelloError::NotTls) => "not_tls",
            Failure::Hello(HelloError::Malformed(_)) => "malformed_hello",
            Failure::Hello(HelloError::TooLarge) => "hello_too_large",
            Failure::Io(_) => "read_error",
            Failure::Rejected(r) => r.reason(),
            Failure::ConnectFailed { .. } => "connect_failed",
        }
    }

    fn alert(&self) -> Option<AlertDescription> {
        match self {
            Failure::Hello(HelloError::Malformed(_) | HelloError::TooLarge) => {
                Some(AlertDescription::DecodeError)
            }
            Failure::Rejected(r) => Some(r.alert()),
            Failure::ConnectFailed { .. } => Some(AlertDescription::InternalError),
            _ => None,
        }
    }

    fn service(&self) -> Option<&registry::ServiceName> {
        match self {
            Failure::Rejected(r) => r.service(),
            Failure::ConnectFailed { service, .. } => Some(service),
            _ => None,
        }
    }
}

impl Proxy {
    pub fn new(
        routes: watch::Receiver<Arc<RouteTable>>,
        metrics: Arc<Metrics>,
        settings: Settings,
    ) -> Proxy {
        Proxy {
            routes,
            metrics,
            settings,
            next_id: AtomicU64::new(1),
        }
    }

    /// Serve one accepted connection to its end. `stop` closes it early (termination deadline).
    pub async fn serve(
        self: Arc<Self>,
        client: TcpStream,
        peer: SocketAddr,
        stop: CancellationToken,
    ) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let span = info_span!("conn", id, %peer, sni = field::Empty, service = field::Empty);
        self.serve_inner(client, peer, stop).instrument(span).await
    }

    async fn serve_inner(&self, mut client: TcpStream, peer: SocketAddr, stop: CancellationToken) {
        let start = Instant::now();
        let (route, hello, upstream, backend) = match self.route(&mut client, peer).await {
            Ok(r) => r,
            Err(failure) => {
                self.metrics.reject(failure.reason(), failure.service());
                debug!(reason = failure.reason(), "refused: {failure}");
                if let Some(alert) = failure.alert() {
                    let record = hello::alert_record(alert);
                    let _ = tokio::time::timeout(Duration::from_secs(1), client.write_all(&record))
                        .await;
                }
                return;
            }
        };
        let service = route.service.to_string();
        let _active = backend.state.open();
        self.metrics.active.inc();
        self.metrics
            .opened
            .get_or_create(&ServiceLabels {
                service: service.clone(),
            })
            .inc();
        let transfer = Transfer::default();
        let ended = tokio::select! {
            r = splice::copy_bidirectional(&client, &upstream, self.settings.idle_timeout, &transfer) => r,
            _ = stop.cancelled() => Err(std::io::Error::other("gateway terminating: deadline for in-flight connections passed")),
        };
        self.metrics.active.dec();
        let up = transfer.up.load(Ordering::Relaxed);
        let down = transfer.down.load(Ordering::Relaxed);
        let outcome = match &ended {
            Ok(Ended::Closed) => "closed",
            Ok(Ended::IdleTimeout) => "idle_timeout",
            Err(_) => "error",
        };
        for (direction, n) in [("client_to_server", up), ("server_to_client", down)] {
            self.metrics
                .bytes
                .get_or_create(&BytesLabels {
                    service: service.clone(),
                    direction,
                })
                .inc_by(n);
        }
        self.metrics
            .closed
            .get_or_create(&ClosedLabels {
                service: service.clone(),
                outcome,
            })
            .inc();
        info!(
            target: "access",
            sni = hello.sni.as_deref().unwrap_or(""),
            %service,
            subset = route.subset.as_deref().unwrap_or(""),
            endpoint = %backend.addr,
            pod = backend.pod.as_deref().unwrap_or(""),
            bytes_up = up,
            bytes_down = down,
            duration_ms = start.elapsed().as_millis() as u64,
            outcome,
            error = ended.as_ref().err().map(|e| e.to_string()).unwrap_or_default(),
            "connection"
        );
    }

    /// Everything before the splice. On success the peeked bytes are already replayed.
    async fn route(
        &self,
        client: &mut TcpStream,
        peer: SocketAddr,
    ) -> Result<(Route, ClientHello, TcpStream, Backend), Failure> {
        self.metrics.accepted.inc();
        let allow = &self.settings.allow_source;
        if !allow.is_empty() && !allow.iter().any(|c| c.contains(&peer.ip())) {
            return Err(Failure::SourceDenied(peer.ip()));
        }
        let _ = client.set_nodelay(true);
        let started = Instant::now();
        let (peeked, hello) = tokio::time::timeout(self.settings.peek_timeout, read_hello(client))
            .await
            .map_err(|_| Failure::PeekTimeout(self.settings.peek_timeout))??;
        self.metrics
            .peek_seconds
            .observe(started.elapsed().as_secs_f64());
        let span = tracing::Span::current();
        span.record("sni", hello.sni.as_deref().unwrap_or(""));
        // One cheap clone of the current table; never held across a reload.
        let table = self.routes.borrow().clone();
        let route = table.decide(&hello)?;
        span.record("service", field::display(&route.service));
        let (upstream, backend) = self.connect(&route, &peeked).await?;
        Ok((route, hello, upstream, backend))
    }

    /// Connect to a ready endpoint and replay the ClientHello; on failure try up to
    /// `connect_attempts - 1` others, so one dead pod costs the client nothing.
    async fn connect(&self, route: &Route, peeked: &[u8]) -> Result<(TcpStream, Backend), Failure> {
        let mut tried: Vec<SocketAddr> = Vec::new();
        let mut last = String::from("no endpoint to try");
        let labels = ServiceLabels {
            service: route.service.to_string(),
        };
        for _ in 0..self.settings.connect_attempts {
            let Some(backend) = balance::pick(&route.backends, &tried, balance::now_ms()) else {
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
                Err(e) => {
                    self.metrics.connect_failures.get_or_create(&labels).inc();
                    debug!(endpoint = %backend.addr, error = %e, "connect failed; trying another endpoint");
                    if let Some(time) = backend
                        .state
                        .record_failure(&self.settings.ejection, balance::now_ms())
                    {
                        self.metrics.ejections.get_or_create(&labels).inc();
                        warn!(endpoint = %backend.addr, service = %route.service, ?time,
                            "endpoint ejected after consecutive connect failures; is the pod healthy?");
                    }
                    last = e;
                }
            }
        }
        Err(Failure::ConnectFailed {
            service: route.service.clone(),
            tried: tried
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            last,
        })
    }

    async fn connect_one(&self, addr: SocketAddr, peeked: &[u8]) -> Result<TcpStream, String> {
        let timeout = self.settings.connect_timeout;
        let mut stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(format!("connect to {addr}: {e}")),
            Err(_) => return Err(format!("connect to {addr} timed out after {timeout:?}")),
        };
        let _ = stream.set_nodelay(true);
        stream
            .write_all(peeked)
            .await
            .map_err(|e| format!("replaying the ClientHello to {addr}: {e}"))?;
        Ok(stream)
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
