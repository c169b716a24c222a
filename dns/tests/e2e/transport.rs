//! UDP size limits and truncation, TCP, malformed input, and the admin, status and metrics
//! endpoints.

use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode};
use hickory_proto::rr::RecordType;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use crate::support::*;

/// A ServiceEntry with `n` addresses: about 16 bytes of answer each.
fn big_entry(n: usize) -> String {
    let ips: Vec<String> = (0..n)
        .map(|i| format!("10.7.{}.{}", i / 200, i % 200 + 1))
        .collect();
    format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: big, \
         namespace: bar}}\nspec:\n  hosts: [big.bar.global]\n  addresses: [{}]\n  \
         resolution: STATIC\n",
        ips.join(", ")
    )
}

#[tokio::test]
async fn large_answers_are_truncated_over_udp_and_complete_over_tcp() {
    let f = Fixture::with_yaml(&big_entry(100)).await;
    // No EDNS: 512 bytes. 100 A records do not fit: TC, and no partial RRset.
    let q = query("big.bar.global.", RecordType::A);
    let r = udp(f.addr(), &q).await;
    assert_eq!(summary(&r), "NOERROR aa tc [] auth=[]");
    assert_eq!(r.queries.len(), 1);
    // The client retries over TCP and gets everything.
    let r = tcp(f.addr(), &q).await;
    assert!(!r.metadata.truncation);
    assert_eq!(r.answers.len(), 100);
    // EDNS 4096 is capped at our 1232: still too big over UDP, with our OPT in the reply.
    let r = udp(f.addr(), &with_edns(q.clone(), 4096)).await;
    assert!(r.metadata.truncation);
    assert_eq!(r.edns.as_ref().map(|e| e.max_payload()), Some(1232));
    let (_, metrics) = http_get(f.dns.metrics_addr, "/metrics").await;
    assert!(metrics.contains("dns_truncated_total 2"), "{metrics}");
}

#[tokio::test]
async fn edns_buffer_sizes_are_honoured() {
    // 50 records (~850 bytes): too big for 512, fits an EDNS buffer of 1232.
    let f = Fixture::with_yaml(&big_entry(50)).await;
    let q = query("big.bar.global.", RecordType::A);
    assert!(udp(f.addr(), &q).await.metadata.truncation);
    let r = udp(f.addr(), &with_edns(q.clone(), 1232)).await;
    assert!(!r.metadata.truncation);
    assert_eq!(r.answers.len(), 50);
    assert!(r.edns.is_some(), "EDNS in, EDNS out");
    // A client advertising less than 512 still gets 512 (RFC 6891 6.2.5).
    let r = udp(f.addr(), &with_edns(q, 100)).await;
    assert!(r.metadata.truncation);
}

#[tokio::test]
async fn tcp_connections_carry_several_queries() {
    let f = Fixture::start().await;
    let mut s = TcpStream::connect(f.addr()).await.unwrap();
    for name in [
        "httpbin.bar.global.",
        "dual.bar.global.",
        "nope.bar.global.",
    ] {
        let r = tcp_on(&mut s, &query(name, RecordType::A)).await;
        assert!(r.metadata.authoritative, "{name}");
    }
}

