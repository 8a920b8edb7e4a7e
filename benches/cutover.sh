#!/usr/bin/env bash
# Cutover pause benchmark: the client-visible pause of `keyshift cutover` on the seed-004-shaped
# schema (5 tables) at ~10 thousand and at ~2 million rows, in ONE run, side by side.
#
# For each size: a database with the schema and its rows, `keyshift expand` + `keyshift backfill`
# (which hardens), a keyshift proxy linked to it. Then, one size after the other: CLIENTS pgbench
# clients run short transactions through the proxy for max(DURATION, CUT_AT + 6 × verify + 20) s
# (verify runs inside cutover, slower under load), with per-transaction
# latency logging (-l); at CUT_AT seconds `keyshift cutover` runs once. From the logs:
#   baseline   transactions that ended between 2 s after the start and 0.5 s before the cutover
#   pause      transactions that overlap the interval in which the proxy's gate was closed (from
#              the proxy's log: "closing the gate" to "gate open"): every transaction it held
#              and, for those that started while it was closed, how long after it opened they ended
#   command    transactions that ended while `keyshift cutover` ran (verify etc. included) + 1 s
# and for each: max latency (the longest stall a client saw), p99, and the longest interval in
# which no client completed anything. Prints what `keyshift cutover` printed (swap ms, gate
# closed ms per proxy) and the 2M/10k ratios. Fails on any failed or aborted client transaction.
# Targets (DESIGN.md): max stall ≤ 100 ms, and the 2M-row pause ≤ 1.5 × the 10k-row pause.
#
# SCHEMA_OBJECTS=1 compares two schemas instead of two sizes, in the same way and in one run
# (issue 15): `plain`, the seed-004 shape with OBJ_N (n), and `objects`, the same tables and
# rows plus what keyshift carries through the swap (src/migrate/carry.rs, partitions.rs):
#   - a partitioned child `connector_events` (12 monthly range partitions on a timestamptz, an
#     indexed integer FK to mcp_connectors, no key of its own), EVENTS rows;
#   - 20 views over migrated key and FK columns: views of views (up to 4 deep), two with
#     security_barrier, one security_invoker, one WITH CASCADED CHECK OPTION, one over a
#     materialized view; table and column grants to a role, comments on views and columns;
#   - 5 materialized views over migrated columns, each with a unique index, one of them
#     (mv_event_log, over connector_events) of EVENTS rows;
#   - row-level security on 5 migrated tables (the partitioned child included), 6 policies
#     naming a migrated column (the load runs as superuser, which RLS does not restrict).
# Same load, same clients. After each cutover the objects are checked: each view answers, no
# view or policy still reads a `*_legacy` column, the key columns the views and materialized
# views show are uuid, each materialized view has its rows and unique index, and REFRESH …
# CONCURRENTLY works. Targets: the objects schema's pause ≤ 1.5 × the plain schema's (gate
# closed, longest stall, swap). With PROFILE=1 (default with SCHEMA_OBJECTS=1) the cluster
# loads pg_stat_statements (track = all, utility statements too), reset just before each
# cutover, and the script prints the swap's statements with their times, those run inside
# keyshift.carry_save / carry_restore included, to see where the pause goes.
#
# Usage: benches/cutover.sh              (about 5–10 minutes on 2 cores, most of it loading and
#                                          backfilling the 2 M rows)
#        SCHEMA_OBJECTS=1 benches/cutover.sh   (about 10–15 minutes: the 1 M-row partitioned
#                                          child and materialized view are built, backfilled, shadowed)
# SCALE=1 runs benches/cutover_tables.sh instead: the pause at 10-300 tables, star and chain.
# Environment: SMALL=1250 LARGE=250000 (n: rows = 8 n: n connectors, n access, 2n servers,
#              2n tokens, 2n tools), CLIENTS=16, JOBS=2, DURATION=24, CUT_AT=12, MODE=simple,
#              DRAIN_TIMEOUT=2s, PGBIN, KEEP_TMP=1 (keep the logs in the temp dir);
#              SCHEMA_OBJECTS=1 with OBJ_N=62500 (n for both schemas), EVENTS=1000000, PROFILE=1 (PROFILE= turns it off);
#              BY_TABLE=1 runs `keyshift cutover --by-table` instead: the pause window is then from
#              the first gate closing to phase cut_over in force, and every pause's gate is listed
#              (the entry's, any group's own, the carried objects' rebuild).
set -euo pipefail
# SCALE=1: the pause against the number of migrated tables instead (issue [scale]).
if [[ -n ${SCALE:-} ]]; then exec "$(dirname "${BASH_SOURCE[0]}")/cutover_tables.sh"; fi

SMALL=${SMALL:-1250}
LARGE=${LARGE:-250000}
CLIENTS=${CLIENTS:-16}
JOBS=${JOBS:-2}
DURATION=${DURATION:-24}
CUT_AT=${CUT_AT:-12}
MODE=${MODE:-simple}
DRAIN_TIMEOUT=${DRAIN_TIMEOUT:-2s}
SCHEMA_OBJECTS=${SCHEMA_OBJECTS:-}
OBJ_N=${OBJ_N:-62500}
EVENTS=${EVENTS:-1000000}
PROFILE=${PROFILE-$SCHEMA_OBJECTS}
BY_TABLE=${BY_TABLE:-}
CUT_FLAGS=()
[[ -n $BY_TABLE ]] && CUT_FLAGS=(--by-table)

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }
command -v curl >/dev/null || die "curl is needed to read the proxies' /v1/status"
bench_setup cut
# Autovacuum logged: under the load its ShareUpdateExclusive lock on a table is what a swap's
# ACCESS EXCLUSIVE waits for when no client transaction is left (KEEP_TMP=1 keeps the log).
PG_OPTS="-c max_connections=200 -c shared_buffers=256MB -c max_wal_size=8GB -c fsync=off \
    -c synchronous_commit=off -c full_page_writes=off -c log_autovacuum_min_duration=0"
