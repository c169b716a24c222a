//! Prometheus metrics. Labels are bounded: cluster ids come from configuration and secrets,
//! kinds and states from fixed lists; nothing a client sends becomes a label.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::view::MeshView;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// `sotw` or `delta`.
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabels {
    pub cluster: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    /// `synced`, `syncing` or `stale`.
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SecretLabels {
    /// `rejected` (malformed, duplicate, refused) or `accepted`.
    pub outcome: &'static str,
}

#[derive(Debug)]
pub struct XdsMetrics {
    pushes: Family<KindLabels, Counter>,
    nacks: Family<KindLabels, Counter>,
    streams: Family<KindLabels, Gauge>,
    push_seconds: Histogram,
}

impl XdsMetrics {
    pub fn new(registry: &mut Registry) -> XdsMetrics {
        let m = XdsMetrics {
            pushes: Family::default(),
            nacks: Family::default(),
            streams: Family::default(),
            push_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
        };
        let r = registry.sub_registry_with_prefix("xds");
        r.register("pushes", "xDS responses sent", m.pushes.clone());
        r.register("nacks", "Responses rejected by clients", m.nacks.clone());
        r.register("connected_streams", "Open xDS streams", m.streams.clone());
        r.register(
            "push_latency_seconds",
            "From a debounced mesh change to the response being queued on a stream",
            m.push_seconds.clone(),
        );
        m
    }

    pub fn streams(&self, kind: &'static str) -> Gauge {
        self.streams.get_or_create(&KindLabels { kind }).clone()
    }

    pub fn nack(&self, kind: &'static str) {
        self.nacks.get_or_create(&KindLabels { kind }).inc();
    }

    pub fn pushed(&self, kind: &'static str, latency: Duration) {
        self.pushes.get_or_create(&KindLabels { kind }).inc();
        self.push_seconds.observe(latency.as_secs_f64());
    }

    pub fn pushes(&self, kind: &'static str) -> u64 {
        self.pushes.get_or_create(&KindLabels { kind }).get()
    }

    pub fn nacks(&self, kind: &'static str) -> u64 {
        self.nacks.get_or_create(&KindLabels { kind }).get()
    }
}

#[derive(Debug)]
pub struct ClusterMetrics {
    by_state: Family<StateLabels, Gauge>,
    endpoints: Family<ClusterLabels, Gauge>,
    ready: Family<ClusterLabels, Gauge>,
    stale: Family<ClusterLabels, Gauge>,
    pub secrets: Family<SecretLabels, Counter>,
}

impl ClusterMetrics {
    pub fn new(registry: &mut Registry) -> ClusterMetrics {
        let m = ClusterMetrics {
            by_state: Family::default(),
            endpoints: Family::default(),
            ready: Family::default(),
            stale: Family::default(),
            secrets: Family::default(),
        };
        let r = registry.sub_registry_with_prefix("remote");
        r.register("clusters", "Clusters by state", m.by_state.clone());
        r.register("endpoints", "Endpoints per cluster", m.endpoints.clone());
        r.register(
            "ready_endpoints",
            "Ready endpoints per cluster",
            m.ready.clone(),
        );
        r.register(
            "cluster_stale",
            "1 while a cluster's source is not answering and its last endpoints are kept",
            m.stale.clone(),
        );
        r.register(
            "secret_clusters",
            "Cluster entries of kubeconfig Secrets processed, by outcome",
            m.secrets.clone(),
        );
        m
    }

    /// Refresh the gauges from a view.
    pub fn observe(&self, view: &MeshView) {
        self.endpoints.clear();
        self.ready.clear();
        self.stale.clear();
        let (mut synced, mut syncing, mut stale) = (0, 0, 0);
        for s in view.summaries() {
            let l = ClusterLabels {
                cluster: s.id.clone(),
            };
            self.endpoints.get_or_create(&l).set(s.endpoints as i64);
            self.ready.get_or_create(&l).set(s.ready_endpoints as i64);
            self.stale.get_or_create(&l).set(i64::from(s.stale));
            match (s.stale, s.synced) {
                (true, _) => stale += 1,
                (false, true) => synced += 1,
                (false, false) => syncing += 1,
            }
        }
        for (state, n) in [("synced", synced), ("syncing", syncing), ("stale", stale)] {
            self.by_state.get_or_create(&StateLabels { state }).set(n);
        }
    }
}
