//! Table-driven tests of the rewriter, in the style of sqlparser-rs's round-trip helpers.

use super::*;

fn fk(schema: &str, table: &str, column: &str, ty: &str, parent: (&str, &str)) -> FkPlan {
    FkPlan {
        schema: schema.into(),
        table: table.into(),
        column: column.into(),
        uuid_column: format!("{column}_uuid"),
        legacy_column: format!("{column}_legacy"),
        column_type: ty.into(),
        parent_schema: parent.0.into(),
        parent_table: parent.1.into(),
        parent_key_column: "id".into(),
        parent_uuid_column: "id_uuid".into(),
        parent_legacy_column: "id_legacy".into(),
        constraint: None,
    }
}

fn parent(schema: &str, table: &str) -> ParentPlan {
    ParentPlan {
        schema: schema.into(),
        table: table.into(),
        key_column: "id".into(),
        uuid_column: "id_uuid".into(),
        legacy_column: "id_legacy".into(),
    }
}

/// `public.p`; `public.c` (a child of `p` and of itself through `parent_id`, also a parent);
/// `app."Orders"` with the mixed-case FK `"AccountId"` to `app."Accounts"`.
pub(super) fn plan() -> PlanRules {
    PlanRules {
        parents: vec![
            parent("public", "p"),
            parent("public", "c"),
            parent("app", "Accounts"),
        ],
        fks: vec![
            fk("public", "c", "p_id", "bigint", ("public", "p")),
            fk("public", "c", "parent_id", "integer", ("public", "c")),
            fk("app", "Orders", "AccountId", "bigint", ("app", "Accounts")),
        ],
        columns: vec![
            TableColumns {
                schema: "public".into(),
                table: "c".into(),
                columns: [
                    "id",
                    "a",
                    "p_id",
                    "parent_id",
                    "id_uuid",
                    "p_id_uuid",
                    "parent_id_uuid",
                ]
                .map(String::from)
                .to_vec(),
            },
            TableColumns {
                schema: "app".into(),
                table: "Orders".into(),
                columns: ["id", "AccountId", "note", "AccountId_uuid"]
                    .map(String::from)
                    .to_vec(),
            },
        ],
        ..PlanRules::default()
    }
}

pub(super) fn forward() -> RuleSet {
    RuleSet::build(
        &plan(),
        Direction::Forward,
        ClientView::Physical,
        vec!["public".into()],
        1,
    )
    .unwrap()
}

fn reverse() -> RuleSet {
    RuleSet::build(
        &plan(),
        Direction::Reverse,
        ClientView::Physical,
        vec!["public".into()],
        2,
    )
    .unwrap()
}

/// `(SELECT id_uuid FROM public.p WHERE id = (E)::bigint)`: the lookup for a value that names
/// no column.
fn lk(parent: &str, e: &str, ty: &str) -> String {
    format!("(SELECT id_uuid FROM {parent} WHERE id = ({e})::{ty})")
}

/// The scope-safe lookup, for a value that may name columns.
fn lks(parent: &str, e: &str, ty: &str) -> String {
    format!(
        "(SELECT _ks_p.id_uuid FROM (VALUES (({e})::{ty})) AS _ks_v(k) JOIN {parent} AS _ks_p ON _ks_p.id = _ks_v.k)"
    )
}

fn p(e: &str) -> String {
    lk("public.p", e, "bigint")
}

fn ps(e: &str) -> String {
    lks("public.p", e, "bigint")
}

/// Every statement of `sql` parses with sqlparser (PostgreSQL dialect).
fn assert_parses(sql: &str) {
    let parsed =
        sqlparser::parser::Parser::parse_sql(&sqlparser::dialect::PostgreSqlDialect {}, sql);
    assert!(parsed.is_ok(), "does not parse: {sql}\n{parsed:?}");
}

#[track_caller]
pub(super) fn assert_rewrites(rules: &RuleSet, input: &str, expected: &str) {
    match rewrite(rules, input) {
        Outcome::Rewritten { sql, skipped, .. } => {
            assert_eq!(sql, expected, "\ninput: {input}");
            assert!(skipped.is_empty(), "skipped {skipped:?} in {input}");
            assert_parses(&sql);
            // The rewrite of a rewrite must leave it alone: the twins are now listed.
            assert_eq!(
                rewrite(rules, &sql),
                Outcome::Unchanged,
                "rewriting twice: {sql}"
            );
        }
        other => panic!("expected a rewrite of {input}\ngot {other:?}"),
    }
}

#[track_caller]
fn assert_unchanged(rules: &RuleSet, input: &str) {
    assert_eq!(rewrite(rules, input), Outcome::Unchanged, "input: {input}");
}

#[track_caller]
fn assert_skipped(rules: &RuleSet, input: &str, table: &str, reason: SkipReason) {
    assert_eq!(
        rewrite(rules, input),
        Outcome::Skipped(vec![Skip {
            table: table.into(),
            reason
        }]),
        "input: {input}"
    );
}

#[test]
fn insert_values() {
    let r = forward();
    let cases: Vec<(&str, String)> = vec![
        (
            "INSERT INTO c (a, p_id) VALUES ($1, $2), (3, 7)",
            format!(
                "INSERT INTO c (a, p_id, p_id_uuid) VALUES ($1, $2, {}), (3, 7, {})",
                p("$2"),
                p("7")
            ),
        ),
        (
            "insert into C (P_ID) values ($1::int8)",
            format!(
                "insert into C (P_ID, p_id_uuid) values ($1::int8, {})",
                p("$1::int8")
            ),
        ),
        // NULL and DEFAULT carry over; an expression and a parameter are copied verbatim.
        (
            "INSERT INTO c (a, p_id, parent_id) VALUES ('a', NULL, DEFAULT), ('b', $1::int + 1, - -2)",
            format!(
                "INSERT INTO c (a, p_id, parent_id, p_id_uuid, parent_id_uuid) VALUES ('a', NULL, DEFAULT, NULL, DEFAULT), ('b', $1::int + 1, - -2, {}, {})",
                p("$1::int + 1"),
                lk("public.c", "- -2", "integer")
            ),
        ),
        // A value that names columns is evaluated out of the parent's scope.
        (
            "INSERT INTO c (parent_id) VALUES ((SELECT id FROM c WHERE a = 'z'))",
            format!(
                "INSERT INTO c (parent_id, parent_id_uuid) VALUES ((SELECT id FROM c WHERE a = 'z'), {})",
                lks("public.c", "(SELECT id FROM c WHERE a = 'z')", "integer")
            ),
        ),
        // No column list: the application's own columns, in order, as many as the row has.
        (
            "INSERT INTO c VALUES (1, 'x', 7)",
            format!(
                "INSERT INTO c (id, a, p_id, p_id_uuid) VALUES (1, 'x', 7, {})",
                p("7")
            ),
        ),
        (
            "INSERT INTO public.c VALUES (DEFAULT, $1, $2, $3) RETURNING *",
            format!(
                "INSERT INTO public.c (id, a, p_id, parent_id, p_id_uuid, parent_id_uuid) VALUES (DEFAULT, $1, $2, $3, {}, {}) RETURNING *",
                p("$2"),
                lk("public.c", "$3", "integer")
            ),
        ),
        // Comments, odd spacing and multi-byte text survive.
        (
            "INSERT /* é */ INTO c(a,p_id)VALUES('€😀',-- the parent\n 7 /* seven */)",
            format!(
                "INSERT /* é */ INTO c(a,p_id, p_id_uuid)VALUES('€😀',-- the parent\n 7, {} /* seven */)",
                p("7")
            ),
        ),
        // Quoted, mixed-case and schema-qualified names.
        (
            "INSERT INTO app.\"Orders\" (\"AccountId\", note) VALUES (5, 'n')",
            format!(
                "INSERT INTO app.\"Orders\" (\"AccountId\", note, \"AccountId_uuid\") VALUES (5, 'n', {})",
                lk("app.\"Accounts\"", "5", "bigint")
            ),
        ),
        (
            "INSERT INTO \"app\".\"Orders\" VALUES (1, 2, 'n')",
            format!(
                "INSERT INTO \"app\".\"Orders\" (id, \"AccountId\", note, \"AccountId_uuid\") VALUES (1, 2, 'n', {})",
                lk("app.\"Accounts\"", "2", "bigint")
            ),
        ),
        (
            "INSERT INTO \"public\".\"c\" AS x (p_id) VALUES (1) RETURNING x.id",
            format!(
                "INSERT INTO \"public\".\"c\" AS x (p_id, p_id_uuid) VALUES (1, {}) RETURNING x.id",
                p("1")
            ),
        ),
        (
            "PREPARE ins (bigint) AS INSERT INTO c (p_id) VALUES ($1)",
            format!(
                "PREPARE ins (bigint) AS INSERT INTO c (p_id, p_id_uuid) VALUES ($1, {})",
                p("$1")
            ),
        ),
    ];
    for (input, expected) in &cases {
        assert_rewrites(&r, input, expected);
    }
}

