#!/usr/bin/env bash
# Id-mapping benchmark: HTTP lookups on a proxy's /v1/map, in ONE run, side by side:
#   hot    16 keep-alive clients (wrk) looking up ids of a working set already in the cache
#   cold   the same, with random ids over the whole table and a cache too small to hit, so
#          every lookup is a database round trip
#   sql    for reference, the same cold lookups as prepared statements straight to PostgreSQL
#          (pgbench, 16 clients): what a client of the database pays without keyshift
#   batch  POST /v1/map/{table} with 10,000 ids: cold (all misses, one query) and hot
# wrk reports requests/s and the latency distribution (p50, p99); the batch is timed by curl.
#
# Usage: benches/map.sh                (about 2 minutes)
# Environment: ROWS=1000000 (rows of the mapped table), CLIENTS=16, DURATION=10, THREADS=2,
#              PGBIN, KEEP_TMP=1. Needs wrk (apt-get install wrk), curl, python3.
set -euo pipefail

ROWS=${ROWS:-1000000}
CLIENTS=${CLIENTS:-16}
DURATION=${DURATION:-10}
THREADS=${THREADS:-2}

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
for t in wrk curl; do
    command -v $t >/dev/null || die "$t is needed (apt-get install $t)"
done
bench_setup map
start_postgres "-c max_connections=100 -c shared_buffers=256MB -c fsync=off -c synchronous_commit=off"
URL=$(url postgres)

log "loading $ROWS rows, expand, backfill"
"${PSQL[@]}" -c "CREATE TABLE accounts (id serial PRIMARY KEY, name text NOT NULL);
    INSERT INTO accounts (name) SELECT 'a' || g FROM generate_series(1, $ROWS) g;"
"$KS" expand --database-url "$URL" >"$TMP/expand.log" 2>&1 || { cat "$TMP/expand.log" >&2; die expand; }
"$KS" backfill --database-url "$URL" >"$TMP/backfill.log" 2>&1 || { cat "$TMP/backfill.log" >&2; die backfill; }
"${PSQL[@]}" -c "VACUUM ANALYZE accounts"

# Two proxies: one with a cache big enough for the hot set, one whose cache cannot hold
# anything useful (2 entries), so that every lookup on it is a miss.
# Not in a $(...) subshell: PIDS must reach the cleanup, or the proxies outlive the script.
start_proxy() { # name cache_entries result_variable
    local port admin
    port=$(free_port); admin=$(free_port)
    KEYSHIFT_LOG_LEVEL=warn "$KS" proxy --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin" \
        --upstream "127.0.0.1:$PG_PORT" --upstream-tls disable --database-url "$URL" \
        --proxy-id "$1" --map-cache-entries "$2" >"$TMP/proxy-$1.log" 2>&1 &
    PIDS+=($!)
    wait_port "$admin"
    printf -v "$3" '%s' "$admin"
}
start_proxy hot 1000000 HOT_ADMIN
start_proxy cold 2 COLD_ADMIN
for a in $HOT_ADMIN $COLD_ADMIN; do
    for _ in $(seq 1 100); do
        curl -sf "127.0.0.1:$a/v1/map/accounts/1" >/dev/null && break
        sleep 0.1
    done
done

HOTSET=10000
lua() { # max id
    cat <<EOF
math.randomseed(os.time() + $1)
request = function()
  return wrk.format("GET", "/v1/map/accounts/" .. math.random(1, $1))
end
EOF
}
lua "$HOTSET" >"$TMP/hot.lua"
lua "$ROWS" >"$TMP/cold.lua"

log "warming the hot proxy's cache with ids 1..$HOTSET (batches of 10,000)"
python3 - "$HOT_ADMIN" "$HOTSET" <<'EOF'
import json, sys, urllib.request
admin, n = sys.argv[1], int(sys.argv[2])
for start in range(1, n + 1, 10000):
    ids = list(range(start, min(n, start + 9999) + 1))
    req = urllib.request.Request(f"http://127.0.0.1:{admin}/v1/map/accounts",
        data=json.dumps({"legacy_ids": ids}).encode(), headers={"Content-Type": "application/json"})
    body = json.load(urllib.request.urlopen(req))
    assert len(body["mappings"]) == len(ids), "warm-up missed ids"
EOF

