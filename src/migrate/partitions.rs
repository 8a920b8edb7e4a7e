//! Partitioned children: an integer FK column on a declaratively partitioned table (a
//! time-partitioned `logs` with `server_id → servers(id)`) that references a migrated parent.
//!
//! Most of the migration works on the partitioned table as on any other, because PostgreSQL
//! propagates it: `ADD COLUMN` and the renames reach every partition, row triggers (the fill
//! triggers) are cloned to partitions, a CHECK added `NOT VALID` and then validated on the
//! partitioned table is validated partition by partition and proves `SET NOT NULL` there
//! without a scan, and a partition created later with `PARTITION OF` gets the columns, the
//! partitioned indexes, the foreign keys and the row triggers by itself.
//!
//! Three things do not propagate and are done here, partition by partition:
//!
//! - **Scans.** The backfill, its catch-up and verify batch each leaf partition on its own
//!   (by its integer key, or its ctid pages: ctids mean nothing across partitions), as if
//!   each were a plain child ([`expand_fks`]); the leaves are read when the command runs, so
//!   partitions created or attached since expand are included.
//! - **Indexes.** `CREATE INDEX CONCURRENTLY` is refused on a partitioned table. The mirror
//!   of an index is created `ON ONLY` the partitioned table (catalog-only, INVALID until every
//!   partition has one), then built concurrently on each leaf and attached to it; once the
//!   last leaf is attached PostgreSQL marks it valid ([`LeafOp::Index`]).
//! - **Foreign keys.** PostgreSQL before 18 refuses `NOT VALID` foreign keys on a partitioned
//!   table, and a plain `ADD FOREIGN KEY` there validates every partition under its lock. So
//!   each leaf gets the FK `NOT VALID` (brief) and `VALIDATE` (online) under the same name
//!   ([`LeafOp::ForeignKey`]), then the FK is added on the partitioned table: PostgreSQL
//!   attaches the leaves' validated, identical constraints instead of checking the rows again
//!   (measured on PostgreSQL 15: 4 ms for 2 M rows, against 670 ms for a plain add).
//!
//! In the swaps, `RENAME CONSTRAINT` and `ALTER INDEX … RENAME` on the partitioned table do
//! not reach the partitions' constraints and indexes; [`leaf_renames`] renames them inside
//! the same transaction (catalog-only), so that every partition reads as its parent does.

use tokio_postgres::Client;

use super::Settings;
use super::catalog::Table;
use super::db::{self, DbError, stmt_error};
use super::ddl::{Mode, Step, When};
use super::plan::PlanTable;
use super::plan::{Finding, Plan, PlanFk, PlanIndex};
use crate::ident::{fit, literal, qualified, quote, suffixed};

/// Work done once per leaf partition of a partitioned child, which `plan --sql` shows as one
/// step (`{leaf}` standing for each partition) and the executor ([`run`]) expands from the
/// live catalog when it runs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum LeafOp {
    /// On each leaf with no index attached to `parent_index`: `CREATE [UNIQUE] INDEX
    /// CONCURRENTLY` with `definition` (`USING … (…) INCLUDE … WHERE …`), then `ALTER INDEX
    /// parent_index ATTACH PARTITION`. The leaf's index is named after the leaf's own index
    /// of `original_index` with `suffix` (`logs_2024_server_id_idx_uuid`).
    Index {
        parent_index: String,
        original_index: String,
        unique: bool,
        definition: String,
        suffix: String,
    },
    /// Unless the partitioned table has constraint `name` already: on each leaf, `clause`
    /// added `NOT VALID` as `name` (locking `referenced` first, as the application's
    /// transactions do), then `VALIDATE`d. With `bound_to`, the leaf's constraint must use
    /// that unique index of the referenced table (see `ddl::fk_bound_check`).
    ForeignKey {
        name: String,
        referenced: String,
        clause: String,
        bound_to: Option<String>,
    },
    /// On each leaf without a valid one: `CREATE UNIQUE INDEX CONCURRENTLY <leaf><suffix> ON
    /// <leaf> (columns)`, attached to nothing: one of the unique indexes on (key, partition
    /// key) that a swap makes the leaf's primary key ([`swap_key`]).
    KeyIndex {
        suffix: String,
        columns: Vec<String>,
    },
    /// On each leaf: `DROP INDEX CONCURRENTLY` of `<leaf><suffix>`, if there.
    DropIndex { suffix: String },
}