#[test]
fn insert_values_left_alone() {
    let r = forward();
    // A uuid-aware application already writes the twin.
    assert_unchanged(&r, "INSERT INTO c (a, p_id, p_id_uuid) VALUES (1, 2, $1)");
    // No FK written: the twin stays NULL like the FK.
    assert_unchanged(&r, "INSERT INTO c (a) VALUES (1)");
    assert_unchanged(&r, "INSERT INTO c VALUES (1, 'x')");
    assert_unchanged(&r, "INSERT INTO c DEFAULT VALUES");
    // Unquoted Orders is orders, not "Orders"; app is not on the search path.
    assert_unchanged(&r, "INSERT INTO app.Orders (AccountId) VALUES (1)");
    assert_unchanged(&r, "INSERT INTO \"Orders\" (\"AccountId\") VALUES (1)");
    assert_unchanged(&r, "INSERT INTO other.c (p_id) VALUES (1)");
    assert_unchanged(&r, "INSERT INTO p (id) VALUES (1)");
    // Reads and deletes.
    assert_unchanged(&r, "SELECT * FROM c WHERE p_id = $1");
    assert_unchanged(&r, "DELETE FROM c WHERE p_id = 1 RETURNING *");
    assert_unchanged(&r, "COPY c (a, p_id) FROM STDIN");
    assert_unchanged(&r, "");
    assert_unchanged(&r, ";;");
}

#[test]
fn search_path_resolves_unqualified_names() {
    let rules = RuleSet::build(
        &plan(),
        Direction::Forward,
        ClientView::Physical,
        vec!["app".into(), "public".into()],
        1,
    )
    .unwrap();
    assert_rewrites(
        &rules,
        "INSERT INTO \"Orders\" (\"AccountId\") VALUES (1)",
        &format!(
            "INSERT INTO \"Orders\" (\"AccountId\", \"AccountId_uuid\") VALUES (1, {})",
            lk("app.\"Accounts\"", "1", "bigint")
        ),
    );
    assert!(matches!(
        rewrite(&rules, "INSERT INTO c (p_id) VALUES (1)"),
        Outcome::Rewritten { .. }
    ));
}

#[test]
fn insert_select() {
    let r = forward();
    let cases: Vec<(&str, String)> = vec![
        // SQLAlchemy 2's bulk form: the twin is one more output column, so ORDER BY,
        // RETURNING and the parameters are exactly as sent.
        (
            "INSERT INTO c (a, p_id) SELECT p0::VARCHAR, p1::BIGINT FROM (VALUES ($1::VARCHAR, $2::BIGINT, 0), ($3::VARCHAR, $4::BIGINT, 1)) AS imp_sen(p0, p1, sen_counter) ORDER BY sen_counter RETURNING c.id, c.id AS id__1",
            format!(
                "INSERT INTO c (a, p_id, p_id_uuid) SELECT p0::VARCHAR, p1::BIGINT, {} FROM (VALUES ($1::VARCHAR, $2::BIGINT, 0), ($3::VARCHAR, $4::BIGINT, 1)) AS imp_sen(p0, p1, sen_counter) ORDER BY sen_counter RETURNING c.id, c.id AS id__1",
                ps("p1::BIGINT")
            ),
        ),
        // Untyped parameters stay typed by the target columns.
        (
            "INSERT INTO c (a, p_id) SELECT $1, $2",
            format!(
                "INSERT INTO c (a, p_id, p_id_uuid) SELECT $1, $2, {}",
                p("$2")
            ),
        ),
        // `id` here is p.id: the copy must not be captured by the parent's own `id`.
        (
            "INSERT INTO c (a, p_id) SELECT DISTINCT name AS a, id AS pid FROM p WHERE id < 3 ON CONFLICT DO NOTHING",
            format!(
                "INSERT INTO c (a, p_id, p_id_uuid) SELECT DISTINCT name AS a, id AS pid, {} FROM p WHERE id < 3 ON CONFLICT DO NOTHING",
                ps("id")
            ),
        ),
        (
            "INSERT INTO c (p_id) SELECT p.id IS DISTINCT FROM 0 FROM p",
            format!(
                "INSERT INTO c (p_id, p_id_uuid) SELECT p.id IS DISTINCT FROM 0, {} FROM p",
                ps("p.id IS DISTINCT FROM 0")
            ),
        ),
        (
            "INSERT INTO c SELECT 1, 'x', id FROM p",
            format!(
                "INSERT INTO c (id, a, p_id, p_id_uuid) SELECT 1, 'x', id, {} FROM p",
                ps("id")
            ),
        ),
        // Set operations and `*` are wrapped as a derived table.
        (
            "INSERT INTO c (a, p_id) SELECT name, id FROM p UNION ALL SELECT 'x', 1 RETURNING id",
            format!(
                "INSERT INTO c (a, p_id, p_id_uuid) SELECT _ks.*, {} FROM (SELECT name, id FROM p UNION ALL SELECT 'x', 1) AS _ks(_ks1, _ks2) RETURNING id",
                p("_ks._ks2")
            ),
        ),
        (
            "INSERT INTO c (a, p_id) SELECT * FROM staging",
            format!(
                "INSERT INTO c (a, p_id, p_id_uuid) SELECT _ks.*, {} FROM (SELECT * FROM staging) AS _ks(_ks1, _ks2)",
                p("_ks._ks2")
            ),
        ),
        (
            "INSERT INTO c (a, p_id) (SELECT a, b FROM t) ON CONFLICT DO NOTHING",
            format!(
                "INSERT INTO c (a, p_id, p_id_uuid) SELECT _ks.*, {} FROM ((SELECT a, b FROM t)) AS _ks(_ks1, _ks2) ON CONFLICT DO NOTHING",
                p("_ks._ks2")
            ),
        ),
        (
            "INSERT INTO c (a, p_id) SELECT DISTINCT ON (name) name, id FROM p ORDER BY name, id DESC",
            format!(
                "INSERT INTO c (a, p_id, p_id_uuid) SELECT DISTINCT ON (name) name, id, {} FROM p ORDER BY name, id DESC",
                ps("id")
            ),
        ),
        (
            "INSERT INTO c (a, p_id) SELECT 'w' || g, g % 10 FROM generate_series(1, 20) g",
            format!(
                "INSERT INTO c (a, p_id, p_id_uuid) SELECT 'w' || g, g % 10, {} FROM generate_series(1, 20) g",
                ps("g % 10")
            ),
        ),
    ];
    for (input, expected) in &cases {
        assert_rewrites(&r, input, expected);
    }
    assert_unchanged(&r, "INSERT INTO c (a) SELECT name FROM p");
}

#[test]
fn on_conflict_do_update() {
    let r = forward();
    let cases: Vec<(&str, String)> = vec![
        // EXCLUDED.fk: the twin the INSERT computed.
        (
            "INSERT INTO c AS t (a, p_id) VALUES ($1, $2) ON CONFLICT (a) DO UPDATE SET p_id = EXCLUDED.p_id, a = t.a || 'x' RETURNING t.id",
            format!(
                "INSERT INTO c AS t (a, p_id, p_id_uuid) VALUES ($1, $2, {}) ON CONFLICT (a) DO UPDATE SET p_id = EXCLUDED.p_id, p_id_uuid = EXCLUDED.p_id_uuid, a = t.a || 'x' RETURNING t.id",
                p("$2")
            ),
        ),
        (
            "INSERT INTO c (a, p_id) VALUES (1, 2) ON CONFLICT ON CONSTRAINT c_a_key DO UPDATE SET p_id = $3 WHERE c.a > 0",
            format!(
                "INSERT INTO c (a, p_id, p_id_uuid) VALUES (1, 2, {}) ON CONFLICT ON CONSTRAINT c_a_key DO UPDATE SET p_id = $3, p_id_uuid = {} WHERE c.a > 0",
                p("2"),
                p("$3")
            ),
        ),
        // The INSERT writes no FK, the update does.
        (
            "INSERT INTO c (a) VALUES (1) ON CONFLICT (a) DO UPDATE SET p_id = 5",
            format!(
                "INSERT INTO c (a) VALUES (1) ON CONFLICT (a) DO UPDATE SET p_id = 5, p_id_uuid = {}",
                p("5")
            ),
        ),
        (
            "INSERT INTO c (a, p_id) SELECT a, b FROM t ON CONFLICT (a) DO UPDATE SET p_id = excluded.p_id",
            format!(
                "INSERT INTO c (a, p_id, p_id_uuid) SELECT a, b, {} FROM t ON CONFLICT (a) DO UPDATE SET p_id = excluded.p_id, p_id_uuid = EXCLUDED.p_id_uuid",
                ps("b")
            ),
        ),
        // EXCLUDED of a column whose twin the INSERT did not compute: looked up.
        (
            "INSERT INTO c (a) VALUES ('zz') ON CONFLICT (a) DO UPDATE SET p_id = EXCLUDED.parent_id",
            format!(
                "INSERT INTO c (a) VALUES ('zz') ON CONFLICT (a) DO UPDATE SET p_id = EXCLUDED.parent_id, p_id_uuid = {}",
                ps("EXCLUDED.parent_id")
            ),
        ),
    ];
    for (input, expected) in &cases {
        assert_rewrites(&r, input, expected);
    }
}

