//! What the proxy's rules read from the catalog besides the stored plan, and what a swap
//! does to it.
//!
//! Three things: each FK child's column list (positional inserts), the relations in other
//! schemas named like a migrated table (name resolution), and the application's views that
//! keyshift copied into each shape's view schemas (a translated session is pointed at them).
//! [`Reading::read`] asks the catalog for all three; at 1,000 tables that costs 15–80 ms
//! (benches/big_schema.sh), where the rules' build itself is a few milliseconds. During a
//! cutover or rollback the gate opens only once the new rules are in force, so the control
//! link builds those from [`Reading::after_swap`] instead: the last reading with the swap's
//! renames applied, which are fully known from the plan. It then reads the catalog again
//! after the gate is open and corrects the rules if anything else changed
//! (src/proxy/source.rs).

use std::collections::{HashMap, HashSet};

use tokio_postgres::Client;

use crate::migrate::plan::Plan;
use crate::rewrite::TableColumns;
use crate::shape::Shape;

#[derive(Debug, thiserror::Error)]
pub enum ReadingError {
    #[error("reading the catalog for the rewrite rules: {0}")]
    Db(#[from] tokio_postgres::Error),
}

/// What the rules need from the catalog, with every list sorted so that two readings of the
/// same catalog compare equal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reading {
    /// The shape the tables physically had: which names the column lists carry.
    pub shape: Shape,
    /// The column lists were read from keyshift's integer-shape views, not the tables (phase
    /// `cutting_over`, when the tables are in both shapes): integer names whatever each
    /// table's state, and no swap to derive a next reading from.
    pub through_views: bool,
    /// Each FK child's columns in attnum order, by (schema, table).
    pub columns: Vec<TableColumns>,
    /// Relations in other schemas named like a migrated table, keyshift's own schemas aside,
    /// as (schema, name) (`PlanRules::shadows`).
    pub shadows: Vec<(String, String)>,
    /// The application's views copied into the integer shape's view schemas, as
    /// (application schema, view).
    pub integer_copies: Vec<(String, String)>,
    /// The same for the uuid shape.
    pub uuid_copies: Vec<(String, String)>,
}

impl Reading {
    /// The application's views that keyshift shows in `shape` (`PlanRules::shaped_views`).
    pub fn copies(&self, shape: Shape) -> &[(String, String)] {
        match shape {
            Shape::Integer => &self.integer_copies,
            Shape::Uuid => &self.uuid_copies,
        }
    }

    /// Reads the catalog for `plan`, whose tables are in `shape` (`None`: some in each, as a
    /// cutover table by table leaves them; the columns are then read from the integer-shape
    /// views, which list each table's columns in its order under the integer shape's names).
    /// The caller runs this in the same snapshot as its reading of the phase, so that `shape`
    /// is the one the columns have.
    pub async fn read(
        client: &Client,
        plan: &Plan,
        shape: Option<Shape>,
    ) -> Result<Reading, ReadingError> {
        let (columns, shadows, copies) = tokio::try_join!(
            child_columns(client, plan, shape.is_none()),
            shadows(client, plan),
            copies(client, plan),
        )?;
        let (integer_copies, uuid_copies) = copies;
        Ok(Reading {
            shape: shape.unwrap_or(Shape::Integer),
            through_views: shape.is_none(),
            columns,
            shadows,
            integer_copies,
            uuid_copies,
        })
    }

    /// This reading as [`Reading::read`] would make it once the tables may be in both
    /// shapes (phase `cutting_over`), from a reading of the tables in the integer shape:
    /// keyshift's integer-shape views list each table's columns in its order under those
    /// same names, so the lists do not change; only where they come from does. `None` from
    /// any other reading. Like every derived reading, confirmed by a full read once the gate
    /// is open (a column the application added after expand is in the table, not the view).
    pub fn through_views(&self) -> Option<Reading> {
        (!self.through_views && self.shape == Shape::Integer).then(|| Reading {
            through_views: true,
            ..self.clone()
        })
    }

