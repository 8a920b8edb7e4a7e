//! Seed 004's schema (the five tables of its guide, with its dependency tree and ON DELETE
//! actions) and a realistic data set for it. The tests use the same schema.

/// The five tables of seed 004, parents first.
pub const TABLES: [&str; 5] = [
    "mcp_connectors",
    "connector_access",
    "mcp_servers",
    "mcp_server_tokens",
    "mcp_server_tools",
];

/// Shaped like seed 004: 5 tables, the dependency tree of its guide.
pub const SEED_004: &str = "
CREATE TABLE mcp_connectors (id serial PRIMARY KEY, name text NOT NULL, created_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE connector_access (id serial PRIMARY KEY,
    connector_id integer NOT NULL REFERENCES mcp_connectors (id) ON DELETE CASCADE, user_id text NOT NULL);
CREATE INDEX ix_connector_access_connector_id ON connector_access (connector_id);
CREATE TABLE mcp_servers (id serial PRIMARY KEY,
    connector_id integer REFERENCES mcp_connectors (id) ON DELETE CASCADE, name text NOT NULL, status text);
CREATE INDEX ix_mcp_servers_connector_id ON mcp_servers (connector_id);
CREATE TABLE mcp_server_tokens (id serial PRIMARY KEY,
    mcp_server_id integer NOT NULL REFERENCES mcp_servers (id), token text NOT NULL);
CREATE TABLE mcp_server_tools (id serial PRIMARY KEY,
    mcp_server_id integer NOT NULL REFERENCES mcp_servers (id), tool_name text NOT NULL,
    UNIQUE (mcp_server_id, tool_name));
";

/// Indexes the demo's application needs to find its rows by name; they do not touch a key.
pub const APP_INDEXES: &str = "
CREATE INDEX ix_mcp_connectors_name ON mcp_connectors (name);
CREATE INDEX ix_mcp_servers_name ON mcp_servers (name);
";

/// Connectors for about `rows` rows in all: per connector 2 access grants, 3 servers (one in
/// twenty without a connector: the FK is nullable), 4 tokens and 6 tools (2 per server).
pub fn connectors_for(rows: u64) -> i64 {
    (rows / 16).max(1) as i64
}

/// The data set: names, timestamps spread over a year, statuses, tokens, the way an
/// application would have left them. Then ANALYZE, so the plan's row estimates are right.
pub fn rows_sql(rows: u64) -> String {
    let c = connectors_for(rows);
    format!(
        "INSERT INTO mcp_connectors (name, created_at)
           SELECT 'c' || g, now() - (g % 365) * interval '1 day' - (g % 86400) * interval '1 second'
           FROM generate_series(1, {c}) g;
         INSERT INTO connector_access (connector_id, user_id)
           SELECT (g + 1) / 2, 'user' || (g * 7919 % 100000) || '@example.com' FROM generate_series(1, 2 * {c}) g;
         INSERT INTO mcp_servers (connector_id, name, status)
           SELECT CASE WHEN g % 20 = 0 THEN NULL ELSE (g + 2) / 3 END, 's' || g,
                  (ARRAY['active', 'active', 'active', 'inactive', 'error'])[g % 5 + 1]
           FROM generate_series(1, 3 * {c}) g;
         INSERT INTO mcp_server_tokens (mcp_server_id, token)
           SELECT (g - 1) % (3 * {c}) + 1, md5('token' || g) FROM generate_series(1, 4 * {c}) g;
         INSERT INTO mcp_server_tools (mcp_server_id, tool_name)
           SELECT (g + 1) / 2, (ARRAY['fetch', 'search'])[g % 2 + 1] FROM generate_series(1, 6 * {c}) g;
         ANALYZE;"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(connectors_for(1_600_000), 100_000);
        assert_eq!(connectors_for(3), 1);
        assert!(rows_sql(160).contains("generate_series(1, 10)"));
    }
}
