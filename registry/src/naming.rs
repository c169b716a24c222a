//! Names: Istio's SNI and cluster-name forms, and `.global` <-> `<name>.<ns>.svc.<domain>`.
//!
//! - SNI: `outbound_.<port>_.<subset>_.<host>` (Istio's `BuildDNSSrvSubsetKey`: fields joined
//!   by `_.`, so no subset reads `outbound_.8000_._.host`), or a plain `<host>`.
//! - Cluster names: `outbound|<port>|<subset>|<host>`, empty subset for none.
//! - A global host is `<name>.<namespace>.<global-suffix>`.

use std::fmt;

/// A TLS server name as the gateway understands it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SniForm<'a> {
    /// `outbound_.<port>_.<subset>_.<host>`
    Outbound {
        port: u16,
        subset: Option<&'a str>,
        host: &'a str,
    },
    /// A bare host name.
    Plain(&'a str),
}

/// Why a string is not one of the accepted SNI forms.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SniError {
    #[error("SNI starts with `outbound_.` but is not `outbound_.<port>_.<subset>_.<host>`")]
    MalformedOutbound,
    #[error("SNI port `{0}` is not a number between 1 and 65535")]
    BadPort(String),
    #[error("SNI is empty")]
    Empty,
}

/// Parse a server name into one of the two accepted forms. Expects lower case (SNI is
/// case-insensitive; callers lower-case once).
pub fn parse_sni(sni: &str) -> Result<SniForm<'_>, SniError> {
    if sni.is_empty() {
        return Err(SniError::Empty);
    }
    let Some(rest) = sni.strip_prefix("outbound_.") else {
        return Ok(SniForm::Plain(sni));
    };
    let (port, rest) = rest.split_once("_.").ok_or(SniError::MalformedOutbound)?;
    let (subset, host) = rest.split_once("_.").ok_or(SniError::MalformedOutbound)?;
    let port = match port.parse::<u16>() {
        Ok(p) if p != 0 => p,
        _ => return Err(SniError::BadPort(port.to_string())),
    };
    if host.is_empty() {
        return Err(SniError::MalformedOutbound);
    }
    // No subset is an empty field: `outbound_.8000_._.host` is `8000` `_.` `` `_.` `host`.
    let subset = (!subset.is_empty()).then_some(subset);
    Ok(SniForm::Outbound { port, subset, host })
}

/// `outbound_.8000_._.httpbin.bar.global`
pub fn format_outbound_sni(port: u16, subset: Option<&str>, host: &str) -> String {
    format!("outbound_.{port}_.{}_.{host}", subset.unwrap_or(""))
}

/// An Istio cluster name: `outbound|8000|v2|httpbin.bar.global`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClusterName {
    pub port: u16,
    pub subset: Option<String>,
    pub host: String,
}

impl ClusterName {
    pub fn parse(s: &str) -> Option<ClusterName> {
        let mut parts = s.splitn(4, '|');
        if parts.next()? != "outbound" {
            return None;
        }
        let port = parts.next()?.parse().ok().filter(|p| *p != 0)?;
        let subset = parts.next()?;
        let host = parts.next()?;
        if host.is_empty() {
            return None;
        }
        Some(ClusterName {
            port,
            subset: (!subset.is_empty()).then(|| subset.to_string()),
            host: host.to_string(),
        })
    }
}

impl fmt::Display for ClusterName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "outbound|{}|{}|{}",
            self.port,
            self.subset.as_deref().unwrap_or(""),
            self.host
        )
    }
}

/// A service named by namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct ServiceName {
    pub namespace: String,
    pub name: String,
}

impl ServiceName {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        ServiceName {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// `httpbin.bar.svc.cluster.local`
    pub fn local_fqdn(&self, domain_suffix: &str) -> String {
        format!("{}.{}.svc.{}", self.name, self.namespace, domain_suffix)
    }

