//! End-to-end tests: the server on 127.0.0.1 with port 0, asked over real sockets, by our own
//! hickory-proto client, by `dig`, and through dnsmasq forwarding the zone as CoreDNS would.

mod answers;
mod support;
mod tools;
mod transport;
