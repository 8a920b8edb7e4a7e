//! What the application built over a migrated column, carried through the swap (issue
//! [schema]): views and the views over them, row-level security policies, triggers whose
//! `UPDATE OF` list or `WHEN` condition names the column, and rules.
//!
//! PostgreSQL binds all of these to a column by its number, so cutover's renames would leave
//! them on the integer column, `id_legacy` from then on: a view would keep returning integers
//! under the name `id`, a policy would keep checking the legacy value. Each is rebuilt from its
//! definition instead, inside the swap transaction (catalog-only, no scan):
//!
//! 0. `keyshift.carry_prepare(columns)`, before the pause, on the connection that will run the
//!    swap: every such object's definition is deparsed (`pg_get_viewdef`, `pg_get_triggerdef`,
//!    `pg_get_ruledef`, `pg_get_expr`) with names resolved as they are then, under
//!    `search_path = pg_catalog` so that every name is schema-qualified; the statements that
//!    rebuild it (with its owner, grants, column grants, comments, options such as
//!    `security_barrier`, `security_invoker` and `check_option`, column defaults, enabled
//!    state) and drop it are kept in a temporary table, with a fingerprint of the catalog rows
//!    they were read from (`keyshift.carry_fingerprint`: their `xmin`s).
//! 1. `keyshift.carry_save(columns)`, in the swap before the renames: if the fingerprint
//!    changed (the application altered something in between), deparsed again; then each
//!    object is dropped, dependents first, without CASCADE: whatever else depends on it (a
//!    function returning the view's row type, say) stops the swap with PostgreSQL's own error
//!    rather than being dropped.
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
//! A materialized view cannot be rebuilt inside the swap without the pause growing with its
//! size. So before the pause `keyshift.carry_shadows()` builds and fills a shadow of it over
//! keyshift's views of the target shape (which have the columns the swap will give the
//! tables), with its indexes, grants and comments, and the swap drops the original and moves
//! the shadow into its place (catalog-only). The shadow reads keyshift's views; finalize and
//! abort, before dropping those views, rebuild it over the tables the same way
//! (`keyshift.carry_rebase()`). Only materialized views that read the tables themselves are
//! carried (one over a view over a migrated column is refused by cutover's preparation).

use super::ddl::{Mode, Step, When};
use super::plan::Plan;
use crate::ident::literal;
use crate::shape::Shape;

/// The signatures `DROP FUNCTION` needs.
const FUNCTIONS: [&str; 20] = [
    "keyshift.carry_current(jsonb, text)",
    "keyshift.carry_finish(text)",
    "keyshift.carry_left_alone()",
    "keyshift.carry_unblock(jsonb)",
    "keyshift.carry_keep(jsonb, text)",
    "keyshift.carry_stamp(text, oid)",
    "keyshift.carried_objects(jsonb)",
    "keyshift.carry_try(text, text[])",
    "keyshift.suffixed(text, text)",
    "keyshift.carry_validate(text)",
    "keyshift.carry_copies(jsonb, jsonb)",
    "keyshift.rel_props(oid, text)",
    "keyshift.carry_shadows(jsonb, jsonb, text)",
    "keyshift.shape_path(jsonb, text, text)",
    "keyshift.carry_save(jsonb, text)",
    "keyshift.carry_prepare(jsonb, text)",
    "keyshift.carry_fingerprint(jsonb, text)",
    "keyshift.carry_restore()",
    "keyshift.carry_check(jsonb, jsonb)",
    "keyshift.carry_rebase(jsonb)",
];

/// The schema of the materialized views built before a swap.
const SHADOW_SCHEMA: &str = "keyshift_shadow";

/// The functions (created before each swap, by a State step: they read the catalog when they
/// run; the SQL here stays a pure function of the plan).
pub fn function_sql() -> String {
    r#"-- PL/pgSQL rather than SQL so that the session keeps its plan: the swap's call follows the
-- preparation's on the same connection, and planning this query took 4-10 ms of each call.
-- A generic plan: `cols` changes nothing to the plan's shape. No JIT: with a generic plan's
-- estimates, the fingerprint's query cost enough to be compiled (50-90 ms, to run 3 ms).
-- Index lookups rather than hash joins: a generic plan cannot know how few rows each step
-- has, and hashed all of pg_depend several times (1.27 ms a call here, 0.9 ms without; the
-- difference grows with the schema).
CREATE OR REPLACE FUNCTION keyshift.carried_objects(cols jsonb)
RETURNS TABLE (depth int, kind text, objid oid, relid oid, label text)
LANGUAGE plpgsql STABLE SET search_path = pg_catalog SET plan_cache_mode = force_generic_plan SET jit = off
  SET enable_hashjoin = off SET enable_mergejoin = off SET enable_bitmapscan = off AS $ks$
#variable_conflict use_column
BEGIN
RETURN QUERY
WITH RECURSIVE renamed AS (
  -- Index lookups by name (to_regclass(format(...)) cost 0.1 ms a column, a join on the
  -- computed oid scanned pg_attribute).
  SELECT a.attrelid, a.attnum
    FROM jsonb_array_elements(cols) c,
         LATERAL (SELECT a.attrelid, a.attnum
                    FROM pg_namespace n
                    JOIN pg_class r ON r.relnamespace = n.oid AND r.relname = c->>1
                    JOIN pg_attribute a ON a.attrelid = r.oid AND a.attname = c->>2
                   WHERE n.nspname = c->>0 AND a.attnum > 0 AND NOT a.attisdropped) a
),
-- pg_description read directly: obj_description plans a query at each call (1 ms here).
owned AS (
  SELECT n.oid FROM pg_namespace n
   WHERE n.nspname = 'keyshift'
      OR EXISTS (SELECT 1 FROM pg_description d
                  WHERE d.objoid = n.oid AND d.classoid = 'pg_namespace'::regclass AND d.objsubid = 0
                    AND d.description LIKE 'Owned by keyshift%')
),
-- The views over a renamed column, and the materialized views a swap left over keyshift's
-- views of a shape (see keyshift.carry_shadows).
seeds AS (
  SELECT r.ev_class AS oid
    FROM renamed x
    JOIN pg_depend d ON d.refclassid = 'pg_class'::regclass AND d.refobjid = x.attrelid
                    AND d.refobjsubid = x.attnum AND d.classid = 'pg_rewrite'::regclass
    JOIN pg_rewrite r ON r.oid = d.objid AND r.rulename = '_RETURN'
  UNION
  -- From the (few) materialized views, not from pg_depend: keyshift's views of each shape
  -- have thousands of dependencies at 300 tables (9 ms of a swap's pause).
  SELECT c.oid
    FROM pg_class c
    JOIN pg_rewrite r ON r.ev_class = c.oid AND r.rulename = '_RETURN'
   WHERE c.relkind = 'm'
     AND EXISTS (SELECT 1 FROM pg_depend d
                   JOIN pg_class src ON src.oid = d.refobjid
                   JOIN pg_namespace sn ON sn.oid = src.relnamespace
                  WHERE d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid
                    AND d.refclassid = 'pg_class'::regclass
                    AND sn.oid IN (SELECT oid FROM owned) AND sn.nspname LIKE 'keyshift\_%')
),
views (oid, depth) AS (
  SELECT s.oid, 1 FROM seeds s JOIN pg_class c ON c.oid = s.oid
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
UNION ALL
-- The application's CHECK constraints (not keyshift's NOT NULL proofs; on a partitioned
-- table, the parent's, which its partitions inherit).
SELECT 0, 'check', con.oid, con.conrelid, format('check constraint %I on %s', con.conname, con.conrelid::regclass)
  FROM pg_constraint con
 WHERE con.contype = 'c' AND con.coninhcount = 0
   AND con.oid IN (SELECT objid FROM deps WHERE classid = 'pg_constraint'::regclass)
   AND NOT (con.conname LIKE '%\_not\_null' AND pg_get_constraintdef(con.oid) ~ '^CHECK \(\(\S+ IS NOT NULL\)\)$')
UNION ALL
SELECT 0, 'statistics', x.oid, x.stxrelid, format('statistics %I.%I', x.stxnamespace::regnamespace, x.stxname)
  FROM pg_statistic_ext x
 WHERE x.oid IN (SELECT objid FROM deps WHERE classid = 'pg_statistic_ext'::regclass);
END $ks$;

-- Runs `stmts` in a subtransaction; if one fails, none has happened and a NOTICE says why
-- `what` stays on the integer column. For what the swap moves by renaming the original
-- aside and creating it again (CHECK constraints, extended statistics), which a definition
-- that only works with integers must not stop.
CREATE OR REPLACE FUNCTION keyshift.carry_try(what text, stmts text[]) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog AS $ks$
DECLARE
  s text;
BEGIN
  FOREACH s IN ARRAY stmts LOOP
    EXECUTE s;
  END LOOP;
EXCEPTION WHEN OTHERS THEN
  RAISE NOTICE 'keyshift: % stays on the integer column: %', what, SQLERRM;
END $ks$;

-- `name` with `suffix`, cut to PostgreSQL's 63 bytes.
CREATE OR REPLACE FUNCTION keyshift.suffixed(name text, suffix text) RETURNS text
LANGUAGE sql IMMUTABLE AS $ks$
SELECT CASE WHEN octet_length(name || suffix) <= 63 THEN name || suffix
            ELSE left(name, 63 - octet_length(suffix)) || suffix END
$ks$;

-- The statements that give `dst` the owner, grants (table and column level) and comments of
-- the view or materialized view `src`. A grant is recorded as made by the owner.
CREATE OR REPLACE FUNCTION keyshift.rel_props(src oid, dst text) RETURNS SETOF text
LANGUAGE sql STABLE SET search_path = pg_catalog AS $ks$
WITH rel AS (
  SELECT c.*, CASE c.relkind WHEN 'm' THEN 'MATERIALIZED VIEW' ELSE 'VIEW' END AS kind,
         -- The owner's entry is the one the first GRANT on a new relation writes (all
         -- privileges, first, no other entry for the owner): the GRANTs to the others give it
         -- back, so neither the REVOKE from the owner nor its GRANT is needed (2 statements
         -- of 0.1 ms each in the pause, for each view granted to someone).
         coalesce(cardinality(c.relacl) > 1 AND c.relacl[1] = (acldefault('r', c.relowner))[1]
                  AND (SELECT count(*) FROM aclexplode(c.relacl) a WHERE a.grantee = c.relowner)
                    = (SELECT count(*) FROM aclexplode(acldefault('r', c.relowner))), false) AS owner_default
    FROM pg_class c WHERE c.oid = src
)
-- The role that runs this (and then the swap) owns what it creates.
SELECT format('ALTER %s %s OWNER TO %I', kind, dst, pg_get_userbyid(relowner)) FROM rel
 WHERE pg_get_userbyid(relowner) <> current_user
UNION ALL
SELECT format('REVOKE ALL ON %s FROM %I', dst, pg_get_userbyid(relowner)) FROM rel
 WHERE relacl IS NOT NULL AND NOT owner_default
UNION ALL
-- One GRANT per grantee (all its privileges, all its columns): each statement run inside the
-- swap costs about 60 us, and one per privilege and column made 83 of them for 20 views.
-- In the order of the original's list, which the new one then has.
(SELECT format('GRANT %s ON %s TO %s%s', string_agg(a.privilege_type, ', ' ORDER BY a.privilege_type), dst,
          CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(a.grantee)) END,
          CASE WHEN a.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END)
   FROM rel, aclexplode(rel.relacl) WITH ORDINALITY a(grantor, grantee, privilege_type, is_grantable, ord)
  WHERE NOT (rel.owner_default AND a.grantee = rel.relowner)
  GROUP BY a.grantee, a.is_grantable
  ORDER BY min(a.ord))
UNION ALL
(SELECT format('GRANT %s ON %s TO %s%s', string_agg(format('%s (%s)', p.privilege_type, p.cols), ', ' ORDER BY p.privilege_type), dst,
          CASE WHEN p.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(p.grantee)) END,
          CASE WHEN p.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END)
   FROM (SELECT a.grantee, a.is_grantable, a.privilege_type,
                string_agg(quote_ident(att.attname), ', ' ORDER BY att.attnum) AS cols,
                min(att.attnum * 1000 + a.ord) AS ord
           FROM pg_attribute att, aclexplode(att.attacl) WITH ORDINALITY a(grantor, grantee, privilege_type, is_grantable, ord)
          WHERE att.attrelid = src AND att.attnum > 0
          GROUP BY a.grantee, a.is_grantable, a.privilege_type) p
  GROUP BY p.grantee, p.is_grantable
  ORDER BY min(p.ord))
