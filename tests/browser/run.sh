#!/usr/bin/env bash
# Browser test of the upload page (make browser; part of make test):
#   1. Debian's chromium (apt, when missing and this runs as root) and the pinned playwright-core
#      (npm ci from tests/browser/package-lock.json) into tests/browser/node_modules;
#   2. the release binary on free loopback ports, serving a temporary model repository with four
#      test models: tiny (a classifier, the default model), seg-threshold (segmentation from
#      FLAIR, T1c and T2), multi-classify (a multi-modal classifier of T2, FLAIR and T1c) and
#      study-seg (tests/fixtures/models/seg-study: a study's segmentation);
#   3. the gRPC API's answers: `brainai classify --json` of the test images, and `brainai segment
#      --json --out expected-mask.png` and `brainai classify --json --flair … --t1c … --t2 …` of a 300x220 slice made from tests/data/flair_300x220.png
#      (FLAIR: its gray levels; T1c: mirrored; T2: upside down; all four labels occur);
#   4. tests/browser/upload.test.mjs loads GET / in chromium (under its Content-Security-Policy),
#      uploads the images, compares what the page shows with those answers, then many files with a
#      bad one among them, then picks seg-threshold and segments the slice (the mask compared pixel
#      by pixel), then picks multi-classify and classifies the slice, then picks study-seg and
#      segments a small DICOM study (tests/dicom/make_study.py); screenshots in target/browser/.
# Exit status non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/../.."

BIN=${BRAINAI_BIN:-target/release/brainai}
CHROMIUM=${CHROMIUM:-$(command -v chromium || true)}
OUT=target/browser
mkdir -p "$OUT"

if [[ -z $CHROMIUM ]]; then
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
        echo "installing Debian's chromium (apt-get)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y --no-install-recommends chromium >"$OUT/apt.log" 2>&1 \
            || { apt-get update >>"$OUT/apt.log" 2>&1 && apt-get install -y --no-install-recommends chromium >>"$OUT/apt.log" 2>&1; } \
            || { echo "error: apt-get install chromium failed (see $OUT/apt.log)"; exit 1; }
        CHROMIUM=$(command -v chromium)
    else
        echo "error: chromium not found: install Debian's chromium (apt-get install chromium) or set CHROMIUM"
        exit 1
    fi
fi
command -v node >/dev/null || { echo "error: node not found: install Node.js 20"; exit 1; }
lock_stamp=tests/browser/node_modules/.stamp-$(sha256sum tests/browser/package-lock.json | cut -c1-12)
if [[ ! -f $lock_stamp ]]; then
    echo "installing playwright-core (npm ci, pinned by tests/browser/package-lock.json)"
    (cd tests/browser && npm ci --no-audit --no-fund --ignore-scripts >/dev/null)
    touch "$lock_stamp"
fi
[[ -x $BIN ]] || { echo "error: $BIN missing: run make build"; exit 1; }

# The slice to segment (Pillow from the project's venv, which make build sets up).
PY=${PYTHON_WITH_PILLOW:-.venv/bin/python}
[[ -x $PY ]] || { echo "error: $PY missing: run make setup"; exit 1; }
SLICE=$OUT/slice
rm -rf "$SLICE" && mkdir -p "$SLICE"
"$PY" - "$SLICE" <<'EOF'
import sys
from PIL import Image, ImageOps
out = sys.argv[1]
flair = Image.open("tests/data/flair_300x220.png").convert("L")
flair.save(f"{out}/flair.png")
ImageOps.mirror(flair).save(f"{out}/t1c.png")
ImageOps.flip(flair).save(f"{out}/t2.png")
EOF

