#!/usr/bin/env python3
"""Independent reference for resampling one plane onto another's pixel grid in patient
coordinates (issue 24), with numpy and scipy.ndimage.map_coordinates (order 1: bilinear).

Usage:  resample_reference.py SPEC.json
SPEC: {"target": PLANE, "sources": [PLANE + {"values": [...] row-major}, ...]}, where PLANE is
{"origin": [x, y, z], "orientation": [6 direction cosines], "spacing": [row_mm, column_mm],
"rows": R, "columns": C} with DICOM's conventions (the first three cosines: along a row, spaced by
the column spacing). Prints a JSON list: per source, the target grid's values (row-major); a
point more than 0.01 pixel outside the source's pixel centres is 0.
"""

from __future__ import annotations

import json
import sys

import numpy as np
from scipy.ndimage import map_coordinates


def axes(plane: dict):
    o = np.array(plane["orientation"], dtype=float)
    row, col = o[:3] / np.linalg.norm(o[:3]), o[3:] / np.linalg.norm(o[3:])
    return np.array(plane["origin"], dtype=float), row, col, plane["spacing"]


def main() -> None:
    spec = json.load(open(sys.argv[1]))
    target = spec["target"]
    t_origin, t_row, t_col, (t_dr, t_dc) = axes(target)
    rr, cc = np.meshgrid(np.arange(target["rows"]), np.arange(target["columns"]), indexing="ij")
    points = t_origin + cc[..., None] * t_dc * t_row + rr[..., None] * t_dr * t_col
    out = []
    for source in spec["sources"]:
        s_origin, s_row, s_col, (s_dr, s_dc) = axes(source)
        values = np.array(source["values"], dtype=np.float64).reshape(source["rows"], source["columns"])
        rel = points - s_origin
        si, sj = rel @ s_col / s_dr, rel @ s_row / s_dc
        sampled = map_coordinates(values, [si, sj], order=1, mode="nearest")
        edge = 0.01
        outside = (si < -edge) | (sj < -edge) | (si > source["rows"] - 1 + edge) | (sj > source["columns"] - 1 + edge)
        sampled[outside] = 0.0
        out.append(sampled.reshape(-1).tolist())
    print(json.dumps(out))


if __name__ == "__main__":
    main()
