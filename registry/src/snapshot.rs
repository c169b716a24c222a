//! The snapshot: one immutable, internally consistent view of a cluster, built from objects.
//!
//! Conversion from raw objects happens here, outside any lock; sources publish the finished
//! `Arc<Snapshot>` through a `tokio::sync::watch` channel, so readers never see half a list.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use serde::Serialize;

use crate::naming::{ServiceName, resolve_service_host};
use crate::objects::{
    DestinationRule, EndpointSlice, Object, ObjectMeta, Secret, Service, ServiceEntry,
    ServiceExport,
};

pub type Labels = BTreeMap<String, String>;

/// The label that exports a Service without a ServiceExport object.
pub const EXPORTED_LABEL: &str = "multicluster.x-k8s.io/exported";

#[derive(Clone, Debug, Default, Serialize)]
pub struct Snapshot {
    pub services: BTreeMap<ServiceName, ServiceInfo>,
    /// Ordered by (namespace, name).
    pub service_entries: Vec<ServiceEntryInfo>,
    pub secrets: BTreeMap<ServiceName, SecretInfo>,
    /// What the source said while building this snapshot.
    pub status: SourceStatus,
}

/// What a source reports about the snapshot it built: shown on `/config_dump`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SourceStatus {
    /// `dir:/etc/mesh` or `kubernetes`.
    pub source: String,
    /// Incremented on every published snapshot.
    pub version: u64,
    pub objects: usize,
    /// Every object that was rejected, with where it came from and why.
    pub errors: Vec<String>,
    /// Well-formed objects of kinds we do not read.
    pub skipped: Vec<String>,
    /// Notes about how conflicts were resolved (duplicate objects, competing subsets).
    pub warnings: Vec<String>,
    /// Kubernetes source: when it last lost the API server (RFC 3339), while it has not
    /// reached it again. The snapshot keeps serving the last-known objects meanwhile.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stale_since: Option<String>,
    /// Kubernetes source: when the last watch event arrived (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_event: Option<String>,
    /// Kubernetes source: the state of every watch (one per kind and namespace).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub watches: Vec<WatchStatus>,
}

