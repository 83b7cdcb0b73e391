"""Admission control over real gRPC (a gateway server of 8 threads, 2 of them reserved):
per-tenant and global caps on streams and unary calls, the health check answering while
every admitted place is taken, streams freed the moment their client leaves, and the
per-tenant job limit."""

from __future__ import annotations

import json
import threading
import time
import uuid
from concurrent import futures

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rise.errors import BudgetExceeded, InvalidInput, NotFound
from rise.gateway.limits import Admission, Limits, check_active_jobs
from rise.gateway.service import Auth, Deps, JobService
from rise.grpcutil import add_health_and_reflection, make_server
from rise.jobs import JobStore
from rise.settings import Pool, Settings
from rise.v1 import rise_pb2, rise_pb2_grpc
from servers import redis_server  # noqa: F401

THREADS, RESERVED, STREAMS, STREAMS_PER_TENANT, CALLS_PER_TENANT = 8, 2, 3, 2, 2
CALLS = THREADS - RESERVED - STREAMS  # 3 unary calls in all


def job(tenant: str, job_id: str) -> dict:
    return {"id": job_id, "tenant": tenant, "kind": "CREATE_INDEX", "index": "docs",
            "state": "RUNNING", "created_at": 1.0, "started_at": 1.0, "finished_at": 0.0,
            "shards_total": 1, "shards_done": 0, "examples_total": 10, "examples_done": 0,
            "tokens_done": 0, "generation": 0}


class Jobs:
    """Every job id exists and runs forever; GetJob of id "slow" blocks until released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Semaphore(0)
        self.servicer_calls = 0

    def get(self, tenant: str, job_id: str) -> dict:
        self.servicer_calls += 1
        if job_id == "slow":
            self.entered.release()
            self.release.wait(30)
        return job(tenant, job_id)


@pytest.fixture
def gw(tmp_path):
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"tok-a": "a", "tok-b": "b", "tok-c": "c"}))
    settings = Settings(auth_tokens_file=str(tokens), pools={"cpu": Pool(model="unused")},
                        gateway_threads=THREADS, gateway_reserved_threads=RESERVED,
                        max_streams=STREAMS, max_streams_per_tenant=STREAMS_PER_TENANT,
                        max_calls_per_tenant=CALLS_PER_TENANT)
    jobs = Jobs()
    deps = Deps(settings=settings, jobs=jobs, send_task=None, store=lambda p: None,  # type: ignore[arg-type]
                scorers=[], materialize=lambda u: u)
    auth = Auth(settings)
    limits = Limits.from_settings(settings)
    server = make_server(settings.max_message_bytes, threads=settings.gateway_threads,
                         interceptors=[Admission(limits, auth.tenant)])
    rise_pb2_grpc.add_JobServiceServicer_to_server(JobService(deps, auth), server)
    add_health_and_reflection(server, ["rise.v1.JobService"])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    g = Gateway(channel, jobs, limits)
    yield g
    jobs.release.set()
    g.close()
    channel.close()
    server.stop(0)


class Gateway:
    def __init__(self, channel, jobs: Jobs, limits: Limits) -> None:
        self.stub = rise_pb2_grpc.JobServiceStub(channel)
        self.health = health_pb2_grpc.HealthStub(channel)
        self.jobs, self.limits = jobs, limits
        self.streams: list = []
        self.pool = futures.ThreadPoolExecutor(64)

    def watch(self, tenant: str, job_id: str = "j", interval: float = 60.0,
              timeout: float = 60.0) -> tuple[grpc.StatusCode, str] | None:
        """Open a WatchJob stream and read its first update: None when admitted (the
        stream stays open, in ``streams``), else the refusal's code and message."""
        stream = self.stub.WatchJob(rise_pb2.WatchJobRequest(id=job_id, interval_seconds=interval),
                                    metadata=[("authorization", f"Bearer tok-{tenant}")],
                                    timeout=timeout)
        self.streams.append(stream)
        try:
            next(stream)
        except grpc.RpcError:  # the call object is the error: its status is final now
            return stream.code(), stream.details()
        return None

    def get(self, tenant: str, job_id: str = "j", timeout: float = 30):
        return self.stub.GetJob(rise_pb2.GetJobRequest(id=job_id), timeout=timeout,
                                metadata=[("authorization", f"Bearer tok-{tenant}")])

    def slow(self, tenant: str):
        """A GetJob that holds its thread until released; returns once it is admitted."""
        fut = self.pool.submit(self.get, tenant, "slow")
        assert self.jobs.entered.acquire(timeout=10), "slow call not admitted"
        return fut

    def healthy(self, timeout: float = 2.0) -> float:
        """Seconds one health Check took (SERVING asserted)."""
        t0 = time.monotonic()
        resp = self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        return time.monotonic() - t0

    def close(self) -> None:
        for s in self.streams:
            s.cancel()
        self.pool.shutdown(wait=False, cancel_futures=True)


