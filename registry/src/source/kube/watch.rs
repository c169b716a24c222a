//! One watch: a kind in a namespace (or all), kept as a store of trimmed objects.
//!
//! The list/watch protocol is `kube::runtime::watcher`'s: lists in pages of [`LIST_PAGE`]
//! (an expired continue token starts the list over), a watch from the list's
//! `resourceVersion` with bookmarks, resumed from the last seen version when the stream ends,
//! a fresh list on `410 Gone`. Pods come through `Api<PartialObjectMeta<Pod>>`, which the
//! watcher lists and watches metadata-only. Around that stream this module keeps what the
//! source promises:
//!
//! - the store is swapped whole, under a short lock, only once a list is complete and
//!   converted (`Init` .. `InitDone`); each object is converted as it arrives, so only one page
//!   of raw objects is held;
//! - errors back off with jitter (the stream is not polled meanwhile) while the last store
//!   keeps serving, and mark the watch stale from the first of a streak;
//! - a watch the watcher resumed quietly (no event yet) is proven back by a one-object list,
//!   since the watcher reports nothing on a successful reconnect;
//! - a 404 on list ends the watch with [`Exit::NotFound`] when the kind is a CRD that can go
//!   away.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams};
use kube::core::Resource;
use kube::runtime::watcher::{self, Event};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::metrics::{EventLabels, Metrics, WatchLabels};
use crate::objects::{Kind, Object};
use crate::snapshot::WatchStatus;

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

    fn stale(&self) -> bool {
        self.status
            .lock()
            .expect("status lock")
            .stale_since
            .is_some()
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
    /// `timeoutSeconds` of each watch request; the watcher counts a stream silent for this
    /// plus 5 s as dead and reconnects.
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

/// What to tell an operator about a failed watcher step.
pub fn describe_watcher(e: &watcher::Error) -> String {
    match e {
        watcher::Error::InitialListFailed(e) => format!("list: {}", describe(e)),
        watcher::Error::WatchStartFailed(e) => format!("watch: {}", describe(e)),
        watcher::Error::WatchFailed(e) => format!("watch stream: {}", describe(e)),
        watcher::Error::WatchError(s) if s.code == 401 || s.code == 403 => format!(
            "watch error: {} ({}): the API server refused; does the service account have list/watch on this kind (deploy/rbac)?",
            s.message, s.code
        ),
        watcher::Error::WatchError(s) => format!("watch error: {} ({})", s.message, s.code),
        watcher::Error::NoResourceVersion => {
            "the API server sent no resourceVersion; does this resource support watch?".into()
        }
    }
}

/// What a watcher error means for the loop.
#[derive(Debug, PartialEq, Eq)]
enum Recovery {
    /// `410 Gone` during a watch, or an expired list continue token: the watcher lists again
    /// from the start at once. Not an outage.
    Relist,
    /// `410 Gone` on starting a watch (an HTTP status rather than an event): the watcher would
    /// retry the same version forever, so start a new one, which lists.
    Restart,
    /// A 404 on list: the resource is not served (its CRD went away).
    NotFound,
    /// Anything else: report, back off, let the watcher retry.
    Retry,
}

fn recovery(e: &watcher::Error) -> Recovery {
    match e {
        watcher::Error::WatchError(s) if s.code == 410 => Recovery::Relist,
        watcher::Error::InitialListFailed(e) if is_status(e, 410) => Recovery::Relist,
        watcher::Error::InitialListFailed(e) if is_status(e, 404) => Recovery::NotFound,
        watcher::Error::WatchStartFailed(e) if is_status(e, 410) => Recovery::Restart,
        _ => Recovery::Retry,
    }
}

/// Sleep unless stopped first; `false` when stopped.
async fn pause(stop: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = stop.cancelled() => false,
        _ = tokio::time::sleep(d) => true,
    }
}

/// Objects per list page, as client-go's reflector: the API server never builds one huge
/// response.
pub const LIST_PAGE: u32 = 500;

/// The objects of a list in progress, converted as they arrive.
#[derive(Default)]
struct Listing {
    objects: HashMap<Key, Arc<Object>>,
    errors: BTreeMap<Key, String>,
}

