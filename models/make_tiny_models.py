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

Segmentation fixtures (issue 23; [model] task = "segmentation", model.toml's `channels`): one
gray image per MR sequence, stacked in `channels` order; 16x16; scale = 1.0, offset = 0.0, so the
inputs are the 8-bit levels 0..255 and every logit is an exact integer in float32.  The label
map is known in closed form, per pixel (x_c = level of channel c, c in FLAIR, T1c, T2 order):

      z_k = sum_c W_SEG[k][c] * x_c + B_SEG[k],    label = argmax_k z_k  (ties: lowest k)

                    x_FLAIR  x_T1c  x_T2    bias
      background       0       0     0       48     dark everywhere -> background
      non_enh_core     0      -1     2        0     bright T2, dark T1c
      edema            2      -1     1     -100     bright FLAIR (+T2), not T1c
      enhancing        0       3     0     -216     bright T1c

  With the same level v in every channel the classes are bands: v <= 48 background,
  49..100 non_enhancing_core, 101..116 edema, 117..255 enhancing (thresholds fitted to the
  synthetic slices of tests/data: each of them replicated into the three channels, or any three
  different ones, gives all four classes at 16x16, with bilinear or nearest input resizing).
  Labels background / non_enhancing_core / edema / enhancing, the BraTS regions whole_tumor
  (1,2,3), tumor_core (1,3), enhancing_tumor (3), colors, max batch 8, not clinically trained,
  dynamic batch axis "batch".

  seg-threshold    NCHW input [batch,3,16,16], channels FLAIR, T1c, T2 -> logits [batch,4,16,16]
                   (NCHW): one 1x1 Conv with W_SEG, B_SEG.  bilinear input resize, nearest mask
                   resize, [input.dicom] window minmax, modality MR.
  seg-nhwc         NHWC input [batch,16,16,3], channels T2, FLAIR, T1c (another order: the weights
                   are W_SEG's columns permuted, W_NHWC = W_SEG[:, [2, 0, 1]], so the same three
                   16x16 images give seg-threshold's label map) -> probs [batch,16,16,4] (NHWC)
                   = Softmax_last_axis(z / 8) (MatMul + Add, Mul by 0.125: exact); kind
                   probabilities, nearest input resize, bilinear mask resize.  argmax(probs) =
                   argmax(z) (equal z give equal probabilities).
  seg-multi        three inputs flair, t1c, t2, each [batch,1,16,16] (`tensors`), concatenated
                   on axis 1, then seg-threshold's Conv -> logits NCHW [batch,4,16,16].
  seg-flair-only   one channel FLAIR, NCHW [batch,1,16,16] -> logits [batch,2,16,16]:
                   z_background = 0, z_tumor = x - 127 (tumor iff x >= 128); labels background /
                   tumor, no colors, no regions.

Multi-modal classifier fixture (issue 23, a classifier with `channels`):

  multi-classify   NCHW input [batch,3,16,16], channels T2, FLAIR, T1c (not the canonical order,
                   so a channel put in the wrong place shows) -> logits [batch,3] = each channel's
                   mean (GlobalAveragePool + Flatten); scale = 0.0625, offset 0, so logit c is the
                   mean 8-bit level of channel c / 16 and the probabilities are their softmax.
                   Labels t2_brightest, flair_brightest, t1c_brightest; not clinically trained.

Study fixture (issue 24, a DICOM study segmented end to end):

  seg-study        NCHW input [batch,3,64,64], channels FLAIR, T1c, T2 -> logits [batch,2,64,64]:
                   z_background = 0, z_tumor = x_T2 - 127 (tumor iff the T2 level is above 127;
                   FLAIR and T1c weigh 0, so a mask shows where the T2 series was sampled after
                   alignment).  [input.dicom] window { center = 500, width = 1000 }, modality MR;
                   labels background / tumor, region whole_tumor, SNOMED CT codes for the SEG.

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

# Segmentation fixtures (see the docstring): integer weights, channels in FLAIR, T1c, T2 order.
SEG_SIZE = 16
SEG_LABELS = ["background", "non_enhancing_core", "edema", "enhancing"]
SEG_COLORS = ["#000000", "#1f77b4", "#2ca02c", "#d62728"]
SEG_REGIONS = {
    "whole_tumor": ["non_enhancing_core", "edema", "enhancing"],
    "tumor_core": ["non_enhancing_core", "enhancing"],
    "enhancing_tumor": ["enhancing"],
}
W_SEG = np.array([[0, 0, 0], [0, -1, 2], [2, -1, 1], [0, 3, 0]], dtype=np.float32)  # [class, channel]
B_SEG = np.array([48, 0, -100, -216], dtype=np.float32)
NHWC_ORDER = [2, 0, 1]  # seg-nhwc's channels T2, FLAIR, T1c as indices into FLAIR, T1c, T2
W_NHWC = W_SEG[:, NHWC_ORDER]
NHWC_TEMPERATURE = 8.0  # probs = softmax(z / 8); a power of two, so z / 8 is exact
W_FLAIR = np.array([[0], [1]], dtype=np.float32)
B_FLAIR = np.array([0, -127], dtype=np.float32)

IMAGENET = 'mean = [0.485, 0.456, 0.406]\nstd = [0.229, 0.224, 0.225]'
SCALE_255 = f"scale = {1 / 255!r}\noffset = 0.0"


def toml_list(values) -> str:
    return "[" + ", ".join(f'"{v}"' for v in values) + "]"


def toml(*, description, clinically_trained, max_batch, name, layout, color, filt, scaling, out_name, kind, labels,
         height=SIZE, width=SIZE, task=None, channels=None, tensors=None, dicom=None, out_layout=None, colors=None,
         mask_resize=None, regions=None, codes=None):
    """model.toml text.  The keyword arguments after `labels` are the segmentation / multi-modal
    keys (models/README.md, "Segmentation and multi-modal models"); left at None they write
    nothing, so the classification fixtures keep their bytes.  With `channels`, `color` is
    omitted; with `tensors` (one ONNX input per channel), `name` is."""
    task_s = f'task = "{task}"\n' if task else ""
    name_s = f"tensors = {toml_list(tensors)}" if tensors else f'name = "{name}"'
    color_s = f"channels = {toml_list(channels)}" if channels else f'color = "{color}"'
    dicom_s = "".join(f"{k} = {v}\n" for k, v in dicom.items()) if dicom else ""
    dicom_s = f"\n[input.dicom]\n{dicom_s}" if dicom else ""
    out_s = f'layout = "{out_layout}"\n' if out_layout else ""
    out_s += f"labels = {toml_list(labels)}\n"
    out_s += f"colors = {toml_list(colors)}\n" if colors else ""
    out_s += f'mask_resize = "{mask_resize}"\n' if mask_resize else ""
    if regions:
        out_s += "\n[output.regions]\n" + "".join(f"{k} = {toml_list(v)}\n" for k, v in regions.items())
    for name_, (category, kind_) in (codes or {}).items():
        out_s += f"\n[output.codes.{name_}]\ncategory = {toml_list(category)}\ntype = {toml_list(kind_)}\n"
    return f"""# Test fixture written by models/make_tiny_models.py; do not edit by hand.

[model]
{task_s}description = "{description}"
clinically_trained = {str(clinically_trained).lower()}
max_batch_size = {max_batch}

[input]
{name_s}
layout = "{layout}"
height = {height}
width = {width}
{color_s}
resize_filter = "{filt}"
{scaling}
{dicom_s}
[output]
name = "{out_name}"
kind = "{kind}"
{out_s}"""


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


def seg_value(name: str, channels: int, layout: str = "NCHW") -> onnx.ValueInfoProto:
    shape = ["batch", channels, SEG_SIZE, SEG_SIZE] if layout == "NCHW" else ["batch", SEG_SIZE, SEG_SIZE, channels]
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def conv1x1(x: str, out: str, w: np.ndarray, b: np.ndarray) -> tuple[list, list]:
    """Per-pixel linear map on the channel axis of an NCHW tensor: a 1x1 Conv."""
    nodes = [helper.make_node("Conv", [x, "W", "b"], [out], name="classify", kernel_shape=[1, 1])]
    inits = [numpy_helper.from_array(w.reshape(*w.shape, 1, 1), "W"), numpy_helper.from_array(b, "b")]
    return nodes, inits


def build_seg_threshold() -> onnx.ModelProto:
    nodes, inits = conv1x1("input", "logits", W_SEG, B_SEG)
    graph = helper.make_graph(nodes, "seg_threshold", [seg_value("input", 3)], [seg_value("logits", 4)],
                              initializer=inits)
    return finish(graph, "seg-threshold", False)


def build_seg_nhwc() -> onnx.ModelProto:
    nodes = [
        helper.make_node("MatMul", ["input", "Wt"], ["xw"], name="classify"),  # [batch,16,16,4]
        helper.make_node("Add", ["xw", "b"], ["z"], name="bias"),
        helper.make_node("Mul", ["z", "inv_t"], ["z_t"], name="temperature"),
        helper.make_node("Softmax", ["z_t"], ["probs"], name="softmax", axis=-1),
    ]
    inits = [
        numpy_helper.from_array(np.ascontiguousarray(W_NHWC.T), "Wt"),
        numpy_helper.from_array(B_SEG, "b"),
        numpy_helper.from_array(np.array(1 / NHWC_TEMPERATURE, dtype=np.float32), "inv_t"),
    ]
    graph = helper.make_graph(nodes, "seg_nhwc", [seg_value("input", 3, "NHWC")], [seg_value("probs", 4, "NHWC")],
                              initializer=inits)
    return finish(graph, "seg-nhwc", False)


def build_seg_multi() -> onnx.ModelProto:
    nodes, inits = conv1x1("stacked", "logits", W_SEG, B_SEG)
    nodes.insert(0, helper.make_node("Concat", ["flair", "t1c", "t2"], ["stacked"], name="stack", axis=1))
    graph = helper.make_graph(nodes, "seg_multi", [seg_value(n, 1) for n in ("flair", "t1c", "t2")],
                              [seg_value("logits", 4)], initializer=inits)
    return finish(graph, "seg-multi", False)


def build_seg_flair_only() -> onnx.ModelProto:
    nodes, inits = conv1x1("input", "logits", W_FLAIR, B_FLAIR)
    graph = helper.make_graph(nodes, "seg_flair_only", [seg_value("input", 1)], [seg_value("logits", 2)],
                              initializer=inits)
    return finish(graph, "seg-flair-only", False)


STUDY_SIZE = 64
W_STUDY = np.array([[0, 0, 0], [0, 0, 1]], dtype=np.float32)
B_STUDY = np.array([0, -127], dtype=np.float32)


def build_seg_study() -> onnx.ModelProto:
    nodes, inits = conv1x1("input", "logits", W_STUDY, B_STUDY)
    value = lambda name, c: helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", c, STUDY_SIZE, STUDY_SIZE])
    graph = helper.make_graph(nodes, "seg_study", [value("input", 3)], [value("logits", 2)], initializer=inits)
    return finish(graph, "seg-study", False)


def build_multi_classify() -> onnx.ModelProto:
    nodes = [
        helper.make_node("GlobalAveragePool", ["input"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["logits"], name="flatten", axis=1),
    ]
    graph = helper.make_graph(nodes, "multi_classify", [seg_value("input", 3)],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])])
    return finish(graph, "multi-classify", False)


