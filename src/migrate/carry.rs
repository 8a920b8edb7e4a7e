//! What the application built over a migrated column, carried through the swap (issue
//! [schema]): views and the views over them, row-level security policies, triggers whose
//! `UPDATE OF` list or `WHEN` condition names the column, and rules.
//!
//! PostgreSQL binds all of these to a column by its number, so cutover's renames would leave
//! them on the integer column, `id_legacy` from then on: a view would keep returning integers
//! under the name `id`, a policy would keep checking the legacy value. Each is rebuilt from its
//! definition instead, inside the swap transaction (catalog-only, no scan):
//!
//! 1. `keyshift.carry_save(columns)`, before the renames: every such object's definition is
//!    deparsed (`pg_get_viewdef`, `pg_get_triggerdef`, `pg_get_ruledef`, `pg_get_expr`) with
//!    names resolved as they are then, under `search_path = pg_catalog` so that every name is
//!    schema-qualified; the statements that rebuild it (with its owner, grants, column grants,
//!    comments, options such as `security_barrier`, `security_invoker` and `check_option`,
//!    column defaults, enabled state) are kept in a temporary table, and the object is
//!    dropped, dependents first, without CASCADE: whatever else depends on it (a function
//!    returning the view's row type, say) stops the swap with PostgreSQL's own error rather
//!    than being dropped.
//! 2. The swap's renames: the uuid column takes the name.
//! 3. `keyshift.carry_restore()`: the same text run again now binds the name to the uuid
//!    column; views are created in dependency order, then rules, triggers and policies.
//!
//! Rollback runs the same two calls around its renames, which carries everything back to the
//! integer column: the columns renamed away are named alike in both directions (`key` and each
//! FK column).
//!
//! A definition that only works with integers (`WHERE id = 42`, `owner_id =
//! current_setting('app.user')::int`) cannot be rebuilt over uuids. `keyshift.carry_check()`
//! finds that before any pause: over temporary tables with exactly the columns (copied from
//! keyshift's views of the target shape, src/migrate/views.rs) and primary keys the tables
//! will have, it builds each view as a temporary view and evaluates each policy's
//! expressions; every failure is reported with what to do, and nothing is changed.
//!
//! Materialized views are not carried yet: rebuilding one inside the swap would make the pause
//! grow with its size. `plan` refuses them (docs/limitations.md).

use super::ddl::{Mode, Step, When};
use super::plan::Plan;
use crate::ident::literal;
use crate::shape::Shape;

/// The signatures `DROP FUNCTION` needs.
const FUNCTIONS: [&str; 4] = [
    "keyshift.carried_objects(jsonb)",
    "keyshift.carry_save(jsonb)",
    "keyshift.carry_restore()",
    "keyshift.carry_check(jsonb, jsonb)",
];

