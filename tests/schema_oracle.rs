//! [schema]'s oracle: a database migrated by keyshift, from plan to finalize, dumps (schema
//! only) as the same schema written by hand with uuid keys from the start; one rolled back and
//! aborted dumps as it did before expand.
//!
//! What is normalized, because it must differ or does not matter:
//! - the order of a table's columns (keyshift's uuid columns are added last; PostgreSQL
//!   cannot reorder columns), so each `CREATE TABLE`'s column lines are sorted;
//! - the order of the dump's statements (pg_dump orders some objects by OID), so the
//!   statements are compared as a sorted list, and the order of a statistics object's
//!   columns (a set, printed in column order);
//! - the `serial` sequences of the original keys, which finalize drops with the legacy
//!   columns: the hand-written schema has none;
//! - comments and `SET` lines of pg_dump's preamble.
//!
//! Not in the schema because keyshift leaves them on the integer column (plan warns):
//! generated columns computed from a migrated column, and CHECK constraints or statistics
//! whose definition only works with integers.
mod common;
mod migrate_support;

use std::collections::BTreeSet;

use migrate_support::ks_expect;

/// The schema with `{KEY}` for a key's type and default and `{FK}` for an FK column's type.
const SCHEMA: &str = "
CREATE TABLE mcp_connectors (id {KEY} PRIMARY KEY, name text NOT NULL, created_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE mcp_servers (id {KEY} PRIMARY KEY,
    connector_id {FK} REFERENCES mcp_connectors (id) ON DELETE CASCADE, name text NOT NULL, status text);
CREATE INDEX ix_mcp_servers_connector_id ON mcp_servers (connector_id);
CREATE TABLE mcp_server_tools (id {KEY} PRIMARY KEY,
    mcp_server_id {FK} NOT NULL REFERENCES mcp_servers (id), tool_name text NOT NULL,
    UNIQUE (mcp_server_id, tool_name));
ALTER TABLE mcp_servers ADD CONSTRAINT srv_connected CHECK (connector_id IS NOT NULL OR status = 'draft');
CREATE STATISTICS srv_stats (ndistinct) ON connector_id, status FROM mcp_servers;
COMMENT ON COLUMN mcp_servers.connector_id IS 'who runs it';
ALTER TABLE mcp_servers ALTER COLUMN connector_id SET STATISTICS 500;
GRANT SELECT (id, name) ON mcp_connectors TO {ROLE};
CREATE VIEW server_names AS
  SELECT s.id, s.name, c.id AS connector, c.name AS connector_name
    FROM mcp_servers s JOIN mcp_connectors c ON c.id = s.connector_id;
CREATE VIEW busy_connectors WITH (security_barrier) AS
  SELECT connector, count(*) AS servers FROM server_names GROUP BY connector;
CREATE VIEW writable_servers AS
  SELECT id, connector_id, name FROM mcp_servers WHERE name <> 'hidden' WITH CASCADED CHECK OPTION;
COMMENT ON VIEW server_names IS 'servers with their connector';
GRANT SELECT ON server_names, busy_connectors TO {ROLE};
GRANT SELECT (id, name) ON writable_servers TO {ROLE};
CREATE MATERIALIZED VIEW server_counts AS
  SELECT c.id AS connector, count(s.id) AS servers
    FROM mcp_connectors c JOIN mcp_servers s ON s.connector_id = c.id GROUP BY c.id;
CREATE UNIQUE INDEX server_counts_connector ON server_counts (connector);
COMMENT ON MATERIALIZED VIEW server_counts IS 'servers per connector';
GRANT SELECT ON server_counts TO {ROLE};
ALTER TABLE mcp_servers ENABLE ROW LEVEL SECURITY;
CREATE POLICY visible ON mcp_servers FOR SELECT TO {ROLE}
  USING (connector_id IN (SELECT id FROM mcp_connectors WHERE name <> 'c3'));
CREATE FUNCTION mark_moved() RETURNS trigger LANGUAGE plpgsql AS $$
  BEGIN NEW.name := NEW.name || '*'; RETURN NEW; END $$;
CREATE TRIGGER moved BEFORE UPDATE OF connector_id ON mcp_servers FOR EACH ROW
  WHEN (OLD.connector_id IS DISTINCT FROM NEW.connector_id) EXECUTE FUNCTION mark_moved();
ALTER TABLE mcp_servers ENABLE ALWAYS TRIGGER moved;
CREATE TABLE server_moves (server text, at timestamptz DEFAULT now());
CREATE RULE log_new AS ON INSERT TO mcp_servers WHERE NEW.connector_id IS NOT NULL
  DO ALSO INSERT INTO server_moves (server) VALUES (NEW.connector_id::text);
";

const ROWS: &str = "
INSERT INTO mcp_connectors (name) SELECT 'c' || g FROM generate_series(1, 10) g;
INSERT INTO mcp_servers (name, status) VALUES ('floating', 'draft');
INSERT INTO mcp_servers (connector_id, name) SELECT id, 's' || name FROM mcp_connectors;
INSERT INTO mcp_server_tools (mcp_server_id, tool_name) SELECT id, 't' || name FROM mcp_servers;
REFRESH MATERIALIZED VIEW server_counts;
";

fn schema(key: &str, fk: &str, role: &str) -> String {
    SCHEMA
        .replace("{KEY}", key)
        .replace("{FK}", fk)
        .replace("{ROLE}", role)
}

/// `pg_dump --schema-only` of `db`, normalized (module comment) into a sorted list of
/// statements.
fn dump(db: &common::TestDb) -> Vec<String> {
    let body = common::schema_dump(&db.url());
    let mut statements: Vec<String> = body
        .split(";\n")
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            if s.starts_with("CREATE TABLE") {
                // Column lines, order-free, without the commas that depend on the order.
                let mut lines: Vec<&str> = s.lines().collect();
                let head = lines.remove(0);
                let tail = lines.pop().unwrap_or_default();
                let mut cols: Vec<String> = lines
                    .iter()
                    .map(|l| l.trim().trim_end_matches(',').to_string())
                    .collect();
                cols.sort();
                format!("{head}\n{}\n{tail}", cols.join("\n"))
            } else if let (true, Some((head, rest))) =
                (s.starts_with("CREATE STATISTICS"), s.split_once(" ON "))
            {
                // A statistics object's columns are a set, printed in column order.
                let (cols, tail) = rest.split_once(" FROM ").unwrap_or((rest, ""));
                let mut cols: Vec<&str> = cols.split(", ").collect();
                cols.sort();
                format!("{head} ON {} FROM {tail}", cols.join(", "))
            } else {
                s.to_string()
            }
        })
        // The original keys' sequences (dropped with the legacy columns by finalize).
        .filter(|s| !s.contains("_id_seq"))
        .collect();
    statements.sort();
    statements
}

