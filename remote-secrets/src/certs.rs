//! `remote-secrets certs`: the shared root CA and per-cluster intermediates, in Istio's file
//! layout (`samples/certs`, the `cacerts` Secret), plus workload leaves for tests and demos.
//!
//! - `root`: root-cert.pem, root-key.pem
//! - `intermediate --cluster ID`: ca-cert.pem, ca-key.pem, cert-chain.pem (intermediate then
//!   root), root-cert.pem
//! - `workload --spiffe URI`: cert-chain.pem (leaf, intermediate, root), key.pem, root-cert.pem
//!
//! Keys are written 0600 and never overwritten without `--force`. Generation is pure
//! (`generate_*` return PEM text); only [`run`] touches files.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use serde::Serialize;

#[derive(clap::Subcommand, Debug, Clone)]
pub enum CertsCommand {
    /// Create the shared root CA: root-cert.pem and root-key.pem.
    Root {
        /// Where to write the files.
        #[arg(long, default_value = ".")]
        out_dir: PathBuf,
        /// Organization in the certificate's subject.
        #[arg(long, default_value = "mesh")]
        org: String,
        #[arg(long, default_value_t = 3650)]
        days: u32,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Create a cluster's intermediate CA, signed by the root (Istio's cacerts files).
    Intermediate {
        /// The cluster id (a DNS-1123 label).
        #[arg(long)]
        cluster: String,
        /// Directory holding root-cert.pem and root-key.pem.
        #[arg(long, default_value = ".")]
        root_dir: PathBuf,
        /// Where to write the files (default: ./<cluster>).
        #[arg(long)]
        out_dir: Option<PathBuf>,
        #[arg(long, default_value_t = 730)]
        days: u32,
        /// Also print the `cacerts` Secret for istio-system to stdout.
        #[arg(long)]
        print_secret: bool,
        #[arg(long)]
        force: bool,
    },
    /// Issue a workload certificate (a SPIFFE identity) from a cluster's intermediate.
    Workload {
        /// spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>
        #[arg(long)]
        spiffe: String,
        /// Directory holding ca-cert.pem, ca-key.pem, cert-chain.pem and root-cert.pem.
        #[arg(long)]
        ca_dir: PathBuf,
        /// Where to write cert-chain.pem, key.pem and root-cert.pem.
        #[arg(long)]
        out_dir: PathBuf,
        /// DNS names to add (for servers, e.g. the xDS server's name).
        #[arg(long = "dns")]
        dns: Vec<String>,
        #[arg(long, default_value_t = 30)]
        days: u32,
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    #[error("{0} exists; pass --force to overwrite it")]
    Exists(PathBuf),
    #[error("cannot read {path}: {source}; run the previous `certs` step first?")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("--cluster {0:?} is not a DNS-1123 label")]
    BadCluster(String),
    #[error("--spiffe {0:?} is not spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>")]
    BadSpiffe(String),
    #[error("cannot render the Secret: {0}")]
    Yaml(String),
}

/// PEM files by their Istio names, in write order.
#[derive(Debug, Clone)]
pub struct Files(pub Vec<(&'static str, String)>);

impl Files {
    pub fn get(&self, name: &str) -> &str {
        self.0
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
            .unwrap_or("")
    }
}

/// Days since the epoch -> (year, month, day), proleptic Gregorian (Howard Hinnant's algorithm).
fn civil(days: i64) -> (i32, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let y = (yoe + era * 400 + i64::from(m <= 2)) as i32;
    (y, m, d)
}

fn validity(params: &mut CertificateParams, days: u32) {
    let today = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| (d.as_secs() / 86_400) as i64)
        .unwrap_or(0);
    let (y, m, d) = civil(today - 1);
    params.not_before = rcgen::date_time_ymd(y, m, d);
    let (y, m, d) = civil(today + i64::from(days));
    params.not_after = rcgen::date_time_ymd(y, m, d);
}

fn ca_params(org: &str, cn: &str, days: u32, path_len: Option<u8>) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, org);
    dn.push(DnType::CommonName, cn);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(match path_len {
        Some(n) => BasicConstraints::Constrained(n),
        None => BasicConstraints::Unconstrained,
    });
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut p, days);
    p
}