    /// `httpbin.bar.global`
    pub fn global_host(&self, global_suffix: &str) -> String {
        format!("{}.{}.{}", self.name, self.namespace, global_suffix)
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// `httpbin.bar.global` -> (`bar`, `httpbin`) when it is exactly `<name>.<ns>.<suffix>`.
pub fn parse_global_host<'a>(host: &'a str, global_suffix: &str) -> Option<(&'a str, &'a str)> {
    let stem = host.strip_suffix(global_suffix)?.strip_suffix('.')?;
    let (name, namespace) = stem.split_once('.')?;
    if name.is_empty() || namespace.is_empty() || namespace.contains('.') {
        return None;
    }
    Some((namespace, name))
}

/// `httpbin.bar.svc.cluster.local` -> (`bar`, `httpbin`).
pub fn parse_local_fqdn<'a>(host: &'a str, domain_suffix: &str) -> Option<(&'a str, &'a str)> {
    let stem = host.strip_suffix(domain_suffix)?.strip_suffix(".svc.")?;
    let (name, namespace) = stem.split_once('.')?;
    if name.is_empty() || namespace.is_empty() || namespace.contains('.') {
        return None;
    }
    Some((namespace, name))
}

/// The service a host written in an Istio resource means, as Istio reads short names: `name`
/// (in the resource's namespace), `name.ns`, `name.ns.svc[.anything]`, or `name.ns.<suffix>`
/// with a single-label suffix such as `global`.
pub fn resolve_service_host(host: &str, resource_namespace: &str) -> Option<ServiceName> {
    let parts: Vec<&str> = host.split('.').collect();
    if parts.iter().any(|p| p.is_empty() || *p == "*") {
        return None;
    }
    match parts.as_slice() {
        [name] => Some(ServiceName::new(resource_namespace, *name)),
        [name, ns] | [name, ns, _] => Some(ServiceName::new(*ns, *name)),
        [name, ns, "svc", ..] => Some(ServiceName::new(*ns, *name)),
        _ => None,
    }
}

/// Whether `s` is a DNS-1123 label (lower-case alphanumerics and `-`, at most 63, starting and
/// ending alphanumeric): what Kubernetes and Istio require of cluster ids and namespaces.
pub fn is_dns1123_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sni_forms() {
        assert_eq!(
            parse_sni("outbound_.8000_._.httpbin.bar.global"),
            Ok(SniForm::Outbound {
                port: 8000,
                subset: None,
                host: "httpbin.bar.global"
            })
        );
        assert_eq!(
            parse_sni("outbound_.8000_.v2_.httpbin.bar.global"),
            Ok(SniForm::Outbound {
                port: 8000,
                subset: Some("v2"),
                host: "httpbin.bar.global"
            })
        );
        assert_eq!(
            parse_sni("httpbin.bar.global"),
            Ok(SniForm::Plain("httpbin.bar.global"))
        );
        assert_eq!(
            parse_sni("outbound_.0_._.a.b.global"),
            Err(SniError::BadPort("0".into()))
        );
        assert_eq!(
            parse_sni("outbound_.70000_._.a.b.global"),
            Err(SniError::BadPort("70000".into()))
        );
        assert_eq!(
            parse_sni("outbound_.80_.a.b.global"),
            Err(SniError::MalformedOutbound)
        );
        assert_eq!(
            parse_sni("outbound_.80_._."),
            Err(SniError::MalformedOutbound)
        );
        assert_eq!(parse_sni(""), Err(SniError::Empty));
        for (p, s, h) in [(8000, None, "a.b.global"), (1, Some("v1"), "x.y.global")] {
            let f = format_outbound_sni(p, s, h);
            assert_eq!(
                parse_sni(&f),
                Ok(SniForm::Outbound {
                    port: p,
                    subset: s,
                    host: h
                })
            );
        }
    }

    #[test]
    fn cluster_names_round_trip() {
        for s in [
            "outbound|8000||httpbin.bar.global",
            "outbound|8000|v2|httpbin.bar.svc.cluster.local",
        ] {
            assert_eq!(ClusterName::parse(s).unwrap().to_string(), s);
        }
        assert!(ClusterName::parse("inbound|8000||x").is_none());
        assert!(ClusterName::parse("outbound|x||x").is_none());
        assert!(ClusterName::parse("outbound|80||").is_none());
    }

    #[test]
    fn global_and_local_hosts() {
        assert_eq!(
            parse_global_host("httpbin.bar.global", "global"),
            Some(("bar", "httpbin"))
        );
        assert_eq!(parse_global_host("bar.global", "global"), None);
        assert_eq!(parse_global_host("a.b.c.global", "global"), None);
        assert_eq!(parse_global_host("httpbin.bar.globalx", "global"), None);
        assert_eq!(parse_global_host("httpbin.barglobal", "global"), None);
        assert_eq!(
            parse_global_host("httpbin.bar.mesh.example", "mesh.example"),
            Some(("bar", "httpbin"))
        );
        let s = ServiceName::new("bar", "httpbin");
        assert_eq!(
            s.local_fqdn("cluster.local"),
            "httpbin.bar.svc.cluster.local"
        );
        assert_eq!(s.global_host("global"), "httpbin.bar.global");
        assert_eq!(
            parse_local_fqdn("httpbin.bar.svc.cluster.local", "cluster.local"),
            Some(("bar", "httpbin"))
        );
        assert_eq!(
            parse_local_fqdn("httpbin.bar.svc.other", "cluster.local"),
            None
        );
    }

    #[test]
    fn istio_short_names() {
        let n = |h| resolve_service_host(h, "ns1");
        assert_eq!(n("httpbin"), Some(ServiceName::new("ns1", "httpbin")));
        assert_eq!(n("httpbin.bar"), Some(ServiceName::new("bar", "httpbin")));
        assert_eq!(
            n("httpbin.bar.global"),
            Some(ServiceName::new("bar", "httpbin"))
        );
        assert_eq!(
            n("httpbin.bar.svc.cluster.local"),
            Some(ServiceName::new("bar", "httpbin"))
        );
        assert_eq!(n("*.bar.global"), None);
        assert_eq!(n("a.b.c.d"), None);
    }

    #[test]
    fn dns1123() {
        assert!(is_dns1123_label("cluster-1"));
        assert!(!is_dns1123_label("Cluster1"));
        assert!(!is_dns1123_label("-a"));
        assert!(!is_dns1123_label(""));
        assert!(!is_dns1123_label(&"a".repeat(64)));
    }
}
