//! A differential protocol fuzzer for the proxy's session, shared by `tests/proxy_fuzz.rs`
//! (bounded, in the suite) and `benches/fuzz.sh` (long runs).
//!
//! Two databases with the same schema (seed 004's tables, both expanded by the real binary):
//! one reached directly, the other through a keyshift proxy linked to it, so the dual-write
//! rewriter is live. Each case's bytes go to both over real sockets, and the backend messages
//! each answered are compared after normalising what legitimately differs (a table's OID in
//! RowDescription, a notification's pid, the source-file fields of errors). Then: no panic
//! anywhere in the process, the session is gone from the gate, a fresh client gets
//! `SELECT 1`, and `/v1/pause` drains.
//!
//! How a case is read to its end: unless it ends with Terminate, a barrier follows its bytes
//! (CopyFail, Sync, `SELECT 'fuzz-end'`: PostgreSQL ignores CopyFail outside COPY and while
//! skipping to Sync, so the barrier ends any state); once the marker row and its
//! ReadyForQuery are in, the session must be `idle` (or `idle_in_transaction`) in the gate,
//! and a Terminate ends it. A case that leaves either side waiting (a length longer than its
//! body) gets a quiet timeout, then its write side shut down, and is read to EOF.
//!
//! One difference is not counted, and only in one direction: PostgreSQL's FATAL 08P01 right
//! after one of its ERRORs, received through keyshift where the direct connection got the
//! ERROR and a clean end of stream (`fatal_lost_on_direct`). The direct side loses it in
//! about half the runs of the two cases that show it; the server logged it both times.
#![allow(dead_code)]

pub mod generate;
pub mod wire;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::common;
use crate::common::proxy::{TestProxy, http, startup_packet, test_config};
use crate::migrate_support::{SEED_004, ks_expect};
use generate::{Case, Oids};
use keyshift::proxy::gate::SessionState;
use wire::*;

/// How long a side may stay silent, after all was written, before it is taken as waiting.
const QUIET: Duration = Duration::from_millis(250);
/// How long to wait for EOF once the case asked to end.
const CLOSE_WAIT: Duration = Duration::from_secs(5);
const MARKER: &str = "fuzz-end";

// ---- panics anywhere in the process -------------------------------------------------------

static PANICS: OnceLock<Arc<Mutex<Vec<String>>>> = OnceLock::new();

/// Records every panic in the process (the proxy runs in-process: a panicking session task
/// is caught by tokio, so the hook is where it shows).
fn panics() -> Arc<Mutex<Vec<String>>> {
    PANICS
        .get_or_init(|| {
            let log = Arc::new(Mutex::new(Vec::new()));
            let l = log.clone();
            let default = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                let msg = info.to_string();
                l.lock()
                    .unwrap()
                    .push(msg.lines().next().unwrap_or("").to_string());
                default(info);
            }));
            log
        })
        .clone()
}

// ---- the setup ---------------------------------------------------------------------------

/// Opens a raw, authenticated (trust) connection and reads up to its first ReadyForQuery.
pub fn open(addr: SocketAddr, db: &str, app: &str) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_nodelay(true)?;
    s.write_all(&startup_packet("postgres", db, app))?;
    until_ready(&mut s)?;
    Ok(s)
}

fn read_msg(s: &mut TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    let mut hdr = [0u8; 5];
    s.read_exact(&mut hdr)?;
    let len = u32::from_be_bytes([hdr[1], hdr[2], hdr[3], hdr[4]]) as usize;
    let mut body = vec![0u8; len.saturating_sub(4)];
    s.read_exact(&mut body)?;
    Ok((hdr[0], body))
}

fn until_ready(s: &mut TcpStream) -> std::io::Result<Vec<String>> {
    let mut out = Vec::new();
    loop {
        let (t, b) = read_msg(s)?;
        out.push(normalise_backend(t, &b));
        if t == b'E' && out.last().is_some_and(|m| m.starts_with("E FATAL")) {
            return Err(std::io::Error::other(out.pop().unwrap()));
        }
        if t == b'Z' {
            return Ok(out);
        }
    }
}

