#!/usr/bin/env python3
"""Export a trained 2D U-Net (plain PyTorch or MONAI) to the BrainAI Serve model repository.

Writes <repo>/<name>/<version>/model.onnx (one self-contained file) and <repo>/<name>/model.toml
(task = "segmentation": channels, labels, colors, regions, mean/std from the flags), then checks
with ONNX Runtime that the ONNX output equals the PyTorch output and prints the model's SHA-256
(the service reports the same digest).

The exported graph: input "input" float32 [batch, C, H, W] (NCHW, one channel per MR sequence of
--channels, stacked in that order; dynamic batch axis "batch"), output "logits" float32
[batch, num_labels, H, W] (NCHW), ONNX opset 17, IR version 8 (ONNX Runtime 1.26 and 1.31 both
load it).  H and W are fixed (--height, --width): the service resizes every slice to them.

Sources (exactly one):
  --state-dict W.pth     a state_dict (or {"state_dict": ...} / {"model": ...} / {"network": ...})
                         of the network --arch builds:
                           plain            UNet2D below: (Conv3x3 + BN + ReLU) x 2 per level,
                                            2x2 max-pool, 2x2/2 transposed conv, concat skip,
                                            1x1 head; --base, --levels (make_unet.py's layout)
                           monai-unet       monai.networks.nets.UNet(spatial_dims=2, ...)
                           monai-basicunet  monai.networks.nets.BasicUNet(spatial_dims=2, ...)
                         MONAI's constructor arguments beyond spatial_dims / in_channels /
                         out_channels come from --monai-kwargs (JSON), over the defaults below.
  --pickled-model M.pt   a whole nn.Module saved with torch.save(model) (its class importable)
  --random-init          the pipeline's test: randomly initialised networks (the plain U-Net, and
                         MONAI's UNet and BasicUNet when monai is importable), BN running
                         statistics randomised too, each exported, compared with PyTorch on a
                         random batch (max abs difference printed and asserted <= --atol), its
                         model.toml parsed and the exported model run through
                         tests/reference/segment_reference.py on tests/data slices.  Written to
                         --repo if given, else to a temporary directory that is removed.

Examples:
  python models/export/export_unet.py --state-dict unet.pth --arch plain --base 32 --version 2 \\
      --mean 0.12 0.10 0.11 --std 0.2 0.18 0.19
  python models/export/export_unet.py --state-dict best_metric_model.pth --arch monai-unet \\
      --monai-kwargs '{"channels": [16, 32, 64, 128, 256], "strides": [2, 2, 2, 2], "num_res_units": 2}' \\
      --version 2 --scale 0.00392156862745098 --offset 0.0
  python models/export/export_unet.py --random-init
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import tomllib

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from export_torchvision import IR_VERSION, OPSET, export, restamp, sha256_file  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BRATS_LABELS = ["background", "non_enhancing_core", "edema", "enhancing"]
BRATS_COLORS = ["#000000", "#1f77b4", "#2ca02c", "#d62728"]
BRATS_REGIONS = {
    "whole_tumor": ["non_enhancing_core", "edema", "enhancing"],
    "tumor_core": ["non_enhancing_core", "enhancing"],
    "enhancing_tumor": ["enhancing"],
}
SEQUENCES = ["FLAIR", "T1", "T1c", "T2"]
MONAI_DEFAULTS = {
    "monai-unet": {"channels": [16, 32, 64, 128, 256], "strides": [2, 2, 2, 2], "num_res_units": 2, "norm": "BATCH"},
    "monai-basicunet": {"features": [16, 16, 32, 64, 128, 16]},
}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--state-dict", metavar="PTH", help="state_dict of the network --arch builds")
    src.add_argument("--pickled-model", metavar="PT", help="a whole nn.Module saved with torch.save")
    src.add_argument("--random-init", action="store_true", help="random networks: the pipeline's self-test")
    ap.add_argument("--arch", choices=["plain", "monai-unet", "monai-basicunet"], default="plain")
    ap.add_argument("--base", type=int, default=16, help="plain: width of the first level (default 16)")
    ap.add_argument("--levels", type=int, default=4, help="plain: number of poolings (default 4)")
    ap.add_argument("--monai-kwargs", type=json.loads, default={}, metavar="JSON",
                    help="MONAI constructor arguments over the defaults (monai-unet: " + json.dumps(MONAI_DEFAULTS["monai-unet"])
                    + "; monai-basicunet: " + json.dumps(MONAI_DEFAULTS["monai-basicunet"]) + ")")
    ap.add_argument("--channels", nargs="+", default=["FLAIR", "T1c", "T2"], choices=SEQUENCES,
                    help="MR sequences in input-channel order (default FLAIR T1c T2)")
    ap.add_argument("--labels", nargs="+", default=BRATS_LABELS, help="class labels in output order, background first")
    ap.add_argument("--colors", nargs="+", help="one #rrggbb per label (default: the BraTS colours for the default labels)")
    ap.add_argument("--region", action="append", default=[], metavar="NAME=L1,L2",
                    help="a named union of labels; repeatable (default: the BraTS regions for the default labels)")
    ap.add_argument("--no-regions", action="store_true", help="write no [output.regions]")
    ap.add_argument("--repo", help="model repository directory (default models; --random-init: a temporary directory)")
    ap.add_argument("--name", default="brain-tumor-unet", help="model name = directory under --repo")
    ap.add_argument("--version", type=int, help="version directory (positive integer; required unless --random-init)")
    ap.add_argument("--height", type=int, default=240)
    ap.add_argument("--width", type=int, default=240)
    ap.add_argument("--mean", type=float, nargs="+", help="per-channel mean of pixel/255 (one per channel)")
    ap.add_argument("--std", type=float, nargs="+", help="per-channel std (one per channel)")
    ap.add_argument("--scale", type=float, help="instead of mean/std: x = pixel*scale + offset")
    ap.add_argument("--offset", type=float, default=0.0)
    ap.add_argument("--resize-filter", choices=["nearest", "bilinear", "bicubic", "lanczos3"], default="bilinear",
                    help="the filter used in training (Pillow semantics); default bilinear")
    ap.add_argument("--mask-resize", choices=["nearest", "bilinear"], default="nearest",
                    help="how the model-size mask is mapped back to the image's size (default nearest)")
    ap.add_argument("--dicom-window", default="minmax", help='[input.dicom] window (default "minmax"; "none": no [input.dicom])')
    ap.add_argument("--max-batch-size", type=int, default=8)
    ap.add_argument("--clinically-trained", action="store_true",
                    help="mark the model as clinically trained/validated (otherwise every response carries a warning)")
    ap.add_argument("--description", help="model.toml description")
    ap.add_argument("--force", action="store_true", help="overwrite an existing <version>/model.onnx")
    ap.add_argument("--exporter", choices=["auto", "torchscript", "dynamo"], default="auto",
                    help="torch.onnx exporter: auto (TorchScript, else dynamo; default), torchscript, dynamo")
    ap.add_argument("--atol", type=float, default=1e-4, help="ONNX Runtime vs PyTorch tolerance (default 1e-4)")
    a = ap.parse_args()
    if a.random_init:
        if a.clinically_trained:
            ap.error("--random-init and --clinically-trained contradict each other")
        a.version = a.version or 1
    elif a.version is None or a.version < 1:
        ap.error("--version must be a positive integer")
    if len(a.labels) < 2:
        ap.error("need at least two labels")
    if a.colors is None and a.labels == BRATS_LABELS:
        a.colors = BRATS_COLORS
    if a.colors is not None and len(a.colors) != len(a.labels):
        ap.error("--colors needs one colour per label")
    regions = {}
    for r in a.region:
        name, sep, members = r.partition("=")
        regions[name] = [m for m in members.split(",") if m]
        if not sep or not name or not regions[name] or any(m not in a.labels for m in regions[name]):
            ap.error(f"--region {r!r}: expected NAME=LABEL,LABEL with labels from {a.labels}")
    if not regions and not a.no_regions and a.labels == BRATS_LABELS:
        regions = BRATS_REGIONS
    a.regions = {} if a.no_regions else regions
    if a.scale is not None and (a.mean or a.std):
        ap.error("use either --mean/--std or --scale/--offset")
    if a.scale is None:
        a.mean = a.mean or [0.5] * len(a.channels)
        a.std = a.std or [0.25] * len(a.channels)
        if len(a.mean) != len(a.channels) or len(a.std) != len(a.channels):
            ap.error(f"--mean and --std need one value per channel ({len(a.channels)})")
    if a.arch == "plain" and (a.height % 2**a.levels or a.width % 2**a.levels):
        ap.error(f"--height and --width must be multiples of 2**levels = {2**a.levels}")
    return a


def unet2d_class():
    import torch
    from torch import nn

    class DoubleConv(nn.Sequential):
        def __init__(self, cin: int, cout: int) -> None:
            super().__init__(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            )

    class UNet2D(nn.Module):
        """Ronneberger-style 2D U-Net, the layout of models/make_unet.py (widths base * 2**i)."""

        def __init__(self, in_channels: int, num_classes: int, base: int = 16, levels: int = 4) -> None:
            super().__init__()
            widths = [base * 2**i for i in range(levels + 1)]
            self.down = nn.ModuleList([DoubleConv(in_channels, widths[0])]
                                      + [DoubleConv(widths[i - 1], widths[i]) for i in range(1, levels + 1)])
            self.pool = nn.MaxPool2d(2)
            self.upconv = nn.ModuleList([nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in range(levels)])
            self.up = nn.ModuleList([DoubleConv(2 * widths[i], widths[i]) for i in range(levels)])
            self.head = nn.Conv2d(widths[0], num_classes, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            skips = []
            for i, block in enumerate(self.down):
                x = block(x if i == 0 else self.pool(x))
                skips.append(x)
            for i in reversed(range(len(self.up))):
                x = self.up[i](torch.cat([skips[i], self.upconv[i](x)], dim=1))
            return self.head(x)

    return UNet2D


def build(arch: str, a: argparse.Namespace):
    cin, cout = len(a.channels), len(a.labels)
    if arch == "plain":
        return unet2d_class()(cin, cout, a.base, a.levels), f"plain-unet2d-base{a.base}-levels{a.levels}"
    try:
        from monai.networks import nets
    except ImportError as e:
        sys.exit(f"--arch {arch} needs monai, which is not importable here ({e}); see models/export/requirements.txt")
    kwargs = {**MONAI_DEFAULTS[arch], **a.monai_kwargs}
    cls = nets.UNet if arch == "monai-unet" else nets.BasicUNet
    return cls(spatial_dims=2, in_channels=cin, out_channels=cout, **kwargs), f"{arch}:{json.dumps(kwargs, sort_keys=True)}"


def load_state(model, path: str) -> None:
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "model_state_dict", "network"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    model.load_state_dict(state, strict=True)


def randomise(model, seed: int, he_init: bool) -> None:
    """Random BN running statistics and affine parameters, so the export is checked with
    non-trivial normalisation (fresh BatchNorm layers hold mean 0 / var 1); with he_init,
    He-normal convolutions (PyTorch's default init gives the plain U-Net logits of order 0.1, a
    weak test; MONAI's nets give logits of order 1 with their own init)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if he_init and isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                torch.nn.init.kaiming_normal_(m.weight, generator=g)
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.75)
                if m.affine:
                    m.weight.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.75)
                    m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def toml_list(values) -> str:
    return "[" + ", ".join(json.dumps(v) for v in values) + "]"


