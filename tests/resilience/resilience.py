#!/usr/bin/env python3
"""The resilience suite: the release server driven, over loopback only, the way a busy hospital
network and a careless or hostile client would drive it. Every scenario is bounded in time, checks
its targets and prints its figures; the run ends with a summary table and fails if a target failed.

    .venv/bin/python tests/resilience/resilience.py [--short] [--only NAME,...] [--soak-minutes M]

Scenarios (the hostile-input battery itself is tests/bad_input.rs):
  overload     default flags, the default ResNet-50: saturation measured with ghz, then 3x that rate
               with 2 s deadlines. Targets: goodput >= 90 % of saturation; every call answered
               within its deadline + 50 ms; refused calls answered in <= 10 ms (p99); RSS bounded;
               a normal call succeeds right after.
  sigterm      unary load and open ClassifyStreams, SIGTERM in the middle. Targets: exit 0 within
               the drain timeout + 1 s; no accepted call lost (each call either succeeded or was
               refused up front).
  age          --max-connection-age-s 2 under load, from ghz (grpc-go without a retry policy) and
               then from tests/resilience/retryclient (grpc-go with a retryPolicy for UNAVAILABLE,
               as deployments configure it). Targets: ghz fails no call except by grpc-go's own
               draining race (grpc/grpc-go#2767: counted and reported, never reaching the server:
               the server answered exactly ghz's successes); the retrying client fails none.
  idle         2,000 idle TCP connections to the gRPC port, then a new client. Target: answered
               within 100 ms; /metrics still answers.
  slow         500 half-sent HTTP requests to the metrics port and 500 half-opened HTTP/2
               connections. Targets: all closed by the header-read / first-request timeouts;
               /metrics answers meanwhile.
  decode       one call of 32 valid 8192x8192 RGBA 16-bit PNGs (~25 MB) next to single-image calls.
               Target: the single-image calls are not delayed by more than 100 ms.
  soak         (long form only) half of saturation for --soak-minutes (10): RSS and open files
               sampled; no error.

--short runs the same scenarios with shorter loads (the form `make test` runs); without it, the
long form (`make resilience`), whose figures are recorded in docs/RESILIENCE.md.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import resource
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = os.environ.get("BRAINAI_BIN", str(ROOT / "target/release/brainai"))
PROTO_ARGS = ["--proto", "proto/brainai/v1/classifier.proto", "--import-paths", "proto"]
RESNET = "models/brain-tumor-resnet50"
TINY = "tests/fixtures/models/tiny"
RESULTS: list[tuple[str, str, bool]] = []
# In the short form (make test) speed targets are printed, not enforced: tests never assert on
# wall time on a shared machine. Functional outcomes (statuses, lost calls, exit codes, bounds the
# server enforces with its own timers) are enforced in both forms.
ENFORCE_SPEED = True


def check(scenario: str, what: str, ok: bool, speed: bool = False) -> bool:
    if speed and not ENFORCE_SPEED:
        print(f"  {'ok  ' if ok else 'slow'} {what} (speed target: recorded, not enforced here)", flush=True)
        return ok
    RESULTS.append((scenario, what, ok))
    print(f"  {'ok  ' if ok else 'FAIL'} {what}", flush=True)
    return ok


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ghz_path() -> str:
    out = subprocess.run([str(ROOT / "tests/load/install_ghz.sh")], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout.strip().splitlines()
    return out[-1]


class Server:
    """The release binary on free loopback ports; stderr to a log file."""

    def __init__(self, model: str, *flags: str, log: Path):
        self.grpc, self.http, self.rest = free_port(), free_port(), free_port()
        self.log = log
        self.proc = subprocess.Popen(
            [BIN, "serve", "--model-dir", model, "--grpc-addr", f"127.0.0.1:{self.grpc}",
             "--metrics-addr", f"127.0.0.1:{self.http}", "--http-addr", f"127.0.0.1:{self.rest}", *flags],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(log, "w"))
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                sys.exit(f"the server exited at start-up; see {log}")
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{self.http}/readyz", timeout=1).status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        sys.exit(f"the server did not become ready; see {log}")

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.grpc}"

    def metrics(self) -> str:
        return urllib.request.urlopen(f"http://127.0.0.1:{self.http}/metrics", timeout=5).read().decode()

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def open_files(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def stop(self, timeout: float = 60) -> tuple[int | None, float]:
        """SIGTERM; returns (exit code, seconds to exit) — code None if it had to be killed."""
        start = time.time()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            code = None
        return code, time.time() - start


def classify_request(names: list[str]) -> dict:
    return {"images": [{"id": n, "data": base64.b64encode((ROOT / "tests/data" / n).read_bytes()).decode()}
                       for n in names]}


def ghz(host: str, out: Path, data, *args: str, call: str = "brainai.v1.TumorClassifier/Classify",
        background: bool = False):
    """Runs ghz (JSON report with per-call details to `out`); returns the report, or the Popen."""
    data_file = out.with_suffix(".data.json")
    data_file.write_text(json.dumps(data))
    cmd = [GHZ, "--insecure", *PROTO_ARGS, "--call", call, "--data-file", str(data_file),
           "--format", "json", "--output", str(out), "--connections", "1", *args, host]
    if background:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def report(path: Path) -> dict:
    return json.loads(path.read_text())


def ms(ns: float) -> float:
    return ns / 1e6


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def client_cut(d: dict) -> bool:
    """A call ghz itself cut off when we stopped it (SIGINT closes its connection)."""
    return "use of closed network connection" in (d.get("error") or "")


def statuses(rep: dict) -> dict[str, int]:
    """Calls by status, leaving out the ones ghz cut off itself when it was stopped."""
    out: dict[str, int] = {}
    for d in rep.get("details", []):
        if not client_cut(d):
            out[d["status"]] = out.get(d["status"], 0) + 1
    return out


# ---- scenarios ---------------------------------------------------------------------------------


def scenario_overload(a, work: Path) -> dict:
    print("\n== overload: 3x saturation with 2 s deadlines (ResNet-50, default flags)", flush=True)
    server = Server(RESNET, log=work / "overload.log")
    data = classify_request(["flair_256_a.png"])
    sat_s, over_s = (10, 15) if a.short else (30, 60)
    sat = ghz(server.host, work / "saturation.json", data, "--concurrency", "16", "--duration", f"{sat_s}s",
              "--timeout", "20s", "--duration-stop", "wait")
    saturation = statuses(sat).get("OK", 0) / sat_s
    print(f"  saturation: {saturation:.1f} calls/s ({statuses(sat)})", flush=True)
    rate = max(1, round(3 * saturation))
    proc = ghz(server.host, work / "overload.json", data, "--rps", str(rate), "--concurrency", "256",
               "--duration", f"{over_s}s", "--timeout", "2s", "--duration-stop", "wait", background=True)
    rss = []
    while proc.poll() is None:
        rss.append(server.rss_mib())
        time.sleep(0.5)
    over = report(work / "overload.json")
    counts = statuses(over)
    details = over["details"]
    ok = [d for d in details if d["status"] == "OK"]
    refused = [d for d in details if d["status"] == "ResourceExhausted"]
    goodput = len(ok) / over_s
    lat_ok_max = max((ms(d["latency"]) for d in ok), default=0.0)
    lat_all_max = max((ms(d["latency"]) for d in details), default=0.0)
    refused_p99 = pct([ms(d["latency"]) for d in refused], 99)
    after = ghz(server.host, work / "after.json", data, "-n", "1", "--timeout", "20s")
    code, _ = server.stop()
    fig = {"saturation_calls_s": saturation, "offered_calls_s": rate, "goodput_calls_s": goodput,
           "goodput_ratio": goodput / saturation if saturation else 0.0, "statuses": counts,
           "ok_latency_max_ms": lat_ok_max, "any_latency_max_ms": lat_all_max,
           "refused_latency_p99_ms": refused_p99, "rss_mib_max": max(rss, default=0.0),
           "rss_mib_first": rss[0] if rss else 0.0}
    print(f"  offered {rate} calls/s for {over_s} s: {counts}", flush=True)
    check("overload", f"goodput {goodput:.1f} calls/s = {fig['goodput_ratio']:.2f} x saturation (>= 0.90)",
          fig["goodput_ratio"] >= 0.90, speed=True)
    check("overload", f"every call answered within its deadline + 50 ms (slowest {lat_all_max:.0f} ms)",
          lat_all_max <= 2050, speed=True)
    check("overload", f"{len(refused)} calls refused up front, {len(ok)} served", bool(refused) and bool(ok))
    check("overload", f"refused calls answered in {refused_p99:.1f} ms p99 (<= 10 ms)", refused_p99 <= 10,
          speed=True)
    check("overload", f"RSS bounded: {fig['rss_mib_first']:.0f} MiB at the start, {fig['rss_mib_max']:.0f} MiB at most",
          fig["rss_mib_max"] < 4 * max(fig["rss_mib_first"], 100))
    check("overload", "a normal call succeeds right after", statuses(after) == {"OK": 1})
    check("overload", "exit 0 after SIGTERM", code == 0)
    return fig


def lost_calls(details: list[dict]) -> tuple[int, int, dict[str, int]]:
    """(accepted OK, refused up front, lost by kind) of a ghz run cut by the server's shutdown."""
    ok = refused = 0
    lost: dict[str, int] = {}
    for d in details:
        err = d.get("error") or ""
        if d["status"] == "OK":
            ok += 1
        elif (d["status"] == "Unavailable" and ("shutting down" in err or "connection refused" in err
                                                 or "error while dialing" in err
                                                 or err.endswith("the connection is draining"))
              or d["status"] == "ResourceExhausted" and "overloaded" in err):
            # Never accepted: refused by the drain or by admission (the queue was full before the
            # signal), sent after the GOAWAY (grpc-go's "the connection is draining": HTTP/2 says
            # the server did not process it), or the server was already gone.
            refused += 1
        else:
            key = f"{d['status']}: {err[:80]}"
            lost[key] = lost.get(key, 0) + 1
    return ok, refused, lost


