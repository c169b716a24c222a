//! One request to one reply, decided from the table: header flags, response code, EDNS and the
//! record sections. Pure, so the UDP loop, the TCP path (hickory's `Server`) and the fuzz target
//! share it, and so it is tested without sockets.

use std::borrow::Cow;
use std::iter;

use hickory_proto::ProtoError;
use hickory_proto::op::{Edns, Header, MessageType, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::{DNSClass, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder, BinEncoder};
use hickory_server::server::ResponseInfo;
use hickory_server::zone_handler::{MessageRequest, MessageResponseBuilder, Queries};

use crate::table::{Lookup, Table};

/// What to send back; borrows the table's records.
#[derive(Debug)]
pub struct Reply<'t> {
    pub metadata: Metadata,
    pub answers: Cow<'t, [Record]>,
    pub authorities: &'t [Record],
    pub additionals: &'t [Record],
    /// Present when the request had EDNS (RFC 6891: then the response must too).
    pub edns: Option<Edns>,
    /// The question's type, when there was exactly one question.
    pub qtype: Option<RecordType>,
}

/// The highest EDNS version we speak.
const EDNS_VERSION: u8 = 0;

/// Decide the reply to a decoded request. `None`: send nothing (the message is a response, which
/// must never be answered, or reflection loops follow).
pub fn respond<'t>(
    table: &'t Table,
    request: &MessageRequest,
    max_udp_payload: u16,
) -> Option<Reply<'t>> {
    if request.metadata.message_type == MessageType::Response {
        return None;
    }
    let mut reply = Reply {
        metadata: Metadata::response_from_request(&request.metadata),
        answers: Cow::Borrowed(&[]),
        authorities: &[],
        additionals: &[],
        edns: None,
        qtype: None,
    };
    if let Some(req) = &request.edns {
        let mut edns = Edns::new();
        edns.set_max_payload(max_udp_payload);
        edns.set_version(EDNS_VERSION);
        reply.edns = Some(edns);
        if req.version() > EDNS_VERSION {
            reply.metadata.response_code = ResponseCode::BADVERS;
            return Some(reply);
        }
    }
    if request.metadata.op_code != OpCode::Query {
        reply.metadata.response_code = ResponseCode::NotImp;
        return Some(reply);
    }
    let [query] = request.queries.queries() else {
        reply.metadata.response_code = ResponseCode::FormErr;
        return Some(reply);
    };
    let qtype = query.query_type();
    reply.qtype = Some(qtype);
    // Only the Internet class, and no zone transfers: this is not a secondary's primary.
    if query.query_class() != DNSClass::IN || matches!(qtype, RecordType::AXFR | RecordType::IXFR) {
        reply.metadata.response_code = ResponseCode::Refused;
        return Some(reply);
    }
    match table.lookup(query.name(), qtype) {
        Lookup::Refused => reply.metadata.response_code = ResponseCode::Refused,
        Lookup::Answer {
            answers,
            additionals,
            ..
        } => {
            reply.metadata.authoritative = true;
            reply.answers = answers;
            reply.additionals = additionals;
        }
        Lookup::NoData { zone } => {
            reply.metadata.authoritative = true;
            reply.authorities = zone.soa();
        }
        Lookup::NxDomain { zone } => {
            reply.metadata.authoritative = true;
            reply.metadata.response_code = ResponseCode::NXDomain;
            reply.authorities = zone.soa();
        }
    }
    Some(reply)
}

/// Encode a reply in at most `max_size` bytes. When the records do not fit, the reply is sent
/// with TC set and no records at all (header, question and OPT only), as BIND does: a partial
/// RRset would be cached as if it were whole, and the client retries over TCP anyway.
pub fn encode(
    reply: &Reply<'_>,
    queries: &Queries,
    max_size: u16,
) -> Result<(Vec<u8>, ResponseInfo), ProtoError> {
    let mut buf = Vec::with_capacity(512);
    let header = {
        let mut encoder = BinEncoder::new(&mut buf);
        encoder.set_max_size(max_size);
        MessageResponseBuilder::new(queries, reply.edns.as_ref())
            .build(
                reply.metadata,
                reply.answers.iter(),
                reply.authorities.iter(),
                iter::empty(),
                reply.additionals.iter(),
            )
            .destructive_emit(&mut encoder)?
    };
    if !header.truncation {
        return Ok((buf, header));
    }
    buf.clear();
    let mut metadata = reply.metadata;
    metadata.truncation = true;
    let mut encoder = BinEncoder::new(&mut buf);
    encoder.set_max_size(max_size);
    let header = MessageResponseBuilder::new(queries, reply.edns.as_ref())
        .build_no_records(metadata)
        .destructive_emit(&mut encoder)?;
    Ok((buf, header))
}

