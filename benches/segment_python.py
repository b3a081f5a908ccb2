#!/usr/bin/env python3
"""The Python side of benches/segment.rs: what a research team would write with numpy + Pillow
(+ onnxruntime), timed in this process.

  segment_python.py postprocess --logits F.f32 --classes C --size S --out-size W H --iterations N
      One slice's postprocessing, as benches/segment.rs times the service's: logits [C, S, S]
      (float32, little-endian) -> argmax over classes -> the label map resized to W x H with
      Pillow's NEAREST -> per-class pixel counts and bounding boxes -> the map as a PNG (in
      memory). Prints the median milliseconds of N runs as JSON {"ms": ...}.

  segment_python.py serve --model-dir DIR --image SEQ=PATH ... --seconds T
      The per-request Python stack: for each request, open the channel images with Pillow,
      convert("L"), resize to the model's size, normalise with numpy, stack, run onnxruntime
      (batch 1), argmax, resize the mask back, count, PNG-encode; in a loop for T seconds.
      Prints {"slices_per_s": ...}.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
from PIL import Image


def postprocess(logits: np.ndarray, out_w: int, out_h: int) -> tuple[bytes, dict]:
    labels = logits.argmax(axis=0).astype(np.uint8)
    mask = np.asarray(Image.fromarray(labels, "L").resize((out_w, out_h), Image.Resampling.NEAREST))
    counts = np.bincount(mask.ravel(), minlength=logits.shape[0])
    boxes = {}
    for k in range(logits.shape[0]):
        ys, xs = np.nonzero(mask == k)
        boxes[k] = (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())) if len(xs) else None
    buf = io.BytesIO()
    Image.fromarray(mask, "L").save(buf, format="PNG")
    return buf.getvalue(), {"counts": counts.tolist(), "boxes": boxes}


def cmd_postprocess(args: argparse.Namespace) -> None:
    logits = np.fromfile(args.logits, dtype="<f4").reshape(args.classes, args.size, args.size)
    w, h = args.out_size
    postprocess(logits, w, h)
    times = []
    for _ in range(args.iterations):
        t = time.perf_counter()
        postprocess(logits, w, h)
        times.append((time.perf_counter() - t) * 1e3)
    print(json.dumps({"ms": float(np.median(times))}))


def cmd_serve(args: argparse.Namespace) -> None:
    import onnxruntime as ort

    model_dir = Path(args.model_dir)
    config = tomllib.loads((model_dir / "model.toml").read_text())
    inp = config["input"]
    size = (inp["width"], inp["height"])
    mean = np.array(inp["mean"], dtype=np.float32)[:, None, None]
    std = np.array(inp["std"], dtype=np.float32)[:, None, None]
    filt = {"bilinear": Image.Resampling.BILINEAR, "nearest": Image.Resampling.NEAREST}[inp["resize_filter"]]
    versions = sorted(int(p.name) for p in model_dir.iterdir() if p.name.isdigit())
    opts = ort.SessionOptions()
    if args.threads:
        opts.intra_op_num_threads = args.threads
    session = ort.InferenceSession(str(model_dir / str(versions[-1]) / "model.onnx"), opts,
                                   providers=["CPUExecutionProvider"])
    images = dict(pair.split("=", 1) for pair in args.image)
    payloads = {seq: Path(images[seq]).read_bytes() for seq in inp["channels"]}

    def one_request() -> bytes:
        planes = []
        for seq in inp["channels"]:
            im = Image.open(io.BytesIO(payloads[seq])).convert("L")
            original = im.size
            if im.size != size:
                im = im.resize(size, filt)
            planes.append(np.asarray(im, dtype=np.float32))
        x = ((np.stack(planes) / np.float32(255.0) - mean) / std)[None].astype(np.float32)
        logits = session.run(None, {inp["name"]: x})[0][0]
        png, _ = postprocess(logits, *original)
        return png

    one_request()
    done = 0
    started = time.perf_counter()
    while time.perf_counter() - started < args.seconds:
        one_request()
        done += 1
    print(json.dumps({"slices_per_s": done / (time.perf_counter() - started)}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("postprocess")
    p.add_argument("--logits", required=True)
    p.add_argument("--classes", type=int, required=True)
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--out-size", type=int, nargs=2, required=True)
    p.add_argument("--iterations", type=int, default=200)
    s = sub.add_parser("serve")
    s.add_argument("--model-dir", required=True)
    s.add_argument("--image", action="append", required=True)
    s.add_argument("--seconds", type=float, default=10.0)
    s.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    {"postprocess": cmd_postprocess, "serve": cmd_serve}[args.cmd](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
