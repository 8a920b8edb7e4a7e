//! Whether a statement shape may run as `EXECUTE name(literal, …)` of a statement prepared
//! from its rewrite, with exactly the effect of the text itself.
//!
//! A session that inlines its values (the simple protocol) makes PostgreSQL parse and plan
//! every text; with keyshift's rewrite that text is longer (a scalar subquery per FK twin).
//! Preparing the rewrite of the shape once per session and executing it with the literals
//! saves that planning, but only where a parameter behaves exactly as the literal it
//! replaces. That holds for an item of an INSERT's VALUES list: the literal and the
//! parameter both become the target column's type by an assignment cast (`EXECUTE` coerces
//! its arguments to the parameter types by assignment; the parameter's type is inferred from
//! the column), so `1.5` into an integer column is 2 either way and `'x'` fails the same
//! way. Anywhere else the two can differ (`int_col = 1.5` compares as numeric with a literal
//! but would round with an integer parameter; `'a' || 'b'` has no type for parameters), so
//! the shape is kept as text.

use sqlparser::ast::{Expr, Statement, Value};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

use super::insert::plain_values;

/// `shape` ([`super::shape::normalize`]) has `literals` placeholders: true when it is one
/// INSERT … VALUES whose every placeholder is a whole item of the VALUES list.
pub fn preparable(shape: &str, literals: usize) -> bool {
    let Ok(statements) = Parser::parse_sql(&PostgreSqlDialect {}, shape) else {
        return false;
    };
    let [Statement::Insert(ins)] = &statements[..] else {
        return false;
    };
    let Some(values) = ins.source.as_deref().and_then(plain_values) else {
        return false;
    };
    let direct = values
        .rows
        .iter()
        .flat_map(|row| &row.content)
        .filter(|e| matches!(e, Expr::Value(v) if matches!(v.value, Value::Placeholder(_))))
        .count();
    // Every placeholder of the text is one of these: none sits in an expression, the
    // ON CONFLICT clause or RETURNING.
    direct == literals
}

#[cfg(test)]
mod tests {
    use super::super::shape::normalize;
    use super::*;

    fn check(sql: &str) -> bool {
        let s = normalize(sql).expect("has literals");
        preparable(&s.text, s.literals.len())
    }

    #[test]
    fn values_items_only() {
        assert!(check("INSERT INTO t (a, b) VALUES (1, 'x')"));
        assert!(check(
            "INSERT INTO t (a, b) VALUES (1, 'x'), (2, 'y') RETURNING id"
        ));
        assert!(check("INSERT INTO t VALUES (1, DEFAULT, NULL, now(), 'x')"));
        assert!(check(
            "INSERT INTO t (a, b) VALUES (1, 'x') ON CONFLICT (a) DO UPDATE SET b = EXCLUDED.b"
        ));
        // Literals inside expressions, casts, other clauses and other statements.
        assert!(!check("INSERT INTO t (a) VALUES (-1)"));
        assert!(!check("INSERT INTO t (a) VALUES ('2020-01-01'::date)"));
        assert!(!check("INSERT INTO t (a) VALUES ('a' || 'b')"));
        assert!(!check(
            "INSERT INTO t (a, b) VALUES (1, 'x') ON CONFLICT (a) DO UPDATE SET b = 'y'"
        ));
        assert!(!check("INSERT INTO t (a) VALUES (1) RETURNING id + 1"));
        assert!(!check("INSERT INTO t (a) SELECT 1"));
        assert!(!check("UPDATE t SET a = 1 WHERE id = 2"));
        assert!(!check(
            "INSERT INTO t (a) VALUES (1); INSERT INTO t (a) VALUES (2)"
        ));
        assert!(!check("WITH x AS (SELECT 1) INSERT INTO t (a) VALUES (2)"));
    }
}
