use std::net::SocketAddr;

use registry::source::dir::snapshot_from_yaml;
use tokio::time::Instant;

use super::*;
use crate::mesh_networks::MeshNetworks;
use crate::view::NetworkGateways;
use crate::view::{ClusterEntry, ClusterSource};

const CLUSTER_1: &str = include_str!("../../../tests/fixtures/cluster-1/mesh.yaml");
const CLUSTER_2: &str = include_str!("../../../tests/fixtures/cluster-2/mesh.yaml");
const NETWORKS: &str = include_str!("../../../tests/fixtures/mesh-networks.yaml");

/// A second exported service, `web.foo`, with one ready endpoint in cluster-2.
const WEB: &str = r#"---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: foo, labels: {multicluster.x-k8s.io/exported: "true"}}
spec:
  ports: [{name: http, port: 9000, targetPort: 90}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: foo, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 90}]
endpoints:
- addresses: ["127.0.2.21"]
  conditions: {ready: true}
  zone: zone-a
"#;

pub(crate) const HTTPBIN: &str = "outbound|8000||httpbin.bar.global";
pub(crate) const WEB_GLOBAL: &str = "outbound|9000||web.foo.global";

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

/// The two fixture clusters, cluster-2 with `web.foo` added when `web`.
pub(crate) fn view(cluster_2: &str, web: bool) -> MeshView {
    let mut view = MeshView {
        version: 1,
        local_cluster: "cluster-1".into(),
        networks: Arc::new(MeshNetworks::parse("networks", NETWORKS).unwrap()),
        ..Default::default()
    };
    let c2 = if web {
        format!("{cluster_2}{WEB}")
    } else {
        cluster_2.to_string()
    };
    for e in [
        entry("cluster-1", CLUSTER_1, Some("network1")),
        entry("cluster-2", &c2, None),
    ] {
        view.clusters.insert(e.id.clone(), e);
    }
    view.gateways = crate::gateways::resolve(&view, &EdsOptions::default().domain_suffix);
    view
}

/// `base_view` with more YAML in cluster-2.
pub(crate) fn view_with(extra: &str) -> MeshView {
    view(&format!("{CLUSTER_2}{extra}"), true)
}

pub(crate) fn base_view() -> MeshView {
    view(CLUSTER_2, true)
}

/// `base_view` with httpbin's second pod in cluster-2 not ready.
pub(crate) fn httpbin_changed_view() -> MeshView {
    let c2 = CLUSTER_2.replacen(
        "- addresses: [\"127.0.2.12\"]\n  conditions: {ready: true}",
        "- addresses: [\"127.0.2.12\"]\n  conditions: {ready: false}",
        1,
    );
    assert_ne!(c2, CLUSTER_2, "the fixture changed; update the test");
    view(&c2, true)
}

/// Reuse `from`'s cluster snapshots where `to` has equal YAML, as the aggregator does for
/// clusters that did not change.
pub(crate) fn share_unchanged(from: &MeshView, mut to: MeshView) -> MeshView {
    let c1 = from.clusters["cluster-1"].snapshot.clone();
    to.clusters.get_mut("cluster-1").unwrap().snapshot = c1;
    to
}

pub(crate) fn generation(version: u64, view: MeshView) -> Arc<Generation> {
    Arc::new(Generation {
        version,
        view: Arc::new(view),
        published: Instant::now(),
    })
}

pub(crate) fn snap(
    previous: Option<&Arc<NetworkSnapshot>>,
    version: u64,
    view: MeshView,
) -> Arc<NetworkSnapshot> {
    Arc::new(build(
        previous.map(|p| &**p),
        generation(version, view),
        "network1",
        &EdsOptions::default(),
    ))
}

fn names_of(s: &NetworkSnapshot) -> BTreeSet<String> {
    s.resources.keys().map(|k| k.to_string()).collect()
}

fn service(name: &str, ns: &str) -> ServiceName {
    ServiceName::new(ns, name)
}

#[test]
fn the_first_snapshot_computes_every_name_with_the_pure_function() {
    let v = base_view();
    let opts = EdsOptions::default();
    let s = snap(None, 1, v.clone());
    let all = eds::all_cluster_names(&v, &opts);
    assert_eq!(names_of(&s), all);
    assert_eq!(s.recomputed, all.len());
    assert!(s.previous.is_none());
    for name in &all {
        let (cla, _) = eds::assignment(name, &v, "network1", &opts);
        assert_eq!(
            s.resources[name.as_str()].bytes,
            cla.encode_to_vec(),
            "{name}"
        );
    }
}

#[test]
fn dirty_finds_only_the_changed_service() {
    let a = base_view();
    assert_eq!(dirty(&a, &a), Dirty::Services(BTreeSet::new()));
    let b = share_unchanged(&a, httpbin_changed_view());
    assert_eq!(
        dirty(&a, &b),
        Dirty::Services(BTreeSet::from([service("httpbin", "bar")]))
    );
    // Equal content in a new snapshot (a re-read file) is no change.
    let c = share_unchanged(&a, base_view());
    assert_eq!(dirty(&a, &c), Dirty::Services(BTreeSet::new()));
}

