#!/usr/bin/env bash
# The server matrix: for each integration test file that runs against a real homeserver, how
# many of its tests passed (and failed) on Synapse and on palpo. Prints a Markdown table.
# Needs both servers (`scripts/synapse.sh install`, `scripts/palpo.sh install`). Each file's
# output is kept in target/server-matrix/NAME.log.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

cargo build --quiet --examples
cargo build --quiet --features e2ee --examples

# Test files, each with the cargo flags it needs.
files=(
    "homeservers" "smoke" "driver" "no_loss" "ecosystem" "well_known" "tls" "refresh"
    "many_accounts" "reactor_fairness"
    "e2ee --features e2ee" "e2ee_tail --features e2ee" "e2ee_crash --features e2ee"
)

count() { grep -cE "_on_$1 \.\.\. $2" <<<"$3"; }

logs=target/server-matrix
mkdir -p "${logs}"
printf '| test file | Synapse passed | palpo passed | failed |\n|---|---|---|---|\n'
totals=(0 0 0)
for entry in "${files[@]}"; do
    read -r name flags <<<"$entry"
    # shellcheck disable=SC2086
    out=$(cargo test $flags --test "$name" 2>&1)
    status=$?
    printf '%s\n' "$out" >"${logs}/${name}.log"
    synapse=$(count synapse ok "$out")
    palpo=$(count palpo ok "$out")
    failed=$(grep -cE '\.\.\. FAILED' <<<"$out")
    # A binary without the test harness (e2ee_crash) stops at its first failure.
    if [ "$status" -ne 0 ] && [ "$failed" -eq 0 ]; then failed=1; fi
    printf '| %s | %d | %d | %d |\n' "$name" "$synapse" "$palpo" "$failed"
    totals=($((totals[0] + synapse)) $((totals[1] + palpo)) $((totals[2] + failed)))
done
printf '| **all** | **%d** | **%d** | **%d** |\n' "${totals[@]}"
