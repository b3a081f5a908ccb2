#!/usr/bin/env python3
"""Static checks of deploy/docker/Dockerfile (no Docker engine needed): its build steps are the
ones CI runs, and its images are what deploy/k8s expects.

    python3 deploy/docker/check_dockerfile.py [--self-test]

Checked:
  * the `build` stage runs the Makefile's `cargo build $(CARGO_FLAGS) --bin brainai`
    (cargo build --release --locked --bin brainai), the `python` stage creates a venv and runs the
    Makefile's `pip install ... -r models/requirements.txt`, the model stage runs the Makefile's
    `models/make_resnet50.py --out ...`; the CPU runtime takes libonnxruntime.so from that venv,
    so it is the onnxruntime pinned in models/requirements.txt (which must be 1.31.x);
  * the runtime stages take the binary from stage `binary`, which by default (BINARY_SOURCE=build)
    is the `build` stage unchanged; a prebuilt binary from the build context
    (BINARY_SOURCE=context, deploy/image-test/run.sh) is never the default;
  * deploy/docker/requirements-gpu.txt pins every package exactly, onnxruntime-gpu <= 1.26 (CUDA
    12), only -cu12 NVIDIA libraries, cuDNN 9.x <= 9.10 (Pascal), and the GPU stage runs
    cuda_archs.py --require 61 on the libraries;
  * every COPY source exists in the repository (or is made by a Makefile target) and is not
    excluded by deploy/docker/Dockerfile.dockerignore;
  * the stages cpu, gpu and model exist; runtime stages end as a numeric non-root USER, have an
    exec-form ENTRYPOINT, EXPOSE the default port of every listen address in README's configuration
    table (`--grpc-addr`, `--http-addr`, `--metrics-addr`), and set ORT_DYLIB_PATH to a
    directory they copy in; base images have an explicit tag (not latest) or digest; the Rust
    image is not older than Cargo.toml's rust-version.

--self-test also breaks a copy of the inputs in several ways and fails unless every break is
caught. Standard library only. Exit status 1 on any failure.
"""
from __future__ import annotations

import argparse
import fnmatch
import glob
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DOCKERFILE = "deploy/docker/Dockerfile"
DOCKERIGNORE = "deploy/docker/Dockerfile.dockerignore"
GPU_REQUIREMENTS = "deploy/docker/requirements-gpu.txt"
PYTHON_TOKENS = {"$(PY)", "$(PYTHON)", "python", "python3", "/opt/venv/bin/python", "/opt/venv/bin/python3"}
NVIDIA_LIB_DIRS = {  # pip package -> directory under nvidia/ that the GPU stage copies from
    "nvidia-cuda-runtime-cu12": "cuda_runtime",
    "nvidia-cublas-cu12": "cublas",
    "nvidia-cufft-cu12": "cufft",
    "nvidia-curand-cu12": "curand",
    "nvidia-cudnn-cu12": "cudnn",
    "nvidia-cuda-nvrtc-cu12": "cuda_nvrtc",
    "nvidia-nvjitlink-cu12": "nvjitlink",
}


def read(rel: str) -> str:
    with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
        return f.read()


# ---- Dockerfile parsing -------------------------------------------------------------------------


@dataclass
class Instr:
    cmd: str
    args: str
    line: int


