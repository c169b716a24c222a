//! The precomputed answer path: replies to plain UDP queries assembled from bytes prepared when
//! the table is built, without decoding the request into a hickory message.
//!
//! ```text
//!  datagram ─▶ parse_query (header + one question, by hand) ─▶ Prebuilt::sections
//!                 │ not a plain query                              │ (lower-cased name, type)
//!                 ▼                                                ▼
//!            None: the hickory path          header ++ question as received ++ sections ++ OPT
//! ```
//!
//! - [`parse_query`] is sans-IO: a plain query is opcode QUERY, QR clear, exactly one question
//!   with an uncompressed name, no answer or authority records, and either nothing more or one
//!   OPT record (root owner, EDNS version 0, no options) that ends the datagram.
//! - [`Prebuilt`] holds, for every name of the table and every query type, the record sections
//!   exactly as the hickory path ([`crate::respond::respond`] then [`crate::respond::encode`])
//!   writes them, with the counts, the response code and AA; and per zone and question length,
//!   the NXDOMAIN sections. Names below a wildcard that are not in the table are left to the
//!   hickory path (the answer's owner is the question's name).
//! - Byte equality holds because the hickory path copies the question as received and never
//!   points a later name at it (its compression candidate for the question spans the name, type
//!   and class, which no name matches), and every owner name comes from the table in lower case:
//!   so the sections depend on the question's length only, and are encoded at the offset they
//!   will occupy. `wire/tests.rs` checks the two paths reply with the same bytes.
//!
//! Everything else (other classes, zone transfers, several questions, EDNS options or versions,
//! replies over the client's size) returns `None`, and the caller takes the hickory path.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;

use hickory_proto::op::{Message, MessageType, Metadata, OpCode, Query, ResponseCode};
use hickory_proto::rr::{LowerName, Name, RecordType};
use hickory_proto::serialize::binary::BinDecoder;
use hickory_server::net::xfer::Protocol;
use hickory_server::server::Request;
use hickory_server::zone_handler::Queries;

use crate::respond::{self, Reply};
use crate::table::Table;

const HEADER_LEN: usize = 12;
/// Longest name in wire form (RFC 1035 3.1).
const MAX_NAME_LEN: usize = 255;
/// An OPT record without options: root owner, type, class (size), TTL (flags), RDLENGTH.
const OPT_LEN: usize = 11;
const TYPE_OPT: u16 = 41;
const CLASS_IN: u16 = 1;
const TYPE_IXFR: u16 = 251;
const TYPE_AXFR: u16 = 252;
/// No EDNS: RFC 1035's limit.
const CLASSIC_UDP_LIMIT: u16 = 512;

/// The facts of a plain query that the reply needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlainQuery<'a> {
    /// The header and the question, as received.
    pub head: &'a [u8],
    /// The question's name in wire form, terminating zero included, case as received.
    pub qname: &'a [u8],
    pub qtype: u16,
    pub qclass: u16,
    /// The EDNS UDP payload size the client advertised, when it sent an OPT record.
    pub edns_payload: Option<u16>,
}

/// Read a datagram's header and question. `None` when it is not a plain query (see the module
/// documentation): the hickory path then decides, including every error reply.
pub fn parse_query(raw: &[u8]) -> Option<PlainQuery<'_>> {
    let header = raw.get(..HEADER_LEN)?;
    let count = |at: usize| u16::from_be_bytes([header[at], header[at + 1]]);
    let is_query = header[2] & 0x80 == 0;
    let opcode = (header[2] >> 3) & 0x0f;
    if !is_query || opcode != 0 || count(4) != 1 || count(6) != 0 || count(8) != 0 {
        return None;
    }
    let additionals = count(10);
    let name_end = name_end(raw, HEADER_LEN)?;
    let question_end = name_end + 4;
    let question = raw.get(name_end..question_end)?;
    let qtype = u16::from_be_bytes([question[0], question[1]]);
    let qclass = u16::from_be_bytes([question[2], question[3]]);
    let edns_payload = match additionals {
        0 if raw.len() == question_end => None,
        1 => Some(plain_opt(&raw[question_end..])?),
        _ => return None,
    };
    Some(PlainQuery {
        head: &raw[..question_end],
        qname: &raw[HEADER_LEN..name_end],
        qtype,
        qclass,
        edns_payload,
    })
}

