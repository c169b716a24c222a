//! The process shell every long-running binary of the mesh shares (`gateway`, `dns`,
//! `remote-secrets serve`): what happens around the binary's own work, written once.
//!
//! ```text
//!  flags (clap; every flag `--foo-bar` also reads `<PREFIX>_FOO_BAR`)
//!    SourceFlags  ListenFlags  LogFlags  LifecycleFlags   flattened into each binary's Config
//!        │             │           │           │          validated together (ConfigError)
//!        ▼             ▼           ▼           │
//!  Source::start   Servers::bind  init_logging │
//!  (dir or kube)   (15021 15020 15000)         │
//!        │             │                       │
//!        ▼             ▼                       ▼
//!  SnapshotHandle ─▶ readiness::when_ready ─▶ Readiness ◀── Lifecycle (SIGTERM: 503, drain,
//!  + the binary's    (every source synced,    (never ready      stop accepting, deadline for
//!    derived table)   its own table built)     once draining)   in-flight work, then force)
//! ```
//!
//! The binary brings its own data path (listeners, tables, routers for `/config_dump` and
//! `/debug/explain`) and hands the shell a [`lifecycle::Work`]: the token that stops accepting,
//! the tracker of in-flight work, and the token that ends what is left at the deadline.

pub mod admin;
pub mod flags;
pub mod lifecycle;
pub mod logging;
pub mod readiness;
pub mod source;

pub use flags::{ConfigError, LifecycleFlags, ListenFlags, LogFlags, Problems, SourceFlags};
pub use lifecycle::{Lifecycle, TerminationSignal, Work};
pub use readiness::Readiness;
pub use source::Source;
