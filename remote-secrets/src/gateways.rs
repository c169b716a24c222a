//! Where each network's gateways are: meshNetworks `gateways` entries resolved against the
//! clusters' LoadBalancer status (`registryServiceName`) and the DNS cache (host names). Pure:
//! the aggregator calls [`resolve`] for every view it publishes, and the DNS task asks
//! [`hostnames_to_resolve`] what to look up.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use registry::ServiceName;
use registry::naming::parse_local_fqdn;

use crate::mesh_networks::GatewayTarget;
use crate::view::{MeshView, NetworkGateways, ResolvedGateways};

/// Resolve every network's gateways against the clusters' LoadBalancer status and the DNS
/// cache.
pub fn resolve(view: &MeshView, domain_suffix: &str) -> ResolvedGateways {
    let mut out = BTreeMap::new();
    for (name, network) in &view.networks.networks {
        let mut gws = NetworkGateways::default();
        for gw in &network.gateways {
            let mut push = |ip: IpAddr| {
                let a = SocketAddr::new(ip, gw.port);
                if !gws.addresses.contains(&a) {
                    gws.addresses.push(a);
                }
            };
            match &gw.target {
                GatewayTarget::Ip(ip) => push(*ip),
                GatewayTarget::Hostname(h) => match view.dns.get(h) {
                    Some(ips) if !ips.is_empty() => ips.iter().copied().for_each(&mut push),
                    _ => gws
                        .problems
                        .push(format!("gateway host {h} has no DNS answer (yet)")),
                },
                GatewayTarget::RegistryService(fqdn) => {
                    let Some((ns, svc)) = parse_local_fqdn(fqdn, domain_suffix) else {
                        gws.problems.push(format!(
                            "registryServiceName {fqdn} is not <name>.<ns>.svc.{}",
                            domain_suffix
                        ));
                        continue;
                    };
                    let key = ServiceName::new(ns, svc);
                    let owners: Vec<_> = view
                        .clusters
                        .values()
                        .filter(|c| c.network(&view.networks) == Some(name.as_str()))
                        .collect();
                    let mut found = false;
                    for c in &owners {
                        let Some(s) = c.snapshot.services.get(&key) else {
                            continue;
                        };
                        found = true;
                        if s.load_balancer.is_empty() {
                            gws.problems.push(format!(
                                "service {key} in cluster {} has no LoadBalancer ingress yet",
                                c.id
                            ));
                        }
                        for lb in &s.load_balancer {
                            match lb.parse::<IpAddr>() {
                                Ok(ip) => push(ip),
                                Err(_) => match view.dns.get(lb) {
                                    Some(ips) if !ips.is_empty() => {
                                        ips.iter().copied().for_each(&mut push)
                                    }
                                    _ => gws.problems.push(format!(
                                        "LoadBalancer host {lb} of {key} in cluster {} has no DNS answer (yet)",
                                        c.id
                                    )),
                                },
                            }
                        }
                    }
                    if !found {
                        let ids: Vec<_> = owners.iter().map(|c| c.id.as_str()).collect();
                        gws.problems.push(format!(
                            "gateway service {key} not found in the clusters of network {name} ({})",
                            ids.join(", ")
                        ));
                    }
                }
            }
        }
        out.insert(name.clone(), gws);
    }
    Arc::new(out)
}

/// Host names the DNS task should resolve: gateway addresses and LoadBalancer host names.
pub fn hostnames_to_resolve(view: &MeshView, domain_suffix: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (name, network) in &view.networks.networks {
        for gw in &network.gateways {
            match &gw.target {
                GatewayTarget::Ip(_) => {}
                GatewayTarget::Hostname(h) => {
                    out.insert(h.clone());
                }
                GatewayTarget::RegistryService(fqdn) => {
                    let Some((ns, svc)) = parse_local_fqdn(fqdn, domain_suffix) else {
                        continue;
                    };
                    let key = ServiceName::new(ns, svc);
                    for c in view.clusters.values() {
                        if c.network(&view.networks) != Some(name.as_str()) {
                            continue;
                        }
                        if let Some(s) = c.snapshot.services.get(&key) {
                            out.extend(
                                s.load_balancer
                                    .iter()
                                    .filter(|h| h.parse::<IpAddr>().is_err())
                                    .cloned(),
                            );
                        }
                    }
                }
            }
        }
    }
    out
}
