#!/usr/bin/env bash
# The cutover pause against the number of migrated tables (issue [scale], deliverable 1).
#
# Two schemas at each size K: `star` (one `users` table referenced by K-1 child tables) and
# `chain` (t1 references users, t2 references t1, ...). Every child has its own serial key,
# an indexed NOT NULL integer FK and ROWS rows. Each database goes through expand and
# backfill (which hardens), then CLIENTS pgbench clients read through one keyshift proxy
# (a join of users with t1, and a lookup in the last child) while `keyshift cutover` runs.
#
# Printed per schema and size, in one run:
#   swap transaction   the swap, as keyshift cutover reports it
#   gate closed        how long the proxy held its clients (its own report)
#   longest statement  the longest a pgbench transaction spent in the window that can hold
#                      clients: the pause (single), the pause and the groups (by_table)
#   before             the slowest that ended after the command started and before its pause
#                      (it only reads then: this machine's own noise, for comparison)
#   floor              the same swap's statements sent one by one by psql inside a
#                      transaction that is rolled back (a hand-written swap: what PostgreSQL
#                      itself needs for these catalog changes, without keyshift)
# Target (issue 16): gate closed <= 100 ms from 5 to 300 tables, longest <= 1.5 x gate.
#
# Each schema and size is cut over in each of MODES, on its own copy, one after the other:
#   single    `keyshift cutover`: one swap of every table, inside the pause
#   by_table  `keyshift cutover --by-table`: a pause that only changes the phase, then the
#             tables swapped group by group with the gates open; its columns also show
#             the groups' total time and the longest group's transaction
#
# Usage: benches/cutover_tables.sh        (about 12 minutes here; also `SCALE=1 benches/cutover.sh`)
# Environment: SIZES="10 50 150 300", SHAPES="star chain", MODES="single by_table",
#              ROWS=2000, CLIENTS=4, PGBIN, KEEP_TMP=1, RATE (pgbench -R: that many transactions
#              per second in all instead of each client back to back, which keeps the machine
#              from being saturated; latencies then count from each transaction's scheduled start).
set -euo pipefail

SIZES=${SIZES:-10 50 150 300}
SHAPES=${SHAPES:-star chain}
MODES=${MODES:-single by_table}
ROWS=${ROWS:-2000}
CLIENTS=${CLIENTS:-4}

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
bench_setup cutover-tables
start_postgres "-c log_lock_waits=on -c deadlock_timeout=200ms -c max_connections=100 -c max_locks_per_transaction=512 -c fsync=off -c synchronous_commit=off"

schema_sql() { # shape k
    python3 - "$1" "$2" "$ROWS" <<'EOF'
import sys
shape, k, rows = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
print("BEGIN;")
print(f"CREATE TABLE users (id serial PRIMARY KEY, name text NOT NULL);")
print(f"INSERT INTO users (name) SELECT 'u' || g FROM generate_series(1, {rows}) g;")
prev = "users"
for i in range(1, k):
    ref = "users" if shape == "star" else prev
    print(f"CREATE TABLE t{i} (id serial PRIMARY KEY, ref_id integer NOT NULL REFERENCES {ref} (id), v text);")
    print(f"CREATE INDEX ON t{i} (ref_id);")
    print(f"INSERT INTO t{i} (ref_id, v) SELECT 1 + g % {rows}, 'x' FROM generate_series(1, {rows}) g;")
    prev = f"t{i}"
print("COMMIT;")
EOF
}

start_proxy() { # database -> sets PROXY_PORT, PROXY_PID
    PROXY_PORT=$(free_port)
    local admin
    admin=$(free_port)
    KEYSHIFT_LOG_LEVEL=info "$KS" proxy --listen "127.0.0.1:$PROXY_PORT" --admin-listen "127.0.0.1:$admin" \
        --upstream "127.0.0.1:$PG_PORT" --upstream-tls disable --database-url "$(url "$1")" \
        >"$TMP/proxy-$1.log" 2>&1 &
    PROXY_PID=$!
    PIDS+=("$PROXY_PID")
    wait_port "$PROXY_PORT"
    for _ in $(seq 1 100); do
        grep -q "new rules in force" "$TMP/proxy-$1.log" && return 0
        sleep 0.1
    done
    die "$1: the proxy never applied the migration's rules"
}

