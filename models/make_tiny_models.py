#!/usr/bin/env python3
"""Write the small, committed test models under tests/fixtures/models/.

Each model is tests/fixtures/models/<name>/model.toml + <name>/1/model.onnx (a few hundred
bytes to a few KB).  The output is byte-for-byte deterministic, so re-running the script on a
clean checkout leaves `git status` clean.

  tiny             NCHW [batch,3,32,32] -> logits [batch,2]
                   logits = GlobalAveragePool(x) @ W + b  (ImageNet mean/std, bilinear, rgb)
  tiny-nhwc-probs  NHWC [batch,32,32,3] -> probs [batch,3]
                   probs = softmax(mean_hw(x) @ W3 + b3)  (grayscale, nearest, scale 1/255)
  tiny-faulty      like `tiny` (scale 1/255) but ONNX Runtime fails at run time for any batch
                   that contains a 255 pixel: idx = int64(max(x)) grows the Reshape target of
                   the logits to [batch, 2 + idx], so max(x) == 1.0 gives an invalid Reshape
                   (on the CPU and the CUDA provider).  The whole batch fails.
  tiny-mismatch    tiny's graph with a model.toml whose [input] name ("pixels") is not the
                   graph's ("input"): the service must refuse to start with it.
  tiny-identity    NCHW [batch,3,12,16] -> pixels [batch,576]: returns its input flattened, as
                   "probabilities" over 576 labels p0..p575 (scale 1, so values are 8-bit levels).
                   End-to-end parity tests compare every served value with the Pillow reference:
                   unlike the averaging models, any spatial error shows.

Also writes tests/fixtures/graphs/tiny-v2.onnx: tiny's inputs and outputs with other head weights,
the "version 2" that hot-reload tests drop into a model repository.

Usage:  python models/make_tiny_models.py [--out tests/fixtures/models]
"""

from __future__ import annotations

import argparse
import hashlib
import os

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 8  # ONNX Runtime 1.26 / 1.31 refuse onnx 1.23's default IR 14
OPSET = 17
PRODUCER = "brainai-make-tiny-models"
SIZE = 32

W_TINY = np.array([[1.5, -1.0], [-0.5, 2.0], [0.8, 0.3]], dtype=np.float32)
B_TINY = np.array([0.1, -0.2], dtype=np.float32)
W_PROBS = np.array([[2.0, -1.0, 0.5], [-1.0, 1.5, 0.25], [0.5, 0.5, -2.0]], dtype=np.float32)
B_PROBS = np.array([0.3, -0.1, 0.2], dtype=np.float32)

W_TINY_V2 = np.array([[-1.0, 1.5], [2.0, -0.5], [0.3, 0.8]], dtype=np.float32)
B_TINY_V2 = np.array([-0.3, 0.4], dtype=np.float32)
ID_H, ID_W = 12, 16

IMAGENET = 'mean = [0.485, 0.456, 0.406]\nstd = [0.229, 0.224, 0.225]'
SCALE_255 = f"scale = {1 / 255!r}\noffset = 0.0"


def toml(*, description, clinically_trained, max_batch, name, layout, color, filt, scaling, out_name, kind, labels,
         height=SIZE, width=SIZE):
    labels_s = ", ".join(f'"{label}"' for label in labels)
    return f"""# Test fixture written by models/make_tiny_models.py; do not edit by hand.

[model]
description = "{description}"
clinically_trained = {str(clinically_trained).lower()}
max_batch_size = {max_batch}

[input]
name = "{name}"
layout = "{layout}"
height = {height}
width = {width}
color = "{color}"
resize_filter = "{filt}"
{scaling}

[output]
name = "{out_name}"
kind = "{kind}"
labels = [{labels_s}]
"""


def finish(graph: onnx.GraphProto, name: str, clinically_trained: bool) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name=PRODUCER, producer_version="1")
    model.ir_version = IR_VERSION
    helper.set_model_props(
        model, {"name": name, "weights": "fixed-test-weights", "clinically_trained": str(clinically_trained).lower()}
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def nchw_input() -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, SIZE, SIZE])


def tiny_nodes(out: str, w=W_TINY, b=B_TINY) -> tuple[list, list]:
    nodes = [
        helper.make_node("GlobalAveragePool", ["input"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["feat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["feat", "W", "b"], [out], name="head"),
    ]
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")]
    return nodes, inits


def build_tiny(w=W_TINY, b=B_TINY, name="tiny") -> onnx.ModelProto:
    nodes, inits = tiny_nodes("logits", w, b)
    graph = helper.make_graph(
        nodes, "tiny", [nchw_input()],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])], initializer=inits,
    )
    return finish(graph, name, False)


def build_tiny_v2() -> onnx.ModelProto:
    return build_tiny(W_TINY_V2, B_TINY_V2, "tiny-v2")


