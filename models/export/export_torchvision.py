#!/usr/bin/env python3
"""Export a trained torchvision ResNet / fastai learner to the BrainAI Serve model repository.

Writes <repo>/<name>/<version>/model.onnx (one self-contained file) and <repo>/<name>/model.toml,
then checks with ONNX Runtime that the ONNX output equals the PyTorch output and prints the
model's SHA-256 (the service reports the same digest).

The exported graph: input "input" float32 [batch, 3, H, W] (NCHW, dynamic batch axis "batch"),
output "logits" float32 [batch, num_labels], ONNX opset 17, IR version 8 (ONNX Runtime 1.26 and
1.31 both load it; onnx >= 1.23 / torch would otherwise write a newer IR version).

Sources (exactly one):
  --torchvision-weights W.pth   a state_dict (or {"state_dict": ...} / {"model": ...}) for
                                torchvision.models.<--arch>(num_classes=len(labels))
  --fastai-pkl learner.pkl      a fastai Learner saved with learn.export(); needs fastai
                                importable; labels default to learn.dls.vocab and mean/std to
                                the learner's Normalize transform
  --untrained                   randomly initialised torchvision.models.<--arch>; only to test
                                this pipeline (the model.toml then says so)

Examples:
  python models/export/export_torchvision.py --fastai-pkl export.pkl --version 2 --clinically-trained
  python models/export/export_torchvision.py --torchvision-weights resnet50_brain.pth \\
      --labels no_tumor tumor --version 2 --resize-filter bilinear
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile

import numpy as np

IR_VERSION = 8
OPSET = 17
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--torchvision-weights", metavar="PTH", help="state_dict of a torchvision model (see --arch)")
    src.add_argument("--fastai-pkl", metavar="PKL", help="fastai Learner exported with learn.export()")
    src.add_argument("--untrained", action="store_true", help="random weights (pipeline test only)")
    ap.add_argument("--arch", default="resnet50", help="torchvision.models architecture (default resnet50)")
    ap.add_argument("--labels", nargs="+", help="class labels in output order (default for fastai: dls.vocab; else no_tumor tumor)")
    ap.add_argument("--repo", default="models", help="model repository directory (default models)")
    ap.add_argument("--name", default="brain-tumor-resnet50", help="model name = directory under --repo")
    ap.add_argument("--version", type=int, required=True, help="version directory (positive integer)")
    ap.add_argument("--height", type=int, default=256)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--mean", type=float, nargs=3, help="per-channel mean of pixel/255 (default ImageNet, or the fastai learner's)")
    ap.add_argument("--std", type=float, nargs=3, help="per-channel std (default ImageNet, or the fastai learner's)")
    ap.add_argument("--color", choices=["rgb", "grayscale"], default="rgb")
    ap.add_argument("--resize-filter", choices=["nearest", "bilinear", "bicubic", "lanczos3"], default="bilinear",
                    help="the filter used in training (Pillow semantics); default bilinear")
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--clinically-trained", action="store_true",
                    help="mark the model as clinically trained/validated (otherwise every response carries a warning)")
    ap.add_argument("--description", help="model.toml description")
    ap.add_argument("--force", action="store_true", help="overwrite an existing <version>/model.onnx")
    ap.add_argument("--exporter", choices=["auto", "torchscript", "dynamo"], default="auto",
                    help="torch.onnx exporter: auto (TorchScript, else dynamo; default), torchscript, dynamo")
    ap.add_argument("--atol", type=float, default=1e-4, help="ONNX Runtime vs PyTorch tolerance (default 1e-4)")
    args = ap.parse_args()
    if args.version < 1:
        ap.error("--version must be a positive integer")
    if args.untrained and args.clinically_trained:
        ap.error("--untrained and --clinically-trained contradict each other")
    return args


def load_fastai(path: str):
    try:
        from fastai.learner import load_learner
    except ImportError as e:
        sys.exit(f"--fastai-pkl needs fastai, which is not importable here ({e}); `pip install fastai` in the export venv")
    learn = load_learner(path, cpu=True)
    labels = [str(v) for v in learn.dls.vocab] if hasattr(learn.dls, "vocab") else None
    mean = std = None
    for tfm in getattr(learn.dls, "after_batch", []) or []:
        if type(tfm).__name__ == "Normalize" and getattr(tfm, "mean", None) is not None:
            # stored as float32: keep the shortest float32 repr (0.485, not 0.48500001430511475)
            mean = [float(str(np.float32(v))) for v in np.asarray(tfm.mean.cpu()).ravel()]
            std = [float(str(np.float32(v))) for v in np.asarray(tfm.std.cpu()).ravel()]
    return learn.model, labels, mean, std


def load_torchvision(arch: str, num_classes: int, weights: str | None):
    import torch
    import torchvision

    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    if weights is not None:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(state, dict) and key in state and isinstance(state[key], dict):
                state = state[key]
        state = {k.removeprefix("module."): v for k, v in state.items()}
        model.load_state_dict(state, strict=True)
    return model


def export(model, example, path: str, max_batch: int, exporter: str) -> str:
    """Exports to `path`; returns the exporter used.

    "torchscript" (torch.onnx.export(dynamo=False)) writes opset 17 / IR 8 natively.  "dynamo"
    (the torch.export-based exporter, torch >= 2.9's default) writes opset 18; `restamp` lowers
    it to 17.  "auto" tries TorchScript first and falls back to dynamo (e.g. once a torch release
    drops the TorchScript exporter).
    """
    import torch

    names = dict(input_names=["input"], output_names=["logits"])
    if exporter in ("auto", "torchscript"):
        try:
            torch.onnx.export(model, (example,), path, dynamo=False, opset_version=OPSET, do_constant_folding=True,
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, **names)
            return "torchscript"
        except Exception as e:
            if exporter == "torchscript":
                raise
            print(f"TorchScript exporter failed ({type(e).__name__}: {e}); using the dynamo exporter", file=sys.stderr)
    batch = torch.export.Dim("batch", min=1, max=max(max_batch, 2) * 16)
    torch.onnx.export(model, (example,), path, dynamo=True, external_data=False, opset_version=18,
                      dynamic_shapes=({0: batch},), **names)
    return "dynamo"


REDUCE_OPS = {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
              "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"}


def lower_opset_18_to_17(m) -> None:
    """Opset 18 -> 17 for what CNN exports contain: Reduce* ops take `axes` as an input in 18 but
    as an attribute in 17 (onnx's version converter leaves `noop_with_empty_axes` behind and the
    result fails the checker).  Anything else that is not valid opset 17 fails check_model below,
    and a semantic slip fails the ONNX Runtime vs PyTorch comparison."""
    from onnx import helper, numpy_helper

    consts = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    for n in m.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    for n in m.graph.node:
        if n.op_type not in REDUCE_OPS:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        noop = attrs.pop("noop_with_empty_axes", 0)
        if len(n.input) >= 2 and n.input[1]:
            if n.input[1] not in consts:
                sys.exit(f"cannot lower {n.op_type} {n.name!r} to opset {OPSET}: its axes are not constant")
            attrs["axes"] = [int(v) for v in np.asarray(consts[n.input[1]]).ravel()]
            del n.input[1:]
        elif noop:
            sys.exit(f"cannot lower {n.op_type} {n.name!r}: noop_with_empty_axes=1 has no opset-17 equivalent")
        del n.attribute[:]
        n.attribute.extend(helper.make_attribute(k, v) for k, v in attrs.items())
    used = {i for n in m.graph.node for i in n.input}
    keep = [t for t in m.graph.initializer if t.name in used]  # the axes tensors are now unused
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    for o in m.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = OPSET


def restamp(path: str, out: str, props: dict[str, str]) -> None:
    import onnx

    m = onnx.load(path)  # also pulls in external data, if the exporter wrote any
    version = max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
    if version == 18:
        lower_opset_18_to_17(m)
    elif version != OPSET:
        sys.exit(f"the exporter wrote opset {version}; expected {OPSET} (or 18, which is lowered)")
    if m.functions or any(o.domain not in ("", "ai.onnx") for o in m.opset_import):
        sys.exit("the export uses ONNX functions or custom domains; BrainAI Serve expects plain opset-17 graphs")
    m.ir_version = IR_VERSION
    # IR >= 10 allows metadata_props on graphs, nodes and value infos (the dynamo exporter fills
    # them); IR 8 does not have them, so drop them.
    for holder in [m.graph, *m.graph.node, *m.graph.input, *m.graph.output, *m.graph.value_info]:
        if "metadata_props" in holder.DESCRIPTOR.fields_by_name:
            del holder.metadata_props[:]
    for v in list(m.graph.input) + list(m.graph.output):
        d0 = v.type.tensor_type.shape.dim[0]
        d0.Clear()
        d0.dim_param = "batch"
    existing = {p.key: p.value for p in m.metadata_props}
    existing.update(props)
    del m.metadata_props[:]
    for k, v in existing.items():
        m.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, out, save_as_external_data=False)


def write_toml(path: str, a: argparse.Namespace, labels: list[str], mean, std, description: str) -> None:
    q = json.dumps  # a JSON string is a valid TOML basic string
    text = f"""# Written by models/export/export_torchvision.py. See models/README.md for every field.

[model]
description = {q(description)}
clinically_trained = {str(a.clinically_trained).lower()}
max_batch_size = {a.max_batch_size}

[input]
name = "input"
layout = "NCHW"
height = {a.height}
width = {a.width}
color = {q(a.color)}
resize_filter = {q(a.resize_filter)}
mean = [{", ".join(repr(float(v)) for v in mean)}]
std = [{", ".join(repr(float(v)) for v in std)}]

[output]
name = "logits"
kind = "logits"
labels = [{", ".join(q(v) for v in labels)}]
"""
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main() -> None:
    a = parse_args()
    import onnxruntime as ort
    import torch

    torch.manual_seed(0)
    fa_labels = fa_mean = fa_std = None
    if a.fastai_pkl:
        model, fa_labels, fa_mean, fa_std = load_fastai(a.fastai_pkl)
        source = f"fastai:{os.path.basename(a.fastai_pkl)}:sha256={sha256_file(a.fastai_pkl)}"
    labels = a.labels or fa_labels or ["no_tumor", "tumor"]
    if len(labels) < 2:
        sys.exit("need at least two labels")
    if not a.fastai_pkl:
        model = load_torchvision(a.arch, len(labels), a.torchvision_weights)
        source = (f"torchvision-{a.arch}:{os.path.basename(a.torchvision_weights)}:sha256={sha256_file(a.torchvision_weights)}"
                  if a.torchvision_weights else f"torchvision-{a.arch}:untrained-random-init")
    mean = a.mean or fa_mean or IMAGENET_MEAN
    std = a.std or fa_std or IMAGENET_STD
    model = model.float().eval().cpu()

    vdir = os.path.join(a.repo, a.name, str(a.version))
    out = os.path.join(vdir, "model.onnx")
    if os.path.exists(out) and not a.force:
        sys.exit(f"{out} exists; pass --force to overwrite")
    os.makedirs(vdir, exist_ok=True)

    example = torch.randn(2, 3, a.height, a.width)
    with torch.no_grad():
        probe = model(example)
    if probe.ndim != 2 or probe.shape[1] != len(labels):
        sys.exit(f"model output has shape {tuple(probe.shape)}, expected [batch, {len(labels)}] for labels {labels}")

    props = {
        "name": a.name,
        "weights": source,
        "clinically_trained": str(a.clinically_trained).lower(),
        "labels": ",".join(labels),
        "exporter": f"brainai export_torchvision.py (torch {torch.__version__})",
    }
    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "raw.onnx")
        used = export(model, example, raw, a.max_batch_size, a.exporter)
        props["exporter"] += f" {used} exporter"
        restamp(raw, out + ".tmp", props)
    os.replace(out + ".tmp", out)

    description = a.description or (
        f"{a.arch if not a.fastai_pkl else 'fastai'} brain-MRI tumour classifier exported from {source}"
        + ("; UNTRAINED random weights (pipeline test only)" if a.untrained else "")
    )
    toml_path = os.path.join(a.repo, a.name, "model.toml")
    write_toml(toml_path, a, labels, mean, std, description)

    # Verify: ONNX Runtime output == PyTorch output on a random batch, plus batch 1.
    sess = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for n in (5, 1):
        x = rng.standard_normal((n, 3, a.height, a.width), dtype=np.float32)
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        got = sess.run(["logits"], {"input": x})[0]
        err = float(np.max(np.abs(got - ref)))
        print(f"batch {n}: max |onnxruntime - torch| = {err:.2e}")
        if not np.allclose(got, ref, rtol=0.0, atol=a.atol):
            sys.exit(f"verification FAILED: max abs difference {err:.3e} > atol {a.atol}")
    import onnx

    m = onnx.load(out, load_external_data=False)
    print(f"wrote {out} (ir_version {m.ir_version}, opset {[(o.domain, o.version) for o in m.opset_import]}, "
          f"onnxruntime {ort.__version__} verified) and {toml_path}")
    print(f"labels {labels}, mean {mean}, std {std}, clinically_trained {a.clinically_trained}")
    print(f"sha256 {sha256_file(out)}  {out}")


if __name__ == "__main__":
    main()
