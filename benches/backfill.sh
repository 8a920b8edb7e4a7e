#!/usr/bin/env bash
# Backfill benchmark: a seed-004-shaped schema (5 tables, >= 2 million rows), then
#   1. a pgbench custom script (reads + updates on the same tables) with keyshift idle,
#   2. the same script while `keyshift backfill` runs,
# in one run, side by side; prints backfill rows/s and the p99 latency ratio.
#
# Usage: benches/backfill.sh            # starts a throwaway cluster (needs PostgreSQL server binaries)
#        DATABASE_URL=postgres://... benches/backfill.sh   # uses an existing, EMPTY database
# Knobs: SCALE (connectors, default 200000 -> 2.0 M rows), CLIENTS (default 4), BATCH (default 5000), JOBS (default 1),
#        IDLE_SECONDS (default 20), KEYSHIFT (binary, default target/release/keyshift),
#        BIG_ROWS (rows of mcp_server_tokens, default 3 x SCALE; 20000000 is issue 16's "20-million-row table"),
#        PROXY=1 (pgbench connects through a `keyshift proxy`, dual-writing, instead of straight to PostgreSQL),
#        ALONE=0 (skip the run without pgbench), LOGS_DIR (copy the backfill and proxy logs there at the end),
#        RATE (pgbench -R: that many transactions per second in all, instead of as many as the clients can
#        run back to back; latencies then count from each transaction's scheduled start).
# It also checks the backfill's ETA: the first one it logs once 10 % of the work is done, against the
# real duration (error in %; issue 16's target is within 20 %).
set -euo pipefail
cd "$(dirname "$0")/.."

SCALE=${SCALE:-200000}
BIG_ROWS=${BIG_ROWS:-$((3 * SCALE))}
PROXY=${PROXY:-0}
CLIENTS=${CLIENTS:-4}
BATCH=${BATCH:-5000}
JOBS=${JOBS:-1}
IDLE_SECONDS=${IDLE_SECONDS:-20}
KEYSHIFT=${KEYSHIFT:-target/release/keyshift}
WORK=$(mktemp -d /tmp/keyshift-bench.XXXXXX)
chmod 755 "$WORK"

if [[ ! -x "$KEYSHIFT" ]]; then
  echo "building keyshift (release)..." >&2
  cargo build --release --quiet
fi

PGBIN=${PGBIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)}
[[ -n "$PGBIN" ]] || PGBIN=$(dirname "$(command -v initdb)")
PSQL="$PGBIN/psql"; [[ -x "$PSQL" ]] || PSQL=psql
PGBENCH="$PGBIN/pgbench"; [[ -x "$PGBENCH" ]] || PGBENCH=pgbench

