#!/usr/bin/env python3
"""The study job as a research team would script it (issue 24's comparison): pydicom reads every
instance, groups the series and names them from their descriptions, sorts each by position,
windows each slice min-max to 8 bits and normalises as the U-Net's model.toml says, runs
onnxruntime slice by slice, takes the argmax, measures the volumes with numpy, and writes a DICOM
Segmentation with highdicom (BINARY, one segment per label and region).

Usage:  study_python.py STUDY_DIR MODEL.onnx OUT.dcm
Prints JSON: wall seconds per stage, peak RSS, voxels per label.
"""

from __future__ import annotations

import glob
import json
import os
import resource
import sys
import time

import highdicom as hd
import numpy as np
import onnxruntime as ort
import pydicom
from pydicom.sr.codedict import codes

LABELS = ["background", "non_enhancing_core", "edema", "enhancing"]
REGIONS = {"whole_tumor": [1, 2, 3], "tumor_core": [1, 3], "enhancing_tumor": [3]}
CHANNELS = ["FLAIR", "T1c", "T2"]


def sequence(ds) -> str:
    d = str(ds.get("SeriesDescription", "")).upper()
    if "FLAIR" in d:
        return "FLAIR"
    if "T1" in d and any(w in d for w in ("POST", "GD", "+C")):
        return "T1c"
    if "T2" in d:
        return "T2"
    return "?"


def levels(ds) -> np.ndarray:
    x = ds.pixel_array.astype(np.float64)
    lo, hi = x.min(), x.max()
    t = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
    return np.floor(t * 255 + 0.5)


def main() -> None:
    study, model, out = sys.argv[1], sys.argv[2], sys.argv[3]
    times = {}
    t0 = time.perf_counter()
    instances = [pydicom.dcmread(p) for p in sorted(glob.glob(os.path.join(study, "**", "*.dcm"), recursive=True))]
    series: dict[str, list] = {}
    for ds in instances:
        series.setdefault(sequence(ds), []).append(ds)
    for name in CHANNELS:
        series[name].sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    t1 = time.perf_counter()
    times["read_and_group"] = t1 - t0

    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    masks = []
    for k in range(len(series["FLAIR"])):
        x = np.stack([levels(series[c][k]) for c in CHANNELS]).astype(np.float32)
        x = (x / 255.0 - 0.5) / 0.25
        logits = session.run(["logits"], {"input": x[None]})[0]
        masks.append(logits[0].argmax(axis=0).astype(np.uint8))
    labels = np.stack(masks)
    t2 = time.perf_counter()
    times["preprocess_and_inference"] = t2 - t1

    spacing = [float(v) for v in series["FLAIR"][0].PixelSpacing]
    depth = abs(float(series["FLAIR"][1].ImagePositionPatient[2]) - float(series["FLAIR"][0].ImagePositionPatient[2]))
    voxel_ml = spacing[0] * spacing[1] * depth / 1000.0
    voxels = {name: int((labels == k).sum()) for k, name in enumerate(LABELS)}
    for name, members in REGIONS.items():
        voxels[name] = int(np.isin(labels, members).sum())
    volumes = {name: n * voxel_ml for name, n in voxels.items()}
    t3 = time.perf_counter()
    times["measure"] = t3 - t2

    segments = []
    channels = [labels == k for k in range(1, len(LABELS))] + [np.isin(labels, m) for m in REGIONS.values()]
    names = LABELS[1:] + list(REGIONS)
    algorithm = hd.AlgorithmIdentificationSequence(
        name="brain-tumor-unet", version="1", family=codes.cid7162.ArtificialIntelligence
    )
    for number, name in enumerate(names, start=1):
        segments.append(hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=name,
            segmented_property_category=hd.sr.CodedConcept("49755003", "SCT", "Morphologically Altered Structure"),
            segmented_property_type=hd.sr.CodedConcept("108369006", "SCT", "Neoplasm"),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        ))
    pixel_array = np.stack(channels, axis=-1).astype(np.uint8)
    seg = hd.seg.Segmentation(
        source_images=series["FLAIR"],
        pixel_array=pixel_array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments,
        series_instance_uid=hd.UID(),
        series_number=100,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="research script",
        manufacturer_model_name="brain-tumor-unet",
        software_versions="1",
        device_serial_number="1",
    )
    seg.save_as(out)
    t4 = time.perf_counter()
    times["segmentation_object"] = t4 - t3
    times["total"] = t4 - t0
    print(json.dumps({
        "seconds": times,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "voxels": voxels,
        "volumes_ml": volumes,
    }))


if __name__ == "__main__":
    main()
