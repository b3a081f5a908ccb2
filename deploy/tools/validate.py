#!/usr/bin/env python3
"""Validates what `kustomize build` renders for each overlay, the Grafana dashboard and the
prometheus-adapter rule. Run by deploy/check.sh with the project venv (.venv) after
`pip install -r deploy/requirements.txt`:

    validate.py --crdcheck .tools/bin/crdcheck OVERLAY=RENDERED.yaml ... [--self-test]

Per overlay:
  * every core object strictly against the Kubernetes 1.30 OpenAPI schema (kubernetes-validate,
    unknown fields rejected); an object whose kind/apiVersion has no 1.30 schema fails (the CLI
    would only warn);
  * ServiceMonitor / PrometheusRule with crdcheck (the Prometheus Operator's Go types, strict);
  * every alert expression parses (promql-parser), names only metrics the README documents, with
    the suffixes their type needs (histograms: _bucket/_sum/_count), selects job="brainai-metrics"
    (the metrics Service's name, which the ServiceMonitor makes the job), and has severity,
    summary, description and a runbook anchor that exists in deploy/README.md;
  * cross-checks: queue alert threshold = 0.8 x BRAINAI_QUEUE_CAPACITY; grace period >= preStop +
    drain timeout + 5 s; liveness cannot trip during a drain; probes are native gRPC on the
    numeric gRPC port; selectors match the pod labels; the HPA's custom metric is the one the
    adapter rule serves; every BRAINAI_* variable is one the README documents (a typo would be
    ignored silently by the binary); batch size within model.toml's cap; model.toml equals
    models/brain-tumor-resnet50/model.toml; security context (non-root uid = the Dockerfile's
    USER, read-only root, no capabilities, no privilege escalation, seccomp RuntimeDefault);
    GPU request, node selector and toleration exactly in the GPU overlay.
Once: the dashboard JSON (parses, every query parses with its variables substituted, metric
names/suffixes as above) and the prometheus-adapter values (known keys, queries parse).

--self-test breaks copies of the inputs in many ways and fails unless each break is caught.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import subprocess
import sys

try:
    import tomllib  # Python >= 3.11
except ModuleNotFoundError:  # Python 3.10: only max_batch_size is needed
    tomllib = None

import promql_parser
import yaml
from kubernetes_validate import utils as kv

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
K8S_VERSION = "1.30"
CRD_GROUP = "monitoring.coreos.com"
HEALTH_SERVICE = "brainai.v1.TumorClassifier"
METRICS_JOB = "brainai-metrics"
DASHBOARD = "deploy/grafana/brainai.json"
ADAPTER = "deploy/k8s/prometheus-adapter/values.yaml"
DEPLOY_README = "deploy/README.md"
MODEL_TOML = "models/brain-tumor-resnet50/model.toml"
SEVERITIES = {"critical", "warning", "info"}
NON_BRAINAI_METRICS = {  # kube-state-metrics and Prometheus series the rules and dashboard use
    "up", "kube_pod_status_ready", "kube_pod_status_phase", "kube_deployment_status_replicas_available",
    "kube_deployment_spec_replicas", "kube_pod_container_status_restarts_total",
}


def read(rel: str) -> str:
    with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
        return f.read()


class Report:
    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.failures: list[str] = []

    def ok(self, cond, what: str) -> bool:
        if not self.quiet:
            print(f"  {'ok  ' if cond else 'FAIL'} {what}")
        if not cond:
            self.failures.append(what)
        return bool(cond)


# ---- shared context: README facts, Dockerfile user, adapter rule -------------------------------


class Context:
    def __init__(self, crdcheck: str):
        self.crdcheck = crdcheck
        readme = read("README.md")
        self.metric_types = {
            m.group(1): m.group(2)
            for m in re.finditer(r"^\| `(brainai_\w+)` \| (\w+)", readme, re.M)
        }
        self.documented_env = set(re.findall(r"`((?:BRAINAI|ORT)_[A-Z0-9_]+)`", readme))
        self.deploy_readme = read(DEPLOY_README) if os.path.exists(os.path.join(ROOT, DEPLOY_README)) else ""
        self.anchors = {
            re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#{1,6} (.+)$", self.deploy_readme, re.M)
        }
        users = re.findall(r"^USER (\d+)(?::(\d+))?", read("deploy/docker/Dockerfile"), re.M)
        self.image_uids = {int(u) for u, _ in users}
        self.model_toml = read(MODEL_TOML)
        self.adapter = yaml.safe_load(read(ADAPTER))
        self.dashboard_text = read(DASHBOARD)


# ---- PromQL ------------------------------------------------------------------------------------


def selectors(expr):
    """(metric name, {label: (op, value)}) of every vector selector in a parsed expression."""
    found = []

    def visit(node):
        if isinstance(node, promql_parser.VectorSelector):
            labels = {}
            ops = {"MatchOp.Equal": "=", "MatchOp.NotEqual": "!=", "MatchOp.Re": "=~", "MatchOp.NotRe": "!~"}
            for m in node.matchers.matchers:
                labels[m.name] = (ops.get(str(m.op), str(m.op)), m.value)
            found.append((node.name, labels))
        return True

    promql_parser.walk(expr, visit)
    return found


def check_promql(rep: Report, where: str, text: str, ctx: Context, namespace: str | None) -> None:
    """Parses `text`; checks metric names, suffixes, the job matcher and ksm namespaces."""
    try:
        expr = promql_parser.parse(text)
    except Exception as e:  # the parser raises ValueError with the position
        rep.ok(False, f"{where}: PromQL does not parse: {e}")
        return
    problems = []
    for name, labels in selectors(expr):
        if name is None:
            problems.append("a selector without a metric name")
            continue
        if name.startswith("brainai_"):
            family, suffix = name, ""
            for sfx in ("_bucket", "_sum", "_count"):
                if name.endswith(sfx) and name[: -len(sfx)] in ctx.metric_types:
                    family, suffix = name[: -len(sfx)], sfx
            kind = ctx.metric_types.get(family)
            if kind is None:
                problems.append(f"{name} is not a metric in the README's table")
            elif kind == "histogram" and not suffix:
                problems.append(f"{name} is a histogram: select {name}_bucket, _sum or _count")
            elif kind != "histogram" and suffix:
                problems.append(f"{name}: {family} is a {kind}, it has no {suffix}")
            job = labels.get("job")
            if job != ("=", METRICS_JOB):
                problems.append(f"{name} without job=\"{METRICS_JOB}\"")
        elif name not in NON_BRAINAI_METRICS:
            problems.append(f"{name} is not a metric this project knows")
        elif name == "up":
            if labels.get("job") != ("=", METRICS_JOB):
                problems.append(f"up without job=\"{METRICS_JOB}\"")
        elif namespace is not None and labels.get("namespace") != ("=", namespace):
            problems.append(f"{name} must select namespace=\"{namespace}\" (the overlay's namespace)")
    rep.ok(not problems, f"{where}: PromQL parses; metrics and selectors consistent" + (f": {problems}" if problems else ""))


# ---- per-overlay checks --------------------------------------------------------------------------


def by_kind(docs, kind):
    return [d for d in docs if d.get("kind") == kind]


def one(rep, docs, kind, overlay):
    objs = by_kind(docs, kind)
    rep.ok(len(objs) == 1, f"{overlay}: exactly one {kind} ({len(objs)})")
    return objs[0] if objs else {}


def matches(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def port_of(addr: str) -> int | None:
    m = re.search(r":(\d+)$", addr or "")
    return int(m.group(1)) if m else None


def validate_overlay(overlay: str, docs: list[dict], ctx: Context, rep: Report) -> None:
    namespaces = {d["metadata"].get("namespace") for d in docs if d.get("kind") != "Namespace"}
    rep.ok(len(namespaces) == 1 and None not in namespaces, f"{overlay}: every object in one namespace {sorted(map(str, namespaces))}")
    namespace = next(iter(namespaces)) if len(namespaces) == 1 else None

    # 1. Kubernetes schemas, strict
    for d in docs:
        kn = f"{d.get('kind')}/{d.get('metadata', {}).get('name')}"
        if d.get("apiVersion", "").split("/")[0] == CRD_GROUP:
            continue
        try:
            kv.validate(d, K8S_VERSION, strict=True)
            rep.ok(True, f"{overlay}: {kn} valid against Kubernetes {K8S_VERSION} (strict)")
        except kv.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            rep.ok(False, f"{overlay}: {kn} invalid against Kubernetes {K8S_VERSION}: {path}: {e.message}")
        except kv.SchemaNotFoundError as e:
            rep.ok(False, f"{overlay}: {kn}: {e.message}")

    # 2. Prometheus Operator objects, strict against the operator's Go types
    crd_docs = [d for d in docs if d.get("apiVersion", "").split("/")[0] == CRD_GROUP]
    proc = subprocess.run([ctx.crdcheck, "-"], input=yaml.safe_dump_all(crd_docs), capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        line = line.strip()
        if line.startswith("FAIL"):
            rep.ok(False, f"{overlay}: crdcheck: {line[4:].strip()}")
    rep.ok(proc.returncode == 0 and len(crd_docs) == 2,
           f"{overlay}: ServiceMonitor and PrometheusRule match the Prometheus Operator API (crdcheck, strict)"
           + (f": {proc.stderr.strip()}" if proc.stderr.strip() else ""))

    dep = one(rep, docs, "Deployment", overlay)
    hpa = one(rep, docs, "HorizontalPodAutoscaler", overlay)
    pdb = one(rep, docs, "PodDisruptionBudget", overlay)
    netpol = one(rep, docs, "NetworkPolicy", overlay)
    sm = one(rep, docs, "ServiceMonitor", overlay)
    rule = one(rep, docs, "PrometheusRule", overlay)
    services = {s["metadata"]["name"]: s for s in by_kind(docs, "Service")}
    cms = {c["metadata"]["name"]: c for c in by_kind(docs, "ConfigMap")}
    if not dep:
        return
    pod = dep["spec"]["template"]["spec"]
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    containers = {c["name"]: c for c in pod.get("containers", [])}
    inits = {c["name"]: c for c in pod.get("initContainers", [])}
    main = containers.get("brainai", {})
    rep.ok(bool(main), f"{overlay}: the Deployment has a container named brainai")

    # env ConfigMap
    env_refs = [e["configMapRef"]["name"] for e in main.get("envFrom", []) if "configMapRef" in e]
    env = {}
    for name in env_refs:
        env.update(cms.get(name, {}).get("data", {}))
    rep.ok(bool(env_refs) and all(n in cms for n in env_refs), f"{overlay}: envFrom ConfigMaps exist ({env_refs})")
    unknown = sorted(k for k in env if k.startswith(("BRAINAI_", "ORT_")) and k not in ctx.documented_env)
    rep.ok(not unknown, f"{overlay}: every BRAINAI_* variable is documented in README (typos would be ignored) {unknown or ''}")
    for e in main.get("env", []):
        rep.ok(not e["name"].startswith("BRAINAI_") or e["name"] in ctx.documented_env, f"{overlay}: env {e['name']} is documented")

    def env_int(key, default=None):
        try:
            return int(env.get(key, default))
        except (TypeError, ValueError):
            rep.ok(False, f"{overlay}: {key}={env.get(key)!r} is not an integer")
            return None

    capacity = env_int("BRAINAI_QUEUE_CAPACITY", 256)
    drain = env_int("BRAINAI_DRAIN_TIMEOUT_S", 30)
    batch = env_int("BRAINAI_MAX_BATCH_SIZE", 8)
    threads = env_int("BRAINAI_INTRA_OP_THREADS", 0)
    grpc_port = port_of(env.get("BRAINAI_GRPC_ADDR", "0.0.0.0:50051"))
    metrics_port = port_of(env.get("BRAINAI_METRICS_ADDR", "0.0.0.0:9090"))
    ports = {p["name"]: p["containerPort"] for p in main.get("ports", [])}
    rep.ok(ports.get("grpc") == grpc_port and ports.get("metrics") == metrics_port,
           f"{overlay}: container ports grpc={ports.get('grpc')} metrics={ports.get('metrics')} match BRAINAI_GRPC_ADDR / BRAINAI_METRICS_ADDR")

    # model: toml, dir, init container
    model_cm = [v["configMap"]["name"] for v in pod.get("volumes", []) if "configMap" in v]
    toml_text = next((cms[n]["data"].get("model.toml") for n in model_cm if n in cms and "model.toml" in cms[n].get("data", {})), None)
    rep.ok(toml_text == ctx.model_toml, f"{overlay}: ConfigMap model.toml is identical to {MODEL_TOML}")
    if not toml_text:
        cap = 0
    elif tomllib is not None:
        cap = tomllib.loads(toml_text)["model"]["max_batch_size"]
    else:
        cap = int(re.search(r"^max_batch_size\s*=\s*(\d+)", toml_text, re.M).group(1))
    rep.ok(batch is not None and 1 <= batch <= cap, f"{overlay}: BRAINAI_MAX_BATCH_SIZE={batch} within model.toml max_batch_size={cap}")
    model_dir = env.get("BRAINAI_MODEL_DIR", "")
    init = inits.get("model", {})
    init_script = " ".join(init.get("command", []))
    rep.ok(bool(init) and f'dst="{model_dir}"' in init_script,
           f"{overlay}: the model init container writes BRAINAI_MODEL_DIR ({model_dir})")
    mounts = {m["name"]: m for m in main.get("volumeMounts", [])}
    rep.ok(model_dir.startswith(mounts.get("models", {}).get("mountPath", "\0") + "/") and mounts["models"].get("readOnly") is True,
           f"{overlay}: the server mounts the model volume read-only at the parent of BRAINAI_MODEL_DIR")
    rep.ok(init.get("envFrom") == main.get("envFrom"), f"{overlay}: the init container reads the same BRAINAI_MODEL_VERSION as the server")
    rep.ok(threads is not None and 1 <= threads <= float(str(main["resources"]["limits"].get("cpu", "0")).rstrip("m") or 0),
           f"{overlay}: BRAINAI_INTRA_OP_THREADS={threads} set and within the CPU limit (ORT ignores the pod's CPU quota)")

    # probes, lifecycle, grace period
    for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = main.get(probe_name, {})
        g = probe.get("grpc", {})
        want_services = {HEALTH_SERVICE} if probe_name != "livenessProbe" else {"", HEALTH_SERVICE}
        rep.ok(isinstance(g.get("port"), int) and g.get("port") == grpc_port and g.get("service", "") in want_services,
               f"{overlay}: {probe_name} is a native gRPC probe on port {grpc_port} ({g})")
    sp = main.get("startupProbe", {})
    startup_s = sp.get("periodSeconds", 10) * sp.get("failureThreshold", 3)
    rep.ok(startup_s >= 120, f"{overlay}: startup probe allows {startup_s} s for model load and warm-up")
    pre = main.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds")
    rep.ok(isinstance(pre, int) and pre >= 1, f"{overlay}: preStop sleeps ({pre} s) before SIGTERM")
    grace = pod.get("terminationGracePeriodSeconds", 30)
    rep.ok(pre is not None and drain is not None and grace >= pre + drain + 5,
           f"{overlay}: terminationGracePeriodSeconds {grace} >= preStop {pre} + BRAINAI_DRAIN_TIMEOUT_S {drain} + 5")
    lp = main.get("livenessProbe", {})
    live_s = lp.get("periodSeconds", 10) * lp.get("failureThreshold", 3)
    rep.ok(pre is not None and drain is not None and live_s > pre + drain,
           f"{overlay}: liveness needs {live_s} s of failures, more than preStop + drain ({(pre or 0) + (drain or 0)} s)")
    rep.ok(pod.get("enableServiceLinks") is False, f"{overlay}: enableServiceLinks is false (no injected BRAINAI_* service variables)")
    rep.ok("replicas" not in dep["spec"], f"{overlay}: the Deployment leaves replicas to the HPA")
    rs = dep["spec"].get("strategy", {}).get("rollingUpdate", {})
    rep.ok(rs.get("maxUnavailable") in (0, "0", "0%"), f"{overlay}: rolling update keeps every pod until its replacement is Ready")

    # security
    psc = pod.get("securityContext", {})
    rep.ok(psc.get("runAsNonRoot") is True and psc.get("seccompProfile", {}).get("type") == "RuntimeDefault",
           f"{overlay}: pod runAsNonRoot and seccomp RuntimeDefault")
    rep.ok(psc.get("runAsUser") in ctx.image_uids and psc.get("runAsUser", 0) != 0,
           f"{overlay}: runAsUser {psc.get('runAsUser')} is the images' USER {sorted(ctx.image_uids)}")
    rep.ok(not pod.get("hostNetwork") and not pod.get("hostPID") and not any("hostPath" in v for v in pod.get("volumes", [])),
           f"{overlay}: no host namespaces or hostPath volumes")
    for c in list(containers.values()) + list(inits.values()):
        sc = c.get("securityContext", {})
        caps = sc.get("capabilities", {})
        rep.ok(sc.get("allowPrivilegeEscalation") is False and sc.get("readOnlyRootFilesystem") is True
               and "ALL" in caps.get("drop", []) and not caps.get("add") and not sc.get("privileged"),
               f"{overlay}: container {c['name']}: read-only root, no privilege escalation, all capabilities dropped")
        res = c.get("resources", {})
        rep.ok({"cpu", "memory"} <= set(res.get("requests", {})) and "memory" in res.get("limits", {}),
               f"{overlay}: container {c['name']} has CPU/memory requests and a memory limit")

    # GPU or not
    gpu = main.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
    device = env.get("BRAINAI_DEVICE", "cpu")
    if "gpu" in overlay:
        rep.ok(str(gpu) == "1" and device.startswith("cuda"), f"{overlay}: one nvidia.com/gpu and BRAINAI_DEVICE=cuda ({gpu}, {device})")
        rep.ok(bool(pod.get("nodeSelector")) and any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", [])),
               f"{overlay}: GPU node selector and nvidia.com/gpu toleration")
        rep.ok(":gpu" in main.get("image", "") or "-gpu" in main.get("image", ""), f"{overlay}: the GPU image ({main.get('image')})")
    else:
        rep.ok(gpu is None and device == "cpu", f"{overlay}: no GPU requested and BRAINAI_DEVICE=cpu ({gpu}, {device})")
        rep.ok("gpu" not in main.get("image", ""), f"{overlay}: the CPU image ({main.get('image')})")

    # services, selectors, monitoring
    grpc_svc = services.get("brainai-grpc", {})
    met_svc = services.get(METRICS_JOB, {})
    rep.ok(grpc_svc.get("spec", {}).get("clusterIP") == "None", f"{overlay}: brainai-grpc is headless")
    rep.ok(met_svc.get("spec", {}).get("type", "ClusterIP") == "ClusterIP" and met_svc.get("spec", {}).get("clusterIP") != "None",
           f"{overlay}: {METRICS_JOB} is a ClusterIP Service")
    for svc in (grpc_svc, met_svc):
        sp_ = svc.get("spec", {})
        rep.ok(matches(sp_.get("selector", {}), pod_labels), f"{overlay}: Service {svc.get('metadata', {}).get('name')} selects the pods")
        for p in sp_.get("ports", []):
            rep.ok(p.get("targetPort") in ports, f"{overlay}: Service port {p.get('name')} targets container port {p.get('targetPort')}")
    rep.ok(matches(dep["spec"]["selector"]["matchLabels"], pod_labels), f"{overlay}: Deployment selector matches its pod labels")
    rep.ok(matches(pdb.get("spec", {}).get("selector", {}).get("matchLabels", {}), pod_labels), f"{overlay}: PodDisruptionBudget selects the pods")
    rep.ok(matches(netpol.get("spec", {}).get("podSelector", {}).get("matchLabels", {}), pod_labels), f"{overlay}: NetworkPolicy selects the pods")
    ingress_ports = sorted(p["port"] for r in netpol.get("spec", {}).get("ingress", []) for p in r.get("ports", []))
    rep.ok(ingress_ports == sorted([grpc_port, metrics_port]), f"{overlay}: NetworkPolicy admits exactly the gRPC and metrics ports {ingress_ports}")
    sel = sm.get("spec", {}).get("selector", {}).get("matchLabels", {})
    rep.ok(matches(sel, met_svc.get("metadata", {}).get("labels", {})) and not matches(sel, grpc_svc.get("metadata", {}).get("labels", {})),
           f"{overlay}: ServiceMonitor selects {METRICS_JOB} only (so job=\"{METRICS_JOB}\")")
    sm_ports = [e.get("port") for e in sm.get("spec", {}).get("endpoints", [])]
    rep.ok(sm_ports and all(p in {x["name"] for x in met_svc.get("spec", {}).get("ports", [])} for p in sm_ports) and "jobLabel" not in sm.get("spec", {}),
           f"{overlay}: ServiceMonitor scrapes port {sm_ports} of {METRICS_JOB}")

    # HPA
    hs = hpa.get("spec", {})
    rep.ok(hs.get("scaleTargetRef", {}).get("name") == dep["metadata"]["name"], f"{overlay}: HPA scales the Deployment")
    pods_metrics = [m["pods"]["metric"]["name"] for m in hs.get("metrics", []) if m.get("type") == "Pods"]
    cpu_metrics = [m for m in hs.get("metrics", []) if m.get("type") == "Resource" and m["resource"]["name"] == "cpu"]
    served = {r.get("name", {}).get("as") for r in ctx.adapter.get("rules", {}).get("custom", [])}
    rep.ok(pods_metrics == ["brainai_queue_depth"] and set(pods_metrics) <= served,
           f"{overlay}: HPA scales on {pods_metrics}, served by the prometheus-adapter rule {sorted(map(str, served))}")
    rep.ok(len(cpu_metrics) == 1, f"{overlay}: HPA has CPU as a fallback metric")
    target = next((m["pods"]["target"].get("averageValue") for m in hs.get("metrics", []) if m.get("type") == "Pods"), None)
    try:
        target_v = float(str(target))
    except ValueError:
        target_v = -1
    rep.ok(capacity is not None and 0 < target_v < 0.8 * capacity, f"{overlay}: HPA queue target {target} below the queue alert (0.8 x {capacity})")
    rep.ok(hs.get("minReplicas", 1) >= 2, f"{overlay}: HPA keeps at least 2 pods (PDB maxUnavailable 1 then leaves one serving)")

    # alerts
    alerts = [r for g in rule.get("spec", {}).get("groups", []) for r in g.get("rules", []) if "alert" in r]
    rep.ok(len(alerts) >= 7, f"{overlay}: {len(alerts)} alerts")
    for r in alerts:
        name = r["alert"]
        check_promql(rep, f"{overlay}: alert {name}", r["expr"], ctx, namespace)
        ann, labels = r.get("annotations", {}), r.get("labels", {})
        rep.ok(labels.get("severity") in SEVERITIES and {"summary", "description", "runbook"} <= set(ann),
               f"{overlay}: alert {name} has severity, summary, description, runbook")
        anchor = ann.get("runbook", "").partition("#")[2]
        rep.ok(ann.get("runbook", "").startswith(DEPLOY_README + "#") and anchor == name.lower() and anchor in ctx.anchors,
               f"{overlay}: alert {name}: runbook {ann.get('runbook')} is a heading of {DEPLOY_README}")
    names = {r["alert"] for r in alerts}
    required = {"BrainAILatencyP99High", "BrainAIErrorRatioHigh", "BrainAIQueueNearCapacity", "BrainAIDeadlineDrops",
                "BrainAILowBatchOccupancyUnderLoad", "BrainAIInstanceNotReady", "BrainAIPodRestarting"}
    rep.ok(required <= names, f"{overlay}: the required alerts exist {sorted(required - names) or ''}")
    q = next((r["expr"] for r in alerts if r["alert"] == "BrainAIQueueNearCapacity"), "")
    m = re.search(r">\s*0\.8\s*\*\s*(\d+)", q)
    rep.ok(bool(m) and int(m.group(1)) == capacity,
           f"{overlay}: queue alert threshold 0.8 x {m.group(1) if m else '?'} uses BRAINAI_QUEUE_CAPACITY={capacity}")
    # runbook entries that no alert uses are stale
    runbook_section = ctx.deploy_readme.partition("## Runbook")[2]
    documented = set(re.findall(r"^### (BrainAI\w+)", runbook_section, re.M))
    rep.ok(documented == names, f"{overlay}: runbook entries = alerts {sorted(documented ^ names) or ''}")


# ---- dashboard and adapter -----------------------------------------------------------------------


def grafana_vars(expr: str) -> str:
    subs = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h", "${datasource}": "x",
            "$namespace": "brainai", "$pod": ".*"}
    for k, v in subs.items():
        expr = expr.replace(k, v)
    return expr


def validate_dashboard(ctx: Context, rep: Report, text: str | None = None) -> None:
    text = ctx.dashboard_text if text is None else text
    try:
        dash = json.loads(text)
    except json.JSONDecodeError as e:
        rep.ok(False, f"{DASHBOARD}: JSON does not parse: {e}")
        return
    rep.ok(True, f"{DASHBOARD}: JSON parses")
    rep.ok(dash.get("uid") and dash.get("title") and isinstance(dash.get("panels"), list) and dash.get("schemaVersion"),
           f"{DASHBOARD}: has uid, title, schemaVersion and panels")
    panels = dash.get("panels", [])
    ids = [p.get("id") for p in panels]
    rep.ok(len(ids) == len(set(ids)) and all("gridPos" in p for p in panels), f"{DASHBOARD}: {len(panels)} panels with unique ids and positions")
    variables = {v["name"] for v in dash.get("templating", {}).get("list", [])}
    rep.ok({"datasource", "namespace", "pod"} <= variables, f"{DASHBOARD}: variables datasource, namespace, pod")
    n = 0
    for p in panels:
        for t in p.get("targets", []):
            n += 1
            check_promql(rep, f"{DASHBOARD}: panel {p.get('title')!r} {t.get('refId')}", grafana_vars(t.get("expr", "")), ctx, "brainai")
            rep.ok(t.get("datasource", p.get("datasource", {})).get("uid") == "${datasource}", f"{DASHBOARD}: panel {p.get('title')!r} uses the datasource variable")
    for v in dash.get("templating", {}).get("list", []):
        q = v.get("query")
        if isinstance(q, dict) and q.get("query", "").startswith("label_values("):
            inner = re.match(r"label_values\((.*),\s*\w+\)$", q["query"])
            if rep.ok(bool(inner), f"{DASHBOARD}: variable {v['name']} is label_values(selector, label)"):
                check_promql(rep, f"{DASHBOARD}: variable {v['name']}", grafana_vars(inner.group(1)), ctx, "brainai")
    titles = " ".join(p.get("title", "").lower() for p in panels)
    for topic in ("calls/s", "images/s", "latency", "queue", "preprocess", "inference", "batch size", "occupancy", "status code", "dropped"):
        rep.ok(topic in titles, f"{DASHBOARD}: a panel about {topic}")
    rep.ok(n >= 10, f"{DASHBOARD}: {n} queries")


def validate_adapter(ctx: Context, rep: Report, values=None) -> None:
    values = ctx.adapter if values is None else values
    allowed_top = {"rules"}
    rep.ok(isinstance(values, dict) and set(values) <= allowed_top, f"{ADAPTER}: only `rules` ({sorted(values) if isinstance(values, dict) else values})")
    rules = values.get("rules", {}) if isinstance(values, dict) else {}
    rep.ok(set(rules) <= {"default", "custom", "external", "resource"}, f"{ADAPTER}: rules.* keys known to the chart ({sorted(rules)})")
    custom = rules.get("custom", [])
    rep.ok(len(custom) >= 1, f"{ADAPTER}: {len(custom)} custom rule(s)")
    for i, r in enumerate(custom):
        where = f"{ADAPTER}: rules.custom[{i}]"
        rep.ok(set(r) <= {"seriesQuery", "seriesFilters", "resources", "name", "metricsQuery"}, f"{where}: known keys ({sorted(r)})")
        rep.ok(set(r.get("resources", {})) <= {"overrides", "template"} and all(set(v) == {"resource"} for v in r.get("resources", {}).get("overrides", {}).values()),
               f"{where}: resources.overrides map labels to resources")
        rep.ok(set(r.get("name", {})) <= {"matches", "as"}, f"{where}: name has matches/as")
        ov = r.get("resources", {}).get("overrides", {})
        rep.ok({"namespace", "pod"} <= set(ov), f"{where}: maps namespace and pod (a per-pod metric for the HPA)")
        series = r.get("seriesQuery", "")
        check_promql(rep, f"{where}.seriesQuery", series.replace('namespace!=""', f'job="{METRICS_JOB}", namespace!=""') if "job=" not in series else series, ctx, None)
        name = re.match(r"\w+", series).group(0) if re.match(r"\w+", series) else ""
        mq = r.get("metricsQuery", "")
        mq = mq.replace("<<.Series>>", name).replace("<<.LabelMatchers>>", f'job="{METRICS_JOB}", namespace="brainai", pod=~"brainai-.*"').replace("<<.GroupBy>>", "pod")
        check_promql(rep, f"{where}.metricsQuery", mq, ctx, None)
        rep.ok(re.fullmatch(r.get("name", {}).get("matches", "^$"), name) is not None and r.get("name", {}).get("as") == name,
               f"{where}: serves {name} under its own name")


# ---- self-test ------------------------------------------------------------------------------------


def self_test(overlays: dict[str, list[dict]], ctx: Context) -> int:
    name, docs = next(iter(overlays.items()))

    def dep(d):
        return by_kind(d, "Deployment")[0]

    def main_c(d):
        return dep(d)["spec"]["template"]["spec"]["containers"][0]

    def env_cm(d):
        return next(c for c in by_kind(d, "ConfigMap") if "BRAINAI_QUEUE_CAPACITY" in c.get("data", {}))

    def rules(d):
        return by_kind(d, "PrometheusRule")[0]["spec"]["groups"][0]["rules"]

    def set_(fn):
        def apply(d):
            fn(d)
        return apply

    mutations = {
        "typo'd container field (strict schema)": (lambda d: main_c(d).__setitem__("imagePullPolicyy", "Always"), "invalid against Kubernetes"),
        "string where an integer belongs": (lambda d: main_c(d)["ports"][0].__setitem__("containerPort", "50051"), "invalid against Kubernetes"),
        "removed API version autoscaling/v2beta2": (lambda d: by_kind(d, "HorizontalPodAutoscaler")[0].__setitem__("apiVersion", "autoscaling/v2beta2"), "Couldn't find schema"),
        "typo'd ServiceMonitor field (crdcheck)": (lambda d: by_kind(d, "ServiceMonitor")[0]["spec"]["endpoints"][0].__setitem__("intervall", "15s"), "crdcheck"),
        "typo'd PrometheusRule field (crdcheck)": (lambda d: rules(d)[0].__setitem__("fro", "5m"), "crdcheck"),
        "PromQL syntax error": (lambda d: rules(d)[0].__setitem__("expr", "rate(brainai_requests_total{job=\"brainai-metrics\"}[5m]"), "does not parse"),
        "renamed metric in an alert": (lambda d: rules(d)[3].__setitem__("expr", rules(d)[3]["expr"].replace("brainai_queue_depth", "brainai_queue_length")), "not a metric"),
        "histogram selected without _bucket": (lambda d: rules(d)[0].__setitem__("expr", rules(d)[0]["expr"].replace("_seconds_bucket", "_seconds")), "is a histogram"),
        "alert without the job matcher": (lambda d: rules(d)[5].__setitem__("expr", rules(d)[5]["expr"].replace('job="brainai-metrics", ', "")), "without job"),
        "queue capacity changed without the alert": (lambda d: env_cm(d)["data"].__setitem__("BRAINAI_QUEUE_CAPACITY", "512"), "queue alert threshold"),
        "typo'd BRAINAI_ variable": (lambda d: env_cm(d)["data"].__setitem__("BRAINAI_QUEUE_CAPACTY", "256"), "documented in README"),
        "grace period shorter than the drain": (lambda d: dep(d)["spec"]["template"]["spec"].__setitem__("terminationGracePeriodSeconds", 30), "terminationGracePeriodSeconds"),
        "writable root filesystem": (lambda d: main_c(d)["securityContext"].__setitem__("readOnlyRootFilesystem", False), "read-only root"),
        "probe on a named port": (lambda d: main_c(d)["readinessProbe"]["grpc"].__setitem__("port", "grpc"), "native gRPC probe"),
        "alert without a runbook entry": (lambda d: rules(d)[1].__setitem__("alert", "BrainAIErrorsEverywhere"), "runbook"),
        "Service selecting other pods": (lambda d: by_kind(d, "Service")[0]["spec"]["selector"].__setitem__("app.kubernetes.io/name", "brainaii"), "selects the pods"),
        "HPA on a metric the adapter does not serve": (lambda d: by_kind(d, "HorizontalPodAutoscaler")[0]["spec"]["metrics"][0]["pods"]["metric"].__setitem__("name", "brainai_queue_len"), "prometheus-adapter"),
    }
    missed = []
    for what, (mutate, expect) in mutations.items():
        broken = copy.deepcopy(docs)
        mutate(broken)
        rep = Report(quiet=True)
        validate_overlay(name, broken, ctx, rep)
        caught = any(expect in f for f in rep.failures)
        print(f"  {'ok  ' if caught else 'FAIL'} self-test: caught {what}" + ("" if caught else f" (failures: {rep.failures[:3]})"))
        if not caught:
            missed.append(what)
    # dashboard and adapter
    dash = json.loads(ctx.dashboard_text)
    dash["panels"][1]["targets"][0]["expr"] = "sum(rate(brainai_requests_total{job=\"brainai-metrics\"}[5m])"
    rep = Report(quiet=True)
    validate_dashboard(ctx, rep, json.dumps(dash))
    caught = any("does not parse" in f for f in rep.failures)
    print(f"  {'ok  ' if caught else 'FAIL'} self-test: caught a dashboard query that does not parse")
    missed += [] if caught else ["dashboard"]
    bad = copy.deepcopy(ctx.adapter)
    bad["rules"]["custom"][0]["metricQuery"] = bad["rules"]["custom"][0].pop("metricsQuery")
    rep = Report(quiet=True)
    validate_adapter(ctx, rep, bad)
    caught = any("known keys" in f for f in rep.failures)
    print(f"  {'ok  ' if caught else 'FAIL'} self-test: caught a typo'd prometheus-adapter key")
    missed += [] if caught else ["adapter"]
    return 1 if missed else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--crdcheck", required=True, help="path of the crdcheck binary")
    ap.add_argument("--self-test", action="store_true")
    ap.add_argument("rendered", nargs="+", help="OVERLAY=FILE: kustomize build output of an overlay")
    a = ap.parse_args()
    ctx = Context(a.crdcheck)
    rep = Report()
    rep.ok(len(ctx.metric_types) >= 10, f"README.md documents {len(ctx.metric_types)} brainai_* metrics with their types")
    overlays = {}
    for item in a.rendered:
        name, _, path = item.partition("=")
        with open(path, encoding="utf-8") as f:
            overlays[name] = [d for d in yaml.safe_load_all(f) if d]
        print(f"overlay {name}: {len(overlays[name])} objects from {os.path.relpath(path, ROOT)}")
        validate_overlay(name, overlays[name], ctx, rep)
    print("dashboard and prometheus-adapter rule")
    validate_dashboard(ctx, rep)
    validate_adapter(ctx, rep)
    rc = 1 if rep.failures else 0
    if a.self_test:
        print("self-test: broken copies must fail")
        rc |= self_test(overlays, ctx)
    if rep.failures:
        print(f"{len(rep.failures)} check(s) failed:")
        for f in rep.failures:
            print(f"  - {f}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
