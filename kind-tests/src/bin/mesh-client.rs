//! The sidecar stand-in, as a command: `call` makes calls the way an Istio sidecar would and
//! prints the path as JSON; `get` and `connect` are probes for tests inside network namespaces.

use std::net::SocketAddr;

use clap::{Parser, Subcommand};
use kind_tests::client::{CallOptions, run};
use kind_tests::mesh::pki::{Identity, client_config};

/// The sidecar stand-in: `call` resolves a .global name, asks xDS for its endpoints, opens
/// mutual TLS with Istio's SNI and prints the path as JSON; `get` and `connect` are probes.
#[derive(Parser, Debug)]
#[command(long_about = None)]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Resolve the host, fetch its endpoints over xDS, call it `--count` times; print JSON.
    Call {
        #[arg(long)]
        dns: SocketAddr,
        #[arg(long)]
        xds: SocketAddr,
        /// The client's network (sent as node metadata NETWORK).
        #[arg(long)]
        network: String,
        /// e.g. httpbin.bar.global
        #[arg(long)]
        host: String,
        #[arg(long, default_value_t = 8000)]
        port: u16,
        #[arg(long)]
        subset: Option<String>,
        /// Directory with the client's cert-chain.pem, key.pem, root-cert.pem.
        #[arg(long)]
        identity: std::path::PathBuf,
        /// The server identity to verify (a DNS name in the server's certificate).
        #[arg(long)]
        expect: String,
        #[arg(long, default_value_t = 1)]
        count: usize,
        /// Skip EDS and call this address directly (to probe what a gateway accepts).
        #[arg(long)]
        endpoint: Option<SocketAddr>,
    },
    /// Resolve a name (A) through a DNS server; prints one address per line.
    Resolve {
        #[arg(long)]
        dns: SocketAddr,
        #[arg(long)]
        host: String,
    },
    /// HTTP GET a URL path on an address; prints the status code and body.
    Get { addr: SocketAddr, path: String },
    /// Try a TCP connection; prints `connected` or the error, exits 0 either way.
    Connect { addr: SocketAddr },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Args::parse().command {
        Cmd::Call {
            dns,
            xds,
            network,
            host,
            port,
            subset,
            identity,
            expect,
            count,
            endpoint,
        } => {
            let tls = client_config(&Identity { dir: identity }, &expect)?;
            let opts = CallOptions {
                dns,
                xds,
                network,
                host,
                port,
                subset,
                endpoint,
            };
            let seed = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_nanos() as u64;
            let report = run(&opts, tls, count, seed).await?;
            println!("{}", serde_json::to_string(&report)?);
        }
        Cmd::Resolve { dns, host } => {
            for ip in kind_tests::client::resolve(dns, &host).await? {
                println!("{ip}");
            }
        }
        Cmd::Get { addr, path } => {
            let (code, body) = kind_tests::mesh::http_get(addr, &path)?;
            println!("{code}\n{body}");
        }
        Cmd::Connect { addr } => {
            let r = tokio::time::timeout(
                std::time::Duration::from_secs(2),
                tokio::net::TcpStream::connect(addr),
            )
            .await;
            match r {
                Ok(Ok(_)) => println!("connected"),
                Ok(Err(e)) => println!("error: {e}"),
                Err(_) => println!("error: timed out"),
            }
        }
    }
    Ok(())
}