def scenario_sigterm(a, work: Path) -> dict:
    print("\n== sigterm: unary load and open streams, SIGTERM in the middle", flush=True)
    drain = 5
    server = Server(RESNET, "--drain-timeout-s", str(drain), "--max-queue-wait-ms", "3000",
                    log=work / "sigterm.log")
    data = classify_request(["flair_256_a.png"])
    stream_data = [{"image": img} for img in classify_request(["flair_256_b.png"] * 4)["images"]]
    unary = ghz(server.host, work / "sigterm-unary.json", data, "--concurrency", "16", "--duration", "30s",
                "--timeout", "20s", "--duration-stop", "wait", background=True)
    streams = ghz(server.host, work / "sigterm-stream.json", stream_data, "--concurrency", "4",
                  "--duration", "30s", "--timeout", "20s", "--duration-stop", "wait",
                  call="brainai.v1.TumorClassifier/ClassifyStream", background=True)
    time.sleep(4 if a.short else 8)
    code, took = server.stop(timeout=drain + 30)
    for p in (unary, streams):
        p.send_signal(signal.SIGINT)  # ghz writes its report on SIGINT
        p.wait(60)
    u_ok, u_refused, u_lost = lost_calls(report(work / "sigterm-unary.json")["details"])
    s_ok, s_refused, s_lost = lost_calls(report(work / "sigterm-stream.json")["details"])
    fig = {"exit_code": code, "exit_seconds": took, "drain_timeout_s": drain,
           "unary": {"ok": u_ok, "refused": u_refused, "lost": u_lost},
           "streams": {"ok": s_ok, "refused": s_refused, "lost": s_lost}}
    print(f"  unary: {u_ok} OK, {u_refused} refused up front, lost {u_lost or 'none'}", flush=True)
    print(f"  streams: {s_ok} OK, {s_refused} ended UNAVAILABLE at the drain or refused, lost {s_lost or 'none'}",
          flush=True)
    check("sigterm", f"exit {code} after {took:.2f} s (0, within the {drain} s drain + 1 s)",
          code == 0 and took <= drain + 1)
    check("sigterm", "no accepted unary call lost", not u_lost and u_ok > 0)
    check("sigterm", "no accepted stream lost", not s_lost and s_ok > 0)
    return fig


