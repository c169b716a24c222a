use std::net::SocketAddr;
use std::sync::Arc;

use registry::source::dir::snapshot_from_yaml;

use super::*;
use crate::mesh_networks::MeshNetworks;
use crate::view::{ClusterEntry, ClusterSource};

fn ep(addr: &str, network: &str, zone: &str) -> NetEndpoint {
    NetEndpoint {
        address: addr.parse().unwrap(),
        network: (!network.is_empty()).then(|| network.to_string()),
        cluster: format!("c-{network}"),
        locality: Locality {
            region: String::new(),
            zone: zone.to_string(),
            subzone: String::new(),
        },
        tls_mode: None,
    }
}

fn gws(spec: &[(&str, &[&str])]) -> BTreeMap<String, Vec<SocketAddr>> {
    spec.iter()
        .map(|(n, addrs)| {
            (
                n.to_string(),
                addrs.iter().map(|a| a.parse().unwrap()).collect(),
            )
        })
        .collect()
}

/// (zone, [(address, weight)]) per locality group, in order.
type Expected = Vec<(&'static str, Vec<(&'static str, u32)>)>;

fn flatten(split: &Split) -> Vec<(String, Vec<(String, u32)>)> {
    split
        .localities
        .iter()
        .map(|g| {
            (
                g.locality.zone.clone(),
                g.endpoints
                    .iter()
                    .map(|w| (w.address.to_string(), w.weight))
                    .collect(),
            )
        })
        .collect()
}

