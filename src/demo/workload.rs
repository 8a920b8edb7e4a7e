//! Application-like clients through the proxy for the whole demo: each iteration is one
//! transaction that deletes what the client wrote two iterations ago (children first, then
//! the connector, whose access grants go by ON DELETE CASCADE), moves its previous server to
//! a seeded connector (an FK update), writes a connector with its access grants, a server, its
//! tools and a token, and reads; then an autocommit write and a read on seeded rows.
//!
//! It follows the cutover contract (docs/cutover.md): ids change type at cutover, so the
//! application finds rows by name, passes ids only as text it read back, and never binds an
//! id as a typed parameter. Three kinds of client: simple protocol, statements prepared once
//! before the cutover and used across it, and statements prepared at each use.
//!
//! Deadlocks with the backfill are avoided by construction: a transaction locks rows of
//! existing data in ascending key order within each table (older generation first), and
//! writes to seeded rows only in autocommit statements of one row.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Config, NoTls, SimpleQueryMessage, Statement};

use super::seed::TABLES;

/// What one statement does, with text parameters `$1` (and `$2`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    InsConn,
    InsAccess,
    InsServer,
    InsTools,
    InsToken,
    MoveServer,
    CountAccess,
    DelTokens,
    DelTools,
    DelServer,
    DelConn,
    Read,
    Touch,
}

const OPS: [Op; 13] = [
    Op::InsConn,
    Op::InsAccess,
    Op::InsServer,
    Op::InsTools,
    Op::InsToken,
    Op::MoveServer,
    Op::CountAccess,
    Op::DelTokens,
    Op::DelTools,
    Op::DelServer,
    Op::DelConn,
    Op::Read,
    Op::Touch,
];

impl Op {
    fn sql(self) -> &'static str {
        match self {
            Op::InsConn => "INSERT INTO mcp_connectors (name) VALUES ($1::text)",
            Op::InsAccess => {
                "INSERT INTO connector_access (connector_id, user_id) SELECT id, $2::text FROM mcp_connectors WHERE name = $1::text"
            }
            Op::InsServer => {
                "INSERT INTO mcp_servers (connector_id, name, status) SELECT id, $2::text, 'provisioning' FROM mcp_connectors WHERE name = $1::text"
            }
            Op::InsTools => {
                "INSERT INTO mcp_server_tools (mcp_server_id, tool_name) VALUES ((SELECT id FROM mcp_servers WHERE name = $1::text), 'fetch'), ((SELECT id FROM mcp_servers WHERE name = $1::text), 'search')"
            }
            Op::InsToken => {
                "INSERT INTO mcp_server_tokens (mcp_server_id, token) SELECT id, md5($1::text || clock_timestamp()::text) FROM mcp_servers WHERE name = $1::text"
            }
            Op::MoveServer => {
                "UPDATE mcp_servers SET connector_id = (SELECT id FROM mcp_connectors WHERE name = $2::text), status = 'active' WHERE name = $1::text"
            }
            Op::CountAccess => {
                "SELECT count(*) FROM connector_access a JOIN mcp_connectors c ON c.id = a.connector_id WHERE c.name = $1::text"
            }
            Op::DelTokens => {
                "DELETE FROM mcp_server_tokens WHERE mcp_server_id IN (SELECT id FROM mcp_servers WHERE name = $1::text)"
            }
            Op::DelTools => {
                "DELETE FROM mcp_server_tools WHERE mcp_server_id IN (SELECT id FROM mcp_servers WHERE name = $1::text)"
            }
            Op::DelServer => "DELETE FROM mcp_servers WHERE name = $1::text",
            Op::DelConn => "DELETE FROM mcp_connectors WHERE name = $1::text",
            Op::Read => {
                "SELECT count(*) FROM mcp_server_tools t JOIN mcp_servers s ON s.id = t.mcp_server_id WHERE s.connector_id = (SELECT id FROM mcp_connectors WHERE name = $1::text)"
            }
            Op::Touch => "UPDATE mcp_servers SET status = $2::text WHERE name = $1::text",
        }
    }

    fn is_count(self) -> bool {
        matches!(self, Op::CountAccess | Op::Read)
    }
}

/// How a client talks to the server.
enum Protocol {
    /// Query messages with the values inlined as literals.
    Simple,
    /// Statements prepared once, when the client connects, and reused across the cutover
    /// (the proxy re-prepares them under the new rules).
    PreparedOnce(Vec<Statement>),
    /// Parse/Bind/Execute at each use.
    Extended,
}

