//! `keyshift status`: phase, per-task progress, recent events, registered proxies.

use std::fmt::Write as _;

use serde::Serialize;
use tokio_postgres::Client;

use super::db::DbError;
use super::progress::{self, TaskProgress};
use super::shapes::{self, ProxySessions, SessionGroup};
use super::state::{Phase, StateError};
use crate::shape::Shape;

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Db(#[from] DbError),
}

#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub at: String,
    pub actor: String,
    pub kind: String,
    pub message: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProxyInfo {
    pub id: String,
    pub address: Option<String>,
    pub version: Option<String>,
    pub heartbeat_age_s: f64,
    pub acked_rules_version: Option<i64>,
    pub paused: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// `None`: no migration in this database.
    pub phase: Option<Phase>,
    pub rules_version: i64,
    pub tables: usize,
    pub foreign_keys: usize,
    pub tasks: Vec<TaskProgress>,
    /// The running backfill's time left, in seconds ([`progress::Progress::eta`]).
    pub backfill_eta_seconds: Option<u64>,
    /// The rate that ETA is computed from, rows per second.
    pub backfill_rows_per_sec: Option<f64>,
    /// In phase cutting_over: the groups of tables swapped so far, and all of them
    /// (`keyshift cutover --by-table`).
    pub groups_swapped: Option<[usize; 2]>,
    /// In phase cutting_over: the application's objects over migrated columns still on the
    /// integer columns, to be rebuilt over the uuids once every group is swapped.
    pub objects_to_carry: Option<i64>,
    pub events: Vec<Event>,
    pub proxies: Vec<ProxyInfo>,
    /// The shape of new sessions that name none and match no rule.
    pub default_shape: Option<Shape>,
    /// Sessions per shape, user, database and application_name, summed over the live
    /// proxies (heartbeat within `switch::LIVE_WITHIN`), as of their last heartbeat.
    pub sessions: Vec<SessionGroup>,
    /// Those sessions per shape: `integer` 0 is when V1 is gone.
    pub sessions_by_shape: std::collections::BTreeMap<&'static str, u64>,
    /// Each proxy seen within `switch::GONE_AFTER`, with its own groups (`null`: it does not
    /// report them, or it is not live and its numbers are not counted above).
    pub proxy_sessions: Vec<ProxySessions>,
}

pub async fn run(client: &Client) -> Result<Status, StatusError> {
    let p = progress::read(client).await?;
    let mut st = Status {
        phase: p.phase,
        rules_version: p.rules_version,
        tables: 0,
        foreign_keys: 0,
        backfill_eta_seconds: p.eta().map(|d| d.as_secs()),
        backfill_rows_per_sec: p.rate(),
        groups_swapped: None,
        objects_to_carry: None,
        tasks: p.tasks,
        events: Vec::new(),
        proxies: Vec::new(),
        default_shape: None,
        sessions: Vec::new(),
        sessions_by_shape: shapes::totals([]),
        proxy_sessions: Vec::new(),
    };
    if st.phase.is_none() {
        return Ok(st);
    }
    if let Some(m) = super::state::load_migration(client).await? {
        st.tables = m.plan.tables.len();
        st.foreign_keys = m.plan.foreign_keys().count();
        st.default_shape = Some(m.default_shape);
        if m.phase == Phase::CuttingOver {
            let (done, all) = super::by_table::progress(client, &m.plan).await?;
            st.groups_swapped = Some([done, all]);
            st.objects_to_carry = super::by_table::carried(client).await?.map(|(n, _)| n);
        }
    }
    let rows = client
        .query(
            "SELECT to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), actor, kind, message
               FROM (SELECT * FROM keyshift.events ORDER BY id DESC LIMIT 15) e ORDER BY id",
            &[],
        )
        .await
        .map_err(StateError::from)?;
    st.events = rows
        .iter()
        .map(|r| Event {
            at: r.get(0),
            actor: r.get(1),
            kind: r.get(2),
            message: r.get(3),
        })
        .collect();
    let rows = client
        .query(
            "SELECT id, address, version, extract(epoch FROM now() - heartbeat_at)::float8, acked_rules_version, paused
               FROM keyshift.proxies ORDER BY id",
            &[],
        )
        .await
        .map_err(StateError::from)?;
    st.proxies = rows
        .iter()
        .map(|r| ProxyInfo {
            id: r.get(0),
            address: r.get(1),
            version: r.get(2),
            heartbeat_age_s: r.get(3),
            acked_rules_version: r.get(4),
            paused: r.get(5),
        })
        .collect();
    st.proxy_sessions = shapes::read_proxies(client).await?;
    let live = st
        .proxy_sessions
        .iter()
        .filter(|p| p.live)
        .filter_map(|p| p.groups.as_ref())
        .flatten();
    st.sessions = shapes::merge_groups(live);
    st.sessions_by_shape = shapes::totals(&st.sessions);
    Ok(st)
}