# The floor: the swap's own statements (from `keyshift plan --sql`) sent one by one by
# psql, timed by the server's \timing, rolled back. Without keyshift's catch-ups, carried
# objects and id mapping, which a hand-written swap would not have.
floor_ms() { # database
    KEYSHIFT_DATABASE_URL=$(url "$1") "$KS" plan --sql 2>/dev/null |
        awk '/^-- ===== / { c = ($0 == "-- ===== cutover =====") }
             c && /^BEGIN;$/ { s = 1; next } c && /^COMMIT;$/ { s = 0 }
             s && /^ALTER (TABLE|INDEX)/' >"$TMP/floor-$1.sql"
    { echo '\timing on'; echo 'BEGIN;'; cat "$TMP/floor-$1.sql"; echo 'ROLLBACK;'; } |
        "${PSQL[@]}" -d "$1" >"$TMP/floor-$1.out" 2>&1 || die "$1: the hand-written swap failed: $(grep -m1 ERROR "$TMP/floor-$1.out")"
    grep -o 'Time: [0-9.]*' "$TMP/floor-$1.out" | awk 'NR > 1 { s += $2 } END { printf "%.0f", s }'
}

declare -A SWAP GATE LONGEST BEFORE FLOOR STMTS GROUPS_MS GROUP_MAX
for shape in $SHAPES; do
    for k in $SIZES; do
      for mode in $MODES; do
        db="${shape}_${k}_$mode"
        log "$db: $k tables"
        "${PSQL[@]}" -c "CREATE DATABASE $db" >/dev/null
        schema_sql "$shape" "$k" | "${PSQL[@]}" -d "$db" >/dev/null
        for step in expand backfill; do
            KEYSHIFT_DATABASE_URL=$(url "$db") "$KS" "$step" >"$TMP/$db-$step.out" 2>&1 ||
                { tail -20 "$TMP/$db-$step.out" >&2; die "$db: keyshift $step failed"; }
        done
        # The cutover's preparation (the FK twins' NOT NULL proofs, ...) without its swap.
        KEYSHIFT_DATABASE_URL=$(url "$db") "$KS" cutover --dry-run >"$TMP/$db-dry-run.out" 2>&1 ||
            { tail -20 "$TMP/$db-dry-run.out" >&2; die "$db: keyshift cutover --dry-run failed"; }
        FLOOR[$db]=$(floor_ms "$db")
        STMTS[$db]=$(wc -l <"$TMP/floor-$db.sql")
        "${PSQL[@]}" -d "$db" -c "VACUUM ANALYZE" -c "CHECKPOINT" >/dev/null
        start_proxy "$db"
        cat >"$TMP/read-$db.sql" <<EOF