#[test]
fn dirty_lists_a_removed_or_added_service_and_cluster() {
    let a = base_view();
    let b = share_unchanged(&a, view(CLUSTER_2, false));
    assert_eq!(
        dirty(&a, &b),
        Dirty::Services(BTreeSet::from([service("web", "foo")]))
    );
    assert_eq!(
        dirty(&b, &a),
        Dirty::Services(BTreeSet::from([service("web", "foo")]))
    );
    let mut c = a.clone();
    c.clusters.remove("cluster-2");
    c.gateways = a.gateways.clone();
    let Dirty::Services(s) = dirty(&a, &c) else {
        panic!("a removed cluster dirties its services")
    };
    assert!(s.contains(&service("web", "foo")) && s.contains(&service("httpbin", "bar")));
}

#[test]
fn dirty_is_everything_when_gateways_or_networks_change() {
    let a = base_view();
    let mut b = a.clone();
    let mut gws = (*a.gateways).clone();
    gws.insert(
        "network2".into(),
        NetworkGateways {
            addresses: vec!["127.0.2.200:15443".parse::<SocketAddr>().unwrap()],
            problems: vec![],
        },
    );
    b.gateways = Arc::new(gws);
    assert_eq!(dirty(&a, &b), Dirty::All);
    let mut c = a.clone();
    c.networks = Arc::new(MeshNetworks::default());
    assert_eq!(dirty(&a, &c), Dirty::All);
}

#[test]
fn a_change_to_one_service_recomputes_only_that_service() {
    let a = base_view();
    let opts = EdsOptions::default();
    let s1 = snap(None, 1, a.clone());
    let s2 = snap(Some(&s1), 2, share_unchanged(&a, httpbin_changed_view()));
    let httpbin = eds::service_cluster_names(&service("httpbin", "bar"), &a, &opts);
    assert_eq!(s2.recomputed, httpbin.len());
    assert_eq!(s2.previous, Some(1));
    // Versions changed exactly for the resources whose content changed: httpbin's names that
    // count cluster-2's endpoints (the v2 subset lives only there).
    let changed: BTreeSet<String> = s2.changed.iter().map(|n| n.to_string()).collect();
    assert!(changed.contains(HTTPBIN), "{changed:?}");
    assert!(changed.is_subset(&httpbin), "{changed:?}");
    for (name, r) in &s2.resources {
        let same = Arc::ptr_eq(r, &s1.resources[name]);
        assert_eq!(!same, changed.contains(&**name), "{name}");
        let (cla, _) = eds::assignment(name, &s2.generation.view, "network1", &opts);
        assert_eq!(
            r.bytes,
            cla.encode_to_vec(),
            "{name} matches the pure function"
        );
    }
    assert_ne!(s2.resources[HTTPBIN].version, s1.resources[HTTPBIN].version);
    assert_eq!(
        s2.resources[WEB_GLOBAL].version,
        s1.resources[WEB_GLOBAL].version
    );
}

#[test]
fn a_gateway_change_recomputes_everything() {
    let a = base_view();
    let s1 = snap(None, 1, a.clone());
    let mut b = a.clone();
    let mut gws = (*a.gateways).clone();
    gws.get_mut("network2").unwrap().addresses = vec!["127.0.2.200:15443".parse().unwrap()];
    b.gateways = Arc::new(gws);
    let s2 = snap(Some(&s1), 2, b);
    assert_eq!(s2.recomputed, s1.resources.len());
    // Every name behind network2's gateway changed; the local-only gateway service did not.
    assert!(s2.changed.iter().any(|n| &**n == HTTPBIN));
    assert!(s2.changed.iter().any(|n| &**n == WEB_GLOBAL));
    let gw = "outbound|15443||istio-eastwestgateway.istio-system.global";
    assert!(s2.resources.contains_key(gw));
    assert!(!s2.changed.iter().any(|n| &**n == gw));
    assert_eq!(s2.resources[gw].version, s1.resources[gw].version);
}

#[test]
fn a_removed_service_leaves_the_snapshot_and_is_listed_as_changed() {
    let a = base_view();
    let s1 = snap(None, 1, a.clone());
    let s2 = snap(Some(&s1), 2, share_unchanged(&a, view(CLUSTER_2, false)));
    assert!(!s2.resources.contains_key(WEB_GLOBAL));
    assert!(s2.changed.iter().any(|n| &**n == WEB_GLOBAL));
    assert_eq!(s2.recomputed, 0);
    assert_eq!(s2.resources.len() + 2, s1.resources.len());
}

#[test]
fn versions_round_trip_and_foreign_versions_read_as_zero() {
    let e = Encoded::new(vec![1, 2, 3]);
    assert_ne!(e.version, 0);
    assert_eq!(parse_version(&version_string(e.version)), e.version);
    assert_eq!(parse_version("v1"), 0);
    assert_eq!(parse_version("zzzzzzzzzzzzzzzz"), 0);
}
