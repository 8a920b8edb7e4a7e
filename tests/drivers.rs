//! Real drivers through keyshift across the whole lifecycle (DESIGN "Tests and tools",
//! "Shapes"; issue [shapes] "Tests (real PostgreSQL, real drivers)").
//!
//! Each driver runs as a long-lived script (tests/drivers/) that keeps one connection, and the
//! statements its driver prepared, while this test runs expand, backfill, harden, cutover,
//! rollback and cutover again in between. The script speaks a line protocol (described in
//! tests/drivers/harness.py): `step <label>` writes and reads rows in its shape and answers the
//! ids it was given; `check …` reads a row the other shape wrote. Every id a script reports is
//! compared with what the database holds, read directly in the physical shape of the moment.
//! `copy …` (pgjdbc's CopyManager, node-postgres' pg-copy-streams) copies rows into the child
//! tables in text, csv and binary; each copied row's link and both sides of its FKs are checked
//! then and after every later step (issue [writes]).
//!
//! The drivers come from `.ci/run`: a venv with psycopg 3, SQLAlchemy 2 and asyncpg in
//! `target/drivers/venv`, npm's `pg` and `pg-copy-streams` in `target/drivers/node_modules`,
//! Debian's `libpostgresql-jdbc-java` and a JDK. `KEYSHIFT_DRIVERS_DIR` points elsewhere. A
//! missing one fails the test with what to install.
mod common;
// Shared with the migrate_* tests; its seed re-export is not used here.
#[allow(unused_imports)]
mod migrate_support;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::proxy::{TestProxy, http, test_config};
use migrate_support::{ks, text};
use serde_json::Value;

/// A parent, a child of it, and a child of both (one FK cascading, one SET NULL); a few rows
/// each, so that every step is milliseconds. User 1 is named `u1`: scripts read it back.
const SCHEMA: &str = "
CREATE TABLE users (id serial PRIMARY KEY, name text NOT NULL UNIQUE);
CREATE TABLE posts (id serial PRIMARY KEY,
    user_id integer NOT NULL REFERENCES users (id) ON DELETE CASCADE, title text NOT NULL UNIQUE);
CREATE INDEX posts_user_id_idx ON posts (user_id);
CREATE TABLE comments (id serial PRIMARY KEY,
    post_id integer NOT NULL REFERENCES posts (id) ON DELETE CASCADE,
    author_id integer REFERENCES users (id) ON DELETE SET NULL, body text NOT NULL UNIQUE);
INSERT INTO users (name) SELECT 'u' || g FROM generate_series(1, 5) g;
INSERT INTO posts (user_id, title) SELECT (g % 5) + 1, 'p' || g FROM generate_series(1, 10) g;
INSERT INTO comments (post_id, author_id, body) SELECT (g % 10) + 1, (g % 5) + 1, 'c' || g FROM generate_series(1, 10) g;
";

/// How long one script command may take: a JVM compiling the script is the slowest start.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Shape {
    Integer,
    Uuid,
}

#[derive(Clone, Copy, Debug)]
enum Driver {
    Asyncpg,
    Psycopg,
    Sqlalchemy,
    NodePg,
    Pgjdbc,
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Where `.ci/run` installs the Python and npm drivers.
fn drivers_dir() -> PathBuf {
    std::env::var_os("KEYSHIFT_DRIVERS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/drivers"))
}

fn require(path: &Path, what: &str) {
    assert!(
        path.exists(),
        "this test needs {what} (missing: {}); `bash .ci/run` installs it, or by hand: {}",
        path.display(),
        install_hint(what)
    );
}

fn install_hint(what: &str) -> String {
    let dir = drivers_dir();
    let dir = dir.display();
    match what {
        "the Python drivers" => format!(
            "python3 -m venv {dir}/venv && {dir}/venv/bin/pip install 'psycopg[binary]>=3.1,<4' 'SQLAlchemy>=2,<3' asyncpg"
        ),
        "node-postgres" | "pg-copy-streams" => {
            format!("apt-get install nodejs npm && npm install --prefix {dir} pg pg-copy-streams")
        }
        _ => "apt-get install default-jdk-headless libpostgresql-jdbc-java".into(),
    }
}

fn on_path(tool: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

impl Driver {
    fn name(self) -> &'static str {
        match self {
            Driver::Asyncpg => "asyncpg",
            Driver::Psycopg => "psycopg",
            Driver::Sqlalchemy => "sqlalchemy",
            Driver::NodePg => "node-postgres",
            Driver::Pgjdbc => "pgjdbc",
        }
    }

    /// The command that runs this driver's script, or a panic saying what to install.
    fn command(self) -> Command {
        let scripts = repo().join("tests/drivers");
        match self {
            Driver::Asyncpg | Driver::Psycopg | Driver::Sqlalchemy => {
                let python = drivers_dir().join("venv/bin/python");
                require(&python, "the Python drivers");
                let script = match self {
                    Driver::Asyncpg => "asyncpg_client.py",
                    Driver::Psycopg => "psycopg_client.py",
                    _ => "sqlalchemy_client.py",
                };
                let mut c = Command::new(python);
                // No __pycache__ left in the source tree.
                c.arg(scripts.join(script))
                    .env("PYTHONDONTWRITEBYTECODE", "1");
                c
            }
            Driver::NodePg => {
                let node = on_path("node").or_else(|| on_path("nodejs"));
                let node = node.unwrap_or_else(|| {
                    panic!("this test needs Node.js; {}", install_hint("node-postgres"))
                });
                require(
                    &drivers_dir().join("node_modules/pg/package.json"),
                    "node-postgres",
                );
                let mut c = Command::new(node);
                c.arg(scripts.join("node_pg_client.js"))
                    .env("NODE_PATH", drivers_dir().join("node_modules"));
                c
            }
            Driver::Pgjdbc => {
                let (jar, classes) = pgjdbc_classes();
                let mut c = Command::new(on_path("java").expect("java beside javac"));
                c.arg("-cp")
                    .arg(format!("{}:{}", jar.display(), classes.display()))
                    .arg("Pgjdbc");
                c
            }
        }
    }
}

