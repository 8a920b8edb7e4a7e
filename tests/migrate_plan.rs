//! `keyshift plan`: golden plans for the seed-shaped schemas, every blocker, config errors.
mod common;
mod migrate_support;

use migrate_support::*;

async fn db_with(sql: &str) -> common::TestDb {
    let db = common::TestDb::new().await;
    db.client().await.batch_execute(sql).await.expect("schema");
    db
}

#[tokio::test]
async fn seed_004_plan_matches_golden() {
    let db = db_with(SEED_004).await;
    let o = ks_expect(&db.url(), &["plan", "--sql"], 0);
    golden("plan_seed_004.txt", &stdout(&o));
    let o = ks_expect(&db.url(), &["plan", "--format", "json"], 0);
    golden("plan_seed_004.json", &stdout(&o));
    // The order of the guide's dependency tree.
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let names: Vec<&str> = v["tables"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "mcp_connectors",
            "connector_access",
            "mcp_servers",
            "mcp_server_tokens",
            "mcp_server_tools"
        ]
    );
}

#[tokio::test]
async fn seed_000_plan_matches_golden() {
    let db = db_with(SEED_000).await;
    let o = ks_expect(&db.url(), &["plan"], 0);
    golden("plan_seed_000.txt", &stdout(&o));
    let o = ks_expect(&db.url(), &["plan", "--format", "json"], 0);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["tables"].as_array().unwrap().len(), 15);
    let fks: usize = v["tables"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["referenced_by"].as_array().unwrap().len())
        .sum();
    assert_eq!(fks, 12);
}

#[tokio::test]
async fn selection_flags() {
    let db = db_with(SEED_004).await;
    let o = ks_expect(
        &db.url(),
        &[
            "plan",
            "--format",
            "json",
            "--exclude",
            "mcp_server_tools",
            "--exclude",
            "connector_access",
        ],
        0,
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["tables"].as_array().unwrap().len(), 3);
    // Children whose own key is excluded still get their twin column.
    let servers = v["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "mcp_servers")
        .unwrap();
    assert!(
        servers["referenced_by"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["child_table"] == "mcp_server_tools")
    );
    let o = ks_expect(
        &db.url(),
        &["plan", "--format", "json", "--table", "mcp_connectors"],
        0,
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["tables"].as_array().unwrap().len(), 1);
    let o = ks_expect(&db.url(), &["plan", "--schema", "nowhere"], 2);
    assert!(stdout(&o).contains("nothing-to-migrate"), "{}", text(&o));
}

/// One database per blocker: each must be reported on its own, with what to do, exit code 2,
/// and expand must refuse without touching the database.
#[tokio::test]
async fn every_blocker_is_reported() {
    let base = "CREATE TABLE p (id serial PRIMARY KEY, code text UNIQUE, n int);
                CREATE TABLE c (id serial PRIMARY KEY, p_id int REFERENCES p (id), x int);";
    let cases: &[(&str, &str)] = &[
        (
            "composite-fk",
            "ALTER TABLE p ADD UNIQUE (id, n); CREATE TABLE cc (a int, b int, FOREIGN KEY (a, b) REFERENCES p (id, n));",
        ),
        // The FK was made while only a unique constraint existed; it keeps using that index.
        (
            "fk-to-non-key-unique",
            "CREATE TABLE q (id int NOT NULL UNIQUE); CREATE TABLE cu (a int REFERENCES q (id)); ALTER TABLE q ADD PRIMARY KEY (id);",
        ),
        (
            "partitioned-table",
            "CREATE TABLE pt (id int PRIMARY KEY, v int) PARTITION BY RANGE (id); CREATE TABLE pt1 PARTITION OF pt FOR VALUES FROM (0) TO (10);",
        ),
        (
            "inherited-table",
            "CREATE TABLE base (id serial PRIMARY KEY); CREATE TABLE sub (extra int) INHERITS (base);",
        ),
        (
            "update-rule",
            "CREATE TABLE log (n int); CREATE RULE r AS ON UPDATE TO c DO ALSO INSERT INTO log VALUES (1);",
        ),
        (
            "dependent-function",
            "CREATE FUNCTION cnt() RETURNS bigint LANGUAGE sql BEGIN ATOMIC SELECT count(p_id) FROM c; END;",
        ),
        ("name-collision", "ALTER TABLE c ADD COLUMN p_id_uuid uuid;"),
        // keyshift_integer_ (17 bytes) + 47 bytes: the view schema would not fit in 63.
        (
            "view-schema-name-too-long",
            "CREATE SCHEMA a_schema_name_of_forty_seven_bytes_xxxxxxxxxxxx;
             CREATE TABLE a_schema_name_of_forty_seven_bytes_xxxxxxxxxxxx.cc (p_id int REFERENCES p (id));",
        ),
    ];
    for (code, extra) in cases {
        let db = db_with(&format!("{base}{extra}")).await;
        let o = ks_expect(&db.url(), &["plan", "--format", "json"], 2);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout)
            .unwrap_or_else(|e| panic!("{code}: {e}\n{}", text(&o)));
        let blockers = v["blockers"].as_array().unwrap();
        assert!(
            blockers
                .iter()
                .any(|b| b["code"] == *code && !b["fix"].as_str().unwrap().is_empty()),
            "{code} not reported: {blockers:#?}"
        );
        let o = ks_expect(&db.url(), &["plan"], 2);
        assert!(
            stdout(&o).contains(&format!("[{code}]")) && stdout(&o).contains("what to do"),
            "{}",
            text(&o)
        );
        let o = ks_expect(&db.url(), &["expand"], 2);
        assert!(stderr(&o).contains("blocker"), "{}", text(&o));
        let n = count(
            &db.client().await,
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'keyshift'",
        )
        .await;
        assert_eq!(n, 0, "{code}: expand changed the database");
    }
    // The same base without extras is clean: the cases above are what blocks.
    let db = db_with(base).await;
    ks_expect(&db.url(), &["plan"], 0);
}

