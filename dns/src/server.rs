//! The sockets, around the pure [`crate::respond`] decision.
//!
//! - UDP is our own receive loop (one per core, each on its own SO_REUSEPORT socket), reading
//!   and sending batches of datagrams with one system call each ([`mmsg`]). A plain query is answered from the bytes
//!   prepared with the table ([`crate::wire`]); anything else is decoded with hickory-server's
//!   `Request`, decided, and encoded within the client's EDNS size (TC when it does not fit).
//!   No task per datagram, and every datagram that is not a query is counted before it is
//!   dropped or answered FORMERR.
//! - TCP is our own accept loop and one task per connection ([`tcp`]): framed messages in
//!   order, each decoded, decided and encoded whole, malformed ones counted as over UDP.
//!
//! Both read the current table with one `Arc` clone (UDP: one per batch); nothing is locked
//! across an `.await`.

mod mmsg;
mod tcp;

pub use tcp::serve_tcp;

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::Arc;
use std::time::Instant;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use hickory_server::net::xfer::Protocol;
use hickory_server::server::Request;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::answers::Answers;
use crate::metrics::Metrics;
use crate::respond::{
    self, Malformed, Reply, form_error, qtype_index, qtype_label, rcode_index, rcode_label,
};
use crate::table::Table;
use crate::wire;
use mmsg::Batch;

/// Index of `udp` in [`crate::metrics::PROTOCOLS`].
const UDP: usize = 0;

/// Answers queries from the current table. Cheap to clone.
#[derive(Clone)]
pub struct Handler {
    answers: watch::Receiver<Arc<Answers>>,
    metrics: Arc<Metrics>,
    max_udp_payload: u16,
}

impl Handler {
    pub fn new(
        answers: watch::Receiver<Arc<Answers>>,
        metrics: Arc<Metrics>,
        max_udp_payload: u16,
    ) -> Handler {
        Handler {
            answers,
            metrics,
            max_udp_payload,
        }
    }

    /// What answers come from right now.
    pub fn answers(&self) -> Arc<Answers> {
        self.answers.borrow().clone()
    }

    /// One datagram in, at most one out. Never panics, whatever the bytes.
    pub fn handle_datagram(&self, raw: &[u8], src: SocketAddr) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        self.answer_datagram(&self.answers(), raw, src, &mut out)
            .then_some(out)
    }

    /// One datagram in; `true` when its reply is in `out`. The precomputed path
    /// ([`crate::wire`]) when it can, else hickory's.
    pub fn answer_datagram(
        &self,
        answers: &Answers,
        raw: &[u8],
        src: SocketAddr,
        out: &mut Vec<u8>,
    ) -> bool {
        let start = Instant::now();
        if let Some(done) = wire::answer(&answers.prebuilt, raw, self.max_udp_payload, out) {
            let qtype = qtype_index(Some(RecordType::from(done.qtype)));
            let rcode = rcode_index(done.rcode);
            self.metrics
                .observe_indexed(qtype, rcode, UDP, start.elapsed());
            return true;
        }
        match self.hickory_message(&answers.table, raw, src, Protocol::Udp, start) {
            Some(reply) => {
                *out = reply;
                true
            }
            None => false,
        }
    }

    /// The reply through hickory's decoder and encoder only: the reference the fast path is
    /// tested against.
    pub fn hickory_reply(&self, raw: &[u8], src: SocketAddr) -> Option<Vec<u8>> {
        self.hickory_message(
            &self.answers().table,
            raw,
            src,
            Protocol::Udp,
            Instant::now(),
        )
    }

    /// One TCP message (without its length prefix) in, at most one out. Never panics.
    pub fn answer_message(&self, raw: &[u8], src: SocketAddr) -> Option<Vec<u8>> {
        self.hickory_message(
            &self.answers().table,
            raw,
            src,
            Protocol::Tcp,
            Instant::now(),
        )
    }

    /// Decode with hickory, decide, encode: within the client's size over UDP (TC when it does
    /// not fit), whole over TCP. Malformed messages are counted, whichever the transport.
    fn hickory_message(
        &self,
        table: &Table,
        raw: &[u8],
        src: SocketAddr,
        protocol: Protocol,
        start: Instant,
    ) -> Option<Vec<u8>> {
        let udp = protocol == Protocol::Udp;
        let label = if udp { "udp" } else { "tcp" };
        let request = match Request::from_bytes(raw.to_vec(), src, protocol) {
            Ok(r) => r,
            Err(e) => {
                let (why, reply) = form_error(raw);
                debug!(%src, error = %e, reason = why.as_str(), protocol = label, "malformed message");
                self.metrics.malformed(why.as_str());
                return reply;
            }
        };
        let Some(reply) = respond::respond(table, &request, self.max_udp_payload) else {
            self.metrics.malformed(Malformed::Response.as_str());
            return None;
        };
        // UDP without EDNS: 512 bytes (RFC 1035); with EDNS: the client's size, up to our own
        // limit. TCP: a whole frame.
        let limit = if udp {
            request.max_payload().min(self.max_udp_payload)
        } else {
            u16::MAX
        };
        let bytes = match respond::encode(&reply, &request.queries, limit) {
            Ok((bytes, header)) => {
                if header.truncation {
                    self.metrics.truncated.inc();
                }
                self.observe(&reply, header.response_code, label, start);
                bytes
            }
            Err(e) => {
                debug!(%src, error = %e, "cannot encode an answer");
                let (_, servfail) = encode_servfail(&request);
                self.observe(&reply, ResponseCode::ServFail, label, start);
                servfail?
            }
        };
        Some(bytes)
    }

    fn observe(
        &self,
        reply: &Reply<'_>,
        rcode: ResponseCode,
        protocol: &'static str,
        start: Instant,
    ) {
        self.metrics.observe(
            qtype_label(reply.qtype),
            rcode_label(rcode),
            protocol,
            start.elapsed(),
        );
    }
}

