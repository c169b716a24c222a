//! Istio's `meshNetworks` file: which clusters and CIDRs form each network, and the gateways
//! that reach it.
//!
//! ```yaml
//! networks:
//!   network2:
//!     endpoints:
//!     - fromRegistry: cluster-2
//!     - fromCidr: 10.2.0.0/16
//!     gateways:
//!     - registryServiceName: istio-eastwestgateway.istio-system.svc.cluster.local
//!       port: 15443
//!     - address: 192.0.2.10
//!       port: 15443
//! ```
//!
//! Parsing is pure; a gateway named by `registryServiceName` is resolved against the clusters'
//! snapshots (LoadBalancer status) and a DNS cache in [`crate::eds`], never here.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;

use registry::Cidr;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MeshNetworksFile {
    #[serde(default)]
    pub networks: BTreeMap<String, NetworkSpec>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkSpec {
    #[serde(default)]
    pub endpoints: Vec<EndpointSpec>,
    #[serde(default)]
    pub gateways: Vec<GatewaySpec>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EndpointSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_registry: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_cidr: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GatewaySpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry_service_name: Option<String>,
    pub port: u32,
    /// Accepted for compatibility with Istio files; not used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locality: Option<String>,
}

/// The validated form used by EDS.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MeshNetworks {
    pub networks: BTreeMap<String, Network>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Network {
    pub registries: Vec<String>,
    pub cidrs: Vec<Cidr>,
    pub gateways: Vec<Gateway>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Gateway {
    pub target: GatewayTarget,
    pub port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum GatewayTarget {
    /// A literal IP.
    Ip(IpAddr),
    /// A host name, resolved by DNS.
    Hostname(String),
    /// A Service FQDN whose LoadBalancer status holds the address, in a cluster of this network.
    RegistryService(String),
}

#[derive(Debug, thiserror::Error)]
pub enum MeshNetworksError {
    #[error("cannot read mesh networks file {path}: {source}; does it exist?")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("mesh networks file {path} is not valid YAML in Istio's meshNetworks shape: {reason}")]
    Parse { path: String, reason: String },
    #[error("mesh networks file {path} is invalid:\n  - {}", .problems.join("\n  - "))]
    Invalid { path: String, problems: Vec<String> },
}

impl MeshNetworks {
    /// Read and validate a file.
    pub fn load(path: &Path) -> Result<MeshNetworks, MeshNetworksError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| MeshNetworksError::Read {
            path: name.clone(),
            source,
        })?;
        Self::parse(&name, &text)
    }

    /// Parse and validate text; `origin` names it in errors.
    pub fn parse(origin: &str, text: &str) -> Result<MeshNetworks, MeshNetworksError> {
        let file: MeshNetworksFile = if text.trim().is_empty() {
            MeshNetworksFile::default()
        } else {
            serde_saphyr::from_str(text).map_err(|e| MeshNetworksError::Parse {
                path: origin.to_string(),
                reason: e.to_string(),
            })?
        };
        file.validate()
            .map_err(|problems| MeshNetworksError::Invalid {
                path: origin.to_string(),
                problems,
            })
    }

    /// The network a cluster's registry belongs to (`fromRegistry`).
    pub fn network_of_cluster(&self, cluster: &str) -> Option<&str> {
        self.networks
            .iter()
            .find(|(_, n)| n.registries.iter().any(|r| r == cluster))
            .map(|(name, _)| name.as_str())
    }

    /// The network whose `fromCidr` holds the address, longest prefix first.
    pub fn network_of_address(&self, ip: &IpAddr) -> Option<&str> {
        self.networks
            .iter()
            .flat_map(|(name, n)| n.cidrs.iter().map(move |c| (name, c)))
            .filter(|(_, c)| c.contains(ip))
            .max_by_key(|(_, c)| c.prefix())
            .map(|(name, _)| name.as_str())
    }
}

impl MeshNetworksFile {
    /// Check everything, reporting every problem at once.
    pub fn validate(&self) -> Result<MeshNetworks, Vec<String>> {
        let mut problems = Vec::new();
        let mut out = MeshNetworks::default();
        let mut owner: BTreeMap<&str, &str> = BTreeMap::new();
        for (name, spec) in &self.networks {
            if name.is_empty() {
                problems.push("a network has an empty name".into());
            }
            let mut net = Network::default();
            for (i, ep) in spec.endpoints.iter().enumerate() {
                let at = format!("networks.{name}.endpoints[{i}]");
                match (&ep.from_registry, &ep.from_cidr) {
                    (Some(r), None) => {
                        if let Some(first) = owner.insert(r, name) {
                            problems.push(format!(
                                "{at}: cluster {r:?} is already in network {first:?}; a cluster belongs to one network"
                            ));
                        }
                        net.registries.push(r.clone());
                    }
                    (None, Some(c)) => match c.parse::<Cidr>() {
                        Ok(c) => net.cidrs.push(c),
                        Err(e) => problems.push(format!("{at}: fromCidr: {e}")),
                    },
                    _ => problems.push(format!(
                        "{at}: give exactly one of fromRegistry or fromCidr"
                    )),
                }
            }
            for (i, gw) in spec.gateways.iter().enumerate() {
                let at = format!("networks.{name}.gateways[{i}]");
                let port = match u16::try_from(gw.port) {
                    Ok(p) if p != 0 => p,
                    _ => {
                        problems.push(format!("{at}: port {} is not 1-65535", gw.port));
                        continue;
                    }
                };
                let target = match (&gw.address, &gw.registry_service_name) {
                    (Some(a), None) => match a.parse::<IpAddr>() {
                        Ok(ip) => GatewayTarget::Ip(ip),
                        Err(_) if is_hostname(a) => GatewayTarget::Hostname(a.clone()),
                        Err(_) => {
                            problems.push(format!(
                                "{at}: address {a:?} is neither an IP nor a host name"
                            ));
                            continue;
                        }
                    },
                    (None, Some(s)) if is_hostname(s) => GatewayTarget::RegistryService(s.clone()),
                    (None, Some(s)) => {
                        problems.push(format!(
                            "{at}: registryServiceName {s:?} is not a service FQDN like \
                             istio-eastwestgateway.istio-system.svc.cluster.local"
                        ));
                        continue;
                    }
                    _ => {
                        problems.push(format!(
                            "{at}: give exactly one of address or registryServiceName"
                        ));
                        continue;
                    }
                };
                net.gateways.push(Gateway { target, port });
            }
            out.networks.insert(name.clone(), net);
        }
        if problems.is_empty() {
            Ok(out)
        } else {
            Err(problems)
        }
    }
}

fn is_hostname(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.trim_end_matches('.').split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ISTIO: &str = r#"
networks:
  network1:
    endpoints:
    - fromRegistry: cluster-1
    gateways:
    - address: 192.0.2.1
      port: 15443
  network2:
    endpoints:
    - fromRegistry: cluster-2
    - fromCidr: 10.2.0.0/16
    gateways:
    - registryServiceName: istio-eastwestgateway.istio-system.svc.cluster.local
      port: 15443
      locality: us-east1
    - address: gw.example.com
      port: 443
"#;

    #[test]
    fn parses_istio_shape() {
        let m = MeshNetworks::parse("t", ISTIO).unwrap();
        assert_eq!(m.networks.len(), 2);
        let n2 = &m.networks["network2"];
        assert_eq!(n2.registries, vec!["cluster-2"]);
        assert_eq!(n2.cidrs, vec!["10.2.0.0/16".parse().unwrap()]);
        assert_eq!(
            n2.gateways[0].target,
            GatewayTarget::RegistryService(
                "istio-eastwestgateway.istio-system.svc.cluster.local".into()
            )
        );
        assert_eq!(
            n2.gateways[1],
            Gateway {
                target: GatewayTarget::Hostname("gw.example.com".into()),
                port: 443
            }
        );
        assert_eq!(m.network_of_cluster("cluster-2"), Some("network2"));
        assert_eq!(m.network_of_cluster("cluster-9"), None);
        assert_eq!(
            m.network_of_address(&"10.2.3.4".parse().unwrap()),
            Some("network2")
        );
        assert_eq!(m.network_of_address(&"10.3.3.4".parse().unwrap()), None);
    }

    #[test]
    fn empty_file_is_no_networks() {
        assert_eq!(
            MeshNetworks::parse("t", "").unwrap(),
            MeshNetworks::default()
        );
        assert_eq!(
            MeshNetworks::parse("t", "networks: {}\n").unwrap(),
            MeshNetworks::default()
        );
    }

    #[test]
    fn reports_every_problem() {
        let bad = r#"
networks:
  a:
    endpoints:
    - fromRegistry: c1
      fromCidr: 10.0.0.0/8
    - fromCidr: nope
    - fromRegistry: c2
    gateways:
    - port: 15443
    - address: 1.2.3.4
      port: 70000
  b:
    endpoints:
    - fromRegistry: c2
"#;
        let Err(MeshNetworksError::Invalid { problems, .. }) = MeshNetworks::parse("t", bad) else {
            panic!("expected invalid");
        };
        assert_eq!(problems.len(), 5, "{problems:#?}");
        assert!(problems.iter().any(|p| p.contains("already in network")));
    }

    #[test]
    fn unknown_fields_rejected() {
        let e = MeshNetworks::parse("t", "networks:\n  a:\n    gatways: []\n").unwrap_err();
        assert!(matches!(e, MeshNetworksError::Parse { .. }), "{e}");
    }

    #[test]
    fn longest_cidr_wins() {
        let m = MeshNetworks::parse(
            "t",
            "networks:\n  wide:\n    endpoints: [{fromCidr: 10.0.0.0/8}]\n  narrow:\n    endpoints: [{fromCidr: 10.1.0.0/16}]\n",
        )
        .unwrap();
        assert_eq!(
            m.network_of_address(&"10.1.0.1".parse().unwrap()),
            Some("narrow")
        );
        assert_eq!(
            m.network_of_address(&"10.2.0.1".parse().unwrap()),
            Some("wide")
        );
    }
}
