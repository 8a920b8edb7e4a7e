//! The cutover table by table (`keyshift cutover --by-table`, issue [scale]): no pause that
//! grows with the schema.
//!
//! One swap of every table holds every client for PostgreSQL's catalog work on all of them:
//! 400–700 ms at 300 tables here, and a hand-written swap is slower still (docs/cutover.md,
//! "The pause and the number of tables"); `--by-table` held them 36–38 ms
//! (docs/benchmarks.md). But once the proxies serve every session through
//! keyshift's views of its shape, which bind columns by number and so do not see a swap's
//! renames, the tables no longer need to change at one instant. So:
//!
//! 1. **Enter** phase `cutting_over` with the usual pause, whose transaction only sets the
//!    phase: the proxies put in force rules that translate both shapes (no shape is
//!    physical), drained sessions start their next statement under them. Its length does not
//!    depend on the number of tables.
//! 2. **Swap each group** ([`groups`]) in its own short transaction, waiting at most 50 ms
//!    for each lock, with retries, gates open: the statements a single swap runs for those
//!    tables (`ddl::swap_keys`, the same text), then their children's fill triggers switched. A
//!    session waits only if its statement touches a table being swapped, for that group's
//!    few milliseconds, as for any brief `ALTER TABLE`. Children go before their parents (a
//!    parent's primary key can go only once no integer FK references it); a cycle of FKs,
//!    or a self-reference, is one group. An integer FK to another group's table is renamed
//!    aside by the group and dropped alone right after ([`Group::fk_drops`]): the drop is
//!    what locks the parent.
//! 3. **Leave**: phase `cut_over` (a rules change the proxies follow without a pause: the
//!    uuid shape's translated statements and its physical ones now read the same), then
//!    what every cutover leaves for after its pause (`ddl::after_cutover`).
//!
//! Interrupted anywhere, `keyshift cutover --by-table` again resumes: the phase says whether
//! step 1 committed, and each group's step runs only while its first renamed column is still
//! there (each group commits whole). The application's views, policies and other objects
//! over migrated columns stay on the integer columns until every group is swapped, then are
//! rebuilt over the uuids: the views in one more transaction, what sits on each table in one
//! per table (src/migrate/carry.rs, "The cutover table by table"). What it does not do yet:
//! `--dry-run`, and a rollback from the middle (finish the cutover, then `keyshift
//! rollback`). Partitioned tables go as in the single swap
//! (`ddl::swap_keys`): locking a partitioned table locks its partitions.

use std::collections::HashMap;

use serde::Serialize;
use tokio_postgres::Client;

use super::ddl::{self, Mode, Step, When};
use super::fill::{self, Physical};
use super::plan::{Plan, PlanFk, PlanTable};
use super::state::{self, Phase};
use super::{Settings, carry, db};
use crate::ident::qualified;

/// How long a group's transaction may wait for each of its locks ([`Group::locks`]): a
/// client whose statement queues behind the group is delayed by at most this much per
/// table, far below PostgreSQL's default `deadlock_timeout` (1 s).
const HELD_WAIT: std::time::Duration = std::time::Duration::from_millis(50);

/// Tables swapped together in one transaction: a strongly connected component of the FK
/// graph (one table, or the tables of a cycle).
#[derive(Debug)]
pub struct Group<'a> {
    /// The migrated tables of the group (their own keys swap).
    pub tables: Vec<&'a PlanTable>,
    /// The migrated FKs whose child is in the group (their columns swap).
    pub fks: Vec<&'a PlanFk>,
    /// Every table of the group, as `schema.table`, for the log.
    pub label: String,
    /// The plan, for the name an integer FK set aside takes (`ddl::legacy_fk_name`).
    plan: &'a Plan,
}

