//! The answer table: a pure function from (snapshot, options) to every record the server serves.
//!
//! Built once per snapshot change, off the request path, then swapped in whole; answering is one
//! hash lookup (plus a short walk up the name for wildcards). The rules:
//!
//! - Hosts of ServiceEntries that fall in a served zone get A/AAAA from the entry's `addresses`
//!   (a bare address or a /32 or /128; wider CIDRs are skipped and noted), or a stable VIP
//!   ([`vip`]) when the entry has none. `resolution: NONE` entries without addresses get no name.
//! - Two entries claiming one host: the oldest (creationTimestamp, then namespace/name) wins; the
//!   conflict is recorded for logs, metrics and `/debug/explain`.
//! - `*.foo.global` answers any name below `foo.global` that has no records of its own; the exact
//!   host wins over a wildcard, and the wildcard never answers `foo.global` itself.
//! - `_<port-name>._<tcp|udp>.<host>` SRV for each named port, with the host's addresses as
//!   additional records.
//! - Every ancestor of a name, up to the zone apex, exists (an empty non-terminal): NODATA, never
//!   NXDOMAIN, so resolvers that minimise query names keep going.

pub mod vip;

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;

use hickory_proto::rr::rdata::{A, AAAA, NS, SOA, SRV};
use hickory_proto::rr::{LowerName, Name, RData, Record, RecordType};
use registry::Cidr;
use registry::snapshot::{ServiceEntryInfo, Snapshot};
use serde::Serialize;

/// What a table is built with (from [`crate::Config::table_options`]).
#[derive(Clone, Debug, Serialize)]
pub struct TableOptions {
    /// Lower case, no trailing dot.
    pub zones: Vec<String>,
    pub ttl: u32,
    pub vip_v4: Option<Cidr>,
    pub vip_v6: Option<Cidr>,
}

/// Every answer the server gives for one snapshot. Immutable once built.
#[derive(Debug, Default)]
pub struct Table {
    /// The snapshot version it was built from (also the zones' SOA serial).
    pub version: u64,
    zones: Vec<Zone>,
    /// Exact names: hosts, SRV names and the empty non-terminals above them.
    names: HashMap<LowerName, Node>,
    /// Wildcards keyed by the name below which they answer (`foo.global.` for `*.foo.global`).
    wildcards: HashMap<LowerName, Node>,
    /// Per host, what answers it and why: for `/config_dump` and `/debug/explain`.
    pub hosts: BTreeMap<String, HostInfo>,
    pub conflicts: Vec<Conflict>,
    /// Things skipped while building (bad hosts, CIDR addresses, a full VIP range).
    pub notes: Vec<String>,
    /// ServiceEntries that contributed at least one name.
    pub entries_served: usize,
}

/// One served zone: its apex records.
#[derive(Debug)]
pub struct Zone {
    pub apex: LowerName,
    /// The apex as configured: lower case, no trailing dot.
    pub name: String,
    soa: Vec<Record>,
    ns: Vec<Record>,
}

impl Zone {
    /// The SOA record, for the authority section of negative answers.
    pub fn soa(&self) -> &[Record] {
        &self.soa
    }
}

/// The records of one name. All empty: a name that exists only because names below it do.
#[derive(Debug, Default)]
pub struct Node {
    a: Vec<Record>,
    aaaa: Vec<Record>,
    srv: Vec<Record>,
    /// The SRV targets' addresses.
    additionals: Vec<Record>,
    /// A host (claimed by an entry) rather than an empty non-terminal.
    host: bool,
}

impl Node {
    fn records(&self, qtype: RecordType) -> Cow<'_, [Record]> {
        match qtype {
            RecordType::A => Cow::Borrowed(&self.a),
            RecordType::AAAA => Cow::Borrowed(&self.aaaa),
            RecordType::SRV => Cow::Borrowed(&self.srv),
            RecordType::ANY => Cow::Owned(
                self.a
                    .iter()
                    .chain(&self.aaaa)
                    .chain(&self.srv)
                    .cloned()
                    .collect(),
            ),
            _ => Cow::Borrowed(&[]),
        }
    }

    fn additionals(&self, qtype: RecordType) -> &[Record] {
        match qtype {
            RecordType::SRV | RecordType::ANY => &self.additionals,
            _ => &[],
        }
    }
}

