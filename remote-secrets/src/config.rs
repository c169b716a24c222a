//! One `Config` per subcommand: flags with `REMOTE_SECRETS_*` environment fallbacks, validated as
//! a whole so every problem is reported at once.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand};
pub use process_shell::ConfigError;
use process_shell::flags::{
    LifecycleDefaults, LifecycleFlags, ListenFlags, LogFlags, Namespaces, Problems, SourceFlags,
    duration_ms, parse_duration,
};
pub use registry::admission::ExportPolicy;
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

/// Every flag `--foo-bar` of `serve` also reads `REMOTE_SECRETS_FOO_BAR`.
pub const ENV_PREFIX: &str = "REMOTE_SECRETS";

impl Cli {
    /// This process's arguments; `serve`'s flags with their `REMOTE_SECRETS_*` fallbacks.
    pub fn from_args() -> Cli {
        let command = Cli::command().mut_subcommand("serve", |serve| {
            process_shell::flags::with_env_prefix(serve, ENV_PREFIX)
        });
        process_shell::flags::parse_command(command)
    }
}

/// The control plane's drain and deadline defaults: the pod's terminationGracePeriodSeconds (15
/// in deploy/base/remote-secrets.yaml) is above 5 s + 5 s.
#[derive(Clone, Debug)]
pub struct ServeLifecycle;

impl LifecycleDefaults for ServeLifecycle {
    const DRAIN_DURATION: &'static str = "5s";
    const TERMINATION_DEADLINE: &'static str = "5s";
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

/// `remote-secrets serve`: the control plane of one cluster.
///
/// Reads the local cluster (--config-dir), remote clusters (--remote-config-dir, and kubeconfig
/// Secrets labelled istio/multiCluster=true in --secrets-namespace), the mesh networks
/// (--mesh-networks), and serves split-horizon EDS over xDS.
#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct ServeConfig {
    /// This cluster's id (a DNS-1123 label), as the other clusters' secrets name it.
    #[arg(long)]
    pub cluster_id: String,

    /// This cluster's network (Istio's topology.istio.io/network).
    #[arg(long)]
    pub network: String,

    /// The local cluster (--config-dir: Services, EndpointSlices, Pods, DestinationRules,
    /// ServiceExports, Secrets as YAML), or its API. --watch-namespace applies to remote
    /// clusters too; Secrets are read in --secrets-namespace regardless.
    #[command(flatten)]
    #[serde(flatten)]
    pub source: SourceFlags,

    /// A file-backed remote cluster, `CLUSTER_ID=DIR` (repeatable).
    #[arg(long = "remote-config-dir", value_delimiter = ',')]
    pub remote_config_dirs: Vec<RemoteDir>,

    /// Where kubeconfig Secrets (label istio/multiCluster=true) are read.
    #[arg(long, default_value = "istio-system")]
    pub secrets_namespace: String,

    /// Accept kubeconfigs whose users run a command (exec) or an auth-provider plugin.
    #[arg(long)]
    pub allow_kubeconfig_exec: bool,

    /// Istio meshNetworks YAML (`networks: {...}`); reloaded when it changes.
    #[arg(long)]
    pub mesh_networks: Option<PathBuf>,

    /// The network of clients whose node metadata has no NETWORK (default: --network).
    #[arg(long)]
    pub default_network: Option<String>,

    /// xDS over plaintext gRPC.
    #[arg(long, default_value = "0.0.0.0:15010")]
    pub xds_listen: SocketAddr,

    /// xDS over mutual TLS; served when the three --xds-tls-* files are given.
    #[arg(long, default_value = "0.0.0.0:15012")]
    pub xds_tls_listen: SocketAddr,

    /// The server's certificate chain (PEM, leaf first), e.g. from `certs workload`.
    #[arg(long)]
    pub xds_tls_cert_chain: Option<PathBuf>,

    /// The server's private key (PEM).
    #[arg(long)]
    pub xds_tls_key: Option<PathBuf>,

    /// The shared root: clients must present a certificate chaining to it.
    #[arg(long)]
    pub xds_tls_root_cert: Option<PathBuf>,

    /// Quiet time before a burst of changes is pushed.
    #[arg(long, default_value = "100ms", value_parser = parse_duration)]
    #[serde(with = "duration_ms")]
    pub debounce: Duration,

