//! Datagrams in batches: one `recvmmsg` reads up to [`BATCH`] queries and one `sendmmsg` sends
//! their replies (Linux), on the nonblocking socket tokio drives. A busy server then pays two
//! system calls per batch instead of two per query, as knot does.
//!
//! [`Batch`] owns the buffers and the peers' addresses; the `mmsghdr`/`iovec` arrays that point
//! into them live only for the duration of one call, so nothing self-referential is kept
//! across an `.await`. A reply goes back to the address its query came from, as received.

#![allow(unsafe_code)] // the kernel interface (libc) this module wraps; each block says why it is sound

use std::io;
use std::mem;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::RawFd;
use std::ptr;

/// Datagrams per system call.
pub const BATCH: usize = 32;
/// Largest datagram read. Queries are small; anything longer is cut and then fails to decode.
pub const DATAGRAM: usize = 4096;

/// One batch of received datagrams and the replies to them.
pub struct Batch {
    buffers: Box<[u8]>,
    peers: Box<[libc::sockaddr_storage; BATCH]>,
    peer_lens: [libc::socklen_t; BATCH],
    lens: [usize; BATCH],
    received: usize,
    replies: Vec<Vec<u8>>,
    /// Datagrams (by index) that have a reply in `replies`, in order.
    pending: Vec<usize>,
}

impl Default for Batch {
    fn default() -> Self {
        Batch {
            buffers: vec![0; BATCH * DATAGRAM].into_boxed_slice(),
            // SAFETY: all-zero bytes are a valid `sockaddr_storage` (plain integers).
            peers: Box::new(unsafe { mem::zeroed() }),
            peer_lens: [0; BATCH],
            lens: [0; BATCH],
            received: 0,
            replies: (0..BATCH).map(|_| Vec::with_capacity(512)).collect(),
            pending: Vec::with_capacity(BATCH),
        }
    }
}

