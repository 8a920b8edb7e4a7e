//! [schema] deliverable 5: an integer FK on a declaratively partitioned table (time-partitioned
//! executions and logs referencing a migrated `servers`) migrated through the whole lifecycle,
//! with a partition created after expand, one attached after harden (its twins NULL) and one
//! created after a rollback, and writes through keyshift in between (src/migrate/partitions.rs).
mod common;
mod migrate_support;

use std::collections::BTreeMap;

use common::proxy::{connect_shaped, linked_proxy};
use migrate_support::{count, golden, ks_async, ks_expect, stdout, text};
use tokio_postgres::Client;

const SCHEMA: &str = "
CREATE TABLE servers (id serial PRIMARY KEY, name text NOT NULL UNIQUE);
CREATE TABLE executions (id bigserial, created_at timestamptz NOT NULL,
    server_id integer NOT NULL REFERENCES servers (id) ON DELETE CASCADE, note text,
    PRIMARY KEY (id, created_at)) PARTITION BY RANGE (created_at);
CREATE INDEX executions_server_id_idx ON executions (server_id, created_at DESC);
CREATE TABLE executions_2023 PARTITION OF executions FOR VALUES FROM ('2023-01-01') TO ('2024-01-01');
CREATE TABLE executions_2024 PARTITION OF executions FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
CREATE TABLE logs (id bigserial, at timestamptz NOT NULL,
    server_id integer REFERENCES servers (id) ON DELETE SET NULL, line text,
    PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
CREATE TABLE logs_2023 PARTITION OF logs FOR VALUES FROM ('2023-01-01') TO ('2024-01-01');
CREATE TABLE logs_2024 PARTITION OF logs FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
";

const ROWS: &str = "
INSERT INTO servers (name) SELECT 's' || g FROM generate_series(1, 50) g;
INSERT INTO executions (created_at, server_id, note)
    SELECT '2023-01-01'::timestamptz + (g % 700) * interval '1 day', 1 + g % 50, 'e' || g FROM generate_series(1, 3000) g;
INSERT INTO logs (at, server_id, line)
    SELECT '2023-01-01'::timestamptz + (g % 700) * interval '1 day', CASE WHEN g % 7 = 0 THEN NULL ELSE 1 + g % 50 END, 'l' || g
      FROM generate_series(1, 2000) g;
";

async fn db_with(sql: &str) -> common::TestDb {
    let db = common::TestDb::new().await;
    db.client().await.batch_execute(sql).await.expect("schema");
    db
}

async fn step(url: &str, args: &[&str]) {
    let o = ks_async(url, args).await;
    assert!(o.status.success(), "keyshift {args:?}: {}", text(&o));
}

/// Whether the tables are in the uuid shape (after cutover).
async fn after_cutover(c: &Client) -> bool {
    count(
        c,
        "SELECT count(*) FROM pg_attribute WHERE attrelid = 'servers'::regclass AND attname = 'id_legacy'",
    )
    .await
        == 1
}

/// Rows, per partition, whose twin on the non-truth side disagrees with the parent's (the uuid
/// before cutover, the legacy integer after), or is NULL where the FK is set. Every partition
/// is listed, with its row count, so that an empty partition cannot pass for a right one.
async fn wrong_twins(c: &Client) -> BTreeMap<String, (i64, i64)> {
    let (twin, pkey) = if after_cutover(c).await {
        ("_legacy", "id_legacy")
    } else {
        ("_uuid", "id_uuid")
    };
    let mut out = BTreeMap::new();
    for child in ["executions", "logs"] {
        let sql = format!(
            "SELECT x.tableoid::regclass::text, count(*), \
                    count(*) FILTER (WHERE x.server_id{twin} IS DISTINCT FROM p.{pkey}) \
               FROM {child} x LEFT JOIN servers p ON p.id = x.server_id GROUP BY 1"
        );
        for r in c.query(&sql, &[]).await.unwrap() {
            out.insert(r.get(0), (r.get(1), r.get(2)));
        }
    }
    out
}

async fn assert_twins_right(c: &Client, when: &str, partitions: &[&str]) {
    let w = wrong_twins(c).await;
    for p in partitions {
        let (rows, wrong) = w
            .get(*p)
            .copied()
            .unwrap_or_else(|| panic!("{when}: no rows in {p}: {w:?}"));
        assert!(rows > 0, "{when}: {p} is empty");
        assert_eq!(
            wrong, 0,
            "{when}: {p} has {wrong} wrong twin(s) of {rows}: {w:?}"
        );
    }
}

/// Each partition of `table` and the index of it attached to the partitioned index `index`:
/// (partition, its index's name, valid, the type of the index's first column).
async fn leaf_indexes(c: &Client, index: &str) -> BTreeMap<String, (String, bool, String)> {
    let sql = format!(
        "SELECT t.relname::text, ic.relname::text, x.indisvalid, format_type(a.atttypid, a.atttypmod)
           FROM pg_inherits ih JOIN pg_index x ON x.indexrelid = ih.inhrelid
           JOIN pg_class ic ON ic.oid = ih.inhrelid JOIN pg_class t ON t.oid = x.indrelid
           JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = x.indkey[0]
          WHERE ih.inhparent = 'public.{index}'::regclass"
    );
    c.query(&sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3))))
        .collect()
}

