//! The routing decision: a pure function from (what the client offered, the route table) to a
//! target or a rejection.
//!
//! The table is built once per snapshot change (off the data path) and holds, per accepted
//! host, per port and subset, the ready endpoints already resolved to socket addresses. The
//! data path does one hash lookup. Addresses come only from the table, never from the client.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use registry::naming::{SniError, SniForm, parse_sni};
use registry::snapshot::{Labels, ServiceInfo, ServicePort, labels_match};
use registry::{ServiceName, Snapshot};
use serde::Serialize;

use crate::balance::{Backend, EndpointState};
use crate::hello::{AlertDescription, ClientHello};

/// Which services the gateway may route to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ExportPolicy {
    /// Only services with a ServiceExport or the `multicluster.x-k8s.io/exported=true` label.
    Exported,
    /// Every service (Istio's behaviour; every service is reachable from other networks).
    All,
}

/// What the table needs to know beyond the snapshot.
#[derive(Clone, Debug, Serialize)]
pub struct RouteOptions {
    pub global_suffix: String,
    pub domain_suffix: String,
    pub export_policy: ExportPolicy,
    /// Also accept `<name>.<ns>.svc.<domain-suffix>` hosts in the SNI.
    pub accept_cluster_local: bool,
    /// Require an ALPN protocol starting with `istio` (what Istio sidecars offer for mTLS).
    pub require_istio_alpn: bool,
}

/// A decided route: where this connection may go.
#[derive(Clone, Debug)]
pub struct Route {
    /// Shared with the table: deciding a route allocates nothing.
    pub service: Arc<ServiceName>,
    pub port: u16,
    pub subset: Option<Arc<str>>,
    /// Ready endpoints, with their target port. Never empty.
    pub backends: Arc<[Backend]>,
}

/// Why a connection is refused. `reason()` is the metric label.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Reject {
    #[error(
        "the ClientHello has no server name; clients must send SNI outbound_.<port>_.<subset>_.<host>"
    )]
    NoSni,
    #[error("{0}")]
    BadSni(SniError),
    #[error("host {0} is not under the accepted suffix")]
    OutsideSuffix(String),
    #[error("no local service {0}; is it deployed in this cluster?")]
    UnknownService(String),
    #[error(
        "service {0} is not exported; create a ServiceExport or label it multicluster.x-k8s.io/exported=true"
    )]
    NotExported(ServiceName),
    #[error("service {service} has no port {port}")]
    UnknownPort { service: ServiceName, port: u16 },
    #[error("service {0} has several ports; use the SNI form outbound_.<port>_.<subset>_.<host>")]
    AmbiguousPort(ServiceName),
    #[error("service {service} has no subset {subset}; check its DestinationRule")]
    UnknownSubset {
        service: ServiceName,
        subset: String,
    },
    #[error("service {service} port {port} has no ready endpoint{}; are its pods ready?", subset.as_ref().map(|s| format!(" in subset {s}")).unwrap_or_default())]
    NoReadyEndpoint {
        service: ServiceName,
        port: u16,
        subset: Option<String>,
    },
    #[error("the client offered no istio ALPN protocol and --require-istio-alpn is set")]
    AlpnRequired,
}

impl Reject {
    pub fn reason(&self) -> &'static str {
        match self {
            Reject::NoSni => "no_sni",
            Reject::BadSni(_) => "bad_sni",
            Reject::OutsideSuffix(_) => "outside_suffix",
            Reject::UnknownService(_) => "unknown_service",
            Reject::NotExported(_) => "not_exported",
            Reject::UnknownPort { .. } => "unknown_port",
            Reject::AmbiguousPort(_) => "ambiguous_port",
            Reject::UnknownSubset { .. } => "unknown_subset",
            Reject::NoReadyEndpoint { .. } => "no_ready_endpoint",
            Reject::AlpnRequired => "alpn_required",
        }
    }

    pub fn alert(&self) -> AlertDescription {
        match self {
            Reject::NoSni
            | Reject::BadSni(_)
            | Reject::OutsideSuffix(_)
            | Reject::UnknownService(_)
            | Reject::UnknownPort { .. }
            | Reject::AmbiguousPort(_)
            | Reject::UnknownSubset { .. } => AlertDescription::UnrecognizedName,
            Reject::NotExported(_) => AlertDescription::AccessDenied,
            Reject::NoReadyEndpoint { .. } => AlertDescription::InternalError,
            Reject::AlpnRequired => AlertDescription::NoApplicationProtocol,
        }
    }

    /// The service concerned, when the rejection got that far.
    pub fn service(&self) -> Option<&ServiceName> {
        match self {
            Reject::NotExported(s) | Reject::AmbiguousPort(s) => Some(s),
            Reject::UnknownPort { service, .. }
            | Reject::UnknownSubset { service, .. }
            | Reject::NoReadyEndpoint { service, .. } => Some(service),
            _ => None,
        }
    }
}

