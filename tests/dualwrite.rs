//! Dual-write through the proxy, end to end: a seed-004-shaped database is expanded and
//! backfilled by the real binary, a proxy linked to it picks the rules up from the database,
//! and every form of write from DESIGN's table goes through it, in the simple protocol and as
//! named prepared statements with binary parameters. After each, every FK twin must equal its
//! parent's uuid, and the client must get what PostgreSQL returns for the original statement
//! on a twin database that keyshift does not touch.
mod common;
mod migrate_support;

use std::time::{Duration, Instant};

use common::proxy::{TestProxy, http, test_config};
use migrate_support::{SEED_004, inconsistent, ks_expect, seed_004_rows};
use tokio_postgres::SimpleQueryMessage;

/// A migrated database (expanded and backfilled, phase backfilled or hardened) and its
/// untouched twin with the same rows.
async fn setup() -> (common::TestDb, common::TestDb, TestProxy) {
    let db = common::TestDb::new().await;
    let twin = common::TestDb::new().await;
    let schema = format!("{SEED_004}{}", seed_004_rows(20));
    db.client().await.batch_execute(&schema).await.unwrap();
    twin.client().await.batch_execute(&schema).await.unwrap();
    ks_expect(&db.url(), &["expand"], 0);
    ks_expect(&db.url(), &["backfill"], 0);
    // The twin gets the same columns (so that `RETURNING *` and positional inserts compare),
    // without keyshift's rules: it is PostgreSQL's answer to the original statements.
    ks_expect(&twin.url(), &["expand"], 0);
    let mut cfg = test_config();
    cfg.database_url = Some(db.url());
    let p = TestProxy::start_with(cfg);
    let start = Instant::now();
    loop {
        let (_, body) = http(p.admin, "GET", "/v1/status", None);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        if v["dual_write"] == true {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "rules never loaded: {v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (db, twin, p)
}

/// The columns the application knows are identical in both databases, table by table.
async fn assert_same_application_columns(
    a: &tokio_postgres::Client,
    b: &tokio_postgres::Client,
    context: &str,
) {
    for (table, cols) in [
        ("mcp_connectors", "id, name"),
        ("connector_access", "id, connector_id, user_id"),
        ("mcp_servers", "id, connector_id, name, status"),
        ("mcp_server_tokens", "id, mcp_server_id, token"),
        ("mcp_server_tools", "id, mcp_server_id, tool_name"),
    ] {
        let q = format!(
            "SELECT string_agg(x::text, ';' ORDER BY x.id) FROM (SELECT {cols} FROM {table}) x"
        );
        let x: Option<String> = a.query_one(&q, &[]).await.unwrap().get(0);
        let y: Option<String> = b.query_one(&q, &[]).await.unwrap().get(0);
        assert_eq!(x, y, "{table} differs{context}");
    }
}

fn rows_text(msgs: &[SimpleQueryMessage]) -> Vec<String> {
    msgs.iter()
        .map(|m| match m {
            SimpleQueryMessage::Row(r) => {
                let vals: Vec<String> = (0..r.len())
                    .map(|i| r.get(i).unwrap_or("NULL").to_string())
                    .collect();
                format!("row {}", vals.join("|"))
            }
            SimpleQueryMessage::CommandComplete(n) => format!("complete {n}"),
            SimpleQueryMessage::RowDescription(d) => {
                let names: Vec<&str> = d.iter().map(|c| c.name()).collect();
                format!("columns {}", names.join(","))
            }
            _ => "other".into(),
        })
        .collect()
}

/// Writes that go through the proxy, in DESIGN's table order. Each must keep the twins right.
const STATEMENTS: &[&str] = &[
    // VALUES, many rows, literals and expressions, DEFAULT and NULL.
    "INSERT INTO mcp_servers (connector_id, name) VALUES (1, 'a'), (2 + 1, 'b'), (NULL, 'c'), (DEFAULT, 'd') RETURNING id, connector_id",
    // No column list.
    "INSERT INTO mcp_servers VALUES (DEFAULT, 4, 'positional', 'on') RETURNING id",
    "INSERT INTO connector_access VALUES (DEFAULT, 5, 'u-positional')",
    // INSERT … SELECT.
    "INSERT INTO mcp_server_tokens (mcp_server_id, token) SELECT id, 'tok' || id FROM mcp_servers WHERE id <= 3 RETURNING mcp_server_id",
    // SQLAlchemy 2's bulk insert with RETURNING and sentinel ordering.
    "INSERT INTO mcp_server_tools (mcp_server_id, tool_name) SELECT p0::INTEGER, p1::VARCHAR FROM (VALUES (1, 'x1', 0), (2, 'x2', 1)) AS imp_sen(p0, p1, sen_counter) ORDER BY sen_counter RETURNING mcp_server_tools.id, mcp_server_tools.id AS id__1",
    // ON CONFLICT DO UPDATE of the FK.
    "INSERT INTO mcp_server_tools (mcp_server_id, tool_name) VALUES (1, 'x1') ON CONFLICT (mcp_server_id, tool_name) DO UPDATE SET mcp_server_id = 4 RETURNING id, mcp_server_id",
    // UPDATE, with and without FROM, with an alias.
    "UPDATE mcp_servers SET connector_id = 6 WHERE id = 1",
    "UPDATE mcp_servers s SET connector_id = c.id FROM mcp_connectors c WHERE c.name = 'c7' AND s.id IN (2, 3)",
    "UPDATE public.mcp_server_tokens AS t SET mcp_server_id = t.mcp_server_id + 1, token = 'moved' WHERE t.id = 1",
    // A writable CTE.
    "WITH moved AS (UPDATE connector_access SET connector_id = 8 WHERE id <= 2 RETURNING id) INSERT INTO connector_access (connector_id, user_id) SELECT 9, 'cte' || id FROM moved",
    // MERGE.
    "MERGE INTO mcp_server_tools t USING (VALUES (5, 'merged'), (6, 'x2')) AS s(sid, tool) ON t.tool_name = s.tool AND t.mcp_server_id = 2 WHEN MATCHED THEN UPDATE SET mcp_server_id = s.sid WHEN NOT MATCHED THEN INSERT (mcp_server_id, tool_name) VALUES (s.sid, s.tool)",
    // DELETE, cascading to children (which the shadow FKs mirror for the twins).
    "INSERT INTO mcp_connectors (name) VALUES ('doomed') RETURNING id",
    "INSERT INTO mcp_servers (connector_id, name) VALUES (21, 'doomed-s')",
    "INSERT INTO connector_access (connector_id, user_id) VALUES (21, 'doomed-u')",
    "DELETE FROM mcp_connectors WHERE id = 21",
    // Quoted names.
    "INSERT INTO \"public\".\"mcp_servers\" (\"connector_id\", name) VALUES (10, 'quoted')",
];

#[tokio::test]
async fn every_write_form_keeps_the_twins_right_simple_protocol() {
    let (db, twin, p) = setup().await;
    let c = common::connect(&p.url("postgres", &db.name)).await;
    let t = twin.client().await;
    let direct = db.client().await;
    for sql in STATEMENTS {
        let through = c
            .simple_query(sql)
            .await
            .unwrap_or_else(|e| panic!("through keyshift: {sql}\n{e:?}"));
        let plain = t
            .simple_query(sql)
            .await
            .unwrap_or_else(|e| panic!("twin: {sql}\n{e:?}"));
        assert_eq!(rows_text(&through), rows_text(&plain), "{sql}");
        let bad = inconsistent(&direct).await;
        assert!(bad.is_empty(), "after {sql}:\n{bad:?}");
    }
    // The application's columns of both databases are identical.
    assert_same_application_columns(&direct, &t, "").await;
    // The rewrites were counted per table and kind.
    let (_, m) = http(p.admin, "GET", "/metrics", None);
    assert!(
        m.contains("keyshift_rewrites_total{kind=\"insert\",table=\"public.mcp_servers\"}"),
        "{m}"
    );
    assert!(m.contains("keyshift_rewrites_total{kind=\"update\""), "{m}");
    assert!(m.contains("keyshift_rules_version "), "{m}");
    ks_expect(&db.url(), &["verify"], 0);
}

#[tokio::test]
async fn prepared_statements_with_binary_parameters_keep_the_twins_right() {
    let (db, twin, p) = setup().await;
    let c = common::connect(&p.url("postgres", &db.name)).await;
    let t = twin.client().await;
    let direct = db.client().await;
    // (sql, parameters): int, bigint-typed and text parameters in binary format.
    let ins = "INSERT INTO mcp_servers (connector_id, name) VALUES ($1, $2), ($3, 'lit') RETURNING id, connector_id";
    let upd = "UPDATE mcp_servers SET connector_id = $1 WHERE id = $2";
    let upsert = "INSERT INTO mcp_server_tools (mcp_server_id, tool_name) VALUES ($1, $2) ON CONFLICT (mcp_server_id, tool_name) DO UPDATE SET mcp_server_id = EXCLUDED.mcp_server_id + $3 RETURNING mcp_server_id";
    let sel =
        "INSERT INTO mcp_server_tokens (mcp_server_id, token) SELECT $1::int, $2 RETURNING id";
    let mut answers = Vec::new();
    for client in [&c, &t] {
        let s_ins = client.prepare(ins).await.unwrap();
        let s_upd = client.prepare(upd).await.unwrap();
        let s_up = client.prepare(upsert).await.unwrap();
        let s_sel = client.prepare(sel).await.unwrap();
        // Parameter types are PostgreSQL's own deduction for the original statement.
        assert_eq!(s_ins.params().len(), 3);
        assert_eq!(s_upd.params().len(), 2);
        let mut out = Vec::new();
        for i in 1..=5i32 {
            let r = client
                .query(&s_ins, &[&i, &format!("p{i}"), &(i + 1)])
                .await
                .unwrap();
            out.push(format!(
                "{:?}",
                r.iter()
                    .map(|r| (r.get::<_, i32>(0), r.get::<_, Option<i32>>(1)))
                    .collect::<Vec<_>>()
            ));
            out.push(
                client
                    .execute(&s_upd, &[&(i + 2), &i])
                    .await
                    .unwrap()
                    .to_string(),
            );
            let r = client.query(&s_up, &[&i, &"x1", &1i32]).await.unwrap();
            out.push(format!(
                "{:?}",
                r.iter().map(|r| r.get::<_, i32>(0)).collect::<Vec<_>>()
            ));
            let r = client.query(&s_sel, &[&i, &"t"]).await.unwrap();
            out.push(format!("{}", r.len()));
        }
        if std::ptr::eq(client, &c) {
            let bad = inconsistent(&direct).await;
            assert!(bad.is_empty(), "{bad:?}");
        }
        answers.push(out);
    }
    // The client saw exactly what PostgreSQL answers for the original statements.
    assert_eq!(answers[0], answers[1]);
    ks_expect(&db.url(), &["verify"], 0);
}

/// A small deterministic generator (xorshift), so a failure replays with its seed.
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn upto(&mut self, n: u64) -> u64 {
        self.next() % n + 1
    }
    fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str {
        xs[(self.next() % xs.len() as u64) as usize]
    }
}

/// One random write over the seed-004 tables; ids may not exist, FKs may fail: both
/// databases must fail alike.
fn random_write(g: &mut Gen) -> String {
    let c = g.upto(30);
    let s = g.upto(60);
    let n = g.next() % 1000;
    match g.next() % 14 {
        0 => format!("INSERT INTO mcp_connectors (name) VALUES ('gen{n}')"),
        1 => format!(
            "INSERT INTO connector_access (connector_id, user_id) VALUES ({c}, 'u{n}'), ({}, 'v{n}')",
            g.upto(30)
        ),
        2 => format!(
            "INSERT INTO mcp_servers (connector_id, name, status) VALUES ({}, 's{n}', {})",
            g.pick(&[
                "NULL",
                &c.to_string(),
                &format!("{c} * 1"),
                "(SELECT max(id) FROM mcp_connectors)"
            ]),
            g.pick(&["NULL", "'up'", "DEFAULT"])
        ),
        3 => format!("INSERT INTO mcp_servers VALUES (DEFAULT, {c}, 'pos{n}', 'x')"),
        4 => format!(
            "INSERT INTO mcp_server_tokens (mcp_server_id, token) SELECT id, 't' || id FROM mcp_servers WHERE id % 7 = {} ORDER BY id LIMIT 3",
            n % 7
        ),
        5 => format!(
            "INSERT INTO mcp_server_tools (mcp_server_id, tool_name) VALUES ({s}, 'tool{}') ON CONFLICT (mcp_server_id, tool_name) DO UPDATE SET mcp_server_id = {}",
            n % 5,
            g.upto(60)
        ),
        6 => format!(
            "UPDATE mcp_servers SET connector_id = {} WHERE id = {s}",
            g.pick(&["NULL", &c.to_string(), "connector_id + 1"])
        ),
        7 => {
            format!("UPDATE mcp_server_tools SET mcp_server_id = mcp_server_id + 1 WHERE id = {s}")
        }
        8 => format!(
            "UPDATE connector_access a SET connector_id = c.id FROM mcp_connectors c WHERE c.id = {c} AND a.id = {}",
            g.upto(40)
        ),
        9 => format!("DELETE FROM mcp_server_tokens WHERE id = {}", g.upto(80)),
        10 => format!("DELETE FROM mcp_server_tools WHERE mcp_server_id = {s}"),
        11 => format!("DELETE FROM mcp_connectors WHERE id = {c}"),
        12 => format!(
            "WITH x AS (INSERT INTO mcp_servers (connector_id, name) VALUES ({c}, 'w{n}') RETURNING id) INSERT INTO mcp_server_tokens (mcp_server_id, token) SELECT id, 'wt' FROM x"
        ),
        _ => format!(
            "MERGE INTO mcp_server_tools t USING (VALUES ({s}, 'm{}')) AS v(sid, tool) ON t.tool_name = v.tool WHEN MATCHED THEN UPDATE SET mcp_server_id = v.sid WHEN NOT MATCHED THEN INSERT (mcp_server_id, tool_name) VALUES (v.sid, v.tool)",
            n % 9
        ),
    }
}

#[tokio::test]
async fn differential_random_writes_direct_versus_through_keyshift() {
    let (db, twin, p) = setup().await;
    let c = common::connect(&p.url("postgres", &db.name)).await;
    let t = twin.client().await;
    let direct = db.client().await;
    let seed = std::env::var("KEYSHIFT_DIFF_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_f00d_u64);
    let mut g = Gen(seed);
    let statements = 2000;
    let mut failed = 0;
    for i in 0..statements {
        let sql = random_write(&mut g);
        // Half of them as prepared statements (extended protocol), half as simple queries.
        let (a, b) = if i % 2 == 0 {
            (
                c.execute(sql.as_str(), &[]).await,
                t.execute(sql.as_str(), &[]).await,
            )
        } else {
            let f = |r: Result<Vec<SimpleQueryMessage>, tokio_postgres::Error>| {
                r.map(|m| {
                    m.iter()
                        .filter(|x| matches!(x, SimpleQueryMessage::CommandComplete(_)))
                        .count() as u64
                })
            };
            (f(c.simple_query(&sql).await), f(t.simple_query(&sql).await))
        };
        match (&a, &b) {
            (Ok(x), Ok(y)) => assert_eq!(x, y, "seed {seed} #{i}: {sql}"),
            (Err(x), Err(y)) => {
                failed += 1;
                assert_eq!(
                    x.code(),
                    y.code(),
                    "seed {seed} #{i}: {sql}\nkeyshift: {x:?}\ndirect: {y:?}"
                );
            }
            _ => panic!("seed {seed} #{i}: {sql}\nthrough keyshift: {a:?}\ndirect: {b:?}"),
        }
        if i % 250 == 0 || std::env::var("KEYSHIFT_DIFF_EVERY").is_ok() {
            let bad = inconsistent(&direct).await;
            assert!(bad.is_empty(), "seed {seed} after #{i} ({sql}): {bad:?}");
        }
    }
    assert!(
        failed < statements / 2,
        "too many statements failed ({failed}) for the test to mean much"
    );
    let bad = inconsistent(&direct).await;
    assert!(bad.is_empty(), "{bad:?}");
    assert_same_application_columns(&direct, &t, &format!(" (seed {seed})")).await;
    ks_expect(&db.url(), &["verify"], 0);
    // Nothing was passed through unrewritten (every reason is exported from the start, at 0).
    let (_, m) = http(p.admin, "GET", "/metrics", None);
    let skipped: Vec<&str> = m
        .lines()
        .filter(|l| l.starts_with("keyshift_rewrite_skipped_total{") && !l.ends_with(" 0"))
        .collect();
    assert!(skipped.is_empty(), "{skipped:?}");
}

#[tokio::test]
async fn psql_variables_and_pgbench_prepared_inserts_keep_the_twins_right() {
    let (db, _twin, p) = setup().await;
    let direct = db.client().await;
    let port = p.addr.port().to_string();
    // A person at psql, with variables and \gset.
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("by_hand.sql");
    std::fs::write(
        &script,
        "\\set conn 4\n\
         INSERT INTO mcp_servers (connector_id, name) VALUES (:conn, 'by hand') RETURNING id AS new_server \\gset\n\
         INSERT INTO mcp_server_tokens (mcp_server_id, token) VALUES (:new_server, :'conn');\n\
         UPDATE mcp_servers SET connector_id = :conn + 1 WHERE id = :new_server;\n\
         SELECT count(*) FROM mcp_server_tokens WHERE mcp_server_id = :new_server;\n",
    )
    .unwrap();
    let out = std::process::Command::new(common::pg_tool("psql"))
        .args(["-X", "-At", "-q", "-v", "ON_ERROR_STOP=1"])
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "postgres",
            "-d",
            &db.name,
        ])
        .arg("-f")
        .arg(&script)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1");
    // pgbench with a custom insert script, prepared protocol, several clients.
    let bench = dir.path().join("inserts.sql");
    std::fs::write(
        &bench,
        "\\set c random(1, 20)\n\\set s random(1, 40)\n\
         INSERT INTO mcp_servers (connector_id, name) VALUES (:c, 'bench');\n\
         INSERT INTO mcp_server_tokens (mcp_server_id, token) VALUES (:s, 'tok');\n\
         UPDATE mcp_server_tools SET mcp_server_id = :s WHERE id = :c;\n",
    )
    .unwrap();
    // Prepared statements, then the unnamed statement of `-M extended`, which keyshift
    // prepares for each session itself after the second use.
    for (round, mode) in ["prepared", "extended"].iter().enumerate() {
        let bench = bench.to_string_lossy();
        let text = common::pgbench(
            p.addr.port(),
            &db.name,
            &[
                "-n", "-M", mode, "-c", "4", "-j", "2", "-t", "200", "-f", &bench,
            ],
        );
        assert!(
            text.contains("number of failed transactions: 0"),
            "{mode}: {text}"
        );
        let n: i64 = direct
            .query_one("SELECT count(*) FROM mcp_servers WHERE name = 'bench'", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 800 * (round as i64 + 1), "{mode}");
    }
    let bad = inconsistent(&direct).await;
    assert!(bad.is_empty(), "{bad:?}");
}

