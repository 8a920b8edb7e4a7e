//! The rule set: what the rewriter must keep filled, derived from the migration plan.
//!
//! A `RuleSet` is immutable and built by one pure function of (plan, phase, client view), so
//! that the proxy can build a new one on every `NOTIFY keyshift` and swap it atomically, and so
//! that adding client views later is a new input rather than a redesign.

use std::collections::{BTreeSet, HashMap, HashSet};

use super::prescan::Prescan;
use crate::shape::Shape;

/// Which way the dual-write runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Before cutover: `<fk>_uuid` is filled from the parent's `id_uuid`, looked up by integer id.
    Forward,
    /// After cutover: the uuid columns carry the original names; `<fk>_legacy` is filled from
    /// the parent's `<key>_legacy`, looked up by uuid.
    Reverse,
}

/// How a session's statements reach the migrated tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ClientView {
    /// The session's shape is the physical one: statements go to the tables themselves.
    #[default]
    Physical,
    /// The session sees `Shape` while the tables are in the other shape: every reference to
    /// a migrated table is pointed at keyshift's view of it in that shape
    /// (`Shape::view_schema`), and the fills' lookups read the parents' views too (except
    /// where an INSERT leaves its twin to the fill trigger, `Ctx::twin_by_trigger`).
    Translated(Shape),
}

/// A migrated parent table, as the plan names it before `expand` (original names).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentPlan {
    pub schema: String,
    pub table: String,
    /// The integer primary key column, e.g. `id`.
    pub key_column: String,
    /// Its uuid twin added by `expand`, e.g. `id_uuid`.
    pub uuid_column: String,
    /// The name cutover gives the integer key, e.g. `id_legacy` (fitted to 63 bytes by the
    /// plan: `ident::suffixed`).
    pub legacy_column: String,
}

/// One integer FK column of a child table, as the plan names it before `expand`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FkPlan {
    pub schema: String,
    pub table: String,
    /// The integer FK column, e.g. `p_id`.
    pub column: String,
    /// Its uuid twin added by `expand`, e.g. `p_id_uuid`.
    pub uuid_column: String,
    /// The name cutover gives the integer FK column, e.g. `p_id_legacy` (fitted).
    pub legacy_column: String,
    /// The FK column's SQL type (`bigint`, `integer`, `smallint`): the copied expression is
    /// cast to it so that a reused parameter keeps the type PostgreSQL deduces today.
    pub column_type: String,
    pub parent_schema: String,
    pub parent_table: String,
    pub parent_key_column: String,
    pub parent_uuid_column: String,
    /// The parent key's name after cutover, e.g. `id_legacy` (fitted).
    pub parent_legacy_column: String,
    /// The FK constraint's name, for a NOT NULL FK column: a write naming a missing parent
    /// must fail as the constraint would (23503), not on the twin's NULL tripping its NOT
    /// NULL check first (23502). Only there: a lookup that finds no parent may also mean one
    /// inserted by a transaction not yet committed, which PostgreSQL's own check waits for,
    /// so a nullable twin is left NULL (the backfill's catch-up fills it) rather than failing
    /// a write PostgreSQL would take. `None` for a deferrable constraint, checked later.
    pub constraint: Option<String>,
}

/// The physical column list of a child table, in order, as the catalog shows it (keyshift's
/// own added columns may be included; they are filtered out).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableColumns {
    pub schema: String,
    pub table: String,
    pub columns: Vec<String>,
}

/// Everything the rewriter needs from the migration plan, as plain data.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PlanRules {
    pub parents: Vec<ParentPlan>,
    pub fks: Vec<FkPlan>,
    pub columns: Vec<TableColumns>,
    /// Other relations named like a migrated table, as (schema, name): an unqualified name
    /// resolves to the first schema of the path that has a relation of that name, migrated
    /// or not.
    pub shadows: Vec<(String, String)>,
    /// The application's views that keyshift shows in the translated shape
    /// (`keyshift_<shape>_<schema>.<view>`, src/migrate/carry.rs): redirected like the
    /// migrated tables, never left on the tables.
    pub shaped_views: Vec<(String, String)>,
    /// `columns` carry the integer shape's names whatever the tables' state (read from
    /// keyshift's integer-shape views while a cutover swaps table by table). Otherwise a
    /// translated integer session's lists are the uuid-shaped tables' and are renamed.
    pub columns_integer_named: bool,
}