impl Group<'_> {
    /// The group's transaction: catch-ups of its nullable FK twins, the swap's statements
    /// for its tables, its children's fill triggers switched to the uuid pair. One Query:
    /// PostgreSQL runs it as one implicit transaction, so a failure leaves nothing half done.
    pub fn sql(&self) -> String {
        let mut v = vec![ddl::NO_JIT.to_string()];
        v.extend(self.locks());
        if !self.tables.is_empty() {
            v.push(carry::unblock(
                self.tables
                    .iter()
                    .map(|t| (t.schema.as_str(), t.name.as_str())),
            ));
        }
        v.extend(
            self.fks
                .iter()
                .filter(|f| !f.child_not_null)
                .map(|f| ddl::swap_catchup(f)),
        );
        v.extend(ddl::swap_keys_setting_aside(&self.tables, &self.fks, |f| {
            self.set_aside(f).then(|| ddl::legacy_fk_name(self.plan, f))
        }));
        let mut children: Vec<(&str, &str)> = self
            .fks
            .iter()
            .map(|f| (f.child_schema.as_str(), f.child_table.as_str()))
            .collect();
        children.dedup();
        children.sort_unstable();
        children.dedup();
        v.extend(
            children
                .into_iter()
                .map(|(s, t)| fill::enable_sql(s, t, Physical::Uuid)),
        );
        v.join(";\n")
    }

    /// Whether the group renames `f`'s integer FK aside (its parent is in another group)
    /// and leaves its drop to [`Group::fk_drops`], instead of dropping it: dropping an FK
    /// takes ACCESS EXCLUSIVE on the parent too, so in a star every child's group held the
    /// shared parent for its whole transaction (10–20 ms each at 50–300 tables,
    /// docs/benchmarks.md), and each of them made the parent's readers wait that long. Set
    /// aside, the parent is held only by the drop alone, a statement of its own. Not for a
    /// partitioned child, whose partitions' constraints take their names from it.
    fn set_aside(&self, f: &PlanFk) -> bool {
        !f.child_partitioned
            && !self
                .tables
                .iter()
                .any(|t| t.schema == f.parent_schema && t.name == f.parent_table)
    }

    /// The integer FKs the group set aside, each dropped in a transaction of its own right
    /// after the group (before the parent's group, which drops the key they depend on):
    /// its parent and child locked first, each waited for at most [`HELD_WAIT`], then the
    /// one `DROP CONSTRAINT`. Needed while the constraint is there, so a rerun drops those a
    /// stopped run left. With the label for the log.
    pub fn fk_drops(&self) -> Vec<(Step, String)> {
        self.fks
            .iter()
            .filter(|f| self.set_aside(f))
            .map(|f| {
                let name = ddl::legacy_fk_name(self.plan, f);
                let (parent, child) = (
                    qualified(&f.parent_schema, &f.parent_table),
                    qualified(&f.child_schema, &f.child_table),
                );
                let sql = format!(
                    "SET LOCAL lock_timeout = '{}ms';\nLOCK TABLE {parent}, {child} IN ACCESS EXCLUSIVE MODE;\nALTER TABLE {child} DROP CONSTRAINT {}",
                    HELD_WAIT.as_millis(),
                    crate::ident::quote(&name)
                );
                let when = When::ConstraintPresent {
                    schema: f.child_schema.clone(),
                    table: f.child_table.clone(),
                    name,
                };
                (
                    Step::new(sql, Mode::Brief, when),
                    format!("the integer FK {child} → {parent}"),
                )
            })
            .collect()
    }

    /// Every lock the group's statements take, taken first: the parents whose FKs it drops
    /// (dropping an FK takes ACCESS EXCLUSIVE on the referenced table too, to remove its
    /// triggers; only within a cycle, [`Group::set_aside`]), then its own tables, each waited
    /// for at most [`HELD_WAIT`], so the group never waits long while it holds a lock, and a
    /// client never queues long behind it.
    ///
    /// Not `--lock-timeout` (500 ms by default), even for the first lock, which the group
    /// waits for holding nothing: while it waits, every statement that needs that table
    /// queues behind it, gates open, and would be held that long (the single swap's wait
    /// is inside its pause, where the drain already ended the proxied transactions). A group
    /// whose locks do not come in its tries is swapped under a pause of its own instead.
    ///
    /// Why: taken by the statements themselves, the locks came one ALTER at a time, and a
    /// reader through the proxy that held `users` and waited for `t1` (held by the group,
    /// which then waited for `users`) was in a deadlock that PostgreSQL resolved by ending
    /// the reader, the first to wait (benches/cutover_tables.sh, star 50: a pgbench
    /// failure, 40P01). Taken `NOWAIT`, they never came under 16 clients' multi-table
    /// transactions (tests/cutover_load.rs: 30 retries, each failing on a table some open
    /// transaction held). A short wait lets those transactions end, and gives up (55P03,
    /// retried by the step) long before any client's `deadlock_timeout` (1 s by default)
    /// would make PostgreSQL end that client instead.
    fn locks(&self) -> Vec<String> {
        let mut tables: Vec<(&str, &str)> = Vec::new();
        let parents = self
            .fks
            .iter()
            .filter(|f| !self.set_aside(f))
            .map(|f| (f.parent_schema.as_str(), f.parent_table.as_str()));
        let own = self
            .tables
            .iter()
            .map(|t| (t.schema.as_str(), t.name.as_str()))
            .chain(
                self.fks
                    .iter()
                    .map(|f| (f.child_schema.as_str(), f.child_table.as_str())),
            );
        for t in parents.chain(own) {
            if !tables.contains(&t) {
                tables.push(t);
            }
        }
        if tables.is_empty() {
            return Vec::new();
        }
        let names: Vec<String> = tables.iter().map(|(s, t)| qualified(s, t)).collect();
        // One statement: PostgreSQL takes its tables in the order named, and lock_timeout
        // bounds each wait.
        vec![
            format!("SET LOCAL lock_timeout = '{}ms'", HELD_WAIT.as_millis()),
            format!("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE", names.join(", ")),
        ]
    }

    /// The group as a step: brief (it takes ACCESS EXCLUSIVE locks on its tables and their
    /// parents), needed while the first column it renames away is still there.
    pub fn step(&self) -> Step {
        let when = match self.first_renamed() {
            Some((schema, table, column)) => When::ColumnPresent {
                schema: schema.into(),
                table: table.into(),
                column: column.into(),
            },
            None => When::Always,
        };
        Step::new(self.sql(), Mode::Brief, when)
    }

    /// The first column the group renames away, as (schema, table, column): there until
    /// the group's transaction commits, gone after (each group commits whole).
    fn first_renamed(&self) -> Option<(&str, &str, &str)> {
        match (self.tables.first(), self.fks.first()) {
            (Some(t), _) => Some((&t.schema, &t.name, &t.uuid_column)),
            (None, Some(f)) => Some((&f.child_schema, &f.child_table, &f.uuid_column)),
            (None, None) => None,
        }
    }
}

