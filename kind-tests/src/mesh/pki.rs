//! Certificates for a test mesh, made by the real `remote-secrets certs` subcommands: one shared
//! root, one intermediate per cluster, and workload leaves issued from the intermediates.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use testkit::tls::ServiceIdentityVerifier;

/// Files of one workload identity: `cert-chain.pem` (leaf, then the cluster's intermediate),
/// `key.pem`, `root-cert.pem`.
#[derive(Clone, Debug)]
pub struct Identity {
    pub dir: PathBuf,
}

impl Identity {
    pub fn cert_chain(&self) -> PathBuf {
        self.dir.join("cert-chain.pem")
    }
    pub fn key(&self) -> PathBuf {
        self.dir.join("key.pem")
    }
    pub fn root(&self) -> PathBuf {
        self.dir.join("root-cert.pem")
    }
}

fn run(remote_secrets: &Path, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(remote_secrets).args(args).output()?;
    if !out.status.success() {
        anyhow::bail!(
            "remote-secrets {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Root at `dir/root`, intermediates at `dir/<cluster>`.
pub fn make_cas(remote_secrets: &Path, dir: &Path, clusters: &[&str]) -> anyhow::Result<()> {
    let root = dir.join("root");
    let root_s = root.to_string_lossy();
    run(remote_secrets, &["certs", "root", "--out-dir", &root_s])?;
    for c in clusters {
        let out = dir.join(c);
        run(
            remote_secrets,
            &[
                "certs",
                "intermediate",
                "--cluster",
                c,
                "--root-dir",
                &root_s,
                "--out-dir",
                &out.to_string_lossy(),
            ],
        )?;
    }
    Ok(())
}

/// A workload leaf for `spiffe://cluster.local/ns/<ns>/sa/<sa>` from `cluster`'s intermediate,
/// with `dns` as DNS names, written to `dir/<cluster>/<name>`.
pub fn workload(
    remote_secrets: &Path,
    dir: &Path,
    cluster: &str,
    name: &str,
    spiffe: &str,
    dns: &[&str],
) -> anyhow::Result<Identity> {
    let out = dir.join(cluster).join("workloads").join(name);
    let ca = dir.join(cluster);
    let mut args = vec![
        "certs".to_string(),
        "workload".into(),
        "--spiffe".into(),
        spiffe.into(),
        "--ca-dir".into(),
        ca.to_string_lossy().into_owned(),
        "--out-dir".into(),
        out.to_string_lossy().into_owned(),
    ];
    for d in dns {
        args.push("--dns".into());
        args.push((*d).into());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run(remote_secrets, &args)?;
    Ok(Identity { dir: out })
}

fn certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    Ok(CertificateDer::pem_file_iter(path)?.collect::<Result<Vec<_>, _>>()?)
}

fn roots(path: &Path) -> anyhow::Result<Arc<RootCertStore>> {
    let mut r = RootCertStore::empty();
    for c in certs(path)? {
        r.add(c)?;
    }
    Ok(Arc::new(r))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A sidecar-like client: presents its identity, verifies the server against the shared root
/// and the expected service name (`<svc>.<ns>.svc.cluster.local`), whatever SNI it sends.
pub fn client_config(id: &Identity, expect: &str) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let verifier = ServiceIdentityVerifier::new(roots(&id.root())?, provider(), expect)?;
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(
            certs(&id.cert_chain())?,
            PrivateKeyDer::from_pem_file(id.key())?,
        )?;
    Ok(Arc::new(config))
}

/// A sidecar-like server: requires a client certificate chaining to the shared root.
pub fn server_config(id: &Identity) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let verifier =
        WebPkiClientVerifier::builder_with_provider(roots(&id.root())?, provider()).build()?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            certs(&id.cert_chain())?,
            PrivateKeyDer::from_pem_file(id.key())?,
        )?;
    Ok(Arc::new(config))
}
