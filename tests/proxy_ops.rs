//! The proxy as an operator runs it: the real binary, its configuration, admin endpoints,
//! connection limit, graceful shutdown, and memory while streaming a large COPY.
mod common;

use std::io::Read;
use std::process::Command;
use std::time::{Duration, Instant};

use common::proxy::{ProxyProcess, free_port, http, raw_session};
use futures_util::{SinkExt, StreamExt};

fn keyshift() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_keyshift"));
    for (k, _) in std::env::vars() {
        if k.starts_with("KEYSHIFT_") {
            c.env_remove(k);
        }
    }
    c
}

#[test]
fn help_lists_subcommands_and_explains_options() {
    let out = keyshift().arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("proxy"), "{text}");
    let out = keyshift().args(["proxy", "--help"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--listen",
        "--upstream",
        "--admin-listen",
        "--admin-token",
        "--tls-cert",
        "--tls-key",
        "--upstream-tls",
        "--upstream-tls-ca",
        "--max-client-connections",
        "--max-message-bytes",
        "--shutdown-grace",
        "KEYSHIFT_LISTEN",
    ] {
        assert!(text.contains(flag), "{flag} missing from:\n{text}");
    }
}

#[test]
fn bad_config_names_the_key_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    for (content, key) in [
        ("listen = \"not an address\"\n", "`listen`"),
        ("shutdown_grace = \"a while\"\n", "`shutdown_grace`"),
        ("upstream_tls = \"sometimes\"\n", "upstream_tls"),
        ("max_client_connections = -1\n", "max_client_connections"),
        ("lisen = \"127.0.0.1:1\"\n", "lisen"),
        ("listen = \n", "keyshift.toml"),
    ] {
        let path = dir.path().join("keyshift.toml");
        std::fs::write(&path, content).unwrap();
        let out = keyshift()
            .args(["proxy", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{content}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(key), "{content}: {err}");
    }
    let out = keyshift()
        .args(["proxy", "--config", "/nonexistent/keyshift.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    // A bad value in the environment is named too.
    let out = keyshift()
        .arg("proxy")
        .env("KEYSHIFT_MAX_CLIENT_CONNECTIONS", "many")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("max-client-connections"));
}

#[test]
fn the_documented_config_file_loads() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/keyshift.toml");
    let text = std::fs::read_to_string(path).unwrap();
    let file = keyshift::config::FileConfig::parse(&text).unwrap();
    // Every key the proxy knows is documented there.
    for key in [
        "listen",
        "upstream",
        "admin_listen",
        "admin_token",
        "tls_cert",
        "tls_key",
        "upstream_tls",
        "upstream_tls_ca",
        "max_client_connections",
        "max_message_bytes",
        "shutdown_grace",
        "connect_timeout",
        "startup_timeout",
        "worker_threads",
        "log_format",
        "log_level",
    ] {
        assert!(
            text.contains(&format!("\n# {key} = ")) || text.contains(&format!("\n{key} = ")),
            "{key} undocumented"
        );
    }
    drop(file);
}

