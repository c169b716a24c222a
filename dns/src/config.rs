//! The dns server's one `Config`: flags with `DNS_*` environment fallbacks, validated as a whole
//! so every problem is reported at once.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use registry::Cidr;
use registry::admin::LogFormat;
use registry::cli::parse_duration;
use serde::Serialize;

use crate::table::TableOptions;

/// Authoritative DNS for the mesh's `.global` names.
///
/// Answers A, AAAA, SRV, SOA and NS for the served zones from ServiceEntry objects: a host's
/// `addresses`, or a stable VIP allocated from --vip-range when the entry has none. Names outside
/// the zones are REFUSED: this is not an open resolver. Put it behind CoreDNS (or kube-dns) as the
/// stub domain for each zone; see deploy/coredns/.
///
/// ServiceEntries come from the Kubernetes API (list/watch of networking.istio.io
/// serviceentries, nothing else), or from a directory of YAML files with --config-dir.
#[derive(Parser, Debug, Clone, Serialize)]
#[command(name = "dns", version, about, long_about)]
pub struct Config {
    /// Read ServiceEntry objects from YAML files in this directory (Kubernetes shapes; watched
    /// and reloaded without restart) instead of the Kubernetes API.
    #[arg(long, env = "DNS_CONFIG_DIR")]
    pub config_dir: Option<PathBuf>,

    /// Without --config-dir: the kubeconfig to reach the Kubernetes API with (default:
    /// in-cluster service account, else KUBECONFIG or ~/.kube/config).
    #[arg(long, env = "DNS_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// Without --config-dir: watch ServiceEntries only in these namespaces (repeatable, or
    /// comma-separated; default: all).
    #[arg(
        long = "watch-namespace",
        env = "DNS_WATCH_NAMESPACE",
        value_delimiter = ','
    )]
    pub watch_namespaces: Vec<String>,

    /// This cluster's id, for the Kubernetes source's metrics and /config_dump.
    #[arg(long, env = "DNS_CLUSTER_ID", default_value = "cluster-1")]
    pub cluster_id: String,

    /// How often the config directory is checked for changes.
    #[arg(long, env = "DNS_CONFIG_POLL", default_value = "500ms", value_parser = parse_duration)]
    #[serde(with = "registry::cli::duration_ms")]
    pub config_poll: Duration,

    /// DNS listener, UDP and TCP on the same address. With port 0 one free port is chosen for
    /// both.
    #[arg(long, env = "DNS_LISTEN", default_value = "0.0.0.0:53")]
    pub listen: SocketAddr,

    /// A zone this server is authoritative for (repeatable, or comma-separated).
    #[arg(
        long = "zone",
        env = "DNS_ZONE",
        default_value = "global",
        value_delimiter = ','
    )]
    pub zones: Vec<String>,

    /// TTL of answers, and of the SOA used for negative caching.
    #[arg(long, env = "DNS_TTL", default_value = "30s", value_parser = parse_duration)]
    #[serde(with = "registry::cli::duration_ms")]
    pub ttl: Duration,

    /// IPv4 range VIPs are allocated from, for entries without `addresses`.
    #[arg(long, env = "DNS_VIP_RANGE", default_value = "240.240.0.0/16")]
    #[serde(serialize_with = "display")]
    pub vip_range: Cidr,

    /// IPv6 range VIPs are allocated from (e.g. 2001:2::/48, as Istio uses); without it,
    /// address-less entries get no AAAA (NODATA), which suits IPv4-only clusters.
    #[arg(long, env = "DNS_VIP_RANGE_V6")]
    #[serde(serialize_with = "display_opt")]
    pub vip_range_v6: Option<Cidr>,

    /// Largest UDP response sent, whatever larger size a client's EDNS advertises (1232 avoids
    /// IP fragmentation, as DNS Flag Day 2020 recommends). Larger answers are truncated (TC) and
    /// the client retries over TCP.
    #[arg(long, env = "DNS_MAX_UDP_PAYLOAD", default_value_t = 1232)]
    pub max_udp_payload: u16,

    /// Close a TCP connection that sends no query for this long.
    #[arg(long, env = "DNS_TCP_IDLE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    #[serde(with = "registry::cli::duration_ms")]
    pub tcp_idle_timeout: Duration,

    /// `GET /healthz/ready`: 200 once the first config sync is done.
    #[arg(long, env = "DNS_STATUS_LISTEN", default_value = "0.0.0.0:15021")]
    pub status_listen: SocketAddr,

    /// `GET /metrics` in Prometheus text format.
    #[arg(long, env = "DNS_METRICS_LISTEN", default_value = "0.0.0.0:15020")]
    pub metrics_listen: SocketAddr,

    /// `GET /config_dump` and `GET /debug/explain?host=...`. Keep it on localhost.
    #[arg(long, env = "DNS_ADMIN_LISTEN", default_value = "127.0.0.1:15000")]
    pub admin_listen: SocketAddr,

    /// On SIGTERM, keep answering this long with readiness 503, so the Service's endpoints (and
    /// CoreDNS's forwarders) move away before the sockets close.
    #[arg(long, env = "DNS_DRAIN_DURATION", default_value = "5s", value_parser = parse_duration)]
    #[serde(with = "registry::cli::duration_ms")]
    pub drain_duration: Duration,

    /// Log format.
    #[arg(long, env = "DNS_LOG_FORMAT", value_enum, default_value = "plain")]
    pub log_format: LogFormat,
}

