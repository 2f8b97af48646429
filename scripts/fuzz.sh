#!/usr/bin/env bash
# Fuzzes ftpx with cargo-fuzz (libFuzzer): every target in tests/fuzz for
# SECONDS each (default 60), starting from the committed seed corpus, after
# replaying the committed crash reproducers. Exits non-zero if a reproducer
# still fails or a target crashes, hangs or runs out of memory.
#
#   scripts/fuzz.sh                  # 60 s per target
#   scripts/fuzz.sh 10               # 10 s per target
#   FUZZ_TARGETS="session vpath" scripts/fuzz.sh 600
#   FUZZ_SANITIZER=address scripts/fuzz.sh
#
# FUZZ_SANITIZER: `none` (default) works on the stable toolchain as it is.
# `address` (AddressSanitizer) runs about three times slower and needs
# unstable rustc flags, allowed on stable by RUSTC_BOOTSTRAP=1, which this
# script then sets; ftpx has almost no unsafe code, so panics, overflow
# checks and hangs are what the fuzzers mostly find, and they find them in
# both modes.
#
# Findings go to tests/fuzz/artifacts/TARGET/ (crash-*, timeout-*, oom-*),
# the corpus a run grows to tests/fuzz/work/corpus/TARGET/, full logs to
# tests/fuzz/work/logs/; git ignores all three. Copy a crash worth keeping
# into tests/fuzz/regressions/TARGET/. To reproduce one:
#
#   cargo fuzz run --fuzz-dir tests/fuzz --sanitizer none TARGET FILE
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
FUZZ=$ROOT/tests/fuzz
EACH=${1:-60}
SANITIZER=${FUZZ_SANITIZER:-none}
started=$(date +%s)

case $EACH in
'' | *[!0-9]*)
    echo "usage: $0 [SECONDS per target]" >&2
    exit 2
    ;;
esac
case $SANITIZER in
none) TARGET_DIR=$FUZZ/target ;;
address)
    export RUSTC_BOOTSTRAP=1
    TARGET_DIR=$FUZZ/target/address
    ;;
*)
    echo "FUZZ_SANITIZER is none or address, not $SANITIZER" >&2
    exit 2
    ;;
esac

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi

cd "$ROOT"
fuzz=(cargo fuzz)
common=(--fuzz-dir "$FUZZ" --sanitizer "$SANITIZER" --target-dir "$TARGET_DIR")
if [ -n "${FUZZ_TARGETS:-}" ]; then
    read -r -a targets <<<"$FUZZ_TARGETS"
else
    mapfile -t targets < <("${fuzz[@]}" list --fuzz-dir "$FUZZ")
fi

logs=$FUZZ/work/logs
mkdir -p "$logs"
echo "building ${#targets[@]} fuzz targets (sanitizer: $SANITIZER)"
if ! "${fuzz[@]}" build "${common[@]}" >"$logs/build.log" 2>&1; then
    tail -30 "$logs/build.log" >&2
    echo "the fuzz targets do not build; the full log is $logs/build.log" >&2
    exit 1
fi
built=$(date +%s)
echo "built in $((built - started)) s"

host=$(rustc -vV | sed -n 's/^host: //p')
bin_dir=$TARGET_DIR/$host/release

# libFuzzer options per target: input size, time for one input.
options() {
    case $1 in
    # Request lines and frames of a few uploads; a run may take a second.
    session) echo "-max_len=16384 -timeout=30" ;;
    # The costliest hash the cap allows takes about a second (more under ASan).
    phc) echo "-max_len=1024 -timeout=30" ;;
    *) echo "-timeout=10" ;;
    esac
}

failed=()
summary=()
for t in "${targets[@]}"; do
    # The committed reproducers first: each must now pass.
    replay=ok
    if [ -d "$FUZZ/regressions/$t" ]; then
        for f in "$FUZZ/regressions/$t"/*; do
            [ -f "$f" ] || continue
            if ! "$bin_dir/$t" "$f" >"$logs/$t.replay.log" 2>&1; then
                replay=failed
                failed+=("$t: reproducer $(basename "$f") still fails")
                echo "$t: reproducer regressions/$t/$(basename "$f") still fails:" >&2
                grep -A2 'panicked at' "$logs/$t.replay.log" | head -3 | sed 's/^/    /' >&2 || true
            fi
        done
    fi

    corpus=$FUZZ/work/corpus/$t
    mkdir -p "$corpus" "$FUZZ/corpus/$t"
    log=$logs/$t.log
    echo "fuzzing $t for $EACH s"
    # shellcheck disable=SC2046 # the options are words
    if "${fuzz[@]}" run "${common[@]}" "$t" "$corpus" "$FUZZ/corpus/$t" -- \
        -max_total_time="$EACH" -print_final_stats=1 $(options "$t") >"$log" 2>&1; then
        result=ok
    else
        result=FOUND
        failed+=("$t: $(grep -m1 -oE 'Test unit written to .*' "$log" || echo "see $log")")
        grep -m1 -A2 'panicked at' "$log" | sed 's/^/    /' >&2 || true
        grep -m1 -E '^==[0-9]+== ERROR|^SUMMARY' "$log" | sed 's/^/    /' >&2 || true
    fi
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    cov=$(grep -oE 'cov: [0-9]+ ft: [0-9]+' "$log" | tail -1 | awk '{print $2 "/" $4}')
    size=$(grep -oE 'corp: [0-9]+' "$log" | tail -1 | awk '{print $2}')
    summary+=("$(printf '%-14s %-6s %-7s %10s %8s %12s %7s' "$t" "$result" "$replay" \
        "${runs:--}" "${rate:--}" "${cov:--}" "${size:--}")")
done

finished=$(date +%s)
echo
printf '%-14s %-6s %-7s %10s %8s %12s %7s\n' target fuzz replay execs exec/s cov/ft corpus
printf '%s\n' "${summary[@]}"
echo
echo "took $((finished - started)) s in all: $((built - started)) s building, $((finished - built)) s fuzzing ($EACH s per target, sanitizer $SANITIZER)"
if [ ${#failed[@]} -gt 0 ]; then
    echo
    echo "FAILED:"
    printf '  %s\n' "${failed[@]}"
    exit 1
fi
echo "nothing found"
