//! Multi-cluster tests and the local two-cluster demo.
//!
//! ```text
//!  pki.rs    certificates from the real `remote-secrets certs` (one root, per-cluster CAs)
//!  mesh.rs   cluster layouts, the YAML each cluster reads, meshNetworks, real processes
//!  echo.rs   the echo "pod": mTLS, greets with pod and cluster, echoes
//!  client.rs the sidecar stand-in: DNS -> xDS (ADS, NETWORK) -> weighted pick -> mTLS with SNI
//!  netns.rs  network namespaces: one per cluster plus a WAN joining the gateways
//! ```
//!
//! No Envoy runs here, so `client.rs` does what a sidecar does for one outbound call; the
//! gateway, dns and remote-secrets are the real binaries.

pub mod client;
pub mod echo;
pub mod mesh;
pub mod netns;
pub mod pki;
