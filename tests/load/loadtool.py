#!/usr/bin/env python3
"""Helpers of tests/load/run_load.sh (standard library only; any Python 3.8+).

Subcommands:
  make-data   write ghz call-data JSON (protojson, image bytes base64) from tests/data images
  free-port   print a free TCP port on 127.0.0.1
  wait-ready  poll http://127.0.0.1:PORT/readyz until 200 (bounded; fails if the server dies)
  scrape      save the server's /metrics text to a file
  summarize   one run's summary from ghz's JSON report and the /metrics before/after it,
              with optional checks (non-zero exit and a clear message when one fails)
"""

import argparse
import base64
import json
import math
import os
import re
import socket
import sys
import time
import urllib.error
import urllib.request

# Every valid committed test image (tests/data/README.md): several sizes, PNG and JPEG, gray and RGB.
DEFAULT_IMAGES = [
    "flair_256_a.png",
    "flair_256_b.png",
    "flair_256_c.png",
    "flair_256_tumor.png",
    "flair_256_a.jpg",
    "flair_300x220.png",
    "flair_512_a.png",
    "flair_512_a.jpg",
    "flair_512_rgb.png",
]

FORMATS = {".png": "IMAGE_FORMAT_PNG", ".jpg": "IMAGE_FORMAT_JPEG", ".jpeg": "IMAGE_FORMAT_JPEG"}


def fail(msg):
    print(f"load test FAILED: {msg}", file=sys.stderr)
    sys.exit(1)


# ---------------------------------------------------------------------------------------------
# make-data


def load_images(data_dir, names):
    images = []
    for name in names:
        path = os.path.join(data_dir, name)
        ext = os.path.splitext(name)[1].lower()
        if ext not in FORMATS:
            fail(f"{path}: only .png/.jpg images can be used")
        with open(path, "rb") as f:
            raw = f.read()
        images.append((name, FORMATS[ext], base64.b64encode(raw).decode("ascii")))
    return images


def write_json(path, obj):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def cmd_make_data(a):
    names = a.images.split(",") if a.images else DEFAULT_IMAGES
    images = load_images(a.data_dir, names)
    os.makedirs(a.out, exist_ok=True)

    def image(i):
        name, fmt, b64 = images[i % len(images)]
        # Ids are synthetic (never patient data); the server echoes them back.
        return {"id": f"load-{i}-{name}", "data": b64, "format": fmt}

    # Classify: an array of requests; ghz sends element (request number mod length), so
    # consecutive calls cycle through the images. With k images per request the array holds
    # len(images) requests, each starting at a different image.
    k = a.images_per_request
    requests = [{"images": [image(r + j) for j in range(k)]} for r in range(len(images))]
    write_json(os.path.join(a.out, "classify.json"), requests)

    # ClassifyStream: for a client/bidi stream ghz sends the whole array on each call.
    messages = [{"image": image(i)} for i in range(a.stream_messages)]
    write_json(os.path.join(a.out, "classify_stream.json"), messages)
    # ModelInfer (Open Inference Protocol): the same images as one BYTES input tensor per call, for
    # the default model (empty name).
    infer = [
        {
            "inputs": [
                {
                    "name": "IMAGE",
                    "datatype": "BYTES",
                    "shape": [k],
                    "contents": {"bytes_contents": [images[(r + j) % len(images)][2] for j in range(k)]},
                }
            ]
        }
        for r in range(len(images))
    ]
    write_json(os.path.join(a.out, "modelinfer.json"), infer)
    print(
        f"call data in {a.out}: classify.json ({len(requests)} requests x {k} image(s)), "
        f"classify_stream.json ({len(messages)} messages per stream call), modelinfer.json; "
        f"images: {', '.join(names)}"
    )


# ---------------------------------------------------------------------------------------------
# ports, readiness, scraping


def cmd_free_port(_a):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        print(s.getsockname()[1])


def http_get(url, timeout=5.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read().decode("utf-8", "replace")


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by the shell) is not alive.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def not_ready(msg):
    print(msg, file=sys.stderr)
    sys.exit(1)


