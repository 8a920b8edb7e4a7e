//! The protocol messages keyshift reads and builds, typed once.
//!
//! After startup every message is a 1-byte tag and a 4-byte big-endian length that counts
//! itself but not the tag. The relay forwards bytes as they came and never decodes a message
//! it does not need to look at; the few it does look at are read here, through views that
//! check lengths and terminators when they are built and answer `Err`, never panic, whatever
//! the bytes. Nothing outside this module indexes into message bytes.
//!
//! A view rejects exactly what PostgreSQL's own reader (`pq_getmsg*`, `pq_getmsgend`) would
//! reject, so a message keyshift cannot read is one PostgreSQL refuses too: the relay then
//! forwards it unchanged and lets PostgreSQL answer it (08P01, "invalid message format"),
//! instead of acting on part of it.
//!
//! Why not `postgres-protocol` (already in the dependency tree, through tokio-postgres): it
//! parses backend messages and builds frontend ones, but keyshift has to *read* frontend
//! messages, and its builders take `&str` names and SQL where the relay must carry a client's
//! bytes in any client encoding unchanged.

pub mod backend;
pub mod build;
pub mod frontend;
pub mod startup;

/// Tags of messages the client sends (after startup).
pub mod tag {
    pub mod frontend {
        pub const QUERY: u8 = b'Q';
        pub const PARSE: u8 = b'P';
        pub const BIND: u8 = b'B';
        pub const DESCRIBE: u8 = b'D';
        pub const EXECUTE: u8 = b'E';
        pub const CLOSE: u8 = b'C';
        pub const SYNC: u8 = b'S';
        pub const FLUSH: u8 = b'H';
        pub const TERMINATE: u8 = b'X';
        pub const FUNCTION_CALL: u8 = b'F';
        pub const COPY_DATA: u8 = b'd';
        pub const COPY_DONE: u8 = b'c';
        pub const COPY_FAIL: u8 = b'f';
        /// PasswordMessage, SASLInitialResponse, SASLResponse, GSSResponse (startup only).
        pub const PASSWORD: u8 = b'p';
    }

    /// Tags of messages the server sends.
    pub mod backend {
        pub const AUTHENTICATION: u8 = b'R';
        pub const BACKEND_KEY_DATA: u8 = b'K';
        pub const PARAMETER_STATUS: u8 = b'S';
        pub const READY_FOR_QUERY: u8 = b'Z';
        pub const ERROR_RESPONSE: u8 = b'E';
        pub const NOTICE_RESPONSE: u8 = b'N';
        pub const NOTIFICATION_RESPONSE: u8 = b'A';
        pub const PARSE_COMPLETE: u8 = b'1';
        pub const BIND_COMPLETE: u8 = b'2';
        pub const CLOSE_COMPLETE: u8 = b'3';
        pub const PARAMETER_DESCRIPTION: u8 = b't';
        pub const ROW_DESCRIPTION: u8 = b'T';
        pub const NO_DATA: u8 = b'n';
        pub const DATA_ROW: u8 = b'D';
        pub const COMMAND_COMPLETE: u8 = b'C';
        pub const EMPTY_QUERY_RESPONSE: u8 = b'I';
        pub const PORTAL_SUSPENDED: u8 = b's';
        pub const FUNCTION_CALL_RESPONSE: u8 = b'V';
        pub const COPY_IN_RESPONSE: u8 = b'G';
        pub const COPY_OUT_RESPONSE: u8 = b'H';
        pub const COPY_BOTH_RESPONSE: u8 = b'W';
        pub const COPY_DATA: u8 = b'd';
        pub const COPY_DONE: u8 = b'c';
        pub const NEGOTIATE_PROTOCOL_VERSION: u8 = b'v';
    }
}

/// Why a message could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("{0} message is not of that type")]
    WrongTag(&'static str),
    #[error("{0} message is shorter than its header says")]
    Truncated(&'static str),
    #[error("invalid string in {0} message")]
    BadString(&'static str),
    #[error("invalid message format ({0}: bytes after its last field)")]
    Trailing(&'static str),
    #[error("invalid {0} message: {1}")]
    Invalid(&'static str, &'static str),
}

/// The header of a tagged message: tag, and its whole length including the tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub tag: u8,
    /// Tag + length word + body.
    pub len: usize,
}

/// Reads a message header from the front of `buf`; `None` until 5 bytes are there. The
/// length word is returned as sent (it may be < 4: the caller decides what that means).
pub fn header(buf: &[u8]) -> Option<(u8, u32)> {
    match buf {
        [tag, a, b, c, d, ..] => Some((*tag, u32::from_be_bytes([*a, *b, *c, *d]))),
        _ => None,
    }
}

/// The whole messages at the front of `buf`, each with its tag: stops at the first one that is
/// not there whole (or whose length word is impossible).
pub fn messages(buf: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    let mut rest = buf;
    std::iter::from_fn(move || {
        let (tag, len) = header(rest)?;
        if len < 4 {
            return None;
        }
        let msg = rest.get(..(len as usize).checked_add(1)?)?;
        rest = rest.get(msg.len()..).unwrap_or_default();
        Some((tag, msg))
    })
}

/// A bounds-checked reader over a message body, the way PostgreSQL's `pq_getmsg*` read one.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    /// The body of a whole message `msg` (tag and length included) whose tag must be `tag`.
    pub(crate) fn body(msg: &'a [u8], tag: u8, what: &'static str) -> Result<Self, WireError> {
        let Some((t, len)) = header(msg) else {
            return Err(WireError::Truncated(what));
        };
        if t != tag {
            return Err(WireError::WrongTag(what));
        }
        if len < 4 || msg.len() != 1 + len as usize {
            return Err(WireError::Truncated(what));
        }
        Ok(Reader {
            buf: msg.get(5..).unwrap_or_default(),
            what,
        })
    }

    pub(crate) fn u8(&mut self) -> Result<u8, WireError> {
        let (&b, rest) = self
            .buf
            .split_first()
            .ok_or(WireError::Truncated(self.what))?;
        self.buf = rest;
        Ok(b)
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.buf.len() < n {
            return Err(WireError::Truncated(self.what));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    pub(crate) fn i16(&mut self) -> Result<i16, WireError> {
        let b = self.bytes(2)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }

    pub(crate) fn i32(&mut self) -> Result<i32, WireError> {
        let b = self.bytes(4)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A NUL-terminated string, without its NUL.
    pub(crate) fn cstr(&mut self) -> Result<&'a [u8], WireError> {
        let end = self
            .buf
            .iter()
            .position(|&c| c == 0)
            .ok_or(WireError::BadString(self.what))?;
        let (s, rest) = self.buf.split_at(end);
        self.buf = rest.get(1..).unwrap_or_default();
        Ok(s)
    }

    /// Everything not read yet.
    pub(crate) fn rest(&self) -> &'a [u8] {
        self.buf
    }

    /// Like `pq_getmsgend`: nothing may be left.
    pub(crate) fn end(&self) -> Result<(), WireError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(WireError::Trailing(self.what))
        }
    }
}

#[cfg(test)]
pub(crate) fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    v.extend_from_slice(body);
    v
}
