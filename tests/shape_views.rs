//! keyshift's views per shape (src/migrate/views.rs) against real PostgreSQL: made by expand,
//! each shape's names, types and order unchanged through the real cutover and rollback,
//! updatable with the table's defaults and privileges, gone after abort and finalize.
mod common;
mod migrate_support;

use migrate_support::*;
use tokio_postgres::Client;
use tokio_postgres::types::Type;

/// A parent with a quoted column and defaults, a child that is also a parent (nullable
/// self-reference), and a child without a key of its own. `r` is a role per database (roles are
/// cluster-wide): SELECT on the tables, UPDATE of one column, and row-level security on users.
fn schema(r: &str) -> String {
    format!(
        r#"
CREATE TABLE users (id serial PRIMARY KEY, "Display Name" text NOT NULL DEFAULT 'anon',
    created_at timestamptz DEFAULT now());
CREATE TABLE posts (id bigserial PRIMARY KEY, user_id integer NOT NULL REFERENCES users (id),
    title text DEFAULT 'untitled', parent_id bigint REFERENCES posts (id));
CREATE TABLE likes (user_id integer REFERENCES users (id), note text);
INSERT INTO users ("Display Name") SELECT 'u' || g FROM generate_series(1, 5) g;
INSERT INTO posts (user_id, title) SELECT (g % 5) + 1, 'p' || g FROM generate_series(1, 10) g;
UPDATE posts SET parent_id = id - 1 WHERE id > 1;
INSERT INTO likes SELECT (g % 5) + 1, 'l' || g FROM generate_series(1, 5) g;
CREATE ROLE {r};
GRANT SELECT ON users, posts TO {r};
GRANT UPDATE ("Display Name") ON users TO {r};
ALTER TABLE users ENABLE ROW LEVEL SECURITY;
CREATE POLICY only_u2 ON users FOR SELECT TO {r} USING ("Display Name" = 'u2');
CREATE POLICY upd ON users FOR UPDATE TO {r} USING (true);
"#
    )
}

/// Name and type of each column of `SELECT * FROM rel`, as a driver sees them
/// (RowDescription).
async fn shape_of(c: &Client, rel: &str) -> Vec<(String, Type)> {
    let st = c
        .prepare(&format!("SELECT * FROM {rel}"))
        .await
        .unwrap_or_else(|e| panic!("{rel}: {e}"));
    st.columns()
        .iter()
        .map(|col| (col.name().to_string(), col.type_().clone()))
        .collect()
}

/// `"id int4, Display Name text"`: each column's name, then its type's name.
fn cols(spec: &str) -> Vec<(String, Type)> {
    spec.split(", ")
        .map(|c| {
            let (name, ty) = c.rsplit_once(' ').unwrap();
            let ty = match ty {
                "int4" => Type::INT4,
                "int8" => Type::INT8,
                "text" => Type::TEXT,
                "timestamptz" => Type::TIMESTAMPTZ,
                "uuid" => Type::UUID,
                other => panic!("add {other} to cols()"),
            };
            (name.to_string(), ty)
        })
        .collect()
}

const VIEWS: [&str; 6] = [
    "keyshift_integer_public.users",
    "keyshift_uuid_public.users",
    "keyshift_integer_public.posts",
    "keyshift_uuid_public.posts",
    "keyshift_integer_public.likes",
    "keyshift_uuid_public.likes",
];

async fn all_shapes(c: &Client) -> Vec<Vec<(String, Type)>> {
    let mut v = Vec::new();
    for rel in VIEWS {
        v.push(shape_of(c, rel).await);
    }
    v
}

