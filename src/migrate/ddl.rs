//! The SQL of every phase, generated from a [`Plan`] alone (pure). The commands run exactly
//! these steps, and `keyshift plan --sql` prints them, so what the operator reviews is what runs.
//!
//! Each [`Step`] says how it must be run ([`Mode`]) and when it is still needed ([`When`]):
//! the executor checks the condition first, which makes every phase idempotent without taking
//! a lock for a step that has nothing left to do.

use std::fmt::Write as _;

use serde::Serialize;

use super::fill::{self, Physical};
use super::plan::{Plan, PlanFk, PlanIndex, PlanTable};
use super::{carry, mirror, partitions, state, views};
use crate::ident::{literal, qualified, quote};
use crate::shape::Shape;

/// How a step is run, which is also what it locks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Takes a lock that conflicts with reads or writes (ACCESS EXCLUSIVE, SHARE ROW EXCLUSIVE)
    /// for a catalog-only change: run under `lock_timeout`, retried with backoff, so that it
    /// never waits in the queue while blocking everyone behind it.
    Brief,
    /// Takes at most SHARE UPDATE EXCLUSIVE, which does not conflict with reads or writes
    /// (CREATE INDEX CONCURRENTLY, VALIDATE CONSTRAINT): may wait as long as it needs.
    Online,
    /// keyshift's own schema and state; touches no application table.
    State,
    /// Part of the cutover or rollback swap: runs inside one transaction, with traffic paused.
    Swap,
}

impl Mode {
    pub fn describe(self) -> &'static str {
        match self {
            Mode::Brief => "brief lock, under lock_timeout with retry",
            Mode::Online => "does not block reads or writes",
            Mode::State => "keyshift's own state",
            Mode::Swap => "inside the swap transaction",
        }
    }
}

/// When a step still has work to do. Evaluated against the live catalog by the executor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "if", rename_all = "snake_case")]
pub enum When {
    Always,
    ColumnMissing {
        schema: String,
        table: String,
        column: String,
    },
    ColumnPresent {
        schema: String,
        table: String,
        column: String,
    },
    DefaultMissing {
        schema: String,
        table: String,
        column: String,
    },
    /// The index is missing or INVALID (an interrupted concurrent build); the executor drops
    /// an INVALID one before running the step.
    IndexNotValid {
        schema: String,
        name: String,
    },
    IndexPresent {
        schema: String,
        name: String,
    },
    /// A table or view (`schema.name`, as `to_regclass` reads it) does not exist.
    RelationMissing {
        name: String,
    },
    ConstraintMissing {
        schema: String,
        table: String,
        name: String,
    },
    ConstraintPresent {
        schema: String,
        table: String,
        name: String,
    },
    ConstraintNotValidated {
        schema: String,
        table: String,
        name: String,
    },
    /// Index `name` (of `schema`) exists and was built before index `than` (a lower OID),
    /// so that PostgreSQL would bind a new FK on their column to it. The executor first
    /// drops the INVALID copies an interrupted `REINDEX CONCURRENTLY` of `name` left.
    IndexOlderThan {
        schema: String,
        name: String,
        than: String,
    },
    /// Column `to` lacks a privilege, the comment or the statistics target column `from` has
    /// ([`super::mirror`]).
    MirrorNeeded {
        schema: String,
        table: String,
        from: String,
        to: String,
    },
    /// One of these triggers of `schema.table` does not exist.
    TriggersMissing {
        schema: String,
        table: String,
        names: Vec<String>,
    },
    /// One of these triggers of `schema.table` exists.
    TriggersPresent {
        schema: String,
        table: String,
        names: Vec<String>,
    },
    /// Some view of the application reads one of these columns (`[schema, table, column]`
    /// as JSON, [`super::carry`]).
    CarriedViews {
        columns: String,
    },
    /// The step is `op` run on each leaf partition of the partitioned table `schema.table`,
    /// each leaf's statements with their own conditions ([`partitions::run`]); its `sql`
    /// shows them with `{leaf}` for each partition.
    EachLeaf {
        schema: String,
        table: String,
        op: partitions::LeafOp,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Step {
    pub sql: String,
    pub mode: Mode,
    pub when: When,
}

impl Step {
    pub(super) fn new(sql: String, mode: Mode, when: When) -> Step {
        Step { sql, mode, when }
    }
}

fn col_when(schema: &str, table: &str, column: &str) -> (String, String, String) {
    (schema.to_string(), table.to_string(), column.to_string())
}

/// The expression that generates a new key.
pub fn uuid_generator(plan: &Plan) -> &'static str {
    if plan.uuid_version == 4 {
        "gen_random_uuid()"
    } else {
        "keyshift.uuid_v7()"
    }
}

fn tbl(t: &PlanTable) -> String {
    qualified(&t.schema, &t.name)
}

/// How `keyshift.id_map` and the mapping endpoints name a table: `schema.name`, unquoted.
pub fn map_name(t: &PlanTable) -> String {
    format!("{}.{}", t.schema, t.name)
}

/// The type of `keyshift.id_map.legacy_id`: the key type when every table shares it, so that
/// `legacy_id = $1` reaches each table's key index; `bigint` for a mix (a cast of an `integer`
/// key cannot use its index: docs/limitations.md).
fn map_legacy_type(plan: &Plan) -> Option<&str> {
    let first = plan.tables.first()?.key_type.as_str();
    plan.tables
        .iter()
        .all(|t| t.key_type == first)
        .then_some(first)
}

/// `keyshift.id_map (table_name, legacy_id, uuid)` over every migrated table, from (`{key}`,
/// `{key}_uuid`); a view binds columns by number, so after cutover it reads (`{key}_legacy`,
/// `{key}`) with no change, and the swaps leave it alone. One branch per table
/// with a constant `table_name`, so that a lookup naming the table plans only that branch.
pub fn id_map_view(plan: &Plan) -> String {
    let uniform = map_legacy_type(plan).is_some();
    let branches: Vec<String> = plan
        .tables
        .iter()
        .map(|t| {
            let (legacy, uuid) = (&t.key, &t.uuid_column);
            let legacy = if uniform {
                quote(legacy).into_owned()
            } else {
                format!("{}::bigint", quote(legacy))
            };
            format!(
                "SELECT {}::text AS table_name, {legacy} AS legacy_id, {} AS uuid FROM {}",
                literal(&map_name(t)),
                quote(uuid),
                tbl(t)
            )
        })
        .collect();
    if branches.is_empty() {
        return String::new();
    }
    format!(
        "CREATE OR REPLACE VIEW keyshift.id_map AS\n{}",
        branches.join("\nUNION ALL\n")
    )
}

fn id_map_step(plan: &Plan) -> Option<Step> {
    let sql = id_map_view(plan);
    // Online, not State: it runs after the columns it reads exist (expand runs State steps
    // first); creating a view takes only ACCESS SHARE on the tables.
    (!sql.is_empty()).then(|| {
        Step::new(
            sql,
            Mode::Online,
            When::RelationMissing {
                name: "keyshift.id_map".into(),
            },
        )
    })
}

fn child(f: &PlanFk) -> String {
    qualified(&f.child_schema, &f.child_table)
}

fn parent(f: &PlanFk) -> String {
    qualified(&f.parent_schema, &f.parent_table)
}

/// expand: state schema, then the uuid columns with no default (catalog-only), then the
/// default, then keyshift's views of each table in each shape ([`views`]).
pub fn expand(plan: &Plan) -> Vec<Step> {
    let mut v = vec![Step::new(state::schema_sql(), Mode::State, When::Always)];
    v.push(Step::new(state::uuid_v7_sql(), Mode::State, When::Always));
    v.push(Step::new(views::function_sql(), Mode::State, When::Always));
    v.push(Step::new(mirror::function_sql(), Mode::State, When::Always));
    for t in &plan.tables {
        let (s, n, c) = col_when(&t.schema, &t.name, &t.uuid_column);
        v.push(Step::new(
            format!(
                "ALTER TABLE {} ADD COLUMN {} uuid",
                tbl(t),
                quote(&t.uuid_column)
            ),
            Mode::Brief,
            When::ColumnMissing {
                schema: s.clone(),
                table: n.clone(),
                column: c.clone(),
            },
        ));
        v.push(Step::new(
            format!(
                "ALTER TABLE {} ALTER COLUMN {} SET DEFAULT {}",
                tbl(t),
                quote(&t.uuid_column),
                uuid_generator(plan)
            ),
            Mode::Brief,
            When::DefaultMissing {
                schema: s,
                table: n,
                column: c,
            },
        ));
    }
    for (_, f) in plan.foreign_keys() {
        let (s, n, c) = col_when(&f.child_schema, &f.child_table, &f.uuid_column);
        v.push(Step::new(
            format!(
                "ALTER TABLE {} ADD COLUMN {} uuid",
                child(f),
                quote(&f.uuid_column)
            ),
            Mode::Brief,
            When::ColumnMissing {
                schema: s,
                table: n,
                column: c,
            },
        ));
    }
    // Column privileges, comments and statistics targets, onto the twins.
    v.extend(mirror::steps(plan));
    // A view lists every column of its table, the uuid twins included: after them.
    v.extend(views::create(plan));
    // The fill triggers watch the twins, and look parents up through the integer-shape
    // views: after both, or a write that fires one would find no view.
    v.extend(fill::create(plan));
    v.extend(id_map_step(plan));
    // Then the application's views over them, in each shape.
    v.extend(carry::at_expand(plan));
    v
}

/// The next batch's bounds along an integer key: `$1` the cursor (last key done), `$2` the
/// batch size; returns the batch's last key (NULL when no row is left) and its row count.
/// Known bounds give the batch statement exact estimates, hence an index range scan.
pub fn key_bounds(table: &str, key: &str) -> String {
    let k = quote(key);
    format!(
        "SELECT max(k)::bigint, count(*) FROM (SELECT {k} AS k FROM {table} WHERE {k} > $1::bigint ORDER BY {k} LIMIT $2::bigint) s"
    )
}

/// The next batch of heap pages for a child without an integer key: `$1` the first page,
/// `$2` pages per batch; returns the last page (NULL past the end) and the rows in them.
pub fn ctid_bounds(table: &str) -> String {
    format!(
        "SELECT CASE WHEN $1::bigint >= pg_relation_size({rel}) / current_setting('block_size')::bigint \
THEN NULL ELSE $1::bigint + $2::bigint - 1 END, \
(SELECT count(*) FROM {table} AS c WHERE {range})",
        rel = literal(table) + "::regclass",
        range = CTID_RANGE,
    )
}

/// The span a task batched along `key` covers: its first and last key (NULLs when empty).
/// Read once when the task starts, from the index's two ends; the backfill corrects its
/// estimate of the rows left with it ([`super::eta::remaining_along_key`]). Rows inserted
/// later get their uuid from the column default and need no batch.
pub fn key_span(table: &str, key: &str) -> String {
    let k = quote(key);
    format!("SELECT min({k})::bigint, max({k})::bigint FROM {table}")
}

/// The span of a task batched by ctid pages: page 0 to the last page, as of now.
pub fn ctid_span(table: &str) -> String {
    format!(
        "SELECT 0::bigint, pg_relation_size({rel}) / current_setting('block_size')::bigint - 1",
        rel = literal(table) + "::regclass",
    )
}

/// The span query of an FK task: `key_span` or `ctid_span`.
pub fn fk_span(f: &PlanFk) -> String {
    match &f.child_batch_key {
        Some(ck) => key_span(&child(f), ck),
        None => ctid_span(&child(f)),
    }
}

const CTID_RANGE: &str = "c.ctid >= format('(%s,0)', $1::bigint)::tid AND c.ctid < format('(%s,0)', $2::bigint + 1)::tid";

/// The bounds query of a backfill task: `key_bounds` or `ctid_bounds`.
pub fn fk_bounds(f: &PlanFk) -> String {
    match &f.child_batch_key {
        Some(ck) => key_bounds(&child(f), ck),
        None => ctid_bounds(&child(f)),
    }
}

/// One batch filling the key uuids of `t` (and the twins of [`fused_fks`]): `$1` the cursor,
/// `$2` the batch's last key, `$3` the task, `$4` the batch's row count. One statement, so
/// the rows and the saved cursor commit together: a kill at any moment loses or repeats nothing.
pub fn key_batch(plan: &Plan, t: &PlanTable) -> String {
    let k = quote(&t.key);
    let u = quote(&t.uuid_column);
    let mut set = format!("{u} = {}", uuid_generator(plan));
    for f in fused_fks(plan, t) {
        let _ = write!(
            set,
            ", {} = {}",
            quote(&f.uuid_column),
            parent_uuid_of(f, "t")
        );
    }
    format!(
        "WITH upd AS (UPDATE {tb} AS t SET {set} WHERE t.{k} > $1::bigint AND t.{k} <= $2::bigint AND t.{u} IS NULL RETURNING 1), \
{CURSOR_CTE} \
SELECT (SELECT count(*) FROM upd), (SELECT count(*) FROM cur)",
        tb = tbl(t),
    )
}

/// Saves the cursor in the batch's own statement, only if it is still the one the batch started
/// from (`$5`): the last statement of a killed run can still commit after a new run read the
/// cursor; the new run's batch then counts nothing and re-reads the cursor.
const CURSOR_CTE: &str = "cur AS (UPDATE keyshift.backfill SET cursor = $2::bigint, \
rows_done = rows_done + $4::bigint, rows_updated = rows_updated + (SELECT count(*) FROM upd), \
batches = batches + 1, updated_at = clock_timestamp() WHERE task = $3 AND cursor IS NOT DISTINCT FROM $5::bigint RETURNING 1)";

/// FKs of `t` whose parent comes strictly earlier in the plan: the parent's key pass is done
/// by the time `t`'s runs, so `t`'s key pass fills their twins in the same write. One row
/// version instead of two, for every child that is itself migrated.
pub fn fused_fks<'a>(plan: &'a Plan, t: &PlanTable) -> Vec<&'a PlanFk> {
    let pos = |schema: &str, name: &str| {
        plan.tables
            .iter()
            .position(|x| x.schema == schema && x.name == name)
    };
    let Some(me) = pos(&t.schema, &t.name) else {
        return Vec::new();
    };
    plan.foreign_keys()
        .map(|(_, f)| f)
        .filter(|f| f.child_schema == t.schema && f.child_table == t.name)
        .filter(|f| pos(&f.parent_schema, &f.parent_table).is_some_and(|p| p < me))
        .collect()
}

