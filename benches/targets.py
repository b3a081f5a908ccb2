#!/usr/bin/env python3
"""The serving targets of the "keep the accelerator busy" issue, measured side by side on the
real path: the release server (target/release/brainai or $BRAINAI_BIN), driven by ghz as a separate
process (tests/load/run_load.sh), on this machine. Nothing is asserted; the verdicts are printed
(make bench-targets).

  saturation  default ResNet-50, ghz at --concurrency (16; one image per call, the nine test
              images), server --max-batch-size=--batch (8), against the bare ONNX Runtime loop (the
              `serving` bench binary, batches of --batch, or of each --bare-batches size with the
              best images/s as the round's reference), in alternating rounds; one served run per
              --config each round. Prints served / bare per round and the medians (target >= 0.97
              on cpu, >= 0.9 on cuda), the mean batch occupancy (mean batch size / --batch; target
              >= 0.9 on cuda), and where an image's time went (brainai_stage_duration_seconds).
  overhead    tiny model (one ORT thread, queue delay 0), single-image calls of one 256x256 PNG at
              concurrency 8: the server's CPU time per call (/proc/<pid>/stat over the run) against
              the image's decode + preprocess time (the preprocess stage's mean in a run of one
              call at a time just before; target: at most 100 us more), and calls/s; one run per
              --config each round.
  latency     default ResNet-50: saturation (concurrency 16), then a fixed rate at 75 % of it; the
              p99 of that run against one batch's service time (the mean model run per batch in the
              same run; target p99 <= 2x).
  light       default ResNet-50, one call at a time (ghz concurrency 1, --image, server
              --max-queue-delay-us=--delay-us): the served p50 against the bare batch-1 model run
              (the bench binary's `bare ORT batch-1 run: Y ms`), each round; added = served p50 -
              bare, target <= delay + 2 ms.

Usage: benches/targets.py saturation|overhead|latency|light [--rounds N] [--seconds S]
           [--device cpu|cuda|cuda:N] [--ort-library PATH] [--model DIR]
           [--config NAME:FLAG,FLAG ...]   (e.g. --config io1:--io-threads=1 --config io2:--io-threads=2;
                                            an entry VAR=VALUE without dashes sets the server's environment,
                                            and SERVER_CPUS=0,CLIENT_CPUS=1 gives the server and ghz a core
                                            each: tests/load/run_load.sh)
       saturation also: [--batch B] [--concurrency C] [--bare-batches 8,16,32,64] [--images LIST]
       light also: [--image FILE] [--delay-us D];  overhead also: [--image FILE]
       `benches/targets.py SUBCOMMAND --help` lists them.

--device and --ort-library go to the bench binary and, as --device=... / --ort-library=..., to every
served run (not given: neither is passed, as before). --model replaces ResNet-50 (overhead: the tiny
model). Every subprocess runs under a deadline of 3 x its seconds + 120 s: a hang fails the script
(the command and its output's tail are printed) instead of blocking it. Environment: BRAINAI_BIN
(server), BRAINAI_BENCH_BIN (the `serving` bench binary; default: the newest
target/release/deps/serving-*), GHZ (a ghz binary; run_load.sh's default otherwise).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESNET = "models/brain-tumor-resnet50"
TINY = "tests/fixtures/models/tiny"
SLACK_S = 120  # a subprocess's deadline: 3 x its own seconds + this (start-up, session creation, shutdown)
_child: subprocess.Popen | None = None  # the running subprocess, stopped with us (see on_signal)


def bench_binary() -> str:
    if os.environ.get("BRAINAI_BENCH_BIN"):
        path = os.environ["BRAINAI_BENCH_BIN"]
        if not os.access(path, os.X_OK):
            sys.exit(f"BRAINAI_BENCH_BIN={path}: not an executable")
        return path
    found = [p for p in glob.glob(str(ROOT / "target/release/deps/serving-*"))
             if os.access(p, os.X_OK) and not p.endswith(".d")]
    if not found:
        sys.exit("no bench binary: run `cargo bench --locked --no-run --bench serving` first (or set BRAINAI_BENCH_BIN)")
    return max(found, key=os.path.getmtime)


def stop(p: subprocess.Popen) -> None:
    # The child leads its own process group (run_load.sh's server and helpers are in it): SIGTERM
    # lets run_load.sh stop the server cleanly; whatever is left after 45 s is killed.
    for sig, grace in ((signal.SIGTERM, 45), (signal.SIGKILL, 10)):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass
        try:
            p.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def on_signal(signum, _frame) -> None:
    if _child is not None and _child.poll() is None:
        stop(_child)
    sys.exit(128 + signum)


def tail(text: str, lines: int = 25) -> str:
    return "\n".join("    " + line for line in text.rstrip().splitlines()[-lines:])


def run(cmd: list[str], seconds: float, env: dict | None = None) -> str:
    """Runs cmd in ROOT and returns its stdout; a failure, or no exit within 3 x seconds + SLACK_S,
    prints the command and its output's tail and exits non-zero."""
    global _child
    limit = seconds * 3 + SLACK_S
    # Files, not pipes: a grandchild that outlives a killed child cannot block the read.
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        _child = p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err, text=True,
                                      start_new_session=True)
        try:
            rc = p.wait(timeout=limit)
            why = f"exit status {rc}" if rc else ""
        except subprocess.TimeoutExpired:
            stop(p)
            why = f"no exit within {limit:.0f} s (stopped)"
        _child = None
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if why:
        print(f"FAILED ({why}): {' '.join(cmd)}", file=sys.stderr)
        if stderr.strip():
            print(f"  stderr (last lines):\n{tail(stderr)}", file=sys.stderr)
        if stdout.strip():
            print(f"  stdout (last lines):\n{tail(stdout, 10)}", file=sys.stderr)
        sys.exit(1)
    return stdout


