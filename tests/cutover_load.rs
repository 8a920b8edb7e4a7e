//! Cutover and rollback under continuous load on the 15-table seed-000 schema (16 clients,
//! simple and prepared, inserts, FK updates, deletes and reads in transactions), with one
//! proxy and with two; the seeds' success criteria afterwards (UUID keys, FKs with their
//! original names and actions, no orphans, row counts equal to what the clients committed).
//! Then `kill -9` of the coordinator and of a proxy in the middle of the protocol, with the
//! real binary: the database is either fully before or fully after, gates never stay closed,
//! a restarted proxy serves in the right mode, and a proxy gone silent makes a switch refuse.
mod common;
mod migrate_support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::proxy::{ProxyProcess, TestProxy, free_port, http, test_config};
use migrate_support::{
    SEED_000, SEED_004, bin, count, ks_async, ks_expect, seed_004_rows, stderr, stdout, text,
};
use tokio_postgres::{Client, SimpleQueryMessage};

/// The 15 tables of SEED_000, every one migrated.
const TABLES_000: [&str; 15] = [
    "report_definitions",
    "report_templates",
    "report_executions",
    "report_schedules",
    "report_cache",
    "dashboards",
    "dashboard_pages",
    "dashboard_widgets",
    "dashboard_shares",
    "dashboard_snapshots",
    "widget_data_cache",
    "scheduler_configs",
    "scheduler_jobs",
    "scheduler_job_executions",
    "scheduler_job_logs",
];

const TABLES_004: [&str; 5] = [
    "mcp_connectors",
    "connector_access",
    "mcp_servers",
    "mcp_server_tokens",
    "mcp_server_tools",
];

/// About 2,000 rows for SEED_000, with NULL FKs where the schema allows them.
const ROWS_000: &str = "
INSERT INTO report_definitions (name, query) SELECT 'rd' || g, '{}' FROM generate_series(1, 40) g;
INSERT INTO report_templates (name) SELECT 'rt' || g FROM generate_series(1, 20) g;
INSERT INTO report_executions (report_definition_id, status) SELECT g % 40 + 1, 'seed' FROM generate_series(1, 200) g;
INSERT INTO report_schedules (report_definition_id, cron) SELECT g % 40 + 1, '* * * * *' FROM generate_series(1, 40) g;
INSERT INTO report_cache (report_definition_id, payload)
    SELECT CASE WHEN g % 5 = 0 THEN NULL ELSE g % 40 + 1 END, 'x' FROM generate_series(1, 60) g;
INSERT INTO dashboards (title) SELECT 'd' || g FROM generate_series(1, 30) g;
INSERT INTO dashboard_pages (dashboard_id, position) SELECT g % 30 + 1, g FROM generate_series(1, 90) g;
INSERT INTO dashboard_widgets (page_id, report_definition_id, kind)
    SELECT g % 90 + 1, CASE WHEN g % 3 = 0 THEN NULL ELSE g % 40 + 1 END, 'seed' FROM generate_series(1, 200) g;
INSERT INTO dashboard_shares (dashboard_id, grantee) SELECT g % 30 + 1, 'u' || g FROM generate_series(1, 60) g;
INSERT INTO dashboard_snapshots (dashboard_id, taken_at) SELECT g % 30 + 1, now() FROM generate_series(1, 120) g;
INSERT INTO widget_data_cache (widget_id, data) SELECT g % 200 + 1, '{}' FROM generate_series(1, 200) g;
INSERT INTO scheduler_configs (name) SELECT 'cfg' || g FROM generate_series(1, 10) g;
INSERT INTO scheduler_jobs (config_id, name) SELECT g % 10 + 1, 'job' || g FROM generate_series(1, 50) g;
INSERT INTO scheduler_job_executions (job_id, started_at) SELECT g % 50 + 1, now() FROM generate_series(1, 200) g;
INSERT INTO scheduler_job_logs (execution_id, line) SELECT g % 200 + 1, 'seed' FROM generate_series(1, 400) g;
";

// ---------------------------------------------------------------------------------------
// Schema snapshots and the seeds' success criteria

/// One foreign key as a user sees it: (table, name, referenced table, column, ON DELETE,
/// ON UPDATE) and the column's type.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Fk {
    table: String,
    name: String,
    parent: String,
    column: String,
    on_delete: String,
    on_update: String,
    column_type: String,
    parent_column: String,
}

async fn fks(c: &Client) -> Vec<Fk> {
    c.query(
        "SELECT conrelid::regclass::text, conname::text, confrelid::regclass::text,
                a.attname::text, confdeltype::text, confupdtype::text,
                format_type(a.atttypid, a.atttypmod), pa.attname::text
         FROM pg_constraint k
         JOIN pg_attribute a ON a.attrelid = k.conrelid AND a.attnum = k.conkey[1]
         JOIN pg_attribute pa ON pa.attrelid = k.confrelid AND pa.attnum = k.confkey[1]
         WHERE k.contype = 'f' AND k.connamespace = 'public'::regnamespace AND k.convalidated
         ORDER BY 1, 2",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| Fk {
        table: r.get(0),
        name: r.get(1),
        parent: r.get(2),
        column: r.get(3),
        on_delete: r.get(4),
        on_update: r.get(5),
        column_type: r.get(6),
        parent_column: r.get(7),
    })
    .collect()
}

/// table → (primary key constraint name, its column, the column's type).
async fn pks(c: &Client) -> BTreeMap<String, (String, String, String)> {
    c.query(
        "SELECT conrelid::regclass::text, conname::text, a.attname::text, format_type(a.atttypid, a.atttypmod)
         FROM pg_constraint k JOIN pg_attribute a ON a.attrelid = k.conrelid AND a.attnum = k.conkey[1]
         WHERE k.contype = 'p' AND k.connamespace = 'public'::regnamespace",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3))))
    .collect()
}

async fn row_counts(c: &Client, tables: &[&str]) -> BTreeMap<String, i64> {
    let mut m = BTreeMap::new();
    for t in tables {
        m.insert(
            t.to_string(),
            count(c, &format!("SELECT count(*) FROM {t}")).await,
        );
    }
    m
}

/// Which side of the swap the database is on: "before" when every table's primary key is
/// its integer `id`, "after" when every one is the uuid `id`; panics on anything in between.
async fn shape(c: &Client, tables: &[&str]) -> &'static str {
    let pks = pks(c).await;
    let sides: BTreeSet<&str> = tables
        .iter()
        .map(|t| {
            let (_, col, ty) = pks
                .get(*t)
                .unwrap_or_else(|| panic!("{t} has no primary key: {pks:?}"));
            assert_eq!(col, "id", "{t}: primary key on {col}");
            match ty.as_str() {
                "uuid" => "after",
                "integer" | "bigint" => "before",
                other => panic!("{t}: primary key of type {other}"),
            }
        })
        .collect();
    match sides.into_iter().collect::<Vec<_>>().as_slice() {
        [side] => side,
        _ => panic!("the database is half swapped: {pks:?}"),
    }
}

