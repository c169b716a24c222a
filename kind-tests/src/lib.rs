//! Multi-cluster tests, the local two-cluster demo, and the benchmarks. One module per job,
//! plus what they share:
//!
//! ```text
//!  demo.rs          `local-mesh`: two clusters on loopback, calls printed with their path
//!  client.rs        `mesh-client`: the sidecar stand-in: DNS -> xDS (ADS, NETWORK) -> weighted
//!                   pick -> mTLS with Istio's SNI
//!  two_clusters.rs  the network of tests/two_clusters.rs: one namespace per cluster plus a
//!                   WAN joining the gateways (needs root)
//!  mesh.rs          shared: cluster layouts, the YAML each cluster reads, meshNetworks, real
//!                   processes; mesh/pki.rs certificates from the real `remote-secrets certs`;
//!                   mesh/echo.rs the echo "pod" (`echo-server`)
//!  ../bench/        the benchmarks: run.sh, bench.py, and `eds-bench` (bench/eds-bench.rs)
//!  ../kind/         the same path on two real kind clusters (needs Docker)
//! ```
//!
//! No Envoy runs here, so `client.rs` does what a sidecar does for one outbound call; the
//! gateway, dns and remote-secrets are the real binaries.

pub mod client;
pub mod demo;
pub mod mesh;
pub mod two_clusters;
