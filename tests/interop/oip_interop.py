#!/usr/bin/env python3
"""Interoperability of the Open Inference Protocol front ends with NVIDIA's own client.

Starts the release binary (a separate process, real TCP) on a repository of two tiny models (NCHW
logits, NHWC probabilities) and drives it with the pinned `tritonclient` over gRPC and HTTP:
liveness, readiness, server and model metadata, inference with BYTES images and with FP32 tensors
(binary and JSON on HTTP), the classification extension, output selection and an error. Every
answer is compared with `brainai classify --json` (the `Classify` RPC, another client process) on
the same images: BYTES images must give Classify's probabilities (1e-6), FP32 tensors preprocessed
by the independent Pillow reference must give them to 1e-4.

Segmentation models (seg-threshold: NCHW logits, nearest mask mapping; seg-nhwc: NHWC
probabilities in another channel order, bilinear mapping): metadata (one BYTES input per channel,
the stacked FP32 tensor, outputs `mask` UINT8 [N, H, W] and `probabilities` FP32
[N, labels, H, W]), two slices of one BYTES image per channel whose masks must equal the
independent numpy + Pillow + onnxruntime reference (tests/reference/segment_reference.py) exactly,
the probability maps (binary data on HTTP) whose argmax is the mask, the stacked FP32 tensor whose
mask must equal the test model's closed form, and a missing channel refused naming it.

Usage: tests/interop/oip_interop.py [--bin target/release/brainai]. Exit status 1 on any mismatch.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests/data"
IMAGES = ["flair_256_a.png", "flair_512_a.jpg", "flair_300x220.png", "flair_512_rgb.png"]
MODELS = {"tiny": "tiny", "tiny-nhwc-probs": "tiny-nhwc-probs"}
SEG_MODELS = ["seg-threshold", "seg-nhwc"]
# Two slices of 256x256 images, one per channel (FLAIR, T1c, T2).
SLICES = [
    {"FLAIR": "flair_256_a.png", "T1c": "flair_256_b.png", "T2": "flair_256_c.png"},
    {"FLAIR": "flair_256_c.png", "T1c": "flair_256_tumor.png", "T2": "flair_256_a.png"},
]
# seg-threshold's closed form (models/make_tiny_models.py): z_k = W[k] . (FLAIR, T1c, T2) + B[k].
SEG_W = np.array([[0, 0, 0], [0, -1, 2], [2, -1, 1], [0, 3, 0]], dtype=np.int64)
SEG_B = np.array([48, 0, -100, -216], dtype=np.int64)
PATIENCE_S = 120

failures: list[str] = []


def check(ok: bool, what: str) -> None:
    print(("  ok    " if ok else "  FAIL  ") + what)
    if not ok:
        failures.append(what)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def classify_cli(binary: str, grpc_port: int, model: str) -> dict:
    """`brainai classify --json` of every image: {file name: result}."""
    out = subprocess.run(
        [binary, "classify", "--json", "--server", f"http://127.0.0.1:{grpc_port}",
         "--model", model, *[str(DATA / n) for n in IMAGES]],
        check=True, capture_output=True, text=True, timeout=PATIENCE_S,
    ).stdout
    return {Path(r["file"]).name: r for r in json.loads(out)["results"]}


def reference_tensor(model_dir: Path, names: list[str]) -> np.ndarray:
    """The independent Pillow + numpy preprocessing (tests/reference/reference.py)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "t.f32"
        printed = subprocess.run(
            [sys.executable, str(ROOT / "tests/reference/reference.py"), "preprocess",
             "--model-dir", str(model_dir), "--out", str(out), *[str(DATA / n) for n in names]],
            check=True, capture_output=True, text=True, timeout=PATIENCE_S,
        ).stdout
        shape = json.loads(printed)["shape"]
        return np.fromfile(out, dtype="<f4").reshape(shape)


def expected(classified: dict, names: list[str]) -> tuple[np.ndarray, list[str], list[str]]:
    """Classify's probabilities (rows in label order), labels and label names."""
    labels = list(classified[names[0]]["probabilities"].keys())
    rows = np.array([[classified[n]["probabilities"][l] for l in labels] for n in names],
                    dtype=np.float32)
    return rows, [classified[n]["label"] for n in names], labels


