//! The routing decision against a fixture snapshot, one case per rule.

use super::*;
use registry::source::dir::snapshot_from_yaml;

const FIXTURE: &str = include_str!("../../tests/fixtures/mesh.yaml");

fn options() -> RouteOptions {
    RouteOptions {
        global_suffix: "global".into(),
        domain_suffix: "cluster.local".into(),
        export_policy: ExportPolicy::Exported,
        accept_cluster_local: false,
        require_istio_alpn: false,
        allow_source: Vec::new(),
    }
}

fn table_with(options: RouteOptions) -> RouteTable {
    let snapshot = snapshot_from_yaml(FIXTURE);
    assert!(
        snapshot.status.errors.is_empty(),
        "{:?}",
        snapshot.status.errors
    );
    RouteTable::build(&snapshot, &Arc::new(options), None)
}

fn decide(table: &RouteTable, sni: &str) -> Result<Route, Reject> {
    table.decide(&ClientHello {
        sni: Some(sni.to_string()),
        alpn: vec![],
    })
}

fn addrs(route: &Route) -> Vec<String> {
    let mut v: Vec<String> = route.backends.iter().map(|b| b.addr.to_string()).collect();
    v.sort();
    v
}

#[test]
fn outbound_sni_routes_to_ready_endpoints_on_the_target_port() {
    let t = table_with(options());
    let r = decide(&t, "outbound_.8000_._.httpbin.bar.global").unwrap();
    assert_eq!(*r.service, ServiceName::new("bar", "httpbin"));
    assert_eq!(addrs(&r), ["127.0.0.11:80", "127.0.0.12:80"]);
}

#[test]
fn subset_selects_by_pod_labels() {
    let t = table_with(options());
    let r = decide(&t, "outbound_.8000_.v2_.httpbin.bar.global").unwrap();
    assert_eq!(addrs(&r), ["127.0.0.12:80"]);
    assert_eq!(r.subset.as_deref(), Some("v2"));
    assert!(matches!(
        decide(&t, "outbound_.8000_.v9_.httpbin.bar.global"),
        Err(Reject::UnknownSubset { .. })
    ));
    // A defined subset whose pods are not ready.
    let e = decide(&t, "outbound_.8000_.v3_.httpbin.bar.global").unwrap_err();
    assert!(matches!(e, Reject::NoReadyEndpoint { .. }));
    assert_eq!(e.alert(), Some(AlertDescription::InternalError));
}

#[test]
fn plain_host_only_for_single_port_services() {
    let t = table_with(options());
    assert_eq!(
        addrs(&decide(&t, "httpbin.bar.global").unwrap()),
        ["127.0.0.11:80", "127.0.0.12:80"]
    );
    assert!(matches!(
        decide(&t, "multi.foo.global"),
        Err(Reject::AmbiguousPort(_))
    ));
    let grpc = decide(&t, "outbound_.9090_._.multi.foo.global").unwrap();
    assert_eq!(addrs(&grpc), ["127.0.0.31:9091"]);
}

#[test]
fn refuses_what_it_may_not_serve() {
    let t = table_with(options());
    let e = decide(&t, "outbound_.9000_._.private.bar.global").unwrap_err();
    assert_eq!(e.reason(), "not_exported");
    assert_eq!(e.alert(), Some(AlertDescription::AccessDenied));
    let cases = [
        ("outbound_.8000_._.nothere.bar.global", "unknown_service"),
        ("outbound_.8001_._.httpbin.bar.global", "unknown_port"),
        (
            "outbound_.8000_._.httpbin.bar.svc.cluster.local",
            "outside_suffix",
        ),
        ("example.com", "outside_suffix"),
        ("outbound_.x_._.httpbin.bar.global", "bad_sni"),
        ("starting.foo.global", "no_ready_endpoint"),
    ];
    for (sni, reason) in cases {
        assert_eq!(decide(&t, sni).unwrap_err().reason(), reason, "{sni}");
    }
    let no_sni = t.decide(&ClientHello {
        sni: None,
        alpn: vec![],
    });
    assert_eq!(
        no_sni.unwrap_err().alert(),
        Some(AlertDescription::UnrecognizedName)
    );
}

#[test]
fn export_policy_all_restores_istio_behaviour() {
    let t = table_with(RouteOptions {
        export_policy: ExportPolicy::All,
        ..options()
    });
    assert_eq!(
        addrs(&decide(&t, "private.bar.global").unwrap()),
        ["127.0.0.21:9000"]
    );
}

#[test]
fn cluster_local_names_only_when_enabled() {
    let t = table_with(RouteOptions {
        accept_cluster_local: true,
        ..options()
    });
    assert!(decide(&t, "outbound_.8000_._.httpbin.bar.svc.cluster.local").is_ok());
    assert_eq!(
        decide(&t, "outbound_.8000_._.nope.bar.svc.cluster.local")
            .unwrap_err()
            .reason(),
        "unknown_service"
    );
}

#[test]
fn istio_alpn_when_required() {
    let t = table_with(RouteOptions {
        require_istio_alpn: true,
        ..options()
    });
    assert_eq!(
        decide(&t, "httpbin.bar.global").unwrap_err(),
        Reject::AlpnRequired
    );
    let ok = t.decide(&ClientHello {
        sni: Some("httpbin.bar.global".into()),
        alpn: vec!["istio-peer-exchange".into(), "istio".into()],
    });
    assert!(ok.is_ok());
}

#[test]
fn endpoint_state_survives_a_rebuild() {
    let snapshot = snapshot_from_yaml(FIXTURE);
    let first = RouteTable::build(&snapshot, &Arc::new(options()), None);
    let r1 = decide(&first, "outbound_.8000_.v1_.httpbin.bar.global").unwrap();
    let _guard = r1.backends[0].state.open();
    let second = RouteTable::build(&snapshot, &Arc::new(options()), Some(&first));
    let r2 = decide(&second, "outbound_.8000_.v1_.httpbin.bar.global").unwrap();
    assert_eq!(r2.backends[0].state.active(), 1);
    // The same address in two subsets shares one state.
    let all = decide(&second, "outbound_.8000_._.httpbin.bar.global").unwrap();
    let same = all
        .backends
        .iter()
        .find(|b| b.addr == r2.backends[0].addr)
        .unwrap();
    assert!(Arc::ptr_eq(&same.state, &r2.backends[0].state));
}

#[test]
fn source_admission_before_the_hello() {
    let open = table_with(options());
    assert!(open.admit_source("203.0.113.9".parse().unwrap()).is_ok());
    let t = table_with(RouteOptions {
        allow_source: vec![
            "10.1.0.0/16".parse().unwrap(),
            "127.0.0.1/32".parse().unwrap(),
        ],
        ..options()
    });
    assert!(t.admit_source("10.1.2.3".parse().unwrap()).is_ok());
    assert!(t.admit_source("127.0.0.1".parse().unwrap()).is_ok());
    let e = t.admit_source("10.2.0.1".parse().unwrap()).unwrap_err();
    assert_eq!(e.reason(), "source_denied");
    // Refused without a word: no alert tells a stranger what the gateway serves.
    assert_eq!(e.alert(), None);
}
