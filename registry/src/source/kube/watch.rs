//! One watch: a kind in a namespace (or all), kept as a store of trimmed objects.
//!
//! The loop is the reflector protocol, written out so every state is visible:
//! list in pages of [`LIST_PAGE`] (the store is swapped whole, under a short lock, only once the list is complete and
//! converted), then watch from the list's `resourceVersion` with bookmarks, apply each event,
//! resume from the last seen version when the stream ends, re-list on `410 Gone`, and back off
//! with jitter on errors while the last store keeps serving.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, ObjectList, PartialObjectMeta, WatchEvent, WatchParams};
use kube::core::Resource;
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::metrics::{EventLabels, Metrics, WatchLabels};
use crate::objects::{Kind, Object};
use crate::snapshot::WatchStatus;

/// A list and a watch of one resource, typed or not.
pub trait ListWatch: Send + Sync + 'static {
    type Item: Resource + Clone + Send + 'static;
    fn list(
        &self,
        lp: &ListParams,
    ) -> impl Future<Output = kube::Result<ObjectList<Self::Item>>> + Send;
    fn watch(
        &self,
        wp: &WatchParams,
        version: &str,
    ) -> impl Future<Output = kube::Result<BoxStream<'static, kube::Result<WatchEvent<Self::Item>>>>>
    + Send;
}

/// Whole objects.
pub struct Full<K>(pub Api<K>);

impl<K> ListWatch for Full<K>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    type Item = K;
    async fn list(&self, lp: &ListParams) -> kube::Result<ObjectList<K>> {
        self.0.list(lp).await
    }
    async fn watch(
        &self,
        wp: &WatchParams,
        version: &str,
    ) -> kube::Result<BoxStream<'static, kube::Result<WatchEvent<K>>>> {
        Ok(self.0.watch(wp, version).await?.boxed())
    }
}

/// Metadata only (`PartialObjectMetadata`): labels without the spec and status.
pub struct MetadataOnly<K>(pub Api<K>);

impl<K> ListWatch for MetadataOnly<K>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    type Item = PartialObjectMeta<K>;
    async fn list(&self, lp: &ListParams) -> kube::Result<ObjectList<PartialObjectMeta<K>>> {
        self.0.list_metadata(lp).await
    }
    async fn watch(
        &self,
        wp: &WatchParams,
        version: &str,
    ) -> kube::Result<BoxStream<'static, kube::Result<WatchEvent<PartialObjectMeta<K>>>>> {
        Ok(self.0.watch_metadata(wp, version).await?.boxed())
    }
}

type Key = (String, String);

/// The objects of one watch and what it reports. Locked briefly, never across `.await`.
#[derive(Debug, Default)]
pub struct Store {
    pub objects: HashMap<Key, Arc<Object>>,
    /// Objects that could not be converted, and why.
    pub errors: BTreeMap<Key, String>,
}

/// One watch, shared between its task (the only writer) and the aggregator (a reader).
#[derive(Debug)]
pub struct Shared {
    pub kind: Kind,
    pub namespace: Option<String>,
    pub label_selector: Option<String>,
    pub store: Mutex<Store>,
    pub status: Mutex<WatchStatus>,
    labels: WatchLabels,
    metrics: Arc<Metrics>,
    changed: Arc<Notify>,
}

impl Shared {
    pub fn new(
        cluster: &str,
        kind: Kind,
        namespace: Option<String>,
        label_selector: Option<String>,
        metrics: Arc<Metrics>,
        changed: Arc<Notify>,
    ) -> Shared {
        let scope = namespace.clone().unwrap_or_else(|| "*".into());
        let labels = WatchLabels {
            cluster: cluster.to_string(),
            kind: kind.as_str(),
            namespace: scope.clone(),
        };
        metrics.synced.get_or_create(&labels).set(0);
        metrics.stale_since.get_or_create(&labels).set(0);
        Shared {
            kind,
            namespace,
            label_selector,
            store: Mutex::new(Store::default()),
            status: Mutex::new(WatchStatus {
                kind: kind.as_str().into(),
                namespace: scope,
                state: "listing".into(),
                ..WatchStatus::default()
            }),
            labels,
            metrics,
            changed,
        }
    }

