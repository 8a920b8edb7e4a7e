//! Which tables have a mapping, and where each side of it lives right now.
//!
//! Before cutover the legacy id is the key column and the uuid its twin; after cutover the
//! uuid is the key and the integer lives on in `{key}_legacy`; after `finalize --keep-map`
//! the mapping lives in `keyshift.id_map_archive`. The catalog is rebuilt from the database
//! whenever the phase moves, and its `stamp` says which mapping it describes: a new stamp
//! (an aborted migration started again mints new uuids) means nothing cached still holds.

use tokio_postgres::Client;

use crate::ident::{literal, qualified, quote};
use crate::migrate::ddl::map_name;
use crate::migrate::plan::Plan;
use crate::migrate::state::{self, Phase};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The migrated tables themselves.
    Live,
    /// `keyshift.id_map_archive`, kept by `finalize --keep-map`.
    Archive,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapTable {
    /// `schema.table`, as in `keyshift.id_map.table_name`.
    pub name: String,
    pub schema: String,
    pub table: String,
    /// Columns holding each side (live source only).
    pub legacy_column: String,
    pub uuid_column: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapCatalog {
    /// Identifies the mapping: the migration's creation time, or `archive`.
    pub stamp: String,
    pub source: Source,
    pub tables: Vec<MapTable>,
}

impl MapCatalog {
    /// Finds a table by `schema.table`, or by bare name through the search path.
    pub fn resolve(&self, name: &str, search_path: &[String]) -> Option<(u32, &MapTable)> {
        let find = |full: &str| {
            self.tables
                .iter()
                .position(|t| t.name == full)
                .map(|i| (i as u32, &self.tables[i]))
        };
        if name.contains('.') {
            return find(name);
        }
        search_path
            .iter()
            .find_map(|schema| find(&format!("{schema}.{name}")))
    }

    pub fn names(&self) -> Vec<&str> {
        self.tables.iter().map(|t| t.name.as_str()).collect()
    }

    /// Rows `(legacy_id bigint, uuid text)` of table `t` whose legacy id is in `$1::bigint[]`.
    pub fn by_legacy_sql(&self, t: &MapTable) -> String {
        match self.source {
            Source::Live => format!(
                "SELECT {l}::bigint, {u}::text FROM {tbl} WHERE {l} = ANY($1::bigint[]) AND {u} IS NOT NULL",
                l = quote(&t.legacy_column),
                u = quote(&t.uuid_column),
                tbl = qualified(&t.schema, &t.table),
            ),
            Source::Archive => format!(
                "SELECT legacy_id, uuid::text FROM keyshift.id_map_archive WHERE table_name = {} AND legacy_id = ANY($1::bigint[])",
                literal(&t.name)
            ),
        }
    }

    /// Rows `(legacy_id bigint, uuid text)` of table `t` whose uuid is in `$1::text[]`.
    pub fn by_uuid_sql(&self, t: &MapTable) -> String {
        match self.source {
            Source::Live => format!(
                "SELECT {l}::bigint, {u}::text FROM {tbl} WHERE {u} = ANY($1::text[]::uuid[]) AND {l} IS NOT NULL",
                l = quote(&t.legacy_column),
                u = quote(&t.uuid_column),
                tbl = qualified(&t.schema, &t.table),
            ),
            Source::Archive => format!(
                "SELECT legacy_id, uuid::text FROM keyshift.id_map_archive WHERE table_name = {} AND uuid = ANY($1::text[]::uuid[])",
                literal(&t.name)
            ),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("{0}")]
    Db(#[from] tokio_postgres::Error),
    #[error("cannot read keyshift's state: {0}")]
    State(#[from] state::StateError),
}

/// The mapping of a live migration, from its plan and phase as already read (the proxy
/// keeps its plan); `stamp` is the migration's `created_at`.
///
/// While a cutover swaps table by table (`cutting_over`) each table is read through
/// keyshift's integer-shape view of it, whose names hold whether it was swapped yet or not.
pub fn live_catalog(stamp: String, plan: &Plan, phase: Phase) -> MapCatalog {
    let mixed = crate::shape::Shape::physical(phase).is_none();
    let after = phase.is_after_cutover() && !mixed;
    let tables = plan
        .tables
        .iter()
        .map(|t| {
            let (legacy_column, uuid_column) = if after {
                (t.legacy_column.clone(), t.key.clone())
            } else {
                (t.key.clone(), t.uuid_column.clone())
            };
            MapTable {
                name: map_name(t),
                schema: match mixed {
                    true => crate::shape::Shape::Integer.view_schema(&t.schema),
                    false => t.schema.clone(),
                },
                table: t.name.clone(),
                legacy_column,
                uuid_column,
            }
        })
        .collect();
    MapCatalog {
        stamp,
        source: Source::Live,
        tables,
    }
}

/// The mapping in the database now: `None` when there is none (no migration, no archive).
pub async fn load(client: &Client) -> Result<Option<MapCatalog>, CatalogError> {
    let row = client
        .query_one(
            "SELECT to_regclass('keyshift.migration') IS NOT NULL, to_regclass('keyshift.id_map_archive') IS NOT NULL",
            &[],
        )
        .await?;
    let (live, archive): (bool, bool) = (row.get(0), row.get(1));
    if live && let Some((head, plan)) = state::load_with_plan(client).await? {
        return Ok(Some(live_catalog(head.stamp.created_at, &plan, head.phase)));
    }
    if !archive {
        return Ok(None);
    }
    // The distinct table names by a loose index scan of the primary key: a few index probes
    // per table instead of reading the whole archive.
    let rows = client
        .query(
            "WITH RECURSIVE t(n) AS (
                SELECT min(table_name) FROM keyshift.id_map_archive
                UNION ALL
                SELECT (SELECT min(table_name) FROM keyshift.id_map_archive WHERE table_name > t.n)
                FROM t WHERE t.n IS NOT NULL
            ) SELECT n FROM t WHERE n IS NOT NULL",
            &[],
        )
        .await?;
    let tables = rows
        .iter()
        .map(|r| {
            let name: String = r.get(0);
            let (schema, table) = name
                .split_once('.')
                .map(|(s, t)| (s.to_string(), t.to_string()))
                .unwrap_or_else(|| (String::new(), name.clone()));
            MapTable {
                name,
                schema,
                table,
                legacy_column: "legacy_id".into(),
                uuid_column: "uuid".into(),
            }
        })
        .collect();
    Ok(Some(MapCatalog {
        stamp: "archive".into(),
        source: Source::Archive,
        tables,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cat() -> MapCatalog {
        let t = |s: &str, n: &str| MapTable {
            name: format!("{s}.{n}"),
            schema: s.into(),
            table: n.into(),
            legacy_column: "id".into(),
            uuid_column: "id_uuid".into(),
        };
        MapCatalog {
            stamp: "x".into(),
            source: Source::Live,
            tables: vec![t("public", "users"), t("app", "users"), t("app", "orders")],
        }
    }

    #[test]
    fn resolves_qualified_and_through_the_search_path() {
        let c = cat();
        let path = vec!["public".to_string(), "app".to_string()];
        assert_eq!(c.resolve("users", &path).map(|x| x.0), Some(0));
        assert_eq!(c.resolve("app.users", &path).map(|x| x.0), Some(1));
        assert_eq!(c.resolve("orders", &path).map(|x| x.0), Some(2));
        assert_eq!(c.resolve("orders", &["public".to_string()]), None);
        assert_eq!(c.resolve("nope", &path), None);
    }

    #[test]
    fn live_lookups_name_the_columns_and_use_any() {
        let c = cat();
        let sql = c.by_legacy_sql(&c.tables[0]);
        assert!(
            sql.contains("FROM public.users WHERE id = ANY($1::bigint[])"),
            "{sql}"
        );
        let sql = c.by_uuid_sql(&c.tables[0]);
        assert!(
            sql.contains("WHERE id_uuid = ANY($1::text[]::uuid[])"),
            "{sql}"
        );
    }
}
