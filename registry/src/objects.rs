//! The Kubernetes and Istio object shapes we read, exactly as `kubectl get -o yaml` shows them.
//!
//! Core kinds (Service, EndpointSlice, Pod, Secret) are `k8s-openapi`'s own types, so every
//! valid field is accepted. The Istio and MCS kinds are ours; their specs use
//! `deny_unknown_fields` so a typo in a file is reported instead of silently ignored.

use std::collections::BTreeMap;

pub use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

pub use k8s_openapi::api::core::v1::{Pod, Secret, Service};
pub use k8s_openapi::api::discovery::v1::EndpointSlice;

/// `networking.istio.io/v1beta1` or `v1` ServiceEntry (the two versions share one schema).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceEntry {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: ServiceEntrySpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<serde_json::Value>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceEntrySpec {
    pub hosts: Vec<String>,
    #[serde(default)]
    pub addresses: Vec<String>,
    #[serde(default)]
    pub ports: Vec<ServiceEntryPort>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolution: Option<String>,
    #[serde(default)]
    pub endpoints: Vec<WorkloadEntry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_selector: Option<serde_json::Value>,
    #[serde(default)]
    pub export_to: Vec<String>,
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceEntryPort {
    pub number: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<u32>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadEntry {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    #[serde(default)]
    pub ports: BTreeMap<String, u32>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locality: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
}

/// `networking.istio.io/v1beta1` or `v1` DestinationRule. We read `host` and the subsets'
/// labels; traffic policies are kept opaque.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DestinationRule {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    pub spec: DestinationRuleSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<serde_json::Value>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DestinationRuleSpec {
    pub host: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic_policy: Option<serde_json::Value>,
    #[serde(default)]
    pub subsets: Vec<Subset>,
    #[serde(default)]
    pub export_to: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_selector: Option<serde_json::Value>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Subset {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic_policy: Option<serde_json::Value>,
}

/// `multicluster.x-k8s.io/v1alpha1` ServiceExport: its presence exports the Service of the same
/// namespace and name.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceExport {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<serde_json::Value>,
}

/// The kinds we read. Anything else is skipped by the sources.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Kind {
    Service,
    EndpointSlice,
    Pod,
    Secret,
    ServiceEntry,
    DestinationRule,
    ServiceExport,
}

impl Kind {
    /// Which of our kinds an `apiVersion`/`kind` pair is, if any.
    pub fn from_type(api_version: &str, kind: &str) -> Option<Kind> {
        match (api_version, kind) {
            ("v1", "Service") => Some(Kind::Service),
            ("v1", "Pod") => Some(Kind::Pod),
            ("v1", "Secret") => Some(Kind::Secret),
            ("discovery.k8s.io/v1", "EndpointSlice") => Some(Kind::EndpointSlice),
            ("networking.istio.io/v1" | "networking.istio.io/v1beta1", "ServiceEntry") => {
                Some(Kind::ServiceEntry)
            }
            ("networking.istio.io/v1" | "networking.istio.io/v1beta1", "DestinationRule") => {
                Some(Kind::DestinationRule)
            }
            ("multicluster.x-k8s.io/v1alpha1", "ServiceExport") => Some(Kind::ServiceExport),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Pod => "Pod",
            Kind::Secret => "Secret",
            Kind::ServiceEntry => "ServiceEntry",
            Kind::DestinationRule => "DestinationRule",
            Kind::ServiceExport => "ServiceExport",
        }
    }
}

/// One object of a kind we read.
#[derive(Clone, Debug)]
pub enum Object {
    Service(Box<Service>),
    EndpointSlice(Box<EndpointSlice>),
    Pod(Box<Pod>),
    /// A Pod read metadata-only (the Kubernetes source): a fifth of a `Pod`'s size.
    PodMetadata(Box<ObjectMeta>),
    Secret(Box<Secret>),
    ServiceEntry(Box<ServiceEntry>),
    DestinationRule(Box<DestinationRule>),
    ServiceExport(Box<ServiceExport>),
}

