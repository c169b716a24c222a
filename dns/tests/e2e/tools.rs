//! What a new user would try: the real `dns` binary asked with `dig`, and the same names
//! resolved through a real resolver forwarding the zone to it.
//!
//! CoreDNS cannot run on this machine, so dnsmasq stands in for it: `server=/global/IP#PORT` is
//! dnsmasq's form of CoreDNS's `global:53 { forward . IP:PORT }` stub domain (deploy/coredns/).
//! Tests skip with a printed reason when dig or dnsmasq is missing, and fail when CI=true.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use hickory_proto::rr::RecordType;

use crate::support::*;

/// A child process killed (by its PID) when the test ends, pass or fail.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Run dig against `server` off the async runtime; its whole output.
async fn dig(server: SocketAddr, args: &[&str]) -> String {
    let mut all = vec![
        format!("@{}", server.ip()),
        "-p".to_string(),
        server.port().to_string(),
        "+time=2".into(),
        "+tries=2".into(),
    ];
    all.extend(args.iter().map(|s| s.to_string()));
    tokio::task::spawn_blocking(move || {
        let out = Command::new("dig")
            .args(&all)
            .output()
            .expect("running dig");
        String::from_utf8_lossy(&out.stdout).to_string()
    })
    .await
    .unwrap()
}

fn status(dig_output: &str) -> &str {
    dig_output
        .split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or("no reply")
}

/// Addresses the binary logged when ready.
struct Addrs {
    dns: SocketAddr,
    status: SocketAddr,
}

/// Start the real binary on 127.0.0.1 port 0; its addresses come from its JSON "ready" log line.
fn start_binary(dir: &std::path::Path, extra: &[&str]) -> (Killed, Addrs) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_dns"))
        .args([
            "--config-dir",
            dir.to_str().unwrap(),
            "--log-format",
            "json",
        ])
        .args(extra)
        .args(["--listen", "127.0.0.1:0", "--status-listen", "127.0.0.1:0"])
        .args([
            "--metrics-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .args(["--config-poll", "100ms"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting the dns binary");
    let stderr = child.stderr.take().unwrap();
    let guard = Killed(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        // Keep draining stderr so the child never blocks on a full pipe.
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("dns ready") {
                let v: serde_json::Value = serde_json::from_str(&line).unwrap();
                let addr = |k: &str| v[k].as_str().unwrap().parse::<SocketAddr>().unwrap();
                let _ = tx.send(Addrs {
                    dns: addr("listen"),
                    status: addr("status"),
                });
            }
        }
    });
    let addr = rx
        .recv_timeout(STEP)
        .expect("the dns binary did not log `dns ready` in time");
    (guard, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dig_against_the_binary_as_a_new_user_would() {
    if !tool("dig") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let big: Vec<String> = (1..=80).map(|i| format!("10.8.0.{i}")).collect();
    let yaml = format!(
        "{FIXTURE}---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: \
         big, namespace: bar}}\nspec:\n  hosts: [big.bar.global]\n  addresses: [{}]\n",
        big.join(", ")
    );
    std::fs::write(dir.path().join("mesh.yaml"), yaml).unwrap();
    let (_dns, addrs) = start_binary(dir.path(), &[]);
    let addr = addrs.dns;

    let out = dig(addr, &["httpbin.bar.global"]).await;
    assert_eq!(status(&out), "NOERROR", "{out}");
    assert!(out.contains("flags: qr aa rd;"), "authoritative: {out}");
    assert!(
        out.contains("httpbin.bar.global.\t30\tIN\tA\t240.0.0.2"),
        "{out}"
    );
    let out = dig(addr, &["httpbin.bar.global", "AAAA"]).await;
    assert_eq!(
        status(&out),
        "NOERROR",
        "AAAA of a v4-only name is NODATA: {out}"
    );
    assert!(out.contains("ANSWER: 0, AUTHORITY: 1"), "{out}");
    assert!(
        out.contains("IN\tSOA\tns.dns.global. hostmaster.global."),
        "{out}"
    );
    assert_eq!(status(&dig(addr, &["example.com"]).await), "REFUSED");
    assert_eq!(status(&dig(addr, &["nope.bar.global"]).await), "NXDOMAIN");
    let out = dig(addr, &["+tcp", "+short", "reviews.bar.global"]).await;
    assert!(out.trim().starts_with("240.240."), "a VIP over TCP: {out}");
    let out = dig(addr, &["+short", "_http._tcp.httpbin.bar.global", "SRV"]).await;
    assert_eq!(out.trim(), "0 100 8000 httpbin.bar.global.");
    let out = dig(addr, &["+short", "anything.wild.global"]).await;
    assert_eq!(out.trim(), "240.0.0.9");
    // The question's case comes back as asked (resolvers using 0x20 check it).
    let out = dig(addr, &["HttpBin.BAR.global"]).await;
    assert!(out.contains(";HttpBin.BAR.global.\t\tIN\tA"), "{out}");
    // 80 addresses do not fit 512 bytes: dig sees TC and retries over TCP by itself.
    let out = dig(addr, &["+noedns", "big.bar.global"]).await;
    assert!(out.contains("Truncated, retrying in TCP mode"), "{out}");
    assert!(out.contains("ANSWER: 80"), "{out}");

    // Live: edit the file, and the binary answers the new address without a restart.
    let edited = std::fs::read_to_string(dir.path().join("mesh.yaml"))
        .unwrap()
        .replace("- 240.0.0.2", "- 240.0.0.77");
    std::fs::write(dir.path().join("mesh.yaml"), edited).unwrap();
    eventually(
        "the binary serves the edit",
        Duration::from_secs(5),
        || async { dig(addr, &["+short", "httpbin.bar.global"]).await.trim() == "240.0.0.77" },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_then_exits() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("mesh.yaml"), FIXTURE).unwrap();
    let (mut dns, addrs) = start_binary(dir.path(), &["--drain-duration", "2s"]);
    assert_eq!(http_get(addrs.status, "/healthz/ready").await.0, 200);
    let pid = dns.0.id().to_string();
    let killed = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(killed.success());
    eventually("readiness turns 503", Duration::from_secs(5), || async {
        http_get(addrs.status, "/healthz/ready").await.0 == 503
    })
    .await;
    // Draining: still answering while load balancers move away.
    let r = udp(addrs.dns, &query("httpbin.bar.global.", RecordType::A)).await;
    assert_eq!(a_records(&r), ["240.0.0.2"]);
    let exited = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while std::time::Instant::now() < deadline {
            if let Some(status) = dns.0.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    })
    .await
    .unwrap();
    assert!(exited.expect("exited after the drain").success());
}

