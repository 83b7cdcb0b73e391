"""The CPU image as deployed: its gateway, scorer, controller and a Celery worker, each in
a container of the image (``buildah run --isolation chroot``, uid 10001, tini, the chart's
volumes), against this machine's Redis and S3; one index job and one attribution through
them with ``rise remote``, compared with the embedded CLI of the same image (``rise index`` +
``rise attribute`` in a fifth container): same ids, scores within 1e-6.  Afterwards no
container may have written anything to its root file system outside /tmp, /cache and the
Prometheus folder (what a read-only root file system would have refused).

Runs only when RISE_IMAGE names the image (``make image-test`` builds it with ``make
images`` and sets it; not part of ``make test``: README "Container images"), as root with
buildah.  RISE_IMAGE_TEST_REPORT, if set, is a JSON file the timings are written to.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TEXTS, save_tiny_model, write_jsonl
from image_stack import (
    VOLUMES,
    image_exists,
    mount_points,
    new_container,
    remove_all,
    rootfs_changes,
    rootfs_snapshot,
    run,
    start,
    stop,
    volume_files,
)
from rise.settings import Pool, Settings
from rise.stack import free_port, minio_client, start_redis, start_s3, wait_ready
from rise.stack.services import celery_ping, grpc_serving, metrics_answer

pytestmark = pytest.mark.integration

IMAGE = os.environ.get("RISE_IMAGE", "")
POOL = "tiny"
TOKEN = "tok-image-5c1e"
ROWS = [{"id": f"doc-{i}", "text": t} for i, t in enumerate(TEXTS + [
    "The dog sleeps while the fox runs.",
    "Influence functions approximate leave-one-out retraining.",
])]
QUERIES = [{"id": "q-fox", "text": "A fox jumped over a dog."},
           {"id": "q-shard", "text": "Shards and manifests are immutable."}]


def _skip_reason() -> str | None:
    if not IMAGE:
        return "RISE_IMAGE is not set (make image-test)"
    if os.geteuid() != 0:
        return "buildah run --isolation chroot needs root"
    if shutil.which("buildah") is None:
        return "no buildah (make image-test installs it)"
    if not image_exists(IMAGE):
        return f"no image {IMAGE} (make images)"
    return None


if _skip_reason():
    pytest.skip(_skip_reason() or "", allow_module_level=True)


def _rise(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("rise")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **env})


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    root = tmp_path_factory.mktemp("image")
    t: dict[str, float] = {}
    t0 = time.monotonic()
    model = save_tiny_model("llama", root / "tiny-llama")
    for f in model.iterdir():  # a mounted model volume is readable by the pod's user
        f.chmod(0o644)
    data = root / "data"
    data.mkdir()
    write_jsonl(data / "c.jsonl", ROWS)
    write_jsonl(data / "q.jsonl", QUERIES)
    secrets = root / "secrets"
    secrets.mkdir()
    (secrets / "tokens.json").write_text(json.dumps({TOKEN: "a"}))
    (secrets / "internal.key").write_text("image-test-internal-secret-0123456789abcdef\n")
    for f in secrets.iterdir():
        os.chown(f, 10001, 10001)
        f.chmod(0o400)

    procs, containers = [], []
    try:
        redis = start_redis(root / "redis", "auto", die_with_parent=True)
        procs.append(redis)
        s3 = start_s3(root / "s3", "auto", die_with_parent=True)
        procs.append(s3)
        gport, sport = free_port(), free_port()
        mports = {n: free_port() for n in ("gateway", "scorer", "worker", "controller")}
        settings = Settings.model_construct(pools={POOL: Pool(model="/models/tiny")})
        base = {**redis.env, **s3.env,
                "RISE_POOLS": json.dumps({POOL: {"model": "/models/tiny"}}),
                "RISE_GATEWAY_HOST": "127.0.0.1", "RISE_GATEWAY_PORT": str(gport),
                "RISE_SCORER_HOST": "127.0.0.1", "RISE_SCORER_PORT": str(sport),
                "RISE_SCORER_ADDRESSES": f"127.0.0.1:{sport}",
                "RISE_AUTH_TOKENS_FILE": "/etc/rise/tokens.json",
                "RISE_INTERNAL_SECRET_FILE": "/etc/rise/internal.key",
                "RISE_METRICS_HOST": "127.0.0.1", "RISE_CACHE_DIR": "/cache/rise"}
        ro = {str(secrets): "/etc/rise", str(model): "/models/tiny"}
        node = f"rise-{POOL}@{socket.gethostname()}"
        queues = ",".join([settings.queue_of(POOL), f"{settings.query_queue}.{POOL}",
                           settings.control_queue])
        services = {
            "gateway": (["python", "-m", "rise.gateway"], {}),
            "scorer": (["python", "-m", "rise.scorer"], {}),
            "controller": (["python", "-m", "rise.controller"], {}),
            "worker": (["celery", "-A", "rise.worker.app", "worker", "-Q", queues,
                        "--concurrency", "1", "-n", node, "--loglevel", "INFO",
                        "--without-gossip", "--without-mingle"],
                       {"RISE_WORKER_POOL": POOL, "HF_HOME": "/cache/huggingface",
                        "PROMETHEUS_MULTIPROC_DIR": "/var/run/prometheus-multiproc"}),
        }
        for name in [*services, "cli"]:
            containers.append(new_container(IMAGE, name, root / "volumes"))
        byname = {c.name: c for c in containers}
        binds = ("/etc/rise", "/models/tiny", "/data")
        before = {c.name: rootfs_snapshot(c, binds) for c in containers}
        t["setup_s"] = time.monotonic() - t0

        t1 = time.monotonic()
        for name, (argv, extra) in services.items():
            start(byname[name], argv, {**base, "RISE_METRICS_PORT": str(mports[name]), **extra},
                  ro, root / "logs")
        wait_ready(byname["gateway"].proc, lambda: grpc_serving(f"127.0.0.1:{gport}"), "gateway")
        wait_ready(byname["scorer"].proc, lambda: grpc_serving(f"127.0.0.1:{sport}"), "scorer")
        wait_ready(byname["worker"].proc, lambda: celery_ping(redis.env["RISE_REDIS_URL"], node)
                   and bool(metrics_answer(mports["worker"])), "worker")
        wait_ready(byname["controller"].proc, lambda: bool(metrics_answer(mports["controller"])),
                   "controller")
        t["services_ready_s"] = time.monotonic() - t1

        client = minio_client(s3.env["RISE_S3_ENDPOINT"], s3.env["RISE_S3_ACCESS_KEY"],
                              s3.env["RISE_S3_SECRET_KEY"])
        body = (data / "c.jsonl").read_bytes()
        client.put_object("rise", "tenants/a/data/c.jsonl", io.BytesIO(body), len(body))
        env = {"RISE_GATEWAY": f"127.0.0.1:{gport}", "RISE_TOKEN": TOKEN}
        out = root / "out"
        out.mkdir()

        t2 = time.monotonic()
        job = _rise("remote", "index", "c", "--data", "s3://rise/tenants/a/data/c.jsonl",
                    "--pool", POOL, "--shard-size", "4", "--wait", "--json", env=env)
        t["remote_index_s"] = time.monotonic() - t2
        t3 = time.monotonic()
        attr = _rise("remote", "attribute", "c", "--queries", str(data / "q.jsonl"),
                     "--output", str(out / "remote.jsonl"), "--top", "4", env=env)
        t["remote_attribute_s"] = time.monotonic() - t3

        # The embedded CLI of the same image on the same data and model.
        t4 = time.monotonic()
        cli_ro = {str(model): "/models/tiny", str(data): "/data"}
        emb_index = run(byname["cli"], ["rise", "index", "--model", "/models/tiny", "--data",
                                        "/data/c.jsonl", "--out", "/tmp/local-index",
                                        "--shard-size", "4"], {}, cli_ro)
        emb_attr = run(byname["cli"], ["rise", "attribute", "--index", "/tmp/local-index",
                                       "--model", "/models/tiny", "--queries", "/data/q.jsonl",
                                       "--output", "/tmp/local.jsonl", "--top", "4"], {}, cli_ro)
        t["embedded_cli_s"] = time.monotonic() - t4

        stop([c for c in containers if c.proc is not None])
        after = {c.name: rootfs_snapshot(c, binds) for c in containers}
        t["total_s"] = time.monotonic() - t0
        yield {"root": root, "job": job, "attr": attr, "emb": (emb_index, emb_attr),
               "remote": out / "remote.jsonl",
               "local": byname["cli"].root / "tmp" / "local.jsonl",
               "changes": {n: rootfs_changes(before[n], after[n], mount_points(list(binds)))
                           for n in before},
               "volumes": {c.name: volume_files(c) for c in containers},
               "logs": {c.name: c.proc.log for c in containers if c.proc is not None},
               "timings": t}
    finally:
        stop([c for c in containers if c.proc is not None])
        from rise.stack import stop_all
        stop_all(list(reversed(procs)))
        remove_all(containers)
        report = os.environ.get("RISE_IMAGE_TEST_REPORT")
        if report:
            Path(report).write_text(json.dumps({"image": IMAGE, **{k: round(v, 2) for k, v in
                                                                   t.items()}}, indent=2) + "\n")


def _log_tails(d: dict) -> str:
    return "\n".join(f"--- {n}\n" + "\n".join(Path(p).read_text(errors="replace")
                                              .splitlines()[-15:])
                     for n, p in d["logs"].items())


def test_index_job_through_the_image_succeeds(deployed):
    job = deployed["job"]
    assert job.returncode == 0, job.stderr + _log_tails(deployed)
    got = json.loads(job.stdout)
    assert (got["state"], got["shards_done"], got["shards_total"]) == ("SUCCEEDED", 3, 3)


def test_attributions_equal_the_embedded_cli_of_the_image(deployed):
    for step in (deployed["attr"], *deployed["emb"]):
        assert step.returncode == 0, step.stderr + _log_tails(deployed)
    remote = [json.loads(x) for x in deployed["remote"].read_text().splitlines()]
    local = [json.loads(x) for x in deployed["local"].read_text().splitlines()]
    assert [r["query_id"] for r in remote] == [r["query_id"] for r in local] == ["q-fox", "q-shard"]
    for r, w in zip(remote, local, strict=True):
        assert len(r["results"]) == 4
        assert [x["id"] for x in r["results"]] == [x["id"] for x in w["results"]]
        assert [x["score"] for x in r["results"]] == pytest.approx(
            [x["score"] for x in w["results"]], abs=1e-6)


def test_nothing_is_written_outside_the_writable_volumes(deployed):
    """What a read-only root file system would refuse: any file added, removed or changed
    in a container's root file system (the volumes and the runtime's mounts excluded)."""
    assert deployed["changes"] == {n: {"added": [], "removed": [], "changed": []}
                                   for n in deployed["changes"]}
    # The writes went to the volumes (the CLI's index and attributions to /tmp).
    vols = deployed["volumes"]
    assert "local.jsonl" in vols["cli"]["/tmp"]
    assert any(f.startswith("local-index/") for f in vols["cli"]["/tmp"])
    assert set(VOLUMES) == set(vols["gateway"])

