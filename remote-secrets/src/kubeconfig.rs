//! Kubeconfig files, as `kubectl` and `istioctl create-remote-secret` write them: parsed with
//! serde, then reduced to the one context we use and validated.
//!
//! Unknown fields are accepted (kubeconfigs carry extensions). A kubeconfig that runs a command
//! (`exec`) or an `auth-provider` plugin is refused unless explicitly allowed. Inside a Secret,
//! references to files on disk are refused: they would name files of whoever reads the Secret.

use base64::Engine;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Kubeconfig {
    #[serde(
        default,
        rename = "apiVersion",
        skip_serializing_if = "Option::is_none"
    )]
    pub api_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default)]
    pub clusters: Vec<NamedCluster>,
    #[serde(default)]
    pub contexts: Vec<NamedContext>,
    #[serde(default)]
    pub users: Vec<NamedUser>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_context: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct NamedCluster {
    pub name: String,
    pub cluster: ClusterSpec,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ClusterSpec {
    #[serde(default)]
    pub server: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_authority_data: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_authority: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub insecure_skip_tls_verify: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_server_name: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct NamedContext {
    pub name: String,
    pub context: ContextSpec,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct ContextSpec {
    pub cluster: String,
    pub user: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct NamedUser {
    pub name: String,
    pub user: UserSpec,
}

#[derive(Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct UserSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_certificate_data: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_key_data: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_certificate: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_provider: Option<serde_json::Value>,
}

impl std::fmt::Debug for UserSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserSpec")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field(
                "client_certificate_data",
                &self.client_certificate_data.is_some(),
            )
            .field("exec", &self.exec.is_some())
            .field("auth_provider", &self.auth_provider.is_some())
            .finish_non_exhaustive()
    }
}

/// How the client authenticates.
#[derive(Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Auth {
    Token(#[serde(skip)] String),
    ClientCertificate {
        #[serde(skip)]
        cert_pem: Vec<u8>,
        #[serde(skip)]
        key_pem: Vec<u8>,
    },
    Basic {
        username: String,
        #[serde(skip)]
        password: String,
    },
    /// Allowed only with `--allow-kubeconfig-exec`. `spec` is the kubeconfig's `exec` block,
    /// handed to the Kubernetes client as it is.
    Exec {
        command: String,
        #[serde(skip)]
        spec: serde_json::Value,
    },
    /// Allowed only with `--allow-kubeconfig-exec`.
    AuthProvider {
        name: String,
    },
    None,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::Token(_) => f.write_str("Token(<redacted>)"),
            Auth::ClientCertificate { .. } => f.write_str("ClientCertificate(<redacted>)"),
            Auth::Basic { username, .. } => write!(f, "Basic({username}, <redacted>)"),
            Auth::Exec { command, .. } => write!(f, "Exec({command})"),
            Auth::AuthProvider { name } => write!(f, "AuthProvider({name})"),
            Auth::None => f.write_str("None"),
        }
    }
}

/// What a client needs to reach one API server: the validated form of a kubeconfig.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ClientConfig {
    pub context: String,
    pub server: String,
    #[serde(skip)]
    pub ca_pem: Option<Vec<u8>>,
    pub tls_server_name: Option<String>,
    pub insecure_skip_tls_verify: bool,
    pub namespace: Option<String>,
    pub auth: Auth,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KubeconfigError {
    #[error("not a kubeconfig (YAML with clusters, contexts and users): {0}")]
    Parse(String),
    #[error("no context to use: set current-context or name one")]
    NoCurrentContext,
    #[error("context {0:?} is not in the kubeconfig")]
    NoContext(String),
    #[error("context {context:?} names cluster {cluster:?}, which is not in the kubeconfig")]
    NoCluster { context: String, cluster: String },
    #[error("context {context:?} names user {user:?}, which is not in the kubeconfig")]
    NoUser { context: String, user: String },
    #[error("cluster {0:?} has no https:// server URL")]
    BadServer(String),
    #[error("{field} is not valid base64")]
    BadBase64 { field: &'static str },
    #[error(
        "user {user:?} runs a command ({what}); refused: such kubeconfigs execute programs on the \
         control plane. Use a service-account token, or pass --allow-kubeconfig-exec"
    )]
    ExecRefused { user: String, what: String },
    #[error(
        "{field} refers to a file on disk ({path}); embed the data instead ({field}-data / token)"
    )]
    FileReference { field: &'static str, path: String },
    #[error("user {0:?} has a client certificate without its key (or a key without certificate)")]
    HalfClientCertificate(String),
}

