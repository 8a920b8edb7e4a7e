//! Connecting, and running [`Step`]s: the `When` check, `lock_timeout` with retry and backoff
//! for brief locks, and errors that carry the statement and what the operator can do.

use std::time::Duration;

use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};

use super::Settings;
use super::ddl::{Mode, Step, When};

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error(
        "cannot connect to PostgreSQL: {source}\n  what to do: check --database-url (or KEYSHIFT_DATABASE_URL / database_url) and that the server is reachable"
    )]
    Connect { source: tokio_postgres::Error },
    #[error("PostgreSQL error: {}\n  while running: {statement}\n  what to do: {hint}", describe(.source))]
    Statement {
        statement: String,
        hint: String,
        source: tokio_postgres::Error,
    },
}

impl DbError {
    pub fn code(&self) -> Option<&SqlState> {
        match self {
            DbError::Connect { source } | DbError::Statement { source, .. } => source.code(),
        }
    }
}

/// The server's message with its SQLSTATE and detail, which `Display` of the error omits.
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut s = format!("{} (SQLSTATE {})", db.message(), db.code().code());
            if let Some(d) = db.detail() {
                s.push_str(&format!("; {d}"));
            }
            s
        }
        None => e.to_string(),
    }
}

/// What the operator can do about an error, by SQLSTATE.
pub fn hint(e: &tokio_postgres::Error) -> String {
    let code = e.code().cloned();
    let h = match code {
        Some(c) if c == SqlState::LOCK_NOT_AVAILABLE => {
            "a long transaction holds a lock on the table; find it in pg_stat_activity (wait_event_type = 'Lock' behind it), let it finish or end it, or raise lock_timeout / ddl_retries; then rerun: the command resumes where it stopped"
        }
        Some(c) if c == SqlState::INSUFFICIENT_PRIVILEGE => {
            "connect as the tables' owner (or a superuser): keyshift alters the tables and creates schema keyshift"
        }
        Some(c) if c == SqlState::FOREIGN_KEY_VIOLATION || c == SqlState::CHECK_VIOLATION => {
            // Raised by harden, cutover (phase up to hardened) and rollback (phase cut_over):
            // backfill runs in both, on the side each one needs.
            "some rows break the constraint: run `keyshift backfill` again (its catch-up pass repairs NULL and stale twins: the uuids before cutover, the legacy integers in phase cut_over), then `keyshift verify`, then rerun"
        }
        Some(c) if c == SqlState::UNIQUE_VIOLATION => {
            "duplicate keys: `keyshift verify` lists them; before cutover clear the duplicates' uuid columns and run `keyshift backfill` again (it gives them new ones); in phase cut_over give the duplicate legacy keys new values (`SET <key>_legacy = DEFAULT`) and run `keyshift backfill` (it re-links their children)"
        }
        Some(c) if c == SqlState::QUERY_CANCELED => {
            "the statement was cancelled (statement_timeout or an operator); rerun: the command resumes where it stopped"
        }
        Some(c)
            if c == SqlState::T_R_DEADLOCK_DETECTED || c == SqlState::T_R_SERIALIZATION_FAILURE =>
        {
            "rerun the command: it resumes where it stopped"
        }
        _ if e.is_closed() => {
            "the connection was lost; rerun the command: it resumes where it stopped"
        }
        _ => {
            "fix the cause above, then rerun the command: every keyshift command is idempotent and resumes where it stopped"
        }
    };
    h.to_string()
}

pub fn stmt_error(statement: &str, source: tokio_postgres::Error) -> DbError {
    DbError::Statement {
        statement: statement.trim().to_string(),
        hint: hint(&source),
        source,
    }
}

/// Connects and drives the connection on a background task.
pub async fn connect(url: &str) -> Result<Client, DbError> {
    let (client, mut conn) = tokio_postgres::connect(url, NoTls)
        .await
        .map_err(|source| DbError::Connect { source })?;
    // keyshift's own functions report with NOTICEs what they leave as it is (a view that gets
    // no copy in a shape, a CHECK that stays on the integer column): the operator sees them.
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(m) = futures_util::StreamExt::next(&mut messages).await {
            match m {
                Ok(tokio_postgres::AsyncMessage::Notice(n))
                    if n.message().starts_with("keyshift") =>
                {
                    tracing::warn!("{}", n.message())
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!("connection closed: {e}");
                    break;
                }
            }
        }
    });
    client
        .batch_execute("SET application_name = 'keyshift'")
        .await
        .map_err(|e| stmt_error("SET application_name = 'keyshift'", e))?;
    Ok(client)
}