def seg_closed_form(x: np.ndarray, w: np.ndarray = W_SEG, b: np.ndarray = B_SEG) -> np.ndarray:
    """z = W x + b per pixel in float64 (exact for 8-bit integer levels): x [N,C,H,W] -> [N,K,H,W]."""
    return np.einsum("kc,nchw->nkhw", w.astype(np.float64), x.astype(np.float64)) + b.astype(np.float64)[None, :, None, None]


SEG = dict(clinically_trained=False, max_batch=8, color=None, scaling="scale = 1.0\noffset = 0.0", labels=SEG_LABELS,
           height=SEG_SIZE, width=SEG_SIZE, task="segmentation", colors=SEG_COLORS, regions=SEG_REGIONS)

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
    "seg-threshold": (
        build_seg_threshold,
        dict(SEG, description="Segmentation test model: a 1x1 Conv with small integer weights on FLAIR, T1c, T2 (label map in closed form, see models/make_tiny_models.py). Not a real segmenter.",
             name="input", layout="NCHW", filt="bilinear", channels=["FLAIR", "T1c", "T2"],
             dicom={"window": '"minmax"', "modality": '["MR"]'}, out_name="logits", kind="logits", out_layout="NCHW",
             mask_resize="nearest"),
    ),
    "seg-nhwc": (
        build_seg_nhwc,
        dict(SEG, description="Segmentation test model, NHWC, channels T2, FLAIR, T1c: softmax(z / 8) of seg-threshold's integer map (closed form, see models/make_tiny_models.py).",
             name="input", layout="NHWC", filt="nearest", channels=["T2", "FLAIR", "T1c"], out_name="probs",
             kind="probabilities", out_layout="NHWC", mask_resize="bilinear"),
    ),
    "seg-multi": (
        build_seg_multi,
        dict(SEG, description="Segmentation test model with one ONNX input per sequence (flair, t1c, t2), concatenated, then seg-threshold's 1x1 Conv.",
             name=None, tensors=["flair", "t1c", "t2"], layout="NCHW", filt="bilinear",
             channels=["FLAIR", "T1c", "T2"], out_name="logits", kind="logits", out_layout="NCHW",
             mask_resize="nearest"),
    ),
    "seg-flair-only": (
        build_seg_flair_only,
        dict(SEG, description="Segmentation test model on FLAIR alone: tumor where the level is >= 128 (logit x - 127 against 0).",
             name="input", layout="NCHW", filt="bilinear", channels=["FLAIR"], out_name="logits", kind="logits",
             out_layout="NCHW", mask_resize="nearest", labels=["background", "tumor"], colors=None, regions=None),
    ),
    "seg-study": (
        build_seg_study,
        dict(SEG, description="Study test model: tumor where the T2 level is above 127 (FLAIR and T1c weigh 0), 64x64; see models/make_tiny_models.py.",
             name="input", layout="NCHW", filt="bilinear", channels=["FLAIR", "T1c", "T2"],
             dicom={"window": "{ center = 500, width = 1000 }", "modality": '["MR"]'}, out_name="logits",
             kind="logits", out_layout="NCHW", mask_resize="nearest", labels=["background", "tumor"],
             colors=["#000000", "#d62728"], regions={"whole_tumor": ["tumor"]}, height=STUDY_SIZE, width=STUDY_SIZE,
             codes={"tumor": (["49755003", "SCT", "Morphologically Altered Structure"], ["108369006", "SCT", "Neoplasm"]),
                    "whole_tumor": (["49755003", "SCT", "Morphologically Altered Structure"], ["108369006", "SCT", "Neoplasm"])}),
    ),
    "multi-classify": (
        build_multi_classify,
        dict(description="Multi-modal classifier test model: each channel's mean level / 16 as its logit (channels T2, FLAIR, T1c; closed form, see models/make_tiny_models.py).",
             clinically_trained=False, max_batch=8, name="input", layout="NCHW", color=None, filt="bilinear",
             scaling="scale = 0.0625\noffset = 0.0", out_name="logits", kind="logits",
             labels=["t2_brightest", "flair_brightest", "t1c_brightest"], height=SEG_SIZE, width=SEG_SIZE,
             channels=["T2", "FLAIR", "T1c"]),
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

    verify_segmentation(root, rng)

    # tiny-v2: tiny's interface, other weights
    graphs = os.path.join(os.path.dirname(os.path.abspath(root)), "graphs")
    s = session(f"{graphs}/tiny-v2.onnx")
    x = rng.standard_normal((2, 3, SIZE, SIZE), dtype=np.float32)
    np.testing.assert_allclose(s.run(["logits"], {"input": x})[0], x.mean(axis=(2, 3)) @ W_TINY_V2 + B_TINY_V2,
                               rtol=1e-5, atol=1e-5)
    print("graphs/tiny-v2: ok")


def seg_inputs(rng: np.random.Generator, n: int) -> np.ndarray:
    """[n,3,16,16] 8-bit levels (FLAIR, T1c, T2): uniform noise, equal channels (the bands) and
    every (a, b, c) of a grid of step 8, so ties of the integer logits occur often."""
    x = rng.integers(0, 256, (n, 3, SEG_SIZE, SEG_SIZE)).astype(np.float32)
    x[0] = np.arange(256, dtype=np.float32).reshape(1, SEG_SIZE, SEG_SIZE)  # equal channels, 0..255
    grid = np.stack(np.meshgrid(*[np.arange(0, 256, 8)] * 3, indexing="ij"), axis=0).reshape(3, -1)
    grid = np.pad(grid, ((0, 0), (0, -grid.shape[1] % (SEG_SIZE * SEG_SIZE)))).astype(np.float32)
    grid = grid.reshape(3, -1, SEG_SIZE, SEG_SIZE).transpose(1, 0, 2, 3)
    x[1:1 + len(grid)] = grid[: n - 1]
    return x


def verify_segmentation(root: str, rng: np.random.Generator) -> None:
    x = seg_inputs(rng, 136)  # 1 + 128 grid + 7 noise images; > max batch 8: the graphs take any batch
    z = seg_closed_form(x)
    want = z.argmax(axis=1)  # ties: lowest class, as numpy's argmax
    bands = want[0].reshape(-1)
    assert bands.tolist() == [0] * 49 + [1] * 52 + [2] * 16 + [3] * 139, bands
    counts = np.bincount(want.reshape(-1), minlength=4)
    assert np.all(counts > 0), counts
    ties = int(np.sum(np.sort(z, axis=1)[:, -1] == np.sort(z, axis=1)[:, -2]))
    assert ties > 100, ties  # the tie rule is exercised

    s = session(f"{root}/seg-threshold/1/model.onnx")
    got = s.run(["logits"], {"input": x})[0]
    assert got.shape == (len(x), 4, SEG_SIZE, SEG_SIZE), got.shape
    np.testing.assert_array_equal(got, z.astype(np.float32))  # exact: integers
    np.testing.assert_array_equal(got.argmax(axis=1), want)
    print(f"seg-threshold: ok, exact integer logits; class counts {counts.tolist()}, {ties} tied pixels")

    s = session(f"{root}/seg-multi/1/model.onnx")
    got = s.run(["logits"], {"flair": x[:, 0:1], "t1c": x[:, 1:2], "t2": x[:, 2:3]})[0]
    np.testing.assert_array_equal(got, z.astype(np.float32))
    print("seg-multi: ok, equals seg-threshold")

    s = session(f"{root}/seg-nhwc/1/model.onnx")
    x_nhwc = np.ascontiguousarray(x[:, NHWC_ORDER].transpose(0, 2, 3, 1))  # T2, FLAIR, T1c, channels last
    got = s.run(["probs"], {"input": x_nhwc})[0]
    assert got.shape == (len(x), SEG_SIZE, SEG_SIZE, 4), got.shape
    zt = z.transpose(0, 2, 3, 1) / NHWC_TEMPERATURE
    ref = np.exp(zt - zt.max(axis=-1, keepdims=True))
    ref /= ref.sum(axis=-1, keepdims=True)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got.argmax(axis=-1), want)  # equal logits give equal probabilities
    print("seg-nhwc: ok, softmax(z / 8) and argmax equal seg-threshold's")

    s = session(f"{root}/seg-flair-only/1/model.onnx")
    f = x[:, 0:1]
    got = s.run(["logits"], {"input": f})[0]
    zf = seg_closed_form(f, W_FLAIR, B_FLAIR)
    np.testing.assert_array_equal(got, zf.astype(np.float32))
    np.testing.assert_array_equal(got.argmax(axis=1), (f[:, 0] >= 128).astype(np.int64))
    print("seg-flair-only: ok, tumor iff level >= 128")

    s = session(f"{root}/multi-classify/1/model.onnx")
    got = s.run(["logits"], {"input": x / 16})[0]
    np.testing.assert_allclose(got, x.mean(axis=(2, 3)) / 16, rtol=1e-6)
    print("multi-classify: ok, logits are the channel means / 16")


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
