//! Any bytes, at any prefix: the reader must answer Incomplete, a hello, or an error; never
//! panic, never claim a hello from fewer bytes than a longer prefix needs.
#![no_main]

use gateway::hello::{Parsed, parse_client_hello};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let full = parse_client_hello(data);
    if let Ok(Parsed::Complete(hello)) = &full {
        // Extra bytes after a complete hello do not change the answer.
        let mut more = data.to_vec();
        more.extend_from_slice(&[0x17, 0x03, 0x03, 0x00, 0x01, 0x00]);
        if more.len() <= gateway::hello::MAX_HELLO_BYTES {
            match parse_client_hello(&more) {
                Ok(Parsed::Complete(h)) => assert_eq!(&h, hello),
                other => panic!("appending bytes changed the answer: {other:?}"),
            }
        }
    }
    for n in 0..data.len().min(64) {
        let _ = parse_client_hello(&data[..n]);
    }
});
