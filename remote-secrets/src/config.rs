//! One `Config` per subcommand: flags with `REMOTE_SECRETS_*` environment fallbacks, validated as
//! a whole so every problem is reported at once.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::{Parser, Subcommand};
use registry::admin::LogFormat;
use registry::cli::parse_duration;
use registry::naming::is_dns1123_label;
use serde::Serialize;

use crate::certs::CertsCommand;
use crate::remote_secret::CreateRemoteSecretConfig;

/// Multi-cluster control plane: remote clusters from kubeconfig Secrets, split-horizon EDS over
/// xDS, and the shared root CA.
#[derive(Parser, Debug)]
#[command(name = "remote-secrets", version, about, long_about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the control plane of one cluster.
    Serve(Box<ServeConfig>),
    /// Print the Secret that lets another cluster's control plane watch this cluster.
    CreateRemoteSecret(CreateRemoteSecretConfig),
    /// Create the shared root CA, per-cluster intermediates and test workload certificates.
    #[command(subcommand)]
    Certs(CertsCommand),
}

/// `CLUSTER_ID=DIR`: a file-backed remote cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RemoteDir {
    pub cluster_id: String,
    pub dir: PathBuf,
}

impl FromStr for RemoteDir {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (id, dir) = s
            .split_once('=')
            .ok_or_else(|| format!("`{s}` is not CLUSTER_ID=DIR"))?;
        Ok(RemoteDir {
            cluster_id: id.to_string(),
            dir: PathBuf::from(dir),
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ExportPolicy {
    /// Remote endpoints count only for services exported in their cluster (ServiceExport or the
    /// multicluster.x-k8s.io/exported=true label): the gateway refuses the others.
    Exported,
    /// Every service (for gateways run with --export-policy all).
    All,
}

/// `remote-secrets serve`: the control plane of one cluster.
///
/// Reads the local cluster (--config-dir), remote clusters (--remote-config-dir, and kubeconfig
/// Secrets labelled istio/multiCluster=true in --secrets-namespace), the mesh networks
/// (--mesh-networks), and serves split-horizon EDS over xDS.
#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct ServeConfig {
    /// This cluster's id (a DNS-1123 label), as the other clusters' secrets name it.
    #[arg(long, env = "REMOTE_SECRETS_CLUSTER_ID")]
    pub cluster_id: String,

    /// This cluster's network (Istio's topology.istio.io/network).
    #[arg(long, env = "REMOTE_SECRETS_NETWORK")]
    pub network: String,

    /// The local cluster's objects as YAML (Services, EndpointSlices, Pods, DestinationRules,
    /// ServiceExports, Secrets), watched, instead of the Kubernetes API.
    #[arg(long, env = "REMOTE_SECRETS_CONFIG_DIR")]
    pub config_dir: Option<PathBuf>,

    /// Without --config-dir: the kubeconfig of the local cluster's API (default: in-cluster
    /// service account, else KUBECONFIG or ~/.kube/config).
    #[arg(long, env = "REMOTE_SECRETS_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// Watch only these namespaces, locally and in remote clusters (repeatable; default: all).
    /// Secrets are read in --secrets-namespace regardless.
    #[arg(
        long = "watch-namespace",
        env = "REMOTE_SECRETS_WATCH_NAMESPACE",
        value_delimiter = ','
    )]
    pub watch_namespaces: Vec<String>,

