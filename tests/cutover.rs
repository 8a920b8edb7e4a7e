//! Cutover, rollback and finalize under live traffic through the proxy: clients keep
//! writing (simple and prepared, in transactions) and see no error; a statement prepared
//! before the cutover keeps working after it; the end state is the seeds' (UUID keys, FKs on
//! them); rollback brings the integer keys back with every row written in between.
mod common;
mod migrate_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::proxy::{TestProxy, http, test_config};
use migrate_support::{SEED_004, count, ks_async, ks_expect, seed_004_rows, stdout, text};

async fn migrated_db() -> common::TestDb {
    let db = common::TestDb::new().await;
    db.client()
        .await
        .batch_execute(&format!("{SEED_004}{}", seed_004_rows(30)))
        .await
        .unwrap();
    ks_expect(&db.url(), &["expand"], 0);
    ks_expect(&db.url(), &["backfill"], 0);
    db
}

async fn linked_proxy(db: &common::TestDb) -> TestProxy {
    let mut cfg = test_config();
    cfg.database_url = Some(db.url());
    let p = TestProxy::start_with(cfg);
    wait_status(&p, |v| {
        v["dual_write"] == true && v["database_link"] == "connected"
    })
    .await;
    // The proxy's heartbeat row is written at its first refresh.
    p
}