def metric_sum(text: str, name: str, *labels: str) -> float:
    """Sum of the samples of `name` whose labels include all of `labels`."""
    return sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines()
               if l.startswith(name + "{") and all(lab in l for lab in labels))


def retry_client() -> str:
    """Builds tests/resilience/retryclient (grpc-go with a retry policy, pinned in its go.mod)."""
    out = ROOT / "target/resilience/retryclient"
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["go", "build", "-buildvcs=false", "-o", str(out), "."],
                   cwd=ROOT / "tests/resilience/retryclient", check=True)
    return str(out)


def scenario_age(a, work: Path) -> dict:
    print("\n== age: connections reaching --max-connection-age-s 2 under load", flush=True)
    server = Server(TINY, "--max-connection-age-s", "2", "--connection-grace-s", "5",
                    "--intra-op-threads", "1", log=work / "age.log")
    seconds = 8 if a.short else 30

    def served() -> float:
        """Classify calls the server answered (any status)."""
        return metric_sum(server.metrics(), "brainai_requests_total", 'rpc="Classify"')

    def aged() -> float:
        return metric_sum(server.metrics(), "brainai_connections_closed_total", 'reason="age"',
                          'listener="grpc"')

    # 1. ghz: grpc-go without a retry policy, as a raw count of what such a client sees.
    served_before = served()
    rep = ghz(server.host, work / "age.json", classify_request(["flair_256_a.png"]), "--concurrency", "16",
              "--duration", f"{seconds}s", "--timeout", "20s", "--duration-stop", "wait")
    ghz_served = served() - served_before
    ghz_aged = aged()
    # 2. grpc-go with the retry policy deployments configure (UNAVAILABLE retried with backoff).
    served_before = served()
    retry = json.loads(subprocess.run(
        [retry_client(), "-addr", server.host, "-image", str(ROOT / "tests/data/flair_256_a.png"),
         "-duration", f"{seconds}s", "-concurrency", "16", "-timeout", "20s"],
        check=True, capture_output=True, text=True).stdout)
    retry_served = served() - served_before
    retry_aged = aged() - ghz_aged
    code, _ = server.stop()

    counts = statuses(rep)
    errors: dict[str, int] = {}
    for d in rep.get("details", []):
        if d["status"] != "OK" and not client_cut(d):
            key = f"{d['status']}: {(d.get('error') or '')[:160]}"
            errors[key] = errors.get(key, 0) + 1
    # grpc-go's race between starting a stream and that connection's GOAWAY (grpc/grpc-go#2767):
    # a stream whose headers grpc-go had not yet written when it read the server's first GOAWAY is
    # failed by grpc-go itself, UNAVAILABLE "the connection is draining", without a byte of it
    # reaching the server, so no server can prevent it (the server already sends the two-step
    # GOAWAY of RFC 9113 section 6.8 and serves every stream opened before the client saw it).
    # How many a run sees depends on the machine's load, so their number is reported, not bounded.
    # What is checked exactly: they are the only failures, and none reached the server (it
    # answered exactly the calls ghz saw succeed); and a client with a retry policy fails none.
    draining = sum(1 for d in rep.get("details", []) if d["status"] == "Unavailable"
                   and (d.get("error") or "").endswith("the connection is draining"))
    failed = sum(v for k, v in counts.items() if k != "OK")
    ok = counts.get("OK", 0)
    fig = {"calls": sum(counts.values()), "statuses": counts, "errors": errors,
           "connections_aged_out": ghz_aged, "client_draining_races": draining,
           "server_answered": ghz_served, "retrying_client": retry,
           "retrying_client_server_answered": retry_served, "retrying_client_connections_aged_out": retry_aged}
    if errors:
        print(f"  ghz failed calls: {errors}", flush=True)
    print(f"  retrying client: {retry}", flush=True)
    check("age", f"ghz (no retry policy): {sum(counts.values())} calls, {ghz_aged:.0f} connections sent away "
                 f"for their age, {failed - draining} failed; {draining} refused by grpc-go's draining race "
                 f"(client-side, reported), none of which reached the server ({ghz_served:.0f} answered, {ok} OK)",
          failed == draining and ghz_served == ok and ghz_aged >= 2)
    check("age", f"grpc-go with a retry policy: {retry['calls']} calls, {retry_aged:.0f} connections aged out, "
                 f"{retry['calls'] - retry['ok']} failed ({retry['policy_retries']} retried by the policy, "
                 f"{retry['transparent_retries']} transparently)",
          retry["ok"] == retry["calls"] > 0 and not retry["failed"] and retry_served == retry["ok"]
          and retry_aged >= 2)
    check("age", "exit 0 after SIGTERM", code == 0)
    return fig


