//! [schema]: what PostgreSQL attaches to a migrated column by number follows it through the
//! swap: column privileges, comments, statistics targets (src/migrate/mirror.rs).
mod common;
mod migrate_support;

use common::proxy::{connect_shaped, linked_proxy, wait_rules_in_force, wait_status};
use migrate_support::{SEED_000, SEED_004, ks_expect, seed_004_rows};
use tokio_postgres::Client;

async fn as_role(db: &common::TestDb, role: &str) -> Client {
    common::connect(&db.url().replacen("postgres@", &format!("{role}@"), 1)).await
}

async fn one(c: &Client, sql: &str) -> Option<String> {
    c.query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

/// A reporting role with column grants, a writer with column grants, a comment and a
/// statistics target on migrated columns: after cutover they are on the uuid columns that
/// carry the original names, after rollback still on the integer ones, and a grant made after
/// expand follows too.
#[tokio::test]
async fn column_grants_comments_and_statistics_follow_the_columns_through_the_swap() {
    let db = common::TestDb::new().await;
    let reporter = format!("r_{}", db.name);
    let writer = format!("w_{}", db.name);
    let admin = db.client().await;
    admin
        .batch_execute(&format!(
            "{SEED_004}{rows}
             CREATE ROLE {reporter} LOGIN; CREATE ROLE {writer} LOGIN;
             GRANT SELECT (id, name) ON mcp_connectors TO {reporter};
             GRANT INSERT (connector_id, name), SELECT (id, connector_id, name) ON mcp_servers TO {writer};
             GRANT USAGE ON SEQUENCE mcp_servers_id_seq TO {writer};
             COMMENT ON COLUMN mcp_connectors.id IS 'the connector';
             COMMENT ON COLUMN mcp_servers.connector_id IS 'who runs it';
             ALTER TABLE mcp_servers ALTER COLUMN connector_id SET STATISTICS 500;",
            rows = seed_004_rows(20)
        ))
        .await
        .unwrap();
    ks_expect(&db.url(), &["expand"], 0);
    ks_expect(&db.url(), &["backfill"], 0);
    // Granted after expand: mirrored before cutover's pause.
    admin
        .batch_execute(&format!("GRANT SELECT (id) ON mcp_servers TO {reporter}"))
        .await
        .unwrap();
    let r = as_role(&db, &reporter).await;
    let w = as_role(&db, &writer).await;
    // The writer's direct insert: its twin filled by the fill trigger (which runs as the
    // owner), its own grants unchanged.
    w.batch_execute("INSERT INTO mcp_servers (connector_id, name) VALUES (2, 'w-before')")
        .await
        .unwrap();

    ks_expect(&db.url(), &["cutover"], 0);
    // The reporter reads the uuid keys under the names it was granted.
    let id = one(&r, "SELECT id::text FROM mcp_connectors WHERE name = 'c1'").await;
    assert_eq!(id.as_deref().map(str::len), Some(36), "a uuid: {id:?}");
    assert!(
        one(&r, "SELECT min(id::text) FROM mcp_servers")
            .await
            .is_some()
    );
    // The writer inserts in the uuid shape, naming the FK column it was granted.
    let c2 = one(
        &admin,
        "SELECT id::text FROM mcp_connectors WHERE id_legacy = 2",
    )
    .await
    .unwrap();
    w.batch_execute(&format!(
        "INSERT INTO mcp_servers (connector_id, name) VALUES ('{c2}', 'w-after')"
    ))
    .await
    .unwrap();
    assert_eq!(
        one(
            &admin,
            "SELECT connector_id_legacy::text FROM mcp_servers WHERE name = 'w-after'"
        )
        .await
        .as_deref(),
        Some("2"),
        "the legacy side, filled by the trigger"
    );
    assert_eq!(
        one(&admin, "SELECT col_description('mcp_connectors'::regclass, (SELECT attnum FROM pg_attribute WHERE attrelid = 'mcp_connectors'::regclass AND attname = 'id'))").await.as_deref(),
        Some("the connector")
    );
    assert_eq!(
        one(&admin, "SELECT col_description('mcp_servers'::regclass, (SELECT attnum FROM pg_attribute WHERE attrelid = 'mcp_servers'::regclass AND attname = 'connector_id'))").await.as_deref(),
        Some("who runs it")
    );
    assert_eq!(
        one(&admin, "SELECT attstattarget::text FROM pg_attribute WHERE attrelid = 'mcp_servers'::regclass AND attname = 'connector_id'").await.as_deref(),
        Some("500")
    );

    ks_expect(&db.url(), &["rollback"], 0);
    let id = one(&r, "SELECT id::text FROM mcp_connectors WHERE name = 'c1'").await;
    assert_eq!(id.as_deref(), Some("1"), "the integer again");
    w.batch_execute("INSERT INTO mcp_servers (connector_id, name) VALUES (3, 'w-rolled-back')")
        .await
        .unwrap();
    assert_eq!(
        one(&admin, "SELECT col_description('mcp_connectors'::regclass, (SELECT attnum FROM pg_attribute WHERE attrelid = 'mcp_connectors'::regclass AND attname = 'id'))").await.as_deref(),
        Some("the connector")
    );
    ks_expect(&db.url(), &["verify"], 0);
    drop((r, w));
    admin
        .batch_execute(&format!(
            "DROP OWNED BY {reporter}, {writer}; DROP ROLE {reporter}; DROP ROLE {writer}"
        ))
        .await
        .unwrap();
}

/// `plan` lists up front what the swap carries (a CHECK, extended statistics) and what it
/// cannot (a generated column stays with the integer, a function whose body names a migrated
/// table, a trigger whose function uses a migrated column), and goes ahead.
#[tokio::test]
async fn plan_lists_what_follows_the_integer_or_reads_by_name() {
    let db = common::TestDb::new().await;
    db.client()
        .await
        .batch_execute(&format!(
            "{SEED_004}
             ALTER TABLE mcp_servers ADD CONSTRAINT connector_positive CHECK (connector_id > 0);
             ALTER TABLE mcp_servers ADD COLUMN shard int GENERATED ALWAYS AS (connector_id % 16) STORED;
             CREATE STATISTICS servers_by_connector ON connector_id, status FROM mcp_servers;
             CREATE FUNCTION active_servers() RETURNS bigint LANGUAGE plpgsql AS $$
               BEGIN RETURN (SELECT count(*) FROM MCP_Servers WHERE status = 'active'); END $$;
             CREATE FUNCTION stamp() RETURNS trigger LANGUAGE plpgsql AS $$
               BEGIN IF NEW.mcp_server_id IS NULL THEN RAISE 'no server'; END IF; RETURN NEW; END $$;
             CREATE TRIGGER stamp BEFORE INSERT ON mcp_server_tools FOR EACH ROW EXECUTE FUNCTION stamp();"
        ))
        .await
        .unwrap();
    let o = ks_expect(&db.url(), &["plan", "--format", "json"], 0);
    let p: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(p["blockers"], serde_json::json!([]), "{p:#}");
    let warnings: Vec<(String, String)> = p["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            (
                w["code"].as_str().unwrap().to_string(),
                w["object"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for want in [
        (
            "carried-check-constraint",
            "check constraint connector_positive",
        ),
        ("follows-integer-generated-column", "generated column shard"),
        (
            "carried-statistics",
            "statistics public.servers_by_connector",
        ),
        ("function-body", "function active_servers()"),
        (
            "trigger-function",
            "trigger stamp on public.mcp_server_tools",
        ),
    ] {
        assert!(
            warnings.contains(&(want.0.to_string(), want.1.to_string())),
            "{want:?} missing from {warnings:#?}"
        );
    }
    // It goes ahead: expand takes the plan as it is.
    ks_expect(&db.url(), &["expand"], 0);
}

/// A role that may write a child but not read its parent (column grants, as reporting and
/// ingest roles have): its writes through keyshift succeed as they do directly, before and
/// after cutover, in both shapes; the fill triggers (run as their owner) fill what keyshift's
/// lookup could not read for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_that_cannot_read_the_parent_writes_through_keyshift() {
    let db = common::TestDb::new().await;
    let writer = format!("w_{}", db.name);
    let admin = db.client().await;
    admin
        .batch_execute(&format!(
            "{SEED_004}{rows}
             CREATE ROLE {writer} LOGIN;
             GRANT INSERT (connector_id, name), SELECT (name) ON mcp_servers TO {writer};
             GRANT USAGE ON SEQUENCE mcp_servers_id_seq TO {writer};",
            rows = seed_004_rows(10)
        ))
        .await
        .unwrap();
    ks_expect(&db.url(), &["expand"], 0);
    ks_expect(&db.url(), &["backfill"], 0);
    let p = common::proxy::linked_proxy(&db).await;
    let connect = |shape: &'static str| {
        let url = p.url(&writer, &db.name);
        async move {
            let mut cfg: tokio_postgres::Config = url.parse().unwrap();
            cfg.options(format!("-c keyshift.shape={shape}"));
            let (c, conn) = cfg.connect(tokio_postgres::NoTls).await.unwrap();
            tokio::spawn(conn);
            c
        }
    };
    let twins_right = "SELECT count(*) FROM mcp_servers s LEFT JOIN mcp_connectors c ON c.id = s.connector_id \
                       WHERE s.connector_id_uuid IS DISTINCT FROM c.id_uuid";
    let legacy_right = "SELECT count(*) FROM mcp_servers s LEFT JOIN mcp_connectors c ON c.id = s.connector_id \
                        WHERE s.connector_id_legacy IS DISTINCT FROM c.id_legacy";
    let w = connect("integer").await;
    w.batch_execute("INSERT INTO mcp_servers (connector_id, name) VALUES (2, 'through-before')")
        .await
        .unwrap_or_else(|e| panic!("before cutover: {e:?}"));
    assert_eq!(migrate_support::count(&admin, twins_right).await, 0);

    ks_expect(&db.url(), &["cutover"], 0);
    let c3 = one(
        &admin,
        "SELECT id::text FROM mcp_connectors WHERE id_legacy = 3",
    )
    .await
    .unwrap();
    let u = connect("uuid").await;
    u.batch_execute(&format!(
        "INSERT INTO mcp_servers (connector_id, name) VALUES ('{c3}', 'through-uuid')"
    ))
    .await
    .unwrap_or_else(|e| panic!("uuid shape after cutover: {e:?}"));
    // The integer session, translated, through its view.
    let w = connect("integer").await;
    w.batch_execute("INSERT INTO mcp_servers (connector_id, name) VALUES (4, 'through-after')")
        .await
        .unwrap_or_else(|e| panic!("integer shape after cutover: {e:?}"));
    assert_eq!(migrate_support::count(&admin, legacy_right).await, 0);
    assert_eq!(
        one(&admin, "SELECT string_agg(name || '=' || connector_id_legacy, ',' ORDER BY name) FROM mcp_servers WHERE name LIKE 'through-%'").await.as_deref(),
        Some("through-after=4,through-before=2,through-uuid=3")
    );
    drop((w, u));
    drop(p);
    admin
        .batch_execute(&format!("DROP OWNED BY {writer}; DROP ROLE {writer}"))
        .await
        .unwrap();
}

/// What the application built over the migrated columns of seeds 000 and 004 (run after
/// them): views and views of views (options, owner, grants, comments), a row-level security
/// policy, a trigger with `UPDATE OF` and `WHEN`, a rule, a CHECK, extended statistics, and a
/// partitioned child. `reader` must exist.
fn app_objects(reader: &str) -> String {
    format!(
        "CREATE VIEW server_names AS
               SELECT s.id, s.name, c.id AS connector, c.name AS connector_name
                 FROM mcp_servers s JOIN mcp_connectors c ON c.id = s.connector_id;
             CREATE VIEW busy_connectors WITH (security_barrier) AS
               SELECT connector, count(*) AS servers FROM server_names GROUP BY connector;
             CREATE VIEW connector_list AS
               SELECT c.id, c.name, count(s.id) AS servers
                 FROM mcp_connectors c LEFT JOIN mcp_servers s ON s.connector_id = c.id GROUP BY c.id;
             CREATE VIEW writable_servers AS
               SELECT id, connector_id, name FROM mcp_servers WHERE name <> 'hidden'
               WITH CASCADED CHECK OPTION;
             GRANT SELECT ON server_names, busy_connectors TO {reader};
             GRANT SELECT (id, name) ON connector_list TO {reader};
             GRANT SELECT ON mcp_servers, mcp_connectors TO {reader};
             COMMENT ON VIEW server_names IS 'servers with their connector';
             COMMENT ON COLUMN server_names.name IS 'the server''s name';
             ALTER TABLE mcp_servers ENABLE ROW LEVEL SECURITY;
             CREATE POLICY visible ON mcp_servers FOR SELECT TO {reader}
               USING (connector_id IN (SELECT id FROM mcp_connectors WHERE name <> 'c3'));
             CREATE FUNCTION mark_moved() RETURNS trigger LANGUAGE plpgsql AS $$
               BEGIN NEW.name := NEW.name || '*'; RETURN NEW; END $$;
             CREATE TRIGGER moved BEFORE UPDATE OF connector_id ON mcp_servers FOR EACH ROW
               WHEN (OLD.connector_id IS DISTINCT FROM NEW.connector_id) EXECUTE FUNCTION mark_moved();
             ALTER TABLE mcp_servers ENABLE ALWAYS TRIGGER moved;
             CREATE TABLE server_moves (server text, at timestamptz DEFAULT now());
             CREATE RULE log_new AS ON INSERT TO mcp_servers WHERE NEW.connector_id IS NOT NULL
               DO ALSO INSERT INTO server_moves (server) VALUES (NEW.connector_id::text);
             ALTER TABLE mcp_servers ADD CONSTRAINT srv_connected CHECK (connector_id IS NOT NULL OR status = 'draft');
             CREATE STATISTICS srv_stats (ndistinct) ON connector_id, status FROM mcp_servers;
             CREATE TABLE server_events (id bigserial, server_id integer NOT NULL REFERENCES mcp_servers (id),
               at timestamptz NOT NULL, what text, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
             CREATE TABLE server_events_old PARTITION OF server_events FOR VALUES FROM ('2000-01-01') TO ('2026-01-01');
             CREATE TABLE server_events_new PARTITION OF server_events FOR VALUES FROM ('2026-01-01') TO ('2100-01-01');
             CREATE INDEX server_events_server ON server_events (server_id);
             INSERT INTO server_events (server_id, at, what) SELECT id, '2025-06-01', 'old' FROM mcp_servers;"
    )
}

/// What the application built over the migrated columns (src/migrate/carry.rs), as seen by
/// the roles that use it, at each phase.
async fn check_carried(admin: &Client, reader: &Client, key_type: &str) {
    // The views show the key in force under the original names, with the values of the table.
    for (view, col) in [
        ("server_names", "id"),
        ("server_names", "connector"),
        ("busy_connectors", "connector"),
        ("connector_list", "id"),
        ("writable_servers", "connector_id"),
    ] {
        assert_eq!(
            one(
                admin,
                &format!(
                    "SELECT data_type::text FROM information_schema.columns WHERE table_schema = 'public' AND table_name = '{view}' AND column_name = '{col}'"
                )
            )
            .await
            .as_deref(),
            Some(key_type),
            "{view}.{col}"
        );
    }
    // One statement, one snapshot: the application may be writing meanwhile. Halfway
    // through `--by-table`, mcp_servers may be swapped already while the views stay on the
    // integers until the end: they then show its legacy columns.
    let swapped = one(admin, "SELECT count(*)::text FROM pg_attribute WHERE attrelid = 'mcp_servers'::regclass AND attname = 'id_legacy' AND NOT attisdropped").await;
    let sfx = if key_type == "integer" && swapped.as_deref() == Some("1") {
        "_legacy"
    } else {
        ""
    };
    assert_eq!(
        one(admin, &format!("SELECT ((SELECT count(*) FROM server_names v JOIN mcp_servers s ON s.id{sfx} = v.id AND s.connector_id{sfx} = v.connector)
                           = (SELECT count(*) FROM mcp_servers WHERE connector_id IS NOT NULL))::text")).await.as_deref(),
        Some("true")
    );
    // Options, comments, grants (table and column level).
    assert_eq!(
        one(admin, "SELECT array_to_string(reloptions, ',') FROM pg_class WHERE oid = 'busy_connectors'::regclass").await.as_deref(),
        Some("security_barrier=true")
    );
    assert_eq!(
        one(admin, "SELECT check_option::text FROM information_schema.views WHERE table_schema = 'public' AND table_name = 'writable_servers'").await.as_deref(),
        Some("CASCADED")
    );
    assert_eq!(
        one(
            admin,
            "SELECT obj_description('server_names'::regclass, 'pg_class')"
        )
        .await
        .as_deref(),
        Some("servers with their connector")
    );
    assert_eq!(
        one(admin, "SELECT col_description('server_names'::regclass, 2)")
            .await
            .as_deref(),
        Some("the server's name")
    );
    reader
        .query_one("SELECT count(*) FROM busy_connectors", &[])
        .await
        .unwrap();
    reader
        .query_one("SELECT min(id::text), min(name) FROM connector_list", &[])
        .await
        .unwrap();
    let denied = reader
        .query_one("SELECT min(servers) FROM connector_list", &[])
        .await
        .unwrap_err();
    assert_eq!(
        denied.code(),
        Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE)
    );
    // The policy still hides the servers of connector c3 from the reader (the rows the
    // application writes meanwhile, `v1-…` and `v2-…`, aside).
    assert_eq!(
        one(reader, "SELECT count(*)::text FROM mcp_servers WHERE name NOT LIKE 'v_-%'").await,
        one(admin, &format!("SELECT count(*)::text FROM mcp_servers s JOIN mcp_connectors c ON c.id = s.connector_id{sfx} WHERE c.name <> 'c3' AND s.name NOT LIKE 'v_-%'")).await,
    );
    // The trigger (UPDATE OF, WHEN, ENABLE ALWAYS) and the rule fire on the key in force
    // (halfway, on the legacy column: what they were made on).
    let before = one(admin, "SELECT count(*)::text FROM server_moves").await;
    admin
        .batch_execute(&format!(
            "UPDATE mcp_servers SET connector_id{sfx} = (SELECT id FROM mcp_connectors WHERE name = 'c4')
              WHERE name = 's1'"
        ))
        .await
        .unwrap();
    assert!(
        one(admin, "SELECT name FROM mcp_servers WHERE name LIKE 's1*%'")
            .await
            .is_some(),
        "the trigger fired"
    );
    admin
        .batch_execute(&format!(
            "UPDATE mcp_servers SET name = 's1', connector_id{sfx} = (SELECT id FROM mcp_connectors WHERE name = 'c2')
              WHERE name LIKE 's1*%'"
        ))
        .await
        .unwrap();
    admin
        .batch_execute(&format!(
            "INSERT INTO mcp_servers (connector_id{sfx}, name) SELECT id, 'ruled' FROM mcp_connectors WHERE name = 'c1'"
        ))
        .await
        .unwrap();
    assert_ne!(
        one(admin, "SELECT count(*)::text FROM server_moves").await,
        before,
        "the rule fired"
    );
    assert_eq!(
        one(
            admin,
            "SELECT tgenabled::text FROM pg_trigger WHERE tgname = 'moved'"
        )
        .await
        .as_deref(),
        Some("A")
    );
}

/// The application's views as an integer-shaped (V1) and a uuid-shaped (V2) session read
/// them through keyshift: the keys in the session's shape, the same rows.
async fn check_view_shapes(v1: &Client, v2: &Client) {
    for (c, want) in [(v1, "integer"), (v2, "uuid")] {
        for sql in [
            "SELECT pg_typeof(id)::text, pg_typeof(connector)::text FROM server_names LIMIT 1",
            "SELECT pg_typeof(connector)::text, pg_typeof(connector)::text FROM public.busy_connectors LIMIT 1",
            "SELECT pg_typeof(b.connector)::text, pg_typeof(s.connector)::text FROM busy_connectors b JOIN server_names s USING (connector) LIMIT 1",
        ] {
            let row = c
                .query_one(sql, &[])
                .await
                .unwrap_or_else(|e| panic!("{want}: {sql}: {e}"));
            assert_eq!(
                (row.get::<_, String>(0), row.get::<_, String>(1)),
                (want.to_string(), want.to_string()),
                "{sql}"
            );
        }
        // The names are the session's: a uuid-shaped session's key joins its own server key.
        let n: i64 = c
            .query_one(
                "SELECT count(*) FROM server_names v JOIN mcp_servers s ON s.id = v.id AND s.connector_id = v.connector",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert!(n > 0, "{want}");
    }
}

/// The application's writes and reads through keyshift, as V1 (integer-shaped) or V2
/// (uuid-shaped) until `stop`: the same SQL in both shapes (rows found by name). Returns the
/// number of statements that succeeded and the errors.
async fn app_load(
    c: Client,
    tag: &'static str,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> (u64, Vec<String>) {
    let (mut ok, mut errors) = (0, Vec::new());
    let mut n = 0u64;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        n += 1;
        let name = format!("{tag}-{n}");
        let r = c
            .batch_execute(&format!(
                "INSERT INTO mcp_servers (connector_id, name, status)
                   SELECT id, '{name}', 'live' FROM mcp_connectors WHERE name = 'c5';
                 INSERT INTO server_events (server_id, at, what)
                   SELECT id, now(), 'created' FROM mcp_servers WHERE name = '{name}';
                 SELECT count(*) FROM server_names WHERE connector_name = 'c5';
                 SELECT count(*) FROM busy_connectors;"
            ))
            .await;
        match r {
            Ok(()) => ok += 1,
            Err(e) => errors.push(format!("{tag}: {e:?}")),
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    (ok, errors)
}

/// Stops the [`app_load`] tasks: they ran, and not one statement failed.
async fn stop_writers(
    stop: &std::sync::atomic::AtomicBool,
    writers: Vec<tokio::task::JoinHandle<(u64, Vec<String>)>>,
) {
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut done = 0;
    for w in writers {
        let (ok, errors) = w.await.unwrap();
        assert!(
            errors.is_empty(),
            "{} errors: {:#?}",
            errors.len(),
            &errors[..errors.len().min(5)]
        );
        done += ok;
    }
    assert!(done > 20, "the load ran: {done} rounds");
}

/// Views and views of views (options, owner, grants, comments), a row-level security policy,
/// a trigger with `UPDATE OF` and `WHEN`, a rule, a CHECK and extended statistics over
/// migrated columns, a partitioned child, beside seed 000's 15 tables: checked one by one at
/// each phase, with V1 and V2 writing and reading through keyshift all along, from backfill to
/// finalize, without one error. The views and the rest are rebuilt in the swap over the uuid
/// columns, back over the integers on rollback, and still there after finalize.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_object_follows_the_key_through_the_lifecycle_under_load() {
    let db = common::TestDb::new().await;
    let reader = format!("r_{}", db.name);
    let admin = db.client().await;
    admin
        .batch_execute(&format!(
            "{SEED_000}{SEED_004}{rows}
             CREATE ROLE {reader} LOGIN;
             {objects}",
            objects = app_objects(&reader),
            rows = seed_004_rows(10)
        ))
        .await
        .unwrap();
    let o = ks_expect(&db.url(), &["plan", "--format", "json"], 0);
    let p: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(p["blockers"], serde_json::json!([]), "{p:#}");
    let r = as_role(&db, &reader).await;
    check_carried(&admin, &r, "integer").await;
    ks_expect(&db.url(), &["expand"], 0);
    // V1 and V2 through keyshift from here to finalize.
    let proxy = linked_proxy(&db).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let c = connect_shaped(&proxy, &db, "integer").await;
    let mut writers = vec![tokio::spawn(app_load(c, "v1", stop.clone()))];
    ks_expect(&db.url(), &["backfill"], 0);
    // V2 needs the uuids complete (phase hardened, which backfill ends in).
    wait_rules_in_force(&proxy, &admin).await;
    let c = connect_shaped(&proxy, &db, "uuid").await;
    writers.push(tokio::spawn(app_load(c, "v2", stop.clone())));
    check_carried(&admin, &r, "integer").await;
    // Each session sees the views in its own shape, whatever the phase.
    let v1 = connect_shaped(&proxy, &db, "integer").await;
    let v2 = connect_shaped(&proxy, &db, "uuid").await;
    check_view_shapes(&v1, &v2).await;
    ks_expect(&db.url(), &["cutover"], 0);
    check_carried(&admin, &r, "uuid").await;
    check_view_shapes(&v1, &v2).await;
    ks_expect(&db.url(), &["rollback"], 0);
    check_carried(&admin, &r, "integer").await;
    check_view_shapes(&v1, &v2).await;
    ks_expect(&db.url(), &["cutover"], 0);
    check_carried(&admin, &r, "uuid").await;
    check_view_shapes(&v1, &v2).await;
    ks_expect(&db.url(), &["verify"], 0);
    // V1 retired before finalize.
    stop_writers(&stop, writers).await;
    drop(v1);
    wait_status(&proxy, |v| v["sessions_by_shape"]["integer"] == 0).await;
    drop((v2, proxy));
    ks_expect(&db.url(), &["shape", "default", "uuid"], 0);
    ks_expect(&db.url(), &["finalize", "--yes"], 0);
    check_carried(&admin, &r, "uuid").await;
    // The partitioned child's rows, old and new, reference their servers by uuid.
    assert_eq!(
        one(&admin, "SELECT count(*)::text FROM server_events e LEFT JOIN mcp_servers s ON s.id = e.server_id WHERE s.id IS NULL").await.as_deref(),
        Some("0")
    );
    assert_eq!(
        one(&admin, "SELECT format_type(atttypid, NULL) FROM pg_attribute WHERE attrelid = 'server_events_new'::regclass AND attname = 'server_id'").await.as_deref(),
        Some("uuid")
    );
    // Its own key (id, at) is migrated too, to (uuid id, at).
    assert_eq!(
        one(&admin, "SELECT pg_get_constraintdef(oid) || ' ' || format_type((SELECT atttypid FROM pg_attribute WHERE attrelid = 'server_events'::regclass AND attname = 'id'), NULL) FROM pg_constraint WHERE conrelid = 'server_events'::regclass AND contype = 'p'").await.as_deref(),
        Some("PRIMARY KEY (id, at) uuid")
    );
    drop(r);
    admin
        .batch_execute(&format!("DROP OWNED BY {reader}; DROP ROLE {reader}"))
        .await
        .unwrap();
}

/// More of what reporting apps build, for the cutover table by table: a view over a leaf
/// and its parent (swapped by different groups), a view grouping by a key (it depends on the
/// primary key its table's group drops), a materialized view.
const ACROSS_GROUPS: &str = "
CREATE VIEW server_event_names AS
  SELECT e.server_id, e.what, s.name FROM server_events e JOIN mcp_servers s ON s.id = e.server_id;
CREATE VIEW server_event_counts AS
  SELECT s.id, s.name, count(e.at) AS events
    FROM mcp_servers s LEFT JOIN server_events e ON e.server_id = s.id GROUP BY s.id;
CREATE MATERIALIZED VIEW connector_sizes AS
  SELECT c.id, c.name, count(s.id) AS servers
    FROM mcp_connectors c LEFT JOIN mcp_servers s ON s.connector_id = c.id GROUP BY c.id, c.name;
CREATE UNIQUE INDEX connector_sizes_id ON connector_sizes (id);
";

/// `keyshift cutover --by-table` over the same objects, stopped halfway by a session holding
/// mcp_connectors, then resumed, with V1 and V2 writing and reading through keyshift all
/// along: halfway, what sits on tables not swapped yet is untouched and each session reads
/// the views in its shape; at the end everything is over the uuid columns and the schema is
/// the one a single swap gives (pg_dump of a twin database), and rollback carries it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_object_follows_the_key_through_a_cutover_table_by_table_stopped_halfway() {
    let db = common::TestDb::new().await;
    let twin = common::TestDb::new().await;
    let reader = format!("r_{}", db.name);
    let admin = db.client().await;
    let twin_admin = twin.client().await;
    let setup = format!(
        "{SEED_000}{SEED_004}{rows}{objects}{ACROSS_GROUPS}",
        rows = seed_004_rows(10),
        objects = app_objects(&reader)
    );
    admin
        .batch_execute(&format!("CREATE ROLE {reader} LOGIN; {setup}"))
        .await
        .unwrap();
    twin_admin.batch_execute(&setup).await.unwrap();
    for url in [db.url(), twin.url()] {
        ks_expect(&url, &["expand"], 0);
        ks_expect(&url, &["backfill"], 0);
    }
    let proxy = linked_proxy(&db).await;
    wait_rules_in_force(&proxy, &admin).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for (shape, tag) in [("integer", "v1"), ("uuid", "v2")] {
        let c = connect_shaped(&proxy, &db, shape).await;
        writers.push(tokio::spawn(app_load(c, tag, stop.clone())));
    }
    let r = as_role(&db, &reader).await;
    let v1 = connect_shaped(&proxy, &db, "integer").await;
    let v2 = connect_shaped(&proxy, &db, "uuid").await;

    let blocker = migrate_support::holding(&db, "mcp_connectors").await;
    let by_table = migrate_support::BY_TABLE_GIVING_UP;
    let out = ks_expect(&db.url(), &by_table, 1);
    let type_of = |table: &'static str, col: &'static str| {
        let admin = &admin;
        async move {
            one(admin, &format!("SELECT format_type(atttypid, NULL) FROM pg_attribute WHERE attrelid = 'public.{table}'::regclass AND attname = '{col}'")).await
        }
    };
    // The partitioned server_events went, and mcp_servers' group too (it renames its FK to
    // mcp_connectors aside, locking only mcp_servers); the drop of that FK waits for the
    // blocker, and mcp_connectors' group after it.
    assert_eq!(
        (
            type_of("server_events", "server_id").await.as_deref(),
            type_of("mcp_servers", "id").await.as_deref(),
            type_of("mcp_connectors", "id").await.as_deref()
        ),
        (Some("uuid"), Some("uuid"), Some("integer")),
        "{}",
        migrate_support::text(&out)
    );
    wait_rules_in_force(&proxy, &admin).await;
    let st: serde_json::Value =
        serde_json::from_slice(&ks_expect(&db.url(), &["status", "--format", "json"], 0).stdout)
            .unwrap();
    assert!(st["objects_to_carry"].as_i64().unwrap() > 0, "{st}");
    // What sits on mcp_servers and mcp_connectors is as it was, for every role.
    check_carried(&admin, &r, "integer").await;
    // Through keyshift each session reads every view in its shape, the one across the two
    // groups included; read directly, that view still joins the integers.
    check_view_shapes(&v1, &v2).await;
    for (c, want) in [(&v1, "integer"), (&v2, "uuid")] {
        assert_eq!(
            one(
                c,
                "SELECT pg_typeof(server_id)::text FROM server_event_names LIMIT 1"
            )
            .await
            .as_deref(),
            Some(want)
        );
    }
    assert_eq!(
        one(
            &admin,
            "SELECT (count(*) > 0)::text FROM server_event_names"
        )
        .await
        .as_deref(),
        Some("true")
    );

    blocker.batch_execute("ROLLBACK").await.unwrap();
    let out = ks_expect(&db.url(), &by_table, 0);
    assert!(
        migrate_support::text(&out).contains("rebuilt over the uuids at the end"),
        "{}",
        migrate_support::text(&out)
    );
    wait_rules_in_force(&proxy, &admin).await;
    check_carried(&admin, &r, "uuid").await;
    check_view_shapes(&v1, &v2).await;
    for (view, col) in [
        ("server_event_names", "server_id"),
        ("server_event_counts", "id"),
        ("connector_sizes", "id"),
    ] {
        assert_eq!(type_of(view, col).await.as_deref(), Some("uuid"), "{view}");
    }
    admin
        .batch_execute("REFRESH MATERIALIZED VIEW CONCURRENTLY connector_sizes")
        .await
        .unwrap();
    ks_expect(&db.url(), &["verify"], 0);

    // The schema a single swap leaves.
    ks_expect(&twin.url(), &["cutover"], 0);
    assert_eq!(
        migrate_support::schema_dump(&db),
        migrate_support::schema_dump(&twin)
    );
    // And rollback carries everything back, as after any cutover.
    ks_expect(&db.url(), &["rollback"], 0);
    wait_rules_in_force(&proxy, &admin).await;
    check_carried(&admin, &r, "integer").await;
    check_view_shapes(&v1, &v2).await;

    stop_writers(&stop, writers).await;
    drop((r, v1, v2, proxy));
    for c in [&admin, &twin_admin] {
        c.batch_execute(&format!("DROP OWNED BY {reader}"))
            .await
            .unwrap();
    }
    admin
        .batch_execute(&format!("DROP ROLE {reader}"))
        .await
        .unwrap();
}

/// What the application changes or drops while `cutover --by-table` is stopped halfway is
/// left as it made it, and said: a rebuild from the definitions read before the first group
/// would undo the change or bring back what it dropped. A view it makes meanwhile that a
/// group would have to drop stops that group instead of being lost.
#[tokio::test]
async fn cutover_by_table_leaves_what_the_application_changed_meanwhile_and_says_so() {
    let db = common::TestDb::new().await;
    let admin = db.client().await;
    admin
        .batch_execute(&format!(
            "{SEED_004}{rows}
             CREATE VIEW v_servers AS SELECT id, connector_id, name FROM mcp_servers;
             CREATE VIEW v_connectors AS SELECT id, name FROM mcp_connectors;
             CREATE VIEW v_base AS SELECT id, name FROM mcp_connectors;
             CREATE VIEW v_top AS SELECT id FROM v_base;
             ALTER TABLE mcp_servers ENABLE ROW LEVEL SECURITY;
             CREATE POLICY p_servers ON mcp_servers USING (connector_id IS NOT NULL);",
            rows = seed_004_rows(3)
        ))
        .await
        .unwrap();
    ks_expect(&db.url(), &["expand"], 0);
    ks_expect(&db.url(), &["backfill"], 0);
    let blocker = migrate_support::holding(&db, "mcp_connectors").await;
    let by_table = migrate_support::BY_TABLE_GIVING_UP;
    ks_expect(&db.url(), &by_table, 1);
    admin
        .batch_execute(
            "COMMENT ON VIEW v_servers IS 'changed halfway';
             COMMENT ON VIEW v_top IS 'changed halfway';
             DROP POLICY p_servers ON mcp_servers;
             CREATE VIEW late_counts AS
               SELECT c.id, c.name, count(*) AS n FROM mcp_connectors c GROUP BY c.id",
        )
        .await
        .unwrap();
    blocker.batch_execute("ROLLBACK").await.unwrap();
    // A view made meanwhile that depends on a key a group replaces (its GROUP BY needs
    // mcp_connectors' primary key): that group would have to drop it, and nothing could
    // rebuild it. The group stops instead, and says what to do. (It reads mcp_connectors
    // alone: halfway, mcp_servers' FK is a uuid already, and a join of it with the integer
    // key would not even be created.)
    let out = ks_expect(&db.url(), &by_table, 1);
    let said = migrate_support::text(&out);
    assert!(
        said.contains("late_counts") && said.contains("made after the cutover began"),
        "{said}"
    );
    admin.batch_execute("DROP VIEW late_counts").await.unwrap();
    let out = ks_expect(&db.url(), &by_table, 0);
    let said = migrate_support::text(&out);
    assert!(
        said.contains("left as it made them")
            && said.contains("public.v_servers")
            && said.contains("policy p_servers")
            // v_base too: dropping it to rebuild it would need v_top gone.
            && said.contains("public.v_base")
            && said.contains("public.v_top"),
        "{said}"
    );
    // The comment stays, on the view as it was (over the integer column); the policy stays
    // dropped; the view nobody touched is over the uuid column.
    assert_eq!(
        one(&admin, "SELECT obj_description('v_servers'::regclass, 'pg_class') || ' ' || format_type(atttypid, NULL) FROM pg_attribute WHERE attrelid = 'v_servers'::regclass AND attname = 'id'").await.as_deref(),
        Some("changed halfway integer")
    );
    assert_eq!(
        one(
            &admin,
            "SELECT count(*)::text FROM pg_policy WHERE polname = 'p_servers'"
        )
        .await
        .as_deref(),
        Some("0")
    );
    assert_eq!(
        one(&admin, "SELECT format_type(atttypid, NULL) FROM pg_attribute WHERE attrelid = 'v_connectors'::regclass AND attname = 'id'").await.as_deref(),
        Some("uuid")
    );
}

/// At the end of `--by-table` the views are rebuilt in a transaction that locks only them:
/// a session using a table one of them reads (one keyshift does not migrate, so no group
/// needs it) holds nothing up. What sits on a table waits for that table alone: a policy on
/// the held table stops the command partway, the views already rebuilt; the rerun finishes
/// once the session is gone.
#[tokio::test]
async fn cutover_by_table_rebuilds_the_views_without_waiting_for_the_tables_they_read() {
    let db = common::TestDb::new().await;
    let admin = db.client().await;
    admin
        .batch_execute(&format!(
            "{SEED_004}{rows}
             CREATE TABLE notes (connector_name text, body text);
             INSERT INTO notes SELECT name, 'note on ' || name FROM mcp_connectors;
             CREATE VIEW v_notes AS
               SELECT c.id, n.body FROM mcp_connectors c JOIN notes n ON n.connector_name = c.name;
             CREATE VIEW v_servers AS SELECT id, connector_id FROM mcp_servers;
             ALTER TABLE notes ENABLE ROW LEVEL SECURITY;
             CREATE POLICY p_notes ON notes USING (EXISTS (
               SELECT 1 FROM mcp_connectors c WHERE c.name = notes.connector_name AND c.id IS NOT NULL));
             CREATE VIEW v_ids AS SELECT id FROM mcp_connectors;
             ALTER TABLE mcp_servers ENABLE ROW LEVEL SECURITY;
             CREATE POLICY p_servers ON mcp_servers USING (connector_id IN (SELECT id FROM v_ids));",
            rows = seed_004_rows(3)
        ))
        .await
        .unwrap();
    ks_expect(&db.url(), &["expand"], 0);
    ks_expect(&db.url(), &["backfill"], 0);
    let reader = migrate_support::holding(&db, "notes").await;
    let out = ks_expect(&db.url(), &migrate_support::BY_TABLE_GIVING_UP, 1);
    let said = migrate_support::text(&out);
    assert!(said.contains("public.notes"), "{said}");
    let key_type = |view: &'static str| {
        let admin = &admin;
        async move {
            one(admin, &format!("SELECT format_type(atttypid, NULL) FROM pg_attribute WHERE attrelid = '{view}'::regclass AND attname = 'id'")).await
        }
    };
    // With the reader's transaction still open: the views are over the uuids already (the
    // LOCK of a view would have locked `notes` too, and waited for the reader).
    assert_eq!(key_type("v_notes").await.as_deref(), Some("uuid"), "{said}");
    assert_eq!(
        key_type("v_servers").await.as_deref(),
        Some("uuid"),
        "{said}"
    );
    assert_eq!(
        one(&admin, "SELECT count(*)::text FROM v_notes")
            .await
            .as_deref(),
        Some("3")
    );
    // A policy over one of the views goes with them (dropping the view needs it gone).
    let policy_reads = |policy: &'static str, table: &'static str| {
        let admin = &admin;
        async move {
            one(
                admin,
                &format!(
                    "SELECT string_agg(a.attname, ',' ORDER BY a.attname) FROM pg_policy p
                       JOIN pg_depend d ON d.classid = 'pg_policy'::regclass AND d.objid = p.oid
                       JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
                      WHERE p.polname = '{policy}' AND a.attrelid = '{table}'::regclass"
                ),
            )
            .await
        }
    };
    assert_eq!(
        policy_reads("p_servers", "mcp_servers").await.as_deref(),
        Some("connector_id")
    );
    assert_eq!(
        policy_reads("p_notes", "mcp_connectors").await.as_deref(),
        Some("id_legacy,name")
    );
    reader.batch_execute("ROLLBACK").await.unwrap();
    let out = ks_expect(&db.url(), &["cutover", "--by-table"], 0);
    let said = migrate_support::text(&out);
    assert!(
        said.contains("rebuilt over the uuids at the end") && said.contains("gates open"),
        "{said}"
    );
    assert_eq!(
        policy_reads("p_notes", "mcp_connectors").await.as_deref(),
        Some("id,name")
    );
    assert_eq!(
        one(&admin, "SELECT phase FROM keyshift.migration")
            .await
            .as_deref(),
        Some("cut_over")
    );
}

/// A view that only works with integer keys: cutover finds it before its pause, names it and
/// says what to do, and changes nothing.
#[tokio::test]
async fn cutover_refuses_a_view_that_cannot_hold_uuids_before_pausing() {
    let db = common::TestDb::new().await;
    let admin = db.client().await;
    admin
        .batch_execute(&format!(
            "{SEED_004}{rows}
             CREATE VIEW first_connector_servers AS SELECT * FROM mcp_servers WHERE connector_id = 1;",
            rows = seed_004_rows(5)
        ))
        .await
        .unwrap();
    ks_expect(&db.url(), &["expand"], 0);
    ks_expect(&db.url(), &["backfill"], 0);
    let o = ks_expect(&db.url(), &["cutover"], 1);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("first_connector_servers") && err.contains("uuid = integer"),
        "{err}"
    );
    let status = ks_expect(&db.url(), &["status", "--format", "json"], 0);
    let s: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_ne!(s["phase"], "cut_over", "{s:#}");
    assert_eq!(
        one(&admin, "SELECT data_type::text FROM information_schema.columns WHERE table_schema = 'public' AND table_name = 'first_connector_servers' AND column_name = 'id'").await.as_deref(),
        Some("integer")
    );
    // Dropped, the cutover goes ahead.
    admin
        .batch_execute("DROP VIEW first_connector_servers")
        .await
        .unwrap();
    ks_expect(&db.url(), &["cutover"], 0);
}

