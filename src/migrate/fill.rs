//! Fill triggers: the safety net under the proxy's dual-write, for every write that does not
//! pass through keyshift's rewriter: `COPY … FROM`, direct connections (a cron job, a psql
//! session on the database host), functions and triggers that write, logical replication.
//!
//! Each child of a migrated parent gets, at expand, two trigger functions and four BEFORE ROW
//! triggers. Two of the triggers are enabled at a time, the pair for the physical phase:
//!
//! - before cutover the integer FK is the truth: an INSERT that leaves exactly one of
//!   `p_id` / `p_id_uuid` NULL gets the other from the parent (a uuid naming no parent fails
//!   with the FK's 23503: the proxy leaves the twins of a translated session's
//!   simple-protocol inserts to these triggers, `rewrite::Planning`); an UPDATE that changes
//!   `p_id` but not `p_id_uuid` gets the twin recomputed;
//! - after cutover the uuid FK is the truth, the same the other way round (`p_id_legacy`
//!   from the parent's `id_legacy`), and an integer FK naming no parent fails with the
//!   23503 its dropped constraint would have raised (`keyshift.missing_parent`), since no
//!   constraint checks the legacy side any more.
//!
//! Why triggers and not only the rewriter: the rewriter cannot see writes that bypass it. Why
//! the rewriter too: it is cheaper per row (one lookup planned into the statement, no
//! function call; docs/benchmarks.md). The guard makes the triggers nearly free for rows the
//! rewriter already filled: the executor evaluates the `WHEN` condition on the row and never
//! calls the function (measured with benches/dualwrite.sh, docs/architecture.md). An UPDATE
//! trigger fires only on `UPDATE OF` the FK columns and only when the truth side changed
//! alone, so the backfill, which writes only the other side, never calls it.
//!
//! `WHEN` conditions and `UPDATE OF` lists bind columns by number, so the triggers follow the
//! swap's renames; the functions name columns, so there is one per phase, and the swap only
//! switches which pair is enabled (one catalog-only `ALTER TABLE` per child). The triggers
//! are `ENABLE ALWAYS`: they fire under `session_replication_role = replica` too (logical
//! replication's apply workers). They are named `zz_…` so that they fire after the
//! application's own BEFORE triggers (PostgreSQL fires them in name order) and see the row
//! those leave.

use super::ddl::{Mode, Step, When};
use super::plan::{Plan, PlanFk};
use crate::ident::{fit, literal, qualified, quote};

/// Which shape the tables are physically in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Physical {
    /// Before cutover: integer keys under the original names.
    Integer,
    /// After cutover: uuid keys under the original names, integers under `_legacy`.
    Uuid,
}

impl Physical {
    fn tag(self) -> &'static str {
        match self {
            Physical::Integer => "integer",
            Physical::Uuid => "uuid",
        }
    }
}

/// The four triggers of a child: (phase, INSERT or UPDATE).
pub fn trigger_name(p: Physical, update: bool) -> String {
    format!(
        "zz_keyshift_fill_{}_{}",
        p.tag(),
        if update { "upd" } else { "ins" }
    )
}

fn all_triggers() -> Vec<String> {
    [Physical::Integer, Physical::Uuid]
        .into_iter()
        .flat_map(|p| [trigger_name(p, false), trigger_name(p, true)])
        .collect()
}

/// `keyshift."fill_<schema>__<table>_<phase>"`, fitted to 63 bytes.
pub fn function_name(schema: &str, table: &str, p: Physical) -> String {
    format!(
        "keyshift.{}",
        quote(&fit(&format!("fill_{schema}__{table}_{}", p.tag())))
    )
}

/// The children with at least one migrated FK, each with its FKs, in plan order.
pub fn children(plan: &Plan) -> Vec<(&str, &str, Vec<&PlanFk>)> {
    let mut out: Vec<(&str, &str, Vec<&PlanFk>)> = Vec::new();
    for (_, f) in plan.foreign_keys() {
        match out
            .iter_mut()
            .find(|(s, t, _)| *s == f.child_schema && *t == f.child_table)
        {
            Some((_, _, fks)) => fks.push(f),
            None => out.push((&f.child_schema, &f.child_table, vec![f])),
        }
    }
    out
}

/// An FK's four columns: the child's under the names of one phase, the parent's as
/// keyshift's integer-shape view of it names them ([`lookup`]).
struct Names {
    /// The child's integer FK and its uuid twin.
    int: String,
    uuid: String,
    /// The parent's integer and uuid keys, in its integer-shape view.
    parent_int: String,
    parent_uuid: String,
    /// The same two columns of the row being written, for a self-reference: the child's own
    /// names in this phase.
    self_int: String,
    self_uuid: String,
}

