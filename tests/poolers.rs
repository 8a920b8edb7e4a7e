//! keyshift in front of a connection pooler: keyshift → PgBouncer → PostgreSQL, with a real
//! PgBouncer (Debian's package) started by the harness (tests/common/pgbouncer.rs), in
//! transaction and session mode. The control link (`database_url`) goes to PostgreSQL
//! directly. Clients must get no error that PgBouncer alone would not give them, and every
//! row they write must get its uuid twins.
//!
//! Without the `upstream_pooling` key (its default, `auto`), keyshift must notice the pooler
//! itself: its own statement missing on the server connection a transaction lands on
//! (26000), recovered without the client seeing it.
mod common;
mod migrate_support;

use std::time::Duration;

use common::pgbouncer::{PgBouncer, PoolMode};
use common::proxy::{TestProxy, http, test_config, wait_status};
use keyshift::config::UpstreamPooling;
use migrate_support::{SEED_004, inconsistent, ks_async, ks_expect, seed_004_rows, text};
use tokio_postgres::types::Type;

/// A seed-004 database after expand and backfill (dual-write in force), PgBouncer in `mode`
/// in front of PostgreSQL, and keyshift with PgBouncer as its upstream and the control link
/// going to PostgreSQL directly.
struct Layout {
    db: common::TestDb,
    bouncer: PgBouncer,
    proxy: TestProxy,
}

async fn layout(
    mode: PoolMode,
    pool_size: usize,
    cfg: keyshift::config::ProxyConfig,
) -> Option<Layout> {
    let bouncer = PgBouncer::start(mode, pool_size)?;
    let db = common::TestDb::new().await;
    db.client()
        .await
        .batch_execute(&format!("{SEED_004}{}", seed_004_rows(20)))
        .await
        .unwrap();
    ks_expect(&db.url(), &["expand"], 0);
    ks_expect(&db.url(), &["backfill"], 0);
    let mut cfg = cfg;
    cfg.upstream = bouncer.addr();
    cfg.database_url = Some(db.url());
    let proxy = TestProxy::start_with(cfg);
    wait_status(&proxy, |v| {
        v["dual_write"] == true && v["database_link"] == "connected"
    })
    .await;
    Some(Layout { db, bouncer, proxy })
}

/// pgbench's script: one insert into each of two child tables, each its own transaction.
fn bench_script(dir: &std::path::Path) -> String {
    let path = dir.join("inserts.sql");
    std::fs::write(
        &path,
        "\\set c random(1, 20)\n\\set s random(1, 40)\n\
         INSERT INTO mcp_servers (connector_id, name) VALUES (:c, 'bench');\n\
         INSERT INTO mcp_server_tokens (mcp_server_id, token) VALUES (:s, 'tok');\n",
    )
    .unwrap();
    path.to_string_lossy().into_owned()
}

/// Runs pgbench through keyshift in each mode; every transaction must succeed, every row
/// must be there, every twin right.
async fn pgbench_through(l: &Layout, modes: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let script = bench_script(dir.path());
    let direct = l.db.client().await;
    for (round, mode) in modes.iter().enumerate() {
        let out = common::pgbench(
            l.proxy.addr.port(),
            &l.db.name,
            &[
                "-n", "-M", mode, "-c", "8", "-j", "2", "-t", "100", "-f", &script,
            ],
        );
        assert!(
            out.contains("number of failed transactions: 0"),
            "pgbench -M {mode} through keyshift → PgBouncer: {out}\nPgBouncer's log:\n{}",
            l.bouncer.log()
        );
        let n: i64 = direct
            .query_one("SELECT count(*) FROM mcp_servers WHERE name = 'bench'", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 800 * (round as i64 + 1), "-M {mode}");
    }
    let bad = inconsistent(&direct).await;
    assert!(bad.is_empty(), "twins wrong: {bad:?}");
}

/// The proxy's metric lines that start with `name`.
fn metric(p: &TestProxy, name: &str) -> Vec<String> {
    let (_, body) = http(p.admin, "GET", "/metrics", None);
    body.lines()
        .filter(|l| l.starts_with(name))
        .map(str::to_string)
        .collect()
}

