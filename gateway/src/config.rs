//! The gateway's one `Config`: flags with `GATEWAY_*` environment fallbacks, validated as a
//! whole so every problem is reported at once.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use registry::Cidr;
use registry::admin::LogFormat;
use registry::cli::parse_duration;
use serde::Serialize;

use crate::balance::Ejection;
use crate::route::{ExportPolicy, RouteOptions};

/// SNI passthrough east-west gateway.
///
/// Accepts TLS on --listen, reads the ClientHello's server name without decrypting
/// (`outbound_.<port>_.<subset>_.<name>.<namespace>.global`, or `<name>.<namespace>.global` for a
/// single-port service), and splices the connection to a ready endpoint of that local service.
/// Only exported services are reachable (an MCS ServiceExport, or the label
/// multicluster.x-k8s.io/exported=true), unless --export-policy all.
#[derive(Parser, Debug, Clone, Serialize)]
#[command(name = "gateway", version, about, long_about)]
pub struct Config {
    /// Read Services, EndpointSlices, Pods, ServiceExports and DestinationRules from YAML files
    /// in this directory (Kubernetes shapes; watched and reloaded without restart) instead of
    /// the Kubernetes API.
    #[arg(long, env = "GATEWAY_CONFIG_DIR")]
    pub config_dir: Option<PathBuf>,

