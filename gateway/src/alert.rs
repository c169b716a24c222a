//! TLS alerts the gateway sends when it refuses a connection: which alert says why, and the
//! bytes of the one record that carries it. The gateway never terminates TLS, so this is the
//! only TLS it ever writes (the ClientHello reader in `hello.rs` only reads).

use serde::Serialize;

/// The alert descriptions the gateway uses (RFC 8446 section 6.2), with their wire values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertDescription {
    HandshakeFailure = 40,
    AccessDenied = 49,
    DecodeError = 50,
    InternalError = 80,
    NoApplicationProtocol = 120,
    UnrecognizedName = 112,
}

const CONTENT_ALERT: u8 = 0x15;
const LEVEL_FATAL: u8 = 2;

/// A fatal TLS alert record (TLS 1.2 record version, as TLS 1.3 peers also expect before
/// the handshake completes).
pub fn alert_record(description: AlertDescription) -> [u8; 7] {
    [
        CONTENT_ALERT,
        0x03,
        0x03,
        0x00,
        0x02,
        LEVEL_FATAL,
        description as u8,
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The record rustls reads back as the same alert: checked against a real TLS stack, not
    /// against our own constants.
    #[test]
    fn a_record_is_the_alert_rustls_reads() {
        for (ours, theirs) in [
            (AlertDescription::HandshakeFailure, "HandshakeFailure"),
            (AlertDescription::AccessDenied, "AccessDenied"),
            (AlertDescription::DecodeError, "DecodeError"),
            (AlertDescription::InternalError, "InternalError"),
            (
                AlertDescription::NoApplicationProtocol,
                "NoApplicationProtocol",
            ),
            (AlertDescription::UnrecognizedName, "UnrecognisedName"),
        ] {
            let record = alert_record(ours);
            assert_eq!(&record[..6], &[0x15, 3, 3, 0, 2, 2], "{ours:?}");
            assert_eq!(
                format!("{:?}", rustls::AlertDescription::from(record[6])),
                theirs
            );
        }
    }
}