/// `sql` returns (view value, table value) pairs; every pair must be equal.
async fn same(c: &Client, sql: &str) {
    let rows = c
        .query(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    assert!(!rows.is_empty(), "{sql}: no rows");
    for r in rows {
        let (a, b): (Option<String>, Option<String>) = (r.get(0), r.get(1));
        assert_eq!(a, b, "{sql}");
    }
}

async fn pg_error(c: &Client, sql: &str) -> String {
    match c.batch_execute(sql).await {
        Ok(()) => panic!("{sql}: succeeded"),
        Err(e) => e
            .as_db_error()
            .map(|d| format!("{} {}", d.code().code(), d.message()))
            .unwrap_or_else(|| e.to_string()),
    }
}

/// Inserts a user through the integer view the way an integer-shaped application does (no
/// key, no uuid): both come from the view's defaults. Returns the integer key.
async fn insert_integer_user(c: &Client, name: &str) -> i32 {
    let r = c
        .query_one(
            r#"INSERT INTO keyshift_integer_public.users ("Display Name") VALUES ($1) RETURNING id, id_uuid::text"#,
            &[&name],
        )
        .await
        .unwrap();
    assert!(r.get::<_, Option<String>>(1).is_some(), "{name}: no uuid");
    r.get(0)
}

async fn view_schemas(c: &Client) -> i64 {
    count(
        c,
        "SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'keyshift\\_%'",
    )
    .await
}

/// A database with `schema()`, a client, and its role's name.
async fn setup() -> (common::TestDb, Client, String) {
    let db = common::TestDb::new().await;
    let role = format!("reader_{}", db.name);
    let c = db.client().await;
    c.batch_execute(&schema(&role)).await.expect("schema");
    (db, c, role)
}

#[tokio::test]
async fn views_keep_each_shape_through_cutover_and_rollback() {
    let (db, c, role) = setup().await;
    let url = db.url();
    ks_expect(&url, &["expand"], 0);

    // Names, types and order of each shape, in VIEWS' order.
    let want: Vec<_> = [
        "id int4, Display Name text, created_at timestamptz, id_uuid uuid",
        "id_legacy int4, Display Name text, created_at timestamptz, id uuid",
        "id int8, user_id int4, title text, parent_id int8, id_uuid uuid, user_id_uuid uuid, parent_id_uuid uuid",
        "id_legacy int8, user_id_legacy int4, title text, parent_id_legacy int8, id uuid, user_id uuid, parent_id uuid",
        "user_id int4, note text, user_id_uuid uuid",
        "user_id_legacy int4, note text, user_id uuid",
    ]
    .map(cols)
    .into();
    assert_eq!(all_shapes(&c).await, want);
    // Every view: security_invoker (this server is 15 or newer), keyshift's comment.
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM pg_class v WHERE v.relnamespace::regnamespace::text LIKE 'keyshift\\_%'
               AND v.relkind = 'v' AND 'security_invoker=true' = ANY (v.reloptions)
               AND obj_description(v.oid, 'pg_class') LIKE 'Owned by keyshift%'"
        )
        .await,
        6
    );
    // A second expand changes nothing (the views exist).
    let ddl = "SELECT count(*) FROM keyshift.events WHERE kind = 'ddl'";
    let n = count(&c, ddl).await;
    ks_expect(&url, &["expand"], 0);
    assert_eq!(count(&c, ddl).await, n);

    // The integer view: an insert that omits id and id_uuid gets both defaults.
    let v1_id = insert_integer_user(&c, "v1").await;
    // UPDATE ... SET col = DEFAULT through a view gives the table's default, not NULL.
    c.batch_execute(
        r#"UPDATE keyshift_integer_public.users SET "Display Name" = DEFAULT, created_at = DEFAULT WHERE id = 1;
           UPDATE keyshift_uuid_public.posts SET title = DEFAULT WHERE id_legacy = 2"#,
    )
    .await
    .unwrap();
    assert_eq!(
        count(&c, r#"SELECT count(*) FROM users WHERE id = 1 AND "Display Name" = 'anon' AND created_at IS NOT NULL"#).await,
        1
    );
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM posts WHERE id = 2 AND title = 'untitled'"
        )
        .await,
        1
    );

    ks_expect(&url, &["backfill"], 0);
    ks_expect(&url, &["harden"], 0);
    // The uuid view with client-supplied uuids, as an application in the uuid shape writes
    // (the integers, which the proxy's dual-write fills, are given here by hand).
    let u2 = "0190f5c8-0000-7000-8000-000000000002";
    let p2 = "0190f5c8-0000-7000-8000-0000000000b2";
    let r = c
        .query_one(
            &format!(
                r#"INSERT INTO keyshift_uuid_public.users (id, "Display Name") VALUES ('{u2}', 'v2') RETURNING id_legacy"#
            ),
            &[],
        )
        .await
        .unwrap();
    let v2_legacy: i32 = r.get(0);
    c.batch_execute(&format!(
        "INSERT INTO keyshift_uuid_public.posts (id, user_id, user_id_legacy, title) VALUES ('{p2}', '{u2}', {v2_legacy}, 'by v2')"
    ))
    .await
    .unwrap();
    assert_eq!(
        count(&c, &format!("SELECT count(*) FROM posts p JOIN users u ON u.id = p.user_id WHERE p.id_uuid = '{p2}' AND p.user_id_uuid = '{u2}' AND u.id_uuid = '{u2}'")).await,
        1
    );
    // The shadow FK holds through the view.
    let e = pg_error(
        &c,
        &format!(
            "INSERT INTO keyshift_uuid_public.posts (user_id, user_id_legacy) VALUES ('{p2}', {v1_id})"
        ),
    )
    .await;
    assert!(e.starts_with("23503"), "{e}");

    // Privileges and row-level security are the table's, for the session's role.
    c.batch_execute(&format!("SET ROLE {role}")).await.unwrap();
    for v in [
        "keyshift_integer_public.users",
        "keyshift_uuid_public.users",
    ] {
        assert_eq!(
            count(&c, &format!("SELECT count(*) FROM {v}")).await,
            1,
            "{v}: the policy shows the role only u2"
        );
    }
    assert_eq!(
        count(&c, "SELECT count(*) FROM keyshift_uuid_public.posts").await,
        11
    );
    let e = pg_error(
        &c,
        r#"INSERT INTO keyshift_integer_public.users ("Display Name") VALUES ('no')"#,
    )
    .await;
    assert!(e.starts_with("42501"), "{e}");
    let e = pg_error(
        &c,
        "UPDATE keyshift_uuid_public.users SET created_at = now()",
    )
    .await;
    assert!(e.starts_with("42501"), "{e}");
    let e = pg_error(&c, "SELECT count(*) FROM keyshift_uuid_public.likes").await;
    assert!(e.starts_with("42501"), "no privilege on likes: {e}");
    // The column privilege, under the column's name in each shape.
    c.batch_execute(
        r#"UPDATE keyshift_uuid_public.users SET "Display Name" = 'u2' WHERE "Display Name" = 'u2'"#,
    )
    .await
    .unwrap();
    c.batch_execute("RESET ROLE").await.unwrap();

    // The real cutover: each view keeps its names and types, the integer view shows the
    // legacy integers, the uuid view the new keys.
    ks_expect(&url, &["cutover"], 0);
    assert!(
        shape_of(&c, "users")
            .await
            .contains(&("id".to_string(), Type::UUID)),
        "the table did change"
    );
    assert_eq!(all_shapes(&c).await, want, "after cutover");
    same(&c, "SELECT v.id::text, t.id_legacy::text FROM keyshift_integer_public.posts v JOIN posts t ON t.id = v.id_uuid").await;
    same(&c, "SELECT v.user_id::text, t.user_id_legacy::text FROM keyshift_integer_public.posts v JOIN posts t ON t.id = v.id_uuid").await;
    same(&c, "SELECT v.id::text, t.id::text FROM keyshift_uuid_public.users v JOIN users t ON t.id_legacy = v.id_legacy").await;
    same(&c, "SELECT v.user_id::text, t.user_id::text FROM keyshift_uuid_public.likes v JOIN likes t ON t.note = v.note").await;
    // Writes in the integer shape after the swap still get their uuid key.
    insert_integer_user(&c, "v1 after").await;

    ks_expect(&url, &["rollback"], 0);
    assert_eq!(
        shape_of(&c, "users").await[0],
        ("id".to_string(), Type::INT4)
    );
    assert_eq!(all_shapes(&c).await, want, "after rollback");
    same(&c, "SELECT v.id::text, t.id::text FROM keyshift_integer_public.posts v JOIN posts t ON t.id_uuid = v.id_uuid").await;
    same(&c, "SELECT v.id::text, t.id_uuid::text FROM keyshift_uuid_public.users v JOIN users t ON t.id = v.id_legacy").await;

    // Cut over again and finalize: the views go before the legacy columns they read.
    ks_expect(&url, &["harden"], 0);
    ks_expect(&url, &["cutover"], 0);
    // finalize needs new connections to default to the uuid shape.
    ks_expect(&url, &["shape", "default", "uuid"], 0);
    ks_expect(&url, &["finalize", "--yes"], 0);
    assert_eq!(view_schemas(&c).await, 0);
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM pg_proc WHERE proname = 'create_shape_view'"
        )
        .await,
        0
    );
    assert_eq!(
        count(&c, "SELECT count(*) FROM pg_attribute WHERE attrelid = 'posts'::regclass AND attname LIKE '%legacy'").await,
        0
    );
}

