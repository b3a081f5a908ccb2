# BrainAI Serve — the two commands a newcomer needs:
#   make run    installs what is missing, builds, prepares the default model, serves it
#   make test   installs what is missing, runs every test
# Everything is pinned: Python tooling in models/requirements.txt, Rust crates in Cargo.lock.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell sha256sum models/requirements.txt | cut -c1-12)
MODEL_DIR := models/brain-tumor-resnet50
MODEL := $(MODEL_DIR)/1/model.onnx
UNET := models/brain-tumor-unet/1/model.onnx
CARGO_FLAGS := --release --locked

.PHONY: setup model build run test bench bench-curve fmt lint clean

## setup: project-local Python venv with the pinned onnxruntime (its libonnxruntime.so is what the service loads)
setup: $(STAMP)
$(STAMP): models/requirements.txt
	@command -v cargo >/dev/null || { echo "error: cargo not found: install Rust (https://rustup.rs), 1.92 or newer"; exit 1; }
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found: install Python 3.10+ with venv"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r models/requirements.txt
	rm -f $(VENV)/.installed-*
	touch $@

## model: generate the default (synthetic-weight, untrained) ResNet-50 ONNX model (~94 MB, deterministic)
##        and the segmentation U-Net models/brain-tumor-unet (~8 MB, deterministic)
model: $(MODEL) $(UNET)
# Order-only on the venv: re-creating the venv does not regenerate the (deterministic) model.
$(MODEL): models/make_resnet50.py | $(STAMP)
	$(PY) models/make_resnet50.py --out $@
$(UNET): models/make_unet.py | $(STAMP)
	$(PY) models/make_unet.py --out $@

## build: the release binary target/release/brainai
build: setup
	cargo build $(CARGO_FLAGS) --bin brainai

## run: serve the models of models/ (gRPC :50051, HTTP API and upload page :8000, metrics :9090):
##      the ResNet-50 classifier (the default model) and the U-Net segmenter; options via flags or
##      BRAINAI_* variables
run: build model
	./target/release/brainai serve --model-repository models --default-model brain-tumor-resnet50 $(ARGS)

## test: every test: Rust unit + integration tests against the real ONNX Runtime (with the Python
##       reference checks), deploy/ validation, tritonclient interop, the upload page in chromium,
##       a ghz smoke load and the short resilience run on the real server, the container images
##       built on a bootstrapped Debian base and run as the pod runs them (TLS, tokens), lint
test: setup model dicom-reference dicom-tools nextest
	$(MAKE) --no-print-directory fuzz-lock
	$(NEXTEST) run $(CARGO_FLAGS)
	deploy/check.sh
	$(MAKE) --no-print-directory interop
	$(MAKE) --no-print-directory browser
	$(MAKE) --no-print-directory load-smoke
	$(MAKE) --no-print-directory resilience-smoke
	$(MAKE) --no-print-directory image-test
	$(MAKE) --no-print-directory lint

## nextest: the pinned cargo-nextest in .tools/bin, which runs the Rust tests of `make test`: each
##          test in its own process, with a time limit (.config/nextest.toml); a hung test is
##          killed and named. Built from crates.io once (minutes). A subset:
##          .tools/bin/cargo-nextest nextest run --release --locked --test security
NEXTEST_VERSION := 0.9.151
NEXTEST_STAMP := .tools/.nextest-$(NEXTEST_VERSION)
NEXTEST := .tools/bin/cargo-nextest nextest
.PHONY: nextest
nextest: $(NEXTEST_STAMP)
$(NEXTEST_STAMP):
	cargo install --locked --quiet cargo-nextest --version =$(NEXTEST_VERSION) \
	  --no-default-features --features default-no-update --root .tools
	rm -f .tools/.nextest-*
	touch $@

