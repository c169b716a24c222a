use std::collections::BTreeSet;

use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::google::rpc::Status;
use prost::Message;

use super::*;
use crate::xds::snapshot::tests::{
    HTTPBIN, WEB_GLOBAL, base_view, httpbin_changed_view, share_unchanged, snap, view, view_with,
};

const CLUSTER_2: &str = include_str!("../../../tests/fixtures/cluster-2/mesh.yaml");

fn opts() -> EdsOptions {
    EdsOptions::default()
}

fn delta_req(sub: &[&str], unsub: &[&str], nonce: &str) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: EDS_TYPE.into(),
        resource_names_subscribe: sub.iter().map(|s| s.to_string()).collect(),
        resource_names_unsubscribe: unsub.iter().map(|s| s.to_string()).collect(),
        response_nonce: nonce.into(),
        ..Default::default()
    }
}

fn sotw_req(names: &[&str], nonce: &str, version: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        type_url: EDS_TYPE.into(),
        resource_names: names.iter().map(|s| s.to_string()).collect(),
        response_nonce: nonce.into(),
        version_info: version.into(),
        ..Default::default()
    }
}

fn names(r: &DeltaDiscoveryResponse) -> BTreeSet<String> {
    r.resources.iter().map(|r| r.name.clone()).collect()
}

fn cla(bytes: &[u8]) -> ClusterLoadAssignment {
    ClusterLoadAssignment::decode(bytes).unwrap()
}

#[test]
fn delta_gets_exactly_the_changed_resources() {
    let a = base_view();
    let s1 = snap(None, 1, a.clone());
    let s2 = snap(Some(&s1), 2, share_unchanged(&a, httpbin_changed_view()));
    let mut d = DeltaStream::default();
    let (event, r) = d.on_request(&delta_req(&[], &[], ""), &s1, &opts());
    assert_eq!(event, Event::Request);
    let r = r.expect("the full state");
    assert_eq!(r.resources.len(), s1.resources.len());
    assert!(r.removed_resources.is_empty());
    // In step with the snapshot: nothing recorded name by name.
    assert_eq!((d.known(), d.recorded()), (s1.resources.len(), 0));
    // The ACK asks nothing new.
    let (event, again) = d.on_request(&delta_req(&[], &[], &r.nonce), &s1, &opts());
    assert_eq!((event, again), (Event::Ack, None));
    assert!(d.on_generation(&s1, &opts()).is_none());
    let r2 = d.on_generation(&s2, &opts()).expect("the change");
    let changed: BTreeSet<String> = s2.changed.iter().map(|n| n.to_string()).collect();
    assert!(!changed.is_empty());
    assert_eq!(names(&r2), changed);
    assert!(r2.removed_resources.is_empty());
    let httpbin = r2.resources.iter().find(|r| r.name == HTTPBIN).unwrap();
    assert_eq!(
        httpbin.version,
        version_string(s2.resources[HTTPBIN].version)
    );
    assert_eq!(
        cla(&httpbin.resource.as_ref().unwrap().value),
        cla(&s2.resources[HTTPBIN].bytes)
    );
    assert_ne!(r2.nonce, r.nonce);
    // Seen: nothing more for the same snapshot.
    assert!(d.on_generation(&s2, &opts()).is_none());
    assert_eq!((d.known(), d.recorded()), (s2.resources.len(), 0));
}

#[test]
fn delta_after_a_missed_snapshot_sends_what_differs() {
    let a = base_view();
    let s1 = snap(None, 1, a.clone());
    let s2 = snap(Some(&s1), 2, share_unchanged(&a, httpbin_changed_view()));
    let s3 = snap(Some(&s2), 3, share_unchanged(&a, base_view()));
    let mut d = DeltaStream::default();
    d.on_request(&delta_req(&[], &[], ""), &s1, &opts());
    // s2 was never seen; s3 equals s1, so nothing differs for this client.
    assert!(d.on_generation(&s3, &opts()).is_none());
    let r = d.on_generation(&snap(Some(&s3), 4, httpbin_changed_view()), &opts());
    assert!(names(&r.unwrap()).contains(HTTPBIN));
}