UNION ALL
SELECT format('COMMENT ON %s %s IS %L', kind, dst, obj_description(src, 'pg_class')) FROM rel
 WHERE obj_description(src, 'pg_class') IS NOT NULL
UNION ALL
SELECT format('COMMENT ON COLUMN %s.%I IS %L', dst, att.attname, col_description(src, att.attnum))
  FROM pg_attribute att
 WHERE att.attrelid = src AND att.attnum > 0 AND col_description(src, att.attnum) IS NOT NULL
$ks$;

-- Before a swap (online): for every materialized view over a renamed column, a shadow
-- `keyshift_shadow.mv_<oid>` built and filled over keyshift's views of the `target` shape
-- (`uuid`, `integer`), whose columns are named and typed as the swap will leave the tables,
-- with the original's indexes, owner, grants and comments. The swap moves it into place
-- (keyshift.carry_save): the pause does not grow with its size. Its data is that of the
-- moment it was built, as after a REFRESH then. With `target` = `table`: a shadow over the
-- tables themselves for each materialized view a swap left over keyshift's views, which
-- finalize and abort move into place before they drop those views.
CREATE OR REPLACE FUNCTION keyshift.carry_shadows(cols jsonb, rels jsonb, target text) RETURNS int
LANGUAGE plpgsql SET search_path = pg_catalog AS $ks$
DECLARE
  o record;
  r record;
  stmt text;
  source text;
  app_path text;
  shadow text;
  n int := 0;
BEGIN
  SELECT string_agg(DISTINCT quote_ident(x->>0), ', ') INTO app_path FROM jsonb_array_elements(rels) x;
  FOR o IN SELECT * FROM keyshift.carried_objects(cols) WHERE kind = 'materialized view' ORDER BY depth, label LOOP
    IF NOT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'keyshift_shadow') THEN
      CREATE SCHEMA keyshift_shadow;
      COMMENT ON SCHEMA keyshift_shadow IS 'Owned by keyshift: materialized views built before a swap, moved into place by it';
    END IF;
    IF o.depth > 1 THEN
      RAISE EXCEPTION 'keyshift: materialized view % is built over a view over a migrated column; keyshift carries only materialized views that read the tables themselves', o.label
        USING HINT = 'drop it before cutover and create it again after; nothing was changed';
    END IF;
    SELECT c.relname, c.relnamespace::regnamespace::text AS nsp, c.reloptions, c.relispopulated
      INTO r FROM pg_class c WHERE c.oid = o.objid;
    shadow := 'mv_' || o.objid;
    -- Which shape's views it reads now, if any: named without their schema when deparsed with
    -- that shape's view schemas first, then found in the target's.
    SELECT substring(n.nspname from '^keyshift_([a-z]+)_') INTO source
      FROM pg_depend d JOIN pg_rewrite w ON w.oid = d.objid AND w.ev_class = o.objid
      JOIN pg_class s ON s.oid = d.refobjid JOIN pg_namespace n ON n.oid = s.relnamespace
     WHERE d.classid = 'pg_rewrite'::regclass AND n.nspname ~ '^keyshift_(uuid|integer)_'
     LIMIT 1;
    PERFORM set_config('search_path', keyshift.shape_path(rels, source, app_path), true);
    stmt := rtrim(pg_get_viewdef(o.objid), '; ' || chr(10));
    PERFORM set_config('search_path', keyshift.shape_path(rels, nullif(target, 'table'), app_path), true);
    EXECUTE format('DROP MATERIALIZED VIEW IF EXISTS keyshift_shadow.%I', shadow);
    -- Autovacuum off until the swap moves it in (keyshift.carry_prepare gives the original's
    -- setting back there): a freshly filled shadow is what autovacuum visits first, and its
    -- lock, which PostgreSQL gives up only for a lock that waited deadlock_timeout (1 s),
    -- made the swap's move fail its 500 ms lock_timeout (`keyshift cutover --dry-run` right
    -- after a preparation, with 1 M rows in a shadow).
    BEGIN
      EXECUTE format('CREATE MATERIALIZED VIEW keyshift_shadow.%I WITH (%s) AS %s WITH %s', shadow,
        array_to_string(ARRAY(SELECT x FROM unnest(r.reloptions) x WHERE x NOT LIKE 'autovacuum\_enabled=%')
                        || 'autovacuum_enabled=false'::text, ', '),
        stmt, CASE WHEN r.relispopulated THEN 'DATA' ELSE 'NO DATA' END);
    EXCEPTION WHEN OTHERS THEN
      RAISE EXCEPTION 'keyshift: materialized view % would not work over the columns the swap gives it: %', o.label, SQLERRM
        USING HINT = 'change it so that it works with either key type, or drop it now and create it again after; nothing was changed';
    END;
    PERFORM set_config('search_path', 'pg_catalog', true);
    FOR stmt IN
      SELECT replace(pg_get_indexdef(i.indexrelid), format(' ON %s USING ', o.objid::regclass),
                     format(' ON keyshift_shadow.%I USING ', shadow))
        FROM pg_index i WHERE i.indrelid = o.objid
      UNION ALL
      SELECT keyshift.rel_props(o.objid, format('keyshift_shadow.%I', shadow))
    LOOP
      EXECUTE stmt;
    END LOOP;
    n := n + 1;
  END LOOP;
  RETURN n;