/// pgjdbc's jar and the compiled Pgjdbc.java, compiled once per test run: javac costs
/// seconds, a JVM starting compiled classes a fraction of one.
fn pgjdbc_classes() -> &'static (PathBuf, PathBuf) {
    static CLASSES: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    CLASSES.get_or_init(|| {
        let javac = on_path("javac")
            .filter(|_| on_path("java").is_some())
            .unwrap_or_else(|| {
                panic!(
                    "this test needs a JDK (java, javac); {}",
                    install_hint("jdk")
                )
            });
        let jar = PathBuf::from("/usr/share/java/postgresql.jar");
        require(&jar, "pgjdbc (Debian's libpostgresql-jdbc-java)");
        // Cargo's scratch directory for integration tests, overwritten by each run.
        let classes = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("pgjdbc-classes");
        let out = Command::new(javac)
            .arg("-cp")
            .arg(&jar)
            .arg("-d")
            .arg(&classes)
            .arg(repo().join("tests/drivers/Pgjdbc.java"))
            .output()
            .expect("run javac");
        assert!(
            out.status.success(),
            "javac Pgjdbc.java: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        (jar, classes)
    })
}

/// One driver script, its connection open, answering one JSON line per command.
struct Script {
    who: String,
    child: Child,
    /// Taken (closed) at drop, after `quit`: every script also ends at EOF.
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    stderr: Arc<Mutex<String>>,
}

/// What a script answered to a command: `Err` is the driver's or the script's error.
type Answer = Result<Value, String>;

impl Script {
    /// Starts the script; [`Script::ready`] then waits for its connection.
    fn spawn(
        driver: Driver,
        proxy: &TestProxy,
        db: &str,
        shape: Shape,
        param: Option<&str>,
        tag: &str,
    ) -> Script {
        let mut cmd = driver.command();
        cmd.args(["--host", &proxy.addr.ip().to_string()])
            .args(["--port", &proxy.addr.port().to_string()])
            .args(["--db", db, "--tag", tag])
            .args([
                "--shape",
                if shape == Shape::Integer {
                    "integer"
                } else {
                    "uuid"
                },
            ])
            .args(["--shape-param", param.unwrap_or("none")])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", driver.name()));
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        // Kept whole for the failure message: a driver's stack trace says where it broke.
        let stderr = Arc::new(Mutex::new(String::new()));
        let (pipe, sink) = (child.stderr.take().unwrap(), stderr.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        Script {
            who: format!("{} ({tag}, {shape:?} shape)", driver.name()),
            stdin: child.stdin.take(),
            child,
            lines,
            stderr,
        }
    }

    /// Waits for the script's connection; a refused one fails the test.
    fn ready(self) -> Script {
        let mut s = self;
        if let Err(e) = s.answer() {
            panic!("{}: connection refused: {e}\n{}", s.who, s.tail());
        }
        s
    }

    fn call(&mut self, command: &str) -> Answer {
        let stdin = self.stdin.as_mut().expect("stdin is open until drop");
        writeln!(stdin, "{command}")
            .and_then(|_| stdin.flush())
            .unwrap_or_else(|e| panic!("{}: write {command:?}: {e}\n{}", self.who, self.tail()));
        self.answer()
    }

    fn answer(&mut self) -> Answer {
        let line = match self.lines.recv_timeout(COMMAND_TIMEOUT) {
            Ok(l) => l,
            Err(RecvTimeoutError::Timeout) => {
                panic!(
                    "{}: no answer in {COMMAND_TIMEOUT:?}\n{}",
                    self.who,
                    self.tail()
                )
            }
            Err(RecvTimeoutError::Disconnected) => {
                let status = self.child.wait().ok();
                panic!("{}: exited ({status:?})\n{}", self.who, self.tail())
            }
        };
        let v: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("{}: not JSON ({e}): {line}\n{}", self.who, self.tail()));
        if v["ok"] == true {
            Ok(v)
        } else {
            Err(match v["sqlstate"].as_str() {
                Some(code) => format!("{} [SQLSTATE {code}]", v["error"].as_str().unwrap_or("?")),
                None => v["error"].as_str().unwrap_or("?").to_string(),
            })
        }
    }

    /// The end of the script's stderr (where drivers print their stack traces).
    fn tail(&self) -> String {
        let s = self.stderr.lock().unwrap();
        let start = s.len().saturating_sub(3000);
        let start = (start..s.len())
            .find(|&i| s.is_char_boundary(i))
            .unwrap_or(0);
        format!("--- stderr of the script (end)\n{}", &s[start..])
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = writeln!(stdin, "quit");
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Clone, Copy)]
struct Layout {
    physical_uuid: bool,
    twins: bool,
}

/// A row as the database holds it, whatever the shape: its integer key and its uuid, and the
/// same for its parent when it has one (posts: the user; comments: the post).
#[derive(Debug, Clone, PartialEq)]
struct Truth {
    table: String,
    name: String,
    int: i64,
    uuid: Option<String>,
    parent_int: Option<i64>,
    parent_uuid: Option<String>,
}