def find(pattern: str, out: str, what: str) -> float:
    m = re.search(pattern, out)
    if not m:
        sys.exit(f"the bench binary printed no {what} line (/{pattern}/): is it older than this script? "
                 f"Rebuild it (cargo bench --locked --no-run --bench serving). Its output:\n{tail(out)}")
    return float(m.group(1))


def device(a) -> str:
    return a.device or "cpu"


def on_gpu(a) -> bool:
    return device(a).startswith("cuda")


def server_device_flags(a) -> list[str]:
    # Only what was given: the CPU runs pass exactly the flags they always did.
    return ([f"--device={a.device}"] if a.device else []) + ([f"--ort-library={a.ort_library}"] if a.ort_library else [])


def bench_device_args(a) -> list[str]:
    return (["--device", a.device] if a.device else []) + (["--ort-library", a.ort_library] if a.ort_library else [])


def model_dir(a, default: str) -> str:
    return a.model or default


def model_max_batch(model: str) -> int | None:
    # [model] max_batch_size of model.toml: the server caps --max-batch-size there.
    section = None
    for line in (ROOT / model / "model.toml").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("["):
            section = line.strip("[] ")
        elif section == "model" and (m := re.match(r"max_batch_size\s*=\s*(\d+)", line)):
            return int(m.group(1))
    return None


def bare_images_per_s(a, binary: str, model: str, batch: int) -> float:
    out = run([binary, "--bare-only", "--rounds", "1", "--seconds", str(a.seconds), "--batch", str(batch),
               "--threads", "0", "--model-dir", model, *bench_device_args(a)], a.seconds)
    return find(r"bare ORT loop, batch \d+: ([\d.]+) images/s", out, "'bare ORT loop, batch B: X images/s'")


def bare_batch1_ms(a, binary: str, model: str) -> float:
    out = run([binary, "--bare-only", "--batch", "1", "--rounds", "1", "--seconds", "2", "--model-dir", model,
               *bench_device_args(a)], 2)
    return find(r"bare ORT batch-1 run: ([\d.]+) ms", out, "'bare ORT batch-1 run: Y ms'")


