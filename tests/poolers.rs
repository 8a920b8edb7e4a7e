//! keyshift with a connection pooler, a real PgBouncer started by the harness
//! (tests/common/pgbouncer.rs), in transaction and session mode, in both layouts:
//!
//! - keyshift in front of the pooler: keyshift → PgBouncer → PostgreSQL (Debian's 1.18, and
//!   the 1.21+ that `.ci/run` builds, with `max_prepared_statements`). The control link
//!   (`database_url`) goes to PostgreSQL directly. Clients must get no error that PgBouncer
//!   alone would not give them, and every row they write must get its uuid twins.
//! - the pooler in front of keyshift ("pooler in front" below): application → PgBouncer →
//!   keyshift → PostgreSQL. Each application version gets its shape through its own pool,
//!   cancel requests reach the right backend, and the pause gate neither waits for the
//!   pooler's idle server connections nor lets a statement through them while closed.
//!
//! Without the `upstream_pooling` key (its default, `auto`), keyshift must notice the pooler
//! itself: its own statement missing on the server connection a transaction lands on
//! (26000), recovered without the client seeing it.
mod common;
mod migrate_support;

use std::time::Duration;

use common::pgbouncer::{self, PgBouncer, PoolMode};
use common::proxy::{TestProxy, http, test_config, wait_status};
use keyshift::config::UpstreamPooling;
use keyshift::shape::{Shape, ShapeRule};
use migrate_support::{
    SEED_004, count, inconsistent, inconsistent_after_cutover, ks_async, ks_expect, seed_004_rows,
    text,
};
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
    layout_with(pgbouncer::Options::new(mode, pool_size), cfg).await
}

/// [`layout`] with PgBouncer started as `o` says.
async fn layout_with(o: pgbouncer::Options, cfg: keyshift::config::ProxyConfig) -> Option<Layout> {
    let bouncer = PgBouncer::start_with(o)?;
    let db = migrated_db("").await;
    let mut cfg = cfg;
    cfg.upstream = bouncer.addr();
    let proxy = linked(&db, cfg).await;
    Some(Layout { db, bouncer, proxy })
}

/// A seed-004 database with its rows, then `sql`; not migrated.
async fn seeded_db(sql: &str) -> common::TestDb {
    let db = common::TestDb::new().await;
    db.client()
        .await
        .batch_execute(&format!("{SEED_004}{}{sql}", seed_004_rows(20)))
        .await
        .unwrap();
    db
}

/// A seed-004 database after expand and backfill (dual-write in force, hardened);
/// `before_expand` runs before expand.
async fn migrated_db(before_expand: &str) -> common::TestDb {
    let db = seeded_db(before_expand).await;
    ks_expect(&db.url(), &["expand"], 0);
    ks_expect(&db.url(), &["backfill"], 0);
    db
}

