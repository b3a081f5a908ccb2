#!/usr/bin/env python3
"""Independent reference for aligning one series onto another (issue 24), with pydicom, numpy
and scipy.ndimage.map_coordinates: for each slice of the reference series, the other series'
slice nearest along the reference normal (within half its slice spacing), its stored values
windowed as the seg-study test model declares (LINEAR, center 500, width 1000, then
floor(t * 255 + 0.5)), sampled bilinearly at the reference pixel centres projected onto its
plane (points outside its pixel centres are 0), then thresholded as seg-study does (tumor where
the level is above 127).

With --linear, a reference slice between two slices of the other series takes their linear
blend by distance along the normal (each resampled as above) instead of the nearest; at the ends
the nearest within half a spacing.

Usage:  study_reference.py REFERENCE_DIR OTHER_DIR [--linear]
Prints JSON: {"<reference SOP Instance UID>": "<hex of the 0/1 mask, row-major>" | null}, null
where the other series has no slice within half its spacing.
"""

from __future__ import annotations

import glob
import json
import os
import sys

import numpy as np
import pydicom
from scipy.ndimage import map_coordinates


def read(folder: str) -> list:
    return [pydicom.dcmread(p) for p in sorted(glob.glob(os.path.join(folder, "*.dcm")))]


def plane(ds):
    o = np.array(ds.ImageOrientationPatient, dtype=float)
    return np.array(ds.ImagePositionPatient, dtype=float), o[:3], o[3:], [float(v) for v in ds.PixelSpacing]


def levels(ds) -> np.ndarray:
    x = ds.pixel_array.astype(np.float64)
    c, w = 500.0, 1000.0
    t = np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0.0, 1.0)
    return np.floor(t * 255 + 0.5)


def sample(ref, src) -> np.ndarray:
    """`src`'s levels at `ref`'s pixel centres projected onto `src`'s plane (0 outside)."""
    r_origin, r_row, r_col, (r_dr, r_dc) = plane(ref)
    s_origin, s_row, s_col, (s_dr, s_dc) = plane(src)
    rr, cc = np.meshgrid(np.arange(ref.Rows), np.arange(ref.Columns), indexing="ij")
    points = r_origin + cc[..., None] * r_dc * r_row + rr[..., None] * r_dr * r_col
    rel = points - s_origin
    si = rel @ s_col / s_dr
    sj = rel @ s_row / s_dc
    values = map_coordinates(levels(src), [si, sj], order=1, mode="nearest")
    edge = 0.01
    outside = (si < -edge) | (sj < -edge) | (si > src.Rows - 1 + edge) | (sj > src.Columns - 1 + edge)
    values[outside] = 0.0
    return values


def main() -> None:
    reference, other = read(sys.argv[1]), read(sys.argv[2])
    linear = "--linear" in sys.argv[3:]
    origin, row, col, _ = plane(reference[0])
    normal = np.cross(row, col)
    along = np.array([np.dot(plane(d)[0], normal) for d in other])
    order = np.argsort(along)
    steps = np.diff(along[order])
    half = (np.sort(steps)[len(steps) // 2] if len(steps) else float(other[0].SliceThickness)) / 2 + 1e-6
    out = {}
    for ref in reference:
        r_origin, r_row, r_col, (r_dr, r_dc) = plane(ref)
        d = np.dot(r_origin, normal)
        k = int(np.argmin(np.abs(along - d)))
        if abs(along[k] - d) > half:
            out[ref.SOPInstanceUID] = None
            continue
        values = None
        if linear:
            after = [i for i in order if along[i] >= d]
            before = [i for i in order if along[i] < d]
            if after and before:
                a, b = before[-1], after[0]
                w = (d - along[a]) / (along[b] - along[a])
                values = (1 - w) * sample(ref, other[a]) + w * sample(ref, other[b])
        if values is None:
            values = sample(ref, other[k])
        mask = (values > 127).astype(np.uint8)
        out[ref.SOPInstanceUID] = mask.tobytes().hex()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