pub async fn exec(client: &Client, sql: &str) -> Result<(), DbError> {
    client
        .batch_execute(sql)
        .await
        .map_err(|e| stmt_error(sql, e))
}

fn retryable(e: &tokio_postgres::Error) -> bool {
    matches!(
        e.code(),
        Some(c) if *c == SqlState::LOCK_NOT_AVAILABLE || *c == SqlState::T_R_DEADLOCK_DETECTED
    )
}

/// Whether the step still has work to do, from the live catalog.
pub async fn needed(client: &Client, when: &When) -> Result<bool, DbError> {
    const COL: &str = "SELECT EXISTS (SELECT 1 FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid \
        JOIN pg_namespace n ON n.oid = c.relnamespace \
        WHERE n.nspname = $1 AND c.relname = $2 AND a.attname = $3 AND a.attnum > 0 AND NOT a.attisdropped)";
    const DEF: &str = "SELECT EXISTS (SELECT 1 FROM pg_attrdef d JOIN pg_attribute a ON a.attrelid = d.adrelid AND a.attnum = d.adnum \
        JOIN pg_class c ON c.oid = d.adrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
        WHERE n.nspname = $1 AND c.relname = $2 AND a.attname = $3)";
    const CON: &str = "SELECT bool_or(con.convalidated) FROM pg_constraint con JOIN pg_class c ON c.oid = con.conrelid \
        JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relname = $2 AND con.conname = $3";
    const IDX: &str = "SELECT bool_or(i.indisvalid) FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid \
        JOIN pg_namespace n ON n.oid = ic.relnamespace WHERE n.nspname = $1 AND ic.relname = $2";
    let q = |sql: &'static str| sql;
    let one = |r: Result<tokio_postgres::Row, tokio_postgres::Error>, sql: &str| {
        r.map_err(|e| stmt_error(sql, e))
    };
    Ok(match when {
        When::Always => true,
        When::ColumnMissing {
            schema,
            table,
            column,
        } => {
            let r = one(
                client.query_one(q(COL), &[schema, table, column]).await,
                COL,
            )?;
            !r.get::<_, bool>(0)
        }
        When::ColumnPresent {
            schema,
            table,
            column,
        } => {
            let r = one(client.query_one(COL, &[schema, table, column]).await, COL)?;
            r.get::<_, bool>(0)
        }
        When::DefaultMissing {
            schema,
            table,
            column,
        } => {
            let r = one(client.query_one(DEF, &[schema, table, column]).await, DEF)?;
            !r.get::<_, bool>(0)
        }
        When::ConstraintMissing {
            schema,
            table,
            name,
        } => {
            let r = one(client.query_one(CON, &[schema, table, name]).await, CON)?;
            r.get::<_, Option<bool>>(0).is_none()
        }
        When::ConstraintPresent {
            schema,
            table,
            name,
        } => {
            let r = one(client.query_one(CON, &[schema, table, name]).await, CON)?;
            r.get::<_, Option<bool>>(0).is_some()
        }
        When::ConstraintNotValidated {
            schema,
            table,
            name,
        } => {
            let r = one(client.query_one(CON, &[schema, table, name]).await, CON)?;
            r.get::<_, Option<bool>>(0) == Some(false)
        }
        When::RelationMissing { name } => {
            const REL: &str = "SELECT to_regclass($1) IS NULL";
            let r = one(client.query_one(REL, &[name]).await, REL)?;
            r.get::<_, bool>(0)
        }
        When::IndexPresent { schema, name } => {
            let r = one(client.query_one(IDX, &[schema, name]).await, IDX)?;
            r.get::<_, Option<bool>>(0).is_some()
        }
        When::IndexOlderThan { schema, name, than } => {
            // An interrupted REINDEX CONCURRENTLY leaves an INVALID copy, `<name>_ccnew` (or
            // the old index as `<name>_ccold`; PostgreSQL cuts `<name>` to fit 63 bytes and
            // may add a digit): maintained by every write, useless. Dropped before a rerun.
            const LEFT: &str = "SELECT format('%I.%I', n.nspname, ic.relname) FROM pg_index i \
                JOIN pg_class ic ON ic.oid = i.indexrelid JOIN pg_namespace n ON n.oid = ic.relnamespace \
                WHERE n.nspname = $1 AND NOT i.indisvalid \
                  AND i.indrelid = (SELECT indrelid FROM pg_index WHERE indexrelid = to_regclass(format('%I.%I', $1::text, $2::text))) \
                  AND ic.relname ~ '_cc(new|old)[0-9]*$' AND starts_with(ic.relname::text, left($2::text, 20))";
            let rows = client
                .query(LEFT, &[schema, name])
                .await
                .map_err(|e| stmt_error(LEFT, e))?;
            for r in rows {
                let left: String = r.get(0);
                tracing::warn!(
                    "index {left} is INVALID (an interrupted REINDEX CONCURRENTLY of {schema}.{name}); dropping it"
                );
                exec(client, "SET lock_timeout = 0").await?;
                exec(client, &format!("DROP INDEX CONCURRENTLY IF EXISTS {left}")).await?;
            }
            const OLDER: &str = "SELECT to_regclass(format('%I.%I', $1::text, $2::text))::oid \
                < to_regclass(format('%I.%I', $1::text, $3::text))::oid";
            let r = one(client.query_one(OLDER, &[schema, name, than]).await, OLDER)?;
            r.get::<_, Option<bool>>(0) == Some(true)
        }
        When::MirrorNeeded {
            schema,
            table,
            from,
            to,
        } => {
            // Privileges compared without their grantor (keyshift grants as itself).
            const MIRROR: &str = "WITH s AS (SELECT attacl, col_description(attrelid, attnum) AS c, attstattarget AS st \
                FROM pg_attribute WHERE attrelid = to_regclass(format('%I.%I', $1::text, $2::text)) AND attname = $3), \
                d AS (SELECT attacl, col_description(attrelid, attnum) AS c, attstattarget AS st \
                FROM pg_attribute WHERE attrelid = to_regclass(format('%I.%I', $1::text, $2::text)) AND attname = $4) \
                SELECT coalesce(EXISTS (SELECT a.grantee, a.privilege_type, a.is_grantable FROM s, aclexplode(s.attacl) a \
                EXCEPT SELECT a.grantee, a.privilege_type, a.is_grantable FROM d, aclexplode(d.attacl) a) \
                OR (SELECT s.c IS NOT NULL AND s.c IS DISTINCT FROM d.c FROM s, d) \
                OR (SELECT s.st >= 0 AND s.st IS DISTINCT FROM d.st FROM s, d), false)";
            let r = one(
                client.query_one(MIRROR, &[schema, table, from, to]).await,
                MIRROR,
            )?;
            r.get::<_, bool>(0)
        }
        When::TriggersMissing {
            schema,
            table,
            names,
        }
        | When::TriggersPresent {
            schema,
            table,
            names,
        } => {
            const TRG: &str = "SELECT count(*) FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid \
                JOIN pg_namespace n ON n.oid = c.relnamespace \
                WHERE n.nspname = $1 AND c.relname = $2 AND t.tgname = ANY($3)";
            let r = one(client.query_one(TRG, &[schema, table, names]).await, TRG)?;
            let n = r.get::<_, i64>(0);
            match when {
                When::TriggersMissing { .. } => (n as usize) < names.len(),
                _ => n > 0,
            }
        }
        When::CarriedViews { columns } => {
            const VIEWS: &str = "SELECT EXISTS (SELECT 1 FROM keyshift.carried_objects($1::text::jsonb) WHERE kind = 'view')";
            let r = one(client.query_one(VIEWS, &[columns]).await, VIEWS)?;
            r.get::<_, bool>(0)
        }
        // Decided leaf by leaf, by `run_step`.
        When::EachLeaf { .. } => true,
        When::IndexNotValid { schema, name } => {
            let r = one(client.query_one(IDX, &[schema, name]).await, IDX)?;
            match r.get::<_, Option<bool>>(0) {
                Some(true) => false,
                Some(false) => {
                    // Left INVALID by an interrupted CREATE INDEX CONCURRENTLY: it is
                    // maintained by every write but useless; drop it and build it again.
                    let drop = format!(
                        "DROP INDEX CONCURRENTLY IF EXISTS {}",
                        crate::ident::qualified(schema, name)
                    );
                    tracing::warn!(
                        "index {schema}.{name} is INVALID (an interrupted build); dropping and rebuilding it"
                    );
                    exec(client, "SET lock_timeout = 0").await?;
                    exec(client, &drop).await?;
                    true
                }
                None => true,
            }
        }
    })
}

