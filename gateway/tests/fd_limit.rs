//! The gateway out of file descriptors: a connect that fails with EMFILE is the gateway's own
//! shortage, so it must not eject the endpoint (which would refuse every later client of the
//! service for the ejection time) and must be counted as `local_resources`.
//!
//! The real binary runs as a child process with a small RLIMIT_NOFILE, so the test controls
//! exactly when it runs out, without touching the test process's own limit.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const HELLO: &[u8] = include_bytes!("fixtures/hellos/openssl-3.0-client-hello.bin");
const FD_LIMIT: u64 = 48;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Gateway {
    child: Child,
    listen: SocketAddr,
    metrics: SocketAddr,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Gateway {
    /// Descriptors numbered below the limit (an inherited one above it takes no slot).
    fn open_fds(&self) -> u64 {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
            .filter(|fd| *fd < FD_LIMIT)
            .count() as u64
    }

    /// Wait until the gateway holds `n` descriptors.
    fn wait_fds(&self, n: u64) {
        let end = Instant::now() + Duration::from_secs(10);
        while self.open_fds() != n {
            assert!(
                Instant::now() < end,
                "gateway holds {} descriptors, expected {n}",
                self.open_fds()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn metrics(&self) -> String {
        let mut s = TcpStream::connect(self.metrics).unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }
}

fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn start(dir: &std::path::Path) -> Gateway {
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let status: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gateway"));
    cmd.args(["--config-dir", dir.to_str().unwrap()])
        .args(["--config-poll", "1h"])
        .args(["--listen", &listen.to_string()])
        .args(["--status-listen", &status.to_string()])
        .args(["--metrics-listen", &metrics.to_string()])
        .args(["--admin-listen", &admin.to_string()])
        .args(["--peek-timeout", "60s", "--eject-after", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    #[allow(unsafe_code)] // pre_exec and setrlimit have no safe form
    // SAFETY: setrlimit is async-signal-safe and touches only the child being started.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: FD_LIMIT,
                rlim_max: FD_LIMIT,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let gw = Gateway {
        child: cmd.spawn().expect("start the gateway binary"),
        listen,
        metrics,
    };
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(mut s) = TcpStream::connect(status) {
            let _ = s.write_all(b"GET /healthz/ready HTTP/1.0\r\n\r\n");
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            if out.starts_with("HTTP/1.1 200") || out.starts_with("HTTP/1.0 200") {
                break;
            }
        }
        assert!(Instant::now() < end, "gateway never became ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    gw
}

#[test]
fn running_out_of_descriptors_does_not_eject_the_endpoint() {
    // The pod: accepts and keeps every connection.
    let pod = TcpListener::bind("127.0.0.1:0").unwrap();
    let pod_addr = pod.local_addr().unwrap();
    let accepted = Arc::new(Mutex::new(Vec::new()));
    {
        let accepted = accepted.clone();
        std::thread::spawn(move || {
            for s in pod.incoming().flatten() {
                accepted.lock().unwrap().push(s);
            }
        });
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("mesh.yaml"),
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: httpbin, namespace: bar}}\n\
             spec: {{ports: [{{name: http, port: 8000}}]}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: httpbin-1, namespace: bar, labels: {{kubernetes.io/service-name: httpbin}}}}\n\
             addressType: IPv4\nports: [{{name: http, port: {port}}}]\n\
             endpoints:\n- addresses: [\"127.0.0.1\"]\n  targetRef: {{kind: Pod, name: httpbin-v2, namespace: bar}}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {{name: httpbin-v2, namespace: bar, labels: {{app: httpbin, version: v2}}}}\n---\n\
             apiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {{name: httpbin, namespace: bar}}\n---\n\
             apiVersion: networking.istio.io/v1beta1\nkind: DestinationRule\nmetadata: {{name: httpbin, namespace: bar}}\n\
             spec: {{host: httpbin, subsets: [{{name: v2, labels: {{version: v2}}}}]}}\n",
            port = pod_addr.port()
        ),
    )
    .unwrap();
    let gw = start(dir.path());

    // Routed connections cost the gateway two descriptors each (client and pod; no pipes for
    // a connection that carried only a ClientHello). Fill up to one free descriptor.
    let mut clients = Vec::new();
    let routed = |clients: &mut Vec<TcpStream>| {
        let mut c = TcpStream::connect(gw.listen).unwrap();
        c.write_all(HELLO).unwrap();
        clients.push(c);
    };
    // The readiness probe's connection may still be closing: wait for a steady count.
    let mut base = gw.open_fds();
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = gw.open_fds();
        if now == base {
            break;
        }
        base = now;
    }
    let mut held = base;
    while FD_LIMIT - held > 2 {
        let before = accepted.lock().unwrap().len();
        routed(&mut clients);
        held += 2;
        gw.wait_fds(held);
        let end = Instant::now() + Duration::from_secs(10);
        while accepted.lock().unwrap().len() == before {
            assert!(Instant::now() < end, "the pod never saw the connection");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    if FD_LIMIT - held == 2 {
        // An accepted connection still waiting for the rest of its ClientHello takes one.
        let mut c = TcpStream::connect(gw.listen).unwrap();
        c.write_all(&HELLO[..5]).unwrap();
        clients.push(c);
        held += 1;
        gw.wait_fds(held);
    }
    assert_eq!(FD_LIMIT - held, 1);

    // The next client is accepted with the last descriptor; its connect fails with EMFILE.
    let pod_conns = accepted.lock().unwrap().len();
    let mut starved = TcpStream::connect(gw.listen).unwrap();
    starved.write_all(HELLO).unwrap();
    starved
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut answer = Vec::new();
    let _ = starved.read_to_end(&mut answer);
    assert_eq!(
        answer.first(),
        Some(&21),
        "a TLS alert record, then close: {answer:?}"
    );
    assert_eq!(accepted.lock().unwrap().len(), pod_conns);

    // Close everything (both ends, so the gateway ends each connection), then look at what
    // the gateway counted.
    drop(starved);
    clients.clear();
    accepted.lock().unwrap().clear();
    gw.wait_fds(base);
    let text = gw.metrics();
    assert_eq!(
        metric(
            &text,
            "gateway_rejected_connections_total{reason=\"local_resources\""
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        metric(&text, "gateway_endpoint_ejections_total"),
        0.0,
        "{text}"
    );
    assert_eq!(
        metric(&text, "gateway_connect_failures_total"),
        0.0,
        "{text}"
    );

    // And the endpoint takes the next client at once.
    let before = accepted.lock().unwrap().len();
    routed(&mut clients);
    let end = Instant::now() + Duration::from_secs(10);
    while accepted.lock().unwrap().len() == before {
        assert!(Instant::now() < end, "the endpoint was not used");
        std::thread::sleep(Duration::from_millis(5));
    }
}
