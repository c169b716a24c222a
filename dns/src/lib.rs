//! Authoritative DNS for the mesh's `.global` names.
pub mod config;
pub mod table;
pub use config::Config;