impl Truth {
    /// The `check` command that asks a script to read this row in its own shape.
    fn check_command(&self) -> String {
        let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
        format!(
            "check {} {} {} {} {} {}",
            self.table,
            self.name,
            self.int,
            opt(&self.uuid),
            self.parent_int.map_or("-".into(), |p| p.to_string()),
            opt(&self.parent_uuid)
        )
    }
}

/// A database with [`SCHEMA`], a proxy linked to it, a direct connection to check what the
/// scripts report, and every discrepancy found so far.
struct Lab {
    rt: tokio::runtime::Runtime,
    db: common::TestDb,
    proxy: TestProxy,
    direct: tokio_postgres::Client,
    failures: Vec<String>,
}

impl Lab {
    fn new() -> Lab {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let (db, direct) = rt.block_on(async {
            let db = common::TestDb::new().await;
            let direct = db.client().await;
            direct.batch_execute(SCHEMA).await.expect("schema");
            (db, direct)
        });
        let mut cfg = test_config();
        cfg.database_url = Some(db.url());
        let proxy = TestProxy::start_with(cfg);
        let lab = Lab {
            rt,
            db,
            proxy,
            direct,
            failures: Vec::new(),
        };
        lab.wait_proxy(|v| v["database_link"] == "connected");
        lab
    }