/// The end state after a cutover, against the schema before `expand`: every table's primary
/// key is the uuid `id` under its original constraint name; the FKs are exactly the original
/// ones (names, columns, ON DELETE / ON UPDATE), now on uuid columns pointing at the parents'
/// uuid keys; no orphans, and the legacy integer columns agree with the keys (reverse
/// dual-write kept them, so a rollback loses nothing).
async fn assert_cut_over(c: &Client, tables: &[&str], fks_before: &[Fk], pks_before: &PkMap) {
    assert_eq!(shape(c, tables).await, "after");
    let pks_now = pks(c).await;
    for t in tables {
        assert_eq!(
            pks_now[*t].0, pks_before[*t].0,
            "{t}: primary key constraint renamed"
        );
        assert_eq!(
            count(
                c,
                &format!("SELECT count(*) FROM {t} WHERE id IS NULL OR id_legacy IS NULL")
            )
            .await,
            0,
            "{t}: a row without its uuid key or its legacy integer"
        );
    }
    let now = fks(c).await;
    let strip = |f: &Fk| Fk {
        column_type: String::new(),
        ..f.clone()
    };
    assert_eq!(
        now.iter().map(strip).collect::<Vec<_>>(),
        fks_before.iter().map(strip).collect::<Vec<_>>(),
        "the foreign keys after cutover are not the original ones (names, columns, actions)"
    );
    for f in &now {
        assert_eq!(f.column_type, "uuid", "{f:?}");
        assert_eq!(f.parent_column, "id", "{f:?}");
    }
    assert_consistent(c, &now, "_legacy").await;
}

/// After a rollback: integer keys primary again under their names, the original FKs (names,
/// actions) on the integer columns, no orphans, and the uuid twins agree (forward dual-write).
async fn assert_rolled_back(c: &Client, tables: &[&str], fks_before: &[Fk], pks_before: &PkMap) {
    assert_eq!(shape(c, tables).await, "before");
    assert_eq!(&pks(c).await, pks_before, "primary keys after rollback");
    let names: BTreeSet<&str> = fks_before.iter().map(|f| f.name.as_str()).collect();
    let now: Vec<Fk> = fks(c)
        .await
        .into_iter()
        .filter(|f| names.contains(f.name.as_str()))
        .collect();
    assert_eq!(
        now, fks_before,
        "the foreign keys after rollback are not the original ones"
    );
    for t in tables {
        assert_eq!(
            count(
                c,
                &format!("SELECT count(*) FROM {t} WHERE id_uuid IS NULL")
            )
            .await,
            0,
            "{t}: a row without its uuid twin"
        );
    }
    assert_consistent(c, &now, "_uuid").await;
}

/// No child points at a missing parent, and each child's twin column (`suffix`) holds its
/// parent's twin key.
async fn assert_consistent(c: &Client, fks: &[Fk], suffix: &str) {
    for f in fks {
        let sql = format!(
            "SELECT count(*) FROM {t} c LEFT JOIN {p} p ON p.id = c.{col}
             WHERE (c.{col} IS NOT NULL AND p.id IS NULL) OR c.{col}{suffix} IS DISTINCT FROM p.id{suffix}",
            t = f.table,
            p = f.parent,
            col = f.column
        );
        assert_eq!(
            count(c, &sql).await,
            0,
            "{}: orphans or twin mismatches ({sql})",
            f.name
        );
    }
}

type PkMap = BTreeMap<String, (String, String, String)>;

/// A database with SEED_000 and its rows, expanded, backfilled and hardened; with the FKs
/// and PKs of the schema as the application created it.
async fn migrated_000() -> (common::TestDb, Vec<Fk>, PkMap) {
    let db = common::TestDb::new().await;
    let c = db.client().await;
    c.batch_execute(&format!("{SEED_000}{ROWS_000}"))
        .await
        .unwrap();
    let (f, p) = (fks(&c).await, pks(&c).await);
    assert_eq!(f.len(), 12, "{f:?}");
    assert_eq!(p.len(), 15, "{p:?}");
    ks_expect(&db.url(), &["expand"], 0);
    ks_expect(&db.url(), &["backfill"], 0);
    (db, f, p)
}

// ---------------------------------------------------------------------------------------
// The proxies

fn linked_proxy(db: &common::TestDb, id: &str) -> TestProxy {
    let mut cfg = test_config();
    cfg.database_url = Some(db.url());
    cfg.proxy_id = Some(id.to_string());
    TestProxy::start_with(cfg)
}

async fn status(admin: SocketAddr) -> Option<serde_json::Value> {
    let r = tokio::task::spawn_blocking(move || {
        std::panic::catch_unwind(|| http(admin, "GET", "/v1/status", None))
    })
    .await
    .unwrap();
    r.ok()
        .and_then(|(_, body)| serde_json::from_str(&body).ok())
}

