//! Gateway metrics (Prometheus, via prometheus-client). Labels are bounded: services come from
//! the route table, reasons from a fixed list; nothing the client sends becomes a label.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClosedLabels {
    pub service: String,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    pub service: String,
    /// `client_to_server` or `server_to_client`.
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectLabels {
    pub reason: &'static str,
    /// The service when the rejection got that far, else empty.
    pub service: String,
}

#[derive(Debug)]
pub struct Metrics {
    pub accepted: Counter,
    pub opened: Family<ServiceLabels, Counter>,
    pub closed: Family<ClosedLabels, Counter>,
    pub bytes: Family<BytesLabels, Counter>,
    pub rejected: Family<RejectLabels, Counter>,
    pub connect_failures: Family<ServiceLabels, Counter>,
    pub ejections: Family<ServiceLabels, Counter>,
    pub active: Gauge,
    /// Connections still reading their ClientHello: the peek budget's own count.
    pub peeking: Gauge,
    pub peek_seconds: Histogram,
    pub connect_seconds: Histogram,
    pub route_tables: Counter,
    /// Each service's counters, resolved once: a connection takes one read lock here instead
    /// of four label-set hashes and string copies.
    services: RwLock<HashMap<registry::ServiceName, Arc<ServiceCounters>>>,
}

/// One service's counters (cheap clones of the families' entries).
#[derive(Debug)]
pub struct ServiceCounters {
    pub opened: Counter,
    pub bytes_up: Counter,
    pub bytes_down: Counter,
    pub closed: Counter,
    pub idle_timeout: Counter,
    pub error: Counter,
    pub connect_failures: Counter,
    pub ejections: Counter,
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Metrics {
        let m = Metrics {
            accepted: Counter::default(),
            opened: Family::default(),
            closed: Family::default(),
            bytes: Family::default(),
            rejected: Family::default(),
            connect_failures: Family::default(),
            ejections: Family::default(),
            active: Gauge::default(),
            peeking: Gauge::default(),
            peek_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            connect_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            route_tables: Counter::default(),
            services: RwLock::default(),
        };
        let r = registry.sub_registry_with_prefix("gateway");
        r.register(
            "accepted_connections",
            "TCP connections accepted",
            m.accepted.clone(),
        );
        r.register(
            "connections_opened",
            "Connections routed and connected to an endpoint, by service",
            m.opened.clone(),
        );
        r.register(
            "connections_closed",
            "Routed connections closed, by service and outcome",
            m.closed.clone(),
        );
        r.register(
            "bytes",
            "Bytes spliced, by service and direction",
            m.bytes.clone(),
        );
        r.register(
            "rejected_connections",
            "Connections refused before routing, by reason",
            m.rejected.clone(),
        );
        r.register(
            "connect_failures",
            "Failed connect attempts to endpoints, by service",
            m.connect_failures.clone(),
        );
        r.register(
            "endpoint_ejections",
            "Endpoints ejected after consecutive connect failures, by service",
            m.ejections.clone(),
        );
        r.register(
            "active_connections",
            "Connections open now",
            m.active.clone(),
        );
        r.register(
            "peeking_connections",
            "Connections reading their ClientHello now (bounded by --max-peeking)",
            m.peeking.clone(),
        );
        r.register(
            "peek_duration_seconds",
            "Time from accept to a complete ClientHello",
            m.peek_seconds.clone(),
        );
        r.register(
            "connect_duration_seconds",
            "Time to connect to the chosen endpoint",
            m.connect_seconds.clone(),
        );
        r.register(
            "route_table_builds",
            "Route tables built from config snapshots",
            m.route_tables.clone(),
        );
        m
    }

    pub fn reject(&self, reason: &'static str, service: Option<&registry::ServiceName>) {
        self.rejected
            .get_or_create(&RejectLabels {
                reason,
                service: service.map(|s| s.to_string()).unwrap_or_default(),
            })
            .inc();
    }

    /// The counters of `service`, created on first use.
    pub fn service(&self, service: &registry::ServiceName) -> Arc<ServiceCounters> {
        if let Some(c) = self.services.read().expect("not poisoned").get(service) {
            return c.clone();
        }
        let name = service.to_string();
        let labels = ServiceLabels {
            service: name.clone(),
        };
        let bytes = |direction| {
            self.bytes
                .get_or_create(&BytesLabels {
                    service: name.clone(),
                    direction,
                })
                .clone()
        };
        let closed = |outcome| {
            self.closed
                .get_or_create(&ClosedLabels {
                    service: name.clone(),
                    outcome,
                })
                .clone()
        };
        let counters = Arc::new(ServiceCounters {
            opened: self.opened.get_or_create(&labels).clone(),
            bytes_up: bytes("client_to_server"),
            bytes_down: bytes("server_to_client"),
            closed: closed("closed"),
            idle_timeout: closed("idle_timeout"),
            error: closed("error"),
            connect_failures: self.connect_failures.get_or_create(&labels).clone(),
            ejections: self.ejections.get_or_create(&labels).clone(),
        });
        self.services
            .write()
            .expect("not poisoned")
            .entry(service.clone())
            .or_insert(counters)
            .clone()
    }
}
