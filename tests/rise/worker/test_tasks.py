"""The Celery workers as real processes (``celery -A rise.worker.app worker``) against a real
Redis and a real S3 server (SeaweedFS), driven the way the gateway drives them: a job
created in the JobStore with a ``request``, the index registered and locked, then
``send_task("rise.ingest.prepare")``.

Ground truth is the embedded library: an index built by the workers in S3 must hold
byte-identical shards (and the same manifest shard entries) as ``rise.index.create_index``
into a local folder, whether one worker or two share the job; query features sketched by a
worker must equal ``rise.api.sketch_queries`` in-process.  Also: a bad dataset fails its
job with INVALID_ARGUMENT and frees the index, /metrics serves the worker catalogue, and a
cancelled job ends CANCELLED with no manifest.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import TEXTS, save_tiny_model, write_jsonl
from rise import api, constants, ingest
from rise import index as I
from rise.config import SketchConfig
from rise.data import FieldMap, read_records
from rise.errors import InvalidInput
from rise.jobs import CANCELLED, FAILED, SUCCEEDED, TERMINAL, JobStore, index_prefix
from rise.metrics import names_for
from rise.model import load_model
from rise.s3store import S3Store
from rise.score import queryset_from_bytes
from rise.settings import Settings
from rise.store import LocalStore
from servers import free_port, redis_server, s3_server  # noqa: F401

pytestmark = pytest.mark.integration

POOL = "tiny"
TENANT = "acme"
BUCKET = "rise"
BATCH = 4
CONFIG = SketchConfig(dims=(16, 8, 8), topk=32, max_length=64)
QUEUES = f"rise.pool.{POOL},rise.queries.{POOL},rise.control"
JOB_TIMEOUT_S = 60.0


def texts(n: int) -> list[dict]:
    return [{"id": f"doc-{i}", "text": f"{i}: {TEXTS[i % len(TEXTS)]}"} for i in range(n)]


@dataclass
class Worker:
    proc: subprocess.Popen
    log: Path
    metrics_port: int
    name: str

    def wait_ready(self, app, timeout: float = 60.0) -> None:
        """Until the worker answers a control ping: it is consuming its queues."""
        node = f"{self.name}@{socket.gethostname()}"
        deadline = time.monotonic() + timeout
        while not app.control.ping(destination=[node], timeout=0.5):
            assert self.proc.poll() is None, f"worker exited:\n{self.tail()}"
            assert time.monotonic() < deadline, f"{node} not ready:\n{self.tail()}"

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        deadline = time.monotonic() + 30
        while True:
            try:
                return urllib.request.urlopen(url, timeout=5).read().decode()
            except OSError:
                assert time.monotonic() < deadline, f"no /metrics:\n{self.tail()}"
                time.sleep(0.2)

    def shards_done(self) -> int:
        """Shard tasks this worker finished (written or skipped), from its /metrics."""
        pat = (r'^rise_tasks_total\{outcome="(?:ok|skipped)",pool="[^"]*",'
               r'task="rise.ingest.shard"\} (\S+)')
        return int(sum(float(v) for v in re.findall(pat, self.metrics(), re.M)))

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        try:  # the whole group: the prefork children too
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


@dataclass
class Env:
    settings: Settings
    env: dict[str, str]
    model: Path
    tmp: Path
    js: JobStore

    def s3(self, prefix: str = "") -> S3Store:
        s = self.settings
        return S3Store.from_url(s.s3_endpoint, s.s3_access_key, s.s3_secret_key, BUCKET,
                                prefix=prefix)

    def upload(self, key: str, rows: list[dict]) -> str:
        data = "".join(json.dumps(r) + "\n" for r in rows).encode()
        self.s3().client.put_object(BUCKET, key, io.BytesIO(data), len(data))
        return f"s3://{BUCKET}/{key}"

    def start_worker(self, name: str, queues: str = QUEUES, extra: list[str] | None = None,
                     **env_overrides: str) -> Worker:
        mdir = self.tmp / f"metrics-{name}"
        mdir.mkdir()
        port = free_port()
        env = dict(self.env, PROMETHEUS_MULTIPROC_DIR=str(mdir), RISE_METRICS_PORT=str(port),
                   **env_overrides)
        log = self.tmp / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "rise.worker.app", "worker", "-Q", queues,
                 "--concurrency", "1", "--pool", "prefork", "--loglevel", "WARNING",
                 "-n", f"{name}@%h", *(extra or [])],
                env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, cwd=self.tmp)
        return Worker(proc, log, port, name)


@pytest.fixture(scope="module")
def env(redis_server, s3_server, tmp_path_factory):  # noqa: F811
    import redis

    tmp = tmp_path_factory.mktemp("worker")
    model = save_tiny_model("llama", tmp / "model")
    pools = {POOL: {"model": str(model), "gpus": 0, "dtype": "float32", "batch_size": BATCH}}
    rise_env = {
        "RISE_POOLS": json.dumps(pools), "RISE_WORKER_POOL": POOL,
        "RISE_REDIS_URL": redis_server.url, "RISE_S3_ENDPOINT": s3_server.endpoint,
        "RISE_S3_ACCESS_KEY": s3_server.access_key, "RISE_S3_SECRET_KEY": s3_server.secret_key,
        "RISE_S3_BUCKET": BUCKET, "RISE_CACHE_DIR": str(tmp / "cache"),
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("RISE_")}
    env.update(rise_env, PYTHONUNBUFFERED="1")
    settings = Settings(redis_url=redis_server.url, s3_endpoint=s3_server.endpoint,
                        s3_access_key=s3_server.access_key, s3_secret_key=s3_server.secret_key,
                        s3_bucket=BUCKET, pools=pools, worker_pool=POOL,
                        cache_dir=str(tmp / "cache"))
    js = JobStore(redis.Redis.from_url(redis_server.url, decode_responses=True))
    e = Env(settings, env, model, tmp, js)
    e.s3().ensure_bucket()
    return e


@pytest.fixture(scope="module")
def worker(env):
    w = env.start_worker("w1")
    try:
        yield w
    finally:
        w.stop()


@pytest.fixture(scope="module")
def app(env):
    from rise.worker.app import make_app

    return make_app(env.settings)


@pytest.fixture(scope="module")
def lm(env):
    return load_model(env.model, dtype="float32")


def submit(env: Env, app, index: str, uri: str, shard_size: int, *,
           config: SketchConfig = CONFIG, append: bool = False) -> str:
    """What the gateway does for CreateIndex: job, registry, lock, plan task."""
    prefix = index_prefix(TENANT, index)
    request = {"prefix": prefix, "dataset_uri": uri, "fields": FieldMap().to_dict(),
               "config": config.to_dict(), "shard_size": shard_size, "pool": POOL,
               "append": append}
    job = env.js.create(TENANT, "APPEND" if append else "CREATE_INDEX", index, request=request)
    if not append:
        assert env.js.register_index(TENANT, index, POOL)
    assert env.js.lock_index(TENANT, index, job["id"], 3600) is None
    app.send_task("rise.ingest.prepare", args=[job["id"]], queue=f"rise.pool.{POOL}")
    return job["id"]


def wait_job(env: Env, job_id: str, workers: list[Worker], timeout: float = JOB_TIMEOUT_S
             ) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = env.js.get_any(job_id)
        if job["state"] in TERMINAL:
            return job
        for w in workers:
            assert w.proc.poll() is None, f"worker exited:\n{w.tail()}"
        time.sleep(0.05)
    logs = "\n---\n".join(w.tail() for w in workers)
    raise AssertionError(f"job {job_id} still {env.js.get_any(job_id)['state']}:\n{logs}")


def wait_unlocked(env: Env, index: str, timeout: float = JOB_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while env.js.r.get(f"rise:lock:{TENANT}:{index}") is not None:
        assert time.monotonic() < deadline, f"index {index} still locked"
        time.sleep(0.05)


def local_index(env: Env, lm, rows: list[dict], shard_size: int, name: str) -> LocalStore:
    data = write_jsonl(env.tmp / f"{name}.jsonl", rows)
    store = LocalStore(env.tmp / f"local-{name}")
    ingest.create_index(store, lm, data, FieldMap(), CONFIG, shard_size=shard_size,
                   batch_size=BATCH)
    return store


def built(env: Env, app, lm, worker: Worker, name: str, rows: list[dict], shard_size: int
          ) -> tuple[S3Store, LocalStore]:
    """Index ``name`` built by the workers and its embedded twin, building what a test
    run alone has not built yet."""
    s3 = env.s3(index_prefix(TENANT, name))
    if not s3.list(constants.MANIFEST_PREFIX):
        uri = env.upload(f"data/{name}.jsonl", rows)
        job = wait_job(env, submit(env, app, name, uri, shard_size), [worker])
        assert job["state"] == SUCCEEDED, (job, worker.tail())
    local = LocalStore(env.tmp / f"local-{name}")
    if not local.list(constants.MANIFEST_PREFIX):
        local = local_index(env, lm, rows, shard_size, name)
    return s3, local


def assert_same_index(s3: S3Store, local: LocalStore, generation: int = 1) -> None:
    keys = local.list(constants.SHARD_DIR + "/")
    assert keys and s3.list(constants.SHARD_DIR + "/") == keys
    for key in keys:
        assert s3.get(key) == local.get(key), key
    assert I.manifest_generations(s3) == I.manifest_generations(local)
    mine, theirs = I.read_manifest(s3, generation), I.read_manifest(local, generation)
    assert mine.shards == theirs.shards
    for field in ("model", "config", "config_sha256", "tombstones", "live_count"):
        assert getattr(mine, field) == getattr(theirs, field), field
    assert len(mine.ingests) == len(theirs.ingests)
    for ing_m, ing_t in zip(mine.ingests, theirs.ingests, strict=True):
        assert ing_m.dataset_uri.startswith("s3://")
        for field in ("generation", "dataset_sha256", "records", "shard_size", "fields",
                      "truncated"):
            assert getattr(ing_m, field) == getattr(ing_t, field), field


def test_create_index_matches_embedded(env, worker, app, lm):
    rows = texts(10)
    uri = env.upload("data/x.jsonl", rows)
    job_id = submit(env, app, "one", uri, shard_size=3)
    job = wait_job(env, job_id, [worker])
    assert job["state"] == SUCCEEDED, (job, worker.tail())
    assert job["generation"] == 1
    assert job["shards_total"] == 4 and job["shards_done"] == job["shards_total"]
    assert job["examples_total"] == 10 and job["examples_done"] == 10
    assert job["tokens_done"] > 0 and job["started_at"] > 0
    wait_unlocked(env, "one", timeout=0.5)
    assert_same_index(env.s3(index_prefix(TENANT, "one")), local_index(env, lm, rows, 3, "one"))


def test_two_workers_share_a_job(env, worker, app, lm):
    rows = texts(10)
    uri = env.upload("data/two.jsonl", rows)
    second = env.start_worker("w2")
    try:
        second.wait_ready(app)
        worker.wait_ready(app)
        before = worker.shards_done()
        job_id = submit(env, app, "two", uri, shard_size=2)
        job = wait_job(env, job_id, [worker, second])
        assert job["state"] == SUCCEEDED, (job, worker.tail(), second.tail())
        assert job["shards_total"] == 5 and job["shards_done"] == 5
        # Both took part: whichever runs the plan, the other is idle when the shards
        # are queued and takes one at once.
        split = (worker.shards_done() - before, second.shards_done())
        assert sum(split) == 5 and min(split) >= 1, split
    finally:
        second.stop()
    assert_same_index(env.s3(index_prefix(TENANT, "two")), local_index(env, lm, rows, 2, "two"))


def test_bad_dataset_fails_and_unlocks(env, worker, app):
    rows = texts(4) + [{"id": "doc-1", "text": "a second doc-1"}]
    uri = env.upload("data/dup.jsonl", rows)
    job_id = submit(env, app, "bad", uri, shard_size=2)
    job = wait_job(env, job_id, [worker])
    assert job["state"] == FAILED
    assert job["error_code"] == "INVALID_ARGUMENT"
    assert "'doc-1'" in job["error_message"] and "duplicate" in job["error_message"]
    wait_unlocked(env, "bad", timeout=1.0)
    assert env.js.lock_index(TENANT, "bad", "next-job", 60) is None
    assert not env.s3(index_prefix(TENANT, "bad")).list(constants.MANIFEST_PREFIX)

    missing = submit(env, app, "missing", f"s3://{BUCKET}/data/nope.jsonl", shard_size=2)
    job = wait_job(env, missing, [worker])
    assert (job["state"], job["error_code"]) == (FAILED, "NOT_FOUND"), job
    wait_unlocked(env, "missing", timeout=1.0)


def test_a_bad_record_met_by_a_shard_task_leaves_nothing_behind(env, worker, app):
    """Records are tokenised by the shard tasks (planning only reads): a record with no
    supervised position fails the job from its shard task, and the shards the other
    tasks had written are deleted before the index is let go."""
    rows = texts(6) + [{"id": "short", "text": "a"}]
    uri = env.upload("data/short.jsonl", rows)
    job = wait_job(env, submit(env, app, "short", uri, shard_size=2), [worker])
    assert (job["state"], job["error_code"]) == (FAILED, "INVALID_ARGUMENT"), job
    assert "'short'" in job["error_message"] and "supervised" in job["error_message"]
    wait_unlocked(env, "short", timeout=1.0)
    assert env.s3(index_prefix(TENANT, "short")).list("shards/") == []


def test_unexpected_error_fails_job_and_is_recorded(env, worker, app):
    """A non-RiseError: the job is FAILED with INTERNAL, the index unlocked, and the
    exception re-raised so Celery records the task as failed."""
    job = env.js.create(TENANT, "CREATE_INDEX", "broken", plan={"bogus": 1},
                        request={"prefix": index_prefix(TENANT, "broken"), "pool": POOL})
    assert env.js.lock_index(TENANT, "broken", job["id"], 3600) is None
    env.js.set_state(job["id"], "RUNNING")
    res = app.send_task("rise.ingest.shard", args=[job["id"], 0], queue=f"rise.pool.{POOL}")
    # The plan's model rejects the record (a pydantic ValidationError, which Celery hands
    # back as a plain Exception naming it): not a RiseError.
    with pytest.raises(Exception, match="ValidationError"):
        res.get(timeout=JOB_TIMEOUT_S)
    assert res.state == "FAILURE"
    job = wait_job(env, job["id"], [worker])
    assert (job["state"], job["error_code"]) == (FAILED, "INTERNAL"), job
    assert "rise.ingest.shard" in job["error_message"]
    wait_unlocked(env, "broken", timeout=1.0)


LIMITS_QUEUE = "rise.test.limits"
HARD_LIMIT_S = 4  # soft limit 3 s (app.make_app)


@pytest.fixture(scope="module")
def limited_worker(env):
    """A worker with a 4 s task time limit that also runs the overrunning test task."""
    w = env.start_worker("limits", queues=LIMITS_QUEUE, extra=["-I", "stuck_tasks"],
                         RISE_TASK_TIME_LIMIT_SECONDS=str(HARD_LIMIT_S),
                         PYTHONPATH=os.pathsep.join([str(Path(__file__).parent),
                                                     env.env.get("PYTHONPATH", "")]))
    try:
        yield w
    finally:
        w.stop()


@pytest.mark.parametrize("ignore_soft_limit", [False, True], ids=["soft-limit", "hard-kill"])
def test_a_task_over_its_time_limit_fails_its_job_and_frees_the_index(
        env, app, limited_worker, ignore_soft_limit):
    """The soft limit raises inside the task; a task deaf to it is killed at the hard limit
    by the worker's main process.  Either way the job ends FAILED (DEADLINE_EXCEEDED) and
    the index is unlocked, not left RUNNING until the lock expires."""
    limited_worker.wait_ready(app)
    name = f"slow-{int(ignore_soft_limit)}"
    job = env.js.create(TENANT, "CREATE_INDEX", name, request={"prefix": index_prefix(TENANT, name),
                                                               "pool": POOL})
    assert env.js.lock_index(TENANT, name, job["id"], 3600) is None
    env.js.set_state(job["id"], "RUNNING")
    started = time.monotonic()
    app.send_task("rise.test.overrun", args=[job["id"], 60, ignore_soft_limit],
                  queue=LIMITS_QUEUE)
    done = wait_job(env, job["id"], [limited_worker], timeout=40)
    assert (done["state"], done["error_code"]) == (FAILED, "DEADLINE_EXCEEDED"), done
    assert "rise.test.overrun exceeded the task time limit (4 s)" in done["error_message"]
    assert time.monotonic() - started < 30  # the limit ended it, not the 60 s sleep
    wait_unlocked(env, name, timeout=5.0)
    if ignore_soft_limit:
        assert "Hard time limit" in limited_worker.tail(200)


def test_retry_policy():
    from rise.errors import StorageError
    from rise.worker import tasks

    # Query sketching: a short automatic policy (its caller waits at most the query timeout).
    t = tasks.sketch
    assert StorageError in t.autoretry_for and InvalidInput not in t.autoretry_for
    assert (t.max_retries, t.retry_backoff, t.retry_backoff_max) == (5, True, 60)
    # Job tasks wait an outage out up to the storage retry budget (rise.worker.work's
    # schedule, applied in _job_task), not 5 quick retries: an S3 outage of 30 s is survived.
    for t in (tasks.prepare, tasks.shard, tasks.commit, tasks.compact):
        assert not getattr(t, "autoretry_for", ())
    assert StorageError in tasks.RETRYABLE and InvalidInput not in tasks.RETRYABLE


def test_query_sketch_matches_embedded(env, worker, app, lm):
    prefix = index_prefix(TENANT, "one")
    store, _ = built(env, app, lm, worker, "one", texts(10), 3)
    queries = [{"id": "q1", "text": "Which examples taught the model about foxes?"},
               {"text": "Sketches and residuals of the head."}]
    fields = FieldMap().to_dict()
    res = app.send_task("rise.queries.sketch", args=[TENANT, prefix, queries, fields],
                        queue=f"rise.queries.{POOL}")
    got = queryset_from_bytes(base64.b64decode(res.get(timeout=JOB_TIMEOUT_S)))

    path = write_jsonl(env.tmp / "queries.jsonl", queries)
    want = api.sketch_queries(I.open_index(store), lm, read_records(path, FieldMap()),
                              FieldMap(), batch_size=BATCH)
    from rise.score import queryset_to_bytes

    want = queryset_from_bytes(queryset_to_bytes(want, CONFIG.storage_dtype))
    assert got.ids == want.ids == ["q1", "1"]
    assert torch.equal(got.norms, want.norms)
    assert torch.equal(got.rh, want.rh) and torch.equal(got.gh, want.gh)

    bad = app.send_task("rise.queries.sketch",
                        args=[TENANT, prefix, [{"id": "q", "text": "  "}], fields],
                        queue=f"rise.queries.{POOL}")
    with pytest.raises(InvalidInput, match="empty or whitespace-only"):
        bad.get(timeout=JOB_TIMEOUT_S)
    other = app.send_task("rise.queries.sketch",
                          args=["intruder", prefix, queries, fields], queue=f"rise.queries.{POOL}")
    with pytest.raises(InvalidInput, match="not an index of tenant"):
        other.get(timeout=JOB_TIMEOUT_S)


def test_metrics_endpoint(env, worker, app):
    # One task through the worker, so the child's metric files exist too.
    assert app.send_task("rise.index.compact", args=["no-such-job"],
                         queue="rise.control").get(timeout=JOB_TIMEOUT_S) == "skipped"
    text = worker.metrics()
    exported = set(re.findall(r"^([a-z_]+?)(?:_bucket|_count|_sum)?[{ ]", text, re.M))
    expected = names_for("worker")
    assert expected and set(expected) <= exported, sorted(set(expected) - exported)
    assert re.search(r'^rise_tasks_total\{outcome="skipped",pool="[^"]*",'
                     r'task="rise.index.compact"\} '
                     r'[1-9]', text, re.M), text


def test_cancel_ends_cancelled_without_manifest(env, worker, app):
    uri = env.upload("data/big.jsonl", texts(60))
    # Cancelled before the plan task runs.
    early = submit(env, app, "cancel-early", uri, shard_size=4)
    assert env.js.set_state(early, CANCELLED)
    # Cancelled once running: the chord is launched, shards see the state and stop.
    late = submit(env, app, "cancel-late", uri, shard_size=4)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while env.js.get_any(late)["state"] == "QUEUED":
        assert time.monotonic() < deadline, worker.tail()
        time.sleep(0.01)
    assert env.js.set_state(late, CANCELLED)
    for job_id, index in ((early, "cancel-early"), (late, "cancel-late")):
        wait_unlocked(env, index)  # the plan (early) or the commit (late) lets go
        job = env.js.get_any(job_id)
        assert job["state"] == CANCELLED
        assert not env.s3(index_prefix(TENANT, index)).list(constants.MANIFEST_PREFIX)


def test_append_delete_compact_match_embedded(env, worker, app, lm):
    s3, local = built(env, app, lm, worker, "two", texts(10), 2)
    gen = I.read_manifest(local, I.manifest_generations(local)[-1]).generation
    assert I.manifest_generations(s3)[-1] == gen == 1

    rows = [{"id": f"new-{i}", "text": f"appended {i}: {TEXTS[-1 - i]}"} for i in range(5)]
    uri = env.upload("data/more.jsonl", rows)
    job = wait_job(env, submit(env, app, "two", uri, 99, append=True), [worker])
    assert job["state"] == SUCCEEDED, (job, worker.tail())
    assert (job["generation"], job["shards_total"], job["shards_done"]) == (2, 3, 3)
    ingest.append(local, lm, write_jsonl(env.tmp / "more.jsonl", rows), batch_size=BATCH)
    assert_same_index(s3, local, 2)

    clash = env.upload("data/clash.jsonl", [{"id": "doc-0", "text": "again"}])
    job = wait_job(env, submit(env, app, "two", clash, 2, append=True), [worker])
    assert (job["state"], job["error_code"]) == (FAILED, "INVALID_ARGUMENT"), job
    assert "'doc-0'" in job["error_message"]
    wait_unlocked(env, "two", timeout=1.0)

    for store in (s3, local):
        assert I.delete(store, ["doc-3", "new-1"]) == 3
    job = env.js.create(TENANT, "COMPACT", "two",
                        request={"prefix": index_prefix(TENANT, "two"), "pool": POOL})
    assert env.js.lock_index(TENANT, "two", job["id"], 3600) is None
    app.send_task("rise.index.compact", args=[job["id"]], queue="rise.control")
    job = wait_job(env, job["id"], [worker])
    assert (job["state"], job["generation"]) == (SUCCEEDED, 4), (job, worker.tail())
    assert I.compact(local) == 4
    assert_same_index(s3, local, 4)
    wait_unlocked(env, "two", timeout=1.0)


def test_datasets_uris_and_file_store(tmp_path):
    """rise.datasets without servers: URI rules, local paths, the file:// store."""
    from rise.datasets import materialize, open_store
    from rise.errors import NotFound

    settings = Settings(s3_endpoint=f"file://{tmp_path}", s3_bucket=BUCKET,
                        cache_dir=str(tmp_path / "cache"))
    data = write_jsonl(tmp_path / "d.jsonl", texts(2))
    assert materialize(str(data), settings) == data
    assert materialize(f"file://{data}", settings) == data
    (tmp_path / "data").mkdir()
    inside = write_jsonl(tmp_path / "data" / "x.jsonl.gz", [])
    assert materialize(f"s3://{BUCKET}/data/x.jsonl.gz", settings) == inside
    for bad in ("", "s3://", f"s3://{BUCKET}", f"s3://{BUCKET}/data/", "http://h/x.jsonl",
                f"s3://{BUCKET}/data/x.csv"):
        with pytest.raises(InvalidInput):
            materialize(bad, settings)
    for missing in (str(tmp_path / "nope.jsonl"), f"s3://{BUCKET}/data/nope.jsonl",
                    "s3://other/data/x.jsonl.gz"):
        with pytest.raises(NotFound):
            materialize(missing, settings)
    store = open_store(settings, index_prefix(TENANT, "idx"))
    store.put("a/b", b"1")
    assert (tmp_path / "tenants" / TENANT / "indexes" / "idx" / "a" / "b").read_bytes() == b"1"
    assert isinstance(open_store(Settings(s3_endpoint="127.0.0.1:9"), "p/"), S3Store)


