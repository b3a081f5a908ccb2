#!/usr/bin/env python3
"""List the GPU architectures a CUDA shared library carries kernels for, and optionally require one.

    cuda_archs.py LIB.so [LIB.so ...] [--require 61]

Reads the fat binaries nvcc embeds (Python standard library only) and prints per library the SASS architectures (machine code, e.g. sm_61) and PTX versions
(JIT-compilable by a driver of that generation or newer). With `--require 61` it exits 1 unless
every library can run on sm_61: SASS of the same major version and a minor version not above it
(sm_60 machine code runs on sm_61; sm_70 does not), or PTX for compute_61 or lower (which the
driver JIT-compiles).

Used by the GPU image build (deploy/docker/Dockerfile) so that an ONNX Runtime or CUDA library
without Pascal kernels (a CUDA 13 build, for instance) fails the build instead of failing on the
Quadro P4000 at start-up.
"""
import argparse
import struct
import sys

FATBIN_MAGIC = 0xBA55ED50
KIND_PTX, KIND_SASS = 1, 2


def archs(path):
    """({sass archs}, {ptx archs}) of every fat binary container in the file.

    nvcc puts them in the ELF section `.nv_fatbin`, but some libraries (cuFFT) keep more in other
    sections for their own loader, so the whole file is scanned for the container magic; a match
    is taken only when its header and entries are consistent.
    """
    with open(path, "rb") as f:
        data = f.read()
    sass, ptx = set(), set()
    magic = struct.pack("<I", FATBIN_MAGIC)
    pos = data.find(magic)
    while pos >= 0 and pos + 16 <= len(data):
        _m, version, hsize, fsize = struct.unpack_from("<IHHQ", data, pos)
        stop = pos + hsize + fsize
        if version != 1 or hsize != 16 or stop > len(data):
            pos = data.find(magic, pos + 4)
            continue
        entry, found = pos + hsize, []
        while entry + 32 <= stop:
            kind, _v, ehsize, padded = struct.unpack_from("<HHII", data, entry)
            if ehsize < 32 or entry + ehsize + padded > stop:
                break
            sm, = struct.unpack_from("<I", data, entry + 28)
            found.append((kind, sm))
            entry += ehsize + padded
        for kind, sm in found:
            if kind == KIND_SASS:
                sass.add(sm)
            elif kind == KIND_PTX:
                ptx.add(sm)
        pos = data.find(magic, max(entry, pos + 4))
    return sass, ptx


def runs_on(sass, ptx, cc):
    """True if SASS of the same major and a minor <= cc's, or PTX <= cc, is present."""
    return any(s // 10 == cc // 10 and s <= cc for s in sass) or any(p <= cc for p in ptx)


def self_test():
    """Synthetic fat binaries (the container format, embedded in junk bytes) must be read right."""
    import os
    import tempfile

    def container(entries):
        body = b""
        for kind, sm in entries:
            payload = b"\0" * 64
            head = struct.pack("<HHIIIIIII", kind, 0x101, 64, len(payload), 0, len(payload), 0, 0, sm)
            body += head.ljust(64, b"\0") + payload
        return struct.pack("<IHHQ", FATBIN_MAGIC, 1, 16, len(body)) + body

    cases = [  # (entries, expect sass, expect ptx, runs on sm_61)
        ([(KIND_SASS, 60), (KIND_SASS, 70), (KIND_PTX, 90)], {60, 70}, {90}, True),  # ORT 1.26
        ([(KIND_SASS, 75), (KIND_SASS, 120), (KIND_PTX, 120)], {75, 120}, {120}, False),  # ORT 1.27
        ([(KIND_SASS, 52), (KIND_PTX, 52)], {52}, {52}, True),  # PTX JIT
        ([(KIND_SASS, 52)], {52}, set(), False),  # other major
        ([], set(), set(), False),
    ]
    failed = 0
    for entries, want_sass, want_ptx, want_ok in cases:
        with tempfile.NamedTemporaryFile(delete=False) as f:
            f.write(b"\x7fELF junk" + b"\x50\xed\x55" + (container(entries) if entries else b"") + b"tail")
        sass, ptx = archs(f.name)
        os.unlink(f.name)
        good = (sass, ptx) == (want_sass, want_ptx) and runs_on(sass, ptx, 61) == want_ok
        failed += not good
        print(f"  {'ok  ' if good else 'FAIL'} cuda_archs self-test: {entries} -> sass {sorted(sass)} ptx {sorted(ptx)}")
    return 1 if failed else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("libs", nargs="*")
    ap.add_argument("--require", type=int, help="compute capability that must run, e.g. 61")
    ap.add_argument("--self-test", action="store_true", help="check the parser on synthetic fat binaries")
    args = ap.parse_args()
    if args.self_test:
        return self_test()
    if not args.libs:
        ap.error("no library given")
    failed = False
    for lib in args.libs:
        sass, ptx = archs(lib)
        fmt = lambda s: " ".join(str(a) for a in sorted(s)) or "-"
        line = f"{lib}: sass sm_[{fmt(sass)}] ptx compute_[{fmt(ptx)}]"
        if args.require is not None and not sass and not ptx:
            line += "  (no device code: host-only library)"
        elif args.require is not None:
            ok = runs_on(sass, ptx, args.require)
            line += f"  sm_{args.require}: {'yes' if ok else 'NO'}"
            failed |= not ok
        print(line)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
