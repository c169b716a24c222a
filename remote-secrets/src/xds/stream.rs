//! The per-stream xDS protocol, sans-IO: what to answer to a request or a new snapshot.
//!
//! Resources come from the network's shared [`NetworkSnapshot`] (computed and encoded once per
//! generation and network); a stream keeps only the version (`u64`) of each resource it sent and
//! compares versions. When the stream has seen the snapshot's predecessor, only the names the
//! snapshot lists as changed are looked at; otherwise every name is.
//!
//! State of the world (`SotwStream`): the client's latest `resource_names` is its whole
//! subscription (empty on the first request, or `*`, means wildcard); a request whose nonce is
//! not the latest we sent is stale and ignored; `error_detail` marks a NACK. Every response holds
//! every subscribed resource; its version is a hash of the names and resource versions, so equal
//! content has an equal version. A new snapshot is pushed only when this stream's resources
//! changed.
//!
//! Delta (`DeltaStream`): subscribe/unsubscribe change the set; the server remembers which
//! version of each resource the client holds (seeded from `initial_resource_versions`) and sends
//! only what differs, plus `removed_resources` for wildcard resources that disappeared.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::ops::Bound;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use envoy_types::pb::google::protobuf::{Any, value};

use super::snapshot::{Encoded, NetworkSnapshot, parse_version, version_string};
use crate::eds::EdsOptions;

pub const EDS_TYPE: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
const WILDCARD: &str = "*";
/// The most resources one Delta response carries while sending a wildcard state.
pub const MAX_DELTA_RESOURCES: usize = 500;

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

/// Whether a request's type is ours (an empty type on the EDS service means EDS).
pub fn is_eds(type_url: &str) -> bool {
    type_url.is_empty() || type_url == EDS_TYPE
}

/// The client's network: node metadata `NETWORK` (Istio's `ISTIO_META_NETWORK`).
pub fn node_network(node: Option<&Node>) -> Option<String> {
    let fields = &node?.metadata.as_ref()?.fields;
    match fields.get("NETWORK")?.kind.as_ref()? {
        value::Kind::StringValue(s) if !s.is_empty() => Some(s.clone()),
        _ => None,
    }
}

/// What the stream loop (one for both protocols, in `xds.rs`) asks of a protocol: State of the
/// World and Delta differ only here.
pub trait Protocol: Default + Send + 'static {
    type Request: Send + 'static;
    type Response: Send + 'static;
    /// The protocol's name in logs and metrics.
    const KIND: &'static str;
    /// Responses queued towards the client before the loop waits for it to read.
    const QUEUE: usize;

    fn type_url(req: &Self::Request) -> &str;
    fn node(req: &Self::Request) -> Option<&Node>;
    /// Handle a request; maybe answer it.
    fn request(
        &mut self,
        req: &Self::Request,
        snap: &Arc<NetworkSnapshot>,
        opts: &EdsOptions,
    ) -> (Event, Option<Self::Response>);
    /// A new snapshot: answer only if this stream's resources changed.
    fn generation(
        &mut self,
        snap: &Arc<NetworkSnapshot>,
        opts: &EdsOptions,
    ) -> Option<Self::Response>;
    /// A response was cut in parts and more are to be sent.
    fn has_more(&self) -> bool {
        false
    }
    /// The next part.
    fn more(&mut self, _snap: &Arc<NetworkSnapshot>, _opts: &EdsOptions) -> Option<Self::Response> {
        None
    }
}

impl Protocol for SotwStream {
    type Request = DiscoveryRequest;
    type Response = DiscoveryResponse;
    const KIND: &'static str = "sotw";
    const QUEUE: usize = 4;

    fn type_url(req: &DiscoveryRequest) -> &str {
        &req.type_url
    }
    fn node(req: &DiscoveryRequest) -> Option<&Node> {
        req.node.as_ref()
    }
    fn request(
        &mut self,
        req: &DiscoveryRequest,
        snap: &Arc<NetworkSnapshot>,
        opts: &EdsOptions,
    ) -> (Event, Option<DiscoveryResponse>) {
        self.on_request(req, snap, opts)
    }
    fn generation(
        &mut self,
        snap: &Arc<NetworkSnapshot>,
        opts: &EdsOptions,
    ) -> Option<DiscoveryResponse> {
        self.on_generation(snap, opts)
    }
}

