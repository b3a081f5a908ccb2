#!/usr/bin/env bash
# Load test of BrainAI Serve with ghz: starts the release server on loopback ports, runs ghz,
# scrapes /metrics around every run, prints one summary per run, stops the server (SIGTERM,
# exit 0 expected). See tests/load/README.md.
#
#   tests/load/run_load.sh            # reference ResNet-50: fixed concurrency, then fixed rate
#   tests/load/run_load.sh --smoke    # CI: tiny model, ~10 s of load, fails on errors / no batching
#   tests/load/run_load.sh --help
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
LOAD_DIR=tests/load
PY=${PYTHON:-python3}
TOOL="$PY $LOAD_DIR/loadtool.py"

usage() {
    cat <<'EOF'
usage: tests/load/run_load.sh [--smoke] [options]

  --smoke                  CI mode: tiny test model, concurrency 16 for 6 s, 2 s runs of Classify
                           via reflection, of ModelInfer (Open Inference Protocol) via reflection and
                           of ClassifyStream; fails on any error response or when no batch larger
                           than 1 was formed
  --model-dir DIR          model to serve (env MODEL_DIR; default models/brain-tumor-resnet50,
                           smoke: tests/fixtures/models/tiny)
  --runs "R1 R2 ..."       runs, in order, from: concurrency rate reflection oip stream
                           (env LOAD_RUNS; default "concurrency rate oip", smoke "concurrency
                           reflection oip stream"; oip: inference.GRPCInferenceService/ModelInfer)
  --duration D             length of the concurrency and rate runs, e.g. 30s, 2m (env LOAD_DURATION; 30s, smoke 6s)
  --short-duration D       length of the reflection, oip and stream runs (env LOAD_SHORT_DURATION; 10s, smoke 2s)
  --concurrency N          ghz workers of the concurrency, reflection and oip runs (env LOAD_CONCURRENCY; 8, smoke 16)
  --rps N                  request rate of the rate run (env LOAD_RPS; 10, smoke 100)
  --rps-concurrency N      ghz workers of the rate run, the most calls in flight (env LOAD_RPS_CONCURRENCY; 32)
  --stream-concurrency N   concurrent ClassifyStream calls (env LOAD_STREAM_CONCURRENCY; 4)
  --stream-messages N      images sent on each ClassifyStream call (env LOAD_STREAM_MESSAGES; 8)
  --images-per-request N   images in each Classify request (env LOAD_IMAGES_PER_REQUEST; 1)
  --images LIST            comma-separated files under tests/data to send, cycled (env LOAD_IMAGES;
                           default: all nine valid test images, 256x256 to 512x512, PNG and JPEG)
  --server-arg ARG         extra `brainai serve` flag, repeatable, e.g. --server-arg=--max-batch-size=16
                           (env SERVER_ARGS, space-separated; smoke adds --max-queue-delay-us 5000
                           --intra-op-threads 1 first)
  --out DIR                results (env LOAD_OUT; default target/load/full or target/load/smoke)
  --check                  apply the smoke checks in a full run too

Other environment: BRAINAI_BIN (default target/release/brainai), GHZ (a ghz binary; default: the
pinned one, installed into .tools/bin by tests/load/install_ghz.sh), GRPC_PORT / METRICS_PORT
(default: free loopback ports), PYTHON (default python3; only the standard library is used),
READY_TIMEOUT_S (default 180), SERVER_CPUS / CLIENT_CPUS (taskset CPU lists: run the server and
ghz on these CPUs only, e.g. SERVER_CPUS=0 CLIENT_CPUS=1; default: anywhere).
EOF
}

# ---- options -----------------------------------------------------------------------------
SMOKE=0
CHECK=0
EXTRA_SERVER_ARGS=()
read -r -a ENV_SERVER_ARGS <<<"${SERVER_ARGS:-}"
while [[ $# -gt 0 ]]; do
    case $1 in
        --smoke) SMOKE=1 ;;
        --check) CHECK=1 ;;
        --model-dir) MODEL_DIR=$2; shift ;;
        --model-dir=*) MODEL_DIR=${1#*=} ;;
        --runs) LOAD_RUNS=$2; shift ;;
        --runs=*) LOAD_RUNS=${1#*=} ;;
        --duration) LOAD_DURATION=$2; shift ;;
        --duration=*) LOAD_DURATION=${1#*=} ;;
        --short-duration) LOAD_SHORT_DURATION=$2; shift ;;
        --short-duration=*) LOAD_SHORT_DURATION=${1#*=} ;;
        --concurrency) LOAD_CONCURRENCY=$2; shift ;;
        --concurrency=*) LOAD_CONCURRENCY=${1#*=} ;;
        --rps) LOAD_RPS=$2; shift ;;
        --rps=*) LOAD_RPS=${1#*=} ;;
        --rps-concurrency) LOAD_RPS_CONCURRENCY=$2; shift ;;
        --rps-concurrency=*) LOAD_RPS_CONCURRENCY=${1#*=} ;;
        --stream-concurrency) LOAD_STREAM_CONCURRENCY=$2; shift ;;
        --stream-concurrency=*) LOAD_STREAM_CONCURRENCY=${1#*=} ;;
        --stream-messages) LOAD_STREAM_MESSAGES=$2; shift ;;
        --stream-messages=*) LOAD_STREAM_MESSAGES=${1#*=} ;;
        --images-per-request) LOAD_IMAGES_PER_REQUEST=$2; shift ;;
        --images-per-request=*) LOAD_IMAGES_PER_REQUEST=${1#*=} ;;
        --server-arg) EXTRA_SERVER_ARGS+=("$2"); shift ;;
        --server-arg=*) EXTRA_SERVER_ARGS+=("${1#*=}") ;;
        --images) LOAD_IMAGES=$2; shift ;;
        --images=*) LOAD_IMAGES=${1#*=} ;;
        --out) LOAD_OUT=$2; shift ;;
        --out=*) LOAD_OUT=${1#*=} ;;
        -h|--help) usage; exit 0 ;;
        *) echo "error: unknown option '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done