def load(out: Path, model: str, runs: str, seconds: int, server_args: list[str], extra: list[str]) -> dict:
    # A config's NAME=VALUE entries are the server's environment (e.g. GLIBC_TUNABLES=...).
    env = dict(os.environ)
    env.update(a.split("=", 1) for a in server_args if not a.startswith("-"))
    # Without Go, run_load.sh cannot check (install) ghz: use the installed one as it is.
    if "GHZ" not in env and not shutil.which("go") and os.access(ROOT / ".tools/bin/ghz", os.X_OK):
        env["GHZ"] = str(ROOT / ".tools/bin/ghz")
    flags = [a for a in server_args if a.startswith("-")]
    cmd = [str(ROOT / "tests/load/run_load.sh"), "--runs", runs, "--duration", f"{seconds}s",
           "--model-dir", model, "--out", str(out), *extra, *[f"--server-arg={a}" for a in flags]]
    run(cmd, seconds, env)
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
    model = model_dir(a, RESNET)
    cfgs = configs(a)
    sizes = a.bare_batches or [a.batch]
    cap = model_max_batch(model)
    batch = min(a.batch, cap) if cap else a.batch
    if batch != a.batch:
        print(f"note: {model}/model.toml caps batches at {cap}: the server runs at most {cap} images a batch; "
              f"occupancy is against {cap}", flush=True)
    target, occ_target = (0.9, 0.9) if on_gpu(a) else (0.97, None)
    print(f"saturation on {device(a)}: {model}, server --max-batch-size={a.batch}, ghz concurrency {a.concurrency}, "
          f"bare batch {','.join(map(str, sizes))}, {a.seconds} s runs", flush=True)
    bare, per_size, served, occupancy = [], {b: [] for b in sizes}, {n: [] for n, _ in cfgs}, {n: [] for n, _ in cfgs}
    last = {}
    for r in range(a.rounds):
        figures = {b: bare_images_per_s(a, binary, model, b) for b in sizes}
        for b, x in figures.items():
            per_size[b].append(x)
        bare.append(max(figures.values()))
        best_of = f" (best of {' '.join(f'{b}:{x:.0f}' for b, x in figures.items())})" if a.bare_batches else ""
        line = [f"round {r + 1}: bare {bare[-1]:.2f} images/s{best_of}"]
        for name, flags in (cfgs if r % 2 == 0 else cfgs[::-1]):
            s = load(ROOT / a.out / f"saturation-{name}-{r + 1}", model, "concurrency", a.seconds,
                     [f"--max-batch-size={a.batch}", *server_device_flags(a), *flags],
                     ["--concurrency", str(a.concurrency), *(["--images", a.images] if a.images else [])])
            served[name].append(s["images_per_s"])
            occupancy[name].append(s["mean_batch_size"] / batch)
            last[name] = s
            line.append(f"{name} {s['images_per_s']:.2f} ({s['images_per_s'] / bare[-1]:.3f}, "
                        f"batch {s['mean_batch_size']:.2f}, occupancy {occupancy[name][-1]:.3f})")
        print(", ".join(line), flush=True)
    by_size = (" (per batch size: " + ", ".join(f"{b}:{statistics.median(x):.0f}" for b, x in per_size.items()) + ")"
               if a.bare_batches else "")
    print(f"median bare {statistics.median(bare):.2f} images/s{by_size}")
    for name, _ in cfgs:
        ratios = [s / b for s, b in zip(served[name], bare)]
        occ = occupancy[name]
        print(f"{name}: served {statistics.median(served[name]):.2f} images/s, served/bare median "
              f"{statistics.median(ratios):.3f} (rounds {min(ratios):.3f}-{max(ratios):.3f}; target >= {target})")
        print(f"  mean batch occupancy (mean batch size / {batch}) median {statistics.median(occ):.3f} "
              f"(rounds {min(occ):.3f}-{max(occ):.3f}" + (f"; target >= {occ_target})" if occ_target else ")"))
        print(f"  where an image's time went (last round): {stages_line(last[name])}")