def test_streams_are_capped_per_tenant_and_in_all(gw):
    assert [gw.watch("a") for _ in range(STREAMS_PER_TENANT)] == [None] * STREAMS_PER_TENANT
    code, msg = gw.watch("a")
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "tenant 'a' already has 2 streams" in msg and "limit is 2 per tenant" in msg
    assert gw.watch("b") is None  # another tenant: its own allowance
    code, msg = gw.watch("c")  # but the gateway's streams are all taken
    assert code == grpc.StatusCode.UNAVAILABLE and "3 streams" in msg
    assert gw.limits.open() == STREAMS
    # Unary calls keep their own threads, and so does the health check.
    assert gw.get("c").state == rise_pb2.JOB_STATE_RUNNING
    assert gw.healthy() < 1.0


def test_health_answers_while_every_admitted_place_is_taken(gw):
    """3 streams and 3 blocked unary calls hold 6 of the 8 threads: the rest serve the
    health check and the refusals, however many calls arrive."""
    assert [gw.watch(t) for t in ("a", "a", "b")] == [None] * 3
    held = [gw.slow(t) for t in ("a", "a", "b")]
    assert gw.limits.open(stream=False) == CALLS
    flood = [gw.pool.submit(gw.watch, t) for t in "abc" * 10]
    flood += [gw.pool.submit(gw.get, t) for t in "abc" * 10]
    took = [gw.healthy() for _ in range(20)]
    assert max(took) < 1.0, took
    over = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE)
    for f in flood[:30]:
        refusal = f.result(timeout=10)
        assert refusal is not None and refusal[0] in over
    for f in flood[30:]:
        with pytest.raises(grpc.RpcError) as e:
            f.result(timeout=10)
        assert e.value.code() in over
    gw.jobs.release.set()
    assert all(f.result(timeout=10).state == rise_pb2.JOB_STATE_RUNNING for f in held)


def test_unary_calls_are_capped_per_tenant(gw):
    held = [gw.slow("a") for _ in range(CALLS_PER_TENANT)]
    with pytest.raises(grpc.RpcError) as e:
        gw.get("a")
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "tenant 'a' already has 2 calls in progress" in e.value.details()
    assert gw.get("b").state == rise_pb2.JOB_STATE_RUNNING  # b is not slowed by a
    gw.jobs.release.set()
    for f in held:
        f.result(timeout=10)
    assert gw.get("a").state == rise_pb2.JOB_STATE_RUNNING  # places given back
    assert gw.limits.open(stream=False) == 0


def test_a_closed_stream_frees_its_place_and_its_thread_at_once(gw):
    assert gw.watch("a") is None and gw.watch("a") is None
    gw.streams[0].cancel()  # its server side sleeps a 60 s interval: it must wake, not wait
    deadline = time.monotonic() + 5
    while gw.limits.open("a") == STREAMS_PER_TENANT:
        assert time.monotonic() < deadline, "the cancelled stream kept its place"
        time.sleep(0.01)
    assert gw.watch("a") is None
    # Its thread is back too: more streams opened and closed than the pool has threads
    # (each closed while its server side waits out its interval), and health and unary
    # calls still find one.
    for _ in range(THREADS + 2):
        assert gw.watch("b", timeout=5) is None
        time.sleep(0.1)
        gw.streams[-1].cancel()
        while gw.limits.open("b"):
            assert time.monotonic() < deadline + 10, "a cancelled stream kept its place"
            time.sleep(0.01)
    assert gw.healthy() < 1.0 and gw.get("c", timeout=5).state == rise_pb2.JOB_STATE_RUNNING


def test_unauthenticated_streams_share_one_allowance(gw):
    """Health Watch (and reflection) streams need no token: all of them together get one
    tenant's allowance, so they cannot hold the pool either; Check is never limited."""
    for n in range(STREAMS_PER_TENANT + 1):
        watch = gw.health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
        gw.streams.append(watch)
        if n < STREAMS_PER_TENANT:
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as e:
        next(watch)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "unauthenticated callers already have 2 streams" in e.value.details()
    assert gw.healthy() < 1.0 and gw.watch("a") is None  # a tenant's own allowance is intact


