//! The per-stream xDS protocol, sans-IO: what to answer to a request or a new generation.
//!
//! State of the world (`SotwStream`): the client's latest `resource_names` is its whole
//! subscription (empty on the first request, or `*`, means wildcard); a request whose nonce is
//! not the latest we sent is stale and ignored; `error_detail` marks a NACK. Every response holds
//! every subscribed resource; its version is a hash of the content, so equal content has an equal
//! version. A new generation is pushed only when this stream's resources changed.
//!
//! Delta (`DeltaStream`): subscribe/unsubscribe change the set; the server remembers which
//! version of each resource the client holds (seeded from `initial_resource_versions`) and sends
//! only what differs, plus `removed_resources` for wildcard resources that disappeared.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{DefaultHasher, Hash, Hasher};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use envoy_types::pb::google::protobuf::{Any, value};
use prost::Message;

use super::{Generation, Resources};

pub const EDS_TYPE: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
const WILDCARD: &str = "*";

/// What a request meant, for logs and metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The first request, or a change of subscription.
    Request,
    Ack,
    /// The client rejected a response; its message.
    Nack(String),
    /// A nonce that is not the latest sent: ignored.
    Stale,
    /// A type this server does not serve (ADS carries every type): ignored.
    OtherType(String),
}

/// The client's network: node metadata `NETWORK` (Istio's `ISTIO_META_NETWORK`).
pub fn node_network(node: Option<&Node>) -> Option<String> {
    let fields = &node?.metadata.as_ref()?.fields;
    match fields.get("NETWORK")?.kind.as_ref()? {
        value::Kind::StringValue(s) if !s.is_empty() => Some(s.clone()),
        _ => None,
    }
}

fn version_of(bytes: &[u8]) -> String {
    let mut h = DefaultHasher::new();
    bytes.hash(&mut h);
    format!("{:016x}", h.finish())
}

fn encode(name: &str, generation: &Generation, network: &str, r: &Resources) -> Vec<u8> {
    r.assignment(name, generation, network).encode_to_vec()
}

#[derive(Debug, Default)]
pub struct SotwStream {
    pub network: Option<String>,
    started: bool,
    legacy_wildcard: bool,
    wildcard: bool,
    names: BTreeSet<String>,
    last_nonce: String,
    nonce: u64,
    sent: BTreeMap<String, Vec<u8>>,
    /// The version the client last accepted.
    pub acked_version: String,
}

impl SotwStream {
    pub fn subscription(&self) -> (bool, &BTreeSet<String>) {
        (self.wildcard, &self.names)
    }

    /// Handle a request; maybe answer it.
    pub fn on_request(
        &mut self,
        req: &DiscoveryRequest,
        generation: &Generation,
        default_network: &str,
        resources: &Resources,
    ) -> (Event, Option<DiscoveryResponse>) {
        if !req.type_url.is_empty() && req.type_url != EDS_TYPE {
            return (Event::OtherType(req.type_url.clone()), None);
        }
        if self.network.is_none() {
            self.network = node_network(req.node.as_ref());
        }
        if !req.response_nonce.is_empty() && req.response_nonce != self.last_nonce {
            return (Event::Stale, None);
        }
        let event = match &req.error_detail {
            Some(status) => Event::Nack(status.message.clone()),
            None if req.response_nonce.is_empty() => Event::Request,
            None => {
                self.acked_version = req.version_info.clone();
                Event::Ack
            }
        };
        let names: BTreeSet<String> = req
            .resource_names
            .iter()
            .filter(|n| *n != WILDCARD)
            .cloned()
            .collect();
        let star = req.resource_names.iter().any(|n| n == WILDCARD);
        let wildcard = if !self.started {
            self.legacy_wildcard = req.resource_names.is_empty();
            self.legacy_wildcard || star
        } else {
            star || (self.legacy_wildcard && req.resource_names.is_empty())
        };
        let changed = !self.started || wildcard != self.wildcard || names != self.names;
        self.started = true;
        self.wildcard = wildcard;
        self.names = names;
        if !changed {
            return (event, None);
        }
        let event = if event == Event::Ack {
            Event::Request
        } else {
            event
        };
        let network = self
            .network
            .clone()
            .unwrap_or_else(|| default_network.into());
        (
            event,
            Some(self.respond(generation, &network, resources, true)),
        )
    }

    /// A new generation: answer only if this stream's resources changed.
    pub fn on_generation(
        &mut self,
        generation: &Generation,
        default_network: &str,
        resources: &Resources,
    ) -> Option<DiscoveryResponse> {
        if !self.started {
            return None;
        }
        let network = self
            .network
            .clone()
            .unwrap_or_else(|| default_network.into());
        let response = self.respond(generation, &network, resources, false);
        (!response.nonce.is_empty()).then_some(response)
    }

