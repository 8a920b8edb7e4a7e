//! A throwaway PgBouncer for the tests of keyshift with a connection pooler
//! (tests/poolers.rs): behind keyshift (in front of the harness's PostgreSQL, [`PgBouncer::start`])
//! or in front of it ([`Options::databases`] pointing at keyshift's port). Debian's package
//! installs it as `/usr/sbin/pgbouncer` (`.ci/run` installs it); a PgBouncer with
//! `max_prepared_statements` (1.21 or later), which Debian bookworm does not have, is built from
//! Debian trixie's source package by `.ci/run` into `target/pgbouncer-trixie/pgbouncer`
//! ([`newer`]). PgBouncer refuses to run as root, so as root it runs as the `postgres` OS
//! user, like the clusters. It is killed with the thread that started it (`PR_SET_PDEATHSIG`)
//! and stopped on drop.
//!
//! Authentication: clients are trusted (`auth_type = trust`, the harness's superuser in
//! `auth_file`); towards its servers PgBouncer logs in as the client's user, or as the `user=`
//! of a `[databases]` entry, and whatever the server asks (PostgreSQL's pg_hba, relayed by
//! keyshift when PgBouncer is in front of it) it answers with the `password=` of the entry or
//! the `auth_file`'s. The harness's cluster trusts every user on 127.0.0.1 but the few
//! created with a password (tests/common/mod.rs).
#![allow(dead_code)]

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::server;

/// Debian's package (bookworm: 1.18).
const BINARY: &str = "/usr/sbin/pgbouncer";

/// Where `.ci/run` builds Debian trixie's PgBouncer (1.24), relative to the crate.
const NEWER: &str = "target/pgbouncer-trixie/pgbouncer";

/// PgBouncer's `pool_mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolMode {
    Session,
    Transaction,
}

impl PoolMode {
    fn as_str(self) -> &'static str {
        match self {
            PoolMode::Session => "session",
            PoolMode::Transaction => "transaction",
        }
    }
}

/// How to start one.
#[derive(Debug, Clone)]
pub struct Options {
    pub mode: PoolMode,
    /// `default_pool_size`: server connections per database and user.
    pub pool_size: usize,
    /// `[databases]` entries, name and connection string ([`to`]); none: `*` pointing at the
    /// harness's PostgreSQL.
    pub databases: Vec<(String, String)>,
    /// More `[pgbouncer]` settings, e.g. `max_prepared_statements`.
    pub settings: Vec<(String, String)>,
    /// The binary; Debian's when `None`.
    pub binary: Option<PathBuf>,
}

impl Options {
    pub fn new(mode: PoolMode, pool_size: usize) -> Options {
        Options {
            mode,
            pool_size,
            databases: Vec::new(),
            settings: Vec::new(),
            binary: None,
        }
    }

    /// Adds a `[databases]` entry.
    pub fn database(mut self, name: &str, connstr: String) -> Options {
        self.databases.push((name.to_string(), connstr));
        self
    }

    /// Adds a `[pgbouncer]` setting.
    pub fn setting(mut self, key: &str, value: &str) -> Options {
        self.settings.push((key.to_string(), value.to_string()));
        self
    }
}

/// A `[databases]` connection string: the server at `addr` (`host:port`, e.g. keyshift's
/// listener), its database `dbname`, then `extra` as written (`user=…`, `application_name=…`).
pub fn to(addr: &str, dbname: &str, extra: &str) -> String {
    let (host, port) = addr.rsplit_once(':').expect("host:port");
    format!("host={host} port={port} dbname={dbname} {extra}")
        .trim_end()
        .to_string()
}

/// The PgBouncer with `max_prepared_statements` that `.ci/run` builds (or
/// `KEYSHIFT_TEST_PGBOUNCER_NEWER`), when there is one: `None`, with a message saying how to
/// get it, otherwise.
pub fn newer() -> Option<PathBuf> {
    let path = match std::env::var_os("KEYSHIFT_TEST_PGBOUNCER_NEWER") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join(NEWER),
    };
    if !path.is_file() {
        eprintln!(
            "SKIPPED: this test needs PgBouncer 1.21 or later at {} (`.ci/run` builds Debian trixie's source package there; or set KEYSHIFT_TEST_PGBOUNCER_NEWER)",
            path.display()
        );
        return None;
    }
    let version = version(&path);
    assert!(
        version >= (1, 21),
        "{} is PgBouncer {version:?}: max_prepared_statements needs 1.21 or later",
        path.display()
    );
    Some(path)
}

/// `pgbouncer --version`'s first line, as (major, minor).
pub fn version(binary: &Path) -> (u32, u32) {
    let out = Command::new(binary)
        .arg("--version")
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", binary.display()));
    let text = String::from_utf8_lossy(&out.stdout);
    let v = text
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("PgBouncer "))
        .unwrap_or_else(|| panic!("{}: unexpected --version: {text}", binary.display()));
    let mut parts = v.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// A running PgBouncer, stopped on drop.