# A model repository with the classifier (default) and the segmentation model.
SERVER=
REPO=$(mktemp -d)
cleanup() {
    if [[ -n $SERVER ]]; then
        kill -TERM "$SERVER" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$SERVER" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$SERVER" 2>/dev/null || true
    fi
    rm -rf "$REPO"
}
trap cleanup EXIT
cp -r tests/fixtures/models/tiny tests/fixtures/models/seg-threshold tests/fixtures/models/multi-classify "$REPO/"
cp -r tests/fixtures/models/seg-study "$REPO/study-seg"
# A small DICOM study (a sphere seen by FLAIR, T1c and T2 series of 16 slices) for the study form.
STUDY_DIR=$OUT/study
rm -rf "$STUDY_DIR"
S=1.2.826.0.1.3680043.10.1087.77
series() { echo "{\"uid\": \"$S.$1\", \"description\": \"$2\", \"rows\": 64, \"columns\": 64, \"spacing\": [1.0, 1.0], \"origin\": [-32, -32, 0], \"slices\": 16, \"step\": 1.0}"; }
"$PY" tests/dicom/make_study.py "$STUDY_DIR" "{\"study_uid\": \"$S\", \"patient_id\": \"PAGE\", \"frame_of_reference_uid\": \"$S.9\",
  \"sphere\": {\"center\": [2, -3, 8], \"radius\": 6, \"inside\": 900, \"outside\": 100},
  \"series\": [$(series 1 'AX FLAIR'), $(series 2 'AX T1 POST GD'), $(series 3 'AX T2')]}"

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
GRPC=$(free_port); HTTP=$(free_port); METRICS=$(free_port)
"$BIN" serve --model-repository "$REPO" --default-model tiny --grpc-addr "127.0.0.1:$GRPC" \
    --http-addr "127.0.0.1:$HTTP" --metrics-addr "127.0.0.1:$METRICS" --intra-op-threads 1 \
    >"$OUT/server.log" 2>&1 &
SERVER=$!
for i in $(seq 600); do
    curl -fsS "http://127.0.0.1:$HTTP/v2/health/ready" >/dev/null 2>&1 && break
    kill -0 "$SERVER" 2>/dev/null || { echo "error: the server exited:"; tail -20 "$OUT/server.log"; exit 1; }
    [[ $i == 600 ]] && { echo "error: the server was not ready within 60 s"; tail -20 "$OUT/server.log"; exit 1; }
    sleep 0.1
done

IMAGES=()
for f in flair_256_a.png flair_512_a.jpg flair_300x220.png flair_256_tumor.png; do IMAGES+=("$PWD/tests/data/$f"); done
timeout 120 "$BIN" classify --json --server "http://127.0.0.1:$GRPC" --model tiny "${IMAGES[@]}" >"$OUT/expected.json"
rm -f "$OUT/expected-mask.png"
timeout 120 "$BIN" segment --json --server "http://127.0.0.1:$GRPC" --model seg-threshold \
    --flair "$SLICE/flair.png" --t1c "$SLICE/t1c.png" --t2 "$SLICE/t2.png" \
    --out "$OUT/expected-mask.png" >"$OUT/expected-segment.json"
timeout 120 "$BIN" segment --json --server "http://127.0.0.1:$GRPC" --model study-seg --study "$STUDY_DIR" \
    >"$OUT/expected-study.json"
timeout 120 "$BIN" classify --json --server "http://127.0.0.1:$GRPC" --model multi-classify \
    --flair "$SLICE/flair.png" --t1c "$SLICE/t1c.png" --t2 "$SLICE/t2.png" >"$OUT/expected-multi.json"

# Many files, one bad among them: copies of the first image, and many_05.png that is no image.
MANY=$OUT/many
rm -rf "$MANY" && mkdir -p "$MANY"
for i in $(seq -w 0 12); do cp "${IMAGES[0]}" "$MANY/many_$i.png"; done
cp tests/data/bad/not_an_image.bin "$MANY/many_05.png"

BRAINAI_URL=http://127.0.0.1:$HTTP BRAINAI_EXPECTED=$OUT/expected.json \
BRAINAI_BAD=$PWD/tests/data/bad/not_an_image.bin BRAINAI_MANY=$PWD/$MANY CHROMIUM=$CHROMIUM SCREENSHOTS=$OUT \
BRAINAI_SEGMENT_EXPECTED=$OUT/expected-segment.json BRAINAI_SEGMENT_MASK=$OUT/expected-mask.png \
BRAINAI_SLICE=$PWD/$SLICE BRAINAI_MULTI_EXPECTED=$OUT/expected-multi.json \
BRAINAI_STUDY=$PWD/$STUDY_DIR BRAINAI_STUDY_EXPECTED=$OUT/expected-study.json \
    timeout 300 node tests/browser/upload.test.mjs