run_wrk() { # label admin script
    log "wrk: $1 ($CLIENTS keep-alive clients, ${DURATION}s)"
    wrk -t"$THREADS" -c"$CLIENTS" -d"${DURATION}s" --latency -s "$3" "http://127.0.0.1:$2" >"$TMP/wrk-$1.txt" 2>&1
    cat "$TMP/wrk-$1.txt" >&2
}
run_wrk hot "$HOT_ADMIN" "$TMP/hot.lua"
run_wrk cold "$COLD_ADMIN" "$TMP/cold.lua"

log "pgbench: the same cold lookups as prepared statements straight to PostgreSQL"
cat >"$TMP/sql.pgbench" <<EOF
\set id random(1, $ROWS)
SELECT id_uuid FROM accounts WHERE id = :id;
EOF
"$PGBIN/pgbench" -h 127.0.0.1 -p "$PG_PORT" -U postgres -n -M prepared -c "$CLIENTS" -j "$THREADS" \
    -T "$DURATION" -f "$TMP/sql.pgbench" postgres >"$TMP/pgbench.txt" 2>&1 || { cat "$TMP/pgbench.txt" >&2; die pgbench; }
grep -E "tps|latency" "$TMP/pgbench.txt" >&2

log "batch: POST 10,000 ids (cold: ids never asked for; hot: the same again)"
python3 - "$ROWS" >"$TMP/batch.json" <<'EOF'
import json, random, sys
random.seed(7)
# Ids outside the warmed hot set, so that the first request misses on every one.
print(json.dumps({"legacy_ids": random.sample(range(20001, int(sys.argv[1]) + 1), 10000)}))
EOF
batch() { # admin
    curl -s -o "$TMP/batch-out.json" -w '%{time_total}\n' -H 'Content-Type: application/json' \
        --data-binary "@$TMP/batch.json" "127.0.0.1:$1/v1/map/accounts"
}
BATCH_COLD=$(batch "$HOT_ADMIN")
python3 -c "import json,sys; b=json.load(open('$TMP/batch-out.json')); assert len(b['mappings'])==10000, len(b['mappings'])"
BATCH_HOT=()
for _ in 1 2 3 4 5; do BATCH_HOT+=("$(batch "$HOT_ADMIN")"); done
BATCH_COLD2=()
for _ in 1 2 3 4 5; do BATCH_COLD2+=("$(batch "$COLD_ADMIN")"); done

python3 - "$TMP" "$LOADAVG_START" "$BATCH_COLD" "${BATCH_HOT[*]}" "${BATCH_COLD2[*]}" <<'EOF'
import re, statistics, sys
tmp, load0, cold1, hot, cold2 = sys.argv[1:6]
def wrk(name):
    t = open(f"{tmp}/wrk-{name}.txt").read()
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", t).group(1))
    def pct(p):
        m = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)\b", t)
        v, u = float(m.group(1)), m.group(2)
        return v / 1000 if u == "us" else v * 1000 if u == "s" else v
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", t)
    return rps, pct(50), pct(99), int(non2xx.group(1)) if non2xx else 0
pg = open(f"{tmp}/pgbench.txt").read()
pg_tps = float(re.search(r"tps = ([\d.]+)", pg).group(1))
pg_lat = float(re.search(r"latency average = ([\d.]+) ms", pg).group(1))
print("\n== id mapping: /v1/map lookups ==")
print(f"{'':28}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'non-2xx':>9}")
for name, label in (("hot", "hot cache (GET one id)"), ("cold", "cold cache (GET one id)")):
    rps, p50, p99, bad = wrk(name)
    print(f"{label:28}{rps:>10.0f}{p50:>9.2f}{p99:>9.2f}{bad:>9}")
print(f"{'SQL direct, prepared':28}{pg_tps:>10.0f}{'':>9}{'':>9}{'':>9}  (pgbench, mean latency {pg_lat:.2f} ms)")
hot_rps = wrk("hot")[0]; cold_rps = wrk("cold")[0]
print(f"hot/cold: {hot_rps / cold_rps:.1f}x   cold HTTP / direct SQL: {cold_rps / pg_tps:.2f}")
ms = lambda xs: [float(x) * 1000 for x in xs.split()]
print(f"batch of 10,000 ids: cold {float(cold1) * 1000:.0f} ms (all misses, one query); "
      f"hot median {statistics.median(ms(hot)):.0f} ms; on the no-cache proxy median {statistics.median(ms(cold2)):.0f} ms")
print(f"load average at start: {load0}; at end: {open('/proc/loadavg').read().split()[:3]}")
EOF
