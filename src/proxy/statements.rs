//! What the relay does with the SQL of `Query` and `Parse` messages when a rewriter is active:
//! ask it, rebuild the message when the SQL changes, and remember the named prepared
//! statements it changed (so that cutover can prepare them again under new rules).
//!
//! The relay knows nothing about migrations: it talks to a [`StatementRewriter`], which the
//! rewrite module implements for the live rule set. SQL that is not valid UTF-8 (a client
//! with `client_encoding = LATIN1`, say) is never handed over: it passes as it came.

use std::collections::HashMap;

use crate::rewrite::lex::Kind;
use crate::shape::Shape;
use std::sync::Arc;

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

    /// This rewriter as one session resolves names (its `SET search_path`, its temporary
    /// tables), or `None` when it does not depend on them.
    fn scoped(&self, _scope: &super::scope::Scope) -> Option<Arc<dyn StatementRewriter>> {
        None
    }

    /// Whether `sql` may name a migrated table (parent or child, as any identifier): such a
    /// statement must wait at a closed gate (src/proxy/pass.rs). True when unsure.
    fn may_name_migrated(&self, _sql: &str) -> bool {
        true
    }
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
    /// For sessions in the physical shape (and any shape the phase does not serve).
    pub rewriter: Box<dyn StatementRewriter>,
    /// For sessions of the other shape, which it points at keyshift's views of that shape;
    /// `None` while that shape is not served (the uuid shape before harden).
    pub translated: Option<(Shape, Box<dyn StatementRewriter>)>,
}

impl ActiveRewriter {
    pub fn applies_to(&self, database: &str) -> bool {
        self.database.as_deref().is_none_or(|d| d == database)
    }

    /// The rewriter a session of `shape` uses.
    pub fn for_shape(&self, shape: Shape) -> &dyn StatementRewriter {
        match &self.translated {
            Some((s, rw)) if *s == shape => &**rw,
            _ => &*self.rewriter,
        }
    }
}

/// The SQL a refused statement is replaced with: PostgreSQL rejects it in its raw parser
/// (42601), so PostgreSQL itself fails the statement at the right place in the stream: it
/// skips the rest of an extended-protocol sequence, marks an open transaction failed, and
/// answers ReadyForQuery with the true status. The relay knows which ErrorResponse answers it
/// (its reply queue) and sends keyshift's own (0A000, naming the table) in its place.
pub const REFUSAL_MARKER: &str = "keyshift_refused";

/// Prepared statements a client's SQL drops when it runs.
#[derive(Debug, PartialEq, Eq)]
pub enum Dropped {
    /// `DEALLOCATE ALL`, `DISCARD ALL`.
    All,
    /// `DEALLOCATE [PREPARE] name`, in PostgreSQL's case folding.
    Names(Vec<Vec<u8>>),
}

/// What `DEALLOCATE` and `DISCARD ALL` statements in `sql` drop; `None` when there are none
/// (the usual case, decided by one pass over the bytes).
pub fn dropped_statements(sql: &[u8]) -> Option<Dropped> {
    if !crate::proxy::server_statements::may_drop_statements(sql) {
        return None;
    }
    let text = String::from_utf8_lossy(sql);
    let mut names = Vec::new();
    // Each statement's words and quoted identifiers, through the rewriter's lexer (literals,
    // comments and dollar quotes are not words), split at `;`.
    let mut words: Vec<Vec<u8>> = Vec::new();
    // `None` after the last token ends the last statement as `;` ends the others.
    let tokens = crate::rewrite::lex::Lexer::new(&text)
        .map(Some)
        .chain([None]);
    for t in tokens {
        match t.map(|t| {
            (
                t.kind,
                text.as_bytes().get(t.start..t.end).unwrap_or_default(),
            )
        }) {
            Some((Kind::Word, raw)) => words.push(raw.to_ascii_lowercase()),
            Some((Kind::Quoted, raw)) => words.push(unquoted(raw)),
            Some((Kind::Punct(b';'), _)) | None => {
                let w = |i: usize| words.get(i).map(Vec::as_slice);
                match (w(0), w(1), w(2), w(3)) {
                    (Some(b"discard"), Some(b"all"), None, _)
                    | (Some(b"deallocate"), Some(b"all"), None, _)
                    | (Some(b"deallocate"), Some(b"prepare"), Some(b"all"), None) => {
                        return Some(Dropped::All);
                    }
                    (Some(b"deallocate"), Some(b"prepare"), Some(n), None)
                    | (Some(b"deallocate"), Some(n), None, _) => names.push(n.to_vec()),
                    _ => {}
                }
                words.clear();
            }
            Some(_) => {}
        }
    }
    (!names.is_empty()).then_some(Dropped::Names(names))
}

