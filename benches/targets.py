#!/usr/bin/env python3
"""The CPU serving targets of the "keep the accelerator busy" issue, measured side by side on the
real path: the release server, driven by ghz as a separate process (tests/load/run_load.sh), on
this machine. Nothing is asserted; the verdicts are printed (make bench-targets).

  saturation  default ResNet-50, ghz at concurrency 16 (one image per call, the nine test images),
              against the bare ONNX Runtime loop (the `serving` bench binary, batches of 8), in
              alternating rounds; one served run per --config each round. Prints served / bare per
              round and the medians (target >= 0.97), and where an image's time went
              (brainai_stage_duration_seconds) for each config.
  overhead    tiny model (one ORT thread, queue delay 0), single-image calls of one 256x256 PNG at
              concurrency 8: the server's CPU time per call (/proc/<pid>/stat over the run) against
              the image's decode + preprocess time (the preprocess stage's mean in a run of one
              call at a time just before; target: at most 100 us more), and calls/s; one run per
              --config each round.
  latency     default ResNet-50: saturation (concurrency 16), then a fixed rate at 75 % of it; the
              p99 of that run against one batch's service time (the mean model run per batch in the
              same run; target p99 <= 2x).

Usage: benches/targets.py saturation|overhead|latency [--rounds N] [--seconds S]
           [--config NAME:FLAG,FLAG ...]   (e.g. --config io1:--io-threads=1 --config io2:--io-threads=2;
                                            an entry VAR=VALUE without dashes sets the server's environment)
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESNET = "models/brain-tumor-resnet50"
TINY = "tests/fixtures/models/tiny"


def bench_binary() -> str:
    found = [p for p in glob.glob(str(ROOT / "target/release/deps/serving-*"))
             if os.access(p, os.X_OK) and not p.endswith(".d")]
    if not found:
        sys.exit("no bench binary: run `cargo bench --locked --no-run --bench serving` first")
    return max(found, key=os.path.getmtime)


def load(out: Path, model: str, runs: str, seconds: int, server_args: list[str], extra: list[str]) -> dict:
    # A config's NAME=VALUE entries are the server's environment (e.g. GLIBC_TUNABLES=...).
    env = dict(os.environ)
    env.update(a.split("=", 1) for a in server_args if not a.startswith("-"))
    flags = [a for a in server_args if a.startswith("-")]
    cmd = [str(ROOT / "tests/load/run_load.sh"), "--runs", runs, "--duration", f"{seconds}s",
           "--model-dir", model, "--out", str(out), *extra, *[f"--server-arg={a}" for a in flags]]
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, env=env)
    s = json.loads((out / f"{runs}.summary.json").read_text())
    if sum(s["errors_by_code"].values()):
        sys.exit(f"{out}: errors under load: {s['errors_by_code']}")
    return s


def configs(a) -> list[tuple[str, list[str]]]:
    out = []
    for c in a.config or ["default:"]:
        name, _, flags = c.partition(":")
        out.append((name, [f for f in flags.split(",") if f]))
    return out


def stages_line(s: dict) -> str:
    st = s.get("stages") or {}
    order = ["decode_wait", "preprocess", "queue", "dispatch", "assemble", "run", "reply"]
    parts = [f"{k} {st[k]['mean_ms']:.3f}" for k in order if k in st]
    asm = s.get("batch_assembly") or {}
    return ", ".join(parts) + " ms" + (f"; batches in place {asm.get('in_place', 0)}, gathered {asm.get('gathered', 0)}"
                                       if asm else "")


def saturation(a) -> None:
    binary = bench_binary()
    cfgs = configs(a)
    bare, served = [], {n: [] for n, _ in cfgs}
    last = {}
    for r in range(a.rounds):
        out = subprocess.run([binary, "--bare-only", "--rounds", "1", "--seconds", str(a.seconds), "--batch", "8",
                              "--threads", "0", "--model-dir", RESNET],
                             cwd=ROOT, check=True, capture_output=True, text=True).stdout
        bare.append(float(re.search(r"bare ORT loop, batch \d+: ([\d.]+) images/s", out).group(1)))
        line = [f"round {r + 1}: bare {bare[-1]:.2f} images/s"]
        for name, flags in (cfgs if r % 2 == 0 else cfgs[::-1]):
            s = load(ROOT / a.out / f"saturation-{name}-{r + 1}", RESNET, "concurrency", a.seconds,
                     ["--max-batch-size=8", *flags],
                     ["--concurrency", "16", *(["--images", a.images] if a.images else [])])
            served[name].append(s["images_per_s"])
            last[name] = s
            line.append(f"{name} {s['images_per_s']:.2f} ({s['images_per_s'] / bare[-1]:.3f}, batch {s['mean_batch_size']:.2f})")
        print(", ".join(line), flush=True)
    print(f"median bare {statistics.median(bare):.2f} images/s")
    for name, _ in cfgs:
        ratios = [s / b for s, b in zip(served[name], bare)]
        print(f"{name}: served {statistics.median(served[name]):.2f} images/s, served/bare median "
              f"{statistics.median(ratios):.3f} (rounds {min(ratios):.3f}-{max(ratios):.3f}; target >= 0.97)")
        print(f"  where an image's time went (last round): {stages_line(last[name])}")


def overhead(a) -> None:
    cfgs = configs(a)
    rows = {n: [] for n, _ in cfgs}
    for r in range(a.rounds):
        line = [f"round {r + 1}:"]
        for name, flags in (cfgs if r % 2 == 0 else cfgs[::-1]):
            server = ["--max-queue-delay-us=0", "--intra-op-threads=1", *flags]
            # The image's own decode + preprocess time: one call at a time, nothing competing
            # for the cores (under load the preprocess stage's wall time includes preemption).
            alone = load(ROOT / a.out / f"overhead-{name}-{r + 1}-alone", TINY, "concurrency", 4, server,
                         ["--concurrency", "1", "--images", a.image])
            s = load(ROOT / a.out / f"overhead-{name}-{r + 1}", TINY, "concurrency", a.seconds, server,
                     ["--concurrency", "8", "--images", a.image])
            cpu = s["server_cpu_us_per_call"]
            pre = alone["mean_preprocess_ms"] * 1e3
            rows[name].append((s["requests_per_s"], cpu, pre, s))
            line.append(f"{name} {s['requests_per_s']:.0f} calls/s, CPU/call {cpu:.0f} us, preprocess {pre:.0f} us, "
                        f"margin {cpu - pre:+.0f} us;")
        print(" ".join(line), flush=True)
    for name, _ in cfgs:
        calls = statistics.median(x[0] for x in rows[name])
        cpu = statistics.median(x[1] for x in rows[name])
        pre = statistics.median(x[2] for x in rows[name])
        margins = sorted(x[1] - x[2] for x in rows[name])
        print(f"{name}: {calls:.0f} calls/s, server CPU/call {cpu:.0f} us, decode+preprocess {pre:.0f} us, "
              f"margin median {statistics.median(margins):+.0f} us (rounds {margins[0]:+.0f}..{margins[-1]:+.0f}; "
              f"target <= +100 us)")
        print(f"  stages (last round): {stages_line(rows[name][-1][3])}")


def latency(a) -> None:
    cfgs = configs(a)
    for name, flags in cfgs:
        sat, p99s, services, ratios = [], [], [], []
        for r in range(a.rounds):
            s = load(ROOT / a.out / f"latency-{name}-sat-{r + 1}", RESNET, "concurrency", a.seconds,
                     ["--max-batch-size=8", *flags], ["--concurrency", "16"])
            sat.append(s["requests_per_s"])
            rps = max(1, round(0.75 * s["requests_per_s"]))
            q = load(ROOT / a.out / f"latency-{name}-75-{r + 1}", RESNET, "rate", a.seconds,
                     ["--max-batch-size=8", *flags], ["--rps", str(rps)])
            p99, service = q["latency_ms"]["p99"], q["mean_inference_ms_per_batch"]
            p99s.append(p99)
            services.append(service)
            ratios.append(p99 / service)
            print(f"{name} round {r + 1}: saturation {s['requests_per_s']:.1f}/s, at {rps}/s p50 "
                  f"{q['latency_ms']['p50']:.1f} ms p99 {p99:.1f} ms, batch service {service:.1f} ms "
                  f"(mean batch {q['mean_batch_size']:.2f}), p99/service {p99 / service:.2f}; "
                  f"stages {stages_line(q)}", flush=True)
        print(f"{name}: saturation {statistics.median(sat):.1f}/s, p99 at 75 % {statistics.median(p99s):.1f} ms, "
              f"batch service {statistics.median(services):.1f} ms, p99/service median "
              f"{statistics.median(ratios):.2f} (target <= 2)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["saturation", "overhead", "latency"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=int, default=20)
    p.add_argument("--image", default="flair_256_a.png", help="overhead: the image every call sends")
    p.add_argument("--images", help="saturation: comma-separated images under tests/data (default: all nine)")
    p.add_argument("--config", action="append", help="NAME:FLAG,FLAG (repeatable; default: the defaults)")
    p.add_argument("--out", default="target/bench/targets")
    a = p.parse_args()
    {"saturation": saturation, "overhead": overhead, "latency": latency}[a.what](a)


if __name__ == "__main__":
    main()
