//! What a session's own SQL does to name resolution: `SET search_path` (also `SET LOCAL`,
//! `RESET`, `set_config`) and temporary tables that shadow a migrated table's name. The
//! rewriter resolves an unqualified table name through this session's path, with `pg_temp`
//! first as PostgreSQL does, instead of the configured one.
//!
//! Changes are taken when the statement is sent. A `SET` inside a transaction that then rolls
//! back is not undone here (documented): applications set their path once per connection.

use std::collections::BTreeSet;

use crate::rewrite::lex::{Kind, Lexer, quoted_inner};

/// A session's name-resolution state; the default is the configured search path, no temp
/// tables.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scope {
    /// The session's search path when it set one (`None`: the configured path).
    pub search_path: Option<Vec<String>>,
    /// `SET LOCAL`'s path, until the transaction ends.
    pub local_path: Option<Vec<String>>,
    /// Temporary tables the session created (unqualified names resolve to them first).
    pub temp: BTreeSet<String>,
    /// Migrated parents, as (schema, table), whose keys the session's role may not read: the
    /// dual-write's lookup of them would fail where the client's own statement succeeds, so
    /// their fills are left to the fill triggers, which run as their owner (issue [schema],
    /// least privilege). Set from the control link's reading of the privileges, not from SQL.
    pub unreadable: BTreeSet<(String, String)>,
}

impl Scope {
    pub fn is_default(&self) -> bool {
        self.search_path.is_none()
            && self.local_path.is_none()
            && self.temp.is_empty()
            && self.unreadable.is_empty()
    }

    /// The path in force: `SET LOCAL`'s, else the session's.
    pub fn path(&self) -> Option<&[String]> {
        self.local_path.as_deref().or(self.search_path.as_deref())
    }

    /// The transaction ended: `SET LOCAL` is over.
    pub fn transaction_ended(&mut self) -> bool {
        self.local_path.take().is_some()
    }

    /// Applies what `sql` does to the scope; true when it changed. `user` stands for
    /// `"$user"` in a path.
    pub fn observe(&mut self, sql: &str, user: &str) -> bool {
        if !may_change_scope(sql.as_bytes()) {
            return false;
        }
        let before = self.clone();
        let mut words: Vec<Word> = Vec::new();
        for t in Lexer::new(sql) {
            let raw = sql.as_bytes().get(t.start..t.end).unwrap_or_default();
            match t.kind {
                Kind::Punct(b';') => {
                    self.statement(&words, user);
                    words.clear();
                }
                Kind::Word => words.push(Word::Name(
                    String::from_utf8_lossy(raw).to_ascii_lowercase(),
                )),
                Kind::Quoted => words.push(Word::Name(
                    String::from_utf8_lossy(quoted_inner(raw)).replace("\"\"", "\""),
                )),
                Kind::Literal => words.push(Word::Literal(literal(raw))),
                Kind::Punct(c) => words.push(Word::Punct(c)),
                Kind::UnicodeQuoted => words.push(Word::Punct(0)),
            }
        }
        self.statement(&words, user);
        *self != before
    }

    fn statement(&mut self, w: &[Word], user: &str) {
        let name = |i: usize| match w.get(i) {
            Some(Word::Name(n)) => Some(n.as_str()),
            _ => None,
        };
        match (name(0), name(1), name(2)) {
            (Some("set"), Some("search_path"), _) => self.search_path = path_value(&w[2..], user),
            (Some("set"), Some("session"), Some("search_path")) => {
                self.search_path = path_value(&w[3..], user)
            }
            (Some("set"), Some("local"), Some("search_path")) => {
                self.local_path = path_value(&w[3..], user)
                    .or_else(|| Some(self.search_path.clone().unwrap_or_default()))
                    .filter(|p| !p.is_empty());
            }
            (Some("reset"), Some("search_path" | "all"), _) => self.search_path = None,
            (Some("discard"), Some("all"), _) => {
                *self = Scope {
                    unreadable: std::mem::take(&mut self.unreadable),
                    ..Scope::default()
                }
            }
            (Some("discard"), Some("temp" | "temporary"), _) => self.temp.clear(),
            (Some("create"), ..) => {
                // CREATE [GLOBAL | LOCAL] {TEMP | TEMPORARY} [UNLOGGED] TABLE [IF NOT EXISTS] name
                let mut i = 1;
                if matches!(name(i), Some("global" | "local")) {
                    i += 1;
                }
                let temp = matches!(name(i), Some("temp" | "temporary"));
                if temp {
                    i += 1;
                }
                if name(i) != Some("table") {
                    return;
                }
                i += 1;
                if name(i) == Some("if") && name(i + 1) == Some("not") {
                    i += 3;
                }
                match (name(i), w.get(i + 1), name(i + 2)) {
                    (Some("pg_temp"), Some(Word::Punct(b'.')), Some(n)) => {
                        self.temp.insert(n.to_string());
                    }
                    (Some(n), next, _) if temp && !matches!(next, Some(Word::Punct(b'.'))) => {
                        self.temp.insert(n.to_string());
                    }
                    _ => {}
                }
            }
            (Some("drop"), Some("table"), _) => {
                for word in &w[2..] {
                    if let Word::Name(n) = word {
                        self.temp.remove(n);
                    }
                }
            }
            _ => {
                // SELECT set_config('search_path', 'a, b', is_local)
                if let Some(i) = w
                    .iter()
                    .position(|x| matches!(x, Word::Name(n) if n == "set_config"))
                {
                    let args: Vec<&Word> = w[i + 1..]
                        .iter()
                        .filter(|x| !matches!(x, Word::Punct(b'(' | b',')))
                        .take(3)
                        .collect();
                    if let [Word::Literal(n), Word::Literal(v), local] = args.as_slice()
                        && n == "search_path"
                    {
                        let path = split_path(v, user);
                        if matches!(local, Word::Name(l) if l == "true") {
                            self.local_path = Some(path);
                        } else {
                            self.search_path = Some(path);
                        }
                    }
                }
            }
        }
    }
}

