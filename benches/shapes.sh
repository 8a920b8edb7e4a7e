#!/usr/bin/env bash
# Shapes benchmark: a translated session (shape ≠ physical, pointed at keyshift's views) against
# an untranslated one (the physical shape), through ONE keyshift proxy, side by side in one run.
#
# The database: `pgbench -i --foreign-keys -s SCALE`, migrated by keyshift with
# `--table pgbench_branches` (expand, then backfill, which hardens): pgbench_branches.bid moves
# to uuid, so pgbench_accounts, pgbench_tellers and pgbench_history are migrated children (their
# `bid` is an integer in the integer shape, a uuid in the uuid shape) and every statement that
# names them is translated for a session of the other shape. `aid` and `tid` stay integers, so
# pgbench's own scripts run unchanged in both shapes. (Migrating every table, the default plan,
# would make `aid` a uuid in the uuid shape, and `pgbench -S` could not run there.)
#
# Workloads, each with -M simple and -M prepared, CLIENTS clients:
#   select   pgbench's built-in -S (SELECT abalance FROM pgbench_accounts WHERE aid = :aid):
#            it names no column whose name depends on the shape, so since 2026-12-01 keyshift
#            runs it on the table itself in both variants (translate.rs, same_on_the_tables)
#   select_key  the same with the migrated column: SELECT abalance, bid FROM pgbench_accounts
#            WHERE aid = :aid (`bid` is an integer or a uuid by shape): read through the view
#            with -M prepared; with -M simple, since 2026-12-03, on the table with `bid` under
#            its physical name (translate.rs, on_the_table_renamed)
#   inserts  4 autocommit INSERTs into the child pgbench_history per transaction, the same text
#            in both shapes: INSERT INTO pgbench_history (tid, bid, aid, delta, mtime)
#            SELECT :tid, bid, :aid, :delta, CURRENT_TIMESTAMP FROM pgbench_tellers WHERE tid = :tid
#            (`bid` is whatever the session's shape says; keyshift's dual-write fills the twin)
# Variants, interleaved round by round (A B, then B A, …), medians reported:
#   physical    keyshift.shape = the physical shape (untranslated)
#   translated  keyshift.shape = the other shape (PGOPTIONS='-c keyshift.shape=…')
#   and, for select in DIRECT_PHASES, PostgreSQL directly with the same query on the table and on
#   keyshift's view (direct-table, direct-view): what the view costs PostgreSQL itself, no proxy.
# Phases: `hardened` (physical integer, uuid translated), then `keyshift cutover` and
# `cut_over` (physical uuid, integer translated).
# Per variant: TPS, the proxy's CPU per transaction (utime + stime of its /proc/<pid>/stat over
# the transactions pgbench reported), and for translated runs keyshift's own translation time per
# statement (keyshift_translation_seconds sum/count over the run). Checks afterwards that every
# row inserted, in either shape, has its twin equal to its parent's.
# Target (DESIGN.md): translated ≥ 0.9 × untranslated.
#
# Usage: benches/shapes.sh                       (about 8 minutes on 2 cores)
#        WORKLOADS_cut_over="select inserts" DIRECT_PHASES="hardened cut_over" benches/shapes.sh
#                                                (everything: about 11 minutes)
#        DURATION=3 ROUNDS=1 benches/shapes.sh   (quick look)
# Environment: DURATION=8 (seconds per pgbench run), ROUNDS=3, CLIENTS=8, JOBS=2, SCALE=10,
#              MODES="simple prepared", PHASES="hardened cut_over",
#              WORKLOADS_hardened="select inserts", WORKLOADS_cut_over="select",
#              DIRECT_PHASES="hardened" (phases with the direct-table/direct-view runs; "" for
#              none), WARMUP=3 (seconds of each variant before the rounds), PGBIN, KEEP_TMP=1.
# Needs: PostgreSQL's server binaries and pgbench, python3, curl, cargo; run as root, it runs
# PostgreSQL as the `postgres` OS user.
set -euo pipefail

DURATION=${DURATION:-8}
ROUNDS=${ROUNDS:-3}
CLIENTS=${CLIENTS:-8}
JOBS=${JOBS:-2}
SCALE=${SCALE:-10}
MODES=${MODES:-simple prepared}
PHASES=${PHASES:-hardened cut_over}
WORKLOADS_hardened=${WORKLOADS_hardened:-select inserts}
WORKLOADS_cut_over=${WORKLOADS_cut_over:-select}
DIRECT_PHASES=${DIRECT_PHASES-hardened}
WARMUP=${WARMUP:-3}

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
command -v curl >/dev/null || die "curl is needed to read the proxy's /v1/status and /metrics"
UPTIME_START=$(uptime)
bench_setup shapes
start_postgres "-c max_connections=100 -c shared_buffers=256MB -c fsync=off -c synchronous_commit=off -c full_page_writes=off"

