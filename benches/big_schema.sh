#!/usr/bin/env bash
# Big schemas (issue [scale], deliverable 4): `plan`, `expand`, `backfill` and `verify` on
# TABLES tables with 2 × TABLES foreign keys, and what the proxy's rules for them cost.
#
# The schema: TABLES/2 parents `p<i> (id serial PRIMARY KEY, name text)` and TABLES/2 children
# `c<i>`, each with 4 indexed integer FKs to parents (so 2 × TABLES FKs), ROWS rows per table.
# Each command is timed (wall clock and peak memory, from /usr/bin/time). Then two proxies:
# one linked to this database (rules for every table), one to an empty database; the
# difference of their resident memory is the rule set's, and the linked proxy's log gives the
# time to build the rules (catalog reads included: `build_ms`). Then `cutover` and `rollback`
# with the linked proxy: its log gives each swap's rebuild (made while its gate holds the
# clients, from the last catalog reading, `reading="derived"`, and built ahead while the swap
# runs, `ahead=true`), the time from its reading of the new state to its gate opening
# (`refresh_ms`), and the catalog read again after it.
# Targets: each command < 60 s; rules < 50 MB and < 10 ms to rebuild.
#
# Usage: benches/big_schema.sh            (about 3 minutes here)
# Environment: TABLES=1000, ROWS=10, PGBIN, KEEP_TMP=1.
set -euo pipefail

TABLES=${TABLES:-1000}
ROWS=${ROWS:-10}

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
command -v /usr/bin/time >/dev/null || die "/usr/bin/time is needed (Debian package time)"
bench_setup big
start_postgres "-c max_locks_per_transaction=1024 -c fsync=off -c synchronous_commit=off"

log "creating $TABLES tables with $((TABLES * 2)) foreign keys"
python3 - "$TABLES" "$ROWS" >"$TMP/schema.sql" <<'EOF'
import sys
tables, rows = int(sys.argv[1]), int(sys.argv[2])
half = tables // 2
print("BEGIN;")
for i in range(half):
    print(f"CREATE TABLE p{i} (id serial PRIMARY KEY, name text);")
    print(f"INSERT INTO p{i} (name) SELECT 'n' || g FROM generate_series(1, {rows}) g;")
for i in range(half):
    parents = [(i * 4 + k) % half for k in range(4)]
    fks = ", ".join(f"p{p}_id integer REFERENCES p{p} (id)" for p in parents)
    print(f"CREATE TABLE c{i} (id serial PRIMARY KEY, {fks}, v text);")
    for p in parents:
        print(f"CREATE INDEX ON c{i} (p{p}_id);")
    cols = ", ".join(f"p{p}_id" for p in parents)
    vals = ", ".join("1 + g % " + str(rows) for _ in parents)
    print(f"INSERT INTO c{i} ({cols}) SELECT {vals} FROM generate_series(1, {rows}) g;")
print("COMMIT;")
EOF
"${PSQL[@]}" -f "$TMP/schema.sql" >/dev/null
"${PSQL[@]}" -c "CREATE DATABASE empty" >/dev/null

export KEYSHIFT_DATABASE_URL
KEYSHIFT_DATABASE_URL=$(url postgres)
declare -A SECS MEM
for step in plan expand backfill verify; do
    log "keyshift $step"
    /usr/bin/time -f "%e %M" -o "$TMP/$step.time" "$KS" "$step" >"$TMP/$step.out" 2>"$TMP/$step.err" ||
        { tail -20 "$TMP/$step.err" >&2; die "keyshift $step failed"; }
    read -r SECS[$step] MEM[$step] <"$TMP/$step.time"
done

rss_mb() { awk '/^VmRSS/ { printf "%.1f", $2 / 1024 }' "/proc/$1/status"; }
start_proxy() { # name database
    local port admin
    port=$(free_port)
    admin=$(free_port)
    KEYSHIFT_LOG_LEVEL=info,keyshift::proxy::control=debug "$KS" proxy --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin" \
        --upstream "127.0.0.1:$PG_PORT" --upstream-tls disable --database-url "$(url "$2")" \
        >"$TMP/$1.log" 2>&1 &
    wait_port "$port"
    echo $!
}
log "starting a proxy linked to the migrated database and one linked to an empty one"
# Called in $(...), a subshell: the cleanup's PIDS is the caller's to fill (the proxies were
# left running after the script before).
LINKED=$(start_proxy linked postgres)
PIDS+=("$LINKED")
EMPTY=$(start_proxy empty empty)
PIDS+=("$EMPTY")
for _ in $(seq 1 200); do
    grep -q "new rules in force" "$TMP/linked.log" && break
    sleep 0.1
