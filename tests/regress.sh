#!/usr/bin/env bash
# PostgreSQL 15's own regression suite (src/test/regress, all 217 tests of parallel_schedule, run
# serially) as a test of keyshift's transparency: the suite runs directly against PostgreSQL,
# then through `keyshift proxy` three ways, each time on an identical fresh copy of one prepared
# cluster, and every test's output through keyshift must be byte for byte the output of the
# direct run (not PostgreSQL's expected files: the comparison is run against run).
#
#   direct  pg_regress → PostgreSQL
#   relay   pg_regress → keyshift proxy (no --database-url: a pure relay) → PostgreSQL
#   link    the same with --database-url: the proxy's link to a migration of two tables p and c
#           (expanded, so it dual-writes) is on, and every statement goes through the rewriter
#   strict  the same with --strict true
#
# The migration's tables are keyshift_regress.p (integer key) and keyshift_regress.c (integer
# key, FK p_id → p): their own schema, so the suite's own tables named p and c (inherit, join,
# alter_table create public.c and public.p) do not collide with them, and the proxy keeps the
# default search_path ["public"], which is what the suite's sessions really resolve through.
# The names stay `p` and `c` on purpose: the suite writes `c` and `p` as tables, columns,
# cursors, aliases and inside literals hundreds of times, so the rewriter's prescan fires on
# all of those and must still leave them alone. Every run, the direct one included, starts from
# the same data directory (the migration expanded in it), so the proxy is the only difference.
#
# Usage, as root on Debian 12 (it installs what is missing; as another user it only says what):
#   tests/regress.sh                    # direct, relay, link, strict: 6-8 minutes on 2 cores
#   MODES="direct strict" tests/regress.sh
#   REGRESS_TESTS="test_setup create_index inherit" tests/regress.sh   # a serial list instead
# Environment:
#   MODES="direct relay link strict"  which runs; direct is always run (it is the reference)
#   DIRECT_TWICE=1       run the direct suite twice and fail on any test (outside EXCLUDE below)
#                        whose output differs between the two: the nondeterminism check
#   REGRESS_TESTS="..."  run these tests, in this order, instead of parallel_schedule
#   REGRESS_SRC=DIR      an unpacked PostgreSQL 15 source tree to take src/test/regress and
#                        contrib/spi from, instead of Debian's source package
#   REGRESS_CACHE=DIR    where the source package is kept between runs (target/regress-cache)
#   OUT=DIR              results, diffs and logs (target/regress); printed at the end
#   KEYSHIFT_BIN=PATH    this keyshift binary instead of `cargo build --release` (CI passes the
#                        debug one `cargo test` has just built)
#   PGBIN=/usr/lib/postgresql/15/bin   KEEP_TMP=1 keeps the clusters' temp dir
# Exit status: 0 when every mode matches the direct run, 1 on any difference or failure.
# It lives in tests/, not benches/: it is a pass/fail test whose times are only reported, and
# the line to call it from .ci/run is in docs/testing.md (with its results and timings).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../benches/lib.sh" # log, die, as_pg, free_port, wait_port
cd "$ROOT"

MODES=${MODES:-direct relay link strict}
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
REGRESS_CACHE=${REGRESS_CACHE:-$ROOT/target/regress-cache}
OUT=${OUT:-$ROOT/target/regress}
SCRIPT_START=$(date +%s)

# Tests left out of the comparison, each with the reason. They still run (later tests depend on
# the objects they create); their diffs are printed, marked excluded, and do not fail the run.
# Found by running the direct suite twice (DIRECT_TWICE=1) on identical clusters; add a test
# here only with such evidence, never to hide a difference keyshift causes. 2026-12-01,
# PostgreSQL 15.18: none; two direct runs gave identical outputs in all 217 tests.
declare -A EXCLUDE=(
)

# ---------------------------------------------------------------------------------------------
# 1. What the suite needs, installed if missing (Debian's packages), each with a message.

need_root() { # what, how
    [[ $(id -u) -eq 0 ]] || die "$1 is missing; as root run: $2 (or run this script as root)"
}
apt_updated=
apt_update() {
    [[ -n $apt_updated ]] && return 0
    log "apt-get update"
    apt-get update -qq || die "apt-get update failed"
    apt_updated=1
}
apt_install() { # packages…
    apt_update
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null ||
        die "apt-get install $* failed"
}