/// Where an uncompressed name starting at `start` ends (after its zero). `None` for pointers,
/// extended label types, names over 255 bytes or running past the datagram.
fn name_end(raw: &[u8], start: usize) -> Option<usize> {
    let mut at = start;
    loop {
        let len = usize::from(*raw.get(at)?);
        if len & 0xc0 != 0 {
            return None;
        }
        at += 1 + len;
        if at - start > MAX_NAME_LEN {
            return None;
        }
        if len == 0 {
            return Some(at);
        }
    }
}

/// The UDP payload size of an OPT record that is exactly `rest`, if it is a plain one: root
/// owner, EDNS version 0, no options.
fn plain_opt(rest: &[u8]) -> Option<u16> {
    let [0, t0, t1, s0, s1, _ext_rcode, version, _f0, _f1, 0, 0] = *rest else {
        return None;
    };
    if u16::from_be_bytes([t0, t1]) != TYPE_OPT || version != 0 {
        return None;
    }
    Some(u16::from_be_bytes([s0, s1]))
}

/// What the fast path answered, for the metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Answered {
    pub qtype: u16,
    pub rcode: ResponseCode,
}

/// Write the reply to `raw` into `out`, if the fast path can: `None` leaves `out` in an
/// unspecified state and the caller takes the hickory path.
pub fn answer(
    prebuilt: &Prebuilt,
    raw: &[u8],
    max_udp_payload: u16,
    out: &mut Vec<u8>,
) -> Option<Answered> {
    let query = parse_query(raw)?;
    if query.qclass != CLASS_IN || matches!(query.qtype, TYPE_AXFR | TYPE_IXFR) {
        return None;
    }
    let mut lower = [0u8; MAX_NAME_LEN];
    let name = &mut lower[..query.qname.len()];
    name.copy_from_slice(query.qname);
    // Length bytes are at most 63, below b'A': only label bytes change.
    name.make_ascii_lowercase();
    let sections = prebuilt.sections(name, query.qtype)?;

    // As the hickory path: the client's EDNS size (at least 512), up to our own limit.
    let limit = query
        .edns_payload
        .map_or(CLASSIC_UDP_LIMIT, |size| size.max(CLASSIC_UDP_LIMIT))
        .min(max_udp_payload);
    let opt_len = if query.edns_payload.is_some() {
        OPT_LEN
    } else {
        0
    };
    let len = query.head.len() + sections.bytes.len() + opt_len;
    if len > usize::from(limit) {
        return None; // the hickory path sends it truncated
    }

    out.clear();
    out.reserve(len);
    out.extend_from_slice(query.head);
    let request = &query.head[..HEADER_LEN];
    // QR, opcode QUERY, AA as decided, TC clear, RD copied; RA, Z and AD clear, CD copied.
    out[2] = 0x80 | if sections.authoritative { 0x04 } else { 0 } | (request[2] & 0x01);
    out[3] = (request[3] & 0x10) | sections.rcode.low();
    let additionals = sections.additionals + u16::from(opt_len != 0);
    out[6..8].copy_from_slice(&sections.answers.to_be_bytes());
    out[8..10].copy_from_slice(&sections.authorities.to_be_bytes());
    out[10..12].copy_from_slice(&additionals.to_be_bytes());
    out.extend_from_slice(&sections.bytes);
    if opt_len != 0 {
        // Our own limit, version 0, no flags, no options (as `respond` builds its `Edns`).
        let [hi, lo] = max_udp_payload.max(CLASSIC_UDP_LIMIT).to_be_bytes();
        out.extend_from_slice(&[0, 0, TYPE_OPT as u8, hi, lo, 0, 0, 0, 0, 0, 0]);
    }
    Some(Answered {
        qtype: query.qtype,
        rcode: sections.rcode,
    })
}

/// The record sections of one reply, encoded at the offset they take after the question.
/// Shared: most names' NODATA replies are the same bytes (the SOA at the same offset).
#[derive(Debug, PartialEq, Eq, Hash)]
struct Sections {
    rcode: ResponseCode,
    authoritative: bool,
    answers: u16,
    authorities: u16,
    additionals: u16,
    bytes: Box<[u8]>,
}