def test_unauthenticated_calls_never_reach_the_servicer(gw):
    before = gw.jobs.servicer_calls
    for token in ("nope", None):
        md = [("authorization", f"Bearer {token}")] if token else []
        with pytest.raises(grpc.RpcError) as e:
            gw.stub.GetJob(rise_pb2.GetJobRequest(id="j"), metadata=md, timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert gw.jobs.servicer_calls == before and gw.limits.open(stream=False) == 0


def test_unary_calls_get_threads_of_their_own():
    with pytest.raises(InvalidInput, match="unary calls need threads of their own"):
        Limits.from_settings(Settings(gateway_threads=10, gateway_reserved_threads=2,
                                      max_streams=8))
    limits = Limits.from_settings(Settings())
    assert limits.calls == 128 - 8 - 32 and limits.streams == 32


class ActiveJobs:
    def __init__(self, ids: list[str]) -> None:
        self.ids = ids

    def active_of(self, tenant: str) -> list[str]:
        return list(self.ids)


def test_the_job_limit_counts_before_and_after_creating():
    check_active_jobs(ActiveJobs(["j1"]), "a", 2)
    with pytest.raises(BudgetExceeded, match="tenant 'a' has 2 jobs queued or running; "
                                             "the limit is 2"):
        check_active_jobs(ActiveJobs(["j1", "j2"]), "a", 2)
    # Two submits at once both created their job: the older passes, the newer is refused.
    both = ActiveJobs(["j1", "j2", "j3"])
    check_active_jobs(both, "a", 2, job_id="j2")
    with pytest.raises(BudgetExceeded, match="has 2 jobs"):
        check_active_jobs(both, "a", 2, job_id="j3")


@pytest.mark.integration
def test_active_jobs_of_a_tenant_from_redis(redis_server):  # noqa: F811
    js = JobStore(redis.Redis.from_url(redis_server.url, decode_responses=True),
                  namespace=f"t{uuid.uuid4().hex[:8]}")
    a = [js.create("a", "CREATE_INDEX", f"i{n}")["id"] for n in range(3)]
    js.create("b", "CREATE_INDEX", "other")
    assert js.active_of("a") == a
    js.set_state(a[1], "SUCCEEDED")
    assert js.active_of("a") == [a[0], a[2]]
    check_active_jobs(js, "a", 3)
    with pytest.raises(BudgetExceeded):
        check_active_jobs(js, "a", 2)
    with pytest.raises(NotFound):
        js.get("b", a[0])


@pytest.mark.integration
def test_jobs_beyond_the_tenants_limit_are_refused_and_free_their_name(redis_server, tmp_path):  # noqa: F811
    from rise.datasets import open_store
    from rise.gateway.service import IndexService

    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"tok-a": "a", "tok-b": "b"}))
    data = tmp_path / "data"
    data.mkdir()
    (data / "d.jsonl").write_text(json.dumps({"id": "x", "text": "hello"}) + "\n")
    settings = Settings(redis_url=redis_server.url, s3_endpoint=f"file://{tmp_path / 'bucket'}",
                        auth_tokens_file=str(tokens), dataset_roots=[str(data)],
                        pools={"cpu": Pool(model="unused")}, max_active_jobs_per_tenant=1)
    js = JobStore(redis.Redis.from_url(redis_server.url, decode_responses=True),
                  namespace=f"t{uuid.uuid4().hex[:8]}")
    sent: list = []
    deps = Deps(settings=settings, jobs=js, send_task=lambda name, **kw: sent.append(name),
                store=lambda prefix: open_store(settings, prefix), scorers=[],
                materialize=lambda u: u)
    server = make_server(settings.max_message_bytes)
    rise_pb2_grpc.add_IndexServiceServicer_to_server(IndexService(deps, Auth(settings)), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        stub = rise_pb2_grpc.IndexServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))

        def create(name: str, tenant: str = "a"):
            return stub.CreateIndex(rise_pb2.CreateIndexRequest(
                index=name, dataset_uri=str(data / "d.jsonl"), pool="cpu"),
                metadata=[("authorization", f"Bearer tok-{tenant}")], timeout=30)

        first = create("one")
        with pytest.raises(grpc.RpcError) as e:
            create("two")
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "tenant 'a' has 1 jobs queued or running; the limit is 1" in e.value.details()
        assert create("three", tenant="b").state == rise_pb2.JOB_STATE_QUEUED  # b's own limit
        assert len(sent) == 2 and js.index_names("a") == ["one"]  # "two" was not kept
        js.set_state(first.id, "SUCCEEDED")
        assert create("two").state == rise_pb2.JOB_STATE_QUEUED
    finally:
        server.stop(0)