// ------------------------------------------------------------------------------------------
// Unnamed statements (src/proxy/server_statements.rs): keyshift prepares a rewritten text that
// a session sends again under a name of its own. The client must not be able to tell: the
// same script of raw extended-protocol messages gets the same answers through keyshift as
// from PostgreSQL directly on the twin.

mod wire {
    use std::io::{Read, Write};
    use std::net::TcpStream;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    fn cstr(v: &mut Vec<u8>, s: &str) {
        v.extend_from_slice(s.as_bytes());
        v.push(0);
    }

    pub fn parse(name: &str, sql: &str) -> Vec<u8> {
        let mut b = Vec::new();
        cstr(&mut b, name);
        cstr(&mut b, sql);
        b.extend_from_slice(&0u16.to_be_bytes());
        msg(b'P', &b)
    }

    /// Bind of the unnamed portal to `stmt`, text parameters, text results.
    pub fn bind(stmt: &str, params: &[&str]) -> Vec<u8> {
        let mut b = Vec::new();
        cstr(&mut b, "");
        cstr(&mut b, stmt);
        b.extend_from_slice(&0u16.to_be_bytes());
        b.extend_from_slice(&(params.len() as u16).to_be_bytes());
        for p in params {
            b.extend_from_slice(&(p.len() as u32).to_be_bytes());
            b.extend_from_slice(p.as_bytes());
        }
        b.extend_from_slice(&0u16.to_be_bytes());
        msg(b'B', &b)
    }

