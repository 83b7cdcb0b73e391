"""Client request ids (AIP-155) against a gateway with a real Redis: a retry with the same
id returns the first call's job or index and never does the work twice, even when the
duplicates arrive at once; the same id with a different request is INVALID_ARGUMENT; a
call that failed frees its id; tenants have their own ids."""

from __future__ import annotations

import json
import threading
import uuid
from concurrent import futures

import grpc
import pytest
import redis
from conftest import TEXTS, write_jsonl
from rise import ingest
from rise.config import make_config
from rise.data import FieldMap
from rise.datasets import open_store
from rise.gateway import service
from rise.gateway.service import (
    Auth,
    Deps,
    IndexService,
    check_request_id,
    request_fingerprint,
)
from rise.grpcutil import make_server
from rise.jobs import JobStore, index_prefix
from rise.model import load_model
from rise.registry import Registry
from rise.settings import Pool, Settings
from rise.v1 import rise_pb2, rise_pb2_grpc
from servers import redis_server  # noqa: F401

POOL = "cpu"


@pytest.fixture(scope="module")
def lm(tiny_model):
    return load_model(str(tiny_model), dtype="float32")


class Env:
    def __init__(self, url: str, tmp) -> None:
        tokens = tmp / "tokens.json"
        tokens.write_text(json.dumps({"tok-a": "a", "tok-b": "b"}))
        self.data = tmp / "data"
        self.data.mkdir()
        self.settings = Settings(redis_url=url, s3_endpoint=f"file://{tmp / 'bucket'}",
                                 auth_tokens_file=str(tokens), dataset_roots=[str(self.data)],
                                 pools={POOL: Pool(model="unused", gpus=0)})
        self.r = redis.Redis.from_url(url, decode_responses=True)
        self.js = JobStore(self.r, namespace=f"t{uuid.uuid4().hex[:8]}")
        self.sent: list[tuple[str, list]] = []
        self.lock = threading.Lock()
        self.store = lambda prefix: open_store(self.settings, prefix)
        deps = Deps(settings=self.settings, jobs=self.js, send_task=self.send, store=self.store,
                    scorers=[], materialize=lambda uri: uri)
        self.server = make_server(self.settings.max_message_bytes, threads=16)
        rise_pb2_grpc.add_IndexServiceServicer_to_server(
            IndexService(deps, Auth(self.settings)), self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.idx = rise_pb2_grpc.IndexServiceStub(self.channel)

    def send(self, name: str, *, args: list, queue: str) -> None:
        with self.lock:
            self.sent.append((name, args))

    def call(self, method: str, req, tenant: str = "a"):
        return getattr(self.idx, method)(req, metadata=[("authorization", f"Bearer tok-{tenant}")],
                                         timeout=30)

    def fails(self, method: str, req, tenant: str = "a") -> tuple[grpc.StatusCode, str]:
        with pytest.raises(grpc.RpcError) as e:
            self.call(method, req, tenant)
        return e.value.code(), e.value.details()

    def dataset(self, name: str, n: int = 4) -> str:
        return str(write_jsonl(self.data / name, [{"id": f"d{i}", "text": t}
                                                  for i, t in enumerate(TEXTS[:n])]))

    def index(self, lm, tenant: str, name: str) -> None:
        """A committed index built here (no worker), registered for ``tenant``."""
        Registry(self.js, self.store).claim(tenant, name, POOL)
        store = self.store(index_prefix(tenant, name))
        p, records = ingest.plan(store, lm, self.dataset(f"{name}.jsonl"), fields=FieldMap(),
                                 config=make_config(), shard_size=2)
        for n in range(p.n_shards):
            rng = p.shard_range(n)
            ingest.write_shard(store, lm, p, n, records[rng.start:rng.stop])
        ingest.commit(store, p)

    def jobs(self, tenant: str = "a", kind: str = "") -> list[dict]:
        return [j for j in self.js.list(tenant) if not kind or j["kind"] == kind]


@pytest.fixture
def env(redis_server, tmp_path):  # noqa: F811
    e = Env(redis_server.url, tmp_path)
    yield e
    e.channel.close()
    e.server.stop(0)
    for key in e.r.scan_iter(f"{e.js.ns}:*"):
        e.r.delete(key)


class NoStore:
    def __getattr__(self, name):
        raise AssertionError(f"the gateway reached the job store ({name}) for a bad request id")


@pytest.mark.parametrize("rid", ["has space", "x" * 129, "caf\u00e9", "a/b", "new\nline"])
def test_bad_request_ids_are_invalid_argument_before_any_work(tmp_path, rid):
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"tok-a": "a"}))
    settings = Settings(auth_tokens_file=str(tokens), pools={POOL: Pool(model="unused")})
    svc = IndexService(Deps(settings=settings, jobs=NoStore(), send_task=None, store=None,
                            scorers=[], materialize=None), Auth(settings))

    class Context:
        def invocation_metadata(self):
            return [("authorization", "Bearer tok-a")]

        def abort(self, code, details):
            raise grpc.RpcError(code, details)

    for method, req in (
            ("CreateIndex", rise_pb2.CreateIndexRequest(index="d", pool=POOL, request_id=rid)),
            ("AppendToIndex", rise_pb2.AppendToIndexRequest(index="d", request_id=rid)),
            ("DeleteExamples", rise_pb2.DeleteExamplesRequest(index="d", ids=["x"],
                                                              request_id=rid)),
            ("CompactIndex", rise_pb2.CompactIndexRequest(index="d", request_id=rid))):
        with pytest.raises(grpc.RpcError) as e:
            getattr(svc, method)(req, Context())
        code, details = e.value.args
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "request_id" in details
    assert check_request_id("0f1e2d3c-aaaa-4bbb-8ccc-0123456789ab") and check_request_id(
        "job.v2:retry_1-" + "z" * 113)