    pub fn synced(&self) -> bool {
        self.status.lock().expect("status lock").synced
    }

    fn update(&self, f: impl FnOnce(&mut WatchStatus)) {
        f(&mut self.status.lock().expect("status lock"));
    }

    pub fn set_api_version(&self, v: &str) {
        self.update(|s| s.api_version = v.to_string());
    }

    /// A complete list, converted: swap it in whole.
    fn replace(&self, objects: HashMap<Key, Arc<Object>>, errors: BTreeMap<Key, String>) {
        let n = objects.len();
        {
            let mut store = self.store.lock().expect("store lock");
            store.objects = objects;
            store.errors = errors;
        }
        self.metrics
            .objects
            .get_or_create(&self.labels)
            .set(n as i64);
        self.metrics.synced.get_or_create(&self.labels).set(1);
        self.update(|s| {
            s.synced = true;
            s.objects = n;
            s.state = "watching".into();
        });
        self.changed.notify_one();
    }

    /// The CRD is not installed: the kind is synced, and empty.
    pub fn mark_missing(&self, first_time: bool) {
        let had = {
            let mut store = self.store.lock().expect("store lock");
            let had = !store.objects.is_empty();
            *store = Store::default();
            had
        };
        self.metrics.crd_missing.get_or_create(&self.labels).set(1);
        self.metrics.synced.get_or_create(&self.labels).set(1);
        self.metrics.objects.get_or_create(&self.labels).set(0);
        let was_synced = self.synced();
        self.update(|s| {
            s.synced = true;
            s.objects = 0;
            s.api_version.clear();
            s.state = "crd not installed".into();
            s.stale_since = None;
        });
        if first_time || had || !was_synced {
            self.changed.notify_one();
        }
    }

    pub fn crd_found(&self) {
        self.metrics.crd_missing.get_or_create(&self.labels).set(0);
        self.update(|s| s.state = "listing".into());
    }

    fn upsert(&self, key: Key, object: Result<Object, String>) {
        let n = {
            let mut store = self.store.lock().expect("store lock");
            match object {
                Ok(o) => {
                    store.errors.remove(&key);
                    store.objects.insert(key, Arc::new(o));
                }
                Err(reason) => {
                    // A now-invalid object is not kept in its old form: the API says it changed.
                    store.objects.remove(&key);
                    store.errors.insert(key, reason);
                }
            }
            store.objects.len()
        };
        self.after_event(n);
    }

    fn remove(&self, key: &Key) {
        let n = {
            let mut store = self.store.lock().expect("store lock");
            store.errors.remove(key);
            store.objects.remove(key);
            store.objects.len()
        };
        self.after_event(n);
    }

    fn after_event(&self, n: usize) {
        let now = Timestamp::now();
        self.metrics
            .objects
            .get_or_create(&self.labels)
            .set(n as i64);
        self.metrics
            .last_event
            .get_or_create(&self.labels)
            .set(now.as_second());
        self.update(|s| {
            s.objects = n;
            s.last_event = Some(now.to_string());
        });
        self.changed.notify_one();
    }

    fn count_event(&self, event: &'static str) {
        self.metrics
            .events
            .get_or_create(&EventLabels {
                cluster: self.labels.cluster.clone(),
                kind: self.labels.kind,
                event,
            })
            .inc();
    }

    /// An error: report it, and mark the watch stale from the first error of a streak.
    pub fn error(&self, message: String) {
        self.metrics.errors.get_or_create(&self.labels).inc();
        let now = Timestamp::now();
        let mut became_stale = false;
        self.update(|s| {
            if s.stale_since.is_none() {
                s.stale_since = Some(now.to_string());
                became_stale = true;
            }
            s.last_error = Some(message.clone());
            s.state = "retrying".into();
        });
        if became_stale {
            self.metrics
                .stale_since
                .get_or_create(&self.labels)
                .set(now.as_second());
            warn!(kind = self.kind.as_str(), namespace = ?self.namespace, error = %message,
                  "Kubernetes API unreachable or failing for this kind; serving the last-known objects and retrying");
            self.changed.notify_one();
        } else {
            debug!(kind = self.kind.as_str(), error = %message, "still failing; retrying");
        }
    }

