//! Server-side statements keyshift prepares for a session's unnamed Parse messages.
//!
//! Drivers that use the extended protocol without naming their statements (pgbench
//! `-M extended`, libpq's `PQexecParams`, psycopg 3 and JDBC before their prepare thresholds)
//! send `Parse("", sql)`, Bind, Execute, Sync for every execution, so PostgreSQL parses,
//! analyses and plans the text every time. A text keyshift rewrote is longer (a scalar
//! subquery per FK twin), and planning it at every execution is most of what dual-write costs
//! beyond a trigger, whose lookup plpgsql plans once per session (docs/benchmarks.md,
//! "Dual-write cost").
//!
//! So when a session sends the same rewritten text a second time, keyshift prepares it under a
//! name of its own (`keyshift_<random>_s<N>`) and points the client's unnamed statement at that name:
//! later Parse messages of the text become `Parse("", "")` (PostgreSQL answers the same
//! ParseComplete, at no planning cost), and Bind and Describe of the unnamed statement name
//! keyshift's statement instead. The server's answers are those of the unnamed statement, so
//! nothing is synthesised and nothing is swallowed on the hot path.
//!
//! Where this could differ from what PostgreSQL would have done, it steps aside:
//! - A statement is used only after PostgreSQL answered its own Parse with ParseComplete (the
//!   session's reply queue reports it, src/proxy/replies.rs), so a text that fails to prepare,
//!   or whose Parse PostgreSQL skipped after an earlier error, keeps its own answer, never
//!   "prepared statement does not exist".
//! - In a failed transaction, or behind anything still running (a pipeline, where an earlier
//!   message may fail), the Parse goes as it came: PostgreSQL must refuse the Parse itself,
//!   not answer ParseComplete and refuse the Bind, and a Parse it skips must leave the client's
//!   unnamed statement what it was, not keyshift's (fuzz seed 9801, case 230).
//! - A simple Query, a Close of the unnamed statement or another unnamed Parse ends the alias,
//!   as they end the unnamed statement in PostgreSQL.
//! - New rules (cutover, rollback) retire every statement; a text that mentions DISCARD or
//!   DEALLOCATE makes keyshift forget them, since the client may just have dropped them. If
//!   the client's unnamed statement was one of them, the session prepares the client's text
//!   as the unnamed statement again before the client next binds it ([`Self::take_restore`]).
//! - Names carry a random part drawn per session (`keyshift_<hex>_s1`): a client that names
//!   `keyshift_s1` in a Parse, a `DEALLOCATE` or an `EXECUTE` meets its own statement, as on
//!   PostgreSQL. (They do show in `pg_prepared_statements`.)
//! - At most `limit` statements per session; past it, texts are sent as before.
//!
//! Simple Query messages get the same treatment where it is exact: a text whose shape is an
//! INSERT … VALUES of literals (src/rewrite/preparable.rs) is prepared from the rewritten
//! shape with a `PREPARE` keyshift sends after the client's Query (its answers swallowed),
//! and once that succeeded, later texts of the shape run as `EXECUTE keyshift_<random>_q<N>(literals)`,
//! which answers with the INSERT's own command tag and rows.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;
use std::sync::Arc;

/// What to send for one unnamed Parse of a rewritten text.
#[derive(Debug, PartialEq, Eq)]
pub enum ParseAction {
    /// The rewritten text as the unnamed statement, as without this module.
    Forward,
    /// `Parse(name, text, types)`: prepare keyshift's statement (the client's unnamed
    /// statement now means it).
    Prepare(Arc<[u8]>),
    /// `Parse("", "")`: the statement is already prepared under `name`.
    Reuse(Arc<[u8]>),
}

/// One session's statements.
#[derive(Debug)]
pub struct ServerStatements {
    limit: usize,
    next_id: u64,
    /// By rewritten text, then by the Parse's parameter-type tail.
    by_text: HashMap<Arc<str>, Vec<Typed>>,
    count: usize,
    /// Hashes of texts seen once: a text is prepared the second time it comes, so one-off
    /// texts do not use up the session's statements.
    seen_once: HashSet<u64>,
    hasher: RandomState,
    /// What the client's unnamed statement currently is on the server, when keyshift's.
    alias: Option<Alias>,
    /// Statements whose Parse PostgreSQL has not answered yet.
    unconfirmed: Vec<Unconfirmed>,
    /// The client's unnamed statement, when keyshift's statement standing for it was dropped
    /// (DEALLOCATE ALL, DISCARD ALL): to prepare again before the client binds it.
    restore: Option<Restore>,
    /// Per-session part of keyshift's statement names.
    prefix: String,
    /// Names of statements to close when the session is next idle.
    to_close: Vec<Arc<[u8]>>,
    /// Statements prepared from simple-Query shapes, by template.
    queries: HashMap<Arc<str>, QueryEntry>,
    /// Moves when every statement is retired or forgotten: a PREPARE still running then is
    /// closed when it ends.
    generation: u64,
}