/// The partitions of `table` (leaves, by name).
async fn partitions(c: &Client, table: &str) -> Vec<String> {
    c.query(
        &format!(
            "SELECT relid::regclass::text FROM pg_partition_tree('{table}') WHERE isleaf ORDER BY 1"
        ),
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// The foreign keys of `table` and its partitions on column `column`, as
/// (relation, constraint name, validated, inherited from the partitioned table's).
async fn fks(c: &Client, table: &str, column: &str) -> Vec<(String, String, bool, bool)> {
    c.query(
        &format!(
            "SELECT con.conrelid::regclass::text, con.conname::text, con.convalidated, con.conparentid <> 0
               FROM pg_constraint con JOIN pg_partition_tree('{table}') t ON t.relid = con.conrelid
               JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = con.conkey[1]
              WHERE con.contype = 'f' AND a.attname = '{column}' ORDER BY 1, 2"
        ),
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
    .collect()
}

/// Every partition of `table` has exactly one FK on `column`, named `name`, validated, and
/// (on the partitions) attached to the partitioned table's.
async fn assert_one_fk(c: &Client, table: &str, column: &str, name: &str) {
    let got = fks(c, table, column).await;
    let want: Vec<(String, String, bool, bool)> = partitions(c, table)
        .await
        .into_iter()
        .map(|p| (p, name.to_string(), true, true))
        .chain([(table.to_string(), name.to_string(), true, false)])
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(got, want, "FKs on {table}.{column}");
}

/// [`assert_one_fk`] on both children: the FK on `server_id{column}` named `<child>_server_id_fkey{name}`.
async fn assert_fks(c: &Client, column: &str, name: &str) {
    for child in ["executions", "logs"] {
        assert_one_fk(
            c,
            child,
            &format!("server_id{column}"),
            &format!("{child}_server_id_fkey{name}"),
        )
        .await;
    }
}

/// Every partition's index is valid and indexes a column of type `ty` first.
fn assert_valid(m: &BTreeMap<String, (String, bool, String)>, ty: &str) {
    assert!(m.values().all(|(_, valid, t)| *valid && t == ty), "{m:?}");
}

/// The partitions' index names of a [`leaf_indexes`] answer.
fn names(m: &BTreeMap<String, (String, bool, String)>) -> BTreeMap<String, String> {
    m.iter()
        .map(|(t, (n, _, _))| (t.clone(), n.clone()))
        .collect()
}

/// The columns of `table`'s primary key with their types, in order, and whether every
/// partition's primary key is attached to it and valid.
async fn pk_of(c: &Client, table: &str) -> (String, bool) {
    let r = c
        .query_one(
            &format!(
                "SELECT (SELECT string_agg(a.attname || ' ' || format_type(a.atttypid, a.atttypmod), ', ' ORDER BY k.o)
                           FROM pg_constraint con CROSS JOIN LATERAL unnest(con.conkey) WITH ORDINALITY k(n, o)
                           JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.n
                          WHERE con.conrelid = '{table}'::regclass AND con.contype = 'p'),
                        (SELECT bool_and(EXISTS (SELECT 1 FROM pg_constraint con JOIN pg_index x ON x.indexrelid = con.conindid
                                                  WHERE con.conrelid = t.relid AND con.contype = 'p' AND x.indisvalid
                                                    AND con.conparentid = (SELECT oid FROM pg_constraint WHERE conrelid = '{table}'::regclass AND contype = 'p')))
                           FROM pg_partition_tree('{table}') t WHERE t.isleaf)"
            ),
            &[],
        )
        .await
        .unwrap();
    (r.get(0), r.get(1))
}

/// `executions`' and `logs`' own keys are on `ty` (with their partition keys), on every
/// partition.
async fn assert_own_keys(c: &Client, when: &str, ty: &str) {
    for (t, at) in [("executions", "created_at"), ("logs", "at")] {
        assert_eq!(
            pk_of(c, t).await,
            (format!("id {ty}, {at} timestamp with time zone"), true),
            "{when}: {t}'s own key"
        );
    }
}

async fn col_type(c: &Client, table: &str, column: &str) -> String {
    c.query_one(
        &format!(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = '{table}'::regclass AND attname = '{column}'"
        ),
        &[],
    )
    .await
    .unwrap_or_else(|e| panic!("{table}.{column}: {e}"))
    .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_children_go_through_the_whole_lifecycle() {
    let db = db_with(&format!("{SCHEMA}{ROWS}")).await;
    let url = db.url();
    let c = db.client().await;

    let o = ks_expect(&url, &["plan", "--format", "json"], 0);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let fks_json = v["tables"][0]["referenced_by"].as_array().unwrap();
    assert_eq!(fks_json.len(), 2, "{v}");
    assert!(fks_json.iter().all(|f| f["child_partitioned"] == true));
    // The children's own keys (id, partition key) are migrated too.
    assert_eq!(v["tables"][1]["name"], "executions", "{v}");
    assert_eq!(
        v["tables"][2]["partitioned_pk"],
        serde_json::json!(["id", "at"])
    );

    step(&url, &["expand"]).await;
    // The twin is on the partitioned table, hence on every partition.
    for t in ["executions", "executions_2023", "logs_2024"] {
        assert_eq!(col_type(&c, t, "server_id_uuid").await, "uuid");
    }
    // A partition created after expand gets the twin and the fill triggers with it.
    c.batch_execute(
        "CREATE TABLE executions_2025 PARTITION OF executions FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
         INSERT INTO executions (created_at, server_id, note) SELECT '2025-03-01', 1 + g % 50, 'direct' FROM generate_series(1, 40) g;",
    )
    .await
    .unwrap();
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM executions_2025 WHERE server_id_uuid IS NULL"
        )
        .await,
        40,
        "the parents have no uuid before backfill"
    );

    let p = linked_proxy(&db).await;
    let int = connect_shaped(&p, &db, "integer").await;
    int.batch_execute(
        "INSERT INTO executions (created_at, server_id, note) VALUES ('2023-06-01', 7, 'proxy'), ('2025-06-01', 8, 'proxy');
         INSERT INTO logs (at, server_id, line) VALUES ('2024-06-01', 9, 'proxy'), ('2024-06-02', NULL, 'proxy')",
    )
    .await
    .unwrap();

    // Backfill (leaf by leaf) and harden.
    step(&url, &["backfill"]).await;
    let all = [
        "executions_2023",
        "executions_2024",
        "executions_2025",
        "logs_2023",
        "logs_2024",
    ];
    assert_twins_right(&c, "after backfill", &all).await;
    let idx = leaf_indexes(&c, "executions_server_id_idx_uuid").await;
    assert_eq!(idx.len(), 3, "one mirror per partition: {idx:?}");
    assert_valid(&idx, "uuid");
    assert_eq!(
        idx["executions_2023"].0, "executions_2023_server_id_created_at_idx_uuid",
        "named after the partition's own index"
    );
    assert_eq!(
        count(&c, "SELECT count(*) FROM pg_index WHERE indexrelid = 'executions_server_id_idx_uuid'::regclass AND indisvalid").await,
        1,
        "the partitioned index is valid once every partition's is attached"
    );
    assert_fks(&c, "_uuid", "_uuid").await;
    ks_expect(&url, &["verify"], 0);

    // A table attached after harden, its twins NULL: verify names it, backfill fills it. Its
    // own key's uuid comes from the default copied with the columns; PostgreSQL requires of a
    // table attached to `executions` its CHECK constraints, harden's on the uuid key included.
    c.batch_execute(
        "CREATE TABLE executions_2022 (LIKE executions INCLUDING DEFAULTS);
         INSERT INTO executions_2022 (created_at, server_id, note) SELECT '2022-05-01', 1 + g % 50, 'attached' FROM generate_series(1, 60) g;
         ALTER TABLE executions_2022 ADD CONSTRAINT executions_id_uuid_not_null CHECK (id_uuid IS NOT NULL);
         ALTER TABLE executions ATTACH PARTITION executions_2022 FOR VALUES FROM ('2022-01-01') TO ('2023-01-01');",
    )
    .await
    .unwrap();
    let o = ks_expect(&url, &["verify"], 1);
    assert!(
        stdout(&o).contains("FAIL  no NULL FK uuid")
            && stdout(&o).contains("executions_2022.server_id_uuid"),
        "{}",
        text(&o)
    );
    step(&url, &["backfill"]).await;
    ks_expect(&url, &["verify"], 0);
    let all = [&all[..], &["executions_2022"]].concat();
    assert_twins_right(&c, "after the attached partition's backfill", &all).await;
    let before_names = names(&leaf_indexes(&c, "executions_server_id_idx").await);
    assert_eq!(before_names.len(), 4);

    step(&url, &["cutover"]).await;
    for t in [
        "executions",
        "executions_2022",
        "executions_2025",
        "logs_2023",
    ] {
        assert_eq!(col_type(&c, t, "server_id").await, "uuid", "{t}");
        assert_eq!(col_type(&c, t, "server_id_legacy").await, "integer", "{t}");
    }
    assert_fks(&c, "", "").await;
    // The children's own keys (id, partition key) are migrated with them.
    assert_own_keys(&c, "after cutover", "uuid").await;
    // The index in use on every partition has the name its integer predecessor had.
    let after = leaf_indexes(&c, "executions_server_id_idx").await;
    assert_eq!(names(&after), before_names);
    assert_valid(&after, "uuid");
    assert_eq!(
        count(&c, "SELECT count(*) FROM pg_attribute WHERE attrelid = 'executions'::regclass AND attname = 'server_id' AND attnotnull").await,
        1
    );
    // The uuid FK is enforced on every partition, and its action kept.
    for part in ["executions", "executions_2022", "executions_2025"] {
        let e = c
            .batch_execute(&format!(
                "INSERT INTO {part} (created_at, server_id) SELECT min(created_at), gen_random_uuid() FROM {part}"
            ))
            .await
            .expect_err("a uuid naming no server");
        assert_eq!(
            e.code(),
            Some(&tokio_postgres::error::SqlState::FOREIGN_KEY_VIOLATION),
            "{part}: {e}"
        );
    }
    // Writes through keyshift in both shapes.
    int.batch_execute(
        "INSERT INTO executions (created_at, server_id, note) VALUES ('2024-07-01', 11, 'proxy-after'), ('2022-07-01', 12, 'proxy-after');
         INSERT INTO logs (at, server_id, line) VALUES ('2023-07-01', 13, 'proxy-after')",
    )
    .await
    .unwrap();
    let uuid = connect_shaped(&p, &db, "uuid").await;
    uuid.batch_execute(
        "INSERT INTO executions (created_at, server_id, note) SELECT '2025-07-01', id, 'uuid-shaped' FROM servers WHERE name = 's14'",
    )
    .await
    .unwrap();
    assert_twins_right(&c, "after cutover", &all).await;
    ks_expect(&url, &["verify"], 0);
    let cascaded = count(&c, "SELECT count(*) FROM executions WHERE server_id = (SELECT id FROM servers WHERE name = 's20')").await;
    assert!(cascaded > 0);
    c.batch_execute("DELETE FROM servers WHERE name = 's20'")
        .await
        .unwrap();
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM executions WHERE server_id_legacy = 20"
        )
        .await,
        0,
        "ON DELETE CASCADE reached every partition"
    );

    step(&url, &["rollback"]).await;
    assert_eq!(
        col_type(&c, "executions_2022", "server_id").await,
        "integer"
    );
    assert_fks(&c, "", "").await;
    assert_fks(&c, "_uuid", "_uuid").await;
    assert_own_keys(&c, "after rollback", "bigint").await;
    let back = leaf_indexes(&c, "executions_server_id_idx").await;
    assert_eq!(names(&back), before_names);
    assert_valid(&back, "integer");
    assert_twins_right(&c, "after rollback", &all).await;
    ks_expect(&url, &["verify"], 0);

    // A partition created after the rollback gets the hardened schema by itself.
    c.batch_execute(
        "CREATE TABLE executions_2026 PARTITION OF executions FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');",
    )
    .await
    .unwrap();
    int.batch_execute(
        "INSERT INTO executions (created_at, server_id, note) SELECT '2026-02-01', g, 'proxy-2026' FROM generate_series(1, 10) g",
    )
    .await
    .unwrap();
    let all = [&all[..], &["executions_2026"]].concat();
    assert_twins_right(&c, "after rollback, new partition", &all).await;

    // The second time table by table (issue [scale]): the same checks follow.
    step(&url, &["cutover", "--by-table"]).await;
    assert_fks(&c, "", "").await;
    assert_own_keys(&c, "second cutover", "uuid").await;
    let again = leaf_indexes(&c, "executions_server_id_idx").await;
    assert_eq!(again.len(), 5);
    assert_valid(&again, "uuid");
    assert_eq!(
        again["executions_2026"].0, "executions_2026_server_id_created_at_idx",
        "PostgreSQL's own name for the index it built, now on the uuid"
    );
    assert_twins_right(&c, "second cutover", &all).await;
    ks_expect(&url, &["verify"], 0);

    p.shutdown();
    step(&url, &["shape", "default", "uuid"]).await;
    step(&url, &["finalize", "--yes"]).await;
    assert_own_keys(&c, "finalized", "uuid").await;
    assert_eq!(
        count(&c, "SELECT count(*) FROM pg_attribute WHERE attname LIKE '%\\_legacy' AND NOT attisdropped AND attrelid IN (SELECT relid FROM pg_partition_tree('executions') UNION ALL SELECT relid FROM pg_partition_tree('logs'))").await,
        0
    );
    assert_fks(&c, "", "").await;
    let end = leaf_indexes(&c, "executions_server_id_idx").await;
    assert_eq!(end.len(), 5);
    assert_valid(&end, "uuid");
    assert_eq!(
        count(&c, "SELECT count(*) FROM pg_class WHERE relkind IN ('i', 'I') AND (relname LIKE '%\\_uuid%' OR relname LIKE 'keyshift%')").await,
        0,
        "no index keeps a keyshift name"
    );
}

