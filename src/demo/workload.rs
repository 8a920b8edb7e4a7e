//! Application-like clients through the proxy for the whole demo, in two versions side by
//! side (DESIGN "Shapes"):
//!
//! - **V1**, the application as it is: it connects naming no shape and gets the migration's
//!   default, `integer`, before and after the cutover. It finds rows by name, reads ids back
//!   as text and sends them back as literals or subqueries.
//! - **V2**, the application after its UUID release: it connects with
//!   `-c keyshift.shape=uuid` once the migration is hardened, generates its keys itself
//!   (uuid4, as seed 004's "after" models do) and binds them as typed uuid parameters.
//!
//! Each iteration of a client is one transaction that deletes what the client wrote two
//! iterations ago (children first, then the connector, whose access grants go by ON DELETE
//! CASCADE), moves its previous server to a seeded connector (an FK update), writes a
//! connector with its access grants, a server, its tools and a token, and reads; then an
//! autocommit write on a seeded row, a read, and a read of the server the other version
//! wrote last, by name, checking that its id and foreign key come in this version's shape.
//! Three kinds of client per version: simple protocol, statements prepared once (and used
//! across the cutover), and statements prepared at each use.
//!
//! Deadlocks with the backfill are avoided by construction: a transaction locks rows of
//! existing data in ascending key order within each table (older generation first), and
//! writes to seeded rows only in autocommit statements of one row.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use serde::Serialize;
use tokio_postgres::types::{FromSql, IsNull, ToSql, Type, to_sql_checked};
use tokio_postgres::{Client, Config, NoTls, Row, SimpleQueryMessage, Statement};

use super::seed::TABLES;
use crate::shape::Shape;

/// The two application versions of the demo.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Version {
    V1,
    V2,
}

impl Version {
    pub fn shape(self) -> Shape {
        match self {
            Version::V1 => Shape::Integer,
            Version::V2 => Shape::Uuid,
        }
    }

    fn other(self) -> Version {
        match self {
            Version::V1 => Version::V2,
            Version::V2 => Version::V1,
        }
    }

    fn idx(self) -> usize {
        match self {
            Version::V1 => 0,
            Version::V2 => 1,
        }
    }

    fn ops(self) -> &'static [Op] {
        match self {
            Version::V1 => &V1_OPS,
            Version::V2 => &V2_OPS,
        }
    }
}

/// What one statement does. V1's statements take text parameters (`$1`, `$2`) and find
/// rows by name; V2's bind uuids where the columns are uuids.
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
    /// The server the other version wrote last, by name: its id and foreign key.
    ReadOther,
    V2ConnByName,
    V2InsConn,
    V2InsAccess,
    V2InsServer,
    V2InsTools,
    V2InsToken,
    V2MoveServer,
    V2CountAccess,
    V2DelTokens,
    V2DelTools,
    V2DelServer,
    V2DelConn,
    V2Read,
}

const V1_OPS: [Op; 14] = [
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
    Op::ReadOther,
];

