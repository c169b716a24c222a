//! A sans-IO TLS ClientHello reader: given the bytes received so far, say `Incomplete`, or the
//! server name and ALPN the client offered, or why the bytes are not a ClientHello.
//!
//! It reassembles a handshake message split over several TLS records (legal, and what a large
//! post-quantum hello may do) and never reads past [`MAX_HELLO_BYTES`]. Parsing of the hello
//! body is tls-parser's; we only walk the extension list for `server_name` and ALPN.

use tls_parser::{
    SNIType, TlsExtension, parse_tls_extension_alpn_content, parse_tls_extension_sni_content,
    parse_tls_handshake_client_hello,
};

/// The most bytes we buffer while waiting for a complete ClientHello: one maximum-size TLS
/// record (16 KiB of payload) and its header.
pub const MAX_HELLO_BYTES: usize = 16 * 1024 + RECORD_HEADER;

const RECORD_HEADER: usize = 5;
const CONTENT_HANDSHAKE: u8 = 0x16;
const HANDSHAKE_CLIENT_HELLO: u8 = 0x01;
const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;

/// What the client offered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientHello {
    /// The `host_name` from `server_name`, lower-cased; `None` when absent.
    pub sni: Option<String>,
    /// ALPN protocol names in the client's order.
    pub alpn: Vec<String>,
}

#[derive(Debug)]
pub enum Parsed {
    /// More bytes are needed; feed the same buffer grown.
    Incomplete,
    Complete(ClientHello),
}

/// Why the bytes are not a ClientHello we accept.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HelloError {
    #[error("not TLS: the first byte is not a handshake record")]
    NotTls,
    #[error("malformed ClientHello: {0}")]
    Malformed(&'static str),
    #[error("ClientHello larger than {MAX_HELLO_BYTES} bytes")]
    TooLarge,
}

/// Read a ClientHello from the start of `buf`.
pub fn parse_client_hello(buf: &[u8]) -> Result<Parsed, HelloError> {
    if buf.len() > MAX_HELLO_BYTES {
        return Err(HelloError::TooLarge);
    }
    let Some(&first) = buf.first() else {
        return Ok(Parsed::Incomplete);
    };
    if first != CONTENT_HANDSHAKE {
        return Err(HelloError::NotTls);
    }
    match handshake_message(buf)? {
        None => Ok(Parsed::Incomplete),
        Some(HandshakeBytes::Borrowed(m)) => client_hello(m).map(Parsed::Complete),
        Some(HandshakeBytes::Owned(m)) => client_hello(&m).map(Parsed::Complete),
    }
}

enum HandshakeBytes<'a> {
    Borrowed(&'a [u8]),
    Owned(Vec<u8>),
}

/// The first handshake message (header included), reassembled from as many records as it
/// spans. Borrowed in the common case of a single record.
fn handshake_message(buf: &[u8]) -> Result<Option<HandshakeBytes<'_>>, HelloError> {
    let mut pos = 0;
    let mut joined: Option<Vec<u8>> = None;
    loop {
        let Some(header) = buf.get(pos..pos + RECORD_HEADER) else {
            return incomplete_unless_full(buf);
        };
        if header[0] != CONTENT_HANDSHAKE {
            return Err(HelloError::Malformed(
                "a record inside the ClientHello is not a handshake record",
            ));
        }
        if header[1] != 3 {
            return Err(HelloError::Malformed("record version is not TLS"));
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len == 0 || len > 16 * 1024 {
            return Err(HelloError::Malformed("record length out of range"));
        }
        let Some(payload) = buf.get(pos + RECORD_HEADER..pos + RECORD_HEADER + len) else {
            return incomplete_unless_full(buf);
        };
        pos += RECORD_HEADER + len;
        let have: &[u8] = match &mut joined {
            None => payload,
            Some(v) => {
                v.extend_from_slice(payload);
                v
            }
        };
        if have.len() >= 4 {
            if have[0] != HANDSHAKE_CLIENT_HELLO {
                return Err(HelloError::Malformed(
                    "first handshake message is not a ClientHello",
                ));
            }
            let body = u32::from_be_bytes([0, have[1], have[2], have[3]]) as usize;
            if 4 + body > MAX_HELLO_BYTES {
                return Err(HelloError::TooLarge);
            }
            if have.len() >= 4 + body {
                return Ok(Some(match joined {
                    None => HandshakeBytes::Borrowed(&payload[..4 + body]),
                    Some(mut v) => {
                        v.truncate(4 + body);
                        HandshakeBytes::Owned(v)
                    }
                }));
            }
        }
        if joined.is_none() {
            joined = Some(payload.to_vec());
        }
    }
}