## dicom-reference: pydicom and its decoders (pinned, tests/dicom/requirements.txt) into the venv,
##                  for the DICOM reference checks (tests/reference/dicom_reference.py)
DICOM_STAMP := $(VENV)/.dicom-$(shell sha256sum tests/dicom/requirements.txt | cut -c1-12)
.PHONY: dicom-reference dicom-data dicom-tools
dicom-reference: $(DICOM_STAMP)
$(DICOM_STAMP): tests/dicom/requirements.txt | $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check -r tests/dicom/requirements.txt
	rm -f $(VENV)/.dicom-*
	touch $@

## dicom-tools: Debian's dcmtk and dicom3tools (apt, when missing), for the structured-report checks
dicom-tools:
	@tests/dicom/install_tools.sh

## dicom-data: regenerate tests/data/dicom (deterministic; dcmtk's encoders)
dicom-data: $(DICOM_STAMP) dicom-tools
	$(PY) tests/dicom/make_dicom.py

## interop: NVIDIA's tritonclient (pinned, tests/interop/requirements.txt) over the Open Inference
##          Protocol's gRPC and HTTP against the release binary; answers must equal Classify's
INTEROP_STAMP := $(VENV)/.interop-$(shell sha256sum tests/interop/requirements.txt | cut -c1-12)
.PHONY: interop browser
interop: build $(INTEROP_STAMP)
	$(PY) tests/interop/oip_interop.py
$(INTEROP_STAMP): tests/interop/requirements.txt | $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check -r tests/interop/requirements.txt
	rm -f $(VENV)/.interop-*
	touch $@

## browser: the upload page (GET /) in Debian's chromium driven by playwright-core (pinned,
##          tests/browser/package-lock.json): labels shown = the gRPC API's; screenshots in target/browser
browser: build
	tests/browser/run.sh

## lint: formatting and clippy (skipped with a note where the toolchain lacks the component)
lint:
	@if cargo fmt --version >/dev/null 2>&1; then cargo fmt --all -- --check; else echo "rustfmt not installed: format check skipped"; fi
	@if cargo clippy --version >/dev/null 2>&1; then cargo clippy $(CARGO_FLAGS) --all-targets -- -D warnings; else echo "clippy not installed: lint skipped"; fi

fmt:
	cargo fmt --all

clean:
	cargo clean
	rm -rf $(VENV) $(MODEL) $(UNET)

## image-test: the CPU and model images of deploy/docker/Dockerfile, built with Debian's docker.io on
##             locally debootstrapped bases (no registry needed) and run as the pod runs them (init
##             step checking the model's SHA-256, then the server: read-only root, uid 65532, TLS);
##             classifies through the container (deploy/README.md, "Image test"; needs root).
##             IMAGE_TEST_TLS=0 serves plaintext. image-test-clean removes its images and cache.
.PHONY: image-test image-test-clean
image-test: build
	deploy/image-test/run.sh

image-test-clean:
	deploy/image-test/run.sh clean

## bench: serving benchmark (bare ORT loop vs served, latency, preprocessing) and the criterion
##        preprocessing microbenchmarks; see docs/PERFORMANCE.md
bench: setup model
	cargo bench --locked --bench serving -- $(ARGS)
	cargo bench --locked --bench preprocess

## bench-dicom: a 512x512 16-bit MR slice to the tensor (uncompressed, JPEG-LS, JPEG 2000) against
##        pydicom + numpy side by side on one core, and a 24-slice series end to end with the
##        default model (docs/PERFORMANCE.md)
.PHONY: bench-dicom
bench-dicom: build model dicom-reference
	cargo bench --locked --bench dicom -- --series $(MODEL_DIR) $(ARGS)

## bench-front-ends: call rate, latency and server CPU per call of every front end (gRPC Classify and
##        ModelInfer with ghz, HTTP /v1/classify and /v2 infer with hey), interleaved rounds, ratios
##        to Classify; target ModelInfer >= 0.95 x Classify (docs/PERFORMANCE.md)
## bench-study: a BraTS-sized DICOM study (3 × 155 slices of 240²) end to end through
##              `brainai segment --study` against the Python stack (pydicom + numpy + onnxruntime +
##              highdicom), alternating rounds (benches/study.sh)
.PHONY: bench-study
bench-study: build model dicom-reference
	benches/study.sh $(or $(ROUNDS),3)

