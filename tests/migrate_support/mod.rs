//! Helpers shared by the `migrate_*` tests: the seed-shaped schemas, running the real binary,
//! schema dumps. Built on the shared harness in `tests/common`.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output};

use crate::common;

/// Shaped like seed 004: 5 tables, the dependency tree of its guide (shared with the demo).
#[allow(unused_imports)] // not every test binary uses every seed
pub use keyshift::demo::seed::SEED_004;

/// Rows for SEED_004: `n` connectors, 2n servers, 2n tokens, 2n tools, n access rows.
pub fn seed_004_rows(n: i64) -> String {
    format!(
        "INSERT INTO mcp_connectors (name) SELECT 'c' || g FROM generate_series(1, {n}) g;
         INSERT INTO connector_access (connector_id, user_id) SELECT g, 'u' || g FROM generate_series(1, {n}) g;
         INSERT INTO mcp_servers (connector_id, name) SELECT (g % {n}) + 1, 's' || g FROM generate_series(1, 2 * {n}) g;
         INSERT INTO mcp_server_tokens (mcp_server_id, token) SELECT g, md5(g::text) FROM generate_series(1, 2 * {n}) g;
         INSERT INTO mcp_server_tools (mcp_server_id, tool_name) SELECT g, 't' || g FROM generate_series(1, 2 * {n}) g;"
    )
}

/// Seed 004's foreign keys: (child, fk column, parent)
pub const SEED_004_FKS: &[(&str, &str, &str)] = &[
    ("connector_access", "connector_id", "mcp_connectors"),
    ("mcp_servers", "connector_id", "mcp_connectors"),
    ("mcp_server_tokens", "mcp_server_id", "mcp_servers"),
    ("mcp_server_tools", "mcp_server_id", "mcp_servers"),
];

/// Seed 004's child rows whose twin disagrees with the parent's uuid (or is missing), over every FK.
pub async fn inconsistent(c: &tokio_postgres::Client) -> Vec<String> {
    twins_disagreeing(c, "uuid").await
}

/// After the cutover: seed 004's child rows whose legacy integer twin disagrees with the
/// parent's legacy id (or is missing), over every FK; the reverse dual-write's check.
pub async fn inconsistent_after_cutover(c: &tokio_postgres::Client) -> Vec<String> {
    twins_disagreeing(c, "legacy").await
}

/// Rows whose `<fk>_<suffix>` is not their parent's `id_<suffix>`, the parent found by `<fk>`.
async fn twins_disagreeing(c: &tokio_postgres::Client, suffix: &str) -> Vec<String> {
    let mut bad = Vec::new();
    for (child, fk, parent) in SEED_004_FKS {
        let sql = format!(
            "SELECT c.id::text FROM {child} c LEFT JOIN {parent} p ON p.id = c.{fk}
             WHERE c.{fk}_{suffix} IS DISTINCT FROM p.id_{suffix} ORDER BY c.id"
        );
        for r in c.query(&sql, &[]).await.unwrap() {
            bad.push(format!("{child}.{fk} row {}", r.get::<_, String>(0)));
        }
    }
    bad
}

/// Shaped like seed 000: the 15 tables its guide lists, with the FKs its text describes.
pub const SEED_000: &str = "
CREATE TABLE report_definitions (id serial PRIMARY KEY, name text NOT NULL, query jsonb);
CREATE TABLE report_templates (id serial PRIMARY KEY, name text NOT NULL);
CREATE TABLE report_executions (id bigserial PRIMARY KEY,
    report_definition_id integer NOT NULL REFERENCES report_definitions (id) ON DELETE CASCADE, status text);
CREATE INDEX ix_report_executions_report_definition_id ON report_executions (report_definition_id);
CREATE TABLE report_schedules (id serial PRIMARY KEY,
    report_definition_id integer NOT NULL REFERENCES report_definitions (id) ON DELETE CASCADE, cron text);