def write_toml(path: str, a: argparse.Namespace, description: str) -> None:
    q = json.dumps  # a JSON string is a valid TOML basic string
    if a.scale is None:
        scaling = f"mean = [{', '.join(repr(float(v)) for v in a.mean)}]\nstd = [{', '.join(repr(float(v)) for v in a.std)}]"
    else:
        scaling = f"scale = {float(a.scale)!r}\noffset = {float(a.offset)!r}"
    dicom = "" if a.dicom_window == "none" else f'\n[input.dicom]\nwindow = {q(a.dicom_window)}\nmodality = ["MR"]\n'
    colors = f"colors = {toml_list(a.colors)}\n" if a.colors else ""
    regions = ("\n[output.regions]\n" + "".join(f"{k} = {toml_list(v)}\n" for k, v in a.regions.items())) if a.regions else ""
    text = f"""# Written by models/export/export_unet.py. See models/README.md for every field.

[model]
task = "segmentation"
description = {q(description)}
clinically_trained = {str(a.clinically_trained).lower()}
max_batch_size = {a.max_batch_size}

[input]
name = "input"
layout = "NCHW"
height = {a.height}
width = {a.width}
channels = {toml_list(a.channels)}
resize_filter = {q(a.resize_filter)}
{scaling}
{dicom}
[output]
name = "logits"
kind = "logits"
layout = "NCHW"
labels = {toml_list(a.labels)}
{colors}mask_resize = {q(a.mask_resize)}
{regions}"""
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    with open(path, "rb") as f:
        tomllib.load(f)  # valid TOML