if [[ ! -x $PGBIN/postgres || ! -x $PGBIN/initdb ]]; then
    need_root "PostgreSQL 15's server ($PGBIN/postgres)" "apt-get install postgresql-15"
    log "PostgreSQL 15's server binaries are not in $PGBIN: installing Debian's postgresql-15"
    apt_install postgresql-15
fi
PG_VERSION_DEB=$(dpkg-query -W -f='${Version}' postgresql-15 2>/dev/null || true)
PGLIB=$("$PGBIN/pg_config" --pkglibdir)
PG_REGRESS=$PGLIB/pgxs/src/test/regress/pg_regress
if [[ ! -x $PG_REGRESS ]]; then
    need_root "pg_regress ($PG_REGRESS)" "apt-get install postgresql-client-15"
    log "pg_regress is missing: installing Debian's postgresql-client-15, which ships it"
    apt_install "postgresql-client-15${PG_VERSION_DEB:+=$PG_VERSION_DEB}"
fi
if ! command -v gcc >/dev/null || ! command -v make >/dev/null; then
    need_root "a C compiler and make (to build regress.so)" "apt-get install gcc make"
    log "gcc or make is missing (regress.so is built from regress.c): installing gcc and make"
    apt_install gcc make libc6-dev
fi
if [[ ! -f $("$PGBIN/pg_config" --includedir-server)/postgres.h || ! -f $("$PGBIN/pg_config" --pgxs) ]]; then
    need_root "PostgreSQL 15's server headers and PGXS" "apt-get install postgresql-server-dev-15"
    # Pinned to the server's own version: the newest one would also upgrade the server binaries
    # under whatever else runs on this machine, and regress.so must match the server it loads in.
    log "the server headers are missing (regress.c is built against them): installing postgresql-server-dev-15=$PG_VERSION_DEB"
    apt_update
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "postgresql-server-dev-15=$PG_VERSION_DEB" >/dev/null; then
        log "postgresql-server-dev-15=$PG_VERSION_DEB is not in the archive any more: installing the newest postgresql-server-dev-15, which upgrades the server to the same version"
        apt_install postgresql-server-dev-15
    fi
fi

# The tests themselves: src/test/regress (and contrib/spi, whose autoinc.so and refint.so the
# suite loads) from Debian's source package of the installed server, kept in REGRESS_CACHE.
add_deb_src() {
    # apt-get source needs deb-src entries; Debian's images often have only deb ones.
    local f=/etc/apt/sources.list.d/keyshift-deb-src
    log "no deb-src entry for postgresql-15: adding $f.* (deb-src twins of the existing deb entries)"
    if compgen -G "/etc/apt/sources.list.d/*.sources" >/dev/null; then
        for s in /etc/apt/sources.list.d/*.sources; do
            [[ $s == "$f.sources" ]] && continue
            sed -n 's/^Types: *deb *$/Types: deb-src/;p' "$s"
            echo
        done | awk 'BEGIN{RS="";ORS="\n\n"} /Types: deb-src/' >"$f.sources"
    fi
    if [[ -f /etc/apt/sources.list ]]; then
        sed -n 's/^deb \(.*\)/deb-src \1/p' /etc/apt/sources.list >"$f.list"
    fi
    apt_updated=
    apt_update
}
if [[ -n ${REGRESS_SRC:-} ]]; then
    SRC=$REGRESS_SRC
else
    SRC=$(ls -d "$REGRESS_CACHE"/postgresql-15-*/ 2>/dev/null | sort -V | tail -1 || true)
    SRC=${SRC%/}
    if [[ -z $SRC ]]; then
        need_root "PostgreSQL 15's source (src/test/regress)" "apt-get source postgresql-15 in $REGRESS_CACHE, or set REGRESS_SRC"
        command -v dpkg-source >/dev/null || { log "dpkg-source is missing (apt-get source unpacks with it): installing dpkg-dev"; apt_install dpkg-dev; }
        apt_update
        if [[ $(apt-cache showsrc postgresql-15 2>/dev/null) != *Version:* ]]; then add_deb_src; fi
        mkdir -p "$REGRESS_CACHE"
        log "downloading Debian's source package postgresql-15=$PG_VERSION_DEB into $REGRESS_CACHE (23 MB)"
        if ! (cd "$REGRESS_CACHE" && apt-get source -qq "postgresql-15=$PG_VERSION_DEB" >/dev/null 2>"$REGRESS_CACHE/apt-source.log"); then
            log "postgresql-15=$PG_VERSION_DEB's source is not in the archive: taking the newest postgresql-15 source (the outputs are compared run against run, so a neighbouring minor release only changes which tests exist)"
            (cd "$REGRESS_CACHE" && apt-get source -qq postgresql-15 >/dev/null 2>>"$REGRESS_CACHE/apt-source.log") ||
                die "apt-get source postgresql-15 failed (see $REGRESS_CACHE/apt-source.log); unpack PostgreSQL 15's release tarball (the PostgreSQL project's source download, or git tag REL_15_<minor>) and set REGRESS_SRC to it"
        fi
        SRC=$(ls -d "$REGRESS_CACHE"/postgresql-15-*/ | sort -V | tail -1)
        SRC=${SRC%/}
    fi