def build_identity() -> onnx.ModelProto:
    nodes = [helper.make_node("Flatten", ["input"], ["pixels"], name="flatten", axis=1)]
    graph = helper.make_graph(
        nodes, "tiny_identity",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, ID_H, ID_W])],
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 3 * ID_H * ID_W])],
    )
    return finish(graph, "tiny-identity", False)


def build_nhwc_probs() -> onnx.ModelProto:
    nodes = [
        helper.make_node("ReduceMean", ["input"], ["feat"], name="mean_hw", axes=[1, 2], keepdims=0),  # [batch,3]
        helper.make_node("Gemm", ["feat", "W", "b"], ["scores"], name="head"),
        helper.make_node("Softmax", ["scores"], ["probs"], name="softmax", axis=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny_nhwc_probs",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", SIZE, SIZE, 3])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 3])],
        initializer=[numpy_helper.from_array(W_PROBS, "W"), numpy_helper.from_array(B_PROBS, "b")],
    )
    return finish(graph, "tiny-nhwc-probs", True)


def build_faulty() -> onnx.ModelProto:
    # logits = Reshape(head, Shape(head) + [0, idx]) with idx = int64(max over the whole batch):
    # idx is 0 (identity reshape) while every value is < 1.0, and 1 as soon as one value of any
    # image in the batch reaches 1.0 (pixel 255), which asks for [batch, 3] from 2*batch values.
    # Reshape validates its shape on the host, so this fails on the CPU *and* the CUDA execution
    # provider (an out-of-bounds Gather would only fail on CPU: the CUDA kernel writes 0).
    nodes, inits = tiny_nodes("head")
    nodes += [
        helper.make_node("ReduceMax", ["input"], ["xmax"], name="poison_max", keepdims=0),  # scalar
        helper.make_node("Cast", ["xmax"], ["idx"], name="poison_index", to=TensorProto.INT64),
        helper.make_node("Shape", ["head"], ["head_shape"], name="head_shape"),
        helper.make_node("Mul", ["idx", "last_axis"], ["grow"], name="poison_grow"),
        helper.make_node("Add", ["head_shape", "grow"], ["target_shape"], name="poison_shape"),
        helper.make_node("Reshape", ["head", "target_shape"], ["logits"], name="poison_reshape"),
    ]
    inits.append(numpy_helper.from_array(np.array([0, 1], dtype=np.int64), "last_axis"))
    graph = helper.make_graph(
        nodes, "tiny_faulty", [nchw_input()],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])], initializer=inits,
    )
    return finish(graph, "tiny-faulty", False)


MODELS = {
    "tiny": (
        build_tiny,
        dict(description="Tiny test model: global average pool + fixed 3x2 linear head. Not a real classifier.",
             clinically_trained=False, max_batch=64, name="input", layout="NCHW", color="rgb", filt="bilinear",
             scaling=IMAGENET, out_name="logits", kind="logits", labels=["no_tumor", "tumor"]),
    ),
    "tiny-nhwc-probs": (
        build_nhwc_probs,
        dict(description="Tiny NHWC test model that outputs softmax probabilities over three labels.",
             clinically_trained=True, max_batch=8, name="input", layout="NHWC", color="grayscale", filt="nearest",
             scaling=SCALE_255, out_name="probs", kind="probabilities", labels=["a", "b", "c"]),
    ),
    "tiny-faulty": (
        build_faulty,
        dict(description="Tiny test model that fails in ONNX Runtime (invalid Reshape) for any batch containing an image with a pixel value 255; other images work.",
             clinically_trained=False, max_batch=8, name="input", layout="NCHW", color="rgb", filt="bilinear",
             scaling=SCALE_255, out_name="logits", kind="logits", labels=["no_tumor", "tumor"]),
    ),
    "tiny-mismatch": (
        build_tiny,
        dict(description="Deliberately broken: model.toml says the input is named pixels, the graph calls it input. The service must refuse to start.",
             clinically_trained=False, max_batch=64, name="pixels", layout="NCHW", color="rgb", filt="bilinear",
             scaling=IMAGENET, out_name="logits", kind="logits", labels=["no_tumor", "tumor"]),
    ),
    "tiny-identity": (
        build_identity,
        dict(description="Test model that returns its input tensor flattened, for element-by-element parity checks.",
             clinically_trained=False, max_batch=8, name="input", layout="NCHW", color="rgb", filt="bilinear",
             scaling="scale = 1.0\noffset = 0.0", out_name="pixels", kind="probabilities",
             labels=[f"p{i}" for i in range(3 * ID_H * ID_W)], height=ID_H, width=ID_W),
    ),
}

# Graphs that are not models of their own: the tests copy them into temporary repositories.
GRAPHS = {"tiny-v2": build_tiny_v2}


def write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def session(path: str) -> ort.InferenceSession:
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"])


