//! The answer rules, checked against fixture snapshots built from YAML as a file would hold it.

use std::str::FromStr;

use registry::source::dir::snapshot_from_yaml;

use super::*;

fn options() -> TableOptions {
    TableOptions {
        zones: vec!["global".into()],
        ttl: 30,
        vip_v4: Some("240.240.0.0/16".parse().unwrap()),
        vip_v6: None,
    }
}

/// A ServiceEntry document. `extra` is more spec, indented by the caller's four spaces.
fn entry(ns: &str, name: &str, created: Option<&str>, hosts: &[&str], extra: &str) -> String {
    let created = created
        .map(|c| format!("  creationTimestamp: \"{c}\"\n"))
        .unwrap_or_default();
    format!(
        "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: {name}\n  \
         namespace: {ns}\n{created}spec:\n  hosts: [{}]\n{extra}",
        hosts.join(", ")
    )
}

fn build(yaml: &str) -> Table {
    build_with(yaml, &options())
}

fn build_with(yaml: &str, options: &TableOptions) -> Table {
    let snapshot = snapshot_from_yaml(yaml);
    assert!(
        snapshot.status.errors.is_empty(),
        "fixture did not load: {:?}",
        snapshot.status.errors
    );
    Table::build(&snapshot, options)
}

fn name(s: &str) -> LowerName {
    LowerName::from(Name::from_str(s).unwrap())
}

/// The answer data as text, for short assertions: `["A 10.0.0.1"]`, or the outcome.
fn ask(t: &Table, qname: &str, qtype: RecordType) -> Vec<String> {
    match t.lookup(&name(qname), qtype) {
        Lookup::Refused => vec!["REFUSED".into()],
        Lookup::NxDomain { zone } => vec![format!("NXDOMAIN soa={}", zone.apex)],
        Lookup::NoData { zone } => vec![format!("NODATA soa={}", zone.apex)],
        Lookup::Answer { answers, .. } => answers
            .iter()
            .map(|r| {
                assert_eq!(
                    r.name,
                    Name::from(name(qname)),
                    "owner must be the query name"
                );
                format!("{} {}", r.record_type(), r.data)
            })
            .collect(),
    }
}

const HTTPBIN: &str = "  addresses: [240.0.0.2]\n  ports: [{number: 8000, name: http, protocol: HTTP}]\n  resolution: DNS\n  location: MESH_INTERNAL\n";

#[test]
fn a_from_addresses_and_nodata_for_missing_types() {
    let t = build(&entry(
        "bar",
        "httpbin",
        None,
        &["httpbin.bar.global"],
        HTTPBIN,
    ));
    assert_eq!(
        ask(&t, "httpbin.bar.global.", RecordType::A),
        ["A 240.0.0.2"]
    );
    assert_eq!(
        ask(&t, "HTTPBIN.Bar.Global.", RecordType::A),
        ["A 240.0.0.2"],
        "names are case-insensitive"
    );
    // The istiocoredns bug: AAAA of a v4-only name must be NODATA, never NXDOMAIN.
    assert_eq!(
        ask(&t, "httpbin.bar.global.", RecordType::AAAA),
        ["NODATA soa=global."]
    );
    assert_eq!(
        ask(&t, "httpbin.bar.global.", RecordType::TXT),
        ["NODATA soa=global."]
    );
    assert_eq!(
        ask(&t, "nope.bar.global.", RecordType::A),
        ["NXDOMAIN soa=global."]
    );
    assert_eq!(ask(&t, "example.com.", RecordType::A), ["REFUSED"]);
    assert_eq!(ask(&t, "globalx.", RecordType::A), ["REFUSED"]);
}

#[test]
fn ipv4_and_ipv6_addresses_and_host_cidrs() {
    let t = build(&entry(
        "ns",
        "dual",
        None,
        &["dual.ns.global"],
        "  addresses: [10.0.0.1/32, \"fd00::1\", \"fd00::2/128\", 10.1.0.0/16, nonsense]\n",
    ));
    assert_eq!(ask(&t, "dual.ns.global.", RecordType::A), ["A 10.0.0.1"]);
    assert_eq!(
        ask(&t, "dual.ns.global.", RecordType::AAAA),
        ["AAAA fd00::1", "AAAA fd00::2"]
    );
    let info = &t.hosts["dual.ns.global"];
    assert_eq!(info.notes.len(), 2, "{:?}", info.notes);
    assert!(info.notes[0].contains("10.1.0.0/16 is a network"));
    assert!(t.notes.iter().any(|n| n.contains("nonsense")));
}

