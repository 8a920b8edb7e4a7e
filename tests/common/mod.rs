//! Shared test harness: one throwaway PostgreSQL cluster per test binary, one database per test.
//!
//! `KEYSHIFT_TEST_DATABASE_URL` (a superuser URL, e.g. `postgres://postgres@127.0.0.1:5432/postgres`)
//! points the tests at an existing server instead; each test still gets a database of its own.
#![allow(dead_code)]

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

use keyshift::pgcluster::{Cluster, ClusterOptions};

pub mod pgbouncer;
pub mod proxy;

/// Users with a password and a specific auth method, created in the throwaway cluster.
pub const SCRAM_USER: (&str, &str) = ("scram_user", "scr4m-secret");
pub const MD5_USER: (&str, &str) = ("md5_user", "md5-secret");
pub const PASSWORD_USER: (&str, &str) = ("pw_user", "plain-secret");

/// Where the test server is: host, port, superuser.
pub struct Server {
    pub host: String,
    pub port: u16,
    pub user: String,
    /// Set when the harness started the server itself.
    pub bin_dir: Option<std::path::PathBuf>,
}

impl Server {
    pub fn url(&self, dbname: &str) -> String {
        format!(
            "postgres://{}@{}:{}/{dbname}",
            self.user, self.host, self.port
        )
    }
    pub fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

static SERVER: OnceLock<Server> = OnceLock::new();
static CLUSTER_PTR: OnceLock<usize> = OnceLock::new();

extern "C" fn stop_cluster() {
    if let Some(ptr) = CLUSTER_PTR.get() {
        // SAFETY: the pointer comes from Box::into_raw below and is dropped only here, at exit.
        unsafe { drop(Box::from_raw(*ptr as *mut Cluster)) };
    }
}

/// The shared server, started on first use.
pub fn server() -> &'static Server {
    SERVER.get_or_init(|| {
        if let Ok(url) = std::env::var("KEYSHIFT_TEST_DATABASE_URL") {
            let cfg: tokio_postgres::Config = url.parse().expect("KEYSHIFT_TEST_DATABASE_URL");
            let host = match cfg.get_hosts().first() {
                Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
                _ => "127.0.0.1".into(),
            };
            return Server {
                host,
                port: cfg.get_ports().first().copied().unwrap_or(5432),
                user: cfg.get_user().unwrap_or("postgres").to_string(),
                bin_dir: None,
            };
        }
        let opts = ClusterOptions {
            settings: vec![
                ("max_connections".into(), "300".into()),
                ("max_locks_per_transaction".into(), "256".into()),
            ],
            auth_users: vec![
                (
                    SCRAM_USER.0.into(),
                    "scram-sha-256".into(),
                    SCRAM_USER.1.into(),
                ),
                (MD5_USER.0.into(), "md5".into(), MD5_USER.1.into()),
                (
                    PASSWORD_USER.0.into(),
                    "password".into(),
                    PASSWORD_USER.1.into(),
                ),
            ],
        };
        // Started from a thread that lives as long as the process: the server is tied to the
        // lifetime of the thread that spawned it (PR_SET_PDEATHSIG).
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            match Cluster::start(&opts) {
                Ok(c) => {
                    let info = (c.port(), c.bin_dir().to_path_buf());
                    let _ = CLUSTER_PTR.set(Box::into_raw(Box::new(c)) as usize);
                    unsafe { libc::atexit(stop_cluster) };
                    let _ = tx.send(Ok(info));
                }
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                    return;
                }
            }
            loop {
                std::thread::park();
            }
        });
        let (port, bin) = match rx.recv().expect("cluster thread") {
            Ok(info) => info,
            Err(e) => panic!("could not start the test PostgreSQL: {e}"),
        };
        Server {
            host: "127.0.0.1".into(),
            port,
            user: "postgres".into(),
            bin_dir: Some(bin),
        }
    })
}

/// `pg_dump --schema-only` of the database at `url` (no publications or subscriptions),
/// with pg_dump's comments, `SET` lines and `\restrict` brackets (15.14+, a random key)
/// removed: what two databases holding the same objects print alike.
pub fn schema_dump(url: &str) -> String {
    let out = std::process::Command::new(pg_tool("pg_dump"))
        .args(["--schema-only", "--no-publications", "--no-subscriptions"])
        .arg(url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pg_dump: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("--") && !l.starts_with("SET ") && !l.is_empty())
        .filter(|l| !l.starts_with("SELECT pg_catalog.set_config"))
        .filter(|l| !l.starts_with("\\restrict") && !l.starts_with("\\unrestrict"))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// Path of a PostgreSQL client tool (psql, pgbench, pg_dump): next to the server binaries, then
/// PATH. Panics with what to install when it is missing: a test must not pass silently.
pub fn pg_tool(name: &str) -> std::path::PathBuf {
    if let Some(dir) = &server().bin_dir {
        let p = dir.join(name);
        if p.is_file() {
            return p;
        }
    }
    if let Some(dir) = keyshift::pgcluster::find_bin_dir() {
        let p = dir.join(name);
        if p.is_file() {
            return p;
        }
    }
    if let Ok(path) = std::env::var("PATH") {
        for d in std::env::split_paths(&path) {
            if d.join(name).is_file() {
                return d.join(name);
            }
        }
    }
    panic!(
        "this test needs `{name}`; install the PostgreSQL client tools (e.g. `apt-get install postgresql-client`)"
    );
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A database of its own for one test.
pub struct TestDb {
    pub name: String,
}

impl TestDb {
    pub async fn new() -> TestDb {
        let srv = server();
        let name = format!(
            "t_{}_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst),
            rand::random::<u16>()
        );
        let admin = connect(&srv.url("postgres")).await;
        admin
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .expect("create test database");
        TestDb { name }
    }

    pub fn url(&self) -> String {
        server().url(&self.name)
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        connect(&self.url()).await
    }
}

/// Connects without TLS and drives the connection on a background task.
pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// Runs pgbench against `127.0.0.1:port`, database `db`; panics with its output unless it
/// succeeds. Returns stdout and stderr together (pgbench reports on both).
pub fn pgbench(port: u16, db: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(pg_tool("pgbench"))
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
        .args(args)
        .arg(db)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "pgbench {args:?}: {text}");
    text
}