fi
[[ -f $SRC/src/test/regress/parallel_schedule && -f $SRC/src/test/regress/regress.c && -f $SRC/contrib/spi/refint.c ]] ||
    die "$SRC is not a PostgreSQL source tree (no src/test/regress/parallel_schedule, regress.c or contrib/spi/refint.c)"
log "PostgreSQL $("$PGBIN/postgres" --version | awk '{print $3}'), tests from $SRC"

[[ -n ${KEYSHIFT_BIN:-} ]] || command -v cargo >/dev/null || die "cargo is needed to build keyshift (https://rustup.rs)"
command -v curl >/dev/null || { need_root "curl" "apt-get install curl"; log "curl is missing (the proxy's admin endpoint is polled with it): installing curl"; apt_install curl; }
command -v python3 >/dev/null || { need_root "python3" "apt-get install python3"; log "python3 is missing (free ports are found with it): installing python3"; apt_install python3; }
id postgres >/dev/null 2>&1 || { need_root "the postgres OS user" "useradd -r postgres"; useradd -r -s /bin/bash postgres; }

if [[ -n ${KEYSHIFT_BIN:-} ]]; then
    KS=$KEYSHIFT_BIN
    [[ -x $KS ]] || die "KEYSHIFT_BIN=$KS is not an executable"
    log "keyshift: $KS"
else
    log "building keyshift (release)"
    cargo build --release --quiet
    KS=$ROOT/target/release/keyshift
fi

# keyshift runs with the flags below and nothing else: no KEYSHIFT_* variable of the caller's
# (a KEYSHIFT_DATABASE_URL would turn the relay run into a linked one).
KS_ENV=(env)
for v in $(compgen -e); do if [[ $v == KEYSHIFT_* ]]; then KS_ENV+=(-u "$v"); fi; done

# ---------------------------------------------------------------------------------------------
# 2. A work dir the postgres user owns: the server reads data/*.data and writes results/*.data
#    under the input and output dirs (COPY FROM/TO a file), and loads the three libraries.

