#!/usr/bin/env python3
"""Independent Python reference for the BrainAI Serve preprocessing / inference path.

Built only on Pillow + numpy + onnxruntime so the Rust implementation can be checked
against something that shares none of its code.  Run with the repo's venv:

    .venv/bin/python tests/reference/reference.py preprocess --model-dir DIR IMG [IMG...] --out OUT.f32
    .venv/bin/python tests/reference/reference.py classify   --model-dir DIR IMG [IMG...]
    .venv/bin/python tests/reference/reference.py decode     IMG --out OUT.u8

preprocess: writes the batch tensor as raw little-endian float32, images concatenated in
            argument order, each laid out [3,H,W] (NCHW) or [H,W,3] (NHWC); prints a JSON
            line {"shape": [...]} to stdout.
classify:   prints {"labels": [...], "probabilities": [[...], ...]} (one row per image).
decode:     writes Pillow's decoded RGB pixels (HWC u8) and prints {"width":..,"height":..}.

The model directory holds model.toml plus integer-named version sub-directories, each with
model.onnx; the highest integer version is used.
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from pathlib import Path

import numpy as np
from PIL import Image

RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos3": Image.Resampling.LANCZOS,  # Pillow's LANCZOS has support radius 3
}


def load_config(model_dir: Path) -> dict:
    with open(model_dir / "model.toml", "rb") as f:
        cfg = tomllib.load(f)
    inp = cfg["input"]
    if inp["layout"] not in ("NCHW", "NHWC"):
        raise ValueError(f"unsupported layout {inp['layout']!r}")
    if inp["color"] not in ("rgb", "grayscale"):
        raise ValueError(f"unsupported color {inp['color']!r}")
    if inp["resize_filter"] not in RESAMPLE:
        raise ValueError(f"unsupported resize_filter {inp['resize_filter']!r}")
    if ("mean" in inp) != ("std" in inp):
        raise ValueError("mean and std must be given together")
    return cfg


def latest_model_path(model_dir: Path) -> Path:
    versions = [
        int(p.name)
        for p in model_dir.iterdir()
        if p.is_dir() and p.name.isdigit() and (p / "model.onnx").is_file()
    ]
    if not versions:
        raise FileNotFoundError(f"no <int>/model.onnx under {model_dir}")
    return model_dir / str(max(versions)) / "model.onnx"


def preprocess_one(path: str | Image.Image, inp: dict) -> np.ndarray:
    """Return float32 array shaped [3,H,W] (NCHW) or [H,W,3] (NHWC) for one image.

    `path` is a file name, or an already decoded PIL Image (tests/reference/dicom_reference.py
    passes each DICOM frame's 8-bit pixels this way)."""
    if isinstance(path, Image.Image):
        return preprocess_image(path, inp)
    with Image.open(path) as img:
        img.load()
        return preprocess_image(img, inp)


def preprocess_image(img: Image.Image, inp: dict) -> np.ndarray:
    """preprocess_one for a decoded PIL Image (any mode Pillow can convert to RGB / L)."""
    w, h = int(inp["width"]), int(inp["height"])
    if inp["color"] == "rgb":
        img = img.convert("RGB")
    else:
        img = img.convert("L")  # (R*19595 + G*38470 + B*7471 + 0x8000) >> 16  (BT.601, fixed point)
    if img.size != (w, h):
        img = img.resize((w, h), resample=RESAMPLE[inp["resize_filter"]])
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:  # grayscale -> replicate to 3 channels
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    assert arr.shape == (h, w, 3), arr.shape

    x = arr.astype(np.float32)
    if "mean" in inp:
        mean = np.asarray(inp["mean"], dtype=np.float32).reshape(1, 1, 3)
        std = np.asarray(inp["std"], dtype=np.float32).reshape(1, 1, 3)
        x = (x / np.float32(255.0) - mean) / std
    else:
        scale = np.float32(inp.get("scale", 1.0))
        offset = np.float32(inp.get("offset", 0.0))
        x = x * scale + offset
    x = x.astype(np.float32, copy=False)

    if inp["layout"] == "NCHW":
        x = np.transpose(x, (2, 0, 1))
    return np.ascontiguousarray(x, dtype=np.float32)


def preprocess_batch(paths: list[str], inp: dict) -> np.ndarray:
    return np.stack([preprocess_one(p, inp) for p in paths], axis=0)


def softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def cmd_preprocess(args) -> int:
    cfg = load_config(Path(args.model_dir))
    batch = preprocess_batch(args.images, cfg["input"])
    Path(args.out).write_bytes(batch.astype("<f4").tobytes())
    print(json.dumps({"shape": list(batch.shape)}))
    return 0


def cmd_classify(args) -> int:
    import onnxruntime as ort

    model_dir = Path(args.model_dir)
    cfg = load_config(model_dir)
    batch = preprocess_batch(args.images, cfg["input"])
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(
        str(latest_model_path(model_dir)), opts, providers=["CPUExecutionProvider"]
    )
    (out,) = sess.run([cfg["output"]["name"]], {cfg["input"]["name"]: batch})
    out = np.asarray(out).reshape(len(args.images), -1)
    if cfg["output"]["kind"] == "logits":
        probs = softmax(out)
    elif cfg["output"]["kind"] == "probabilities":
        probs = out.astype(np.float32)
    else:
        raise ValueError(f"unsupported output kind {cfg['output']['kind']!r}")
    labels = list(cfg["output"]["labels"])
    if probs.shape[1] != len(labels):
        raise ValueError(f"model gives {probs.shape[1]} outputs, config has {len(labels)} labels")
    print(json.dumps({"labels": labels, "probabilities": [[float(v) for v in row] for row in probs]}))
    return 0


def cmd_decode(args) -> int:
    with Image.open(args.image) as img:
        img.load()
        rgb = img.convert("RGB")
    arr = np.asarray(rgb, dtype=np.uint8)
    Path(args.out).write_bytes(np.ascontiguousarray(arr).tobytes())
    print(json.dumps({"width": rgb.width, "height": rgb.height}))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("preprocess")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("images", nargs="+")
    p.set_defaults(func=cmd_preprocess)

    c = sub.add_parser("classify")
    c.add_argument("--model-dir", required=True)
    c.add_argument("images", nargs="+")
    c.set_defaults(func=cmd_classify)

    d = sub.add_parser("decode")
    d.add_argument("--out", required=True)
    d.add_argument("image")
    d.set_defaults(func=cmd_decode)

    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