done
grep -q "new rules in force" "$TMP/linked.log" || die "the linked proxy never built its rules"
sleep 2
# The log's numbers: `field="12.3"` or `field=12.3`, one per matching line.
field() { grep "$1" "$TMP/linked.log" | grep -o "$2=\"\?[0-9.]*" | grep -o '[0-9.]*$' | xargs -r printf '%.1f ' || true; }
BUILD_MS=$(field 'new rules in force' build_ms)
READ_MS=$(field 'new rules in force' reading_ms)
RSS_LINKED=$(rss_mb "$LINKED")
RSS_EMPTY=$(rss_mb "$EMPTY")

LOAD_SWAPS=$(cut -d" " -f1-3 /proc/loadavg)
for step in cutover rollback; do
    log "keyshift $step (the linked proxy rebuilds its rules while its gate is held)"
    "$KS" "$step" >"$TMP/$step.out" 2>"$TMP/$step.err" ||
        { tail -20 "$TMP/$step.err" >&2; die "keyshift $step failed"; }
    grep -o 'swap transaction [0-9.]* ms' "$TMP/$step.out" | grep -o '[0-9.]*' >"$TMP/$step.swap"
done
sleep 3 # the catalog read again after the last gate opened
# Per swap, from the linked proxy's log: the rules built while its gate was held (and from
# which reading), the time from those rules in force to the gate opening, and from its
# reading of the new state to the gate opening (`refresh_ms`, logged since issue 16).
python3 - "$TMP/linked.log" "$TMP/cutover.swap" "$TMP/rollback.swap" >"$TMP/swaps.txt" <<'PY'
import re, sys
from datetime import datetime
def fields(line):
    return {k: v.strip('"') for k, v in re.findall(r'(\w+)=("[^"]*"|\S+)', line)}
def at(line):
    return datetime.strptime(line[:26], "%Y-%m-%dT%H:%M:%S.%f")
swaps = [open(f).read().strip() or "?" for f in sys.argv[2:]]
rules, checks, ahead, rows = None, [], [], []
for line in open(sys.argv[1]):
    # Only rules built while the gate was held: a round the swap did not commit in (a lock
    # timeout) rebuilds nothing, and is skipped.
    if "switch: closing the gate" in line:
        rules = None
    elif "new rules in force" in line:
        rules = line
    elif "switch: gate open" in line and rules:
        f, r = fields(line), fields(rules)
        gap = (at(line) - at(rules)).total_seconds() * 1000
        how = r.get("reading", "read") + (", ahead" if r.get("ahead") == "true" else "")
        rows.append((r.get("build_ms", "?"), how, f"{gap:.1f}",
                     f.get("refresh_ms", "-"), f"{float(f.get('pause_ms', 'nan')):.1f}"))
    elif "reading holds" in line:
        checks.append(fields(line).get("read_ms", "?"))
    elif "rules built ahead" in line:
        ahead.append(fields(line).get("build_ms", "?"))
print(f"{'swap':<9} {'swap tx ms':>10} {'gate closed ms':>14} {'rules built ms':>29} "
      f"{'rules in force -> gate open ms':>30} {'state read -> gate open ms':>26}")
for name, swap, row in zip(["cutover", "rollback"], swaps, rows[-2:]):
    built, reading, gap, refresh, pause = row
    print(f"{name:<9} {swap:>10} {pause:>14} {built + ' (' + reading + ')':>29} {gap:>30} {refresh:>26}")
print("rules built ahead while the swap ran (no one waiting for them): "
      + (", ".join(ahead[-2:]) + " ms" if ahead else "-"))
print("catalog read again after the gate opened (no one waiting): "
      + (", ".join(checks[-2:]) + " ms" if checks else "-"))
PY
CORRECTED=$(grep -c 'catalog differs' "$TMP/linked.log" || true)
echo
echo "big schema: $TABLES tables, $((TABLES * 2)) foreign keys, $ROWS rows per table (load average at start: $LOADAVG_START)"
printf '%-10s %10s %14s\n' command seconds "peak memory"
for step in plan expand backfill verify; do
    printf '%-10s %10s %11s MB\n' "$step" "${SECS[$step]}" "$((MEM[$step] / 1024))"
done
echo "proxy rules: built in ${BUILD_MS% } ms with their catalog reads${READ_MS:+ (${READ_MS% } ms of them)}; resident memory ${RSS_LINKED} MB linked vs ${RSS_EMPTY} MB with no migration"
echo "the linked proxy at each swap (rules rebuilt while its gate was held; target < 10 ms; load average $LOAD_SWAPS):"
cat "$TMP/swaps.txt"
echo "rules corrected after a new reading of the catalog: ${CORRECTED}"
