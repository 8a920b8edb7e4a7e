//! What the control link builds the rules from, and what it keeps of it between refreshes.
//!
//! - **The stored plan**, read again only when its stamp (`state::PlanStamp`) moves: a refresh
//!   reads the migration row without it. Safe because the plan is written once per migration
//!   and a new migration is a new row. Reading it cost 35 ms at 1,000 tables (2 MB of JSON),
//!   plus 60 ms for the `to_jsonb` of the whole row that found `default_shape`, at every
//!   refresh and three times in some.
//! - **The catalog reading** ([`Reading`]) the rules in force were built from. A full read
//!   ([`Source::snapshot`]) runs in one REPEATABLE READ transaction with the migration row,
//!   so that the reading and the phase it is built for are of the same moment. At a swap
//!   seen while the gate is held, [`Source::after_swap`] derives the next reading from the
//!   kept one instead of reading the catalog, and leaves it *unverified*: the control link
//!   reads the catalog again once the gate is open and corrects the rules if the catalog
//!   differs (something other than the swap changed it since the last reading: the
//!   application's DDL, keyshift's copies of new views). Anything that may have changed
//!   the catalog behind a kept reading makes it [`Source::distrust`]ed: it is then neither
//!   derived from nor left unchecked.

use std::sync::Arc;

use tokio_postgres::Client;

use super::dualwrite;
use super::reading::{Reading, ReadingError};
use crate::migrate::plan::Plan;
use crate::migrate::state::{self, Head, PlanStamp, StateError};
use crate::shape::Shape;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{0}")]
    State(#[from] StateError),
    #[error("{0}")]
    Reading(#[from] ReadingError),
    #[error("starting or ending the snapshot of the catalog: {0}")]
    Db(#[from] tokio_postgres::Error),
}

impl SourceError {
    /// Whether the connection failed (the link then reconnects), rather than the state or
    /// the catalog being unusable.
    pub fn is_db(&self) -> bool {
        matches!(
            self,
            SourceError::State(StateError::Db(_))
                | SourceError::Reading(ReadingError::Db(_))
                | SourceError::Db(_)
        )
    }
}

/// The stored migration: its row and its plan.
#[derive(Debug, Clone)]
pub struct Stored {
    pub head: Head,
    pub plan: Arc<Plan>,
}

/// The reading the rules in force were built from.
struct Kept {
    /// The plan it was read for (the tables and columns it covers).
    stamp: PlanStamp,
    reading: Arc<Reading>,
    /// False when derived, or when the catalog may have changed since: to be read again.
    verified: bool,
    /// False when the catalog may have changed since, other than by a swap: not to be
    /// derived from.
    trusted: bool,
}

#[derive(Default)]
pub struct Source {
    plan: Option<(PlanStamp, Arc<Plan>)>,
    kept: Option<Kept>,
}

impl Source {
    /// The migration as stored now, `None` when there is none. One small read, and the plan
    /// only when its stamp moved.
    pub async fn migration(&mut self, client: &Client) -> Result<Option<Stored>, StateError> {
        let Some(head) = state::load_head(client).await? else {
            return Ok(None);
        };
        match &self.plan {
            Some((stamp, plan)) if *stamp == head.stamp => Ok(Some(Stored {
                head,
                plan: plan.clone(),
            })),
            // Row and plan again in one statement: the row may have moved since.
            _ => self.with_plan(client).await,
        }
    }

    async fn with_plan(&mut self, client: &Client) -> Result<Option<Stored>, StateError> {
        let Some((head, plan)) = state::load_with_plan(client).await? else {
            return Ok(None);
        };
        let plan = Arc::new(plan);
        self.plan = Some((head.stamp.clone(), plan.clone()));
        Ok(Some(Stored { head, plan }))
    }

    /// The migration and, when its phase has rules, a full reading of the catalog for it,
    /// in one REPEATABLE READ snapshot (the row may be newer than the caller's last look).
    pub async fn snapshot(
        &mut self,
        client: &Client,
    ) -> Result<Option<(Stored, Option<Reading>)>, SourceError> {
        // On `&Client`, by hand: the control link owns this connection and runs one thing at
        // a time, so nothing else can slip a statement into the transaction.
        client
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await?;
        let read = self.snapshot_in_transaction(client).await;
        // Read-only: COMMIT or ROLLBACK alike end it; after an error only ROLLBACK does.
        let end = client
            .batch_execute(if read.is_ok() { "COMMIT" } else { "ROLLBACK" })
            .await;
        let read = read?;
        end?;
        Ok(read)
    }

    async fn snapshot_in_transaction(
        &mut self,
        client: &Client,
    ) -> Result<Option<(Stored, Option<Reading>)>, SourceError> {
        let Some(m) = self.migration(client).await? else {
            return Ok(None);
        };
        if dualwrite::direction(m.head.phase).is_none() {
            return Ok(Some((m, None)));
        }
        let reading = Reading::read(client, &m.plan, Shape::physical(m.head.phase)).await?;
        Ok(Some((m, Some(reading))))
    }

    /// The reading for `m`, derived from the kept one, when `m` is the kept reading's plan
    /// after a swap (its tables in the other shape) and nothing else is known to have
    /// changed the catalog since that reading.
    pub fn after_swap(&self, m: &Stored) -> Option<Reading> {
        let kept = self
            .kept
            .as_ref()
            .filter(|k| k.trusted && k.stamp == m.head.stamp)?;
        match Shape::physical(m.head.phase) {
            // Entering phase cutting_over: its swap renames nothing (the groups come after).
            None => kept.reading.through_views(),
            Some(to) if kept.reading.shape != to => kept.reading.after_swap(&m.plan),
            Some(_) => None,
        }
    }

    /// Keeps the reading the rules now in force were built from; `verified`: it is a full
    /// read of the catalog, not derived.
    pub fn keep(&mut self, m: &Stored, reading: Arc<Reading>, verified: bool) {
        self.kept = Some(Kept {
            stamp: m.head.stamp.clone(),
            reading,
            verified,
            trusted: true,
        });
    }

    /// The kept reading, if it was read (or derived) for `m`'s plan.
    pub fn kept(&self, m: &Stored) -> Option<&Reading> {
        self.kept
            .as_ref()
            .filter(|k| k.stamp == m.head.stamp)
            .map(|k| k.reading.as_ref())
    }

    /// The rules were rebuilt from this full reading, or it matched the kept one.
    pub fn verified(&mut self, m: &Stored, reading: Arc<Reading>) {
        self.keep(m, reading, true);
    }

    /// Whether the rules in force rest on a reading the catalog has not confirmed.
    pub fn unverified(&self) -> bool {
        self.kept.as_ref().is_some_and(|k| !k.verified)
    }

    /// The catalog may have changed behind the kept reading (keyshift announced new copies of
    /// views, the link was down): read it again before trusting it.
    pub fn distrust(&mut self) {
        if let Some(k) = &mut self.kept {
            k.verified = false;
            k.trusted = false;
        }
    }

    /// No migration any more: nothing kept applies.
    pub fn clear(&mut self) {
        self.kept = None;
        self.plan = None;
    }
}
