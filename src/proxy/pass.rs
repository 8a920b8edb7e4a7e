//! Which statements need not wait at a closed gate (issue [scale], "only what must wait
//! waits"; docs/cutover.md).
//!
//! The gate holds an idle session's next message so that nothing runs against the migrated
//! tables across the swap under the rules from before it. A statement that names no migrated
//! table, sent by an idle session as one simple Query, has nothing to wait for: it is not
//! rewritten under either rules, and it cannot open a transaction the drain would then wait
//! for. Held anyway, conservatively:
//! - anything that may name a migrated table as an identifier (a column or alias of the same
//!   name included), or keyshift's own objects;
//! - transaction control and what can start or resume work the text does not show:
//!   `BEGIN`/`START`, `EXECUTE`, `CALL`, `DO`, `PREPARE`, `DECLARE`/`FETCH`/`MOVE`, `COPY`,
//!   `LOCK`, `LISTEN`;
//! - the extended protocol (a Parse, or a Bind of a statement prepared before), and a session
//!   without rules in force (a manual `/v1/pause` holds everything).
//!
//! A statement that passes may still read a migrated table through a view or a function; it
//! then waits for the swap's locks inside PostgreSQL, as any query would, and reads the tables
//! as they are when it gets them.

use super::statements::StatementRewriter;
use crate::rewrite::lex::{Kind, Lexer};

/// Words that make a simple Query wait at a closed gate whatever tables it names.
const HOLD: &[&str] = &[
    "begin", "start", "execute", "call", "do", "prepare", "declare", "fetch", "move", "copy",
    "lock", "listen", "keyshift",
];

/// Whether the simple Query `sql` may be forwarded while the gate is closed, under the
/// rewriter the session would use.
pub fn passes_closed_gate(sql: &[u8], rewriter: Option<&dyn StatementRewriter>) -> bool {
    let (Some(rewriter), Ok(sql)) = (rewriter, std::str::from_utf8(sql)) else {
        return false;
    };
    for t in Lexer::new(sql) {
        if matches!(t.kind, Kind::Word) {
            let word = sql.get(t.start..t.end).unwrap_or_default();
            if HOLD.iter().any(|h| word.eq_ignore_ascii_case(h))
                || word.to_ascii_lowercase().starts_with("keyshift")
            {
                return false;
            }
        }
    }
    !rewriter.may_name_migrated(sql)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::statements::Decision;

    /// Names `users` and nothing else.
    struct Users;
    impl StatementRewriter for Users {
        fn rewrite(&self, _sql: &str) -> Decision {
            Decision::Forward
        }
        fn may_name_migrated(&self, sql: &str) -> bool {
            sql.to_ascii_lowercase().contains("users")
        }
    }

    #[test]
    fn only_statements_that_cannot_touch_the_migration_pass() {
        let rw: &dyn StatementRewriter = &Users;
        for sql in [
            "SELECT 1",
            "SELECT abalance FROM pgbench_accounts WHERE aid = 7",
            "UPDATE orders SET paid = true WHERE id = 3; SELECT now()",
            "SET application_name = 'x'",
            "SELECT 'begin'",
        ] {
            assert!(passes_closed_gate(sql.as_bytes(), Some(rw)), "{sql}");
        }
        for sql in [
            "SELECT * FROM users",
            "BEGIN",
            "begin; SELECT 1",
            "START TRANSACTION",
            "EXECUTE q(1)",
            "CALL p()",
            "DO $$ BEGIN END $$",
            "COPY orders FROM STDIN",
            "LOCK orders",
            "SELECT * FROM keyshift_uuid_public.orders",
            "SELECT * FROM keyshift.migration",
        ] {
            assert!(!passes_closed_gate(sql.as_bytes(), Some(rw)), "{sql}");
        }
        assert!(!passes_closed_gate(b"SELECT 1", None), "no rules: hold");
        assert!(!passes_closed_gate(b"SELECT '\xff'", Some(rw)), "not UTF-8");
    }
}