@dataclass
class Stage:
    name: str
    base: str  # resolved base: an image reference or an earlier stage's name
    line: int
    instrs: list[Instr] = field(default_factory=list)


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages). Handles `\\` continuations and comment lines."""
    instrs: list[Instr] = []
    buf, start = "", 0
    for no, raw in enumerate(text.splitlines(), 1):
        line = raw.rstrip()
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if buf and line.lstrip().startswith("#"):
            continue  # comment lines inside a continued instruction are dropped, as Docker does
        if not buf:
            start = no
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        cmd, _, args = buf.strip().partition(" ")
        instrs.append(Instr(cmd.upper(), args.strip(), start))
        buf = ""
    if buf:
        raise ValueError(f"{DOCKERFILE}:{start}: instruction continues past the end of the file")
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for ins in instrs:
        if ins.cmd == "ARG" and not stages:
            name, _, default = ins.args.partition("=")
            global_args[name.strip()] = default.strip().strip('"')
        elif ins.cmd == "FROM":
            words = [w for w in ins.args.split() if not w.startswith("--")]
            base = expand(words[0], global_args)
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(name, base, ins.line))
        elif stages:
            stages[-1].instrs.append(ins)
        else:
            raise ValueError(f"{DOCKERFILE}:{ins.line}: {ins.cmd} before the first FROM")
    return global_args, stages


def expand(value: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), value)


def stage_args(stage: Stage, global_args: dict[str, str]) -> dict[str, str]:
    out = dict(global_args)
    for ins in stage.instrs:
        if ins.cmd == "ARG":
            name, _, default = ins.args.partition("=")
            out[name.strip()] = default.strip().strip('"') or global_args.get(name.strip(), "")
    return out


def run_commands(stage: Stage) -> list[list[str]]:
    """Shell commands of a stage's RUN instructions, split on && ; and newlines, as token lists."""
    cmds = []
    for ins in stage.instrs:
        if ins.cmd != "RUN":
            continue
        body = re.sub(r"--mount=\S+\s*", "", ins.args)
        for part in re.split(r"&&|;|\|\|", body):
            try:
                tokens = shlex.split(part)
            except ValueError:
                tokens = part.split()
            if tokens:
                cmds.append(tokens)
    return cmds


def normalise(tokens: list[str]) -> list[str]:
    return ["PYTHON" if t in PYTHON_TOKENS else t for t in tokens]


def contains(haystack: list[str], needle: list[str]) -> bool:
    return any(haystack[i : i + len(needle)] == needle for i in range(len(haystack) - len(needle) + 1))


# ---- Makefile: the commands CI runs -------------------------------------------------------------


def makefile_commands(text: str) -> dict[str, list[list[str]]]:
    """Target -> the recipe commands `make <target>` runs (its own and, recursively, those of its
    prerequisites that are rules), with `:=`/`?=`/`=` variables expanded except $(PY)/$(PYTHON)."""
    variables: dict[str, str] = {}

    def expand_vars(value: str) -> str:
        for _ in range(10):
            value = re.sub(
                r"\$\((\w+)\)",
                lambda m: m.group(0) if m.group(1) in ("PY", "PYTHON") else variables.get(m.group(1), m.group(0)),
                value,
            )
        # $(shell ...) output is unknown here: one opaque word (the venv stamp's hash).
        return re.sub(r"\$\(shell [^)]*\)", "SHELL_OUTPUT", value)

    rules: list[tuple[list[str], list[str], list[str]]] = []  # (targets, prerequisites, recipe)
    # A line ending in a backslash continues on the next (make joins them before the shell runs).
    for line in re.sub(r"\\\n[ \t]*", " ", text).splitlines():
        if line.startswith("\t") and rules:
            rules[-1][2].append(line.strip().lstrip("@"))
            continue
        m = re.match(r"^(\w+)\s*(:=|\?=|=)\s*(.*)$", line)
        if m:
            variables[m.group(1)] = m.group(3).strip()
            continue
        m = re.match(r"^([^\s#=][^=]*?)\s*:(?!=)\s*(.*)$", line)
        if m and not line.startswith("."):
            rules.append((expand_vars(m.group(1)).split(), expand_vars(m.group(2)).split(), []))
    by_target: dict[str, tuple[list[str], list[str]]] = {}
    for targets, prereqs, recipe in rules:
        for t in targets:
            old = by_target.get(t, ([], []))
            by_target[t] = (old[0] + prereqs, old[1] + recipe)

    def commands(target: str, seen: set[str]) -> list[list[str]]:
        if target in seen or target not in by_target:
            return []
        seen.add(target)
        prereqs, recipe = by_target[target]
        out = [c for p in prereqs for c in commands(p, seen)]
        return out + [shlex.split(expand_vars(c)) for c in recipe]

    return {t: commands(t, set()) for t in by_target}