if [[ $SMOKE == 1 ]]; then
    CHECK=1
    MODEL_DIR=${MODEL_DIR:-tests/fixtures/models/tiny}
    LOAD_RUNS=${LOAD_RUNS:-concurrency reflection oip stream}
    LOAD_DURATION=${LOAD_DURATION:-6s}
    LOAD_SHORT_DURATION=${LOAD_SHORT_DURATION:-2s}
    LOAD_CONCURRENCY=${LOAD_CONCURRENCY:-16}
    LOAD_RPS=${LOAD_RPS:-100}
    LOAD_OUT=${LOAD_OUT:-target/load/smoke}
    # A generous batching window and one ORT thread: batches form even on a slow, shared 2-core
    # runner, and the server leaves CPU to ghz.
    SERVER_ARGS_ALL=(--max-queue-delay-us 5000 --intra-op-threads 1)
else
    MODEL_DIR=${MODEL_DIR:-models/brain-tumor-resnet50}
    LOAD_RUNS=${LOAD_RUNS:-concurrency rate oip}
    LOAD_DURATION=${LOAD_DURATION:-30s}
    LOAD_SHORT_DURATION=${LOAD_SHORT_DURATION:-10s}
    LOAD_CONCURRENCY=${LOAD_CONCURRENCY:-8}
    LOAD_RPS=${LOAD_RPS:-10}
    LOAD_OUT=${LOAD_OUT:-target/load/full}
    SERVER_ARGS_ALL=()
fi
LOAD_RPS_CONCURRENCY=${LOAD_RPS_CONCURRENCY:-32}
LOAD_STREAM_CONCURRENCY=${LOAD_STREAM_CONCURRENCY:-4}
LOAD_STREAM_MESSAGES=${LOAD_STREAM_MESSAGES:-8}
LOAD_IMAGES_PER_REQUEST=${LOAD_IMAGES_PER_REQUEST:-1}
READY_TIMEOUT_S=${READY_TIMEOUT_S:-180}
SERVER_ARGS_ALL+=("${ENV_SERVER_ARGS[@]}" "${EXTRA_SERVER_ARGS[@]}")
BRAINAI_BIN=${BRAINAI_BIN:-target/release/brainai}
# taskset prefixes (empty: no pinning); taskset execs the command, so $! is the server's own pid.
SERVER_PIN=()
CLIENT_PIN=()
[[ -n ${SERVER_CPUS:-} ]] && SERVER_PIN=(taskset -c "$SERVER_CPUS")
[[ -n ${CLIENT_CPUS:-} ]] && CLIENT_PIN=(taskset -c "$CLIENT_CPUS")

die() { echo "load test FAILED: $*" >&2; exit 1; }