/// Whether any materialized view still reads keyshift's views (it must not after finalize or
/// abort), and whether the shadows' schema is there.
async fn matviews_on_keyshift(admin: &Client) -> (String, String) {
    (
        one(
            admin,
            "SELECT count(*)::text FROM pg_depend d JOIN pg_rewrite w ON w.oid = d.objid
               JOIN pg_class s ON s.oid = d.refobjid JOIN pg_namespace n ON n.oid = s.relnamespace
              WHERE d.classid = 'pg_rewrite'::regclass AND n.nspname LIKE 'keyshift%'
                AND w.ev_class IN (SELECT oid FROM pg_class WHERE relkind = 'm')",
        )
        .await
        .unwrap(),
        one(
            admin,
            "SELECT count(*)::text FROM pg_namespace WHERE nspname = 'keyshift_shadow'",
        )
        .await
        .unwrap(),
    )
}

async fn check_matviews(admin: &Client, reader: &Client, key_type: &str) {
    for (rel, col) in [
        ("server_counts", "connector"),
        ("busiest", "connector"),
        ("later", "id"),
    ] {
        assert_eq!(
            one(
                admin,
                &format!(
                    "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = '{rel}'::regclass AND attname = '{col}'"
                )
            )
            .await
            .as_deref(),
            Some(key_type),
            "{rel}.{col}"
        );
    }
    // The data as the live aggregate has it, the index, the grant, the comment, the state.
    let live = "SELECT string_agg(c.id::text || ':' || n, ',' ORDER BY c.id::text) FROM mcp_connectors c
                 JOIN (SELECT connector_id, count(*) n FROM mcp_servers GROUP BY 1) s ON s.connector_id = c.id";
    let stored = "SELECT string_agg(connector::text || ':' || servers, ',' ORDER BY connector::text) FROM server_counts";
    assert_eq!(one(admin, stored).await, one(admin, live).await);
    assert_eq!(
        one(
            admin,
            "SELECT indexdef FROM pg_indexes WHERE indexname = 'server_counts_connector'"
        )
        .await
        .as_deref(),
        Some(
            "CREATE UNIQUE INDEX server_counts_connector ON public.server_counts USING btree (connector)"
        )
    );
    assert_eq!(
        one(
            admin,
            "SELECT obj_description('server_counts'::regclass, 'pg_class')"
        )
        .await
        .as_deref(),
        Some("servers per connector")
    );
    assert_eq!(
        one(
            admin,
            "SELECT relispopulated::text FROM pg_class WHERE relname = 'later'"
        )
        .await
        .as_deref(),
        Some("false")
    );
    reader
        .query_one("SELECT count(*) FROM busiest", &[])
        .await
        .unwrap();
    admin
        .batch_execute(
            "INSERT INTO mcp_servers (connector_id, name) SELECT id, 'more' FROM mcp_connectors WHERE name = 'c1';
             REFRESH MATERIALIZED VIEW CONCURRENTLY server_counts;",
        )
        .await
        .unwrap();
    assert_eq!(one(admin, stored).await, one(admin, live).await);
}

