//! Starting the configured source: the directory of `--config-dir`, else the Kubernetes API
//! (in-cluster credentials, `--kubeconfig`, or KUBECONFIG), watching only the kinds the binary
//! reads (its RBAC allows no more).

use std::sync::Arc;

use registry::SnapshotHandle;
use registry::objects::Kind;
use registry::source::dir::{DirError, watch_dir};
use registry::source::kube::{self as kube_source, KubeError, KubeSource, KubeSourceConfig};
use tokio::task::JoinHandle;
use tracing::info;

use crate::flags::SourceFlags;

pub use registry::source::kube::SecretSelector;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Dir(#[from] DirError),
    /// The cause follows in the error's source chain (as `anyhow` prints it).
    #[error("cannot start the Kubernetes API source (used without --config-dir)")]
    Kube(#[from] KubeError),
}

/// What the binary reads from the API.
#[derive(Clone, Debug)]
pub struct SourceSpec<'a> {
    /// The cluster's id: a metric label and the snapshot's `status.source`.
    pub cluster_id: &'a str,
    pub kinds: &'a [Kind],
    /// Secrets of one namespace and label (remote-secrets' kubeconfig Secrets).
    pub secrets: Option<SecretSelector>,
}

/// A started source; keep it for the process's lifetime and [`Source::shutdown`] it at the end.
pub struct Source {
    pub handle: SnapshotHandle,
    running: Running,
}

enum Running {
    Dir(JoinHandle<()>),
    Kube(KubeSource),
}

impl Source {
    /// Start it. `metrics` is called only for the Kubernetes API source (a directory source
    /// exports no API metrics).
    pub async fn start(
        flags: &SourceFlags,
        spec: SourceSpec<'_>,
        metrics: impl FnOnce() -> Arc<kube_source::Metrics>,
    ) -> Result<Source, SourceError> {
        if let Some(dir) = &flags.config_dir {
            let (handle, task) = watch_dir(dir.clone(), flags.config_poll).await?;
            return Ok(Source {
                handle,
                running: Running::Dir(task),
            });
        }
        let client = match &flags.kubeconfig {
            Some(path) => kube_source::client_from_kubeconfig_file(path).await?,
            None => kube_source::client_infer().await?,
        };
        let mut config =
            KubeSourceConfig::new(spec.cluster_id, spec.kinds, flags.watch_namespaces.clone());
        config.secrets = spec.secrets;
        info!(
            cluster = %spec.cluster_id,
            kinds = ?spec.kinds,
            namespaces = ?flags.watch_namespaces,
            "reading the cluster from the Kubernetes API"
        );
        let source = KubeSource::start(client, config, metrics());
        Ok(Source {
            handle: source.handle.clone(),
            running: Running::Kube(source),
        })
    }

    /// `dir:<path>` or `kubernetes`, for `/config_dump` and logs.
    pub fn describe(flags: &SourceFlags) -> String {
        match &flags.config_dir {
            Some(dir) => format!("dir:{}", dir.display()),
            None => "kubernetes".into(),
        }
    }

    /// Whether this source can become unhealthy (an API server that goes away; a directory
    /// source always reaches its directory).
    pub fn reports_health(&self) -> bool {
        matches!(self.running, Running::Kube(_))
    }

    pub async fn shutdown(self) {
        match self.running {
            Running::Dir(task) => task.abort(),
            Running::Kube(source) => source.shutdown().await,
        }
    }
}
