//! The flags every binary shares, as clap structs each binary's `Config` flattens in, and the
//! checks that report every problem of a configuration at once.
//!
//! Environment fallbacks are named by one rule, applied by [`with_env_prefix`]: flag
//! `--foo-bar` of a binary whose prefix is `GATEWAY` also reads `GATEWAY_FOO_BAR`. No flag
//! spells its variable by hand, so the names cannot drift between binaries.

use std::marker::PhantomData;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Command, CommandFactory, FromArgMatches};
use serde::Serialize;

/// Parse this process's arguments into `C`, every flag with its `<prefix>_<FLAG>` environment
/// fallback. Exits with clap's message (and status 2) on a bad argument, as `Parser::parse`.
pub fn parse<C: CommandFactory + FromArgMatches>(prefix: &str) -> C {
    parse_command(with_env_prefix(C::command(), prefix))
}

/// Parse this process's arguments with an already adjusted command (a binary with subcommands
/// gives only its long-running one the environment fallbacks).
pub fn parse_command<C: FromArgMatches>(mut command: Command) -> C {
    let matches = command.clone().get_matches();
    C::from_arg_matches(&matches)
        .map_err(|e| e.format(&mut command))
        .unwrap_or_else(|e| e.exit())
}

/// Give every long flag without one an environment fallback `<prefix>_<FLAG>`.
pub fn with_env_prefix(command: Command, prefix: &str) -> Command {
    let prefix = prefix.to_string();
    command.mut_args(move |arg| {
        let Some(long) = arg.get_long() else {
            return arg;
        };
        if arg.get_env().is_some() || matches!(long, "help" | "version") {
            return arg;
        }
        let name = format!("{prefix}_{}", long.to_ascii_uppercase().replace('-', "_"));
        // Built once at start-up, for the life of the process.
        arg.env(&*Box::leak(name.into_boxed_str()))
    })
}

/// Where a binary reads its cluster: a directory of YAML, or the Kubernetes API.
#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct SourceFlags {
    /// Read the cluster's objects from YAML files in this directory (Kubernetes and Istio
    /// shapes, several documents per file; watched and reloaded without a restart) instead of
    /// the Kubernetes API.
    #[arg(long)]
    pub config_dir: Option<PathBuf>,

    /// Without --config-dir: the kubeconfig to reach the Kubernetes API with (default:
    /// in-cluster service account, else KUBECONFIG or ~/.kube/config).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,

    /// Watch only these namespaces (repeatable, or comma-separated; default: all).
    #[arg(long = "watch-namespace", value_delimiter = ',')]
    pub watch_namespaces: Vec<String>,

    /// How often the config directory is checked for changes.
    #[arg(long, default_value = "500ms", value_parser = parse_duration)]
    #[serde(with = "duration_ms")]
    pub config_poll: Duration,
}

/// Whether `--watch-namespace` means anything besides the local Kubernetes API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Namespaces {
    /// Only the local API source reads them: with --config-dir they are a mistake.
    LocalApiOnly,
    /// Remote clusters read them too (remote-secrets), so they go with --config-dir.
    AlsoRemote,
}

impl SourceFlags {
    pub fn check(&self, p: &mut Problems, namespaces: Namespaces) {
        match &self.config_dir {
            None => {}
            Some(d) if !d.is_dir() => p.push(format!(
                "--config-dir {}: not a directory; does it exist?",
                d.display()
            )),
            Some(_)
                if self.kubeconfig.is_some()
                    || (namespaces == Namespaces::LocalApiOnly
                        && !self.watch_namespaces.is_empty()) =>
            {
                p.push(match namespaces {
                    Namespaces::LocalApiOnly => {
                        "--kubeconfig and --watch-namespace apply to the Kubernetes API source; \
                         drop them or drop --config-dir"
                    }
                    Namespaces::AlsoRemote => {
                        "--kubeconfig names the local cluster's API; drop it or drop --config-dir"
                    }
                })
            }
            Some(_) => {}
        }
        if let Some(k) = &self.kubeconfig
            && !k.is_file()
        {
            p.push(format!(
                "--kubeconfig {}: not a file; does it exist?",
                k.display()
            ));
        }
        for ns in &self.watch_namespaces {
            if !registry::naming::is_dns1123_label(ns) {
                p.push(format!("--watch-namespace {ns:?} is not a namespace name"));
            }
        }
        p.positive("--config-poll", self.config_poll);
    }

