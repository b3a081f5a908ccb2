#!/usr/bin/env python3
"""Serving overhead of each front end, measured side by side on the real path (make bench-front-ends).

Starts the release binary on the tiny test model (one ORT thread: the model costs microseconds, so
what is measured is the front end, the pipeline and the batcher) and drives it from separate client
processes, one image per call, at a fixed concurrency:

  grpc Classify        ghz, brainai.v1.TumorClassifier/Classify via server reflection
  grpc ModelInfer      ghz, inference.GRPCInferenceService/ModelInfer via server reflection (BYTES)
  http v1.classify     hey, POST /v1/classify with the raw image as the body
  http v2.infer JSON   hey, POST /v2/models/tiny/infer, the image base64 in the JSON tensor format
  http v2.infer binary hey, POST /v2/models/tiny/infer, binary-data extension

The runs are interleaved (every round runs each front end once, in a rotated order) so drift on a
shared machine hits all of them alike; the ratio of each to Classify is taken per round and the
median printed. Target (issue 10): ModelInfer >= 0.95 x Classify's call rate. The verdict is printed,
and the exit status is non-zero only with --check.

Usage: benches/front_ends.py [--rounds 5] [--seconds 5] [--concurrency 8] [--image NAME] [--check]
                             [--only "grpc ModelInfer,..."] [--no-pin]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET = 0.95


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tool(script: str) -> str:
    return subprocess.run([str(ROOT / "tests/load" / script)], check=True, capture_output=True,
                          text=True).stdout.strip().splitlines()[-1]


def client_cpu() -> float:
    """User + system CPU time of every finished child process so far (the load clients)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def pinned(cpus: set[int] | None):
    """preexec_fn for subprocess: run the child on `cpus` (None: anywhere)."""
    return (lambda: os.sched_setaffinity(0, cpus)) if cpus else None


CLIENT_CPUS: set[int] | None = None


def ghz(ghz_bin: str, host: str, call: str, data: Path, seconds: int, concurrency: int) -> dict:
    out = subprocess.run(
        [ghz_bin, "--insecure", "--call", call, "--data-file", str(data), "--duration", f"{seconds}s",
         "--duration-stop", "wait", "--concurrency", str(concurrency), "--connections", "1",
         "--timeout", "20s", "--format", "json", "--disable-template-functions", "--disable-template-data", host],
        check=True, capture_output=True, text=True, timeout=seconds + 120,
        preexec_fn=pinned(CLIENT_CPUS)).stdout
    r = json.loads(out)
    errors = sum(v for k, v in (r.get("statusCodeDistribution") or {}).items() if k != "OK")
    lat = {d["percentage"]: d["latency"] / 1e6 for d in r.get("latencyDistribution") or []}
    return {"rps": r["rps"], "errors": errors, "p50_ms": lat.get(50), "p99_ms": lat.get(99)}


