//! Builders for the messages keyshift sends on its own or changes: every message is built
//! with its length word computed from what was written, never by hand.

use bytes::{BufMut, BytesMut};

use super::frontend::{Bind, Named, Parse};
use super::tag::frontend as t;

/// Writes one message: the tag, a length word filled in at the end, and the body.
fn message(out: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    let start = out.len();
    out.put_u8(tag);
    out.put_u32(0);
    body(out);
    let len = (out.len() - start - 1) as u32;
    out[start + 1..start + 5].copy_from_slice(&len.to_be_bytes());
}

/// `Query(sql)`.
pub fn query(out: &mut BytesMut, sql: &[u8]) {
    message(out, t::QUERY, |b| {
        b.put_slice(sql);
        b.put_u8(0);
    });
}

/// `Parse(name, sql, types)`, `types` as a [`Parse`] view carries them (count and OIDs).
pub fn parse(out: &mut BytesMut, name: &[u8], sql: &[u8], types: &[u8]) {
    message(out, t::PARSE, |b| {
        b.put_slice(name);
        b.put_u8(0);
        b.put_slice(sql);
        b.put_u8(0);
        if types.is_empty() {
            b.put_u16(0);
        } else {
            b.put_slice(types);
        }
    });
}

/// The client's Parse with another SQL text (and maybe another name).
pub fn parse_with(out: &mut BytesMut, p: &Parse<'_>, name: &[u8], sql: &[u8]) {
    parse(out, name, sql, p.types);
}

/// The client's Bind, naming `statement` instead.
pub fn bind_with(out: &mut BytesMut, b: &Bind<'_>, statement: &[u8]) {
    message(out, t::BIND, |o| {
        o.put_slice(b.portal);
        o.put_u8(0);
        o.put_slice(statement);
        o.put_u8(0);
        o.put_slice(b.rest);
    });
}

/// The client's Describe or Close, naming `name` instead.
pub fn named_with(out: &mut BytesMut, n: &Named<'_>, name: &[u8]) {
    let kind = match n.target {
        super::frontend::Target::Statement => b'S',
        super::frontend::Target::Portal => b'P',
    };
    message(out, n.tag, |o| {
        o.put_u8(kind);
        o.put_slice(name);
        o.put_u8(0);
    });
}

/// `Close` of the prepared statement `name`.
/// `Describe` of the prepared statement `name`.
pub fn describe_statement(out: &mut BytesMut, name: &[u8]) {
    message(out, t::DESCRIBE, |b| {
        b.put_u8(b'S');
        b.put_slice(name);
        b.put_u8(0);
    });
}

pub fn close_statement(out: &mut BytesMut, name: &[u8]) {
    message(out, t::CLOSE, |b| {
        b.put_u8(b'S');
        b.put_slice(name);
        b.put_u8(0);
    });
}

/// The ErrorResponse or NoticeResponse `fields` came from (tag `tag`), with field `code`
/// set to `value`.
pub fn fields_with(
    out: &mut BytesMut,
    tag: u8,
    fields: &super::backend::Fields<'_>,
    code: u8,
    value: &[u8],
) {
    message(out, tag, |b| {
        for (c, v) in fields.iter() {
            b.put_u8(c);
            b.put_slice(if c == code { value } else { v });
            b.put_u8(0);
        }
        b.put_u8(0);
    });
}

/// `Sync`.
pub fn sync(out: &mut BytesMut) {
    message(out, t::SYNC, |_| {});
}

#[cfg(test)]
mod tests {
    use super::super::frontend::{Bind, Named, Parse, Query};
    use super::super::msg;
    use super::*;

    #[test]
    fn round_trips() {
        let mut out = BytesMut::new();
        query(&mut out, b"SELECT 1");
        assert_eq!(Query::read(&out).unwrap().sql, b"SELECT 1");

        let m = msg(b'P', b"s1\0INSERT\0\0\x01\0\0\0\x17");
        let p = Parse::read(&m).unwrap();
        let mut out = BytesMut::new();
        parse_with(&mut out, &p, b"s1", b"INSERT");
        assert_eq!(&out[..], &m[..]);
        let mut out = BytesMut::new();
        parse(&mut out, b"", b"", b"");
        assert_eq!(&out[..], &[b'P', 0, 0, 0, 8, 0, 0, 0, 0]);

        let m = msg(b'B', b"p\0\0\0\0\0\0\0\0");
        let mut out = BytesMut::new();
        bind_with(&mut out, &Bind::read(&m).unwrap(), b"ks");
        assert_eq!(&out[..], &msg(b'B', b"p\0ks\0\0\0\0\0\0\0")[..]);
        Bind::read(&out).unwrap();

        let m = msg(b'D', b"S\0");
        let mut out = BytesMut::new();
        named_with(&mut out, &Named::read(&m).unwrap(), b"ks");
        assert_eq!(&out[..], &msg(b'D', b"Sks\0")[..]);

        let e = msg(b'E', b"SERROR\0C22P02\0P121\0Mbad\0\0");
        let f = super::super::backend::Fields::read(&e).unwrap();
        let mut out = BytesMut::new();
        fields_with(&mut out, b'E', &f, b'P', b"39");
        assert_eq!(&out[..], &msg(b'E', b"SERROR\0C22P02\0P39\0Mbad\0\0")[..]);

        let mut out = BytesMut::new();
        close_statement(&mut out, b"ks");
        sync(&mut out);
        assert_eq!(
            &out[..],
            &[b'C', 0, 0, 0, 8, b'S', b'k', b's', 0, b'S', 0, 0, 0, 4]
        );
    }
}
