#!/usr/bin/env python3
"""The DICOM benchmark's two Python halves (benches/dicom.rs runs them; not a test):

    dicom_pydicom.py make OUT            512x512 16-bit MR slices in three transfer syntaxes
    dicom_pydicom.py time FILE... --iterations N
                                         pydicom + numpy + Pillow doing the service's steps
                                         to the model tensor; prints {"file": ms_per_image}

The steps are the ones the service takes with the default model's input (window = "header"
here, so both sides window): read, decode, Modality LUT, VOI window (pydicom's apply_voi_lut),
8 bit, RGB, bilinear resize to 256x256 (Pillow), ImageNet normalisation to float32 NCHW.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, MRImageStorage

REPO = Path(__file__).resolve().parent.parent
MEAN = np.asarray([0.485, 0.456, 0.406], dtype=np.float32).reshape(3, 1, 1)
STD = np.asarray([0.229, 0.224, 0.225], dtype=np.float32).reshape(3, 1, 1)


def make(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    g = np.asarray(Image.open(REPO / "tests/data/flair_512_a.png").convert("L"), dtype=np.float64)
    rng = np.random.default_rng(512)
    pixels = np.clip(np.round(g * 14 + rng.normal(0, 8, g.shape)), 0, 4095).astype(np.uint16)
    for name, syntax in [
        ("uncompressed", ExplicitVRLittleEndian),
        ("jpegls", JPEGLSLossless),
        ("j2k", JPEG2000Lossless),
    ]:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = f"1.2.826.0.1.3680043.10.1234.77.{len(name)}"
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(out / f"{name}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = "1.2.826.0.1.3680043.10.1234.77"
        ds.SeriesInstanceUID = "1.2.826.0.1.3680043.10.1234.77.1"
        ds.Modality = "MR"
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        ds.PixelRepresentation = 0
        ds.RescaleSlope, ds.RescaleIntercept = 1, 0
        ds.WindowCenter, ds.WindowWidth = 1600, 3000
        ds.PixelData = pixels.tobytes()
        if syntax != ExplicitVRLittleEndian:
            ds.compress(syntax, generate_instance_uid=False)
        ds.save_as(out / f"{name}.dcm", enforce_file_format=True)


def tensor(path: str) -> np.ndarray:
    ds = pydicom.dcmread(path)
    arr = ds.pixel_array
    x = apply_modality_lut(arr, ds).astype(np.float64)
    y = apply_voi_lut(x, ds)
    bits = int(ds.BitsStored)
    y_min, y_max = 0.0, 2.0**bits - 1
    slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
    y_min, y_max = y_min * slope + intercept, y_max * slope + intercept
    t = np.clip((y - y_min) / (y_max - y_min), 0.0, 1.0)
    u8 = np.floor(t * 255.0 + 0.5).astype(np.uint8)
    img = Image.fromarray(u8, mode="L").convert("RGB").resize((256, 256), Image.Resampling.BILINEAR)
    x = np.asarray(img, dtype=np.float32).transpose(2, 0, 1)
    return np.ascontiguousarray((x / np.float32(255.0) - MEAN) / STD, dtype=np.float32)


def time_files(files: list[str], iterations: int) -> None:
    result = {}
    for f in files:
        tensor(f)  # warm-up (imports, plugin discovery)
        samples = []
        for _ in range(iterations):
            start = time.perf_counter()
            tensor(f)
            samples.append(time.perf_counter() - start)
        result[Path(f).name] = 1000.0 * float(np.median(samples))
    print(json.dumps(result))


def main() -> int:
    if sys.argv[1] == "make":
        make(Path(sys.argv[2]))
    elif sys.argv[1] == "time":
        iterations = int(sys.argv[sys.argv.index("--iterations") + 1])
        files = [a for a in sys.argv[2:] if a.endswith(".dcm")]
        time_files(files, iterations)
    else:
        raise SystemExit(__doc__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
