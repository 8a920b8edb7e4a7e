#!/usr/bin/env bash
# The session's differential protocol fuzzer (tests/proxy_fuzz.rs, tests/fuzz/), long: every
# case goes to PostgreSQL directly and through keyshift with a migration's rewriter live, and
# must get the same answer; after each, no panic, the session has left the gate, a fresh
# client works and /v1/pause drains.
#
#   benches/fuzz.sh [rounds] [cases per round] [first seed]
#
# Each round runs a new seed (first seed, +1, ...). Prints each round's distinct failures with
# a minimal reproduction, then a summary: failures by kind, over all rounds. Exit status 1 when
# anything was found. KEYSHIFT_TEST_DATABASE_URL works as for `cargo test`.
set -uo pipefail
cd "$(dirname "$0")/.."

rounds=${1:-4}
cases=${2:-1000}
seed=${3:-$(date +%s)}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

cargo test --test proxy_fuzz --no-run >/dev/null 2>&1 || cargo test --test proxy_fuzz --no-run
start=$(date +%s)
failed=0
for ((r = 0; r < rounds; r++)); do
    s=$((seed + r))
    echo "== round $((r + 1))/$rounds: KEYSHIFT_FUZZ_SEED=$s KEYSHIFT_FUZZ_CASES=$cases"
    if KEYSHIFT_FUZZ_SEED=$s KEYSHIFT_FUZZ_CASES=$cases RUST_BACKTRACE=0 \
        cargo test -q --test proxy_fuzz fuzz_session_long -- --ignored --exact --nocapture \
        >"$out/round$r.log" 2>&1; then
        grep -h '^fuzz: ' "$out/round$r.log"
    else
        failed=1
        grep -h '^fuzz: ' "$out/round$r.log"
        # The report: from the first group to the end of the panic message.
        sed -n '/^=== /,/^failures:$/p' "$out/round$r.log" | sed '$d'
    fi
done

echo
echo "== summary: $rounds round(s) of $cases cases, seeds $seed..$((seed + rounds - 1)), $(($(date +%s) - start)) s"
# Lines of the "fuzz summary:" blocks: "<count>  <signature>", summed over rounds.
cat "$out"/round*.log | awk '
    /^fuzz summary:/ { on = 1; next }
    on && /^ *[0-9]+  / { n = $1; $1 = ""; sub(/^ /, ""); total[$0] += n; next }
    { on = 0 }
    END { for (k in total) printf "%7d  %s\n", total[k], k }' | sort -rn
grep -h '^fuzz: ' "$out"/round*.log | awk '{ n += $4 } END { print n " cases run" }'
if [ "$failed" = 0 ]; then
    echo "nothing found"
fi
exit "$failed"
