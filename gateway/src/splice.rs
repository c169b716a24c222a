//! Copy bytes both ways between two TCP connections until both directions end, with an idle
//! timeout and live byte counters.
//!
//! On Linux the bytes move socket -> pipe -> socket with `splice(2)`, never through user space.
//! Each direction creates its pipe only when its first byte arrives, so an idle connection
//! costs two sockets and a small task. When one side finishes sending (EOF), the other side's
//! write half is shut down and the other direction carries on (half-close).
//!
//! We do this ourselves rather than through tokio-splice2 because we need the byte counts of
//! a connection that ends by idle timeout and an activity clock, which it does not expose.

use std::io;
use std::net::Shutdown;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::TcpStream;

/// Bytes moved so far, readable while the copy runs.
#[derive(Debug, Default)]
pub struct Transfer {
    /// Client to server.
    pub up: AtomicU64,
    /// Server to client.
    pub down: AtomicU64,
    /// Milliseconds (gateway clock) of the last byte moved either way.
    last_activity: AtomicU64,
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Ended {
    /// Both sides closed their sending half.
    Closed,
    IdleTimeout,
}

/// Copy until both directions end, an error, or `idle` passes with no byte either way.
pub async fn copy_bidirectional(
    client: &TcpStream,
    server: &TcpStream,
    idle: Duration,
    transfer: &Transfer,
) -> io::Result<Ended> {
    let now = crate::balance::now_ms;
    transfer.last_activity.store(now(), Ordering::Relaxed);
    let both = async {
        tokio::try_join!(
            one_way(client, server, &transfer.up, &transfer.last_activity),
            one_way(server, client, &transfer.down, &transfer.last_activity),
        )
    };
    tokio::pin!(both);
    let idle_ms = idle.as_millis() as u64;
    loop {
        let since = now().saturating_sub(transfer.last_activity.load(Ordering::Relaxed));
        let wait = Duration::from_millis(idle_ms.saturating_sub(since).max(1));
        tokio::select! {
            r = &mut both => return r.map(|_| Ended::Closed),
            _ = tokio::time::sleep(wait) => {
                let since = now().saturating_sub(transfer.last_activity.load(Ordering::Relaxed));
                if since >= idle_ms {
                    return Ok(Ended::IdleTimeout);
                }
            }
        }
    }
}

fn shutdown_write(s: &TcpStream) {
    // The peer may already be gone; the other direction will notice.
    let _ = socket2::SockRef::from(s).shutdown(Shutdown::Write);
}

#[cfg(target_os = "linux")]
async fn one_way(
    from: &TcpStream,
    to: &TcpStream,
    count: &AtomicU64,
    activity: &AtomicU64,
) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    use tokio::io::Interest;

    let mut pipe: Option<Pipe> = None;
    loop {
        from.readable().await?;
        if pipe.is_none() {
            pipe = Some(Pipe::new()?);
        }
        let pipe = pipe.as_ref().expect("created above");
        let moved = from.try_io(Interest::READABLE, || pipe.splice_in(from.as_raw_fd()));
        let mut pending = match moved {
            Ok(0) => {
                shutdown_write(to);
                return Ok(());
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        while pending > 0 {
            to.writable().await?;
            match to.try_io(Interest::WRITABLE, || {
                pipe.splice_out(to.as_raw_fd(), pending)
            }) {
                Ok(n) => {
                    pending -= n;
                    count.fetch_add(n as u64, Ordering::Relaxed);
                    activity.store(crate::balance::now_ms(), Ordering::Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// A non-blocking pipe used as the in-kernel buffer of one direction.
#[cfg(target_os = "linux")]
struct Pipe {
    read: std::os::fd::OwnedFd,
    write: std::os::fd::OwnedFd,
}

#[cfg(target_os = "linux")]
impl Pipe {
    /// The most one splice moves; the pipe's default capacity.
    const CHUNK: usize = 64 * 1024;

    fn new() -> io::Result<Pipe> {
        use std::os::fd::FromRawFd;
        let mut fds = [0; 2];
        // SAFETY: `fds` is a valid two-int buffer; on success both fds are new and ours.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
        unsafe {
            Ok(Pipe {
                read: std::os::fd::OwnedFd::from_raw_fd(fds[0]),
                write: std::os::fd::OwnedFd::from_raw_fd(fds[1]),
            })
        }
    }

    fn splice_in(&self, socket: std::os::fd::RawFd) -> io::Result<usize> {
        use std::os::fd::AsRawFd;
        splice(socket, self.write.as_raw_fd(), Self::CHUNK)
    }

    fn splice_out(&self, socket: std::os::fd::RawFd, len: usize) -> io::Result<usize> {
        use std::os::fd::AsRawFd;
        splice(self.read.as_raw_fd(), socket, len)
    }
}

#[cfg(target_os = "linux")]
fn splice(from: std::os::fd::RawFd, to: std::os::fd::RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: both descriptors are open for the duration of the call; null offsets are allowed
    // for pipes and sockets.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Elsewhere: a plain user-space copy through a small buffer.
#[cfg(not(target_os = "linux"))]
async fn one_way(
    from: &TcpStream,
    to: &TcpStream,
    count: &AtomicU64,
    activity: &AtomicU64,
) -> io::Result<()> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        from.readable().await?;
        let n = match from.try_read(&mut buf) {
            Ok(0) => {
                shutdown_write(to);
                return Ok(());
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        let mut off = 0;
        while off < n {
            to.writable().await?;
            match to.try_write(&buf[off..n]) {
                Ok(w) => off += w,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        count.fetch_add(n as u64, Ordering::Relaxed);
        activity.store(crate::balance::now_ms(), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// (client-side stream, gateway's client-facing stream)
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    #[tokio::test]
    async fn copies_both_ways_with_half_close() {
        let (mut client, gw_client) = pair().await;
        let (gw_server, mut server) = pair().await;
        let transfer = Transfer::default();
        let pump = copy_bidirectional(&gw_client, &gw_server, Duration::from_secs(10), &transfer);
        let peers = async {
            let big = vec![7u8; 1 << 20];
            client.write_all(&big).await.unwrap();
            client.shutdown().await.unwrap();
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap();
            assert_eq!(got.len(), 1 << 20);
            // The server still answers after the client's half-close.
            server.write_all(b"answer").await.unwrap();
            server.shutdown().await.unwrap();
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            assert_eq!(back, b"answer");
        };
        let (ended, ()) = tokio::join!(pump, peers);
        assert_eq!(ended.unwrap(), Ended::Closed);
        assert_eq!(transfer.up.load(Ordering::Relaxed), 1 << 20);
        assert_eq!(transfer.down.load(Ordering::Relaxed), 6);
    }

    #[tokio::test]
    async fn idle_connections_time_out() {
        let (mut client, gw_client) = pair().await;
        let (gw_server, _server) = pair().await;
        let transfer = Transfer::default();
        client.write_all(b"x").await.unwrap();
        let ended = copy_bidirectional(
            &gw_client,
            &gw_server,
            Duration::from_millis(100),
            &transfer,
        )
        .await
        .unwrap();
        assert_eq!(ended, Ended::IdleTimeout);
        assert_eq!(transfer.up.load(Ordering::Relaxed), 1);
    }
}
