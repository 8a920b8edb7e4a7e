//! [shapes] differential: a generated stream of reads and writes answers the same through
//! keyshift in a translated shape as it does directly on a twin database in that shape.
//!
//! - An integer-shaped session after cutover, against a twin copied before expand (untouched).
//! - A uuid-shaped session after harden (before cutover), against a twin copied then and cut
//!   over offline, with no proxy.
//!
//! The twins are `CREATE DATABASE … TEMPLATE`, so existing rows (their uuids included) and the
//! sequences are identical on both sides: every id a statement answers must be equal. Each
//! statement's outcome (its columns, rows and row count, or its SQLSTATE) is compared; most go
//! through the simple protocol (text), some are prepared with parameters (typed values and
//! column types).
mod common;
mod migrate_support;

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use common::proxy::{connect_shaped, linked_proxy};
use futures_util::TryStreamExt;
use migrate_support::{SEED_004, ks_expect, seed_004_rows};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, SimpleQueryMessage};
use uuid::Uuid;

/// Statements per stream: a few thousand, on small tables, well under the test's time budget.
const STATEMENTS: usize = 3000;

const CONNECTORS: usize = 0;
const ACCESS: usize = 1;
const SERVERS: usize = 2;
const TOKENS: usize = 3;
const TOOLS: usize = 4;
const TABLES: [&str; 5] = [
    "mcp_connectors",
    "connector_access",
    "mcp_servers",
    "mcp_server_tokens",
    "mcp_server_tools",
];
/// Each FK of SEED_004: child, column, parent.
const FKS: [(usize, &str, usize); 4] = [
    (ACCESS, "connector_id", CONNECTORS),
    (SERVERS, "connector_id", CONNECTORS),
    (TOKENS, "mcp_server_id", SERVERS),
    (TOOLS, "mcp_server_id", SERVERS),
];

/// The integer shape's `SELECT *` of each table, name and type, as a session saw it before
/// expand plus the twins expand added; the same before and after cutover ([shapes] point 1).
const INTEGER_STAR: [&str; 5] = [
    "id int4, name text, created_at timestamptz, id_uuid uuid",
    "id int4, connector_id int4, user_id text, id_uuid uuid, connector_id_uuid uuid",
    "id int4, connector_id int4, name text, status text, id_uuid uuid, connector_id_uuid uuid",
    "id int4, mcp_server_id int4, token text, id_uuid uuid, mcp_server_id_uuid uuid",
    "id int4, mcp_server_id int4, tool_name text, id_uuid uuid, mcp_server_id_uuid uuid",
];

#[derive(Clone, Copy, PartialEq, Debug)]
enum Shape {
    Integer,
    Uuid,
}

#[derive(Clone, Copy, Debug)]
enum Key {
    Int(i32),
    Uuid(Uuid),
}

/// A value a statement carries: inlined as a literal (simple protocol) or bound as `$n`.
#[derive(Clone, Debug)]
enum Val {
    Int(Option<i32>),
    Uuid(Option<Uuid>),
    Text(String),
}

impl Val {
    fn literal(&self) -> String {
        match self {
            Val::Int(Some(i)) => i.to_string(),
            Val::Uuid(Some(u)) => format!("'{u}'"),
            Val::Int(None) | Val::Uuid(None) => "NULL".into(),
            Val::Text(s) => format!("'{}'", s.replace('\'', "''")),
        }
    }
    fn param(&self) -> &(dyn ToSql + Sync) {
        match self {
            Val::Int(v) => v,
            Val::Uuid(v) => v,
            Val::Text(v) => v,
        }
    }
}

impl From<Key> for Val {
    fn from(k: Key) -> Val {
        match k {
            Key::Int(i) => Val::Int(Some(i)),
            Key::Uuid(u) => Val::Uuid(Some(u)),
        }
    }
}

impl From<&str> for Val {
    fn from(s: &str) -> Val {
        Val::Text(s.into())
    }
}

impl From<String> for Val {
    fn from(s: String) -> Val {
        Val::Text(s)
    }
}

struct Stmt {
    sql: String,
    params: Vec<Val>,
    /// The rows come in an order the statement fixes (a total ORDER BY); else they are
    /// compared as a multiset: a twin's physical order differs after backfill's rewrites.
    ordered: bool,
    /// `SELECT * FROM TABLES[i] ORDER BY id`: compared on the columns both sides have, after
    /// checking the translated side's column list.
    star: Option<usize>,
    /// What part of the stream made it, for the summary of differences.
    kind: &'static str,
}

#[derive(Debug)]
enum Outcome {
    Rows {
        /// Names, and with the extended protocol each column's type.
        columns: Vec<String>,
        rows: Vec<Vec<Option<String>>>,
        affected: Option<u64>,
    },
    Error {
        code: String,
        message: String,
    },
}

impl Outcome {
    /// Errors are the same when their SQLSTATE is: a constraint's name may differ on a
    /// migrated table, its class of failure must not.
    fn same(&self, other: &Outcome) -> bool {
        match (self, other) {
            (Outcome::Error { code: a, .. }, Outcome::Error { code: b, .. }) => a == b,
            (
                Outcome::Rows {
                    columns: c1,
                    rows: r1,
                    affected: a1,
                },
                Outcome::Rows {
                    columns: c2,
                    rows: r2,
                    affected: a2,
                },
            ) => c1 == c2 && r1 == r2 && a1 == a2,
            _ => false,
        }
    }

    fn show(&self, from: usize) -> String {
        match self {
            Outcome::Error { code, message } => format!("ERROR {code}: {message}"),
            Outcome::Rows {
                columns,
                rows,
                affected,
            } => {
                let mut s = format!("{} row(s), affected {affected:?}: {columns:?}", rows.len());
                if from > 0 {
                    let _ = write!(s, "\n      … {from} identical row(s)");
                }
                for r in rows.iter().skip(from).take(6) {
                    let cells: Vec<&str> =
                        r.iter().map(|c| c.as_deref().unwrap_or("NULL")).collect();
                    let _ = write!(s, "\n      ({})", cells.join(", "));
                }
                if rows.len() > from + 6 {
                    let _ = write!(s, "\n      …");
                }
                s
            }
        }
    }