#[test]
fn update() {
    let r = forward();
    let cases: Vec<(&str, String)> = vec![
        (
            "UPDATE c SET p_id = $1 WHERE id = $2",
            format!(
                "UPDATE c SET p_id = $1, p_id_uuid = {} WHERE id = $2",
                p("$1")
            ),
        ),
        (
            "UPDATE public.c AS x SET a = 'y', p_id = p.id FROM p WHERE p.name = $1 AND x.id = $2 RETURNING x.*",
            format!(
                "UPDATE public.c AS x SET a = 'y', p_id = p.id, p_id_uuid = {} FROM p WHERE p.name = $1 AND x.id = $2 RETURNING x.*",
                ps("p.id")
            ),
        ),
        (
            "UPDATE c SET p_id = CASE WHEN a IS DISTINCT FROM 'z' THEN 1 ELSE NULL END, parent_id = NULL",
            format!(
                "UPDATE c SET p_id = CASE WHEN a IS DISTINCT FROM 'z' THEN 1 ELSE NULL END, p_id_uuid = {}, parent_id = NULL, parent_id_uuid = NULL",
                ps("CASE WHEN a IS DISTINCT FROM 'z' THEN 1 ELSE NULL END")
            ),
        ),
        // Self-referencing: `id` is the updated row's own id.
        (
            "UPDATE c SET parent_id = id",
            format!(
                "UPDATE c SET parent_id = id, parent_id_uuid = {}",
                lks("public.c", "id", "integer")
            ),
        ),
        (
            "UPDATE app.\"Orders\" o SET \"AccountId\" = DEFAULT",
            "UPDATE app.\"Orders\" o SET \"AccountId\" = DEFAULT, \"AccountId_uuid\" = DEFAULT"
                .to_string(),
        ),
    ];
    for (input, expected) in &cases {
        assert_rewrites(&r, input, expected);
    }
    assert_unchanged(&r, "UPDATE c SET a = 1 WHERE p_id = 2");
    assert_unchanged(&r, "UPDATE c SET p_id = 1, p_id_uuid = $1");
    assert_unchanged(&r, "UPDATE p SET id = 2");
}

#[test]
fn writable_ctes_and_batches() {
    let r = forward();
    assert_rewrites(
        &r,
        "WITH ins AS (INSERT INTO c (a, p_id) VALUES ('w', 1) RETURNING id), upd AS (UPDATE c SET p_id = 2 WHERE a = 'v' RETURNING id) SELECT * FROM ins UNION ALL SELECT * FROM upd",
        &format!(
            "WITH ins AS (INSERT INTO c (a, p_id, p_id_uuid) VALUES ('w', 1, {}) RETURNING id), upd AS (UPDATE c SET p_id = 2, p_id_uuid = {} WHERE a = 'v' RETURNING id) SELECT * FROM ins UNION ALL SELECT * FROM upd",
            p("1"),
            p("2")
        ),
    );
    assert_rewrites(
        &r,
        "WITH src AS (SELECT id FROM p WHERE name = $1) INSERT INTO c (p_id) SELECT id FROM src",
        &format!(
            "WITH src AS (SELECT id FROM p WHERE name = $1) INSERT INTO c (p_id, p_id_uuid) SELECT id, {} FROM src",
            ps("id")
        ),
    );
    assert_rewrites(
        &r,
        "WITH moved AS (DELETE FROM old RETURNING a, p) INSERT INTO c (a, p_id) SELECT * FROM moved",
        &format!(
            "WITH moved AS (DELETE FROM old RETURNING a, p) INSERT INTO c (a, p_id, p_id_uuid) SELECT _ks.*, {} FROM (SELECT * FROM moved) AS _ks(_ks1, _ks2)",
            p("_ks._ks2")
        ),
    );
    assert_rewrites(
        &r,
        "WITH x AS (INSERT INTO c (a, p_id) SELECT * FROM t ON CONFLICT DO NOTHING RETURNING id) SELECT * FROM x",
        &format!(
            "WITH x AS (INSERT INTO c (a, p_id, p_id_uuid) SELECT _ks.*, {} FROM (SELECT * FROM t) AS _ks(_ks1, _ks2) ON CONFLICT DO NOTHING RETURNING id) SELECT * FROM x",
            p("_ks._ks2")
        ),
    );
    assert_rewrites(
        &r,
        "WITH x AS (INSERT INTO c (a, p_id) SELECT a, b FROM t UNION SELECT 'q', 1) SELECT 1",
        &format!(
            "WITH x AS (INSERT INTO c (a, p_id, p_id_uuid) SELECT _ks.*, {} FROM (SELECT a, b FROM t UNION SELECT 'q', 1) AS _ks(_ks1, _ks2)) SELECT 1",
            p("_ks._ks2")
        ),
    );
    assert_rewrites(
        &r,
        "EXPLAIN (ANALYZE, BUFFERS) INSERT INTO c (p_id) VALUES (1)",
        &format!(
            "EXPLAIN (ANALYZE, BUFFERS) INSERT INTO c (p_id, p_id_uuid) VALUES (1, {})",
            p("1")
        ),
    );
    assert_unchanged(&r, "EXPLAIN INSERT INTO c (p_id) VALUES (1)");
    // A parent inserted by a CTE of the same statement is invisible to the lookup (one
    // snapshot): the CTE also returns the parent's key and uuid, and the lookup falls back on it.
    let cte = "(SELECT _ks_c._ks_u FROM (VALUES ((id)::bigint)) AS _ks_v(k) JOIN x AS _ks_c ON _ks_c._ks_k = _ks_v.k)";
    assert_rewrites(
        &r,
        "WITH x AS (INSERT INTO p (name) VALUES ($1) RETURNING id) INSERT INTO c (p_id, a) SELECT id, 'wt' FROM x",
        &format!(
            "WITH x AS (INSERT INTO p (name) VALUES ($1) RETURNING id, id AS _ks_k, id_uuid AS _ks_u) INSERT INTO c (p_id, a, p_id_uuid) SELECT id, 'wt', COALESCE({}, {cte}) FROM x",
            ps("id")
        ),
    );
    // … unless something may expand the CTE's columns.
    assert_rewrites(
        &r,
        "WITH x AS (INSERT INTO p (name) VALUES ($1) RETURNING *) INSERT INTO c (p_id, a) SELECT id, 'wt' FROM x",
        &format!(
            "WITH x AS (INSERT INTO p (name) VALUES ($1) RETURNING *) INSERT INTO c (p_id, a, p_id_uuid) SELECT id, 'wt', {} FROM x",
            ps("id")
        ),
    );
    assert_unchanged(
        &r,
        "CREATE FUNCTION f() RETURNS void LANGUAGE sql AS $$ INSERT INTO c (p_id) VALUES (1) $$",
    );
    // Several statements in one Query: each on its own, the rest untouched byte for byte.
    assert_rewrites(
        &r,
        "BEGIN; INSERT INTO c (p_id) VALUES (1);\nSELECT 'c;'; UPDATE c SET p_id = 2 ;COMMIT;",
        &format!(
            "BEGIN; INSERT INTO c (p_id, p_id_uuid) VALUES (1, {});\nSELECT 'c;'; UPDATE c SET p_id = 2, p_id_uuid = {} ;COMMIT;",
            p("1"),
            p("2")
        ),
    );
}

