//! Split-horizon EDS, pure: from (every cluster's ready endpoints, mesh networks, the client's
//! network) to Envoy `ClusterLoadAssignment`s.
//!
//! 1. [`gather`]: the ready endpoints of `outbound|<port>|<subset>|<host>` in every cluster
//!    (host `<name>.<ns>.global` or `<name>.<ns>.svc.<domain>`; subset by DestinationRule
//!    labels), each with its network: the pod's `topology.istio.io/network` label, else the
//!    meshNetworks `fromCidr` holding its address, else its cluster's network.
//! 2. [`split_horizon`]: per locality, endpoints in the client's network are kept; each other
//!    network's endpoints are replaced by its gateways, weighted by Istio's formula: with `S` the
//!    least common multiple of the gateway counts of the networks involved, a local endpoint
//!    weighs `S` and each gateway of a network with `n` endpoints and `g` gateways `n*S/g`.
//!    A network without gateways contributes nothing and is reported; a network with no ready
//!    endpoint gets no gateway entry.
//! 3. [`to_cla`]: the protobuf, gateways carrying `tlsMode: istio` transport-socket metadata.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::endpoint::v3 as ep;
use envoy_types::pb::google::protobuf::{Struct, UInt32Value, Value, value};
use registry::ServiceName;
use registry::admission::{ExportPolicy, ReadyEndpoint, admit, ready_endpoints};
use registry::naming::{ClusterName, parse_global_host, parse_local_fqdn};
use registry::snapshot::{Endpoint, Locality, ServiceInfo};
use serde::Serialize;

use crate::mesh_networks::MeshNetworks;
use crate::view::{MeshView, NetworkGateways};

/// The pod label that puts an endpoint in a network (Istio's).
pub const NETWORK_LABEL: &str = "topology.istio.io/network";
/// The pod label saying whether a workload speaks Istio mTLS.
pub const TLS_MODE_LABEL: &str = "security.istio.io/tlsMode";
/// The metadata filter Envoy's transport-socket matcher reads.
pub const TRANSPORT_SOCKET_MATCH: &str = "envoy.transport_socket_match";

#[derive(Clone, Debug, Serialize)]
pub struct EdsOptions {
    pub domain_suffix: String,
    pub global_suffix: String,
    /// The remote gateways' `--export-policy`: another network's endpoints count only for
    /// services their gateway admits (it would refuse the others).
    pub export_policy: ExportPolicy,
}

impl Default for EdsOptions {
    fn default() -> Self {
        EdsOptions {
            domain_suffix: "cluster.local".into(),
            global_suffix: "global".into(),
            export_policy: ExportPolicy::Exported,
        }
    }
}

/// One ready endpoint of a cluster name, with the network it lives in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NetEndpoint {
    pub address: SocketAddr,
    pub network: Option<String>,
    pub cluster: String,
    pub locality: Locality,
    /// The pod's `security.istio.io/tlsMode`.
    pub tls_mode: Option<String>,
}

/// The ready endpoints of a cluster name across all clusters, and notes on what was left out.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Gathered {
    pub service: Option<ServiceName>,
    pub endpoints: Vec<NetEndpoint>,
    pub notes: Vec<String>,
}

/// The service a cluster name's host means.
pub fn service_of_host(host: &str, opts: &EdsOptions) -> Option<ServiceName> {
    parse_global_host(host, &opts.global_suffix)
        .or_else(|| parse_local_fqdn(host, &opts.domain_suffix))
        .map(|(ns, name)| ServiceName::new(ns, name))
}