/// The functions (created before each swap, by a State step: they read the catalog when they
/// run; the SQL here stays a pure function of the plan).
pub fn function_sql() -> String {
    r#"CREATE OR REPLACE FUNCTION keyshift.carried_objects(cols jsonb)
RETURNS TABLE (depth int, kind text, objid oid, relid oid, label text)
LANGUAGE sql STABLE SET search_path = pg_catalog AS $ks$
WITH RECURSIVE renamed AS (
  SELECT a.attrelid, a.attnum
    FROM jsonb_array_elements(cols) c
    JOIN pg_attribute a ON a.attrelid = to_regclass(format('%I.%I', c->>0, c->>1))
                       AND a.attname = c->>2 AND a.attnum > 0 AND NOT a.attisdropped
),
owned AS (
  SELECT n.oid FROM pg_namespace n
   WHERE n.nspname = 'keyshift'
      OR coalesce(obj_description(n.oid, 'pg_namespace'), '') LIKE 'Owned by keyshift%'
),
views (oid, depth) AS (
  SELECT r.ev_class, 1
    FROM renamed x
    JOIN pg_depend d ON d.refclassid = 'pg_class'::regclass AND d.refobjid = x.attrelid
                    AND d.refobjsubid = x.attnum AND d.classid = 'pg_rewrite'::regclass
    JOIN pg_rewrite r ON r.oid = d.objid AND r.rulename = '_RETURN'
    JOIN pg_class c ON c.oid = r.ev_class
   WHERE c.relnamespace NOT IN (SELECT oid FROM owned)
  UNION ALL
  SELECT r.ev_class, v.depth + 1
    FROM views v
    JOIN pg_depend d ON d.refclassid = 'pg_class'::regclass AND d.refobjid = v.oid
                    AND d.classid = 'pg_rewrite'::regclass
    JOIN pg_rewrite r ON r.oid = d.objid AND r.rulename = '_RETURN' AND r.ev_class <> v.oid
    JOIN pg_class c ON c.oid = r.ev_class
   WHERE c.relnamespace NOT IN (SELECT oid FROM owned)
),
tree AS (SELECT oid, max(depth) AS depth FROM views GROUP BY oid),
deps AS (
  SELECT d.classid, d.objid FROM pg_depend d JOIN renamed x
      ON d.refclassid = 'pg_class'::regclass AND d.refobjid = x.attrelid AND d.refobjsubid = x.attnum
  UNION
  SELECT d.classid, d.objid FROM pg_depend d JOIN tree t
      ON d.refclassid = 'pg_class'::regclass AND d.refobjid = t.oid
)
SELECT t.depth, CASE c.relkind WHEN 'm' THEN 'materialized view' ELSE 'view' END,
       t.oid, t.oid, t.oid::regclass::text
  FROM tree t JOIN pg_class c ON c.oid = t.oid
UNION ALL
SELECT 0, 'rule', r.oid, r.ev_class, format('rule %I on %s', r.rulename, r.ev_class::regclass)
  FROM pg_rewrite r
 WHERE r.rulename <> '_RETURN' AND r.ev_class NOT IN (SELECT oid FROM tree)
   AND r.oid IN (SELECT objid FROM deps WHERE classid = 'pg_rewrite'::regclass)
UNION ALL
SELECT 0, 'trigger', g.oid, g.tgrelid, format('trigger %I on %s', g.tgname, g.tgrelid::regclass)
  FROM pg_trigger g
 WHERE NOT g.tgisinternal AND g.tgparentid = 0 AND g.tgname NOT LIKE 'zz\_keyshift\_fill\_%'
   AND g.tgrelid NOT IN (SELECT oid FROM tree)
   AND (g.oid IN (SELECT objid FROM deps WHERE classid = 'pg_trigger'::regclass)
        OR EXISTS (SELECT 1 FROM renamed x
                    WHERE x.attrelid = g.tgrelid AND x.attnum = ANY (g.tgattr::int2[])))
UNION ALL
SELECT 0, 'policy', p.oid, p.polrelid, format('policy %I on %s', p.polname, p.polrelid::regclass)
  FROM pg_policy p
 WHERE p.oid IN (SELECT objid FROM deps WHERE classid = 'pg_policy'::regclass)
$ks$;

CREATE OR REPLACE FUNCTION keyshift.carry_save(cols jsonb) RETURNS int
LANGUAGE plpgsql SET search_path = pg_catalog AS $ks$
DECLARE
  o record;
  r record;
  rel text;
  n int := 0;
  drops text[] := '{}';
  what text;
BEGIN
  CREATE TEMP TABLE IF NOT EXISTS keyshift_carried (ord serial, label text, sql text) ON COMMIT DROP;
  DELETE FROM pg_temp.keyshift_carried;
  -- Creation order: views from the bottom up, then what sits on tables and views.
  FOR o IN SELECT * FROM keyshift.carried_objects(cols)
            ORDER BY kind NOT IN ('view', 'materialized view'), depth,
                     array_position(ARRAY['rule', 'trigger', 'policy'], kind), label
  LOOP
    n := n + 1;
    IF o.kind = 'materialized view' THEN
      RAISE EXCEPTION 'keyshift: materialized view % depends on a migrated column; keyshift does not carry materialized views yet', o.label
        USING HINT = 'drop it before cutover and create it again after (docs/limitations.md)';
    ELSIF o.kind = 'view' THEN
      SELECT c.*, pg_get_viewdef(c.oid) AS def INTO r FROM pg_class c WHERE c.oid = o.objid;
      rel := o.objid::regclass::text;
      INSERT INTO pg_temp.keyshift_carried (label, sql) VALUES
        (o.label, format('CREATE VIEW %s%s AS %s', rel,
           CASE WHEN r.reloptions IS NOT NULL
                THEN format(' WITH (%s)', array_to_string(r.reloptions, ', ')) ELSE '' END,
           rtrim(r.def, '; ' || chr(10)))),
        (o.label, format('ALTER VIEW %s OWNER TO %I', rel, pg_get_userbyid(r.relowner)));
      IF r.relacl IS NOT NULL THEN
        INSERT INTO pg_temp.keyshift_carried (label, sql)
        SELECT o.label, format('REVOKE ALL ON %s FROM %I', rel, pg_get_userbyid(r.relowner))
        UNION ALL
        SELECT o.label, format('GRANT %s ON %s TO %s%s', a.privilege_type, rel,
                 CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(a.grantee)) END,
                 CASE WHEN a.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END)
          FROM aclexplode(r.relacl) a;
      END IF;
      INSERT INTO pg_temp.keyshift_carried (label, sql)
      SELECT o.label, format('GRANT %s (%I) ON %s TO %s%s', a.privilege_type, att.attname, rel,
               CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(a.grantee)) END,
               CASE WHEN a.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END)
        FROM pg_attribute att, aclexplode(att.attacl) a
       WHERE att.attrelid = o.objid AND att.attnum > 0
      UNION ALL
      SELECT o.label, format('ALTER VIEW %s ALTER COLUMN %I SET DEFAULT %s', rel, att.attname,
               pg_get_expr(ad.adbin, ad.adrelid))
        FROM pg_attrdef ad JOIN pg_attribute att ON att.attrelid = ad.adrelid AND att.attnum = ad.adnum
       WHERE ad.adrelid = o.objid
      UNION ALL
      SELECT o.label, format('COMMENT ON VIEW %s IS %L', rel, d)
        FROM obj_description(o.objid, 'pg_class') d WHERE d IS NOT NULL
      UNION ALL
      SELECT o.label, format('COMMENT ON COLUMN %s.%I IS %L', rel, att.attname,
               col_description(o.objid, att.attnum))
        FROM pg_attribute att
       WHERE att.attrelid = o.objid AND att.attnum > 0
         AND col_description(o.objid, att.attnum) IS NOT NULL
      UNION ALL
      -- INSTEAD OF triggers and rules of the view go with it.
      SELECT o.label, pg_get_triggerdef(g.oid) FROM pg_trigger g
       WHERE g.tgrelid = o.objid AND NOT g.tgisinternal
      UNION ALL
      SELECT o.label, rtrim(pg_get_ruledef(w.oid), ';') FROM pg_rewrite w
       WHERE w.ev_class = o.objid AND w.rulename <> '_RETURN';
      drops := drops || format('DROP VIEW %s', rel);
    ELSIF o.kind = 'rule' THEN
      SELECT w.rulename, w.ev_class::regclass::text AS tbl, pg_get_ruledef(w.oid) AS def,
             obj_description(w.oid, 'pg_rewrite') AS note
        INTO r FROM pg_rewrite w WHERE w.oid = o.objid;
      INSERT INTO pg_temp.keyshift_carried (label, sql) VALUES (o.label, rtrim(r.def, ';'));
      IF r.note IS NOT NULL THEN
        INSERT INTO pg_temp.keyshift_carried (label, sql)
        VALUES (o.label, format('COMMENT ON RULE %I ON %s IS %L', r.rulename, r.tbl, r.note));
      END IF;
      drops := drops || format('DROP RULE %I ON %s', r.rulename, r.tbl);
    ELSIF o.kind = 'trigger' THEN
      SELECT g.tgname, g.tgenabled, g.tgrelid::regclass::text AS tbl,
             pg_get_triggerdef(g.oid) AS def, obj_description(g.oid, 'pg_trigger') AS note
        INTO r FROM pg_trigger g WHERE g.oid = o.objid;
      INSERT INTO pg_temp.keyshift_carried (label, sql) VALUES (o.label, r.def);
      IF r.tgenabled <> 'O' THEN
        INSERT INTO pg_temp.keyshift_carried (label, sql)
        VALUES (o.label, format('ALTER TABLE %s %s TRIGGER %I', r.tbl,
          CASE r.tgenabled WHEN 'D' THEN 'DISABLE' WHEN 'R' THEN 'ENABLE REPLICA' ELSE 'ENABLE ALWAYS' END,
          r.tgname));
      END IF;
      IF r.note IS NOT NULL THEN
        INSERT INTO pg_temp.keyshift_carried (label, sql)
        VALUES (o.label, format('COMMENT ON TRIGGER %I ON %s IS %L', r.tgname, r.tbl, r.note));
      END IF;
      drops := drops || format('DROP TRIGGER %I ON %s', r.tgname, r.tbl);
    ELSE
      SELECT p.polname, p.polrelid::regclass::text AS tbl, p.polpermissive, p.polcmd,
             p.polroles, pg_get_expr(p.polqual, p.polrelid) AS qual,
             pg_get_expr(p.polwithcheck, p.polrelid) AS chk, obj_description(p.oid, 'pg_policy') AS note
        INTO r FROM pg_policy p WHERE p.oid = o.objid;
      INSERT INTO pg_temp.keyshift_carried (label, sql) VALUES
        (o.label, format('CREATE POLICY %I ON %s AS %s FOR %s TO %s%s%s', r.polname, r.tbl,
           CASE WHEN r.polpermissive THEN 'PERMISSIVE' ELSE 'RESTRICTIVE' END,
           CASE r.polcmd WHEN 'r' THEN 'SELECT' WHEN 'a' THEN 'INSERT' WHEN 'w' THEN 'UPDATE'
                         WHEN 'd' THEN 'DELETE' ELSE 'ALL' END,
           (SELECT string_agg(CASE WHEN x = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(x)) END, ', ')
              FROM unnest(r.polroles) x),
           ' USING (' || r.qual || ')', ' WITH CHECK (' || r.chk || ')'));
      IF r.note IS NOT NULL THEN
        INSERT INTO pg_temp.keyshift_carried (label, sql)
        VALUES (o.label, format('COMMENT ON POLICY %I ON %s IS %L', r.polname, r.tbl, r.note));
      END IF;
      drops := drops || format('DROP POLICY %I ON %s', r.polname, r.tbl);
    END IF;
  END LOOP;
  -- Dropped dependents first: policies, triggers and rules, then views from the top down.
  FOR i IN REVERSE coalesce(array_length(drops, 1), 0) .. 1 LOOP
    what := drops[i];
    EXECUTE what;
  END LOOP;
  RETURN n;
