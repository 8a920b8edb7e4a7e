#!/usr/bin/env bash
# Dual-write benchmark: an insert-heavy pgbench script into the child tables of a
# seed-004-shaped schema, in ONE run, side by side:
#   direct    PostgreSQL, no dual-write at all (the application today)
#   keyshift  through keyshift with dual-write on (expanded, backfilled and hardened database,
#             with keyshift's fill triggers, src/migrate/fill.rs, enabled as in production)
#   noguard   the same through keyshift, with the fill triggers disabled: keyshift/noguard is
#             what their WHEN guard costs on rows the proxy already filled
#   fill      PostgreSQL directly on the keyshift database: the fill triggers alone do the
#             dual-write (what a write that bypasses the proxy costs: COPY, a cron job)
#   trigger   PostgreSQL with a BEFORE trigger doing the same dual-write (the usual alternative),
#             on a database prepared as keyshift's (its fill triggers disabled)
#   passthru  through keyshift on the plain database (no migration: the proxy's own cost)
#   hardened  PostgreSQL on a copy of the keyshift database (expanded, backfilled and hardened:
#             uuid columns and defaults, uuid unique indexes and FKs, the spare integer-key
#             index), with no dual-write at all (fill triggers disabled, twins left NULL): what
#             that schema costs by itself, which any dual-write pays
# Each target has its own database, identical before the run. Rounds alternate the order.
# Prints TPS per target and mode, and the ratios keyshift/direct, keyshift/trigger and
# keyshift/hardened (the dual-write's own cost, proxy included), keyshift/noguard (the fill
# triggers' guard) and fill/trigger (keyshift's triggers against the hand-written one).
# Targets (DESIGN.md): keyshift ≥ 0.85 × direct; keyshift faster than trigger.
#
# Usage: benches/dualwrite.sh                 (DURATION=15 ROUNDS=2)
#        DURATION=5 ROUNDS=1 benches/dualwrite.sh
# Environment: DURATION, ROUNDS, CLIENTS=8, JOBS=2, MODES="simple extended prepared",
#              PARENTS=2000 (connectors; servers = 2 × PARENTS), PGBIN,
#              PIN=1: PostgreSQL on CPU 1, pgbench and the proxies on CPU 0 (taskset), as when
#              the database has a host of its own and the proxy runs beside the application:
#              then the proxy's CPU is not taken from PostgreSQL's.
set -euo pipefail

DURATION=${DURATION:-15}
ROUNDS=${ROUNDS:-2}
CLIENTS=${CLIENTS:-8}
JOBS=${JOBS:-2}
MODES=${MODES:-simple extended prepared}
PARENTS=${PARENTS:-2000}
if [[ -n ${PIN:-} ]]; then
    command -v taskset >/dev/null || { echo "PIN=1 needs taskset (util-linux)" >&2; exit 1; }
    ON_DB=(taskset -c 1)
    ON_APP=(taskset -c 0)
else
    ON_DB=()
    ON_APP=()
fi

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
bench_setup dw
# The postmaster and every backend it forks inherit the CPU affinity of pg_ctl.
PG_WRAP=(${ON_DB[@]+"${ON_DB[@]}"})
start_postgres "-c max_connections=200 -c shared_buffers=256MB -c fsync=off -c synchronous_commit=off -c full_page_writes=off"

SCHEMA="
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
INSERT INTO mcp_connectors (name) SELECT 'c' || g FROM generate_series(1, $PARENTS) g;
INSERT INTO mcp_servers (connector_id, name) SELECT (g % $PARENTS) + 1, 's' || g FROM generate_series(1, 2 * $PARENTS) g;
"
# The trigger the usual hand-made dual-write would use: one lookup per FK per row.
TRIGGERS="
CREATE FUNCTION dw_servers() RETURNS trigger LANGUAGE plpgsql AS \$\$
BEGIN NEW.connector_id_uuid := (SELECT id_uuid FROM mcp_connectors WHERE id = NEW.connector_id); RETURN NEW; END \$\$;
CREATE TRIGGER dw BEFORE INSERT OR UPDATE OF connector_id ON mcp_servers FOR EACH ROW EXECUTE FUNCTION dw_servers();
CREATE FUNCTION dw_access() RETURNS trigger LANGUAGE plpgsql AS \$\$
BEGIN NEW.connector_id_uuid := (SELECT id_uuid FROM mcp_connectors WHERE id = NEW.connector_id); RETURN NEW; END \$\$;
CREATE TRIGGER dw BEFORE INSERT OR UPDATE OF connector_id ON connector_access FOR EACH ROW EXECUTE FUNCTION dw_access();
CREATE FUNCTION dw_tokens() RETURNS trigger LANGUAGE plpgsql AS \$\$
BEGIN NEW.mcp_server_id_uuid := (SELECT id_uuid FROM mcp_servers WHERE id = NEW.mcp_server_id); RETURN NEW; END \$\$;
CREATE TRIGGER dw BEFORE INSERT OR UPDATE OF mcp_server_id ON mcp_server_tokens FOR EACH ROW EXECUTE FUNCTION dw_tokens();
CREATE FUNCTION dw_tools() RETURNS trigger LANGUAGE plpgsql AS \$\$
BEGIN NEW.mcp_server_id_uuid := (SELECT id_uuid FROM mcp_servers WHERE id = NEW.mcp_server_id); RETURN NEW; END \$\$;
CREATE TRIGGER dw BEFORE INSERT OR UPDATE OF mcp_server_id ON mcp_server_tools FOR EACH ROW EXECUTE FUNCTION dw_tools();
"
for db in plain dualwrite trigger; do
    "${PSQL[@]}" -d postgres -c "CREATE DATABASE $db"
    "${PSQL[@]}" -d "$db" -c "$SCHEMA"
