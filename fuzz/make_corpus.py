#!/usr/bin/env python3
"""Writes the seed corpus of the fuzz targets (src/fuzzing.rs) into fuzz/corpus/<target>/.

    .venv/bin/python fuzz/make_corpus.py

Deterministic. Seeds: small images in every encoding the service takes (from
tests/reference/sweep.py formats, plus raw pixels), each behind the target's two selector bytes;
the repository's model.toml files and variants; protobuf-encoded requests; grpc-timeout strings;
the PDUs of DICOM associations (C-ECHO, C-STORE of a tiny MR instance, release, abort) and DIMSE
command sets.
`make fuzz` adds what AFL++ finds (fuzz/corpus/<target>/afl-*); crashes it finds go to
fuzz/regressions/<target>/, which tests/fuzz.rs replays in every `make test`.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "fuzz" / "corpus"


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field(number: int, value: bytes | int) -> bytes:
    if isinstance(value, int):
        return varint(number << 3) + varint(value)
    return varint(number << 3 | 2) + varint(len(value)) + value


def image_msg(id_: bytes, data: bytes, fmt: int = 0, raw: tuple[int, int, int] | None = None) -> bytes:
    msg = field(1, id_) + field(2, data) + (field(3, fmt) if fmt else b"")
    if raw:
        msg += field(4, field(1, raw[0]) + field(2, raw[1]) + field(3, raw[2]))
    return msg


def packed(values: list[int]) -> bytes:
    return b"".join(varint(v & 0xFFFFFFFFFFFFFFFF) for v in values)


def param(key: bytes, choice: int, value: bytes | int) -> bytes:
    """A map<string, InferParameter> entry: 1 bool, 2 int64, 3 string."""
    return field(1, key) + field(2, field(choice, value))


def oip_seeds(png: bytes, jpeg: bytes) -> None:
    """ModelInferRequest protobufs, v2 JSON (+ binary) bodies and /v1/classify bodies."""
    import base64
    import json
    import struct

    def tensor(name: bytes, dtype: bytes, shape: list[int], contents: bytes = b"", params: bytes = b"") -> bytes:
        t = field(1, name) + field(2, dtype) + field(3, packed(shape)) + params
        return t + (field(5, contents) if contents else b"")

    typed = tensor(b"IMAGE", b"BYTES", [2], field(8, png) + field(8, jpeg))
    write("oip_grpc_request", "seed-bytes-typed", field(1, b"tiny") + field(3, b"id") + field(5, typed)
          + field(6, field(1, b"probabilities") + field(2, param(b"classification", 2, 2)))
          + field(4, param(b"timeout", 2, 100000)) + field(4, param(b"priority", 2, 1)))
    raw = struct.pack("<I", len(png)) + png
    write("oip_grpc_request", "seed-bytes-raw", field(1, b"tiny") + field(5, tensor(b"IMAGE", b"BYTES", [1, 1]))
          + field(7, raw) + field(6, field(1, b"label")))
    floats = struct.pack("<3072f", *([0.25] * 3072))
    write("oip_grpc_request", "seed-fp32-raw", field(5, tensor(b"input", b"FP32", [1, 3, 32, 32])) + field(7, floats))
    write("oip_grpc_request", "seed-fp32-typed", field(5, tensor(b"input", b"FP32", [1, 3, 32, 32], field(6, floats))))
    write("oip_grpc_request", "seed-int8", field(5, tensor(b"input", b"INT8", [1], field(2, packed([1])))))

    def body(doc: dict, binary: bytes = b"") -> bytes:
        text = json.dumps(doc).encode()
        if not binary:
            return bytes([0, 0, 0]) + text
        return bytes([1]) + struct.pack("<H", len(text)) + text + binary

    b64 = base64.b64encode(png).decode()
    write("oip_http_request", "seed-json-bytes", body({"id": "x", "parameters": {"timeout": 1000, "priority": 2},
          "inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1], "data": [b64]}],
          "outputs": [{"name": "probabilities", "parameters": {"classification": 1}}]}))
    write("oip_http_request", "seed-json-fp32", body({"inputs": [{"name": "input", "datatype": "FP32",
          "shape": [1, 3, 2, 2], "data": [[[0.5, 1], [2, 3]], [[4, 5], [6, 7]], [[8, 9], [10, 11]]]}]}))
    write("oip_http_request", "seed-binary-bytes", body({"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1, 1],
          "parameters": {"binary_data_size": len(raw)}}], "parameters": {"binary_data_output": True}}, raw))
    write("oip_http_request", "seed-binary-fp32", body({"inputs": [{"name": "input", "datatype": "FP32",
          "shape": [1, 3, 32, 32], "parameters": {"binary_data_size": len(floats)}}],
          "outputs": [{"name": "label", "parameters": {"binary_data": True}}]}, floats))

    part = lambda name, data: b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"" + name + b"\"\r\n\r\n" + data + b"\r\n"
    write("upload", "seed-multipart", bytes([1]) + part(b"a.png", png) + part(b"b.jpg", jpeg) + b"--b--\r\n")
    write("upload", "seed-raw", bytes([0]) + png)


def prescan_seeds() -> None:
    """The differential pre-scan target: byte 0 the method (0 Classify, 1 ClassifySeries,
    2 ModelInfer), byte 1 where the body splits, then the message."""
    img = field(1, image_msg(b"a", b"\x89PNG"))
    group = varint(9 << 3 | 3) + field(1, 7) + varint(9 << 3 | 4)
    for n in (0, 3, 4):
        write("prescan", f"seed-classify-{n}", bytes([0, 128]) + img * n + field(2, b"tiny"))
        write("prescan", f"seed-series-{n}", bytes([1, 64]) + img * n)
    write("prescan", "seed-classify-group", bytes([0, 3]) + group + img * 4)
    shape = field(3, packed([1, 3, 32, 32]))
    tensor = field(1, b"input") + field(2, b"FP32") + shape
    write("prescan", "seed-infer", bytes([2, 0]) + field(5, tensor) + field(4, param(b"k", 1, 1)))
    contents = field(5, field(8, b"x") * 2)
    write("prescan", "seed-infer-bytes", bytes([2, 0]) + field(5, field(2, b"BYTES") + contents * 2))
    write("prescan", "seed-infer-unpacked-shape", bytes([2, 0]) + field(5, b"".join(field(3, 1) for _ in range(9))))


def seq_image(sequence: bytes, image: bytes) -> bytes:
    """A SequenceImage: sequence (1), image (2)."""
    return field(1, sequence) + field(2, image)


def segment_seeds(png: bytes, jpeg: bytes) -> None:
    """`segment_request` (a SegmentRequest) and the `prescan` target's Segment method (byte 0 = 3)."""
    good = field(1, b"s0") + b"".join(field(2, seq_image(s, image_msg(b"", png))) for s in (b"FLAIR", b"t1c", b"T2"))
    write("segment_request", "seed-one-slice", field(1, good) + field(2, b"seg") + field(5, 1))
    write("segment_request", "seed-two-slices-jpeg", field(1, good) + field(1, field(1, b"s1") + b"".join(
        field(2, seq_image(s, image_msg(b"", jpeg, 2))) for s in (b"T2", b"FLAIR", b"T1ce"))))
    write("segment_request", "seed-missing-duplicate", field(1, field(2, seq_image(b"FLAIR", image_msg(b"", png))) * 2))
    write("segment_request", "seed-raw", field(1, b"".join(
        field(2, seq_image(s, image_msg(b"", bytes(4), 3, (2, 2, 1)))) for s in (b"FLAIR", b"T1c", b"T2"))))
    write("prescan", "seed-segment", bytes([3, 0]) + field(1, good) * 3)
    write("prescan", "seed-segment-many-images", bytes([3, 0]) + field(1, field(2, b"") * 9))


