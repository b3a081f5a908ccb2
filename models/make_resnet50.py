#!/usr/bin/env python3
"""Build the default BrainAI Serve model: a ResNet-50 v1.5 ONNX graph with synthetic weights.

No trained brain-MRI weights can be downloaded in this environment, so this script builds the
exact torchvision ResNet-50 v1.5 architecture (7x7/2 stem, 3x3/2 max-pool, bottleneck stages
[3, 4, 6, 3], stride on the 3x3 conv, projection shortcuts, global average pool, FC) with
deterministic, *untrained* weights drawn from a fixed numpy seed.  The result exercises the
serving path with a realistic graph (size, compute, memory), but its predictions are
meaningless.  Replace it with a real export via models/export/export_torchvision.py.

Weight scheme (keeps activations numerically sane without any training):
  * convolutions: He-normal (std = sqrt(2 / fan_in)), no bias, like torchvision;
  * BatchNormalization nodes (inference mode) with running_mean = 0, running_var = 1,
    gamma = 1, beta = 0, except the last BN of each bottleneck, whose gamma is
    RESIDUAL_GAMMA (a Fixup-style down-scaling of the residual branch so the variance of
    the residual stream grows only mildly over the 16 blocks);
  * fc: normal with std FC_STD, zero bias.
The output is deterministic byte-for-byte for a given seed and the pinned numpy/onnx versions
(models/requirements.txt).

Usage:
    python models/make_resnet50.py --out models/brain-tumor-resnet50/1/model.onnx
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

DEFAULT_SEED = 5
NUM_CLASSES = 2
LABELS = ["no_tumor", "tumor"]
IMAGE_SIZE = 256
STAGES = [(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)]  # (width, blocks, first stride)
EXPANSION = 4
RESIDUAL_GAMMA = 0.2
FC_STD = 0.015
BN_EPS = 1e-5
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


class GraphBuilder:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def _init(self, name: str, arr: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def conv(self, x: str, prefix: str, cin: int, cout: int, k: int, stride: int) -> str:
        fan_in = cin * k * k
        w = self.rng.standard_normal((cout, cin, k, k), dtype=np.float32)
        w *= np.float32(np.sqrt(2.0 / fan_in))
        wname = self._init(f"{prefix}.weight", w)
        out = f"{prefix}_out"
        pad = k // 2
        self.nodes.append(
            helper.make_node(
                "Conv", [x, wname], [out], name=prefix,
                kernel_shape=[k, k], strides=[stride, stride], pads=[pad, pad, pad, pad],
                dilations=[1, 1], group=1,
            )
        )
        return out

    def bn(self, x: str, prefix: str, c: int, gamma: float = 1.0) -> str:
        names = [
            self._init(f"{prefix}.weight", np.full(c, gamma, dtype=np.float32)),
            self._init(f"{prefix}.bias", np.zeros(c, dtype=np.float32)),
            self._init(f"{prefix}.running_mean", np.zeros(c, dtype=np.float32)),
            self._init(f"{prefix}.running_var", np.ones(c, dtype=np.float32)),
        ]
        out = f"{prefix}_out"
        self.nodes.append(
            helper.make_node("BatchNormalization", [x, *names], [out], name=prefix, epsilon=BN_EPS)
        )
        return out

    def relu(self, x: str, name: str) -> str:
        out = f"{name}_out"
        self.nodes.append(helper.make_node("Relu", [x], [out], name=name))
        return out

    def bottleneck(self, x: str, prefix: str, cin: int, width: int, stride: int) -> str:
        cout = width * EXPANSION
        y = self.relu(self.bn(self.conv(x, f"{prefix}.conv1", cin, width, 1, 1), f"{prefix}.bn1", width), f"{prefix}.relu1")
        # ResNet v1.5: the stride sits on the 3x3 conv.
        y = self.relu(self.bn(self.conv(y, f"{prefix}.conv2", width, width, 3, stride), f"{prefix}.bn2", width), f"{prefix}.relu2")
        y = self.bn(self.conv(y, f"{prefix}.conv3", width, cout, 1, 1), f"{prefix}.bn3", cout, gamma=RESIDUAL_GAMMA)
        if stride != 1 or cin != cout:
            identity = self.bn(
                self.conv(x, f"{prefix}.downsample.0", cin, cout, 1, stride), f"{prefix}.downsample.1", cout
            )
        else:
            identity = x
        s = f"{prefix}.add_out"
        self.nodes.append(helper.make_node("Add", [y, identity], [s], name=f"{prefix}.add"))
        return self.relu(s, f"{prefix}.relu3")


def build(seed: int) -> onnx.ModelProto:
    g = GraphBuilder(seed)
    x = g.relu(g.bn(g.conv("input", "conv1", 3, 64, 7, 2), "bn1", 64), "relu")
    pooled = "maxpool_out"
    g.nodes.append(
        helper.make_node("MaxPool", [x], [pooled], name="maxpool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    )
    x, cin = pooled, 64
    for li, (width, blocks, stride) in enumerate(STAGES, start=1):
        for bi in range(blocks):
            x = g.bottleneck(x, f"layer{li}.{bi}", cin, width, stride if bi == 0 else 1)
            cin = width * EXPANSION
    g.nodes.append(helper.make_node("GlobalAveragePool", [x], ["avgpool_out"], name="avgpool"))
    g.nodes.append(helper.make_node("Flatten", ["avgpool_out"], ["flatten_out"], name="flatten", axis=1))
    fc_w = g.rng.standard_normal((NUM_CLASSES, cin), dtype=np.float32) * np.float32(FC_STD)
    g._init("fc.weight", fc_w)
    g._init("fc.bias", np.zeros(NUM_CLASSES, dtype=np.float32))
    g.nodes.append(
        helper.make_node("Gemm", ["flatten_out", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1)
    )

    graph = helper.make_graph(
        g.nodes,
        "resnet50_v1_5",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, IMAGE_SIZE, IMAGE_SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", NUM_CLASSES])],
        initializer=g.inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="brainai-make-resnet50",
        producer_version="1",
        doc_string="ResNet-50 v1.5 (torchvision layout) with SYNTHETIC, UNTRAINED weights. Not for clinical use.",
    )
    model.ir_version = IR_VERSION
    helper.set_model_props(
        model,
        {
            "name": "brain-tumor-resnet50",
            "architecture": "resnet50-v1.5",
            "weights": f"synthetic-deterministic-seed-{seed}",
            "clinically_trained": "false",
            "labels": ",".join(LABELS),
            "input_layout": "NCHW",
        },
    )
    return model


def test_images() -> dict[str, np.ndarray]:
    """A few deterministic uint8 RGB images (H, W, 3), 256x256, for the smoke check."""
    n = IMAGE_SIZE
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    r = np.hypot(yy - n / 2, xx - n / 2)
    imgs = {
        "black": np.zeros((n, n), np.float32),
        "mid-gray": np.full((n, n), 128.0, np.float32),
        "h-gradient": xx / (n - 1) * 255.0,
        "v-gradient": 255.0 - yy / (n - 1) * 255.0,
        "noise": np.random.default_rng(1).integers(0, 256, (n, n)).astype(np.float32),
        # crude "axial slice": grey disc, darker ring, bright blob ("lesion")
        "disc+blob": np.where(r < 100, 110.0, 0.0) + np.where(r < 104, 40.0, 0.0)
        + 100.0 * np.exp(-(((yy - 90) ** 2 + (xx - 150) ** 2) / (2 * 12.0**2))),
        "disc": np.where(r < 100, 110.0, 0.0) + np.where(r < 104, 40.0, 0.0),
    }
    out = {}
    for k, v in imgs.items():
        g = np.clip(np.rint(v), 0, 255).astype(np.uint8)
        out[k] = np.stack([g, g, g], axis=-1)
    out["color-noise"] = np.random.default_rng(2).integers(0, 256, (n, n, 3)).astype(np.uint8)
    return out


def preprocess(img: np.ndarray) -> np.ndarray:
    x = img.astype(np.float32) / np.float32(255.0)
    x = (x - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def verify(path: str) -> None:
    import onnxruntime as ort

    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input"]
    assert [o.name for o in sess.get_outputs()] == ["logits"]
    imgs = test_images()
    batch = np.stack([preprocess(v) for v in imgs.values()])
    logits = sess.run(["logits"], {"input": batch})[0]
    assert logits.shape == (len(imgs), NUM_CLASSES), logits.shape
    assert np.all(np.isfinite(logits)), "non-finite logits"
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs = e / e.sum(axis=1, keepdims=True)
    print(f"onnxruntime {ort.__version__}: loaded and ran {path}")
    print(f"  {'image':<12} {'logit no_tumor':>15} {'logit tumor':>12} {'p(tumor)':>9}")
    for name, lg, p in zip(imgs, logits, probs):
        print(f"  {name:<12} {lg[0]:>15.4f} {lg[1]:>12.4f} {p[1]:>9.4f}")
    # batch-independence: single-image run must agree with the batched run
    single = sess.run(["logits"], {"input": batch[:1]})[0]
    np.testing.assert_allclose(single[0], logits[0], rtol=1e-4, atol=1e-4)
    if np.all((probs < 1e-3) | (probs > 1 - 1e-3)):
        sys.exit("sanity check failed: softmax probabilities are saturated")
    if np.ptp(probs[:, 1]) < 1e-3:
        sys.exit("sanity check failed: probabilities do not vary between images")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="models/brain-tumor-resnet50/1/model.onnx")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--no-verify", action="store_true", help="skip the onnxruntime smoke test")
    args = ap.parse_args()

    t0 = time.perf_counter()
    model = build(args.seed)
    onnx.checker.check_model(model)
    data = model.SerializeToString(deterministic=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, args.out)
    n_params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    print(
        f"wrote {args.out}: {len(data) / 1e6:.1f} MB, {n_params:,} parameters, "
        f"ir_version={model.ir_version}, opset={OPSET}, seed={args.seed}, "
        f"sha256={hashlib.sha256(data).hexdigest()}  ({time.perf_counter() - t0:.1f}s)"
    )
    if not args.no_verify:
        verify(args.out)
    print(f"done in {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