#[test]
fn delta_removes_a_vanished_wildcard_resource() {
    let a = base_view();
    let s1 = snap(None, 1, a.clone());
    let s2 = snap(Some(&s1), 2, share_unchanged(&a, view(CLUSTER_2, false)));
    let mut d = DeltaStream::default();
    d.on_request(&delta_req(&["*"], &[], ""), &s1, &opts());
    let r = d.on_generation(&s2, &opts()).expect("the removal");
    assert!(r.resources.is_empty());
    let removed: BTreeSet<&str> = r.removed_resources.iter().map(String::as_str).collect();
    assert!(removed.contains(WEB_GLOBAL), "{removed:?}");
    assert_eq!(removed.len(), 2);
    assert_eq!(d.known(), s2.resources.len());
}

#[test]
fn delta_named_subscriptions_and_unsubscribe() {
    let a = base_view();
    let s1 = snap(None, 1, a.clone());
    let unknown = "outbound|1234||nothing.here.global";
    let mut d = DeltaStream::default();
    let (_, r) = d.on_request(&delta_req(&[HTTPBIN, unknown], &[], ""), &s1, &opts());
    let r = r.unwrap();
    assert_eq!(
        names(&r),
        BTreeSet::from([HTTPBIN.to_string(), unknown.to_string()])
    );
    assert_eq!((d.known(), d.recorded()), (2, 2));
    let empty = r.resources.iter().find(|r| r.name == unknown).unwrap();
    assert!(
        cla(&empty.resource.as_ref().unwrap().value)
            .endpoints
            .is_empty()
    );
    // Another service's change does not concern this stream.
    let web_gone = snap(Some(&s1), 2, share_unchanged(&a, view(CLUSTER_2, false)));
    assert!(d.on_generation(&web_gone, &opts()).is_none());
    // Its own does.
    let s3 = snap(
        Some(&web_gone),
        3,
        share_unchanged(&a, httpbin_changed_view()),
    );
    let r = d.on_generation(&s3, &opts()).unwrap();
    let httpbin_only: BTreeSet<String> = BTreeSet::from([HTTPBIN.to_string()]);
    assert_eq!(names(&r), httpbin_only);
    // Unsubscribing sends nothing; subscribing again sends the resource again.
    let (_, r) = d.on_request(&delta_req(&[], &[HTTPBIN], &r.nonce), &s3, &opts());
    assert!(r.is_none());
    let (_, r) = d.on_request(&delta_req(&[HTTPBIN], &[], ""), &s3, &opts());
    assert_eq!(names(&r.unwrap()), httpbin_only);
    // A resource the client says it holds at our version is not sent again.
    let mut d2 = DeltaStream::default();
    let mut req = delta_req(&[HTTPBIN], &[], "");
    req.initial_resource_versions.insert(
        HTTPBIN.into(),
        version_string(s3.resources[HTTPBIN].version),
    );
    assert!(d2.on_request(&req, &s3, &opts()).1.is_none());
}

#[test]
fn delta_nack_keeps_the_state() {
    let s1 = snap(None, 1, base_view());
    let mut d = DeltaStream::default();
    let (_, r) = d.on_request(&delta_req(&[], &[], ""), &s1, &opts());
    let mut nack = delta_req(&[], &[], &r.unwrap().nonce);
    nack.error_detail = Some(Status {
        message: "bad".into(),
        ..Default::default()
    });
    let (event, r) = d.on_request(&nack, &s1, &opts());
    assert_eq!((event, r), (Event::Nack("bad".into()), None));
}

