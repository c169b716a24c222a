//! The gateway's one `Config`: the shared process flags (source, listeners, lifecycle, logs)
//! flattened in beside the gateway's own, every flag with a `GATEWAY_*` environment fallback,
//! validated as a whole so every problem is reported at once.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use process_shell::ConfigError;
use process_shell::flags::{
    LifecycleDefaults, LifecycleFlags, ListenFlags, LogFlags, Namespaces, Problems, SourceFlags,
    display_seq, duration_ms, parse_duration,
};
use registry::Cidr;
use serde::Serialize;

use crate::balance::Ejection;
use crate::route::{ExportPolicy, RouteOptions};

/// Every flag `--foo-bar` also reads `GATEWAY_FOO_BAR`.
pub const ENV_PREFIX: &str = "GATEWAY";

/// The gateway's drain and deadline defaults: the pod's terminationGracePeriodSeconds (45 in
/// deploy/base/gateway.yaml) is above 5 s + 30 s.
#[derive(Clone, Debug)]
pub struct GatewayLifecycle;

impl LifecycleDefaults for GatewayLifecycle {
    const DRAIN_DURATION: &'static str = "5s";
    const TERMINATION_DEADLINE: &'static str = "30s";
}

/// SNI passthrough east-west gateway.
///
/// Accepts TLS on --listen, reads the ClientHello's server name without decrypting
/// (`outbound_.<port>_.<subset>_.<name>.<namespace>.global`, or `<name>.<namespace>.global` for a
/// single-port service), and splices the connection to a ready endpoint of that local service.
/// Only exported services are reachable (an MCS ServiceExport, or the label
/// multicluster.x-k8s.io/exported=true), unless --export-policy all.
///
/// Reads Services, EndpointSlices, Pods, ServiceExports and DestinationRules, from the
/// Kubernetes API or, with --config-dir, from YAML files.
#[derive(Parser, Debug, Clone, Serialize)]
#[command(name = "gateway", version, about, long_about)]
pub struct Config {
    #[command(flatten)]
    #[serde(flatten)]
    pub source: SourceFlags,

    /// TLS passthrough listener.
    #[arg(long, default_value = "0.0.0.0:15443")]
    pub listen: SocketAddr,

    #[command(flatten)]
    #[serde(flatten)]
    pub listeners: ListenFlags,

    /// The cluster's DNS domain: services are `<name>.<ns>.svc.<domain-suffix>`.
    #[arg(long, default_value = "cluster.local")]
    pub domain_suffix: String,

    /// The multi-cluster suffix: `<name>.<ns>.<global-suffix>` maps to the local service.
    #[arg(long, default_value = "global")]
    pub global_suffix: String,

    /// Which services may be reached through the gateway.
    #[arg(long, value_enum, default_value = "exported")]
    pub export_policy: ExportPolicy,

    /// This cluster's id, for logs, the Kubernetes source's metrics and /config_dump.
    #[arg(long, default_value = "cluster-1")]
    pub cluster_id: String,

    /// Also accept SNI hosts `<name>.<ns>.svc.<domain-suffix>` (Istio's split-horizon names).
    #[arg(long)]
    pub accept_cluster_local: bool,

    /// Refuse clients that offer no ALPN protocol starting with `istio` (sidecar mTLS).
    #[arg(long)]
    pub require_istio_alpn: bool,

    /// Accept connections only from these source networks (repeatable; default: any).
    #[arg(long = "allow-source", value_delimiter = ',')]
    #[serde(serialize_with = "display_seq")]
    pub allow_source: Vec<Cidr>,

    /// How long to wait for a complete ClientHello. Connections are accepted only once their
    /// first bytes arrive (TCP_DEFER_ACCEPT); one that sends nothing is handed over by the
    /// kernel after about this long, then the same deadline applies.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    #[serde(with = "duration_ms")]
    pub peek_timeout: Duration,

    /// Connect timeout to one endpoint.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    #[serde(with = "duration_ms")]
    pub connect_timeout: Duration,

    /// Endpoints tried per connection before giving up (the first and up to N-1 others).
    #[arg(long, default_value_t = 3)]
    pub connect_attempts: u32,

    /// Consecutive connect failures that eject an endpoint for a while.
    #[arg(long, default_value_t = 3)]
    pub eject_after: u32,

    /// First ejection time; doubles on each further ejection.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    #[serde(with = "duration_ms")]
    pub eject_base: Duration,