/// Collect the ready endpoints behind a cluster name from every cluster.
pub fn gather(
    name: &ClusterName,
    view: &MeshView,
    client_network: &str,
    opts: &EdsOptions,
) -> Gathered {
    let mut out = Gathered::default();
    let Some(key) = service_of_host(&name.host, opts) else {
        out.notes.push(format!(
            "host {} is neither <name>.<ns>.{} nor <name>.<ns>.svc.{}",
            name.host, opts.global_suffix, opts.domain_suffix
        ));
        return out;
    };
    out.service = Some(key.clone());
    // Subset labels: the local cluster's DestinationRule first, then any other cluster's.
    let subset = match &name.subset {
        None => None,
        Some(s) => {
            let local = view.clusters.get(&view.local_cluster).into_iter();
            let found = local
                .chain(view.clusters.values())
                .find_map(|c| c.snapshot.services.get(&key)?.subsets.get(s));
            match found {
                Some(labels) => Some(labels.clone()),
                None => {
                    out.notes.push(format!(
                        "no DestinationRule defines subset {s} of {key} in any cluster"
                    ));
                    return out;
                }
            }
        }
    };
    for c in view.clusters.values() {
        let Some(svc) = c.snapshot.services.get(&key) else {
            continue;
        };
        let Some(port) = svc.port(name.port) else {
            out.notes.push(format!(
                "cluster {}: service {key} has no port {}",
                c.id, name.port
            ));
            continue;
        };
        let cluster_network = c.network(&view.networks);
        let network_of = |e| endpoint_network(e, &view.networks, cluster_network);
        // Endpoints in the client's network are reached directly: the subset by the labels
        // found above. Every other network's are reached through that cluster's gateway, which
        // admits by its own rules (registry::admission): only what it would route to counts.
        let direct = ready_endpoints(svc, port, subset.as_ref());
        let through_gateway = admit(svc, opts.export_policy, name.port, name.subset.as_deref());
        let mut push = |ready: &ReadyEndpoint<'_>, network: Option<&str>| {
            out.endpoints.push(NetEndpoint {
                address: ready.addr,
                network: network.map(str::to_string),
                cluster: c.id.clone(),
                locality: ready.endpoint.locality.clone(),
                tls_mode: ready.endpoint.labels.get(TLS_MODE_LABEL).cloned(),
            })
        };
        for ready in &direct {
            let network = network_of(ready.endpoint);
            if network == Some(client_network) {
                push(ready, network);
            }
        }
        match &through_gateway {
            Ok(admitted) => {
                for ready in &admitted.endpoints {
                    let network = network_of(ready.endpoint);
                    if network != Some(client_network) {
                        push(ready, network);
                    }
                }
            }
            Err(refusal) => {
                let unusable = direct
                    .iter()
                    .filter(|e| network_of(e.endpoint) != Some(client_network))
                    .count();
                if unusable > 0 {
                    out.notes.push(format!(
                        "cluster {}: {unusable} endpoint(s) not used: its gateway would refuse {key}: {refusal}",
                        c.id
                    ));
                }
            }
        }
    }
    out
}

/// An endpoint's network: the pod's `topology.istio.io/network` label, else the meshNetworks
/// `fromCidr` holding its address, else its cluster's network.
fn endpoint_network<'a>(
    e: &'a Endpoint,
    networks: &'a MeshNetworks,
    cluster_network: Option<&'a str>,
) -> Option<&'a str> {
    e.labels
        .get(NETWORK_LABEL)
        .map(String::as_str)
        .or_else(|| networks.network_of_address(&e.address))
        .or(cluster_network)
}

/// An entry of a load assignment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Weighted {
    pub address: SocketAddr,
    pub weight: u32,
    pub via: Via,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Via {
    /// An endpoint in the client's network.
    Direct {
        cluster: String,
        tls_mode: Option<String>,
    },
    /// A gateway standing for `endpoints` ready endpoints of `network`.
    Gateway { network: String, endpoints: usize },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LocalityGroup {
    pub locality: Locality,
    pub endpoints: Vec<Weighted>,
}

impl LocalityGroup {
    pub fn weight(&self) -> u32 {
        self.endpoints
            .iter()
            .fold(0u32, |w, e| w.saturating_add(e.weight))
    }
}

/// The result of the split, with what could not be reached and why.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Split {
    pub client_network: String,
    pub localities: Vec<LocalityGroup>,
    /// Ready endpoints per network that has no gateway: unreachable from the client.
    pub unreachable: BTreeMap<String, usize>,
    /// Ready endpoints whose network is unknown (their cluster is in no network).
    pub no_network: usize,
    /// The factor applied so every weight is an integer.
    pub scale: u32,
}

