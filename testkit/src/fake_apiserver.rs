//! A fake Kubernetes API server. It **stands in for a real API server** in tests, because none
//! can run on the build machine (no kind, no k3s); the kind tests (deploy issue) stay the real
//! check. It speaks enough of the protocol for the real kube-rs client to list and watch:
//!
//! - discovery: `/version`, `/api`, `/api/v1`, `/apis`, `/apis/<group>/<version>` (404 for a
//!   custom group whose CRD is not installed; install it later with [`FakeApiServer::install`]);
//! - lists with `resourceVersion` in `metadata` and on every item, `labelSelector`, cluster-wide
//!   or per namespace, and `PartialObjectMetadata(List)` when the client asks for metadata only;
//!   `limit` and `continue` page a list from one snapshot (`410 Gone`, reason `Expired`, for a
//!   token that [`FakeApiServer::compact`] expired);
//! - `watch=true&resourceVersion=N&allowWatchBookmarks=true&timeoutSeconds=T`: a chunked stream of
//!   JSON lines replaying the history after N, then live events, with `BOOKMARK`s; a version older
//!   than the compacted history gets an `ERROR` event with a `410 Gone` Status
//!   ([`FakeApiServer::compact`]), as etcd compaction does;
//! - connection drops ([`FakeApiServer::drop_watches`]) and a killed server
//!   ([`FakeApiServer::kill`]) restarted on the same port with its objects kept
//!   ([`FakeApiServer::restart`]).
//!
//! Objects are written by the test directly ([`FakeApiServer::apply`], [`FakeApiServer::delete`]),
//! not over HTTP. Only `http://127.0.0.1`, no authentication.

mod store;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use hyper::body::Incoming;
use hyper::header::{ACCEPT, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinSet;

pub use store::Selector;
use store::{Change, RESOURCES, ResourceDef, Store, find_by_plural};

struct Shared {
    store: Mutex<Store>,
    changes: broadcast::Sender<Arc<Change>>,
    /// Bumped to cut every open watch stream.
    cut: watch::Sender<u64>,
    bookmark_every: Duration,
}

/// A running (or killed) fake API server on 127.0.0.1.
pub struct FakeApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    running: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// Which custom resources are installed at start.
#[derive(Clone, Debug)]
pub struct Options {
    /// Versions of networking.istio.io served (empty: Istio not installed).
    pub istio_versions: Vec<String>,
    /// Whether the MCS ServiceExport CRD is installed.
    pub mcs: bool,
    pub bookmark_every: Duration,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            istio_versions: vec!["v1".into(), "v1beta1".into()],
            mcs: true,
            bookmark_every: Duration::from_millis(500),
        }
    }
}

impl FakeApiServer {
    /// Start on 127.0.0.1 with an ephemeral port, every CRD installed.
    pub async fn start() -> FakeApiServer {
        FakeApiServer::start_with(Options::default()).await
    }

    pub async fn start_with(options: Options) -> FakeApiServer {
        let mut store = Store::default();
        if !options.istio_versions.is_empty() {
            store
                .installed
                .insert("networking.istio.io".into(), options.istio_versions.clone());
        }
        if options.mcs {
            store
                .installed
                .insert("multicluster.x-k8s.io".into(), vec!["v1alpha1".into()]);
        }
        let shared = Arc::new(Shared {
            store: Mutex::new(store),
            changes: broadcast::channel(4096).0,
            cut: watch::channel(0).0,
            bookmark_every: options.bookmark_every,
        });
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake API server on 127.0.0.1");
        let addr = listener.local_addr().expect("local addr");
        let server = FakeApiServer {
            addr,
            shared,
            running: Mutex::new(None),
        };
        server.serve(listener);
        server
    }

