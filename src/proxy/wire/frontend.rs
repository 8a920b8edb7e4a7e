//! Views of the client messages keyshift reads: Query, Parse, Bind, Describe, Close, Execute.
//!
//! Each view is built from one whole message (tag and length included) and checks it the way
//! PostgreSQL reads it (src/backend/tcop/postgres.c): every string NUL-terminated, counts as
//! unsigned 16-bit integers, nothing after the last field.

use super::tag::frontend as t;
use super::{Reader, WireError};

/// Whether `tag` starts a message PostgreSQL accepts from a client after startup. Any other
/// byte makes PostgreSQL end the session ("invalid frontend message type").
pub fn is_known_tag(tag: u8) -> bool {
    matches!(
        tag,
        t::QUERY
            | t::PARSE
            | t::BIND
            | t::DESCRIBE
            | t::EXECUTE
            | t::CLOSE
            | t::SYNC
            | t::FLUSH
            | t::TERMINATE
            | t::FUNCTION_CALL
            | t::COPY_DATA
            | t::COPY_DONE
            | t::COPY_FAIL
    )
}

/// Whether PostgreSQL accepts a message of this type during COPY FROM STDIN (CopyData,
/// CopyDone, CopyFail; Flush and Sync are read and ignored). Any other type ends the
/// session with 08P01.
pub fn continues_copy(tag: u8) -> bool {
    matches!(
        tag,
        t::COPY_DATA | t::COPY_DONE | t::COPY_FAIL | t::FLUSH | t::SYNC
    )
}

/// The longest message of this type PostgreSQL reads: 10,000 bytes for the small ones
/// (`PQ_SMALL_MESSAGE_LIMIT`), otherwise the 1 GB allocation limit. A longer length word makes
/// PostgreSQL close the connection without a word.
pub fn max_len(tag: u8) -> usize {
    match tag {
        t::CLOSE
        | t::DESCRIBE
        | t::EXECUTE
        | t::FLUSH
        | t::SYNC
        | t::TERMINATE
        | t::COPY_DONE
        | t::COPY_FAIL => 10_000,
        _ => 0x3fff_fffe,
    }
}

/// `Query`: one SQL string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Query<'a> {
    pub sql: &'a [u8],
}

impl<'a> Query<'a> {
    pub fn read(msg: &'a [u8]) -> Result<Self, WireError> {
        let mut r = Reader::body(msg, t::QUERY, "Query")?;
        let sql = r.cstr()?;
        r.end()?;
        Ok(Query { sql })
    }
}

/// `Parse`: statement name, SQL, parameter types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parse<'a> {
    /// Empty for the unnamed statement.
    pub name: &'a [u8],
    pub sql: &'a [u8],
    /// The parameter types as sent: a count, then that many OIDs. Kept as bytes so that a
    /// rebuilt Parse carries them unchanged.
    pub types: &'a [u8],
}

impl<'a> Parse<'a> {
    pub fn read(msg: &'a [u8]) -> Result<Self, WireError> {
        let mut r = Reader::body(msg, t::PARSE, "Parse")?;
        let name = r.cstr()?;
        let sql = r.cstr()?;
        let types = r.rest();
        let n = r.i16()? as u16;
        r.bytes(usize::from(n) * 4)?;
        r.end()?;
        Ok(Parse { name, sql, types })
    }

    /// The number of parameter types given.
    pub fn type_count(&self) -> u16 {
        match self.types {
            [a, b, ..] => u16::from_be_bytes([*a, *b]),
            _ => 0,
        }
    }
}

/// `Bind`: portal, statement, and the rest (formats, values, result formats), checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bind<'a> {
    pub portal: &'a [u8],
    pub statement: &'a [u8],
    /// Everything after the statement name, as sent.
    pub rest: &'a [u8],
}