/// Whether `f`'s twin is filled by its child's key pass.
pub fn is_fused(plan: &Plan, f: &PlanFk) -> bool {
    plan.table(&f.child_schema, &f.child_table)
        .is_some_and(|t| {
            fused_fks(plan, t)
                .iter()
                .any(|x| x.constraint == f.constraint)
        })
}

/// One direction of an FK's twin columns, as named in the phase it runs in: which child
/// column is filled (`twin`) from which parent column (`value`), following which link
/// (`link` = parent `parent_key`), and the child's integer key to batch along (`None`: ctid).
/// Before cutover the uuid twin is filled through the integer FK ([`Twin::uuid_side`]);
/// after it, the legacy integer through the uuid FK ([`Twin::legacy_side`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Twin {
    pub batch_key: Option<String>,
    pub link: String,
    pub parent_key: String,
    pub twin: String,
    pub value: String,
}

impl Twin {
    /// Before cutover: `<fk>_uuid` from the parent's `<key>_uuid`, through the integer FK.
    pub fn uuid_side(f: &PlanFk) -> Twin {
        Twin {
            batch_key: f.child_batch_key.clone(),
            link: f.child_column.clone(),
            parent_key: f.parent_key.clone(),
            twin: f.uuid_column.clone(),
            value: f.parent_uuid_column.clone(),
        }
    }

    /// After cutover: `<fk>_legacy` from the parent's `<key>_legacy`, through the uuid FK
    /// (which has taken the FK's name, as the parent's uuid has taken the key's).
    pub fn legacy_side(plan: &Plan, f: &PlanFk) -> Twin {
        Twin {
            batch_key: child_batch_key_after_cutover(plan, f),
            link: f.child_column.clone(),
            parent_key: f.parent_key.clone(),
            twin: f.legacy_column.clone(),
            value: legacy_of(plan, f),
        }
    }

    /// The parent's value for the child row `alias`, NULL when the link is NULL.
    fn lookup(&self, f: &PlanFk, alias: &str) -> String {
        format!(
            "(SELECT p.{v} FROM {p} AS p WHERE p.{pk} = {alias}.{l})",
            v = quote(&self.value),
            p = parent(f),
            pk = quote(&self.parent_key),
            l = quote(&self.link),
        )
    }

    /// How a row found by [`Twin::find`] is named: its integer key, else its ctid, as text.
    fn row_key(&self) -> String {
        match &self.batch_key {
            Some(k) => format!("c.{}", quote(k)),
            None => "c.ctid".into(),
        }
    }

    /// The catch-up's search: keys (as text) of the rows whose twin differs from the
    /// parent's value. `$1` caps the count. One read-only hash join of child and parent.
    pub fn find(&self, f: &PlanFk) -> String {
        format!(
            "SELECT {key}::text FROM {c} AS c LEFT JOIN {p} AS p ON p.{pk} = c.{l} \
WHERE c.{t} IS DISTINCT FROM p.{v} LIMIT $1::bigint",
            key = self.row_key(),
            c = child(f),
            p = parent(f),
            pk = quote(&self.parent_key),
            l = quote(&self.link),
            t = quote(&self.twin),
            v = quote(&self.value),
        )
    }

    /// The catch-up's fix for the rows found (`$1`, keys as text), re-checked row by row.
    pub fn fix(&self, f: &PlanFk) -> String {
        let which = match &self.batch_key {
            Some(k) => format!("c.{} = ANY($1::text[]::bigint[])", quote(k)),
            None => "c.ctid = ANY($1::text[]::tid[])".into(),
        };
        let t = quote(&self.twin);
        let v = self.lookup(f, "c");
        format!(
            "UPDATE {c} AS c SET {t} = {v} WHERE {which} AND c.{t} IS DISTINCT FROM {v}",
            c = child(f)
        )
    }

    /// Inside a swap, for a nullable FK: twins still NULL whose link is not (writes that
    /// bypassed the proxy since the last catch-up).
    fn swap_catchup(&self, f: &PlanFk) -> String {
        format!(
            "UPDATE {c} AS c SET {t} = {v} WHERE c.{t} IS NULL AND c.{l} IS NOT NULL",
            c = child(f),
            t = quote(&self.twin),
            v = self.lookup(f, "c"),
            l = quote(&self.link),
        )
    }
}

/// The child's integer key after cutover: a child that is itself migrated has had that key
/// renamed to its legacy column; any other keeps it.
pub fn child_batch_key_after_cutover(plan: &Plan, f: &PlanFk) -> Option<String> {
    let k = f.child_batch_key.as_ref()?;
    Some(match plan.table(&f.child_schema, &f.child_table) {
        Some(t) if &t.key == k => t.legacy_column.clone(),
        _ => k.clone(),
    })
}

/// The parent's uuid for the child row `c`, NULL when the FK is NULL.
fn parent_uuid(f: &PlanFk) -> String {
    parent_uuid_of(f, "c")
}

fn parent_uuid_of(f: &PlanFk, alias: &str) -> String {
    Twin::uuid_side(f).lookup(f, alias)
}

/// One batch setting `<fk>_uuid` to the parent's uuid, along the child's integer key (or its
/// ctid pages when it has none), parameters as [`key_batch`]. Only rows whose twin differs are
/// written, so a rerun writes nothing, and rows already fixed by a concurrent dual-write are
/// left alone. The parent is looked up per row (a SubPlan on its key): a plan that cannot turn
/// into a hash join over the whole parent for every batch.
pub fn fk_batch(f: &PlanFk) -> String {
    let fu = quote(&f.uuid_column);
    let range = match &f.child_batch_key {
        Some(ck) => {
            let ck = quote(ck);
            format!("c.{ck} > $1::bigint AND c.{ck} <= $2::bigint")
        }
        None => CTID_RANGE.to_string(),
    };
    let pu = parent_uuid(f);
    format!(
        "WITH upd AS (UPDATE {c} AS c SET {fu} = {pu} WHERE {range} AND c.{fu} IS DISTINCT FROM {pu} RETURNING 1), \
{CURSOR_CTE} \
SELECT (SELECT count(*) FROM upd), (SELECT count(*) FROM cur)",
        c = child(f),
    )
}

/// The catch-up pass's search: keys (as text; ctids for a child without an integer key) of
/// the rows whose twin differs from the parent's uuid. `$1` caps the count.
pub fn catchup_find(f: &PlanFk) -> String {
    Twin::uuid_side(f).find(f)
}

/// The catch-up pass's fix for the rows found (`$1`, keys as text), re-checked row by row.
pub fn catchup_fix(f: &PlanFk) -> String {
    Twin::uuid_side(f).fix(f)
}

/// After cutover, the catch-up in reverse: keys of the rows whose `<fk>_legacy` differs from
/// the parent's `<key>_legacy`, looked up through the uuid FK. `$1` caps the count.
pub fn legacy_catchup_find(plan: &Plan, f: &PlanFk) -> String {
    Twin::legacy_side(plan, f).find(f)
}

/// After cutover: sets `<fk>_legacy` of the rows found (`$1`, keys as text) to the parent's
/// `<key>_legacy`, re-checked row by row.
pub fn legacy_catchup_fix(plan: &Plan, f: &PlanFk) -> String {
    Twin::legacy_side(plan, f).fix(f)
}

