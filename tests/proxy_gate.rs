//! The pause gate: holds idle sessions, lets open transactions finish, releases in order.
mod common;
// Shared with the migrate_* tests; only the CLI helper and the seed are used here.
mod migrate_support;

use std::time::Duration;

use common::proxy::{TestProxy, http};

async fn post(
    admin: std::net::SocketAddr,
    path: &'static str,
    token: Option<&'static str>,
) -> (u16, serde_json::Value) {
    let (code, body) = tokio::task::spawn_blocking(move || http(admin, "POST", path, token))
        .await
        .unwrap();
    (
        code,
        serde_json::from_str(&body).unwrap_or(serde_json::Value::Null),
    )
}

async fn status(admin: std::net::SocketAddr) -> serde_json::Value {
    let (_, body) = tokio::task::spawn_blocking(move || http(admin, "GET", "/v1/status", None))
        .await
        .unwrap();
    serde_json::from_str(&body).unwrap()
}

#[tokio::test]
async fn gate_holds_idle_sessions_and_drains_transactions() {
    let db = common::TestDb::new().await;
    let p = TestProxy::start();
    let direct = db.client().await;
    direct
        .batch_execute("CREATE TABLE g (seq serial primary key, n int)")
        .await
        .unwrap();
    let a = common::connect(&p.url("postgres", &db.name)).await;
    let b = common::connect(&p.url("postgres", &db.name)).await;

    // The endpoints refuse without the token.
    assert_eq!(post(p.admin, "/v1/pause", None).await.0, 401);
    assert_eq!(post(p.admin, "/v1/resume", Some("wrong")).await.0, 401);
    assert_eq!(status(p.admin).await["gate"], "open");

    // A opens a transaction: the pause cannot drain and says who is busy.
    // (B prepares its statement first, so that what it sends later is one message each.)
    let ins = b.prepare("INSERT INTO g (n) VALUES ($1)").await.unwrap();
    a.batch_execute("BEGIN; INSERT INTO g (n) VALUES (1)")
        .await
        .unwrap();
    let (code, out) = post(p.admin, "/v1/pause?timeout=200ms", Some("test-token")).await;
    assert_eq!(code, 409, "{out}");
    assert_eq!(out["drained"], false);
    let busy = out["busy"].as_array().unwrap();
    assert_eq!(busy.len(), 1, "{out}");
    assert_eq!(busy[0]["state"], "idle_in_transaction");
    assert!(busy[0]["backend_pid"].as_u64().unwrap() > 0);

    // The gate is closed: B (idle) is held, two statements pipelined, nothing forwarded.
    let b = std::sync::Arc::new(b);
    let b1 = b.clone();
    let held = tokio::spawn(async move {
        let first = b1.execute(&ins, &[&2i32]);
        let second = b1.execute(&ins, &[&4i32]);
        let (x, y) = tokio::join!(first, second);
        (x.unwrap(), y.unwrap())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!held.is_finished());
    let n: i64 = direct
        .query_one("SELECT count(*) FROM g WHERE n IN (2, 4)", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "a held statement reached PostgreSQL");
    let st = status(p.admin).await;
    assert_eq!(st["gate"], "closed");
    assert_eq!(st["sessions"]["held"], 1, "{st}");

    // A, inside its transaction, runs on and commits.
    a.batch_execute("INSERT INTO g (n) VALUES (3); COMMIT")
        .await
        .unwrap();
    let (code, out) = post(p.admin, "/v1/pause?timeout=5s", Some("test-token")).await;
    assert_eq!(code, 200, "{out}");
    assert_eq!(out["drained"], true);

    // Now idle, A is held too.
    let a = std::sync::Arc::new(a);
    let a1 = a.clone();
    let a_held = tokio::spawn(async move {
        a1.query_one("SELECT count(*) FROM g", &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!a_held.is_finished());

    // Resume: every held message goes on, in each session's order, without errors.
    let (code, out) = post(p.admin, "/v1/resume", Some("test-token")).await;
    assert_eq!(code, 200, "{out}");
    assert_eq!(held.await.unwrap(), (1, 1));
    let seen = a_held.await.unwrap();
    assert!((2..=4).contains(&seen), "{seen}");
    let order: Vec<i32> = direct
        .query("SELECT n FROM g ORDER BY seq", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(order, vec![1, 3, 2, 4]);
    assert_eq!(status(p.admin).await["gate"], "open");
}

#[tokio::test]
async fn a_pause_never_lets_a_message_slip_through() {
    // Many sessions hammer the proxy while it is paused and resumed repeatedly: every time a
    // pause reports drained, no statement may start until the resume.
    let db = common::TestDb::new().await;
    let p = TestProxy::start();
    let direct = db.client().await;
    direct
        .batch_execute("CREATE TABLE h (at timestamptz default clock_timestamp())")
        .await
        .unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for _ in 0..8 {
        let c = common::connect(&p.url("postgres", &db.name)).await;
        let stop = stop.clone();
        workers.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                c.execute("INSERT INTO h DEFAULT VALUES", &[])
                    .await
                    .unwrap();
                n += 1;
            }
            n
        }));
    }
    let mut windows = Vec::new();
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (code, out) = post(p.admin, "/v1/pause?timeout=5s", Some("test-token")).await;
        assert_eq!(code, 200, "{out}");
        let from: std::time::SystemTime = direct
            .query_one("SELECT clock_timestamp()", &[])
            .await
            .unwrap()
            .get(0);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let to: std::time::SystemTime = direct
            .query_one("SELECT clock_timestamp()", &[])
            .await
            .unwrap()
            .get(0);
        windows.push((from, to));
        assert_eq!(post(p.admin, "/v1/resume", Some("test-token")).await.0, 200);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for w in workers {
        total += w.await.unwrap();
    }
    assert!(total > 0);
    for (from, to) in windows {
        let n: i64 = direct
            .query_one(
                "SELECT count(*) FROM h WHERE at BETWEEN $1 AND $2",
                &[&from, &to],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            n, 0,
            "a statement ran while the gate was closed and drained"
        );
    }
}

