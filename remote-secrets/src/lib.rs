//! remote-secrets: the multi-cluster control plane (split-horizon EDS over xDS).
//!
//! ```text
//!  local: --config-dir   --remote-config-dir ID=DIR   Secrets istio/multiCluster=true
//!  or the Kubernetes API
//!          |                      |                         | secrets.rs: validate, hash,
//!          |                      |                         | connector.rs: kube source
//!          |                      |                         | per remote, switched once synced
//!          v                      v                         v
//!   clusters.rs: one aggregator task, the single writer of watch<Arc<MeshView>>
//!          (every cluster's snapshot + state, meshNetworks, DNS cache, resolved gateways)
//!          |
//!   xds/debounce: 100 ms quiet, 1 s max  ->  watch<Generation>
//!          |
//!   xds/feeds: one task per client network (node metadata NETWORK) with streams, the single
//!          writer of watch<NetworkSnapshot>: xds/snapshot diffs the views and recomputes only
//!          the services whose inputs changed through eds.rs (pure), encoding each once
//!          |
//!   xds.rs + xds/stream: ADS (SotW + Delta) and EDS streams; per stream: subscriptions and
//!          the version (u64) of each resource sent; only changed resources go to the streams
//!          subscribed to them
//! ```
//!
//! `certs.rs` and `remote_secret.rs` are the offline subcommands; `admin.rs` serves
//! `/config_dump` and `/debug/explain`.

pub mod admin;
pub mod app;
pub mod certs;
pub mod clusters;
pub mod config;
pub mod connector;
pub mod eds;
pub mod gateways;
pub mod kubeconfig;
pub mod mesh_networks;
pub mod metrics;
pub mod remote_secret;
pub mod secrets;
pub mod view;
pub mod xds;
