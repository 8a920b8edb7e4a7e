//! The operator's view of shapes (DESIGN "Shapes", issue 13 point 6): the migration's default
//! shape (`keyshift shape default`), the sessions every proxy reports per shape, user,
//! database and application_name (`keyshift status`, `/v1/status`), and the guard that keeps
//! `finalize` from dropping the integer columns under a session that still reads them.
//!
//! Proxies write their session groups into `keyshift.proxies.sessions` at each heartbeat
//! (every `proxy::control::HEARTBEAT`, 2 s). That is fresh enough for `status`, not for
//! finalize: a V1 worker that connected a second ago must not be missed. So finalize asks for
//! fresh numbers: it sends `NOTIFY keyshift`, on which every proxy re-reads the state and
//! heartbeats, and waits for a heartbeat newer than its request from every proxy it knows.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio_postgres::Client;

use super::db::{self, DbError};
use super::state::{self, Phase, StateError};
use super::switch::{GONE_AFTER, LIVE_WITHIN};
use crate::shape::Shape;

#[derive(Debug, thiserror::Error)]
pub enum ShapeError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(
        "no migration here: the default shape belongs to a migration; run `keyshift expand` first"
    )]
    NoMigration,
    /// The phase does not allow that default; the text says why and when it will.
    #[error("{0}")]
    Refused(String),
}

fn q(e: tokio_postgres::Error, what: &str) -> DbError {
    db::stmt_error(what, e)
}

/// Sessions of one proxy that share a shape, user, database and application_name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionGroup {
    pub shape: Shape,
    pub user: String,
    pub database: String,
    pub application_name: String,
    pub sessions: u64,
    /// The upstream backends of these sessions (0 not yet known), so that `finalize
    /// --terminate` can end them with `pg_terminate_backend`; omitted from summaries.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backend_pids: Vec<u32>,
}

/// One session as the grouping sees it: (shape, user, database, application_name, pid).
pub type SessionKey<'a> = (Shape, &'a str, &'a str, &'a str, u32);

/// Groups sessions by (shape, user, database, application_name), in that order. Pure, so
/// that the proxy's gate and the tests share it.
pub fn group_sessions<'a>(sessions: impl IntoIterator<Item = SessionKey<'a>>) -> Vec<SessionGroup> {
    let mut groups: BTreeMap<(&str, &str, &str, &str), SessionGroup> = BTreeMap::new();
    for (shape, user, database, app, pid) in sessions {
        let g = groups
            .entry((shape.as_str(), user, database, app))
            .or_insert_with(|| SessionGroup {
                shape,
                user: user.to_string(),
                database: database.to_string(),
                application_name: app.to_string(),
                sessions: 0,
                backend_pids: Vec::new(),
            });
        g.sessions += 1;
        if pid != 0 {
            g.backend_pids.push(pid);
        }
    }
    groups.into_values().collect()
}

/// Adds up groups from several proxies (pids dropped): the cluster-wide view.
pub fn merge_groups<'a>(groups: impl IntoIterator<Item = &'a SessionGroup>) -> Vec<SessionGroup> {
    let mut out: BTreeMap<(&str, &str, &str, &str), SessionGroup> = BTreeMap::new();
    for g in groups {
        let key = (
            g.shape.as_str(),
            g.user.as_str(),
            g.database.as_str(),
            g.application_name.as_str(),
        );
        out.entry(key)
            .or_insert_with(|| SessionGroup {
                sessions: 0,
                backend_pids: Vec::new(),
                ..g.clone()
            })
            .sessions += g.sessions;
    }
    out.into_values().collect()
}

/// Sessions per shape, by the shape's name, both shapes always present.
pub fn totals<'a>(
    groups: impl IntoIterator<Item = &'a SessionGroup>,
) -> BTreeMap<&'static str, u64> {
    let mut t: BTreeMap<&'static str, u64> = Shape::ALL.iter().map(|s| (s.as_str(), 0)).collect();
    for g in groups {
        *t.entry(g.shape.as_str()).or_default() += g.sessions;
    }
    t
}