/// Everything routable, by accepted host name.
#[derive(Debug, Default)]
pub struct RouteTable {
    /// The snapshot version it was built from.
    version: u64,
    hosts: HashMap<String, Arc<HostRoutes>>,
    options: Option<RouteOptions>,
    /// Endpoint state by address, reused by the next table.
    states: HashMap<SocketAddr, Arc<EndpointState>>,
}

#[derive(Debug, Serialize)]
pub struct HostRoutes {
    #[serde(serialize_with = "ser_arc")]
    pub service: Arc<ServiceName>,
    pub exported: bool,
    pub ports: Vec<PortRoutes>,
    /// Subset names defined for the service (even those with no ready endpoint).
    pub subsets: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct PortRoutes {
    pub port: u16,
    pub name: String,
    #[serde(serialize_with = "ser_backends")]
    pub all: Arc<[Backend]>,
    #[serde(serialize_with = "ser_subsets")]
    pub subsets: HashMap<Arc<str>, Arc<[Backend]>>,
}

impl RouteTable {
    /// The version of the snapshot this table was built from.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Build from a snapshot, keeping endpoint state from `previous` for addresses it keeps.
    pub fn build(snapshot: &Snapshot, options: &RouteOptions, previous: &RouteTable) -> RouteTable {
        let mut table = RouteTable {
            version: snapshot.status.version,
            options: Some(options.clone()),
            ..Default::default()
        };
        for service in snapshot.services.values() {
            let routes = Arc::new(table.host_routes(service, options, previous));
            let global = service.name.global_host(&options.global_suffix);
            table.hosts.insert(global, routes.clone());
            if options.accept_cluster_local {
                let local = service.name.local_fqdn(&options.domain_suffix);
                table.hosts.insert(local, routes);
            }
        }
        table
    }

    fn host_routes(
        &mut self,
        service: &ServiceInfo,
        options: &RouteOptions,
        previous: &RouteTable,
    ) -> HostRoutes {
        let ports = service
            .ports
            .iter()
            .map(|port| {
                let all = self.backends(service, port, None, previous);
                let subsets = service
                    .subsets
                    .iter()
                    .map(|(name, labels)| {
                        (
                            Arc::from(name.as_str()),
                            self.backends(service, port, Some(labels), previous),
                        )
                    })
                    .collect();
                PortRoutes {
                    port: port.port,
                    name: port.name.clone(),
                    all,
                    subsets,
                }
            })
            .collect();
        HostRoutes {
            service: Arc::new(service.name.clone()),
            exported: service.exported || options.export_policy == ExportPolicy::All,
            ports,
            subsets: service.subsets.keys().cloned().collect(),
        }
    }

    fn backends(
        &mut self,
        service: &ServiceInfo,
        port: &ServicePort,
        subset: Option<&Labels>,
        previous: &RouteTable,
    ) -> Arc<[Backend]> {
        let mut out: Vec<Backend> = Vec::new();
        for (endpoint, target) in service.endpoints_for(port) {
            if !endpoint.ready || subset.is_some_and(|s| !labels_match(s, &endpoint.labels)) {
                continue;
            }
            let addr = SocketAddr::new(endpoint.address, target);
            if out.iter().any(|b| b.addr == addr) {
                continue;
            }
            let state = self
                .states
                .entry(addr)
                .or_insert_with(|| previous.states.get(&addr).cloned().unwrap_or_default())
                .clone();
            out.push(Backend {
                addr,
                pod: endpoint.pod.as_deref().map(Arc::from),
                state,
            });
        }
        out.into()
    }

    pub fn options(&self) -> Option<&RouteOptions> {
        self.options.as_ref()
    }