const V2_OPS: [Op; 15] = [
    Op::V2ConnByName,
    Op::V2InsConn,
    Op::V2InsAccess,
    Op::V2InsServer,
    Op::V2InsTools,
    Op::V2InsToken,
    Op::V2MoveServer,
    Op::V2CountAccess,
    Op::V2DelTokens,
    Op::V2DelTools,
    Op::V2DelServer,
    Op::V2DelConn,
    Op::V2Read,
    Op::Touch,
    Op::ReadOther,
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
            Op::ReadOther => "SELECT id, connector_id FROM mcp_servers WHERE name = $1::text",
            Op::V2ConnByName => "SELECT id FROM mcp_connectors WHERE name = $1",
            Op::V2InsConn => "INSERT INTO mcp_connectors (id, name) VALUES ($1, $2)",
            Op::V2InsAccess => {
                "INSERT INTO connector_access (connector_id, user_id) VALUES ($1, $2), ($1, $3)"
            }
            Op::V2InsServer => {
                "INSERT INTO mcp_servers (id, connector_id, name, status) VALUES ($1, $2, $3, 'provisioning') RETURNING id"
            }
            Op::V2InsTools => {
                "INSERT INTO mcp_server_tools (mcp_server_id, tool_name) VALUES ($1, 'fetch'), ($1, 'search')"
            }
            Op::V2InsToken => {
                "INSERT INTO mcp_server_tokens (mcp_server_id, token) VALUES ($1, md5($2::text || clock_timestamp()::text))"
            }
            Op::V2MoveServer => {
                "UPDATE mcp_servers SET connector_id = $2, status = 'active' WHERE id = $1"
            }
            Op::V2CountAccess => "SELECT count(*) FROM connector_access WHERE connector_id = $1",
            Op::V2DelTokens => "DELETE FROM mcp_server_tokens WHERE mcp_server_id = $1",
            Op::V2DelTools => "DELETE FROM mcp_server_tools WHERE mcp_server_id = $1",
            Op::V2DelServer => "DELETE FROM mcp_servers WHERE id = $1",
            Op::V2DelConn => "DELETE FROM mcp_connectors WHERE id = $1",
            Op::V2Read => {
                "SELECT count(*) FROM mcp_server_tools t JOIN mcp_servers s ON s.id = t.mcp_server_id WHERE s.connector_id = $1"
            }
        }
    }

    /// Whether the statement answers rows (read with a query, not an execute).
    fn returns_rows(self) -> bool {
        matches!(
            self,
            Op::CountAccess
                | Op::Read
                | Op::ReadOther
                | Op::V2ConnByName
                | Op::V2InsServer
                | Op::V2CountAccess
                | Op::V2Read
        )
    }

    fn is_count(self) -> bool {
        matches!(
            self,
            Op::CountAccess | Op::Read | Op::V2CountAccess | Op::V2Read
        )
    }
}

/// A uuid as PostgreSQL's binary format has it, so V2 binds and reads typed uuids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PgUuid(pub uuid::Uuid);

impl PgUuid {
    /// A random (version 4) uuid, as an application generates its own keys.
    pub fn new_v4() -> PgUuid {
        PgUuid(uuid::Builder::from_random_bytes(rand::random()).into_uuid())
    }
}

impl ToSql for PgUuid {
    fn to_sql(
        &self,
        _: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        out.extend_from_slice(self.0.as_bytes());
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::UUID
    }

    to_sql_checked!();
}

impl<'a> FromSql<'a> for PgUuid {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(PgUuid(uuid::Uuid::from_slice(raw)?))
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::UUID
    }
}

/// A statement's parameter: text, or a uuid (bound as one over the extended protocol).
#[derive(Debug, Clone, Copy)]
enum Arg<'a> {
    T(&'a str),
    U(PgUuid),
}

impl Arg<'_> {
    fn lit(&self) -> String {
        match self {
            Arg::T(s) => lit(s),
            Arg::U(u) => lit(&u.0.to_string()),
        }
    }

    fn as_sql(&self) -> &(dyn ToSql + Sync) {
        match self {
            Arg::T(s) => s,
            Arg::U(u) => u,
        }
    }
}

/// A value of a result column, decoded as its RowDescription says (extended protocol) or
/// read from its text (simple protocol).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Val {
    Null,
    Int(i64),
    Uuid(uuid::Uuid),
    Text(String),
}

impl Val {
    fn of_text(s: Option<&str>) -> Val {
        match s {
            None => Val::Null,
            Some(s) => {
                if let Ok(n) = s.parse() {
                    Val::Int(n)
                } else if let Ok(u) = uuid::Uuid::parse_str(s) {
                    Val::Uuid(u)
                } else {
                    Val::Text(s.to_string())
                }
            }
        }
    }

