#!/usr/bin/env python3
"""Independent reference for BrainAI Serve's DICOM path: pydicom + numpy + Pillow only.

It shares no code with the Rust service.  Run with the repo's venv after
`.venv/bin/pip install -r tests/dicom/requirements.txt`:

    .venv/bin/python tests/reference/dicom_reference.py decode FILE [--policy JSON] --out OUT.u8 [--debug]
    .venv/bin/python tests/reference/dicom_reference.py decode-many --policies JSON-LIST --out-dir DIR FILE...
    .venv/bin/python tests/reference/dicom_reference.py preprocess --model-dir DIR FILE [FILE...] \\
        [--policy JSON] --out OUT.f32

decode:     writes every frame's 8-bit pixels (row-major, frames concatenated; gray = 1 byte per
            pixel, colour = RGB interleaved) and prints one JSON line
            {"frames": N, "width": W, "height": H, "channels": C}.  Without --policy the policy
            is {"window": "header"}.  --debug prints, per frame, one JSON line to stderr with the
            helper quantities (float64, repr = shortest round-trip decimal).
decode-many: decode's output for every file under every policy of the list, in one process,
            plus each monochrome file's stored values (see cmd_decode_many).
preprocess: each frame's 8-bit image through tests/reference/reference.py's preprocess_one
            (resize / colour / scaling of the model's [input]), tensors of all frames of all
            files concatenated in order as little-endian float32; prints {"shape": [...]}.
            Without --policy the policy is model.toml's [input.dicom] table (default
            {"window": "header"}).

Policy JSON: {"window": "header"} | {"window": "minmax"}
           | {"window": "percentile", "percentiles": [lo, hi]}   (default [1.0, 99.0])
           | {"window": {"center": C, "width": W}}               (LINEAR, W >= 1)

==================================================================================================
What pydicom 3.0.2 does (read from the installed pydicom/pixels/processing.py; quoted code is
verbatim, "arr" is the input array, "ds" the dataset)
==================================================================================================

Stored values.  ds.pixel_array returns, for native data with BitsStored < BitsAllocated, the
samples shifted left then right by (BitsAllocated - BitsStored) in the array's own dtype
(decoders/base.py _correct_unused_bits: np.left_shift / np.right_shift), i.e. the top bits are
masked off for unsigned data and the value is sign-extended from bit BitsStored-1 for signed
data (dtype int16 when PixelRepresentation is 1).  Frames axis first when NumberOfFrames > 1.
YBR_FULL / YBR_FULL_422 colour is converted to RGB by pixel_array (as_rgb=True by default) with
_convert_YBR_FULL_to_RGB: float32 matrix
    [[1.000, 1.000, 1.000], [0.000, -0.114 * 1.772 / 0.587, 1.772], [1.402, -0.299 * 1.402 / 0.587, 0.000]]
applied as arr.astype(float32) - [0, 128, 128], np.matmul, += 0.5, np.floor, np.clip(0, 255).

apply_modality_lut(arr, ds):
    if ds.get("ModalityLUTSequence"):
        item = ds.ModalityLUTSequence[0]
        nr_entries = item.LUTDescriptor[0] or 2**16
        first_map = item.LUTDescriptor[1]
        nominal_depth = item.LUTDescriptor[2]
        dtype = f"uint{nominal_depth}"            # so only 8 or 16 work
        ... LUTData: OW unpacked with the transfer syntax's endianness, else the US values
        lut_data: np.ndarray = np.asarray(unc_data, dtype=dtype)
        # IVs < `first_map` get set to first LUT entry (i.e. index 0)
        clipped_iv = np.zeros(arr.shape, dtype=arr.dtype)
        # IVs >= `first_map` are mapped by the Modality LUT
        # `first_map` may be negative, positive or 0
        mapped_pixels = arr >= first_map
        clipped_iv[mapped_pixels] = arr[mapped_pixels] - first_map
        # IVs > number of entries get set to last entry
        np.clip(clipped_iv, 0, nr_entries - 1, out=clipped_iv)
        return lut_data[clipped_iv]
    elif "RescaleSlope" in ds and "RescaleIntercept" in ds:
        arr = arr.astype(np.float64) * cast(float, ds.RescaleSlope)
        arr += cast(float, ds.RescaleIntercept)
    return arr
  => x = stored * slope + intercept in float64 (multiply, then add; DS strings parsed as float64),
     or LUT[clip(stored - first_map, 0, n-1)] (index 0 below first_map), or stored unchanged.

apply_voi_lut(arr, ds, index=0, prefer_lut=True):
    valid_voi = False
    if ds.get("VOILUTSequence"):
        valid_voi = None not in [ds.VOILUTSequence[0].get("LUTDescriptor", None),
                                 ds.VOILUTSequence[0].get("LUTData", None)]
    valid_windowing = None not in [ds.get("WindowCenter", None), ds.get("WindowWidth", None)]
    if valid_voi and valid_windowing:
        if prefer_lut:
            return apply_voi(arr, ds, index)
        return apply_windowing(arr, ds, index)
    if valid_voi:
        return apply_voi(arr, ds, index)
    if valid_windowing:
        return apply_windowing(arr, ds, index)
    return arr
  => a VOI LUT Sequence (item 0 with LUTDescriptor and LUTData) wins over Window Center/Width.

apply_voi(arr, ds, index=0):
    item = ds.VOILUTSequence[index]
    nr_entries = lut_descriptor[0] or 2**16
    first_map = lut_descriptor[1]
    nominal_depth = lut_descriptor[2]
    if nominal_depth in list(range(10, 17)):   dtype = "uint16"
    elif nominal_depth == 8:                   dtype = "uint8"
    else: raise NotImplementedError(...)
    ... LUTData: OW unpacked with the transfer syntax's endianness (unpack_from), else US values
    lut_data: np.ndarray = np.asarray(unc_data, dtype=dtype)
    clipped_iv = np.zeros(arr.shape, dtype=dtype)
    mapped_pixels = arr >= first_map
    clipped_iv[mapped_pixels] = arr[mapped_pixels] - first_map
    np.clip(clipped_iv, 0, nr_entries - 1, out=clipped_iv)
    return lut_data[clipped_iv]
  (On a float array pydicom warns, and arr - first_map is cast to uint16, which truncates and is
  undefined past 65535.  This reference therefore passes floor(clip(x, first_map - 1,
  first_map + nr_entries - 1)) as int64, which gives pydicom's own result wherever that is
  defined:  index = 0 if x < first_map else min(floor(x) - first_map, nr_entries - 1);
  y = LUTData[index].)
  Output range used here for the 8-bit step: y_min = 0, y_max = 2**nominal_depth - 1.

apply_windowing(arr, ds, index=0):
    if "WindowWidth" not in ds and "WindowCenter" not in ds:
        return arr
    (PhotometricInterpretation must be MONOCHROME1 or MONOCHROME2, else ValueError)
    voi_func = cast(str, getattr(ds, "VOILUTFunction", "LINEAR")).upper()
    elem = ds["WindowCenter"]
    center = cast(list[float], elem.value)[index] if elem.VM > 1 else elem.value
    elem = ds["WindowWidth"]
    width = cast(list[float], elem.value)[index] if elem.VM > 1 else elem.value
    # The output range depends on whether or not a modality LUT or rescale
    #   operation has been applied
    if ds.get("ModalityLUTSequence"):
        # Unsigned - see PS3.3 C.11.1.1.1
        y_min = 0
        item = cast(list["Dataset"], ds.ModalityLUTSequence)[0]
        bit_depth = cast(list[int], item.LUTDescriptor)[2]
        y_max = 2**bit_depth - 1
    elif ds.PixelRepresentation == 0:
        # Unsigned
        y_min = 0
        y_max = 2**ds.BitsStored - 1
    else:
        # Signed
        y_min = -(2 ** (ds.BitsStored - 1))
        y_max = 2 ** (ds.BitsStored - 1) - 1
    slope = ds.get("RescaleSlope", None)
    intercept = ds.get("RescaleIntercept", None)
    if slope is not None and intercept is not None:
        ds.RescaleSlope = cast(float, ds.RescaleSlope)
        ds.RescaleIntercept = cast(float, ds.RescaleIntercept)
        # Otherwise its the actual data range
        y_min = y_min * ds.RescaleSlope + ds.RescaleIntercept
        y_max = y_max * ds.RescaleSlope + ds.RescaleIntercept
    y_range = y_max - y_min
    arr = arr.astype("float64")
    if voi_func in ["LINEAR", "LINEAR_EXACT"]:
        # PS3.3 C.11.2.1.2.1 and C.11.2.1.3.2
        if voi_func == "LINEAR":
            if width < 1:
                raise ValueError(...)
            center -= 0.5
            width -= 1
        elif width <= 0:
            raise ValueError(...)
        below = arr <= (center - width / 2)
        above = arr > (center + width / 2)
        between = np.logical_and(~below, ~above)
        arr[below] = y_min
        arr[above] = y_max
        if between.any():
            arr[between] = ((arr[between] - center) / width + 0.5) * y_range + y_min
    elif voi_func == "SIGMOID":
        # PS3.3 C.11.2.1.3.1
        if width <= 0:
            raise ValueError(...)
        arr = y_range / (1 + np.exp(-4 * (arr - center) / width)) + y_min
    else:
        raise ValueError(f"Unsupported (0028,1056) VOI LUT Function value '{voi_func}'")
    return arr
  Notes: the rescale is applied to the range even when a Modality LUT Sequence is also present;
  y_min/y_max are Python ints, or floats (int * slope + intercept, in that order) with rescale.
  LINEAR with width 1 makes width 0: every value is then below or above, nothing is divided.
  SIGMOID's output is y_range / (1 + exp(-4 (x - c) / w)) + y_min: strictly inside (y_min, y_max)
  except where exp over/underflows.  The order of operations above is the float64 order.

numpy 2.3.5 np.percentile(v, p) (method "linear", _function_base_impl.py), v float64, n = v.size:
    q = p / 100                       (np.true_divide, float64)
    vi = (n - 1) * q                  (float64)
    if vi >= n - 1:  result = sorted(v)[n - 1]
    elif vi < 0:     result = sorted(v)[0]
    else:
        i = floor(vi); g = vi - i; a = sorted(v)[i]; b = sorted(v)[i + 1]; d = b - a
        result = b - d * (1 - g)  if g >= 0.5  else  a + d * g            (_lerp)

==================================================================================================
The reference's semantics (the Rust side does the same float64 operations in the same order)
==================================================================================================
  a. ds = pydicom.dcmread(FILE); arr = ds.pixel_array (frames axis first when > 1 frame).
  b. SamplesPerPixel 3 (BitsAllocated 8 only): the RGB uint8 frame pydicom returns (YBR_* already
     converted to RGB by pydicom); no windowing, no padding.  Done.
  c. Monochrome, per frame: stored = frame; x = apply_modality_lut(stored, ds).astype(float64).
  d. pad = stored == PixelPaddingValue, or PixelPaddingValue <= stored <= PixelPaddingRangeLimit
     (either order of the two) when the range limit is present; no padding without the value.
  e. Policy -> y, y_min, y_max:
     header:  VOI LUT (as apply_voi_lut decides, see above): y = LUT output, y_min = 0,
              y_max = 2**LUTDescriptor[2] - 1.  Window: y = apply_windowing(x, ds, 0) with the
              file's VOI LUT Function; y_min/y_max as in apply_windowing (this reference also
              reads them back from pydicom by windowing [-inf, +inf] and checks they agree).
              Neither: as minmax.
     fixed {center, width}: apply_windowing on a copy of ds whose WindowCenter/WindowWidth are
              replaced by C/W and whose VOILUTFunction is removed (LINEAR); same y_min/y_max.
     minmax:  lo = min(x[~pad]), hi = max(x[~pad]); y = x; y_min = lo; y_max = hi.
     percentile: lo = np.percentile(x[~pad], p_lo), hi = np.percentile(x[~pad], p_hi);
              y = np.clip(x, lo, hi); y_min = lo; y_max = hi.
     (minmax/percentile with every pixel padding: the frame is all 0.)
     Statistics are per frame.
  f. t = (y - y_min) / (y_max - y_min)   (t = 0 everywhere if y_max == y_min)
     t = np.clip(t, 0, 1); u8 = np.floor(t * 255.0 + 0.5).astype(uint8)
  g. MONOCHROME1: u8 = 255 - u8.  Then padding pixels are set to 0.
  No float32 anywhere before the 8-bit step.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.pixels.processing import apply_modality_lut, apply_voi_lut, apply_windowing

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reference  # noqa: E402  (tests/reference/reference.py: the image preprocessing reference)


# ------------------------------------------------------------------------------------- policy


def parse_policy(policy) -> dict:
    """Validate a policy (dict or JSON text) -> {"kind": ..., ...}."""
    if isinstance(policy, str):
        policy = json.loads(policy)
    if not isinstance(policy, dict):
        raise ValueError(f"policy must be a JSON object, not {policy!r}")
    unknown = set(policy) - {"window", "percentiles", "output"}
    if unknown:
        raise ValueError(f"unknown policy keys {sorted(unknown)}")
    output = policy.get("output", "uint8")
    if output not in ("uint8", "float"):
        raise ValueError(f"output must be uint8 or float, not {output!r}")
    return dict(window_policy(policy), output=output)


def window_policy(policy: dict) -> dict:
    window = policy.get("window", "header")
    if "percentiles" in policy and window != "percentile":
        raise ValueError('"percentiles" goes with "window": "percentile" only')
    if isinstance(window, dict):
        if set(window) != {"center", "width"}:
            raise ValueError(f"a fixed window is {{center, width}}, not {window!r}")
        c, w = float(window["center"]), float(window["width"])
        if not (np.isfinite(c) and np.isfinite(w)) or w < 1.0:
            raise ValueError(f"a fixed window needs a finite center and width >= 1, not {window!r}")
        return {"kind": "fixed", "center": c, "width": w}
    if window in ("header", "minmax"):
        return {"kind": window}
    if window == "percentile":
        lo, hi = (float(v) for v in policy.get("percentiles", [1.0, 99.0]))
        if not (0.0 <= lo < hi <= 100.0):
            raise ValueError(f"percentiles must be 0 <= lo < hi <= 100, not [{lo}, {hi}]")
        return {"kind": "percentile", "lo": lo, "hi": hi}
    raise ValueError(f"unknown window {window!r}")


# ------------------------------------------------------------------------------ pixel helpers


def padding_mask(stored: np.ndarray, ds) -> np.ndarray:
    if "PixelPaddingValue" not in ds:
        return np.zeros(stored.shape, dtype=bool)
    a = int(ds.PixelPaddingValue)
    if "PixelPaddingRangeLimit" in ds:
        b = int(ds.PixelPaddingRangeLimit)
        lo, hi = min(a, b), max(a, b)
        return (stored >= lo) & (stored <= hi)
    return stored == a


def voi_lut_item(ds):
    """Item 0 of the VOI LUT Sequence when pydicom's apply_voi_lut would use it, else None."""
    if ds.get("VOILUTSequence"):
        item = ds.VOILUTSequence[0]
        if None not in [item.get("LUTDescriptor", None), item.get("LUTData", None)]:
            return item
    return None