    /// A file-backed remote cluster, `CLUSTER_ID=DIR` (repeatable).
    #[arg(
        long = "remote-config-dir",
        env = "REMOTE_SECRETS_REMOTE_CONFIG_DIR",
        value_delimiter = ','
    )]
    pub remote_config_dirs: Vec<RemoteDir>,

    /// How often config directories and the mesh networks file are checked for changes.
    #[arg(long, env = "REMOTE_SECRETS_CONFIG_POLL", default_value = "500ms", value_parser = parse_duration)]
    #[serde(with = "registry::cli::duration_ms")]
    pub config_poll: Duration,

    /// Where kubeconfig Secrets (label istio/multiCluster=true) are read.
    #[arg(
        long,
        env = "REMOTE_SECRETS_SECRETS_NAMESPACE",
        default_value = "istio-system"
    )]
    pub secrets_namespace: String,

    /// Accept kubeconfigs whose users run a command (exec) or an auth-provider plugin.
    #[arg(long, env = "REMOTE_SECRETS_ALLOW_KUBECONFIG_EXEC")]
    pub allow_kubeconfig_exec: bool,

    /// Istio meshNetworks YAML (`networks: {...}`); reloaded when it changes.
    #[arg(long, env = "REMOTE_SECRETS_MESH_NETWORKS")]
    pub mesh_networks: Option<PathBuf>,

    /// The network of clients whose node metadata has no NETWORK (default: --network).
    #[arg(long, env = "REMOTE_SECRETS_DEFAULT_NETWORK")]
    pub default_network: Option<String>,

    /// xDS over plaintext gRPC.
    #[arg(
        long,
        env = "REMOTE_SECRETS_XDS_LISTEN",
        default_value = "0.0.0.0:15010"
    )]
    pub xds_listen: SocketAddr,

    /// xDS over mutual TLS; served when the three --xds-tls-* files are given.
    #[arg(
        long,
        env = "REMOTE_SECRETS_XDS_TLS_LISTEN",
        default_value = "0.0.0.0:15012"
    )]
    pub xds_tls_listen: SocketAddr,

    /// The server's certificate chain (PEM, leaf first), e.g. from `certs workload`.
    #[arg(long, env = "REMOTE_SECRETS_XDS_TLS_CERT_CHAIN")]
    pub xds_tls_cert_chain: Option<PathBuf>,

    /// The server's private key (PEM).
    #[arg(long, env = "REMOTE_SECRETS_XDS_TLS_KEY")]
    pub xds_tls_key: Option<PathBuf>,

    /// The shared root: clients must present a certificate chaining to it.
    #[arg(long, env = "REMOTE_SECRETS_XDS_TLS_ROOT_CERT")]
    pub xds_tls_root_cert: Option<PathBuf>,

    /// Quiet time before a burst of changes is pushed.
    #[arg(long, env = "REMOTE_SECRETS_DEBOUNCE", default_value = "100ms", value_parser = parse_duration)]
    #[serde(with = "registry::cli::duration_ms")]
    pub debounce: Duration,

    /// Longest a burst may delay a push.
    #[arg(long, env = "REMOTE_SECRETS_DEBOUNCE_MAX", default_value = "1s", value_parser = parse_duration)]
    #[serde(with = "registry::cli::duration_ms")]
    pub debounce_max: Duration,

    /// How often gateway host names are resolved again.
    #[arg(long, env = "REMOTE_SECRETS_DNS_REFRESH", default_value = "30s", value_parser = parse_duration)]
    #[serde(with = "registry::cli::duration_ms")]
    pub dns_refresh: Duration,

    /// Which remote services count (see the gateway's flag of the same name).
    #[arg(
        long,
        env = "REMOTE_SECRETS_EXPORT_POLICY",
        value_enum,
        default_value = "exported"
    )]
    pub export_policy: ExportPolicy,

    /// The cluster DNS domain: services are `<name>.<ns>.svc.<domain-suffix>`.
    #[arg(
        long,
        env = "REMOTE_SECRETS_DOMAIN_SUFFIX",
        default_value = "cluster.local"
    )]
    pub domain_suffix: String,

    /// The multi-cluster suffix: `<name>.<ns>.<global-suffix>`.
    #[arg(long, env = "REMOTE_SECRETS_GLOBAL_SUFFIX", default_value = "global")]
    pub global_suffix: String,

    /// `GET /healthz/ready`: 200 once the local cluster is synced (never waits on remotes).
    #[arg(
        long,
        env = "REMOTE_SECRETS_STATUS_LISTEN",
        default_value = "0.0.0.0:15021"
    )]
    pub status_listen: SocketAddr,

    /// `GET /metrics`.
    #[arg(
        long,
        env = "REMOTE_SECRETS_METRICS_LISTEN",
        default_value = "0.0.0.0:15020"
    )]
    pub metrics_listen: SocketAddr,

    /// `GET /config_dump`, `GET /debug/explain?host=...&network=...`. Keep it on localhost.
    #[arg(
        long,
        env = "REMOTE_SECRETS_ADMIN_LISTEN",
        default_value = "127.0.0.1:15000"
    )]
    pub admin_listen: SocketAddr,

    #[arg(
        long,
        env = "REMOTE_SECRETS_LOG_FORMAT",
        value_enum,
        default_value = "plain"
    )]
    pub log_format: LogFormat,
}

/// Every problem with a configuration, reported together.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
pub struct ConfigError(pub Vec<String>);