    /// This reading as it is after the swap that moves the tables into the other shape,
    /// from the plan alone: the swap renames each key and FK column and its twin exactly as
    /// `migrate::views::names` lists them (cutover `key → legacy_column`, `uuid_column →
    /// key`; rollback the reverse), and changes nothing else this reading holds (it adds,
    /// drops and reorders no column; the relations it drops and creates again, carried
    /// views, keep their names; the copies read only keyshift's views and are left alone).
    ///
    /// `None` when this reading does not look like the tables the swap renames: a child
    /// missing, a column to rename absent or present twice, a renamed column landing on a
    /// name already there. The swap could not have committed against such tables, so the
    /// reading is stale and only a new one will do.
    pub fn after_swap(&self, plan: &Plan) -> Option<Reading> {
        if self.through_views {
            return None;
        }
        let to = self.shape.other();
        let renames = renames(plan, self.shape)?;
        let mut columns = Vec::with_capacity(self.columns.len());
        let mut seen = HashSet::new();
        for tc in &self.columns {
            seen.insert((tc.schema.as_str(), tc.table.as_str()));
            let map = renames.get(&(tc.schema.as_str(), tc.table.as_str()));
            let renamed: Vec<String> = tc
                .columns
                .iter()
                .map(|c| {
                    map.and_then(|m| m.get(c.as_str()))
                        .map_or_else(|| c.clone(), |n| n.to_string())
                })
                .collect();
            if let Some(m) = map {
                let present = |name: &&str| tc.columns.iter().filter(|c| c == name).count() == 1;
                if !m.keys().all(present) {
                    return None;
                }
            }
            let distinct: HashSet<&String> = renamed.iter().collect();
            if distinct.len() != renamed.len() {
                return None;
            }
            columns.push(TableColumns {
                schema: tc.schema.clone(),
                table: tc.table.clone(),
                columns: renamed,
            });
        }
        let children_read = plan
            .foreign_keys()
            .all(|(_, f)| seen.contains(&(f.child_schema.as_str(), f.child_table.as_str())));
        if !children_read {
            return None;
        }
        Some(Reading {
            shape: to,
            columns,
            ..self.clone()
        })
    }
}

/// Per table, each column the swap out of `from` renames → its name afterwards; `None` when
/// two renames of one column disagree (a plan keyshift did not write).
type Renames<'a> = HashMap<(&'a str, &'a str), HashMap<&'a str, &'a str>>;

fn renames(plan: &Plan, from: Shape) -> Option<Renames<'_>> {
    // (schema, table, the integer shape's name, the uuid shape's name), as
    // `migrate::views::names` pairs them and the swaps' `RENAME COLUMN`s apply them.
    let pairs = plan
        .tables
        .iter()
        .flat_map(|t| {
            [
                (&t.schema, &t.name, &t.key, &t.legacy_column),
                (&t.schema, &t.name, &t.uuid_column, &t.key),
            ]
        })
        .chain(plan.foreign_keys().flat_map(|(_, f)| {
            [
                (
                    &f.child_schema,
                    &f.child_table,
                    &f.child_column,
                    &f.legacy_column,
                ),
                (
                    &f.child_schema,
                    &f.child_table,
                    &f.uuid_column,
                    &f.child_column,
                ),
            ]
        }));
    let mut out: Renames = HashMap::new();
    for (schema, table, int, uuid) in pairs {
        let (a, b) = match from {
            Shape::Integer => (int.as_str(), uuid.as_str()),
            Shape::Uuid => (uuid.as_str(), int.as_str()),
        };
        let before = out
            .entry((schema.as_str(), table.as_str()))
            .or_default()
            .insert(a, b);
        if before.is_some_and(|x| x != b) {
            return None;
        }
    }
    Some(out)
}

/// Each FK child once, as (schema, table), sorted.
fn children(plan: &Plan) -> (Vec<&str>, Vec<&str>) {
    let mut children: Vec<(&str, &str)> = plan
        .foreign_keys()
        .map(|(_, fk)| (fk.child_schema.as_str(), fk.child_table.as_str()))
        .collect();
    children.sort_unstable();
    children.dedup();
    children.into_iter().unzip()
}

