//! The id mapping (issue 6): the SQL view `keyshift.id_map` (index use checked in its plan),
//! `/v1/map` on a real proxy (hits, misses, unknown and malformed ids, batches, the token, a
//! database that stops), `keyshift map` and `keyshift map export`, before and after cutover
//! and after finalize with and without `--keep-map`.
mod common;
mod migrate_support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::proxy::{TestProxy, test_config};
use migrate_support::{SEED_004, count, ks, ks_expect, seed_004_rows, stdout, text};
use serde_json::{Value, json};

/// An admin request with an optional JSON body: (status, parsed body).
fn req(
    admin: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, Value) {
    let (code, body) = common::proxy::http_with_body(admin, method, path, token, body);
    let v = serde_json::from_str(&body).unwrap_or(Value::String(body));
    (code, v)
}

async fn areq(p: &TestProxy, method: &str, path: &str, body: &str) -> (u16, Value) {
    let (admin, method, path, body) = (
        p.admin,
        method.to_string(),
        path.to_string(),
        body.to_string(),
    );
    let token = p.shared.cfg.map_token.clone();
    tokio::task::spawn_blocking(move || req(admin, &method, &path, token.as_deref(), &body))
        .await
        .unwrap()
}

fn metric(p: &TestProxy, line_start: &str) -> f64 {
    let (_, body) = common::proxy::http(p.admin, "GET", "/metrics", None);
    body.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("metric {line_start} not exported"))
}

async fn seeded(rows: i64) -> common::TestDb {
    let db = common::TestDb::new().await;
    db.client()
        .await
        .batch_execute(&format!("{SEED_004}{}", seed_004_rows(rows)))
        .await
        .unwrap();
    ks_expect(&db.url(), &["expand"], 0);
    ks_expect(&db.url(), &["backfill"], 0);
    db
}

fn linked_proxy(db: &common::TestDb, map_token: Option<&str>) -> TestProxy {
    let mut cfg = test_config();
    cfg.database_url = Some(db.url());
    cfg.map_token = map_token.map(String::from);
    TestProxy::start_with(cfg)
}

async fn uuid_of(
    c: &tokio_postgres::Client,
    table: &str,
    key: &str,
    uuid: &str,
    id: i64,
) -> String {
    c.query_one(
        &format!("SELECT {uuid}::text FROM {table} WHERE {key} = $1"),
        &[&(id as i32)],
    )
    .await
    .unwrap()
    .get(0)
}