/// The groups of `plan`, in the order they can be swapped: every group after the groups of
/// all the tables that reference it.
pub fn groups(plan: &Plan) -> Vec<Group<'_>> {
    // Nodes: every table the plan touches, parents and children, in plan order.
    let mut index: HashMap<(&str, &str), usize> = HashMap::new();
    let mut nodes: Vec<(&str, &str)> = Vec::new();
    fn add<'p>(
        s: &'p str,
        t: &'p str,
        index: &mut HashMap<(&'p str, &'p str), usize>,
        nodes: &mut Vec<(&'p str, &'p str)>,
    ) -> usize {
        *index.entry((s, t)).or_insert_with(|| {
            nodes.push((s, t));
            nodes.len() - 1
        })
    }
    for t in &plan.tables {
        add(t.schema.as_str(), t.name.as_str(), &mut index, &mut nodes);
    }
    let mut edges: Vec<Vec<usize>> = Vec::new();
    for (_, f) in plan.foreign_keys() {
        let c = add(&f.child_schema, &f.child_table, &mut index, &mut nodes);
        let p = add(&f.parent_schema, &f.parent_table, &mut index, &mut nodes);
        if edges.len() < nodes.len() {
            edges.resize(nodes.len(), Vec::new());
        }
        edges[c].push(p);
    }
    edges.resize(nodes.len(), Vec::new());
    // Tarjan emits a component after every component reachable from it: parents (the
    // edges go child → parent) before children. Reversed, children come first.
    let mut comps = components(&edges);
    comps.reverse();
    // Each node's group, then every table and FK into its group in one pass (plan order).
    let mut group_of = vec![0; nodes.len()];
    let mut groups: Vec<Group> = comps
        .iter_mut()
        .enumerate()
        .map(|(g, comp)| {
            comp.sort_unstable();
            for &n in comp.iter() {
                group_of[n] = g;
            }
            Group {
                tables: Vec::new(),
                fks: Vec::new(),
                plan,
                label: comp
                    .iter()
                    .map(|&n| format!("{}.{}", nodes[n].0, nodes[n].1))
                    .collect::<Vec<_>>()
                    .join(", "),
            }
        })
        .collect();
    for t in &plan.tables {
        if let Some(&n) = index.get(&(t.schema.as_str(), t.name.as_str())) {
            groups[group_of[n]].tables.push(t);
        }
    }
    for (_, f) in plan.foreign_keys() {
        if let Some(&n) = index.get(&(f.child_schema.as_str(), f.child_table.as_str())) {
            groups[group_of[n]].fks.push(f);
        }
    }
    groups
}