END $ks$;

-- A search_path that finds `shape`'s views first in each schema of `rels` (just the schemas
-- when `shape` is NULL).
CREATE OR REPLACE FUNCTION keyshift.shape_path(rels jsonb, shape text, app_path text) RETURNS text
LANGUAGE sql IMMUTABLE AS $ks$
SELECT CASE WHEN shape IS NULL THEN app_path ELSE
  (SELECT string_agg(DISTINCT quote_ident(format('keyshift_%s_%s', shape, x->>0)) || ', ' || quote_ident(x->>0), ', ')
     FROM jsonb_array_elements(rels) x) END
$ks$;

CREATE OR REPLACE FUNCTION keyshift.carry_prepare(cols jsonb, suffix text DEFAULT '_legacy') RETURNS int
LANGUAGE plpgsql SET search_path = pg_catalog AS $ks$
DECLARE
  o record;
  r record;
  rel text;
  aside text;
  n int := 0;
  drops text[] := '{}';
  merged text[] := '{}';
  drop_kind text;
  last_drop_kind text;
  fingerprint text;
  dropped int;
BEGIN
  IF to_regclass('pg_temp.keyshift_carried') IS NULL THEN
    -- The session's: the swap runs on the connection that prepared it. `step`: `build` (run
    -- by keyshift.carry_restore, in `ord` order), `drop` (run by keyshift.carry_save, last
    -- first), `fingerprint` (label: how many objects). Before anything is planned: the
    -- session's first temporary table changes its search path, which invalidates every plan
    -- it cached (the fingerprint's would be made again inside the swap).
    CREATE TEMP TABLE keyshift_carried (ord serial, step text NOT NULL DEFAULT 'build', label text, sql text);
  END IF;
  -- Before the definitions are read, so that whatever changes meanwhile changes it too.
  fingerprint := keyshift.carry_fingerprint(cols, suffix);
  DELETE FROM pg_temp.keyshift_carried;
  -- Creation order: views from the bottom up, then what sits on tables and views.
  FOR o IN SELECT * FROM keyshift.carried_objects(cols)
            ORDER BY kind NOT IN ('view', 'materialized view'), depth,
                     array_position(ARRAY['rule', 'trigger', 'policy', 'check', 'statistics'], kind), label
  LOOP
    n := n + 1;
    dropped := coalesce(array_length(drops, 1), 0);
    IF o.kind = 'materialized view' THEN
      SELECT c.relname, c.relnamespace::regnamespace::text AS nsp,
             (SELECT x FROM unnest(c.reloptions) x WHERE x LIKE 'autovacuum\_enabled=%') AS autovacuum
        INTO r FROM pg_class c WHERE c.oid = o.objid;
      IF to_regclass(format('keyshift_shadow.%I', 'mv_' || o.objid)) IS NULL THEN
        RAISE EXCEPTION 'keyshift: materialized view % has no shadow to move into its place', o.label
          USING HINT = 'it was created after the preparation of this swap: run the command again';
      END IF;
      INSERT INTO pg_temp.keyshift_carried (label, sql) VALUES
        (o.label, format('ALTER MATERIALIZED VIEW keyshift_shadow.%I SET SCHEMA %s', 'mv_' || o.objid, r.nsp)),
        (o.label, format('ALTER MATERIALIZED VIEW %s.%I RENAME TO %I', r.nsp, 'mv_' || o.objid, r.relname)),
        -- The original's autovacuum setting (keyshift.carry_shadows turned it off).
        (o.label, format('ALTER MATERIALIZED VIEW %s.%I %s', r.nsp, r.relname,
           CASE WHEN r.autovacuum IS NULL THEN 'RESET (autovacuum_enabled)'
                ELSE format('SET (%s)', r.autovacuum) END));
      drops := drops || format('DROP MATERIALIZED VIEW %s', o.objid::regclass);
    ELSIF o.kind = 'view' THEN
      SELECT c.*, pg_get_viewdef(c.oid) AS def INTO r FROM pg_class c WHERE c.oid = o.objid;
      rel := o.objid::regclass::text;
      INSERT INTO pg_temp.keyshift_carried (label, sql) VALUES
        (o.label, format('CREATE VIEW %s%s AS %s', rel,
           CASE WHEN r.reloptions IS NOT NULL
                THEN format(' WITH (%s)', array_to_string(r.reloptions, ', ')) ELSE '' END,
           rtrim(r.def, '; ' || chr(10))));
      INSERT INTO pg_temp.keyshift_carried (label, sql)
      SELECT o.label, p FROM keyshift.rel_props(o.objid, rel) p;
      INSERT INTO pg_temp.keyshift_carried (label, sql)
      SELECT o.label, format('ALTER VIEW %s ALTER COLUMN %I SET DEFAULT %s', rel, att.attname,
               pg_get_expr(ad.adbin, ad.adrelid))
        FROM pg_attrdef ad JOIN pg_attribute att ON att.attrelid = ad.adrelid AND att.attnum = ad.adnum
       WHERE ad.adrelid = o.objid
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
    ELSIF o.kind = 'check' THEN
      -- Not dropped: set aside under the legacy suffix (it stays on the integer column,
      -- finalize drops it with it) and created again NOT VALID on the column that takes the
      -- name (finalize validates it). Back on rollback: the copy goes, the original returns.
      SELECT con.conname, con.conrelid::regclass::text AS tbl,
             regexp_replace(pg_get_constraintdef(con.oid), ' NOT VALID$', '') AS def,
             obj_description(con.oid, 'pg_constraint') AS note
        INTO r FROM pg_constraint con WHERE con.oid = o.objid;
      aside := keyshift.suffixed(r.conname, suffix);
      IF EXISTS (SELECT 1 FROM pg_constraint WHERE conrelid = o.relid AND conname = aside) THEN
        INSERT INTO pg_temp.keyshift_carried (label, sql) VALUES
          (o.label, format('ALTER TABLE %s DROP CONSTRAINT %I', r.tbl, r.conname)),
          (o.label, format('ALTER TABLE %s RENAME CONSTRAINT %I TO %I', r.tbl, aside, r.conname));
      ELSE
        INSERT INTO pg_temp.keyshift_carried (label, sql) VALUES
          (o.label, format('SELECT keyshift.carry_try(%L, ARRAY[%L, %L%s])', o.label,
             format('ALTER TABLE %s RENAME CONSTRAINT %I TO %I', r.tbl, r.conname, aside),
             format('ALTER TABLE %s ADD CONSTRAINT %I %s NOT VALID', r.tbl, r.conname, r.def),
             CASE WHEN r.note IS NULL THEN '' ELSE format(', %L',
               format('COMMENT ON CONSTRAINT %I ON %s IS %L', r.conname, r.tbl, r.note)) END));
      END IF;
    ELSIF o.kind = 'statistics' THEN
      SELECT x.stxname, x.stxnamespace::regnamespace::text AS nsp, x.stxstattarget,
             pg_get_statisticsobjdef(x.oid) AS def, pg_get_userbyid(x.stxowner) AS owner,
             obj_description(x.oid, 'pg_statistic_ext') AS note
        INTO r FROM pg_statistic_ext x WHERE x.oid = o.objid;
      aside := keyshift.suffixed(r.stxname, suffix);
      IF EXISTS (SELECT 1 FROM pg_statistic_ext x
                  WHERE x.stxname = aside AND x.stxnamespace::regnamespace::text = r.nsp) THEN
        INSERT INTO pg_temp.keyshift_carried (label, sql) VALUES
          (o.label, format('DROP STATISTICS %s.%I', r.nsp, r.stxname)),
          (o.label, format('ALTER STATISTICS %s.%I RENAME TO %I', r.nsp, aside, r.stxname));
      ELSE
        INSERT INTO pg_temp.keyshift_carried (label, sql) VALUES
          (o.label, format('SELECT keyshift.carry_try(%L, %L::text[])', o.label, ARRAY[
             format('ALTER STATISTICS %s.%I RENAME TO %I', r.nsp, r.stxname, aside),
             r.def,
             format('ALTER STATISTICS %s.%I OWNER TO %I', r.nsp, r.stxname, r.owner),
             CASE WHEN r.stxstattarget >= 0
                  THEN format('ALTER STATISTICS %s.%I SET STATISTICS %s', r.nsp, r.stxname, r.stxstattarget)
                  ELSE 'SELECT 1' END,
             CASE WHEN r.note IS NOT NULL
                  THEN format('COMMENT ON STATISTICS %s.%I IS %L', r.nsp, r.stxname, r.note)
                  ELSE 'SELECT 1' END]));
      END IF;
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
    -- Each object's own drop too, for keyshift.carry_finish (one object at a time).
    IF coalesce(array_length(drops, 1), 0) > dropped THEN
      INSERT INTO pg_temp.keyshift_carried (step, label, sql)
      VALUES ('drop_one', o.label, drops[array_upper(drops, 1)]);
    END IF;
  END LOOP;
  -- In the order they run (last created first), adjacent drops of views, or of materialized
  -- views, go as one statement: each statement costs 0.1 ms of the pause, and whatever
  -- depends on one of them was dropped before it or is in the same statement.
  FOR i IN REVERSE coalesce(array_upper(drops, 1), 0) .. 1 LOOP
    drop_kind := substring(drops[i] FROM '^DROP (VIEW|MATERIALIZED VIEW) ');
    IF drop_kind IS NOT NULL AND drop_kind = last_drop_kind THEN
      merged[array_upper(merged, 1)] := merged[array_upper(merged, 1)] || ', '
                                        || substr(drops[i], length('DROP ' || drop_kind || ' ') + 1);
    ELSE
      merged := merged || drops[i];
    END IF;
    last_drop_kind := drop_kind;
  END LOOP;
  -- keyshift.carry_save runs them by `ord` descending.
  INSERT INTO pg_temp.keyshift_carried (step, sql)
  SELECT 'drop', d FROM unnest(merged) WITH ORDINALITY u(d, i) ORDER BY i DESC;
  INSERT INTO pg_temp.keyshift_carried (step, label, sql) VALUES ('fingerprint', n::text, fingerprint);
  RETURN n;
END $ks$;

-- What the statements keyshift.carry_prepare writes are made of, as one text: each carried
-- object with the xmin of every catalog row they are read from (an update of a row gives it a
-- new xmin), its comments, the roles it names, and the rows of what it references (renaming a
-- table or a column a view reads changes what pg_get_viewdef prints). Equal fingerprints: the
-- statements prepared before the pause are those deparsing now would give. A change that does
-- not alter them at worst makes the swap deparse again.
CREATE OR REPLACE FUNCTION keyshift.carry_fingerprint(cols jsonb, suffix text) RETURNS text
LANGUAGE plpgsql STABLE SET search_path = pg_catalog SET plan_cache_mode = force_generic_plan SET jit = off
  SET enable_hashjoin = off SET enable_mergejoin = off SET enable_bitmapscan = off AS $ks$
BEGIN
  RETURN (
WITH o AS (
  SELECT c.*, CASE c.kind WHEN 'view' THEN 'pg_class' WHEN 'materialized view' THEN 'pg_class'
                          WHEN 'rule' THEN 'pg_rewrite' WHEN 'trigger' THEN 'pg_trigger'
                          WHEN 'policy' THEN 'pg_policy' WHEN 'check' THEN 'pg_constraint'
                          ELSE 'pg_statistic_ext' END::regclass AS cat
    FROM keyshift.carried_objects(cols) c
),
-- Each object's own catalog row, and a view's rules and triggers (rebuilt with it).
src AS (
  SELECT o.objid AS obj, o.cat, o.objid AS oid FROM o
  UNION ALL
  SELECT o.objid, 'pg_rewrite'::regclass, w.oid FROM o JOIN pg_rewrite w ON w.ev_class = o.objid
   WHERE o.cat = 'pg_class'::regclass
  UNION ALL
  SELECT o.objid, 'pg_trigger'::regclass, g.oid FROM o JOIN pg_trigger g ON g.tgrelid = o.objid
   WHERE o.cat = 'pg_class'::regclass
),
stamps AS (
  SELECT s.obj, concat_ws('/', s.cat, s.oid,
    CASE s.cat
      WHEN 'pg_class'::regclass THEN
        (SELECT concat_ws('/', c.xmin, c.relacl, pg_get_userbyid(c.relowner),
                  (SELECT h.oid FROM pg_class h JOIN pg_namespace hn ON hn.oid = h.relnamespace
                    WHERE hn.nspname = 'keyshift_shadow' AND h.relname = 'mv_' || c.oid),
                  (SELECT string_agg(concat(a.attnum, ':', a.xmin, ':', a.attacl), ',' ORDER BY a.attnum)
                     FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0),
                  (SELECT string_agg(ad.xmin::text, ',' ORDER BY ad.adnum) FROM pg_attrdef ad WHERE ad.adrelid = c.oid))
           FROM pg_class c WHERE c.oid = s.oid)
      WHEN 'pg_rewrite'::regclass THEN (SELECT w.xmin::text FROM pg_rewrite w WHERE w.oid = s.oid)
      WHEN 'pg_trigger'::regclass THEN (SELECT g.xmin::text FROM pg_trigger g WHERE g.oid = s.oid)
      WHEN 'pg_policy'::regclass THEN
        (SELECT concat_ws('/', p.xmin, (SELECT string_agg(pg_get_userbyid(x), ',') FROM unnest(p.polroles) x))
           FROM pg_policy p WHERE p.oid = s.oid)
      WHEN 'pg_constraint'::regclass THEN
        (SELECT concat_ws('/', con.xmin, (SELECT l.oid FROM pg_constraint l WHERE l.conrelid = con.conrelid
                                              AND l.conname = keyshift.suffixed(con.conname, suffix)))
           FROM pg_constraint con WHERE con.oid = s.oid)
      ELSE
        (SELECT concat_ws('/', x.xmin, pg_get_userbyid(x.stxowner),
                  (SELECT l.oid FROM pg_statistic_ext l WHERE l.stxnamespace = x.stxnamespace
                      AND l.stxname = keyshift.suffixed(x.stxname, suffix)))
           FROM pg_statistic_ext x WHERE x.oid = s.oid)
    END,
    (SELECT string_agg(concat(d.objsubid, ':', d.xmin), ',' ORDER BY d.objsubid)
       FROM pg_description d WHERE d.objoid = s.oid AND d.classoid = s.cat),
    (SELECT string_agg(concat(r.refclassid, ':', r.refobjid, ':', r.refobjsubid, ':',
              CASE r.refclassid
                WHEN 'pg_class'::regclass THEN
                  (SELECT concat(c.xmin, ':', (SELECT a.xmin FROM pg_attribute a
                                                WHERE a.attrelid = c.oid AND a.attnum = r.refobjsubid))
                     FROM pg_class c WHERE c.oid = r.refobjid)
                WHEN 'pg_proc'::regclass THEN (SELECT p.xmin::text FROM pg_proc p WHERE p.oid = r.refobjid)
              END), ',' ORDER BY r.refclassid, r.refobjid, r.refobjsubid)
       FROM pg_depend r WHERE r.classid = s.cat AND r.objid = s.oid)) AS stamp
    FROM src s
)
SELECT md5(concat_ws('|', suffix, cols::text,
         (SELECT string_agg(concat_ws(':', o.kind, o.objid, o.depth, o.label), ',' ORDER BY o.kind, o.objid) FROM o),
         (SELECT string_agg(stamp, ',' ORDER BY obj, stamp) FROM stamps))));
END $ks$;

-- In the pause: the statements keyshift.carry_prepare wrote before it on this connection,
-- or written again if anything changed since (or nothing was prepared here).
CREATE OR REPLACE FUNCTION keyshift.carry_current(cols jsonb, suffix text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog AS $ks$
DECLARE
  prepared text;
BEGIN
  IF to_regclass('pg_temp.keyshift_carried') IS NOT NULL THEN
    SELECT sql INTO prepared FROM pg_temp.keyshift_carried WHERE step = 'fingerprint';
  END IF;
  IF prepared IS NULL OR prepared <> keyshift.carry_fingerprint(cols, suffix) THEN
    PERFORM keyshift.carry_prepare(cols, suffix);
  END IF;
END $ks$;

-- Inside the swap, before the renames: the objects prepared before the pause are dropped,
-- dependents first (policies, triggers and rules, then views from the top down); if anything
-- changed since the preparation, they are deparsed again first.
CREATE OR REPLACE FUNCTION keyshift.carry_save(cols jsonb, suffix text DEFAULT '_legacy') RETURNS int
LANGUAGE plpgsql SET search_path = pg_catalog AS $ks$
DECLARE
  n int;
  drops text[];
  what text;
BEGIN
  PERFORM keyshift.carry_current(cols, suffix);
  SELECT max(label) FILTER (WHERE step = 'fingerprint')::int,
         coalesce(array_agg(sql ORDER BY ord DESC) FILTER (WHERE step = 'drop'), '{}')
    INTO n, drops FROM pg_temp.keyshift_carried;
  FOREACH what IN ARRAY drops LOOP
    EXECUTE what;
  END LOOP;
  -- keyshift.carry_restore runs only after this, in the same transaction.
  PERFORM set_config('keyshift.carry_saved', 'on', true);
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
  IF coalesce(current_setting('keyshift.carry_saved', true), '') <> 'on' THEN
    RETURN 0;
  END IF;
  PERFORM set_config('keyshift.carry_saved', '', true);
  FOR s IN SELECT label, sql FROM pg_temp.keyshift_carried WHERE step = 'build' ORDER BY ord LOOP
    BEGIN
      EXECUTE s.sql;
    EXCEPTION WHEN lock_not_available THEN
      -- As it is: the swap's caller retries a lock timeout with the gates reopened.
      RAISE;
    WHEN OTHERS THEN
      RAISE EXCEPTION 'keyshift: could not rebuild % over the renamed columns: %', s.label, SQLERRM
        USING DETAIL = s.sql,
              HINT = 'nothing was changed (the swap rolled back); run keyshift cutover again after changing or dropping it';
    END;
    n := n + 1;
  END LOOP;
  DELETE FROM pg_temp.keyshift_carried;
  RETURN n;
END $ks$;

-- The cutover table by table (src/migrate/by_table.rs). Its groups swap in separate
-- transactions, so the application's objects cannot be dropped and rebuilt around one set of
-- renames: a view over two tables swapped by different groups would bind a uuid and an
-- integer. Instead they stay on the integer columns (which dual-write keeps whole, so they
-- keep their meaning) until every group is swapped, and are rebuilt then from the
-- definitions read before the first group, when every column still had its name:
--   keyshift.carry_keep, just before the pause that enters cutting_over: those definitions
--     kept in keyshift.carried, a table rather than the session's, since a command stopped
--     among the groups resumes on another connection; with a stamp of each object
--     (keyshift.carry_stamp). Not inside the pause: the fingerprint and the copy cost 10-25
--     ms at 10-50 tables (benches/cutover_tables.sh), and the stamps already make what
--     changes afterwards safe (left alone below);
--   keyshift.carry_unblock, in each group before its statements: the views (and the views
--     over them) that depend on a primary key the group drops, which would stop it (a view
--     grouping by the key), dropped; rebuilt at the end with the rest;
--   keyshift.carry_finish(part), once every group is swapped, one transaction per part
--     (the views; then what sits on each table, that table locked first): each object
--     dropped and rebuilt, except one the application changed or dropped meanwhile, which
--     is left as it made it (its new definition names the columns it meant) and reported.

-- 'kind:oid:' then the xmins of the catalog rows its rebuild is read from (an update gives a
-- row a new xmin): its defining row; a view's class row (owner, grants, options), columns
-- (column grants) and defaults; its comments. Unlike keyshift.carry_fingerprint, not what it
-- references: the groups rename those columns. Different once the object is gone.
CREATE OR REPLACE FUNCTION keyshift.carry_stamp(kind text, obj oid) RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog AS $ks$
SELECT kind || ':' || obj || ':' || concat_ws('/', CASE
  WHEN kind IN ('view', 'materialized view') THEN
    (SELECT concat_ws('/', w.xmin, c.xmin,
              (SELECT string_agg(a.xmin::text, ',' ORDER BY a.attnum) FROM pg_attribute a
                WHERE a.attrelid = obj AND a.attnum > 0),
              (SELECT string_agg(ad.xmin::text, ',' ORDER BY ad.adnum) FROM pg_attrdef ad
                WHERE ad.adrelid = obj))
       FROM pg_rewrite w JOIN pg_class c ON c.oid = w.ev_class
      WHERE w.ev_class = obj AND w.rulename = '_RETURN')
  WHEN kind = 'rule' THEN (SELECT w.xmin::text FROM pg_rewrite w WHERE w.oid = obj)
  WHEN kind = 'trigger' THEN (SELECT g.xmin::text FROM pg_trigger g WHERE g.oid = obj)
  WHEN kind = 'policy' THEN (SELECT p.xmin::text FROM pg_policy p WHERE p.oid = obj)
  WHEN kind = 'check' THEN (SELECT c.xmin::text FROM pg_constraint c WHERE c.oid = obj)
  ELSE (SELECT x.xmin::text FROM pg_statistic_ext x WHERE x.oid = obj) END,
  (SELECT string_agg(d.xmin::text, ',' ORDER BY d.objsubid) FROM pg_description d WHERE d.objoid = obj))
$ks$;

CREATE OR REPLACE FUNCTION keyshift.carry_keep(cols jsonb, suffix text DEFAULT '_legacy') RETURNS int
LANGUAGE plpgsql SET search_path = pg_catalog AS $ks$
DECLARE
  n int;
BEGIN
  PERFORM keyshift.carry_current(cols, suffix);
  DROP TABLE IF EXISTS keyshift.carried;
  CREATE TABLE keyshift.carried (ord int, step text NOT NULL, label text, sql text, part text);
  COMMENT ON TABLE keyshift.carried IS
    'Owned by keyshift: the application''s objects over migrated columns, rebuilt when the cutover table by table ends';
  -- `part`: the transaction keyshift.carry_finish rebuilds the object in. 'views' for the
  -- views and materialized views (and what sits on them, or depends on one of them):
  -- dropping and creating those locks only themselves, which no session through keyshift
  -- reads in cutting_over (it reads keyshift's copies), so that part runs between the
  -- application's transactions. Everything else sits on a table and needs that table's
  -- ACCESS EXCLUSIVE lock: one part per table, so that one busy table waits (or pauses)
  -- alone, for its few statements.
  CREATE TEMP TABLE keyshift_parts ON COMMIT DROP AS
  SELECT o.kind, o.objid, o.relid, o.label,
         CASE WHEN o.kind IN ('view', 'materialized view') OR EXISTS (
                SELECT 1 FROM pg_depend d JOIN pg_class v ON v.oid = d.refobjid AND v.relkind IN ('v', 'm')
                 WHERE d.objid = o.objid AND d.refclassid = 'pg_class'::regclass
                   AND d.classid = CASE o.kind WHEN 'rule' THEN 'pg_rewrite'::regclass
                                               WHEN 'trigger' THEN 'pg_trigger'::regclass
                                               WHEN 'policy' THEN 'pg_policy'::regclass
                                               WHEN 'check' THEN 'pg_constraint'::regclass
                                               ELSE 'pg_statistic_ext'::regclass END)
              THEN 'views' ELSE o.relid::regclass::text END AS part
    FROM keyshift.carried_objects(cols) o;
  INSERT INTO keyshift.carried (ord, step, label, sql, part)
  SELECT k.ord, k.step, k.label, k.sql, p.part
    FROM pg_temp.keyshift_carried k JOIN pg_temp.keyshift_parts p ON p.label = k.label
   WHERE k.step IN ('build', 'drop_one');
  -- Per object: its stamp, and what keyshift.carry_finish locks first, the relation it sits
  -- on (a view: itself, not locked, see there; repeats are taken once).
  INSERT INTO keyshift.carried (ord, step, label, sql, part)
  SELECT 0, x.step, x.label, x.sql, o.part
    FROM pg_temp.keyshift_parts o,
         LATERAL (VALUES ('stamp', o.label, keyshift.carry_stamp(o.kind, o.objid)),
                         ('lock', o.relid::regclass::text, o.relid::text)) x (step, label, sql);
  GET DIAGNOSTICS n = ROW_COUNT;
  DROP TABLE pg_temp.keyshift_parts;
  RETURN n / 2;
END $ks$;

CREATE OR REPLACE FUNCTION keyshift.carry_unblock(tables jsonb) RETURNS int
LANGUAGE plpgsql SET search_path = pg_catalog AS $ks$
DECLARE
  v record;
  n int := 0;
BEGIN
  FOR v IN
    WITH RECURSIVE dep (oid, depth) AS (
      SELECT r.ev_class, 1
        FROM jsonb_array_elements(tables) t
        JOIN pg_namespace ns ON ns.nspname = t->>0
        JOIN pg_class c ON c.relnamespace = ns.oid AND c.relname = t->>1
        JOIN pg_constraint con ON con.conrelid = c.oid AND con.contype = 'p'
        JOIN pg_depend d ON d.refclassid = 'pg_constraint'::regclass AND d.refobjid = con.oid
                        AND d.classid = 'pg_rewrite'::regclass
        JOIN pg_rewrite r ON r.oid = d.objid AND r.rulename = '_RETURN'
      UNION ALL
      SELECT r.ev_class, dep.depth + 1
        FROM dep
        JOIN pg_depend d ON d.refclassid = 'pg_class'::regclass AND d.refobjid = dep.oid
                        AND d.classid = 'pg_rewrite'::regclass
        JOIN pg_rewrite r ON r.oid = d.objid AND r.rulename = '_RETURN' AND r.ev_class <> dep.oid
    )
    SELECT dep.oid, c.relkind, max(dep.depth) AS depth
      FROM dep JOIN pg_class c ON c.oid = dep.oid
     GROUP BY dep.oid, c.relkind ORDER BY max(dep.depth) DESC
  LOOP
    -- One made after the definitions were kept could not be rebuilt: stop the group (it
    -- rolls back whole) rather than lose it.
    IF to_regclass('keyshift.carried') IS NULL
       OR NOT EXISTS (SELECT 1 FROM keyshift.carried
                       WHERE step = 'build' AND label = v.oid::regclass::text) THEN
      RAISE EXCEPTION 'keyshift: view % depends on a primary key this group replaces, and was made after the cutover began', v.oid::regclass
        USING HINT = 'drop it, run keyshift cutover --by-table again to finish, then create it again';
    END IF;
    INSERT INTO keyshift.carried (ord, step, label) VALUES (0, 'unblocked', v.oid::regclass::text);
    -- Without CASCADE: anything else that depends on it stops the group with PostgreSQL's
    -- own error rather than being dropped.
    EXECUTE format('DROP %s %s', CASE v.relkind WHEN 'm' THEN 'MATERIALIZED VIEW' ELSE 'VIEW' END,
                   v.oid::regclass);
    n := n + 1;
  END LOOP;
  RETURN n;
END $ks$;

-- Changed or dropped since the cutover began, and not by a group: the application's doing;
-- with the kept views such a view reads (dropping one would need it gone too).
-- (PL/pgSQL: an SQL function's body is checked when it is created, before that table exists.)
CREATE OR REPLACE FUNCTION keyshift.carry_left_alone() RETURNS text[]
LANGUAGE plpgsql STABLE SET search_path = pg_catalog AS $ks$
BEGIN
  RETURN (
    WITH RECURSIVE changed (label, relation) AS (
      SELECT k.label, CASE WHEN split_part(k.sql, ':', 1) IN ('view', 'materialized view')
                           THEN split_part(k.sql, ':', 2)::oid END
        FROM keyshift.carried k
       WHERE k.step = 'stamp'
         AND keyshift.carry_stamp(split_part(k.sql, ':', 1), split_part(k.sql, ':', 2)::oid) IS DISTINCT FROM k.sql
         AND NOT EXISTS (SELECT 1 FROM keyshift.carried u WHERE u.step = 'unblocked' AND u.label = k.label)
      UNION
      SELECT d.refobjid::regclass::text, d.refobjid
        FROM changed c
        JOIN pg_rewrite r ON r.ev_class = c.relation AND r.rulename = '_RETURN'
        JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid
                        AND d.refclassid = 'pg_class'::regclass AND d.refobjid <> r.ev_class
       WHERE EXISTS (SELECT 1 FROM keyshift.carried b
                      WHERE b.step = 'build' AND b.label = d.refobjid::regclass::text)
    )
    SELECT coalesce(array_agg(label ORDER BY label), '{}') FROM changed);
END $ks$;

-- (Until 2026-12-02 it took no argument: that one would make a call without one ambiguous.)
DROP FUNCTION IF EXISTS keyshift.carry_finish();
-- One part (keyshift.carry_keep) of the objects kept, or every one left when `part` is NULL.
-- Returns, once the last part is done, the objects left alone (keyshift.carry_left_alone)
-- in every part; '' until then.
CREATE OR REPLACE FUNCTION keyshift.carry_finish(part text DEFAULT NULL) RETURNS text
LANGUAGE plpgsql SET search_path = pg_catalog AS $ks$
#variable_conflict use_variable
DECLARE
  s record;
  left_alone text[] := '{}';
  done text;
BEGIN
  IF to_regclass('keyshift.carried') IS NULL THEN
    RETURN '';
  END IF;
  -- The tables' locks first, in one order, each waited for under the caller's lock_timeout
  -- (50 ms with the gates open): one statement at a time, a reader holding one table and
  -- waiting for another could deadlock with this transaction. Not a view's or a
  -- materialized view's: LOCK on a view locks every table it reads too (the whole busy
  -- schema, which never came in 5 tries under 16 clients); its own DROP locks only itself,
  -- waits as long, and no session through keyshift reads it in cutting_over.
  -- (By oid: a group dropped some views. The CASE keeps the cast off the other rows.)
  FOR s IN SELECT DISTINCT c.oid::regclass::text AS label
             FROM keyshift.carried k
             JOIN pg_class c ON c.oid = CASE WHEN k.step = 'lock' THEN k.sql::oid END
            WHERE c.relkind NOT IN ('v', 'm') AND (part IS NULL OR k.part = part)
            ORDER BY 1 LOOP
    EXECUTE format('LOCK TABLE %s IN ACCESS EXCLUSIVE MODE', s.label);
  END LOOP;
  SELECT coalesce(array_agg(l), '{}') INTO left_alone
    FROM unnest(keyshift.carry_left_alone()) l
   WHERE EXISTS (SELECT 1 FROM keyshift.carried k
                  WHERE k.step = 'stamp' AND k.label = l AND (part IS NULL OR k.part = part));
  FOR s IN SELECT k.label, k.sql FROM keyshift.carried k
            WHERE k.step = 'drop_one' AND k.label <> ALL (left_alone) AND (part IS NULL OR k.part = part)
            ORDER BY k.ord DESC LOOP
    BEGIN
      EXECUTE regexp_replace(s.sql, '^DROP (VIEW|MATERIALIZED VIEW|POLICY|TRIGGER|RULE) ',
                             'DROP \1 IF EXISTS ');
    EXCEPTION WHEN dependent_objects_still_exist THEN
      RAISE EXCEPTION 'keyshift: cannot rebuild % over the uuid columns: %', s.label, SQLERRM
        USING DETAIL = SQLSTATE,
              HINT = 'something made during the cutover depends on it: drop that, run keyshift cutover --by-table again, then make it again';
    END;
  END LOOP;
  FOR s IN SELECT k.label, k.sql FROM keyshift.carried k
            WHERE k.step = 'build' AND k.label <> ALL (left_alone) AND (part IS NULL OR k.part = part)
            ORDER BY k.ord LOOP
    BEGIN
      EXECUTE s.sql;
    EXCEPTION WHEN lock_not_available THEN
      -- As it is: a lock timeout is retried (gates open, then under a pause of its own).
      RAISE;
    WHEN OTHERS THEN
      RAISE EXCEPTION 'keyshift: could not rebuild % over the uuid columns: %', s.label, SQLERRM
        USING DETAIL = s.sql,
              HINT = 'nothing was changed (its transaction rolled back); drop or change it, then run keyshift cutover --by-table again';
    END;
  END LOOP;
  -- The part is done; what it left alone is remembered for the last part's report.
  DELETE FROM keyshift.carried k WHERE k.step IN ('build', 'drop_one', 'stamp', 'lock')
                                   AND (part IS NULL OR k.part = part);
  INSERT INTO keyshift.carried (ord, step, label) SELECT 0, 'left', l FROM unnest(left_alone) l;
  IF EXISTS (SELECT 1 FROM keyshift.carried WHERE step = 'stamp') THEN
    RETURN '';
  END IF;
  SELECT coalesce(string_agg(label, ', ' ORDER BY label), '') INTO done
    FROM keyshift.carried WHERE step = 'left';
  DROP TABLE keyshift.carried;
  RETURN done;
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
  built int;
BEGIN
  -- Nothing to build: no temporary table for each migrated table (0.8 s at 300 tables).
  SELECT count(*) FILTER (WHERE kind IN ('view', 'policy')),
         count(*) FILTER (WHERE kind = 'materialized view')
    INTO built, n FROM keyshift.carried_objects(cols);
  IF built = 0 THEN
    RETURN n;
  END IF;
  n := 0;
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
        -- Checked by building its shadow (keyshift.carry_shadows), next.
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
END $ks$;

-- keyshift's views of the application's views, per shape: for each view over a renamed
-- column in a schema with migrated tables, `keyshift_<shape>_<schema>.<view>`, its definition
-- run over keyshift's views of that shape (and over the copies of the views it reads), with
-- the view's options, owner, grants and comments, and USAGE on the schema to its grantees.
-- A translated session reads these instead of the application's views (the proxy redirects
-- them as it redirects the tables), so every session sees each view in its own shape. They
-- read only keyshift's views, which bind columns by number: they keep their shape through
-- every swap. Replaced at each call. A view whose definition does not work in a shape (it
-- compares the key with an integer, or groups by the key alone, which needs a table's
-- primary key) gets no copy in that shape, with a NOTICE; so does one that would read an
-- application view or a renamed column directly (its name was not found through the path).
CREATE OR REPLACE FUNCTION keyshift.carry_copies(cols jsonb, rels jsonb) RETURNS int
LANGUAGE plpgsql SET search_path = pg_catalog AS $ks$
DECLARE
  o record;
  r record;
  shape text;
  vs text;
  stmt text;
  app_path text;
  copy oid;
  carried oid[];
  n int := 0;
BEGIN
  SELECT string_agg(DISTINCT quote_ident(x->>0), ', ') INTO app_path FROM jsonb_array_elements(rels) x;
  SELECT coalesce(array_agg(objid), '{}') INTO carried FROM keyshift.carried_objects(cols)
   WHERE kind IN ('view', 'materialized view');
  FOREACH shape IN ARRAY ARRAY['integer', 'uuid'] LOOP
    FOR r IN
      SELECT format('%I.%I', n.nspname, c.relname) AS rel
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        JOIN (SELECT DISTINCT x->>0 AS sch FROM jsonb_array_elements(rels) x) s
          ON n.nspname = format('keyshift_%s_%s', shape, s.sch)
       WHERE c.relkind = 'v'
         AND NOT EXISTS (SELECT 1 FROM jsonb_array_elements(rels) x
                          WHERE x->>0 = s.sch AND x->>1 = c.relname)
    LOOP
      EXECUTE format('DROP VIEW IF EXISTS %s CASCADE', r.rel);
    END LOOP;
    FOR o IN SELECT * FROM keyshift.carried_objects(cols) WHERE kind = 'view' ORDER BY depth, label LOOP
      SELECT c.relname, n.nspname, c.reloptions INTO r
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = o.objid;
      vs := format('keyshift_%s_%s', shape, r.nspname);
      CONTINUE WHEN NOT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = vs
                                   AND obj_description(oid, 'pg_namespace') LIKE 'Owned by keyshift%');
      PERFORM set_config('search_path', app_path, true);
      stmt := format('CREATE VIEW %I.%I%s AS %s', vs, r.relname,
        CASE WHEN r.reloptions IS NOT NULL THEN format(' WITH (%s)', array_to_string(r.reloptions, ', ')) ELSE '' END,
        rtrim(pg_get_viewdef(o.objid), '; ' || chr(10)));
      PERFORM set_config('search_path', keyshift.shape_path(rels, shape, app_path), true);
      BEGIN
        EXECUTE stmt;
      EXCEPTION WHEN OTHERS THEN
        RAISE NOTICE 'keyshift: view % is shown to %-shaped sessions as it is, not in their shape: %', o.label, shape, SQLERRM;
        CONTINUE;
      END;
      PERFORM set_config('search_path', 'pg_catalog', true);
      copy := format('%I.%I', vs, r.relname)::regclass;
      IF EXISTS (SELECT 1 FROM pg_depend d JOIN pg_rewrite w ON w.oid = d.objid AND w.ev_class = copy
                  WHERE d.classid = 'pg_rewrite'::regclass AND d.refclassid = 'pg_class'::regclass
                    AND (d.refobjid = ANY (carried)
                         OR EXISTS (SELECT 1 FROM jsonb_array_elements(cols) c
                                     JOIN pg_attribute a ON a.attrelid = to_regclass(format('%I.%I', c->>0, c->>1))
                                                        AND a.attname = c->>2
                                    WHERE a.attrelid = d.refobjid AND a.attnum = d.refobjsubid))) THEN
        EXECUTE format('DROP VIEW %s', copy::regclass);
        RAISE NOTICE 'keyshift: view % is shown to %-shaped sessions as it is, not in their shape: it names a migrated table or view with its schema outside the search path', o.label, shape;
        CONTINUE;
      END IF;
      FOR stmt IN
        SELECT keyshift.rel_props(o.objid, copy::regclass::text)
        UNION ALL
        SELECT DISTINCT format('GRANT USAGE ON SCHEMA %I TO %s', vs,
                 CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(a.grantee)) END)
          FROM (SELECT relacl AS acl FROM pg_class WHERE oid = o.objid
                UNION ALL SELECT attacl FROM pg_attribute WHERE attrelid = o.objid AND attnum > 0) x,
               aclexplode(x.acl) a
      LOOP
        EXECUTE stmt;
      END LOOP;
      n := n + 1;
    END LOOP;
  END LOOP;
  RETURN n;