/// What to do with a simple Query whose rewrite may run as `EXECUTE`.
#[derive(Debug, PartialEq, Eq)]
pub enum QueryAction {
    /// Send the rewritten text.
    Forward,
    /// Send the rewritten text, then `PREPARE name AS template` as keyshift's own Query; report
    /// its end with [`ServerStatements::query_prepared`].
    Prepare(PendingPrepare),
    /// Send `EXECUTE name(args)` instead.
    Execute(Arc<[u8]>),
}

/// A PREPARE of keyshift's in flight.
#[derive(Debug, PartialEq, Eq)]
pub struct PendingPrepare {
    pub template: Arc<str>,
    pub name: Arc<[u8]>,
    generation: u64,
}

#[derive(Debug)]
struct QueryEntry {
    name: Arc<[u8]>,
    state: QueryState,
}

#[derive(Debug, PartialEq, Eq)]
enum QueryState {
    Preparing,
    Ready,
    /// PostgreSQL refused the PREPARE: this session sends the texts.
    Failed,
}

/// A Parse's parameter-type tail and the statement prepared with it.
type Typed = (Box<[u8]>, Entry);

#[derive(Debug)]
struct Entry {
    name: Arc<[u8]>,
    /// Its sequence ended without an error: the server has it.
    ready: bool,
}

#[derive(Debug)]
struct Alias {
    name: Arc<[u8]>,
    /// False once the statement left `by_text` (new rules): closed when the alias ends.
    owned: bool,
    /// What the client's unnamed statement is: the rewritten text and parameter types.
    sql: Arc<str>,
    types: Box<[u8]>,
}

/// The client's unnamed statement to prepare again: rewritten text, parameter types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restore {
    pub sql: Arc<str>,
    pub types: Box<[u8]>,
}

/// A statement whose Parse PostgreSQL has not answered yet.
#[derive(Debug)]
struct Unconfirmed {
    name: Arc<[u8]>,
    sql: Arc<str>,
    types: Box<[u8]>,
}

impl ServerStatements {
    /// Up to `limit` statements per session; 0 turns this off.
    pub fn new(limit: usize) -> ServerStatements {
        ServerStatements {
            limit,
            next_id: 0,
            by_text: HashMap::new(),
            count: 0,
            seen_once: HashSet::new(),
            hasher: RandomState::new(),
            alias: None,
            unconfirmed: Vec::new(),
            restore: None,
            prefix: format!("keyshift_{:08x}_", rand::random::<u32>()),
            to_close: Vec::new(),
            queries: HashMap::new(),
            generation: 0,
        }
    }

    /// Forgets every statement and prepares none from now on (the upstream turned out to be a
    /// transaction pooler, src/proxy/pooling.rs): nothing is closed, since the server
    /// connection they are on is no longer this session's. The name prefix stays, so that an
    /// answer still to come about one of them is recognised.
    pub fn disable(&mut self) {
        let prefix = std::mem::take(&mut self.prefix);
        *self = ServerStatements {
            prefix,
            ..ServerStatements::new(0)
        };
    }

    /// Something of keyshift's is prepared on the server (or about to be).
    pub fn active(&self) -> bool {
        self.count > 0 || self.alias.is_some() || !self.queries.is_empty() || self.restore.is_some()
    }

    /// The name Bind and Describe of the unnamed statement must use instead.
    pub fn alias(&self) -> Option<&[u8]> {
        self.alias.as_ref().map(|a| &*a.name)
    }

