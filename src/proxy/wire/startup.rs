//! The startup phase: untagged packets (SSLRequest, GSSENCRequest, CancelRequest,
//! StartupMessage) and the small tagged messages of the authentication exchange, read whole
//! from a stream and checked here, with the views of what keyshift reads in them.

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Largest startup packet PostgreSQL accepts (`MAX_STARTUP_PACKET_LENGTH`).
pub const MAX_STARTUP_PACKET: usize = 10_000;

pub const SSL_REQUEST_CODE: u32 = 80_877_103;
pub const GSSENC_REQUEST_CODE: u32 = 80_877_104;
pub const CANCEL_REQUEST_CODE: u32 = 80_877_102;
pub const PROTOCOL_3_0: u32 = 196_608;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection closed")]
    Closed,
    #[error("connection closed in the middle of a message")]
    Truncated,
    #[error("message length {len} is shorter than its own header")]
    TooShort { len: u32 },
    #[error("message of {len} bytes is larger than max_message_bytes ({max})")]
    TooLarge { len: usize, max: usize },
    #[error("invalid message type 0x{0:02x}")]
    BadTag(u8),
    #[error("malformed {0} message")]
    Malformed(&'static str),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Reads the untagged startup-phase packet: length, then a 4-byte code and the payload.
/// Returns the whole packet (length included) so it can be forwarded unchanged.
pub async fn read_startup<R: AsyncRead + Unpin>(r: &mut R) -> Result<BytesMut, FrameError> {
    let mut len_buf = [0u8; 4];
    match r.read_exact(&mut len_buf).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len_buf);
    if len < 8 {
        return Err(FrameError::TooShort { len });
    }
    if len as usize > MAX_STARTUP_PACKET {
        return Err(FrameError::TooLarge {
            len: len as usize,
            max: MAX_STARTUP_PACKET,
        });
    }
    let mut pkt = BytesMut::with_capacity(len as usize);
    pkt.extend_from_slice(&len_buf);
    pkt.resize(len as usize, 0);
    read_exact_or_truncated(r, &mut pkt[4..]).await?;
    Ok(pkt)
}

/// Reads one complete tagged message into `buf` (cleared first); returns its tag.
/// Used in the startup and authentication phases, where messages are small.
pub async fn read_message<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    max: usize,
) -> Result<u8, FrameError> {
    buf.clear();
    let mut hdr = [0u8; 5];
    match r.read_exact(&mut hdr).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes([hdr[1], hdr[2], hdr[3], hdr[4]]);
    check_len(len, max)?;
    buf.extend_from_slice(&hdr);
    buf.resize(1 + len as usize, 0);
    read_exact_or_truncated(r, &mut buf[5..]).await?;
    Ok(hdr[0])
}

async fn read_exact_or_truncated<R: AsyncRead + Unpin>(
    r: &mut R,
    dst: &mut [u8],
) -> Result<(), FrameError> {
    match r.read_exact(dst).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(FrameError::Truncated),
        Err(e) => Err(e.into()),
    }
}

fn check_len(len: u32, max: usize) -> Result<(), FrameError> {
    if len < 4 {
        return Err(FrameError::TooShort { len });
    }
    if len as usize > max {
        return Err(FrameError::TooLarge {
            len: len as usize,
            max,
        });
    }
    Ok(())
}

/// Reads a NUL-terminated string from the front of `b`, advancing past it.
pub fn take_cstr<'a>(b: &mut &'a [u8]) -> Option<&'a [u8]> {
    let end = b.iter().position(|&c| c == 0)?;
    let s = &b[..end];
    b.advance(end + 1);
    Some(s)
}

/// The parameters of a StartupMessage (protocol 3.0): name/value pairs after the version.
pub fn startup_params(pkt: &[u8]) -> Result<Vec<(String, String)>, FrameError> {
    let mut b = pkt
        .get(8..)
        .ok_or(FrameError::Malformed("StartupMessage"))?;
    let mut out = Vec::new();
    loop {
        let name = take_cstr(&mut b).ok_or(FrameError::Malformed("StartupMessage"))?;
        if name.is_empty() {
            break;
        }
        let value = take_cstr(&mut b).ok_or(FrameError::Malformed("StartupMessage"))?;
        out.push((
            String::from_utf8_lossy(name).into_owned(),
            String::from_utf8_lossy(value).into_owned(),
        ));
    }
    Ok(out)
}

/// What an untagged startup-phase packet asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartupRequest {
    Ssl,
    GssEnc,
    Cancel {
        pid: u32,
        secret: u32,
    },
    /// A StartupMessage with this protocol version (`major << 16 | minor`).
    Startup(u32),
}

