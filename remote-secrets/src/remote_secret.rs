//! `remote-secrets create-remote-secret`: the Secret that lets another cluster's control plane
//! watch this one, in the shape `istioctl create-remote-secret` writes (so either tool's output
//! works with either control plane).

use std::collections::BTreeMap;
use std::path::PathBuf;

use base64::Engine;
use serde::Serialize;

use crate::kubeconfig::{
    self, Auth, ClusterSpec, ContextSpec, Kubeconfig, KubeconfigError, NamedCluster, NamedContext,
    NamedUser, UserSpec,
};
use crate::secrets::MULTICLUSTER_LABEL;

pub const CLUSTER_ANNOTATION: &str = "networking.istio.io/cluster";

/// Print the remote Secret for this cluster.
///
/// Either from a kubeconfig context (--kubeconfig/--context), or from a service-account token,
/// CA and API server address (--server, --token-file, --ca-file).
#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct CreateRemoteSecretConfig {
    /// This cluster's id (a DNS-1123 label): the data key, and the Secret's name suffix.
    #[arg(long)]
    pub name: String,
    /// Kubeconfig to read (default: $KUBECONFIG).
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Context in the kubeconfig (default: its current context).
    #[arg(long)]
    pub context: Option<String>,
    /// API server URL (instead of a kubeconfig).
    #[arg(long, requires_all = ["token_file", "ca_file"])]
    pub server: Option<String>,
    /// File holding a service-account token.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// The API server's CA certificate (PEM).
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// Namespace of the Secret (where the other control plane reads Secrets).
    #[arg(long, default_value = "istio-system")]
    pub namespace: String,
    /// Copy an exec / auth-provider user as it is (the reader must allow it too).
    #[arg(long)]
    pub allow_kubeconfig_exec: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum RemoteSecretError {
    #[error("--name {0:?} is not a cluster id: lower-case letters, digits and '-', at most 63")]
    BadName(String),
    #[error("give --kubeconfig (or KUBECONFIG), or all of --server, --token-file and --ca-file")]
    NoSource,
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("kubeconfig {path}: {source}")]
    Kubeconfig {
        path: String,
        source: KubeconfigError,
    },
    #[error("cannot render YAML: {0}")]
    Yaml(String),
}