/// Query types with a prebuilt reply per name; every other type gets the `Other` slot's.
const NAME_TYPES: [RecordType; 7] = [
    RecordType::A,
    RecordType::AAAA,
    RecordType::SRV,
    RecordType::SOA,
    RecordType::NS,
    RecordType::ANY,
    // Stands for every type the table holds no record of (`respond` treats them all alike).
    RecordType::TXT,
];

fn type_slot(qtype: u16) -> usize {
    match qtype {
        1 => 0,
        28 => 1,
        33 => 2,
        6 => 3,
        2 => 4,
        255 => 5,
        _ => 6,
    }
}

/// One served zone: its apex, and its NXDOMAIN sections by question name length.
#[derive(Debug)]
struct ZoneReplies {
    apex: Box<[u8]>,
    nxdomain: Vec<Option<Arc<Sections>>>,
}

/// Every reply of a table that the fast path can send, prepared when the table is built.
#[derive(Debug, Default)]
pub struct Prebuilt {
    /// By lower-cased wire name: the table's names (hosts, SRV names, empty non-terminals) and
    /// the zone apexes. `None` in a slot: encoding failed; the hickory path answers.
    names: HashMap<Box<[u8]>, [Option<Arc<Sections>>; NAME_TYPES.len()]>,
    zones: Vec<ZoneReplies>,
    /// The names wildcards answer below (`w.global.` for `*.w.global`), lower-cased wire form.
    wildcards: HashSet<Box<[u8]>>,
    refused: Option<Arc<Sections>>,
}

impl Prebuilt {
    pub fn build(table: &Table) -> Prebuilt {
        let mut shared = HashSet::new();
        let mut share = |sections: Option<Sections>| sections.map(|s| intern(&mut shared, s));
        let mut names = HashMap::new();
        let apexes = table.zones().map(|z| &z.apex);
        for name in table.exact_names().chain(apexes) {
            let wire = lower_wire(name);
            if names.contains_key(&wire) {
                continue;
            }
            let replies = NAME_TYPES.map(|qtype| share(decided_sections(table, name, qtype)));
            names.insert(wire, replies);
        }
        let zones = table
            .zones()
            .map(|zone| {
                let apex = lower_wire(&zone.apex);
                let nxdomain = (0..=MAX_NAME_LEN)
                    .map(|len| {
                        let mut reply = reply_without_records(ResponseCode::NXDomain);
                        reply.metadata.authoritative = true;
                        reply.authorities = zone.soa();
                        let qname = name_of_length(&apex, len)?;
                        share(sections_of(&reply, &qname))
                    })
                    .collect();
                ZoneReplies { apex, nxdomain }
            })
            .collect();
        let refused = share(sections_of(
            &reply_without_records(ResponseCode::Refused),
            &[0], // any name: there are no records
        ));
        Prebuilt {
            names,
            zones,
            wildcards: table.wildcard_parents().map(lower_wire).collect(),
            refused,
        }
    }

    /// The sections for a lower-cased wire name; `None`: the hickory path answers.
    fn sections(&self, name: &[u8], qtype: u16) -> Option<&Sections> {
        if let Some(replies) = self.names.get(name) {
            return replies[type_slot(qtype)].as_deref();
        }
        // Not a name of the table: REFUSED outside the zones, else NXDOMAIN unless a wildcard
        // answers it (as `Table::locate`).
        let Some((zone, apex_at)) = self.zone_of(name) else {
            return self.refused.as_deref();
        };
        if self.below_wildcard(name, apex_at) {
            return None;
        }
        zone.nxdomain.get(name.len())?.as_deref()
    }

    /// The most specific zone holding `name`, and where its apex starts in `name`.
    fn zone_of(&self, name: &[u8]) -> Option<(&ZoneReplies, usize)> {
        let mut at = 0;
        loop {
            let suffix = name.get(at..)?;
            if let Some(zone) = self.zones.iter().find(|z| *z.apex == *suffix) {
                return Some((zone, at));
            }
            match usize::from(*suffix.first()?) {
                0 => return None,
                len => at += 1 + len,
            }
        }
    }

    /// Whether a wildcard strictly above `name`, up to its zone apex, covers it.
    fn below_wildcard(&self, name: &[u8], apex_at: usize) -> bool {
        if self.wildcards.is_empty() {
            return false;
        }
        let mut at = 0;
        while at < apex_at {
            at += 1 + usize::from(name[at]);
            if self.wildcards.contains(&name[at..]) {
                return true;
            }
        }
        false
    }
}

