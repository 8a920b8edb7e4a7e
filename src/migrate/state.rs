//! Schema `keyshift`: the migration (plan as JSON, phase, rules version), per-task backfill
//! cursors and counts, an event log, and the registered proxies. Everything durable lives here,
//! in the target database, so that proxies stay stateless and any operator machine can resume.

use crate::shape::Shape;
use serde::{Deserialize, Serialize};
use tokio_postgres::Client;

use super::plan::{PLAN_FORMAT, Plan};

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("reading keyshift's state: {0}")]
    Db(#[from] tokio_postgres::Error),
    #[error("the stored plan cannot be read ({0}); it was written by another keyshift version")]
    Plan(serde_json::Error),
    #[error(
        "the stored plan has format {0}, this keyshift knows format {PLAN_FORMAT}; use the keyshift version that ran expand"
    )]
    Format(u32),
    #[error("unknown phase {0:?} in keyshift.migration")]
    Phase(String),
}

/// Where a migration stands. Stored as its snake_case name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// expand has started: the uuid columns may not all exist yet.
    Expanding,
    /// Every uuid column exists; new rows get a key uuid from the default.
    Expanded,
    Backfilling,
    Backfilled,
    Hardening,
    /// Unique indexes, CHECKs and shadow FKs are built and validated.
    Hardened,
    /// `keyshift cutover --by-table` is swapping the tables one group at a time: some are
    /// in the integer shape, some in the uuid shape (`keyshift.swapped` says which), and the
    /// proxies serve every session translated, through keyshift's views of its shape, which
    /// do not see the swaps (docs/cutover.md, "The cutover table by table").
    CuttingOver,
    /// The uuid columns carry the original names; legacy integers are kept filled.
    CutOver,
    RollingBack,
    Finalizing,
    Finalized,
    /// abort is removing keyshift's objects.
    Aborting,
}

/// What a proxy must do with writes in a phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum DualWrite {
    /// Pass writes through unchanged.
    Off,
    /// Fill `<fk>_uuid` from the parent's uuid.
    Forward,
    /// After cutover: fill `<fk>_legacy` from the parent's legacy integer.
    Reverse,
}

