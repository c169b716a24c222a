//! One generation's resources for one client network, computed once and shared by every stream
//! of that network.
//!
//! [`build`] is pure: from the previous snapshot of the network (if any) and a new generation it
//! recomputes only the resources whose inputs changed ([`dirty`]: the service in every cluster,
//! or everything when the networks, gateways or clusters' networks changed), through
//! `eds::load_assignment`, the same decision `/debug/explain` shows. Each resource is encoded
//! once; its version is a hash of its bytes, so equal content keeps its version, and the snapshot
//! lists the names whose version changed since the previous one. Streams compare versions (a
//! `u64`) with what they sent instead of re-encoding.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

use prost::Message;
use registry::ServiceName;
use registry::snapshot::{EndpointSet, ServiceInfo};

use super::Generation;
use crate::eds::{self, EdsOptions};
use crate::view::MeshView;

/// One encoded `ClusterLoadAssignment`.
#[derive(Debug, PartialEq, Eq)]
pub struct Encoded {
    /// A hash of `bytes`, never 0 (0 stands for "a version we cannot read").
    pub version: u64,
    pub bytes: Vec<u8>,
}

impl Encoded {
    pub fn new(bytes: Vec<u8>) -> Encoded {
        let mut h = DefaultHasher::new();
        bytes.hash(&mut h);
        Encoded {
            version: h.finish().max(1),
            bytes,
        }
    }
}

/// The wire form of a resource version.
pub fn version_string(v: u64) -> String {
    format!("{v:016x}")
}

/// A version a client says it holds; 0 when it is not one of ours.
pub fn parse_version(s: &str) -> u64 {
    if s.len() != 16 {
        return 0;
    }
    u64::from_str_radix(s, 16).unwrap_or(0)
}

/// The resources of one generation for clients in one network.
#[derive(Debug)]
pub struct NetworkSnapshot {
    pub generation: Arc<Generation>,
    pub network: String,
    /// Every name a wildcard subscription gets.
    pub resources: BTreeMap<Arc<str>, Arc<Encoded>>,
    /// The generation of the snapshot this one was built from.
    pub previous: Option<u64>,
    /// Names added, changed or removed since `previous` (meaningless without it).
    pub changed: Vec<Arc<str>>,
    /// How many assignments were computed for this snapshot.
    pub recomputed: usize,
}

impl NetworkSnapshot {
    pub fn version(&self) -> u64 {
        self.generation.version
    }

    /// A resource by name: from the snapshot, else (a name no service produces) computed now;
    /// the second is `true` when it is in the snapshot.
    pub fn get(&self, name: &str, opts: &EdsOptions) -> (Arc<Encoded>, bool) {
        match self.resources.get(name) {
            Some(r) => (r.clone(), true),
            None => (Arc::new(self.compute(name, opts)), false),
        }
    }

    fn compute(&self, name: &str, opts: &EdsOptions) -> Encoded {
        let view = &self.generation.view;
        let gateways = eds::gateway_addresses(view);
        let cla = eds::load_assignment(name, view, &self.network, opts, &gateways);
        Encoded::new(cla.encode_to_vec())
    }
}

/// What changed between two views, as far as EDS is concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dirty {
    /// Something every resource depends on (mesh networks, gateways, the local cluster, a
    /// cluster's network).
    All,
    /// The services whose inputs differ in at least one cluster.
    Services(BTreeSet<ServiceName>),
}

/// The services whose EDS inputs differ between `old` and `new`.
pub fn dirty(old: &MeshView, new: &MeshView) -> Dirty {
    if old.local_cluster != new.local_cluster
        || (!Arc::ptr_eq(&old.networks, &new.networks) && old.networks != new.networks)
        || (!Arc::ptr_eq(&old.gateways, &new.gateways) && old.gateways != new.gateways)
    {
        return Dirty::All;
    }
    let mut out = BTreeSet::new();
    for (id, c) in &new.clusters {
        let Some(o) = old.clusters.get(id) else {
            out.extend(c.snapshot.services.keys().cloned());
            continue;
        };
        if o.network(&old.networks) != c.network(&new.networks) {
            return Dirty::All;
        }
        if Arc::ptr_eq(&o.snapshot, &c.snapshot) {
            continue;
        }
        let (a, b) = (&o.snapshot.services, &c.snapshot.services);
        for (key, svc) in b {
            if a.get(key).is_none_or(|s| !same_service(s, svc)) {
                out.insert(key.clone());
            }
        }
        out.extend(a.keys().filter(|k| !b.contains_key(*k)).cloned());
    }
    for (id, o) in &old.clusters {
        if !new.clusters.contains_key(id) {
            out.extend(o.snapshot.services.keys().cloned());
        }
    }
    Dirty::Services(out)
}