/// List, then watch, until `stop`. With `not_found_exits`, a 404 on list returns
/// [`Exit::NotFound`] (a CRD that went away) instead of being retried.
pub async fn run<K>(
    api: Api<K>,
    convert: impl Fn(K) -> Result<Object, String> + Send,
    shared: &Shared,
    timing: Timing,
    not_found_exits: bool,
    stop: &CancellationToken,
) -> Exit
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let mut config = watcher::Config::default()
        .page_size(LIST_PAGE)
        .timeout(timing.watch_timeout.as_secs().max(1) as u32);
    let mut probe_params = ListParams::default().limit(1);
    if let Some(sel) = &shared.label_selector {
        config = config.labels(sel);
        probe_params = probe_params.labels(sel);
    }
    let mut backoff = Backoff::new(timing.backoff_min, timing.backoff_max);
    let mut probe_backoff = Backoff::new(timing.backoff_min, timing.backoff_max);
    let mut stream = watcher::watcher(api.clone(), config.clone()).boxed();
    let mut listing = Listing::default();
    let mut listed_before = false;
    // When set and the watch is stale: when to check that the API server answers again.
    let mut probe_at: Option<Instant> = None;
    loop {
        let due = probe_at.filter(|_| shared.stale());
        let probe = async {
            match due {
                Some(at) => {
                    tokio::time::sleep_until(at).await;
                    api.list(&probe_params).await
                }
                _ => std::future::pending().await,
            }
        };
        let next = tokio::select! {
            _ = stop.cancelled() => return Exit::Stopped,
            r = probe => {
                match r {
                    Ok(_) => {
                        shared.reached();
                        probe_backoff.reset();
                        probe_at = None;
                    }
                    Err(e) => {
                        debug!(kind = shared.kind.as_str(), error = %describe(&e), "still unreachable");
                        probe_at = Some(Instant::now() + probe_backoff.next_delay());
                    }
                }
                continue;
            }
            next = stream.next() => next,
        };
        // The watcher's stream never ends; if it did, start over.
        let Some(next) = next else {
            stream = watcher::watcher(api.clone(), config.clone()).boxed();
            continue;
        };
        match next {
            Ok(Event::Init) => listing = Listing::default(),
            Ok(Event::InitApply(item)) => {
                let key = key_of(&item);
                match convert(item) {
                    Ok(o) => {
                        listing.objects.insert(key, Arc::new(o));
                    }
                    Err(reason) => {
                        warn!(kind = shared.kind.as_str(), namespace = %key.0, name = %key.1, %reason,
                              "object rejected; the others are still used");
                        listing.errors.insert(key, reason);
                    }
                }
            }
            Ok(Event::InitDone) => {
                shared.reached();
                if listed_before {
                    shared.relisted();
                }
                listed_before = true;
                let Listing { objects, errors } = std::mem::take(&mut listing);
                debug!(
                    kind = shared.kind.as_str(),
                    objects = objects.len(),
                    "listed"
                );
                shared.replace(objects, errors);
                backoff.reset();
            }
            Ok(Event::Apply(o)) => {
                shared.reached();
                backoff.reset();
                shared.count_event("applied");
                let key = key_of(&o);
                shared.upsert(key, convert(o));
            }
            Ok(Event::Delete(o)) => {
                shared.reached();
                backoff.reset();
                shared.count_event("deleted");
                shared.remove(&key_of(&o));
            }
            Err(e) => match recovery(&e) {
                Recovery::NotFound if not_found_exits => return Exit::NotFound,
                Recovery::Relist => {
                    info!(kind = shared.kind.as_str(), error = %e,
                          "resourceVersion or list continue token too old (410 Gone); listing again");
                }
                Recovery::Restart => {
                    info!(kind = shared.kind.as_str(), error = %e,
                          "resourceVersion too old (410 Gone); listing again");
                    stream = watcher::watcher(api.clone(), config.clone()).boxed();
                }
                Recovery::NotFound | Recovery::Retry => {
                    shared.error(describe_watcher(&e));
                    let delay = backoff.next_delay();
                    if !pause(stop, delay).await {
                        return Exit::Stopped;
                    }
                    // The watcher retries when polled next; if that watch starts and stays
                    // quiet, this check is what clears the stale mark.
                    probe_at = Some(Instant::now() + timing.backoff_min);
                    probe_backoff.reset();
                }
            },
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

    fn api_error(code: u16) -> kube::Error {
        kube::Error::Api(Box::new(
            kube::core::Status::failure("x", "Expired").with_code(code),
        ))
    }

    #[test]
    fn gone_relists_and_only_a_list_404_means_the_crd_went_away() {
        let status = |code| Box::new(kube::core::Status::failure("x", "y").with_code(code));
        use watcher::Error as E;
        assert_eq!(recovery(&E::WatchError(status(410))), Recovery::Relist);
        assert_eq!(
            recovery(&E::InitialListFailed(api_error(410))),
            Recovery::Relist
        );
        assert_eq!(
            recovery(&E::WatchStartFailed(api_error(410))),
            Recovery::Restart
        );
        assert_eq!(
            recovery(&E::InitialListFailed(api_error(404))),
            Recovery::NotFound
        );
        assert_eq!(
            recovery(&E::WatchStartFailed(api_error(404))),
            Recovery::Retry
        );
        assert_eq!(recovery(&E::WatchError(status(500))), Recovery::Retry);
        assert_eq!(
            recovery(&E::InitialListFailed(api_error(403))),
            Recovery::Retry
        );
        assert!(describe_watcher(&E::InitialListFailed(api_error(403))).contains("deploy/rbac"));
    }
}