END $ks$;

-- finalize, before the legacy columns go: the CHECK constraints a swap created again NOT VALID
-- on the uuid columns (their originals, set aside under the legacy suffix, are still there)
-- are validated, without blocking writes.
CREATE OR REPLACE FUNCTION keyshift.carry_validate(suffix text) RETURNS int
LANGUAGE plpgsql SET search_path = pg_catalog AS $ks$
DECLARE
  c record;
  n int := 0;
BEGIN
  FOR c IN
    SELECT con.conname, con.conrelid::regclass::text AS tbl FROM pg_constraint con
     WHERE con.contype = 'c' AND NOT con.convalidated AND con.coninhcount = 0
       AND EXISTS (SELECT 1 FROM pg_constraint l WHERE l.conrelid = con.conrelid
                     AND l.conname = keyshift.suffixed(con.conname, suffix))
  LOOP
    EXECUTE format('ALTER TABLE %s VALIDATE CONSTRAINT %I', c.tbl, c.conname);
    n := n + 1;
  END LOOP;
  RETURN n;
END $ks$;

-- finalize and abort, before they drop keyshift's views: every materialized view a swap left
-- over them is rebuilt over the tables and moved into place, the views over it with it.
CREATE OR REPLACE FUNCTION keyshift.carry_rebase(rels jsonb) RETURNS int
LANGUAGE plpgsql SET search_path = pg_catalog AS $ks$
DECLARE
  n int;
