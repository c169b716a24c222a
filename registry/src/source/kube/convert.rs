//! What each kind is on the API server, and how a raw object becomes a trimmed [`Object`].
//!
//! Trimming keeps what [`crate::snapshot::Snapshot::build`] reads and drops the rest before the
//! object is stored: `managedFields`, owner references, annotations (kept only on Secrets, whose
//! annotations remote-secrets reads), Service selectors and cluster IPs, EndpointSlice hints and
//! node names, and everything of a Pod except its metadata (Pods are watched metadata-only).

use k8s_openapi::api::core::v1::{ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{DynamicObject, PartialObjectMeta};
use kube::core::ApiResource;

use crate::objects::{Decoded, EndpointSlice, Kind, Object, Pod, Secret, Service};

/// How a kind is served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Served {
    /// A built-in type with its own `k8s-openapi` struct.
    Typed,
    /// A built-in type watched metadata-only (`PartialObjectMetadata`).
    MetadataOnly,
    /// A custom resource: served only when its CRD is installed, in one of these versions
    /// (preferred first).
    Custom {
        group: &'static str,
        versions: &'static [&'static str],
        plural: &'static str,
    },
}

pub fn served(kind: Kind) -> Served {
    match kind {
        Kind::Service | Kind::EndpointSlice | Kind::Secret => Served::Typed,
        Kind::Pod => Served::MetadataOnly,
        Kind::ServiceEntry => Served::Custom {
            group: "networking.istio.io",
            versions: &["v1", "v1beta1"],
            plural: "serviceentries",
        },
        Kind::DestinationRule => Served::Custom {
            group: "networking.istio.io",
            versions: &["v1", "v1beta1"],
            plural: "destinationrules",
        },
        Kind::ServiceExport => Served::Custom {
            group: "multicluster.x-k8s.io",
            versions: &["v1alpha1"],
            plural: "serviceexports",
        },
    }
}

/// The dynamic resource of a custom kind in a served version.
pub fn api_resource(kind: Kind, group: &str, version: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: group.into(),
        version: version.into(),
        api_version: format!("{group}/{version}"),
        kind: kind.as_str().into(),
        plural: plural.into(),
    }
}

/// Only what the snapshot reads: identity, labels, age (oldest DestinationRule wins), and
/// annotations when asked.
pub fn trim_meta(m: ObjectMeta, keep_annotations: bool) -> ObjectMeta {
    ObjectMeta {
        name: m.name,
        namespace: m.namespace,
        labels: m.labels,
        creation_timestamp: m.creation_timestamp,
        annotations: if keep_annotations {
            m.annotations
        } else {
            None
        },
        ..ObjectMeta::default()
    }
}

pub fn service(s: Service) -> Object {
    let spec = s.spec.map(|spec| ServiceSpec {
        ports: spec.ports.map(|ports| {
            ports
                .into_iter()
                .map(|p| ServicePort {
                    name: p.name,
                    port: p.port,
                    protocol: p.protocol,
                    ..ServicePort::default()
                })
                .collect()
        }),
        ..ServiceSpec::default()
    });
    Object::Service(Box::new(Service {
        metadata: trim_meta(s.metadata, false),
        spec,
        status: s.status,
    }))
}

pub fn endpoint_slice(e: EndpointSlice) -> Object {
    let endpoints = e
        .endpoints
        .into_iter()
        .map(|ep| Endpoint {
            addresses: ep.addresses,
            conditions: ep.conditions.map(|c| EndpointConditions {
                ready: c.ready,
                ..EndpointConditions::default()
            }),
            target_ref: ep
                .target_ref
                .map(|r| k8s_openapi::api::core::v1::ObjectReference {
                    kind: r.kind,
                    namespace: r.namespace,
                    name: r.name,
                    ..Default::default()
                }),
            zone: ep.zone,
            ..Endpoint::default()
        })
        .collect();
    Object::EndpointSlice(Box::new(EndpointSlice {
        metadata: trim_meta(e.metadata, false),
        address_type: e.address_type,
        endpoints,
        ports: e.ports,
    }))
}

pub fn pod(p: PartialObjectMeta<Pod>) -> Object {
    Object::PodMetadata(Box::new(trim_meta(p.metadata, false)))
}

pub fn secret(s: Secret) -> Object {
    Object::Secret(Box::new(Secret {
        metadata: trim_meta(s.metadata, true),
        data: s.data,
        type_: s.type_,
        ..Secret::default()
    }))
}

/// A custom resource through the same decoder the directory source uses, so a ServiceEntry
/// from the API and from a file are read alike (`status` is dropped: nothing reads it).
pub fn custom(o: DynamicObject, resource: &ApiResource) -> Result<Object, String> {
    let mut value = serde_json::Map::new();
    value.insert("apiVersion".into(), resource.api_version.clone().into());
    value.insert("kind".into(), resource.kind.clone().into());
    let metadata = serde_json::to_value(trim_meta(o.metadata, false)).map_err(|e| e.to_string())?;
    value.insert("metadata".into(), metadata);
    if let Some(spec) = o.data.get("spec") {
        value.insert("spec".into(), spec.clone());
    }
    match Object::decode(serde_json::Value::Object(value)) {
        Ok(Decoded::Object(object)) => Ok(object),
        Ok(Decoded::Skipped(..)) => Err(format!("{} is not a kind we read", resource.kind)),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn trims_what_the_snapshot_does_not_read() {
        let s: Service = serde_json::from_value(json!({
            "metadata": {"name": "a", "namespace": "n", "labels": {"x": "y"},
                         "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"},
                         "managedFields": [{"manager": "kubectl"}], "uid": "1"},
            "spec": {"selector": {"app": "a"}, "clusterIP": "10.0.0.1",
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
        }))
        .unwrap();
        let Object::Service(s) = service(s) else {
            panic!()
        };
        assert!(s.metadata.annotations.is_none() && s.metadata.managed_fields.is_none());
        assert_eq!(s.metadata.labels.unwrap()["x"], "y");
        let spec = s.spec.unwrap();
        assert!(spec.selector.is_none() && spec.cluster_ip.is_none());
        assert_eq!(spec.ports.unwrap()[0].port, 80);
    }

    #[test]
    fn custom_resources_go_through_the_file_decoder() {
        let r = api_resource(
            Kind::ServiceEntry,
            "networking.istio.io",
            "v1beta1",
            "serviceentries",
        );
        let o: DynamicObject = serde_json::from_value(json!({
            "metadata": {"name": "se", "namespace": "n", "managedFields": []},
            "spec": {"hosts": ["a.n.global"]},
            "status": {"conditions": []}
        }))
        .unwrap();
        let Object::ServiceEntry(se) = custom(o, &r).unwrap() else {
            panic!()
        };
        assert_eq!(se.api_version, "networking.istio.io/v1beta1");
        let bad: DynamicObject = serde_json::from_value(json!({
            "metadata": {"name": "se", "namespace": "n"}, "spec": {"hots": []}
        }))
        .unwrap();
        assert!(custom(bad, &r).unwrap_err().contains("hots"));
    }
}