def has_window(ds) -> bool:
    return None not in [ds.get("WindowCenter", None), ds.get("WindowWidth", None)]


def window_range(ds) -> tuple[float, float]:
    """apply_windowing's (y_min, y_max), computed as pydicom does and read back from pydicom."""
    if ds.get("ModalityLUTSequence"):
        y_min = 0
        y_max = 2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1
    elif ds.PixelRepresentation == 0:
        y_min = 0
        y_max = 2 ** int(ds.BitsStored) - 1
    else:
        y_min = -(2 ** (int(ds.BitsStored) - 1))
        y_max = 2 ** (int(ds.BitsStored) - 1) - 1
    slope = ds.get("RescaleSlope", None)
    intercept = ds.get("RescaleIntercept", None)
    if slope is not None and intercept is not None:
        y_min = y_min * float(slope) + float(intercept)
        y_max = y_max * float(slope) + float(intercept)

    probe = copy.deepcopy(ds)
    probe.WindowCenter = 0
    probe.WindowWidth = 2
    if "VOILUTFunction" in probe:
        del probe.VOILUTFunction
    got = apply_windowing(np.array([-np.inf, np.inf]), probe, 0)
    assert got[0] == y_min and got[1] == y_max, (got, y_min, y_max)
    return float(y_min), float(y_max)


