#!/usr/bin/env python3
"""Independent Python reference for BrainAI Serve's segmentation path (issue 23).

Built only on Pillow + numpy + onnxruntime; it shares no code with the Rust service (nor with
tests/reference/reference.py).  Run with the repo's venv:

    .venv/bin/python tests/reference/segment_reference.py --model-dir DIR \\
        --image FLAIR=flair.png --image T1c=t1c.png --image T2=t2.png [--probabilities]
    .venv/bin/python tests/reference/segment_reference.py --model-dir DIR --batch-file CASES.json \\
        [--probabilities]

--image SEQ=PATH   one per entry of model.toml's [input] `channels` (SEQ matched case-insensitively,
                   each exactly once).  All images must have the same size; the reference size
                   (the mask's size) is the first channel's image's.
--batch-file F     a JSON list of cases, each an object {SEQ: PATH, ...}; prints one JSON line per
                   case, in order (each case runs alone, batch 1, in one ONNX Runtime session).
--probabilities    also print "probabilities": the model's per-class probabilities at the MODEL's
                   size, {"shape": [K, h, w], "data": [...]} (class-major, row-major, float32
                   values; softmax in float64 of the logits when kind = "logits").

Prints (one JSON line per case):
  {"width": W, "height": H,                  the original image size
   "mask": [...],                            H*W labels (uint8 class indices), row-major
   "counts": {label: n},                     pixels per label (every label, 0 included)
   "bbox": {label: [x0, y0, x1, y1] | null}, inclusive pixel bounds, null when absent
   "regions": {name: {"pixels": n, "bbox": [...] | null}}}   [output.regions] unions

Preprocessing (as a Pillow training pipeline does it), per channel: Image.open, convert("L")
(ITU-R 601-2 luma for colour), resize to (width, height) with `resize_filter` when the size
differs, float32, then (p/255 - mean[c]) / std[c] (float32 operations) or p*scale + offset;
stacked in `channels` order into the model's layout ([1,C,h,w] NCHW, [1,h,w,C] NHWC), or, with
`tensors`, one [1,1,h,w] / [1,h,w,1] input per channel.

Output (`[output] layout`: NCHW [1,K,h,w] or NHWC [1,h,w,K]) back to the original size, by
`mask_resize`:
  nearest   label = argmax over classes of the raw output at the model's size (ties: the lowest
            class, numpy's argmax; the same as the argmax of the probabilities), then
            Image.fromarray(labels as uint8, "L").resize((W, H), NEAREST);
  bilinear  probabilities (float64 softmax over classes of the logits, stored as float32; or the
            model's probabilities as they are) per class as a Pillow mode "F" image resized
            with BILINEAR to (W, H), then argmax over classes (ties: the lowest class).
No resize when the model's size is the original size.
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
    "lanczos3": Image.Resampling.LANCZOS,  # support radius 3
}


def load_config(model_dir: Path) -> dict:
    with open(model_dir / "model.toml", "rb") as f:
        cfg = tomllib.load(f)
    model, inp, out = cfg.get("model", {}), cfg["input"], cfg["output"]
    if model.get("task", "classification") != "segmentation":
        raise ValueError(f"{model_dir}: [model] task is not \"segmentation\"")
    if inp["layout"] not in ("NCHW", "NHWC"):
        raise ValueError(f"unsupported input layout {inp['layout']!r}")
    if out.get("layout", "NCHW") not in ("NCHW", "NHWC"):
        raise ValueError(f"unsupported output layout {out['layout']!r}")
    if inp["resize_filter"] not in RESAMPLE:
        raise ValueError(f"unsupported resize_filter {inp['resize_filter']!r}")
    if out.get("mask_resize", "nearest") not in ("nearest", "bilinear"):
        raise ValueError(f"unsupported mask_resize {out['mask_resize']!r}")
    if out["kind"] not in ("logits", "probabilities"):
        raise ValueError(f"unsupported output kind {out['kind']!r}")
    channels = inp.get("channels")
    if not channels:
        raise ValueError("[input] channels is missing")
    if ("tensors" in inp) == ("name" in inp):
        raise ValueError("[input] needs exactly one of name, tensors")
    if "tensors" in inp and len(inp["tensors"]) != len(channels):
        raise ValueError("[input] tensors must name one ONNX input per channel")
    if "mean" in inp:
        if len(inp["mean"]) != len(channels) or len(inp["std"]) != len(channels):
            raise ValueError("mean and std need one value per channel")
    return cfg


def latest_model_path(model_dir: Path) -> Path:
    versions = [int(p.name) for p in model_dir.iterdir()
                if p.is_dir() and p.name.isdigit() and (p / "model.onnx").is_file()]
    if not versions:
        raise FileNotFoundError(f"no <int>/model.onnx under {model_dir}")
    return model_dir / str(max(versions)) / "model.onnx"


def order_images(images: dict[str, str], channels: list[str]) -> list[str]:
    """The image paths in `channels` order; SEQ names are matched case-insensitively."""
    by_key: dict[str, str] = {}
    for seq, path in images.items():
        key = seq.lower()
        if key in by_key:
            raise ValueError(f"sequence {seq!r} given twice")
        by_key[key] = path
    wanted = [c.lower() for c in channels]
    extra = sorted(set(by_key) - set(wanted))
    missing = [c for c in channels if c.lower() not in by_key]
    if extra or missing:
        raise ValueError(f"the model takes {channels}; missing {missing}, not taken {extra}")
    return [by_key[c] for c in wanted]


def load_gray(path: str) -> Image.Image:
    with Image.open(path) as img:
        img.load()
        return img.convert("L")  # (R*19595 + G*38470 + B*7471 + 0x8000) >> 16 for RGB


def preprocess(paths: list[str], inp: dict) -> tuple[list[np.ndarray], tuple[int, int]]:
    """Per-channel float32 planes [h, w] at the model's size, and the original (W, H)."""
    w, h = int(inp["width"]), int(inp["height"])
    planes, size0 = [], None
    for c, path in enumerate(paths):
        img = load_gray(path)
        if size0 is None:
            size0 = img.size
        elif img.size != size0:
            raise ValueError(f"{path}: {img.size[0]}x{img.size[1]}, but the first channel's image is "
                             f"{size0[0]}x{size0[1]}; all channel images must have the same size")
        if img.size != (w, h):
            img = img.resize((w, h), resample=RESAMPLE[inp["resize_filter"]])
        x = np.asarray(img, dtype=np.uint8).astype(np.float32)
        if "mean" in inp:
            x = (x / np.float32(255.0) - np.float32(inp["mean"][c])) / np.float32(inp["std"][c])
        else:
            x = x * np.float32(inp.get("scale", 1.0)) + np.float32(inp.get("offset", 0.0))
        planes.append(x.astype(np.float32, copy=False))
    return planes, size0