/// Why a datagram could not be decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Malformed {
    /// Shorter than a DNS header: dropped.
    Short,
    /// A header, then garbage: answered FORMERR.
    Undecodable,
    /// A response sent to us: dropped (answering would let two servers loop).
    Response,
}

impl Malformed {
    pub fn as_str(self) -> &'static str {
        match self {
            Malformed::Short => "short",
            Malformed::Undecodable => "undecodable",
            Malformed::Response => "response",
        }
    }
}

/// The FORMERR reply to a message whose header decodes but whose body does not, if it should
/// get one.
pub fn form_error(raw: &[u8]) -> (Malformed, Option<Vec<u8>>) {
    let Ok(header) = Header::read(&mut BinDecoder::new(raw)) else {
        return (Malformed::Short, None);
    };
    if header.message_type == MessageType::Response {
        return (Malformed::Response, None);
    }
    let Ok(empty) = Queries::read(&mut BinDecoder::new(&[]), 0) else {
        return (Malformed::Undecodable, None);
    };
    let mut metadata = Metadata::response_from_request(&header.metadata);
    metadata.response_code = ResponseCode::FormErr;
    let mut buf = Vec::with_capacity(12);
    let mut encoder = BinEncoder::new(&mut buf);
    let sent = MessageResponseBuilder::new(&empty, None)
        .build_no_records(metadata)
        .destructive_emit(&mut encoder);
    (Malformed::Undecodable, sent.ok().map(|_| buf))
}

/// Response code labels in metrics, indexed by [`rcode_index`].
pub const RCODE_LABELS: [&str; 8] = [
    "NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED", "BADVERS", "other",
];

/// The label for a response code in metrics (bounded: anything unusual is `other`).
pub fn rcode_label(code: ResponseCode) -> &'static str {
    RCODE_LABELS[rcode_index(code)]
}

/// Where a response code's label is in [`RCODE_LABELS`].
pub fn rcode_index(code: ResponseCode) -> usize {
    // By number: 16 is both BADVERS and BADSIG to hickory, and only BADVERS to us.
    match u16::from(code) {
        n @ 0..=5 => usize::from(n),
        16 => 6,
        _ => 7,
    }
}

/// Query type labels in metrics, indexed by [`qtype_index`].
pub const QTYPE_LABELS: [&str; 11] = [
    "none", "A", "AAAA", "SRV", "SOA", "NS", "ANY", "HTTPS", "PTR", "TXT", "other",
];

/// The label for a query type in metrics (bounded: types we never answer are `other`).
pub fn qtype_label(qtype: Option<RecordType>) -> &'static str {
    QTYPE_LABELS[qtype_index(qtype)]
}