    fn wait_proxy(&self, ok: impl Fn(&Value) -> bool) {
        let start = Instant::now();
        loop {
            let (_, body) = http(self.proxy.admin, "GET", "/v1/status", None);
            let v: Value = serde_json::from_str(&body).unwrap();
            if ok(&v) {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "proxy status never matched: {v}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn query(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Vec<tokio_postgres::Row> {
        self.rt
            .block_on(self.direct.query(sql, params))
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
    }

    /// `keyshift <args>`, which must succeed; then waits until the proxy runs the rules of
    /// the phase it left, so the next script step meets them.
    fn ks(&self, args: &[&str]) {
        let out = ks(&self.db.url(), args);
        assert_eq!(
            out.status.code(),
            Some(0),
            "keyshift {args:?}\n{}",
            text(&out)
        );
        self.wait_rules();
    }

    /// Waits until the proxy runs the rules the database's migration state asks for.
    fn wait_rules(&self) {
        let want: i64 = self.query("SELECT rules_version FROM keyshift.migration", &[])[0].get(0);
        self.wait_proxy(|v| v["rules_version"].as_i64() == Some(want) && v["dual_write"] == true);
    }

    fn column_exists(&self, table: &str, column: &str) -> bool {
        !self
            .query(
                "SELECT 1 FROM information_schema.columns WHERE table_schema = 'public' AND table_name = $1 AND column_name = $2",
                &[&table, &column],
            )
            .is_empty()
    }

    /// Where the keys of `table` are now: (the uuids carry the original names, the twin
    /// columns exist). A table's FK columns move with its key: the single swap moves every
    /// table at once, `cutover --by-table` one group at a time.
    fn layout(&self, table: &str) -> Layout {
        let physical_uuid = self.column_exists(table, "id_legacy");
        Layout {
            physical_uuid,
            twins: physical_uuid || self.column_exists(table, "id_uuid"),
        }
    }

    /// The row of `table` named `name`, read directly in that table's physical shape.
    fn truth(&self, table: &str, name: &str) -> Option<Truth> {
        let Layout {
            physical_uuid,
            twins,
        } = self.layout(table);
        let (name_col, fk) = match table {
            "users" => ("name", None),
            "posts" => ("title", Some("user_id")),
            _ => ("body", Some("post_id")),
        };
        // Before cutover the integers carry the original names; after it, the uuids do.
        let (int, uuid) = if physical_uuid {
            ("_legacy", "")
        } else {
            ("", "_uuid")
        };
        let col = |base: &str, suffix: &str| format!("{base}{suffix}");
        let uuid_of = |base: &str| {
            if twins {
                format!("{}::text", col(base, uuid))
            } else {
                "NULL::text".into()
            }
        };
        let (fk_int, fk_uuid) = match fk {
            Some(f) => (format!("{}::int8", col(f, int)), uuid_of(f)),
            None => ("NULL::int8".into(), "NULL::text".into()),
        };
        let sql = format!(
            "SELECT {}::int8, {}, {fk_int}, {fk_uuid} FROM {table} WHERE {name_col} = $1",
            col("id", int),
            uuid_of("id")
        );
        self.query(&sql, &[&name]).first().map(|r| Truth {
            table: table.into(),
            name: name.into(),
            int: r.get(0),
            uuid: r.get(1),
            parent_int: r.get(2),
            parent_uuid: r.get(3),
        })
    }

    /// Runs one step of a script, compares every id it reports with the database, and
    /// returns the rows it wrote as the database holds them. Discrepancies are recorded.
    fn step(&mut self, s: &mut Script, shape: Shape, label: &str) -> Vec<Truth> {
        let v = match s.call(&format!("step {label}")) {
            Ok(v) => v,
            Err(e) => {
                self.failures.push(format!("{} at {label}: {e}", s.who));
                return Vec::new();
            }
        };
        let mut out = Vec::new();
        for r in v["rows"].as_array().cloned().unwrap_or_default() {
            let (table, name) = (r["table"].as_str().unwrap(), r["name"].as_str().unwrap());
            let Some(t) = self.truth(table, name) else {
                self.failures.push(format!(
                    "{} at {label}: {table} {name:?} is not in the database",
                    s.who
                ));
                continue;
            };
            let (id, parent) = match shape {
                Shape::Integer => (Some(t.int.to_string()), t.parent_int.map(|p| p.to_string())),
                Shape::Uuid => (t.uuid.clone(), t.parent_uuid.clone()),
            };
            let reported = (
                r["id"].as_str().map(String::from),
                r["parent"].as_str().map(String::from),
            );
            if reported != (id.clone(), parent.clone()) {
                self.failures.push(format!(
                    "{} at {label}: {table} {name:?}: the driver was given id {:?} (parent {:?}); the database holds {id:?} (parent {parent:?})",
                    s.who, reported.0, reported.1
                ));
            }
            out.push(t);
        }
        out
    }

    /// Asks `s` to read, in its own shape, each users and posts row another session wrote.
    fn cross_check(&mut self, s: &mut Script, label: &str, rows: &[Truth]) {
        let (mut errors, mut checked) = (Vec::new(), 0);
        for t in rows.iter().filter(|t| t.table != "comments") {
            checked += 1;
            // Read again now: the ids must not have moved since the row was written.
            match self.truth(&t.table, &t.name) {
                Some(now) if now == *t => {}
                now => self.failures.push(format!(
                    "at {label}, {} {:?}: was {t:?}, is now {now:?}",
                    t.table, t.name
                )),
            }
            if let Err(e) = s.call(&t.check_command()) {
                errors.push((format!("{} {:?}", t.table, t.name), e));
            }
        }
        // One line per step, not per row: the rows fail together or not at all, as a rule.
        if let Some((row, e)) = errors.first() {
            self.failures.push(format!(
                "{} at {label}, reading {} of {} rows the other shape wrote (the first is {row}): {e}",
                s.who,
                errors.len(),
                checked
            ));
        }
    }

    /// Fails with every discrepancy, the same error at several places said once.
    fn finish(self, what: &str) {
        let mut grouped: Vec<(String, Vec<String>)> = Vec::new();
        for f in &self.failures {
            let (at, error) = f.split_once(": ").unwrap_or((f, ""));
            match grouped.iter_mut().find(|(e, _)| e == error) {
                Some((_, places)) => places.push(at.to_string()),
                None => grouped.push((error.to_string(), vec![at.to_string()])),
            }
        }
        let listing: Vec<String> = grouped
            .iter()
            .map(|(error, places)| format!("{error}\n      at {}", places.join("; ")))
            .collect();
        assert!(
            self.failures.is_empty(),
            "{what}: {} failure(s):\n  {}",
            self.failures.len(),
            listing.join("\n  ")
        );
    }
}

/// The script of `driver`, started; [`Script::ready`] waits for its connection.
fn spawned(lab: &Lab, driver: Driver, shape: Shape, param: Option<&str>, tag: &str) -> Script {
    Script::spawn(driver, &lab.proxy, &lab.db.name, shape, param, tag)
}

/// Group (a): an application written for integer keys, unchanged (no shape parameter), one
/// connection from before expand to after a second cutover. Its statements are prepared at
/// the first step; every later step reuses them, and everything it reads back must be the
/// integers it wrote, with the types it was first told.
fn integer_application_across_the_lifecycle(driver: Driver) {
    let mut lab = Lab::new();
    let mut s = spawned(&lab, driver, Shape::Integer, None, "v1").ready();
    lab.step(&mut s, Shape::Integer, "before_expand");
    for (args, label) in [
        (&["expand"][..], "expanded"),
        (&["backfill"], "backfilled"),
        (&["harden"], "hardened"),
        (&["cutover"], "cut_over"),
        (&["rollback"], "rolled_back"),
        (&["harden"], "hardened_again"),
        (&["cutover"], "cut_over_again"),
    ] {
        lab.ks(args);
        lab.step(&mut s, Shape::Integer, label);
    }
    let out = ks(&lab.db.url(), &["verify"]);
    if out.status.code() != Some(0) {
        lab.failures
            .push(format!("keyshift verify after the run:\n{}", text(&out)));
    }
    drop(s);
    lab.finish(&format!("{} in the integer shape", driver.name()));
}

/// Group (b): V1 (integer models, no parameter) and V2 (uuid models, `keyshift.shape=uuid`
/// through the driver's own way of passing it) side by side, from hardened through cutover,
/// rollback and cutover again. Each writes in its shape, and reads every row the other wrote
/// so far in its own: V1 by the integer with its `_uuid` twins, V2 by the uuid with its
/// `_legacy` twins.
fn two_shapes_side_by_side(driver: Driver) {
    let mut lab = Lab::new();
    for step in ["expand", "backfill", "harden"] {
        lab.ks(&[step]);
    }
    let v1 = spawned(&lab, driver, Shape::Integer, None, "v1");
    let v2 = spawned(&lab, driver, Shape::Uuid, Some("uuid"), "v2");
    let (mut v1, mut v2) = (v1.ready(), v2.ready());
    let (mut by_v1, mut by_v2) = (Vec::new(), Vec::new());
    for (args, label) in [
        (&[][..], "hardened"),
        (&["cutover"], "cut_over"),
        (&["rollback"], "rolled_back"),
        (&["harden"], "hardened_again"),
        (&["cutover"], "cut_over_again"),
    ] {
        if !args.is_empty() {
            lab.ks(args);
        }
        by_v1.extend(lab.step(&mut v1, Shape::Integer, label));
        by_v2.extend(lab.step(&mut v2, Shape::Uuid, label));
        lab.cross_check(&mut v2, label, &by_v1);
        lab.cross_check(&mut v1, label, &by_v2);
    }
    drop((v1, v2));
    lab.finish(&format!("{} in both shapes", driver.name()));
}

// ---- the part that works today: each driver through the proxy up to cutover ----

/// Every driver, through a linked proxy from before expand to hardened: the scripts, the
/// installs and the checks against the database work, and dual-write keeps each driver's
/// rows consistent. The cutover half is in the ignored tests below.
#[test]
fn every_driver_works_through_the_proxy_until_cutover() {
    let mut lab = Lab::new();
    let drivers = [
        Driver::Asyncpg,
        Driver::Psycopg,
        Driver::Sqlalchemy,
        Driver::NodePg,
        Driver::Pgjdbc,
    ];
    // Started together: a JVM compiling its script is the slowest start.
    let spawned: Vec<Script> = drivers
        .iter()
        .map(|&d| spawned(&lab, d, Shape::Integer, None, d.name()))
        .collect();
    let mut scripts: Vec<Script> = spawned.into_iter().map(Script::ready).collect();
    for (args, label) in [
        (&[][..], "before_expand"),
        (&["expand"], "expanded"),
        (&["backfill"], "backfilled"),
        (&["harden"], "hardened"),
    ] {
        if !args.is_empty() {
            lab.ks(args);
        }
        for s in &mut scripts {
            lab.step(s, Shape::Integer, label);
        }
    }
    drop(scripts);
    // Dual-write filled every uuid twin of what the drivers wrote.
    let n = lab.query(
        "SELECT count(*) FROM posts p JOIN users u ON u.id = p.user_id WHERE p.user_id_uuid IS DISTINCT FROM u.id_uuid",
        &[],
    )[0]
    .get::<_, i64>(0);
    if n != 0 {
        lab.failures.push(format!(
            "{n} posts whose user_id_uuid is not their user's uuid"
        ));
    }
    lab.finish("the drivers up to cutover");
}

// ---- (a) the integer shape across cutover and rollback ----

#[test]
fn asyncpg_statement_cache_in_the_integer_shape_across_cutover_and_rollback() {
    integer_application_across_the_lifecycle(Driver::Asyncpg);
}

#[test]
fn pgjdbc_prepared_and_batched_in_the_integer_shape_across_cutover_and_rollback() {
    integer_application_across_the_lifecycle(Driver::Pgjdbc);
}

#[test]
fn node_postgres_named_statements_in_the_integer_shape_across_cutover_and_rollback() {
    integer_application_across_the_lifecycle(Driver::NodePg);
}

#[test]
fn psycopg_prepared_statements_in_the_integer_shape_across_cutover_and_rollback() {
    integer_application_across_the_lifecycle(Driver::Psycopg);
}

#[test]
fn sqlalchemy_orm_integer_models_across_cutover_and_rollback() {
    integer_application_across_the_lifecycle(Driver::Sqlalchemy);
}

// ---- (b) both shapes side by side ----

#[test]

fn sqlalchemy_orm_uuid_models_beside_integer_models() {
    two_shapes_side_by_side(Driver::Sqlalchemy);
}

#[test]

fn asyncpg_in_both_shapes_side_by_side() {
    two_shapes_side_by_side(Driver::Asyncpg);
}

#[test]

fn pgjdbc_in_both_shapes_side_by_side() {
    two_shapes_side_by_side(Driver::Pgjdbc);
}

#[test]

fn node_postgres_in_both_shapes_side_by_side() {
    two_shapes_side_by_side(Driver::NodePg);
}

// ---- (d) every driver while the tables are in both shapes ----

/// `keyshift cutover --by-table` stopped halfway, then resumed: for a while `comments` and
/// `posts` have their uuids under the original names and `users` has not (phase
/// `cutting_over`). Every driver, in each shape it models, keeps the statements it prepared at
/// `hardened` through that state and the end of the cutover, and reads what the other shape
/// wrote in each of them.
#[test]
fn every_driver_in_both_shapes_through_a_cutover_table_by_table_stopped_halfway() {
    let mut lab = Lab::new();
    // A leaf no script uses, to hold up the cutover halfway: a group locks its own tables,
    // and the drop of an FK a group set aside locks the FK's parent too, so a blocker on
    // users, posts or comments would stop the cutover before audit. audit's group comes
    // after comments' and posts' and before users'.
    lab.rt
        .block_on(lab.direct.batch_execute(
            "CREATE TABLE audit (id serial PRIMARY KEY, user_id integer REFERENCES users (id));
             INSERT INTO audit (user_id) SELECT id FROM users",
        ))
        .unwrap();
    for step in ["expand", "backfill", "harden"] {
        lab.ks(&[step]);
    }
    let mut v1: Vec<Script> = Vec::new();
    let mut v2: Vec<Script> = Vec::new();
    for d in [
        Driver::Pgjdbc,
        Driver::Asyncpg,
        Driver::Psycopg,
        Driver::Sqlalchemy,
        Driver::NodePg,
    ] {
        v1.push(spawned(
            &lab,
            d,
            Shape::Integer,
            None,
            &format!("{}-v1", d.name()),
        ));
        // psycopg's script models an integer application only.
        if !matches!(d, Driver::Psycopg) {
            v2.push(spawned(
                &lab,
                d,
                Shape::Uuid,
                Some("uuid"),
                &format!("{}-v2", d.name()),
            ));
        }
    }
    let mut v1: Vec<Script> = v1.into_iter().map(Script::ready).collect();
    let mut v2: Vec<Script> = v2.into_iter().map(Script::ready).collect();
    let (mut by_v1, mut by_v2) = (Vec::new(), Vec::new());
    let mut round = |lab: &mut Lab, label: &str| {
        for s in &mut v1 {
            by_v1.extend(lab.step(s, Shape::Integer, label));
        }
        for s in &mut v2 {
            by_v2.extend(lab.step(s, Shape::Uuid, label));
        }
        for s in &mut v2 {
            lab.cross_check(s, label, &by_v1);
        }
        for s in v1.iter_mut().filter(|s| !s.who.starts_with("psycopg")) {
            lab.cross_check(s, label, &by_v2);
        }
    };
    round(&mut lab, "hardened");

    // A direct session reading audit keeps its group from its locks, under the gates and
    // under a pause of its own alike.
    let blocker = lab.rt.block_on(lab.db.client());
    lab.rt
        .block_on(blocker.batch_execute("BEGIN; LOCK TABLE audit IN ACCESS SHARE MODE"))
        .unwrap();
    let by_table = migrate_support::BY_TABLE_GIVING_UP;
    let out = ks(&lab.db.url(), &by_table);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let swapped: Vec<bool> = ["comments", "posts", "audit", "users"]
        .iter()
        .map(|t| lab.layout(t).physical_uuid)
        .collect();
    assert_eq!(swapped, [true, true, false, false], "{}", text(&out));
    lab.wait_rules();
    round(&mut lab, "halfway");

    lab.rt.block_on(blocker.batch_execute("ROLLBACK")).unwrap();
    lab.ks(&by_table);
    assert!(lab.layout("users").physical_uuid);
    round(&mut lab, "cut_over");
    let out = ks(&lab.db.url(), &["verify"]);
    if out.status.code() != Some(0) {
        lab.failures
            .push(format!("keyshift verify after the run:\n{}", text(&out)));
    }
    drop((v1, v2));
    lab.finish("every driver through a cutover table by table");
}

// ---- (c) bad input ----

/// A StartupMessage naming `keyshift.shape` directly (as asyncpg does) through the proxy;
/// the SQLSTATE and message of the ErrorResponse it gets, or None if it is accepted.
fn raw_startup_error(lab: &Lab, shape: &str) -> Option<(String, String)> {
    use std::io::Read;
    let mut body = 196608u32.to_be_bytes().to_vec();
    for (k, v) in [
        ("user", "postgres"),
        ("database", lab.db.name.as_str()),
        ("keyshift.shape", shape),
    ] {
        for part in [k, v] {
            body.extend_from_slice(part.as_bytes());
            body.push(0);
        }
    }
    body.push(0);
    let mut s = std::net::TcpStream::connect(lab.proxy.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&((body.len() + 4) as u32).to_be_bytes())
        .unwrap();
    s.write_all(&body).unwrap();
    // Trust auth: AuthenticationOk and the rest of the startup, unless an ErrorResponse.
    let msg = loop {
        let mut hdr = [0u8; 5];
        s.read_exact(&mut hdr).unwrap();
        let len = u32::from_be_bytes([hdr[1], hdr[2], hdr[3], hdr[4]]) as usize;
        let mut msg = vec![0u8; len - 4];
        s.read_exact(&mut msg).unwrap();
        match hdr[0] {
            b'E' => break msg,
            b'Z' => return None,
            _ => {}
        }
    };
    let field = |t: u8| {
        msg.split(|&b| b == 0)
            .find(|f| f.first() == Some(&t))
            .map(|f| String::from_utf8_lossy(&f[1..]).into_owned())
            .unwrap_or_default()
    };
    Some((field(b'C'), field(b'M')))
}

/// A tokio-postgres connection through the proxy with `options`: the libpq way.
fn connect_with_options(
    lab: &Lab,
    options: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let mut cfg: tokio_postgres::Config = lab.proxy.url("postgres", &lab.db.name).parse().unwrap();
    cfg.options(options);
    lab.rt.block_on(async {
        let (client, conn) = cfg.connect(tokio_postgres::NoTls).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    })
}

fn db_error(e: &tokio_postgres::Error) -> (String, String) {
    match e.as_db_error() {
        Some(d) => (d.code().code().to_string(), d.message().to_string()),
        None => (String::new(), e.to_string()),
    }
}

#[test]
fn an_unknown_shape_is_refused_with_22023() {
    let lab = Lab::new();
    lab.ks(&["expand"]);
    match connect_with_options(&lab, "-c keyshift.shape=bogus") {
        Ok(_) => panic!("options -c keyshift.shape=bogus was accepted"),
        Err(e) => {
            let (code, msg) = db_error(&e);
            assert_eq!(code, "22023", "{msg}");
            assert!(
                msg.contains("keyshift.shape") && msg.contains("bogus"),
                "{msg}"
            );
        }
    }
    match raw_startup_error(&lab, "bogus") {
        None => panic!("the startup parameter keyshift.shape=bogus was accepted"),
        Some((code, msg)) => {
            assert_eq!(code, "22023", "{msg}");
            assert!(msg.contains("keyshift.shape"), "{msg}");
        }
    }
}

#[test]
fn the_uuid_shape_before_harden_is_refused_saying_when_it_will_work() {
    let lab = Lab::new();
    lab.ks(&["expand"]);
    // backfill hardens unless told not to.
    lab.ks(&["backfill", "--skip-harden"]);
    let refused = |how: &str, got: Option<(String, String)>| {
        let (code, msg) = got.unwrap_or_else(|| panic!("{how}: uuid before harden was accepted"));
        assert!(
            msg.contains("harden") && msg.contains("uuid"),
            "{how}: the refusal must say when uuid will work (after harden): [{code}] {msg}"
        );
        println!("{how}: [{code}] {msg}");
    };
    refused(
        "options",
        connect_with_options(&lab, "-c keyshift.shape=uuid")
            .err()
            .map(|e| db_error(&e)),
    );
    refused("startup parameter", raw_startup_error(&lab, "uuid"));
    // The integer shape is served, and uuid is once hardened.
    assert!(connect_with_options(&lab, "-c keyshift.shape=integer").is_ok());
    lab.ks(&["harden"]);
    if let Err(e) = connect_with_options(&lab, "-c keyshift.shape=uuid") {
        panic!("uuid after harden: {:?}", db_error(&e));
    }
}

#[test]
fn set_keyshift_shape_mid_session_is_an_error_and_the_shape_stays() {
    let lab = Lab::new();
    for step in ["expand", "backfill", "harden"] {
        lab.ks(&[step]);
    }
    let c = connect_with_options(&lab, "-c keyshift.shape=integer").expect("integer session");
    let id_type = |c: &tokio_postgres::Client, when: &str| {
        let rows = lab
            .rt
            .block_on(c.query("SELECT id, name FROM users WHERE name = 'u1'", &[]))
            .unwrap_or_else(|e| panic!("{when}: {e:?}"));
        rows[0].columns()[0].type_().name().to_string()
    };
    for sql in [
        "SET keyshift.shape = 'uuid'",
        "SET SESSION keyshift.shape TO uuid",
        "SET LOCAL keyshift.shape = 'uuid'",
    ] {
        match lab.rt.block_on(c.batch_execute(sql)) {
            Ok(()) => panic!("{sql}: accepted"),
            Err(e) => {
                let (code, msg) = db_error(&e);
                assert!(msg.contains("keyshift.shape"), "{sql}: [{code}] {msg}");
                println!("{sql}: [{code}] {msg}");
            }
        }
        assert_eq!(id_type(&c, sql), "int4", "after {sql}");
    }
    // The shape holds through the swap: still the integer `id`.
    lab.ks(&["cutover"]);
    assert_eq!(id_type(&c, "after cutover"), "int4");
}

// ---- (d) COPY … FROM STDIN through each driver's COPY API ----

/// Where a copied row points, by name: a post's user, a comment's post and author (None for
/// a NULL author, and for posts).
#[derive(Debug, Clone, PartialEq)]
struct CopiedLink {
    parent: String,
    author: Option<String>,
}

/// Every row copied so far, (table, name) → the link the script copied it with.
type Copied = std::collections::BTreeMap<(String, String), CopiedLink>;

/// The FKs of [`SCHEMA`]: (child, FK column, parent).
const FKS: [(&str, &str, &str); 3] = [
    ("posts", "user_id", "users"),
    ("comments", "post_id", "posts"),
    ("comments", "author_id", "users"),
];

impl Lab {
    /// The suffix of the side that is not the truth: the uuid twins before cutover, the
    /// legacy integers after it.
    fn twin(&self) -> &'static str {
        if self.layout("users").physical_uuid {
            "_legacy"
        } else {
            "_uuid"
        }
    }

    /// Rows whose non-truth side disagrees with their parent, over every FK (0 when every
    /// twin is right).
    fn wrong_twins(&self) -> i64 {
        let tw = self.twin();
        FKS.iter()
            .map(|(child, fk, parent)| {
                self.query(
                    &format!(
                        "SELECT count(*) FROM {child} x LEFT JOIN {parent} p ON p.id = x.{fk} \
                         WHERE x.{fk}{tw} IS DISTINCT FROM p.id{tw}"
                    ),
                    &[],
                )[0]
                .get::<_, i64>(0)
            })
            .sum()
    }

    /// A copied row as the database holds it: its link read through the truth side (the
    /// original column names, in either physical shape), or what is wrong with its other side.
    fn copied_link(&self, table: &str, name: &str) -> Result<CopiedLink, String> {
        let tw = self.twin();
        // Per FK: the parent's name, then the twin the row holds and the parent's twin.
        let (sql, fks) = if table == "posts" {
            let sql = format!(
                "SELECT u.name, NULL::text, x.id{tw}::text, ARRAY[x.user_id{tw}::text, u.id{tw}::text] \
                 FROM posts x LEFT JOIN users u ON u.id = x.user_id WHERE x.title = $1"
            );
            (sql, &["user_id"][..])
        } else {
            let sql = format!(
                "SELECT p.title, a.name, x.id{tw}::text, \
                        ARRAY[x.post_id{tw}::text, p.id{tw}::text, x.author_id{tw}::text, a.id{tw}::text] \
                 FROM comments x LEFT JOIN posts p ON p.id = x.post_id LEFT JOIN users a ON a.id = x.author_id \
                 WHERE x.body = $1"
            );
            (sql, &["post_id", "author_id"][..])
        };
        let rows = self.query(&sql, &[&name]);
        let [r] = &rows[..] else {
            return Err(format!("{} rows, want 1", rows.len()));
        };
        let (own_twin, twins): (Option<String>, Vec<Option<String>>) = (r.get(2), r.get(3));
        if own_twin.is_none() {
            return Err(format!("its own id{tw} is NULL"));
        }
        for (fk, pair) in fks.iter().zip(twins.chunks(2)) {
            if pair[0] != pair[1] {
                return Err(format!(
                    "{fk}{tw} is {:?}, its parent's id{tw} {:?}",
                    pair[0], pair[1]
                ));
            }
        }
        let parent: Option<String> = r.get(0);
        Ok(CopiedLink {
            parent: parent.ok_or("its parent is not in the database")?,
            author: r.get(1),
        })
    }

    /// `copy <label>` in `s`: every row it copied must be in the database linked to the
    /// parents the script named, both sides right; recorded in `copied`.
    fn copy(&mut self, s: &mut Script, label: &str, copied: &mut Copied) {
        let rows = match s.call(&format!("copy {label}")) {
            Ok(v) => v["rows"].as_array().cloned().unwrap_or_default(),
            Err(e) => {
                self.failures
                    .push(format!("{} copying at {label}: {e}", s.who));
                return;
            }
        };
        // 3 posts and 6 comments: each format into each table.
        if rows.len() != 9 {
            self.failures.push(format!(
                "{} copying at {label}: reported {} rows, want 9",
                s.who,
                rows.len()
            ));
        }
        for r in rows {
            let (table, name) = (r["table"].as_str().unwrap(), r["name"].as_str().unwrap());
            let want = CopiedLink {
                parent: r["parent"].as_str().unwrap().to_string(),
                author: r["author"].as_str().map(String::from),
            };
            match self.copied_link(table, name) {
                Ok(got) if got == want => {}
                Ok(got) => self.failures.push(format!(
                    "{} copying at {label}: {table} {name:?} was copied as {want:?}; the database holds {got:?}",
                    s.who
                )),
                Err(e) => self.failures.push(format!(
                    "{} copying at {label}: {table} {name:?}: {e}",
                    s.who
                )),
            }
            copied.insert((table.to_string(), name.to_string()), want);
        }
    }

    /// Every row copied so far, row by row: still linked where it was copied to, both sides
    /// right; and no row of any FK has its other side wrong.
    fn recheck(&mut self, label: &str, copied: &Copied) {
        let mut wrong = Vec::new();
        for ((table, name), want) in copied {
            match self.copied_link(table, name) {
                Ok(got) if got == *want => {}
                got => wrong.push(format!("{table} {name:?}: copied as {want:?}, now {got:?}")),
            }
        }
        if !wrong.is_empty() {
            self.failures.push(format!(
                "rechecking at {label}: {} of {} copied rows lost their link or twin: {}",
                wrong.len(),
                copied.len(),
                wrong.join("; ")
            ));
        }
        let n = self.wrong_twins();
        if n != 0 {
            self.failures.push(format!(
                "rechecking at {label}: {n} rows whose other side disagrees with their parent"
            ));
        }
    }
}

/// `driver`'s COPY API (pgjdbc's CopyManager, node-postgres' pg-copy-streams) writes posts and
/// comments in text, csv and binary at every phase from hardened through cutover, rollback
/// and cutover again: an unchanged integer application (no shape parameter: its COPY is
/// translated after cutover) and a uuid-shaped session (translated before cutover and after
/// the rollback), each on one connection throughout. The proxy renames a translated COPY's
/// columns and fills nothing; the fill triggers fill the other side. After each step every
/// row copied so far is checked against what the script copied, and `verify` passes at the
/// end.
fn copy_in_every_format_across_cutover_and_rollback(driver: Driver) {
    if let Driver::NodePg = driver {
        require(
            &drivers_dir().join("node_modules/pg-copy-streams/package.json"),
            "pg-copy-streams",
        );
    }
    let mut lab = Lab::new();
    // backfill hardens unless told not to: the uuid shape is served from here on.
    for step in ["expand", "backfill"] {
        lab.ks(&[step]);
    }
    let v1 = spawned(&lab, driver, Shape::Integer, None, "v1");
    let v2 = spawned(&lab, driver, Shape::Uuid, Some("uuid"), "v2");
    let (mut v1, mut v2) = (v1.ready(), v2.ready());
    let mut copied = Copied::new();
    for (args, label) in [
        (&[][..], "hardened"),
        (&["cutover"], "cut_over"),
        (&["rollback"], "rolled_back"),
        (&["cutover"], "cut_over_again"),
    ] {
        if !args.is_empty() {
            // verify refuses a cutover over wrong twins: fail with what the copies left.
            if !lab.failures.is_empty() {
                return lab.finish(&format!("{} COPY, before {args:?}", driver.name()));
            }
            lab.ks(args);
        }
        lab.recheck(label, &copied);
        lab.copy(&mut v1, label, &mut copied);
        lab.copy(&mut v2, label, &mut copied);
    }
    lab.recheck("the end", &copied);
    let out = ks(&lab.db.url(), &["verify"]);
    if out.status.code() != Some(0) {
        lab.failures
            .push(format!("keyshift verify after the run:\n{}", text(&out)));
    }
    drop((v1, v2));
    lab.finish(&format!("{} COPY", driver.name()));
}

#[test]
fn pgjdbc_copy_manager_in_every_format_across_cutover_and_rollback() {
    copy_in_every_format_across_cutover_and_rollback(Driver::Pgjdbc);
}

#[test]
fn node_postgres_pg_copy_streams_in_every_format_across_cutover_and_rollback() {
    copy_in_every_format_across_cutover_and_rollback(Driver::NodePg);
}