    /// Without --config-dir: the kubeconfig to reach the Kubernetes API with (default:
    /// in-cluster service account, else KUBECONFIG or ~/.kube/config).
    #[arg(long, env = "GATEWAY_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// Without --config-dir: watch only these namespaces (repeatable; default: all).
    #[arg(
        long = "watch-namespace",
        env = "GATEWAY_WATCH_NAMESPACE",
        value_delimiter = ','
    )]
    pub watch_namespaces: Vec<String>,

    /// How often the config directory is checked for changes.
    #[arg(long, env = "GATEWAY_CONFIG_POLL", default_value = "500ms", value_parser = parse_duration)]
    #[serde(with = "registry::cli::duration_ms")]
    pub config_poll: Duration,

    /// TLS passthrough listener.
    #[arg(long, env = "GATEWAY_LISTEN", default_value = "0.0.0.0:15443")]
    pub listen: SocketAddr,

    /// `GET /healthz/ready`: 200 once the first config sync is done, 503 while draining.
    #[arg(long, env = "GATEWAY_STATUS_LISTEN", default_value = "0.0.0.0:15021")]
    pub status_listen: SocketAddr,

    /// `GET /metrics` in Prometheus text format.
    #[arg(long, env = "GATEWAY_METRICS_LISTEN", default_value = "0.0.0.0:15020")]
    pub metrics_listen: SocketAddr,

    /// `GET /config_dump` and `GET /debug/explain?sni=...`. Keep it on localhost.
    #[arg(long, env = "GATEWAY_ADMIN_LISTEN", default_value = "127.0.0.1:15000")]
    pub admin_listen: SocketAddr,

    /// The cluster's DNS domain: services are `<name>.<ns>.svc.<domain-suffix>`.
    #[arg(long, env = "GATEWAY_DOMAIN_SUFFIX", default_value = "cluster.local")]
    pub domain_suffix: String,

    /// The multi-cluster suffix: `<name>.<ns>.<global-suffix>` maps to the local service.
    #[arg(long, env = "GATEWAY_GLOBAL_SUFFIX", default_value = "global")]
    pub global_suffix: String,

    /// Which services may be reached through the gateway.
    #[arg(
        long,
        env = "GATEWAY_EXPORT_POLICY",
        value_enum,
        default_value = "exported"
    )]
    pub export_policy: ExportPolicy,

    /// This cluster's id, for logs and /config_dump.
    #[arg(long, env = "GATEWAY_CLUSTER_ID", default_value = "cluster-1")]
    pub cluster_id: String,

    /// Also accept SNI hosts `<name>.<ns>.svc.<domain-suffix>` (Istio's split-horizon names).
    #[arg(long, env = "GATEWAY_ACCEPT_CLUSTER_LOCAL")]
    pub accept_cluster_local: bool,

    /// Refuse clients that offer no ALPN protocol starting with `istio` (sidecar mTLS).
    #[arg(long, env = "GATEWAY_REQUIRE_ISTIO_ALPN")]
    pub require_istio_alpn: bool,

    /// Accept connections only from these source networks (repeatable; default: any).
    #[arg(
        long = "allow-source",
        env = "GATEWAY_ALLOW_SOURCE",
        value_delimiter = ','
    )]
    #[serde(serialize_with = "display_seq")]
    pub allow_source: Vec<Cidr>,

    /// How long to wait for a complete ClientHello. Connections are accepted only once their
    /// first bytes arrive (TCP_DEFER_ACCEPT); one that sends nothing is handed over by the
    /// kernel after about this long, then the same deadline applies.
    #[arg(long, env = "GATEWAY_PEEK_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    #[serde(with = "registry::cli::duration_ms")]
    pub peek_timeout: Duration,

    /// Connect timeout to one endpoint.
    #[arg(long, env = "GATEWAY_CONNECT_TIMEOUT", default_value = "1s", value_parser = parse_duration)]
    #[serde(with = "registry::cli::duration_ms")]
    pub connect_timeout: Duration,

    /// Endpoints tried per connection before giving up (the first and up to N-1 others).
    #[arg(long, env = "GATEWAY_CONNECT_ATTEMPTS", default_value_t = 3)]
    pub connect_attempts: u32,

    /// Consecutive connect failures that eject an endpoint for a while.
    #[arg(long, env = "GATEWAY_EJECT_AFTER", default_value_t = 3)]
    pub eject_after: u32,

    /// First ejection time; doubles on each further ejection.
    #[arg(long, env = "GATEWAY_EJECT_BASE", default_value = "5s", value_parser = parse_duration)]
    #[serde(with = "registry::cli::duration_ms")]
    pub eject_base: Duration,

    /// Longest ejection time.
    #[arg(long, env = "GATEWAY_EJECT_MAX", default_value = "2m", value_parser = parse_duration)]
    #[serde(with = "registry::cli::duration_ms")]
    pub eject_max: Duration,

    /// Close a connection after this long with no byte in either direction.
    #[arg(long, env = "GATEWAY_IDLE_TIMEOUT", default_value = "1h", value_parser = parse_duration)]
    #[serde(with = "registry::cli::duration_ms")]
    pub idle_timeout: Duration,

    /// Most connections at once; further ones are closed at accept (default: no limit).
    #[arg(long, env = "GATEWAY_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,

    /// Proxy threads, each with its own event loop and its own listener on --listen
    /// (SO_REUSEPORT: the kernel spreads connections over them), so a connection never wakes
    /// another thread. Default: one per CPU.
    #[arg(long, env = "GATEWAY_WORKERS")]
    pub workers: Option<usize>,

    /// On SIGTERM, keep accepting this long with readiness 503 so load balancers move away.
    #[arg(long, env = "GATEWAY_DRAIN_DURATION", default_value = "5s", value_parser = parse_duration)]
    #[serde(with = "registry::cli::duration_ms")]
    pub drain_duration: Duration,

    /// After the drain, how long in-flight connections may continue before they are closed.
    /// Set the pod's terminationGracePeriodSeconds above drain + this.
    #[arg(long, env = "GATEWAY_TERMINATION_DEADLINE", default_value = "30s", value_parser = parse_duration)]
    #[serde(with = "registry::cli::duration_ms")]
    pub termination_deadline: Duration,

    /// Log format.
    #[arg(long, env = "GATEWAY_LOG_FORMAT", value_enum, default_value = "plain")]
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
        for (flag, value) in [
            ("--global-suffix", &self.global_suffix),
            ("--domain-suffix", &self.domain_suffix),
        ] {
            let ok = !value.is_empty() && value.split('.').all(registry::naming::is_dns1123_label);
            if !ok {
                errors.push(format!(
                    "{flag} {value:?} is not a DNS name (lower-case labels separated by dots)"
                ));
            }
        }
        for (flag, d) in [
            ("--peek-timeout", self.peek_timeout),
            ("--connect-timeout", self.connect_timeout),
            ("--idle-timeout", self.idle_timeout),
            ("--config-poll", self.config_poll),
        ] {
            if d.is_zero() {
                errors.push(format!("{flag} must be more than 0"));
            }
        }
        if self.connect_attempts == 0 {
            errors.push("--connect-attempts must be at least 1".into());
        }
        if self.eject_base > self.eject_max {
            errors.push("--eject-base must not exceed --eject-max".into());
        }
        if self.workers == Some(0) {
            errors.push("--workers must be at least 1".into());
        }
        if self.max_connections == Some(0) {
            errors.push("--max-connections must be at least 1 (omit it for no limit)".into());
        }
        let listeners = [
            ("--listen", self.listen),
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

    pub fn route_options(&self) -> RouteOptions {
        RouteOptions {
            global_suffix: self.global_suffix.clone(),
            domain_suffix: self.domain_suffix.clone(),
            export_policy: self.export_policy,
            accept_cluster_local: self.accept_cluster_local,
            require_istio_alpn: self.require_istio_alpn,
        }
    }

    pub fn ejection(&self) -> Ejection {
        Ejection {
            after_failures: self.eject_after,
            base: self.eject_base,
            max: self.eject_max,
        }
    }

    /// A config for tests: everything on 127.0.0.1 port 0, short timers.
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
        let mut c = Config::parse_from(["gateway"]);
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

fn display_seq<S: serde::Serializer, T: std::fmt::Display>(
    v: &[T],
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_seq(v.iter().map(|x| x.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_every_problem_at_once() {
        let mut c = Config::parse_from(["gateway", "--global-suffix", "Bad_Suffix"]);
        c.connect_attempts = 0;
        c.metrics_listen = c.status_listen;
        let e = c.validate().unwrap_err();
        c.watch_namespaces = vec!["Not_A_Namespace".into()];
        assert_eq!(e.0.len(), 3, "{e}");
        let e = c.validate().unwrap_err();
        assert!(e.to_string().contains("--watch-namespace"), "{e}");
        assert!(
            e.to_string()
                .contains("--status-listen and --metrics-listen")
        );
    }
}
