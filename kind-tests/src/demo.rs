//! The local two-cluster demo (`local-mesh`): two clusters on loopback ranges (127.1.x.x and
//! 127.2.x.x), each with the real gateway, dns and remote-secrets processes from generated file
//! config and certificates, echo pods, and the sidecar-like client ([`crate::client`]) making
//! cross-cluster calls and printing the path of each (name -> VIP -> EDS view -> gateway -> pod).
//! No root and nothing installed: everything listens on 127.0.0.0/8.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::client::{CallOptions, PathReport, run};
use crate::mesh::{self, ClusterLayout, Pod, Process, ServiceSpec, echo, pki};

/// What one run of the demo does.
#[derive(Clone, Debug)]
pub struct Options {
    /// Make the calls, print the summary and return (an error if a call failed); otherwise
    /// keep the mesh running until Ctrl-C.
    pub once: bool,
    /// Keep generated config, certificates and logs here (default: a temporary directory).
    pub work_dir: Option<PathBuf>,
    /// Calls per service.
    pub calls: usize,
}

/// Run the demo (see the module comment).
pub async fn run_demo(opts: &Options) -> anyhow::Result<()> {
    let tmp;
    let work = match &opts.work_dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::Builder::new().prefix("local-mesh-").tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    std::fs::create_dir_all(&work)?;
    let bins = binaries()?;
    let clusters = [layout(1), layout(2)];

    println!("== local two-cluster mesh in {}", work.display());
    let certs = work.join("certs");
    pki::make_cas(&bins.control, &certs, &["cluster-1", "cluster-2"])?;
    let dirs = write_config(&work, &clusters)?;
    start_pods(&bins, &certs, &clusters).await?;
    let procs = start_control_planes(&bins, &work, &clusters, &dirs)?;
    // Kept until the demo ends: the processes stop when dropped.
    let _procs = wait_ready(&clusters, procs).await?;
    println!("== both clusters ready: gateway, dns and remote-secrets in each\n");

    let failures = call_services(&bins, &certs, &clusters, opts.calls).await?;
    if opts.once {
        if failures > 0 {
            anyhow::bail!("{failures} call(s) failed; logs are in {}", work.display());
        }
        return Ok(());
    }
    print_hints(&clusters, &work);
    tokio::signal::ctrl_c().await?;
    Ok(())
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("literal address")
}

fn layout(n: u8) -> ClusterLayout {
    ClusterLayout {
        id: format!("cluster-{n}"),
        network: format!("network{n}"),
        gateway: ip(&format!("127.{n}.0.1")),
        dns: SocketAddr::new(ip(&format!("127.{n}.0.2")), 15053),
        control: ip(&format!("127.{n}.0.3")),
        netns: None,
    }
}

fn pod(name: &str, ns: &str, service: &str, version: &str, addr: &str) -> Pod {
    Pod::new(name, ns, service, version, ip(addr))
}

fn services() -> [ServiceSpec; 2] {
    [
        ServiceSpec {
            name: "helloworld".into(),
            namespace: "sample".into(),
            exported: true,
        },
        ServiceSpec {
            name: "httpbin".into(),
            namespace: "bar".into(),
            exported: true,
        },
    ]
}

/// Each cluster's pods: helloworld runs only in cluster-2; httpbin in both.
fn pods() -> [Vec<Pod>; 2] {
    [
        vec![pod("httpbin-c1-v1", "bar", "httpbin", "v1", "127.1.1.1")],
        vec![
            pod("helloworld-v1", "sample", "helloworld", "v1", "127.2.1.1"),
            pod("helloworld-v2", "sample", "helloworld", "v2", "127.2.1.2"),
            pod("httpbin-c2-v1", "bar", "httpbin", "v1", "127.2.1.3"),
            pod("httpbin-c2-v2", "bar", "httpbin", "v2", "127.2.1.4"),
        ],
    ]
}

/// meshNetworks and each cluster's objects; returns each cluster's config directory.
fn write_config(work: &Path, clusters: &[ClusterLayout; 2]) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::write(
        work.join("mesh-networks.yaml"),
        mesh::mesh_networks_yaml(clusters),
    )?;
    let pods = pods();
    let mut dirs = Vec::new();
    for (i, c) in clusters.iter().enumerate() {
        let dir = work.join(&c.id).join("config");
        std::fs::create_dir_all(&dir)?;
        std::fs::write(
            dir.join("mesh.yaml"),
            mesh::cluster_yaml(&services(), &pods[i]),
        )?;
        dirs.push(dir);
    }
    Ok(dirs)
}