def raise_fd_limit(n: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(n, soft)), hard))


def timed_classify(server: Server) -> tuple[bool, float]:
    start = time.time()
    r = subprocess.run([BIN, "classify", "--server", f"http://{server.host}", "--timeout-s", "10",
                        str(ROOT / "tests/data/flair_256_a.png")], capture_output=True, text=True)
    return r.returncode == 0, (time.time() - start) * 1000


def scenario_idle(a, work: Path) -> dict:
    print("\n== idle: 2,000 idle TCP connections, then a new client", flush=True)
    raise_fd_limit(4096)
    server = Server(TINY, "--intra-op-threads", "1", log=work / "idle.log")
    ok0, alone_ms = timed_classify(server)
    sockets = []
    for _ in range(2000):
        s = socket.create_connection(("127.0.0.1", server.grpc))
        sockets.append(s)
    time.sleep(0.5)
    ok, took = timed_classify(server)
    try:
        metrics_ok = "brainai_connections_open" in server.metrics()
    except OSError:
        metrics_ok = False
    for s in sockets:
        s.close()
    code, _ = server.stop()
    fig = {"idle_connections": 2000, "new_client_ms": took, "alone_ms": alone_ms}
    check("idle", "a new client is served with 2,000 idle connections open", ok and ok0)
    check("idle", f"... in {took:.0f} ms (<= 100 ms; {alone_ms:.0f} ms alone, process start included)",
          took <= 100, speed=True)
    check("idle", "/metrics answers during the flood", metrics_ok)
    check("idle", "exit 0 after SIGTERM", code == 0)
    return fig


