//! The routing decision: a pure function from (what the client offered, the route table) to a
//! target or a rejection.
//!
//! The table is built once per snapshot change (off the data path) and holds, per accepted
//! host, per port and subset, the ready endpoints already resolved to socket addresses. The
//! data path does one hash lookup. Addresses come only from the table, never from the client.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use registry::Cidr;
pub use registry::admission::ExportPolicy;
use registry::admission::ready_endpoints;
use registry::naming::{SniError, SniForm, parse_sni};
use registry::snapshot::{Labels, ServiceInfo, ServicePort};
use registry::{ServiceName, Snapshot};
use serde::Serialize;

use crate::alert::AlertDescription;
use crate::balance::{Backend, EndpointState};
use crate::hello::ClientHello;

/// What the table needs to know beyond the snapshot (from the gateway's flags).
#[derive(Clone, Debug, Serialize)]
pub struct RouteOptions {
    pub global_suffix: String,
    pub domain_suffix: String,
    pub export_policy: ExportPolicy,
    /// Also accept `<name>.<ns>.svc.<domain-suffix>` hosts in the SNI.
    pub accept_cluster_local: bool,
    /// Require an ALPN protocol starting with `istio` (what Istio sidecars offer for mTLS).
    pub require_istio_alpn: bool,
    /// Accept connections only from these source networks (empty: any).
    #[serde(serialize_with = "process_shell::flags::display_seq")]
    pub allow_source: Vec<Cidr>,
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
    #[error("source {0} is not in --allow-source")]
    SourceDenied(IpAddr),
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
            Reject::SourceDenied(_) => "source_denied",
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

    /// The TLS alert the client gets; none for a source that may not even be told why.
    pub fn alert(&self) -> Option<AlertDescription> {
        Some(match self {
            Reject::SourceDenied(_) => return None,
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
        })
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
#[derive(Debug)]
pub struct RouteTable {
    /// The snapshot version it was built from.
    version: u64,
    hosts: HashMap<String, Arc<HostRoutes>>,
    options: Arc<RouteOptions>,
    /// Endpoint state by address, reused by the next table.
    states: HashMap<SocketAddr, Arc<EndpointState>>,
}

#[derive(Debug)]
pub struct HostRoutes {
    pub service: Arc<ServiceName>,
    pub exported: bool,
    pub ports: Vec<PortRoutes>,
    /// Subset names defined for the service (even those with no ready endpoint).
    pub subsets: Vec<String>,
}

#[derive(Debug)]
pub struct PortRoutes {
    pub port: u16,
    pub name: String,
    pub all: Arc<[Backend]>,
    pub subsets: HashMap<Arc<str>, Arc<[Backend]>>,
}

impl RouteTable {
    /// The version of the snapshot this table was built from.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// A table that routes nothing yet (before the first snapshot).
    pub fn empty(options: Arc<RouteOptions>) -> RouteTable {
        RouteTable {
            version: 0,
            hosts: HashMap::new(),
            options,
            states: HashMap::new(),
        }
    }

    /// Build from a snapshot, keeping endpoint state from `previous` for addresses it keeps.
    pub fn build(
        snapshot: &Snapshot,
        options: &Arc<RouteOptions>,
        previous: Option<&RouteTable>,
    ) -> RouteTable {
        let mut table = RouteTable::empty(options.clone());
        table.version = snapshot.status.version;
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
        previous: Option<&RouteTable>,
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
            exported: options.export_policy.admits(service),
            ports,
            subsets: service.subsets.keys().cloned().collect(),
        }
    }

    fn backends(
        &mut self,
        service: &ServiceInfo,
        port: &ServicePort,
        subset: Option<&Labels>,
        previous: Option<&RouteTable>,
    ) -> Arc<[Backend]> {
        ready_endpoints(service, port, subset)
            .into_iter()
            .map(|ready| {
                let state = self
                    .states
                    .entry(ready.addr)
                    .or_insert_with(|| {
                        previous
                            .and_then(|p| p.states.get(&ready.addr).cloned())
                            .unwrap_or_default()
                    })
                    .clone();
                Backend {
                    addr: ready.addr,
                    pod: ready.endpoint.pod.as_deref().map(Arc::from),
                    state,
                }
            })
            .collect()
    }

    pub fn options(&self) -> &RouteOptions {
        &self.options
    }

    pub fn hosts(&self) -> impl Iterator<Item = (&String, &Arc<HostRoutes>)> {
        self.hosts.iter()
    }

    /// Whether a connection from `source` may be served at all (`--allow-source`), decided
    /// before its ClientHello is read.
    pub fn admit_source(&self, source: IpAddr) -> Result<(), Reject> {
        let allow = &self.options.allow_source;
        if allow.is_empty() || allow.iter().any(|c| c.contains(&source)) {
            Ok(())
        } else {
            Err(Reject::SourceDenied(source))
        }
    }

    /// The decision for one ClientHello.
    pub fn decide(&self, hello: &ClientHello) -> Result<Route, Reject> {
        let sni = hello.sni.as_deref().ok_or(Reject::NoSni)?;
        let form = parse_sni(sni).map_err(Reject::BadSni)?;
        if self.options.require_istio_alpn && !hello.alpn.iter().any(|p| p.starts_with("istio")) {
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
        let o = &self.options;
        let under = |suffix: &str| {
            host.strip_suffix(suffix)
                .is_some_and(|stem| stem.ends_with('.') && stem.len() > 1)
        };
        under(&o.global_suffix)
            || (o.accept_cluster_local && under(&format!("svc.{}", o.domain_suffix)))
    }
}

#[cfg(test)]
mod tests;
