#!/usr/bin/env python3
"""Two builds of the server side by side in one run, driven by ghz as a separate process: did a
change cost serving speed?

    .venv/bin/python tests/load/compare_builds.py --before /tmp/brainai-before \\
        [--after target/release/brainai] [--rounds 3] [--seconds 15] [--tiny-seconds 8]

Each round measures, alternating which build goes first:
- serving overhead: the tiny fixture model (microseconds of model time), one 256x256 PNG per call,
  ghz at concurrency 16, queue delay 0, one ORT thread: single-image calls/s of each build, and
  the server process's own CPU time per call (/proc/<pid>/stat), which the shared cores disturb
  far less than throughput;
- the default ResNet-50: the bare ONNX Runtime loop (the `serving` bench binary, --bare-only,
  batches of 8) and each build under ghz saturation (concurrency 16, --max-batch-size 8):
  served/bare of each build.
Prints every round and the medians. Needs ghz (`make ghz`), the bench binary
(`cargo bench --no-run --bench serving`) and the default model (`make model`).
"""

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests/load"))
from bare_vs_served import bench_binary  # noqa: E402


def ghz_run(binary: str, model_dir: str, seconds: int, out: Path, server_args: list[str], images: str | None) -> dict:
    cmd = [str(ROOT / "tests/load/run_load.sh"), "--runs", "concurrency", "--duration", f"{seconds}s",
           "--concurrency", "16", "--model-dir", model_dir, "--out", str(out)]
    if images:
        cmd += ["--images", images]
    cmd += [f"--server-arg={a}" for a in server_args]
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
                   env={**__import__("os").environ, "BRAINAI_BIN": binary})
    s = json.loads((out / "concurrency.summary.json").read_text())
    if sum(s["errors_by_code"].values()):
        sys.exit(f"{binary}: errors under load: {s['errors_by_code']}")
    return s


def bare(seconds: int) -> float:
    out = subprocess.run([bench_binary(), "--bare-only", "--rounds", "1", "--seconds", str(seconds), "--batch", "8"],
                         cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return float(out.split("images/s")[0].split(":")[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True, help="the server binary before the change")
    p.add_argument("--after", default=str(ROOT / "target/release/brainai"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=int, default=15, help="ResNet-50 runs")
    p.add_argument("--tiny-seconds", type=int, default=8)
    p.add_argument("--out", default="target/load/compare")
    a = p.parse_args()
    builds = {"before": a.before, "after": a.after}
    tiny = {k: [] for k in builds}
    cpu = {k: [] for k in builds}
    ratio = {k: [] for k in builds}
    for r in range(a.rounds):
        order = list(builds) if r % 2 == 0 else list(reversed(builds))
        for name in order:
            s = ghz_run(builds[name], "tests/fixtures/models/tiny", a.tiny_seconds, ROOT / a.out / f"r{r}-{name}-tiny",
                        ["--intra-op-threads=1", "--max-queue-delay-us=0"], "flair_256_a.png")
            tiny[name].append(s["requests_per_s"])
            cpu[name].append(s["server_cpu_us_per_call"])
        b = bare(a.seconds)
        for name in order:
            s = ghz_run(builds[name], "models/brain-tumor-resnet50", a.seconds, ROOT / a.out / f"r{r}-{name}-resnet",
                        ["--max-batch-size=8"], None)
            ratio[name].append(s["images_per_s"] / b)
        print(f"round {r + 1}: tiny calls/s before {tiny['before'][-1]:.0f}, after {tiny['after'][-1]:.0f} "
              f"(server CPU per call {cpu['before'][-1]:.0f} / {cpu['after'][-1]:.0f} µs); "
              f"ResNet-50 bare {b:.2f} img/s, served/bare before {ratio['before'][-1]:.3f}, "
              f"after {ratio['after'][-1]:.3f}", flush=True)
    med = {k: (statistics.median(tiny[k]), statistics.median(ratio[k]), statistics.median(cpu[k])) for k in builds}
    print(f"median: tiny single-image calls/s before {med['before'][0]:.0f}, after {med['after'][0]:.0f} "
          f"(after/before {med['after'][0] / med['before'][0]:.3f}); server CPU per call before "
          f"{med['before'][2]:.0f} µs, after {med['after'][2]:.0f} µs; ResNet-50 served/bare before "
          f"{med['before'][1]:.3f}, after {med['after'][1]:.3f}")


if __name__ == "__main__":
    main()