CREATE TABLE report_cache (id serial PRIMARY KEY,
    report_definition_id integer REFERENCES report_definitions (id) ON DELETE SET NULL, payload bytea);
CREATE TABLE dashboards (id serial PRIMARY KEY, title text NOT NULL);
CREATE TABLE dashboard_pages (id serial PRIMARY KEY,
    dashboard_id integer NOT NULL REFERENCES dashboards (id) ON DELETE CASCADE, position int NOT NULL);
CREATE INDEX ix_dashboard_pages_dashboard_id ON dashboard_pages (dashboard_id, position);
CREATE TABLE dashboard_widgets (id serial PRIMARY KEY,
    page_id integer NOT NULL REFERENCES dashboard_pages (id) ON DELETE CASCADE,
    report_definition_id integer REFERENCES report_definitions (id) ON DELETE SET NULL, kind text);
CREATE INDEX ix_dashboard_widgets_page_id ON dashboard_widgets (page_id);
CREATE TABLE dashboard_shares (id serial PRIMARY KEY,
    dashboard_id integer NOT NULL REFERENCES dashboards (id) ON DELETE CASCADE, grantee text NOT NULL,
    UNIQUE (dashboard_id, grantee));
CREATE TABLE dashboard_snapshots (id serial PRIMARY KEY,
    dashboard_id integer NOT NULL REFERENCES dashboards (id) ON DELETE CASCADE, taken_at timestamptz);
CREATE TABLE widget_data_cache (id serial PRIMARY KEY,
    widget_id integer NOT NULL REFERENCES dashboard_widgets (id) ON DELETE CASCADE, data jsonb);
CREATE TABLE scheduler_configs (id serial PRIMARY KEY, name text NOT NULL);
CREATE TABLE scheduler_jobs (id serial PRIMARY KEY,
    config_id integer NOT NULL REFERENCES scheduler_configs (id) ON DELETE RESTRICT, name text);
CREATE INDEX ix_scheduler_jobs_config_id ON scheduler_jobs (config_id);
CREATE TABLE scheduler_job_executions (id bigserial PRIMARY KEY,
    job_id integer NOT NULL REFERENCES scheduler_jobs (id) ON DELETE CASCADE ON UPDATE CASCADE, started_at timestamptz);
CREATE TABLE scheduler_job_logs (id bigserial PRIMARY KEY,
    execution_id bigint NOT NULL REFERENCES scheduler_job_executions (id) ON DELETE CASCADE, line text);
";

/// The awkward cases: quoted mixed-case names in a non-public schema, an identity key, a bigint
/// FK to an int key, a nullable self-reference ON DELETE SET NULL, a child without an integer key.
pub const EDGE: &str = r#"
CREATE SCHEMA "App";
CREATE TABLE "App"."Accounts" ("ID" integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY, "Name" text);
CREATE TABLE "App".nodes (id bigserial PRIMARY KEY,
    "Account_Id" bigint NOT NULL REFERENCES "App"."Accounts" ("ID") ON DELETE CASCADE,
    parent_id bigint REFERENCES "App".nodes (id) ON DELETE SET NULL,
    label text);
CREATE INDEX "Nodes_Account_idx" ON "App".nodes ("Account_Id", label DESC);
CREATE TABLE "App".tags (tag text PRIMARY KEY, node_id bigint REFERENCES "App".nodes (id) ON DELETE SET NULL);
INSERT INTO "App"."Accounts" ("Name") SELECT 'a' || g FROM generate_series(1, 40) g;
INSERT INTO "App".nodes ("Account_Id", label) SELECT (g % 40) + 1, 'n' || g FROM generate_series(1, 300) g;
UPDATE "App".nodes SET parent_id = id - 1 WHERE id % 3 <> 1;
INSERT INTO "App".tags SELECT 'tag' || g, CASE WHEN g % 5 = 0 THEN NULL ELSE g END FROM generate_series(1, 200) g;
"#;

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_keyshift"))
}

