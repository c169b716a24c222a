//! The rules a cluster's gateway admits a connection by, written once: the gateway's route table
//! is built with them, and the EDS server applies them to every remote cluster's endpoints, so
//! EDS never sends a client to a remote gateway that would refuse it.
//!
//! - [`ExportPolicy::admits`]: which services another network may reach at all;
//! - [`ready_endpoints`]: the ready endpoints of one service port, of one subset (by the
//!   DestinationRule's labels matched against the pods' labels), each with its target port;
//! - [`admit`]: the whole decision for (service, port, subset) as that cluster's gateway takes
//!   it, pure, with the reason when it refuses.

use std::net::SocketAddr;

use serde::Serialize;

use crate::snapshot::{Endpoint, Labels, ServiceInfo, ServicePort, labels_match};

/// Which services may be reached from other networks through the gateway.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ExportPolicy {
    /// Only services with a ServiceExport or the `multicluster.x-k8s.io/exported=true` label.
    #[default]
    Exported,
    /// Every service (Istio's behaviour: every service is reachable from other networks).
    All,
}

impl ExportPolicy {
    pub fn admits(self, service: &ServiceInfo) -> bool {
        self == ExportPolicy::All || service.exported
    }
}

/// One ready endpoint as the gateway connects to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadyEndpoint<'a> {
    pub endpoint: &'a Endpoint,
    /// The endpoint's address at the EndpointSlice port named like the Service port.
    pub addr: SocketAddr,
}

/// The ready endpoints of `port`, of the subset with these labels when one is given, each
/// address once (two slices may list the same endpoint).
pub fn ready_endpoints<'a>(
    service: &'a ServiceInfo,
    port: &'a ServicePort,
    subset: Option<&Labels>,
) -> Vec<ReadyEndpoint<'a>> {
    let mut out: Vec<ReadyEndpoint<'a>> = Vec::new();
    for (endpoint, target) in service.endpoints_for(port) {
        if !endpoint.ready || subset.is_some_and(|s| !labels_match(s, &endpoint.labels)) {
            continue;
        }
        let addr = SocketAddr::new(endpoint.address, target);
        if !out.iter().any(|e| e.addr == addr) {
            out.push(ReadyEndpoint { endpoint, addr });
        }
    }
    out
}

/// Why a cluster's gateway refuses (service, port, subset).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "not exported; create a ServiceExport or label the Service multicluster.x-k8s.io/exported=true"
    )]
    NotExported,
    #[error("no port {0}")]
    UnknownPort(u16),
    #[error("no subset {0}; check its DestinationRule")]
    UnknownSubset(String),
    #[error("no ready endpoint; are its pods ready?")]
    NoReadyEndpoint,
}

impl Refusal {
    /// The metric label (`gateway_rejected_connections_total{reason}`).
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::NotExported => "not_exported",
            Refusal::UnknownPort(_) => "unknown_port",
            Refusal::UnknownSubset(_) => "unknown_subset",
            Refusal::NoReadyEndpoint => "no_ready_endpoint",
        }
    }
}

/// What the gateway admits: the port and the ready endpoints behind it.
#[derive(Clone, Debug)]
pub struct Admitted<'a> {
    pub port: &'a ServicePort,
    pub endpoints: Vec<ReadyEndpoint<'a>>,
}

/// The decision of the gateway of `service`'s cluster for a connection to `port` (the Service
/// port), of `subset` (a DestinationRule subset name) when given.
pub fn admit<'a>(
    service: &'a ServiceInfo,
    policy: ExportPolicy,
    port: u16,
    subset: Option<&str>,
) -> Result<Admitted<'a>, Refusal> {
    if !policy.admits(service) {
        return Err(Refusal::NotExported);
    }
    let port = service.port(port).ok_or(Refusal::UnknownPort(port))?;
    let labels = match subset {
        None => None,
        Some(s) => Some(
            service
                .subsets
                .get(s)
                .ok_or_else(|| Refusal::UnknownSubset(s.to_string()))?,
        ),
    };
    let endpoints = ready_endpoints(service, port, labels);
    if endpoints.is_empty() {
        return Err(Refusal::NoReadyEndpoint);
    }
    Ok(Admitted { port, endpoints })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ServiceName;
    use crate::snapshot::{EndpointSet, Locality};

    fn endpoint(ip: &str, ready: bool, version: &str) -> Endpoint {
        Endpoint {
            address: ip.parse().unwrap(),
            ready,
            pod: None,
            labels: [("version".to_string(), version.to_string())].into(),
            locality: Locality::default(),
        }
    }

    fn service(exported: bool) -> ServiceInfo {
        ServiceInfo {
            name: ServiceName::new("bar", "httpbin"),
            labels: Labels::new(),
            ports: vec![ServicePort {
                name: "http".into(),
                port: 8000,
                protocol: "TCP".into(),
            }],
            exported,
            load_balancer: vec![],
            endpoint_sets: vec![
                EndpointSet {
                    ports: vec![("http".into(), 8080)],
                    endpoints: vec![
                        endpoint("10.0.0.1", true, "v1"),
                        endpoint("10.0.0.2", false, "v2"),
                        endpoint("10.0.0.3", true, "v2"),
                    ],
                },
                // The same endpoint in a second slice counts once.
                EndpointSet {
                    ports: vec![("http".into(), 8080)],
                    endpoints: vec![endpoint("10.0.0.1", true, "v1")],
                },
            ],
            subsets: [
                ("v1".to_string(), [("version".into(), "v1".into())].into()),
                ("v3".to_string(), [("version".into(), "v3".into())].into()),
            ]
            .into(),
        }
    }

    #[test]
    fn decisions() {
        let s = service(true);
        let all = admit(&s, ExportPolicy::Exported, 8000, None).unwrap();
        let addrs: Vec<String> = all.endpoints.iter().map(|e| e.addr.to_string()).collect();
        assert_eq!(addrs, ["10.0.0.1:8080", "10.0.0.3:8080"]);
        let v1 = admit(&s, ExportPolicy::Exported, 8000, Some("v1")).unwrap();
        assert_eq!(v1.endpoints.len(), 1);
        assert_eq!(
            admit(&s, ExportPolicy::Exported, 8000, Some("v3")).unwrap_err(),
            Refusal::NoReadyEndpoint
        );
        assert_eq!(
            admit(&s, ExportPolicy::Exported, 8000, Some("v9")).unwrap_err(),
            Refusal::UnknownSubset("v9".into())
        );
        assert_eq!(
            admit(&s, ExportPolicy::Exported, 9000, None).unwrap_err(),
            Refusal::UnknownPort(9000)
        );
        let private = service(false);
        assert_eq!(
            admit(&private, ExportPolicy::Exported, 8000, None).unwrap_err(),
            Refusal::NotExported
        );
        assert!(admit(&private, ExportPolicy::All, 8000, None).is_ok());
    }
}
