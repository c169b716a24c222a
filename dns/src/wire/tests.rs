//! The fast path against the hickory path (the reference): same bytes for every plain query of
//! a test table, and `None` (so the hickory path answers) for everything else.

use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;

use hickory_proto::op::{Edns, Message};
use hickory_proto::rr::DNSClass;
use registry::source::dir::snapshot_from_yaml;
use tokio::sync::watch;

use super::*;
use crate::answers::Answers;
use crate::metrics::Metrics;
use crate::server::Handler;
use crate::table::TableOptions;

const MAX_UDP: u16 = 1232;

fn table() -> Answers {
    let many: Vec<String> = (0..60).map(|i| format!("10.1.0.{}", i + 1)).collect();
    let yaml = format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: h, namespace: \
         bar}}\nspec:\n  hosts: [httpbin.bar.global, '*.w.global', deep.x.w.global, svc.other]\n  \
         addresses: [240.0.0.2, 'fd00::2']\n  ports: [{{number: 80, name: http}}, {{number: 53, \
         name: dns, protocol: UDP}}]\n---\napiVersion: networking.istio.io/v1\nkind: \
         ServiceEntry\nmetadata: {{name: big, namespace: bar}}\nspec:\n  hosts: [big.bar.global]\n  \
         addresses: [{}]\n",
        many.join(", ")
    );
    let options = TableOptions {
        zones: vec!["global".into(), "other".into(), "sub.global".into()],
        ttl: 30,
        vip_v4: None,
        vip_v6: None,
    };
    Answers::build(&snapshot_from_yaml(&yaml), &options)
}

fn handler(table: Answers) -> Handler {
    let (_, rx) = watch::channel(Arc::new(table));
    let mut registry = prometheus_client::registry::Registry::default();
    Handler::new(rx, Arc::new(Metrics::new(&mut registry)), MAX_UDP)
}

/// How a test query is dressed.
#[derive(Clone, Copy, Debug)]
enum Dress {
    Plain,
    RecursionDesired,
    /// dig's defaults: RD and AD, EDNS 1232.
    Dig,
    CheckingDisabled,
    Edns(u16),
    EdnsDnssecOk,
}

fn query(id: u16, name: &str, qtype: RecordType, dress: Dress) -> Vec<u8> {
    let mut m = Message::query();
    m.metadata.id = id;
    m.add_query(Query::query(Name::from_str(name).unwrap(), qtype));
    let mut edns = |size: u16, dnssec: bool| {
        let mut e = Edns::new();
        e.set_max_payload(size);
        e.set_dnssec_ok(dnssec);
        m.set_edns(e);
    };
    match dress {
        Dress::Plain => {}
        Dress::RecursionDesired => {}
        Dress::Dig => edns(1232, false),
        Dress::CheckingDisabled => {}
        Dress::Edns(size) => edns(size, false),
        Dress::EdnsDnssecOk => edns(4096, true),
    }
    match dress {
        Dress::RecursionDesired => m.metadata.recursion_desired = true,
        Dress::Dig => {
            m.metadata.recursion_desired = true;
            m.metadata.authentic_data = true;
        }
        Dress::CheckingDisabled => m.metadata.checking_disabled = true,
        _ => {}
    }
    let mut bytes = m.to_vec().unwrap();
    // hickory writes names in lower case; write the client's own case.
    let wire = case_kept(name);
    bytes[12..12 + wire.len()].copy_from_slice(&wire);
    if let Dress::Edns(size) = dress {
        // hickory raises sizes below 512 when encoding; write the client's own.
        let at = bytes.len() - 11 + 3;
        bytes[at..at + 2].copy_from_slice(&size.to_be_bytes());
    }
    bytes
}

/// `name` in wire form, its case kept.
fn case_kept(name: &str) -> Vec<u8> {
    let mut wire = Vec::new();
    for label in name.split('.').filter(|l| !l.is_empty()) {
        wire.push(label.len() as u8);
        wire.extend_from_slice(label.as_bytes());
    }
    wire.push(0);
    wire
}

const NAMES: &[&str] = &[
    "httpbin.bar.global.",
    "HttpBin.BAR.Global.",
    "_http._tcp.httpbin.bar.global.",
    "_DNS._udp.HTTPBIN.bar.global.",
    "bar.global.",
    "global.",
    "GLOBAL.",
    "nope.bar.global.",
    "NoPe.global.",
    "w.global.",
    "x.w.global.",
    "deep.x.w.global.",
    "a.deep.x.w.global.",
    "big.bar.global.",
    "svc.other.",
    "other.",
    "no.other.",
    "sub.global.",
    "x.sub.global.",
    "example.com.",
    "com.",
    ".",
];