/// What one registered proxy last reported.
#[derive(Debug, Clone, Serialize)]
pub struct ProxySessions {
    pub proxy: String,
    pub heartbeat_age_s: f64,
    /// Heartbeat within `LIVE_WITHIN`: its numbers are at most that old.
    pub live: bool,
    /// `None`: this proxy writes no session groups (a keyshift older than shapes).
    pub groups: Option<Vec<SessionGroup>>,
}

/// Every proxy seen within `GONE_AFTER` (older rows are proxies that are gone).
pub async fn read_proxies(client: &Client) -> Result<Vec<ProxySessions>, DbError> {
    let sql = format!(
        "SELECT id, extract(epoch FROM now() - heartbeat_at)::float8,
                heartbeat_at > now() - interval '{LIVE_WITHIN}',
                (to_jsonb(p) -> 'sessions')::text
         FROM keyshift.proxies p WHERE heartbeat_at > now() - interval '{GONE_AFTER}' ORDER BY id"
    );
    let rows = client.query(&sql, &[]).await.map_err(|e| q(e, &sql))?;
    Ok(rows
        .iter()
        .map(|r| ProxySessions {
            proxy: r.get(0),
            heartbeat_age_s: r.get(1),
            live: r.get(2),
            groups: r
                .get::<_, Option<String>>(3)
                .and_then(|t| serde_json::from_str(&t).ok()),
        })
        .collect())
}

/// The default shape and the phase, or `None` without a migration.
pub async fn current_default(client: &Client) -> Result<Option<(Phase, Shape)>, ShapeError> {
    Ok(state::load_migration(client)
        .await?
        .map(|m| (m.phase, m.default_shape)))
}

/// What `keyshift shape default X` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultChange {
    Unchanged(Shape),
    Changed { from: Shape, to: Shape },
}

/// Sets the default shape, checked against the phase under the migration row's lock (a
/// phase change waits for it, and it for a phase change), with an event and a NOTIFY so that
/// every proxy re-reads the state; sessions already connected keep their shape.
pub async fn set_default(client: &Client, to: Shape) -> Result<DefaultChange, ShapeError> {
    if state::load_migration(client).await?.is_none() {
        return Err(ShapeError::NoMigration);
    }
    // A state schema written before shapes lacks the column: add it (idempotent).
    db::exec(client, &state::schema_sql()).await?;
    db::exec(client, "BEGIN").await?;
    let r = set_default_in_txn(client, to).await;
    let end = if matches!(r, Ok(DefaultChange::Changed { .. })) {
        "COMMIT"
    } else {
        "ROLLBACK"
    };
    let ended = db::exec(client, end).await;
    let r = r?;
    ended?;
    Ok(r)
}

async fn set_default_in_txn(client: &Client, to: Shape) -> Result<DefaultChange, ShapeError> {
    let sql = "SELECT phase, default_shape FROM keyshift.migration WHERE id = 1 FOR UPDATE";
    let row = client
        .query_opt(sql, &[])
        .await
        .map_err(|e| q(e, sql))?
        .ok_or(ShapeError::NoMigration)?;
    let phase_text: String = row.get(0);
    let phase = Phase::parse(&phase_text).ok_or(StateError::Phase(phase_text))?;
    let from = Shape::parse(row.get::<_, &str>(1)).unwrap_or(Shape::Integer);
    to.available(phase)
        .map_err(|why| ShapeError::Refused(format!("the default shape cannot be {to}: {why}")))?;
    if from == to {
        return Ok(DefaultChange::Unchanged(to));
    }
    let sql = "UPDATE keyshift.migration SET default_shape = $1, updated_at = now() WHERE id = 1";
    client
        .execute(sql, &[&to.as_str()])
        .await
        .map_err(|e| q(e, sql))?;
    state::event(
        client,
        "shape",
        &format!("default shape {from} -> {to}"),
        Some(serde_json::json!({"from": from, "to": to, "phase": phase})),
    )
    .await?;
    // Delivered at commit; the proxies re-read the state on any notification they do not
    // parse as a pause or resume.
    db::exec(client, &format!("NOTIFY keyshift, 'default_shape {to}'")).await?;
    Ok(DefaultChange::Changed { from, to })
}