pub fn render_text(st: &Status) -> String {
    let mut s = String::new();
    let Some(phase) = st.phase else {
        let _ = writeln!(
            s,
            "no keyshift migration in this database (run `keyshift plan`, then `keyshift expand`)"
        );
        return s;
    };
    let _ = writeln!(
        s,
        "phase: {phase} (rules version {}), {} table(s), {} foreign key(s)",
        st.rules_version, st.tables, st.foreign_keys
    );
    if let Some([done, all]) = st.groups_swapped {
        let _ = writeln!(
            s,
            "cutover table by table: {done} of {all} groups of tables swapped; every session is served in its shape through keyshift's views; `keyshift cutover --by-table` finishes it"
        );
        if let Some(n) = st.objects_to_carry.filter(|&n| n > 0) {
            let _ = writeln!(
                s,
                "  {n} view(s), policies and other objects over migrated columns stay on the integer columns until then, and are rebuilt over the uuids at the end"
            );
        }
    }
    match st.backfill_eta_seconds {
        Some(eta) => {
            let _ = writeln!(
                s,
                "backfill: ETA {} at {:.0} rows/s (the rate of its recent batches)",
                super::eta::human(std::time::Duration::from_secs(eta)),
                st.backfill_rows_per_sec.unwrap_or(0.0)
            );
        }
        None => {
            let _ = writeln!(s, "backfill:");
        }
    }
    for t in &st.tasks {
        let pct = if t.done {
            100.0
        } else {
            100.0 * t.rows_done as f64 / (t.rows_estimate.max(1) as f64)
        };
        let _ = writeln!(
            s,
            "  {:<48} {:>5.1}%  {} scanned, {} updated, ~{} remaining{}",
            t.task,
            pct.min(100.0),
            t.rows_done,
            t.rows_updated,
            t.rows_remaining(),
            if t.done { ", done" } else { "" }
        );
    }
    let _ = writeln!(
        s,
        "proxies: {}",
        if st.proxies.is_empty() {
            "none registered"
        } else {
            ""
        }
    );
    for p in &st.proxies {
        let _ = writeln!(
            s,
            "  {} {} heartbeat {:.0}s ago, rules v{}{}",
            p.id,
            p.address.as_deref().unwrap_or("-"),
            p.heartbeat_age_s,
            p.acked_rules_version
                .map(|v| v.to_string())
                .unwrap_or_else(|| "-".into()),
            if p.paused { ", paused" } else { "" }
        );
    }
    if let Some(d) = st.default_shape {
        let _ = writeln!(
            s,
            "default shape: {d} (for new connections that name no keyshift.shape and match no rule; `keyshift shape default` changes it)"
        );
    }
    let live = st.proxy_sessions.iter().filter(|p| p.live).count();
    let _ = writeln!(
        s,
        "sessions by shape (live proxies: {live}, as of their last heartbeat): {}",
        st.sessions_by_shape
            .iter()
            .map(|(shape, n)| format!("{shape} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for g in &st.sessions {
        let _ = writeln!(
            s,
            "  {:<8} {:>5}  user {}, database {}, application_name {:?}",
            g.shape.as_str(),
            g.sessions,
            g.user,
            g.database,
            g.application_name
        );
    }
    for p in st
        .proxy_sessions
        .iter()
        .filter(|p| p.groups.is_none() && p.live)
    {
        let _ = writeln!(
            s,
            "  proxy {} does not report its sessions (a keyshift version without shapes)",
            p.proxy
        );
    }
    let _ = writeln!(s, "recent events:");
    for e in &st.events {
        let _ = writeln!(s, "  {} {:<8} {}", e.at, e.kind, e.message);
    }
    s
}