    /// Longest ejection time.
    #[arg(long, default_value = "2m", value_parser = parse_duration)]
    #[serde(with = "duration_ms")]
    pub eject_max: Duration,

    /// Close a connection after this long with no byte in either direction.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    #[serde(with = "duration_ms")]
    pub idle_timeout: Duration,

    /// Most routed connections at once (taken once the ClientHello is read and routed, held
    /// until the connection ends); further ones are refused (default: no limit).
    #[arg(long)]
    pub max_connections: Option<usize>,

    /// Most connections still reading their ClientHello; further ones are closed at accept.
    /// Slow clients hold a slot for at most --peek-timeout.
    #[arg(long, default_value_t = 2048)]
    pub max_peeking: usize,

    /// Most connections from one source address still reading their ClientHello, so one slow
    /// or hostile client cannot take the whole --max-peeking budget.
    #[arg(long, default_value_t = 128)]
    pub max_peeking_per_source: u32,

    /// Proxy threads, each with its own event loop and its own listener on --listen
    /// (SO_REUSEPORT: the kernel spreads connections over them), so a connection never wakes
    /// another thread. Default: one per CPU.
    #[arg(long)]
    pub workers: Option<usize>,

    #[command(flatten)]
    #[serde(flatten)]
    pub lifecycle: LifecycleFlags<GatewayLifecycle>,

    #[command(flatten)]
    #[serde(flatten)]
    pub log: LogFlags,
}

impl Config {
    /// This process's flags, with their `GATEWAY_*` fallbacks.
    pub fn from_args() -> Config {
        process_shell::flags::parse(ENV_PREFIX)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut p = Problems::default();
        self.source.check(&mut p, Namespaces::LocalApiOnly);
        p.dns_label("--cluster-id", &self.cluster_id);
        p.dns_name("--global-suffix", &self.global_suffix);
        p.dns_name("--domain-suffix", &self.domain_suffix);
        p.positive("--peek-timeout", self.peek_timeout);
        p.positive("--connect-timeout", self.connect_timeout);
        p.positive("--idle-timeout", self.idle_timeout);
        if self.connect_attempts == 0 {
            p.push("--connect-attempts must be at least 1");
        }
        if self.eject_base > self.eject_max {
            p.push("--eject-base must not exceed --eject-max");
        }
        if self.workers == Some(0) {
            p.push("--workers must be at least 1");
        }
        if self.max_connections == Some(0) {
            p.push("--max-connections must be at least 1 (omit it for no limit)");
        }
        if self.max_peeking == 0 || self.max_peeking_per_source == 0 {
            p.push("--max-peeking and --max-peeking-per-source must be at least 1");
        }
        let mut listeners = vec![("--listen", self.listen)];
        listeners.extend(self.listeners.named());
        p.distinct_listeners(&listeners);
        p.finish()
    }

    pub fn route_options(&self) -> Arc<RouteOptions> {
        Arc::new(RouteOptions {
            global_suffix: self.global_suffix.clone(),
            domain_suffix: self.domain_suffix.clone(),
            export_policy: self.export_policy,
            accept_cluster_local: self.accept_cluster_local,
            require_istio_alpn: self.require_istio_alpn,
            allow_source: self.allow_source.clone(),
        })
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
        Config::for_tests_with(SourceFlags::dir_for_tests(config_dir))
    }

    /// A config for tests reading the Kubernetes API through this kubeconfig.
    pub fn for_tests_with_kubeconfig(kubeconfig: PathBuf) -> Config {
        Config::for_tests_with(SourceFlags::kubeconfig_for_tests(kubeconfig))
    }

    fn for_tests_with(source: SourceFlags) -> Config {
        let mut c = Config::parse_from(["gateway"]);
        c.source = source;
        c.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        c.listeners = ListenFlags::for_tests();
        c.lifecycle = LifecycleFlags::for_tests();
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_every_problem_at_once() {
        let mut c = Config::parse_from(["gateway", "--global-suffix", "Bad_Suffix"]);
        c.connect_attempts = 0;
        c.listeners.metrics_listen = c.listeners.status_listen;
        let e = c.validate().unwrap_err();
        c.source.watch_namespaces = vec!["Not_A_Namespace".into()];
        assert_eq!(e.0.len(), 3, "{e}");
        let e = c.validate().unwrap_err();
        assert!(e.to_string().contains("--watch-namespace"), "{e}");
        assert!(
            e.to_string()
                .contains("--status-listen and --metrics-listen")
        );
    }
}