def append(env, index="docs", rid="r-1", data="more.jsonl"):
    return rise_pb2.AppendToIndexRequest(index=index, dataset_uri=env.dataset(data),
                                         request_id=rid)


@pytest.mark.integration
def test_a_retried_append_returns_the_first_job_and_makes_no_second(env, lm):
    env.index(lm, "a", "docs")
    first = env.call("AppendToIndex", append(env))
    again = env.call("AppendToIndex", append(env))
    assert again.id == first.id and again.kind == rise_pb2.JOB_KIND_APPEND
    assert len(env.jobs(kind="APPEND")) == 1 and len(env.sent) == 1
    # The answer is the job as it is now, not a copy of the first answer.
    env.js.set_state(first.id, "RUNNING")
    assert env.call("AppendToIndex", append(env)).state == rise_pb2.JOB_STATE_RUNNING
    # Without the id the same request is a new one (refused: the first job holds the index).
    code, msg = env.fails("AppendToIndex", append(env, rid=""))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "busy" in msg
    key = f"{env.js.ns}:request:a:r-1"
    assert 0 < env.r.ttl(key) <= service.REQUEST_TTL_SECONDS


@pytest.mark.integration
def test_create_and_compact_are_answered_once_per_id(env, lm):
    req = rise_pb2.CreateIndexRequest(index="new", dataset_uri=env.dataset("new.jsonl"),
                                      pool=POOL, request_id="create-1")
    first = env.call("CreateIndex", req)
    assert env.call("CreateIndex", req).id == first.id  # not ALREADY_EXISTS
    assert len(env.jobs(kind="CREATE_INDEX")) == 1
    env.index(lm, "a", "docs")
    compact = rise_pb2.CompactIndexRequest(index="docs", request_id="compact-1")
    assert env.call("CompactIndex", compact).id == env.call("CompactIndex", compact).id
    assert len(env.jobs(kind="COMPACT")) == 1 and len(env.sent) == 2