#[test]
fn merge() {
    let r = forward();
    assert_rewrites(
        &r,
        "MERGE INTO c USING (SELECT 2 AS pid, 'm' AS a) s ON c.a = s.a WHEN MATCHED AND s.pid > 0 THEN UPDATE SET p_id = s.pid WHEN MATCHED THEN DELETE WHEN NOT MATCHED THEN INSERT (a, p_id) VALUES (s.a, s.pid)",
        &format!(
            "MERGE INTO c USING (SELECT 2 AS pid, 'm' AS a) s ON c.a = s.a WHEN MATCHED AND s.pid > 0 THEN UPDATE SET p_id = s.pid, p_id_uuid = {} WHEN MATCHED THEN DELETE WHEN NOT MATCHED THEN INSERT (a, p_id, p_id_uuid) VALUES (s.a, s.pid, {})",
            ps("s.pid"),
            ps("s.pid")
        ),
    );
    assert_rewrites(
        &r,
        "MERGE INTO public.c t USING src s ON t.id = s.id WHEN NOT MATCHED THEN INSERT VALUES (s.id, s.a, $1)",
        &format!(
            "MERGE INTO public.c t USING src s ON t.id = s.id WHEN NOT MATCHED THEN INSERT (id, a, p_id, p_id_uuid) VALUES (s.id, s.a, $1, {})",
            p("$1")
        ),
    );
    assert_unchanged(
        &r,
        "MERGE INTO c USING src s ON c.id = s.id WHEN MATCHED THEN UPDATE SET a = s.a WHEN NOT MATCHED THEN DO NOTHING",
    );
}

#[test]
fn reverse_direction_fills_the_legacy_columns() {
    let r = reverse();
    assert_rewrites(
        &r,
        "INSERT INTO c (a, p_id) VALUES ($1, $2)",
        "INSERT INTO c (a, p_id, p_id_legacy) VALUES ($1, $2, (SELECT id_legacy FROM public.p WHERE id = ($2)::uuid))",
    );
    assert_rewrites(
        &r,
        "UPDATE c SET parent_id = $1",
        "UPDATE c SET parent_id = $1, parent_id_legacy = (SELECT id_legacy FROM public.c WHERE id = ($1)::uuid)",
    );
    // Positional values would land in the legacy columns, which keep their positions.
    assert_skipped(
        &r,
        "INSERT INTO c VALUES ($1, $2, $3)",
        "public.c",
        SkipReason::Unsupported,
    );
}

#[test]
fn what_cannot_be_rewritten_is_skipped() {
    let r = forward();
    // Forms sqlparser 0.63 does not parse (DESIGN.md).
    assert_skipped(
        &r,
        "INSERT INTO c (id, p_id) OVERRIDING SYSTEM VALUE VALUES (1, 2)",
        "c",
        SkipReason::ParseError,
    );
    assert_skipped(
        &r,
        "INSERT INTO c (a, p_id) VALUES (1, 2) ON CONFLICT (a) WHERE a > 0 DO UPDATE SET p_id = 3",
        "c",
        SkipReason::ParseError,
    );
    assert_skipped(
        &r,
        "INSERT INTO c (p_id) VALUES (nextval('s'))",
        "public.c",
        SkipReason::Volatile,
    );
    // sqlparser reads `ONLY c` as the table `ONLY` aliased `c`: not trusted.
    assert_skipped(
        &r,
        "UPDATE ONLY c SET p_id = 1",
        "c",
        SkipReason::ParseError,
    );
    // A DELETE has no twin to fill: nothing to rewrite, parsed or not.
    assert_unchanged(&r, "DELETE FROM ONLY c WHERE p_id = 1");
    assert_unchanged(&r, "SELECT a FROM c ORDER BY a FETCH FIRST 1 ROWS ONLY");
    assert_skipped(
        &r,
        "UPDATE ONLY public.c SET p_id = 1",
        "c",
        SkipReason::ParseError,
    );
    assert_skipped(
        &r,
        "UPDATE c SET (a, p_id) = (1, 2)",
        "public.c",
        SkipReason::Unsupported,
    );
    assert_skipped(
        &r,
        "INSERT INTO c (a, p_id VALUES",
        "c",
        SkipReason::ParseError,
    );
    // Unparseable reads are not writes.
    assert_unchanged(&r, "SELECT FROM c WHERE ((");
    assert_unchanged(
        &r,
        "CREATE INDEX CONCURRENTLY c_x ON c USING brin (p_id) WITH (pages_per_range = 4)",
    );

    // One skipped statement does not stop the others.
    match rewrite(
        &r,
        "INSERT INTO c (p_id) VALUES (nextval('s')); INSERT INTO c (p_id) VALUES (1)",
    ) {
        Outcome::Rewritten {
            sql,
            skipped,
            changes,
        } => {
            assert_eq!(
                sql,
                format!(
                    "INSERT INTO c (p_id) VALUES (nextval('s')); INSERT INTO c (p_id, p_id_uuid) VALUES (1, {})",
                    p("1")
                )
            );
            assert_eq!(
                skipped,
                vec![Skip {
                    table: "public.c".into(),
                    reason: SkipReason::Volatile
                }]
            );
            assert_eq!(
                changes,
                vec![Change {
                    table: "public.c".into(),
                    kind: Kind::Insert
                }]
            );
        }
        other => panic!("{other:?}"),
    }
}

/// Through the PostgreSQL regression suite with `p` and `c` migrated, strict mode refused
/// statements that never write `c` (issue 12): `c` as a column, a cursor, the collation `"C"`,
/// inside a literal. Statements keyshift does not parse are judged by their write targets.
#[test]
fn only_writes_to_migrated_tables_are_skipped() {
    let r = forward();
    let not_writes = [
        "UPDATE js SET j['a']['c'] = '1'",
        "SELECT 'abc' COLLATE \"C\"",
        "CREATE TABLE t (c int)",
        "SELECT c FROM t",
        "UPDATE t SET c = 1",
        "INSERT INTO t (c) VALUES (1)",
        "DECLARE c CURSOR FOR SELECT 1",
        "FETCH 1 FROM c",
        "MOVE BACKWARD ALL IN c",
        "CLOSE c",
        "SELECT 1 -- insert into c",
        "SELECT 1 /* insert into c */",
        "CREATE FUNCTION f() RETURNS void LANGUAGE sql AS $$insert into c values (1)$$",
        // Unparseable by sqlparser 0.63, and not writes of c.
        "UPDATE t SET c[1] = 2, d = c OVERRIDING",
        "INSERT INTO t (c) OVERRIDING SYSTEM VALUE VALUES (1)",
        "SELECT c FROM t WHERE a = 'unterminated",
        "CREATE RULE r AS ON INSERT TO t DO INSTEAD (INSERT INTO c VALUES (new.a); NOTIFY c)",
        "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC INSERT INTO c VALUES (1); SELECT 1; END",
        "EXPLAIN INSERT INTO c (id, p_id) OVERRIDING SYSTEM VALUE VALUES (1, 2)",
        "SELECT * FROM c FOR UPDATE OF c SKIP LOCKED NOWAIT ((",
        "DELETE FROM c WHERE ((",
    ];
    for sql in not_writes {
        assert_eq!(rewrite(&r, sql), Outcome::Unchanged, "{sql}");
    }
    // Real writes keyshift cannot parse are still skipped, however the table is spelled.
    for (sql, table) in [
        (
            "insert into C (id, p_id) overriding system value values (1, 2)",
            "c",
        ),
        (
            "INSERT INTO public.\"c\" (id) OVERRIDING USER VALUE VALUES (1)",
            "c",
        ),
        (
            "WITH x AS (UPDATE ONLY public.c AS y SET p_id = 1 RETURNING *) SELECT * FROM x",
            "c",
        ),
        ("INSERT INTO c VALUES ('unterminated", "c"),
        (
            "EXPLAIN ANALYZE INSERT INTO c (id) OVERRIDING SYSTEM VALUE VALUES (1)",
            "c",
        ),
        (
            "INSERT INTO app.\"Orders\" (id) OVERRIDING SYSTEM VALUE VALUES (1)",
            "Orders",
        ),
    ] {
        assert_skipped(&r, sql, table, SkipReason::ParseError);
    }
    // A statement too long to parse is judged the same way.
    let long_read = format!(
        "SELECT c FROM t WHERE a IN ({})",
        vec!["1"; MAX_SQL_BYTES / 2].join(",")
    );
    assert_eq!(rewrite(&r, &long_read), Outcome::Unchanged);
    let long_write = format!(
        "INSERT INTO c (p_id) VALUES {}",
        vec!["(1)"; MAX_SQL_BYTES / 3].join(",")
    );
    assert_skipped(&r, &long_write, "c", SkipReason::TooLong);
}

