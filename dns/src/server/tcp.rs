//! DNS over TCP (RFC 7766): one task per connection reads length-framed messages in order and
//! answers each through [`Handler::answer_message`] before reading the next, so a connection
//! holds one message at a time and pipelined queries are answered in order.
//!
//! Our own loop rather than hickory-server's `Server`, so that every message is counted as the
//! UDP path counts it: malformed ones too (hickory's server answers or drops those itself,
//! unseen by its handler).
//!
//! A connection closes when the client does, when no message starts within the idle timeout
//! (nor completes within it once started), once the server stops accepting (between two
//! messages), or at the termination deadline (wherever it is).

use std::net::SocketAddr;
use std::time::Duration;

use process_shell::Work;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::Handler;

/// After a failed `accept` (out of descriptors, say): wait before the next, not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(20);

/// Accept connections until `work.stop_accepting`; each runs on `work.in_flight`, which the
/// lifecycle waits for until the deadline, then ends with `work.force`.
pub async fn serve_tcp(listener: TcpListener, handler: Handler, idle: Duration, work: Work) {
    loop {
        let (stream, src) = tokio::select! {
            _ = work.stop_accepting.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    debug!(error = %e, "TCP accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let (stop, force) = (work.stop_accepting.clone(), work.force.clone());
        let handler = handler.clone();
        work.in_flight.spawn(async move {
            tokio::select! {
                _ = force.cancelled() => debug!(%src, "TCP connection ended at the termination deadline"),
                _ = connection(stream, src, handler, idle, stop) => {}
            }
        });
    }
}

async fn connection(
    mut stream: TcpStream,
    src: SocketAddr,
    handler: Handler,
    idle: Duration,
    stop: CancellationToken,
) {
    let mut message = Vec::new();
    loop {
        let len = tokio::select! {
            _ = stop.cancelled() => return,
            len = timeout(idle, stream.read_u16()) => match len {
                Ok(Ok(len)) => usize::from(len),
                Ok(Err(_)) => return, // closed or reset by the client
                Err(_) => {
                    debug!(%src, ?idle, "TCP connection idle: closed");
                    return;
                }
            },
        };
        message.resize(len, 0);
        match timeout(idle, stream.read_exact(&mut message)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                debug!(%src, error = %e, "TCP connection closed inside a message");
                return;
            }
            Err(_) => {
                debug!(%src, ?idle, "TCP message incomplete after the idle timeout: closed");
                return;
            }
        }
        let Some(reply) = handler.answer_message(&message, src) else {
            continue;
        };
        let Ok(reply_len) = u16::try_from(reply.len()) else {
            debug!(%src, len = reply.len(), "reply longer than a TCP frame: not sent");
            continue;
        };
        let mut framed = Vec::with_capacity(2 + reply.len());
        framed.extend_from_slice(&reply_len.to_be_bytes());
        framed.extend_from_slice(&reply);
        match timeout(idle, stream.write_all(&framed)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                debug!(%src, error = %e, "cannot send a TCP answer");
                return;
            }
            Err(_) => {
                debug!(%src, "TCP answer not taken within the idle timeout: closed");
                return;
            }
        }
    }
}