#[test]
fn weight_table() {
    let istio_eps = vec![
        ep("10.1.0.1:80", "network1", ""),
        ep("10.2.0.1:80", "network2", ""),
        ep("10.2.0.2:80", "network2", ""),
        ep("10.3.0.1:80", "network3", ""),
        ep("10.3.0.2:80", "network3", ""),
        ep("10.3.0.3:80", "network3", ""),
    ];
    let istio_gws = gws(&[
        ("network1", &["1.1.1.1:15443"]),
        ("network2", &["2.2.2.2:15443"]),
        ("network3", &["3.3.3.1:15443", "3.3.3.2:15443"]),
    ]);
    struct Case {
        name: &'static str,
        endpoints: Vec<NetEndpoint>,
        gateways: BTreeMap<String, Vec<SocketAddr>>,
        client: &'static str,
        expected: Expected,
        unreachable: Vec<(&'static str, usize)>,
        no_network: usize,
    }
    let cases = vec![
        Case {
            name: "Istio's example seen from network1",
            endpoints: istio_eps.clone(),
            gateways: istio_gws.clone(),
            client: "network1",
            expected: vec![(
                "",
                vec![
                    ("10.1.0.1:80", 2),
                    ("2.2.2.2:15443", 4),
                    ("3.3.3.1:15443", 3),
                    ("3.3.3.2:15443", 3),
                ],
            )],
            unreachable: vec![],
            no_network: 0,
        },
        Case {
            name: "the same mesh seen from network2",
            endpoints: istio_eps.clone(),
            gateways: istio_gws.clone(),
            client: "network2",
            expected: vec![(
                "",
                vec![
                    ("10.2.0.1:80", 2),
                    ("10.2.0.2:80", 2),
                    ("1.1.1.1:15443", 2),
                    ("3.3.3.1:15443", 3),
                    ("3.3.3.2:15443", 3),
                ],
            )],
            unreachable: vec![],
            no_network: 0,
        },
        Case {
            name: "a network without gateway contributes nothing and is reported",
            endpoints: vec![
                ep("10.1.0.1:80", "network1", ""),
                ep("10.4.0.1:80", "network4", ""),
                ep("10.4.0.2:80", "network4", ""),
            ],
            gateways: istio_gws.clone(),
            client: "network1",
            expected: vec![("", vec![("10.1.0.1:80", 1)])],
            unreachable: vec![("network4", 2)],
            no_network: 0,
        },
        Case {
            name: "a network with gateways but no ready endpoint gets no gateway entry",
            endpoints: vec![ep("10.1.0.1:80", "network1", "")],
            gateways: istio_gws.clone(),
            client: "network1",
            expected: vec![("", vec![("10.1.0.1:80", 1)])],
            unreachable: vec![],
            no_network: 0,
        },
        Case {
            name: "only remote endpoints: gateways alone",
            endpoints: vec![ep("10.2.0.1:80", "network2", "")],
            gateways: istio_gws.clone(),
            client: "network1",
            expected: vec![("", vec![("2.2.2.2:15443", 1)])],
            unreachable: vec![],
            no_network: 0,
        },
        Case {
            name: "localities: gateways weighted per locality",
            endpoints: vec![
                ep("10.1.0.1:80", "network1", "zone-a"),
                ep("10.2.0.1:80", "network2", "zone-a"),
                ep("10.2.0.2:80", "network2", "zone-b"),
                ep("10.2.0.3:80", "network2", "zone-b"),
                ep("10.2.0.4:80", "network2", "zone-b"),
            ],
            gateways: istio_gws.clone(),
            client: "network1",
            expected: vec![
                ("zone-a", vec![("10.1.0.1:80", 1), ("2.2.2.2:15443", 1)]),
                ("zone-b", vec![("2.2.2.2:15443", 3)]),
            ],
            unreachable: vec![],
            no_network: 0,
        },
        Case {
            name: "an endpoint whose cluster is in no network is left out and counted",
            endpoints: vec![ep("10.1.0.1:80", "network1", ""), ep("10.9.0.1:80", "", "")],
            gateways: istio_gws.clone(),
            client: "network1",
            expected: vec![("", vec![("10.1.0.1:80", 1)])],
            unreachable: vec![],
            no_network: 1,
        },
        Case {
            name: "two networks behind one gateway address share one entry",
            endpoints: vec![
                ep("10.2.0.1:80", "network2", ""),
                ep("10.5.0.1:80", "network5", ""),
                ep("10.5.0.2:80", "network5", ""),
            ],
            gateways: gws(&[
                ("network2", &["9.9.9.9:15443"]),
                ("network5", &["9.9.9.9:15443"]),
            ]),
            client: "network1",
            expected: vec![("", vec![("9.9.9.9:15443", 3)])],
            unreachable: vec![],
            no_network: 0,
        },
        Case {
            name: "a client in an unknown network sees every network through its gateways",
            endpoints: istio_eps.clone(),
            gateways: istio_gws.clone(),
            client: "elsewhere",
            expected: vec![(
                "",
                vec![
                    ("1.1.1.1:15443", 2),
                    ("2.2.2.2:15443", 4),
                    ("3.3.3.1:15443", 3),
                    ("3.3.3.2:15443", 3),
                ],
            )],
            unreachable: vec![],
            no_network: 0,
        },
        Case {
            name: "nothing at all",
            endpoints: vec![],
            gateways: istio_gws.clone(),
            client: "network1",
            expected: vec![],
            unreachable: vec![],
            no_network: 0,
        },
    ];
    for case in cases {
        let split = split_horizon(&case.endpoints, &case.gateways, case.client);
        let expected: Vec<(String, Vec<(String, u32)>)> = case
            .expected
            .iter()
            .map(|(z, eps)| {
                (
                    z.to_string(),
                    eps.iter().map(|(a, w)| (a.to_string(), *w)).collect(),
                )
            })
            .collect();
        assert_eq!(flatten(&split), expected, "{}", case.name);
        let unreachable: BTreeMap<String, usize> = case
            .unreachable
            .iter()
            .map(|(n, c)| (n.to_string(), *c))
            .collect();
        assert_eq!(split.unreachable, unreachable, "{}", case.name);
        assert_eq!(split.no_network, case.no_network, "{}", case.name);
    }
}

#[test]
fn gateway_entries_carry_istio_tls_mode() {
    let mut local = ep("10.1.0.1:80", "network1", "zone-a");
    local.tls_mode = Some("disabled".into());
    let split = split_horizon(
        &[local, ep("10.2.0.1:80", "network2", "zone-a")],
        &gws(&[("network2", &["2.2.2.2:15443"])]),
        "network1",
    );
    let cla = to_cla("outbound|8000||httpbin.bar.global", &split);
    assert_eq!(cla.cluster_name, "outbound|8000||httpbin.bar.global");
    assert_eq!(cla.endpoints.len(), 1);
    let group = &cla.endpoints[0];
    assert_eq!(group.locality.as_ref().unwrap().zone, "zone-a");
    assert_eq!(group.load_balancing_weight.unwrap().value, 2);
    let mode = |e: &ep::LbEndpoint| {
        let s = &e.metadata.as_ref()?.filter_metadata[TRANSPORT_SOCKET_MATCH];
        match &s.fields["tlsMode"].kind {
            Some(value::Kind::StringValue(v)) => Some(v.clone()),
            _ => None,
        }
    };
    assert_eq!(mode(&group.lb_endpoints[0]).as_deref(), Some("disabled"));
    assert_eq!(mode(&group.lb_endpoints[1]).as_deref(), Some("istio"));
}

const CLUSTER_1: &str = include_str!("../../tests/fixtures/cluster-1/mesh.yaml");
const CLUSTER_2: &str = include_str!("../../tests/fixtures/cluster-2/mesh.yaml");
const NETWORKS: &str = include_str!("../../tests/fixtures/mesh-networks.yaml");

fn entry(id: &str, yaml: &str, network: Option<&str>) -> ClusterEntry {
    ClusterEntry {
        id: id.into(),
        source: ClusterSource::RemoteDir(format!("inline:{id}")),
        snapshot: Arc::new(snapshot_from_yaml(yaml)),
        synced: true,
        stale: false,
        network: network.map(str::to_string),
    }
}

pub(crate) fn two_cluster_view() -> MeshView {
    let mut view = MeshView {
        local_cluster: "cluster-1".into(),
        networks: Arc::new(MeshNetworks::parse("networks", NETWORKS).unwrap()),
        ..Default::default()
    };
    for e in [
        entry("cluster-1", CLUSTER_1, Some("network1")),
        entry("cluster-2", CLUSTER_2, None),
    ] {
        view.clusters.insert(e.id.clone(), e);
    }
    view.gateways = crate::gateways::resolve(&view, &EdsOptions::default().domain_suffix);
    view
}

fn weights(explain: &Explain) -> Vec<(String, Vec<(String, u32)>)> {
    flatten(&explain.split)
}

#[test]
fn gateways_come_from_load_balancer_status() {
    let view = two_cluster_view();
    assert_eq!(
        view.gateways["network2"].addresses,
        vec!["127.0.2.100:15443".parse::<SocketAddr>().unwrap()]
    );
    assert_eq!(
        view.gateways["network1"].addresses,
        vec!["127.0.1.100:15443".parse::<SocketAddr>().unwrap()]
    );
    assert!(view.gateways["network3"].addresses.is_empty());
}

#[test]
fn hostname_gateways_use_the_dns_cache() {
    let mut view = two_cluster_view();
    let text = "networks:\n  n:\n    endpoints: [{fromRegistry: cluster-2}]\n    gateways: [{address: gw.example.com, port: 443}]\n";
    view.networks = Arc::new(MeshNetworks::parse("t", text).unwrap());
    let g = crate::gateways::resolve(&view, &EdsOptions::default().domain_suffix);
    assert!(g["n"].addresses.is_empty());
    assert!(
        g["n"].problems[0].contains("gw.example.com"),
        "{:?}",
        g["n"]
    );
    assert_eq!(
        crate::gateways::hostnames_to_resolve(&view, &EdsOptions::default().domain_suffix),
        BTreeSet::from(["gw.example.com".to_string()])
    );
    let mut dns = BTreeMap::new();
    dns.insert(
        "gw.example.com".to_string(),
        vec!["192.0.2.7".parse().unwrap()],
    );
    view.dns = Arc::new(dns);
    let g = crate::gateways::resolve(&view, &EdsOptions::default().domain_suffix);
    assert_eq!(g["n"].addresses, vec!["192.0.2.7:443".parse().unwrap()]);
}

#[test]
fn two_clusters_from_network1() {
    let view = two_cluster_view();
    let opts = EdsOptions::default();
    for host in ["httpbin.bar.global", "httpbin.bar.svc.cluster.local"] {
        let (_, explain) = assignment(&format!("outbound|8000||{host}"), &view, "network1", &opts);
        assert_eq!(
            weights(&explain),
            vec![
                (
                    "zone-a".to_string(),
                    vec![
                        ("127.0.1.11:80".to_string(), 1),
                        ("127.0.2.100:15443".to_string(), 1)
                    ]
                ),
                (
                    "zone-b".to_string(),
                    vec![("127.0.2.100:15443".to_string(), 1)]
                ),
            ],
            "{host}"
        );
    }
}

#[test]
fn subsets_filter_by_destination_rule_labels() {
    let view = two_cluster_view();
    let opts = EdsOptions::default();
    let (_, v2) = assignment(
        "outbound|8000|v2|httpbin.bar.global",
        &view,
        "network1",
        &opts,
    );
    // cluster-1's v2 pod is not ready; cluster-2 has a v2 pod, but no DestinationRule defines
    // subset v2 there, so its gateway would refuse outbound_.8000_.v2_.httpbin.bar.global
    // (unknown_subset): EDS must not send the client there.
    assert_eq!(weights(&v2), vec![]);
    assert!(
        v2.gathered
            .notes
            .iter()
            .any(|n| n.contains("cluster-2") && n.contains("no subset v2")),
        "{:?}",
        v2.gathered.notes
    );
    // Once cluster-2 defines the subset too, its v2 pod is behind its gateway.
    let mut view = view;
    let with_rule = format!(
        "{CLUSTER_2}\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\n\
         metadata: {{name: httpbin, namespace: bar}}\nspec:\n  host: httpbin.bar.svc.cluster.local\n  \
         subsets:\n  - {{name: v2, labels: {{version: v2}}}}\n"
    );
    let c2 = entry("cluster-2", &with_rule, None);
    view.clusters.insert(c2.id.clone(), c2);
    view.gateways = crate::gateways::resolve(&view, &opts.domain_suffix);
    let (_, v2) = assignment(
        "outbound|8000|v2|httpbin.bar.global",
        &view,
        "network1",
        &opts,
    );
    assert_eq!(
        weights(&v2),
        vec![(
            "zone-b".to_string(),
            vec![("127.0.2.100:15443".to_string(), 1)]
        )]
    );
    let (_, v1) = assignment(
        "outbound|8000|v1|httpbin.bar.global",
        &view,
        "network2",
        &opts,
    );
    assert_eq!(
        weights(&v1),
        vec![(
            "zone-a".to_string(),
            vec![
                ("127.0.2.11:80".to_string(), 1),
                ("127.0.1.100:15443".to_string(), 1)
            ]
        )]
    );
    let (cla, missing) = assignment(
        "outbound|8000|v9|httpbin.bar.global",
        &view,
        "network1",
        &opts,
    );
    assert!(cla.endpoints.is_empty());
    assert!(missing.gathered.notes[0].contains("subset v9"));
}

#[test]
fn localities_and_tls_mode_from_pods() {
    let view = two_cluster_view();
    let (cla, _) = assignment(
        "outbound|8000||httpbin.bar.global",
        &view,
        "network1",
        &EdsOptions::default(),
    );
    let l = cla.endpoints[0].locality.clone().unwrap();
    assert_eq!((l.region.as_str(), l.zone.as_str()), ("region-1", "zone-a"));
    let local = &cla.endpoints[0].lb_endpoints[0];
    assert!(local.metadata.is_some(), "the v1 pod has tlsMode istio");
}

#[test]
fn unexported_remote_services_are_left_out() {
    let mut view = two_cluster_view();
    let c2 = CLUSTER_2.replace(
        "labels: {multicluster.x-k8s.io/exported: \"true\"}",
        "labels: {}",
    );
    let e = entry("cluster-2", &c2, None);
    view.clusters.insert(e.id.clone(), e);
    let opts = EdsOptions::default();
    let (_, explain) = assignment(
        "outbound|8000||httpbin.bar.global",
        &view,
        "network1",
        &opts,
    );
    assert_eq!(
        weights(&explain),
        vec![("zone-a".to_string(), vec![("127.0.1.11:80".to_string(), 1)])]
    );
    assert!(
        explain
            .gathered
            .notes
            .iter()
            .any(|n| n.contains("not exported"))
    );
    let all = EdsOptions {
        export_policy: ExportPolicy::All,
        ..EdsOptions::default()
    };
    let (_, explain) = assignment("outbound|8000||httpbin.bar.global", &view, "network1", &all);
    assert_eq!(explain.split.localities.len(), 2);
}

#[test]
fn unknown_names_get_empty_assignments() {
    let view = two_cluster_view();
    let opts = EdsOptions::default();
    for name in [
        "nonsense",
        "outbound|8000||nope.bar.global",
        "outbound|9||httpbin.bar.global",
    ] {
        let (cla, explain) = assignment(name, &view, "network1", &opts);
        assert_eq!(cla.cluster_name, name);
        assert!(cla.endpoints.is_empty(), "{name}");
        let _ = explain;
    }
}

#[test]
fn wildcard_names_cover_ports_subsets_and_both_hosts() {
    let names = all_cluster_names(&two_cluster_view(), &EdsOptions::default());
    for n in [
        "outbound|8000||httpbin.bar.global",
        "outbound|8000|v1|httpbin.bar.global",
        "outbound|8000|v2|httpbin.bar.svc.cluster.local",
        "outbound|15443||istio-eastwestgateway.istio-system.global",
    ] {
        assert!(names.contains(n), "{n} missing from {names:?}");
    }
}