#[derive(Debug)]
enum Word {
    Name(String),
    Literal(String),
    Punct(u8),
}

/// A plain string literal's value (`''` unescaped); other literals as they are.
fn literal(raw: &[u8]) -> String {
    let s = String::from_utf8_lossy(raw);
    match s.strip_prefix('\'').and_then(|s| s.strip_suffix('\'')) {
        Some(inner) => inner.replace("''", "'"),
        None => s.into_owned(),
    }
}

/// `TO a, "B", 'c'` or `= DEFAULT`: `None` for DEFAULT (the configured path).
fn path_value(w: &[Word], user: &str) -> Option<Vec<String>> {
    let w = match w.first() {
        Some(Word::Name(n)) if n == "to" => &w[1..],
        Some(Word::Punct(b'=')) => &w[1..],
        _ => w,
    };
    if matches!(w.first(), Some(Word::Name(n)) if n == "default") {
        return None;
    }
    let mut out = Vec::new();
    for x in w {
        match x {
            Word::Name(n) => out.push(n.clone()),
            // A string in a path list is one schema name, taken as written.
            Word::Literal(l) => out.extend(split_path(l, user)),
            _ => {}
        }
    }
    Some(
        out.into_iter()
            .map(|s| if s == "$user" { user.to_string() } else { s })
            .collect(),
    )
}

/// `'a, "B", $user'` as set_config takes it: comma-separated, quoted names kept.
fn split_path(v: &str, user: &str) -> Vec<String> {
    v.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(
            |s| match s.strip_prefix('"').and_then(|s| s.strip_suffix('"')) {
                Some(q) => q.replace("\"\"", "\""),
                None => s.to_ascii_lowercase(),
            },
        )
        .map(|s| if s == "$user" { user.to_string() } else { s })
        .collect()
}

/// Whether `sql` may change the scope: one pass over the bytes for the words that can.
fn may_change_scope(sql: &[u8]) -> bool {
    sql.windows(4).any(|w| {
        let w0 = w[0] | 0x20;
        matches!(w0, b's' | b't' | b'r' | b'd')
            && (w.eq_ignore_ascii_case(b"sear")
                || w.eq_ignore_ascii_case(b"temp")
                || w.eq_ignore_ascii_case(b"rese")
                || w.eq_ignore_ascii_case(b"disc")
                || w.eq_ignore_ascii_case(b"drop"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn after(sqls: &[&str]) -> Scope {
        let mut s = Scope::default();
        for sql in sqls {
            s.observe(sql, "alice");
        }
        s
    }

    #[test]
    fn search_path_follows_set_reset_and_set_config() {
        let s = after(&["SET search_path TO app, \"Mixed\", public"]);
        assert_eq!(s.path().unwrap(), ["app", "Mixed", "public"]);
        let s = after(&["set search_path = '$user', public"]);
        assert_eq!(s.path().unwrap(), ["alice", "public"]);
        let s = after(&["SET search_path TO app", "RESET search_path"]);
        assert!(s.is_default());
        let s = after(&["SELECT set_config('search_path', 'x, \"Y\"', false)"]);
        assert_eq!(s.path().unwrap(), ["x", "Y"]);
        let mut s = after(&["SET search_path TO a", "SET LOCAL search_path TO b"]);
        assert_eq!(s.path().unwrap(), ["b"]);
        assert!(s.transaction_ended());
        assert_eq!(s.path().unwrap(), ["a"]);
        let s = after(&["SET search_path TO DEFAULT"]);
        assert!(s.is_default());
        // Inside a literal or comment, nothing.
        assert!(after(&["SELECT 'SET search_path TO x' -- set search_path to y"]).is_default());
    }

    #[test]
    fn temp_tables_shadow_until_dropped_or_discarded() {
        let s = after(&["CREATE TEMP TABLE c (id int, p_id int)"]);
        assert!(s.temp.contains("c"));
        let s = after(&["create temporary table if not exists \"C\" (x int); drop table \"C\""]);
        assert!(s.temp.is_empty());
        let s = after(&[
            "CREATE TABLE pg_temp.t (x int)",
            "CREATE TABLE real (x int)",
        ]);
        assert_eq!(s.temp.iter().collect::<Vec<_>>(), ["t"]);
        let s = after(&["CREATE TEMP TABLE t (x int)", "DISCARD ALL"]);
        assert!(s.is_default());
    }
}