/// Why the child of a migrated key cannot be migrated as it is, if it cannot.
pub fn child_blocker(child: &Table, column: &str, parent: &str) -> Option<Finding> {
    let cname = qualified(&child.schema, &child.name);
    let (code, problem, fix) = if child.inheritance {
        (
            "inherited-table",
            format!(
                "{cname} references {parent} and is part of an inheritance tree (INHERITS): a twin added to the parent reaches its children, but the backfill, indexes and foreign keys of each table in the tree would have to be made one by one, and a row read through the parent comes from any of them"
            ),
            "convert the tree to declarative partitioning (keyshift migrates foreign keys on partitioned tables), or exclude the parent table (--exclude) and migrate that relationship by hand",
        )
    } else if child.is_partition {
        (
            "partitioned-table",
            format!(
                "the foreign key to {parent} is declared on partition {cname} alone, not on its partitioned table"
            ),
            "declare it on the partitioned table (it then covers every partition) or drop it, or exclude the parent table",
        )
    } else if child.kind == "p" && child.sub_partitioned {
        (
            "partitioned-table",
            format!(
                "{cname} references {parent} and has partitions that are partitioned themselves: keyshift builds indexes and foreign keys one partition level deep"
            ),
            "exclude the parent table and migrate that relationship by hand",
        )
    } else if child.kind == "p" && child.partition_key.iter().any(|k| k == column) {
        (
            "partitioned-table",
            format!(
                "{cname}.{column} references {parent} and is in the partition key: after cutover the partition key would stay on the integer column, which finalize could then not drop"
            ),
            "exclude the parent table and migrate that relationship by hand",
        )
    } else {
        return None;
    };
    Some(Finding {
        code: code.into(),
        object: cname,
        problem,
        fix: fix.into(),
    })
}

fn child(f: &PlanFk) -> String {
    qualified(&f.child_schema, &f.child_table)
}

/// harden's mirror of index `i` on a partitioned child: the index `ON ONLY` the partitioned
/// table (catalog-only: a brief SHARE lock on that table alone), then built and attached
/// leaf by leaf. `definition` is the mirror's `USING … (…) …` part.
pub fn index_steps(plan: &Plan, f: &PlanFk, i: &PlanIndex, definition: &str) -> Vec<Step> {
    let unique = if i.unique { "UNIQUE " } else { "" };
    let parent_index = qualified(&f.child_schema, &i.uuid_name);
    vec![
        Step {
            sql: format!(
                "CREATE {unique}INDEX {} ON ONLY {} {definition}",
                quote(&i.uuid_name),
                child(f)
            ),
            mode: Mode::Brief,
            when: When::RelationMissing {
                name: parent_index.clone(),
            },
        },
        Step {
            sql: format!(
                "-- on each leaf partition {{leaf}} of {c} with no index attached to {parent_index}:\n\
CREATE {unique}INDEX CONCURRENTLY {{leaf_index}} ON {{leaf}} {definition}; ALTER INDEX {parent_index} ATTACH PARTITION {{leaf_index}}",
                c = child(f),
            ),
            mode: Mode::Online,
            when: When::EachLeaf {
                schema: f.child_schema.clone(),
                table: f.child_table.clone(),
                op: LeafOp::Index {
                    parent_index: i.uuid_name.clone(),
                    original_index: i.name.clone(),
                    unique: i.unique,
                    definition: definition.into(),
                    suffix: plan.uuid_suffix.clone(),
                },
            },
        },
    ]
}

