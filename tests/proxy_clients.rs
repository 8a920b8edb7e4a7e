//! The proxy is transparent to tokio-postgres: simple and extended protocol, binary
//! parameters, pipelining, errors mid-pipeline, notifications, cancel, and a client that dies.
mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use common::proxy::{TestProxy, read_until_ready, startup_packet};
use futures_util::{StreamExt, TryStreamExt, future};
use tokio_postgres::{AsyncMessage, NoTls, SimpleQueryMessage};

async fn setup() -> (common::TestDb, TestProxy, tokio_postgres::Client) {
    let db = common::TestDb::new().await;
    let p = TestProxy::start();
    let c = common::connect(&p.url("postgres", &db.name)).await;
    (db, p, c)
}

#[tokio::test]
async fn binary_parameters_of_many_types_round_trip() {
    let (_db, _p, c) = setup().await;
    c.batch_execute(
        "CREATE TABLE ty (a smallint, b int, c bigint, d real, e double precision, f text,
         g bytea, h boolean, i timestamptz, j uuid, k jsonb, l int[], m numeric, n date)",
    )
    .await
    .unwrap();
    let ts = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let uuid = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11".to_string();
    let bytes: Vec<u8> = (0..=255u8).collect();
    let arr = vec![1i32, -2, 3];
    c.execute(
        "INSERT INTO ty VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10::text::uuid,$11::text::jsonb,$12,$13::text::numeric,$14::text::date)",
        &[
            &-7i16, &i32::MIN, &i64::MAX, &1.5f32, &-2.25f64, &"héllo\u{1F600}", &bytes, &true, &ts,
            &uuid, &r#"{"k": [1, null]}"#, &arr, &"12345678901234567890.123", &"2024-02-29",
        ],
    )
    .await
    .unwrap();
    let r = c
        .query_one(
            "SELECT a,b,c,d,e,f,g,h,i,j::text,k::text,l,m::text,n::text FROM ty",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(r.get::<_, i16>(0), -7);
    assert_eq!(r.get::<_, i32>(1), i32::MIN);
    assert_eq!(r.get::<_, i64>(2), i64::MAX);
    assert_eq!(r.get::<_, f32>(3), 1.5);
    assert_eq!(r.get::<_, f64>(4), -2.25);
    assert_eq!(r.get::<_, String>(5), "héllo\u{1F600}");
    assert_eq!(r.get::<_, Vec<u8>>(6), bytes);
    assert!(r.get::<_, bool>(7));
    assert_eq!(r.get::<_, std::time::SystemTime>(8), ts);
    assert_eq!(r.get::<_, String>(9), uuid);
    assert_eq!(r.get::<_, String>(10), r#"{"k": [1, null]}"#);
    assert_eq!(r.get::<_, Vec<i32>>(11), arr);
    assert_eq!(r.get::<_, String>(12), "12345678901234567890.123");
    assert_eq!(r.get::<_, String>(13), "2024-02-29");

    // A large parameter and a large result, beyond any single read.
    let big = vec![0xabu8; 3 * 1024 * 1024];
    let r = c
        .query_one("SELECT $1::bytea, length($1::bytea)", &[&big])
        .await
        .unwrap();
    assert_eq!(r.get::<_, Vec<u8>>(0), big);
    assert_eq!(r.get::<_, i32>(1), big.len() as i32);
}

#[tokio::test]
async fn simple_protocol_multi_statement_and_results() {
    let (_db, _p, c) = setup().await;
    let msgs = c
        .simple_query("CREATE TABLE s (x int); INSERT INTO s SELECT generate_series(1,3); SELECT sum(x) FROM s; SELECT 'a' AS y")
        .await
        .unwrap();
    let rows: Vec<_> = msgs
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap().to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(rows, vec!["6", "a"]);
    let tags: Vec<u64> = msgs
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::CommandComplete(n) => Some(*n),
            _ => None,
        })
        .collect();
    assert_eq!(tags, vec![0, 3, 1, 1]);
    // An error inside a simple query keeps the session usable.
    let e = c.simple_query("SELECT 1/0").await.unwrap_err();
    assert_eq!(e.code().unwrap().code(), "22012");
    assert_eq!(c.simple_query("SELECT 1").await.unwrap().len(), 3);
}

#[tokio::test]
async fn pipelined_queries_with_an_error_in_the_middle() {
    let (_db, _p, c) = setup().await;
    c.batch_execute("CREATE TABLE p (id int primary key)")
        .await
        .unwrap();
    let ins = c
        .prepare("INSERT INTO p VALUES ($1) RETURNING id")
        .await
        .unwrap();
    // tokio-postgres pipelines queries issued concurrently on one connection.
    let futs: Vec<_> = (0..50i32)
        .map(|i| {
            let c = &c;
            let ins = &ins;
            async move {
                // id 25 appears twice: the second one fails, the rest must not be affected.
                let id = if i == 26 { 25 } else { i };
                c.query_one(ins, &[&id]).await.map(|r| r.get::<_, i32>(0))
            }
        })
        .collect();
    let results = future::join_all(futs).await;
    for (i, r) in results.iter().enumerate() {
        if i == 26 {
            let e = r.as_ref().unwrap_err();
            assert_eq!(e.code().unwrap().code(), "23505", "{e}");
        } else {
            assert_eq!(*r.as_ref().unwrap(), i as i32);
        }
    }
    let n: i64 = c
        .query_one("SELECT count(*) FROM p", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 49);
}

