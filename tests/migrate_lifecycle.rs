//! expand, backfill, harden, verify, status, abort against real PostgreSQL, plus the generated
//! cutover / rollback / finalize SQL run end to end (issue 5 will drive them; here they must
//! at least be valid and reach the seeds' end state).
mod common;
mod migrate_support;

use keyshift::migrate::{Settings, db, ddl, state};
use migrate_support::*;

async fn db_with(sql: &str) -> common::TestDb {
    let db = common::TestDb::new().await;
    db.client().await.batch_execute(sql).await.expect("schema");
    db
}

#[tokio::test]
async fn expand_and_abort_are_idempotent_and_abort_restores_the_schema() {
    let db = db_with(&format!("{SEED_004}{}", seed_004_rows(50))).await;
    let before = schema_dump(&db);
    ks_expect(&db.url(), &["expand"], 0);
    let c = db.client().await;
    let ddl_events = "SELECT count(*) FROM keyshift.events WHERE kind = 'ddl'";
    let n1 = count(&c, ddl_events).await;
    assert_eq!(
        n1, 29,
        "5 key columns, 5 defaults, 4 FK twins, the fill triggers of 4 children, the id_map view, 2 shape views per table"
    );
    ks_expect(&db.url(), &["expand"], 0);
    assert_eq!(
        count(&c, ddl_events).await,
        n1,
        "a second expand changes nothing"
    );
    let after_expand = schema_dump(&db);
    assert_ne!(before, after_expand);
    // New rows get a key uuid from the default; old rows wait for the backfill.
    c.batch_execute("INSERT INTO mcp_connectors (name) VALUES ('new')")
        .await
        .unwrap();
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM mcp_connectors WHERE id_uuid IS NOT NULL"
        )
        .await,
        1
    );
    let (_, phase) = state::load(&c).await.unwrap().unwrap();
    assert_eq!(phase, state::Phase::Expanded);
    // keyshift.uuid_v7(): version 7, RFC variant, time-ordered (the first 48 bits are ms).
    let r = c
        .query_one(
            "SELECT u::text, substr(u::text, 15, 1), substr(u::text, 20, 1),
                    abs(('x' || lpad(replace(substr(u::text, 1, 13), '-', ''), 16, '0'))::bit(64)::bigint
                        - (extract(epoch FROM clock_timestamp()) * 1000)::bigint)
               FROM (SELECT keyshift.uuid_v7() AS u) s",
            &[],
        )
        .await
        .unwrap();
    let (u, version, variant, skew): (String, String, String, i64) =
        (r.get(0), r.get(1), r.get(2), r.get(3));
    assert_eq!(version, "7", "{u}");
    assert!(["8", "9", "a", "b"].contains(&variant.as_str()), "{u}");
    assert!(skew < 5000, "{u}: timestamp {skew} ms off");

    ks_expect(&db.url(), &["backfill"], 0);
    ks_expect(&db.url(), &["verify"], 0);
    ks_expect(&db.url(), &["abort"], 0);
    assert_eq!(
        before,
        schema_dump(&db),
        "abort must restore the exact schema"
    );
    let o = ks_expect(&db.url(), &["abort"], 0);
    assert!(stderr(&o).contains("nothing to remove"), "{}", text(&o));
    assert_eq!(before, schema_dump(&db));
    // Abort right after an interrupted expand (schema only, no plan stored yet).
    c.batch_execute("CREATE SCHEMA keyshift").await.unwrap();
    ks_expect(&db.url(), &["abort"], 0);
    assert_eq!(before, schema_dump(&db));
}

#[tokio::test]
async fn abort_after_cutover_refuses() {
    let db = db_with(SEED_004).await;
    ks_expect(&db.url(), &["expand"], 0);
    db.client()
        .await
        .batch_execute("UPDATE keyshift.migration SET phase = 'cut_over'")
        .await
        .unwrap();
    let o = ks_expect(&db.url(), &["abort"], 1);
    assert!(stderr(&o).contains("keyshift rollback"), "{}", text(&o));
    let o = ks_expect(&db.url(), &["expand"], 1);
    assert!(stderr(&o).contains("cut_over"), "{}", text(&o));
}