    fn respond(
        &mut self,
        generation: &Generation,
        network: &str,
        resources: &Resources,
        always: bool,
    ) -> DiscoveryResponse {
        let mut wanted = self.names.clone();
        if self.wildcard {
            wanted.extend(resources.all_names(generation));
        }
        let now: BTreeMap<String, Vec<u8>> = wanted
            .into_iter()
            .map(|n| {
                let bytes = encode(&n, generation, network, resources);
                (n, bytes)
            })
            .collect();
        if !always && now == self.sent {
            return DiscoveryResponse::default();
        }
        let mut all = Vec::new();
        for (name, bytes) in &now {
            all.extend_from_slice(name.as_bytes());
            all.extend_from_slice(bytes);
        }
        self.nonce += 1;
        self.last_nonce = format!("{}-{}", generation.version, self.nonce);
        let response = DiscoveryResponse {
            version_info: version_of(&all),
            resources: now
                .values()
                .map(|b| Any {
                    type_url: EDS_TYPE.into(),
                    value: b.clone(),
                })
                .collect(),
            type_url: EDS_TYPE.into(),
            nonce: self.last_nonce.clone(),
            ..Default::default()
        };
        self.sent = now;
        response
    }
}

#[derive(Debug, Default)]
pub struct DeltaStream {
    pub network: Option<String>,
    started: bool,
    wildcard: bool,
    names: BTreeSet<String>,
    /// name -> the version the client holds.
    known: BTreeMap<String, String>,
    nonce: u64,
}

impl DeltaStream {
    pub fn subscription(&self) -> (bool, &BTreeSet<String>) {
        (self.wildcard, &self.names)
    }

    pub fn on_request(
        &mut self,
        req: &DeltaDiscoveryRequest,
        generation: &Generation,
        default_network: &str,
        resources: &Resources,
    ) -> (Event, Option<DeltaDiscoveryResponse>) {
        if !req.type_url.is_empty() && req.type_url != EDS_TYPE {
            return (Event::OtherType(req.type_url.clone()), None);
        }
        if self.network.is_none() {
            self.network = node_network(req.node.as_ref());
        }
        let event = match (&req.error_detail, req.response_nonce.is_empty()) {
            (Some(status), _) => Event::Nack(status.message.clone()),
            (None, true) => Event::Request,
            (None, false) => Event::Ack,
        };
        if !self.started {
            self.started = true;
            self.wildcard = req.resource_names_subscribe.is_empty();
            for (n, v) in &req.initial_resource_versions {
                self.known.insert(n.clone(), v.clone());
            }
        }
        for n in &req.resource_names_subscribe {
            if n == WILDCARD {
                self.wildcard = true;
                continue;
            }
            // A (re)subscription asks for the resource even if we think it is known.
            if !req.initial_resource_versions.contains_key(n) {
                self.known.remove(n);
            }
            self.names.insert(n.clone());
        }
        for n in &req.resource_names_unsubscribe {
            if n == WILDCARD {
                self.wildcard = false;
                continue;
            }
            self.names.remove(n);
            self.known.remove(n);
        }
        let network = self
            .network
            .clone()
            .unwrap_or_else(|| default_network.into());
        let response = self.respond(generation, &network, resources);
        let event = match (event, &response) {
            (Event::Ack, Some(_)) => Event::Request,
            (e, _) => e,
        };
        (event, response)
    }

    pub fn on_generation(
        &mut self,
        generation: &Generation,
        default_network: &str,
        resources: &Resources,
    ) -> Option<DeltaDiscoveryResponse> {
        if !self.started {
            return None;
        }
        let network = self
            .network
            .clone()
            .unwrap_or_else(|| default_network.into());
        self.respond(generation, &network, resources)
    }

    fn respond(
        &mut self,
        generation: &Generation,
        network: &str,
        resources: &Resources,
    ) -> Option<DeltaDiscoveryResponse> {
        let mut wanted = self.names.clone();
        if self.wildcard {
            wanted.extend(resources.all_names(generation));
        }
        let mut changed = Vec::new();
        for name in &wanted {
            let bytes = encode(name, generation, network, resources);
            let version = version_of(&bytes);
            if self.known.get(name) == Some(&version) {
                continue;
            }
            self.known.insert(name.clone(), version.clone());
            changed.push(Resource {
                name: name.clone(),
                version,
                resource: Some(Any {
                    type_url: EDS_TYPE.into(),
                    value: bytes,
                }),
                ..Default::default()
            });
        }
        let removed: Vec<String> = self
            .known
            .keys()
            .filter(|n| !wanted.contains(*n))
            .cloned()
            .collect();
        for n in &removed {
            self.known.remove(n);
        }
        if changed.is_empty() && removed.is_empty() {
            return None;
        }
        self.nonce += 1;
        Some(DeltaDiscoveryResponse {
            system_version_info: generation.version.to_string(),
            resources: changed,
            type_url: EDS_TYPE.into(),
            removed_resources: removed,
            nonce: format!("{}-{}", generation.version, self.nonce),
            ..Default::default()
        })
    }
}