BEGIN
  n := keyshift.carry_shadows('[]', rels, 'table');
  IF n > 0 THEN
    PERFORM keyshift.carry_save('[]');
    PERFORM keyshift.carry_restore();
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

/// The migrated relations as the functions take them: `[schema, table, view schema of
/// `target`, key when it is a migrated table]`.
fn relations_json(plan: &Plan, target: Shape) -> String {
    let rels: Vec<serde_json::Value> = super::views::relations(plan)
        .iter()
        .map(|(s, t)| {
            let key = plan.table(s, t).map(|t| t.key.as_str());
            serde_json::json!([s, t, target.view_schema(s), key])
        })
        .collect();
    serde_json::Value::Array(rels).to_string()
}

/// How many objects of the application a swap would have to carry (views, policies,
/// triggers, rules, CHECKs, statistics over a migrated key or FK column); needs the
/// functions ([`functions`]).
pub fn count_sql(plan: &Plan) -> String {
    format!(
        "SELECT count(*)::bigint, coalesce(string_agg(kind || ' ' || label, ', ' ORDER BY label), '') FROM keyshift.carried_objects({}::jsonb)",
        literal(&columns_json(plan))
    )
}

pub fn functions() -> Step {
    Step {
        sql: function_sql(),
        mode: Mode::State,
        when: When::Always,
    }
}

