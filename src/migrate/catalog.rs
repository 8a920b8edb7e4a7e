//! Reads the PostgreSQL catalog into plain structs, so that the planner stays a pure function
//! that unit tests can feed by hand.

use serde::{Deserialize, Serialize};
use tokio_postgres::Client;

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("reading the catalog ({what}): {source}")]
    Query {
        what: &'static str,
        source: tokio_postgres::Error,
    },
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Catalog {
    pub tables: Vec<Table>,
    pub foreign_keys: Vec<ForeignKey>,
    pub indexes: Vec<Index>,
    pub dependents: Vec<Dependent>,
    /// `(schema, table, publication)`; `table` is `*` for a FOR ALL TABLES publication.
    pub publications: Vec<(String, String, String)>,
    /// Functions and procedures with a string body (plpgsql, SQL as `$$…$$`, …): they
    /// resolve names when they run, so nothing records what they read.
    #[serde(default)]
    pub routines: Vec<Routine>,
    /// The application's own triggers: `(schema, table, trigger, function)`.
    #[serde(default)]
    pub triggers: Vec<(String, String, String, String)>,
    /// Rules that fire on UPDATE: `(schema, table, rule)`. PostgreSQL refuses an UPDATE in a
    /// `WITH` (the backfill's batches) on a table that has one.
    #[serde(default)]
    pub update_rules: Vec<(String, String, String)>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Routine {
    /// `function` or `procedure`.
    pub kind: String,
    /// As `regprocedure` prints it: `public.f(integer)`.
    pub name: String,
    /// The body, lower-cased.
    pub source: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Table {
    pub schema: String,
    pub name: String,
    /// `r` for a plain table, `p` for a partitioned one.
    pub kind: String,
    pub is_partition: bool,
    /// Inherits from, or is inherited by, another table through old-style `INHERITS`
    /// (declarative partitioning is not counted here: `kind` and `is_partition` say it).
    pub inheritance: bool,
    /// A partitioned table's partition key columns (expressions are left out).
    #[serde(default)]
    pub partition_key: Vec<String>,
    /// A partitioned table with a partition that is itself partitioned.
    #[serde(default)]
    pub sub_partitioned: bool,
    pub row_estimate: i64,
    pub columns: Vec<Column>,
    pub primary_key: Option<PrimaryKey>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Column {
    pub name: String,
    /// `format_type()` of the column: `integer`, `bigint`, `smallint`, `uuid`, ...
    pub type_name: String,
    pub not_null: bool,
    pub default: Option<String>,
    /// `a` (ALWAYS) or `d` (BY DEFAULT) for identity columns.
    pub identity: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PrimaryKey {
    pub constraint: String,
    pub index: String,
    pub columns: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ForeignKey {
    pub name: String,
    pub child_schema: String,
    pub child_table: String,
    pub child_columns: Vec<String>,
    pub parent_schema: String,
    pub parent_table: String,
    pub parent_columns: Vec<String>,
    /// The index on the parent that the FK relies on.
    pub parent_index: String,
    /// `pg_constraint.confupdtype` / `confdeltype`: a, r, c, n, d.
    pub on_update: String,
    pub on_delete: String,
    pub deferrable: bool,
    pub initially_deferred: bool,
    pub validated: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Index {
    pub schema: String,
    pub table: String,
    pub name: String,
    pub method: String,
    pub unique: bool,
    pub primary: bool,
    pub valid: bool,
    /// Key columns as `pg_get_indexdef(index, k)` prints them: a column name or an expression.
    pub key_columns: Vec<String>,
    /// Whether each key column is a plain column (not an expression).
    pub key_is_column: Vec<bool>,
    /// `DESC`, `NULLS FIRST`... per key column, empty when default.
    pub key_options: Vec<String>,
    pub include_columns: Vec<String>,
    pub predicate: Option<String>,
    /// The UNIQUE (`u`) or EXCLUDE (`x`) constraint the index backs, if any.
    #[serde(default)]
    pub constraint: Option<String>,
    /// `DEFERRABLE [INITIALLY DEFERRED]` of that constraint; empty when it is not deferrable.
    #[serde(default)]
    pub deferral: String,
}

/// An object that references a table column by number: it would keep pointing at the legacy
/// integer column after the cutover renames it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Dependent {
    /// `view`, `materialized view`, `rule`, `policy`, `trigger`, `function`; and the objects
    /// that keep following the integer column without breaking anything: `check constraint`,
    /// `generated column`, `statistics`.
    pub kind: String,
    /// The object's own name, schema-qualified where it has one.
    pub name: String,
    pub schema: String,
    pub table: String,
    pub column: String,
}

const USER_SCHEMAS: &str = "n.nspname NOT IN ('pg_catalog', 'information_schema', 'keyshift') \
     AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname NOT LIKE 'pg_temp%'";

fn q(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> CatalogError {
    move |source| CatalogError::Query { what, source }
}

/// Reads every user table (all schemas but the system ones and `keyshift`): children of a
/// migrated key may live outside the schemas being migrated.
pub async fn read(client: &Client) -> Result<Catalog, CatalogError> {
    let mut cat = Catalog::default();
    let rows = client
        .query(
            &format!(
                "SELECT c.oid, n.nspname::text, c.relname::text, c.relkind::text, c.relispartition,
                        EXISTS (SELECT 1 FROM pg_inherits i
                                 WHERE (i.inhrelid = c.oid AND NOT c.relispartition)
                                    OR (i.inhparent = c.oid AND c.relkind <> 'p')),
                        GREATEST(c.reltuples, 0)::bigint,
                        ARRAY(SELECT a.attname::text FROM pg_partitioned_table pt
                                CROSS JOIN LATERAL unnest(pt.partattrs::int2[]) WITH ORDINALITY k(n, o)
                                JOIN pg_attribute a ON a.attrelid = pt.partrelid AND a.attnum = k.n
                               WHERE pt.partrelid = c.oid ORDER BY k.o),
                        EXISTS (SELECT 1 FROM pg_inherits i JOIN pg_class s ON s.oid = i.inhrelid
                                 WHERE i.inhparent = c.oid AND s.relkind = 'p')
                   FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE c.relkind IN ('r', 'p') AND {USER_SCHEMAS}
                  ORDER BY 2, 3"
            ),
            &[],
        )
        .await
        .map_err(q("tables"))?;
    let mut oids = Vec::new();
    for r in rows {
        oids.push(r.get::<_, u32>(0));
        cat.tables.push(Table {
            schema: r.get(1),
            name: r.get(2),
            kind: r.get(3),
            is_partition: r.get(4),
            inheritance: r.get(5),
            row_estimate: r.get(6),
            partition_key: r.get(7),
            sub_partitioned: r.get(8),
            ..Default::default()
        });
    }
    let cols = client
        .query(
            &format!(
                "SELECT a.attrelid, a.attname::text, format_type(a.atttypid, a.atttypmod), a.attnotnull,
                        pg_get_expr(d.adbin, d.adrelid), NULLIF(a.attidentity::text, '')
                   FROM pg_attribute a
                   JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
                   LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
                  WHERE c.relkind IN ('r', 'p') AND {USER_SCHEMAS} AND a.attnum > 0 AND NOT a.attisdropped
                  ORDER BY a.attrelid, a.attnum"
            ),
            &[],
        )
        .await
        .map_err(q("columns"))?;
    for r in cols {
        let oid: u32 = r.get(0);
        if let Some(i) = oids.iter().position(|o| *o == oid) {
            cat.tables[i].columns.push(Column {
                name: r.get(1),
                type_name: r.get(2),
                not_null: r.get(3),
                default: r.get(4),
                identity: r.get(5),
            });
        }
    }
    let pks = client
        .query(
            &format!(
                "SELECT con.conrelid, con.conname::text, ic.relname::text,
                        ARRAY(SELECT a.attname::text FROM unnest(con.conkey) WITH ORDINALITY k(n, o)
                              JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.n ORDER BY k.o)
                   FROM pg_constraint con
                   JOIN pg_class c ON c.oid = con.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace
                   JOIN pg_class ic ON ic.oid = con.conindid
                  WHERE con.contype = 'p' AND {USER_SCHEMAS}"
            ),
            &[],
        )
        .await
        .map_err(q("primary keys"))?;
    for r in pks {
        let oid: u32 = r.get(0);
        if let Some(i) = oids.iter().position(|o| *o == oid) {
            cat.tables[i].primary_key = Some(PrimaryKey {
                constraint: r.get(1),
                index: r.get(2),
                columns: r.get(3),
            });
        }
    }
    let fks = client
        .query(
            &format!(
                "SELECT con.conname::text, n.nspname::text, c.relname::text,
                        ARRAY(SELECT a.attname::text FROM unnest(con.conkey) WITH ORDINALITY k(n, o)
                              JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.n ORDER BY k.o),
                        pn.nspname::text, pc.relname::text,
                        ARRAY(SELECT a.attname::text FROM unnest(con.confkey) WITH ORDINALITY k(n, o)
                              JOIN pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.n ORDER BY k.o),
                        COALESCE(ic.relname::text, ''), con.confupdtype::text, con.confdeltype::text,
                        con.condeferrable, con.condeferred, con.convalidated
                   FROM pg_constraint con
                   JOIN pg_class c ON c.oid = con.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace
                   JOIN pg_class pc ON pc.oid = con.confrelid JOIN pg_namespace pn ON pn.oid = pc.relnamespace
                   LEFT JOIN pg_class ic ON ic.oid = con.conindid
                  WHERE con.contype = 'f' AND con.conparentid = 0 AND {USER_SCHEMAS}
                  ORDER BY 2, 3, 1"
            ),
            &[],
        )
        .await
        .map_err(q("foreign keys"))?;
    for r in fks {
        cat.foreign_keys.push(ForeignKey {
            name: r.get(0),
            child_schema: r.get(1),
            child_table: r.get(2),
            child_columns: r.get(3),
            parent_schema: r.get(4),
            parent_table: r.get(5),
            parent_columns: r.get(6),
            parent_index: r.get(7),
            on_update: r.get(8),
            on_delete: r.get(9),
            deferrable: r.get(10),
            initially_deferred: r.get(11),
            validated: r.get(12),
        });
    }
    let idx = client
        .query(
            &format!(
                "SELECT n.nspname::text, c.relname::text, ic.relname::text, am.amname::text,
                        i.indisunique, i.indisprimary, i.indisvalid,
                        ARRAY(SELECT pg_get_indexdef(i.indexrelid, k, true) FROM generate_series(1, i.indnkeyatts) k),
                        ARRAY(SELECT (i.indkey::int2[])[k - 1] <> 0 FROM generate_series(1, i.indnkeyatts) k),
                        ARRAY(SELECT CASE WHEN am.amname <> 'btree' THEN ''
                                          ELSE concat_ws(' ',
                                            CASE WHEN (i.indoption::int2[])[k - 1] & 1 = 1 THEN 'DESC' END,
                                            CASE WHEN (i.indoption::int2[])[k - 1] & 3 = 2 THEN 'NULLS FIRST'
                                                 WHEN (i.indoption::int2[])[k - 1] & 3 = 1 THEN 'NULLS LAST' END) END
                              FROM generate_series(1, i.indnkeyatts) k),
                        ARRAY(SELECT pg_get_indexdef(i.indexrelid, k, true) FROM generate_series(i.indnkeyatts + 1, i.indnatts) k),
                        pg_get_expr(i.indpred, i.indrelid, true),
                        con.contype::text,
                        concat_ws(' ', CASE WHEN con.condeferrable THEN 'DEFERRABLE' END,
                                  CASE WHEN con.condeferred THEN 'INITIALLY DEFERRED' END)
                   FROM pg_index i
                   LEFT JOIN pg_constraint con ON con.conindid = i.indexrelid AND con.contype IN ('u', 'x')
                   JOIN pg_class ic ON ic.oid = i.indexrelid
                   JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace
                   JOIN pg_am am ON am.oid = ic.relam
                  WHERE c.relkind IN ('r', 'p') AND {USER_SCHEMAS}
                  ORDER BY 1, 2, 3"
            ),
            &[],
        )
        .await
        .map_err(q("indexes"))?;
    for r in idx {
        cat.indexes.push(Index {
            schema: r.get(0),
            table: r.get(1),
            name: r.get(2),
            method: r.get(3),
            unique: r.get(4),
            primary: r.get(5),
            valid: r.get(6),
            key_columns: r.get(7),
            key_is_column: r.get(8),
            key_options: r.get(9),
            include_columns: r.get(10),
            predicate: r.get(11),
            constraint: r.get(12),
            deferral: r.get(13),
        });
    }
    // pg_depend records a dependency on the column *number* for views, rules, policies,
    // triggers (WHEN / UPDATE OF) and SQL-standard function bodies: exactly the objects that a
    // rename would silently re-point at the legacy column.
    let deps = client
        .query(
            &format!(
                "SELECT DISTINCT
                        CASE d.classid
                          WHEN 'pg_rewrite'::regclass THEN
                            CASE (SELECT v.relkind FROM pg_rewrite r JOIN pg_class v ON v.oid = r.ev_class WHERE r.oid = d.objid)
                              WHEN 'v' THEN 'view' WHEN 'm' THEN 'materialized view' ELSE 'rule' END
                          WHEN 'pg_policy'::regclass THEN 'policy'
                          WHEN 'pg_trigger'::regclass THEN 'trigger'
                          WHEN 'pg_proc'::regclass THEN 'function' END,
                        CASE d.classid
                          WHEN 'pg_rewrite'::regclass THEN
                            (SELECT CASE WHEN v.relkind IN ('v', 'm') THEN vn.nspname || '.' || v.relname
                                         ELSE r.rulename::text END
                               FROM pg_rewrite r JOIN pg_class v ON v.oid = r.ev_class
                               JOIN pg_namespace vn ON vn.oid = v.relnamespace WHERE r.oid = d.objid)
                          WHEN 'pg_policy'::regclass THEN (SELECT polname::text FROM pg_policy WHERE oid = d.objid)
                          WHEN 'pg_trigger'::regclass THEN (SELECT tgname::text FROM pg_trigger WHERE oid = d.objid)
                          WHEN 'pg_proc'::regclass THEN d.objid::regprocedure::text END,
                        n.nspname::text, c.relname::text, a.attname::text
                   FROM pg_depend d
                   JOIN pg_class c ON c.oid = d.refobjid
                   JOIN pg_namespace n ON n.oid = c.relnamespace
                   JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
                  WHERE d.refclassid = 'pg_class'::regclass AND d.refobjsubid > 0
                    AND d.classid IN ('pg_rewrite'::regclass, 'pg_policy'::regclass,
                                      'pg_trigger'::regclass, 'pg_proc'::regclass)
                    AND d.deptype = 'n' AND {USER_SCHEMAS}
                  ORDER BY 3, 4, 5, 1, 2"
            ),
            &[],
        )
        .await
        .map_err(q("dependent objects"))?;
    for r in deps {
        let kind: Option<String> = r.get(0);
        let name: Option<String> = r.get(1);
        cat.dependents.push(Dependent {
            kind: kind.unwrap_or_else(|| "object".into()),
            name: name.unwrap_or_default(),
            schema: r.get(2),
            table: r.get(3),
            column: r.get(4),
        });
    }
    // What follows the column by number without breaking: CHECK constraints, generated
    // columns, extended statistics. Listed by plan, not refused.
    let follows = client
        .query(
            &format!(
                "SELECT DISTINCT x.kind, x.name, n.nspname::text, c.relname::text, a.attname::text FROM (
                   SELECT 'check constraint' AS kind, con.conname::text AS name, d.refobjid, d.refobjsubid
                     FROM pg_depend d JOIN pg_constraint con ON con.oid = d.objid
                    WHERE d.classid = 'pg_constraint'::regclass AND con.contype = 'c' AND d.deptype = 'n'
                   UNION ALL
                   SELECT 'generated column', ga.attname::text, d.refobjid, d.refobjsubid
                     FROM pg_depend d JOIN pg_attrdef ad ON ad.oid = d.objid
                     JOIN pg_attribute ga ON ga.attrelid = ad.adrelid AND ga.attnum = ad.adnum
                    WHERE d.classid = 'pg_attrdef'::regclass AND d.deptype = 'n'
                   UNION ALL
                   SELECT 'statistics', sn.nspname || '.' || s.stxname, d.refobjid, d.refobjsubid
                     FROM pg_depend d JOIN pg_statistic_ext s ON s.oid = d.objid
                     JOIN pg_namespace sn ON sn.oid = s.stxnamespace
                    WHERE d.classid = 'pg_statistic_ext'::regclass) x
                 JOIN pg_class c ON c.oid = x.refobjid
                 JOIN pg_namespace n ON n.oid = c.relnamespace
                 JOIN pg_attribute a ON a.attrelid = x.refobjid AND a.attnum = x.refobjsubid
                WHERE x.refobjsubid > 0 AND {USER_SCHEMAS}
                ORDER BY 3, 4, 5, 1, 2"
            ),
            &[],
        )
        .await
        .map_err(q("objects on columns"))?;
    for r in follows {
        cat.dependents.push(Dependent {
            kind: r.get(0),
            name: r.get(1),
            schema: r.get(2),
            table: r.get(3),
            column: r.get(4),
        });
    }
    // String bodies (prosqlbody, PostgreSQL 14+, read through to_jsonb so that 13 works).
    let routines = client
        .query(
            &format!(
                "SELECT CASE p.prokind WHEN 'p' THEN 'procedure' ELSE 'function' END,
                        p.oid::regprocedure::text, lower(p.prosrc)
                   FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                   JOIN pg_language l ON l.oid = p.prolang
                  WHERE p.prokind IN ('f', 'p') AND l.lanname NOT IN ('c', 'internal')
                    AND to_jsonb(p) ->> 'prosqlbody' IS NULL
                    AND n.nspname NOT LIKE 'keyshift%' AND {USER_SCHEMAS}
                    AND NOT EXISTS (SELECT 1 FROM pg_depend e WHERE e.classid = 'pg_proc'::regclass
                                    AND e.objid = p.oid AND e.deptype = 'e')
                  ORDER BY 2"
            ),
            &[],
        )
        .await
        .map_err(q("functions"))?;
    for r in routines {
        cat.routines.push(Routine {
            kind: r.get(0),
            name: r.get(1),
            source: r.get(2),
        });
    }
    let triggers = client
        .query(
            &format!(
                "SELECT n.nspname::text, c.relname::text, t.tgname::text, t.tgfoid::regprocedure::text
                   FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
                   JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE NOT t.tgisinternal AND t.tgname NOT LIKE 'zz\\_keyshift\\_%' AND {USER_SCHEMAS}
                  ORDER BY 1, 2, 3"
            ),
            &[],
        )
        .await
        .map_err(q("triggers"))?;
    for r in triggers {
        cat.triggers.push((r.get(0), r.get(1), r.get(2), r.get(3)));
    }
    let pubs = client
        .query(
            "SELECT COALESCE(n.nspname::text, '*'), COALESCE(c.relname::text, '*'), p.pubname::text
               FROM pg_publication p
               LEFT JOIN pg_publication_rel pr ON pr.prpubid = p.oid
               LEFT JOIN pg_class c ON c.oid = pr.prrelid
               LEFT JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE p.puballtables OR pr.prrelid IS NOT NULL
              ORDER BY 3, 1, 2",
            &[],
        )
        .await
        .map_err(q("publications"))?;
    for r in pubs {
        cat.publications.push((r.get(0), r.get(1), r.get(2)));
    }
    let rules = client
        .query(
            &format!(
                "SELECT n.nspname::text, c.relname::text, r.rulename::text
                   FROM pg_rewrite r JOIN pg_class c ON c.oid = r.ev_class
                   JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE r.ev_type = '2' AND c.relkind IN ('r', 'p') AND {USER_SCHEMAS}
                  ORDER BY 1, 2, 3"
            ),
            &[],
        )
        .await
        .map_err(q("rules"))?;
    for r in rules {
        cat.update_rules.push((r.get(0), r.get(1), r.get(2)));
    }
    Ok(cat)
}