## bench-dicom-node: the DICOM node end to end (issue 25): a 155-slice FLAIR series stored by dcmtk's
##                   storescu, its SR received by storescp; the node (--dicom-addr) against the
##                   integration-engine pattern (pynetdicom SCP + gRPC ClassifySeries + pynetdicom
##                   SCU) on the same server, alternating rounds (benches/dicom_node.sh)
.PHONY: bench-dicom-node
bench-dicom-node: build model dicom-reference dicom-tools
	benches/dicom_node.sh $(or $(ROUNDS),5)

.PHONY: bench-front-ends
bench-front-ends: build ghz
	$(PY) benches/front_ends.py $(ARGS)

## bench-targets: the CPU serving targets side by side with ghz (docs/PERFORMANCE.md, "Keeping the
##        model busy"): ARGS="saturation|overhead|latency [--rounds N] [--seconds S] [--config NAME:FLAGS]"
.PHONY: bench-targets
bench-targets: build model ghz
	cargo bench --locked --no-run --bench serving
	$(PY) benches/targets.py $(or $(ARGS),saturation)

## bench-device-bound: the real server and ghz against a simulated accelerator (each batch sleeps
##                     fixed + per-image time): how busy the batcher keeps a device, without one
.PHONY: bench-device-bound
bench-device-bound: build model ghz
	cargo bench --locked --bench device_bound -- $(ARGS)

## bench-curve: latency versus load with ghz (p50/p99 at 25-100 % of saturation, two queue delays) → PNG
bench-curve: build model ghz
	$(PY) -m pip install --quiet --disable-pip-version-check -r tests/load/requirements-plot.txt
	$(PY) tests/load/latency_curve.py $(ARGS)

## ghz: the pinned ghz load generator (v0.121.0) in .tools/bin (needs Go 1.23+; skipped when present)
## load: ghz load test of the default model: fixed concurrency, then fixed rate (tests/load/README.md)
##       options: make load ARGS="--duration 60s --concurrency 16 --rps 15 --model-dir DIR"
## load-smoke: CI smoke load test (tiny model, ~10 s of load); fails on any error response or no batching
## resilience: overload at 3x saturation, SIGTERM under load, connection age, idle and slow floods,
##             decode amplification, a 10-minute soak; targets checked, figures in target/resilience
## resilience-smoke: the short form (part of make test): speed targets printed, not enforced
.PHONY: resilience resilience-smoke
resilience: build model ghz
	$(PY) tests/resilience/resilience.py $(ARGS)

resilience-smoke: build model ghz
	$(PY) tests/resilience/resilience.py --short $(ARGS)

## fuzz: coverage-guided fuzzing (AFL++ via the pinned cargo-afl, stable Rust) of every parser of
##       untrusted input, 12 min per target (8 targets: 1.6 CPU-hours); results: target/afl/summary.txt, corpus
##       and regressions under fuzz/ (make test replays them: tests/fuzz.rs)
.PHONY: fuzz fuzz-lock
fuzz: setup
	fuzz/run_afl.sh $(ARGS)

## fuzz-lock: fuzz/Cargo.lock is current with the service's dependencies (run by make test: a stale
##            one stops make fuzz's --locked build); fix with `cd fuzz && cargo update --workspace`
fuzz-lock:
	cd fuzz && cargo metadata --locked --format-version 1 >/dev/null

.PHONY: ghz load load-smoke
ghz:
	@tests/load/install_ghz.sh >/dev/null

load: build model ghz
	tests/load/run_load.sh --model-dir $(MODEL_DIR) $(ARGS)

load-smoke: build ghz
	MODEL_DIR= tests/load/run_load.sh --smoke $(ARGS)