def overhead(a) -> None:
    model = model_dir(a, TINY)
    cfgs = configs(a)
    rows = {n: [] for n, _ in cfgs}
    for r in range(a.rounds):
        line = [f"round {r + 1}:"]
        for name, flags in (cfgs if r % 2 == 0 else cfgs[::-1]):
            server = ["--max-queue-delay-us=0", "--intra-op-threads=1", *server_device_flags(a), *flags]
            # The image's own decode + preprocess time: one call at a time, nothing competing
            # for the cores (under load the preprocess stage's wall time includes preemption).
            alone = load(ROOT / a.out / f"overhead-{name}-{r + 1}-alone", model, "concurrency", 4, server,
                         ["--concurrency", "1", "--images", a.image])
            s = load(ROOT / a.out / f"overhead-{name}-{r + 1}", model, "concurrency", a.seconds, server,
                     ["--concurrency", "8", "--images", a.image])
            cpu = s["server_cpu_us_per_call"]
            pre = alone["mean_preprocess_ms"] * 1e3
            # The same image's decode + preprocess CPU in the loaded run itself (the preprocessing
            # thread's CPU clock, brainai_preprocess_cpu_seconds): side by side with CPU/call.
            pre_load = s["mean_preprocess_cpu_ms"] * 1e3
            rows[name].append((s["requests_per_s"], cpu, pre, s, pre_load))
            line.append(f"{name} {s['requests_per_s']:.0f} calls/s, CPU/call {cpu:.0f} us, preprocess {pre:.0f} us "
                        f"alone / {pre_load:.0f} us CPU under load, margin {cpu - pre:+.0f} / {cpu - pre_load:+.0f} us;")
        print(" ".join(line), flush=True)
    for name, _ in cfgs:
        calls = statistics.median(x[0] for x in rows[name])
        cpu = statistics.median(x[1] for x in rows[name])
        pre = statistics.median(x[2] for x in rows[name])
        pre_load = statistics.median(x[4] for x in rows[name])
        margins = sorted(x[1] - x[2] for x in rows[name])
        same_run = sorted(x[1] - x[4] for x in rows[name])
        print(f"{name}: {calls:.0f} calls/s, server CPU/call {cpu:.0f} us, decode+preprocess {pre:.0f} us alone "
              f"(wall, one call at a time) and {pre_load:.0f} us of CPU in the loaded run; margin median "
              f"{statistics.median(margins):+.0f} us against the alone time (rounds {margins[0]:+.0f}..{margins[-1]:+.0f}), "
              f"{statistics.median(same_run):+.0f} us against the same run's (rounds {same_run[0]:+.0f}..{same_run[-1]:+.0f}); "
              f"target <= +100 us")
        print(f"  stages (last round): {stages_line(rows[name][-1][3])}")


def latency(a) -> None:
    model = model_dir(a, RESNET)
    cfgs = configs(a)
    for name, flags in cfgs:
        server = ["--max-batch-size=8", *server_device_flags(a), *flags]
        sat, p99s, services, ratios = [], [], [], []
        for r in range(a.rounds):
            s = load(ROOT / a.out / f"latency-{name}-sat-{r + 1}", model, "concurrency", a.seconds,
                     server, ["--concurrency", "16"])
            sat.append(s["requests_per_s"])
            rps = max(1, round(0.75 * s["requests_per_s"]))
            q = load(ROOT / a.out / f"latency-{name}-75-{r + 1}", model, "rate", a.seconds,
                     server, ["--rps", str(rps)])
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


def light(a) -> None:
    binary = bench_binary()
    model = model_dir(a, RESNET)
    cfgs = configs(a)
    budget = a.delay_us / 1e3 + 2.0
    print(f"light load on {device(a)}: {model}, one call at a time ({a.image}), server "
          f"--max-queue-delay-us={a.delay_us}, {a.seconds} s runs; target added <= {budget:.2f} ms", flush=True)
    bare, p50s, last = [], {n: [] for n, _ in cfgs}, {}
    for r in range(a.rounds):
        bare.append(bare_batch1_ms(a, binary, model))
        line = [f"round {r + 1}: bare batch-1 run {bare[-1]:.2f} ms"]
        for name, flags in (cfgs if r % 2 == 0 else cfgs[::-1]):
            s = load(ROOT / a.out / f"light-{name}-{r + 1}", model, "concurrency", a.seconds,
                     [f"--max-queue-delay-us={a.delay_us}", *server_device_flags(a), *flags],
                     ["--concurrency", "1", "--images", a.image])
            p50 = s["latency_ms"]["p50"]
            if p50 is None:
                sys.exit(f"{ROOT / a.out}/light-{name}-{r + 1}: ghz reported no p50 ({s['calls']} calls)")
            p50s[name].append(p50)
            last[name] = s
            line.append(f"{name} served p50 {p50:.2f} ms, added {p50 - bare[-1]:+.2f} ms (target <= {budget:.2f})")
        print(", ".join(line), flush=True)
    print(f"median bare batch-1 run {statistics.median(bare):.2f} ms")
    for name, _ in cfgs:
        added = sorted(p - b for p, b in zip(p50s[name], bare))
        print(f"{name}: served p50 median {statistics.median(p50s[name]):.2f} ms, added median "
              f"{statistics.median(added):+.2f} ms (rounds {added[0]:+.2f}..{added[-1]:+.2f}; "
              f"target <= {a.delay_us / 1e3:.2f} + 2 = {budget:.2f} ms)")
        print(f"  where an image's time went (last round): {stages_line(last[name])}")