#[tokio::test]
async fn a_burst_of_malformed_packets_then_a_correct_answer() {
    let f = Fixture::start().await;
    let junk = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let good = query("httpbin.bar.global.", RecordType::A)
        .to_vec()
        .unwrap();
    let mut seed: u32 = 0x1234_5678;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        seed
    };
    let mut sent = 0;
    for i in 0..600usize {
        let packet: Vec<u8> = match i % 6 {
            // Shorter than a header.
            0 => (0..(next() % 12)).map(|_| next() as u8).collect(),
            // Random bytes of random length.
            1 => (0..(next() % 1500)).map(|_| next() as u8).collect(),
            // A real query cut short at every length.
            2 => good[..(i / 6) % good.len()].to_vec(),
            // A real query with one byte flipped.
            3 => {
                let mut p = good.clone();
                let at = next() as usize % p.len();
                p[at] ^= (next() as u8) | 1;
                p
            }
            // A header claiming 65535 of everything.
            4 => [
                0x12, 0x34, 0x01, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            ]
            .to_vec(),
            // A name that is one compression pointer to itself.
            _ => {
                let mut p = vec![0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 0xc0, 12];
                p.extend_from_slice(&[0, 1, 0, 1]);
                p
            }
        };
        junk.send_to(&packet, f.addr()).await.unwrap();
        sent += 1;
    }
    assert_eq!(sent, 600);
    // Still answering, correctly, over both transports.
    let r = ask(f.addr(), "httpbin.bar.global.", RecordType::A).await;
    assert_eq!(a_records(&r), ["240.0.0.2"]);
    eventually(
        "malformed datagrams are counted",
        Duration::from_secs(5),
        || async {
            let (_, m) = http_get(f.dns.metrics_addr, "/metrics").await;
            m.contains("dns_malformed_total{reason=\"short\"}")
                && m.contains("dns_malformed_total{reason=\"undecodable\"}")
        },
    )
    .await;
    // A FORMERR reply for a header followed by garbage.
    let probe = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    probe
        .send_to(
            &[0x42, 0x42, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 0xff],
            f.addr(),
        )
        .await
        .unwrap();
    let mut buf = [0u8; 512];
    let (n, _) = tokio::time::timeout(STEP, probe.recv_from(&mut buf))
        .await
        .expect("a FORMERR reply")
        .unwrap();
    let r = Message::from_vec(&buf[..n]).unwrap();
    assert_eq!(r.metadata.id, 0x4242);
    assert_eq!(rcode(&r), "FORMERR");
}

#[tokio::test]
async fn responses_sent_to_the_server_are_never_answered() {
    let f = Fixture::start().await;
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut m = query("httpbin.bar.global.", RecordType::A);
    m.metadata.message_type = MessageType::Response;
    sock.send_to(&m.to_vec().unwrap(), f.addr()).await.unwrap();
    // Then a real query from the same socket: the first datagram back must be its answer.
    let q = query("dual.bar.global.", RecordType::A);
    sock.send_to(&q.to_vec().unwrap(), f.addr()).await.unwrap();
    let mut buf = [0u8; 512];
    let (n, _) = tokio::time::timeout(STEP, sock.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let r = Message::from_vec(&buf[..n]).unwrap();
    assert_eq!(r.metadata.id, q.metadata.id, "the response got no reply");
    let mut notify = query("global.", RecordType::SOA);
    notify.metadata.op_code = OpCode::Notify;
    assert_eq!(rcode(&udp(f.addr(), &notify).await), "NOTIMP");
}

#[tokio::test]
async fn garbage_over_tcp_does_not_hurt_other_connections() {
    let f = Fixture::start().await;
    let mut bad = TcpStream::connect(f.addr()).await.unwrap();
    bad.write_all(&[0, 5, 1, 2, 3, 4, 5, 0, 40]).await.unwrap();
    bad.write_all(&[0xde; 40]).await.unwrap();
    // A half-open connection that never sends a length stays open without blocking others.
    let _idle = TcpStream::connect(f.addr()).await.unwrap();
    let r = ask(f.addr(), "httpbin.bar.global.", RecordType::A).await;
    assert_eq!(a_records(&r), ["240.0.0.2"]);
    // The garbage connection itself still gets a FORMERR for the well-framed garbage, or is
    // closed: it never gets an answer.
    let mut len = [0u8; 2];
    if tokio::time::timeout(STEP, bad.read_exact(&mut len))
        .await
        .is_ok_and(|r| r.is_ok())
    {
        let mut body = vec![0u8; usize::from(u16::from_be_bytes(len))];
        bad.read_exact(&mut body).await.unwrap();
        let r = Message::from_vec(&body).unwrap();
        assert_eq!(rcode(&r), "FORMERR");
    }
}

/// Malformed messages over TCP are counted as over UDP: a short one dropped, an undecodable
/// one answered FORMERR, a response dropped; the connection carries on.
#[tokio::test]
async fn malformed_tcp_messages_are_counted() {
    let f = Fixture::start().await;
    let mut s = TcpStream::connect(f.addr()).await.unwrap();
    let mut response = query("httpbin.bar.global.", RecordType::A);
    response.metadata.message_type = MessageType::Response;
    let response = response.to_vec().unwrap();
    let mut frames = Vec::new();
    for message in [
        &[1u8, 2, 3][..],
        &[0x42, 0x42, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 0xff][..],
        &response[..],
    ] {
        frames.extend_from_slice(&(message.len() as u16).to_be_bytes());
        frames.extend_from_slice(message);
    }
    s.write_all(&frames).await.unwrap();
    // Only the undecodable one is answered, and the same connection still answers queries.
    let mut len = [0u8; 2];
    tokio::time::timeout(STEP, s.read_exact(&mut len))
        .await
        .expect("FORMERR in time")
        .unwrap();
    let mut body = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut body).await.unwrap();
    let r = Message::from_vec(&body).unwrap();
    assert_eq!((r.metadata.id, rcode(&r)), (0x4242, "FORMERR"));
    let r = tcp_on(&mut s, &query("httpbin.bar.global.", RecordType::A)).await;
    assert_eq!(a_records(&r), ["240.0.0.2"]);
    let (_, m) = http_get(f.dns.metrics_addr, "/metrics").await;
    for line in [
        "dns_malformed_total{reason=\"short\"} 1",
        "dns_malformed_total{reason=\"undecodable\"} 1",
        "dns_malformed_total{reason=\"response\"} 1",
        "dns_queries_total{type=\"A\",rcode=\"NOERROR\",protocol=\"tcp\"} 1",
    ] {
        assert!(m.contains(line), "missing {line}:\n{m}");
    }
}