pub struct PgBouncer {
    child: Child,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl PgBouncer {
    /// Starts Debian's PgBouncer in `mode` in front of the harness's PostgreSQL, with
    /// `pool_size` server connections per database and user (fewer than the clients, so that a
    /// client's transactions move between them). `None` (with a message saying so) when
    /// PgBouncer is not installed.
    pub fn start(mode: PoolMode, pool_size: usize) -> Option<PgBouncer> {
        Self::start_with(Options::new(mode, pool_size))
    }

    /// Starts PgBouncer as `o` says. `None` (with a message saying so) when Debian's PgBouncer
    /// is asked for and not installed.
    pub fn start_with(o: Options) -> Option<PgBouncer> {
        let binary = o.binary.clone().unwrap_or_else(|| PathBuf::from(BINARY));
        if !binary.is_file() {
            eprintln!(
                "SKIPPED: this test needs PgBouncer at {} (`apt-get install pgbouncer`; .ci/run installs it)",
                binary.display()
            );
            return None;
        }
        let srv = server();
        let run_as = run_as();
        let dir = tempfile::Builder::new()
            .prefix("keyshift-pgbouncer-")
            .tempdir()
            .expect("temp dir for PgBouncer");
        let port = super::proxy::free_port();
        let ini = dir.path().join("pgbouncer.ini");
        let users = dir.path().join("userlist.txt");
        let log = dir.path().join("pgbouncer.log");
        let databases = if o.databases.is_empty() {
            format!("* = host={} port={}\n", srv.host, srv.port)
        } else {
            o.databases
                .iter()
                .map(|(name, connstr)| format!("{name} = {connstr}\n"))
                .collect()
        };
        let settings: String = o
            .settings
            .iter()
            .map(|(k, v)| format!("{k} = {v}\n"))
            .collect();
        let text = format!(
            "[databases]\n\
             {databases}\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {port}\n\
             unix_socket_dir =\n\
             auth_type = trust\n\
             auth_file = {users}\n\
             admin_users = {user}\n\
             pool_mode = {mode}\n\
             default_pool_size = {pool_size}\n\
             max_client_conn = 500\n\
             ignore_startup_parameters = extra_float_digits,options\n\
             logfile = {log}\n\
             log_connections = 0\n\
             log_disconnections = 0\n\
             {settings}",
            users = users.display(),
            user = srv.user,
            mode = o.mode.as_str(),
            pool_size = o.pool_size,
            log = log.display(),
        );
        std::fs::write(&ini, text).unwrap();
        std::fs::write(&users, format!("\"{}\" \"\"\n", srv.user)).unwrap();
        if let Some((uid, gid)) = run_as {
            for p in [dir.path(), &ini, &users] {
                std::os::unix::fs::chown(p, Some(uid), Some(gid)).unwrap();
            }
        }
        let mut cmd = Command::new(&binary);
        cmd.arg(&ini)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: only async-signal-safe libc calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if let Some((uid, gid)) = run_as
                    && (libc::setgroups(0, std::ptr::null()) != 0
                        || libc::setgid(gid) != 0
                        || libc::setuid(uid) != 0)
                {
                    return Err(std::io::Error::last_os_error());
                }
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.spawn().expect("spawn pgbouncer");
        let mut b = PgBouncer { child, port, dir };
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = b.child.try_wait() {
                panic!("pgbouncer exited ({status}):\n{}", b.log());
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "pgbouncer did not start listening:\n{}",
                b.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(b)
    }

    /// `host:port`, for keyshift's `upstream`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// A connection URL to `dbname` (a database or a `[databases]` entry) through PgBouncer,
    /// as the harness's superuser.
    pub fn url(&self, dbname: &str) -> String {
        format!(
            "postgres://{}@127.0.0.1:{}/{dbname}",
            server().user,
            self.port
        )
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("pgbouncer.log")
    }
}
impl Drop for PgBouncer {
    /// PgBouncer 1.18 exits at once on SIGTERM; from 1.23 on SIGTERM waits for every client to
    /// disconnect, and a second one exits at once.
    fn drop(&mut self) {
        let pid = self.child.id() as i32;
        for _ in 0..50 {
            unsafe { libc::kill(pid, libc::SIGTERM) };
            std::thread::sleep(Duration::from_millis(20));
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `postgres` OS user's ids when running as root.
fn run_as() -> Option<(u32, u32)> {
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let name = std::ffi::CString::new("postgres").unwrap();
    // SAFETY: getpwnam returns a pointer into static storage; the ids are copied out at once.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    assert!(
        !pw.is_null(),
        "running as root without a `postgres` OS user to run PgBouncer as"
    );
    unsafe { Some(((*pw).pw_uid, (*pw).pw_gid)) }
}
