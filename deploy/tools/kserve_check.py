#!/usr/bin/env python3
"""Validates what `kustomize build` renders for deploy/kserve (the ServingRuntime and the
InferenceService) and deploy/kserve/model-repository (PVC, Job, ConfigMap). Run by
deploy/check.sh with the project venv (.venv):

    kserve_check.py --runtime RENDERED.yaml --repository RENDERED.yaml [--self-test]

  * KServe objects strictly against KServe's own CRDs (deploy/kserve/crds: v0.20.0, gzip; their
    SHA-256 must be the ones deploy/kserve/crds/README.md names): the openAPIV3Schema of the
    served version with `jsonschema`, unknown fields rejected everywhere except under
    x-kubernetes-preserve-unknown-fields: true (object schemas without additionalProperties get
    additionalProperties: false), x-kubernetes-int-or-string (integer or string), list-type
    map/set keys unique, int32/int64 ranges, metadata as ObjectMeta; apiVersion/kind must be the
    CRD's group/version/kind; no `status` in a manifest;
  * every other object strictly against the Kubernetes 1.30 schemas (kubernetes-validate);
  * the ServingRuntime against the binary (src/config.rs) and README's configuration table: `serve`,
    every flag and BRAINAI_* variable one the binary has and README documents, no variable that an
    argument overrides, --model-repository at KServe's /mnt/models and no --model-version (they
    conflict); listen addresses (arguments, variables or the binary's defaults) = the container
    ports, the HTTP one first at KServe's 8080, the gRPC one named for KServe (h2c/grpc), the
    metrics port = prometheus.kserve.io/port (and prometheus.io/port, with KServe's own
    prometheus.io annotation switched off); probes on those ports; v2 and grpc-v2 only when the
    binary serves the OIP REST routes and inference.GRPCInferenceService; the image is the CPU
    overlay's; security context, threads <= CPU limit, grace period and liveness vs the drain;
  * the InferenceService against the ServingRuntime: runtime name, modelFormat, protocolVersion,
    Standard (RawDeployment) mode, storageUri = the model repository's PVC, rolling update;
  * the model repository: the Job fills that PVC at <mount>/<model>/ for a model of models/, with
    model.toml identical to models/<model>/model.toml, as a non-root, read-only container.

--self-test breaks copies of the rendered objects in many ways and fails unless each break is
caught (and checks that what the schemas allow, e.g. any `status` or an integer CPU, still passes).
"""
from __future__ import annotations

import argparse
import copy
import gzip
import hashlib
import json
import os
import re
import sys

import jsonschema
import yaml
from kubernetes_validate import utils as kv

from validate import Report, read  # the same file reader and ok/FAIL reporter as the k8s checks

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
KSERVE_VERSION = "v0.20.0"
CRD_DIR = "deploy/kserve/crds"
CRD_NOTICE = "deploy/kserve/crds/README.md"
GROUP = "serving.kserve.io"
K8S_VERSION = "1.30"
CPU_OVERLAY = "deploy/k8s/overlays/cpu/kustomization.yaml"
# KServe v0.20 conventions (pkg/constants, pkg/controller/.../service_reconciler.go):
MODEL_MOUNT = "/mnt/models"  # DefaultModelLocalMountPath: where storageUri lands
KSERVE_HTTP_PORT = 8080  # InferenceServiceDefaultHttpPort: the predictor Service's port 80 targets the first port
CONTAINER_NAME = "kserve-container"  # InferenceServiceContainerName: the ISVC's model spec merges into it
STANDARD_MODES = {"Standard", "RawDeployment"}  # RawDeployment: the deprecated name of Standard
# gRPC health names the server registers (src/server.rs): "" and the classifier = the server, and
# the Open Inference Protocol's service.
HEALTH_SERVICES = {"", "brainai.v1.TumorClassifier", "inference.GRPCInferenceService"}
OIP_GRPC_SERVICE = "inference.GRPCInferenceService"
# The server's listen-address flags: flag -> role.
LISTEN_FLAGS = {"--http-addr": "http", "--grpc-addr": "grpc", "--metrics-addr": "metrics"}
CLOSE_AFTER_DRAIN_S = 1  # after the drain the server closes what is left 1 s later, then exits
OBJECT_META = {  # what a manifest's metadata may hold (the API server validates ObjectMeta itself)
    "type": "object",
    "additionalProperties": False,
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
        "namespace": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


# ---- CRDs -> strict JSON schemas -------------------------------------------------------------------


def strict_schema(node, root: bool = True):
    """A copy of an openAPIV3Schema that rejects what the API server would prune: unknown fields
    (additionalProperties: false on every object schema that declares no additionalProperties and
    no x-kubernetes-preserve-unknown-fields), with int-or-string and nullable made explicit."""
    if isinstance(node, list):
        return [strict_schema(n, False) for n in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for k, v in node.items():
        if k == "properties":
            out[k] = {name: strict_schema(sub, False) for name, sub in v.items()}
        elif k in ("items", "additionalProperties", "not") and isinstance(v, dict):
            out[k] = strict_schema(v, False)
        elif k in ("anyOf", "allOf", "oneOf"):
            out[k] = strict_schema(v, False)
        else:
            out[k] = v
    if root:
        out.setdefault("properties", {})["metadata"] = OBJECT_META
    if out.get("x-kubernetes-embedded-resource"):
        props = out.setdefault("properties", {})
        props.setdefault("apiVersion", {"type": "string"})
        props.setdefault("kind", {"type": "string"})
        props.setdefault("metadata", {"type": "object"})
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    preserve = out.get("x-kubernetes-preserve-unknown-fields") is True
    if out.get("type") == "object" and "additionalProperties" not in out and not preserve:
        # no properties at all: the API server would prune every field of it
        out["additionalProperties"] = False
    return out


def _list_type(validator, value, instance, schema):
    """x-kubernetes-list-type: `set` items and `map` keys (x-kubernetes-list-map-keys, with their
    schema defaults, as the API server applies them first) must be unique."""
    if not validator.is_type(instance, "array"):
        return
    if value == "set":
        seen = []
        for item in instance:
            if item in seen:
                yield jsonschema.ValidationError(f"duplicate item {item!r} in a list of x-kubernetes-list-type set")
            seen.append(item)
    elif value == "map":
        keys = schema.get("x-kubernetes-list-map-keys", [])
        props = schema.get("items", {}).get("properties", {})
        seen = set()
        for item in instance:
            if not isinstance(item, dict):
                continue
            key = tuple(json.dumps(item.get(k, props.get(k, {}).get("default")), sort_keys=True) for k in keys)
            if key in seen:
                yield jsonschema.ValidationError(
                    f"duplicate {dict(zip(keys, (json.loads(x) for x in key)))} in a list of x-kubernetes-list-type map keyed by {keys}")
            seen.add(key)


FORMATS = jsonschema.FormatChecker(formats=())


@FORMATS.checks("int32")
def _int32(value) -> bool:
    return not isinstance(value, int) or isinstance(value, bool) or -(2**31) <= value < 2**31


@FORMATS.checks("int64")
def _int64(value) -> bool:
    return not isinstance(value, int) or isinstance(value, bool) or -(2**63) <= value < 2**63


StrictValidator = jsonschema.validators.extend(jsonschema.Draft202012Validator, {"x-kubernetes-list-type": _list_type})


class Crd:
    def __init__(self, file: str, doc: dict, sha256: str):
        self.file, self.sha256 = file, sha256
        spec = doc["spec"]
        self.group, self.kind = spec["group"], spec["names"]["kind"]
        served = [v for v in spec["versions"] if v.get("served")]
        self.version = next((v["name"] for v in served if v.get("storage")), served[0]["name"])
        self.api_version = f"{self.group}/{self.version}"
        raw = next(v for v in served if v["name"] == self.version)["schema"]["openAPIV3Schema"]
        self.schema = strict_schema(raw)
        self.validator = StrictValidator(self.schema, format_checker=FORMATS)

    def errors(self, obj: dict) -> list[str]:
        out = []
        for e in sorted(self.validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path))):
            path = ".".join(str(p) for p in e.absolute_path) or "(top)"
            out.append(f"{path}: {e.message}")
        return out