    fn of_column(row: &Row, i: usize) -> Result<Val, tokio_postgres::Error> {
        let ty = row.columns()[i].type_().clone();
        Ok(if ty == Type::INT4 {
            row.try_get::<_, Option<i32>>(i)?
                .map_or(Val::Null, |v| Val::Int(v.into()))
        } else if ty == Type::INT8 {
            row.try_get::<_, Option<i64>>(i)?
                .map_or(Val::Null, Val::Int)
        } else if ty == Type::UUID {
            row.try_get::<_, Option<PgUuid>>(i)?
                .map_or(Val::Null, |u| Val::Uuid(u.0))
        } else {
            row.try_get::<_, Option<String>>(i)?
                .map_or(Val::Null, Val::Text)
        })
    }

    /// Whether a key of `shape` may look like this (NULL may be any).
    fn fits(&self, shape: Shape) -> bool {
        matches!(
            (self, shape),
            (Val::Null, _) | (Val::Int(_), Shape::Integer) | (Val::Uuid(_), Shape::Uuid)
        )
    }

    fn uuid(&self) -> Option<PgUuid> {
        match self {
            Val::Uuid(u) => Some(PgUuid(*u)),
            _ => None,
        }
    }

    fn int(&self) -> i64 {
        match self {
            Val::Int(n) => *n,
            _ => 0,
        }
    }
}

/// What a statement gave back: the rows it affected (or returned), and its first row.
#[derive(Debug, Default)]
struct Out {
    n: i64,
    first: Vec<Val>,
}

impl Out {
    fn first(&self) -> &Val {
        self.first.first().unwrap_or(&Val::Null)
    }
}

/// Why an iteration failed.
#[derive(Debug)]
enum AppError {
    Db(tokio_postgres::Error),
    /// A row came back in a shape the version was not told (or not at all).
    Shape(String),
}

impl From<tokio_postgres::Error> for AppError {
    fn from(e: tokio_postgres::Error) -> Self {
        AppError::Db(e)
    }
}

impl AppError {
    fn describe(&self) -> String {
        match self {
            AppError::Db(e) => crate::migrate::db::describe(e),
            AppError::Shape(s) => s.clone(),
        }
    }
}

/// How a client talks to the server.
enum Protocol {
    /// Query messages with the values inlined as literals.
    Simple,
    /// Statements prepared once, when the client connects, and reused across the cutover
    /// (the proxy re-prepares them under the new rules, with the same result and parameter
    /// types).
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

/// The server each version wrote last, by name, so that the other can read it.
#[derive(Debug, Default)]
struct Mailbox {
    last: [Mutex<Option<String>>; 2],
}

impl Mailbox {
    fn post(&self, v: Version, name: String) {
        if let Ok(mut m) = self.last[v.idx()].lock() {
            *m = Some(name);
        }
    }

    fn latest(&self, v: Version) -> Option<String> {
        self.last[v.idx()].lock().ok().and_then(|m| m.clone())
    }
}

/// One application session.
struct AppClient {
    c: Client,
    version: Version,
    proto: Protocol,
    step: Arc<AtomicUsize>,
    mail: Arc<Mailbox>,
    stats: ClientStats,
    /// V2's own keys for the generations it still has to delete: (connector, server).
    keys: BTreeMap<u64, (PgUuid, PgUuid)>,
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
    /// Rows the other version wrote, read back in this version's shape.
    other_rows_read: u64,
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

