//! Bad input ends only the connection that sent it, with an ErrorResponse where the
//! protocol allows, and never disturbs other sessions or the proxy.
mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::proxy::{TestProxy, raw_session, startup_packet, test_config};

/// Reads everything until the proxy closes; returns the bytes.
fn read_to_close(s: &mut TcpStream) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

/// The SQLSTATE of the first ErrorResponse in `bytes`, if any.
fn error_code(bytes: &[u8]) -> Option<String> {
    let mut i = 0;
    while i + 5 <= bytes.len() {
        let tag = bytes[i];
        let len =
            u32::from_be_bytes([bytes[i + 1], bytes[i + 2], bytes[i + 3], bytes[i + 4]]) as usize;
        let end = (i + 1 + len).min(bytes.len());
        if tag == b'E' {
            let mut f = &bytes[i + 5..end];
            while let Some((&code, rest)) = f.split_first() {
                let nul = rest.iter().position(|&b| b == 0)?;
                if code == b'C' {
                    return Some(String::from_utf8_lossy(&rest[..nul]).into_owned());
                }
                f = &rest[nul + 1..];
            }
        }
        i += 1 + len;
    }
    None
}

fn authenticated(p: &TestProxy, db: &str) -> TcpStream {
    raw_session(p.addr, db)
}

#[tokio::test]
async fn each_bad_input_ends_only_its_connection() {
    let db = common::TestDb::new().await;
    let mut cfg = test_config();
    cfg.max_message_bytes = 64 * 1024;
    cfg.startup_timeout = Duration::from_secs(1);
    let p = TestProxy::start_with(cfg);
    // A healthy session that must survive everything below.
    let healthy = common::connect(&p.url("postgres", &db.name)).await;
    healthy
        .batch_execute("CREATE TABLE alive (n int)")
        .await
        .unwrap();

    // Garbage before startup: a nonsense length.
    let mut s = TcpStream::connect(p.addr).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    assert_eq!(error_code(&read_to_close(&mut s)).as_deref(), Some("08P01"));

    // A startup length shorter than its own header.
    let mut s = TcpStream::connect(p.addr).unwrap();
    s.write_all(&[0, 0, 0, 2, 0, 3, 0, 0]).unwrap();
    assert_eq!(error_code(&read_to_close(&mut s)).as_deref(), Some("08P01"));

    // An unsupported protocol version (3.2) and a nonsense one.
    for version in [0x0003_0002u32, 0x0009_0000] {
        let mut s = TcpStream::connect(p.addr).unwrap();
        let mut pkt = vec![0, 0, 0, 9];
        pkt.extend_from_slice(&version.to_be_bytes());
        pkt.push(0);
        s.write_all(&pkt).unwrap();
        let code = error_code(&read_to_close(&mut s));
        assert!(
            matches!(code.as_deref(), Some("0A000") | Some("08P01")),
            "{code:?}"
        );
    }

    // GSSENCRequest is refused with N, and the connection goes on.
    let mut s = TcpStream::connect(p.addr).unwrap();
    s.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30]).unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"N");
    s.write_all(&startup_packet("postgres", &db.name, "bad_input"))
        .unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).unwrap();
    assert_eq!(b[0], b'R');

    // A client that never finishes its startup is ended after startup_timeout.
    let start = Instant::now();
    let mut s = TcpStream::connect(p.addr).unwrap();
    s.write_all(&[0, 0, 0]).unwrap();
    assert_eq!(error_code(&read_to_close(&mut s)).as_deref(), Some("08P01"));
    assert!(start.elapsed() < Duration::from_secs(5));

    // After authentication: a length larger than max_message_bytes.
    let mut s = authenticated(&p, &db.name);
    s.write_all(&[b'Q', 0x10, 0, 0, 0]).unwrap();
    assert_eq!(error_code(&read_to_close(&mut s)).as_deref(), Some("08P01"));

    // What PostgreSQL itself ends the session for gets PostgreSQL's own answer, byte for
    // byte: a length shorter than the header (closed without a word), a small message longer
    // than PostgreSQL reads (10,000 bytes for Sync), an unknown type (FATAL 08P01), and a
    // valid message followed by an unknown type in the same write (answered, then FATAL).
    let direct: std::net::SocketAddr = common::server().addr().parse().unwrap();
    let mut select = vec![b'Q', 0, 0, 0, 13];
    select.extend_from_slice(b"SELECT 1\0");
    let bad_after_good = [&select[..], &[b'!', 0, 0, 0, 4]].concat();
    for bytes in [
        &[b'Q', 0, 0, 0, 1][..],
        &[b'S', 0, 0, 0x30, 0],
        &[b'!', 0, 0, 0, 4],
        &b"!"[..],
        &bad_after_good,
    ] {
        let mut d = raw_session(direct, &db.name);
        d.write_all(bytes).unwrap();
        let expected = read_to_close(&mut d);
        let mut s = authenticated(&p, &db.name);
        s.write_all(bytes).unwrap();
        assert_eq!(read_to_close(&mut s), expected, "{bytes:?}");
    }

    // Random garbage after authentication.
    let mut s = authenticated(&p, &db.name);
    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let _ = s.write_all(&garbage);
    let _ = read_to_close(&mut s);

    // A message that ends early: the client goes away mid-message. Nothing to answer.
    let mut s = authenticated(&p, &db.name);
    s.write_all(&[b'Q', 0, 0, 0, 100, b'S', b'E']).unwrap();
    drop(s);

    // The healthy session never noticed, and neither did new ones.
    healthy
        .batch_execute("INSERT INTO alive VALUES (1)")
        .await
        .unwrap();
    let c = common::connect(&p.url("postgres", &db.name)).await;
    let n: i64 = c
        .query_one("SELECT count(*) FROM alive", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    let (_, metrics) = common::proxy::http(p.admin, "GET", "/metrics", None);
    assert!(
        metrics.contains("keyshift_protocol_errors_total{side=\"client\"}"),
        "{metrics}"
    );
}

