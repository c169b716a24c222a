//! Starting the server in-process, real UDP and TCP queries (encoded with hickory-proto), a
//! minimal HTTP GET, and polling with a deadline.

use std::net::SocketAddr;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use dns::{Config, Dns};
use hickory_proto::op::{Edns, Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
/// Poll `check` until it holds, or fail after `within` (the workspace's one implementation).
pub use testkit::eventually_within as eventually;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

pub const FIXTURE: &str = include_str!("../fixtures/mesh.yaml");

/// How long any single network step may take before the test fails.
pub const STEP: Duration = Duration::from_secs(5);

/// A config directory holding the fixture, and a server reading it.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub dns: Dns,
}

impl Fixture {
    pub async fn start() -> Fixture {
        Self::with_yaml(FIXTURE).await
    }

    pub async fn with_yaml(yaml: &str) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("mesh.yaml"), yaml).unwrap();
        let dns = start(dir.path()).await;
        Fixture { dir, dns }
    }

    pub fn addr(&self) -> SocketAddr {
        self.dns.dns_addr
    }

    /// Replace the config file (a new inode, as `kubectl cp` or a ConfigMap update would).
    pub fn write(&self, yaml: &str) {
        let tmp = self.dir.path().join(".mesh.yaml.tmp");
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(tmp, self.dir.path().join("mesh.yaml")).unwrap();
    }
}

pub async fn start(dir: &Path) -> Dns {
    let config = Config::for_tests(dir.to_path_buf());
    tokio::time::timeout(STEP, Dns::start(config))
        .await
        .expect("dns did not start in time")
        .expect("dns failed to start")
}

pub fn query(name: &str, qtype: RecordType) -> Message {
    let mut m = Message::query();
    m.metadata.id = rand_id(name);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_str(name).unwrap(), qtype));
    m
}

pub fn with_edns(mut m: Message, payload: u16) -> Message {
    let mut edns = Edns::new();
    edns.set_max_payload(payload);
    m.set_edns(edns);
    m
}

fn rand_id(name: &str) -> u16 {
    // Distinct per name, fixed per run: enough to match replies to questions.
    name.bytes()
        .fold(0x5a5au16, |h, b| h.rotate_left(5) ^ u16::from(b))
}

/// One query over UDP from a fresh socket; the reply must match the id.
pub async fn udp(server: SocketAddr, m: &Message) -> Message {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(&m.to_vec().unwrap(), server).await.unwrap();
    let mut buf = vec![0u8; 65535];
    let (n, _) = tokio::time::timeout(STEP, sock.recv_from(&mut buf))
        .await
        .expect("no UDP reply in time")
        .unwrap();
    let reply = Message::from_vec(&buf[..n]).expect("the reply decodes");
    assert_eq!(reply.metadata.id, m.metadata.id, "reply id matches");
    reply
}

/// One query over TCP (two-byte length prefix, RFC 1035 4.2.2).
pub async fn tcp(server: SocketAddr, m: &Message) -> Message {
    let mut s = tokio::time::timeout(STEP, TcpStream::connect(server))
        .await
        .expect("TCP connect in time")
        .unwrap();
    tcp_on(&mut s, m).await
}

pub async fn tcp_on(s: &mut TcpStream, m: &Message) -> Message {
    let bytes = m.to_vec().unwrap();
    let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&bytes);
    s.write_all(&framed).await.unwrap();
    let mut len = [0u8; 2];
    tokio::time::timeout(STEP, s.read_exact(&mut len))
        .await
        .expect("TCP reply in time")
        .unwrap();
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
    tokio::time::timeout(STEP, s.read_exact(&mut buf))
        .await
        .expect("TCP reply body in time")
        .unwrap();
    let reply = Message::from_vec(&buf).expect("the reply decodes");
    assert_eq!(reply.metadata.id, m.metadata.id);
    reply
}

/// The same question over UDP and over TCP; both answers must agree. Returns the UDP one.
pub async fn ask(server: SocketAddr, name: &str, qtype: RecordType) -> Message {
    let m = query(name, qtype);
    let u = udp(server, &m).await;
    let t = tcp(server, &m).await;
    assert_eq!(
        summary(&u),
        summary(&t),
        "UDP and TCP disagree on {name} {qtype}"
    );
    u
}

/// `NOERROR aa [A 240.0.0.2] auth=[SOA]`-like text of a reply, for compact assertions.
pub fn summary(m: &Message) -> String {
    let answers: Vec<String> = m.answers.iter().map(rdata).collect();
    let auth: Vec<String> = m
        .authorities
        .iter()
        .map(|r| r.record_type().to_string())
        .collect();
    format!(
        "{}{}{} {:?} auth={:?}",
        rcode(m),
        if m.metadata.authoritative { " aa" } else { "" },
        if m.metadata.truncation { " tc" } else { "" },
        answers,
        auth
    )
}

pub fn rcode(m: &Message) -> &'static str {
    match m.metadata.response_code {
        ResponseCode::NoError => "NOERROR",
        ResponseCode::NXDomain => "NXDOMAIN",
        ResponseCode::Refused => "REFUSED",
        ResponseCode::FormErr => "FORMERR",
        ResponseCode::ServFail => "SERVFAIL",
        ResponseCode::NotImp => "NOTIMP",
        _ => "other",
    }
}

pub fn rdata(r: &hickory_proto::rr::Record) -> String {
    match &r.data {
        RData::A(a) => format!("A {a}"),
        RData::AAAA(a) => format!("AAAA {a}"),
        other => format!("{} {other}", r.record_type()),
    }
}

/// The A addresses of a reply.
pub fn a_records(m: &Message) -> Vec<String> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.to_string()),
            _ => None,
        })
        .collect()
}

/// `GET path` over HTTP/1.1; (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(STEP, s.read_to_end(&mut raw))
        .await
        .expect("HTTP response in time")
        .unwrap();
    let text = String::from_utf8_lossy(&raw).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Whether an external tool is installed (on PATH or in /usr/sbin, where dnsmasq lives).
/// Missing: skip with a reason, unless CI=true, where the environment promises it and its
/// absence is a failure.
pub fn tool(name: &str) -> bool {
    let on_path = std::process::Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    let found = on_path || Path::new("/usr/sbin").join(name).exists();
    if !found {
        let ci = std::env::var("CI").is_ok_and(|v| v == "true");
        assert!(
            !ci,
            "{name} is required in CI (apt-get install -y dnsutils dnsmasq)"
        );
        eprintln!("SKIPPED: {name} is not installed (apt-get install -y dnsutils dnsmasq)");
    }
    found
}

/// The command to run a tool found by [`tool`].
pub fn tool_path(name: &str) -> std::path::PathBuf {
    let sbin = Path::new("/usr/sbin").join(name);
    if sbin.exists() { sbin } else { name.into() }
}
