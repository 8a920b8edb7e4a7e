//! What the relay does with the SQL of `Query` and `Parse` messages when a rewriter is active:
//! ask it, rebuild the message when the SQL changes, and remember the named prepared
//! statements it changed (so that cutover can prepare them again under new rules).
//!
//! The relay knows nothing about migrations: it talks to a [`StatementRewriter`], which the
//! rewrite module implements for the live rule set. SQL that is not valid UTF-8 (a client
//! with `client_encoding = LATIN1`, say) is never handed over: it passes as it came.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::{BufMut, BytesMut};

/// The rewriter's answer for one SQL string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Send the SQL as it is.
    Forward,
    /// Send this SQL instead.
    Replace(Arc<str>),
    /// Refuse the statement (strict mode): PostgreSQL itself raises `message` with SQLSTATE
    /// 0A000 when the statement would have run, so the transaction state stays PostgreSQL's.
    Refuse(Arc<str>),
}

/// Implemented by the rewrite module; must be cheap for SQL that touches no migrated table.
pub trait StatementRewriter: Send + Sync {
    fn rewrite(&self, sql: &str) -> Decision;

    /// For the SQL of a simple Query: the decision, and with a `Replace`, when the statement
    /// may equally run as `EXECUTE` of a statement prepared from a template, that template.
    fn rewrite_query(&self, sql: &str) -> (Decision, Option<QueryTemplate>) {
        (self.rewrite(sql), None)
    }

    /// Called when Prometheus scrapes: bring counters the rewriter keeps itself up to date.
    fn observe_metrics(&self) {}
}

/// A simple Query that may run as `EXECUTE name(args)` of a statement prepared as
/// `PREPARE name AS template`, to the same effect (src/rewrite/preparable.rs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryTemplate {
    pub template: Arc<str>,
    /// The arguments, as SQL: the Query's literals, comma-separated.
    pub args: String,
}

/// The rewriter in force, swapped atomically by whoever loads rules.
pub struct ActiveRewriter {
    /// The database the migration lives in: sessions connected to another database of the
    /// same server are never rewritten. `None` applies to every session (tests).
    pub database: Option<String>,
    pub rewriter: Box<dyn StatementRewriter>,
}

impl ActiveRewriter {
    pub fn applies_to(&self, database: &str) -> bool {
        self.database.as_deref().is_none_or(|d| d == database)
    }
}

/// A `Query` or `Parse` message taken apart.
pub struct SqlMessage<'a> {
    pub tag: u8,
    /// Parse only: the statement name ("" = unnamed).
    pub name: &'a [u8],
    pub sql: &'a [u8],
    /// Parse only: everything after the SQL (parameter type count and OIDs).
    pub rest: &'a [u8],
}

/// Splits a whole `Query` or `Parse` message (tag and length included). `None` if malformed;
/// the caller forwards it and lets PostgreSQL complain.
pub fn split(msg: &[u8]) -> Option<SqlMessage<'_>> {
    let body = msg.get(5..)?;
    let nul = |b: &[u8]| b.iter().position(|&c| c == 0);
    match msg.first()? {
        b'Q' => {
            let end = nul(body)?;
            Some(SqlMessage {
                tag: b'Q',
                name: &[],
                sql: &body[..end],
                rest: &[],
            })
        }
        b'P' => {
            let n = nul(body)?;
            let after = &body[n + 1..];
            let s = nul(after)?;
            Some(SqlMessage {
                tag: b'P',
                name: &body[..n],
                sql: &after[..s],
                rest: &after[s + 1..],
            })
        }
        _ => None,
    }
}

/// Builds the message again with `sql` in place of the original.
pub fn rebuild(m: &SqlMessage<'_>, sql: &str, out: &mut BytesMut) {
    let len = 4 + match m.tag {
        b'P' => m.name.len() + 1 + sql.len() + 1 + m.rest.len(),
        _ => sql.len() + 1,
    };
    out.reserve(1 + len);
    out.put_u8(m.tag);
    out.put_u32(len as u32);
    if m.tag == b'P' {
        out.put_slice(m.name);
        out.put_u8(0);
    }
    out.put_slice(sql.as_bytes());
    out.put_u8(0);
    out.put_slice(m.rest);
}

/// A refusal in flight. The refused statement is replaced by `marker`, SQL that PostgreSQL
/// rejects in its raw parser, so PostgreSQL itself fails the statement at the right place in
/// the stream: it skips the rest of the extended-protocol sequence, marks an open transaction
/// failed, and answers ReadyForQuery with the true status. The relay then swaps PostgreSQL's
/// syntax error for keyshift's own ErrorResponse (0A000, `message`).
#[derive(Debug)]
pub struct Refusal {
    pub marker: String,
    pub message: Arc<str>,
    /// ReadyForQuery messages due before the one that ends this statement's sequence.
    pub ready_before: u32,
}

impl Refusal {
    pub fn new(id: u64, message: Arc<str>, ready_before: u32) -> Refusal {
        Refusal {
            marker: format!("keyshift_refused_{id:x}"),
            message,
            ready_before,
        }
    }
}

/// The `M` (message) field of an ErrorResponse.
pub fn error_message(msg: &[u8]) -> Option<&[u8]> {
    error_field(msg, b'M')
}

/// A field of an ErrorResponse (`C`: SQLSTATE, `M`: message, …).
pub fn error_field(msg: &[u8], field: u8) -> Option<&[u8]> {
    let mut f = msg.get(5..)?;
    while let Some((&code, rest)) = f.split_first() {
        if code == 0 {
            return None;
        }
        let nul = rest.iter().position(|&b| b == 0)?;
        if code == field {
            return Some(&rest[..nul]);
        }
        f = &rest[nul + 1..];
    }
    None
}