SLOW = "slow"  # a pool of its own queues, so no idle worker can take its queries
SLOW_BATCH = 2
SLOW_SLEEP_S = 0.5  # added to every forward pass (slow_batches.py)
SLOW_QUEUES = {"pool": "rise.test.slow.pool", "queries": f"rise.test.slowq.{SLOW}",
               "control": "rise.test.slow.control"}


@pytest.fixture(scope="module")
def slow_worker(env):
    """One worker process (concurrency 1) of pool ``slow``, every batch 0.5 s longer."""
    pools = json.loads(env.env["RISE_POOLS"])
    pools[SLOW] = dict(pools[POOL], batch_size=SLOW_BATCH, queue=SLOW_QUEUES["pool"])
    w = env.start_worker(
        "slow", queues=",".join(SLOW_QUEUES.values()), extra=["-I", "slow_batches"],
        RISE_POOLS=json.dumps(pools), RISE_WORKER_POOL=SLOW,
        RISE_QUERY_QUEUE="rise.test.slowq", RISE_CONTROL_QUEUE=SLOW_QUEUES["control"],
        TEST_BATCH_SLEEP_S=str(SLOW_SLEEP_S),
        PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), env.env.get("PYTHONPATH", "")]))
    try:
        yield w
    finally:
        w.stop()