# "30s" / "2m" / "45" -> seconds (also checks the value, so ghz never gets an unbounded run)
seconds_of() {
    local v=$1
    [[ $v =~ ^([0-9]+)(s|m)?$ ]] || die "duration '$v': use whole seconds or minutes, e.g. 30s or 2m"
    local n=${BASH_REMATCH[1]}
    [[ ${BASH_REMATCH[2]} == m ]] && n=$((n * 60))
    (( n >= 1 && n <= 3600 )) || die "duration '$v' must be between 1 s and 60 min"
    echo "$n"
}
positive() { [[ $2 =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive integer, got '$2'"; }
DUR_S=$(seconds_of "$LOAD_DURATION")
SHORT_S=$(seconds_of "$LOAD_SHORT_DURATION")
positive --concurrency "$LOAD_CONCURRENCY"
positive --rps "$LOAD_RPS"
positive --rps-concurrency "$LOAD_RPS_CONCURRENCY"
positive --stream-concurrency "$LOAD_STREAM_CONCURRENCY"
positive --stream-messages "$LOAD_STREAM_MESSAGES"
positive --images-per-request "$LOAD_IMAGES_PER_REQUEST"
for run in $LOAD_RUNS; do
    case $run in concurrency|rate|reflection|oip|stream) ;; *) die "unknown run '$run' (concurrency rate reflection oip stream)" ;; esac
done

# ---- prerequisites -----------------------------------------------------------------------
command -v "$PY" >/dev/null || die "$PY not found (set PYTHON)"
[[ -x $BRAINAI_BIN ]] || die "$BRAINAI_BIN not found: build it with 'make build' (or set BRAINAI_BIN)"
[[ -f $MODEL_DIR/model.toml ]] || die "$MODEL_DIR/model.toml not found (for the default model run 'make model')"
compgen -G "$MODEL_DIR/*/model.onnx" >/dev/null || die "no $MODEL_DIR/<version>/model.onnx (for the default model run 'make model')"
if [[ -z ${GHZ:-} ]]; then
    GHZ=$("$LOAD_DIR/install_ghz.sh" | tail -n 1)
fi
[[ -x $GHZ ]] || die "ghz not found at '$GHZ'"

# The results directory is emptied first, but only one this script made (marked) or an empty one.
if [[ -d $LOAD_OUT && -n $(ls -A "$LOAD_OUT") && ! -f $LOAD_OUT/.brainai-load ]]; then
    die "--out $LOAD_OUT exists and was not made by this script: choose another or empty it"
fi
rm -rf "$LOAD_OUT"
mkdir -p "$LOAD_OUT"
touch "$LOAD_OUT/.brainai-load"
DATA=$LOAD_OUT/data
SUMMARY=$LOAD_OUT/summary.txt
IMAGES_ARG=()
[[ -n ${LOAD_IMAGES:-} ]] && IMAGES_ARG=(--images "$LOAD_IMAGES")
$TOOL make-data --out "$DATA" --images-per-request "$LOAD_IMAGES_PER_REQUEST" \
    --stream-messages "$LOAD_STREAM_MESSAGES" "${IMAGES_ARG[@]}"

FIXED_PORTS=0
[[ -n ${GRPC_PORT:-} || -n ${METRICS_PORT:-} ]] && FIXED_PORTS=1
pick_ports() {
    GRPC_PORT=${GRPC_PORT:-$($TOOL free-port)}
    METRICS_PORT=${METRICS_PORT:-$($TOOL free-port)}
    [[ $GRPC_PORT != "$METRICS_PORT" ]] || METRICS_PORT=$($TOOL free-port)
    HTTP_PORT=${HTTP_PORT:-$($TOOL free-port)}
    while [[ $HTTP_PORT == "$GRPC_PORT" || $HTTP_PORT == "$METRICS_PORT" ]]; do HTTP_PORT=$($TOOL free-port); done
    HOST=127.0.0.1:$GRPC_PORT
}

# ---- server ------------------------------------------------------------------------------
SERVER_PID=
SERVER_LOG=$LOAD_OUT/server.log

# CPU time the server process has used so far, in clock ticks (utime + stime of /proc/PID/stat).
cpu_ticks() { awk '{ sub(/.*\) /, ""); print $12 + $13 }' "/proc/$1/stat" 2>/dev/null || echo 0; }

# State of a child process: R/S/D/... while it runs, Z once it exited (before `wait`), empty when gone.
proc_state() { [[ -r /proc/$1/stat ]] && awk '{ sub(/.*\) /, ""); print $1 }' "/proc/$1/stat" 2>/dev/null || true; }
running() { local s; s=$(proc_state "$1"); [[ -n $s && $s != Z ]]; }

# SIGTERM, wait up to $2 s for the exit, SIGKILL after that; sets STOP_RC to the exit status.
stop_server() {
    local pid=$1 limit=$2 i
    STOP_RC=0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < limit * 10; i++)); do
        running "$pid" || break
        sleep 0.1
    done
    if running "$pid"; then
        echo "the server did not exit ${limit} s after SIGTERM: killing it" >&2
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" || STOP_RC=$?
}