/// A foreign key `clause` named `name` on a partitioned child, added without a long lock:
/// `NOT VALID` and `VALIDATE` on each leaf, then on the partitioned table, where PostgreSQL
/// reuses the leaves' validated constraints instead of scanning. `bound_check` (SQL run after
/// each add, in the same implicit transaction) refuses a constraint bound to the wrong index.
pub fn fk_steps(
    f: &PlanFk,
    name: &str,
    clause: &str,
    bound_to: Option<String>,
    bound_check: impl Fn(&str) -> String,
) -> Vec<Step> {
    let referenced = qualified(&f.parent_schema, &f.parent_table);
    let check = |table: &str| {
        if bound_to.is_some() {
            format!("; {}", bound_check(table))
        } else {
            String::new()
        }
    };
    vec![
        Step {
            sql: format!(
                "-- on each leaf partition {{leaf}} of {c} (unless {c} has {n} already):\n\
LOCK TABLE {referenced} IN SHARE ROW EXCLUSIVE MODE; ALTER TABLE {{leaf}} ADD CONSTRAINT {n} {clause} NOT VALID{leaf_check}; ALTER TABLE {{leaf}} VALIDATE CONSTRAINT {n}",
                c = child(f),
                n = quote(name),
                leaf_check = check("{leaf}"),
            ),
            mode: Mode::Online,
            when: When::EachLeaf {
                schema: f.child_schema.clone(),
                table: f.child_table.clone(),
                op: LeafOp::ForeignKey {
                    name: name.into(),
                    referenced: referenced.clone(),
                    clause: clause.into(),
                    bound_to: bound_to.clone(),
                },
            },
        },
        Step {
            sql: format!(
                "LOCK TABLE {referenced} IN SHARE ROW EXCLUSIVE MODE; ALTER TABLE {} ADD CONSTRAINT {} {clause}{}",
                child(f),
                quote(name),
                check(&child(f)),
            ),
            mode: Mode::Brief,
            when: When::ConstraintMissing {
                schema: f.child_schema.clone(),
                table: f.child_table.clone(),
                name: name.into(),
            },
        },
    ]
}

/// The swap's renames that do not reach the partitions, after the partitioned table's own:
/// each partition's constraint of the FK in force takes its parent constraint's name, and
/// the partitions' indexes of each mirrored index swap names with those of the original, so
/// that the index in use on each partition has the name its predecessor had. Cutover swaps
/// `name` with `legacy_name`, rollback `name` with `uuid_name` (the parent indexes are
/// renamed already). Catalog-only; empty for a child that is not partitioned.
pub fn leaf_renames(f: &PlanFk, after_cutover: bool) -> Vec<String> {
    if !f.child_partitioned {
        return Vec::new();
    }
    let mut v = vec![rename_leaf_constraints(f, &f.constraint)];
    for i in &f.indexes {
        let other = if after_cutover {
            &i.legacy_name
        } else {
            &i.uuid_name
        };
        v.push(swap_leaf_index_names(&f.child_schema, &i.name, other));
    }
    v
}

/// The name of leaf `leaf`'s index of a [`LeafOp::KeyIndex`] or [`LeafOp::DropIndex`].
pub fn leaf_index_name(leaf: &str, suffix: &str) -> String {
    suffixed(leaf, suffix)
}

/// The suffix of a leaf's unique index on `column` and the partition key: `_<column>_key`,
/// as harden names a plain table's (`<table>_<column>_key`).
pub fn key_index_suffix(column: &str) -> String {
    format!("_{column}_key")
}

/// The columns of `t`'s primary key with its key column named `key`, as a unique index on
/// each leaf has them.
fn key_columns(t: &PlanTable, key: &str) -> Vec<String> {
    t.partitioned_pk
        .iter()
        .map(|c| {
            if c == &t.key {
                key.to_string()
            } else {
                c.clone()
            }
        })
        .collect()
}

/// `columns` quoted, comma-separated.
fn column_list(columns: &[String]) -> String {
    columns
        .iter()
        .map(|c| quote(c).into_owned())
        .collect::<Vec<_>>()
        .join(", ")
}

/// On each leaf partition of the partitioned table `t`, a unique index on `column` (the
/// key's uuid or integer, as named when the step runs) and the partition key, built
/// concurrently, named `<leaf>_<name>_key`. harden builds them, the preparation of each swap
/// again for the leaves created or attached since.
pub fn key_index_step(t: &PlanTable, name: &str, column: &str) -> Step {
    let columns = key_columns(t, column);
    let cols = column_list(&columns);
    let suffix = key_index_suffix(name);
    Step {
        sql: format!(
            "-- on each leaf partition {{leaf}} of {tb} without a valid {{leaf}}{suffix}:\n\
CREATE UNIQUE INDEX CONCURRENTLY {{leaf}}{suffix} ON {{leaf}} ({cols})",
            tb = qualified(&t.schema, &t.name),
        ),
        mode: Mode::Online,
        when: When::EachLeaf {
            schema: t.schema.clone(),
            table: t.name.clone(),
            op: LeafOp::KeyIndex { suffix, columns },
        },
    }
}

