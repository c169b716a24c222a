//! The real [`RemoteConnector`]: a kube client from a remote Secret's (validated) kubeconfig,
//! running the registry's Kubernetes source against the remote API server.
//!
//! `connect` returns the handle at once; the client is built and the watches run in a task. The
//! secrets state machine attaches the cluster only once the handle has synced, so a rotated
//! secret never leaves a gap. The source ends when its last handle is dropped (the cluster was
//! detached, or replaced by a newer client).

use std::sync::Arc;

use base64::Engine;
use registry::SnapshotHandle;
use registry::source::kube::{
    self as kube_source, KubeSource, KubeSourceConfig, Metrics as SourceMetrics,
};
use tracing::{info, warn};

use crate::kubeconfig::{Auth, ClientConfig};
use crate::secrets::{ConnectError, RemoteConnector};

/// What a remote cluster is read for: the kinds EDS needs (no Secrets, no ServiceEntries).
pub const REMOTE_KINDS: &[registry::objects::Kind] = KubeSourceConfig::GATEWAY_KINDS;

#[derive(Debug)]
pub struct KubeConnector {
    metrics: Arc<SourceMetrics>,
    namespaces: Vec<String>,
    tune: fn(&mut KubeSourceConfig),
}

impl KubeConnector {
    pub fn new(metrics: Arc<SourceMetrics>, namespaces: Vec<String>) -> KubeConnector {
        KubeConnector {
            metrics,
            namespaces,
            tune: |_| {},
        }
    }

    /// Adjust every remote source's timing (tests use short backoffs).
    pub fn with_tuning(mut self, tune: fn(&mut KubeSourceConfig)) -> KubeConnector {
        self.tune = tune;
        self
    }
}

impl RemoteConnector for KubeConnector {
    fn connect(
        &self,
        cluster_id: &str,
        client: &ClientConfig,
    ) -> Result<SnapshotHandle, ConnectError> {
        let kubeconfig = kube_kubeconfig(client)?;
        let (writer, handle) = registry::source::channel();
        let mut config = KubeSourceConfig::new(cluster_id, REMOTE_KINDS, self.namespaces.clone());
        (self.tune)(&mut config);
        let metrics = self.metrics.clone();
        let (cluster, server) = (cluster_id.to_string(), client.server.clone());
        tokio::spawn(async move {
            let origin = format!("the remote secret of cluster {cluster}");
            match kube_source::client_from_kubeconfig(kubeconfig, &origin).await {
                Ok(c) => {
                    info!(%cluster, %server, "watching remote cluster");
                    let (_stop, task) = KubeSource::start_with_writer(c, config, metrics, writer);
                    let _ = task.await;
                    info!(%cluster, %server, "stopped watching remote cluster");
                }
                // The handle never syncs: the cluster stays "syncing" and is not attached.
                Err(e) => {
                    warn!(%cluster, %server, error = %e, "cannot build a client for the remote cluster")
                }
            }
        });
        Ok(handle)
    }
}

/// The validated client config as a kube-rs kubeconfig (one cluster, user and context).
fn kube_kubeconfig(c: &ClientConfig) -> Result<kube::config::Kubeconfig, ConnectError> {
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let failed = |reason: String| ConnectError::Failed {
        server: c.server.clone(),
        reason,
    };
    let mut cluster = serde_json::json!({"server": c.server});
    if let Some(ca) = &c.ca_pem {
        cluster["certificate-authority-data"] = b64(ca).into();
    }
    if c.insecure_skip_tls_verify {
        cluster["insecure-skip-tls-verify"] = true.into();
    }
    if let Some(name) = &c.tls_server_name {
        cluster["tls-server-name"] = name.clone().into();
    }
    let user = match &c.auth {
        Auth::Token(t) => serde_json::json!({"token": t}),
        Auth::ClientCertificate { cert_pem, key_pem } => serde_json::json!({
            "client-certificate-data": b64(cert_pem), "client-key-data": b64(key_pem)}),
        Auth::Basic { username, password } => {
            serde_json::json!({"username": username, "password": password})
        }
        Auth::None => serde_json::json!({}),
        // Only reachable with --allow-kubeconfig-exec: the client runs the command for
        // credentials, as kubectl does.
        Auth::Exec { spec, .. } => serde_json::json!({"exec": spec}),
        Auth::AuthProvider { name } => {
            return Err(failed(format!(
                "auth-provider {name:?} (a deprecated kubectl plugin) is not supported; \
                 use a token or an exec credential"
            )));
        }
    };
    let mut context = serde_json::json!({"cluster": "remote", "user": "remote"});
    if let Some(ns) = &c.namespace {
        context["namespace"] = ns.clone().into();
    }
    let value = serde_json::json!({
        "apiVersion": "v1", "kind": "Config", "current-context": "remote",
        "clusters": [{"name": "remote", "cluster": cluster}],
        "users": [{"name": "remote", "user": user}],
        "contexts": [{"name": "remote", "context": context}],
    });
    serde_json::from_value(value).map_err(|e| failed(format!("kubeconfig: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_config_becomes_a_kube_kubeconfig() {
        let c = ClientConfig {
            context: "c".into(),
            server: "https://10.0.0.1:6443".into(),
            ca_pem: Some(b"-----BEGIN CERTIFICATE-----\n".to_vec()),
            tls_server_name: None,
            insecure_skip_tls_verify: false,
            namespace: None,
            auth: Auth::Token("t0k3n".into()),
        };
        let k = kube_kubeconfig(&c).unwrap();
        let cluster = k.clusters[0].cluster.as_ref().unwrap();
        assert_eq!(cluster.server.as_deref(), Some("https://10.0.0.1:6443"));
        assert!(cluster.certificate_authority_data.is_some());
        assert_eq!(k.current_context.as_deref(), Some("remote"));
        // Allowed by --allow-kubeconfig-exec: the exec block reaches the client unchanged.
        let exec = ClientConfig {
            auth: Auth::Exec {
                command: "aws".into(),
                spec: serde_json::json!({
                    "apiVersion": "client.authentication.k8s.io/v1beta1",
                    "command": "aws", "args": ["eks", "get-token"]}),
            },
            ..c.clone()
        };
        let k = kube_kubeconfig(&exec).unwrap();
        let user = k.auth_infos[0].auth_info.as_ref().unwrap();
        let e = user.exec.as_ref().expect("exec config");
        assert_eq!(e.command.as_deref(), Some("aws"));
        assert_eq!(
            e.args.as_deref(),
            Some(&["eks".to_string(), "get-token".to_string()][..])
        );
        let ap = ClientConfig {
            auth: Auth::AuthProvider { name: "gcp".into() },
            ..c
        };
        assert!(kube_kubeconfig(&ap).is_err());
    }
}
