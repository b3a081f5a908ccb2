#!/usr/bin/env bash
# A BraTS-sized study end to end (issue 24): 3 series (FLAIR, T1c, T2) of 155 slices of 240×240
# (1 mm), a sphere phantom, segmented by the default U-Net.
#   service: the release binary serving models/, `brainai segment --study DIR --seg-out OUT`
#            (client reading the files and streaming them, the server's headers, decoding,
#            alignment, batches, masks, volumes, the DICOM SEG), wall time, the server's breakdown
#            and the server's peak RSS (VmHWM);
#   python:  benches/study_python.py, the same job as a research script (pydicom + numpy +
#            onnxruntime + highdicom), wall time, breakdown and peak RSS.
# Rounds alternate the two, side by side; the ratio is of the medians.
# Usage: benches/study.sh [ROUNDS]   (needs make build model dicom-reference)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
BIN=target/release/brainai
PY=.venv/bin/python
WORK=$(mktemp -d)
SERVER=
cleanup() {
    [[ -n $SERVER ]] && kill -TERM "$SERVER" 2>/dev/null && wait "$SERVER" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT

STUDY_UID=1.2.826.0.1.3680043.10.1087.24
series() { echo "{\"uid\": \"$STUDY_UID.$1\", \"description\": \"$2\", \"rows\": 240, \"columns\": 240, \"spacing\": [1.0, 1.0], \"origin\": [-120, -120, 0], \"slices\": 155, \"step\": 1.0}"; }
SPEC="{\"study_uid\": \"$STUDY_UID\", \"patient_id\": \"BENCH\", \"frame_of_reference_uid\": \"$STUDY_UID.9\",
  \"sphere\": {\"center\": [10.2, -5.3, 77.4], \"radius\": 30, \"inside\": 900, \"outside\": 100},
  \"series\": [$(series 1 'AX FLAIR'), $(series 2 'AX T1 POST GD'), $(series 3 'AX T2')]}"
"$PY" tests/dicom/make_study.py "$WORK/study" "$SPEC"
echo "study: $(find "$WORK/study" -name '*.dcm' | wc -l) instances, $(du -sm "$WORK/study" | cut -f1) MiB"

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
GRPC=$(free_port); HTTP=$(free_port); METRICS=$(free_port)
"$BIN" serve --model-repository models --default-model brain-tumor-unet --grpc-addr "127.0.0.1:$GRPC" \
    --http-addr "127.0.0.1:$HTTP" --metrics-addr "127.0.0.1:$METRICS" >"$WORK/server.log" 2>&1 &
SERVER=$!
for _ in $(seq 600); do curl -fsS "http://127.0.0.1:$HTTP/v2/health/ready" >/dev/null 2>&1 && break; sleep 0.1; done

for round in $(seq "$ROUNDS"); do
    start=$(date +%s.%N)
    "$BIN" segment --json --server "http://127.0.0.1:$GRPC" --model brain-tumor-unet --study "$WORK/study" \
        --seg-out "$WORK/out" >"$WORK/service.json"
    end=$(date +%s.%N)
    service=$(echo "$end - $start" | bc -l)
    rss=$(awk '/VmHWM/ {print $2 / 1024}' "/proc/$SERVER/status")
    breakdown=$("$PY" -c 'import json, sys; t = json.load(open(sys.argv[1]))["timing"]; print(" ".join(f"{k[:-8]} {v:.2f}" for k, v in t.items()))' "$WORK/service.json")
    python=$("$PY" benches/study_python.py "$WORK/study" models/brain-tumor-unet/1/model.onnx "$WORK/python.dcm")
    pwall=$(echo "$python" | "$PY" -c 'import json, sys; print(json.load(sys.stdin)["seconds"]["total"])')
    pdetail=$(echo "$python" | "$PY" -c 'import json, sys; d = json.load(sys.stdin); rss = d["peak_rss_mib"]; print(" ".join(f"{k} {v:.2f}" for k, v in d["seconds"].items()), f"peak RSS {rss:.0f} MiB")')
    printf 'round %d: service %.2f s (server peak RSS %.0f MiB; %s); python %.2f s (%s); ratio %.2f\n' \
        "$round" "$service" "$rss" "$breakdown" "$pwall" "$pdetail" "$(echo "$pwall / $service" | bc -l)"
    echo "$service $pwall" >>"$WORK/rounds"
done
sort -n -k1 "$WORK/rounds" | awk '{s[NR] = $1} END {print "median service", s[int((NR + 1) / 2)]}' >"$WORK/m1"
sort -n -k2 "$WORK/rounds" | awk '{p[NR] = $2} END {print "median python", p[int((NR + 1) / 2)]}' >"$WORK/m2"
s=$(cut -d' ' -f3 "$WORK/m1"); p=$(cut -d' ' -f3 "$WORK/m2")
printf 'median: service %.2f s, python %.2f s: service is %.2f× faster\n' "$s" "$p" "$(echo "$p / $s" | bc -l)"
