//! EDS scale benchmark: generates N services x 3 file-backed clusters x E endpoints, starts
//! `remote-secrets serve` on 127.0.0.1, subscribes S Delta xDS streams (wildcard, network1), and
//! measures start-to-first-full-push, memory, endpoint-change-to-update latency at every stream
//! and the control plane's CPU per push (utime+stime from /proc/<pid>/stat), and from the
//! server's own histogram the time from a generation's publication to each push (the part of
//! the latency after file parsing and debounce). Prints one JSON object. Every wait is bounded;
//! the server is ended by its PID (it is our child).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::google::protobuf::{Struct, Value, value};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

use remote_secrets::xds::EDS_TYPE;

/// EDS at scale: N services x 3 file-backed clusters x E endpoints, S Delta xDS streams; prints
/// start-to-first-push, memory, change-to-update latency and CPU per change as one JSON object.
#[derive(Parser, Debug)]
#[command(long_about = None)]
struct Args {
    /// The `remote-secrets` binary.
    #[arg(long)]
    server: PathBuf,
    #[arg(long, default_value_t = 10_000)]
    services: usize,
    #[arg(long, default_value_t = 5)]
    endpoints: usize,
    #[arg(long, default_value_t = 100)]
    streams: usize,
    /// Endpoint changes measured (one at a time).
    #[arg(long, default_value_t = 20)]
    changes: usize,
    /// The server's --config-poll (how often file-backed clusters are checked).
    #[arg(long, default_value = "50ms")]
    config_poll: String,
    /// Give up on any one phase after this many seconds.
    #[arg(long, default_value_t = 180)]
    timeout: u64,
}

/// The one cluster name per service we watch: `outbound|8000||s<i>.ns<i%100>.global`.
fn global_name(i: usize) -> String {
    format!("outbound|8000||s{i}.ns{}.global", i % 100)
}

/// One cluster's objects; endpoint 0 of service `not_ready` (if any) is not ready.
fn render_cluster(c: usize, services: usize, endpoints: usize, not_ready: Option<usize>) -> String {
    let mut y = String::with_capacity(services * 700);
    for i in 0..services {
        let ns = i % 100;
        let _ = write!(
            y,
            "apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: ns{ns}, labels: {{multicluster.x-k8s.io/exported: \"true\"}}}}\nspec:\n  ports: [{{name: http, port: 8000, targetPort: 80}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s{i}-1, namespace: ns{ns}, labels: {{kubernetes.io/service-name: s{i}}}}}\naddressType: IPv4\nports: [{{name: http, port: 80}}]\nendpoints:\n"
        );
        for e in 0..endpoints {
            let ready = not_ready != Some(i) || e != 0;
            let n = i * endpoints + e;
            let _ = write!(
                y,
                "- addresses: [\"10.{c}.{}.{}\"]\n  conditions: {{ready: {ready}}}\n  zone: zone-a\n",
                (n / 250) % 250,
                n % 250 + 1
            );
        }
        y.push_str("---\n");
    }
    let _ = write!(
        y,
        "apiVersion: v1\nkind: Service\nmetadata: {{name: istio-eastwestgateway, namespace: istio-system}}\nspec:\n  type: LoadBalancer\n  ports: [{{name: tls, port: 15443}}]\nstatus:\n  loadBalancer:\n    ingress: [{{ip: 127.0.{c}.100}}]\n"
    );
    y
}

fn mesh_networks() -> String {
    let mut y = String::from("networks:\n");
    for c in 1..=3 {
        let _ = write!(
            y,
            "  network{c}:\n    endpoints: [{{fromRegistry: cluster-{c}}}]\n    gateways:\n    - registryServiceName: istio-eastwestgateway.istio-system.svc.cluster.local\n      port: 15443\n"
        );
    }
    y
}

