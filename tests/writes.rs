//! [writes]: every write path keeps both sides of every FK right, through keyshift or not,
//! before and after cutover, and no rollback loses a link.
//!
//! Writes the rewriter never sees: `COPY … FROM` in text, csv and binary (tokio-postgres and
//! psql's `\copy`, through keyshift), direct connections beside traffic through keyshift, a
//! function that writes. The fill triggers (src/migrate/fill.rs) keep them right; each test
//! checks every row's other side against its parent, and the links (child → parent, by name)
//! through cutover, rollback and cutover again.
mod common;
mod migrate_support;

use std::collections::BTreeMap;
use std::time::Duration;

use common::proxy::{TestProxy, connect_shaped, linked_proxy};
use futures_util::{SinkExt, pin_mut};
use migrate_support::{SEED_004, count, ks_async, ks_expect, seed_004_rows, text};
use tokio_postgres::Client;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};
use uuid::Uuid;

async fn seeded() -> common::TestDb {
    let db = common::TestDb::new().await;
    db.client()
        .await
        .batch_execute(&format!("{SEED_004}{}", seed_004_rows(40)))
        .await
        .unwrap();
    db
}

/// Rows whose non-truth side disagrees with their parent (0 when every twin is right): the
/// uuid twins before cutover, the legacy integers after it.
async fn wrong_twins(c: &Client) -> i64 {
    let after: bool = c
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM information_schema.columns WHERE table_schema = 'public' AND table_name = 'mcp_servers' AND column_name = 'id_legacy')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let (twin, pkey) = if after {
        ("_legacy", "id_legacy")
    } else {
        ("_uuid", "id_uuid")
    };
    let mut n = 0;
    for (child, fk, parent) in [
        ("mcp_server_tools", "mcp_server_id", "mcp_servers"),
        ("mcp_server_tokens", "mcp_server_id", "mcp_servers"),
        ("mcp_servers", "connector_id", "mcp_connectors"),
        ("connector_access", "connector_id", "mcp_connectors"),
    ] {
        n += count(
            c,
            &format!(
                "SELECT count(*) FROM {child} x LEFT JOIN {parent} p ON p.id = x.{fk} \
                 WHERE x.{fk}{twin} IS DISTINCT FROM p.{pkey}"
            ),
        )
        .await;
    }
    n
}

/// Every link by name, read through the truth side (the original column names): tool →
/// server, server → connector. The same SQL in both physical shapes.
async fn links(c: &Client) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for sql in [
        "SELECT 'tool ' || t.tool_name, s.name FROM mcp_server_tools t JOIN mcp_servers s ON s.id = t.mcp_server_id",
        "SELECT 'server ' || x.name, coalesce(c.name, '-') FROM mcp_servers x LEFT JOIN mcp_connectors c ON c.id = x.connector_id",
    ] {
        for r in c.query(sql, &[]).await.unwrap() {
            out.insert(r.get(0), r.get(1));
        }
    }
    out
}

