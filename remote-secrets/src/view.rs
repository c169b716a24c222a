//! The multi-cluster view EDS reads, as plain data: every cluster's latest snapshot and state,
//! the mesh networks, the DNS cache and each network's resolved gateways. Written only by the
//! aggregator in [`crate::clusters`]; read by `eds`, `gateways`, `xds` and `admin`.
//!
//! Module order, one way only: `mesh_networks` <- `view` <- `gateways` <- `clusters` (the
//! writer); `view` <- `eds` (pure) <- `xds`.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use registry::Snapshot;
use serde::Serialize;

use crate::mesh_networks::MeshNetworks;

/// Each network's gateways, resolved.
pub type ResolvedGateways = Arc<BTreeMap<String, NetworkGateways>>;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct NetworkGateways {
    pub addresses: Vec<SocketAddr>,
    /// Why a configured gateway has no address (yet).
    pub problems: Vec<String>,
}

/// Where a cluster's objects come from, shown on `/config_dump`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase", tag = "kind", content = "from")]
pub enum ClusterSource {
    /// This control plane's own cluster.
    Local(String),
    /// `--remote-config-dir CLUSTER_ID=DIR`.
    RemoteDir(String),
    /// A kubeconfig Secret `namespace/name`.
    Secret(String),
}

/// One cluster as EDS sees it.
#[derive(Clone, Debug)]
pub struct ClusterEntry {
    pub id: String,
    pub source: ClusterSource,
    pub snapshot: Arc<Snapshot>,
    /// Its first full sync is done.
    pub synced: bool,
    /// Its source stopped answering; the snapshot is the last known one.
    pub stale: bool,
    /// The network given explicitly (the local cluster's `--network`); else from meshNetworks.
    pub network: Option<String>,
}

impl ClusterEntry {
    /// The cluster's network: explicit, else its meshNetworks `fromRegistry`.
    pub fn network<'a>(&'a self, networks: &'a MeshNetworks) -> Option<&'a str> {
        self.network
            .as_deref()
            .or_else(|| networks.network_of_cluster(&self.id))
    }
}

/// Everything EDS needs, immutable; a new one is published on every change.
#[derive(Clone, Debug, Default)]
pub struct MeshView {
    pub version: u64,
    pub local_cluster: String,
    pub clusters: BTreeMap<String, ClusterEntry>,
    pub networks: Arc<MeshNetworks>,
    /// Host name -> addresses, from the DNS resolver task (gateway host names).
    pub dns: Arc<BTreeMap<String, Vec<IpAddr>>>,
    /// Each network's gateways, resolved against `clusters` and `dns` when the view was built.
    pub gateways: ResolvedGateways,
}

/// The summary of one cluster on `/config_dump`.
#[derive(Clone, Debug, Serialize)]
pub struct ClusterSummary {
    pub id: String,
    pub source: ClusterSource,
    pub network: Option<String>,
    pub synced: bool,
    pub stale: bool,
    pub services: usize,
    pub endpoints: usize,
    pub ready_endpoints: usize,
    pub snapshot_version: u64,
    pub errors: Vec<String>,
}

impl MeshView {
    pub fn summaries(&self) -> Vec<ClusterSummary> {
        self.clusters
            .values()
            .map(|c| {
                let eps = c
                    .snapshot
                    .services
                    .values()
                    .flat_map(|s| s.endpoint_sets.iter().flat_map(|e| e.endpoints.iter()));
                let (total, ready) =
                    eps.fold((0, 0), |(t, r), e| (t + 1, r + usize::from(e.ready)));
                ClusterSummary {
                    id: c.id.clone(),
                    source: c.source.clone(),
                    network: c.network(&self.networks).map(str::to_string),
                    synced: c.synced,
                    stale: c.stale,
                    services: c.snapshot.services.len(),
                    endpoints: total,
                    ready_endpoints: ready,
                    snapshot_version: c.snapshot.status.version,
                    errors: c.snapshot.status.errors.clone(),
                }
            })
            .collect()
    }
}
