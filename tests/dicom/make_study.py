#!/usr/bin/env python3
"""Write a synthetic MR study with pydicom: a sphere phantom seen by several series.

Usage:  make_study.py OUT_DIR SPEC_JSON

SPEC_JSON (a JSON text):
  {
    "study_uid": "...", "patient_id": "...", "frame_of_reference_uid": "...",
    "sphere": {"center": [x, y, z], "radius": r, "inside": 900, "outside": 100},
    "series": [
      {"uid": "...", "description": "AX FLAIR", "rows": 64, "columns": 64,
       "spacing": [row_mm, column_mm], "origin": [x, y, z], "slices": 48, "step": 1.0,
       "orientation": [1, 0, 0, 0, 1, 0],          (optional; default axial)
       "frame_of_reference_uid": "...",            (optional; default the study's)
       "patient_id": "...", "study_uid": "...",     (optional; default the study's)
       "silent": true}                             (optional: no echo/repetition time)
    ]
  }

Each instance is MR Image Storage, explicit VR little endian, 16-bit unsigned (12 stored), one
slice: stored value `inside` where the pixel centre lies in the sphere, else `outside`. Slice k of
a series is at origin + k * step along the slice normal. Files are OUT_DIR/<series>/<k>.dcm.
Deterministic: the same spec writes the same bytes.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage


def instance(spec: dict, series: dict, k: int) -> Dataset:
    rows, columns = series["rows"], series["columns"]
    o = np.array(series.get("orientation", [1, 0, 0, 0, 1, 0]), dtype=float)
    row_dir, col_dir = o[:3], o[3:]
    normal = np.cross(row_dir, col_dir)
    origin = np.array(series["origin"], dtype=float) + k * series["step"] * normal
    dr, dc = series["spacing"]
    rr, cc = np.meshgrid(np.arange(rows), np.arange(columns), indexing="ij")
    points = origin + cc[..., None] * dc * row_dir + rr[..., None] * dr * col_dir
    sphere = spec["sphere"]
    inside = np.sum((points - np.array(sphere["center"])) ** 2, axis=-1) <= sphere["radius"] ** 2
    pixels = np.where(inside, sphere["inside"], sphere["outside"]).astype(np.uint16)

    sop_uid = f"{series['uid']}.{k + 1}"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.10.1087.1"
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = "20261201"
    ds.StudyTime = "120000"
    ds.AccessionNumber = "ACC1"
    ds.Modality = "MR"
    ds.Manufacturer = "BrainAI test phantom"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "Phantom study"
    ds.SeriesDescription = series["description"]
    ds.PatientName = "Phantom^Sphere"
    ds.PatientID = series.get("patient_id", spec["patient_id"])
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = series.get("study_uid", spec["study_uid"])
    ds.SeriesInstanceUID = series["uid"]
    ds.StudyID = "1"
    ds.SeriesNumber = series.get("number", 1)
    ds.InstanceNumber = k + 1
    ds.FrameOfReferenceUID = series.get("frame_of_reference_uid", spec["frame_of_reference_uid"])
    ds.PositionReferenceIndicator = ""
    ds.ImagePositionPatient = [float(f"{v:.6f}") for v in origin]
    ds.ImageOrientationPatient = [float(f"{v:.6f}") for v in o]
    ds.PixelSpacing = [dr, dc]
    ds.SliceThickness = series["step"]
    if not series.get("silent"):
        # Acquisition parameters the sequence rules read (a T2 by its times); a "silent" series
        # has none, so only its description (or the caller) can name it.
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.EchoTime = 90
        ds.RepetitionTime = 4000
    ds.MRAcquisitionType = "2D"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = 500
    ds.WindowWidth = 1000
    ds.PixelData = pixels.tobytes()
    return ds


def main() -> None:
    out, spec = sys.argv[1], json.loads(sys.argv[2])
    for series in spec["series"]:
        folder = os.path.join(out, series["uid"])
        os.makedirs(folder, exist_ok=True)
        for k in range(series["slices"]):
            ds = instance(spec, series, k)
            ds.save_as(os.path.join(folder, f"{k:04d}.dcm"), enforce_file_format=True)


if __name__ == "__main__":
    main()