# DICOM data elements, Implicit (`vr=None`) or Explicit VR Little Endian.
def element(group: int, elem: int, value: bytes, vr: bytes | None = None) -> bytes:
    import struct
    if len(value) % 2:
        # UIDs and binary values are padded with NUL, text with a space.
        value += b"\0" if value[:1].isdigit() or vr in (b"UI", b"OB", b"OW") else b" "
    head = struct.pack("<HH", group, elem)
    if vr is None:
        return head + struct.pack("<I", len(value)) + value
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT"):
        return head + vr + b"\0\0" + struct.pack("<I", len(value)) + value
    return head + vr + struct.pack("<H", len(value)) + value


def us(n: int) -> bytes:
    return n.to_bytes(2, "little")


MR_STORAGE = b"1.2.840.10008.5.1.4.1.1.4"
VERIFICATION = b"1.2.840.10008.1.1"


def command_set(field: int, message_id: int, sop_class: bytes, sop_instance: bytes | None, data_set: bool) -> bytes:
    """A DIMSE command set (always Implicit VR Little Endian), with its group length."""
    body = element(0x0000, 0x0002, sop_class) + element(0x0000, 0x0100, us(field))
    body += element(0x0000, 0x0110, us(message_id))
    if field == 0x0001:
        body += element(0x0000, 0x0700, us(0))
    body += element(0x0000, 0x0800, us(0x0000 if data_set else 0x0101))
    if sop_instance is not None:
        body += element(0x0000, 0x1000, sop_instance)
    return element(0x0000, 0x0000, len(body).to_bytes(4, "little")) + body