pub fn generate_root(org: &str, days: u32) -> Result<Files, CertsError> {
    let key = KeyPair::generate()?;
    let cert = ca_params(org, "Root CA", days, None).self_signed(&key)?;
    Ok(Files(vec![
        ("root-cert.pem", cert.pem()),
        ("root-key.pem", key.serialize_pem()),
    ]))
}

pub fn generate_intermediate(
    root_cert: &str,
    root_key: &str,
    cluster: &str,
    days: u32,
) -> Result<Files, CertsError> {
    if !registry::naming::is_dns1123_label(cluster) {
        return Err(CertsError::BadCluster(cluster.into()));
    }
    let issuer = Issuer::from_ca_cert_pem(root_cert, KeyPair::from_pem(root_key)?)?;
    let key = KeyPair::generate()?;
    let mut params = ca_params("mesh", "Intermediate CA", days, Some(0));
    params
        .distinguished_name
        .push(DnType::LocalityName, cluster);
    let cert = params.signed_by(&key, &issuer)?;
    Ok(Files(vec![
        ("ca-cert.pem", cert.pem()),
        ("ca-key.pem", key.serialize_pem()),
        ("cert-chain.pem", format!("{}{}", cert.pem(), root_cert)),
        ("root-cert.pem", root_cert.to_string()),
    ]))
}

fn valid_spiffe(s: &str) -> bool {
    let Some(rest) = s.strip_prefix("spiffe://") else {
        return false;
    };
    let parts: Vec<&str> = rest.split('/').collect();
    matches!(parts.as_slice(), [td, "ns", ns, "sa", sa] if !td.is_empty() && !ns.is_empty() && !sa.is_empty())
}

/// A leaf for `spiffe`, signed by the intermediate in `ca` (the files of `generate_intermediate`).
pub fn generate_workload(
    ca: &Files,
    spiffe: &str,
    dns: &[String],
    days: u32,
) -> Result<Files, CertsError> {
    if !valid_spiffe(spiffe) {
        return Err(CertsError::BadSpiffe(spiffe.into()));
    }
    let issuer = Issuer::from_ca_cert_pem(
        ca.get("ca-cert.pem"),
        KeyPair::from_pem(ca.get("ca-key.pem"))?,
    )?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    let bad = |_| CertsError::BadSpiffe(spiffe.into());
    params.subject_alt_names = vec![SanType::URI(spiffe.try_into().map_err(bad)?)];
    for d in dns {
        let name = d
            .clone()
            .try_into()
            .map_err(|_| CertsError::BadSpiffe(d.clone()))?;
        params.subject_alt_names.push(SanType::DnsName(name));
    }
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    validity(&mut params, days);
    let cert = params.signed_by(&key, &issuer)?;
    Ok(Files(vec![
        (
            "cert-chain.pem",
            format!("{}{}", cert.pem(), ca.get("cert-chain.pem")),
        ),
        ("key.pem", key.serialize_pem()),
        ("root-cert.pem", ca.get("root-cert.pem").to_string()),
    ]))
}

fn read(dir: &Path, name: &str) -> Result<String, CertsError> {
    let path = dir.join(name);
    std::fs::read_to_string(&path).map_err(|source| CertsError::Read { path, source })
}

/// Write all files, refusing to overwrite any (checked before writing anything) unless `force`.
pub fn write_files(dir: &Path, files: &Files, force: bool) -> Result<(), CertsError> {
    if !force {
        for (name, _) in &files.0 {
            let p = dir.join(name);
            if p.exists() {
                return Err(CertsError::Exists(p));
            }
        }
    }
    std::fs::create_dir_all(dir).map_err(|source| CertsError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    for (name, content) in &files.0 {
        let path = dir.join(name);
        let mode = if name.contains("key") { 0o600 } else { 0o644 };
        write_with_mode(&path, content, mode)
            .map_err(|source| CertsError::Write { path, source })?;
    }
    Ok(())
}

fn write_with_mode(path: &Path, content: &str, mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)?;
    // An existing file keeps its mode on open: set it.
    f.set_permissions(std::fs::Permissions::from_mode(mode))?;
    f.write_all(content.as_bytes())
}

#[derive(Serialize)]
struct SecretYaml<'a> {
    #[serde(rename = "apiVersion")]
    api_version: &'a str,
    kind: &'a str,
    metadata: Meta<'a>,
    #[serde(rename = "stringData")]
    string_data: std::collections::BTreeMap<&'a str, serde_saphyr::LitString>,
}

#[derive(Serialize)]
struct Meta<'a> {
    name: &'a str,
    namespace: &'a str,
}