    fn serve(&self, listener: TcpListener) {
        let shared = self.shared.clone();
        let task = tokio::spawn(async move {
            // Dropping this set (when the task is aborted) aborts every connection.
            let mut connections = JoinSet::new();
            loop {
                let (stream, _) = tokio::select! {
                    r = listener.accept() => match r { Ok(a) => a, Err(_) => continue },
                    Some(_) = connections.join_next(), if !connections.is_empty() => continue,
                };
                let shared = shared.clone();
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let shared = shared.clone();
                        async move { Ok::<_, Infallible>(handle(&shared, req)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        *self.running.lock().unwrap() = Some(task);
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig (YAML) that points at this server.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: fake\n\
             clusters:\n- name: fake\n  cluster:\n    server: {}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\n\
             users:\n- name: fake\n  user:\n    token: fake-token\n",
            self.url()
        )
    }

    /// Write [`Self::kubeconfig`] into `dir` and return its path.
    pub fn write_kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join(format!("kubeconfig-{}", self.addr.port()));
        std::fs::write(&path, self.kubeconfig()).expect("write kubeconfig");
        path
    }

    /// Create or replace an object (JSON in Kubernetes shape, `apiVersion` and `kind` set).
    pub fn apply(&self, object: Value) {
        let change = self.shared.store.lock().unwrap().apply(object);
        let change = change.unwrap_or_else(|e| panic!("fake API server: {e}"));
        let _ = self.shared.changes.send(change);
    }

    pub fn delete(&self, api_version: &str, kind: &str, namespace: &str, name: &str) {
        let change = self
            .shared
            .store
            .lock()
            .unwrap()
            .delete(api_version, kind, namespace, name);
        if let Some(change) = change {
            let _ = self.shared.changes.send(change);
        }
    }

    /// Forget the event history, as etcd compaction does: a watch from an older
    /// resourceVersion gets an `ERROR` event with a `410 Gone` Status. (Open watches are not
    /// affected; kill the server or drop watches first to make a client resume from an old one.)
    pub fn compact(&self) {
        self.shared.store.lock().unwrap().compact();
    }

    /// List responses served as pages so far (a list with `limit` that had more, or a
    /// `continue`). [`FakeApiServer::compact`] also expires the continue tokens handed out, so
    /// the next page is refused with `410 Gone` (reason `Expired`), as after etcd compaction.
    pub fn paged_lists(&self) -> u64 {
        self.shared.store.lock().unwrap().pages_served
    }

    /// Refuse the next list continue token with `410 Gone` (reason `Expired`), as when etcd
    /// compacts between two pages of a list.
    pub fn expire_next_continue(&self) {
        self.shared.store.lock().unwrap().expire_next_continue = true;
    }

    /// Cut every open watch stream mid-way (the TCP connection is aborted).
    pub fn drop_watches(&self) {
        self.shared.cut.send_modify(|n| *n += 1);
    }

    /// Install a custom resource group (a CRD) in these versions.
    pub fn install(&self, group: &str, versions: &[&str]) {
        self.shared.store.lock().unwrap().installed.insert(
            group.into(),
            versions.iter().map(|v| v.to_string()).collect(),
        );
    }

    /// Kill the server: the listener and every connection close at once. Objects are kept.
    pub fn kill(&self) {
        if let Some(task) = self.running.lock().unwrap().take() {
            task.abort();
        }
    }

    /// Listen again on the same address, with the same objects and history.
    pub async fn restart(&self) {
        self.kill();
        // The aborted task releases the port when it is dropped; retry briefly until it has.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::debug!(error = %e, "fake API server port not free yet");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("cannot rebind the fake API server on {}: {e}", self.addr),
            }
        };
        self.serve(listener);
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn json_response(status: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .expect("response")
}

fn status(code: u16, reason: &str, message: &str) -> Response<Body> {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                      "status": "Failure", "message": message, "reason": reason, "code": code});
    json_response(
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        &body,
    )
}

fn query(req: &Request<Incoming>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for pair in req.uri().query().unwrap_or("").split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        out.insert(k.to_string(), percent_decode(v));
    }
    out
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => out.push(b),
                    Err(_) => out.extend_from_slice(&bytes[i..i + 3]),
                }
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn resource_list(group_version: &str, defs: &[&ResourceDef]) -> Value {
    let resources: Vec<Value> = defs
        .iter()
        .map(|d| {
            json!({"name": d.plural, "singularName": d.kind.to_lowercase(), "namespaced": true,
                   "kind": d.kind, "verbs": ["get", "list", "watch"]})
        })
        .collect();
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version,
           "resources": resources})
}