fn read(path: &PathBuf) -> Result<Vec<u8>, RemoteSecretError> {
    std::fs::read(path).map_err(|source| RemoteSecretError::Read {
        path: path.clone(),
        source,
    })
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The single-context kubeconfig the Secret carries.
pub fn remote_kubeconfig(c: &CreateRemoteSecretConfig) -> Result<Kubeconfig, RemoteSecretError> {
    let (server, ca, user) = match (&c.server, &c.token_file, &c.ca_file, &c.kubeconfig) {
        (Some(server), Some(token), Some(ca), _) => {
            let token = String::from_utf8_lossy(&read(token)?).trim().to_string();
            let user = UserSpec {
                token: Some(token),
                ..Default::default()
            };
            (server.clone(), Some(read(ca)?), user)
        }
        (None, _, _, Some(path)) => {
            let text = String::from_utf8_lossy(&read(path)?).into_owned();
            let err = |source| RemoteSecretError::Kubeconfig {
                path: path.display().to_string(),
                source,
            };
            let k = kubeconfig::parse(&text).map_err(err)?;
            let client =
                kubeconfig::client_config(&k, c.context.as_deref(), c.allow_kubeconfig_exec, true)
                    .map_err(err)?;
            let original = k
                .contexts
                .iter()
                .find(|x| x.name == client.context)
                .and_then(|x| k.users.iter().find(|u| u.name == x.context.user))
                .map(|u| u.user.clone())
                .unwrap_or_default();
            let user = match &client.auth {
                Auth::Token(t) => UserSpec {
                    token: Some(t.clone()),
                    ..Default::default()
                },
                Auth::ClientCertificate { cert_pem, key_pem } => UserSpec {
                    client_certificate_data: Some(b64(cert_pem)),
                    client_key_data: Some(b64(key_pem)),
                    ..Default::default()
                },
                Auth::Basic { username, password } => UserSpec {
                    username: Some(username.clone()),
                    password: Some(password.clone()),
                    ..Default::default()
                },
                Auth::Exec { .. } | Auth::AuthProvider { .. } => UserSpec {
                    exec: original.exec,
                    auth_provider: original.auth_provider,
                    ..Default::default()
                },
                Auth::None => UserSpec::default(),
            };
            (client.server, client.ca_pem, user)
        }
        _ => return Err(RemoteSecretError::NoSource),
    };
    let name = c.name.clone();
    Ok(Kubeconfig {
        api_version: Some("v1".into()),
        kind: Some("Config".into()),
        clusters: vec![NamedCluster {
            name: name.clone(),
            cluster: ClusterSpec {
                server,
                certificate_authority_data: ca.as_deref().map(b64),
                ..Default::default()
            },
        }],
        contexts: vec![NamedContext {
            name: name.clone(),
            context: ContextSpec {
                cluster: name.clone(),
                user: name.clone(),
                namespace: None,
            },
        }],
        users: vec![NamedUser {
            name: name.clone(),
            user,
        }],
        current_context: Some(name),
    })
}

#[derive(Serialize)]
struct Secret {
    #[serde(rename = "apiVersion")]
    api_version: &'static str,
    kind: &'static str,
    metadata: Metadata,
    #[serde(rename = "stringData")]
    string_data: BTreeMap<String, serde_saphyr::LitString>,
}

#[derive(Serialize)]
struct Metadata {
    name: String,
    namespace: String,
    labels: BTreeMap<&'static str, &'static str>,
    annotations: BTreeMap<&'static str, String>,
}

/// The Secret YAML.
pub fn render(c: &CreateRemoteSecretConfig) -> Result<String, RemoteSecretError> {
    if !registry::naming::is_dns1123_label(&c.name) {
        return Err(RemoteSecretError::BadName(c.name.clone()));
    }
    let kubeconfig = remote_kubeconfig(c)?;
    let text =
        serde_saphyr::to_string(&kubeconfig).map_err(|e| RemoteSecretError::Yaml(e.to_string()))?;
    let secret = Secret {
        api_version: "v1",
        kind: "Secret",
        metadata: Metadata {
            name: format!("istio-remote-secret-{}", c.name),
            namespace: c.namespace.clone(),
            labels: BTreeMap::from([(MULTICLUSTER_LABEL, "true")]),
            annotations: BTreeMap::from([(CLUSTER_ANNOTATION, c.name.clone())]),
        },
        string_data: BTreeMap::from([(c.name.clone(), serde_saphyr::LitString(text))]),
    };
    serde_saphyr::to_string(&secret).map_err(|e| RemoteSecretError::Yaml(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kubeconfig::tests::istioctl_kubeconfig;
    use crate::secrets::{Action, SecretsController};

    fn config(dir: &std::path::Path) -> CreateRemoteSecretConfig {
        CreateRemoteSecretConfig {
            name: "cluster-2".into(),
            kubeconfig: None,
            context: None,
            server: None,
            token_file: None,
            ca_file: None,
            namespace: "istio-system".into(),
            allow_kubeconfig_exec: false,
        }
        .with_dir(dir)
    }

    impl CreateRemoteSecretConfig {
        fn with_dir(mut self, dir: &std::path::Path) -> Self {
            let kc = dir.join("kubeconfig");
            std::fs::write(&kc, istioctl_kubeconfig("kind-c2", "https://10.0.0.2:6443")).unwrap();
            self.kubeconfig = Some(kc);
            self
        }
    }

    /// The output, read back as a Secret, is accepted by the secret controller.
    fn round_trip(yaml: &str) -> Box<crate::kubeconfig::ClientConfig> {
        let snapshot = registry::source::dir::snapshot_from_yaml(yaml);
        assert!(
            snapshot.status.errors.is_empty(),
            "{:?}",
            snapshot.status.errors
        );
        let secret = &snapshot.secrets
            [&registry::ServiceName::new("istio-system", "istio-remote-secret-cluster-2")];
        assert_eq!(secret.annotations[CLUSTER_ANNOTATION], "cluster-2");
        let mut c = SecretsController::new("istio-system", "cluster-1", false);
        match c.reconcile(&snapshot.secrets).pop() {
            Some(Action::Start {
                cluster, client, ..
            }) if cluster == "cluster-2" => client,
            other => panic!("not accepted: {other:?} {:?}", c.status()),
        }
    }

    #[test]
    fn from_kubeconfig_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let yaml = render(&config(dir.path())).unwrap();
        assert!(
            yaml.contains("istio/multiCluster: \"true\"")
                || yaml.contains("istio/multiCluster: 'true'"),
            "{yaml}"
        );
        let client = round_trip(&yaml);
        assert_eq!(client.server, "https://10.0.0.2:6443");
        assert_eq!(client.auth, Auth::Token("eyJhbGciOi.secret".into()));
        assert!(client.ca_pem.is_some());
    }

    #[test]
    fn from_token_ca_and_server() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), "tok\n").unwrap();
        std::fs::write(dir.path().join("ca.pem"), "-----BEGIN CERTIFICATE-----\n").unwrap();
        let mut c = config(dir.path());
        c.kubeconfig = None;
        c.server = Some("https://api.c2:6443".into());
        c.token_file = Some(dir.path().join("token"));
        c.ca_file = Some(dir.path().join("ca.pem"));
        let client = round_trip(&render(&c).unwrap());
        assert_eq!(client.server, "https://api.c2:6443");
        assert_eq!(client.auth, Auth::Token("tok".into()));
        assert_eq!(
            client.ca_pem.as_deref(),
            Some(&b"-----BEGIN CERTIFICATE-----\n"[..])
        );
    }

    #[test]
    fn rejects_bad_names_and_missing_sources() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config(dir.path());
        c.name = "Cluster_2".into();
        assert!(matches!(render(&c), Err(RemoteSecretError::BadName(_))));
        c.name = "cluster-2".into();
        c.kubeconfig = None;
        assert!(matches!(render(&c), Err(RemoteSecretError::NoSource)));
    }
}
