//! `keyshift expand`: the state schema, the stored plan, then the uuid columns (catalog-only,
//! each DDL under `lock_timeout` with retry).

use tokio_postgres::Client;

use super::db::{self, DbError};
use super::plan::{self, Plan, PlanOptions};
use super::state::{self, Phase, StateError};
use super::{Settings, catalog, ddl};

#[derive(Debug, thiserror::Error)]
pub enum ExpandError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Catalog(#[from] catalog::CatalogError),
    #[error("the plan has {0} blocker(s); run `keyshift plan` to see them and what to do")]
    Blocked(usize),
    #[error(
        "the migration is in phase {0}; expand runs only before cutover (after it: `keyshift rollback`, or finish an abort with `keyshift abort`)"
    )]
    WrongPhase(Phase),
}

/// Raises the phase to `to` unless the migration is already further along.
pub async fn advance(client: &Client, to: Phase) -> Result<(), StateError> {
    if let Some((_, cur)) = state::load(client).await?
        && cur < to
    {
        state::set_phase(client, to).await?;
        state::event(client, "phase", &format!("phase {cur} -> {to}"), None).await?;
    }
    Ok(())
}

/// Runs expand; returns the plan in force (the stored one when expand ran before).
pub async fn run(client: &Client, opts: &PlanOptions, s: &Settings) -> Result<Plan, ExpandError> {
    let plan = match state::load(client).await? {
        Some((plan, phase)) => {
            if phase.is_after_cutover() || phase == Phase::Aborting {
                return Err(ExpandError::WrongPhase(phase));
            }
            tracing::info!("a migration exists (phase {phase}); resuming with its stored plan");
            plan
        }
        None => {
            let cat = catalog::read(client).await?;
            let plan = plan::build(&cat, opts);
            if plan.is_blocked() {
                return Err(ExpandError::Blocked(plan.blockers.len()));
            }
            plan
        }
    };
    let steps = ddl::expand(&plan);
    // The plan is stored before any application table changes, so that abort always knows
    // what to remove, whatever the moment expand was interrupted.
    for st in steps.iter().filter(|s| s.mode == ddl::Mode::State) {
        db::run_step(client, st, s).await?;
    }
    state::insert_migration(client, &plan).await?;
    state::event(
        client,
        "expand",
        &format!("expand started for {} table(s)", plan.tables.len()),
        None,
    )
    .await?;
    let mut changed = 0;
    for st in steps.iter().filter(|s| s.mode != ddl::Mode::State) {
        if db::run_step(client, st, s).await? {
            changed += 1;
            state::event(client, "ddl", &db::one_line(&st.sql), None).await?;
        }
    }
    super::backfill::ensure_tasks(client, &plan).await?;
    advance(client, Phase::Expanded).await?;
    state::event(
        client,
        "expand",
        &format!("expand done ({changed} change(s))"),
        None,
    )
    .await?;
    Ok(plan)
}