#[test]
fn outcomes_name_the_table_and_kind() {
    let r = forward();
    let kinds = [
        ("INSERT INTO c (p_id) VALUES (1)", Kind::Insert),
        ("INSERT INTO c (p_id) SELECT 1", Kind::InsertSelect),
        (
            "INSERT INTO c (a) VALUES (1) ON CONFLICT (a) DO UPDATE SET p_id = 1",
            Kind::Upsert,
        ),
        ("UPDATE c SET p_id = 1", Kind::Update),
        (
            "MERGE INTO c USING s ON true WHEN MATCHED THEN UPDATE SET p_id = 1",
            Kind::Merge,
        ),
    ];
    for (sql, kind) in kinds {
        match rewrite(&r, sql) {
            Outcome::Rewritten { changes, .. } => {
                assert_eq!(
                    changes,
                    vec![Change {
                        table: "public.c".into(),
                        kind
                    }],
                    "{sql}"
                )
            }
            other => panic!("{sql}: {other:?}"),
        }
    }
}

#[test]
fn rule_set_construction() {
    let r = forward();
    assert_eq!(r.version(), 1);
    assert!(!r.is_empty());
    assert!(RuleSet::empty(3).is_empty());
    assert_eq!(
        rewrite(&RuleSet::empty(3), "INSERT INTO c (p_id) VALUES (1)"),
        Outcome::Unchanged
    );
    let mut bad = plan();
    bad.parents.clear();
    assert!(matches!(
        RuleSet::build(
            &bad,
            Direction::Forward,
            ClientView::Physical,
            vec!["public".into()],
            1
        ),
        Err(RuleError::UnknownParent { .. })
    ));
    assert_eq!(
        RuleSet::build(&plan(), Direction::Forward, ClientView::Physical, vec![], 1).err(),
        Some(RuleError::EmptySearchPath)
    );
}

#[test]
fn cache_hits_and_bounds() {
    let r = forward();
    let cache = RewriteCache::new(2, 1000);
    let sql = "INSERT INTO c (p_id) SELECT id FROM p";
    let a = cache.rewrite(&r, sql);
    let b = cache.rewrite(&r, sql);
    assert!(std::sync::Arc::ptr_eq(&a, &b));
    assert_eq!((cache.hits(), cache.misses()), (1, 1));
    // Statements that touch no migrated table are not stored.
    assert_eq!(*cache.rewrite(&r, "SELECT 1"), Outcome::Unchanged);
    assert_eq!(cache.len(), 1);
    for i in 0..5 {
        cache.rewrite(
            &r,
            &format!("INSERT INTO c (p_id, a) VALUES ({i}, 'x{i}') -- {i}"),
        );
        assert!(cache.len() <= 2);
    }
    // A new rule-set version starts afresh.
    let r2 = reverse();
    match &*cache.rewrite(&r2, sql) {
        Outcome::Rewritten { sql, .. } => assert!(sql.contains("p_id_legacy")),
        other => panic!("{other:?}"),
    }
    assert_eq!(cache.len(), 1);
}

/// Texts that differ only in their literals share one cached shape, and what the cache
/// answers for each is exactly the text's own rewrite.
#[test]
fn cache_by_shape_answers_what_the_rewriter_would() {
    let r = forward();
    let cache = RewriteCache::new(100, 10_000);
    let texts: Vec<String> = (0..50)
        .map(|i| {
            format!(
                "INSERT INTO c (p_id, a) VALUES ({i}, 'it''s {i}'), ({}, 'b'); UPDATE c SET p_id = {i} WHERE a = 'z{i}'",
                i * 7 + 1
            )
        })
        .collect();
    for t in &texts {
        assert_eq!(*cache.rewrite(&r, t), super::rewrite(&r, t), "{t}");
    }
    assert_eq!(cache.misses(), 1, "one shape, rewritten once");
    assert_eq!(cache.hits(), 49);
    match &*cache.rewrite(&r, &texts[3]) {
        Outcome::Rewritten { sql, .. } => {
            assert!(
                sql.contains("'it''s 3'") && sql.contains("p_id_uuid"),
                "{sql}"
            )
        }
        other => panic!("{other:?}"),
    }
    // Typed literals do not survive the placeholder: the shape is marked and every text is
    // rewritten on its own, still correctly.
    for i in 0..5 {
        let t = format!(
            "INSERT INTO c (p_id, a) VALUES ({i}, DATE '2020-01-0{}'::text)",
            i + 1
        );
        assert_eq!(*cache.rewrite(&r, &t), super::rewrite(&r, &t), "{t}");
    }
}

/// A uuid-shaped session before cutover (physical integer): reverse fills, through views.
fn uuid_views() -> RuleSet {
    RuleSet::build(
        &plan(),
        Direction::Reverse,
        ClientView::Translated(crate::shape::Shape::Uuid),
        vec!["public".into()],
        3,
    )
    .unwrap()
}

/// An integer-shaped session after cutover (physical uuid): forward fills, through views.
fn integer_views() -> RuleSet {
    RuleSet::build(
        &plan(),
        Direction::Forward,
        ClientView::Translated(crate::shape::Shape::Integer),
        vec!["public".into()],
        4,
    )
    .unwrap()
}

/// The rewrite of a simple Query that PostgreSQL plans at every execution.
fn each_execution(r: &RuleSet, sql: &str) -> String {
    sql_of(rewrite_planned(r, sql, true, Planning::EachExecution))
}

fn sql_of(out: Outcome) -> String {
    match out {
        Outcome::Rewritten { sql, skipped, .. } if skipped.is_empty() => sql,
        other => panic!("not rewritten: {other:?}"),
    }
}

#[test]
fn translated_reads_point_every_migrated_table_at_its_view() {
    let r = uuid_views();
    assert_eq!(
        sql_of(rewrite(
            &r,
            "SELECT c.id, p.id FROM c JOIN public.p ON p.id = c.p_id WHERE c.id = $1"
        )),
        "SELECT c.id, p.id FROM keyshift_uuid_public.c JOIN keyshift_uuid_public.p ON p.id = c.p_id WHERE c.id = $1"
    );
    // Quoted and mixed-case schemas keep their case inside the quotes; unmigrated tables,
    // CTE names and a migrated name used as a column are left alone.
    assert_eq!(
        sql_of(rewrite(
            &r,
            r#"WITH p AS (SELECT 1 AS id) SELECT * FROM p, "app"."Accounts" a, other o WHERE o.c = 1"#
        )),
        r#"WITH p AS (SELECT 1 AS id) SELECT * FROM p, "keyshift_uuid_app"."Accounts" a, other o WHERE o.c = 1"#
    );
    assert_eq!(rewrite(&r, "SELECT c FROM other"), Outcome::Unchanged);
    // Subqueries, EXPLAIN, row locks, DELETE.
    assert_eq!(
        sql_of(rewrite(
            &r,
            "EXPLAIN SELECT 1 FROM other WHERE x IN (SELECT id FROM p) FOR UPDATE"
        )),
        "EXPLAIN SELECT 1 FROM other WHERE x IN (SELECT id FROM keyshift_uuid_public.p) FOR UPDATE"
    );
    assert_eq!(
        sql_of(rewrite(&r, "DELETE FROM p WHERE id = $1")),
        "DELETE FROM keyshift_uuid_public.p WHERE id = $1"
    );
}

#[test]
fn translated_reads_that_name_no_renamed_column_read_the_tables() {
    for r in [uuid_views(), integer_views()] {
        // Nothing in them differs between the table and the view: no redirect.
        for sql in [
            "SELECT a FROM c WHERE a = 'x'",
            "SELECT count(*) FROM c",
            "SELECT c.a, x.a FROM c JOIN public.c AS x ON x.a = c.a",
            "SELECT a FROM c WHERE a IN (SELECT a FROM c AS y WHERE y.a <> 'z') ORDER BY 1",
        ] {
            assert_eq!(rewrite(&r, sql), Outcome::Unchanged, "{sql}");
        }
        // A renamed column in either shape, `*`, a whole row, a join by name, a row lock,
        // TABLE, a data-modifying CTE: through the views as before.
        for sql in [
            "SELECT a FROM c WHERE p_id = 1",
            "SELECT a FROM c WHERE p_id_legacy = 1",
            "SELECT a FROM c WHERE p_id_uuid = $1",
            "SELECT a FROM c WHERE \"id\" = 1",
            "SELECT * FROM c",
            "SELECT c.* FROM c",
            "SELECT to_json(x) FROM c x",
            "SELECT c FROM c",
            "SELECT a FROM c NATURAL JOIN other",
            "SELECT a FROM c FOR UPDATE",
            "SELECT a FROM c FOR KEY SHARE",
            "SELECT a FROM ONLY c",
            "TABLE c",
            "WITH w AS (DELETE FROM c WHERE a = 'x' RETURNING a) SELECT a FROM w",
        ] {
            match rewrite(&r, sql) {
                Outcome::Rewritten { sql: out, .. } => {
                    assert!(out.contains("keyshift_"), "{sql} -> {out}")
                }
                // What sqlparser cannot parse is refused, as before (strict).
                Outcome::Skipped(s) => assert_eq!(s[0].reason, SkipReason::ParseError, "{sql}"),
                other => panic!("{sql}: {other:?}"),
            }
        }
    }
}

