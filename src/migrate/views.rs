//! keyshift's views per shape (DESIGN "Shapes"): for every table whose columns cutover renames
//! (each migrated table, each child of one), one auto-updatable view per shape, in schema
//! `keyshift_<shape>_<schema>`, named like the table.
//!
//! - `keyshift_integer_<schema>.<t>`: every column of `t`, in attnum order, under its name
//!   before cutover (`id`, `name`, `id_uuid`).
//! - `keyshift_uuid_<schema>.<t>`: the same columns in the same order, named as cutover names
//!   them (`id AS id_legacy`, `name`, `id_uuid AS id`).
//!
//! A view binds its columns by attnum, not by name: cutover's renames (and rollback's renames
//! back) leave both views returning the same names and types, which is what lets a session keep
//! one shape through the swap.
//!
//! The views are built by `keyshift.create_shape_view()`, created with the state schema, from
//! the live catalog at the moment expand runs: the column list, the defaults and the privileges
//! are the table's as they are then, not as they were when the plan was made. The SQL here
//! stays a pure function of the plan (what `plan --sql` prints is what runs); only the function
//! reads the catalog.

use std::collections::BTreeSet;

use super::ddl::{Mode, Step, When};
use super::plan::{Finding, Plan};
use crate::ident::{literal, quote};
use crate::shape::Shape;

/// PostgreSQL's identifier limit (NAMEDATALEN - 1): a longer name is silently truncated,
/// which for a view schema would make two schemas' views collide or miss.
const MAX_NAME: usize = 63;

/// The signature `DROP FUNCTION` needs.
const FUNCTION: &str = "keyshift.create_shape_view(text, text, text, text, jsonb)";

/// The text every schema and view comment starts with; the drops check it, so that keyshift
/// never drops a schema it did not create, even one that happens to have its name.
const OWNED: &str = "Owned by keyshift";

