#!/usr/bin/env bash
# Proves that deploy/ is deployable, without a cluster or a Docker engine:
#   1. tools, pinned, into project-local folders (installed once, reused afterwards):
#      kustomize (go install) and crdcheck (the Prometheus Operator's API types, go build) into
#      .tools/bin; kubernetes-validate, promql-parser, PyYAML into .venv from deploy/requirements.txt
#   2. `kustomize build` of every overlay in deploy/k8s/overlays (cpu, gpu-p4000, dicom-node)
#   3. deploy/tools/validate.py: core objects strictly against the Kubernetes 1.30 schemas,
#      ServiceMonitor/PrometheusRule strictly against the operator's types, PromQL parsing,
#      metric names and labels, cross-checks (ports, probes, grace period, queue capacity, HPA <-> adapter,
#      security context, runbook entries, kube-state-metrics selectors <-> the workload's pods), the
#      DICOM node (StatefulSet volumes <-> spool/outbox dirs, BRAINAI_DICOM_ADDR <-> container port <->
#      Service, NetworkPolicy <-> BRAINAI_DICOM_ALLOW and the destination, alert thresholds <-> settings),
#      the Grafana dashboard and the prometheus-adapter rule, then a self-test that broken copies are
#      rejected
#   4. deploy/tools/kserve_check.py on `kustomize build deploy/kserve` and deploy/kserve/model-repository:
#      the ServingRuntime and InferenceService strictly against KServe v0.20.0's own CRD schemas
#      (vendored in deploy/kserve/crds), the rest against Kubernetes 1.30, and cross-checks with the
#      binary (flags, variables, ports, probes, protocols), the InferenceService <-> the
#      ServingRuntime, the model repository; then its self-test
#   5. deploy/docker/check_dockerfile.py: the Dockerfile's build steps are the Makefile's (what CI
#      runs), COPY sources exist, non-root numeric USER, ...; with its self-test; and the self-test
#      of deploy/docker/cuda_archs.py (the GPU image's sm_61 check)
# Needs only Go (>= 1.26) and Python (>= 3.10) with network access to the Go module proxy and PyPI
# on the first run. Exit status non-zero if anything fails.
set -uo pipefail
cd "$(dirname "$0")/.."

KUSTOMIZE_VERSION=v5.8.2
TOOLS=.tools
BIN=$TOOLS/bin
RENDERED=$TOOLS/rendered
PYTHON=${PYTHON:-python3}
export GOTOOLCHAIN=local   # never download a Go toolchain; fail clearly instead

start=$(date +%s)
failed=()
step() { printf '\n== %s\n' "$*"; }
fail() { echo "FAIL: $*"; failed+=("$*"); }

step "tools (pinned, project-local)"
command -v go >/dev/null || { echo "error: go not found: install Go 1.26 or newer"; exit 1; }
command -v "$PYTHON" >/dev/null || { echo "error: $PYTHON not found: install Python 3.10 or newer"; exit 1; }
mkdir -p "$BIN" "$RENDERED"
if [ "$("$BIN/kustomize" version 2>/dev/null)" = "$KUSTOMIZE_VERSION" ]; then
  echo "  kustomize $KUSTOMIZE_VERSION: present"
else
  echo "  kustomize $KUSTOMIZE_VERSION: installing into $BIN (go install)"
  GOBIN="$PWD/$BIN" GOFLAGS= go install "sigs.k8s.io/kustomize/kustomize/v5@$KUSTOMIZE_VERSION" \
    || { echo "error: go install of kustomize failed"; exit 1; }
fi
crd_stamp=$(cat deploy/tools/crdcheck/go.mod deploy/tools/crdcheck/go.sum deploy/tools/crdcheck/main.go | sha256sum | cut -c1-16)
if [ -x "$BIN/crdcheck" ] && [ "$(cat "$TOOLS/crdcheck.stamp" 2>/dev/null)" = "$crd_stamp" ]; then
  echo "  crdcheck: present"
else
  echo "  crdcheck: building into $BIN (deploy/tools/crdcheck, modules pinned by go.sum)"
  GOFLAGS= go build -C deploy/tools/crdcheck -mod=readonly -buildvcs=false -o "$PWD/$BIN/crdcheck" . \
    || { echo "error: building deploy/tools/crdcheck failed"; exit 1; }
  echo "$crd_stamp" > "$TOOLS/crdcheck.stamp"
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv || { echo "error: cannot create .venv"; exit 1; }
req_stamp=.venv/.deploy-$(sha256sum deploy/requirements.txt | cut -c1-12)
if [ -f "$req_stamp" ]; then
  echo "  deploy/requirements.txt: installed in .venv"
else
  echo "  deploy/requirements.txt: installing into .venv (pip)"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -r deploy/requirements.txt \
    || { echo "error: pip install -r deploy/requirements.txt failed"; exit 1; }
  rm -f .venv/.deploy-*
  touch "$req_stamp"
fi
echo "  $("$BIN/kustomize" version | sed 's/^/kustomize /'), $(.venv/bin/kubernetes-validate --version | sed 's/^/kubernetes-validate /'), $(go version | cut -d' ' -f3), $(.venv/bin/python --version)"

step "kustomize build of every overlay"
rendered=()
for dir in deploy/k8s/overlays/*/; do
  name=$(basename "$dir")
  out="$RENDERED/$name.yaml"
  if "$BIN/kustomize" build "$dir" > "$out" 2> "$out.err"; then
    echo "  ok   $name: $(grep -c '^kind:' "$out") objects -> $out"
    rendered+=("$name=$out")
  else
    cat "$out.err"
    fail "kustomize build $dir"
  fi
done
[ ${#rendered[@]} -ge 3 ] || fail "expected at least the cpu, gpu-p4000 and dicom-node overlays"

step "manifests, alerts, dashboard, adapter rule (deploy/tools/validate.py)"
if [ ${#rendered[@]} -gt 0 ]; then
  .venv/bin/python deploy/tools/validate.py --crdcheck "$BIN/crdcheck" --self-test "${rendered[@]}" \
    || fail "deploy/tools/validate.py"
fi

step "KServe ServingRuntime, InferenceService, model repository (deploy/tools/kserve_check.py)"
kserve_ok=1
for dir in deploy/kserve deploy/kserve/model-repository; do
  name=$(echo "${dir#deploy/}" | tr / -)
  out="$RENDERED/$name.yaml"
  if "$BIN/kustomize" build "$dir" > "$out" 2> "$out.err"; then
    echo "  ok   $dir: $(grep -c '^kind:' "$out") objects -> $out"
  else
    cat "$out.err"
    fail "kustomize build $dir"
    kserve_ok=0
  fi
done
if [ $kserve_ok = 1 ]; then
  .venv/bin/python deploy/tools/kserve_check.py --self-test \
    --runtime "$RENDERED/kserve.yaml" --repository "$RENDERED/kserve-model-repository.yaml" \
    || fail "deploy/tools/kserve_check.py"
fi

step "Dockerfile (static checks here; the images are built and run by make image-test)"
.venv/bin/python deploy/docker/check_dockerfile.py --self-test || fail "deploy/docker/check_dockerfile.py"
.venv/bin/python deploy/docker/cuda_archs.py --self-test || fail "deploy/docker/cuda_archs.py --self-test"

step "summary"
elapsed=$(( $(date +%s) - start ))
if [ ${#failed[@]} -gt 0 ]; then
  printf '  FAILED: %s\n' "${failed[@]}"
  echo "deploy/check.sh: ${#failed[@]} step(s) failed (${elapsed} s)"
  exit 1
fi
echo "deploy/check.sh: all checks passed (${elapsed} s)"