/// On each leaf partition of `t`, `DROP INDEX CONCURRENTLY` of its [`key_index_step`] index
/// on `name` (abort, finalize).
pub fn drop_key_index_step(t: &PlanTable, name: &str) -> Step {
    let suffix = key_index_suffix(name);
    Step {
        sql: format!(
            "-- on each leaf partition {{leaf}} of {tb}:\nDROP INDEX CONCURRENTLY IF EXISTS {{leaf}}{suffix}",
            tb = qualified(&t.schema, &t.name),
        ),
        mode: Mode::Online,
        when: When::EachLeaf {
            schema: t.schema.clone(),
            table: t.name.clone(),
            op: LeafOp::DropIndex { suffix },
        },
    }
}

/// The swap of the primary key of the partitioned table `t` onto `column` (and the partition
/// key), catalog-only, as one `DO` block: it reads the leaves and, on each, its primary key's
/// name and its unique index on exactly (`column`, partition key) attached to nothing and
/// backing no constraint ([`key_index_step`]), refusing if a leaf has none; drops the
/// partitioned table's primary key (which drops the leaves' with it); makes each leaf's
/// index its primary key under the name the leaf's had (`USING INDEX`: no build); adds the
/// primary key `ON ONLY` the partitioned table (INVALID, no build) and attaches each leaf's,
/// which makes it valid. A plain `ADD PRIMARY KEY` on the partitioned table would build every
/// leaf's index again under the lock: PostgreSQL attaches only leaf indexes that already back
/// a constraint.
pub fn swap_key(t: &PlanTable, column: &str) -> String {
    let columns = key_columns(t, column);
    let tb = qualified(&t.schema, &t.name);
    let names = columns
        .iter()
        .map(|c| literal(c))
        .collect::<Vec<_>>()
        .join(", ");
    let cols = column_list(&columns);
    let pk = quote(&t.pk_constraint);
    format!(
        "DO $ks$ DECLARE r record; leaves text[] := '{{}}'; schemas text[] := '{{}}'; pks text[] := '{{}}'; idx text[] := '{{}}'; i int; BEGIN \
FOR r IN SELECT c.oid::regclass::text AS leaf, n.nspname::text AS nsp, \
coalesce((SELECT k.conname::text FROM pg_constraint k WHERE k.conrelid = c.oid AND k.contype = 'p'), c.relname || '_pkey') AS pk, \
(SELECT ic.relname::text FROM pg_index x JOIN pg_class ic ON ic.oid = x.indexrelid \
WHERE x.indrelid = c.oid AND x.indisunique AND x.indisvalid AND x.indpred IS NULL AND x.indexprs IS NULL \
AND x.indkey::text = (SELECT string_agg(a.attnum::text, ' ' ORDER BY u.o) FROM unnest(ARRAY[{names}]::text[]) WITH ORDINALITY u(name, o) \
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = u.name) \
AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = x.indexrelid AND k.conrelid = c.oid) \
AND NOT EXISTS (SELECT 1 FROM pg_inherits h WHERE h.inhrelid = x.indexrelid) ORDER BY x.indexrelid LIMIT 1) AS ix \
FROM pg_partition_tree({rel}::regclass) t JOIN pg_class c ON c.oid = t.relid JOIN pg_namespace n ON n.oid = c.relnamespace \
WHERE t.isleaf AND t.level > 0 AND c.relkind = 'r' ORDER BY 1 \
LOOP IF r.ix IS NULL THEN RAISE EXCEPTION 'keyshift: partition % has no unique index on ({cols_text}) to become its primary key: it was created or attached after the preparation; run the command again, its preparation builds one', r.leaf; END IF; \
leaves := leaves || r.leaf; schemas := schemas || r.nsp; pks := pks || r.pk; idx := idx || r.ix; END LOOP; \
ALTER TABLE {tb} DROP CONSTRAINT {pk}; \
FOR i IN 1 .. coalesce(array_length(leaves, 1), 0) LOOP \
EXECUTE format('ALTER TABLE %s ADD CONSTRAINT %I PRIMARY KEY USING INDEX %I', leaves[i], pks[i], idx[i]); END LOOP; \
ALTER TABLE ONLY {tb} ADD CONSTRAINT {pk} PRIMARY KEY ({cols}); \
FOR i IN 1 .. coalesce(array_length(leaves, 1), 0) LOOP \
EXECUTE format('ALTER INDEX %s ATTACH PARTITION %I.%I', {pkidx}, schemas[i], pks[i]); END LOOP; END $ks$",
        rel = literal(&tb),
        cols_text = columns.join(", ").replace('\'', "''"),
        pkidx = literal(&qualified(&t.schema, &t.pk_constraint)),
    )
}