/// Before the pause: the functions; the check against tables shaped like `target`'s views;
/// then the materialized views' shadows, built and filled over `target`'s views (reads only:
/// it blocks no one, and takes as long as their queries); last, every definition deparsed into
/// the statements the swap runs (`keyshift.carry_prepare`: 20 ms of the swap's pause with 98
/// definitions, benches/cutover.sh `SCHEMA_OBJECTS=1`), which the swap only checks are still
/// current.
pub fn prepare(plan: &Plan, target: Shape) -> Vec<Step> {
    let cols = literal(&columns_json(plan));
    let rels = literal(&relations_json(plan, target));
    vec![
        functions(),
        copies(plan),
        Step {
            sql: format!("SELECT keyshift.carry_check({cols}::jsonb, {rels}::jsonb)"),
            mode: Mode::Online,
            when: When::Always,
        },
        Step {
            sql: format!(
                "SELECT keyshift.carry_shadows({cols}::jsonb, {rels}::jsonb, {})",
                literal(target.as_str())
            ),
            mode: Mode::Online,
            when: When::Always,
        },
        Step {
            sql: format!(
                "SELECT keyshift.carry_prepare({cols}::jsonb, {})",
                literal(&plan.legacy_suffix)
            ),
            mode: Mode::Online,
            when: When::Always,
        },
    ]
}