/// Where a query type's label is in [`QTYPE_LABELS`].
pub fn qtype_index(qtype: Option<RecordType>) -> usize {
    match qtype {
        None => 0,
        Some(RecordType::A) => 1,
        Some(RecordType::AAAA) => 2,
        Some(RecordType::SRV) => 3,
        Some(RecordType::SOA) => 4,
        Some(RecordType::NS) => 5,
        Some(RecordType::ANY) => 6,
        Some(RecordType::HTTPS) => 7,
        Some(RecordType::PTR) => 8,
        Some(RecordType::TXT) => 9,
        Some(_) => 10,
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::str::FromStr;

    use hickory_proto::op::{Message, Query};
    use hickory_proto::rr::Name;
    use hickory_server::net::xfer::Protocol;
    use hickory_server::server::Request;
    use registry::source::dir::snapshot_from_yaml;

    use super::*;
    use crate::table::TableOptions;

    fn table(addresses: usize) -> Table {
        let ips: Vec<String> = (0..addresses)
            .map(|i| format!("10.0.{}.{}", i / 250, i % 250 + 1))
            .collect();
        let yaml = format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: h, \
             namespace: bar}}\nspec:\n  hosts: [httpbin.bar.global, big.bar.global]\n  \
             addresses: [{}]\n",
            ips.join(", ")
        );
        let options = TableOptions {
            zones: vec!["global".into()],
            ttl: 30,
            vip_v4: None,
            vip_v6: None,
        };
        Table::build(&snapshot_from_yaml(&yaml), &options)
    }

    fn request(message: &Message) -> Request {
        let src: SocketAddr = "127.0.0.1:5353".parse().unwrap();
        Request::from_bytes(message.to_vec().unwrap(), src, Protocol::Udp).unwrap()
    }

    fn query(name: &str, qtype: RecordType) -> Message {
        let mut m = Message::query();
        m.metadata.id = 7;
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_str(name).unwrap(), qtype));
        m
    }

    fn round_trip(t: &Table, m: &Message, max: u16) -> Message {
        let req = request(m);
        let reply = respond(t, &req, 1232).expect("a reply");
        let (bytes, _) = encode(&reply, &req.queries, max).unwrap();
        Message::from_vec(&bytes).unwrap()
    }

    #[test]
    fn answers_are_authoritative_and_copy_id_and_rd() {
        let t = table(1);
        let r = round_trip(&t, &query("httpbin.bar.global.", RecordType::A), 512);
        assert_eq!(r.metadata.id, 7);
        assert_eq!(r.metadata.message_type, MessageType::Response);
        assert!(r.metadata.authoritative);
        assert!(r.metadata.recursion_desired);
        assert!(!r.metadata.recursion_available);
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert_eq!(r.answers.len(), 1);
        assert_eq!(r.queries.len(), 1);
    }

    #[test]
    fn negative_answers_carry_the_soa() {
        let t = table(1);
        let nodata = round_trip(&t, &query("httpbin.bar.global.", RecordType::AAAA), 512);
        assert_eq!(nodata.metadata.response_code, ResponseCode::NoError);
        assert!(nodata.answers.is_empty());
        assert_eq!(nodata.authorities[0].record_type(), RecordType::SOA);
        let nx = round_trip(&t, &query("nope.bar.global.", RecordType::A), 512);
        assert_eq!(nx.metadata.response_code, ResponseCode::NXDomain);
        assert!(nx.metadata.authoritative);
        assert_eq!(nx.authorities[0].record_type(), RecordType::SOA);
        let refused = round_trip(&t, &query("example.com.", RecordType::A), 512);
        assert_eq!(refused.metadata.response_code, ResponseCode::Refused);
        assert!(!refused.metadata.authoritative);
        assert!(refused.authorities.is_empty());
    }

    #[test]
    fn refuses_other_classes_and_transfers_and_rejects_odd_requests() {
        let t = table(1);
        let mut chaos = query("version.bind.", RecordType::TXT);
        chaos.queries[0].query_class = DNSClass::CH;
        assert_eq!(
            round_trip(&t, &chaos, 512).metadata.response_code,
            ResponseCode::Refused
        );
        let axfr = query("global.", RecordType::AXFR);
        assert_eq!(
            round_trip(&t, &axfr, 512).metadata.response_code,
            ResponseCode::Refused
        );
        let mut notify = query("global.", RecordType::SOA);
        notify.metadata.op_code = OpCode::Notify;
        assert_eq!(
            round_trip(&t, &notify, 512).metadata.response_code,
            ResponseCode::NotImp
        );
        let mut two = query("httpbin.bar.global.", RecordType::A);
        two.add_query(Query::query(
            Name::from_str("big.bar.global.").unwrap(),
            RecordType::A,
        ));
        assert_eq!(
            round_trip(&t, &two, 512).metadata.response_code,
            ResponseCode::FormErr
        );
        let mut response = query("httpbin.bar.global.", RecordType::A);
        response.metadata.message_type = MessageType::Response;
        assert!(respond(&t, &request(&response), 1232).is_none());
    }

    #[test]
    fn edns_is_echoed_and_unknown_versions_get_badvers() {
        let t = table(1);
        let mut m = query("httpbin.bar.global.", RecordType::A);
        let mut edns = Edns::new();
        edns.set_max_payload(4096);
        m.set_edns(edns.clone());
        let r = round_trip(&t, &m, 4096);
        let got = r.edns.as_ref().expect("EDNS in, EDNS out");
        assert_eq!(got.max_payload(), 1232, "we advertise our own limit");
        edns.set_version(1);
        m.set_edns(edns);
        let r = round_trip(&t, &m, 4096);
        // 16 is BADVERS (hickory decodes it by its other name, BADSIG).
        assert_eq!(u16::from(r.metadata.response_code), 16);
        assert_eq!(rcode_label(r.metadata.response_code), "BADVERS");
        assert!(r.answers.is_empty());
    }

    #[test]
    fn oversized_answers_are_truncated_to_nothing() {
        let t = table(60); // 60 A records: ~1 KB, over 512
        let r = round_trip(&t, &query("big.bar.global.", RecordType::A), 512);
        assert!(r.metadata.truncation);
        assert!(r.answers.is_empty());
        assert_eq!(r.queries.len(), 1, "the question stays");
        let full = round_trip(&t, &query("big.bar.global.", RecordType::A), u16::MAX);
        assert!(!full.metadata.truncation);
        assert_eq!(full.answers.len(), 60);
    }

    #[test]
    fn form_errors() {
        assert_eq!(form_error(&[1, 2, 3]), (Malformed::Short, None));
        // A query header claiming one question, then nothing.
        let raw = [0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 0xff];
        let (why, reply) = form_error(&raw);
        assert_eq!(why, Malformed::Undecodable);
        let reply = Message::from_vec(&reply.unwrap()).unwrap();
        assert_eq!(reply.metadata.id, 0x1234);
        assert_eq!(reply.metadata.response_code, ResponseCode::FormErr);
        let mut resp = raw;
        resp[2] |= 0x80;
        assert_eq!(form_error(&resp), (Malformed::Response, None));
    }
}