def scenario_slow(a, work: Path) -> dict:
    print("\n== slow: half-sent HTTP/1 requests and half-opened HTTP/2 connections", flush=True)
    raise_fd_limit(4096)
    timeout = 2
    server = Server(TINY, "--intra-op-threads", "1", "--header-read-timeout-s", str(timeout),
                    "--first-request-timeout-s", str(timeout), "--max-metrics-connections", "1024",
                    log=work / "slow.log")
    n = 200 if a.short else 500
    http1, h2 = [], []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", server.http))
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never finished
        http1.append(s)
        t = socket.create_connection(("127.0.0.1", server.grpc))
        t.sendall(b"PRI * HTTP/2.0\r\n\r\nSM")  # the preface, cut short
        h2.append(t)
    try:
        metrics_ok = "brainai_connections_open" in server.metrics()
    except OSError:
        metrics_ok = False
    start = time.time()
    still_open = set(range(2 * n))
    socks = http1 + h2
    for s in socks:
        s.settimeout(0.0)
    while still_open and time.time() - start < timeout + 10:
        for i in list(still_open):
            try:
                if socks[i].recv(4096) == b"":
                    still_open.discard(i)
            except BlockingIOError:
                pass
            except OSError:
                still_open.discard(i)
        time.sleep(0.05)
    closed_after = time.time() - start
    for s in socks:
        s.close()
    code, _ = server.stop()
    fig = {"half_sent_http1": n, "half_open_h2": n, "still_open": len(still_open), "closed_within_s": closed_after}
    check("slow", "/metrics answers with the slow connections open", metrics_ok)
    check("slow", f"all {2 * n} slow connections closed by the server within {closed_after:.1f} s "
                  f"(timeouts {timeout} s)", not still_open)
    check("slow", "exit 0 after SIGTERM", code == 0)
    return fig


