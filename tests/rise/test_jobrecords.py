"""Job records in the store: the end state and the progress of an ended job, and GetJob
answering from the record once the job's state in Redis expired."""

from __future__ import annotations

import uuid

import grpc
import pytest
import redis
from rise.datasets import open_store
from rise.gateway.service import Auth, Deps, JobService
from rise.jobrecords import JobRecords
from rise.jobs import SUCCEEDED, JobStore
from rise.settings import Settings
from servers import redis_server  # noqa: F401

pytestmark = pytest.mark.integration


class Aborted(Exception):
    pass


class Context:
    def invocation_metadata(self):
        return ()

    def abort(self, code, message):
        raise Aborted(code, message)


@pytest.fixture
def env(redis_server, tmp_path):  # noqa: F811
    settings = Settings(redis_url=redis_server.url, s3_endpoint=f"file://{tmp_path}",
                        auth_mode="off", internal_auth="off")
    r = redis.Redis.from_url(redis_server.url, decode_responses=True)
    js = JobStore(r, namespace=f"t{uuid.uuid4().hex[:8]}")
    deps = Deps(settings=settings, jobs=js, send_task=None,
                store=lambda prefix: open_store(settings, prefix), scorers=[],
                materialize=str)
    yield settings, js, deps
    for key in r.scan_iter(f"{js.ns}:*"):
        r.delete(key)


def test_an_expired_job_is_answered_from_its_record(env):
    settings, js, deps = env
    tenant = settings.default_tenant
    records = JobRecords(deps.store(""))
    job = js.create(tenant, "CREATE_INDEX", "docs",
                    request={"prefix": f"tenants/{tenant}/indexes/docs/", "pool": "p"})
    records.submitted(job)
    js.update(job["id"], shards_total=3, shards_done=3, examples_total=12, examples_done=12,
              tokens_done=345)
    js.set_state(job["id"], "RUNNING")
    js.set_state(job["id"], SUCCEEDED, generation=1)
    ended = js.get_any(job["id"])
    records.ended(ended)
    record = records.get(tenant, job["id"])
    assert (record.state, record.shards_done, record.examples_done, record.tokens_done,
            record.generation) == (SUCCEEDED, 3, 12, 345, 1)
    service = JobService(deps, Auth(settings, None))
    live = service.GetJob(type("R", (), {"id": job["id"]})(), Context())
    js.r.delete(f"{js.ns}:job:{job['id']}")  # what the TTL does
    kept = service.GetJob(type("R", (), {"id": job["id"]})(), Context())
    assert kept == live
    for bad in ("0" * 32, "../x", ""):  # unknown, or not a job id at all: NOT_FOUND
        with pytest.raises(Aborted) as e:
            service.GetJob(type("R", (), {"id": bad})(), Context())
        assert e.value.args[0] == grpc.StatusCode.NOT_FOUND


def test_a_record_that_has_not_ended_is_not_an_answer(env):
    settings, js, deps = env
    tenant = settings.default_tenant
    job = js.create(tenant, "COMPACT", "docs", request={"prefix": "x/", "pool": "p"})
    JobRecords(deps.store("")).submitted(job)
    js.r.delete(f"{js.ns}:job:{job['id']}")
    with pytest.raises(Aborted) as e:
        JobService(deps, Auth(settings, None)).GetJob(type("R", (), {"id": job["id"]})(),
                                                       Context())
    assert e.value.args[0] == grpc.StatusCode.NOT_FOUND