    /// An unnamed Parse whose text keyshift rewrote to `sql`. `quiet`: the Parse is first in
    /// its sequence, nothing runs before it and the transaction is not failed, so PostgreSQL
    /// cannot refuse or skip it for a reason of the client's.
    pub fn unnamed_parse(&mut self, sql: &Arc<str>, types: &[u8], quiet: bool) -> ParseAction {
        self.end_alias();
        if self.limit == 0 || !quiet {
            return ParseAction::Forward;
        }
        if let Some(e) = self
            .by_text
            .get(&**sql)
            .and_then(|v| v.iter().find(|(t, _)| **t == *types))
            .map(|(_, e)| e)
        {
            if !e.ready {
                // Its sequence is still running: the server may not have it yet.
                return ParseAction::Forward;
            }
            let name = Arc::clone(&e.name);
            self.alias = Some(Alias {
                name: Arc::clone(&name),
                owned: true,
                sql: Arc::clone(sql),
                types: types.into(),
            });
            return ParseAction::Reuse(name);
        }
        if !self.room(self.hasher.hash_one((&**sql, types))) {
            return ParseAction::Forward;
        }
        let name = self.new_name("s");
        self.by_text.entry(Arc::clone(sql)).or_default().push((
            types.into(),
            Entry {
                name: Arc::clone(&name),
                ready: false,
            },
        ));
        self.count += 1;
        self.unconfirmed.push(Unconfirmed {
            name: Arc::clone(&name),
            sql: Arc::clone(sql),
            types: types.into(),
        });
        self.alias = Some(Alias {
            name: Arc::clone(&name),
            owned: true,
            sql: Arc::clone(sql),
            types: types.into(),
        });
        ParseAction::Prepare(name)
    }

    /// A simple Query rewritten to an instance of `template`. `quiet`: nothing runs before it
    /// (no sequence in flight, no extended-protocol sequence open) and the transaction is not
    /// failed, so that keyshift's PREPARE cannot fail for a reason of the client's.
    pub fn query(&mut self, template: &Arc<str>, quiet: bool) -> QueryAction {
        if self.limit == 0 || !quiet {
            return QueryAction::Forward;
        }
        if let Some(e) = self.queries.get(template) {
            return match e.state {
                QueryState::Ready => QueryAction::Execute(Arc::clone(&e.name)),
                QueryState::Preparing | QueryState::Failed => QueryAction::Forward,
            };
        }
        if !self.room(self.hasher.hash_one(&**template)) {
            return QueryAction::Forward;
        }
        let name = self.new_name("q");
        self.queries.insert(
            Arc::clone(template),
            QueryEntry {
                name: Arc::clone(&name),
                state: QueryState::Preparing,
            },
        );
        self.count += 1;
        QueryAction::Prepare(PendingPrepare {
            template: Arc::clone(template),
            name,
            generation: self.generation,
        })
    }

    /// keyshift's PREPARE ended; `sqlstate` is its error's when it failed.
    pub fn query_prepared(&mut self, p: PendingPrepare, sqlstate: Option<&[u8]>) {
        if p.generation != self.generation {
            // Retired or forgotten while it ran.
            if sqlstate.is_none() {
                self.to_close.push(p.name);
            }
            return;
        }
        let Some(e) = self.queries.get_mut(&p.template) else {
            return;
        };
        match sqlstate {
            None => e.state = QueryState::Ready,
            // In a failed transaction: nothing wrong with the statement, try another time.
            Some(b"25P02") => {
                self.queries.remove(&p.template);
                self.count -= 1;
                self.seen_once.insert(self.hasher.hash_one(&*p.template));
            }
            Some(_) => e.state = QueryState::Failed,
        }
    }

    /// Under the limit, and the second time this hash comes: one-off texts do not use up the
    /// session's statements.
    fn room(&mut self, h: u64) -> bool {
        if self.count >= self.limit {
            return false;
        }
        if self.seen_once.len() >= self.limit.saturating_mul(8).max(64) {
            self.seen_once.clear();
        }
        if self.seen_once.insert(h) {
            return false;
        }
        self.seen_once.remove(&h);
        true
    }

    fn new_name(&mut self, kind: &str) -> Arc<[u8]> {
        self.next_id += 1;
        format!("{}{kind}{}", self.prefix, self.next_id)
            .into_bytes()
            .into()
    }

    /// The client's unnamed statement is no longer keyshift's: an unnamed Parse sent as it
    /// came, a Close of the unnamed statement, or a simple Query (which drops it in PostgreSQL).
    pub fn end_alias(&mut self) {
        if let Some(a) = self.alias.take()
            && !a.owned
        {
            self.to_close.push(a.name);
        }
    }

