#!/usr/bin/env bash
# Runs the cargo-fuzz targets of fuzz/ for a while each and reports their speed.
#
# Usage: scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
#
#   SECONDS_PER_TARGET  how long libFuzzer runs each target (default 60)
#   TARGET              sync_response, input_sequence, normalize_event, gap_messages,
#                       scan_fields, refresh_answer, sliding_response
#                       (default: all of them, one after the other)
#
# Environment:
#   FUZZ_ARGS   extra libFuzzer arguments for every target, e.g. FUZZ_ARGS="-max_len=65536"
#
# Installs what it needs when missing: the nightly toolchain (`rustup toolchain install
# nightly --profile minimal`) and cargo-fuzz (`cargo install cargo-fuzz --locked`).
# The committed seeds (fuzz/seeds/<target>/) are copied into the working corpus
# (fuzz/corpus/<target>/); libFuzzer's output goes to fuzz/artifacts/logs/<target>.log and a
# crashing input to fuzz/artifacts/<target>/. Exits non-zero if any target crashed (or failed
# to build or run); reproduce a crash with `cargo +nightly fuzz run <target> <artifact>` from
# the repository root, minimize it with `cargo +nightly fuzz tmin <target> <artifact>`.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FUZZ="$ROOT/fuzz"
ALL_TARGETS=(sync_response input_sequence normalize_event gap_messages scan_fields refresh_answer sliding_response)
# Targets fed JSON bytes directly get the Matrix dictionary.
DICT_TARGETS=" sync_response normalize_event gap_messages scan_fields refresh_answer sliding_response "

die() {
    echo "fuzz.sh: $*" >&2
    exit 2
}

seconds=60
if [[ $# -gt 0 && $1 =~ ^[0-9]+$ ]]; then
    seconds=$1
    shift
fi
[[ $seconds -gt 0 ]] || die "SECONDS_PER_TARGET must be positive"
targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=("${ALL_TARGETS[@]}")
for t in "${targets[@]}"; do
    [[ -f "$FUZZ/fuzz_targets/$t.rs" ]] ||
        die "unknown target '$t' (known: ${ALL_TARGETS[*]})"
done

# ---- tools -----------------------------------------------------------------------------------

command -v rustup >/dev/null 2>&1 || die "rustup is required (cargo-fuzz needs a nightly toolchain)"
# cargo-fuzz passes -Z flags to rustc: nightly, or as a fallback the stable compiler with
# RUSTC_BOOTSTRAP=1 (which accepts them) when no nightly can be installed here.
TOOLCHAIN=(+nightly)
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing the nightly toolchain (cargo-fuzz needs it)..."
    if ! rustup toolchain install nightly --profile minimal; then
        echo "fuzz.sh: WARNING: could not install nightly; fuzzing with the stable compiler" \
            "and RUSTC_BOOTSTRAP=1" >&2
        TOOLCHAIN=()
        export RUSTC_BOOTSTRAP=1
    fi
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz..."
    cargo install cargo-fuzz --locked || die "could not install cargo-fuzz"
fi

# ---- runs ------------------------------------------------------------------------------------

mkdir -p "$FUZZ/artifacts/logs"
declare -A speed runs status
failed=0
for t in "${targets[@]}"; do
    corpus="$FUZZ/corpus/$t"
    seeds="$FUZZ/seeds/$t"
    mkdir -p "$corpus" "$seeds" "$FUZZ/artifacts/$t"
    # Seeds into the working corpus, without overwriting what fuzzing found.
    find "$seeds" -maxdepth 1 -type f -exec cp -n -t "$corpus" {} + 2>/dev/null || true
    log="$FUZZ/artifacts/logs/$t.log"
    dict=()
    [[ $DICT_TARGETS == *" $t "* ]] && dict=("-dict=$FUZZ/matrix.dict")
    echo "fuzz.sh: $t for ${seconds}s (log: ${log#"$ROOT"/})"
    # shellcheck disable=SC2086 # FUZZ_ARGS is a list of arguments
    (
        cd "$ROOT" &&
            cargo "${TOOLCHAIN[@]}" fuzz run --fuzz-dir "$FUZZ" "$t" "$corpus" "$seeds" -- \
                -max_total_time="$seconds" -print_final_stats=1 -timeout=30 \
                "${dict[@]}" ${FUZZ_ARGS:-}
    ) >"$log" 2>&1
    rc=$?
    # libFuzzer's final stats, or its last "#N DONE ... exec/s: X" line.
    speed[$t]=$(awk '/^stat::average_exec_per_sec:/ {v=$2} END {print v}' "$log")
    if [[ -z ${speed[$t]} ]]; then
        speed[$t]=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -n1 |
            sed -n 's/.*exec\/s: \([0-9]*\).*/\1/p')
    fi
    runs[$t]=$(awk '/^stat::number_of_executed_units:/ {v=$2} END {print v}' "$log")
    if [[ $rc -eq 0 ]]; then
        status[$t]=ok
    else
        failed=1
        artifact=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n1)
        if [[ -n $artifact ]]; then
            status[$t]="CRASH: $artifact"
        else
            status[$t]="FAILED (exit $rc, see the log)"
        fi
        echo "---- last lines of ${log#"$ROOT"/} ----" >&2
        tail -n 60 "$log" >&2
        echo "----" >&2
    fi
    echo "fuzz.sh: $t: ${status[$t]}, ${speed[$t]:-?} exec/s, ${runs[$t]:-?} runs in ${seconds}s"
done

echo
printf '%-18s %10s %12s  %s\n' target exec/s runs result
for t in "${targets[@]}"; do
    printf '%-18s %10s %12s  %s\n' "$t" "${speed[$t]:-?}" "${runs[$t]:-?}" "${status[$t]}"
done
exit $failed