async fn wait_status(
    admin: SocketAddr,
    within: Duration,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let start = Instant::now();
    loop {
        let v = status(admin).await;
        if let Some(v) = &v
            && ok(v)
        {
            return v.clone();
        }
        assert!(
            start.elapsed() < within,
            "proxy status never matched within {within:?}: {v:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_linked(admin: SocketAddr) {
    wait_status(admin, Duration::from_secs(15), |v| {
        v["dual_write"] == true && v["database_link"] == "connected"
    })
    .await;
}

/// The real binary as a proxy linked to `db` under `id`, its log in a temporary file (a pipe
/// nobody reads would block it once full).
fn spawn_proxy(db: &common::TestDb, id: &str) -> ProxyProcess {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let log =
        std::fs::File::create(std::env::temp_dir().join(format!("{}-{id}.log", db.name))).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_keyshift"))
        .args(["proxy", "--listen", &addr.to_string()])
        .args(["--admin-listen", &admin.to_string()])
        .args(["--upstream", &common::server().addr()])
        .args(["--database-url", &db.url(), "--proxy-id", id])
        .env_remove("KEYSHIFT_CONFIG")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn keyshift proxy");
    let p = ProxyProcess { child, addr, admin };
    let start = Instant::now();
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "keyshift proxy did not start listening"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    p
}

fn kill9(p: &mut ProxyProcess) {
    p.signal(libc::SIGKILL);
    let _ = p.child.wait();
}

/// `keyshift <args> --database-url <url>` as a child process that the test can kill.
fn spawn_ks(url: &str, args: &[&str]) -> Child {
    let mut cmd = Command::new(bin());
    for (k, _) in std::env::vars() {
        if k.starts_with("KEYSHIFT_") {
            cmd.env_remove(k);
        }
    }
    cmd.args(args)
        .args(["--database-url", url])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn keyshift")
}

/// Polls `sql` (one boolean) until it is true.
async fn wait_true(c: &Client, sql: &str, within: Duration) {
    let start = Instant::now();
    loop {
        // The switch tables may not exist yet: the coordinator creates them.
        if let Ok(r) = c.query_one(sql, &[]).await
            && r.get::<_, bool>(0)
        {
            return;
        }
        assert!(
            start.elapsed() < within,
            "never true within {within:?}: {sql}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------
// The workload

/// What the clients committed: per table, rows inserted minus rows deleted (cascades
/// included, counted by the client that caused them).
type Net = BTreeMap<&'static str, i64>;

struct Load {
    stop: Arc<AtomicBool>,
    ops: Arc<AtomicU64>,
    errors: Arc<Mutex<Vec<String>>>,
    net: Arc<Mutex<Net>>,
    max_stall_us: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

struct LoadResult {
    ops: u64,
    errors: Vec<String>,
    net: Net,
}

/// Runs a simple-protocol statement; returns the first column of its rows and the rows it
/// affected.
async fn simple(
    c: &Client,
    sql: &str,
) -> Result<(Vec<Option<String>>, i64), tokio_postgres::Error> {
    let mut rows = Vec::new();
    let mut n = 0;
    for m in c.simple_query(sql).await? {
        match m {
            SimpleQueryMessage::Row(r) => rows.push(r.get(0).map(str::to_string)),
            SimpleQueryMessage::CommandComplete(k) => n = k as i64,
            _ => {}
        }
    }
    Ok((rows, n))
}

/// Statements prepared once per session, before the cutover, and used across it.
struct Prepared {
    dash: tokio_postgres::Statement,
    page: tokio_postgres::Statement,
    widget: tokio_postgres::Statement,
    wdc: tokio_postgres::Statement,
    share: tokio_postgres::Statement,
    snap: tokio_postgres::Statement,
    move_widget: tokio_postgres::Statement,
    delete_dash: tokio_postgres::Statement,
    read: tokio_postgres::Statement,
}

impl Prepared {
    async fn new(c: &Client) -> Prepared {
        let p = |sql: &'static str| async move {
            c.prepare(sql)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
        };
        Prepared {
            dash: p("INSERT INTO dashboards (title) VALUES ($1)").await,
            page: p("INSERT INTO dashboard_pages (dashboard_id, position) SELECT id, $2::int FROM dashboards WHERE title = $1").await,
            widget: p("INSERT INTO dashboard_widgets (page_id, kind) SELECT p.id, $2::text FROM dashboard_pages p JOIN dashboards d ON d.id = p.dashboard_id WHERE d.title = $1").await,
            wdc: p("INSERT INTO widget_data_cache (widget_id, data) SELECT id, jsonb_build_object('t', $2::text) FROM dashboard_widgets WHERE kind = $1").await,
            share: p("INSERT INTO dashboard_shares (dashboard_id, grantee) SELECT id, $2::text FROM dashboards WHERE title = $1").await,
            snap: p("INSERT INTO dashboard_snapshots (dashboard_id, taken_at) SELECT id, now() FROM dashboards WHERE title = $1").await,
            move_widget: p("UPDATE dashboard_widgets SET report_definition_id = (SELECT id FROM report_definitions WHERE name = $1) WHERE kind = $2").await,
            delete_dash: p("DELETE FROM dashboards WHERE title = $1").await,
            read: p("SELECT count(*) FROM dashboard_widgets w JOIN dashboard_pages p ON p.id = w.page_id WHERE p.dashboard_id = (SELECT id FROM dashboards WHERE title = $1)").await,
        }
    }
}

/// Per client: what it wrote of its own, for later iterations to update and delete.
#[derive(Default)]
struct Memory {
    /// dashboards this client created: n → rows inserted under it (pages, widgets, widget
    /// data, shares, snapshots), taken away again by the cascade when it is deleted.
    dashboards: BTreeMap<i64, [i64; 5]>,
}

/// One iteration of client `i`: a transaction (or two) of the kind `i % 4` does.
async fn iteration(
    c: &mut Client,
    prep: Option<&Prepared>,
    mem: &mut Memory,
    i: usize,
    n: i64,
    d: &mut Net,
) -> Result<(), tokio_postgres::Error> {
    let k = n % 40 + 1;
    match i % 4 {
        // Simple protocol, reports: a parent, children through a key read back in the same
        // transaction and through a subquery, an FK update, a delete with a cascade.
        0 => {
            let t = format!("k0-{i}-{n}");
            let prev = format!("k0-{i}-{}", n - 1);
            simple(c, "BEGIN").await?;
            *d.entry("report_definitions").or_default() += simple(
                c,
                &format!("INSERT INTO report_definitions (name, query) VALUES ('rd-{t}', '{{\"n\": {n}}}')"),
            )
            .await?
            .1;
            let (ids, _) = simple(
                c,
                &format!("SELECT id::text FROM report_definitions WHERE name = 'rd-{t}'"),
            )
            .await?;
            let id = ids[0].clone().expect("id");
            *d.entry("report_executions").or_default() += simple(
                c,
                &format!("INSERT INTO report_executions (report_definition_id, status) VALUES ('{id}', 'ex-{t}')"),
            )
            .await?
            .1;
            *d.entry("report_schedules").or_default() += simple(
                c,
                &format!("INSERT INTO report_schedules (report_definition_id, cron) SELECT id, 'sc-{t}' FROM report_definitions WHERE name = 'rd-{t}'"),
            )
            .await?
            .1;
            *d.entry("report_cache").or_default() += simple(
                c,
                &format!("INSERT INTO report_cache (report_definition_id, payload) SELECT id, 'pc-{t}'::bytea FROM report_definitions WHERE name = 'rd{k}'"),
            )
            .await?
            .1;
            // FK update: the previous execution moves to a seeded definition...
            simple(
                c,
                &format!("UPDATE report_executions SET report_definition_id = (SELECT id FROM report_definitions WHERE name = 'rd{k}') WHERE status = 'ex-{prev}'"),
            )
            .await?;
            // ...and the previous definition goes, its schedule with it (ON DELETE CASCADE).
            let (kids, _) = simple(
                c,
                &format!("SELECT count(*) FROM report_schedules s JOIN report_definitions r ON r.id = s.report_definition_id WHERE r.name = 'rd-{prev}'"),
            )
            .await?;
            let kids: i64 = kids[0].as_deref().unwrap().parse().unwrap();
            let (kids_ex, _) = simple(
                c,
                &format!("SELECT count(*) FROM report_executions s JOIN report_definitions r ON r.id = s.report_definition_id WHERE r.name = 'rd-{prev}'"),
            )
            .await?;
            let kids_ex: i64 = kids_ex[0].as_deref().unwrap().parse().unwrap();
            let gone = simple(
                c,
                &format!("DELETE FROM report_definitions WHERE name = 'rd-{prev}'"),
            )
            .await?
            .1;
            *d.entry("report_definitions").or_default() -= gone;
            *d.entry("report_schedules").or_default() -= gone * kids;
            *d.entry("report_executions").or_default() -= gone * kids_ex;
            *d.entry("report_cache").or_default() -= simple(
                c,
                &format!(
                    "DELETE FROM report_cache WHERE payload = 'pc-k0-{i}-{}'::bytea",
                    n - 2
                ),
            )
            .await?
            .1;
            simple(
                c,
                &format!("SELECT count(*) FROM report_executions e JOIN report_definitions r ON r.id = e.report_definition_id WHERE r.name = 'rd{k}'"),
            )
            .await?;
            simple(c, "COMMIT").await?;
        }
        // Extended protocol, statements prepared once before the cutover: dashboards.
        1 => {
            let p = prep.expect("prepared");
            let tx = c.transaction().await?;
            let title = format!("d-k1-{i}-{n}");
            let kind = format!("w-k1-{i}-{n}");
            *d.entry("dashboards").or_default() += tx.execute(&p.dash, &[&title]).await? as i64;
            let mut kids = [0i64; 5];
            kids[0] = tx
                .execute(&p.page, &[&title, &(1_000_000 + n as i32)])
                .await? as i64;
            kids[1] = tx.execute(&p.widget, &[&title, &kind]).await? as i64;
            kids[2] = tx.execute(&p.wdc, &[&kind, &title]).await? as i64;
            kids[3] = tx
                .execute(&p.share, &[&title, &format!("g-{i}-{n}")])
                .await? as i64;
            kids[4] = tx.execute(&p.snap, &[&title]).await? as i64;
            tx.execute(
                &p.move_widget,
                &[&format!("rd{k}"), &format!("w-k1-{i}-{}", n - 1)],
            )
            .await?;
            let _: i64 = tx.query_one(&p.read, &[&title]).await?.get(0);
            // Every other time, an older dashboard goes, with everything under it.
            let mut deleted = None;
            if n % 2 == 0
                && let Some((&old, _)) = mem.dashboards.iter().next()
            {
                let gone = tx
                    .execute(&p.delete_dash, &[&format!("d-k1-{i}-{old}")])
                    .await? as i64;
                deleted = Some((old, gone));
            }
            tx.commit().await?;
            for (t, v) in [
                "dashboard_pages",
                "dashboard_widgets",
                "widget_data_cache",
                "dashboard_shares",
                "dashboard_snapshots",
            ]
            .iter()
            .zip(kids)
            {
                *d.entry(t).or_default() += v;
            }
            mem.dashboards.insert(n, kids);
            if let Some((old, gone)) = deleted {
                let kids = mem.dashboards.remove(&old).unwrap();
                *d.entry("dashboards").or_default() -= gone;
                for (t, v) in [
                    "dashboard_pages",
                    "dashboard_widgets",
                    "widget_data_cache",
                    "dashboard_shares",
                    "dashboard_snapshots",
                ]
                .iter()
                .zip(kids)
                {
                    *d.entry(t).or_default() -= gone * v;
                }
            }
        }
        // Simple protocol, the scheduler: a chain of four tables, keys read back.
        2 => {
            let t = format!("k2-{i}-{n}");
            simple(c, "BEGIN").await?;
            *d.entry("scheduler_configs").or_default() += simple(
                c,
                &format!("INSERT INTO scheduler_configs (name) VALUES ('cfg-{t}')"),
            )
            .await?
            .1;
            *d.entry("scheduler_jobs").or_default() += simple(
                c,
                &format!("INSERT INTO scheduler_jobs (config_id, name) SELECT id, 'job-{t}' FROM scheduler_configs WHERE name = 'cfg-{t}'"),
            )
            .await?
            .1;
            let (ids, _) = simple(
                c,
                &format!("SELECT id::text FROM scheduler_jobs WHERE name = 'job-{t}'"),
            )
            .await?;
            let jid = ids[0].clone().expect("job id");
            *d.entry("scheduler_job_executions").or_default() += simple(
                c,
                &format!("INSERT INTO scheduler_job_executions (job_id, started_at) VALUES ('{jid}', now()), ('{jid}', now() - interval '1 minute')"),
            )
            .await?
            .1;
            *d.entry("scheduler_job_logs").or_default() += simple(
                c,
                &format!("INSERT INTO scheduler_job_logs (execution_id, line) SELECT id, 'log-{t}' FROM scheduler_job_executions WHERE job_id = '{jid}'"),
            )
            .await?
            .1;
            simple(
                c,
                &format!("UPDATE scheduler_jobs SET config_id = (SELECT id FROM scheduler_configs WHERE name = 'cfg{}') WHERE name = 'job-k2-{i}-{}'", n % 10 + 1, n - 1),
            )
            .await?;
            *d.entry("scheduler_job_logs").or_default() -= simple(
                c,
                &format!(
                    "DELETE FROM scheduler_job_logs WHERE line = 'log-k2-{i}-{}'",
                    n - 2
                ),
            )
            .await?
            .1;
            simple(
                c,
                &format!("SELECT count(*) FROM scheduler_job_logs l JOIN scheduler_job_executions e ON e.id = l.execution_id JOIN scheduler_jobs j ON j.id = e.job_id WHERE j.name = 'job-{t}'"),
            )
            .await?;
            simple(c, "COMMIT").await?;
        }
        // Extended protocol, statements prepared at each use or sent through the unnamed
        // statement: autocommit writes, then reads and writes on seeded parents in a
        // transaction.
        _ => {
            *d.entry("report_templates").or_default() += c
                .execute(
                    "INSERT INTO report_templates (name) VALUES ($1)",
                    &[&format!("rt-{i}-{n}")],
                )
                .await? as i64;
            *d.entry("report_templates").or_default() -= c
                .execute(
                    "DELETE FROM report_templates WHERE name = $1",
                    &[&format!("rt-{i}-{}", n - 1)],
                )
                .await? as i64;
            let tx = c.transaction().await?;
            let _: i64 = tx
                .query_one(
                    "SELECT count(*) FROM dashboard_widgets w JOIN report_definitions r ON r.id = w.report_definition_id WHERE r.name = $1",
                    &[&format!("rd{k}")],
                )
                .await?
                .get(0);
            tx.query(
                "SELECT r.name FROM report_definitions r WHERE r.id IN (SELECT report_definition_id FROM report_cache WHERE payload = 'x') LIMIT 3",
                &[],
            )
            .await?;
            let dash = format!("d{}", n % 30 + 1);
            // Through the unnamed statement (Parse "", as libpq's PQexecParams and psycopg
            // do): keyshift prepares it under a name of its own after the second use, and
            // must prepare it again under the new rules after the cutover.
            *d.entry("dashboard_snapshots").or_default() += tx
                .execute_typed(
                    "INSERT INTO dashboard_snapshots (dashboard_id, taken_at) SELECT id, now() FROM dashboards WHERE title = $1",
                    &[(&dash, tokio_postgres::types::Type::TEXT)],
                )
                .await? as i64;
            *d.entry("dashboard_snapshots").or_default() -= tx
                .execute(
                    "DELETE FROM dashboard_snapshots WHERE id IN (SELECT id FROM dashboard_snapshots WHERE dashboard_id = (SELECT id FROM dashboards WHERE title = $1) ORDER BY taken_at LIMIT 1)",
                    &[&format!("d{}", (n + 7) % 30 + 1)],
                )
                .await? as i64;
            tx.commit().await?;
        }
    }
    Ok(())
}

impl Load {
    /// `clients` sessions, client `i` through `urls[i % urls.len()]`.
    async fn start(urls: &[String], clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ops = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let net = Arc::new(Mutex::new(Net::new()));
        let max_stall_us = Arc::new(AtomicU64::new(0));
        // Rows are tagged with (client, iteration): a later load on the same database
        // starts its iterations elsewhere.
        static GENERATION: AtomicU64 = AtomicU64::new(0);
        let first = GENERATION.fetch_add(1, Ordering::Relaxed) as i64 * 100_000;
        let mut tasks = Vec::new();
        for i in 0..clients {
            let mut c = common::connect(&urls[i % urls.len()]).await;
            let prep = if i % 4 == 1 {
                Some(Prepared::new(&c).await)
            } else {
                None
            };
            let (stop, ops, errors, net, max_stall) = (
                stop.clone(),
                ops.clone(),
                errors.clone(),
                net.clone(),
                max_stall_us.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let mut mem = Memory::default();
                let mut n = first;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let mut d = Net::new();
                    let t = Instant::now();
                    let r = iteration(&mut c, prep.as_ref(), &mut mem, i, n, &mut d).await;
                    max_stall.fetch_max(t.elapsed().as_micros() as u64, Ordering::Relaxed);
                    match r {
                        Ok(()) => {
                            let mut net = net.lock().unwrap();
                            for (t, v) in d {
                                *net.entry(t).or_default() += v;
                            }
                            ops.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            errors.lock().unwrap().push(format!("client {i}: {e:?}"));
                            // The session may be inside a failed transaction: end it.
                            let _ = c.batch_execute("ROLLBACK").await;
                            if c.is_closed() {
                                return;
                            }
                        }
                    }
                }
            }));
        }
        Load {
            stop,
            ops,
            errors,
            net,
            max_stall_us,
            tasks,
        }
    }

    /// The slowest transaction since the last call.
    fn take_max_stall(&self) -> Duration {
        Duration::from_micros(self.max_stall_us.swap(0, Ordering::Relaxed))
    }

    fn ops(&self) -> u64 {
        self.ops.load(Ordering::Relaxed)
    }

    /// Waits until the clients have committed `more` transactions beyond now.
    async fn run_for(&self, more: u64, within: Duration) {
        let start = Instant::now();
        let target = self.ops() + more;
        while self.ops() < target {
            let errs = self.errors.lock().unwrap().clone();
            assert!(errs.is_empty(), "clients saw errors: {errs:#?}");
            assert!(
                start.elapsed() < within,
                "the clients committed {} of {more} transactions in {within:?}",
                self.ops() + more - target
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(self) -> LoadResult {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        LoadResult {
            ops: self.ops.load(Ordering::Relaxed),
            errors: self.errors.lock().unwrap().clone(),
            net: self.net.lock().unwrap().clone(),
        }
    }
}

fn expected_counts(start: &BTreeMap<String, i64>, net: &Net) -> BTreeMap<String, i64> {
    let mut want = start.clone();
    for (t, v) in net {
        *want.get_mut(*t).unwrap_or_else(|| panic!("{t}")) += v;
    }
    want
}

/// Runs a switch (`cutover` or `rollback`) while `load` runs; asserts it committed and the
/// clients kept committing across it with no error.
async fn switch_under_load(db: &common::TestDb, load: &Load, args: &[&str]) -> String {
    load.run_for(100, Duration::from_secs(30)).await;
    let baseline = load.take_max_stall();
    let out = ks_async(&db.url(), args).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let report = stdout(&out);
    assert!(report.contains("committed"), "{report}");
    let across = load.take_max_stall();
    // Traffic goes on under the new rules.
    load.run_for(100, Duration::from_secs(30)).await;
    println!(
        "{}: slowest client transaction across it {across:?} (before it, under the same load: {baseline:?})",
        args[0]
    );
    report
}

// ---------------------------------------------------------------------------------------
// The tests

/// `keyshift <args>` (a cutover) of seed 000's 15 tables under 16 clients through one
/// proxy: no client error, the seeds' success criteria, row counts equal to what the
/// clients committed, verify passes. Returns the command's report.
async fn cutover_15_tables_under_16_clients(args: &[&str]) -> String {
    let (db, fks_before, pks_before) = migrated_000().await;
    let direct = db.client().await;
    let p = linked_proxy(&db, "proxy-1");
    wait_linked(p.admin).await;
    let before = row_counts(&direct, &TABLES_000).await;

    let load = Load::start(&[p.url("postgres", &db.name)], 16).await;
    let report = switch_under_load(&db, &load, args).await;
    let r = load.stop().await;
    assert!(
        r.errors.is_empty(),
        "clients saw errors across the cutover: {:#?}",
        r.errors
    );
    println!(
        "15 tables, 16 clients, {args:?}: {} transactions, 0 errors\n{report}",
        r.ops
    );
    assert_cut_over(&direct, &TABLES_000, &fks_before, &pks_before).await;
    assert_eq!(
        row_counts(&direct, &TABLES_000).await,
        expected_counts(&before, &r.net),
        "row counts differ from what the clients committed (net per table: {:?})",
        r.net
    );
    ks_expect(&db.url(), &["verify"], 0);
    report
}

#[tokio::test]
async fn cutover_of_15_tables_under_16_clients_loses_nothing() {
    let report = cutover_15_tables_under_16_clients(&[
        "cutover",
        "--drain-timeout",
        "5s",
        "--budget",
        "60s",
    ])
    .await;
    assert!(report.contains("proxy proxy-1: gate closed"), "{report}");
}

/// issue [scale]: `--by-table` under the same load. The pause only changes the phase; the
/// 15 tables then swap one group of the FK graph at a time, gates open, while the 16
/// clients' inserts, FK updates and deletes go on through both states of the tables.
#[tokio::test]
async fn cutover_by_table_of_15_tables_under_16_clients_loses_nothing() {
    let report = cutover_15_tables_under_16_clients(&[
        "cutover",
        "--by-table",
        "--drain-timeout",
        "5s",
        "--budget",
        "60s",
    ])
    .await;
    assert!(report.contains("proxy proxy-1: gate closed"), "{report}");
    assert!(report.contains("gates open: 15 groups"), "{report}");
}

#[tokio::test]
async fn cutover_with_two_proxies_each_carrying_half_the_clients() {
    let (db, fks_before, pks_before) = migrated_000().await;
    let direct = db.client().await;
    let pa = linked_proxy(&db, "proxy-a");
    let pb = linked_proxy(&db, "proxy-b");
    wait_linked(pa.admin).await;
    wait_linked(pb.admin).await;
    let before = row_counts(&direct, &TABLES_000).await;

    let urls = [pa.url("postgres", &db.name), pb.url("postgres", &db.name)];
    let load = Load::start(&urls, 16).await;
    assert_eq!(
        pa.shared.gate.counts().iter().sum::<usize>(),
        8,
        "proxy-a carries half the clients"
    );
    let report = switch_under_load(
        &db,
        &load,
        &["cutover", "--drain-timeout", "5s", "--budget", "60s"],
    )
    .await;
    let r = load.stop().await;
    assert!(
        r.errors.is_empty(),
        "clients saw errors across the cutover: {:#?}",
        r.errors
    );
    println!(
        "two proxies, 16 clients: {} transactions, 0 errors\n{report}",
        r.ops
    );
    // Both paused for this attempt, both reported their pause.
    for id in ["proxy-a", "proxy-b"] {
        assert!(
            report.contains(&format!("proxy {id}: gate closed"))
                && !report.contains("not reported"),
            "{report}"
        );
    }
    let rows = direct
        .query(
            "SELECT p.id, p.pause_state, p.pause_ms FROM keyshift.proxies p
             JOIN keyshift.switch_attempts a ON a.id = p.pause_attempt
             WHERE a.state = 'committed' AND a.action = 'cutover' ORDER BY p.id",
            &[],
        )
        .await
        .unwrap();
    let got: Vec<(String, Option<String>, bool)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get::<_, Option<f64>>(2).is_some()))
        .collect();
    assert_eq!(
        got,
        vec![
            ("proxy-a".into(), Some("released".into()), true),
            ("proxy-b".into(), Some("released".into()), true)
        ]
    );
    assert_cut_over(&direct, &TABLES_000, &fks_before, &pks_before).await;
    assert_eq!(
        row_counts(&direct, &TABLES_000).await,
        expected_counts(&before, &r.net)
    );
}

#[tokio::test]
async fn rollback_after_writes_made_after_cutover_then_cutover_again() {
    let (db, fks_before, pks_before) = migrated_000().await;
    let direct = db.client().await;
    let p = linked_proxy(&db, "proxy-1");
    wait_linked(p.admin).await;
    let url = p.url("postgres", &db.name);
    let before = row_counts(&direct, &TABLES_000).await;
    ks_expect(&db.url(), &["cutover"], 0);

    // Writes after the cutover: uuid keys, legacy integers filled by reverse dual-write.
    let load = Load::start(std::slice::from_ref(&url), 16).await;
    load.run_for(300, Duration::from_secs(60)).await;
    let after_cutover = load.stop().await;
    assert!(
        after_cutover.errors.is_empty(),
        "{:#?}",
        after_cutover.errors
    );
    let want = expected_counts(&before, &after_cutover.net);
    assert_eq!(row_counts(&direct, &TABLES_000).await, want);

    let out = ks_async(
        &db.url(),
        &["rollback", "--drain-timeout", "5s", "--budget", "60s"],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_rolled_back(&direct, &TABLES_000, &fks_before, &pks_before).await;
    assert_eq!(
        row_counts(&direct, &TABLES_000).await,
        want,
        "rows lost or gained across cutover and rollback"
    );
    // The integer shape serves again, with forward dual-write; meanwhile `harden` rebuilds
    // what the swap back dropped (shadow FKs, checks), under that traffic.
    let load = Load::start(std::slice::from_ref(&url), 16).await;
    load.run_for(100, Duration::from_secs(60)).await;
    let t = Instant::now();
    let out = ks_async(&db.url(), &["harden"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    println!("harden under load: {:?}\n{}", t.elapsed(), stderr(&out));
    load.run_for(100, Duration::from_secs(60)).await;
    let after_rollback = load.stop().await;
    assert!(
        after_rollback.errors.is_empty(),
        "{:#?}",
        after_rollback.errors
    );
    let want = expected_counts(&want, &after_rollback.net);
    assert_rolled_back(&direct, &TABLES_000, &fks_before, &pks_before).await;
    assert_eq!(row_counts(&direct, &TABLES_000).await, want);

    // And forward again, under load.
    ks_expect(&db.url(), &["verify"], 0);
    let load = Load::start(std::slice::from_ref(&url), 16).await;
    switch_under_load(
        &db,
        &load,
        &["cutover", "--drain-timeout", "5s", "--budget", "60s"],
    )
    .await;
    let r = load.stop().await;
    assert!(r.errors.is_empty(), "{:#?}", r.errors);
    assert_cut_over(&direct, &TABLES_000, &fks_before, &pks_before).await;
    assert_eq!(
        row_counts(&direct, &TABLES_000).await,
        expected_counts(&want, &r.net)
    );
}

/// Rollback while clients write a parent and its child in one transaction (the usual
/// application shape), 0 client errors. The rollback's online preparation adds the legacy
/// FKs NOT VALID before the pause; `ALTER TABLE child ADD FOREIGN KEY … REFERENCES parent`
/// alone locks the child, then waits for the parent, which a client holds while it waits
/// for the child: a lock cycle that lock_timeout broke at every retry until --budget ran
/// out. The step now locks the parent first.
#[tokio::test]
async fn rollback_under_continuous_write_load() {
    let (db, _, _) = migrated_000().await;
    let p = linked_proxy(&db, "proxy-1");
    wait_linked(p.admin).await;
    ks_expect(&db.url(), &["cutover"], 0);
    let load = Load::start(&[p.url("postgres", &db.name)], 16).await;
    switch_under_load(
        &db,
        &load,
        &["rollback", "--drain-timeout", "5s", "--budget", "60s"],
    )
    .await;
    let r = load.stop().await;
    assert!(r.errors.is_empty(), "{:#?}", r.errors);
}

async fn migrated_004() -> common::TestDb {
    let db = common::TestDb::new().await;
    db.client()
        .await
        .batch_execute(&format!("{SEED_004}{}", seed_004_rows(30)))
        .await
        .unwrap();
    ks_expect(&db.url(), &["expand"], 0);
    ks_expect(&db.url(), &["backfill"], 0);
    db
}

/// True once proxy `id` holds its gate for the latest attempt and the coordinator's swap
/// transaction (its state is not visible before it commits) waits for a lock.
fn held_and_swap_waiting(id: &str) -> String {
    format!(
        "SELECT EXISTS (SELECT FROM keyshift.proxies WHERE id = '{id}' AND pause_state = 'held'
                          AND pause_attempt = (SELECT max(id) FROM keyshift.switch_attempts))
            AND EXISTS (SELECT FROM pg_stat_activity WHERE datname = current_database()
                          AND wait_event_type = 'Lock' AND query LIKE '%ALTER TABLE%')"
    )
}

/// Holds ACCESS SHARE on a migrated table from a direct connection, so the swap waits for
/// its locks while every gate is closed: the coordinator is then between the pause and the
/// commit. (A parent table: the preparation before the pause locks only child tables.)
async fn lock_blocker(db: &common::TestDb) -> Client {
    let b = db.client().await;
    b.batch_execute(
        "SET application_name = 'test_blocker'; BEGIN; LOCK TABLE mcp_connectors IN ACCESS SHARE MODE",
    )
    .await
    .unwrap();
    b
}

#[tokio::test]
async fn kill_9_of_the_coordinator_while_the_gates_are_closed() {
    let db = migrated_004().await;
    let direct = db.client().await;
    let mut px = spawn_proxy(&db, "px");
    wait_linked(px.admin).await;
    let client = common::connect(&px.url("postgres", &db.name)).await;
    client.simple_query("SELECT 1").await.unwrap();

    let blocker = lock_blocker(&db).await;
    let mut coord = spawn_ks(
        &db.url(),
        &[
            "cutover",
            "--drain-timeout",
            "1s",
            "--lock-timeout",
            "1500ms",
            "--budget",
            "30s",
        ],
    );
    wait_true(
        &direct,
        &held_and_swap_waiting("px"),
        Duration::from_secs(20),
    )
    .await;
    coord.kill().unwrap();
    let _ = coord.wait();
    let killed_at = Instant::now();
    // A client arriving now is held (or, if the proxy already noticed, let through), never
    // refused: it goes through once the gate reopens.
    let held = tokio::spawn(async move {
        client
            .simple_query("SELECT count(*) FROM mcp_servers")
            .await
            .map(|_| client)
    });
    // The orphaned swap's backend notices its client is gone (client_connection_check_interval)
    // and ends; the proxy, watching the coordinator's backend, reopens long before the hold
    // deadline (drain + lock timeout + 5 s = 7.5 s).
    wait_status(px.admin, Duration::from_secs(20), |v| v["gate"] == "open").await;
    println!(
        "gate reopened {:?} after the coordinator died",
        killed_at.elapsed()
    );
    assert!(
        killed_at.elapsed() < Duration::from_secs(5),
        "the gate waited {:?} for the hold deadline",
        killed_at.elapsed()
    );
    let client = tokio::time::timeout(Duration::from_secs(5), held)
        .await
        .expect("the held client was released")
        .unwrap()
        .expect("the held client saw no error");
    assert_eq!(shape(&direct, &TABLES_004).await, "before");
    assert_eq!(
        count(
            &direct,
            "SELECT count(*) FROM keyshift.proxies WHERE id = 'px' AND pause_state = 'coordinator_gone'"
        )
        .await,
        1
    );
    // Traffic flows in dual-write, and a rerun goes through once the blocker is gone.
    client
        .batch_execute("INSERT INTO mcp_servers (name, connector_id) SELECT 'after-kill', id FROM mcp_connectors WHERE name = 'c2'")
        .await
        .unwrap();
    blocker.batch_execute("COMMIT").await.unwrap();
    let out = ks_async(&db.url(), &["cutover", "--drain-timeout", "2s"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        stdout(&out).contains("proxy px: gate closed"),
        "{}",
        text(&out)
    );
    assert_eq!(shape(&direct, &TABLES_004).await, "after");
    assert_eq!(
        count(
            &direct,
            "SELECT count(*) FROM mcp_servers s JOIN mcp_connectors c ON c.id = s.connector_id
             WHERE s.name = 'after-kill' AND c.name = 'c2' AND s.connector_id_legacy = c.id_legacy"
        )
        .await,
        1
    );
    client.simple_query("SELECT 1").await.unwrap();
    kill9(&mut px);
}

#[tokio::test]
async fn kill_9_of_a_proxy_holding_its_gate_then_restart_and_stale_heartbeat() {
    let db = migrated_004().await;
    let direct = db.client().await;
    let mut pa = spawn_proxy(&db, "pa");
    wait_linked(pa.admin).await;
    let client = common::connect(&pa.url("postgres", &db.name)).await;
    client.simple_query("SELECT 1").await.unwrap();

    let blocker = lock_blocker(&db).await;
    let coord = spawn_ks(
        &db.url(),
        &[
            "cutover",
            "--drain-timeout",
            "2s",
            "--lock-timeout",
            "10s",
            "--budget",
            "30s",
        ],
    );
    wait_true(
        &direct,
        &held_and_swap_waiting("pa"),
        Duration::from_secs(20),
    )
    .await;
    kill9(&mut pa);
    // Its clients are disconnected: expected of a crashed proxy.
    assert!(client.simple_query("SELECT 1").await.is_err());

    // Restarted under the same id while the swap is still waiting for its locks: it joins
    // the attempt in progress (gate closed) instead of letting traffic through mid-switch.
    let mut pa = spawn_proxy(&db, "pa");
    wait_status(pa.admin, Duration::from_secs(15), |v| {
        v["database_link"] == "connected" && v["gate"] == "closed"
    })
    .await;
    blocker.batch_execute("COMMIT").await.unwrap();
    let out = tokio::task::spawn_blocking(move || coord.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(shape(&direct, &TABLES_004).await, "after");
    // The restarted proxy opened in the post-cutover mode: reverse dual-write.
    wait_status(pa.admin, Duration::from_secs(10), |v| {
        v["gate"] == "open" && v["dual_write"] == true
    })
    .await;
    let c = common::connect(&pa.url("postgres", &db.name)).await;
    c.batch_execute("INSERT INTO mcp_servers (name, connector_id) SELECT 'via-restarted', id FROM mcp_connectors WHERE name = 'c3'")
        .await
        .unwrap();
    assert_eq!(
        count(
            &direct,
            "SELECT count(*) FROM mcp_servers s JOIN mcp_connectors c ON c.id = s.connector_id
             WHERE s.name = 'via-restarted' AND c.name = 'c3'
               AND s.id_legacy IS NOT NULL AND s.connector_id_legacy = c.id_legacy"
        )
        .await,
        1,
        "the restarted proxy does not reverse dual-write"
    );

    // The proxy dies again; 20 s later (between the 6 s of a live proxy and the 60 s after
    // which it is forgotten) a switch must refuse: it may be running and unreachable.
    kill9(&mut pa);
    direct
        .batch_execute(
            "UPDATE keyshift.proxies SET heartbeat_at = now() - interval '20 seconds' WHERE id = 'pa'",
        )
        .await
        .unwrap();
    let out = ks_async(&db.url(), &["rollback"]).await;
    assert_ne!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        stderr(&out).contains("proxy pa") && stderr(&out).contains("heartbeat"),
        "{}",
        text(&out)
    );
    assert_eq!(shape(&direct, &TABLES_004).await, "after");

    // Back with the same id: the switch goes through, and the restarted proxy serves the
    // integer shape with forward dual-write.
    let mut pa = spawn_proxy(&db, "pa");
    wait_linked(pa.admin).await;
    let out = ks_async(&db.url(), &["rollback", "--drain-timeout", "2s"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(shape(&direct, &TABLES_004).await, "before");
    let c = common::connect(&pa.url("postgres", &db.name)).await;
    c.batch_execute("INSERT INTO mcp_servers (name, connector_id) SELECT 'after-rollback', id FROM mcp_connectors WHERE name = 'c4'")
        .await
        .unwrap();
    assert_eq!(
        count(
            &direct,
            "SELECT count(*) FROM mcp_servers s JOIN mcp_connectors c ON c.id = s.connector_id
             WHERE s.name IN ('after-rollback', 'via-restarted') AND s.id_uuid IS NOT NULL
               AND s.connector_id_uuid = c.id_uuid"
        )
        .await,
        2
    );
    kill9(&mut pa);
}

#[tokio::test]
async fn kill_9_of_the_coordinator_during_the_drain_and_after_sending_the_swap() {
    let db = migrated_004().await;
    let direct = db.client().await;
    let mut px = spawn_proxy(&db, "px");
    wait_linked(px.admin).await;
    let url = px.url("postgres", &db.name);

    // 1. While the proxy drains: a client is inside a transaction when the pause comes.
    let mut busy = common::connect(&url).await;
    let tx = busy.transaction().await.unwrap();
    tx.execute(
        "UPDATE mcp_servers SET status = 'draining' WHERE name = 's1'",
        &[],
    )
    .await
    .unwrap();
    let mut coord = spawn_ks(
        &db.url(),
        &[
            "cutover",
            "--drain-timeout",
            "1s",
            "--lock-timeout",
            "500ms",
        ],
    );
    wait_status(px.admin, Duration::from_secs(15), |v| v["gate"] == "closed").await;
    coord.kill().unwrap();
    let _ = coord.wait();
    // The transaction runs on and commits; nobody will say resume: the gate reopens by
    // itself by the hold deadline (drain + lock timeout + 5 s).
    tx.commit().await.unwrap();
    wait_status(px.admin, Duration::from_secs(15), |v| v["gate"] == "open").await;
    busy.simple_query("SELECT 1").await.unwrap();
    assert_eq!(shape(&direct, &TABLES_004).await, "before");
    assert_eq!(
        count(
            &direct,
            "SELECT count(*) FROM mcp_servers WHERE name = 's1' AND status = 'draining'"
        )
        .await,
        1
    );

    // 2. After the swap transaction was sent (it waits for a lock): the coordinator dies,
    // then the lock goes. Whatever PostgreSQL does with the orphaned swap (it rolls it back
    // when it finds its client gone), the database ends fully before or fully after, the
    // gate reopens by the hold deadline at the latest, and the client held meanwhile is
    // served under the rules of the side the database is on.
    let blocker = lock_blocker(&db).await;
    let mut coord = spawn_ks(
        &db.url(),
        &[
            "cutover",
            "--drain-timeout",
            "1s",
            "--lock-timeout",
            "3s",
            "--budget",
            "60s",
        ],
    );
    wait_true(
        &direct,
        &held_and_swap_waiting("px"),
        Duration::from_secs(20),
    )
    .await;
    coord.kill().unwrap();
    let _ = coord.wait();
    let held = tokio::spawn(async move {
        busy.execute("INSERT INTO mcp_servers (name, connector_id) SELECT 'held-across', id FROM mcp_connectors WHERE name = 'c5'", &[])
            .await
    });
    blocker.batch_execute("COMMIT").await.unwrap();
    wait_status(px.admin, Duration::from_secs(20), |v| v["gate"] == "open").await;
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(10), held)
            .await
            .expect("the held client was released")
            .unwrap()
            .expect("the held client saw no error"),
        1
    );
    let side = shape(&direct, &TABLES_004).await;
    println!("coordinator killed after sending the swap: the database is {side}");
    let twin = if side == "after" { "_legacy" } else { "_uuid" };
    assert_eq!(
        count(
            &direct,
            &format!(
                "SELECT count(*) FROM mcp_servers s JOIN mcp_connectors c ON c.id = s.connector_id
                 WHERE s.name = 'held-across' AND c.name = 'c5' AND s.connector_id{twin} = c.id{twin}"
            )
        )
        .await,
        1,
        "the held client's write went through the wrong rules for the {side} side"
    );
    // And the operator carries on from there.
    let (next, want) = if side == "after" {
        ("rollback", "before")
    } else {
        ("cutover", "after")
    };
    let out = ks_async(&db.url(), &[next, "--drain-timeout", "2s"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(shape(&direct, &TABLES_004).await, want);
    kill9(&mut px);
}