impl Phase {
    pub const ALL: [Phase; 12] = [
        Phase::Expanding,
        Phase::Expanded,
        Phase::Backfilling,
        Phase::Backfilled,
        Phase::Hardening,
        Phase::Hardened,
        Phase::CuttingOver,
        Phase::CutOver,
        Phase::RollingBack,
        Phase::Finalizing,
        Phase::Finalized,
        Phase::Aborting,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Expanding => "expanding",
            Phase::Expanded => "expanded",
            Phase::Backfilling => "backfilling",
            Phase::Backfilled => "backfilled",
            Phase::Hardening => "hardening",
            Phase::Hardened => "hardened",
            Phase::CuttingOver => "cutting_over",
            Phase::CutOver => "cut_over",
            Phase::RollingBack => "rolling_back",
            Phase::Finalizing => "finalizing",
            Phase::Finalized => "finalized",
            Phase::Aborting => "aborting",
        }
    }

    pub fn parse(s: &str) -> Option<Phase> {
        Phase::ALL.into_iter().find(|p| p.as_str() == s)
    }

    /// The swap has happened (or is happening): abort would lose data, rollback is the way back.
    pub fn is_after_cutover(self) -> bool {
        matches!(
            self,
            Phase::CuttingOver
                | Phase::CutOver
                | Phase::RollingBack
                | Phase::Finalizing
                | Phase::Finalized
        )
    }

    pub fn dual_write(self) -> DualWrite {
        match self {
            Phase::Expanded
            | Phase::Backfilling
            | Phase::Backfilled
            | Phase::Hardening
            | Phase::Hardened
            | Phase::CuttingOver => DualWrite::Forward,
            Phase::CutOver | Phase::RollingBack => DualWrite::Reverse,
            Phase::Expanding | Phase::Finalizing | Phase::Finalized | Phase::Aborting => {
                DualWrite::Off
            }
        }
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The whole stored migration row.
#[derive(Debug, Clone)]
pub struct Migration {
    pub plan: Plan,
    pub phase: Phase,
    /// Bumped at every phase change; a proxy swaps its rule set when it sees a new one.
    pub rules_version: i64,
    /// The shape of sessions that name none and match no rule (`keyshift shape default`).
    pub default_shape: Shape,
}

/// The state schema. Idempotent; creating it takes no lock on application tables.
pub fn schema_sql() -> String {
    "CREATE SCHEMA IF NOT EXISTS keyshift;
CREATE TABLE IF NOT EXISTS keyshift.migration (
    id int PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    phase text NOT NULL,
    plan jsonb NOT NULL,
    plan_format int NOT NULL,
    rules_version bigint NOT NULL DEFAULT 1,
    keyshift_version text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS keyshift.backfill (
    task text PRIMARY KEY,
    ord int NOT NULL,
    kind text NOT NULL,
    schema_name text NOT NULL,
    table_name text NOT NULL,
    column_name text NOT NULL,
    cursor bigint,
    done boolean NOT NULL DEFAULT false,
    rows_estimate bigint NOT NULL DEFAULT 0,
    rows_done bigint NOT NULL DEFAULT 0,
    rows_updated bigint NOT NULL DEFAULT 0,
    batches bigint NOT NULL DEFAULT 0,
    last_batch_ms double precision,
    started_at timestamptz,
    finished_at timestamptz,
    updated_at timestamptz
);
CREATE TABLE IF NOT EXISTS keyshift.events (
    id bigserial PRIMARY KEY,
    at timestamptz NOT NULL DEFAULT clock_timestamp(),
    actor text NOT NULL,
    kind text NOT NULL,
    message text NOT NULL,
    detail jsonb
);
CREATE TABLE IF NOT EXISTS keyshift.proxies (
    id text PRIMARY KEY,
    address text,
    pid int,
    version text,
    started_at timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    acked_rules_version bigint,
    paused boolean NOT NULL DEFAULT false
);
ALTER TABLE keyshift.migration ADD COLUMN IF NOT EXISTS default_shape text NOT NULL DEFAULT 'integer'
    CHECK (default_shape IN ('integer', 'uuid'));
ALTER TABLE keyshift.proxies ADD COLUMN IF NOT EXISTS sessions jsonb;
ALTER TABLE keyshift.backfill ADD COLUMN IF NOT EXISTS rows_per_sec double precision;
ALTER TABLE keyshift.backfill ADD COLUMN IF NOT EXISTS row_cost double precision NOT NULL DEFAULT 1;
CREATE OR REPLACE FUNCTION keyshift.missing_parent(key text, child text, constraint_name text,
    col text, parent text) RETURNS text LANGUAGE plpgsql STRICT AS $$
BEGIN
  -- The dual-write's lookup found no parent for a non-NULL key: fail as the FK would.
  RAISE foreign_key_violation USING
    MESSAGE = format('insert or update on table \"%s\" violates foreign key constraint \"%s\"', child, constraint_name),
    DETAIL = format('Key (%s)=(%s) is not present in table \"%s\".', col, key, parent),
    TABLE = child, CONSTRAINT = constraint_name;
END $$"
    .into()
}

/// `keyshift.uuid_v7()`: RFC 9562 version 7 (48-bit Unix milliseconds, then random bits), in
/// plain SQL so that it needs no extension; inlined by the planner.
pub fn uuid_v7_sql() -> String {
    "CREATE OR REPLACE FUNCTION keyshift.uuid_v7() RETURNS uuid LANGUAGE sql VOLATILE PARALLEL SAFE AS $$
  SELECT encode(set_bit(set_bit(overlay(uuid_send(gen_random_uuid())
           PLACING substring(int8send((extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3)
           FROM 1 FOR 6), 52, 1), 53, 1), 'hex')::uuid
$$"
    .into()
}

/// The phase change, with the NOTIFY that wakes every proxy (delivered at commit).
pub fn set_phase_sql(p: Phase) -> String {
    format!(
        "UPDATE keyshift.migration SET phase = '{p}', rules_version = rules_version + 1, updated_at = now(); \
NOTIFY keyshift, '{p}'"
    )
}

/// [`set_phase_sql`], only from phase `from`: a second coordinator that finished first has
/// already moved on, and this one must not bump the rules again.
pub fn move_phase_sql(from: Phase, to: Phase) -> String {
    format!(
        "UPDATE keyshift.migration SET phase = '{to}', rules_version = rules_version + 1, updated_at = now() WHERE phase = '{from}'; \
NOTIFY keyshift, '{to}'"
    )
}

/// After finalize: keyshift's state goes. With uuid v7 the function stays (key defaults call
/// it); with `keep_map` the schema stays too, for `keyshift.id_map_archive`.
pub fn drop_state_sql(drop_function: bool, keep_map: bool) -> String {
    if drop_function && !keep_map {
        return "DROP SCHEMA IF EXISTS keyshift CASCADE".into();
    }
    let mut sql = "DROP TABLE IF EXISTS keyshift.migration, keyshift.backfill, keyshift.events, keyshift.proxies, keyshift.switch_attempts; \
DROP FUNCTION IF EXISTS keyshift.missing_parent(text, text, text, text, text)".to_string();
    if drop_function {
        sql.push_str("; DROP FUNCTION IF EXISTS keyshift.uuid_v7()");
    }
    sql
}

/// Plan and phase, or `None` when no migration was started (no schema `keyshift`).
pub async fn load(client: &Client) -> Result<Option<(Plan, Phase)>, StateError> {
    Ok(load_migration(client).await?.map(|m| (m.plan, m.phase)))
}

pub async fn load_migration(client: &Client) -> Result<Option<Migration>, StateError> {
    Ok(load_with_plan(client).await?.map(|(head, plan)| Migration {
        plan,
        phase: head.phase,
        rules_version: head.rules_version,
        default_shape: head.default_shape,
    }))
}

/// What tells one stored plan from another without reading it. The plan is written once
/// ([`insert_migration`]: a second expand keeps the first) and never updated; a new migration
/// (after abort or finalize dropped the state) is a new row with a new `created_at`. The
/// stored size is a second, free check. Reading the plan itself costs 35 ms at 1,000 tables
/// (2 MB of JSON), which the proxy would otherwise pay at every refresh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanStamp {
    /// `keyshift.migration.created_at`, as text.
    pub created_at: String,
    /// `pg_column_size(plan)`: its stored, compressed size.
    pub stored_size: i32,
}

/// The migration row without its plan: what the proxy reads at every refresh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub phase: Phase,
    /// Bumped at every phase change.
    pub rules_version: i64,
    pub default_shape: Shape,
    pub stamp: PlanStamp,
}

/// The migration row without its plan, or `None` when no migration was started.
pub async fn load_head(client: &Client) -> Result<Option<Head>, StateError> {
    Ok(select(client, false).await?.map(|(head, _)| head))
}

/// The migration row and its plan, read in one statement; `None` when no migration was
/// started.
pub async fn load_with_plan(client: &Client) -> Result<Option<(Head, Plan)>, StateError> {
    let Some((head, plan)) = select(client, true).await? else {
        return Ok(None);
    };
    let plan = parse_plan(plan.as_deref().unwrap_or_default())?;
    Ok(Some((head, plan)))
}

fn parse_plan(text: &str) -> Result<Plan, StateError> {
    serde_json::from_str(text).map_err(StateError::Plan)
}

/// The migration row, its plan's text too if `with_plan`; one statement, so one snapshot.
async fn select(
    client: &Client,
    with_plan: bool,
) -> Result<Option<(Head, Option<String>)>, StateError> {
    // Whether the table exists, and whether it has `default_shape` (state written before
    // shapes has not): asked of the catalog rather than tried, so that a transaction
    // around this read survives. `to_jsonb(m) ->> 'default_shape'` would answer both in one
    // go, but it converts the whole row, plan included: 60 ms at 1,000 tables.
    let row = client
        .query_one(
            "SELECT to_regclass('keyshift.migration') IS NOT NULL,
                    EXISTS (SELECT 1 FROM pg_attribute
                             WHERE attrelid = to_regclass('keyshift.migration')
                               AND attname = 'default_shape' AND NOT attisdropped)",
            &[],
        )
        .await?;
    if !row.get::<_, bool>(0) {
        return Ok(None);
    }
    let shape = if row.get(1) {
        "default_shape"
    } else {
        "'integer'"
    };
    let plan = if with_plan { "plan::text" } else { "NULL" };
    let Some(row) = client
        .query_opt(
            &format!(
                "SELECT phase, rules_version, {shape}::text, created_at::text,
                        pg_column_size(plan), plan_format, {plan}::text
                 FROM keyshift.migration WHERE id = 1"
            ),
            &[],
        )
        .await?
    else {
        return Ok(None);
    };
    let format: i32 = row.get(5);
    if format as u32 != PLAN_FORMAT {
        return Err(StateError::Format(format as u32));
    }
    let phase: String = row.get(0);
    let head = Head {
        phase: Phase::parse(&phase).ok_or(StateError::Phase(phase))?,
        rules_version: row.get(1),
        // A database the CHECK guards; anything else reads as the original shape.
        default_shape: Shape::parse(row.get::<_, &str>(2)).unwrap_or(Shape::Integer),
        stamp: PlanStamp {
            created_at: row.get(3),
            stored_size: row.get(4),
        },
    };
    Ok(Some((head, row.get(6))))
}

/// Records the plan once; a second expand keeps the first plan.
pub async fn insert_migration(client: &Client, plan: &Plan) -> Result<(), StateError> {
    let json = serde_json::to_string(plan).map_err(StateError::Plan)?;
    client
        .execute(
            "INSERT INTO keyshift.migration (phase, plan, plan_format, keyshift_version)
             VALUES ($1, $2::text::jsonb, $3, $4) ON CONFLICT (id) DO NOTHING",
            &[
                &Phase::Expanding.as_str(),
                &json,
                &(PLAN_FORMAT as i32),
                &env!("CARGO_PKG_VERSION"),
            ],
        )
        .await?;
    Ok(())
}

pub async fn set_phase(client: &Client, p: Phase) -> Result<(), StateError> {
    client.batch_execute(&set_phase_sql(p)).await?;
    Ok(())
}

/// Appends to the event log; `detail` is free-form JSON.
pub async fn event(
    client: &Client,
    kind: &str,
    message: &str,
    detail: Option<serde_json::Value>,
) -> Result<(), StateError> {
    let detail = detail.map(|d| d.to_string());
    client
        .execute(
            "INSERT INTO keyshift.events (actor, kind, message, detail) VALUES ($1, $2, $3, $4::text::jsonb)",
            &[&actor(), &kind, &message, &detail],
        )
        .await?;
    Ok(())
}

fn actor() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "?".into());
    format!("cli@{host}:{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_roundtrip_and_dual_write() {
        for p in Phase::ALL {
            assert_eq!(Phase::parse(p.as_str()), Some(p));
        }
        assert_eq!(Phase::Expanding.dual_write(), DualWrite::Off);
        assert_eq!(Phase::Hardened.dual_write(), DualWrite::Forward);
        assert_eq!(Phase::CutOver.dual_write(), DualWrite::Reverse);
        assert!(Phase::CutOver.is_after_cutover());
        assert!(!Phase::Hardened.is_after_cutover());
    }
}