    /// PostgreSQL answered keyshift's Parse of `name`: `done` when with ParseComplete.
    pub fn parse_outcome(&mut self, name: &[u8], done: bool) {
        let Some(i) = self.unconfirmed.iter().position(|u| &*u.name == name) else {
            // Retired or forgotten meanwhile.
            return;
        };
        let Unconfirmed { sql, types, .. } = self.unconfirmed.swap_remove(i);
        let Some(v) = self.by_text.get_mut(&*sql) else {
            return;
        };
        let Some(i) = v.iter().position(|(t, _)| *t == types) else {
            return;
        };
        if done {
            v[i].1.ready = true;
            return;
        }
        // Refused or skipped: never rely on it. The server may have it anyway (an error
        // after the Parse), so it is closed, and the name is never used again.
        let (_, e) = v.swap_remove(i);
        if v.is_empty() {
            self.by_text.remove(&*sql);
        }
        self.count -= 1;
        self.retire(e.name);
    }

    /// New rules: every statement was rewritten under the old ones. Called when the session is
    /// idle, so no sequence is running.
    pub fn retire_all(&mut self) {
        self.unconfirmed.clear();
        self.generation += 1;
        // A PREPARE still running is closed when it ends (`query_prepared`).
        let ready: Vec<Arc<[u8]>> = self
            .queries
            .drain()
            .filter(|(_, e)| e.state == QueryState::Ready)
            .map(|(_, e)| e.name)
            .collect();
        self.to_close.extend(ready);
        let names: Vec<Arc<[u8]>> = self
            .by_text
            .drain()
            .flat_map(|(_, v)| v.into_iter().map(|(_, e)| e.name))
            .collect();
        self.count = 0;
        for name in names {
            self.retire(name);
        }
    }

    /// The client's SQL may have dropped prepared statements (DISCARD, DEALLOCATE): forget them
    /// all. Names are never reused, so one that still exists cannot collide; at worst it stays
    /// until the session ends.
    pub fn forget_all(&mut self) {
        self.generation += 1;
        self.queries.clear();
        self.by_text.clear();
        self.unconfirmed.clear();
        self.count = 0;
        if let Some(a) = self.alias.take() {
            // The client's unnamed statement may have gone with keyshift's: prepare it again
            // before the client next uses it.
            self.restore = Some(Restore {
                sql: a.sql,
                types: a.types,
            });
        }
        self.to_close.clear();
    }

    /// The client's unnamed statement to prepare again now, before a Bind or Describe of it.
    pub fn take_restore(&mut self) -> Option<Restore> {
        self.restore.take()
    }

    /// The client's unnamed statement as keyshift's alias stands for it, if one does: what to
    /// restore if the message about to end the alias turns out never to run.
    pub fn alias_restore(&self) -> Option<Restore> {
        self.alias.as_ref().map(|a| Restore {
            sql: Arc::clone(&a.sql),
            types: a.types.clone(),
        })
    }

    /// The client's unnamed statement is still `r` after all (the message that would have
    /// replaced it was skipped): prepare it again before the client next uses it.
    pub fn set_restore(&mut self, r: Restore) {
        self.restore = Some(r);
    }

    /// A statement to close at the session's next idle moment (one keyshift prepared for the
    /// client that must not run any more).
    pub fn close_later(&mut self, name: &[u8]) {
        self.to_close.push(name.into());
    }

    /// The per-session part of keyshift's statement names (`keyshift_<hex>_`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn has_restore(&self) -> bool {
        self.restore.is_some()
    }

    /// The client's unnamed statement to prepare again, still armed.
    pub fn restore(&self) -> Option<&Restore> {
        self.restore.as_ref()
    }

    /// The client replaced or dropped its unnamed statement: nothing to restore.
    pub fn unnamed_replaced(&mut self) {
        self.restore = None;
        self.end_alias();
    }

    /// Statements to close now (the session is idle).
    pub fn take_closes(&mut self) -> Vec<Arc<[u8]>> {
        std::mem::take(&mut self.to_close)
    }

    pub fn has_closes(&self) -> bool {
        !self.to_close.is_empty()
    }

    fn retire(&mut self, name: Arc<[u8]>) {
        match &mut self.alias {
            // The client's unnamed statement still means it: close it when that ends.
            Some(a) if a.name == name => a.owned = false,
            _ => self.to_close.push(name),
        }
    }
}

