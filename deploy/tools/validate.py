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
  * labels (README's metric table): label matchers, `by`/`on` clauses and `$labels.x` in
    annotations use only labels the expression has there; enumerated values (rpc, priority,
    reason, listener, gRPC code names; in regex matchers too, when the regex is an alternation of
    values such as `Classify|v2\\.infer`; per metric: brainai_dropped_total and
    brainai_connections_closed_total have different reasons) are ones the service exports; an
    alert on a metric with a `model` label keeps it and names it in an annotation;
    brainai_model_info is read as `== 1` (unloaded versions stay exported at 0);
  * cross-checks: queue alert thresholds = 0.8 x BRAINAI_QUEUE_CAPACITY (priority="routine") and
    0.8 x BRAINAI_STAT_QUEUE_CAPACITY (priority="stat"), and no per-model capacity override that
    those thresholds cannot follow ([batching] in model.toml, BRAINAI_MODEL_OVERRIDES); grace
    period >= preStop + drain timeout + 1 s (the server closes what is left of its connections
    1 s after the drain, then exits) + 4 s of slack; liveness cannot trip during the drain and
    that last second; probes are
    native gRPC on the numeric port of the plaintext health-only listener (BRAINAI_HEALTH_ADDR;
    the gRPC port only when it has no TLS); selectors match the pod labels; the HPA's custom metric
    is the one the adapter rule serves; every BRAINAI_* variable is one the README documents (a
    typo would be ignored silently by the binary); the listeners: BRAINAI_GRPC_ADDR,
    BRAINAI_HTTP_ADDR, BRAINAI_METRICS_ADDR (or the binary's defaults) and BRAINAI_HEALTH_ADDR
    (when set) are exactly the container ports grpc, http, metrics and health, on distinct ports;
    the first three are the port and target of the Services brainai-grpc (headless), brainai-http
    and brainai-metrics (ClusterIP; appProtocol https on the TLS ports, else kubernetes.io/h2c for
    gRPC and http; the ServiceMonitor selects only brainai-metrics) and exactly the ports the
    NetworkPolicy admits from namespaces and pods (every rule names its ports and peers); the
    health port has no Service and is admitted, if at all, from ipBlock peers (the nodes) only;
    README's `listener` values (grpc, rest, http, health) are the pod's listeners; security: TLS
    (BRAINAI_TLS_CERT/KEY), the callers file (BRAINAI_AUTH_CALLERS) and the audit trail are on in
    every overlay; each credential file (and BRAINAI_TLS_CLIENT_CA when set) is a key of a Secret
    volume mounted read-only as a whole directory (no subPath: renewals reach the pod), with a
    mode readable by the pod's fsGroup and by nobody else; the cert-manager Certificate
    (deploy/k8s/cert-manager/certificate.yaml, not rendered: only known Certificate fields) writes
    that Secret in the overlay's namespace, names every Service in front of a TLS port, and renews
    before the certificate-expiry alert fires; the callers Secret template
    (deploy/k8s/examples/callers-secret.yaml) is the Secret and key the pod mounts, its
    callers.toml has the server's fields and scopes, and none of its tokens could be accepted; batch size within model.toml's cap;
    model.toml equals models/brain-tumor-resnet50/model.toml; security context (non-root uid =
    the Dockerfile's USER, read-only root, no capabilities, no privilege escalation, seccomp
    RuntimeDefault); GPU request, node selector and toleration exactly in the GPU overlay; the
    kube-state-metrics selectors of the alerts follow the workload (a `pod=~` regex matches the
    names its pods get; kube_deployment_* / kube_statefulset_* name it); no egress unless the pod
    opens connections (the DICOM node's deliveries).
  * the DICOM node (an overlay with BRAINAI_DICOM_ADDR, deploy/k8s/overlays/dicom-node): a
    StatefulSet (no HPA, >= 2 replicas, podManagementPolicy Parallel, claims retained on scale-down
    and deletion, a headless governing Service); BRAINAI_DICOM_SPOOL_DIR and BRAINAI_DICOM_OUTBOX_DIR
    (distinct) on volumeClaimTemplates mounted writable as a whole, which hold the spool and outbox
    caps; BRAINAI_DICOM_ADDR = container port `dicom` = port and target of the Service brainai-dicom
    (appProtocol dicom-tls/dicom, sessionAffinity ClientIP, externalTrafficPolicy Local when exposed,
    loadBalancerSourceRanges = the allowed CIDRs); the NetworkPolicy admits the DICOM port from
    ipBlock peers only, exactly the CIDRs of BRAINAI_DICOM_ALLOW (AE@CIDR rules, none empty or /0),
    and egress only to BRAINAI_DICOM_DESTINATION's address and port (and DNS for a host name); DICOM
    TLS and TLS deliveries on, the destination CA mounted read-only, the Certificate names
    brainai-dicom and allows client auth; the DICOM alerts exist, with the outbox cap threshold =
    0.8 x BRAINAI_DICOM_OUTBOX_MAX_MIB, the outbox age threshold >= 2 x BRAINAI_DICOM_RETRY_MAX_S,
    the spool threshold a share of brainai_dicom_spool_capacity_bytes.
Across overlays: every runbook entry of deploy/README.md is an alert of some overlay.
Once: the dashboard JSON (parses, every query parses with its variables substituted, metric
names/suffixes/labels as above, a `model` variable, a panel for every metric of the README's
table, every documented value of an enumerated label (a drop reason, a connection close reason,
a listener, ...) shown on some panel: kept by the query's `by` or selected by a matcher) and the
prometheus-adapter values (known keys, queries parse, the per-pod value is the sum
over the pod's series).

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
# Labels Prometheus adds to every series it scrapes through the ServiceMonitor (target labels).
TARGET_LABELS = {"job", "namespace", "pod", "instance", "service", "endpoint", "container"}
# Values of brainai_requests_total's `code` label: gRPC status code names.
GRPC_CODES = {"OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
              "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
              "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"}
# Queue capacities per priority: the env variable and the binary's default (when README's
# configuration table does not document one).
QUEUE_CAPACITY_ENV = {"routine": ("BRAINAI_QUEUE_CAPACITY", 256), "stat": ("BRAINAI_STAT_QUEUE_CAPACITY", 64)}
# After the drain (BRAINAI_DRAIN_TIMEOUT_S at most) the server stops accepting, sends every
# connection a GOAWAY and closes what is still open 1 s later, then exits.
CLOSE_AFTER_DRAIN_S = 1
# The server's listeners: container port name -> (the address variable, the binary's default when
# README's configuration table gives none, the `listener` label value of brainai_connections_*).
LISTENERS = {
    "grpc": ("BRAINAI_GRPC_ADDR", "0.0.0.0:50051", "grpc"),
    "http": ("BRAINAI_HTTP_ADDR", "0.0.0.0:8000", "rest"),
    "metrics": ("BRAINAI_METRICS_ADDR", "0.0.0.0:9090", "metrics"),
    # plaintext grpc.health.v1 only, for the kubelet's probes; off unless BRAINAI_HEALTH_ADDR is set
    "health": ("BRAINAI_HEALTH_ADDR", None, "health"),
}
# Listeners for clients (Services, NetworkPolicy from namespaces); the health port is the kubelet's.
CLIENT_LISTENERS = ("grpc", "http", "metrics")
# Listeners that speak TLS when BRAINAI_TLS_CERT is set.
TLS_LISTENERS = ("grpc", "http")
# The Services in front of them: name -> (the container port it targets, its appProtocol without
# TLS, with TLS).
SERVICES = {
    "brainai-grpc": ("grpc", "kubernetes.io/h2c", "https"),
    "brainai-http": ("http", "http", "https"),
    METRICS_JOB: ("metrics", "http", "http"),
}
# Security (src/security/mod.rs): the credential files the server reads, by variable.
TLS_FILES = ("BRAINAI_TLS_CERT", "BRAINAI_TLS_KEY", "BRAINAI_TLS_CLIENT_CA")
CALLERS_ENV = "BRAINAI_AUTH_CALLERS"
CERTIFICATE = "deploy/k8s/cert-manager/certificate.yaml"
CALLERS_TEMPLATE = "deploy/k8s/examples/callers-secret.yaml"
# The keys cert-manager writes into a Certificate's Secret.
CERT_MANAGER_KEYS = {"tls.crt", "tls.key", "ca.crt"}
# cert-manager.io/v1 Certificate spec fields (cert-manager 1.15+), to catch typos offline.
CERTIFICATE_FIELDS = {
    "secretName", "secretTemplate", "commonName", "dnsNames", "ipAddresses", "uris", "emailAddresses", "otherNames",
    "subject", "literalSubject", "duration", "renewBefore", "renewBeforePercentage", "issuerRef", "privateKey", "usages",
    "isCA", "keystores", "revisionHistoryLimit", "additionalOutputFormats", "nameConstraints", "encodeUsagesInRequest",
}
CERTIFICATE_PRIVATE_KEY_FIELDS = {"algorithm", "size", "encoding", "rotationPolicy"}
CERTIFICATE_ISSUER_FIELDS = {"name", "kind", "group"}
# callers.toml (src/security/auth.rs): fields of a [[caller]], scopes, shortest accepted token.
CALLER_FIELDS = {"name", "token", "certificate_cn", "scopes"}
SCOPES = {"infer", "read", "admin"}
MIN_TOKEN_LEN = 16
# Enumerated labels whose values are gRPC's, not the service's: the dashboard need not show each.
NOT_SHOWN_ONE_BY_ONE = {"code"}
NON_BRAINAI_METRICS = {  # kube-state-metrics and Prometheus series the rules and dashboard use
    "up", "kube_pod_status_ready", "kube_pod_status_phase", "kube_deployment_status_replicas_available",
    "kube_deployment_spec_replicas", "kube_pod_container_status_restarts_total",
    "kube_statefulset_status_replicas_ready", "kube_statefulset_replicas",
}
# The DICOM node (issue 25; deploy/k8s/overlays/dicom-node): the listener's variable and container
# port name, the Services in front of it, the settings the manifests and alerts depend on (with
# the binary's defaults, used while README's configuration table gives none), and its alerts.
DICOM_ADDR_ENV = "BRAINAI_DICOM_ADDR"
DICOM_PORT_NAME = "dicom"
DICOM_SERVICE = "brainai-dicom"
DICOM_DEFAULTS = {"BRAINAI_DICOM_SPOOL_MAX_MIB": 4096, "BRAINAI_DICOM_OUTBOX_MAX_MIB": 1024, "BRAINAI_DICOM_RETRY_MAX_S": 300}
DICOM_DIRS = ("BRAINAI_DICOM_SPOOL_DIR", "BRAINAI_DICOM_OUTBOX_DIR")
# appProtocol of the DICOM Service: IANA's service names for DICOM over TLS and plain DICOM.
DICOM_APP_PROTOCOL = {True: "dicom-tls", False: "dicom"}
DICOM_ALERTS = {"BrainAIDicomOutboxGrowing", "BrainAIDicomOutboxAging", "BrainAIDicomDeliveriesFailing", "BrainAIDicomSpoolFilling"}
# The volume holds the spool's and the outbox's caps with this much room for the filesystem's own
# reserve and the delivery ledger.
DICOM_VOLUME_SLACK = 1.1
MIB = 1048576


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
        self.metric_labels, self.label_values = metric_labels(readme)
        self.documented_env = set(re.findall(r"`((?:BRAINAI|ORT)_[A-Z0-9_]+)`", readme))
        self.env_defaults = {
            m.group(1): m.group(2)
            for m in re.finditer(r"^\| `--[\w-]+` \| `((?:BRAINAI|ORT)_\w+)` \| `([^`]*)` \|", readme, re.M)
        }
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
        # Not rendered by any kustomization: read here, checked against each overlay.
        self.certificate = load_one(CERTIFICATE)
        self.callers_template = load_one(CALLERS_TEMPLATE)


def load_one(rel: str):
    """The one YAML document of `rel`; an error string when it is missing or does not parse."""
    try:
        docs = [d for d in yaml.safe_load_all(read(rel)) if d]
    except (OSError, yaml.YAMLError) as e:
        return f"{rel}: {e}"
    return docs[0] if len(docs) == 1 and isinstance(docs[0], dict) else f"{rel}: expected one YAML document ({len(docs)})"


def metric_labels(readme: str):
    """From README's metric table: {family: labels} and {family: {label: allowed values}} for the
    labels documented with their values (`label` = `a` \\| `b`)."""
    labels, values = {}, {}
    for line in readme.splitlines():
        m = re.match(r"^\| `(brainai_\w+)` \|", line)
        if not m:
            continue
        cells = re.split(r"(?<!\\)\|", line)
        cell = re.sub(r"\([^)]*\)", "", cells[3] if len(cells) > 3 else "")  # drop (notes)
        family = m.group(1)
        labels[family], values[family] = set(), {}
        for lm in re.finditer(r"`(\w+)`(\s*=\s*`[^`]*`(?:\s*\\\|\s*`[^`]*`)*)?", cell):
            labels[family].add(lm.group(1))
            if lm.group(2):
                values[family][lm.group(1)] = set(re.findall(r"`([^`]*)`", lm.group(2)))
        if family == "brainai_requests_total" and "code" in labels[family]:
            values[family].setdefault("code", GRPC_CODES)
    # A label documented with its values on one metric and without on another means the same on
    # both (rpc of the request histogram = rpc of the counter), unless the metrics that document
    # it disagree: `reason` of brainai_dropped_total is not `reason` of
    # brainai_connections_closed_total, so a metric that lists none gets neither.
    documented: dict[str, list[frozenset]] = {}
    for fam_values in values.values():
        for label, allowed in fam_values.items():
            documented.setdefault(label, []).append(frozenset(allowed))
    for family in labels:
        for label, sets in documented.items():
            if label in labels[family] and len(set(sets)) == 1:
                values[family].setdefault(label, set(sets[0]))
    return labels, values


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


def children(node) -> list:
    """The sub-expressions of a parsed PromQL node."""
    if isinstance(node, promql_parser.BinaryExpr):
        return [node.lhs, node.rhs]
    if isinstance(node, promql_parser.AggregateExpr):
        return [node.expr] + ([node.param] if node.param is not None else [])
    if isinstance(node, promql_parser.Call):
        return list(node.args)
    if isinstance(node, (promql_parser.ParenExpr, promql_parser.UnaryExpr, promql_parser.SubqueryExpr)):
        return [node.expr]
    if isinstance(node, promql_parser.MatrixSelector):
        return [node.vector_selector]
    return []


def nodes(node):
    yield node
    for c in children(node):
        yield from nodes(c)


def family_of(name: str, ctx: "Context") -> tuple[str, str]:
    """(family, suffix) of a brainai_* series name (`x_bucket` -> (`x`, `_bucket`) for histograms)."""
    for sfx in ("_bucket", "_sum", "_count"):
        if name.endswith(sfx) and name[: -len(sfx)] in ctx.metric_types:
            return name[: -len(sfx)], sfx
    return name, ""


def regex_literals(value: str) -> list[str] | None:
    """The alternatives of a regex matcher that is only an alternation of literal values
    (`a|b`; dots escaped or not: `v2\\.infer|v1.classify`), unescaped; None for any other regex
    (`.*`, character classes, ...), whose values cannot be listed."""
    if not re.fullmatch(r"(?:\w|\\\.|\.)+(?:\|(?:\w|\\\.|\.)+)*", value):
        return None
    return [alt.replace("\\.", ".") for alt in value.split("|")]


SCALAR = "scalar"


class Labels:
    """Infers the labels each sub-expression's series carry (a set; SCALAR; None: unknown, e.g. a
    kube-state-metrics series) and collects the places where a query uses a label its input does
    not have: such a matcher selects nothing, and such a `by`/`on` silently merges or drops series."""

    def __init__(self, ctx: "Context"):
        self.ctx = ctx
        self.problems: list[str] = []
        self.info_selectors = 0  # brainai_model_info selectors ...
        self.info_filtered = 0  # ... and those compared `== 1`

    def selector(self, node):
        name = node.name
        if name == "up":
            return set(TARGET_LABELS)
        if not name or not name.startswith("brainai_"):
            return None
        family, suffix = family_of(name, self.ctx)
        if family not in self.ctx.metric_labels:
            return None  # reported by check_promql
        if family == "brainai_model_info":
            self.info_selectors += 1
        have = self.ctx.metric_labels[family] | TARGET_LABELS | ({"le"} if suffix == "_bucket" else set())
        allowed = self.ctx.label_values.get(family, {})
        for m in node.matchers.matchers:
            if m.name == "__name__":
                continue
            if m.name not in have:
                self.problems.append(f"{name} has no label {m.name} (labels: {', '.join(sorted(self.ctx.metric_labels[family]))})")
            elif m.name in allowed:
                op = str(m.op)
                if op.endswith(("Re", "NotRe")):
                    vals = regex_literals(m.value) or []
                else:
                    vals = [m.value] if m.value else []
                bad = [v for v in vals if v not in allowed[m.name]]
                if bad:
                    self.problems.append(f"{name}{{{m.name}}}: {bad} not a value of {m.name} ({' | '.join(sorted(allowed[m.name]))})")
        return have

    def need(self, labels, have, where):
        if isinstance(have, set):
            missing = [lb for lb in labels if lb not in have]
            if missing:
                self.problems.append(f"{where} ({', '.join(labels)}): {missing} not a label of its input ({', '.join(sorted(have))})")

    def of(self, node):
        P = promql_parser
        if isinstance(node, (P.NumberLiteral, P.StringLiteral)):
            return SCALAR
        if isinstance(node, P.VectorSelector):
            return self.selector(node)
        if isinstance(node, (P.MatrixSelector, P.ParenExpr, P.SubqueryExpr, P.UnaryExpr)):
            return self.of(children(node)[0])
        if isinstance(node, P.Call):
            args = [self.of(a) for a in node.args]
            fn = node.func.name
            if fn == "label_replace" and isinstance(args[0], set):
                return args[0] | {node.args[1].val}
            if fn == "histogram_quantile":
                self.need(["le"], args[1], "histogram_quantile")
                return args[1] - {"le"} if isinstance(args[1], set) else args[1]
            if fn in ("scalar", "time"):
                return SCALAR
            if fn in ("vector",):
                return set()
            if fn.startswith("absent"):
                return None
            return next((a for a in args if a is not SCALAR), SCALAR) if args else SCALAR
        if isinstance(node, P.AggregateExpr):
            inner = self.of(node.expr)
            if node.param is not None:
                self.of(node.param)
            op = str(node.op)
            mod = node.modifier
            by = list(mod.labels) if mod is not None else []
            without = mod is not None and str(mod.type).endswith("Without")
            if by and not without:
                self.need(by, inner, f"{op} by")
            if op in ("topk", "bottomk", "limitk", "limit_ratio"):
                return inner
            out = (inner - set(by) if isinstance(inner, set) else None) if without else set(by)
            if op == "count_values" and isinstance(out, set):
                out.add(node.param.val)
            return out
        if isinstance(node, P.BinaryExpr):
            lhs, rhs = self.of(node.lhs), self.of(node.rhs)
            op = str(node.op)
            if (op == "==" and rhs is SCALAR and isinstance(node.rhs, P.NumberLiteral) and node.rhs.val == 1
                    and isinstance(node.lhs, P.VectorSelector) and node.lhs.name == "brainai_model_info"):
                self.info_filtered += 1
            if lhs is SCALAR or rhs is SCALAR:
                return rhs if lhs is SCALAR else lhs
            mod = node.modifier
            matching = mod.matching if mod is not None else None
            on = matching is not None and str(matching.type).endswith("Include")
            if on:
                self.need(list(matching.labels), lhs, f"{op} on")
                self.need(list(matching.labels), rhs, f"{op} on")
            if op == "or":
                return lhs & rhs if isinstance(lhs, set) and isinstance(rhs, set) else None
            if op in ("and", "unless"):
                return lhs
            card = str(mod.card) if mod is not None else ""
            group = set(mod.group_labels or []) if mod is not None else set()
            if card.endswith("ManyToOne"):
                return lhs | group if isinstance(lhs, set) else None
            if card.endswith("OneToMany"):
                return rhs | group if isinstance(rhs, set) else None
            if on:
                return set(matching.labels)
            if matching is not None and isinstance(lhs, set):
                return lhs - set(matching.labels)
            return lhs
        return None


class Query:
    """What check_promql learnt about a query: its output labels (set, or None when unknown) and
    the brainai_* families it selects."""

    def __init__(self, labels, families):
        self.labels, self.families = labels, families


def check_promql(rep: Report, where: str, text: str, ctx: Context, namespace: str | None, info_as_set: bool = True) -> Query | None:
    """Parses `text`; checks metric names, suffixes, labels, the job matcher and ksm namespaces.
    `info_as_set`: brainai_model_info must be read as `== 1` (not in label_values() selectors)."""
    try:
        expr = promql_parser.parse(text)
    except Exception as e:  # the parser raises ValueError with the position
        rep.ok(False, f"{where}: PromQL does not parse: {e}")
        return None
    problems = []
    families = set()
    for name, labels in selectors(expr):
        if name is None:
            problems.append("a selector without a metric name")
            continue
        if name.startswith("brainai_"):
            family, suffix = family_of(name, ctx)
            kind = ctx.metric_types.get(family)
            families.add(family)
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
    inference = Labels(ctx)
    out = inference.of(expr)
    problems += inference.problems
    if info_as_set and inference.info_filtered < inference.info_selectors:
        problems.append("brainai_model_info read without `== 1` (unloaded versions stay exported with value 0)")
    rep.ok(not problems, f"{where}: PromQL parses; metrics, labels and selectors consistent" + (f": {problems}" if problems else ""))
    return Query(out if isinstance(out, set) else None, families)


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


def queue_thresholds(text: str) -> tuple[dict, list[str]]:
    """{priority: (factor, capacity)} of the comparisons `<brainai_queue_depth{priority="p"} ...> >
    factor * capacity` in a queue alert, and what does not fit that shape."""
    try:
        expr = promql_parser.parse(text)
    except Exception:
        return {}, ["does not parse"]
    found, problems = {}, []
    for node in nodes(expr):
        if not (isinstance(node, promql_parser.BinaryExpr) and str(node.op) in (">", ">=")):
            continue
        depth = [s for s in selectors(node.lhs) if s[0] == "brainai_queue_depth"]
        if not depth:
            continue
        prios = {s[1].get("priority") for s in depth}
        rhs = node.rhs
        if (len(prios) == 1 and None not in prios and next(iter(prios))[0] == "="
                and isinstance(rhs, promql_parser.BinaryExpr) and str(rhs.op) == "*"
                and isinstance(rhs.lhs, promql_parser.NumberLiteral) and isinstance(rhs.rhs, promql_parser.NumberLiteral)):
            prio = next(iter(prios))[1]
            if prio in found:
                problems.append(f"two thresholds for priority {prio}")
            found[prio] = (rhs.lhs.val, rhs.rhs.val)
        else:
            problems.append("each threshold must be `brainai_queue_depth{priority=\"<p>\"} ... > 0.8 * <capacity>`")
    return found, problems


def validate_overlay(overlay: str, docs: list[dict], ctx: Context, rep: Report) -> set:
    """Checks one rendered overlay; returns the names of its alerts."""
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

    # The workload: the base's Deployment, or a StatefulSet for the DICOM node (a volume per
    # replica for its spool and outbox). `dep` is whichever it is.
    workloads = by_kind(docs, "Deployment") + by_kind(docs, "StatefulSet")
    rep.ok(len(workloads) == 1, f"{overlay}: exactly one workload, a Deployment or a StatefulSet "
           f"({[w['kind'] + '/' + w['metadata']['name'] for w in workloads]})")
    dep = workloads[0] if workloads else {}
    kind = dep.get("kind", "Deployment")
    stateful = kind == "StatefulSet"
    if stateful:
        # Scaling a DICOM node down takes a replica away with its spool and undelivered outbox.
        hpas = by_kind(docs, "HorizontalPodAutoscaler")
        rep.ok(not hpas, f"{overlay}: no HorizontalPodAutoscaler for the StatefulSet (scaling down would strand a replica's "
               f"spool and outbox) {[h['metadata']['name'] for h in hpas] or ''}")
        hpa = {}
    else:
        hpa = one(rep, docs, "HorizontalPodAutoscaler", overlay)
    pdb = one(rep, docs, "PodDisruptionBudget", overlay)
    netpol = one(rep, docs, "NetworkPolicy", overlay)
    sm = one(rep, docs, "ServiceMonitor", overlay)
    rule = one(rep, docs, "PrometheusRule", overlay)
    services = {s["metadata"]["name"]: s for s in by_kind(docs, "Service")}
    cms = {c["metadata"]["name"]: c for c in by_kind(docs, "ConfigMap")}
    if not dep:
        return set()
    pod = dep["spec"]["template"]["spec"]
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    containers = {c["name"]: c for c in pod.get("containers", [])}
    inits = {c["name"]: c for c in pod.get("initContainers", [])}
    main = containers.get("brainai", {})
    rep.ok(bool(main), f"{overlay}: the {kind} has a container named brainai")

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
        # The binary's default: README's configuration table when it documents one, else `default`.
        default = ctx.env_defaults.get(key, default)
        try:
            return int(env.get(key, default))
        except (TypeError, ValueError):
            rep.ok(False, f"{overlay}: {key}={env.get(key, default)!r} is not an integer")
            return None

    capacities = {prio: env_int(key, default) for prio, (key, default) in QUEUE_CAPACITY_ENV.items()}
    capacity = capacities["routine"]
    drain = env_int("BRAINAI_DRAIN_TIMEOUT_S", 30)
    batch = env_int("BRAINAI_MAX_BATCH_SIZE", 8)
    threads = env_int("BRAINAI_INTRA_OP_THREADS", 0)
    # listeners: BRAINAI_*_ADDR (or the binary's default) = the container port of that name
    listen = {name: port_of(env.get(var, ctx.env_defaults.get(var, default))) for name, (var, default, _) in LISTENERS.items()}
    if env.get("BRAINAI_HEALTH_ADDR") is None:
        listen.pop("health")  # optional: off unless set
    if env.get(DICOM_ADDR_ENV) is not None:
        listen[DICOM_PORT_NAME] = port_of(env[DICOM_ADDR_ENV])  # the DICOM node's listener
    grpc_port = listen["grpc"]
    health_port = listen.get("health")
    tls_on = bool(env.get("BRAINAI_TLS_CERT"))
    ports = {p.get("name"): p.get("containerPort") for p in main.get("ports", [])}
    rep.ok(ports == listen,
           f"{overlay}: container ports {ports} are exactly the listeners {listen} of "
           + " / ".join(var for var, _, _ in LISTENERS.values()) + f" (and {DICOM_ADDR_ENV} when set)")
    rep.ok(None not in listen.values() and len(set(listen.values())) == len(listen),
           f"{overlay}: the listeners have distinct ports {listen}")
    # README's metric table must know every listener (brainai_connections_*{listener}): the
    # dashboard and the connection alert are checked against its values.
    documented_listeners = ctx.label_values.get("brainai_connections_open", {}).get("listener", set())
    wanted_listeners = {LISTENERS[n][2] for n in ports if n in LISTENERS}
    rep.ok(documented_listeners == wanted_listeners,
           f"{overlay}: README's brainai_connections_open{{listener}} values {sorted(documented_listeners)} are the pod's listeners {sorted(wanted_listeners)}")

    # model: toml, dir, init container
    model_cm = [v["configMap"]["name"] for v in pod.get("volumes", []) if "configMap" in v]
    toml_text = next((cms[n]["data"].get("model.toml") for n in model_cm if n in cms and "model.toml" in cms[n].get("data", {})), None)
    rep.ok(toml_text == ctx.model_toml, f"{overlay}: ConfigMap model.toml is identical to {MODEL_TOML}")
    if not toml_text:
        cap, batching = 0, {}
    elif tomllib is not None:
        parsed = tomllib.loads(toml_text)
        cap, batching = parsed["model"]["max_batch_size"], parsed.get("batching", {})
    else:
        sections = dict(re.findall(r"^\[(\w+)\]\s*$\n((?:^(?!\[).*$\n?)*)", toml_text, re.M))
        cap = int(re.search(r"^max_batch_size\s*=\s*(\d+)", sections.get("model", ""), re.M).group(1))
        batching = dict(re.findall(r"^(\w+)\s*=\s*(.+?)\s*$", sections.get("batching", ""), re.M))
    rep.ok(batch is not None and 1 <= batch <= cap, f"{overlay}: BRAINAI_MAX_BATCH_SIZE={batch} within model.toml max_batch_size={cap}")
    # The queue alert's thresholds follow the server-wide capacities; a per-model capacity
    # ([batching] in model.toml, BRAINAI_MODEL_OVERRIDES NAME:KEY=VALUE) would leave them wrong.
    overrides = [o.strip() for o in env.get("BRAINAI_MODEL_OVERRIDES", "").split(",") if o.strip()]
    per_model = [f"model.toml [batching] {k}" for k in batching if k in ("queue_capacity", "stat_queue_capacity")]
    per_model += [f"BRAINAI_MODEL_OVERRIDES {o}" for o in overrides
                  if o.partition(":")[2].partition("=")[0].strip() in ("queue_capacity", "stat_queue_capacity")]
    rep.ok(not per_model, f"{overlay}: no per-model queue capacity, which the queue alert's thresholds cannot follow {per_model or ''}")
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

    # probes, lifecycle, grace period. The kubelet's gRPC probe speaks plaintext only: the probes
    # go to the health-only port (the same health service), or to the gRPC port only without TLS.
    probe_port = health_port if health_port is not None else (None if tls_on else grpc_port)
    rep.ok(probe_port is not None,
           f"{overlay}: the probes have a plaintext gRPC health port (BRAINAI_HEALTH_ADDR; the gRPC port {grpc_port} speaks TLS: {tls_on})")
    for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = main.get(probe_name, {})
        g = probe.get("grpc", {})
        want_services = {HEALTH_SERVICE} if probe_name != "livenessProbe" else {"", HEALTH_SERVICE}
        rep.ok(isinstance(g.get("port"), int) and g.get("port") == probe_port and g.get("service", "") in want_services,
               f"{overlay}: {probe_name} is a native gRPC probe on the plaintext health port {probe_port} ({g})")
    sp = main.get("startupProbe", {})
    startup_s = sp.get("periodSeconds", 10) * sp.get("failureThreshold", 3)
    rep.ok(startup_s >= 120, f"{overlay}: startup probe allows {startup_s} s for model load and warm-up")
    pre = main.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds")
    rep.ok(isinstance(pre, int) and pre >= 1, f"{overlay}: preStop sleeps ({pre} s) before SIGTERM")
    grace = pod.get("terminationGracePeriodSeconds", 30)
    rep.ok(pre is not None and drain is not None and grace >= pre + drain + CLOSE_AFTER_DRAIN_S + 4,
           f"{overlay}: terminationGracePeriodSeconds {grace} >= preStop {pre} + BRAINAI_DRAIN_TIMEOUT_S {drain}"
           f" + {CLOSE_AFTER_DRAIN_S} (connections closed after the drain) + 4 (slack)")
    lp = main.get("livenessProbe", {})
    live_s = lp.get("periodSeconds", 10) * lp.get("failureThreshold", 3)
    busy_s = (pre or 0) + (drain or 0) + CLOSE_AFTER_DRAIN_S
    rep.ok(pre is not None and drain is not None and live_s > busy_s,
           f"{overlay}: liveness needs {live_s} s of failures, more than preStop + drain + {CLOSE_AFTER_DRAIN_S} s ({busy_s} s)")
    rep.ok(pod.get("enableServiceLinks") is False, f"{overlay}: enableServiceLinks is false (no injected BRAINAI_* service variables)")
    if stateful:
        us = dep["spec"].get("updateStrategy", {})
        rep.ok(us.get("type", "RollingUpdate") == "RollingUpdate" and not us.get("rollingUpdate", {}).get("partition"),
               f"{overlay}: the StatefulSet rolls every pod, one at a time ({us})")
    else:
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
    http_svc = services.get("brainai-http", {})
    met_svc = services.get(METRICS_JOB, {})
    want_services = set(SERVICES)
    if env.get(DICOM_ADDR_ENV) is not None:
        want_services.add(DICOM_SERVICE)
    if stateful:
        want_services.add(dep["spec"].get("serviceName"))
    rep.ok(sorted(services) == sorted(map(str, want_services)), f"{overlay}: the Services are {sorted(map(str, want_services))} ({sorted(services)})")
    rep.ok(grpc_svc.get("spec", {}).get("clusterIP") == "None", f"{overlay}: brainai-grpc is headless")
    for svc in (http_svc, met_svc):
        rep.ok(svc.get("spec", {}).get("type", "ClusterIP") == "ClusterIP" and svc.get("spec", {}).get("clusterIP") != "None",
               f"{overlay}: {svc.get('metadata', {}).get('name')} is a ClusterIP Service")
    by_number = {v: k for k, v in ports.items()}
    for svc_name, (port_name, plain_protocol, tls_protocol) in SERVICES.items():
        app_protocol = tls_protocol if tls_on and port_name in TLS_LISTENERS else plain_protocol
        svc = services.get(svc_name, {})
        sp_ = svc.get("spec", {})
        rep.ok(matches(sp_.get("selector", {}), pod_labels), f"{overlay}: Service {svc_name} selects the pods")
        rep.ok(len(sp_.get("ports", [])) == 1, f"{overlay}: Service {svc_name} has one port ({len(sp_.get('ports', []))})")
        for p in sp_.get("ports", []):
            target = p.get("targetPort", p.get("port"))
            target_name = target if isinstance(target, str) else by_number.get(target)
            rep.ok(target_name == port_name and p.get("port") == listen[port_name] and p.get("appProtocol") == app_protocol,
                   f"{overlay}: Service {svc_name} port {p.get('name')} {p.get('port')} targets container port {port_name} "
                   f"({target} -> {ports.get(target_name)}; {LISTENERS[port_name][0]} {listen[port_name]}) with appProtocol {app_protocol} ({p.get('appProtocol')}; TLS {'on' if tls_on else 'off'})")
    rep.ok(matches(dep["spec"]["selector"].get("matchLabels", {}), pod_labels), f"{overlay}: {kind} selector matches its pod labels")
    rep.ok(matches(pdb.get("spec", {}).get("selector", {}).get("matchLabels", {}), pod_labels), f"{overlay}: PodDisruptionBudget selects the pods")
    rep.ok(matches(netpol.get("spec", {}).get("podSelector", {}).get("matchLabels", {}), pod_labels), f"{overlay}: NetworkPolicy selects the pods")
    # A rule without `ports` admits every port, one without `from` every peer; a named port is
    # the container port of that name.
    ingress = netpol.get("spec", {}).get("ingress", [])
    for i, r in enumerate(ingress):
        rep.ok(bool(r.get("ports")) and all(p.get("protocol", "TCP") == "TCP" for p in r.get("ports", [])),
               f"{overlay}: NetworkPolicy ingress rule {i} names its (TCP) ports")
        rep.ok(bool(r.get("from")), f"{overlay}: NetworkPolicy ingress rule {i} names its peers (from)")
    def numbers(r):
        return {ports.get(p.get("port"), p.get("port")) if isinstance(p.get("port"), str) else p.get("port") for p in r.get("ports", [])}

    # Clients reach the client-facing listeners from namespaces/pods; the plaintext health port is
    # the kubelet's (from the node, not subject to NetworkPolicy in common CNIs): admitted, if at
    # all, only from ipBlock peers (the nodes' CIDR).
    from_workloads = [r for r in ingress if any("ipBlock" not in peer for peer in r.get("from", []))]
    admitted = {n for r in from_workloads for n in numbers(r)}
    client_ports = {listen[n] for n in CLIENT_LISTENERS}
    rep.ok(admitted == client_ports,
           f"{overlay}: NetworkPolicy admits exactly the listeners' ports {sorted(map(str, admitted))} = {sorted(client_ports, key=str)} "
           "(grpc, http, metrics) to namespaces and pods")
    if health_port is not None:
        rep.ok(health_port not in admitted,
               f"{overlay}: NetworkPolicy admits the plaintext health port {health_port} to no namespace or pod (ipBlock peers only)")
    unknown_ports = {n for r in ingress for n in numbers(r)} - set(listen.values())
    rep.ok(not unknown_ports, f"{overlay}: NetworkPolicy admits no port nothing listens on {sorted(map(str, unknown_ports)) or ''}")
    sel = sm.get("spec", {}).get("selector", {}).get("matchLabels", {})
    others = [n for n, svc in services.items() if n != METRICS_JOB and matches(sel, svc.get("metadata", {}).get("labels", {}))]
    rep.ok(matches(sel, met_svc.get("metadata", {}).get("labels", {})) and not others,
           f"{overlay}: ServiceMonitor selects {METRICS_JOB} only (so job=\"{METRICS_JOB}\") {others or ''}")
    sm_ports = [e.get("port") for e in sm.get("spec", {}).get("endpoints", [])]
    rep.ok(sm_ports and all(p in {x["name"] for x in met_svc.get("spec", {}).get("ports", [])} for p in sm_ports) and "jobLabel" not in sm.get("spec", {}),
           f"{overlay}: ServiceMonitor scrapes port {sm_ports} of {METRICS_JOB}")

    if not stateful:
        # HPA (a Deployment's; a StatefulSet of DICOM nodes has a fixed replica count: check_dicom)
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
        q = check_promql(rep, f"{overlay}: alert {name}", r["expr"], ctx, namespace)
        ann, labels = r.get("annotations", {}), r.get("labels", {})
        rep.ok(labels.get("severity") in SEVERITIES and {"summary", "description", "runbook"} <= set(ann),
               f"{overlay}: alert {name} has severity, summary, description, runbook")
        anchor = ann.get("runbook", "").partition("#")[2]
        rep.ok(ann.get("runbook", "").startswith(DEPLOY_README + "#") and anchor == name.lower() and anchor in ctx.anchors,
               f"{overlay}: alert {name}: runbook {ann.get('runbook')} is a heading of {DEPLOY_README}")
        if q is None:
            continue
        used = set(re.findall(r"\$labels\.(\w+)", " ".join(str(v) for v in ann.values())))
        if q.labels is not None:
            rep.ok(used <= q.labels, f"{overlay}: alert {name}: annotations name only labels the alert has {sorted(used - q.labels) or ''} (has {sorted(q.labels)})")
        per_model = sorted(f for f in q.families if {"model", "name"} & ctx.metric_labels.get(f, set()))
        if per_model:
            rep.ok((q.labels is None or "model" in q.labels) and "model" in used,
                   f"{overlay}: alert {name} on per-model metrics {per_model} keeps the model label and names it ({{{{ $labels.model }}}})")
    names = {r["alert"] for r in alerts}
    required = {"BrainAILatencyP99High", "BrainAIErrorRatioHigh", "BrainAIQueueNearCapacity", "BrainAIDeadlineDrops",
                "BrainAILowBatchOccupancyUnderLoad", "BrainAIInstanceNotReady", "BrainAIPodRestarting",
                "BrainAIModelLoadFailures", "BrainAIOverloadShedding", "BrainAIConnectionsRefused",
                "BrainAITLSCertificateExpiringSoon", "BrainAITLSReloadFailures", "BrainAIAuditWriteFailures"}
    if env.get(DICOM_ADDR_ENV) is not None:
        required |= DICOM_ALERTS
    rep.ok(required <= names, f"{overlay}: the required alerts exist {sorted(required - names) or ''}")
    q = next((r["expr"] for r in alerts if r["alert"] == "BrainAIQueueNearCapacity"), "")
    thresholds, problems = queue_thresholds(q)
    for prio, cap_ in capacities.items():
        key = QUEUE_CAPACITY_ENV[prio][0]
        got = thresholds.get(prio)
        rep.ok(got == (0.8, cap_) and not problems,
               f"{overlay}: queue alert threshold for priority=\"{prio}\" is 0.8 x {key}={cap_} "
               f"({'%g x %g' % got if got else 'none'}{'; ' + '; '.join(problems) if problems else ''})")
    # (runbook entries that no overlay's alert uses are stale: check_runbook_entries, over every overlay)
    check_workload_selectors(overlay, rep, dep, alerts)

    check_security(overlay, ctx, rep, env, pod, main, namespace, alerts)
    egress = netpol.get("spec", {}).get("egress", [])
    rep.ok("Egress" in netpol.get("spec", {}).get("policyTypes", []),
           f"{overlay}: the NetworkPolicy restricts egress (policyTypes {netpol.get('spec', {}).get('policyTypes')})")
    if env.get(DICOM_ADDR_ENV) is not None or stateful:
        check_dicom(overlay, ctx, rep, env, dep, pod, main, ports, listen, services, netpol, alerts, stateful)
    else:
        rep.ok(egress == [], f"{overlay}: no egress at all: the server opens no connection ({egress})")
    return names


def check_runbook_entries(ctx: Context, rep: Report, names: set) -> None:
    """Every `### BrainAI...` entry of the README's runbook is an alert of some overlay (stale
    entries otherwise); that every alert has its entry is checked per alert."""
    runbook_section = ctx.deploy_readme.partition("## Runbook")[2]
    documented = set(re.findall(r"^### (BrainAI\w+)", runbook_section, re.M))
    rep.ok(documented == names, f"runbook entries = the alerts of all overlays {sorted(documented ^ names) or ''}")


def workload_pod_names(workload: dict) -> list[str]:
    """Names the workload's pods get: a Deployment's <name>-<pod-template-hash>-<suffix>, a
    StatefulSet's <name>-<ordinal> (a two-digit ordinal included)."""
    name = workload.get("metadata", {}).get("name", "")
    if workload.get("kind") == "StatefulSet":
        n = workload.get("spec", {}).get("replicas", 1)
        return [f"{name}-{i}" for i in sorted({0, max(n - 1, 0), 10})]
    return [f"{name}-7d9f8b6c5d-x2k4p", f"{name}-5b8c7d6f4-9qzrt"]


def check_workload_selectors(overlay: str, rep: Report, workload: dict, alerts) -> None:
    """The kube-state-metrics selectors of the alerts follow the overlay's workload: a `pod=~`
    regex matches the names its pods get (a Deployment's regex selects no StatefulSet pod, and
    the alert would stay silent), kube_deployment_* / kube_statefulset_* name it."""
    kind, name = workload.get("kind"), workload.get("metadata", {}).get("name")
    pods = workload_pod_names(workload)
    for r in alerts:
        try:
            expr = promql_parser.parse(r.get("expr", ""))
        except Exception:
            continue  # reported by check_promql
        problems = []
        kube = [(metric, labels) for metric, labels in selectors(expr) if (metric or "").startswith("kube_")]
        if not kube:
            continue
        for metric, labels in kube:
            for prefix, want_kind, label in (("kube_deployment_", "Deployment", "deployment"), ("kube_statefulset_", "StatefulSet", "statefulset")):
                if metric.startswith(prefix) and (kind != want_kind or labels.get(label) != ("=", name)):
                    problems.append(f"{metric}{{{label}={labels.get(label, ('', ''))[1]!r}}} but the workload is {kind}/{name}")
            op, value = labels.get("pod", ("", ""))
            if op == "=~":
                missed = [p for p in pods if not re.fullmatch(value, p)]
                if missed:
                    problems.append(f"{metric}{{pod=~{value!r}}} does not match the pods {missed}")
            elif op == "=" and value not in pods:
                problems.append(f"{metric}{{pod={value!r}}} is none of the pods")
        rep.ok(not problems, f"{overlay}: alert {r.get('alert')}: kube-state-metrics selectors follow the {kind} {name} {problems or ''}")


def quantity_bytes(q) -> float | None:
    """Bytes of a Kubernetes quantity such as 8Gi, 500M, 1e9."""
    m = re.fullmatch(r"([0-9.]+(?:e[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?", str(q or ""))
    if not m:
        return None
    units = {None: 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15}
    return float(m.group(1)) * units[m.group(2)]


def constant(node) -> float | None:
    """The value of a PromQL number expression (`0.8 * 1024 * 1048576`), None for anything else."""
    P = promql_parser
    if isinstance(node, P.NumberLiteral):
        return node.val
    if isinstance(node, P.ParenExpr):
        return constant(node.expr)
    if isinstance(node, P.BinaryExpr) and str(node.op) in ("*", "/", "+", "-"):
        a, b = constant(node.lhs), constant(node.rhs)
        if a is None or b is None:
            return None
        return {"*": a * b, "/": a / b if b else None, "+": a + b, "-": a - b}[str(node.op)]
    return None


def thresholds(alerts, alert: str, metric: str) -> list[float]:
    """The constants that selections of `metric` are compared with (`... > N`) in `alert`'s rules;
    None where the other side is not a number."""
    out = []
    for r in alerts:
        if r.get("alert") != alert:
            continue
        try:
            expr = promql_parser.parse(r.get("expr", ""))
        except Exception:
            continue
        for node in nodes(expr):
            if (isinstance(node, promql_parser.BinaryExpr) and str(node.op) in (">", ">=")
                    and any(name == metric for name, _ in selectors(node.lhs))):
                out.append(constant(node.rhs))
    return out


def check_dicom(overlay: str, ctx: Context, rep: Report, env: dict, sts: dict, pod: dict, main: dict, ports: dict,
                listen: dict, services: dict, netpol: dict, alerts, stateful: bool) -> None:
    """The DICOM node (deploy/k8s/overlays/dicom-node): a StatefulSet whose replicas keep their
    spool and outbox on volumes of their own; the listener's Service (port, session affinity,
    client address kept) and NetworkPolicy (the PACS's CIDRs only, = BRAINAI_DICOM_ALLOW; egress
    to the destination only); TLS; the alerts' thresholds against the configuration."""
    import ipaddress

    where = f"{overlay}: DICOM node"
    dicom_port = listen.get(DICOM_PORT_NAME)
    rep.ok(env.get(DICOM_ADDR_ENV) is not None and dicom_port is not None,
           f"{where}: {DICOM_ADDR_ENV} is a listen address ({env.get(DICOM_ADDR_ENV)})")
    rep.ok(stateful, f"{where}: a StatefulSet (each replica's spool and outbox on a volume of its own that outlives the pod)")
    if not stateful:
        return
    spec = sts.get("spec", {})
    pod_labels = spec.get("template", {}).get("metadata", {}).get("labels", {})

    def env_num(key):
        try:
            return int(env.get(key, ctx.env_defaults.get(key, DICOM_DEFAULTS[key])))
        except (TypeError, ValueError):
            rep.ok(False, f"{where}: {key}={env.get(key)!r} is not an integer")
            return None

    # replicas, pod management, the claims' lifetime
    rep.ok(isinstance(spec.get("replicas"), int) and spec["replicas"] >= 2,
           f"{where}: at least 2 replicas behind the one AE title (replicas {spec.get('replicas')}; PDB maxUnavailable 1 leaves one receiving)")
    rep.ok(spec.get("podManagementPolicy") == "Parallel",
           f"{where}: podManagementPolicy Parallel (a replica that died comes back without waiting for the others) ({spec.get('podManagementPolicy')})")
    retention = spec.get("persistentVolumeClaimRetentionPolicy", {})
    rep.ok(all(retention.get(k, "Retain") == "Retain" for k in ("whenScaled", "whenDeleted")),
           f"{where}: the claims are retained when the StatefulSet is scaled down or deleted (undelivered results stay) ({retention})")
    governing = services.get(spec.get("serviceName"), {})
    rep.ok(governing.get("spec", {}).get("clusterIP") == "None" and matches(governing.get("spec", {}).get("selector", {}), pod_labels),
           f"{where}: serviceName {spec.get('serviceName')} is a headless Service selecting the pods")

    # spool and outbox on the replica's own volume
    claims = {c.get("metadata", {}).get("name"): c for c in spec.get("volumeClaimTemplates", [])}
    pod_volumes = {v.get("name") for v in pod.get("volumes", [])}
    mounts = main.get("volumeMounts", [])
    dirs = {}
    for var in DICOM_DIRS:
        path = env.get(var, "")
        dirs[var] = path
        mount = next((m for m in mounts if path.startswith(m.get("mountPath", "\0").rstrip("/") + "/")), None)
        rep.ok(path.startswith("/") and mount is not None and mount.get("name") in claims and mount.get("name") not in pod_volumes
               and not mount.get("readOnly") and not mount.get("subPath") and not mount.get("subPathExpr"),
               f"{where}: {var}={path} lies on a volumeClaimTemplate mounted writable as a whole "
               f"({mount.get('name') + ' at ' + mount.get('mountPath') if mount else 'no mount'}; claims {sorted(claims)})")
    spool, outbox = dirs[DICOM_DIRS[0]].rstrip("/"), dirs[DICOM_DIRS[1]].rstrip("/")
    rep.ok(spool and outbox and spool != outbox and not spool.startswith(outbox + "/") and not outbox.startswith(spool + "/"),
           f"{where}: spool and outbox are distinct directories ({spool}, {outbox})")
    spool_mib, outbox_mib = env_num("BRAINAI_DICOM_SPOOL_MAX_MIB"), env_num("BRAINAI_DICOM_OUTBOX_MAX_MIB")
    used = {m.get("name") for m in mounts if any(d.startswith(m.get("mountPath", "\0").rstrip("/") + "/") for d in dirs.values())}
    size = sum(quantity_bytes(claims[n].get("spec", {}).get("resources", {}).get("requests", {}).get("storage")) or 0 for n in used if n in claims)
    need = ((spool_mib or 0) + (outbox_mib or 0)) * MIB * DICOM_VOLUME_SLACK
    rep.ok(spool_mib is not None and outbox_mib is not None and size >= need,
           f"{where}: the volume ({size / 2**30:g} GiB) holds the spool and outbox caps ({spool_mib} + {outbox_mib} MiB) x {DICOM_VOLUME_SLACK}")
    for n in used & set(claims):
        modes = claims[n].get("spec", {}).get("accessModes", [])
        rep.ok(modes and set(modes) <= {"ReadWriteOnce", "ReadWriteOncePod"},
               f"{where}: claim {n} is one replica's (accessModes {modes})")

    # who may call: BRAINAI_DICOM_ALLOW = AE@CIDR rules
    allow = [r.strip() for r in env.get("BRAINAI_DICOM_ALLOW", "").split(";") if r.strip()]
    cidrs = set()
    bad = []
    for r in allow:
        ae, _, cidr = r.partition("@")
        try:
            net = ipaddress.ip_network(cidr, strict=True)
            cidrs.add(str(net))
            if net.prefixlen == 0:
                bad.append(r)
        except ValueError:
            bad.append(r)
    rep.ok(allow and not bad, f"{where}: BRAINAI_DICOM_ALLOW names calling AE titles with the PACS's CIDRs (AE@CIDR, none /0) "
           f"({env.get('BRAINAI_DICOM_ALLOW')!r}{'; not AE@CIDR: ' + str(bad) if bad else ''}; empty: any caller)")

    # TLS on the listener and towards the destination
    rep.ok(env_true(env.get("BRAINAI_DICOM_TLS")) and bool(env.get("BRAINAI_TLS_CERT")),
           f"{where}: DICOM TLS on (BRAINAI_DICOM_TLS={env.get('BRAINAI_DICOM_TLS')}, with BRAINAI_TLS_CERT)")
    rep.ok(env_true(env.get("BRAINAI_DICOM_DESTINATION_TLS")),
           f"{where}: results are delivered over TLS (BRAINAI_DICOM_DESTINATION_TLS={env.get('BRAINAI_DICOM_DESTINATION_TLS')})")
    ca = env.get("BRAINAI_DICOM_DESTINATION_CA")
    if ca:
        volumes = {v.get("name"): v for v in pod.get("volumes", [])}
        mount = next((m for m in mounts if ca.startswith(m.get("mountPath", "\0").rstrip("/") + "/")), None)
        vol = volumes.get(mount.get("name")) if mount else {}
        rep.ok(mount is not None and ("secret" in (vol or {}) or "configMap" in (vol or {})) and mount.get("readOnly") is True
               and not mount.get("subPath"),
               f"{where}: BRAINAI_DICOM_DESTINATION_CA={ca} is in a Secret or ConfigMap mounted read-only, no subPath")

    # the destination: AE@HOST:PORT
    dest = env.get("BRAINAI_DICOM_DESTINATION", "")
    m = re.fullmatch(r"([^@]{1,16})@(.+):(\d+)", dest)
    rep.ok(m is not None, f"{where}: BRAINAI_DICOM_DESTINATION is AE@HOST:PORT ({dest!r}; required with {DICOM_ADDR_ENV})")
    dest_host, dest_port = (m.group(2).strip("[]"), int(m.group(3))) if m else (None, None)

    # the Service the PACS sends to
    svc = services.get(DICOM_SERVICE, {})
    ss = svc.get("spec", {})
    rep.ok(matches(ss.get("selector", {}), pod_labels), f"{where}: Service {DICOM_SERVICE} selects the pods")
    sports = ss.get("ports", [])
    by_number = {v: k for k, v in ports.items()}
    protocol = DICOM_APP_PROTOCOL[env_true(env.get("BRAINAI_DICOM_TLS"))]
    ok_port = False
    if len(sports) == 1:
        p = sports[0]
        target = p.get("targetPort", p.get("port"))
        target_name = target if isinstance(target, str) else by_number.get(target)
        ok_port = target_name == DICOM_PORT_NAME and p.get("port") == dicom_port and p.get("appProtocol") == protocol
    rep.ok(ok_port, f"{where}: Service {DICOM_SERVICE} has one port, {dicom_port} ({DICOM_ADDR_ENV}), targeting container port "
           f"{DICOM_PORT_NAME} ({ports.get(DICOM_PORT_NAME)}) with appProtocol {protocol} ({sports})")
    rep.ok(ss.get("sessionAffinity") == "ClientIP",
           f"{where}: Service {DICOM_SERVICE} has sessionAffinity ClientIP (a PACS's associations, and so its studies, reach one replica) "
           f"({ss.get('sessionAffinity')})")
    external = ss.get("type", "ClusterIP") in ("LoadBalancer", "NodePort")
    rep.ok(not external or ss.get("externalTrafficPolicy") == "Local",
           f"{where}: Service {DICOM_SERVICE} ({ss.get('type', 'ClusterIP')}) keeps the PACS's address (externalTrafficPolicy Local: "
           f"the NetworkPolicy, BRAINAI_DICOM_ALLOW and the affinity need it) ({ss.get('externalTrafficPolicy')})")
    ranges = ss.get("loadBalancerSourceRanges", [])
    rep.ok(ss.get("type") != "LoadBalancer" or (ranges and {str(ipaddress.ip_network(r, strict=False)) for r in ranges} == cidrs),
           f"{where}: Service {DICOM_SERVICE}'s loadBalancerSourceRanges {ranges} are BRAINAI_DICOM_ALLOW's CIDRs {sorted(cidrs)}")
    if governing:
        gports = governing.get("spec", {}).get("ports", [])
        rep.ok(all(p.get("targetPort", p.get("port")) in (DICOM_PORT_NAME, dicom_port) for p in gports),
               f"{where}: the governing Service names no port but the DICOM one ({gports})")

    # NetworkPolicy: the DICOM port from the PACS's CIDRs (ipBlock peers) only
    ns = netpol.get("spec", {})

    def numbers(r):
        return {ports.get(p.get("port"), p.get("port")) if isinstance(p.get("port"), str) else p.get("port") for p in r.get("ports", [])}

    dicom_rules = [r for r in ns.get("ingress", []) if dicom_port in numbers(r)]
    peers = [peer for r in dicom_rules for peer in r.get("from", [])]
    rep.ok(bool(dicom_rules), f"{where}: the NetworkPolicy admits the DICOM port {dicom_port}")
    rep.ok(peers and all(set(peer) == {"ipBlock"} for peer in peers),
           f"{where}: the NetworkPolicy admits the DICOM port from ipBlock peers only (the PACS's addresses; no namespace or pod) ({peers})")
    blocks = set()
    for peer in peers:
        try:
            blocks.add(str(ipaddress.ip_network(peer.get("ipBlock", {}).get("cidr", ""), strict=False)))
        except ValueError:
            blocks.add(str(peer.get("ipBlock", {}).get("cidr")))
    rep.ok(blocks == cidrs, f"{where}: the NetworkPolicy's DICOM CIDRs {sorted(blocks)} are BRAINAI_DICOM_ALLOW's {sorted(cidrs)}")

    # egress: the destination's address and port, DNS only for a host name, nothing else
    egress = ns.get("egress", [])
    rep.ok(all(r.get("to") and r.get("ports") for r in egress), f"{where}: every egress rule names its peers and ports (no open egress)")
    try:
        dest_ip = ipaddress.ip_address(dest_host) if dest_host else None
    except ValueError:
        dest_ip = None

    def reaches(r, port, ip=None):
        if port not in numbers(r):
            return False
        if ip is None:
            return True
        for peer in r.get("to", []):
            block = peer.get("ipBlock")
            if block and ip in ipaddress.ip_network(block.get("cidr", "0.0.0.0/32"), strict=False) and not any(
                    ip in ipaddress.ip_network(e, strict=False) for e in block.get("except", [])):
                return True
        return False

    dns = dest_host is not None and dest_ip is None
    rep.ok(dest_port is not None and any(reaches(r, dest_port, dest_ip) for r in egress) and (not dns or any(reaches(r, 53) for r in egress)),
           f"{where}: the NetworkPolicy lets the node reach the destination {dest_host}:{dest_port}" + (" (and DNS)" if dns else ""))
    allowed_ports = {dest_port} | ({53} if dns else set())
    extra = sorted(str(n) for r in egress for n in numbers(r) if n not in allowed_ports)
    rep.ok(not extra, f"{where}: egress to no other port than the destination's{' and DNS' if dns else ''} {extra or ''}")

    # alerts whose thresholds follow the configuration
    retry = env_num("BRAINAI_DICOM_RETRY_MAX_S")
    ages = thresholds(alerts, "BrainAIDicomOutboxAging", "brainai_dicom_outbox_oldest_age_seconds")
    rep.ok(ages and None not in ages and retry is not None and min(ages) >= 2 * retry,
           f"{where}: BrainAIDicomOutboxAging fires after more than two delivery retries at BRAINAI_DICOM_RETRY_MAX_S={retry} ({ages})")
    caps = thresholds(alerts, "BrainAIDicomOutboxGrowing", "brainai_dicom_outbox_bytes")
    want = 0.8 * (outbox_mib or 0) * MIB
    rep.ok(caps and all(c is not None and abs(c - want) < 1 for c in caps),
           f"{where}: BrainAIDicomOutboxGrowing's outbox threshold is 0.8 x BRAINAI_DICOM_OUTBOX_MAX_MIB={outbox_mib} MiB ({caps})")
    spool_ratio = thresholds(alerts, "BrainAIDicomSpoolFilling", "brainai_dicom_spool_bytes")
    rep.ok(spool_ratio and all(c is not None and 0 < c < 1 for c in spool_ratio)
           and all("brainai_dicom_spool_capacity_bytes" in r["expr"] for r in alerts if r.get("alert") == "BrainAIDicomSpoolFilling"),
           f"{where}: BrainAIDicomSpoolFilling compares the spool with its capacity (brainai_dicom_spool_capacity_bytes) below 1 ({spool_ratio})")


def duration_s(text) -> float | None:
    """Seconds of a Go duration such as `2160h` or `1h30m` (cert-manager's duration fields)."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|m|s)", str(text or ""))
    if not parts or "".join(n + u for n, u in parts) != str(text):
        return None
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


def expiry_thresholds_s(alerts) -> list[float]:
    """The `< N * 86400` (or `< N`) thresholds of the certificate-expiry alert's rules, in seconds."""
    out = []
    for r in alerts:
        if r.get("alert") != "BrainAITLSCertificateExpiringSoon":
            continue
        m = re.search(r"<\s*([\d.]+)(?:\s*\*\s*([\d.]+))?(?:\s*\*\s*([\d.]+))?(?:\s*\*\s*([\d.]+))?\s*$", r.get("expr", "").strip())
        if m:
            v = 1.0
            for g in m.groups():
                v *= float(g) if g else 1.0
            out.append(v)
    return out


def env_true(value) -> bool:
    """A boolean flag's variable as clap reads it."""
    return str(value).strip().lower() in ("true", "1", "yes", "on")


def check_security(overlay: str, ctx: Context, rep: Report, env: dict, pod: dict, main: dict, namespace, alerts) -> None:
    """TLS, callers file and audit trail on; their files are Secret keys mounted read-only as whole
    directories; the cert-manager Certificate and the callers template agree with the pod."""
    rep.ok(bool(env.get("BRAINAI_TLS_CERT")) and bool(env.get("BRAINAI_TLS_KEY")),
           f"{overlay}: TLS on the gRPC and HTTP API ports (BRAINAI_TLS_CERT and BRAINAI_TLS_KEY set)")
    rep.ok(bool(env.get(CALLERS_ENV)), f"{overlay}: callers file set ({CALLERS_ENV}): every method but health needs a credential")
    rep.ok(bool(env.get("BRAINAI_AUDIT_LOG")), f"{overlay}: audit trail on (BRAINAI_AUDIT_LOG={env.get('BRAINAI_AUDIT_LOG')})")
    rep.ok(env.get("BRAINAI_AUTH_OPEN_REFLECTION", "false") == "false",
           f"{overlay}: reflection needs a credential (BRAINAI_AUTH_OPEN_REFLECTION unset or false)")
    volumes = {v.get("name"): v for v in pod.get("volumes", [])}
    mounts = main.get("volumeMounts", [])
    psc = pod.get("securityContext", {})

    def secret_file(var):
        """(secret name, key) of the file `var` names: a key of a Secret volume mounted read-only,
        as a whole directory, readable by the pod's fsGroup only; None (and a failure) otherwise."""
        path = env.get(var, "")
        where = f"{overlay}: {var}={path}"
        mount = next((m for m in mounts if path.startswith(m.get("mountPath", "\0").rstrip("/") + "/")), None)
        vol = volumes.get(mount.get("name")) if mount else None
        secret = (vol or {}).get("secret")
        if not rep.ok(secret is not None, f"{where} is in the Secret volume mounted at its directory"):
            return None
        rel = path[len(mount["mountPath"].rstrip("/")) + 1:]
        items = secret.get("items")
        key = next((i.get("key") for i in items if i.get("path") == rel), None) if items else rel
        rep.ok(key is not None and "/" not in rel, f"{where}: {rel} is a key of Secret {secret.get('secretName')} ({key})")
        rep.ok(mount.get("readOnly") is True and not mount.get("subPath") and not mount.get("subPathExpr"),
               f"{where}: mount {mount.get('name')} at {mount.get('mountPath')} is read-only, no subPath (renewals reach the pod)")
        mode = next((i.get("mode") for i in items or [] if i.get("path") == rel), None)
        mode = secret.get("defaultMode", 0o644) if mode is None else mode
        rep.ok(isinstance(mode, int) and mode & 0o007 == 0 and mode & 0o040 and psc.get("fsGroup") is not None
               and psc.get("fsGroup") == psc.get("runAsGroup"),
               f"{where}: mode {oct(mode) if isinstance(mode, int) else mode} readable by the pod's fsGroup {psc.get('fsGroup')} "
               f"(= runAsGroup {psc.get('runAsGroup')}), by nobody else")
        return secret.get("secretName"), key

    tls_secrets = {var: secret_file(var) for var in TLS_FILES if env.get(var)}
    callers = secret_file(CALLERS_ENV) if env.get(CALLERS_ENV) else None
    tls_names = {v[0] for v in tls_secrets.values() if v}
    rep.ok(len(tls_names) <= 1, f"{overlay}: the TLS files come from one Secret {sorted(tls_names)}")
    tls_secret = next(iter(tls_names), None)
    rep.ok(all(v[1] in CERT_MANAGER_KEYS for v in tls_secrets.values() if v),
           f"{overlay}: the TLS files are keys cert-manager writes {sorted(CERT_MANAGER_KEYS)} ({ {k: v[1] for k, v in tls_secrets.items() if v} })")

    # the cert-manager Certificate that writes that Secret
    cert = ctx.certificate
    if not rep.ok(isinstance(cert, dict), f"{CERTIFICATE}: parses as one YAML document ({cert if isinstance(cert, str) else 'ok'})"):
        return
    cs = cert.get("spec", {})
    rep.ok(cert.get("apiVersion") == "cert-manager.io/v1" and cert.get("kind") == "Certificate",
           f"{CERTIFICATE}: a cert-manager.io/v1 Certificate ({cert.get('apiVersion')} {cert.get('kind')})")
    unknown = sorted(set(cs) - CERTIFICATE_FIELDS) + sorted(f"privateKey.{k}" for k in set(cs.get("privateKey", {})) - CERTIFICATE_PRIVATE_KEY_FIELDS) \
        + sorted(f"issuerRef.{k}" for k in set(cs.get("issuerRef", {})) - CERTIFICATE_ISSUER_FIELDS)
    rep.ok(not unknown and set(cert) <= {"apiVersion", "kind", "metadata", "spec"},
           f"{CERTIFICATE}: only known Certificate fields {unknown or ''}")
    rep.ok(cs.get("issuerRef", {}).get("name") and cs.get("issuerRef", {}).get("kind") in ("Issuer", "ClusterIssuer"),
           f"{CERTIFICATE}: issuerRef names an Issuer or ClusterIssuer ({cs.get('issuerRef')})")
    rep.ok(tls_secret is not None and cs.get("secretName") == tls_secret and cert.get("metadata", {}).get("namespace") == namespace,
           f"{overlay}: the Certificate writes the Secret the pod mounts for TLS ({cs.get('secretName')} = {tls_secret}) "
           f"in the overlay's namespace ({cert.get('metadata', {}).get('namespace')} = {namespace})")
    rep.ok("server auth" in cs.get("usages", ["server auth"]) and cs.get("isCA") is not True,
           f"{CERTIFICATE}: a server certificate (usages {cs.get('usages')})")
    rep.ok(cs.get("privateKey", {}).get("rotationPolicy", "Always") == "Always",
           f"{CERTIFICATE}: a new private key on every renewal (rotationPolicy Always)")
    services = {"brainai-grpc", "brainai-http"}  # the Services in front of the TLS listeners
    if env.get(DICOM_ADDR_ENV) is not None and env_true(env.get("BRAINAI_DICOM_TLS")):
        services.add(DICOM_SERVICE)  # DICOM TLS: the same certificate
    if env.get(DICOM_ADDR_ENV) is not None and env_true(env.get("BRAINAI_DICOM_DESTINATION_TLS")):
        # Deliveries over TLS: the node presents its certificate (tls.crt) as a client certificate.
        rep.ok("client auth" in cs.get("usages", []),
               f"{overlay}: the Certificate may be used as the DICOM node's client certificate towards the destination (usages {cs.get('usages')})")
    want = {f"{svc}{sfx}" for svc in services for sfx in ("", f".{namespace}", f".{namespace}.svc", f".{namespace}.svc.cluster.local")}
    names = set(cs.get("dnsNames", []))
    rep.ok(want <= names, f"{overlay}: the Certificate's dnsNames cover every name of the TLS Services {sorted(want - names) or ''}")
    renew = duration_s(cs.get("renewBefore"))
    life = duration_s(cs.get("duration", "2160h"))
    thresholds = expiry_thresholds_s(alerts)
    rep.ok(renew is not None and life is not None and thresholds and max(thresholds) < renew < life,
           f"{overlay}: the Certificate renews {cs.get('renewBefore')} before expiry, before the expiry alert fires "
           f"({[f'{t / 86400:g} d' for t in thresholds]}) and within its duration {cs.get('duration')}")

    # the callers Secret template
    tpl = ctx.callers_template
    if not rep.ok(isinstance(tpl, dict), f"{CALLERS_TEMPLATE}: parses as one YAML document ({tpl if isinstance(tpl, str) else 'ok'})"):
        return
    try:
        kv.validate(tpl, K8S_VERSION, strict=True)
        rep.ok(True, f"{CALLERS_TEMPLATE}: valid against Kubernetes {K8S_VERSION} (strict)")
    except (kv.ValidationError, kv.SchemaNotFoundError) as e:
        rep.ok(False, f"{CALLERS_TEMPLATE}: invalid against Kubernetes {K8S_VERSION}: {e.message}")
    data = tpl.get("stringData", {})
    rep.ok(callers is not None and tpl.get("kind") == "Secret" and tpl.get("metadata", {}).get("name") == callers[0]
           and callers[1] in data and tpl.get("metadata", {}).get("namespace") == namespace and not tpl.get("data"),
           f"{overlay}: the callers template is the Secret and key the pod mounts ({tpl.get('metadata', {}).get('name')}/"
           f"{sorted(data)} = {callers}) in the overlay's namespace, as stringData")
    try:
        parsed = tomllib.loads(data.get(callers[1] if callers else "callers.toml", "")) if tomllib else None
    except tomllib.TOMLDecodeError as e:
        rep.ok(False, f"{CALLERS_TEMPLATE}: callers.toml does not parse: {e}")
        return
    if parsed is None:
        return
    entries = parsed.get("caller", [])
    problems = [f"top-level {k}" for k in parsed if k != "caller"]
    for e in entries:
        problems += [f"{e.get('name')}: field {k}" for k in set(e) - CALLER_FIELDS]
        problems += [f"{e.get('name')}: scope {sc}" for sc in e.get("scopes", []) if sc not in SCOPES]
        if not e.get("token") and not e.get("certificate_cn"):
            problems.append(f"{e.get('name')}: neither token nor certificate_cn")
    names = [e.get("name") for e in entries]
    rep.ok(entries and not problems and len(set(names)) == len(names) and all(names),
           f"{CALLERS_TEMPLATE}: callers.toml has the server's [[caller]] fields {sorted(CALLER_FIELDS)} and scopes {sorted(SCOPES)} {problems or ''}")
    usable = [e.get("name") for e in entries if len(str(e.get("token", ""))) >= MIN_TOKEN_LEN]
    rep.ok(not usable, f"{CALLERS_TEMPLATE}: no token the server would accept (placeholders shorter than {MIN_TOKEN_LEN}) {usable or ''}")


# ---- dashboard and adapter -----------------------------------------------------------------------


def shown_values(node, ctx: Context, kept=None, out=None) -> dict:
    """{(family, label): values} of the enumerated labels a query tells apart: a value shows when
    a selector picks it alone (`reason="overload"`), or when the selector's label survives every
    aggregation and vector match up to the result (`sum by (reason)`). `kept`: the labels that
    reach the result from this node (None: all)."""
    P = promql_parser
    out = {} if out is None else out
    if isinstance(node, P.VectorSelector):
        family, _ = family_of(node.name or "", ctx)
        matchers = {m.name: (str(m.op), m.value) for m in node.matchers.matchers}
        for label, allowed in ctx.label_values.get(family, {}).items():
            passes = kept is None or label in kept
            op, value = matchers.get(label, ("", ""))
            if op.endswith("NotEqual") or op.endswith("NotRe"):
                bad = set(regex_literals(value) or value.split("|")) if op.endswith("NotRe") else {value}
                vals = allowed - bad if passes else set()
            elif op.endswith("Equal") or op.endswith("Re"):
                picked = set(regex_literals(value) or value.split("|")) if op.endswith("Re") else {value}
                vals = picked & allowed if passes or len(picked) == 1 else set()
            else:
                vals = set(allowed) if passes else set()
            out.setdefault((family, label), set()).update(vals)
        return out
    if isinstance(node, P.AggregateExpr):
        mod = node.modifier
        ls = set(mod.labels) if mod is not None else set()
        if str(node.op) in ("topk", "bottomk", "limitk", "limit_ratio"):
            inner = kept
        elif mod is not None and str(mod.type).endswith("Without"):
            inner = _without(kept, ls)
        else:
            inner = _only(kept, ls)
        shown_values(node.expr, ctx, inner, out)
        return out
    if isinstance(node, P.BinaryExpr):
        mod = node.modifier
        matching = mod.matching if mod is not None else None
        op = str(node.op)
        if op in ("and", "unless"):
            shown_values(node.lhs, ctx, kept, out)
            shown_values(node.rhs, ctx, set(), out)
            return out
        if matching is not None:
            card = str(mod.card)
            if str(matching.type).endswith("Include"):  # on (...): the matched side gives these
                narrow = _only(kept, set(matching.labels) | set(mod.group_labels or []))
            else:  # ignoring (...)
                narrow = _without(kept, set(matching.labels))
            lhs_kept = kept if card.endswith("ManyToOne") else narrow
            rhs_kept = kept if card.endswith("OneToMany") else narrow
            shown_values(node.lhs, ctx, lhs_kept, out)
            shown_values(node.rhs, ctx, rhs_kept, out)
            return out
        for c in (node.lhs, node.rhs):
            shown_values(c, ctx, kept, out)
        return out
    for c in children(node):
        shown_values(c, ctx, kept, out)
    return out


class _AllBut(frozenset):
    """Every label except these (what `without (...)` keeps)."""

    def __contains__(self, label):
        return not frozenset.__contains__(self, label)


def _only(kept, labels) -> set:
    """Those of `labels` that `kept` lets through (None: all)."""
    return {lb for lb in labels if kept is None or lb in kept}


def _without(kept, labels):
    """What `kept` lets through, less `labels`."""
    if kept is None:
        return _AllBut(labels)
    if isinstance(kept, _AllBut):
        return _AllBut(frozenset(kept) | set(labels))
    return set(kept) - set(labels)


def grafana_vars(expr: str) -> str:
    subs = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h", "${datasource}": "x",
            "$namespace": "brainai", "$pod": ".*", "$model": ".*"}
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
    rep.ok({"datasource", "namespace", "model", "pod"} <= variables, f"{DASHBOARD}: variables datasource, namespace, model, pod")
    n = 0
    shown = set()
    values_shown: dict = {}
    for p in panels:
        for t in p.get("targets", []):
            n += 1
            expr = grafana_vars(t.get("expr", ""))
            q = check_promql(rep, f"{DASHBOARD}: panel {p.get('title')!r} {t.get('refId')}", expr, ctx, "brainai")
            shown |= q.families if q else set()
            if q is not None:
                shown_values(promql_parser.parse(expr), ctx, None, values_shown)
            rep.ok(t.get("datasource", p.get("datasource", {})).get("uid") == "${datasource}", f"{DASHBOARD}: panel {p.get('title')!r} uses the datasource variable")
    for v in dash.get("templating", {}).get("list", []):
        q = v.get("query")
        if isinstance(q, dict) and q.get("query", "").startswith("label_values("):
            inner = re.match(r"label_values\((.*),\s*(\w+)\)$", q["query"])
            if rep.ok(bool(inner), f"{DASHBOARD}: variable {v['name']} is label_values(selector, label)"):
                sel = check_promql(rep, f"{DASHBOARD}: variable {v['name']}", grafana_vars(inner.group(1)), ctx, "brainai", info_as_set=False)
                if sel is not None and sel.labels is not None:
                    rep.ok(inner.group(2) in sel.labels, f"{DASHBOARD}: variable {v['name']}: the selector has label {inner.group(2)} ({sorted(sel.labels)})")
    not_shown = sorted(set(ctx.metric_types) - shown)
    rep.ok(not not_shown, f"{DASHBOARD}: a panel for every metric of README's table {not_shown or ''}")
    # A value the README documents (a new drop reason, a new close reason) must be told apart on
    # some panel, not only summed into a total.
    for family in sorted(set(ctx.metric_types) - set(not_shown)):
        for label, allowed in sorted(ctx.label_values.get(family, {}).items()):
            if label in NOT_SHOWN_ONE_BY_ONE:
                continue
            missing = sorted(allowed - values_shown.get((family, label), set()))
            rep.ok(not missing, f"{DASHBOARD}: every value of {family}{{{label}}} is shown on some panel {missing or ''}")
    titles = " ".join(p.get("title", "").lower() for p in panels)
    for topic in ("calls/s", "images/s", "latency", "queue", "preprocess", "inference", "batch size", "occupancy", "status code", "dropped",
                  "versions", "load failures", "connections"):
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
        # A pod exports several series of the metric (per model, version, priority): the HPA's
        # per-pod value must add them up, not pick one (max) or average them.
        try:
            top = promql_parser.parse(mq)
        except Exception:
            top = None
        rep.ok(isinstance(top, promql_parser.AggregateExpr) and str(top.op) == "sum" and top.modifier is not None
               and not str(top.modifier.type).endswith("Without") and "pod" in top.modifier.labels,
               f"{where}.metricsQuery is `sum by (<<.GroupBy>>) (...)`: the per-pod value is the sum over the pod's series")
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

    def alert(d, name):
        return next(r for g in by_kind(d, "PrometheusRule")[0]["spec"]["groups"] for r in g["rules"] if r.get("alert") == name)

    def edit(name, old, new, key="expr"):
        def apply(d):
            r = alert(d, name)
            assert old in r[key] if key == "expr" else old in r["annotations"][key], f"self-test: {old!r} not in {name}.{key}"
            if key == "expr":
                r["expr"] = r["expr"].replace(old, new)
            else:
                r["annotations"][key] = r["annotations"][key].replace(old, new)
        return apply

    def drop_alert(name):
        def apply(d):
            for g in by_kind(d, "PrometheusRule")[0]["spec"]["groups"]:
                g["rules"] = [r for r in g["rules"] if r.get("alert") != name]
        return apply

    info_as_model = 'label_replace(brainai_model_info{job="brainai-metrics"} == 1, "model", "$1", "name", "(.*)")'

    def svc(d, name):
        return next(x for x in by_kind(d, "Service") if x["metadata"]["name"] == name)

    def netpol_rules(d):
        return by_kind(d, "NetworkPolicy")[0]["spec"]["ingress"]

    def drop_port(d, number):
        for r in netpol_rules(d):
            r["ports"] = [p for p in r["ports"] if p["port"] != number]
        by_kind(d, "NetworkPolicy")[0]["spec"]["ingress"] = [r for r in netpol_rules(d) if r["ports"]]

    def cert_edit(fn):
        def apply(c):
            c.certificate = copy.deepcopy(c.certificate)
            fn(c.certificate)
        return apply

    def callers_edit(fn):
        def apply(c):
            c.callers_template = copy.deepcopy(c.callers_template)
            data = c.callers_template["stringData"]
            data["callers.toml"] = fn(data["callers.toml"])
        return apply

    def without_listener(value):
        # a README whose metric table does not know one listener value
        def apply(c):
            c.label_values = copy.deepcopy(c.label_values)
            for fam in c.label_values.values():
                if "listener" in fam:
                    fam["listener"] = fam["listener"] - {value}
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
        "STAT queue capacity changed without the alert": (lambda d: env_cm(d)["data"].__setitem__("BRAINAI_STAT_QUEUE_CAPACITY", "128"), "queue alert threshold"),
        "queue alert with one threshold for both priorities": (lambda d: alert(d, "BrainAIQueueNearCapacity").__setitem__(
            "expr", 'max by (namespace, pod, model, version, priority) (brainai_queue_depth{job="brainai-metrics"}) > 0.8 * 256'), "queue alert threshold"),
        "per-model queue capacity the alert cannot follow": (lambda d: env_cm(d)["data"].__setitem__("BRAINAI_MODEL_OVERRIDES", "brain-tumor-resnet50:queue_capacity=512"), "per-model queue capacity"),
        "matcher on a label the metric does not have": (edit("BrainAIQueueFullRejections", 'reason="queue_full"', 'priority="stat"'), "has no label priority"),
        "label value the service never exports": (edit("BrainAIDeadlineDrops", 'reason="deadline"', 'reason="deadline_exceeded"'), "not a value of reason"),
        "typo'd gRPC code in the error ratio": (edit("BrainAIErrorRatioHigh", "INVALID_ARGUMENT|", "INVALID_ARG|"), "not a value of code"),
        "grouping by a label the metric lacks (model_info has name)": (edit("BrainAIModelVersionSkew", info_as_model, 'brainai_model_info{job="brainai-metrics"} == 1'), "not a label of its input"),
        "model versions counted with unloaded ones": (edit("BrainAIModelVersionSkew", " == 1", ""), "== 1"),
        "per-model alert aggregating the model away": (edit("BrainAIDeadlineDrops", "by (namespace, model)", "by (namespace)"), "keeps the model label"),
        "annotation naming a label the alert drops": (edit("BrainAIQueueFullRejections", "in {{ $labels.namespace }}", "on {{ $labels.pod }}", key="summary"), "annotations name only labels"),
        "no model load failure alert": (drop_alert("BrainAIModelLoadFailures"), "required alerts"),
        "no load shedding alert": (drop_alert("BrainAIOverloadShedding"), "required alerts"),
        "no refused connections alert": (drop_alert("BrainAIConnectionsRefused"), "required alerts"),
        "connection alert on a listener the service does not have": (edit(
            "BrainAIConnectionsRefused", 'brainai_connections_refused_total{job="brainai-metrics"}',
            'brainai_connections_refused_total{job="brainai-metrics", listener="http"}'), "not a value of listener"),
        "shedding alert on a connection close reason (reasons are per metric)": (
            edit("BrainAIOverloadShedding", 'reason="overload"', 'reason="idle"'), "not a value of reason"),
        "liveness that trips in the second after the drain": (
            lambda d: main_c(d)["livenessProbe"].update(periodSeconds=6, failureThreshold=6), "liveness needs"),
        # the HTTP API listener: BRAINAI_HTTP_ADDR, container port, Service, NetworkPolicy, README
        "HTTP API address moved without its container port": (
            lambda d: env_cm(d)["data"].__setitem__("BRAINAI_HTTP_ADDR", "0.0.0.0:8080"), "are exactly the listeners"),
        "container without the http port": (
            lambda d: main_c(d).__setitem__("ports", [p for p in main_c(d)["ports"] if p["name"] != "http"]), "are exactly the listeners"),
        "two listeners on one port": (
            lambda d: (env_cm(d)["data"].__setitem__("BRAINAI_HTTP_ADDR", "0.0.0.0:9090"),
                       next(p for p in main_c(d)["ports"] if p["name"] == "http").__setitem__("containerPort", 9090)), "distinct ports"),
        "no brainai-http Service": (
            lambda d: d.remove(svc(d, "brainai-http")), "the Services are"),
        "brainai-http targeting a port the container does not have": (
            lambda d: svc(d, "brainai-http")["spec"]["ports"][0].__setitem__("targetPort", "web"), "Service brainai-http port http 8000 targets container port http"),
        "brainai-http targeting the metrics port": (
            lambda d: svc(d, "brainai-http")["spec"]["ports"][0].__setitem__("targetPort", 9090), "Service brainai-http port http 8000 targets container port http"),
        "brainai-grpc with appProtocol h2c in front of a TLS port": (
            lambda d: svc(d, "brainai-grpc")["spec"]["ports"][0].__setitem__("appProtocol", "kubernetes.io/h2c"), "with appProtocol https"),
        "TLS off but the Services still say https": (
            lambda d: (env_cm(d)["data"].pop("BRAINAI_TLS_CERT"), env_cm(d)["data"].pop("BRAINAI_TLS_KEY")), "with appProtocol kubernetes.io/h2c"),
        "brainai-http headless": (
            lambda d: svc(d, "brainai-http")["spec"].__setitem__("clusterIP", "None"), "brainai-http is a ClusterIP Service"),
        "ServiceMonitor also scraping brainai-http": (
            lambda d: svc(d, "brainai-http")["metadata"]["labels"].__setitem__("brainai.io/metrics", "true"), "ServiceMonitor selects brainai-metrics only"),
        "NetworkPolicy without the HTTP API port": (lambda d: drop_port(d, 8000), "NetworkPolicy admits exactly the listeners' ports"),
        "NetworkPolicy admitting a port nothing listens on": (
            lambda d: netpol_rules(d)[1]["ports"].append({"protocol": "TCP", "port": 8080}), "NetworkPolicy admits exactly the listeners' ports"),
        "NetworkPolicy rule without ports (admits every port)": (
            lambda d: netpol_rules(d)[1].pop("ports"), "names its (TCP) ports"),
        "NetworkPolicy rule without peers (admits everyone)": (
            lambda d: netpol_rules(d)[2].pop("from"), "names its peers"),
        "README's metric table missing the rest listener": (lambda d: None, "README's brainai_connections_open{listener} values", without_listener("rest")),
        "README's metric table missing the health listener": (lambda d: None, "README's brainai_connections_open{listener} values", without_listener("health")),
        # the plaintext health-only listener and the probes
        "probes on the TLS gRPC port": (lambda d: main_c(d)["readinessProbe"]["grpc"].__setitem__("port", 50051), "native gRPC probe on the plaintext health port"),
        "TLS on without a health-only listener": (
            lambda d: (env_cm(d)["data"].pop("BRAINAI_HEALTH_ADDR"), main_c(d).__setitem__("ports", [p for p in main_c(d)["ports"] if p["name"] != "health"])),
            "the probes have a plaintext gRPC health port"),
        "health address moved without its container port": (
            lambda d: env_cm(d)["data"].__setitem__("BRAINAI_HEALTH_ADDR", "0.0.0.0:50053"), "are exactly the listeners"),
        "NetworkPolicy admitting the health port to a namespace": (
            lambda d: netpol_rules(d)[0]["ports"].append({"protocol": "TCP", "port": 50052}), "NetworkPolicy admits exactly the listeners' ports"),
        "NetworkPolicy admitting the health port to namespaces only (no client port changed)": (
            lambda d: netpol_rules(d).append({"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "pacs-integration"}}}],
                                              "ports": [{"protocol": "TCP", "port": 50052}]}), "health port 50052 to no namespace or pod"),
        # TLS, callers, audit trail and their Secrets
        "TLS off in a production overlay": (
            lambda d: (env_cm(d)["data"].pop("BRAINAI_TLS_CERT"), env_cm(d)["data"].pop("BRAINAI_TLS_KEY")), "TLS on the gRPC and HTTP API ports"),
        "no callers file": (lambda d: env_cm(d)["data"].pop("BRAINAI_AUTH_CALLERS"), "callers file set"),
        "no audit trail": (lambda d: env_cm(d)["data"].pop("BRAINAI_AUDIT_LOG"), "audit trail on"),
        "TLS key outside the Secret's mount": (
            lambda d: env_cm(d)["data"].__setitem__("BRAINAI_TLS_KEY", "/etc/brainai/certs/tls.key"), "BRAINAI_TLS_KEY=/etc/brainai/certs/tls.key is in the Secret volume"),
        "client CA that is no key cert-manager writes": (
            lambda d: env_cm(d)["data"].__setitem__("BRAINAI_TLS_CLIENT_CA", "/etc/brainai/tls/client-ca.crt"), "keys cert-manager writes"),
        "TLS Secret mounted with subPath (renewals never arrive)": (
            lambda d: next(m for m in main_c(d)["volumeMounts"] if m["name"] == "tls").__setitem__("subPath", "tls.crt"), "no subPath"),
        "TLS Secret mounted writable": (
            lambda d: next(m for m in main_c(d)["volumeMounts"] if m["name"] == "tls").pop("readOnly"), "is read-only"),
        "TLS Secret readable by every user": (
            lambda d: next(v for v in dep(d)["spec"]["template"]["spec"]["volumes"] if v["name"] == "tls")["secret"].__setitem__("defaultMode", 0o444), "by nobody else"),
        "callers file not a key of the mounted Secret": (
            lambda d: next(v for v in dep(d)["spec"]["template"]["spec"]["volumes"] if v["name"] == "callers")["secret"]["items"][0].__setitem__("path", "users.toml"),
            "is a key of Secret"),
        "Certificate writing another Secret": (lambda d: None, "the Certificate writes the Secret the pod mounts",
                                               cert_edit(lambda c: c["spec"].__setitem__("secretName", "brainai-cert"))),
        "Certificate in another namespace": (lambda d: None, "the Certificate writes the Secret the pod mounts",
                                             cert_edit(lambda c: c["metadata"].__setitem__("namespace", "default"))),
        "Certificate without a Service's DNS name": (lambda d: None, "dnsNames cover every name",
                                                     cert_edit(lambda c: c["spec"]["dnsNames"].remove("brainai-http.brainai.svc"))),
        "Certificate renewing after the expiry alert fires": (lambda d: None, "before the expiry alert fires",
                                                              cert_edit(lambda c: c["spec"].__setitem__("renewBefore", "240h"))),
        "typo'd Certificate field": (lambda d: None, "only known Certificate fields", cert_edit(lambda c: c["spec"].__setitem__("dnsName", ["x"]))),
        "Certificate that does not parse": (lambda d: None, "parses as one YAML document", lambda c: setattr(c, "certificate", f"{CERTIFICATE}: broken")),
        "callers template with a token the server would accept": (lambda d: None, "no token the server would accept",
                                                                  callers_edit(lambda t: t.replace('token = "CHANGE-ME"', 'token = "0123456789abcdef0123"', 1))),
        "callers template with an unknown scope": (lambda d: None, "and scopes", callers_edit(lambda t: t.replace('["infer", "read"]', '["infer", "write"]', 1))),
        "callers template with a typo'd field": (lambda d: None, "[[caller]] fields", callers_edit(lambda t: t.replace("scopes =", "scope =", 1))),
        "callers template for another Secret": (lambda d: None, "the callers template is the Secret and key the pod mounts",
                                                lambda c: setattr(c, "callers_template", {**c.callers_template, "metadata": {**c.callers_template["metadata"], "name": "callers"}})),
        "no certificate expiry alert": (drop_alert("BrainAITLSCertificateExpiringSoon"), "required alerts"),
        "no audit write failure alert": (drop_alert("BrainAIAuditWriteFailures"), "required alerts"),
    }
    missed = []

    def run(overlay_name, overlay_docs, cases):
        for what, (mutate, expect, *ctx_edit) in cases.items():
            broken = copy.deepcopy(overlay_docs)
            mutate(broken)
            rep = Report(quiet=True)
            broken_ctx = ctx
            if ctx_edit:
                broken_ctx = copy.copy(ctx)
                ctx_edit[0](broken_ctx)
            validate_overlay(overlay_name, broken, broken_ctx, rep)
            caught = any(expect in f for f in rep.failures)
            print(f"  {'ok  ' if caught else 'FAIL'} self-test: caught {what}" + ("" if caught else f" (failures: {rep.failures[:3]})"))
            if not caught:
                missed.append(what)

    run(name, docs, mutations)

    # the DICOM node: a StatefulSet with a volume per replica, its Service, NetworkPolicy, alerts
    dicom = next(((n, d) for n, d in overlays.items() if by_kind(d, "StatefulSet")), None)
    if dicom is None:
        print("  FAIL self-test: no DICOM node overlay (a StatefulSet) to break")
        missed.append("the DICOM node overlay")
    else:
        def sts(d):
            return by_kind(d, "StatefulSet")[0]

        def sts_main(d):
            return sts(d)["spec"]["template"]["spec"]["containers"][0]

        def dicom_mount(d):
            return next(m for m in sts_main(d)["volumeMounts"] if m["mountPath"] == "/var/lib/brainai/dicom")

        def dicom_rule(d):
            return next(r for r in netpol_rules(d) if any(p["port"] == 11112 for p in r["ports"]))

        def egress(d):
            return by_kind(d, "NetworkPolicy")[0]["spec"]["egress"]

        def set_env(key, value):
            return lambda d: env_cm(d)["data"].__setitem__(key, value)

        def to_deployment(d):
            w = sts(d)
            w["kind"] = "Deployment"
            for k in ("serviceName", "podManagementPolicy", "updateStrategy", "persistentVolumeClaimRetentionPolicy", "volumeClaimTemplates"):
                w["spec"].pop(k, None)

        hpa_doc = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "brainai", "namespace": "brainai"},
                   "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "brainai"}, "minReplicas": 2, "maxReplicas": 4}}
        deployment_pods = 'pod=~"brainai-[a-z0-9]+-[a-z0-9]+"'
        dicom_cases = {
            "a DICOM node on a Deployment (no volume per replica)": (to_deployment, "a StatefulSet (each replica's spool and outbox"),
            "spool and outbox on an emptyDir instead of the replica's claim": (
                lambda d: (sts(d)["spec"].pop("volumeClaimTemplates"), sts(d)["spec"]["template"]["spec"]["volumes"].append({"name": "dicom", "emptyDir": {}})),
                "BRAINAI_DICOM_SPOOL_DIR=/var/lib/brainai/dicom/spool lies on a volumeClaimTemplate"),
            "outbox outside the replica's volume": (set_env("BRAINAI_DICOM_OUTBOX_DIR", "/tmp/outbox"), "BRAINAI_DICOM_OUTBOX_DIR=/tmp/outbox lies on a volumeClaimTemplate"),
            "spool volume mounted read-only": (lambda d: dicom_mount(d).__setitem__("readOnly", True), "mounted writable"),
            "spool volume mounted with subPath": (lambda d: dicom_mount(d).__setitem__("subPath", "spool"), "mounted writable"),
            "spool and outbox in one directory": (set_env("BRAINAI_DICOM_OUTBOX_DIR", "/var/lib/brainai/dicom/spool"), "distinct directories"),
            "volume smaller than the spool and outbox caps": (
                lambda d: sts(d)["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"].__setitem__("storage", "4Gi"), "holds the spool and outbox caps"),
            "spool cap raised without the volume": (set_env("BRAINAI_DICOM_SPOOL_MAX_MIB", "16384"), "holds the spool and outbox caps"),
            "claims deleted when scaled down": (
                lambda d: sts(d)["spec"]["persistentVolumeClaimRetentionPolicy"].__setitem__("whenScaled", "Delete"), "claims are retained"),
            "OrderedReady pod management": (lambda d: sts(d)["spec"].__setitem__("podManagementPolicy", "OrderedReady"), "podManagementPolicy Parallel"),
            "a single replica": (lambda d: sts(d)["spec"].__setitem__("replicas", 1), "at least 2 replicas"),
            "an HPA on the StatefulSet": (lambda d: d.append(copy.deepcopy(hpa_doc)), "no HorizontalPodAutoscaler for the StatefulSet"),
            "governing Service not headless": (lambda d: svc(d, "brainai-pods")["spec"].pop("clusterIP"), "is a headless Service selecting the pods"),
            "DICOM address moved without its container port": (set_env("BRAINAI_DICOM_ADDR", "0.0.0.0:11113"), "are exactly the listeners"),
            "DICOM container port moved without the address": (
                lambda d: next(p for p in sts_main(d)["ports"] if p["name"] == "dicom").__setitem__("containerPort", 104), "are exactly the listeners"),
            "brainai-dicom targeting the gRPC port": (
                lambda d: svc(d, "brainai-dicom")["spec"]["ports"][0].__setitem__("targetPort", "grpc"), "Service brainai-dicom has one port"),
            "brainai-dicom on another port than the listener": (
                lambda d: svc(d, "brainai-dicom")["spec"]["ports"][0].__setitem__("port", 104), "Service brainai-dicom has one port"),
            "brainai-dicom saying plaintext DICOM in front of DICOM TLS": (
                lambda d: svc(d, "brainai-dicom")["spec"]["ports"][0].__setitem__("appProtocol", "dicom"), "with appProtocol dicom-tls"),
            "brainai-dicom without session affinity": (lambda d: svc(d, "brainai-dicom")["spec"].pop("sessionAffinity"), "sessionAffinity ClientIP"),
            "brainai-dicom hiding the PACS's address (SNAT)": (
                lambda d: svc(d, "brainai-dicom")["spec"].__setitem__("externalTrafficPolicy", "Cluster"), "keeps the PACS's address"),
            "load balancer open wider than the allow list": (
                lambda d: svc(d, "brainai-dicom")["spec"].__setitem__("loadBalancerSourceRanges", ["0.0.0.0/0"]), "loadBalancerSourceRanges"),
            "NetworkPolicy without the DICOM rule": (
                lambda d: by_kind(d, "NetworkPolicy")[0]["spec"].__setitem__("ingress", [r for r in netpol_rules(d) if r is not dicom_rule(d)]),
                "the NetworkPolicy admits the DICOM port 11112"),
            "NetworkPolicy admitting the DICOM port to a namespace": (
                lambda d: dicom_rule(d)["from"].append({"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "pacs-integration"}}}),
                "admits the DICOM port from ipBlock peers only"),
            "NetworkPolicy admitting the DICOM port from anywhere": (
                lambda d: dicom_rule(d)["from"][0]["ipBlock"].__setitem__("cidr", "0.0.0.0/0"), "are BRAINAI_DICOM_ALLOW's"),
            "allow list moved without the NetworkPolicy": (set_env("BRAINAI_DICOM_ALLOW", "PACS@10.30.0.0/16"), "are BRAINAI_DICOM_ALLOW's"),
            "any calling AE (no allow list)": (lambda d: env_cm(d)["data"].pop("BRAINAI_DICOM_ALLOW"), "BRAINAI_DICOM_ALLOW names calling AE titles"),
            "an allow rule without the PACS's addresses": (set_env("BRAINAI_DICOM_ALLOW", "PACS"), "BRAINAI_DICOM_ALLOW names calling AE titles"),
            "destination moved without the egress rule": (set_env("BRAINAI_DICOM_DESTINATION", "PACS@10.30.1.10:11112"), "lets the node reach the destination"),
            "destination as a host name without DNS egress": (
                set_env("BRAINAI_DICOM_DESTINATION", "PACS@pacs.hospital.example:11112"), "lets the node reach the destination"),
            "no destination": (lambda d: env_cm(d)["data"].pop("BRAINAI_DICOM_DESTINATION"), "BRAINAI_DICOM_DESTINATION is AE@HOST:PORT"),
            "open egress (a rule without peers)": (lambda d: egress(d)[0].pop("to"), "every egress rule names its peers and ports"),
            "egress to another port": (lambda d: egress(d)[0]["ports"].append({"protocol": "TCP", "port": 443}), "egress to no other port"),
            "DICOM TLS off": (set_env("BRAINAI_DICOM_TLS", "false"), "DICOM TLS on"),
            "deliveries in plaintext": (set_env("BRAINAI_DICOM_DESTINATION_TLS", "false"), "delivered over TLS"),
            "destination CA outside any mount": (
                set_env("BRAINAI_DICOM_DESTINATION_CA", "/etc/ssl/pacs-ca.crt"), "BRAINAI_DICOM_DESTINATION_CA=/etc/ssl/pacs-ca.crt is in a Secret or ConfigMap"),
            "Certificate without brainai-dicom's names": (lambda d: None, "dnsNames cover every name",
                                                         cert_edit(lambda c: c["spec"]["dnsNames"].remove("brainai-dicom.brainai.svc"))),
            "Certificate without client auth": (lambda d: None, "client certificate towards the destination",
                                               cert_edit(lambda c: c["spec"]["usages"].remove("client auth"))),
            "the Deployment's pod names in the pod alerts": (
                edit("BrainAIInstanceNotReady", 'pod=~"brainai-[0-9]+"', deployment_pods), "kube-state-metrics selectors follow the StatefulSet"),
            "the deleted Deployment's replicas in the availability alert": (
                edit("BrainAINoReadyInstances", 'kube_statefulset_status_replicas_ready{namespace="brainai", statefulset="brainai"}',
                     'kube_deployment_status_replicas_available{namespace="brainai", deployment="brainai"}'), "kube-state-metrics selectors follow the StatefulSet"),
            "no outbox aging alert": (drop_alert("BrainAIDicomOutboxAging"), "required alerts"),
            "no spool alert": (drop_alert("BrainAIDicomSpoolFilling"), "required alerts"),
            "a DICOM alert without a runbook entry": (
                lambda d: alert(d, "BrainAIDicomDeliveriesFailing").__setitem__("alert", "BrainAIDicomDeliveriesBroken"), "is a heading of"),
            "outbox aging alert within the retry backoff": (edit("BrainAIDicomOutboxAging", "> 900", "> 300"), "more than two delivery retries"),
            "retry cap raised without the aging alert": (set_env("BRAINAI_DICOM_RETRY_MAX_S", "1800"), "more than two delivery retries"),
            "outbox cap changed without its alert": (set_env("BRAINAI_DICOM_OUTBOX_MAX_MIB", "2048"), "outbox threshold is 0.8 x"),
            "spool alert on bytes alone": (
                lambda d: alert(d, "BrainAIDicomSpoolFilling").__setitem__(
                    "expr", 'max by (namespace, pod) (brainai_dicom_spool_bytes{job="brainai-metrics"}) > 3e9'), "compares the spool with its capacity"),
        }
        run(dicom[0], dicom[1], dicom_cases)

    # a runbook entry that no overlay's alert uses
    stale = copy.copy(ctx)
    stale.deploy_readme = ctx.deploy_readme + "\n### BrainAIRetiredAlert\n"
    rep_ = Report(quiet=True)
    check_runbook_entries(stale, rep_, {r["alert"] for d in overlays.values() for p in by_kind(d, "PrometheusRule")
                                        for g in p["spec"]["groups"] for r in g["rules"] if "alert" in r})
    caught = any("runbook entries = the alerts" in f for f in rep_.failures)
    print(f"  {'ok  ' if caught else 'FAIL'} self-test: caught a runbook entry no alert uses")
    if not caught:
        missed.append("a runbook entry no alert uses")
    # dashboard and adapter
    def dash_edit(fn):
        def apply():
            dash = json.loads(ctx.dashboard_text)
            fn(dash)
            rep = Report(quiet=True)
            validate_dashboard(ctx, rep, json.dumps(dash))
            return rep
        return apply

    def exprs(dash, old, new):
        for p in dash["panels"]:
            for t in p.get("targets", []):
                t["expr"] = t["expr"].replace(old, new)

    def adapter_edit(fn):
        def apply():
            bad = copy.deepcopy(ctx.adapter)
            fn(bad["rules"]["custom"][0])
            rep = Report(quiet=True)
            validate_adapter(ctx, rep, bad)
            return rep
        return apply

    model_var = lambda dash: next(v for v in dash["templating"]["list"] if v["name"] == "model")  # noqa: E731
    others = {
        "a dashboard query that does not parse": (dash_edit(lambda dash: dash["panels"][1]["targets"][0].__setitem__(
            "expr", "sum(rate(brainai_requests_total{job=\"brainai-metrics\"}[5m])")), "does not parse"),
        "a metric without a dashboard panel": (dash_edit(lambda dash: dash.__setitem__("panels", [
            p for p in dash["panels"] if "brainai_model_load_failures_total" not in json.dumps(p.get("targets", []))])), "a panel for every metric"),
        "dashboard filtering brainai_model_info by model (it has name)": (dash_edit(lambda dash: exprs(dash, 'name=~"$model"', 'model=~"$model"')), "has no label model"),
        "model variable over a metric without a model label": (dash_edit(lambda dash: model_var(dash)["query"].__setitem__(
            "query", 'label_values(brainai_model_info{job="brainai-metrics", namespace="$namespace"}, model)')), "the selector has label model"),
        "a connection metric without a dashboard panel": (dash_edit(lambda dash: dash.__setitem__("panels", [
            p for p in dash["panels"] if "brainai_connections_closed_total" not in json.dumps(p.get("targets", []))])), "a panel for every metric"),
        "a dashboard that never shows the overload drop reason": (dash_edit(lambda dash: (
            exprs(dash, 'reason=~"overload|queue_full"', 'reason="queue_full"'),
            exprs(dash, 'sum by (model, reason) (rate(brainai_dropped_total{job="brainai-metrics", namespace="$namespace", pod=~"$pod", model=~"$model"}',
                  'sum by (model, reason) (rate(brainai_dropped_total{job="brainai-metrics", namespace="$namespace", pod=~"$pod", model=~"$model", reason!="overload"}'))),
            "every value of brainai_dropped_total{reason}"),
        "drop reasons summed away on every panel": (dash_edit(lambda dash: exprs(dash, "sum by (model, reason) (rate(brainai_dropped_total", "sum by (model) (rate(brainai_dropped_total")),
                                                   "every value of brainai_dropped_total{reason}"),
        "a misspelt (dotted) rpc value in a regex matcher": (dash_edit(lambda dash: exprs(dash, "v2\\\\.infer", "v2\\\\.infr")), "not a value of rpc"),
        "latency panels that never show the Open Inference Protocol's RPCs": (dash_edit(lambda dash: exprs(
            dash, 'rpc=~"Classify|ModelInfer|v2\\\\.infer|v1\\\\.classify"', 'rpc="Classify"')), "every value of brainai_request_duration_seconds{rpc}"),
        "connection panels without the HTTP API listener": (dash_edit(lambda dash: exprs(
            dash, 'brainai_connections_open{job="brainai-metrics"', 'brainai_connections_open{listener=~"grpc|metrics", job="brainai-metrics"')),
            "every value of brainai_connections_open{listener}"),
        "a typo'd prometheus-adapter key": (adapter_edit(lambda r: r.__setitem__("metricQuery", r.pop("metricsQuery"))), "known keys"),
        "an adapter rule taking the max of a pod's queues": (adapter_edit(lambda r: r.__setitem__("metricsQuery", r["metricsQuery"].replace("sum by", "max by"))), "sum over the pod's series"),
    }
    for what, (run, expect) in others.items():
        rep = run()
        caught = any(expect in f for f in rep.failures)
        print(f"  {'ok  ' if caught else 'FAIL'} self-test: caught {what}" + ("" if caught else f" (failures: {rep.failures[:3]})"))
        if not caught:
            missed.append(what)
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
    alert_names = set()
    for item in a.rendered:
        name, _, path = item.partition("=")
        with open(path, encoding="utf-8") as f:
            overlays[name] = [d for d in yaml.safe_load_all(f) if d]
        print(f"overlay {name}: {len(overlays[name])} objects from {os.path.relpath(path, ROOT)}")
        alert_names |= validate_overlay(name, overlays[name], ctx, rep)
    print("runbook")
    check_runbook_entries(ctx, rep, alert_names)
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
