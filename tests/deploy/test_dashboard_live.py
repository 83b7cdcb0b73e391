"""The dashboard against real data: a real Prometheus (Debian's ``prometheus`` package)
scrapes the local stack (rise.stack: Redis, S3, gateway, one worker, scorer, controller)
every second while one job indexes a small corpus and one Attribute call scores queries;
then every query of every panel, and every variable's selector, returns a series with a
finite value through Prometheus' HTTP API.  GPU panels are excepted here (a CPU run exports
no GPU metric; tests/gpu/gpu_check.py checks those metrics on a GPU machine).
"""

from __future__ import annotations

import io
import time

import pytest
from conftest import TEXTS, save_tiny_model, write_jsonl
from promstack import Prometheus, dashboard_targets, expand, find_prometheus, finite, variable_selectors
from rise.client import RiseClient, state_name
from rise.stack import Stack, minio_client

pytestmark = pytest.mark.integration

TOKENS = {"a": "tok-dash-a-5f1c"}
POOL = "tiny"
ROWS = [{"id": f"doc-{i}", "text": t} for i, t in enumerate(TEXTS * 2)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    binary = find_prometheus()
    if binary is None:
        pytest.skip("prometheus not found ($PROMETHEUS or PATH; apt-get install prometheus)")
    root = tmp_path_factory.mktemp("dashboard-live")
    model = save_tiny_model("llama", root / "tiny-llama")
    corpus = write_jsonl(root / "c.jsonl", ROWS)
    stack = Stack.up(root / "stack", pools={POOL: str(model)}, tokens=TOKENS,
                     gateway_port="auto", scorer_port="auto", metrics_port="auto",
                     die_with_parent=True, env={"RISE_CONTROLLER_INTERVAL_SECONDS": "1"})
    prom = None
    try:
        prom = Prometheus(root / "prometheus", stack.endpoints["metrics"], interval="1s",
                          binary=binary)
        prom.wait_scraped()
        s3 = minio_client(stack.s3["endpoint"], stack.s3["access_key"], stack.s3["secret_key"])
        data = corpus.read_bytes()
        s3.put_object("rise", "tenants/a/data/c.jsonl", io.BytesIO(data), len(data))
        with RiseClient(stack.endpoints["gateway"], TOKENS["a"], timeout=120) as c:
            job = c.create_index("c", "s3://rise/tenants/a/data/c.jsonl", POOL, shard_size=4)
            last = list(c.watch_job(job.id, interval=0.2))[-1]
            assert state_name(last) == "SUCCEEDED", last
            hits = c.attribute("c", [{"id": "q", "text": TEXTS[0]}], top=3)
            assert hits
        # the controller records the end within a pass; Prometheus scrapes every second
        prom.wait_for('sum(rise_job_duration_seconds_count{state="SUCCEEDED"})', timeout=60)
        prom.wait_for("sum(rate(rise_grpc_requests_total{service=\"scorer\"}[5m]))",
                      timeout=30)
        time.sleep(3)
        yield prom
    finally:
        if prom is not None:
            prom.stop()
        stack.down()


def test_every_target_is_scraped(run):
    health = run.targets_health()
    assert set(health) == {"gateway", "scorer", "controller", f"worker-{POOL}"}
    assert set(health.values()) == {"up"}, health


QUERIES = dashboard_targets()


@pytest.mark.parametrize("target", QUERIES,
                         ids=[f"{t.panel['id']}-{t.ref}-{t.title}" for t in QUERIES])
def test_every_panel_query_returns_series(run, target):
    if target.gpu:
        pytest.skip("GPU panel: no GPU metrics on this machine (tests/gpu/gpu_check.py)")
    expr = expand(target.expr, "5m")
    result = run.query(expr)
    assert result, f"{target.title} {target.ref}: no series for {expr}"
    assert finite(result), f"{target.title} {target.ref}: no finite value for {expr}: {result}"


@pytest.mark.parametrize("name, selector", sorted(variable_selectors().items()))
def test_every_variable_finds_values(run, name, selector):
    assert run.query(expand(selector)), f"variable {name}: {selector} selects nothing"