/// Why a document could not become an object.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ObjectError {
    #[error("not a Kubernetes object: it needs `apiVersion` and `kind` strings at the top level")]
    NotAnObject,
    #[error("{kind} has no metadata.name")]
    NoName { kind: &'static str },
    #[error("invalid {kind}: {reason}")]
    Invalid { kind: &'static str, reason: String },
}

/// What a document turned out to be.
#[derive(Debug)]
pub enum Decoded {
    Object(Object),
    /// A well-formed object of a kind we do not read (`apiVersion`, `kind`).
    Skipped(String, String),
}

impl Object {
    /// Decode one document. Unknown kinds are `Skipped`, not errors.
    pub fn decode(value: serde_json::Value) -> Result<Decoded, ObjectError> {
        let api_version = value.get("apiVersion").and_then(|v| v.as_str());
        let kind_str = value.get("kind").and_then(|v| v.as_str());
        let (Some(api_version), Some(kind_str)) = (api_version, kind_str) else {
            return Err(ObjectError::NotAnObject);
        };
        let Some(kind) = Kind::from_type(api_version, kind_str) else {
            return Ok(Decoded::Skipped(
                api_version.to_string(),
                kind_str.to_string(),
            ));
        };
        fn de<T: serde::de::DeserializeOwned>(
            kind: Kind,
            value: serde_json::Value,
        ) -> Result<Box<T>, ObjectError> {
            serde_json::from_value(value).map_err(|e| ObjectError::Invalid {
                kind: kind.as_str(),
                reason: e.to_string(),
            })
        }
        let object = match kind {
            Kind::Service => Object::Service(de(kind, value)?),
            Kind::EndpointSlice => Object::EndpointSlice(de(kind, value)?),
            Kind::Pod => Object::Pod(de(kind, value)?),
            Kind::Secret => Object::Secret(de(kind, value)?),
            Kind::ServiceEntry => Object::ServiceEntry(de(kind, value)?),
            Kind::DestinationRule => Object::DestinationRule(de(kind, value)?),
            Kind::ServiceExport => Object::ServiceExport(de(kind, value)?),
        };
        if object.metadata().name.as_deref().unwrap_or("").is_empty() {
            return Err(ObjectError::NoName {
                kind: kind.as_str(),
            });
        }
        Ok(Decoded::Object(object))
    }

    pub fn kind(&self) -> Kind {
        match self {
            Object::Service(_) => Kind::Service,
            Object::EndpointSlice(_) => Kind::EndpointSlice,
            Object::Pod(_) | Object::PodMetadata(_) => Kind::Pod,
            Object::Secret(_) => Kind::Secret,
            Object::ServiceEntry(_) => Kind::ServiceEntry,
            Object::DestinationRule(_) => Kind::DestinationRule,
            Object::ServiceExport(_) => Kind::ServiceExport,
        }
    }

    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            Object::Service(o) => &o.metadata,
            Object::EndpointSlice(o) => &o.metadata,
            Object::Pod(o) => &o.metadata,
            Object::PodMetadata(m) => m,
            Object::Secret(o) => &o.metadata,
            Object::ServiceEntry(o) => &o.metadata,
            Object::DestinationRule(o) => &o.metadata,
            Object::ServiceExport(o) => &o.metadata,
        }
    }

    /// `Kind/namespace/name`, the identity used for duplicate detection and logs.
    pub fn key(&self) -> ObjectKey {
        let m = self.metadata();
        ObjectKey {
            kind: self.kind(),
            namespace: m.namespace.clone().unwrap_or_else(|| "default".into()),
            name: m.name.clone().unwrap_or_default(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ObjectKey {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.kind.as_str(), self.namespace, self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn decodes_service_entry_both_versions() {
        for v in ["networking.istio.io/v1", "networking.istio.io/v1beta1"] {
            let d = Object::decode(json!({
                "apiVersion": v, "kind": "ServiceEntry",
                "metadata": {"name": "httpbin", "namespace": "bar"},
                "spec": {"hosts": ["httpbin.bar.global"], "addresses": ["240.0.0.2"],
                         "ports": [{"number": 8000, "name": "http", "protocol": "http"}],
                         "location": "MESH_INTERNAL", "resolution": "DNS"}
            }))
            .unwrap();
            let Decoded::Object(Object::ServiceEntry(se)) = d else {
                panic!("not a ServiceEntry")
            };
            assert_eq!(se.spec.ports[0].number, 8000);
        }
    }

    #[test]
    fn unknown_kind_is_skipped_and_typo_is_rejected() {
        let d = Object::decode(json!({"apiVersion": "apps/v1", "kind": "Deployment"})).unwrap();
        assert!(matches!(d, Decoded::Skipped(_, k) if k == "Deployment"));
        let e = Object::decode(json!({
            "apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
            "metadata": {"name": "x"}, "spec": {"host": "a", "subset": []}
        }))
        .unwrap_err();
        assert!(e.to_string().contains("unknown field `subset`"), "{e}");
        assert_eq!(
            Object::decode(json!({"kind": "Service"})).unwrap_err(),
            ObjectError::NotAnObject
        );
        let e = Object::decode(json!({"apiVersion": "v1", "kind": "Service", "metadata": {}}))
            .unwrap_err();
        assert_eq!(e, ObjectError::NoName { kind: "Service" });
    }
}