/// Quoted mixed-case names in a non-public schema, an identity key, a bigint FK to an int key,
/// a nullable self-reference ON DELETE SET NULL, and a child with no integer key (ctid batches).
#[tokio::test]
async fn edge_schema_full_cycle() {
    let db = db_with(EDGE).await;
    let url = db.url();
    let o = ks_expect(&url, &["plan", "--schema", "App", "--format", "json"], 0);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let names: Vec<&str> = v["tables"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["Accounts", "nodes"],
        "tags has a text key: it only gets a twin"
    );
    ks_expect(&url, &["expand", "--schema", "App"], 0);
    // Views of each shape in quoted schemas, for the child without a key (tags) too.
    assert_eq!(
        count(
            &db.client().await,
            r#"SELECT count(*) FROM pg_class WHERE relkind = 'v'
                 AND relnamespace IN ('"keyshift_integer_App"'::regnamespace, '"keyshift_uuid_App"'::regnamespace)"#
        )
        .await,
        6
    );
    ks_expect(&url, &["backfill", "--batch-size", "7", "--jobs", "2"], 0);
    let o = ks_expect(&url, &["verify", "--format", "json"], 0);
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["passed"], true);
    assert!(r["checks"].as_array().unwrap().len() >= 15);

    let c = db.client().await;
    // bigint FK twin filled from the int key's uuid.
    assert_eq!(
        count(&c, r#"SELECT count(*) FROM "App".nodes n JOIN "App"."Accounts" a ON a."ID" = n."Account_Id" WHERE n."Account_Id_uuid" = a."ID_uuid""#).await,
        300
    );
    assert_eq!(count(&c, r#"SELECT count(*) FROM "App".nodes WHERE parent_id IS NOT NULL AND parent_id_uuid IS NULL"#).await, 0);
    assert_eq!(
        count(
            &c,
            r#"SELECT count(*) FROM "App".tags WHERE node_id IS NOT NULL AND node_id_uuid IS NULL"#
        )
        .await,
        0
    );
    assert_eq!(
        count(
            &c,
            r#"SELECT count(*) FROM "App".tags WHERE node_id IS NULL AND node_id_uuid IS NOT NULL"#
        )
        .await,
        0
    );
    // Shadow FKs carry the same actions.
    let actions: Vec<(String, String)> = c
        .query(
            r#"SELECT conname::text, confdeltype::text FROM pg_constraint WHERE contype = 'f'
               AND connamespace = '"App"'::regnamespace ORDER BY 1"#,
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    for (name, del) in &actions {
        if let Some(orig) = name.strip_suffix("_uuid") {
            let o = actions
                .iter()
                .find(|(n, _)| n == orig)
                .unwrap_or_else(|| panic!("{name} without {orig}"));
            assert_eq!(del, &o.1, "{name}");
        }
    }
    assert_eq!(actions.len(), 6, "{actions:?}");
    // The mirrored index keeps its other column and its DESC.
    let def: String = c
        .query_one(
            r#"SELECT pg_get_indexdef('"App"."Nodes_Account_idx_uuid"'::regclass)"#,
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(def.contains(r#"("Account_Id_uuid", label DESC)"#), "{def}");
    // ON DELETE SET NULL through both FKs; CASCADE through both.
    c.batch_execute(r#"DELETE FROM "App".nodes WHERE id = 2"#)
        .await
        .unwrap();
    assert_eq!(count(&c, r#"SELECT count(*) FROM "App".nodes WHERE id = 3 AND parent_id IS NULL AND parent_id_uuid IS NULL"#).await, 1);
    c.batch_execute(r#"DELETE FROM "App"."Accounts" WHERE "ID" = 5"#)
        .await
        .unwrap();
    assert_eq!(
        count(
            &c,
            r#"SELECT count(*) FROM "App".nodes WHERE "Account_Id" = 5"#
        )
        .await,
        0
    );
    ks_expect(&url, &["verify"], 0);

    // The generated cutover, rollback, cutover again and finalize run and reach the end state.
    let (plan, _) = state::load(&c).await.unwrap().unwrap();
    let s = Settings::default();
    for st in ddl::cutover(&plan) {
        db::run_step(&c, &st, &s)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let ty: String = c
        .query_one(r#"SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = '"App".nodes'::regclass AND attname = 'parent_id'"#, &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(ty, "uuid");
    assert_eq!(
        count(&c, r#"SELECT count(*) FROM pg_constraint WHERE conname = 'Accounts_pkey' AND conrelid = '"App"."Accounts"'::regclass
                     AND conkey = ARRAY[(SELECT attnum FROM pg_attribute WHERE attrelid = '"App"."Accounts"'::regclass AND attname = 'ID')]"#).await,
        1
    );
    // The application keeps writing in the UUID shape, and legacy integers are still filled.
    c.batch_execute(r#"INSERT INTO "App"."Accounts" ("Name") VALUES ('after')"#)
        .await
        .unwrap();
    assert_eq!(count(&c, r#"SELECT count(*) FROM "App"."Accounts" WHERE "Name" = 'after' AND "ID_legacy" IS NOT NULL"#).await, 1);
    let o = ks_expect(&url, &["abort"], 1);
    assert!(stderr(&o).contains("rollback"), "{}", text(&o));
    for st in ddl::rollback(&plan) {
        db::run_step(&c, &st, &s)
            .await
            .unwrap_or_else(|e| panic!("rollback: {e}"));
    }
    let ty: String = c
        .query_one(r#"SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = '"App".nodes'::regclass AND attname = 'parent_id'"#, &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(ty, "bigint");
    // Rollback left everything harden builds: harden has nothing to do.
    let o = ks_expect(&url, &["harden"], 0);
    assert!(stderr(&o).contains("(0 change(s))"), "{}", text(&o));
    ks_expect(&url, &["verify"], 0);
    for st in ddl::cutover(&plan) {
        db::run_step(&c, &st, &s)
            .await
            .unwrap_or_else(|e| panic!("second cutover: {e}"));
    }
    for st in ddl::finalize(&plan, false) {
        db::run_step(&c, &st, &s)
            .await
            .unwrap_or_else(|e| panic!("finalize: {e}"));
    }
    assert_eq!(count(&c, r#"SELECT count(*) FROM pg_attribute WHERE attrelid = '"App".nodes'::regclass AND attname LIKE '%legacy'"#).await, 0);
    assert_eq!(count(&c, r#"SELECT count(*) FROM "App".nodes n JOIN "App"."Accounts" a ON a."ID" = n."Account_Id""#).await, count(&c, r#"SELECT count(*) FROM "App".nodes"#).await);
}

/// Rollback leaves the schema exactly as harden leaves it (uuid-shaped sessions need phase
/// hardened: uuids complete and enforced), twice in a row, on the seed (NOT NULL FKs,
/// indexed FK columns) and on the awkward names of EDGE (identity key, self-reference, a
/// child without an integer key). After it, harden has nothing to do, verify passes and
/// cutover needs nothing more.
#[tokio::test]
async fn rollback_leaves_the_schema_as_harden_does() {
    for (schema, args) in [
        (format!("{SEED_004}{}", seed_004_rows(40)), &[][..]),
        (EDGE.to_string(), &["--schema", "App"][..]),
    ] {
        let db = db_with(&schema).await;
        let url = db.url();
        let before = schema_dump(&db);
        ks_expect(&url, &[&["expand"][..], args].concat(), 0);
        ks_expect(&url, &["backfill"], 0);
        let c = db.client().await;
        // The switch tables the first cutover creates in schema keyshift: not part of the
        // comparison.
        c.batch_execute(keyshift::migrate::switch::schema_sql())
            .await
            .unwrap();
        let hardened = schema_dump(&db);
        for round in 1..=2 {
            let o = ks_expect(&url, &["cutover"], 0);
            assert!(stdout(&o).contains("committed"), "{}", text(&o));
            assert_ne!(hardened, schema_dump(&db));
            if round == 2 && args.is_empty() {
                // What an interrupted REINDEX CONCURRENTLY of a primary key leaves: an
                // INVALID copy, which rollback drops before rebuilding.
                assert!(
                    c.batch_execute(
                        "CREATE UNIQUE INDEX CONCURRENTLY mcp_connectors_pkey_ccnew ON mcp_connectors ((1))"
                    )
                    .await
                    .is_err()
                );
                assert_eq!(
                    count(&c, "SELECT count(*) FROM pg_index WHERE NOT indisvalid").await,
                    1
                );
            }
            ks_expect(&url, &["rollback"], 0);
            let (_, phase) = state::load(&c).await.unwrap().unwrap();
            assert_eq!(phase, state::Phase::Hardened, "round {round}");
            let after = schema_dump(&db);
            if after != hardened {
                let diff: Vec<String> = diff_lines(&hardened, &after);
                panic!(
                    "round {round}: the schema after rollback differs from after harden:\n{}",
                    diff.join("\n")
                );
            }
            let o = ks_expect(&url, &["harden"], 0);
            assert!(stderr(&o).contains("(0 change(s))"), "{}", text(&o));
            ks_expect(&url, &["verify"], 0);
        }
        // No INVALID index left behind by the rebuilds.
        assert_eq!(
            count(&c, "SELECT count(*) FROM pg_index WHERE NOT indisvalid").await,
            0
        );
        // After a rollback the migration can still be aborted, back to the exact schema
        // (the integer FKs are bound to the primary key, not to the spare index abort drops).
        ks_expect(&url, &["abort"], 0);
        assert_eq!(before, schema_dump(&db));
    }
}

/// A rollback that stops before its swap (here `--dry-run`) has built the uuid side's
/// constraints and indexes beside the cutover's: finalize drops them, so that the end state
/// reads as if it had always been UUID.
#[tokio::test]
async fn finalize_drops_what_an_unfinished_rollback_prepared() {
    let db = db_with(&format!("{SEED_004}{}", seed_004_rows(10))).await;
    let url = db.url();
    ks_expect(&url, &["expand"], 0);
    ks_expect(&url, &["backfill"], 0);
    ks_expect(&url, &["cutover"], 0);
    let c = db.client().await;
    let leftovers = "SELECT (SELECT count(*) FROM pg_constraint WHERE conname LIKE '%\\_uuid' OR conname LIKE '%\\_uuid\\_not\\_null')
                          + (SELECT count(*) FROM pg_class WHERE relkind = 'i' AND relname LIKE '%\\_uuid\\_key')";
    assert_eq!(count(&c, leftovers).await, 0);
    let o = ks_expect(&url, &["rollback", "--dry-run"], 0);
    assert!(stdout(&o).contains("dry run"), "{}", text(&o));
    assert_eq!(
        count(&c, leftovers).await,
        4 + 5 + 5,
        "shadow FKs, CHECKs, unique indexes"
    );
    ks_expect(&url, &["shape", "default", "uuid"], 0);
    ks_expect(&url, &["finalize", "--yes"], 0);
    assert_eq!(count(&c, leftovers).await, 0);
}

/// The lines of `b` missing from `a` (`+`) and of `a` missing from `b` (`-`).
fn diff_lines(a: &str, b: &str) -> Vec<String> {
    let (la, lb): (Vec<&str>, Vec<&str>) = (a.lines().collect(), b.lines().collect());
    let mut out: Vec<String> = la
        .iter()
        .filter(|l| !lb.contains(l))
        .map(|l| format!("- {l}"))
        .collect();
    out.extend(
        lb.iter()
            .filter(|l| !la.contains(l))
            .map(|l| format!("+ {l}")),
    );
    out
}

#[tokio::test]
async fn verify_finds_direct_writes_and_backfill_catches_up() {
    let db = db_with(&format!("{SEED_004}{}", seed_004_rows(30))).await;
    let url = db.url();
    ks_expect(&url, &["expand"], 0);
    ks_expect(&url, &["backfill"], 0);
    ks_expect(&url, &["verify"], 0);
    let c = db.client().await;
    // Writes that bypass the proxy get their twins from the fill triggers (src/migrate/fill.rs).
    c.batch_execute(
        "INSERT INTO mcp_servers (id, connector_id, name) VALUES (1000, 3, 'direct');
         UPDATE mcp_servers SET connector_id = 7 WHERE id = 5;",
    )
    .await
    .unwrap();
    ks_expect(&url, &["verify"], 0);
    // What the triggers leave alone, on purpose (they watch the integer side before
    // cutover): a twin written by itself, as the backfill does. A NULL twin, a stale twin.
    c.batch_execute(
        "UPDATE mcp_servers SET connector_id_uuid = NULL WHERE id = 1000;
         UPDATE mcp_servers SET connector_id_uuid = (SELECT id_uuid FROM mcp_connectors WHERE id = 9) WHERE id = 5;",
    )
    .await
    .unwrap();
    let o = ks_expect(&url, &["verify", "--format", "json"], 1);
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let failed: Vec<&serde_json::Value> = r["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["passed"] == false)
        .collect();
    assert_eq!(failed.len(), 2, "{failed:#?}");
    assert_eq!(failed[0]["check"], "no NULL FK uuid");
    assert_eq!(failed[0]["examples"][0], "1000");
    assert_eq!(failed[1]["check"], "FK uuid equals the parent's uuid");
    assert_eq!(failed[1]["examples"][0], "5");
    let o = ks_expect(&url, &["verify"], 1);
    assert!(
        stdout(&o).contains("FAIL") && stdout(&o).contains("keyshift backfill"),
        "{}",
        text(&o)
    );
    // A new catch-up round repairs both.
    ks_expect(&url, &["backfill"], 0);
    ks_expect(&url, &["verify"], 0);
    // An explicit NULL key uuid: the key catch-up fixes it (the index allows NULLs; the CHECK does not,
    // so drop it as an operator would have to do to create this state).
    let o = ks_expect(&url, &["status", "--format", "json"], 0);
    let st: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(st["phase"], "hardened");
    let key = st["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["task"] == "key:public.mcp_servers")
        .unwrap();
    assert_eq!(key["rows_done"], 60);
    assert_eq!(key["done"], true);
    let o = ks_expect(&url, &["status"], 0);
    assert!(stdout(&o).contains("phase: hardened"), "{}", text(&o));
}

#[tokio::test]
async fn invalid_index_is_dropped_and_rebuilt() {
    let db = db_with(&format!("{SEED_004}{}", seed_004_rows(20))).await;
    let url = db.url();
    ks_expect(&url, &["expand"], 0);
    ks_expect(&url, &["backfill", "--skip-harden"], 0);
    let c = db.client().await;
    // A duplicate makes the concurrent build fail and leave an INVALID index behind.
    c.batch_execute("UPDATE mcp_connectors SET id_uuid = (SELECT id_uuid FROM mcp_connectors WHERE id = 1) WHERE id = 2")
        .await
        .unwrap();
    let o = ks_expect(&url, &["harden"], 1);
    let err = stderr(&o);
    assert!(
        err.contains("while running: CREATE UNIQUE INDEX CONCURRENTLY mcp_connectors_id_uuid_key"),
        "{err}"
    );
    assert!(err.contains("what to do"), "{err}");
    let invalid = "SELECT count(*) FROM pg_index WHERE indexrelid = 'mcp_connectors_id_uuid_key'::regclass AND NOT indisvalid";
    assert_eq!(count(&c, invalid).await, 1);
    let o = ks_expect(&url, &["verify", "--format", "json"], 1);
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let dup = r["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| {
            c["check"] == "key uuids unique" && c["object"] == "public.mcp_connectors.id_uuid"
        })
        .unwrap();
    assert_eq!(dup["count"], 1);
    c.batch_execute("UPDATE mcp_connectors SET id_uuid = NULL WHERE id = 2")
        .await
        .unwrap();
    ks_expect(&url, &["backfill", "--skip-harden"], 0);
    ks_expect(&url, &["harden"], 0);
    assert_eq!(count(&c, invalid).await, 0);
    assert_eq!(count(&c, "SELECT count(*) FROM pg_index WHERE indexrelid = 'mcp_connectors_id_uuid_key'::regclass AND indisvalid").await, 1);
    ks_expect(&url, &["verify"], 0);
}

/// A long transaction holds a lock: expand waits with lock_timeout and retries instead of
/// queueing in front of everyone; with too few retries it gives up with what to do.
#[tokio::test]
async fn ddl_retries_under_lock_timeout() {
    let db = db_with(SEED_004).await;
    let url = db.url();
    let holder = db.client().await;
    holder
        .batch_execute("BEGIN; LOCK TABLE mcp_servers IN ACCESS SHARE MODE")
        .await
        .unwrap();
    let o = ks_expect(
        &url,
        &["expand", "--lock-timeout", "50ms", "--ddl-retries", "1"],
        1,
    );
    let err = stderr(&o);
    assert!(
        err.contains("lock timeout") && err.contains("55P03") && err.contains("pg_stat_activity"),
        "{err}"
    );
    // While expand waits for its lock, other sessions' reads are not queued behind it for long.
    let url2 = url.clone();
    let run = tokio::task::spawn_blocking(move || {
        ks(
            &url2,
            &["expand", "--lock-timeout", "50ms", "--ddl-retries", "30"],
        )
    });
    let reader = db.client().await;
    for _ in 0..10 {
        let t = std::time::Instant::now();
        reader
            .batch_execute("SELECT count(*) FROM mcp_servers")
            .await
            .unwrap();
        assert!(
            t.elapsed() < std::time::Duration::from_millis(1000),
            "a read waited {:?}",
            t.elapsed()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    holder.batch_execute("COMMIT").await.unwrap();
    let o = run.await.unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
}

/// The last statement of a killed backfill can commit after a new run has read the cursor:
/// the new run's batch must then save nothing (and count nothing twice).
#[tokio::test]
async fn a_batch_saves_its_cursor_only_if_nobody_moved_it() {
    let db = db_with(&format!("{SEED_004}{}", seed_004_rows(20))).await;
    ks_expect(&db.url(), &["expand"], 0);
    let c = db.client().await;
    let (plan, _) = state::load(&c).await.unwrap().unwrap();
    let t = &plan.tables[0];
    let sql = ddl::key_batch(&plan, t);
    let task = "key:public.mcp_connectors";
    let stale: Option<i64> = Some(5);
    let r = c
        .query_one(&sql, &[&i64::MIN, &10i64, &task, &10i64, &stale])
        .await
        .unwrap();
    let (updated, saved): (i64, i64) = (r.get(0), r.get(1));
    assert_eq!(
        (updated, saved),
        (10, 0),
        "rows filled, cursor not saved: it was not at 5"
    );
    assert_eq!(
        count(
            &c,
            "SELECT rows_done FROM keyshift.backfill WHERE task = 'key:public.mcp_connectors'"
        )
        .await,
        0
    );
    let none: Option<i64> = None;
    let r = c
        .query_one(&sql, &[&i64::MIN, &10i64, &task, &10i64, &none])
        .await
        .unwrap();
    let (updated, saved): (i64, i64) = (r.get(0), r.get(1));
    assert_eq!((updated, saved), (0, 1), "already filled; the cursor moves");
    assert_eq!(
        count(
            &c,
            "SELECT cursor FROM keyshift.backfill WHERE task = 'key:public.mcp_connectors'"
        )
        .await,
        10
    );
    ks_expect(&db.url(), &["backfill"], 0);
    assert_eq!(
        count(
            &c,
            "SELECT rows_done FROM keyshift.backfill WHERE task = 'key:public.mcp_connectors'"
        )
        .await,
        20
    );
    ks_expect(&db.url(), &["verify"], 0);
}