EXCEPTION WHEN dependent_objects_still_exist THEN
  RAISE EXCEPTION 'keyshift: the swap cannot rebuild what is built over the migrated columns: % (%)', SQLERRM, what
    USING HINT = 'drop the object named in the detail before cutover and create it again after';
END $ks$;

CREATE OR REPLACE FUNCTION keyshift.carry_restore() RETURNS int
LANGUAGE plpgsql SET search_path = pg_catalog AS $ks$
DECLARE
  s record;
  n int := 0;
BEGIN
  IF to_regclass('pg_temp.keyshift_carried') IS NULL THEN
    RETURN 0;
  END IF;
  FOR s IN SELECT label, sql FROM pg_temp.keyshift_carried ORDER BY ord LOOP
    BEGIN
      EXECUTE s.sql;
    EXCEPTION WHEN OTHERS THEN
      RAISE EXCEPTION 'keyshift: could not rebuild % over the renamed columns: %', s.label, SQLERRM
        USING DETAIL = s.sql,
              HINT = 'nothing was changed (the swap rolled back); run keyshift cutover again after changing or dropping it';
    END;
    n := n + 1;
  END LOOP;
  DELETE FROM pg_temp.keyshift_carried;
  RETURN n;
END $ks$;

CREATE OR REPLACE FUNCTION keyshift.carry_check(cols jsonb, rels jsonb) RETURNS int
LANGUAGE plpgsql SET search_path = pg_catalog AS $ks$
DECLARE
  o record;
  r record;
  deparse_path text;
  check_path text;
  body text;
  problems text := '';
  n int := 0;