/// The SQL of every phase for a partitioned child, reviewed as a golden file.
#[tokio::test]
async fn partitioned_child_plan_matches_golden() {
    let db = db_with(SCHEMA).await;
    let o = ks_expect(&db.url(), &["plan", "--sql"], 0);
    golden("plan_partitioned.txt", &stdout(&o));
}

/// What stays refused, each with what to do.
#[tokio::test]
async fn partitioned_and_inherited_shapes_that_stay_blocked() {
    let base = "CREATE TABLE p (id serial PRIMARY KEY);";
    let cases: &[(&str, &str)] = &[
        // A partitioned table's own single-column key (partitioned by it).
        (
            "partitioned-table",
            "CREATE TABLE pk (id int PRIMARY KEY) PARTITION BY RANGE (id);",
        ),
        (
            "partitioned-table",
            "CREATE TABLE sub (d date, p_id int REFERENCES p (id)) PARTITION BY RANGE (d);
             CREATE TABLE sub1 PARTITION OF sub FOR VALUES FROM ('2024-01-01') TO ('2025-01-01') PARTITION BY LIST (p_id);",
        ),
        (
            "partitioned-table",
            "CREATE TABLE bykey (p_id int REFERENCES p (id)) PARTITION BY LIST (p_id);",
        ),
        (
            "partitioned-table",
            "CREATE TABLE part (d date, p_id int) PARTITION BY RANGE (d);
             CREATE TABLE part1 PARTITION OF part FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
             ALTER TABLE part1 ADD FOREIGN KEY (p_id) REFERENCES p (id);",
        ),
        (
            "inherited-table",
            "CREATE TABLE ev (p_id int REFERENCES p (id)); CREATE TABLE ev_old () INHERITS (ev);",
        ),
        // A migrated table in an INHERITS tree, as parent or as child.
        (
            "inherited-table",
            "CREATE TABLE p_old () INHERITS (p);",
        ),
        (
            "inherited-table",
            "CREATE TABLE base (n int); CREATE TABLE kid (id serial PRIMARY KEY) INHERITS (base);",
        ),
        // A partitioned table keyed (id, partition key) that a foreign key references (on the
        // whole key, as PostgreSQL requires).
        (
            "fk-to-partitioned-key",
            "CREATE TABLE ev (id serial, at date, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
             CREATE TABLE seen (id serial PRIMARY KEY, ev_id int, ev_at date, FOREIGN KEY (ev_id, ev_at) REFERENCES ev (id, at));",
        ),
    ];
    // A partitioned table keyed (integer id, partition key) is migrated to (uuid id,
    // partition key), and its FK with it; one keyed otherwise is skipped, saying why, and its
    // FK is migrated all the same: blocking it would block every time-partitioned child.
    let db = db_with(&format!(
        "{base}{SCHEMA}CREATE TABLE runs (id serial, kind int, at date, p_id int REFERENCES p (id), PRIMARY KEY (id, kind, at)) PARTITION BY RANGE (at);"
    ))
    .await;
    let o = ks_expect(&db.url(), &["plan", "--format", "json"], 0);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let tables = v["tables"].as_array().unwrap();
    for (t, pk) in [("executions", "created_at"), ("logs", "at")] {
        let j = tables
            .iter()
            .find(|j| j["name"] == t)
            .unwrap_or_else(|| panic!("{t} migrated: {v}"));
        assert_eq!(j["partitioned_pk"], serde_json::json!(["id", pk]));
    }
    let skipped = v["skipped"].to_string();
    assert!(
        skipped.contains("public.runs")
            && skipped.contains("partitioned table with primary key (id, kind, at)"),
        "{skipped}"
    );
    let p = tables.iter().find(|j| j["name"] == "p").unwrap();
    assert!(
        p["referenced_by"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["child_table"] == "runs"),
        "{p}"
    );
    for (code, extra) in cases {
        let db = db_with(&format!("{base}{extra}")).await;
        let o = ks_expect(&db.url(), &["plan", "--format", "json"], 2);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let blockers = v["blockers"].as_array().unwrap();
        assert!(
            blockers
                .iter()
                .any(|b| b["code"] == *code && !b["fix"].as_str().unwrap().is_empty()),
            "{extra}: {code} not reported: {blockers:#?}"
        );
    }
}