/// The one shared copy of `sections`.
fn intern(shared: &mut HashSet<Arc<Sections>>, sections: Sections) -> Arc<Sections> {
    if let Some(known) = shared.get(&sections) {
        return known.clone();
    }
    let sections = Arc::new(sections);
    shared.insert(sections.clone());
    sections
}

/// A name in wire form, lower case.
fn lower_wire(name: &LowerName) -> Box<[u8]> {
    let name = Name::from(name.clone());
    let mut wire = Vec::with_capacity(MAX_NAME_LEN);
    for label in name.iter() {
        wire.push(label.len() as u8);
        wire.extend(label.iter().map(u8::to_ascii_lowercase));
    }
    wire.push(0);
    wire.into_boxed_slice()
}

/// A name of `len` wire bytes below `apex` (`xxx.xxx.<apex>`), if there is one.
fn name_of_length(apex: &[u8], len: usize) -> Option<Vec<u8>> {
    let mut rest = len.checked_sub(apex.len())?;
    if rest < 2 {
        return None;
    }
    let mut wire = Vec::with_capacity(len);
    while rest > 0 {
        // A label takes 2..=64 bytes; never leave a single byte behind.
        let take = match rest {
            0..=64 => rest,
            65 => 62,
            _ => 64,
        };
        wire.push((take - 1) as u8);
        wire.extend(std::iter::repeat_n(b'x', take - 1));
        rest -= take;
    }
    wire.extend_from_slice(apex);
    Some(wire)
}

/// The reply `respond` decides for a plain query, encoded as the hickory path encodes it.
fn decided_sections(table: &Table, name: &LowerName, qtype: RecordType) -> Option<Sections> {
    let mut message = Message::query();
    message.add_query(Query::query(Name::from(name.clone()), qtype));
    let bytes = message.to_vec().ok()?;
    let src = SocketAddr::from(([127, 0, 0, 1], 53));
    let request = Request::from_bytes(bytes, src, Protocol::Udp).ok()?;
    let reply = respond::respond(table, &request, CLASSIC_UDP_LIMIT)?;
    let (encoded, _) = respond::encode(&reply, &request.queries, u16::MAX).ok()?;
    split_sections(&encoded, request.queries.as_bytes().len())
}

/// A response with no records and the given code.
fn reply_without_records(rcode: ResponseCode) -> Reply<'static> {
    let mut metadata = Metadata::new(0, MessageType::Response, OpCode::Query);
    metadata.response_code = rcode;
    Reply {
        metadata,
        answers: std::borrow::Cow::Borrowed(&[]),
        authorities: &[],
        additionals: &[],
        edns: None,
        qtype: None,
    }
}

/// Encode `reply` after a question of `qname` (wire form), and keep what follows the question.
fn sections_of(reply: &Reply<'_>, qname: &[u8]) -> Option<Sections> {
    let mut question = qname.to_vec();
    question.extend_from_slice(&[0, 1, 0, 1]); // A, IN: only the length matters
    let queries = Queries::read(&mut BinDecoder::new(&question), 1).ok()?;
    let (encoded, _) = respond::encode(reply, &queries, u16::MAX).ok()?;
    split_sections(&encoded, question.len())
}

/// Header facts and the bytes after the header and a question of `question_len` bytes.
fn split_sections(encoded: &[u8], question_len: usize) -> Option<Sections> {
    let count = |at: usize| u16::from_be_bytes([encoded[at], encoded[at + 1]]);
    let header = encoded.get(..HEADER_LEN)?;
    if header[2] & 0x02 != 0 {
        return None; // truncated: never with no size limit, but then not ours to send
    }
    // Response codes above 15 need EDNS: `respond` gives them only to EDNS requests.
    let rcode = ResponseCode::from_low(header[3] & 0x0f);
    Some(Sections {
        rcode,
        authoritative: header[2] & 0x04 != 0,
        answers: count(6),
        authorities: count(8),
        additionals: count(10),
        bytes: encoded.get(HEADER_LEN + question_len..)?.into(),
    })
}

#[cfg(test)]
mod tests;
