//! DNS metrics (Prometheus, via prometheus-client). Labels are bounded: query types and response
//! codes map to fixed lists; no name a client sends becomes a label.

use std::sync::OnceLock;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::respond::{QTYPE_LABELS, RCODE_LABELS};
use crate::table::Table;

/// The transports, in the order of [`Metrics::observe_indexed`]'s counters.
pub const PROTOCOLS: [&str; 2] = ["udp", "tcp"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueryLabels {
    /// `A`, `AAAA`, `SRV`, ... or `other` / `none`.
    pub r#type: &'static str,
    pub rcode: &'static str,
    /// `udp` or `tcp`.
    pub protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MalformedLabels {
    /// `short` (dropped), `undecodable` (FORMERR), `response` (dropped), `bad_source` (dropped).
    pub reason: &'static str,
}

#[derive(Debug)]
pub struct Metrics {
    pub queries: Family<QueryLabels, Counter>,
    pub malformed: Family<MalformedLabels, Counter>,
    pub truncated: Counter,
    pub answer_seconds: Histogram,
    pub entries_served: Gauge,
    pub names_served: Gauge,
    pub conflicts: Gauge,
    pub table_notes: Gauge,
    pub table_builds: Counter,
    /// `queries`' counters by (type, rcode, protocol) index, looked up once each: the fast path
    /// neither hashes labels nor takes the family's lock.
    resolved: Box<[OnceLock<Counter>]>,
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Metrics {
        let m = Metrics {
            queries: Family::default(),
            malformed: Family::default(),
            truncated: Counter::default(),
            // 10 µs .. ~330 ms
            answer_seconds: Histogram::new(exponential_buckets(0.000_01, 2.0, 16)),
            entries_served: Gauge::default(),
            names_served: Gauge::default(),
            conflicts: Gauge::default(),
            table_notes: Gauge::default(),
            table_builds: Counter::default(),
            resolved: (0..QTYPE_LABELS.len() * RCODE_LABELS.len() * PROTOCOLS.len())
                .map(|_| OnceLock::new())
                .collect(),
        };
        let r = registry.sub_registry_with_prefix("dns");
        r.register(
            "queries",
            "Queries answered, by question type, response code and transport",
            m.queries.clone(),
        );
        r.register(
            "malformed",
            "Datagrams and TCP messages that were not a decodable query, by reason",
            m.malformed.clone(),
        );
        r.register(
            "truncated",
            "UDP answers too large for the client's buffer, sent with TC so it retries over TCP",
            m.truncated.clone(),
        );
        r.register(
            "answer_duration_seconds",
            "Time from a decoded query to its encoded answer",
            m.answer_seconds.clone(),
        );
        r.register(
            "service_entries_served",
            "ServiceEntries that contribute at least one name",
            m.entries_served.clone(),
        );
        r.register(
            "names_served",
            "Host and SRV names answered (wildcards count once)",
            m.names_served.clone(),
        );
        r.register(
            "host_conflicts",
            "Hosts claimed by more than one ServiceEntry (the oldest answers); see /debug/explain",
            m.conflicts.clone(),
        );
        r.register(
            "table_notes",
            "Hosts and addresses skipped while building the answer table; see /config_dump",
            m.table_notes.clone(),
        );
        r.register(
            "table_builds",
            "Answer tables built (one per config change)",
            m.table_builds.clone(),
        );
        m
    }

    pub fn observe(
        &self,
        qtype: &'static str,
        rcode: &'static str,
        protocol: &'static str,
        took: Duration,
    ) {
        self.queries
            .get_or_create(&QueryLabels {
                r#type: qtype,
                rcode,
                protocol,
            })
            .inc();
        self.answer_seconds.observe(took.as_secs_f64());
    }

    /// As [`Metrics::observe`], by index into [`QTYPE_LABELS`], [`RCODE_LABELS`] and
    /// [`PROTOCOLS`] (out of range: `other`, `udp`).
    pub fn observe_indexed(&self, qtype: usize, rcode: usize, protocol: usize, took: Duration) {
        let qtype = qtype.min(QTYPE_LABELS.len() - 1);
        let rcode = rcode.min(RCODE_LABELS.len() - 1);
        let protocol = if protocol < PROTOCOLS.len() {
            protocol
        } else {
            0
        };
        let at = (qtype * RCODE_LABELS.len() + rcode) * PROTOCOLS.len() + protocol;
        self.resolved[at]
            .get_or_init(|| {
                self.queries
                    .get_or_create(&QueryLabels {
                        r#type: QTYPE_LABELS[qtype],
                        rcode: RCODE_LABELS[rcode],
                        protocol: PROTOCOLS[protocol],
                    })
                    .clone()
            })
            .inc();
        self.answer_seconds.observe(took.as_secs_f64());
    }

    pub fn malformed(&self, reason: &'static str) {
        self.malformed
            .get_or_create(&MalformedLabels { reason })
            .inc();
    }

    /// Gauges describing a freshly built table.
    pub fn table_built(&self, table: &Table) {
        self.table_builds.inc();
        self.entries_served.set(table.entries_served as i64);
        self.names_served.set(table.names().len() as i64);
        self.conflicts.set(table.conflicts.len() as i64);
        self.table_notes.set(table.notes.len() as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_with_bounded_labels() {
        let mut registry = Registry::default();
        let m = Metrics::new(&mut registry);
        m.observe("A", "NOERROR", "udp", Duration::from_micros(30));
        m.observe_indexed(1, 0, 0, Duration::from_micros(30)); // A, NOERROR, udp again
        m.observe_indexed(3, 3, 1, Duration::from_micros(30));
        m.malformed("short");
        m.table_built(&Table::default());
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains("dns_queries_total{type=\"A\",rcode=\"NOERROR\",protocol=\"udp\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("dns_queries_total{type=\"SRV\",rcode=\"NXDOMAIN\",protocol=\"tcp\"} 1"),
            "{text}"
        );
        assert!(text.contains("dns_malformed_total{reason=\"short\"} 1"));
        assert!(text.contains("dns_answer_duration_seconds_bucket"));
        assert!(text.contains("dns_host_conflicts 0"));
        assert!(text.contains("dns_table_builds_total 1"));
    }
}