const TYPES: &[RecordType] = &[
    RecordType::A,
    RecordType::AAAA,
    RecordType::SRV,
    RecordType::SOA,
    RecordType::NS,
    RecordType::ANY,
    RecordType::TXT,
    RecordType::MX,
    RecordType::HTTPS,
    RecordType::CAA,
    RecordType::AXFR,
    RecordType::IXFR,
];

const DRESSES: &[Dress] = &[
    Dress::Plain,
    Dress::RecursionDesired,
    Dress::Dig,
    Dress::CheckingDisabled,
    Dress::Edns(100),
    Dress::Edns(512),
    Dress::Edns(4096),
    Dress::EdnsDnssecOk,
];

/// Byte equality with the hickory path, for every name, type and dress; the fast path must
/// answer every plain query except those a wildcard answers, zone transfers and replies over
/// the client's size.
#[test]
fn fast_replies_are_the_hickory_replies_byte_for_byte() {
    let h = handler(table());
    let table = h.answers();
    let src: SocketAddr = "127.0.0.1:5353".parse().unwrap();
    let mut out = Vec::new();
    let (mut fast, mut slow) = (0, 0);
    for (n, name) in NAMES.iter().enumerate() {
        for (t, &qtype) in TYPES.iter().enumerate() {
            for (d, &dress) in DRESSES.iter().enumerate() {
                let id = (n * 1000 + t * 10 + d) as u16;
                let raw = query(id, name, qtype, dress);
                let reference = h.hickory_reply(&raw, src).expect("a reply");
                let case = format!("{name} {qtype} {dress:?}");
                match answer(&table.prebuilt, &raw, MAX_UDP, &mut out) {
                    Some(done) => {
                        fast += 1;
                        assert_eq!(out, reference, "{case}");
                        let parsed = Message::from_vec(&out).unwrap();
                        assert_eq!(done.rcode, parsed.metadata.response_code, "{case}");
                        assert_eq!(done.qtype, u16::from(qtype), "{case}");
                    }
                    None => {
                        slow += 1;
                        // Below `*.w.global` and not a name of the table.
                        let wildcard = *name == "a.deep.x.w.global.";
                        let transfer = matches!(qtype, RecordType::AXFR | RecordType::IXFR);
                        let truncated = Message::from_vec(&reference).unwrap().metadata.truncation;
                        assert!(
                            wildcard || transfer || truncated,
                            "{case}: plain query left to the hickory path"
                        );
                    }
                }
                // And through the handler, which picks a path.
                assert_eq!(h.handle_datagram(&raw, src), Some(reference), "{case}");
            }
        }
    }
    assert!(fast > slow * 3, "fast {fast}, slow {slow}");
}

#[test]
fn other_classes_versions_and_options_take_the_hickory_path() {
    let t = table();
    let mut out = Vec::new();
    let mut chaos = Message::query();
    chaos.add_query(Query::query(
        Name::from_str("httpbin.bar.global.").unwrap(),
        RecordType::A,
    ));
    chaos.queries[0].query_class = DNSClass::CH;
    assert!(answer(&t.prebuilt, &chaos.to_vec().unwrap(), MAX_UDP, &mut out).is_none());

    let mut raw = query(1, "httpbin.bar.global.", RecordType::A, Dress::Edns(1232));
    assert!(answer(&t.prebuilt, &raw, MAX_UDP, &mut out).is_some());
    let version = raw.len() - 11 + 6;
    raw[version] = 1; // EDNS version 1: BADVERS, from the hickory path
    assert!(answer(&t.prebuilt, &raw, MAX_UDP, &mut out).is_none());
    raw[version] = 0;
    // An option (a cookie): left to hickory, which parses options.
    let rdlength = raw.len() - 1;
    raw[rdlength] = 12;
    raw.extend_from_slice(&[0, 10, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8]);
    assert!(answer(&t.prebuilt, &raw, MAX_UDP, &mut out).is_none());
}

fn plain(raw: &[u8]) -> Option<PlainQuery<'_>> {
    parse_query(raw)
}

#[test]
fn parse_reads_the_header_question_and_opt() {
    let raw = query(0x1234, "HttpBin.bar.global.", RecordType::AAAA, Dress::Dig);
    let q = plain(&raw).unwrap();
    assert_eq!(q.qtype, 28);
    assert_eq!(q.qclass, 1);
    assert_eq!(q.edns_payload, Some(1232));
    assert_eq!(q.qname, b"\x07HttpBin\x03bar\x06global\x00");
    assert_eq!(q.head.len(), 12 + q.qname.len() + 4);
    let raw = query(1, ".", RecordType::NS, Dress::Plain);
    let q = plain(&raw).unwrap();
    assert_eq!((q.qname, q.edns_payload), (&b"\x00"[..], None));
}

#[test]
fn parse_rejects_every_prefix_and_trailing_bytes() {
    for dress in [Dress::Plain, Dress::Dig] {
        let raw = query(7, "httpbin.bar.global.", RecordType::A, dress);
        for len in 0..raw.len() {
            assert_eq!(plain(&raw[..len]), None, "prefix of {len} bytes");
        }
        let mut longer = raw.clone();
        longer.push(0);
        assert_eq!(plain(&longer), None);
    }
}