async fn wait_status(p: &TestProxy, ok: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let start = Instant::now();
    loop {
        let admin = p.admin;
        let (_, body) = tokio::task::spawn_blocking(move || http(admin, "GET", "/v1/status", None))
            .await
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        if ok(&v) {
            return v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "proxy status never matched: {v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Application-like clients through the proxy until `stop`: counts operations and errors.
struct Workload {
    stop: Arc<AtomicBool>,
    ops: Arc<AtomicU64>,
    errors: Arc<std::sync::Mutex<Vec<String>>>,
    max_latency_us: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Workload {
    async fn start(url: &str, clients: usize) -> Workload {
        let stop = Arc::new(AtomicBool::new(false));
        let ops = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
        let max_latency_us = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for i in 0..clients {
            let mut c = common::connect(url).await;
            let (stop, ops, errors, max_lat) = (
                stop.clone(),
                ops.clone(),
                errors.clone(),
                max_latency_us.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let mut n = 0i64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let t = Instant::now();
                    // Reads and writes in whatever shape the keys have: the workload only names
                    // columns that exist before and after cutover.
                    let r: Result<(), tokio_postgres::Error> = async {
                        if i % 2 == 0 {
                            let tx = c.transaction().await?;
                            tx.execute(
                                "INSERT INTO mcp_connectors (name) VALUES ($1)",
                                &[&format!("w{i}-{n}")],
                            )
                            .await?;
                            tx.execute(
                                "UPDATE mcp_servers SET status = $1 WHERE name = $2",
                                &[&format!("s{n}"), &format!("s{}", n % 20 + 1)],
                            )
                            .await?;
                            tx.commit().await?;
                        } else {
                            c.simple_query(&format!(
                                "INSERT INTO mcp_servers (name, status) VALUES ('ws{i}-{n}', 'new')"
                            ))
                            .await?;
                            c.query("SELECT count(*) FROM mcp_server_tools", &[])
                                .await?;
                        }
                        Ok(())
                    }
                    .await;
                    let us = t.elapsed().as_micros() as u64;
                    max_lat.fetch_max(us, Ordering::Relaxed);
                    match r {
                        Ok(()) => {
                            ops.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => errors.lock().unwrap().push(format!("{e:?}")),
                    }
                }
            }));
        }
        Workload {
            stop,
            ops,
            errors,
            max_latency_us,
            tasks,
        }
    }

    async fn stop(self) -> (u64, Vec<String>, Duration) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        let errs = self.errors.lock().unwrap().clone();
        (
            self.ops.load(Ordering::Relaxed),
            errs,
            Duration::from_micros(self.max_latency_us.load(Ordering::Relaxed)),
        )
    }
}

async fn column_type(c: &tokio_postgres::Client, table: &str, column: &str) -> String {
    c.query_one(
        "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = $1::text::regclass AND attname = $2",
        &[&table, &column],
    )
    .await
    .unwrap_or_else(|e| panic!("{table}.{column}: {e}"))
    .get(0)
}

async fn pk_column(c: &tokio_postgres::Client, table: &str) -> String {
    c.query_one(
        "SELECT a.attname::text FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
         WHERE i.indrelid = $1::text::regclass AND i.indisprimary",
        &[&table],
    )
    .await
    .unwrap()
    .get(0)
}

#[tokio::test]
async fn cutover_rollback_and_finalize_under_traffic() {
    let db = migrated_db().await;
    let p = linked_proxy(&db).await;
    let url = p.url("postgres", &db.name);
    let direct = db.client().await;

    // A client that prepared its statement before the cutover and uses it after.
    let early = common::connect(&url).await;
    let early_insert = early.prepare(early_insert_sql()).await.unwrap();
    assert_eq!(
        early
            .execute(&early_insert, &[&"before", &"s1"])
            .await
            .unwrap(),
        1
    );

    let load = Workload::start(&url, 6).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let out = ks_async(&db.url(), &["cutover", "--drain-timeout", "5s"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let report = stdout(&out);
    assert!(
        report.contains("committed") && report.contains("gate closed"),
        "{report}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (ops, errors, max_latency) = load.stop().await;
    assert!(
        errors.is_empty(),
        "clients saw errors across the cutover: {errors:?}"
    );
    assert!(ops > 20, "the workload barely ran ({ops} operations)");
    println!(
        "cutover under load: {ops} operations, 0 errors, longest operation {max_latency:?}\n{report}"
    );

    // The end state of the seeds: uuid primary keys, FKs on them, legacy integers beside.
    for t in ["mcp_connectors", "mcp_servers", "mcp_server_tokens"] {
        assert_eq!(column_type(&direct, t, "id").await, "uuid");
        assert_eq!(pk_column(&direct, t).await, "id");
        assert_eq!(column_type(&direct, t, "id_legacy").await, "integer");
    }
    assert_eq!(
        column_type(&direct, "mcp_servers", "connector_id").await,
        "uuid"
    );
    assert_eq!(
        column_type(&direct, "mcp_servers", "connector_id_legacy").await,
        "integer"
    );
    assert_eq!(count(&direct, "SELECT count(*) FROM pg_constraint WHERE conname = 'mcp_servers_connector_id_fkey' AND contype = 'f'").await, 1);

    // The statement prepared before the cutover still works after it, through the same session.
    assert_eq!(
        early
            .execute(&early_insert, &[&"after", &"s2"])
            .await
            .unwrap(),
        1
    );
    // Reverse dual-write: rows written after cutover have their legacy integers.
    let c = common::connect(&url).await;
    c.batch_execute("INSERT INTO mcp_servers (name, connector_id) SELECT 'post-cutover', id FROM mcp_connectors WHERE name = 'c3'")
        .await
        .unwrap();
    assert_eq!(
        count(&direct, "SELECT count(*) FROM mcp_servers s JOIN mcp_connectors c ON c.id = s.connector_id
                        WHERE s.name = 'post-cutover' AND s.id_legacy IS NOT NULL AND s.connector_id_legacy = c.id_legacy").await,
        1
    );
    assert_eq!(
        count(
            &direct,
            "SELECT count(*) FROM mcp_server_tokens t JOIN mcp_servers s ON s.id = t.mcp_server_id
                        WHERE t.mcp_server_id_legacy IS DISTINCT FROM s.id_legacy"
        )
        .await,
        0,
        "a token's legacy FK disagrees with its server"
    );
    ks_expect(&db.url(), &["verify"], 0);

    // Rollback: the integer keys are primary again, every row written in between included.
    let out = ks_async(&db.url(), &["rollback"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    wait_status(&p, |v| v["dual_write"] == true).await;
    for t in ["mcp_connectors", "mcp_servers"] {
        assert_eq!(column_type(&direct, t, "id").await, "integer");
        assert_eq!(pk_column(&direct, t).await, "id");
    }
    assert_eq!(count(&direct, "SELECT count(*) FROM mcp_servers WHERE name = 'post-cutover' AND connector_id IS NOT NULL").await, 1);
    // The NOT NULL integer FK columns are NOT NULL again (cutover had dropped it), and the
    // CHECK that proved it online is gone.
    for (t, c) in [
        ("connector_access", "connector_id"),
        ("mcp_server_tokens", "mcp_server_id"),
        ("mcp_server_tools", "mcp_server_id"),
    ] {
        let notnull: bool = direct
            .query_one(
                "SELECT attnotnull FROM pg_attribute WHERE attrelid = $1::text::regclass AND attname = $2",
                &[&t, &c],
            )
            .await
            .unwrap()
            .get(0);
        assert!(notnull, "{t}.{c} is nullable after rollback");
    }
    assert_eq!(
        count(
            &direct,
            "SELECT count(*) FROM pg_constraint WHERE conname LIKE '%legacy_not_null'"
        )
        .await,
        0
    );
    assert_eq!(
        early
            .execute(&early_insert, &[&"after-rollback", &"s3"])
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        count(
            &direct,
            "SELECT count(*) FROM mcp_server_tokens WHERE token LIKE 'after%' OR token = 'before'"
        )
        .await,
        3
    );

    // Rollback ends in phase hardened, as harden leaves it: a new uuid-shaped (V2)
    // connection is still accepted, and the next cutover needs no harden first.
    let m = direct
        .query_one("SELECT phase, rules_version FROM keyshift.migration", &[])
        .await
        .unwrap();
    assert_eq!(m.get::<_, String>(0), "hardened");
    let version: i64 = m.get(1);
    wait_status(&p, |v| v["rules_version"] == version).await;
    let mut v2: tokio_postgres::Config = url.parse().unwrap();
    v2.options("-c keyshift.shape=uuid");
    let (v2, conn) = v2
        .connect(tokio_postgres::NoTls)
        .await
        .expect("a uuid-shaped session is accepted after a rollback");
    tokio::spawn(conn);
    let ty: String = v2
        .query_one("SELECT pg_typeof(id)::text FROM mcp_servers LIMIT 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(ty, "uuid");
    drop(v2);

    // Cut over again (no harden in between), finalize.
    let out = ks_async(&db.url(), &["cutover"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    // finalize drops the integer columns: the default shape goes to uuid first, and the
    // early client, integer-shaped, is ended (tests/shapes_operator.rs covers the refusals).
    ks_expect(&db.url(), &["shape", "default", "uuid"], 0);
    let out = ks_async(&db.url(), &["finalize", "--yes", "--terminate"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    wait_status(&p, |v| v["dual_write"] == false).await;
    assert_eq!(count(&direct, "SELECT count(*) FROM pg_attribute WHERE attname LIKE '%_legacy' AND attnum > 0 AND NOT attisdropped AND attrelid = 'mcp_servers'::regclass").await, 0);
    assert!(
        early
            .execute(&early_insert, &[&"final", &"s4"])
            .await
            .is_err(),
        "the integer-shaped session was ended by finalize --terminate"
    );
    // After finalize the proxy passes everything through: the same statement prepared anew.
    let late = common::connect(&url).await;
    assert_eq!(
        late.execute(early_insert_sql(), &[&"final", &"s4"])
            .await
            .unwrap(),
        1
    );
}

fn early_insert_sql() -> &'static str {
    "INSERT INTO mcp_server_tokens (mcp_server_id, token) SELECT id, $1 FROM mcp_servers WHERE name = $2"
}

#[tokio::test]
async fn a_drain_that_times_out_aborts_and_reopens_the_gates() {
    let db = migrated_db().await;
    let p = linked_proxy(&db).await;
    let url = p.url("postgres", &db.name);
    let mut busy = common::connect(&url).await;
    let tx = busy.transaction().await.unwrap();
    tx.execute("UPDATE mcp_servers SET status = 'held' WHERE id = 1", &[])
        .await
        .unwrap();
    let other = common::connect(&url).await;
    let out = ks_async(&db.url(), &["cutover", "--drain-timeout", "300ms"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        err.contains("drain") && err.contains("backend_pid"),
        "{err}"
    );
    // Nothing changed, and traffic flows.
    let direct = db.client().await;
    assert_eq!(column_type(&direct, "mcp_servers", "id").await, "integer");
    wait_status(&p, |v| v["gate"] == "open").await;
    other.simple_query("SELECT 1").await.unwrap();
    tx.commit().await.unwrap();
    // A dry run goes through the whole protocol and changes nothing.
    let out = ks_async(&db.url(), &["cutover", "--dry-run"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(stdout(&out).contains("dry run"), "{}", text(&out));
    assert_eq!(column_type(&direct, "mcp_servers", "id").await, "integer");
    wait_status(&p, |v| v["gate"] == "open").await;
    other.simple_query("SELECT 1").await.unwrap();
    // With --terminate-blockers, a session idling in its transaction is ended and the
    // cutover goes through.
    let tx = busy.transaction().await.unwrap();
    tx.execute("UPDATE mcp_servers SET status = 'held' WHERE id = 1", &[])
        .await
        .unwrap();
    let out = ks_async(
        &db.url(),
        &[
            "cutover",
            "--drain-timeout",
            "300ms",
            "--terminate-blockers",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(column_type(&direct, "mcp_servers", "id").await, "uuid");
    let err = tx.commit().await.unwrap_err();
    assert!(
        err.is_closed() || err.code() == Some(&tokio_postgres::error::SqlState::ADMIN_SHUTDOWN),
        "the blocker's session was ended: {err:?}"
    );
    other.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test]
async fn a_lock_held_elsewhere_exhausts_the_budget_and_names_the_blocker() {
    let db = migrated_db().await;
    let p = linked_proxy(&db).await;
    let direct = db.client().await;
    let mut blocker = db.client().await;
    blocker
        .batch_execute("SET application_name = 'the_blocker'")
        .await
        .unwrap();
    let tx = blocker.transaction().await.unwrap();
    tx.batch_execute("LOCK TABLE mcp_server_tools IN ACCESS SHARE MODE")
        .await
        .unwrap();
    let out = ks_async(
        &db.url(),
        &["cutover", "--lock-timeout", "100ms", "--budget", "1s"],
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("the_blocker"),
        "{}",
        text(&out)
    );
    assert_eq!(column_type(&direct, "mcp_servers", "id").await, "integer");
    wait_status(&p, |v| v["gate"] == "open").await;
    // With --terminate-blockers it goes through.
    let out = ks_async(
        &db.url(),
        &[
            "cutover",
            "--lock-timeout",
            "200ms",
            "--budget",
            "10s",
            "--terminate-blockers",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(column_type(&direct, "mcp_servers", "id").await, "uuid");
    drop(tx);
}

/// Waits until `sql` counts `n` rows (15 s at most); `what` says what never happened.
async fn wait_count(c: &tokio_postgres::Client, sql: &str, n: i64, what: &str) {
    let start = Instant::now();
    while count(c, sql).await != n {
        assert!(start.elapsed() < Duration::from_secs(15), "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until some backend waits for a lock that the backend `holder` holds.
async fn wait_blocked_by(c: &tokio_postgres::Client, holder: i32, what: &str) {
    let sql = format!(
        "SELECT least(count(*), 1) FROM pg_stat_activity WHERE {holder} = ANY(pg_blocking_pids(pid))"
    );
    wait_count(c, &sql, 1, &format!("{what} never waited")).await;
}

/// A session of its own with every row of `table` locked for update, in a transaction left
/// open (`COMMIT` ends it), and its backend's pid.
async fn lock_rows(db: &common::TestDb, table: &str) -> (tokio_postgres::Client, i32) {
    let c = db.client().await;
    c.batch_execute("BEGIN").await.unwrap();
    let pid = c
        .query_one(
            &format!("SELECT pg_backend_pid() FROM {table} FOR NO KEY UPDATE"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    (c, pid)
}

/// The proxy's heartbeat (every 2 s, also a backstop for a missed resume) reads the migration,
/// then, holding the gate, whether the attempt is over. A swap that commits between the two
/// must not open the gate under the rules from before it: the statement held meanwhile would
/// be rewritten for the shape the swap replaced (here an integer-shaped INSERT naming
/// `connector_id_uuid`, gone after the cutover: 42703). Two row locks make that interleaving
/// certain: one keeps the swap from committing until the heartbeat has read the old rules, the
/// other keeps the heartbeat from going on until the swap has committed.
#[tokio::test]
async fn a_swap_committing_during_a_heartbeat_never_opens_the_gate_under_the_old_rules() {
    let db = migrated_db().await;
    let p = linked_proxy(&db).await;
    let direct = db.client().await;
    let held = common::connect(&p.url("postgres", &db.name)).await;
    // The swap's last statement, the phase's UPDATE, waits for this one.
    let (phase_lock, phase_pid) = lock_rows(&db, "keyshift.migration").await;
    let url = db.url();
    let cutover = tokio::spawn(async move {
        ks_async(
            &url,
            &["cutover", "--lock-timeout", "30s", "--budget", "60s"],
        )
        .await
    });
    wait_blocked_by(&direct, phase_pid, "the swap").await;
    assert_eq!(wait_status(&p, |_| true).await["gate"], "closed");
    // The proxy's next heartbeat waits for this one, after its refresh read the old phase.
    let (row_lock, row_pid) = lock_rows(&db, "keyshift.proxies").await;
    wait_blocked_by(&direct, row_pid, "the proxy's heartbeat").await;
    // Held by the gate, written in the integer shape the session has.
    let insert = tokio::spawn(async move {
        held.simple_query(
            "INSERT INTO mcp_servers (connector_id, name, status) VALUES (1, 'held', 'live')",
        )
        .await
        .map(|_| ())
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!insert.is_finished(), "the gate let the INSERT through");
    phase_lock.batch_execute("COMMIT").await.unwrap();
    wait_count(
        &direct,
        "SELECT count(*) FROM keyshift.switch_attempts WHERE state = 'committed'",
        1,
        "the swap never committed",
    )
    .await;
    row_lock.batch_execute("COMMIT").await.unwrap();
    let r = insert.await.unwrap();
    assert!(
        r.is_ok(),
        "the held INSERT ran under the rules from before the swap: {r:?}"
    );
    let out = cutover.await.unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(column_type(&direct, "mcp_servers", "id").await, "uuid");
    assert_eq!(
        count(
            &direct,
            "SELECT count(*) FROM mcp_servers WHERE name = 'held' AND connector_id_legacy = 1
               AND connector_id = (SELECT id FROM mcp_connectors WHERE id_legacy = 1)",
        )
        .await,
        1
    );
}

/// Stands in for a coordinator: the switch tables, then `attempt` (an attempt's INSERT and its
/// pause NOTIFY); returns once the proxy's gate is closed.
async fn pause_by_hand(direct: &tokio_postgres::Client, p: &TestProxy, attempt: &str) {
    direct
        .batch_execute(keyshift::migrate::switch::schema_sql())
        .await
        .unwrap();
    direct.batch_execute(attempt).await.unwrap();
    wait_status(p, |v| v["gate"] == "closed").await;
}

#[tokio::test]
async fn a_coordinator_that_dies_never_leaves_the_gate_closed() {
    let db = migrated_db().await;
    let p = linked_proxy(&db).await;
    let direct = db.client().await;
    // A coordinator that asked for a pause and died: nobody will ever say resume.
    pause_by_hand(
        &direct,
        &p,
        "INSERT INTO keyshift.switch_attempts (id, action, state, drain_timeout_ms, hold_deadline, coordinator)
         VALUES (99, 'cutover', 'pausing', 500, clock_timestamp() + interval '1500 milliseconds', 'dead');
         NOTIFY keyshift, 'pause 99:1'",
    )
    .await;
    let c = common::connect(&p.url("postgres", &db.name)).await;
    let t = Instant::now();
    // (A statement naming a migrated table: one that names none passes a closed gate.)
    c.simple_query("SELECT count(*) FROM mcp_servers")
        .await
        .unwrap();
    // Held until the deadline, then released by the proxy itself.
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "{:?}",
        t.elapsed()
    );
    wait_status(&p, |v| v["gate"] == "open").await;
    wait_count(
        &direct,
        "SELECT count(*) FROM keyshift.proxies WHERE pause_state = 'expired'",
        1,
        "the proxy never reported its expired hold",
    )
    .await;
}

/// A `resume` from an earlier round of the attempt (sent after a lock timeout, read late)
/// leaves the gate of the round the proxy holds for closed: that round's swap may be about to
/// run, and a statement let through now would be rewritten under the rules from before it.
#[tokio::test]
async fn a_resume_from_an_earlier_round_leaves_the_gate_closed() {
    let db = migrated_db().await;
    let p = linked_proxy(&db).await;
    let direct = db.client().await;
    // `direct` stands for the coordinator's session: it stays for the whole test.
    pause_by_hand(
        &direct,
        &p,
        "INSERT INTO keyshift.switch_attempts (id, action, round, state, drain_timeout_ms, hold_deadline, coordinator, coordinator_pid)
         VALUES (97, 'cutover', 2, 'pausing', 500, clock_timestamp() + interval '60 seconds', 'test', pg_backend_pid());
         NOTIFY keyshift, 'pause 97:2'",
    )
    .await;
    direct
        .batch_execute("NOTIFY keyshift, 'resume 97:1'")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        wait_status(&p, |_| true).await["gate"],
        "closed",
        "opened by round 1's resume"
    );
    direct
        .batch_execute(
            "UPDATE keyshift.switch_attempts SET state = 'aborted' WHERE id = 97;
             NOTIFY keyshift, 'resume 97:2'",
        )
        .await
        .unwrap();
    wait_status(&p, |v| v["gate"] == "open").await;
}

/// A coordinator whose database session ends while the gate is held: the proxy notices the
/// session is gone and reopens long before the hold deadline.
#[tokio::test]
async fn a_coordinator_session_that_ends_releases_the_gate_early() {
    let db = migrated_db().await;
    let p = linked_proxy(&db).await;
    let direct = db.client().await;
    let coordinator = db.client().await;
    let pid: i32 = coordinator
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    pause_by_hand(
        &direct,
        &p,
        &format!(
            "INSERT INTO keyshift.switch_attempts (id, action, state, drain_timeout_ms, hold_deadline, coordinator, coordinator_pid)
             VALUES (98, 'cutover', 'pausing', 500, clock_timestamp() + interval '60 seconds', 'test', {pid});
             NOTIFY keyshift, 'pause 98:1'"
        ),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        wait_status(&p, |_| true).await["gate"],
        "closed",
        "held while the coordinator's session lives"
    );
    let t = Instant::now();
    drop(coordinator);
    wait_status(&p, |v| v["gate"] == "open").await;
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "released {:?} after the session ended (deadline was 60 s)",
        t.elapsed()
    );
    let state: String = direct
        .query_one(
            "SELECT pause_state FROM keyshift.proxies WHERE pause_attempt = 98",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(state, "coordinator_gone");
}

/// A proxy that stops cleanly takes itself out of keyshift.proxies: a cutover right after a
/// restart does not have to wait for its heartbeat to age.
#[tokio::test]
async fn a_proxy_stopped_cleanly_does_not_block_a_cutover() {
    let db = migrated_db().await;
    let p = linked_proxy(&db).await;
    let direct = db.client().await;
    let start = Instant::now();
    while count(&direct, "SELECT count(*) FROM keyshift.proxies").await != 1 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "never registered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::task::spawn_blocking(move || p.shutdown())
        .await
        .unwrap();
    assert_eq!(
        count(&direct, "SELECT count(*) FROM keyshift.proxies").await,
        0,
        "the stopped proxy is still registered"
    );
    let out = ks_async(&db.url(), &["cutover"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}

#[tokio::test]
async fn cutover_through_the_admin_endpoint() {
    let db = migrated_db().await;
    let p = linked_proxy(&db).await;
    let admin = p.admin;
    let post = move |path: &'static str, token: Option<&'static str>| {
        tokio::task::spawn_blocking(move || http(admin, "POST", path, token))
    };
    assert_eq!(post("/v1/cutover", None).await.unwrap().0, 401);
    assert_eq!(
        post("/v1/cutover?action=sideways", Some("test-token"))
            .await
            .unwrap()
            .0,
        400
    );
    let (code, body) = post(
        "/v1/cutover?dry_run=true&drain_timeout=3s",
        Some("test-token"),
    )
    .await
    .unwrap();
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["dry_run"], true, "{v}");
    assert_eq!(v["pauses"].as_array().map(|a| a.len()), Some(1), "{v}");
    let (code, body) = post("/v1/cutover", Some("test-token")).await.unwrap();
    assert_eq!(code, 200, "{body}");
    let direct = db.client().await;
    assert_eq!(column_type(&direct, "mcp_servers", "id").await, "uuid");
    // A second cutover is refused, saying why.
    let (code, body) = post("/v1/cutover", Some("test-token")).await.unwrap();
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("rollback"), "{body}");
    // The attempts and pauses show in /metrics (attempt counts at the next heartbeat).
    let start = Instant::now();
    loop {
        let (_, m) = tokio::task::spawn_blocking(move || http(admin, "GET", "/metrics", None))
            .await
            .unwrap();
        if m.contains("keyshift_cutover_attempts{action=\"cutover\",result=\"committed\"} 1")
            && m.contains("keyshift_pause_duration_seconds_count 2")
            && m.contains("keyshift_migration_phase{phase=\"cut_over\"} 1")
        {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{m}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The NOT NULL proofs and the NOT NULL moves wait until after the pause (ddl::after_cutover).
/// A cutover stopped right after its swap leaves them undone: the CHECKs still enforce what
/// the NOT NULLs would, a uuid-shape write that names no legacy integer still works, and
/// `keyshift backfill` (as rollback and finalize) finishes them.
#[tokio::test]
async fn what_a_cutover_leaves_after_its_pause_is_finished_by_the_next_command() {
    let db = migrated_db().await;
    let c = db.client().await;
    ks_expect(&db.url(), &["cutover"], 0);
    let checks =
        "SELECT count(*) FROM pg_constraint WHERE contype = 'c' AND conname LIKE '%\\_not\\_null'";
    // Which of mcp_server_tokens' FK columns are NOT NULL.
    let not_null = || async {
        let q = "SELECT string_agg(attname, ' ' ORDER BY attname) FROM pg_attribute WHERE attrelid = 'mcp_server_tokens'::regclass AND attnotnull AND attname LIKE 'mcp\\_server\\_id%'";
        c.query_one(q, &[]).await.unwrap().get::<_, String>(0)
    };
    assert_eq!(count(&c, checks).await, 0, "the cutover dropped its proofs");
    assert_eq!(not_null().await, "mcp_server_id");
    // As a cutover stopped between its swap and what follows it leaves the tables.
    c.batch_execute(
        "ALTER TABLE mcp_server_tokens ADD CONSTRAINT mcp_server_tokens_mcp_server_id_uuid_not_null CHECK (mcp_server_id IS NOT NULL),
           ADD CONSTRAINT mcp_server_tokens_id_uuid_not_null CHECK (id IS NOT NULL),
           ALTER COLUMN mcp_server_id DROP NOT NULL, ALTER COLUMN mcp_server_id_legacy SET NOT NULL",
    )
    .await
    .unwrap();
    let err = c
        .batch_execute("INSERT INTO mcp_server_tokens (mcp_server_id, token) VALUES (NULL, 'x')")
        .await
        .unwrap_err();
    // Rejected (by the legacy integer's NOT NULL, which the fill trigger could not fill, or
    // by the CHECK), as PostgreSQL rejects it once the NOT NULL has moved.
    use tokio_postgres::error::SqlState;
    assert!(
        [SqlState::NOT_NULL_VIOLATION, SqlState::CHECK_VIOLATION]
            .iter()
            .any(|s| err.code() == Some(s)),
        "{err:?}"
    );
    // A uuid-shape write without the legacy integer: the fill trigger gives it one.
    c.batch_execute(
        "INSERT INTO mcp_server_tokens (mcp_server_id, token) SELECT id, 'uuid-shaped' FROM mcp_servers LIMIT 1",
    )
    .await
    .unwrap();
    ks_expect(&db.url(), &["backfill"], 0);
    assert_eq!(count(&c, checks).await, 0, "backfill finished it");
    assert_eq!(not_null().await, "mcp_server_id");
    ks_expect(&db.url(), &["verify"], 0);
}

async fn naptime(c: &tokio_postgres::Client, value: &str) {
    c.batch_execute(&format!("ALTER SYSTEM SET autovacuum_naptime = '{value}'"))
        .await
        .unwrap();
    c.batch_execute("SELECT pg_reload_conf()").await.unwrap();
}

/// Starts a slow autovacuum of `table` (every page followed by a 100 ms sleep: minutes for
/// this table, as for a big one) and returns once the worker holds it.
async fn slow_autovacuum(c: &tokio_postgres::Client, table: &str) {
    c.batch_execute(&format!(
        "ALTER TABLE {table} SET (autovacuum_vacuum_cost_delay = 100, autovacuum_vacuum_cost_limit = 1,
                                  autovacuum_vacuum_threshold = 0, autovacuum_vacuum_scale_factor = 0);
         UPDATE {table} SET name = name;"
    ))
    .await
    .unwrap();
    let start = Instant::now();
    loop {
        let n = count(
            c,
            &format!(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'autovacuum worker' AND query LIKE '%{table}%'"
            ),
        )
        .await;
        if n > 0 {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "autovacuum never started on {table}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A table autovacuum is vacuuming could not be locked by any swap: PostgreSQL cancels the
/// worker for a lock request only once it has waited `deadlock_timeout` (1 s), and keyshift's
/// requests give up sooner (a `--by-table` group after 50 ms, a pause after 500 ms), so every
/// try failed for as long as the vacuum ran (hours, on a big table). keyshift cancels the
/// worker itself, as PostgreSQL would (src/migrate/autovacuum.rs): both the groups' path
/// and the single swap's pause get their locks.
#[tokio::test]
async fn a_swap_gets_its_locks_on_a_table_autovacuum_is_vacuuming() {
    use keyshift::pgcluster::{Cluster, ClusterOptions};
    // A private cluster whose autovacuum wakes every second. Once a worker holds the table,
    // the naptime goes back to its default so that a cancelled worker does not come back
    // within the test.
    let cluster = Cluster::start(&ClusterOptions {
        settings: vec![("autovacuum_naptime".into(), "1s".into())],
        ..ClusterOptions::default()
    })
    .expect("start a private cluster");
    let url = cluster.url("postgres", "postgres");
    let c = common::connect(&url).await;
    c.batch_execute(&format!("{SEED_004}{}", seed_004_rows(10_000)))
        .await
        .unwrap();
    ks_expect(&url, &["expand"], 0);
    ks_expect(&url, &["backfill"], 0);

    slow_autovacuum(&c, "mcp_servers").await;
    naptime(&c, "1min").await;
    let by_table = ["cutover", "--by-table", "--budget", "3s"];
    let out = ks_expect(&url, &by_table, 0);
    assert!(
        text(&out).contains("cancelled the autovacuum of public.mcp_servers"),
        "{}",
        text(&out)
    );

    naptime(&c, "1s").await;
    slow_autovacuum(&c, "mcp_connectors").await;
    naptime(&c, "1min").await;
    let out = ks_expect(&url, &["rollback", "--budget", "3s"], 0);
    assert!(
        text(&out).contains("cancelled the autovacuum of public.mcp_connectors"),
        "{}",
        text(&out)
    );
    assert_eq!(
        count(&c, "SELECT count(*) FROM mcp_servers WHERE id_uuid IS NULL").await,
        0
    );
}

/// issue [scale]: with `--by-table`, a child's group renames its integer FK aside instead of
/// dropping it, and the FK is dropped alone right after: the group locks only the child, so
/// a session holding the shared parent does not keep the children from being swapped (the
/// drop waits for it, and the parent's own group). Before, every child's group locked the
/// parent for its whole transaction, and its readers waited for each.
#[tokio::test]
async fn by_table_swaps_a_child_while_its_parent_is_held() {
    let db = common::TestDb::new().await;
    let c = db.client().await;
    c.batch_execute(&format!("{SEED_004}{}", seed_004_rows(30)))
        .await
        .unwrap();
    let url = db.url();
    ks_expect(&url, &["expand"], 0);
    ks_expect(&url, &["backfill"], 0);
    let holder = migrate_support::holding(&db, "mcp_connectors").await;
    let out = ks_expect(&url, &migrate_support::BY_TABLE_GIVING_UP, 1);
    let fk_type = |table: &'static str| {
        let c = &c;
        async move {
            let r = c
                .query_one(
                    "SELECT format_type(atttypid, NULL) FROM pg_attribute
                      WHERE attrelid = $1::text::regclass AND attname = 'connector_id'",
                    &[&table],
                )
                .await
                .unwrap();
            r.get::<_, String>(0)
        }
    };
    let swapped = [
        fk_type("connector_access").await,
        fk_type("mcp_servers").await,
    ];
    assert!(
        swapped.iter().any(|t| t == "uuid"),
        "no child of the held parent was swapped: {swapped:?}\n{}",
        text(&out)
    );
    // Its integer FK is still in force, renamed aside, until its drop gets the parent.
    let aside = "SELECT count(*) FROM pg_constraint
                  WHERE contype = 'f' AND confrelid = 'mcp_connectors'::regclass AND conname LIKE '%\\_legacy'";
    assert_eq!(count(&c, aside).await, 1, "{}", text(&out));
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM pg_attribute WHERE attrelid = 'mcp_connectors'::regclass AND attname = 'id' AND atttypid = 'integer'::regtype"
        )
        .await,
        1,
        "the held parent is not swapped"
    );
    holder.batch_execute("ROLLBACK").await.unwrap();
    let out = ks_expect(&url, &["cutover", "--by-table"], 0);
    assert!(
        text(&out).contains("integer FKs set aside and dropped one per transaction"),
        "{}",
        text(&out)
    );
    assert_eq!(count(&c, aside).await, 0);
    ks_expect(&url, &["verify"], 0);
}