/// How many of `columns`, each (schema, table, column), are there: the test of
/// [`When::ColumnPresent`] in [`needed`], for many columns in one query.
pub async fn columns_present(
    client: &Client,
    columns: &[(&str, &str, &str)],
) -> Result<usize, DbError> {
    const COLS: &str = "SELECT count(*) FROM unnest($1::text[], $2::text[], $3::text[]) AS w(nsp, rel, col) \
        WHERE EXISTS (SELECT 1 FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid \
        JOIN pg_namespace n ON n.oid = c.relnamespace \
        WHERE n.nspname = w.nsp AND c.relname = w.rel AND a.attname = w.col AND a.attnum > 0 AND NOT a.attisdropped)";
    let nsp: Vec<&str> = columns.iter().map(|c| c.0).collect();
    let rel: Vec<&str> = columns.iter().map(|c| c.1).collect();
    let col: Vec<&str> = columns.iter().map(|c| c.2).collect();
    let r = client
        .query_one(COLS, &[&nsp, &rel, &col])
        .await
        .map_err(|e| stmt_error(COLS, e))?;
    Ok(r.get::<_, i64>(0) as usize)
}

/// Runs one step if it is still needed (a step over partitions: on each leaf that still
/// needs it). Returns whether it ran.
pub async fn run_step(client: &Client, step: &Step, s: &Settings) -> Result<bool, DbError> {
    if let When::EachLeaf { schema, table, op } = &step.when {
        return super::partitions::run(client, schema, table, op, s).await;
    }
    run_one(client, step, s).await
}