def load_crds() -> dict[str, Crd]:
    notice = read(CRD_NOTICE) if os.path.exists(os.path.join(ROOT, CRD_NOTICE)) else ""
    documented = dict(re.findall(r"^\| `([\w.]+\.yaml\.gz)` \|[^|]*\| `([0-9a-f]{64})` \|", notice, re.M))
    crds = {}
    for name in sorted(os.listdir(os.path.join(ROOT, CRD_DIR))):
        if not name.endswith(".yaml.gz"):
            continue
        with gzip.open(os.path.join(ROOT, CRD_DIR, name)) as f:
            raw = f.read()
        doc = yaml.safe_load(raw)
        crd = Crd(name, doc, hashlib.sha256(raw).hexdigest())
        crd.documented_sha256 = documented.get(name)
        crds[crd.kind] = crd
    return crds


# ---- what the binary and README say ------------------------------------------------------------------


class Binary:
    """`brainai serve`'s flags and variables (src/config.rs, the security flags flattened into it
    from src/security/mod.rs, src/main.rs, src/telemetry.rs) and what README's configuration table documents."""

    def __init__(self):
        config = read("src/config.rs")
        start = config.index("pub struct ServeArgs")
        body = config[start: config.index("\n}\n", start)]
        if "security::SecurityArgs" in body:  # #[command(flatten)] security: SecurityArgs
            security = read("src/security/mod.rs")
            sstart = security.index("pub struct SecurityArgs")
            body += security[sstart: security.index("\n}\n", sstart)]
        self.flags: dict[str, str | None] = {}  # --flag -> its variable
        self.defaults: dict[str, str] = {}  # --flag -> default (as written)
        for m in re.finditer(r"#\[arg\((.*?)\)\]\s*pub (\w+):", body, re.S):
            attrs, field = m.group(1), m.group(2)
            if not re.search(r"\blong\b", attrs):
                continue
            named = re.search(r'\blong\s*=\s*"([\w-]+)"', attrs)
            flag = "--" + (named.group(1) if named else field.replace("_", "-"))
            env = re.search(r'\benv\s*=\s*"(\w+)"', attrs)
            self.flags[flag] = env.group(1) if env else None
            dv = re.search(r'\bdefault_value\s*=\s*"([^"]*)"', attrs)
            dvt = re.search(r"\bdefault_value_t\s*=\s*([\w\s*+]+?)\s*(?:,|$)", attrs)
            if dv:
                self.defaults[flag] = dv.group(1)
            elif dvt and re.fullmatch(r"[\d_\s*+]+", dvt.group(1)):
                self.defaults[flag] = str(eval(dvt.group(1).replace("_", "")))  # digits, * and + only
            elif dvt:
                self.defaults[flag] = dvt.group(1).strip()
        self.env = {v for v in self.flags.values() if v} | set(re.findall(r'"((?:BRAINAI|ORT)_[A-Z0-9_]+)"', read("src/main.rs") + read("src/telemetry.rs")))
        readme = read("README.md")
        section = readme.partition("## Configuration")[2]
        section = section[: section.find("\n## ")] if "\n## " in section else section
        self.documented_flags = set(re.findall(r"`(--[a-z][\w-]*)`", section))
        self.documented_env = set(re.findall(r"`((?:BRAINAI|ORT)_[A-Z0-9_]+)`", readme))
        self.oip_grpc = OIP_GRPC_SERVICE in read("src/server.rs")
        self.oip_rest = '"/v2/models/{model}/infer"' in read("src/api/rest.rs")
        users = re.findall(r"^USER (\d+)(?::(\d+))?", read("deploy/docker/Dockerfile"), re.M)
        self.image_uids = {int(u) for u, _ in users}
        self.model_tomls = {}
        for name in sorted(os.listdir(os.path.join(ROOT, "models"))):
            p = os.path.join("models", name, "model.toml")
            if os.path.exists(os.path.join(ROOT, p)):
                self.model_tomls[name] = read(p)
        overlay = yaml.safe_load(read(CPU_OVERLAY))
        img = next((i for i in overlay.get("images", []) if i.get("name") == "brainai-serve"), {})
        self.cpu_image = f"{img.get('newName')}:{img.get('newTag')}"