impl Protocol for DeltaStream {
    type Request = DeltaDiscoveryRequest;
    type Response = DeltaDiscoveryResponse;
    const KIND: &'static str = "delta";
    // Parts of a cut state are built only as the previous one leaves: a stream never holds
    // more than two (many streams filling at once otherwise leave hundreds of MiB behind).
    const QUEUE: usize = 2;

    fn type_url(req: &DeltaDiscoveryRequest) -> &str {
        &req.type_url
    }
    fn node(req: &DeltaDiscoveryRequest) -> Option<&Node> {
        req.node.as_ref()
    }
    fn request(
        &mut self,
        req: &DeltaDiscoveryRequest,
        snap: &Arc<NetworkSnapshot>,
        opts: &EdsOptions,
    ) -> (Event, Option<DeltaDiscoveryResponse>) {
        self.on_request(req, snap, opts)
    }
    fn generation(
        &mut self,
        snap: &Arc<NetworkSnapshot>,
        opts: &EdsOptions,
    ) -> Option<DeltaDiscoveryResponse> {
        self.on_generation(snap, opts)
    }
    fn has_more(&self) -> bool {
        DeltaStream::has_more(self)
    }
    fn more(
        &mut self,
        snap: &Arc<NetworkSnapshot>,
        opts: &EdsOptions,
    ) -> Option<DeltaDiscoveryResponse> {
        self.on_more(snap, opts)
    }
}

/// Which names to look at when reconciling with a snapshot.
enum Scope {
    /// Every subscribed and every sent name.
    All,
    /// These names (and any subscribed name the snapshot does not hold).
    Names(Vec<Arc<str>>),
}

impl Scope {
    /// What a snapshot asks of a stream that last reconciled with `seen`.
    fn since(seen: Option<u64>, snap: &NetworkSnapshot) -> Option<Scope> {
        match seen {
            Some(s) if s == snap.version() => None,
            Some(s) if snap.previous == Some(s) => Some(Scope::Names(snap.changed.clone())),
            _ => Some(Scope::All),
        }
    }

    fn add(self, names: Vec<Arc<str>>) -> Scope {
        match self {
            Scope::All => Scope::All,
            Scope::Names(mut n) => {
                n.extend(names);
                Scope::Names(n)
            }
        }
    }
}

/// A name as the snapshot spells it (so streams share the snapshot's strings).
fn intern(snap: &NetworkSnapshot, name: &str) -> Arc<str> {
    match snap.resources.get_key_value(name) {
        Some((k, _)) => k.clone(),
        None => name.into(),
    }
}

#[derive(Debug, Default)]
pub struct SotwStream {
    started: bool,
    legacy_wildcard: bool,
    wildcard: bool,
    names: BTreeSet<Arc<str>>,
    last_nonce: String,
    nonce: u64,
    /// name -> version of the last response.
    sent: HashMap<Arc<str>, u64>,
    /// The snapshot `sent` was last checked against.
    seen: Option<u64>,
    /// The version the client last accepted.
    pub acked_version: String,
}

impl SotwStream {
    pub fn subscription(&self) -> (bool, &BTreeSet<Arc<str>>) {
        (self.wildcard, &self.names)
    }