/// A raw connection for setup and resets (simple queries only).
pub struct RawConn(TcpStream);

impl RawConn {
    pub fn connect(addr: SocketAddr, db: &str, app: &str) -> std::io::Result<RawConn> {
        open(addr, db, app).map(RawConn)
    }

    /// Runs `sql`; the answer's normalised messages, or an error naming the first ErrorResponse.
    pub fn exec(&mut self, sql: &str) -> Result<Vec<String>, String> {
        let mut m = Vec::new();
        query(sql).encode(&mut m);
        self.0.write_all(&m).map_err(|e| e.to_string())?;
        let out = until_ready(&mut self.0).map_err(|e| e.to_string())?;
        match out.iter().find(|m| m.starts_with("E ")) {
            Some(e) => Err(format!("{sql}: {e}")),
            None => Ok(out),
        }
    }
}

impl Drop for RawConn {
    fn drop(&mut self) {
        let mut m = Vec::new();
        terminate().encode(&mut m);
        let _ = self.0.write_all(&m);
    }
}

/// Back to the same rows and sequences (DELETE, not TRUNCATE: a tenth of the time).
const RESET: &str = "SET lock_timeout = '10s';
DELETE FROM mcp_server_tools; DELETE FROM mcp_server_tokens; DELETE FROM connector_access;
DELETE FROM mcp_servers; DELETE FROM mcp_connectors;
SELECT setval(pg_get_serial_sequence(t, 'id'), 1, false) FROM unnest(ARRAY['mcp_connectors',
    'connector_access', 'mcp_servers', 'mcp_server_tokens', 'mcp_server_tools']) t;
INSERT INTO mcp_connectors (name) SELECT 'c' || g FROM generate_series(1, 5) g;
INSERT INTO mcp_servers (connector_id, name) SELECT g, 's' || g FROM generate_series(1, 5) g;";