TMP=$(mktemp -d -t keyshift-regress.XXXXXX)
chmod 755 "$TMP"
PIDS=()
cleanup() {
    set +e
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
    for d in "$TMP"/data "$TMP"/template; do
        [[ -f $d/postmaster.pid ]] && as_pg "$PGBIN/pg_ctl" -D "$d" -m immediate -w stop >/dev/null 2>&1
    done
    if [[ -n ${KEEP_TMP:-} ]]; then log "kept $TMP"; else rm -rf "$TMP"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

mkdir -p "$TMP/src" "$TMP/lib" "$TMP/out"
cp -r "$SRC/src/test/regress/"{sql,expected,data,parallel_schedule,resultmap} "$TMP/src/"
cp "$SRC/src/test/regress/regress.c" "$SRC/contrib/spi/"{autoinc.c,refint.c} "$TMP/lib/"
# What src/test/regress/GNUmakefile builds (regress.so, and contrib/spi's two copied beside
# it), as a PGXS module set against the installed server's headers. -DREFINT_VERBOSE as in
# contrib/spi/Makefile ("needed for the regression tests": triggers expects refint's NOTICEs);
# with_llvm=no: no JIT bitcode, which the tests never need.
cat >"$TMP/lib/Makefile" <<EOF
MODULES = regress autoinc refint
PG_CPPFLAGS = -DREFINT_VERBOSE
PG_CONFIG = $PGBIN/pg_config
PGXS := \$(shell \$(PG_CONFIG) --pgxs)
include \$(PGXS)
EOF
log "building regress.so, autoinc.so, refint.so against $("$PGBIN/pg_config" --includedir-server)"
make -s -C "$TMP/lib" with_llvm=no >"$TMP/lib/build.log" 2>&1 || { cat "$TMP/lib/build.log" >&2; die "building regress.so failed"; }
if [[ $(id -u) -eq 0 ]]; then chown -R postgres "$TMP"; fi

# The tests, in order: the schedule's, or REGRESS_TESTS.
if [[ -n ${REGRESS_TESTS:-} ]]; then
    read -r -a TESTS <<<"$REGRESS_TESTS"
    SCHEDULE_ARGS=("${TESTS[@]}")
else
    mapfile -t TESTS < <(sed -n 's/^test: *//p' "$TMP/src/parallel_schedule" | tr ' ' '\n' | grep -v '^$')
    SCHEDULE_ARGS=(--schedule="$TMP/src/parallel_schedule")
fi
log "${#TESTS[@]} tests"

# ---------------------------------------------------------------------------------------------
# 3. One prepared cluster, copied for every run: the database `regression` as pg_regress's own
#    create_database() makes it, and the migration of keyshift_regress.p and .c expanded.

start_pg() { # data dir; sets PG_PORT
    PG_PORT=$(free_port)
    as_pg "$PGBIN/pg_ctl" -D "$1" -l "$1.log" -w -t 120 -o "-p $PG_PORT" start >/dev/null ||
        { tail -20 "$1.log" >&2; die "PostgreSQL did not start"; }
}
stop_pg() { as_pg "$PGBIN/pg_ctl" -D "$1" -m fast -w -t 120 stop >/dev/null; }
psql_pg() { "$PGBIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -U postgres "$@"; }

log "preparing the template cluster"
as_pg "$PGBIN/initdb" -D "$TMP/template" -U postgres -A trust -E UTF8 --locale=C --no-sync >"$TMP/initdb.log" 2>&1 ||
    { cat "$TMP/initdb.log" >&2; die "initdb failed"; }
cat >>"$TMP/template/postgresql.conf" <<EOF
# As pg_regress's own temporary instance: prepared_xacts needs prepared transactions.
max_prepared_transactions = 2
# Speed only; nothing the tests can see.
fsync = off
full_page_writes = off
synchronous_commit = off
listen_addresses = '127.0.0.1'
unix_socket_directories = '$TMP'
EOF
start_pg "$TMP/template"
# pg_regress.c create_database(), as it runs without --use-existing.
psql_pg -d postgres <<'EOF'
CREATE DATABASE "regression" TEMPLATE=template0;
ALTER DATABASE "regression" SET lc_messages TO 'C';
ALTER DATABASE "regression" SET lc_monetary TO 'C';
ALTER DATABASE "regression" SET lc_numeric TO 'C';
ALTER DATABASE "regression" SET lc_time TO 'C';
ALTER DATABASE "regression" SET bytea_output TO 'hex';
ALTER DATABASE "regression" SET timezone_abbreviations TO 'Default';
EOF
psql_pg -d regression <<'EOF'
CREATE SCHEMA keyshift_regress;
CREATE TABLE keyshift_regress.p (id integer PRIMARY KEY, name text);
CREATE TABLE keyshift_regress.c (id integer PRIMARY KEY, p_id integer REFERENCES keyshift_regress.p, note text);
INSERT INTO keyshift_regress.p SELECT g, 'p' || g FROM generate_series(1, 10) g;
INSERT INTO keyshift_regress.c SELECT g, 1 + g % 10, 'c' || g FROM generate_series(1, 20) g;
EOF
DB_URL_TEMPLATE="postgres://postgres@127.0.0.1:%s/regression"
# shellcheck disable=SC2059
"${KS_ENV[@]}" "$KS" expand --database-url "$(printf "$DB_URL_TEMPLATE" "$PG_PORT")" --schema keyshift_regress >"$TMP/expand.log" 2>&1 ||
    { cat "$TMP/expand.log" >&2; die "keyshift expand failed"; }
PHASE=$(psql_pg -d regression -At -c "SELECT phase FROM keyshift.migration")
log "migration of keyshift_regress.p and keyshift_regress.c: phase $PHASE"
psql_pg -d postgres -c CHECKPOINT
stop_pg "$TMP/template"

# ---------------------------------------------------------------------------------------------
# 4. The runs.

rm -rf "$OUT"
mkdir -p "$OUT"
declare -A ELAPSED
fmt_secs() { printf '%dm%02ds' $(($1 / 60)) $(($1 % 60)); }

run_suite() { # name mode
    local name=$1 mode=$2 port ks_pid=
    rm -rf "$TMP/data" "$TMP/data.log"
    cp -a "$TMP/template" "$TMP/data"
    start_pg "$TMP/data"
    port=$PG_PORT
    if [[ $mode != direct ]]; then
        local listen admin args=()
        listen=$(free_port)
        admin=$(free_port)
        args=(proxy --upstream "127.0.0.1:$PG_PORT" --listen "127.0.0.1:$listen"
            --admin-listen "127.0.0.1:$admin" --upstream-tls disable --worker-threads 1)
        if [[ $mode == link || $mode == strict ]]; then
            # shellcheck disable=SC2059
            args+=(--database-url "$(printf "$DB_URL_TEMPLATE" "$PG_PORT")" --search-path public
                --proxy-id "regress-$name")
        fi
        [[ $mode == strict ]] && args+=(--strict true)
        "${KS_ENV[@]}" RUST_LOG=info "$KS" "${args[@]}" >"$OUT/$name.keyshift.log" 2>&1 &
        ks_pid=$!
        PIDS+=("$ks_pid")
        wait_port "$listen"
        if [[ $mode == link || $mode == strict ]]; then
            local status=
            for _ in $(seq 1 300); do
                status=$(curl -s "http://127.0.0.1:$admin/v1/status" || true)
                [[ $status == *'"dual_write":true'* && $status == *'"database_link":"connected"'* ]] && break
                sleep 0.1
            done
            [[ $status == *'"dual_write":true'* ]] || die "the proxy never linked to the migration: $status"
        fi
        port=$listen
    fi
    log "run $name: pg_regress → $([[ $mode == direct ]] && echo "PostgreSQL" || echo "keyshift ($mode) → PostgreSQL"), port $port"
    local t0 t1
    t0=$(date +%s)
    mkdir -p "$TMP/out/$name"
    chown postgres "$TMP/out/$name" 2>/dev/null || true
    # --use-existing: the database is the template's, not dropped and created by pg_regress
    # (the proxy's link holds a connection to it); --max-connections=1: one test at a time.
    as_pg "$PG_REGRESS" --use-existing --dbname=regression --host=127.0.0.1 --port="$port" \
        --user=postgres --bindir="$PGBIN" --inputdir="$TMP/src" --outputdir="$TMP/out/$name" \
        --dlpath="$TMP/lib" --max-connections=1 "${SCHEDULE_ARGS[@]}" \
        >"$OUT/$name.pg_regress.log" 2>&1 || true # fails when outputs differ from expected/: not our test
    t1=$(date +%s)
    ELAPSED[$name]=$((t1 - t0))
    if [[ -n $ks_pid ]]; then
        curl -s "http://127.0.0.1:$admin/metrics" >"$OUT/$name.metrics" || true
        kill "$ks_pid"
        wait "$ks_pid" 2>/dev/null || true
    fi
    stop_pg "$TMP/data"
    cp "$TMP/data.log" "$OUT/$name.postgres.log"
    cp -r "$TMP/out/$name/results" "$OUT/$name.results"
    [[ -f $TMP/out/$name/regression.diffs ]] && cp "$TMP/out/$name/regression.diffs" "$OUT/$name.vs-expected.diffs"
    local summary
    summary=$(grep -E '^( All [0-9]+ tests passed| *[0-9]+ of [0-9]+ tests (failed|passed))' "$OUT/$name.pg_regress.log" | sed 's/^ *//' || true)
    log "run $name: $(fmt_secs "${ELAPSED[$name]}"); pg_regress against PostgreSQL's expected files: ${summary:-no summary, see $OUT/$name.pg_regress.log}"
}

RUNS=(direct)
[[ -n ${DIRECT_TWICE:-} ]] && RUNS+=(direct2)
for m in $MODES; do [[ $m == direct ]] || RUNS+=("$m"); done
for r in "${RUNS[@]}"; do
    case $r in
    direct | direct2) run_suite "$r" direct ;;
    relay | link | strict) run_suite "$r" "$r" ;;
    *) die "unknown mode $r (MODES takes direct, relay, link, strict)" ;;
    esac