\\set u random(1, $ROWS)
SELECT u.name, count(c.id) FROM users u JOIN t1 c ON c.ref_id = u.id WHERE u.id = :u GROUP BY u.name;
SELECT count(*) FROM t$((k - 1)) WHERE ref_id = :u;
EOF
        (cd "$TMP" && exec "$PGBIN/pgbench" -n -f "read-$db.sql" -c "$CLIENTS" -j 2 -T 20 ${RATE:+-R "$RATE"} -l --log-prefix="lat-$db" \
            -h 127.0.0.1 -p "$PROXY_PORT" -U postgres "$db" >"pgbench-$db.out" 2>&1) &
        bench=$!
        sleep 6
        flags=()
        [ "$mode" = by_table ] && flags=(--by-table)
        start=$(date +%s.%N)
        KEYSHIFT_DATABASE_URL=$(url "$db") "$KS" cutover "${flags[@]}" >"$TMP/$db-cutover.out" 2>"$TMP/$db-cutover.err" ||
            { cat "$TMP/$db-cutover.out" "$TMP/$db-cutover.err" | tail -20 >&2; die "$db: cutover failed"; }
        end=$(date +%s.%N)
        wait "$bench" || { cat "$TMP/pgbench-$db.out" >&2; die "$db: pgbench failed"; }
        ! grep -q "number of failed transactions: [1-9]" "$TMP/pgbench-$db.out" ||
            die "$db: pgbench reported failures: $(cat "$TMP/pgbench-$db.out")"
        kill "$PROXY_PID"
        wait "$PROXY_PID" 2>/dev/null || true
        SWAP[$db]=$(sed -n 's/.*swap transaction \([0-9.]*\) ms.*/\1/p' "$TMP/$db-cutover.out")
        GATE[$db]=$(sed -n 's/.*gate closed \([0-9.]*\) ms.*/\1/p' "$TMP/$db-cutover.out" | head -1)
        GROUPS_MS[$db]=$(sed -n 's/.* group.* in \([0-9.]*\) ms.*/\1/p' "$TMP/$db-cutover.out")
        GROUP_MAX[$db]=$(sed -n 's/.*; longest \([0-9.]*\) ms.*/\1/p' "$TMP/$db-cutover.out")
        # The window that can hold clients, from the proxy's log: from its gate closing to
        # its gate opening (single), or to the rules of phase cut_over in force (by_table:
        # the groups run in between, gates open). Before it, the command only reads (verify,
        # preparation: seconds at 300 tables), and a stall there is this machine's
        # scheduling, not the cutover: it is shown apart, as `before ms`.
        epoch() { date -u -d "$(sed -n "s/^\([0-9T:.-]*\)Z .*$1.*/\1/p" "$TMP/proxy-$db.log" | head -1)" +%s.%N; }
        w_start=$(epoch "closing the gate")
        if [ "$mode" = by_table ]; then w_end=$(epoch "phase=cut_over"); else w_end=$(epoch "gate open"); fi
        # pgbench -l: client, tx, latency µs, script, epoch s, µs (at its end), and with RATE
        # the schedule lag µs (from the scheduled start to the real one). LONGEST: of
        # each transaction that started before the window ended and ended after it began,
        # the time from the later of its start and the window's start to its end: how long
        # the cutover could have held it (a script whose second statement the gate held
        # started before the window; one stalled before the window by this machine's
        # scheduling counts only its part inside). BEFORE: the longest that ended between
        # the command's start and the window.
        LONGEST[$db]=$(cat "$TMP"/lat-"$db".* | awk -v a="$w_start" -v b="$w_end" '
            { t = $5 + $6 / 1e6; s = t - ($3 + $7) / 1e6; from = s > a ? s : a
              if (s <= b && t >= a && t - from > m) m = t - from; if (t > last) last = t }
            END { if (last < b) print "n/a (the load ended first)"; else printf "%.1f", m * 1000 }')
        BEFORE[$db]=$(cat "$TMP"/lat-"$db".* | awk -v a="$start" -v b="$w_start" '
            { t = $5 + $6 / 1e6; if (t >= a && t < b && $3 + $7 > m) m = $3 + $7 }
            END { printf "%.1f", m / 1000 }')
        log "$db: swap ${SWAP[$db]} ms, gate ${GATE[$db]} ms, longest ${LONGEST[$db]} ms (before the pause ${BEFORE[$db]}), floor ${FLOOR[$db]} ms, groups ${GROUPS_MS[$db]:--} ms (longest ${GROUP_MAX[$db]:--})"
        "${PSQL[@]}" -c "DROP DATABASE $db" >/dev/null
      done
    done
done

echo
echo "keyshift $(git -C "$ROOT" rev-parse --short HEAD), PostgreSQL $("$PGBIN/postgres" --version | awk '{print $3}'), $CLIENTS clients$([[ -n "${RATE:-}" ]] && echo " at $RATE transactions/s in all" || echo ", each back to back"), $ROWS rows per table; load average at start $LOADAVG_START"
printf '%-6s %7s %-9s %10s %10s %12s %10s %10s %12s %10s %10s\n' shape tables mode "swap ms" "gate ms" "longest ms" "before ms" "floor ms" "floor stmts" "groups ms" "group max"
for shape in $SHAPES; do
    for k in $SIZES; do
        for mode in $MODES; do
            db="${shape}_${k}_$mode"
            printf '%-6s %7s %-9s %10s %10s %12s %10s %10s %12s %10s %10s\n' "$shape" "$k" "$mode" "${SWAP[$db]}" "${GATE[$db]}" "${LONGEST[$db]}" "${BEFORE[$db]}" "${FLOOR[$db]}" "${STMTS[$db]}" "${GROUPS_MS[$db]:--}" "${GROUP_MAX[$db]:--}"
        done
    done
done
