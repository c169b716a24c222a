//! The dns server's one `Config`: the shared process flags (source, listeners, lifecycle, logs)
//! flattened in beside its own, every flag with a `DNS_*` environment fallback, validated as a
//! whole so every problem is reported at once.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use process_shell::ConfigError;
use process_shell::flags::{
    LifecycleDefaults, LifecycleFlags, ListenFlags, LogFlags, Namespaces, Problems, SourceFlags,
    display, display_opt, duration_ms, parse_duration,
};
use registry::Cidr;
use serde::Serialize;

use crate::table::TableOptions;

/// Every flag `--foo-bar` also reads `DNS_FOO_BAR`.
pub const ENV_PREFIX: &str = "DNS";

/// dns's drain and deadline defaults: the pod's terminationGracePeriodSeconds (15 in
/// deploy/base/dns.yaml) is above 5 s + 2 s; a TCP query in flight takes milliseconds, and a
/// slow client must not hold the pod past its grace period.
#[derive(Clone, Debug)]
pub struct DnsLifecycle;

impl LifecycleDefaults for DnsLifecycle {
    const DRAIN_DURATION: &'static str = "5s";
    const TERMINATION_DEADLINE: &'static str = "2s";
}

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
    #[command(flatten)]
    #[serde(flatten)]
    pub source: SourceFlags,

    /// This cluster's id, for the Kubernetes source's metrics and /config_dump.
    #[arg(long, default_value = "cluster-1")]
    pub cluster_id: String,

    /// DNS listener, UDP and TCP on the same address. With port 0 one free port is chosen for
    /// both.
    #[arg(long, default_value = "0.0.0.0:53")]
    pub listen: SocketAddr,

    /// A zone this server is authoritative for (repeatable, or comma-separated).
    #[arg(long = "zone", default_value = "global", value_delimiter = ',')]
    pub zones: Vec<String>,

    /// TTL of answers, and of the SOA used for negative caching.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    #[serde(with = "duration_ms")]
    pub ttl: Duration,

    /// IPv4 range VIPs are allocated from, for entries without `addresses`.
    #[arg(long, default_value = "240.240.0.0/16")]
    #[serde(serialize_with = "display")]
    pub vip_range: Cidr,

    /// IPv6 range VIPs are allocated from (e.g. 2001:2::/48, as Istio uses); without it,
    /// address-less entries get no AAAA (NODATA), which suits IPv4-only clusters.
    #[arg(long)]
    #[serde(serialize_with = "display_opt")]
    pub vip_range_v6: Option<Cidr>,

    /// Largest UDP response sent, whatever larger size a client's EDNS advertises (1232 avoids
    /// IP fragmentation, as DNS Flag Day 2020 recommends). Larger answers are truncated (TC) and
    /// the client retries over TCP.
    #[arg(long, default_value_t = 1232)]
    pub max_udp_payload: u16,

    /// Close a TCP connection that sends no query for this long.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    #[serde(with = "duration_ms")]
    pub tcp_idle_timeout: Duration,

    #[command(flatten)]
    #[serde(flatten)]
    pub listeners: ListenFlags,

    #[command(flatten)]
    #[serde(flatten)]
    pub lifecycle: LifecycleFlags<DnsLifecycle>,

    #[command(flatten)]
    #[serde(flatten)]
    pub log: LogFlags,
}

impl Config {
    /// This process's flags, with their `DNS_*` fallbacks.
    pub fn from_args() -> Config {
        process_shell::flags::parse(ENV_PREFIX)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut p = Problems::default();
        self.source.check(&mut p, Namespaces::LocalApiOnly);
        p.dns_label("--cluster-id", &self.cluster_id);
        if self.zones.is_empty() {
            p.push("--zone: at least one zone is required (e.g. global)");
        }
        for zone in &self.zones {
            if normalize_zone(zone).is_none() {
                p.push(format!(
                    "--zone {zone:?} is not a DNS name (letters, digits and `-` in labels \
                     separated by dots, e.g. global)"
                ));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for zone in self.zones.iter().filter_map(|z| normalize_zone(z)) {
            if !seen.insert(zone.clone()) {
                p.push(format!("--zone {zone} is given twice"));
            }
        }
        if self.ttl.is_zero() || self.ttl.as_secs() > u64::from(i32::MAX as u32) {
            p.push("--ttl must be at least 1s (and below 68 years)");
        }
        if self.ttl.subsec_nanos() != 0 {
            p.push("--ttl must be whole seconds");
        }
        if !self.vip_range.addr().is_ipv4() {
            p.push(format!(
                "--vip-range {} is not IPv4; use --vip-range-v6 for an IPv6 range",
                self.vip_range
            ));
        } else if self.vip_range.prefix() > 30 {
            p.push(format!(
                "--vip-range {} is too small: use at most /30 (a /16 holds 65534 VIPs)",
                self.vip_range
            ));
        }
        if let Some(v6) = &self.vip_range_v6 {
            if v6.addr().is_ipv4() {
                p.push(format!("--vip-range-v6 {v6} is not IPv6"));
            } else if v6.prefix() > 126 {
                p.push(format!(
                    "--vip-range-v6 {v6} is too small: use at most /126"
                ));
            }
        }
        if self.max_udp_payload < 512 {
            p.push("--max-udp-payload must be at least 512 (RFC 1035)");
        }
        p.positive("--tcp-idle-timeout", self.tcp_idle_timeout);
        p.distinct_listeners(&self.listeners.named());
        p.finish()
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
        Config::for_tests_with(SourceFlags::dir_for_tests(config_dir))
    }

    /// A config for tests reading the Kubernetes API through this kubeconfig.
    pub fn for_tests_with_kubeconfig(kubeconfig: PathBuf) -> Config {
        Config::for_tests_with(SourceFlags::kubeconfig_for_tests(kubeconfig))
    }

    fn for_tests_with(source: SourceFlags) -> Config {
        let mut c = Config::parse_from(["dns"]);
        c.source = source;
        c.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        c.listeners = ListenFlags::for_tests();
        c.lifecycle = LifecycleFlags::for_tests();
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
        assert!(c.source.config_dir.is_none() && c.source.kubeconfig.is_none());
        assert!(c.source.watch_namespaces.is_empty());
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
        assert_eq!(c.source.watch_namespaces, ["bar", "foo", "baz"]);
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
        c.source.watch_namespaces = vec!["bar".into()];
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
        c.listeners.metrics_listen = c.listeners.status_listen;
        c.max_udp_payload = 100;
        c.source.watch_namespaces = vec!["Not_A_Namespace".into()];
        c.source.kubeconfig = Some(PathBuf::from("/nonexistent/kubeconfig"));
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
