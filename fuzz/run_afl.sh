#!/usr/bin/env bash
# Coverage-guided fuzzing of every target of src/fuzzing.rs with AFL++ through cargo-afl (stable
# Rust; the pinned cargo-afl builds AFL++ from the source it ships).
#
#   fuzz/run_afl.sh [--minutes M] [--targets "image model_toml ..."] [--jobs J]
#
# Each target runs for M minutes (default 12: five targets x 12 min = 1 CPU-hour), J at a time
# (default: the number of cores). Afterwards, for each target: AFL++'s statistics are printed, its
# new corpus entries (minimised with afl-cmin) are copied to fuzz/corpus/<target>/afl-*, and every
# crash and hang to fuzz/regressions/<target>/ (tests/fuzz.rs replays both in every `make test`).
# Results are written to target/afl/summary.txt; record them in docs/FUZZING.md.
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_AFL_VERSION=0.17.1
TOOLS=$PWD/.tools/cargo-afl
MINUTES=12
JOBS=$(nproc)
TARGETS="image model_toml classify_request stream_request grpc_timeout segment_request"
while [[ $# -gt 0 ]]; do
    case $1 in
        --minutes) MINUTES=$2; shift ;;
        --targets) TARGETS=$2; shift ;;
        --jobs) JOBS=$2; shift ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
    shift
done

if [[ "$("$TOOLS/bin/cargo-afl" afl --version 2>/dev/null)" != *"$CARGO_AFL_VERSION"* ]]; then
    echo "installing cargo-afl $CARGO_AFL_VERSION into $TOOLS (builds AFL++; a few minutes)"
    cargo install cargo-afl --version "$CARGO_AFL_VERSION" --locked --root "$TOOLS"
fi
export PATH=$TOOLS/bin:$PATH
(cd fuzz && cargo afl build --release --locked)
BINARY=$PWD/fuzz/target/release/fuzz_target

# No core dumps to a pipe handler, no CPU frequency governor to check, in a container.
export AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_SKIP_CPUFREQ=1 AFL_NO_UI=1 AFL_NO_AFFINITY=1
OUT=target/afl
mkdir -p "$OUT"
run_target() {
    local t=$1
    rm -rf "${OUT:?}/$t"
    BRAINAI_FUZZ_TARGET=$t cargo afl fuzz -V $((MINUTES * 60)) -t 2000 -m none \
        -i "fuzz/corpus/$t" -o "$OUT/$t" -- "$BINARY" >"$OUT/$t.log" 2>&1 || true
}
running=0
for t in $TARGETS; do
    echo "fuzzing $t for $MINUTES min (log: $OUT/$t.log)"
    run_target "$t" &
    running=$((running + 1))
    if (( running >= JOBS )); then
        wait -n
        running=$((running - 1))
    fi
done
wait

SUMMARY=$OUT/summary.txt
: >"$SUMMARY"
for t in $TARGETS; do
    stats=$OUT/$t/default/fuzzer_stats
    [[ -f $stats ]] || { echo "$t: no fuzzer_stats (see $OUT/$t.log)" | tee -a "$SUMMARY"; continue; }
    get() { awk -F: -v k="$1" '$1 ~ "^"k" *$" { gsub(/ /, "", $2); print $2 }' "$stats"; }
    line="$t: $(get execs_done) execs in $(get run_time) s, $(get corpus_count) corpus entries, \
edges $(get edges_found)/$(get total_edges), crashes $(get saved_crashes), hangs $(get saved_hangs)"
    echo "$line" | tee -a "$SUMMARY"
    mkdir -p "fuzz/regressions/$t"
    for f in "$OUT/$t"/default/crashes/id:* "$OUT/$t"/default/hangs/id:*; do
        [[ -f $f ]] && cp "$f" "fuzz/regressions/$t/afl-$(sha256sum "$f" | cut -c1-16)"
    done
    # Keep the corpus small: the inputs that still cover everything the queue covers.
    rm -rf "$OUT/$t.min"
    if BRAINAI_FUZZ_TARGET=$t cargo afl cmin -i "$OUT/$t/default/queue" -o "$OUT/$t.min" -T 1 -- "$BINARY" \
        >"$OUT/$t.cmin.log" 2>&1; then
        rm -f "fuzz/corpus/$t"/afl-*
        for f in "$OUT/$t.min"/*; do
            [[ -f $f ]] && cp "$f" "fuzz/corpus/$t/afl-$(sha256sum "$f" | cut -c1-16)"
        done
        echo "  corpus: $(ls "fuzz/corpus/$t" | wc -l) files ($(du -sh "fuzz/corpus/$t" | cut -f1))" | tee -a "$SUMMARY"
    else
        echo "  afl-cmin failed (see $OUT/$t.cmin.log); corpus unchanged" | tee -a "$SUMMARY"
    fi
done
echo "summary: $SUMMARY"