/// Write atomically (the server polls; never let it read half a file).
fn write_atomic(path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// utime+stime of a process in clock ticks, and its RSS/HWM in KiB.
fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = &stat[stat.rfind(')').context("stat")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Ok(f[11].parse::<u64>()? + f[12].parse::<u64>()?)
}

fn status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// The cumulative buckets of the server's `push_latency_seconds` histogram (from a generation's
/// publication to the response being queued on a stream), as (upper bound in s, count).
fn push_buckets(port: u16) -> anyhow::Result<Vec<(f64, u64)>> {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port))?;
    c.set_read_timeout(Some(Duration::from_secs(5)))?;
    c.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut text = String::new();
    c.read_to_string(&mut text)?;
    let mut out = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.split("push_latency_seconds_bucket{le=\"").nth(1) else {
            continue;
        };
        let Some((le, count)) = rest.split_once("\"}") else {
            continue;
        };
        let le = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse()?
        };
        out.push((le, count.trim().parse()?));
    }
    Ok(out)
}

/// The bucket bound holding quantile `q` of the pushes between two scrapes.
fn bucket_quantile(before: &[(f64, u64)], after: &[(f64, u64)], q: f64) -> f64 {
    let d: Vec<(f64, u64)> = after
        .iter()
        .zip(before)
        .map(|((le, a), (_, b))| (*le, a - b))
        .collect();
    let total = d.last().map(|x| x.1).unwrap_or(0);
    if total == 0 {
        return f64::NAN;
    }
    let want = (q * total as f64).ceil() as u64;
    d.iter()
        .find(|(_, c)| *c >= want)
        .map(|x| x.0)
        .unwrap_or(f64::NAN)
}

#[allow(unsafe_code)] // sysconf has no safe wrapper in std
fn ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn node() -> Option<Node> {
    let mut fields = std::collections::HashMap::new();
    fields.insert(
        "NETWORK".to_string(),
        Value {
            kind: Some(value::Kind::StringValue("network1".into())),
        },
    );
    Some(Node {
        id: "sidecar~10.1.0.9~bench.bar~bar.svc.cluster.local".into(),
        metadata: Some(Struct { fields }),
        ..Default::default()
    })
}

/// What a stream reports to the driver.
enum Event {
    /// Every watched `.global` name has its full endpoint count (local + 2 gateways).
    Full { at: Instant },
    /// A watched name arrived (after the initial full state), with the response's size.
    Update {
        stream: usize,
        name: String,
        at: Instant,
        resources: usize,
    },
}