#[test]
fn hosts_outside_the_zones_are_not_served() {
    let yaml = entry(
        "ns",
        "mixed",
        None,
        &["api.example.com", "a.ns.global"],
        "  addresses: [10.0.0.1]\n",
    );
    let t = build(&yaml);
    assert_eq!(ask(&t, "api.example.com.", RecordType::A), ["REFUSED"]);
    assert_eq!(ask(&t, "a.ns.global.", RecordType::A), ["A 10.0.0.1"]);
    assert_eq!(t.names(), ["a.ns.global."]);
}

#[test]
fn address_less_entries_get_a_vip_unless_resolution_none() {
    let yaml = entry("ns", "dns", None, &["vip.ns.global"], "  resolution: DNS\n")
        + &entry(
            "ns",
            "static",
            None,
            &["static.ns.global"],
            "  resolution: STATIC\n",
        )
        + &entry(
            "ns",
            "none",
            None,
            &["none.ns.global"],
            "  resolution: NONE\n",
        )
        + &entry("ns", "default", None, &["default.ns.global"], "");
    let t = build(&yaml);
    for host in ["vip.ns.global.", "static.ns.global."] {
        let a = ask(&t, host, RecordType::A);
        assert_eq!(a.len(), 1);
        assert!(a[0].starts_with("A 240.240."), "{a:?}");
    }
    // `resolution` defaults to NONE, as in Istio.
    for host in ["none.ns.global.", "default.ns.global."] {
        assert_eq!(ask(&t, host, RecordType::A), ["NXDOMAIN soa=global."]);
    }
    assert!(
        t.notes
            .iter()
            .any(|n| n.contains("ns/none: resolution NONE and no addresses"))
    );
    assert!(
        t.hosts["vip.ns.global"]
            .address_source
            .contains("hash of the host")
    );
    // No IPv6 range: AAAA is NODATA.
    assert_eq!(
        ask(&t, "vip.ns.global.", RecordType::AAAA),
        ["NODATA soa=global."]
    );
    let mut o = options();
    o.vip_v6 = Some("2001:2::/48".parse().unwrap());
    let t6 = build_with(&yaml, &o);
    let aaaa = &t6.hosts["vip.ns.global"].addresses;
    assert_eq!(aaaa.len(), 2, "{aaaa:?}");
    assert!(o.vip_v6.unwrap().contains(&aaaa[1]), "{aaaa:?}");
    assert_eq!(ask(&t6, "vip.ns.global.", RecordType::AAAA).len(), 1);
    assert_eq!(
        ask(&t6, "vip.ns.global.", RecordType::A),
        ask(&t, "vip.ns.global.", RecordType::A),
        "adding a v6 range leaves the v4 VIP alone"
    );
}

#[test]
fn vips_are_stable_across_rebuilds_and_deletion_of_other_entries() {
    let a = entry("ns", "a", None, &["a.ns.global"], "  resolution: DNS\n");
    let b = entry("ns", "b", None, &["b.ns.global"], "  resolution: DNS\n");
    let c = entry(
        "other",
        "c",
        None,
        &["c.other.global"],
        "  resolution: DNS\n",
    );
    let all = build(&format!("{a}{b}{c}"));
    let again = build(&format!("{c}{b}{a}"));
    let without_b = build(&format!("{a}{c}"));
    for host in ["a.ns.global.", "c.other.global."] {
        let vip = ask(&all, host, RecordType::A);
        assert_eq!(
            ask(&again, host, RecordType::A),
            vip,
            "{host} after restart"
        );
        assert_eq!(
            ask(&without_b, host, RecordType::A),
            vip,
            "{host} after deleting b"
        );
    }
    assert_ne!(
        ask(&all, "a.ns.global.", RecordType::A),
        ask(&all, "b.ns.global.", RecordType::A)
    );
}

#[test]
fn explicit_addresses_are_not_given_out_as_vips() {
    let vip_host = entry("ns", "v", None, &["v.ns.global"], "  resolution: DNS\n");
    let alone = build(&vip_host);
    let vip = ask(&alone, "v.ns.global.", RecordType::A)[0]
        .trim_start_matches("A ")
        .to_string();
    let squatter = entry(
        "ns",
        "s",
        None,
        &["s.ns.global"],
        &format!("  addresses: [{vip}]\n"),
    );
    let t = build(&format!("{vip_host}{squatter}"));
    assert_eq!(ask(&t, "s.ns.global.", RecordType::A), [format!("A {vip}")]);
    let moved = ask(&t, "v.ns.global.", RecordType::A);
    assert_ne!(moved, [format!("A {vip}")]);
    assert!(t.hosts["v.ns.global"].address_source.contains("probe 1"));
}