/// Strongly connected components of the graph `edges` (node → successors), each emitted
/// after every component reachable from it (Tarjan's algorithm, iterative: a chain of
/// thousands of tables would be as deep a recursion).
fn components(edges: &[Vec<usize>]) -> Vec<Vec<usize>> {
    const NONE: usize = usize::MAX;
    let n = edges.len();
    let (mut index, mut low, mut on_stack) = (vec![NONE; n], vec![0; n], vec![false; n]);
    let (mut stack, mut out, mut next) = (Vec::new(), Vec::new(), 0);
    for root in 0..n {
        if index[root] != NONE {
            continue;
        }
        // (node, how many of its successors are done)
        let mut calls: Vec<(usize, usize)> = vec![(root, 0)];
        index[root] = next;
        low[root] = next;
        next += 1;
        stack.push(root);
        on_stack[root] = true;
        while let Some(top) = calls.last_mut() {
            let v = top.0;
            if let Some(&w) = edges[v].get(top.1) {
                top.1 += 1;
                if index[w] == NONE {
                    index[w] = next;
                    low[w] = next;
                    next += 1;
                    stack.push(w);
                    on_stack[w] = true;
                    calls.push((w, 0));
                } else if on_stack[w] {
                    low[v] = low[v].min(index[w]);
                }
                continue;
            }
            calls.pop();
            if let Some(&(u, _)) = calls.last() {
                low[u] = low[u].min(low[v]);
            }
            if low[v] == index[v] {
                let mut comp = Vec::new();
                while let Some(w) = stack.pop() {
                    on_stack[w] = false;
                    comp.push(w);
                    if w == v {
                        break;
                    }
                }
                out.push(comp);
            }
        }
    }
    out
}

/// What a cutover table by table runs before and in its pause: the preparation every
/// cutover makes, the application's objects over migrated columns checked, deparsed and
/// kept for the end (src/migrate/carry.rs), then a swap that only enters phase
/// `cutting_over`.
pub fn entry(plan: &Plan) -> Vec<Step> {
    let mut v = ddl::cutover_preparation(plan);
    v.extend(carry::prepare(plan, crate::shape::Shape::Uuid));
    v.push(carry::keep(plan));
    v.push(ddl::swap("BEGIN".into()));
    v.push(ddl::swap(state::set_phase_sql(Phase::CuttingOver)));
    v.push(ddl::swap("COMMIT".into()));
    v
}

