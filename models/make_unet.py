#!/usr/bin/env python3
"""Build the default BrainAI Serve segmentation model: a 2D U-Net ONNX graph with synthetic weights.

No trained brain-MRI weights can be downloaded in this environment, so this script builds a
Ronneberger-style 2D U-Net for BraTS-like tumour segmentation from three MR sequences (FLAIR, T1c,
T2 stacked as the input's channels) with deterministic, *untrained* weights drawn from a fixed numpy
seed.  It exercises the segmentation serving path with a realistic graph (size, compute, memory,
a full-resolution [batch, 4, 240, 240] output), but its masks are meaningless.  Replace it with a
real export via models/export/export_unet.py.

Architecture (input "input" [batch,3,240,240] NCHW, output "logits" [batch,4,240,240] NCHW):
  * encoder: 5 blocks of widths BASE * [1, 2, 4, 8, 16] = 16, 32, 64, 128, 256 at 240, 120, 60,
    30, 15 pixels; each block is (Conv 3x3 pad 1 + BatchNormalization + Relu) x 2; a 2x2/2
    MaxPool between blocks (4 poolings; 240 = 15 * 16 divides evenly);
  * decoder: 4 levels, each a 2x2/2 ConvTranspose halving the width, Concat with the encoder's
    skip at that resolution (skip first, as torch.cat([skip, up], 1)), then a block as above;
  * head: 1x1 Conv to the 4 classes background, non_enhancing_core, edema, enhancing.
Weight scheme (keeps activations numerically sane without any training):
  * 3x3 convolutions: He-normal (std = sqrt(2 / fan_in), fan_in = cin * 9), no bias (BN follows);
  * BatchNormalization nodes (inference mode): running_mean = 0, running_var = 1, gamma = 1,
    beta = 0;
  * ConvTranspose: He-normal with fan_in = cin (a 2x2/2 kernel does not overlap: each output
    pixel sees cin inputs), zero bias;
  * head: normal with std HEAD_STD, zero bias, so the logits are of order 1 (a zero bias and a
    scale do not change the argmax: the classes are whatever the random features give, no
    tuning; the self-check prints the class histogram of a test slice).
The output is deterministic byte-for-byte for a given seed and the pinned numpy/onnx versions
(models/requirements.txt).

Usage:
    python models/make_unet.py --out models/brain-tumor-unet/1/model.onnx
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# ONNX Runtime 1.26 (the oldest runtime the service supports) accepts IR version <= 10 and
# opset <= 23; onnx 1.23 writes IR 14 by default, which ONNX Runtime refuses.  Pin both.
IR_VERSION = 8
OPSET = 17

DEFAULT_SEED = 23
BASE = 16
LEVELS = 4  # poolings
CHANNELS = ["FLAIR", "T1c", "T2"]
LABELS = ["background", "non_enhancing_core", "edema", "enhancing"]
IMAGE_SIZE = 240
BN_EPS = 1e-5
HEAD_STD = 0.1
MEAN = np.float32(0.5)  # placeholders, as in model.toml
STD = np.float32(0.25)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_SLICE = os.path.join(REPO, "tests", "data", "flair_256_a.png")


class GraphBuilder:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def _init(self, name: str, arr: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def he(self, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
        w = self.rng.standard_normal(shape, dtype=np.float32)
        w *= np.float32(np.sqrt(2.0 / fan_in))
        return w

    def conv(self, x: str, prefix: str, cin: int, cout: int, k: int, bias: bool = False, std: float | None = None) -> str:
        if std is None:
            w = self.he((cout, cin, k, k), cin * k * k)
        else:
            w = self.rng.standard_normal((cout, cin, k, k), dtype=np.float32) * np.float32(std)
        inputs = [x, self._init(f"{prefix}.weight", w)]
        if bias:
            inputs.append(self._init(f"{prefix}.bias", np.zeros(cout, dtype=np.float32)))
        out = f"{prefix}_out"
        pad = k // 2
        self.nodes.append(
            helper.make_node(
                "Conv", inputs, [out], name=prefix,
                kernel_shape=[k, k], strides=[1, 1], pads=[pad, pad, pad, pad], dilations=[1, 1], group=1,
            )
        )
        return out

    def bn(self, x: str, prefix: str, c: int) -> str:
        names = [
            self._init(f"{prefix}.weight", np.ones(c, dtype=np.float32)),
            self._init(f"{prefix}.bias", np.zeros(c, dtype=np.float32)),
            self._init(f"{prefix}.running_mean", np.zeros(c, dtype=np.float32)),
            self._init(f"{prefix}.running_var", np.ones(c, dtype=np.float32)),
        ]
        out = f"{prefix}_out"
        self.nodes.append(helper.make_node("BatchNormalization", [x, *names], [out], name=prefix, epsilon=BN_EPS))
        return out

    def relu(self, x: str, name: str) -> str:
        out = f"{name}_out"
        self.nodes.append(helper.make_node("Relu", [x], [out], name=name))
        return out

    def block(self, x: str, prefix: str, cin: int, cout: int) -> str:
        """(Conv 3x3 + BN + ReLU) x 2, as MONAI's / the original U-Net's double convolution."""
        for i, c in ((1, cin), (2, cout)):
            x = self.relu(self.bn(self.conv(x, f"{prefix}.conv{i}", c, cout, 3), f"{prefix}.bn{i}", cout), f"{prefix}.relu{i}")
        return x

    def maxpool(self, x: str, name: str) -> str:
        out = f"{name}_out"
        self.nodes.append(helper.make_node("MaxPool", [x], [out], name=name, kernel_shape=[2, 2], strides=[2, 2]))
        return out

    def up(self, x: str, prefix: str, cin: int, cout: int) -> str:
        w = self._init(f"{prefix}.weight", self.he((cin, cout, 2, 2), cin))
        b = self._init(f"{prefix}.bias", np.zeros(cout, dtype=np.float32))
        out = f"{prefix}_out"
        self.nodes.append(
            helper.make_node("ConvTranspose", [x, w, b], [out], name=prefix, kernel_shape=[2, 2], strides=[2, 2])
        )
        return out

    def concat(self, xs: list[str], name: str) -> str:
        out = f"{name}_out"
        self.nodes.append(helper.make_node("Concat", xs, [out], name=name, axis=1))
        return out


def build(seed: int) -> onnx.ModelProto:
    g = GraphBuilder(seed)
    widths = [BASE * 2**i for i in range(LEVELS + 1)]
    skips = []
    x, cin = "input", len(CHANNELS)
    for i, w in enumerate(widths):
        if i:
            x = g.maxpool(x, f"down{i}.pool")
        x = g.block(x, f"down{i}" if i < LEVELS else "bottleneck", cin, w)
        skips.append(x)
        cin = w
    for i in reversed(range(LEVELS)):
        w = widths[i]
        up = g.up(x, f"up{i}.upconv", cin, w)
        x = g.block(g.concat([skips[i], up], f"up{i}.concat"), f"up{i}", 2 * w, w)
        cin = w
    head = g.conv(x, "head", cin, len(LABELS), 1, bias=True, std=HEAD_STD)
    g.nodes[-1].output[0] = "logits"
    assert head == "head_out"

    graph = helper.make_graph(
        g.nodes,
        "unet2d",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", len(CHANNELS), IMAGE_SIZE, IMAGE_SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", len(LABELS), IMAGE_SIZE, IMAGE_SIZE])],
        initializer=g.inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="brainai-make-unet",
        producer_version="1",
        doc_string="2D U-Net (4 poolings, widths 16-256) with SYNTHETIC, UNTRAINED weights. Not for clinical use.",
    )
    model.ir_version = IR_VERSION
    helper.set_model_props(
        model,
        {
            "name": "brain-tumor-unet",
            "architecture": f"unet2d-{LEVELS}-levels-base-{BASE}",
            "weights": f"synthetic-deterministic-seed-{seed}",
            "clinically_trained": "false",
            "task": "segmentation",
            "channels": ",".join(CHANNELS),
            "labels": ",".join(LABELS),
            "input_layout": "NCHW",
        },
    )
    return model


def test_images() -> dict[str, np.ndarray]:
    """Deterministic 240x240 uint8 gray images for the smoke check (replicated to the 3 channels)."""
    from PIL import Image

    n = IMAGE_SIZE
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    r = np.hypot(yy - n / 2, xx - n / 2)
    imgs = {
        "black": np.zeros((n, n), np.float32),
        "h-gradient": xx / (n - 1) * 255.0,
        "noise": np.random.default_rng(1).integers(0, 256, (n, n)).astype(np.float32),
        # crude "axial slice": grey disc, brighter rim, bright blob ("lesion")
        "disc+blob": np.where(r < 94, 110.0, 0.0) + np.where(r < 98, 40.0, 0.0)
        + 100.0 * np.exp(-(((yy - 85) ** 2 + (xx - 140) ** 2) / (2 * 11.0**2))),
    }
    out = {k: np.clip(np.rint(v), 0, 255).astype(np.uint8) for k, v in imgs.items()}
    with Image.open(TEST_SLICE) as img:  # the synthetic FLAIR slice of tests/data, as the service would see it
        out["flair_256_a.png"] = np.asarray(img.convert("L").resize((n, n), Image.Resampling.BILINEAR))
    return out


def preprocess(gray: np.ndarray) -> np.ndarray:
    """One gray slice replicated into FLAIR, T1c, T2: [3, H, W], (p/255 - mean) / std."""
    x = (gray.astype(np.float32) / np.float32(255.0) - MEAN) / STD
    return np.ascontiguousarray(np.repeat(x[None], len(CHANNELS), axis=0))


def histogram(mask: np.ndarray) -> str:
    counts = np.bincount(mask.reshape(-1), minlength=len(LABELS))
    return ", ".join(f"{label} {c / mask.size:6.1%}" for label, c in zip(LABELS, counts))


def verify(path: str, latency_runs: int) -> None:
    import onnxruntime as ort

    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input"]
    assert [o.name for o in sess.get_outputs()] == ["logits"]
    imgs = test_images()
    batch = np.stack([preprocess(v) for v in imgs.values()])
    logits = sess.run(["logits"], {"input": batch})[0]
    assert logits.shape == (len(imgs), len(LABELS), IMAGE_SIZE, IMAGE_SIZE), logits.shape
    assert np.all(np.isfinite(logits)), "non-finite logits"
    masks = logits.argmax(axis=1)
    print(f"onnxruntime {ort.__version__}: loaded and ran {path}")
    print("  class histogram of the argmax mask per test image (gray, replicated to FLAIR/T1c/T2):")
    for name, lg, m in zip(imgs, logits, masks):
        print(f"  {name:<16} logits [{lg.min():7.3f}, {lg.max():7.3f}]  {histogram(m)}")
    # batch-independence: a single-image run must agree with the batched run
    last = len(imgs) - 1
    single = sess.run(["logits"], {"input": batch[last:]})[0]
    np.testing.assert_allclose(single[0], logits[last], rtol=1e-4, atol=1e-4)
    slice_classes = np.unique(masks[last])
    if len(slice_classes) < 2:
        sys.exit(f"sanity check failed: one class everywhere on {TEST_SLICE}")
    if np.ptp(logits[last]) < 1e-3:
        sys.exit("sanity check failed: logits do not vary over the slice")

    if latency_runs:
        threads = os.cpu_count()
        for n in (1, 8):
            x = np.repeat(batch[last:], n, axis=0)
            sess.run(["logits"], {"input": x})  # warm-up
            times = []
            for _ in range(latency_runs):
                t = time.perf_counter()
                sess.run(["logits"], {"input": x})
                times.append(time.perf_counter() - t)
            print(f"  CPU latency, batch {n}: median {np.median(times) * 1e3:.0f} ms, min {min(times) * 1e3:.0f} ms "
                  f"over {latency_runs} runs ({threads} cores, onnxruntime default threads)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="models/brain-tumor-unet/1/model.onnx")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--no-verify", action="store_true", help="skip the onnxruntime smoke test")
    ap.add_argument("--latency-runs", type=int, default=5, help="timed runs per batch size in the smoke test (0: none)")
    args = ap.parse_args()

    t0 = time.perf_counter()
    model = build(args.seed)
    onnx.checker.check_model(model, full_check=True)
    data = model.SerializeToString(deterministic=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, args.out)
    n_params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    n_bn = sum(int(np.prod(t.dims)) for t in model.graph.initializer if ".bn" in t.name)
    print(
        f"wrote {args.out}: {len(data) / 1e6:.1f} MB, {n_params:,} parameters ({n_bn:,} of them BN statistics), "
        f"ir_version={model.ir_version}, opset={OPSET}, seed={args.seed}, "
        f"sha256={hashlib.sha256(data).hexdigest()}  ({time.perf_counter() - t0:.1f}s)"
    )
    if not args.no_verify:
        verify(args.out, args.latency_runs)
    print(f"done in {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
