//! The xDS server: ADS (SotW and Delta) and the standalone EDS service, over tonic.
//!
//! ```text
//! MeshView --debounce--> Generation --feeds (one task per client network)--> NetworkSnapshot
//!                                       builds only what changed, encodes once     |
//!                                                          watch, shared by streams v
//!                                      stream task: request/snapshot -> stream.rs -> response
//! ```
//!
//! Each stream is one task: it reads requests and watches its network's snapshots, feeds both
//! to the sans-IO protocol state in `stream.rs` (which compares per-resource versions with what
//! it sent), and writes the answers. One loop serves both protocols (`run_stream`); they differ
//! only in the `Protocol` they implement. When the server drains, every stream ends, between
//! two pushes, with UNAVAILABLE, which clients retry elsewhere. Only EDS (`ClusterLoadAssignment`) is served; other types on
//! ADS are logged once and ignored.

pub mod debounce;
pub mod feeds;
pub mod snapshot;
pub mod stream;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::endpoint::v3::endpoint_discovery_service_server::{
    EndpointDiscoveryService, EndpointDiscoveryServiceServer,
};
use futures::Stream;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, debug, info, info_span, warn};

pub use debounce::Generation;
pub use feeds::{Feed, Feeds};
pub use snapshot::NetworkSnapshot;
pub use stream::{DeltaStream, EDS_TYPE, Event, Protocol, SotwStream};

use crate::eds::EdsOptions;
use crate::metrics::XdsMetrics;

#[derive(Debug, thiserror::Error)]
pub enum XdsError {
    #[error("cannot read {what} {path}: {source}")]
    ReadTls {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("xDS TLS configuration rejected: {0}; are the certificate chain and key a pair?")]
    Tls(#[from] tonic::transport::Error),
}

/// The xDS service, shared by every listener.
#[derive(Clone, Debug)]
pub struct XdsService {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    feeds: Arc<Feeds>,
    default_network: String,
    metrics: Arc<XdsMetrics>,
    next_id: AtomicU64,
    stop: CancellationToken,
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

impl XdsService {
    pub fn new(
        generations: watch::Receiver<Arc<Generation>>,
        options: EdsOptions,
        default_network: String,
        metrics: Arc<XdsMetrics>,
        stop: CancellationToken,
    ) -> XdsService {
        XdsService {
            inner: Arc::new(Inner {
                feeds: Feeds::new(generations, Arc::new(options), stop.clone()),
                default_network,
                metrics,
                next_id: AtomicU64::new(1),
                stop,
            }),
        }
    }