/// After cutover, legacy keys still NULL get one from the column's default (the original
/// sequence or identity), in batches of `$1`; returns the rows written and how many of them
/// got a value. `None` for a key with no generator: there is nothing to fill it from.
///
/// On PostgreSQL 13 to 17 this finds nothing: dropping the primary key at cutover leaves
/// the column NOT NULL, so only an operator's `DROP NOT NULL` makes such rows possible. The
/// search is served by harden's unique index on the legacy key (btree indexes NULLs).
pub fn legacy_key_catchup(t: &PlanTable) -> Option<String> {
    if t.key_kind == "plain" {
        return None;
    }
    let k = quote(&t.key);
    let l = quote(&t.legacy_column);
    Some(format!(
        "WITH upd AS (UPDATE {tb} SET {l} = DEFAULT WHERE {k} IN (SELECT {k} FROM {tb} WHERE {l} IS NULL LIMIT $1::bigint) RETURNING {l}) \
SELECT count(*), count({l}) FROM upd",
        tb = tbl(t),
    ))
}

/// `keyshift backfill` after cutover, as `plan --sql` shows it: legacy keys, then the reverse
/// catch-up of every FK (find, then fix in batches).
pub fn legacy_backfill(plan: &Plan) -> Vec<Step> {
    let mut v: Vec<Step> = plan
        .tables
        .iter()
        .filter_map(legacy_key_catchup)
        .map(|sql| Step::new(sql, Mode::Online, When::Always))
        .collect();
    for (_, f) in plan.foreign_keys() {
        v.push(Step::new(
            leafwise(f, legacy_catchup_find(plan, f)),
            Mode::Online,
            When::Always,
        ));
        v.push(Step::new(
            legacy_catchup_fix(plan, f),
            Mode::Online,
            When::Always,
        ));
    }
    v
}

/// Key uuids still NULL (written with an explicit NULL, or by a path that skipped the
/// default): one read-only scan finds their keys (`$1` caps the count), then
/// [`key_catchup_fix`] fills them in batches. A search per batch (`WHERE k IN (SELECT k …
/// WHERE u IS NULL LIMIT n)`, as before) read the table again from page 0 each time, past
/// every row already fixed: quadratic in the rows to fix.
pub fn key_catchup(t: &PlanTable) -> String {
    format!(
        "SELECT {k}::bigint FROM {tb} WHERE {u} IS NULL LIMIT $1::bigint",
        k = quote(&t.key),
        u = quote(&t.uuid_column),
        tb = tbl(t),
    )
}

/// The keys found by [`key_catchup`] (`$1`, one batch) get a uuid, re-checked row by row.
pub fn key_catchup_fix(plan: &Plan, t: &PlanTable) -> String {
    let k = quote(&t.key);
    let u = quote(&t.uuid_column);
    format!(
        "UPDATE {tb} SET {u} = {g} WHERE {k} = ANY($1::bigint[]) AND {u} IS NULL",
        tb = tbl(t),
        g = uuid_generator(plan),
    )
}

/// The backfill as `plan --sql` shows it (the executor binds the parameters).
pub fn backfill(plan: &Plan) -> Vec<Step> {
    let mut v = Vec::new();
    for t in &plan.tables {
        v.push(Step::new(
            key_bounds(&tbl(t), &t.key),
            Mode::Online,
            When::Always,
        ));
        v.push(Step::new(key_batch(plan, t), Mode::Online, When::Always));
    }
    for t in &plan.tables {
        v.push(Step::new(key_catchup(t), Mode::Online, When::Always));
        v.push(Step::new(
            key_catchup_fix(plan, t),
            Mode::Online,
            When::Always,
        ));
    }
    for (_, f) in plan.foreign_keys().filter(|(_, f)| !is_fused(plan, f)) {
        v.push(Step::new(
            leafwise(f, fk_bounds(f)),
            Mode::Online,
            When::Always,
        ));
        v.push(Step::new(fk_batch(f), Mode::Online, When::Always));
    }
    // The catch-up pass: find the rows whose twin differs, then fix them in batches.
    for (_, f) in plan.foreign_keys() {
        v.push(Step::new(
            leafwise(f, catchup_find(f)),
            Mode::Online,
            When::Always,
        ));
        v.push(Step::new(catchup_fix(f), Mode::Online, When::Always));
    }
    v
}

/// As `plan --sql` shows a scan of a partitioned child, which runs on each leaf partition in
/// its place ([`partitions::expand_fks`]): ctids and batches are per partition.
fn leafwise(f: &PlanFk, sql: String) -> String {
    if f.child_partitioned {
        format!(
            "-- on each leaf partition of {c} in place of {c} (the statements up to the next comment):\n{sql}",
            c = child(f)
        )
    } else {
        sql
    }
}

/// The mirror of an index on an FK column, on its uuid twin.
pub fn mirror_index(f: &PlanFk, i: &PlanIndex) -> String {
    format!(
        "CREATE {}INDEX CONCURRENTLY {} ON {} {}",
        if i.unique { "UNIQUE " } else { "" },
        quote(&i.uuid_name),
        child(f),
        mirror_definition(f, i)
    )
}

/// The mirror's `USING method (columns) INCLUDE (…) WHERE …`, the FK column replaced by its
/// twin.
fn mirror_definition(f: &PlanFk, i: &PlanIndex) -> String {
    let cols: Vec<String> = i
        .key_columns
        .iter()
        .enumerate()
        .map(|(n, c)| {
            let c = if n == i.fk_position {
                quote(&f.uuid_column).into_owned()
            } else {
                c.clone()
            };
            match i.key_options.get(n).filter(|o| !o.is_empty()) {
                Some(o) => format!("{c} {o}"),
                None => c,
            }
        })
        .collect();
    let mut s = format!("USING {} ({})", i.method, cols.join(", "));
    if !i.include_columns.is_empty() {
        let _ = write!(s, " INCLUDE ({})", i.include_columns.join(", "));
    }
    if let Some(p) = &i.predicate {
        let _ = write!(s, " WHERE {p}");
    }
    s
}

/// `ADD CONSTRAINT … FOREIGN KEY … NOT VALID` (a brief step), the parent's lock taken first,
/// in the order applications take them (a parent row, then its children, in one
/// transaction). ADD FOREIGN KEY alone locks the child, then waits for the parent while
/// such a transaction, holding the parent, waits for the child: a lock cycle that
/// lock_timeout breaks at every retry as long as that traffic flows, so the step never got
/// through under load. Sent as one query, the two statements are one implicit transaction.
/// Same lock modes as before: ADD FOREIGN KEY takes SHARE ROW EXCLUSIVE on the parent too.
fn add_fk_not_valid(f: &PlanFk, name: &str, clause: &str) -> String {
    format!(
        "LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE; ALTER TABLE {} ADD CONSTRAINT {} {clause} NOT VALID",
        parent(f),
        child(f),
        quote(name)
    )
}

/// An FK added `NOT VALID` by `add` (a brief step), then validated (online).
fn fk_steps(f: &PlanFk, name: &str, add: String) -> [Step; 2] {
    let (s, n) = (f.child_schema.clone(), f.child_table.clone());
    [
        Step::new(
            add,
            Mode::Brief,
            When::ConstraintMissing {
                schema: s.clone(),
                table: n.clone(),
                name: name.into(),
            },
        ),
        Step::new(
            format!(
                "ALTER TABLE {} VALIDATE CONSTRAINT {}",
                child(f),
                quote(name)
            ),
            Mode::Online,
            When::ConstraintNotValidated {
                schema: s,
                table: n,
                name: name.into(),
            },
        ),
    ]
}

/// The unique index on `column` that a swap can make `t`'s primary key: [`unique_index`]
/// `name`, or on a partitioned table one on (`column`, partition key) on each leaf partition,
/// named after the leaf and `name_column` ([`partitions::key_index_step`]).
fn key_index(t: &PlanTable, name_column: &str, name: &str, column: &str) -> Step {
    if t.partitioned() {
        partitions::key_index_step(t, name_column, column)
    } else {
        unique_index(t, name, column)
    }
}

/// Drops what [`key_index`] builds.
fn drop_key_index(t: &PlanTable, name_column: &str, name: &str) -> Step {
    if t.partitioned() {
        partitions::drop_key_index_step(t, name_column)
    } else {
        drop_index(&t.schema, name)
    }
}

/// `CREATE UNIQUE INDEX CONCURRENTLY name ON t (column)`, unless a valid one is there.
fn unique_index(t: &PlanTable, name: &str, column: &str) -> Step {
    Step::new(
        format!(
            "CREATE UNIQUE INDEX CONCURRENTLY {} ON {} ({})",
            quote(name),
            tbl(t),
            quote(column)
        ),
        Mode::Online,
        When::IndexNotValid {
            schema: t.schema.clone(),
            name: name.into(),
        },
    )
}

fn fk_clause(f: &PlanFk, column: &str, parent_column: &str) -> String {
    let mut s = format!(
        "FOREIGN KEY ({}) REFERENCES {} ({}) ON DELETE {} ON UPDATE {}",
        quote(column),
        parent(f),
        quote(parent_column),
        f.on_delete.sql(),
        f.on_update.sql()
    );
    if f.deferrable {
        s.push_str(" DEFERRABLE");
        if f.initially_deferred {
            s.push_str(" INITIALLY DEFERRED");
        }
    }
    s
}

/// harden: unique index on each key uuid and a spare one on each integer key, mirrored FK
/// indexes, NOT NULL CHECKs and shadow FKs, each constraint added NOT VALID (brief) then
/// VALIDATEd (online).
pub fn harden(plan: &Plan) -> Vec<Step> {
    let mut v = Vec::new();
    for t in &plan.tables {
        v.push(key_index(t, &t.uuid_column, &t.uuid_index, &t.uuid_column));
    }
    // A second unique index on the integer key: the swap drops the primary key's index, and
    // this one keeps the legacy column indexed after cutover, for the id mapping
    // (keyshift.id_map, /v1/map) and for a rollback, which promotes it back to primary key.
    for t in &plan.tables {
        v.push(key_index(t, &t.legacy_column, &legacy_key_index(t), &t.key));
    }
    for (_, f) in plan.foreign_keys() {
        for i in &f.indexes {
            if f.child_partitioned {
                v.extend(partitions::index_steps(
                    plan,
                    f,
                    i,
                    &mirror_definition(f, i),
                ));
                continue;
            }
            v.push(Step::new(
                mirror_index(f, i),
                Mode::Online,
                When::IndexNotValid {
                    schema: f.child_schema.clone(),
                    name: i.uuid_name.clone(),
                },
            ));
            // The mirror of a UNIQUE constraint's index is that constraint too (catalog-only:
            // the index is built), so that the swap's renames carry it as they carry the
            // original and the result reads as if written with uuid keys.
            if let Some(deferral) = &i.unique_constraint {
                v.push(Step::new(
                    format!(
                        "ALTER TABLE {} ADD CONSTRAINT {} UNIQUE USING INDEX {}{}",
                        child(f),
                        quote(&i.uuid_name),
                        quote(&i.uuid_name),
                        if deferral.is_empty() {
                            String::new()
                        } else {
                            format!(" {deferral}")
                        }
                    ),
                    Mode::Brief,
                    When::ConstraintMissing {
                        schema: f.child_schema.clone(),
                        table: f.child_table.clone(),
                        name: i.uuid_name.clone(),
                    },
                ));
            }
        }
    }
    for t in &plan.tables {
        v.extend(check_not_null(
            &t.schema,
            &t.name,
            &t.not_null_check,
            &t.uuid_column,
        ));
    }
    for (_, f) in plan.foreign_keys() {
        v.extend(build_fk(
            f,
            &f.shadow_constraint,
            &fk_clause(f, &f.uuid_column, &f.parent_uuid_column),
            None,
        ));
    }
    v
}