def close(a: np.ndarray, b: np.ndarray, tol: float) -> bool:
    return a.shape == b.shape and bool(np.all(np.abs(a - b) <= tol))


def images_array(names: list[str]) -> np.ndarray:
    return np.array([(DATA / n).read_bytes() for n in names], dtype=np.object_)


def check_classification(top: np.ndarray, want: np.ndarray, labels: list[str], what: str) -> None:
    """Entries "score:index:label", best first, against Classify's probabilities."""
    ok = True
    for row, probs in zip(top, want):
        order = np.argsort(-probs, kind="stable")
        for k, entry in enumerate(row):
            text = entry.decode() if isinstance(entry, bytes) else entry
            score, index, label = text.split(":", 2)
            ok &= int(index) == order[k] and label == labels[order[k]]
            ok &= abs(float(score) - probs[order[k]]) <= 1e-5
    check(ok, f"{what}: classification extension = Classify's ranking and scores")


def run_grpc(url: str, model: str, model_dir: Path, classified: dict) -> None:
    print(f"gRPC ({url}), model {model}")
    c = grpcclient.InferenceServerClient(url=url)
    check(c.is_server_live(), "server live")
    check(c.is_server_ready(), "server ready")
    check(c.is_model_ready(model), f"model {model} ready")
    check(not c.is_model_ready("no-such-model"), "unknown model not ready")
    meta = c.get_server_metadata()
    check(meta.name == "brainai" and "classification" in meta.extensions,
          f"server metadata {meta.name} {list(meta.extensions)}")
    mm = c.get_model_metadata(model)
    inputs = {i.name: (i.datatype, list(i.shape)) for i in mm.inputs}
    outputs = {o.name: (o.datatype, list(o.shape)) for o in mm.outputs}
    want, want_labels, labels = expected(classified, IMAGES)
    check(inputs.get("IMAGE") == ("BYTES", [-1]), f"metadata input IMAGE {inputs}")
    check(outputs.get("probabilities") == ("FP32", [-1, len(labels)]) and "label" in outputs,
          f"metadata outputs {outputs}")

    image = grpcclient.InferInput("IMAGE", [len(IMAGES)], "BYTES")
    image.set_data_from_numpy(images_array(IMAGES))
    r = c.infer(model, [image])
    check(close(r.as_numpy("probabilities"), want, 1e-6), "BYTES images: probabilities = Classify")
    check([l.decode() for l in r.as_numpy("label")] == want_labels, "BYTES images: labels = Classify")
    params = r.get_response().parameters
    sha = classified[IMAGES[0]]["model"]["sha256"]
    check(params["model_sha256"].string_param == sha, "response names the model's SHA-256")
    check(params["clinically_trained"].bool_param == classified[IMAGES[0]]["model"]["clinically_trained"],
          "response says whether the model was clinically trained")

    top = grpcclient.InferRequestedOutput("probabilities", class_count=len(labels))
    r = c.infer(model, [image], outputs=[top])
    check(r.as_numpy("label") is None, "only the requested output comes back")
    check_classification(r.as_numpy("probabilities"), want, labels, "gRPC")

    for name, shape in [(n, s) for n, (d, s) in inputs.items() if d == "FP32"]:
        tensor = reference_tensor(model_dir, IMAGES)
        check(list(tensor.shape[1:]) == shape[1:], f"reference tensor {tensor.shape} fits {shape}")
        fp32 = grpcclient.InferInput(name, list(tensor.shape), "FP32")
        fp32.set_data_from_numpy(tensor)
        r = c.infer(model, [fp32])
        check(close(r.as_numpy("probabilities"), want, 1e-4), "FP32 tensor: probabilities = Classify (1e-4)")

    bad = grpcclient.InferInput("IMAGE", [1], "BYTES")
    bad.set_data_from_numpy(np.array([b"not an image"], dtype=np.object_))
    try:
        c.infer(model, [bad])
        check(False, "a bad image is refused")
    except InferenceServerException as e:
        check(e.status() == "StatusCode.INVALID_ARGUMENT" and "image 0" in e.message(),
              f"a bad image is refused: {e.status()} {e.message()}")
    c.close()