    /// Keeps the columns `keep` names, in its order (a star statement on the side with the
    /// twin columns, reduced to the other side's list).
    fn project(self, keep: &[String]) -> Outcome {
        let Outcome::Rows {
            columns,
            rows,
            affected,
        } = self
        else {
            return self;
        };
        let idx: Vec<Option<usize>> = keep
            .iter()
            .map(|k| columns.iter().position(|c| c == k))
            .collect();
        if idx.iter().any(Option::is_none) {
            // A column is missing: leave the outcome whole, the comparison shows it.
            return Outcome::Rows {
                columns,
                rows,
                affected,
            };
        }
        let idx: Vec<usize> = idx.into_iter().flatten().collect();
        Outcome::Rows {
            columns: idx.iter().map(|&i| columns[i].clone()).collect(),
            rows: rows
                .into_iter()
                .map(|r| idx.iter().map(|&i| r[i].clone()).collect())
                .collect(),
            affected,
        }
    }
}

/// The index of the first row that differs, to show the rows from there.
fn first_difference(a: &Outcome, b: &Outcome) -> usize {
    match (a, b) {
        (Outcome::Rows { rows: r1, .. }, Outcome::Rows { rows: r2, .. }) => {
            r1.iter().zip(r2).take_while(|(x, y)| x == y).count()
        }
        _ => 0,
    }
}

fn error_outcome(e: &tokio_postgres::Error) -> Outcome {
    match e.as_db_error() {
        Some(d) => Outcome::Error {
            code: d.code().code().to_string(),
            message: d.message().to_string(),
        },
        None => Outcome::Error {
            code: "client".into(),
            message: e.to_string(),
        },
    }
}

/// One column of a typed row as text, read as the Rust type a driver would use for it.
fn typed(row: &tokio_postgres::Row, i: usize) -> Option<String> {
    let t = row.columns()[i].type_();
    let r: Result<Option<String>, _> = if *t == Type::INT4 {
        row.try_get::<_, Option<i32>>(i)
            .map(|v| v.map(|v| v.to_string()))
    } else if *t == Type::INT8 {
        row.try_get::<_, Option<i64>>(i)
            .map(|v| v.map(|v| v.to_string()))
    } else if *t == Type::TEXT {
        row.try_get::<_, Option<String>>(i)
    } else if *t == Type::UUID {
        row.try_get::<_, Option<Uuid>>(i)
            .map(|v| v.map(|v| v.to_string()))
    } else if *t == Type::BOOL {
        row.try_get::<_, Option<bool>>(i)
            .map(|v| v.map(|v| v.to_string()))
    } else {
        panic!("the stream selects a {t} column: add it to typed()")
    };
    r.unwrap_or_else(|e| Some(format!("<undecodable: {e}>")))
}

async fn run(c: &Client, s: &Stmt) -> Outcome {
    let mut out = if s.params.is_empty() {
        run_simple(c, &s.sql).await
    } else {
        run_extended(c, s).await
    };
    if let Outcome::Rows { rows, .. } = &mut out
        && !s.ordered
    {
        rows.sort();
    }
    out
}

