#!/usr/bin/env bash
# Runs the CPU pod as rendered by kustomize, without Docker or a cluster, on loopback only:
#   - lays out the CPU image's /opt/onnxruntime/lib (libonnxruntime.so symlink -> the pinned wheel's
#     library, as the Dockerfile's ort-cpu stage does) and the model image's /model tree with its
#     .sha256 (as the `model` stage does), under a temporary root;
#   - runs the Deployment's init container script (from the rendered YAML) against it;
#   - starts target/release/brainai as uid 65532 on a read-only root filesystem (a private mount
#     namespace; only a tmpfs /tmp is writable) with exactly the rendered brainai-env ConfigMap
#     (addresses moved to 127.0.0.1 ports; without the TLS, callers and audit settings, whose
#     Secrets exist only in a cluster: `make image-test` runs the image with them), waits for /readyz, classifies one image over gRPC and
#     one over the HTTP API (/v2/health/ready, POST /v1/classify), sends SIGTERM and expects a
#     drain and exit status 0.
# Needs root (unshare, setpriv), `make build model` and deploy/check.sh's rendered output
# (.tools/rendered/cpu.yaml).
#
#   deploy/tools/pod_smoke.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
[ "$(id -u)" = 0 ] || { echo "pod_smoke: needs root (unshare, setpriv): skipped"; exit 0; }
RENDERED=.tools/rendered/cpu.yaml
BIN=target/release/brainai
MODEL=models/brain-tumor-resnet50/1/model.onnx
for f in "$RENDERED" "$BIN" "$MODEL" .venv/bin/python; do
  [ -e "$f" ] || { echo "error: $f missing (run make build model and deploy/check.sh)"; exit 1; }
done
root=$(mktemp -d /tmp/brainai-pod.XXXXXX)
chmod 755 "$root"
server=""
cleanup() { [ -n "$server" ] && kill "$server" 2>/dev/null; rm -rf "$root"; }
trap cleanup EXIT

# Image layouts.
capi=$(echo .venv/lib/python3*/site-packages/onnxruntime/capi)
mkdir -p "$root/opt/onnxruntime/lib" "$root/model/brain-tumor-resnet50/1" "$root/models" "$root/config" "$root/tmp"
cp "$capi"/libonnxruntime.so.1.* "$capi"/libonnxruntime_providers_shared.so "$root/opt/onnxruntime/lib/"
(cd "$root/opt/onnxruntime/lib" && ln -s "$(ls libonnxruntime.so.1.*)" libonnxruntime.so)
cp "$MODEL" "$root/model/brain-tumor-resnet50/1/model.onnx"
(cd "$root/model/brain-tumor-resnet50/1" && sha256sum model.onnx > model.onnx.sha256)

# The rendered pod: init script, env ConfigMap, model.toml ConfigMap.
.venv/bin/python - "$RENDERED" "$root" <<'PY'
import sys, yaml, shlex
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
root = sys.argv[2]
dep = next(d for d in docs if d["kind"] == "Deployment")
pod = dep["spec"]["template"]["spec"]
init = next(c for c in pod["initContainers"] if c["name"] == "model")
env_cm = pod["containers"][0]["envFrom"][0]["configMapRef"]["name"]
toml_cm = next(v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v)
cms = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
script = init["command"][-1]
for path in ("/models", "/model/", "/config/"):
    script = script.replace(path, root + path)
open(f"{root}/init.sh", "w").write(script)
open(f"{root}/config/model.toml", "w").write(cms[toml_cm]["data"]["model.toml"])
with open(f"{root}/env", "w") as f:
    for k, v in cms[env_cm]["data"].items():
        if k.startswith(("BRAINAI_TLS_", "BRAINAI_AUTH_", "BRAINAI_AUDIT_")):
            continue
        if k == "BRAINAI_MODEL_DIR":
            v = root + v
        ports = {"BRAINAI_GRPC_ADDR": "50091", "BRAINAI_HTTP_ADDR": "8091", "BRAINAI_METRICS_ADDR": "9191",
                 "BRAINAI_HEALTH_ADDR": "50092"}
        if k in ports:
            v = "127.0.0.1:" + ports[k]
        f.write(f"export {k}={shlex.quote(v)}\n")
PY
echo "== init container script (rendered)"
( set -a; . "$root/env"; set +a; sh -ec "$(cat "$root/init.sh")" )
ls -lR "$root/models"

echo "== server as uid 65532, read-only root filesystem, with the rendered environment"
chmod -R a+rX "$root"
(
  set -a; . "$root/env"; set +a
  export ORT_DYLIB_PATH="$root/opt/onnxruntime/lib/libonnxruntime.so" TMPDIR="$root/tmp" HOME="$root/tmp"
  # As in the pod: the whole filesystem read-only (the models too) except a tmpfs at /tmp's place.
  exec unshare --mount --propagation private sh -ec '
    mount --bind / / && mount -o remount,bind,ro /
    mount -t tmpfs -o size=256m,mode=1777 tmpfs "$1"
    exec setpriv --reuid=65532 --regid=65532 --clear-groups "$2" serve' sh "$root/tmp" "$PWD/$BIN"
) > "$root/server.log" 2>&1 &
server=$!
for _ in $(seq 1 300); do
  if .venv/bin/python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:9191/readyz', timeout=1).status != 200)" 2>/dev/null; then
    break
  fi
  kill -0 "$server" 2>/dev/null || { cat "$root/server.log"; echo "FAIL: server exited during start-up"; exit 1; }
  sleep 0.2
done
"$BIN" classify --server http://127.0.0.1:50091 tests/data/flair_256_a.png
.venv/bin/python - <<'PY'
import json, urllib.request
base = "http://127.0.0.1:8091"
assert urllib.request.urlopen(base + "/v2/health/ready", timeout=5).status == 200, "HTTP API not ready"
req = urllib.request.Request(base + "/v1/classify", data=open("tests/data/flair_256_a.png", "rb").read(),
                             headers={"Content-Type": "image/png"})
print("HTTP API POST /v1/classify:", json.dumps(json.load(urllib.request.urlopen(req, timeout=60)))[:300])
PY
kill -TERM "$server"
rc=0; wait "$server" || rc=$?
server=""
grep -q '"drained; stopping"' "$root/server.log" || { cat "$root/server.log"; echo "FAIL: no JSON drain log"; exit 1; }
[ "$rc" = 0 ] || { cat "$root/server.log"; echo "FAIL: exit status $rc after SIGTERM"; exit 1; }
echo "ok: rendered CPU pod started as uid 65532 on a read-only root, served, drained and exited 0 (JSON logs)"