#[test]
fn sotw_pushes_the_whole_set_only_when_it_changed() {
    let a = base_view();
    let s1 = snap(None, 1, a.clone());
    let mut s = SotwStream::default();
    let (event, r) = s.on_request(&sotw_req(&[], "", ""), &s1, &opts());
    assert_eq!(event, Event::Request);
    let r = r.unwrap();
    assert_eq!(r.resources.len(), s1.resources.len());
    let (event, again) = s.on_request(&sotw_req(&[], &r.nonce, &r.version_info), &s1, &opts());
    assert_eq!((event, again), (Event::Ack, None));
    assert_eq!(s.acked_version, r.version_info);
    // A stale nonce is ignored.
    let (event, _) = s.on_request(&sotw_req(&[], "old", ""), &s1, &opts());
    assert_eq!(event, Event::Stale);
    // An equal snapshot pushes nothing; a changed one the whole set with a new version.
    let same = snap(Some(&s1), 2, share_unchanged(&a, base_view()));
    assert!(s.on_generation(&same, &opts()).is_none());
    let s3 = snap(Some(&same), 3, share_unchanged(&a, httpbin_changed_view()));
    let r3 = s.on_generation(&s3, &opts()).unwrap();
    assert_eq!(r3.resources.len(), s3.resources.len());
    assert_ne!(r3.version_info, r.version_info);
    // A removal is a smaller set.
    let s4 = snap(Some(&s3), 4, share_unchanged(&a, view(CLUSTER_2, false)));
    let r4 = s.on_generation(&s4, &opts()).unwrap();
    assert_eq!(r4.resources.len(), s4.resources.len());
    assert!(r4.resources.len() < r3.resources.len());
}

/// The stream's loop fetches the current snapshot for each request, which marks a newer one
/// seen; a stale ACK read at that moment must still push it.
#[test]
fn sotw_a_stale_ack_still_delivers_a_newer_snapshot() {
    let a = base_view();
    let s1 = snap(None, 1, a.clone());
    let mut s = SotwStream::default();
    let r1 = s
        .on_request(&sotw_req(&[], "", ""), &s1, &opts())
        .1
        .unwrap();
    let s2 = snap(Some(&s1), 2, share_unchanged(&a, httpbin_changed_view()));
    let r2 = s.on_generation(&s2, &opts()).unwrap();
    let s3 = snap(Some(&s2), 3, share_unchanged(&a, base_view()));
    // The client ACKs the first response after the second was sent: stale.
    let (event, r3) = s.on_request(&sotw_req(&[], &r1.nonce, &r1.version_info), &s3, &opts());
    assert_eq!(event, Event::Stale);
    let r3 = r3.expect("the newer snapshot, not silence");
    assert_ne!(r3.version_info, r2.version_info);
    // Nothing more once it has been sent.
    let (event, again) = s.on_request(&sotw_req(&[], &r2.nonce, ""), &s3, &opts());
    assert_eq!((event, again), (Event::Stale, None));
}

#[test]
fn sotw_named_subscription_ignores_other_services() {
    let a = base_view();
    let s1 = snap(None, 1, a.clone());
    let mut s = SotwStream::default();
    let (_, r) = s.on_request(&sotw_req(&[WEB_GLOBAL], "", ""), &s1, &opts());
    let r = r.unwrap();
    assert_eq!(r.resources.len(), 1);
    assert_eq!(cla(&r.resources[0].value).cluster_name, WEB_GLOBAL);
    let s2 = snap(Some(&s1), 2, share_unchanged(&a, httpbin_changed_view()));
    assert!(s.on_generation(&s2, &opts()).is_none());
    // Its service vanishing leaves an empty assignment, pushed.
    let s3 = snap(Some(&s2), 3, share_unchanged(&a, view(CLUSTER_2, false)));
    let r3 = s.on_generation(&s3, &opts()).unwrap();
    assert_eq!(r3.resources.len(), 1);
    assert!(cla(&r3.resources[0].value).endpoints.is_empty());
}