/// The physical column lists of every child table in the plan, in column order.
async fn child_columns(
    client: &Client,
    plan: &Plan,
    through_views: bool,
) -> Result<Vec<TableColumns>, ReadingError> {
    let (schemas, tables) = children(plan);
    if schemas.is_empty() {
        return Ok(Vec::new());
    }
    // Each table's integer-shape view, for tables in both shapes: the same columns in the
    // same order, named as the integer shape names them.
    let read_from: Vec<String> = schemas
        .iter()
        .map(|s| match through_views {
            true => Shape::Integer.view_schema(s),
            false => s.to_string(),
        })
        .collect();
    // Each table found through the (relname, relnamespace) index, and its columns through
    // the (attrelid, attnum) index: a join of the names with pg_attribute was planned as a
    // hash of all of pg_attribute, 41–60 ms at 1,000 tables (57,000 attributes), against
    // 3–12 ms this way (benches/big_schema.sh's schema, under load). No `to_regclass`: it
    // reads the catalog as of now, not in the caller's snapshot.
    let rows = client
        .query(
            "SELECT want.s, want.t,
                    ARRAY(SELECT a.attname::text FROM pg_attribute a
                           WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                           ORDER BY a.attnum)
             FROM unnest($1::text[], $2::text[], $3::text[]) AS want(s, t, read_from)
             JOIN pg_namespace n ON n.nspname = want.read_from
             JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = want.t
             ORDER BY 1, 2",
            &[&schemas, &tables, &read_from],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| TableColumns {
            schema: r.get(0),
            table: r.get(1),
            columns: r.get(2),
        })
        .collect())
}

