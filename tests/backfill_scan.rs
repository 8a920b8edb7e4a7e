//! The backfill at scale (issue 16): children without a single-column integer key (a
//! composite key, a text key, no key, a partitioned child's leaves) are walked by ctid pages,
//! each batch starting from the cursor, never from page 0; key uuids left NULL are found in
//! one search, not one per batch; and the ETA reaches `status`.
mod common;
mod migrate_support;

use std::time::{Duration, Instant};

use migrate_support::*;

const ROWS: i64 = 30_000;

/// One parent (migrated: it has an integer key) and children that are not: each only gets
/// the FK twin, filled by an `fk:` task along its ctid pages.
fn schema() -> String {
    format!(
        "CREATE TABLE p (id serial PRIMARY KEY, name text);
         INSERT INTO p (name) SELECT 'p' || g FROM generate_series(1, 100) g;
         CREATE TABLE c_comp (a int, b int, p_id int REFERENCES p, PRIMARY KEY (a, b));
         INSERT INTO c_comp SELECT g, g % 7, (g % 100) + 1 FROM generate_series(1, {ROWS}) g;
         CREATE TABLE c_text (k text PRIMARY KEY, p_id int REFERENCES p);
         INSERT INTO c_text SELECT 'k' || g, (g % 100) + 1 FROM generate_series(1, {ROWS}) g;
         CREATE TABLE c_nokey (p_id int REFERENCES p, v text);
         INSERT INTO c_nokey SELECT (g % 100) + 1, 'v' || g FROM generate_series(1, {ROWS}) g;
         CREATE TABLE c_part (id int, region int, p_id int REFERENCES p, PRIMARY KEY (id, region))
             PARTITION BY LIST (region);
         CREATE TABLE c_part_0 PARTITION OF c_part FOR VALUES IN (0);
         CREATE TABLE c_part_1 PARTITION OF c_part FOR VALUES IN (1);
         INSERT INTO c_part SELECT g, g % 2, (g % 100) + 1 FROM generate_series(1, {ROWS}) g;"
    )
}

/// A database with [`schema`], analyzed and expanded, and a client on it.
async fn expanded() -> (common::TestDb, tokio_postgres::Client) {
    let db = common::TestDb::new().await;
    let c = db.client().await;
    c.batch_execute(&schema()).await.unwrap();
    c.batch_execute("VACUUM ANALYZE").await.unwrap();
    ks_expect(&db.url(), &["expand"], 0);
    (db, c)
}