fn handle(shared: &Shared, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match segments.as_slice() {
        ["version"] => json_response(
            StatusCode::OK,
            &json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-fake", "platform": "linux/amd64"}),
        ),
        ["api"] => json_response(
            StatusCode::OK,
            &json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}),
        ),
        ["api", "v1"] => {
            let defs: Vec<&ResourceDef> = RESOURCES.iter().filter(|r| r.group.is_empty()).collect();
            json_response(StatusCode::OK, &resource_list("v1", &defs))
        }
        ["apis"] => json_response(StatusCode::OK, &api_groups(shared)),
        ["apis", group, version] => {
            if !shared.store.lock().unwrap().served(group, version) {
                return status(
                    404,
                    "NotFound",
                    &format!(
                        "the server could not find the requested resource ({group}/{version})"
                    ),
                );
            }
            let defs: Vec<&ResourceDef> = RESOURCES.iter().filter(|r| r.group == *group).collect();
            json_response(
                StatusCode::OK,
                &resource_list(&format!("{group}/{version}"), &defs),
            )
        }
        ["api", "v1", rest @ ..] => collection(shared, &req, "", "v1", rest),
        ["apis", group, version, rest @ ..] => collection(shared, &req, group, version, rest),
        _ => status(
            404,
            "NotFound",
            "the server could not find the requested resource",
        ),
    }
}

fn api_groups(shared: &Shared) -> Value {
    let store = shared.store.lock().unwrap();
    let mut groups = vec![json!({"name": "discovery.k8s.io",
        "versions": [{"groupVersion": "discovery.k8s.io/v1", "version": "v1"}],
        "preferredVersion": {"groupVersion": "discovery.k8s.io/v1", "version": "v1"}})];
    for (group, versions) in &store.installed {
        let vs: Vec<Value> = versions
            .iter()
            .map(|v| json!({"groupVersion": format!("{group}/{v}"), "version": v}))
            .collect();
        groups.push(json!({"name": group, "versions": vs, "preferredVersion": vs[0]}));
    }
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// The object as served in `api_version`, whole or as `PartialObjectMetadata`.
fn present(object: &Value, api_version: &str, metadata_only: bool) -> Value {
    if metadata_only {
        return json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
                      "metadata": object["metadata"]});
    }
    let mut o = object.clone();
    o["apiVersion"] = api_version.into();
    o
}

fn collection(
    shared: &Shared,
    req: &Request<Incoming>,
    group: &str,
    version: &str,
    rest: &[&str],
) -> Response<Body> {
    let (namespace, plural) = match rest {
        [plural] => (None, *plural),
        ["namespaces", ns, plural] => (Some(ns.to_string()), *plural),
        _ => {
            return status(
                404,
                "NotFound",
                "the server could not find the requested resource",
            );
        }
    };
    let Some(def) = find_by_plural(group, plural) else {
        return status(
            404,
            "NotFound",
            &format!("no resource {plural} in {group}/{version}"),
        );
    };
    if !shared.store.lock().unwrap().served(group, version) {
        return status(
            404,
            "NotFound",
            "the server could not find the requested resource",
        );
    }
    let api_version = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    let q = query(req);
    let selector = match Selector::parse(q.get("labelSelector").map(String::as_str).unwrap_or("")) {
        Ok(s) => s,
        Err(e) => return status(400, "BadRequest", &e),
    };
    let metadata_only = req
        .headers()
        .get(ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("as=PartialObjectMetadata"));
    let scope = Scope {
        plural: def.plural,
        namespace,
        selector,
        api_version,
        metadata_only,
    };
    if q.get("watch").is_some_and(|w| w == "true" || w == "1") {
        return watch(shared, scope, &q, def);
    }
    let mut store = shared.store.lock().unwrap();
    let (rv, mut items) = match q.get("continue").filter(|c| !c.is_empty()) {
        Some(token) if std::mem::take(&mut store.expire_next_continue) => {
            store.continues.remove(token);
            return status(
                410,
                "Expired",
                "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
            );
        }
        Some(token) => match store.continues.remove(token) {
            Some(rest) => rest,
            None => {
                return status(
                    410,
                    "Expired",
                    "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
                );
            }
        },
        None => (
            store.rv,
            store
                .objects
                .iter()
                .filter(|((p, ns, _), o)| scope.matches(p, ns, o))
                .map(|(_, o)| present(o, &scope.api_version, metadata_only))
                .collect(),
        ),
    };
    let mut list_meta = json!({"resourceVersion": rv.to_string()});
    let limit = q.get("limit").and_then(|l| l.parse::<usize>().ok());
    if q.contains_key("continue") {
        store.pages_served += 1;
    }
    if let Some(limit) = limit.filter(|l| *l > 0 && items.len() > *l) {
        let rest = items.split_off(limit);
        store.next_continue += 1;
        let token = format!("page-{}", store.next_continue);
        list_meta["continue"] = json!(token);
        list_meta["remainingItemCount"] = json!(rest.len());
        store.continues.insert(token, (rv, rest));
        store.pages_served += 1;
    }
    let (api_version, kind) = if metadata_only {
        (
            "meta.k8s.io/v1".to_string(),
            "PartialObjectMetadataList".to_string(),
        )
    } else {
        (scope.api_version.clone(), format!("{}List", def.kind))
    };
    json_response(
        StatusCode::OK,
        &json!({"apiVersion": api_version, "kind": kind, "metadata": list_meta, "items": items}),
    )
}

