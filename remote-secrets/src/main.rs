use std::io::Write;

use anyhow::Context;
use remote_secrets::app::App;
use remote_secrets::config::{Cli, Command};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // One crypto provider for every rustls user (tonic's TLS server included).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::from_args();
    match cli.command {
        Command::Serve(config) => {
            process_shell::logging::init_logging(&config.log, "info");
            process_shell::logging::log_start("remote-secrets", &config);
            let mut term = process_shell::TerminationSignal::install()
                .context("installing the SIGTERM handler")?;
            let app = App::start(*config)
                .await
                .context("remote-secrets failed to start")?;
            term.recv().await;
            app.begin_termination();
            app.wait_terminated().await;
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