#[tokio::test]
async fn fuzzed_startup_bytes_never_hurt_the_proxy() {
    let db = common::TestDb::new().await;
    let mut cfg = test_config();
    cfg.startup_timeout = Duration::from_millis(500);
    let p = TestProxy::start_with(cfg);
    let mut seed = 0x9e3779b97f4a7c15u64;
    for round in 0..200 {
        let mut s = TcpStream::connect(p.addr).unwrap();
        let len = (round * 7) % 64 + 1;
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        let _ = s.write_all(&bytes);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let _ = read_to_close(&mut s);
    }
    let c = common::connect(&p.url("postgres", &db.name)).await;
    assert_eq!(c.simple_query("SELECT 1").await.unwrap().len(), 3);
}

#[tokio::test]
async fn upstream_down_or_silent_gets_an_error_not_a_hang() {
    // Nothing listens on this port.
    let mut cfg = test_config();
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    cfg.upstream = dead.local_addr().unwrap().to_string();
    drop(dead);
    cfg.connect_timeout = Duration::from_secs(1);
    let p = TestProxy::start_with(cfg);
    let start = Instant::now();
    let e = tokio_postgres::connect(&p.url("postgres", "postgres"), tokio_postgres::NoTls)
        .await
        .err()
        .unwrap();
    assert_eq!(e.code().map(|c| c.code()), Some("08001"), "{e}");
    assert!(start.elapsed() < Duration::from_secs(3));
    let (code, body) = common::proxy::http(p.admin, "GET", "/readyz", None);
    assert_eq!(code, 503, "{body}");

    // A server that accepts but never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut cfg = test_config();
    cfg.upstream = silent.local_addr().unwrap().to_string();
    cfg.upstream_tls = keyshift::config::UpstreamTls::Disable;
    cfg.connect_timeout = Duration::from_secs(1);
    let p = TestProxy::start_with(cfg);
    let start = Instant::now();
    let e = tokio_postgres::connect(&p.url("postgres", "postgres"), tokio_postgres::NoTls)
        .await
        .err()
        .unwrap();
    assert_eq!(e.code().map(|c| c.code()), Some("08006"), "{e}");
    assert!(start.elapsed() < Duration::from_secs(3));
    drop(silent);
}
