use std::io::Write;

use anyhow::Context;
use clap::Parser;
use remote_secrets::app::App;
use remote_secrets::config::{Cli, Command};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // One crypto provider for every rustls user (tonic's TLS server included).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(config) => {
            registry::admin::init_logging(config.log_format);
            tracing::info!(config = %serde_json::to_string(&config)?, "starting remote-secrets");
            let mut term = registry::cli::TerminationSignal::install()
                .context("installing the SIGTERM handler")?;
            let app = App::start(*config)
                .await
                .context("remote-secrets failed to start")?;
            term.recv().await;
            tracing::info!("termination signal received");
            app.stop();
            app.wait().await;
        }
        Command::CreateRemoteSecret(c) => {
            let yaml = remote_secrets::remote_secret::render(&c)?;
            std::io::stdout().write_all(yaml.as_bytes())?;
        }
        Command::Certs(cmd) => {
            let out = remote_secrets::certs::run(&cmd)?;
            std::io::stdout().write_all(out.as_bytes())?;
        }
    }
    Ok(())
}
