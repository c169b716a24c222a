//! The fake API server's storage: objects by resource, a global resourceVersion counter, the
//! event history watches resume from (compactable, to provoke `410 Gone`), and label selectors.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use serde_json::{Value, json};

/// A resource the fake server knows. Custom resources are served only once "installed".
#[derive(Debug)]
pub struct ResourceDef {
    /// Empty for the core group.
    pub group: &'static str,
    pub versions: &'static [&'static str],
    pub plural: &'static str,
    pub kind: &'static str,
}

pub const RESOURCES: &[ResourceDef] = &[
    ResourceDef {
        group: "",
        versions: &["v1"],
        plural: "services",
        kind: "Service",
    },
    ResourceDef {
        group: "",
        versions: &["v1"],
        plural: "pods",
        kind: "Pod",
    },
    ResourceDef {
        group: "",
        versions: &["v1"],
        plural: "secrets",
        kind: "Secret",
    },
    ResourceDef {
        group: "discovery.k8s.io",
        versions: &["v1"],
        plural: "endpointslices",
        kind: "EndpointSlice",
    },
    ResourceDef {
        group: "networking.istio.io",
        versions: &["v1", "v1beta1"],
        plural: "serviceentries",
        kind: "ServiceEntry",
    },
    ResourceDef {
        group: "networking.istio.io",
        versions: &["v1", "v1beta1"],
        plural: "destinationrules",
        kind: "DestinationRule",
    },
    ResourceDef {
        group: "multicluster.x-k8s.io",
        versions: &["v1alpha1"],
        plural: "serviceexports",
        kind: "ServiceExport",
    },
];

pub fn find_by_plural(group: &str, plural: &str) -> Option<&'static ResourceDef> {
    RESOURCES
        .iter()
        .find(|r| r.group == group && r.plural == plural)
}

pub fn find_by_type(api_version: &str, kind: &str) -> Option<&'static ResourceDef> {
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    RESOURCES
        .iter()
        .find(|r| r.group == group && r.kind == kind && r.versions.contains(&version))
}

/// One change, as watches replay it.
#[derive(Debug)]
pub struct Change {
    pub rv: u64,
    pub resource: &'static str,
    /// `ADDED`, `MODIFIED`, `DELETED`.
    pub kind: &'static str,
    pub namespace: String,
    pub object: Value,
}

#[derive(Debug, Default)]
pub struct Store {
    pub rv: u64,
    /// (plural, namespace, name) -> object, resourceVersion set.
    pub objects: BTreeMap<(&'static str, String, String), Value>,
    pub history: VecDeque<Arc<Change>>,
    /// Watches from a resourceVersion below this get `410 Gone`.
    pub oldest: u64,
    /// Installed custom groups -> versions served.
    pub installed: BTreeMap<String, Vec<String>>,
    /// Paged lists in progress: continue token -> (resourceVersion, the items not yet sent).
    /// A page is served from the snapshot its list started with, as the real server does.
    pub continues: BTreeMap<String, (u64, Vec<Value>)>,
    pub next_continue: u64,
    /// Responses that carried a continue token or answered one.
    pub pages_served: u64,
    /// Refuse the next continue token with `410 Gone`, as if compacted between two pages.
    pub expire_next_continue: bool,
}

impl Store {
    pub fn served(&self, group: &str, version: &str) -> bool {
        if group.is_empty() {
            return version == "v1";
        }
        if group == "discovery.k8s.io" {
            return version == "v1";
        }
        self.installed
            .get(group)
            .is_some_and(|v| v.iter().any(|x| x == version))
    }