    /// Handle a request; maybe answer it.
    pub fn on_request(
        &mut self,
        req: &DiscoveryRequest,
        snap: &NetworkSnapshot,
        opts: &EdsOptions,
    ) -> (Event, Option<DiscoveryResponse>) {
        if !is_eds(&req.type_url) {
            return (Event::OtherType(req.type_url.clone()), None);
        }
        if !req.response_nonce.is_empty() && req.response_nonce != self.last_nonce {
            // Ignored as a request, but the stream's loop may have marked a newer snapshot
            // seen while fetching the one for this request: answer it now, or the client
            // would wait for the next generation.
            return (Event::Stale, self.on_generation(snap, opts));
        }
        let event = match &req.error_detail {
            Some(status) => Event::Nack(status.message.clone()),
            None if req.response_nonce.is_empty() => Event::Request,
            None => {
                self.acked_version = req.version_info.clone();
                Event::Ack
            }
        };
        let names: BTreeSet<Arc<str>> = req
            .resource_names
            .iter()
            .filter(|n| *n != WILDCARD)
            .map(|n| intern(snap, n))
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
            // Nothing new asked; a snapshot this stream has not checked yet may still be.
            return (event, self.on_generation(snap, opts));
        }
        let event = if event == Event::Ack {
            Event::Request
        } else {
            event
        };
        (event, Some(self.respond(snap, opts)))
    }

    /// A new snapshot: answer only if this stream's resources changed.
    pub fn on_generation(
        &mut self,
        snap: &NetworkSnapshot,
        opts: &EdsOptions,
    ) -> Option<DiscoveryResponse> {
        if !self.started {
            return None;
        }
        let scope = Scope::since(self.seen, snap)?;
        self.seen = Some(snap.version());
        self.differs(scope, snap, opts)
            .then(|| self.respond(snap, opts))
    }

    fn wants(&self, snap: &NetworkSnapshot, name: &str) -> bool {
        (self.wildcard && snap.resources.contains_key(name)) || self.names.contains(name)
    }

    /// Whether any subscribed resource in `scope` differs from what was sent.
    fn differs(&self, scope: Scope, snap: &NetworkSnapshot, opts: &EdsOptions) -> bool {
        let names = match scope {
            Scope::All => {
                let wanted = self.wanted(snap, opts);
                return wanted.len() != self.sent.len()
                    || wanted
                        .iter()
                        .any(|(n, r)| self.sent.get(n) != Some(&r.version));
            }
            Scope::Names(n) => n,
        };
        let outside = self
            .names
            .iter()
            .filter(|n| !snap.resources.contains_key(&***n));
        names.iter().chain(outside).any(|n| {
            let sent = self.sent.get(n).copied();
            if self.wants(snap, n) {
                sent != Some(snap.get(n, opts).0.version)
            } else {
                sent.is_some()
            }
        })
    }

    /// Every subscribed resource, by name.
    fn wanted(&self, snap: &NetworkSnapshot, opts: &EdsOptions) -> Vec<(Arc<str>, Arc<Encoded>)> {
        let mut out: Vec<(Arc<str>, Arc<Encoded>)> = Vec::new();
        if self.wildcard {
            out.extend(snap.resources.iter().map(|(n, r)| (n.clone(), r.clone())));
        }
        let mut extra = false;
        for n in &self.names {
            if self.wildcard && snap.resources.contains_key(&**n) {
                continue;
            }
            extra = true;
            out.push((n.clone(), snap.get(n, opts).0));
        }
        if extra {
            out.sort_by(|a, b| a.0.cmp(&b.0));
        }
        out
    }

    fn respond(&mut self, snap: &NetworkSnapshot, opts: &EdsOptions) -> DiscoveryResponse {
        self.seen = Some(snap.version());
        let wanted = self.wanted(snap, opts);
        let mut h = DefaultHasher::new();
        for (name, r) in &wanted {
            name.hash(&mut h);
            r.version.hash(&mut h);
        }
        self.nonce += 1;
        self.last_nonce = format!("{}-{}", snap.version(), self.nonce);
        let response = DiscoveryResponse {
            version_info: version_string(h.finish()),
            resources: wanted
                .iter()
                .map(|(_, r)| Any {
                    type_url: EDS_TYPE.into(),
                    value: r.bytes.clone(),
                })
                .collect(),
            type_url: EDS_TYPE.into(),
            nonce: self.last_nonce.clone(),
            ..Default::default()
        };
        self.sent = wanted.into_iter().map(|(n, r)| (n, r.version)).collect();
        response
    }
}

/// What a Delta client holds: `base`'s version of each of `base`'s names, except where `diff`
/// says otherwise (`None`: not held; a version of 0: one we cannot read). A wildcard stream in
/// step with its network's snapshot has `base` = that snapshot and an almost empty `diff`, so
/// it costs a pointer instead of a map of every name.
#[derive(Debug, Default)]
struct Held {
    base: Option<Arc<NetworkSnapshot>>,
    diff: HashMap<Arc<str>, Option<u64>>,
}

impl Held {
    fn base_version(&self, name: &str) -> Option<u64> {
        Some(self.base.as_ref()?.resources.get(name)?.version)
    }

    fn get(&self, name: &str) -> Option<u64> {
        match self.diff.get(name) {
            Some(v) => *v,
            None => self.base_version(name),
        }
    }

    fn set(&mut self, name: &Arc<str>, version: Option<u64>) {
        if self.base_version(name) == version {
            self.diff.remove(name);
        } else {
            self.diff.insert(name.clone(), version);
        }
    }

    /// Forget `name`; whether it was held.
    fn remove(&mut self, name: &Arc<str>) -> bool {
        let held = self.get(name).is_some();
        if held {
            self.set(name, None);
        }
        held
    }

