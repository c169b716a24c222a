//! The three HTTP servers every binary runs, as Istio's do: 15021 `GET /healthz/ready`, 15020
//! `GET /metrics`, and 15000 (localhost) for the binary's own debug routes (`/config_dump`,
//! `/debug/explain`), which the binary passes in as a [`Router`].

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::flags::ListenFlags;
use crate::readiness::Readiness;

/// The status, metrics and admin listeners, bound (so a taken port fails start-up before any
/// source is started) but not yet served.
pub struct Servers {
    status: TcpListener,
    metrics: TcpListener,
    admin: TcpListener,
}

/// Where the three listen, ports resolved.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Addresses {
    pub status: SocketAddr,
    pub metrics: SocketAddr,
    pub admin: SocketAddr,
}

impl Servers {
    pub async fn bind(flags: &ListenFlags) -> std::io::Result<Servers> {
        Ok(Servers {
            status: bind(flags.status_listen, "readiness (--status-listen)").await?,
            metrics: bind(flags.metrics_listen, "metrics (--metrics-listen)").await?,
            admin: bind(flags.admin_listen, "admin (--admin-listen)").await?,
        })
    }

    pub fn addresses(&self) -> std::io::Result<Addresses> {
        Ok(Addresses {
            status: self.status.local_addr()?,
            metrics: self.metrics.local_addr()?,
            admin: self.admin.local_addr()?,
        })
    }

    /// Serve until `stop`: readiness, the metrics of `registry`, and the binary's admin routes.
    pub fn serve(
        self,
        readiness: Readiness,
        registry: Registry,
        admin: Router,
        stop: &CancellationToken,
    ) -> Vec<JoinHandle<()>> {
        vec![
            spawn_http(self.status, status_router(readiness), stop.clone()),
            spawn_http(
                self.metrics,
                metrics_router(Arc::new(registry)),
                stop.clone(),
            ),
            spawn_http(self.admin, admin, stop.clone()),
        ]
    }
}

pub fn status_router(ready: Readiness) -> Router {
    Router::new().route(
        "/healthz/ready",
        get(move || {
            let ready = ready.is_ready();
            async move {
                if ready {
                    (StatusCode::OK, "ready\n")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                }
            }
        }),
    )
}

pub fn metrics_router(registry: Arc<Registry>) -> Router {
    Router::new().route(
        "/metrics",
        get(move || {
            let registry = registry.clone();
            async move {
                let mut body = String::new();
                match prometheus_client::encoding::text::encode(&mut body, &registry) {
                    Ok(()) => (
                        StatusCode::OK,
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        body,
                    )
                        .into_response(),
                    Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
                }
            }
        }),
    )
}

/// A JSON response with a pretty body, for humans reading `/config_dump` with curl.
pub fn json_response<T: serde::Serialize>(value: &T) -> axum::response::Response {
    match serde_json::to_string_pretty(value) {
        Ok(body) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            body + "\n",
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// Bind a TCP listener, saying which flag to change when the address is taken.
pub async fn bind(addr: SocketAddr, what: &str) -> Result<TcpListener, std::io::Error> {
    TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot listen on {addr} for {what}: {e}; is another process using it?"),
        )
    })
}

/// Serve `router` on `listener` until `stop` is cancelled.
pub fn spawn_http(
    listener: TcpListener,
    router: Router,
    stop: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let addr = listener.local_addr().ok();
        if let Err(e) = axum::serve(listener, router)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await
        {
            tracing::warn!(?addr, error = %e, "admin HTTP server stopped");
        }
    })
}
