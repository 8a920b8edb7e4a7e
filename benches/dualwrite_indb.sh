#!/usr/bin/env bash
# What the dual-write costs inside PostgreSQL, without any proxy: one child insert per
# transaction (pgbench, CLIENTS clients) into tables that differ only in what a migration adds:
#   plain     the child as it is before a migration: integer FK only
#   rewrite   twin uuid column + shadow FK, filled by the statement keyshift's rewriter emits:
#             VALUES (:k, (SELECT id_uuid FROM p WHERE id = :k), :v)
#   function  the same twin filled by a plpgsql STABLE function (plan cached per session)
#   trigger   the same twin filled by a BEFORE INSERT trigger (how trigger-based tools do it)
#   guarded   the rewriter's statement, on a table that also has keyshift's fill trigger
#             (src/migrate/fill.rs: WHEN (NEW.p_id IS NULL) <> (NEW.p_id_uuid IS NULL)), which
#             every child carries from expand on; guarded/rewrite is what the guard costs on
#             rows the proxy filled (the function is never called)
#   filled    an insert of the integer alone on that table: the fill trigger does the
#             dual-write, as for COPY or a direct connection; filled/trigger compares it with
#             the unguarded trigger
# Round-robin, ROUNDS rounds, in extended and prepared mode. The ratio rewrite/plain is the
# floor of what any dual-write costs on this schema (extra column, uuid index, second FK
# check); rewrite/trigger isolates the way the twin is filled.
#
# Usage: benches/dualwrite_indb.sh    Environment: CLIENTS=4 DURATION=5 ROUNDS=3 PGBIN
set -euo pipefail
CLIENTS=${CLIENTS:-4}
DURATION=${DURATION:-5}
ROUNDS=${ROUNDS:-3}
if [[ -z ${PGBIN:-} ]]; then
    PGBIN=$(ls -d /usr/lib/postgresql/15/bin 2>/dev/null || ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
fi
if [[ $(id -u) -eq 0 ]]; then as_pg() { runuser -u postgres -- "$@"; }; else as_pg() { "$@"; }; fi
TMP=$(mktemp -d -t keyshift-indb.XXXXXX)
chmod 755 "$TMP"; [[ $(id -u) -eq 0 ]] && chown postgres "$TMP"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
trap 'as_pg "$PGBIN/pg_ctl" -D "$TMP/data" -m immediate stop >/dev/null 2>&1; rm -rf "$TMP"' EXIT
as_pg "$PGBIN/initdb" -D "$TMP/data" -A trust -U postgres --no-sync >/dev/null
as_pg "$PGBIN/pg_ctl" -D "$TMP/data" -l "$TMP/log" -w \
    -o "-p $PORT -k $TMP -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off" start >/dev/null
PSQL=("$PGBIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PORT" -U postgres)
"${PSQL[@]}" <<'SQL'
CREATE TABLE p (id serial PRIMARY KEY, id_uuid uuid NOT NULL DEFAULT gen_random_uuid() UNIQUE, name text);
INSERT INTO p (name) SELECT 'p' || g FROM generate_series(1, 4000) g;
CREATE TABLE c_plain (id serial PRIMARY KEY, p_id int REFERENCES p (id), v text);
CREATE INDEX ON c_plain (p_id);
CREATE TABLE c_rewrite (id serial PRIMARY KEY, p_id int REFERENCES p (id), p_id_uuid uuid REFERENCES p (id_uuid), v text);
CREATE INDEX ON c_rewrite (p_id); CREATE INDEX ON c_rewrite (p_id_uuid);
CREATE TABLE c_function (LIKE c_rewrite INCLUDING ALL);
ALTER TABLE c_function ADD FOREIGN KEY (p_id) REFERENCES p (id), ADD FOREIGN KEY (p_id_uuid) REFERENCES p (id_uuid);
CREATE TABLE c_trigger (LIKE c_rewrite INCLUDING ALL);
ALTER TABLE c_trigger ADD FOREIGN KEY (p_id) REFERENCES p (id), ADD FOREIGN KEY (p_id_uuid) REFERENCES p (id_uuid);
CREATE FUNCTION p_uuid(k int) RETURNS uuid LANGUAGE plpgsql STABLE AS $$ BEGIN RETURN (SELECT id_uuid FROM p WHERE id = k); END $$;
CREATE FUNCTION fill() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN NEW.p_id_uuid := (SELECT id_uuid FROM p WHERE id = NEW.p_id); RETURN NEW; END $$;
CREATE TRIGGER fill BEFORE INSERT ON c_trigger FOR EACH ROW EXECUTE FUNCTION fill();
CREATE TABLE c_guarded (LIKE c_rewrite INCLUDING ALL);
ALTER TABLE c_guarded ADD FOREIGN KEY (p_id) REFERENCES p (id), ADD FOREIGN KEY (p_id_uuid) REFERENCES p (id_uuid);
CREATE FUNCTION fill_guarded() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
  IF NEW.p_id_uuid IS NULL AND NEW.p_id IS NOT NULL THEN NEW.p_id_uuid := (SELECT p.id_uuid FROM p AS p WHERE p.id = NEW.p_id);
  ELSIF NEW.p_id IS NULL AND NEW.p_id_uuid IS NOT NULL THEN NEW.p_id := (SELECT p.id FROM p AS p WHERE p.id_uuid = NEW.p_id_uuid);
  END IF; RETURN NEW; END $$;
CREATE TRIGGER zz_keyshift_fill_integer_ins BEFORE INSERT ON c_guarded FOR EACH ROW
  WHEN ((NEW.p_id IS NULL) <> (NEW.p_id_uuid IS NULL)) EXECUTE FUNCTION fill_guarded();
SQL
declare -A Q=(
    [plain]='INSERT INTO c_plain (p_id, v) VALUES (:k, :v);'
    [rewrite]='INSERT INTO c_rewrite (p_id, p_id_uuid, v) VALUES (:k, (SELECT id_uuid FROM p WHERE id = :k), :v);'
    [function]='INSERT INTO c_function (p_id, p_id_uuid, v) VALUES (:k, p_uuid(:k), :v);'
    [trigger]='INSERT INTO c_trigger (p_id, v) VALUES (:k, :v);'
    [guarded]='INSERT INTO c_guarded (p_id, p_id_uuid, v) VALUES (:k, (SELECT id_uuid FROM p WHERE id = :k), :v);'
    [filled]='INSERT INTO c_guarded (p_id, v) VALUES (:k, :v);'
)
KINDS=(plain rewrite function trigger guarded filled)
for k in "${KINDS[@]}"; do
    printf '\\set k random(1, 4000)\n\\set v random(1, 1000000)\n%s\n' "${Q[$k]}" >"$TMP/$k.pgb"
done
declare -A SUM
for mode in extended prepared; do
    for r in $(seq 1 "$ROUNDS"); do
        for k in "${KINDS[@]}"; do
            tps=$("$PGBIN/pgbench" -h 127.0.0.1 -p "$PORT" -U postgres -n -M "$mode" -c "$CLIENTS" -j 2 \
                -T "$DURATION" -f "$TMP/$k.pgb" postgres 2>&1 | sed -n 's/^tps = \([0-9.]*\).*/\1/p')
            echo "$mode round $r $k: $tps tps" >&2
            SUM[$mode,$k]=$(awk -v a="${SUM[$mode,$k]:-0}" -v b="$tps" 'BEGIN { print a + b }')
        done
    done
done
printf '\n%-9s %9s %9s %9s %9s %9s %9s %14s %16s %16s %15s\n' mode plain rewrite function trigger guarded filled \
    rewrite/plain rewrite/trigger guarded/rewrite filled/trigger
for mode in extended prepared; do
    awk -v m="$mode" -v r="$ROUNDS" -v a="${SUM[$mode,plain]}" -v b="${SUM[$mode,rewrite]}" \
        -v c="${SUM[$mode,function]}" -v d="${SUM[$mode,trigger]}" -v g="${SUM[$mode,guarded]}" -v f="${SUM[$mode,filled]}" \
        'BEGIN { printf "%-9s %9.0f %9.0f %9.0f %9.0f %9.0f %9.0f %14.2f %16.2f %16.2f %15.2f\n", m, a/r, b/r, c/r, d/r, g/r, f/r, b/a, b/d, g/b, f/d }'
done
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