def mr_data_set(sop_instance: bytes, study: bytes = b"1.2.826.0.1.3680043.10.1", explicit: bool = False,
                extra: bytes = b"") -> bytes:
    """A tiny MR instance (2x2, 16-bit) without File Meta Information, as a C-STORE sends it."""
    vr = (lambda v: v) if explicit else (lambda v: None)
    return b"".join([
        element(0x0008, 0x0016, MR_STORAGE, vr(b"UI")),
        element(0x0008, 0x0018, sop_instance, vr(b"UI")),
        element(0x0008, 0x0060, b"MR", vr(b"CS")),
        element(0x0008, 0x103E, b"AX FLAIR" + extra, vr(b"LO")),
        element(0x0010, 0x0020, b"FUZZ", vr(b"LO")),
        element(0x0020, 0x000D, study, vr(b"UI")),
        element(0x0020, 0x000E, study + b".1", vr(b"UI")),
        element(0x0028, 0x0002, us(1), vr(b"US")),
        element(0x0028, 0x0004, b"MONOCHROME2", vr(b"CS")),
        element(0x0028, 0x0010, us(2), vr(b"US")),
        element(0x0028, 0x0011, us(2), vr(b"US")),
        element(0x0028, 0x0100, us(16), vr(b"US")),
        element(0x0028, 0x0101, us(12), vr(b"US")),
        element(0x0028, 0x0102, us(11), vr(b"US")),
        element(0x0028, 0x0103, us(0), vr(b"US")),
        element(0x7FE0, 0x0010, bytes(range(8)), vr(b"OW")),
    ])


def pdv(context: int, data: bytes, command: bool, last: bool) -> bytes:
    """A presentation data value item: length, context ID, message control header, fragment."""
    return (2 + len(data)).to_bytes(4, "big") + bytes([context, int(command) | int(last) << 1]) + data


def p_data(*pdvs: bytes) -> bytes:
    """A P-DATA-TF PDU (type 04H)."""
    body = b"".join(pdvs)
    return b"\x04\x00" + len(body).to_bytes(4, "big") + body


RELEASE_RQ = b"\x05\x00\x00\x00\x00\x04" + bytes(4)
ABORT = b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00"


def store(context: int, message_id: int, sop: bytes, data_set: bytes, split: bool = True) -> bytes:
    """A C-STORE: its command set in one P-DATA, its data set in two PDVs (two P-DATAs or one)."""
    cut = len(data_set) // 2
    command = p_data(pdv(context, command_set(0x0001, message_id, MR_STORAGE, sop, True), True, True))
    first, second = pdv(context, data_set[:cut], False, False), pdv(context, data_set[cut:], False, True)
    return command + (p_data(first) + p_data(second) if split else p_data(first, second))