/// (groups swapped, groups), read from the catalog: what `status` shows in phase
/// `cutting_over`.
pub async fn progress(client: &Client, plan: &Plan) -> Result<(usize, usize), db::DbError> {
    let groups = groups(plan);
    // A group is swapped once its first renamed column is gone, as its step decides; one
    // query for all of them, not one per group (hundreds on a large schema). A group with
    // no column to rename would run always ([`Group::step`]): never counted as swapped.
    let columns: Vec<(&str, &str, &str)> = groups.iter().filter_map(Group::first_renamed).collect();
    let present = db::columns_present(client, &columns).await?;
    Ok((columns.len() - present, groups.len()))
}

/// How a cutover table by table went, for the command's output.
#[derive(Debug, Default, Serialize)]
pub struct ByTableReport {
    /// Groups swapped by this run, and those an earlier run had already swapped.
    pub groups_swapped: usize,
    pub groups_already_swapped: usize,
    /// Groups whose locks did not come between the application's transactions, swapped
    /// under a pause of their own, and the longest gate of those pauses.
    pub groups_under_pause: usize,
    pub longest_group_pause_ms: f64,
    /// The longest group's transaction, in ms (what a client touching its tables could
    /// wait, retries aside), and all of them together.
    pub longest_group_ms: f64,
    pub longest_group: Option<String>,
    /// The integer FKs set aside by the groups and dropped one per transaction
    /// ([`Group::fk_drops`]), how many of them under a pause of their own, and the longest
    /// (ms, retries included): what a reader of their parent could wait.
    pub fk_drops: usize,
    pub fk_drops_under_pause: usize,
    pub longest_fk_drop_ms: f64,
    pub total_ms: f64,
    /// The application's objects over migrated columns rebuilt at the end, the gate of
    /// that pause, and those left as the application changed them during the cutover.
    pub carried: i64,
    /// How long their rebuild took (retries included), and the longest gate of a pause of
    /// its own, for a part whose locks did not come with the gates open (0 otherwise).
    pub carried_ms: f64,
    pub carried_pause_ms: f64,
    /// The transactions it took (`keyshift.carry_finish`'s parts), and how many paused.
    pub carried_parts: u32,
    pub carried_parts_under_pause: u32,
    pub carried_left_alone: Option<String>,
}

/// A transaction that rebuilds one part of the application's objects once every group is
/// swapped (`keyshift.carry_finish`, [`parts`]), its locks waited for like a group's.
pub fn finish_sql(part: &str) -> String {
    format!(
        "{};\nSET LOCAL lock_timeout = '{}ms';\n{}",
        ddl::NO_JIT,
        HELD_WAIT.as_millis(),
        carry::finish_part(part)
    )
}