    /// Longest a burst may delay a push.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    #[serde(with = "duration_ms")]
    pub debounce_max: Duration,

    /// How often gateway host names are resolved again.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    #[serde(with = "duration_ms")]
    pub dns_refresh: Duration,

    /// The remote gateways' --export-policy: another network's endpoints count only for
    /// services their gateway admits (exported: ServiceExport or the
    /// multicluster.x-k8s.io/exported=true label), since it refuses the others.
    #[arg(long, value_enum, default_value = "exported")]
    pub export_policy: ExportPolicy,

    /// The cluster DNS domain: services are `<name>.<ns>.svc.<domain-suffix>`.
    #[arg(long, default_value = "cluster.local")]
    pub domain_suffix: String,

    /// The multi-cluster suffix: `<name>.<ns>.<global-suffix>`.
    #[arg(long, default_value = "global")]
    pub global_suffix: String,

    /// Status, metrics and admin listeners. Readiness waits for the local cluster only, never
    /// for a remote one.
    #[command(flatten)]
    #[serde(flatten)]
    pub listeners: ListenFlags,

    #[command(flatten)]
    #[serde(flatten)]
    pub lifecycle: LifecycleFlags<ServeLifecycle>,

    #[command(flatten)]
    #[serde(flatten)]
    pub log: LogFlags,
}

impl ServeConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut p = Problems::default();
        if !is_dns1123_label(&self.cluster_id) {
            p.push(format!(
                "--cluster-id {:?} is not a DNS-1123 label (lower-case letters, digits, '-')",
                self.cluster_id
            ));
        }
        if self.network.is_empty() {
            p.push("--network must not be empty");
        }
        self.source.check(&mut p, Namespaces::AlsoRemote);
        let mut seen = vec![self.cluster_id.as_str()];
        for r in &self.remote_config_dirs {
            if !is_dns1123_label(&r.cluster_id) {
                p.push(format!(
                    "--remote-config-dir {}: cluster id is not a DNS-1123 label",
                    r.cluster_id
                ));
            }
            if seen.contains(&r.cluster_id.as_str()) {
                p.push(format!(
                    "--remote-config-dir {}: cluster id used twice (or is --cluster-id)",
                    r.cluster_id
                ));
            }
            seen.push(&r.cluster_id);
            if !r.dir.is_dir() {
                p.push(format!(
                    "--remote-config-dir {}={}: not a directory",
                    r.cluster_id,
                    r.dir.display()
                ));
            }
        }
        if !is_dns1123_label(&self.secrets_namespace) {
            p.push(format!(
                "--secrets-namespace {:?} is not a namespace name",
                self.secrets_namespace
            ));
        }
        if let Some(m) = &self.mesh_networks
            && !m.is_file()
        {
            p.push(format!("--mesh-networks {}: no such file", m.display()));
        }
        let tls = [
            &self.xds_tls_cert_chain,
            &self.xds_tls_key,
            &self.xds_tls_root_cert,
        ];
        let given = tls.iter().filter(|t| t.is_some()).count();
        if given != 0 && given != 3 {
            p.push("--xds-tls-cert-chain, --xds-tls-key and --xds-tls-root-cert go together");
        }
        p.dns_name("--global-suffix", &self.global_suffix);
        p.dns_name("--domain-suffix", &self.domain_suffix);
        p.positive("--debounce-max", self.debounce_max);
        p.positive("--dns-refresh", self.dns_refresh);
        if self.debounce > self.debounce_max {
            p.push("--debounce must not exceed --debounce-max");
        }
        let mut listeners = vec![("--xds-listen", self.xds_listen)];
        listeners.extend(self.listeners.named());
        if self.tls_enabled() {
            listeners.push(("--xds-tls-listen", self.xds_tls_listen));
        }
        p.distinct_listeners(&listeners);
        p.finish()
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
        c.source = SourceFlags::dir_for_tests(config_dir);
        let local = SocketAddr::from(([127, 0, 0, 1], 0));
        c.xds_listen = local;
        c.xds_tls_listen = local;
        c.listeners = ListenFlags::for_tests();
        c.lifecycle = LifecycleFlags::for_tests();
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
