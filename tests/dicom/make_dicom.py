#!/usr/bin/env python3
"""Deterministic generator of the DICOM test files in tests/data/dicom/ (and bad/).

Run from the repository root with the project venv (after
`.venv/bin/pip install -r tests/dicom/requirements.txt`):

    .venv/bin/python tests/dicom/make_dicom.py

Every file is synthetic (no patient data; the "PHI" in phi.dcm is invented) and byte-identical
on every run with the pinned venv and Debian 12's dcmtk 3.6.7: fixed numpy seeds, fixed UIDs
under the made-up root 1.2.826.0.1.3680043.10.1234., fixed dates, no timestamps.

Pixel content: tests/data/flair_256_a.png (b and c for the extra frames of multiframe.dcm),
centre-cropped to 256x215, BOX-resized to 75 columns x 63 rows in float, scaled by 18 to
12-bit values (66..3261) plus Gaussian noise (sigma 6, seed 20240611), rounded
and clipped to 0..4095.  75x63 is deliberately non-square and odd: an 8-bit frame is 4725 bytes,
so 8-bit Pixel Data carries one trailing pad byte.

Which tool made which file
--------------------------
pydicom 3.0.2 (this script) wrote, as native data:
    ts_implicit_le, ts_explicit_le, ts_deflated (pydicom's deflate writer, zlib),
    signed_rescale, un_attributes, bits_stored_garbage, signed_12bit, mono1, padding, window_linear_exact,
    window_sigmoid, window_multi, voi_lut_seq, modality_lut_seq, no_window, mono8, rgb,
    rgb_planar, ybr_full, multiframe, phi,
    bad/no_pixel_data, bad/dims_overflow, bad/bits_stored_gt_allocated, bad/bits_allocated_odd
pydicom 3.0.2 Dataset.compress():
    ts_rle            (pydicom's own RLE encoder, encoding_plugin="pydicom")
    ts_jpegls_lossless, ts_jpegls_near (pyjpegls 1.5.1 = CharLS; NEAR=2)
    ts_j2k_lossless, ts_j2k_lossy      (pylibjpeg-openjpeg 2.6.0 = OpenJPEG; lossy: j2k_psnr=[60])
dcmtk 3.6.7 (Debian), each from a pydicom-written explicit VR LE file with its own SOP Instance
UID (+un keeps it; dcmtk writes its own ImplementationClassUID), output not edited afterwards:
    ts_explicit_be            dcmconv +tb                 (explicit VR big endian)
    ts_jpeg_baseline          dcmcjpeg +eb +q 90 +sr +un  (8-bit input; +sr: no min-max shift)
    ts_jpeg_extended          dcmcjpeg +ee +q 95 +sr +un  (12-bit, process 4)
    ts_jpeg_lossless_p14      dcmcjpeg +el +sv 6 +un      (process 14, predictor 6)
    ts_jpeg_lossless_sv1      dcmcjpeg +e1 +un            (process 14, selection value 1)
Hand-built bytes (this script; file meta and plain elements serialised by pydicom):
    bad/not_dicom, bad/truncated (cut of ts_explicit_le), bad/huge_length,
    bad/deflate_bomb (raw deflate written with zlib level 9), bad/deep_nesting
pydicom with encapsulate(): bad/unsupported_ts

The script checks that every lossless file decodes (pydicom) to exactly the pixel values of
ts_explicit_le.dcm, that every semantic file decodes to what was intended and that pydicom
refuses every bad file but the deflate bomb, and writes tests/data/dicom/manifest.json
(tests/data/dicom/README.md is hand-written and left alone).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.pixels import convert_color_space
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    MPEG2MPML,
    RLELossless,
)

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "data" / "dicom"
BAD = OUT / "bad"
SRC = ROOT / "tests" / "data"

UID_ROOT = "1.2.826.0.1.3680043.10.1234."
IMPL_UID = UID_ROOT + "0.1"
IMPL_NAME = "BRAINAI_TESTGEN"
STUDY_UID = UID_ROOT + "1"
SERIES_UID = UID_ROOT + "1.1"
FOR_UID = UID_ROOT + "1.2"
MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"

ROWS, COLS = 63, 75
SEED = 20240611
WINDOW = (1400, 2800)  # centre, width for the 12-bit unsigned files

MANIFEST: list[dict] = []
_instance = 0


# --------------------------------------------------------------------------------------------
# pixel content
# --------------------------------------------------------------------------------------------


def source_gray(name: str) -> np.ndarray:
    """The synthetic FLAIR PNG cropped to 256x215 (centre) and BOX-resized to COLSxROWS, float."""
    with Image.open(SRC / name) as im:
        g = np.asarray(im.convert("L"), dtype=np.float32)
    top = (256 - 215) // 2
    crop = Image.fromarray(g[top : top + 215, :], mode="F")
    small = crop.resize((COLS, ROWS), resample=Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float64)


def to12(gray: np.ndarray, seed: int, gain: float = 18.0, offset: float = 0.0,
         lo: int = 0, hi: int = 4095) -> np.ndarray:
    rng = np.random.default_rng(seed)
    v = gray * gain + offset + rng.normal(0.0, 6.0, size=gray.shape)
    return np.clip(np.floor(v + 0.5), lo, hi).astype(np.int32)


def background_mask(gray: np.ndarray, thresh: float = 12.0) -> np.ndarray:
    """Dark pixels connected to the image border (outside the head), 4-connectivity flood fill."""
    dark = gray < thresh
    h, w = dark.shape
    mask = np.zeros_like(dark)
    stack = [(r, c) for r in range(h) for c in (0, w - 1)] + [(r, c) for c in range(w) for r in (0, h - 1)]
    while stack:
        r, c = stack.pop()
        if 0 <= r < h and 0 <= c < w and dark[r, c] and not mask[r, c]:
            mask[r, c] = True
            stack.extend(((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)))
    return mask


def tint(gray8: np.ndarray) -> np.ndarray:
    """8-bit gray -> RGB with channels that differ (so a channel swap is visible)."""
    g = gray8.astype(np.float64)
    rgb = np.stack([g, 0.92 * g + 10.0, 0.80 * g + 25.0], axis=-1)
    return np.clip(np.floor(rgb + 0.5), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# datasets
# --------------------------------------------------------------------------------------------


def next_sop_uid() -> tuple[str, int]:
    global _instance
    _instance += 1
    return f"{UID_ROOT}1.1.{_instance}", _instance


def base_ds(ts: str, *, rows=ROWS, cols=COLS, photometric="MONOCHROME2", bits_allocated=16,
            bits_stored=12, pixel_rep=0, spp=1, frames: int | None = None,
            sop_class: str = MR_STORAGE, rescale=(1, 0), window=WINDOW,
            instance: int | None = None) -> FileDataset:
    # A fixed instance number keeps the counter (and every other file's UID) where it was.
    sop_uid, inst = next_sop_uid() if instance is None else (f"{UID_ROOT}1.1.{instance}", instance)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ts
    meta.ImplementationClassUID = IMPL_UID
    meta.ImplementationVersionName = IMPL_NAME
    ds = FileDataset("", Dataset(), file_meta=meta, preamble=b"\0" * 128)

    ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
    ds.InstanceCreationDate = "20240315"
    ds.InstanceCreationTime = "101500"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = "20240315"
    ds.SeriesDate = "20240315"
    ds.ContentDate = "20240315"
    ds.StudyTime = "101500"
    ds.SeriesTime = "101500"
    ds.ContentTime = "101500"
    ds.AccessionNumber = ""
    ds.Modality = "MR"
    ds.Manufacturer = "BrainAI synthetic test data"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "BRAIN"
    ds.SeriesDescription = "AX FLAIR"
    ds.PatientName = "Anon^Test"
    ds.PatientID = "ANON-0001"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.BodyPartExamined = "HEAD"
    ds.ScanningSequence = ["SE", "IR"]
    ds.SequenceVariant = ["SK", "SP", "MP"]
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "2D"
    ds.SliceThickness = "5"
    ds.RepetitionTime = "9000"
    ds.EchoTime = "120"
    ds.InversionTime = "2500"
    ds.ImagingFrequency = "127.7"
    ds.ImagedNucleus = "1H"
    ds.MagneticFieldStrength = "3"
    ds.EchoTrainLength = 16
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = STUDY_UID
    ds.SeriesInstanceUID = SERIES_UID
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = inst
    ds.ImagePositionPatient = ["-120", "-100.8", "0"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = FOR_UID
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = spp
    ds.PhotometricInterpretation = photometric
    if spp > 1:
        ds.PlanarConfiguration = 0
    if frames is not None:
        ds.NumberOfFrames = frames
    ds.Rows = rows
    ds.Columns = cols
    ds.PixelSpacing = ["3.2", "3.2"]
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = pixel_rep
    if window is not None:
        ds.WindowCenter = fmt_ds(window[0])
        ds.WindowWidth = fmt_ds(window[1])
    if rescale is not None:
        ds.RescaleIntercept = fmt_ds(rescale[1])
        ds.RescaleSlope = fmt_ds(rescale[0])
    return ds


def fmt_ds(v) -> str:
    if isinstance(v, (list, tuple)):
        return [fmt_ds(x) for x in v]
    return str(v)


def set_native(ds: Dataset, arr: np.ndarray) -> None:
    """Native Pixel Data from an integer array (little endian words for 16-bit)."""
    if ds.BitsAllocated == 16:
        dt = "<i2" if ds.PixelRepresentation == 1 else "<u2"
        data = np.ascontiguousarray(arr).astype(dt).tobytes()
        ds.add_new(0x7FE00010, "OW", data)
    elif ds.BitsAllocated == 8:
        data = np.ascontiguousarray(arr).astype(np.uint8).tobytes()
        ds.add_new(0x7FE00010, "OB", data)
    else:
        raise ValueError(ds.BitsAllocated)


def save(ds: Dataset, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def record(path: Path, *, ts: str | None, description: str, frames: int | None,
           photometric: str | None, lossless: bool, expect: str, notes: str | None = None) -> None:
    entry = {
        "file": path.relative_to(OUT).as_posix(),
        "transfer_syntax": ts,
        "description": description,
        "frames": frames,
        "photometric": photometric,
        "lossless": lossless,
        "expect": expect,
    }
    if notes:
        entry["notes"] = notes
    MANIFEST.append(entry)


def run(cmd: list[str]) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")


def dataset_bytes(ds: Dataset, little_endian=True, implicit_vr=False) -> bytes:
    """Serialise the elements of ds (no preamble, no file meta)."""
    fp = DicomBytesIO()
    fp.is_little_endian = little_endian
    fp.is_implicit_VR = implicit_vr
    write_dataset(fp, ds)
    return fp.getvalue()


def meta_bytes(ds: FileDataset) -> bytes:
    """128-byte preamble + 'DICM' + the group-2 file meta information."""
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    fp.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(fp, ds.file_meta, enforce_standard=True)
    return fp.getvalue()


def split_at(ds: Dataset, group: int) -> tuple[Dataset, Dataset]:
    """(elements with tag group < group, elements with group >= group)."""
    a, b = Dataset(), Dataset()
    for elem in ds:
        (a if elem.tag.group < group else b).add(elem)
    return a, b


def elem_header_ex(tag: int, vr: str, length: int) -> bytes:
    """Explicit VR little endian element header."""
    g, e = tag >> 16, tag & 0xFFFF
    if vr in ("OB", "OW", "OF", "OD", "OL", "OV", "SQ", "UC", "UR", "UT", "UN"):
        return struct.pack("<HH2sHI", g, e, vr.encode(), 0, length)
    return struct.pack("<HH2sH", g, e, vr.encode(), length)


def lo_elem(tag: int, text: str) -> bytes:
    b = text.encode()
    if len(b) % 2:
        b += b" "
    return elem_header_ex(tag, "LO", len(b)) + b


def uid_bytes(uid: str) -> bytes:
    """A UID value as written: ASCII, padded to even length with NUL."""
    b = uid.encode()
    return b + b"\0" * (len(b) % 2)


def to_un(path: Path, keywords: list[str]) -> None:
    """Rewrites the named top-level elements of an explicit VR little-endian file (no sequences)
    with VR UN: the 12-byte header, the value bytes unchanged."""
    tags = {pydicom.datadict.tag_for_keyword(k) for k in keywords}
    data = path.read_bytes()
    (group_length,) = struct.unpack("<I", data[140:144])
    pos = start = 144 + group_length
    out = bytearray(data[:start])
    seen = set()
    while pos < len(data):
        g, e, vr = *struct.unpack("<HH", data[pos:pos + 4]), data[pos + 4:pos + 6].decode()
        if vr in ("OB", "OW", "OF", "OD", "OL", "OV", "SQ", "UC", "UR", "UT", "UN"):
            (n,) = struct.unpack("<I", data[pos + 8:pos + 12])
            head = 12
        else:
            (n,) = struct.unpack("<H", data[pos + 6:pos + 8])
            head = 8
        assert vr != "SQ" and n != 0xFFFFFFFF, (g, e)
        value = data[pos + head:pos + head + n]
        if (g << 16 | e) in tags:
            out += struct.pack("<HH2sHI", g, e, b"UN", 0, n) + value
            seen.add(g << 16 | e)
        else:
            out += data[pos:pos + head + n]
        pos += head + n
    assert seen == tags, tags - seen
    path.write_bytes(bytes(out))


def decoded(path: Path) -> np.ndarray:
    return pydicom.dcmread(path).pixel_array


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def main() -> int:
    # remove what an earlier run wrote (README.md is hand-written and stays)
    if BAD.exists():
        shutil.rmtree(BAD)
    for old in [*OUT.glob("*.dcm"), OUT / "manifest.json"]:
        old.unlink(missing_ok=True)
    BAD.mkdir(parents=True)

    gray_a = source_gray("flair_256_a.png")
    img12 = to12(gray_a, SEED)  # the reference 12-bit frame, values 0..4095
    assert 0 <= img12.min() and img12.max() <= 4095

    # ---------------------------------------------------------------- transfer syntaxes
    native_ts = [
        ("ts_implicit_le.dcm", ImplicitVRLittleEndian, "implicit VR little endian"),
        ("ts_explicit_le.dcm", ExplicitVRLittleEndian, "explicit VR little endian"),
        ("ts_deflated.dcm", DeflatedExplicitVRLittleEndian,
         "deflated explicit VR little endian (pydicom, zlib raw deflate)"),
    ]
    for name, ts, desc in native_ts:
        ds = base_ds(ts)
        set_native(ds, img12)
        save(ds, OUT / name)
        record(OUT / name, ts=ts, description=f"{desc}; 16-bit MONOCHROME2, BitsStored 12, "
               f"window {WINDOW[0]}/{WINDOW[1]}", frames=1, photometric="MONOCHROME2",
               lossless=True, expect="ok")
    ref = OUT / "ts_explicit_le.dcm"
    ref_px = decoded(ref)
    assert np.array_equal(ref_px, img12), "explicit LE does not round-trip"

    with tempfile.TemporaryDirectory() as tmpd:
        tmp = Path(tmpd)

        def fresh_source(name: str) -> Path:
            """An explicit VR LE copy of ts_explicit_le with its own SOP Instance UID, for dcmtk."""
            src_ds = base_ds(ExplicitVRLittleEndian)
            set_native(src_ds, img12)
            src = tmp / name
            save(src_ds, src)
            return src

        # explicit big endian (dcmconv)
        out = OUT / "ts_explicit_be.dcm"
        run(["dcmconv", "+tb", str(fresh_source("be_src.dcm")), str(out)])
        record(out, ts=ExplicitVRBigEndian, description="explicit VR big endian (retired, must "
               "be read); the ts_explicit_le data set (own SOP Instance UID) converted by dcmtk "
               "dcmconv +tb",
               frames=1, photometric="MONOCHROME2", lossless=True, expect="ok")

        # RLE, JPEG-LS, JPEG 2000 through pydicom's encoders
        def compressed(name, ts, desc, lossless, notes=None, **kw):
            ds = base_ds(ExplicitVRLittleEndian)
            set_native(ds, img12)
            ds.compress(ts, generate_instance_uid=False, **kw)
            if not lossless:
                ds.ImageType = ["DERIVED", "PRIMARY", "OTHER"]
                ds.LossyImageCompression = "01"
                ds.LossyImageCompressionRatio = f"{2 * ROWS * COLS / len(ds.PixelData):.2f}"
                ds.LossyImageCompressionMethod = "ISO_14495_1" if ts == JPEGLSNearLossless else "ISO_15444_1"
            save(ds, OUT / name)
            record(OUT / name, ts=ts, description=desc, frames=1, photometric="MONOCHROME2",
                   lossless=lossless, expect="ok", notes=notes)

        compressed("ts_rle.dcm", RLELossless, "RLE lossless (pydicom's RLE encoder), 16-bit "
                   "BitsStored 12", True, encoding_plugin="pydicom")
        compressed("ts_jpegls_lossless.dcm", JPEGLSLossless, "JPEG-LS lossless (CharLS via "
                   "pyjpegls), 12-bit", True)
        compressed("ts_jpegls_near.dcm", JPEGLSNearLossless, "JPEG-LS near-lossless NEAR=2 "
                   "(CharLS via pyjpegls), 12-bit", False,
                   notes="every sample within +-2 of ts_explicit_le.dcm", jls_error=2)
        compressed("ts_j2k_lossless.dcm", JPEG2000Lossless, "JPEG 2000 lossless (OpenJPEG via "
                   "pylibjpeg-openjpeg), 12-bit", True)
        compressed("ts_j2k_lossy.dcm", JPEG2000, "JPEG 2000 irreversible (9/7 wavelet), one "
                   "quality layer at PSNR 60 dB (OpenJPEG via pylibjpeg-openjpeg), 12-bit", False,
                   j2k_psnr=[60])

        # dcmtk JPEG family
        def dcmcjpeg(name, ts, args, desc, lossless, src=None, photometric="MONOCHROME2",
                     notes=None):
            out = OUT / name
            if src is None:
                src = fresh_source(name)
            run(["dcmcjpeg", *args, "+un", str(src), str(out)])
            got = pydicom.dcmread(out).file_meta.TransferSyntaxUID
            assert got == ts, (name, got)
            record(out, ts=ts, description=desc, frames=1, photometric=photometric,
                   lossless=lossless, expect="ok", notes=notes)

        img8 = (img12 >> 4).astype(np.uint8)
        ds8 = base_ds(ExplicitVRLittleEndian, bits_allocated=8, bits_stored=8, window=(88, 175))
        set_native(ds8, img8)
        src8 = tmp / "mono8_src.dcm"
        save(ds8, src8)
        dcmcjpeg("ts_jpeg_baseline.dcm", JPEGBaseline8Bit, ["+eb", "+q", "90", "+sr"],
                 "JPEG baseline (process 1), 8-bit MONOCHROME2 BitsStored 8 (pixels = "
                 "ts_explicit_le >> 4), quality 90, dcmtk dcmcjpeg", False, src=src8,
                 notes="lossy; decoded pixels differ from the 8-bit source by a few levels; "
                 "window 88/175")
        dcmcjpeg("ts_jpeg_extended.dcm", JPEGExtended12Bit, ["+ee", "+q", "95", "+sr"],
                 "JPEG extended (process 4), 12-bit, quality 95, dcmtk dcmcjpeg", False,
                 notes="lossy")
        dcmcjpeg("ts_jpeg_lossless_p14.dcm", JPEGLossless, ["+el", "+sv", "6"],
                 "JPEG lossless process 14, predictor (selection value) 6, dcmtk dcmcjpeg",
                 True)
        dcmcjpeg("ts_jpeg_lossless_sv1.dcm", JPEGLosslessSV1, ["+e1"],
                 "JPEG lossless process 14 selection value 1, dcmtk dcmcjpeg", True)

    # every lossless transfer syntax decodes to exactly the explicit LE pixels
    for e in MANIFEST:
        px = decoded(OUT / e["file"])
        if e["file"] == "ts_jpeg_baseline.dcm":
            err = np.abs(px.astype(np.int32) - (img12 >> 4))
            assert err.max() <= 24, err.max()
            e["notes"] += f"; max abs error vs source {int(err.max())}, mean {err.mean():.2f}"
            continue
        assert px.shape == ref_px.shape, (e["file"], px.shape)
        err = np.abs(px.astype(np.int32) - ref_px.astype(np.int32))
        if e["lossless"]:
            assert err.max() == 0, (e["file"], err.max())
        else:
            assert err.max() > 0, e["file"]
            if e["file"] == "ts_jpegls_near.dcm":
                assert err.max() <= 2
            assert err.max() <= 64, (e["file"], err.max())
            e["notes"] = (e.get("notes", "") + ("; " if e.get("notes") else "") +
                          f"max abs error vs ts_explicit_le {int(err.max())}, "
                          f"mean {err.mean():.2f}")

    # ---------------------------------------------------------------- pixel semantics
    def native(name, ds, arr, desc, notes=None, frames=1):
        set_native(ds, arr)
        save(ds, OUT / name)
        record(OUT / name, ts=ExplicitVRLittleEndian, description=desc, frames=frames,
               photometric=str(ds.PhotometricInterpretation), lossless=True, expect="ok",
               notes=notes)
        return OUT / name

    # signed with rescale: stored -500..~3000, slope 2, intercept -1024
    stored = to12(gray_a, SEED + 1, gain=19.5, offset=-560.0, lo=-32768, hi=32767)
    stored = np.clip(stored, -500, None)
    ds = base_ds(ExplicitVRLittleEndian, bits_stored=16, pixel_rep=1, rescale=(2, -1024),
                 window=(1800, 5000))
    p = native("signed_rescale.dcm", ds, stored,
               "signed 16-bit (PixelRepresentation 1, BitsStored 16), stored values "
               f"{stored.min()}..{stored.max()}, RescaleSlope 2, RescaleIntercept -1024, "
               "window 1800/5000 (in rescaled units)")
    assert np.array_equal(decoded(p), stored)

    # the same image with the attributes an unknowing sender wrote as UN (explicit VR, raw bytes)
    ds = base_ds(ExplicitVRLittleEndian, bits_stored=16, pixel_rep=1, rescale=(2, -1024),
                 window=(1800, 5000), instance=901)
    p = native("un_attributes.dcm", ds, stored,
               "signed_rescale.dcm's image with RescaleSlope/Intercept, WindowCenter/Width, "
               "Modality, the Study/Series/SOP Instance UIDs, PixelRepresentation and "
               "ImagePositionPatient stored with VR UN (their value bytes unchanged), as a sender "
               "that did not know them writes explicit VR",
               notes="pydicom reads UN with the dictionary VR (config.replace_un_with_known_vr)")
    to_un(p, ["RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth", "Modality",
              "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "PixelRepresentation",
              "ImagePositionPatient"])
    check = pydicom.dcmread(p)
    assert check["RescaleSlope"].VR == "DS" and float(check.RescaleSlope) == 2.0
    assert check.SOPInstanceUID == ds.SOPInstanceUID and check.Modality == "MR"
    assert check.PixelRepresentation == 1
    assert np.array_equal(decoded(p), stored)

    # junk in the top 4 bits
    rng = np.random.default_rng(SEED + 2)
    junk = rng.integers(1, 16, size=img12.shape)
    raw = img12 | (junk << 12)
    ds = base_ds(ExplicitVRLittleEndian)
    p = native("bits_stored_garbage.dcm", ds, raw,
               "BitsAllocated 16, BitsStored 12, HighBit 11, every sample has nonzero junk in "
               "bits 12-15; the 12-bit values equal ts_explicit_le.dcm",
               notes="readers must mask to BitsStored (pydicom does); decoded = ts_explicit_le")
    assert np.array_equal(decoded(p), img12)

    # signed 12-bit, sign-extended
    s12 = to12(gray_a, SEED + 3, gain=16.0, offset=-1400.0, lo=-2048, hi=2047)
    assert s12.min() < -1000 and s12.max() > 1000
    ds = base_ds(ExplicitVRLittleEndian, bits_stored=12, pixel_rep=1, window=(0, 2800))
    p = native("signed_12bit.dcm", ds, s12,
               "PixelRepresentation 1, BitsAllocated 16, BitsStored 12, HighBit 11, values "
               f"{s12.min()}..{s12.max()} as 12-bit two's complement sign-extended to 16 bits "
               "(no junk); window 0/2800")
    assert np.array_equal(decoded(p), s12)

    # MONOCHROME1
    inv = 4095 - img12
    ds = base_ds(ExplicitVRLittleEndian, photometric="MONOCHROME1", window=(4095 - 1400, 2800))
    p = native("mono1.dcm", ds, inv, "MONOCHROME1 (stored = 4095 - ts_explicit_le), window "
               "2695/2800; displays like ts_explicit_le after inversion")
    assert np.array_equal(decoded(p), inv)

    # pixel padding
    bg = background_mask(gray_a)
    padded = np.where(bg, 4095, np.minimum(img12, 4000))
    ds = base_ds(ExplicitVRLittleEndian)
    ds.PixelPaddingValue = 4095
    p = native("padding.dcm", ds, padded,
               f"PixelPaddingValue 4095 (US); the {int(bg.sum())} background pixels outside the "
               "head equal it, all other pixels are <= 4000",
               notes="padding pixels must be excluded from minmax/percentile statistics and "
               "output as 0")
    assert np.array_equal(decoded(p), padded)

    ds = base_ds(ExplicitVRLittleEndian, window=("1400.5", "2600"))
    ds.VOILUTFunction = "LINEAR_EXACT"
    native("window_linear_exact.dcm", ds, img12, "VOILUTFunction LINEAR_EXACT, window "
           "1400.5/2600 (same pixels as ts_explicit_le)")

    ds = base_ds(ExplicitVRLittleEndian, window=(1400, 1200))
    ds.VOILUTFunction = "SIGMOID"
    native("window_sigmoid.dcm", ds, img12, "VOILUTFunction SIGMOID, window 1400/1200 (same "
           "pixels as ts_explicit_le)")

    ds = base_ds(ExplicitVRLittleEndian, window=None)
    ds.WindowCenter = ["1300", "800"]
    ds.WindowWidth = ["2400", "1000"]
    ds.WindowCenterWidthExplanation = ["BRAIN", "NARROW"]
    native("window_multi.dcm", ds, img12, "two window pairs: 1300/2400 (BRAIN, the one to use) "
           "and 800/1000 (NARROW)")

    # VOI LUT sequence (LUTData OW), no window
    n_voi, first_voi = 3000, 100
    i = np.arange(n_voi, dtype=np.float64)
    voi = np.floor(4095.0 * (i / (n_voi - 1)) ** 0.7 + 0.5).astype(np.uint16)
    ds = base_ds(ExplicitVRLittleEndian, window=None)
    item = Dataset()
    item.LUTDescriptor = [n_voi, first_voi, 12]
    item.LUTExplanation = "GAMMA 0.7"
    item.add_new(0x00283006, "OW", voi.astype("<u2").tobytes())
    ds.VOILUTSequence = Sequence([item])
    native("voi_lut_seq.dcm", ds, img12,
           f"VOILUTSequence with one LUT: descriptor [{n_voi}, {first_voi}, 12], LUTData OW, "
           "gamma 0.7 curve 0..4095; no WindowCenter/Width; same pixels as ts_explicit_le",
           notes="stored values < 100 map to entry 0, > 3099 to the last entry; output range "
           "0..4095")

    # Modality LUT sequence (LUTData US), no rescale, a window in LUT-output units
    n_mod = 4096
    i = np.arange(n_mod, dtype=np.float64)
    mod = np.floor(2000.0 + 6.0 * i + 0.0015 * i * i + 0.5).astype(np.uint16)
    ds = base_ds(ExplicitVRLittleEndian, rescale=None, window=(20000, 36000))
    item = Dataset()
    item.LUTDescriptor = [n_mod, 0, 16]
    item.ModalityLUTType = "US"
    item.LUTExplanation = "QUADRATIC"
    item.add_new(0x00283006, "US", [int(v) for v in mod])
    ds.ModalityLUTSequence = Sequence([item])
    native("modality_lut_seq.dcm", ds, img12,
           "ModalityLUTSequence (descriptor [4096, 0, 16], LUTData US, out = round(2000 + 6 i + "
           "0.0015 i^2)) instead of rescale; window 20000/36000 in LUT-output units; same "
           "pixels as ts_explicit_le",
           notes="pydicom's windowing range for a Modality LUT is 0..2^16-1")

    ds = base_ds(ExplicitVRLittleEndian, window=None)
    native("no_window.dcm", ds, img12, "no window, no VOI LUT (header policy falls back to "
           "minmax); same pixels as ts_explicit_le")

    ds = base_ds(ExplicitVRLittleEndian, bits_allocated=8, bits_stored=8, window=(88, 175))
    p = native("mono8.dcm", ds, img8, "8-bit MONOCHROME2, BitsStored 8 (pixels = ts_explicit_le "
               ">> 4), window 88/175; 4725 bytes of pixels + 1 pad byte (odd length)")
    assert np.array_equal(decoded(p), img8)

    rgb = tint(np.clip(np.floor(gray_a + 0.5), 0, 255).astype(np.uint8))
    ds = base_ds(ExplicitVRLittleEndian, photometric="RGB", bits_allocated=8, bits_stored=8,
                 spp=3, rescale=None, window=None)
    p = native("rgb.dcm", ds, rgb, "8-bit RGB, PlanarConfiguration 0 (interleaved), tinted "
               "slice R=g, G=0.92g+10, B=0.80g+25; 14175 bytes + 1 pad byte")
    assert np.array_equal(decoded(p), rgb)

    ds = base_ds(ExplicitVRLittleEndian, photometric="RGB", bits_allocated=8, bits_stored=8,
                 spp=3, rescale=None, window=None)
    ds.PlanarConfiguration = 1
    p = native("rgb_planar.dcm", ds, np.transpose(rgb, (2, 0, 1)),
               "8-bit RGB, PlanarConfiguration 1 (R plane, G plane, B plane); same pixels as "
               "rgb.dcm")
    assert np.array_equal(decoded(p), rgb)

    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    ds = base_ds(ExplicitVRLittleEndian, photometric="YBR_FULL", bits_allocated=8, bits_stored=8,
                 spp=3, rescale=None, window=None)
    p = native("ybr_full.dcm", ds, ybr,
               "8-bit YBR_FULL uncompressed, PlanarConfiguration 0; rgb.dcm converted with "
               "pydicom's RGB->YBR_FULL",
               notes="pydicom's pixel_array converts YBR_FULL to RGB (float32 matrix, "
               "floor(x+0.5), clip 0..255); within +-1 of rgb.dcm")
    back = decoded(p).astype(np.int32)
    assert np.abs(back - rgb).max() <= 2

    frames = np.stack([img12,
                       to12(source_gray("flair_256_b.png"), SEED + 4),
                       to12(source_gray("flair_256_c.png"), SEED + 5)])
    ds = base_ds(ExplicitVRLittleEndian, frames=3)
    ds.FrameIncrementPointer = 0x00181063  # FrameTime
    ds.FrameTime = "1000"
    p = native("multiframe.dcm", ds, frames,
               "3 frames (NumberOfFrames 3), plain MR Image Storage (not Enhanced MR), "
               "16-bit BitsStored 12, window 1400/2800; frame 0 = ts_explicit_le, frames 1, 2 "
               "from flair_256_b / flair_256_c",
               notes="frames differ, so per-frame minmax/percentile statistics differ",
               frames=3)
    assert np.array_equal(decoded(p), frames)

    ds = base_ds(ExplicitVRLittleEndian)
    ds.PatientName = "Doe^Jane^PHI-NAME-7391"
    ds.PatientID = "PHI-ID-556677"
    ds.PatientBirthDate = "19610314"
    ds.PatientSex = "F"
    ds.OtherPatientIDs = ["PHI-OTHER-ID-8812", "PHI-OTHER-ID-9913"]
    ds.PatientAddress = "PHI-ADDR 42 Synthetic Lane^Testville"
    ds.PatientTelephoneNumbers = "PHI-TEL-555-0199"
    ds.ReferringPhysicianName = "Smith^John^PHI-REFPHYS-3141"
    ds.InstitutionName = "PHI-INST Synthetic General Hospital"
    ds.InstitutionAddress = "PHI-INSTADDR 1 Fake Road"
    ds.AccessionNumber = "PHI-ACC-2468"
    ds.OperatorsName = "Roe^Rick^PHI-OPERATOR-1010"
    ds.StationName = "PHI-STATION-77"
    native("phi.dcm", ds, img12,
           "explicit VR LE with synthetic PHI: PatientName Doe^Jane^PHI-NAME-7391, PatientID "
           "PHI-ID-556677, PatientBirthDate 19610314, OtherPatientIDs PHI-OTHER-ID-8812\\"
           "PHI-OTHER-ID-9913, PatientAddress, PatientTelephoneNumbers, ReferringPhysicianName "
           "(PHI-REFPHYS-3141), InstitutionName, InstitutionAddress, AccessionNumber "
           "PHI-ACC-2468, OperatorsName (PHI-OPERATOR-1010), StationName (PHI-STATION-77)",
           notes="every identifying value contains the substring 'PHI-' (except the birth date "
           "19610314); same pixels as ts_explicit_le")

    # ---------------------------------------------------------------- bad inputs
    rng = np.random.default_rng(SEED + 100)

    p = BAD / "not_dicom.dcm"
    garbage = b"This is not a DICOM data set. " * 4 + rng.integers(0, 256, 384, dtype=np.uint8).tobytes()
    p.write_bytes(b"\0" * 128 + b"DICM" + garbage)
    record(p, ts=None, description="128-byte zero preamble + 'DICM' + ASCII text and random "
           "bytes (no file meta group)", frames=None, photometric=None, lossless=False,
           expect="refused")

    p = BAD / "truncated.dcm"
    data = ref.read_bytes()
    p.write_bytes(data[: len(data) * 6 // 10])
    record(p, ts=ExplicitVRLittleEndian, description=f"first 60 % ({len(data) * 6 // 10} of "
           f"{len(data)} bytes) of ts_explicit_le.dcm: Pixel Data is cut short", frames=1,
           photometric="MONOCHROME2", lossless=False, expect="refused")

    ds = base_ds(ExplicitVRLittleEndian)
    p = BAD / "no_pixel_data.dcm"
    save(ds, p)
    record(p, ts=ExplicitVRLittleEndian, description="valid MR header (Rows/Columns/Bits...) "
           "but no Pixel Data element", frames=1, photometric="MONOCHROME2", lossless=False,
           expect="refused")

    ds = base_ds(ExplicitVRLittleEndian)
    a, _ = split_at(ds, 0x0029)
    p = BAD / "huge_length.dcm"
    p.write_bytes(meta_bytes(ds) + dataset_bytes(a) + lo_elem(0x00290010, "BRAINAI TEST")
                  + elem_header_ex(0x00291010, "OB", 0xFFFFFFF0) + b"\x01\x02\x03\x04\x05\x06\x07\x08")
    record(p, ts=ExplicitVRLittleEndian, description="complete MR header, then private element "
           "(0029,1010) OB declaring length 0xFFFFFFF0 followed by only 8 bytes (no Pixel Data)",
           frames=1, photometric="MONOCHROME2", lossless=False, expect="refused",
           notes="a reader must not allocate the declared length")

    ds = base_ds(ExplicitVRLittleEndian, rows=65535, cols=65535, frames=100000)
    ds.add_new(0x7FE00010, "OW", bytes(range(16)))
    p = BAD / "dims_overflow.dcm"
    save(ds, p)
    record(p, ts=ExplicitVRLittleEndian, description="Rows 65535, Columns 65535, NumberOfFrames "
           "100000, BitsAllocated 16 (8.6e14 bytes declared; overflows 32-bit products) with 16 "
           "bytes of Pixel Data", frames=100000, photometric="MONOCHROME2", lossless=False,
           expect="refused")

    ds = base_ds(ExplicitVRLittleEndian, bits_allocated=8, bits_stored=16, window=None)
    ds.add_new(0x7FE00010, "OB", img8.tobytes())
    p = BAD / "bits_stored_gt_allocated.dcm"
    save(ds, p)
    record(p, ts=ExplicitVRLittleEndian, description="BitsAllocated 8, BitsStored 16, HighBit 15 "
           "(BitsStored > BitsAllocated), 4725 bytes of Pixel Data", frames=1,
           photometric="MONOCHROME2", lossless=False, expect="refused")

    ds = base_ds(MPEG2MPML, photometric="YBR_PARTIAL_420", bits_allocated=8, bits_stored=8, spp=3,
                 rescale=None, window=None)
    ds.add_new(0x7FE00010, "OB", encapsulate([rng.integers(0, 256, 998, dtype=np.uint8).tobytes()]))
    ds["PixelData"].is_undefined_length = True
    p = BAD / "unsupported_ts.dcm"
    save(ds, p)
    record(p, ts=MPEG2MPML, description="transfer syntax 1.2.840.10008.1.2.4.100 (MPEG2 Main "
           "Profile @ Main Level; header as MPEG2 requires: 8-bit, 3 samples, YBR_PARTIAL_420) "
           "with encapsulated Pixel Data: empty offset table + one 998-byte fragment of random "
           "bytes", frames=1, photometric="YBR_PARTIAL_420", lossless=False,
           expect="refused")

    # deflate bomb: sane 75x63 header, a private OB element of 512 MiB of zeros, then the real
    # Pixel Data; the whole data set is one raw deflate stream (zlib level 9)
    bomb_len = 512 * 1024 * 1024
    ds = base_ds(DeflatedExplicitVRLittleEndian)
    set_native(ds, img12)
    a, b = split_at(ds, 0x0009)
    comp = zlib.compressobj(9, zlib.DEFLATED, -15, 9)
    head = (dataset_bytes(a) + lo_elem(0x00090010, "BRAINAI TEST")
            + elem_header_ex(0x00091010, "OB", bomb_len))
    tail = dataset_bytes(b)
    parts = [comp.compress(head)]
    chunk = bytes(1 << 20)
    for _ in range(bomb_len >> 20):
        parts.append(comp.compress(chunk))
    parts.append(comp.compress(tail))
    parts.append(comp.flush())
    stream = b"".join(parts)
    if len(stream) % 2:
        stream += b"\0"  # not part of the deflate stream; a trailing pad after its end
    inflated = len(head) + bomb_len + len(tail)
    assert len(zlib.decompressobj(-15).decompress(stream, 1 << 16)) > 0
    p = BAD / "deflate_bomb.dcm"
    p.write_bytes(meta_bytes(ds) + stream)
    ratio = inflated / len(stream)
    record(p, ts=DeflatedExplicitVRLittleEndian,
           description=f"deflated explicit VR LE; the data set inflates to {inflated} bytes "
           f"(512 MiB + {inflated - bomb_len}): a normal 75x63 MR header, a private element "
           f"(0009,1010) OB of 536870912 zero bytes, then the real 9450-byte Pixel Data; "
           f"deflate stream {len(stream)} bytes (ratio {ratio:.0f}:1)",
           frames=1, photometric="MONOCHROME2", lossless=False, expect="refused",
           notes="a reader must bound the inflated size; one that streams and discards the "
           "private element would find valid pixels after inflating 512 MiB")

    # deep nesting: (0040,A730) ContentSequence nested 2000 deep, undefined lengths
    depth = 2000
    ds = base_ds(ExplicitVRLittleEndian)
    set_native(ds, img12)
    a, b = split_at(ds, 0x0041)
    open_level = elem_header_ex(0x0040A730, "SQ", 0xFFFFFFFF) + struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    close_level = struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    p = BAD / "deep_nesting.dcm"
    p.write_bytes(meta_bytes(ds) + dataset_bytes(a) + open_level * depth + close_level * depth
                  + dataset_bytes(b))
    record(p, ts=ExplicitVRLittleEndian, description=f"(0040,A730) sequences nested {depth} deep "
           "(each an undefined-length SQ holding one undefined-length item), then valid 75x63 "
           "Pixel Data", frames=1, photometric="MONOCHROME2", lossless=False, expect="refused",
           notes="a reader must bound its nesting depth (pydicom itself hits RecursionError)")

    # BitsAllocated 12, packed
    ds = base_ds(ExplicitVRLittleEndian, window=None)
    ds.BitsAllocated = 12
    flat = img12.reshape(-1).astype(np.uint32)
    if flat.size % 2:
        flat = np.append(flat, 0)
    lo, hi = flat[0::2], flat[1::2]
    packed = np.stack([lo & 0xFF, ((lo >> 8) & 0x0F) | ((hi & 0x0F) << 4), hi >> 4], axis=1)
    nbytes = (ROWS * COLS * 12 + 7) // 8  # 7088: ceil(4725 * 1.5), even
    ds.add_new(0x7FE00010, "OB", packed.astype(np.uint8).tobytes()[:nbytes])
    p = BAD / "bits_allocated_odd.dcm"
    save(ds, p)
    record(p, ts=ExplicitVRLittleEndian, description="BitsAllocated 12 (not a multiple of 8), "
           "BitsStored 12, native Pixel Data packed 2 samples per 3 bytes (7088 bytes)", frames=1,
           photometric="MONOCHROME2", lossless=False, expect="refused")

    # what pydicom 3.0.2 (dcmread + pixel_array) and dcmtk 3.6.7 (dcmdump) do with each bad file;
    # checked below for all but the deflate bomb (512 MiB), which was checked by hand
    behaviour = {
        "bad/not_dicom.dcm": "pydicom: dcmread returns a data set without file meta, pixel_array "
        "raises AttributeError (no Transfer Syntax UID); dcmdump fails",
        "bad/truncated.dcm": "pydicom: ValueError (fewer pixel bytes than expected); dcmdump fails",
        "bad/no_pixel_data.dcm": "pydicom: AttributeError (no Pixel Data)",
        "bad/huge_length.dcm": "pydicom: dcmread keeps the 8 bytes as the value without error, "
        "pixel_array raises AttributeError (no Pixel Data); dcmdump fails",
        "bad/dims_overflow.dcm": "pydicom: ValueError (16 vs 858967245000000 bytes expected)",
        "bad/bits_stored_gt_allocated.dcm": "pydicom: ValueError (Bits Stored > Bits Allocated)",
        "bad/unsupported_ts.dcm": "pydicom: NotImplementedError (no MPEG2 decoder)",
        "bad/deflate_bomb.dcm": "pydicom: NOT refused: dcmread inflates all 512 MiB and "
        "pixel_array returns the 63x75 image; dcmdump also reads it",
        "bad/deep_nesting.dcm": "pydicom: RecursionError in dcmread; dcmdump reads it; dciodvfy "
        "segfaults",
        "bad/bits_allocated_odd.dcm": "pydicom: ValueError (Bits Allocated 12 invalid)",
    }
    for e in MANIFEST:
        if e["file"] in behaviour:
            e["notes"] = (e["notes"] + "; " if e.get("notes") else "") + behaviour[e["file"]]
        if e["expect"] == "refused" and e["file"] != "bad/deflate_bomb.dcm":
            try:
                decoded(OUT / e["file"])
            except (AttributeError, ValueError, NotImplementedError, RecursionError):
                pass
            else:
                raise AssertionError(f"pydicom decoded {e['file']}")

    # ---------------------------------------------------------------- manifest
    MANIFEST.sort(key=lambda e: (e["file"].startswith("bad/"), e["file"]))
    (OUT / "manifest.json").write_text(json.dumps(MANIFEST, indent=2) + "\n")

    total = 0
    for f in sorted(OUT.rglob("*")):
        if f.is_file():
            total += f.stat().st_size
            print(f"{f.stat().st_size:8d}  {hashlib.sha256(f.read_bytes()).hexdigest()[:16]}  "
                  f"{f.relative_to(OUT)}")
    print(f"{total:8d}  total")
    return 0


if __name__ == "__main__":
    sys.exit(main())
