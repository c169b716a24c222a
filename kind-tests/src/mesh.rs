//! What the demo and the two-cluster tests share: a multi-cluster mesh made of real
//! processes. The layout of each cluster, the YAML each one reads (Kubernetes shapes), the
//! meshNetworks file, and the processes (gateway, dns, remote-secrets), optionally inside a
//! network namespace; the certificates ([`pki`]) and the echo pods ([`echo`]).

pub mod echo;
pub mod pki;

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub const GATEWAY_PORT: u16 = 15443;
pub const XDS_PORT: u16 = 15010;
pub const STATUS_PORT: u16 = 15021;
pub const METRICS_PORT: u16 = 15020;
pub const ADMIN_PORT: u16 = 15000;
pub const POD_PORT: u16 = 8080;
pub const SERVICE_PORT: u16 = 8000;

/// Where one cluster's parts listen.
#[derive(Clone, Debug)]
pub struct ClusterLayout {
    pub id: String,
    pub network: String,
    /// The gateway's address, reachable from the other networks.
    pub gateway: IpAddr,
    pub dns: SocketAddr,
    /// remote-secrets (xDS on [`XDS_PORT`]).
    pub control: IpAddr,
    /// Run this cluster's processes in this network namespace.
    pub netns: Option<String>,
}

impl ClusterLayout {
    pub fn xds(&self) -> SocketAddr {
        SocketAddr::new(self.control, XDS_PORT)
    }
    pub fn gateway_addr(&self) -> SocketAddr {
        SocketAddr::new(self.gateway, GATEWAY_PORT)
    }
}

/// A pod of a service, served by an echo server.
#[derive(Clone, Debug)]
pub struct Pod {
    pub name: String,
    pub namespace: String,
    pub service: String,
    pub version: String,
    pub ip: IpAddr,
}

impl Pod {
    /// A pod of `service` in namespace `ns`, labelled `version`, at `ip`.
    pub fn new(name: &str, ns: &str, service: &str, version: &str, ip: IpAddr) -> Pod {
        Pod {
            name: name.into(),
            namespace: ns.into(),
            service: service.into(),
            version: version.into(),
            ip,
        }
    }
}

/// A service that exists somewhere in the mesh.
#[derive(Clone, Debug)]
pub struct ServiceSpec {
    pub name: String,
    pub namespace: String,
    pub exported: bool,
}

/// The objects one cluster holds: its Services (for those with pods here, or all when
/// `define_all`), EndpointSlices, Pods, ServiceExports, DestinationRules, and a ServiceEntry
/// for every `.global` name of the mesh (what the DNS server answers).
pub fn cluster_yaml(services: &[ServiceSpec], pods: &[Pod]) -> String {
    let mut y = String::new();
    for s in services {
        let (ns, name) = (&s.namespace, &s.name);
        let mine: Vec<&Pod> = pods
            .iter()
            .filter(|p| p.service == *name && p.namespace == *ns)
            .collect();
        // A ServiceEntry everywhere: the .global name resolves in every cluster.
        let _ = write!(
            y,
            "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\n\
             metadata: {{name: {name}-global, namespace: {ns}}}\n\
             spec:\n  hosts: [{name}.{ns}.global]\n  location: MESH_INTERNAL\n  resolution: DNS\n\
             \x20 ports: [{{number: {SERVICE_PORT}, name: http, protocol: TLS}}]\n"
        );
        if mine.is_empty() {
            continue;
        }
        let _ = write!(
            y,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\n\
             spec: {{ports: [{{name: http, port: {SERVICE_PORT}, targetPort: {POD_PORT}}}]}}\n\
             ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: {name}-1, namespace: {ns}, labels: {{kubernetes.io/service-name: {name}}}}}\n\
             addressType: {}\nports: [{{name: http, port: {POD_PORT}, protocol: TCP}}]\nendpoints:\n",
            if mine[0].ip.is_ipv4() { "IPv4" } else { "IPv6" }
        );
        for p in &mine {
            let _ = write!(
                y,
                "- addresses: [\"{}\"]\n  conditions: {{ready: true}}\n  \
                 targetRef: {{kind: Pod, name: {}, namespace: {ns}}}\n",
                p.ip, p.name
            );
        }
        for p in &mine {
            let _ = write!(
                y,
                "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {}\n  namespace: {ns}\n  \
                 labels: {{app: {name}, version: {}, security.istio.io/tlsMode: istio}}\n",
                p.name, p.version
            );
        }
        if s.exported {
            let _ = write!(
                y,
                "---\napiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\n\
                 metadata: {{name: {name}, namespace: {ns}}}\n"
            );
        }
        let _ = write!(
            y,
            "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\n\
             metadata: {{name: {name}, namespace: {ns}}}\n\
             spec:\n  host: {name}.{ns}.svc.cluster.local\n  subsets:\n  \
             - {{name: v1, labels: {{version: v1}}}}\n  - {{name: v2, labels: {{version: v2}}}}\n"
        );
    }
    y
}