/// Where a name is in the table, zone and place.
#[derive(Debug)]
pub struct Found<'t> {
    pub zone: &'t Zone,
    pub place: Place<'t>,
}

/// Which rule a name falls under.
#[derive(Debug)]
pub enum Place<'t> {
    /// The zone apex: SOA, NS, and any host written as the zone itself.
    Apex(Option<&'t Node>),
    /// A host or an SRV name.
    Exact(&'t Node),
    /// Answered by the wildcard below the given name (`foo.global.` for `*.foo.global`).
    Wildcard(&'t LowerName, &'t Node),
    /// Exists only because names below it do: NODATA.
    EmptyNonTerminal,
    /// NXDOMAIN.
    Missing,
}

/// The result of looking a question up.
#[derive(Debug)]
pub enum Lookup<'t> {
    /// Not in any served zone.
    Refused,
    /// Authoritative answer (`answers` may hold a synthesized wildcard record).
    Answer {
        zone: &'t Zone,
        answers: Cow<'t, [Record]>,
        additionals: &'t [Record],
    },
    /// The name exists but has no record of the asked type.
    NoData { zone: &'t Zone },
    /// No such name in the zone.
    NxDomain { zone: &'t Zone },
}

/// Which entry answers a host, and how its addresses were chosen.
#[derive(Clone, Debug, Serialize)]
pub struct HostInfo {
    pub zone: String,
    /// `namespace/name` of the winning ServiceEntry.
    pub entry: String,
    pub creation_timestamp: String,
    pub addresses: Vec<IpAddr>,
    /// `addresses` of the entry, or a VIP and how it was allocated.
    pub address_source: String,
    pub srv: Vec<String>,
    /// Entries that also claim the host and lost.
    pub shadowed: Vec<String>,
    pub notes: Vec<String>,
}

/// Two entries claiming one host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Conflict {
    pub host: String,
    pub winner: String,
    pub loser: String,
}

impl std::fmt::Display for Conflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ServiceEntries {} and {} both claim host {}: {} answers (older by creationTimestamp, \
             then namespace/name); remove the host from one of them",
            self.winner, self.loser, self.host, self.winner
        )
    }
}

/// A host claimed by an entry, before addresses are decided.
struct Claim<'s> {
    host: String,
    zone: usize,
    entry: &'s ServiceEntryInfo,
}

impl Table {
    pub fn build(snapshot: &Snapshot, options: &TableOptions) -> Table {
        let mut table = Table {
            version: snapshot.status.version,
            ..Table::default()
        };
        table.zones = options
            .zones
            .iter()
            .filter_map(|z| zone_records(z, snapshot.status.version, options.ttl))
            .collect();
        let claims = claim_hosts(
            &table.zones,
            snapshot,
            &mut table.notes,
            &mut table.conflicts,
        );
        let addresses = decide_addresses(&claims, options, &mut table);
        let mut served = HashSet::new();
        for claim in &claims {
            let Some(ips) = addresses.get(claim.host.as_str()) else {
                continue;
            };
            served.insert((&claim.entry.namespace, &claim.entry.name));
            table.add_host(claim, ips, options.ttl);
        }
        table.entries_served = served.len();
        table.add_empty_non_terminals();
        table
    }