def parse_args(args: list) -> tuple[dict, list[str]]:
    """{--flag: value} of `serve --flag value --flag=value ...`, and what does not fit."""
    problems, flags = [], {}
    rest = [str(a) for a in args[1:]]
    i = 0
    while i < len(rest):
        a = rest[i]
        if not a.startswith("--"):
            problems.append(f"argument {a!r} is not a --flag")
            i += 1
            continue
        if "=" in a:
            k, v = a.split("=", 1)
            i += 1
        elif i + 1 < len(rest) and not rest[i + 1].startswith("--"):
            k, v = a, rest[i + 1]
            i += 2
        else:
            k, v = a, None
            problems.append(f"{a} has no value")
            i += 1
        if k in flags:
            problems.append(f"{k} given twice")
        flags[k] = v
    return flags, problems


def port_of(addr) -> int | None:
    m = re.search(r":(\d+)$", str(addr or ""))
    return int(m.group(1)) if m else None


def cpu_cores(q) -> float:
    s = str(q or "0")
    return float(s[:-1]) / 1000 if s.endswith("m") else float(s)


# ---- the checks ---------------------------------------------------------------------------------------


def by_kind(docs, kind):
    return [d for d in docs if d.get("kind") == kind]


def validate_schemas(where: str, docs: list[dict], crds: dict[str, Crd], rep: Report) -> None:
    for d in docs:
        kn = f"{d.get('kind')}/{d.get('metadata', {}).get('name')}"
        group = str(d.get("apiVersion", "")).split("/")[0]
        if group == GROUP or d.get("kind") in crds:
            crd = crds.get(d.get("kind"))
            if not rep.ok(crd is not None, f"{where}: {kn}: a KServe kind with a vendored CRD ({sorted(crds)})"):
                continue
            rep.ok(d.get("apiVersion") == crd.api_version,
                   f"{where}: {kn}: apiVersion {d.get('apiVersion')} is the CRD's served version {crd.api_version}")
            rep.ok("status" not in d, f"{where}: {kn}: no status in a manifest")
            errors = crd.errors(d)
            rep.ok(not errors, f"{where}: {kn} valid against KServe {KSERVE_VERSION}'s CRD {crd.file} (strict)"
                   + (f": {errors[:5]}" if errors else ""))
        else:
            try:
                kv.validate(d, K8S_VERSION, strict=True)
                rep.ok(True, f"{where}: {kn} valid against Kubernetes {K8S_VERSION} (strict)")
            except kv.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                rep.ok(False, f"{where}: {kn} invalid against Kubernetes {K8S_VERSION}: {path}: {e.message}")
            except kv.SchemaNotFoundError as e:
                rep.ok(False, f"{where}: {kn}: {e.message}")


def check_probe(rep: Report, what: str, probe: dict, listen: dict, liveness: bool) -> None:
    g, h = probe.get("grpc"), probe.get("httpGet")
    if g is not None:
        want = HEALTH_SERVICES if liveness else HEALTH_SERVICES - {""}
        rep.ok(isinstance(g.get("port"), int) and g.get("port") == listen["grpc"] and g.get("service", "") in want,
               f"{what} is a native gRPC probe on the gRPC port {listen['grpc']} for one of {sorted(want)} ({g})")
    elif h is not None:
        paths = {"/v2/health/live": "http", "/v2/health/ready": "http", "/healthz": "metrics", "/readyz": "metrics"}
        role = paths.get(h.get("path"))
        rep.ok(role is not None and h.get("port") in (listen.get(role), {"http": "http", "metrics": "metrics"}[role])
               and (liveness or h.get("path") in ("/v2/health/ready", "/readyz")),
               f"{what} is an HTTP probe of a health route on its port ({h})")
    else:
        rep.ok(False, f"{what} is a gRPC or HTTP health probe ({sorted(probe)})")