/// Split endpoints by network, as seen from `client_network`.
pub fn split_horizon(
    endpoints: &[NetEndpoint],
    gateways: &BTreeMap<String, Vec<SocketAddr>>,
    client_network: &str,
) -> Split {
    let mut split = Split {
        client_network: client_network.to_string(),
        ..Default::default()
    };
    // Remote networks that are involved: have ready endpoints (here) and gateways.
    let mut scale: u64 = 1;
    for e in endpoints {
        match e.network.as_deref() {
            None => split.no_network += 1,
            Some(n) if n == client_network => {}
            Some(n) => match gateways.get(n).filter(|g| !g.is_empty()) {
                Some(g) => scale = lcm(scale, g.len() as u64).min(u64::from(u32::MAX)),
                None => *split.unreachable.entry(n.to_string()).or_default() += 1,
            },
        }
    }
    split.scale = u32::try_from(scale).unwrap_or(u32::MAX);
    // Per locality: direct endpoints, and a count per remote network.
    let mut by_locality: BTreeMap<&Locality, (Vec<&NetEndpoint>, BTreeMap<&str, usize>)> =
        BTreeMap::new();
    for e in endpoints {
        let Some(n) = e.network.as_deref() else {
            continue;
        };
        let group = by_locality.entry(&e.locality).or_default();
        if n == client_network {
            group.0.push(e);
        } else if gateways.get(n).is_some_and(|g| !g.is_empty()) {
            *group.1.entry(n).or_default() += 1;
        }
    }
    for (locality, (mut direct, remote)) in by_locality {
        direct.sort_by_key(|e| e.address);
        let mut entries: Vec<Weighted> = direct
            .into_iter()
            .map(|e| Weighted {
                address: e.address,
                weight: split.scale,
                via: Via::Direct {
                    cluster: e.cluster.clone(),
                    tls_mode: e.tls_mode.clone(),
                },
            })
            .collect();
        for (network, count) in remote {
            let gws = &gateways[network];
            let weight = (count as u64 * scale / gws.len() as u64).clamp(1, u64::from(u32::MAX));
            for gw in gws {
                // Two networks behind one gateway address: one entry carrying both weights.
                if let Some(existing) = entries.iter_mut().find(|w| w.address == *gw) {
                    existing.weight = existing.weight.saturating_add(weight as u32);
                    continue;
                }
                entries.push(Weighted {
                    address: *gw,
                    weight: weight as u32,
                    via: Via::Gateway {
                        network: network.to_string(),
                        endpoints: count,
                    },
                });
            }
        }
        if !entries.is_empty() {
            split.localities.push(LocalityGroup {
                locality: locality.clone(),
                endpoints: entries,
            });
        }
    }
    split
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

fn lcm(a: u64, b: u64) -> u64 {
    if a == 0 || b == 0 {
        return a.max(b);
    }
    a / gcd(a, b) * b
}

/// The Envoy resource for a split.
pub fn to_cla(cluster_name: &str, split: &Split) -> ep::ClusterLoadAssignment {
    ep::ClusterLoadAssignment {
        cluster_name: cluster_name.to_string(),
        endpoints: split
            .localities
            .iter()
            .map(|g| ep::LocalityLbEndpoints {
                locality: Some(core::Locality {
                    region: g.locality.region.clone(),
                    zone: g.locality.zone.clone(),
                    sub_zone: g.locality.subzone.clone(),
                }),
                load_balancing_weight: Some(UInt32Value { value: g.weight() }),
                lb_endpoints: g.endpoints.iter().map(lb_endpoint).collect(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

fn lb_endpoint(w: &Weighted) -> ep::LbEndpoint {
    let tls_mode = match &w.via {
        Via::Gateway { .. } => Some("istio"),
        Via::Direct { tls_mode, .. } => tls_mode.as_deref(),
    };
    let metadata = tls_mode.map(|mode| {
        let mut fields = std::collections::HashMap::new();
        fields.insert(
            "tlsMode".to_string(),
            Value {
                kind: Some(value::Kind::StringValue(mode.to_string())),
            },
        );
        let mut filter_metadata = std::collections::HashMap::new();
        filter_metadata.insert(TRANSPORT_SOCKET_MATCH.to_string(), Struct { fields });
        core::Metadata {
            filter_metadata,
            ..Default::default()
        }
    });
    ep::LbEndpoint {
        host_identifier: Some(ep::lb_endpoint::HostIdentifier::Endpoint(ep::Endpoint {
            address: Some(socket_address(w.address)),
            ..Default::default()
        })),
        health_status: core::HealthStatus::Healthy as i32,
        metadata,
        load_balancing_weight: Some(UInt32Value { value: w.weight }),
    }
}

pub fn socket_address(a: SocketAddr) -> core::Address {
    core::Address {
        address: Some(core::address::Address::SocketAddress(core::SocketAddress {
            address: a.ip().to_string(),
            port_specifier: Some(core::socket_address::PortSpecifier::PortValue(u32::from(
                a.port(),
            ))),
            ..Default::default()
        })),
    }
}

/// Everything `/debug/explain` shows for one cluster name and client network.
#[derive(Clone, Debug, Serialize)]
pub struct Explain {
    pub cluster_name: String,
    pub gathered: Gathered,
    pub gateways: BTreeMap<String, NetworkGateways>,
    pub split: Split,
}

/// Each network's resolved gateway addresses, as [`split_horizon`] takes them.
pub fn gateway_addresses(view: &MeshView) -> BTreeMap<String, Vec<SocketAddr>> {
    view.gateways
        .iter()
        .map(|(n, g)| (n.clone(), g.addresses.clone()))
        .collect()
}

/// Gather and split one resource name: the decision both xDS and `/debug/explain` show.
fn decide(
    resource: &str,
    view: &MeshView,
    client_network: &str,
    opts: &EdsOptions,
    gateways: &BTreeMap<String, Vec<SocketAddr>>,
) -> (Gathered, Split) {
    match ClusterName::parse(resource) {
        Some(name) => {
            let gathered = gather(&name, view, client_network, opts);
            let split = split_horizon(&gathered.endpoints, gateways, client_network);
            (gathered, split)
        }
        None => (
            Gathered {
                notes: vec![format!(
                    "{resource} is not an Istio cluster name outbound|<port>|<subset>|<host>"
                )],
                ..Default::default()
            },
            Split {
                client_network: client_network.to_string(),
                scale: 1,
                ..Default::default()
            },
        ),
    }
}

/// The load assignment alone, what xDS serves; `gateways` is [`gateway_addresses`] of `view`,
/// computed once per view by the caller. The same decision as [`assignment`].
pub fn load_assignment(
    resource: &str,
    view: &MeshView,
    client_network: &str,
    opts: &EdsOptions,
    gateways: &BTreeMap<String, Vec<SocketAddr>>,
) -> ep::ClusterLoadAssignment {
    let (_, split) = decide(resource, view, client_network, opts, gateways);
    to_cla(resource, &split)
}

/// The load assignment for a resource name as a client in `client_network` should see it.
/// An unknown or unparseable name gets an empty assignment (so the client stops waiting).
pub fn assignment(
    resource: &str,
    view: &MeshView,
    client_network: &str,
    opts: &EdsOptions,
) -> (ep::ClusterLoadAssignment, Explain) {
    let gateways = gateway_addresses(view);
    let (gathered, split) = decide(resource, view, client_network, opts, &gateways);
    let cla = to_cla(resource, &split);
    let explain = Explain {
        cluster_name: resource.to_string(),
        gathered,
        gateways: (*view.gateways).clone(),
        split,
    };
    (cla, explain)
}

/// Every cluster name the mesh knows (for wildcard subscriptions): each service port, with and
/// without each subset, under both the `.global` and the cluster-local host.
pub fn all_cluster_names(view: &MeshView, opts: &EdsOptions) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for c in view.clusters.values() {
        for (key, svc) in &c.snapshot.services {
            add_names(key, svc, opts, &mut out);
        }
    }
    out
}

/// The cluster names of one service, over every cluster that has it (a subset of
/// [`all_cluster_names`]).
pub fn service_cluster_names(
    key: &ServiceName,
    view: &MeshView,
    opts: &EdsOptions,
) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for c in view.clusters.values() {
        if let Some(svc) = c.snapshot.services.get(key) {
            add_names(key, svc, opts, &mut out);
        }
    }
    out
}

fn add_names(key: &ServiceName, svc: &ServiceInfo, opts: &EdsOptions, out: &mut BTreeSet<String>) {
    let hosts = [
        key.global_host(&opts.global_suffix),
        key.local_fqdn(&opts.domain_suffix),
    ];
    for port in &svc.ports {
        for host in &hosts {
            let subsets = std::iter::once(None).chain(svc.subsets.keys().map(Some));
            for subset in subsets {
                out.insert(
                    ClusterName {
                        port: port.port,
                        subset: subset.cloned(),
                        host: host.clone(),
                    }
                    .to_string(),
                );
            }
        }
    }
}

#[cfg(test)]
#[path = "eds/tests.rs"]
mod tests;