    /// Start one stream's task; its responses are the returned stream.
    fn stream<P: Protocol>(
        &self,
        requests: Streaming<P::Request>,
        peer: Option<SocketAddr>,
        api: &'static str,
    ) -> BoxStream<P::Response> {
        let (tx, rx) = mpsc::channel(P::QUEUE);
        let inner = self.inner.clone();
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let span = info_span!("xds", id, api, peer = ?peer);
        tokio::spawn(run_stream::<P>(inner, requests, tx).instrument(span));
        Box::pin(ReceiverStream::new(rx))
    }
}

/// Counts a connected stream for as long as it lives.
struct StreamGuard(Arc<XdsMetrics>, &'static str);

impl StreamGuard {
    fn new(m: &Arc<XdsMetrics>, kind: &'static str) -> StreamGuard {
        m.streams(kind).inc();
        StreamGuard(m.clone(), kind)
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.streams(self.1).dec();
    }
}

fn log_event(inner: &Inner, kind: &'static str, event: &Event, network: Option<&str>) {
    match event {
        Event::Nack(message) => {
            inner.metrics.nack(kind);
            warn!(%message, "client rejected (NACKed) a response; it keeps its previous version");
        }
        Event::OtherType(t) => debug!(type_url = %t, "type not served here; ignored"),
        Event::Stale => debug!("request with a stale nonce; ignored"),
        Event::Request => debug!(network = ?network, "subscription changed"),
        Event::Ack => debug!("ACK"),
    }
}

/// The current snapshot of the stream's network, subscribing to the network's feed on the first
/// EDS request (the network is fixed from then on). `None` when the server stops.
async fn snapshot_for(
    inner: &Inner,
    feed: &mut Option<Feed>,
    network: &mut Option<String>,
    node: Option<&Node>,
) -> Option<Arc<NetworkSnapshot>> {
    let rx = feed.get_or_insert_with(|| {
        let n = stream::node_network(node).unwrap_or_else(|| inner.default_network.clone());
        let rx = inner.feeds.subscribe(&n);
        *network = Some(n);
        rx
    });
    tokio::select! {
        _ = inner.stop.cancelled() => None,
        r = rx.wait_for(Option::is_some) => r.ok().and_then(|s| s.clone()),
    }
}

/// The next snapshot of the stream's feed; pending until the stream has one.
async fn next_snapshot(feed: &mut Option<Feed>) -> Option<Option<Arc<NetworkSnapshot>>> {
    match feed {
        Some(rx) => match rx.changed().await {
            Ok(()) => Some(rx.borrow_and_update().clone()),
            Err(_) => None,
        },
        None => std::future::pending().await,
    }
}

/// Ends every stream when the server drains: a status gRPC clients and Envoy retry, on another
/// replica once this one has left the Service's endpoints (as istiod does on shutdown).
pub fn draining_status() -> Status {
    Status::unavailable("this control plane replica is shutting down; reconnect to another")
}

/// One stream, either protocol: requests and new snapshots in, responses out. Stopping is
/// looked at only between two responses, so a push is never cut in the middle.
async fn run_stream<P: Protocol>(
    inner: Arc<Inner>,
    mut requests: Streaming<P::Request>,
    tx: mpsc::Sender<Result<P::Response, Status>>,
) {
    let kind = P::KIND;
    let _guard = StreamGuard::new(&inner.metrics, kind);
    let opts = inner.feeds.options().clone();
    let mut feed = None;
    let mut network = None;
    let mut state = P::default();
    let mut current: Option<Arc<NetworkSnapshot>> = None;
    let mut warned_types = std::collections::BTreeSet::new();
    info!(kind, "stream opened");
    loop {
        let response = tokio::select! {
            _ = inner.stop.cancelled() => break,
            _ = tx.closed() => break,
            req = requests.next() => {
                let req = match req {
                    None => break,
                    Some(Err(status)) => { debug!(%status, "stream ended by the client"); break }
                    Some(Ok(r)) => r,
                };
                let type_url = P::type_url(&req);
                if !stream::is_eds(type_url) {
                    if warned_types.insert(type_url.to_string()) {
                        info!(type_url, "this server serves only EDS; requests for this type are ignored");
                    }
                    log_event(&inner, kind, &Event::OtherType(type_url.to_string()), network.as_deref());
                    continue;
                }
                let Some(snap) = snapshot_for(&inner, &mut feed, &mut network, P::node(&req)).await else { continue };
                current = Some(snap.clone());
                let (event, response) = state.request(&req, &snap, &opts);
                log_event(&inner, kind, &event, network.as_deref());
                response.map(|r| (r, snap))
            }
            s = next_snapshot(&mut feed) => {
                let Some(s) = s else { break };
                current = s.clone().or(current);
                s.and_then(|snap| state.generation(&snap, &opts).map(|r| (r, snap)))
            }
            // The rest of a response cut in parts, built only once the previous part has left
            // the channel.
            permit = tx.reserve(), if state.has_more() => {
                let Ok(permit) = permit else { break };
                if let Some(snap) = current.clone()
                    && let Some(r) = state.more(&snap, &opts)
                {
                    inner.metrics.pushed(kind, snap.generation.published.elapsed());
                    permit.send(Ok(r));
                }
                None
            }
        };
        if let Some((response, snap)) = response {
            inner
                .metrics
                .pushed(kind, snap.generation.published.elapsed());
            if tx.send(Ok(response)).await.is_err() {
                break;
            }
        }
    }
    // The feed also ends when the server stops: whichever the loop saw first, a stream the
    // server ends gets the status clients retry elsewhere, never a clean end of stream.
    if inner.stop.is_cancelled() && !tx.is_closed() {
        // Bounded: a client that does not read is not waited for.
        let sent = tokio::time::timeout(Duration::from_secs(1), tx.send(Err(draining_status())));
        let _ = sent.await;
        info!(
            kind,
            "stream ended: the server is draining (UNAVAILABLE, clients reconnect)"
        );
    } else {
        info!(kind, "stream closed");
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for XdsService {
    type StreamAggregatedResourcesStream = BoxStream<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = BoxStream<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let peer = request.remote_addr();
        Ok(Response::new(self.stream::<SotwStream>(
            request.into_inner(),
            peer,
            "ads",
        )))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let peer = request.remote_addr();
        Ok(Response::new(self.stream::<DeltaStream>(
            request.into_inner(),
            peer,
            "ads-delta",
        )))
    }
}

#[tonic::async_trait]
impl EndpointDiscoveryService for XdsService {
    type StreamEndpointsStream = BoxStream<DiscoveryResponse>;
    type DeltaEndpointsStream = BoxStream<DeltaDiscoveryResponse>;

    async fn stream_endpoints(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamEndpointsStream>, Status> {
        let peer = request.remote_addr();
        Ok(Response::new(self.stream::<SotwStream>(
            request.into_inner(),
            peer,
            "eds",
        )))
    }

    async fn delta_endpoints(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaEndpointsStream>, Status> {
        let peer = request.remote_addr();
        Ok(Response::new(self.stream::<DeltaStream>(
            request.into_inner(),
            peer,
            "eds-delta",
        )))
    }

    async fn fetch_endpoints(
        &self,
        request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        let req = request.into_inner();
        if !stream::is_eds(&req.type_url) {
            return Err(Status::invalid_argument(format!(
                "this server serves only {EDS_TYPE}, not {}",
                req.type_url
            )));
        }
        // A one-off fetch of named resources computes just those, unless streams of its
        // network already keep a snapshot; a wildcard fetch needs the whole network's.
        let named = !req.resource_names.is_empty() && !req.resource_names.iter().any(|n| n == "*");
        let net = stream::node_network(req.node.as_ref())
            .unwrap_or_else(|| self.inner.default_network.clone());
        let snap = match self.inner.feeds.current(&net) {
            Some(snap) => snap,
            None if named => Arc::new(self.inner.feeds.on_demand(&net)),
            None => {
                let (mut feed, mut network) = (None, None);
                let Some(snap) =
                    snapshot_for(&self.inner, &mut feed, &mut network, req.node.as_ref()).await
                else {
                    return Err(Status::unavailable("the server is stopping"));
                };
                snap
            }
        };
        let mut state = SotwStream::default();
        match state.on_request(&req, &snap, self.inner.feeds.options()) {
            (_, Some(r)) => Ok(Response::new(r)),
            (Event::OtherType(t), None) => Err(Status::invalid_argument(format!(
                "this server serves only {EDS_TYPE}, not {t}"
            ))),
            (_, None) => Err(Status::internal("no response computed")),
        }
    }
}

/// Server TLS for `--xds-tls-listen`: our certificate chain and key, clients verified against
/// the shared root.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert_chain: std::path::PathBuf,
    pub key: std::path::PathBuf,
    pub root: std::path::PathBuf,
}

impl TlsFiles {
    pub fn server_config(&self) -> Result<ServerTlsConfig, XdsError> {
        let read = |what: &'static str, p: &std::path::Path| {
            std::fs::read(p).map_err(|source| XdsError::ReadTls {
                what,
                path: p.display().to_string(),
                source,
            })
        };
        let chain = read("certificate chain", &self.cert_chain)?;
        let key = read("private key", &self.key)?;
        let root = read("root certificate", &self.root)?;
        Ok(ServerTlsConfig::new()
            .identity(Identity::from_pem(chain, key))
            .client_ca_root(Certificate::from_pem(root)))
    }
}

/// Serve ADS and EDS on `listener` (TLS when `tls` is given) until `stop`.
pub async fn serve(
    service: XdsService,
    listener: TcpListener,
    tls: Option<ServerTlsConfig>,
    stop: CancellationToken,
) -> Result<(), XdsError> {
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    builder
        .add_service(AggregatedDiscoveryServiceServer::new(service.clone()))
        .add_service(EndpointDiscoveryServiceServer::new(service))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), stop.cancelled_owned())
        .await?;
    Ok(())
}