/// Relations in other schemas named like a migrated table (keyshift's own view schemas
/// aside): a session whose search path puts such a schema first means that relation.
async fn shadows(client: &Client, plan: &Plan) -> Result<Vec<(String, String)>, ReadingError> {
    let mut names: Vec<&str> = crate::migrate::views::relations(plan)
        .into_iter()
        .map(|(_, t)| t)
        .collect();
    names.sort_unstable();
    names.dedup();
    let rows = client
        .query(
            "SELECT n.nspname::text, c.relname::text
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relname = ANY($1::text[]) AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
               AND n.nspname NOT LIKE 'keyshift\\_%' AND n.nspname NOT LIKE 'pg\\_%'
             ORDER BY 1, 2",
            &[&names],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// The application's views keyshift shows in each shape (src/migrate/carry.rs,
/// `carry_copies`): the views in the shape's view schemas that are not keyshift's views of a
/// migrated table, as (application schema, view); integer shape first.
type Copies = (Vec<(String, String)>, Vec<(String, String)>);

async fn copies(client: &Client, plan: &Plan) -> Result<Copies, ReadingError> {
    let relations = crate::migrate::views::relations(plan);
    let mut schemas: Vec<&str> = relations.iter().map(|(s, _)| *s).collect();
    schemas.sort_unstable();
    schemas.dedup();
    let (mut shapes, mut apps, mut view_schemas) = (Vec::new(), Vec::new(), Vec::new());
    for shape in Shape::ALL {
        for s in &schemas {
            shapes.push(shape.as_str());
            apps.push(*s);
            view_schemas.push(shape.view_schema(s));
        }
    }
    let rows = client
        .query(
            "SELECT want.shape, want.s, c.relname::text
             FROM unnest($1::text[], $2::text[], $3::text[]) AS want(shape, s, vs)
             JOIN pg_namespace n ON n.nspname = want.vs
             JOIN pg_class c ON c.relnamespace = n.oid AND c.relkind = 'v'
             ORDER BY 1, 2, 3",
            &[&shapes, &apps, &view_schemas],
        )
        .await?;
    let relations: HashSet<(&str, &str)> = relations.into_iter().collect();
    let (mut integer, mut uuid) = (Vec::new(), Vec::new());
    for r in &rows {
        let (shape, schema, view): (&str, String, String) = (r.get(0), r.get(1), r.get(2));
        if relations.contains(&(schema.as_str(), view.as_str())) {
            continue;
        }
        match Shape::parse(shape) {
            Ok(Shape::Integer) => integer.push((schema, view)),
            Ok(Shape::Uuid) => uuid.push((schema, view)),
            Err(_) => {}
        }
    }
    Ok((integer, uuid))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migrate::plan::{PlanOptions, build};

    /// connectors ← servers.connector_id, servers ← tools.server_id, tools ← tools.parent_id.
    fn plan() -> Plan {
        let p = build(
            &crate::migrate::plan::tests::sample(),
            &PlanOptions::default(),
        );
        assert!(p.blockers.is_empty(), "{:?}", p.blockers);
        p
    }

    fn cols(table: &str, names: &[&str]) -> TableColumns {
        TableColumns {
            schema: "public".into(),
            table: table.into(),
            columns: names.iter().map(|n| n.to_string()).collect(),
        }
    }

    /// The children as expand leaves them: each twin after the application's columns.
    fn expanded() -> Reading {
        Reading {
            shape: Shape::Integer,
            through_views: false,
            columns: vec![
                cols(
                    "servers",
                    &["id", "connector_id", "id_uuid", "connector_id_uuid"],
                ),
                cols(
                    "tools",
                    &[
                        "id",
                        "server_id",
                        "parent_id",
                        "id_uuid",
                        "server_id_uuid",
                        "parent_id_uuid",
                    ],
                ),
            ],
            shadows: vec![("app".into(), "servers".into())],
            integer_copies: vec![("public".into(), "server_names".into())],
            uuid_copies: vec![("public".into(), "server_names".into())],
        }
    }

    #[test]
    fn a_cutover_renames_the_columns_as_its_alter_table_statements_do() {
        let after = expanded().after_swap(&plan()).expect("derivable");
        assert_eq!(after.shape, Shape::Uuid);
        assert_eq!(
            after.columns,
            [
                cols(
                    "servers",
                    &["id_legacy", "connector_id_legacy", "id", "connector_id"]
                ),
                cols(
                    "tools",
                    &[
                        "id_legacy",
                        "server_id_legacy",
                        "parent_id_legacy",
                        "id",
                        "server_id",
                        "parent_id",
                    ]
                ),
            ]
        );
        // Nothing else a swap leaves changed.
        let before = expanded();
        assert_eq!(after.shadows, before.shadows);
        assert_eq!(after.copies(Shape::Integer), before.copies(Shape::Integer));
        assert_eq!(after.copies(Shape::Uuid), before.copies(Shape::Uuid));
    }

    #[test]
    fn the_renames_are_the_views_names_for_the_uuid_shape() {
        let p = plan();
        let before = expanded();
        let after = before.after_swap(&p).unwrap();
        for (b, a) in before.columns.iter().zip(&after.columns) {
            let names = crate::migrate::views::names(&p, &b.schema, &b.table, Shape::Uuid);
            for (old, new) in b.columns.iter().zip(&a.columns) {
                let want = names
                    .iter()
                    .find(|(int, _)| int == old)
                    .map_or(old, |(_, uuid)| uuid);
                assert_eq!(new, want, "{}.{}", b.table, old);
            }
        }
    }

    #[test]
    fn entering_cutting_over_reads_the_same_lists_through_the_views() {
        let p = plan();
        let through = expanded().through_views().unwrap();
        assert!(through.through_views);
        assert_eq!(through.columns, expanded().columns);
        // Nothing to derive from a reading through the views, or of the uuid shape.
        assert_eq!(through.through_views(), None);
        assert_eq!(expanded().after_swap(&p).unwrap().through_views(), None);
    }

    #[test]
    fn a_rollback_brings_the_reading_back() {
        let p = plan();
        let there = expanded().after_swap(&p).unwrap();
        assert_eq!(there.after_swap(&p), Some(expanded()));
    }

    #[test]
    fn a_reading_unlike_the_tables_the_swap_renames_is_not_derived_from() {
        let p = plan();
        // Read after the swap but labelled before it (a renamed-away column is missing).
        let mut mislabelled = expanded().after_swap(&p).unwrap();
        mislabelled.shape = Shape::Integer;
        assert_eq!(mislabelled.after_swap(&p), None);
        // A child missing.
        let mut missing = expanded();
        missing.columns.pop();
        assert_eq!(missing.after_swap(&p), None);
        // A column of the application already named like a renamed one's new name.
        let mut taken = expanded();
        taken.columns[0].columns.push("id_legacy".into());
        assert_eq!(taken.after_swap(&p), None);
    }
}
