//! After cutover, writes that bypass the proxy (a psql session, a cron job, COPY, triggers
//! disabled by an owner) can leave `<fk>_legacy` NULL or stale. `verify` names those rows,
//! `rollback` refuses before building anything (instead of failing on 23514 or bringing a
//! nullable FK back with its integer link lost), `backfill` repairs them in phase cut_over,
//! and the rollback then brings back every integer link as it was (issue 14).
mod common;
mod migrate_support;

use keyshift::migrate::{Settings, db, ddl, state};
use migrate_support::*;
use tokio_postgres::Client;

async fn db_with(sql: &str) -> common::TestDb {
    let db = common::TestDb::new().await;
    db.client().await.batch_execute(sql).await.expect("schema");
    db
}

/// Every (child, key, integer FK) of seed 004 as text, in key order: the integer links.
/// `key` and `fk` name the columns in the phase the snapshot is taken in.
async fn links(c: &Client, fks: &[(&str, &str, &str)]) -> Vec<(String, String, Option<String>)> {
    let mut out = Vec::new();
    for (table, key, fk) in fks {
        let sql = format!("SELECT {key}::text, {fk}::text FROM {table} ORDER BY {key}");
        for r in c
            .query(&sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
        {
            out.push((table.to_string(), r.get(0), r.get(1)));
        }
    }
    out
}

const SEED_FKS_BEFORE: [(&str, &str, &str); 4] = [
    ("connector_access", "id", "connector_id"),
    ("mcp_servers", "id", "connector_id"),
    ("mcp_server_tokens", "id", "mcp_server_id"),
    ("mcp_server_tools", "id", "mcp_server_id"),
];

fn failed(o: &std::process::Output) -> Vec<serde_json::Value> {
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).expect("verify json");
    r["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["passed"] == false)
        .cloned()
        .collect()
}

fn find<'a>(f: &'a [serde_json::Value], check: &str, object: &str) -> &'a serde_json::Value {
    f.iter()
        .find(|c| c["check"] == check && c["object"] == object)
        .unwrap_or_else(|| panic!("no failed check {check:?} on {object}: {f:#?}"))
}

/// What the rollback's preparation builds: none of it may exist after a refusal.
const ROLLBACK_BUILT: &str = "SELECT (SELECT count(*) FROM pg_constraint WHERE conname LIKE '%\\_fkey\\_legacy' OR conname LIKE '%\\_legacy\\_not\\_null' OR conname LIKE '%\\_fkey\\_uuid')
     + (SELECT count(*) FROM pg_class WHERE relkind = 'i' AND (relname LIKE '%\\_legacy\\_spare' OR relname LIKE '%\\_uuid\\_key'))";

