#!/usr/bin/env bash
# The DICOM node end to end (issue 25): one FLAIR series of 155 slices of 240×240 (a sphere
# phantom, tests/dicom/make_study.py) stored by dcmtk's storescu, classified by the default model
# (ResNet-50, every slice), its Comprehensive SR received by dcmtk's storescp (AE ARCHIVE).
#   node:   `brainai serve --dicom-addr ... --dicom-trigger association`: the series is spooled,
#           classified when storescu releases the association, the SR delivered by the node.
#           Breakdown: store (storescu's wall time), the server's audit records' latency_ms of
#           "DICOM series classification" (processing) and "DICOM delivery to ARCHIVE", other
#           (hand-offs between them).
#   engine: the integration-engine pattern as the anchor: benches/dicom_engine.py (a pynetdicom
#           Storage SCP keeping the instances in memory; on association release it calls the same
#           server's gRPC ClassifySeries with structured_report=true, then C-STOREs the SR with
#           pynetdicom). Breakdown: store, the gRPC call (and the server's own latency_ms of it,
#           from the audit record), C-STORE out, other.
# One server process serves both paths (same binary, model, flags): only the front end differs.
# Wall time of a job: from storescu's start to the SR's arrival at storescp (storescp's
# --exec-on-reception stamps it). Rounds alternate the two (order swapped every round) after one
# untimed 8-slice warm-up job each; the ratios are of the medians. Every wait is bounded.
# dcmtk without TCP_NODELAY=1 in its environment leaves Nagle's algorithm on and stalls ~40 ms
# per instance on delayed ACKs, so every dcmtk tool here runs with TCP_NODELAY=1 (both paths).
# Usage: benches/dicom_node.sh [ROUNDS]   (needs make build model dicom-reference dicom-tools)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-5}
BIN=target/release/brainai
PY=.venv/bin/python
MODEL_DIR=models/brain-tumor-resnet50
MODEL=brain-tumor-resnet50
JOB_TIMEOUT_S=120
export TCP_NODELAY=1
for tool in storescu storescp echoscu dcmdump; do
    command -v "$tool" >/dev/null || { echo "error: $tool not found: make dicom-tools (Debian's dcmtk)"; exit 1; }
done
DESCRIPTOR=$(ls -t target/release/build/brainai-serve-*/out/brainai_descriptor.bin 2>/dev/null | head -1)
[[ -n $DESCRIPTOR ]] || { echo "error: no brainai_descriptor.bin under target/release/build: make build"; exit 1; }

