//! Any datagram through the whole UDP request path (decode, decide, encode, FORMERR): never a
//! panic; a reply, when there is one, is a well-formed response to that query, within the size
//! the client may receive; and the precomputed path's replies are the hickory path's, byte for
//! byte.
#![no_main]

use std::sync::{Arc, OnceLock};

use dns::metrics::Metrics;
use dns::server::Handler;
use dns::table::{Table, TableOptions};
use hickory_proto::op::{Message, MessageType};
use libfuzzer_sys::fuzz_target;
use registry::source::dir::snapshot_from_yaml;

const MAX_UDP: u16 = 1232;

fn handler() -> &'static Handler {
    static HANDLER: OnceLock<Handler> = OnceLock::new();
    HANDLER.get_or_init(|| {
        let snapshot = snapshot_from_yaml(include_str!("../../tests/fixtures/mesh.yaml"));
        let options = TableOptions {
            zones: vec!["global".into()],
            ttl: 30,
            vip_v4: Some("240.240.0.0/16".parse().unwrap()),
            vip_v6: Some("2001:2::/48".parse().unwrap()),
        };
        // The receiver keeps the last table after the sender is gone.
        let (_, rx) = tokio::sync::watch::channel(Arc::new(Table::build(&snapshot, &options)));
        let metrics = Arc::new(Metrics::new(&mut prometheus_client::registry::Registry::default()));
        Handler::new(rx, metrics, MAX_UDP)
    })
}

fuzz_target!(|data: &[u8]| {
    let src = "127.0.0.1:5353".parse().unwrap();
    // The precomputed path, when it answers, answers as the hickory path does, byte for byte.
    let mut fast = Vec::new();
    if dns::wire::answer(handler().table().wire(), data, MAX_UDP, &mut fast).is_some() {
        assert_eq!(Some(fast), handler().hickory_reply(data, src));
    }
    let Some(reply) = handler().handle_datagram(data, src) else {
        return;
    };
    assert!(reply.len() <= usize::from(MAX_UDP), "reply of {} bytes", reply.len());
    let reply = Message::from_vec(&reply).expect("our reply decodes");
    assert_eq!(reply.metadata.message_type, MessageType::Response);
    assert_eq!(reply.metadata.id, u16::from_be_bytes([data[0], data[1]]));
});