/// Materialized views (with a unique index, a grant, a comment, a view over one, one never
/// populated): filled over the target shape before the pause, moved into place by the swap,
/// `REFRESH … CONCURRENTLY` afterwards; rebuilt over the tables by finalize and by abort.
#[tokio::test]
async fn materialized_views_are_built_before_the_pause_and_moved_in_by_the_swap() {
    for ending in ["finalize", "abort"] {
        let db = common::TestDb::new().await;
        let reader = format!("r_{}", db.name);
        let admin = db.client().await;
        admin
            .batch_execute(&format!(
                "{SEED_004}{rows}
                 CREATE ROLE {reader} LOGIN;
                 CREATE MATERIALIZED VIEW server_counts WITH (autovacuum_enabled = true) AS
                   SELECT c.id AS connector, count(s.id) AS servers
                     FROM mcp_connectors c JOIN mcp_servers s ON s.connector_id = c.id GROUP BY c.id;
                 CREATE UNIQUE INDEX server_counts_connector ON server_counts (connector);
                 COMMENT ON MATERIALIZED VIEW server_counts IS 'servers per connector';
                 CREATE VIEW busiest AS SELECT * FROM server_counts WHERE servers > 1;
                 GRANT SELECT ON busiest TO {reader};
                 CREATE MATERIALIZED VIEW later AS SELECT id FROM mcp_servers WITH NO DATA;",
                rows = seed_004_rows(10)
            ))
            .await
            .unwrap();
        let r = as_role(&db, &reader).await;
        ks_expect(&db.url(), &["expand"], 0);
        ks_expect(&db.url(), &["backfill"], 0);
        check_matviews(&admin, &r, "integer").await;
        // The shadows are built with autovacuum off (which would hold them when the swap
        // moves them in), and each matview has its own setting back after the move.
        let options = "SELECT string_agg(relname || ':' || coalesce(array_to_string(reloptions, ','), '-'), ' ' ORDER BY relname)
                         FROM pg_class WHERE relkind = 'm' AND relnamespace = 'public'::regnamespace";
        ks_expect(&db.url(), &["cutover", "--dry-run"], 0);
        assert_eq!(
            one(&admin, "SELECT string_agg(array_to_string(reloptions, ','), ' ') FROM pg_class WHERE relkind = 'm' AND relnamespace::regnamespace::text = 'keyshift_shadow'").await.as_deref(),
            Some("autovacuum_enabled=false autovacuum_enabled=false")
        );
        ks_expect(&db.url(), &["cutover"], 0);
        check_matviews(&admin, &r, "uuid").await;
        assert_eq!(
            one(&admin, options).await.as_deref(),
            Some("later:- server_counts:autovacuum_enabled=true")
        );
        ks_expect(&db.url(), &["rollback"], 0);
        check_matviews(&admin, &r, "integer").await;
        assert_eq!(
            one(&admin, options).await.as_deref(),
            Some("later:- server_counts:autovacuum_enabled=true")
        );
        if ending == "finalize" {
            ks_expect(&db.url(), &["cutover"], 0);
            check_matviews(&admin, &r, "uuid").await;
            ks_expect(&db.url(), &["shape", "default", "uuid"], 0);
            ks_expect(&db.url(), &["finalize", "--yes"], 0);
            check_matviews(&admin, &r, "uuid").await;
        } else {
            ks_expect(&db.url(), &["abort"], 0);
            check_matviews(&admin, &r, "integer").await;
        }
        assert_eq!(
            matviews_on_keyshift(&admin).await,
            ("0".into(), "0".into()),
            "{ending}"
        );
        drop(r);
        admin
            .batch_execute(&format!("DROP OWNED BY {reader}; DROP ROLE {reader}"))
            .await
            .unwrap();
    }
}