impl PlanRules {
    /// Whether the tables are in both shapes (a cutover table by table): what
    /// [`PlanRules::columns_integer_named`] is set for.
    fn mixed(&self) -> bool {
        self.columns_integer_named
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RuleError {
    #[error("FK {schema}.{table}.{column} references {parent}, which is not a migrated parent")]
    UnknownParent {
        schema: String,
        table: String,
        column: String,
        parent: String,
    },
    #[error("an empty name in the plan ({0})")]
    EmptyName(&'static str),
    #[error("the search path is empty")]
    EmptySearchPath,
}

/// When `source` is written with expression E, also write `target` =
/// `(SELECT parent_value FROM parent WHERE parent_key = (E)::cast)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Fill {
    pub source: String,
    pub target: String,
    pub cast: String,
    pub parent_schema: String,
    pub parent_table: String,
    pub parent_key: String,
    pub parent_value: String,
    /// The schema the lookup reads the parent from: the parent's own, or its view schema
    /// for a translated session.
    pub lookup_schema: String,
    /// The twin's SQL type.
    pub twin_type: String,
    /// Raise the FK's 23503 when the source names a parent that does not exist.
    pub check: Option<FkCheck>,
}

/// What PostgreSQL's foreign-key error names: the child table, the constraint, the column as
/// the statement names it, and the parent table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FkCheck {
    pub child: String,
    pub constraint: String,
    pub column: String,
    pub parent: String,
}

/// What the rewriter does for one child table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ChildRules {
    /// `schema.table`, as reported in outcomes and metrics labels.
    pub label: String,
    pub fills: Vec<Fill>,
    /// The columns an unchanged application's positional `INSERT INTO c VALUES (…)` supplies,
    /// in order; `None` when positional inserts cannot be mapped in this phase.
    pub positional: Option<Vec<String>>,
}

/// The immutable, versioned rules one statement is rewritten under.
#[derive(Debug, Clone)]
pub struct RuleSet {
    version: u64,
    direction: Direction,
    view: ClientView,
    search_path: Vec<String>,
    children: HashMap<(String, String), ChildRules>,
    /// Parent tables some fill looks up, as (schema, table).
    parents: Vec<(String, String)>,
    /// Every migrated table, parents and children: what a translated session's references
    /// are pointed away from.
    migrated: HashSet<(String, String)>,
    /// A translated session's names of the migrated tables' renamed columns → their physical
    /// names, per (schema, table); empty for a physical view.
    physical_names: HashMap<(String, String), HashMap<String, String>>,
    /// Every name, in either shape, of any migrated table's renamed columns (the union of
    /// `physical_names`): a statement naming none of them reads the same from a table as
    /// from its view (translate.rs).
    renamed: HashSet<String>,
    /// The session's temporary tables: an unqualified name among them is not a migrated
    /// table (`pg_temp` comes first in every search path).
    temp: HashSet<String>,
    /// Unmigrated relations named like migrated ones ([`PlanRules::shadows`]).
    shadows: HashSet<(String, String)>,
    /// [`PlanRules::shaped_views`] for a translated session (also in `migrated`).
    shaped_views: HashSet<(String, String)>,
    /// The tables are in both shapes ([`PlanRules::mixed`]): `physical_names` hold for some
    /// tables only, so nothing may rely on them.
    mixed: bool,
    pub(crate) prescan: Prescan,
    /// Every migrated table's name, whatever the view: what a statement must not name to
    /// pass a closed gate.
    any_migrated: Prescan,
}