/// Reads the request code of a packet from [`read_startup`] (length word included).
pub fn startup_request(pkt: &[u8]) -> Result<StartupRequest, FrameError> {
    let word = |at: usize| {
        pkt.get(at..at + 4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    };
    let code = word(4).ok_or(FrameError::Malformed("startup packet"))?;
    Ok(match code {
        SSL_REQUEST_CODE => StartupRequest::Ssl,
        GSSENC_REQUEST_CODE => StartupRequest::GssEnc,
        CANCEL_REQUEST_CODE => match (pkt.len(), word(8), word(12)) {
            (16, Some(pid), Some(secret)) => StartupRequest::Cancel { pid, secret },
            _ => return Err(FrameError::Malformed("CancelRequest")),
        },
        v => StartupRequest::Startup(v),
    })
}

/// The code of an `Authentication*` message (0 Ok, 3 cleartext, 5 MD5, 10 SASL, …).
pub fn authentication_code(msg: &[u8]) -> Result<u32, FrameError> {
    match msg {
        [b'R', _, _, _, _, a, b, c, d, ..] => Ok(u32::from_be_bytes([*a, *b, *c, *d])),
        _ => Err(FrameError::Malformed("Authentication")),
    }
}

/// `BackendKeyData`: the backend's pid and secret key.
pub fn backend_key_data(msg: &[u8]) -> Result<(u32, u32), FrameError> {
    match msg {
        [b'K', 0, 0, 0, 12, p0, p1, p2, p3, s0, s1, s2, s3] => Ok((
            u32::from_be_bytes([*p0, *p1, *p2, *p3]),
            u32::from_be_bytes([*s0, *s1, *s2, *s3]),
        )),
        _ => Err(FrameError::Malformed("BackendKeyData")),
    }
}

/// The mechanisms of an `AuthenticationSASL` message.
pub fn sasl_mechanisms(msg: &[u8]) -> Result<Vec<&[u8]>, FrameError> {
    let bad = FrameError::Malformed("AuthenticationSASL");
    if authentication_code(msg)? != 10 {
        return Err(bad);
    }
    let mut rest = msg
        .get(9..)
        .ok_or(FrameError::Malformed("AuthenticationSASL"))?;
    let mut mechs = Vec::new();
    loop {
        let m = take_cstr(&mut rest).ok_or(FrameError::Malformed("AuthenticationSASL"))?;
        if m.is_empty() {
            break;
        }
        mechs.push(m);
    }
    if !rest.is_empty() {
        return Err(bad);
    }
    Ok(mechs)
}

/// An `AuthenticationSASL` message offering `mechanisms`.
pub fn build_authentication_sasl(mechanisms: &[&[u8]]) -> BytesMut {
    let body_len: usize = 4 + 4 + mechanisms.iter().map(|m| m.len() + 1).sum::<usize>() + 1;
    let mut out = BytesMut::with_capacity(1 + body_len);
    out.put_u8(b'R');
    out.put_u32(body_len as u32);
    out.put_u32(10);
    for m in mechanisms {
        out.put_slice(m);
        out.put_u8(0);
    }
    out.put_u8(0);
    out
}

/// An untagged packet of a length word and one code, then `payload`: SSLRequest (no
/// payload), CancelRequest (pid and secret).
pub fn build_request(code: u32, payload: &[u32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + 4 * payload.len());
    out.extend_from_slice(&((8 + 4 * payload.len()) as u32).to_be_bytes());
    out.extend_from_slice(&code.to_be_bytes());
    for p in payload {
        out.extend_from_slice(&p.to_be_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn startup_views() {
        assert_eq!(
            startup_request(&build_request(SSL_REQUEST_CODE, &[])).unwrap(),
            StartupRequest::Ssl
        );
        assert_eq!(
            startup_request(&build_request(CANCEL_REQUEST_CODE, &[7, 9])).unwrap(),
            StartupRequest::Cancel { pid: 7, secret: 9 }
        );
        assert!(startup_request(&build_request(CANCEL_REQUEST_CODE, &[7])).is_err());
        assert!(startup_request(&[0, 0, 0]).is_err());
        assert_eq!(
            backend_key_data(&[b'K', 0, 0, 0, 12, 0, 0, 0, 1, 0, 0, 0, 2]).unwrap(),
            (1, 2)
        );
        assert!(backend_key_data(&[b'K', 0, 0, 0, 8, 0, 0, 0, 1]).is_err());
        let sasl = build_authentication_sasl(&[b"SCRAM-SHA-256-PLUS", b"SCRAM-SHA-256"]);
        assert_eq!(
            sasl_mechanisms(&sasl).unwrap(),
            vec![&b"SCRAM-SHA-256-PLUS"[..], b"SCRAM-SHA-256"]
        );
        assert!(sasl_mechanisms(&sasl[..sasl.len() - 1]).is_err());
        assert_eq!(
            authentication_code(&[b'R', 0, 0, 0, 8, 0, 0, 0, 0]).unwrap(),
            0
        );
        assert!(authentication_code(&[b'R', 0, 0, 0]).is_err());
    }

    #[test]
    fn parses_startup_params() {
        let mut pkt = vec![0, 0, 0, 0, 0, 3, 0, 0];
        pkt.extend_from_slice(b"user\0bob\0database\0db\0\0");
        let p = startup_params(&pkt).unwrap();
        assert_eq!(
            p,
            vec![
                ("user".into(), "bob".into()),
                ("database".into(), "db".into())
            ]
        );
        assert!(startup_params(b"\0\0\0\0\0\x03\0\0user").is_err());
    }
}