/// Runs one plain step if it is still needed.
pub(super) async fn run_one(client: &Client, step: &Step, s: &Settings) -> Result<bool, DbError> {
    if !needed(client, &step.when).await? {
        tracing::debug!("already done: {}", step.sql);
        return Ok(false);
    }
    match step.mode {
        Mode::Brief => {
            exec(
                client,
                &format!("SET lock_timeout = '{}ms'", s.lock_timeout.as_millis()),
            )
            .await?;
            let mut delay = Duration::from_millis(100);
            let mut attempt = 0;
            loop {
                attempt += 1;
                match client.batch_execute(&step.sql).await {
                    Ok(()) => break,
                    Err(e) if retryable(&e) && attempt <= s.ddl_retries => {
                        // Jitter so that several keyshift runs (or retries of other tools) do
                        // not line up behind the same long transaction.
                        let jitter = rand::random::<f64>() * 0.5 + 0.75;
                        let wait = delay.mul_f64(jitter);
                        tracing::warn!(
                            "lock not granted within lock_timeout (attempt {attempt}/{}), retrying in {wait:?}: {}",
                            s.ddl_retries,
                            step.sql
                        );
                        super::autovacuum::yield_to(client, &step.sql).await;
                        tokio::time::sleep(wait).await;
                        delay = (delay * 2).min(Duration::from_secs(10));
                    }
                    Err(e) => return Err(stmt_error(&step.sql, e)),
                }
            }
        }
        Mode::Online | Mode::State | Mode::Swap => {
            // SHARE UPDATE EXCLUSIVE does not conflict with reads or writes, and a concurrent
            // index build must wait for older transactions anyway: no lock timeout here.
            exec(client, "SET lock_timeout = 0").await?;
            exec(client, &step.sql).await?;
        }
    }
    tracing::info!("done: {}", one_line(&step.sql));
    Ok(true)
}

pub fn one_line(sql: &str) -> String {
    let s: String = sql.split_whitespace().collect::<Vec<_>>().join(" ");
    if s.len() > 160 {
        let mut cut = 157;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        format!("{}...", &s[..cut])
    } else {
        s
    }
}