    /// Answer a question. `qname` is lower case (hickory's `LowerQuery` gives it so).
    pub fn lookup(&self, qname: &LowerName, qtype: RecordType) -> Lookup<'_> {
        let Some(found) = self.locate(qname) else {
            return Lookup::Refused;
        };
        let zone = found.zone;
        match found.place {
            Place::Apex(node) => self.apex_answer(zone, node, qtype),
            Place::Exact(node) => answer(zone, node.records(qtype), node.additionals(qtype)),
            Place::Wildcard(_, node) => {
                let answers = node
                    .records(qtype)
                    .iter()
                    .map(|r| Record::from_rdata(Name::from(qname.clone()), r.ttl, r.data.clone()))
                    .collect::<Vec<_>>();
                answer(zone, Cow::Owned(answers), &[])
            }
            Place::EmptyNonTerminal => Lookup::NoData { zone },
            Place::Missing => Lookup::NxDomain { zone },
        }
    }

    /// Where a name lands: the one place the precedence rules live (apex, then an exact name with
    /// records, then the nearest wildcard above, then an empty non-terminal).
    pub fn locate(&self, qname: &LowerName) -> Option<Found<'_>> {
        let zone = self.zone_of(qname)?;
        let node = self.names.get(qname);
        let place = if *qname == zone.apex {
            Place::Apex(node)
        } else if let Some(node) = node.filter(|n| n.host || !n.srv.is_empty()) {
            Place::Exact(node)
        } else if let Some((parent, node)) = self.wildcard_for(qname, zone) {
            Place::Wildcard(parent, node)
        } else if node.is_some() {
            Place::EmptyNonTerminal
        } else {
            Place::Missing
        };
        Some(Found { zone, place })
    }

    /// The most specific served zone holding `name`.
    fn zone_of(&self, name: &LowerName) -> Option<&Zone> {
        self.zones
            .iter()
            .filter(|z| z.apex.zone_of(name))
            .max_by_key(|z| z.apex.num_labels())
    }

    fn apex_answer<'t>(
        &'t self,
        zone: &'t Zone,
        node: Option<&'t Node>,
        qtype: RecordType,
    ) -> Lookup<'t> {
        let host = node.map(|n| n.records(qtype)).unwrap_or(Cow::Borrowed(&[]));
        let records: Cow<'t, [Record]> = match qtype {
            RecordType::SOA => Cow::Borrowed(&zone.soa),
            RecordType::NS => Cow::Borrowed(&zone.ns),
            RecordType::ANY => {
                let mut all = zone.soa.clone();
                all.extend(zone.ns.iter().cloned());
                all.extend(host.iter().cloned());
                Cow::Owned(all)
            }
            _ => host,
        };
        answer(zone, records, &[])
    }

    /// The nearest wildcard strictly above `qname`, up to and including the zone apex.
    fn wildcard_for<'t>(
        &'t self,
        qname: &LowerName,
        zone: &Zone,
    ) -> Option<(&'t LowerName, &'t Node)> {
        if self.wildcards.is_empty() {
            return None;
        }
        let mut name = qname.base_name();
        loop {
            if let Some(found) = self.wildcards.get_key_value(&name) {
                return Some(found);
            }
            if name == zone.apex || name.is_root() {
                return None;
            }
            name = name.base_name();
        }
    }

    fn add_host(&mut self, claim: &Claim<'_>, ips: &[IpAddr], ttl: u32) {
        let wildcard = claim.host.starts_with("*.");
        let Ok(owner) = Name::from_ascii(format!("{}.", claim.host)) else {
            return;
        };
        let mut node = Node {
            host: true,
            ..Node::default()
        };
        for ip in ips {
            let rdata = match ip {
                IpAddr::V4(v4) => RData::A(A::from(*v4)),
                IpAddr::V6(v6) => RData::AAAA(AAAA::from(*v6)),
            };
            let record = Record::from_rdata(owner.clone(), ttl, rdata);
            if ip.is_ipv4() {
                node.a.push(record);
            } else {
                node.aaaa.push(record);
            }
        }
        if wildcard {
            self.wildcards
                .insert(LowerName::from(owner.base_name()), node);
            return;
        }
        let srv = srv_names(claim.entry, &claim.host);
        let additionals: Vec<Record> = node.a.iter().chain(&node.aaaa).cloned().collect();
        let mut srv_shown = Vec::new();
        for (name, port) in srv {
            let Ok(srv_name) = Name::from_ascii(format!("{name}.")) else {
                continue;
            };
            let record = Record::from_rdata(
                srv_name.clone(),
                ttl,
                RData::SRV(SRV::new(0, 100, port, owner.clone())),
            );
            srv_shown.push(format!("{name} SRV 0 100 {port} {}.", claim.host));
            let srv_node = self.names.entry(LowerName::from(srv_name)).or_default();
            srv_node.srv.push(record);
            srv_node.additionals = additionals.clone();
        }
        if let Some(info) = self.hosts.get_mut(&claim.host) {
            info.srv = srv_shown;
        }
        let slot = self.names.entry(LowerName::from(owner)).or_default();
        node.srv = std::mem::take(&mut slot.srv);
        node.additionals = std::mem::take(&mut slot.additionals);
        *slot = node;
    }

    /// Every ancestor of every name, below its zone apex, exists.
    fn add_empty_non_terminals(&mut self) {
        let owners: Vec<LowerName> = self
            .names
            .keys()
            .cloned()
            .chain(self.wildcards.keys().map(|parent| {
                // The `*` owner itself counts as a name: its parent is an ancestor.
                LowerName::from(
                    Name::from(parent.clone())
                        .prepend_label("*")
                        .unwrap_or_default(),
                )
            }))
            .collect();
        for owner in owners {
            let Some(apex) = self.zone_of(&owner).map(|z| z.apex.clone()) else {
                continue;
            };
            let mut name = owner.base_name();
            while name != apex && apex.zone_of(&name) && !name.is_root() {
                self.names.entry(name.clone()).or_default();
                name = name.base_name();
            }
        }
    }

    /// Every exact name of the table: hosts, SRV names and empty non-terminals.
    pub fn exact_names(&self) -> impl Iterator<Item = &LowerName> {
        self.names.keys()
    }

    /// The names wildcards answer below (`foo.global.` for `*.foo.global`).
    pub fn wildcard_parents(&self) -> impl Iterator<Item = &LowerName> {
        self.wildcards.keys()
    }

    /// Every name the table answers for (hosts and SRV names; wildcards as `*.x`), sorted.
    pub fn names(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .names
            .iter()
            .filter(|(_, n)| n.host || !n.srv.is_empty())
            .map(|(k, _)| k.to_string())
            .chain(self.wildcards.keys().map(|k| format!("*.{k}")))
            .collect();
        out.sort();
        out
    }

    pub fn zones(&self) -> impl Iterator<Item = &Zone> {
        self.zones.iter()
    }
}