    pub fn hosts(&self) -> impl Iterator<Item = (&String, &Arc<HostRoutes>)> {
        self.hosts.iter()
    }

    /// The decision for one ClientHello.
    pub fn decide(&self, hello: &ClientHello) -> Result<Route, Reject> {
        let sni = hello.sni.as_deref().ok_or(Reject::NoSni)?;
        let form = parse_sni(sni).map_err(Reject::BadSni)?;
        let options = self.options.as_ref();
        if options.is_some_and(|o| o.require_istio_alpn)
            && !hello.alpn.iter().any(|p| p.starts_with("istio"))
        {
            return Err(Reject::AlpnRequired);
        }
        let (host, port, subset) = match form {
            SniForm::Outbound { port, subset, host } => (host, Some(port), subset),
            SniForm::Plain(host) => (host, None, None),
        };
        let routes = match self.hosts.get(host) {
            Some(r) => r,
            None if self.under_accepted_suffix(host) => {
                return Err(Reject::UnknownService(host.to_string()));
            }
            None => return Err(Reject::OutsideSuffix(host.to_string())),
        };
        if !routes.exported {
            return Err(Reject::NotExported(ServiceName::clone(&routes.service)));
        }
        let port_routes =
            match port {
                Some(p) => routes.ports.iter().find(|r| r.port == p).ok_or_else(|| {
                    Reject::UnknownPort {
                        service: ServiceName::clone(&routes.service),
                        port: p,
                    }
                })?,
                None => match routes.ports.as_slice() {
                    [only] => only,
                    _ => return Err(Reject::AmbiguousPort(ServiceName::clone(&routes.service))),
                },
            };
        let (subset, backends) = match subset {
            None => (None, &port_routes.all),
            Some(s) => {
                let (name, backends) =
                    port_routes
                        .subsets
                        .get_key_value(s)
                        .ok_or_else(|| Reject::UnknownSubset {
                            service: ServiceName::clone(&routes.service),
                            subset: s.to_string(),
                        })?;
                (Some(name), backends)
            }
        };
        if backends.is_empty() {
            return Err(Reject::NoReadyEndpoint {
                service: ServiceName::clone(&routes.service),
                port: port_routes.port,
                subset: subset.map(|s| s.to_string()),
            });
        }
        Ok(Route {
            service: routes.service.clone(),
            port: port_routes.port,
            subset: subset.cloned(),
            backends: backends.clone(),
        })
    }

    fn under_accepted_suffix(&self, host: &str) -> bool {
        let Some(o) = &self.options else { return false };
        let under = |suffix: &str| {
            host.strip_suffix(suffix)
                .is_some_and(|stem| stem.ends_with('.') && stem.len() > 1)
        };
        under(&o.global_suffix)
            || (o.accept_cluster_local && under(&format!("svc.{}", o.domain_suffix)))
    }
}

#[derive(Serialize)]
struct BackendView<'a> {
    addr: SocketAddr,
    pod: Option<&'a str>,
    active: u32,
    ejected: bool,
    consecutive_failures: u32,
}

fn ser_backends<S: serde::Serializer>(b: &Arc<[Backend]>, s: S) -> Result<S::Ok, S::Error> {
    let now = crate::balance::now_ms();
    s.collect_seq(b.iter().map(|b| BackendView {
        addr: b.addr,
        pod: b.pod.as_deref(),
        active: b.state.active(),
        ejected: b.state.is_ejected(now),
        consecutive_failures: b.state.consecutive_failures(),
    }))
}

fn ser_arc<T: Serialize, S: serde::Serializer>(v: &Arc<T>, s: S) -> Result<S::Ok, S::Error> {
    T::serialize(v, s)
}

fn ser_subsets<S: serde::Serializer>(
    m: &HashMap<Arc<str>, Arc<[Backend]>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut keys: Vec<_> = m.keys().collect();
    keys.sort();
    let mut map = s.serialize_map(Some(keys.len()))?;
    for k in keys {
        struct B<'a>(&'a Arc<[Backend]>);
        impl Serialize for B<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                ser_backends(self.0, s)
            }
        }
        map.serialize_entry(&**k, &B(&m[k]))?;
    }
    map.end()
}

#[cfg(test)]
mod tests;