    /// For tests: read this directory, polled every 50 ms.
    pub fn dir_for_tests(dir: PathBuf) -> SourceFlags {
        SourceFlags {
            config_dir: Some(dir),
            kubeconfig: None,
            watch_namespaces: Vec::new(),
            config_poll: Duration::from_millis(50),
        }
    }

    /// For tests: read the Kubernetes API through this kubeconfig.
    pub fn kubeconfig_for_tests(kubeconfig: PathBuf) -> SourceFlags {
        SourceFlags {
            config_dir: None,
            kubeconfig: Some(kubeconfig),
            watch_namespaces: Vec::new(),
            config_poll: Duration::from_millis(50),
        }
    }
}

/// The three HTTP listeners every binary serves, as Istio's do.
#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct ListenFlags {
    /// `GET /healthz/ready`: 200 once the first full sync is done and the binary's table is
    /// built from it; 503 before, and from the moment termination starts.
    #[arg(long, default_value = "0.0.0.0:15021")]
    pub status_listen: SocketAddr,

    /// `GET /metrics` in Prometheus text format.
    #[arg(long, default_value = "0.0.0.0:15020")]
    pub metrics_listen: SocketAddr,

    /// `GET /config_dump` and `GET /debug/explain?...`. Keep it on localhost.
    #[arg(long, default_value = "127.0.0.1:15000")]
    pub admin_listen: SocketAddr,
}