    /// The API server answered: the watch is no longer stale.
    fn reached(&self) {
        let mut was_stale = false;
        self.update(|s| {
            was_stale = s.stale_since.take().is_some();
            if s.synced {
                s.state = "watching".into();
            }
        });
        if was_stale {
            self.metrics.stale_since.get_or_create(&self.labels).set(0);
            info!(
                kind = self.kind.as_str(),
                namespace = ?self.namespace,
                "Kubernetes API reachable again"
            );
            self.changed.notify_one();
        }
    }

    fn relisted(&self) {
        self.metrics.relists.get_or_create(&self.labels).inc();
    }
}

/// Timing of the loop.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// `timeoutSeconds` of each watch request; a stream silent for this plus 30 s is dead.
    pub watch_timeout: Duration,
}

/// Exponential backoff with jitter: each wait is between half and all of the current step.
#[derive(Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    step: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max,
            step: min,
        }
    }
    pub fn reset(&mut self) {
        self.step = self.min;
    }
    pub fn next_delay(&mut self) -> Duration {
        let step = self.step;
        self.step = (self.step * 2).min(self.max);
        let half = step / 2;
        half + half.mul_f64(jitter())
    }
}

/// A number in [0, 1) that differs between calls and processes, without a RNG dependency.
fn jitter() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// Why [`run`] returned.
#[derive(Debug, PartialEq, Eq)]
pub enum Exit {
    Stopped,
    /// The resource is not served (404 on list): its CRD went away.
    NotFound,
}

pub fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

/// What to tell an operator about a failed call.
pub fn describe(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) if s.code == 401 || s.code == 403 => format!(
            "{} ({}): the API server refused; does the service account have list/watch on this kind (deploy/rbac)?",
            s.message, s.code
        ),
        kube::Error::Api(s) => format!("{} ({} {})", s.message, s.code, s.reason),
        other => format!("{other}; is the API server reachable?"),
    }
}

fn key_of<T: Resource>(item: &T) -> Key {
    let m = item.meta();
    (
        m.namespace.clone().unwrap_or_default(),
        m.name.clone().unwrap_or_default(),
    )
}

/// Sleep unless stopped first; `false` when stopped.
async fn pause(stop: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = stop.cancelled() => false,
        _ = tokio::time::sleep(d) => true,
    }
}

/// Objects per list page.
pub const LIST_PAGE: u32 = 500;