pub fn parse(text: &str) -> Result<Kubeconfig, KubeconfigError> {
    serde_saphyr::from_str(text).map_err(|e| KubeconfigError::Parse(e.to_string()))
}

fn b64(field: &'static str, s: &str) -> Result<Vec<u8>, KubeconfigError> {
    let clean: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    base64::engine::general_purpose::STANDARD
        .decode(clean)
        .map_err(|_| KubeconfigError::BadBase64 { field })
}

/// Reduce a kubeconfig to the client config of `context` (default: its current context).
/// `allow_files` permits on-disk references (a kubeconfig read by `create-remote-secret`).
pub fn client_config(
    k: &Kubeconfig,
    context: Option<&str>,
    allow_exec: bool,
    allow_files: bool,
) -> Result<ClientConfig, KubeconfigError> {
    let name = context
        .map(str::to_string)
        .or_else(|| k.current_context.clone().filter(|c| !c.is_empty()))
        .or_else(|| (k.contexts.len() == 1).then(|| k.contexts[0].name.clone()))
        .ok_or(KubeconfigError::NoCurrentContext)?;
    let ctx = k
        .contexts
        .iter()
        .find(|c| c.name == name)
        .ok_or_else(|| KubeconfigError::NoContext(name.clone()))?;
    let cluster = k
        .clusters
        .iter()
        .find(|c| c.name == ctx.context.cluster)
        .ok_or_else(|| KubeconfigError::NoCluster {
            context: name.clone(),
            cluster: ctx.context.cluster.clone(),
        })?;
    let user = k
        .users
        .iter()
        .find(|u| u.name == ctx.context.user)
        .ok_or_else(|| KubeconfigError::NoUser {
            context: name.clone(),
            user: ctx.context.user.clone(),
        })?;
    let server = cluster.cluster.server.trim();
    if !server.starts_with("https://") && !server.starts_with("http://") {
        return Err(KubeconfigError::BadServer(cluster.name.clone()));
    }
    let file = |field: &'static str, v: &Option<String>| match v {
        Some(path) if !allow_files => Err(KubeconfigError::FileReference {
            field,
            path: path.clone(),
        }),
        _ => Ok(()),
    };
    file(
        "certificate-authority",
        &cluster.cluster.certificate_authority,
    )?;
    let ca_pem = match (
        &cluster.cluster.certificate_authority_data,
        &cluster.cluster.certificate_authority,
    ) {
        (Some(d), _) => Some(b64("certificate-authority-data", d)?),
        (None, Some(path)) => std::fs::read(path).ok(),
        (None, None) => None,
    };
    let u = &user.user;
    let refused = |what: String| KubeconfigError::ExecRefused {
        user: user.name.clone(),
        what,
    };
    let auth = if let Some(exec) = &u.exec {
        let command = exec
            .get("command")
            .and_then(|c| c.as_str())
            .unwrap_or("?")
            .to_string();
        if !allow_exec {
            return Err(refused(format!("exec: {command}")));
        }
        Auth::Exec {
            command,
            spec: exec.clone(),
        }
    } else if let Some(p) = &u.auth_provider {
        let name = p
            .get("name")
            .and_then(|c| c.as_str())
            .unwrap_or("?")
            .to_string();
        if !allow_exec {
            return Err(refused(format!("auth-provider: {name}")));
        }
        Auth::AuthProvider { name }
    } else if let Some(t) = &u.token {
        Auth::Token(t.clone())
    } else if let Some(path) = &u.token_file {
        file("token-file", &u.token_file)?;
        Auth::Token(
            std::fs::read_to_string(path)
                .unwrap_or_default()
                .trim()
                .to_string(),
        )
    } else if u.client_certificate_data.is_some() || u.client_key_data.is_some() {
        match (&u.client_certificate_data, &u.client_key_data) {
            (Some(c), Some(k)) => Auth::ClientCertificate {
                cert_pem: b64("client-certificate-data", c)?,
                key_pem: b64("client-key-data", k)?,
            },
            _ => return Err(KubeconfigError::HalfClientCertificate(user.name.clone())),
        }
    } else if u.client_certificate.is_some() || u.client_key.is_some() {
        file("client-certificate", &u.client_certificate)?;
        file("client-key", &u.client_key)?;
        match (&u.client_certificate, &u.client_key) {
            (Some(c), Some(k)) => Auth::ClientCertificate {
                cert_pem: std::fs::read(c).unwrap_or_default(),
                key_pem: std::fs::read(k).unwrap_or_default(),
            },
            _ => return Err(KubeconfigError::HalfClientCertificate(user.name.clone())),
        }
    } else if let (Some(user), Some(pass)) = (&u.username, &u.password) {
        Auth::Basic {
            username: user.clone(),
            password: pass.clone(),
        }
    } else {
        Auth::None
    };
    Ok(ClientConfig {
        context: name,
        server: server.to_string(),
        ca_pem,
        tls_server_name: cluster.cluster.tls_server_name.clone(),
        insecure_skip_tls_verify: cluster.cluster.insecure_skip_tls_verify.unwrap_or(false),
        namespace: ctx.context.namespace.clone(),
        auth,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A kubeconfig as `istioctl create-remote-secret` writes it.
    pub(crate) fn istioctl_kubeconfig(cluster: &str, server: &str) -> String {
        format!(
            r#"apiVersion: v1
clusters:
- cluster:
    certificate-authority-data: LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCg==
    server: {server}
  name: {cluster}
contexts:
- context:
    cluster: {cluster}
    user: {cluster}
  name: {cluster}
current-context: {cluster}
kind: Config
preferences: {{}}
users:
- name: {cluster}
  user:
    token: eyJhbGciOi.secret
"#
        )
    }

    #[test]
    fn istioctl_format_parses() {
        let k = parse(&istioctl_kubeconfig("cluster-2", "https://10.0.0.2:6443")).unwrap();
        let c = client_config(&k, None, false, false).unwrap();
        assert_eq!(c.server, "https://10.0.0.2:6443");
        assert_eq!(
            c.ca_pem.as_deref(),
            Some(&b"-----BEGIN CERTIFICATE-----\n"[..])
        );
        assert_eq!(c.auth, Auth::Token("eyJhbGciOi.secret".into()));
        assert!(
            !format!("{c:?}").contains("secret"),
            "tokens never reach logs"
        );
    }

    #[test]
    fn exec_and_auth_provider_refused_unless_allowed() {
        let exec = istioctl_kubeconfig("c", "https://h").replace(
            "    token: eyJhbGciOi.secret\n",
            "    exec:\n      command: aws\n      args: [eks, get-token]\n",
        );
        let k = parse(&exec).unwrap();
        let e = client_config(&k, None, false, false).unwrap_err();
        assert!(matches!(e, KubeconfigError::ExecRefused { .. }), "{e}");
        assert_eq!(
            client_config(&k, None, true, false).unwrap().auth,
            Auth::Exec {
                command: "aws".into(),
                spec: serde_json::json!({"command": "aws", "args": ["eks", "get-token"]}),
            }
        );
        let ap = istioctl_kubeconfig("c", "https://h").replace(
            "    token: eyJhbGciOi.secret\n",
            "    auth-provider:\n      name: gcp\n",
        );
        let e = client_config(&parse(&ap).unwrap(), None, false, false).unwrap_err();
        assert!(e.to_string().contains("auth-provider: gcp"), "{e}");
    }

    #[test]
    fn malformed_kubeconfigs_are_explained() {
        assert!(matches!(
            parse("clusters: 7"),
            Err(KubeconfigError::Parse(_))
        ));
        let k = parse(&istioctl_kubeconfig("c", "https://h")).unwrap();
        assert_eq!(
            client_config(&k, Some("other"), false, false).unwrap_err(),
            KubeconfigError::NoContext("other".into())
        );
        let no_server = parse(&istioctl_kubeconfig("c", "10.0.0.1")).unwrap();
        assert!(matches!(
            client_config(&no_server, None, false, false),
            Err(KubeconfigError::BadServer(_))
        ));
        let files = istioctl_kubeconfig("c", "https://h").replace(
            "    certificate-authority-data: LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCg==\n",
            "    certificate-authority: /etc/ca.pem\n",
        );
        assert!(matches!(
            client_config(&parse(&files).unwrap(), None, false, false),
            Err(KubeconfigError::FileReference { .. })
        ));
    }
}