done

# ---------------------------------------------------------------------------------------------
# 5. Each run against the direct one, test by test.

FAILED=0
echo
echo "=== PostgreSQL $("$PGBIN/postgres" --version | awk '{print $3}') regression suite, ${#TESTS[@]} tests run serially; each run against the direct run"
for r in "${RUNS[@]}"; do
    [[ $r == direct ]] && continue
    differ=() excluded=()
    : >"$OUT/$r.diffs"
    for t in "${TESTS[@]}"; do
        a=$OUT/direct.results/$t.out b=$OUT/$r.results/$t.out
        if [[ -f $a && -f $b ]] && cmp -s "$a" "$b"; then continue; fi
        if [[ -n ${EXCLUDE[$t]:-} ]]; then excluded+=("$t"); else differ+=("$t"); fi
        { diff -u --label "direct/$t.out" --label "$r/$t.out" "$a" "$b" 2>&1 || true; } >>"$OUT/$r.diffs"
    done
    echo
    echo "--- $r: ${#TESTS[@]} tests, ${#differ[@]} differ from direct$( ((${#excluded[@]})) && echo ", ${#excluded[@]} excluded ones differ too"), $(fmt_secs "${ELAPSED[$r]}") (direct $(fmt_secs "${ELAPSED[direct]}"))"
    if ((${#differ[@]})); then
        FAILED=1
        echo "differ: ${differ[*]}"
    fi
    for t in "${excluded[@]}"; do echo "excluded, differs: $t (${EXCLUDE[$t]})"; done
    if [[ $r == link || $r == strict ]] && [[ -s $OUT/$r.metrics ]]; then
        grep -E '^keyshift_(rewrite_skipped|rewrites)_total\{' "$OUT/$r.metrics" | sed 's/^/metric: /' || true
        echo "proxy log: $(grep -c 'was not rewritten' "$OUT/$r.keyshift.log" || true) warnings 'a write to a migrated table was not rewritten'" 
    fi
    # Statements keyshift itself answered with an error (a refusal, a protocol error), with the
    # statement they answer: the short list to read first.
    python3 - "$OUT/direct.results" "$OUT/$r.results" "${differ[@]}" "${excluded[@]}" <<'PY'
import re, sys
direct, mode, tests = sys.argv[1], sys.argv[2], sys.argv[3:]
stop = re.compile(r"^(ERROR|HINT|DETAIL|NOTICE|WARNING|CONTEXT|INFO|QUERY|LINE \d+|FATAL|server closed|connection to server)|^\(\d+ rows?\)$|^--|^\s*$")
n, last = 0, None
for t in tests:
    try:
        lines = open(f"{mode}/{t}.out", errors="replace").read().split("\n")
    except OSError:
        continue
    for i, l in enumerate(lines):
        if re.match(r"^(ERROR|FATAL):.*keyshift", l):
            j, stmt = i - 1, []
            while j >= 0 and not stop.search(lines[j]) and not (stmt and lines[j].rstrip().endswith(";")):
                stmt.insert(0, lines[j].strip())
                j -= 1
            n += 1
            text = " ".join(stmt)
            print(f"  {t}.out:{i + 1}: {text[:240]}{' ...' if len(text) > 240 else ''}")
            if l != last:
                print(f"      {l}")
            last = l
if n:
    print(f"keyshift's own errors above: {n}")
PY
    # Each differing test's diff, the first 60 lines of each here, all of them in the file.
    for t in "${differ[@]}" "${excluded[@]}"; do
        d=$(diff -u --label "direct/$t.out" --label "$r/$t.out" "$OUT/direct.results/$t.out" "$OUT/$r.results/$t.out" 2>&1 || true)
        lines=$(printf '%s\n' "$d" | wc -l)
        printf '%s\n' "$d" | sed -n 1,60p
        if ((lines > 60)); then echo "... $((lines - 60)) more lines of $t in $OUT/$r.diffs"; fi
    done
done
missing=0
for t in "${TESTS[@]}"; do [[ -f $OUT/direct.results/$t.out ]] || missing=$((missing + 1)); done
if ((missing)); then
    echo "the direct run has no output for $missing tests: see $OUT/direct.pg_regress.log"
    FAILED=1
fi
echo
echo "elapsed: $(for r in "${RUNS[@]}"; do printf '%s %s, ' "$r" "$(fmt_secs "${ELAPSED[$r]}")"; done)whole script $(fmt_secs $(($(date +%s) - SCRIPT_START)))"
echo "results, diffs and logs: $OUT"
if ((FAILED)); then
    echo "FAILED: the outputs through keyshift are not those of PostgreSQL alone"
    exit 1
fi
echo "OK: the outputs through keyshift are those of PostgreSQL alone"
