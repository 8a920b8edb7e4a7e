//! The migration, step by step, through the same library calls the CLI makes (see
//! `cli::run_plan`, `run_expand`, `run_backfill`, `run_verify`, `run_switch`).

use std::time::{Duration, Instant};

use tokio_postgres::Client;

use crate::migrate::plan::{Plan, PlanOptions};
use crate::migrate::switch::{self, Action, SwitchOptions, SwitchReport};
use crate::migrate::{Settings, backfill, catalog, expand, harden, plan, verify};

#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error("plan: {0}")]
    Catalog(#[from] catalog::CatalogError),
    #[error("plan: {0} blocker(s):\n{1}")]
    Blocked(usize, String),
    #[error("expand: {0}")]
    Expand(#[from] expand::ExpandError),
    #[error("backfill: {0}")]
    Backfill(#[from] backfill::BackfillError),
    #[error("harden: {0}")]
    Harden(#[from] harden::HardenError),
    #[error("verify: {0}")]
    Verify(#[from] verify::VerifyError),
    #[error("verify found problems before the cutover:\n{0}")]
    VerifyFailed(String),
    #[error("cutover: {0}")]
    Switch(#[from] switch::SwitchError),
    #[error("backfill: cannot open another connection: {0}")]
    Connect(#[from] crate::migrate::db::DbError),
}

/// `keyshift plan`: reads the catalog and decides; changes nothing.
pub async fn plan(c: &Client) -> Result<Plan, StepError> {
    let p = plan::build(&catalog::read(c).await?, &PlanOptions::default());
    if p.is_blocked() {
        return Err(StepError::Blocked(p.blockers.len(), plan::render_text(&p)));
    }
    Ok(p)
}

/// `keyshift expand`.
pub async fn expand(c: &Client, s: &Settings) -> Result<Plan, StepError> {
    Ok(expand::run(c, &PlanOptions::default(), s).await?)
}

pub struct BackfillOutcome {
    pub summary: backfill::Summary,
    pub harden_changes: usize,
    pub harden_time: Duration,
}

/// `keyshift backfill` (with its progress bars), then harden, as the command does.
pub async fn backfill(c: &Client, url: &str, s: &Settings) -> Result<BackfillOutcome, StepError> {
    let mut extra = Vec::new();
    for _ in 1..s.jobs {
        extra.push(crate::migrate::db::connect(url).await?);
    }
    let summary = backfill::run(c, &extra, s).await?;
    let t = Instant::now();
    let harden_changes = harden::run(c, s).await?;
    Ok(BackfillOutcome {
        summary,
        harden_changes,
        harden_time: t.elapsed(),
    })
}

/// `keyshift verify`; an error when a check fails, since the cutover would refuse.
pub async fn verify(c: &Client) -> Result<verify::Report, StepError> {
    let r = verify::run(c).await?;
    if !r.passed {
        return Err(StepError::VerifyFailed(verify::render_text(&r)));
    }
    Ok(r)
}

/// `keyshift cutover` with the command's defaults.
pub async fn cutover(c: &Client, s: &Settings) -> Result<SwitchReport, StepError> {
    let opts = SwitchOptions {
        action: Action::Cutover,
        drain_timeout: Duration::from_secs(2),
        lock_timeout: s.lock_timeout,
        budget: Duration::from_secs(10),
        terminate_blockers: false,
        dry_run: false,
        by_table: false,
    };
    Ok(switch::run(c, &opts, s).await?)
}