fn encode_servfail(request: &Request) -> (ResponseCode, Option<Vec<u8>>) {
    let mut metadata = hickory_proto::op::Metadata::response_from_request(&request.metadata);
    metadata.response_code = ResponseCode::ServFail;
    let reply = Reply {
        metadata,
        answers: std::borrow::Cow::Borrowed(&[]),
        authorities: &[],
        additionals: &[],
        edns: None,
        qtype: None,
    };
    let bytes = respond::encode(&reply, &request.queries, 512)
        .ok()
        .map(|(b, _)| b);
    (ResponseCode::ServFail, bytes)
}

/// Serve queries on a UDP socket until `stop`. Run one per socket (SO_REUSEPORT) to use more
/// cores. `socket` must be nonblocking; it is registered with the calling event loop.
///
/// Each wake-up reads a batch of datagrams in one system call, answers them from one look at
/// the table, and sends the replies in one system call ([`mmsg`]). A batch in hand is finished
/// before `stop` is looked at again.
///
/// The socket is registered for reading only. With edge-triggered epoll, interest in writing
/// would wake the loop once more per reply: a UDP socket signals "writable" each time the
/// kernel frees a sent datagram (perf stat: two epoll_waits per query at 5k QPS, knot one).
/// A full send buffer, the only time writing has to wait, is handled by [`wait_writable`].
#[allow(unsafe_code)] // registering the socket with the reactor for recvmmsg
pub async fn serve_udp(socket: std::net::UdpSocket, handler: Handler, stop: CancellationToken) {
    // SAFETY: the socket owns its descriptor, and the AsyncFd owns the socket until dropped.
    let socket = match unsafe { AsyncFd::register_with_interest(socket, Interest::READABLE) } {
        Ok(s) => s,
        Err(e) => {
            let (_, e) = e.into_parts();
            warn!(error = %e, "UDP worker could not register its socket");
            return;
        }
    };
    let fd = socket.as_raw_fd();
    let mut batch = Batch::default();
    loop {
        let mut ready = tokio::select! {
            _ = stop.cancelled() => return,
            ready = socket.readable() => match ready {
                Ok(ready) => ready,
                Err(e) => {
                    debug!(error = %e, "UDP socket no longer pollable");
                    return;
                }
            },
        };
        let mut got = 0;
        let received = ready.try_io(|_| {
            got = batch.receive(fd)?;
            // A batch that is not full emptied the queue: tell tokio so (by the WouldBlock it
            // understands) and wait for the next datagram's edge rather than paying for a
            // recvmmsg that returns EAGAIN. Tokio clears readiness only if no new event
            // arrived meanwhile, so a datagram that came after this call still wakes us.
            if got < mmsg::BATCH {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(())
        });
        drop(ready);
        match received {
            Ok(Ok(())) => {}
            Err(_would_block) if got > 0 => {}
            Err(_would_block) => continue,
            Ok(Err(e)) => {
                // ICMP errors from earlier sends can surface here; the socket is still good.
                debug!(error = %e, "UDP receive error");
                continue;
            }
        }
        let answers = handler.answers();
        batch.answer_each(|datagram, src, reply| match src {
            Some(src) if src.port() != 0 && !src.ip().is_unspecified() => {
                handler.answer_datagram(&answers, datagram, src, reply)
            }
            _ => {
                handler.metrics.malformed("bad_source");
                false
            }
        });
        drop(answers);
        send_replies(fd, &mut batch).await;
    }
}

/// Send a batch's replies, waiting while the socket buffer is full. A reply the kernel refuses
/// is logged and skipped, so every round sends or skips at least one.
async fn send_replies(fd: RawFd, batch: &mut Batch) {
    let mut sent = 0;
    while sent < batch.pending() {
        match batch.send(fd, sent) {
            Ok(n) => sent += n.max(1).min(batch.pending() - sent),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if let Err(e) = wait_writable(fd).await {
                    debug!(error = %e, "UDP socket no longer pollable");
                    return;
                }
            }
            Err(e) => {
                let src = batch.pending_peer(sent);
                debug!(?src, error = %e, "UDP send failed");
                sent += 1;
            }
        }
    }
}