/// `name column type validated` of each `srv…` CHECK constraint on mcp_servers, and `name
/// column type target` of each statistics object's connector column: where each one is.
async fn checks_and_statistics(admin: &Client) -> Vec<String> {
    let rows = admin
        .query(
            "SELECT con.conname || ' ' || a.attname || ' ' || format_type(a.atttypid, NULL) || ' ' || con.convalidated
               FROM pg_constraint con JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = con.conkey[1]
              WHERE con.conrelid = 'mcp_servers'::regclass AND con.contype = 'c' AND con.conname LIKE 'srv%'
             UNION ALL
             SELECT x.stxname || ' ' || a.attname || ' ' || format_type(a.atttypid, NULL) || ' ' || coalesce(x.stxstattarget::text, '')
               FROM pg_statistic_ext x JOIN pg_attribute a ON a.attrelid = x.stxrelid AND a.attnum = ANY (x.stxkeys::int2[])
              WHERE x.stxrelid = 'mcp_servers'::regclass AND a.attname LIKE 'connector%'
             ORDER BY 1",
            &[],
        )
        .await
        .unwrap();
    rows.iter().map(|r| r.get(0)).collect()
}

/// CHECK constraints and extended statistics on a migrated column: set aside under the
/// legacy suffix and created again on the uuid column in the swap (a CHECK `NOT VALID`, still
/// enforced), put back by rollback, validated and left alone by finalize; one that only works
/// with integers stays on the integer column.
#[tokio::test]
async fn check_constraints_and_statistics_follow_the_key_through_the_swap() {
    let db = common::TestDb::new().await;
    let admin = db.client().await;
    admin
        .batch_execute(&format!(
            "{SEED_004}{rows}
             ALTER TABLE mcp_servers ADD CONSTRAINT srv_connected CHECK (connector_id IS NOT NULL OR status = 'draft');
             ALTER TABLE mcp_servers ADD CONSTRAINT srv_positive CHECK (connector_id > 0);
             COMMENT ON CONSTRAINT srv_connected ON mcp_servers IS 'drafts may float';
             CREATE STATISTICS srv_stats (ndistinct) ON connector_id, status FROM mcp_servers;
             ALTER STATISTICS srv_stats SET STATISTICS 300;",
            rows = seed_004_rows(10)
        ))
        .await
        .unwrap();
    let before = vec![
        "srv_connected connector_id integer true".to_string(),
        "srv_positive connector_id integer true".into(),
        "srv_stats connector_id integer 300".into(),
    ];
    assert_eq!(checks_and_statistics(&admin).await, before);
    ks_expect(&db.url(), &["expand"], 0);
    ks_expect(&db.url(), &["backfill"], 0);
    let o = ks_expect(&db.url(), &["cutover"], 0);
    assert!(
        migrate_support::text(&o).contains("srv_positive"),
        "cutover says which one stays on the integer: {}",
        migrate_support::text(&o)
    );
    let after = vec![
        "srv_connected connector_id uuid false".to_string(),
        "srv_connected_legacy connector_id_legacy integer true".into(),
        "srv_positive connector_id_legacy integer true".into(),
        "srv_stats connector_id uuid 300".into(),
        "srv_stats_legacy connector_id_legacy integer 300".into(),
    ];
    assert_eq!(checks_and_statistics(&admin).await, after);
    assert_eq!(
        one(&admin, "SELECT obj_description(oid, 'pg_constraint') FROM pg_constraint WHERE conname = 'srv_connected'").await.as_deref(),
        Some("drafts may float")
    );
    // NOT VALID, but enforced for new rows.
    let e = admin
        .batch_execute("INSERT INTO mcp_servers (name, status) VALUES ('floating', 'live')")
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Some(&tokio_postgres::error::SqlState::CHECK_VIOLATION)
    );
    ks_expect(&db.url(), &["rollback"], 0);
    assert_eq!(checks_and_statistics(&admin).await, before);
    ks_expect(&db.url(), &["cutover"], 0);
    assert_eq!(checks_and_statistics(&admin).await, after);
    ks_expect(&db.url(), &["shape", "default", "uuid"], 0);
    ks_expect(&db.url(), &["finalize", "--yes"], 0);
    assert_eq!(
        checks_and_statistics(&admin).await,
        vec![
            "srv_connected connector_id uuid true".to_string(),
            "srv_stats connector_id uuid 300".into(),
        ]
    );
}