BEGIN
  -- Definitions are deparsed with the migrated tables' schemas in the path, so that a table
  -- is named without its schema, and run with pg_temp first, where a temporary table of the
  -- same name has the columns the swap gives the table (copied from keyshift's view of the
  -- target shape) and its primary key (a view grouping by the key relies on it).
  SELECT string_agg(DISTINCT quote_ident(x->>0), ', ') INTO deparse_path
    FROM jsonb_array_elements(rels) x;
  check_path := 'pg_temp, ' || deparse_path;
  BEGIN
    FOR r IN SELECT x->>0 AS sch, x->>1 AS tbl, x->>2 AS vs, x->>3 AS pk
               FROM jsonb_array_elements(rels) x LOOP
      IF to_regclass(format('pg_temp.%I', r.tbl)) IS NULL THEN
        EXECUTE format('CREATE TEMP TABLE %I (LIKE %I.%I)', r.tbl, r.vs, r.tbl);
        IF r.pk IS NOT NULL THEN
          EXECUTE format('ALTER TABLE pg_temp.%I ADD PRIMARY KEY (%I)', r.tbl, r.pk);
        END IF;
      END IF;
    END LOOP;
    FOR o IN SELECT * FROM keyshift.carried_objects(cols)
              WHERE kind IN ('view', 'materialized view', 'policy') ORDER BY kind, depth, label
    LOOP
      n := n + 1;
      IF o.kind = 'materialized view' THEN
        problems := problems || format(E'\n  materialized view %s: keyshift does not carry materialized views yet', o.label);
        CONTINUE;
      END IF;
      PERFORM set_config('search_path', deparse_path, true);
      IF o.kind = 'policy' THEN
        SELECT pg_get_expr(p.polqual, p.polrelid) AS qual, pg_get_expr(p.polwithcheck, p.polrelid) AS chk,
               c.relname, p.polrelid::regclass::text AS tbl
          INTO r FROM pg_policy p JOIN pg_class c ON c.oid = p.polrelid WHERE p.oid = o.objid;
        body := format('SELECT 1 FROM %s WHERE (%s) AND (%s) LIMIT 0',
                        r.tbl, coalesce(r.qual, 'true'), coalesce(r.chk, 'true'));
      ELSE
        SELECT c.relname, pg_get_viewdef(c.oid) AS def INTO r FROM pg_class c WHERE c.oid = o.objid;
        body := format('CREATE TEMP VIEW %I AS %s', r.relname, rtrim(r.def, '; ' || chr(10)));
      END IF;
      PERFORM set_config('search_path', check_path, true);
      BEGIN
        EXECUTE body;
      EXCEPTION WHEN OTHERS THEN
        problems := problems || format(E'\n  %s: %s', o.label, SQLERRM);
      END;
    END LOOP;
    -- Nothing of the check stays.
    RAISE EXCEPTION USING ERRCODE = 'KSCHK';
  EXCEPTION WHEN SQLSTATE 'KSCHK' THEN
    NULL;
  END;
  IF problems <> '' THEN
    RAISE EXCEPTION 'keyshift: these would not work over the columns the swap gives them, so it would fail:%', problems
      USING HINT = 'change each so that it works with either key type (compare keys with keys, not with integer constants or casts), or drop it now and create it again after; nothing was changed';
  END IF;
  RETURN n;