fn incomplete_unless_full<T>(buf: &[u8]) -> Result<Option<T>, HelloError> {
    if buf.len() >= MAX_HELLO_BYTES {
        Err(HelloError::TooLarge)
    } else {
        Ok(None)
    }
}

fn client_hello(message: &[u8]) -> Result<ClientHello, HelloError> {
    let body = &message[4..];
    let (rest, hello) = parse_tls_handshake_client_hello(body)
        .map_err(|_| HelloError::Malformed("ClientHello body does not parse"))?;
    if !rest.is_empty() {
        return Err(HelloError::Malformed(
            "trailing bytes after the ClientHello",
        ));
    }
    let mut out = ClientHello {
        sni: None,
        alpn: Vec::new(),
    };
    let mut exts = hello.ext.unwrap_or_default();
    let mut seen_sni = false;
    let mut seen_alpn = false;
    while !exts.is_empty() {
        if exts.len() < 4 {
            return Err(HelloError::Malformed("truncated extension header"));
        }
        let kind = u16::from_be_bytes([exts[0], exts[1]]);
        let len = usize::from(u16::from_be_bytes([exts[2], exts[3]]));
        let data = exts
            .get(4..4 + len)
            .ok_or(HelloError::Malformed("extension longer than the hello"))?;
        exts = &exts[4 + len..];
        match kind {
            EXT_SERVER_NAME => {
                if std::mem::replace(&mut seen_sni, true) {
                    return Err(HelloError::Malformed("duplicate server_name extension"));
                }
                out.sni = server_name(data)?;
            }
            EXT_ALPN => {
                if std::mem::replace(&mut seen_alpn, true) {
                    return Err(HelloError::Malformed("duplicate ALPN extension"));
                }
                out.alpn = alpn(data)?;
            }
            _ => {}
        }
    }
    Ok(out)
}

fn server_name(data: &[u8]) -> Result<Option<String>, HelloError> {
    let Ok((rest, TlsExtension::SNI(names))) = parse_tls_extension_sni_content(data) else {
        return Err(HelloError::Malformed(
            "server_name extension does not parse",
        ));
    };
    if !rest.is_empty() {
        return Err(HelloError::Malformed("trailing bytes in server_name"));
    }
    let mut hosts = names.iter().filter(|(t, _)| *t == SNIType::HostName);
    let Some((_, name)) = hosts.next() else {
        return Ok(None);
    };
    if hosts.next().is_some() {
        return Err(HelloError::Malformed(
            "more than one host_name in server_name",
        ));
    }
    if !is_host_name(name) {
        return Err(HelloError::Malformed(
            "server_name is not a host name (letters, digits, '-', '_', '.')",
        ));
    }
    Ok(Some(
        std::str::from_utf8(name)
            .expect("checked ASCII")
            .to_ascii_lowercase(),
    ))
}

/// Letters, digits, `-`, `_` (Istio's SNI uses it) and `.`; no empty labels; at most 253.
fn is_host_name(name: &[u8]) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        && !name
            .split(|c| *c == b'.')
            .any(|l| l.is_empty() || l.len() > 63)
}