    /// Runs `op`: the rows it affected, or the count it read, and its first row.
    async fn exec(&mut self, op: Op, p: &[Arg<'_>]) -> Result<Out, tokio_postgres::Error> {
        let t = Instant::now();
        let r = match &self.proto {
            Protocol::Simple => {
                let mut sql = op.sql().to_string();
                // $3 before $2 before $1: neither is a prefix of the other, but keep it obvious.
                for (i, v) in p.iter().enumerate().rev() {
                    sql = sql.replace(&format!("${}", i + 1), &v.lit());
                }
                simple(&self.c, &sql).await
            }
            Protocol::PreparedOnce(stmts) => {
                let idx = self
                    .version
                    .ops()
                    .iter()
                    .position(|o| *o == op)
                    .unwrap_or(0);
                extended(&self.c, &stmts[idx], op.returns_rows(), p).await
            }
            Protocol::Extended => extended(&self.c, op.sql(), op.returns_rows(), p).await,
        };
        self.timed(t);
        r.map(|mut out| {
            if op.is_count() {
                out.n = out.first().int();
            }
            out
        })
    }

    /// Runs V1's `op` with text parameters: the rows it affected, or the count it read.
    async fn run(&mut self, op: Op, p: &[&str]) -> Result<i64, tokio_postgres::Error> {
        let args: Vec<Arg> = p.iter().map(|s| Arg::T(s)).collect();
        Ok(self.exec(op, &args).await?.n)
    }

    async fn batch(&mut self, sql: &str) -> Result<(), tokio_postgres::Error> {
        let t = Instant::now();
        let r = self.c.batch_execute(sql).await;
        self.timed(t);
        r
    }

    async fn iteration(
        &mut self,
        i: usize,
        n: u64,
        seeded: i64,
        d: &mut BTreeMap<&'static str, i64>,
    ) -> Result<(), AppError> {
        match self.version {
            Version::V1 => self.iteration_v1(i, n, seeded, d).await?,
            Version::V2 => self.iteration_v2(i, n, seeded, d).await?,
        }
        self.read_other().await
    }

    /// Reads the server the other version wrote last, by name: its id and its connector's
    /// must come in this version's shape (integers for V1, uuids for V2). A row deleted
    /// since is skipped: its writer deletes it two iterations later.
    async fn read_other(&mut self) -> Result<(), AppError> {
        let other = self.version.other();
        let Some(name) = self.mail.latest(other) else {
            return Ok(());
        };
        let out = self.exec(Op::ReadOther, &[Arg::T(&name)]).await?;
        if out.n == 0 {
            return Ok(());
        }
        let shape = self.version.shape();
        if out.first.len() != 2 || !out.first.iter().all(|v| v.fits(shape)) {
            return Err(AppError::Shape(format!(
                "{:?} read {other:?}'s server {name} as {:?}, not in the {shape} shape",
                self.version, out.first
            )));
        }
        self.stats.other_rows_read += 1;
        Ok(())
    }

    /// V1's iteration: autocommit deletes, a transaction, then an autocommit write and a
    /// read on seeded rows. Adds to `d` what it committed (rows per table), also when it
    /// fails halfway.
    async fn iteration_v1(
        &mut self,
        i: usize,
        n: u64,
        seeded: i64,
        d: &mut BTreeMap<&'static str, i64>,
    ) -> Result<(), tokio_postgres::Error> {
        let conn = |g: u64| format!("app-c-{i}-{g}");
        let server = |g: u64| format!("app-s-{i}-{g}");
        let k = format!("c{}", (n as i64 * 7 + i as i64 * 13) % seeded + 1);
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
            // The id read back as text and sent back as a literal.
            let sql = format!(
                "SELECT id::text FROM mcp_connectors WHERE name = {}",
                lit(&c)
            );
            let t = Instant::now();
            let r = simple(&self.c, &sql).await;
            self.timed(t);
            let id = match r?.first() {
                Val::Int(id) => id.to_string(),
                other => format!("{other:?}"),
            };
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
            add(&mut tx, "connector_access", r?.n);
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
        self.mail.post(Version::V1, s);
        let status = if n % 2 == 0 { "active" } else { "degraded" };
        let seeded_server = format!("s{}", (n as i64 * 11 + i as i64 * 17) % (3 * seeded) + 1);
        self.run(Op::Touch, &[&seeded_server, status]).await?;
        self.run(Op::Read, &[&k]).await?;
        Ok(())
    }

    /// V2's iteration, the same work as V1's in the uuid shape: its keys are uuid4s it
    /// generates, bound as uuids; seeded rows (V1's world) are found by name and come back
    /// with uuid ids.
    async fn iteration_v2(
        &mut self,
        i: usize,
        n: u64,
        seeded: i64,
        d: &mut BTreeMap<&'static str, i64>,
    ) -> Result<(), AppError> {
        let k = format!("c{}", (n as i64 * 7 + i as i64 * 13) % seeded + 1);
        if n >= 2
            && let Some((old_c, old_s)) = self.keys.remove(&(n - 2))
        {
            let (old_c, old_s) = (Arg::U(old_c), Arg::U(old_s));
            add(
                d,
                "mcp_server_tokens",
                -self.exec(Op::V2DelTokens, &[old_s]).await?.n,
            );
            add(
                d,
                "mcp_server_tools",
                -self.exec(Op::V2DelTools, &[old_s]).await?.n,
            );
            add(
                d,
                "mcp_servers",
                -self.exec(Op::V2DelServer, &[old_s]).await?.n,
            );
            let grants = self.exec(Op::V2CountAccess, &[old_c]).await?.n;
            let gone = self.exec(Op::V2DelConn, &[old_c]).await?.n;
            add(d, "mcp_connectors", -gone);
            add(d, "connector_access", -gone * grants);
        }
        let seeded_conn = self.exec(Op::V2ConnByName, &[Arg::T(&k)]).await?;
        let Some(seeded_conn) = seeded_conn.first().uuid() else {
            return Err(AppError::Shape(format!(
                "V2 read seeded connector {k}'s id as {:?}, not a uuid",
                seeded_conn.first
            )));
        };
        let (c, s) = (PgUuid::new_v4(), PgUuid::new_v4());
        let s_name = format!("v2-s-{i}-{n}");
        let mut tx = BTreeMap::new();
        self.batch("BEGIN").await?;
        add(
            &mut tx,
            "mcp_connectors",
            self.exec(
                Op::V2InsConn,
                &[Arg::U(c), Arg::T(&format!("v2-c-{i}-{n}"))],
            )
            .await?
            .n,
        );
        let (owner, viewer) = (
            format!("owner-v2-{i}-{n}@example.com"),
            format!("viewer-v2-{i}-{n}@example.com"),
        );
        add(
            &mut tx,
            "connector_access",
            self.exec(
                Op::V2InsAccess,
                &[Arg::U(c), Arg::T(&owner), Arg::T(&viewer)],
            )
            .await?
            .n,
        );
        let out = self
            .exec(Op::V2InsServer, &[Arg::U(s), Arg::U(c), Arg::T(&s_name)])
            .await?;
        if out.first().uuid() != Some(s) {
            return Err(AppError::Shape(format!(
                "V2 inserted server {} and RETURNING id gave {:?}",
                s.0, out.first
            )));
        }
        add(&mut tx, "mcp_servers", out.n);
        add(
            &mut tx,
            "mcp_server_tools",
            self.exec(Op::V2InsTools, &[Arg::U(s)]).await?.n,
        );
        add(
            &mut tx,
            "mcp_server_tokens",
            self.exec(Op::V2InsToken, &[Arg::U(s), Arg::T(&s_name)])
                .await?
                .n,
        );
        if n >= 1
            && let Some((_, prev_s)) = self.keys.get(&(n - 1)).copied()
        {
            self.exec(Op::V2MoveServer, &[Arg::U(prev_s), Arg::U(seeded_conn)])
                .await?;
        }
        self.exec(Op::V2Read, &[Arg::U(seeded_conn)]).await?;
        self.batch("COMMIT").await?;
        for (t, v) in tx {
            add(d, t, v);
        }
        self.keys.insert(n, (c, s));
        self.mail.post(Version::V2, s_name);
        let status = if n % 2 == 0 { "active" } else { "degraded" };
        let seeded_server = format!("s{}", (n as i64 * 11 + i as i64 * 17) % (3 * seeded) + 1);
        self.exec(Op::Touch, &[Arg::T(&seeded_server), Arg::T(status)])
            .await?;
        self.exec(Op::V2Read, &[Arg::U(seeded_conn)]).await?;
        Ok(())
    }
}

fn add(d: &mut BTreeMap<&'static str, i64>, t: &'static str, v: i64) {
    *d.entry(t).or_default() += v
}

/// Runs a statement over the extended protocol: the rows it affected or returned, and its
/// first row decoded as its RowDescription says.
async fn extended<T>(
    c: &Client,
    st: &T,
    rows: bool,
    p: &[Arg<'_>],
) -> Result<Out, tokio_postgres::Error>
where
    T: ?Sized + tokio_postgres::ToStatement,
{
    let params: Vec<&(dyn ToSql + Sync)> = p.iter().map(Arg::as_sql).collect();
    if rows {
        let rows = c.query(st, &params).await?;
        let first = match rows.first() {
            Some(r) => (0..r.len())
                .map(|i| Val::of_column(r, i))
                .collect::<Result<_, _>>()?,
            None => Vec::new(),
        };
        Ok(Out {
            n: rows.len() as i64,
            first,
        })
    } else {
        Ok(Out {
            n: c.execute(st, &params).await? as i64,
            first: Vec::new(),
        })
    }
}

/// Runs a simple-protocol statement: the rows it affected (or returned) and its first row,
/// read from its text.
async fn simple(c: &Client, sql: &str) -> Result<Out, tokio_postgres::Error> {
    let mut out = Out::default();
    for m in c.simple_query(sql).await? {
        match m {
            SimpleQueryMessage::Row(r) if out.first.is_empty() => {
                out.first = (0..r.len()).map(|i| Val::of_text(r.get(i))).collect()
            }
            SimpleQueryMessage::CommandComplete(k) => out.n = k as i64,
            _ => {}
        }
    }
    Ok(out)
}

/// The running clients of both versions.
pub struct Workload {
    stop: Arc<AtomicBool>,
    committed: [Arc<AtomicU64>; 2],
    failed: [Arc<AtomicU64>; 2],
    tasks: Vec<(Version, tokio::task::JoinHandle<ClientStats>)>,
    started: [Option<&'static str>; 2],
    step: Arc<AtomicUsize>,
    steps: usize,
    seeded_connectors: i64,
    mail: Arc<Mailbox>,
}

/// What one version's clients did.
#[derive(Debug, Clone, Serialize)]
pub struct VersionResult {
    pub version: Version,
    /// The shape its sessions had, for their whole life.
    pub shape: Shape,
    pub clients: usize,
    /// The step of the demo in which its clients connected.
    pub started: &'static str,
    pub transactions: u64,
    pub statements: u64,
    pub errors: u64,
    /// Rows the other version wrote, read back by this one with their ids and foreign keys
    /// in this version's shape.
    pub other_rows_read: u64,
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
    /// Per application version: V1 (integer shape), then V2 (uuid shape) if it ran.
    pub versions: Vec<VersionResult>,
    /// Rows per table the clients committed, inserted minus deleted (cascades included).
    #[serde(skip)]
    pub net: BTreeMap<&'static str, i64>,
}

impl WorkloadResult {
    pub fn version(&self, v: Version) -> Option<&VersionResult> {
        self.versions.iter().find(|r| r.version == v)
    }
}

const THINK_TIME: Duration = Duration::from_millis(20);

impl Workload {
    /// Connects `clients` V1 sessions through `through` and starts them. `step` says which
    /// step of the demo runs, for the per-step worst waits; `steps` is how many there are.
    pub async fn start(
        through: &Config,
        clients: usize,
        seeded_connectors: i64,
        step: Arc<AtomicUsize>,
        steps: usize,
        started: &'static str,
    ) -> Result<Workload, tokio_postgres::Error> {
        let mut w = Workload {
            stop: Arc::new(AtomicBool::new(false)),
            committed: Default::default(),
            failed: Default::default(),
            tasks: Vec::new(),
            started: [None, None],
            step,
            steps,
            seeded_connectors: seeded_connectors.max(1),
            mail: Arc::default(),
        };
        w.spawn(Version::V1, through, clients, started).await?;
        Ok(w)
    }

    /// Connects `clients` sessions of `version` through `through` (which must name the
    /// version's shape, or leave it to the default) and starts them.
    pub async fn spawn(
        &mut self,
        version: Version,
        through: &Config,
        clients: usize,
        started: &'static str,
    ) -> Result<(), tokio_postgres::Error> {
        self.started[version.idx()] = Some(started);
        for i in 0..clients {
            let (c, conn) = through.connect(NoTls).await?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            let proto = match i % 3 {
                0 => Protocol::Simple,
                1 => {
                    let mut v = Vec::new();
                    for op in version.ops() {
                        v.push(c.prepare(op.sql()).await?);
                    }
                    Protocol::PreparedOnce(v)
                }
                _ => Protocol::Extended,
            };
            let mut app = AppClient {
                c,
                version,
                proto,
                step: self.step.clone(),
                mail: self.mail.clone(),
                stats: ClientStats {
                    max_by_step: vec![0; self.steps],
                    ..Default::default()
                },
                keys: BTreeMap::new(),
            };
            let stop = self.stop.clone();
            let committed = self.committed[version.idx()].clone();
            let failed = self.failed[version.idx()].clone();
            let seeded = self.seeded_connectors;
            self.tasks.push((
                version,
                tokio::spawn(async move {
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
                                        "{:?} client {i} ({}): {}",
                                        app.version,
                                        app.proto.name(),
                                        e.describe()
                                    ));
                                }
                                if app.c.is_closed() {
                                    break;
                                }
                                // The session may be inside a failed transaction: end it.
                                // The next generation takes new names.
                                let _ = app.c.batch_execute("ROLLBACK").await;
                                n += 1;
                            }
                        }
                        tokio::time::sleep(THINK_TIME).await;
                    }
                    app.stats
                }),
            ));
        }
        Ok(())
    }

    /// Transactions committed so far by `version`.
    pub fn committed(&self, version: Version) -> u64 {
        self.committed[version.idx()].load(Ordering::Relaxed)
    }

    /// Errors so far of `version`.
    pub fn failed(&self, version: Version) -> u64 {
        self.failed[version.idx()].load(Ordering::Relaxed)
    }

    /// Whether `version`'s clients run.
    pub fn runs(&self, version: Version) -> bool {
        self.started[version.idx()].is_some()
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
            versions: Vec::new(),
            net: TABLES.iter().map(|t| (*t, 0)).collect(),
        };
        for v in [Version::V1, Version::V2] {
            if let Some(started) = self.started[v.idx()] {
                r.versions.push(VersionResult {
                    version: v,
                    shape: v.shape(),
                    clients: self.tasks.iter().filter(|(tv, _)| *tv == v).count(),
                    started,
                    transactions: 0,
                    statements: 0,
                    errors: 0,
                    other_rows_read: 0,
                });
            }
        }
        for (v, t) in std::mem::take(&mut self.tasks) {
            let per = r.versions.iter_mut().find(|x| x.version == v);
            let s = match t.await {
                Ok(s) => s,
                Err(e) => {
                    r.errors += 1;
                    if let Some(per) = per {
                        per.errors += 1;
                    }
                    r.error_samples
                        .push(format!("a {v:?} client task failed: {e}"));
                    continue;
                }
            };
            if let Some(per) = per {
                per.transactions += s.transactions;
                per.statements += s.statements;
                per.errors += s.error_count;
                per.other_rows_read += s.other_rows_read;
            }
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
        for (_, t) in &self.tasks {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_fit_their_shape() {
        assert!(Val::of_text(Some("42")).fits(Shape::Integer));
        assert!(!Val::of_text(Some("42")).fits(Shape::Uuid));
        let u = PgUuid::new_v4();
        assert_eq!(u.0.get_version_num(), 4);
        assert!(Val::of_text(Some(&u.0.to_string())).fits(Shape::Uuid));
        assert!(Val::Null.fits(Shape::Uuid));
        assert!(!Val::Text("x".into()).fits(Shape::Integer));
    }

    #[test]
    fn each_version_prepares_each_of_its_statements_once() {
        for ops in [&V1_OPS[..], &V2_OPS[..]] {
            for (i, op) in ops.iter().enumerate() {
                assert_eq!(ops.iter().position(|o| o == op), Some(i), "{op:?}");
            }
        }
    }
}