/// Asks every proxy for its sessions now and waits up to `timeout` for their answers: a
/// heartbeat written after the request. Proxies that did not answer keep `live` as read
/// but are listed in the second value.
pub async fn fresh_proxies(
    client: &Client,
    timeout: Duration,
) -> Result<(Vec<ProxySessions>, Vec<String>), DbError> {
    let sql = "SELECT extract(epoch FROM clock_timestamp())::float8";
    let asked: f64 = client
        .query_one(sql, &[])
        .await
        .map_err(|e| q(e, sql))?
        .get(0);
    db::exec(client, "NOTIFY keyshift, 'sessions'").await?;
    let sql = format!(
        "SELECT id FROM keyshift.proxies
         WHERE heartbeat_at > now() - interval '{GONE_AFTER}'
           AND extract(epoch FROM heartbeat_at)::float8 < $1 ORDER BY id"
    );
    let deadline = Instant::now() + timeout;
    loop {
        let silent: Vec<String> = client
            .query(&sql, &[&asked])
            .await
            .map_err(|e| q(e, &sql))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if silent.is_empty() || Instant::now() >= deadline {
            return Ok((read_proxies(client).await?, silent));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What stands between the migration and finalize.
#[derive(Debug, Clone, Serialize)]
pub struct FinalizeCheck {
    pub default_shape: Shape,
    /// Integer-shaped sessions, by proxy.
    pub integer: Vec<(String, SessionGroup)>,
    /// Proxies whose sessions cannot be seen: not live, silent, or too old to report them.
    pub unknown: Vec<String>,
}

impl FinalizeCheck {
    pub fn is_clear(&self) -> bool {
        self.default_shape == Shape::Uuid && self.integer.is_empty() && self.unknown.is_empty()
    }

    pub fn integer_sessions(&self) -> u64 {
        self.integer.iter().map(|(_, g)| g.sessions).sum()
    }

    /// One line per integer-shaped group: who they are, for the refusal and the prompt.
    pub fn render_sessions(&self) -> String {
        self.integer
            .iter()
            .map(|(proxy, g)| {
                format!(
                    "  proxy {proxy}: {} integer-shaped session(s) of user {}, application_name {:?}, database {}\n",
                    g.sessions, g.user, g.application_name, g.database
                )
            })
            .collect()
    }

    /// Why finalize refuses, and what to do; `terminate` says whether `--terminate` was given
    /// (the sessions are then no reason to refuse).
    pub fn refusal(&self, terminate: bool) -> Option<String> {
        let mut why = Vec::new();
        if self.default_shape == Shape::Integer {
            why.push(
                "the default shape is integer: new connections that name no shape and match no rule would get the integer shape, whose columns finalize drops\n  what to do: `keyshift shape default uuid` (once every application version names its shape or works in the uuid shape)"
                    .to_string(),
            );
        }
        if !self.integer.is_empty() && !terminate {
            why.push(format!(
                "{} integer-shaped session(s) are connected; finalize drops the integer columns they read:\n{}  what to do: move them to the uuid shape (connect with keyshift.shape=uuid) and retire V1, or end them with `keyshift finalize --terminate`",
                self.integer_sessions(),
                self.render_sessions()
            ));
        }
        for p in &self.unknown {
            why.push(format!(
                "proxy {p} did not report its sessions (no heartbeat within {LIVE_WITHIN}, no answer to the request, or a keyshift version without shapes): it may serve integer-shaped sessions\n  what to do: wait for it, upgrade it, or stop it (it is forgotten {GONE_AFTER} after its last heartbeat)"
            ));
        }
        (!why.is_empty()).then(|| why.join("\n"))
    }
}

/// How long finalize waits for every proxy's fresh numbers: a heartbeat period and a margin.
pub const FRESH_WITHIN: Duration = Duration::from_secs(5);

/// Fresh numbers from every proxy, and the default shape.
pub async fn check_finalize(client: &Client) -> Result<FinalizeCheck, ShapeError> {
    let (_, default_shape) = current_default(client)
        .await?
        .ok_or(ShapeError::NoMigration)?;
    let (proxies, silent) = fresh_proxies(client, FRESH_WITHIN).await?;
    let mut check = FinalizeCheck {
        default_shape,
        integer: Vec::new(),
        unknown: Vec::new(),
    };
    for p in proxies {
        match (&p.groups, p.live && !silent.contains(&p.proxy)) {
            (Some(groups), true) => check.integer.extend(
                groups
                    .iter()
                    .filter(|g| g.shape == Shape::Integer)
                    .map(|g| (p.proxy.clone(), g.clone())),
            ),
            _ => check.unknown.push(p.proxy),
        }
    }
    Ok(check)
}

/// Ends the backends of the integer-shaped sessions in `check`; the proxy then ends each
/// client's session with PostgreSQL's own FATAL (57P01). A pid is ended only if it still is
/// a client backend of the same user and database, so that a pid reused since the report is
/// left alone. Returns how many were ended.
pub async fn terminate(client: &Client, check: &FinalizeCheck) -> Result<u64, DbError> {
    let sql = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
               WHERE pid = $1 AND usename = $2 AND datname = $3
                 AND backend_type = 'client backend' AND pid <> pg_backend_pid()";
    let mut ended = 0;
    for (_, g) in &check.integer {
        for pid in &g.backend_pids {
            let rows = client
                .query(sql, &[&(*pid as i32), &g.user, &g.database])
                .await
                .map_err(|e| q(e, sql))?;
            ended += rows.iter().filter(|r| r.get::<_, bool>(0)).count() as u64;
        }
    }
    Ok(ended)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_by_shape_user_database_and_application() {
        let g = group_sessions([
            (Shape::Integer, "app", "shop", "v1", 10),
            (Shape::Uuid, "app", "shop", "v2", 11),
            (Shape::Integer, "app", "shop", "v1", 0),
            (Shape::Integer, "app", "shop", "v1", 12),
        ]);
        assert_eq!(g.len(), 2);
        assert_eq!((g[0].shape, g[0].sessions), (Shape::Integer, 3));
        assert_eq!(
            g[0].backend_pids,
            vec![10, 12],
            "a pid of 0 is not yet known"
        );
        assert_eq!(
            (g[1].shape, g[1].application_name.as_str()),
            (Shape::Uuid, "v2")
        );
        let merged = merge_groups(g.iter().chain(g.iter()));
        assert_eq!(merged[0].sessions, 6);
        assert!(merged[0].backend_pids.is_empty());
        let t = totals(&merged);
        assert_eq!((t["integer"], t["uuid"]), (6, 2));
        // The heartbeat's JSON reads back.
        let json = serde_json::to_string(&g).unwrap();
        assert!(json.contains(r#""shape":"integer""#), "{json}");
        assert_eq!(serde_json::from_str::<Vec<SessionGroup>>(&json).unwrap(), g);
    }

    #[test]
    fn finalize_refusal_names_sessions_and_says_what_to_do() {
        let mut c = FinalizeCheck {
            default_shape: Shape::Uuid,
            integer: Vec::new(),
            unknown: Vec::new(),
        };
        assert!(c.is_clear() && c.refusal(false).is_none());
        c.integer.push((
            "p1".into(),
            SessionGroup {
                shape: Shape::Integer,
                user: "app".into(),
                database: "shop".into(),
                application_name: "v1".into(),
                sessions: 2,
                backend_pids: vec![7, 8],
            },
        ));
        let r = c.refusal(false).unwrap();
        assert!(
            r.contains(
                r#"proxy p1: 2 integer-shaped session(s) of user app, application_name "v1", database shop"#
            ),
            "{r}"
        );
        assert!(r.contains("--terminate"), "{r}");
        assert!(c.refusal(true).is_none(), "--terminate deals with sessions");
        c.default_shape = Shape::Integer;
        assert!(
            c.refusal(true)
                .unwrap()
                .contains("keyshift shape default uuid")
        );
    }
}