impl RuleSet {
    /// Builds the rules of one phase. Pure: the same inputs give the same rules.
    pub fn build(
        plan: &PlanRules,
        direction: Direction,
        view: ClientView,
        search_path: Vec<String>,
        version: u64,
    ) -> Result<RuleSet, RuleError> {
        if search_path.is_empty() {
            return Err(RuleError::EmptySearchPath);
        }
        for p in &plan.parents {
            if p.schema.is_empty() || p.table.is_empty() {
                return Err(RuleError::EmptyName("parent table"));
            }
            if p.key_column.is_empty() || p.uuid_column.is_empty() {
                return Err(RuleError::EmptyName("parent column"));
            }
        }
        let by_table = ByTable::new(plan);
        let mut children: HashMap<(String, String), ChildRules> = HashMap::new();
        for fk in &plan.fks {
            if fk.schema.is_empty() || fk.table.is_empty() || fk.column.is_empty() {
                return Err(RuleError::EmptyName("fk"));
            }
            if fk.uuid_column.is_empty() || fk.column_type.is_empty() {
                return Err(RuleError::EmptyName("fk twin or type"));
            }
            let known = by_table.is_parent(&fk.parent_schema, &fk.parent_table);
            if !known {
                return Err(RuleError::UnknownParent {
                    schema: fk.schema.clone(),
                    table: fk.table.clone(),
                    column: fk.column.clone(),
                    parent: format!("{}.{}", fk.parent_schema, fk.parent_table),
                });
            }
            let lookup_schema = match view {
                ClientView::Physical => fk.parent_schema.clone(),
                ClientView::Translated(shape) => shape.view_schema(&fk.parent_schema),
            };
            // Before cutover the uuid twin has no NOT NULL: a NULL leaves the integer FK's own
            // check to PostgreSQL.
            let twin_nullable = direction == Direction::Forward && view == ClientView::Physical;
            let check = fk
                .constraint
                .as_ref()
                .filter(|_| !twin_nullable)
                .map(|c| FkCheck {
                    child: fk.table.clone(),
                    constraint: c.clone(),
                    column: fk.column.clone(),
                    parent: fk.parent_table.clone(),
                });
            let fill = match direction {
                Direction::Forward => Fill {
                    lookup_schema,
                    twin_type: "uuid".to_string(),
                    check,
                    source: fk.column.clone(),
                    target: fk.uuid_column.clone(),
                    cast: fk.column_type.clone(),
                    parent_schema: fk.parent_schema.clone(),
                    parent_table: fk.parent_table.clone(),
                    parent_key: fk.parent_key_column.clone(),
                    parent_value: fk.parent_uuid_column.clone(),
                },
                Direction::Reverse => Fill {
                    lookup_schema,
                    twin_type: fk.column_type.clone(),
                    check,
                    source: fk.column.clone(),
                    target: fk.legacy_column.clone(),
                    cast: "uuid".to_string(),
                    parent_schema: fk.parent_schema.clone(),
                    parent_table: fk.parent_table.clone(),
                    parent_key: fk.parent_key_column.clone(),
                    parent_value: fk.parent_legacy_column.clone(),
                },
            };
            children
                .entry((fk.schema.clone(), fk.table.clone()))
                .or_insert_with(|| ChildRules {
                    label: format!("{}.{}", fk.schema, fk.table),
                    fills: Vec::new(),
                    positional: None,
                })
                .fills
                .push(fill);
        }
        // Positional inserts: in the integer shape keyshift's columns sit after the
        // application's, so an unchanged application's values map onto its original columns
        // in order (through the integer views after cutover too: they keep the physical
        // order). In the uuid shape the integer columns keep their positions under new names,
        // so positional values would land in the legacy columns: no mapping is right.
        if direction == Direction::Forward {
            let translated = view == ClientView::Translated(Shape::Integer);
            for tc in &plan.columns {
                let key = (tc.schema.clone(), tc.table.clone());
                let Some(child) = children.get_mut(&key) else {
                    continue;
                };
                // After cutover the catalog's names are the uuid shape's.
                let renamed = if translated && !plan.columns_integer_named {
                    by_table.shape_names(&tc.schema, &tc.table)
                } else {
                    Vec::new()
                };
                let added: Vec<&str> = by_table
                    .fks(&tc.schema, &tc.table)
                    .iter()
                    .map(|f| f.uuid_column.as_str())
                    .chain(
                        by_table
                            .parents(&tc.schema, &tc.table)
                            .iter()
                            .map(|p| p.uuid_column.as_str()),
                    )
                    .collect();
                child.positional = Some(
                    tc.columns
                        .iter()
                        .map(|c| {
                            renamed
                                .iter()
                                .find(|n| n.uuid == *c)
                                .map_or_else(|| c.clone(), |n| n.integer.clone())
                        })
                        .filter(|c| !added.contains(&c.as_str()))
                        .collect(),
                );
            }
        }
        let mut migrated: HashSet<(String, String)> = children.keys().cloned().collect();
        migrated.extend(
            plan.parents
                .iter()
                .map(|p| (p.schema.clone(), p.table.clone())),
        );
        let shaped_views: HashSet<(String, String)> = match view {
            ClientView::Physical => HashSet::new(),
            ClientView::Translated(_) => plan.shaped_views.iter().cloned().collect(),
        };
        migrated.extend(shaped_views.iter().cloned());
        // A translated session's reads name parents too: every migrated table is looked for.
        let prescan = match view {
            ClientView::Physical => {
                Prescan::new(children.keys().map(|(s, t)| (s.as_str(), t.as_str())))
            }
            ClientView::Translated(_) => {
                Prescan::new(migrated.iter().map(|(s, t)| (s.as_str(), t.as_str())))
            }
        };
        let mut parents: Vec<(String, String)> = plan
            .fks
            .iter()
            .map(|f| (f.parent_schema.clone(), f.parent_table.clone()))
            .collect();
        parents.sort();
        parents.dedup();
        let physical_names = match view {
            ClientView::Physical => HashMap::new(),
            ClientView::Translated(shape) => physical_names(&by_table, &migrated, shape),
        };
        // Each distinct name once: most repeat from table to table (`id`, `id_uuid`, ...).
        let mut renamed: HashSet<String> = HashSet::new();
        for name in physical_names
            .values()
            .flat_map(|m| m.iter().flat_map(|(a, b)| [a, b]))
        {
            if !renamed.contains(name) {
                renamed.insert(name.clone());
            }
        }
        let any_migrated = Prescan::new(migrated.iter().map(|(s, t)| (s.as_str(), t.as_str())));
        Ok(RuleSet {
            any_migrated,
            renamed,
            version,
            direction,
            view,
            search_path,
            children,
            parents,
            migrated,
            physical_names,
            mixed: plan.mixed(),
            temp: HashSet::new(),
            shadows: plan.shadows.iter().cloned().collect(),
            shaped_views,
            prescan,
        })
    }

