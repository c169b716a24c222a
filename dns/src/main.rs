use anyhow::Context;
use clap::Parser;
use dns::{Config, Dns};
use registry::admin::LogFormat;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    init_logging(config.log_format);
    tracing::info!(config = %serde_json::to_string(&config)?, "starting dns");
    let drain = config.drain_duration;
    // Installed before start: a SIGTERM right after `dns ready` is logged drains, not kills.
    let mut term =
        registry::cli::TerminationSignal::install().context("installing the SIGTERM handler")?;
    let dns = Dns::start(config).await.context("dns failed to start")?;
    term.recv().await;
    tracing::info!(?drain, "termination signal received: draining");
    dns.begin_drain();
    tokio::time::sleep(drain).await;
    dns.shutdown().await;
    Ok(())
}

/// As `registry::admin::init_logging`, but hickory-server's one-line-per-TCP-query log is kept at
/// `warn` unless `RUST_LOG` asks for it.
fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,hickory_server=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Plain => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
