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
# Usage: benches/cutover.sh              (about 5–10 minutes on 2 cores, most of it loading and
#                                          backfilling the 2 M rows)
# Environment: SMALL=1250 LARGE=250000 (n: rows = 8 n: n connectors, n access, 2n servers,
#              2n tokens, 2n tools), CLIENTS=16, JOBS=2, DURATION=24, CUT_AT=12, MODE=simple,
#              DRAIN_TIMEOUT=2s, PGBIN, KEEP_TMP=1 (keep the logs in the temp dir).
set -euo pipefail

SMALL=${SMALL:-1250}
LARGE=${LARGE:-250000}
CLIENTS=${CLIENTS:-16}
JOBS=${JOBS:-2}
DURATION=${DURATION:-24}
CUT_AT=${CUT_AT:-12}
MODE=${MODE:-simple}
DRAIN_TIMEOUT=${DRAIN_TIMEOUT:-2s}

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }
command -v curl >/dev/null || die "curl is needed to read the proxies' /v1/status"
bench_setup cut
start_postgres "-c max_connections=200 -c shared_buffers=256MB -c max_wal_size=8GB -c fsync=off \
    -c synchronous_commit=off -c full_page_writes=off"

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

SIZES=(small large)
declare -A N=([small]=$SMALL [large]=$LARGE) ROWS LOAD_S EXPAND_S BACKFILL_S VERIFY_S T_S
for s in "${SIZES[@]}"; do
    log "$s: loading $((8 * N[$s])) rows"
    t0=$(now)
    "${PSQL[@]}" -d postgres -c "CREATE DATABASE $s"
    "${PSQL[@]}" -d "$s" -c "$SCHEMA" -c "$(rows_sql "${N[$s]}")" -c "VACUUM ANALYZE"
    LOAD_S[$s]=$(secs "$t0" "$(now)")
    ROWS[$s]=$(count_rows "$s")
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

declare -A CUT_START CUT_END ATT_START ATT_END CUT_OUT SPLIT
for s in "${SIZES[@]}"; do
    port_var=PORT_$s
    "${PSQL[@]}" -d "$s" -c "CHECKPOINT"
    T_S[$s]=$(awk -v d="$DURATION" -v c="$CUT_AT" -v v="${VERIFY_S[$s]}" 'BEGIN { t = c + 6 * v + 20; if (t < d) t = d; printf "%d", t }')
    log "$s: $CLIENTS clients through keyshift for ${T_S[$s]}s, cutover at ${CUT_AT}s"
    (cd "$TMP" && exec "$PGBIN/pgbench" -n -f "app-$s.sql" -M "$MODE" -c "$CLIENTS" -j "$JOBS" -T "${T_S[$s]}" \
        -l --log-prefix="lat-$s" -h 127.0.0.1 -p "${!port_var}" -U postgres "$s" >"pgbench-$s.out" 2>&1) &
    BENCH=$!
    PIDS+=($BENCH)
    sleep "$CUT_AT"
    CUT_START[$s]=$(now)
    "$KS" cutover --database-url "$(url "$s")" --drain-timeout "$DRAIN_TIMEOUT" >"$TMP/cutover-$s.out" 2>"$TMP/cutover-$s.err" ||
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
    # When the gate closed and opened, from the proxy's own log (RFC 3339 UTC timestamps).
    read -r ATT_START[$s] ATT_END[$s] < <(python3 -c '
import re, sys
from datetime import datetime
ts = lambda l: datetime.fromisoformat(l.split()[0].rstrip("Z")[:26] + "+00:00").timestamp()
lines = [re.sub(r"\x1b\[[0-9;]*m", "", l) for l in open(sys.argv[1])]
close = [ts(l) for l in lines if "closing the gate" in l]
opened = [ts(l) for l in lines if "gate open" in l]
print(close[-1], opened[-1])' "$TMP/proxy-$s.log")
    # Where the gate-closed time went: the coordinator logs the swap's commit and its duration.
    SPLIT[$s]=$(python3 -c '
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
echo "Cutover pause, seed-004 schema (5 tables), $CLIENTS clients through keyshift (pgbench -M $MODE, 3 statements per"
echo "transaction), $(nproc) cores, load average before/after: $LOADAVG_START / $(cut -d' ' -f1-3 /proc/loadavg)"
for s in "${SIZES[@]}"; do
    echo "  $s: ${ROWS[$s]} rows; load ${LOAD_S[$s]} s, expand ${EXPAND_S[$s]} s, backfill+harden ${BACKFILL_S[$s]} s;" \
        "verify ${VERIFY_S[$s]} s; load ran ${T_S[$s]} s; keyshift cutover ran $(secs "${CUT_START[$s]}" "${CUT_END[$s]}") s (verify included), gate closed (proxy log) $(awk -v a="${ATT_START[$s]}" -v b="${ATT_END[$s]}" 'BEGIN { printf "%.1f", (b - a) * 1000 }') ms"
    sed 's/^/      /' <<<"${CUT_OUT[$s]}"
done
printf '%-34s %14s %14s %8s\n' "" "${ROWS[small]} rows" "${ROWS[large]} rows" ratio
row() { # label field-index
    local a b
    a=$(field small "$2"); b=$(field large "$2")
    printf '%-34s %14s %14s %8s\n' "$1" "$a" "$b" "$(awk -v a="$a" -v b="$b" 'BEGIN { if (a > 0) printf "%.2f", b / a; else print "-" }')"
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
printf '%-34s %14s %14s %8s\n' "keyshift: swap transaction ms" "$(swap_ms small)" "$(swap_ms large)" \
    "$(awk -v a="$(swap_ms small)" -v b="$(swap_ms large)" 'BEGIN { printf "%.2f", b / a }')"
printf '%-34s %14s %14s %8s\n' "keyshift: gate closed ms" "$(gate_ms small)" "$(gate_ms large)" \
    "$(awk -v a="$(gate_ms small)" -v b="$(gate_ms large)" 'BEGIN { printf "%.2f", b / a }')"
split_row() { # label field-index
    local a b
    a=$(awk -v i="$2" '{ print $i }' <<<"${SPLIT[small]}"); b=$(awk -v i="$2" '{ print $i }' <<<"${SPLIT[large]}")
    printf '%-34s %14s %14s %8s\n' "$1" "$a" "$b" "$(awk -v a="$a" -v b="$b" 'BEGIN { if (a > 0) printf "%.2f", b / a; else print "-" }')"
}
split_row "gate closed -> swap starts ms" 1
split_row "swap transaction ms (log)" 2
split_row "swap commit -> gate open ms" 3
for s in "${SIZES[@]}"; do echo "catch-up plan, $s: $(grep -o '[A-Za-z ]*Scan [^(]*' "$TMP/catchup-plan-$s.txt" | sed 's/^ *//; s/ *$//' | paste -sd';')"; done
echo "failed transactions: 0 (checked); every table has a uuid primary key after cutover (checked)"
max_small=$(field small 6); max_large=$(field large 6)
awk -v a="$max_small" -v b="$max_large" 'BEGIN {
    printf "target max stall <= 100 ms: %s (small %.1f ms, large %.1f ms); target large <= 1.5 x small: %s (%.2f)\n",
        (a <= 100 && b <= 100) ? "met" : "MISSED", a, b, (b <= 1.5 * a) ? "met" : "MISSED", b / a }'