    /// These rules as one session resolves names: its own search path (if it set one) and
    /// its temporary tables.
    pub fn with_scope<'a>(
        &self,
        search_path: Option<&[String]>,
        temp: impl IntoIterator<Item = &'a String>,
    ) -> RuleSet {
        let mut r = self.clone();
        if let Some(p) = search_path {
            r.search_path = p.to_vec();
        }
        r.temp = temp.into_iter().cloned().collect();
        r
    }

    /// These rules without the fills that look up one of `parents` (as (schema, table)):
    /// for a role that may not read them, the fill triggers fill those twins instead.
    pub fn without_lookups_in(mut self, parents: &BTreeSet<(String, String)>) -> RuleSet {
        if parents.is_empty() {
            return self;
        }
        for child in self.children.values_mut() {
            child
                .fills
                .retain(|f| !parents.contains(&(f.parent_schema.clone(), f.parent_table.clone())));
        }
        self
    }

    /// A rule set with nothing to rewrite: pure passthrough.
    pub fn empty(version: u64) -> RuleSet {
        RuleSet {
            version,
            direction: Direction::Forward,
            view: ClientView::Physical,
            search_path: vec!["public".to_string()],
            children: HashMap::new(),
            parents: Vec::new(),
            migrated: HashSet::new(),
            physical_names: HashMap::new(),
            mixed: false,
            renamed: HashSet::new(),
            temp: HashSet::new(),
            shadows: HashSet::new(),
            shaped_views: HashSet::new(),
            prescan: Prescan::new(std::iter::empty()),
            any_migrated: Prescan::new(std::iter::empty()),
        }
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn direction(&self) -> Direction {
        self.direction
    }

    pub fn view(&self) -> ClientView {
        self.view
    }

    pub fn search_path(&self) -> &[String] {
        &self.search_path
    }

    /// True when no table needs rewriting, so the proxy can skip the rewriter entirely.
    pub fn is_empty(&self) -> bool {
        match self.view {
            ClientView::Physical => self.children.is_empty(),
            ClientView::Translated(_) => self.migrated.is_empty(),
        }
    }

    /// The shape a translated session's references are pointed at, if any.
    pub fn translated(&self) -> Option<Shape> {
        match self.view {
            ClientView::Physical => None,
            ClientView::Translated(shape) => Some(shape),
        }
    }

    /// The schema an unqualified `table` resolves to, as PostgreSQL does: a temporary table
    /// first, then the first schema of the path holding a relation of that name (migrated or
    /// one of the known others); `None` for a temporary table or no known one.
    fn resolve(&self, table: &str) -> Option<&str> {
        if self.temp.contains(table) {
            return None;
        }
        self.search_path
            .iter()
            .find(|s| {
                let key = (s.to_string(), table.to_string());
                self.migrated.contains(&key) || self.shadows.contains(&key)
            })
            .map(String::as_str)
    }

    /// Resolves a relation name as written (case-folded per quoting) to a migrated table's
    /// schema, parents and children alike.
    pub(crate) fn migrated(&self, schema: Option<&str>, table: &str) -> Option<String> {
        let has = |s: &str| self.migrated.contains(&(s.to_string(), table.to_string()));
        match schema {
            Some(s) => has(s).then(|| s.to_string()),
            None => self.resolve(table).filter(|s| has(s)).map(str::to_string),
        }
    }

    /// Whether `schema.table` (as [`RuleSet::migrated`] resolved it) is an application view
    /// shown in the translated shape: its columns differ by shape whatever a statement names.
    pub(crate) fn is_shaped_view(&self, schema: &str, table: &str) -> bool {
        self.shaped_views
            .contains(&(schema.to_string(), table.to_string()))
    }

    /// The physical name of the column a translated session calls `column` in the migrated
    /// table `schema.table`; `None` when that name is not one its shape renames (a column
    /// keyshift does not touch, or not a column of the table at all).
    pub(crate) fn physical_column(&self, schema: &str, table: &str, column: &str) -> Option<&str> {
        if self.mixed {
            return None;
        }
        self.physical_names
            .get(&(schema.to_string(), table.to_string()))?
            .get(column)
            .map(String::as_str)
    }

    /// Whether `sql` may name a migrated table, parent or child, as any identifier (a column
    /// or alias of that name counts: the answer errs towards yes).
    pub fn may_name_migrated(&self, sql: &str) -> bool {
        self.any_migrated.find(sql).is_some()
    }

    /// Whether `name` (case-folded per quoting) is, in either shape, the name of a column
    /// cutover renames in some migrated table.
    pub(crate) fn is_renamed_column(&self, name: &str) -> bool {
        self.renamed.contains(name)
    }

    /// Whether the tables are in both shapes, a cutover swapping them one by one
    /// ([`PlanRules::mixed`]).
    pub(crate) fn mixed(&self) -> bool {
        self.mixed
    }

    /// Resolves a name (case-folded per quoting) to a parent some fill looks up.
    pub(crate) fn parent(&self, schema: Option<&str>, table: &str) -> Option<(String, String)> {
        let has = |s: &str| self.parents.iter().any(|(ps, pt)| ps == s && pt == table);
        match schema {
            Some(s) => has(s).then(|| (s.to_string(), table.to_string())),
            None => self
                .resolve(table)
                .filter(|s| has(s))
                .map(|s| (s.to_string(), table.to_string())),
        }
    }

    /// Resolves a name as written (already case-folded per quoting) to a migrated child.
    /// An unqualified name takes the first search-path schema that holds a migrated child of
    /// that name: keyshift knows only migrated tables, so a same-named unmigrated table
    /// earlier in the path would be misattributed (documented limitation).
    pub(crate) fn child(&self, schema: Option<&str>, table: &str) -> Option<&ChildRules> {
        match schema {
            Some(s) => self.children.get(&(s.to_string(), table.to_string())),
            None => self
                .resolve(table)
                .and_then(|s| self.children.get(&(s.to_string(), table.to_string()))),
        }
    }
}

