#!/usr/bin/env bash
# Passthrough benchmark of the keyshift proxy, side by side with PostgreSQL direct and PgBouncer.
#
# In ONE run, on a throwaway cluster, it measures `pgbench -S -c 8 -j 2` (simple and prepared)
# direct, through keyshift and through PgBouncer in session mode, alternating the order across
# rounds, and prints TPS, the ratios, and the proxies' CPU time per transaction (utime+stime
# from /proc/<pid>/stat). Then keyshift's RSS with 1,000 idle client connections.
# The machine is shared and noisy: only the ratios of one run mean anything, never the bare TPS.
#
# Usage: benches/proxy.sh            (full run: DURATION=15 ROUNDS=2, about 4 minutes)
#        DURATION=5 ROUNDS=1 benches/proxy.sh   (quick look)
# Environment:
#   DURATION=15     seconds per pgbench run
#   ROUNDS=2        rounds; odd rounds go direct, keyshift, pgbouncer; even ones the reverse
#   CLIENTS=8 JOBS=2 SCALE=10
#   MODES="simple prepared"
#   IDLE_CONNS=1000 number of idle connections for the memory measurement (0 skips it)
#   WARMUP=5        seconds of pgbench direct before the first round (caches, CPU frequency)
#   PGBIN=/usr/lib/postgresql/15/bin (else found with pg_config or on PATH)
#   KEYSHIFT_WORKER_THREADS etc. pass through to keyshift as usual.
#   BASELINE_BIN=path/to/another/keyshift   adds a fourth target, "baseline": that binary, run
#                   the same way (plus BASELINE_ARGS), for before/after comparisons in one run.
set -euo pipefail

DURATION=${DURATION:-15}
ROUNDS=${ROUNDS:-2}
CLIENTS=${CLIENTS:-8}
JOBS=${JOBS:-2}
SCALE=${SCALE:-10}
MODES=${MODES:-simple prepared}
IDLE_CONNS=${IDLE_CONNS:-1000}
WARMUP=${WARMUP:-5}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

log() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

# --- tools --------------------------------------------------------------------------------
if [[ -z ${PGBIN:-} ]]; then
    if [[ -x /usr/lib/postgresql/15/bin/postgres ]]; then
        PGBIN=/usr/lib/postgresql/15/bin
    elif command -v pg_config >/dev/null && [[ -x "$(pg_config --bindir)/postgres" ]]; then
        PGBIN=$(pg_config --bindir)
    else
        PGBIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
    fi
fi
for t in postgres initdb pg_ctl pgbench psql; do
    [[ -x $PGBIN/$t ]] || die "$PGBIN/$t not found: install PostgreSQL server binaries (apt-get install postgresql) or set PGBIN"
done
command -v python3 >/dev/null || die "python3 is needed for the idle-connection measurement"
if ! command -v pgbouncer >/dev/null && [[ ! -x /usr/sbin/pgbouncer ]]; then
    log "installing pgbouncer from the distribution's packages"
    if [[ $(id -u) -eq 0 ]]; then SUDO=; else SUDO=sudo; fi
    $SUDO apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq pgbouncer >&2
fi
PGBOUNCER=$(command -v pgbouncer || echo /usr/sbin/pgbouncer)

# PostgreSQL and PgBouncer refuse to run as root: run them as the postgres OS user then.
if [[ $(id -u) -eq 0 ]]; then
    id postgres >/dev/null 2>&1 || useradd --system --no-create-home postgres
    as_pg() { runuser -u postgres -- "$@"; }
else
    as_pg() { "$@"; }
fi

# 1,000 idle clients plus as many upstream connections: raise the descriptor limit.
ulimit -n 8192 2>/dev/null || ulimit -n "$(ulimit -Hn)"

log "building keyshift (release)"
cargo build --release --quiet
KEYSHIFT=$ROOT/target/release/keyshift