impl Protocol {
    fn name(&self) -> &'static str {
        match self {
            Protocol::Simple => "simple",
            Protocol::PreparedOnce(_) => "prepared",
            Protocol::Extended => "extended",
        }
    }
}

fn lit(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// One application session.
struct AppClient {
    c: Client,
    proto: Protocol,
    step: Arc<AtomicUsize>,
    stats: ClientStats,
}

#[derive(Debug, Default)]
struct ClientStats {
    transactions: u64,
    statements: u64,
    errors: Vec<String>,
    error_count: u64,
    latencies_us: Vec<u32>,
    /// The slowest statement in each step.
    max_by_step: Vec<u64>,
    net: BTreeMap<&'static str, i64>,
}

impl AppClient {
    fn timed(&mut self, started: Instant) {
        let us = started.elapsed().as_micros().min(u32::MAX as u128) as u32;
        self.stats.statements += 1;
        self.stats.latencies_us.push(us);
        let step = self.step.load(Ordering::Relaxed);
        if let Some(m) = self.stats.max_by_step.get_mut(step) {
            *m = (*m).max(us as u64);
        }
    }

    /// Runs `op`; returns the rows it affected, or the count it read.
    async fn run(&mut self, op: Op, p: &[&str]) -> Result<i64, tokio_postgres::Error> {
        let t = Instant::now();
        let r = match &self.proto {
            Protocol::Simple => {
                let mut sql = op.sql().to_string();
                // $2 before $1: neither is a prefix of the other, but keep it obvious.
                for (i, v) in p.iter().enumerate().rev() {
                    sql = sql.replace(&format!("${}", i + 1), &lit(v));
                }
                simple(&self.c, &sql).await.map(|(first, n)| {
                    if op.is_count() {
                        first.and_then(|v| v.parse().ok()).unwrap_or(0)
                    } else {
                        n
                    }
                })
            }
            Protocol::PreparedOnce(stmts) => {
                let idx = OPS.iter().position(|o| *o == op).unwrap_or(0);
                extended(&self.c, &stmts[idx], op.is_count(), p).await
            }
            Protocol::Extended => extended(&self.c, op.sql(), op.is_count(), p).await,
        };
        self.timed(t);
        r
    }

    async fn batch(&mut self, sql: &str) -> Result<(), tokio_postgres::Error> {
        let t = Instant::now();
        let r = self.c.batch_execute(sql).await;
        self.timed(t);
        r
    }

    /// One iteration: autocommit deletes, a transaction, then an autocommit write and a read
    /// on seeded rows. Adds to `d` what it committed (rows per table), also when it fails
    /// halfway.
    async fn iteration(
        &mut self,
        i: usize,
        n: u64,
        seeded: i64,
        d: &mut BTreeMap<&'static str, i64>,
    ) -> Result<(), tokio_postgres::Error> {
        let conn = |g: u64| format!("app-c-{i}-{g}");
        let server = |g: u64| format!("app-s-{i}-{g}");
        let k = format!("c{}", (n as i64 * 7 + i as i64 * 13) % seeded + 1);
        let add = |d: &mut BTreeMap<&'static str, i64>, t: &'static str, v: i64| {
            *d.entry(t).or_default() += v
        };
        // The older generation goes first, one autocommit statement at a time: children,
        // then the connector, whose access grants go by ON DELETE CASCADE. Not in one
        // transaction, on purpose: a transaction that writes a child and then its parent
        // (the order NO ACTION foreign keys impose on deletes) forms a lock cycle with
        // harden's `LOCK parent; ALTER TABLE child ADD FOREIGN KEY … NOT VALID`, which then
        // times out and retries until no such transaction is in flight: minutes under this
        // load. Applications that delete that way see the same during harden.
        if n >= 2 {
            let (old_c, old_s) = (conn(n - 2), server(n - 2));
            add(
                d,
                "mcp_server_tokens",
                -self.run(Op::DelTokens, &[&old_s]).await?,
            );
            add(
                d,
                "mcp_server_tools",
                -self.run(Op::DelTools, &[&old_s]).await?,
            );
            add(d, "mcp_servers", -self.run(Op::DelServer, &[&old_s]).await?);
            // Only this client writes under its own connectors: the count is exact.
            let grants = self.run(Op::CountAccess, &[&old_c]).await?;
            let gone = self.run(Op::DelConn, &[&old_c]).await?;
            add(d, "mcp_connectors", -gone);
            add(d, "connector_access", -gone * grants);
        }
        // Then one transaction, parents before children (the FK update last, on a table it
        // already holds); counted once committed.
        let mut tx = BTreeMap::new();
        self.batch("BEGIN").await?;
        let (c, s) = (conn(n), server(n));
        add(
            &mut tx,
            "mcp_connectors",
            self.run(Op::InsConn, &[&c]).await?,
        );
        if matches!(self.proto, Protocol::Simple) {
            // The id read back as text and sent back as a literal: what an application that
            // follows the contract does, whatever the key's type is today.
            let sql = format!(
                "SELECT id::text FROM mcp_connectors WHERE name = {}",
                lit(&c)
            );
            let t = Instant::now();
            let r = simple(&self.c, &sql).await;
            self.timed(t);
            let id = r?.0.unwrap_or_default();
            let sql = format!(
                "INSERT INTO connector_access (connector_id, user_id) VALUES ({}, {}), ({}, {})",
                lit(&id),
                lit(&format!("owner-{i}-{n}@example.com")),
                lit(&id),
                lit(&format!("viewer-{i}-{n}@example.com"))
            );
            let t = Instant::now();
            let r = simple(&self.c, &sql).await;
            self.timed(t);
            add(&mut tx, "connector_access", r?.1);
        } else {
            for who in ["owner", "viewer"] {
                let u = format!("{who}-{i}-{n}@example.com");
                add(
                    &mut tx,
                    "connector_access",
                    self.run(Op::InsAccess, &[&c, &u]).await?,
                );
            }
        }
        add(
            &mut tx,
            "mcp_servers",
            self.run(Op::InsServer, &[&c, &s]).await?,
        );
        add(
            &mut tx,
            "mcp_server_tools",
            self.run(Op::InsTools, &[&s]).await?,
        );
        add(
            &mut tx,
            "mcp_server_tokens",
            self.run(Op::InsToken, &[&s]).await?,
        );
        if n >= 1 {
            self.run(Op::MoveServer, &[&server(n - 1), &k]).await?;
        }
        self.run(Op::Read, &[&k]).await?;
        self.batch("COMMIT").await?;
        for (t, v) in tx {
            add(d, t, v);
        }
        let status = if n % 2 == 0 { "active" } else { "degraded" };
        let seeded_server = format!("s{}", (n as i64 * 11 + i as i64 * 17) % (3 * seeded) + 1);
        self.run(Op::Touch, &[&seeded_server, status]).await?;
        self.run(Op::Read, &[&k]).await?;
        Ok(())
    }
}

/// Runs a statement over the extended protocol with text parameters; returns the rows it
/// affected, or the count it read.
async fn extended<T>(
    c: &Client,
    st: &T,
    count: bool,
    p: &[&str],
) -> Result<i64, tokio_postgres::Error>
where
    T: ?Sized + tokio_postgres::ToStatement,
{
    let params: Vec<&(dyn ToSql + Sync)> = p.iter().map(|s| s as &(dyn ToSql + Sync)).collect();
    if count {
        c.query_one(st, &params)
            .await
            .map(|r| r.try_get::<_, i64>(0).unwrap_or(0))
    } else {
        c.execute(st, &params).await.map(|n| n as i64)
    }
}

/// Runs a simple-protocol statement; returns the first column of its first row and the
/// rows it affected.
async fn simple(c: &Client, sql: &str) -> Result<(Option<String>, i64), tokio_postgres::Error> {
    let mut first = None;
    let mut n = 0;
    for m in c.simple_query(sql).await? {
        match m {
            SimpleQueryMessage::Row(r) if first.is_none() => {
                first = Some(r.get(0).unwrap_or_default().to_string())
            }
            SimpleQueryMessage::CommandComplete(k) => n = k as i64,
            _ => {}
        }
    }
    Ok((first, n))
}

/// The running clients.
pub struct Workload {
    stop: Arc<AtomicBool>,
    committed: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<ClientStats>>,
    steps: usize,
}

/// What the clients did, for the report.
#[derive(Debug, Clone, Serialize)]
pub struct WorkloadResult {
    pub clients: usize,
    pub transactions: u64,
    pub statements: u64,
    pub errors: u64,
    /// Up to 10 of them, with the client that saw each.
    pub error_samples: Vec<String>,
    /// The longest any client waited for one statement's answer, in ms.
    pub max_wait_ms: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// The longest wait in each step of the demo, in ms.
    pub max_wait_ms_by_step: Vec<f64>,
    /// Rows per table the clients committed, inserted minus deleted (cascades included).
    #[serde(skip)]
    pub net: BTreeMap<&'static str, i64>,
}

const THINK_TIME: Duration = Duration::from_millis(20);

impl Workload {
    /// Connects `clients` sessions through `through` and starts them. `step` says which step
    /// of the demo runs, for the per-step worst waits; `steps` is how many there are.
    pub async fn start(
        through: &Config,
        clients: usize,
        seeded_connectors: i64,
        step: Arc<AtomicUsize>,
        steps: usize,
    ) -> Result<Workload, tokio_postgres::Error> {
        let stop = Arc::new(AtomicBool::new(false));
        let committed = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for i in 0..clients {
            let (c, conn) = through.connect(NoTls).await?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            let proto = match i % 3 {
                0 => Protocol::Simple,
                1 => {
                    let mut v = Vec::new();
                    for op in OPS {
                        v.push(c.prepare(op.sql()).await?);
                    }
                    Protocol::PreparedOnce(v)
                }
                _ => Protocol::Extended,
            };
            let mut app = AppClient {
                c,
                proto,
                step: step.clone(),
                stats: ClientStats {
                    max_by_step: vec![0; steps],
                    ..Default::default()
                },
            };
            let (stop, committed, failed) = (stop.clone(), committed.clone(), failed.clone());
            let seeded = seeded_connectors.max(1);
            tasks.push(tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let mut d = BTreeMap::new();
                    let r = app.iteration(i, n, seeded, &mut d).await;
                    for (t, v) in d {
                        *app.stats.net.entry(t).or_default() += v;
                    }
                    match r {
                        Ok(()) => {
                            app.stats.transactions += 1;
                            committed.fetch_add(1, Ordering::Relaxed);
                            n += 1;
                        }
                        Err(e) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            app.stats.error_count += 1;
                            if app.stats.errors.len() < 10 {
                                app.stats.errors.push(format!(
                                    "client {i} ({}): {}",
                                    app.proto.name(),
                                    crate::migrate::db::describe(&e)
                                ));
                            }
                            if app.c.is_closed() {
                                break;
                            }
                            // The session may be inside a failed transaction: end it. The
                            // next generation takes new names.
                            let _ = app.c.batch_execute("ROLLBACK").await;
                            n += 1;
                        }
                    }
                    tokio::time::sleep(THINK_TIME).await;
                }
                app.stats
            }));
        }
        Ok(Workload {
            stop,
            committed,
            failed,
            tasks,
            steps,
        })
    }

    /// Transactions committed so far.
    pub fn committed(&self) -> u64 {
        self.committed.load(Ordering::Relaxed)
    }

    /// Errors so far.
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    /// Stops the clients after their current iteration and gathers what they did.
    pub async fn stop(mut self) -> WorkloadResult {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        let mut r = WorkloadResult {
            clients: self.tasks.len(),
            transactions: 0,
            statements: 0,
            errors: 0,
            error_samples: Vec::new(),
            max_wait_ms: 0.0,
            p50_ms: 0.0,
            p99_ms: 0.0,
            max_wait_ms_by_step: vec![0.0; self.steps],
            net: TABLES.iter().map(|t| (*t, 0)).collect(),
        };
        for t in std::mem::take(&mut self.tasks) {
            let s = match t.await {
                Ok(s) => s,
                Err(e) => {
                    r.errors += 1;
                    r.error_samples.push(format!("a client task failed: {e}"));
                    continue;
                }
            };
            r.transactions += s.transactions;
            r.statements += s.statements;
            r.errors += s.error_count;
            for e in s.errors {
                if r.error_samples.len() < 10 {
                    r.error_samples.push(e);
                }
            }
            for (i, m) in s.max_by_step.iter().enumerate() {
                if let Some(x) = r.max_wait_ms_by_step.get_mut(i) {
                    *x = x.max(*m as f64 / 1000.0);
                }
            }
            for (t, v) in s.net {
                *r.net.entry(t).or_default() += v;
            }
            all.extend(s.latencies_us);
        }
        all.sort_unstable();
        let pct = |p: f64| -> f64 {
            if all.is_empty() {
                return 0.0;
            }
            let i = ((all.len() as f64 - 1.0) * p).round() as usize;
            all[i.min(all.len() - 1)] as f64 / 1000.0
        };
        r.p50_ms = pct(0.50);
        r.p99_ms = pct(0.99);
        r.max_wait_ms = all.last().map_or(0.0, |m| *m as f64 / 1000.0);
        r
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}
