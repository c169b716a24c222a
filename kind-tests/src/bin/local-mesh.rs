//! The local two-cluster demo: two clusters on loopback, the real gateway, dns and
//! remote-secrets in each, and a sidecar-like client showing the path of each call
//! (`kind_tests::demo`). No root needed.

use std::path::PathBuf;

use clap::Parser;
use kind_tests::demo::{Options, run_demo};

/// Run two clusters on loopback and show cross-cluster calls through the gateways.
#[derive(Parser, Debug)]
#[command(long_about = None)]
struct Args {
    /// Make the calls, print the summary and exit (non-zero if a call failed).
    #[arg(long)]
    once: bool,
    /// Keep generated config, certificates and logs here (default: a temporary directory).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Calls per service.
    #[arg(long, default_value_t = 6)]
    calls: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if std::env::var_os("RUST_LOG").is_some() {
        process_shell::logging::init_logging(&process_shell::LogFlags::default(), "info");
    }
    run_demo(&Options {
        once: args.once,
        work_dir: args.work_dir,
        calls: args.calls,
    })
    .await
}