    pub fn describe(kind: u8, name: &str) -> Vec<u8> {
        let mut b = vec![kind];
        cstr(&mut b, name);
        msg(b'D', &b)
    }

    pub fn execute() -> Vec<u8> {
        msg(b'E', &[0, 0, 0, 0, 0])
    }

    pub fn sync() -> Vec<u8> {
        msg(b'S', &[])
    }

    pub fn query(sql: &str) -> Vec<u8> {
        let mut b = Vec::new();
        cstr(&mut b, sql);
        msg(b'Q', &b)
    }

    /// Parse, Bind, Describe, Execute, Sync of `sql` through the unnamed statement.
    pub fn unnamed(sql: &str, params: &[&str]) -> Vec<u8> {
        [
            parse("", sql),
            bind("", params),
            describe(b'P', ""),
            execute(),
            sync(),
        ]
        .concat()
    }

    /// Sends `bytes`, then reads until `readies` ReadyForQuery messages came back; returns
    /// what the client saw, one line per message: the tag, and what a driver acts on
    /// (SQLSTATE, command tag, row values, column names, parameter types, status).
    pub fn exchange(s: &mut TcpStream, bytes: &[u8], readies: usize) -> Vec<String> {
        s.write_all(bytes).unwrap();
        let mut out = Vec::new();
        let mut seen = 0;
        while seen < readies {
            let mut hdr = [0u8; 5];
            s.read_exact(&mut hdr).unwrap();
            let len = u32::from_be_bytes([hdr[1], hdr[2], hdr[3], hdr[4]]) as usize;
            let mut body = vec![0u8; len - 4];
            s.read_exact(&mut body).unwrap();
            let tag = hdr[0] as char;
            let line = match hdr[0] {
                b'E' => {
                    let code = body
                        .split(|&b| b == 0)
                        .find(|f| f.first() == Some(&b'C'))
                        .map(|f| String::from_utf8_lossy(&f[1..]).into_owned());
                    format!("E {}", code.unwrap_or_default())
                }
                b'C' | b'D' | b't' => format!("{tag} {:?}", String::from_utf8_lossy(&body)),
                b'T' => {
                    // Column names only: table OIDs differ between the two databases.
                    let n = u16::from_be_bytes([body[0], body[1]]) as usize;
                    let mut names = Vec::new();
                    let mut f = &body[2..];
                    for _ in 0..n {
                        let end = f.iter().position(|&b| b == 0).unwrap();
                        names.push(String::from_utf8_lossy(&f[..end]).into_owned());
                        f = &f[end + 1 + 18..];
                    }
                    format!("T {}", names.join(","))
                }
                b'Z' => {
                    seen += 1;
                    format!("Z {}", body[0] as char)
                }
                b'N' | b'S' => continue,
                _ => tag.to_string(),
            };
            out.push(line);
        }
        out
    }
}