/// Whether `sql` mentions DISCARD or DEALLOCATE (any case), which can drop prepared statements.
pub fn may_drop_statements(sql: &[u8]) -> bool {
    sql.windows(7).any(|w| {
        (w[0] | 0x20) == b'd'
            && (w.eq_ignore_ascii_case(b"discard") || w.eq_ignore_ascii_case(b"dealloc"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sql(s: &str) -> Arc<str> {
        Arc::from(s)
    }

    const T: &[u8] = &[0, 0];

    impl ServerStatements {
        /// PostgreSQL answered every Parse of keyshift's with ParseComplete.
        fn confirm_all(&mut self) {
            let names: Vec<_> = self.unconfirmed.iter().map(|u| u.name.clone()).collect();
            for n in names {
                self.parse_outcome(&n, true);
            }
        }
    }

    #[test]
    fn names_are_per_session_and_dropped_aliases_are_restored() {
        let (mut s, mut t) = (ServerStatements::new(4), ServerStatements::new(4));
        let a = sql("INSERT a");
        for st in [&mut s, &mut t] {
            parse(st, &a);
        }
        let (ParseAction::Prepare(n1), ParseAction::Prepare(n2)) =
            (parse(&mut s, &a), parse(&mut t, &a))
        else {
            panic!()
        };
        assert_ne!(n1, n2, "{n1:?}");
        assert!(n1.starts_with(b"keyshift_"));
        // DEALLOCATE ALL while the client's unnamed statement is keyshift's.
        s.forget_all();
        assert_eq!(s.alias(), None);
        assert_eq!(
            s.take_restore(),
            Some(Restore {
                sql: a.clone(),
                types: T.into()
            })
        );
        assert_eq!(s.take_restore(), None);
        // A skipped Parse is never relied on.
        t.parse_outcome(&n2, false);
        assert_eq!(t.take_closes(), Vec::<Arc<[u8]>>::new());
        t.end_alias();
        assert_eq!(t.take_closes(), vec![n2]);
    }

    /// Sends `text` as an unnamed Parse whose sequence ends with the next ReadyForQuery.
    fn parse(s: &mut ServerStatements, text: &Arc<str>) -> ParseAction {
        s.unnamed_parse(text, T, true)
    }

    #[test]
    fn prepares_on_second_sight_and_reuses_once_confirmed() {
        let mut s = ServerStatements::new(4);
        let a = sql("INSERT a");
        assert_eq!(parse(&mut s, &a), ParseAction::Forward);
        s.confirm_all();
        let ParseAction::Prepare(name) = parse(&mut s, &a) else {
            panic!("second sight prepares")
        };
        assert_eq!(s.alias(), Some(&*name));
        // Before its sequence ends the statement is not relied on.
        assert_eq!(s.unnamed_parse(&a, T, false), ParseAction::Forward);
        assert_eq!(s.alias(), None);
        s.confirm_all();
        assert_eq!(parse(&mut s, &a), ParseAction::Reuse(name.clone()));
        assert_eq!(s.alias(), Some(&*name));
        // Other parameter types are another statement.
        assert_eq!(
            s.unnamed_parse(&a, &[0, 1, 0, 0, 0, 23], true),
            ParseAction::Forward
        );
        assert_eq!(s.alias(), None);
        assert!(!s.has_closes());
    }

    #[test]
    fn a_failed_sequence_retires_the_statement() {
        let mut s = ServerStatements::new(4);
        let a = sql("INSERT a");
        parse(&mut s, &a);
        s.confirm_all();
        let ParseAction::Prepare(name) = parse(&mut s, &a) else {
            panic!()
        };
        s.parse_outcome(&name, false);
        s.end_alias();
        assert!(!s.active());
        assert_eq!(s.take_closes(), vec![name]);
        // Seen again from the start: once forwarded, then prepared under a new name.
        assert_eq!(parse(&mut s, &a), ParseAction::Forward);
        s.confirm_all();
        assert!(matches!(parse(&mut s, &a), ParseAction::Prepare(n) if n.ends_with(b"_s2")));
    }

    #[test]
    fn behind_running_sequences_nothing_is_prepared_or_reused() {
        let mut s = ServerStatements::new(4);
        let a = sql("INSERT a");
        for _ in 0..3 {
            assert_eq!(s.unnamed_parse(&a, T, false), ParseAction::Forward);
        }
        parse(&mut s, &a);
        s.confirm_all();
        assert!(matches!(parse(&mut s, &a), ParseAction::Prepare(_)));
        s.confirm_all();
        assert!(matches!(parse(&mut s, &a), ParseAction::Reuse(_)));
        assert_eq!(s.unnamed_parse(&a, T, false), ParseAction::Forward);
    }

    #[test]
    fn new_rules_retire_statements_but_not_the_one_in_use() {
        let mut s = ServerStatements::new(4);
        let (a, b) = (sql("INSERT a"), sql("INSERT b"));
        for text in [&a, &b, &a, &b] {
            parse(&mut s, text);
            s.confirm_all();
        }
        let ParseAction::Reuse(in_use) = parse(&mut s, &a) else {
            panic!()
        };
        s.retire_all();
        let closes = s.take_closes();
        assert_eq!(closes.len(), 1);
        assert_ne!(closes[0], in_use);
        assert_eq!(s.alias(), Some(&*in_use));
        s.end_alias();
        assert_eq!(s.take_closes(), vec![in_use]);
    }

    #[test]
    fn limit_and_failed_transactions_forward() {
        let mut s = ServerStatements::new(1);
        let (a, b) = (sql("INSERT a"), sql("INSERT b"));
        for _ in 0..2 {
            parse(&mut s, &a);
            s.confirm_all();
        }
        for _ in 0..3 {
            assert_eq!(parse(&mut s, &b), ParseAction::Forward);
            s.confirm_all();
        }
        assert_eq!(s.unnamed_parse(&a, T, false), ParseAction::Forward);
        let mut off = ServerStatements::new(0);
        for _ in 0..3 {
            assert_eq!(parse(&mut off, &a), ParseAction::Forward);
            off.confirm_all();
        }
        assert!(!off.active());
    }

    #[test]
    fn query_shapes_prepare_then_execute() {
        let mut s = ServerStatements::new(4);
        let t = sql("INSERT t VALUES ($1)");
        assert_eq!(s.query(&t, true), QueryAction::Forward);
        let QueryAction::Prepare(p) = s.query(&t, true) else {
            panic!("second sight prepares")
        };
        let name = p.name.clone();
        // Still running: the text goes as it is.
        assert_eq!(s.query(&t, true), QueryAction::Forward);
        s.query_prepared(p, None);
        assert_eq!(s.query(&t, true), QueryAction::Execute(name.clone()));
        assert_eq!(s.query(&t, false), QueryAction::Forward);
        // New rules: closed, and prepared again from the new template.
        s.retire_all();
        assert_eq!(s.take_closes(), vec![name]);
        assert_eq!(s.query(&t, true), QueryAction::Forward);
        assert!(matches!(s.query(&t, true), QueryAction::Prepare(_)));
    }

    #[test]
    fn a_refused_prepare_is_not_retried_unless_the_transaction_was_failed() {
        let mut s = ServerStatements::new(4);
        let (a, b) = (sql("a"), sql("b"));
        for (t, state) in [(&a, &b"42P18"[..]), (&b, &b"25P02"[..])] {
            s.query(t, true);
            let QueryAction::Prepare(p) = s.query(t, true) else {
                panic!()
            };
            s.query_prepared(p, Some(state));
        }
        for _ in 0..3 {
            assert_eq!(s.query(&a, true), QueryAction::Forward);
        }
        assert!(matches!(s.query(&b, true), QueryAction::Prepare(_)));
    }

    #[test]
    fn a_prepare_that_ends_after_new_rules_is_closed() {
        let mut s = ServerStatements::new(4);
        let t = sql("INSERT t VALUES ($1)");
        s.query(&t, true);
        let QueryAction::Prepare(p) = s.query(&t, true) else {
            panic!()
        };
        let name = p.name.clone();
        s.retire_all();
        assert!(s.take_closes().is_empty());
        s.query_prepared(p, None);
        assert_eq!(s.take_closes(), vec![name]);
        assert_eq!(s.query(&t, true), QueryAction::Forward);
    }

    #[test]
    fn recognises_statements_that_drop_prepared_statements() {
        assert!(may_drop_statements(b"DISCARD ALL"));
        assert!(may_drop_statements(b"deallocate prepare keyshift_s1"));
        assert!(may_drop_statements(b"select 1; DeAlLoCaTe all"));
        assert!(!may_drop_statements(b"INSERT INTO t VALUES (1)"));
        assert!(!may_drop_statements(b"disc"));
    }
}
