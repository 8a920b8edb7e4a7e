//! The harness itself: a throwaway cluster starts and each test gets its own database.
mod common;

#[tokio::test]
async fn each_test_gets_its_own_database() {
    let a = common::TestDb::new().await;
    let b = common::TestDb::new().await;
    assert_ne!(a.name, b.name);
    let ca = a.client().await;
    ca.batch_execute("CREATE TABLE only_in_a (id int)")
        .await
        .unwrap();
    let cb = b.client().await;
    let n: i64 = cb
        .query_one(
            "SELECT count(*) FROM pg_class WHERE relname = 'only_in_a'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
}
