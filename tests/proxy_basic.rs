mod common;
use common::proxy::TestProxy;

#[tokio::test]
async fn simple_and_extended_through_proxy() {
    let db = common::TestDb::new().await;
    let p = TestProxy::start();
    let c = common::connect(&p.url("postgres", &db.name)).await;
    c.batch_execute("CREATE TABLE t (id int primary key, s text)")
        .await
        .unwrap();
    c.execute("INSERT INTO t VALUES ($1, $2)", &[&1i32, &"a"])
        .await
        .unwrap();
    let r = c
        .query_one("SELECT s FROM t WHERE id = $1", &[&1i32])
        .await
        .unwrap();
    assert_eq!(r.get::<_, String>(0), "a");
}
