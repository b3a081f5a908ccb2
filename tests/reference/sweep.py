#!/usr/bin/env python3
"""Inputs and Pillow's answers for the parity sweeps of tests/parity.rs (Pillow + numpy only; no
code shared with the Rust service).

    .venv/bin/python tests/reference/sweep.py resize  --out DIR [--pairs N]
    .venv/bin/python tests/reference/sweep.py formats --out DIR

resize:  writes DIR/cases.json and DIR/data.bin. For every (source size, target size) pair -- at
         least N (default 240): hand-picked edge cases (1-pixel and 1-pixel-thin images, integer
         and non-integer ratios down and up, off-by-one sizes, the 512->150 pair that once
         flipped a trained model's answer) plus log-uniform random sizes -- and for gray (1
         channel) and RGB (3 channels), a random 8-bit image is resized by Pillow with NEAREST,
         BILINEAR, BICUBIC and LANCZOS. Each case records the input's and the output's byte range
         in data.bin.
formats: writes image files in every encoding the service takes -- PNG 8-bit gray, 1/2/4-bit
         gray, 16-bit gray, gray+alpha (8 and 16 bit), RGB (8 and 16 bit), RGBA (8 and 16 bit),
         palette with and without transparency; JPEG gray, YCbCr 4:2:0 and 4:4:4, progressive,
         CMYK -- at an odd size, and DIR/formats.json listing them. Pillow cannot write every
         PNG bit depth, so a minimal PNG writer (struct + zlib) writes those; Pillow reads them.
"""

from __future__ import annotations

import argparse
import json
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos3": Image.Resampling.LANCZOS,
}

# (source w, h) -> (target w, h): the edges the random pairs may miss.
EDGE_PAIRS = [
    ((512, 512), (150, 150)),  # the pair where a nearest-neighbour index flipped a top-1 class
    ((512, 512), (256, 256)), ((256, 256), (512, 512)), ((512, 512), (224, 224)),
    ((300, 220), (256, 256)), ((220, 300), (256, 256)), ((256, 256), (255, 255)),
    ((255, 255), (256, 256)), ((257, 257), (256, 256)), ((1, 1), (1, 1)), ((1, 1), (7, 5)),
    ((2, 2), (1, 1)), ((3, 3), (2, 2)), ((1, 37), (16, 16)), ((37, 1), (16, 16)),
    ((1, 300), (1, 17)), ((300, 1), (17, 1)), ((5, 300), (5, 17)), ((300, 5), (17, 5)),
    ((640, 2), (100, 3)), ((97, 13), (13, 97)), ((13, 97), (97, 13)), ((1000, 3), (33, 3)),
    ((17, 17), (17, 16)), ((16, 17), (16, 16)), ((9, 9), (3, 3)), ((3, 3), (9, 9)),
    ((100, 100), (33, 33)), ((100, 100), (30, 30)), ((99, 99), (33, 33)), ((150, 150), (512, 512)),
    ((333, 256), (256, 256)), ((256, 333), (256, 256)), ((64, 64), (256, 256)), ((128, 128), (256, 256)),
    ((7, 5), (1, 1)), ((250, 250), (1, 1)), ((1, 250), (1, 1)), ((31, 29), (32, 32)),
    ((480, 640), (256, 256)), ((640, 480), (150, 150)),
]


def log_uniform(rng: np.random.Generator, lo: int, hi: int) -> int:
    return int(round(float(np.exp(rng.uniform(np.log(lo), np.log(hi))))))


def image_bytes(rng: np.random.Generator, w: int, h: int, channels: int) -> np.ndarray:
    """Half noise (every rounding path), half smooth gradient with noise (natural images)."""
    shape = (h, w) if channels == 1 else (h, w, channels)
    noise = rng.integers(0, 256, size=shape, dtype=np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    smooth = (127 + 100 * np.sin(xx / max(w, 1) * 5.1 + 0.3) * np.cos(yy / max(h, 1) * 3.7)).astype(np.float64)
    if channels == 3:
        smooth = np.stack([smooth, smooth * 0.9 + 10, 255 - smooth], axis=2)
    smooth = np.clip(smooth + rng.normal(0, 6, size=shape), 0, 255).astype(np.uint8)
    return noise if rng.uniform() < 0.5 else smooth


def cmd_resize(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(20261126)
    pairs = list(EDGE_PAIRS)
    while len(pairs) < args.pairs:
        pairs.append(((log_uniform(rng, 1, 400), log_uniform(rng, 1, 400)),
                      (log_uniform(rng, 1, 300), log_uniform(rng, 1, 300))))
    cases, blob, offset = [], bytearray(), 0
    for (w, h), (ow, oh) in pairs:
        for channels in (1, 3):
            arr = image_bytes(rng, w, h, channels)
            img = Image.fromarray(arr, mode="L" if channels == 1 else "RGB")
            src = arr.tobytes()
            src_at = offset
            blob += src
            offset += len(src)
            for name, flt in FILTERS.items():
                res = np.asarray(img.resize((ow, oh), resample=flt), dtype=np.uint8).tobytes()
                cases.append({
                    "w": w, "h": h, "channels": channels, "out_w": ow, "out_h": oh, "filter": name,
                    "input": [src_at, len(src)], "output": [offset, len(res)],
                })
                blob += res
                offset += len(res)
    (out / "data.bin").write_bytes(bytes(blob))
    (out / "cases.json").write_text(json.dumps({"pairs": len(pairs), "cases": cases}))
    print(json.dumps({"pairs": len(pairs), "cases": len(cases), "bytes": offset}))
    return 0


# ---- formats ---------------------------------------------------------------------------------


def png_raw(arr: np.ndarray, color_type: int, bit_depth: int, palette: bytes | None = None,
            trns: bytes | None = None) -> bytes:
    """A minimal PNG writer for what Pillow cannot write (16-bit colour, 2/4-bit gray, LA16)."""
    h, w = arr.shape[:2]
    rows = []
    for y in range(h):
        row = arr[y]
        if bit_depth == 16:
            data = row.astype(">u2").tobytes()
        elif bit_depth == 8:
            data = row.astype(np.uint8).tobytes()
        else:  # pack 1/2/4-bit samples, most significant first
            per = 8 // bit_depth
            flat = row.reshape(-1).astype(np.uint8)
            pad = (-len(flat)) % per
            flat = np.concatenate([flat, np.zeros(pad, np.uint8)]).reshape(-1, per)
            shifts = np.arange(per - 1, -1, -1) * bit_depth
            data = (flat << shifts).sum(axis=1).astype(np.uint8).tobytes()
        rows.append(b"\x00" + data)

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)

    out = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0))
    if palette is not None:
        out += chunk(b"PLTE", palette)
    if trns is not None:
        out += chunk(b"tRNS", trns)
    return out + chunk(b"IDAT", zlib.compress(b"".join(rows), 9)) + chunk(b"IEND", b"")


