//! The relay driven in memory: the test plays the client on one `duplex` stream and
//! PostgreSQL on the other, with the answers PostgreSQL gives to each sequence (read off a
//! real server; the differential tests in tests/ check the same sequences against one).

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};

use super::super::Shared;
use super::super::gate::{SessionInfo, SessionState};
use super::super::upstream::Upstream;
use super::Session;
use crate::config::ProxyConfig;

fn m(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    v.extend_from_slice(body);
    v
}

struct Harness {
    client: DuplexStream,
    server: DuplexStream,
    info: Arc<SessionInfo>,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

fn start() -> Harness {
    let cfg = ProxyConfig::default();
    let upstream = Upstream::new(&cfg, None);
    let shared = Arc::new(Shared::new(cfg, upstream, None));
    let info = shared.gate.register(
        None,
        "u".into(),
        "db".into(),
        "test".into(),
        crate::shape::Shape::Integer,
    );
    let (client, relay_client) = duplex(64 * 1024);
    let (server, relay_server) = duplex(64 * 1024);
    let session = Session::new(
        relay_client,
        relay_server,
        b'I',
        info.clone(),
        shared.clone(),
    );
    let task = tokio::spawn(session.run());
    Harness {
        client,
        server,
        info,
        shared,
        task,
    }
}

/// Reads exactly `n` bytes, or fails the test after a second.
async fn read_n(s: &mut DuplexStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    tokio::time::timeout(Duration::from_secs(1), s.read_exact(&mut buf))
        .await
        .expect("bytes in time")
        .expect("read");
    buf
}

/// Waits until the gate shows the session in `state`.
async fn state_becomes(h: &Harness, state: SessionState) {
    for _ in 0..100 {
        if h.info.state() == state {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("session state {:?}, expected {state:?}", h.info.state());
}

/// The session task ends within a second; the test unregisters what it registered.
async fn ended(h: Harness) {
    tokio::time::timeout(Duration::from_secs(1), h.task)
        .await
        .unwrap()
        .unwrap();
    h.shared.gate.unregister(h.info.id);
}

/// PostgreSQL answers the Query `SELECT 1` and closes; the client gets the answer.
async fn answer_select_1_and_close(h: &mut Harness) {
    let answer = [m(b'C', b"SELECT 1\0"), m(b'Z', b"I")].concat();
    h.server.write_all(&answer).await.unwrap();
    h.server.shutdown().await.unwrap();
    assert_eq!(read_n(&mut h.client, answer.len()).await, answer);
}

#[tokio::test]
async fn the_five_byte_close_goes_to_postgresql_unchanged_and_ends_nothing() {
    let mut h = start();
    let close = [b'C', 0, 0, 0, 5, b'S'];
    let sync = m(b'S', b"");
    h.client
        .write_all(&[&close[..], &sync].concat())
        .await
        .unwrap();
    assert_eq!(
        read_n(&mut h.server, 11).await,
        [&close[..], &sync].concat()
    );
    // PostgreSQL: ERROR invalid string in message, skip to Sync, ReadyForQuery.
    let err = m(
        b'E',
        b"SERROR\0VERROR\0C08P01\0Minvalid string in message\0\0",
    );
    let ready = m(b'Z', b"I");
    h.server
        .write_all(&[&err[..], &ready].concat())
        .await
        .unwrap();
    assert_eq!(
        read_n(&mut h.client, err.len() + 6).await,
        [&err[..], &ready].concat()
    );
    state_becomes(&h, SessionState::Idle).await;
    drop(h.client);
    tokio::time::timeout(Duration::from_secs(1), h.task)
        .await
        .unwrap()
        .unwrap();
    // Whatever ended it, the session leaves the registry with its guard (src/proxy/mod.rs);
    // here the test registered it, so it is still listed until unregistered.
    h.shared.gate.unregister(h.info.id);
}

#[tokio::test]
async fn an_extended_copy_leaves_the_session_idle() {
    let mut h = start();
    // Parse COPY … FROM STDIN, Bind, Describe, Execute, Sync, then the data, CopyDone, Sync.
    let first = [
        m(b'P', b"\0COPY t FROM STDIN\0\0\0"),
        m(b'B', b"\0\0\0\0\0\0\0\0"),
        m(b'D', b"P\0"),
        m(b'E', b"\0\0\0\0\0"),
        m(b'S', b""),
    ]
    .concat();
    h.client.write_all(&first).await.unwrap();
    read_n(&mut h.server, first.len()).await;
    state_becomes(&h, SessionState::Active).await;
    let answers = [
        m(b'1', b""),
        m(b'2', b""),
        m(b'n', b""),
        m(b'G', b"\0\0\x01\0\0"),
    ]
    .concat();
    h.server.write_all(&answers).await.unwrap();
    read_n(&mut h.client, answers.len()).await;
    let data = [m(b'd', b"1\n"), m(b'c', b""), m(b'S', b"")].concat();
    h.client.write_all(&data).await.unwrap();
    read_n(&mut h.server, data.len()).await;
    let end = [m(b'C', b"COPY 1\0"), m(b'Z', b"I")].concat();
    h.server.write_all(&end).await.unwrap();
    read_n(&mut h.client, end.len()).await;
    // PostgreSQL read the first Sync inside the COPY: one ReadyForQuery, and the session is
    // idle, so a pause can drain it.
    state_becomes(&h, SessionState::Idle).await;
    h.shared.gate.unregister(h.info.id);
}

#[tokio::test]
async fn terminate_right_after_a_query_still_delivers_its_answer() {
    let mut h = start();
    let q = m(b'Q', b"SELECT 1\0");
    let x = m(b'X', b"");
    h.client.write_all(&[&q[..], &x].concat()).await.unwrap();
    read_n(&mut h.server, q.len() + x.len()).await;
    answer_select_1_and_close(&mut h).await;
    ended(h).await;
}

#[tokio::test]
async fn an_unknown_type_byte_is_postgresqls_to_answer() {
    let mut h = start();
    let q = m(b'Q', b"SELECT 1\0");
    h.client
        .write_all(&[&q[..], b"!garbage after it"].concat())
        .await
        .unwrap();
    // The valid message and the bad type byte go; nothing after it (out of frame).
    assert_eq!(
        read_n(&mut h.server, q.len() + 1).await,
        [&q[..], b"!"].concat()
    );
    let fatal = m(
        b'E',
        b"SFATAL\0VFATAL\0C08P01\0Minvalid frontend message type 33\0\0",
    );
    h.server.write_all(&fatal).await.unwrap();
    h.server.shutdown().await.unwrap();
    assert_eq!(read_n(&mut h.client, fatal.len()).await, fatal);
    // No second FATAL of keyshift's: the connection just ends.
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(1), h.client.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert!(rest.is_empty(), "{rest:?}");
    h.shared.gate.unregister(h.info.id);
}

#[tokio::test]
async fn a_client_that_closes_its_side_still_gets_its_answer() {
    let mut h = start();
    let q = m(b'Q', b"SELECT 1\0");
    h.client.write_all(&q).await.unwrap();
    h.client.shutdown().await.unwrap();
    read_n(&mut h.server, q.len()).await;
    // keyshift closes its side in turn, as the client's EOF would reach PostgreSQL.
    let mut more = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(1), h.server.read(&mut more))
        .await
        .expect("the client's EOF in time")
        .unwrap();
    assert_eq!(n, 0);
    answer_select_1_and_close(&mut h).await;
    ended(h).await;
}

#[tokio::test]
async fn a_message_begun_during_copy_sends_its_type_byte_ahead() {
    let mut h = start();
    let q = m(b'Q', b"COPY t FROM STDIN\0");
    h.client.write_all(&q).await.unwrap();
    read_n(&mut h.server, q.len()).await;
    let copy_in = m(b'G', b"\0\0\x01\0\0");
    h.server.write_all(&copy_in).await.unwrap();
    read_n(&mut h.client, copy_in.len()).await;
    // A Parse's first two bytes: PostgreSQL, in COPY, refuses it from the type byte alone.
    h.client.write_all(b"P\0").await.unwrap();
    assert_eq!(read_n(&mut h.server, 1).await, b"P");
    let refusal = [
        m(
            b'E',
            b"SERROR\0VERROR\0C08P01\0Munexpected message type 0x50 during COPY from stdin\0\0",
        ),
        m(
            b'E',
            b"SFATAL\0VFATAL\0C08P01\0Mterminating connection because protocol synchronization was lost\0\0",
        ),
    ]
    .concat();
    h.server.write_all(&refusal).await.unwrap();
    h.server.shutdown().await.unwrap();
    assert_eq!(read_n(&mut h.client, refusal.len()).await, refusal);
    ended(h).await;
}
