//! Messages keyshift itself originates, encoded with `pgwire`'s message types.

use bytes::BytesMut;
use pgwire::messages::Message;
use pgwire::messages::response::ErrorResponse;
use pgwire::messages::startup::{BackendKeyData, SecretKey};

/// SQLSTATE codes keyshift uses, with PostgreSQL's meanings.
pub mod sqlstate {
    pub const PROTOCOL_VIOLATION: &str = "08P01";
    pub const CONNECTION_FAILURE: &str = "08006";
    pub const UNABLE_TO_CONNECT: &str = "08001";
    pub const TOO_MANY_CONNECTIONS: &str = "53300";
    pub const ADMIN_SHUTDOWN: &str = "57P01";
    pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
    pub const INVALID_PARAMETER_VALUE: &str = "22023";
    pub const OBJECT_NOT_IN_PREREQUISITE_STATE: &str = "55000";
}

/// A FATAL ErrorResponse: the connection ends after it.
pub fn fatal(code: &str, message: &str) -> BytesMut {
    error_with_severity("FATAL", code, message, None)
}

/// An ERROR-level ErrorResponse with an optional hint.
pub fn error(code: &str, message: &str, hint: Option<&str>) -> BytesMut {
    error_with_severity("ERROR", code, message, hint)
}

fn error_with_severity(severity: &str, code: &str, message: &str, hint: Option<&str>) -> BytesMut {
    let mut fields = vec![
        (b'S', severity.to_string()),
        (b'V', severity.to_string()),
        (b'C', code.to_string()),
        (b'M', message.to_string()),
    ];
    if let Some(h) = hint {
        fields.push((b'H', h.to_string()));
    }
    encode(&ErrorResponse::new(fields))
}

/// BackendKeyData carrying keyshift's own cancel key for a client.
pub fn backend_key_data(pid: i32, secret: i32) -> BytesMut {
    encode(&BackendKeyData::new(pid, SecretKey::I32(secret)))
}

fn encode<M: Message>(m: &M) -> BytesMut {
    let mut buf = BytesMut::with_capacity(m.message_length() + 1);
    // Encoding our own small, well-formed messages into a growable buffer cannot fail; an
    // error would mean a length over pgwire's cap, which none of these messages approach.
    if m.encode(&mut buf).is_err() {
        buf.clear();
    }
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fatal_is_well_formed() {
        let b = fatal(
            sqlstate::TOO_MANY_CONNECTIONS,
            "sorry, too many clients already",
        );
        assert_eq!(b[0], b'E');
        let len = u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
        assert_eq!(len + 1, b.len());
        assert!(b.windows(5).any(|w| w == b"53300"));
        assert_eq!(*b.last().unwrap(), 0);
    }

    #[test]
    fn key_data() {
        let b = backend_key_data(7, 9);
        assert_eq!(&b[..], &[b'K', 0, 0, 0, 12, 0, 0, 0, 7, 0, 0, 0, 9]);
    }
}