def export_one(model, a: argparse.Namespace, repo: str, name: str, source: str, description: str) -> str:
    import onnx
    import onnxruntime as ort
    import torch

    model = model.float().eval().cpu()
    vdir = os.path.join(repo, name, str(a.version))
    out = os.path.join(vdir, "model.onnx")
    if os.path.exists(out) and not a.force:
        sys.exit(f"{out} exists; pass --force to overwrite")
    os.makedirs(vdir, exist_ok=True)

    cin = len(a.channels)
    example = torch.randn(2, cin, a.height, a.width)
    with torch.no_grad():
        probe = model(example)
    want = (2, len(a.labels), a.height, a.width)
    if tuple(probe.shape) != want:
        sys.exit(f"model output has shape {tuple(probe.shape)}, expected {list(want)} for labels {a.labels}")

    props = {
        "name": name,
        "weights": source,
        "clinically_trained": str(a.clinically_trained).lower(),
        "task": "segmentation",
        "channels": ",".join(a.channels),
        "labels": ",".join(a.labels),
        "exporter": f"brainai export_unet.py (torch {torch.__version__})",
    }
    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "raw.onnx")
        used = export(model, example, raw, a.max_batch_size, a.exporter)
        props["exporter"] += f" {used} exporter"
        print(f"  exported with the {used} exporter")
        restamp(raw, out + ".tmp", props)
    os.replace(out + ".tmp", out)
    toml_path = os.path.join(repo, name, "model.toml")
    write_toml(toml_path, a, description)

    # Verify: ONNX Runtime output == PyTorch output on a random batch, plus batch 1.
    sess = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for n in (3, 1):
        x = rng.standard_normal((n, cin, a.height, a.width), dtype=np.float32)
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        got = sess.run(["logits"], {"input": x})[0]
        err = float(np.max(np.abs(got - ref)))
        agree = float(np.mean(got.argmax(axis=1) == ref.argmax(axis=1)))
        print(f"  batch {n}: max |onnxruntime - torch| = {err:.2e} (logits up to {float(np.max(np.abs(ref))):.2f}); "
              f"argmax agrees on {agree:.4%} of pixels")
        if not np.allclose(got, ref, rtol=0.0, atol=a.atol):
            sys.exit(f"verification FAILED: max abs difference {err:.3e} > atol {a.atol}")
    m = onnx.load(out, load_external_data=False)
    assert m.ir_version == IR_VERSION and [(o.domain, o.version) for o in m.opset_import if o.domain in ("", "ai.onnx")] == [("", OPSET)]
    n_params = sum(int(np.prod(t.dims)) for t in m.graph.initializer)
    print(f"  wrote {out} ({os.path.getsize(out) / 1e6:.1f} MB, {n_params:,} initializer values, ir_version "
          f"{m.ir_version}, opset {OPSET}, onnxruntime {ort.__version__} verified) and {toml_path}")
    print(f"  sha256 {sha256_file(out)}  {out}")
    return out


