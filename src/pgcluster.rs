//! A throwaway PostgreSQL cluster started from the local server binaries.
//!
//! Used by the test suite (every test binary starts one) and by `keyshift demo`. PostgreSQL
//! refuses to run as root, so when we are root the server runs as the `postgres` OS user.
//! The postmaster is tied to the process that started it (`PR_SET_PDEATHSIG`), so a test
//! run that is killed does not leave servers behind.

use std::ffi::CString;
use std::fs;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(
        "no PostgreSQL server binaries found (looked for `initdb` and `postgres` in $KEYSHIFT_PG_BIN, on PATH and under /usr/lib/postgresql/*/bin); install PostgreSQL 13 or newer: `apt-get install postgresql` (Debian, Ubuntu), `dnf install postgresql-server` (Fedora, RHEL), `brew install postgresql@16` (macOS), or point $KEYSHIFT_PG_BIN at a directory holding `initdb` and `postgres`"
    )]
    NoBinaries,
    #[error(
        "running as root but there is no `postgres` OS user to run the server as; create one (`useradd -r postgres`) or run as a non-root user"
    )]
    NoPostgresUser,
    #[error("{what} failed: {detail}")]
    Command { what: String, detail: String },
    #[error("PostgreSQL did not accept connections within {0:?}; its log:\n{1}")]
    NotReady(Duration, String),
    #[error("i/o error while {0}: {1}")]
    Io(&'static str, io::Error),
}

/// Options for a throwaway cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Extra `-c name=value` settings passed to the postmaster.
    pub settings: Vec<(String, String)>,
    /// Roles created with these auth methods in pg_hba (user name, method, password).
    pub auth_users: Vec<(String, String, String)>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            settings: vec![("max_connections".into(), "200".into())],
            auth_users: Vec::new(),
        }
    }
}

/// A running PostgreSQL cluster; stopped and deleted on drop.
pub struct Cluster {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    child: Option<Child>,
    run_as: Option<(u32, u32)>,
}

impl Cluster {
    /// Starts a new cluster on a free loopback port. The superuser is `postgres`, trusted on
    /// loopback, except for the roles in `opts.auth_users`, which use their own auth method.
    pub fn start(opts: &ClusterOptions) -> Result<Cluster, ClusterError> {
        let bin = find_bin_dir().ok_or(ClusterError::NoBinaries)?;
        let run_as = if unsafe { libc::geteuid() } == 0 {
            Some(lookup_user("postgres").ok_or(ClusterError::NoPostgresUser)?)
        } else {
            None
        };
        cleanup_stale_dirs();
        let dir = make_dir(run_as)?;
        let data = dir.join("data");
        let mut cluster = Cluster {
            dir: dir.clone(),
            bin: bin.clone(),
            port: 0,
            child: None,
            run_as,
        };

        let out = cluster
            .command("initdb")
            .args(["-D"])
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "-N",
                "-E",
                "UTF8",
                "--locale=C",
            ])
            .output()
            .map_err(|e| ClusterError::Io("running initdb", e))?;
        if !out.status.success() {
            return Err(ClusterError::Command {
                what: "initdb".into(),
                detail: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }

        // Specific users first: pg_hba is first-match.
        let mut hba = String::new();
        for (user, method, _) in &opts.auth_users {
            hba.push_str(&format!("host all {user} 127.0.0.1/32 {method}\n"));
            hba.push_str(&format!("host all {user} ::1/128 {method}\n"));
        }
        hba.push_str(
            "local all all trust\nhost all all 127.0.0.1/32 trust\nhost all all ::1/128 trust\n",
        );
        write_as(&data.join("pg_hba.conf"), &hba, run_as)?;

        cluster.port = free_port()?;
        let log = fs::File::create(dir.join("postgres.log"))
            .map_err(|e| ClusterError::Io("creating the server log", e))?;
        let log2 = log
            .try_clone()
            .map_err(|e| ClusterError::Io("creating the server log", e))?;
        let mut cmd = cluster.command("postgres");
        cmd.arg("-D")
            .arg(&data)
            .args(["-p", &cluster.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", dir.display()))
            .args(["-c", "fsync=off", "-c", "full_page_writes=off"])
            .args(["-c", "synchronous_commit=off"])
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2));
        for (k, v) in &opts.settings {
            cmd.arg("-c").arg(format!("{k}={v}"));
        }
        let child = cmd
            .spawn()
            .map_err(|e| ClusterError::Io("starting postgres", e))?;
        cluster.child = Some(child);
        cluster.wait_ready(Duration::from_secs(30))?;

        for (user, method, password) in &opts.auth_users {
            // md5 needs the password stored as md5, the others as SCRAM.
            let enc = if method == "md5" {
                "md5"
            } else {
                "scram-sha-256"
            };
            let sql = format!(
                "SET password_encryption = '{enc}'; CREATE ROLE \"{user}\" LOGIN SUPERUSER PASSWORD '{}';",
                password.replace('\'', "''")
            );
            cluster.psql(&sql)?;
        }
        Ok(cluster)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn bin_dir(&self) -> &Path {
        &self.bin
    }

    /// A libpq-style URL for `user` and `dbname` over TCP.
    pub fn url(&self, user: &str, dbname: &str) -> String {
        format!("postgres://{user}@127.0.0.1:{}/{dbname}", self.port)
    }

    /// Runs SQL as the superuser through `psql` (used for setup, before any Rust client exists).
    pub fn psql(&self, sql: &str) -> Result<String, ClusterError> {
        let out = Command::new(self.bin.join("psql"))
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-At"])
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
            ])
            .args(["-d", "postgres", "-c", sql])
            .output()
            .map_err(|e| ClusterError::Io("running psql", e))?;
        if !out.status.success() {
            return Err(ClusterError::Command {
                what: format!("psql -c {sql:?}"),
                detail: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default()
    }

    fn wait_ready(&mut self, limit: Duration) -> Result<(), ClusterError> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(ClusterError::Command {
                    what: "postgres".into(),
                    detail: format!("exited with {status}:\n{}", self.log()),
                });
            }
            if TcpStream::connect_timeout(&self.addr(), Duration::from_millis(200)).is_ok() {
                let ok = Command::new(self.bin.join("pg_isready"))
                    .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
                    .status()
                    .map(|s| s.success())
                    .unwrap_or(false);
                if ok {
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(ClusterError::NotReady(limit, self.log()))
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(program));
        cmd.env_remove("PGDATA").current_dir(&self.dir);
        let run_as = self.run_as;
        // SAFETY: only async-signal-safe libc calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if let Some((uid, gid)) = run_as {
                    if libc::setgroups(0, std::ptr::null()) != 0
                        || libc::setgid(gid) != 0
                        || libc::setuid(uid) != 0
                    {
                        return Err(io::Error::last_os_error());
                    }
                }
                // The server dies with the thread that started it; see `Cluster` docs.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGINT);
                Ok(())
            });
        }
        cmd
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            unsafe {
                libc::kill(child.id() as i32, libc::SIGINT);
            }
            let _ = child.wait();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Finds a directory holding `initdb` and `postgres`: `$KEYSHIFT_PG_BIN`, then PATH, then the