def test_a_query_is_answered_between_batches_of_a_running_shard(env, app, lm, slow_worker):
    """The pool's only worker process is deep in a long shard (one shard of 40 records,
    20 batches of 0.5 s or more); a query sent meanwhile is answered before the shard
    ends, after about one batch (the running one, then its own), by the shard task itself
    (QueryDrain) with the model it holds, and equals the embedded sketch.  Errors come
    back as the task's would."""
    # The queried index, built here into the store (same model, so the worker accepts it).
    qprefix = index_prefix(TENANT, "slow-queried")
    qstore = env.s3(qprefix)
    if not qstore.list(constants.MANIFEST_PREFIX):
        ingest.create_index(qstore, lm, write_jsonl(env.tmp / "slow-q.jsonl", texts(6)),
                            FieldMap(), CONFIG, shard_size=3, batch_size=BATCH)
    # The long job: one shard of 40 records.
    name, rows = "slow-long", texts(40)
    uri = env.upload("data/slow-long.jsonl", rows)
    request = {"prefix": index_prefix(TENANT, name), "dataset_uri": uri,
               "fields": FieldMap().to_dict(), "config": CONFIG.to_dict(), "shard_size": 40,
               "pool": SLOW, "append": False}
    job = env.js.create(TENANT, "CREATE_INDEX", name, request=request)
    assert env.js.register_index(TENANT, name, SLOW)
    assert env.js.lock_index(TENANT, name, job["id"], 3600) is None
    slow_worker.wait_ready(app)
    app.send_task("rise.ingest.prepare", args=[job["id"]], queue=SLOW_QUEUES["pool"])
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while env.js.get_any(job["id"])["examples_done"] < 2 * SLOW_BATCH:  # mid-shard
        assert env.js.get_any(job["id"])["state"] not in TERMINAL, slow_worker.tail()
        assert time.monotonic() < deadline, slow_worker.tail()
        time.sleep(0.02)

    queries = [{"id": "q1", "text": "Which examples taught the model about foxes?"}]
    fields = FieldMap().to_dict()
    t0 = time.monotonic()
    res = app.send_task("rise.queries.sketch", args=[TENANT, qprefix, queries, fields],
                        queue=SLOW_QUEUES["queries"])
    got = queryset_from_bytes(base64.b64decode(res.get(timeout=JOB_TIMEOUT_S)))
    waited = time.monotonic() - t0
    running = env.js.get_any(job["id"])
    assert running["state"] not in TERMINAL and running["examples_done"] < len(rows), running
    # One shard batch and the query's own batch, 0.5 s each and more; the rest of the
    # shard was 16 batches or more.
    assert waited < 4 * SLOW_SLEEP_S + 1.0, waited

    want = api.sketch_queries(I.open_index(qstore), lm,
                              read_records(write_jsonl(env.tmp / "slow-q1.jsonl", queries),
                                           FieldMap()), FieldMap(), batch_size=SLOW_BATCH)
    from rise.score import queryset_to_bytes

    want = queryset_from_bytes(queryset_to_bytes(want, CONFIG.storage_dtype))
    assert got.ids == want.ids == ["q1"]
    assert torch.equal(got.rh, want.rh) and torch.equal(got.gh, want.gh)

    # Errors between batches reach the caller as the task's own would.
    bad = app.send_task("rise.queries.sketch",
                        args=[TENANT, qprefix, [{"id": "q", "text": "  "}], fields],
                        queue=SLOW_QUEUES["queries"])
    other = app.send_task("rise.queries.sketch", args=["intruder", qprefix, queries, fields],
                          queue=SLOW_QUEUES["queries"])
    with pytest.raises(InvalidInput, match="empty or whitespace-only"):
        bad.get(timeout=JOB_TIMEOUT_S)
    with pytest.raises(InvalidInput, match="not an index of tenant"):
        other.get(timeout=JOB_TIMEOUT_S)
    assert env.js.get_any(job["id"])["state"] not in TERMINAL

    done = wait_job(env, job["id"], [slow_worker], timeout=JOB_TIMEOUT_S)
    assert done["state"] == SUCCEEDED, (done, slow_worker.tail())
    assert done["examples_done"] == len(rows) and done["shards_done"] == 1

    # Idle again: the task itself answers, as before.
    again = app.send_task("rise.queries.sketch", args=[TENANT, qprefix, queries, fields],
                          queue=SLOW_QUEUES["queries"])
    assert queryset_from_bytes(base64.b64decode(again.get(timeout=JOB_TIMEOUT_S))).ids == ["q1"]
