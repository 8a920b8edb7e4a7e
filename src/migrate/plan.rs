//! The planner: a pure function of (catalog, options) to a [`Plan`]. The plan is what gets
//! stored (as JSON) in `keyshift.migration`, so the proxy, `cutover` and every later command
//! work from the same decisions that `expand` made, even if the catalog changes meanwhile.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::catalog::{Catalog, Table};
use crate::ident::{qualified, suffixed};

/// Bumped when the stored JSON changes shape; `state::load` refuses plans it does not know.
pub const PLAN_FORMAT: u32 = 1;

/// What the operator chose (flags and config).
#[derive(Debug, Clone, PartialEq)]
pub struct PlanOptions {
    pub schemas: Vec<String>,
    /// `name` (in any chosen schema) or `schema.name`; empty means every eligible table.
    pub tables: Vec<String>,
    pub exclude: Vec<String>,
    pub uuid_version: u8,
    pub uuid_suffix: String,
    pub legacy_suffix: String,
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions {
            schemas: vec!["public".into()],
            tables: Vec::new(),
            exclude: Vec::new(),
            uuid_version: 7,
            uuid_suffix: "_uuid".into(),
            legacy_suffix: "_legacy".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum FkAction {
    NoAction,
    Restrict,
    Cascade,
    SetNull,
    SetDefault,
}

impl FkAction {
    pub fn from_code(c: &str) -> FkAction {
        match c {
            "r" => FkAction::Restrict,
            "c" => FkAction::Cascade,
            "n" => FkAction::SetNull,
            "d" => FkAction::SetDefault,
            _ => FkAction::NoAction,
        }
    }
    pub fn sql(self) -> &'static str {
        match self {
            FkAction::NoAction => "NO ACTION",
            FkAction::Restrict => "RESTRICT",
            FkAction::Cascade => "CASCADE",
            FkAction::SetNull => "SET NULL",
            FkAction::SetDefault => "SET DEFAULT",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub format: u32,
    pub uuid_version: u8,
    pub uuid_suffix: String,
    pub legacy_suffix: String,
    /// Migrated tables, parents before children.
    pub tables: Vec<PlanTable>,
    pub skipped: Vec<Skipped>,
    pub blockers: Vec<Finding>,
    pub warnings: Vec<Finding>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanTable {
    pub schema: String,
    pub name: String,
    /// The integer key column and its type (`smallint`, `integer`, `bigint`).
    pub key: String,
    pub key_type: String,
    /// `serial`, `identity` or `plain`.
    pub key_kind: String,
    pub uuid_column: String,
    pub legacy_column: String,
    pub pk_constraint: String,
    pub pk_index: String,
    /// Unique index built on `uuid_column`; it becomes the primary key at cutover.
    pub uuid_index: String,
    /// `CHECK (uuid_column IS NOT NULL)`, so that cutover's SET NOT NULL needs no scan.
    pub not_null_check: String,
    pub row_estimate: i64,
    pub referenced_by: Vec<PlanFk>,
    /// A partitioned table keyed (integer key, partition key): its primary key's columns in
    /// order, the key among them. Its unique indexes are built on each leaf partition and the
    /// swaps rebuild the partitioned primary key from them ([`super::partitions`]). Empty for
    /// a plain table, and absent from plans that have none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub partitioned_pk: Vec<String>,
}

impl PlanTable {
    /// Whether the table is partitioned (its key is migrated leaf by leaf).
    pub fn partitioned(&self) -> bool {
        !self.partitioned_pk.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanFk {
    pub constraint: String,
    pub child_schema: String,
    pub child_table: String,
    pub child_column: String,
    pub child_type: String,
    pub child_not_null: bool,
    pub parent_schema: String,
    pub parent_table: String,
    pub parent_key: String,
    pub parent_uuid_column: String,
    pub on_delete: FkAction,
    pub on_update: FkAction,
    pub deferrable: bool,
    pub initially_deferred: bool,
    /// The twin column filled with the parent's uuid.
    pub uuid_column: String,
    pub legacy_column: String,
    /// The FK `uuid_column → parent(parent_uuid_column)` built by harden.
    pub shadow_constraint: String,
    /// `CHECK (uuid_column IS NOT NULL)` for NOT NULL FK columns, built before cutover.
    pub not_null_check: Option<String>,
    /// The child's single integer key used for keyset batches; `None`: batches by ctid pages.
    pub child_batch_key: Option<String>,
    pub child_row_estimate: i64,
    /// Indexes on the FK column, mirrored onto the twin.
    pub indexes: Vec<PlanIndex>,
    /// The child is a partitioned table: its twin, indexes and foreign keys are built per
    /// partition as well ([`super::partitions`]). Absent from plans that have none.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub child_partitioned: bool,
}

impl PlanFk {
    pub fn indexed(&self) -> bool {
        !self.indexes.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanIndex {
    pub name: String,
    /// The mirror's name before cutover; it takes `name` at cutover.
    pub uuid_name: String,
    /// The original index's name after cutover.
    pub legacy_name: String,
    pub unique: bool,
    pub method: String,
    /// Key columns as PostgreSQL prints them; `fk_position` is the FK column among them.
    pub key_columns: Vec<String>,
    pub key_options: Vec<String>,
    pub fk_position: usize,
    pub include_columns: Vec<String>,
    pub predicate: Option<String>,
    /// When the original index backs a UNIQUE constraint: its `DEFERRABLE …` clause (empty
    /// when not deferrable). Cutover makes the mirror a constraint of the same name.
    #[serde(default)]
    pub unique_constraint: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Skipped {
    pub table: String,
    pub reason: String,
}

/// A blocker or a warning: what is wrong and what the operator can do about it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Finding {
    pub code: String,
    pub object: String,
    pub problem: String,
    pub fix: String,
}

impl Plan {
    pub fn is_blocked(&self) -> bool {
        !self.blockers.is_empty()
    }

    pub fn foreign_keys(&self) -> impl Iterator<Item = (&PlanTable, &PlanFk)> {
        self.tables
            .iter()
            .flat_map(|t| t.referenced_by.iter().map(move |f| (t, f)))
    }

    pub fn table(&self, schema: &str, name: &str) -> Option<&PlanTable> {
        self.tables
            .iter()
            .find(|t| t.schema == schema && t.name == name)
    }
}

/// The integer key of a partitioned table whose primary key is that one column plus exactly
/// its partition key (`PRIMARY KEY (id, created_at)`, `PARTITION BY RANGE (created_at)`), the
/// shape keyshift migrates to (uuid, partition key). `None` for any other shape, or when a
/// partition is partitioned itself (indexes are built one level deep).
pub fn partitioned_key(t: &Table) -> Option<&String> {
    let pk = t.primary_key.as_ref()?;
    if t.kind != "p" || t.sub_partitioned || t.partition_key.is_empty() {
        return None;
    }
    let rest: Vec<&String> = pk
        .columns
        .iter()
        .filter(|c| !t.partition_key.contains(c))
        .collect();
    let all_in = t.partition_key.iter().all(|k| pk.columns.contains(k));
    (rest.len() == 1 && all_in && pk.columns.len() == t.partition_key.len() + 1).then(|| rest[0])
}

fn is_int(type_name: &str) -> bool {
    matches!(type_name, "smallint" | "integer" | "bigint")
}

fn matches_name(pattern: &str, t: &Table) -> bool {
    match pattern.split_once('.') {
        Some((s, n)) => s == t.schema && n == t.name,
        None => pattern == t.name,
    }
}

fn finding(code: &str, object: String, problem: String, fix: &str) -> Finding {
    Finding {
        code: code.into(),
        object,
        problem,
        fix: fix.into(),
    }
}

/// Whether `source` (lower-cased) uses `word` as a whole identifier.
fn mentions(source: &str, word: &str) -> bool {
    let ident = |c: char| c.is_alphanumeric() || c == '_' || c == '$';
    source.match_indices(word).any(|(i, _)| {
        let before = source[..i].chars().next_back();
        let after = source[i + word.len()..].chars().next();
        !before.is_some_and(ident) && !after.is_some_and(ident)
    })
}

/// Builds the plan. Pure: everything it knows comes from `cat` and `opts`.
pub fn build(cat: &Catalog, opts: &PlanOptions) -> Plan {
    let mut blockers = Vec::new();
    let mut warnings = Vec::new();
    let mut skipped = Vec::new();

    for pat in opts.tables.iter().chain(&opts.exclude) {
        if !cat.tables.iter().any(|t| matches_name(pat, t)) {
            blockers.push(finding(
                "unknown-table",
                pat.clone(),
                format!("--table/--exclude names {pat:?}, which is not a table"),
                "check the spelling; write schema.table for a table outside the chosen schemas",
            ));
        }
    }

    // Which tables get their key migrated.
    let mut chosen: Vec<&Table> = Vec::new();
    for t in &cat.tables {
        let in_schema = opts.schemas.iter().any(|s| s == &t.schema);
        let named = opts.tables.iter().any(|p| matches_name(p, t));
        if !(named || (in_schema && opts.tables.is_empty())) {
            continue;
        }
        if opts.exclude.iter().any(|p| matches_name(p, t)) {
            continue;
        }
        let tname = qualified(&t.schema, &t.name);
        if t.is_partition {
            // Everything keyshift does to a partition goes through its partitioned table.
            skipped.push(Skipped {
                table: tname,
                reason: "a partition: migrated with its partitioned table".into(),
            });
            continue;
        }
        let key = match &t.primary_key {
            None => {
                skipped.push(Skipped {
                    table: tname,
                    reason: "no primary key".into(),
                });
                continue;
            }
            // (id, created_at): the usual key of a partitioned table, which must include
            // the partition key; migrated to (uuid, created_at).
            Some(pk) if pk.columns.len() != 1 => {
                if let Some(k) = partitioned_key(t) {
                    k
                } else {
                    let reason = if t.kind == "p" {
                        // Its FKs to migrated tables are still migrated.
                        format!(
                            "partitioned table with primary key ({}): keyshift migrates the key of a partitioned table whose primary key is one integer column plus exactly its partition key, partitioned one level deep (its foreign keys to migrated tables are migrated)",
                            pk.columns.join(", ")
                        )
                    } else {
                        format!("composite primary key ({})", pk.columns.join(", "))
                    };
                    skipped.push(Skipped {
                        table: tname,
                        reason,
                    });
                    continue;
                }
            }
            Some(pk) => &pk.columns[0],
        };
        let Some(col) = t.columns.iter().find(|c| &c.name == key) else {
            continue;
        };
        if !is_int(&col.type_name) {
            skipped.push(Skipped {
                table: tname,
                reason: format!(
                    "primary key {} is {}, not an integer",
                    col.name, col.type_name
                ),
            });
            continue;
        }
        chosen.push(t);
    }
    if chosen.is_empty() {
        blockers.push(finding(
            "nothing-to-migrate",
            opts.schemas.join(", "),
            "no table with a single smallint, integer or bigint primary key was selected".into(),
            "choose schemas with --schema or tables with --table",
        ));
    }

    let find_table = |schema: &str, name: &str| {
        cat.tables
            .iter()
            .find(|t| t.schema == schema && t.name == name)
    };

    // Dependency order: parents before children (Kahn), ties and cycles by name.
    let keys: Vec<(String, String)> = chosen
        .iter()
        .map(|t| (t.schema.clone(), t.name.clone()))
        .collect();
    let mut parents_of: BTreeMap<(String, String), BTreeSet<(String, String)>> =
        keys.iter().map(|k| (k.clone(), BTreeSet::new())).collect();
    for fk in &cat.foreign_keys {
        let c = (fk.child_schema.clone(), fk.child_table.clone());
        let p = (fk.parent_schema.clone(), fk.parent_table.clone());
        if c != p
            && parents_of.contains_key(&p)
            && let Some(set) = parents_of.get_mut(&c)
        {
            set.insert(p);
        }
    }
    let mut order: Vec<(String, String)> = Vec::new();
    let mut left: BTreeSet<(String, String)> = keys.iter().cloned().collect();
    while !left.is_empty() {
        let ready = left
            .iter()
            .find(|k| {
                parents_of
                    .get(*k)
                    .is_none_or(|ps| ps.iter().all(|p| !left.contains(p)))
            })
            .cloned();
        // A cycle: take the first by name and carry on.
        let next = ready.unwrap_or_else(|| left.iter().next().cloned().unwrap_or_default());
        left.remove(&next);
        order.push(next);
    }

    let mut tables = Vec::new();
    for (schema, name) in &order {
        let Some(t) = find_table(schema, name) else {
            continue;
        };
        let Some(pk) = &t.primary_key else { continue };
        let key = match partitioned_key(t) {
            Some(k) if pk.columns.len() > 1 => k.to_string(),
            _ => pk.columns[0].clone(),
        };
        let partitioned_pk = if pk.columns.len() > 1 {
            pk.columns.clone()
        } else {
            Vec::new()
        };
        let Some(col) = t.columns.iter().find(|c| c.name == key) else {
            continue;
        };
        let tname = qualified(&t.schema, &t.name);
        let key_kind = if col.identity.is_some() {
            "identity"
        } else if col
            .default
            .as_deref()
            .is_some_and(|d| d.starts_with("nextval("))
        {
            "serial"
        } else {
            "plain"
        };
        if (t.kind == "p" && partitioned_pk.is_empty()) || t.is_partition {
            // A partitioned table keyed by its partition key alone: after cutover the
            // partition key would stay on the integer column.
            blockers.push(finding(
                "partitioned-table",
                tname.clone(),
                "the primary key of a partitioned table is its partition key (or the table is a partition): after cutover the partition key would stay on the integer column".into(),
                "exclude the table (--exclude) and migrate its key by hand; its foreign keys to other migrated tables are still migrated",
            ));
        } else if t.inheritance {
            blockers.push(finding(
                "inherited-table",
                tname.clone(),
                "the table is part of an inheritance tree (INHERITS): the uuid column added to a parent reaches its children, but PostgreSQL does not inherit primary keys, unique indexes or foreign keys, so each table of the tree would need its own backfill, key and constraints, and a row read through the parent comes from any of them; keyshift migrates nothing of the tree".into(),
                "convert the tree to declarative partitioning (keyshift migrates a partitioned table keyed (id, partition key)), or exclude the table (--exclude) and migrate it by hand",
            ));
        }
        let uuid_column = suffixed(&key, &opts.uuid_suffix);
        let legacy_column = suffixed(&key, &opts.legacy_suffix);
        for c in [&uuid_column, &legacy_column] {
            if t.columns.iter().any(|x| &x.name == c) {
                blockers.push(finding(
                    "name-collision",
                    format!("{tname}.{c}"),
                    format!("column {c} already exists; keyshift needs that name"),
                    "rename the column, or choose other names with uuid_suffix / legacy_suffix",
                ));
            }
        }
        let mut pt = PlanTable {
            schema: t.schema.clone(),
            name: t.name.clone(),
            key: key.clone(),
            key_type: col.type_name.clone(),
            key_kind: key_kind.into(),
            uuid_index: suffixed(&format!("{}_{}", t.name, uuid_column), "_key"),
            not_null_check: suffixed(&format!("{}_{}", t.name, uuid_column), "_not_null"),
            uuid_column,
            legacy_column,
            pk_constraint: pk.constraint.clone(),
            pk_index: pk.index.clone(),
            row_estimate: t.row_estimate,
            referenced_by: Vec::new(),
            partitioned_pk,
        };
        if cat
            .indexes
            .iter()
            .any(|i| i.schema == t.schema && i.name == pt.uuid_index)
        {
            blockers.push(finding(
                "name-collision",
                qualified(&t.schema, &pt.uuid_index),
                format!("an index named {} already exists", pt.uuid_index),
                "rename or drop that index",
            ));
        }
        for fk in cat
            .foreign_keys
            .iter()
            .filter(|f| f.parent_schema == t.schema && f.parent_table == t.name)
        {
            if !fk.parent_columns.contains(&key) {
                continue;
            }
            let fkname = format!(
                "{} on {}",
                fk.name,
                qualified(&fk.child_schema, &fk.child_table)
            );
            if fk.parent_columns.len() != 1 && pt.partitioned() {
                // PostgreSQL requires a foreign key to a partitioned table to include the
                // partition key, so nothing can reference this one by its key alone.
                blockers.push(finding(
                    "fk-to-partitioned-key",
                    fkname,
                    format!(
                        "foreign key ({}) references the partitioned table {tname}({}): keyshift migrates the key of a partitioned table only when no foreign key references it (it would have to carry the composite foreign key to ({}, {}) and its child's columns too)",
                        fk.child_columns.join(", "),
                        fk.parent_columns.join(", "),
                        pt.uuid_column,
                        pt.partitioned_pk
                            .iter()
                            .filter(|c| **c != key)
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    "exclude the table (--exclude): its key stays integer and the foreign key is left alone, while its own foreign keys to migrated tables are still migrated; or drop the foreign key before expand and add it back on the uuid key after finalize",
                ));
                continue;
            }
            if fk.parent_columns.len() != 1 {
                blockers.push(finding(
                    "composite-fk",
                    fkname,
                    format!(
                        "composite foreign key ({}) references {tname}({})",
                        fk.child_columns.join(", "),
                        fk.parent_columns.join(", ")
                    ),
                    "drop or rewrite the foreign key to reference the key alone, or exclude the table",
                ));
                continue;
            }
            if fk.parent_index != pk.index {
                blockers.push(finding(
                    "fk-to-non-key-unique",
                    fkname,
                    format!(
                        "foreign key references {tname}({key}) through unique index {} instead of the primary key",
                        fk.parent_index
                    ),
                    "recreate the foreign key so that it uses the primary key, or exclude the table",
                ));
                continue;
            }
            let Some(child) = find_table(&fk.child_schema, &fk.child_table) else {
                continue;
            };
            let ccol_name = fk.child_columns[0].clone();
            let Some(ccol) = child.columns.iter().find(|c| c.name == ccol_name) else {
                continue;
            };
            let cname = qualified(&child.schema, &child.name);
            blockers.extend(super::partitions::child_blocker(child, &ccol_name, &tname));
            let uuid_col = suffixed(&ccol_name, &opts.uuid_suffix);
            let legacy_col = suffixed(&ccol_name, &opts.legacy_suffix);
            for c in [&uuid_col, &legacy_col] {
                if child.columns.iter().any(|x| &x.name == c) {
                    blockers.push(finding(
                        "name-collision",
                        format!("{cname}.{c}"),
                        format!("column {c} already exists; keyshift needs that name"),
                        "rename the column, or choose other names with uuid_suffix / legacy_suffix",
                    ));
                }
            }
            if fk.on_delete == "d" || fk.on_update == "d" {
                warnings.push(finding(
                    "set-default-action",
                    fkname.clone(),
                    "ON DELETE/UPDATE SET DEFAULT: the uuid twin is set to its own default (NULL)"
                        .into(),
                    "verify reports such rows; prefer SET NULL or CASCADE",
                ));
            }
            if !fk.validated {
                warnings.push(finding(
                    "fk-not-validated",
                    fkname.clone(),
                    "the foreign key is NOT VALID: orphans may exist and will make harden's VALIDATE fail".into(),
                    "VALIDATE the constraint (or delete the orphans) before harden",
                ));
            }
            let child_batch_key = child
                .primary_key
                .as_ref()
                .filter(|pk| pk.columns.len() == 1)
                .and_then(|pk| child.columns.iter().find(|c| c.name == pk.columns[0]))
                .filter(|c| is_int(&c.type_name))
                .map(|c| c.name.clone());
            let indexes = cat
                .indexes
                .iter()
                .filter(|i| {
                    i.schema == child.schema && i.table == child.name && !i.primary && i.valid
                })
                .filter_map(|i| {
                    let pos = i
                        .key_columns
                        .iter()
                        .zip(&i.key_is_column)
                        .position(|(k, is_col)| *is_col && unquote(k) == ccol_name)?;
                    if i.constraint.as_deref() == Some("x") {
                        warnings.push(finding(
                            "exclusion-constraint",
                            format!("{} on {cname}", i.name),
                            format!("an exclusion constraint on {cname}.{ccol_name}: the uuid column gets an index like its own, not the constraint"),
                            "add the exclusion constraint on the uuid column after cutover if it must hold there",
                        ));
                    }
                    Some(PlanIndex {
                        name: i.name.clone(),
                        uuid_name: suffixed(&i.name, &opts.uuid_suffix),
                        legacy_name: suffixed(&i.name, &opts.legacy_suffix),
                        unique: i.unique,
                        method: i.method.clone(),
                        key_columns: i.key_columns.clone(),
                        key_options: i.key_options.clone(),
                        fk_position: pos,
                        include_columns: i.include_columns.clone(),
                        predicate: i.predicate.clone(),
                        unique_constraint: (i.constraint.as_deref() == Some("u"))
                            .then(|| i.deferral.clone()),
                    })
                })
                .collect();
            let shadow = suffixed(&fk.name, &opts.uuid_suffix);
            pt.referenced_by.push(PlanFk {
                constraint: fk.name.clone(),
                child_schema: child.schema.clone(),
                child_table: child.name.clone(),
                child_column: ccol_name.clone(),
                child_type: ccol.type_name.clone(),
                child_not_null: ccol.not_null,
                parent_schema: t.schema.clone(),
                parent_table: t.name.clone(),
                parent_key: key.clone(),
                parent_uuid_column: pt.uuid_column.clone(),
                on_delete: FkAction::from_code(&fk.on_delete),
                on_update: FkAction::from_code(&fk.on_update),
                deferrable: fk.deferrable,
                initially_deferred: fk.initially_deferred,
                not_null_check: ccol
                    .not_null
                    .then(|| suffixed(&format!("{}_{}", child.name, uuid_col), "_not_null")),
                uuid_column: uuid_col,
                legacy_column: legacy_col,
                shadow_constraint: shadow,
                child_batch_key,
                child_row_estimate: child.row_estimate,
                indexes,
                child_partitioned: child.kind == "p",
            });
        }
        tables.push(pt);
    }

    // One column can hold only one uuid twin.
    let mut twins: BTreeMap<(String, String, String), Vec<String>> = BTreeMap::new();
    for t in &tables {
        for f in &t.referenced_by {
            twins
                .entry((
                    f.child_schema.clone(),
                    f.child_table.clone(),
                    f.child_column.clone(),
                ))
                .or_default()
                .push(f.constraint.clone());
        }
    }
    for ((s, tb, c), names) in &twins {
        if names.len() > 1 {
            blockers.push(finding(
                "column-in-two-fks",
                format!("{}.{}", qualified(s, tb), c),
                format!(
                    "column is the child of several migrated foreign keys ({})",
                    names.join(", ")
                ),
                "drop the redundant foreign key, or exclude one of the parents",
            ));
        }
    }

    // Objects that track the renamed columns by number.
    let mut renamed: BTreeSet<(String, String, String)> = BTreeSet::new();
    for t in &tables {
        renamed.insert((t.schema.clone(), t.name.clone(), t.key.clone()));
        for f in &t.referenced_by {
            renamed.insert((
                f.child_schema.clone(),
                f.child_table.clone(),
                f.child_column.clone(),
            ));
        }
    }
    let mut seen = BTreeSet::new();
    for d in &cat.dependents {
        if !renamed.contains(&(d.schema.clone(), d.table.clone(), d.column.clone())) {
            continue;
        }
        if !seen.insert((
            d.kind.clone(),
            d.name.clone(),
            d.table.clone(),
            d.column.clone(),
        )) {
            continue;
        }
        let col = format!("{}.{}", qualified(&d.schema, &d.table), d.column);
        let fix = match d.kind.as_str() {
            "check constraint" | "statistics" => {
                "nothing, if it works with uuid keys; otherwise it stays on the integer column (cutover says so), which finalize drops with it: recreate it after cutover if it must hold"
            }
            "view" | "materialized view" | "rule" | "policy" | "trigger" => {
                "nothing, if it works with uuid keys; cutover checks views and policies against the uuid shape before its pause and refuses, changing nothing, if one does not"
            }
            "generated column" => {
                "recreate it over the uuid column after cutover: finalize cannot drop the legacy column while it exists"
            }
            _ => {
                "replace the SQL-standard function body by a string body (AS $$...$$), or recreate it after cutover"
            }
        };
        // These keep following the integer column, `_legacy` after cutover, and break
        // nothing: listed, not refused.
        let follows = d.kind == "generated column";
        let carried = matches!(
            d.kind.as_str(),
            "view"
                | "materialized view"
                | "rule"
                | "policy"
                | "trigger"
                | "check constraint"
                | "statistics"
        );
        let (list, code, problem) = if carried {
            (
                &mut warnings,
                "carried",
                format!(
                    "{} {} uses {col}; the swap rebuilds it from its definition over the uuid column that takes the name (src/migrate/carry.rs), and rollback rebuilds it back",
                    d.kind, d.name
                ),
            )
        } else if follows {
            (
                &mut warnings,
                "follows-integer",
                format!(
                    "{} {} uses {col}; after cutover it stays on the integer column (renamed with the legacy suffix), not on the uuid that takes the name",
                    d.kind, d.name
                ),
            )
        } else {
            (
                &mut blockers,
                "dependent",
                format!(
                    "{} {} references {col}, which cutover renames",
                    d.kind, d.name
                ),
            )
        };
        list.push(finding(
            &format!("{code}-{}", d.kind.replace(' ', "-")),
            format!("{} {}", d.kind, d.name),
            problem,
            fix,
        ));
    }

    // Bodies that resolve names when they run: nothing records what they read, so they are
    // found by the names they mention.
    let mut migrated: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for (sch, tb, col) in &renamed {
        migrated
            .entry((sch.clone(), tb.clone()))
            .or_default()
            .push(col.clone());
    }
    for r in &cat.routines {
        let named: Vec<String> = migrated
            .keys()
            .filter(|(_, tb)| mentions(&r.source, &tb.to_lowercase()))
            .map(|(sch, tb)| qualified(sch, tb))
            .collect();
        if !named.is_empty() {
            warnings.push(finding(
                &format!("{}-body", r.kind),
                format!("{} {}", r.kind, r.name),
                format!(
                    "its body names {}; it resolves columns when it runs, so after cutover it reads and writes uuid keys under the original names",
                    named.join(", ")
                ),
                "make it work with uuid keys before cutover (a new version of it, as for the application), or recreate it after cutover",
            ));
        }
    }
    for (sch, tb, trigger, function) in &cat.triggers {
        let Some(cols) = migrated.get(&(sch.clone(), tb.clone())) else {
            continue;
        };
        let Some(r) = cat.routines.iter().find(|r| &r.name == function) else {
            continue;
        };
        let used: Vec<&str> = cols
            .iter()
            .filter(|c| mentions(&r.source, &c.to_lowercase()))
            .map(String::as_str)
            .collect();
        if !used.is_empty() {
            warnings.push(finding(
                "trigger-function",
                format!("trigger {trigger} on {}", qualified(sch, tb)),
                format!(
                    "it runs {function}, which uses {}: after cutover NEW and OLD carry uuids there",
                    used.join(", ")
                ),
                "make the function work with uuid keys before cutover, or recreate it after cutover",
            ));
        }
    }

    // The backfill updates every migrated table and child in batches written as one
    // statement with the bookkeeping (`WITH upd AS (UPDATE …)`), which PostgreSQL refuses on
    // a table with an ON UPDATE rule.
    for (s, tb, rule) in &cat.update_rules {
        if renamed.iter().any(|(rs, rt, _)| rs == s && rt == tb) {
            blockers.push(finding(
                "update-rule",
                format!("rule {rule} on {}", qualified(s, tb)),
                "an ON UPDATE rule: PostgreSQL refuses the backfill's batches (an UPDATE inside WITH) on this table".into(),
                "replace the rule by a trigger (CREATE TRIGGER … AFTER UPDATE … FOR EACH ROW), which keyshift supports, or exclude the table",
            ));
        }
    }
    for (s, tb, p) in &cat.publications {
        let hit = tb == "*"
            || tables.iter().any(|t| {
                (&t.schema == s && &t.name == tb)
                    || t.referenced_by
                        .iter()
                        .any(|f| &f.child_schema == s && &f.child_table == tb)
            });
        if hit {
            let obj = if tb == "*" {
                format!("publication {p} (FOR ALL TABLES)")
            } else {
                format!("publication {p}: {}", qualified(s, tb))
            };
            warnings.push(finding(
                "publication",
                obj,
                "logical replication subscribers will see new columns and, at cutover, changed key types".into(),
                "add the uuid columns on subscribers before expand, or pause the subscription",
            ));
        }
    }

    let mut plan = Plan {
        format: PLAN_FORMAT,
        uuid_version: opts.uuid_version,
        uuid_suffix: opts.uuid_suffix.clone(),
        legacy_suffix: opts.legacy_suffix.clone(),
        tables,
        skipped,
        blockers,
        warnings,
    };
    // Which tables get views (and in which schemas) follows from the plan itself.
    let long_schemas = super::views::blockers(&plan);
    plan.blockers.extend(long_schemas);
    plan
}

/// `pg_get_indexdef` quotes column names that need it; compare them with raw names.
fn unquote(s: &str) -> String {
    if s.len() >= 2 && s.starts_with('"') && s.ends_with('"') {
        s[1..s.len() - 1].replace("\"\"", "\"")
    } else {
        s.to_string()
    }
}

/// The plan as an operator reads it: tables in order, their keys, who references them,
/// then blockers and warnings with what to do.
pub fn render_text(plan: &Plan) -> String {
    let mut s = String::new();
    let nfk: usize = plan.tables.iter().map(|t| t.referenced_by.len()).sum();
    let _ = writeln!(
        s,
        "keyshift plan: {} table(s), {} foreign key(s), uuid version {}",
        plan.tables.len(),
        nfk,
        plan.uuid_version
    );
    let _ = writeln!(s, "Tables, parents before children:");
    for (i, t) in plan.tables.iter().enumerate() {
        let _ = writeln!(
            s,
            "{:>3}. {}  key {} {} ({}), ~{} rows",
            i + 1,
            qualified(&t.schema, &t.name),
            t.key,
            t.key_type,
            t.key_kind,
            t.row_estimate
        );
        if t.partitioned() {
            let pk: Vec<&str> = t
                .partitioned_pk
                .iter()
                .map(|c| if c == &t.key { &t.uuid_column } else { c })
                .map(String::as_str)
                .collect();
            let _ = writeln!(
                s,
                "       partitioned: new column {}, unique index <partition>_{}_key on each partition, primary key {} ({}) at cutover",
                t.uuid_column,
                t.uuid_column,
                t.pk_constraint,
                pk.join(", ")
            );
        } else {
            let _ = writeln!(
                s,
                "       new column {}, unique index {}, primary key {} at cutover",
                t.uuid_column, t.uuid_index, t.pk_constraint
            );
        }
        if t.referenced_by.is_empty() {
            let _ = writeln!(s, "       referenced by: none");
        } else {
            let _ = writeln!(s, "       referenced by:");
        }
        for f in &t.referenced_by {
            let idx = if f.indexes.is_empty() {
                "not indexed".to_string()
            } else {
                format!(
                    "indexed ({})",
                    f.indexes
                        .iter()
                        .map(|i| i.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            };
            let _ = writeln!(
                s,
                "         {}.{} {}{} -> twin {}; ON DELETE {}, ON UPDATE {}; {}; {}",
                qualified(&f.child_schema, &f.child_table),
                f.child_column,
                f.child_type,
                if f.child_not_null { " NOT NULL" } else { "" },
                f.uuid_column,
                f.on_delete.sql(),
                f.on_update.sql(),
                idx,
                f.constraint
            );
        }
    }
    if !plan.skipped.is_empty() {
        let _ = writeln!(s, "Skipped:");
        for k in &plan.skipped {
            let _ = writeln!(s, "  {}: {}", k.table, k.reason);
        }
    }
    for (title, list) in [("Blockers", &plan.blockers), ("Warnings", &plan.warnings)] {
        if list.is_empty() {
            continue;
        }
        let _ = writeln!(s, "{title} ({}):", list.len());
        for f in list {
            let _ = writeln!(s, "  [{}] {}: {}", f.code, f.object, f.problem);
            let _ = writeln!(s, "      what to do: {}", f.fix);
        }
    }
    if plan.is_blocked() {
        let _ = writeln!(
            s,
            "The plan is blocked: fix the blockers above, then run `keyshift plan` again."
        );
    }
    s
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::migrate::catalog::{Column, Dependent, ForeignKey, Index, PrimaryKey, Routine};

    pub(crate) fn table(schema: &str, name: &str, cols: &[(&str, &str, bool)]) -> Table {
        Table {
            schema: schema.into(),
            name: name.into(),
            kind: "r".into(),
            columns: cols
                .iter()
                .map(|(n, t, nn)| Column {
                    name: (*n).into(),
                    type_name: (*t).into(),
                    not_null: *nn,
                    default: (*n == "id").then(|| format!("nextval('{name}_id_seq'::regclass)")),
                    identity: None,
                })
                .collect(),
            primary_key: Some(PrimaryKey {
                constraint: format!("{name}_pkey"),
                index: format!("{name}_pkey"),
                columns: vec!["id".into()],
            }),
            ..Default::default()
        }
    }

    pub(crate) fn fk(child: &str, col: &str, parent: &str, del: &str) -> ForeignKey {
        ForeignKey {
            name: format!("{child}_{col}_fkey"),
            child_schema: "public".into(),
            child_table: child.into(),
            child_columns: vec![col.into()],
            parent_schema: "public".into(),
            parent_table: parent.into(),
            parent_columns: vec!["id".into()],
            parent_index: format!("{parent}_pkey"),
            on_update: "a".into(),
            on_delete: del.into(),
            validated: true,
            ..Default::default()
        }
    }

    pub(crate) fn sample() -> Catalog {
        Catalog {
            tables: vec![
                table(
                    "public",
                    "servers",
                    &[("id", "integer", true), ("connector_id", "bigint", true)],
                ),
                table(
                    "public",
                    "connectors",
                    &[("id", "integer", true), ("name", "text", false)],
                ),
                table(
                    "public",
                    "tools",
                    &[
                        ("id", "bigint", true),
                        ("server_id", "integer", false),
                        ("parent_id", "bigint", false),
                    ],
                ),
            ],
            foreign_keys: vec![
                fk("servers", "connector_id", "connectors", "c"),
                fk("tools", "server_id", "servers", "n"),
                fk("tools", "parent_id", "tools", "a"),
            ],
            indexes: vec![Index {
                schema: "public".into(),
                table: "tools".into(),
                name: "tools_server_id_idx".into(),
                method: "btree".into(),
                valid: true,
                key_columns: vec!["server_id".into()],
                key_is_column: vec![true],
                key_options: vec!["".into()],
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn orders_parents_first_and_follows_fks() {
        let p = build(&sample(), &PlanOptions::default());
        assert!(p.blockers.is_empty(), "{:?}", p.blockers);
        let names: Vec<_> = p.tables.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["connectors", "servers", "tools"]);
        let servers = p.table("public", "servers").unwrap();
        let f = &servers.referenced_by[0];
        assert_eq!(f.child_table, "tools");
        assert_eq!(f.uuid_column, "server_id_uuid");
        assert_eq!(f.on_delete, FkAction::SetNull);
        assert!(f.indexed());
        assert_eq!(f.indexes[0].uuid_name, "tools_server_id_idx_uuid");
        let tools = p.table("public", "tools").unwrap();
        assert_eq!(
            tools.referenced_by[0].child_table, "tools",
            "self reference"
        );
        assert_eq!(
            p.table("public", "connectors").unwrap().referenced_by[0].child_type,
            "bigint"
        );
    }

    #[test]
    fn exclude_and_skip() {
        let mut cat = sample();
        cat.tables.push(Table {
            schema: "public".into(),
            name: "notes".into(),
            kind: "r".into(),
            columns: vec![Column {
                name: "k".into(),
                type_name: "text".into(),
                ..Default::default()
            }],
            primary_key: Some(PrimaryKey {
                constraint: "notes_pkey".into(),
                index: "notes_pkey".into(),
                columns: vec!["k".into()],
            }),
            ..Default::default()
        });
        let opts = PlanOptions {
            exclude: vec!["tools".into()],
            ..Default::default()
        };
        let p = build(&cat, &opts);
        assert_eq!(p.tables.len(), 2);
        assert_eq!(p.skipped.len(), 1);
        // The child of an excluded-key table still gets its twin if its parent is migrated.
        assert_eq!(
            p.table("public", "servers").unwrap().referenced_by[0].child_table,
            "tools"
        );
    }

    #[test]
    fn blockers() {
        let mut cat = sample();
        let mut c = fk("servers", "connector_id", "connectors", "a");
        c.name = "comp".into();
        c.child_columns = vec!["connector_id".into(), "id".into()];
        c.parent_columns = vec!["id".into(), "name".into()];
        cat.foreign_keys.push(c);
        let mut u = fk("servers", "id", "connectors", "a");
        u.name = "via_unique".into();
        u.parent_index = "connectors_id_key".into();
        cat.foreign_keys.push(u);
        cat.dependents.push(Dependent {
            kind: "function".into(),
            name: "public.v()".into(),
            schema: "public".into(),
            table: "servers".into(),
            column: "connector_id".into(),
        });
        cat.update_rules
            .push(("public".into(), "servers".into(), "audit".into()));
        cat.tables[0].columns.push(Column {
            name: "id_uuid".into(),
            type_name: "uuid".into(),
            ..Default::default()
        });
        cat.tables[1].kind = "p".into();
        cat.publications
            .push(("public".into(), "tools".into(), "pub1".into()));
        let p = build(&cat, &PlanOptions::default());
        let codes: BTreeSet<_> = p.blockers.iter().map(|b| b.code.as_str()).collect();
        for want in [
            "composite-fk",
            "fk-to-non-key-unique",
            "dependent-function",
            "update-rule",
            "name-collision",
            "partitioned-table",
        ] {
            assert!(codes.contains(want), "{want} missing from {codes:?}");
        }
        assert_eq!(p.warnings[0].code, "publication");
        assert!(render_text(&p).contains("what to do"));
    }

    #[test]
    fn what_follows_the_integer_or_reads_by_name_is_listed_not_refused() {
        let mut cat = sample();
        for (kind, name) in [
            ("check constraint", "servers_connector_id_check"),
            ("generated column", "twice"),
            ("statistics", "public.st"),
        ] {
            cat.dependents.push(Dependent {
                kind: kind.into(),
                name: name.into(),
                schema: "public".into(),
                table: "servers".into(),
                column: "connector_id".into(),
            });
        }
        cat.routines = vec![
            Routine {
                kind: "function".into(),
                name: "public.count_servers()".into(),
                source: "begin return (select count(*) from servers); end".into(),
            },
            Routine {
                kind: "function".into(),
                name: "public.audit()".into(),
                source: "begin new.connector_id := coalesce(new.connector_id, 1); return new; end"
                    .into(),
            },
            // Names that only contain a migrated table's name are not it.
            Routine {
                kind: "procedure".into(),
                name: "public.other()".into(),
                source: "begin perform 1 from servers_archive; end".into(),
            },
        ];
        cat.triggers = vec![(
            "public".into(),
            "servers".into(),
            "audit_t".into(),
            "public.audit()".into(),
        )];
        let p = build(&cat, &PlanOptions::default());
        assert!(!p.is_blocked(), "{:?}", p.blockers);
        let codes: Vec<&str> = p.warnings.iter().map(|w| w.code.as_str()).collect();
        assert_eq!(
            codes,
            [
                "carried-check-constraint",
                "follows-integer-generated-column",
                "carried-statistics",
                "function-body",
                "trigger-function"
            ]
        );
        assert!(
            p.warnings[3].problem.contains("servers"),
            "{:?}",
            p.warnings[3]
        );
        assert!(p.warnings[4].problem.contains("connector_id"));
    }

    #[test]
    fn a_partitioned_table_keyed_by_id_and_its_partition_key_is_migrated() {
        let mut cat = sample();
        let mut ev = table(
            "public",
            "ev",
            &[("id", "bigint", true), ("at", "date", true)],
        );
        ev.kind = "p".into();
        ev.partition_key = vec!["at".into()];
        ev.primary_key.as_mut().unwrap().columns = vec!["id".into(), "at".into()];
        cat.tables.push(ev.clone());
        let p = build(&cat, &PlanOptions::default());
        assert!(!p.is_blocked(), "{:?}", p.blockers);
        let t = p.table("public", "ev").expect("migrated");
        assert_eq!(t.key, "id");
        assert_eq!(t.partitioned_pk, ["id", "at"]);
        assert!(t.partitioned() && !p.table("public", "servers").unwrap().partitioned());
        assert!(render_text(&p).contains("primary key ev_pkey (id_uuid, at) at cutover"));
        // (at, id) too: the key is the column that is not the partition key.
        let mut rev = ev.clone();
        rev.primary_key.as_mut().unwrap().columns = vec!["at".into(), "id".into()];
        assert_eq!(partitioned_key(&rev).map(String::as_str), Some("id"));
        // Other shapes are skipped, saying why, or blocked.
        let skipped = |t: Table| {
            let mut cat = sample();
            cat.tables.push(t);
            let p = build(&cat, &PlanOptions::default());
            assert!(p.table("public", "ev").is_none());
            p.skipped
                .iter()
                .find(|s| s.table == "public.ev")
                .map(|s| s.reason.clone())
        };
        let mut sub = ev.clone();
        sub.sub_partitioned = true;
        assert!(skipped(sub).unwrap().contains("one level deep"));
        let mut wide = ev.clone();
        wide.columns.push(Column {
            name: "k".into(),
            type_name: "int".into(),
            ..Default::default()
        });
        wide.primary_key.as_mut().unwrap().columns = vec!["id".into(), "k".into(), "at".into()];
        assert!(
            skipped(wide)
                .unwrap()
                .contains("partitioned table with primary key")
        );
        let mut text_key = ev.clone();
        text_key.columns[0].type_name = "text".into();
        assert!(skipped(text_key).unwrap().contains("not an integer"));
        // A foreign key to it (PostgreSQL requires it to include the partition key): blocked,
        // saying so.
        let mut cat = sample();
        cat.tables.push(ev.clone());
        cat.tables.push(table(
            "public",
            "seen",
            &[
                ("id", "integer", true),
                ("ev_id", "bigint", true),
                ("ev_at", "date", true),
            ],
        ));
        let mut f = fk("seen", "ev_id", "ev", "a");
        f.child_columns = vec!["ev_id".into(), "ev_at".into()];
        f.parent_columns = vec!["id".into(), "at".into()];
        cat.foreign_keys.push(f);
        let p = build(&cat, &PlanOptions::default());
        let b = p
            .blockers
            .iter()
            .find(|b| b.code == "fk-to-partitioned-key")
            .expect("blocked");
        assert_eq!(b.object, "seen_ev_id_fkey on public.seen");
        assert!(b.problem.contains("(id_uuid, at)"), "{}", b.problem);
        assert!(b.fix.contains("--exclude"));
        let mut by_key = ev;
        by_key.partition_key = vec!["id".into()];
        by_key.primary_key.as_mut().unwrap().columns = vec!["id".into()];
        let mut cat = sample();
        cat.tables.push(by_key);
        let p = build(&cat, &PlanOptions::default());
        assert!(p.blockers.iter().any(|b| b.code == "partitioned-table"));
    }

    #[test]
    fn nothing_selected_is_a_blocker() {
        let opts = PlanOptions {
            schemas: vec!["other".into()],
            ..Default::default()
        };
        let p = build(&sample(), &opts);
        assert_eq!(p.blockers[0].code, "nothing-to-migrate");
        let opts = PlanOptions {
            tables: vec!["nope".into()],
            ..Default::default()
        };
        assert!(
            build(&sample(), &opts)
                .blockers
                .iter()
                .any(|b| b.code == "unknown-table")
        );
    }

    #[test]
    fn roundtrips_as_json() {
        let p = build(&sample(), &PlanOptions::default());
        let j = serde_json::to_string(&p).unwrap();
        let back: Plan = serde_json::from_str(&j).unwrap();
        assert_eq!(p, back);
    }
}
