//! Starting a keyshift proxy for a test: in-process on its own runtime thread (so blocking
//! clients such as psql can run from the test), or as the real binary in a child process.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keyshift::config::ProxyConfig;

use super::server;

/// A proxy running in this process, stopped on drop.
pub struct TestProxy {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    /// The running proxy's shared state (gate, metrics, rewriter slot).
    pub shared: std::sync::Arc<keyshift::proxy::Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The default test configuration: ephemeral ports, the harness's server upstream.
pub fn test_config() -> ProxyConfig {
    ProxyConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_listen: "127.0.0.1:0".parse().unwrap(),
        upstream: server().addr(),
        admin_token: Some("test-token".into()),
        ..ProxyConfig::default()
    }
}

impl TestProxy {
    pub fn start() -> TestProxy {
        Self::start_with(test_config())
    }

    pub fn start_with(cfg: ProxyConfig) -> TestProxy {
        let (tx_addr, rx_addr) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let proxy = keyshift::proxy::Proxy::bind(cfg).await.expect("bind proxy");
                tx_addr
                    .send((proxy.local_addr(), proxy.admin_addr(), proxy.shared()))
                    .unwrap();
                proxy
                    .run(async move {
                        let _ = stop_rx.await;
                    })
                    .await
                    .unwrap();
            });
        });
        let (addr, admin, shared) = rx_addr.recv().expect("proxy started");
        TestProxy {
            addr,
            admin,
            shared,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    /// A connection URL through the proxy.
    pub fn url(&self, user: &str, dbname: &str) -> String {
        format!(
            "postgres://{user}@{}:{}/{dbname}",
            self.addr.ip(),
            self.addr.port()
        )
    }

    /// Stops accepting and runs the graceful shutdown; returns when it is over.
    pub fn shutdown(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        if self.stop.is_some() {
            // Tests that end with clients still connected should not wait for the default
            // 30 s grace: the runtime is dropped with the thread, closing every socket.
            if let Some(tx) = self.stop.take() {
                let _ = tx.send(());
            }
            self.thread.take();
        }
    }
}

/// The real binary in a child process (for RSS, signals and CLI behaviour).
pub struct ProxyProcess {
    pub child: Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl ProxyProcess {
    pub fn spawn(extra: &[&str]) -> ProxyProcess {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_keyshift"))
            .args([
                "proxy",
                "--listen",
                &addr.to_string(),
                "--admin-listen",
                &admin.to_string(),
            ])
            .args(["--upstream", &server().addr()])
            .args(extra)
            .env_remove("KEYSHIFT_CONFIG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn keyshift");
        let p = ProxyProcess { child, addr, admin };
        let start = Instant::now();
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "keyshift proxy did not start listening"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        p
    }

    pub fn url(&self, user: &str, dbname: &str) -> String {
        format!(
            "postgres://{user}@{}:{}/{dbname}",
            self.addr.ip(),
            self.addr.port()
        )
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Resident set size in KiB, from /proc.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    pub fn signal(&self, sig: i32) {
        unsafe { libc::kill(self.pid(), sig) };
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A tiny blocking HTTP/1.1 client for the admin endpoint (status, body).
pub fn http(admin: SocketAddr, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
    http_with_body(admin, method, path, token, "")
}

/// [`http`] with a JSON request body.
pub fn http_with_body(
    admin: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(admin).expect("connect admin");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let code = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

/// A protocol 3.0 StartupMessage, as a raw client sends it.
pub fn startup_packet(user: &str, db: &str, app: &str) -> Vec<u8> {
    let mut body = 196608u32.to_be_bytes().to_vec();
    for (k, v) in [("user", user), ("database", db), ("application_name", app)] {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut pkt = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    pkt.extend(body);
    pkt
}

/// Reads messages until a ReadyForQuery; returns its status byte.
pub fn read_until_ready(s: &mut std::net::TcpStream) -> u8 {
    use std::io::Read;
    loop {
        let mut hdr = [0u8; 5];
        s.read_exact(&mut hdr).unwrap();
        let len = u32::from_be_bytes([hdr[1], hdr[2], hdr[3], hdr[4]]) as usize;
        let mut body = vec![0u8; len - 4];
        s.read_exact(&mut body).unwrap();
        if hdr[0] == b'Z' {
            return body[0];
        }
    }
}

/// A raw, authenticated (trust) session through `addr`, ready for a query.
pub fn raw_session(addr: SocketAddr, db: &str) -> std::net::TcpStream {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(&startup_packet("postgres", db, "raw")).unwrap();
    read_until_ready(&mut s);
    s
}

/// A proxy linked to `db`'s migration, once its status says it is (database link up,
/// dual-write on: the state a migration is in from expand to finalize).
pub async fn linked_proxy(db: &super::TestDb) -> TestProxy {
    let mut cfg = test_config();
    cfg.database_url = Some(db.url());
    let p = TestProxy::start_with(cfg);
    wait_status(&p, |v| {
        v["dual_write"] == true && v["database_link"] == "connected"
    })
    .await;
    p
}

/// Waits until the proxy serves the rules version the database holds now (after a step
/// that committed new rules: backfill's harden, cutover, rollback).
pub async fn wait_rules_in_force(p: &TestProxy, db: &tokio_postgres::Client) {
    let version: i64 = db
        .query_one("SELECT rules_version FROM keyshift.migration", &[])
        .await
        .unwrap()
        .get(0);
    wait_status(p, |v| v["rules_version"] == version).await;
}

/// Waits until the proxy's `/v1/status` satisfies `ok` (15 s at most).
pub async fn wait_status(p: &TestProxy, ok: impl Fn(&serde_json::Value) -> bool) {
    let start = Instant::now();
    loop {
        let admin = p.admin;
        let (_, body) = tokio::task::spawn_blocking(move || http(admin, "GET", "/v1/status", None))
            .await
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        if ok(&v) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "proxy status never matched: {v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A session through `p` in `shape`, named by `options` as libpq and psycopg do.
pub async fn connect_shaped(
    p: &TestProxy,
    db: &super::TestDb,
    shape: &str,
) -> tokio_postgres::Client {
    let mut cfg: tokio_postgres::Config = p.url("postgres", &db.name).parse().unwrap();
    cfg.options(format!("-c keyshift.shape={shape}"));
    let (client, conn) = cfg
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("{shape}-shaped session: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}
