//! `keyshift backfill`: key uuids first, then every FK twin (joining the parent), then a
//! catch-up pass over each FK for rows written around the proxy. Keyset batches along the
//! integer key; each batch is ONE statement that also saves the cursor, so a `kill -9` at any
//! moment loses or repeats nothing.
//!
//! After cutover (phase cut_over) the same command runs the catch-up in reverse
//! ([`run_legacy`]): legacy integers left NULL or stale by writes that bypassed the proxy are
//! set from the parent's legacy key, found through the uuid FK, so that a rollback finds the
//! integer side whole. The phase does not change.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use super::db::{self, DbError, stmt_error};
use super::eta;
use super::plan::{Plan, PlanFk, PlanTable};
use super::progress::{self, Display};
use super::state::{self, Phase, StateError};
use super::{Settings, ddl, partitions};
use crate::ident::qualified;

#[derive(Debug, thiserror::Error)]
pub enum BackfillError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("no migration here: run `keyshift expand` first")]
    NotExpanded,
    #[error(
        "the migration is in phase {0}; backfill runs between expand and cutover, and in phase cut_over (where it repairs the legacy integers)"
    )]
    WrongPhase(Phase),
}

enum Work<'a> {
    /// Find every row whose twin differs from its parent's uuid (one read-only hash join),
    /// then fix those rows in batches.
    Catchup(&'a PlanFk),
    Key(&'a PlanTable),
    Fk(&'a PlanFk),
    /// After cutover: the same for `<fk>_legacy` against the parent's legacy key.
    Legacy(&'a PlanFk),
}

fn key_task(t: &PlanTable) -> String {
    format!("key:{}", qualified(&t.schema, &t.name))
}

fn fk_task(kind: &str, f: &PlanFk) -> String {
    format!(
        "{kind}:{}.{}",
        qualified(&f.child_schema, &f.child_table),
        f.child_column
    )
}

/// Creates the task rows (idempotent). A partitioned child has tasks per leaf partition,
/// so a partition created or attached since the last run gets its own.
pub async fn ensure_tasks(client: &Client, plan: &Plan) -> Result<(), DbError> {
    let fks = partitions::expand_fks(client, plan).await?;
    const SQL: &str = "INSERT INTO keyshift.backfill (task, ord, kind, schema_name, table_name, column_name, rows_estimate)
        VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (task) DO NOTHING";
    let mut rows: Vec<(String, i32, &str, &str, &str, &str, i64)> = Vec::new();
    for (i, t) in plan.tables.iter().enumerate() {
        rows.push((
            key_task(t),
            i as i32,
            "key",
            &t.schema,
            &t.name,
            &t.uuid_column,
            t.row_estimate,
        ));
    }
    for (j, f) in fks.iter().enumerate() {
        let j = j as i32;
        let kinds: &[(&str, i32)] = if ddl::is_fused(plan, f) {
            &[("catchup", 100000)]
        } else {
            &[("fk", 1000), ("catchup", 100000)]
        };
        for &(kind, base) in kinds {
            rows.push((
                fk_task(kind, f),
                base + j,
                kind,
                &f.child_schema,
                &f.child_table,
                &f.uuid_column,
                f.child_row_estimate,
            ));
        }
    }
    for (task, ord, kind, s, t, c, est) in rows {
        client
            .execute(SQL, &[&task, &ord, &kind, &s, &t, &c, &est])
            .await
            .map_err(|e| stmt_error(SQL, e))?;
    }
    Ok(())
}

/// The task rows of the catch-up after cutover (idempotent): created by the first run in
/// phase cut_over, so that status and metrics show no such work before it exists.
async fn ensure_legacy_tasks(client: &Client, plan: &Plan) -> Result<(), DbError> {
    const SQL: &str = "INSERT INTO keyshift.backfill (task, ord, kind, schema_name, table_name, column_name, rows_estimate)
        VALUES ($1, $2, 'legacy', $3, $4, $5, $6) ON CONFLICT (task) DO NOTHING";
    for (j, f) in partitions::expand_fks(client, plan)
        .await?
        .iter()
        .enumerate()
    {
        let task = fk_task("legacy", f);
        let ord = 200000 + j as i32;
        client
            .execute(
                SQL,
                &[
                    &task,
                    &ord,
                    &f.child_schema,
                    &f.child_table,
                    &f.legacy_column,
                    &f.child_row_estimate,
                ],
            )
            .await
            .map_err(|e| stmt_error(SQL, e))?;
    }
    Ok(())
}

/// What one run did.
#[derive(Debug, Default, Clone)]
pub struct Summary {
    pub rows_scanned: i64,
    pub rows_updated: i64,
    pub elapsed: Duration,
    /// The run repaired the legacy side (phase cut_over): there is nothing to harden.
    pub after_cutover: bool,
}

struct Limiter {
    max: Option<u64>,
    start: Instant,
    rows: u64,
}

impl Limiter {
    /// How long to wait so that the rows so far stay under the limit.
    fn after(&mut self, rows: u64) -> Option<Duration> {
        self.rows += rows;
        let max = self.max.filter(|m| *m > 0)?;
        let due = Duration::from_secs_f64(self.rows as f64 / max as f64);
        due.checked_sub(self.start.elapsed())
    }
}

/// Runs (or resumes) the backfill on `client` and the `extra` connections (up to one task
/// each at a time). Does not harden; the CLI chains `harden::run`.
pub async fn run(
    client: &Client,
    extra: &[Client],
    s: &Settings,
) -> Result<Summary, BackfillError> {
    let Some((plan, phase)) = state::load(client).await? else {
        return Err(BackfillError::NotExpanded);
    };
    if phase == Phase::Expanding {
        return Err(BackfillError::NotExpanded);
    }
    if phase == Phase::CutOver {
        return run_legacy(client, extra, s, &plan).await;
    }
    if phase.is_after_cutover() || phase == Phase::Aborting {
        return Err(BackfillError::WrongPhase(phase));
    }
    ensure_tasks(client, &plan).await?;
    // A partitioned child is scanned leaf by leaf, each leaf as a child of its own.
    let fks = partitions::expand_fks(client, &plan).await?;
    // Every pass is done: this run is a new catch-up round (writes that bypassed the proxy
    // since the last one).
    new_round_if_done(client, "kind <> 'legacy'", "kind = 'catchup'").await?;
    super::expand::advance(client, Phase::Backfilling).await?;
    state::event(client, "backfill", "backfill started", None).await?;
    // A table never analyzed has no row estimate; ANALYZE does not block writes.
    let mut rels: Vec<(&str, &str)> = plan
        .tables
        .iter()
        .map(|t| (t.schema.as_str(), t.name.as_str()))
        .collect();
    rels.extend(
        fks.iter()
            .map(|f| (f.child_schema.as_str(), f.child_table.as_str())),
    );
    rels.sort();
    rels.dedup();
    for (schema, table) in rels {
        refresh_estimate(client, schema, table).await?;
    }
    set_row_costs(client, &plan, &fks).await?;

    lock_and_prepare(client, extra).await?;
    let shared = Shared::new(client, s).await?;
    let started = shared.started;
    // Stages run one after the other; the tasks of a stage run side by side (`jobs`).
    // Key passes by dependency level: a child's key pass reads its earlier parents' uuids.
    let mut level: Vec<usize> = Vec::new();
    for t in &plan.tables {
        let l = ddl::fused_fks(&plan, t)
            .iter()
            .filter_map(|f| {
                plan.tables
                    .iter()
                    .position(|x| x.schema == f.parent_schema && x.name == f.parent_table)
            })
            .map(|p| level.get(p).copied().unwrap_or(0) + 1)
            .max()
            .unwrap_or(0);
        level.push(l);
    }
    let mut stages: Vec<Vec<(String, Work)>> = Vec::new();
    for l in 0..=level.iter().copied().max().unwrap_or(0) {
        stages.push(
            plan.tables
                .iter()
                .zip(&level)
                .filter(|(_, x)| **x == l)
                .map(|(t, _)| (key_task(t), Work::Key(t)))
                .collect(),
        );
    }
    let key_stages = stages.len();
    stages.push(
        fks.iter()
            .filter(|f| !ddl::is_fused(&plan, f))
            .map(|f| (fk_task("fk", f), Work::Fk(f)))
            .collect(),
    );
    stages.push(
        fks.iter()
            .map(|f| (fk_task("catchup", f), Work::Catchup(f)))
            .collect(),
    );
    for (i, stage) in stages.iter().enumerate() {
        if i == key_stages {
            // Before any FK pass reads the parents' uuids: key uuids still NULL (an explicit
            // NULL, or a path that skipped the default) get one.
            let mut sum = Summary::default();
            key_catchup(client, &plan, s, &mut sum).await?;
            lock(&shared.sum).rows_updated += sum.rows_updated;
        }
        run_stage(client, extra, &plan, stage, s, &shared).await?;
    }
    let mut sum = lock(&shared.sum).clone();
    sum.elapsed = started.elapsed();
    unlock(client).await?;
    super::expand::advance(client, Phase::Backfilled).await?;
    state::event(
        client,
        "backfill",
        &format!(
            "backfill done: {} rows scanned, {} updated in {:.1}s",
            sum.rows_scanned,
            sum.rows_updated,
            sum.elapsed.as_secs_f64()
        ),
        None,
    )
    .await?;
    Ok(sum)
}

/// After cutover: legacy keys still NULL get one from their default, then every FK's
/// legacy integer is caught up with the parent's, found through the uuid FK. Batched and
/// online like the forward catch-up, one FK per connection at a time; the phase stays
/// cut_over. Killed, it is simply run again: each pass searches afresh.
pub async fn run_legacy(
    client: &Client,
    extra: &[Client],
    s: &Settings,
    plan: &Plan,
) -> Result<Summary, BackfillError> {
    // What a cutover stopped after its swap left undone (ddl::after_cutover).
    for st in ddl::after_cutover(plan) {
        db::run_step(client, &st, s).await?;
    }
    ensure_legacy_tasks(client, plan).await?;
    new_round_if_done(client, "kind = 'legacy'", "kind = 'legacy'").await?;
    state::event(
        client,
        "backfill",
        "backfill after cutover started: catching up the legacy integers",
        None,
    )
    .await?;
    lock_and_prepare(client, extra).await?;
    let shared = Shared::new(client, s).await?;
    let started = shared.started;
    // Parents first: a legacy key filled here is what the FK catch-up copies into children.
    let mut filled = 0;
    for t in &plan.tables {
        filled += legacy_key_catchup(client, t, s).await?;
    }
    lock(&shared.sum).rows_updated += filled;
    let fks = partitions::expand_fks(client, plan).await?;
    let stage: Vec<(String, Work)> = fks
        .iter()
        .map(|f| (fk_task("legacy", f), Work::Legacy(f)))
        .collect();
    run_stage(client, extra, plan, &stage, s, &shared).await?;
    let mut sum = lock(&shared.sum).clone();
    sum.elapsed = started.elapsed();
    sum.after_cutover = true;
    unlock(client).await?;
    state::event(
        client,
        "backfill",
        &format!(
            "backfill after cutover done: {} legacy integer(s) repaired in {:.1}s",
            sum.rows_updated,
            sum.elapsed.as_secs_f64()
        ),
        None,
    )
    .await?;
    Ok(sum)
}

/// When no task matching `tasks` is left to do, this run is a new catch-up round: the tasks
/// matching `reset` start again (the passes whose cursors are done stay done).
async fn new_round_if_done(client: &Client, tasks: &str, reset: &str) -> Result<(), DbError> {
    let q = format!("SELECT count(*) FROM keyshift.backfill WHERE NOT done AND {tasks}");
    let pending: i64 = client
        .query_one(&q, &[])
        .await
        .map_err(|e| stmt_error(&q, e))?
        .get(0);
    if pending == 0 {
        db::exec(
            client,
            &format!(
                "UPDATE keyshift.backfill SET done = false, cursor = NULL, rows_done = 0, rows_updated = 0, \
                 batches = 0, started_at = NULL, finished_at = NULL WHERE {reset}"
            ),
        )
        .await?;
        tracing::info!("every pass was done: running a new catch-up round");
    }
    Ok(())
}

/// One backfill at a time. A killed run's session keeps this lock until its backend has
/// finished its last statement, so a new run also waits for that.
async fn lock_and_prepare(client: &Client, extra: &[Client]) -> Result<(), DbError> {
    let key = "SELECT pg_try_advisory_lock(hashtext('keyshift backfill'))";
    let got: bool = client
        .query_one(key, &[])
        .await
        .map_err(|e| stmt_error(key, e))?
        .get(0);
    if !got {
        tracing::warn!(
            "another backfill holds the lock (or a killed one is finishing its last statement); waiting for it"
        );
        db::exec(client, "SET lock_timeout = 0").await?;
        db::exec(
            client,
            "SELECT pg_advisory_lock(hashtext('keyshift backfill'))",
        )
        .await?;
    }
    for c in std::iter::once(client).chain(extra) {
        prepare_session(c).await?;
    }
    Ok(())
}

async fn unlock(client: &Client) -> Result<(), DbError> {
    db::exec(
        client,
        "SELECT pg_advisory_unlock(hashtext('keyshift backfill'))",
    )
    .await
}

/// The tasks of one stage side by side, one per connection at a time.
async fn run_stage(
    client: &Client,
    extra: &[Client],
    plan: &Plan,
    stage: &[(String, Work<'_>)],
    s: &Settings,
    shared: &Shared,
) -> Result<(), DbError> {
    let clients: Vec<&Client> = std::iter::once(client).chain(extra).collect();
    let queue = Mutex::new(stage.iter().collect::<std::collections::VecDeque<_>>());
    let workers = clients.iter().map(|c| async {
        loop {
            let next = lock(&queue).pop_front();
            let Some((task, w)) = next else {
                return Ok::<(), DbError>(());
            };
            run_task(c, plan, task, w, s, shared).await?;
        }
    });
    for r in futures_util::future::join_all(workers).await {
        r?;
    }
    Ok(())
}

struct Shared {
    started: Instant,
    display: Mutex<Display>,
    limiter: Mutex<Limiter>,
    sum: Mutex<Summary>,
}

impl Shared {
    /// Starts the clock of the run: its ETA and its summary count from here.
    async fn new(client: &Client, s: &Settings) -> Result<Shared, DbError> {
        let q = "SELECT ... FROM keyshift.backfill";
        let tasks = progress::read_tasks(client)
            .await
            .map_err(|e| stmt_error(q, e))?;
        let started = Instant::now();
        Ok(Shared {
            display: Mutex::new(Display::new(started, &tasks)),
            limiter: Mutex::new(Limiter {
                max: s.max_rows_per_sec,
                start: started,
                rows: 0,
            }),
            sum: Mutex::new(Summary::default()),
            started,
        })
    }
}

/// A poisoned lock only means another worker panicked; its data is still usable here.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

async fn prepare_session(c: &Client) -> Result<(), DbError> {
    // A crash can lose the last commits, but each one holds its rows AND its cursor: a lost
    // batch is simply redone. So the batches need not wait for the WAL flush.
    db::exec(c, "SET synchronous_commit = off").await?;
    // Plans for the bounds actually passed: a generic plan would guess the range's size.
    db::exec(c, "SET plan_cache_mode = force_custom_plan").await
}

/// Runs one task to its end (or resumes it).
async fn run_task(
    client: &Client,
    plan: &Plan,
    task: &str,
    w: &Work<'_>,
    s: &Settings,
    shared: &Shared,
) -> Result<(), DbError> {
    let row = client
        .query_one(
            "SELECT done, cursor, rows_done, rows_estimate FROM keyshift.backfill WHERE task = $1",
            &[&task],
        )
        .await
        .map_err(|e| stmt_error("SELECT ... FROM keyshift.backfill", e))?;
    let done: bool = row.get(0);
    if done {
        return Ok(());
    }
    let mut cursor: Option<i64> = row.get(1);
    let rows_done: i64 = row.get(2);
    let estimate: i64 = row.get(3);
    let catchup_sql = match w {
        Work::Catchup(f) => Some((ddl::catchup_find(f), ddl::catchup_fix(f))),
        Work::Legacy(f) => Some((
            ddl::legacy_catchup_find(plan, f),
            ddl::legacy_catchup_fix(plan, f),
        )),
        Work::Key(_) | Work::Fk(_) => None,
    };
    if let Some((find, fix)) = catchup_sql {
        catchup(client, &find, &fix, task, s, shared).await?;
        return mark_done(client, task).await;
    }
    let (bounds, sql, span, by_ctid) = match w {
        Work::Key(t) => {
            let tb = qualified(&t.schema, &t.name);
            (
                ddl::key_bounds(&tb, &t.key),
                ddl::key_batch(plan, t),
                ddl::key_span(&tb, &t.key),
                false,
            )
        }
        Work::Fk(f) | Work::Catchup(f) | Work::Legacy(f) => (
            ddl::fk_bounds(f),
            ddl::fk_batch(f),
            ddl::fk_span(f),
            f.child_batch_key.is_none(),
        ),
    };
    let start = "UPDATE keyshift.backfill SET started_at = COALESCE(started_at, clock_timestamp()) WHERE task = $1";
    client
        .execute(start, &[&task])
        .await
        .map_err(|e| stmt_error(start, e))?;
    let bounds_stmt = client
        .prepare(&bounds)
        .await
        .map_err(|e| stmt_error(&bounds, e))?;
    let stmt = client
        .prepare(&sql)
        .await
        .map_err(|e| stmt_error(&sql, e))?;
    // With ctid batches, $2 is pages per batch: about batch_size rows at ~50 rows a page.
    let size = if by_ctid {
        (s.batch_size / 50).max(1)
    } else {
        s.batch_size
    };
    // Where this run starts and where the task ends, for the estimate of the rows left.
    let r = client
        .query_one(&span, &[])
        .await
        .map_err(|e| stmt_error(&span, e))?;
    let (first, mut top): (Option<i64>, Option<i64>) = (r.get(0), r.get(1));
    let from = cursor.or(first.map(|f| f.saturating_sub(1)));
    let mut scanned_here = 0i64;
    let mut bar = lock(&shared.display).task(task, estimate, rows_done);
    loop {
        let lo = if by_ctid {
            cursor.map(|c| c + 1).unwrap_or(0)
        } else {
            cursor.unwrap_or(i64::MIN)
        };
        let t0 = Instant::now();
        let r = client
            .query_one(&bounds_stmt, &[&lo, &size])
            .await
            .map_err(|e| stmt_error(&bounds, e))?;
        let hi: Option<i64> = r.get(0);
        let scanned: i64 = r.get(1);
        let Some(hi) = hi else { break };
        let r = client
            .query_one(&stmt, &[&lo, &hi, &task, &scanned, &cursor])
            .await
            .map_err(|e| stmt_error(&sql, e))?;
        let (updated, saved): (i64, i64) = (r.get(0), r.get(1));
        let ms = t0.elapsed().as_secs_f64() * 1000.0;
        if saved == 0 {
            // Someone else moved the cursor (the last statement of a killed run committing
            // late): this batch counted nothing; start again from the stored cursor.
            let q = "SELECT cursor FROM keyshift.backfill WHERE task = $1";
            cursor = client
                .query_one(q, &[&task])
                .await
                .map_err(|e| stmt_error(q, e))?
                .get(0);
            continue;
        }
        cursor = Some(hi);
        scanned_here += scanned;
        if by_ctid && top.is_some_and(|t| hi >= t) {
            // The batch's own updates may have added pages past the end seen at the start.
            top = client
                .query_one(&span, &[])
                .await
                .map_err(|e| stmt_error(&span, e))?
                .get(1);
        }
        let left = match (from, top) {
            (Some(f), Some(t)) => eta::remaining_along_key(f, hi, t, scanned_here),
            _ => None,
        };
        {
            let mut sum = lock(&shared.sum);
            sum.rows_scanned += scanned;
            sum.rows_updated += updated;
        }
        let rate = {
            let mut d = lock(&shared.display);
            d.advance(&mut bar, scanned.max(0) as u64, left);
            d.rate()
        };
        // Best effort, outside the batch: only for display, status and metrics. The
        // corrected estimate replaces reltuples, which is stale once rows have moved.
        let _ = client
            .execute(
                "UPDATE keyshift.backfill SET last_batch_ms = $2, rows_per_sec = $3, \
                 rows_estimate = COALESCE(rows_done + $4, rows_estimate) WHERE task = $1",
                &[&task, &ms, &rate, &left],
            )
            .await;
        let pause = lock(&shared.limiter).after(scanned.max(0) as u64);
        if let Some(p) = pause {
            tokio::time::sleep(p).await;
        }
    }
    lock(&shared.display).finish(&bar);
    mark_done(client, task).await
}

/// The catch-up pass of one FK, either side (`find` and `fix` from [`ddl::Twin`]). Finding
/// the rows is one read-only query (a hash join of child and parent: far cheaper than a
/// lookup per row, and it takes no lock that blocks writes); fixing them goes in batches,
/// each re-checking its rows. A kill just means the next run searches again.
async fn catchup(
    client: &Client,
    find: &str,
    fix: &str,
    task: &str,
    s: &Settings,
    shared: &Shared,
) -> Result<(), DbError> {
    // Bounded, so that a huge backlog cannot exhaust memory: searched again until done.
    const FIND_LIMIT: i64 = 1_000_000;
    let mark = "UPDATE keyshift.backfill SET started_at = COALESCE(started_at, clock_timestamp()), \
                rows_done = rows_done + $2, rows_updated = rows_updated + $3, batches = batches + $4, \
                last_batch_ms = $5, updated_at = clock_timestamp() WHERE task = $1";
    loop {
        let found: Vec<String> = client
            .query(find, &[&FIND_LIMIT])
            .await
            .map_err(|e| stmt_error(find, e))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let mut bar = {
            let mut d = lock(&shared.display);
            d.searched(task, found.len());
            d.task(task, found.len() as i64, 0)
        };
        for chunk in found.chunks(s.batch_size.max(1) as usize) {
            let t0 = Instant::now();
            let n = client
                .execute(fix, &[&chunk])
                .await
                .map_err(|e| stmt_error(fix, e))? as i64;
            let ms = t0.elapsed().as_secs_f64() * 1000.0;
            lock(&shared.sum).rows_updated += n;
            client
                .execute(mark, &[&task, &(chunk.len() as i64), &n, &1i64, &ms])
                .await
                .map_err(|e| stmt_error(mark, e))?;
            lock(&shared.display).advance(&mut bar, chunk.len() as u64, None);
        }
        lock(&shared.display).finish(&bar);
        if (found.len() as i64) < FIND_LIMIT {
            return Ok(());
        }
    }
}

async fn mark_done(client: &Client, task: &str) -> Result<(), DbError> {
    let sql =
        "UPDATE keyshift.backfill SET done = true, finished_at = clock_timestamp() WHERE task = $1";
    client
        .execute(sql, &[&task])
        .await
        .map_err(|e| stmt_error(sql, e))?;
    Ok(())
}

async fn key_catchup(
    client: &Client,
    plan: &Plan,
    s: &Settings,
    sum: &mut Summary,
) -> Result<(), DbError> {
    // Bounded, so that a huge backlog cannot exhaust memory: searched again until done.
    const FIND_LIMIT: i64 = 1_000_000;
    for t in &plan.tables {
        let (find, fix) = (ddl::key_catchup(t), ddl::key_catchup_fix(plan, t));
        loop {
            let keys: Vec<i64> = client
                .query(&find, &[&FIND_LIMIT])
                .await
                .map_err(|e| stmt_error(&find, e))?
                .iter()
                .map(|r| r.get(0))
                .collect();
            for chunk in keys.chunks(s.batch_size.max(1) as usize) {
                let n = client
                    .execute(&fix, &[&chunk])
                    .await
                    .map_err(|e| stmt_error(&fix, e))?;
                sum.rows_updated += n as i64;
            }
            if (keys.len() as i64) < FIND_LIMIT {
                break;
            }
        }
    }
    Ok(())
}

/// After cutover: the legacy keys of `t` still NULL get one from the column's default, in
/// batches; returns how many. Stops (with a warning) when the default gives NULL, which
/// leaves those rows for the operator: nothing else knows what their integer should be.
async fn legacy_key_catchup(client: &Client, t: &PlanTable, s: &Settings) -> Result<i64, DbError> {
    let Some(sql) = ddl::legacy_key_catchup(t) else {
        return Ok(0);
    };
    let mut filled = 0;
    loop {
        let r = client
            .query_one(&sql, &[&s.batch_size])
            .await
            .map_err(|e| stmt_error(&sql, e))?;
        let (written, got): (i64, i64) = (r.get(0), r.get(1));
        filled += got;
        if written == 0 {
            return Ok(filled);
        }
        if got < written {
            tracing::warn!(
                table = %qualified(&t.schema, &t.name),
                column = %t.legacy_column,
                "legacy keys are NULL and the column's default gives none: set them by hand (keyshift verify lists them)"
            );
            return Ok(filled);
        }
    }
}

/// What a row of each key and FK pass costs, for the ETA ([`eta::row_cost`]): the table's
/// indexes, which every row's update writes an entry in, and the parents each row looks up
/// (a key pass fills the twins of FKs to parents filled before it, an FK pass its own).
/// Scaled so that the run's rows cost 1 on average: the rate in row-equivalents that status
/// and the metrics show stays the run's rows per second on average.
async fn set_row_costs(client: &Client, plan: &Plan, fks: &[PlanFk]) -> Result<(), DbError> {
    let mut tasks: Vec<(String, String, i64)> = plan
        .tables
        .iter()
        .map(|t| {
            let lookups = ddl::fused_fks(plan, t).len() as i64;
            (key_task(t), qualified(&t.schema, &t.name), lookups)
        })
        .collect();
    tasks.extend(fks.iter().filter(|f| !ddl::is_fused(plan, f)).map(|f| {
        (
            fk_task("fk", f),
            qualified(&f.child_schema, &f.child_table),
            1,
        )
    }));
    // Two round trips whatever the number of tables (thousands on a big schema).
    let rels: Vec<&str> = tasks.iter().map(|(_, rel, _)| rel.as_str()).collect();
    let q = "SELECT (SELECT count(*) FROM pg_index WHERE indrelid = to_regclass(r)) FROM unnest($1::text[]) WITH ORDINALITY AS x(r, i) ORDER BY i";
    let indexes = client
        .query(q, &[&rels])
        .await
        .map_err(|e| stmt_error(q, e))?;
    let (names, costs): (Vec<&str>, Vec<f64>) = tasks
        .iter()
        .zip(&indexes)
        .map(|((task, _, lookups), r)| (task.as_str(), eta::row_cost(r.get(0), *lookups)))
        .unzip();
    let upd = "UPDATE keyshift.backfill b SET row_cost = x.cost FROM unnest($1::text[], $2::float8[]) AS x(task, cost) WHERE b.task = x.task";
    client
        .execute(upd, &[&names, &costs])
        .await
        .map_err(|e| stmt_error(upd, e))?;
    let scale = "UPDATE keyshift.backfill SET row_cost = row_cost / m.mean
        FROM (SELECT sum(row_cost * rows_estimate) / sum(rows_estimate) AS mean
                FROM keyshift.backfill WHERE kind IN ('key', 'fk') HAVING sum(rows_estimate) > 0) m
       WHERE kind IN ('key', 'fk') AND m.mean > 0";
    db::exec(client, scale).await
}

async fn refresh_estimate(client: &Client, schema: &str, table: &str) -> Result<(), DbError> {
    let rel = qualified(schema, table);
    let q = "SELECT reltuples::bigint FROM pg_class WHERE oid = to_regclass($1::text)";
    let est: Option<i64> = client
        .query_opt(q, &[&rel])
        .await
        .map_err(|e| stmt_error(q, e))?
        .map(|r| r.get(0));
    if est.is_some_and(|e| e < 0) {
        db::exec(client, &format!("ANALYZE {rel}")).await?;
    }
    let upd = "UPDATE keyshift.backfill b SET rows_estimate = GREATEST(c.reltuples, 0)::bigint
                 FROM pg_class c WHERE c.oid = to_regclass($1::text) AND b.schema_name = $2 AND b.table_name = $3 AND NOT b.done";
    client
        .execute(upd, &[&rel, &schema, &table])
        .await
        .map_err(|e| stmt_error(upd, e))?;
    Ok(())
}