/// An FK `clause` named `name` on `f`'s child, added without a long lock: `NOT VALID`
/// (brief) then `VALIDATE` (online); on a partitioned child, leaf by leaf first
/// ([`partitions::fk_steps`]). With `bound_to` (an index of the parent, unqualified), the add
/// is refused unless PostgreSQL bound the constraint to that index ([`add_fk_not_valid_on`]).
fn build_fk(f: &PlanFk, name: &str, clause: &str, bound_to: Option<&str>) -> Vec<Step> {
    if f.child_partitioned {
        let index = bound_to.map(|i| qualified(&f.parent_schema, i));
        let check_index = index.clone().unwrap_or_default();
        return partitions::fk_steps(f, name, clause, index, |table| {
            fk_bound_check(table, name, &check_index)
        });
    }
    let add = match bound_to {
        Some(index) => add_fk_not_valid_on(f, name, clause, index),
        None => add_fk_not_valid(f, name, clause),
    };
    fk_steps(f, name, add).into()
}

fn check_not_null(schema: &str, table: &str, name: &str, column: &str) -> Vec<Step> {
    let t = qualified(schema, table);
    vec![
        Step::new(
            format!(
                "ALTER TABLE {t} ADD CONSTRAINT {} CHECK ({} IS NOT NULL) NOT VALID",
                quote(name),
                quote(column)
            ),
            Mode::Brief,
            When::ConstraintMissing {
                schema: schema.into(),
                table: table.into(),
                name: name.into(),
            },
        ),
        Step::new(
            format!("ALTER TABLE {t} VALIDATE CONSTRAINT {}", quote(name)),
            Mode::Online,
            When::ConstraintNotValidated {
                schema: schema.into(),
                table: table.into(),
                name: name.into(),
            },
        ),
    ]
}

pub(super) fn swap(sql: String) -> Step {
    Step::new(sql, Mode::Swap, When::Always)
}

/// The swap's `SET NOT NULL` of `column` of `table` (schema, name), proven by the validated
/// CHECK `check`, which then goes; on a partitioned table with the copies that partitions
/// attached since it was built must have of their own (PostgreSQL refuses the ATTACH
/// otherwise).
/// The swap's `SET NOT NULL` of the uuid key: proven by its validated CHECK, which stays
/// until [`after_cutover`] drops it once the pause is over.
fn set_not_null(t: &PlanTable) -> Step {
    swap(format!(
        "ALTER TABLE {} ALTER COLUMN {} SET NOT NULL",
        tbl(t),
        quote(&t.uuid_column)
    ))
}

/// Drops the NOT NULL proof `check` of `table` (and its copies on partitions attached with
/// their own), if there.
fn drop_not_null_check(table: (&str, &str), check: &str, partitioned: bool) -> Vec<Step> {
    let (schema, name) = table;
    let mut v = vec![drop_constraint(schema, name, check)];
    if partitioned {
        v.push(Step::new(
            partitions::drop_leaf_checks(schema, name, check),
            Mode::Brief,
            When::Always,
        ));
    }
    v
}

/// What a cutover leaves for after its pause, each with a brief lock of one table (issue
/// [scale]: at 300 tables these were about 80 ms of the pause, benches/cutover_tables.sh):
/// the NOT NULL of the NOT NULL FKs moved from the legacy integer to the uuid column that
/// now has the name (proven by its CHECK, which then goes), and the keys' NOT NULL proofs,
/// redundant under the primary key. Until then the CHECKs enforce the same as the NOT NULLs,
/// and the fill triggers give every legacy integer its value; rollback and finalize run
/// these first, so a cutover stopped in between leaves nothing behind. In phase cut_over
/// (names as after the swap).
pub fn after_cutover(plan: &Plan) -> Vec<Step> {
    let mut v = Vec::new();
    for (_, f) in plan.foreign_keys() {
        let Some(chk) = &f.not_null_check else {
            continue;
        };
        let mut sql = format!(
            "ALTER TABLE {} ALTER COLUMN {} SET NOT NULL",
            child(f),
            quote(&f.child_column)
        );
        if f.child_not_null {
            // New rows written in the UUID shape need not carry the legacy integer.
            sql.push_str(&format!(
                ", ALTER COLUMN {} DROP NOT NULL",
                quote(&f.legacy_column)
            ));
        }
        // Only while the proof is there: without it SET NOT NULL would scan the table.
        v.push(Step::new(
            sql,
            Mode::Brief,
            When::ConstraintPresent {
                schema: f.child_schema.clone(),
                table: f.child_table.clone(),
                name: chk.clone(),
            },
        ));
        v.extend(drop_not_null_check(
            (&f.child_schema, &f.child_table),
            chk,
            f.child_partitioned,
        ));
    }
    for t in &plan.tables {
        v.extend(drop_not_null_check(
            (&t.schema, &t.name),
            &t.not_null_check,
            t.partitioned(),
        ));
    }
    v
}

/// The swap's renames of `t`'s key: the column named `key` becomes `away`, and `back`
/// becomes `key`.
fn key_renames(t: &PlanTable, away: &str, back: &str) -> [Step; 2] {
    let rename = |from: &str, to: &str| {
        swap(format!(
            "ALTER TABLE {} RENAME COLUMN {} TO {}",
            tbl(t),
            quote(from),
            quote(to)
        ))
    };
    [rename(&t.key, away), rename(back, &t.key)]
}

/// First in each swap: JIT compilation of a costly plan (the catch-up of a big table, a
/// catalog query with a generic plan's estimates) takes 50-90 ms, longer than running it.
pub(super) const NO_JIT: &str = "SET LOCAL jit = off";

/// cutover: first, online, the NOT NULL CHECKs of the NOT NULL FK twins (they reject direct
/// writes that leave a NULL twin, so they come last, with the proxy dual-writing); then ONE
/// transaction, catalog-only: SET NOT NULL proven by the CHECKs, integer FKs and PK dropped,
/// the uuid index promoted to primary key, and renames so that the result reads as if it had
/// always been UUID.
pub fn cutover(plan: &Plan) -> Vec<Step> {
    let mut v = cutover_preparation(plan);
    // Views, policies, triggers and rules over the columns: checked against the uuid shape
    // before any pause, saved and dropped first thing in the swap (a view grouping by the key
    // depends on the primary key dropped below), rebuilt after the renames.
    v.extend(carry::prepare(plan, Shape::Uuid));
    v.push(swap("BEGIN".into()));
    v.push(swap(NO_JIT.into()));
    for (_, f) in plan.foreign_keys().filter(|(_, f)| !f.child_not_null) {
        // Writes that bypassed the proxy since the last catch-up.
        v.push(swap(swap_catchup(f)));
    }
    v.push(swap(carry::save(plan)));
    let tables: Vec<&PlanTable> = plan.tables.iter().collect();
    let fks: Vec<&PlanFk> = plan.foreign_keys().map(|(_, f)| f).collect();
    v.extend(swap_keys(&tables, &fks).into_iter().map(swap));
    v.push(swap(carry::restore()));
    v.extend(fill::switch(plan, Physical::Uuid).into_iter().map(swap));
    // Not keyshift.id_map: a view binds columns by number, so expand's reads the integer and
    // uuid columns under their new names (recreating it cost 16-29 ms of the pause at 300
    // tables, benches/cutover_tables.sh).
    v.push(swap(state::set_phase_sql(state::Phase::CutOver)));
    v.push(swap("COMMIT".into()));
    v.extend(after_cutover(plan));
    v
}

/// What every cutover runs online before it swaps anything: what was granted, commented or
/// tuned on the columns since expand follows them onto the twins, the NOT NULL CHECKs of
/// the NOT NULL FK twins (they reject direct writes that leave a NULL twin, so they come
/// last, with the proxy dual-writing), and the unique indexes the swap needs on partitions
/// created or attached since harden.
pub(super) fn cutover_preparation(plan: &Plan) -> Vec<Step> {
    let mut v = vec![Step::new(mirror::function_sql(), Mode::State, When::Always)];
    v.extend(mirror::steps(plan));
    for (_, f) in plan.foreign_keys() {
        if let Some(chk) = &f.not_null_check {
            v.extend(check_not_null(
                &f.child_schema,
                &f.child_table,
                chk,
                &f.uuid_column,
            ));
        }
    }
    for t in plan.tables.iter().filter(|t| t.partitioned()) {
        v.push(key_index(t, &t.uuid_column, &t.uuid_index, &t.uuid_column));
        v.push(key_index(t, &t.legacy_column, &legacy_key_index(t), &t.key));
    }
    v
}

/// The heart of cutover's swap for `tables` and the FKs `fks` (of children among them, or
/// all of them: the single swap passes the whole plan, a cutover table by table one group
/// at a time, children before their parents): the uuid keys' SET NOT NULL (a primary key
/// needs it; the rest of the NOT NULLs move after the pause, [`after_cutover`]), the
/// integer FKs dropped, each uuid unique index promoted to primary key, and the renames.
/// Catalog-only.
pub(super) fn swap_keys(tables: &[&PlanTable], fks: &[&PlanFk]) -> Vec<String> {
    swap_keys_setting_aside(tables, fks, |_| None)
}