def hey(hey_bin: str, url: str, body: Path, content_type: str, seconds: int, concurrency: int,
        headers: list[str]) -> dict:
    args = [hey_bin, "-z", f"{seconds}s", "-c", str(concurrency), "-m", "POST", "-T", content_type,
            "-D", str(body)]
    for h in headers:
        args += ["-H", h]
    out = subprocess.run(args + [url], check=True, capture_output=True, text=True, timeout=seconds + 120,
                         preexec_fn=pinned(CLIENT_CPUS)).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    codes = dict(re.findall(r"\[(\d+)\]\s+(\d+) responses", out))
    errors = sum(int(n) for c, n in codes.items() if c != "200")
    def pct(p):
        m = re.search(rf"\s{p}% in ([\d.]+) secs", out)
        return float(m.group(1)) * 1000 if m else None
    return {"rps": rps, "errors": errors, "p50_ms": pct(50), "p99_ms": pct(99)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--image", default="flair_256_a.png")
    ap.add_argument("--bin", default=str(ROOT / "target/release/brainai"))
    ap.add_argument("--out", default=str(ROOT / "target/bench/front_ends.json"))
    ap.add_argument("--check", action="store_true", help="exit 1 when ModelInfer misses its target")
    ap.add_argument("--only", help="comma-separated front ends to run (grpc Classify is always run: the base)")
    ap.add_argument("--no-pin", action="store_true",
                    help="let the scheduler place the server and the clients (default: server on CPU 0, "
                         "clients on the others, so a client's own cost does not take CPU from the server)")
    a = ap.parse_args()
    global CLIENT_CPUS
    cpus = sorted(os.sched_getaffinity(0))
    server_cpus = None
    if not a.no_pin and len(cpus) >= 2:
        server_cpus, CLIENT_CPUS = {cpus[0]}, set(cpus[1:])

    ghz_bin, hey_bin = tool("install_ghz.sh"), tool("install_hey.sh")
    image = (ROOT / "tests/data" / a.image).read_bytes()
    b64 = base64.b64encode(image).decode()
    tmp = Path(tempfile.mkdtemp(prefix="brainai-bench-"))
    (tmp / "classify.json").write_text(json.dumps({"images": [{"id": "bench", "data": b64}]}))
    (tmp / "infer.json").write_text(json.dumps(
        {"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1], "contents": {"bytes_contents": [b64]}}]}))
    (tmp / "image.bin").write_bytes(image)
    (tmp / "v2.json").write_text(json.dumps(
        {"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1], "data": [b64]}]}))
    header = json.dumps({"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": len(image) + 4}}]}).encode()
    (tmp / "v2.bin").write_bytes(header + len(image).to_bytes(4, "little") + image)

    grpc, http, metrics = free_port(), free_port(), free_port()
    log = open(tmp / "server.log", "w")
    server = subprocess.Popen(
        [a.bin, "serve", "--model-dir", str(ROOT / "tests/fixtures/models/tiny"), "--grpc-addr", f"127.0.0.1:{grpc}",
         "--http-addr", f"127.0.0.1:{http}", "--metrics-addr", f"127.0.0.1:{metrics}", "--intra-op-threads", "1"],
        stdout=subprocess.DEVNULL, stderr=log, preexec_fn=pinned(server_cpus))
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/ready", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if server.poll() is not None or time.time() > deadline:
            sys.exit(f"the server did not become ready; see {tmp / 'server.log'}")
        time.sleep(0.1)

    host, base = f"127.0.0.1:{grpc}", f"http://127.0.0.1:{http}"
    s, c = a.seconds, a.concurrency
    runs = {
        "grpc Classify": lambda: ghz(ghz_bin, host, "brainai.v1.TumorClassifier/Classify", tmp / "classify.json", s, c),
        "grpc ModelInfer": lambda: ghz(ghz_bin, host, "inference.GRPCInferenceService/ModelInfer", tmp / "infer.json", s, c),
        "http v1.classify": lambda: hey(hey_bin, f"{base}/v1/classify", tmp / "image.bin", "application/octet-stream", s, c, []),
        "http v2.infer JSON": lambda: hey(hey_bin, f"{base}/v2/models/tiny/infer", tmp / "v2.json", "application/json", s, c, []),
        "http v2.infer binary": lambda: hey(hey_bin, f"{base}/v2/models/tiny/infer", tmp / "v2.bin", "application/octet-stream", s, c,
                                            [f"Inference-Header-Content-Length: {len(header)}"]),
    }
    names = [n for n in runs if not a.only or n == "grpc Classify" or n in a.only.split(",")]
    results: dict[str, list[dict]] = {n: [] for n in names}
    try:
        # Warm-up: every path once, not recorded.
        for n in names:
            runs[n]()
        for r in range(a.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for n in order:
                before, client_before = cpu_seconds(server.pid), client_cpu()
                row = runs[n]()
                calls = row["rps"] * s
                row["server_cpu_us_per_call"] = (cpu_seconds(server.pid) - before) / calls * 1e6 if calls else None
                row["client_cpu_us_per_call"] = (client_cpu() - client_before) / calls * 1e6 if calls else None
                results[n].append(row)
                print(f"round {r + 1}/{a.rounds} {n:22s} {results[n][-1]['rps']:8.0f} calls/s", flush=True)
    finally:
        server.terminate()
        server.wait(timeout=60)

    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    print(f"\nfront ends, one {a.image} per call, concurrency {c}, {a.rounds} rounds x {s} s, tiny model, "
          f"{os.cpu_count()} cores ({cpu}); "
          + (f"server pinned to CPU {sorted(server_cpus)}, clients to {sorted(CLIENT_CPUS)}" if server_cpus
             else "not pinned"))
    print(f"{'front end':22s} {'calls/s (median)':>17s} {'x Classify':>11s} {'p50 ms':>8s} {'p99 ms':>8s} "
          f"{'server CPU/call':>16s} {'client CPU/call':>16s} {'errors':>7s}")
    summary = {}
    for n in names:
        rows = results[n]
        ratio = statistics.median(x["rps"] / b["rps"] for x, b in zip(rows, results["grpc Classify"]))
        med = lambda k: statistics.median(x[k] for x in rows if x[k] is not None)
        summary[n] = {"rps": med("rps"), "ratio_to_classify": ratio, "p50_ms": med("p50_ms"),
                      "p99_ms": med("p99_ms"), "server_cpu_us_per_call": med("server_cpu_us_per_call"),
                      "client_cpu_us_per_call": med("client_cpu_us_per_call"), "errors": sum(x["errors"] for x in rows), "rounds": rows}
        print(f"{n:22s} {summary[n]['rps']:17.0f} {ratio:11.3f} {summary[n]['p50_ms']:8.2f} "
              f"{summary[n]['p99_ms']:8.2f} {summary[n]['server_cpu_us_per_call']:13.0f} µs "
              f"{summary[n]['client_cpu_us_per_call']:13.0f} µs {summary[n]['errors']:7d}")
    ok = summary["grpc ModelInfer"]["ratio_to_classify"] >= TARGET
    errors = sum(v["errors"] for v in summary.values())
    print(f"\nModelInfer / Classify = {summary['grpc ModelInfer']['ratio_to_classify']:.3f} "
          f"(target >= {TARGET}): {'MET' if ok else 'MISSED'}; error responses: {errors}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"machine": cpu, "cores": os.cpu_count(), "args": vars(a),
                                       "server_cpus": sorted(server_cpus or []),
                                       "client_cpus": sorted(CLIENT_CPUS or []), "summary": summary}, indent=1))
    print(f"results: {a.out}")
    return 1 if a.check and (not ok or errors) else 0


if __name__ == "__main__":
    sys.exit(main())
