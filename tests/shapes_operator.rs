//! The operator's view of shapes (issue 13 point 6): `keyshift shape default` and its
//! refusals; the sessions per shape that proxies report, in `keyshift status`, `/v1/status`
//! and `/metrics`; finalize refusing while the default is integer or an integer-shaped
//! session is connected, and `--terminate` ending those sessions.
mod common;
mod migrate_support;

use std::time::{Duration, Instant};

use common::proxy::{TestProxy, http, test_config};
use migrate_support::{SEED_004, count, ks_async, ks_expect, seed_004_rows, stderr, stdout, text};
use serde_json::Value;

async fn seeded() -> common::TestDb {
    let db = common::TestDb::new().await;
    db.client()
        .await
        .batch_execute(&format!("{SEED_004}{}", seed_004_rows(10)))
        .await
        .unwrap();
    db
}

async fn admin_get(p: &TestProxy, path: &'static str) -> String {
    let admin = p.admin;
    tokio::task::spawn_blocking(move || http(admin, "GET", path, None))
        .await
        .unwrap()
        .1
}

/// Polls `keyshift status --format json` until `ok` holds.
async fn wait_cli_status(url: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        let out = ks_async(url, &["status", "--format", "json"]).await;
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        let v: Value = serde_json::from_str(&stdout(&out)).unwrap();
        if ok(&v) {
            return v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "status never matched: {v:#}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn shape_default_round_trip_and_refusals() {
    let db = seeded().await;
    let url = db.url();

    let out = ks_expect(&url, &["shape", "default"], 1);
    assert_eq!(
        stderr(&out).trim(),
        "keyshift shape default: refused: no migration here: the default shape belongs to a migration; run `keyshift expand` first"
    );

    ks_expect(&url, &["expand"], 0);
    let out = ks_expect(&url, &["shape", "default"], 0);
    assert_eq!(stdout(&out), "integer\n");
    let out = ks_expect(&url, &["shape", "default", "uuid"], 1);
    assert_eq!(
        stderr(&out).trim(),
        "keyshift shape default: refused: the default shape cannot be uuid: the uuid shape is served once the uuids are complete and enforced; the migration is in phase expanded: it works after `keyshift harden` (phase hardened)"
    );
    let out = ks_expect(&url, &["shape", "default", "sideways"], 2);
    assert!(
        stderr(&out).contains("\"sideways\" is not a shape: use integer or uuid"),
        "{}",
        text(&out)
    );

    ks_expect(&url, &["backfill"], 0);
    // Proxies re-read the state on the NOTIFY: listen as one does.
    let c = db.client().await;
    let out = ks_expect(&url, &["shape", "default", "UUID"], 0);
    assert_eq!(
        stdout(&out).trim(),
        "default shape: integer -> uuid. New connections that name no keyshift.shape and match no rule now get the uuid shape; open connections keep theirs (`keyshift status` lists them by shape)"
    );
    let out = ks_expect(&url, &["shape", "default"], 0);
    assert_eq!(stdout(&out), "uuid\n");
    let out = ks_expect(&url, &["shape", "default", "uuid"], 0);
    assert_eq!(
        stdout(&out).trim(),
        "the default shape is already uuid; nothing changed"
    );
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM keyshift.events WHERE kind = 'shape' AND message = 'default shape integer -> uuid'"
        )
        .await,
        1,
        "one event per change, none for a no-op"
    );
    // Nothing else moves: the rules version a proxy rebuilds on is untouched.
    let before = count(&c, "SELECT rules_version FROM keyshift.migration").await;
    ks_expect(&url, &["shape", "default", "integer"], 0);
    assert_eq!(
        count(&c, "SELECT rules_version FROM keyshift.migration").await,
        before
    );
    let out = ks_expect(&url, &["status"], 0);
    assert!(
        stdout(&out).contains("default shape: integer (for new connections"),
        "{}",
        text(&out)
    );

    // Once finalize has started, the integer shape is gone.
    c.batch_execute("UPDATE keyshift.migration SET phase = 'finalizing'")
        .await
        .unwrap();
    let out = ks_expect(&url, &["shape", "default", "integer"], 1);
    assert_eq!(
        stderr(&out).trim(),
        "keyshift shape default: refused: the default shape cannot be integer: the integer shape is gone: the migration is in phase finalizing and the legacy integer columns are dropped; connect with keyshift.shape=uuid"
    );
}