def reference_smoke(repo: str, name: str, a: argparse.Namespace) -> None:
    """The exported model through the independent segmentation reference (model.toml parsed,
    preprocessing, inference, mask back at the slice's size)."""
    script = os.path.join(REPO_ROOT, "tests", "reference", "segment_reference.py")
    slices = ["flair_256_a.png", "flair_256_b.png", "flair_256_tumor.png", "flair_256_c.png"]
    cmd = [sys.executable, script, "--model-dir", os.path.join(repo, name)]
    for seq, s in zip(a.channels, slices):
        cmd += ["--image", f"{seq}={os.path.join(REPO_ROOT, 'tests', 'data', s)}"]
    res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    assert (res["width"], res["height"]) == (256, 256) and len(res["mask"]) == 256 * 256, res.keys()
    print(f"  segment_reference.py: {res['width']}x{res['height']} mask, counts {res['counts']}")


def main() -> None:
    a = parse_args()
    import torch

    torch.manual_seed(0)
    if not a.random_init:
        if a.pickled_model:
            model = torch.load(a.pickled_model, map_location="cpu", weights_only=False)
            source = f"pickled:{os.path.basename(a.pickled_model)}:sha256={sha256_file(a.pickled_model)}"
        else:
            model, arch = build(a.arch, a)
            load_state(model, a.state_dict)
            source = f"{arch}:{os.path.basename(a.state_dict)}:sha256={sha256_file(a.state_dict)}"
        description = a.description or f"2D U-Net brain-MRI tumour segmenter on {', '.join(a.channels)} exported from {source}"
        export_one(model, a, a.repo or "models", a.name, source, description)
        print(f"labels {a.labels}, channels {a.channels}, clinically_trained {a.clinically_trained}")
        return

    archs = ["plain"]
    try:
        import monai

        archs += ["monai-unet", "monai-basicunet"]
        print(f"monai {monai.__version__} importable: exporting its UNet and BasicUNet too")
    except ImportError:
        print("monai not importable: only the plain PyTorch U-Net is exported")
    with tempfile.TemporaryDirectory() as tmp:
        repo = a.repo or tmp
        for i, arch in enumerate(archs):
            model, desc = build(arch, a)
            randomise(model, seed=i, he_init=arch == "plain")
            n_params = sum(p.numel() for p in model.parameters())
            name = f"unet-random-{arch}"
            print(f"{name}: {desc}, {n_params:,} parameters")
            export_one(model, a, repo, name, f"{desc}:untrained-random-init",
                       f"{arch} 2D U-Net with UNTRAINED random weights (export pipeline test only; not clinically trained)")
            reference_smoke(repo, name, a)
    print(f"random-init export test passed for {', '.join(archs)}")


if __name__ == "__main__":
    main()