/// A simple-protocol read of one migrated table that names renamed columns runs on the
/// table with their physical names, the select list keeping the session's (translate.rs,
/// `on_the_table_renamed`); anything less certain goes through the view as before.
#[test]
fn translated_simple_reads_of_one_table_name_its_physical_columns() {
    let r = uuid_views();
    for (sql, want) in [
        (
            "SELECT a FROM c WHERE p_id = 'u'",
            "SELECT a FROM c WHERE p_id_uuid = 'u'",
        ),
        (
            "SELECT p_id, c.id, a FROM public.c WHERE c.id = 'u' ORDER BY p_id",
            "SELECT p_id_uuid AS p_id, c.id_uuid AS id, a FROM public.c WHERE c.id_uuid = 'u' ORDER BY p_id_uuid",
        ),
        (
            "SELECT max(p_id), count(*) FROM c x WHERE x.p_id_legacy > 3 GROUP BY a",
            "SELECT max(p_id_uuid), count(*) FROM c x WHERE x.p_id > 3 GROUP BY a",
        ),
        (
            "SELECT P_ID_LEGACY FROM c",
            "SELECT p_id AS p_id_legacy FROM c",
        ),
    ] {
        assert_eq!(each_execution(&r, sql), want, "{sql}");
    }
    // After cutover, the integer shape names the legacy integers and the uuids apart.
    let r = integer_views();
    assert_eq!(
        each_execution(&r, "SELECT p_id, p_id_uuid FROM c WHERE id = 3"),
        "SELECT p_id_legacy AS p_id, p_id AS p_id_uuid FROM c WHERE id_legacy = 3"
    );
    // Through the view: a statement planned once; a renamed column under another name
    // (`::text` is named after it), as an alias, as a function, or one this shape does not
    // have; a join, a subquery, a CTE, a set operation, `*`, a row lock, a whole row.
    let r = uuid_views();
    assert!(
        sql_of(rewrite(&r, "SELECT a FROM c WHERE p_id = 'u'")).contains("keyshift_uuid_public.c")
    );
    for sql in [
        "SELECT p_id::text FROM c",
        "SELECT (p_id) FROM c",
        "SELECT a AS p_id FROM c WHERE p_id = 'u'",
        "SELECT a FROM c AS p_id WHERE p_id.p_id = 'u'",
        "SELECT p_id(a) FROM c WHERE p_id = 'u'",
        "SELECT a FROM c WHERE p_id_uuid = 'u'",
        "SELECT c.a FROM c JOIN p ON p.id = c.p_id",
        "SELECT a FROM c WHERE p_id IN (SELECT id FROM p)",
        "SELECT a FROM c WHERE p_id = (SELECT 'u')",
        "WITH w AS (SELECT 1) SELECT p_id FROM c",
        "SELECT p_id FROM c UNION SELECT id FROM p",
        "SELECT *, p_id FROM c",
        "SELECT p_id FROM c FOR UPDATE",
        "SELECT p_id, c FROM c",
        "SELECT p_id, xmin FROM c",
        "SELECT p_id FROM ONLY c",
        "SELECT p_id FROM c TABLESAMPLE SYSTEM (10)",
    ] {
        match rewrite_planned(&r, sql, true, Planning::EachExecution) {
            Outcome::Rewritten { sql: out, .. } => {
                assert!(out.contains("keyshift_uuid_"), "{sql} -> {out}")
            }
            Outcome::Skipped(_) => {}
            other => panic!("{sql}: {other:?}"),
        }
    }
}

/// The application's views keyshift shows in the session's shape (src/migrate/carry.rs) are
/// always read through keyshift's copy: their columns depend on the shape whatever the
/// statement names. Only for translated sessions: a physical session reads them as they are.
#[test]
fn translated_reads_of_the_applications_views_read_their_copy() {
    let mut p = plan();
    p.shaped_views = vec![("public".into(), "report".into())];
    let r = RuleSet::build(
        &p,
        Direction::Reverse,
        ClientView::Translated(crate::shape::Shape::Uuid),
        vec!["public".into()],
        3,
    )
    .unwrap();
    for (sql, want) in [
        (
            "SELECT name FROM report",
            "SELECT name FROM keyshift_uuid_public.report",
        ),
        (
            "SELECT count(*) FROM public.report r JOIN other o ON o.a = r.a",
            "SELECT count(*) FROM keyshift_uuid_public.report r JOIN other o ON o.a = r.a",
        ),
        (
            "SELECT a FROM c WHERE a IN (SELECT a FROM report)",
            "SELECT a FROM keyshift_uuid_public.c WHERE a IN (SELECT a FROM keyshift_uuid_public.report)",
        ),
    ] {
        assert_eq!(sql_of(rewrite(&r, sql)), want);
    }
    assert_eq!(
        rewrite(&r, "WITH report AS (SELECT 1 AS a) SELECT a FROM report"),
        Outcome::Unchanged
    );
    let physical = RuleSet::build(
        &p,
        Direction::Forward,
        ClientView::Physical,
        vec!["public".into()],
        3,
    )
    .unwrap();
    assert_eq!(
        rewrite(&physical, "SELECT name FROM report"),
        Outcome::Unchanged
    );
}

#[test]
fn translated_inserts_planned_once_look_the_twin_up_through_the_parents_view() {
    let r = uuid_views();
    let out = sql_of(rewrite(
        &r,
        "INSERT INTO c (id, a, p_id) VALUES ($1, 'x', $2)",
    ));
    assert_eq!(
        out,
        "INSERT INTO keyshift_uuid_public.c (id, a, p_id, p_id_legacy) VALUES ($1, 'x', $2, \
         (SELECT id_legacy FROM keyshift_uuid_public.p WHERE id = ($2)::uuid))"
    );
    let r = integer_views();
    let out = sql_of(rewrite(&r, "UPDATE c SET p_id = 7 WHERE id = 1"));
    assert_eq!(
        out,
        "UPDATE keyshift_integer_public.c SET p_id = 7, p_id_uuid = \
         (SELECT id_uuid FROM keyshift_integer_public.p WHERE id = (7)::bigint) WHERE id = 1"
    );
}

#[test]
fn translated_inserts_planned_at_each_execution_leave_the_twin_to_the_fill_trigger() {
    let r = uuid_views();
    // The twin is named, as NULL: the child's fill trigger computes it from the parent (an
    // other side with a column default would otherwise keep that default).
    assert_eq!(
        each_execution(
            &r,
            "INSERT INTO c (id, a, p_id) VALUES (7, 'x', 'b1e0c7a2-0000-4000-8000-000000000001')"
        ),
        "INSERT INTO keyshift_uuid_public.c (id, a, p_id, p_id_legacy) VALUES (7, 'x', \
         'b1e0c7a2-0000-4000-8000-000000000001', NULL)"
    );
    // Nothing of the expression is copied, so a volatile one no longer stops the rewrite.
    assert_eq!(
        each_execution(
            &r,
            "INSERT INTO c (a, p_id) VALUES ('x', (SELECT id FROM p ORDER BY random() LIMIT 1))"
        ),
        "INSERT INTO keyshift_uuid_public.c (a, p_id, p_id_legacy) VALUES ('x', \
         (SELECT id FROM keyshift_uuid_public.p ORDER BY random() LIMIT 1), NULL)"
    );
    // A parent inserted by a CTE of the same statement is invisible to the trigger as to a
    // lookup: the lookup stays, with its fallback to the CTE.
    let out = each_execution(
        &r,
        "WITH n AS (INSERT INTO p (a) VALUES ('n') RETURNING id) INSERT INTO c (a, p_id) SELECT 'x', id FROM n",
    );
    assert!(out.contains("JOIN n AS _ks_c"), "{out}");
    // UPDATEs keep the lookup: the triggers recompute only the phase's truth side.
    let r = integer_views();
    assert_eq!(
        each_execution(&r, "UPDATE c SET p_id = 7 WHERE id = 1"),
        "UPDATE keyshift_integer_public.c SET p_id = 7, p_id_uuid = \
         (SELECT id_uuid FROM keyshift_integer_public.p WHERE id = (7)::bigint) WHERE id = 1"
    );
    // The physical shape reads the parent's table: its lookup stays.
    let physical = RuleSet::build(
        &plan(),
        Direction::Forward,
        ClientView::Physical,
        vec!["public".into()],
        1,
    )
    .unwrap();
    assert!(
        each_execution(&physical, "INSERT INTO c (a, p_id) VALUES ('x', 7)")
            .contains("(SELECT id_uuid FROM public.p WHERE id = (7)::bigint)")
    );
}