def cmd_wait_ready(a):
    url = f"http://127.0.0.1:{a.port}/readyz"
    deadline = time.monotonic() + a.timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if a.pid and not alive(a.pid):
            not_ready(f"the server (pid {a.pid}) exited before it became ready")
        try:
            status, _ = http_get(url, timeout=2.0)
            if status == 200:
                return
            last = f"HTTP {status}"
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code}"
        except (urllib.error.URLError, OSError) as e:
            last = str(getattr(e, "reason", e))
        time.sleep(0.25)
    not_ready(f"{url} not ready after {a.timeout:.0f} s (last: {last})")


def scrape(port):
    status, text = http_get(f"http://127.0.0.1:{port}/metrics", timeout=10.0)
    if status != 200:
        fail(f"/metrics answered HTTP {status}")
    return text


def cmd_scrape(a):
    text = scrape(a.port)
    with open(a.out, "w") as f:
        f.write(text)


# ---------------------------------------------------------------------------------------------
# Prometheus text format (the subset the exporter writes)

SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text):
    """{(name, frozenset(labels.items())): value}"""
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = SAMPLE.match(line)
        if not m:
            continue
        labels = frozenset(LABEL.findall(m.group(2) or ""))
        try:
            samples[(m.group(1), labels)] = float(m.group(3))
        except ValueError:
            pass
    return samples


class Delta:
    """after - before for each sample (a series absent before counts as 0)."""

    def __init__(self, before, after):
        self.before, self.after = before, after

    def get(self, name, **labels):
        """Δ of the sum of every series of `name` whose labels include `labels` (per-model series
        such as {model, version, priority} add up)."""
        want = set(labels.items())
        total = 0.0
        for (n, series), v in self.after.items():
            if n == name and want <= series:
                total += v - self.before.get((n, series), 0.0)
        return total

    def by_label(self, name, label, **fixed):
        out = {}
        for (n, labels), v in self.after.items():
            d = dict(labels)
            if n != name or label not in d or any(d.get(k) != fv for k, fv in fixed.items()):
                continue
            dv = v - self.before.get((n, labels), 0.0)
            if dv:
                out[d[label]] = out.get(d[label], 0.0) + dv
        return out

    def bucket(self, name, le):
        """Δ of the histogram bucket whose upper bound is `le` (None when there is no such bucket)."""
        found = None
        for (n, labels), v in self.after.items():
            d = dict(labels)
            if n != f"{name}_bucket" or "le" not in d:
                continue
            try:
                bound = float(d["le"])
            except ValueError:
                continue
            if bound == le:
                found = (found or 0.0) + v - self.before.get((n, labels), 0.0)
        return found

    def mean(self, name):
        count = self.get(f"{name}_count")
        return (self.get(f"{name}_sum") / count) if count > 0 else float("nan"), count


# ---------------------------------------------------------------------------------------------
# summarize


def ms(ns):
    return ns / 1e6


def fmt_ms(v):
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.1f} ms"


def fmt_num(v, digits):
    return "n/a" if math.isnan(v) else f"{v:.{digits}f}"


def percentile(report, p):
    for entry in report.get("latencyDistribution") or []:
        if entry.get("percentage") == p:
            return ms(entry["latency"])
    return None