def verify(root: str) -> None:
    rng = np.random.default_rng(0)
    # tiny: compare with the numpy reference
    s = session(f"{root}/tiny/1/model.onnx")
    x = rng.standard_normal((4, 3, SIZE, SIZE), dtype=np.float32)
    got = s.run(["logits"], {"input": x})[0]
    np.testing.assert_allclose(got, x.mean(axis=(2, 3)) @ W_TINY + B_TINY, rtol=1e-5, atol=1e-5)
    print(f"tiny: ok, logits(zeros) = {s.run(None, {'input': np.zeros((1, 3, SIZE, SIZE), np.float32)})[0][0]}")

    # tiny-nhwc-probs
    s = session(f"{root}/tiny-nhwc-probs/1/model.onnx")
    x = rng.random((3, SIZE, SIZE, 3), dtype=np.float32)
    z = x.mean(axis=(1, 2)) @ W_PROBS + B_PROBS
    ref = np.exp(z - z.max(1, keepdims=True))
    ref /= ref.sum(1, keepdims=True)
    got = s.run(["probs"], {"input": x})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    print(f"tiny-nhwc-probs: ok, probs(zeros) = {s.run(None, {'input': np.zeros((1, SIZE, SIZE, 3), np.float32)})[0][0]}")

    # tiny-faulty: works for darker inputs, fails at run time as soon as one value is 1.0
    # (also checked on the CUDA provider when this onnxruntime build has it)
    for provider in [p for p in ("CPUExecutionProvider", "CUDAExecutionProvider") if p in ort.get_available_providers()]:
        s = ort.InferenceSession(f"{root}/tiny-faulty/1/model.onnx", providers=[provider])
        assert s.get_providers()[0] == provider, s.get_providers()
        for n in (1, 2, 4, 8):
            out = s.run(["logits"], {"input": np.zeros((n, 3, SIZE, SIZE), np.float32)})[0]
            assert out.shape == (n, 2) and np.allclose(out, B_TINY), out
        dark = np.full((2, 3, SIZE, SIZE), np.float32(254 / 255))
        np.testing.assert_allclose(s.run(None, {"input": dark})[0], dark.mean(axis=(2, 3)) @ W_TINY + B_TINY, rtol=1e-5)
        for n, poison in ((1, [0]), (4, [2])):
            x = np.zeros((n, 3, SIZE, SIZE), np.float32)
            x[poison, 1, 5, 7] = 1.0  # a single 255 pixel
            try:
                s.run(["logits"], {"input": x})
            except Exception as e:  # onnxruntime raises here (INVALID_ARGUMENT / Fail)
                print(f"tiny-faulty [{provider}]: batch {n} with poison image {poison} fails as intended: {type(e).__name__}: {e}")
            else:
                raise SystemExit(f"tiny-faulty [{provider}]: poison input did not fail")
        print(f"tiny-faulty [{provider}]: ok, zeros work for batch 1, 2, 4, 8; 254/255 works")

    # tiny-mismatch: the graph's input is "input", the toml says "pixels"
    s = session(f"{root}/tiny-mismatch/1/model.onnx")
    assert [i.name for i in s.get_inputs()] == ["input"]
    print("tiny-mismatch: ok, graph input is 'input' while model.toml says 'pixels'")

    # tiny-identity: output == input, flattened
    s = session(f"{root}/tiny-identity/1/model.onnx")
    x = rng.random((2, 3, ID_H, ID_W), dtype=np.float32)
    np.testing.assert_array_equal(s.run(["pixels"], {"input": x})[0], x.reshape(2, -1))
    print("tiny-identity: ok, returns its input")

    # tiny-v2: tiny's interface, other weights
    graphs = os.path.join(os.path.dirname(os.path.abspath(root)), "graphs")
    s = session(f"{graphs}/tiny-v2.onnx")
    x = rng.standard_normal((2, 3, SIZE, SIZE), dtype=np.float32)
    np.testing.assert_allclose(s.run(["logits"], {"input": x})[0], x.mean(axis=(2, 3)) @ W_TINY_V2 + B_TINY_V2,
                               rtol=1e-5, atol=1e-5)
    print("graphs/tiny-v2: ok")


def main() -> None:
    ap = argparse.ArgumentParser(description="Write the tiny test models.")
    ap.add_argument("--out", default="tests/fixtures/models")
    args = ap.parse_args()
    for name, (builder, cfg) in MODELS.items():
        data = builder().SerializeToString(deterministic=True)
        onnx_path = os.path.join(args.out, name, "1", "model.onnx")
        write(onnx_path, data)
        write(os.path.join(args.out, name, "model.toml"), toml(**cfg).encode())
        print(f"wrote {onnx_path} ({len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()[:16]}…)")
    graphs = os.path.join(os.path.dirname(os.path.abspath(args.out)), "graphs")
    for name, builder in GRAPHS.items():
        data = builder().SerializeToString(deterministic=True)
        path = os.path.join(graphs, f"{name}.onnx")
        write(path, data)
        print(f"wrote {path} ({len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()[:16]}…)")
    verify(args.out)


if __name__ == "__main__":
    main()