log "pgbench -i --foreign-keys -s $SCALE"
"$PGBIN/pgbench" -i -q --foreign-keys -s "$SCALE" -h 127.0.0.1 -p "$PG_PORT" -U postgres postgres >"$TMP/init.log" 2>&1 ||
    { cat "$TMP/init.log" >&2; die "pgbench -i failed"; }
DB_URL=$(url postgres)
"$KS" plan --database-url "$DB_URL" --table pgbench_branches >"$TMP/plan.txt" 2>&1 || { cat "$TMP/plan.txt" >&2; die "keyshift plan"; }
log "keyshift expand --table pgbench_branches"
"$KS" expand --database-url "$DB_URL" --table pgbench_branches >"$TMP/expand.log" 2>&1 || { cat "$TMP/expand.log" >&2; die "expand"; }
log "keyshift backfill (fills, catches up, hardens)"
"$KS" backfill --database-url "$DB_URL" >"$TMP/backfill.log" 2>&1 || { cat "$TMP/backfill.log" >&2; die "backfill"; }
# The backfill rewrote every row of pgbench_accounts: vacuum now, not during a measurement.
"${PSQL[@]}" -d postgres -c "VACUUM ANALYZE" >/dev/null

KS_PORT=$(free_port)
KS_ADMIN=$(free_port)
KEYSHIFT_LOG_LEVEL=${KEYSHIFT_LOG_LEVEL:-warn} "$KS" proxy --listen "127.0.0.1:$KS_PORT" --admin-listen "127.0.0.1:$KS_ADMIN" \
    --upstream "127.0.0.1:$PG_PORT" --upstream-tls disable --database-url "$DB_URL" >"$TMP/proxy.log" 2>&1 &
KS_PID=$!
PIDS+=("$KS_PID")
wait_port "$KS_PORT"
status() { curl -fs "127.0.0.1:$KS_ADMIN/v1/status"; }
wait_rules() { # the proxy applies rules at least this version, dual-write on
    for _ in $(seq 1 200); do
        local s
        s=$(status || true)
        if grep -q '"dual_write":true' <<<"$s" && (($(sed -n 's/.*"rules_version":\([0-9]*\).*/\1/p' <<<"$s") >= $1)); then
            return 0
        fi
        sleep 0.1
    done
    die "the proxy did not load rules version $1: $(status)"
}
rules_version() { "${PSQL[@]}" -At -d postgres -c "SELECT rules_version FROM keyshift.migration"; }
wait_rules "$(rules_version)"

cat >"$TMP/inserts.sql" <<'EOF'
\set aid1 random(1, 100000 * :scale)
\set aid2 random(1, 100000 * :scale)
\set tid1 random(1, 10 * :scale)
\set tid2 random(1, 10 * :scale)
\set delta random(-5000, 5000)
INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) SELECT :tid1, bid, :aid1, :delta, CURRENT_TIMESTAMP FROM pgbench_tellers WHERE tid = :tid1;
INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) SELECT :tid2, bid, :aid2, :delta, CURRENT_TIMESTAMP FROM pgbench_tellers WHERE tid = :tid2;
INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) SELECT :tid1, bid, :aid2, :delta, CURRENT_TIMESTAMP FROM pgbench_tellers WHERE tid = :tid1;
INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) SELECT :tid2, bid, :aid1, :delta, CURRENT_TIMESTAMP FROM pgbench_tellers WHERE tid = :tid2;
EOF
printf '\\set aid random(1, 100000 * :scale)\nSELECT abalance, bid FROM pgbench_accounts WHERE aid = :aid;\n' >"$TMP/select_key.sql"
# pgbench -S, as text, for the direct runs on the table and on the translated shape's view.
select_script() { # relation
    printf '\\set aid random(1, 100000 * :scale)\nSELECT abalance FROM %s WHERE aid = :aid;\n' "$1"
}