def cmd_summarize(a):
    with open(a.report) as f:
        report = json.load(f)
    before = parse_metrics(open(a.before).read())
    after_text = open(a.after).read()
    after = parse_metrics(after_text)

    codes = {k: int(v) for k, v in (report.get("statusCodeDistribution") or {}).items()}
    ok = codes.get("OK", 0)
    calls = sum(codes.values())
    errors = {k: v for k, v in codes.items() if k != "OK"}
    seconds = (report.get("total") or 0) / 1e9

    # The server counts a call in brainai_requests_total once its response is complete, which can
    # trail the client by a moment: re-scrape (bounded) until the server has seen every call.
    if a.port:
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            seen = sum(Delta(before, after).by_label("brainai_requests_total", "code", rpc=a.rpc).values())
            if seen >= calls:
                break
            time.sleep(0.2)
            after_text = scrape(a.port)
            after = parse_metrics(after_text)
        with open(a.after, "w") as f:
            f.write(after_text)

    d = Delta(before, after)
    server_codes = {k: int(v) for k, v in d.by_label("brainai_requests_total", "code", rpc=a.rpc).items()}
    server_errors = {k: v for k, v in server_codes.items() if k != "OK"}
    images = d.get("brainai_images_total")
    batch_mean, batches = d.mean("brainai_batch_size")
    occ_mean, _ = d.mean("brainai_batch_occupancy_ratio")
    le1 = d.bucket("brainai_batch_size", 1.0)
    multi = batches - (le1 or 0.0)
    queue_mean, _ = d.mean("brainai_queue_duration_seconds")
    pre_mean, _ = d.mean("brainai_preprocess_duration_seconds")
    pre_cpu_mean, _ = d.mean("brainai_preprocess_cpu_seconds")
    inf_mean, _ = d.mean("brainai_inference_duration_seconds")
    dropped = {k: int(v) for k, v in d.by_label("brainai_dropped_total", "reason").items()}
    # Where an image's time went (brainai_stage_duration_seconds): mean per stage, and per image
    # (assemble and run are per batch: divided by the mean batch size).
    stage_sums = d.by_label("brainai_stage_duration_seconds_sum", "stage")
    stage_counts = d.by_label("brainai_stage_duration_seconds_count", "stage")
    stages = {k: {"mean_ms": 1e3 * stage_sums[k] / stage_counts[k], "count": int(stage_counts[k])}
              for k in stage_sums if stage_counts.get(k)}
    assembly = {k: int(v) for k, v in d.by_label("brainai_batch_assembly_total", "path").items()}

    s = {
        "run": a.name,
        "rpc": a.rpc,
        "description": a.description,
        "calls": calls,
        "ok": ok,
        "seconds": seconds,
        "requests_per_s": calls / seconds if seconds else 0.0,
        "images": int(images),
        "images_per_s": images / seconds if seconds else 0.0,
        "latency_ms": {
            "p50": percentile(report, 50),
            "p95": percentile(report, 95),
            "p99": percentile(report, 99),
            "mean": ms(report["average"]) if report.get("average") else None,
            "slowest": ms(report["slowest"]) if report.get("slowest") else None,
        },
        "errors_by_code": errors,
        "server_codes": server_codes,
        "batches": int(batches),
        "batches_larger_than_1": int(multi),
        "mean_batch_size": batch_mean,
        "mean_batch_occupancy": occ_mean,
        "mean_queue_ms": queue_mean * 1e3,
        "mean_preprocess_ms": pre_mean * 1e3,
        "mean_preprocess_cpu_ms": pre_cpu_mean * 1e3,
        "mean_inference_ms_per_batch": inf_mean * 1e3,
        "dropped": dropped,
        "stages": stages,
        "batch_assembly": assembly,
        "server_cpu_s": a.server_cpu_s,
        "server_cpu_us_per_call": (1e6 * a.server_cpu_s / calls) if a.server_cpu_s is not None and calls else None,
        "ghz_end_reason": report.get("endReason"),
        "report": a.report,
    }
    if a.summary_json:
        write_json(a.summary_json, s)

    lat = s["latency_ms"]
    err_txt = ", ".join(f"{k}={v}" for k, v in sorted(errors.items())) or "none"
    srv_txt = ", ".join(f"{k}={v}" for k, v in sorted(server_codes.items())) or "none"
    drop_txt = ", ".join(f"{k}={v}" for k, v in sorted(dropped.items()) if v) or "none"
    pct = f" ({100.0 * multi / batches:.0f}%)" if batches else ""
    lines = [
        f"== {a.name}: {a.description} ==",
        f"  requests/s    {s['requests_per_s']:.1f}  ({calls} calls in {seconds:.2f} s, {ok} OK)",
        f"  images/s      {s['images_per_s']:.1f}  ({int(images)} images classified, server brainai_images_total)",
        f"  latency       p50 {fmt_ms(lat['p50'])}   p95 {fmt_ms(lat['p95'])}   p99 {fmt_ms(lat['p99'])}"
        f"   (mean {fmt_ms(lat['mean'])}, max {fmt_ms(lat['slowest'])}; OK calls only)",
        f"  errors        {err_txt}   (server {a.rpc}: {srv_txt})",
        f"  batching      mean batch size {fmt_num(batch_mean, 2)}, mean occupancy {fmt_num(occ_mean, 3)}"
        f"   ({int(batches)} batches, {int(multi)} larger than 1{pct})",
        *([f"  server CPU    {s['server_cpu_us_per_call']:.0f} µs per call ({a.server_cpu_s:.2f} s of CPU, /proc/<pid>/stat)"]
          if s["server_cpu_us_per_call"] is not None else []),
        f"  server time   queue {fmt_ms(s['mean_queue_ms'])} per image, preprocess {fmt_ms(s['mean_preprocess_ms'])} per image,"
        f" inference {fmt_ms(s['mean_inference_ms_per_batch'])} per batch; dropped: {drop_txt}",
        *([f"  stages        " + ", ".join(f"{k} {v['mean_ms']:.3f}" for k, v in stages.items())
           + " ms (mean; assemble and run per batch)"] if stages else []),
        *([f"  assembly      " + ", ".join(f"{k} {v}" for k, v in sorted(assembly.items())) + " batches"]
          if assembly else []),
        f"  report        {a.report}",
    ]
    text = "\n".join(lines)
    print(text)
    if a.summary_text:
        with open(a.summary_text, "a") as f:
            f.write(text + "\n\n")

    # --- checks -----------------------------------------------------------------------------
    problems = []
    if a.check_no_errors:
        if calls == 0:
            problems.append("ghz made no calls")
        if errors:
            detail = "; ".join(f"{k}: {v}" for k, v in (report.get("errorDistribution") or {}).items())
            problems.append(f"error responses {err_txt} ({detail[:500]})")
        if server_errors:
            problems.append(f"the server answered {a.rpc} with errors: {srv_txt}")
        if any(dropped.values()):
            problems.append(f"the server dropped images: {drop_txt}")
    if a.check_batching and batches > 0 and le1 is None:
        problems.append('brainai_batch_size has no bucket le="1": cannot tell batches larger than 1')
    elif a.check_batching and multi <= 0:
        problems.append(
            f"no batch larger than 1 under concurrent load ({int(batches)} batches, "
            f"delta brainai_batch_size_count - brainai_batch_size_bucket{{le=\"1\"}} = {int(multi)})"
        )
    if a.check_stream_images:
        want = ok * a.check_stream_images
        if int(images) != want:
            problems.append(
                f"{ok} OK stream calls x {a.check_stream_images} images should classify {want} images, "
                f"the server classified {int(images)} (some images got error responses?)"
            )
    if problems:
        for p in problems:
            print(f"load test FAILED [{a.name}]: {p}", file=sys.stderr)
        sys.exit(1)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    m = sub.add_parser("make-data", help="write ghz call data from the test images")
    m.add_argument("--data-dir", default="tests/data")
    m.add_argument("--out", default="target/load/data")
    m.add_argument("--images", help="comma-separated file names in --data-dir (default: every valid test image)")
    m.add_argument("--images-per-request", type=int, default=1)
    m.add_argument("--stream-messages", type=int, default=8, help="messages per ClassifyStream call")
    m.set_defaults(fn=cmd_make_data)

    f = sub.add_parser("free-port")
    f.set_defaults(fn=cmd_free_port)

    w = sub.add_parser("wait-ready")
    w.add_argument("--port", type=int, required=True)
    w.add_argument("--pid", type=int)
    w.add_argument("--timeout", type=float, default=180.0)
    w.set_defaults(fn=cmd_wait_ready)

    s = sub.add_parser("scrape")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--out", required=True)
    s.set_defaults(fn=cmd_scrape)

    z = sub.add_parser("summarize")
    z.add_argument("--name", required=True)
    z.add_argument("--description", default="")
    z.add_argument("--rpc", default="Classify")
    z.add_argument("--report", required=True, help="ghz --format json report")
    z.add_argument("--before", required=True, help="/metrics text before the run")
    z.add_argument("--after", required=True, help="/metrics text after the run (rewritten if re-scraped)")
    z.add_argument("--port", type=int, help="metrics port, to re-scrape until the server has counted every call")
    z.add_argument("--summary-json")
    z.add_argument("--summary-text", help="append the printed summary to this file")
    z.add_argument("--server-cpu-s", type=float, help="CPU seconds the server process used during the run")
    z.add_argument("--check-no-errors", action="store_true")
    z.add_argument("--check-batching", action="store_true")
    z.add_argument("--check-stream-images", type=int, default=0, metavar="N",
                   help="every OK stream call must have classified N images")
    z.set_defaults(fn=cmd_summarize)

    a = p.parse_args()
    if getattr(a, "images_per_request", 1) < 1 or getattr(a, "stream_messages", 1) < 1:
        fail("--images-per-request and --stream-messages must be >= 1")
    a.fn(a)


if __name__ == "__main__":
    main()