def apply_voi_lut_exact(x: np.ndarray, ds, item) -> np.ndarray:
    """pydicom's apply_voi_lut (VOI LUT branch) on float64 x, without its float->uint16 casts."""
    desc = item.LUTDescriptor
    n = int(desc[0]) or 2**16
    first = int(desc[1])
    xi = np.floor(np.clip(x, first - 1, first + n - 1)).astype(np.int64)
    return apply_voi_lut(xi, ds, index=0, prefer_lut=True)


def mono_to_u8(stored: np.ndarray, ds, policy: dict, debug: dict) -> np.ndarray:
    x = apply_modality_lut(stored, ds).astype(np.float64)
    pad = padding_mask(stored, ds)
    kind = policy["kind"]
    if kind == "header":
        item = voi_lut_item(ds)
        if item is not None:
            kind = "header:voi_lut"
            y = apply_voi_lut_exact(x, ds, item).astype(np.float64)
            y_min, y_max = 0.0, float(2 ** int(item.LUTDescriptor[2]) - 1)
        elif has_window(ds):
            kind = "header:window:" + str(getattr(ds, "VOILUTFunction", "LINEAR")).upper()
            y_min, y_max = window_range(ds)
            y = apply_voi_lut(x.copy(), ds, index=0, prefer_lut=True)
            elem_c, elem_w = ds["WindowCenter"], ds["WindowWidth"]
            debug["center"] = float(elem_c.value[0] if elem_c.VM > 1 else elem_c.value)
            debug["width"] = float(elem_w.value[0] if elem_w.VM > 1 else elem_w.value)
        else:
            kind = "header:minmax"
    if kind == "fixed":
        ds2 = copy.deepcopy(ds)
        with warnings.catch_warnings():  # a float whose repr exceeds 16 characters is fine here
            warnings.simplefilter("ignore")
            ds2.WindowCenter = policy["center"]
            ds2.WindowWidth = policy["width"]
        assert float(ds2.WindowCenter) == policy["center"] and float(ds2.WindowWidth) == policy["width"]
        if "VOILUTFunction" in ds2:
            del ds2.VOILUTFunction
        y_min, y_max = window_range(ds2)
        y = apply_windowing(x.copy(), ds2, 0)
        debug["center"], debug["width"] = policy["center"], policy["width"]
    if kind in ("minmax", "header:minmax", "percentile"):
        v = x[~pad]
        if v.size == 0:
            debug.update(kind=kind, empty=True)
            return np.zeros(stored.shape, dtype=np.uint8)
        if kind == "percentile":
            lo = float(np.percentile(v, policy["lo"]))
            hi = float(np.percentile(v, policy["hi"]))
            y = np.clip(x, lo, hi)
        else:
            lo, hi = float(v.min()), float(v.max())
            y = x
        y_min, y_max = lo, hi
    y = np.asarray(y, dtype=np.float64)
    debug.update(kind=kind, y_min=y_min, y_max=y_max, x_min=float(x.min()), x_max=float(x.max()),
                 padded=int(pad.sum()))

    if y_max == y_min:
        t = np.zeros(y.shape, dtype=np.float64)
    else:
        t = (y - y_min) / (y_max - y_min)
    t = np.clip(t, 0.0, 1.0)
    if policy["output"] == "float":
        # output = "float": the unrounded level t * 255 as float32 (Pillow mode "F" downstream).
        v = (t * 255.0).astype(np.float32)
        if ds.PhotometricInterpretation == "MONOCHROME1":
            v = np.float32(255.0) - v
        v[pad] = 0.0
        return v
    u8 = np.floor(t * 255.0 + 0.5).astype(np.uint8)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        u8 = 255 - u8
    u8[pad] = 0
    return u8