/// The application's views in each shape (`keyshift.carry_copies`), made again: at expand
/// once keyshift's views of the tables exist, and before each swap, for what the application
/// changed since. Brief: replacing a copy takes ACCESS EXCLUSIVE on it, which a translated
/// session reading it holds ACCESS SHARE on. The NOTIFY (delivered at commit, before the
/// pause's) has the proxies read which copies exist again: they point translated sessions
/// at them, and build a swap's rules from what they last read (src/proxy/source.rs).
pub fn copies(plan: &Plan) -> Step {
    Step {
        sql: format!(
            "SELECT keyshift.carry_copies({}::jsonb, {}::jsonb); NOTIFY keyshift, 'catalog'",
            literal(&columns_json(plan)),
            literal(&relations_json(plan, Shape::Uuid))
        ),
        mode: Mode::Brief,
        when: When::CarriedViews {
            columns: columns_json(plan),
        },
    }
}

/// expand's last steps: the functions, then the copies.
pub fn at_expand(plan: &Plan) -> Vec<Step> {
    vec![functions(), copies(plan)]
}

/// finalize and abort, before keyshift's views go: materialized views a swap left over them
/// are rebuilt over the tables and moved into place (brief: the move takes ACCESS EXCLUSIVE
/// on each, under lock_timeout with retry), then the shadows' schema goes.
pub fn rebase(plan: &Plan) -> Vec<Step> {
    vec![
        functions(),
        Step {
            sql: format!(
                "SELECT keyshift.carry_rebase({}::jsonb)",
                literal(&relations_json(plan, Shape::Uuid))
            ),
            mode: Mode::Brief,
            when: When::Always,
        },
        Step {
            sql: format!(
                "DO $$ BEGIN
  IF (SELECT obj_description(oid, 'pg_namespace') FROM pg_namespace WHERE nspname = '{SHADOW_SCHEMA}') LIKE 'Owned by keyshift%' THEN
    DROP SCHEMA {SHADOW_SCHEMA} CASCADE;
  END IF;
END $$"
            ),
            mode: Mode::Brief,
            when: When::Always,
        },
    ]
}

