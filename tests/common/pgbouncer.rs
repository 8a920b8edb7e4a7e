//! A throwaway PgBouncer in front of the harness's PostgreSQL, for the tests of keyshift with
//! a connection pooler (tests/poolers.rs). Debian's package installs it as
//! `/usr/sbin/pgbouncer` (`.ci/run` installs it); it refuses to run as root, so as root it
//! runs as the `postgres` OS user, like the clusters. It dies with the thread that started it
//! (`PR_SET_PDEATHSIG`) and is stopped on drop.
#![allow(dead_code)]

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::server;

const BINARY: &str = "/usr/sbin/pgbouncer";

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

/// A running PgBouncer, stopped on drop.
pub struct PgBouncer {
    child: Child,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl PgBouncer {
    /// Starts PgBouncer in `mode` with `pool_size` server connections per database and user
    /// (fewer than the clients, so that a client's transactions move between them). `None`
    /// (with a message saying so) when PgBouncer is not installed.
    pub fn start(mode: PoolMode, pool_size: usize) -> Option<PgBouncer> {
        if !Path::new(BINARY).is_file() {
            eprintln!(
                "SKIPPED: this test needs PgBouncer at {BINARY} (`apt-get install pgbouncer`; .ci/run installs it)"
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
        let text = format!(
            "[databases]\n\
             * = host={host} port={pg_port}\n\
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
             log_disconnections = 0\n",
            host = srv.host,
            pg_port = srv.port,
            users = users.display(),
            user = srv.user,
            mode = mode.as_str(),
            log = log.display(),
        );
        std::fs::write(&ini, text).unwrap();
        std::fs::write(&users, format!("\"{}\" \"\"\n", srv.user)).unwrap();
        if let Some((uid, gid)) = run_as {
            for p in [dir.path(), &ini, &users] {
                std::os::unix::fs::chown(p, Some(uid), Some(gid)).unwrap();
            }
        }
        let mut cmd = Command::new(BINARY);
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
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGINT);
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

    /// A connection URL to `dbname` through PgBouncer alone.
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
    fn drop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
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