/// The parts the kept objects are rebuilt in, one transaction each: `views` (the views and
/// materialized views, which lock only themselves), then each table that carries a policy,
/// trigger, rule, CHECK or statistics object (each needs that table alone).
pub async fn parts(client: &Client) -> Result<Vec<String>, db::DbError> {
    Ok(client
        .query(carry::PARTS, &[])
        .await
        .map_err(|e| db::stmt_error(carry::PARTS, e))?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// The application's objects kept by the entry for the end: how many, and those the
/// application changed or dropped since (left as it made them); None when nothing is kept
/// (no `--by-table` run entered, or its objects are already rebuilt).
pub async fn carried(client: &Client) -> Result<Option<(i64, String)>, db::DbError> {
    let kept = client
        .query_one("SELECT to_regclass('keyshift.carried') IS NOT NULL", &[])
        .await
        .map_err(|e| db::stmt_error("to_regclass('keyshift.carried')", e))?
        .get::<_, bool>(0);
    if !kept {
        return Ok(None);
    }
    let row = client
        .query_one(carry::PENDING, &[])
        .await
        .map_err(|e| db::stmt_error(carry::PENDING, e))?;
    Ok(Some((row.get(0), row.get(1))))
}

/// Step 3, once every group is swapped: phase `cut_over` (only from `cutting_over`), then
/// what a cutover leaves for after its pause.
pub async fn leave(client: &Client, plan: &Plan, settings: &Settings) -> Result<(), db::DbError> {
    db::exec(
        client,
        &state::move_phase_sql(Phase::CuttingOver, Phase::CutOver),
    )
    .await?;
    for st in ddl::after_cutover(plan) {
        db::run_step(client, &st, settings).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn children_go_first_and_each_group_locks_its_parents_then_itself_without_waiting() {
        use crate::migrate::plan::{PlanOptions, build, tests::sample};
        // connectors ← servers ← tools, and tools references itself.
        let p = build(&sample(), &PlanOptions::default());
        let groups = groups(&p);
        let labels: Vec<&str> = groups.iter().map(|g| g.label.as_str()).collect();
        assert_eq!(
            labels,
            ["public.tools", "public.servers", "public.connectors"]
        );
        // The self-reference is tools' own: one group with both of its FKs.
        assert_eq!(groups[0].fks.len(), 2);
        let sql = groups[0].sql();
        let lines: Vec<&str> = sql.lines().collect();
        assert_eq!(lines[0], "SET LOCAL jit = off;");
        assert_eq!(lines[1], "SET LOCAL lock_timeout = '50ms';");
        // Its FK to servers is renamed aside (it locks only tools), the self-reference,
        // whose parent it holds anyway, dropped.
        assert_eq!(
            lines[2],
            "LOCK TABLE public.tools IN ACCESS EXCLUSIVE MODE;"
        );
        // Its integer FKs set aside or dropped, its key promoted, its columns renamed, its
        // triggers switched.
        for want in [
            "RENAME CONSTRAINT tools_server_id_fkey TO tools_server_id_fkey_legacy",
            "DROP CONSTRAINT tools_parent_id_fkey",
            "PRIMARY KEY USING INDEX",
            "RENAME COLUMN server_id_uuid TO server_id",
            "ENABLE ALWAYS TRIGGER zz_keyshift_fill_uuid_ins",
        ] {
            assert!(sql.contains(want), "{want} in {sql}");
        }
        // The last, connectors, references nothing: it locks only itself.
        assert_eq!(
            groups[2].locks(),
            [
                "SET LOCAL lock_timeout = '50ms'",
                "LOCK TABLE public.connectors IN ACCESS EXCLUSIVE MODE"
            ]
        );
        assert!(
            matches!(groups[2].step().when, When::ColumnPresent { ref column, .. } if column == "id_uuid")
        );
    }

    #[test]
    fn components_come_with_everything_they_reach_before_them() {
        // 0 → 1 → 2 → 1 (a cycle of 1 and 2), 3 → 0, 4 alone.
        let edges = vec![vec![1], vec![2], vec![1], vec![0], vec![]];
        let comps = components(&edges);
        let pos = |n: usize| comps.iter().position(|c| c.contains(&n)).expect("placed");
        assert_eq!(comps.len(), 4);
        assert_eq!(pos(1), pos(2));
        assert!(pos(1) < pos(0) && pos(0) < pos(3));
    }

    #[test]
    fn a_long_chain_needs_no_deep_recursion() {
        let n = 100_000;
        let edges: Vec<Vec<usize>> = (0..n)
            .map(|i| if i + 1 < n { vec![i + 1] } else { vec![] })
            .collect();
        let comps = components(&edges);
        assert_eq!(comps.len(), n);
        assert_eq!(comps[0], vec![n - 1]);
    }
}
