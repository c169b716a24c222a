//! Logging for a binary: the `RUST_LOG` filter (else the binary's default), plain or JSON lines
//! on stderr.

use crate::flags::{LogFlags, LogFormat};

/// `default_filter` applies when `RUST_LOG` is unset, e.g. `info`, or
/// `info,hickory_server=warn` for a binary that quietens a library.
pub fn init_logging(flags: &LogFlags, default_filter: &str) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match flags.log_format {
        LogFormat::Plain => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// The line each binary logs first: its whole configuration, as `/config_dump` serves it.
pub fn log_start<C: serde::Serialize>(binary: &str, config: &C) {
    match serde_json::to_string(config) {
        Ok(json) => tracing::info!(config = %json, "starting {binary}"),
        Err(e) => tracing::info!(error = %e, "starting {binary} (config not serializable)"),
    }
}