/// Every partition's constraint attached to `child`'s constraint `name` takes that name.
fn rename_leaf_constraints(f: &PlanFk, name: &str) -> String {
    let n = literal(name);
    format!(
        "DO $ks$ DECLARE r record; BEGIN \
FOR r IN WITH RECURSIVE t(oid) AS (\
SELECT oid FROM pg_constraint WHERE conrelid = {rel}::regclass AND conname = {n} AND conparentid = 0 \
UNION ALL SELECT c.oid FROM pg_constraint c JOIN t ON c.conparentid = t.oid) \
SELECT c.conrelid::regclass AS rel, c.conname::text AS old FROM pg_constraint c JOIN t ON t.oid = c.oid WHERE c.conname <> {n} \
LOOP EXECUTE format('ALTER TABLE %s RENAME CONSTRAINT %I TO %I', r.rel, r.old, {n}); END LOOP; END $ks$",
        rel = literal(&child(f)),
    )
}

/// On each partition that has an index attached to `a` and one attached to `b`, the two
/// swap names (through a temporary name, all in the swap's transaction).
fn swap_leaf_index_names(schema: &str, a: &str, b: &str) -> String {
    format!(
        "DO $ks$ DECLARE r record; BEGIN \
FOR r IN SELECT ia.inhrelid AS a, ib.inhrelid AS b, ca.relname::text AS an, cb.relname::text AS bn \
FROM pg_inherits ia JOIN pg_index xa ON xa.indexrelid = ia.inhrelid \
JOIN pg_index xb ON xb.indrelid = xa.indrelid JOIN pg_inherits ib ON ib.inhrelid = xb.indexrelid \
JOIN pg_class ca ON ca.oid = ia.inhrelid JOIN pg_class cb ON cb.oid = ib.inhrelid \
WHERE ia.inhparent = {a}::regclass AND ib.inhparent = {b}::regclass \
LOOP EXECUTE format('ALTER INDEX %s RENAME TO %I', r.a::regclass, 'keyshift_swap_' || r.a); \
EXECUTE format('ALTER INDEX %s RENAME TO %I', r.b::regclass, r.an); \
EXECUTE format('ALTER INDEX %s RENAME TO %I', r.a::regclass, r.bn); END LOOP; END $ks$",
        a = literal(&qualified(schema, a)),
        b = literal(&qualified(schema, b)),
    )
}

/// Constraints `name` standing alone on partitions of `f`'s child: built on each leaf, not
/// yet on the partitioned table, by a harden (for abort) or a rollback (for finalize) that
/// stopped in between. They need the parent's unique index, which abort drops, and after
/// cutover they duplicate the FK in force.
pub fn drop_leaf_constraints(f: &PlanFk, name: &str) -> Option<Step> {
    if !f.child_partitioned {
        return None;
    }
    let n = literal(name);
    Some(Step {
        sql: format!(
            "DO $ks$ DECLARE r record; BEGIN \
FOR r IN SELECT c.conrelid::regclass AS rel FROM pg_partition_tree({rel}::regclass) t JOIN pg_constraint c ON c.conrelid = t.relid \
WHERE t.level > 0 AND c.conname = {n} AND c.conparentid = 0 \
LOOP EXECUTE format('ALTER TABLE %s DROP CONSTRAINT %I', r.rel, {n}); END LOOP; END $ks$",
            rel = literal(&child(f)),
        ),
        mode: Mode::Brief,
        when: When::Always,
    })
}