if [[ -n $PROFILE ]]; then
    PG_OPTS+=" -c shared_preload_libraries=pg_stat_statements -c pg_stat_statements.track=all \
    -c pg_stat_statements.track_utility=on -c pg_stat_statements.max=20000"
fi
start_postgres "$PG_OPTS"
if [[ -n $PROFILE ]]; then "${PSQL[@]}" -d postgres -c "CREATE EXTENSION pg_stat_statements"; fi

# The seed-004 shape (tests/migrate_support/mod.rs SEED_004 and seed_004_rows), plus an index on
# mcp_servers.name: the load looks servers up by name (a column that exists before and after
# cutover), and without it every lookup would be a scan whose cost grows with the table.
SCHEMA="
CREATE TABLE mcp_connectors (id serial PRIMARY KEY, name text NOT NULL, created_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE connector_access (id serial PRIMARY KEY,
    connector_id integer NOT NULL REFERENCES mcp_connectors (id) ON DELETE CASCADE, user_id text NOT NULL);
CREATE INDEX ix_connector_access_connector_id ON connector_access (connector_id);
CREATE TABLE mcp_servers (id serial PRIMARY KEY,
    connector_id integer REFERENCES mcp_connectors (id) ON DELETE CASCADE, name text NOT NULL, status text);
CREATE INDEX ix_mcp_servers_connector_id ON mcp_servers (connector_id);
CREATE INDEX ix_mcp_servers_name ON mcp_servers (name);
CREATE TABLE mcp_server_tokens (id serial PRIMARY KEY,
    mcp_server_id integer NOT NULL REFERENCES mcp_servers (id), token text NOT NULL);
CREATE TABLE mcp_server_tools (id serial PRIMARY KEY,
    mcp_server_id integer NOT NULL REFERENCES mcp_servers (id), tool_name text NOT NULL,
    UNIQUE (mcp_server_id, tool_name));
"
rows_sql() {
    local n=$1
    echo "
INSERT INTO mcp_connectors (name) SELECT 'c' || g FROM generate_series(1, $n) g;
INSERT INTO connector_access (connector_id, user_id) SELECT g, 'u' || g FROM generate_series(1, $n) g;
INSERT INTO mcp_servers (connector_id, name) SELECT (g % $n) + 1, 's' || g FROM generate_series(1, 2 * $n) g;
INSERT INTO mcp_server_tokens (mcp_server_id, token) SELECT g, md5(g::text) FROM generate_series(1, 2 * $n) g;
INSERT INTO mcp_server_tools (mcp_server_id, tool_name) SELECT g, 't' || g FROM generate_series(1, 2 * $n) g;"
}
count_rows() {
    "${PSQL[@]}" -At -d "$1" -c "SELECT (SELECT count(*) FROM mcp_connectors) + (SELECT count(*) FROM connector_access)
        + (SELECT count(*) FROM mcp_servers) + (SELECT count(*) FROM mcp_server_tokens) + (SELECT count(*) FROM mcp_server_tools)"
}

# SCHEMA_OBJECTS=1: what keyshift carries through the swap, over the same tables. Every view
# and materialized view reads a migrated key or FK column; nothing compares a key with an
# integer constant (keyshift.carry_check would refuse it, and rightly).
OBJECTS_TABLES="
CREATE TABLE connector_events (connector_id integer NOT NULL REFERENCES mcp_connectors (id) ON DELETE CASCADE,
    at timestamptz NOT NULL, seq bigint NOT NULL, kind text NOT NULL) PARTITION BY RANGE (at);
CREATE INDEX ix_connector_events_connector_id ON connector_events (connector_id, at);
$(for m in $(seq 1 12); do
    printf "CREATE TABLE connector_events_2024_%02d PARTITION OF connector_events FOR VALUES FROM ('2024-%02d-01') TO ('%s');\n" \
        "$m" "$m" "$([[ $m == 12 ]] && echo 2025-01-01 || printf '2024-%02d-01' $((m + 1)))"
done)
"
objects_rows_sql() { # n
    echo "
INSERT INTO connector_events (connector_id, at, seq, kind)
    SELECT 1 + g % $1, '2024-01-01'::timestamptz + (g % 366) * interval '1 day' + (g % 86400) * interval '1 second', g,
           (ARRAY['start', 'stop', 'call'])[1 + g % 3]
      FROM generate_series(1, $EVENTS) g;"
}
OBJECTS_DEFS="
DO \$\$ BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'reporter') THEN CREATE ROLE reporter; END IF;
END \$\$;
-- 5 materialized views, each with a unique index (REFRESH … CONCURRENTLY needs one).
CREATE MATERIALIZED VIEW mv_event_log AS
  SELECT e.seq, e.connector_id, c.name AS connector_name, e.at, e.kind
    FROM connector_events e JOIN mcp_connectors c ON c.id = e.connector_id;
CREATE UNIQUE INDEX mv_event_log_seq ON mv_event_log (seq);
CREATE INDEX mv_event_log_connector ON mv_event_log (connector_id);
CREATE MATERIALIZED VIEW mv_server_counts AS
  SELECT c.id AS connector, count(s.id) AS servers
    FROM mcp_connectors c JOIN mcp_servers s ON s.connector_id = c.id GROUP BY c.id;
CREATE UNIQUE INDEX mv_server_counts_connector ON mv_server_counts (connector);
CREATE MATERIALIZED VIEW mv_tool_counts AS
  SELECT s.id AS server, s.connector_id, count(t.id) AS tools
    FROM mcp_servers s LEFT JOIN mcp_server_tools t ON t.mcp_server_id = s.id GROUP BY s.id, s.connector_id;
CREATE UNIQUE INDEX mv_tool_counts_server ON mv_tool_counts (server);
CREATE MATERIALIZED VIEW mv_access AS SELECT id, connector_id, user_id FROM connector_access;
CREATE UNIQUE INDEX mv_access_id ON mv_access (id);
CREATE MATERIALIZED VIEW mv_daily_events AS
  SELECT connector_id, date_trunc('day', at AT TIME ZONE 'UTC') AS day, count(*) AS events
    FROM connector_events GROUP BY 1, 2;
