//! Every answer rule, asked over real UDP and TCP of a server started in-process.

use std::time::Duration;

use hickory_proto::rr::{RData, RecordType};

use crate::support::*;

#[tokio::test]
async fn a_from_the_entry_addresses() {
    let f = Fixture::start().await;
    let r = ask(f.addr(), "httpbin.bar.global.", RecordType::A).await;
    assert_eq!(summary(&r), "NOERROR aa [\"A 240.0.0.2\"] auth=[]");
    assert_eq!(r.answers[0].ttl, 30, "the default TTL is 30 s");
    // Case does not matter (that the question comes back as asked is checked with dig).
    let r = ask(f.addr(), "HttpBin.BAR.global.", RecordType::A).await;
    assert_eq!(a_records(&r), ["240.0.0.2"]);
}

#[tokio::test]
async fn aaaa_from_ipv6_addresses_and_nodata_for_a_v4_only_name() {
    let f = Fixture::start().await;
    let r = ask(f.addr(), "dual.bar.global.", RecordType::AAAA).await;
    assert_eq!(summary(&r), "NOERROR aa [\"AAAA fd00::4\"] auth=[]");
    let r = ask(f.addr(), "dual.bar.global.", RecordType::A).await;
    assert_eq!(a_records(&r), ["240.0.0.4"]);
    // istiocoredns answered NXDOMAIN here, and resolvers then dropped the good A answer.
    let r = ask(f.addr(), "httpbin.bar.global.", RecordType::AAAA).await;
    assert_eq!(summary(&r), "NOERROR aa [] auth=[\"SOA\"]");
    let r = ask(f.addr(), "httpbin.bar.global.", RecordType::MX).await;
    assert_eq!(summary(&r), "NOERROR aa [] auth=[\"SOA\"]");
}

#[tokio::test]
async fn unknown_names_are_nxdomain_and_foreign_names_refused() {
    let f = Fixture::start().await;
    let r = ask(f.addr(), "nope.bar.global.", RecordType::A).await;
    assert_eq!(summary(&r), "NXDOMAIN aa [] auth=[\"SOA\"]");
    let soa = &r.authorities[0];
    assert_eq!(soa.name.to_string(), "global.");
    // Not an open resolver, even for a host a ServiceEntry lists.
    for name in ["example.com.", "api.example.com.", "globalx."] {
        let r = ask(f.addr(), name, RecordType::A).await;
        assert_eq!(summary(&r), "REFUSED [] auth=[]", "{name}");
    }
    // An empty non-terminal exists: NODATA, so QNAME-minimising resolvers carry on.
    let r = ask(f.addr(), "bar.global.", RecordType::A).await;
    assert_eq!(summary(&r), "NOERROR aa [] auth=[\"SOA\"]");
}

#[tokio::test]
async fn soa_and_ns_at_the_apex() {
    let f = Fixture::start().await;
    let r = ask(f.addr(), "global.", RecordType::SOA).await;
    assert_eq!(r.answers.len(), 1);
    let RData::SOA(soa) = &r.answers[0].data else {
        panic!("SOA expected: {r:?}")
    };
    assert_eq!(soa.mname.to_string(), "ns.dns.global.");
    assert_eq!(soa.minimum, 30);
    let r = ask(f.addr(), "global.", RecordType::NS).await;
    assert_eq!(summary(&r), "NOERROR aa [\"NS ns.dns.global.\"] auth=[]");
}

#[tokio::test]
async fn srv_for_named_ports_with_addresses_in_additional() {
    let f = Fixture::start().await;
    let r = ask(f.addr(), "_http._tcp.httpbin.bar.global.", RecordType::SRV).await;
    assert_eq!(
        summary(&r),
        "NOERROR aa [\"SRV 0 100 8000 httpbin.bar.global.\"] auth=[]"
    );
    assert_eq!(rdata(&r.additionals[0]), "A 240.0.0.2");
    let r = ask(
        f.addr(),
        "_metrics._udp.reviews.bar.global.",
        RecordType::SRV,
    )
    .await;
    assert_eq!(
        summary(&r),
        "NOERROR aa [\"SRV 0 100 9090 reviews.bar.global.\"] auth=[]"
    );
    let r = ask(f.addr(), "_nope._tcp.httpbin.bar.global.", RecordType::SRV).await;
    assert_eq!(rcode(&r), "NXDOMAIN");
}