/// newest `/usr/lib/postgresql/<version>/bin` (Debian and Ubuntu keep them off PATH).
pub fn find_bin_dir() -> Option<PathBuf> {
    let has = |d: &Path| d.join("initdb").is_file() && d.join("postgres").is_file();
    if let Ok(d) = std::env::var("KEYSHIFT_PG_BIN") {
        let d = PathBuf::from(d);
        if has(&d) {
            return Some(d);
        }
    }
    if let Ok(path) = std::env::var("PATH") {
        for d in std::env::split_paths(&path) {
            if has(&d) {
                // PATH often holds symlinks (/usr/local/bin/initdb); the other tools we need
                // (pg_isready, psql, pgbench) sit next to the real files.
                let real = std::fs::canonicalize(d.join("initdb"))
                    .ok()
                    .and_then(|p| p.parent().map(Path::to_path_buf))
                    .filter(|r| has(r));
                return Some(real.unwrap_or(d));
            }
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            has(&bin).then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, d)| d)
}

fn lookup_user(name: &str) -> Option<(u32, u32)> {
    let cname = CString::new(name).ok()?;
    // SAFETY: getpwnam returns a pointer into static storage; we copy the ids out at once.
    let pw = unsafe { libc::getpwnam(cname.as_ptr()) };
    if pw.is_null() {
        return None;
    }
    unsafe { Some(((*pw).pw_uid, (*pw).pw_gid)) }
}

fn make_dir(run_as: Option<(u32, u32)>) -> Result<PathBuf, ClusterError> {
    let base = std::env::temp_dir();
    for _ in 0..100 {
        let dir = base.join(format!(
            "keyshift-pg-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        match fs::create_dir(&dir) {
            Ok(()) => {
                fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
                    .map_err(|e| ClusterError::Io("setting permissions", e))?;
                if let Some((uid, gid)) = run_as {
                    std::os::unix::fs::chown(&dir, Some(uid), Some(gid))
                        .map_err(|e| ClusterError::Io("chown of the cluster directory", e))?;
                }
                return Ok(dir);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(ClusterError::Io("creating the cluster directory", e)),
        }
    }
    Err(ClusterError::Io(
        "creating the cluster directory",
        io::Error::other("no free name"),
    ))
}

fn write_as(path: &Path, text: &str, run_as: Option<(u32, u32)>) -> Result<(), ClusterError> {
    fs::write(path, text).map_err(|e| ClusterError::Io("writing pg_hba.conf", e))?;
    if let Some((uid, gid)) = run_as {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .map_err(|e| ClusterError::Io("chown of pg_hba.conf", e))?;
    }
    Ok(())
}

/// Removes cluster directories left by killed runs (their owning process is gone).
fn cleanup_stale_dirs() {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix("keyshift-pg-")) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        let alive = unsafe { libc::kill(pid, 0) } == 0;
        let pm_alive = fs::read_to_string(e.path().join("data/postmaster.pid"))
            .ok()
            .and_then(|s| s.lines().next().and_then(|l| l.trim().parse::<i32>().ok()))
            .is_some_and(|p| unsafe { libc::kill(p, 0) } == 0);
        if !alive && !pm_alive {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

fn free_port() -> Result<u16, ClusterError> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| ClusterError::Io("finding a port", e))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| ClusterError::Io("finding a port", e))
}