/// The swap runs the statements the preparation deparsed only while nothing they were read
/// from changed (src/migrate/carry.rs, `keyshift.carry_fingerprint`). Each change below is made
/// by another session between `keyshift.carry_prepare` and the swap's `keyshift.carry_save`; a
/// marker statement slipped into the prepared ones shows which were run: stale ones would set
/// the marker, freshly deparsed ones do not. With no change, the prepared ones run.
#[tokio::test]
async fn the_swap_deparses_again_whatever_changed_since_the_preparation() {
    let db = common::TestDb::new().await;
    let admin = db.client().await;
    admin
        .batch_execute(&format!(
            "{SEED_004}{rows}
             CREATE ROLE carry_reader;
             CREATE TABLE carry_marker ();
             CREATE VIEW v_servers AS SELECT s.id, s.connector_id, c.name FROM mcp_servers s JOIN mcp_connectors c ON c.id = s.connector_id;
             COMMENT ON VIEW v_servers IS 'servers';
             GRANT SELECT (id, name) ON v_servers TO carry_reader;
             ALTER TABLE mcp_servers ENABLE ROW LEVEL SECURITY;
             CREATE POLICY p_servers ON mcp_servers FOR SELECT TO carry_reader USING (connector_id IS NOT NULL);
             CREATE FUNCTION carry_noop() RETURNS trigger LANGUAGE plpgsql AS 'BEGIN RETURN NEW; END';
             CREATE TRIGGER t_servers BEFORE UPDATE OF connector_id ON mcp_servers FOR EACH ROW EXECUTE FUNCTION carry_noop();
             ALTER TABLE mcp_servers ADD CONSTRAINT c_servers CHECK (connector_id IS NOT NULL OR status = 'draft');
             CREATE STATISTICS s_servers (ndistinct) ON connector_id, status FROM mcp_servers;",
            rows = seed_004_rows(3)
        ))
        .await
        .unwrap();
    ks_expect(&db.url(), &["expand"], 0);
    let cols =
        r#"'[["public","mcp_connectors","id"],["public","mcp_servers","connector_id"]]'::jsonb"#;
    let other = db.client().await;
    let changes = [
        "ANALYZE mcp_servers", // changes nothing deparsed: the prepared statements run
        "COMMENT ON VIEW v_servers IS 'all servers'",
        "COMMENT ON COLUMN v_servers.name IS 'the connector''s name'",
        "GRANT SELECT (connector_id) ON v_servers TO carry_reader",
        "ALTER VIEW v_servers SET (security_barrier = true)",
        "ALTER VIEW v_servers ALTER COLUMN name SET DEFAULT 'x'",
        "CREATE OR REPLACE VIEW v_servers AS SELECT s.id, s.connector_id, c.name, s.status FROM mcp_servers s JOIN mcp_connectors c ON c.id = s.connector_id",
        "CREATE VIEW v_connectors AS SELECT id FROM mcp_connectors",
        "ALTER TABLE mcp_connectors RENAME COLUMN name TO title",
        "ALTER POLICY p_servers ON mcp_servers USING (connector_id IS NOT NULL AND status IS NULL)",
        "ALTER ROLE carry_reader RENAME TO carry_reporter",
        "ALTER TABLE mcp_servers DISABLE TRIGGER t_servers",
        "COMMENT ON TRIGGER t_servers ON mcp_servers IS 'noop'",
        "ALTER TABLE mcp_servers RENAME CONSTRAINT c_servers TO c_servers_draft",
        "ALTER STATISTICS s_servers SET STATISTICS 200",
        "CREATE STATISTICS s_servers_legacy (ndistinct) ON connector_id, name FROM mcp_servers",
    ];
    for (i, change) in changes.iter().enumerate() {
        admin
            .batch_execute(&format!(
                "SELECT keyshift.carry_prepare({cols}, '_legacy');
                 INSERT INTO pg_temp.keyshift_carried (step, label, sql)
                 VALUES ('build', 'marker', 'COMMENT ON TABLE public.carry_marker IS ''stale''')"
            ))
            .await
            .unwrap();
        other.batch_execute(change).await.unwrap();
        admin
            .batch_execute(&format!(
                "BEGIN; SELECT keyshift.carry_save({cols}, '_legacy'); SELECT keyshift.carry_restore()"
            ))
            .await
            .unwrap_or_else(|e| panic!("after {change}: {e}"));
        let marker = one(
            &admin,
            "SELECT obj_description('carry_marker'::regclass, 'pg_class')",
        )
        .await;
        admin.batch_execute("ROLLBACK").await.unwrap();
        if i == 0 {
            assert_eq!(
                marker.as_deref(),
                Some("stale"),
                "nothing changed: the prepared statements run"
            );
        } else {
            assert_eq!(
                marker, None,
                "after `{change}` the swap ran the stale statements"
            );
        }
    }
    // And what the swap rebuilt is what the catalog said at the time (last change kept), with
    // the same privileges, table and column level.
    admin
        .batch_execute(
            "CREATE ROLE carry_editor; CREATE ROLE carry_auditor;
             GRANT SELECT, UPDATE ON v_servers TO carry_editor WITH GRANT OPTION;
             GRANT SELECT ON v_servers TO PUBLIC;
             GRANT SELECT (id), UPDATE (name, status) ON v_servers TO carry_auditor;
             GRANT INSERT (id) ON v_servers TO carry_auditor WITH GRANT OPTION;
             -- Owned by a role other than the one running the swap.
             CREATE VIEW v_owned AS SELECT id FROM mcp_connectors;
             ALTER VIEW v_owned OWNER TO carry_editor;
             GRANT SELECT ON v_owned TO carry_auditor;
             -- The owner's own entry narrowed: it must be restored as it was.
             CREATE VIEW v_narrow AS SELECT connector_id FROM mcp_servers;
             GRANT SELECT ON v_narrow TO carry_auditor;
             REVOKE TRUNCATE ON v_narrow FROM CURRENT_USER;
             -- An ACL holding only the owner's default entry (not NULL).
             CREATE VIEW v_only_owner AS SELECT connector_id FROM mcp_servers;
             GRANT SELECT ON v_only_owner TO carry_auditor;
             REVOKE SELECT ON v_only_owner FROM carry_auditor;",
        )
        .await
        .unwrap();
    let acl = "SELECT string_agg(concat_ws(' ', c.relname, pg_get_userbyid(c.relowner), coalesce(relacl::text, 'NULL'),
                   (SELECT string_agg(attname || '=' || attacl::text, ' ' ORDER BY attnum)
                      FROM pg_attribute WHERE attrelid = c.oid AND attacl IS NOT NULL)), '; ' ORDER BY c.relname)
               FROM pg_class c WHERE relnamespace = 'public'::regnamespace
                AND relname IN ('v_servers', 'v_owned', 'v_narrow', 'v_only_owner')";
    let before = one(&admin, acl).await;
    let listed = before.clone().unwrap_or_default();
    assert_eq!(listed.matches("; ").count(), 3, "four views: {listed}");
    assert!(!listed.contains("NULL"), "every ACL is explicit: {listed}");
    admin
        .batch_execute(&format!(
            "SELECT keyshift.carry_prepare({cols}, '_legacy');
             COMMENT ON VIEW v_servers IS 'renamed';
             BEGIN; SELECT keyshift.carry_save({cols}, '_legacy'); SELECT keyshift.carry_restore(); COMMIT"
        ))
        .await
        .unwrap();
    assert_eq!(one(&admin, acl).await, before);
    assert_eq!(
        one(
            &admin,
            "SELECT obj_description('v_servers'::regclass, 'pg_class')"
        )
        .await
        .as_deref(),
        Some("renamed")
    );
    assert_eq!(
        one(&admin, "SELECT string_agg(attname, ',' ORDER BY attnum) FROM pg_attribute WHERE attrelid = 'v_servers'::regclass AND attnum > 0").await.as_deref(),
        Some("id,connector_id,name,status")
    );
}
