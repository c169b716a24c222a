//! The SNI passthrough east-west gateway.
//!
//! ```text
//!  client ──TLS──▶ accept ─▶ proxy: peek ClientHello (hello.rs, sans-IO, ≤16 KiB, deadline)
//!                               │
//!                               ▼
//!                  route.rs: admit_source, decide(SNI, RouteTable) ─ reject ─▶ TLS alert + metric
//!                               │ Route { service, port, subset, ready backends }
//!                               ▼
//!                  balance.rs: pick (P2C on open connections, skip ejected)
//!                               │ connect (timeout, retry others), replay peeked bytes
//!                               ▼
//!                  splice.rs: splice(2) both ways until both close / idle timeout
//!
//!  config dir ─▶ registry snapshot ─▶ app.rs route writer ─▶ watch<Arc<RouteTable>> ─▶ proxy
//! ```
//!
//! Nothing the client sends chooses an address: the SNI only selects an entry of the table,
//! built from exported services and their ready endpoints.

pub mod admin;
pub mod alert;
pub mod app;
pub mod balance;
pub mod budget;
pub mod clock;
pub mod config;
pub mod hello;
pub mod metrics;
pub mod proxy;
pub mod route;
pub mod splice;

pub use app::Gateway;
pub use config::Config;