/// [`swap_keys`], except that the integer FK in force of each FK to which `aside` gives a
/// name is renamed to it instead of dropped: dropping an FK locks its parent too (to remove
/// its triggers there), renaming it only the child. `--by-table` drops it in a transaction
/// of its own (src/migrate/by_table.rs).
pub(super) fn swap_keys_setting_aside(
    tables: &[&PlanTable],
    fks: &[&PlanFk],
    aside: impl Fn(&PlanFk) -> Option<String>,
) -> Vec<String> {
    let mut v: Vec<String> = tables.iter().map(|t| set_not_null(t).sql).collect();
    for f in fks {
        v.push(match aside(f) {
            Some(name) => format!(
                "ALTER TABLE {} RENAME CONSTRAINT {} TO {}",
                child(f),
                quote(&f.constraint),
                quote(&name)
            ),
            None => format!(
                "ALTER TABLE {} DROP CONSTRAINT {}",
                child(f),
                quote(&f.constraint)
            ),
        });
    }
    for t in tables {
        if t.partitioned() {
            v.push(partitions::swap_key(t, &t.uuid_column));
        } else {
            v.push(format!(
                "ALTER TABLE {} DROP CONSTRAINT {}",
                tbl(t),
                quote(&t.pk_constraint)
            ));
            v.push(format!(
                "ALTER TABLE {} ADD CONSTRAINT {} PRIMARY KEY USING INDEX {}",
                tbl(t),
                quote(&t.pk_constraint),
                quote(&t.uuid_index)
            ));
        }
        v.extend(
            key_renames(t, &t.legacy_column, &t.uuid_column)
                .into_iter()
                .map(|s| s.sql),
        );
    }
    for f in fks {
        let c = child(f);
        v.push(format!(
            "ALTER TABLE {c} RENAME COLUMN {} TO {}",
            quote(&f.child_column),
            quote(&f.legacy_column)
        ));
        v.push(format!(
            "ALTER TABLE {c} RENAME COLUMN {} TO {}",
            quote(&f.uuid_column),
            quote(&f.child_column)
        ));
        v.push(format!(
            "ALTER TABLE {c} RENAME CONSTRAINT {} TO {}",
            quote(&f.shadow_constraint),
            quote(&f.constraint)
        ));
        for i in &f.indexes {
            let s = quote(&f.child_schema);
            // Renaming a constraint's index renames the constraint.
            v.push(format!(
                "ALTER INDEX {s}.{} RENAME TO {}",
                quote(&i.name),
                quote(&i.legacy_name)
            ));
            v.push(format!(
                "ALTER INDEX {s}.{} RENAME TO {}",
                quote(&i.uuid_name),
                quote(&i.name)
            ));
        }
        v.extend(partitions::leaf_renames(f, true));
    }
    v
}

/// The catch-up inside a swap of the nullable FK `f`'s uuid twin: writes that bypassed the
/// proxy since the last catch-up.
pub(super) fn swap_catchup(f: &PlanFk) -> String {
    Twin::uuid_side(f).swap_catchup(f)
}

/// Harden's spare unique index on the integer key, which keeps the legacy key indexed (and
/// unique) after cutover.
pub fn legacy_key_index(t: &PlanTable) -> String {
    crate::ident::suffixed(&format!("{}_{}", t.name, t.legacy_column), "_key")
}

fn legacy_not_null_check(f: &PlanFk) -> String {
    crate::ident::suffixed(
        &format!("{}_{}", f.child_table, f.legacy_column),
        "_not_null",
    )
}

pub(super) fn legacy_fk_name(plan: &Plan, f: &PlanFk) -> String {
    crate::ident::suffixed(&f.constraint, &plan.legacy_suffix)
}

/// The spare unique index on the integer key that harden builds (it keeps the legacy column
/// indexed after cutover). Rollback builds a second one under [`legacy_spare_index`]: one of
/// the two becomes the primary key in the swap, the other stays as harden's spare.
fn legacy_spare_index(t: &PlanTable) -> String {
    crate::ident::suffixed(&format!("{}_{}", t.name, t.legacy_column), "_spare")
}

/// `ADD CONSTRAINT … FOREIGN KEY … NOT VALID` for a uuid FK that rollback builds, refused
/// (the whole statement rolled back) unless PostgreSQL bound it to `index`: the swap drops
/// the primary key's index, and an FK bound to that one would make the swap fail. PostgreSQL
/// binds a new FK to the matching unique index with the lowest OID, which the REINDEX step
/// of [`rollback`] arranges; this says so clearly if something else (OID wraparound, another
/// unique index on the key) defeats it.
fn add_fk_not_valid_on(f: &PlanFk, name: &str, clause: &str, index: &str) -> String {
    format!(
        "{}; {}",
        add_fk_not_valid(f, name, clause),
        fk_bound_check(&child(f), name, &qualified(&f.parent_schema, index)),
    )
}

/// Fails unless constraint `name` of `table` (qualified) uses unique index `index`
/// (qualified): see [`add_fk_not_valid_on`].
pub(super) fn fk_bound_check(table: &str, name: &str, index: &str) -> String {
    let con = literal(name);
    let idx = literal(index);
    format!(
        "DO $ks$ BEGIN IF (SELECT conindid FROM pg_constraint WHERE conrelid = {}::regclass AND conname = {con}) IS DISTINCT FROM {idx}::regclass THEN RAISE EXCEPTION 'keyshift: foreign key % is not bound to unique index %, so the rollback swap could not drop the primary key under it; another unique index on that column is older than %: drop it, or the primary key index has not been rebuilt yet: rerun keyshift rollback', {con}, {idx}, {idx}; END IF; END $ks$",
        literal(table),
    )
}

/// rollback: the inverse swap, which leaves the schema exactly as `harden` leaves it, so
/// that uuid-shaped sessions keep being served (they need phase hardened: uuids complete
/// and enforced) and a new cutover needs no harden.
///
/// Online first, nothing of it blocking reads or writes beyond brief catalog locks:
/// - the integer side, which cutover dropped: a unique index on each legacy key (the
///   primary key to be), the legacy FKs (NOT VALID, then VALIDATE), CHECKs proving the NOT
///   NULL of NOT NULL integer FK columns, then harden's spare unique index on the integer
///   key, built after the legacy FKs so that they bind to the index that becomes the
///   primary key, as before the cutover;
/// - the uuid side, as harden built it: the unique index on each uuid key, the
///   `CHECK (… IS NOT NULL)` of each uuid key, and the shadow FKs (NOT VALID, then
///   VALIDATE). The uuid FKs in force cannot simply be renamed in the swap: they depend on
///   the uuid primary key's index, and dropping that primary key would refuse. So new
///   ones are built and validated beside them, bound to the new unique index; for that,
///   the primary key index is first rebuilt (REINDEX CONCURRENTLY), since PostgreSQL binds a
///   new FK to the oldest matching index.
///
/// Then one transaction, catalog-only: the uuid FKs and primary keys dropped (their
/// validated replacements are already there), renames, the legacy index promoted to
/// primary key, phase hardened.
pub fn rollback(plan: &Plan) -> Vec<Step> {
    // What a cutover stopped after its swap may have left undone.
    let mut v = after_cutover(plan);
    for t in &plan.tables {
        v.push(key_index(
            t,
            &t.legacy_column,
            &legacy_key_index(t),
            &t.legacy_column,
        ));
    }
    for (_, f) in plan.foreign_keys() {
        let name = legacy_fk_name(plan, f);
        v.extend(build_fk(
            f,
            &name,
            &fk_clause(f, &f.legacy_column, &legacy_of(plan, f)),
            None,
        ));
    }
    // The NOT NULL of NOT NULL integer FK columns, which cutover dropped: proven online by a
    // validated CHECK now, so that the swap's SET NOT NULL needs no scan under its lock.
    for (_, f) in plan.foreign_keys().filter(|(_, f)| f.child_not_null) {
        v.extend(check_not_null(
            &f.child_schema,
            &f.child_table,
            &legacy_not_null_check(f),
            &f.legacy_column,
        ));
    }
    // A partitioned table gets no spare: nothing references its key, and the next cutover's
    // preparation builds the leaves' legacy indexes again.
    for t in plan.tables.iter().filter(|t| !t.partitioned()) {
        v.push(unique_index(t, &legacy_spare_index(t), &t.legacy_column));
    }
    // The uuid side, under harden's names (free since cutover renamed or dropped them). The
    // uuid key is named `key` until the swap.
    for t in &plan.tables {
        v.push(key_index(t, &t.uuid_column, &t.uuid_index, &t.key));
    }
    for t in plan.tables.iter().filter(|t| !t.referenced_by.is_empty()) {
        v.push(Step::new(
            format!(
                "REINDEX INDEX CONCURRENTLY {}",
                qualified(&t.schema, &t.pk_constraint)
            ),
            Mode::Online,
            When::IndexOlderThan {
                schema: t.schema.clone(),
                name: t.pk_constraint.clone(),
                than: t.uuid_index.clone(),
            },
        ));
    }
    for t in &plan.tables {
        v.extend(check_not_null(
            &t.schema,
            &t.name,
            &t.not_null_check,
            &t.key,
        ));
    }
    for (_, f) in plan.foreign_keys() {
        let index = plan
            .table(&f.parent_schema, &f.parent_table)
            .map(|t| t.uuid_index.clone())
            .unwrap_or_default();
        v.extend(build_fk(
            f,
            &f.shadow_constraint,
            &fk_clause(f, &f.child_column, &f.parent_key),
            Some(&index),
        ));
    }
    v.extend(carry::prepare(plan, Shape::Integer));
    v.push(swap("BEGIN".into()));
    v.push(swap(NO_JIT.into()));
    // As cutover's swap does for the uuid side: legacy integers of nullable FKs left NULL by
    // writes that bypassed the proxy since the check before the preparation (a NOT NULL FK's
    // are proven by the CHECK validated above). Before the renames: names as after cutover.
    for (_, f) in plan.foreign_keys().filter(|(_, f)| !f.child_not_null) {
        v.push(swap(Twin::legacy_side(plan, f).swap_catchup(f)));
    }
    v.push(swap(carry::save(plan)));
    for (_, f) in plan.foreign_keys() {
        let c = child(f);
        // The uuid FK in force: bound to the uuid primary key's index, it must go before that
        // primary key; the shadow FK built above, validated, takes over.
        v.push(swap(format!(
            "ALTER TABLE {c} DROP CONSTRAINT {}",
            quote(&f.constraint)
        )));
        v.push(swap(format!(
            "ALTER TABLE {c} RENAME CONSTRAINT {} TO {}",
            quote(&legacy_fk_name(plan, f)),
            quote(&f.constraint)
        )));
        v.push(swap(format!(
            "ALTER TABLE {c} RENAME COLUMN {} TO {}",
            quote(&f.child_column),
            quote(&f.uuid_column)
        )));
        v.push(swap(format!(
            "ALTER TABLE {c} RENAME COLUMN {} TO {}",
            quote(&f.legacy_column),
            quote(&f.child_column)
        )));
        if f.child_not_null {
            // As after harden: the uuid twin nullable, its NOT NULL CHECK built by the next
            // cutover.
            v.push(swap(format!(
                "ALTER TABLE {c} ALTER COLUMN {} DROP NOT NULL",
                quote(&f.uuid_column)
            )));
            v.push(swap(format!(
                "ALTER TABLE {c} ALTER COLUMN {} SET NOT NULL",
                quote(&f.child_column)
            )));
            v.push(swap(format!(
                "ALTER TABLE {c} DROP CONSTRAINT {}",
                quote(&legacy_not_null_check(f))
            )));
        }
        for i in &f.indexes {
            let s = quote(&f.child_schema);
            v.push(swap(format!(
                "ALTER INDEX {s}.{} RENAME TO {}",
                quote(&i.name),
                quote(&i.uuid_name)
            )));
            v.push(swap(format!(
                "ALTER INDEX {s}.{} RENAME TO {}",
                quote(&i.legacy_name),
                quote(&i.name)
            )));
        }
        v.extend(partitions::leaf_renames(f, false).into_iter().map(swap));
    }
    for t in plan.tables.iter().filter(|t| t.partitioned()) {
        v.extend(key_renames(t, &t.uuid_column, &t.legacy_column));
        // Drops the uuid primary key (the leaves' go with it, the uuid key keeps the leaves'
        // unique indexes built above) and makes the leaves' legacy indexes the primary key.
        v.push(swap(partitions::swap_key(t, &t.key)));
        v.push(swap(format!(
            "ALTER TABLE {} ALTER COLUMN {} DROP NOT NULL",
            tbl(t),
            quote(&t.uuid_column)
        )));
    }
    for t in plan.tables.iter().filter(|t| !t.partitioned()) {
        // Drops the primary key's index too; the uuid key keeps the unique index built above.
        v.push(swap(format!(
            "ALTER TABLE {} DROP CONSTRAINT {}",
            tbl(t),
            quote(&t.pk_constraint)
        )));
        v.extend(key_renames(t, &t.uuid_column, &t.legacy_column));
        v.push(swap(format!(
            "ALTER TABLE {} ADD CONSTRAINT {} PRIMARY KEY USING INDEX {}",
            tbl(t),
            quote(&t.pk_constraint),
            quote(&legacy_key_index(t))
        )));
        v.push(swap(format!(
            "ALTER INDEX {} RENAME TO {}",
            qualified(&t.schema, &legacy_spare_index(t)),
            quote(&legacy_key_index(t))
        )));
        // NOT NULL no more, as after harden: the validated CHECK built above enforces it
        // without making the next cutover's SET NOT NULL scan.
        v.push(swap(format!(
            "ALTER TABLE {} ALTER COLUMN {} DROP NOT NULL",
            tbl(t),
            quote(&t.uuid_column)
        )));
    }
    v.push(swap(carry::restore()));
    v.extend(fill::switch(plan, Physical::Integer).into_iter().map(swap));
    // keyshift.id_map follows the renames by itself (see cutover).
    v.push(swap(state::set_phase_sql(state::Phase::Hardened)));
    v.push(swap("COMMIT".into()));
    v
}