fn answer<'t>(zone: &'t Zone, answers: Cow<'t, [Record]>, additionals: &'t [Record]) -> Lookup<'t> {
    if answers.is_empty() {
        Lookup::NoData { zone }
    } else {
        Lookup::Answer {
            zone,
            answers,
            additionals,
        }
    }
}

/// The SOA and NS of a zone. The name server is `ns.dns.<zone>`, as CoreDNS's kubernetes plugin
/// names itself; the serial is the snapshot version, so it changes whenever the data does.
fn zone_records(zone: &str, version: u64, ttl: u32) -> Option<Zone> {
    let apex = Name::from_ascii(format!("{zone}.")).ok()?;
    let ns = Name::from_ascii(format!("ns.dns.{zone}.")).ok()?;
    let mail = Name::from_ascii(format!("hostmaster.{zone}.")).ok()?;
    let soa = SOA::new(ns.clone(), mail, version as u32, 3600, 600, 86400, ttl);
    Some(Zone {
        apex: LowerName::from(apex.clone()),
        name: zone.to_string(),
        soa: vec![Record::from_rdata(apex.clone(), ttl, RData::SOA(soa))],
        ns: vec![Record::from_rdata(apex, ttl, RData::NS(NS(ns)))],
    })
}

/// Which entry owns each host: the oldest claim wins. Entries that would get no name
/// (`resolution: NONE` without addresses) claim nothing.
fn claim_hosts<'s>(
    zones: &[Zone],
    snapshot: &'s Snapshot,
    notes: &mut Vec<String>,
    conflicts: &mut Vec<Conflict>,
) -> Vec<Claim<'s>> {
    let mut entries: Vec<&ServiceEntryInfo> = snapshot.service_entries.iter().collect();
    entries.sort_by(|a, b| {
        (&a.creation_timestamp, &a.namespace, &a.name).cmp(&(
            &b.creation_timestamp,
            &b.namespace,
            &b.name,
        ))
    });
    let mut claims: Vec<Claim<'s>> = Vec::new();
    let mut owner: HashMap<String, usize> = HashMap::new();
    for entry in entries {
        let id = entry_id(entry);
        if entry.addresses.is_empty() && entry.resolution.eq_ignore_ascii_case("NONE") {
            if entry.hosts.iter().any(|h| zone_index(zones, h).is_some()) {
                notes.push(format!(
                    "ServiceEntry {id}: resolution NONE and no addresses, so its hosts get no \
                     name; give it `addresses` or resolution DNS/STATIC"
                ));
            }
            continue;
        }
        let mut mine = HashSet::new();
        for raw in &entry.hosts {
            let host = raw.trim_end_matches('.').to_ascii_lowercase();
            if !mine.insert(host.clone()) {
                continue;
            }
            let Some(zone) = zone_index(zones, &host) else {
                continue; // Another zone's name (an external service): not ours to answer.
            };
            if !valid_host(&host) {
                notes.push(format!(
                    "ServiceEntry {id}: host {raw:?} is not a DNS name (`*` may only be the whole \
                     first label): skipped"
                ));
                continue;
            }
            if let Some(&first) = owner.get(&host) {
                let winner = entry_id(claims[first].entry);
                conflicts.push(Conflict {
                    host: host.clone(),
                    winner,
                    loser: id.clone(),
                });
                continue;
            }
            owner.insert(host.clone(), claims.len());
            claims.push(Claim { host, zone, entry });
        }
    }
    claims
}