def slice_like(w: int, h: int, seed: int) -> np.ndarray:
    """A smooth, MRI-like 8-bit gray image with texture (JPEG-friendly, not noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / np.array([h, w]).reshape(2, 1, 1)
    r = np.hypot(xx - 0.5, (yy - 0.5) * 1.2)
    brain = np.clip(1.2 - 2.4 * r, 0, 1)
    texture = 0.15 * np.sin(xx * 37 + yy * 11) * np.cos(yy * 29 - xx * 7)
    img = 255 * np.clip(brain * (0.55 + texture) + rng.normal(0, 0.02, size=(h, w)), 0, 1)
    return img.astype(np.uint8)


def cmd_formats(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    w, h = 67, 45
    g8 = slice_like(w, h, 1)
    rgb8 = np.stack([g8, np.clip(g8 * 0.9 + 12, 0, 255), 255 - g8], axis=2).astype(np.uint8)
    alpha8 = np.linspace(0, 255, w * h).reshape(h, w).astype(np.uint8)
    rng = np.random.default_rng(7)
    g16 = (g8.astype(np.uint32) * 257 + rng.integers(0, 257, size=g8.shape)).astype(np.uint16)
    g16_low = (g8.astype(np.uint16) // 2)  # 16-bit gray whose values stay below 256 (not clipped)
    rgb16 = (rgb8.astype(np.uint32) * 257 + rng.integers(0, 257, size=rgb8.shape)).astype(np.uint16)
    a16 = (alpha8.astype(np.uint16) * 257)

    files: dict[str, bytes | Image.Image] = {}

    def save(name: str, img: Image.Image, **kw) -> None:
        path = out / name
        img.save(path, **kw)
        files[name] = path.read_bytes()

    def raw(name: str, data: bytes) -> None:
        (out / name).write_bytes(data)
        files[name] = data

    save("gray8.png", Image.fromarray(g8, "L"))
    save("gray1.png", Image.fromarray(g8 > 100).convert("1"))
    raw("gray2.png", png_raw(g8 >> 6, 0, 2))
    raw("gray4.png", png_raw(g8 >> 4, 0, 4))
    raw("gray16.png", png_raw(g16, 0, 16))
    raw("gray16_low.png", png_raw(g16_low, 0, 16))
    save("gray_alpha8.png", Image.fromarray(np.stack([g8, alpha8], axis=2), "LA"))
    raw("gray_alpha16.png", png_raw(np.stack([g16, a16], axis=2), 4, 16))
    save("rgb8.png", Image.fromarray(rgb8, "RGB"))
    raw("rgb16.png", png_raw(rgb16, 2, 16))
    save("rgba8.png", Image.fromarray(np.concatenate([rgb8, alpha8[..., None]], axis=2), "RGBA"))
    raw("rgba16.png", png_raw(np.concatenate([rgb16, a16[..., None]], axis=2), 6, 16))
    pal = Image.fromarray(rgb8, "RGB").quantize(colors=64, dither=Image.Dither.NONE)
    save("palette.png", pal)
    pal_t = pal.copy()
    pal_t.info["transparency"] = 3
    save("palette_trns.png", pal_t, transparency=3)
    save("gray.jpg", Image.fromarray(g8, "L"), quality=90)
    save("ycbcr420.jpg", Image.fromarray(rgb8, "RGB"), quality=90, subsampling=2)
    save("ycbcr444.jpg", Image.fromarray(rgb8, "RGB"), quality=95, subsampling=0)
    save("progressive.jpg", Image.fromarray(rgb8, "RGB"), quality=90, progressive=True)
    save("cmyk.jpg", Image.fromarray(rgb8, "RGB").convert("CMYK"), quality=95)

    listing = []
    for name in files:
        with Image.open(out / name) as im:
            listing.append({"file": name, "pillow_mode": im.mode, "width": im.width, "height": im.height,
                            "jpeg": name.endswith(".jpg")})
    (out / "formats.json").write_text(json.dumps(listing))
    print(json.dumps({"images": len(listing)}))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("resize")
    r.add_argument("--out", required=True)
    r.add_argument("--pairs", type=int, default=240)
    r.set_defaults(func=cmd_resize)
    f = sub.add_parser("formats")
    f.add_argument("--out", required=True)
    f.set_defaults(func=cmd_formats)
    args = ap.parse_args()
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