/// Waits until the case's backends are gone (a backend whose client left still runs what it
/// had received, and commits it), then resets.
fn reset_one(c: &mut RawConn, side: &str) {
    let start = Instant::now();
    loop {
        let out = c.exec(LEFT_OVER).expect("count backends");
        if out.iter().any(|m| m == "D [\"0\"]") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{side}: a case's backend is still running 10 s after its client left"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    c.exec(RESET)
        .unwrap_or_else(|e| panic!("reset {side}: {e}"));
}

const LEFT_OVER: &str = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()
    AND pid <> pg_backend_pid() AND backend_type = 'client backend'
    AND application_name NOT IN ('fuzz-reset', 'keyshift proxy')";

/// The two databases, the proxy in front of one, and what the cases need to know.
pub struct Fuzzer {
    pub direct_db: common::TestDb,
    pub proxied_db: common::TestDb,
    pub proxy: TestProxy,
    direct_reset: RawConn,
    proxied_reset: RawConn,
    pub oids: Oids,
    server: SocketAddr,
    pub cases_run: u64,
    app_counter: u64,
}

fn server_addr() -> SocketAddr {
    use std::net::ToSocketAddrs;
    common::server()
        .addr()
        .to_socket_addrs()
        .unwrap()
        .next()
        .unwrap()
}

fn start_proxy(db: &common::TestDb) -> TestProxy {
    let mut cfg = test_config();
    cfg.database_url = Some(db.url());
    cfg.shutdown_grace = Duration::from_millis(100);
    // PostgreSQL's own bound for a Query (1 GB): a case waiting on a long message must wait
    // on both sides alike.
    cfg.max_message_bytes = (1 << 30) - 1;
    let p = TestProxy::start_with(cfg);
    let start = Instant::now();
    loop {
        let (_, body) = http(p.admin, "GET", "/v1/status", None);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        if v["dual_write"] == true {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the proxy never loaded the migration's rules: {v}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    p
}

impl Fuzzer {
    pub fn new() -> Fuzzer {
        panics();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (direct_db, proxied_db) = rt.block_on(async {
            let a = common::TestDb::new().await;
            let b = common::TestDb::new().await;
            for db in [&a, &b] {
                db.client().await.batch_execute(SEED_004).await.unwrap();
            }
            (a, b)
        });
        drop(rt);
        // Both expanded (same columns, so positional INSERTs and errors compare); only the
        // proxied one is linked to the proxy, so only its writes are rewritten.
        ks_expect(&direct_db.url(), &["expand"], 0);
        ks_expect(&proxied_db.url(), &["expand"], 0);
        let proxy = start_proxy(&proxied_db);
        let server = server_addr();
        let mut direct_reset = RawConn::connect(server, &direct_db.name, "fuzz-reset").unwrap();
        let proxied_reset = RawConn::connect(server, &proxied_db.name, "fuzz-reset").unwrap();
        let row = direct_reset
            .exec("SELECT 'int4pl'::regproc::oid, 'upper(text)'::regprocedure::oid")
            .unwrap();
        let nums: Vec<u32> = row
            .iter()
            .find(|m| m.starts_with("D "))
            .unwrap()
            .split('"')
            .filter_map(|x| x.parse().ok())
            .collect();
        let mut f = Fuzzer {
            direct_db,
            proxied_db,
            proxy,
            direct_reset,
            proxied_reset,
            oids: Oids {
                int4pl: nums[0],
                upper: nums[1],
            },
            server,
            cases_run: 0,
            app_counter: 0,
        };
        f.reset();
        f
    }

    fn reset(&mut self) {
        let (a, b) = (&mut self.direct_reset, &mut self.proxied_reset);
        std::thread::scope(|s| {
            s.spawn(|| reset_one(a, "direct"));
            reset_one(b, "proxied");
        });
    }

    /// A new proxy, after one that may keep a dead session registered.
    fn restart_proxy(&mut self) {
        let old = std::mem::replace(&mut self.proxy, start_proxy(&self.proxied_db));
        drop(old);
    }

    /// Runs one case on both sides and checks the proxy afterwards.
    pub fn run(&mut self, case: &Case) -> Outcome {
        self.cases_run += 1;
        self.app_counter += 1;
        let app = format!("fuzz-{}-{}", std::process::id(), self.app_counter);
        let panics_before = panics().lock().unwrap().len();
        let t0 = Instant::now();
        let chunks = chunks(case);
        let barrier = !case.ends_with_terminate();
        let shared = self.proxy.shared.clone();
        // Self-test of the harness: both sides straight to PostgreSQL must never differ.
        let selftest = std::env::var("KEYSHIFT_FUZZ_SELFTEST").is_ok();
        let target = if selftest {
            self.server
        } else {
            self.proxy.addr
        };
        let (direct, proxied) = std::thread::scope(|s| {
            let d = s.spawn(|| {
                drive(
                    self.server,
                    &self.direct_db.name,
                    &app,
                    &chunks,
                    barrier,
                    &|_| None,
                )
            });
            let p = s.spawn(|| {
                drive(
                    target,
                    &self.proxied_db.name,
                    &app,
                    &chunks,
                    barrier,
                    &|z| (!selftest).then(|| gate_state_after_ready(&shared, &app, z))?,
                )
            });
            (d.join().unwrap(), p.join().unwrap())
        });
        let t_sides = t0.elapsed();
        let mut problems = Vec::new();
        let new_panics: Vec<String> = panics().lock().unwrap()[panics_before..].to_vec();
        for p in &new_panics {
            problems.push(Problem::Panic(p.clone()));
        }
        if let Some(i) = (0..direct.msgs.len().max(proxied.msgs.len()))
            .find(|&i| direct.msgs.get(i) != proxied.msgs.get(i))
            .filter(|&i| !fatal_lost_on_direct(&direct.msgs, &proxied.msgs, i))
        {
            problems.push(Problem::Mismatch {
                terminated: case.ends_with_terminate(),
                at: i,
                direct: direct.msgs.get(i).cloned().unwrap_or("<nothing>".into()),
                proxied: proxied.msgs.get(i).cloned().unwrap_or("<nothing>".into()),
            });
        }
        if let Some(s) = &proxied.check {
            problems.push(Problem::State(s.clone()));
        }
        if let Some(s) = &direct.check {
            problems.push(Problem::Harness(format!("direct: {s}")));
        }
        let mut restart = false;
        if let Some(s) = session_gone(&self.proxy, &app) {
            problems.push(Problem::Gate(s));
            restart = true;
        }
        if let Some(s) = fresh_client(&self.proxy, &self.proxied_db.name) {
            problems.push(Problem::Gate(s));
            restart = true;
        }
        if let Some(s) = pause_drains(&self.proxy) {
            problems.push(Problem::Gate(s));
            restart = true;
        }
        let t_checks = t0.elapsed();
        if restart {
            self.restart_proxy();
        }
        // Each case starts from the same rows and sequences on both sides.
        self.reset();
        if std::env::var("KEYSHIFT_FUZZ_VERBOSE").is_ok() {
            eprintln!(
                "  sides {t_sides:?}, checks {t_checks:?}, reset {:?}",
                t0.elapsed()
            );
            if t_sides > Duration::from_millis(200) {
                eprintln!("{}", case.readable());
                eprintln!("{direct:?}", direct = direct.msgs);
            }
        }
        Outcome {
            direct: direct.msgs,
            proxied: proxied.msgs,
            problems,
        }
    }
}

// ---- one side of a case -------------------------------------------------------------------

struct Side {
    msgs: Vec<String>,
    /// A check made while the session was open (its gate state), if it failed.
    check: Option<String>,
}

/// PostgreSQL's FATAL right after an ERROR, then its close: the direct connection sometimes
/// gets the ERROR and a clean end of stream (no reset) without the FATAL, though the server
/// logged it for both connections (and sent it on both, in the runs traced with strace, which
/// all matched). keyshift, which sends nothing after the message PostgreSQL
/// ends the session for, always passes it on. Seen with "terminating connection because
/// protocol synchronization was lost" (fuzz seed 10905, case 261) and "invalid frontend
/// message type 23" (seed 10303, case 414), each in about half of the runs. Such a FATAL is
/// PostgreSQL's own text, so the difference is the reference side's, not keyshift's.
fn fatal_lost_on_direct(direct: &[String], proxied: &[String], i: usize) -> bool {
    i > 0
        && direct.len() == i + 1
        && proxied.len() == i + 2
        && direct[i] == "<EOF>"
        && proxied[i + 1] == "<EOF>"
        && direct[i - 1].starts_with("E ERROR ")
        && proxied[i].starts_with("E FATAL 08P01 ")
        && !proxied[i].contains("keyshift")
}

/// The case's bytes in the writes they go in, each with the pause before it: one write per
/// waiting point, cut in random chunks of 1 to 24 bytes when the case is split.
fn chunks(case: &Case) -> Vec<(Duration, Vec<u8>)> {
    let mut parts: Vec<(Duration, Vec<u8>)> = vec![(Duration::ZERO, Vec::new())];
    for m in &case.msgs {
        m.encode(&mut parts.last_mut().unwrap().1);
        if m.wait {
            parts.push((Duration::from_millis(10), Vec::new()));
        }
    }
    parts.retain(|p| !p.1.is_empty());
    let Some(seed) = case.split else {
        return parts;
    };
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::new();
    for (pause, bytes) in parts {
        let mut i = 0;
        while i < bytes.len() {
            let n = rng.random_range(1..=24).min(bytes.len() - i);
            let p = if i == 0 {
                pause
            } else {
                Duration::from_millis(1)
            };
            out.push((p, bytes[i..i + n].to_vec()));
            i += n;
        }
    }
    out
}

fn barrier_bytes() -> Vec<u8> {
    encode_all(&[
        copy_fail(MARKER),
        sync(),
        query(&format!("SELECT '{MARKER}'")),
    ])
}

/// Connects, authenticates, writes the case, reads the answer to its end.
fn drive(
    addr: SocketAddr,
    db: &str,
    app: &str,
    chunks: &[(Duration, Vec<u8>)],
    barrier: bool,
    on_marker: &dyn Fn(u8) -> Option<String>,
) -> Side {
    let mut side = Side {
        msgs: Vec::new(),
        check: None,
    };
    let mut s = match open(addr, db, app) {
        Ok(s) => s,
        Err(e) => {
            side.msgs.push(format!("<connect failed: {e}>"));
            return side;
        }
    };
    let mut writable = true;
    for (pause, c) in chunks {
        std::thread::sleep(*pause);
        if s.write_all(c).is_err() {
            writable = false;
            break;
        }
    }
    if writable && barrier {
        let _ = s.write_all(&barrier_bytes());
    }
    let mut buf: Vec<u8> = Vec::new();
    let mut saw_marker = false;
    // After our Terminate, or once the write side is shut: only EOF is left to read. (A case
    // that ends with its own Terminate is read like the others: its Terminate may have been
    // swallowed by a length that lies.)
    let mut ending = false;
    let mut deadline = Instant::now() + QUIET;
    let mut tmp = [0u8; 16 * 1024];
    loop {
        // Whole messages in the buffer.
        loop {
            if buf.len() < 5 {
                break;
            }
            let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            if len < 4 {
                side.msgs.push(format!("<bad frame len={len}>"));
                return side;
            }
            if buf.len() < 1 + len {
                break;
            }
            let tag = buf[0];
            let body: Vec<u8> = buf[5..1 + len].to_vec();
            buf.drain(..1 + len);
            let m = normalise_backend(tag, &body);
            if tag == b'D' && m.contains(MARKER) {
                saw_marker = true;
            }
            let is_final_z = tag == b'Z' && saw_marker && !ending;
            side.msgs.push(m);
            if is_final_z {
                side.check = on_marker(body[0]);
                let mut x = Vec::new();
                terminate().encode(&mut x);
                let _ = s.write_all(&x);
                ending = true;
                deadline = Instant::now() + CLOSE_WAIT;
            }
        }
        let now = Instant::now();
        if now >= deadline {
            if ending {
                side.msgs.push("<no EOF after Terminate>".into());
                return side;
            }
            side.msgs.push(format!(
                "<quiet {}ms: client shuts down writing>",
                QUIET.as_millis()
            ));
            let _ = s.shutdown(Shutdown::Write);
            ending = true;
            deadline = Instant::now() + CLOSE_WAIT;
            continue;
        }
        s.set_read_timeout(Some(deadline - now)).unwrap();
        match s.read(&mut tmp) {
            Ok(0) => break,
            Ok(n) => {
                buf.extend_from_slice(&tmp[..n]);
                if !ending {
                    deadline = Instant::now() + QUIET;
                }
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // A reset after the server closed is an end like EOF.
            Err(_) => break,
        }
    }
    if !buf.is_empty() {
        side.msgs
            .push(format!("<{} bytes of a partial message>", buf.len()));
    }
    side.msgs.push("<EOF>".into());
    side
}

// ---- checks on the proxy ------------------------------------------------------------------

fn session_state(shared: &keyshift::proxy::Shared, app: &str) -> Option<SessionState> {
    shared
        .gate
        .sessions()
        .into_iter()
        .find(|s| s.application_name == app)
        .map(|s| s.state)
}

/// After the marker's ReadyForQuery the session waits for its client: `idle`, or
/// `idle_in_transaction` when the status byte says a transaction is open.
fn gate_state_after_ready(shared: &keyshift::proxy::Shared, app: &str, z: u8) -> Option<String> {
    let want = if z == b'I' {
        SessionState::Idle
    } else {
        SessionState::IdleInTransaction
    };
    let start = Instant::now();
    loop {
        let st = session_state(shared, app);
        if st == Some(want) {
            return None;
        }
        if start.elapsed() > Duration::from_millis(250) {
            return Some(format!(
                "session {} after ReadyForQuery {} with nothing in flight",
                st.map(|s| s.as_str()).unwrap_or("missing"),
                z as char
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn session_gone(p: &TestProxy, app: &str) -> Option<String> {
    let start = Instant::now();
    loop {
        match session_state(&p.shared, app) {
            None => return None,
            Some(st) if start.elapsed() > Duration::from_secs(3) => {
                return Some(format!(
                    "the session is still in the gate, {}, 3 s after its client left",
                    st.as_str()
                ));
            }
            Some(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

fn fresh_client(p: &TestProxy, db: &str) -> Option<String> {
    let mut c = match RawConn::connect(p.addr, db, "fuzz-fresh") {
        Ok(c) => c,
        Err(e) => return Some(format!("a fresh client could not connect: {e}")),
    };
    match c.exec("SELECT 1") {
        Ok(m) if m.iter().any(|x| x == "D [\"1\"]") => None,
        Ok(m) => Some(format!("a fresh client's SELECT 1 got {m:?}")),
        Err(e) => Some(format!("a fresh client's SELECT 1 failed: {e}")),
    }
}

fn pause_drains(p: &TestProxy) -> Option<String> {
    let start = Instant::now();
    let (code, body) = http(p.admin, "POST", "/v1/pause?timeout=2s", Some("test-token"));
    let took = start.elapsed();
    let (rcode, rbody) = http(p.admin, "POST", "/v1/resume", Some("test-token"));
    if code != 200 {
        return Some(format!("/v1/pause answered {code} after {took:?}: {body}"));
    }
    if rcode != 200 {
        return Some(format!("/v1/resume answered {rcode}: {rbody}"));
    }
    None
}

// ---- outcomes, signatures, reports --------------------------------------------------------

#[derive(Clone, Debug)]
pub enum Problem {
    Panic(String),
    Mismatch {
        /// The case ended with its own Terminate.
        terminated: bool,
        at: usize,
        direct: String,
        proxied: String,
    },
    State(String),
    Gate(String),
    Harness(String),
}

impl Problem {
    /// What groups failures: the kind and the short form of what differed.
    pub fn signature(&self) -> String {
        match self {
            Problem::Panic(m) => {
                // "panicked at src/x.rs:1:2:" -> the location
                let loc = m.split(" at ").nth(1).unwrap_or(m);
                format!("panic at {}", loc.trim_end_matches(':'))
            }
            Problem::Mismatch {
                direct,
                proxied,
                terminated,
                ..
            } => {
                let (a, b) = (short(direct), short(proxied));
                if *terminated && proxied == "<EOF>" {
                    return "reply: keyshift closes without the answers to what came before Terminate".into();
                }
                if let Some(m) =
                    proxied.strip_prefix("E FATAL 08P01 M=\"invalid message from client: ")
                {
                    // keyshift's own framing errors, one group per kind (numbers blanked).
                    let kind: String = m
                        .trim_end_matches('"')
                        .split_whitespace()
                        .map(|w| {
                            if w.bytes().any(|c| c.is_ascii_digit()) {
                                "N"
                            } else {
                                w
                            }
                        })
                        .collect::<Vec<_>>()
                        .join(" ");
                    return format!("reply: keyshift ends the session itself: {kind}");
                }
                if a == b && (a.starts_with("E ") || a.starts_with("N ")) {
                    let (fa, fb) = (fields(direct), fields(proxied));
                    let keys: std::collections::BTreeSet<char> =
                        fa.keys().chain(fb.keys()).copied().collect();
                    let differ: String = keys
                        .into_iter()
                        .filter(|k| fa.get(k) != fb.get(k))
                        .collect();
                    format!("reply: {a} differs in field(s) {differ}")
                } else {
                    format!("reply: PostgreSQL {a} / keyshift {b}")
                }
            }
            Problem::State(s) => format!("gate: {s}"),
            Problem::Gate(s) => format!("after the case: {}", s.split(':').next().unwrap_or(s)),
            Problem::Harness(s) => format!("harness: {s}"),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Problem::Panic(m) => format!("panic: {m}"),
            Problem::Mismatch {
                at,
                direct,
                proxied,
                ..
            } => format!(
                "answers differ at message {at}:\n    PostgreSQL: {direct}\n    keyshift:   {proxied}"
            ),
            Problem::State(s) => format!("gate: {s}"),
            Problem::Gate(s) => format!("after the case: {s}"),
            Problem::Harness(s) => format!("harness: {s}"),
        }
    }
}

pub struct Outcome {
    pub direct: Vec<String>,
    pub proxied: Vec<String>,
    pub problems: Vec<Problem>,
}

impl Outcome {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }

    /// The signature of the first problem (a panic first: it explains the rest).
    pub fn signature(&self) -> Option<String> {
        let first = self
            .problems
            .iter()
            .find(|p| matches!(p, Problem::Panic(_)))
            .or(self.problems.first())?;
        Some(first.signature())
    }
}

/// A reproduction: the case, readable, and what each side answered.
pub fn report(case: &Case, out: &Outcome, repro: &str) -> String {
    let mut s = format!("--- {} ({repro})\n", case.name);
    s.push_str("  client sends:\n");
    for l in case.readable().lines() {
        s.push_str(&format!("  {l}\n"));
    }
    if !case.ends_with_terminate() {
        s.push_str("    + barrier: f \"fuzz-end\", S, Q \"SELECT 'fuzz-end'\", then X\n");
    }
    for p in &out.problems {
        s.push_str(&format!("  {}\n", p.describe()));
    }
    s.push_str("  PostgreSQL answered:\n");
    for m in &out.direct {
        s.push_str(&format!("    {m}\n"));
    }
    s.push_str("  keyshift answered:\n");
    for m in &out.proxied {
        s.push_str(&format!("    {m}\n"));
    }
    s
}

/// Greedily drops messages (and the chunked writes) while the same signature still shows.
pub fn minimise(f: &mut Fuzzer, case: &Case, sig: &str) -> (Case, Outcome) {
    let mut best = case.clone();
    let mut best_out = f.run(&best);
    if best_out.signature().as_deref() != Some(sig) {
        // Not reproducible as is (timing): keep the original.
        return (best, best_out);
    }
    if best.split.is_some() {
        let mut c = best.clone();
        c.split = None;
        let o = f.run(&c);
        if o.signature().as_deref() == Some(sig) {
            best = c;
            best_out = o;
        }
    }
    let mut i = best.msgs.len();
    while i > 0 {
        i -= 1;
        if best.msgs.len() <= 1 {
            break;
        }
        let mut c = best.clone();
        c.msgs.remove(i);
        let o = f.run(&c);
        if o.signature().as_deref() == Some(sig) {
            best = c;
            best_out = o;
        }
    }
    best.name = format!("{} (minimised)", case.name);
    (best, best_out)
}

/// One group of failures: how many cases showed it, and the smallest one.
pub struct Finding {
    pub count: u64,
    pub case: Case,
    pub outcome: Outcome,
    pub repro: String,
    /// Generated cases are minimised before they are shown; named ones already are minimal.
    pub generated: bool,
}

/// Failures grouped by signature.
#[derive(Default)]
pub struct Findings {
    pub by_sig: BTreeMap<String, Finding>,
}

impl Findings {
    pub fn add(&mut self, sig: String, case: &Case, out: Outcome, repro: String, generated: bool) {
        match self.by_sig.get_mut(&sig) {
            Some(e) => {
                e.count += 1;
                if case.msgs.len() < e.case.msgs.len() {
                    e.case = case.clone();
                    e.outcome = out;
                    e.repro = repro;
                }
            }
            None => {
                self.by_sig.insert(
                    sig,
                    Finding {
                        count: 1,
                        case: case.clone(),
                        outcome: out,
                        repro,
                        generated,
                    },
                );
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.by_sig.is_empty()
    }

    /// Minimises each generated group's smallest case, then prints every group.
    pub fn render(&mut self, f: Option<&mut Fuzzer>) -> String {
        if let Some(f) = f {
            // Bounded: a run that found many things still ends in reasonable time.
            let until = Instant::now() + Duration::from_secs(90);
            for (sig, e) in self.by_sig.iter_mut().filter(|(_, e)| e.generated) {
                if Instant::now() > until {
                    break;
                }
                let (c, o) = minimise(f, &e.case, sig);
                if o.signature().as_deref() == Some(sig.as_str()) {
                    e.case = c;
                    e.outcome = o;
                }
            }
        }
        let mut s = String::new();
        for (sig, e) in &self.by_sig {
            s.push_str(&format!("\n=== {sig}  ({} case(s))\n", e.count));
            s.push_str(&report(&e.case, &e.outcome, &e.repro));
        }
        s
    }

    /// One line per group, for the long run's summary.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        for (sig, e) in &self.by_sig {
            s.push_str(&format!("{:>6}  {sig}\n", e.count));
        }
        s
    }
}

/// The run's parameters from the environment.
pub struct Plan {
    pub seed: u64,
    pub cases: u64,
    pub only: Option<u64>,
    pub minimise: bool,
}

impl Plan {
    pub fn from_env(default_cases: u64) -> Plan {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let seed = match var("KEYSHIFT_FUZZ_SEED").as_deref() {
            Some("random") => rand::random(),
            Some(v) => v.parse().expect("KEYSHIFT_FUZZ_SEED: a number or `random`"),
            None => 20_261_201,
        };
        Plan {
            seed,
            cases: var("KEYSHIFT_FUZZ_CASES")
                .map(|v| v.parse().expect("KEYSHIFT_FUZZ_CASES"))
                .unwrap_or(default_cases),
            only: var("KEYSHIFT_FUZZ_CASE").map(|v| v.parse().expect("KEYSHIFT_FUZZ_CASE")),
            minimise: var("KEYSHIFT_FUZZ_MINIMISE").as_deref() != Some("0"),
        }
    }
}

/// Runs the named cases, then `plan.cases` generated ones; returns the findings.
pub fn run_all(f: &mut Fuzzer, named: &[Case], plan: &Plan) -> Findings {
    let mut findings = Findings::default();
    if plan.only.is_none() {
        for c in named {
            let out = f.run(c);
            if std::env::var("KEYSHIFT_FUZZ_VERBOSE").is_ok() {
                eprintln!("{}", report(c, &out, "named"));
            }
            if let Some(sig) = out.signature() {
                let repro = "cargo test --test proxy_fuzz: a named regression case".to_string();
                findings.add(
                    format!("regression `{}`: {sig}", c.name),
                    c,
                    out,
                    repro,
                    false,
                );
            }
        }
    }
    let range: Vec<u64> = match plan.only {
        Some(i) => vec![i],
        None => (0..plan.cases).collect(),
    };
    let verbose = std::env::var("KEYSHIFT_FUZZ_VERBOSE").is_ok();
    for i in range {
        let c = generate::generate(plan.seed, i, f.oids);
        let t = Instant::now();
        let out = f.run(&c);
        if verbose {
            eprintln!(
                "case {i}: {} msgs, {:?}, {}",
                c.msgs.len(),
                t.elapsed(),
                out.signature().unwrap_or_default()
            );
        }
        if let Some(sig) = out.signature() {
            let repro = format!("KEYSHIFT_FUZZ_SEED={} KEYSHIFT_FUZZ_CASE={i}", plan.seed);
            findings.add(sig, &c, out, repro, true);
        }
    }
    findings
}
