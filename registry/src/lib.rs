//! The shared object model of the mesh, and the sources that fill it.
//!
//! ```text
//!  YAML directory (--config-dir)        Kubernetes API (source::kube: list/watch)
//!            \                                   /
//!             objects::Object  (Service, EndpointSlice, Pod, Secret,
//!                               ServiceEntry, DestinationRule, ServiceExport)
//!                     |  converted outside any lock
//!             snapshot::Snapshot  (services + ports + ready endpoints with labels and
//!                                  locality, subsets, exports, service entries, secrets)
//!                     |  one writer, watch channel
//!             source::SnapshotHandle  -> gateway / dns / remote-secrets (cheap readers)
//! ```
//!
//! `naming` holds the name forms everyone shares (Istio SNI, cluster names, `.global`), and
//! `admission` the rules a gateway admits a connection by (export policy, ready endpoints of a
//! port and subset), which the EDS server applies to remote clusters too.

pub mod admission;
pub mod cidr;
pub mod naming;
pub mod objects;
pub mod snapshot;
pub mod source;

pub use cidr::Cidr;
pub use naming::ServiceName;
pub use snapshot::Snapshot;
pub use source::SnapshotHandle;