#[tokio::test]
async fn wildcards_answer_below_but_not_at_their_apex_and_exact_wins() {
    let f = Fixture::start().await;
    for name in ["a.wild.global.", "deep.er.wild.global."] {
        let r = ask(f.addr(), name, RecordType::A).await;
        assert_eq!(a_records(&r), ["240.0.0.9"], "{name}");
        assert_eq!(
            r.answers[0].name.to_string(),
            name,
            "owner is the asked name"
        );
    }
    let r = ask(f.addr(), "exact.wild.global.", RecordType::A).await;
    assert_eq!(a_records(&r), ["240.0.0.10"]);
    let r = ask(f.addr(), "wild.global.", RecordType::A).await;
    assert_eq!(summary(&r), "NOERROR aa [] auth=[\"SOA\"]");
}

#[tokio::test]
async fn the_oldest_entry_wins_a_contested_host() {
    let f = Fixture::start().await;
    let r = ask(f.addr(), "shared.bar.global.", RecordType::A).await;
    assert_eq!(
        a_records(&r),
        ["240.0.0.20"],
        "zzz/older is older than aaa/newer"
    );
    let (_, body) = http_get(f.dns.admin_addr, "/debug/explain?host=shared.bar.global").await;
    let e: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(e["outcome"], "answer");
    assert_eq!(e["details"]["entry"], "zzz/older");
    assert_eq!(e["details"]["shadowed"][0], "aaa/newer");
    assert!(e["conflicts"][0].as_str().unwrap().contains("aaa/newer"));
    let (_, metrics) = http_get(f.dns.metrics_addr, "/metrics").await;
    assert!(metrics.contains("dns_host_conflicts 1"), "{metrics}");
}

#[tokio::test]
async fn vips_are_stable_across_restart_and_deletion_of_another_entry() {
    let f = Fixture::start().await;
    let vip = a_records(&ask(f.addr(), "reviews.bar.global.", RecordType::A).await);
    assert_eq!(vip.len(), 1);
    assert!(vip[0].starts_with("240.240."), "{vip:?}");

    // Restart on the same directory: the same VIP.
    let Fixture { dir, dns } = f;
    dns.shutdown().await;
    let dns = start(dir.path()).await;
    let again = a_records(&ask(dns.dns_addr, "reviews.bar.global.", RecordType::A).await);
    assert_eq!(again, vip, "VIP changed across a restart");

    // Add an address-less entry, then delete it, and delete another: reviews keeps its VIP.
    let f = Fixture { dir, dns };
    let extra = "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: \
                 ratings, namespace: bar}\nspec:\n  hosts: [ratings.bar.global]\n  resolution: \
                 DNS\n";
    f.write(&format!("{FIXTURE}{extra}"));
    eventually("ratings appears", Duration::from_secs(5), || async {
        !a_records(&udp(f.addr(), &query("ratings.bar.global.", RecordType::A)).await).is_empty()
    })
    .await;
    assert_eq!(
        a_records(&ask(f.addr(), "reviews.bar.global.", RecordType::A).await),
        vip
    );
    let without_httpbin = FIXTURE.replacen("httpbin.bar.global", "gone.bar.example", 1);
    f.write(&without_httpbin);
    eventually("httpbin disappears", Duration::from_secs(5), || async {
        rcode(&udp(f.addr(), &query("httpbin.bar.global.", RecordType::A)).await) == "NXDOMAIN"
    })
    .await;
    assert_eq!(
        a_records(&ask(f.addr(), "reviews.bar.global.", RecordType::A).await),
        vip
    );
}

#[tokio::test]
async fn changes_are_answered_live_without_restart() {
    let f = Fixture::start().await;
    assert_eq!(
        a_records(&ask(f.addr(), "httpbin.bar.global.", RecordType::A).await),
        ["240.0.0.2"]
    );
    f.write(&FIXTURE.replace("- 240.0.0.2", "- 240.0.0.99"));
    // The issue asks for "within a second"; the deadline is generous for a loaded CI machine,
    // and the poll interval (50 ms in tests, 500 ms by default) is what sets the real delay.
    eventually(
        "the new address is served",
        Duration::from_secs(5),
        || async {
            a_records(&udp(f.addr(), &query("httpbin.bar.global.", RecordType::A)).await)
                == ["240.0.0.99"]
        },
    )
    .await;
    let r = ask(f.addr(), "httpbin.bar.global.", RecordType::A).await;
    assert_eq!(a_records(&r), ["240.0.0.99"]);
    // A new name appears and a removed one goes, also live.
    f.write("");
    eventually("everything is gone", Duration::from_secs(5), || async {
        rcode(&udp(f.addr(), &query("httpbin.bar.global.", RecordType::A)).await) == "NXDOMAIN"
    })
    .await;
}