cleanup() {
    if [[ -n $SERVER_PID ]]; then
        stop_server "$SERVER_PID" 40
        SERVER_PID=
    fi
}
GHZ_PID=
on_signal() {
    [[ -n $GHZ_PID ]] && kill -TERM "$GHZ_PID" 2>/dev/null
    echo "interrupted: stopping" >&2
    exit 130
}
trap cleanup EXIT
trap on_signal INT TERM

START_S=$(date +%s)
# Free ports are picked before the server binds them; should another process take one in between,
# start again on new ports (at most 3 tries; not with GRPC_PORT/METRICS_PORT given).
for attempt in 1 2 3; do
    pick_ports
    echo "server: $BRAINAI_BIN serve --model-dir $MODEL_DIR --grpc-addr $HOST --http-addr 127.0.0.1:$HTTP_PORT --metrics-addr 127.0.0.1:$METRICS_PORT ${SERVER_ARGS_ALL[*]}"
    "${SERVER_PIN[@]}" "$BRAINAI_BIN" serve --model-dir "$MODEL_DIR" --grpc-addr "$HOST" \
        --http-addr "127.0.0.1:$HTTP_PORT" --metrics-addr "127.0.0.1:$METRICS_PORT" "${SERVER_ARGS_ALL[@]}" >"$SERVER_LOG" 2>&1 &
    SERVER_PID=$!
    if $TOOL wait-ready --port "$METRICS_PORT" --pid "$SERVER_PID" --timeout "$READY_TIMEOUT_S"; then
        break
    fi
    stop_server "$SERVER_PID" 10
    SERVER_PID=
    if [[ $FIXED_PORTS == 0 && $attempt -lt 3 ]] && grep -q "Address already in use" "$SERVER_LOG"; then
        echo "a port was taken meanwhile: retrying on other ports" >&2
        unset GRPC_PORT METRICS_PORT HTTP_PORT
        continue
    fi
    echo "load test FAILED: the server did not become ready; last lines of $SERVER_LOG:" >&2
    tail -n 20 "$SERVER_LOG" >&2
    exit 1
done
echo "server ready after $(( $(date +%s) - START_S )) s (log: $SERVER_LOG)"
echo "ghz: $GHZ ($(go version -m "$GHZ" 2>/dev/null | awk '$1 == "mod" { print $3 }')), results: $LOAD_OUT"
echo

# ---- runs --------------------------------------------------------------------------------
FAILED=()
LOAD_START_S=$(date +%s)

# run NAME RPC CONFIG DURATION_S DESCRIPTION [summarize checks...] -- [ghz args...]
run() {
    local name=$1 rpc=$2 config=$3 dur_s=$4 desc=$5
    shift 5
    local checks=()
    while [[ $1 != -- ]]; do checks+=("$1"); shift; done
    shift
    local report=$LOAD_OUT/$name.json before=$LOAD_OUT/$name.metrics-before.txt after=$LOAD_OUT/$name.metrics-after.txt
    local data=$DATA/classify.json
    [[ $rpc == ClassifyStream ]] && data=$DATA/classify_stream.json
    [[ $rpc == ModelInfer ]] && data=$DATA/modelinfer.json

    $TOOL scrape --port "$METRICS_PORT" --out "$before"
    local cpu_before
    cpu_before=$(cpu_ticks "$SERVER_PID")
    # -z bounds the run; duration-stop=wait (in the config) lets in-flight calls finish instead of
    # cutting them off as errors. The outer timeout is a hang guard only.
    # In the background + `wait`, so that SIGINT/SIGTERM are handled at once (see on_signal).
    local rc=0
    timeout --signal=TERM --kill-after=10 $((dur_s + 90)) \
        "${CLIENT_PIN[@]}" "$GHZ" --config "$LOAD_DIR/$config" --data-file "$data" --duration "${dur_s}s" \
        --name "$name" --format json --output "$report" "$@" "$HOST" &
    GHZ_PID=$!
    wait "$GHZ_PID" || rc=$?
    GHZ_PID=
    if [[ $rc != 0 ]]; then
        echo "load test FAILED [$name]: ghz exited with status $rc" >&2
        FAILED+=("$name")
        return
    fi
    local cpu_used=$(( $(cpu_ticks "$SERVER_PID") - cpu_before ))
    $TOOL scrape --port "$METRICS_PORT" --out "$after"
    if ! $TOOL summarize --name "$name" --rpc "$rpc" --description "$desc" --report "$report" \
        --before "$before" --after "$after" --port "$METRICS_PORT" \
        --server-cpu-s "$(awk -v t="$cpu_used" -v hz="$(getconf CLK_TCK)" 'BEGIN { print t / hz }')" \
        --summary-json "$LOAD_OUT/$name.summary.json" --summary-text "$SUMMARY" "${checks[@]}"; then
        FAILED+=("$name")
    fi
    echo
    running "$SERVER_PID" || die "the server exited during run '$name'; see $SERVER_LOG"
}