# ---- .dockerignore ------------------------------------------------------------------------------


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; `!` re-includes; a pattern matching a
    directory covers everything below it."""
    verdict = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for raw in patterns:
        neg = raw.startswith("!")
        pat = raw[1:] if neg else raw
        pat = pat.strip("/")
        if any(fnmatch.fnmatchcase(p, pat) and p.count("/") == pat.count("/") for p in prefixes) or pat == "*":
            verdict = not neg
    return verdict


def dockerignore_patterns(text: str) -> list[str]:
    return [l.strip() for l in text.splitlines() if l.strip() and not l.strip().startswith("#")]


# ---- the checks ---------------------------------------------------------------------------------


@dataclass
class Inputs:
    dockerfile: str
    dockerignore: str
    gpu_requirements: str
    makefile: str
    requirements: str
    readme: str
    cargo_toml: str


def load_inputs() -> Inputs:
    return Inputs(
        read(DOCKERFILE), read(DOCKERIGNORE), read(GPU_REQUIREMENTS), read("Makefile"),
        read("models/requirements.txt"), read("README.md"), read("Cargo.toml"),
    )


def check(inp: Inputs, report=print) -> list[str]:
    """Runs every check; returns the failures (and reports each result through `report`)."""
    failures: list[str] = []

    def ok(cond: bool, what: str) -> bool:
        report(f"  {'ok  ' if cond else 'FAIL'} {what}")
        if not cond:
            failures.append(what)
        return cond

    try:
        gargs, stages = parse_dockerfile(inp.dockerfile)
    except ValueError as e:
        ok(False, str(e))
        return failures
    by_name = {s.name: s for s in stages}
    for target in ("build", "binary", "python", "cpu", "gpu", "model"):
        ok(target in by_name, f"stage `{target}` exists")
    if failures:
        return failures
    make = makefile_commands(inp.makefile)

    # cargo build: the Makefile's `build` recipe
    cargo = [c for c in make.get("build", []) if c[:2] == ["cargo", "build"]]
    ok(len(cargo) == 1, f"Makefile `build` runs one cargo build ({cargo})")
    if cargo:
        want = cargo[0]
        ok(any(contains(c, want) for c in run_commands(by_name["build"])),
           f"stage build runs the Makefile's `{' '.join(want)}`")

    # venv + pip install: the Makefile's `setup` recipe
    setup = [normalise(c) for c in make.get("setup", [])]
    pip = [c for c in setup if c[:4] == ["PYTHON", "-m", "pip", "install"]]
    venv = [c for c in setup if c[:3] == ["PYTHON", "-m", "venv"]]
    ok(len(pip) == 1 and len(venv) == 1, "Makefile `setup` creates a venv and pip-installs once")
    py_cmds = [normalise(c) for c in run_commands(by_name["python"])]
    if pip:
        ok(any(contains(c, pip[0]) for c in py_cmds),
           f"stage python runs the Makefile's `{' '.join(pip[0][1:])}`")
    if venv:
        ok(any(c[:3] == ["PYTHON", "-m", "venv"] for c in py_cmds), "stage python creates a venv like `make setup`")
    ok("-r models/requirements.txt" in " ".join(" ".join(c) for c in py_cmds),
       "stage python installs models/requirements.txt")
    ort = re.search(r"^onnxruntime==(\S+)", inp.requirements, re.M)
    ok(bool(ort) and ort.group(1).startswith("1.31."), f"models/requirements.txt pins onnxruntime 1.31.x ({ort.group(1) if ort else None})")
    ok(not re.search(r"onnxruntime==|libonnxruntime\.so\.\d+\.\d+\.\d+", inp.dockerfile),
       "the Dockerfile names no onnxruntime version of its own (the CPU one comes from models/requirements.txt)")

    # model generation: the Makefile's model recipe
    gen = [normalise(c) for c in make.get("model", []) if "models/make_resnet50.py" in c]
    ok(len(gen) == 1, "Makefile `model` runs one model-generation command")
    if gen and "model-generated" in by_name:
        want = [t for t in gen[0] if t != "$@"]
        ok(any(contains(normalise(c), want) for c in run_commands(by_name["model-generated"])),
           f"stage model-generated runs the Makefile's `{' '.join(want)} <path>`")

    # stage lineage: cpu <- ort-cpu <- python ; gpu <- ort-gpu <- python; binaries from build
    def copies_from(stage: Stage) -> set[str]:
        return {m.group(1) for ins in stage.instrs if ins.cmd == "COPY" for m in [re.search(r"--from=(\S+)", ins.args)] if m}

    ok(copies_from(by_name["cpu"]) == {"binary", "ort-cpu"}, "stage cpu copies only from binary and ort-cpu")
    ok(copies_from(by_name["gpu"]) == {"binary", "ort-gpu"}, "stage gpu copies only from binary and ort-gpu")
    # binary: `FROM binary-${BINARY_SOURCE}`; with the defaults that is `FROM build` and nothing else
    ok(gargs.get("BINARY_SOURCE") == "build", f"BINARY_SOURCE defaults to build ({gargs.get('BINARY_SOURCE')})")
    chain, seen = [], set()
    st = by_name["binary"]
    while st.name not in seen and st.base in by_name and st.name != "build":
        seen.add(st.name)
        ok(not st.instrs, f"stage {st.name} is a bare FROM (adds nothing to the binary of stage build)")
        chain.append(st.name)
        st = by_name[st.base]
    ok(st.name == "build", f"with the default build arguments stage binary is stage build ({' <- '.join(chain + [st.name])})")
    for s in ("ort-cpu", "ort-gpu", "model-generated"):
        ok(s in by_name and by_name[s].base == "python", f"stage {s} builds on stage python (the pinned venv)")

    # GPU requirements
    pins: dict[str, str] = {}
    bad_lines = []
    for line in inp.gpu_requirements.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)==([0-9][0-9A-Za-z.+-]*)", line)
        if m:
            pins[m.group(1).lower()] = m.group(2)
        else:
            bad_lines.append(line)
    ok(not bad_lines, f"{GPU_REQUIREMENTS}: every line is an exact `name==version` pin {bad_lines or ''}")
    ogpu = pins.get("onnxruntime-gpu", "")
    ver = tuple(int(x) for x in re.findall(r"\d+", ogpu)[:2]) if ogpu else (0, 0)
    ok((1, 19) <= ver <= (1, 26), f"onnxruntime-gpu is a CUDA 12 build, 1.19..1.26 ({ogpu or 'missing'})")
    nvidia = {k for k in pins if k.startswith("nvidia-")}
    ok(all(k.endswith("-cu12") for k in nvidia), f"only CUDA 12 NVIDIA libraries ({sorted(nvidia)})")
    ok(set(NVIDIA_LIB_DIRS) <= nvidia, f"every CUDA library the GPU stage copies is pinned ({sorted(set(NVIDIA_LIB_DIRS) - nvidia) or 'all'})")
    cudnn = tuple(int(x) for x in re.findall(r"\d+", pins.get("nvidia-cudnn-cu12", "0.0"))[:2])
    ok(cudnn[0] == 9 and cudnn[1] <= 10, f"cuDNN 9.x <= 9.10, the last with Pascal kernels ({pins.get('nvidia-cudnn-cu12')})")
    gpu_run = " ".join(" ".join(c) for c in run_commands(by_name["ort-gpu"]))
    ok(f"-r {GPU_REQUIREMENTS}" in gpu_run and "--no-deps" in gpu_run, f"stage ort-gpu installs {GPU_REQUIREMENTS} with --no-deps")
    ok(re.search(r"cuda_archs\.py --require 61\b", gpu_run) is not None, "stage ort-gpu checks the libraries for sm_61 kernels")
    for pkg, d in NVIDIA_LIB_DIRS.items():
        ok(f"/nvidia/{d}/lib/" in gpu_run, f"stage ort-gpu copies the {pkg} libraries")

    # COPY sources
    patterns = dockerignore_patterns(inp.dockerignore)
    generated = {t for t in make if t.endswith("model.onnx")}
    if any(c[:2] == ["cargo", "build"] and "--release" in c and "brainai" in c for c in make.get("build", [])):
        generated.add("target/release/brainai")
    for stage in stages:
        args = stage_args(stage, gargs)
        for ins in stage.instrs:
            if ins.cmd not in ("COPY", "ADD"):
                continue
            words = [w for w in shlex.split(ins.args) if not w.startswith("--")]
            if ins.cmd == "ADD":
                ok(not any(re.match(r"https?://", w) for w in words), f"line {ins.line}: ADD fetches no URL")
            if "--from=" in ins.args:
                continue
            for src in words[:-1]:
                src = expand(src, args).rstrip("/")
                matches = glob.glob(os.path.join(ROOT, src))
                made = src in generated or any(fnmatch.fnmatchcase(src, g) for g in generated)
                maker = "`make build`" if src.startswith("target/") else "`make model`"
                ok(bool(matches) or made,
                   f"line {ins.line}: COPY source {src} exists" + (f" (made by {maker})" if made and not matches else ""))
                ok(not ignored(src, patterns), f"line {ins.line}: COPY source {src} is in the build context ({DOCKERIGNORE})")

    # base images
    names = {s.name for s in stages}
    for s in stages:
        if s.base in names or s.base == "scratch":
            continue
        ref = s.base
        tag = ref.rsplit("/", 1)[-1].partition(":")[2]
        ok("@sha256:" in ref or (tag and tag != "latest" and "$" not in ref),
           f"stage {s.name}: base image {ref} has an explicit tag or digest")
    rust = re.search(r"rust:(\d+)\.(\d+)(?:\.(\d+))?", by_name["build"].base)
    need = re.search(r'^rust-version\s*=\s*"(\d+)\.(\d+)', inp.cargo_toml, re.M)
    if ok(bool(rust and need), f"Rust image version readable ({by_name['build'].base})"):
        ok((int(rust.group(1)), int(rust.group(2))) >= (int(need.group(1)), int(need.group(2))),
           f"Rust image {rust.group(0)} >= Cargo.toml rust-version {need.group(1)}.{need.group(2)}")

    # runtime stages
    # every listen address of README's configuration table: `--grpc-addr`, `--http-addr`, `--metrics-addr`
    listen = dict(re.findall(r"^\| `--([\w-]+-addr)` \|[^|\n]*\| `[\d.]+:(\d+)`", inp.readme, re.M))
    ok({"grpc-addr", "metrics-addr"} <= set(listen), f"README states the default gRPC and metrics ports (listen addresses: {listen})")
    for name in ("cpu", "gpu", "model"):
        st = by_name[name]
        users = [i for i in st.instrs if i.cmd == "USER"]
        last = users[-1].args if users else ""
        m = re.fullmatch(r"(\d+)(?::(\d+))?", last)
        ok(bool(m) and int(m.group(1)) != 0 and (m.group(2) is None or int(m.group(2)) != 0),
           f"stage {name} runs as a numeric non-root USER ({last or 'none'})")
        if name == "model":
            continue
        ep = [i for i in st.instrs if i.cmd == "ENTRYPOINT"]
        try:
            exec_form = bool(ep) and isinstance(json.loads(ep[-1].args), list)
        except json.JSONDecodeError:
            exec_form = False
        ok(exec_form, f"stage {name} has an exec-form ENTRYPOINT")
        exposed = {p for i in st.instrs if i.cmd == "EXPOSE" for p in i.args.split()}
        if listen:
            ok(set(listen.values()) <= exposed,
               f"stage {name} exposes the README's listen ports {sorted(listen.values())} ({sorted(exposed)})")
        env = " ".join(i.args for i in st.instrs if i.cmd == "ENV")
        dylib = re.search(r"ORT_DYLIB_PATH=(\S+)", env)
        copied = [shlex.split(i.args)[-1] for i in st.instrs if i.cmd == "COPY"]
        ok(bool(dylib) and any(dylib.group(1).startswith(d.rstrip("/") + "/") for d in copied),
           f"stage {name}: ORT_DYLIB_PATH points into a directory it copies in ({dylib.group(1) if dylib else None})")
    return failures


def self_test() -> int:
    """Each mutation must be caught; the real inputs must pass."""
    base = load_inputs()
    quiet = lambda _msg: None
    if check(base, quiet):
        print("self-test: the unmodified inputs fail; fix them first")
        return 1

    def mutate(field_name: str, old: str, new: str) -> Inputs:
        value = getattr(base, field_name)
        assert old in value, f"self-test mutation target {old!r} not found in {field_name}"
        kw = dict(base.__dict__)
        kw[field_name] = value.replace(old, new, 1)
        return Inputs(**kw)

    cases = {
        "cargo build without --locked": mutate("dockerfile", "cargo build --release --locked", "cargo build --release"),
        "pip install of another requirements file": mutate("dockerfile", "-r models/requirements.txt", "-r requirements.txt"),
        "runtime as root": mutate("dockerfile", "USER 65532:65532\nEXPOSE 50051 8000 9090\nENTRYPOINT", "USER root\nEXPOSE 50051 8000 9090\nENTRYPOINT"),
        "COPY of a missing path": mutate("dockerfile", "COPY benches benches", "COPY benchmarks benchmarks"),
        "COPY source excluded by .dockerignore": mutate("dockerignore", "!proto/\n", ""),
        "CUDA 13 onnxruntime-gpu": mutate("gpu_requirements", "onnxruntime-gpu==1.26.0", "onnxruntime-gpu==1.27.0"),
        "cuDNN without Pascal": mutate("gpu_requirements", "nvidia-cudnn-cu12==9.10.2.21", "nvidia-cudnn-cu12==9.11.0.98"),
        "unpinned GPU library": mutate("gpu_requirements", "nvidia-cublas-cu12==12.8.4.1", "nvidia-cublas-cu12>=12.8"),
        "no sm_61 check": mutate("dockerfile", "--require 61", "--require 75"),
        "latest base image": mutate("dockerfile", "ARG GPU_RUNTIME_IMAGE=debian:bookworm-slim", "ARG GPU_RUNTIME_IMAGE=debian:latest"),
        "wrong metrics port": mutate("dockerfile", "EXPOSE 50051 8000 9090\nENTRYPOINT", "EXPOSE 50051 8000 9091\nENTRYPOINT"),
        "HTTP API port not exposed": mutate("dockerfile", "EXPOSE 50051 8000 9090\nENTRYPOINT", "EXPOSE 50051 9090\nENTRYPOINT"),
        "prebuilt binary by default": mutate("dockerfile", "ARG BINARY_SOURCE=build", "ARG BINARY_SOURCE=context"),
        "runtime not from stage binary": mutate("dockerfile", "FROM ${CPU_RUNTIME_IMAGE} AS cpu\nCOPY --from=binary", "FROM ${CPU_RUNTIME_IMAGE} AS cpu\nCOPY --from=binary-context"),
        "binary-build changes the build stage": mutate("dockerfile", "FROM build AS binary-build\n", "FROM build AS binary-build\nRUN strip /out/brainai\n"),
        "prebuilt binary excluded by .dockerignore": mutate("dockerignore", "!target/release/brainai\n", ""),
        "Makefile build flags changed": mutate("makefile", "CARGO_FLAGS := --release --locked", "CARGO_FLAGS := --release --locked --features foo"),
    }
    missed = [name for name, inp in cases.items() if not check(inp, quiet)]
    for name in cases:
        print(f"  {'ok  ' if name not in missed else 'FAIL'} self-test: caught {name}")
    return 1 if missed else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--self-test", action="store_true", help="also prove that broken inputs fail")
    a = ap.parse_args()
    print(f"{DOCKERFILE}: static checks (no Docker engine)")
    failures = check(load_inputs())
    rc = 1 if failures else 0
    if a.self_test:
        rc |= self_test()
    if failures:
        print(f"{DOCKERFILE}: {len(failures)} check(s) failed")
    return rc


if __name__ == "__main__":
    sys.exit(main())