fn alpn(data: &[u8]) -> Result<Vec<String>, HelloError> {
    let Ok((rest, TlsExtension::ALPN(protos))) = parse_tls_extension_alpn_content(data) else {
        return Err(HelloError::Malformed("ALPN extension does not parse"));
    };
    if !rest.is_empty() {
        return Err(HelloError::Malformed("trailing bytes in ALPN"));
    }
    Ok(protos
        .iter()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-built ClientHello with the given extensions, in one record.
    pub(crate) fn hello_with(exts: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut ext_bytes = Vec::new();
        for (kind, data) in exts {
            ext_bytes.extend_from_slice(&kind.to_be_bytes());
            ext_bytes.extend_from_slice(&(data.len() as u16).to_be_bytes());
            ext_bytes.extend_from_slice(data);
        }
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[7u8; 32]);
        body.push(0);
        body.extend_from_slice(&[0x00, 0x02, 0x13, 0x01, 0x01, 0x00]);
        body.extend_from_slice(&(ext_bytes.len() as u16).to_be_bytes());
        body.extend_from_slice(&ext_bytes);
        let mut hs = vec![1, 0, 0, 0];
        hs[1..4].copy_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&body);
        let mut rec = vec![0x16, 0x03, 0x01];
        rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        rec.extend_from_slice(&hs);
        rec
    }

    pub(crate) fn sni_ext(name: &[u8]) -> (u16, Vec<u8>) {
        let mut d = Vec::new();
        d.extend_from_slice(&((name.len() + 3) as u16).to_be_bytes());
        d.push(0);
        d.extend_from_slice(&(name.len() as u16).to_be_bytes());
        d.extend_from_slice(name);
        (0, d)
    }

    fn complete(buf: &[u8]) -> ClientHello {
        match parse_client_hello(buf) {
            Ok(Parsed::Complete(h)) => h,
            other => panic!("expected a complete hello, got {other:?}"),
        }
    }

    #[test]
    fn reads_sni_and_alpn() {
        let alpn = (16u16, vec![0, 6, 5, b'h', b'2', b'x', b'y', b'z']);
        let h = complete(&hello_with(&[
            sni_ext(b"Outbound_.8000_._.A.b.global"),
            alpn,
        ]));
        assert_eq!(h.sni.as_deref(), Some("outbound_.8000_._.a.b.global"));
        assert_eq!(h.alpn, vec!["h2xyz".to_string()]);
        assert_eq!(complete(&hello_with(&[])).sni, None);
    }

    #[test]
    fn every_prefix_is_incomplete() {
        let full = hello_with(&[sni_ext(b"a.b.global")]);
        for n in 0..full.len() {
            assert!(
                matches!(parse_client_hello(&full[..n]), Ok(Parsed::Incomplete)),
                "prefix {n}"
            );
        }
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(
            parse_client_hello(b"GET / HTTP/1.1\r\n").unwrap_err(),
            HelloError::NotTls
        );
        let dup = hello_with(&[sni_ext(b"a.b"), sni_ext(b"c.d")]);
        assert!(matches!(
            parse_client_hello(&dup),
            Err(HelloError::Malformed(_))
        ));
        let bad = hello_with(&[sni_ext(b"a b.global")]);
        assert!(matches!(
            parse_client_hello(&bad),
            Err(HelloError::Malformed(_))
        ));
        let mut not_hello = hello_with(&[]);
        not_hello[5] = 2;
        assert!(matches!(
            parse_client_hello(&not_hello),
            Err(HelloError::Malformed(_))
        ));
        // A record claiming more than a maximum record is refused before it is buffered.
        assert!(matches!(
            parse_client_hello(&[0x16, 3, 1, 0x40, 0x01]),
            Err(HelloError::Malformed(_))
        ));
        // A handshake message longer than we buffer is refused as soon as its header is seen.
        assert_eq!(
            parse_client_hello(&[0x16, 3, 1, 0, 4, 1, 0, 0x50, 0]).unwrap_err(),
            HelloError::TooLarge
        );
    }

    #[test]
    fn reassembles_a_hello_split_over_records() {
        let single = hello_with(&[sni_ext(b"httpbin.bar.global")]);
        let hs = &single[5..];
        let mut split = Vec::new();
        for chunk in hs.chunks(7) {
            split.extend_from_slice(&[0x16, 3, 3]);
            split.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
            split.extend_from_slice(chunk);
        }
        for n in 0..split.len() {
            assert!(matches!(
                parse_client_hello(&split[..n]),
                Ok(Parsed::Incomplete)
            ));
        }
        assert_eq!(complete(&split).sni.as_deref(), Some("httpbin.bar.global"));
    }

    #[test]
    fn random_bytes_never_panic() {
        let base = hello_with(&[
            sni_ext(b"httpbin.bar.global"),
            (16, vec![0, 3, 2, b'h', b'2']),
        ]);
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mut b = base.clone();
            let i = (x as usize) % b.len();
            b[i] = (x >> 32) as u8;
            let cut = ((x >> 16) as usize) % (b.len() + 1);
            let _ = parse_client_hello(&b[..cut]);
        }
    }
}