/// `rows` (already in COPY text form, one line each) through `COPY … FROM STDIN` as text.
async fn copy_text(c: &Client, sql: &str, rows: &[String]) -> u64 {
    let sink = c
        .copy_in(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    pin_mut!(sink);
    let body: String = rows.iter().map(|r| format!("{r}\n")).collect();
    sink.send(bytes::Bytes::from(body)).await.unwrap();
    sink.finish().await.unwrap_or_else(|e| panic!("{sql}: {e}"))
}

async fn copy_binary(
    c: &Client,
    sql: &str,
    types: &[Type],
    rows: &[Vec<Box<dyn ToSql + Sync + Send>>],
) -> u64 {
    let sink = c
        .copy_in(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    let w = BinaryCopyInWriter::new(sink, types);
    pin_mut!(w);
    for r in rows {
        let refs: Vec<&(dyn ToSql + Sync)> = r
            .iter()
            .map(|b| b.as_ref() as &(dyn ToSql + Sync))
            .collect();
        w.as_mut().write(&refs).await.unwrap();
    }
    w.finish().await.unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// psql's `\copy` through the proxy, `data` on its standard input.
fn psql_copy(p: &TestProxy, db: &str, copy: &str, data: &str) {
    use std::io::Write;
    let mut child = std::process::Command::new(common::pg_tool("psql"))
        .args([
            "-X",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            &p.url("postgres", db),
            "-c",
            copy,
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(data.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{copy}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn ids(c: &Client, sql: &str) -> Vec<i32> {
    c.query(sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Integer-keyed rows copied in every format by a session in the integer shape: the
/// physical one before cutover.
async fn copy_integer_rows(c: &Client, p: &TestProxy, db: &str, tag: &str) {
    let servers = ids(c, "SELECT id FROM mcp_servers ORDER BY id LIMIT 6").await;
    let connectors = ids(c, "SELECT id FROM mcp_connectors ORDER BY id LIMIT 3").await;
    let n = copy_text(
        c,
        "COPY mcp_server_tools (mcp_server_id, tool_name) FROM STDIN",
        &[
            format!("{}\t{tag}-text-a", servers[0]),
            format!("{}\t{tag}-text-b", servers[1]),
        ],
    )
    .await;
    assert_eq!(n, 2);
    copy_text(
        c,
        "COPY mcp_server_tools (mcp_server_id, tool_name) FROM STDIN (FORMAT csv)",
        &[
            format!("{},{tag}-csv-a", servers[2]),
            format!("{},\"{tag}-csv, b\"", servers[3]),
        ],
    )
    .await;
    copy_binary(
        c,
        "COPY mcp_server_tools (mcp_server_id, tool_name) FROM STDIN (FORMAT binary)",
        &[Type::INT4, Type::TEXT],
        &[
            vec![Box::new(servers[4]), Box::new(format!("{tag}-bin-a"))],
            vec![Box::new(servers[5]), Box::new(format!("{tag}-bin-b"))],
        ],
    )
    .await;
    // A nullable FK: NULLs and values, every format.
    copy_text(
        c,
        "COPY mcp_servers (connector_id, name) FROM STDIN",
        &[
            format!("{}\t{tag}-srv-text", connectors[0]),
            format!("\\N\t{tag}-srv-null"),
        ],
    )
    .await;
    copy_binary(
        c,
        "COPY mcp_servers (connector_id, name) FROM STDIN (FORMAT binary)",
        &[Type::INT4, Type::TEXT],
        &[
            vec![Box::new(connectors[1]), Box::new(format!("{tag}-srv-bin"))],
            vec![
                Box::new(None::<i32>),
                Box::new(format!("{tag}-srv-bin-null")),
            ],
        ],
    )
    .await;
    psql_copy(
        p,
        db,
        "\\copy mcp_server_tools (mcp_server_id, tool_name) from stdin",
        &format!("{}\t{tag}-psql-text\n", servers[0]),
    );
    psql_copy(
        p,
        db,
        "\\copy mcp_servers (connector_id, name) from stdin with (format csv)",
        &format!("{},{tag}-psql-csv\n", connectors[2]),
    );
}

/// Uuid-keyed rows copied in every format by a session in the uuid shape: the physical one
/// after cutover.
async fn copy_uuid_rows(c: &Client, tag: &str) {
    let servers: Vec<Uuid> = c
        .query("SELECT id FROM mcp_servers ORDER BY name LIMIT 4", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    copy_text(
        c,
        "COPY mcp_server_tools (mcp_server_id, tool_name) FROM STDIN",
        &[format!("{}\t{tag}-text", servers[0])],
    )
    .await;
    copy_text(
        c,
        "COPY mcp_server_tools (mcp_server_id, tool_name) FROM STDIN (FORMAT csv)",
        &[format!("{},{tag}-csv", servers[1])],
    )
    .await;
    copy_binary(
        c,
        "COPY mcp_server_tools (mcp_server_id, tool_name) FROM STDIN (FORMAT binary)",
        &[Type::UUID, Type::TEXT],
        &[vec![Box::new(servers[2]), Box::new(format!("{tag}-bin"))]],
    )
    .await;
    copy_binary(
        c,
        "COPY mcp_servers (connector_id, name) FROM STDIN (FORMAT binary)",
        &[Type::UUID, Type::TEXT],
        &[vec![
            Box::new(None::<Uuid>),
            Box::new(format!("{tag}-srv-bin-null")),
        ]],
    )
    .await;
}

async fn step(db: &common::TestDb, step: &str) {
    let out = ks_async(&db.url(), &[step]).await;
    assert!(out.status.success(), "{step}: {}", text(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_every_format_keeps_both_sides_and_every_link_through_cutover_rollback_and_cutover()
{
    let db = seeded().await;
    for s in ["expand", "backfill"] {
        ks_expect(&db.url(), &[s], 0);
    }
    let direct = db.client().await;
    let p = linked_proxy(&db).await;
    // Before cutover: the default (integer) shape is the physical one.
    let c = connect_shaped(&p, &db, "integer").await;
    copy_integer_rows(&c, &p, &db.name, "hardened").await;
    assert_eq!(wrong_twins(&direct).await, 0, "uuid twins of copied rows");
    assert_eq!(
        count(
            &direct,
            "SELECT count(*) FROM mcp_server_tools WHERE tool_name LIKE 'hardened-%'"
        )
        .await,
        7
    );
    ks_expect(&db.url(), &["verify"], 0);
    let before = links(&direct).await;

    step(&db, "cutover").await;
    assert_eq!(links(&direct).await, before, "cutover keeps every link");
    // After cutover: the uuid shape is the physical one.
    let u = connect_shaped(&p, &db, "uuid").await;
    copy_uuid_rows(&u, "cut-over").await;
    assert_eq!(
        wrong_twins(&direct).await,
        0,
        "legacy integers of copied rows"
    );
    // And the integer shape, now translated: COPY lands in the legacy columns, under their
    // physical names, and the triggers fill the uuid side.
    copy_integer_rows(&c, &p, &db.name, "cut-over-integer").await;
    assert_eq!(
        wrong_twins(&direct).await,
        0,
        "uuid side of integer-shaped copies"
    );
    let after = links(&direct).await;
    assert_eq!(after.len(), before.len() + 4 + 12);

    step(&db, "rollback").await;
    assert_eq!(links(&direct).await, after, "rollback keeps every link");
    assert_eq!(wrong_twins(&direct).await, 0);
    copy_integer_rows(&c, &p, &db.name, "rolled-back").await;
    assert_eq!(wrong_twins(&direct).await, 0);
    let again = links(&direct).await;

    step(&db, "cutover").await;
    assert_eq!(
        links(&direct).await,
        again,
        "the second cutover keeps every link"
    );
    assert_eq!(wrong_twins(&direct).await, 0);
    ks_expect(&db.url(), &["verify"], 0);
}

/// One writer's statements, the same text in both physical shapes (they name parents by
/// name, never by key value), so a direct connection keeps working through the swap.
/// Records the link each write makes: `tool T` → server, `server S` → connector.
async fn write_round(
    c: &Client,
    who: &str,
    n: u32,
    expect: &std::sync::Mutex<BTreeMap<String, String>>,
) -> Result<(), tokio_postgres::Error> {
    let server = format!("S-{who}-{n}");
    let connector = if n % 7 == 0 {
        None
    } else {
        Some(format!("c{}", n % 5 + 1))
    };
    let conn_sql = match &connector {
        Some(name) => format!("(SELECT id FROM mcp_connectors WHERE name = '{name}')"),
        None => "NULL".into(),
    };
    c.batch_execute(&format!(
        "INSERT INTO mcp_servers (connector_id, name) VALUES ({conn_sql}, '{server}');
         INSERT INTO mcp_server_tools (mcp_server_id, tool_name) SELECT id, 'T-{who}-{n}' FROM mcp_servers WHERE name = '{server}';
         INSERT INTO mcp_server_tokens (mcp_server_id, token) SELECT id, 'K-{who}-{n}' FROM mcp_servers WHERE name = '{server}';"
    ))
    .await?;
    {
        let mut e = expect.lock().unwrap();
        e.insert(
            format!("server {server}"),
            connector.clone().unwrap_or_else(|| "-".into()),
        );
        e.insert(format!("tool T-{who}-{n}"), server.clone());
    }
    if n % 3 == 2 {
        // Move the previous server to another connector (or to none).
        let prev = format!("S-{who}-{}", n - 1);
        let to = if n % 2 == 0 {
            Some(format!("c{}", (n + 2) % 5 + 1))
        } else {
            None
        };
        let to_sql = match &to {
            Some(name) => format!("(SELECT id FROM mcp_connectors WHERE name = '{name}')"),
            None => "NULL".into(),
        };
        c.batch_execute(&format!(
            "UPDATE mcp_servers SET connector_id = {to_sql} WHERE name = '{prev}'"
        ))
        .await?;
        expect
            .lock()
            .unwrap()
            .insert(format!("server {prev}"), to.unwrap_or_else(|| "-".into()));
    }
    Ok(())
}

/// A direct connection and a session through keyshift write children and parents without
/// pause while expand, backfill, cutover, rollback and cutover again run. After each step
/// (writers held), every twin agrees with its parent, verify passes, and every link any
/// writer made is still the one it made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_writes_beside_proxy_traffic_keep_every_link_at_every_phase() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    let db = seeded().await;
    let direct = db.client().await;
    let expect = Arc::new(std::sync::Mutex::new(BTreeMap::new()));
    let hold = Arc::new(AtomicBool::new(false));
    let held = Arc::new(AtomicU32::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let spawn = |who: &'static str, c: Client| {
        let (expect, hold, held, stop) = (expect.clone(), hold.clone(), held.clone(), stop.clone());
        tokio::spawn(async move {
            let mut n = 0u32;
            let mut waiting = false;
            while !stop.load(Ordering::SeqCst) {
                if hold.load(Ordering::SeqCst) {
                    if !waiting {
                        waiting = true;
                        held.fetch_add(1, Ordering::SeqCst);
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
                if waiting {
                    waiting = false;
                    held.fetch_sub(1, Ordering::SeqCst);
                }
                n += 1;
                write_round(&c, who, n, &expect)
                    .await
                    .map_err(|e| format!("{who} round {n}: {e}"))?;
                if who == "direct" {
                    // The gate does not hold a direct connection: one writing several tables
                    // per transaction without pause can keep the swap from taking its locks
                    // in every round of its --budget (it reports the pid; docs/cutover.md).
                    // A cron job or a script leaves gaps; so does this one.
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
            }
            Ok::<u32, String>(n)
        })
    };
    // The direct writer runs from before expand; the proxy's once it is linked.
    let mut writers = vec![spawn("direct", db.client().await)];
    tokio::time::sleep(Duration::from_millis(200)).await;
    step(&db, "expand").await;
    let p = linked_proxy(&db).await;
    writers.push(spawn("proxy", connect_shaped(&p, &db, "integer").await));
    let check = |label: &'static str| {
        let (hold, held, expect, direct, url) = (&hold, &held, &expect, &direct, db.url());
        async move {
            hold.store(true, Ordering::SeqCst);
            while held.load(Ordering::SeqCst) < 2 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            assert_eq!(wrong_twins(direct).await, 0, "after {label}");
            ks_expect(&url, &["verify"], 0);
            let now = links(direct).await;
            let want = expect.lock().unwrap().clone();
            assert!(want.len() > 4, "the writers wrote");
            for (k, v) in &want {
                assert_eq!(now.get(k), Some(v), "after {label}: link of {k}");
            }
            hold.store(false, Ordering::SeqCst);
        }
    };
    for s in ["backfill", "cutover", "rollback", "cutover"] {
        tokio::time::sleep(Duration::from_millis(200)).await;
        step(&db, s).await;
        check(s).await;
    }
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        let n = w.await.unwrap().unwrap_or_else(|e| panic!("{e}"));
        assert!(n > 5, "each writer ran through the lifecycle ({n} rounds)");
    }
}

/// A function that writes a child, called through keyshift: its rows get their twins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_that_inserts_into_a_child_called_through_keyshift() {
    let db = seeded().await;
    for s in ["expand", "backfill"] {
        ks_expect(&db.url(), &[s], 0);
    }
    let direct = db.client().await;
    direct
        .batch_execute(
            "CREATE FUNCTION add_tool(server integer, name text) RETURNS void LANGUAGE plpgsql AS $$
             BEGIN INSERT INTO mcp_server_tools (mcp_server_id, tool_name) VALUES (server, name); END $$;",
        )
        .await
        .unwrap();
    let p = linked_proxy(&db).await;
    let c = connect_shaped(&p, &db, "integer").await;
    c.batch_execute("SELECT add_tool((SELECT min(id) FROM mcp_servers), 'fn-before')")
        .await
        .unwrap();
    assert_eq!(wrong_twins(&direct).await, 0);
    step(&db, "cutover").await;
    // After cutover the uuid-shaped version of the function runs (function bodies are not
    // translated: docs/limitations.md); its rows get their legacy integers.
    direct
        .batch_execute(
            "CREATE FUNCTION add_tool_v2(server uuid, name text) RETURNS void LANGUAGE sql AS $$
             INSERT INTO mcp_server_tools (mcp_server_id, tool_name) VALUES (server, name) $$;",
        )
        .await
        .unwrap();
    let u = connect_shaped(&p, &db, "uuid").await;
    u.batch_execute(
        "SELECT add_tool_v2((SELECT id FROM mcp_servers ORDER BY name LIMIT 1), 'fn-after')",
    )
    .await
    .unwrap();
    assert_eq!(wrong_twins(&direct).await, 0);
    assert_eq!(
        count(&direct, "SELECT count(*) FROM mcp_server_tools WHERE tool_name LIKE 'fn-%' AND mcp_server_id_legacy IS NOT NULL").await,
        2
    );
}

/// Fill triggers disabled by hand: the proxy's metric names the table within a heartbeat,
/// writes that bypass the proxy there leave NULL twins, and once the triggers are back,
/// `keyshift backfill` repairs those rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabled_fill_triggers_are_reported_and_what_they_missed_is_repaired() {
    let db = seeded().await;
    for s in ["expand", "backfill"] {
        ks_expect(&db.url(), &[s], 0);
    }
    let p = linked_proxy(&db).await;
    let direct = db.client().await;
    let metric = |p: &TestProxy| {
        let admin = p.admin;
        async move {
            let (_, m) = tokio::task::spawn_blocking(move || {
                common::proxy::http(admin, "GET", "/metrics", None)
            })
            .await
            .unwrap();
            m.lines().any(|l| {
                l.starts_with("keyshift_fill_triggers_off{table=\"public.mcp_servers\"} 1")
            })
        }
    };
    assert!(!metric(&p).await, "all triggers on after expand");
    direct
        .batch_execute("ALTER TABLE mcp_servers DISABLE TRIGGER zz_keyshift_fill_integer_ins")
        .await
        .unwrap();
    let start = std::time::Instant::now();
    while !metric(&p).await {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the metric never showed the table"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    direct
        .batch_execute("INSERT INTO mcp_servers (connector_id, name) VALUES (2, 'unfilled')")
        .await
        .unwrap();
    assert_eq!(
        wrong_twins(&direct).await,
        1,
        "the write the triggers missed"
    );
    ks_expect(&db.url(), &["verify"], 1);
    direct
        .batch_execute("ALTER TABLE mcp_servers ENABLE ALWAYS TRIGGER zz_keyshift_fill_integer_ins")
        .await
        .unwrap();
    ks_expect(&db.url(), &["backfill"], 0);
    assert_eq!(wrong_twins(&direct).await, 0);
    ks_expect(&db.url(), &["verify"], 0);
    let start = std::time::Instant::now();
    while metric(&p).await {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the metric never cleared"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A role allowed to write a child but not to read its parent (as application roles with
/// column grants are): its direct writes work as before the migration, and get their twins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_that_cannot_read_the_parent_still_writes_the_child_directly() {
    let db = seeded().await;
    for s in ["expand", "backfill"] {
        ks_expect(&db.url(), &[s], 0);
    }
    let direct = db.client().await;
    let role = format!("w_{}", db.name);
    direct
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN;
             GRANT INSERT, UPDATE ON mcp_server_tools TO {role};
             GRANT SELECT (id, mcp_server_id, tool_name) ON mcp_server_tools TO {role};
             GRANT USAGE ON SEQUENCE mcp_server_tools_id_seq TO {role};"
        ))
        .await
        .unwrap();
    let url = db.url().replacen("postgres@", &format!("{role}@"), 1);
    let w = common::connect(&url).await;
    w.batch_execute(
        "INSERT INTO mcp_server_tools (mcp_server_id, tool_name) VALUES (3, 'by-writer');
         UPDATE mcp_server_tools SET mcp_server_id = 4 WHERE tool_name = 'by-writer';",
    )
    .await
    .unwrap();
    assert_eq!(wrong_twins(&direct).await, 0);
    direct
        .batch_execute(&format!("DROP OWNED BY {role}; DROP ROLE {role}"))
        .await
        .unwrap();
}

/// Logical replication's apply workers write with `session_replication_role = replica`, under
/// which ordinary triggers do not fire; keyshift's are `ENABLE ALWAYS`. The same setting in a
/// direct session stands in for an apply worker here.
#[tokio::test]
async fn writes_as_a_replica_applies_them_get_their_twins() {
    let db = seeded().await;
    for s in ["expand", "backfill"] {
        ks_expect(&db.url(), &[s], 0);
    }
    let c = db.client().await;
    c.batch_execute(
        "SET session_replication_role = replica;
         INSERT INTO mcp_servers (connector_id, name) VALUES (5, 'replicated');
         UPDATE mcp_servers SET connector_id = 6 WHERE name = 's1';
         RESET session_replication_role;",
    )
    .await
    .unwrap();
    assert_eq!(wrong_twins(&c).await, 0);
    ks_expect(&db.url(), &["cutover"], 0);
    let c6 = c
        .query_one("SELECT id FROM mcp_connectors WHERE id_legacy = 6", &[])
        .await
        .unwrap()
        .get::<_, Uuid>(0);
    c.execute("SET session_replication_role = replica", &[])
        .await
        .unwrap();
    c.execute(
        "INSERT INTO mcp_servers (connector_id, name) VALUES ($1, 'replicated-after')",
        &[&c6],
    )
    .await
    .unwrap();
    c.execute("RESET session_replication_role", &[])
        .await
        .unwrap();
    assert_eq!(wrong_twins(&c).await, 0);
}