fn names(plan: &Plan, f: &PlanFk, p: Physical) -> Names {
    let q = |s: &str| quote(s).into_owned();
    let (int, uuid, self_int, self_uuid) = match p {
        Physical::Integer => (
            q(&f.child_column),
            q(&f.uuid_column),
            q(&f.parent_key),
            q(&f.parent_uuid_column),
        ),
        Physical::Uuid => (
            q(&f.legacy_column),
            q(&f.child_column),
            q(&super::ddl::legacy_of(plan, f)),
            q(&f.parent_key),
        ),
    };
    Names {
        int,
        uuid,
        parent_int: q(&f.parent_key),
        parent_uuid: q(&f.parent_uuid_column),
        self_int,
        self_uuid,
    }
}

/// The other side of the FK from the parent: its uuid looked up by the child's integer
/// (`want_uuid`), or its integer by the child's uuid. A row that references itself (a
/// self-referencing FK, the row being written) is read from NEW: the lookup cannot see it.
///
/// The parent is read through keyshift's view of it in the integer shape, whose `id` and
/// `id_uuid` are the same two columns whether the parent has been swapped or not (a view
/// binds columns by number): a child's function does not depend on when its parent's swap
/// happens, which a cutover swapping table by table needs (docs/cutover.md). The view is a
/// plain projection of the table, so the planner reads the table's unique index as before.
fn lookup(f: &PlanFk, n: &Names, want_uuid: bool) -> String {
    let (get, key, by) = if want_uuid {
        (&n.parent_uuid, &n.parent_int, &n.int)
    } else {
        (&n.parent_int, &n.parent_uuid, &n.uuid)
    };
    let parent = qualified(
        &crate::shape::Shape::Integer.view_schema(&f.parent_schema),
        &f.parent_table,
    );
    let select = format!("(SELECT p.{get} FROM {parent} AS p WHERE p.{key} = NEW.{by})");
    if f.parent_schema == f.child_schema && f.parent_table == f.child_table {
        let (self_get, self_key) = if want_uuid {
            (&n.self_uuid, &n.self_int)
        } else {
            (&n.self_int, &n.self_uuid)
        };
        format!("CASE WHEN NEW.{by} = NEW.{self_key} THEN NEW.{self_get} ELSE {select} END")
    } else {
        select
    }
}

/// A key naming no parent fails as the FK would, where no constraint checks it: after
/// cutover a legacy integer (`by_uuid` false: its constraint was dropped); before it, a uuid
/// written alone (`by_uuid`: a uuid-shaped session's insert, whose integer FK gets NULL and
/// would otherwise fail as a NOT NULL violation or not at all, where the table cut over
/// offline raises this 23503).
fn missing_parent(f: &PlanFk, n: &Names, by_uuid: bool) -> String {
    if f.deferrable {
        // A deferred check would have waited for the end of the transaction: the parent may
        // still come. The row keeps a NULL twin; verify and the backfill find it.
        return String::new();
    }
    let (computed, given) = if by_uuid {
        (&n.int, &n.uuid)
    } else {
        (&n.uuid, &n.int)
    };
    format!(
        "\n      IF NEW.{u} IS NULL THEN PERFORM keyshift.missing_parent(NEW.{i}::text, {c}, {k}, {col}, {p}); END IF;",
        u = computed,
        i = given,
        c = literal(&f.child_table),
        k = literal(&f.constraint),
        col = literal(&f.child_column),
        p = literal(&f.parent_table),
    )
}