def association_seeds() -> None:
    """`dicom_association`: byte 0 the presentation contexts (0: context 1 MR Image Storage in
    Implicit VR LE, 3 Verification, 5 MR Image Storage in Explicit VR LE, all accepted), byte 1 the
    spool cap, maximum PDU, draining and a second association (0: 1 MiB, 64 KiB, no, no); then the
    PDUs the peer sends after the A-ASSOCIATE-AC. And `dimse_command`: command sets."""
    import zlib

    echo = command_set(0x0030, 1, VERIFICATION, None, False)
    sop, sop2 = b"1.2.826.0.1.3680043.10.1.1.1", b"1.2.826.0.1.3680043.10.1.1.2"
    mr = mr_data_set(sop)
    a = lambda name, control, wire: write("dicom_association", f"seed-{name}", bytes(control) + wire)
    a("echo-release", [0, 0], p_data(pdv(3, echo, True, True)) + RELEASE_RQ)
    a("echo-split-release", [0, 0], p_data(pdv(3, echo[:20], True, False)) + p_data(pdv(3, echo[20:], True, True))
      + p_data(pdv(3, echo, True, True)) + RELEASE_RQ)
    a("store-release", [0, 0], store(1, 1, sop, mr) + RELEASE_RQ)
    a("store-one-pdu-release", [0, 0], store(1, 1, sop, mr, split=False) + RELEASE_RQ)
    a("store-two-echo-release", [0, 0], store(1, 1, sop, mr) + store(1, 2, sop2, mr_data_set(sop2))
      + p_data(pdv(3, echo, True, True)) + RELEASE_RQ)
    a("store-two-studies-release", [0, 0], store(1, 1, sop, mr)
      + store(1, 2, sop2, mr_data_set(sop2, b"1.2.826.0.1.3680043.10.2")) + RELEASE_RQ)
    a("store-explicit-release", [0, 0], store(5, 1, sop, mr_data_set(sop, explicit=True)) + RELEASE_RQ)
    a("store-explicit-context1-release", [1, 0], store(1, 1, sop, mr_data_set(sop, explicit=True)) + RELEASE_RQ)
    a("store-deflated-release", [3, 0], store(1, 1, sop, zlib.compress(mr_data_set(sop, explicit=True))[2:-4])
      + RELEASE_RQ)
    a("store-abort", [0, 0], store(1, 1, sop, mr) + ABORT)
    a("store-cut", [0, 0], store(1, 1, sop, mr)[:-20])
    a("store-release-mid-data-set", [0, 0], store(1, 1, sop, mr)[:-(len(mr) - len(mr) // 2 + 12)] + RELEASE_RQ)
    a("store-again-abort", [0, 0], store(1, 1, sop, mr) + store(1, 2, sop, mr_data_set(sop, extra=b" AGAIN")) + ABORT)
    a("store-again-release", [0, 0], store(1, 1, sop, mr) + store(1, 2, sop, mr_data_set(sop, extra=b" AGAIN"))
      + RELEASE_RQ)
    a("two-associations", [0, 0x20], store(1, 1, sop, mr) + RELEASE_RQ + store(1, 1, sop, mr_data_set(sop, extra=b"!!"))
      + store(1, 2, sop2, mr_data_set(sop2)) + ABORT)
    a("store-draining", [0, 0x10], store(1, 1, sop, mr) + RELEASE_RQ)
    a("echo-on-storage-context", [0, 0], p_data(pdv(1, echo, True, True)) + RELEASE_RQ)
    a("response-to-the-node", [0, 0], p_data(pdv(3, command_set(0x8030, 1, VERIFICATION, None, False), True, True))
      + RELEASE_RQ)
    a("store-spool-full", [0, 0x03], store(1, 1, sop, mr) + store(1, 2, sop2, mr_data_set(sop2)) + RELEASE_RQ)
    a("store-rejected-context", [4, 0], store(1, 1, sop, mr) + RELEASE_RQ)
    a("store-verification-context", [0x40, 0], store(1, 1, sop, mr) + RELEASE_RQ)
    a("store-padded-uids", [0x20, 0x04], store(1, 1, sop, mr) + RELEASE_RQ)
    a("store-instance-mismatch", [0, 0], store(1, 1, sop2, mr) + RELEASE_RQ)
    a("store-data-on-other-context", [0, 0], p_data(pdv(1, command_set(0x0001, 1, MR_STORAGE, sop, True), True, True))
      + p_data(pdv(5, mr, False, True)) + RELEASE_RQ)
    a("find-release", [0, 0], p_data(pdv(1, command_set(0x0020, 1, MR_STORAGE, None, False), True, True)) + RELEASE_RQ)
    a("associate-rq-mid-association", [0, 0], b"\x01\x00\x00\x00\x00\x04" + bytes(4))

    c = lambda name, data: write("dimse_command", f"seed-{name}", data)
    c("echo-rq", echo)
    c("store-rq", command_set(0x0001, 7, MR_STORAGE, sop, True))
    c("find-rq", command_set(0x0020, 3, MR_STORAGE, None, False))
    c("no-group-length", command_set(0x0030, 9, VERIFICATION, None, False)[12:])
    rsp = element(0x0000, 0x0100, us(0x8001)) + element(0x0000, 0x0120, us(7)) + element(0x0000, 0x0800, us(0x0101))
    c("store-rsp", rsp + element(0x0000, 0x0900, us(0xA700)) + element(0x0000, 0x0902, b"the spool is full"))


def write(target: str, name: str, data: bytes) -> None:
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data)


def main() -> int:
    for d in CORPUS.glob("*"):
        for f in d.glob("seed-*"):
            f.unlink()
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, str(ROOT / "tests/reference/sweep.py"), "formats", "--out", tmp],
                       check=True, stdout=subprocess.DEVNULL)
        images = {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.suffix in (".png", ".jpg")}
    # Selector byte 0: layout, colour, filter, size, 16-bit policy; byte 1: encoding (0 detect).
    selectors = [0x21, 0x16, 0x3B, 0x4C, 0x05]
    for i, (name, data) in enumerate(images.items()):
        write("image", f"seed-{name}", bytes([selectors[i % len(selectors)], 0]) + data)
    write("image", "seed-declared-png", bytes([0x20, 1]) + images["gray8.png"])
    write("image", "seed-declared-jpeg", bytes([0x20, 2]) + images["gray.jpg"])
    for w, h, c in [(3, 2, 1), (5, 4, 3), (2, 2, 4)]:
        write("image", f"seed-raw-{w}x{h}x{c}", bytes([0x10, 3]) + w.to_bytes(2, "little")
              + h.to_bytes(2, "little") + bytes([c]) + bytes(range(w * h * c)))

    # DICOM: the test files (tests/data/dicom, good and hostile, but the two large ones); selector
    # byte: colour, window policy, sequence guard and its policy.
    dicom = sorted(p for p in (ROOT / "tests/data/dicom").rglob("*.dcm") if p.stat().st_size <= 40_000)
    for i, p in enumerate(dicom):
        prefix = "bad-" if p.parent.name == "bad" else ""
        write("dicom", f"seed-{prefix}{p.name}", bytes([(i * 5) % 32]) + p.read_bytes())

    tomls = sorted(ROOT.glob("tests/fixtures/models/*/model.toml")) + [ROOT / "models/brain-tumor-resnet50/model.toml"]
    for p in tomls:
        write("model_toml", f"seed-{p.parent.name}.toml", p.read_bytes())
    base = (ROOT / "tests/fixtures/models/tiny/model.toml").read_text()
    write("model_toml", "seed-batching-versions.toml", (base + "\n[batching]\nmax_batch_size = 4\ninstances = 2\n"
          "default_priority = \"stat\"\nmax_queue_wait_ms = 500\n\n[versions]\npolicy = \"latest\"\nlatest = 2\n").encode())
    write("model_toml", "seed-specific.toml", (base + "\n[versions]\npolicy = \"specific\"\nspecific = [1, 3]\n").encode())
    write("model_toml", "seed-sixteen-bit.toml", base.replace('resize_filter = "bilinear"',
          'resize_filter = "bilinear"\nsixteen_bit = "scale"').encode())
    write("model_toml", "seed-dicom-series.toml", (base + "\n[input.dicom]\nwindow = \"percentile\"\n"
          "percentiles = [0.5, 99.5]\nmodality = [\"MR\"]\nsequences = [\"FLAIR\", \"T2\"]\n"
          "sequence_policy = \"warn\"\n\n[series]\ncentral_fraction = 0.6\naggregation = \"mean_top_k\"\n"
          "top_k = 2\nfinding = \"tumor\"\n").encode())

    small = images["gray8.png"]
    write("classify_request", "seed-one-png", field(1, image_msg(b"a", small)))
    write("classify_request", "seed-two-and-model", field(1, image_msg(b"a", small)) +
          field(1, image_msg(b"b", images["gray.jpg"], 2)) + field(2, b"tiny") + field(3, b"1") + field(4, 1))
    write("classify_request", "seed-raw", field(1, image_msg(b"r", bytes(12), 3, (2, 2, 3))))
    write("stream_request", "seed-message", field(1, image_msg(b"s", small)) + field(2, b"tiny") + field(4, 2))
    write("stream_request", "seed-get-model", field(1, b"tiny") + field(2, b"2"))

    oip_seeds(small, images["gray.jpg"])
    prescan_seeds()
    segment_seeds(small, images["gray.jpg"])
    association_seeds()

    for i, t in enumerate(["100m", "5S", "2M", "1H", "7u", "3n", "99999999S", "0m", "1x", ""]):
        write("grpc_timeout", f"seed-{i}", t.encode())
    count = sum(1 for _ in CORPUS.rglob("seed-*"))
    size = sum(p.stat().st_size for p in CORPUS.rglob("seed-*"))
    print(f"{count} seeds, {size / 1024:.0f} KiB, in {CORPUS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
