//! Copy bytes both ways between two TCP connections until both directions end, with an idle
//! timeout and live byte counters.
//!
//! Each direction starts as a plain copy: one `recv` into a per-thread scratch buffer and one
//! `send` of what it got, so a request or a response costs two system calls, as in nginx. A
//! short read means the socket is drained (unless the peer also closed), so the direction
//! goes straight back to waiting for the next readiness edge instead of probing with a read
//! that would only return EAGAIN. Only bytes the peer could not take yet are kept per
//! connection, so an idle connection holds no buffer at all.
//!
//! On Linux a direction that keeps filling the scratch buffer (bulk transfer) switches to
//! `splice(2)`: socket -> pipe -> socket, never through user space; its pipe is created then.
//! When one side finishes sending (EOF), the other side's write half is shut down and the
//! other direction carries on (half-close).
//!
//! We do this ourselves rather than through tokio's copy or tokio-splice2 because we need the
//! byte counts of a connection that ends by idle timeout, an activity clock, and readiness
//! handling that skips the EAGAIN probe.

use std::io;
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::Interest;
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

/// Copy until both directions end, an error, or `idle` passes with no byte either way. The
/// caller then closes both sockets: the last direction to end leaves passing on its FIN to
/// that close, which saves a `shutdown` per connection.
pub async fn copy_bidirectional(
    client: &TcpStream,
    server: &TcpStream,
    idle: Duration,
    transfer: &Transfer,
) -> io::Result<Ended> {
    let now = crate::balance::now_ms;
    transfer.last_activity.store(now(), Ordering::Relaxed);
    let one_ended = AtomicBool::new(false);
    let both = async {
        tokio::try_join!(
            one_way(
                client,
                server,
                &transfer.up,
                &transfer.last_activity,
                &one_ended
            ),
            one_way(
                server,
                client,
                &transfer.down,
                &transfer.last_activity,
                &one_ended
            ),
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

/// `from` sent its last byte: pass the half-close on to `to`. When the other direction has
/// already ended, both sockets are about to be closed (which sends the FIN), so skip the call.
fn end_of_stream(to: &TcpStream, one_ended: &AtomicBool) {
    if !one_ended.swap(true, Ordering::Relaxed) {
        // The peer may already be gone; the other direction will notice.
        let _ = socket2::SockRef::from(to).shutdown(Shutdown::Write);
    }
}

/// Consecutive full scratch-buffer reads after which a direction switches to splice.
#[cfg(target_os = "linux")]
const BULK_AFTER_FULL_READS: u32 = 4;

/// The per-thread buffer every copy reads into; 64 KiB, the most one read or splice moves.
const SCRATCH_LEN: usize = 64 * 1024;

thread_local! {
    static SCRATCH: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0u8; SCRATCH_LEN].into_boxed_slice());
}

/// What one read-and-forward step saw.
enum Step {
    Eof,
    /// Moved this many bytes from the reader (some may still wait in `pending`).
    Read {
        n: usize,
        full: bool,
    },
}

async fn one_way(
    from: &TcpStream,
    to: &TcpStream,
    count: &AtomicU64,
    activity: &AtomicU64,
    one_ended: &AtomicBool,
) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    let mut full_reads = 0u32;
    // Bytes read but not yet accepted by `to`; empty (no allocation) almost always.
    let mut pending: Vec<u8> = Vec::new();
    loop {
        #[cfg(target_os = "linux")]
        if full_reads >= BULK_AFTER_FULL_READS {
            return splice_one_way(from, to, count, activity, one_ended).await;
        }
        from.readable().await?;
        let step = SCRATCH.with_borrow_mut(|buf| copy_step(from, to, buf, &mut pending))?;
        match step {
            None => continue,
            Some(Step::Eof) => {
                end_of_stream(to, one_ended);
                return Ok(());
            }
            Some(Step::Read { n, full }) => {
                #[cfg(target_os = "linux")]
                {
                    full_reads = if full { full_reads + 1 } else { 0 };
                }
                #[cfg(not(target_os = "linux"))]
                let _ = full;
                // What `to` did not take yet waits here, in order, before the next read.
                let sent_now = n - pending.len();
                count.fetch_add(sent_now as u64, Ordering::Relaxed);
                let mut off = 0;
                while off < pending.len() {
                    to.writable().await?;
                    match to.try_write(&pending[off..]) {
                        Ok(w) => {
                            off += w;
                            count.fetch_add(w as u64, Ordering::Relaxed);
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Err(e),
                    }
                }
                // Do not keep a buffer on a connection that may now sit idle for hours.
                pending = Vec::new();
                activity.store(crate::balance::now_ms(), Ordering::Relaxed);
            }
        }
    }
}

/// One `recv` into `buf` and one `send` of what it got; the rest goes to `pending`.
/// `None` when there was nothing to read after all (readiness was stale).
fn copy_step(
    from: &TcpStream,
    to: &TcpStream,
    buf: &mut [u8],
    pending: &mut Vec<u8>,
) -> io::Result<Option<Step>> {
    use std::io::Read;
    let mut got = None;
    let read = from.try_io(Interest::READABLE, || {
        let n = (&*socket2::SockRef::from(from)).read(buf)?;
        got = Some(n);
        // A short read drained the socket: tell tokio so (by the WouldBlock it understands)
        // and wait for the next edge rather than paying for a read that returns EAGAIN.
        // Tokio clears readiness this way only if no new event arrived meanwhile, and never
        // clears "read closed", so a FIN that came with these bytes still wakes us for EOF.
        if n > 0 && n < buf.len() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(())
    });
    match read {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        Err(e) => return Err(e),
    }
    let Some(n) = got else { return Ok(None) };
    if n == 0 {
        return Ok(Some(Step::Eof));
    }
    let sent = match to.try_write(&buf[..n]) {
        Ok(w) => w,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
        Err(e) => return Err(e),
    };
    pending.extend_from_slice(&buf[sent..n]);
    Ok(Some(Step::Read {
        n,
        full: n == buf.len(),
    }))
}

/// Bulk: socket -> pipe -> socket with `splice(2)`. A short splice does not prove the socket
/// drained (the pipe may have run out of slots), so this side reads until EAGAIN.
#[cfg(target_os = "linux")]
async fn splice_one_way(
    from: &TcpStream,
    to: &TcpStream,
    count: &AtomicU64,
    activity: &AtomicU64,
    one_ended: &AtomicBool,
) -> io::Result<()> {
    use std::os::fd::AsRawFd;

    let pipe = Pipe::new()?;
    loop {
        from.readable().await?;
        let moved = from.try_io(Interest::READABLE, || pipe.splice_in(from.as_raw_fd()));
        let mut pending = match moved {
            Ok(0) => {
                end_of_stream(to, one_ended);
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
    const CHUNK: usize = SCRATCH_LEN;

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

    /// Copy, then close both sockets, as the proxy does when a connection ends.
    async fn pump(
        gw_client: TcpStream,
        gw_server: TcpStream,
        idle: Duration,
        transfer: &Transfer,
    ) -> io::Result<Ended> {
        copy_bidirectional(&gw_client, &gw_server, idle, transfer).await
    }

    #[tokio::test]
    async fn copies_both_ways_with_half_close() {
        let (mut client, gw_client) = pair().await;
        let (gw_server, mut server) = pair().await;
        let transfer = Transfer::default();
        let pump = pump(gw_client, gw_server, Duration::from_secs(10), &transfer);
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

    /// Small messages take the copy path, which waits for the next edge after a short read
    /// instead of reading until EAGAIN; a lost edge would stall this exchange.
    #[tokio::test]
    async fn many_small_exchanges_never_stall() {
        let (mut client, gw_client) = pair().await;
        let (gw_server, mut server) = pair().await;
        let transfer = Transfer::default();
        let pump = pump(gw_client, gw_server, Duration::from_secs(10), &transfer);
        let peers = async {
            let mut buf = [0u8; 100];
            for i in 0..2000u32 {
                let msg = [(i % 251) as u8; 100];
                client.write_all(&msg).await.unwrap();
                server.read_exact(&mut buf).await.unwrap();
                assert_eq!(buf, msg);
                server
                    .write_all(&msg[..(i % 100 + 1) as usize])
                    .await
                    .unwrap();
                let mut back = vec![0u8; (i % 100 + 1) as usize];
                client.read_exact(&mut back).await.unwrap();
            }
            drop(client);
            drop(server);
        };
        let (ended, ()) =
            tokio::time::timeout(Duration::from_secs(20), async { tokio::join!(pump, peers) })
                .await
                .expect("no stall");
        assert_eq!(ended.unwrap(), Ended::Closed);
        assert_eq!(transfer.up.load(Ordering::Relaxed), 200_000);
    }

    /// Bytes and FIN that arrive in one readiness event: the short read must not be taken as
    /// "drained, wait for the next edge", because none comes.
    #[tokio::test]
    async fn data_then_close_in_one_event_is_forwarded_with_the_close() {
        let (mut client, gw_client) = pair().await;
        let (gw_server, mut server) = pair().await;
        client.write_all(b"last words").await.unwrap();
        client.shutdown().await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let transfer = Transfer::default();
        let pump = pump(gw_client, gw_server, Duration::from_secs(10), &transfer);
        let peers = async {
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"last words");
            server.shutdown().await.unwrap();
        };
        let (ended, ()) =
            tokio::time::timeout(Duration::from_secs(5), async { tokio::join!(pump, peers) })
                .await
                .expect("the close was forwarded");
        assert_eq!(ended.unwrap(), Ended::Closed);
    }

    /// A receiver that does not read for a while: bytes the gateway read but could not send
    /// wait in order, and everything arrives intact, through the copy and the splice paths.
    #[tokio::test]
    async fn a_slow_reader_gets_every_byte_in_order() {
        let (mut client, gw_client) = pair().await;
        let (gw_server, mut server) = pair().await;
        let transfer = Transfer::default();
        let pump = pump(gw_client, gw_server, Duration::from_secs(10), &transfer);
        const LEN: usize = 3 << 20;
        let pattern = |i: usize| (i % 253) as u8;
        let send = async {
            let data: Vec<u8> = (0..LEN).map(pattern).collect();
            // Small writes first (copy path), then large ones (splice path).
            for chunk in data[..LEN / 2].chunks(1000) {
                client.write_all(chunk).await.unwrap();
            }
            client.write_all(&data[LEN / 2..]).await.unwrap();
            client.shutdown().await.unwrap();
        };
        let receive = async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let mut got = Vec::with_capacity(LEN);
            let mut buf = [0u8; 777];
            loop {
                let n = server.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            assert_eq!(got.len(), LEN);
            assert!(got.iter().enumerate().all(|(i, b)| *b == pattern(i)));
            server.shutdown().await.unwrap();
        };
        let (ended, (), ()) = tokio::time::timeout(Duration::from_secs(30), async {
            tokio::join!(pump, send, receive)
        })
        .await
        .expect("no stall");
        assert_eq!(ended.unwrap(), Ended::Closed);
        assert_eq!(transfer.up.load(Ordering::Relaxed), LEN as u64);
    }
}
