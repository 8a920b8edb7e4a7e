//! The binary spreads sessions over several single-threaded runtimes (`--worker-threads`):
//! sessions placed on any of them relay normally, the gate sees them all, and SIGTERM still
//! stops every thread.
mod common;

use std::time::{Duration, Instant};

use common::proxy::{ProxyProcess, http};

#[tokio::test]
async fn sessions_on_every_worker_runtime() {
    let db = common::TestDb::new().await;
    let mut p = ProxyProcess::spawn(&["--worker-threads", "3", "--admin-token", "t"]);
    // Least-loaded placement puts two of these six on each of the three runtimes.
    let mut clients = Vec::new();
    for _ in 0..6 {
        clients.push(std::sync::Arc::new(
            common::connect(&p.url("postgres", &db.name)).await,
        ));
    }
    for (i, c) in clients.iter().enumerate() {
        let n = i as i32;
        let row = c.query_one("SELECT $1::int + 1", &[&n]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), n + 1);
        c.simple_query("SELECT 1").await.unwrap();
    }
    let admin = p.admin;
    // tokio-postgres closes its unnamed statements in the background (Close + Sync): wait for
    // every session to be idle rather than race that last round trip.
    let start = Instant::now();
    loop {
        let (code, body) =
            tokio::task::spawn_blocking(move || http(admin, "GET", "/v1/status", None))
                .await
                .unwrap();
        assert_eq!(code, 200, "{body}");
        if body.contains("\"idle\":6") {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "{body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The gate holds sessions on every runtime, and opening it releases them all.
    let (code, body) =
        tokio::task::spawn_blocking(move || http(admin, "POST", "/v1/pause?timeout=2s", Some("t")))
            .await
            .unwrap();
    assert_eq!(code, 200, "{body}");
    let held: Vec<_> = clients
        .iter()
        .map(|c| {
            let c = c.clone();
            tokio::spawn(async move { c.simple_query("SELECT 2").await.map(|_| ()) })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        held.iter().all(|h| !h.is_finished()),
        "queries ran while the gate was closed"
    );
    let (code, body) =
        tokio::task::spawn_blocking(move || http(admin, "POST", "/v1/resume", Some("t")))
            .await
            .unwrap();
    assert_eq!(code, 200, "{body}");
    for h in held {
        tokio::time::timeout(Duration::from_secs(5), h)
            .await
            .expect("held query released by resume")
            .unwrap()
            .unwrap();
    }

    drop(clients);
    p.signal(libc::SIGTERM);
    let start = Instant::now();
    loop {
        if let Some(status) = p.child.try_wait().unwrap() {
            assert!(status.success(), "{status:?}");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "keyshift did not exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// When the shutdown grace is over, every session still connected ends with 57P01, on every
/// runtime, whether it sits idle or is held at a closed gate, and the proxy exits.
#[tokio::test]
async fn sessions_left_after_the_grace_are_ended_on_every_runtime() {
    let db = common::TestDb::new().await;
    let p = ProxyProcess::spawn(&[
        "--worker-threads",
        "2",
        "--admin-token",
        "t",
        "--shutdown-grace",
        "500ms",
    ]);
    let url = p.url("postgres", &db.name);
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(common::connect(&url).await);
    }
    let held = std::sync::Arc::new(common::connect(&url).await);
    for c in idle.iter().chain([&*held]) {
        c.simple_query("SELECT 1").await.unwrap();
    }
    let admin = p.admin;
    let (code, body) =
        tokio::task::spawn_blocking(move || http(admin, "POST", "/v1/pause?timeout=2s", Some("t")))
            .await
            .unwrap();
    assert_eq!(code, 200, "{body}");
    let waiting = {
        let held = held.clone();
        tokio::spawn(async move { held.simple_query("SELECT 2").await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !waiting.is_finished(),
        "the query ran while the gate was closed"
    );

    let start = Instant::now();
    p.signal(libc::SIGTERM);
    let err = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the held session ended after the grace")
        .unwrap()
        .expect_err("the held query cannot succeed");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::ADMIN_SHUTDOWN),
        "{err:?}"
    );
    for c in &idle {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !c.is_closed() {
            assert!(
                Instant::now() < deadline,
                "an idle session outlived the grace"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // Well before the 5 s the proxy would wait for sessions that were never told to end.
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    let mut p = p;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(status) = p.child.try_wait().unwrap() {
            assert!(status.success(), "{status:?}");
            break;
        }
        assert!(Instant::now() < deadline, "keyshift did not exit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
