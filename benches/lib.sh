# Shared by the benchmark scripts (sourced, not run): logging, PostgreSQL's binaries, a
# throwaway cluster in a temp dir, ports, and a cleanup that stops whatever was started.
#
#   source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
#   bench_setup <temp-name>          # cd to the repository, find PGBIN, build keyshift, make $TMP
#   start_postgres "-c name=value …" # throwaway cluster on $PG_PORT; sets PSQL and url()
#   PIDS+=($!)                       # background processes the cleanup must stop
#
# Environment: PGBIN (else the newest /usr/lib/postgresql/*/bin), KEEP_TMP=1 keeps $TMP.
# PG_WRAP=(taskset -c 1) runs the postmaster (and every backend it forks) under a wrapper.

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
log() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

if [[ $(id -u) -eq 0 ]]; then
    as_pg() { runuser -u postgres -- "$@"; }
else
    as_pg() { "$@"; }
fi

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
    for _ in $(seq 1 200); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.05
    done
    die "nothing listens on port $1"
}

bench_setup() { # temp-name
    cd "$ROOT"
    if [[ -z ${PGBIN:-} ]]; then
        PGBIN=$(ls -d /usr/lib/postgresql/15/bin 2>/dev/null || ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
    fi
    for t in postgres initdb pg_ctl pgbench psql; do
        [[ -x $PGBIN/$t ]] || die "$PGBIN/$t not found: install PostgreSQL server binaries or set PGBIN"
    done
    command -v python3 >/dev/null || die "python3 is needed"
    log "building keyshift (release)"
    cargo build --release --quiet
    KS=$ROOT/target/release/keyshift
    LOADAVG_START=$(cut -d" " -f1-3 /proc/loadavg)
    TMP=$(mktemp -d -t "keyshift-$1.XXXXXX")
    chmod 755 "$TMP"
    if [[ $(id -u) -eq 0 ]]; then chown postgres "$TMP"; fi
    PIDS=()
    trap bench_cleanup EXIT
    trap 'exit 130' INT TERM
}

bench_cleanup() {
    set +e
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
    [[ -f $TMP/data/postmaster.pid ]] && as_pg "$PGBIN/pg_ctl" -D "$TMP/data" -m immediate -w stop >/dev/null 2>&1
    if [[ -n ${KEEP_TMP:-} ]]; then log "kept $TMP"; else rm -rf "$TMP"; fi
}

start_postgres() { # extra postmaster options
    PG_PORT=$(free_port)
    log "starting PostgreSQL on port $PG_PORT"
    as_pg "$PGBIN/initdb" -D "$TMP/data" -U postgres -A trust --no-sync >"$TMP/initdb.log" 2>&1 || die "initdb failed"
    local wrap=(${PG_WRAP[@]+"${PG_WRAP[@]}"})
    if [[ $(id -u) -eq 0 ]]; then wrap+=(runuser -u postgres --); fi
    ${wrap[@]+"${wrap[@]}"} "$PGBIN/pg_ctl" -D "$TMP/data" -l "$TMP/postgres.log" -w -t 60 \
        -o "-p $PG_PORT -k $TMP -c listen_addresses=127.0.0.1 $1" \
        start >/dev/null || die "PostgreSQL did not start"
    PSQL=("$PGBIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -U postgres)
}
url() { echo "postgres://postgres@127.0.0.1:$PG_PORT/$1"; }