/// Every problem with a configuration, reported together.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
pub struct ConfigError(pub Vec<String>);

impl Config {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut errors = Vec::new();
        match &self.config_dir {
            // The Kubernetes API source.
            None => {}
            Some(d) if !d.is_dir() => errors.push(format!(
                "--config-dir {}: not a directory; does it exist?",
                d.display()
            )),
            Some(_) if self.kubeconfig.is_some() || !self.watch_namespaces.is_empty() => errors
                .push(
                    "--kubeconfig and --watch-namespace apply to the Kubernetes API source; \
                     drop them or drop --config-dir"
                        .into(),
                ),
            Some(_) => {}
        }
        if let Some(k) = &self.kubeconfig
            && !k.is_file()
        {
            errors.push(format!(
                "--kubeconfig {}: not a file; does it exist?",
                k.display()
            ));
        }
        for ns in &self.watch_namespaces {
            if !registry::naming::is_dns1123_label(ns) {
                errors.push(format!("--watch-namespace {ns:?} is not a namespace name"));
            }
        }
        if !registry::naming::is_dns1123_label(&self.cluster_id) {
            errors.push(format!(
                "--cluster-id {:?} is not a DNS label (lower-case letters, digits and `-`, \
                 e.g. cluster-1)",
                self.cluster_id
            ));
        }
        if self.zones.is_empty() {
            errors.push("--zone: at least one zone is required (e.g. global)".into());
        }
        for zone in &self.zones {
            if normalize_zone(zone).is_none() {
                errors.push(format!(
                    "--zone {zone:?} is not a DNS name (letters, digits and `-` in labels \
                     separated by dots, e.g. global)"
                ));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for zone in self.zones.iter().filter_map(|z| normalize_zone(z)) {
            if !seen.insert(zone.clone()) {
                errors.push(format!("--zone {zone} is given twice"));
            }
        }
        if self.ttl.is_zero() || self.ttl.as_secs() > u64::from(i32::MAX as u32) {
            errors.push("--ttl must be at least 1s (and below 68 years)".into());
        }
        if self.ttl.subsec_nanos() != 0 {
            errors.push("--ttl must be whole seconds".into());
        }
        if !self.vip_range.addr().is_ipv4() {
            errors.push(format!(
                "--vip-range {} is not IPv4; use --vip-range-v6 for an IPv6 range",
                self.vip_range
            ));
        } else if self.vip_range.prefix() > 30 {
            errors.push(format!(
                "--vip-range {} is too small: use at most /30 (a /16 holds 65534 VIPs)",
                self.vip_range
            ));
        }
        if let Some(v6) = &self.vip_range_v6 {
            if v6.addr().is_ipv4() {
                errors.push(format!("--vip-range-v6 {v6} is not IPv6"));
            } else if v6.prefix() > 126 {
                errors.push(format!(
                    "--vip-range-v6 {v6} is too small: use at most /126"
                ));
            }
        }
        if self.max_udp_payload < 512 {
            errors.push("--max-udp-payload must be at least 512 (RFC 1035)".into());
        }
        for (flag, d) in [
            ("--config-poll", self.config_poll),
            ("--tcp-idle-timeout", self.tcp_idle_timeout),
        ] {
            if d.is_zero() {
                errors.push(format!("{flag} must be more than 0"));
            }
        }
        let listeners = [
            ("--status-listen", self.status_listen),
            ("--metrics-listen", self.metrics_listen),
            ("--admin-listen", self.admin_listen),
        ];
        registry::cli::check_distinct_listeners(&listeners, &mut errors);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigError(errors))
        }
    }

    /// What the answer table is built with.
    pub fn table_options(&self) -> TableOptions {
        TableOptions {
            zones: self
                .zones
                .iter()
                .filter_map(|z| normalize_zone(z))
                .collect(),
            ttl: u32::try_from(self.ttl.as_secs()).unwrap_or(30),
            vip_v4: Some(self.vip_range),
            vip_v6: self.vip_range_v6,
        }
    }

    /// A config for tests reading this directory: everything on 127.0.0.1 port 0, fast polling.
    pub fn for_tests(config_dir: PathBuf) -> Config {
        let mut c = Config::for_tests_without_source();
        c.config_dir = Some(config_dir);
        c
    }

    /// A config for tests reading the Kubernetes API through this kubeconfig.
    pub fn for_tests_with_kubeconfig(kubeconfig: PathBuf) -> Config {
        let mut c = Config::for_tests_without_source();
        c.kubeconfig = Some(kubeconfig);
        c
    }

    fn for_tests_without_source() -> Config {
        let mut c = Config::parse_from(["dns"]);
        c.config_poll = Duration::from_millis(50);
        let local = SocketAddr::from(([127, 0, 0, 1], 0));
        c.listen = local;
        c.status_listen = local;
        c.metrics_listen = local;
        c.admin_listen = local;
        c.drain_duration = Duration::ZERO;
        c
    }
}