impl<'a> Bind<'a> {
    pub fn read(msg: &'a [u8]) -> Result<Self, WireError> {
        let mut r = Reader::body(msg, t::BIND, "Bind")?;
        let portal = r.cstr()?;
        let statement = r.cstr()?;
        let rest = r.rest();
        let formats = r.i16()? as u16;
        r.bytes(usize::from(formats) * 2)?;
        let values = r.i16()? as u16;
        for _ in 0..values {
            match r.i32()? {
                -1 => {}
                n if n < 0 => return Err(WireError::Invalid("Bind", "negative value length")),
                n => {
                    r.bytes(n as usize)?;
                }
            }
        }
        let results = r.i16()? as u16;
        r.bytes(usize::from(results) * 2)?;
        r.end()?;
        Ok(Bind {
            portal,
            statement,
            rest,
        })
    }

    /// The portal and statement names only, the rest as sent and unchecked: PostgreSQL looks
    /// the statement up before it reads the rest, so a Bind malformed after its names still
    /// meets the statement it names (and the error says so).
    pub fn head(msg: &'a [u8]) -> Result<Self, WireError> {
        let mut r = Reader::body(msg, t::BIND, "Bind")?;
        let portal = r.cstr()?;
        let statement = r.cstr()?;
        Ok(Bind {
            portal,
            statement,
            rest: r.rest(),
        })
    }
}

/// What a Describe or Close names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Statement,
    Portal,
}

/// `Describe` or `Close`: the same body, a kind byte and a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Named<'a> {
    pub tag: u8,
    pub target: Target,
    pub name: &'a [u8],
}

impl<'a> Named<'a> {
    /// A `Describe` (`tag` D) or `Close` (`tag` C).
    pub fn read(msg: &'a [u8]) -> Result<Self, WireError> {
        let (tag, what) = match msg.first() {
            Some(&t::DESCRIBE) => (t::DESCRIBE, "Describe"),
            Some(&t::CLOSE) => (t::CLOSE, "Close"),
            _ => return Err(WireError::WrongTag("Describe or Close")),
        };
        let mut r = Reader::body(msg, tag, what)?;
        let kind = r.u8()?;
        let name = r.cstr()?;
        r.end()?;
        let target = match kind {
            b'S' => Target::Statement,
            b'P' => Target::Portal,
            _ => return Err(WireError::Invalid(what, "kind is neither S nor P")),
        };
        Ok(Named { tag, target, name })
    }

    /// Names the unnamed statement.
    pub fn is_unnamed_statement(&self) -> bool {
        self.target == Target::Statement && self.name.is_empty()
    }
}

/// `Execute`: portal and row limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Execute<'a> {
    pub portal: &'a [u8],
    pub max_rows: i32,
}

impl<'a> Execute<'a> {
    pub fn read(msg: &'a [u8]) -> Result<Self, WireError> {
        let mut r = Reader::body(msg, t::EXECUTE, "Execute")?;
        let portal = r.cstr()?;
        let max_rows = r.i32()?;
        r.end()?;
        Ok(Execute { portal, max_rows })
    }
}

/// Whether the message at the front of `buf`, if it is there whole, is a Bind or a Describe of
/// the unnamed statement.
pub fn next_uses_unnamed_statement(buf: &[u8]) -> bool {
    let Some((tag, len)) = super::header(buf) else {
        return false;
    };
    let Some(msg) = buf.get(..(len as usize).saturating_add(1)) else {
        return false;
    };
    match tag {
        t::BIND => Bind::read(msg).is_ok_and(|b| b.statement.is_empty()),
        t::DESCRIBE => Named::read(msg).is_ok_and(|d| d.is_unnamed_statement()),
        _ => false,
    }
}

/// `Sync` and `Flush` carry nothing; PostgreSQL refuses one that does ("invalid message
/// format"), which for a Flush starts a skip to the next Sync.
pub fn is_empty_body(msg: &[u8]) -> bool {
    msg.len() == 5
}

#[cfg(test)]
mod tests {
    use super::super::msg;
    use super::*;