#[test]
fn a_translated_query_cache_plans_the_shapes_it_prepares_once() {
    let r = uuid_views();
    let cache = RewriteCache::new(16, 64 * 1024).planned(Planning::EachExecution);
    // INSERT … VALUES of literals runs as EXECUTE of a statement prepared from its shape:
    // planned once, so its template keeps the lookup.
    let values = "INSERT INTO c (a, p_id) VALUES ('x', 'b1e0c7a2-0000-4000-8000-000000000001')";
    for time in 0..2 {
        let (out, prepare) = cache.rewrite_query(&r, values);
        assert!(sql_of((*out).clone()).contains("SELECT id_legacy FROM keyshift_uuid_public.p"));
        // The first text runs as text; the shape is prepared from the second on.
        if time == 1 {
            let template = prepare.expect("a preparable shape").template;
            assert!(template.contains("WHERE id = ($2)::uuid"), "{template}");
        }
    }
    // INSERT … SELECT is planned at every execution: NULL, for the trigger.
    let select = "INSERT INTO c (a, p_id) SELECT 'x', id FROM p WHERE a = 'y'";
    for _ in 0..2 {
        let (out, prepare) = cache.rewrite_query(&r, select);
        assert!(prepare.is_none());
        assert_eq!(
            sql_of((*out).clone()),
            "INSERT INTO keyshift_uuid_public.c (a, p_id, p_id_legacy) SELECT 'x', id, NULL \
             FROM keyshift_uuid_public.p WHERE a = 'y'"
        );
    }
}

#[test]
fn translated_positional_insert_maps_the_integer_names_after_cutover() {
    let mut plan = plan();
    // After cutover the catalog shows the physical names.
    plan.columns[0].columns = [
        "id_legacy",
        "a",
        "p_id_legacy",
        "parent_id_legacy",
        "id",
        "p_id",
        "parent_id",
    ]
    .map(String::from)
    .to_vec();
    let r = RuleSet::build(
        &plan,
        Direction::Forward,
        ClientView::Translated(crate::shape::Shape::Integer),
        vec!["public".into()],
        5,
    )
    .unwrap();
    let out = sql_of(rewrite(&r, "INSERT INTO c VALUES (1, 'x', 2, NULL)"));
    assert!(
        out.starts_with("INSERT INTO keyshift_integer_public.c (id, a, p_id, parent_id, p_id_uuid, parent_id_uuid) VALUES (1, 'x', 2, NULL, "),
        "{out}"
    );
}

#[test]
fn translated_forms_views_cannot_run_are_refused_naming_the_table() {
    let r = uuid_views();
    for sql in [
        "MERGE INTO c USING other o ON c.id = o.id WHEN MATCHED THEN DELETE",
        "INSERT INTO p (id) VALUES ($1) ON CONFLICT ON CONSTRAINT p_pkey DO NOTHING",
        "SELECT ctid, id FROM p",
    ] {
        match rewrite(&r, sql) {
            Outcome::Skipped(s) => {
                assert!(
                    matches!(s[0].reason, SkipReason::ViewLimit(_)),
                    "{sql}: {s:?}"
                );
                assert!(s[0].table.starts_with("public."), "{sql}: {s:?}");
            }
            other => panic!("{sql}: {other:?}"),
        }
    }
    assert_eq!(
        sql_of(rewrite(&r, "COPY public.c TO STDOUT (FORMAT csv)")),
        "COPY (SELECT * FROM keyshift_uuid_public.c) TO STDOUT (FORMAT csv)"
    );
    // DDL and TRUNCATE name the tables as they are.
    assert_eq!(rewrite(&r, "TRUNCATE c"), Outcome::Unchanged);
    assert_eq!(rewrite(&r, "CREATE INDEX ON c (a)"), Outcome::Unchanged);
    // Unparseable SQL mentioning a migrated table is not run in the wrong shape.
    assert!(matches!(
        rewrite(&r, "SELECT FROM c WHERE ((("),
        Outcome::Skipped(_)
    ));
}

/// `rules` with the other direction: a translated session's column names follow its shape
/// alone, whichever way its dual-write runs.
fn other_direction(shape: crate::shape::Shape) -> RuleSet {
    let direction = match shape {
        crate::shape::Shape::Integer => Direction::Reverse,
        crate::shape::Shape::Uuid => Direction::Forward,
    };
    RuleSet::build(
        &plan(),
        direction,
        ClientView::Translated(shape),
        vec!["public".into()],
        6,
    )
    .unwrap()
}

#[test]
fn translated_sessions_know_each_renamed_columns_physical_name() {
    use crate::shape::Shape;
    // After cutover an integer session's `id` is the physical `id_legacy`, its `id_uuid` the
    // physical `id`.
    let integer = [
        ("public", "c", "id", "id_legacy"),
        ("public", "c", "id_uuid", "id"),
        ("public", "c", "p_id", "p_id_legacy"),
        ("public", "c", "p_id_uuid", "p_id"),
        ("public", "c", "parent_id", "parent_id_legacy"),
        ("public", "c", "parent_id_uuid", "parent_id"),
        ("public", "p", "id", "id_legacy"),
        ("public", "p", "id_uuid", "id"),
        ("app", "Accounts", "id", "id_legacy"),
        ("app", "Accounts", "id_uuid", "id"),
        ("app", "Orders", "AccountId", "AccountId_legacy"),
        ("app", "Orders", "AccountId_uuid", "AccountId"),
    ];
    // Before cutover a uuid session's names are those physical names after cutover, and the
    // physical names are the integer session's: the same pairs the other way round (its `id`
    // is the physical `id_uuid`, its `id_legacy` the physical `id`).
    for shape in Shape::ALL {
        let views = match shape {
            Shape::Integer => integer_views(),
            Shape::Uuid => uuid_views(),
        };
        for r in [views, other_direction(shape)] {
            for (schema, table, int_name, uuid_name) in integer {
                let (name, physical) = match shape {
                    Shape::Integer => (int_name, uuid_name),
                    Shape::Uuid => (uuid_name, int_name),
                };
                assert_eq!(
                    r.physical_column(schema, table, name),
                    Some(physical),
                    "{shape} {schema}.{table}.{name}"
                );
            }
            // A name of the other shape only is not the session's.
            let other_only = match shape {
                Shape::Integer => "id_legacy",
                Shape::Uuid => "id_uuid",
            };
            assert_eq!(r.physical_column("public", "c", other_only), None);
        }
    }
    for r in [integer_views(), uuid_views()] {
        // Columns keyshift does not rename, tables it does not migrate, case as stored.
        assert_eq!(r.physical_column("public", "c", "a"), None);
        assert_eq!(r.physical_column("app", "Orders", "id"), None);
        assert_eq!(r.physical_column("app", "Orders", "accountid"), None);
        assert_eq!(r.physical_column("public", "other", "id"), None);
    }
    // A physical session has none.
    assert_eq!(forward().physical_column("public", "c", "p_id"), None);
}

