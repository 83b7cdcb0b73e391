"""Rendering of the chart's reach and scale options: KEDA ScaledObjects per pool (on the
pool's own queues, never scaling to zero without an always-awake consumer of the control
queue), the gateway's HPA, the gRPC Ingress and GRPCRoute, image digests, the Redis TLS
files.  helm only (no cluster)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import crd_schemas  # noqa: E402
import deploy_tools  # noqa: E402

CHART = Path(__file__).resolve().parents[2] / "helm" / "rise"
DEFAULT_CI = CHART / "ci" / "default-values.yaml"
DIGEST = "sha256:" + "ab" * 32


@pytest.fixture(scope="module")
def helm():
    found = deploy_tools.find_helm()
    if found is None:
        pytest.skip("no helm (make deploy-tools)")
    return found


def helm_template(helm, *sets: str, check: bool = True) -> subprocess.CompletedProcess:
    args = [str(helm), "template", "rise", str(CHART), "--namespace", "rise", "-f",
            str(DEFAULT_CI)]
    for s in sets:
        args += ["--set", s]
    out = subprocess.run(args, capture_output=True, text=True, timeout=120)
    if check and out.returncode:
        pytest.fail(out.stderr)
    return out


def docs_of(helm, *sets: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(helm_template(helm, *sets).stdout) if d]


def one(docs, kind, name):
    (d,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return d


def test_keda_scales_each_pool_on_its_own_queues(helm):
    import jsonschema

    docs = docs_of(helm, "workers.autoscaling.enabled=true",
                   "workers.pools.cpu.model=/models/small", "workers.pools.cpu.gpus=0",
                   "workers.pools.cpu.autoscaling.minReplicas=0",
                   "workers.pools.cpu.autoscaling.maxReplicas=2")
    for d in docs:
        if crd_schemas.schema_of(d):
            jsonschema.validate(d, crd_schemas.schema_of(d))
    so = one(docs, "ScaledObject", "rise-worker-default")
    assert so["spec"]["scaleTargetRef"]["name"] == "rise-worker-default"
    assert (so["spec"]["minReplicaCount"], so["spec"]["maxReplicaCount"]) == (1, 4)
    lists = {t["name"]: t["metadata"] for t in so["spec"]["triggers"]}
    assert lists["shards"]["listName"] == "rise.default"  # the pool's queue in the values
    assert lists["queries"]["listName"] == "rise.queries.default"
    assert lists["shards"]["address"] == "rise-redis.rise.svc.cluster.local:6379"
    assert all(t["authenticationRef"]["name"] == "rise-worker-default"
               for t in so["spec"]["triggers"])
    auth = one(docs, "TriggerAuthentication", "rise-worker-default")
    assert auth["spec"]["secretTargetRef"] == [
        {"parameter": "password", "name": "rise-redis-auth", "key": "redis-password"}]
    down = so["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    assert down["policies"] == [{"type": "Pods", "value": 1, "periodSeconds": 60}]
    # KEDA's operator may reach the bundled Redis through its NetworkPolicy
    keda = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "keda"}}}
    rules = one(docs, "NetworkPolicy", "rise-redis")["spec"]["ingress"]
    assert any(keda in r["from"] for r in rules)
    rules = one(docs_of(helm), "NetworkPolicy", "rise-redis")["spec"]["ingress"]
    assert not any(keda in r["from"] for r in rules)
    cpu = one(docs, "ScaledObject", "rise-worker-cpu")
    assert cpu["spec"]["minReplicaCount"] == 0  # the default pool stays awake
    for name in ("rise-worker-default", "rise-worker-cpu"):
        dep = one(docs, "Deployment", name)
        assert "replicas" not in dep["spec"]  # KEDA owns the count
        # a removed pod finishes its shard: grace above the 3600 s task limit
        assert dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 3600


def test_scale_to_zero_needs_an_awake_pool(helm):
    out = helm_template(helm, "workers.autoscaling.enabled=true",
                        "workers.autoscaling.minReplicas=0", check=False)
    assert out.returncode != 0 and "no other pool always runs" in out.stderr
    # a pool with fixed replicas beside it is enough
    helm_template(helm, "workers.pools.default.autoscaling.enabled=true",
                  "workers.pools.default.autoscaling.minReplicas=0",
                  "workers.pools.cpu.model=/models/small", "workers.pools.cpu.gpus=0",
                  "workers.pools.cpu.replicas=1")
    # ... but not one at replicas 0
    out = helm_template(helm, "workers.pools.default.autoscaling.enabled=true",
                        "workers.pools.default.autoscaling.minReplicas=0",
                        "workers.pools.cpu.model=/models/small", "workers.pools.cpu.gpus=0",
                        "workers.pools.cpu.replicas=0", check=False)
    assert out.returncode != 0


def test_keda_with_an_external_redis_needs_its_address(helm):
    base = ("redis.enabled=false", "redis.externalUrl=rediss://r.example:6380/0",
            "workers.autoscaling.enabled=true")
    out = helm_template(helm, *base, check=False)
    assert out.returncode != 0 and "workers.autoscaling.redis.address" in out.stderr
    docs = docs_of(helm, *base, "workers.autoscaling.redis.address=r.example:6380",
                   "workers.autoscaling.redis.enableTLS=true",
                   "workers.autoscaling.redis.passwordSecret.name=redis-pw",
                   "redis.tls.caSecret.name=redis-ca")
    so = one(docs, "ScaledObject", "rise-worker-default")
    meta = so["spec"]["triggers"][0]["metadata"]
    assert (meta["address"], meta["enableTLS"]) == ("r.example:6380", "true")
    auth = one(docs, "TriggerAuthentication", "rise-worker-default")
    assert auth["spec"]["secretTargetRef"] == [
        {"parameter": "password", "name": "redis-pw", "key": "password"},
        {"parameter": "ca", "name": "redis-ca", "key": "ca.crt"}]


def test_gateway_hpa(helm):
    docs = docs_of(helm, "gateway.autoscaling.enabled=true", "gateway.autoscaling.maxReplicas=5")
    hpa = one(docs, "HorizontalPodAutoscaler", "rise-gateway")
    assert hpa["spec"]["maxReplicas"] == 5
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    assert "replicas" not in one(docs, "Deployment", "rise-gateway")["spec"]
    assert not [d for d in docs_of(helm) if d["kind"] in ("HorizontalPodAutoscaler",
                                                          "ScaledObject", "Ingress")]


def test_grpc_ingress_terminates_or_passes_tls_through(helm):
    docs = docs_of(helm, "ingress.enabled=true", "ingress.host=rise.example.com",
                   "ingress.tlsSecretName=rise-ingress-tls", "ingress.className=nginx")
    ing = one(docs, "Ingress", "rise-gateway")
    ann = ing["metadata"]["annotations"]
    assert ann["nginx.ingress.kubernetes.io/backend-protocol"] == "GRPC"
    assert ing["spec"]["tls"] == [{"hosts": ["rise.example.com"],
                                   "secretName": "rise-ingress-tls"}]
    backend = ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": "rise-gateway", "port": {"name": "grpc"}}
    out = helm_template(helm, "ingress.enabled=true", "ingress.host=h",
                        "ingress.tlsMode=passthrough", check=False)
    assert out.returncode != 0 and "gateway.tls.enabled" in out.stderr
    docs = docs_of(helm, "ingress.enabled=true", "ingress.host=h",
                   "ingress.tlsMode=passthrough", "gateway.tls.enabled=true",
                   "gateway.tls.secretName=gw-tls")
    ing = one(docs, "Ingress", "rise-gateway")
    ann = ing["metadata"]["annotations"]
    assert ann["nginx.ingress.kubernetes.io/backend-protocol"] == "GRPCS"
    assert ann["nginx.ingress.kubernetes.io/ssl-passthrough"] == "true"
    assert "tls" not in ing["spec"]


def test_grpc_route(helm):
    import jsonschema

    docs = docs_of(helm, "grpcRoute.enabled=true", "grpcRoute.parentRefs[0].name=gw",
                   "grpcRoute.hostnames[0]=rise.example.com")
    route = one(docs, "GRPCRoute", "rise-gateway")
    jsonschema.validate(route, crd_schemas.GRPC_ROUTE)
    assert route["spec"]["rules"][0]["backendRefs"] == [{"name": "rise-gateway",
                                                         "port": 50051}]
    out = helm_template(helm, "grpcRoute.enabled=true", check=False)
    assert out.returncode != 0 and "parentRefs" in out.stderr


def test_image_digests_pin_every_image(helm):
    docs = docs_of(helm, f"image.digest={DIGEST}", f"redis.image.digest={DIGEST}")
    images = {c["image"] for d in docs if d["kind"] in ("Deployment", "StatefulSet", "Pod")
              for c in (d["spec"]["template"]["spec"] if d["kind"] != "Pod"
                        else d["spec"])["containers"]}
    assert images == {f"rise@{DIGEST}", f"redis@{DIGEST}"}
    # a worker image of its own drops the global digest (another image), takes its own
    docs = docs_of(helm, f"image.digest={DIGEST}", "workers.image.repository=rise-cuda")
    (w,) = one(docs, "Deployment", "rise-worker-default")["spec"]["template"]["spec"][
        "containers"]
    assert w["image"] == "rise-cuda:0.1.0"
    out = helm_template(helm, "image.digest=sha256:short", check=False)
    assert out.returncode != 0


def test_redis_tls_files_from_secrets(helm):
    docs = docs_of(helm, "redis.enabled=false", "redis.externalUrl=rediss://r:6380/0",
                   "redis.tls.caSecret.name=redis-ca", "redis.tls.clientCertSecret=redis-client")
    for name in ("rise-gateway", "rise-controller", "rise-worker-default"):
        spec = one(docs, "Deployment", name)["spec"]["template"]["spec"]
        (c,) = spec["containers"]
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["RISE_REDIS_CA_FILE"] == "/etc/rise/redis-ca/ca.crt"
        assert env["RISE_REDIS_CERT_FILE"] == "/etc/rise/redis-client/tls.crt"
        assert env["RISE_REDIS_KEY_FILE"] == "/etc/rise/redis-client/tls.key"
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        assert {"/etc/rise/redis-ca", "/etc/rise/redis-client"} <= mounts
        secrets = {v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v}
        assert {"redis-ca", "redis-client"} <= secrets