    /// Every name held.
    fn names(&self) -> Vec<Arc<str>> {
        let mut out: Vec<Arc<str>> = self
            .diff
            .iter()
            .filter(|(_, v)| v.is_some())
            .map(|(n, _)| n.clone())
            .collect();
        if let Some(b) = &self.base {
            out.extend(
                b.resources
                    .keys()
                    .filter(|n| !self.diff.contains_key(&***n))
                    .cloned(),
            );
        }
        out
    }

    /// Express the same state against `base`. Only valid when the client holds `base`'s
    /// version of every one of `base`'s names (a wildcard stream in step with it) and nothing
    /// but those and `extra` (`base` `None`: nothing but `extra`).
    fn rebase<'a>(
        &mut self,
        base: Option<Arc<NetworkSnapshot>>,
        extra: impl Iterator<Item = &'a Arc<str>>,
    ) {
        let diff = extra
            .filter(|n| {
                !base
                    .as_ref()
                    .is_some_and(|b| b.resources.contains_key(&***n))
            })
            .filter_map(|n| Some((n.clone(), Some(self.get(n)?))))
            .collect();
        self.base = base;
        self.diff = diff;
    }
}

#[derive(Debug, Default)]
pub struct DeltaStream {
    started: bool,
    wildcard: bool,
    names: HashSet<Arc<str>>,
    /// What the client holds.
    held: Held,
    /// The snapshot `held` was last reconciled with.
    seen: Option<u64>,
    /// `held` matches everything the stream wants in snapshot `seen` (no part pending).
    in_step: bool,
    /// A wildcard state sent in part: the snapshot and the last name sent.
    resume: Option<(u64, Arc<str>)>,
    nonce: u64,
}

impl DeltaStream {
    pub fn subscription(&self) -> (bool, &HashSet<Arc<str>>) {
        (self.wildcard, &self.names)
    }

    /// How many resources the client holds, as far as this stream knows.
    pub fn known(&self) -> usize {
        self.held.names().len()
    }

    /// How many names this stream records one by one (the rest it shares with a snapshot).
    pub fn recorded(&self) -> usize {
        self.held.diff.len()
    }

    /// A response was cut at [`MAX_DELTA_RESOURCES`]; [`DeltaStream::on_more`] sends the rest.
    pub fn has_more(&self) -> bool {
        self.resume.is_some()
    }

    /// The next part of a state cut at [`MAX_DELTA_RESOURCES`] (from the start, comparing
    /// versions, if the snapshot changed meanwhile).
    pub fn on_more(
        &mut self,
        snap: &Arc<NetworkSnapshot>,
        opts: &EdsOptions,
    ) -> Option<DeltaDiscoveryResponse> {
        self.resume.as_ref()?;
        self.reconcile(Scope::All, snap, opts)
    }

    pub fn on_request(
        &mut self,
        req: &DeltaDiscoveryRequest,
        snap: &Arc<NetworkSnapshot>,
        opts: &EdsOptions,
    ) -> (Event, Option<DeltaDiscoveryResponse>) {
        if !is_eds(&req.type_url) {
            return (Event::OtherType(req.type_url.clone()), None);
        }
        let event = match (&req.error_detail, req.response_nonce.is_empty()) {
            (Some(status), _) => Event::Nack(status.message.clone()),
            (None, true) => Event::Request,
            (None, false) => Event::Ack,
        };
        let mut all = false;
        let mut touched = Vec::new();
        if !self.started {
            self.started = true;
            self.wildcard = req.resource_names_subscribe.is_empty();
            for (n, v) in &req.initial_resource_versions {
                self.held.set(&intern(snap, n), Some(parse_version(v)));
            }
            all = true;
        }
        for n in &req.resource_names_subscribe {
            if n == WILDCARD {
                all |= !self.wildcard;
                self.wildcard = true;
                continue;
            }
            let n = intern(snap, n);
            // A (re)subscription asks for the resource even if we think it is known.
            if !req.initial_resource_versions.contains_key(&*n) {
                self.held.set(&n, None);
            }
            self.names.insert(n.clone());
            touched.push(n);
        }
        for n in &req.resource_names_unsubscribe {
            if n == WILDCARD {
                all |= self.wildcard;
                self.wildcard = false;
                continue;
            }
            let n = intern(snap, n);
            self.names.remove(&n);
            self.held.set(&n, None);
            touched.push(n);
        }
        let scope = match Scope::since(self.seen, snap) {
            _ if all => Some(Scope::All),
            Some(s) => Some(s.add(touched)),
            None if touched.is_empty() => None,
            None => Some(Scope::Names(touched)),
        };
        let response = scope.and_then(|s| self.reconcile(s, snap, opts));
        let event = match (event, &response) {
            (Event::Ack, Some(_)) => Event::Request,
            (e, _) => e,
        };
        (event, response)
    }