async fn run_simple(c: &Client, sql: &str) -> Outcome {
    let msgs = match c.simple_query(sql).await {
        Ok(m) => m,
        Err(e) => return error_outcome(&e),
    };
    let mut columns = Vec::new();
    let mut rows = Vec::new();
    let mut affected = None;
    for m in msgs {
        match m {
            SimpleQueryMessage::RowDescription(cols) => {
                columns = cols.iter().map(|c| c.name().to_string()).collect();
            }
            SimpleQueryMessage::Row(r) => {
                rows.push((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect());
            }
            SimpleQueryMessage::CommandComplete(n) => affected = Some(n),
            _ => {}
        }
    }
    Outcome::Rows {
        columns,
        rows,
        affected,
    }
}

async fn run_extended(c: &Client, s: &Stmt) -> Outcome {
    let st = match c.prepare(&s.sql).await {
        Ok(st) => st,
        Err(e) => return error_outcome(&e),
    };
    let columns = st
        .columns()
        .iter()
        .map(|c| format!("{} {}", c.name(), c.type_()))
        .collect();
    let stream = match c.query_raw(&st, s.params.iter().map(Val::param)).await {
        Ok(st) => st,
        Err(e) => return error_outcome(&e),
    };
    futures_util::pin_mut!(stream);
    let mut rows = Vec::new();
    loop {
        match stream.try_next().await {
            Ok(Some(r)) => rows.push((0..r.len()).map(|i| typed(&r, i)).collect()),
            Ok(None) => break,
            Err(e) => return error_outcome(&e),
        }
    }
    Outcome::Rows {
        columns,
        rows,
        affected: stream.rows_affected(),
    }
}

/// The stream: deterministic from its seed and the twins' existing keys.
struct Gen {
    rng: StdRng,
    shape: Shape,
    /// Keys each table has or had (deleted rows stay: statements on them must agree too).
    keys: [Vec<Key>; 5],
    /// Integer shape: the next value of each table's sequence, about (for picking keys that
    /// exist; a failed insert consumes one too, which is fine for that).
    next: [i32; 5],
    n: u32,
    /// Statements made, and how many of them bind parameters.
    made: usize,
    extended: usize,
    kind: &'static str,
}

const TOOL_NAMES: [&str; 4] = ["fetch", "search", "t1", "t2"];
const STATUSES: [Option<&str>; 4] = [Some("active"), Some("inactive"), Some("error"), None];
const TS: &str = "'2024-05-06 07:08:09+00'";

impl Gen {
    fn new(seed: u64, shape: Shape, keys: [Vec<Key>; 5]) -> Gen {
        let next = std::array::from_fn(|t| {
            keys[t]
                .iter()
                .map(|k| match k {
                    Key::Int(i) => *i,
                    Key::Uuid(_) => 0,
                })
                .max()
                .unwrap_or(0)
                + 1
        });
        Gen {
            rng: StdRng::seed_from_u64(seed),
            shape,
            keys,
            next,
            n: 0,
            made: 0,
            extended: 0,
            kind: "",
        }
    }

    fn uniq(&mut self) -> u32 {
        self.n += 1;
        self.n
    }

    fn chance(&mut self, p: f64) -> bool {
        self.rng.random_bool(p)
    }

    fn one_of<T: Copy>(&mut self, v: &[T]) -> T {
        v[self.rng.random_range(0..v.len())]
    }

    /// A key of table `t`: mostly one it has or had, sometimes one it never had (an FK to it
    /// must then fail the same way on both sides).
    fn key(&mut self, t: usize) -> Key {
        if self.chance(0.06) || self.keys[t].is_empty() {
            return match self.shape {
                Shape::Integer => Key::Int(900_000 + self.rng.random_range(0..1000)),
                Shape::Uuid => Key::Uuid(self.fresh_uuid()),
            };
        }
        // Recent keys more often: they are the ones still alive.
        let len = self.keys[t].len();
        let i = if self.chance(0.5) {
            len - 1 - self.rng.random_range(0..len.min(15))
        } else {
            self.rng.random_range(0..len)
        };
        self.keys[t][i]
    }

    /// A nullable FK's value, NULL bound with the shape's key type.
    fn nullable(&self, k: Option<Key>) -> Val {
        match (k, self.shape) {
            (Some(k), _) => k.into(),
            (None, Shape::Integer) => Val::Int(None),
            (None, Shape::Uuid) => Val::Uuid(None),
        }
    }

    fn fresh_uuid(&mut self) -> Uuid {
        uuid::Builder::from_random_bytes(self.rng.random()).into_uuid()
    }

    /// The key a new row of `t` gets: in the uuid shape the client names it (as V2 does, with
    /// uuid4), in the integer shape the sequence does.
    fn new_key(&mut self, t: usize) -> Option<Key> {
        match self.shape {
            Shape::Integer => {
                self.keys[t].push(Key::Int(self.next[t]));
                self.next[t] += 1;
                None
            }
            Shape::Uuid => {
                let k = Key::Uuid(self.fresh_uuid());
                self.keys[t].push(k);
                Some(k)
            }
        }
    }

    /// `a.id` in the integer shape, `a.id, a.id_legacy` in the uuid shape: the legacy integer
    /// comes from the same sequence on both sides, so it is compared too.
    fn ids(&self, alias: &str) -> String {
        let p = if alias.is_empty() {
            String::new()
        } else {
            format!("{alias}.")
        };
        match self.shape {
            Shape::Integer => format!("{p}id"),
            Shape::Uuid => format!("{p}id, {p}id_legacy"),
        }
    }

    /// A statement from `sql`, whose `?` are `vals`: inlined, or (three times in ten) bound as
    /// `$n` through the extended protocol.
    fn stmt(&mut self, sql: &str, vals: Vec<Val>, ordered: bool) -> Stmt {
        let bind = !vals.is_empty() && self.chance(0.3);
        let mut out = String::new();
        let mut vi = vals.iter();
        let mut n = 0;
        for ch in sql.chars() {
            if ch == '?' {
                let v = vi.next().expect("a value for each ?");
                n += 1;
                if bind {
                    let _ = write!(out, "${n}");
                } else {
                    out.push_str(&v.literal());
                }
            } else {
                out.push(ch);
            }
        }
        assert!(vi.next().is_none(), "a ? for each value: {sql}");
        self.made += 1;
        if bind {
            self.extended += 1;
        }
        Stmt {
            sql: out,
            params: if bind { vals } else { Vec::new() },
            ordered,
            star: None,
            kind: self.kind,
        }
    }

    fn plain(&mut self, sql: impl Into<String>, ordered: bool) -> Stmt {
        self.stmt(&sql.into(), Vec::new(), ordered)
    }

    /// The `id` column and value of an insert into `t` in this shape (nothing in the integer
    /// shape: the sequence gives it).
    fn insert_id(&mut self, t: usize) -> (&'static str, &'static str, Vec<Val>) {
        match self.new_key(t) {
            Some(k) => ("id, ", "?, ", vec![k.into()]),
            None => ("", "", Vec::new()),
        }
    }

    fn insert_connector(&mut self) -> Vec<Stmt> {
        let (c, p, mut v) = self.insert_id(CONNECTORS);
        let u = self.uniq();
        v.push(format!("c-new-{u}").into());
        let ids = self.ids("");
        vec![self.stmt(
            &format!(
                "INSERT INTO mcp_connectors ({c}name, created_at) VALUES ({p}?, {TS}) RETURNING {ids}, name"
            ),
            v,
            true,
        )]
    }

    fn insert_access(&mut self) -> Vec<Stmt> {
        let conn = self.key(CONNECTORS);
        let (c, p, mut v) = self.insert_id(ACCESS);
        let u = self.uniq();
        v.push(conn.into());
        v.push(format!("user{u}@example.com").into());
        let ids = self.ids("");
        vec![self.stmt(
            &format!(
                "INSERT INTO connector_access ({c}connector_id, user_id) VALUES ({p}?, ?) \
                 RETURNING {ids}, connector_id, user_id"
            ),
            v,
            true,
        )]
    }

    /// Multi-row VALUES, each row's connector one that exists, NULL, or missing.
    fn insert_servers(&mut self) -> Vec<Stmt> {
        let rows = self.rng.random_range(1..=3);
        let mut tuples = Vec::new();
        let mut v = Vec::new();
        let mut with_id = "";
        for _ in 0..rows {
            let (c, p, mut iv) = self.insert_id(SERVERS);
            with_id = c;
            let conn = if self.chance(0.15) {
                None
            } else {
                Some(self.key(CONNECTORS))
            };
            let u = self.uniq();
            let status = self.one_of(&STATUSES);
            iv.push(self.nullable(conn));
            iv.push(format!("s-new-{u}").into());
            v.extend(iv);
            tuples.push(format!(
                "({p}?, ?, {})",
                status.map_or("NULL".into(), |s| format!("'{s}'"))
            ));
        }
        let ids = self.ids("");
        vec![self.stmt(
            &format!(
                "INSERT INTO mcp_servers ({with_id}connector_id, name, status) VALUES {} \
                 RETURNING {ids}, connector_id, name, status",
                tuples.join(", ")
            ),
            v,
            false,
        )]
    }

    fn insert_child(&mut self, t: usize) -> Vec<Stmt> {
        let server = self.key(SERVERS);
        let (c, p, mut v) = self.insert_id(t);
        v.push(server.into());
        let ids = self.ids("");
        let (col, val) = if t == TOOLS {
            let n = self.one_of(&TOOL_NAMES);
            ("tool_name", n.to_string())
        } else {
            let u = self.uniq();
            ("token", format!("tok-{u}"))
        };
        v.push(val.into());
        let table = TABLES[t];
        vec![self.stmt(
            &format!(
                "INSERT INTO {table} ({c}mcp_server_id, {col}) VALUES ({p}?, ?) \
                 RETURNING {ids}, mcp_server_id, {col}"
            ),
            v,
            true,
        )]
    }

    /// INSERT … SELECT: a token for each server of a connector. In the uuid shape the new ids
    /// are derived from the server's, so both sides make the same ones. ORDER BY: the rows
    /// take their sequence values in the order the scan gives them, which differs on a table
    /// that backfill rewrote.
    fn insert_select(&mut self) -> Vec<Stmt> {
        let conn = self.key(CONNECTORS);
        let u = self.uniq();
        let (c, e) = match self.shape {
            Shape::Integer => ("", String::new()),
            Shape::Uuid => ("id, ", format!("md5('k{u}-' || s.id::text)::uuid, ")),
        };
        let ids = self.ids("");
        vec![self.stmt(
            &format!(
                "INSERT INTO mcp_server_tokens ({c}mcp_server_id, token) \
                 SELECT {e}s.id, 'tok{u}-' || s.name FROM mcp_servers s WHERE s.connector_id = ? \
                 ORDER BY s.id RETURNING {ids}, mcp_server_id, token"
            ),
            vec![conn.into()],
            false,
        )]
    }

    /// UPDATE of an FK: to a parent that exists, to NULL where it may be, to a missing one.
    fn update_fk(&mut self) -> Vec<Stmt> {
        let ids = self.ids("");
        if self.chance(0.5) {
            let to = if self.chance(0.15) {
                None
            } else {
                Some(self.key(CONNECTORS))
            };
            let id = self.key(SERVERS);
            vec![self.stmt(
                &format!(
                    "UPDATE mcp_servers SET connector_id = ? WHERE id = ? RETURNING {ids}, connector_id, name"
                ),
                vec![self.nullable(to), id.into()],
                true,
            )]
        } else {
            let t = self.one_of(&[TOOLS, TOKENS]);
            let to = self.key(SERVERS);
            let id = self.key(t);
            let table = TABLES[t];
            vec![self.stmt(
                &format!(
                    "UPDATE {table} SET mcp_server_id = ? WHERE id = ? RETURNING {ids}, mcp_server_id"
                ),
                vec![to.into(), id.into()],
                true,
            )]
        }
    }

    fn update_status(&mut self) -> Vec<Stmt> {
        let conn = self.key(CONNECTORS);
        let s = self.one_of(&STATUSES);
        vec![self.stmt(
            "UPDATE mcp_servers SET status = ? WHERE connector_id = ?",
            vec![Val::Text(s.unwrap_or("none").into()), conn.into()],
            false,
        )]
    }

    /// DELETEs: refused by an FK (a server with tokens or tools, a connector whose servers
    /// have some), and cascading (a connector's access rows and servers).
    fn delete(&mut self) -> Vec<Stmt> {
        let ids = self.ids("");
        match self.rng.random_range(0..4) {
            0 => {
                let id = self.key(SERVERS);
                vec![self.stmt(
                    &format!(
                        "DELETE FROM mcp_servers WHERE id = ? RETURNING {ids}, connector_id, name"
                    ),
                    vec![id.into()],
                    true,
                )]
            }
            1 => {
                let id = self.key(CONNECTORS);
                vec![self.stmt(
                    &format!("DELETE FROM mcp_connectors WHERE id = ? RETURNING {ids}, name"),
                    vec![id.into()],
                    true,
                )]
            }
            2 => {
                let t = self.one_of(&[TOOLS, TOKENS]);
                let s = self.key(SERVERS);
                let table = TABLES[t];
                vec![self.stmt(
                    &format!(
                        "DELETE FROM {table} WHERE mcp_server_id = ? RETURNING {ids}, mcp_server_id"
                    ),
                    vec![s.into()],
                    false,
                )]
            }
            _ => {
                // Clear a connector's servers' children, then the cascade goes through.
                let c = self.key(CONNECTORS);
                let mut v = Vec::new();
                for t in [TOOLS, TOKENS] {
                    let table = TABLES[t];
                    v.push(self.stmt(
                        &format!(
                            "DELETE FROM {table} WHERE mcp_server_id IN \
                             (SELECT id FROM mcp_servers WHERE connector_id = ?)"
                        ),
                        vec![c.into()],
                        false,
                    ));
                }
                v.push(self.stmt(
                    &format!("DELETE FROM mcp_connectors WHERE id = ? RETURNING {ids}, name"),
                    vec![c.into()],
                    true,
                ));
                let n = self.ids("");
                v.push(self.stmt(
                    &format!("SELECT {n}, connector_id FROM mcp_servers WHERE connector_id = ? ORDER BY id"),
                    vec![c.into()],
                    true,
                ));
                v
            }
        }
    }

    fn read(&mut self) -> Vec<Stmt> {
        let s_ids = self.ids("s");
        let c_ids = self.ids("c");
        let ids = self.ids("");
        let st = match self.rng.random_range(0..14) {
            0 => {
                let c = self.key(CONNECTORS);
                self.stmt(
                    &format!(
                        "SELECT {s_ids}, s.name, {c_ids}, c.name FROM mcp_servers s \
                         JOIN mcp_connectors c ON c.id = s.connector_id WHERE c.id = ? ORDER BY s.id"
                    ),
                    vec![c.into()],
                    true,
                )
            }
            1 => {
                let n = self.one_of(&TOOL_NAMES);
                self.stmt(
                    &format!(
                        "SELECT t.id, t.tool_name, {s_ids}, c.name FROM mcp_server_tools t \
                         JOIN mcp_servers s ON s.id = t.mcp_server_id \
                         LEFT JOIN mcp_connectors c ON c.id = s.connector_id \
                         WHERE t.tool_name = ? ORDER BY t.id"
                    ),
                    vec![n.into()],
                    true,
                )
            }
            2 => self.plain(
                format!(
                    "SELECT {c_ids}, c.name, count(s.id) AS servers FROM mcp_connectors c \
                     LEFT JOIN mcp_servers s ON s.connector_id = c.id \
                     GROUP BY {c_ids}, c.name ORDER BY count(s.id) DESC, c.id LIMIT 5"
                ),
                true,
            ),
            3 => {
                let c = self.key(CONNECTORS);
                self.stmt(
                    "SELECT id, mcp_server_id, tool_name FROM mcp_server_tools WHERE mcp_server_id IN \
                     (SELECT id FROM mcp_servers WHERE connector_id = ?) ORDER BY id",
                    vec![c.into()],
                    true,
                )
            }
            4 => self.plain(
                format!(
                    "SELECT {c_ids}, c.name, \
                     (SELECT count(*) FROM mcp_servers s WHERE s.connector_id = c.id) AS n \
                     FROM mcp_connectors c WHERE EXISTS \
                     (SELECT 1 FROM connector_access a WHERE a.connector_id = c.id) ORDER BY c.id"
                ),
                true,
            ),
            5 => self.plain(
                format!(
                    "SELECT {ids}, connector_id FROM mcp_servers s WHERE NOT EXISTS \
                     (SELECT 1 FROM mcp_server_tools t WHERE t.mcp_server_id = s.id) \
                     ORDER BY id LIMIT 10"
                ),
                true,
            ),
            6 => self.plain(
                format!(
                    "WITH per AS (SELECT mcp_server_id, count(*) AS n FROM mcp_server_tools \
                     GROUP BY mcp_server_id) \
                     SELECT {s_ids}, s.name, per.n FROM per JOIN mcp_servers s ON s.id = per.mcp_server_id \
                     ORDER BY per.n DESC, s.id LIMIT 10"
                ),
                true,
            ),
            7 => self.plain(
                "SELECT count(*), count(connector_id), count(DISTINCT connector_id) FROM mcp_servers",
                true,
            ),
            8 => self.plain(
                "SELECT status, count(*) FROM mcp_servers GROUP BY status ORDER BY status NULLS FIRST",
                true,
            ),
            9 => self.plain(
                "SELECT mcp_server_id, count(*) FROM mcp_server_tokens GROUP BY mcp_server_id \
                 HAVING count(*) > 1 ORDER BY mcp_server_id",
                true,
            ),
            10 => self.plain(
                match self.shape {
                    Shape::Integer => {
                        "SELECT max(id), sum(mcp_server_id), string_agg(id::text, ',' ORDER BY id) \
                         FROM mcp_server_tools"
                    }
                    Shape::Uuid => {
                        "SELECT max(id_legacy), count(DISTINCT mcp_server_id), \
                         string_agg(id::text, ',' ORDER BY id) FROM mcp_server_tools"
                    }
                },
                true,
            ),
            11 => {
                let a = self.key(SERVERS);
                let b = self.key(SERVERS);
                let c = self.key(SERVERS);
                self.stmt(
                    &format!(
                        "SELECT {ids}, connector_id, name, status FROM mcp_servers \
                         WHERE id IN (?, ?, ?) OR connector_id IS NULL ORDER BY id"
                    ),
                    vec![a.into(), b.into(), c.into()],
                    true,
                )
            }
            12 => self.plain(
                format!("SELECT {ids}, name FROM mcp_servers ORDER BY name DESC, id LIMIT 5 OFFSET 2"),
                true,
            ),
            _ => {
                let s = self.key(SERVERS);
                let n = self.one_of(&TOOL_NAMES);
                self.stmt(
                    &format!(
                        "SELECT {ids}, mcp_server_id, tool_name FROM mcp_server_tools \
                         WHERE mcp_server_id = ? AND tool_name = ?"
                    ),
                    vec![s.into(), n.into()],
                    true,
                )
            }
        };
        vec![st]
    }

    /// Writable CTEs: children moved by an UPDATE in a CTE; a server and its tool inserted in
    /// one statement.
    fn writable_cte(&mut self) -> Vec<Stmt> {
        let ids = self.ids("");
        if self.chance(0.5) {
            let to = self.key(SERVERS);
            let from = self.key(SERVERS);
            vec![self.stmt(
                "WITH moved AS (UPDATE mcp_server_tokens SET mcp_server_id = ? WHERE mcp_server_id = ? \
                 RETURNING id, mcp_server_id) SELECT id, mcp_server_id FROM moved",
                vec![to.into(), from.into()],
                false,
            )]
        } else {
            let conn = self.key(CONNECTORS);
            let (sc, sp, mut v) = self.insert_id(SERVERS);
            let (tc, tp, tv) = self.insert_id(TOOLS);
            let u = self.uniq();
            v.push(conn.into());
            v.push(format!("s-cte-{u}").into());
            v.extend(tv);
            let name = self.one_of(&TOOL_NAMES);
            v.push(name.into());
            vec![self.stmt(
                &format!(
                    "WITH s AS (INSERT INTO mcp_servers ({sc}connector_id, name) VALUES ({sp}?, ?) RETURNING id) \
                     INSERT INTO mcp_server_tools ({tc}mcp_server_id, tool_name) SELECT {tp}s.id, ? FROM s \
                     RETURNING {ids}, mcp_server_id, tool_name"
                ),
                v,
                true,
            )]
        }
    }

    /// `INSERT … ON CONFLICT (mcp_server_id, tool_name)`: the inference needs a unique index
    /// on the columns the session names, whichever physical columns they are.
    fn upsert(&mut self) -> Vec<Stmt> {
        let server = self.key(SERVERS);
        let (c, p, mut v) = self.insert_id(TOOLS);
        let name = self.one_of(&TOOL_NAMES);
        v.push(server.into());
        v.push(name.into());
        let ids = self.ids("");
        let action = if self.chance(0.6) {
            let u = self.uniq();
            format!("DO UPDATE SET tool_name = EXCLUDED.tool_name || '-{u}'")
        } else {
            "DO NOTHING".into()
        };
        vec![self.stmt(
            &format!(
                "INSERT INTO mcp_server_tools ({c}mcp_server_id, tool_name) VALUES ({p}?, ?) \
                 ON CONFLICT (mcp_server_id, tool_name) {action} \
                 RETURNING {ids}, mcp_server_id, tool_name"
            ),
            v,
            true,
        )]
    }

    /// Transactions: a row lock then an update, committed or rolled back; writes rolled back
    /// and counted again; a savepoint around a failing statement.
    fn transaction(&mut self) -> Vec<Stmt> {
        let ids = self.ids("");
        let s_ids = self.ids("s");
        let mut v = vec![self.plain("BEGIN", true)];
        match self.rng.random_range(0..3) {
            0 => {
                let id = self.key(SERVERS);
                v.push(self.stmt(
                    &format!(
                        "SELECT {ids}, connector_id, name FROM mcp_servers WHERE id = ? FOR UPDATE"
                    ),
                    vec![id.into()],
                    true,
                ));
                let c = self.key(CONNECTORS);
                v.push(self.stmt(
                    &format!(
                        "SELECT {s_ids}, c.name FROM mcp_servers s JOIN mcp_connectors c ON c.id = s.connector_id \
                         WHERE c.id = ? ORDER BY s.id FOR UPDATE OF s"
                    ),
                    vec![c.into()],
                    true,
                ));
                v.push(self.stmt(
                    &format!("UPDATE mcp_servers SET status = 'locked' WHERE id = ? RETURNING {ids}, status"),
                    vec![id.into()],
                    true,
                ));
                let end = if self.chance(0.5) {
                    "COMMIT"
                } else {
                    "ROLLBACK"
                };
                v.push(self.plain(end, true));
            }
            1 => {
                v.extend(self.insert_child(TOOLS));
                let s = self.key(SERVERS);
                v.push(self.stmt(
                    "DELETE FROM mcp_server_tokens WHERE mcp_server_id = ?",
                    vec![s.into()],
                    false,
                ));
                v.extend(self.insert_servers());
                v.push(self.plain(
                    "SELECT (SELECT count(*) FROM mcp_server_tokens), (SELECT count(*) FROM mcp_servers), \
                     (SELECT count(*) FROM mcp_server_tools)",
                    true,
                ));
                v.push(self.plain("ROLLBACK", true));
                v.push(self.plain(
                    "SELECT (SELECT count(*) FROM mcp_server_tokens), (SELECT count(*) FROM mcp_servers), \
                     (SELECT count(*) FROM mcp_server_tools)",
                    true,
                ));
            }
            _ => {
                v.push(self.plain("SAVEPOINT sp", true));
                v.extend(self.update_fk());
                v.push(self.plain("ROLLBACK TO SAVEPOINT sp", true));
                v.extend(self.insert_access());
                v.push(self.plain("COMMIT", true));
            }
        }
        v
    }

    fn star(&mut self, t: usize) -> Stmt {
        let mut s = self.plain(format!("SELECT * FROM {} ORDER BY id", TABLES[t]), true);
        s.star = Some(t);
        s
    }

    fn step(&mut self) -> Vec<Stmt> {
        let r = self.rng.random_range(0..100);
        let (kind, f): (_, fn(&mut Gen) -> Vec<Stmt>) = match r {
            0..6 => ("insert", Gen::insert_connector),
            6..10 => ("insert", Gen::insert_access),
            10..18 => ("insert multi-row", Gen::insert_servers),
            18..24 => ("insert", |g| g.insert_child(TOOLS)),
            24..30 => ("insert", |g| g.insert_child(TOKENS)),
            30..33 => ("insert select", Gen::insert_select),
            33..41 => ("update fk", Gen::update_fk),
            41..44 => ("update", Gen::update_status),
            44..52 => ("delete", Gen::delete),
            52..72 => ("read", Gen::read),
            72..77 => ("writable cte", Gen::writable_cte),
            77..85 => ("on conflict", Gen::upsert),
            85..93 => ("transaction", Gen::transaction),
            _ => ("select *", |g| {
                let t = g.rng.random_range(0..TABLES.len());
                vec![g.star(t)]
            }),
        };
        self.kind = kind;
        f(self)
    }
}

/// A failed statement may take fewer sequence values through keyshift than directly: a
/// missing parent fails the row where the dual-write looks it up, before the later rows of
/// a multi-row INSERT take theirs, where PostgreSQL's own FK check fails the statement only
/// after all of them. Sequences are not transactional and their gaps carry no meaning, so
/// after an error both databases continue from the larger value, and later ids compare.
async fn resync_sequences(x: &Client, y: &Client) {
    let seqs = y
        .query(
            "SELECT c.oid::regclass::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relkind = 'S' AND n.nspname = 'public'",
            &[],
        )
        .await
        .unwrap();
    for r in seqs {
        let s: String = r.get(0);
        let q = format!("SELECT last_value FROM {s}");
        let vx: i64 = x.query_one(&q, &[]).await.unwrap().get(0);
        let vy: i64 = y.query_one(&q, &[]).await.unwrap().get(0);
        let m = vx.max(vy);
        for (c, v) in [(x, vx), (y, vy)] {
            if v != m {
                c.execute(&format!("SELECT setval('{s}', {m})"), &[])
                    .await
                    .unwrap();
            }
        }
    }
}

/// Runs the stream on the session through keyshift and on the twin, compares each outcome,
/// prints the summary and returns the differences: the first few, then the first of each
/// kind not shown yet (one bug often shows in many statements, and a write that went
/// differently makes later reads differ too).
async fn differential(
    label: &str,
    shape: Shape,
    via: &Client,
    twin: &Client,
    direct: (&Client, &Client),
    keys: [Vec<Key>; 5],
) -> Option<String> {
    let started = Instant::now();
    let mut g = Gen::new(0x6b65_7973_6869_6674, shape, keys);
    let mut stmts = Vec::new();
    while stmts.len() < STATEMENTS {
        stmts.extend(g.step());
    }
    // The end state of every table, last.
    for t in 0..TABLES.len() {
        stmts.push(g.star(t));
    }
    let (mut compared, mut identical, mut errors) = (0, 0, 0);
    let mut diffs = Vec::new();
    // Per part of the stream: statements, identical.
    let mut tally: std::collections::BTreeMap<String, (usize, usize)> = Default::default();
    for (i, s) in stmts.iter().enumerate() {
        let mut a = run(via, s).await;
        let mut b = run(twin, s).await;
        if matches!(a, Outcome::Error { .. }) || matches!(b, Outcome::Error { .. }) {
            resync_sequences(direct.0, direct.1).await;
        }
        if let Some(t) = s.star {
            if let Some(d) = star_columns(shape, via, twin, t).await {
                diffs.push((
                    i,
                    format!("SELECT * FROM {}", TABLES[t]),
                    d,
                    String::new(),
                    "select * columns",
                ));
            }
            // Compared on the twin's columns: the integer twin has no uuid twins, and the
            // uuid twin's FK legacy columns are not filled for rows written directly.
            if let Outcome::Rows { columns, .. } = &b {
                let keep: Vec<String> = columns
                    .iter()
                    .filter(|c| shape == Shape::Integer || !is_fk_legacy(c))
                    .cloned()
                    .collect();
                a = a.project(&keep);
                b = b.project(&keep);
            }
        }
        compared += 1;
        if matches!(b, Outcome::Error { .. }) {
            errors += 1;
        }
        let t = tally.entry(tally_kind(s.kind, &b)).or_default();
        t.0 += 1;
        if a.same(&b) {
            identical += 1;
            t.1 += 1;
        } else {
            let sql = if s.params.is_empty() {
                s.sql.clone()
            } else {
                format!("{}  -- params {:?}", s.sql, s.params)
            };
            let from = first_difference(&a, &b);
            diffs.push((i, sql, a.show(from), b.show(from), s.kind));
        }
    }
    eprintln!(
        "{label}: {} statements run ({} prepared with parameters), {compared} compared, {identical} identical, \
         {} differ; {errors} errors on the twin (FK, unique, aborted transaction), in {:.1?}",
        stmts.len(),
        g.extended,
        diffs.len(),
        started.elapsed()
    );
    for (k, (n, same)) in &tally {
        eprintln!("  {k:32} {n:5} run, {same:5} identical");
    }
    if diffs.is_empty() {
        return None;
    }
    let class = |o: &str| match o.strip_prefix("ERROR ") {
        Some(e) => e.split(':').next().unwrap_or("").to_string(),
        None => "rows".to_string(),
    };
    let mut by: std::collections::BTreeMap<String, (usize, usize)> = Default::default();
    for (n, (_, _, a, b, kind)) in diffs.iter().enumerate() {
        let k = format!("{kind}: keyshift {} / twin {}", class(a), class(b));
        by.entry(k).or_insert((0, n)).0 += 1;
    }
    let mut report = format!("{label}: {} statement(s) differ; by kind:", diffs.len());
    for (k, (n, _)) in &by {
        let _ = write!(report, "\n  {n:5}  {k}");
    }
    let mut show: Vec<usize> = (0..diffs.len().min(5)).collect();
    show.extend(by.values().map(|&(_, first)| first));
    show.sort();
    show.dedup();
    for n in show {
        let (i, sql, a, b, kind) = &diffs[n];
        let _ = write!(
            report,
            "\n#{i} ({kind}): {sql}\n  through keyshift: {a}\n  twin:             {b}"
        );
    }
    Some(report)
}

/// The part of the stream a statement is counted in, telling apart by the twin's answer the
/// outcomes worth seeing covered: an error, and an upsert that took its DO UPDATE path (the
/// suffix it appends to the tool's name; the names inserted have no `-`).
fn tally_kind(kind: &str, twin: &Outcome) -> String {
    match twin {
        Outcome::Error { code, .. } => format!("{kind} (error {code})"),
        Outcome::Rows { rows, .. }
            if kind == "on conflict"
                && rows.iter().flatten().flatten().any(|c| c.contains('-')) =>
        {
            format!("{kind} (updated)")
        }
        Outcome::Rows { .. } => kind.to_string(),
    }
}

/// The uuid shape's FK twins: on the twin cut over offline no proxy fills them for the rows
/// the stream writes directly (dual-write is the proxy's), so they are not compared there.
fn is_fk_legacy(c: &str) -> bool {
    c.ends_with("_legacy") && c != "id_legacy"
}

/// `SELECT * FROM t` as the translated session is told it (RowDescription), against what it
/// must be: the integer shape's list, or the cut-over twin's own table.
async fn star_columns(shape: Shape, via: &Client, twin: &Client, t: usize) -> Option<String> {
    let sql = format!("SELECT * FROM {}", TABLES[t]);
    let cols = |st: &tokio_postgres::Statement| {
        st.columns()
            .iter()
            .map(|c| format!("{} {}", c.name(), c.type_()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let got = match via.prepare(&sql).await {
        Ok(st) => cols(&st),
        Err(e) => return Some(format!("prepare: {e}")),
    };
    let want = match shape {
        Shape::Integer => INTEGER_STAR[t].to_string(),
        Shape::Uuid => cols(&twin.prepare(&sql).await.unwrap()),
    };
    (got != want).then(|| format!("columns [{got}], want [{want}]"))
}

async fn keys_of(c: &Client, shape: Shape) -> [Vec<Key>; 5] {
    let mut keys: [Vec<Key>; 5] = Default::default();
    for (t, k) in keys.iter_mut().enumerate() {
        let table = TABLES[t];
        let sql = match shape {
            Shape::Integer => format!("SELECT id FROM {table} ORDER BY id"),
            Shape::Uuid => format!("SELECT id FROM {table} ORDER BY id_legacy"),
        };
        for r in c.query(&sql, &[]).await.unwrap() {
            k.push(match shape {
                Shape::Integer => Key::Int(r.get(0)),
                Shape::Uuid => Key::Uuid(r.get(0)),
            });
        }
    }
    keys
}

/// After the stream, the translated side's own invariants, which the twin cannot show: every
/// key has its other-shape twin, and every FK's twin names the parent's.
async fn twins_consistent(shape: Shape, via: &Client) -> Vec<String> {
    let mut problems = Vec::new();
    let (other, fk_other) = match shape {
        Shape::Integer => ("id_uuid", "_uuid"),
        Shape::Uuid => ("id_legacy", "_legacy"),
    };
    for t in TABLES {
        let sql = format!("SELECT count(*) FROM {t} WHERE {other} IS NULL");
        let n: i64 = via.query_one(&sql, &[]).await.unwrap().get(0);
        if n != 0 {
            problems.push(format!("{n} row(s) without their twin key: {sql}"));
        }
    }
    for (child, col, parent) in FKS {
        let (c, p) = (TABLES[child], TABLES[parent]);
        let sql = format!(
            "SELECT count(*) FROM {c} x LEFT JOIN {p} p ON p.id = x.{col} \
             WHERE x.{col} IS NOT NULL AND (p.id IS NULL OR x.{col}{fk_other} IS DISTINCT FROM p.{other})"
        );
        let n: i64 = via.query_one(&sql, &[]).await.unwrap().get(0);
        if n != 0 {
            problems.push(format!(
                "{n} row(s) whose FK names no parent or not the parent's twin: {sql}"
            ));
        }
    }
    problems
}

async fn seeded_db() -> common::TestDb {
    let db = common::TestDb::new().await;
    db.client()
        .await
        .batch_execute(&format!("{SEED_004}{}", seed_004_rows(8)))
        .await
        .unwrap();
    db
}

/// An exact copy of `db` (`CREATE DATABASE … TEMPLATE`), which must have no connection left:
/// PostgreSQL waits a few seconds for closing ones, and the copy is retried after that.
async fn twin_of(db: &common::TestDb) -> common::TestDb {
    let twin = common::TestDb {
        name: format!("{}_twin", db.name),
    };
    let admin = common::connect(&common::server().url("postgres")).await;
    let start = Instant::now();
    loop {
        let sql = format!("CREATE DATABASE \"{}\" TEMPLATE \"{}\"", twin.name, db.name);
        match admin.batch_execute(&sql).await {
            Ok(()) => return twin,
            Err(e) if start.elapsed() < Duration::from_secs(20) => {
                eprintln!("{sql}: {e}; again");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("{sql}: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn integer_session_after_cutover_answers_as_an_untouched_twin() {
    let b = seeded_db().await;
    let a = twin_of(&b).await;
    for step in ["expand", "backfill", "cutover"] {
        ks_expect(&b.url(), &[step], 0);
    }
    let p = linked_proxy(&b).await;
    let via = connect_shaped(&p, &b, "integer").await;
    let twin = a.client().await;
    let direct = (b.client().await, a.client().await);
    let keys = keys_of(&twin, Shape::Integer).await;
    let mut problems: Vec<String> = differential(
        "integer shape after cutover",
        Shape::Integer,
        &via,
        &twin,
        (&direct.0, &direct.1),
        keys,
    )
    .await
    .into_iter()
    .collect();
    problems.extend(twins_consistent(Shape::Integer, &via).await);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uuid_session_before_cutover_answers_as_a_twin_cut_over_offline() {
    let b = seeded_db().await;
    for step in ["expand", "backfill"] {
        ks_expect(&b.url(), &[step], 0);
    }
    let c = twin_of(&b).await;
    ks_expect(&c.url(), &["cutover"], 0);
    let p = linked_proxy(&b).await;
    let via = connect_shaped(&p, &b, "uuid").await;
    let twin = c.client().await;
    let direct = (b.client().await, c.client().await);
    let keys = keys_of(&twin, Shape::Uuid).await;
    let mut problems: Vec<String> = differential(
        "uuid shape before cutover",
        Shape::Uuid,
        &via,
        &twin,
        (&direct.0, &direct.1),
        keys,
    )
    .await
    .into_iter()
    .collect();
    problems.extend(twins_consistent(Shape::Uuid, &via).await);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
