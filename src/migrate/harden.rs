//! `keyshift harden` (also the last stage of `backfill`): unique indexes built concurrently,
//! FK indexes mirrored, NOT NULL CHECKs and shadow FKs added NOT VALID then VALIDATEd. An
//! INVALID index left by an interrupted build is found, dropped and rebuilt (see `db::needed`).

use tokio_postgres::Client;

use super::db::{self, DbError};
use super::state::{self, Phase, StateError};
use super::{Settings, ddl};

#[derive(Debug, thiserror::Error)]
pub enum HardenError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("no migration here: run `keyshift expand` and `keyshift backfill` first")]
    NotExpanded,
    #[error("the migration is in phase {0}; harden runs between backfill and cutover")]
    WrongPhase(Phase),
}

/// Returns how many steps did something (0 when everything was already hardened).
pub async fn run(client: &Client, s: &Settings) -> Result<usize, HardenError> {
    let Some((plan, phase)) = state::load(client).await? else {
        return Err(HardenError::NotExpanded);
    };
    if phase == Phase::Expanding {
        return Err(HardenError::NotExpanded);
    }
    if phase.is_after_cutover() || phase == Phase::Aborting {
        return Err(HardenError::WrongPhase(phase));
    }
    super::expand::advance(client, Phase::Hardening).await?;
    let mut changed = 0;
    for st in ddl::harden(&plan) {
        if db::run_step(client, &st, s).await? {
            changed += 1;
            state::event(client, "ddl", &db::one_line(&st.sql), None).await?;
        }
    }
    super::expand::advance(client, Phase::Hardened).await?;
    state::event(
        client,
        "harden",
        &format!("harden done ({changed} change(s))"),
        None,
    )
    .await?;
    Ok(changed)
}
