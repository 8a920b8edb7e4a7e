//! The coordinator of cutover and rollback: pause every proxy, swap in one transaction,
//! resume. The protocol (tables, notifications, who does what when) is `docs/cutover.md`;
//! the proxies' side is `proxy::control`.

use std::time::{Duration, Instant};

use serde::Serialize;
use tokio_postgres::Client;
use tokio_postgres::error::SqlState;
use tracing::{debug, info, warn};

use super::db::{self, DbError};
use super::ddl::{self, Mode};
use super::state::{self, Phase};
use super::{Settings, autovacuum, by_table, carry, shapes, verify};

/// A proxy is live when its heartbeat is this recent (three heartbeats).
pub const LIVE_WITHIN: &str = "6 seconds";
/// A proxy seen more recently than this but not live may be up and unreachable: refuse.
pub const GONE_AFTER: &str = "60 seconds";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Cutover,
    Rollback,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Cutover => "cutover",
            Action::Rollback => "rollback",
        }
    }
}

#[derive(Debug, Clone)]
pub struct SwitchOptions {
    pub action: Action,
    pub drain_timeout: Duration,
    pub lock_timeout: Duration,
    pub budget: Duration,
    pub terminate_blockers: bool,
    pub dry_run: bool,
    /// Cutover only: swap the tables group by group, gates open, after a pause that only
    /// changes the phase (src/migrate/by_table.rs).
    pub by_table: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum SwitchError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("{0}")]
    State(#[from] state::StateError),
    #[error("verify: {0}")]
    Verify(#[from] verify::VerifyError),
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Aborted(String),
    /// `--by-table` stopped after its pause: some tables are swapped, the migration stays
    /// in phase cutting_over, and a rerun resumes.
    #[error("{0}")]
    Interrupted(String),
}

fn q(e: tokio_postgres::Error, what: &str) -> SwitchError {
    SwitchError::Db(db::stmt_error(what, e))
}

/// What happened, for the command's output and `POST /v1/cutover`.
#[derive(Debug, Serialize)]
pub struct SwitchReport {
    pub action: Action,
    pub attempt: i64,
    pub rounds: i32,
    pub dry_run: bool,
    pub committed: bool,
    /// Milliseconds the swap transaction took, for the round that ended.
    pub swap_ms: f64,
    /// Each live proxy and how long its gate was closed.
    pub pauses: Vec<ProxyPause>,
    /// `--by-table`: the groups swapped after the pause.
    pub by_table: Option<by_table::ByTableReport>,
}

#[derive(Debug, Serialize)]
pub struct ProxyPause {
    pub proxy: String,
    pub pause_ms: Option<f64>,
    pub state: Option<String>,
}

/// The switch tables; also created by the coordinator, so that older state works.
pub fn schema_sql() -> &'static str {
    "CREATE TABLE IF NOT EXISTS keyshift.switch_attempts (
    id bigserial PRIMARY KEY,
    action text NOT NULL,
    round int NOT NULL DEFAULT 1,
    state text NOT NULL,
    dry_run boolean NOT NULL DEFAULT false,
    drain_timeout_ms int NOT NULL,
    hold_deadline timestamptz NOT NULL,
    coordinator text NOT NULL,
    started_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    finished_at timestamptz,
    outcome jsonb
);
ALTER TABLE keyshift.proxies
    ADD COLUMN IF NOT EXISTS pause_attempt bigint,
    ADD COLUMN IF NOT EXISTS pause_round int,
    ADD COLUMN IF NOT EXISTS pause_state text,
    ADD COLUMN IF NOT EXISTS pause_ms double precision,
    ADD COLUMN IF NOT EXISTS busy jsonb;
ALTER TABLE keyshift.switch_attempts ADD COLUMN IF NOT EXISTS coordinator_pid int;
-- The phase the attempt's swap commits (NULL: it changes none, a by-table group's own pause):
-- the proxies build its rules while they hold their gates (src/proxy/control.rs).
ALTER TABLE keyshift.switch_attempts ADD COLUMN IF NOT EXISTS to_phase text"
}

async fn live_proxies(client: &Client, version: i64) -> Result<Vec<String>, SwitchError> {
    let rows = client
        .query(
            &format!(
                "SELECT id, coalesce(acked_rules_version, 0), heartbeat_at > now() - interval '{LIVE_WITHIN}'
                 FROM keyshift.proxies WHERE heartbeat_at > now() - interval '{GONE_AFTER}' ORDER BY id"
            ),
            &[],
        )
        .await
        .map_err(|e| q(e, "SELECT … FROM keyshift.proxies"))?;
    let mut live = Vec::new();
    let mut problems = Vec::new();
    for r in rows {
        let id: String = r.get(0);
        let acked: i64 = r.get(1);
        let fresh: bool = r.get(2);
        if !fresh {
            problems.push(format!(
                "proxy {id} has not sent a heartbeat for more than {LIVE_WITHIN}: it may be running and unreachable; wait for it or stop it (it is forgotten after {GONE_AFTER})"
            ));
        } else if acked != version {
            problems.push(format!(
                "proxy {id} applies rules version {acked}, not the current {version}: it has not caught up yet"
            ));
        }
        live.push(id);
    }
    if problems.is_empty() {
        Ok(live)
    } else {
        Err(SwitchError::Refused(problems.join("\n")))
    }
}

