//! The gateway's debug routes on the admin listener: `/config_dump` (config, source status,
//! route table with endpoint health) and `/debug/explain?sni=...[&alpn=...][&source=IP]` (the
//! decision the gateway would take for a connection from that source with that name, and why).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::Router;
use axum::extract::Query;
use axum::routing::get;
use process_shell::admin::json_response;
use registry::{ServiceName, SnapshotHandle};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::alert::AlertDescription;
use crate::balance::Backend;
use crate::config::Config;
use crate::hello::ClientHello;
use crate::route::{HostRoutes, RouteTable};

#[derive(Clone)]
pub struct AdminState {
    pub config: Arc<Config>,
    pub snapshot: SnapshotHandle,
    pub routes: watch::Receiver<Arc<RouteTable>>,
}

pub fn router(state: AdminState) -> Router {
    let dump = state.clone();
    Router::new()
        .route(
            "/config_dump",
            get(move || {
                let s = dump.clone();
                async move { json_response(&config_dump(&s)) }
            }),
        )
        .route(
            "/debug/explain",
            get(move |Query(q): Query<ExplainQuery>| {
                let table = state.routes.borrow().clone();
                async move { json_response(&explain(&table, &q)) }
            }),
        )
}

#[derive(Serialize)]
struct ConfigDump<'a> {
    config: &'a Config,
    source: registry::snapshot::SourceStatus,
    /// Accepted host -> service, ports, subsets and endpoints (with load and ejection state).
    routes: BTreeMap<&'a str, HostView<'a>>,
}

/// A host's routes as `/config_dump` shows them.
#[derive(Serialize)]
struct HostView<'a> {
    service: &'a ServiceName,
    exported: bool,
    ports: Vec<PortView<'a>>,
    /// Subset names defined for the service (even those with no ready endpoint).
    subsets: &'a [String],
}

#[derive(Serialize)]
struct PortView<'a> {
    port: u16,
    name: &'a str,
    all: Vec<BackendView<'a>>,
    subsets: BTreeMap<&'a str, Vec<BackendView<'a>>>,
}

#[derive(Serialize)]
struct BackendView<'a> {
    addr: SocketAddr,
    pod: Option<&'a str>,
    active: u32,
    ejected: bool,
    consecutive_failures: u32,
}

impl<'a> HostView<'a> {
    fn new(routes: &'a HostRoutes, now_ms: u64) -> HostView<'a> {
        let backends = |b: &'a [Backend]| -> Vec<BackendView<'a>> {
            b.iter()
                .map(|b| BackendView {
                    addr: b.addr,
                    pod: b.pod.as_deref(),
                    active: b.state.active(),
                    ejected: b.state.is_ejected(now_ms),
                    consecutive_failures: b.state.consecutive_failures(),
                })
                .collect()
        };
        HostView {
            service: &routes.service,
            exported: routes.exported,
            ports: routes
                .ports
                .iter()
                .map(|p| PortView {
                    port: p.port,
                    name: &p.name,
                    all: backends(&p.all),
                    subsets: p
                        .subsets
                        .iter()
                        .map(|(name, b)| (&**name, backends(b)))
                        .collect(),
                })
                .collect(),
            subsets: &routes.subsets,
        }
    }
}

fn config_dump(s: &AdminState) -> serde_json::Value {
    let table = s.routes.borrow().clone();
    let snapshot = s.snapshot.current();
    let now_ms = crate::clock::now_ms();
    let dump = ConfigDump {
        config: &s.config,
        source: snapshot.status.clone(),
        routes: table
            .hosts()
            .map(|(h, r)| (h.as_str(), HostView::new(r, now_ms)))
            .collect(),
    };
    serde_json::to_value(&dump).unwrap_or_default()
}

#[derive(Debug, Deserialize)]
pub struct ExplainQuery {
    pub sni: Option<String>,
    /// The client's address, to check --allow-source (default: not checked).
    #[serde(default)]
    pub source: Option<IpAddr>,
    /// Comma-separated ALPN protocols the client would offer (default: none).
    #[serde(default)]
    pub alpn: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Explanation {
    pub sni: Option<String>,
    pub decision: &'static str,
    /// Metric label of the rejection, when refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    /// What an operator should know or check.
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alert: Option<AlertDescription>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subset: Option<String>,
    /// Candidate endpoints: the gateway picks the less loaded of two, skipping ejected ones.
    pub endpoints: Vec<String>,
}

pub fn explain(table: &RouteTable, q: &ExplainQuery) -> Explanation {
    let hello = ClientHello {
        sni: q.sni.as_ref().map(|s| s.to_ascii_lowercase()),
        alpn: q
            .alpn
            .as_deref()
            .map(|a| a.split(',').map(str::to_string).collect())
            .unwrap_or_default(),
    };
    let decision = match q.source {
        Some(source) => table
            .admit_source(source)
            .and_then(|()| table.decide(&hello)),
        None => table.decide(&hello),
    };
    match decision {
        Ok(route) => Explanation {
            sni: hello.sni,
            decision: "route",
            reason: None,
            message: format!(
                "routes to {} port {}{} ({} ready endpoint(s))",
                route.service,
                route.port,
                route
                    .subset
                    .as_deref()
                    .map(|s| format!(" subset {s}"))
                    .unwrap_or_default(),
                route.backends.len()
            ),
            alert: None,
            service: Some(route.service.to_string()),
            port: Some(route.port),
            subset: route.subset.as_deref().map(str::to_string),
            endpoints: route
                .backends
                .iter()
                .map(|b| match &b.pod {
                    Some(p) => format!("{} ({p})", b.addr),
                    None => b.addr.to_string(),
                })
                .collect(),
        },
        Err(reject) => Explanation {
            sni: hello.sni,
            decision: "reject",
            reason: Some(reject.reason()),
            message: reject.to_string(),
            alert: reject.alert(),
            service: reject.service().map(|s| s.to_string()),
            port: None,
            subset: None,
            endpoints: Vec::new(),
        },
    }
}
