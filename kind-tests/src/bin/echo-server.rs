//! An echo "pod" for tests and demos: mutual TLS with a workload certificate, greets with
//! `pod=<name> cluster=<id>`, then echoes.

use clap::Parser;
use kind_tests::mesh::pki::Identity;

/// A TLS echo "pod" for tests and demos: verifies the client certificate against the shared
/// root, greets with `pod=<name> cluster=<id>`, then echoes.
#[derive(Parser, Debug)]
#[command(long_about = None)]
struct Args {
    /// Address to listen on.
    #[arg(long)]
    listen: std::net::SocketAddr,
    /// The pod name it answers with.
    #[arg(long)]
    pod: String,
    /// The cluster id it answers with.
    #[arg(long)]
    cluster: String,
    /// Directory with cert-chain.pem, key.pem and root-cert.pem (from `remote-secrets certs workload`).
    #[arg(long)]
    identity: std::path::PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    process_shell::logging::init_logging(&process_shell::LogFlags::default(), "info");
    let tls = kind_tests::mesh::pki::server_config(&Identity { dir: args.identity })?;
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    tracing::info!(listen = %args.listen, pod = %args.pod, "echo pod ready");
    kind_tests::mesh::echo::serve(listener, tls, args.pod, args.cluster).await?;
    Ok(())
}
