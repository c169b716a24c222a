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

#![allow(unsafe_code)] // the kernel interface (libc) this module wraps; each block says why it is sound

use std::io;
use std::net::Shutdown;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
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
///
/// Written as one poll function over two small [`Direction`] states rather than two async
/// loops: every open connection keeps this future, and awaiting readiness futures would cost
/// each connection about a kilobyte more (tokio keeps the wakers of `poll_*_ready` in the
/// socket's own registration instead).
pub async fn copy_bidirectional(
    client: &TcpStream,
    server: &TcpStream,
    idle: Duration,
    transfer: &Transfer,
) -> io::Result<Ended> {
    transfer
        .last_activity
        .store(crate::clock::now_ms(), Ordering::Relaxed);
    let mut up = Direction::default();
    let mut down = Direction::default();
    let timer = tokio::time::sleep(idle);
    tokio::pin!(timer);
    std::future::poll_fn(|cx| {
        if !up.done
            && let Poll::Ready(r) = up.poll(cx, client, server, &transfer.up, transfer)
        {
            r?;
            up.done = true;
            if !down.done {
                half_close(server);
            }
        }
        if !down.done
            && let Poll::Ready(r) = down.poll(cx, server, client, &transfer.down, transfer)
        {
            r?;
            down.done = true;
            if !up.done {
                half_close(client);
            }
        }
        if up.done && down.done {
            return Poll::Ready(Ok(Ended::Closed));
        }
        while timer.as_mut().poll(cx).is_ready() {
            let since = crate::clock::now_ms()
                .saturating_sub(transfer.last_activity.load(Ordering::Relaxed));
            let left = idle.saturating_sub(Duration::from_millis(since));
            if left.is_zero() {
                return Poll::Ready(Ok(Ended::IdleTimeout));
            }
            timer.as_mut().reset(tokio::time::Instant::now() + left);
        }
        Poll::Pending
    })
    .await
}

/// `from` sent its last byte while the other direction goes on: pass the half-close on.
fn half_close(to: &TcpStream) {
    // The peer may already be gone; the other direction will notice.
    let _ = socket2::SockRef::from(to).shutdown(Shutdown::Write);
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

/// One direction's state: a few words while idle.
#[derive(Default)]
struct Direction {
    /// Bytes read but not yet accepted by the writer; empty (no allocation) almost always.
    pending: Vec<u8>,
    /// How much of `pending` was written.
    written: usize,
    /// Full scratch-buffer reads in a row.
    #[cfg(target_os = "linux")]
    full_reads: u32,
    /// Bulk mode, once the direction kept filling the scratch buffer.
    #[cfg(target_os = "linux")]
    splice: Option<SpliceState>,
    done: bool,
}

#[cfg(target_os = "linux")]
struct SpliceState {
    pipe: Pipe,
    /// Bytes in the pipe, not yet spliced out.
    in_pipe: usize,
}

impl Direction {
    /// Move bytes until `from` is drained (Pending) or has ended (Ready(Ok)).
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        from: &TcpStream,
        to: &TcpStream,
        count: &AtomicU64,
        transfer: &Transfer,
    ) -> Poll<io::Result<()>> {
        let moved = |n: usize| {
            count.fetch_add(n as u64, Ordering::Relaxed);
            transfer
                .last_activity
                .store(crate::clock::now_ms(), Ordering::Relaxed);
        };
        loop {
            // What `to` did not take yet goes first, in order.
            while self.written < self.pending.len() {
                ready!(to.poll_write_ready(cx))?;
                match to.try_write(&self.pending[self.written..]) {
                    Ok(n) => {
                        self.written += n;
                        moved(n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Poll::Ready(Err(e)),
                }
            }
            if self.pending.capacity() > 0 {
                // Do not keep a buffer on a connection that may now sit idle for hours.
                self.pending = Vec::new();
                self.written = 0;
            }
            #[cfg(target_os = "linux")]
            if self.full_reads >= BULK_AFTER_FULL_READS {
                return self.poll_splice(cx, from, to, &moved);
            }
            ready!(from.poll_read_ready(cx))?;
            let step =
                SCRATCH.with_borrow_mut(|buf| copy_step(from, to, buf, &mut self.pending))?;
            match step {
                None => {}
                Some(Step::Eof) => return Poll::Ready(Ok(())),
                Some(Step::Read { n, full }) => {
                    #[cfg(target_os = "linux")]
                    {
                        self.full_reads = if full { self.full_reads + 1 } else { 0 };
                    }
                    #[cfg(not(target_os = "linux"))]
                    let _ = full;
                    moved(n - self.pending.len());
                }
            }
        }
    }

    /// Bulk: socket -> pipe -> socket with `splice(2)`. A short splice does not prove the
    /// socket drained (the pipe may have run out of slots), so this side reads until EAGAIN.
    #[cfg(target_os = "linux")]
    fn poll_splice(
        &mut self,
        cx: &mut Context<'_>,
        from: &TcpStream,
        to: &TcpStream,
        moved: &dyn Fn(usize),
    ) -> Poll<io::Result<()>> {
        use std::os::fd::AsRawFd;
        if self.splice.is_none() {
            self.splice = Some(SpliceState {
                pipe: Pipe::new()?,
                in_pipe: 0,
            });
        }
        let state = self.splice.as_mut().expect("created above");
        loop {
            if state.in_pipe > 0 {
                ready!(to.poll_write_ready(cx))?;
                match to.try_io(Interest::WRITABLE, || {
                    state.pipe.splice_out(to.as_raw_fd(), state.in_pipe)
                }) {
                    Ok(n) => {
                        state.in_pipe -= n;
                        moved(n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Poll::Ready(Err(e)),
                }
                continue;
            }
            ready!(from.poll_read_ready(cx))?;
            match from.try_io(Interest::READABLE, || {
                state.pipe.splice_in(from.as_raw_fd())
            }) {
                Ok(0) => return Poll::Ready(Ok(())),
                Ok(n) => state.in_pipe = n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

/// What one read-and-forward step saw.
enum Step {
    Eof,
    /// Read this many bytes (those `to` did not take are in `pending`).
    Read {
        n: usize,
        full: bool,
    },
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
