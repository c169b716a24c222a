//! The echo "pod": mutual TLS (client verified against the shared root), greets with its pod
//! name and cluster, then echoes every byte until the client closes.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// The greeting line: `pod=<name> cluster=<id>\n`.
pub fn greeting(pod: &str, cluster: &str) -> String {
    format!("pod={pod} cluster={cluster}\n")
}

/// Serve until the listener fails.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    pod: String,
    cluster: String,
) -> std::io::Result<()> {
    let acceptor = TlsAcceptor::from(tls);
    let hello = Arc::new(greeting(&pod, &cluster));
    loop {
        let (tcp, peer) = listener.accept().await?;
        let acceptor = acceptor.clone();
        let hello = hello.clone();
        tokio::spawn(async move {
            let mut tls = match acceptor.accept(tcp).await {
                Ok(t) => t,
                Err(e) => {
                    tracing::info!(%peer, error = %e, "TLS handshake refused");
                    return;
                }
            };
            if tls.write_all(hello.as_bytes()).await.is_err() || tls.flush().await.is_err() {
                return;
            }
            let mut buf = [0u8; 4096];
            while let Ok(n) = tls.read(&mut buf).await {
                if n == 0 || tls.write_all(&buf[..n]).await.is_err() || tls.flush().await.is_err() {
                    break;
                }
            }
            let _ = tls.shutdown().await;
        });
    }
}