#[test]
fn translated_copy_from_writes_the_table_under_its_physical_column_names() {
    use crate::shape::Shape;
    // An integer session after cutover.
    for r in [integer_views(), other_direction(Shape::Integer)] {
        for (input, expected) in [
            (
                "COPY c (id, a, p_id, parent_id, id_uuid, p_id_uuid) FROM STDIN",
                "COPY c (id_legacy, a, p_id_legacy, parent_id_legacy, id, p_id) FROM STDIN",
            ),
            // Quoted names; the name PostgreSQL resolves is what decides.
            (
                r#"COPY "c" ("p_id", "a", "P_ID") FROM STDIN"#,
                r#"COPY "c" (p_id_legacy, "a", "P_ID") FROM STDIN"#,
            ),
            (
                "COPY public.c (P_Id /* the parent */, a) FROM STDIN (FORMAT csv)",
                "COPY public.c (p_id_legacy /* the parent */, a) FROM STDIN (FORMAT csv)",
            ),
            // Mixed case stays quoted; an unquoted name folds and is not the FK; `id` of a
            // table that is no parent is not renamed; FORCE_NULL / FORCE_NOT_NULL name
            // columns too.
            (
                r#"COPY "app"."Orders" (id, "AccountId", note) FROM STDIN (FORMAT csv, FORCE_NULL ("AccountId"), FORCE_NOT_NULL (note))"#,
                r#"COPY "app"."Orders" (id, "AccountId_legacy", note) FROM STDIN (FORMAT csv, FORCE_NULL ("AccountId_legacy"), FORCE_NOT_NULL (note))"#,
            ),
            // The pre-9.0 option syntax; no spaces around the list.
            (
                "COPY c(p_id)FROM STDIN WITH CSV FORCE NOT NULL p_id",
                "COPY c(p_id_legacy)FROM STDIN WITH CSV FORCE NOT NULL p_id_legacy",
            ),
        ] {
            let out = sql_of(rewrite(&r, input));
            assert_eq!(out, expected, "\ninput: {input}");
            assert_parses(&out);
        }
        assert_eq!(
            rewrite(&r, "COPY c (p_id) FROM STDIN"),
            Outcome::Rewritten {
                sql: "COPY c (p_id_legacy) FROM STDIN".into(),
                changes: vec![Change {
                    table: "c".into(),
                    kind: Kind::TranslatedWrite
                }],
                skipped: vec![],
            }
        );
        for same in [
            // Without a column list the table's columns, in order, are the view's.
            "COPY c FROM STDIN",
            "COPY public.p FROM STDIN (FORMAT binary)",
            // Nothing renamed: an unquoted mixed-case name folds.
            "COPY app.\"Orders\" (AccountId, note) FROM STDIN",
            "COPY c (a) FROM STDIN",
            // Not a migrated table.
            "COPY other (id, p_id) FROM STDIN",
            "COPY keyshift_integer_public.c (id) TO STDOUT",
        ] {
            assert_eq!(rewrite(&r, same), Outcome::Unchanged, "{same}");
        }
        // sqlparser does not parse COPY's WHERE, whose names would need renaming too: refused.
        assert_skipped(
            &r,
            "COPY c (p_id) FROM STDIN WHERE p_id > 1",
            "c",
            SkipReason::ParseError,
        );
    }
    // A uuid session before cutover.
    for r in [uuid_views(), other_direction(Shape::Uuid)] {
        let out = sql_of(rewrite(
            &r,
            "COPY c (id, p_id, parent_id, id_legacy, p_id_legacy, a) FROM STDIN",
        ));
        assert_eq!(
            out,
            "COPY c (id_uuid, p_id_uuid, parent_id_uuid, id, p_id, a) FROM STDIN"
        );
        assert_eq!(
            sql_of(rewrite(&r, r#"COPY app."Orders" ("AccountId") FROM STDIN"#)),
            r#"COPY app."Orders" ("AccountId_uuid") FROM STDIN"#
        );
    }
}

#[test]
fn translated_copy_from_resolves_names_as_the_session_does() {
    let r = integer_views();
    // Another search path, or a temporary table `c`: an unqualified `c` is not the migrated
    // table, a qualified one is.
    let path = ["other".to_string()];
    let temp = ["c".to_string()];
    for scoped in [r.with_scope(Some(&path), []), r.with_scope(None, &temp)] {
        assert_eq!(
            rewrite(&scoped, "COPY c (p_id) FROM STDIN"),
            Outcome::Unchanged
        );
        assert_eq!(
            sql_of(rewrite(&scoped, "COPY public.c (p_id) FROM STDIN")),
            "COPY public.c (p_id_legacy) FROM STDIN"
        );
    }
}

#[test]
fn translated_copy_to_with_columns_reads_the_view() {
    let r = integer_views();
    for (input, expected) in [
        (
            "COPY c (id, p_id) TO STDOUT (FORMAT csv)",
            "COPY (SELECT id, p_id FROM keyshift_integer_public.c) TO STDOUT (FORMAT csv)",
        ),
        (
            r#"COPY "app"."Orders" ( "AccountId" , note ) TO STDOUT"#,
            r#"COPY (SELECT "AccountId" , note FROM "keyshift_integer_app"."Orders") TO STDOUT"#,
        ),
        (
            "COPY public.c TO STDOUT",
            "COPY (SELECT * FROM keyshift_integer_public.c) TO STDOUT",
        ),
    ] {
        assert_rewrites(&r, input, expected);
    }
    assert_rewrites(
        &uuid_views(),
        "COPY p (id, id_legacy) TO STDOUT",
        "COPY (SELECT id, id_legacy FROM keyshift_uuid_public.p) TO STDOUT",
    );
    assert_eq!(rewrite(&r, "COPY other (id) TO STDOUT"), Outcome::Unchanged);
}

#[test]
fn translated_insert_select_points_both_tables_at_views() {
    let r = integer_views();
    let out = sql_of(rewrite(
        &r,
        "INSERT INTO c (p_id, a) SELECT id, $2::int FROM p WHERE a = $1",
    ));
    assert!(
        out.starts_with("INSERT INTO keyshift_integer_public.c (p_id, a, p_id_uuid)"),
        "{out}"
    );
    assert!(
        out.contains("FROM keyshift_integer_public.p WHERE a = $1"),
        "{out}"
    );
    // Planned at each execution, the twin is the trigger's; the forms wrapped as a derived
    // table get their NULL the same way.
    assert_eq!(
        each_execution(
            &r,
            "INSERT INTO c (p_id, a) SELECT id, 5 FROM p WHERE a = 'z'"
        ),
        "INSERT INTO keyshift_integer_public.c (p_id, a, p_id_uuid) SELECT id, 5, NULL \
         FROM keyshift_integer_public.p WHERE a = 'z'"
    );
    let out = each_execution(
        &r,
        "INSERT INTO c (p_id, a) SELECT id, a FROM p UNION ALL SELECT 3, 'y'",
    );
    assert_eq!(
        out,
        "INSERT INTO keyshift_integer_public.c (p_id, a, p_id_uuid) SELECT _ks.*, NULL FROM (\
         SELECT id, a FROM keyshift_integer_public.p UNION ALL SELECT 3, 'y') AS _ks(_ks1, _ks2)"
    );
}

#[test]
fn translated_copies_of_expressions_read_the_views_too() {
    let r = integer_views();
    let out = sql_of(rewrite(
        &r,
        "UPDATE c SET p_id = (SELECT id FROM p WHERE a = $1) WHERE a = $2",
    ));
    assert_eq!(
        out,
        "UPDATE keyshift_integer_public.c SET p_id = (SELECT id FROM keyshift_integer_public.p WHERE a = $1), \
         p_id_uuid = (SELECT _ks_p.id_uuid FROM (VALUES (((SELECT id FROM keyshift_integer_public.p WHERE a = $1))::bigint)) AS _ks_v(k) \
         JOIN keyshift_integer_public.p AS _ks_p ON _ks_p.id = _ks_v.k) WHERE a = $2"
    );
}

#[test]
fn a_missing_parent_fails_as_the_foreign_key_would() {
    let mut plan = plan();
    plan.fks[0].constraint = Some("c_p_id_fkey".into());
    // After cutover, an integer session: the uuid twin is NOT NULL now.
    let r = RuleSet::build(
        &plan,
        Direction::Forward,
        ClientView::Translated(crate::shape::Shape::Integer),
        vec!["public".into()],
        1,
    )
    .unwrap();
    assert_eq!(
        sql_of(rewrite(&r, "UPDATE c SET p_id = $1 WHERE a = 'x'")),
        "UPDATE keyshift_integer_public.c SET p_id = $1, p_id_uuid = COALESCE((SELECT id_uuid FROM keyshift_integer_public.p WHERE id = ($1)::bigint), \
         keyshift.missing_parent((($1)::bigint)::text, 'c', 'c_p_id_fkey', 'p_id', 'p')::uuid) WHERE a = 'x'"
    );
    assert_eq!(
        sql_of(rewrite(&r, "INSERT INTO c (a, p_id) VALUES ('x', $1)")),
        "INSERT INTO keyshift_integer_public.c (a, p_id, p_id_uuid) VALUES ('x', $1, COALESCE((SELECT id_uuid FROM keyshift_integer_public.p WHERE id = ($1)::bigint), \
         keyshift.missing_parent((($1)::bigint)::text, 'c', 'c_p_id_fkey', 'p_id', 'p')::uuid))"
    );
    // Planned at each execution, the insert leaves the twin to the fill trigger, which
    // raises the same error (src/migrate/fill.rs; tests/shapes_differential.rs).
    assert_eq!(
        each_execution(&r, "INSERT INTO c (a, p_id) SELECT 'x', 9"),
        "INSERT INTO keyshift_integer_public.c (a, p_id, p_id_uuid) SELECT 'x', 9, NULL"
    );
    // Before cutover the uuid twin may be NULL: PostgreSQL's own FK check decides.
    let r = RuleSet::build(
        &plan,
        Direction::Forward,
        ClientView::Physical,
        vec!["public".into()],
        1,
    )
    .unwrap();
    assert!(
        !sql_of(rewrite(&r, "INSERT INTO c (a, p_id) VALUES ('x', $1)")).contains("missing_parent")
    );
}