/// What an interrupted harden leaves on a partitioned child (the mirror `ON ONLY` the
/// partitioned table, a leaf's index built but not attached, a leaf's FK added but not
/// validated): a rerun of harden finishes it without building anything twice, and abort, at
/// that point or after harden, gives back the schema as it was.
#[tokio::test]
async fn interrupted_harden_resumes_and_abort_restores_a_partitioned_child() {
    const INTERRUPTED: &str = "
        CREATE UNIQUE INDEX servers_id_uuid_key ON servers (id_uuid);
        CREATE INDEX executions_server_id_idx_uuid ON ONLY executions USING btree (server_id_uuid, created_at DESC);
        CREATE INDEX executions_2023_server_id_created_at_idx_uuid ON executions_2023 USING btree (server_id_uuid, created_at DESC);
        ALTER TABLE executions_2024 ADD CONSTRAINT executions_server_id_fkey_uuid
            FOREIGN KEY (server_id_uuid) REFERENCES servers (id_uuid) ON DELETE CASCADE NOT VALID;";
    let db = db_with(&format!("{SCHEMA}{ROWS}")).await;
    let url = db.url();
    let c = db.client().await;
    let before = migrate_support::schema_dump(&db);
    for abort_before_harden in [true, false] {
        step(&url, &["expand"]).await;
        step(&url, &["backfill", "--skip-harden"]).await;
        c.batch_execute(INTERRUPTED).await.unwrap();
        if abort_before_harden {
            step(&url, &["abort"]).await;
            assert_eq!(
                before,
                migrate_support::schema_dump(&db),
                "abort mid-harden"
            );
            continue;
        }
        step(&url, &["harden"]).await;
        assert_eq!(
            count(
                &c,
                "SELECT count(*) FROM pg_index WHERE indrelid = 'executions_2023'::regclass"
            )
            .await,
            5,
            "the primary key, its two unique indexes for the swaps of its own key (uuid and integer), the FK's original and its mirror: the leftover was attached, not built again"
        );
        assert_valid(
            &leaf_indexes(&c, "executions_server_id_idx_uuid").await,
            "uuid",
        );
        assert_fks(&c, "_uuid", "_uuid").await;
        ks_expect(&url, &["verify"], 0);
        step(&url, &["abort"]).await;
        assert_eq!(
            before,
            migrate_support::schema_dump(&db),
            "abort after harden"
        );
    }
}