#[test]
fn the_oldest_entry_wins_a_host_and_the_conflict_is_recorded() {
    let old = entry(
        "zz",
        "old",
        Some("2024-01-01T00:00:00Z"),
        &["shared.ns.global"],
        "  addresses: [10.0.0.1]\n",
    );
    let new = entry(
        "aa",
        "new",
        Some("2024-06-01T00:00:00Z"),
        &["shared.ns.global"],
        "  addresses: [10.0.0.2]\n",
    );
    for yaml in [format!("{old}{new}"), format!("{new}{old}")] {
        let t = build(&yaml);
        assert_eq!(ask(&t, "shared.ns.global.", RecordType::A), ["A 10.0.0.1"]);
        assert_eq!(
            t.conflicts,
            [Conflict {
                host: "shared.ns.global".into(),
                winner: "zz/old".into(),
                loser: "aa/new".into()
            }]
        );
        assert_eq!(t.hosts["shared.ns.global"].shadowed, ["aa/new"]);
        assert!(t.conflicts[0].to_string().contains("zz/old answers"));
    }
    // Same age (files carry no timestamp): namespace, then name.
    let p = entry(
        "b",
        "p",
        None,
        &["s.ns.global"],
        "  addresses: [10.0.0.1]\n",
    );
    let q = entry(
        "a",
        "q",
        None,
        &["s.ns.global"],
        "  addresses: [10.0.0.2]\n",
    );
    let t = build(&format!("{p}{q}"));
    assert_eq!(ask(&t, "s.ns.global.", RecordType::A), ["A 10.0.0.2"]);
    assert_eq!(t.conflicts[0].winner, "a/q");
}

#[test]
fn wildcards_answer_names_below_but_not_the_apex_and_exact_hosts_win() {
    let yaml = entry(
        "ns",
        "wild",
        None,
        &["\"*.foo.global\""],
        "  addresses: [10.0.0.9]\n",
    ) + &entry(
        "ns",
        "exact",
        None,
        &["exact.foo.global"],
        "  addresses: [10.0.0.1]\n",
    );
    let t = build(&yaml);
    assert_eq!(ask(&t, "a.foo.global.", RecordType::A), ["A 10.0.0.9"]);
    assert_eq!(ask(&t, "x.y.foo.global.", RecordType::A), ["A 10.0.0.9"]);
    assert_eq!(ask(&t, "exact.foo.global.", RecordType::A), ["A 10.0.0.1"]);
    assert_eq!(
        ask(&t, "exact.foo.global.", RecordType::AAAA),
        ["NODATA soa=global."],
        "an exact host wins even for a type it lacks"
    );
    assert_eq!(
        ask(&t, "a.foo.global.", RecordType::AAAA),
        ["NODATA soa=global."]
    );
    // The wildcard's apex exists (names are below it) but has no records.
    assert_eq!(
        ask(&t, "foo.global.", RecordType::A),
        ["NODATA soa=global."]
    );
    assert_eq!(
        ask(&t, "bar.global.", RecordType::A),
        ["NXDOMAIN soa=global."]
    );
    assert_eq!(t.names(), ["*.foo.global.", "exact.foo.global."]);
    // The most specific wildcard wins.
    let t = build(
        &(yaml
            + &entry(
                "ns",
                "deeper",
                None,
                &["\"*.bar.foo.global\""],
                "  addresses: [10.0.0.8]\n",
            )),
    );
    assert_eq!(ask(&t, "x.bar.foo.global.", RecordType::A), ["A 10.0.0.8"]);
    assert_eq!(ask(&t, "bar.foo.global.", RecordType::A), ["A 10.0.0.9"]);
}

#[test]
fn address_less_wildcards_get_one_vip() {
    let t = build(&entry(
        "ns",
        "wild",
        None,
        &["\"*.w.global\""],
        "  resolution: DNS\n",
    ));
    let a = ask(&t, "one.w.global.", RecordType::A);
    assert!(a[0].starts_with("A 240.240."), "{a:?}");
    assert_eq!(ask(&t, "two.w.global.", RecordType::A), a);
}

