//! Helpers for the workspace's tests. The product crates (gateway, dns, remote-secrets,
//! registry) take it as a dev-dependency only; kind-tests, whose binaries are test tools
//! (the sidecar stand-in, the echo pod, the demo), depends on it normally.
//!
//! - [`fake_apiserver`]: an HTTP server speaking the Kubernetes list/watch protocol, which
//!   stands in for a real API server so the real kube-rs client can be driven in tests.
//! - [`eventually`](mod@eventually): poll a check until it holds, with a deadline and a message
//!   (async or blocking; a panic for tests, an error for callers that add context).
//! - [`tls`]: the sidecar's view of a server certificate (mesh root + service identity,
//!   whatever SNI was sent).

pub mod eventually;
pub mod fake_apiserver;
pub mod tls;

pub use eventually::{
    eventually, eventually_blocking, eventually_within, poll_until, poll_until_blocking,
};
pub use fake_apiserver::FakeApiServer;