def validate_runtime(sr: dict, isvc: dict, repo_docs: list[dict], binary: Binary, rep: Report) -> None:
    where = f"ServingRuntime/{sr.get('metadata', {}).get('name')}"
    spec = sr.get("spec", {})
    containers = spec.get("containers", [])
    rep.ok(len(containers) == 1 and containers[0].get("name") == CONTAINER_NAME,
           f"{where}: one container, named {CONTAINER_NAME} (KServe merges the InferenceService's model into it)")
    c = next((x for x in containers if x.get("name") == CONTAINER_NAME), containers[0] if containers else {})
    rep.ok(c.get("image") == binary.cpu_image and not c.get("command"),
           f"{where}: image {c.get('image')} is the CPU overlay's {binary.cpu_image}, with the image's ENTRYPOINT (no command)")

    # arguments and variables: flags and variables the binary has and README documents
    args = c.get("args", [])
    rep.ok(bool(args) and args[0] == "serve", f"{where}: args start with the subcommand `serve` ({args[:1]})")
    flags, problems = parse_args(args)
    rep.ok(not problems, f"{where}: args are --flag value pairs {problems or ''}")
    for flag in sorted(flags):
        rep.ok(flag in binary.flags and flag in binary.documented_flags,
               f"{where}: {flag} is a flag the binary has (src/config.rs) and README's configuration table documents")
    env = {}
    for e in c.get("env", []):
        name = e.get("name", "")
        env[name] = e.get("value")
        if name.startswith(("BRAINAI_", "ORT_")):
            rep.ok(name in binary.env and name in binary.documented_env,
                   f"{where}: {name} is a variable the binary reads and README documents (a typo would be ignored)")
        rep.ok("valueFrom" not in e or name not in binary.flags.values(), f"{where}: {name} has a literal value")
    # No TLS on the runtime: KServe's networking (the predictor Service's h2c/http appProtocol, its
    # gateway or Istio, Knative's probes) speaks plaintext to the container and does TLS itself.
    tls = sorted(x for x in ("--tls-cert", "--tls-key", "--tls-client-ca") if x in flags or binary.flags.get(x) in env)
    rep.ok(not tls, f"{where}: no TLS on the runtime's ports (KServe routes plaintext h2c/HTTP to them) {tls or ''}")
    shadowed = sorted(binary.flags[f] for f in flags if binary.flags.get(f) in env)
    rep.ok(not shadowed, f"{where}: no variable that an argument overrides {shadowed or ''}")
    rep.ok(not c.get("envFrom"), f"{where}: no envFrom (every setting visible here, checked)")

    def value(flag):
        if flag in flags:
            return flags[flag]
        var = binary.flags.get(flag)
        if var in env:
            return env[var]
        return binary.defaults.get(flag)

    rep.ok(value("--model-repository") == MODEL_MOUNT,
           f"{where}: --model-repository is {MODEL_MOUNT}, where KServe puts the storageUri ({value('--model-repository')})")
    rep.ok(value("--model-version") is None, f"{where}: no --model-version / BRAINAI_MODEL_VERSION (conflicts with --model-repository)")

    # listen addresses = container ports, in KServe's order and names
    listen = {role: port_of(value(flag)) for flag, role in LISTEN_FLAGS.items()}
    ports = c.get("ports", [])
    by_role = {}
    for p in ports:
        name = str(p.get("name", ""))
        grpc_named = "grpc" in name or "h2c" in name  # KServe's isGrpcPort
        role = "grpc" if grpc_named else ("metrics" if name == "metrics" else "http" if name.startswith("http") else name)
        by_role.setdefault(role, []).append(p.get("containerPort"))
    got = {role: nums[0] if len(nums) == 1 else nums for role, nums in by_role.items()}
    rep.ok(got == listen and None not in listen.values(),
           f"{where}: container ports {got} are the listen addresses {listen} (--http-addr, --grpc-addr, --metrics-addr,"
           " their variables or the binary's defaults); the gRPC port's name has h2c or grpc (KServe: appProtocol h2c, gRPC route)")
    rep.ok(len(set(listen.values())) == len(listen), f"{where}: the listeners have distinct ports {listen}")
    first = ports[0] if ports else {}
    rep.ok(first.get("containerPort") == listen["http"] == KSERVE_HTTP_PORT,
           f"{where}: the first container port is the HTTP API on {KSERVE_HTTP_PORT}, KServe's default HTTP port "
           f"(the predictor Service's port 80 targets it) ({first})")

    # protocols: only what the binary serves
    protocols = set(spec.get("protocolVersions", []))
    rep.ok(protocols == {"v2", "grpc-v2"} and binary.oip_rest and binary.oip_grpc,
           f"{where}: protocolVersions {sorted(protocols)} = v2 (the binary's /v2 REST routes) and grpc-v2 ({OIP_GRPC_SERVICE})")
    formats = spec.get("supportedModelFormats", [])
    rep.ok(any(f.get("name") == "onnx" and f.get("autoSelect") is True and f.get("priority") for f in formats)
           and all(f.get("name") == "onnx" for f in formats),
           f"{where}: supports the onnx model format only, auto-selectable with a priority ({formats})")
    rep.ok(spec.get("multiModel") in (None, False), f"{where}: a single-model runtime (no ModelMesh)")

    # metrics annotations
    ann = spec.get("annotations", {})
    rep.ok(str(ann.get("prometheus.kserve.io/port")) == str(listen["metrics"]) and ann.get("prometheus.kserve.io/path") == "/metrics",
           f"{where}: prometheus.kserve.io/port {ann.get('prometheus.kserve.io/port')} and path {ann.get('prometheus.kserve.io/path')} are the metrics listener {listen['metrics']} /metrics")
    if "prometheus.io/port" in ann:
        rep.ok(str(ann["prometheus.io/port"]) == str(listen["metrics"]) and ann.get("serving.kserve.io/enable-prometheus-scraping") == "false",
               f"{where}: prometheus.io/port {ann['prometheus.io/port']} is the metrics port, and KServe's own prometheus.io annotation is off "
               "(serving.kserve.io/enable-prometheus-scraping: \"false\"; KServe would set 9091)")

    # probes, drain, grace period
    for name in ("startupProbe", "readinessProbe", "livenessProbe"):
        if rep.ok(name in c, f"{where}: has a {name} (KServe's default is a TCP check of the first port)"):
            check_probe(rep, f"{where}: {name}", c[name], listen, name == "livenessProbe")
    sp = c.get("startupProbe", {})
    rep.ok(sp.get("periodSeconds", 10) * sp.get("failureThreshold", 3) >= 120,
           f"{where}: the startup probe allows {sp.get('periodSeconds', 10) * sp.get('failureThreshold', 3)} s for loading and warm-up")
    try:
        drain = int(value("--drain-timeout-s"))
    except (TypeError, ValueError):
        drain = None
    pre = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds")
    pred = isvc.get("spec", {}).get("predictor", {})
    grace = pred.get("terminationGracePeriodSeconds", 30)
    rep.ok(isinstance(pre, int) and drain is not None and grace >= pre + drain + CLOSE_AFTER_DRAIN_S + 4,
           f"{where}: InferenceService terminationGracePeriodSeconds {grace} >= preStop {pre} + drain {drain} + {CLOSE_AFTER_DRAIN_S} + 4 (slack)")
    lp = c.get("livenessProbe", {})
    live_s = lp.get("periodSeconds", 10) * lp.get("failureThreshold", 3)
    rep.ok(drain is not None and live_s > (pre or 0) + drain + CLOSE_AFTER_DRAIN_S,
           f"{where}: liveness needs {live_s} s of failures, more than preStop + drain + {CLOSE_AFTER_DRAIN_S} s")

    # resources, device, security
    res = c.get("resources", {})
    rep.ok({"cpu", "memory"} <= set(res.get("requests", {})) and {"cpu", "memory"} <= set(res.get("limits", {})),
           f"{where}: CPU and memory requests and limits")
    try:
        threads = int(value("--intra-op-threads"))
    except (TypeError, ValueError):
        threads = 0
    rep.ok(1 <= threads <= cpu_cores(res.get("limits", {}).get("cpu")),
           f"{where}: BRAINAI_INTRA_OP_THREADS={threads} set and within the CPU limit (ORT ignores the pod's CPU quota)")
    rep.ok(value("--device") == "cpu" and "nvidia.com/gpu" not in res.get("limits", {}) and "gpu" not in str(c.get("image")),
           f"{where}: CPU image, BRAINAI_DEVICE=cpu, no GPU ({value('--device')})")
    sc = c.get("securityContext", {})
    psc = pred.get("securityContext", {})
    caps = sc.get("capabilities", {})
    rep.ok(sc.get("allowPrivilegeEscalation") is False and sc.get("readOnlyRootFilesystem") is True and "ALL" in caps.get("drop", [])
           and not caps.get("add") and not sc.get("privileged"),
           f"{where}: read-only root, no privilege escalation, all capabilities dropped")
    uid = sc.get("runAsUser", psc.get("runAsUser"))
    rep.ok((sc.get("runAsNonRoot") or psc.get("runAsNonRoot")) is True and uid in binary.image_uids and uid != 0,
           f"{where}: runs as non-root uid {uid}, the image's USER {sorted(binary.image_uids)}")
    seccomp = sc.get("seccompProfile", psc.get("seccompProfile", {}))
    rep.ok(seccomp.get("type") == "RuntimeDefault", f"{where}: seccomp RuntimeDefault")
    tmp_vols = {v["name"] for v in spec.get("volumes", []) if "emptyDir" in v}
    rep.ok(any(m.get("mountPath") == "/tmp" and m.get("name") in tmp_vols for m in c.get("volumeMounts", [])),
           f"{where}: /tmp is an emptyDir (the root filesystem is read-only)")

    # the InferenceService on it
    iwhere = f"InferenceService/{isvc.get('metadata', {}).get('name')}"
    model = pred.get("model", {})
    rep.ok(model.get("runtime") == sr.get("metadata", {}).get("name"),
           f"{iwhere}: runtime {model.get('runtime')} is the ServingRuntime {sr.get('metadata', {}).get('name')}")
    fmt = model.get("modelFormat", {})
    rep.ok(any(f.get("name") == fmt.get("name") and (fmt.get("version") is None or f.get("version") == fmt.get("version")) for f in formats),
           f"{iwhere}: modelFormat {fmt} is one the ServingRuntime supports")
    rep.ok(model.get("protocolVersion") in protocols,
           f"{iwhere}: protocolVersion {model.get('protocolVersion')} is one the ServingRuntime declares (KServe assumes v1 without it)")
    only = {"modelFormat", "runtime", "protocolVersion", "storageUri", "resources", "env", "args"}
    rep.ok(set(model) <= only, f"{iwhere}: the model spec sets only {sorted(only)}, the runtime's container stays as checked ({sorted(set(model) - only) or ''})")
    mode = isvc.get("metadata", {}).get("annotations", {}).get("serving.kserve.io/deploymentMode")
    rep.ok(mode in STANDARD_MODES,
           f"{iwhere}: serving.kserve.io/deploymentMode is Standard ({mode}); Knative allows one container port, the runtime has {len(ports)}")
    strategy = pred.get("deploymentStrategy", {})
    rep.ok(strategy.get("rollingUpdate", {}).get("maxUnavailable") in (0, "0", "0%"),
           f"{iwhere}: a rolling update keeps every pod until its replacement is Ready")
    rep.ok(pred.get("minReplicas", 1) >= 2 and pred.get("maxReplicas", 0) >= pred.get("minReplicas", 1),
           f"{iwhere}: at least 2 replicas ({pred.get('minReplicas')}..{pred.get('maxReplicas')})")
    rep.ok(pred.get("automountServiceAccountToken") is False and pred.get("enableServiceLinks") is False,
           f"{iwhere}: no service-account token, no service-link variables")
    m = re.fullmatch(r"pvc://([a-z0-9]([-a-z0-9]*[a-z0-9])?)(/.*)?", str(model.get("storageUri", "")))
    pvcs = {p["metadata"]["name"] for p in by_kind(repo_docs, "PersistentVolumeClaim")}
    rep.ok(bool(m) and m.group(1) in pvcs,
           f"{iwhere}: storageUri {model.get('storageUri')} names the model repository's PVC {sorted(pvcs)}")

    # the model repository: the Job fills that PVC with models/<model>/model.toml + <N>/model.onnx
    jobs = by_kind(repo_docs, "Job")
    cms = {x["metadata"]["name"]: x for x in by_kind(repo_docs, "ConfigMap")}
    rwhere = "model repository"
    if not rep.ok(len(jobs) == 1, f"{rwhere}: one Job ({len(jobs)})"):
        return
    pod = jobs[0]["spec"]["template"]["spec"]
    jc = pod["containers"][0]
    vols = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = {mt["mountPath"]: mt for mt in jc.get("volumeMounts", [])}
    claim = {path: vols.get(mt["name"], {}).get("persistentVolumeClaim", {}).get("claimName") for path, mt in mounts.items()}
    repo_path = next((path for path, name in claim.items() if m and name == m.group(1)), None)
    script = "\n".join(str(x) for x in jc.get("command", []) + jc.get("args", []))
    model_name = re.search(r"^\s*model=([\w.-]+)\s*$", script, re.M)
    rep.ok(repo_path is not None and model_name is not None and model_name.group(1) in binary.model_tomls
           and re.search(rf'dst="{re.escape(repo_path)}/\$model"', script) is not None,
           f"{rwhere}: the Job writes models/<model> ({model_name.group(1) if model_name else None}) into the PVC of the storageUri, "
           f"mounted at {repo_path}, as <model>/")
    toml_cm = next((vols[mt["name"]]["configMap"]["name"] for mt in mounts.values() if "configMap" in vols.get(mt["name"], {})), None)
    toml = cms.get(toml_cm, {}).get("data", {}).get("model.toml")
    rep.ok(model_name is not None and toml is not None and toml == binary.model_tomls.get(model_name.group(1)),
           f"{rwhere}: its model.toml (ConfigMap {toml_cm}) is identical to models/{model_name.group(1) if model_name else '?'}/model.toml")
    jsc, jpsc = jc.get("securityContext", {}), pod.get("securityContext", {})
    rep.ok(jsc.get("allowPrivilegeEscalation") is False and jsc.get("readOnlyRootFilesystem") is True
           and "ALL" in jsc.get("capabilities", {}).get("drop", []) and jpsc.get("runAsNonRoot") is True
           and jpsc.get("runAsUser") in binary.image_uids and jpsc.get("seccompProfile", {}).get("type") == "RuntimeDefault",
           f"{rwhere}: the Job runs as the images' non-root uid, read-only root, no capabilities, seccomp RuntimeDefault")