/// Runs a cutover or rollback to the end. On any failure every gate is open again and the
/// schema is as it was.
pub async fn run(
    client: &Client,
    opts: &SwitchOptions,
    settings: &Settings,
) -> Result<SwitchReport, SwitchError> {
    let m = state::load_migration(client).await?.ok_or_else(|| {
        SwitchError::Refused("no migration here: run `keyshift expand` first".into())
    })?;
    if opts.by_table {
        if opts.action == Action::Rollback {
            return Err(SwitchError::Refused(
                "--by-table is for cutover only: rollback swaps every table in one transaction"
                    .into(),
            ));
        }
        if opts.dry_run {
            return Err(SwitchError::Refused(
                "--dry-run rolls one swap back; with --by-table each group of tables commits on its own, so there is no dry run of it: run `keyshift cutover --dry-run` (the single swap) to try the swap's statements".into(),
            ));
        }
        if m.phase == Phase::CuttingOver {
            // An earlier run entered the phase: the pause is behind, the groups are not.
            let live = wait_for_live(client, m.rules_version).await?;
            info!(proxies = live.len(), "resuming the cutover table by table");
            return finish_by_table(client, &m.plan, settings, opts, &live, 0, 0.0, Vec::new())
                .await;
        }
    }
    if m.phase == Phase::CuttingOver {
        return Err(SwitchError::Refused(format!(
            "a cutover table by table is half done (phase cutting_over): some tables are swapped, some not. Finish it with `keyshift cutover --by-table` (it resumes where it stopped){}",
            match opts.action {
                Action::Rollback => ", then `keyshift rollback`",
                Action::Cutover => "",
            }
        )));
    }
    let (want, steps) = match opts.action {
        Action::Cutover if opts.by_table => (Phase::Hardened, by_table::entry(&m.plan)),
        Action::Cutover => (Phase::Hardened, ddl::cutover(&m.plan)),
        Action::Rollback => (Phase::CutOver, ddl::rollback(&m.plan)),
    };
    if m.phase != want {
        let todo = match (opts.action, m.phase) {
            (Action::Cutover, p) if p < Phase::Hardened => {
                "finish `keyshift backfill` (it hardens) or run `keyshift harden`"
            }
            (Action::Cutover, _) => "the cutover already happened; `keyshift rollback` goes back",
            (Action::Rollback, _) => "rollback undoes a cutover, and there is none in force",
        };
        return Err(SwitchError::Refused(format!(
            "{} needs phase {want}, the migration is in phase {}: {todo}",
            opts.action.as_str(),
            m.phase
        )));
    }
    let report = verify::run(client).await?;
    if !report.passed {
        return Err(SwitchError::Refused(match opts.action {
            Action::Cutover => format!(
                "verify does not pass; the cutover would lose or break data. Run `keyshift verify` for details, then `keyshift backfill` to catch up.\n{}",
                verify::render_text(&report)
            ),
            // Before anything is built: the legacy FKs and NOT NULL CHECKs would fail to
            // validate (23514, 23503), and a nullable FK would come back with its integer
            // link lost.
            Action::Rollback => format!(
                "the legacy integers are not whole: a rollback would fail, or bring back integer FKs NULL or pointing at the wrong parent. Run `keyshift backfill` (in phase cut_over it repairs them from the uuids), then `keyshift verify`, then `keyshift rollback` again. Nothing was built.\n{}",
                verify::render_failures(&report)
            ),
        }));
    }
    db::exec(client, schema_sql()).await?;
    // The proxies release their clients as soon as this session's backend is gone (its
    // pid is in the attempt). For a backend waiting on a lock to notice that this process
    // died, it must poll its socket (PostgreSQL 14+; older servers wait for the deadline).
    let _ = client
        .batch_execute("SET client_connection_check_interval = '250ms'")
        .await;
    // Attempts whose coordinator died are over (their transaction ended with their session,
    // or their hold deadline passed): close them so that status and alerts stop showing them.
    db::exec(
        client,
        "UPDATE keyshift.switch_attempts SET state = 'aborted', finished_at = clock_timestamp(),
           outcome = jsonb_build_object('error', 'the coordinator stopped before finishing')
         WHERE state IN ('pausing', 'swapping')
           AND (hold_deadline < clock_timestamp()
                OR (coordinator_pid IS NOT NULL
                    AND NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = coordinator_pid)))",
    )
    .await?;
    let live = wait_for_live(client, m.rules_version).await?;
    info!(proxies = live.len(), "live proxies: {}", live.join(", "));
    if opts.by_table {
        // A resumed run goes straight to the groups, which call them.
        db::run_step(client, &carry::functions(), settings).await?;
    }

    let tables = plan_tables(&m.plan);
    // Online preparation before any pause (rollback: both sides as harden leaves them, see
    // ddl::rollback; cutover: the NOT NULL CHECKs of NOT NULL FK twins). Only the steps that
    // take brief locks count against --budget, like the swap: index builds and VALIDATEs
    // block no one and take as long as the tables need (rollback's can take minutes on big
    // tables, far beyond a budget sized for lock waits).
    let mut budget_left = opts.budget;
    // The steps after the swap's COMMIT wait for the pause to be over (ddl::after_cutover).
    let (steps, after) = steps.split_at(
        steps
            .iter()
            .rposition(|s| s.mode == Mode::Swap)
            .map_or(steps.len(), |i| i + 1),
    );
    for st in steps.iter().filter(|s| s.mode != Mode::Swap) {
        if st.mode != Mode::Brief {
            db::run_step(client, st, settings).await?;
            continue;
        }
        let started = Instant::now();
        match tokio::time::timeout(budget_left, db::run_step(client, st, settings)).await {
            Ok(r) => {
                r?;
            }
            Err(_) if opts.terminate_blockers => {
                terminate_lock_holders(client, &tables, opts.lock_timeout).await;
                db::run_step(client, st, settings).await?;
            }
            Err(_) => {
                return Err(SwitchError::Aborted(format!(
                    "the preparation before the pause could not take its locks within --budget {:?}; blocked by: {}\n  what to do: end or wait out those transactions, or retry with --terminate-blockers",
                    opts.budget,
                    blockers(client, &tables).await
                )));
            }
        }
        budget_left = budget_left.saturating_sub(started.elapsed());
    }
    let swap: Vec<&str> = steps
        .iter()
        .filter(|s| s.mode == Mode::Swap && s.sql != "BEGIN" && s.sql != "COMMIT")
        .map(|s| s.sql.as_str())
        .collect();

    let to = match (opts.action, opts.by_table) {
        (Action::Cutover, true) => Phase::CuttingOver,
        (Action::Cutover, false) => Phase::CutOver,
        (Action::Rollback, _) => Phase::Hardened,
    };
    let attempt = new_attempt(client, opts, Some(to)).await?;
    let started = Instant::now();
    let mut round = 0;
    let mut delay = Duration::from_millis(100);
    loop {
        round += 1;
        // Outside the pause: an autovacuum holding a table would fail the round after a
        // whole lock_timeout with every client held (src/migrate/autovacuum.rs).
        autovacuum::yield_to(client, &swap.join("\n")).await;
        match one_round(client, opts, attempt, round, &live, &swap, &tables).await {
            Ok(swap_ms) if opts.by_table => {
                let pauses = collect_pauses(client, &live, attempt).await?;
                let version: i64 = client
                    .query_one("SELECT rules_version FROM keyshift.migration", &[])
                    .await
                    .map_err(|e| q(e, "SELECT rules_version FROM keyshift.migration"))?
                    .get(0);
                // Every proxy must serve both shapes translated before any table moves:
                // a session still under the rules from before would name the columns of a
                // swapped table by their old names.
                if let Err(e) = wait_for_live(client, version).await {
                    return Err(SwitchError::Interrupted(format!(
                        "phase cutting_over is in force, but not every proxy applied its rules, so no table was swapped: {e}\n  what to do: once every proxy runs, `keyshift cutover --by-table` resumes"
                    )));
                }
                return finish_by_table(
                    client, &m.plan, settings, opts, &live, attempt, swap_ms, pauses,
                )
                .await;
            }
            Ok(swap_ms) => {
                let pauses = collect_pauses(client, &live, attempt).await?;
                if !opts.dry_run {
                    for st in after {
                        if let Err(e) = db::run_step(client, st, settings).await {
                            warn!(
                                "{} committed; what it leaves for after the pause stopped: {e}. `keyshift backfill` finishes it (so do rollback and finalize)",
                                opts.action.as_str()
                            );
                            break;
                        }
                    }
                }
                let detail = serde_json::json!({"attempt": attempt, "rounds": round, "swap_ms": swap_ms, "dry_run": opts.dry_run, "pauses": &pauses});
                let what = if opts.dry_run { "dry run" } else { "done" };
                let _ = state::event(
                    client,
                    opts.action.as_str(),
                    &format!("{} {what}", opts.action.as_str()),
                    Some(detail),
                )
                .await;
                return Ok(SwitchReport {
                    action: opts.action,
                    attempt,
                    rounds: round,
                    dry_run: opts.dry_run,
                    committed: !opts.dry_run,
                    swap_ms,
                    pauses,
                    by_table: None,
                });
            }
            Err(RoundError::DrainTerminated(busy)) if started.elapsed() + delay < opts.budget => {
                warn!(
                    round,
                    "sessions stayed inside transactions past the drain timeout; ended them (--terminate-blockers), gates reopened, retrying in {delay:?}: {busy}"
                );
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(RoundError::LockTimeout(blockers)) if started.elapsed() + delay < opts.budget => {
                warn!(
                    round,
                    "the swap did not get its locks within lock_timeout; gates reopened, retrying in {delay:?}: {blockers}"
                );
                if opts.terminate_blockers {
                    terminate_lock_holders(client, &tables, opts.lock_timeout).await;
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(e) => {
                let why = round_failure(e, opts, Swapping::All);
                finish(client, attempt, round, "aborted", &why).await;
                let _ = state::event(
                    client,
                    opts.action.as_str(),
                    &format!("{} aborted", opts.action.as_str()),
                    Some(serde_json::json!({"attempt": attempt, "why": &why})),
                )
                .await;
                return Err(SwitchError::Aborted(why));
            }
        }
    }
}

/// `--by-table`, once phase cutting_over is in force and every proxy applies its rules:
/// each group not swapped yet, with the gates open, or under a pause of its own when its
/// locks do not come ([`POLITE_TRIES`]); then phase cut_over and what the cutover leaves
/// for after (src/migrate/by_table.rs).
#[allow(clippy::too_many_arguments)]
async fn finish_by_table(
    client: &Client,
    plan: &super::plan::Plan,
    settings: &Settings,
    opts: &SwitchOptions,
    live: &[String],
    attempt: i64,
    swap_ms: f64,
    pauses: Vec<ProxyPause>,
) -> Result<SwitchReport, SwitchError> {
    let groups = by_table::groups(plan);
    let tables = plan_tables(plan);
    let polite = Settings {
        ddl_retries: POLITE_TRIES,
        ..settings.clone()
    };
    let started = Instant::now();
    let mut report = by_table::ByTableReport::default();
    for (i, g) in groups.iter().enumerate() {
        let t = Instant::now();
        // The step runs only while the first column the group renames is still there
        // (db::run_step asks, then runs the group as one transaction): that is how a rerun
        // passes over the groups an earlier run swapped, and its answer is what the report
        // counts, without asking twice.
        let gated = GatedRun {
            opts,
            live,
            tables: &tables,
            polite: &polite,
        };
        let swapped = match gated.run(client, &g.step(), &g.label).await? {
            Swapped::AlreadyDone => {
                report.groups_already_swapped += 1;
                false
            }
            Swapped::GatesOpen => true,
            Swapped::UnderPause(ms) => {
                report.longest_group_pause_ms = report.longest_group_pause_ms.max(ms);
                report.groups_under_pause += 1;
                true
            }
        };
        if swapped {
            let ms = t.elapsed().as_secs_f64() * 1000.0;
            report.groups_swapped += 1;
            info!(
                group = i + 1,
                of = groups.len(),
                ms = format!("{ms:.1}"),
                "swapped {}",
                g.label
            );
            if ms > report.longest_group_ms {
                report.longest_group_ms = ms;
                report.longest_group = Some(g.label.clone());
            }
        }
        // The integer FKs the group renamed aside, each dropped alone (also those a stopped
        // run left: each step runs while its constraint is there).
        for (drop, what) in g.fk_drops() {
            let t = Instant::now();
            match gated.run(client, &drop, &what).await? {
                Swapped::AlreadyDone => continue,
                Swapped::GatesOpen => {}
                Swapped::UnderPause(_) => report.fk_drops_under_pause += 1,
            }
            report.fk_drops += 1;
            let ms = t.elapsed().as_secs_f64() * 1000.0;
            debug!(ms = format!("{ms:.1}"), "dropped {what}");
            report.longest_fk_drop_ms = report.longest_fk_drop_ms.max(ms);
        }
    }
    // The application's objects over migrated columns, kept on the integer columns while
    // the groups went, rebuilt over the uuids like more groups: the views in one
    // transaction, which locks only them, then what sits on each table in one per table,
    // its lock taken first (50 ms), gates open, or under a pause of its own when the lock
    // does not come (src/migrate/carry.rs).
    match by_table::carried(client).await.map_err(|e| resumes(&e))? {
        Some((n, left_alone)) if n > 0 => {
            let t = Instant::now();
            let gated = GatedRun {
                opts,
                live,
                tables: &tables,
                polite: &polite,
            };
            for part in by_table::parts(client).await.map_err(|e| resumes(&e))? {
                let step =
                    ddl::Step::new(by_table::finish_sql(&part), Mode::Brief, ddl::When::Always);
                let what = if part == "views" {
                    "the views".to_string()
                } else {
                    format!("what sits on {part}")
                };
                let p = Instant::now();
                let gate = gated
                    .run(client, &step, &format!("the rebuild of {what}"))
                    .await?;
                if let Swapped::UnderPause(ms) = gate {
                    report.carried_pause_ms = report.carried_pause_ms.max(ms);
                    report.carried_parts_under_pause += 1;
                }
                let ms = p.elapsed().as_secs_f64() * 1000.0;
                info!(
                    ms = format!("{ms:.1}"),
                    "rebuilt {what} over the uuid columns"
                );
                report.carried_parts += 1;
            }
            report.carried_ms = t.elapsed().as_secs_f64() * 1000.0;
            report.carried = n;
            if !left_alone.is_empty() {
                warn!(
                    "changed or dropped by the application during the cutover, left as it made them (not carried to the uuid columns): {left_alone}"
                );
                report.carried_left_alone = Some(left_alone);
            }
        }
        Some(_) => db::exec(client, carry::FINISH)
            .await
            .map_err(|e| resumes(&e))?,
        None => {}
    }
    by_table::leave(client, plan, settings)
        .await
        .map_err(|e| resumes(&e))?;
    report.total_ms = started.elapsed().as_secs_f64() * 1000.0;
    let detail = serde_json::json!({"attempt": attempt, "swap_ms": swap_ms, "pauses": &pauses, "by_table": &report});
    let _ = state::event(
        client,
        "cutover",
        "cutover table by table done",
        Some(detail),
    )
    .await;
    Ok(SwitchReport {
        action: opts.action,
        attempt,
        rounds: if attempt == 0 { 0 } else { 1 },
        dry_run: false,
        committed: true,
        swap_ms,
        pauses,
        by_table: Some(report),
    })
}

/// How one `--by-table` transaction went ([`GatedRun::run`]).
enum Swapped {
    /// Its step was no longer needed (an earlier run did it).
    AlreadyDone,
    GatesOpen,
    /// Under a pause of its own, whose longest gate this is (ms).
    UnderPause(f64),
}

/// A `--by-table` transaction (a group, or the objects' rebuild): tried with the gates
/// open ([`POLITE_TRIES`]), then, when its locks do not come between the application's
/// transactions, under a pause of its own ([`gated_group`]).
struct GatedRun<'a> {
    opts: &'a SwitchOptions,
    live: &'a [String],
    tables: &'a [String],
    polite: &'a Settings,
}

impl GatedRun<'_> {
    async fn run(
        &self,
        client: &Client,
        step: &ddl::Step,
        what: &str,
    ) -> Result<Swapped, SwitchError> {
        match db::run_step(client, step, self.polite).await {
            Ok(false) => Ok(Swapped::AlreadyDone),
            Ok(true) => Ok(Swapped::GatesOpen),
            Err(e)
                if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE)
                    || e.code() == Some(&SqlState::T_R_DEADLOCK_DETECTED) =>
            {
                warn!(
                    what,
                    "its locks did not come between the application's transactions in {} tries; running it under a pause of its own",
                    POLITE_TRIES + 1
                );
                let pauses =
                    gated_group(client, self.opts, self.live, &step.sql, self.tables).await?;
                let longest = pauses.iter().filter_map(|p| p.pause_ms).fold(0.0, f64::max);
                Ok(Swapped::UnderPause(longest))
            }
            Err(e) => Err(resumes(&e)),
        }
    }
}