/// The addresses of every claimed host, VIPs allocated; fills `table.hosts`. Hosts missing from
/// the result get no name.
fn decide_addresses<'c>(
    claims: &'c [Claim<'_>],
    options: &TableOptions,
    table: &mut Table,
) -> HashMap<&'c str, Vec<IpAddr>> {
    let mut out: HashMap<&str, Vec<IpAddr>> = HashMap::new();
    let mut need_vip = Vec::new();
    let mut explicit = HashSet::new();
    for claim in claims {
        let mut info = HostInfo {
            zone: table
                .zones
                .get(claim.zone)
                .map(|z| z.apex.to_string())
                .unwrap_or_default(),
            entry: entry_id(claim.entry),
            creation_timestamp: claim.entry.creation_timestamp.clone(),
            addresses: Vec::new(),
            address_source: String::new(),
            srv: Vec::new(),
            shadowed: table
                .conflicts
                .iter()
                .filter(|c| c.host == claim.host)
                .map(|c| c.loser.clone())
                .collect(),
            notes: Vec::new(),
        };
        if claim.entry.addresses.is_empty() {
            need_vip.push(claim.host.clone());
        } else {
            let (ips, notes) = parse_addresses(&claim.entry.addresses);
            for n in &notes {
                table
                    .notes
                    .push(format!("ServiceEntry {}: {n}", entry_id(claim.entry)));
            }
            info.notes = notes;
            info.address_source = if ips.is_empty() {
                "the entry's addresses, none of them a single address: no A/AAAA (NODATA)".into()
            } else {
                "the entry's addresses".into()
            };
            explicit.extend(ips.iter().copied());
            info.addresses = ips.clone();
            out.insert(&claim.host, ips);
        }
        table.hosts.insert(claim.host.clone(), info);
    }
    let mut sources: HashMap<String, Vec<String>> = HashMap::new();
    for range in [options.vip_v4, options.vip_v6].into_iter().flatten() {
        let (vips, errors) = vip::allocate(&range, &need_vip, &explicit);
        table.notes.extend(errors);
        for (host, v) in vips {
            let how = if v.probe == 0 {
                format!("VIP {} from {range} (hash of the host)", v.addr)
            } else {
                format!(
                    "VIP {} from {range} (hash of the host, probe {} after its slot was taken)",
                    v.addr, v.probe
                )
            };
            sources.entry(host.clone()).or_default().push(how);
            if let Some(info) = table.hosts.get_mut(&host) {
                info.addresses.push(v.addr);
            }
        }
    }
    for claim in claims.iter().filter(|c| c.entry.addresses.is_empty()) {
        let Some(info) = table.hosts.get_mut(&claim.host) else {
            continue;
        };
        info.address_source = sources
            .remove(&claim.host)
            .map(|s| s.join("; "))
            .unwrap_or_else(|| "no VIP could be allocated: see notes".into());
        out.insert(&claim.host, info.addresses.clone());
    }
    out
}