def decode_frames(path: str, policy: dict, debug_out=None) -> tuple[list[np.ndarray], int]:
    """Every frame as 8-bit pixels ([H,W] gray or [H,W,3] RGB) and the channel count."""
    ds = pydicom.dcmread(path)
    arr = ds.pixel_array
    spp = int(ds.SamplesPerPixel)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames == 1:
        arr = arr[None]
    if arr.shape[0] != frames:
        raise ValueError(f"pixel_array has {arr.shape[0]} frames, NumberOfFrames {frames}")
    pi = str(ds.PhotometricInterpretation)
    if spp == 3:
        if int(ds.BitsAllocated) != 8:
            raise ValueError(f"colour with BitsAllocated {ds.BitsAllocated} is not supported")
        if debug_out is not None:
            for i in range(frames):
                print(json.dumps({"frame": i, "kind": "rgb", "photometric": pi}), file=debug_out)
        return [np.ascontiguousarray(f, dtype=np.uint8) for f in arr], 3
    if spp != 1 or pi not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"unsupported SamplesPerPixel {spp} / PhotometricInterpretation {pi}")
    out = []
    for i, frame in enumerate(arr):
        dbg: dict = {"frame": i}
        out.append(mono_to_u8(frame, ds, policy, dbg))
        if debug_out is not None:
            print(json.dumps(dbg), file=debug_out)
    return out, 1