#[tokio::test]
async fn transactions_and_copy_small() {
    let (_db, _p, mut c) = setup().await;
    c.batch_execute("CREATE TABLE cp (id int, s text)")
        .await
        .unwrap();
    let tx = c.transaction().await.unwrap();
    let sink = tx.copy_in("COPY cp FROM STDIN").await.unwrap();
    let data: String = (0..1000).map(|i| format!("{i}\trow {i}\n")).collect();
    futures_util::pin_mut!(sink);
    use futures_util::SinkExt;
    sink.send(bytes::Bytes::from(data.clone())).await.unwrap();
    assert_eq!(sink.finish().await.unwrap(), 1000);
    tx.commit().await.unwrap();
    let out = c.copy_out("COPY cp TO STDOUT").await.unwrap();
    let chunks: Vec<bytes::Bytes> = out.try_collect().await.unwrap();
    let got: Vec<u8> = chunks.concat();
    assert_eq!(String::from_utf8(got).unwrap(), data);
    // A rolled back transaction leaves nothing.
    let tx = c.transaction().await.unwrap();
    tx.execute("DELETE FROM cp", &[]).await.unwrap();
    tx.rollback().await.unwrap();
    let n: i64 = c
        .query_one("SELECT count(*) FROM cp", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1000);
}

#[tokio::test]
async fn listen_notify_and_notices_arrive() {
    let db = common::TestDb::new().await;
    let p = TestProxy::start();
    let (client, mut conn) = tokio_postgres::connect(&p.url("postgres", &db.name), NoTls)
        .await
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let stream = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
    tokio::spawn(stream.for_each(move |m| {
        if let Ok(m) = m {
            let _ = tx.send(m);
        }
        future::ready(())
    }));
    client.batch_execute("LISTEN chan").await.unwrap();
    let direct = db.client().await;
    direct.batch_execute("NOTIFY chan, 'hello'").await.unwrap();
    client
        .batch_execute("DO $$ BEGIN RAISE NOTICE 'a notice'; END $$")
        .await
        .unwrap();
    let mut got_notification = false;
    let mut got_notice = false;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !(got_notification && got_notice) && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(200), rx.recv()).await {
            Ok(Some(AsyncMessage::Notification(n))) => {
                assert_eq!(n.channel(), "chan");
                assert_eq!(n.payload(), "hello");
                got_notification = true;
            }
            Ok(Some(AsyncMessage::Notice(n))) => {
                assert_eq!(n.message(), "a notice");
                got_notice = true;
            }
            // An idle LISTENer gets notifications without sending anything.
            _ => {}
        }
    }
    assert!(got_notification && got_notice);
}

#[tokio::test]
async fn cancel_of_pg_sleep_is_fast() {
    let (_db, _p, c) = setup().await;
    let token = c.cancel_token();
    let start = Instant::now();
    let sleeper = c.simple_query("SELECT pg_sleep(30)");
    let canceller = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        token.cancel_query(NoTls).await.unwrap();
    };
    let (r, ()) = tokio::join!(sleeper, canceller);
    let e = r.unwrap_err();
    assert_eq!(e.code().unwrap().code(), "57014", "{e}");
    assert!(
        start.elapsed() < Duration::from_millis(1200),
        "took {:?}",
        start.elapsed()
    );
    // The session goes on after the cancel.
    assert_eq!(c.simple_query("SELECT 1").await.unwrap().len(), 3);
}

#[tokio::test]
async fn cancel_with_a_wrong_key_cancels_nothing() {
    let (_db, p, c) = setup().await;
    let sleeper = c.simple_query("SELECT pg_sleep(1)");
    let bogus = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut s = std::net::TcpStream::connect(p.addr).unwrap();
        let mut pkt = vec![0, 0, 0, 16];
        pkt.extend_from_slice(&80877102u32.to_be_bytes());
        pkt.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 2]);
        s.write_all(&pkt).unwrap();
    };
    let (r, ()) = tokio::join!(sleeper, bogus);
    assert!(r.is_ok());
}

#[tokio::test]
async fn killed_client_mid_transaction_leaves_no_backend() {
    let db = common::TestDb::new().await;
    let p = TestProxy::start();
    let direct = db.client().await;
    let mut s = std::net::TcpStream::connect(p.addr).unwrap();
    s.write_all(&startup_packet("postgres", &db.name, "killme"))
        .unwrap();
    assert_eq!(read_until_ready(&mut s), b'I');
    let q = b"BEGIN; CREATE TABLE half_done (id int);\0";
    let mut msg = vec![b'Q'];
    msg.extend_from_slice(&((q.len() + 4) as u32).to_be_bytes());
    msg.extend_from_slice(q);
    s.write_all(&msg).unwrap();
    assert_eq!(read_until_ready(&mut s), b'T');
    let count = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'killme'";
    let n: i64 = direct.query_one(count, &[]).await.unwrap().get(0);
    assert_eq!(n, 1);
    // The client vanishes without a Terminate, as a killed process does.
    drop(s);
    let start = Instant::now();
    loop {
        let n: i64 = direct.query_one(count, &[]).await.unwrap().get(0);
        if n == 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "backend still there after 1s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Its transaction was rolled back.
    let n: i64 = direct
        .query_one(
            "SELECT count(*) FROM pg_class WHERE relname = 'half_done'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
}

#[tokio::test]
async fn many_concurrent_sessions() {
    let db = common::TestDb::new().await;
    let p = TestProxy::start();
    let url = p.url("postgres", &db.name);
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let url = url.clone();
            tokio::spawn(async move {
                let c = common::connect(&url).await;
                for j in 0..20i64 {
                    let r = c
                        .query_one("SELECT $1::bigint * 2", &[&(i * 100 + j)])
                        .await
                        .unwrap();
                    assert_eq!(r.get::<_, i64>(0), (i * 100 + j) * 2);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    // Sessions are gone from the registry once their clients have gone.
    let start = Instant::now();
    loop {
        let (_, body) = common::proxy::http(p.admin, "GET", "/v1/status", None);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        if v["total_sessions"] == 0 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "{v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