/// Rows each table returned to sequential and TID range scans (`seq_tup_read`), once the
/// backfill's backend has flushed its statistics (at its exit).
async fn tuples_read(c: &tokio_postgres::Client, tables: &[&str]) -> Vec<i64> {
    let mut last = Vec::new();
    for _ in 0..50 {
        c.batch_execute("SELECT pg_stat_clear_snapshot()")
            .await
            .unwrap();
        let mut now = Vec::new();
        for t in tables {
            now.push(
                count(
                    c,
                    &format!("SELECT seq_tup_read FROM pg_stat_user_tables WHERE relname = '{t}'"),
                )
                .await,
            );
        }
        if now == last && now.iter().all(|n| *n > 0) {
            return now;
        }
        last = now;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn children_without_an_integer_key_are_batched_without_rescanning() {
    let (db, c) = expanded().await;
    let url = db.url();
    let children = ["c_comp", "c_text", "c_nokey", "c_part_0", "c_part_1"];
    let before = tuples_read(&c, &children).await;
    // 100 rows a batch: 2 pages of ~180 rows, so ~80 batches per table of 30,000 rows.
    ks_expect(
        &url,
        &["backfill", "--skip-harden", "--batch-size", "100"],
        0,
    );
    let after = tuples_read(&c, &children).await;
    for ((t, b), a) in children.iter().zip(&before).zip(&after) {
        let rows = count(&c, &format!("SELECT count(*) FROM {t}")).await;
        let batches = count(
            &c,
            &format!("SELECT batches FROM keyshift.backfill WHERE task = 'fk:public.{t}.p_id'"),
        )
        .await;
        assert!(batches >= 40, "{t}: {batches} batches");
        // Each page is read by its batch's bounds and by its update (the rows' new versions,
        // appended further on, once more each), then once by the catch-up's search: about
        // 5 reads of each row. A batch that scanned from page 0 would read half the table
        // per batch on average: batches / 2 reads of each row, 20 and more here.
        let per_row = (a - b) as f64 / rows as f64;
        assert!(
            per_row < 8.0,
            "{t}: {per_row:.1} rows read per row over {batches} batches: a batch rescans the table"
        );
        eprintln!("{t}: {batches} batches, {per_row:.1} rows read per row");
    }
    // And the twins are right.
    for t in children {
        assert_eq!(
            count(
                &c,
                &format!(
                    "SELECT count(*) FROM {t} c JOIN p ON p.id = c.p_id WHERE c.p_id_uuid IS DISTINCT FROM p.id_uuid"
                )
            )
            .await,
            0,
            "{t}"
        );
    }
    // Key uuids left NULL by writes that skipped the default: one search finds them all,
    // then batches fix them by key (a search per batch read the table from page 0 each time).
    c.batch_execute(
        "INSERT INTO p (name, id_uuid) SELECT 'late', NULL FROM generate_series(1, 10000)",
    )
    .await
    .unwrap();
    let before = tuples_read(&c, &["p"]).await;
    ks_expect(
        &url,
        &["backfill", "--skip-harden", "--batch-size", "100"],
        0,
    );
    let after = tuples_read(&c, &["p"]).await;
    assert_eq!(
        count(&c, "SELECT count(*) FROM p WHERE id_uuid IS NULL").await,
        0
    );
    // One read by the search, one by each of the 5 catch-up passes of this new round (their
    // hash joins read the parent): ~6. A search per batch: ~50 (100 batches, each reading
    // half the table on average).
    let per_row = (after[0] - before[0]) as f64 / 10_100.0;
    assert!(
        per_row < 10.0,
        "p: {per_row:.1} rows read per row for 100 batches of the key catch-up"
    );
    eprintln!("p: {per_row:.1} rows read per row by the key catch-up's round");
    ks_expect(&url, &["harden"], 0);
    ks_expect(&url, &["verify"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_the_backfills_eta_while_it_runs() {
    let (db, _c) = expanded().await;
    let url = db.url();
    // Throttled to last ~20 s (150,000 rows at 7,500 rows/s) whatever the machine.
    let mut child = spawn_ks(
        &url,
        &[
            "backfill",
            "--skip-harden",
            "--batch-size",
            "500",
            "--max-rows-per-sec",
            "7500",
        ],
    );
    let start = Instant::now();
    let mut seen = None;
    while start.elapsed() < Duration::from_secs(15) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let o = ks_async(&url, &["status", "--format", "json"]).await;
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("status json");
        if let Some(eta) = v["backfill_eta_seconds"].as_u64() {
            let text = stdout(&ks_async(&url, &["status"]).await);
            seen = Some((eta, v["backfill_rows_per_sec"].as_f64(), text));
            break;
        }
    }
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    let _ = child.wait();
    let (eta, rate, text) = seen.expect("status never showed an ETA while the backfill ran");
    let rate = rate.expect("a rate beside the ETA");
    // The throttle holds the rate near 7,500 rows/s; the ETA is the work left at that rate
    // (under 150,000 rows: under a minute, with a margin for the estimate).
    assert!((1000.0..=12_000.0).contains(&rate), "rate {rate}");
    assert!(eta <= 60, "ETA {eta}s");
    assert!(text.contains("backfill: ETA "), "{text}");
    // Killed at any point, it resumes to the end.
    ks_expect(&url, &["backfill", "--skip-harden"], 0);
    let o = ks_expect(&url, &["status", "--format", "json"], 0);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["backfill_eta_seconds"].is_null(), "done: no ETA");
    // The ETA weighs each task's rows by what they cost: an entry per index of the table and
    // a lookup per twin, scaled to 1 on average over the run's rows.
    let c = db.client().await;
    let cost = |task: &'static str| {
        let c = &c;
        async move {
            c.query_one(
                "SELECT row_cost FROM keyshift.backfill WHERE task = $1",
                &[&task],
            )
            .await
            .unwrap()
            .get::<_, f64>(0)
        }
    };
    let (parent, text, nokey) = (
        cost("key:public.p").await,
        cost("fk:public.c_text.p_id").await,
        cost("fk:public.c_nokey.p_id").await,
    );
    assert!(
        parent < text && nokey < text && (parent - nokey).abs() < 1e-9,
        "p {parent}, c_text {text}, c_nokey {nokey}"
    );
    let mean: f64 = c
        .query_one(
            "SELECT sum(row_cost * rows_estimate) / sum(rows_estimate) FROM keyshift.backfill WHERE kind IN ('key', 'fk')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    // (Over the estimates as the scaling read them; the batches correct them since.)
    assert!((mean - 1.0).abs() < 0.05, "mean row cost {mean}");
}
