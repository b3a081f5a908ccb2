#!/usr/bin/env python3
"""Generate the committed test images under tests/data/.

    .venv/bin/python tests/make_test_images.py

Deterministic: fixed seeds, no timestamps/metadata in the files, so re-running with the
pinned venv (numpy 2.3.5, pillow 12.0.0) reproduces the same bytes.

The images are synthetic axial brain-MRI FLAIR-like slices (not real patient data):
dark background with faint Rician noise, bright scalp, dark skull / CSF rim, brain
parenchyma with a grey-matter ribbon following meandering sulci, dark (fluid-suppressed)
lateral ventricles and interhemispheric fissure, a smooth bias field, and for the
"tumor" variant a bright irregular hyperintense lesion with surrounding oedema.
Anatomy is defined in continuous coordinates, so the same seed at 256 and 512 px gives
the same slice at two resolutions.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

DATA = Path(__file__).resolve().parent / "data"
BAD = DATA / "bad"


# ----------------------------------------------------------------------------- anatomy

def anatomy_params(seed: int, tumor: bool) -> dict:
    """All random shape parameters, drawn independently of output resolution."""
    rng = np.random.default_rng(seed)
    p = {
        "rx": rng.uniform(0.74, 0.80),
        "ry": rng.uniform(0.88, 0.94),
        "rot": rng.uniform(-0.12, 0.12),
        "cx": rng.uniform(-0.03, 0.03),
        "cy": rng.uniform(-0.02, 0.03),
        "outline": [(k, rng.uniform(0, 0.012), rng.uniform(0, 2 * np.pi)) for k in range(2, 6)],
        # sulcal field: random plane waves
        "waves": [
            (rng.uniform(26, 46), rng.uniform(0, 2 * np.pi), rng.uniform(0, 2 * np.pi), rng.uniform(0.6, 1.0))
            for _ in range(40)
        ],
        "wm_tex": [(rng.uniform(6, 14), rng.uniform(0, 2 * np.pi), rng.uniform(0, 2 * np.pi)) for _ in range(10)],
        "vent_sep": rng.uniform(0.09, 0.13),
        "vent_len": rng.uniform(0.22, 0.30),
        "vent_w": rng.uniform(0.045, 0.065),
        "vent_tilt": rng.uniform(0.15, 0.30),
        "bias": (rng.uniform(-0.1, 0.1), rng.uniform(-0.1, 0.1), rng.uniform(0, 2 * np.pi)),
        "wm": rng.uniform(0.40, 0.46),
        "gm": rng.uniform(0.55, 0.60),
        "tumor": None,
    }
    if tumor:
        side = 1 if rng.uniform() < 0.5 else -1
        p["tumor"] = {
            "x": side * rng.uniform(0.30, 0.40),
            "y": rng.uniform(-0.30, 0.20),
            "r": rng.uniform(0.12, 0.16),
            "harm": [(k, rng.uniform(0.04, 0.14), rng.uniform(0, 2 * np.pi)) for k in range(2, 8)],
            "tex": [(rng.uniform(30, 60), rng.uniform(0, 2 * np.pi), rng.uniform(0, 2 * np.pi)) for _ in range(8)],
        }
    return p


def smoothstep(e0, e1, x):
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def render(p: dict, width: int, height: int, noise_seed: int) -> np.ndarray:
    """Return float64 intensity image in [0,1] of shape (height, width)."""
    half = min(width, height) / 2.0
    px = 1.0 / half  # one pixel in normalised units
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    u = (xs + 0.5 - width / 2.0) / half - p["cx"]
    v = (ys + 0.5 - height / 2.0) / half - p["cy"]
    c, s = np.cos(p["rot"]), np.sin(p["rot"])
    u, v = c * u + s * v, -s * u + c * v  # head frame (v = anterior-posterior)

    theta = np.arctan2(v, u)
    mod = 1.0 + sum(a * np.cos(k * theta + ph) for k, a, ph in p["outline"])
    rho = np.sqrt((u / p["rx"]) ** 2 + (v / p["ry"]) ** 2) / mod
    e = 1.2 * px / p["rx"]  # soft-edge width ~1 pixel

    inside_head = 1 - smoothstep(1.0 - e, 1.0 + e, rho)
    inside_scalp_inner = 1 - smoothstep(0.955 - e, 0.955 + e, rho)
    inside_skull_inner = 1 - smoothstep(0.925 - e, 0.925 + e, rho)
    inside_brain = 1 - smoothstep(0.905 - e, 0.905 + e, rho)

    # sulcal field: zero-crossings of a sum of plane waves -> meandering curves
    F = np.zeros_like(u)
    for k, ang, ph, a in p["waves"]:
        F += a * np.cos(k * (u * np.cos(ang) + v * np.sin(ang)) + ph)
    F /= np.sqrt(0.5 * sum(w[3] ** 2 for w in p["waves"]))
    depth = smoothstep(0.50, 0.72, rho)  # sulci only in outer brain
    sulcus = np.exp(-((F / 0.20) ** 2)) * depth
    ribbon = np.maximum(np.exp(-((F / 0.75) ** 2)) * depth, smoothstep(0.78, 0.86, rho))

    wm_tex = sum(np.cos(k * (u * np.cos(a) + v * np.sin(a)) + ph) for k, a, ph in p["wm_tex"]) / np.sqrt(5.0)
    brain = p["wm"] + 0.025 * wm_tex + (p["gm"] - p["wm"]) * ribbon
    brain = brain * (1 - 0.8 * sulcus) + 0.10 * 0.8 * sulcus

    # deep grey nuclei: slightly brighter blobs lateral to ventricles
    for sx in (-1, 1):
        d = ((u - sx * 0.24) / 0.09) ** 2 + ((v - 0.05) / 0.14) ** 2
        brain += 0.06 * np.exp(-d * 2)

    # lateral ventricles (fluid suppressed -> dark) with slightly bright periventricular caps
    vent = np.zeros_like(u)
    caps = np.zeros_like(u)
    for sx in (-1, 1):
        t = sx * p["vent_tilt"]
        du, dv = u - sx * p["vent_sep"], v + 0.04
        ru, rv = np.cos(t) * du + np.sin(t) * dv, -np.sin(t) * du + np.cos(t) * dv
        ru = ru - sx * 0.35 * (rv ** 2)  # banana curvature
        d = np.sqrt((ru / p["vent_w"]) ** 2 + (rv / p["vent_len"]) ** 2)
        vent = np.maximum(vent, 1 - smoothstep(1 - 3 * px / p["vent_w"] * 0.3, 1 + 3 * px / p["vent_w"] * 0.3, d))
        caps = np.maximum(caps, np.exp(-((d - 1.15) / 0.12) ** 2) * smoothstep(0.5, 0.9, np.abs(rv) / p["vent_len"]))
    brain = brain + 0.08 * caps
    brain = brain * (1 - vent) + 0.07 * vent

    # interhemispheric fissure
    fiss = np.exp(-((u / (0.010 + 1.0 * px)) ** 2)) * smoothstep(0.30, 0.40, np.abs(v)) * smoothstep(0.2, 0.5, rho)
    brain = brain * (1 - 0.85 * fiss) + 0.08 * 0.85 * fiss

    # tumour: irregular bright core + heterogeneous texture + oedema halo
    tp = p["tumor"]
    if tp is not None:
        du, dv = u - tp["x"], v - tp["y"]
        tr = np.sqrt(du ** 2 + dv ** 2)
        tt = np.arctan2(dv, du)
        R = tp["r"] * (1 + sum(a * np.cos(k * tt + ph) for k, a, ph in tp["harm"]))
        core = 1 - smoothstep(R - 1.5 * px, R + 1.5 * px, tr)
        edema = np.exp(-((np.maximum(tr - 1.1 * R, 0) / (0.8 * tp["r"])) ** 2)) * (1 - core)
        tex = sum(np.cos(k * (du * np.cos(a) + dv * np.sin(a)) + ph) for k, a, ph in tp["tex"]) / np.sqrt(4.0)
        core_val = 0.90 + 0.05 * tex
        brain = brain * (1 - 0.55 * edema) + 0.72 * 0.55 * edema
        brain = brain * (1 - core) + core_val * core

    # bias field (smooth coil inhomogeneity)
    bx, by, bph = p["bias"]
    bias = 1 + bx * u + by * v + 0.04 * np.sin(2.1 * u + 1.3 * v + bph)

    img = np.zeros_like(u)
    scalp = 0.62 + 0.08 * np.cos(9 * theta + bph)
    img = img * (1 - inside_head) + scalp * inside_head
    img = img * (1 - inside_scalp_inner) + 0.06 * inside_scalp_inner   # skull: dark
    img = img * (1 - inside_skull_inner) + 0.12 * inside_skull_inner   # subarachnoid CSF
    img = img * (1 - inside_brain) + brain * inside_brain
    img = img * bias

    # Rician noise (magnitude of complex Gaussian)
    nrng = np.random.default_rng(noise_seed)
    sigma = 0.022
    n1 = nrng.normal(0, sigma, img.shape)
    n2 = nrng.normal(0, sigma, img.shape)
    img = np.sqrt((img + n1) ** 2 + n2 ** 2)
    return np.clip(img, 0, 1)


def to_u8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


def slice_image(seed: int, w: int, h: int, tumor: bool = False) -> np.ndarray:
    p = anatomy_params(seed, tumor)
    return to_u8(render(p, w, h, noise_seed=seed * 1000 + w * 7 + h * 13 + int(tumor)))


def tint(gray: np.ndarray, rgb_gain=(1.00, 0.94, 0.86), rgb_off=(0, 3, 8)) -> np.ndarray:
    g = gray.astype(np.float64)
    chans = [np.clip(np.rint(g * k + o), 0, 255) for k, o in zip(rgb_gain, rgb_off)]
    return np.stack(chans, axis=2).astype(np.uint8)


# ------------------------------------------------------------------------------ writers

def save_png(arr: np.ndarray, path: Path) -> None:
    mode = "L" if arr.ndim == 2 else "RGB"
    Image.fromarray(arr, mode).save(path, format="PNG", optimize=True)


def save_jpeg(arr: np.ndarray, path: Path, quality: int = 90) -> None:
    mode = "L" if arr.ndim == 2 else "RGB"
    Image.fromarray(arr, mode).save(path, format="JPEG", quality=quality, progressive=False, optimize=False)


def png_chunk(ctype: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + ctype + data + struct.pack(">I", zlib.crc32(ctype + data) & 0xFFFFFFFF)


def decompression_bomb_png(width: int, height: int) -> bytes:
    """1-bit grayscale PNG of all-zero rows, built by hand with zlib (streamed)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, colour type 0
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte 0 + packed zero pixels
    comp = zlib.compressobj(9)
    parts = []
    rows_per_chunk = 256
    block = row * rows_per_chunk
    left = height
    while left > 0:
        n = min(rows_per_chunk, left)
        parts.append(comp.compress(block if n == rows_per_chunk else row * n))
        left -= n
    parts.append(comp.flush())
    idat = b"".join(parts)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def main() -> None:
    DATA.mkdir(parents=True, exist_ok=True)
    BAD.mkdir(parents=True, exist_ok=True)

    seeds = {"a": 11, "b": 23, "c": 37}
    g256 = {k: slice_image(s, 256, 256) for k, s in seeds.items()}
    for k, arr in g256.items():
        save_png(arr, DATA / f"flair_256_{k}.png")
    save_png(slice_image(seeds["a"], 256, 256, tumor=True), DATA / "flair_256_tumor.png")
    save_jpeg(g256["a"], DATA / "flair_256_a.jpg")

    g512 = slice_image(seeds["a"], 512, 512)
    save_png(g512, DATA / "flair_512_a.png")
    save_jpeg(g512, DATA / "flair_512_a.jpg")
    save_png(tint(slice_image(seeds["b"], 512, 512)), DATA / "flair_512_rgb.png")
    save_png(tint(slice_image(seeds["c"], 300, 220), (0.95, 1.0, 0.90), (6, 0, 2)), DATA / "flair_300x220.png")

    # ---- bad inputs
    jpg = (DATA / "flair_512_a.jpg").read_bytes()
    (BAD / "truncated.jpg").write_bytes(jpg[: int(len(jpg) * 0.6)])

    png = bytearray((DATA / "flair_256_a.png").read_bytes())
    assert png[12:16] == b"IHDR"
    png[29] ^= 0xFF  # first byte of the IHDR CRC (8 sig + 4 len + 4 type + 13 data)
    (BAD / "bad_crc.png").write_bytes(bytes(png))

    (BAD / "not_an_image.bin").write_bytes(
        b"This is not an image. It is plain ASCII text pretending to be an MRI slice.\n"
        b"Decoders must reject it cleanly (INVALID_ARGUMENT), not panic.\n"
    )
    (BAD / "huge_dimensions.png").write_bytes(decompression_bomb_png(20000, 20000))

    for f in sorted(DATA.rglob("*")):
        if f.is_file():
            print(f"{f.stat().st_size:>9}  {f.relative_to(DATA)}")


if __name__ == "__main__":
    main()