/// Drops from every partition of the partitioned table `schema.table` a CHECK named `name`
/// that is the partition's own, as the partitioned table's that it copied is gone: a table
/// attached while the partitioned table has a CHECK must have one of its own of the same
/// name and expression (PostgreSQL refuses the ATTACH otherwise), and that copy stays when
/// the partitioned table's is dropped. Catalog-only; run after dropping the partitioned
/// table's, in the same transaction.
pub fn drop_leaf_checks(schema: &str, table: &str, name: &str) -> String {
    let n = literal(name);
    format!(
        "DO $ks$ DECLARE r record; BEGIN \
FOR r IN SELECT c.conrelid::regclass AS rel FROM pg_partition_tree({rel}::regclass) t JOIN pg_constraint c ON c.conrelid = t.relid \
WHERE t.level > 0 AND c.contype = 'c' AND c.conname = {n} AND c.coninhcount = 0 \
LOOP EXECUTE format('ALTER TABLE %s DROP CONSTRAINT %I', r.rel, {n}); END LOOP; END $ks$",
        rel = literal(&qualified(schema, table)),
    )
}

/// The leaf partitions of `schema.table` (plain tables; foreign-table partitions have no
/// indexes or foreign keys of their own), in name order.
pub async fn leaves(
    client: &Client,
    schema: &str,
    table: &str,
) -> Result<Vec<(String, String)>, DbError> {
    const SQL: &str = "SELECT n.nspname::text, c.relname::text \
        FROM pg_partition_tree(to_regclass(format('%I.%I', $1::text, $2::text))) t \
        JOIN pg_class c ON c.oid = t.relid JOIN pg_namespace n ON n.oid = c.relnamespace \
        WHERE t.isleaf AND t.level > 0 AND c.relkind = 'r' ORDER BY 1, 2";
    let rows = client
        .query(SQL, &[&schema, &table])
        .await
        .map_err(|e| stmt_error(SQL, e))?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// The leaf partitions of the partitioned table `t` without a valid [`key_index_step`]
/// index on `name` (missing, or INVALID), qualified.
pub async fn leaves_without_key_index(
    client: &Client,
    t: &PlanTable,
    name: &str,
) -> Result<Vec<String>, DbError> {
    const SQL: &str = "SELECT coalesce(bool_or(i.indisvalid), false) FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid \
        JOIN pg_namespace n ON n.oid = ic.relnamespace WHERE n.nspname = $1 AND ic.relname = $2";
    let suffix = key_index_suffix(name);
    let mut out = Vec::new();
    for (ls, lt) in leaves(client, &t.schema, &t.name).await? {
        let index = leaf_index_name(&lt, &suffix);
        let r = client
            .query_one(SQL, &[&ls, &index])
            .await
            .map_err(|e| stmt_error(SQL, e))?;
        if !r.get::<_, bool>(0) {
            out.push(qualified(&ls, &lt));
        }
    }
    Ok(out)
}

/// `f` as the FK of one leaf partition: the same columns and parent, the leaf as the child.
/// Its row estimate is read again by the backfill.
fn on_leaf(f: &PlanFk, schema: &str, table: &str) -> PlanFk {
    PlanFk {
        child_schema: schema.into(),
        child_table: table.into(),
        child_row_estimate: 0,
        child_partitioned: false,
        ..f.clone()
    }
}

/// The FKs of `f` to scan: `f` itself, or one per leaf partition of a partitioned child.
pub async fn leaf_fks(client: &Client, f: &PlanFk) -> Result<Vec<PlanFk>, DbError> {
    if !f.child_partitioned {
        return Ok(vec![f.clone()]);
    }
    Ok(leaves(client, &f.child_schema, &f.child_table)
        .await?
        .iter()
        .map(|(s, t)| on_leaf(f, s, t))
        .collect())
}

/// Every FK of the plan as the backfill and verify scan them, in plan order: a partitioned
/// child's replaced by one per leaf partition, read from the live catalog.
pub async fn expand_fks(client: &Client, plan: &Plan) -> Result<Vec<PlanFk>, DbError> {
    let mut v = Vec::new();
    for (_, f) in plan.foreign_keys() {
        v.extend(leaf_fks(client, f).await?);
    }
    Ok(v)
}

/// Runs `op` on each leaf partition of `schema.table` that still needs it; returns whether
/// anything ran. Each leaf's statements are ordinary steps with their own conditions, so a
/// rerun resumes at the first leaf (or the first statement) not done.
pub async fn run(
    client: &Client,
    schema: &str,
    table: &str,
    op: &LeafOp,
    s: &Settings,
) -> Result<bool, DbError> {
    if let LeafOp::ForeignKey { name, .. } = op {
        let parent_has_it = When::ConstraintPresent {
            schema: schema.into(),
            table: table.into(),
            name: name.clone(),
        };
        if db::needed(client, &parent_has_it).await? {
            return Ok(false);
        }
    }
    let mut ran = false;
    for (ls, lt) in leaves(client, schema, table).await? {
        for st in leaf_steps(client, schema, op, &ls, &lt).await? {
            ran |= db::run_one(client, &st, s).await?;
        }
    }
    Ok(ran)
}

/// The steps of `op` on one leaf (none when its index is attached already).
async fn leaf_steps(
    client: &Client,
    schema: &str,
    op: &LeafOp,
    leaf_schema: &str,
    leaf: &str,
) -> Result<Vec<Step>, DbError> {
    let rel = qualified(leaf_schema, leaf);
    Ok(match op {
        LeafOp::Index {
            parent_index,
            original_index,
            unique,
            definition,
            suffix,
        } => {
            let parent = qualified(schema, parent_index);
            if attached_index(client, &parent, &rel).await?.is_some() {
                return Ok(Vec::new());
            }
            let name =
                match attached_index(client, &qualified(schema, original_index), &rel).await? {
                    Some(orig) => suffixed(&orig, suffix),
                    None => fit(&format!("{leaf}_{parent_index}")),
                };
            leaf_index_steps(&parent, *unique, definition, leaf_schema, leaf, &name)
        }
        LeafOp::KeyIndex { suffix, columns } => {
            let name = leaf_index_name(leaf, suffix);
            let cols = column_list(columns);
            vec![Step {
                sql: format!(
                    "CREATE UNIQUE INDEX CONCURRENTLY {} ON {rel} ({cols})",
                    quote(&name)
                ),
                mode: Mode::Online,
                when: When::IndexNotValid {
                    schema: leaf_schema.into(),
                    name,
                },
            }]
        }
        LeafOp::DropIndex { suffix } => {
            let name = leaf_index_name(leaf, suffix);
            vec![Step {
                sql: format!(
                    "DROP INDEX CONCURRENTLY IF EXISTS {}",
                    qualified(leaf_schema, &name)
                ),
                mode: Mode::Online,
                when: When::IndexPresent {
                    schema: leaf_schema.into(),
                    name,
                },
            }]
        }
        LeafOp::ForeignKey {
            name,
            referenced,
            clause,
            bound_to,
        } => leaf_fk_steps(
            name,
            referenced,
            clause,
            bound_to.as_deref(),
            leaf_schema,
            leaf,
        ),
    })
}

/// The name of `leaf`'s index attached to the partitioned index `parent`, if any.
async fn attached_index(
    client: &Client,
    parent: &str,
    leaf: &str,
) -> Result<Option<String>, DbError> {
    const SQL: &str = "SELECT ic.relname::text FROM pg_inherits ih \
        JOIN pg_index x ON x.indexrelid = ih.inhrelid JOIN pg_class ic ON ic.oid = ih.inhrelid \
        WHERE ih.inhparent = to_regclass($1) AND x.indrelid = to_regclass($2)";
    let row = client
        .query_opt(SQL, &[&parent, &leaf])
        .await
        .map_err(|e| stmt_error(SQL, e))?;
    Ok(row.map(|r| r.get(0)))
}

fn leaf_index_steps(
    parent: &str,
    unique: bool,
    definition: &str,
    leaf_schema: &str,
    leaf: &str,
    name: &str,
) -> Vec<Step> {
    vec![
        Step {
            sql: format!(
                "CREATE {}INDEX CONCURRENTLY {} ON {} {definition}",
                if unique { "UNIQUE " } else { "" },
                quote(name),
                qualified(leaf_schema, leaf),
            ),
            mode: Mode::Online,
            when: When::IndexNotValid {
                schema: leaf_schema.into(),
                name: name.into(),
            },
        },
        // Checked by the caller: the leaf has no index attached yet.
        Step {
            sql: format!(
                "ALTER INDEX {parent} ATTACH PARTITION {}",
                qualified(leaf_schema, name)
            ),
            mode: Mode::Brief,
            when: When::Always,
        },
    ]
}

fn leaf_fk_steps(
    name: &str,
    referenced: &str,
    clause: &str,
    bound_to: Option<&str>,
    leaf_schema: &str,
    leaf: &str,
) -> Vec<Step> {
    let rel = qualified(leaf_schema, leaf);
    let check = bound_to
        .map(|idx| format!("; {}", super::ddl::fk_bound_check(&rel, name, idx)))
        .unwrap_or_default();
    vec![
        Step {
            sql: format!(
                "LOCK TABLE {referenced} IN SHARE ROW EXCLUSIVE MODE; ALTER TABLE {rel} ADD CONSTRAINT {} {clause} NOT VALID{check}",
                quote(name)
            ),
            mode: Mode::Brief,
            when: When::ConstraintMissing {
                schema: leaf_schema.into(),
                table: leaf.into(),
                name: name.into(),
            },
        },
        Step {
            sql: format!("ALTER TABLE {rel} VALIDATE CONSTRAINT {}", quote(name)),
            mode: Mode::Online,
            when: When::ConstraintNotValidated {
                schema: leaf_schema.into(),
                table: leaf.into(),
                name: name.into(),
            },
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaf_fk_is_added_not_valid_then_validated_under_the_same_name() {
        let s = leaf_fk_steps(
            "logs_server_id_fkey_uuid",
            "public.servers",
            "FOREIGN KEY (server_id_uuid) REFERENCES public.servers (id_uuid) ON DELETE NO ACTION ON UPDATE NO ACTION",
            None,
            "public",
            "logs_2024",
        );
        assert_eq!(
            s[0].sql,
            "LOCK TABLE public.servers IN SHARE ROW EXCLUSIVE MODE; ALTER TABLE public.logs_2024 ADD CONSTRAINT logs_server_id_fkey_uuid FOREIGN KEY (server_id_uuid) REFERENCES public.servers (id_uuid) ON DELETE NO ACTION ON UPDATE NO ACTION NOT VALID"
        );
        assert_eq!(s[0].mode, Mode::Brief);
        assert_eq!(
            s[1].sql,
            "ALTER TABLE public.logs_2024 VALIDATE CONSTRAINT logs_server_id_fkey_uuid"
        );
        assert_eq!(s[1].mode, Mode::Online);
        let bound = leaf_fk_steps(
            "c",
            "public.p",
            "FOREIGN KEY (a) REFERENCES public.p (id)",
            Some("public.p_key"),
            "public",
            "l1",
        );
        assert!(
            bound[0].sql.contains("NOT VALID; DO $ks$"),
            "{}",
            bound[0].sql
        );
    }

    #[test]
    fn leaf_index_is_built_concurrently_then_attached() {
        let s = leaf_index_steps(
            "public.logs_server_id_idx_uuid",
            false,
            "USING btree (server_id_uuid)",
            "public",
            "logs_2024",
            "logs_2024_server_id_idx_uuid",
        );
        assert_eq!(
            s[0].sql,
            "CREATE INDEX CONCURRENTLY logs_2024_server_id_idx_uuid ON public.logs_2024 USING btree (server_id_uuid)"
        );
        assert_eq!(
            s[0].when,
            When::IndexNotValid {
                schema: "public".into(),
                name: "logs_2024_server_id_idx_uuid".into()
            }
        );
        assert_eq!(
            s[1].sql,
            "ALTER INDEX public.logs_server_id_idx_uuid ATTACH PARTITION public.logs_2024_server_id_idx_uuid"
        );
    }

    #[test]
    fn only_plain_and_single_level_partitioned_children_pass() {
        let mut t = Table {
            schema: "public".into(),
            name: "logs".into(),
            kind: "p".into(),
            partition_key: vec!["created_at".into()],
            ..Default::default()
        };
        assert_eq!(child_blocker(&t, "server_id", "public.servers"), None);
        let blocked =
            |t: &Table, col: &str| child_blocker(t, col, "public.servers").map(|f| f.code);
        assert_eq!(
            blocked(&t, "created_at").as_deref(),
            Some("partitioned-table")
        );
        t.sub_partitioned = true;
        assert_eq!(
            blocked(&t, "server_id").as_deref(),
            Some("partitioned-table")
        );
        t.sub_partitioned = false;
        t.kind = "r".into();
        t.is_partition = true;
        assert_eq!(
            blocked(&t, "server_id").as_deref(),
            Some("partitioned-table")
        );
        t.is_partition = false;
        t.inheritance = true;
        assert_eq!(blocked(&t, "server_id").as_deref(), Some("inherited-table"));
    }
}