/// The state of one Kubernetes watch, as `/config_dump` shows it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct WatchStatus {
    pub kind: String,
    /// The namespace watched, or `*` for all.
    pub namespace: String,
    /// The `apiVersion` served by the cluster and used; empty while not known.
    pub api_version: String,
    /// `listing`, `watching`, `crd not installed`, or `retrying`.
    pub state: String,
    /// The first full list is done (a kind whose CRD is not installed counts as synced, empty).
    pub synced: bool,
    pub objects: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stale_since: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_event: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ServiceInfo {
    pub name: ServiceName,
    pub labels: Labels,
    pub ports: Vec<ServicePort>,
    /// Exported for multi-cluster use (ServiceExport or the exported label).
    pub exported: bool,
    /// LoadBalancer ingress (IPs and hostnames), for gateways named by `registryServiceName`.
    pub load_balancer: Vec<String>,
    /// Endpoints grouped as their EndpointSlices group them (ports are per slice).
    pub endpoint_sets: Vec<EndpointSet>,
    /// Subsets from the DestinationRule for this service, by name.
    pub subsets: BTreeMap<String, Labels>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServicePort {
    /// Empty when the Service has a single unnamed port.
    pub name: String,
    pub port: u16,
    pub protocol: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct EndpointSet {
    /// From the EndpointSlice: port name -> port number on the endpoints.
    pub ports: Vec<(String, u16)>,
    pub endpoints: Vec<Endpoint>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    pub address: IpAddr,
    pub ready: bool,
    /// `namespace/name` of the pod behind the endpoint, when the slice names one.
    pub pod: Option<String>,
    /// The pod's labels (empty when the pod is unknown).
    pub labels: Labels,
    pub locality: Locality,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Locality {
    pub region: String,
    pub zone: String,
    pub subzone: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct ServiceEntryInfo {
    pub namespace: String,
    pub name: String,
    /// RFC 3339 as Kubernetes writes it; empty when unset (files): sorts first.
    pub creation_timestamp: String,
    pub hosts: Vec<String>,
    pub addresses: Vec<String>,
    pub ports: Vec<crate::objects::ServiceEntryPort>,
    pub resolution: String,
    pub location: String,
    pub endpoints: Vec<crate::objects::WorkloadEntry>,
}

#[derive(Clone, Debug, Serialize)]
pub struct SecretInfo {
    pub labels: Labels,
    pub annotations: Labels,
    /// Data values, decoded. Never serialized: `/config_dump` shows only the keys.
    #[serde(serialize_with = "keys_only")]
    pub data: BTreeMap<String, Vec<u8>>,
}

fn keys_only<S: serde::Serializer>(
    data: &BTreeMap<String, Vec<u8>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_seq(data.keys())
}

impl ServiceInfo {
    /// The port of the service with this number.
    pub fn port(&self, number: u16) -> Option<&ServicePort> {
        self.ports.iter().find(|p| p.port == number)
    }

    /// Endpoints and their target port for a service port, matched by the port's name in each
    /// EndpointSlice, as kube-proxy does. Includes not-ready endpoints: filter on `ready`.
    pub fn endpoints_for<'a>(
        &'a self,
        port: &'a ServicePort,
    ) -> impl Iterator<Item = (&'a Endpoint, u16)> + 'a {
        self.endpoint_sets.iter().flat_map(move |set| {
            let target = set
                .ports
                .iter()
                .find(|(name, _)| *name == port.name)
                .map(|(_, p)| *p);
            set.endpoints
                .iter()
                .filter_map(move |e| target.map(|t| (e, t)))
        })
    }
}

/// Whether every label of `selector` is on `labels` with the same value.
pub fn labels_match(selector: &Labels, labels: &Labels) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

impl Snapshot {
    /// Build a snapshot from deduplicated objects. Problems are recorded in `status.warnings`.
    pub fn build<'a>(
        objects: impl IntoIterator<Item = &'a Object>,
        mut status: SourceStatus,
    ) -> Snapshot {
        let mut count = 0;
        let mut services = Vec::new();
        let mut slices = Vec::new();
        let mut pods: HashMap<(&str, &str), &ObjectMeta> = HashMap::new();
        let mut exports = Vec::new();
        let mut rules = Vec::new();
        let mut entries = Vec::new();
        let mut secrets = BTreeMap::new();
        for object in objects {
            count += 1;
            match object {
                Object::Service(s) => services.push(s.as_ref()),
                Object::EndpointSlice(s) => slices.push(s.as_ref()),
                Object::Pod(p) => {
                    pods.insert(
                        (namespace_of(&p.metadata), name_of(&p.metadata)),
                        &p.metadata,
                    );
                }
                Object::PodMetadata(m) => {
                    pods.insert((namespace_of(m), name_of(m)), m);
                }
                Object::ServiceExport(e) => exports.push(e.as_ref()),
                Object::DestinationRule(r) => rules.push(r.as_ref()),
                Object::ServiceEntry(e) => entries.push(service_entry_info(e)),
                Object::Secret(s) => {
                    secrets.insert(
                        ServiceName::new(namespace_of(&s.metadata), name_of(&s.metadata)),
                        secret_info(s),
                    );
                }
            }
        }
        let mut services: BTreeMap<ServiceName, ServiceInfo> = services
            .into_iter()
            .map(service_info)
            .map(|s| (s.name.clone(), s))
            .collect();
        mark_exports(&mut services, &exports);
        attach_slices(&mut services, &slices, &pods, &mut status.warnings);
        attach_subsets(&mut services, &mut rules, &mut status.warnings);
        entries.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        status.objects = count;
        Snapshot {
            services,
            service_entries: entries,
            secrets,
            status,
        }
    }

    pub fn service(&self, namespace: &str, name: &str) -> Option<&ServiceInfo> {
        self.services.get(&ServiceName::new(namespace, name))
    }
}

fn namespace_of(m: &ObjectMeta) -> &str {
    m.namespace.as_deref().unwrap_or("default")
}

fn name_of(m: &ObjectMeta) -> &str {
    m.name.as_deref().unwrap_or("")
}

fn service_info(s: &Service) -> ServiceInfo {
    let spec = s.spec.as_ref();
    let ports = spec
        .and_then(|s| s.ports.as_ref())
        .map(|ports| {
            ports
                .iter()
                .filter_map(|p| {
                    Some(ServicePort {
                        name: p.name.clone().unwrap_or_default(),
                        port: u16::try_from(p.port).ok()?,
                        protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    let labels: Labels = s.metadata.labels.clone().unwrap_or_default();
    let load_balancer = s
        .status
        .as_ref()
        .and_then(|st| st.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .map(|ing| {
            ing.iter()
                .filter_map(|i| i.ip.clone().or_else(|| i.hostname.clone()))
                .collect()
        })
        .unwrap_or_default();
    ServiceInfo {
        name: ServiceName::new(namespace_of(&s.metadata), name_of(&s.metadata)),
        exported: labels.get(EXPORTED_LABEL).is_some_and(|v| v == "true"),
        labels,
        ports,
        load_balancer,
        endpoint_sets: Vec::new(),
        subsets: BTreeMap::new(),
    }
}

fn mark_exports(services: &mut BTreeMap<ServiceName, ServiceInfo>, exports: &[&ServiceExport]) {
    for e in exports {
        let key = ServiceName::new(namespace_of(&e.metadata), name_of(&e.metadata));
        if let Some(s) = services.get_mut(&key) {
            s.exported = true;
        }
    }
}

fn attach_slices(
    services: &mut BTreeMap<ServiceName, ServiceInfo>,
    slices: &[&EndpointSlice],
    pods: &HashMap<(&str, &str), &ObjectMeta>,
    warnings: &mut Vec<String>,
) {
    for slice in slices {
        let ns = namespace_of(&slice.metadata);
        let owner = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("kubernetes.io/service-name"));
        let Some(owner) = owner else {
            warnings.push(format!(
                "EndpointSlice {ns}/{} has no kubernetes.io/service-name label: ignored",
                name_of(&slice.metadata)
            ));
            continue;
        };
        let Some(service) = services.get_mut(&ServiceName::new(ns, owner.as_str())) else {
            continue;
        };
        let ports = slice
            .ports
            .as_ref()
            .map(|ports| {
                ports
                    .iter()
                    .filter_map(|p| {
                        Some((
                            p.name.clone().unwrap_or_default(),
                            u16::try_from(p.port?).ok()?,
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut endpoints = Vec::new();
        for ep in &slice.endpoints {
            let pod_ref = ep
                .target_ref
                .as_ref()
                .filter(|r| r.kind.as_deref() == Some("Pod"))
                .and_then(|r| Some((r.namespace.as_deref().unwrap_or(ns), r.name.as_deref()?)));
            let pod = pod_ref.and_then(|k| pods.get(&k));
            let labels: Labels = pod.and_then(|m| m.labels.clone()).unwrap_or_default();
            let label = |k: &str| labels.get(k).cloned().unwrap_or_default();
            let locality = Locality {
                region: label("topology.kubernetes.io/region"),
                zone: ep
                    .zone
                    .clone()
                    .unwrap_or_else(|| label("topology.kubernetes.io/zone")),
                subzone: label("topology.istio.io/subzone"),
            };
            // Kubernetes: a nil `ready` condition means ready.
            let ready = ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
            for addr in &ep.addresses {
                let Ok(address) = addr.parse::<IpAddr>() else {
                    warnings.push(format!(
                        "EndpointSlice {ns}/{}: address {addr:?} is not an IP: skipped",
                        name_of(&slice.metadata)
                    ));
                    continue;
                };
                endpoints.push(Endpoint {
                    address,
                    ready,
                    pod: pod_ref.map(|(n, p)| format!("{n}/{p}")),
                    labels: labels.clone(),
                    locality: locality.clone(),
                });
            }
        }
        service.endpoint_sets.push(EndpointSet { ports, endpoints });
    }
}

/// One DestinationRule per service: the oldest (creationTimestamp, then namespace/name) wins, as
/// Istio merges rules; a later one is reported, not applied.
fn attach_subsets(
    services: &mut BTreeMap<ServiceName, ServiceInfo>,
    rules: &mut [&DestinationRule],
    warnings: &mut Vec<String>,
) {
    rules.sort_by_key(|r| age_key(&r.metadata));
    let mut owner: HashMap<ServiceName, String> = HashMap::new();
    for rule in rules.iter() {
        let ns = namespace_of(&rule.metadata);
        let me = format!("{ns}/{}", name_of(&rule.metadata));
        let Some(target) = resolve_service_host(&rule.spec.host, ns) else {
            continue;
        };
        if let Some(first) = owner.get(&target) {
            warnings.push(format!(
                "DestinationRule {me} for {target} ignored: {first} is older and wins"
            ));
            continue;
        }
        let Some(service) = services.get_mut(&target) else {
            continue;
        };
        owner.insert(target, me);
        for subset in &rule.spec.subsets {
            service
                .subsets
                .insert(subset.name.clone(), subset.labels.clone());
        }
    }
}

/// Oldest first: creationTimestamp (unset sorts first), then namespace, then name.
pub fn age_key(m: &ObjectMeta) -> (String, String, String) {
    (
        m.creation_timestamp
            .as_ref()
            .map(|t| t.0.to_string())
            .unwrap_or_default(),
        namespace_of(m).to_string(),
        name_of(m).to_string(),
    )
}

fn service_entry_info(e: &ServiceEntry) -> ServiceEntryInfo {
    let (created, namespace, name) = age_key(&e.metadata);
    ServiceEntryInfo {
        namespace,
        name,
        creation_timestamp: created,
        hosts: e
            .spec
            .hosts
            .iter()
            .map(|h| h.to_ascii_lowercase())
            .collect(),
        addresses: e.spec.addresses.clone(),
        ports: e.spec.ports.clone(),
        resolution: e.spec.resolution.clone().unwrap_or_else(|| "NONE".into()),
        location: e
            .spec
            .location
            .clone()
            .unwrap_or_else(|| "MESH_EXTERNAL".into()),
        endpoints: e.spec.endpoints.clone(),
    }
}

fn secret_info(s: &Secret) -> SecretInfo {
    let mut data: BTreeMap<String, Vec<u8>> = s
        .data
        .as_ref()
        .map(|d| d.iter().map(|(k, v)| (k.clone(), v.0.clone())).collect())
        .unwrap_or_default();
    // `stringData` is write-only in Kubernetes but common in files: it wins, as the API does.
    if let Some(sd) = &s.string_data {
        for (k, v) in sd {
            data.insert(k.clone(), v.clone().into_bytes());
        }
    }
    SecretInfo {
        labels: s.metadata.labels.clone().unwrap_or_default(),
        annotations: s.metadata.annotations.clone().unwrap_or_default(),
        data,
    }
}