/// [`ks`] from async tests, on the blocking pool, so that the test's own runtime keeps
/// driving the clients and proxies the command waits for.
pub async fn ks_async(url: &str, args: &[&str]) -> Output {
    let url = url.to_string();
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        ks(&url, &a)
    })
    .await
    .expect("keyshift runner")
}

/// Runs `keyshift <args>` against `url`, with no config file or KEYSHIFT_* from the outside.
pub fn ks(url: &str, args: &[&str]) -> Output {
    let mut cmd = Command::new(bin());
    for (k, _) in std::env::vars() {
        if k.starts_with("KEYSHIFT_") {
            cmd.env_remove(k);
        }
    }
    cmd.args(args)
        .arg("--database-url")
        .arg(url)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run keyshift")
}

/// Starts `keyshift <args>` against `url` in the background, output discarded: for tests
/// that kill it (SIGKILL) or look at the database while it runs.
pub fn spawn_ks(url: &str, args: &[&str]) -> std::process::Child {
    Command::new(bin())
        .args(args)
        .arg("--database-url")
        .arg(url)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn keyshift")
}

pub fn text(o: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs and asserts the exit code.
/// `keyshift cutover --by-table` that gives up quickly on a group it cannot lock: how the
/// tests stop one halfway, behind a session holding a table (a group whose locks do not
/// come with the gates open is tried under a pause of its own, which cannot drain a direct
/// session either, and gives up after `--budget`).
pub const BY_TABLE_GIVING_UP: [&str; 6] = [
    "cutover",
    "--by-table",
    "--lock-timeout",
    "100ms",
    "--budget",
    "1s",
];

/// A direct session (the proxies cannot drain it) inside a transaction that holds `table`:
/// every group of a cutover table by table that must lock it waits, until it is dropped or
/// rolls back.
pub async fn holding(db: &common::TestDb, table: &str) -> tokio_postgres::Client {
    let c = db.client().await;
    c.batch_execute(&format!("BEGIN; LOCK TABLE {table} IN ACCESS SHARE MODE"))
        .await
        .expect("lock");
    c
}

pub fn ks_expect(url: &str, args: &[&str], code: i32) -> Output {
    let o = ks(url, args);
    assert_eq!(
        o.status.code(),
        Some(code),
        "keyshift {args:?}\n{}",
        text(&o)
    );
    o
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `pg_dump --schema-only` of the test database.
pub fn schema_dump(db: &common::TestDb) -> String {
    let o = Command::new(common::pg_tool("pg_dump"))
        .args(["--schema-only", "--no-owner", "-d", &db.url()])
        .output()
        .expect("run pg_dump");
    assert!(
        o.status.success(),
        "pg_dump: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    // PostgreSQL 15.14+ wraps the dump in \restrict <random key>: not part of the schema.
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter(|l| !l.starts_with("\\restrict") && !l.starts_with("\\unrestrict"))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// Compares with `tests/golden/<name>`; `UPDATE_GOLDEN=1` rewrites the file instead.
pub fn golden(name: &str, actual: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var("UPDATE_GOLDEN").is_ok_and(|v| v == "1") {
        std::fs::write(&path, actual).expect("write golden file");
        return;
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|_| {
        panic!(
            "missing golden file {}; run with UPDATE_GOLDEN=1 to create it",
            path.display()
        )
    });
    if want != actual {
        let diff: Vec<String> = want
            .lines()
            .zip(actual.lines())
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .take(5)
            .map(|(i, (a, b))| format!("line {}:\n  want: {a}\n  got:  {b}", i + 1))
            .collect();
        panic!(
            "{name} differs from the golden file ({} vs {} lines); UPDATE_GOLDEN=1 regenerates it after review\n{}",
            want.lines().count(),
            actual.lines().count(),
            diff.join("\n")
        );
    }
}

pub async fn count(c: &tokio_postgres::Client, sql: &str) -> i64 {
    c.query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}