/// The trigger function of one child for one phase. `SECURITY DEFINER` (the owner is whoever
/// ran expand, who owns the tables): the lookup reads the parent's other key, which a role
/// allowed to write the child need not be allowed to read (column grants), and a write that
/// worked before the migration must keep working; PostgreSQL's own FK checks run as the
/// owner for the same reason. The fixed `search_path` keeps the invoker's from changing what
/// the function's names mean (every name in it is qualified anyway).
pub fn function_sql(
    plan: &Plan,
    schema: &str,
    table: &str,
    fks: &[&PlanFk],
    p: Physical,
) -> String {
    let mut ins = String::new();
    let mut upd = String::new();
    for f in fks {
        let n = names(plan, f, p);
        let (i, u) = (&n.int, &n.uuid);
        let to_uuid = lookup(f, &n, true);
        let to_int = lookup(f, &n, false);
        let (check, check_back) = match p {
            Physical::Integer => (String::new(), missing_parent(f, &n, true)),
            Physical::Uuid => (missing_parent(f, &n, false), String::new()),
        };
        ins.push_str(&format!(
            "
    IF NEW.{u} IS NULL AND NEW.{i} IS NOT NULL THEN
      NEW.{u} := {to_uuid};{check}
    ELSIF NEW.{i} IS NULL AND NEW.{u} IS NOT NULL THEN
      NEW.{i} := {to_int};{check_back}
    END IF;"
        ));
        match p {
            Physical::Integer => upd.push_str(&format!(
                "
    IF NEW.{i} IS DISTINCT FROM OLD.{i} AND NEW.{u} IS NOT DISTINCT FROM OLD.{u} THEN
      NEW.{u} := {to_uuid};
    END IF;"
            )),
            Physical::Uuid => upd.push_str(&format!(
                "
    IF NEW.{u} IS DISTINCT FROM OLD.{u} AND NEW.{i} IS NOT DISTINCT FROM OLD.{i} THEN
      NEW.{i} := {to_int};
    ELSIF NEW.{i} IS DISTINCT FROM OLD.{i} AND NEW.{u} IS NULL AND NEW.{i} IS NOT NULL THEN
      NEW.{u} := {to_uuid};{check}
    END IF;"
            )),
        }
    }
    format!(
        "CREATE OR REPLACE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $ks$
-- keyshift: fills the twin of {rel}'s FK columns for writes the proxy did not rewrite
-- (src/migrate/fill.rs). Enabled while the tables are in the {tag} shape.
BEGIN
  IF TG_OP = 'INSERT' THEN{ins}
  ELSE{upd}
  END IF;
  RETURN NEW;
END $ks$",
        name = function_name(schema, table, p),
        rel = qualified(schema, table),
        tag = p.tag(),
    )
}

/// The `WHEN` of a phase's triggers, in the names the columns have at expand (the integer
/// shape): it binds columns by number, so it holds after the swap's renames.
fn when(fks: &[&PlanFk], p: Physical, update: bool) -> String {
    let parts: Vec<String> = fks
        .iter()
        .map(|f| {
            let (i, u) = (quote(&f.child_column), quote(&f.uuid_column));
            match (update, p) {
                (false, _) => format!("(NEW.{i} IS NULL) <> (NEW.{u} IS NULL)"),
                (true, Physical::Integer) => format!(
                    "(NEW.{i} IS DISTINCT FROM OLD.{i} AND NEW.{u} IS NOT DISTINCT FROM OLD.{u})"
                ),
                (true, Physical::Uuid) => format!(
                    "(NEW.{u} IS DISTINCT FROM OLD.{u} AND NEW.{i} IS NOT DISTINCT FROM OLD.{i}) \
OR (NEW.{i} IS DISTINCT FROM OLD.{i} AND NEW.{u} IS NULL AND NEW.{i} IS NOT NULL)"
                ),
            }
        })
        .collect();
    parts.join(" OR ")
}

/// The statement that enables `p`'s pair of triggers on a child and disables the other's.
pub fn enable_sql(schema: &str, table: &str, p: Physical) -> String {
    let other = match p {
        Physical::Integer => Physical::Uuid,
        Physical::Uuid => Physical::Integer,
    };
    format!(
        "ALTER TABLE {} DISABLE TRIGGER {}, DISABLE TRIGGER {}, ENABLE ALWAYS TRIGGER {}, ENABLE ALWAYS TRIGGER {}",
        qualified(schema, table),
        trigger_name(other, false),
        trigger_name(other, true),
        trigger_name(p, false),
        trigger_name(p, true),
    )
}

/// expand: both functions of every child, then its four triggers with the integer pair
/// enabled, in one transaction per child (brief SHARE ROW EXCLUSIVE lock).
pub fn create(plan: &Plan) -> Vec<Step> {
    let mut v = Vec::new();
    for (schema, table, fks) in children(plan) {
        for p in [Physical::Integer, Physical::Uuid] {
            v.push(Step {
                sql: function_sql(plan, schema, table, &fks, p),
                mode: Mode::State,
                when: When::Always,
            });
        }
        let rel = qualified(schema, table);
        let cols: Vec<String> = fks
            .iter()
            .flat_map(|f| [quote(&f.child_column), quote(&f.uuid_column)])
            .map(|c| c.into_owned())
            .collect();
        let mut sql = String::new();
        for t in all_triggers() {
            sql.push_str(&format!("DROP TRIGGER IF EXISTS {} ON {rel}; ", quote(&t)));
        }
        for p in [Physical::Integer, Physical::Uuid] {
            let f = function_name(schema, table, p);
            sql.push_str(&format!(
                "CREATE TRIGGER {} BEFORE INSERT ON {rel} FOR EACH ROW WHEN ({}) EXECUTE FUNCTION {f}(); ",
                trigger_name(p, false),
                when(&fks, p, false),
            ));
            sql.push_str(&format!(
                "CREATE TRIGGER {} BEFORE UPDATE OF {} ON {rel} FOR EACH ROW WHEN ({}) EXECUTE FUNCTION {f}(); ",
                trigger_name(p, true),
                cols.join(", "),
                when(&fks, p, true),
            ));
        }
        sql.push_str(&enable_sql(schema, table, Physical::Integer));
        v.push(Step {
            sql,
            mode: Mode::Brief,
            when: When::TriggersMissing {
                schema: schema.to_string(),
                table: table.to_string(),
                names: all_triggers(),
            },
        });
    }
    v
}