done
log "expanding and backfilling the dualwrite and trigger databases"
for db in dualwrite trigger; do
    "$KS" expand --database-url "$(url "$db")" >"$TMP/expand-$db.log" 2>&1 || { cat "$TMP/expand-$db.log" >&2; die "expand $db"; }
    "$KS" backfill --database-url "$(url "$db")" >"$TMP/backfill-$db.log" 2>&1 || { cat "$TMP/backfill-$db.log" >&2; die "backfill $db"; }
done
# keyshift's fill triggers off where a target must not have them.
NO_FILL="
ALTER TABLE mcp_servers DISABLE TRIGGER zz_keyshift_fill_integer_ins, DISABLE TRIGGER zz_keyshift_fill_integer_upd;
ALTER TABLE connector_access DISABLE TRIGGER zz_keyshift_fill_integer_ins, DISABLE TRIGGER zz_keyshift_fill_integer_upd;
ALTER TABLE mcp_server_tokens DISABLE TRIGGER zz_keyshift_fill_integer_ins, DISABLE TRIGGER zz_keyshift_fill_integer_upd;
ALTER TABLE mcp_server_tools DISABLE TRIGGER zz_keyshift_fill_integer_ins, DISABLE TRIGGER zz_keyshift_fill_integer_upd;
"
"${PSQL[@]}" -d trigger -c "$TRIGGERS" -c "$NO_FILL"
for db in hardened noguard fill; do
    "${PSQL[@]}" -d postgres -c "CREATE DATABASE $db TEMPLATE dualwrite"
done
"${PSQL[@]}" -d hardened -c "$NO_FILL"
"${PSQL[@]}" -d noguard -c "$NO_FILL"
# The backfill rewrote every row: vacuum and analyze every database, as autovacuum would
# soon after, so that no target runs on dead rows that another does not have (and none is
# vacuumed in the middle of its measurement).
for db in plain dualwrite trigger hardened noguard fill; do
    "${PSQL[@]}" -d "$db" -c "VACUUM ANALYZE" >/dev/null
done

start_proxy() { # name database -> sets PORT_<name>
    local port admin
    port=$(free_port)
    admin=$(free_port)
    KEYSHIFT_LOG_LEVEL=warn ${ON_APP[@]+"${ON_APP[@]}"} "$KS" proxy --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin" \
        --upstream "127.0.0.1:$PG_PORT" --upstream-tls disable ${2:+--database-url "$(url "$2")"} \
        >"$TMP/proxy-$1.log" 2>&1 &
    PIDS+=($!)
    wait_port "$port"
    printf -v "PORT_$1" '%s' "$port"
    printf -v "ADMIN_$1" '%s' "$admin"
}
start_proxy dw dualwrite
start_proxy ng noguard
start_proxy pt ""
# Wait until the dual-write proxies have loaded their rules.
for admin in "$ADMIN_dw" "$ADMIN_ng"; do
    for _ in $(seq 1 100); do
        curl -fs "127.0.0.1:$admin/v1/status" | grep -q '"dual_write":true' && break
        sleep 0.1
    done
    curl -fs "127.0.0.1:$admin/v1/status" | grep -q '"dual_write":true' || die "keyshift did not load its rules"
done