/// `keyshift.create_shape_view(table schema, table, shape, view schema, names)`: creates or
/// replaces the view of one table in one shape, in one transaction (a call is one statement),
/// so that a crash never leaves a view without its defaults, privileges or security_invoker.
///
/// `names` maps each column keyshift renames to its name in the view (identity for the integer
/// shape); every one must exist in the table, which proves the table is in the integer shape
/// (expand runs only before cutover) and that the uuid twins are there.
///
/// - `security_invoker` from PostgreSQL 15, in the CREATE itself: `CREATE OR REPLACE VIEW`
///   resets the view's options to those it names, so setting it afterwards would leave a
///   moment where a replaced view runs with its owner's rights.
/// - Defaults: an INSERT through the view that omits a column gets the table's default
///   anyway, but `UPDATE ... SET col = DEFAULT` gets the view's, NULL without one. Identity
///   and generated columns are skipped: they accept no explicit value, which is what the
///   view's default would supply.
/// - Privileges: the table's (its ACL, or the owner's defaults when it has none, as the
///   owner's own rights are in it) on the view to the same grantees, column privileges on the
///   view's column of the same position, and USAGE on the view schema to each of those
///   grantees: whoever may use the table may use its views, no one else. A replaced view's
///   grants are revoked first, so a privilege revoked on the table goes from the view too.
pub fn function_sql() -> String {
    format!(
        r#"CREATE OR REPLACE FUNCTION keyshift.create_shape_view(
    tbl_schema text, tbl_name text, shape text, view_schema text, names jsonb)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog AS $fn$
DECLARE
  rel oid := format('%I.%I', tbl_schema, tbl_name)::regclass;
  tbl text := format('%I.%I', tbl_schema, tbl_name);
  v text := format('%I.%I', view_schema, tbl_name);
  opts text := '';
  missing text;
  cols text;
  body text;
  r record;
BEGIN
  SELECT string_agg(k, ', ') INTO missing FROM jsonb_object_keys(names) k
   WHERE NOT EXISTS (SELECT 1 FROM pg_attribute a
                      WHERE a.attrelid = rel AND a.attname = k AND a.attnum > 0 AND NOT a.attisdropped);
  IF missing IS NOT NULL THEN
    RAISE EXCEPTION 'keyshift: % has no column %; its % view is made before cutover, after the uuid columns are added', tbl, missing, shape;
  END IF;
  IF EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = view_schema
              AND coalesce(obj_description(oid, 'pg_namespace'), '') NOT LIKE '{OWNED}%') THEN
    RAISE EXCEPTION 'keyshift: schema % exists and is not keyshift''s; keyshift needs that name for its % views of schema %: rename it', view_schema, shape, tbl_schema;
  END IF;
  IF current_setting('server_version_num')::int >= 150000 THEN
    opts := ' WITH (security_invoker = true)';
  END IF;
  EXECUTE format('CREATE SCHEMA IF NOT EXISTS %I', view_schema);
  EXECUTE format('COMMENT ON SCHEMA %I IS %L', view_schema, format(
    '{OWNED}: the %s shape of the migrated tables of schema %s, one view per table; dropped by keyshift finalize and abort', shape, tbl_schema));
  SELECT string_agg(CASE WHEN coalesce(names ->> a.attname, a.attname) = a.attname THEN format('%I', a.attname)
                         ELSE format('%I AS %I', a.attname, names ->> a.attname) END, ', ' ORDER BY a.attnum)
    INTO cols FROM pg_attribute a WHERE a.attrelid = rel AND a.attnum > 0 AND NOT a.attisdropped;
  body := format('VIEW %s%s AS SELECT %s FROM %s', v, opts, cols, tbl);
  BEGIN
    EXECUTE 'CREATE OR REPLACE ' || body;
  EXCEPTION WHEN invalid_table_definition THEN
    -- A column of the table was renamed, dropped or retyped since the view was made.
    EXECUTE 'DROP VIEW ' || v;
    EXECUTE 'CREATE ' || body;
  END;
  EXECUTE format('COMMENT ON VIEW %s IS %L', v, format(
    '{OWNED}: %s in the %s shape, columns by position, for sessions with keyshift.shape=%s; dropped by keyshift finalize and abort', tbl, shape, shape));
  FOR r IN SELECT coalesce(names ->> a.attname, a.attname) AS col,
                  CASE WHEN a.attidentity = '' AND a.attgenerated = '' THEN pg_get_expr(d.adbin, d.adrelid) END AS def
             FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
            WHERE a.attrelid = rel AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum LOOP
    IF r.def IS NULL THEN
      EXECUTE format('ALTER VIEW %s ALTER COLUMN %I DROP DEFAULT', v, r.col);
    ELSE
      EXECUTE format('ALTER VIEW %s ALTER COLUMN %I SET DEFAULT %s', v, r.col, r.def);
    END IF;
  END LOOP;
  FOR r IN SELECT DISTINCT x.grantee FROM pg_class c, aclexplode(c.relacl) x
            WHERE c.oid = v::regclass AND x.grantee <> c.relowner LOOP
    EXECUTE format('REVOKE ALL ON %s FROM %s', v,
      CASE WHEN r.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(r.grantee)) END);
  END LOOP;
  FOR r IN SELECT NULL::text AS col, x.grantee, x.privilege_type, x.is_grantable
             FROM pg_class c, aclexplode(coalesce(c.relacl, acldefault('r', c.relowner))) x WHERE c.oid = rel
           UNION ALL
           SELECT coalesce(names ->> a.attname, a.attname), x.grantee, x.privilege_type, x.is_grantable
             FROM pg_attribute a, aclexplode(a.attacl) x
            WHERE a.attrelid = rel AND a.attnum > 0 AND NOT a.attisdropped LOOP
    EXECUTE format('GRANT %s%s ON %s TO %s%s', r.privilege_type,
      CASE WHEN r.col IS NULL THEN '' ELSE format(' (%I)', r.col) END, v,
      CASE WHEN r.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(r.grantee)) END,
      CASE WHEN r.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END);
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO %s', view_schema,
      CASE WHEN r.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(r.grantee)) END);
  END LOOP;
END
$fn$"#
    )
}

/// The tables that get views: every migrated table and every child of one, each once, in plan
/// order (parents first, then children that are not migrated themselves).
pub fn relations(plan: &Plan) -> Vec<(&str, &str)> {
    let mut seen = BTreeSet::new();
    plan.tables
        .iter()
        .map(|t| (t.schema.as_str(), t.name.as_str()))
        .chain(
            plan.foreign_keys()
                .map(|(_, f)| (f.child_schema.as_str(), f.child_table.as_str())),
        )
        .filter(|r| seen.insert(*r))
        .collect()
}

/// The view schemas of the plan, each once, sorted.
pub fn schemas(plan: &Plan) -> BTreeSet<String> {
    relations(plan)
        .iter()
        .flat_map(|(s, _)| Shape::ALL.map(|shape| shape.view_schema(s)))
        .collect()
}