/// The swap's statements that make `p`'s triggers the enabled ones (catalog-only).
pub fn switch(plan: &Plan, p: Physical) -> Vec<String> {
    children(plan)
        .into_iter()
        .map(|(schema, table, _)| enable_sql(schema, table, p))
        .collect()
}

/// finalize and abort: the triggers (before the columns they watch), then the functions.
pub fn drop(plan: &Plan) -> Vec<Step> {
    let mut v = Vec::new();
    for (schema, table, _) in children(plan) {
        let rel = qualified(schema, table);
        let sql = all_triggers()
            .iter()
            .map(|t| format!("DROP TRIGGER IF EXISTS {} ON {rel}", quote(t)))
            .collect::<Vec<_>>()
            .join("; ");
        v.push(Step {
            sql,
            mode: Mode::Brief,
            when: When::TriggersPresent {
                schema: schema.to_string(),
                table: table.to_string(),
                names: all_triggers(),
            },
        });
        for p in [Physical::Integer, Physical::Uuid] {
            v.push(Step {
                sql: format!(
                    "DROP FUNCTION IF EXISTS {}()",
                    function_name(schema, table, p)
                ),
                mode: Mode::State,
                when: When::Always,
            });
        }
    }
    v
}

/// The pair of triggers that must be enabled in `phase`, if any. `None` too while a cutover
/// swaps table by table (`cutting_over`): each child's pair switches in its own swap.
pub fn expected(phase: super::state::Phase) -> Option<Physical> {
    use super::state::{DualWrite, Phase};
    if phase == Phase::CuttingOver {
        return None;
    }
    match phase.dual_write() {
        DualWrite::Forward => Some(Physical::Integer),
        DualWrite::Reverse => Some(Physical::Uuid),
        DualWrite::Off => None,
    }
}

/// Every child (`schema.table`) and whether its fill triggers for `phase` are missing or
/// not `ENABLE ALWAYS` (writes that bypass the proxy there leave a side unfilled).
pub async fn off(
    client: &tokio_postgres::Client,
    plan: &Plan,
    phase: super::state::Phase,
) -> Result<Vec<(String, bool)>, tokio_postgres::Error> {
    let Some(p) = expected(phase) else {
        return Ok(Vec::new());
    };
    let names = vec![trigger_name(p, false), trigger_name(p, true)];
    let rows = client
        .query(
            "SELECT n.nspname::text, c.relname::text FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE t.tgname = ANY($1) AND t.tgenabled = 'A' GROUP BY 1, 2 HAVING count(*) = 2",
            &[&names],
        )
        .await?;
    let on: std::collections::HashSet<(String, String)> =
        rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    Ok(children(plan)
        .into_iter()
        .map(|(s, t, _)| {
            (
                format!("{s}.{t}"),
                !on.contains(&(s.to_string(), t.to_string())),
            )
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trigger_names_sort_after_application_triggers_and_fit() {
        for p in [Physical::Integer, Physical::Uuid] {
            for u in [false, true] {
                let n = trigger_name(p, u);
                assert!(n.starts_with("zz_") && n.len() <= 63, "{n}");
            }
        }
        let f = function_name("s", &"x".repeat(80), Physical::Uuid);
        assert!(f.len() <= "keyshift.".len() + 65, "{f}");
        assert_ne!(
            function_name("a", "b", Physical::Integer),
            function_name("a", "b", Physical::Uuid)
        );
    }

    #[test]
    fn enable_switches_the_pair_in_one_statement() {
        assert_eq!(
            enable_sql("public", "c", Physical::Uuid),
            "ALTER TABLE public.c DISABLE TRIGGER zz_keyshift_fill_integer_ins, DISABLE TRIGGER zz_keyshift_fill_integer_upd, \
ENABLE ALWAYS TRIGGER zz_keyshift_fill_uuid_ins, ENABLE ALWAYS TRIGGER zz_keyshift_fill_uuid_upd"
        );
    }
}