/// Every migrated table and child, quoted, for the lock reports.
fn plan_tables(plan: &super::plan::Plan) -> Vec<String> {
    let quote = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
    let mut tables: Vec<String> = Vec::new();
    for t in &plan.tables {
        tables.push(format!("{}.{}", quote(&t.schema), quote(&t.name)));
        for f in &t.referenced_by {
            tables.push(format!(
                "{}.{}",
                quote(&f.child_schema),
                quote(&f.child_table)
            ));
        }
    }
    tables.sort();
    tables.dedup();
    tables
}

/// A new attempt, `pausing`: what the proxies read when told to pause. `to`: the phase its
/// swap commits, if it changes the phase.
async fn new_attempt(
    client: &Client,
    opts: &SwitchOptions,
    to: Option<Phase>,
) -> Result<i64, SwitchError> {
    Ok(client
        .query_one(
            "INSERT INTO keyshift.switch_attempts (action, state, dry_run, drain_timeout_ms, hold_deadline, coordinator, coordinator_pid, to_phase)
             VALUES ($1, 'pausing', $2, $3, clock_timestamp() + $4 * interval '1 millisecond', $5, pg_backend_pid(), $6) RETURNING id",
            &[
                &opts.action.as_str(),
                &opts.dry_run,
                &(opts.drain_timeout.as_millis() as i32),
                &(hold_ms(opts) as f64),
                &coordinator(),
                &to.map(Phase::as_str),
            ],
        )
        .await
        .map_err(|e| q(e, "INSERT INTO keyshift.switch_attempts"))?
        .get(0))
}