def validate(runtime_docs, repo_docs, crds, binary, rep: Report) -> None:
    for crd in crds.values():
        rep.ok(crd.documented_sha256 == crd.sha256,
               f"{CRD_DIR}/{crd.file}: {crd.kind} {crd.api_version}, SHA-256 {crd.sha256[:16]}... as {CRD_NOTICE} names it")
    validate_schemas("deploy/kserve", runtime_docs, crds, rep)
    validate_schemas("deploy/kserve/model-repository", repo_docs, crds, rep)
    srs, isvcs = by_kind(runtime_docs, "ServingRuntime"), by_kind(runtime_docs, "InferenceService")
    rep.ok(len(srs) == 1 and len(isvcs) == 1, f"deploy/kserve: one ServingRuntime and one InferenceService ({len(srs)}, {len(isvcs)})")
    if srs and isvcs:
        try:
            validate_runtime(srs[0], isvcs[0], repo_docs, binary, rep)
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:  # a field of the wrong type
            rep.ok(False, f"deploy/kserve: the cross-checks cannot read the manifests ({type(e).__name__}: {e})")


# ---- self-test ----------------------------------------------------------------------------------------


def self_test(runtime_docs, repo_docs, crds, binary) -> int:
    def sr(d):
        return by_kind(d, "ServingRuntime")[0]

    def ctr(d):
        return sr(d)["spec"]["containers"][0]

    def isvc(d):
        return by_kind(d, "InferenceService")[0]

    def pred(d):
        return isvc(d)["spec"]["predictor"]

    def port(d, name):
        return next(p for p in ctr(d)["ports"] if p["name"] == name)

    def set_arg(flag, value):
        def apply(d):
            args = ctr(d)["args"]
            i = next(i for i, a in enumerate(args) if str(a).startswith(flag + "="))
            args[i] = f"{flag}={value}"
        return apply

    def add_env(name, value):
        return lambda d: ctr(d)["env"].append({"name": name, "value": value})

    def job(d):
        return by_kind(d, "Job")[0]

    def cm(d):
        return by_kind(d, "ConfigMap")[0]

    runtime = {  # breaks of deploy/kserve -> the failure that must name it
        "unknown field in the runtime's container": (lambda d: ctr(d).__setitem__("imagePullPolicyy", "Always"), "Additional properties are not allowed ('imagePullPolicyy'"),
        "unknown field in the runtime's spec": (lambda d: sr(d)["spec"].__setitem__("protocolVersion", ["v2"]), "Additional properties are not allowed ('protocolVersion'"),
        "unknown field in the InferenceService's predictor": (lambda d: pred(d).__setitem__("minReplica", 2), "Additional properties are not allowed ('minReplica'"),
        "unknown field in metadata": (lambda d: sr(d)["metadata"].__setitem__("label", {"a": "b"}), "Additional properties are not allowed ('label'"),
        "string where the CRD wants an integer": (lambda d: sr(d)["spec"]["supportedModelFormats"][0].__setitem__("priority", "2"), "is not of type 'integer'"),
        "string where the CRD wants an integer (InferenceService)": (lambda d: pred(d).__setitem__("minReplicas", "2"), "is not of type 'integer'"),
        "boolean where an int-or-string quantity belongs": (lambda d: ctr(d)["resources"]["limits"].__setitem__("cpu", True), "resources.limits.cpu"),
        "containerPort out of int32 range": (lambda d: port(d, "metrics").__setitem__("containerPort", 2**31), "is not a 'int32'"),
        "two container ports with the same number (list-type map)": (lambda d: ctr(d)["ports"].append({"name": "metrics2", "containerPort": 9090, "protocol": "TCP"}), "duplicate"),
        "the same port twice, once with the default protocol": (lambda d: ctr(d)["ports"].append({"name": "metrics2", "containerPort": 9090}), "duplicate"),
        "ServingRuntime with the InferenceService's apiVersion": (lambda d: sr(d).__setitem__("apiVersion", "serving.kserve.io/v1beta1"), "is the CRD's served version"),
        "a KServe kind without a vendored CRD": (lambda d: sr(d).__setitem__("kind", "ClusterServingRuntimes"), "a KServe kind with a vendored CRD"),
        "status in a manifest": (lambda d: isvc(d).__setitem__("status", {"url": "http://x"}), "no status in a manifest"),
        "gRPC container port not the --grpc-addr port": (lambda d: port(d, "h2c").__setitem__("containerPort", 8082), "container ports"),
        "--grpc-addr not the gRPC container port": (set_arg("--grpc-addr", "0.0.0.0:9000"), "container ports"),
        "HTTP API off KServe's 8080": (lambda d: (set_arg("--http-addr", "0.0.0.0:8000")(d), port(d, "http").__setitem__("containerPort", 8000)), "KServe's default HTTP port"),
        "gRPC port named so that KServe takes it for HTTP": (lambda d: port(d, "h2c").__setitem__("name", "rpc"), "container ports"),
        "metrics port first": (lambda d: ctr(d).__setitem__("ports", ctr(d)["ports"][::-1]), "the first container port is the HTTP API"),
        "a flag the binary does not have": (lambda d: ctr(d)["args"].append("--grpc-address=0.0.0.0:8081"), "--grpc-address is a flag the binary has"),
        "a typo'd BRAINAI_ variable": (add_env("BRAINAI_MAX_BATCH_SIZ", "8"), "BRAINAI_MAX_BATCH_SIZ is a variable the binary reads"),
        "a variable an argument overrides": (add_env("BRAINAI_GRPC_ADDR", "0.0.0.0:50051"), "no variable that an argument overrides"),
        "--model-version with --model-repository": (add_env("BRAINAI_MODEL_VERSION", "1"), "no --model-version"),
        "TLS on the runtime's ports": (add_env("BRAINAI_TLS_CERT", "/etc/brainai/tls/tls.crt"), "no TLS on the runtime's ports"),
        "a security flag the binary has (src/security/mod.rs) with a typo": (lambda d: ctr(d)["args"].append("--audit-logs=-"), "--audit-logs is a flag the binary has"),
        "model repository not at /mnt/models": (set_arg("--model-repository", "/models"), "--model-repository is /mnt/models"),
        "metrics annotation on another port": (lambda d: sr(d)["spec"]["annotations"].__setitem__("prometheus.kserve.io/port", "8080"), "prometheus.kserve.io/port"),
        "prometheus.io/port that KServe would overwrite": (lambda d: sr(d)["spec"]["annotations"].pop("serving.kserve.io/enable-prometheus-scraping"), "KServe's own prometheus.io annotation is off"),
        "readiness probe on the HTTP port as gRPC": (lambda d: ctr(d)["readinessProbe"]["grpc"].__setitem__("port", 8080), "readinessProbe is a native gRPC probe"),
        "readiness probe on a health name the server does not register": (lambda d: ctr(d)["readinessProbe"]["grpc"].__setitem__("service", "inference.GRPCInferenceServic"), "readinessProbe is a native gRPC probe"),
        "grace period shorter than the drain": (lambda d: pred(d).__setitem__("terminationGracePeriodSeconds", 30), "terminationGracePeriodSeconds"),
        "writable root filesystem": (lambda d: ctr(d)["securityContext"].__setitem__("readOnlyRootFilesystem", False), "read-only root"),
        "threads above the CPU limit": (lambda d: next(e for e in ctr(d)["env"] if e["name"] == "BRAINAI_INTRA_OP_THREADS").__setitem__("value", "8"), "within the CPU limit"),
        "image not the CPU overlay's tag": (lambda d: ctr(d).__setitem__("image", "registry.example.org/brainai/brainai-serve:0.1.1-cpu"), "is the CPU overlay's"),
        "protocol the runtime does not declare": (lambda d: sr(d)["spec"].__setitem__("protocolVersions", ["v1", "v2"]), "protocolVersions"),
        "InferenceService on another runtime": (lambda d: pred(d)["model"].__setitem__("runtime", "kserve-tritonserver"), "runtime kserve-tritonserver is the ServingRuntime"),
        "InferenceService with a model format the runtime lacks": (lambda d: pred(d)["model"]["modelFormat"].__setitem__("name", "pytorch"), "modelFormat"),
        "InferenceService without protocolVersion (KServe assumes v1)": (lambda d: pred(d)["model"].pop("protocolVersion"), "protocolVersion None"),
        "InferenceService in Knative mode": (lambda d: isvc(d)["metadata"]["annotations"].__setitem__("serving.kserve.io/deploymentMode", "Knative"), "deploymentMode is Standard"),
        "storageUri on another PVC": (lambda d: pred(d)["model"].__setitem__("storageUri", "pvc://models/"), "names the model repository's PVC"),
    }
    repository = {  # breaks of deploy/kserve/model-repository
        "typo'd PVC field (Kubernetes schema)": (lambda d: by_kind(d, "PersistentVolumeClaim")[0]["spec"].__setitem__("accessMode", ["ReadWriteMany"]), "invalid against Kubernetes"),
        "model.toml differing from models/": (lambda d: cm(d)["data"].__setitem__("model.toml", cm(d)["data"]["model.toml"].replace("max_batch_size = 32", "max_batch_size = 64")), "identical to models/"),
        "Job writing another directory": (lambda d: job(d)["spec"]["template"]["spec"]["containers"][0]["volumeMounts"][0].__setitem__("mountPath", "/repo"), "the Job writes models/<model>"),
        "Job as root": (lambda d: job(d)["spec"]["template"]["spec"]["securityContext"].__setitem__("runAsUser", 0), "the Job runs as the images' non-root uid"),
    }
    missed = []

    def run(what, docs_rt, docs_repo, expect):
        rep = Report(quiet=True)
        validate(docs_rt, docs_repo, crds, binary, rep)
        caught = any(expect in f for f in rep.failures)
        print(f"  {'ok  ' if caught else 'FAIL'} self-test: caught {what}" + ("" if caught else f" (failures: {rep.failures[:3]})"))
        if not caught:
            missed.append(what)

    for what, (mutate, expect) in runtime.items():
        broken = copy.deepcopy(runtime_docs)
        mutate(broken)
        run(what, broken, repo_docs, expect)
    for what, (mutate, expect) in repository.items():
        broken = copy.deepcopy(repo_docs)
        mutate(broken)
        run(what, runtime_docs, broken, expect)

    # what the schemas allow must still pass: the strictness is the API server's, not more
    allowed = {
        "any status (x-kubernetes-preserve-unknown-fields)": (
            "InferenceService", lambda o: o.__setitem__("status", {"url": "http://x", "anything": {"at": ["all"]}})),
        "an integer CPU quantity (x-kubernetes-int-or-string)": ("ServingRuntime", lambda o: o["spec"]["containers"][0]["resources"]["limits"].__setitem__("cpu", 4)),
        "a port without a protocol (list-map key default TCP)": ("ServingRuntime", lambda o: o["spec"]["containers"][0]["ports"][2].pop("protocol")),
        "one port number for TCP and UDP (distinct list-map keys)": (
            "ServingRuntime", lambda o: o["spec"]["containers"][0]["ports"].append({"name": "metrics-udp", "containerPort": 9090, "protocol": "UDP"})),
    }
    for what, (kind, mutate) in allowed.items():
        obj = copy.deepcopy(by_kind(runtime_docs, kind)[0])
        mutate(obj)
        errors = crds[kind].errors(obj)
        print(f"  {'ok  ' if not errors else 'FAIL'} self-test: the CRD schema accepts {what}" + (f" ({errors[:3]})" if errors else ""))
        if errors:
            missed.append(what)
    return 1 if missed else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runtime", required=True, help="kustomize build deploy/kserve")
    ap.add_argument("--repository", required=True, help="kustomize build deploy/kserve/model-repository")
    ap.add_argument("--self-test", action="store_true")
    a = ap.parse_args()
    docs = {}
    for key, path in (("runtime", a.runtime), ("repository", a.repository)):
        with open(path, encoding="utf-8") as f:
            docs[key] = [d for d in yaml.safe_load_all(f) if d]
        print(f"{key}: {len(docs[key])} objects from {os.path.relpath(path, ROOT)}")
    crds = load_crds()
    binary = Binary()
    rep = Report()
    rep.ok({"ServingRuntime", "InferenceService"} <= set(crds), f"{CRD_DIR}: the ServingRuntime and InferenceService CRDs ({sorted(crds)})")
    rep.ok(len(binary.flags) >= 20 and "--model-repository" in binary.flags, f"src/config.rs: {len(binary.flags)} `brainai serve` flags read")
    rep.ok("--tls-cert" in binary.flags and binary.flags.get("--health-addr") == "BRAINAI_HEALTH_ADDR",
           "src/security/mod.rs: the security flags read too (--tls-cert, --health-addr ...)")
    validate(docs["runtime"], docs["repository"], crds, binary, rep)
    rc = 1 if rep.failures else 0
    if a.self_test:
        print("self-test: broken copies must fail")
        rc |= self_test(docs["runtime"], docs["repository"], crds, binary)
    if rep.failures:
        print(f"{len(rep.failures)} check(s) failed:")
        for f in rep.failures:
            print(f"  - {f}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
