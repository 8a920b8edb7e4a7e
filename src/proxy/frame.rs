//! Framing of the PostgreSQL protocol, by hand, over the original bytes.
//!
//! After startup every message is a 1-byte tag and a 4-byte big-endian length that counts
//! itself but not the tag. The relay never decodes a message it does not need to look at: the
//! [`Scanner`] walks a read buffer, hands complete copies of the few messages keyshift inspects
//! (ReadyForQuery, Query, Parse) to its caller and lets everything else stream through, so a
//! 100 MB CopyData or DataRow is never held in memory.

use bytes::{Buf, BytesMut};
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

/// What the scanner found at the front of the buffer.
#[derive(Debug)]
pub enum Scan {
    /// Need more bytes before anything can be decided.
    NeedMore,
    /// `n` bytes (part or all of a message the caller does not inspect) may be forwarded.
    Forward { n: usize },
    /// The header of a new message was seen; `inspect` says whether the caller asked for the
    /// whole message. When it did, the message is complete at the front of the buffer and is
    /// `len` bytes long (tag included); otherwise its bytes follow as `Forward`s.
    Message { tag: u8, len: usize, inspect: bool },
}

/// Walks a stream of tagged messages, one decision at a time.
#[derive(Debug, Default)]
pub struct Scanner {
    /// Bytes of the current streamed message not yet handed out.
    remaining: usize,
}

impl Scanner {
    /// True when the scanner sits on a message boundary (nothing half-forwarded), i.e. when
    /// keyshift may inject a message of its own into this direction.
    pub fn at_boundary(&self) -> bool {
        self.remaining == 0
    }

    /// Looks at `buf` (which starts where the previous call left off) and decides. `want`
    /// says which tags must be seen whole; `max` caps every message's length.
    pub fn next(
        &mut self,
        buf: &[u8],
        max: usize,
        want: impl Fn(u8) -> bool,
    ) -> Result<Scan, FrameError> {
        if self.remaining > 0 {
            if buf.is_empty() {
                return Ok(Scan::NeedMore);
            }
            let n = self.remaining.min(buf.len());
            self.remaining -= n;
            return Ok(Scan::Forward { n });
        }
        if buf.len() < 5 {
            return Ok(Scan::NeedMore);
        }
        let tag = buf[0];
        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
        check_len(len, max)?;
        let total = 1 + len as usize;
        if want(tag) {
            if buf.len() < total {
                return Ok(Scan::NeedMore);
            }
            return Ok(Scan::Message {
                tag,
                len: total,
                inspect: true,
            });
        }
        self.remaining = total;
        Ok(Scan::Message {
            tag,
            len: total,
            inspect: false,
        })
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn streams_uninspected_and_holds_inspected() {
        let mut buf = msg(b'D', b"hello");
        buf.extend(msg(b'Z', b"I"));
        let mut s = Scanner::default();
        let want = |t| t == b'Z';
        match s.next(&buf, 1024, want).unwrap() {
            Scan::Message {
                tag: b'D',
                len: 10,
                inspect: false,
            } => {}
            other => panic!("{other:?}"),
        }
        match s.next(&buf, 1024, want).unwrap() {
            Scan::Forward { n: 10 } => {}
            other => panic!("{other:?}"),
        }
        assert!(s.at_boundary());
        // An inspected message that is not complete yet waits for more bytes.
        assert!(matches!(
            s.next(&buf[10..13], 1024, want).unwrap(),
            Scan::NeedMore
        ));
        match s.next(&buf[10..], 1024, want).unwrap() {
            Scan::Message {
                tag: b'Z',
                len: 6,
                inspect: true,
            } => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn partial_streamed_message() {
        let buf = msg(b'd', &[7u8; 100]);
        let mut s = Scanner::default();
        assert!(matches!(
            s.next(&buf[..50], 1024, |_| false).unwrap(),
            Scan::Message { .. }
        ));
        assert!(matches!(
            s.next(&buf[..50], 1024, |_| false).unwrap(),
            Scan::Forward { n: 50 }
        ));
        assert!(!s.at_boundary());
        assert!(matches!(
            s.next(&buf[50..], 1024, |_| false).unwrap(),
            Scan::Forward { n: 55 }
        ));
        assert!(s.at_boundary());
    }

    #[test]
    fn bad_lengths() {
        let mut s = Scanner::default();
        assert!(matches!(
            s.next(&[b'Q', 0, 0, 0, 3], 1024, |_| true),
            Err(FrameError::TooShort { len: 3 })
        ));
        let mut s = Scanner::default();
        assert!(matches!(
            s.next(&[b'Q', 0x7f, 0, 0, 0], 1024, |_| true),
            Err(FrameError::TooLarge { .. })
        ));
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