/// The parent's integer key under its name after cutover.
pub(super) fn legacy_of(plan: &Plan, f: &PlanFk) -> String {
    plan.table(&f.parent_schema, &f.parent_table)
        .map(|t| t.legacy_column.clone())
        .unwrap_or_else(|| crate::ident::suffixed(&f.parent_key, &plan.legacy_suffix))
}

/// finalize: the contract step after cutover: legacy columns go (with their indexes and the
/// sequences they own), then keyshift's state. With uuid v7 the function stays, since the
/// key defaults call it. With `keep_map`, the mapping is first copied into
/// `keyshift.id_map_archive` (which stays, with `keyshift.id_map` now reading it), while the
/// legacy columns still exist; the copy reads the tables without blocking writes.
pub fn finalize(plan: &Plan, keep_map: bool) -> Vec<Step> {
    // What a cutover stopped after its swap may have left undone.
    let mut v = after_cutover(plan);
    if keep_map {
        v.push(Step::new(
            "CREATE TABLE IF NOT EXISTS keyshift.id_map_archive (
    table_name text NOT NULL,
    legacy_id bigint NOT NULL,
    uuid uuid NOT NULL,
    PRIMARY KEY (table_name, legacy_id)
)"
            .into(),
            Mode::State,
            When::Always,
        ));
        // Guarded so that a finalize rerun after the view is gone does not fail here.
        v.push(Step::new(
            "DO $$ BEGIN
  IF to_regclass('keyshift.id_map') IS NOT NULL THEN
    INSERT INTO keyshift.id_map_archive (table_name, legacy_id, uuid)
    SELECT table_name, legacy_id, uuid FROM keyshift.id_map WHERE legacy_id IS NOT NULL
    ON CONFLICT DO NOTHING;
  END IF;
END $$"
                .into(),
            Mode::State,
            When::Always,
        ));
        // Old links are resolved by legacy id; the uuid index serves the reverse lookup.
        v.push(Step::new(
            "CREATE INDEX IF NOT EXISTS id_map_archive_uuid ON keyshift.id_map_archive (uuid)"
                .into(),
            Mode::State,
            When::Always,
        ));
    }
    // The views depend on the legacy columns: DROP COLUMN would refuse.
    v.push(Step::new(
        "DROP VIEW IF EXISTS keyshift.id_map".into(),
        Mode::State,
        When::Always,
    ));
    // CHECK constraints the swap carried NOT VALID, validated while their originals are there.
    v.push(carry::validate(plan));
    // Materialized views the swap left over keyshift's views, rebuilt over the tables first.
    v.extend(carry::rebase(plan));
    // The triggers watch the legacy columns: DROP COLUMN would refuse too. They go before
    // the shape views: their functions look parents up through those (src/migrate/fill.rs).
    v.extend(fill::drop(plan));
    v.extend(views::drop(plan));
    v.extend(drop_rollback_preparation(plan));
    for (_, f) in plan.foreign_keys() {
        v.push(Step::new(
            format!(
                "ALTER TABLE {} DROP COLUMN {}",
                child(f),
                quote(&f.legacy_column)
            ),
            Mode::Brief,
            When::ColumnPresent {
                schema: f.child_schema.clone(),
                table: f.child_table.clone(),
                column: f.legacy_column.clone(),
            },
        ));
    }
    for t in &plan.tables {
        v.push(Step::new(
            format!(
                "ALTER TABLE {} DROP COLUMN {}",
                tbl(t),
                quote(&t.legacy_column)
            ),
            Mode::Brief,
            When::ColumnPresent {
                schema: t.schema.clone(),
                table: t.name.clone(),
                column: t.legacy_column.clone(),
            },
        ));
    }
    v.push(views::drop_function());
    v.push(mirror::drop_function());
    v.extend(carry::drop_functions());
    v.push(Step::new(
        state::drop_state_sql(plan.uuid_version == 4, keep_map),
        Mode::State,
        When::Always,
    ));
    if keep_map {
        v.push(Step::new(
            "CREATE OR REPLACE VIEW keyshift.id_map AS SELECT table_name, legacy_id, uuid FROM keyshift.id_map_archive"
                .into(),
            Mode::State,
            When::Always,
        ));
    }
    v
}

/// What a rollback that did not reach its swap (a `--dry-run`, a drain that timed out) built
/// for the uuid side under harden's names: shadow FKs, NOT NULL CHECKs and unique indexes
/// beside the primary key. After cutover those names are free otherwise, so what is there is
/// redundant and goes, or the final schema would not read as if it had always been UUID. The
/// integer side goes with the legacy columns.
fn drop_rollback_preparation(plan: &Plan) -> Vec<Step> {
    let mut v: Vec<Step> = plan
        .foreign_keys()
        .map(|(_, f)| drop_constraint(&f.child_schema, &f.child_table, &f.shadow_constraint))
        .collect();
    v.extend(
        plan.foreign_keys()
            .filter_map(|(_, f)| partitions::drop_leaf_constraints(f, &f.shadow_constraint)),
    );
    for t in &plan.tables {
        v.push(drop_constraint(&t.schema, &t.name, &t.not_null_check));
        v.extend(drop_leaf_checks(t));
        v.push(drop_key_index(t, &t.uuid_column, &t.uuid_index));
    }
    v
}

/// On a partitioned table, the copies of its uuid key's NOT NULL CHECK that partitions
/// attached while it was there have of their own ([`partitions::drop_leaf_checks`]).
fn drop_leaf_checks(t: &PlanTable) -> Option<Step> {
    t.partitioned().then(|| {
        Step::new(
            partitions::drop_leaf_checks(&t.schema, &t.name, &t.not_null_check),
            Mode::Brief,
            When::Always,
        )
    })
}

/// Drops one of keyshift's functions (`signature` as `DROP FUNCTION` needs it), if there.
pub fn drop_function(signature: &str) -> Step {
    Step::new(
        format!("DROP FUNCTION IF EXISTS {signature}"),
        Mode::State,
        When::Always,
    )
}

/// Drops a constraint if it is there (brief lock).
fn drop_constraint(schema: &str, table: &str, name: &str) -> Step {
    Step::new(
        format!(
            "ALTER TABLE {} DROP CONSTRAINT {}",
            qualified(schema, table),
            quote(name)
        ),
        Mode::Brief,
        When::ConstraintPresent {
            schema: schema.into(),
            table: table.into(),
            name: name.into(),
        },
    )
}

/// Drops an index if it is there, without blocking writes.
fn drop_index(schema: &str, name: &str) -> Step {
    Step::new(
        format!("DROP INDEX CONCURRENTLY {}", qualified(schema, name)),
        Mode::Online,
        When::IndexPresent {
            schema: schema.into(),
            name: name.into(),
        },
    )
}

/// abort (before cutover): everything expand and harden added, in reverse, then the schema.
pub fn abort(plan: &Plan) -> Vec<Step> {
    let mut v = vec![
        Step::new(
            state::set_phase_sql(state::Phase::Aborting),
            Mode::State,
            When::Always,
        ),
        // The view depends on the uuid columns.
        Step::new(
            "DROP VIEW IF EXISTS keyshift.id_map".into(),
            Mode::State,
            When::Always,
        ),
    ];
    // So do the shape views and the fill triggers: DROP COLUMN would refuse while they exist.
    // Materialized views a cutover and rollback left over the shape views go over the tables.
    v.extend(carry::rebase(plan));
    // The triggers first: their functions look parents up through the shape views.
    v.extend(fill::drop(plan));
    v.extend(views::drop(plan));
    for (_, f) in plan.foreign_keys() {
        for name in std::iter::once(&f.shadow_constraint).chain(f.not_null_check.as_ref()) {
            v.push(drop_constraint(&f.child_schema, &f.child_table, name));
        }
        // Copies of the NOT NULL CHECK of a cutover that stopped before its swap, on
        // partitions attached since.
        if let (true, Some(chk)) = (f.child_partitioned, &f.not_null_check) {
            v.push(Step::new(
                partitions::drop_leaf_checks(&f.child_schema, &f.child_table, chk),
                Mode::Brief,
                When::Always,
            ));
        }
        // Left on partitions by a harden that stopped before the partitioned table's own:
        // they need the parent's unique index, dropped below.
        v.extend(partitions::drop_leaf_constraints(f, &f.shadow_constraint));
        for i in &f.indexes {
            // A UNIQUE constraint's mirror is a constraint after harden: its index goes
            // with it.
            if i.unique_constraint.is_some() {
                v.push(drop_constraint(
                    &f.child_schema,
                    &f.child_table,
                    &i.uuid_name,
                ));
            }
            if f.child_partitioned {
                // A partitioned index cannot be dropped concurrently; it holds no rows itself,
                // and the partitions' indexes go with it.
                v.push(Step::new(
                    format!(
                        "DROP INDEX IF EXISTS {}",
                        qualified(&f.child_schema, &i.uuid_name)
                    ),
                    Mode::Brief,
                    When::IndexPresent {
                        schema: f.child_schema.clone(),
                        name: i.uuid_name.clone(),
                    },
                ));
                continue;
            }
            v.push(drop_index(&f.child_schema, &i.uuid_name));
        }
    }
    for t in &plan.tables {
        v.push(drop_constraint(&t.schema, &t.name, &t.not_null_check));
        v.extend(drop_leaf_checks(t));
        v.push(drop_key_index(t, &t.uuid_column, &t.uuid_index));
        v.push(drop_key_index(t, &t.legacy_column, &legacy_key_index(t)));
    }
    for (_, f) in plan.foreign_keys() {
        v.push(Step::new(
            format!(
                "ALTER TABLE {} DROP COLUMN {}",
                child(f),
                quote(&f.uuid_column)
            ),
            Mode::Brief,
            When::ColumnPresent {
                schema: f.child_schema.clone(),
                table: f.child_table.clone(),
                column: f.uuid_column.clone(),
            },
        ));
    }
    for t in &plan.tables {
        v.push(Step::new(
            format!(
                "ALTER TABLE {} DROP COLUMN {}",
                tbl(t),
                quote(&t.uuid_column)
            ),
            Mode::Brief,
            When::ColumnPresent {
                schema: t.schema.clone(),
                table: t.name.clone(),
                column: t.uuid_column.clone(),
            },
        ));
    }
    v.push(Step::new(
        "DROP SCHEMA IF EXISTS keyshift CASCADE".into(),
        Mode::State,
        When::Always,
    ));
    v
}