# ------------------------------------------------------------------------------------ commands


def cmd_decode(args) -> int:
    policy = parse_policy(args.policy if args.policy is not None else {"window": "header"})
    frames, channels = decode_frames(args.file, policy, sys.stderr if args.debug else None)
    h, w = frames[0].shape[:2]
    Path(args.out).write_bytes(b"".join(np.ascontiguousarray(f).tobytes() for f in frames))
    print(json.dumps({"frames": len(frames), "width": int(w), "height": int(h), "channels": channels}))
    return 0


def cmd_decode_many(args) -> int:
    """Every FILE under every policy of the JSON list, in one process: DIR/<i>-<p>.u8 as decode
    writes them, DIR/<i>.stored (monochrome: pydicom's stored values as little-endian int32,
    frames concatenated) and one JSON line per file: {"file", "frames", "width", "height",
    "channels"}, or {"file", "pydicom", "error"} when pydicom cannot read or decode it
    ("pydicom": false) or this reference has no semantics for what pydicom decoded (colour of more
    than 8 bits, PALETTE COLOR: "pydicom": true)."""
    policies = [parse_policy(p) for p in json.loads(args.policies)]
    out = Path(args.out_dir)
    for i, f in enumerate(args.files):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(f)
                arr = ds.pixel_array
                if int(ds.SamplesPerPixel) == 1:
                    stored = arr.astype("<i4")
        except Exception as e:  # noqa: BLE001  (a refusal is a result here)
            print(json.dumps({"file": f, "pydicom": False, "error": f"{type(e).__name__}: {e}"[:300]}),
                  flush=True)
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for p, policy in enumerate(policies):
                    frames, channels = decode_frames(f, policy)
                    (out / f"{i}-{p}.u8").write_bytes(
                        b"".join(np.ascontiguousarray(fr).tobytes() for fr in frames))
        except Exception as e:  # noqa: BLE001  (pydicom decodes it; this reference does not)
            print(json.dumps({"file": f, "pydicom": True, "error": f"{type(e).__name__}: {e}"[:300]}),
                  flush=True)
            continue
        if channels == 1:
            (out / f"{i}.stored").write_bytes(np.ascontiguousarray(stored).tobytes())
        h, w = frames[0].shape[:2]
        print(json.dumps({"file": f, "frames": len(frames), "width": int(w), "height": int(h),
                          "channels": channels}), flush=True)
    return 0