/// Equal as far as EDS can tell (`ServiceInfo` has no `PartialEq`). Destructured without `..`,
/// so a field added to either struct fails to compile here until it is compared.
fn same_service(a: &ServiceInfo, b: &ServiceInfo) -> bool {
    let ServiceInfo {
        name,
        labels,
        ports,
        exported,
        load_balancer,
        endpoint_sets,
        subsets,
    } = a;
    *name == b.name
        && *labels == b.labels
        && *ports == b.ports
        && *exported == b.exported
        && *load_balancer == b.load_balancer
        && *subsets == b.subsets
        && endpoint_sets.len() == b.endpoint_sets.len()
        && endpoint_sets.iter().zip(&b.endpoint_sets).all(|(x, y)| {
            let EndpointSet { ports, endpoints } = x;
            *ports == y.ports && *endpoints == y.endpoints
        })
}

/// The snapshot of `generation` for clients in `network`, recomputing only what changed since
/// `previous` (a snapshot of the same network).
pub fn build(
    previous: Option<&NetworkSnapshot>,
    generation: Arc<Generation>,
    network: &str,
    opts: &EdsOptions,
) -> NetworkSnapshot {
    let view = &generation.view;
    let gateways = eds::gateway_addresses(view);
    let encode = |name: &str| {
        Arc::new(Encoded::new(
            eds::load_assignment(name, view, network, opts, &gateways).encode_to_vec(),
        ))
    };
    let dirty = previous
        .filter(|p| p.network == network)
        .map(|p| (p, dirty(&p.generation.view, view)));
    let (resources, changed, recomputed) = match dirty {
        Some((p, Dirty::Services(services))) => {
            let mut resources = p.resources.clone();
            let mut changed = Vec::new();
            let mut recomputed = 0;
            for key in &services {
                let before = eds::service_cluster_names(key, &p.generation.view, opts);
                let after = eds::service_cluster_names(key, view, opts);
                for name in before.difference(&after) {
                    if let Some((k, _)) = resources.remove_entry(name.as_str()) {
                        changed.push(k);
                    }
                }
                for name in after {
                    let r = encode(&name);
                    recomputed += 1;
                    let name: Arc<str> = name.into();
                    if p.resources.get(&name).map(|o| o.version) != Some(r.version) {
                        changed.push(name.clone());
                        resources.insert(name, r);
                    }
                }
            }
            (resources, changed, recomputed)
        }
        other => {
            let resources: BTreeMap<Arc<str>, Arc<Encoded>> = eds::all_cluster_names(view, opts)
                .into_iter()
                .map(|n| {
                    let r = encode(&n);
                    (Arc::from(n), r)
                })
                .collect();
            let recomputed = resources.len();
            let changed = match other {
                Some((p, _)) => changed_names(&p.resources, &resources),
                None => Vec::new(),
            };
            (resources, changed, recomputed)
        }
    };
    NetworkSnapshot {
        previous: previous
            .filter(|p| p.network == network)
            .map(NetworkSnapshot::version),
        generation,
        network: network.to_string(),
        resources,
        changed,
        recomputed,
    }
}

/// Names added, removed or with another version, between two resource maps.
fn changed_names(
    old: &BTreeMap<Arc<str>, Arc<Encoded>>,
    new: &BTreeMap<Arc<str>, Arc<Encoded>>,
) -> Vec<Arc<str>> {
    let mut out: Vec<Arc<str>> = new
        .iter()
        .filter(|(n, r)| old.get(*n).map(|o| o.version) != Some(r.version))
        .map(|(n, _)| n.clone())
        .collect();
    out.extend(old.keys().filter(|n| !new.contains_key(*n)).cloned());
    out
}

#[cfg(test)]
#[path = "snapshot/tests.rs"]
pub(crate) mod tests;