impl ListenFlags {
    /// The three, named by flag, for [`Problems::distinct_listeners`].
    pub fn named(&self) -> [(&'static str, SocketAddr); 3] {
        [
            ("--status-listen", self.status_listen),
            ("--metrics-listen", self.metrics_listen),
            ("--admin-listen", self.admin_listen),
        ]
    }

    /// For tests: everything on 127.0.0.1, port 0.
    pub fn for_tests() -> ListenFlags {
        let local = SocketAddr::from(([127, 0, 0, 1], 0));
        ListenFlags {
            status_listen: local,
            metrics_listen: local,
            admin_listen: local,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Plain,
    Json,
}

/// How the binary logs (the filter is `RUST_LOG`, default `info`).
#[derive(clap::Args, Debug, Clone, Default, Serialize)]
pub struct LogFlags {
    /// Log lines on stderr: plain text, or one JSON object per line. Which lines: RUST_LOG
    /// (default info).
    #[arg(long, value_enum, default_value = "plain")]
    pub log_format: LogFormat,
}

/// The per-binary defaults of [`LifecycleFlags`] (each pod's terminationGracePeriodSeconds in
/// `deploy/` is above their sum).
pub trait LifecycleDefaults: Clone + std::fmt::Debug + Send + Sync + 'static {
    const DRAIN_DURATION: &'static str;
    const TERMINATION_DEADLINE: &'static str;
}

/// What SIGTERM does: readiness 503 at once, serve on for the drain, stop accepting, give
/// in-flight work until the deadline, then end what is left.
#[derive(clap::Args, Debug, Clone, Serialize)]
#[serde(bound = "")]
pub struct LifecycleFlags<D: LifecycleDefaults> {
    /// On SIGTERM, keep serving this long with readiness 503, so load balancers and the
    /// Service's endpoints move away before the listeners close.
    #[arg(long, default_value = D::DRAIN_DURATION, value_parser = parse_duration)]
    #[serde(with = "duration_ms")]
    pub drain_duration: Duration,

    /// After the drain, how long in-flight work (connections, TCP queries, xDS streams) may
    /// continue before it is ended. Keep the pod's terminationGracePeriodSeconds above drain +
    /// this.
    #[arg(long, default_value = D::TERMINATION_DEADLINE, value_parser = parse_duration)]
    #[serde(with = "duration_ms")]
    pub termination_deadline: Duration,

    #[arg(skip)]
    #[serde(skip)]
    defaults: PhantomData<D>,
}

impl<D: LifecycleDefaults> LifecycleFlags<D> {
    pub fn new(drain_duration: Duration, termination_deadline: Duration) -> Self {
        LifecycleFlags {
            drain_duration,
            termination_deadline,
            defaults: PhantomData,
        }
    }

    /// For tests: no drain, the binary's deadline.
    pub fn for_tests() -> Self {
        let deadline = parse_duration(D::TERMINATION_DEADLINE).unwrap_or(Duration::from_secs(5));
        LifecycleFlags::new(Duration::ZERO, deadline)
    }
}

/// Every problem with a configuration, reported together.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
pub struct ConfigError(pub Vec<String>);

/// The problems found so far while validating a configuration.
#[derive(Debug, Default)]
pub struct Problems(Vec<String>);

impl Problems {
    pub fn push(&mut self, problem: impl Into<String>) {
        self.0.push(problem.into());
    }

    /// A duration flag that must be more than zero.
    pub fn positive(&mut self, flag: &str, d: Duration) {
        if d.is_zero() {
            self.push(format!("{flag} must be more than 0"));
        }
    }

    /// A DNS-1123 label (cluster ids, namespaces).
    pub fn dns_label(&mut self, flag: &str, value: &str) {
        if !registry::naming::is_dns1123_label(value) {
            self.push(format!(
                "{flag} {value:?} is not a DNS label (lower-case letters, digits and `-`, e.g. \
                 cluster-1)"
            ));
        }
    }

    /// Lower-case DNS labels separated by dots (`global`, `cluster.local`).
    pub fn dns_name(&mut self, flag: &str, value: &str) {
        let ok = !value.is_empty() && value.split('.').all(registry::naming::is_dns1123_label);
        if !ok {
            self.push(format!(
                "{flag} {value:?} is not a DNS name (lower-case labels separated by dots)"
            ));
        }
    }

    /// Every pair of listener flags that share an address (port 0 excepted).
    pub fn distinct_listeners(&mut self, listeners: &[(&str, SocketAddr)]) {
        for (i, (a, x)) in listeners.iter().enumerate() {
            for (b, y) in &listeners[i + 1..] {
                if x == y && x.port() != 0 {
                    self.push(format!("{a} and {b} are both {x}"));
                }
            }
        }
    }

    pub fn finish(self) -> Result<(), ConfigError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ConfigError(self.0))
        }
    }
}

/// `1h`, `30s`, `500ms`, `2m`; a bare number is seconds. For clap `value_parser`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration like 500ms, 5s, 2m or 1h"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "" | "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("`{s}`: unknown unit `{unit}` (use ms, s, m or h)")),
    }
}

/// Serialize a `Duration` as `1500ms` (for `Config: Serialize` and `/config_dump`):
/// `#[serde(with = "process_shell::flags::duration_ms")]`.
pub mod duration_ms {
    use std::time::Duration;
    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("{}ms", d.as_millis()))
    }
}

/// An `Option<Duration>` as `1500ms` or null.
pub mod opt_duration_ms {
    use std::time::Duration;
    pub fn serialize<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => super::duration_ms::serialize(d, s),
            None => s.serialize_none(),
        }
    }
}

/// A value by its `Display` form (addresses, CIDRs).
pub fn display<S: serde::Serializer, T: std::fmt::Display>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

/// An optional value by its `Display` form, or null.
pub fn display_opt<S: serde::Serializer, T: std::fmt::Display>(
    v: &Option<T>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.collect_str(v),
        None => s.serialize_none(),
    }
}