#[tokio::test]
async fn broken_legacy_links_are_found_refused_repaired_and_rolled_back_intact() {
    let db = db_with(&format!(
        "{SEED_004}{}
         -- a nullable FK that is NULL on purpose: it must stay NULL
         UPDATE mcp_servers SET connector_id = NULL WHERE id % 10 = 0;",
        seed_004_rows(30)
    ))
    .await;
    let url = db.url();
    let c = db.client().await;
    ks_expect(&url, &["expand"], 0);
    ks_expect(&url, &["backfill"], 0);
    let mut before = links(&c, &SEED_FKS_BEFORE).await;
    assert_eq!(before.len(), 30 + 60 + 60 + 60);
    assert_eq!(before.iter().filter(|(_, _, fk)| fk.is_none()).count(), 6);
    let o = ks_expect(&url, &["cutover"], 0);
    assert!(stdout(&o).contains("committed"), "{}", text(&o));
    ks_expect(&url, &["verify"], 0);

    // Writes that bypassed the proxy after cutover, directly on the uuid-shaped tables:
    // - NOT NULL FK (mcp_server_tools, mcp_server_tokens): a NULL and a stale legacy FK;
    // - nullable FK (mcp_servers.connector_id): a NULL and a stale one;
    // - a new row written in the uuid shape with no legacy FK at all: the fill trigger
    //   (src/migrate/fill.rs) gives it one, so it is not broken.
    c.batch_execute(
        "UPDATE mcp_server_tools SET mcp_server_id_legacy = NULL WHERE id_legacy IN (3, 4);
         UPDATE mcp_server_tokens SET mcp_server_id_legacy = 1 WHERE id_legacy = 9;
         UPDATE mcp_servers SET connector_id_legacy = NULL WHERE id_legacy = 5;
         UPDATE mcp_servers SET connector_id_legacy = connector_id_legacy + 1 WHERE id_legacy = 7;
         INSERT INTO mcp_server_tools (mcp_server_id, tool_name)
             SELECT id, 'direct' FROM mcp_servers WHERE id_legacy = 2;",
    )
    .await
    .unwrap();
    let new_tool: String = c
        .query_one(
            "SELECT id_legacy::text FROM mcp_server_tools WHERE tool_name = 'direct' AND mcp_server_id_legacy = 2",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    before.push((
        "mcp_server_tools".into(),
        new_tool.clone(),
        Some("2".into()),
    ));

    // verify names them, each with its examples and the command that repairs them.
    let o = ks_expect(&url, &["verify", "--format", "json"], 1);
    let f = failed(&o);
    assert_eq!(f.len(), 4, "{f:#?}");
    let tools = find(
        &f,
        "no NULL FK legacy",
        "public.mcp_server_tools.mcp_server_id_legacy",
    );
    assert_eq!(tools["count"], 2);
    assert_eq!(tools["examples"], serde_json::json!(["3", "4"]));
    assert!(
        tools["note"]
            .as_str()
            .unwrap()
            .contains("`keyshift backfill`"),
        "{tools}"
    );
    let tokens = find(
        &f,
        "FK legacy equals parent's legacy",
        "public.mcp_server_tokens.mcp_server_id_legacy",
    );
    assert_eq!(tokens["examples"], serde_json::json!(["9"]));
    let servers = find(
        &f,
        "no NULL FK legacy",
        "public.mcp_servers.connector_id_legacy",
    );
    assert_eq!(servers["examples"], serde_json::json!(["5"]));
    let stale = find(
        &f,
        "FK legacy equals parent's legacy",
        "public.mcp_servers.connector_id_legacy",
    );
    assert_eq!(stale["examples"], serde_json::json!(["7"]));
    let o = ks_expect(&url, &["verify"], 1);
    assert!(
        stdout(&o).contains("FAIL") && stdout(&o).contains("run `keyshift backfill`"),
        "{}",
        text(&o)
    );

    // rollback refuses before building anything, naming the rows and the repair.
    let attempts = "SELECT count(*) FROM keyshift.switch_attempts WHERE action = 'rollback'";
    let o = ks_expect(&url, &["rollback"], 1);
    let err = stderr(&o);
    for want in [
        "refused",
        "`keyshift backfill`",
        "Nothing was built",
        "public.mcp_server_tools.mcp_server_id_legacy: 2 row(s), e.g. 3, 4",
        "public.mcp_server_tokens.mcp_server_id_legacy: 1 row(s), e.g. 9",
        "public.mcp_servers.connector_id_legacy: 1 row(s), e.g. 5",
        "public.mcp_servers.connector_id_legacy: 1 row(s), e.g. 7",
    ] {
        assert!(err.contains(want), "{want:?} missing:\n{}", text(&o));
    }
    assert!(!err.contains("23514"), "{}", text(&o));
    assert_eq!(count(&c, ROLLBACK_BUILT).await, 0, "nothing built");
    assert_eq!(count(&c, attempts).await, 0, "no pause attempted");
    let (_, phase) = state::load(&c).await.unwrap().unwrap();
    assert_eq!(phase, state::Phase::CutOver);

    // backfill repairs them in phase cut_over, without changing the phase; a second run
    // finds nothing.
    let o = ks_expect(&url, &["backfill", "--batch-size", "2"], 0);
    assert!(
        stderr(&o).contains("keyshift backfill (after cutover): 5 legacy integer(s) repaired"),
        "{}",
        text(&o)
    );
    let o = ks_expect(&url, &["backfill"], 0);
    assert!(
        stderr(&o).contains("0 legacy integer(s) repaired"),
        "{}",
        text(&o)
    );
    let (_, phase) = state::load(&c).await.unwrap().unwrap();
    assert_eq!(phase, state::Phase::CutOver);
    let o = ks_expect(&url, &["status", "--format", "json"], 0);
    let st: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let legacy: Vec<&serde_json::Value> = st["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["kind"] == "legacy")
        .collect();
    assert_eq!(legacy.len(), 4, "{st:#}");
    assert!(legacy.iter().all(|t| t["done"] == true), "{st:#}");
    ks_expect(&url, &["verify"], 0);

    // The rollback goes through, and every integer link is what it was before cutover.
    let o = ks_expect(&url, &["rollback"], 0);
    assert!(stdout(&o).contains("committed"), "{}", text(&o));
    let after = links(&c, &SEED_FKS_BEFORE).await;
    before.sort();
    let mut after_sorted = after.clone();
    after_sorted.sort();
    assert_eq!(before, after_sorted);
    ks_expect(&url, &["verify"], 0);
}

/// The rollback swap's own catch-up: a nullable legacy FK left NULL after the check (here:
/// the steps run directly, as if a write came between the check and the pause) is filled
/// inside the swap, as cutover's swap fills the uuid side. A NOT NULL one makes the
/// preparation fail on 23514, whose advice (`keyshift backfill`) works in phase cut_over.
#[tokio::test]
async fn the_rollback_swap_catches_up_nullable_legacy_fks() {
    let db = db_with(&format!("{SEED_004}{}", seed_004_rows(20))).await;
    let url = db.url();
    let c = db.client().await;
    ks_expect(&url, &["expand"], 0);
    ks_expect(&url, &["backfill"], 0);
    let before = links(&c, &SEED_FKS_BEFORE).await;
    ks_expect(&url, &["cutover"], 0);
    let (plan, _) = state::load(&c).await.unwrap().unwrap();
    let s = Settings::default();

    c.batch_execute(
        "UPDATE mcp_server_tools SET mcp_server_id_legacy = NULL WHERE id_legacy = 6;
         UPDATE mcp_servers SET connector_id_legacy = NULL WHERE id_legacy IN (2, 3);",
    )
    .await
    .unwrap();
    let mut failed_at = None;
    for st in ddl::rollback(&plan) {
        if let Err(e) = db::run_step(&c, &st, &s).await {
            failed_at = Some(e.to_string());
            break;
        }
    }
    let e = failed_at.expect("the NOT NULL CHECK of mcp_server_tools must not validate");
    assert!(
        e.contains("23514") && e.contains("mcp_server_tools_mcp_server_id_legacy_not_null"),
        "{e}"
    );
    assert!(e.contains("run `keyshift backfill`"), "{e}");
    // The advice works in this phase.
    ks_expect(&url, &["backfill"], 0);
    // Then only the nullable FK is broken, after the check: the swap fills it.
    c.batch_execute("UPDATE mcp_servers SET connector_id_legacy = NULL WHERE id_legacy IN (2, 3)")
        .await
        .unwrap();
    for st in ddl::rollback(&plan) {
        db::run_step(&c, &st, &s)
            .await
            .unwrap_or_else(|e| panic!("rollback: {e}"));
    }
    assert_eq!(links(&c, &SEED_FKS_BEFORE).await, before);
    ks_expect(&url, &["verify"], 0);
}

/// The awkward names of EDGE: quoted mixed-case names in a non-public schema, an identity
/// key (legacy `"ID_legacy"`), a bigint FK to an int key, a nullable self-reference, and a
/// child without an integer key (`tags`: found and fixed by ctid).
#[tokio::test]
async fn legacy_catchup_on_quoted_names_self_references_and_ctid_children() {
    let db = db_with(EDGE).await;
    let url = db.url();
    let c = db.client().await;
    ks_expect(&url, &["expand", "--schema", "App"], 0);
    ks_expect(&url, &["backfill"], 0);
    let fks_before: [(&str, &str, &str); 3] = [
        (r#""App".nodes"#, "id", r#""Account_Id""#),
        (r#""App".nodes"#, "id", "parent_id"),
        (r#""App".tags"#, "tag", "node_id"),
    ];
    let before = links(&c, &fks_before).await;
    ks_expect(&url, &["cutover"], 0);
    c.batch_execute(
        r#"UPDATE "App".nodes SET "Account_Id_legacy" = NULL WHERE id_legacy IN (10, 11);
           UPDATE "App".nodes SET parent_id_legacy = NULL WHERE id_legacy IN (20, 21);
           UPDATE "App".nodes SET parent_id_legacy = 1 WHERE id_legacy = 30;
           UPDATE "App".tags SET node_id_legacy = NULL WHERE tag IN ('tag1', 'tag2');
           UPDATE "App".tags SET node_id_legacy = 300 WHERE tag = 'tag3';"#,
    )
    .await
    .unwrap();
    let o = ks_expect(&url, &["verify", "--format", "json"], 1);
    let f = failed(&o);
    assert_eq!(f.len(), 5, "{f:#?}");
    assert_eq!(
        find(&f, "no NULL FK legacy", "\"App\".nodes.Account_Id_legacy")["examples"],
        serde_json::json!(["10", "11"])
    );
    assert_eq!(
        find(&f, "no NULL FK legacy", "\"App\".tags.node_id_legacy")["count"],
        2
    );
    let o = ks_expect(&url, &["rollback"], 1);
    assert!(stderr(&o).contains("`keyshift backfill`"), "{}", text(&o));
    assert_eq!(count(&c, ROLLBACK_BUILT).await, 0, "nothing built");
    let o = ks_expect(&url, &["backfill"], 0);
    assert!(
        stderr(&o).contains("8 legacy integer(s) repaired"),
        "{}",
        text(&o)
    );
    ks_expect(&url, &["verify"], 0);
    ks_expect(&url, &["rollback"], 0);
    assert_eq!(links(&c, &fks_before).await, before);
    ks_expect(&url, &["verify"], 0);
}

/// A legacy key left NULL (possible only once someone dropped its NOT NULL, which dropping
/// the primary key at cutover keeps on PostgreSQL 13 to 17): verify names it, backfill gives
/// it a new value from the original sequence and re-links its children to it.
#[tokio::test]
async fn a_null_legacy_key_gets_one_from_its_sequence_and_its_children_follow() {
    let db = db_with(&format!("{SEED_004}{}", seed_004_rows(10))).await;
    let url = db.url();
    let c = db.client().await;
    ks_expect(&url, &["expand"], 0);
    ks_expect(&url, &["backfill"], 0);
    ks_expect(&url, &["cutover"], 0);
    let not_null = "SELECT count(*) FROM pg_attribute WHERE attrelid = 'mcp_connectors'::regclass AND attname = 'id_legacy' AND attnotnull";
    assert_eq!(
        count(&c, not_null).await,
        1,
        "NOT NULL survives the cutover"
    );
    c.batch_execute(
        "ALTER TABLE mcp_connectors ALTER COLUMN id_legacy DROP NOT NULL;
         UPDATE mcp_connectors SET id_legacy = NULL WHERE id_legacy = 3;",
    )
    .await
    .unwrap();
    let o = ks_expect(&url, &["verify", "--format", "json"], 1);
    let f = failed(&o);
    let key = find(&f, "no NULL legacy key", "public.mcp_connectors.id_legacy");
    assert_eq!(key["count"], 1);
    assert!(
        key["note"]
            .as_str()
            .unwrap()
            .contains("`keyshift backfill`")
    );
    // Its children now differ from it (connector 3 has one access row and servers).
    find(
        &f,
        "FK legacy equals parent's legacy",
        "public.connector_access.connector_id_legacy",
    );
    ks_expect(&url, &["rollback"], 1);
    ks_expect(&url, &["backfill"], 0);
    let new: i32 = c
        .query_one(
            "SELECT id_legacy FROM mcp_connectors WHERE name = 'c3'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(new > 10, "a new value from the sequence: {new}");
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM connector_access a JOIN mcp_connectors p ON p.id = a.connector_id WHERE p.name = 'c3' AND a.connector_id_legacy = p.id_legacy"
        )
        .await,
        1
    );
    ks_expect(&url, &["verify"], 0);
    ks_expect(&url, &["rollback"], 0);
    ks_expect(&url, &["verify"], 0);
}
