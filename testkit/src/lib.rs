//! Helpers for the workspace's tests; a dev-dependency only, never shipped.
//!
//! - [`fake_apiserver`]: an HTTP server speaking the Kubernetes list/watch protocol, which
//!   stands in for a real API server so the real kube-rs client can be driven in tests.

pub mod fake_apiserver;

pub use fake_apiserver::FakeApiServer;