/// Steps of raw messages: (name, bytes, ReadyForQuery messages they end with).
type Script = Vec<(String, Vec<u8>, usize)>;

/// Runs `script` through keyshift (`via`) and directly on the twin (`plain`), asserting that
/// the client sees the same at every step. After the step named "insert 6", counts the
/// statements named `prefix%` that keyshift prepared in its session, and returns that count.
fn side_by_side(
    via: &mut std::net::TcpStream,
    plain: &mut std::net::TcpStream,
    script: &Script,
    prefix: &str,
) -> i64 {
    let count = format!(
        "SELECT 'n=' || count(*) || ';' FROM pg_prepared_statements WHERE name LIKE '{prefix}%'"
    );
    let mut prepared = -1;
    for (step, bytes, readies) in script {
        let a = wire::exchange(via, bytes, *readies);
        let b = wire::exchange(plain, bytes, *readies);
        assert_eq!(
            a, b,
            "step {step:?}: keyshift (left) and PostgreSQL (right) differ"
        );
        if step == "insert 6" {
            let n = wire::exchange(via, &wire::query(&count), 1);
            prepared = n
                .iter()
                .find_map(|l| l.split("n=").nth(1)?.split(';').next()?.parse().ok())
                .unwrap_or(-1);
            // The same round trip on the twin keeps both sessions in step.
            wire::exchange(plain, &wire::query("SELECT 1"), 1);
        }
    }
    prepared
}

