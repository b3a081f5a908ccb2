#!/usr/bin/env python3
"""Latency versus load with ghz: p50/p99 at 25/50/75/100 % of the measured saturation rate, for
several settings of --max-queue-delay-us, rendered as a PNG (matplotlib) and a CSV.

    .venv/bin/python tests/load/latency_curve.py [--model-dir DIR] [--delays-us 2000,20000]
        [--duration 20s] [--concurrency 16] [--out target/load/curve] [--png docs/perf/latency_vs_load.png]

Each point is the median of --repeats `tests/load/run_load.sh --runs rate` runs (each with its
own server start, warm-up excluded); the saturation rate is measured first (median of --repeats
fixed-concurrency runs, with the first delay). Bounded: repeats x (1 + 4 x delays) runs of
--duration each, loopback only.
"""

import argparse
import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FRACTIONS = (0.25, 0.5, 0.75, 1.0)


def run(out: Path, runs: str, duration: str, extra: list[str], server_args: list[str]) -> dict:
    cmd = [str(ROOT / "tests/load/run_load.sh"), "--runs", runs, "--duration", duration, "--out", str(out), *extra]
    cmd += [f"--server-arg={a}" for a in server_args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)
    name = runs.split()[0]
    return json.loads((out / f"{name}.summary.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", default="models/brain-tumor-resnet50")
    p.add_argument("--delays-us", default="2000,20000")
    p.add_argument("--duration", default="20s")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3, help="runs per point; the median of each figure is kept")
    p.add_argument("--out", default="target/load/curve")
    p.add_argument("--png", default="docs/perf/latency_vs_load.png")
    a = p.parse_args()
    delays = [int(d) for d in a.delays_us.split(",")]
    out = ROOT / a.out
    out.mkdir(parents=True, exist_ok=True)
    base = ["--model-dir", a.model_dir]
    batch = [f"--max-batch-size={a.max_batch_size}"]

    sats = [
        run(out / f"saturation{i}", "concurrency", a.duration, base + ["--concurrency", str(a.concurrency)],
            batch + [f"--max-queue-delay-us={delays[0]}"])["requests_per_s"]
        for i in range(a.repeats)
    ]
    saturation = statistics.median(sats)
    print(f"saturation: {saturation:.2f} requests/s (concurrency {a.concurrency}; runs {sats})", flush=True)

    rows = []
    for delay in delays:
        for frac in FRACTIONS:
            rps = max(1, round(saturation * frac))
            runs = [
                run(out / f"d{delay}_r{int(frac * 100)}_{i}", "rate", a.duration,
                    base + ["--rps", str(rps), "--rps-concurrency", str(4 * a.concurrency)],
                    batch + [f"--max-queue-delay-us={delay}"])
                for i in range(a.repeats)
            ]
            med = lambda f: statistics.median(f(s) for s in runs)  # noqa: E731
            row = {
                "max_queue_delay_us": delay, "load_fraction": frac, "target_rps": rps,
                "achieved_rps": round(med(lambda s: s["requests_per_s"]), 3),
                "p50_ms": med(lambda s: s["latency_ms"]["p50"]), "p99_ms": med(lambda s: s["latency_ms"]["p99"]),
                "mean_batch_size": med(lambda s: s["mean_batch_size"]),
                "errors": sum(sum(s["errors_by_code"].values()) for s in runs), "runs": len(runs),
            }
            rows.append(row)
            print(f"delay {delay} us, {int(frac * 100)} % ({rps} rps), median of {len(runs)}: "
                  f"p50 {row['p50_ms']:.1f} ms, p99 {row['p99_ms']:.1f} ms, mean batch {row['mean_batch_size']:.2f}, "
                  f"errors {row['errors']}", flush=True)

    with open(out / "latency_vs_load.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (out / "saturation.json").write_text(json.dumps({"requests_per_s": saturation, "runs": sats, "concurrency": a.concurrency}))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for delay in delays:
        pts = [r for r in rows if r["max_queue_delay_us"] == delay]
        x = [r["load_fraction"] * 100 for r in pts]
        ax.plot(x, [r["p50_ms"] for r in pts], "o-", label=f"p50, max_queue_delay {delay / 1000:g} ms")
        ax.plot(x, [r["p99_ms"] for r in pts], "s--", label=f"p99, max_queue_delay {delay / 1000:g} ms")
    ax.set_xlabel(f"load, % of saturation ({saturation:.1f} requests/s, 1 image each)")
    ax.set_ylabel("latency (ms)")
    ax.set_title(f"BrainAI Serve latency vs load ({Path(a.model_dir).name}, CPU)")
    ax.set_xticks([25, 50, 75, 100])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = ROOT / a.png
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    print(f"wrote {png} and {out / 'latency_vs_load.csv'}")


if __name__ == "__main__":
    sys.exit(main())