async fn run_stream(
    id: usize,
    addr: String,
    services: usize,
    full_count: usize,
    events: mpsc::UnboundedSender<Event>,
    deadline: Instant,
) -> anyhow::Result<()> {
    let channel = loop {
        match tonic::transport::Endpoint::from_shared(addr.clone())?
            .connect()
            .await
        {
            Ok(c) => break c,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => bail!("stream {id}: cannot connect: {e}"),
        }
    };
    let mut client =
        AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(usize::MAX);
    let (tx, rx) = mpsc::channel(16);
    let req = |sub: Vec<String>, nonce: String| DeltaDiscoveryRequest {
        node: node(),
        type_url: EDS_TYPE.into(),
        resource_names_subscribe: sub,
        response_nonce: nonce,
        ..Default::default()
    };
    tx.send(req(vec!["*".into()], String::new())).await?;
    let mut responses = client
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let watched: HashMap<String, usize> = (0..services).map(|i| (global_name(i), i)).collect();
    let mut counts = vec![0usize; services];
    let mut complete = 0usize;
    let mut full = false;
    while let Some(r) = responses.next().await {
        let r = r?;
        let at = Instant::now();
        let n = r.resources.len();
        for res in &r.resources {
            let Some(&i) = watched.get(&res.name) else {
                continue;
            };
            if full {
                let _ = events.send(Event::Update {
                    stream: id,
                    name: res.name.clone(),
                    at,
                    resources: n,
                });
                continue;
            }
            let Some(any) = &res.resource else { continue };
            let cla = ClusterLoadAssignment::decode(any.value.as_slice())?;
            let c: usize = cla.endpoints.iter().map(|l| l.lb_endpoints.len()).sum();
            if counts[i] == full_count && c != full_count {
                complete -= 1;
            } else if counts[i] != full_count && c == full_count {
                complete += 1;
            }
            counts[i] = c;
        }
        tx.send(req(vec![], r.nonce.clone())).await?;
        if !full && complete == services {
            full = true;
            let _ = events.send(Event::Full { at });
        }
    }
    Ok(())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

struct Server(Child);
impl Drop for Server {
    fn drop(&mut self) {
        // Our own child, by PID.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let timeout = Duration::from_secs(a.timeout);
    let dir = tempfile::Builder::new().prefix("eds-bench").tempdir()?;
    let t = Instant::now();
    let mut files = Vec::new();
    for c in 1..=3 {
        let d = dir.path().join(format!("cluster-{c}"));
        std::fs::create_dir_all(&d)?;
        let f = d.join("mesh.yaml");
        write_atomic(&f, &render_cluster(c, a.services, a.endpoints, None))?;
        files.push(f);
    }
    let mn = dir.path().join("mesh-networks.yaml");
    std::fs::write(&mn, mesh_networks())?;
    let gen_ms = t.elapsed().as_secs_f64() * 1e3;
    let yaml_bytes: u64 = files
        .iter()
        .map(|f| f.metadata().map(|m| m.len()).unwrap_or(0))
        .sum();

    let port = free_port()?;
    let metrics_port = free_port()?;
    let started = Instant::now();
    let child = Command::new(&a.server)
        .arg("serve")
        .args(["--cluster-id", "cluster-1", "--network", "network1"])
        .arg("--config-dir")
        .arg(dir.path().join("cluster-1"))
        .arg(format!(
            "--remote-config-dir=cluster-2={},cluster-3={}",
            dir.path().join("cluster-2").display(),
            dir.path().join("cluster-3").display()
        ))
        .arg("--mesh-networks")
        .arg(&mn)
        .args(["--config-poll", &a.config_poll])
        .args(["--xds-listen", &format!("127.0.0.1:{port}")])
        .args(["--xds-tls-listen", "127.0.0.1:0"])
        .args(["--status-listen", "127.0.0.1:0"])
        .args(["--metrics-listen", &format!("127.0.0.1:{metrics_port}")])
        .args(["--admin-listen", "127.0.0.1:0"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting remote-secrets")?;
    let server = Server(child);
    let pid = server.0.id();
    let tck = ticks_per_sec();
    let addr = format!("http://127.0.0.1:{port}");
    let full_count = a.endpoints + 2;
    let (etx, mut erx) = mpsc::unbounded_channel();
    let deadline = Instant::now() + timeout;

    // Stream 0 alone first: start to first full push.
    let mut tasks = Vec::new();
    tasks.push(tokio::spawn(run_stream(
        0,
        addr.clone(),
        a.services,
        full_count,
        etx.clone(),
        deadline,
    )));
    let first_full = loop {
        match tokio::time::timeout_at(deadline.into(), erx.recv()).await {
            Ok(Some(Event::Full { at, .. })) => break at,
            Ok(Some(_)) => {}
            Ok(None) => bail!("event channel closed"),
            Err(_) => bail!("no full push within {timeout:?}"),
        }
    };
    let start_to_full = first_full.duration_since(started).as_secs_f64();
    let cpu_start = cpu_ticks(pid)? as f64 / tck;
    let rss_one = status_kib(pid, "VmRSS:");

    // The other streams: each gets the full state.
    let t_rest = Instant::now();
    let cpu0 = cpu_ticks(pid)?;
    for id in 1..a.streams {
        tasks.push(tokio::spawn(run_stream(
            id,
            addr.clone(),
            a.services,
            full_count,
            etx.clone(),
            deadline,
        )));
    }
    let mut full = 1;
    while full < a.streams {
        match tokio::time::timeout_at(deadline.into(), erx.recv()).await {
            Ok(Some(Event::Full { .. })) => full += 1,
            Ok(Some(_)) => {}
            Ok(None) => bail!("event channel closed"),
            Err(_) => bail!("only {full}/{} streams full within {timeout:?}", a.streams),
        }
    }
    let all_full_s = t_rest.elapsed().as_secs_f64();
    let cpu_full_push_ms =
        (cpu_ticks(pid)? - cpu0) as f64 / tck * 1e3 / (a.streams - 1).max(1) as f64;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss = status_kib(pid, "VmRSS:");
    let hwm = status_kib(pid, "VmHWM:");

    // Idle CPU (the pollers), to subtract from each change's window.
    let c_idle = cpu_ticks(pid)?;
    let t_idle = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_rate = (cpu_ticks(pid)? - c_idle) as f64 / tck / t_idle.elapsed().as_secs_f64();

    // Endpoint changes, one at a time, in cluster-2 (a remote): the gateway weight changes.
    let mut lat_ms = Vec::new();
    let mut push_cpu_ms = Vec::new();
    let mut push_sizes = Vec::new();
    let mut missed = 0usize;
    let buckets_before = push_buckets(metrics_port)?;
    for k in 0..a.changes {
        let svc = (k * 7919 + 13) % a.services;
        let name = global_name(svc);
        let text = render_cluster(2, a.services, a.endpoints, Some(svc));
        while let Ok(_e) = erx.try_recv() {}
        let c0 = cpu_ticks(pid)?;
        let t0 = Instant::now();
        write_atomic(&files[1], &text)?;
        let mut got = vec![false; a.streams];
        let mut n = 0;
        let until = Instant::now() + Duration::from_secs(30).min(timeout);
        while n < a.streams {
            match tokio::time::timeout_at(until.into(), erx.recv()).await {
                Ok(Some(Event::Update {
                    stream,
                    name: got_name,
                    at,
                    resources,
                })) if got_name == name && !got[stream] => {
                    got[stream] = true;
                    n += 1;
                    lat_ms.push(at.duration_since(t0).as_secs_f64() * 1e3);
                    push_sizes.push(resources);
                }
                Ok(Some(_)) => {}
                Ok(None) => bail!("event channel closed"),
                Err(_) => break,
            }
        }
        missed += a.streams - n;
        let window = t0.elapsed().as_secs_f64();
        let cpu = (cpu_ticks(pid)? - c0) as f64 / tck - idle_rate * window;
        push_cpu_ms.push(cpu * 1e3);
        // Let the next poll see a distinct mtime and the debounce settle.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let buckets_after = push_buckets(metrics_port)?;
    let pushes_in_changes = buckets_after.last().map(|x| x.1).unwrap_or(0)
        - buckets_before.last().map(|x| x.1).unwrap_or(0);
    lat_ms.sort_by(|a, b| a.total_cmp(b));
    push_cpu_ms.sort_by(|a, b| a.total_cmp(b));
    let mean_size = push_sizes.iter().sum::<usize>() as f64 / push_sizes.len().max(1) as f64;
    let out = serde_json::json!({
        "services": a.services,
        "clusters": 3,
        "endpoints_per_service": a.endpoints,
        "streams": a.streams,
        "yaml_bytes": yaml_bytes,
        "generate_ms": gen_ms,
        "config_poll": a.config_poll,
        "start_to_first_full_push_s": start_to_full,
        "cpu_to_first_full_push_s": cpu_start,
        "rss_one_stream_kib": rss_one,
        "other_streams_full_s": all_full_s,
        "cpu_per_full_push_to_one_stream_ms": cpu_full_push_ms,
        "rss_kib": rss,
        "hwm_kib": hwm,
        "idle_cpu_pct": idle_rate * 100.0,
        "changes": a.changes,
        "update_latency_ms_p50": percentile(&lat_ms, 50.0),
        "update_latency_ms_p99": percentile(&lat_ms, 99.0),
        "update_latency_ms_max": lat_ms.last().copied().unwrap_or(f64::NAN),
        "updates_missed": missed,
        "resources_per_update_mean": mean_size,
        "server_pushes_in_changes": pushes_in_changes,
        "server_generation_to_push_ms_p50_bucket": bucket_quantile(&buckets_before, &buckets_after, 0.5) * 1e3,
        "server_generation_to_push_ms_p99_bucket": bucket_quantile(&buckets_before, &buckets_after, 0.99) * 1e3,
        "cpu_per_change_ms_p50": percentile(&push_cpu_ms, 50.0),
        "cpu_per_change_ms_max": push_cpu_ms.last().copied().unwrap_or(f64::NAN),
    });
    println!("{out}");
    drop(server);
    for t in tasks {
        t.abort();
    }
    Ok(())
}