/// List, then watch, until `stop`. With `not_found_exits`, a 404 on list returns
/// [`Exit::NotFound`] (a CRD that went away) instead of being retried.
pub async fn run<L: ListWatch>(
    lw: L,
    convert: impl Fn(L::Item) -> Result<Object, String> + Send,
    shared: &Shared,
    timing: Timing,
    not_found_exits: bool,
    stop: &CancellationToken,
) -> Exit {
    let mut backoff = Backoff::new(timing.backoff_min, timing.backoff_max);
    // Pages of 500, as client-go's reflector: the API server never builds one huge response.
    let mut lp = ListParams::default().limit(LIST_PAGE);
    let mut wp = WatchParams::default().timeout(timing.watch_timeout.as_secs().max(1) as u32);
    if let Some(sel) = &shared.label_selector {
        lp = lp.labels(sel);
        wp = wp.labels(sel);
    }
    let idle = timing.watch_timeout + Duration::from_secs(30);
    let mut listed_before = false;
    'relist: loop {
        // Page through the list (the server serves every page from the snapshot of the
        // first), converting each page as it arrives so only one page of raw objects is
        // held. Convert the whole list before touching the store: readers see the old list
        // or the new one, never a mix.
        let mut objects = HashMap::new();
        let mut errors = BTreeMap::new();
        let mut page = lp.clone();
        let version = loop {
            let list = tokio::select! {
                _ = stop.cancelled() => return Exit::Stopped,
                r = lw.list(&page) => r,
            };
            let list = match list {
                Ok(l) => l,
                Err(e) if not_found_exits && is_status(&e, 404) => return Exit::NotFound,
                Err(e) if page.continue_token.is_some() && is_status(&e, 410) => {
                    info!(
                        kind = shared.kind.as_str(),
                        "list continue token expired (410 Gone); listing again from the start"
                    );
                    continue 'relist;
                }
                Err(e) => {
                    shared.error(describe(&e));
                    if !pause(stop, backoff.next_delay()).await {
                        return Exit::Stopped;
                    }
                    continue 'relist;
                }
            };
            for item in list.items {
                let key = key_of(&item);
                match convert(item) {
                    Ok(o) => {
                        objects.insert(key, Arc::new(o));
                    }
                    Err(reason) => {
                        warn!(kind = shared.kind.as_str(), namespace = %key.0, name = %key.1, %reason,
                              "object rejected; the others are still used");
                        errors.insert(key, reason);
                    }
                }
            }
            match list.metadata.continue_.filter(|t| !t.is_empty()) {
                Some(token) => page = lp.clone().continue_token(&token),
                None => break list.metadata.resource_version.unwrap_or_default(),
            }
        };
        shared.reached();
        if listed_before {
            shared.relisted();
        }
        listed_before = true;
        let mut version = version;
        debug!(kind = shared.kind.as_str(), objects = objects.len(), %version, "listed");
        shared.replace(objects, errors);
        backoff.reset();
        loop {
            let stream = tokio::select! {
                _ = stop.cancelled() => return Exit::Stopped,
                r = lw.watch(&wp, &version) => r,
            };
            let mut stream = match stream {
                Ok(s) => s,
                Err(e) if is_status(&e, 410) => {
                    info!(
                        kind = shared.kind.as_str(),
                        "resourceVersion too old (410 Gone); re-listing"
                    );
                    continue 'relist;
                }
                Err(e) => {
                    shared.error(describe(&e));
                    if !pause(stop, backoff.next_delay()).await {
                        return Exit::Stopped;
                    }
                    continue;
                }
            };
            shared.reached();
            loop {
                let next = tokio::select! {
                    _ = stop.cancelled() => return Exit::Stopped,
                    r = tokio::time::timeout(idle, stream.try_next()) => r,
                };
                let event = match next {
                    Err(_) => {
                        warn!(
                            kind = shared.kind.as_str(),
                            "watch silent for too long; reconnecting"
                        );
                        break;
                    }
                    // The server ended the watch (its timeout): resume from the last version.
                    Ok(Ok(None)) => break,
                    Ok(Err(e)) => {
                        shared.error(describe(&e));
                        if !pause(stop, backoff.next_delay()).await {
                            return Exit::Stopped;
                        }
                        break;
                    }
                    Ok(Ok(Some(event))) => event,
                };
                backoff.reset();
                match event {
                    WatchEvent::Added(o) | WatchEvent::Modified(o) => {
                        if let Some(v) = &o.meta().resource_version {
                            version.clone_from(v);
                        }
                        shared.count_event("applied");
                        let key = key_of(&o);
                        shared.upsert(key, convert(o));
                    }
                    WatchEvent::Deleted(o) => {
                        if let Some(v) = &o.meta().resource_version {
                            version.clone_from(v);
                        }
                        shared.count_event("deleted");
                        shared.remove(&key_of(&o));
                    }
                    WatchEvent::Bookmark(b) => {
                        version = b.metadata.resource_version;
                    }
                    WatchEvent::Error(s) if s.code == 410 => {
                        info!(kind = shared.kind.as_str(), message = %s.message,
                              "resourceVersion too old (410 Gone); re-listing");
                        continue 'relist;
                    }
                    WatchEvent::Error(s) => {
                        shared.error(format!("watch error: {} ({})", s.message, s.code));
                        if !pause(stop, backoff.next_delay()).await {
                            return Exit::Stopped;
                        }
                        break;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_the_cap_with_jitter() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let delays: Vec<Duration> = (0..8).map(|_| b.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(50) && delays[0] < Duration::from_millis(100));
        assert!(delays[7] >= Duration::from_millis(500) && delays[7] < Duration::from_secs(1));
        b.reset();
        assert!(b.next_delay() < Duration::from_millis(100));
    }
}