/// The columns of `schema.table` that cutover renames, each with its name in `shape`'s view:
/// in the uuid shape exactly the name cutover gives the physical column (`key → legacy_column`,
/// `uuid_column → key`, and likewise for each FK column and its twin); in the integer shape its
/// name before cutover.
pub fn names(plan: &Plan, schema: &str, table: &str, shape: Shape) -> Vec<(String, String)> {
    let mut v = Vec::new();
    let mut pair = |int: &str, uuid_twin: &str, legacy: &str| match shape {
        Shape::Integer => {
            v.push((int.to_string(), int.to_string()));
            v.push((uuid_twin.to_string(), uuid_twin.to_string()));
        }
        Shape::Uuid => {
            v.push((int.to_string(), legacy.to_string()));
            v.push((uuid_twin.to_string(), int.to_string()));
        }
    };
    if let Some(t) = plan.table(schema, table) {
        pair(&t.key, &t.uuid_column, &t.legacy_column);
    }
    for (_, f) in plan.foreign_keys() {
        if f.child_schema == schema && f.child_table == table {
            pair(&f.child_column, &f.uuid_column, &f.legacy_column);
        }
    }
    v
}

/// `names` as the JSON object the function takes, in `names` order (readable in `plan --sql`).
fn names_json(names: &[(String, String)]) -> String {
    let fields: Vec<String> = names
        .iter()
        .map(|(k, v)| {
            format!(
                "{}: {}",
                serde_json::Value::from(k.as_str()),
                serde_json::Value::from(v.as_str())
            )
        })
        .collect();
    format!("{{{}}}", fields.join(", "))
}

/// expand's last steps: one call per table and shape, once the uuid columns exist. Brief: a
/// view's creation takes ACCESS SHARE on its table, which conflicts only with ACCESS
/// EXCLUSIVE, but it must not queue behind one (an application's ALTER TABLE) while holding
/// the view's own ACCESS EXCLUSIVE; under `lock_timeout` with retry it gives way instead.
/// Skipped when the view exists: a call is atomic, so an existing view is a complete one.
pub fn create(plan: &Plan) -> Vec<Step> {
    let mut v = Vec::new();
    for (schema, table) in relations(plan) {
        for shape in Shape::ALL {
            let vs = shape.view_schema(schema);
            v.push(Step {
                sql: format!(
                    "SELECT keyshift.create_shape_view({}, {}, {}, {}, {}::jsonb)",
                    literal(schema),
                    literal(table),
                    literal(shape.as_str()),
                    literal(&vs),
                    literal(&names_json(&names(plan, schema, table, shape)))
                ),
                mode: Mode::Brief,
                when: When::RelationMissing {
                    name: format!("{}.{}", quote(&vs), quote(table)),
                },
            });
        }
    }
    v
}

/// Drops the view schemas (abort; finalize before the legacy columns, which the views read),
/// each only if keyshift made it: its comment says so.
pub fn drop(plan: &Plan) -> Vec<Step> {
    schemas(plan)
        .into_iter()
        .map(|s| Step {
            sql: format!(
                "DO $$ BEGIN
  IF (SELECT obj_description(oid, 'pg_namespace') FROM pg_namespace WHERE nspname = {lit}) LIKE '{OWNED}%' THEN
    DROP SCHEMA {q} CASCADE;
  END IF;
END $$",
                lit = literal(&s),
                q = quote(&s),
            ),
            // DROP VIEW takes ACCESS EXCLUSIVE on each view, which a translated session's open
            // transaction holds ACCESS SHARE on: give way to it and retry.
            mode: Mode::Brief,
            when: When::Always,
        })
        .collect()
}

/// finalize: the function goes with keyshift's state (the schema may stay, for uuid_v7).
pub fn drop_function() -> Step {
    super::ddl::drop_function(FUNCTION)
}

