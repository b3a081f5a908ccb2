#!/usr/bin/env bash
# CUDA execution-provider check, run on a machine with an NVIDIA GPU (see docs/PERFORMANCE.md).
#
# Expects in $G (default .gpu): the release `brainai` binary, the `serving` bench binary,
# lib/libonnxruntime.so.<v> and lib/libonnxruntime_providers_shared.so from an onnxruntime-gpu
# wheel, its libonnxruntime_providers_cuda.so (whole, or xz-compressed in parts cuda.so.xz.*),
# and the CUDA + cuDNN libraries that wheel was built for somewhere on the machine.
# Writes logs and results to $OUT.
set -euo pipefail
G=${G:-.gpu}
OUT=${OUT:-/tmp/brainai-gpu}
mkdir -p "$OUT" "$G/lib"
if [ ! -f "$G/lib/libonnxruntime_providers_cuda.so" ]; then
  cat "$G"/cuda.so.xz.* | xz -d > "$G/lib/libonnxruntime_providers_cuda.so"
fi
LIB=$(ls "$G"/lib/libonnxruntime.so.* | head -1)
libdirs=$(find /usr /opt /usr/local -xdev \( -name 'libcudnn.so.9*' -o -name 'libcublasLt.so.*' \
  -o -name 'libcufft.so.*' -o -name 'libcurand.so.*' -o -name 'libcudart.so.*' -o -name 'libnvrtc.so.*' \) \
  2>/dev/null | xargs -r -n1 dirname | sort -u | tr '\n' ':')
export LD_LIBRARY_PATH="$G/lib:${libdirs}${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
echo "ORT library: $LIB" | tee -a "$OUT/gpu.txt"

[ -f models/brain-tumor-resnet50/1/model.onnx ] || python3 models/make_resnet50.py --out models/brain-tumor-resnet50/1/model.onnx

wait_ready() {
  python3 - "$1" <<'PY'
import sys, time, urllib.request
for _ in range(600):
    try:
        if urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/readyz", timeout=1).status == 200:
            sys.exit(0)
    except Exception:
        pass
    time.sleep(0.2)
sys.exit("server never became ready")
PY
}

# Serve on each device, classify the same images, keep the answers and the metrics.
for device in cuda cpu; do
  "$G/brainai" serve --device "$device" --ort-library "$LIB" --model-dir models/brain-tumor-resnet50 \
    --grpc-addr 127.0.0.1:50061 --metrics-addr 127.0.0.1:9191 --http-addr 127.0.0.1:8091 --max-batch-size 32 \
    > "$OUT/serve_$device.log" 2>&1 &
  pid=$!
  wait_ready 9191
  "$G/brainai" classify --server http://127.0.0.1:50061 --json tests/data/*.png tests/data/*.jpg > "$OUT/classify_$device.json"
  python3 -c "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9191/metrics').read().decode())" \
    | grep -E '^brainai_(model_info|batch_size_count|inference_duration_seconds_sum|gpu_|pinned_host_bytes|stage_duration_seconds_(sum|count)|batch_assembly_total)' \
    > "$OUT/metrics_$device.txt" || true
  kill -TERM "$pid"
  wait "$pid"
  echo "serve --device $device exited $?"
done

python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
cuda = json.load(open(f"{out}/classify_cuda.json"))["results"]
cpu = json.load(open(f"{out}/classify_cpu.json"))["results"]
worst = max(abs(a["probabilities"][k] - b["probabilities"][k]) for a, b in zip(cuda, cpu) for k in a["probabilities"])
print(f"{len(cuda)} images: max |p_cuda - p_cpu| = {worst:.2e}")
assert len(cuda) == len(cpu) and worst < 1e-3, "CUDA and CPU disagree"
PY

# GPU memory after warm-up per max batch size (the P4000 has 8 GB); lift the model's own cap
# on this throwaway copy.
sed -i 's/^max_batch_size = .*/max_batch_size = 128/' models/brain-tumor-resnet50/model.toml
for b in ${MEMORY_BATCHES-1 8 16 32 64 128}; do
  "$G/brainai" serve --device cuda --ort-library "$LIB" --model-dir models/brain-tumor-resnet50 \
    --grpc-addr 127.0.0.1:50062 --metrics-addr 127.0.0.1:9192 --http-addr 127.0.0.1:8092 --max-batch-size "$b" --queue-capacity 256 \
    > "$OUT/serve_mem_$b.log" 2>&1 &
  pid=$!
  wait_ready 9192
  echo "max_batch_size=$b $(nvidia-smi --query-gpu=memory.used --format=csv,noheader)" | tee -a "$OUT/memory.txt"
  kill -TERM "$pid"; wait "$pid" || true