/// A quoted identifier's name: between the quotes, `""` standing for `"`.
fn unquoted(raw: &[u8]) -> Vec<u8> {
    let inner = crate::rewrite::lex::quoted_inner(raw);
    let mut out = Vec::with_capacity(inner.len());
    let mut quote = false;
    for &c in inner {
        if c == b'"' && quote {
            quote = false;
            continue;
        }
        quote = c == b'"';
        out.push(c);
    }
    out
}

/// Where an error position (`P`, 1-based, in characters) in the text keyshift sent lies in
/// the client's text. The rewriter only inserts text, so the two align: the common prefix and
/// suffix exactly, what lies between them greedily. A position inside inserted text points
/// at a copy of one of the client's expressions (the FK value copied into the twin's lookup):
/// it maps to where that token first appears in the client's text, else to the insertion.
///
/// `insert_only` is false for an `EXECUTE name(literals)` keyshift ran instead of the client's
/// INSERT: only the token search applies there.
pub fn map_error_position(original: &str, sent: &str, p: usize, insert_only: bool) -> usize {
    let o: Vec<char> = original.chars().collect();
    let s: Vec<char> = sent.chars().collect();
    let Some(target) = p.checked_sub(1).filter(|&t| t < s.len()) else {
        return p.min(o.len() + 1);
    };
    if !insert_only {
        return find_token(&o, &s, target).map_or(1, |at| at + 1);
    }
    let prefix = o.iter().zip(&s).take_while(|(a, b)| a == b).count();
    let suffix = o[prefix..]
        .iter()
        .rev()
        .zip(s[prefix..].iter().rev())
        .take_while(|(a, b)| a == b)
        .count();
    if target < prefix {
        return p;
    }
    if target >= s.len() - suffix {
        return o.len() - (s.len() - target) + 1;
    }
    // Between: walk the middle, matching the client's characters in order.
    let (mut i, mut j) = (prefix, prefix);
    let o_end = o.len() - suffix;
    let mut insertion_at = prefix;
    while j < s.len() - suffix {
        let matched = i < o_end && o[i] == s[j];
        if j == target {
            if matched {
                return i + 1;
            }
            break;
        }
        if matched {
            i += 1;
        } else if i > 0 && o.get(i - 1) == s.get(j.saturating_sub(1)) {
            insertion_at = i;
        }
        j += 1;
    }
    // Inside inserted text: the token there, found in the client's text.
    if let Some(at) = find_token(&o, &s, target) {
        return at + 1;
    }
    insertion_at.max(i).min(o.len()) + 1
}

/// Where the token that starts at `s[target]` (a quoted literal or a word) first appears in
/// `o`.
fn find_token(o: &[char], s: &[char], target: usize) -> Option<usize> {
    let token: Vec<char> = match *s.get(target)? {
        q @ ('\'' | '"') => {
            let end = s[target + 1..]
                .iter()
                .position(|&c| c == q)
                .map_or(s.len(), |e| target + e + 2);
            s[target..end].to_vec()
        }
        _ => s[target..]
            .iter()
            .take_while(|c| c.is_alphanumeric() || matches!(c, '_' | '$' | '.'))
            .copied()
            .collect(),
    };
    if token.is_empty() {
        return None;
    }
    o.windows(token.len()).position(|w| w == token.as_slice())
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
    /// What the client was told about it, when it asked (Describe of the statement).
    pub told: Option<Told>,
}

/// What PostgreSQL told the client about a prepared statement: its ParameterDescription and
/// its RowDescription (column names and types; `None` for NoData). A driver caches this and
/// decodes every later row with it, so keyshift never lets it change under the same name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Told {
    pub params: Vec<u32>,
    pub columns: Option<Columns>,
}

/// A RowDescription's column names and type OIDs.
pub type Columns = Vec<(Box<[u8]>, u32)>;

