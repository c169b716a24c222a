use anyhow::Context;
use dns::{Config, Dns};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::from_args();
    // hickory-server's one-line-per-TCP-query log stays at warn unless RUST_LOG asks for it.
    process_shell::logging::init_logging(&config.log, "info,hickory_server=warn");
    process_shell::logging::log_start("dns", &config);
    // Installed before start: a SIGTERM right after `dns ready` is logged drains, not kills.
    let mut term =
        process_shell::TerminationSignal::install().context("installing the SIGTERM handler")?;
    let dns = Dns::start(config).await.context("dns failed to start")?;
    term.recv().await;
    dns.begin_termination();
    dns.wait().await;
    Ok(())
}