fn metric_value(p: &TestProxy, line: &str) -> f64 {
    metric(p, line)
        .first()
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// The statement `upstream_pooling = "auto"` found keyshift's statements missing on, without
/// a client seeing it, and the proxy turned pooled.
fn assert_found_out_unseen(p: &TestProxy) {
    assert_eq!(
        metric_value(
            p,
            "keyshift_upstream_pooler_answers_total{outcome=\"seen\"}"
        ),
        0.0,
        "{:?}",
        metric(p, "keyshift_upstream_pooler")
    );
    assert_eq!(metric_value(p, "keyshift_upstream_pooled "), 1.0);
}

#[tokio::test]
async fn transaction_pooler_upstream_pgbench_simple_and_extended() {
    let Some(l) = layout(PoolMode::Transaction, 2, test_config()).await else {
        return;
    };
    pgbench_through(&l, &["simple", "extended"]).await;
    // 8 clients on 2 server connections: keyshift found out (from its own statement missing
    // on the connection a transaction got), and no client saw it.
    assert_found_out_unseen(&l.proxy);
}

#[tokio::test]
async fn transaction_pooler_declared_keeps_nothing_on_the_server() {
    let mut cfg = test_config();
    cfg.upstream_pooling = UpstreamPooling::Transaction;
    let Some(l) = layout(PoolMode::Transaction, 2, cfg).await else {
        return;
    };
    assert_eq!(metric_value(&l.proxy, "keyshift_upstream_pooled "), 1.0);
    pgbench_through(&l, &["simple", "extended"]).await;
    // Nothing prepared of keyshift's, so nothing the pooler could lose.
    assert!(
        metric(&l.proxy, "keyshift_server_statements_total")
            .iter()
            .all(|m| m.ends_with(" 0")),
        "{:?}",
        metric(&l.proxy, "keyshift_server_statements_total")
    );
    assert!(
        metric(&l.proxy, "keyshift_upstream_pooler_answers_total")
            .iter()
            .all(|m| m.ends_with(" 0"))
    );
}

#[tokio::test]
async fn session_pooler_upstream_pgbench_simple_and_extended() {
    let Some(l) = layout(PoolMode::Session, 10, test_config()).await else {
        return;
    };
    pgbench_through(&l, &["simple", "extended", "prepared"]).await;
    // A session pooler keeps one server connection per client: nothing to find out.
    assert_eq!(metric_value(&l.proxy, "keyshift_upstream_pooled "), 0.0);
}

/// Occupies both of PgBouncer's server connections with an open transaction each, then
/// frees the one that holds keyshift's statement: the next transaction through keyshift can
/// only get the other one.
async fn move_to_the_connection_without_it(l: &Layout) -> tokio_postgres::Client {
    let holders = [
        common::connect(&l.bouncer.url(&l.db.name)).await,
        common::connect(&l.bouncer.url(&l.db.name)).await,
    ];
    let mut has = Vec::new();
    for h in &holders {
        h.batch_execute("BEGIN").await.unwrap();
        let n: i64 = h
            .query_one(
                "SELECT count(*) FROM pg_prepared_statements WHERE name LIKE 'keyshift%'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        has.push(n > 0);
    }
    assert_eq!(
        has.iter().filter(|h| **h).count(),
        1,
        "keyshift's statement should be on exactly one of the two server connections"
    );
    let [a, b] = holders;
    let (keep, free) = if has[0] { (a, b) } else { (b, a) };
    free.batch_execute("COMMIT").await.unwrap();
    keep
}

#[tokio::test]
async fn auto_finds_out_from_a_missing_statement_simple_protocol() {
    let Some(l) = layout(PoolMode::Transaction, 2, test_config()).await else {
        return;
    };
    let c = common::connect(&l.proxy.url("postgres", &l.db.name)).await;
    let insert =
        |n: i32| format!("INSERT INTO mcp_servers (connector_id, name) VALUES ({n}, 'found')");
    // The shape's template proved, seen once, then prepared by keyshift (its PREPARE after
    // the client's statement).
    for n in 1..=3 {
        c.simple_query(&insert(n)).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let keep = move_to_the_connection_without_it(&l).await;
    // keyshift runs it as EXECUTE of its statement, which this server connection lacks.
    let out = c
        .simple_query(&insert(4))
        .await
        .expect("no error for the client");
    assert!(
        matches!(
            out.last(),
            Some(tokio_postgres::SimpleQueryMessage::CommandComplete(1))
        ),
        "{out:?}"
    );
    keep.batch_execute("COMMIT").await.unwrap();
    assert_found_out_unseen(&l.proxy);
    assert_eq!(
        metric_value(
            &l.proxy,
            "keyshift_upstream_pooler_answers_total{outcome=\"recovered\"}"
        ),
        1.0
    );
    // Pooled from now on: every later insert goes as text.
    for n in 5..=8 {
        c.simple_query(&insert(n)).await.unwrap();
    }
    let direct = l.db.client().await;
    let n: i64 = direct
        .query_one("SELECT count(*) FROM mcp_servers WHERE name = 'found'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 8);
    assert!(inconsistent(&direct).await.is_empty());
}

#[tokio::test]
async fn auto_finds_out_from_a_missing_statement_extended_protocol() {
    let Some(l) = layout(PoolMode::Transaction, 2, test_config()).await else {
        return;
    };
    let c = common::connect(&l.proxy.url("postgres", &l.db.name)).await;
    let sql = "INSERT INTO mcp_server_tokens (mcp_server_id, token) VALUES ($1, $2) RETURNING mcp_server_id";
    let run = |n: i32| {
        let c = &c;
        async move {
            c.query_typed(sql, &[(&n, Type::INT4), (&"found", Type::TEXT)])
                .await
        }
    };
    // The unnamed statement: seen once, then prepared under keyshift's name.
    for n in 1..=2 {
        run(n).await.unwrap();
    }
    let keep = move_to_the_connection_without_it(&l).await;
    // keyshift binds its statement, which this server connection lacks.
    let rows = run(3).await.expect("no error for the client");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].get::<_, i32>(0), 3);
    keep.batch_execute("COMMIT").await.unwrap();
    assert_found_out_unseen(&l.proxy);
    for n in 4..=8 {
        assert_eq!(run(n).await.unwrap()[0].get::<_, i32>(0), n);
    }
    let direct = l.db.client().await;
    let n: i64 = direct
        .query_one(
            "SELECT count(*) FROM mcp_server_tokens WHERE token = 'found'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 8);
    assert!(inconsistent(&direct).await.is_empty());
}

/// What an application does through a transaction pooler: named statements inside a
/// transaction (the pooler keeps the server connection for it), the unnamed statement, the
/// simple protocol. Returns the ids it inserted.
async fn application(
    c: &tokio_postgres::Client,
    who: i32,
) -> Result<Vec<i32>, tokio_postgres::Error> {
    let mut ids = Vec::new();
    for round in 0..5 {
        c.batch_execute("BEGIN").await?;
        let st = c
            .prepare("INSERT INTO mcp_servers (connector_id, name) VALUES ($1, $2) RETURNING id")
            .await?;
        for k in 0..3 {
            let conn = (who * 7 + round + k) % 20 + 1;
            ids.push(c.query_one(&st, &[&conn, &"app"]).await?.get(0));
        }
        c.batch_execute("COMMIT").await?;
        let row = c
            .query_typed(
                "INSERT INTO mcp_server_tokens (mcp_server_id, token) VALUES ($1, $2) RETURNING id",
                &[
                    (&((who + round) % 40 + 1), Type::INT4),
                    (&"app", Type::TEXT),
                ],
            )
            .await?;
        ids.push(row[0].get(0));
        c.simple_query(&format!(
            "INSERT INTO connector_access (connector_id, user_id) VALUES ({}, 'app')",
            (who + round) % 20 + 1
        ))
        .await?;
    }
    Ok(ids)
}

#[tokio::test]
async fn tokio_postgres_through_a_transaction_pooler_as_through_pgbouncer_alone() {
    let Some(l) = layout(PoolMode::Transaction, 2, test_config()).await else {
        return;
    };
    for (target, url) in [
        ("PgBouncer alone", l.bouncer.url(&l.db.name)),
        ("keyshift → PgBouncer", l.proxy.url("postgres", &l.db.name)),
    ] {
        let mut tasks = Vec::new();
        for who in 0..6 {
            let url = url.clone();
            tasks.push(tokio::spawn(async move {
                let c = common::connect(&url).await;
                application(&c, who).await
            }));
        }
        for t in tasks {
            let ids = t.await.unwrap().unwrap_or_else(|e| panic!("{target}: {e}"));
            assert_eq!(ids.len(), 20, "{target}");
        }
    }
    let direct = l.db.client().await;
    let n: i64 = direct
        .query_one("SELECT count(*) FROM mcp_servers WHERE name = 'app'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2 * 6 * 15);
    let bad = inconsistent(&direct).await;
    assert!(bad.is_empty(), "twins wrong: {bad:?}");
}

#[tokio::test]
async fn cutover_and_rollback_through_a_transaction_pooler() {
    let Some(l) = layout(PoolMode::Transaction, 3, test_config()).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let script = bench_script(dir.path());
    let port = l.proxy.addr.port();
    let db = l.db.name.clone();
    let bench = |mode: &'static str| {
        let (script, db) = (script.clone(), db.clone());
        std::thread::spawn(move || {
            common::pgbench(
                port,
                &db,
                &[
                    "-n", "-M", mode, "-c", "4", "-j", "2", "-T", "6", "-f", &script,
                ],
            )
        })
    };
    let load = [bench("simple"), bench("extended")];
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let out = ks_async(&l.db.url(), &["cutover", "--drain-timeout", "5s"]).await;
    assert_eq!(out.status.code(), Some(0), "cutover: {}", text(&out));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let out = ks_async(&l.db.url(), &["rollback"]).await;
    assert_eq!(out.status.code(), Some(0), "rollback: {}", text(&out));
    for t in load {
        let out = t.join().unwrap();
        assert!(
            out.contains("number of failed transactions: 0"),
            "pgbench through cutover and rollback: {out}"
        );
    }
    let direct = l.db.client().await;
    let bad = inconsistent(&direct).await;
    assert!(
        bad.is_empty(),
        "twins wrong after cutover and rollback: {bad:?}"
    );
}
