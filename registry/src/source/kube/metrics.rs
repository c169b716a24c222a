//! Metrics of the Kubernetes source, one series per (cluster, kind, namespace) watch.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WatchLabels {
    /// The cluster the source reads (the local one, or a remote's id).
    pub cluster: String,
    pub kind: &'static str,
    /// The namespace watched, `*` for all.
    pub namespace: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    pub cluster: String,
    pub kind: &'static str,
    /// `applied` (added or modified) or `deleted`.
    pub event: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabels {
    pub cluster: String,
}

#[derive(Debug, Default)]
pub struct Metrics {
    /// 1 once the watch's first full list is done (or its CRD is known to be absent).
    pub synced: Family<WatchLabels, Gauge>,
    /// Unix time since when the API server is unreachable for this watch; 0 while it is fine.
    pub stale_since: Family<WatchLabels, Gauge>,
    /// Unix time of the last watch event.
    pub last_event: Family<WatchLabels, Gauge>,
    pub objects: Family<WatchLabels, Gauge>,
    pub errors: Family<WatchLabels, Counter>,
    /// Full re-lists after the first (410 Gone, or the watch could not resume).
    pub relists: Family<WatchLabels, Counter>,
    /// 1 while the kind's CRD is not installed.
    pub crd_missing: Family<WatchLabels, Gauge>,
    pub events: Family<EventLabels, Counter>,
    pub snapshots: Family<ClusterLabels, Counter>,
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Metrics {
        let m = Metrics::default();
        let r = registry.sub_registry_with_prefix("kube_source");
        r.register(
            "synced",
            "1 once the watch's first full list is done",
            m.synced.clone(),
        );
        r.register(
            "stale_since_seconds",
            "Unix time since when the API server is unreachable (0: reachable); the last snapshot keeps serving",
            m.stale_since.clone(),
        );
        r.register(
            "last_event_timestamp_seconds",
            "Unix time of the last watch event",
            m.last_event.clone(),
        );
        r.register("objects", "Objects held for the watch", m.objects.clone());
        r.register(
            "errors",
            "List or watch errors (each is retried with backoff)",
            m.errors.clone(),
        );
        r.register(
            "relists",
            "Full re-lists after the first (410 Gone)",
            m.relists.clone(),
        );
        r.register(
            "crd_missing",
            "1 while the kind's CustomResourceDefinition is not installed",
            m.crd_missing.clone(),
        );
        r.register("events", "Watch events received", m.events.clone());
        r.register("snapshots", "Snapshots published", m.snapshots.clone());
        m
    }
}