CREATE UNIQUE INDEX mv_daily_events_key ON mv_daily_events (connector_id, day);
COMMENT ON MATERIALIZED VIEW mv_event_log IS 'every event with its connector';
COMMENT ON MATERIALIZED VIEW mv_server_counts IS 'servers per connector';
GRANT SELECT ON mv_server_counts, mv_tool_counts, mv_daily_events TO reporter;
-- 20 views.
CREATE VIEW v_connectors AS SELECT id, name, created_at FROM mcp_connectors;
CREATE VIEW v_servers AS SELECT id, connector_id, name, status FROM mcp_servers;
CREATE VIEW v_access WITH (security_invoker = true) AS SELECT id, connector_id, user_id FROM connector_access;
CREATE VIEW v_tokens AS SELECT id, mcp_server_id FROM mcp_server_tokens;
CREATE VIEW v_tools AS SELECT id, mcp_server_id, tool_name FROM mcp_server_tools;
CREATE VIEW v_server_names AS
  SELECT s.id, s.name, c.id AS connector, c.name AS connector_name
    FROM mcp_servers s JOIN mcp_connectors c ON c.id = s.connector_id;
CREATE VIEW v_busy_connectors WITH (security_barrier) AS
  SELECT connector, count(*) AS servers FROM v_server_names GROUP BY connector;
CREATE VIEW v_connector_list AS
  SELECT c.id, c.name, count(s.id) AS servers
    FROM mcp_connectors c LEFT JOIN mcp_servers s ON s.connector_id = c.id GROUP BY c.id;
CREATE VIEW v_writable_servers AS
  SELECT id, connector_id, name FROM mcp_servers WHERE name <> 'hidden' WITH CASCADED CHECK OPTION;
CREATE VIEW v_server_tools AS
  SELECT s.id AS server, s.connector_id, t.id AS tool, t.tool_name
    FROM mcp_servers s JOIN mcp_server_tools t ON t.mcp_server_id = s.id;
CREATE VIEW v_tool_counts AS SELECT server, count(*) AS tools FROM v_server_tools GROUP BY server;
CREATE VIEW v_connector_tools AS SELECT connector_id, count(*) AS tools FROM v_server_tools GROUP BY connector_id;
CREATE VIEW v_token_owners AS
  SELECT k.id AS token_id, s.id AS server, s.connector_id, a.user_id
    FROM mcp_server_tokens k JOIN mcp_servers s ON s.id = k.mcp_server_id
    JOIN connector_access a ON a.connector_id = s.connector_id;
CREATE VIEW v_user_servers WITH (security_barrier) AS SELECT DISTINCT user_id, server FROM v_token_owners;
CREATE VIEW v_recent_events AS
  SELECT connector_id, at, kind FROM connector_events WHERE at >= '2024-12-01';
CREATE VIEW v_event_counts AS SELECT connector_id, count(*) AS events FROM connector_events GROUP BY connector_id;
CREATE VIEW v_connector_activity AS
  SELECT c.id, c.name, coalesce(ec.events, 0) AS events
    FROM mcp_connectors c LEFT JOIN v_event_counts ec ON ec.connector_id = c.id;
CREATE VIEW v_busiest AS SELECT * FROM mv_server_counts WHERE servers > 1;
CREATE VIEW v_servers_of_busy AS
  SELECT s.* FROM v_servers s JOIN v_busy_connectors b ON b.connector = s.connector_id;
CREATE VIEW v_top_connectors AS
  SELECT l.id, l.name, b.servers, a.events
    FROM v_connector_list l JOIN v_busy_connectors b ON b.connector = l.id
    JOIN v_connector_activity a ON a.id = l.id;
GRANT SELECT ON v_connectors, v_servers, v_server_names, v_busy_connectors, v_busiest, v_connector_activity,
    v_top_connectors TO reporter;
GRANT SELECT (id, name) ON v_connector_list TO reporter;
GRANT SELECT (server, tools) ON v_tool_counts TO reporter;
GRANT SELECT, INSERT, UPDATE ON v_writable_servers TO reporter;
COMMENT ON VIEW v_server_names IS 'servers with their connector';
COMMENT ON COLUMN v_server_names.connector IS 'the connector''s key';
COMMENT ON VIEW v_top_connectors IS 'the busiest connectors, four views deep';
COMMENT ON COLUMN v_servers.connector_id IS 'who runs it';
-- Row-level security naming migrated columns; the owner (the load runs as superuser) bypasses it.
GRANT SELECT ON mcp_connectors, mcp_servers, connector_access, mcp_server_tokens, connector_events TO reporter;
ALTER TABLE mcp_connectors ENABLE ROW LEVEL SECURITY;
CREATE POLICY connectors_listed ON mcp_connectors FOR SELECT TO reporter USING (id IS NOT NULL AND name <> 'hidden');
ALTER TABLE mcp_servers ENABLE ROW LEVEL SECURITY;
CREATE POLICY servers_visible ON mcp_servers FOR SELECT TO reporter
  USING (connector_id IN (SELECT id FROM mcp_connectors WHERE name <> 'hidden'));
CREATE POLICY servers_owned ON mcp_servers AS RESTRICTIVE FOR SELECT TO reporter USING (connector_id IS NOT NULL);
ALTER TABLE connector_access ENABLE ROW LEVEL SECURITY;
CREATE POLICY access_by_connector ON connector_access FOR SELECT TO reporter
  USING (EXISTS (SELECT 1 FROM mcp_connectors c WHERE c.id = connector_access.connector_id AND c.name <> 'hidden'));
ALTER TABLE mcp_server_tokens ENABLE ROW LEVEL SECURITY;
CREATE POLICY tokens_of_live_servers ON mcp_server_tokens FOR SELECT TO reporter
  USING (mcp_server_id IN (SELECT id FROM mcp_servers WHERE status IS DISTINCT FROM 'revoked'));