/// Inside the swap, before the renames.
pub fn save(plan: &Plan) -> String {
    format!(
        "SELECT keyshift.carry_save({}::jsonb, {})",
        literal(&columns_json(plan)),
        literal(&plan.legacy_suffix)
    )
}

/// finalize, before the legacy columns go: CHECK constraints carried NOT VALID are validated
/// (SHARE UPDATE EXCLUSIVE: reads and writes go on).
pub fn validate(plan: &Plan) -> Step {
    Step {
        sql: format!(
            "SELECT keyshift.carry_validate({})",
            literal(&plan.legacy_suffix)
        ),
        mode: Mode::Online,
        when: When::Always,
    }
}

/// Inside the swap, after the renames.
pub fn restore() -> String {
    "SELECT keyshift.carry_restore()".into()
}

/// The cutover table by table, just before the pause that enters `cutting_over`: the
/// definitions [`prepare`] deparsed, kept in `keyshift.carried` for [`FINISH`].
pub fn keep(plan: &Plan) -> Step {
    Step {
        sql: format!(
            "SELECT keyshift.carry_keep({}::jsonb, {})",
            literal(&columns_json(plan)),
            literal(&plan.legacy_suffix)
        ),
        mode: Mode::Online,
        when: When::Always,
    }
}

/// In a group of the cutover table by table, before its statements: the views that depend
/// on the primary keys of `tables` (`schema`, `table`), which would stop it, dropped (and
/// rebuilt by [`FINISH`]).
pub fn unblock<'a>(tables: impl Iterator<Item = (&'a str, &'a str)>) -> String {
    let tables: Vec<serde_json::Value> = tables.map(|(s, t)| serde_json::json!([s, t])).collect();
    format!(
        "SELECT keyshift.carry_unblock({}::jsonb)",
        literal(&serde_json::Value::Array(tables).to_string())
    )
}

/// Once every group is swapped: every object kept by [`keep`] rebuilt over the uuid columns,
/// except those the application changed meanwhile (returned, comma-separated).
pub const FINISH: &str = "SELECT keyshift.carry_finish()";

/// [`FINISH`] for one of the [`PARTS`].
pub fn finish_part(part: &str) -> String {
    format!("SELECT keyshift.carry_finish({})", literal(part))
}

/// How many objects [`FINISH`] would rebuild (None when nothing is kept), and the labels of
/// those it would leave as the application changed them.
pub const PENDING: &str = "SELECT count(*) FILTER (WHERE step = 'stamp'), array_to_string(keyshift.carry_left_alone() || array(SELECT label FROM keyshift.carried WHERE step = 'left' ORDER BY label), ', ') FROM keyshift.carried";

/// The parts of [`PENDING`]'s objects, each rebuilt in a transaction of its own by
/// `keyshift.carry_finish(part)`: the views first, then one per table.
pub const PARTS: &str = "SELECT part FROM keyshift.carried WHERE step = 'stamp' GROUP BY part ORDER BY part <> 'views', part";

/// finalize: the functions go with keyshift's state.
pub fn drop_functions() -> Vec<Step> {
    FUNCTIONS
        .iter()
        .map(|f| super::ddl::drop_function(f))
        .collect()
}