/// keyshift as `cfg` says, its control link going to `db` directly, once its rules are in
/// force.
async fn linked(db: &common::TestDb, cfg: keyshift::config::ProxyConfig) -> TestProxy {
    let mut cfg = cfg;
    cfg.database_url = Some(db.url());
    let proxy = TestProxy::start_with(cfg);
    wait_status(&proxy, |v| {
        v["dual_write"] == true && v["database_link"] == "connected"
    })
    .await;
    proxy
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

/// pgbench running `script` in `mode` against `127.0.0.1:port`, database `db`, with `clients`
/// clients for `seconds`, on a thread of its own; joined, it gives pgbench's output.
fn pgbench_in_background(
    port: u16,
    db: &str,
    script: &str,
    mode: &str,
    clients: u32,
    seconds: u32,
) -> std::thread::JoinHandle<String> {
    let args: Vec<String> = [
        "-n",
        "-M",
        mode,
        "-c",
        &clients.to_string(),
        "-j",
        "2",
        "-T",
        &seconds.to_string(),
        "-f",
        script,
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    let db = db.to_string();
    std::thread::spawn(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        common::pgbench(port, &db, &args)
    })
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

/// Runs `app` on 6 clients at once (numbered 0 to 5) through PgBouncer alone, then through
/// keyshift → PgBouncer; every run must succeed. Returns each run's result with its target.
async fn alone_and_through_keyshift<F, Fut, T>(l: &Layout, app: F) -> Vec<(&'static str, T)>
where
    F: Fn(tokio_postgres::Client, i32) -> Fut + Copy + Send + 'static,
    Fut: std::future::Future<Output = Result<T, tokio_postgres::Error>> + Send,
    T: Send + 'static,
{
    let mut results = Vec::new();
    for (target, url) in [
        ("PgBouncer alone", l.bouncer.url(&l.db.name)),
        ("keyshift → PgBouncer", l.proxy.url("postgres", &l.db.name)),
    ] {
        let mut tasks = Vec::new();
        for who in 0..6 {
            let url = url.clone();
            tasks.push(tokio::spawn(async move {
                let c = common::connect(&url).await;
                app(c, who).await
            }));
        }
        for t in tasks {
            let r = t.await.unwrap().unwrap_or_else(|e| panic!("{target}: {e}"));
            results.push((target, r));
        }
    }
    results
}

#[tokio::test]
async fn tokio_postgres_through_a_transaction_pooler_as_through_pgbouncer_alone() {
    let Some(l) = layout(PoolMode::Transaction, 2, test_config()).await else {
        return;
    };
    for (target, ids) in
        alone_and_through_keyshift(&l, |c, who| async move { application(&c, who).await }).await
    {
        assert_eq!(ids.len(), 20, "{target}");
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
    let load = ["simple", "extended"]
        .map(|mode| pgbench_in_background(port, &l.db.name, &script, mode, 4, 6));
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

/// A seed-004 database not migrated yet, and keyshift (`cfg`, its control link to the
/// database) once linked: no rules until expand.
async fn unmigrated(cfg: keyshift::config::ProxyConfig) -> (common::TestDb, TestProxy) {
    let db = seeded_db("").await;
    let mut cfg = cfg;
    cfg.database_url = Some(db.url());
    let proxy = TestProxy::start_with(cfg);
    wait_status(&proxy, |v| v["database_link"] == "connected").await;
    (db, proxy)
}

/// pgbench (simple and extended) writing through `port` while expand, backfill (which
/// hardens), cutover and rollback run: no failed transaction, every twin right. `log`: the
/// pooler's log, for the failure message.
async fn lifecycle_under_load(
    db: &common::TestDb,
    proxy: &TestProxy,
    port: u16,
    log: impl Fn() -> String,
) {
    let dir = tempfile::tempdir().unwrap();
    let script = bench_script(dir.path());
    let load = ["simple", "extended"]
        .map(|mode| pgbench_in_background(port, &db.name, &script, mode, 4, 14));
    tokio::time::sleep(Duration::from_millis(1000)).await;
    for step in ["expand", "backfill"] {
        let out = ks_async(&db.url(), &[step]).await;
        assert_eq!(out.status.code(), Some(0), "{step}: {}", text(&out));
    }
    wait_status(proxy, |v| v["dual_write"] == true).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    for step in ["cutover", "rollback"] {
        let out = ks_async(&db.url(), &[step, "--drain-timeout", "5s"]).await;
        assert_eq!(out.status.code(), Some(0), "{step}: {}", text(&out));
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
    for t in load {
        let out = t.join().unwrap();
        assert!(
            out.contains("number of failed transactions: 0"),
            "pgbench from before expand to after rollback: {out}\npooler's log:\n{}",
            log()
        );
    }
    let direct = db.client().await;
    let written: i64 = direct
        .query_one("SELECT count(*) FROM mcp_servers WHERE name = 'bench'", &[])
        .await
        .unwrap()
        .get(0);
    assert!(written > 0, "pgbench wrote nothing");
    let bad = inconsistent(&direct).await;
    assert!(bad.is_empty(), "twins wrong: {bad:?}");
}

/// keyshift → PgBouncer (transaction mode) → PostgreSQL, from before expand to after rollback.
#[tokio::test]
async fn expand_backfill_cutover_and_rollback_under_load_through_a_transaction_pooler() {
    let Some(bouncer) = PgBouncer::start(PoolMode::Transaction, 3) else {
        return;
    };
    let mut cfg = test_config();
    cfg.upstream = bouncer.addr();
    let (db, proxy) = unmigrated(cfg).await;
    lifecycle_under_load(&db, &proxy, proxy.addr.port(), || bouncer.log()).await;
}

// ---------------------------------------------------------------------------------------
// PgBouncer 1.21 and later in transaction mode with `max_prepared_statements`: PgBouncer keeps
// each client's protocol-level prepared statements and prepares them on whichever server
// connection a transaction gets. Debian bookworm has 1.18; `.ci/run` builds trixie's 1.24.
// ---------------------------------------------------------------------------------------

/// Debian trixie's PgBouncer (1.24) in transaction mode with `max_prepared_statements = 100`,
/// `pool_size` server connections.
fn prepared_statements_pooler(pool_size: usize) -> Option<pgbouncer::Options> {
    let mut o = pgbouncer::Options::new(PoolMode::Transaction, pool_size)
        .setting("max_prepared_statements", "100");
    o.binary = Some(pgbouncer::newer()?);
    Some(o)
}

/// What an application does when its pooler keeps prepared statements: prepares once, then
/// runs them in transactions of their own, each on whichever server connection is free.
/// Returns how many statements ran.
async fn prepared_application(
    c: &tokio_postgres::Client,
    who: i32,
) -> Result<usize, tokio_postgres::Error> {
    let insert = c
        .prepare("INSERT INTO mcp_servers (connector_id, name) VALUES ($1, $2) RETURNING id")
        .await?;
    let token = c
        .prepare(
            "INSERT INTO mcp_server_tokens (mcp_server_id, token) VALUES ($1, $2) RETURNING id",
        )
        .await?;
    let read = c
        .prepare("SELECT connector_id, name FROM mcp_servers WHERE id = $1")
        .await?;
    let mut n = 0;
    for round in 0..10 {
        let conn = (who * 7 + round) % 20 + 1;
        let id: i32 = c.query_one(&insert, &[&conn, &"prepared"]).await?.get(0);
        c.query_one(&token, &[&id, &"prepared"]).await?;
        let row = c.query_one(&read, &[&id]).await?;
        assert_eq!(row.get::<_, i32>(0), conn);
        n += 3;
    }
    Ok(n)
}

#[tokio::test]
async fn prepared_statements_pooler_upstream_pgbench_and_tokio_postgres() {
    let Some(o) = prepared_statements_pooler(2) else {
        return;
    };
    let Some(l) = layout_with(o, test_config()).await else {
        return;
    };
    pgbench_through(&l, &["prepared", "extended", "simple"]).await;
    for (target, n) in
        alone_and_through_keyshift(
            &l,
            |c, who| async move { prepared_application(&c, who).await },
        )
        .await
    {
        assert_eq!(n, 30, "{target}");
    }
    let direct = l.db.client().await;
    let bad = inconsistent(&direct).await;
    assert!(bad.is_empty(), "twins wrong: {bad:?}");
}

#[tokio::test]
async fn prepared_statements_pooler_upstream_across_cutover_and_rollback() {
    let Some(o) = prepared_statements_pooler(3) else {
        return;
    };
    // Said, since nothing tells keyshift that this pooler keeps prepared statements: under
    // `auto` or `transaction` the statements prepared before the cutover would run their old
    // texts after it (42703 "column … does not exist").
    let mut cfg = test_config();
    cfg.upstream_pooling = UpstreamPooling::TransactionPrepared;
    let Some(l) = layout_with(o, cfg).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let script = bench_script(dir.path());
    let port = l.proxy.addr.port();
    let load = ["prepared", "extended", "simple"]
        .map(|mode| pgbench_in_background(port, &l.db.name, &script, mode, 3, 8));
    // A tokio-postgres client that prepared before the cutover and goes on using its
    // statements across it, in its integer shape.
    let c = common::connect(&l.proxy.url("postgres", &l.db.name)).await;
    let insert = c
        .prepare("INSERT INTO mcp_servers (connector_id, name) VALUES ($1, $2) RETURNING id")
        .await
        .unwrap();
    let read = c
        .prepare("SELECT id, connector_id FROM mcp_servers WHERE id = $1")
        .await
        .unwrap();
    let use_them = |step: &'static str| {
        let (c, insert, read) = (&c, &insert, &read);
        async move {
            for k in 0..5 {
                let id: i32 = c
                    .query_one(insert, &[&(k + 1), &"prepared"])
                    .await
                    .unwrap_or_else(|e| panic!("{step}: {e:?}"))
                    .get(0);
                let row = c
                    .query_one(read, &[&id])
                    .await
                    .unwrap_or_else(|e| panic!("{step}: {e:?}"));
                assert_eq!(row.get::<_, i32>(1), k + 1, "{step}");
            }
        }
    };
    use_them("before").await;
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let out = ks_async(&l.db.url(), &["cutover", "--drain-timeout", "5s"]).await;
    assert_eq!(out.status.code(), Some(0), "cutover: {}", text(&out));
    use_them("after cutover").await;
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let out = ks_async(&l.db.url(), &["rollback", "--drain-timeout", "5s"]).await;
    assert_eq!(out.status.code(), Some(0), "rollback: {}", text(&out));
    use_them("after rollback").await;
    for t in load {
        let out = t.join().unwrap();
        assert!(
            out.contains("number of failed transactions: 0"),
            "pgbench through keyshift → PgBouncer 1.2x across cutover and rollback: {out}\nPgBouncer's log:\n{}",
            l.bouncer.log()
        );
    }
    let direct = l.db.client().await;
    let bad = inconsistent(&direct).await;
    assert!(
        bad.is_empty(),
        "twins wrong after cutover and rollback: {bad:?}"
    );
}

// ---------------------------------------------------------------------------------------
// The pooler in front: application → PgBouncer → keyshift → PostgreSQL. keyshift's upstream
// is PostgreSQL; every server connection PgBouncer keeps is a keyshift session, whose shape
// comes from the pool it belongs to (a `[databases]` entry with its own `application_name` or
// `user`, matched by a `[[shape_rules]]` entry), since PgBouncer forwards none of its clients'
// startup parameters.
// ---------------------------------------------------------------------------------------

/// A seed-004 database, hardened (both shapes served), keyshift in front of it with `rules`,
/// and PgBouncer in `mode` in front of keyshift: the entry named like the database, plus
/// `aliases` (name and extra connection-string words), every one pointing at keyshift with
/// `dbname` the real database. `before_expand` runs first (roles and grants the views must
/// copy).
struct Front {
    db: common::TestDb,
    proxy: TestProxy,
    bouncer: PgBouncer,
}

async fn front(
    o: pgbouncer::Options,
    aliases: &[(&str, String)],
    rules: Vec<ShapeRule>,
    before_expand: &str,
) -> Option<Front> {
    let db = migrated_db(before_expand).await;
    let mut cfg = test_config();
    cfg.shape_rules = rules;
    let proxy = linked(&db, cfg).await;
    let ks = proxy.addr.to_string();
    let mut o = o.database(&db.name, pgbouncer::to(&ks, &db.name, ""));
    for (alias, extra) in aliases {
        o = o.database(alias, pgbouncer::to(&ks, &db.name, extra));
    }
    let bouncer = PgBouncer::start_with(o)?;
    Some(Front { db, proxy, bouncer })
}

fn rule(shape: Shape, user: Option<&str>, application_name: Option<&str>) -> ShapeRule {
    ShapeRule {
        shape,
        user: user.map(str::to_string),
        database: None,
        application_name: application_name.map(str::to_string),
    }
}

/// The types a session sees for `mcp_servers.id` and `connector_id`: its shape. One
/// extended-protocol sequence on the unnamed statement, so it runs through a transaction
/// pooler as one transaction.
async fn seen_types(c: &tokio_postgres::Client) -> (Type, Type) {
    let rows = c
        .query_typed(
            "SELECT id, connector_id FROM mcp_servers WHERE connector_id IS NOT NULL ORDER BY name LIMIT 1",
            &[],
        )
        .await
        .unwrap();
    let cols = rows[0].columns();
    (cols[0].type_().clone(), cols[1].type_().clone())
}

/// Each shape's own insert, naming the parent by the key it sees: an integer-shaped session by
/// connector 3's integer id, a uuid-shaped one by its uuid (read in its shape). Returns the
/// new row's `id` as text.
async fn insert_in_shape(c: &tokio_postgres::Client, shape: Shape, tag: &str) -> String {
    let sql = match shape {
        Shape::Integer => format!(
            "INSERT INTO mcp_servers (connector_id, name) VALUES (3, '{tag}') RETURNING id::text"
        ),
        Shape::Uuid => format!(
            "INSERT INTO mcp_servers (connector_id, name) \
             SELECT id, '{tag}' FROM mcp_connectors WHERE name = 'c3' RETURNING id::text"
        ),
    };
    let out = c
        .simple_query(&sql)
        .await
        .unwrap_or_else(|e| panic!("{shape}: {sql}: {e}"));
    out.iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap().to_string()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{sql}: {out:?}"))
}

#[tokio::test]
async fn front_each_pool_gets_its_shape_across_cutover_and_rollback() {
    let role = format!("v2_{}", std::process::id());
    let roles = format!(
        "DO $$ BEGIN CREATE ROLE {role} LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
         GRANT ALL ON ALL TABLES IN SCHEMA public TO {role};
         GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {role};"
    );
    // V1 and V2 each through a pool of their own: by application_name (the connection
    // string of the entry sets it in PgBouncer's startup packet to keyshift), and V2 once more
    // by user (the entry's `user=`: PgBouncer logs in to keyshift as that user).
    let Some(f) = front(
        pgbouncer::Options::new(PoolMode::Transaction, 2),
        &[
            ("app_v1", "application_name=billing-v1".to_string()),
            ("app_v2", "application_name=billing-v2".to_string()),
            ("app_v2_user", format!("user={role}")),
        ],
        vec![
            rule(Shape::Uuid, None, Some("billing-v2*")),
            rule(Shape::Uuid, Some(&role), None),
            rule(Shape::Integer, None, Some("billing-v1*")),
        ],
        &roles,
    )
    .await
    else {
        return;
    };
    let v1 = common::connect(&f.bouncer.url("app_v1")).await;
    let v2 = common::connect(&f.bouncer.url("app_v2")).await;
    let v2u = common::connect(&f.bouncer.url("app_v2_user")).await;
    // `keyshift.shape` in `options` never reaches keyshift: PgBouncer 1.18 drops `options`
    // (it is in ignore_startup_parameters; without that it refuses the connection), so the
    // pool decides.
    let mut asks_uuid: tokio_postgres::Config = f.bouncer.url("app_v1").parse().unwrap();
    asks_uuid.options("-c keyshift.shape=uuid");
    let (v1_asking, conn) = asks_uuid.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let int4 = (Type::INT4, Type::INT4);
    let uuid = (Type::UUID, Type::UUID);
    let mut written = 0;
    for step in ["hardened", "cut over", "rolled back"] {
        match step {
            "cut over" => {
                let out = ks_async(&f.db.url(), &["cutover", "--drain-timeout", "5s"]).await;
                assert_eq!(out.status.code(), Some(0), "cutover: {}", text(&out));
            }
            "rolled back" => {
                let out = ks_async(&f.db.url(), &["rollback"]).await;
                assert_eq!(out.status.code(), Some(0), "rollback: {}", text(&out));
            }
            _ => {}
        }
        // Fresh client connections too: PgBouncer hands them the pool's server connections.
        let v1_new = common::connect(&f.bouncer.url("app_v1")).await;
        let v2_new = common::connect(&f.bouncer.url("app_v2")).await;
        for (who, c, shape) in [
            ("V1", &v1, Shape::Integer),
            ("V1 new", &v1_new, Shape::Integer),
            ("V1 asking uuid", &v1_asking, Shape::Integer),
            ("V2", &v2, Shape::Uuid),
            ("V2 new", &v2_new, Shape::Uuid),
            ("V2 by user", &v2u, Shape::Uuid),
        ] {
            let want = if shape == Shape::Integer {
                &int4
            } else {
                &uuid
            };
            assert_eq!(&seen_types(c).await, want, "{who}, {step}");
            let id = insert_in_shape(c, shape, &format!("{who} {step}")).await;
            assert_eq!(
                id.parse::<i64>().is_ok(),
                shape == Shape::Integer,
                "{who}, {step}: id {id}"
            );
            written += 1;
        }
        let direct = f.db.client().await;
        let bad = if step == "cut over" {
            inconsistent_after_cutover(&direct).await
        } else {
            inconsistent(&direct).await
        };
        assert!(bad.is_empty(), "twins wrong, {step}: {bad:?}");
    }
    // keyshift's sessions are PgBouncer's server connections, each in its pool's shape.
    let (_, body) = http(f.proxy.admin, "GET", "/v1/status", None);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        v["sessions_by_shape"]["uuid"].as_u64().unwrap() >= 2,
        "{v:#}"
    );
    assert!(
        v["sessions_by_shape"]["integer"].as_u64().unwrap() >= 1,
        "{v:#}"
    );
    let direct = f.db.client().await;
    let mine = "SELECT count(*) FROM mcp_servers WHERE name LIKE 'V%' AND connector_id = 3";
    assert_eq!(count(&direct, mine).await, written);
}

/// A cancel connection that stays open until the server closes it, as libpq's does.
/// tokio-postgres closes its socket as soon as the request is written; PgBouncer 1.18 forwards
/// a cancel on a server connection it opens first, and drops the request if its client has
/// gone by then (1.24 forwards it anyway), so tokio-postgres's cancel through PgBouncer 1.18
/// is lost, with or without keyshift behind it.
struct StaysOpen {
    inner: Option<tokio::net::TcpStream>,
    closed: Option<tokio::sync::oneshot::Sender<tokio::net::TcpStream>>,
}

impl tokio::io::AsyncRead for StaysOpen {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(self.inner.as_mut().unwrap()).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for StaysOpen {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(self.inner.as_mut().unwrap()).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(self.inner.as_mut().unwrap()).poll_flush(cx)
    }
    /// Not closed: the server closes it once the cancel went on.
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

impl Drop for StaysOpen {
    fn drop(&mut self) {
        if let (Some(s), Some(tx)) = (self.inner.take(), self.closed.take()) {
            let _ = tx.send(s);
        }
    }
}

/// How a test sends its cancel request.
#[derive(Debug, Clone, Copy)]
enum Cancel {
    /// tokio-postgres's `cancel_query`: write the request, close.
    TokioPostgres,
    /// The same request to `127.0.0.1:port`, then wait for the server to close, as libpq does.
    LibpqLike(u16),
}

async fn send_cancel(token: &tokio_postgres::CancelToken, how: Cancel) {
    match how {
        Cancel::TokioPostgres => token.cancel_query(tokio_postgres::NoTls).await.unwrap(),
        Cancel::LibpqLike(port) => {
            use tokio::io::AsyncReadExt;
            let s = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap();
            let (tx, rx) = tokio::sync::oneshot::channel();
            let stream = StaysOpen {
                inner: Some(s),
                closed: Some(tx),
            };
            token
                .cancel_query_raw(stream, tokio_postgres::NoTls)
                .await
                .unwrap();
            let mut s = rx.await.unwrap();
            let mut rest = Vec::new();
            tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest))
                .await
                .expect("the server closes the cancel connection")
                .unwrap();
        }
    }
}

/// Runs `SELECT pg_sleep(30)` on `victim` and `SELECT pg_sleep(1.5)` on `bystander`, and
/// cancels the first with its cancel token: it must fail with 57014 within seconds, and the
/// other must finish.
async fn cancel_one_of_two(
    victim: &tokio_postgres::Client,
    bystander: &tokio_postgres::Client,
    how: Cancel,
) {
    let token = victim.cancel_token();
    let start = std::time::Instant::now();
    let sleeper = victim.simple_query("SELECT pg_sleep(30)");
    let other = bystander.simple_query("SELECT pg_sleep(1.5), 'bystander'");
    let canceller = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        send_cancel(&token, how).await;
    };
    let (r, o, ()) = tokio::join!(sleeper, other, canceller);
    let e = r.expect_err("the sleep was cancelled");
    assert_eq!(
        e.code(),
        Some(&tokio_postgres::error::SqlState::QUERY_CANCELED),
        "{e}"
    );
    assert!(start.elapsed() < Duration::from_secs(10));
    let o = o.expect("the other session's statement is not cancelled");
    assert!(
        matches!(&o[1], tokio_postgres::SimpleQueryMessage::Row(r) if r.get(1) == Some("bystander")),
        "{o:?}"
    );
    // Both go on.
    victim.simple_query("SELECT 1").await.unwrap();
}

/// psql's Ctrl-C (libpq's PQcancel) through `port`: the running statement is cancelled.
async fn psql_ctrl_c(port: u16, db: &str) -> String {
    let mut psql = std::process::Command::new(common::pg_tool("psql"))
        .arg("-X")
        .arg(format!(
            "host=127.0.0.1 port={port} dbname={db} user=postgres"
        ))
        .args(["-c", "SELECT pg_sleep(30)"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    unsafe { libc::kill(psql.id() as i32, libc::SIGINT) };
    let err = tokio::task::spawn_blocking(move || {
        psql.wait().unwrap();
        let mut err = String::new();
        std::io::Read::read_to_string(psql.stderr.as_mut().unwrap(), &mut err).unwrap();
        err
    })
    .await
    .unwrap();
    assert!(start.elapsed() < Duration::from_secs(10), "psql: {err}");
    err
}

#[tokio::test]
async fn front_cancel_reaches_the_right_session() {
    // Debian's PgBouncer in both modes, and the newer one if .ci/run built it.
    let mut runs = vec![(PoolMode::Transaction, None), (PoolMode::Session, None)];
    if let Some(newer) = pgbouncer::newer() {
        runs.push((PoolMode::Transaction, Some(newer)));
    }
    for (mode, binary) in runs {
        let mut o = pgbouncer::Options::new(mode, 4);
        o.binary = binary.clone();
        let Some(f) = front(o, &[], Vec::new(), "").await else {
            return;
        };
        let what = format!("{mode:?} {binary:?}");
        // The client's key is PgBouncer's; PgBouncer sends keyshift's key (which it got as
        // its server connection's BackendKeyData); keyshift sends PostgreSQL's.
        let how = if binary.is_some() {
            Cancel::TokioPostgres
        } else {
            Cancel::LibpqLike(f.bouncer.port)
        };
        let a = common::connect(&f.bouncer.url(&f.db.name)).await;
        let b = common::connect(&f.bouncer.url(&f.db.name)).await;
        cancel_one_of_two(&a, &b, how).await;
        cancel_one_of_two(&b, &a, how).await;
        let err = psql_ctrl_c(f.bouncer.port, &f.db.name).await;
        assert!(
            err.contains("canceling statement due to user request"),
            "{what}: psql: {err}"
        );
    }
}

#[tokio::test]
async fn front_pause_passes_idle_pooled_connections_and_holds_the_next_statement() {
    let Some(f) = front(
        pgbouncer::Options::new(PoolMode::Transaction, 3),
        &[],
        Vec::new(),
        "",
    )
    .await
    else {
        return;
    };
    // Three clients at once make PgBouncer open three server connections, which it keeps
    // open, idle, once they are done.
    let clients = [
        common::connect(&f.bouncer.url(&f.db.name)).await,
        common::connect(&f.bouncer.url(&f.db.name)).await,
        common::connect(&f.bouncer.url(&f.db.name)).await,
    ];
    let warm = clients
        .iter()
        .map(|c| c.simple_query("SELECT pg_sleep(0.3)"));
    for r in futures_util::future::join_all(warm).await {
        r.unwrap();
    }
    wait_status(&f.proxy, |v| v["sessions"]["idle"] == 3).await;

    // The pause does not wait for them: they are idle, not in a transaction.
    let admin = f.proxy.admin;
    let (code, body) = tokio::task::spawn_blocking(move || {
        http(admin, "POST", "/v1/pause?timeout=2s", Some("test-token"))
    })
    .await
    .unwrap();
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(v["waited_ms"].as_u64().unwrap() < 200, "{v}");

    // A statement arriving now, through PgBouncer onto one of them, is held...
    let c = &clients[0];
    let insert = c.simple_query("INSERT INTO mcp_servers (connector_id, name) VALUES (2, 'held')");
    tokio::pin!(insert);
    assert!(
        tokio::time::timeout(Duration::from_millis(700), &mut insert)
            .await
            .is_err(),
        "the insert ran while the gate was closed"
    );
    wait_status(&f.proxy, |v| v["sessions"]["held"] == 1).await;
    // ... while a statement that names no migrated table goes on (PgBouncer's own
    // `server_check_query` and SETs are such statements).
    let other = clients[1].simple_query("SELECT 1");
    tokio::time::timeout(Duration::from_secs(2), other)
        .await
        .expect("SELECT 1 passes a closed gate")
        .unwrap();
    // ... and runs once the gate opens.
    let (code, body) =
        tokio::task::spawn_blocking(move || http(admin, "POST", "/v1/resume", Some("test-token")))
            .await
            .unwrap();
    assert_eq!(code, 200, "{body}");
    tokio::time::timeout(Duration::from_secs(5), insert)
        .await
        .expect("the held insert runs after resume")
        .unwrap();
    let direct = f.db.client().await;
    let held = "SELECT count(*) FROM mcp_servers WHERE name = 'held'";
    assert_eq!(count(&direct, held).await, 1);
    assert!(inconsistent(&direct).await.is_empty());
}

/// PgBouncer (transaction mode) → keyshift → PostgreSQL, from before expand to after rollback.
#[tokio::test]
async fn front_transaction_pooler_from_before_expand_to_after_rollback() {
    let (db, proxy) = unmigrated(test_config()).await;
    let ks = proxy.addr.to_string();
    let o = pgbouncer::Options::new(PoolMode::Transaction, 3)
        .database(&db.name, pgbouncer::to(&ks, &db.name, ""));
    let Some(bouncer) = PgBouncer::start_with(o) else {
        return;
    };
    lifecycle_under_load(&db, &proxy, bouncer.port, || bouncer.log()).await;
}

/// pgbench in `modes` through PgBouncer (`o`) in front of keyshift, across a cutover and a
/// rollback: no failed transaction, both swaps within their drain timeout, twins right after
/// each.
async fn front_pgbench_across_cutover_and_rollback(o: pgbouncer::Options, modes: &[&'static str]) {
    let Some(f) = front(o, &[], Vec::new(), "").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let script = bench_script(dir.path());
    let port = f.bouncer.port;
    let load: Vec<_> = modes
        .iter()
        .map(|mode| pgbench_in_background(port, &f.db.name, &script, mode, 4, 8))
        .collect();
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let out = ks_async(&f.db.url(), &["cutover", "--drain-timeout", "5s"]).await;
    assert_eq!(out.status.code(), Some(0), "cutover: {}", text(&out));
    eprintln!("cutover through PgBouncer's pools: {}", text(&out));
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let direct = f.db.client().await;
    let bad = inconsistent_after_cutover(&direct).await;
    assert!(bad.is_empty(), "legacy twins wrong after cutover: {bad:?}");
    let out = ks_async(&f.db.url(), &["rollback", "--drain-timeout", "5s"]).await;
    assert_eq!(out.status.code(), Some(0), "rollback: {}", text(&out));
    eprintln!("rollback through PgBouncer's pools: {}", text(&out));
    for (t, mode) in load.into_iter().zip(modes) {
        let out = t.join().unwrap();
        assert!(
            out.contains("number of failed transactions: 0"),
            "pgbench -M {mode} through PgBouncer → keyshift across cutover and rollback: {out}\nPgBouncer's log:\n{}",
            f.bouncer.log()
        );
        let summary: Vec<&str> = out
            .lines()
            .filter(|l| l.starts_with("number of") || l.starts_with("tps"))
            .collect();
        eprintln!("-M {mode}: {}", summary.join("; "));
    }
    let bad = inconsistent(&direct).await;
    assert!(bad.is_empty(), "twins wrong after rollback: {bad:?}");
}

#[tokio::test]
async fn front_transaction_pooler_pgbench_across_cutover_and_rollback() {
    front_pgbench_across_cutover_and_rollback(
        pgbouncer::Options::new(PoolMode::Transaction, 4),
        &["simple", "extended"],
    )
    .await;
}

/// PgBouncer 1.21+ in front with `max_prepared_statements`: it prepares each client's
/// statements under names of its own on keyshift's sessions, which keyshift prepares again
/// at each swap as it does a client's.
#[tokio::test]
async fn front_prepared_statements_pooler_pgbench_prepared_across_cutover_and_rollback() {
    let Some(o) = prepared_statements_pooler(4) else {
        return;
    };
    front_pgbench_across_cutover_and_rollback(o, &["prepared", "extended"]).await;
}