COMMENT ON POLICY tokens_of_live_servers ON mcp_server_tokens IS 'no tokens of revoked servers';
ALTER TABLE connector_events ENABLE ROW LEVEL SECURITY;
CREATE POLICY events_of_listed ON connector_events FOR SELECT TO reporter
  USING (connector_id IN (SELECT id FROM mcp_connectors WHERE name <> 'hidden'));
"
VIEWS=(v_connectors v_servers v_access v_tokens v_tools v_server_names v_busy_connectors v_connector_list
    v_writable_servers v_server_tools v_tool_counts v_connector_tools v_token_owners v_user_servers
    v_recent_events v_event_counts v_connector_activity v_busiest v_servers_of_busy v_top_connectors)
MATVIEWS=(mv_event_log mv_server_counts mv_tool_counts mv_access mv_daily_events)
# After cutover, in the objects schema: everything is there and reads the uuid columns.
check_objects() { # database
    local out
    out=$("${PSQL[@]}" -At -d "$1" -c "
SELECT 'views ' || count(*) FROM pg_views WHERE schemaname = 'public' AND viewname LIKE 'v\_%';
SELECT 'matviews ' || count(*) FROM pg_matviews WHERE schemaname = 'public';
SELECT 'matviews with a unique index ' || count(DISTINCT i.indrelid) FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid
 WHERE c.relkind = 'm' AND c.relnamespace = 'public'::regnamespace AND i.indisunique;
SELECT 'policies ' || count(*) FROM pg_policies WHERE schemaname = 'public';
SELECT 'partitions ' || count(*) FROM pg_inherits WHERE inhparent = 'connector_events'::regclass;
SELECT 'legacy readers ' || count(*) FROM pg_depend d
  JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid AND a.attname LIKE '%\_legacy'
  LEFT JOIN pg_rewrite w ON d.classid = 'pg_rewrite'::regclass AND w.oid = d.objid
  LEFT JOIN pg_class v ON v.oid = w.ev_class
 WHERE d.refclassid = 'pg_class'::regclass
   AND (d.classid = 'pg_policy'::regclass OR v.relnamespace = 'public'::regnamespace);
SELECT 'non-uuid keys ' || count(*) FROM information_schema.columns
 WHERE table_schema = 'public' AND data_type <> 'uuid'
   AND (table_name, column_name) IN (('v_connectors', 'id'), ('v_servers', 'connector_id'), ('v_server_names', 'connector'),
        ('v_busy_connectors', 'connector'), ('v_top_connectors', 'id'), ('v_recent_events', 'connector_id'),
        ('connector_events', 'connector_id'));
SELECT 'non-uuid matview keys ' || count(*) FROM pg_attribute
 WHERE (attrelid, attname) IN (('mv_event_log'::regclass, 'connector_id'), ('mv_server_counts'::regclass, 'connector'),
        ('mv_tool_counts'::regclass, 'server'), ('mv_access'::regclass, 'id'), ('mv_daily_events'::regclass, 'connector_id'))
   AND atttypid <> 'uuid'::regtype;
SELECT 'mv_event_log rows ' || count(*) FROM mv_event_log;
$(for v in "${VIEWS[@]}"; do echo "SELECT 'reads $v ' || count(*) FROM (SELECT 1 FROM $v LIMIT 1) x;"; done)
REFRESH MATERIALIZED VIEW CONCURRENTLY mv_server_counts;
SELECT 'refreshed concurrently mv_server_counts';") || die "$1: the carried objects do not answer after cutover"
    local want="views 20
matviews 5
matviews with a unique index 5
policies 6
partitions 12
legacy readers 0
non-uuid keys 0
non-uuid matview keys 0
mv_event_log rows $EVENTS"
    [[ $(head -9 <<<"$out") == "$want" ]] || die "$1: after cutover, expected
$want
got
$out"
    [[ $(grep -c '^reads v_.* [01]$' <<<"$out") == 20 ]] || die "$1: not every view answered: $out"
}

if [[ -n $SCHEMA_OBJECTS ]]; then
    SIZES=(plain objects)
    declare -A N=([plain]=$OBJ_N [objects]=$OBJ_N) OBJECTS=([objects]=1)
else
    SIZES=(small large)
    declare -A N=([small]=$SMALL [large]=$LARGE) OBJECTS=()
fi
A=${SIZES[0]} B=${SIZES[1]}
declare -A ROWS LOAD_S EXPAND_S BACKFILL_S VERIFY_S T_S OBJ_S
for s in "${SIZES[@]}"; do
    log "$s: loading $((8 * N[$s])) rows"
    t0=$(now)
    "${PSQL[@]}" -d postgres -c "CREATE DATABASE $s"
    "${PSQL[@]}" -d "$s" -c "$SCHEMA" -c "$(rows_sql "${N[$s]}")"
    OBJ_S[$s]=0
    if [[ -n ${OBJECTS[$s]:-} ]]; then
        log "$s: the partitioned child, $EVENTS events"
        "${PSQL[@]}" -d "$s" -c "$OBJECTS_TABLES" -c "$(objects_rows_sql "${N[$s]}")" -c "VACUUM ANALYZE"
        # What the preparation rebuilds before the pause (the materialized views' shadows): timed
        # alone here, so that the load below runs long enough to cover it.
        t1=$(now)
        "${PSQL[@]}" -d "$s" -c "$OBJECTS_DEFS"
        OBJ_S[$s]=$(secs "$t1" "$(now)")
        log "$s: views, materialized views and policies created in ${OBJ_S[$s]} s"
    fi
    "${PSQL[@]}" -d "$s" -c "VACUUM ANALYZE"
    LOAD_S[$s]=$(secs "$t0" "$(now)")
    ROWS[$s]=$(count_rows "$s")
    if [[ -n ${OBJECTS[$s]:-} ]]; then
        "$KS" plan --database-url "$(url "$s")" >"$TMP/plan-$s.txt" 2>&1 || { cat "$TMP/plan-$s.txt" >&2; die "plan $s"; }
    fi
    log "$s: ${ROWS[$s]} rows loaded in ${LOAD_S[$s]} s; keyshift expand"
    t0=$(now)
    "$KS" expand --database-url "$(url "$s")" >"$TMP/expand-$s.log" 2>&1 || { cat "$TMP/expand-$s.log" >&2; die "expand $s"; }
    EXPAND_S[$s]=$(secs "$t0" "$(now)")
    log "$s: keyshift backfill (fills, catches up, hardens)"
    t0=$(now)
    "$KS" backfill --database-url "$(url "$s")" >"$TMP/backfill-$s.log" 2>&1 || { cat "$TMP/backfill-$s.log" >&2; die "backfill $s"; }
    BACKFILL_S[$s]=$(secs "$t0" "$(now)")
    log "$s: backfill took ${BACKFILL_S[$s]} s"
    # The backfill rewrote every row: vacuum now so that autovacuum does not run during the measurement.
    "${PSQL[@]}" -d "$s" -c "VACUUM ANALYZE"
    # `keyshift cutover` runs verify (full scans) before it pauses anything: time it alone, so that
    # the load below runs long enough to cover the pause.
    t0=$(now)
    "$KS" verify --database-url "$(url "$s")" >"$TMP/verify-$s.log" 2>&1 || { cat "$TMP/verify-$s.log" >&2; die "verify $s"; }
    VERIFY_S[$s]=$(secs "$t0" "$(now)")
    log "$s: verify took ${VERIFY_S[$s]} s"
    # The one statement of the swap that reads rows: the catch-up of the nullable FK twin.
    "${PSQL[@]}" -d "$s" -c "EXPLAIN UPDATE mcp_servers AS c SET connector_id_uuid =
        (SELECT p.id_uuid FROM mcp_connectors p WHERE p.id = c.connector_id)
        WHERE c.connector_id_uuid IS NULL AND c.connector_id IS NOT NULL" >"$TMP/catchup-plan-$s.txt"
done

start_proxy() { # size
    local port admin
    port=$(free_port)
    admin=$(free_port)
    KEYSHIFT_LOG_LEVEL=info "$KS" proxy --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin" \
        --upstream "127.0.0.1:$PG_PORT" --upstream-tls disable --database-url "$(url "$1")" \
        >"$TMP/proxy-$1.log" 2>&1 &
    PIDS+=($!)
    wait_port "$port"
    printf -v "PORT_$1" '%s' "$port"
    printf -v "ADMIN_$1" '%s' "$admin"
}
for s in "${SIZES[@]}"; do
    start_proxy "$s"
    admin_var=ADMIN_$s
    ok=
    for _ in $(seq 1 200); do
        if curl -fs "127.0.0.1:${!admin_var}/v1/status" | grep -q '"dual_write":true'; then ok=1; break; fi
        sleep 0.1
    done
    [[ -n $ok ]] || die "the $s proxy did not load its rules: $(curl -s "127.0.0.1:${!admin_var}/v1/status")"
done
# Let every proxy write a heartbeat and acknowledge the current rules before cutover looks.
sleep 3

# The application: short transactions that only name columns existing before and after cutover.
for s in "${SIZES[@]}"; do
    cat >"$TMP/app-$s.sql" <<EOF
\set n random(1, 2 * ${N[$s]})
BEGIN;
SELECT status FROM mcp_servers WHERE name = 's' || (:n)::text;
UPDATE mcp_servers SET status = 'seen' WHERE name = 's' || (:n)::text;
INSERT INTO mcp_connectors (name) VALUES ('bench');
END;
EOF
done

# What ran in the database since the reset just before `keyshift cutover` (pg_stat_statements,
# track = all), the load's own statements left out, in ms. A multi-statement simple Query (the
# swap is one) is counted statement by statement, and statements run inside functions
# (keyshift.carry_save / carry_restore's EXECUTEs) as nested ones. profile: every statement;
# swap_profile: the swap's, grouped by what they do (the preparation's, before the pause, in
# "not in the swap"). Caveat: pg_stat_statements merges identical texts, so a nested statement
# that also runs in the preparation (keyshift.rel_props, carried_objects' inner query, the
# fingerprint) is counted with it; the categories use texts only the swap runs where they can.
PGSS_FROM="FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid"
pgss_where() { # database
    echo "d.datname = '$1' AND query !~ '^(BEGIN|END|COMMIT|ROLLBACK)$'
   AND query !~ '(SELECT status FROM|UPDATE) (keyshift_integer_public\.)?mcp_servers'
   AND query !~ 'INSERT INTO (keyshift_integer_public\.)?mcp_connectors \(name\)'"
}
profile() { # database
    "${PSQL[@]}" -d postgres -P pager=off -P footer=off -c "
SELECT CASE WHEN toplevel THEN 'top' ELSE 'nested' END AS level, calls,
       round(total_exec_time::numeric, 2) AS total_ms, round(max_exec_time::numeric, 2) AS max_ms,
       left(regexp_replace(query, '\s+', ' ', 'g'), 150) AS statement
  $PGSS_FROM WHERE $(pgss_where "$1") ORDER BY total_exec_time DESC"
}
swap_profile() { # database
    "${PSQL[@]}" -d postgres -P pager=off -P footer=off -c "
WITH s AS (
  SELECT toplevel, calls, total_exec_time AS t, max_exec_time AS m, regexp_replace(query, '\s+', ' ', 'g') AS q
    $PGSS_FROM WHERE $(pgss_where "$1")
), c AS (
  SELECT *, CASE
    WHEN toplevel AND q ~ '^SELECT keyshift\.carry_save' THEN '1 carry_save() (all of it)'
    WHEN toplevel AND q ~ '^SELECT keyshift\.carry_restore' THEN '2 carry_restore() (all of it)'
    WHEN toplevel AND q ~ '^ALTER TABLE .* (ENABLE|DISABLE) (ALWAYS )?TRIGGER' THEN '3 fill triggers switched'
    WHEN toplevel AND q ~ '^ALTER TABLE .* (SET NOT NULL|DROP NOT NULL|DROP CONSTRAINT|RENAME|PRIMARY KEY USING INDEX)'
      THEN '3 ALTER TABLE: NOT NULL, FKs and PKs dropped, PK promoted, renames'
    WHEN toplevel AND q ~ '^ALTER INDEX .* RENAME' THEN '3 ALTER INDEX renames'
    WHEN toplevel AND q ~ '^DO \\\$ks\\\$ DECLARE r record; BEGIN FOR r IN' THEN '3 partition leaf renames (DO blocks)'
    WHEN toplevel AND q ~ '^UPDATE .* IS NULL AND .* IS NOT NULL' THEN '3 catch-up UPDATE'
    WHEN toplevel AND q ~ 'keyshift\.id_map' THEN '3 keyshift.id_map recreated'
    WHEN toplevel AND q ~ '^(SET LOCAL lock_timeout|UPDATE keyshift\.switch_attempts SET state|UPDATE keyshift\.migration|NOTIFY)'
      THEN '3 attempt state, phase, NOTIFY'
    WHEN toplevel AND q ~ '^SELECT keyshift\.carry_prepare' THEN '0 carry_prepare() (before the pause)'
    WHEN NOT toplevel AND q ~ '^\(? ?WITH o AS \( SELECT c\.\*, CASE c\.kind'
      THEN '1a fingerprint (2 calls: the preparation''s and carry_save''s)'
    WHEN NOT toplevel AND q ~ '^DROP (MATERIALIZED VIEW|VIEW|POLICY|TRIGGER|RULE) [^I]' THEN '1b carry_save: DROP view / matview / policy'
    WHEN NOT toplevel AND q ~ '^(INSERT INTO pg_temp\.keyshift_carried|SELECT c\.\*, pg_get_viewdef\(c\.oid\) AS def|SELECT (p\.polname|g\.tgname|w\.rulename), )'
      THEN '0 carry_prepare: deparse into the temp table (in the swap only if something changed)'
    WHEN NOT toplevel AND q ~ 'FROM pg_temp\.keyshift_carried WHERE step' THEN '2e carry_save/restore: temp table read back'
    WHEN NOT toplevel AND q ~ '^CREATE VIEW public\.' THEN '2a carry_restore: CREATE VIEW'
    WHEN NOT toplevel AND q ~ '^ALTER MATERIALIZED VIEW' THEN '2b carry_restore: matview shadow moved in'
    WHEN NOT toplevel AND q ~ '^CREATE POLICY' THEN '2c carry_restore: CREATE POLICY'
    WHEN NOT toplevel AND q ~ '^(ALTER VIEW|GRANT|REVOKE|COMMENT ON) .*(ON|VIEW|COLUMN|POLICY [^ ]+ ON) public\.'
      THEN '2d carry_restore: owner, grants, comments'
    ELSE 'not in the swap (preparation, proxies)' END AS what
  FROM s
)
SELECT what, sum(calls) AS calls, round(sum(t)::numeric, 1) AS total_ms, round(max(m)::numeric, 1) AS max_ms
  FROM c GROUP BY what ORDER BY what"
}

declare -A CUT_START CUT_END ATT_START ATT_END CUT_OUT SPLIT GATES
for s in "${SIZES[@]}"; do
    port_var=PORT_$s
    "${PSQL[@]}" -d "$s" -c "CHECKPOINT"
    # verify, and the materialized views' shadows, run inside cutover before its pause, slower under
    # load: verify 2.5–10 × (alone vs in cutover), the shadows and everything beside them 11 ×.
    T_S[$s]=$(awk -v d="$DURATION" -v c="$CUT_AT" -v v="${VERIFY_S[$s]}" -v o="${OBJ_S[$s]}" 'BEGIN { t = c + 6 * v + 15 * o + 20; if (t < d) t = d; printf "%d", t }')
    log "$s: $CLIENTS clients through keyshift for ${T_S[$s]}s, cutover at ${CUT_AT}s"
    (cd "$TMP" && exec "$PGBIN/pgbench" -n -f "app-$s.sql" -M "$MODE" -c "$CLIENTS" -j "$JOBS" -T "${T_S[$s]}" \
        -l --log-prefix="lat-$s" -h 127.0.0.1 -p "${!port_var}" -U postgres "$s" >"pgbench-$s.out" 2>&1) &
    BENCH=$!
    PIDS+=($BENCH)
    sleep "$CUT_AT"
    if [[ -n $PROFILE ]]; then "${PSQL[@]}" -d postgres -c "SELECT pg_stat_statements_reset()" >/dev/null; fi
    CUT_START[$s]=$(now)
    "$KS" cutover "${CUT_FLAGS[@]}" --database-url "$(url "$s")" --drain-timeout "$DRAIN_TIMEOUT" >"$TMP/cutover-$s.out" 2>"$TMP/cutover-$s.err" ||
        { cat "$TMP/cutover-$s.out" "$TMP/cutover-$s.err" >&2; die "keyshift cutover $s failed"; }
    CUT_END[$s]=$(now)
    CUT_OUT[$s]=$(cat "$TMP/cutover-$s.out")
    log "$s: cutover done in $(secs "${CUT_START[$s]}" "${CUT_END[$s]}") s"
    bench_rc=0
    wait "$BENCH" || bench_rc=$?
    cat "$TMP/pgbench-$s.out" >&2
    [[ $bench_rc == 0 ]] || die "pgbench $s exited with $bench_rc"
    ! grep -q 'aborted' "$TMP/pgbench-$s.out" || die "pgbench $s: a client aborted"
    failed=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' "$TMP/pgbench-$s.out")
    [[ ${failed:-0} == 0 ]] || die "pgbench $s: $failed failed transactions"
    # When the gate closed and opened, from the proxy's own log (RFC 3339 UTC timestamps), and
    # each pause's gate. BY_TABLE=1: the window is from the first pause's gate closing to
    # the rules of phase cut_over in force (the groups run in between, gates open, and the
    # objects' rebuild has a pause of its own); GATES lists every pause.
    read -r ATT_START[$s] ATT_END[$s] GATES[$s] < <(python3 -c '
import re, sys
from datetime import datetime
ts = lambda l: datetime.fromisoformat(l.split()[0].rstrip("Z")[:26] + "+00:00").timestamp()
lines = [re.sub(r"\x1b\[[0-9;]*m", "", l) for l in open(sys.argv[1])]
close = [ts(l) for l in lines if "closing the gate" in l]
opened = [ts(l) for l in lines if "gate open" in l]
gates = [min(o for o in opened if o >= c) - c for c in close]
if sys.argv[2]:
    end = min(ts(l) for l in lines if "phase=cut_over" in l and ts(l) >= close[0])
    print(close[0], max(end, opened[-1]), "/".join(f"{g * 1e3:.1f}" for g in gates))
else:
    print(close[-1], opened[-1], f"{gates[-1] * 1e3:.1f}")' "$TMP/proxy-$s.log" "$BY_TABLE")
    # Where the gate-closed time went: the coordinator logs the swap's commit and its duration.
    [[ -n $BY_TABLE ]] && SPLIT[$s]="n/a n/a n/a" || SPLIT[$s]=$(python3 -c '
import re, sys
from datetime import datetime
ts = lambda l: datetime.fromisoformat(l.split()[0].rstrip("Z")[:26] + "+00:00").timestamp()
close, opened = float(sys.argv[2]), float(sys.argv[3])
for l in open(sys.argv[1]):
    l = re.sub(r"\x1b\[[0-9;]*m", "", l)
    if "swap committed" in l:
        end = ts(l)
        swap = float(re.search(r"swap_ms=([0-9.]+)", l).group(1)) / 1e3
start = end - swap
print(f"{(start - close) * 1e3:.1f} {swap * 1e3:.1f} {(opened - end) * 1e3:.1f}")' "$TMP/cutover-$s.err" "${ATT_START[$s]}" "${ATT_END[$s]}")
    # The end state: every table has its uuid primary key under the original constraint name.
    pk=$("${PSQL[@]}" -At -d "$s" -c "SELECT count(*) FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid
        AND a.attnum = i.indkey[0] WHERE i.indisprimary AND a.attname = 'id' AND a.atttypid = 'uuid'::regtype
        AND i.indrelid::regclass::text IN ('mcp_connectors','connector_access','mcp_servers','mcp_server_tokens','mcp_server_tools')")
    [[ $pk == 5 ]] || die "$s: $pk of 5 tables have a uuid primary key after cutover"
    if [[ -n $PROFILE ]]; then
        profile "$s" >"$TMP/profile-$s.txt"
        swap_profile "$s" >"$TMP/swap-profile-$s.txt"
    fi
    if [[ -n ${OBJECTS[$s]:-} ]]; then check_objects "$s"; log "$s: every carried object checked after cutover"; fi
done

analyse() { # size -> one line of numbers
    python3 - "$TMP" "$1" "$CUT_START_S" "$CUT_END_S" "$ATT_START_S" "$ATT_END_S" <<'EOF'
import glob, sys
tmp, size, cs, ce, as_, ae = sys.argv[1], sys.argv[2], *map(float, sys.argv[3:])
tx = []  # (start, end) in seconds
for f in glob.glob(f"{tmp}/lat-{size}.*"):
    for line in open(f):
        p = line.split()
        lat = int(p[2]) / 1e6
        end = int(p[4]) + int(p[5]) / 1e6
        tx.append((end - lat, end))
t0 = min(s for s, _ in tx)
if max(e for _, e in tx) < ae + 1:
    sys.exit(f"{size}: the load ended before the gate reopened + 1 s: raise DURATION")
def stats(sel, lo, hi):
    lats = sorted(e - s for s, e in sel)
    if not lats:
        return [0, float("nan"), float("nan"), float("nan")]
    # The longest time in [lo, hi] in which no client completed a transaction.
    ends = sorted(e for _, e in tx if lo <= e <= hi)
    gap = max(b - a for a, b in zip([lo] + ends, ends + [hi]))
    p99 = lats[min(len(lats) - 1, int(len(lats) * 0.99))]
    return [len(lats), lats[-1] * 1e3, p99 * 1e3, gap * 1e3]
base = stats([t for t in tx if t0 + 2 <= t[1] <= cs - 0.5], t0 + 2, cs - 0.5)
pause = stats([t for t in tx if t[1] >= as_ and t[0] <= ae], as_ - 0.25, ae + 0.25)
cmd = stats([t for t in tx if cs <= t[1] <= ce + 1], cs, ce + 1)
# Transactions that started while the gate was closed (held): how long after it opened they ended.
held = [e - ae for s, e in tx if as_ <= s <= ae]
tail = [len(held), max(held) * 1e3 if held else float("nan")]
print(" ".join(f"{x:.1f}" for x in base + pause + cmd + tail))
EOF
}
declare -A RES
for s in "${SIZES[@]}"; do
    CUT_START_S=${CUT_START[$s]} CUT_END_S=${CUT_END[$s]} ATT_START_S=${ATT_START[$s]} ATT_END_S=${ATT_END[$s]}
    RES[$s]=$(analyse "$s")
done
field() { awk -v i="$2" '{ print $i }' <<<"${RES[$1]}"; }
swap_ms() { sed -n 's/.*swap transaction \([0-9.]*\) ms.*/\1/p' <<<"${CUT_OUT[$1]}"; }
gate_ms() { sed -n 's/.*gate closed \([0-9.]*\) ms.*/\1/p' <<<"${CUT_OUT[$1]}" | paste -sd/; }

echo
if [[ -n $SCHEMA_OBJECTS ]]; then
    echo "Cutover pause, seed-004 schema (5 tables, ${ROWS[$A]} rows) plain and with carried objects (+ partitioned child of"
    echo "12 partitions with $EVENTS rows, 20 views, 5 materialized views, 6 RLS policies), $CLIENTS clients through keyshift"
else
    echo "Cutover pause, seed-004 schema (5 tables), $CLIENTS clients through keyshift"
fi
echo "(pgbench -M $MODE, 3 statements per transaction), $(nproc) cores, load average before/after: $LOADAVG_START / $(cut -d' ' -f1-3 /proc/loadavg)"
for s in "${SIZES[@]}"; do
    echo "  $s: ${ROWS[$s]} rows; load ${LOAD_S[$s]} s (objects ${OBJ_S[$s]} s), expand ${EXPAND_S[$s]} s, backfill+harden ${BACKFILL_S[$s]} s;" \
        "verify ${VERIFY_S[$s]} s; load ran ${T_S[$s]} s; keyshift cutover ran $(secs "${CUT_START[$s]}" "${CUT_END[$s]}") s (verify included), gate closed (proxy log) $(awk -v a="${ATT_START[$s]}" -v b="${ATT_END[$s]}" 'BEGIN { printf "%.1f", (b - a) * 1000 }') ms"
    sed 's/^/      /' <<<"${CUT_OUT[$s]}"
done
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a > 0) printf "%.2f", b / a; else print "-" }'; }
if [[ -n $SCHEMA_OBJECTS ]]; then
    printf '%-34s %14s %14s %8s\n' "" "plain" "objects" ratio
else
    printf '%-34s %14s %14s %8s\n' "" "${ROWS[$A]} rows" "${ROWS[$B]} rows" ratio
fi
row() { # label field-index
    local a b
    a=$(field "$A" "$2"); b=$(field "$B" "$2")
    printf '%-34s %14s %14s %8s\n' "$1" "$a" "$b" "$(ratio "$a" "$b")"
}
row "baseline: transactions" 1
row "baseline: max latency ms" 2
row "baseline: p99 ms" 3
row "baseline: longest no-commit gap ms" 4
row "pause: transactions" 5
row "pause: max latency ms (stall)" 6
row "pause: p99 ms" 7
row "pause: no-commit gap ms (±0.25 s)" 8
row "pause: held txns, started gate-closed" 13
row "pause: held, max end after open ms" 14
row "command: max latency ms" 10
row "command: p99 ms" 11
printf '%-34s %14s %14s %8s\n' "keyshift: swap transaction ms" "$(swap_ms "$A")" "$(swap_ms "$B")" "$(ratio "$(swap_ms "$A")" "$(swap_ms "$B")")"
printf '%-34s %14s %14s %8s\n' "keyshift: gate closed ms" "$(gate_ms "$A")" "$(gate_ms "$B")" "$(ratio "$(gate_ms "$A")" "$(gate_ms "$B")")"
longest_gate() { tr / '\n' <<<"${GATES[$1]}" | sort -g | tail -1; }
printf '%-34s %14s %14s %8s\n' "proxy log: gate of each pause ms" "${GATES[$A]}" "${GATES[$B]}" ""
printf '%-34s %14s %14s %8s\n' "proxy log: longest gate ms" "$(longest_gate "$A")" "$(longest_gate "$B")" "$(ratio "$(longest_gate "$A")" "$(longest_gate "$B")")"
split_row() { # label field-index
    local a b
    a=$(awk -v i="$2" '{ print $i }' <<<"${SPLIT[$A]}"); b=$(awk -v i="$2" '{ print $i }' <<<"${SPLIT[$B]}")
    printf '%-34s %14s %14s %8s\n' "$1" "$a" "$b" "$(ratio "$a" "$b")"
}
split_row "gate closed -> swap starts ms" 1
split_row "swap transaction ms (log)" 2
split_row "swap commit -> gate open ms" 3
for s in "${SIZES[@]}"; do echo "catch-up plan, $s: $(grep -o '[A-Za-z ]*Scan [^(]*' "$TMP/catchup-plan-$s.txt" | sed 's/^ *//; s/ *$//' | paste -sd';')"; done
if [[ -n $PROFILE ]]; then
    for s in "${SIZES[@]}"; do
        echo
        echo "Where the swap's time goes, $s (pg_stat_statements, statements of the swap by kind; nested ones inside"
        echo "carry_save / carry_restore are part of those two calls' totals):"
        cat "$TMP/swap-profile-$s.txt"
    done
fi
echo
echo "failed transactions: 0 (checked); every table has a uuid primary key after cutover (checked)"
if [[ -n $SCHEMA_OBJECTS ]]; then
    echo "objects after cutover: 20 views answer, 5 materialized views with their rows and unique indexes, REFRESH CONCURRENTLY works, 6 policies, 12 partitions, nothing reads a *_legacy column (checked)"
fi
gate_a=$(longest_gate "$A"); gate_b=$(longest_gate "$B")
awk -v a="$(field "$A" 6)" -v b="$(field "$B" 6)" -v ga="$gate_a" -v gb="$gate_b" -v sa="$(swap_ms "$A")" -v sb="$(swap_ms "$B")" \
    -v A="$A" -v B="$B" 'BEGIN {
    printf "target max stall <= 100 ms: %s (%s %.1f ms, %s %.1f ms)\n", (a <= 100 && b <= 100) ? "met" : "MISSED", A, a, B, b
    printf "target %s <= 1.5 x %s: gate closed %s (%.2f), longest stall %s (%.2f), swap transaction %s (%.2f)\n", B, A,
        (gb <= 1.5 * ga) ? "met" : "MISSED", gb / ga, (b <= 1.5 * a) ? "met" : "MISSED", b / a,
        (sb <= 1.5 * sa) ? "met" : "MISSED", sb / sa }'