#[tokio::test]
async fn sessions_by_shape_in_status_and_finalize_guard() {
    let db = seeded().await;
    let url = db.url();
    ks_expect(&url, &["expand"], 0);
    ks_expect(&url, &["backfill"], 0);
    let mut cfg = test_config();
    cfg.database_url = Some(url.clone());
    cfg.proxy_id = Some("proxy-a".into());
    let p = TestProxy::start_with(cfg);

    // A V1 worker through the proxy (every session is integer-shaped until it names a shape).
    let app_url = format!("{}?application_name=v1-worker", p.url("postgres", &db.name));
    let app = common::connect(&app_url).await;
    app.simple_query("SELECT 1").await.unwrap();

    // The proxy's own view: its sessions per shape, without pids (the endpoint is open).
    let v: Value = serde_json::from_str(&admin_get(&p, "/v1/status").await).unwrap();
    assert_eq!(v["sessions_by_shape"]["integer"], 1, "{v:#}");
    assert_eq!(v["sessions_by_shape"]["uuid"], 0, "{v:#}");
    assert_eq!(
        v["shapes"],
        serde_json::json!([{"shape": "integer", "user": "postgres", "database": db.name,
                            "application_name": "v1-worker", "sessions": 1}]),
        "{v:#}"
    );
    let metrics = admin_get(&p, "/metrics").await;
    assert!(
        metrics.contains("keyshift_sessions{shape=\"integer\"} 1")
            && metrics.contains("keyshift_sessions{shape=\"uuid\"} 0"),
        "{metrics}"
    );

    // The operator's view, across live proxies, from their heartbeats.
    // A heartbeat may count the session before its backend pid is known (it is counted
    // from startup on): wait for one that has both.
    let st = wait_cli_status(&url, |v| {
        v["sessions_by_shape"]["integer"] == 1
            && v["proxy_sessions"][0]["groups"][0]["backend_pids"][0].is_u64()
    })
    .await;
    assert_eq!(st["default_shape"], "integer");
    assert_eq!(
        st["sessions"],
        serde_json::json!([{"shape": "integer", "user": "postgres", "database": db.name,
                            "application_name": "v1-worker", "sessions": 1}]),
        "{st:#}"
    );
    assert_eq!(st["proxy_sessions"][0]["proxy"], "proxy-a");
    assert!(
        st["proxy_sessions"][0]["groups"][0]["backend_pids"][0]
            .as_u64()
            .is_some_and(|pid| pid > 0),
        "the heartbeat carries the backend pids: {st:#}"
    );
    let out = ks_expect(&url, &["status"], 0);
    let human = stdout(&out);
    assert!(
        human.contains(
            "sessions by shape (live proxies: 1, as of their last heartbeat): integer 1, uuid 0"
        ) && human.contains(&format!(
            "  integer      1  user postgres, database {}, application_name \"v1-worker\"",
            db.name
        )),
        "{human}"
    );

    let out = ks_async(&url, &["cutover"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));

    // finalize refuses: the default is integer, and V1 is connected; each reason says what to do.
    let v1 = format!(
        "  proxy proxy-a: 1 integer-shaped session(s) of user postgres, application_name \"v1-worker\", database {}",
        db.name
    );
    let out = ks_async(&url, &["finalize", "--yes"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = stderr(&out);
    assert!(
        err.starts_with("keyshift finalize: refused: the default shape is integer: new connections that name no shape and match no rule would get the integer shape, whose columns finalize drops\n  what to do: `keyshift shape default uuid`"),
        "{err}"
    );
    assert!(err.contains(&v1), "{err}");
    // --terminate does not change the default: still refused, and V1 untouched.
    let out = ks_async(&url, &["finalize", "--yes", "--terminate"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    app.simple_query("SELECT 1").await.unwrap();

    ks_expect(&url, &["shape", "default", "uuid"], 0);
    let out = ks_async(&url, &["finalize", "--yes"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert_eq!(
        stderr(&out).trim_end(),
        format!(
            "keyshift finalize: refused: 1 integer-shaped session(s) are connected; finalize drops the integer columns they read:\n{v1}\n  what to do: move them to the uuid shape (connect with keyshift.shape=uuid) and retire V1, or end them with `keyshift finalize --terminate`"
        )
    );
    // Nothing was changed by the refusals.
    let c = db.client().await;
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM keyshift.migration WHERE phase = 'cut_over'"
        )
        .await,
        1
    );
    app.simple_query("SELECT 1").await.unwrap();

    // --terminate ends V1's backend, and finalize goes on.
    let out = ks_async(&url, &["finalize", "--yes", "--terminate"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        stdout(&out).starts_with("ended 1 integer-shaped session(s) (--terminate)\nfinalized:"),
        "{}",
        text(&out)
    );
    let e = app
        .simple_query("SELECT 1")
        .await
        .expect_err("V1's session was ended");
    assert!(
        e.is_closed() || e.code() == Some(&tokio_postgres::error::SqlState::ADMIN_SHUTDOWN),
        "{e:?}"
    );
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM pg_attribute WHERE attname LIKE '%_legacy' AND attnum > 0 AND NOT attisdropped AND attrelid = 'mcp_servers'::regclass"
        )
        .await,
        0
    );
    p.shutdown();
}

#[tokio::test]
async fn finalize_refuses_a_proxy_that_cannot_report() {
    let db = seeded().await;
    let url = db.url();
    ks_expect(&url, &["expand"], 0);
    ks_expect(&url, &["backfill"], 0);
    let out = ks_async(&url, &["cutover"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    ks_expect(&url, &["shape", "default", "uuid"], 0);
    // A proxy seen 20 s ago: it may be up behind a partition and serve V1.
    db.client()
        .await
        .batch_execute(
            "INSERT INTO keyshift.proxies (id, heartbeat_at, sessions) VALUES ('lost', now() - interval '20 seconds', '[]')",
        )
        .await
        .unwrap();
    let out = ks_async(&url, &["finalize", "--yes"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        stderr(&out)
            .starts_with("keyshift finalize: refused: proxy lost did not report its sessions"),
        "{}",
        text(&out)
    );
}