#[test]
fn parse_rejects_what_is_not_a_plain_query() {
    let raw = query(7, "httpbin.bar.global.", RecordType::A, Dress::Plain);
    let with = |at: usize, value: u8| {
        let mut r = raw.clone();
        r[at] = value;
        r
    };
    assert!(plain(&raw).is_some());
    assert_eq!(plain(&with(2, 0x80)), None, "a response");
    assert_eq!(plain(&with(2, 0x20)), None, "opcode NOTIFY");
    assert_eq!(plain(&with(5, 2)), None, "two questions");
    assert_eq!(plain(&with(5, 0)), None, "no question");
    assert_eq!(plain(&with(7, 1)), None, "an answer record");
    assert_eq!(plain(&with(9, 1)), None, "an authority record");
    assert_eq!(
        plain(&with(11, 1)),
        None,
        "an additional record that is not there"
    );
    assert_eq!(plain(&with(12, 0xc0)), None, "a compression pointer");
    assert_eq!(plain(&with(12, 0x40)), None, "an extended label type");
    // A name over 255 bytes.
    let mut long = raw[..12].to_vec();
    for _ in 0..5 {
        long.push(63);
        long.extend([b'a'; 63]);
    }
    long.extend([0, 0, 1, 0, 1]);
    assert_eq!(plain(&long), None);
}

#[test]
fn parse_never_panics_on_mutations() {
    let seeds = [
        query(1, "httpbin.bar.global.", RecordType::A, Dress::Plain),
        query(
            2,
            "_http._tcp.httpbin.bar.global.",
            RecordType::SRV,
            Dress::Dig,
        ),
    ];
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let t = table();
    let mut out = Vec::new();
    for i in 0..20_000 {
        let mut packet = seeds[i % seeds.len()].clone();
        for _ in 0..1 + next() % 3 {
            let at = next() as usize % packet.len();
            packet[at] = next() as u8;
        }
        if let Some(q) = parse_query(&packet) {
            assert!(q.head.len() <= packet.len());
        }
        if answer(&t.prebuilt, &packet, MAX_UDP, &mut out).is_some() {
            assert!(out.len() <= usize::from(MAX_UDP));
            assert_eq!(out[..2], packet[..2]);
        }
    }
}

#[test]
fn nxdomain_sections_exist_for_every_length_below_a_zone() {
    let t = table();
    let apex = lower_wire(&LowerName::from(Name::from_str("global.").unwrap()));
    for len in apex.len() + 2..=MAX_NAME_LEN {
        let name = name_of_length(&apex, len).unwrap();
        assert_eq!(name.len(), len);
        assert_eq!(name_end(&name, 0), Some(len));
    }
    assert_eq!(name_of_length(&apex, apex.len() + 1), None);
    assert!(
        &t.prebuilt
            .zones
            .iter()
            .all(|z| z.nxdomain.len() == MAX_NAME_LEN + 1)
    );
}

/// Names at the length limit: the fast path and hickory agree on where it lies.
#[test]
fn names_of_every_length_match_the_hickory_path() {
    let h = handler(table());
    let table = h.answers();
    let src: SocketAddr = "127.0.0.1:5353".parse().unwrap();
    let apex = lower_wire(&LowerName::from(Name::from_str("global.").unwrap()));
    let mut out = Vec::new();
    for len in [apex.len() + 2, 100, 200, 253, 254, 255, 256, 257] {
        let Some(name) = name_of_length(&apex, len) else {
            continue;
        };
        let mut raw = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        raw.extend_from_slice(&name);
        raw.extend_from_slice(&[0, 1, 0, 1]);
        let reference = h.hickory_reply(&raw, src);
        match answer(&table.prebuilt, &raw, MAX_UDP, &mut out) {
            Some(_) => assert_eq!(Some(out.clone()), reference, "name of {len} bytes"),
            None => assert!(len > MAX_NAME_LEN, "name of {len} bytes left to hickory"),
        }
    }
}

/// Identical sections are kept once: every NODATA of a name is one allocation.
#[test]
fn identical_sections_are_shared() {
    let t = table();
    let name = lower_wire(&LowerName::from(
        Name::from_str("httpbin.bar.global.").unwrap(),
    ));
    let replies = &t.prebuilt.names[&name];
    let (soa, ns, other) = (&replies[3], &replies[4], &replies[6]);
    assert!(Arc::ptr_eq(soa.as_ref().unwrap(), other.as_ref().unwrap()));
    assert!(Arc::ptr_eq(ns.as_ref().unwrap(), other.as_ref().unwrap()));
    assert_eq!(other.as_ref().unwrap().answers, 0);
}