#[test]
fn srv_for_named_ports() {
    let t = build(&entry(
        "bar",
        "httpbin",
        None,
        &["httpbin.bar.global"],
        "  addresses: [240.0.0.2]\n  ports:\n  - {number: 8000, name: http, protocol: HTTP}\n  \
         - {number: 53, name: dns, protocol: UDP}\n  - {number: 9000, protocol: TCP}\n  \
         - {number: 70000, name: toobig}\n",
    ));
    assert_eq!(
        ask(&t, "_http._tcp.httpbin.bar.global.", RecordType::SRV),
        ["SRV 0 100 8000 httpbin.bar.global."]
    );
    assert_eq!(
        ask(&t, "_dns._udp.httpbin.bar.global.", RecordType::SRV),
        ["SRV 0 100 53 httpbin.bar.global."]
    );
    let Lookup::Answer { additionals, .. } =
        t.lookup(&name("_http._tcp.httpbin.bar.global."), RecordType::SRV)
    else {
        panic!("SRV expected")
    };
    assert_eq!(additionals.len(), 1, "the target's A goes in additional");
    assert_eq!(
        ask(&t, "_http._tcp.httpbin.bar.global.", RecordType::A),
        ["NODATA soa=global."]
    );
    // `_tcp.<host>` exists between the host and its SRV names.
    assert_eq!(
        ask(&t, "_tcp.httpbin.bar.global.", RecordType::SRV),
        ["NODATA soa=global."]
    );
    assert_eq!(
        ask(&t, "_grpc._tcp.httpbin.bar.global.", RecordType::SRV),
        ["NXDOMAIN soa=global."]
    );
    assert_eq!(t.hosts["httpbin.bar.global"].srv.len(), 2);
}

#[test]
fn empty_non_terminals_are_nodata() {
    let t = build(&entry(
        "bar",
        "httpbin",
        None,
        &["httpbin.bar.global"],
        HTTPBIN,
    ));
    assert_eq!(
        ask(&t, "bar.global.", RecordType::A),
        ["NODATA soa=global."]
    );
    assert_eq!(
        ask(&t, "bar.global.", RecordType::NS),
        ["NODATA soa=global."]
    );
    assert_eq!(
        ask(&t, "x.httpbin.bar.global.", RecordType::A),
        ["NXDOMAIN soa=global."]
    );
}

#[test]
fn soa_and_ns_at_the_apex() {
    let t = build(&entry(
        "bar",
        "httpbin",
        None,
        &["httpbin.bar.global"],
        HTTPBIN,
    ));
    let soa = ask(&t, "global.", RecordType::SOA);
    assert_eq!(soa.len(), 1);
    assert!(
        soa[0].starts_with("SOA ns.dns.global. hostmaster.global. 0 "),
        "{soa:?}"
    );
    assert!(soa[0].ends_with(" 30"), "negative TTL is the TTL: {soa:?}");
    assert_eq!(ask(&t, "global.", RecordType::NS), ["NS ns.dns.global."]);
    assert_eq!(ask(&t, "global.", RecordType::A), ["NODATA soa=global."]);
    assert_eq!(ask(&t, "global.", RecordType::ANY).len(), 2);
}

#[test]
fn several_zones_answer_with_their_own_soa() {
    let mut o = options();
    o.zones = vec!["global".into(), "mesh.example".into(), "sub.global".into()];
    let yaml = entry(
        "ns",
        "e",
        None,
        &["a.mesh.example", "b.sub.global", "c.global"],
        "  addresses: [10.0.0.1]\n",
    );
    let t = build_with(&yaml, &o);
    assert_eq!(ask(&t, "a.mesh.example.", RecordType::A), ["A 10.0.0.1"]);
    assert_eq!(
        ask(&t, "zz.sub.global.", RecordType::A),
        ["NXDOMAIN soa=sub.global."]
    );
    assert_eq!(
        ask(&t, "zz.global.", RecordType::A),
        ["NXDOMAIN soa=global."]
    );
    assert_eq!(t.hosts["b.sub.global"].zone, "sub.global.");
    assert_eq!(ask(&t, "example.", RecordType::A), ["REFUSED"]);
}

#[test]
fn bad_hosts_are_skipped_with_a_note_and_the_rest_is_served() {
    let yaml = entry(
        "ns",
        "bad",
        None,
        &["\"a.*.ns.global\"", "\"sp ace.ns.global\"", "ok.ns.global"],
        "  addresses: [10.0.0.1]\n",
    );
    let t = build(&yaml);
    assert_eq!(ask(&t, "ok.ns.global.", RecordType::A), ["A 10.0.0.1"]);
    assert_eq!(t.notes.len(), 2, "{:?}", t.notes);
    assert_eq!(t.entries_served, 1);
}

#[test]
fn ttl_and_serial_come_from_the_options_and_snapshot() {
    let mut o = options();
    o.ttl = 5;
    let t = build_with(&entry("bar", "h", None, &["h.bar.global"], HTTPBIN), &o);
    let Lookup::Answer { answers, .. } = t.lookup(&name("h.bar.global."), RecordType::A) else {
        panic!()
    };
    assert_eq!(answers[0].ttl, 5);
    let zone = t.zones().next().unwrap();
    assert_eq!(zone.soa()[0].ttl, 5);
}