/// Istio's meshNetworks: each cluster its own network, reached through its gateway.
pub fn mesh_networks_yaml(clusters: &[ClusterLayout]) -> String {
    let mut y = String::from("networks:\n");
    for c in clusters {
        let _ = write!(
            y,
            "  {}:\n    endpoints:\n    - fromRegistry: {}\n    gateways:\n    - address: {}\n      port: {GATEWAY_PORT}\n",
            c.network, c.id, c.gateway
        );
    }
    y
}

/// A child process that is ended (by its PID) when dropped.
pub struct Process {
    pub name: String,
    child: Child,
    pub log: PathBuf,
}

impl Process {
    /// Start `bin args`, inside `netns` when given, output to `log`.
    pub fn spawn(
        name: &str,
        bin: &Path,
        args: &[String],
        netns: Option<&str>,
        log: &Path,
    ) -> anyhow::Result<Process> {
        let out = std::fs::File::create(log)?;
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        let child = cmd
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .map_err(|e| anyhow::anyhow!("starting {}: {e}", bin.display()))?;
        Ok(Process {
            name: name.into(),
            child,
            log: log.into(),
        })
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The last lines of its log, for error messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A workspace binary: next to the running executable (or one level up, from `deps/`).
pub fn workspace_bin(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent().map(Path::to_path_buf);
    for _ in 0..2 {
        let Some(d) = dir else { break };
        let candidate = d.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
        dir = d.parent().map(Path::to_path_buf);
    }
    anyhow::bail!(
        "cannot find the `{name}` binary next to {}; build the workspace first (cargo build --workspace --bins)",
        exe.display()
    )
}

/// Arguments for each control-plane binary of a cluster.
pub fn gateway_args(c: &ClusterLayout, config_dir: &Path) -> Vec<String> {
    let g = c.gateway;
    vec![
        "--config-dir".into(),
        config_dir.display().to_string(),
        "--config-poll".into(),
        "200ms".into(),
        "--cluster-id".into(),
        c.id.clone(),
        "--listen".into(),
        c.gateway_addr().to_string(),
        "--status-listen".into(),
        SocketAddr::new(g, STATUS_PORT).to_string(),
        "--metrics-listen".into(),
        SocketAddr::new(g, METRICS_PORT).to_string(),
        "--admin-listen".into(),
        SocketAddr::new(g, ADMIN_PORT).to_string(),
        "--drain-duration".into(),
        "0s".into(),
        "--termination-deadline".into(),
        "2s".into(),
    ]
}

pub fn dns_args(c: &ClusterLayout, config_dir: &Path) -> Vec<String> {
    let d = c.dns.ip();
    vec![
        "--config-dir".into(),
        config_dir.display().to_string(),
        "--config-poll".into(),
        "200ms".into(),
        "--listen".into(),
        c.dns.to_string(),
        "--ttl".into(),
        "5s".into(),
        "--status-listen".into(),
        SocketAddr::new(d, STATUS_PORT).to_string(),
        "--metrics-listen".into(),
        SocketAddr::new(d, METRICS_PORT).to_string(),
        "--admin-listen".into(),
        SocketAddr::new(d, ADMIN_PORT).to_string(),
        "--drain-duration".into(),
        "0s".into(),
    ]
}

pub fn control_args(
    c: &ClusterLayout,
    config_dir: &Path,
    remotes: &[(&str, &Path)],
    mesh_networks: &Path,
) -> Vec<String> {
    let x = c.control;
    let mut a = vec![
        "serve".into(),
        "--cluster-id".into(),
        c.id.clone(),
        "--network".into(),
        c.network.clone(),
        "--config-dir".into(),
        config_dir.display().to_string(),
        "--config-poll".into(),
        "200ms".into(),
        "--mesh-networks".into(),
        mesh_networks.display().to_string(),
        "--xds-listen".into(),
        c.xds().to_string(),
        "--status-listen".into(),
        SocketAddr::new(x, STATUS_PORT).to_string(),
        "--metrics-listen".into(),
        SocketAddr::new(x, METRICS_PORT).to_string(),
        "--admin-listen".into(),
        SocketAddr::new(x, ADMIN_PORT).to_string(),
    ];
    for (id, dir) in remotes {
        a.push("--remote-config-dir".into());
        a.push(format!("{id}={}", dir.display()));
    }
    a
}

/// A blocking HTTP/1.1 GET: (status, body). For readiness, metrics and debug endpoints.
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let code = out
        .get(9..12)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {out:?}")))?;
    let body = out
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    Ok((code, body))
}