def run_http(url: str, model: str, model_dir: Path, classified: dict) -> None:
    print(f"HTTP ({url}), model {model}")
    c = httpclient.InferenceServerClient(url=url, network_timeout=PATIENCE_S)
    check(c.is_server_live(), "server live")
    check(c.is_server_ready(), "server ready")
    check(c.is_model_ready(model), f"model {model} ready")
    check(not c.is_model_ready("no-such-model"), "unknown model not ready")
    meta = c.get_server_metadata()
    check(meta["name"] == "brainai" and "binary_tensor_data" in meta["extensions"],
          f"server metadata {meta}")
    mm = c.get_model_metadata(model)
    want, want_labels, labels = expected(classified, IMAGES)
    check(mm["parameters"]["labels"] == ",".join(labels), f"metadata labels {mm['parameters']}")

    image = httpclient.InferInput("IMAGE", [len(IMAGES)], "BYTES")
    image.set_data_from_numpy(images_array(IMAGES), binary_data=True)
    for binary in (True, False):
        outs = [httpclient.InferRequestedOutput("probabilities", binary_data=binary),
                httpclient.InferRequestedOutput("label", binary_data=binary)]
        r = c.infer(model, [image], outputs=outs)
        check(close(r.as_numpy("probabilities"), want, 1e-6),
              f"BYTES images, {'binary' if binary else 'JSON'} outputs: probabilities = Classify")
        got = [l.decode() if isinstance(l, bytes) else l for l in r.as_numpy("label")]
        check(got == want_labels, f"BYTES images, {'binary' if binary else 'JSON'} outputs: labels")
    resp = r.get_response()
    check(resp["parameters"]["model_sha256"] == classified[IMAGES[0]]["model"]["sha256"],
          "response names the model's SHA-256")

    top = httpclient.InferRequestedOutput("probabilities", binary_data=False, class_count=len(labels))
    r = c.infer(model, [image], outputs=[top])
    check_classification(r.as_numpy("probabilities"), want, labels, "HTTP")

    name = next(i["name"] for i in mm["inputs"] if i["datatype"] == "FP32")
    tensor = reference_tensor(model_dir, IMAGES)
    for binary in (True, False):
        fp32 = httpclient.InferInput(name, list(tensor.shape), "FP32")
        fp32.set_data_from_numpy(tensor, binary_data=binary)
        r = c.infer(model, [fp32])
        check(close(r.as_numpy("probabilities"), want, 1e-4),
              f"FP32 tensor ({'binary' if binary else 'JSON'}): probabilities = Classify (1e-4)")
    try:
        c.infer("no-such-model", [image])
        check(False, "an unknown model is refused")
    except InferenceServerException as e:
        check("no-such-model" in e.message(), f"an unknown model is refused: {e.message()}")
    c.close()


def seg_reference(model_dir: Path) -> np.ndarray:
    """The independent reference's masks of SLICES, [N, H, W] uint8."""
    with tempfile.TemporaryDirectory() as tmp:
        cases = Path(tmp) / "cases.json"
        cases.write_text(json.dumps([{k: str(DATA / v) for k, v in s.items()} for s in SLICES]))
        out = subprocess.run(
            [sys.executable, str(ROOT / "tests/reference/segment_reference.py"), "--model-dir",
             str(model_dir), "--batch-file", str(cases)],
            check=True, capture_output=True, text=True, timeout=PATIENCE_S,
        ).stdout
    masks = []
    for line in out.splitlines():
        r = json.loads(line)
        masks.append(np.array(r["mask"], dtype=np.uint8).reshape(r["height"], r["width"]))
    return np.stack(masks)


def channel_arrays() -> dict[str, np.ndarray]:
    """Each channel's images of SLICES as one BYTES array."""
    return {seq: np.array([(DATA / s[seq]).read_bytes() for s in SLICES], dtype=np.object_)
            for seq in ("FLAIR", "T1c", "T2")}