/// Istio's `cacerts` Secret for a cluster's intermediate.
pub fn cacerts_secret(files: &Files) -> Result<String, CertsError> {
    let secret = SecretYaml {
        api_version: "v1",
        kind: "Secret",
        metadata: Meta {
            name: "cacerts",
            namespace: "istio-system",
        },
        string_data: files
            .0
            .iter()
            .map(|(n, v)| (*n, serde_saphyr::LitString(v.clone())))
            .collect(),
    };
    serde_saphyr::to_string(&secret).map_err(|e| CertsError::Yaml(e.to_string()))
}

/// Carry out a `certs` subcommand; returns what to print on stdout.
pub fn run(cmd: &CertsCommand) -> Result<String, CertsError> {
    match cmd {
        CertsCommand::Root {
            out_dir,
            org,
            days,
            force,
        } => {
            let files = generate_root(org, *days)?;
            write_files(out_dir, &files, *force)?;
            Ok(format!(
                "wrote root-cert.pem and root-key.pem to {}\n",
                out_dir.display()
            ))
        }
        CertsCommand::Intermediate {
            cluster,
            root_dir,
            out_dir,
            days,
            print_secret,
            force,
        } => {
            let files = generate_intermediate(
                &read(root_dir, "root-cert.pem")?,
                &read(root_dir, "root-key.pem")?,
                cluster,
                *days,
            )?;
            let dir = out_dir.clone().unwrap_or_else(|| PathBuf::from(cluster));
            write_files(&dir, &files, *force)?;
            if *print_secret {
                cacerts_secret(&files)
            } else {
                Ok(format!(
                    "wrote ca-cert.pem, ca-key.pem, cert-chain.pem, root-cert.pem to {}\n",
                    dir.display()
                ))
            }
        }
        CertsCommand::Workload {
            spiffe,
            ca_dir,
            out_dir,
            dns,
            days,
            force,
        } => {
            let mut ca = Vec::new();
            for name in [
                "ca-cert.pem",
                "ca-key.pem",
                "cert-chain.pem",
                "root-cert.pem",
            ] {
                ca.push((name, read(ca_dir, name)?));
            }
            let files = generate_workload(&Files(ca), spiffe, dns, *days)?;
            write_files(out_dir, &files, *force)?;
            Ok(format!(
                "wrote cert-chain.pem, key.pem, root-cert.pem for {spiffe} to {}\n",
                out_dir.display()
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil(0), (1970, 1, 1));
        assert_eq!(civil(19_723), (2024, 1, 1));
        assert_eq!(civil(19_782), (2024, 2, 29));
    }

    #[test]
    fn refuses_to_overwrite_and_keys_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let root = generate_root("mesh", 10).unwrap();
        write_files(dir.path(), &root, false).unwrap();
        let mode = |n: &str| {
            std::fs::metadata(dir.path().join(n))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode("root-key.pem"), 0o600);
        assert_eq!(mode("root-cert.pem"), 0o644);
        let before = std::fs::read_to_string(dir.path().join("root-key.pem")).unwrap();
        let again = generate_root("mesh", 10).unwrap();
        assert!(matches!(
            write_files(dir.path(), &again, false),
            Err(CertsError::Exists(_))
        ));
        assert_eq!(
            std::fs::read_to_string(dir.path().join("root-key.pem")).unwrap(),
            before
        );
        write_files(dir.path(), &again, true).unwrap();
        assert_ne!(
            std::fs::read_to_string(dir.path().join("root-key.pem")).unwrap(),
            before
        );
    }

    #[test]
    fn rejects_bad_names() {
        let root = generate_root("mesh", 10).unwrap();
        assert!(matches!(
            generate_intermediate(
                root.get("root-cert.pem"),
                root.get("root-key.pem"),
                "Bad",
                1
            ),
            Err(CertsError::BadCluster(_))
        ));
        let ca =
            generate_intermediate(root.get("root-cert.pem"), root.get("root-key.pem"), "c1", 1)
                .unwrap();
        assert!(matches!(
            generate_workload(&ca, "spiffe://x/ns/a", &[], 1),
            Err(CertsError::BadSpiffe(_))
        ));
        let secret = cacerts_secret(&ca).unwrap();
        assert!(
            secret.contains("name: cacerts") && secret.contains("ca-key.pem: |"),
            "{secret}"
        );
    }
}
