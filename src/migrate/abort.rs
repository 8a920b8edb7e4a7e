//! `keyshift abort`: before cutover, removes everything expand and harden added, so that the
//! schema is exactly as before (`pg_dump --schema-only` identical). After cutover it refuses:
//! the way back from there is `keyshift rollback`.

use tokio_postgres::Client;

use super::db::{self, DbError};
use super::state::{self, Phase, StateError};
use super::{Settings, ddl};

#[derive(Debug, thiserror::Error)]
pub enum AbortError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(
        "the migration is in phase {0}: the swap has happened, abort would lose the new keys; use `keyshift rollback` to go back to integer keys"
    )]
    AfterCutover(Phase),
}

/// What abort found.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Removed,
    NothingToDo,
}

pub async fn run(client: &Client, s: &Settings) -> Result<Outcome, AbortError> {
    let schema_exists: bool = client
        .query_one("SELECT to_regnamespace('keyshift') IS NOT NULL", &[])
        .await
        .map_err(|e| db::stmt_error("SELECT to_regnamespace('keyshift')", e))?
        .get(0);
    if !schema_exists {
        return Ok(Outcome::NothingToDo);
    }
    match state::load(client).await? {
        Some((plan, phase)) => {
            if phase.is_after_cutover() {
                return Err(AbortError::AfterCutover(phase));
            }
            // The proxies stop dual-writing before the columns go (they see `aborting`).
            for st in ddl::abort(&plan) {
                db::run_step(client, &st, s).await?;
            }
        }
        None => {
            // expand stopped before storing its plan: only the schema exists.
            db::exec(client, "DROP SCHEMA IF EXISTS keyshift CASCADE").await?;
        }
    }
    Ok(Outcome::Removed)
}