struct Scope {
    plural: &'static str,
    namespace: Option<String>,
    selector: Selector,
    api_version: String,
    metadata_only: bool,
}

impl Scope {
    fn matches(&self, plural: &str, namespace: &str, object: &Value) -> bool {
        plural == self.plural
            && self.namespace.as_deref().is_none_or(|n| n == namespace)
            && self.selector.matches(object)
    }

    fn line(&self, kind: &str, object: &Value) -> Bytes {
        let event =
            json!({"type": kind, "object": present(object, &self.api_version, self.metadata_only)});
        Bytes::from(event.to_string() + "\n")
    }
}

type Chunk = Result<Bytes, std::io::Error>;

fn watch(
    shared: &Shared,
    scope: Scope,
    q: &BTreeMap<String, String>,
    def: &ResourceDef,
) -> Response<Body> {
    let from: u64 = q
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|v| v == "true");
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|v| v.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(1800));
    let (tx, rx) = mpsc::channel::<Chunk>(256);
    let mut cut = shared.cut.subscribe();
    cut.mark_unchanged();
    // Backlog and subscription under one lock: no change is missed or seen twice.
    let (backlog, mut live, current) = {
        let store = shared.store.lock().unwrap();
        let live = shared.changes.subscribe();
        if from < store.oldest {
            let gone = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1",
                "metadata": {}, "status": "Failure", "reason": "Expired", "code": 410,
                "message": format!("too old resource version: {from} ({})", store.oldest)}});
            let _ = tx.try_send(Ok(Bytes::from(gone.to_string() + "\n")));
            drop(tx);
            return stream_response(rx);
        }
        let backlog: Vec<Bytes> = if from == 0 {
            // No version: every current object as ADDED, as the API server does.
            store
                .objects
                .iter()
                .filter(|((p, ns, _), o)| scope.matches(p, ns, o))
                .map(|(_, o)| scope.line("ADDED", o))
                .collect()
        } else {
            store
                .history
                .iter()
                .filter(|c| c.rv > from && scope.matches(c.resource, &c.namespace, &c.object))
                .map(|c| scope.line(c.kind, &c.object))
                .collect()
        };
        (backlog, live, store.rv)
    };
    let kind = def.kind;
    let api_version = scope.api_version.clone();
    let every = shared.bookmark_every;
    tokio::spawn(async move {
        let bookmark = |rv: u64| {
            let b = json!({"type": "BOOKMARK", "object": {"kind": kind, "apiVersion": api_version,
                           "metadata": {"resourceVersion": rv.to_string()}}});
            Bytes::from(b.to_string() + "\n")
        };
        for line in backlog {
            if tx.send(Ok(line)).await.is_err() {
                return;
            }
        }
        let mut last = current;
        if bookmarks && tx.send(Ok(bookmark(last))).await.is_err() {
            return;
        }
        let end = tokio::time::sleep(timeout);
        tokio::pin!(end);
        let mut ticker = tokio::time::interval(every);
        ticker.tick().await;
        loop {
            tokio::select! {
                _ = &mut end => return,
                _ = tx.closed() => return,
                _ = cut.changed() => {
                    let _ = tx.send(Err(std::io::Error::other("connection dropped by the fake API server"))).await;
                    return;
                }
                _ = ticker.tick(), if bookmarks => {
                    if tx.send(Ok(bookmark(last))).await.is_err() { return }
                }
                r = live.recv() => match r {
                    Ok(c) => {
                        if c.rv <= last.max(from) {
                            continue;
                        }
                        last = c.rv;
                        if scope.matches(c.resource, &c.namespace, &c.object)
                            && tx.send(Ok(scope.line(c.kind, &c.object))).await.is_err() {
                            return;
                        }
                    }
                    // Lagged or closed: end the stream; the client resumes from its version.
                    Err(_) => return,
                }
            }
        }
    });
    stream_response(rx)
}

fn stream_response(rx: mpsc::Receiver<Chunk>) -> Response<Body> {
    Response::builder()
        .status(StatusCode::OK)
        .header(CONTENT_TYPE, "application/json")
        .body(Body::from_stream(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
        .expect("response")
}
