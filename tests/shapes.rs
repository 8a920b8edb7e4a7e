//! [shapes]: an integer-shaped application (V1) and a uuid-shaped one (V2) side by side through
//! the proxy, from harden through cutover, rollback and cutover again. Each keeps the column
//! names and types it was told, statements prepared before the swap included, and sees the
//! other's rows in its own shape.
mod common;
mod migrate_support;

use std::time::{Duration, Instant};

use common::proxy::{
    TestProxy, connect_shaped, linked_proxy, test_config, wait_rules_in_force, wait_status,
};
use migrate_support::{SEED_004, ks_async, ks_expect, seed_004_rows, text};
use tokio_postgres::error::SqlState;
use uuid::Uuid;

async fn hardened_db() -> common::TestDb {
    let db = common::TestDb::new().await;
    db.client()
        .await
        .batch_execute(&format!("{SEED_004}{}", seed_004_rows(10)))
        .await
        .unwrap();
    for step in ["expand", "backfill", "harden"] {
        ks_expect(&db.url(), &[step], 0);
    }
    db
}

/// A connection through the proxy in `shape` (`None`: the default), named by `options` as
/// libpq and psycopg do.
async fn connect(
    p: &TestProxy,
    db: &common::TestDb,
    shape: Option<&str>,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let mut cfg: tokio_postgres::Config = p.url("postgres", &db.name).parse().unwrap();
    if let Some(s) = shape {
        cfg.options(format!("-c keyshift.shape={s}"));
    }
    let (client, conn) = cfg.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

fn msg(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_else(|| e.to_string())
}

/// V1's and V2's statements, prepared once, before any swap.
struct V1 {
    c: tokio_postgres::Client,
    insert: tokio_postgres::Statement,
    by_name: tokio_postgres::Statement,
    join: tokio_postgres::Statement,
}

struct V2 {
    c: tokio_postgres::Client,
    insert: tokio_postgres::Statement,
    by_name: tokio_postgres::Statement,
    connector: tokio_postgres::Statement,
}

impl V1 {
    async fn new(c: tokio_postgres::Client) -> V1 {
        let insert = c
            .prepare("INSERT INTO mcp_servers (connector_id, name) VALUES ($1, $2) RETURNING id, connector_id")
            .await
            .unwrap();
        let by_name = c
            .prepare("SELECT s.id, s.connector_id, s.name FROM mcp_servers s WHERE s.name = $1")
            .await
            .unwrap();
        let join = c
            .prepare(
                "SELECT t.id, t.mcp_server_id, c.id FROM mcp_server_tools t \
                 JOIN mcp_servers s ON s.id = t.mcp_server_id \
                 JOIN mcp_connectors c ON c.id = s.connector_id WHERE t.tool_name = $1",
            )
            .await
            .unwrap();
        V1 {
            c,
            insert,
            by_name,
            join,
        }
    }
}

impl V2 {
    async fn new(c: tokio_postgres::Client) -> V2 {
        let insert = c
            .prepare("INSERT INTO mcp_servers (id, connector_id, name) VALUES ($1, $2, $3) RETURNING id, connector_id")
            .await
            .unwrap();
        let by_name = c
            .prepare("SELECT id, connector_id, name FROM mcp_servers WHERE name = $1")
            .await
            .unwrap();
        let connector = c
            .prepare("SELECT id FROM mcp_connectors WHERE name = $1")
            .await
            .unwrap();
        V2 {
            c,
            insert,
            by_name,
            connector,
        }
    }
}

/// One round: V1 and V2 each write a server under connector `c1`, a tool under V2's server,
/// then read the other's rows in their own shape. `round` keeps names unique.
async fn round(v1: &V1, v2: &V2, round: &str) {
    eprintln!("round {round}");
    let c1_uuid: Uuid =
        v2.c.query_one(&v2.connector, &[&"c1"])
            .await
            .unwrap()
            .get(0);
    // V1 writes with integers and reads its own row back.
    let name1 = format!("v1-{round}");
    let r = v1.c.query_one(&v1.insert, &[&1i32, &name1]).await.unwrap();
    let v1_id: i32 = r.get(0);
    assert_eq!(r.get::<_, Option<i32>>(1), Some(1));
    // V2 writes with a client-generated uuid4 key and the connector's uuid.
    let v2_id = Uuid::from_u128(rand::random::<u128>() & !(0xF000 << 64) | (0x4000 << 64));
    let name2 = format!("v2-{round}");
    let r =
        v2.c.query_one(&v2.insert, &[&v2_id, &c1_uuid, &name2])
            .await
            .unwrap();
    assert_eq!(r.get::<_, Uuid>(0), v2_id);
    assert_eq!(r.get::<_, Option<Uuid>>(1), Some(c1_uuid));
    // A child row through V2's simple protocol, naming the parent by uuid.
    let tool = format!("tool-{round}");
    v2.c.batch_execute(&format!(
        "INSERT INTO mcp_server_tools (mcp_server_id, tool_name) VALUES ('{v2_id}', '{tool}')"
    ))
    .await
    .unwrap();
    // Each sees the other's row in its own shape.
    let r = v1.c.query_one(&v1.by_name, &[&name2]).await.unwrap();
    let v2_row_as_int: i32 = r.get(0);
    assert_eq!(r.get::<_, Option<i32>>(1), Some(1), "V2's row, integer FK");
    let r = v2.c.query_one(&v2.by_name, &[&name1]).await.unwrap();
    let v1_row_as_uuid: Uuid = r.get(0);
    assert_eq!(
        r.get::<_, Option<Uuid>>(1),
        Some(c1_uuid),
        "V1's row, uuid FK"
    );
    // The child V2 wrote, joined by V1 with integers: its FK is V2's server as an integer.
    let r = v1.c.query_one(&v1.join, &[&tool]).await.unwrap();
    assert_eq!(r.get::<_, i32>(1), v2_row_as_int);
    assert_eq!(r.get::<_, i32>(2), 1);
    // The two ids of each row agree with the mapping the other side sees.
    let back: i32 =
        v1.c.query_one("SELECT id FROM mcp_servers WHERE id_uuid = $1", &[&v2_id])
            .await
            .unwrap()
            .get(0);
    assert_eq!(back, v2_row_as_int);
    let back: Uuid =
        v2.c.query_one("SELECT id FROM mcp_servers WHERE id_legacy = $1", &[&v1_id])
            .await
            .unwrap()
            .get(0);
    assert_eq!(back, v1_row_as_uuid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_and_v2_side_by_side_through_cutover_rollback_and_cutover_again() {
    let db = hardened_db().await;
    let p = linked_proxy(&db).await;
    let v1 = V1::new(connect(&p, &db, None).await.unwrap()).await;
    let v2 = V2::new(connect(&p, &db, Some("uuid")).await.unwrap()).await;
    round(&v1, &v2, "hardened").await;
    for (step, name) in [
        ("cutover", "cut-over"),
        ("rollback", "rolled-back"),
        ("cutover", "cut-over-again"),
    ] {
        let out = ks_async(&db.url(), &[step]).await;
        assert!(out.status.success(), "{step}: {}", text(&out));
        round(&v1, &v2, name).await;
    }
    // Both connections lived through it all, on the statements prepared at the start.
    assert!(!v1.c.is_closed() && !v2.c.is_closed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_refuses_unknown_and_unavailable_shapes_and_set_cannot_change_one() {
    let db = common::TestDb::new().await;
    db.client()
        .await
        .batch_execute(&format!("{SEED_004}{}", seed_004_rows(3)))
        .await
        .unwrap();
    ks_expect(&db.url(), &["expand"], 0);
    ks_expect(&db.url(), &["backfill", "--skip-harden"], 0);
    let p = linked_proxy(&db).await;
    let e = connect(&p, &db, Some("bogus")).await.expect_err("refused");
    assert_eq!(e.code(), Some(&SqlState::INVALID_PARAMETER_VALUE), "{e}");
    assert!(msg(&e).contains("keyshift.shape"), "{e:?}");
    let e = connect(&p, &db, Some("uuid")).await.expect_err("refused");
    assert_eq!(
        e.code(),
        Some(&SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE),
        "{e}"
    );
    assert!(msg(&e).contains("keyshift harden"), "{e:?}");
    // An integer session cannot switch: SET is refused, its statements keep their shape.
    let c = connect(&p, &db, Some("integer")).await.unwrap();
    let e = c
        .batch_execute("SET keyshift.shape = 'uuid'")
        .await
        .expect_err("refused");
    assert!(
        msg(&e).contains("fixed for the life of a connection"),
        "{e:?}"
    );
    let e = c
        .query_one("SELECT set_config('keyshift.shape', 'uuid', false)", &[])
        .await
        .expect_err("refused");
    assert!(msg(&e).contains("keyshift.shape"), "{e:?}");
    let id: i32 = c
        .query_one("SELECT id FROM mcp_connectors ORDER BY id LIMIT 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(id, 1);
    // After harden the uuid shape is served, as soon as the proxy has seen the phase.
    ks_expect(&db.url(), &["harden"], 0);
    let start = Instant::now();
    let c = loop {
        match connect(&p, &db, Some("UUID")).await {
            Ok(c) => break c,
            Err(e) if start.elapsed() < Duration::from_secs(15) => {
                assert_eq!(e.code(), Some(&SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("uuid still refused after harden: {e:?}"),
        }
    };
    let id: Uuid = c
        .query_one("SELECT id FROM mcp_connectors WHERE name = 'c1'", &[])
        .await
        .unwrap()
        .get(0);
    assert_ne!(id, Uuid::nil());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn translated_forms_views_cannot_run_get_keyshifts_error_naming_the_table() {
    let db = hardened_db().await;
    let p = linked_proxy(&db).await;
    let c = connect(&p, &db, Some("uuid")).await.unwrap();
    for sql in [
        "SELECT ctid FROM mcp_servers",
        "INSERT INTO mcp_server_tools (mcp_server_id, tool_name) VALUES (NULL, 'x') \
         ON CONFLICT ON CONSTRAINT mcp_server_tools_mcp_server_id_tool_name_key DO NOTHING",
        "MERGE INTO mcp_servers s USING (SELECT 1) v ON false WHEN NOT MATCHED THEN DO NOTHING",
    ] {
        let e = c.batch_execute(sql).await.expect_err(sql);
        let msg = e
            .as_db_error()
            .map(|d| d.message().to_string())
            .unwrap_or_default();
        assert!(
            msg.contains("uuid-shaped session") && msg.contains("public.mcp_server"),
            "{sql}: {msg}"
        );
    }
    // PostgreSQL's own limit through a view, documented (runbook, limitations): a GROUP BY of
    // the key alone cannot vouch for the other columns, since a view has no primary key.
    let e = c
        .batch_execute("SELECT c.id, c.name FROM mcp_connectors c GROUP BY c.id")
        .await
        .expect_err("42803");
    assert_eq!(e.code(), Some(&SqlState::GROUPING_ERROR), "{e:?}");
    c.batch_execute("SELECT c.id, c.name FROM mcp_connectors c GROUP BY c.id, c.name")
        .await
        .unwrap();
    // What works through a view: COPY TO, TRUNCATE of an unrelated table, SET col = DEFAULT
    // (and COPY FROM, on the table itself: copy_from_in_a_translated_session_…).
    let out = c.copy_out("COPY mcp_connectors TO STDOUT").await.unwrap();
    let chunks: Vec<_> = futures_util::TryStreamExt::try_collect(out).await.unwrap();
    let text: Vec<u8> = chunks.concat();
    // Tab-separated, the uuid key first (the view's order is the table's: id_legacy first).
    assert!(String::from_utf8_lossy(&text).lines().count() >= 3);
    c.batch_execute("UPDATE mcp_servers SET status = DEFAULT WHERE name = 's1'")
        .await
        .unwrap();
}

/// A statement prepared before expand, `SELECT *`, not used until after the cutover: under
/// the integer view it would answer the twin columns too, more than the client was told.
/// Its next use gets PostgreSQL's own 0A000, and a new prepare of the same text works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_whose_columns_would_change_answers_0a000_instead_of_other_rows() {
    let db = common::TestDb::new().await;
    db.client()
        .await
        .batch_execute(&format!("{SEED_004}{}", seed_004_rows(3)))
        .await
        .unwrap();
    let p = linked_proxy_before_expand(&db).await;
    let c = connect(&p, &db, None).await.unwrap();
    let star = c
        .prepare("SELECT * FROM mcp_connectors WHERE name = $1")
        .await
        .unwrap();
    assert_eq!(star.columns().len(), 3);
    for step in ["expand", "backfill", "cutover"] {
        ks_expect(&db.url(), &[step], 0);
    }
    let e = c.query(&star, &[&"c1"]).await.expect_err("stale");
    assert_eq!(e.code(), Some(&SqlState::FEATURE_NOT_SUPPORTED), "{e:?}");
    assert_eq!(msg(&e), "cached plan must not change result type");
    // The driver's way out: prepare again, and get the shape as it is now.
    let again = c
        .prepare("SELECT * FROM mcp_connectors WHERE name = $1")
        .await
        .unwrap();
    let names: Vec<&str> = again.columns().iter().map(|c| c.name()).collect();
    assert_eq!(names, ["id", "name", "created_at", "id_uuid"]);
    let row = c.query_one(&again, &[&"c1"]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 1);
}

async fn linked_proxy_before_expand(db: &common::TestDb) -> TestProxy {
    let mut cfg = test_config();
    cfg.database_url = Some(db.url());
    let p = TestProxy::start_with(cfg);
    wait_status(&p, |v| v["database_link"] == "connected").await;
    p
}

/// Name resolution follows the session: a temporary table that shadows a migrated one is the
/// session's own (no twin added), and `SET search_path` (also LOCAL, RESET, set_config)
/// decides which table an unqualified name is, for the physical and the translated shape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temporary_tables_and_search_path_resolve_as_the_session_says() {
    let db = hardened_db().await;
    db.client()
        .await
        .batch_execute(
            "CREATE SCHEMA app;
             CREATE TABLE app.mcp_servers (id int, connector_id int, name text);
             CREATE TABLE app.mcp_connectors (id int, name text)",
        )
        .await
        .unwrap();
    let p = linked_proxy(&db).await;
    // The case: a temp table named like a migrated child, in the physical shape.
    let c = connect(&p, &db, None).await.unwrap();
    c.batch_execute("CREATE TEMP TABLE mcp_servers (id int, connector_id int)")
        .await
        .unwrap();
    c.batch_execute("INSERT INTO mcp_servers (id, connector_id) VALUES (1, 1)")
        .await
        .unwrap();
    let n: i64 = c
        .query_one("SELECT count(*) FROM pg_temp.mcp_servers", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    // A uuid-shaped session's temp table is not pointed at the views either.
    let u = connect(&p, &db, Some("uuid")).await.unwrap();
    u.batch_execute("CREATE TEMPORARY TABLE mcp_connectors (id int, name text); INSERT INTO mcp_connectors VALUES (7, 'mine')")
        .await
        .unwrap();
    let r = u
        .query_one("SELECT id FROM mcp_connectors", &[])
        .await
        .unwrap();
    assert_eq!(r.get::<_, i32>(0), 7);
    u.batch_execute("DROP TABLE mcp_connectors").await.unwrap();
    let id: Uuid = u
        .query_one("SELECT id FROM mcp_connectors WHERE name = 'c1'", &[])
        .await
        .unwrap()
        .get(0);
    assert_ne!(id, Uuid::nil());

    // search_path: app first, so mcp_servers is app's (unmigrated, no twin).
    let c = connect(&p, &db, None).await.unwrap();
    c.batch_execute("SET search_path TO app, public")
        .await
        .unwrap();
    c.batch_execute("INSERT INTO mcp_servers (id, connector_id, name) VALUES (1, 1, 'app')")
        .await
        .unwrap();
    c.batch_execute("RESET search_path").await.unwrap();
    c.batch_execute("INSERT INTO mcp_servers (connector_id, name) VALUES (1, 'public')")
        .await
        .unwrap();
    let twin: Option<Uuid> = c
        .query_one(
            "SELECT connector_id_uuid FROM mcp_servers WHERE name = 'public'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(twin.is_some(), "the public table's twin is filled again");
    // SET LOCAL lasts until the transaction ends; set_config like SET.
    c.batch_execute(
        "BEGIN; SET LOCAL search_path TO app; INSERT INTO mcp_servers (id, connector_id, name) VALUES (2, 1, 'local'); COMMIT",
    )
    .await
    .unwrap();
    c.batch_execute("INSERT INTO mcp_servers (connector_id, name) VALUES (1, 'after-local')")
        .await
        .unwrap();
    c.query_one(
        "SELECT set_config('search_path', 'app, public', false)",
        &[],
    )
    .await
    .unwrap();
    c.batch_execute("INSERT INTO mcp_servers (id, connector_id, name) VALUES (3, 1, 'config')")
        .await
        .unwrap();
    let app: i64 = c
        .query_one("SELECT count(*) FROM app.mcp_servers", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(app, 3);
    // A translated session with its own path: public's tables still through the views.
    u.batch_execute("SET search_path TO app, public")
        .await
        .unwrap();
    let r = u
        .query_one("SELECT count(*) FROM mcp_servers", &[])
        .await
        .unwrap();
    assert_eq!(r.get::<_, i64>(0), 3, "app.mcp_servers, untranslated");
    u.batch_execute("SET search_path TO public").await.unwrap();
    let id: Uuid = u
        .query_one("SELECT id FROM mcp_servers WHERE name = 'public'", &[])
        .await
        .unwrap()
        .get(0);
    assert_ne!(id, Uuid::nil());
    // TRUNCATE names the table as it is, in any shape.
    u.batch_execute("TRUNCATE mcp_server_tokens").await.unwrap();
}

/// `COPY … FROM STDIN` through a session in `shape`: the rows PostgreSQL says it copied.
/// `keyshift cutover`, then wait until the proxy serves the rules it committed.
async fn cutover_and_wait(db: &common::TestDb, direct: &tokio_postgres::Client, p: &TestProxy) {
    ks_expect(&db.url(), &["cutover"], 0);
    wait_rules_in_force(p, direct).await;
}

async fn copy_in(c: &tokio_postgres::Client, sql: &str, data: String) -> u64 {
    use futures_util::SinkExt;
    let sink = c
        .copy_in(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    futures_util::pin_mut!(sink);
    sink.send(bytes::Bytes::from(data)).await.unwrap();
    sink.finish()
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
}

/// PostgreSQL cannot COPY into a view, so a translated session's `COPY t (cols) FROM` writes
/// the table itself with its column list renamed to the physical names: an unchanged
/// integer-shaped application's bulk load after cutover, and a uuid-shaped one's before it,
/// land in the columns their names meant. (The other member of each pair is left to the
/// table's own triggers and is not checked here.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_from_in_a_translated_session_lands_in_the_physical_columns() {
    let db = common::TestDb::new().await;
    let direct = db.client().await;
    direct
        .batch_execute(
            "CREATE TABLE parent (id serial PRIMARY KEY, name text NOT NULL);
             CREATE TABLE child (id serial PRIMARY KEY, name text NOT NULL,
                                 parent_id integer REFERENCES parent (id));
             INSERT INTO parent (name) SELECT 'p' || g FROM generate_series(1, 3) g;",
        )
        .await
        .unwrap();
    for step in ["expand", "backfill", "harden"] {
        ks_expect(&db.url(), &[step], 0);
    }
    let p = linked_proxy(&db).await;
    let parents: Vec<(i32, Uuid)> = direct
        .query("SELECT id, id_uuid FROM parent ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let children = |like: &'static str, column: &'static str| {
        let direct = &direct;
        async move {
            direct
                .query(
                    &format!(
                        "SELECT name, {column}::text FROM child WHERE name LIKE $1 ORDER BY name"
                    ),
                    &[&like],
                )
                .await
                .unwrap()
                .iter()
                .map(|r| (r.get::<_, String>(0), r.get::<_, Option<String>>(1)))
                .collect::<Vec<_>>()
        }
    };
    let row = |name: &str, v: String| (name.to_string(), Some(v));

    // Hardened, physically integer: a uuid session's `parent_id` is `parent_id_uuid`.
    let u = connect_shaped(&p, &db, "uuid").await;
    let data = format!("u1\t{}\nu2\t{}\n", parents[0].1, parents[2].1);
    let n = copy_in(&u, "COPY child (name, parent_id) FROM STDIN", data).await;
    assert_eq!(n, 2);
    assert_eq!(
        children("u%", "parent_id_uuid").await,
        [
            row("u1", parents[0].1.to_string()),
            row("u2", parents[2].1.to_string())
        ]
    );

    // Their integer `parent_id` is the triggers' to fill, not the rewriter's: without it the
    // cutover's verify refuses, so the rows go before it.
    direct
        .batch_execute("DELETE FROM child WHERE name LIKE 'u%'")
        .await
        .unwrap();

    // After cutover, physically uuid: an integer session's `parent_id` is `parent_id_legacy`.
    cutover_and_wait(&db, &direct, &p).await;
    let i = connect_shaped(&p, &db, "integer").await;
    for (sql, data) in [
        ("COPY child (name, parent_id) FROM STDIN", "i1\t1\ni2\t3\n"),
        (
            "COPY child (name, parent_id) FROM STDIN (FORMAT csv)",
            "i3,2\n\"i4, quoted\",1\n",
        ),
    ] {
        assert_eq!(copy_in(&i, sql, data.into()).await, 2, "{sql}");
    }
    assert_eq!(
        children("i%", "parent_id_legacy").await,
        [
            row("i1", "1".into()),
            row("i2", "3".into()),
            row("i3", "2".into()),
            row("i4, quoted", "1".into())
        ]
    );
    // And the session reads them back in its shape, through the view.
    let out = i
        .copy_out("COPY child (name, parent_id) TO STDOUT (FORMAT csv)")
        .await
        .unwrap();
    let chunks: Vec<bytes::Bytes> = futures_util::TryStreamExt::try_collect(out).await.unwrap();
    let text = String::from_utf8(chunks.concat()).unwrap();
    assert!(text.lines().any(|l| l == "i3,2"), "{text}");
}

/// Column names so long that `<name>_legacy` does not fit PostgreSQL's 63 bytes: the plan
/// fits them (a prefix and a hash, `ident::fit`), and the rewriter must write the fitted
/// names, in both directions and both shapes, before and after cutover.
#[tokio::test]
async fn keys_whose_legacy_name_must_be_shortened_are_written_under_the_plans_name() {
    // 58 bytes each: + "_legacy" is 65.
    let key = "identifier_assigned_by_the_accounting_system_of_record_xyz";
    let fk = "reference_to_the_account_that_owns_this_ledger_entry_abcde";
    assert_eq!((key.len(), fk.len()), (58, 58));
    let db = common::TestDb::new().await;
    let direct = db.client().await;
    direct
        .batch_execute(&format!(
            "CREATE TABLE account ({key} serial PRIMARY KEY, name text NOT NULL);
             CREATE TABLE entry (id serial PRIMARY KEY, note text NOT NULL,
                                 {fk} integer NOT NULL REFERENCES account ({key}));
             INSERT INTO account (name) SELECT 'a' || g FROM generate_series(1, 3) g;
             INSERT INTO entry (note, {fk}) VALUES ('before', 2);"
        ))
        .await
        .unwrap();
    for step in ["expand", "backfill", "harden"] {
        ks_expect(&db.url(), &[step], 0);
    }
    let p = linked_proxy(&db).await;
    let a3: Uuid = direct
        .query_one(
            &format!("SELECT {key}_uuid FROM account WHERE {key} = 3"),
            &[],
        )
        .await
        .unwrap()
        .get(0);

    // Hardened: the integer session is physical, the uuid one translated.
    let i = connect_shaped(&p, &db, "integer").await;
    i.execute(
        &format!("INSERT INTO entry (note, {fk}) VALUES ('int-1', 1)"),
        &[],
    )
    .await
    .unwrap();
    let u = connect_shaped(&p, &db, "uuid").await;
    u.execute(
        &format!("INSERT INTO entry (note, {fk}) VALUES ('uuid-1', $1)"),
        &[&a3],
    )
    .await
    .unwrap();

    cutover_and_wait(&db, &direct, &p).await;
    // After cutover: the uuid session is physical (the reverse fill writes the fitted
    // `<fk>…_legacy` from the parent's fitted `<key>…_legacy`), the integer one translated.
    let u = connect_shaped(&p, &db, "uuid").await;
    u.execute(
        &format!("INSERT INTO entry (note, {fk}) VALUES ('uuid-2', $1)"),
        &[&a3],
    )
    .await
    .unwrap();
    let i = connect_shaped(&p, &db, "integer").await;
    i.execute(
        &format!("INSERT INTO entry (note, {fk}) VALUES ('int-2', 1)"),
        &[],
    )
    .await
    .unwrap();

    // Every row has both sides, and they agree with the parent's.
    let legacy_fk = keyshift::ident::suffixed(fk, "_legacy");
    let legacy_key = keyshift::ident::suffixed(key, "_legacy");
    assert_ne!(legacy_fk, format!("{fk}_legacy"));
    let rows = direct
        .query(
            &format!(
                "SELECT e.note, a.{legacy_key} FROM entry e JOIN account a
                   ON a.{key} = e.{fk} AND a.{legacy_key} = e.{legacy_fk} ORDER BY e.id"
            ),
            &[],
        )
        .await
        .unwrap();
    let got: Vec<(String, i32)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        got,
        [
            ("before".to_string(), 2),
            ("int-1".to_string(), 1),
            ("uuid-1".to_string(), 3),
            ("uuid-2".to_string(), 3),
            ("int-2".to_string(), 1)
        ]
    );
    // And the integer session reads its integers back under the name it knows.
    let n: i32 = i
        .query_one(
            &format!("SELECT {fk} FROM entry WHERE note = 'uuid-2'"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 3);
}

/// `pg_dump --schema-only` of `db` as a sorted list of statements: two databases migrated
/// differently compare equal when their catalogs hold the same objects, whatever their OIDs.
fn schema_dump(db: &common::TestDb) -> Vec<String> {
    let body = common::schema_dump(&db.url());
    let mut v: Vec<String> = body.split(";\n").map(|s| s.trim().to_string()).collect();
    v.sort();
    v
}

/// Which of seed 004's tables are swapped: their FK (or key) uuid twin has its name.
async fn swapped(direct: &tokio_postgres::Client) -> Vec<String> {
    direct
        .query(
            "SELECT c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = 'public' AND c.relkind = 'r'
                AND EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid
                              AND a.attname LIKE '%\\_legacy' AND NOT a.attisdropped)
              ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// issue [scale]: `cutover --by-table` swaps the tables group by group with the gates open.
/// Stopped halfway (a lock it cannot get on one table), the tables are in both shapes, and
/// V1 and V2 keep working through the proxy on statements prepared before it all; `rollback`
/// refuses to start from there; the rerun resumes and leaves exactly the schema the single
/// swap leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_and_v2_through_a_cutover_table_by_table_stopped_halfway() {
    let db = hardened_db().await;
    let direct = db.client().await;
    let p = linked_proxy(&db).await;
    let v1 = V1::new(connect(&p, &db, None).await.unwrap()).await;
    let v2 = V2::new(connect(&p, &db, Some("uuid")).await.unwrap()).await;
    round(&v1, &v2, "hardened").await;

    // A transaction holding mcp_connectors: the groups that drop an FK to it, or swap its
    // key, cannot take their locks; the leaves under mcp_servers can.
    let blocker = migrate_support::holding(&db, "mcp_connectors").await;
    // A group whose locks do not come with the gates open is tried again under a pause of
    // its own, which cannot drain a direct session either: it gives up after --budget.
    let by_table = migrate_support::BY_TABLE_GIVING_UP;
    let out = ks_async(&db.url(), &by_table).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("resumes"), "{}", text(&out));
    let phase: String = direct
        .query_one("SELECT phase FROM keyshift.migration", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(phase, "cutting_over");
    let halfway = swapped(&direct).await;
    assert!(
        !halfway.is_empty() && !halfway.contains(&"mcp_connectors".to_string()),
        "some tables swapped, not all: {halfway:?}"
    );
    // `status` counts the groups swapped from the catalog, in one query for all of them:
    // here each group is one table.
    let out = ks_async(&db.url(), &["status", "--format", "json"]).await;
    let st: serde_json::Value = serde_json::from_str(&migrate_support::stdout(&out)).unwrap();
    let (done, all) = (
        st["groups_swapped"][0].as_u64().unwrap(),
        st["groups_swapped"][1].as_u64().unwrap(),
    );
    assert!(done == halfway.len() as u64 && done < all, "{st:#}");
    wait_rules_in_force(&p, &direct).await;

    // Tables in both shapes: each session is served in its own, reads and writes alike.
    round(&v1, &v2, "halfway").await;
    // COPY FROM naming a key or FK column would need each table's state: refused, retryable.
    let e =
        v1.c.batch_execute("COPY mcp_servers (connector_id, name) FROM STDIN")
            .await
            .unwrap_err();
    assert_eq!(e.code(), Some(&SqlState::FEATURE_NOT_SUPPORTED), "{e}");
    assert!(msg(&e).contains("one by one"), "{}", msg(&e));
    let out = ks_async(&db.url(), &["rollback"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("cutover --by-table"), "{}", text(&out));

    blocker.batch_execute("ROLLBACK").await.unwrap();
    let out = ks_async(&db.url(), &by_table).await;
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("resumed"), "{}", text(&out));
    wait_rules_in_force(&p, &direct).await;
    round(&v1, &v2, "cut-over").await;
    assert_eq!(
        migrate_support::inconsistent_after_cutover(&direct).await,
        Vec::<String>::new()
    );
    ks_expect(&db.url(), &["verify"], 0);

    // The same schema as the single swap leaves.
    let twin = hardened_db().await;
    ks_expect(&twin.url(), &["cutover"], 0);
    assert_eq!(schema_dump(&db), schema_dump(&twin));

    // And from there everything goes on as after any cutover.
    ks_expect(&db.url(), &["rollback"], 0);
    wait_rules_in_force(&p, &direct).await;
    round(&v1, &v2, "rolled-back").await;
    assert!(!v1.c.is_closed() && !v2.c.is_closed());
}