#[tokio::test]
async fn abort_removes_the_views_and_leaves_a_stranger_schema_alone() {
    let (db, c, role) = setup().await;
    let before = schema_dump(&db);
    ks_expect(&db.url(), &["expand"], 0);
    assert_eq!(view_schemas(&c).await, 2);
    // The role got USAGE on the view schemas (it has privileges on the tables).
    assert_eq!(
        count(
            &c,
            &format!(
                "SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'keyshift\\_%' AND has_schema_privilege('{role}', oid, 'USAGE')"
            )
        )
        .await,
        2
    );
    ks_expect(&db.url(), &["abort"], 0);
    assert_eq!(view_schemas(&c).await, 0);
    assert_eq!(before, schema_dump(&db), "abort restores the exact schema");

    // A schema with keyshift's name that keyshift did not make: expand refuses to use it,
    // abort does not drop it.
    c.batch_execute(
        "CREATE SCHEMA keyshift_uuid_public; CREATE TABLE keyshift_uuid_public.mine (x int)",
    )
    .await
    .unwrap();
    let o = ks_expect(&db.url(), &["expand"], 1);
    assert!(
        stderr(&o).contains("is not keyshift's"),
        "{}",
        migrate_support::text(&o)
    );
    ks_expect(&db.url(), &["abort"], 0);
    assert_eq!(
        count(&c, "SELECT count(*) FROM keyshift_uuid_public.mine").await,
        0
    );
    assert_eq!(view_schemas(&c).await, 1);
}
