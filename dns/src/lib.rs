//! Authoritative DNS for the mesh's `.global` names, on hickory's message types.
//!
//! ```text
//!  ServiceEntries: Kubernetes API (list/watch)
//!    or --config-dir YAML ─────────▶ registry snapshot (watch) ─▶ app.rs table writer
//!                                                                    │ answers.rs: Answers::build
//!                                                                    │ = table.rs Table (addresses,
//!                                                                    │  stable VIPs, conflicts,
//!                                                                    │  wildcards, SRV) + beside it
//!                                                                    │  wire.rs: every plain reply
//!                                                                    │  prebuilt in wire form
//!                                                                    ▼
//!                                                   watch<Arc<Answers>>  (swapped whole)
//!  client ─UDP─▶ server.rs batch loop (recvmmsg)                     │ one Arc clone per batch
//!                 │ plain query: wire.rs copies header, question,    │
//!                 │ prebuilt sections ──────────────────────────────▶ reply (sendmmsg)
//!                 │ anything else ────┐                              ▼
//!                                     ├─▶ respond.rs: respond(table, request) -> Reply
//!  client ─TCP─▶ server/tcp.rs ───────┘        (AA, NOERROR / NODATA+SOA / NXDOMAIN+SOA /
//!                 (task per connection)         REFUSED, EDNS, FORMERR, NOTIMP)
//!                                                                    │ encode within the client's
//!                                                                    ▼ UDP size, else TC
//!                                                                  reply
//! ```
//!
//! Modules depend one way: table (plain data) <- respond <- wire <- answers <- server, app.
//! Answers are computed once per snapshot change; the request path is one lookup
//! (for a plain UDP query, one hash of its name and a copy of prepared bytes). `admin.rs`
//! serves `/config_dump` and `/debug/explain?host=...`, `metrics.rs` the Prometheus counters.

pub mod admin;
pub mod answers;
pub mod app;
pub mod config;
pub mod metrics;
pub mod respond;
pub mod server;
pub mod table;
pub mod wire;

pub use app::Dns;
pub use config::Config;
