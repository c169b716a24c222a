//! Authoritative DNS for the mesh's `.global` names, on hickory-server.
//!
//! ```text
//!  ServiceEntries: Kubernetes API (list/watch)
//!    or --config-dir YAML ─────────▶ registry snapshot (watch) ─▶ app.rs table writer
//!                                                                    │ table.rs: Table::build
//!                                                                    │ (addresses, stable VIPs,
//!                                                                    │  conflicts, wildcards, SRV)
//!                                                                    ▼
//!                                                     watch<Arc<Table>>  (swapped whole)
//!                                                                    │ one Arc clone per query
//!  client ─UDP─▶ server.rs recv loop ─┐                              ▼
//!                                     ├─▶ respond.rs: respond(table, request) -> Reply
//!  client ─TCP─▶ hickory Server ──────┘        (AA, NOERROR / NODATA+SOA / NXDOMAIN+SOA /
//!                 (RequestHandler)              REFUSED, EDNS, FORMERR, NOTIMP)
//!                                                                    │ encode within the client's
//!                                                                    ▼ UDP size, else TC
//!                                                                  reply
//! ```
//!
//! Answers are computed once per snapshot change; the request path is one lookup. `admin.rs`
//! serves `/config_dump` and `/debug/explain?host=...`, `metrics.rs` the Prometheus counters.

pub mod admin;
pub mod app;
pub mod config;
pub mod metrics;
pub mod respond;
pub mod server;
pub mod table;
pub mod wire;

pub use app::Dns;
pub use config::Config;
