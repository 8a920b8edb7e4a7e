//! The relay's rewrite hook, with a stand-in rewriter: SQL of Query and Parse is handed over,
//! replaced or refused in place, and anything not valid UTF-8 passes untouched.
mod common;

use std::sync::Arc;

use common::proxy::TestProxy;
use keyshift::proxy::statements::{ActiveRewriter, Decision, StatementRewriter};

/// Swaps the literal 'old' for 'new'; refuses inserts into `forbidden`.
struct Swap;

impl StatementRewriter for Swap {
    fn rewrite(&self, sql: &str) -> Decision {
        if sql.starts_with("INSERT INTO forbidden") {
            Decision::Refuse("keyshift refuses writes to forbidden".into())
        } else if sql.contains("'old'") {
            Decision::Replace(sql.replace("'old'", "'new'").into())
        } else {
            Decision::Forward
        }
    }
}

async fn setup() -> (common::TestDb, TestProxy, tokio_postgres::Client) {
    let db = common::TestDb::new().await;
    let direct = db.client().await;
    direct
        .batch_execute("CREATE TABLE forbidden (a int, s text)")
        .await
        .unwrap();
    let p = TestProxy::start();
    p.shared.rewriter.store(Some(Arc::new(ActiveRewriter {
        database: Some(db.name.clone()),
        rewriter: Box::new(Swap),
        translated: None,
    })));
    let c = common::connect(&p.url("postgres", &db.name)).await;
    (db, p, c)
}

#[tokio::test]
async fn query_and_parse_are_rewritten_in_place() {
    let (_db, _p, c) = setup().await;
    let rows = c
        .simple_query("SELECT 'old' AS v; SELECT 'other'")
        .await
        .unwrap();
    let vals: Vec<String> = rows
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap().to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(vals, vec!["new", "other"]);
    // Extended protocol, named statement, binary parameter kept in place.
    let st = c.prepare("SELECT 'old' || $1::text").await.unwrap();
    let r = c.query_one(&st, &[&"!"]).await.unwrap();
    assert_eq!(r.get::<_, String>(0), "new!");
    // Closing and re-preparing still works.
    drop(st);
    let r = c.query_one("SELECT 'old'::text", &[]).await.unwrap();
    assert_eq!(r.get::<_, String>(0), "new");
}

#[tokio::test]
async fn sessions_on_other_databases_are_not_rewritten() {
    let (_db, p, _c) = setup().await;
    let other = common::TestDb::new().await;
    let c = common::connect(&p.url("postgres", &other.name)).await;
    let r = c.query_one("SELECT 'old'::text", &[]).await.unwrap();
    assert_eq!(r.get::<_, String>(0), "old");
}

#[tokio::test]
async fn refused_statements_fail_inside_postgresql() {
    let (_db, _p, mut c) = setup().await;
    let e = c
        .simple_query("INSERT INTO forbidden VALUES (1, 'x')")
        .await
        .unwrap_err();
    assert_eq!(e.code().unwrap().code(), "0A000");
    assert!(e.as_db_error().unwrap().message().contains("forbidden"));
    let e = c
        .execute("INSERT INTO forbidden VALUES ($1, $2)", &[&1i32, &"x"])
        .await
        .unwrap_err();
    assert_eq!(e.code().unwrap().code(), "0A000", "{e}");
    // Inside a transaction, the refusal fails the transaction as PostgreSQL would.
    let tx = c.transaction().await.unwrap();
    assert!(
        tx.execute("INSERT INTO forbidden VALUES ($1, $2)", &[&2i32, &"y"])
            .await
            .is_err()
    );
    let e = tx.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(e.code().unwrap().code(), "25P02");
    drop(tx);
    // A refusal in the middle of a pipeline: the statements before it run, the ones after it
    // in the same sequence are skipped by PostgreSQL, later sequences run.
    let ok = c.prepare("SELECT 1::int").await.unwrap();
    let (a, b, d) = tokio::join!(
        c.query_one(&ok, &[]),
        c.execute("INSERT INTO forbidden VALUES ($1, 'z')", &[&3i32]),
        c.query_one(&ok, &[])
    );
    assert_eq!(a.unwrap().get::<_, i32>(0), 1);
    assert_eq!(b.unwrap_err().code().unwrap().code(), "0A000");
    assert_eq!(d.unwrap().get::<_, i32>(0), 1);
    let n: i64 = c
        .query_one("SELECT count(*) FROM forbidden", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
}

#[tokio::test]
async fn non_utf8_sql_is_never_handed_to_the_rewriter() {
    let (db, p, _c) = setup().await;
    // LATIN1 bytes: 'old' would be rewritten if the bytes were decoded lossily.
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("l1.sql");
    let mut sql = b"SELECT 'old' || 'caf".to_vec();
    sql.push(0xe9);
    sql.extend_from_slice(b"';\n");
    std::fs::write(&script, &sql).unwrap();
    let out = std::process::Command::new(common::pg_tool("psql"))
        .args(["-X", "-At", "-q"])
        .arg(format!(
            "host=127.0.0.1 port={} dbname={} user=postgres",
            p.addr.port(),
            db.name
        ))
        .arg("-f")
        .arg(&script)
        .env("PGCLIENTENCODING", "LATIN1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, b"oldcaf\xe9\n");
}

/// Rewrites 'old' to a fixed literal.
struct To(&'static str);

impl StatementRewriter for To {
    fn rewrite(&self, sql: &str) -> Decision {
        if sql.contains("'old'") {
            Decision::Replace(sql.replace("'old'", &format!("'{}'", self.0)).into())
        } else {
            Decision::Forward
        }
    }
}

#[tokio::test]
async fn statements_prepared_before_a_rules_change_are_prepared_again() {
    let (db, p, c) = setup().await;
    let set = |r: Option<&'static str>| {
        p.shared.set_rewriter(r.map(|lit| ActiveRewriter {
            database: Some(db.name.clone()),
            rewriter: Box::new(To(lit)),
            translated: None,
        }))
    };
    set(Some("v1"));
    let st = c.prepare("SELECT 'old'::text || $1::text").await.unwrap();
    let other = c.prepare("SELECT 'untouched'::text").await.unwrap();
    assert_eq!(
        c.query_one(&st, &[&"."]).await.unwrap().get::<_, String>(0),
        "v1."
    );
    // The rules change while the client holds its prepared statement (as at cutover).
    set(Some("v2"));
    assert_eq!(
        c.query_one(&st, &[&"."]).await.unwrap().get::<_, String>(0),
        "v2."
    );
    assert_eq!(
        c.query_one(&other, &[]).await.unwrap().get::<_, String>(0),
        "untouched"
    );
    // Back to passthrough (finalize): the client's original SQL is prepared again.
    set(None);
    assert_eq!(
        c.query_one(&st, &[&"."]).await.unwrap().get::<_, String>(0),
        "old."
    );
    // And again: every change is picked up, once.
    set(Some("v3"));
    let mut rows = Vec::new();
    for _ in 0..3 {
        rows.push(c.query_one(&st, &[&"!"]).await.unwrap().get::<_, String>(0));
    }
    assert_eq!(rows, vec!["v3!", "v3!", "v3!"]);
}