# --- throwaway cluster, keyshift, pgbouncer -------------------------------------------------
TMP=$(mktemp -d -t keyshift-bench.XXXXXX)
chmod 755 "$TMP"
KS_PID=
BL_PID=
PGB_PID=
cleanup() {
    set +e
    [[ -n $KS_PID ]] && kill "$KS_PID" 2>/dev/null && wait "$KS_PID" 2>/dev/null
    [[ -n $BL_PID ]] && kill "$BL_PID" 2>/dev/null && wait "$BL_PID" 2>/dev/null
    [[ -n $PGB_PID ]] && kill "$PGB_PID" 2>/dev/null
    if [[ -f $TMP/data/postmaster.pid ]]; then
        as_pg "$PGBIN/pg_ctl" -D "$TMP/data" -m immediate -w stop >/dev/null 2>&1
    fi
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
wait_port() { # port, what, pid-to-watch
    for _ in $(seq 1 200); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        if [[ -n ${3:-} ]] && ! kill -0 "$3" 2>/dev/null; then die "$2 exited during startup"; fi
        sleep 0.05
    done
    die "$2 did not listen on port $1"
}

PG_PORT=$(free_port)
KS_PORT=$(free_port)
KS_ADMIN_PORT=$(free_port)
PGB_PORT=$(free_port)
BL_PORT=$(free_port)
BL_ADMIN_PORT=$(free_port)
[[ $(id -u) -eq 0 ]] && chown postgres "$TMP"

log "starting PostgreSQL on port $PG_PORT"
as_pg "$PGBIN/initdb" -D "$TMP/data" -U postgres -A trust --no-sync >"$TMP/initdb.log" 2>&1 ||
    { cat "$TMP/initdb.log" >&2; die "initdb failed"; }
as_pg "$PGBIN/pg_ctl" -D "$TMP/data" -l "$TMP/postgres.log" -w -t 60 \
    -o "-p $PG_PORT -k $TMP -c listen_addresses=127.0.0.1 -c max_connections=$((IDLE_CONNS > 1000 ? IDLE_CONNS + 100 : 1100)) \
        -c shared_buffers=256MB -c fsync=off -c synchronous_commit=off -c full_page_writes=off" \
    start >/dev/null || { cat "$TMP/postgres.log" >&2; die "PostgreSQL did not start"; }

log "pgbench -i -s $SCALE"
"$PGBIN/pgbench" -i -q -s "$SCALE" -h 127.0.0.1 -p "$PG_PORT" -U postgres postgres >"$TMP/init.log" 2>&1 ||
    { cat "$TMP/init.log" >&2; die "pgbench -i failed"; }

log "starting keyshift on port $KS_PORT"
KEYSHIFT_LOG_LEVEL=${KEYSHIFT_LOG_LEVEL:-warn} "$KEYSHIFT" proxy \
    --listen "127.0.0.1:$KS_PORT" --admin-listen "127.0.0.1:$KS_ADMIN_PORT" \
    --upstream "127.0.0.1:$PG_PORT" --upstream-tls disable \
    --max-client-connections $((IDLE_CONNS + 100)) >"$TMP/keyshift.log" 2>&1 &
KS_PID=$!
wait_port "$KS_PORT" keyshift "$KS_PID"

TARGETS=(direct keyshift pgbouncer)
if [[ -n ${BASELINE_BIN:-} ]]; then
    [[ -x $BASELINE_BIN ]] || die "BASELINE_BIN=$BASELINE_BIN is not an executable"
    log "starting baseline keyshift ($BASELINE_BIN) on port $BL_PORT"
    # shellcheck disable=SC2086 # BASELINE_ARGS is a list of flags
    KEYSHIFT_LOG_LEVEL=${KEYSHIFT_LOG_LEVEL:-warn} "$BASELINE_BIN" proxy \
        --listen "127.0.0.1:$BL_PORT" --admin-listen "127.0.0.1:$BL_ADMIN_PORT" \
        --upstream "127.0.0.1:$PG_PORT" --upstream-tls disable \
        --max-client-connections $((IDLE_CONNS + 100)) ${BASELINE_ARGS:-} >"$TMP/baseline.log" 2>&1 &
    BL_PID=$!
    wait_port "$BL_PORT" "baseline keyshift" "$BL_PID"
    TARGETS+=(baseline)
fi

log "starting PgBouncer (session mode) on port $PGB_PORT"
cat >"$TMP/pgbouncer.ini" <<EOF
[databases]
postgres = host=127.0.0.1 port=$PG_PORT dbname=postgres user=postgres

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $PGB_PORT
unix_socket_dir =
auth_type = any
pool_mode = session
default_pool_size = $((CLIENTS + 4))
max_client_conn = $((CLIENTS * 4 + 100))
logfile = $TMP/pgbouncer.log
pidfile = $TMP/pgbouncer.pid
EOF
[[ $(id -u) -eq 0 ]] && chown postgres "$TMP/pgbouncer.ini"
as_pg "$PGBOUNCER" -d "$TMP/pgbouncer.ini" || die "pgbouncer did not start"
for _ in $(seq 1 100); do [[ -s $TMP/pgbouncer.pid ]] && break; sleep 0.05; done
PGB_PID=$(cat "$TMP/pgbouncer.pid")
wait_port "$PGB_PORT" pgbouncer "$PGB_PID"

port_of() {
    case $1 in
    direct) echo "$PG_PORT" ;;
    keyshift) echo "$KS_PORT" ;;
    baseline) echo "$BL_PORT" ;;
    pgbouncer) echo "$PGB_PORT" ;;
    esac
}
pid_of() {
    case $1 in
    keyshift) echo "$KS_PID" ;;
    baseline) echo "$BL_PID" ;;
    pgbouncer) echo "$PGB_PID" ;;
    *) echo "" ;;
    esac
}
# "utime stime" of a process, in clock ticks (fields 14 and 15 of /proc/PID/stat; the
# command name in field 2 is in parentheses and may hold spaces, so cut after the last ')').
cpu_ticks() {
    local stat
    stat=$(<"/proc/$1/stat")
    stat=${stat##*) }
    awk '{ print $12, $13 }' <<<"$stat"
}
CLK_TCK=$(getconf CLK_TCK)

# --- pgbench rounds -----------------------------------------------------------------------
declare -A TPS_SUM TXN_SUM UTICK_SUM STICK_SUM
REVERSED=()
for ((i = ${#TARGETS[@]} - 1; i >= 0; i--)); do REVERSED+=("${TARGETS[i]}"); done

run_pgbench() { # target mode seconds -> "tps txns"
    local out
    out=$("$PGBIN/pgbench" -n -S -M "$2" -c "$CLIENTS" -j "$JOBS" -T "$3" \
        -h 127.0.0.1 -p "$(port_of "$1")" -U postgres postgres 2>&1) ||
        { echo "$out" >&2; die "pgbench through $1 ($2) failed"; }
    local tps txns failed
    tps=$(sed -n 's/^tps = \([0-9.]*\) (without initial connection time)$/\1/p' <<<"$out")
    txns=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' <<<"$out")
    failed=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' <<<"$out")
    [[ -n $tps && -n $txns ]] || { echo "$out" >&2; die "could not parse pgbench output"; }
    [[ -z $failed || $failed == 0 ]] || { echo "$out" >&2; die "$failed failed transactions through $1"; }
    echo "$tps $txns"
}

if ((WARMUP > 0)); then
    log "warm-up: ${WARMUP}s direct"
    run_pgbench direct simple "$WARMUP" >/dev/null
fi

for ((r = 1; r <= ROUNDS; r++)); do
    if ((r % 2 == 1)); then order=("${TARGETS[@]}"); else order=("${REVERSED[@]}"); fi
    for mode in $MODES; do
        for t in "${order[@]}"; do
            pid=$(pid_of "$t")
            u0=0 s0=0 u1=0 s1=0
            [[ -n $pid ]] && read -r u0 s0 < <(cpu_ticks "$pid")
            read -r tps txns < <(run_pgbench "$t" "$mode" "$DURATION")
            [[ -n $pid ]] && read -r u1 s1 < <(cpu_ticks "$pid")
            key="$t/$mode"
            TPS_SUM[$key]=$(awk -v a="${TPS_SUM[$key]:-0}" -v b="$tps" 'BEGIN { print a + b }')
            TXN_SUM[$key]=$((${TXN_SUM[$key]:-0} + txns))
            UTICK_SUM[$key]=$((${UTICK_SUM[$key]:-0} + u1 - u0))
            STICK_SUM[$key]=$((${STICK_SUM[$key]:-0} + s1 - s0))
            cpu=""
            [[ -n $pid ]] && cpu=$(awk -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v n="$txns" -v hz="$CLK_TCK" \
                'BEGIN { printf " cpu=%.2fus/txn (user %.2f, sys %.2f)", (u + s) * 1e6 / hz / n, u * 1e6 / hz / n, s * 1e6 / hz / n }')
            log "round $r $mode $(printf '%-9s' "$t") tps=$tps txns=$txns$cpu"
        done
    done
done

# --- idle connections ---------------------------------------------------------------------
IDLE_RESULT=
BL_IDLE_RESULT=
if ((IDLE_CONNS > 0)); then
    log "opening $IDLE_CONNS idle connections through keyshift"
    IDLE_RESULT=$(python3 "$ROOT/benches/idle_conns.py" 127.0.0.1 "$KS_PORT" postgres postgres \
        "$IDLE_CONNS" "$KS_PID") || die "idle connection measurement failed"
    log "$IDLE_RESULT"
    if [[ -n $BL_PID ]]; then
        # The same for the baseline, once keyshift's connections are closed (max_connections).
        sleep 2
        log "opening $IDLE_CONNS idle connections through the baseline"
        BL_IDLE_RESULT=$(python3 "$ROOT/benches/idle_conns.py" 127.0.0.1 "$BL_PORT" postgres postgres \
            "$IDLE_CONNS" "$BL_PID") || die "idle connection measurement (baseline) failed"
        log "$BL_IDLE_RESULT"
    fi
fi

# --- report -------------------------------------------------------------------------------
mean() { awk -v s="${TPS_SUM[$1]}" -v n="$ROUNDS" 'BEGIN { printf "%.0f", s / n }'; }
ratio() { awk -v a="${TPS_SUM[$1]}" -v b="${TPS_SUM[$2]}" 'BEGIN { printf "%.2f", a / b }'; }
# "total (user + sys)" CPU time per transaction, in µs.
cpu_us() {
    awk -v u="${UTICK_SUM[$1]}" -v s="${STICK_SUM[$1]}" -v n="${TXN_SUM[$1]}" -v hz="$CLK_TCK" \
        'BEGIN { printf "%.1f (%.1f + %.1f)", (u + s) * 1e6 / hz / n, u * 1e6 / hz / n, s * 1e6 / hz / n }'
}

echo
echo "keyshift passthrough benchmark: pgbench -S -c $CLIENTS -j $JOBS -T $DURATION, scale $SCALE, $ROUNDS round(s), order alternated"
echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'); $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "PostgreSQL $("$PGBIN/postgres" --version | awk '{print $3}'), $("$PGBOUNCER" --version | head -1)"
echo
echo "| mode | direct TPS | keyshift TPS | PgBouncer TPS | keyshift/direct | PgBouncer/direct | keyshift/PgBouncer | keyshift CPU µs/txn (user + sys) | PgBouncer CPU µs/txn (user + sys) |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
for mode in $MODES; do
    echo "| $mode | $(mean direct/$mode) | $(mean keyshift/$mode) | $(mean pgbouncer/$mode) \
| $(ratio keyshift/$mode direct/$mode) | $(ratio pgbouncer/$mode direct/$mode) \
| $(ratio keyshift/$mode pgbouncer/$mode) | $(cpu_us keyshift/$mode) | $(cpu_us pgbouncer/$mode) |"
done
if [[ -n $BL_PID ]]; then
    echo
    echo "baseline: $BASELINE_BIN ${BASELINE_ARGS:-}"
    echo
    echo "| mode | baseline TPS | keyshift TPS | keyshift/baseline | baseline/direct | baseline/PgBouncer | baseline CPU µs/txn (user + sys) |"
    echo "|---|---:|---:|---:|---:|---:|---:|"
    for mode in $MODES; do
        echo "| $mode | $(mean baseline/$mode) | $(mean keyshift/$mode) | $(ratio keyshift/$mode baseline/$mode) \
| $(ratio baseline/$mode direct/$mode) | $(ratio baseline/$mode pgbouncer/$mode) | $(cpu_us baseline/$mode) |"
    done
fi
if [[ -n $IDLE_RESULT ]]; then
    echo
    echo "idle connections through keyshift: $IDLE_RESULT"
    [[ -z $BL_IDLE_RESULT ]] || echo "idle connections through the baseline: $BL_IDLE_RESULT"
fi
echo
echo "targets: keyshift/PgBouncer >= 1.10, keyshift CPU <= 6 µs/txn, <= 64 KiB per idle connection"
