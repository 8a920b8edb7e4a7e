//! What PostgreSQL attaches to a migrated column by number, mirrored onto its twin: column
//! privileges, the comment and the statistics target (issue [schema]).
//!
//! Cutover's renames give the twin the original name, but a `GRANT SELECT (id) ON users`, a
//! `COMMENT ON COLUMN users.id` or a `SET STATISTICS` stay with the integer column, which is
//! `id_legacy` from then on: a reporting role with column grants gets `permission denied` on
//! `SELECT id, name FROM users`. So each twin gets its column's privileges, comment and
//! statistics target at expand (then a role with column-level INSERT or SELECT can also
//! write and read the twin the dual-write fills), and again before cutover's pause, for what
//! was granted or changed since. Nothing is taken from the original column: after cutover
//! and after a rollback both carry them, and finalize drops the legacy one with its own.
//!
//! `keyshift.mirror_column()` reads the catalog when it runs; the SQL here stays a pure
//! function of the plan. A privilege revoked from the original after it ran stays on the twin
//! (docs/limitations.md).

use super::ddl::{Mode, Step, When};
use super::plan::Plan;
use crate::ident::literal;

/// The signature `DROP FUNCTION` needs.
const FUNCTION: &str = "keyshift.mirror_column(text, text, text, text)";

/// `keyshift.mirror_column(schema, table, from, to)`: grants on `to` every column privilege
/// `from` has (to the same grantees, with the grant option where they have it), and copies its
/// comment and statistics target. Idempotent: GRANT of a privilege held is a no-op.
pub fn function_sql() -> String {
    r#"CREATE OR REPLACE FUNCTION keyshift.mirror_column(sch text, tbl text, src text, dst text)
RETURNS void LANGUAGE plpgsql AS $ks$
DECLARE
  rel regclass := format('%I.%I', sch, tbl)::regclass;
  r record;
  c text;
  st int;
BEGIN
  FOR r IN
    SELECT a.grantee, a.privilege_type, a.is_grantable
      FROM pg_attribute att, aclexplode(att.attacl) a
     WHERE att.attrelid = rel AND att.attname = src
  LOOP
    EXECUTE format('GRANT %s (%I) ON %s TO %s%s', r.privilege_type, dst, rel,
      CASE WHEN r.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(r.grantee)) END,
      CASE WHEN r.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END);
  END LOOP;
  SELECT col_description(rel, attnum), attstattarget INTO c, st
    FROM pg_attribute WHERE attrelid = rel AND attname = src;
  IF c IS NOT NULL THEN
    EXECUTE format('COMMENT ON COLUMN %s.%I IS %L', rel, dst, c);
  END IF;
  IF st IS NOT NULL AND st >= 0 THEN
    EXECUTE format('ALTER TABLE %s ALTER COLUMN %I SET STATISTICS %s', rel, dst, st);
  END IF;
END $ks$"#
        .to_string()
}

/// One step per migrated column (each key, each FK column), mirroring it onto its twin.
/// Before cutover only: the columns carry their original names.
pub fn steps(plan: &Plan) -> Vec<Step> {
    let mut pairs: Vec<(&str, &str, &str, &str)> = plan
        .tables
        .iter()
        .map(|t| {
            (
                t.schema.as_str(),
                t.name.as_str(),
                t.key.as_str(),
                t.uuid_column.as_str(),
            )
        })
        .collect();
    pairs.extend(plan.foreign_keys().map(|(_, f)| {
        (
            f.child_schema.as_str(),
            f.child_table.as_str(),
            f.child_column.as_str(),
            f.uuid_column.as_str(),
        )
    }));
    pairs
        .into_iter()
        .map(|(s, t, from, to)| Step {
            sql: format!(
                "SELECT keyshift.mirror_column({}, {}, {}, {})",
                literal(s),
                literal(t),
                literal(from),
                literal(to)
            ),
            // Column GRANTs and COMMENT take no lock that blocks traffic; SET STATISTICS
            // takes SHARE UPDATE EXCLUSIVE, which does not either.
            mode: Mode::Online,
            when: When::MirrorNeeded {
                schema: s.into(),
                table: t.into(),
                from: from.into(),
                to: to.into(),
            },
        })
        .collect()
}

/// finalize: the function goes with keyshift's state.
pub fn drop_function() -> Step {
    super::ddl::drop_function(FUNCTION)
}
