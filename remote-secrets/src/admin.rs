//! `/config_dump` (config, every cluster's state, secrets, mesh networks, gateways) and
//! `/debug/explain?host=...&network=...` (the EDS view of one name from one network).

use std::sync::Arc;

use axum::Router;
use axum::extract::Query;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use process_shell::admin::json_response;
use registry::naming::ClusterName;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::clusters::Clusters;
use crate::config::ServeConfig;
use crate::eds::{self, EdsOptions};
use crate::mesh_networks::MeshNetworks;
use crate::secrets::SecretsStatus;
use crate::view::ClusterSummary;
use crate::view::NetworkGateways;

#[derive(Clone)]
pub struct AdminState {
    pub config: Arc<ServeConfig>,
    pub clusters: Clusters,
    pub secrets: watch::Receiver<SecretsStatus>,
    pub options: Arc<EdsOptions>,
}

#[derive(Serialize)]
struct ConfigDump<'a> {
    config: &'a ServeConfig,
    view_version: u64,
    clusters: Vec<ClusterSummary>,
    secrets: SecretsStatus,
    mesh_networks: &'a MeshNetworks,
    gateways: &'a std::collections::BTreeMap<String, NetworkGateways>,
}

#[derive(Deserialize)]
struct ExplainQuery {
    /// A host (`httpbin.bar.global`) or a full cluster name (`outbound|8000||...`).
    host: String,
    /// The client's network (default: the default network).
    network: Option<String>,
    /// With a bare host: the port (default: every port of the service).
    port: Option<u16>,
    subset: Option<String>,
}

pub fn router(state: AdminState) -> Router {
    let dump = state.clone();
    Router::new()
        .route(
            "/config_dump",
            get(move || {
                let s = dump.clone();
                async move {
                    let view = s.clusters.current();
                    json_response(&ConfigDump {
                        config: &s.config,
                        view_version: view.version,
                        clusters: view.summaries(),
                        secrets: s.secrets.borrow().clone(),
                        mesh_networks: &view.networks,
                        gateways: &view.gateways,
                    })
                }
            }),
        )
        .route(
            "/debug/explain",
            get(move |Query(q): Query<ExplainQuery>| {
                let s = state.clone();
                async move { explain(&s, q) }
            }),
        )
}

fn explain(s: &AdminState, q: ExplainQuery) -> axum::response::Response {
    let view = s.clusters.current();
    let network = q
        .network
        .unwrap_or_else(|| s.config.default_network().to_string());
    let names: Vec<String> = if q.host.starts_with("outbound|") {
        vec![q.host.clone()]
    } else {
        let Some(key) = eds::service_of_host(&q.host, &s.options) else {
            return (
                StatusCode::BAD_REQUEST,
                format!(
                    "host {} is neither <name>.<ns>.{} nor <name>.<ns>.svc.{}\n",
                    q.host, s.options.global_suffix, s.options.domain_suffix
                ),
            )
                .into_response();
        };
        let mut ports: Vec<u16> = view
            .clusters
            .values()
            .filter_map(|c| c.snapshot.services.get(&key))
            .flat_map(|svc| svc.ports.iter().map(|p| p.port))
            .collect();
        ports.sort_unstable();
        ports.dedup();
        if let Some(p) = q.port {
            ports = vec![p];
        }
        ports
            .into_iter()
            .map(|port| {
                ClusterName {
                    port,
                    subset: q.subset.clone(),
                    host: q.host.clone(),
                }
                .to_string()
            })
            .collect()
    };
    let explained: Vec<eds::Explain> = names
        .iter()
        .map(|n| eds::assignment(n, &view, &network, &s.options).1)
        .collect();
    json_response(&explained)
}