/// An echo pod per pod, in this process, each with its workload certificate.
async fn start_pods(
    bins: &Binaries,
    certs: &Path,
    clusters: &[ClusterLayout; 2],
) -> anyhow::Result<()> {
    for (c, pods) in clusters.iter().zip(pods()) {
        for p in pods {
            let id = pki::workload(
                &bins.control,
                certs,
                &c.id,
                &p.name,
                &format!("spiffe://cluster.local/ns/{}/sa/{}", p.namespace, p.service),
                &[&format!("{}.{}.svc.cluster.local", p.service, p.namespace)],
            )?;
            let listener =
                tokio::net::TcpListener::bind(SocketAddr::new(p.ip, mesh::POD_PORT)).await?;
            tokio::spawn(echo::serve(
                listener,
                pki::server_config(&id)?,
                p.name.clone(),
                c.id.clone(),
            ));
        }
    }
    Ok(())
}

/// gateway, dns and remote-secrets of each cluster, in that order; each remote-secrets reads
/// the other cluster's directory as a remote.
fn start_control_planes(
    bins: &Binaries,
    work: &Path,
    clusters: &[ClusterLayout; 2],
    dirs: &[PathBuf],
) -> anyhow::Result<Vec<Process>> {
    let mesh_networks = work.join("mesh-networks.yaml");
    let mut procs = Vec::new();
    for (i, c) in clusters.iter().enumerate() {
        let logs = work.join(&c.id);
        let other = 1 - i;
        let remote = [(clusters[other].id.as_str(), dirs[other].as_path())];
        procs.push(Process::spawn(
            &format!("{} gateway", c.id),
            &bins.gateway,
            &mesh::gateway_args(c, &dirs[i]),
            None,
            &logs.join("gateway.log"),
        )?);
        procs.push(Process::spawn(
            &format!("{} dns", c.id),
            &bins.dns,
            &mesh::dns_args(c, &dirs[i]),
            None,
            &logs.join("dns.log"),
        )?);
        procs.push(Process::spawn(
            &format!("{} remote-secrets", c.id),
            &bins.control,
            &mesh::control_args(c, &dirs[i], &remote, &mesh_networks),
            None,
            &logs.join("remote-secrets.log"),
        )?);
    }
    Ok(procs)
}

/// Every process answers 200 on `/healthz/ready`. The processes are returned to be kept
/// running (they end when dropped).
async fn wait_ready(
    clusters: &[ClusterLayout; 2],
    procs: Vec<Process>,
) -> anyhow::Result<Vec<Process>> {
    for (i, c) in clusters.iter().enumerate() {
        for (j, addr) in [c.gateway, c.dns.ip(), c.control].into_iter().enumerate() {
            let status = SocketAddr::new(addr, mesh::STATUS_PORT);
            let p = &procs[i * 3 + j];
            let ready = tokio::task::spawn_blocking(move || {
                testkit::poll_until_blocking("readiness", Duration::from_secs(20), || {
                    matches!(mesh::http_get(status, "/healthz/ready"), Ok((200, _)))
                })
            })
            .await?;
            if let Err(e) = ready {
                anyhow::bail!("{}: {e}; it logged:\n{}", p.name, p.log_tail());
            }
        }
    }
    Ok(procs)
}

/// The client in cluster-1 calls each service; prints each path and a summary; returns the
/// number of failed calls.
async fn call_services(
    bins: &Binaries,
    certs: &Path,
    clusters: &[ClusterLayout; 2],
    calls: usize,
) -> anyhow::Result<usize> {
    let client_id = pki::workload(
        &bins.control,
        certs,
        "cluster-1",
        "sleep",
        "spiffe://cluster.local/ns/foo/sa/sleep",
        &[],
    )?;
    let c1 = &clusters[0];
    let mut failures = 0;
    let mut summary: BTreeMap<String, usize> = BTreeMap::new();
    for (host, subset, expect) in [
        (
            "helloworld.sample.global",
            None,
            "helloworld.sample.svc.cluster.local",
        ),
        (
            "helloworld.sample.global",
            Some("v2"),
            "helloworld.sample.svc.cluster.local",
        ),
        ("httpbin.bar.global", None, "httpbin.bar.svc.cluster.local"),
    ] {
        let opts = CallOptions {
            dns: c1.dns,
            xds: c1.xds(),
            network: c1.network.clone(),
            host: host.into(),
            port: mesh::SERVICE_PORT,
            subset: subset.map(str::to_string),
            endpoint: None,
        };
        let tls = pki::client_config(&client_id, expect)?;
        let report = eventually_report(&opts, tls, calls).await?;
        failures += print_path(&report, clusters, &mut summary);
    }

    println!("== summary (client in cluster-1, network1)");
    for (who, n) in &summary {
        println!("   {n:3} calls answered by {who}");
    }
    println!("   {failures:3} failed");
    Ok(failures)
}