/// plan's blockers: view schemas whose name PostgreSQL would truncate.
pub fn blockers(plan: &Plan) -> Vec<Finding> {
    let mut seen = BTreeSet::new();
    relations(plan)
        .into_iter()
        .filter(|(s, _)| seen.insert(*s))
        .filter_map(|(s, _)| {
            let long = Shape::ALL
                .map(|shape| shape.view_schema(s))
                .into_iter()
                .find(|n| n.len() > MAX_NAME)?;
            Some(Finding {
                code: "view-schema-name-too-long".into(),
                object: format!("schema {}", quote(s)),
                problem: format!(
                    "keyshift's views of this schema's tables live in schema {long}, {} bytes, over PostgreSQL's {MAX_NAME}",
                    long.len()
                ),
                fix: "rename the schema (to at most 46 bytes), or exclude its tables (and the parents they reference)".into(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migrate::plan::{PlanOptions, build, tests::sample};

    #[test]
    fn uuid_names_are_cutovers_and_integer_names_are_todays() {
        let p = build(&sample(), &PlanOptions::default());
        // tools: a parent (its key), a child of servers and of itself.
        let pairs = |shape| names(&p, "public", "tools", shape);
        assert_eq!(
            pairs(Shape::Uuid),
            [
                ("id", "id_legacy"),
                ("id_uuid", "id"),
                ("server_id", "server_id_legacy"),
                ("server_id_uuid", "server_id"),
                ("parent_id", "parent_id_legacy"),
                ("parent_id_uuid", "parent_id"),
            ]
            .map(|(a, b)| (a.to_string(), b.to_string()))
        );
        assert!(pairs(Shape::Integer).iter().all(|(a, b)| a == b));
        assert_eq!(pairs(Shape::Integer).len(), 6);
    }

    #[test]
    fn every_table_once_and_its_two_schemas() {
        let p = build(&sample(), &PlanOptions::default());
        assert_eq!(
            relations(&p),
            [
                ("public", "connectors"),
                ("public", "servers"),
                ("public", "tools")
            ]
        );
        assert_eq!(
            schemas(&p).into_iter().collect::<Vec<_>>(),
            ["keyshift_integer_public", "keyshift_uuid_public"]
        );
        let c = create(&p);
        assert_eq!(c.len(), 6);
        assert_eq!(
            c[1].sql,
            r#"SELECT keyshift.create_shape_view('public', 'connectors', 'uuid', 'keyshift_uuid_public', '{"id": "id_legacy", "id_uuid": "id"}'::jsonb)"#
        );
        assert!(c.iter().all(|s| s.mode == Mode::Brief));
        assert!(
            drop(&p)[0]
                .sql
                .contains("DROP SCHEMA keyshift_integer_public CASCADE")
        );
    }

    #[test]
    fn made_after_the_columns_and_dropped_before_them() {
        use crate::migrate::ddl;
        let p = build(&sample(), &PlanOptions::default());
        let pos = |steps: &[Step], pat: &str| steps.iter().position(|s| s.sql.contains(pat));
        let e = ddl::expand(&p);
        assert!(
            pos(&e, "ADD COLUMN").unwrap() < pos(&e, "SELECT keyshift.create_shape_view").unwrap()
        );
        // After every column is added, before the fill triggers, which look parents up
        // through them (src/migrate/fill.rs); the application's views over them come last
        // (src/migrate/carry.rs).
        let last_view = e
            .iter()
            .rposition(|s| s.sql.starts_with("SELECT keyshift.create_shape_view"))
            .unwrap();
        assert!(
            e.iter()
                .rposition(|s| s.sql.contains("ADD COLUMN"))
                .unwrap()
                < last_view
        );
        assert!(last_view < pos(&e, "CREATE TRIGGER").unwrap());
        assert!(
            e.last()
                .unwrap()
                .sql
                .starts_with("SELECT keyshift.carry_copies")
        );
        for steps in [
            ddl::finalize(&p, false),
            ddl::finalize(&p, true),
            ddl::abort(&p),
        ] {
            let drop_views = pos(&steps, "DROP SCHEMA keyshift_uuid_public CASCADE").unwrap();
            assert!(drop_views < pos(&steps, "DROP COLUMN").unwrap());
        }
    }

    #[test]
    fn a_schema_too_long_for_its_view_schema_blocks() {
        let mut cat = sample();
        let long = "s".repeat(47);
        for t in &mut cat.tables {
            t.schema = long.clone();
        }
        for f in &mut cat.foreign_keys {
            f.child_schema = long.clone();
            f.parent_schema = long.clone();
        }
        let opts = PlanOptions {
            schemas: vec![long.clone()],
            ..Default::default()
        };
        let p = build(&cat, &opts);
        let b: Vec<_> = p
            .blockers
            .iter()
            .filter(|b| b.code == "view-schema-name-too-long")
            .collect();
        assert_eq!(b.len(), 1, "{:?}", p.blockers);
        assert!(b[0].object.contains(&long));
        // 46 bytes fit: keyshift_integer_ is 17.
        let fits = "s".repeat(46);
        assert_eq!(Shape::Integer.view_schema(&fits).len(), MAX_NAME);
    }
}