/// One column of a migrated table that cutover renames, under the name each shape gives it:
/// the integer shape's is its physical name before cutover, the uuid shape's its physical
/// name after it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ShapeNames {
    integer: String,
    uuid: String,
}

impl ShapeNames {
    /// (its name in `shape`, its name in the other shape).
    fn into_pair(self, shape: Shape) -> (String, String) {
        match shape {
            Shape::Integer => (self.integer, self.uuid),
            Shape::Uuid => (self.uuid, self.integer),
        }
    }
}

/// The plan's parents and FKs by (schema, table), so that the build looks a table's up
/// instead of scanning the plan for each: scans made `RuleSet::build` quadratic, 26–32 ms
/// for both of a phase's rule sets at 1,000 tables (`cargo bench --bench rules_rebuild`).
struct ByTable<'a> {
    /// schema → table → its parent entries.
    parents: HashMap<&'a str, HashMap<&'a str, Vec<&'a ParentPlan>>>,
    /// schema → child table → its FKs.
    fks: HashMap<&'a str, HashMap<&'a str, Vec<&'a FkPlan>>>,
}

impl<'a> ByTable<'a> {
    fn new(plan: &'a PlanRules) -> ByTable<'a> {
        let mut parents: HashMap<&str, HashMap<&str, Vec<&ParentPlan>>> = HashMap::new();
        for p in &plan.parents {
            parents
                .entry(p.schema.as_str())
                .or_default()
                .entry(p.table.as_str())
                .or_default()
                .push(p);
        }
        let mut fks: HashMap<&str, HashMap<&str, Vec<&FkPlan>>> = HashMap::new();
        for f in &plan.fks {
            fks.entry(f.schema.as_str())
                .or_default()
                .entry(f.table.as_str())
                .or_default()
                .push(f);
        }
        ByTable { parents, fks }
    }

    fn is_parent(&self, schema: &str, table: &str) -> bool {
        !self.parents(schema, table).is_empty()
    }

    fn parents(&self, schema: &str, table: &str) -> &[&'a ParentPlan] {
        self.parents
            .get(schema)
            .and_then(|t| t.get(table))
            .map_or(&[], Vec::as_slice)
    }

    fn fks(&self, schema: &str, table: &str) -> &[&'a FkPlan] {
        self.fks
            .get(schema)
            .and_then(|t| t.get(table))
            .map_or(&[], Vec::as_slice)
    }

    /// The columns of `schema.table` that cutover renames, by their names in each shape:
    /// the integer key `id` is `id_legacy` in the uuid shape and its uuid `id_uuid` is `id`;
    /// likewise each FK column and its twin. Names of different columns never collide within
    /// a shape, as the views of both shapes list them.
    fn shape_names(&self, schema: &str, table: &str) -> Vec<ShapeNames> {
        let mut out = Vec::new();
        let mut pair = |int: &str, twin: &str, legacy: &str| {
            out.push(ShapeNames {
                integer: int.to_string(),
                uuid: legacy.to_string(),
            });
            out.push(ShapeNames {
                integer: twin.to_string(),
                uuid: int.to_string(),
            });
        };
        for p in self.parents(schema, table) {
            pair(&p.key_column, &p.uuid_column, &p.legacy_column);
        }
        for f in self.fks(schema, table) {
            pair(&f.column, &f.uuid_column, &f.legacy_column);
        }
        out
    }
}

/// For a session translated to `shape`: each migrated table's renamed columns, from the name
/// `shape` gives them to their physical name (the other shape's), for the statements that
/// reach the table itself rather than its view (`COPY … FROM`, translate.rs).
fn physical_names(
    by_table: &ByTable,
    migrated: &HashSet<(String, String)>,
    shape: Shape,
) -> HashMap<(String, String), HashMap<String, String>> {
    migrated
        .iter()
        .map(|(schema, table)| {
            let names = by_table
                .shape_names(schema, table)
                .into_iter()
                .map(|n| n.into_pair(shape))
                .collect();
            ((schema.clone(), table.clone()), names)
        })
        .collect()
}
