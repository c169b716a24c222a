//! The dns server's debug routes on the admin listener: `/config_dump` (config, source status,
//! the answer table with every host and where its addresses come from) and
//! `/debug/explain?host=...[&type=A]` (what the server answers for a name, and why).

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;

use axum::Router;
use axum::extract::Query;
use axum::routing::get;
use hickory_proto::rr::{LowerName, Name, RecordType};
use process_shell::admin::json_response;
use registry::SnapshotHandle;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::answers::Answers;
use crate::config::Config;
use crate::table::{Conflict, HostInfo, Lookup, Place, Table};

#[derive(Clone)]
pub struct AdminState {
    pub config: Arc<Config>,
    pub snapshot: SnapshotHandle,
    pub answers: watch::Receiver<Arc<Answers>>,
}

pub fn router(state: AdminState) -> Router {
    let dump = state.clone();
    Router::new()
        .route(
            "/config_dump",
            get(move || {
                let s = dump.clone();
                async move { json_response(&config_dump(&s)) }
            }),
        )
        .route(
            "/debug/explain",
            get(move |Query(q): Query<ExplainQuery>| {
                let answers = state.answers.borrow().clone();
                async move { json_response(&explain(&answers.table, &q)) }
            }),
        )
}

#[derive(Serialize)]
struct ConfigDump<'a> {
    config: &'a Config,
    source: registry::snapshot::SourceStatus,
    table: TableDump<'a>,
}

#[derive(Serialize)]
struct TableDump<'a> {
    version: u64,
    zones: Vec<String>,
    entries_served: usize,
    names: Vec<String>,
    hosts: &'a BTreeMap<String, HostInfo>,
    conflicts: &'a [Conflict],
    notes: &'a [String],
}

fn config_dump(s: &AdminState) -> serde_json::Value {
    let answers = s.answers.borrow().clone();
    let table = &answers.table;
    let snapshot = s.snapshot.current();
    let dump = ConfigDump {
        config: &s.config,
        source: snapshot.status.clone(),
        table: TableDump {
            version: table.version,
            zones: table.zones().map(|z| z.name.clone()).collect(),
            entries_served: table.entries_served,
            names: table.names(),
            hosts: &table.hosts,
            conflicts: &table.conflicts,
            notes: &table.notes,
        },
    };
    serde_json::to_value(&dump).unwrap_or_default()
}

#[derive(Debug, Deserialize)]
pub struct ExplainQuery {
    pub host: Option<String>,
    /// Record type to explain (default A).
    #[serde(default, rename = "type")]
    pub qtype: Option<String>,
}

#[derive(Debug, Default, Serialize)]
pub struct Explanation {
    pub host: String,
    pub r#type: String,
    /// `answer`, `nodata`, `nxdomain`, `refused` or `error`.
    pub outcome: &'static str,
    /// What an operator should know.
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// Records in the answer, as zone-file lines.
    pub answers: Vec<String>,
    /// The host entry that answers (for SRV names, the target host; for wildcards, `*.x`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub matched: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<HostInfo>,
    pub conflicts: Vec<String>,
}