WORK=$(mktemp -d)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
fail() {
    echo "error: $*" >&2
    for log in "$WORK"/*.log "$WORK"/*.jsonl; do [[ -f $log ]] && { echo "--- $log" >&2; tail -8 "$log" | cut -c1-400 >&2; }; done
    [[ -n ${METRICS:-} ]] && curl -fsS -m 5 "http://127.0.0.1:$METRICS/metrics" 2>/dev/null | grep '^brainai_dicom' >&2
    exit 1
}

UID_ROOT=1.2.826.0.1.3680043.10.1087.25
# The measured series (155 slices) and a short one (8 slices) for the untimed warm-up jobs.
series() { echo "{\"uid\": \"$UID_ROOT.$1\", \"description\": \"AX FLAIR\", \"rows\": 240, \"columns\": 240, \"spacing\": [1.0, 1.0], \"origin\": [-120, -120, 0], \"slices\": $2, \"step\": 1.0}"; }
SPEC="{\"study_uid\": \"$UID_ROOT\", \"patient_id\": \"BENCH\", \"frame_of_reference_uid\": \"$UID_ROOT.9\",
  \"sphere\": {\"center\": [10.2, -5.3, 77.4], \"radius\": 30, \"inside\": 900, \"outside\": 100},
  \"series\": [$(series 1 155), $(series 2 8)]}"
"$PY" tests/dicom/make_study.py "$WORK/study" "$SPEC"
SERIES="$WORK/study/$UID_ROOT.1"
WARMUP="$WORK/study/$UID_ROOT.2"
echo "series: $(find "$SERIES" -name '*.dcm' | wc -l) instances, $(du -sk "$SERIES" | cut -f1) KiB"

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
GRPC=$(free_port); HTTP=$(free_port); METRICS=$(free_port); NODE=$(free_port); ENGINE=$(free_port); ARCHIVE=$(free_port)
wait_echo() { # AE PORT: C-ECHO until it answers (bounded)
    for _ in $(seq 300); do echoscu -to 2 -aet STORESCU -aec "$1" 127.0.0.1 "$2" >/dev/null 2>&1 && return 0; sleep 0.1; done
    fail "no C-ECHO answer from $1 on port $2"
}

# The destination: storescp stamps each received file's arrival (epoch seconds) into arrivals.
mkdir -p "$WORK/archive"
: >"$WORK/arrivals"
storescp -aet ARCHIVE -od "$WORK/archive" +uf -xcr "echo #f \$(date +%s.%N) >>$WORK/arrivals" \
    "$ARCHIVE" >"$WORK/storescp.log" 2>&1 &
PIDS+=($!)

# The series is one classification call of 155 images: --max-images-per-request (default 64) must
# allow it, and --stat-queue-capacity must be at least that. --max-queue-wait-ms 0: with the default
# 10 s a 155-slice series estimated (from measured batch times) to take longer, as on a busy
# 2-core machine, is refused RESOURCE_EXHAUSTED (and the node retries it at every tick).
"$BIN" serve --model-dir "$MODEL_DIR" --grpc-addr "127.0.0.1:$GRPC" --http-addr "127.0.0.1:$HTTP" \
    --metrics-addr "127.0.0.1:$METRICS" --audit-log "$WORK/audit.jsonl" --max-images-per-request 160 --stat-queue-capacity 160 --max-queue-wait-ms 0 \
    --dicom-addr "127.0.0.1:$NODE" --dicom-allow 'STORESCU@127.0.0.1' \
    --dicom-destination "ARCHIVE@127.0.0.1:$ARCHIVE" --dicom-trigger association \
    --dicom-route "model=$MODEL" --dicom-spool-dir "$WORK/spool" --dicom-outbox-dir "$WORK/outbox" \
    >"$WORK/server.log" 2>&1 &
SERVER=$!
PIDS+=($SERVER)
for i in $(seq 600); do
    curl -fsS "http://127.0.0.1:$HTTP/v2/health/ready" >/dev/null 2>&1 && break
    kill -0 "$SERVER" 2>/dev/null || fail "the server exited"
    [[ $i == 600 ]] && fail "the server was not ready within 60 s"
    sleep 0.1
done

"$PY" benches/dicom_engine.py --port "$ENGINE" --ae-title ENGINE --grpc "127.0.0.1:$GRPC" \
    --descriptor "$DESCRIPTOR" --model "$MODEL" --destination "ARCHIVE@127.0.0.1:$ARCHIVE" \
    --timings "$WORK/engine.jsonl" >"$WORK/engine.log" 2>&1 &
PIDS+=($!)
: >"$WORK/engine.jsonl"
wait_echo ARCHIVE "$ARCHIVE"
wait_echo BRAINAI "$NODE"
wait_echo ENGINE "$ENGINE"

# One job: PATH (node|engine) [DIR INSTANCES] → "wall store breakdown..." in $WORK/job.out (not in
# a subshell, so that fail stops the bench). "beside" is the wall time minus the server's own
# classification call: what the front end (receiving, hand-offs, the call, sending) costs.
job() {
    local path=$1 dir=${2:-$SERIES} count=${3:-155} port called arrivals_before audit_before engine_before start stored end
    if [[ $path == node ]]; then port=$NODE; called=BRAINAI; else port=$ENGINE; called=ENGINE; fi
    arrivals_before=$(wc -l <"$WORK/arrivals")
    audit_before=$(wc -l <"$WORK/audit.jsonl")
    engine_before=$(wc -l <"$WORK/engine.jsonl")
    start=$(date +%s.%N)
    timeout "$JOB_TIMEOUT_S" storescu -aec "$called" +sd +r 127.0.0.1 "$port" "$dir" >"$WORK/storescu.log" 2>&1 ||
        fail "storescu to $path failed"
    stored=$(date +%s.%N)
    for i in $(seq $((JOB_TIMEOUT_S * 20))); do
        (($(wc -l <"$WORK/arrivals") > arrivals_before)) && break
        [[ $i == $((JOB_TIMEOUT_S * 20)) ]] && fail "no SR reached storescp within $JOB_TIMEOUT_S s ($path)"
        sleep 0.05
    done
    end=$(tail -n +$((arrivals_before + 1)) "$WORK/arrivals" | head -1 | cut -d' ' -f2)
    # The records written after the SR left: the node's delivery record, the engine's timings line.
    for i in $(seq 200); do
        if [[ $path == node ]]; then
            tail -n +$((audit_before + 1)) "$WORK/audit.jsonl" | grep -q '"DICOM delivery' && break
        else
            (($(wc -l <"$WORK/engine.jsonl") > engine_before)) && break
        fi
        [[ $i == 200 ]] && fail "no delivery record within 10 s ($path)"
        sleep 0.05
    done
    tail -n +$((audit_before + 1)) "$WORK/audit.jsonl" >"$WORK/audit.new"
    tail -n +$((engine_before + 1)) "$WORK/engine.jsonl" >"$WORK/engine.new"
    "$PY" - "$path" "$start" "$stored" "$end" "$WORK/audit.new" "$WORK/engine.new" "$count" >"$WORK/job.out" <<'EOF' ||
import json, sys
path, start, stored, end = sys.argv[1], *map(float, sys.argv[2:5])
audit = [json.loads(l) for l in open(sys.argv[5]) if l.strip()]
def latency(prefix):
    hits = [r for r in audit if r["method"].startswith(prefix)]
    if not hits or any(r["outcome"] not in ("OK", "ok", "delivered") for r in hits):
        sys.exit(f"{path}: audit records {prefix!r}: {hits}")
    return hits[-1]["latency_ms"] / 1e3
wall, store = end - start, stored - start
if path == "node":
    proc, deliver = latency("DICOM series classification"), latency("DICOM delivery")
    other = wall - store - proc - deliver
    print(f"{wall:.3f} {store:.3f} processing {proc:.2f} delivery {deliver:.3f} other {other:.3f} beside {wall - proc:.3f}")
else:
    e = json.loads(open(sys.argv[6]).readline())
    if e.get("status") != "ok" or e.get("instances") != int(sys.argv[7]):
        sys.exit(f"engine: {e}")
    server = latency("brainai.v1.TumorClassifier/ClassifySeries")
    grpc = e["grpc_end"] - e["grpc_start"]
    cstore = end - e["cstore_start"]
    other = wall - store - grpc - cstore
    print(f"{wall:.3f} {store:.3f} grpc {grpc:.2f} (server {server:.2f}) cstore-out {cstore:.3f} other {other:.3f} beside {wall - server:.3f}")
EOF
        fail "$path: the job's records"
}

job node "$WARMUP" 8; warm_node=$(cut -d' ' -f1 "$WORK/job.out")
job engine "$WARMUP" 8; warm_engine=$(cut -d' ' -f1 "$WORK/job.out")
echo "warm-up (8 slices, not counted): node $warm_node s, engine $warm_engine s"
: >"$WORK/rounds"
for round in $(seq "$ROUNDS"); do
    if ((round % 2)); then order="node engine"; else order="engine node"; fi
    for path in $order; do
        job "$path"
        r=$(cat "$WORK/job.out")
        read -r wall store detail <<<"$r"
        printf 'round %d %-6s: %6.2f s  (store %.2f, %s)\n' "$round" "$path" "$wall" "$store" "$detail"
        echo "$path $r" >>"$WORK/rounds"
    done
done

received=$(find "$WORK/archive" -type f | wc -l)
((received == 2 * ROUNDS + 2)) || fail "storescp holds $received objects, not $((2 * ROUNDS + 2))"
sample=$(find "$WORK/archive" -type f | head -1)
sop_class=$(dcmdump +P 0008,0016 "$sample" 2>&1 || true)
[[ $sop_class =~ =ComprehensiveSRStorage|1\.2\.840\.10008\.5\.1\.4\.1\.1\.88\.33 ]] || fail "$sample is not a Comprehensive SR: $sop_class"
echo "storescp received $received Comprehensive SR objects (one per job)"

median() { sort -n | awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }
col() { awk -v p="$1" -v k="$2" '$1 == p {for (i = 1; i <= NF; i++) if ($i == k) print $(i + 1)}' "$WORK/rounds"; }
n_wall=$(awk '$1 == "node" {print $2}' "$WORK/rounds" | median)
e_wall=$(awk '$1 == "engine" {print $2}' "$WORK/rounds" | median)
n_store=$(awk '$1 == "node" {print $3}' "$WORK/rounds" | median)
e_store=$(awk '$1 == "engine" {print $3}' "$WORK/rounds" | median)
echo
echo "machine: $(nproc) CPUs, $(lscpu | sed -n 's/^Model name: *//p' | head -1); load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "rounds: $ROUNDS; medians of each column (s):"
printf '| path | wall | store (storescu) | classify | SR out | other | wall beside the model call |\n|---|---|---|---|---|---|---|\n'
printf '| node (--dicom-addr) | %.2f | %.2f | %.2f (audit) | %.3f (audit) | %.3f | %.2f |\n' "$n_wall" "$n_store" \
    "$(col node processing | median)" "$(col node delivery | median)" "$(col node other | median)" "$(col node beside | median)"
printf '| engine (pynetdicom + gRPC) | %.2f | %.2f | %.2f (gRPC call; server %.2f) | %.3f | %.3f | %.2f |\n' "$e_wall" "$e_store" \
    "$(col engine grpc | median)" "$(awk '$1 == "engine" {gsub(/\)/, "", $7); print $7}' "$WORK/rounds" | median)" \
    "$(col engine cstore-out | median)" "$(col engine other | median)" "$(col engine beside | median)"
printf 'ratio engine / node: wall %.2f, beside the model call %.2f\n' "$(echo "$e_wall / $n_wall" | bc -l)" \
    "$(echo "$(col engine beside | median) / $(col node beside | median)" | bc -l)"