NO_ERRORS=()
[[ $CHECK == 1 ]] && NO_ERRORS=(--check-no-errors)
for r in $LOAD_RUNS; do
    case $r in
        concurrency)
            BATCH=()
            [[ $CHECK == 1 ]] && BATCH=(--check-batching)
            run concurrency Classify classify.ghz.json "$DUR_S" \
                "Classify, $LOAD_CONCURRENCY concurrent workers, ${DUR_S} s, ${LOAD_IMAGES_PER_REQUEST} image(s)/request, proto file" \
                "${NO_ERRORS[@]}" "${BATCH[@]}" -- --concurrency "$LOAD_CONCURRENCY" ;;
        rate)
            run rate Classify classify.ghz.json "$DUR_S" \
                "Classify at $LOAD_RPS requests/s (up to $LOAD_RPS_CONCURRENCY in flight), ${DUR_S} s, proto file" \
                "${NO_ERRORS[@]}" -- --rps "$LOAD_RPS" --concurrency "$LOAD_RPS_CONCURRENCY" ;;
        reflection)
            run reflection Classify classify-reflection.ghz.json "$SHORT_S" \
                "Classify via server reflection (no proto file), $LOAD_CONCURRENCY workers, ${SHORT_S} s" \
                "${NO_ERRORS[@]}" -- --concurrency "$LOAD_CONCURRENCY" ;;
        oip)
            run oip ModelInfer modelinfer-reflection.ghz.json "$SHORT_S" \
                "ModelInfer (Open Inference Protocol) via server reflection, $LOAD_CONCURRENCY workers, ${SHORT_S} s" \
                "${NO_ERRORS[@]}" -- --concurrency "$LOAD_CONCURRENCY" ;;
        stream)
            STREAM_CHECK=()
            [[ $CHECK == 1 ]] && STREAM_CHECK=(--check-stream-images "$LOAD_STREAM_MESSAGES")
            run stream ClassifyStream classify-stream.ghz.json "$SHORT_S" \
                "ClassifyStream, $LOAD_STREAM_CONCURRENCY concurrent streams of $LOAD_STREAM_MESSAGES images, ${SHORT_S} s" \
                "${NO_ERRORS[@]}" "${STREAM_CHECK[@]}" -- --concurrency "$LOAD_STREAM_CONCURRENCY" ;;
    esac
done
LOAD_S=$(( $(date +%s) - LOAD_START_S ))

# ---- stop --------------------------------------------------------------------------------
stop_server "$SERVER_PID" 60
SERVER_PID=
if [[ $STOP_RC != 0 ]]; then
    echo "load test FAILED: the server exited with status $STOP_RC after SIGTERM (expected 0); see $SERVER_LOG" >&2
    FAILED+=(shutdown)
else
    echo "server stopped (SIGTERM, exit 0)"
fi
echo "load phase ${LOAD_S} s, total $(( $(date +%s) - START_S )) s; summaries in $SUMMARY, ghz reports in $LOAD_OUT/*.json"
if [[ ${#FAILED[@]} -gt 0 ]]; then
    echo "load test FAILED: ${FAILED[*]}" >&2
    exit 1
fi
[[ $CHECK == 1 ]] && echo "load test passed: every check held (no error responses; concurrent load batched; every streamed image classified)"
exit 0