/// The plan of a lookup through the view reads an index of the named table, and no table
/// is scanned. With sequential scans priced out, a Seq Scan in the plan means no index can
/// serve the lookup (a test table is too small for the planner to prefer an index anyway).
async fn assert_indexed(c: &tokio_postgres::Client, sql: &str) {
    c.batch_execute("SET enable_seqscan = off").await.unwrap();
    let plan: Vec<String> = c
        .query(&format!("EXPLAIN {sql}"), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let plan = plan.join("\n");
    assert!(
        plan.contains("Index"),
        "no index in the plan of {sql}:\n{plan}"
    );
    assert!(
        !plan.contains("Seq Scan"),
        "a scan in the plan of {sql}:\n{plan}"
    );
}

/// Both directions of a lookup of `public.mcp_servers` id 7 through the view use an index.
async fn assert_view_indexed(c: &tokio_postgres::Client, u7: &str) {
    assert_indexed(
        c,
        "SELECT uuid FROM keyshift.id_map WHERE table_name = 'public.mcp_servers' AND legacy_id = 7",
    )
    .await;
    assert_indexed(
        c,
        &format!("SELECT legacy_id FROM keyshift.id_map WHERE table_name = 'public.mcp_servers' AND uuid = '{u7}'"),
    )
    .await;
}

#[tokio::test]
async fn mapping_before_and_after_cutover_and_after_finalize_keep_map() {
    let db = seeded(40).await;
    let c = db.client().await;
    // Planner statistics as a real table would have them, so that the plan is the real one.
    c.batch_execute("ANALYZE").await.unwrap();
    let u7 = uuid_of(&c, "mcp_servers", "id", "id_uuid", 7).await;

    // SQL: the view, both directions, through the index.
    let v: String = c
        .query_one(
            "SELECT uuid::text FROM keyshift.id_map WHERE table_name = 'public.mcp_servers' AND legacy_id = 7",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, u7);
    assert_eq!(
        count(&c, "SELECT count(*) FROM keyshift.id_map").await,
        40 * 8,
        "every row of the five tables is in the view"
    );
    assert_view_indexed(&c, &u7).await;

    // HTTP, with the token required.
    let p = linked_proxy(&db, Some("map-secret"));
    let (code, v) = areq(&p, "GET", "/v1/map/mcp_servers/7", "").await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(
        v,
        json!({"table": "public.mcp_servers", "legacy_id": 7, "uuid": u7})
    );
    assert_eq!(
        metric(&p, "keyshift_map_lookups_total{result=\"miss\"}"),
        1.0
    );
    let (code, _) = areq(&p, "GET", "/v1/map/public.mcp_servers/7", "").await;
    assert_eq!(code, 200);
    assert_eq!(
        metric(&p, "keyshift_map_lookups_total{result=\"hit\"}"),
        1.0
    );
    let (code, v) = areq(&p, "GET", &format!("/v1/map/mcp_servers?uuid={u7}"), "").await;
    assert_eq!((code, v["legacy_id"].clone()), (200, json!(7)), "{v}");
    let (admin, path) = (p.admin, "/v1/map/mcp_servers/7".to_string());
    let (code, v) = tokio::task::spawn_blocking(move || req(admin, "GET", &path, None, ""))
        .await
        .unwrap();
    assert_eq!(code, 401, "no token: {v}");
    let (admin, path) = (p.admin, "/v1/map/mcp_servers/7".to_string());
    let (code, _) =
        tokio::task::spawn_blocking(move || req(admin, "GET", &path, Some("wrong"), ""))
            .await
            .unwrap();
    assert_eq!(code, 401, "wrong token");

    // Unknown and malformed: 404 and 400, each saying why.
    let (code, v) = areq(&p, "GET", "/v1/map/mcp_servers/999999", "").await;
    assert_eq!(code, 404, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("no row with legacy id 999999"),
        "{v}"
    );
    let (code, v) = areq(&p, "GET", "/v1/map/nosuch/1", "").await;
    assert_eq!(code, 404, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("public.mcp_servers"),
        "names the tables: {v}"
    );
    let (code, v) = areq(&p, "GET", "/v1/map/mcp_servers/12abc", "").await;
    assert_eq!(code, 400, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("not an integer"),
        "{v}"
    );
    let (code, v) = areq(&p, "GET", "/v1/map/mcp_servers/99999999999999999999", "").await;
    assert_eq!(code, 400, "{v}");
    let (code, v) = areq(&p, "GET", "/v1/map/mcp_servers?uuid=not-a-uuid", "").await;
    assert_eq!(code, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("malformed"), "{v}");
    let (code, _) = areq(&p, "GET", "/v1/map/mcp_servers", "").await;
    assert_eq!(code, 400, "neither uuid nor legacy id");

    // Batch: hits (7), misses (1, 2), unknown ids, one round trip; order kept.
    let (code, v) = areq(
        &p,
        "POST",
        "/v1/map/mcp_servers",
        r#"{"legacy_ids": [1, 7, 999998, "2", 999999]}"#,
    )
    .await;
    assert_eq!(code, 200, "{v}");
    let got: Vec<i64> = v["mappings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["legacy_id"].as_i64().unwrap())
        .collect();
    assert_eq!(got, vec![1, 7, 2]);
    assert_eq!(v["mappings"][1]["uuid"], json!(u7));
    assert_eq!(v["not_found"], json!([999998, 999999]));
    let u1 = uuid_of(&c, "mcp_servers", "id", "id_uuid", 1).await;
    assert_eq!(v["mappings"][0]["uuid"], json!(u1));
    let (code, v) = areq(
        &p,
        "POST",
        "/v1/map/mcp_servers",
        &format!(r#"{{"uuids": ["{u1}", "00000000-0000-0000-0000-000000000000"]}}"#),
    )
    .await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["mappings"], json!([{"legacy_id": 1, "uuid": u1}]));
    assert_eq!(
        v["not_found"],
        json!(["00000000-0000-0000-0000-000000000000"])
    );
    let many: Vec<i64> = (1..=10_000).collect();
    let (code, v) = areq(
        &p,
        "POST",
        "/v1/map/mcp_servers",
        &json!({"legacy_ids": many}).to_string(),
    )
    .await;
    assert_eq!(code, 200, "10,000 ids is the limit, accepted");
    assert_eq!(v["mappings"].as_array().unwrap().len(), 80, "every server");
    let many: Vec<i64> = (1..=10_001).collect();
    let (code, v) = areq(
        &p,
        "POST",
        "/v1/map/mcp_servers",
        &json!({"legacy_ids": many}).to_string(),
    )
    .await;
    assert_eq!(code, 400, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("at most 10000"),
        "{v}"
    );
    for bad in [
        r#"{"ids": [1]}"#,
        "not json",
        r#"{"legacy_ids": [1.5]}"#,
        r#"{"uuids": [1]}"#,
    ] {
        let (code, v) = areq(&p, "POST", "/v1/map/mcp_servers", bad).await;
        assert_eq!(code, 400, "{bad}: {v}");
    }
    assert!(metric(&p, "keyshift_map_cache_entries") >= 80.0);
    let (_, status) = common::proxy::http(p.admin, "GET", "/v1/status", None);
    let status: Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["id_map"]["source"], "live", "{status}");
    assert_eq!(status["id_map"]["tables"], 5, "{status}");
    assert!(metric(&p, "keyshift_map_lookup_duration_seconds_count") > 5.0);
    assert!(metric(&p, "keyshift_map_lookups_total{result=\"not_found\"}") >= 4.0);

    // CLI, both directions; an unknown id exits 1.
    let out = ks_expect(&db.url(), &["map", "mcp_servers", "7"], 0);
    assert_eq!(stdout(&out).trim(), u7);
    let out = ks_expect(&db.url(), &["map", "public.mcp_servers", &u7], 0);
    assert_eq!(stdout(&out).trim(), "7");
    let out = ks_expect(
        &db.url(),
        &["map", "mcp_servers", "999999", "--format", "json"],
        1,
    );
    assert!(text(&out).contains("no row"), "{}", text(&out));
    ks_expect(&db.url(), &["map", "nosuch", "1"], 2);
    ks_expect(&db.url(), &["map", "mcp_servers", "x1"], 2);

    // Cutover: the same answers, from the swapped columns, still through an index.
    let url = db.url();
    let out = tokio::task::spawn_blocking(move || ks(&url, &["cutover"]))
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    c.batch_execute("ANALYZE").await.unwrap();
    assert_eq!(uuid_of(&c, "mcp_servers", "id_legacy", "id", 7).await, u7);
    let v: i64 = c
        .query_one(
            &format!("SELECT legacy_id::bigint FROM keyshift.id_map WHERE table_name = 'public.mcp_servers' AND uuid = '{u7}'"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, 7);
    assert_view_indexed(&c, &u7).await;
    // A row written after cutover (uuid key, legacy from the sequence) is served too, and a
    // lookup not cached before (id 3) reads the new columns.
    let (new_legacy, new_uuid): (i32, String) = {
        let r = c
            .query_one(
                "INSERT INTO mcp_servers (name) VALUES ('after') RETURNING id_legacy, id::text",
                &[],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    let u3 = uuid_of(&c, "mcp_servers", "id_legacy", "id", 3).await;
    let start = Instant::now();
    loop {
        let (code, v) = areq(&p, "GET", &format!("/v1/map/mcp_servers/{new_legacy}"), "").await;
        if code == 200 {
            assert_eq!(v["uuid"], json!(new_uuid));
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "new row never mapped: {code} {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (code, v) = areq(&p, "GET", "/v1/map/mcp_servers/3", "").await;
    assert_eq!((code, v["uuid"].clone()), (200, json!(u3)), "{v}");
    let (code, v) = areq(&p, "GET", "/v1/map/mcp_servers/7", "").await;
    assert_eq!(
        (code, v["uuid"].clone()),
        (200, json!(u7)),
        "cached across cutover: {v}"
    );
    let out = ks_expect(&db.url(), &["map", "mcp_servers", &u3], 0);
    assert_eq!(stdout(&out).trim(), "3");

    // finalize --keep-map: the archive answers, in SQL, over HTTP (even uncached) and in the CLI.
    ks_expect(&db.url(), &["shape", "default", "uuid"], 0);
    ks_expect(&db.url(), &["finalize", "--yes", "--keep-map"], 0);
    assert_eq!(
        count(&c, "SELECT count(*) FROM keyshift.id_map_archive").await,
        40 * 8 + 1
    );
    let v: i64 = c
        .query_one(
            "SELECT legacy_id FROM keyshift.id_map WHERE table_name = 'public.mcp_servers' AND uuid = $1::text::uuid",
            &[&u3],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, 3);
    let u5 = c
        .query_one(
            "SELECT id::text FROM mcp_servers ORDER BY name LIMIT 1",
            &[],
        )
        .await
        .unwrap()
        .get::<_, String>(0);
    let start = Instant::now();
    loop {
        let (code, v) = areq(&p, "GET", &format!("/v1/map/mcp_servers?uuid={u5}"), "").await;
        if code == 200 {
            assert!(v["legacy_id"].as_i64().is_some(), "{v}");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "archive never served: {code} {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = ks_expect(&db.url(), &["map", "mcp_servers", "7"], 0);
    assert_eq!(stdout(&out).trim(), u7);
    let (_, status) = common::proxy::http(p.admin, "GET", "/v1/status", None);
    let status: Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["id_map"]["source"], "archive", "{status}");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("map.jsonl");
    ks_expect(
        &db.url(),
        &[
            "map",
            "export",
            "--format",
            "jsonl",
            "--table",
            "mcp_servers",
            "-o",
            file.to_str().unwrap(),
        ],
        0,
    );
    let lines: Vec<Value> = std::fs::read_to_string(&file)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 81);
    assert!(lines.contains(&json!({"table": "public.mcp_servers", "legacy_id": 7, "uuid": u7})));
    p.shutdown();
}

#[tokio::test]
async fn finalize_without_keep_map_ends_the_mapping() {
    let db = seeded(5).await;
    let c = db.client().await;
    let p = linked_proxy(&db, None);
    let (code, _) = areq(&p, "GET", "/v1/map/mcp_connectors/1", "").await;
    assert_eq!(code, 200);
    let url = db.url();
    let out = tokio::task::spawn_blocking(move || ks(&url, &["cutover"]))
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    ks_expect(&db.url(), &["shape", "default", "uuid"], 0);
    ks_expect(&db.url(), &["finalize", "--yes"], 0);
    let gone: bool = c
        .query_one(
            "SELECT to_regclass('keyshift.id_map') IS NULL AND to_regclass('keyshift.id_map_archive') IS NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(gone, "no mapping remains without --keep-map");
    // The proxy notices the migration is gone; then even a cached id is not served.
    let start = Instant::now();
    loop {
        let (code, v) = areq(&p, "GET", "/v1/map/mcp_connectors/1", "").await;
        if code == 404 {
            assert!(
                v["error"].as_str().unwrap().contains("no id mapping"),
                "{v}"
            );
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "still served: {code} {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = ks_expect(&db.url(), &["map", "mcp_connectors", "1"], 1);
    assert!(text(&out).contains("no id mapping"), "{}", text(&out));
    p.shutdown();
}

/// A database that stops: cached answers go on, misses get 503 (quickly, not a hang), and
/// the service recovers when the database is back.
#[tokio::test]
async fn database_stopped_during_lookups() {
    use keyshift::pgcluster::{Cluster, ClusterOptions};
    // This test's thread outlives the server (started with PDEATHSIG from it).
    let cluster = Cluster::start(&ClusterOptions::default()).expect("start a private cluster");
    let url = cluster.url("postgres", "postgres");
    let c = common::connect(&url).await;
    c.batch_execute(&format!("{SEED_004}{}", seed_004_rows(10)))
        .await
        .unwrap();
    ks_expect(&url, &["expand"], 0);
    ks_expect(&url, &["backfill"], 0);
    let mut cfg = test_config();
    cfg.upstream = cluster.addr().to_string();
    cfg.database_url = Some(url.clone());
    let p = TestProxy::start_with(cfg);
    let (code, cached) = areq(&p, "GET", "/v1/map/mcp_servers/4", "").await;
    assert_eq!(code, 200, "{cached}");
    drop(c);

    // Stop the server while lookups are being served.
    let addr = cluster.addr();
    let stopper = std::thread::spawn(move || drop(cluster));
    let mut saw_503 = false;
    let start = Instant::now();
    for i in 0..40 {
        let t = Instant::now();
        let (code, v) = areq(
            &p,
            "GET",
            &format!("/v1/map/mcp_servers/{}", 5 + i % 10),
            "",
        )
        .await;
        assert!(
            t.elapsed() < Duration::from_secs(8),
            "a lookup hung for {:?}",
            t.elapsed()
        );
        assert!(code == 200 || code == 404 || code == 503, "{code} {v}");
        if code == 503 {
            assert!(v["error"].as_str().unwrap().contains("unavailable"), "{v}");
            saw_503 = true;
        }
        let (code, v) = areq(&p, "GET", "/v1/map/mcp_servers/4", "").await;
        assert_eq!(
            (code, &v),
            (200, &cached),
            "a cached answer survives the database"
        );
        if saw_503 && start.elapsed() > Duration::from_secs(1) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stopper.join().unwrap();
    assert!(saw_503, "misses never reported the database unavailable");
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "the server is down"
    );
    assert!(metric(&p, "keyshift_map_lookups_total{result=\"error\"}") >= 1.0);
    p.shutdown();
}

/// A million rows exported with COPY in bounded memory, checked against the table by loading
/// the file back.
#[tokio::test]
async fn export_a_million_rows_in_bounded_memory() {
    let db = common::TestDb::new().await;
    let c = db.client().await;
    c.batch_execute(
        "CREATE TABLE events (id serial PRIMARY KEY, kind text);
         INSERT INTO events (kind) SELECT 'k' FROM generate_series(1, 1000000);",
    )
    .await
    .unwrap();
    ks_expect(&db.url(), &["expand"], 0);
    // Fill the uuids directly: the backfill has its own tests, this one is about export.
    c.batch_execute("UPDATE events SET id_uuid = gen_random_uuid() WHERE id_uuid IS NULL")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("map.csv");
    let url = db.url();
    let f2 = file.clone();
    let errlog = dir.path().join("stderr.log");
    let (code, max_rss_kib) = tokio::task::spawn_blocking({
        let errlog = errlog.clone();
        move || {
            // Reaped by wait4 below, which also reports the child's peak RSS.
            #[allow(clippy::zombie_processes)]
            let child = std::process::Command::new(migrate_support::bin())
                .args([
                    "map",
                    "export",
                    "--database-url",
                    &url,
                    "--output",
                    f2.to_str().unwrap(),
                ])
                .stderr(std::fs::File::create(&errlog).unwrap())
                .spawn()
                .unwrap();
            let pid = child.id() as libc::pid_t;
            let mut status = 0;
            // SAFETY: plain wait4 on our own child; rusage is plain data.
            let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
            let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
            assert_eq!(r, pid);
            (libc::WEXITSTATUS(status), usage.ru_maxrss)
        }
    })
    .await
    .unwrap();
    let err = std::fs::read_to_string(&errlog).unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("1000000 rows"), "{err}");
    assert!(
        max_rss_kib < 40 * 1024,
        "export peak RSS {max_rss_kib} KiB: memory must not grow with the rows"
    );
    // Load the file back and compare with the table, row for row.
    c.batch_execute("CREATE TEMP TABLE back (table_name text, legacy_id bigint, uuid uuid)")
        .await
        .unwrap();
    let data = tokio::fs::read(&file).await.unwrap();
    {
        use futures_util::SinkExt;
        let sink = c
            .copy_in("COPY back FROM STDIN WITH (FORMAT csv, HEADER true)")
            .await
            .unwrap();
        futures_util::pin_mut!(sink);
        sink.send(bytes::Bytes::from(data)).await.unwrap();
        assert_eq!(sink.finish().await.unwrap(), 1_000_000);
    }
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM (SELECT 'public.events', id::bigint, id_uuid FROM events
                EXCEPT SELECT table_name, legacy_id, uuid FROM back) d"
        )
        .await,
        0
    );
    assert_eq!(
        count(&c, "SELECT count(DISTINCT legacy_id) FROM back").await,
        1_000_000
    );
    assert!(!dir.path().join("map.csv.partial").exists());
}