/// Wait until the socket behind `fd` can take a datagram again. Its own registration is for
/// reading only, so this registers a duplicate descriptor (same socket, another epoll entry)
/// for writing, just for this wait. Only a full send buffer gets here.
#[allow(unsafe_code)] // borrowing the socket's descriptor for a second registration
async fn wait_writable(fd: RawFd) -> io::Result<()> {
    // SAFETY: `fd` is the caller's open socket for the whole call; the duplicate is ours.
    let dup = unsafe { BorrowedFd::borrow_raw(fd) }.try_clone_to_owned()?;
    // SAFETY: the OwnedFd owns the duplicate, and the AsyncFd owns the OwnedFd until dropped.
    let writable = unsafe { AsyncFd::register_with_interest(dup, Interest::WRITABLE) }
        .map_err(|e| e.into_parts().1)?;
    let mut ready = writable.writable().await?;
    ready.clear_ready();
    Ok(())
}

#[cfg(test)]
mod tests {
    use hickory_proto::op::{Message, MessageType};
    use registry::source::dir::snapshot_from_yaml;

    use super::*;
    use crate::table::TableOptions;

    fn handler() -> Handler {
        let yaml = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: h, \
                    namespace: bar}\nspec:\n  hosts: [httpbin.bar.global, '*.w.global']\n  \
                    addresses: [240.0.0.2, 'fd00::2']\n  ports: [{number: 80, name: http}]\n";
        let options = TableOptions {
            zones: vec!["global".into()],
            ttl: 30,
            vip_v4: None,
            vip_v6: None,
        };
        let answers = Answers::build(&snapshot_from_yaml(yaml), &options);
        let (_, rx) = watch::channel(Arc::new(answers));
        let mut registry = prometheus_client::registry::Registry::default();
        Handler::new(rx, Arc::new(Metrics::new(&mut registry)), 1232)
    }

    /// The fuzz target's invariants (dns/fuzz), on a bounded stream of random and mutated
    /// datagrams, so every `cargo test` exercises them.
    #[test]
    fn random_and_mutated_datagrams_never_panic_and_get_well_formed_replies() {
        let h = handler();
        let src: SocketAddr = "127.0.0.1:5353".parse().unwrap();
        let seeds: Vec<Vec<u8>> = [
            ("httpbin.bar.global.", hickory_proto::rr::RecordType::A),
            ("x.w.global.", hickory_proto::rr::RecordType::AAAA),
            (
                "_http._tcp.httpbin.bar.global.",
                hickory_proto::rr::RecordType::SRV,
            ),
            ("global.", hickory_proto::rr::RecordType::SOA),
        ]
        .iter()
        .map(|(n, t)| {
            let mut m = Message::query();
            m.add_query(hickory_proto::op::Query::query(n.parse().unwrap(), *t));
            m.to_vec().unwrap()
        })
        .collect();
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for i in 0..20_000 {
            let mut packet = seeds[i % seeds.len()].clone();
            match next() % 4 {
                0 => packet = (0..next() % 600).map(|_| next() as u8).collect(),
                1 => packet.truncate(next() as usize % (packet.len() + 1)),
                _ => {
                    for _ in 0..1 + next() % 4 {
                        let at = next() as usize % packet.len();
                        packet[at] = next() as u8;
                    }
                }
            }
            let Some(reply) = h.handle_datagram(&packet, src) else {
                continue;
            };
            assert!(reply.len() <= 1232, "{packet:?}");
            let reply = Message::from_vec(&reply).expect("our reply decodes");
            assert_eq!(reply.metadata.message_type, MessageType::Response);
            assert_eq!(
                reply.metadata.id,
                u16::from_be_bytes([packet[0], packet[1]])
            );
        }
    }

    /// The send path's wait for room registers a duplicate of the socket for writing beside
    /// the socket's own read-only registration; the two must not collide (EEXIST).
    #[tokio::test]
    #[allow(unsafe_code)] // the registration the test exercises
    async fn waiting_for_room_to_send_works_beside_the_read_registration() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.set_nonblocking(true).unwrap();
        let fd = socket.as_raw_fd();
        // SAFETY: the socket owns its descriptor and the AsyncFd owns the socket.
        let reader = unsafe { AsyncFd::register_with_interest(socket, Interest::READABLE) }
            .map_err(|e| e.into_parts().1)
            .unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), wait_writable(fd))
            .await
            .expect("an empty send buffer is writable at once")
            .unwrap();
        // And the read registration still works afterwards.
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        sender
            .send_to(b"x", reader.get_ref().local_addr().unwrap())
            .unwrap();
        let mut ready = tokio::time::timeout(std::time::Duration::from_secs(5), reader.readable())
            .await
            .expect("the datagram wakes the reader")
            .unwrap();
        ready.clear_ready();
    }
}