impl Batch {
    /// Read up to [`BATCH`] datagrams without blocking: the count, or `WouldBlock` when none
    /// was waiting. Replaces the previous batch.
    pub fn receive(&mut self, fd: RawFd) -> io::Result<usize> {
        self.received = 0;
        self.pending.clear();
        // SAFETY: zeroed `iovec`s and `mmsghdr`s are valid (null pointers, zero lengths); all
        // are filled in below before use.
        let mut iovecs: [libc::iovec; BATCH] = unsafe { mem::zeroed() };
        // SAFETY: as for the `iovec`s just above.
        let mut headers: [libc::mmsghdr; BATCH] = unsafe { mem::zeroed() };
        let buffers = self.buffers.as_mut_ptr();
        for (i, (iov, header)) in iovecs.iter_mut().zip(headers.iter_mut()).enumerate() {
            // In bounds: `buffers` holds BATCH * DATAGRAM bytes.
            iov.iov_base = buffers.wrapping_add(i * DATAGRAM).cast();
            iov.iov_len = DATAGRAM;
            header.msg_hdr.msg_name = ptr::from_mut(&mut self.peers[i]).cast();
            header.msg_hdr.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as u32;
            header.msg_hdr.msg_iov = iov;
            header.msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: every header points at a live buffer of DATAGRAM bytes and a live
        // `sockaddr_storage`, for the duration of the call; the kernel writes no further.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                headers.as_mut_ptr(),
                BATCH as u32,
                libc::MSG_DONTWAIT,
                ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        for (i, header) in headers.iter().enumerate().take(n) {
            self.lens[i] = (header.msg_len as usize).min(DATAGRAM);
            self.peer_lens[i] = header.msg_hdr.msg_namelen;
        }
        self.received = n;
        Ok(n)
    }

    /// Call `answer` on each received datagram with its sender; a `true` return means the
    /// reply it wrote into the `Vec` is to be sent. `None` for a sender that is not an IP
    /// address.
    pub fn answer_each(
        &mut self,
        mut answer: impl FnMut(&[u8], Option<SocketAddr>, &mut Vec<u8>) -> bool,
    ) {
        self.pending.clear();
        for i in 0..self.received {
            let start = i * DATAGRAM;
            let datagram = &self.buffers[start..start + self.lens[i]];
            let peer = socket_addr(&self.peers[i], self.peer_lens[i]);
            if answer(datagram, peer, &mut self.replies[i]) {
                self.pending.push(i);
            }
        }
    }

    /// Replies waiting to be sent.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// The address of the `k`th pending reply, for logs.
    pub fn pending_peer(&self, k: usize) -> Option<SocketAddr> {
        let i = *self.pending.get(k)?;
        socket_addr(&self.peers[i], self.peer_lens[i])
    }

    /// Send pending replies from the `from`th on, without blocking: how many went.
    pub fn send(&mut self, fd: RawFd, from: usize) -> io::Result<usize> {
        let todo = self.pending.get(from..).unwrap_or_default();
        if todo.is_empty() {
            return Ok(0);
        }
        // SAFETY: as in `receive`; filled in below before use.
        let mut iovecs: [libc::iovec; BATCH] = unsafe { mem::zeroed() };
        // SAFETY: as in `receive`.
        let mut headers: [libc::mmsghdr; BATCH] = unsafe { mem::zeroed() };
        for ((iov, header), &i) in iovecs.iter_mut().zip(headers.iter_mut()).zip(todo) {
            let reply = &self.replies[i];
            // The kernel only reads through these pointers.
            iov.iov_base = reply.as_ptr().cast_mut().cast();
            iov.iov_len = reply.len();
            header.msg_hdr.msg_name = ptr::from_mut(&mut self.peers[i]).cast();
            header.msg_hdr.msg_namelen = self.peer_lens[i];
            header.msg_hdr.msg_iov = iov;
            header.msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: the first `todo.len()` headers point at live replies and addresses for the
        // duration of the call.
        let n = unsafe {
            libc::sendmmsg(
                fd,
                headers.as_mut_ptr(),
                todo.len() as u32,
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

/// An IPv4 or IPv6 socket address as the kernel wrote it.
fn socket_addr(storage: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    let len = len as usize;
    match i32::from(storage.ss_family) {
        libc::AF_INET if len >= mem::size_of::<libc::sockaddr_in>() => {
            // SAFETY: the family says this storage holds a `sockaddr_in`, which it is large
            // and aligned enough for.
            let a = unsafe { &*ptr::from_ref(storage).cast::<libc::sockaddr_in>() };
            let ip = Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
            Some(SocketAddrV4::new(ip, u16::from_be(a.sin_port)).into())
        }
        libc::AF_INET6 if len >= mem::size_of::<libc::sockaddr_in6>() => {
            // SAFETY: as above, for `sockaddr_in6`.
            let a = unsafe { &*ptr::from_ref(storage).cast::<libc::sockaddr_in6>() };
            let ip = Ipv6Addr::from(a.sin6_addr.s6_addr);
            Some(
                SocketAddrV6::new(
                    ip,
                    u16::from_be(a.sin6_port),
                    a.sin6_flowinfo,
                    a.sin6_scope_id,
                )
                .into(),
            )
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;
    use std::time::Duration;

    use super::*;

    /// Several datagrams from two senders in one call each way; each reply reaches its sender.
    #[test]
    fn receives_and_answers_a_batch() {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        server.set_nonblocking(true).unwrap();
        let to = server.local_addr().unwrap();
        let clients: Vec<UdpSocket> = (0..2)
            .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
            .collect();
        for (k, c) in clients.iter().enumerate() {
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            for j in 0..3u8 {
                c.send_to(&[k as u8, j], to).unwrap();
            }
        }
        let mut batch = Batch::default();
        let mut got = Vec::new();
        // Bounded: loopback delivery is immediate, but do not spin forever if it is not.
        for _ in 0..1000 {
            match batch.receive(server.as_raw_fd()) {
                Ok(n) => {
                    batch.answer_each(|datagram, peer, reply| {
                        got.push((datagram.to_vec(), peer.unwrap()));
                        reply.clear();
                        reply.extend_from_slice(datagram);
                        reply.push(0xff);
                        true
                    });
                    assert_eq!(batch.pending(), n);
                    assert_eq!(batch.send(server.as_raw_fd(), 0).unwrap(), n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
            if got.len() == 6 {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(got.len(), 6);
        for (k, c) in clients.iter().enumerate() {
            let mine = got
                .iter()
                .filter(|(_, peer)| *peer == c.local_addr().unwrap());
            assert_eq!(mine.count(), 3);
            for j in 0..3u8 {
                let mut buf = [0u8; 16];
                let (n, from) = c.recv_from(&mut buf).unwrap();
                assert_eq!(from, to);
                assert_eq!(&buf[..n], &[k as u8, j, 0xff]);
            }
        }
        assert_eq!(
            batch.receive(server.as_raw_fd()).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
    }

    #[test]
    fn only_ip_addresses_are_read() {
        // SAFETY: all-zero bytes are a valid `sockaddr_storage`.
        let storage: libc::sockaddr_storage = unsafe { mem::zeroed() };
        assert_eq!(socket_addr(&storage, 0), None);
    }
}