/// Named prepared statements keyshift may have to prepare again when the rules change, by
/// name: those it rewrote, and, on a proxy linked to a migration, those it passed through
/// before any rule existed (an application prepares its statements when it connects, often
/// long before `expand`). Each with the client's original SQL, the parameter-type tail of its
/// Parse message, and the text the server prepared when keyshift rewrote it.
#[derive(Default, Debug)]
pub struct Prepared {
    map: HashMap<Box<[u8]>, PreparedSql>,
}

/// A statement to prepare again: its name, original SQL, Parse tail, and the text to prepare.
#[derive(Debug)]
pub struct Reprepare {
    pub name: Box<[u8]>,
    pub sql: Arc<str>,
    pub rest: Box<[u8]>,
    pub text: Arc<str>,
}

#[derive(Debug)]
struct PreparedSql {
    sql: Arc<str>,
    rest: Box<[u8]>,
    /// What the server has, when it is not `sql` itself.
    sent: Option<Arc<str>>,
}

impl Prepared {
    /// `sent` is the rewritten text forwarded instead of `original`, if any.
    pub fn remember(&mut self, name: &[u8], original: &str, rest: &[u8], sent: Option<&str>) {
        if !name.is_empty() {
            self.map.insert(
                name.into(),
                PreparedSql {
                    sql: original.into(),
                    rest: rest.into(),
                    sent: sent.map(Into::into),
                },
            );
        }
    }

    pub fn forget(&mut self, name: &[u8]) {
        if !self.map.is_empty() {
            self.map.remove(name);
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The statements whose text on the server differs from what `rewrite` makes of their
    /// original SQL now. Records that text as the server's, since the caller prepares it.
    pub fn changed(&mut self, mut rewrite: impl FnMut(&str) -> Option<String>) -> Vec<Reprepare> {
        let mut out = Vec::new();
        for (name, p) in self.map.iter_mut() {
            let now: Option<Arc<str>> = rewrite(&p.sql).map(Into::into);
            if now != p.sent {
                let text = now.clone().unwrap_or_else(|| p.sql.clone());
                p.sent = now;
                out.push(Reprepare {
                    name: name.clone(),
                    sql: p.sql.clone(),
                    rest: p.rest.clone(),
                    text,
                });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_msg(name: &str, sql: &str, types: &[u32]) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(name.as_bytes());
        body.push(0);
        body.extend_from_slice(sql.as_bytes());
        body.push(0);
        body.extend_from_slice(&(types.len() as i16).to_be_bytes());
        for t in types {
            body.extend_from_slice(&t.to_be_bytes());
        }
        let mut m = vec![b'P'];
        m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        m.extend(body);
        m
    }

    #[test]
    fn parse_round_trips_with_new_sql() {
        let m = parse_msg("s1", "INSERT INTO c VALUES ($1)", &[23]);
        let s = split(&m).unwrap();
        assert_eq!(s.name, b"s1");
        assert_eq!(s.sql, b"INSERT INTO c VALUES ($1)");
        let mut out = BytesMut::new();
        rebuild(&s, "INSERT INTO c (a, b) VALUES ($1, 2)", &mut out);
        assert_eq!(
            &out[..],
            &parse_msg("s1", "INSERT INTO c (a, b) VALUES ($1, 2)", &[23])[..]
        );
        let mut same = BytesMut::new();
        rebuild(&s, "INSERT INTO c VALUES ($1)", &mut same);
        assert_eq!(&same[..], &m[..]);
    }

    #[test]
    fn query_round_trips() {
        let mut m = vec![b'Q', 0, 0, 0, 13];
        m.extend_from_slice(b"SELECT 1\0");
        let s = split(&m).unwrap();
        assert_eq!(s.sql, b"SELECT 1");
        let mut out = BytesMut::new();
        rebuild(&s, "SELECT 1", &mut out);
        assert_eq!(&out[..], &m[..]);
        assert!(split(&[b'Q', 0, 0, 0, 5, b'x']).is_none());
    }

    #[test]
    fn finds_error_message() {
        let mut m = vec![b'E', 0, 0, 0, 0];
        m.extend_from_slice(
            b"SERROR\0C42601\0Msyntax error at or near \"keyshift_refused_1f\"\0\0",
        );
        assert_eq!(
            error_message(&m),
            Some(&b"syntax error at or near \"keyshift_refused_1f\""[..])
        );
        assert_eq!(error_message(b"E\0\0\0\x05\0"), None);
        assert_eq!(
            Refusal::new(31, "x".into(), 0).marker,
            "keyshift_refused_1f"
        );
    }

    #[test]
    fn prepared_tracking() {
        let mut p = Prepared::default();
        p.remember(b"", "ignored", b"", None);
        p.remember(b"a", "INSERT 1", b"\0\0", Some("INSERT 1, 2"));
        assert_eq!(p.len(), 1);
        p.forget(b"a");
        assert!(p.is_empty());
        // Prepared before any rule: prepared again once a rule rewrites it, and only then.
        p.remember(b"b", "INSERT b", b"", None);
        assert!(p.changed(|_| None).is_empty());
        let c = p.changed(|s| Some(format!("{s} rewritten")));
        assert_eq!(c.len(), 1);
        assert_eq!(&*c[0].text, "INSERT b rewritten");
        assert!(p.changed(|s| Some(format!("{s} rewritten"))).is_empty());
        // Back to passthrough: the original text again.
        assert_eq!(&*p.changed(|_| None)[0].text, "INSERT b");
    }
}