def closed_form_case(model_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """A stacked FP32 tensor of integer levels at the model's size (seg-threshold's layout) and its
    closed-form mask."""
    rng = np.random.default_rng(23)
    levels = rng.integers(0, 256, size=(3, 3, 16, 16)).astype(np.int64)  # [N, FLAIR/T1c/T2, H, W]
    z = np.einsum("kc,nchw->nkhw", SEG_W, levels) + SEG_B[None, :, None, None]
    return levels.astype(np.float32), z.argmax(axis=1).astype(np.uint8)


def run_seg_grpc(url: str, model: str, model_dir: Path) -> None:
    print(f"gRPC ({url}), segmentation model {model}")
    c = grpcclient.InferenceServerClient(url=url)
    mm = c.get_model_metadata(model)
    inputs = {i.name: (i.datatype, list(i.shape)) for i in mm.inputs}
    outputs = {o.name: (o.datatype, list(o.shape)) for o in mm.outputs}
    check(all(inputs.get(s) == ("BYTES", [-1]) for s in ("FLAIR", "T1c", "T2")),
          f"metadata: one BYTES input per channel {inputs}")
    check(outputs.get("mask") == ("UINT8", [-1, -1, -1]) and outputs.get("probabilities") == ("FP32", [-1, 4, -1, -1]),
          f"metadata outputs {outputs}")
    want = seg_reference(model_dir)
    ins = []
    for seq, arr in channel_arrays().items():
        i = grpcclient.InferInput(seq, [len(arr)], "BYTES")
        i.set_data_from_numpy(arr)
        ins.append(i)
    r = c.infer(model, ins)
    mask = r.as_numpy("mask")
    check(mask is not None and mask.dtype == np.uint8 and mask.shape == want.shape,
          f"mask UINT8 {None if mask is None else (mask.dtype, mask.shape)}")
    check(mask is not None and np.array_equal(mask, want), "BYTES slices: masks = the Pillow reference, exactly")
    check(r.as_numpy("probabilities") is None, "probabilities only when asked")
    params = r.get_response().parameters
    check(params["model_sha256"].string_param != "" and not params["clinically_trained"].bool_param,
          "response names the model and says it is not clinically trained")
    outs = [grpcclient.InferRequestedOutput("mask"), grpcclient.InferRequestedOutput("probabilities")]
    r = c.infer(model, ins, outputs=outs)
    probs = r.as_numpy("probabilities")
    check(probs is not None and probs.shape == (len(SLICES), 4, 256, 256), f"probabilities {None if probs is None else probs.shape}")
    check(probs is not None and np.array_equal(probs.argmax(axis=1).astype(np.uint8), r.as_numpy("mask")),
          "the mask is the argmax of the probability maps")
    if "input" in inputs and model == "seg-threshold":
        tensor, closed = closed_form_case(model_dir)
        fp32 = grpcclient.InferInput("input", list(tensor.shape), "FP32")
        fp32.set_data_from_numpy(tensor)
        r = c.infer(model, [fp32])
        check(np.array_equal(r.as_numpy("mask"), closed), "FP32 stacked tensor: mask = the closed form")
    try:
        c.infer(model, ins[:2])
        check(False, "a missing channel is refused")
    except InferenceServerException as e:
        check(e.status() == "StatusCode.INVALID_ARGUMENT" and "no T2 image" in e.message(),
              f"a missing channel is refused: {e.status()} {e.message()}")
    c.close()


def run_seg_http(url: str, model: str, model_dir: Path) -> None:
    print(f"HTTP ({url}), segmentation model {model}")
    c = httpclient.InferenceServerClient(url=url, network_timeout=PATIENCE_S)
    mm = c.get_model_metadata(model)
    outputs = {o["name"]: (o["datatype"], o["shape"]) for o in mm["outputs"]}
    check(outputs.get("mask") == ("UINT8", [-1, -1, -1]), f"metadata outputs {outputs}")
    want = seg_reference(model_dir)
    ins = []
    for seq, arr in channel_arrays().items():
        i = httpclient.InferInput(seq, [len(arr)], "BYTES")
        i.set_data_from_numpy(arr, binary_data=True)
        ins.append(i)
    for binary in (True, False):
        r = c.infer(model, ins, outputs=[httpclient.InferRequestedOutput("mask", binary_data=binary)])
        mask = r.as_numpy("mask")
        check(mask is not None and np.array_equal(mask.astype(np.uint8), want),
              f"BYTES slices, {'binary' if binary else 'JSON'} mask = the Pillow reference, exactly")
    outs = [httpclient.InferRequestedOutput("mask", binary_data=True),
            httpclient.InferRequestedOutput("probabilities", binary_data=True)]
    r = c.infer(model, ins, outputs=outs)
    probs = r.as_numpy("probabilities")
    check(probs is not None and probs.shape == (len(SLICES), 4, 256, 256)
          and np.array_equal(probs.argmax(axis=1).astype(np.uint8), r.as_numpy("mask")),
          "binary probability maps; their argmax is the mask")
    if model == "seg-threshold":
        tensor, closed = closed_form_case(model_dir)
        for binary in (True, False):
            fp32 = httpclient.InferInput("input", list(tensor.shape), "FP32")
            fp32.set_data_from_numpy(tensor, binary_data=binary)
            r = c.infer(model, [fp32])
            check(np.array_equal(r.as_numpy("mask").astype(np.uint8), closed),
                  f"FP32 stacked tensor ({'binary' if binary else 'JSON'}): mask = the closed form")
    try:
        c.infer(model, ins[:2])
        check(False, "a missing channel is refused")
    except InferenceServerException as e:
        check("no T2 image" in e.message(), f"a missing channel is refused: {e.message()}")
    c.close()


def wait_ready(proc: subprocess.Popen, http_port: int, log: Path) -> None:
    deadline = time.time() + PATIENCE_S
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    proc.kill()
    sys.exit(f"the server was not ready within {PATIENCE_S} s:\n{log.read_text()[-3000:]}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=str(ROOT / "target/release/brainai"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "models"
        for name, fixture in MODELS.items():
            shutil.copytree(ROOT / "tests/fixtures/models" / fixture, repo / name)
        for name in SEG_MODELS:
            shutil.copytree(ROOT / "tests/fixtures/models" / name, repo / name)
        grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
        log = Path(tmp) / "server.log"
        with open(log, "w") as log_file:
            proc = subprocess.Popen(
                [args.bin, "serve", "--model-repository", str(repo), "--default-model", "tiny",
                 "--grpc-addr", f"127.0.0.1:{grpc_port}", "--http-addr", f"127.0.0.1:{http_port}",
                 "--metrics-addr", f"127.0.0.1:{metrics_port}", "--intra-op-threads", "1"],
                stdout=subprocess.DEVNULL, stderr=log_file)
        try:
            wait_ready(proc, http_port, log)
            for model in MODELS:
                classified = classify_cli(args.bin, grpc_port, model)
                run_grpc(f"127.0.0.1:{grpc_port}", model, repo / model, classified)
                run_http(f"127.0.0.1:{http_port}", model, repo / model, classified)
            for model in SEG_MODELS:
                run_seg_grpc(f"127.0.0.1:{grpc_port}", model, repo / model)
                run_seg_http(f"127.0.0.1:{http_port}", model, repo / model)
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
                metrics = r.read().decode()
            for rpc in ("ModelInfer", "v2.infer"):
                check(f'rpc="{rpc}",code="OK"' in metrics, f"metrics count {rpc} calls")
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                failures.append("the server did not stop within 30 s of SIGTERM")
        if proc.returncode not in (0, None):
            failures.append(f"the server exited with {proc.returncode}")
    if failures:
        print(f"\ninterop FAILED ({len(failures)}):\n  " + "\n  ".join(failures))
        return 1
    print("\ninterop: tritonclient gRPC and HTTP agree with Classify and the segmentation reference")
    return 0


if __name__ == "__main__":
    sys.exit(main())