impl ServeConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut errors = Vec::new();
        if !is_dns1123_label(&self.cluster_id) {
            errors.push(format!(
                "--cluster-id {:?} is not a DNS-1123 label (lower-case letters, digits, '-')",
                self.cluster_id
            ));
        }
        if self.network.is_empty() {
            errors.push("--network must not be empty".into());
        }
        match &self.config_dir {
            None => {}
            Some(d) if !d.is_dir() => errors.push(format!(
                "--config-dir {}: not a directory; does it exist?",
                d.display()
            )),
            Some(_) if self.kubeconfig.is_some() => errors.push(
                "--kubeconfig names the local cluster's API; drop it or drop --config-dir".into(),
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
            if !is_dns1123_label(ns) {
                errors.push(format!("--watch-namespace {ns:?} is not a namespace name"));
            }
        }
        let mut seen = vec![self.cluster_id.as_str()];
        for r in &self.remote_config_dirs {
            if !is_dns1123_label(&r.cluster_id) {
                errors.push(format!(
                    "--remote-config-dir {}: cluster id is not a DNS-1123 label",
                    r.cluster_id
                ));
            }
            if seen.contains(&r.cluster_id.as_str()) {
                errors.push(format!(
                    "--remote-config-dir {}: cluster id used twice (or is --cluster-id)",
                    r.cluster_id
                ));
            }
            seen.push(&r.cluster_id);
            if !r.dir.is_dir() {
                errors.push(format!(
                    "--remote-config-dir {}={}: not a directory",
                    r.cluster_id,
                    r.dir.display()
                ));
            }
        }
        if !is_dns1123_label(&self.secrets_namespace) {
            errors.push(format!(
                "--secrets-namespace {:?} is not a namespace name",
                self.secrets_namespace
            ));
        }
        if let Some(m) = &self.mesh_networks
            && !m.is_file()
        {
            errors.push(format!("--mesh-networks {}: no such file", m.display()));
        }
        let tls = [
            &self.xds_tls_cert_chain,
            &self.xds_tls_key,
            &self.xds_tls_root_cert,
        ];
        let given = tls.iter().filter(|t| t.is_some()).count();
        if given != 0 && given != 3 {
            errors.push(
                "--xds-tls-cert-chain, --xds-tls-key and --xds-tls-root-cert go together".into(),
            );
        }
        for (flag, value) in [
            ("--global-suffix", &self.global_suffix),
            ("--domain-suffix", &self.domain_suffix),
        ] {
            if value.is_empty() || !value.split('.').all(is_dns1123_label) {
                errors.push(format!("{flag} {value:?} is not a DNS name"));
            }
        }
        for (flag, d) in [
            ("--config-poll", self.config_poll),
            ("--debounce-max", self.debounce_max),
            ("--dns-refresh", self.dns_refresh),
        ] {
            if d.is_zero() {
                errors.push(format!("{flag} must be more than 0"));
            }
        }
        if self.debounce > self.debounce_max {
            errors.push("--debounce must not exceed --debounce-max".into());
        }
        let mut listeners = vec![
            ("--xds-listen", self.xds_listen),
            ("--status-listen", self.status_listen),
            ("--metrics-listen", self.metrics_listen),
            ("--admin-listen", self.admin_listen),
        ];
        if self.tls_enabled() {
            listeners.push(("--xds-tls-listen", self.xds_tls_listen));
        }
        registry::cli::check_distinct_listeners(&listeners, &mut errors);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigError(errors))
        }
    }

    pub fn tls_enabled(&self) -> bool {
        self.xds_tls_cert_chain.is_some()
    }

    pub fn default_network(&self) -> &str {
        self.default_network.as_deref().unwrap_or(&self.network)
    }

    /// A config for tests: every listener on 127.0.0.1 port 0, short timers.
    pub fn for_tests(cluster_id: &str, network: &str, config_dir: PathBuf) -> ServeConfig {
        let Cli {
            command: Command::Serve(mut c),
        } = Cli::parse_from([
            "remote-secrets",
            "serve",
            "--cluster-id",
            cluster_id,
            "--network",
            network,
        ])
        else {
            unreachable!("parsed a serve command")
        };
        c.config_dir = Some(config_dir);
        c.config_poll = Duration::from_millis(50);
        let local = SocketAddr::from(([127, 0, 0, 1], 0));
        c.xds_listen = local;
        c.xds_tls_listen = local;
        c.status_listen = local;
        c.metrics_listen = local;
        c.admin_listen = local;
        *c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_every_problem_at_once() {
        let mut c = ServeConfig::for_tests("Bad_Id", "", PathBuf::from("/nonexistent"));
        c.remote_config_dirs = vec!["Bad_Id=/nonexistent".parse().unwrap()];
        c.xds_tls_key = Some("k.pem".into());
        c.debounce = Duration::from_secs(5);
        let e = c.validate().unwrap_err();
        assert_eq!(e.0.len(), 8, "{e}");
    }

    #[test]
    fn parses_remote_dirs_and_durations() {
        let r: RemoteDir = "cluster-2=/etc/c2".parse().unwrap();
        assert_eq!(r.cluster_id, "cluster-2");
        assert!("nodir".parse::<RemoteDir>().is_err());
        assert_eq!(parse_duration("100ms"), Ok(Duration::from_millis(100)));
        assert!(parse_duration("1d").is_err());
    }
}