/// Views, rules, policies and triggers on migrated columns are carried through the swap
/// (src/migrate/carry.rs): listed, not refused.
#[tokio::test]
async fn what_the_swap_carries_is_a_warning() {
    let db = db_with(
        "CREATE TABLE p (id serial PRIMARY KEY, n int);
         CREATE TABLE c (id serial PRIMARY KEY, p_id int REFERENCES p (id));
         CREATE VIEW v AS SELECT id, p_id FROM c;
         CREATE MATERIALIZED VIEW mv AS SELECT id FROM p;
         CREATE TABLE log (p_id int);
         CREATE RULE r AS ON INSERT TO c DO ALSO INSERT INTO log VALUES (NEW.p_id);
         CREATE POLICY pol ON p USING (id IS NOT NULL);
         CREATE FUNCTION f() RETURNS trigger LANGUAGE plpgsql AS 'BEGIN RETURN NEW; END';
         CREATE TRIGGER trg BEFORE UPDATE OF p_id ON c FOR EACH ROW EXECUTE FUNCTION f();",
    )
    .await;
    let o = ks_expect(&db.url(), &["plan", "--format", "json"], 0);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let codes: Vec<&str> = v["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["code"].as_str().unwrap())
        .collect();
    for want in [
        "carried-view",
        "carried-materialized-view",
        "carried-rule",
        "carried-policy",
        "carried-trigger",
    ] {
        assert!(codes.contains(&want), "{want} missing from {codes:?}");
    }
}

#[tokio::test]
async fn publication_is_a_warning() {
    let db = db_with(&format!(
        "{SEED_004} CREATE PUBLICATION pub FOR TABLE mcp_servers;"
    ))
    .await;
    let o = ks_expect(&db.url(), &["plan", "--format", "json"], 0);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["warnings"][0]["code"], "publication");
}

#[test]
fn bad_configuration_exits_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("k.toml");
    std::fs::write(
        &cfg,
        "database_url = \"postgres://x@127.0.0.1:1/x\"\nuuid_version = 5\n",
    )
    .unwrap();
    let o = std::process::Command::new(bin())
        .args(["plan", "--config"])
        .arg(&cfg)
        .env_remove("KEYSHIFT_DATABASE_URL")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(stderr(&o).contains("`uuid_version`"), "{}", text(&o));
    let o = std::process::Command::new(bin())
        .args(["verify"])
        .env_remove("KEYSHIFT_DATABASE_URL")
        .env_remove("KEYSHIFT_CONFIG")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(stderr(&o).contains("`database_url`"), "{}", text(&o));
    std::fs::write(
        &cfg,
        "database_url = \"postgres://x@127.0.0.1:1/x\"\nbatchsize = 5\n",
    )
    .unwrap();
    let o = std::process::Command::new(bin())
        .args(["status", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(stderr(&o).contains("batchsize"), "{}", text(&o));
}

/// deploy/keyshift.toml documents every migration key, and its documented defaults parse
/// and resolve to the same values as no file at all.
#[test]
fn documented_migration_keys() {
    use keyshift::config::{DbArgs, FileConfig, MigrateConfig};
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/keyshift.toml"))
            .unwrap();
    let keys = [
        "database_url",
        "lock_timeout",
        "ddl_retries",
        "uuid_version",
        "schemas",
        "tables",
        "exclude",
        "uuid_suffix",
        "legacy_suffix",
        "batch_size",
        "max_rows_per_sec",
        "jobs",
    ];
    let mut uncommented = String::new();
    for key in keys {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("# {key} = ")))
            .unwrap_or_else(|| panic!("{key} is not documented in deploy/keyshift.toml"));
        uncommented.push_str(&line[2..]);
        uncommented.push('\n');
    }
    let file = FileConfig::parse(&uncommented).unwrap();
    let cfg = MigrateConfig::resolve(file, &DbArgs::default(), None, None).unwrap();
    let dflt = MigrateConfig::resolve(
        FileConfig::parse("database_url = \"postgres://postgres@127.0.0.1:5432/app\"").unwrap(),
        &DbArgs::default(),
        None,
        None,
    )
    .unwrap();
    assert_eq!(cfg.plan, dflt.plan);
    assert_eq!(cfg.settings.lock_timeout, dflt.settings.lock_timeout);
    assert_eq!(cfg.settings.batch_size, dflt.settings.batch_size);
    assert_eq!(cfg.settings.ddl_retries, dflt.settings.ddl_retries);
}