    /// Create or replace an object; returns the change to broadcast.
    pub fn apply(&mut self, mut object: Value) -> Result<Arc<Change>, String> {
        let api_version = object["apiVersion"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let kind = object["kind"].as_str().unwrap_or_default().to_string();
        let def = find_by_type(&api_version, &kind)
            .ok_or_else(|| format!("unknown type {api_version} {kind}"))?;
        let name = object["metadata"]["name"]
            .as_str()
            .ok_or("metadata.name is required")?
            .to_string();
        let namespace = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_string();
        self.rv += 1;
        let key = (def.plural, namespace.clone(), name.clone());
        let previous = self.objects.get(&key);
        let meta = object["metadata"].as_object_mut().ok_or("bad metadata")?;
        meta.insert("namespace".into(), namespace.clone().into());
        meta.insert("resourceVersion".into(), self.rv.to_string().into());
        let created = previous
            .and_then(|p| p["metadata"]["creationTimestamp"].as_str())
            .map(str::to_string)
            .unwrap_or_else(|| format!("2024-01-01T00:00:{:02}Z", self.rv % 60));
        meta.entry("creationTimestamp").or_insert(created.into());
        meta.insert("uid".into(), format!("uid-{}-{name}", def.plural).into());
        // Real API servers add these; the source must trim them.
        meta.insert(
            "managedFields".into(),
            json!([{"manager": "kubectl", "operation": "Apply", "fieldsType": "FieldsV1",
                    "fieldsV1": {"f:metadata": {}}}]),
        );
        let change_kind = if previous.is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        self.objects.insert(key, object.clone());
        Ok(self.record(def.plural, change_kind, namespace, object))
    }

    pub fn delete(
        &mut self,
        api_version: &str,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> Option<Arc<Change>> {
        let def = find_by_type(api_version, kind)?;
        let mut object =
            self.objects
                .remove(&(def.plural, namespace.to_string(), name.to_string()))?;
        self.rv += 1;
        object["metadata"]["resourceVersion"] = self.rv.to_string().into();
        Some(self.record(def.plural, "DELETED", namespace.to_string(), object))
    }

    fn record(
        &mut self,
        resource: &'static str,
        kind: &'static str,
        namespace: String,
        object: Value,
    ) -> Arc<Change> {
        let change = Arc::new(Change {
            rv: self.rv,
            resource,
            kind,
            namespace,
            object,
        });
        self.history.push_back(change.clone());
        change
    }

    /// Forget the history, as etcd compaction does: older resourceVersions become `410 Gone`.
    pub fn compact(&mut self) {
        self.history.clear();
        self.oldest = self.rv;
        self.continues.clear();
    }
}

/// A parsed `labelSelector`: equality-based terms (`k=v`, `k==v`, `k!=v`, `k`, `!k`).
#[derive(Debug, Default)]
pub struct Selector(Vec<Term>);

#[derive(Debug)]
enum Term {
    Eq(String, String),
    Ne(String, String),
    Exists(String),
    Absent(String),
}

impl Selector {
    pub fn parse(s: &str) -> Result<Selector, String> {
        let mut terms = Vec::new();
        for t in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let term = if let Some((k, v)) = t.split_once("!=") {
                Term::Ne(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = t.split_once("==").or_else(|| t.split_once('=')) {
                Term::Eq(k.trim().into(), v.trim().into())
            } else if let Some(k) = t.strip_prefix('!') {
                Term::Absent(k.trim().into())
            } else if t.contains(' ') || t.contains('(') {
                return Err(format!(
                    "set-based selector {t:?} is not supported by the fake"
                ));
            } else {
                Term::Exists(t.into())
            };
            terms.push(term);
        }
        Ok(Selector(terms))
    }

    pub fn matches(&self, object: &Value) -> bool {
        let labels = &object["metadata"]["labels"];
        let get = |k: &str| labels.get(k).and_then(Value::as_str);
        self.0.iter().all(|t| match t {
            Term::Eq(k, v) => get(k) == Some(v.as_str()),
            Term::Ne(k, v) => get(k) != Some(v.as_str()),
            Term::Exists(k) => get(k).is_some(),
            Term::Absent(k) => get(k).is_none(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors() {
        let o = json!({"metadata": {"labels": {"a": "1", "b": "2"}}});
        assert!(Selector::parse("a=1,b").unwrap().matches(&o));
        assert!(Selector::parse("a==1,!c").unwrap().matches(&o));
        assert!(!Selector::parse("a!=1").unwrap().matches(&o));
        assert!(!Selector::parse("c").unwrap().matches(&o));
        assert!(Selector::parse("a in (1)").is_err());
    }

    #[test]
    fn versions_count_up_and_compaction_forgets() {
        let mut s = Store::default();
        let c = s
            .apply(json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a"}}))
            .unwrap();
        assert_eq!((c.rv, c.kind), (1, "ADDED"));
        let c = s
            .apply(json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a"}}))
            .unwrap();
        assert_eq!((c.rv, c.kind), (2, "MODIFIED"));
        assert_eq!(s.delete("v1", "Service", "default", "a").unwrap().rv, 3);
        s.compact();
        assert!(s.history.is_empty() && s.oldest == 3);
    }
}