cat >"$TMP/inserts.sql" <<EOF
\set c random(1, $PARENTS)
\set s random(1, 2 * $PARENTS)
\set n random(1, 1000000000)
INSERT INTO mcp_servers (connector_id, name) VALUES (:c, 'bench');
INSERT INTO mcp_server_tokens (mcp_server_id, token) VALUES (:s, 'tok');
INSERT INTO mcp_server_tools (mcp_server_id, tool_name) VALUES (:s, 'tool' || :n) ON CONFLICT DO NOTHING;
INSERT INTO connector_access (connector_id, user_id) VALUES (:c, 'user');
EOF

target_port() { case $1 in direct|trigger|hardened|fill) echo "$PG_PORT" ;; keyshift) echo "$PORT_dw" ;; noguard) echo "$PORT_ng" ;; passthru) echo "$PORT_pt" ;; esac; }
target_db() { case $1 in direct|passthru) echo plain ;; keyshift) echo dualwrite ;; *) echo "$1" ;; esac; }

declare -A TPS
TARGETS=(direct keyshift noguard fill trigger passthru hardened)
for round in $(seq 1 "$ROUNDS"); do
    order=("${TARGETS[@]}")
    if ((round % 2 == 0)); then order=(hardened passthru trigger fill noguard keyshift direct); fi
    for mode in $MODES; do
        for t in "${order[@]}"; do
            out=$(${ON_APP[@]+"${ON_APP[@]}"} "$PGBIN/pgbench" -n -f "$TMP/inserts.sql" -M "$mode" -c "$CLIENTS" -j "$JOBS" -T "$DURATION" \
                -h 127.0.0.1 -p "$(target_port "$t")" -U postgres "$(target_db "$t")" 2>&1) ||
                { echo "$out" >&2; die "pgbench $t $mode failed"; }
            tps=$(sed -n 's/^tps = \([0-9.]*\) .*/\1/p' <<<"$out")
            failed=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' <<<"$out")
            [[ ${failed:-0} == 0 ]] || die "$t $mode: $failed failed transactions"
            log "round $round $mode $t: $tps tps"
            TPS[$t,$mode]=$(awk -v a="${TPS[$t,$mode]:-0}" -v b="$tps" 'BEGIN { print a + b }')
        done
    done
done

# Every row written through keyshift, or by the fill triggers alone, has its twins right.
for db in dualwrite noguard fill; do
check=$("${PSQL[@]}" -At -d "$db" -c "
SELECT (SELECT count(*) FROM mcp_servers c LEFT JOIN mcp_connectors p ON p.id = c.connector_id WHERE c.connector_id_uuid IS DISTINCT FROM p.id_uuid)
     + (SELECT count(*) FROM mcp_server_tokens c JOIN mcp_servers p ON p.id = c.mcp_server_id WHERE c.mcp_server_id_uuid IS DISTINCT FROM p.id_uuid)
     + (SELECT count(*) FROM mcp_server_tools c JOIN mcp_servers p ON p.id = c.mcp_server_id WHERE c.mcp_server_id_uuid IS DISTINCT FROM p.id_uuid)
     + (SELECT count(*) FROM connector_access c JOIN mcp_connectors p ON p.id = c.connector_id WHERE c.connector_id_uuid IS DISTINCT FROM p.id_uuid)")
[[ $check == 0 ]] || die "$db: $check rows have a wrong or missing twin"
done

echo
echo "Dual-write, insert-heavy (4 inserts per transaction into child tables), $CLIENTS clients, ${DURATION}s x $ROUNDS rounds, $(nproc) cores"
printf '%-10s %10s %10s %10s %10s %10s %10s %10s %16s %16s %17s %16s %14s\n' mode direct keyshift noguard fill trigger passthru hardened keyshift/direct keyshift/trigger keyshift/hardened keyshift/noguard fill/trigger
for mode in $MODES; do
    printf '%-10s' "$mode"
    for t in "${TARGETS[@]}"; do printf ' %10.0f' "$(awk -v a="${TPS[$t,$mode]}" -v r="$ROUNDS" 'BEGIN { print a / r }')"; done
    awk -v k="${TPS[keyshift,$mode]}" -v d="${TPS[direct,$mode]}" -v t="${TPS[trigger,$mode]}" -v e="${TPS[hardened,$mode]}" \
        -v n="${TPS[noguard,$mode]}" -v f="${TPS[fill,$mode]}" \
        'BEGIN { printf " %16.2f %16.2f %17.2f %16.2f %14.2f\n", k / d, k / t, k / e, k / n, f / t }'
done
echo "twins checked: every row inserted through keyshift, or filled by its triggers alone, matches its parent's uuid"