pub fn explain(table: &Table, q: &ExplainQuery) -> Explanation {
    let host = q.host.clone().unwrap_or_default();
    let qtype_text = q.qtype.clone().unwrap_or_else(|| "A".into()).to_uppercase();
    let mut out = Explanation {
        host: host.clone(),
        r#type: qtype_text.clone(),
        ..Explanation::default()
    };
    let qtype = match RecordType::from_str(&qtype_text) {
        Ok(t) => t,
        Err(_) => {
            out.outcome = "error";
            out.message = format!("`{qtype_text}` is not a record type (try A, AAAA or SRV)");
            return out;
        }
    };
    let name = match Name::from_str(&format!("{}.", host.trim_end_matches('.'))) {
        Ok(n) if !host.is_empty() => LowerName::from(n),
        _ => {
            out.outcome = "error";
            out.message = "give a name: /debug/explain?host=httpbin.bar.global".into();
            return out;
        }
    };
    let Some(found) = table.locate(&name) else {
        out.outcome = "refused";
        out.message = format!(
            "{host} is in none of the served zones ({}): REFUSED, this is not an open resolver",
            table
                .zones()
                .map(|z| z.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        return out;
    };
    out.zone = Some(found.zone.name.clone());
    let bare = name.to_string().trim_end_matches('.').to_string();
    let (matched, how) = match found.place {
        Place::Apex(_) => (Some(bare.clone()), "the zone apex (SOA and NS)".to_string()),
        Place::Exact(_) if bare.starts_with('_') => {
            let target = Name::from(name.clone()).trim_to(name.num_labels() as usize - 2);
            let target = target.to_string().trim_end_matches('.').to_string();
            (
                Some(target.clone()),
                format!("an SRV name of host {target}"),
            )
        }
        Place::Exact(_) => (Some(bare.clone()), "an exact host".to_string()),
        Place::Wildcard(parent, _) => {
            let w = format!("*.{}", parent.to_string().trim_end_matches('.'));
            (
                Some(w.clone()),
                format!("wildcard host {w} (no exact host of that name)"),
            )
        }
        Place::EmptyNonTerminal => (
            None,
            "a name that exists only because names below it do (an empty non-terminal)".into(),
        ),
        Place::Missing => (None, "no ServiceEntry host of that name".into()),
    };
    out.details = matched.as_ref().and_then(|m| table.hosts.get(m).cloned());
    out.conflicts = matched
        .iter()
        .flat_map(|m| table.conflicts.iter().filter(move |c| c.host == *m))
        .map(|c| c.to_string())
        .collect();
    out.matched = matched;
    let source = out
        .details
        .as_ref()
        .map(|d| format!("; ServiceEntry {}, {}", d.entry, d.address_source))
        .unwrap_or_default();
    match table.lookup(&name, qtype) {
        Lookup::Answer { answers, .. } => {
            out.outcome = "answer";
            out.answers = answers.iter().map(|r| r.to_string()).collect();
            out.message = format!("{host} is {how}{source}");
        }
        Lookup::NoData { .. } => {
            out.outcome = "nodata";
            out.message = format!(
                "{host} is {how} but has no {qtype_text} record: NOERROR with the SOA (NODATA)\
                 {source}"
            );
        }
        Lookup::NxDomain { .. } => {
            out.outcome = "nxdomain";
            out.message = format!("{host}: {how}: NXDOMAIN with the SOA");
        }
        Lookup::Refused => out.outcome = "refused",
    }
    out
}

#[cfg(test)]
mod tests {
    use registry::source::dir::snapshot_from_yaml;

    use super::*;
    use crate::table::TableOptions;

    fn table() -> Table {
        let yaml = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: old, \
                    namespace: a, creationTimestamp: '2024-01-01T00:00:00Z'}\nspec:\n  hosts: \
                    [httpbin.bar.global, '*.w.global']\n  addresses: [240.0.0.2]\n  ports: \
                    [{number: 8000, name: http}]\n---\napiVersion: networking.istio.io/v1\nkind: \
                    ServiceEntry\nmetadata: {name: new, namespace: b, creationTimestamp: \
                    '2025-01-01T00:00:00Z'}\nspec:\n  hosts: [httpbin.bar.global]\n  addresses: \
                    [240.0.0.3]\n";
        let options = TableOptions {
            zones: vec!["global".into()],
            ttl: 30,
            vip_v4: None,
            vip_v6: None,
        };
        Table::build(&snapshot_from_yaml(yaml), &options)
    }

    fn ask(host: &str, qtype: Option<&str>) -> Explanation {
        explain(
            &table(),
            &ExplainQuery {
                host: Some(host.into()),
                qtype: qtype.map(str::to_string),
            },
        )
    }

    #[test]
    fn explains_answers_conflicts_and_refusals() {
        let e = ask("httpbin.bar.global", None);
        assert_eq!(e.outcome, "answer");
        assert_eq!(e.answers.len(), 1);
        assert!(e.answers[0].contains("240.0.0.2"), "{e:?}");
        assert!(e.message.contains("ServiceEntry a/old"), "{e:?}");
        assert_eq!(e.conflicts.len(), 1);
        assert!(e.conflicts[0].contains("b/new"));
        assert_eq!(e.details.unwrap().shadowed, ["b/new"]);

        let e = ask("httpbin.bar.global", Some("aaaa"));
        assert_eq!(e.outcome, "nodata");
        let e = ask("x.w.global", None);
        assert_eq!(e.outcome, "answer");
        assert_eq!(e.matched.as_deref(), Some("*.w.global"));
        let e = ask("_http._tcp.httpbin.bar.global", Some("SRV"));
        assert_eq!(e.outcome, "answer");
        assert_eq!(e.matched.as_deref(), Some("httpbin.bar.global"));
        assert_eq!(ask("nope.global", None).outcome, "nxdomain");
        assert_eq!(ask("bar.global", None).outcome, "nodata");
        let e = ask("example.com", None);
        assert_eq!(e.outcome, "refused");
        assert!(e.message.contains("not an open resolver"));
        assert_eq!(ask("", None).outcome, "error");
        assert_eq!(ask("a.global", Some("NOPE")).outcome, "error");
    }
}