def feeds(planes: list[np.ndarray], inp: dict) -> dict[str, np.ndarray]:
    axis = 0 if inp["layout"] == "NCHW" else 2  # channel axis of one image
    if "tensors" in inp:
        return {name: np.ascontiguousarray(np.expand_dims(p, axis)[None]) for name, p in zip(inp["tensors"], planes)}
    return {inp["name"]: np.ascontiguousarray(np.stack(planes, axis=axis)[None])}


def softmax64(z: np.ndarray) -> np.ndarray:
    """Softmax over axis 0 (classes) in float64."""
    z = z.astype(np.float64)
    e = np.exp(z - z.max(axis=0, keepdims=True))
    return e / e.sum(axis=0, keepdims=True)


def bbox(sel: np.ndarray) -> list[int] | None:
    ys, xs = np.nonzero(sel)
    if len(xs) == 0:
        return None
    return [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())]


class Segmenter:
    def __init__(self, model_dir: Path) -> None:
        import onnxruntime as ort

        self.cfg = load_config(model_dir)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self.sess = ort.InferenceSession(str(latest_model_path(model_dir)), opts, providers=["CPUExecutionProvider"])

    def run(self, images: dict[str, str], want_probs: bool) -> dict:
        inp, out = self.cfg["input"], self.cfg["output"]
        labels = list(out["labels"])
        planes, (w0, h0) = preprocess(order_images(images, inp["channels"]), inp)
        (y,) = self.sess.run([out["name"]], feeds(planes, inp))
        y = np.asarray(y, dtype=np.float32)
        if y.ndim != 4 or y.shape[0] != 1:
            raise ValueError(f"output shape {y.shape}, expected 4-D with batch 1")
        if out.get("layout", "NCHW") == "NHWC":
            y = y.transpose(0, 3, 1, 2)
        y = y[0]  # [K, h, w]
        if y.shape != (len(labels), int(inp["height"]), int(inp["width"])):
            raise ValueError(f"output [K,h,w] = {list(y.shape)}, expected {[len(labels), inp['height'], inp['width']]}")
        probs = softmax64(y).astype(np.float32) if out["kind"] == "logits" else y

        h, w = y.shape[1:]
        if out.get("mask_resize", "nearest") == "nearest":
            mask = y.argmax(axis=0).astype(np.uint8)
            if (w, h) != (w0, h0):
                mask = np.asarray(Image.fromarray(mask, "L").resize((w0, h0), Image.Resampling.NEAREST))
        else:
            if (w, h) != (w0, h0):
                resized = [np.asarray(Image.fromarray(np.ascontiguousarray(p, dtype=np.float32)).resize(
                    (w0, h0), Image.Resampling.BILINEAR), dtype=np.float32) for p in probs]
                mask = np.stack(resized).argmax(axis=0).astype(np.uint8)
            else:
                mask = probs.argmax(axis=0).astype(np.uint8)
        assert mask.shape == (h0, w0), mask.shape

        index = {label: k for k, label in enumerate(labels)}
        result = {
            "width": int(w0),
            "height": int(h0),
            "mask": mask.reshape(-1).tolist(),
            "counts": {label: int(np.count_nonzero(mask == k)) for k, label in enumerate(labels)},
            "bbox": {label: bbox(mask == k) for k, label in enumerate(labels)},
            "regions": {},
        }
        for name, members in out.get("regions", {}).items():
            sel = np.isin(mask, [index[m] for m in members])
            result["regions"][name] = {"pixels": int(np.count_nonzero(sel)), "bbox": bbox(sel)}
        if want_probs:
            result["probabilities"] = {"shape": list(probs.shape), "data": [float(v) for v in probs.reshape(-1)]}
        return result


def parse_image(arg: str) -> tuple[str, str]:
    seq, sep, path = arg.partition("=")
    if not sep or not seq or not path:
        raise argparse.ArgumentTypeError(f"expected SEQ=PATH, got {arg!r}")
    return seq, path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", required=True)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", type=parse_image, action="append", metavar="SEQ=PATH")
    src.add_argument("--batch-file", metavar="JSON")
    ap.add_argument("--probabilities", action="store_true")
    args = ap.parse_args(argv)

    seg = Segmenter(Path(args.model_dir))
    if args.image:
        images = {}
        for seq, path in args.image:
            if seq in images:
                ap.error(f"sequence {seq!r} given twice")
            images[seq] = path
        cases = [images]
    else:
        cases = json.loads(Path(args.batch_file).read_text())
        if not isinstance(cases, list) or not all(isinstance(c, dict) for c in cases):
            ap.error("--batch-file: expected a JSON list of {SEQ: PATH} objects")
    for case in cases:
        print(json.dumps(seg.run(case, args.probabilities), separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