#[tokio::test]
async fn flag_beats_env_beats_file() {
    let dir = tempfile::tempdir().unwrap();
    let (f, e, l) = (free_port(), free_port(), free_port());
    let path = dir.path().join("k.toml");
    let admin = free_port();
    std::fs::write(
        &path,
        format!(
            "listen = \"127.0.0.1:{f}\"\nadmin_listen = \"127.0.0.1:{admin}\"\nupstream = \"{}\"\n",
            common::server().addr()
        ),
    )
    .unwrap();
    let wait_listening = |port: u16| {
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "nothing listening on {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    // env over file
    let mut child = keyshift()
        .args(["proxy", "--config"])
        .arg(&path)
        .env("KEYSHIFT_LISTEN", format!("127.0.0.1:{e}"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_listening(e);
    assert!(std::net::TcpStream::connect(("127.0.0.1", f)).is_err());
    child.kill().unwrap();
    child.wait().unwrap();
    // flag over env
    let mut child = keyshift()
        .args(["proxy", "--config"])
        .arg(&path)
        .args(["--listen", &format!("127.0.0.1:{l}")])
        .env("KEYSHIFT_LISTEN", format!("127.0.0.1:{e}"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_listening(l);
    assert!(std::net::TcpStream::connect(("127.0.0.1", e)).is_err());
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test]
async fn admin_endpoints_and_metrics() {
    let db = common::TestDb::new().await;
    let p = ProxyProcess::spawn(&["--admin-token", "t0k"]);
    let c = common::connect(&p.url("postgres", &db.name)).await;
    c.simple_query("SELECT 'secret_literal_xyz'").await.unwrap();
    c.query("SELECT $1::text", &[&"another_secret_abc"])
        .await
        .unwrap();
    // Counters are flushed from sessions at least every 500 ms or at session end.
    drop(c);
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (code, body) = http(p.admin, "GET", "/healthz", None);
    assert_eq!((code, body.trim()), (200, "ok"));
    let (code, _) = http(p.admin, "GET", "/readyz", None);
    assert_eq!(code, 200);
    let (code, body) = http(p.admin, "GET", "/v1/status", None);
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["gate"], "open");
    let (code, m) = http(p.admin, "GET", "/metrics", None);
    assert_eq!(code, 200);
    for name in [
        "keyshift_client_connections{state=\"idle\"}",
        "keyshift_client_connections_accepted_total ",
        "keyshift_upstream_connect_failures_total 0",
        "keyshift_messages_total{direction=\"client_to_server\",type=\"Query\"} 1",
        "keyshift_messages_total{direction=\"client_to_server\",type=\"Parse\"}",
        "keyshift_messages_total{direction=\"server_to_client\",type=\"ReadyForQuery\"}",
        "keyshift_bytes_total{direction=\"client_to_server\"}",
        "keyshift_bytes_total{direction=\"server_to_client\"}",
        "keyshift_session_duration_seconds_count 1",
        "keyshift_held_sessions 0",
        "keyshift_gate_closed 0",
    ] {
        assert!(m.contains(name), "{name} missing from /metrics:\n{m}");
    }
    assert!(!m.contains("secret_literal_xyz") && !m.contains("another_secret_abc"));
    // State-changing endpoints need the token.
    assert_eq!(http(p.admin, "POST", "/v1/resume", None).0, 401);
    assert_eq!(http(p.admin, "POST", "/v1/resume", Some("t0k")).0, 200);
}

#[tokio::test]
async fn client_limit_answers_too_many_connections() {
    let db = common::TestDb::new().await;
    let p = ProxyProcess::spawn(&["--max-client-connections", "2"]);
    let a = common::connect(&p.url("postgres", &db.name)).await;
    let b = common::connect(&p.url("postgres", &db.name)).await;
    let e = tokio_postgres::connect(&p.url("postgres", &db.name), tokio_postgres::NoTls)
        .await
        .err()
        .unwrap();
    assert_eq!(e.code().map(|c| c.code()), Some("53300"), "{e}");
    drop(a);
    // The freed slot is usable again.
    let start = Instant::now();
    loop {
        match tokio_postgres::connect(&p.url("postgres", &db.name), tokio_postgres::NoTls).await {
            Ok(_) => break,
            Err(_) if start.elapsed() < Duration::from_secs(5) => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("{e}"),
        }
    }
    b.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test]
async fn sigterm_drains_then_closes_with_57p01() {
    let db = common::TestDb::new().await;
    let mut p = ProxyProcess::spawn(&["--shutdown-grace", "1s"]);
    let mut idle = raw_session(p.addr, &db.name);
    let start = Instant::now();
    p.signal(libc::SIGTERM);
    // New connections are refused at once.
    std::thread::sleep(Duration::from_millis(200));
    assert!(std::net::TcpStream::connect(p.addr).is_err());
    // The idle session is told why after the grace period.
    idle.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut rest = Vec::new();
    let _ = idle.read_to_end(&mut rest);
    assert!(
        rest.windows(5).any(|w| w == b"57P01"),
        "{:?}",
        String::from_utf8_lossy(&rest)
    );
    assert!(start.elapsed() >= Duration::from_millis(900));
    let status = p.child.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(start.elapsed() < Duration::from_secs(8));
}

#[tokio::test]
async fn copy_of_100mb_in_and_out_streams_in_bounded_memory() {
    let db = common::TestDb::new().await;
    let p = ProxyProcess::spawn(&[]);
    let c = common::connect(&p.url("postgres", &db.name)).await;
    c.batch_execute("CREATE UNLOGGED TABLE big (id int, payload text)")
        .await
        .unwrap();
    let row_payload = "x".repeat(1000);
    let rows_per_chunk = 64;
    let chunks = 100 * 1024 * 1024 / (rows_per_chunk * 1007) + 1;
    let sink = c.copy_in("COPY big FROM STDIN").await.unwrap();
    futures_util::pin_mut!(sink);
    let mut id = 0;
    let mut sent = 0usize;
    for _ in 0..chunks {
        let mut chunk = String::with_capacity(rows_per_chunk * 1010);
        for _ in 0..rows_per_chunk {
            chunk.push_str(&format!("{id}\t{row_payload}\n"));
            id += 1;
        }
        sent += chunk.len();
        sink.send(bytes::Bytes::from(chunk)).await.unwrap();
    }
    let n = sink.finish().await.unwrap();
    assert_eq!(n, id as u64);
    assert!(sent >= 100 * 1024 * 1024);
    let out = c.copy_out("COPY big TO STDOUT").await.unwrap();
    futures_util::pin_mut!(out);
    let mut received = 0usize;
    while let Some(chunk) = out.next().await {
        received += chunk.unwrap().len();
    }
    assert_eq!(received, sent);
    let status = std::fs::read_to_string(format!("/proc/{}/status", p.pid())).unwrap();
    let hwm_kib: u64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(
        hwm_kib < 50 * 1024,
        "proxy peak RSS {hwm_kib} KiB while streaming 100 MB"
    );
}