/// The remote view can lag the first sync by a debounce: retry the batch (a new seed each
/// time) until every call succeeds, for up to 20 s; then the last report, failures and all.
async fn eventually_report(
    opts: &CallOptions,
    tls: Arc<rustls::ClientConfig>,
    calls: usize,
) -> anyhow::Result<PathReport> {
    let attempt = Cell::new(0u64);
    let last = RefCell::new(None);
    let all_answered = testkit::poll_until("every call answered", Duration::from_secs(20), || {
        let seed = attempt.get().wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5eed;
        attempt.set(attempt.get() + 1);
        let (tls, last) = (tls.clone(), &last);
        async move {
            match run(opts, tls, calls, seed).await {
                Ok(r) if !r.eds.is_empty() && r.calls.iter().all(|c| c.error.is_none()) => Some(r),
                Ok(r) => {
                    *last.borrow_mut() = Some(r);
                    None
                }
                Err(e) => {
                    tracing::debug!(error = %e, "not yet");
                    None
                }
            }
        }
    })
    .await;
    match all_answered {
        Ok(r) => Ok(r),
        Err(_) => last
            .into_inner()
            .context("no answer from the mesh; see the logs in the work directory"),
    }
}

/// Print name -> VIP -> EDS view -> endpoint -> pod for each call; returns the failures.
fn print_path(
    r: &PathReport,
    clusters: &[ClusterLayout],
    summary: &mut BTreeMap<String, usize>,
) -> usize {
    let vip: Vec<String> = r.vip.iter().map(|v| v.to_string()).collect();
    println!("{}  ->  VIP {}  (dns)", r.host, vip.join(", "));
    println!("   EDS {} as seen from network1:", r.cluster);
    for e in &r.eds {
        let what = clusters
            .iter()
            .find(|c| c.gateway_addr() == e.address)
            .map(|c| format!("gateway of {} ({})", c.id, c.network))
            .unwrap_or_else(|| "local pod".into());
        println!("     {:<18} weight {:<3} {what}", e.address, e.weight);
    }
    let mut failed = 0;
    for c in &r.calls {
        match (&c.endpoint, &c.answer, &c.error) {
            (Some(ep), Some(a), _) => {
                let via = clusters
                    .iter()
                    .find(|c| c.gateway_addr() == *ep)
                    .map(|c| format!("{}'s gateway", c.id))
                    .unwrap_or_else(|| "direct".into());
                println!(
                    "   SNI {}  ->  {ep} ({via})  ->  {} in {}",
                    r.sni, a.pod, a.cluster
                );
                *summary
                    .entry(format!("{} ({})", a.pod, a.cluster))
                    .or_default() += 1;
            }
            (_, _, Some(e)) => {
                println!("   FAILED: {e}");
                failed += 1;
            }
            _ => {}
        }
    }
    println!();
    failed
}

/// What to try while the mesh runs.
fn print_hints(clusters: &[ClusterLayout], work: &Path) {
    println!("\n== running; Ctrl-C to stop. Try:");
    for c in clusters {
        println!(
            "   curl -s http://{}:{}/config_dump           # {} gateway",
            c.gateway,
            mesh::ADMIN_PORT,
            c.id
        );
        println!(
            "   curl -s 'http://{}:{}/debug/explain?sni=outbound_.8000_._.helloworld.sample.global'",
            c.gateway,
            mesh::ADMIN_PORT
        );
        println!(
            "   curl -s 'http://{}:{}/debug/explain?host=httpbin.bar.global&network={}'   # {} EDS",
            c.control,
            mesh::ADMIN_PORT,
            c.network,
            c.id
        );
        println!(
            "   dig @{} -p {} httpbin.bar.global",
            c.dns.ip(),
            c.dns.port()
        );
        println!(
            "   curl -s http://{}:{}/metrics",
            c.gateway,
            mesh::METRICS_PORT
        );
    }
    println!("   logs: {}", work.display());
}

struct Binaries {
    gateway: PathBuf,
    dns: PathBuf,
    control: PathBuf,
}

/// The three binaries, built first (same profile as this one) when run through cargo.
fn binaries() -> anyhow::Result<Binaries> {
    let find = || -> anyhow::Result<Binaries> {
        Ok(Binaries {
            gateway: mesh::workspace_bin("gateway")?,
            dns: mesh::workspace_bin("dns")?,
            control: mesh::workspace_bin("remote-secrets")?,
        })
    };
    if let Ok(b) = find() {
        return Ok(b);
    }
    let cargo = std::env::var_os("CARGO").context(
        "the gateway, dns and remote-secrets binaries are not built; run `cargo build --release --workspace --bins`",
    )?;
    let release = std::env::current_exe()?
        .components()
        .any(|c| c.as_os_str() == "release");
    println!("== building gateway, dns and remote-secrets");
    let mut cmd = std::process::Command::new(cargo);
    cmd.args([
        "build",
        "-p",
        "gateway",
        "-p",
        "dns",
        "-p",
        "remote-secrets",
    ]);
    if release {
        cmd.arg("--release");
    }
    let status = cmd.status()?;
    anyhow::ensure!(status.success(), "building the binaries failed");
    find()
}