    pub fn on_generation(
        &mut self,
        snap: &Arc<NetworkSnapshot>,
        opts: &EdsOptions,
    ) -> Option<DeltaDiscoveryResponse> {
        if !self.started {
            return None;
        }
        let scope = Scope::since(self.seen, snap)?;
        self.reconcile(scope, snap, opts)
    }

    fn wants(&self, snap: &NetworkSnapshot, name: &str) -> bool {
        (self.wildcard && snap.resources.contains_key(name)) || self.names.contains(name)
    }

    /// Compare one name with what the client holds: send it, or list it as removed.
    fn check(
        &mut self,
        name: &Arc<str>,
        r: Option<&Arc<Encoded>>,
        snap: &NetworkSnapshot,
        opts: &EdsOptions,
        out: &mut (Vec<Resource>, Vec<String>),
    ) {
        if !self.wants(snap, name) {
            if self.held.remove(name) {
                out.1.push(name.to_string());
            }
            return;
        }
        let r = r.cloned().unwrap_or_else(|| snap.get(name, opts).0);
        if self.held.get(name) == Some(r.version) {
            return;
        }
        self.held.set(name, Some(r.version));
        out.0.push(Resource {
            name: name.to_string(),
            version: version_string(r.version),
            resource: Some(Any {
                type_url: EDS_TYPE.into(),
                value: r.bytes.clone(),
            }),
            ..Default::default()
        });
    }

    fn reconcile(
        &mut self,
        scope: Scope,
        snap: &Arc<NetworkSnapshot>,
        opts: &EdsOptions,
    ) -> Option<DeltaDiscoveryResponse> {
        self.seen = Some(snap.version());
        let mut out = (Vec::new(), Vec::new());
        match scope {
            Scope::All => {
                let after = match self.resume.take() {
                    Some((v, name)) if v == snap.version() => Some(name),
                    _ => None,
                };
                if self.wildcard {
                    let from = match &after {
                        Some(n) => Bound::Excluded(&**n),
                        None => Bound::Unbounded,
                    };
                    for (n, r) in snap.resources.range::<str, _>((from, Bound::Unbounded)) {
                        self.check(n, Some(r), snap, opts, &mut out);
                        if out.0.len() >= MAX_DELTA_RESOURCES {
                            self.resume = Some((snap.version(), n.clone()));
                            self.in_step = false;
                            return self.response(snap, out);
                        }
                    }
                }
                let names: Vec<Arc<str>> = self
                    .names
                    .iter()
                    .filter(|n| !(self.wildcard && snap.resources.contains_key(&***n)))
                    .cloned()
                    .collect();
                let mut gone = self.held.names();
                gone.retain(|n| !self.wants(snap, n));
                for n in names.iter().chain(&gone) {
                    self.check(n, None, snap, opts, &mut out);
                }
                self.in_step = true;
            }
            Scope::Names(names) => {
                let outside = self
                    .names
                    .iter()
                    .filter(|n| !snap.resources.contains_key(&***n))
                    .cloned();
                let mut done = HashSet::new();
                let all: Vec<Arc<str>> = names
                    .into_iter()
                    .chain(outside)
                    .filter(|n| done.insert(n.clone()))
                    .collect();
                for n in &all {
                    self.check(n, None, snap, opts, &mut out);
                }
            }
        }
        if self.in_step {
            let base = self.wildcard.then(|| snap.clone());
            let same = match (&base, &self.held.base) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            };
            if !same {
                self.held.rebase(base, self.names.iter());
            }
        }
        self.response(snap, out)
    }

    fn response(
        &mut self,
        snap: &NetworkSnapshot,
        (changed, removed): (Vec<Resource>, Vec<String>),
    ) -> Option<DeltaDiscoveryResponse> {
        if changed.is_empty() && removed.is_empty() {
            return None;
        }
        self.nonce += 1;
        Some(DeltaDiscoveryResponse {
            system_version_info: snap.version().to_string(),
            resources: changed,
            type_url: EDS_TYPE.into(),
            removed_resources: removed,
            nonce: format!("{}-{}", snap.version(), self.nonce),
            ..Default::default()
        })
    }
}

#[cfg(test)]
#[path = "stream/tests.rs"]
mod tests;