done

# Throughput: bare ORT loop vs served, on the GPU, with one and with two model instances.
for n in ${BENCH_INSTANCES-1 2}; do
  "$G/serving" --device cuda --ort-library "$LIB" --batch 32 --concurrency 96 --seconds 5 --rounds 3 \
    --delay-us 2000 --instances "$n" | tee "$OUT/bench_cuda_instances$n.txt"
done

# Issue 12: the serving targets on the GPU (benches/targets.py), the served side driven by ghz as a
# separate process with single-image calls of a 256² slice; configs: default (page-locked batch
# buffers, one instance, intra-op 1), pageable buffers, two instances, four intra-op threads
# (spinning, and not), twelve decoding threads instead of one per core (whether the served run is
# slower than the bare one because the instance thread that launches the kernels competes with the
# decoders for a core: "On the GPU" and "A simulated accelerator" in docs/PERFORMANCE.md); then batch 64. Needs a ghz binary in $G. TARGET_SECONDS / TARGET_ROUNDS shorten or lengthen it.
# benches/gpu_bundle.sh packs everything for a device machine that can reach nothing.
if [ -x "$G/ghz" ]; then
  export BRAINAI_BIN="$G/brainai" BRAINAI_BENCH_BIN="$G/serving" GHZ="$G/ghz"
  T="python3 benches/targets.py"
  # The bare loop alone, page-locked input against pageable, batch 32 (what pinning buys ORT's copy).
  for pinned in true false; do
    "$G/serving" --bare-only --device cuda --ort-library "$LIB" --batch 32 --seconds 4 --rounds 1 \
      --pinned "$pinned" | sed "s/^/pinned=$pinned: /" | tee -a "$OUT/bare_pinned.txt" || true
  done
  # ... and with one intra-op thread, as the server runs CUDA by default: whether the served run's
  # extra time (8.7 against 7.0 ms at batch 32 on the H200) is the thread count or the contention.
  "$G/serving" --bare-only --device cuda --ort-library "$LIB" --batch 32 --seconds 4 --rounds 1 \
    --threads 1 | sed "s/^/threads=1: /" | tee -a "$OUT/bare_pinned.txt" || true
  $T saturation --device cuda --ort-library "$LIB" --rounds "${TARGET_ROUNDS:-2}" --seconds "${TARGET_SECONDS:-8}" \
    --batch 32 --concurrency 128 --bare-batches 16,32,64 --images flair_256_a.png --out "$OUT/targets" \
    --config default: --config pageable:--pinned-buffers=false --config two:--instances=2 \
    --config intra4:--intra-op-threads=4 --config intra4calm:--intra-op-threads=4,--intra-op-spinning=false \
    --config decode12:--preprocess-threads=12 \
    2>&1 | tee "$OUT/saturation.txt" || true
  # The best batch size: the bare loop is fastest at 64; the model's own cap (32, for the P4000's
  # 8 GB) is lifted on this throwaway copy for the run.
  cp models/brain-tumor-resnet50/model.toml "$OUT/model.toml.orig"
  sed -i 's/^max_batch_size = .*/max_batch_size = 64/' models/brain-tumor-resnet50/model.toml
  $T saturation --device cuda --ort-library "$LIB" --rounds "${TARGET_ROUNDS:-2}" --seconds "${TARGET_SECONDS:-8}" \
    --batch 64 --concurrency 192 --bare-batches 64 --images flair_256_a.png --out "$OUT/targets64" \
    --config default: --config two:--instances=2 2>&1 | tee "$OUT/saturation64.txt" || true
  cp "$OUT/model.toml.orig" models/brain-tumor-resnet50/model.toml
  $T light --device cuda --ort-library "$LIB" --rounds 2 --seconds 5 --out "$OUT/targets" 2>&1 \
    | tee "$OUT/light.txt" || true
  cat "$OUT"/targets/saturation-default-*/concurrency.metrics-after.txt 2>/dev/null \
    | grep -E '^brainai_(gpu_|pinned_host_bytes)' | sort -u | tail -n 20 | tee "$OUT/nvml.txt" \
    || echo "no NVML gauges" | tee "$OUT/nvml.txt"
fi
