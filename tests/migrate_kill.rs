//! The backfill under stress: SIGKILL at random moments then resume, and direct writes to
//! PostgreSQL (not through the proxy) while it runs.
mod common;
mod migrate_support;

use std::time::{Duration, Instant};

use migrate_support::*;
use rand::Rng;

async fn db_with(sql: &str) -> common::TestDb {
    let db = common::TestDb::new().await;
    db.client().await.batch_execute(sql).await.expect("schema");
    db
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_points_then_resume() {
    let n = 1500;
    let db = db_with(&format!("{SEED_004}{}", seed_004_rows(n))).await;
    let url = db.url();
    ks_expect(&url, &["expand"], 0);
    let mut rng = rand::rng();
    let mut kills = 0;
    let mut finished = false;
    let start = Instant::now();
    while kills < 12 && start.elapsed() < Duration::from_secs(60) {
        // Throttled so that each run does at most ~3,000 of the 10,500 rows before it
        // is killed: at least 3 kills land inside the key passes, whatever the machine.
        let mut child = spawn_ks(
            &url,
            &[
                "backfill",
                "--batch-size",
                "97",
                "--max-rows-per-sec",
                "5000",
            ],
        );
        let wait = Duration::from_millis(rng.random_range(30..600));
        tokio::time::sleep(wait).await;
        if let Some(status) = child.try_wait().expect("try_wait") {
            assert!(status.success(), "backfill failed on its own: {status}");
            finished = true;
            break;
        }
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        let _ = child.wait();
        kills += 1;
    }
    assert!(
        kills >= 3,
        "the backfill was interrupted only {kills} time(s)"
    );
    // Resume to the end.
    ks_expect(&url, &["backfill", "--batch-size", "97"], 0);
    ks_expect(&url, &["verify"], 0);
    // Counts are exact: every row scanned once by its key pass and its FK pass (a batch
    // applied twice would count twice, a lost one would leave a NULL that verify reports).
    let c = db.client().await;
    let rows = [
        ("mcp_connectors", n),
        ("connector_access", n),
        ("mcp_servers", 2 * n),
        ("mcp_server_tokens", 2 * n),
        ("mcp_server_tools", 2 * n),
    ];
    for (t, want) in rows {
        let done = count(
            &c,
            &format!("SELECT rows_done FROM keyshift.backfill WHERE task = 'key:public.{t}'"),
        )
        .await;
        assert_eq!(done, want, "key pass of {t}");
        let updated = count(
            &c,
            &format!("SELECT rows_updated FROM keyshift.backfill WHERE task = 'key:public.{t}'"),
        )
        .await;
        assert_eq!(updated, want, "key pass of {t} updated");
    }
    // The FK twins were filled by the key passes (parents first): the catch-up found nothing
    // to repair, so no batch was lost between kills.
    assert_eq!(
        count(
            &c,
            "SELECT sum(rows_updated)::bigint FROM keyshift.backfill WHERE kind = 'catchup'"
        )
        .await,
        0
    );
    assert_eq!(
        count(&c, "SELECT count(*) FROM keyshift.backfill WHERE NOT done").await,
        0
    );
    eprintln!("killed {kills} time(s), finished on its own: {finished}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_writes_during_backfill() {
    let n = 1000;
    let db = db_with(&format!("{SEED_004}{}", seed_004_rows(n))).await;
    let url = db.url();
    ks_expect(&url, &["expand"], 0);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..2u64 {
        let c = db.client().await;
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let mut ops = 0u64;
            let mut i = 0i64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                let k = (i * 37 + w as i64 * 101) % n + 1;
                let sql = match i % 5 {
                    // Inserts of children (twin left NULL: no proxy here).
                    0 => format!("INSERT INTO mcp_servers (connector_id, name) VALUES ({k}, 'w{w}-{i}')"),
                    1 => format!("INSERT INTO connector_access (connector_id, user_id) VALUES ({k}, 'w{w}')"),
                    // FK updates (twin left stale).
                    2 => format!("UPDATE mcp_servers SET connector_id = {} WHERE id = {}", (k % n) + 1, (k * 3) % (2 * n) + 1),
                    // Deletes cascading through both FKs (after harden) or the integer FK.
                    3 => format!(
                        "DELETE FROM mcp_server_tokens WHERE mcp_server_id IN (SELECT id FROM mcp_servers WHERE connector_id = {k});
                         DELETE FROM mcp_server_tools WHERE mcp_server_id IN (SELECT id FROM mcp_servers WHERE connector_id = {k});
                         DELETE FROM mcp_connectors WHERE id = {k}"
                    ),
                    _ => format!("INSERT INTO mcp_connectors (name) VALUES ('w{w}-{i}')"),
                };
                match c.batch_execute(&sql).await {
                    Ok(()) => ops += 1,
                    // A deleted connector makes some inserts fail their FK: expected.
                    Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::FOREIGN_KEY_VIOLATION) => {}
                    Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::T_R_DEADLOCK_DETECTED) => {}
                    Err(e) => panic!("{sql}: {e}"),
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            ops
        }));
    }
    let url2 = url.clone();
    let o = tokio::task::spawn_blocking(move || {
        ks(
            &url2,
            &[
                "backfill",
                "--batch-size",
                "50",
                "--skip-harden",
                "--jobs",
                "2",
                // At least ~0.7 s of backfill for the writers to run beside, on any machine.
                "--max-rows-per-sec",
                "10000",
            ],
        )
    })
    .await
    .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut ops = 0;
    for w in writers {
        ops += w.await.unwrap();
    }
    assert!(ops > 50, "the writers barely ran ({ops} ops)");
    // Writes after the last catch-up are caught by a new round; harden then validates.
    ks_expect(&url, &["backfill", "--batch-size", "500"], 0);
    let o = ks_expect(&url, &["verify"], 0);
    assert!(stdout(&o).contains("checks passed"), "{}", text(&o));
    let c = db.client().await;
    assert_eq!(
        count(&c, "SELECT count(*) FROM mcp_servers s JOIN mcp_connectors c ON c.id = s.connector_id WHERE s.connector_id_uuid IS DISTINCT FROM c.id_uuid").await,
        0
    );
    eprintln!("{ops} direct writes during the backfill");
}