/// A partitioned table whose own key is (integer id, partition key), with no FK to it (an FK
/// to it would have to use the whole key, which keyshift refuses as composite).
const KEYED: &str = "
CREATE TABLE ev (id serial, at timestamptz NOT NULL, what text, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
CREATE TABLE ev_a PARTITION OF ev FOR VALUES FROM ('2023-01-01') TO ('2024-01-01');
CREATE TABLE ev_b PARTITION OF ev FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
INSERT INTO ev (at, what) SELECT '2023-01-01'::timestamptz + (g % 700) * interval '1 day', 'seed' FROM generate_series(1, 2000) g;
";

/// The partition created after expand, and the table attached after harden with rows of its
/// own (its columns, the uuid and its default included, copied from `ev`; the NOT NULL CHECK
/// of the uuid key, which PostgreSQL requires of a table attached while `ev` has it).
const AFTER_EXPAND: &str = "
CREATE TABLE ev_c PARTITION OF ev FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
INSERT INTO ev (at, what) SELECT '2025-02-01', 'direct-after-expand' FROM generate_series(1, 30);";
const AFTER_HARDEN: &str = "
CREATE TABLE ev_d (LIKE ev INCLUDING DEFAULTS);
INSERT INTO ev_d (at, what) SELECT '2022-03-01', 'attached' FROM generate_series(1, 40);
ALTER TABLE ev_d ADD CONSTRAINT ev_id_uuid_not_null CHECK (id_uuid IS NOT NULL);
ALTER TABLE ev ATTACH PARTITION ev_d FOR VALUES FROM ('2022-01-01') TO ('2023-01-01');";

/// `ev`'s primary key's columns with their types, before and after cutover.
const INT_KEY: &str = "id integer, at timestamp with time zone";
const UUID_KEY: &str = "id uuid, at timestamp with time zone";

/// `ev`'s primary key: its columns with their types, and per leaf partition (its name, its
/// primary key's name, attached to `ev`'s, the OID of its index, valid), by partition.
type KeyShape = (String, bool, Vec<(String, String, bool, u32, bool)>);

async fn key_shape(c: &Client) -> KeyShape {
    let r = c
        .query_one(
            "SELECT string_agg(a.attname || ' ' || format_type(a.atttypid, a.atttypmod), ', ' ORDER BY k.o), bool_and(x.indisvalid)
               FROM pg_constraint con JOIN pg_index x ON x.indexrelid = con.conindid
               CROSS JOIN LATERAL unnest(con.conkey) WITH ORDINALITY k(n, o)
               JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.n
              WHERE con.conrelid = 'ev'::regclass AND con.contype = 'p' AND con.conname = 'ev_pkey'",
            &[],
        )
        .await
        .unwrap();
    let leaves = c
        .query(
            "SELECT t.relid::regclass::text, con.conname::text,
                    con.conparentid = (SELECT oid FROM pg_constraint WHERE conrelid = 'ev'::regclass AND contype = 'p'),
                    con.conindid::oid, x.indisvalid
               FROM pg_partition_tree('ev') t
               JOIN pg_constraint con ON con.conrelid = t.relid AND con.contype = 'p'
               JOIN pg_index x ON x.indexrelid = con.conindid
              WHERE t.isleaf ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect();
    (
        r.get::<_, Option<String>>(0).unwrap_or_default(),
        r.get::<_, Option<bool>>(1).unwrap_or(false),
        leaves,
    )
}

/// `ev`'s primary key is on `columns`, valid, and every one of `leaves` has its own, named
/// `<leaf>_pkey` as it was, attached to it and valid. Returns each leaf's index OID.
async fn assert_key(c: &Client, when: &str, columns: &str, leaves: &[&str]) -> Vec<u32> {
    let (cols, valid, got) = key_shape(c).await;
    assert_eq!(cols, columns, "{when}: ev_pkey");
    assert!(valid, "{when}: ev_pkey is valid");
    let names: Vec<(String, String, bool, bool)> = got
        .iter()
        .map(|(l, n, a, _, v)| (l.clone(), n.clone(), *a, *v))
        .collect();
    let want: Vec<(String, String, bool, bool)> = leaves
        .iter()
        .map(|l| (l.to_string(), format!("{l}_pkey"), true, true))
        .collect();
    assert_eq!(names, want, "{when}: the partitions' primary keys");
    got.iter().map(|g| g.3).collect()
}

/// The OIDs of each leaf's unique index `<leaf><suffix>`, by leaf (0 when missing).
async fn index_oids(c: &Client, leaves: &[&str], suffix: &str) -> Vec<u32> {
    let mut v = Vec::new();
    for l in leaves {
        let r = c
            .query_one(
                &format!("SELECT coalesce(to_regclass('public.{l}{suffix}')::oid, 0)"),
                &[],
            )
            .await
            .unwrap();
        v.push(r.get(0));
    }
    v
}

/// Every row has a key, no two the same, and each marker written so far is there.
async fn assert_rows(c: &Client, when: &str, key: &str, written: &[(&str, i64)]) {
    let r = c
        .query_one(
            &format!("SELECT count(*), count({key}), count(DISTINCT {key}) FROM ev"),
            &[],
        )
        .await
        .unwrap();
    let (n, keyed, distinct): (i64, i64, i64) = (r.get(0), r.get(1), r.get(2));
    assert!(
        n > 0 && n == keyed && n == distinct,
        "{when}: {n} rows, {keyed} with {key}, {distinct} distinct"
    );
    for (what, want) in written {
        let got = count(c, &format!("SELECT count(*) FROM ev WHERE what = '{what}'")).await;
        assert_eq!(got, *want, "{when}: rows written as {what}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_tables_own_key_goes_through_the_whole_lifecycle() {
    let db = db_with(KEYED).await;
    let url = db.url();
    let c = db.client().await;

    let o = ks_expect(&url, &["plan", "--format", "json"], 0);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["tables"][0]["name"], "ev", "{v}");
    assert_eq!(
        v["tables"][0]["partitioned_pk"],
        serde_json::json!(["id", "at"])
    );
    let o = ks_expect(&url, &["plan"], 0);
    assert!(
        stdout(&o).contains("primary key ev_pkey (id_uuid, at) at cutover"),
        "{}",
        text(&o)
    );

    step(&url, &["expand"]).await;
    assert_eq!(col_type(&c, "ev_b", "id_uuid").await, "uuid");
    c.batch_execute(AFTER_EXPAND).await.unwrap();
    let p = linked_proxy(&db).await;
    let int = connect_shaped(&p, &db, "integer").await;
    let insert = |what: &'static str| {
        format!(
            "INSERT INTO ev (at, what) SELECT '2024-05-01'::timestamptz + g * interval '1 day', '{what}' FROM generate_series(1, 10) g"
        )
    };
    int.batch_execute(&insert("expanded")).await.unwrap();
    let mut written = vec![("direct-after-expand", 30), ("expanded", 10)];

    step(&url, &["backfill"]).await;
    assert_rows(&c, "after backfill", "id_uuid", &written).await;
    let three = ["ev_a", "ev_b", "ev_c"];
    for suffix in ["_id_uuid_key", "_id_legacy_key"] {
        assert!(
            index_oids(&c, &three, suffix).await.iter().all(|o| *o != 0),
            "harden built {suffix} on each partition"
        );
    }
    assert_key(&c, "hardened", INT_KEY, &three).await;
    ks_expect(&url, &["verify"], 0);

    c.batch_execute(AFTER_HARDEN).await.unwrap();
    written.push(("attached", 40));
    int.batch_execute(&insert("hardened")).await.unwrap();
    written.push(("hardened", 10));
    let four = ["ev_a", "ev_b", "ev_c", "ev_d"];
    assert_eq!(index_oids(&c, &["ev_d"], "_id_uuid_key").await, [0]);
    // The attached partition has no unique index on (id_uuid, at) yet: verify says so and
    // passes, and cutover's preparation builds it before the pause.
    let o = ks_expect(&url, &["verify"], 0);
    assert!(stdout(&o).contains("public.ev_d"), "{}", text(&o));
    let o = ks_async(&url, &["cutover", "--dry-run"]).await;
    assert!(o.status.success(), "{}", text(&o));
    let built = index_oids(&c, &four, "_id_uuid_key").await;
    assert!(built.iter().all(|o| *o != 0), "{built:?}");
    assert!(
        index_oids(&c, &four, "_id_legacy_key")
            .await
            .iter()
            .all(|o| *o != 0)
    );
    assert_key(&c, "after a dry run", INT_KEY, &four).await;

    step(&url, &["cutover"]).await;
    assert_eq!(col_type(&c, "ev", "id").await, "uuid");
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM pg_constraint WHERE conname = 'ev_id_uuid_not_null'"
        )
        .await,
        0,
        "the NOT NULL CHECK is gone with the attached partition's copy, which the ATTACH required"
    );
    assert_eq!(col_type(&c, "ev_d", "id_legacy").await, "integer");
    let oids = assert_key(&c, "after cutover", UUID_KEY, &four).await;
    assert_eq!(
        oids, built,
        "the swap builds no index: each partition's primary key is the unique index built before it"
    );
    int.batch_execute(&insert("cut-over-v1")).await.unwrap();
    let uuid = connect_shaped(&p, &db, "uuid").await;
    uuid.batch_execute(
        "INSERT INTO ev (at, what) VALUES ('2025-09-01', 'cut-over-v2'), ('2022-09-01', 'cut-over-v2')",
    )
    .await
    .unwrap();
    written.extend([("cut-over-v1", 10), ("cut-over-v2", 2)]);
    assert_rows(&c, "after cutover", "id", &written).await;
    assert_rows(&c, "after cutover, legacy side", "id_legacy", &[]).await;
    // The id mapping by the integer alone, for a row of each partition.
    let mapped = count(
        &c,
        "SELECT count(*) FROM ev e JOIN keyshift.id_map m ON m.table_name = 'public.ev' AND m.legacy_id = e.id_legacy AND m.uuid = e.id",
    )
    .await;
    assert_eq!(mapped, count(&c, "SELECT count(*) FROM ev").await);
    let row: (i32, uuid::Uuid) = {
        let r = c
            .query_one(
                "SELECT id_legacy, id FROM ev_d ORDER BY id_legacy LIMIT 1",
                &[],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    let r = c
        .query_one(
            "SELECT uuid FROM keyshift.id_map WHERE table_name = 'public.ev' AND legacy_id = $1",
            &[&row.0],
        )
        .await
        .unwrap();
    assert_eq!(r.get::<_, uuid::Uuid>(0), row.1);
    ks_expect(&url, &["verify"], 0);

    step(&url, &["rollback"]).await;
    assert_eq!(col_type(&c, "ev", "id").await, "integer");
    assert_eq!(col_type(&c, "ev_c", "id_uuid").await, "uuid");
    assert_key(&c, "after rollback", INT_KEY, &four).await;
    int.batch_execute(&insert("rolled-back")).await.unwrap();
    written.push(("rolled-back", 10));
    assert_rows(&c, "after rollback", "id", &written).await;
    assert_rows(&c, "after rollback, uuid side", "id_uuid", &[]).await;
    ks_expect(&url, &["verify"], 0);

    step(&url, &["cutover"]).await;
    assert_key(&c, "second cutover", UUID_KEY, &four).await;
    int.batch_execute(&insert("cut-over-again")).await.unwrap();
    written.push(("cut-over-again", 10));
    assert_rows(&c, "second cutover", "id", &written).await;
    ks_expect(&url, &["verify"], 0);

    p.shutdown();
    step(&url, &["shape", "default", "uuid"]).await;
    step(&url, &["finalize", "--yes"]).await;
    assert_key(&c, "finalized", UUID_KEY, &four).await;
    assert_rows(&c, "finalized", "id", &written).await;
    assert_eq!(
        count(&c, "SELECT count(*) FROM pg_attribute WHERE attname IN ('id_legacy', 'id_uuid') AND NOT attisdropped AND attrelid IN (SELECT relid FROM pg_partition_tree('ev'))").await,
        0
    );
    assert_eq!(
        count(&c, "SELECT count(*) FROM pg_class WHERE relkind IN ('i', 'I') AND (relname LIKE '%\\_uuid%' OR relname LIKE '%\\_legacy%' OR relname LIKE 'keyshift%')").await,
        0,
        "no index keeps a keyshift name"
    );
    // A partition created now gets the uuid key.
    c.batch_execute(
        "CREATE TABLE ev_e PARTITION OF ev FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
         INSERT INTO ev (at, what) VALUES ('2026-03-01', 'finalized')",
    )
    .await
    .unwrap();
    assert_key(
        &c,
        "new partition",
        UUID_KEY,
        &["ev_a", "ev_b", "ev_c", "ev_d", "ev_e"],
    )
    .await;
}

/// abort before cutover, after harden and after a partition created and one attached
/// mid-migration: the schema is the one the same statements give without keyshift.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_restores_a_partitioned_tables_own_key() {
    // Without keyshift: the same partitions, the attached one shaped like `ev` then.
    let reference = db_with(&format!(
        "{KEYED}{AFTER_EXPAND}{}",
        AFTER_HARDEN.replace(
            "ALTER TABLE ev_d ADD CONSTRAINT ev_id_uuid_not_null CHECK (id_uuid IS NOT NULL);",
            ""
        )
    ))
    .await;
    let want = migrate_support::schema_dump(&reference);
    let db = db_with(KEYED).await;
    let url = db.url();
    let c = db.client().await;
    step(&url, &["expand"]).await;
    c.batch_execute(AFTER_EXPAND).await.unwrap();
    step(&url, &["backfill"]).await;
    c.batch_execute(AFTER_HARDEN).await.unwrap();
    // The preparation of a cutover that does not happen builds the attached one's indexes.
    let o = ks_async(&url, &["cutover", "--dry-run"]).await;
    assert!(o.status.success(), "{}", text(&o));
    step(&url, &["abort"]).await;
    // The attached table's copy of the CHECK, which PostgreSQL required for the ATTACH, is
    // gone with the partitioned table's.
    assert_eq!(want, migrate_support::schema_dump(&db), "abort");
}