/// `n` exported services `s<i>.many` with one ready endpoint each: `2n` names.
fn many(n: usize) -> String {
    let mut y = String::new();
    for i in 0..n {
        y.push_str(&format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: many, labels: {{multicluster.x-k8s.io/exported: \"true\"}}}}\nspec:\n  ports: [{{name: http, port: 80}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s{i}-1, namespace: many, labels: {{kubernetes.io/service-name: s{i}}}}}\naddressType: IPv4\nports: [{{name: http, port: 80}}]\nendpoints:\n- addresses: [\"10.9.{}.{}\"]\n  conditions: {{ready: true}}\n",
            i / 250,
            i % 250 + 1
        ));
    }
    y
}

#[test]
fn a_large_delta_state_comes_in_parts_even_across_a_change() {
    let s1 = snap(None, 1, view_with(&many(700)));
    assert!(s1.resources.len() > 1400);
    let mut d = DeltaStream::default();
    let (_, r) = d.on_request(&delta_req(&[], &[], ""), &s1, &opts());
    let r = r.unwrap();
    assert_eq!(r.resources.len(), MAX_DELTA_RESOURCES);
    assert!(d.has_more());
    let mut got: Vec<String> = r.resources.iter().map(|r| r.name.clone()).collect();
    // A change lands between the parts: the rest still comes, nothing twice, and the
    // changed resource at its new version.
    let s2 = snap(
        Some(&s1),
        2,
        share_unchanged(&s1.generation.view, {
            let mut v = httpbin_changed_view();
            let c2 = view_with(&many(700)).clusters["cluster-2"].clone();
            let c2 = crate::view::ClusterEntry {
                snapshot: Arc::new({
                    let mut s = (*c2.snapshot).clone();
                    s.services.insert(
                        registry::ServiceName::new("bar", "httpbin"),
                        v.clusters["cluster-2"].snapshot.services
                            [&registry::ServiceName::new("bar", "httpbin")]
                            .clone(),
                    );
                    s
                }),
                ..c2
            };
            v.clusters.insert("cluster-2".into(), c2);
            v
        }),
    );
    assert!(s2.changed.iter().any(|n| &**n == HTTPBIN));
    assert!(s2.recomputed < 20, "{}", s2.recomputed);
    let r = d.on_generation(&s2, &opts()).unwrap();
    got.extend(r.resources.iter().map(|r| r.name.clone()));
    let mut parts = 0;
    while d.has_more() {
        parts += 1;
        assert!(parts < 10);
        if let Some(r) = d.on_more(&s2, &opts()) {
            assert!(r.resources.len() <= MAX_DELTA_RESOURCES);
            got.extend(r.resources.iter().map(|r| r.name.clone()));
        }
    }
    let all: BTreeSet<String> = s2.resources.keys().map(|k| k.to_string()).collect();
    let unique: BTreeSet<String> = got.iter().cloned().collect();
    assert_eq!(unique, all);
    // Only a changed name may come twice (before and after the change).
    assert!(got.len() - unique.len() <= s2.changed.len());
    assert!(d.on_generation(&s2, &opts()).is_none());
    assert_eq!((d.known(), d.recorded()), (all.len(), 0));
}

#[test]
fn delta_wildcard_off_and_on_again() {
    let s1 = snap(None, 1, base_view());
    let mut d = DeltaStream::default();
    let (_, r) = d.on_request(&delta_req(&["*", HTTPBIN], &[], ""), &s1, &opts());
    assert_eq!(r.unwrap().resources.len(), s1.resources.len());
    // Dropping the wildcard removes everything but the named resource.
    let (_, r) = d.on_request(&delta_req(&[], &["*"], "1-1"), &s1, &opts());
    let r = r.unwrap();
    assert!(r.resources.is_empty());
    assert_eq!(r.removed_resources.len(), s1.resources.len() - 1);
    assert!(!r.removed_resources.iter().any(|n| n == HTTPBIN));
    assert_eq!((d.known(), d.recorded()), (1, 1));
    // Taking it again sends the others again.
    let (_, r) = d.on_request(&delta_req(&["*"], &[], "1-2"), &s1, &opts());
    assert_eq!(r.unwrap().resources.len(), s1.resources.len() - 1);
    assert_eq!((d.known(), d.recorded()), (s1.resources.len(), 0));
}