impl Told {
    /// The parameter-type tail of a Parse that fixes these types.
    pub fn parse_tail(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(2 + 4 * self.params.len());
        out.extend_from_slice(&(self.params.len() as u16).to_be_bytes());
        for t in &self.params {
            out.extend_from_slice(&t.to_be_bytes());
        }
        out
    }
}

#[derive(Debug)]
struct PreparedSql {
    sql: Arc<str>,
    rest: Box<[u8]>,
    told: Option<Told>,
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
                    told: None,
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

    pub fn contains(&self, name: &[u8]) -> bool {
        self.map.contains_key(name)
    }

    /// The ParameterDescription the client got for `name`.
    pub fn told_params(&mut self, name: &[u8], params: Vec<u32>) {
        if let Some(p) = self.map.get_mut(name) {
            p.told.get_or_insert_with(Told::default).params = params;
        }
    }

    /// The RowDescription (or NoData: `None`) the client got for `name`.
    pub fn told_columns(&mut self, name: &[u8], columns: Option<Columns>) {
        if let Some(p) = self.map.get_mut(name) {
            p.told.get_or_insert_with(Told::default).columns = columns;
        }
    }

    pub fn told(&self, name: &[u8]) -> Option<&Told> {
        self.map.get(name).and_then(|p| p.told.as_ref())
    }

    /// `DEALLOCATE ALL`, `DISCARD ALL`.
    pub fn clear(&mut self) {
        self.map.clear();
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
                    told: p.told.clone(),
                });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_positions_map_back_to_the_client_text() {
        let o = "UPDATE mcp_servers SET connector_id = 'abc' WHERE id = 4";
        let s = "UPDATE mcp_servers SET connector_id = 'abc', connector_id_uuid = (SELECT id_uuid FROM public.connectors WHERE id = ('abc')::integer) WHERE id = 4";
        // The copied literal maps to the client's own.
        let at = s.find("('abc')").unwrap() + 2;
        assert_eq!(map_error_position(o, s, at, true), 39);
        // Before and after the insertion, exactly.
        assert_eq!(map_error_position(o, s, 39, true), 39);
        let id = s.rfind("id = 4").unwrap() + 1;
        assert_eq!(
            map_error_position(o, s, id, true),
            o.rfind("id = 4").unwrap() + 1
        );
        // Two insertions (column list, value), multibyte text before them.
        let o = "INSERT INTO c (é, p_id) VALUES ('x', 7) RETURNING zz";
        let s = "INSERT INTO c (é, p_id, p_id_uuid) VALUES ('x', 7, (SELECT id_uuid FROM p WHERE id = (7)::integer)) RETURNING zz";
        let zz = s.chars().count() - 1;
        assert_eq!(map_error_position(o, s, zz, true), o.chars().count() - 1);
        let x = s.find("'x'").unwrap() + 1;
        assert_eq!(
            map_error_position(o, s, x - 1, true),
            o.find("'x'").unwrap()
        );
        // EXECUTE of keyshift's statement in place of an INSERT of literals.
        let o = "INSERT INTO c (a, p_id) VALUES ('abc', 'q2')";
        assert_eq!(
            map_error_position(o, "EXECUTE ks_q1('abc', 'q2')", 15, false),
            33
        );
        // Out of range stays in range.
        assert_eq!(map_error_position("ab", "abc", 9, true), 3);
    }

    #[test]
    fn finds_dropped_statements() {
        assert_eq!(dropped_statements(b"INSERT INTO t VALUES (1)"), None);
        assert_eq!(dropped_statements(b"DEALLOCATE ALL"), Some(Dropped::All));
        assert_eq!(dropped_statements(b"discard all"), Some(Dropped::All));
        assert_eq!(
            dropped_statements(b"deallocate prepare all"),
            Some(Dropped::All)
        );
        assert_eq!(
            dropped_statements(b"DEALLOCATE S1; select 1; DEALLOCATE PREPARE \"Q;x\""),
            Some(Dropped::Names(vec![b"s1".to_vec(), b"Q;x".to_vec()]))
        );
        assert_eq!(dropped_statements(b"SELECT 'deallocate all'"), None);
        assert_eq!(dropped_statements(b"DISCARD PLANS"), None);
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