#[tokio::test]
async fn status_metrics_and_admin_endpoints() {
    let f = Fixture::start().await;
    let (code, body) = http_get(f.dns.status_addr, "/healthz/ready").await;
    assert_eq!((code, body.as_str()), (200, "ready\n"));

    ask(f.addr(), "httpbin.bar.global.", RecordType::A).await;
    ask(f.addr(), "nope.bar.global.", RecordType::A).await;
    ask(f.addr(), "example.com.", RecordType::AAAA).await;
    let (code, m) = http_get(f.dns.metrics_addr, "/metrics").await;
    assert_eq!(code, 200);
    for line in [
        "dns_queries_total{type=\"A\",rcode=\"NOERROR\",protocol=\"udp\"} 1",
        "dns_queries_total{type=\"A\",rcode=\"NOERROR\",protocol=\"tcp\"} 1",
        "dns_queries_total{type=\"A\",rcode=\"NXDOMAIN\",protocol=\"udp\"} 1",
        "dns_queries_total{type=\"AAAA\",rcode=\"REFUSED\",protocol=\"tcp\"} 1",
        "dns_answer_duration_seconds_count 6",
        "dns_service_entries_served 6",
        "dns_host_conflicts 1",
    ] {
        assert!(m.contains(line), "missing {line}:\n{m}");
    }

    let (code, body) = http_get(f.dns.admin_addr, "/config_dump").await;
    assert_eq!(code, 200);
    let dump: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(dump["config"]["zones"][0], "global");
    assert_eq!(dump["table"]["zones"][0], "global");
    assert_eq!(
        dump["table"]["hosts"]["httpbin.bar.global"]["addresses"][0],
        "240.0.0.2"
    );
    assert!(
        dump["table"]["hosts"]["reviews.bar.global"]["address_source"]
            .as_str()
            .unwrap()
            .contains("VIP")
    );
    assert!(
        dump["source"]["source"]
            .as_str()
            .unwrap()
            .starts_with("dir:")
    );

    let (_, body) = http_get(
        f.dns.admin_addr,
        "/debug/explain?host=httpbin.bar.global&type=AAAA",
    )
    .await;
    let e: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(e["outcome"], "nodata");
    assert_eq!(e["details"]["entry"], "bar/httpbin-bar");
    let (_, body) = http_get(f.dns.admin_addr, "/debug/explain?host=x.wild.global").await;
    let e: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(e["matched"], "*.wild.global");
    let (_, body) = http_get(f.dns.admin_addr, "/debug/explain?host=example.com").await;
    let e: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(e["outcome"], "refused");
}
