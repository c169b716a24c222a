//! EDS never sends a client to a remote gateway that would refuse it, and always sends it where
//! that gateway would route: over a matrix of services (exported or not, pods ready or not) and
//! subsets (none, defined, unknown), under both export policies, the split-horizon EDS computed
//! for network1 has a gateway entry for network2 exactly when cluster-2's real gateway route
//! table admits the SNI a client would send, standing for as many endpoints as it would route to.

use std::collections::BTreeMap;
use std::sync::Arc;

use gateway::hello::ClientHello;
use gateway::route::{RouteOptions, RouteTable};
use registry::admission::ExportPolicy;
use registry::source::dir::snapshot_from_yaml;
use remote_secrets::eds::{EdsOptions, Via, assignment};
use remote_secrets::mesh_networks::MeshNetworks;
use remote_secrets::view::{ClusterEntry, ClusterSource, MeshView};

const NETWORKS: &str = "networks:
  network1:
    endpoints: [{fromRegistry: cluster-1}]
    gateways: [{address: 127.0.1.100, port: 15443}]
  network2:
    endpoints: [{fromRegistry: cluster-2}]
    gateways: [{address: 127.0.2.100, port: 15443}]
";

/// One service in namespace bar of cluster-2: its export, and whether its two pods (v1 and v2)
/// are ready. A DestinationRule defines subsets v1 and v3 (no pod has v3).
fn service(name: &str, exported: bool, ready: bool, ip: u8) -> String {
    let label = if exported {
        ", labels: {multicluster.x-k8s.io/exported: \"true\"}"
    } else {
        ""
    };
    let pod = |n: u8, version: &str| {
        format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}-{version}, namespace: bar, \
             labels: {{app: {name}, version: {version}}}}}\n"
        ) + &format!("# pod {n}\n")
    };
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: bar{label}}}\n\
         spec:\n  ports: [{{name: http, port: 8000}}]\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: {name}-1, namespace: bar, labels: {{kubernetes.io/service-name: {name}}}}}\n\
         addressType: IPv4\nports: [{{name: http, port: 80}}]\nendpoints:\n\
         - addresses: [10.2.{ip}.1]\n  conditions: {{ready: {ready}}}\n  targetRef: {{kind: Pod, namespace: bar, name: {name}-v1}}\n\
         - addresses: [10.2.{ip}.2]\n  conditions: {{ready: {ready}}}\n  targetRef: {{kind: Pod, namespace: bar, name: {name}-v2}}\n\
         ---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\n\
         metadata: {{name: {name}, namespace: bar}}\n\
         spec:\n  host: {name}.bar.svc.cluster.local\n  subsets:\n  - {{name: v1, labels: {{version: v1}}}}\n  - {{name: v3, labels: {{version: v3}}}}\n"
    ) + &pod(1, "v1")
        + &pod(2, "v2")
}

/// The same service in cluster-1, with no endpoints, whose DestinationRule defines subset v2:
/// cluster-2's gateway knows no v2 (its rule does not define it), whatever cluster-1 says.
fn local_service(name: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: bar}}\n\
         spec:\n  ports: [{{name: http, port: 8000}}]\n\
         ---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\n\
         metadata: {{name: {name}, namespace: bar}}\n\
         spec:\n  host: {name}.bar.svc.cluster.local\n  subsets:\n  - {{name: v2, labels: {{version: v2}}}}\n"
    )
}

fn entry(id: &str, yaml: &str, network: &str) -> ClusterEntry {
    let snapshot = snapshot_from_yaml(yaml);
    assert!(
        snapshot.status.errors.is_empty(),
        "{:?}",
        snapshot.status.errors
    );
    ClusterEntry {
        id: id.into(),
        source: ClusterSource::RemoteDir(format!("inline:{id}")),
        snapshot: Arc::new(snapshot),
        synced: true,
        stale: false,
        network: Some(network.into()),
    }
}

#[test]
fn eds_sends_clients_only_where_the_remote_gateway_routes() {
    let matrix = [
        ("exported-ready", true, true),
        ("exported-unready", true, false),
        ("private-ready", false, true),
        ("private-unready", false, false),
    ];
    let cluster2: String = matrix
        .iter()
        .enumerate()
        .map(|(i, (name, exported, ready))| service(name, *exported, *ready, i as u8 + 1))
        .collect();
    let remote = entry("cluster-2", &cluster2, "network2");
    let cluster1: String = matrix
        .iter()
        .map(|(name, _, _)| local_service(name))
        .collect();
    let local = entry("cluster-1", &cluster1, "network1");
    let mut view = MeshView {
        local_cluster: "cluster-1".into(),
        networks: Arc::new(MeshNetworks::parse("networks", NETWORKS).unwrap()),
        ..Default::default()
    };
    let snapshot2 = remote.snapshot.clone();
    view.clusters.insert(local.id.clone(), local);
    view.clusters.insert(remote.id.clone(), remote);
    view.gateways = remote_secrets::gateways::resolve(&view, "cluster.local");

    let mut checked = BTreeMap::new();
    for policy in [ExportPolicy::Exported, ExportPolicy::All] {
        let options = Arc::new(RouteOptions {
            global_suffix: "global".into(),
            domain_suffix: "cluster.local".into(),
            export_policy: policy,
            accept_cluster_local: false,
            require_istio_alpn: false,
            allow_source: Vec::new(),
        });
        let gateway = RouteTable::build(&snapshot2, &options, None);
        let eds = EdsOptions {
            export_policy: policy,
            ..EdsOptions::default()
        };
        for (name, _, _) in matrix {
            for subset in [None, Some("v1"), Some("v2"), Some("v3"), Some("v9")] {
                let host = format!("{name}.bar.global");
                let sni = format!("outbound_.8000_.{}_.{host}", subset.unwrap_or(""));
                let cluster = format!("outbound|8000|{}|{host}", subset.unwrap_or(""));
                let decision = gateway.decide(&ClientHello {
                    sni: Some(sni.clone()),
                    alpn: vec![],
                });
                let (_, explain) = assignment(&cluster, &view, "network1", &eds);
                let behind_gateway: Vec<usize> = explain
                    .split
                    .localities
                    .iter()
                    .flat_map(|l| &l.endpoints)
                    .filter_map(|w| match &w.via {
                        Via::Gateway { network, endpoints } if network == "network2" => {
                            Some(*endpoints)
                        }
                        _ => None,
                    })
                    .collect();
                let case = format!("{policy:?} {cluster}");
                match &decision {
                    Ok(route) => assert_eq!(
                        behind_gateway.iter().sum::<usize>(),
                        route.backends.len(),
                        "{case}: the gateway routes to {} endpoint(s); EDS must stand for them all",
                        route.backends.len()
                    ),
                    Err(reject) => assert!(
                        behind_gateway.is_empty(),
                        "{case}: the gateway refuses ({reject}) but EDS sends clients there: {behind_gateway:?}"
                    ),
                }
                *checked
                    .entry(decision.map(|_| "route").unwrap_or_else(|r| r.reason()))
                    .or_insert(0) += 1;
            }
        }
    }
    // The matrix reaches every outcome the rules have.
    for outcome in [
        "route",
        "not_exported",
        "unknown_subset",
        "no_ready_endpoint",
    ] {
        assert!(
            checked.contains_key(outcome),
            "no case ended {outcome}: {checked:?}"
        );
    }
}
