#!/usr/bin/env python3
"""Writes fuzz/regressions/dicom/prescan-*: files the DICOM pre-scan once walked differently from
dicom-rs, so that dicom-rs met a declared length the pre-scan never checked and allocated it
(issue 22, finding 36: AFL++ found the first shape, an unknown VR on (0010,0010), whose 2-byte
length the pre-scan read where dicom-rs reads reserved bytes and a 4-byte length: 1,852,796,481
bytes, the ASCII of "Anon").

    .venv/bin/python fuzz/make_prescan_regressions.py

Deterministic: each file is an edit of a file of tests/data/dicom, behind the dicom target's
selector byte (0). tests/fuzz.rs replays them; tests/alloc.rs checks each is refused without a
large allocation.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests/data/dicom"
OUT = ROOT / "fuzz/regressions/dicom"


def read(name: str) -> tuple[bytes, bytes, bytes]:
    """(preamble + meta group, data set) of tests/data/dicom/NAME, split where the data set starts."""
    data = (DATA / name).read_bytes()
    assert data[128:132] == b"DICM"
    (group_length,) = struct.unpack("<I", data[140:144])
    start = 144 + group_length
    return data[:start], data[start:], data


def le(tag: tuple[int, int], vr: bytes, value: bytes, length: int | None = None) -> bytes:
    """An explicit VR little-endian element."""
    n = len(value) if length is None else length
    head = struct.pack("<HH", *tag) + vr
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"UC", b"UR", b"OD", b"OF", b"OL", b"OV", b"SV", b"UV"):
        return head + b"\0\0" + struct.pack("<I", n) + value
    return head + struct.pack("<H", n) + value


def header(tag: tuple[int, int], length: int) -> bytes:
    """An item or delimiter header."""
    return struct.pack("<HHI", *tag, length)


def unknown_vr(dataset: bytes, pattern: bytes) -> bytes:
    """(0010,0010) with its VR "PN" changed to "PM", which no dictionary knows."""
    at = dataset.index(pattern)
    out = bytearray(dataset)
    out[at + 4 : at + 6] = b"PM"
    return bytes(out)


def write(name: str, data: bytes) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / name).write_bytes(b"\x00" + data)
    print(f"{name}: {len(data)} bytes")


def main() -> int:
    PN_LE = b"\x10\x00\x10\x00PN"
    PN_BE = b"\x00\x10\x00\x10PN"

    # The AFL++ shape: the pre-scan read a 2-byte length (10), dicom-rs the 4 bytes "Anon".
    meta, dataset, _ = read("ts_explicit_le.dcm")
    write("prescan-unknown-vr", meta + unknown_vr(dataset, PN_LE))

    # The same in big endian: 4 bytes "Anon" read big-endian, 1 GiB.
    meta, dataset, _ = read("ts_explicit_be.dcm")
    write("prescan-unknown-vr-big-endian", meta + unknown_vr(dataset, PN_BE))

    # The same inside an item of a sequence of undefined length.
    meta, dataset, _ = read("ts_explicit_le.dcm")
    at = dataset.index(PN_LE)
    (n,) = struct.unpack("<H", dataset[at + 6 : at + 8])
    element = unknown_vr(dataset[at : at + 8 + n], PN_LE)
    sequence = (
        le((0x0008, 0x1140), b"SQ", b"", 0xFFFFFFFF)
        + header((0xFFFE, 0xE000), 0xFFFFFFFF)
        + element
        + header((0xFFFE, 0xE00D), 0)
        + header((0xFFFE, 0xE0DD), 0)
    )
    write("prescan-unknown-vr-in-item", meta + dataset[:at] + sequence + dataset[at + 8 + n :])

    # The same inside a deflated data set.
    meta, dataset, _ = read("ts_deflated.dcm")
    inflated = zlib.decompress(dataset, -15)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    deflated = compressor.compress(unknown_vr(inflated, PN_LE)) + compressor.flush()
    write("prescan-unknown-vr-deflated", meta + deflated)

    # An unknown VR on the transfer syntax itself: dicom-rs reads its length from "1.2." (739 MB)
    # and allocates it before reading.
    _, _, whole = read("ts_explicit_le.dcm")
    at = whole.index(b"\x02\x00\x10\x00UI")
    write("prescan-unknown-vr-in-meta", whole[: at + 4] + b"UX" + whole[at + 6 :])

    # A meta group longer than its group length says: dicom-rs stops at the group length and reads
    # the rest as the (implicit VR) data set, so "LT" and the 2-byte length 0x4000 become a 4-byte
    # length of 1 GiB; the pre-scan walked on to the end of group 2.
    meta, dataset, _ = read("ts_implicit_le.dcm")
    extra = le((0x0002, 0x0099), b"LT", b" " * 0x4000)
    write("prescan-meta-group-length-short", meta + extra + dataset)

    # An element of group FFFE that is not an item: dicom-rs reads no VR and a 4-byte length
    # ("PN" and 0x2000: 512 MiB); the pre-scan read a VR and a 2-byte length.
    meta, dataset, _ = read("ts_explicit_le.dcm")
    odd = struct.pack("<HH", 0xFFFE, 0x0001) + b"PN" + struct.pack("<H", 0x2000) + b"\0" * 0x2000
    write("prescan-group-fffe-element", meta + odd + dataset)

    # Pixel Data with VR SQ and undefined length: dicom-rs parses its items as data sets, the
    # pre-scan skipped them as fragments. The item holds an OB element of 1.75 GiB.
    meta, dataset, _ = read("ts_explicit_le.dcm")
    at = dataset.index(b"\xe0\x7f\x10\x00")
    item = le((0x0010, 0x0010), b"OB", b"\0" * 4, 0x70000000)
    pixel_data = (
        le((0x7FE0, 0x0010), b"SQ", b"", 0xFFFFFFFF)
        + header((0xFFFE, 0xE000), len(item))
        + item
        + header((0xFFFE, 0xE0DD), 0)
    )
    write("prescan-pixel-data-sequence", meta + dataset[:at] + pixel_data)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