/// Only what must wait waits (issue [scale]): with a migration's rules in force and the gate
/// closed, a simple-protocol statement that names no migrated table goes on and the pause does
/// not wait for it; one that names a migrated table, a transaction start and an extended-
/// protocol statement are held as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_that_cannot_touch_the_migration_pass_a_closed_gate() {
    let db = common::TestDb::new().await;
    db.client()
        .await
        .batch_execute(&format!(
            "{}{}CREATE TABLE other (n int);",
            migrate_support::SEED_004,
            "INSERT INTO mcp_connectors (name) VALUES ('c1');"
        ))
        .await
        .unwrap();
    migrate_support::ks_expect(&db.url(), &["expand"], 0);
    let p = common::proxy::linked_proxy(&db).await;
    let url = p.url("postgres", &db.name);
    let (a, b, c, d) = (
        common::connect(&url).await,
        common::connect(&url).await,
        common::connect(&url).await,
        common::connect(&url).await,
    );
    let (code, out) = post(p.admin, "/v1/pause?timeout=2s", Some("test-token")).await;
    assert_eq!(code, 200, "{out}");

    // Passes: no migrated table named, one simple Query.
    let answered = tokio::time::timeout(
        Duration::from_secs(5),
        a.simple_query("INSERT INTO other VALUES (1); SELECT count(*) FROM other"),
    )
    .await;
    assert!(matches!(answered, Ok(Ok(_))), "{answered:?}");
    // Held: a migrated table, a transaction start, the extended protocol.
    let b = std::sync::Arc::new(b);
    let c = std::sync::Arc::new(c);
    let d = std::sync::Arc::new(d);
    let (b1, c1, d1) = (b.clone(), c.clone(), d.clone());
    let held_b = tokio::spawn(async move {
        b1.simple_query("SELECT count(*) FROM mcp_servers")
            .await
            .map(|_| ())
    });
    let held_c = tokio::spawn(async move { c1.batch_execute("BEGIN; SELECT 1; COMMIT").await });
    let held_d = tokio::spawn(async move { d1.query_one("SELECT 1", &[]).await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(!held_b.is_finished() && !held_c.is_finished() && !held_d.is_finished());
    let st = status(p.admin).await;
    assert_eq!(st["sessions"]["held"], 3, "{st}");

    // A statement that passes and runs long does not keep a pause from draining.
    let a = std::sync::Arc::new(a);
    let a1 = a.clone();
    let long =
        tokio::spawn(async move { a1.simple_query("SELECT pg_sleep(1.5)").await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let st = status(p.admin).await;
    assert_eq!(st["sessions"]["passing"], 1, "{st}");
    let (code, out) = post(p.admin, "/v1/pause?timeout=300ms", Some("test-token")).await;
    assert_eq!(code, 200, "{out}");
    assert_eq!(out["drained"], true);

    let (code, out) = post(p.admin, "/v1/resume", Some("test-token")).await;
    assert_eq!(code, 200, "{out}");
    held_b.await.unwrap().unwrap();
    held_c.await.unwrap().unwrap();
    held_d.await.unwrap().unwrap();
    long.await.unwrap().unwrap();
}