/// Every phase, in order, as `plan --sql` prints them.
pub fn all_phases(plan: &Plan) -> Vec<(&'static str, Vec<Step>)> {
    vec![
        ("expand", expand(plan)),
        ("backfill", backfill(plan)),
        ("harden", harden(plan)),
        ("cutover", cutover(plan)),
        ("backfill_after_cutover", legacy_backfill(plan)),
        ("rollback", rollback(plan)),
        ("finalize", finalize(plan, false)),
        ("abort", abort(plan)),
    ]
}

/// The SQL script of every phase, with comments saying how each statement is run.
pub fn render_sql(plan: &Plan) -> String {
    let mut s = String::new();
    // keyshift's functions are (re)created by several phases: printed once, then named.
    let mut printed: Vec<(&str, String)> = Vec::new();
    for (phase, steps) in all_phases(plan) {
        let _ = writeln!(s, "-- ===== {phase} =====");
        if phase == "backfill" {
            let _ = writeln!(
                s,
                "-- per batch: the bounds ($1 = cursor, $2 = batch size) give the last key and the row count; then the batch ($1 = cursor, $2 = last key, $3 = task, $4 = row count, $5 = the cursor as read); until no row is left"
            );
        }
        if phase == "backfill_after_cutover" {
            let _ = writeln!(
                s,
                "-- `keyshift backfill` in phase cut_over: legacy keys still NULL ($1 = batch size, until none is left), then per FK the rows whose legacy integer differs from the parent's ($1 = how many to find), fixed in batches ($1 = their keys)"
            );
        }
        let mut last = None;
        for st in steps {
            if last != Some(st.mode) {
                let _ = writeln!(s, "-- ({})", st.mode.describe());
                last = Some(st.mode);
            }
            let seen = printed.iter().find(|(_, sql)| *sql == st.sql);
            match seen {
                Some((first, _)) if st.mode == Mode::State && st.sql.len() > 500 => {
                    let _ = writeln!(
                        s,
                        "-- the same CREATE OR REPLACE FUNCTION statement(s) as in {first} above"
                    );
                }
                _ => {
                    let _ = writeln!(s, "{};", st.sql.trim_end());
                    printed.push((phase, st.sql.clone()));
                }
            }
        }
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migrate::plan::{PlanOptions, build};

    fn plan() -> Plan {
        let mut cat = crate::migrate::plan::tests::sample();
        cat.tables[1].name = "Connectors".into();
        for f in &mut cat.foreign_keys {
            if f.parent_table == "connectors" {
                f.parent_table = "Connectors".into();
                f.parent_index = "Connectors_pkey".into();
            }
        }
        cat.tables[1].primary_key.as_mut().unwrap().index = "Connectors_pkey".into();
        cat.tables[1].primary_key.as_mut().unwrap().constraint = "Connectors_pkey".into();
        build(&cat, &PlanOptions::default())
    }

    #[test]
    fn expand_adds_columns_then_defaults() {
        let p = plan();
        assert!(p.blockers.is_empty(), "{:?}", p.blockers);
        let e = expand(&p);
        let sql: Vec<&str> = e.iter().map(|s| s.sql.as_str()).collect();
        assert!(
            sql.contains(&"ALTER TABLE public.\"Connectors\" ADD COLUMN id_uuid uuid"),
            "{sql:#?}"
        );
        assert!(sql.contains(
            &"ALTER TABLE public.\"Connectors\" ALTER COLUMN id_uuid SET DEFAULT keyshift.uuid_v7()"
        ));
        assert!(sql.contains(&"ALTER TABLE public.servers ADD COLUMN connector_id_uuid uuid"));
        let add = sql
            .iter()
            .position(|s| s.contains("\"Connectors\" ADD COLUMN"))
            .unwrap();
        let def = sql
            .iter()
            .position(|s| s.contains("\"Connectors\" ALTER COLUMN"))
            .unwrap();
        assert!(add < def, "the column is added without default first");
        assert!(
            e.iter()
                .filter(|s| s.sql.starts_with("ALTER"))
                .all(|s| s.mode == Mode::Brief)
        );
    }

    #[test]
    fn v4_uses_gen_random_uuid() {
        let mut p = plan();
        p.uuid_version = 4;
        assert!(
            expand(&p)
                .iter()
                .any(|s| s.sql.ends_with("SET DEFAULT gen_random_uuid()"))
        );
        assert!(
            finalize(&p, false)
                .last()
                .unwrap()
                .sql
                .contains("DROP SCHEMA")
        );
    }

    #[test]
    fn harden_keeps_actions_and_is_not_valid_then_validate() {
        let p = plan();
        let h = harden(&p);
        let shadow = h
            .iter()
            .find(|s| s.sql.contains("tools_server_id_fkey_uuid FOREIGN KEY"))
            .unwrap();
        assert_eq!(
            shadow.sql,
            "LOCK TABLE public.servers IN SHARE ROW EXCLUSIVE MODE; ALTER TABLE public.tools ADD CONSTRAINT tools_server_id_fkey_uuid FOREIGN KEY (server_id_uuid) REFERENCES public.servers (id_uuid) ON DELETE SET NULL ON UPDATE NO ACTION NOT VALID"
        );
        assert_eq!(shadow.mode, Mode::Brief);
        assert!(h.iter().any(|s| s.sql
            == "ALTER TABLE public.tools VALIDATE CONSTRAINT tools_server_id_fkey_uuid"
            && s.mode == Mode::Online));
        assert!(h.iter().any(|s| s.sql == "CREATE INDEX CONCURRENTLY tools_server_id_idx_uuid ON public.tools USING btree (server_id_uuid)"));
        assert!(h.iter().any(|s| s.sql == "CREATE UNIQUE INDEX CONCURRENTLY \"Connectors_id_uuid_key\" ON public.\"Connectors\" (id_uuid)"));
        assert!(
            h.iter()
                .any(|s| s.sql.contains("CHECK (id_uuid IS NOT NULL) NOT VALID"))
        );
    }

    #[test]
    fn cutover_is_one_transaction_with_renames() {
        let p = plan();
        let c = cutover(&p);
        let begin = c.iter().position(|s| s.sql == "BEGIN").unwrap();
        let commit = c.iter().position(|s| s.sql == "COMMIT").unwrap();
        assert!(c[..begin].iter().all(|s| s.mode != Mode::Swap));
        assert!(c[begin..=commit].iter().all(|s| s.mode == Mode::Swap));
        // After the pause, each with a brief lock: the NOT NULLs moved, the proofs dropped.
        let after = &c[commit + 1..];
        assert!(!after.is_empty() && after.iter().all(|s| s.mode == Mode::Brief));
        assert_eq!(after.len(), after_cutover(&p).len());
        let sql: Vec<&str> = c.iter().map(|s| s.sql.as_str()).collect();
        let drop_fk = sql
            .iter()
            .position(|s| {
                *s == "ALTER TABLE public.servers DROP CONSTRAINT servers_connector_id_fkey"
            })
            .unwrap();
        let drop_pk = sql
            .iter()
            .position(|s| {
                *s == "ALTER TABLE public.\"Connectors\" DROP CONSTRAINT \"Connectors_pkey\""
            })
            .unwrap();
        assert!(drop_fk < drop_pk, "FKs depend on the primary key's index");
        // What is built over the columns is saved before anything it depends on changes (a
        // view grouping by the key depends on the primary key), rebuilt after every rename.
        let save = sql
            .iter()
            .position(|s| s.starts_with("SELECT keyshift.carry_save("))
            .unwrap();
        let restore = sql
            .iter()
            .position(|s| *s == "SELECT keyshift.carry_restore()")
            .unwrap();
        let last_rename = sql.iter().rposition(|s| s.contains(" RENAME ")).unwrap();
        assert!(save < drop_fk && restore > last_rename);
        assert!(sql.contains(&"ALTER TABLE public.\"Connectors\" ADD CONSTRAINT \"Connectors_pkey\" PRIMARY KEY USING INDEX \"Connectors_id_uuid_key\""));
        assert!(sql.contains(&"ALTER TABLE public.tools RENAME CONSTRAINT tools_server_id_fkey_uuid TO tools_server_id_fkey"));
        assert!(sql.contains(
            &"ALTER INDEX public.tools_server_id_idx RENAME TO tools_server_id_idx_legacy"
        ));
        assert!(sql.contains(
            &"ALTER TABLE public.servers RENAME COLUMN connector_id TO connector_id_legacy"
        ));
        // NOT NULL FK twin: its CHECK is built online before the swap.
        assert!(
            c[..begin]
                .iter()
                .any(|s| s.sql.contains("servers_connector_id_uuid_not_null CHECK"))
        );
    }

    #[test]
    fn rollback_and_abort_undo() {
        let p = plan();
        let r = rollback(&p);
        assert!(r.iter().any(|s| s.sql.contains("ADD CONSTRAINT \"Connectors_pkey\" PRIMARY KEY USING INDEX \"Connectors_id_legacy_key\"")));
        assert!(
            r.iter()
                .any(|s| s.sql.contains("REFERENCES public.servers (id_legacy)"))
        );
        let a = abort(&p);
        assert_eq!(
            a.last().unwrap().sql,
            "DROP SCHEMA IF EXISTS keyshift CASCADE"
        );
        let drop_shadow = a
            .iter()
            .position(|s| s.sql.contains("DROP CONSTRAINT tools_server_id_fkey_uuid"))
            .unwrap();
        let drop_index = a
            .iter()
            .position(|s| {
                s.sql
                    .contains("DROP INDEX CONCURRENTLY public.servers_id_uuid_key")
            })
            .unwrap();
        assert!(
            drop_shadow < drop_index,
            "the shadow FK needs the parent's unique index"
        );
        let text = render_sql(&p);
        for phase in [
            "expand", "backfill", "harden", "cutover", "rollback", "finalize", "abort",
        ] {
            assert!(text.contains(&format!("-- ===== {phase} =====")));
        }
    }

    #[test]
    fn rollback_rebuilds_the_uuid_side_online_and_swaps_catalog_only() {
        let p = plan();
        let r = rollback(&p);
        let begin = r.iter().position(|s| s.sql == "BEGIN").unwrap();
        let (online, swap) = r.split_at(begin);
        assert!(online.iter().all(|s| s.mode != Mode::Swap));
        assert!(swap.iter().all(|s| s.mode == Mode::Swap));
        let at = |sql: &str| {
            online
                .iter()
                .position(|s| s.sql.starts_with(sql))
                .unwrap_or_else(|| panic!("{sql}"))
        };
        // Harden's unique index on the uuid key (named `id` until the swap), then the
        // primary key rebuilt after it, then the shadow FK bound to it, validated.
        let index = at(
            "CREATE UNIQUE INDEX CONCURRENTLY \"Connectors_id_uuid_key\" ON public.\"Connectors\" (id)",
        );
        let reindex = at("REINDEX INDEX CONCURRENTLY public.\"Connectors_pkey\"");
        assert_eq!(
            online[reindex].when,
            When::IndexOlderThan {
                schema: "public".into(),
                name: "Connectors_pkey".into(),
                than: "Connectors_id_uuid_key".into(),
            }
        );
        let shadow = at(
            "LOCK TABLE public.\"Connectors\" IN SHARE ROW EXCLUSIVE MODE; ALTER TABLE public.servers ADD CONSTRAINT servers_connector_id_fkey_uuid FOREIGN KEY (connector_id) REFERENCES public.\"Connectors\" (id)",
        );
        assert!(online[shadow].sql.contains("NOT VALID; DO $ks$"));
        assert!(
            online[shadow]
                .sql
                .contains("IS DISTINCT FROM 'public.\"Connectors_id_uuid_key\"'::regclass")
        );
        let validate =
            at("ALTER TABLE public.servers VALIDATE CONSTRAINT servers_connector_id_fkey_uuid");
        assert!(index < reindex && reindex < shadow && shadow < validate);
        at(
            "ALTER TABLE public.\"Connectors\" ADD CONSTRAINT \"Connectors_id_uuid_not_null\" CHECK (id IS NOT NULL) NOT VALID",
        );
        at("ALTER TABLE public.\"Connectors\" VALIDATE CONSTRAINT \"Connectors_id_uuid_not_null\"");
        // The spare integer index comes after the legacy FKs, which bind to the index that
        // becomes the primary key.
        assert!(
            at(
                "LOCK TABLE public.\"Connectors\" IN SHARE ROW EXCLUSIVE MODE; ALTER TABLE public.servers ADD CONSTRAINT servers_connector_id_fkey_legacy"
            ) < at("CREATE UNIQUE INDEX CONCURRENTLY \"Connectors_id_legacy_spare\"")
        );
        // Inside the swap, only catalog changes: no build, no scan; and the catch-up of
        // nullable legacy FKs (an index scan on the legacy FK's index: rows still NULL).
        let catchup = |s: &str| {
            s.starts_with("UPDATE public.tools AS c SET ")
                && (s.ends_with("_legacy IS NULL AND c.server_id IS NOT NULL")
                    || s.ends_with("_legacy IS NULL AND c.parent_id IS NOT NULL"))
        };
        for s in swap.iter().filter(|s| !catchup(&s.sql)) {
            let ok = [
                "BEGIN",
                NO_JIT,
                "COMMIT",
                "ALTER TABLE",
                "ALTER INDEX",
                "CREATE OR REPLACE VIEW keyshift.id_map",
                "UPDATE keyshift.migration",
                "SELECT keyshift.carry_",
            ]
            .iter()
            .any(|p| s.sql.starts_with(p));
            assert!(ok, "{}", s.sql);
            assert!(
                !s.sql.contains("VALIDATE") && !s.sql.contains("CHECK"),
                "{}",
                s.sql
            );
            assert!(
                !s.sql.contains(" ADD CONSTRAINT ") || s.sql.contains("PRIMARY KEY USING INDEX"),
                "{}",
                s.sql
            );
        }
        let sql: Vec<&str> = swap.iter().map(|s| s.sql.as_str()).collect();
        assert!(sql.contains(&"ALTER INDEX public.\"Connectors_id_legacy_spare\" RENAME TO \"Connectors_id_legacy_key\""));
        assert!(
            sql.contains(&"ALTER TABLE public.\"Connectors\" ALTER COLUMN id_uuid DROP NOT NULL")
        );
        assert!(
            sql.iter()
                .any(|s| s.starts_with("UPDATE keyshift.migration SET phase = 'hardened'")),
            "{sql:#?}"
        );
    }

    #[test]
    fn rollback_swap_catches_up_nullable_legacy_fks_before_renaming() {
        let p = plan();
        let r = rollback(&p);
        let begin = r.iter().position(|s| s.sql == "BEGIN").unwrap();
        assert_eq!(r[begin + 1].sql, NO_JIT);
        let swap: Vec<&str> = r[begin + 2..].iter().map(|s| s.sql.as_str()).collect();
        // The nullable FKs (tools.server_id, the self-reference tools.parent_id) come first,
        // under their after-cutover names; the NOT NULL one (servers.connector_id) has its
        // validated CHECK instead.
        assert_eq!(
            swap[0],
            "UPDATE public.tools AS c SET server_id_legacy = (SELECT p.id_legacy FROM public.servers AS p WHERE p.id = c.server_id) WHERE c.server_id_legacy IS NULL AND c.server_id IS NOT NULL"
        );
        assert_eq!(
            swap[1],
            "UPDATE public.tools AS c SET parent_id_legacy = (SELECT p.id_legacy FROM public.tools AS p WHERE p.id = c.parent_id) WHERE c.parent_id_legacy IS NULL AND c.parent_id IS NOT NULL"
        );
        assert!(!swap[2].starts_with("UPDATE"), "{}", swap[2]);
        assert!(!swap.iter().any(|s| s.contains("SET connector_id_legacy")));
        // The mirror of cutover's, which fills the uuid side.
        let c = cutover(&p);
        assert!(c.iter().any(|s| s.sql == "UPDATE public.tools AS c SET server_id_uuid = (SELECT p.id_uuid FROM public.servers AS p WHERE p.id = c.server_id) WHERE c.server_id_uuid IS NULL AND c.server_id IS NOT NULL"));
    }

    #[test]
    fn legacy_catchup_follows_the_uuid_fk_and_the_renamed_keys() {
        let p = plan();
        let conn = p.table("public", "Connectors").unwrap();
        let f = &conn.referenced_by[0];
        assert_eq!(
            (f.child_table.as_str(), f.child_column.as_str()),
            ("servers", "connector_id")
        );
        // servers is migrated: its integer key `id` is `id_legacy` after cutover; the uuid FK
        // has the FK's name and the parent's uuid has the key's.
        assert_eq!(
            child_batch_key_after_cutover(&p, f).as_deref(),
            Some("id_legacy")
        );
        assert_eq!(
            legacy_catchup_find(&p, f),
            "SELECT c.id_legacy::text FROM public.servers AS c LEFT JOIN public.\"Connectors\" AS p ON p.id = c.connector_id WHERE c.connector_id_legacy IS DISTINCT FROM p.id_legacy LIMIT $1::bigint"
        );
        let lookup =
            "(SELECT p.id_legacy FROM public.\"Connectors\" AS p WHERE p.id = c.connector_id)";
        assert_eq!(
            legacy_catchup_fix(&p, f),
            format!(
                "UPDATE public.servers AS c SET connector_id_legacy = {lookup} WHERE c.id_legacy = ANY($1::text[]::bigint[]) AND c.connector_id_legacy IS DISTINCT FROM {lookup}"
            )
        );
        // The forward catch-up, before cutover, reads the same FK the other way.
        assert_eq!(
            catchup_find(f),
            "SELECT c.id::text FROM public.servers AS c LEFT JOIN public.\"Connectors\" AS p ON p.id = c.connector_id WHERE c.connector_id_uuid IS DISTINCT FROM p.id_uuid LIMIT $1::bigint"
        );
        // A child that is not migrated keeps its key; one without an integer key goes by ctid.
        let mut other = f.clone();
        other.child_table = "audit".into();
        assert_eq!(
            child_batch_key_after_cutover(&p, &other).as_deref(),
            Some("id")
        );
        assert!(
            legacy_catchup_find(&p, &other).starts_with("SELECT c.id::text FROM public.audit AS c")
        );
        other.child_batch_key = None;
        assert!(
            legacy_catchup_find(&p, &other)
                .starts_with("SELECT c.ctid::text FROM public.audit AS c")
        );
        assert!(legacy_catchup_fix(&p, &other).contains(
            "WHERE c.ctid = ANY($1::text[]::tid[]) AND c.connector_id_legacy IS DISTINCT FROM"
        ));
    }

    #[test]
    fn legacy_keys_are_filled_from_the_default_when_there_is_one() {
        let p = plan();
        let t = p.table("public", "servers").unwrap();
        assert_eq!(t.key_kind, "serial");
        assert_eq!(
            legacy_key_catchup(t).unwrap(),
            "WITH upd AS (UPDATE public.servers SET id_legacy = DEFAULT WHERE id IN (SELECT id FROM public.servers WHERE id_legacy IS NULL LIMIT $1::bigint) RETURNING id_legacy) SELECT count(*), count(id_legacy) FROM upd"
        );
        let mut plain = t.clone();
        plain.key_kind = "plain".into();
        assert_eq!(legacy_key_catchup(&plain), None);
        // `plan --sql` shows the backfill after cutover between cutover and rollback.
        let phases: Vec<&str> = all_phases(&p).iter().map(|(n, _)| *n).collect();
        let at = |n: &str| phases.iter().position(|x| *x == n).unwrap();
        assert!(at("cutover") < at("backfill_after_cutover"));
        assert!(at("backfill_after_cutover") < at("rollback"));
        let steps = legacy_backfill(&p);
        assert_eq!(steps.len(), 3 + 2 * 3, "3 keys, then find and fix per FK");
        assert!(steps.iter().all(|s| s.mode == Mode::Online));
        assert!(render_sql(&p).contains(
            "-- ===== backfill_after_cutover =====\n-- `keyshift backfill` in phase cut_over"
        ));
    }

    #[test]
    fn batches_save_the_cursor_in_the_same_statement() {
        let p = plan();
        let t = &p.tables[0];
        let k = key_batch(&p, t);
        assert!(k.starts_with("WITH upd AS"));
        assert!(k.contains("UPDATE keyshift.backfill SET cursor"));
        let f = &p.tables[1].referenced_by[0];
        let s = fk_batch(f);
        assert!(s.contains("IS DISTINCT FROM"), "{s}");
        let mut nokey = f.clone();
        nokey.child_batch_key = None;
        assert!(fk_batch(&nokey).contains("ctid"));
    }
}