def device_name(v: str) -> str:
    if not re.fullmatch(r"cpu|cuda(:\d+)?", v):
        raise argparse.ArgumentTypeError(f"{v!r}: use cpu, cuda or cuda:N")
    return v


def batch_list(v: str) -> list[int]:
    if not re.fullmatch(r"[1-9]\d*(,[1-9]\d*)*", v):
        raise argparse.ArgumentTypeError(f"{v!r}: a comma list of batch sizes, e.g. 8,16,32,64")
    return [int(b) for b in v.split(",")]


def existing_dir(v: str) -> str:
    p = Path(v).resolve()
    if not (p / "model.toml").is_file():
        raise argparse.ArgumentTypeError(f"{v}: no model.toml there")
    return str(p)


def existing_file(v: str) -> str:
    p = Path(v).resolve()
    if not p.is_file():
        raise argparse.ArgumentTypeError(f"{v}: no such file")
    return str(p)


def main() -> None:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("every subcommand")
    g.add_argument("--rounds", type=int, default=3)
    g.add_argument("--seconds", type=int, default=20, help="length of each measured run (default 20)")
    g.add_argument("--config", action="append", help="NAME:FLAG,FLAG (repeatable; default: the defaults)")
    g.add_argument("--out", default="target/bench/targets")
    g.add_argument("--device", type=device_name,
                   help="cpu, cuda or cuda:N, for the bench binary and the server (default: cpu, and not passed)")
    g.add_argument("--ort-library", type=existing_file, metavar="PATH",
                   help="libonnxruntime.so for the bench binary and the server (default: theirs)")
    g.add_argument("--model", type=existing_dir, metavar="DIR",
                   help=f"model directory (default {RESNET}; overhead: {TINY})")

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True, metavar="saturation|overhead|latency|light")
    s = sub.add_parser("saturation", parents=[common], help="served / bare images/s at saturation")
    s.add_argument("--batch", type=int, default=8, help="the server's --max-batch-size and the bare loop's batch (default 8)")
    s.add_argument("--concurrency", type=int, default=16, help="ghz workers (default 16)")
    s.add_argument("--bare-batches", type=batch_list, metavar="B,B,...",
                   help="bare loop at each batch size every round, the best images/s the reference (e.g. 8,16,32,64)")
    s.add_argument("--images", help="comma-separated images under tests/data (default: all nine)")
    o = sub.add_parser("overhead", parents=[common], help="server CPU per call against decode + preprocess")
    o.add_argument("--image", default="flair_256_a.png", help="the image every call sends")
    sub.add_parser("latency", parents=[common], help="p99 at 75 %% of saturation against one batch's service time")
    li = sub.add_parser("light", parents=[common], help="served p50, one call at a time, against the bare batch-1 run")
    li.add_argument("--image", default="flair_256_a.png", help="the image every call sends")
    li.add_argument("--delay-us", type=int, default=2000, help="the server's --max-queue-delay-us (default 2000)")
    a = p.parse_args()
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    {"saturation": saturation, "overhead": overhead, "latency": latency, "light": light}[a.what](a)


if __name__ == "__main__":
    main()