/// Single addresses from an entry's `addresses`; wider CIDRs and garbage are noted.
fn parse_addresses(addresses: &[String]) -> (Vec<IpAddr>, Vec<String>) {
    let mut ips = Vec::new();
    let mut notes = Vec::new();
    for a in addresses {
        match a.parse::<Cidr>() {
            Ok(c) if c.is_host() => {
                if !ips.contains(&c.addr()) {
                    ips.push(c.addr());
                }
            }
            Ok(c) => notes.push(format!(
                "address {c} is a network, not one address: DNS cannot answer it, skipped"
            )),
            Err(e) => notes.push(format!("{e}: skipped")),
        }
    }
    (ips, notes)
}

/// `_<port-name>._<tcp|udp>.<host>` and the port, for each named port of the entry.
fn srv_names(entry: &ServiceEntryInfo, host: &str) -> Vec<(String, u16)> {
    let mut out: Vec<(String, u16)> = Vec::new();
    for p in &entry.ports {
        let Some(name) = p.name.as_deref().map(str::to_ascii_lowercase) else {
            continue;
        };
        let Ok(port) = u16::try_from(p.number) else {
            continue;
        };
        if port == 0 || !valid_label(&name) {
            continue;
        }
        let proto = match p.protocol.as_deref() {
            Some(p) if p.eq_ignore_ascii_case("UDP") => "udp",
            _ => "tcp",
        };
        let srv = format!("_{name}._{proto}.{host}");
        if !out.iter().any(|(n, _)| *n == srv) {
            out.push((srv, port));
        }
    }
    out
}

/// The most specific zone holding `host` (a wildcard's `*.` aside).
fn zone_index(zones: &[Zone], host: &str) -> Option<usize> {
    let bare = host.trim_end_matches('.');
    let bare = bare.strip_prefix("*.").unwrap_or(bare);
    zones
        .iter()
        .enumerate()
        .filter(|(_, z)| {
            bare == z.name
                || bare
                    .strip_suffix(z.name.as_str())
                    .is_some_and(|rest| rest.ends_with('.'))
        })
        .max_by_key(|(_, z)| z.name.len())
        .map(|(i, _)| i)
}

fn valid_host(host: &str) -> bool {
    let rest = host.strip_prefix("*.").unwrap_or(host);
    host.len() <= 253 && rest.split('.').all(valid_label)
}

fn valid_label(l: &str) -> bool {
    let b = l.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'-' || *c == b'_')
}

fn entry_id(e: &ServiceEntryInfo) -> String {
    format!("{}/{}", e.namespace, e.name)
}

#[cfg(test)]
mod tests;