/// A port free for UDP and TCP on `ip`. Another process could take it before dnsmasq binds;
/// the caller retries.
fn free_port(ip: &str) -> u16 {
    loop {
        let udp = UdpSocket::bind((ip, 0)).unwrap();
        let port = udp.local_addr().unwrap().port();
        if TcpListener::bind((ip, port)).is_ok() {
            return port;
        }
    }
}

fn start_dnsmasq(ip: &str, upstream: SocketAddr) -> (Killed, SocketAddr) {
    for _ in 0..5 {
        let port = free_port(ip);
        let mut child = Command::new(tool_path("dnsmasq"))
            .args([
                "--no-daemon",
                "--no-resolv",
                "--no-hosts",
                "--conf-file=/dev/null",
            ])
            .arg(format!("--listen-address={ip}"))
            .args(["--bind-interfaces", "--cache-size=0"])
            .arg(format!("--port={port}"))
            // The stub domain: every name under `global` goes to our server.
            .arg(format!(
                "--server=/global/{}#{}",
                upstream.ip(),
                upstream.port()
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting dnsmasq");
        std::thread::sleep(Duration::from_millis(100));
        match child.try_wait() {
            Ok(None) => return (Killed(child), format!("{ip}:{port}").parse().unwrap()),
            // It exited: most likely the port was taken meanwhile. Try another.
            _ => continue,
        }
    }
    panic!("dnsmasq would not start on {ip}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_resolve_through_a_stub_domain_forwarder() {
    if !tool("dnsmasq") {
        return;
    }
    let f = Fixture::start().await;
    // dnsmasq on its own loopback address, forwarding `global` to our server.
    let (_dnsmasq, resolver) = start_dnsmasq("127.0.0.2", f.addr());
    eventually("dnsmasq forwards", Duration::from_secs(5), || async {
        let r = udp(resolver, &query("httpbin.bar.global.", RecordType::A)).await;
        a_records(&r) == ["240.0.0.2"]
    })
    .await;

    // Through the forwarder, with the recursion the resolver adds.
    let r = udp(resolver, &query("httpbin.bar.global.", RecordType::A)).await;
    assert!(r.metadata.recursion_available, "answered by dnsmasq: {r:?}");
    let r = udp(resolver, &query("httpbin.bar.global.", RecordType::AAAA)).await;
    assert_eq!(rcode(&r), "NOERROR", "NODATA survives forwarding: {r:?}");
    assert!(r.answers.is_empty());
    let r = udp(resolver, &query("nope.bar.global.", RecordType::A)).await;
    assert_eq!(rcode(&r), "NXDOMAIN");
    let r = udp(
        resolver,
        &query("_http._tcp.httpbin.bar.global.", RecordType::SRV),
    )
    .await;
    assert_eq!(r.answers.len(), 1, "{r:?}");
    let r = udp(resolver, &query("x.wild.global.", RecordType::A)).await;
    assert_eq!(a_records(&r), ["240.0.0.9"]);
    let r = tcp(resolver, &query("dual.bar.global.", RecordType::AAAA)).await;
    assert_eq!(summary(&r).split(' ').next(), Some("NOERROR"));
    assert_eq!(r.answers.len(), 1);

    if tool("dig") {
        let out = dig(resolver, &["+short", "httpbin.bar.global"]).await;
        assert_eq!(out.trim(), "240.0.0.2");
        let out = dig(resolver, &["httpbin.bar.global", "AAAA"]).await;
        assert_eq!(status(&out), "NOERROR", "{out}");
        assert!(out.contains("ANSWER: 0"), "{out}");
    }
    // Our server saw the forwarded queries.
    let (_, m) = http_get(f.dns.metrics_addr, "/metrics").await;
    assert!(
        m.contains("dns_queries_total{type=\"AAAA\",rcode=\"NOERROR\""),
        "{m}"
    );
}