/// A sequence by the `Display` form of each item.
pub fn display_seq<S: serde::Serializer, T: std::fmt::Display>(
    v: &[T],
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_seq(v.iter().map(|x| x.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Clone, Debug)]
    struct TestDefaults;
    impl LifecycleDefaults for TestDefaults {
        const DRAIN_DURATION: &'static str = "5s";
        const TERMINATION_DEADLINE: &'static str = "2s";
    }

    /// A binary's Config in miniature.
    #[derive(Parser, Debug, Clone, Serialize)]
    struct Demo {
        #[command(flatten)]
        #[serde(flatten)]
        source: SourceFlags,
        #[command(flatten)]
        #[serde(flatten)]
        listen: ListenFlags,
        #[command(flatten)]
        #[serde(flatten)]
        lifecycle: LifecycleFlags<TestDefaults>,
        #[command(flatten)]
        #[serde(flatten)]
        log: LogFlags,
        /// The binary's own flag, with a hand-written variable that is kept.
        #[arg(long, env = "DEMO_SPECIAL_NAME", default_value = "x")]
        own: String,
    }

    #[test]
    fn every_flag_reads_its_prefixed_variable() {
        let command = with_env_prefix(Demo::command(), "DEMO");
        let envs: Vec<(String, String)> = command
            .get_arguments()
            .filter_map(|a| {
                Some((
                    a.get_long()?.to_string(),
                    a.get_env()?.to_string_lossy().into_owned(),
                ))
            })
            .collect();
        let env = |flag: &str| {
            envs.iter()
                .find(|(l, _)| l == flag)
                .map(|(_, e)| e.as_str())
        };
        assert_eq!(env("config-dir"), Some("DEMO_CONFIG_DIR"));
        assert_eq!(env("watch-namespace"), Some("DEMO_WATCH_NAMESPACE"));
        assert_eq!(env("status-listen"), Some("DEMO_STATUS_LISTEN"));
        assert_eq!(
            env("termination-deadline"),
            Some("DEMO_TERMINATION_DEADLINE")
        );
        assert_eq!(env("log-format"), Some("DEMO_LOG_FORMAT"));
        assert_eq!(env("own"), Some("DEMO_SPECIAL_NAME"));
        assert_eq!(env("help"), None);
    }

    #[test]
    fn flattened_defaults_and_dump() {
        let d = Demo::parse_from(["demo"]);
        assert_eq!(d.lifecycle.drain_duration, Duration::from_secs(5));
        assert_eq!(d.lifecycle.termination_deadline, Duration::from_secs(2));
        assert_eq!(d.source.config_poll, Duration::from_millis(500));
        let json = serde_json::to_value(&d).unwrap();
        // Flat, as each binary's /config_dump always was.
        assert_eq!(json["termination_deadline"], "2000ms");
        assert_eq!(json["status_listen"], "0.0.0.0:15021");
        assert_eq!(json["log_format"], "plain");
        assert!(json.get("defaults").is_none());
    }

    #[test]
    fn source_problems() {
        let d = tempfile::tempdir().unwrap();
        let mut flags = SourceFlags::dir_for_tests(d.path().to_path_buf());
        flags.watch_namespaces = vec!["bar".into(), "Not_A_Namespace".into()];
        let mut p = Problems::default();
        flags.check(&mut p, Namespaces::LocalApiOnly);
        let e = p.finish().unwrap_err().to_string();
        assert!(
            e.contains("--kubeconfig and --watch-namespace apply"),
            "{e}"
        );
        assert!(
            e.contains("\"Not_A_Namespace\" is not a namespace name"),
            "{e}"
        );

        flags.watch_namespaces = vec!["bar".into()];
        let mut p = Problems::default();
        flags.check(&mut p, Namespaces::AlsoRemote);
        p.finish().unwrap();
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("ms").is_err());
    }

    #[test]
    fn listeners_must_differ() {
        let a: SocketAddr = "127.0.0.1:15000".parse().unwrap();
        let zero: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let mut p = Problems::default();
        p.distinct_listeners(&[("--a", a), ("--b", zero), ("--c", zero), ("--d", a)]);
        assert_eq!(
            p.finish().unwrap_err().0,
            ["--a and --d are both 127.0.0.1:15000"]
        );
    }
}