cleanup() {
  if [[ -n "${PROXY_PID:-}" ]]; then kill "$PROXY_PID" 2>/dev/null; wait "$PROXY_PID" 2>/dev/null || true; fi
  if [[ -n "${PGDATA_DIR:-}" ]]; then
    as_pg "$PGBIN/pg_ctl" -D "$PGDATA_DIR" -m immediate stop >/dev/null 2>&1 || true
  fi
  if [[ -n "${LOGS_DIR:-}" ]]; then mkdir -p "$LOGS_DIR" && cp "$WORK"/*.log "$LOGS_DIR"/ 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

as_pg() {
  if [[ $(id -u) == 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

if [[ -z "${DATABASE_URL:-}" ]]; then
  PGDATA_DIR="$WORK/data"
  PORT=$(( 20000 + RANDOM % 20000 ))
  if [[ $(id -u) == 0 ]]; then chown postgres "$WORK"; fi
  as_pg "$PGBIN/initdb" -D "$PGDATA_DIR" -U postgres --auth=trust -E UTF8 --locale=C >/dev/null
  as_pg "$PGBIN/pg_ctl" -D "$PGDATA_DIR" -l "$WORK/postgres.log" -w start -o \
    "-p $PORT -c listen_addresses=127.0.0.1 -c unix_socket_directories=$WORK -c shared_buffers=512MB -c max_wal_size=8GB -c max_connections=50" >/dev/null
  DATABASE_URL="postgres://postgres@127.0.0.1:$PORT/postgres"
fi
export DATABASE_URL
psql_() { "$PSQL" -X -q -v ON_ERROR_STOP=1 -d "$DATABASE_URL" "$@"; }

echo "== loading a seed-004-shaped schema, SCALE=$SCALE, mcp_server_tokens $BIG_ROWS rows (load average $(cut -d' ' -f1-3 /proc/loadavg))" >&2
t0=$(date +%s.%N)
psql_ <<SQL
CREATE TABLE mcp_connectors (id serial PRIMARY KEY, name text NOT NULL, created_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE connector_access (id serial PRIMARY KEY,
    connector_id integer NOT NULL REFERENCES mcp_connectors (id) ON DELETE CASCADE, user_id text NOT NULL);
CREATE TABLE mcp_servers (id serial PRIMARY KEY,
    connector_id integer REFERENCES mcp_connectors (id) ON DELETE CASCADE, name text NOT NULL, status text);
CREATE TABLE mcp_server_tokens (id serial PRIMARY KEY,
    mcp_server_id integer NOT NULL REFERENCES mcp_servers (id), token text NOT NULL);
CREATE TABLE mcp_server_tools (id serial PRIMARY KEY,
    mcp_server_id integer NOT NULL REFERENCES mcp_servers (id), tool_name text NOT NULL);
INSERT INTO mcp_connectors (name) SELECT 'connector ' || g FROM generate_series(1, $SCALE) g;
INSERT INTO connector_access (connector_id, user_id) SELECT g, 'user' || g FROM generate_series(1, $SCALE) g;
INSERT INTO mcp_servers (connector_id, name, status) SELECT (g % $SCALE) + 1, 'server ' || g, 'ok' FROM generate_series(1, 2 * $SCALE) g;
INSERT INTO mcp_server_tokens (mcp_server_id, token) SELECT (g % (2 * $SCALE)) + 1, md5(g::text) FROM generate_series(1, $BIG_ROWS) g;
INSERT INTO mcp_server_tools (mcp_server_id, tool_name) SELECT (g % (2 * $SCALE)) + 1, 'tool ' || g FROM generate_series(1, 3 * $SCALE) g;
CREATE INDEX ix_connector_access_connector_id ON connector_access (connector_id);
CREATE INDEX ix_mcp_servers_connector_id ON mcp_servers (connector_id);
CREATE INDEX ix_mcp_server_tokens_server ON mcp_server_tokens (mcp_server_id);
CREATE INDEX ix_mcp_server_tools_server ON mcp_server_tools (mcp_server_id);
SQL
psql_ -c "VACUUM ANALYZE"
ROWS=$(psql_ -At -c "SELECT (SELECT count(*) FROM mcp_connectors) + (SELECT count(*) FROM connector_access) + (SELECT count(*) FROM mcp_servers) + (SELECT count(*) FROM mcp_server_tokens) + (SELECT count(*) FROM mcp_server_tools)")
echo "loaded $ROWS rows in $(echo "$(date +%s.%N) - $t0" | bc) s" >&2

# The application's traffic: point reads and updates on the same tables as the backfill.
cat > "$WORK/app.sql" <<SQL
\set c random(1, $SCALE)
\set s random(1, 2 * $SCALE)
\set t random(1, $BIG_ROWS)
BEGIN;
SELECT name FROM mcp_connectors WHERE id = :c;
SELECT s.name, c.name FROM mcp_servers s JOIN mcp_connectors c ON c.id = s.connector_id WHERE s.id = :s;
SELECT count(*) FROM mcp_server_tools WHERE mcp_server_id = :s;
UPDATE mcp_servers SET status = 'seen' WHERE id = :s;
UPDATE mcp_server_tokens SET token = md5(random()::text) WHERE id = :t;
END;
SQL

APP_URL=$DATABASE_URL
run_pgbench() { # $1 = log prefix, $2 = seconds
  (cd "$WORK" && "$PGBENCH" -n -f app.sql -c "$CLIENTS" -j 2 -T "$2" ${RATE:+-R "$RATE"} -l --log-prefix="$1" "$APP_URL" >>"$WORK/pgbench.out" 2>&1)
}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# The application through keyshift: a proxy in front of the database, dual-writing.
start_proxy() {
  local port admin up
  port=$(free_port); admin=$(free_port)
  up=$(python3 -c 'import sys, urllib.parse as u; p = u.urlparse(sys.argv[1]); print(f"{p.hostname}:{p.port or 5432}")' "$DATABASE_URL")
  KEYSHIFT_LOG_LEVEL=info "$KEYSHIFT" proxy --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin" \
    --upstream "$up" --upstream-tls disable --database-url "$DATABASE_URL" >"$WORK/proxy.log" 2>&1 &
  PROXY_PID=$!
  for _ in $(seq 1 200); do
    curl -fs "127.0.0.1:$admin/v1/status" 2>/dev/null | grep -q '"dual_write":true' && break
    sleep 0.1
  done
  curl -fs "127.0.0.1:$admin/v1/status" | grep -q '"dual_write":true' || { cat "$WORK/proxy.log" >&2; echo "the proxy did not load its rules" >&2; exit 1; }
  APP_URL=$(python3 -c 'import sys, urllib.parse as u; p = u.urlparse(sys.argv[1]); print(p._replace(netloc=f"{p.username}@127.0.0.1:{sys.argv[2]}").geturl())' "$DATABASE_URL" "$port")
}
# The first ETA the backfill logged with >= 10 % of its work done, against its real duration:
# "predicted total s, real s, error %" from the log $1.
eta_check() {
  local line pct after eta total
  line=$(grep -o 'all tasks: [0-9.]*% done after [0-9]*s, ETA [0-9]*s' "$1" | awk '{p=$3; sub("%","",p); if (p + 0 >= 10) {print; exit}}')
  total=$(grep -o 'updated in [0-9.]*s' "$1" | grep -o '[0-9.]*' | tail -1)
  if [[ -z "$line" || -z "$total" ]]; then echo "no ETA logged after 10 %"; return; fi
  pct=$(echo "$line" | awk '{print $3}'); after=$(echo "$line" | awk '{print $6}' | tr -d 's,'); eta=$(echo "$line" | awk '{print $8}' | tr -d 's')
  echo "at $pct done (after ${after}s): ETA ${eta}s -> predicted $((after + eta))s, real ${total}s, error $(echo "scale=1; 100 * ($after + $eta - $total) / $total" | bc) %"
}
p99() { # latency (µs, 3rd field, plus the schedule lag in the 7th with RATE) of every logged transaction with the prefix $1
  cat "$WORK"/$1.* | awk '{print $3 + $7}' | sort -n | awk '{a[NR]=$1} END {if (NR == 0) {print "nan"; exit}; i=int(NR*0.99); if (i < 1) i = 1; printf "%.2f", a[i]/1000}'
}
mean() {
  cat "$WORK"/$1.* | awk '{s+=$3+$7; n++} END {if (n == 0) print "nan"; else printf "%.2f", s/n/1000}'
}
tx() { cat "$WORK"/$1.* | wc -l; }

ALONE_SECONDS=nan
ALONE_ETA=-
LOAD_DURING=()
if [[ "${ALONE:-1}" == 1 ]]; then
  echo "== keyshift backfill alone (no other traffic), then abort and VACUUM FULL to start again from the same tables" >&2
  "$KEYSHIFT" expand --database-url "$DATABASE_URL" 2>"$WORK/expand.log"
  a0=$(date +%s.%N)
  "$KEYSHIFT" backfill --skip-harden --batch-size "$BATCH" --jobs "$JOBS" --database-url "$DATABASE_URL" 2>"$WORK/backfill-alone.log"
  ALONE_ETA=$(eta_check "$WORK/backfill-alone.log")
  ALONE_SECONDS=$(echo "$(date +%s.%N) - $a0" | bc)
  "$KEYSHIFT" abort --database-url "$DATABASE_URL" 2>>"$WORK/expand.log"
  psql_ -c "VACUUM FULL" -c "ANALYZE" -c "CHECKPOINT"
fi

echo "== keyshift expand" >&2
"$KEYSHIFT" expand --database-url "$DATABASE_URL" 2>"$WORK/expand.log"

if [[ "$PROXY" == 1 ]]; then
  echo "== starting a keyshift proxy: pgbench goes through it" >&2
  start_proxy
fi

echo "== ${IDLE_SECONDS}s of the script with keyshift idle" >&2
run_pgbench idle "$IDLE_SECONDS"

echo "== keyshift backfill, with the script running alongside" >&2
"$KEYSHIFT" backfill --skip-harden --batch-size "$BATCH" --jobs "$JOBS" --database-url "$DATABASE_URL" 2>"$WORK/backfill.log" &
BF=$!
bf0=$(date +%s.%N)
n=0
while kill -0 "$BF" 2>/dev/null; do
  n=$((n + 1))
  LOAD_DURING+=("$(cut -d' ' -f1 /proc/loadavg)")
  run_pgbench "during$n" 3
done
wait "$BF"
bf1=$(date +%s.%N)
BF_SECONDS=$(echo "$bf1 - $bf0" | bc)
echo "== keyshift harden (alone)" >&2
h0=$(date +%s.%N)
"$KEYSHIFT" harden --database-url "$DATABASE_URL" 2>"$WORK/harden.log"
H_SECONDS=$(echo "$(date +%s.%N) - $h0" | bc)
"$KEYSHIFT" verify --database-url "$DATABASE_URL" >"$WORK/verify.out" 2>&1 || { cat "$WORK/verify.out"; echo "verify FAILED" >&2; exit 1; }

IDLE_P99=$(p99 idle); DURING_P99=$(p99 "during*")
IDLE_MEAN=$(mean idle); DURING_MEAN=$(mean "during*")
BF_RATE=$(echo "scale=0; $ROWS / $BF_SECONDS" | bc)
ALONE_RATE=$( [[ "$ALONE_SECONDS" == nan ]] && echo nan || echo "scale=0; $ROWS / $ALONE_SECONDS" | bc)
RATIO=$(echo "scale=2; $DURING_P99 / $IDLE_P99" | bc)
echo
echo "load average at the end:       $(cut -d' ' -f1-3 /proc/loadavg); during the backfill beside pgbench (every ~3 s): min $(printf '%s\n' "${LOAD_DURING[@]}" | sort -n | head -1), max $(printf '%s\n' "${LOAD_DURING[@]}" | sort -n | tail -1)"
echo "pgbench through:               $([[ "$PROXY" == 1 ]] && echo "a keyshift proxy" || echo "PostgreSQL directly"), $([[ -n "${RATE:-}" ]] && echo "-R $RATE transactions/s" || echo "closed loop (each client back to back)")"
echo "rows in the 5 tables:          $ROWS (mcp_server_tokens: $BIG_ROWS)"
echo "backfill alone:                 ${ALONE_SECONDS}s -> $ALONE_RATE rows/s   (target >= 50000)"
echo "backfill beside the script:     ${BF_SECONDS}s -> $BF_RATE rows/s"
grep -o 'keyshift backfill: .*' "$WORK/backfill.log" || true
echo "ETA alone:                     $ALONE_ETA"
echo "ETA beside the script:         $(eta_check "$WORK/backfill.log")"
echo "harden (indexes, CHECKs, FKs): ${H_SECONDS}s"
echo "pgbench, $CLIENTS clients:      idle    p99 ${IDLE_P99} ms, mean ${IDLE_MEAN} ms, $(tx idle) tx in ${IDLE_SECONDS}s"
echo "                               during  p99 ${DURING_P99} ms, mean ${DURING_MEAN} ms, $(tx 'during*') tx in ${BF_SECONDS}s"
echo "p99 during / idle:             $RATIO   (target <= 2)"
echo "verify:                        $(tail -1 "$WORK/verify.out")"
echo "per task:"
psql_ -At -F ' ' -c "SELECT '  ' || rpad(task, 46), lpad(rows_done::text, 8) || ' rows', lpad(round(extract(epoch FROM finished_at - started_at)::numeric, 1)::text, 6) || ' s' FROM keyshift.backfill ORDER BY ord"