def cmd_preprocess(args) -> int:
    cfg = reference.load_config(Path(args.model_dir))
    inp = cfg["input"]
    if args.policy is not None:
        policy = parse_policy(args.policy)
    else:
        # The guard's keys (modality, sequences, sequence_policy) are not about pixels.
        dicom = {k: v for k, v in inp.get("dicom", {}).items() if k in ("window", "percentiles", "output")}
        policy = parse_policy(dicom)
    tensors = []
    for f in args.files:
        frames, _ = decode_frames(f, policy)
        for fr in frames:
            if fr.dtype == np.float32:
                tensors.append(preprocess_levels(fr, inp))
            else:
                tensors.append(reference.preprocess_one(Image.fromarray(fr), inp))
    batch = np.stack(tensors, axis=0)
    Path(args.out).write_bytes(batch.astype("<f4").tobytes())
    print(json.dumps({"shape": list(batch.shape)}))
    return 0


def preprocess_levels(levels: np.ndarray, inp: dict) -> np.ndarray:
    """output = "float": a float32 level plane resized by Pillow in mode "F" with the model's
    filter, replicated to 3 channels and scaled as 8-bit values are (reference.py's formulas)."""
    w, h = int(inp["width"]), int(inp["height"])
    img = Image.fromarray(levels, mode="F")
    if img.size != (w, h):
        img = img.resize((w, h), resample=reference.RESAMPLE[inp["resize_filter"]])
    x = np.repeat(np.asarray(img, dtype=np.float32)[:, :, None], 3, axis=2)
    if "mean" in inp:
        mean = np.asarray(inp["mean"], dtype=np.float32).reshape(1, 1, 3)
        std = np.asarray(inp["std"], dtype=np.float32).reshape(1, 1, 3)
        x = (x / np.float32(255.0) - mean) / std
    else:
        x = x * np.float32(inp.get("scale", 1.0)) + np.float32(inp.get("offset", 0.0))
    x = x.astype(np.float32, copy=False)
    if inp["layout"] == "NCHW":
        x = np.transpose(x, (2, 0, 1))
    return np.ascontiguousarray(x, dtype=np.float32)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("decode")
    d.add_argument("file")
    d.add_argument("--policy", help="policy JSON (default {\"window\": \"header\"})")
    d.add_argument("--out", required=True)
    d.add_argument("--debug", action="store_true", help="per-frame helper quantities on stderr")
    d.set_defaults(func=cmd_decode)

    m = sub.add_parser("decode-many")
    m.add_argument("--policies", required=True, help="JSON list of policies")
    m.add_argument("--out-dir", required=True)
    m.add_argument("files", nargs="+")
    m.set_defaults(func=cmd_decode_many)

    p = sub.add_parser("preprocess")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--policy", help="policy JSON (default: model.toml's [input.dicom])")
    p.add_argument("--out", required=True)
    p.add_argument("files", nargs="+")
    p.set_defaults(func=cmd_preprocess)

    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