    #[test]
    fn query() {
        assert_eq!(
            Query::read(&msg(b'Q', b"SELECT 1\0")).unwrap().sql,
            b"SELECT 1"
        );
        // The case: bytes after the terminator are refused, as PostgreSQL refuses them.
        assert_eq!(
            Query::read(&msg(b'Q', b"INSERT 1\0garbage\0")),
            Err(WireError::Trailing("Query"))
        );
        assert_eq!(
            Query::read(&msg(b'Q', b"no nul")),
            Err(WireError::BadString("Query"))
        );
        assert!(Query::read(&msg(b'P', b"x\0")).is_err());
        // A length word that disagrees with the bytes.
        let mut m = msg(b'Q', b"SELECT 1\0");
        m.pop();
        assert!(Query::read(&m).is_err());
        assert!(Query::read(&[b'Q', 0, 0, 0, 3]).is_err());
        assert!(Query::read(&[]).is_err());
    }

    #[test]
    fn parse() {
        let p_msg = msg(b'P', b"s1\0INSERT\0\0\x01\0\0\0\x17");
        let p = Parse::read(&p_msg).unwrap();
        assert_eq!(
            (p.name, p.sql, p.type_count()),
            (&b"s1"[..], &b"INSERT"[..], 1)
        );
        assert_eq!(p.types, b"\0\x01\0\0\0\x17");
        assert!(Parse::read(&msg(b'P', b"s1\0INSERT\0\0\x02\0\0\0\x17")).is_err());
        assert!(Parse::read(&msg(b'P', b"s1\0INSERT\0\0\0\0")).is_err());
        assert!(Parse::read(&msg(b'P', b"s1\0INSERT")).is_err());
        assert!(Parse::read(&msg(b'P', b"s1\0INSERT\0")).is_err());
        // A count of 0xffff is 65535 types, as PostgreSQL reads it, not -1.
        assert!(Parse::read(&msg(b'P', b"\0x\0\xff\xff")).is_err());
    }

    #[test]
    fn bind() {
        let body = b"portal\0stmt\0\0\x01\0\x01\0\x02\0\0\0\x02hi\xff\xff\xff\xff\0\0";
        let b_msg = msg(b'B', body);
        let b = Bind::read(&b_msg).unwrap();
        assert_eq!((b.portal, b.statement), (&b"portal"[..], &b"stmt"[..]));
        assert_eq!(b.rest, &body[12..]);
        // Bogus counts and lengths.
        assert!(Bind::read(&msg(b'B', b"\0\0\0\x05\0\0\0\0")).is_err());
        assert!(Bind::read(&msg(b'B', b"\0\0\0\0\0\x01\xff\xff\xff\xfe\0\0")).is_err());
        assert!(Bind::read(&msg(b'B', b"\0\0\0\0\0\x01\0\0\0\x09ab\0\0")).is_err());
        assert!(Bind::read(&msg(b'B', b"\0\0\0\0\0\0\0\0x")).is_err());
        assert!(Bind::read(&msg(b'B', b"no-nul")).is_err());
    }

    #[test]
    fn describe_and_close() {
        let d_msg = msg(b'D', b"S\0");
        let d = Named::read(&d_msg).unwrap();
        assert!(d.is_unnamed_statement());
        let c_msg = msg(b'C', b"Pcur\0");
        let c = Named::read(&c_msg).unwrap();
        assert_eq!(
            (c.tag, c.target, c.name),
            (b'C', Target::Portal, &b"cur"[..])
        );
        // The five bytes from the issue: a Close whose body is just `S`.
        assert_eq!(
            Named::read(&[b'C', 0, 0, 0, 5, b'S']),
            Err(WireError::BadString("Close"))
        );
        assert!(Named::read(&msg(b'C', b"")).is_err());
        assert!(Named::read(&msg(b'D', b"X\0")).is_err());
        assert!(Named::read(&msg(b'D', b"S\0\0")).is_err());
    }

    #[test]
    fn execute_and_empty() {
        let e_msg = msg(b'E', b"\0\0\0\0\x05");
        let e = Execute::read(&e_msg).unwrap();
        assert_eq!((e.portal, e.max_rows), (&b""[..], 5));
        assert!(Execute::read(&msg(b'E', b"\0\0\0")).is_err());
        assert!(is_empty_body(&msg(b'S', b"")));
        assert!(!is_empty_body(&msg(b'H', b"x")));
        assert!(is_known_tag(b'F') && !is_known_tag(b'Z') && !is_known_tag(0));
    }
}
