//! The proxy's rebuilds of its rules (src/proxy/control.rs, source.rs, reading.rs). At a
//! swap, while the gate is held, the rules come from the last catalog reading with the swap's
//! renames applied; once the gate is open the catalog is read again, and whatever else changed
//! it behind that reading reaches the rules then. These tests check the derived reading
//! against the catalog after real swaps, and that a reading gone stale is caught.
mod common;
mod migrate_support;

use std::time::{Duration, Instant};

use common::proxy::{TestProxy, linked_proxy};
use keyshift::migrate::state;
use keyshift::proxy::reading::Reading;
use keyshift::shape::Shape;
use migrate_support::{SEED_004, ks_async, ks_expect, seed_004_rows, text};

/// Seed 004, expanded and hardened, with what the reading covers besides the columns: an
/// application view over a migrated column (keyshift copies it into each shape) and a table
/// in another schema named like a migrated one.
async fn migrated_db() -> common::TestDb {
    let db = common::TestDb::new().await;
    db.client()
        .await
        .batch_execute(&format!(
            "{SEED_004}{}
             CREATE VIEW server_names AS SELECT id, connector_id, name FROM mcp_servers;
             CREATE SCHEMA app;
             CREATE TABLE app.mcp_servers (note text);",
            seed_004_rows(10)
        ))
        .await
        .unwrap();
    ks_expect(&db.url(), &["expand"], 0);
    ks_expect(&db.url(), &["backfill"], 0);
    db
}

async fn read(c: &tokio_postgres::Client) -> Reading {
    let m = state::load_migration(c)
        .await
        .unwrap()
        .expect("a migration");
    Reading::read(c, &m.plan, Shape::physical(m.phase))
        .await
        .unwrap()
}

async fn switch(db: &common::TestDb, command: &str) {
    let out = ks_async(&db.url(), &[command]).await;
    assert_eq!(out.status.code(), Some(0), "{command}: {}", text(&out));
}

#[tokio::test]
async fn the_reading_derived_across_each_swap_is_the_catalogs() {
    let db = migrated_db().await;
    let c = db.client().await;
    let plan = state::load_migration(&c).await.unwrap().unwrap().plan;
    let hardened = read(&c).await;
    assert_eq!(hardened.shape, Shape::Integer);
    let servers = hardened
        .columns
        .iter()
        .find(|t| t.table == "mcp_servers")
        .expect("mcp_servers is a child");
    assert_eq!(
        servers.columns,
        [
            "id",
            "connector_id",
            "name",
            "status",
            "id_uuid",
            "connector_id_uuid"
        ]
    );
    assert!(
        hardened
            .shadows
            .contains(&("app".into(), "mcp_servers".into())),
        "{:?}",
        hardened.shadows
    );
    for shape in Shape::ALL {
        assert_eq!(
            hardened.copies(shape),
            [("public".to_string(), "server_names".to_string())],
            "{shape}"
        );
    }

    switch(&db, "cutover").await;
    let cut_over = read(&c).await;
    assert_eq!(hardened.after_swap(&plan).as_ref(), Some(&cut_over));

    switch(&db, "rollback").await;
    let back = read(&c).await;
    assert_eq!(cut_over.after_swap(&plan).as_ref(), Some(&back));
    assert_eq!(back, hardened);
}

/// Waits until the proxy's control link has finished what it was doing when `command`
/// returned: the release of its gate, and the catalog check that follows it. Its next
/// refresh writes a heartbeat, and the link does one thing at a time.
async fn settled(c: &tokio_postgres::Client) {
    let since: std::time::SystemTime = c.query_one("SELECT now()", &[]).await.unwrap().get(0);
    let start = Instant::now();
    loop {
        let later: bool = c
            .query_one(
                "SELECT bool_and(heartbeat_at > $1) FROM keyshift.proxies",
                &[&since],
            )
            .await
            .unwrap()
            .get(0);
        if later {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "no heartbeat");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn builds(p: &TestProxy, reading: &str) -> u64 {
    p.shared
        .metrics
        .rewrite
        .rules_builds
        .with_label_values(&[reading])
        .get()
}

#[tokio::test]
async fn a_swap_puts_rules_derived_from_the_last_reading_in_force_and_the_catalog_confirms_them() {
    let db = migrated_db().await;
    let c = db.client().await;
    let p = linked_proxy(&db).await;
    assert_eq!((builds(&p, "derived"), builds(&p, "corrected")), (0, 0));
    for (n, command) in [(1, "cutover"), (2, "rollback")] {
        switch(&db, command).await;
        settled(&c).await;
        assert_eq!(builds(&p, "derived"), n, "{command}");
        assert_eq!(
            builds(&p, "corrected"),
            0,
            "{command}: the catalog disagreed with the derived reading"
        );
    }
}

/// The pause that enters `cutting_over` (`cutover --by-table`) renames nothing: the rules
/// for it (both shapes translated, columns read through the integer-shape views) are derived
/// from the last reading, built while the gate is held, and the catalog confirms them.
#[tokio::test]
async fn entering_cutting_over_puts_rules_derived_from_the_last_reading_in_force() {
    let db = migrated_db().await;
    let c = db.client().await;
    let plan = state::load_migration(&c).await.unwrap().unwrap().plan;
    // What a full read through the views gives is what is derived from the tables' reading.
    let hardened = read(&c).await;
    assert_eq!(
        hardened.through_views(),
        Some(Reading::read(&c, &plan, None).await.unwrap())
    );
    let p = linked_proxy(&db).await;
    let out = ks_async(&db.url(), &["cutover", "--by-table"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    settled(&c).await;
    assert_eq!(
        (builds(&p, "derived"), builds(&p, "corrected")),
        (1, 0),
        "the entry's rules derived, and the catalog agreed"
    );
}

#[tokio::test]
async fn a_catalog_change_behind_the_last_reading_reaches_the_rules_after_a_swap() {
    let db = migrated_db().await;
    let c = db.client().await;
    let p = linked_proxy(&db).await;
    let app = common::connect(&p.url("postgres", &db.name)).await;
    // The application's own DDL, which nothing announces to the proxy.
    c.batch_execute("ALTER TABLE mcp_servers ADD COLUMN extra text")
        .await
        .unwrap();
    switch(&db, "cutover").await;
    settled(&c).await;
    assert!(
        builds(&p, "corrected") >= 1,
        "the new column never reached the rules"
    );
    c.batch_execute("ALTER TABLE mcp_servers ADD COLUMN extra2 text")
        .await
        .unwrap();
    switch(&db, "rollback").await;
    settled(&c).await;
    // A positional insert names every column: under rules that missed one, the rewrite's
    // column list is one short of the values.
    app.batch_execute(
        "INSERT INTO mcp_servers VALUES (DEFAULT, 1, 'positional', 'new', 'e1', 'e2')",
    )
    .await
    .unwrap();
    let filled: bool = c
        .query_one(
            "SELECT s.connector_id_uuid = p.id_uuid AND s.extra2 = 'e2'
               FROM mcp_servers s JOIN mcp_connectors p ON p.id = s.connector_id
              WHERE s.name = 'positional'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(filled, "the dual-write did not fill the twin");
}