def big_png(path: Path, size: int = 8192) -> bytes:
    """A valid size x size RGBA 16-bit PNG of broad bands (so it compresses to ~0.5 MB, as the
    finding's 16.7 MB call of 32): written once."""
    if path.exists():
        return path.read_bytes()
    row = bytearray(1 + size * 8)
    comp = zlib.compressobj(9)
    body = bytearray()
    for y in range(size):
        level = (y // 1024) * 8000
        row[1:] = struct.pack(">HHHH", level, level, level, 65535) * size
        body += comp.compress(bytes(row))
    body += comp.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", size, size, 16, 6, 0, 0, 0)) + \
        chunk(b"IDAT", bytes(body)) + chunk(b"IEND", b"")
    path.write_bytes(png)
    return png


def decode_next_to_small_calls(work: Path, tag: str, png: bytes, images: int, *flags: str) -> dict:
    """One call of `images` copies of `png`, sent 3 times, while one client makes single-image
    calls; returns the figures (server: tiny model with `flags`)."""
    server = Server(TINY, "--intra-op-threads", "1", *flags, log=work / f"decode-{tag}.log")
    small = classify_request(["flair_256_a.png"])
    alone = ghz(server.host, work / f"small-alone-{tag}.json", small, "--concurrency", "1", "-n", "50",
                "--timeout", "20s")
    big = {"images": [{"id": f"big{i}", "data": base64.b64encode(png).decode()} for i in range(images)]}
    with_big = ghz(server.host, work / f"small-with-big-{tag}.json", small, "--concurrency", "1",
                   "--duration", "600s", "--timeout", "20s", background=True)
    time.sleep(0.5)
    big_rep = ghz(server.host, work / f"big-{tag}.json", big, "-n", "3", "--concurrency", "1", "--timeout",
                  "300s", "--max-send-message-size", str(256 << 20))
    with_big.send_signal(signal.SIGINT)
    with_big.wait(60)
    with_big_rep = report(work / f"small-with-big-{tag}.json")
    code, _ = server.stop()
    during = [ms(d["latency"]) for d in with_big_rep["details"] if not client_cut(d)]
    return {"big_call_mb": images * len(png) / 1e6, "big_call_statuses": statuses(big_rep),
            "big_call_ms_max": max((ms(d["latency"]) for d in big_rep["details"]), default=0.0),
            "small_alone_p50_ms": pct([ms(d["latency"]) for d in alone["details"]], 50),
            "small_during_p50_ms": pct(during, 50), "small_during_max_ms": max(during, default=0.0),
            "small_statuses": statuses(with_big_rep), "exit_code": code}


def scenario_decode(a, work: Path) -> dict:
    print("\n== decode: 32 x 8192^2 RGBA16 PNG in one call next to single-image calls", flush=True)
    png = big_png(ROOT / "target/resilience-8192-rgba16.png")
    figs = {}
    for tag, images, flags, what in [
        ("default", 32, (), "default budgets: refused before decoding"),
        # With the budgets raised the call is decoded: large images take turns in one lane, so the
        # single-image calls keep a thread.
        ("raised", 4 if a.short else 32, ("--max-request-decode-mib", "20000", "--max-decode-in-flight-mib",
                                          "20000", "--max-message-bytes", str(256 << 20)),
         "budgets raised: decoded, one large image at a time"),
    ]:
        f = decode_next_to_small_calls(work, tag, png, images, *flags)
        figs[tag] = f
        print(f"  {what}: the {f['big_call_mb']:.1f} MB call x3: {f['big_call_statuses']}, "
              f"{f['big_call_ms_max']:.0f} ms at most", flush=True)
        want = "ResourceExhausted" if tag == "default" else "OK"
        check("decode", f"[{tag}] the big call: {want}", f["big_call_statuses"] == {want: 3})
        check("decode", f"[{tag}] single-image calls during it: max {f['small_during_max_ms']:.1f} ms vs "
                        f"{f['small_alone_p50_ms']:.1f} ms alone (<= +100 ms)",
              f["small_during_max_ms"] <= f["small_alone_p50_ms"] + 100, speed=True)
        check("decode", f"[{tag}] every single-image call succeeded ({f['small_statuses']})",
              set(f["small_statuses"]) == {"OK"})
        check("decode", f"[{tag}] exit 0 after SIGTERM", f["exit_code"] == 0)
    return figs


def scenario_soak(a, work: Path) -> dict:
    minutes = a.soak_minutes
    print(f"\n== soak: half of saturation for {minutes} min (ResNet-50)", flush=True)
    server = Server(RESNET, log=work / "soak.log")
    data = classify_request(["flair_256_a.png"])
    sat = ghz(server.host, work / "soak-sat.json", data, "--concurrency", "16", "--duration", "20s",
              "--timeout", "20s", "--duration-stop", "wait")
    rate = max(1, round(statuses(sat).get("OK", 0) / 20 / 2))
    proc = ghz(server.host, work / "soak.json", data, "--rps", str(rate), "--concurrency", "32",
               "--duration", f"{minutes * 60}s", "--timeout", "20s", "--duration-stop", "wait", background=True)
    samples = []
    while proc.poll() is None:
        samples.append((time.time(), server.rss_mib(), server.open_files()))
        time.sleep(10)
    rep = report(work / "soak.json")
    code, _ = server.stop()
    counts = statuses(rep)
    rss = [s[1] for s in samples]
    fds = [s[2] for s in samples]
    fig = {"rate": rate, "minutes": minutes, "statuses": counts, "rss_mib": [round(r) for r in rss],
           "open_files": fds}
    half = len(rss) // 2
    check("soak", f"{sum(counts.values())} calls at {rate}/s: {counts}", set(counts) == {"OK"})
    check("soak", f"RSS {rss[0]:.0f} -> {rss[-1]:.0f} MiB, open files {fds[0]} -> {fds[-1]} (flat: second half "
                  f"max <= first half max + 10 %)",
          bool(rss) and max(rss[half:]) <= 1.1 * max(rss[:max(half, 1)]) and max(fds) <= min(fds) + 20)
    check("soak", "exit 0 after SIGTERM", code == 0)
    return fig


SCENARIOS = {"overload": scenario_overload, "sigterm": scenario_sigterm, "age": scenario_age,
             "idle": scenario_idle, "slow": scenario_slow, "decode": scenario_decode, "soak": scenario_soak}


def main() -> int:
    global GHZ
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--short", action="store_true", help="the short form (make test)")
    ap.add_argument("--only", help="comma-separated scenarios")
    ap.add_argument("--soak-minutes", type=int, default=10)
    ap.add_argument("--out", default="target/resilience")
    a = ap.parse_args()
    global ENFORCE_SPEED
    ENFORCE_SPEED = not a.short
    names = a.only.split(",") if a.only else [n for n in SCENARIOS if not (a.short and n == "soak")]
    GHZ = os.environ.get("GHZ") or ghz_path()
    work = ROOT / a.out
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    figures = {}
    for name in names:
        figures[name] = SCENARIOS[name](a, work)
    (work / "figures.json").write_text(json.dumps(figures, indent=2))
    print(f"\n== summary ({time.time() - started:.0f} s; figures in {work / 'figures.json'})")
    for scenario, what, ok in RESULTS:
        print(f"  {'ok  ' if ok else 'FAIL'} {scenario:9} {what}")
    failed = [r for r in RESULTS if not r[2]]
    print(f"resilience: {len(RESULTS) - len(failed)} of {len(RESULTS)} checks held")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