/// How many times (after the first) a `--by-table` group tries to get its locks with the
/// gates open before it is swapped under a pause of its own instead: under 16 clients'
/// multi-table write transactions on a busy 2-core machine (CI), one group's locks never
/// came in 31 tries, each waiting 50 ms for a lock some open transaction held.
const POLITE_TRIES: u32 = 4;

/// What a rerun does with a `--by-table` cutover stopped partway.
fn resumes(why: &dyn std::fmt::Display) -> SwitchError {
    SwitchError::Interrupted(format!(
        "{why}\n  the tables swapped so far stay swapped (phase cutting_over: every session is served in its shape); `keyshift cutover --by-table` resumes"
    ))
}

/// `--by-table`: one group that could not get its locks between the application's
/// transactions, swapped under a pause of its own: the drain ends those transactions, and
/// the swap is this group's few statements. Returns the proxies' gate reports.
async fn gated_group(
    client: &Client,
    opts: &SwitchOptions,
    live: &[String],
    sql: &str,
    tables: &[String],
) -> Result<Vec<ProxyPause>, SwitchError> {
    let attempt = new_attempt(client, opts, None).await?;
    let started = Instant::now();
    let mut delay = Duration::from_millis(100);
    let mut round = 0;
    loop {
        round += 1;
        autovacuum::yield_to(client, sql).await;
        match one_round(client, opts, attempt, round, live, &[sql], tables).await {
            Ok(_) => return collect_pauses(client, live, attempt).await,
            Err(RoundError::LockTimeout(_) | RoundError::DrainTerminated(_))
                if started.elapsed() + delay < opts.budget =>
            {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(e) => {
                let why = round_failure(e, opts, Swapping::Group);
                finish(client, attempt, round, "aborted", &why).await;
                return Err(resumes(&why));
            }
        }
    }
}

/// What a pause round swaps, for the message when it fails.
#[derive(Clone, Copy)]
enum Swapping {
    /// The whole cutover or rollback, or `--by-table`'s entry into phase cutting_over.
    All,
    /// One `--by-table` group whose locks did not come with the gates open.
    Group,
}

/// Why a pause round that is not retried failed, as the operator reads it (and as
/// `switch_attempts.outcome` keeps it): the same causes and remedies whatever the round
/// swaps, but for a group's locks, where `--terminate-blockers` is no remedy: for a group it
/// ends the sessions that keep the drain from completing, not the lock holders (see
/// [`gated_group`]).
fn round_failure(e: RoundError, opts: &SwitchOptions, swapping: Swapping) -> String {
    match (e, swapping) {
        (RoundError::LockTimeout(b), Swapping::All) => format!(
            "the swap could not take its locks within --budget {:?}; blocked by: {b}\n  what to do: end or wait out those transactions, or retry with --terminate-blockers",
            opts.budget
        ),
        (RoundError::LockTimeout(b), Swapping::Group) => format!(
            "a group's locks did not come within --budget {:?}, even under a pause; blocked by: {b}\n  what to do: end or wait out those transactions",
            opts.budget
        ),
        (RoundError::Drain(b) | RoundError::DrainTerminated(b), _) => format!(
            "sessions stayed inside transactions past --drain-timeout {:?}: {b}\n  what to do: retry when they are done, raise --drain-timeout, or use --terminate-blockers",
            opts.drain_timeout
        ),
        (RoundError::Other(e), _) => e.to_string(),
    }
}

fn hold_ms(opts: &SwitchOptions) -> u128 {
    (opts.drain_timeout + opts.lock_timeout + Duration::from_secs(5)).as_millis()
}

fn coordinator() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "?".into());
    format!("{host}:{}", std::process::id())
}

