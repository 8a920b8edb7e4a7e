#!/usr/bin/env bash
# The relay's own cost, in instructions: keyshift (and BASELINE_BIN, another build) under
# valgrind's callgrind while `pgbench -S -c 1 -t N` runs through it, simple and prepared.
#
# Unlike benches/proxy.sh's TPS and CPU time, instruction counts do not depend on what else
# the machine is doing: the same binary and workload give the same count within a fraction of
# a percent, so a change of a few percent in the relay's own work shows. They count userspace
# only (the kernel's share of a round trip, about 80 % of the proxy's CPU here, is not in it)
# and include the proxy's start-up, spread over N transactions.
#
# Usage: BASELINE_BIN=path/to/other/keyshift benches/relay_instructions.sh
# Environment: TXNS=20000, MODES="simple prepared", PGBIN as in benches/lib.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

TXNS=${TXNS:-20000}
MODES=${MODES:-simple prepared}
command -v valgrind >/dev/null || die "valgrind not found: apt-get install valgrind"
bench_setup relay-instructions
start_postgres ""
"$PGBIN/pgbench" -h 127.0.0.1 -p "$PG_PORT" -U postgres -i -s 1 postgres >"$TMP/pgbench-init.log" 2>&1 ||
    die "pgbench -i failed"

declare -A IR
TARGETS=(keyshift)
[[ -z ${BASELINE_BIN:-} ]] || TARGETS+=(baseline)
for target in "${TARGETS[@]}"; do
    bin=$KS
    [[ $target == baseline ]] && bin=$BASELINE_BIN
    for mode in $MODES; do
        port=$(free_port)
        admin=$(free_port)
        out=$TMP/$target-$mode.callgrind
        KEYSHIFT_WORKER_THREADS=1 KEYSHIFT_LOG_LEVEL=warn valgrind --tool=callgrind \
            --callgrind-out-file="$out" "$bin" proxy --listen "127.0.0.1:$port" \
            --admin-listen "127.0.0.1:$admin" --upstream "127.0.0.1:$PG_PORT" \
            --upstream-tls disable >"$TMP/$target-$mode.log" 2>&1 &
        pid=$!
        for _ in $(seq 1 120); do
            "$PGBIN/pg_isready" -h 127.0.0.1 -p "$port" -q && break
            sleep 0.5
        done
        log "$target $mode: $TXNS transactions under callgrind"
        "$PGBIN/pgbench" -h 127.0.0.1 -p "$port" -U postgres -S -c 1 -t "$TXNS" -M "$mode" postgres \
            >"$TMP/$target-$mode.pgbench" 2>&1 || die "pgbench through $target failed"
        kill -INT "$pid"
        wait "$pid" || true
        IR[$target/$mode]=$(callgrind_annotate "$out" 2>/dev/null | awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1 }')
    done
done

echo
echo "relay instructions per transaction (callgrind, userspace, pgbench -S -c 1 -t $TXNS)"
echo
if [[ -n ${BASELINE_BIN:-} ]]; then
    echo "| mode | keyshift | baseline | keyshift/baseline |"
    echo "|---|---:|---:|---:|"
    for mode in $MODES; do
        awk -v a="${IR[keyshift/$mode]}" -v b="${IR[baseline/$mode]}" -v n="$TXNS" -v m="$mode" \
            'BEGIN { printf "| %s | %.0f | %.0f | %.3f |\n", m, a / n, b / n, a / b }'
    done
else
    echo "| mode | keyshift |"
    echo "|---|---:|"
    for mode in $MODES; do
        awk -v a="${IR[keyshift/$mode]}" -v n="$TXNS" -v m="$mode" 'BEGIN { printf "| %s | %.0f |\n", m, a / n }'
    done
fi