/// `Global.` -> `global`; `None` when it is not a DNS name.
pub fn normalize_zone(zone: &str) -> Option<String> {
    let z = zone.trim().trim_end_matches('.').to_ascii_lowercase();
    let ok = !z.is_empty()
        && z.len() <= 253
        && z.split('.').all(|l| {
            let b = l.as_bytes();
            !b.is_empty()
                && b.len() <= 63
                && b.iter()
                    .all(|c| c.is_ascii_alphanumeric() || *c == b'-' || *c == b'_')
                && b[0] != b'-'
                && b[b.len() - 1] != b'-'
        });
    ok.then_some(z)
}

fn display<S: serde::Serializer, T: std::fmt::Display>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

fn display_opt<S: serde::Serializer, T: std::fmt::Display>(
    v: &Option<T>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.collect_str(v),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("5 parsecs").is_err());
    }

    #[test]
    fn zones_are_normalized() {
        assert_eq!(normalize_zone("Global."), Some("global".into()));
        assert_eq!(normalize_zone("mesh.example"), Some("mesh.example".into()));
        assert_eq!(normalize_zone(""), None);
        assert_eq!(normalize_zone("a..b"), None);
        assert_eq!(normalize_zone("-bad"), None);
    }

    #[test]
    fn defaults_are_valid_with_a_config_dir() {
        let d = tempfile::tempdir().unwrap();
        let c = Config::for_tests(d.path().to_path_buf());
        c.validate().unwrap();
        let o = c.table_options();
        assert_eq!(o.zones, vec!["global".to_string()]);
        assert_eq!(o.ttl, 30);
        assert_eq!(o.vip_v4.unwrap().to_string(), "240.240.0.0/16");
        assert!(o.vip_v6.is_none());
        // The config is served on /config_dump.
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json["vip_range"], "240.240.0.0/16");
        assert_eq!(json["ttl"], "30000ms");
    }

    #[test]
    fn without_a_config_dir_the_kubernetes_api_is_read() {
        // No flags at all: in-cluster credentials (or KUBECONFIG), every namespace.
        let c = Config::parse_from(["dns"]);
        assert!(c.config_dir.is_none() && c.kubeconfig.is_none());
        assert!(c.watch_namespaces.is_empty());
        assert_eq!(c.cluster_id, "cluster-1");
        c.validate().unwrap();

        let d = tempfile::tempdir().unwrap();
        let kubeconfig = d.path().join("kubeconfig");
        std::fs::write(&kubeconfig, "apiVersion: v1\nkind: Config\n").unwrap();
        let c = Config::parse_from([
            "dns",
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
            "--watch-namespace",
            "bar",
            "--watch-namespace",
            "foo,baz",
            "--cluster-id",
            "east",
        ]);
        assert_eq!(c.watch_namespaces, ["bar", "foo", "baz"]);
        c.validate().unwrap();
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(
            json["watch_namespaces"],
            serde_json::json!(["bar", "foo", "baz"])
        );
        assert_eq!(json["cluster_id"], "east");
    }

    #[test]
    fn kubernetes_flags_conflict_with_a_config_dir() {
        let d = tempfile::tempdir().unwrap();
        let mut c = Config::for_tests(d.path().to_path_buf());
        c.watch_namespaces = vec!["bar".into()];
        let e = c.validate().unwrap_err();
        assert_eq!(e.0.len(), 1, "{e}");
        assert!(
            e.to_string()
                .contains("--kubeconfig and --watch-namespace apply to the Kubernetes API source"),
            "{e}"
        );

        let c = Config::parse_from(["dns", "--cluster-id", "Not A Label"]);
        let e = c.validate().unwrap_err();
        assert!(e.to_string().contains("--cluster-id"), "{e}");
    }

    #[test]
    fn reports_every_problem_at_once() {
        let mut c = Config::parse_from([
            "dns",
            "--zone",
            "global,bad..zone",
            "--zone",
            "GLOBAL",
            "--vip-range",
            "fd00::/64",
            "--vip-range-v6",
            "10.0.0.0/8",
            "--ttl",
            "0",
        ]);
        c.metrics_listen = c.status_listen;
        c.max_udp_payload = 100;
        c.watch_namespaces = vec!["Not_A_Namespace".into()];
        c.kubeconfig = Some(PathBuf::from("/nonexistent/kubeconfig"));
        let e = c.validate().unwrap_err();
        let text = e.to_string();
        assert_eq!(e.0.len(), 9, "{text}");
        assert!(text.contains("--kubeconfig /nonexistent/kubeconfig: not a file"));
        assert!(text.contains("--watch-namespace \"Not_A_Namespace\" is not a namespace name"));
        assert!(text.contains("\"bad..zone\" is not a DNS name"));
        assert!(text.contains("--zone global is given twice"));
        assert!(text.contains("--vip-range fd00::/64 is not IPv4"));
        assert!(text.contains("--vip-range-v6 10.0.0.0/8 is not IPv6"));
        assert!(text.contains("--ttl must be at least 1s"));
        assert!(text.contains("--max-udp-payload"));
        assert!(text.contains("--status-listen and --metrics-listen"));
    }
}