/// Live proxies, waiting a few heartbeats for any that has not applied the current rules.
async fn wait_for_live(client: &Client, version: i64) -> Result<Vec<String>, SwitchError> {
    let start = Instant::now();
    loop {
        match live_proxies(client, version).await {
            Ok(l) => return Ok(l),
            Err(e) if start.elapsed() > Duration::from_secs(7) => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

enum RoundError {
    LockTimeout(String),
    Drain(String),
    /// The drain failed and `--terminate-blockers` ended the busy backends: try again.
    DrainTerminated(String),
    Other(SwitchError),
}

impl From<SwitchError> for RoundError {
    fn from(e: SwitchError) -> Self {
        RoundError::Other(e)
    }
}

/// One pause–swap–resume round. Returns the swap transaction's duration in ms.
async fn one_round(
    client: &Client,
    opts: &SwitchOptions,
    attempt: i64,
    round: i32,
    live: &[String],
    swap: &[&str],
    tables: &[String],
) -> Result<f64, RoundError> {
    let notify = |what: &str| format!("NOTIFY keyshift, '{what} {attempt}:{round}'");
    let sql = format!(
        "UPDATE keyshift.switch_attempts SET round = {round}, state = 'pausing',
             hold_deadline = clock_timestamp() + interval '{} milliseconds' WHERE id = {attempt};
         {}",
        hold_ms(opts),
        notify("pause")
    );
    db::exec(client, &sql).await.map_err(SwitchError::from)?;
    let drained = wait_drained(client, opts, attempt, round, live).await;
    if let Err(e) = drained {
        resume(client, attempt, round).await;
        return Err(e);
    }
    let mut txn = format!(
        "BEGIN;\nSET LOCAL lock_timeout = '{}ms';\nUPDATE keyshift.switch_attempts SET state = 'swapping' WHERE id = {attempt};\n",
        opts.lock_timeout.as_millis()
    );
    for s in swap {
        txn.push_str(s);
        txn.push_str(";\n");
    }
    let final_state = if opts.dry_run {
        "dry_run_done"
    } else {
        "committed"
    };
    txn.push_str(&format!(
        "UPDATE keyshift.switch_attempts SET state = '{final_state}', finished_at = clock_timestamp() WHERE id = {attempt};\n{};\n{}",
        notify("resume"),
        if opts.dry_run { "ROLLBACK" } else { "COMMIT" }
    ));
    let t = Instant::now();
    let result = client.batch_execute(&txn).await;
    let swap_ms = t.elapsed().as_secs_f64() * 1000.0;
    match result {
        Ok(()) => {
            if opts.dry_run {
                // The rollback took the NOTIFY and the state with it.
                finish(
                    client,
                    attempt,
                    round,
                    "dry_run_done",
                    "dry run: the swap ran and was rolled back",
                )
                .await;
            }
            info!(attempt, round, swap_ms, "swap {}", final_state);
            Ok(swap_ms)
        }
        Err(e) => {
            let _ = client.batch_execute("ROLLBACK").await;
            let lock = e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE);
            let blockers = if lock {
                blockers(client, tables).await
            } else {
                String::new()
            };
            resume(client, attempt, round).await;
            if lock {
                Err(RoundError::LockTimeout(blockers))
            } else {
                Err(RoundError::Other(q(e, "the swap transaction")))
            }
        }
    }
}

async fn resume(client: &Client, attempt: i64, round: i32) {
    if let Err(e) = client
        .batch_execute(&format!("NOTIFY keyshift, 'resume {attempt}:{round}'"))
        .await
    {
        warn!(
            "could not tell the proxies to resume ({e}); they reopen by themselves at the hold deadline"
        );
    }
}

async fn finish(client: &Client, attempt: i64, round: i32, state: &str, why: &str) {
    let _ = client
        .execute(
            "UPDATE keyshift.switch_attempts SET state = $2, finished_at = clock_timestamp(),
                 outcome = jsonb_build_object('why', $3::text) WHERE id = $1",
            &[&attempt, &state, &why],
        )
        .await;
    resume(client, attempt, round).await;
}

/// Waits until every live proxy reports its drain for this round.
async fn wait_drained(
    client: &Client,
    opts: &SwitchOptions,
    attempt: i64,
    round: i32,
    live: &[String],
) -> Result<(), RoundError> {
    // Room beyond the drain for a proxy on a loaded machine to write its report.
    let deadline = Instant::now() + opts.drain_timeout + Duration::from_secs(3);
    loop {
        let rows = client
            .query(
                "SELECT id, pause_state, coalesce(busy::text, '[]') FROM keyshift.proxies
                 WHERE id = ANY($1) AND pause_attempt = $2 AND pause_round = $3",
                &[&live, &attempt, &round],
            )
            .await
            .map_err(|e| q(e, "SELECT … FROM keyshift.proxies"))?;
        let failed: Vec<String> = rows
            .iter()
            .filter(|r| r.get::<_, Option<String>>(1).as_deref() == Some("drain_failed"))
            .map(|r| format!("proxy {}: {}", r.get::<_, String>(0), r.get::<_, String>(2)))
            .collect();
        if !failed.is_empty() {
            if opts.terminate_blockers {
                terminate_busy(client, &rows).await;
                return Err(RoundError::DrainTerminated(failed.join("; ")));
            }
            return Err(RoundError::Drain(failed.join("; ")));
        }
        if rows.len() == live.len() {
            return Ok(());
        }
        if Instant::now() > deadline {
            let answered: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
            let silent: Vec<&String> = live.iter().filter(|p| !answered.contains(p)).collect();
            return Err(RoundError::Other(SwitchError::Aborted(format!(
                "proxies did not answer the pause: {silent:?}"
            ))));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// `--terminate-blockers`: end the backends of sessions that kept a proxy from draining.
async fn terminate_busy(client: &Client, rows: &[tokio_postgres::Row]) {
    for r in rows {
        let busy: String = r.get(2);
        let Ok(v) = serde_json::from_str::<Vec<serde_json::Value>>(&busy) else {
            continue;
        };
        for s in v {
            if let Some(pid) = s["backend_pid"].as_i64().filter(|p| *p > 0) {
                warn!(
                    pid,
                    "terminating a backend that kept the cutover from draining"
                );
                let _ = client
                    .execute("SELECT pg_terminate_backend($1)", &[&(pid as i32)])
                    .await;
            }
        }
    }
}

/// `--terminate-blockers`: end the backends whose transactions, older than one lock timeout,
/// hold locks on the migrated tables (ordinary short statements are left alone).
async fn terminate_lock_holders(client: &Client, tables: &[String], older_than: Duration) {
    let r = client
        .query(
            "SELECT pg_terminate_backend(pid) FROM (SELECT DISTINCT l.pid FROM pg_locks l
               JOIN pg_stat_activity a ON a.pid = l.pid
               WHERE l.granted AND l.pid <> pg_backend_pid()
                 AND a.xact_start < clock_timestamp() - $2 * interval '1 millisecond'
                 AND l.relation IN (SELECT to_regclass(t) FROM unnest($1::text[]) AS t)) AS b",
            &[&tables, &(older_than.as_millis() as f64)],
        )
        .await;
    if let Ok(rows) = r {
        warn!(
            terminated = rows.len(),
            "terminated backends holding locks on the migrated tables"
        );
    }
}

/// The sessions holding locks on the migrated tables: what the swap had to wait for.
async fn blockers(client: &Client, tables: &[String]) -> String {
    let rows = client
        .query(
            "SELECT DISTINCT a.pid, coalesce(a.application_name, ''), coalesce(a.state, ''),
                    coalesce(a.query_start::text, '')
             FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
             WHERE l.granted AND l.pid <> pg_backend_pid()
               AND l.relation IN (SELECT to_regclass(t) FROM unnest($1::text[]) AS t)",
            &[&tables],
        )
        .await;
    match rows {
        Ok(rows) if !rows.is_empty() => rows
            .iter()
            .map(|r| {
                format!(
                    "pid {} (application_name {:?}, {}, since {})",
                    r.get::<_, i32>(0),
                    r.get::<_, String>(1),
                    r.get::<_, String>(2),
                    r.get::<_, String>(3)
                )
            })
            .collect::<Vec<_>>()
            .join("; "),
        _ => "no blocking session found any more".into(),
    }
}

async fn collect_pauses(
    client: &Client,
    live: &[String],
    attempt: i64,
) -> Result<Vec<ProxyPause>, SwitchError> {
    // The proxies write their pause once their gate is open again: give them a moment.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let rows = client
            .query(
                "SELECT id, pause_ms, pause_state FROM keyshift.proxies WHERE id = ANY($1) AND pause_attempt = $2 ORDER BY id",
                &[&live, &attempt],
            )
            .await
            .map_err(|e| q(e, "SELECT … FROM keyshift.proxies"))?;
        let done = rows
            .iter()
            .all(|r| r.get::<_, Option<String>>(2).as_deref() != Some("held"));
        if done || Instant::now() > deadline {
            return Ok(rows
                .iter()
                .map(|r| ProxyPause {
                    proxy: r.get(0),
                    pause_ms: r.get(1),
                    state: r.get(2),
                })
                .collect());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What finalize found and did about the sessions, for the command's output.
#[derive(Debug, Default, Serialize)]
pub struct FinalizeReport {
    /// Backends of integer-shaped sessions ended by `--terminate`.
    pub terminated: u64,
    /// Integer-shaped sessions that connected while finalize was starting, after the check
    /// and before every proxy refused the integer shape (without `--terminate`, left to fail).
    pub late: Vec<String>,
}

/// The checks finalize makes before it changes anything: the phase, then the default shape
/// and every proxy's sessions, asked fresh (src/migrate/shapes.rs). `Refused` says what to
/// do; with `terminate` the integer-shaped sessions are no reason to refuse, and the
/// returned check lists them.
pub async fn finalize_check(
    client: &Client,
    terminate: bool,
) -> Result<shapes::FinalizeCheck, SwitchError> {
    let m = state::load_migration(client)
        .await?
        .ok_or_else(|| SwitchError::Refused("no migration here".into()))?;
    if !matches!(m.phase, Phase::CutOver | Phase::Finalizing) {
        return Err(SwitchError::Refused(format!(
            "finalize needs phase cut_over, the migration is in phase {}: finalize comes after a successful `keyshift cutover`",
            m.phase
        )));
    }
    let check = shapes::check_finalize(client).await.map_err(shape_error)?;
    // An interrupted finalize is past the point of no return: it only has to finish.
    if m.phase == Phase::CutOver
        && let Some(why) = check.refusal(terminate)
    {
        return Err(SwitchError::Refused(why));
    }
    Ok(check)
}

fn shape_error(e: shapes::ShapeError) -> SwitchError {
    match e {
        shapes::ShapeError::Db(e) => SwitchError::Db(e),
        shapes::ShapeError::State(e) => SwitchError::State(e),
        e => SwitchError::Refused(e.to_string()),
    }
}

/// `--terminate`: ends the integer-shaped sessions, asking the proxies again until none is
/// left (a pool reconnects at once; its new connections are ended in the next round).
async fn end_integer_sessions(
    client: &Client,
    mut check: shapes::FinalizeCheck,
) -> Result<u64, SwitchError> {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut ended = 0;
    while !check.integer.is_empty() {
        if Instant::now() > deadline {
            return Err(SwitchError::Refused(format!(
                "integer-shaped sessions are still connected after --terminate ended {ended} backend(s) for 15 s (a pool that reconnects in the integer shape?):\n{}  what to do: stop V1 or point it at keyshift.shape=uuid, then rerun",
                check.render_sessions()
            )));
        }
        let n = shapes::terminate(client, &check).await?;
        warn!(
            ended = n,
            sessions = check.integer_sessions(),
            "finalize --terminate: ended the backends of integer-shaped sessions"
        );
        ended += n;
        tokio::time::sleep(Duration::from_millis(200)).await;
        check = shapes::check_finalize(client).await.map_err(shape_error)?;
    }
    Ok(ended)
}

/// finalize: refused while the default shape is integer or an integer-shaped session is
/// connected anywhere (`terminate` ends those); then dual-write off everywhere (so no proxy
/// still writes the legacy columns), then the legacy columns and keyshift's state go. See
/// docs/cutover.md.
pub async fn finalize(
    client: &Client,
    settings: &Settings,
    keep_map: bool,
    terminate: bool,
) -> Result<FinalizeReport, SwitchError> {
    let check = finalize_check(client, terminate).await?;
    let m = state::load_migration(client)
        .await?
        .ok_or_else(|| SwitchError::Refused("no migration here".into()))?;
    let mut report = FinalizeReport::default();
    if m.phase != Phase::Finalizing {
        if terminate {
            report.terminated = end_integer_sessions(client, check).await?;
        }
        let _ = state::event(
            client,
            "finalize",
            "finalize started: no integer-shaped session, default shape uuid",
            Some(serde_json::json!({"terminated": report.terminated})),
        )
        .await;
        db::exec(client, &state::set_phase_sql(Phase::Finalizing)).await?;
    }
    let version: i64 = client
        .query_one("SELECT rules_version FROM keyshift.migration", &[])
        .await
        .map_err(|e| q(e, "SELECT rules_version FROM keyshift.migration"))?
        .get(0);
    // Every live proxy must stop filling the legacy columns before they are dropped.
    wait_for_live(client, version).await?;
    // From here every proxy refuses new integer-shaped sessions; one that connected between
    // the check and now would fail once the columns are gone.
    let late = shapes::check_finalize(client).await.map_err(shape_error)?;
    if !late.integer.is_empty() {
        if terminate {
            report.terminated += end_integer_sessions(client, late).await?;
        } else {
            warn!(
                "integer-shaped sessions connected while finalize started; they will fail once the legacy columns are gone:\n{}",
                late.render_sessions()
            );
            report.late = late
                .integer
                .iter()
                .map(|(p, g)| {
                    format!(
                        "proxy {p}: {} session(s) of user {}, application_name {:?}",
                        g.sessions, g.user, g.application_name
                    )
                })
                .collect();
        }
    }
    for st in ddl::finalize(&m.plan, keep_map) {
        db::run_step(client, &st, settings).await?;
    }
    info!("finalized");
    Ok(report)
}

/// Renders a report for the terminal.
pub fn render_text(r: &SwitchReport) -> String {
    let mut s = format!(
        "{} {} (attempt {}, {} round{}): swap transaction {:.1} ms\n",
        r.action.as_str(),
        if r.dry_run {
            "dry run complete, rolled back"
        } else {
            "committed"
        },
        r.attempt,
        r.rounds,
        if r.rounds == 1 { "" } else { "s" },
        r.swap_ms
    );
    if r.rounds == 0 {
        s = "cutover resumed: its pause was behind it\n".to_string();
    } else if r.pauses.is_empty() {
        s.push_str("no proxy was registered: no client traffic was held\n");
    }
    for p in &r.pauses {
        s.push_str(&format!(
            "  proxy {}: gate closed {}\n",
            p.proxy,
            p.pause_ms
                .map(|m| format!("{m:.1} ms"))
                .unwrap_or_else(|| "(not reported)".into())
        ));
    }
    if let Some(b) = &r.by_table {
        s.push_str(&format!(
            "tables swapped group by group, gates open: {} group{} in {:.0} ms{}",
            b.groups_swapped,
            if b.groups_swapped == 1 { "" } else { "s" },
            b.total_ms,
            if b.groups_already_swapped > 0 {
                format!(" ({} swapped by an earlier run)", b.groups_already_swapped)
            } else {
                String::new()
            }
        ));
        if let Some(g) = &b.longest_group {
            s.push_str(&format!("; longest {:.1} ms ({g})", b.longest_group_ms));
        }
        if b.groups_under_pause > 0 {
            s.push_str(&format!(
                "; {} under a pause of its own (its locks did not come between the application's transactions), gate closed up to {:.1} ms",
                b.groups_under_pause, b.longest_group_pause_ms
            ));
        }
        s.push('\n');
        if b.fk_drops > 0 {
            s.push_str(&format!(
                "integer FKs set aside and dropped one per transaction (each locks its parent alone): {}, longest {:.1} ms{}\n",
                b.fk_drops,
                b.longest_fk_drop_ms,
                if b.fk_drops_under_pause > 0 {
                    format!(", {} under a pause of its own", b.fk_drops_under_pause)
                } else {
                    String::new()
                }
            ));
        }
        if b.carried > 0 {
            s.push_str(&format!(
                "the application's views, policies and other objects over migrated columns ({}) rebuilt over the uuids at the end in {:.1} ms, {} transaction{}, {}\n",
                b.carried,
                b.carried_ms,
                b.carried_parts,
                if b.carried_parts == 1 { "" } else { "s" },
                if b.carried_parts_under_pause > 0 {
                    format!(
                        "{} under a pause of its own (its locks did not come between the application's transactions), gate closed up to {:.1} ms",
                        b.carried_parts_under_pause, b.carried_pause_ms
                    )
                } else {
                    "gates open".to_string()
                }
            ));
        }
        if let Some(l) = &b.carried_left_alone {
            s.push_str(&format!(
                "changed or dropped by the application during the cutover, so left as it made them (check that they read the columns you meant): {l}\n"
            ));
        }
    }
    s
}