END $ks$"#
        .to_string()
}

/// The columns each swap renames away, as the functions take them: every migrated key and
/// every FK column, named as they are before either swap (the same names both ways).
fn columns_json(plan: &Plan) -> String {
    let mut cols: Vec<serde_json::Value> = plan
        .tables
        .iter()
        .map(|t| serde_json::json!([t.schema, t.name, t.key]))
        .collect();
    cols.extend(
        plan.foreign_keys()
            .map(|(_, f)| serde_json::json!([f.child_schema, f.child_table, f.child_column])),
    );
    serde_json::Value::Array(cols).to_string()
}

/// Before the pause: the functions, then the check against tables shaped like `target`'s
/// views (each relation with the schema of that view, and its key when it is a migrated one).
pub fn prepare(plan: &Plan, target: Shape) -> Vec<Step> {
    let rels: Vec<serde_json::Value> = super::views::relations(plan)
        .iter()
        .map(|(s, t)| {
            let key = plan.table(s, t).map(|t| t.key.as_str());
            serde_json::json!([s, t, target.view_schema(s), key])
        })
        .collect();
    vec![
        Step {
            sql: function_sql(),
            mode: Mode::State,
            when: When::Always,
        },
        Step {
            sql: format!(
                "SELECT keyshift.carry_check({}::jsonb, {}::jsonb)",
                literal(&columns_json(plan)),
                literal(&serde_json::Value::Array(rels).to_string())
            ),
            mode: Mode::Online,
            when: When::Always,
        },
    ]
}

/// Inside the swap, before the renames.
pub fn save(plan: &Plan) -> String {
    format!(
        "SELECT keyshift.carry_save({}::jsonb)",
        literal(&columns_json(plan))
    )
}

/// Inside the swap, after the renames.
pub fn restore() -> String {
    "SELECT keyshift.carry_restore()".into()
}

/// finalize: the functions go with keyshift's state.
pub fn drop_functions() -> Vec<Step> {
    FUNCTIONS
        .iter()
        .map(|f| super::ddl::drop_function(f))
        .collect()
}