@pytest.mark.integration
def test_the_same_id_with_a_different_request_is_invalid_argument(env, lm):
    env.index(lm, "a", "docs")
    first = env.call("AppendToIndex", append(env))
    code, msg = env.fails("AppendToIndex", append(env, data="other.jsonl"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "request_id 'r-1' was already used for a different request" in msg
    # Another method with the same id is another request too, even with equal bytes.
    code, _ = env.fails("CompactIndex", rise_pb2.CompactIndexRequest(index="docs",
                                                                     request_id="r-1"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert env.call("AppendToIndex", append(env)).id == first.id
    assert len(env.jobs()) == 1


@pytest.mark.integration
def test_tenants_have_their_own_ids(env, lm):
    env.index(lm, "a", "docs")
    env.index(lm, "b", "docs")
    job_a = env.call("AppendToIndex", append(env), tenant="a")
    job_b = env.call("AppendToIndex", append(env), tenant="b")
    assert job_a.id != job_b.id and len(env.jobs("a")) == len(env.jobs("b")) == 1


@pytest.mark.integration
def test_concurrent_duplicates_make_one_job(env, lm):
    env.index(lm, "a", "docs")
    req = append(env, rid="burst")
    with futures.ThreadPoolExecutor(8) as pool:
        jobs = list(pool.map(lambda _: env.call("AppendToIndex", req), range(8)))
    assert len({j.id for j in jobs}) == 1
    assert len(env.jobs(kind="APPEND")) == 1 and len(env.sent) == 1


@pytest.mark.integration
def test_a_duplicate_of_a_call_in_progress_is_aborted_after_a_bounded_wait(
        env, lm, monkeypatch):
    env.index(lm, "a", "docs")
    req = append(env, rid="slow")
    # Another gateway has claimed the id and is still working on it.
    assert env.js.claim_request("a", "slow", request_fingerprint("AppendToIndex", req),
                                "other-gateway", 60) is None
    monkeypatch.setattr(service, "REQUEST_WAIT_SECONDS", 0.5)
    code, msg = env.fails("AppendToIndex", req)
    assert code == grpc.StatusCode.ABORTED and "in progress; retry" in msg
    assert env.jobs() == []


@pytest.mark.integration
def test_a_failed_call_frees_its_id(env, lm):
    env.index(lm, "a", "docs")
    assert env.js.lock_index("a", "docs", "someone-else", 60) is None
    code, _ = env.fails("AppendToIndex", append(env, rid="after-busy"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert not env.r.exists(f"{env.js.ns}:request:a:after-busy")
    env.js.unlock_index("a", "docs", "someone-else")
    job = env.call("AppendToIndex", append(env, rid="after-busy"))
    assert job.state == rise_pb2.JOB_STATE_QUEUED and len(env.sent) == 1
    # Validation errors free it too.
    code, _ = env.fails("AppendToIndex", rise_pb2.AppendToIndexRequest(
        index="docs", dataset_uri="/etc/passwd.jsonl", request_id="bad-data"))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert not env.r.exists(f"{env.js.ns}:request:a:bad-data")


@pytest.mark.integration
def test_a_retried_delete_returns_the_index_not_not_found(env, lm):
    env.index(lm, "a", "docs")
    req = rise_pb2.DeleteExamplesRequest(index="docs", ids=["d0", "d1"], request_id="del-1")
    first = env.call("DeleteExamples", req)
    assert (first.live_count, first.tombstones) == (2, 2)
    again = env.call("DeleteExamples", req)
    assert (again.generation, again.live_count, again.tombstones) == (
        first.generation, 2, 2)
    code, _ = env.fails("DeleteExamples", rise_pb2.DeleteExamplesRequest(
        index="docs", ids=["d0", "d1"], request_id="del-2"))
    assert code == grpc.StatusCode.NOT_FOUND  # a new request: those ids are gone