/// Waits until the proxy's metrics count at least `n` executions that reused a statement.
/// A session's counters reach the registry when it ends (or every 500 ms).
async fn wait_reused(admin: std::net::SocketAddr, n: f64) {
    let start = Instant::now();
    loop {
        let (_, metrics) = http(admin, "GET", "/metrics", None);
        let reused = metrics
            .lines()
            .find(|l| l.starts_with("keyshift_server_statements_total{event=\"reused\"}"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        if reused >= n {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "executions reusing a statement: {reused}, expected {n}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn unnamed_statements_are_prepared_once_and_answer_as_postgresql() {
    let (db, twin, p) = setup().await;
    let direct = db.client().await;
    let server = common::server();
    let twin_addr: std::net::SocketAddr = format!("127.0.0.1:{}", server.port).parse().unwrap();
    let mut via = common::proxy::raw_session(p.addr, &db.name);
    let mut plain = common::proxy::raw_session(twin_addr, &twin.name);
    let insert =
        "INSERT INTO mcp_server_tokens (mcp_server_id, token) VALUES ($1, $2) RETURNING id, token";
    let bad_column = "INSERT INTO mcp_server_tokens (mcp_server_id, no_such) VALUES ($1, $2)";
    let mut script: Script = Vec::new();
    for i in 1..=6 {
        let sid = i.to_string();
        script.push((
            format!("insert {i}"),
            wire::unnamed(insert, &[&sid, "tok"]),
            1,
        ));
    }
    script.push((
        "describe the unnamed statement".into(),
        [
            wire::parse("", insert),
            wire::describe(b'S', ""),
            wire::sync(),
        ]
        .concat(),
        1,
    ));
    for i in 0..3 {
        script.push((
            format!("fk violation {i}"),
            wire::unnamed(insert, &["99999", "tok"]),
            1,
        ));
        script.push((
            format!("parse error {i}"),
            wire::unnamed(bad_column, &["1", "x"]),
            1,
        ));
    }
    script.push((
        "a pipeline of three".into(),
        [
            wire::unnamed(insert, &["7", "p1"]),
            wire::unnamed(insert, &["8", "p2"]),
            wire::unnamed(insert, &["9", "p3"]),
        ]
        .concat(),
        3,
    ));
    script.push((
        "bind after a simple query dropped the unnamed statement".into(),
        [
            wire::parse("", insert),
            wire::sync(),
            wire::query("SELECT 1"),
            wire::bind("", &["1", "x"]),
            wire::execute(),
            wire::sync(),
        ]
        .concat(),
        3,
    ));
    script.push((
        "a failed transaction".into(),
        [
            wire::query("BEGIN"),
            wire::unnamed(insert, &["10", "tx"]),
            wire::unnamed(insert, &["99999", "tx"]),
            wire::unnamed(insert, &["11", "tx"]),
            wire::query("ROLLBACK"),
        ]
        .concat(),
        5,
    ));
    script.push((
        "deallocate all".into(),
        [
            wire::query("DEALLOCATE ALL"),
            wire::unnamed(insert, &["12", "after"]),
            wire::unnamed(insert, &["13", "after"]),
            wire::unnamed(insert, &["14", "after"]),
        ]
        .concat(),
        4,
    ));
    let prepared_seen = side_by_side(&mut via, &mut plain, &script, "keyshift\\_%\\_s");
    assert_eq!(
        prepared_seen, 1,
        "one statement of keyshift's on the server after six executions of one text"
    );
    drop(via);
    drop(plain);
    wait_reused(p.admin, 4.0).await;
    let bad = inconsistent(&direct).await;
    assert!(bad.is_empty(), "{bad:?}");
    assert_same_application_columns(&direct, &twin.client().await, " after unnamed statements")
        .await;
}

#[tokio::test]
async fn simple_query_shapes_are_prepared_once_and_answer_as_postgresql() {
    let (db, twin, p) = setup().await;
    let direct = db.client().await;
    let server = common::server();
    let twin_addr: std::net::SocketAddr = format!("127.0.0.1:{}", server.port).parse().unwrap();
    let mut via = common::proxy::raw_session(p.addr, &db.name);
    let mut plain = common::proxy::raw_session(twin_addr, &twin.name);
    let insert = |sid: &str, token: &str| {
        wire::query(&format!(
            "INSERT INTO mcp_server_tokens (mcp_server_id, token) VALUES ({sid}, {token}) RETURNING id, mcp_server_id, token"
        ))
    };
    let mut script: Script = Vec::new();
    for i in 1..=6 {
        script.push((format!("insert {i}"), insert(&i.to_string(), "'tok'"), 1));
    }
    // Once the shape runs as EXECUTE: literals that are not the column's type, and errors.
    for (step, sid, token) in [
        ("a numeric literal into the integer FK", "7.6", "'x'"),
        ("a quoted number into the integer FK", "'9'", "'y'"),
        ("a number into the text column", "10", "11"),
        ("a quote inside a string", "12", "'it''s'"),
        ("fk violation", "99999", "'x'"),
        ("invalid input", "'abc'", "'x'"),
        ("integer out of range", "99999999999", "'x'"),
        ("null into a not-null column", "13", "NULL"),
    ] {
        script.push((step.into(), insert(sid, token), 1));
    }
    script.push((
        "three rows".into(),
        wire::query(
            "INSERT INTO mcp_server_tokens (mcp_server_id, token) VALUES (14, 'a'), (15, 'b'), (16, 'c')",
        ),
        1,
    ));
    script.push((
        "a pipeline of three".into(),
        [
            insert("17", "'p'"),
            insert("99999", "'p'"),
            insert("18", "'p'"),
        ]
        .concat(),
        3,
    ));
    script.push((
        "a failed transaction".into(),
        [
            wire::query("BEGIN"),
            insert("19", "'tx'"),
            insert("99999", "'tx'"),
            insert("20", "'tx'"),
            wire::query("ROLLBACK"),
        ]
        .concat(),
        5,
    ));
    script.push((
        "a committed transaction".into(),
        [
            wire::query("BEGIN"),
            insert("21", "'tx'"),
            insert("22", "'tx'"),
            wire::query("COMMIT"),
        ]
        .concat(),
        4,
    ));
    script.push((
        "deallocate all".into(),
        [
            wire::query("DEALLOCATE ALL"),
            insert("23", "'after'"),
            insert("24", "'after'"),
            insert("25", "'after'"),
        ]
        .concat(),
        4,
    ));
    let prepared_seen = side_by_side(&mut via, &mut plain, &script, "keyshift\\_%\\_q");
    assert_eq!(
        prepared_seen, 1,
        "one statement of keyshift's on the server after six texts of one shape"
    );
    drop(via);
    drop(plain);
    wait_reused(p.admin, 10.0).await;
    let bad = inconsistent(&direct).await;
    assert!(bad.is_empty(), "{bad:?}");
    assert_same_application_columns(&direct, &twin.client().await, " after simple queries").await;
}