# "utime stime" of the proxy, in clock ticks (fields 14 and 15 of /proc/PID/stat, counted
# after the last ')' since the command name may hold spaces).
cpu_ticks() {
    local stat
    stat=$(<"/proc/$KS_PID/stat")
    stat=${stat##*) }
    awk '{ print $12 + $13 }' <<<"$stat"
}
CLK_TCK=$(getconf CLK_TCK)
# "sum count" of keyshift_translation_seconds.
translation() {
    curl -fs "127.0.0.1:$KS_ADMIN/metrics" |
        awk '/^keyshift_translation_seconds_sum/ { s = $2 } /^keyshift_translation_seconds_count/ { c = $2 } END { print s + 0, c + 0 }'
}

# One pgbench run -> "tps txns cpu_us_per_txn translation_us_per_statement" ("-" where not measured).
run() { # phase workload mode variant seconds
    local phase=$1 workload=$2 mode=$3 variant=$4 secs=$5 port=$KS_PORT shape args=() out
    local physical=integer other=uuid
    [[ $phase == cut_over ]] && physical=uuid other=integer
    case $variant in
    physical) shape=$physical ;;
    translated) shape=$other ;;
    direct-*) port=$PG_PORT shape= ;;
    esac
    case $workload/$variant in
    select/direct-table) select_script pgbench_accounts >"$TMP/direct.sql" && args=(-f "$TMP/direct.sql") ;;
    select/direct-view) select_script "keyshift_${other}_public.pgbench_accounts" >"$TMP/direct.sql" && args=(-f "$TMP/direct.sql") ;;
    select/*) args=(-S) ;;
    select_key/*) args=(-f "$TMP/select_key.sql") ;;
    inserts/*) args=(-f "$TMP/inserts.sql") ;;
    esac
    local c0 c1 t0 t1
    c0=$(cpu_ticks)
    t0=$(translation)
    out=$(PGOPTIONS=${shape:+"-c keyshift.shape=$shape"} "$PGBIN/pgbench" -n "${args[@]}" -M "$mode" -c "$CLIENTS" -j "$JOBS" \
        -T "$secs" -h 127.0.0.1 -p "$port" -U postgres postgres 2>&1) ||
        { echo "$out" >&2; die "pgbench $phase $workload $mode $variant failed"; }
    c1=$(cpu_ticks)
    t1=$(translation)
    local tps txns failed
    tps=$(sed -n 's/^tps = \([0-9.]*\) (without initial connection time)$/\1/p' <<<"$out")
    txns=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' <<<"$out")
    failed=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' <<<"$out")
    [[ -n $tps && -n $txns ]] || { echo "$out" >&2; die "could not parse pgbench's output"; }
    [[ ${failed:-0} == 0 ]] || { echo "$out" >&2; die "$phase $workload $mode $variant: $failed failed transactions"; }
    awk -v tps="$tps" -v n="$txns" -v c=$((c1 - c0)) -v hz="$CLK_TCK" -v t0="$t0" -v t1="$t1" -v direct=$([[ $port == "$PG_PORT" ]] && echo 1 || echo 0) 'BEGIN {
        split(t0, a, " "); split(t1, b, " ")
        cpu = direct ? "-" : sprintf("%.1f", c * 1e6 / hz / n)
        tr = (b[2] > a[2]) ? sprintf("%.2f", (b[1] - a[1]) * 1e6 / (b[2] - a[2])) : "-"
        printf "%.0f %d %s %s\n", tps, n, cpu, tr }'
}

median() { # [printf format] < values ("-" ignored)
    tr ' ' '\n' | { grep -v '^-\?$' || true; } | sort -g | awk -v f="${1:-%.0f}" '{ v[NR] = $1 }
        END { if (NR == 0) print "-"; else printf f "\n", (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
declare -A TPS CPU TRL
measure_phase() { # phase
    local phase=$1 workloads_var=WORKLOADS_$1
    for workload in ${!workloads_var}; do
        local variants=(physical translated)
        [[ $workload == select && " $DIRECT_PHASES " == *" $phase "* ]] && variants+=(direct-table direct-view)
        for mode in $MODES; do
            if ((WARMUP > 0)); then
                for v in "${variants[@]}"; do run "$phase" "$workload" "$mode" "$v" "$WARMUP" >/dev/null; done
            fi
            for ((r = 1; r <= ROUNDS; r++)); do
                local order=("${variants[@]}")
                if ((r % 2 == 0)); then order=(); for ((i = ${#variants[@]} - 1; i >= 0; i--)); do order+=("${variants[i]}"); done; fi
                for v in "${order[@]}"; do
                    local out
                    out=$(run "$phase" "$workload" "$mode" "$v" "$DURATION")
                    read -r tps txns cpu trl <<<"$out"
                    local k="$phase/$workload/$mode/$v"
                    TPS[$k]+="$tps "
                    CPU[$k]+="$cpu "
                    TRL[$k]+="$trl "
                    log "$phase $workload $mode round $r $(printf '%-11s' "$v") tps=$tps cpu=${cpu}us/txn translation=${trl}us/stmt"
                done
            done
        done
    done
}

# Every history row inserted, in either shape, has the twin its parent says (read through the
# integer shape's views, whose names are the same in every phase).
check_twins() {
    local bad
    bad=$("${PSQL[@]}" -At -d postgres -c "SELECT count(*) FROM keyshift_integer_public.pgbench_history h
        LEFT JOIN keyshift_integer_public.pgbench_branches b ON b.bid = h.bid WHERE h.bid_uuid IS DISTINCT FROM b.bid_uuid")
    [[ $bad == 0 ]] || die "$bad history rows have a wrong or missing twin"
}

for phase in $PHASES; do
    if [[ $phase == cut_over ]]; then
        # Let the proxy write a heartbeat and acknowledge the rules before cutover looks.
        sleep 3
        log "keyshift cutover"
        "$KS" cutover --database-url "$DB_URL" >"$TMP/cutover.log" 2>&1 || { cat "$TMP/cutover.log" >&2; die "cutover"; }
        wait_rules "$(rules_version)"
        "${PSQL[@]}" -d postgres -c "VACUUM ANALYZE" >/dev/null
    fi
    got=$("${PSQL[@]}" -At -d postgres -c "SELECT phase FROM keyshift.migration")
    [[ $got == "$phase" ]] || die "phase is $got, expected $phase"
    measure_phase "$phase"
    check_twins
done
HISTORY_ROWS=$("${PSQL[@]}" -At -d postgres -c "SELECT count(*) FROM pgbench_history")
UPTIME_END=$(uptime)

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "-" || b == "-" || b == 0) print "-"; else printf "%.2f", a / b }'; }
# The ratio of each round's pair (translated / physical, measured next to each other).
pair_ratios() { # key-translated key-physical
    paste -d' ' <(tr ' ' '\n' <<<"${TPS[$1]}" | grep .) <(tr ' ' '\n' <<<"${TPS[$2]}" | grep .) |
        awk '{ printf "%s%.2f", (NR > 1 ? ", " : ""), $1 / $2 }'
}

echo
echo "keyshift shapes benchmark: pgbench -c $CLIENTS -j $JOBS -T $DURATION, scale $SCALE, $ROUNDS round(s) per variant, order alternated, medians"
echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'); PostgreSQL $("$PGBIN/postgres" --version | awk '{print $3}'); keyshift $(git -C "$ROOT" rev-parse --short HEAD)"
echo "run: $(date -u '+%Y-%m-%d') UTC; uptime before: $UPTIME_START"
echo "                         after:  $UPTIME_END"
echo "migration: --table pgbench_branches (children: pgbench_accounts, pgbench_tellers, pgbench_history); $HISTORY_ROWS history rows inserted, twins checked"
echo
echo "| phase (translated shape) | workload | mode | untranslated TPS | translated TPS | translated/untranslated | per-round pairs | CPU µs/txn untranslated | CPU µs/txn translated | translation µs/stmt | direct table TPS | direct view TPS | view/table (PostgreSQL alone) |"
echo "|---|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"
for phase in $PHASES; do
    workloads_var=WORKLOADS_$phase
    tshape=uuid
    [[ $phase == cut_over ]] && tshape=integer
    for workload in ${!workloads_var}; do
        for mode in $MODES; do
            k=$phase/$workload/$mode
            p=$(median <<<"${TPS[$k/physical]}")
            t=$(median <<<"${TPS[$k/translated]}")
            dt=$(median <<<"${TPS[$k/direct-table]:-}")
            dv=$(median <<<"${TPS[$k/direct-view]:-}")
            echo "| $phase ($tshape) | $workload | $mode | $p | $t | **$(ratio "$t" "$p")** | $(pair_ratios "$k/translated" "$k/physical") \
| $(median %.1f <<<"${CPU[$k/physical]}") | $(median %.1f <<<"${CPU[$k/translated]}") | $(median %.2f <<<"${TRL[$k/translated]}") \
| $dt | $dv | $(ratio "$dv" "$dt") |"
        done
    done
done
echo
echo "target: translated/untranslated >= 0.90"
