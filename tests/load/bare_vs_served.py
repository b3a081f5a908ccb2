#!/usr/bin/env python3
"""Bare model versus the service under ghz saturation, measured side by side in one run.

    .venv/bin/python tests/load/bare_vs_served.py [--rounds 3] [--seconds 20] [--batch 8]
        [--concurrency 16] [--threads 0] [--model-dir models/brain-tumor-resnet50]

Each round runs, back to back: the bare ONNX Runtime loop (the `serving` bench binary with
--bare-only: same model, same intra-op threads, batches of --batch images) and the served model
under ghz at fixed concurrency (tests/load/run_load.sh --runs concurrency, same thread budget,
--max-batch-size --batch). Prints each round and the median ratio served / bare (target >= 0.95 on
CPU). Needs the release bench binary: `cargo bench --no-run --bench serving` builds it.
"""

import argparse
import glob
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def bench_binary() -> str:
    found = [p for p in glob.glob(str(ROOT / "target/release/deps/serving-*")) if os.access(p, os.X_OK) and not p.endswith(".d")]
    if not found:
        sys.exit("no bench binary: run `cargo bench --locked --no-run --bench serving` first")
    return max(found, key=os.path.getmtime)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=int, default=20)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--spinning", default="true", choices=["true", "false"], help="ORT intra-op spin-waiting, both sides")
    p.add_argument("--model-dir", default="models/brain-tumor-resnet50")
    p.add_argument("--out", default="target/load/bare_vs_served")
    p.add_argument("--server-arg", action="append", default=[],
                   help="extra flag for the served side, e.g. --server-arg=--io-threads=1 (repeatable)")
    a = p.parse_args()
    binary = bench_binary()
    bare, served = [], []
    for r in range(a.rounds):
        out = subprocess.run(
            [binary, "--bare-only", "--rounds", "1", "--seconds", str(a.seconds), "--batch", str(a.batch),
             "--threads", str(a.threads), "--spinning", a.spinning, "--model-dir", a.model_dir],
            cwd=ROOT, check=True, capture_output=True, text=True).stdout
        bare.append(float(re.search(r"bare ORT loop, batch \d+: ([\d.]+) images/s", out).group(1)))
        run_out = ROOT / a.out / f"round{r + 1}"
        subprocess.run(
            [str(ROOT / "tests/load/run_load.sh"), "--runs", "concurrency", "--duration", f"{a.seconds}s",
             "--concurrency", str(a.concurrency), "--model-dir", a.model_dir, "--out", str(run_out),
             f"--server-arg=--max-batch-size={a.batch}", f"--server-arg=--intra-op-threads={a.threads}",
             f"--server-arg=--intra-op-spinning={a.spinning}"] + [f"--server-arg={x}" for x in a.server_arg],
            cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        s = json.loads((run_out / "concurrency.summary.json").read_text())
        if sum(s["errors_by_code"].values()):
            sys.exit(f"round {r + 1}: errors under load: {s['errors_by_code']}")
        served.append(s["images_per_s"])
        print(f"round {r + 1}: bare {bare[-1]:.2f} images/s, served (ghz, {a.concurrency} concurrent) "
              f"{served[-1]:.2f} images/s, ratio {served[-1] / bare[-1]:.3f}, mean batch {s['mean_batch_size']:.2f}",
              flush=True)
    ratios = [s / b for s, b in zip(served, bare)]
    print(f"median: bare {statistics.median(bare):.2f} images/s, served {statistics.median(served):.2f} images/s, "
          f"ratio served/bare {statistics.median(ratios):.3f} (target >= 0.95)")


if __name__ == "__main__":
    main()