fn diff(got: &[String], want: &[String]) -> String {
    let g: BTreeSet<&String> = got.iter().collect();
    let w: BTreeSet<&String> = want.iter().collect();
    let mut out = String::new();
    for s in g.difference(&w) {
        out.push_str(&format!("+ {s}\n"));
    }
    for s in w.difference(&g) {
        out.push_str(&format!("- {s}\n"));
    }
    out
}

#[tokio::test]
async fn a_migrated_schema_dumps_as_the_same_schema_written_with_uuid_keys() {
    let migrated = common::TestDb::new().await;
    let role = format!("r_{}", migrated.name);
    let admin = migrated.client().await;
    admin
        .batch_execute(&format!(
            "CREATE ROLE {role}; {}{ROWS}",
            schema("serial", "integer", &role)
        ))
        .await
        .unwrap();
    let url = migrated.url();
    ks_expect(&url, &["expand", "--uuid-version", "4"], 0);
    for step in [
        &["backfill"][..],
        &["cutover"],
        &["rollback"],
        &["cutover"],
        &["shape", "default", "uuid"],
        &["finalize", "--yes"],
    ] {
        ks_expect(&url, step, 0);
    }
    let by_hand = common::TestDb::new().await;
    by_hand
        .client()
        .await
        .batch_execute(&format!(
            "{}{ROWS}",
            schema("uuid DEFAULT gen_random_uuid()", "uuid", &role)
        ))
        .await
        .unwrap();
    let (got, want) = (dump(&migrated), dump(&by_hand));
    assert!(got == want, "migrated vs by hand:\n{}", diff(&got, &want));

    // Rolled back and aborted: as before expand.
    let rolled = common::TestDb::new().await;
    let before = {
        rolled
            .client()
            .await
            .batch_execute(&format!("{}{ROWS}", schema("serial", "integer", &role)))
            .await
            .unwrap();
        dump(&rolled)
    };
    let url = rolled.url();
    for step in [
        &["expand"][..],
        &["backfill"],
        &["cutover"],
        &["rollback"],
        &["abort"],
    ] {
        ks_expect(&url, step, 0);
    }
    let after = dump(&rolled);
    assert!(
        after == before,
        "rolled back vs before:\n{}",
        diff(&after, &before)
    );
    admin
        .batch_execute(&format!("DROP OWNED BY {role}"))
        .await
        .unwrap();
}
