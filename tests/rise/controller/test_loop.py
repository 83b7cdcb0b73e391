"""The job controller against a real Redis and a folder as the store: lost tasks enqueued
again (and only those), a lost chord callback committed, deadlines, fencing of stale
writers, the registry rebuilt from the store, and the sweeper."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
import redis
from conftest import TEXTS, write_jsonl
from rise import constants, ingest
from rise.config import make_config
from rise.controller import Controller, message_task, waiting_tasks
from rise.data import FieldMap
from rise.datasets import open_store
from rise.errors import NotFound
from rise.index import manifest_generations, open_index
from rise.jobrecords import JobRecords
from rise.jobs import CANCELLED, FAILED, RUNNING, SUCCEEDED, Fenced, JobStore, index_prefix
from rise.model import load_model
from rise.registry import RECORD_KEY, Registry
from rise.settings import Pool, Settings
from rise.taskclient import INGEST_SHARD, TaskClient
from rise.worker.work import retry_delays
from servers import redis_server  # noqa: F401

pytestmark = pytest.mark.integration

TENANT, POOL = "t", "tiny"


class Clock:
    """Real time plus an offset the test moves forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


class Env:
    def __init__(self, url: str, root: Path) -> None:
        self.settings = Settings(
            redis_url=url, s3_endpoint=f"file://{root}", pools={POOL: Pool(model="unused")},
            controller_interval_seconds=1, shard_stall_seconds=10, shard_attempts=2,
            job_deadline_seconds=1000, sweep_grace_seconds=0)
        self.r = redis.Redis.from_url(url, decode_responses=True)
        self.js = JobStore(self.r, namespace=f"t{uuid.uuid4().hex[:8]}")
        self.sent: list[tuple[str, list, str]] = []
        self.clock = Clock()
        self.store = lambda prefix: open_store(self.settings, prefix)
        self.ctl = Controller(self.settings, self.js, self.send, self.store, clock=self.clock)

    def send(self, name: str, *, args: list, queue: str) -> None:
        self.sent.append((name, args, queue))

    def job(self, index: str, kind: str = "CREATE_INDEX", **fields) -> dict:
        request = {"prefix": index_prefix(TENANT, index), "pool": POOL}
        job = self.js.create(TENANT, kind, index, request=request, **fields)
        assert self.js.lock_index(TENANT, index, job["id"], 3600) is None
        return self.js.get_any(job["id"])


@pytest.fixture
def env(redis_server, tmp_path):  # noqa: F811
    e = Env(redis_server.url, tmp_path / "bucket")
    yield e
    for key in e.r.scan_iter(f"{e.js.ns}:*"):
        e.r.delete(key)


@pytest.fixture(scope="module")
def lm(tiny_model):
    return load_model(str(tiny_model), dtype="float32")


def test_lost_shards_are_enqueued_again_and_only_they(env):
    job = env.job("docs", plan={"generation": 1}, shards_total=4)
    env.js.set_state(job["id"], RUNNING)
    for n in range(4):
        env.js.note_enqueued(job["id"], str(n), by_controller=False)
    env.js.mark_shard_done(job["id"], 0)  # done
    env.js.heartbeat(job["id"], "1", ttl_seconds=60)  # a live worker is on it
    # Shard 2 is waiting in its queue: a real message, as Celery publishes it.
    queue = env.settings.queue_of(POOL)
    client = TaskClient(env.settings.model_copy(update={"redis_url": env.settings.redis_url}))
    client.send(INGEST_SHARD, args=[job["id"], 2], queue=queue)
    try:
        assert (INGEST_SHARD, (job["id"], 2)) in waiting_tasks(env.r, queue)
        # Within the stall time nothing is lost.
        assert env.ctl.tick().requeued == []
        env.clock.offset = 30
        report = env.ctl.tick()
        assert report.requeued == [(job["id"], "3")]  # the dead worker's shard, only it
        assert env.sent == [(INGEST_SHARD, [job["id"], 3], queue)]
        # Enqueued again just now: not again at the next tick.
        assert env.ctl.tick().requeued == []
        # Lost again and again: past the attempts budget the job fails, index unlocked.
        env.clock.offset = 60
        assert env.ctl.tick().requeued == [(job["id"], "3")]
        env.clock.offset = 90
        report = env.ctl.tick()
        assert report.failed == [(job["id"], "UNAVAILABLE")]
        got = env.js.get_any(job["id"])
        assert got["state"] == FAILED and "shard 3" in got["error_message"]
        assert env.r.get(f"{env.js.ns}:lock:{TENANT}:docs") is None
    finally:
        env.r.delete(queue)


def test_a_lost_prepare_is_enqueued_again(env):
    job = env.job("docs")
    env.js.note_enqueued(job["id"], "prepare", by_controller=False)
    assert env.ctl.tick().requeued == []
    env.clock.offset = 30
    assert env.ctl.tick().requeued == [(job["id"], "prepare")]
    assert env.sent[-1][:2] == ("rise.ingest.prepare", [job["id"]])


def test_past_the_deadline_the_job_fails_and_frees_its_name(env):
    registry = Registry(env.js, env.store)
    registry.claim(TENANT, "late", POOL)
    job = env.job("late")
    registry.set_job(TENANT, "late", job["id"])
    env.clock.offset = 2000
    report = env.ctl.tick()
    assert report.failed == [(job["id"], "DEADLINE_EXCEEDED")] and report.names_freed == 1
    assert env.js.get_any(job["id"])["state"] == FAILED
    with pytest.raises(NotFound):
        registry.lookup(TENANT, "late")
    assert not env.store(index_prefix(TENANT, "late")).exists(RECORD_KEY)


def shards_of(env, lm, tmp_path, index: str) -> ingest.IngestPlan:
    data = write_jsonl(tmp_path / "d.jsonl", [{"id": f"d{i}", "text": t}
                                              for i, t in enumerate(TEXTS[:5])])
    store = env.store(index_prefix(TENANT, index))
    p, records = ingest.plan(store, lm, data, fields=FieldMap(), config=make_config(),
                             shard_size=2)
    for n in range(p.n_shards):
        ingest.write_shard(store, lm, p, n, records[p.shard_range(n).start:
                                                    p.shard_range(n).stop])
    return p


def test_a_lost_chord_callback_is_committed_by_the_controller(env, lm, tmp_path):
    p = shards_of(env, lm, tmp_path, "docs")
    job = env.job("docs", plan=p.model_dump(mode="json"), shards_total=p.n_shards)
    env.js.set_state(job["id"], RUNNING)
    for n in range(p.n_shards):
        env.js.mark_shard_done(job["id"], n)
    assert env.ctl.tick().committed == []  # the callback gets one interval first
    env.clock.offset = 2
    assert env.ctl.tick().committed == [job["id"]]
    got = env.js.get_any(job["id"])
    assert (got["state"], got["generation"]) == (SUCCEEDED, 1)
    index = open_index(env.store(index_prefix(TENANT, "docs")))
    assert index.live_count == 5 and len(index.manifest.shards) == p.n_shards
    assert env.r.get(f"{env.js.ns}:lock:{TENANT}:docs") is None
    assert job["id"] not in env.js.active_ids()


def test_a_shard_done_but_missing_from_the_store_is_redone(env, lm, tmp_path):
    p = shards_of(env, lm, tmp_path, "docs")
    store = env.store(index_prefix(TENANT, "docs"))
    store.delete(p.shard_key(1))
    job = env.job("docs", plan=p.model_dump(mode="json"), shards_total=p.n_shards)
    env.js.set_state(job["id"], RUNNING)
    for n in range(p.n_shards):
        env.js.mark_shard_done(job["id"], n)
    env.ctl.tick()
    env.clock.offset = 2
    assert env.ctl.tick().committed == []
    assert env.js.shards_done(job["id"]) == set(range(p.n_shards)) - {1}
    assert manifest_generations(store) == []


def test_a_stale_writer_is_fenced(env, lm, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"id": "a", "text": TEXTS[0]}])
    store = env.store(index_prefix(TENANT, "docs"))
    p, records = ingest.plan(store, lm, data, fields=FieldMap(), config=make_config())
    job = env.job("docs")
    env.js.check_fence(job["id"])  # the owner may write
    env.js.set_state(job["id"], CANCELLED)
    env.js.unlock_index(TENANT, "docs", job["id"])
    with pytest.raises(Fenced):
        ingest.write_shard(store, lm, p, 0, records,
                           before_write=lambda: env.js.check_fence(job["id"]))
    assert store.list("") == []
    # A lock taken over by another job fences the first one too, even if not ended.
    first = env.job("other")
    env.js.unlock_index(TENANT, "other", first["id"])
    second = env.job("other")
    with pytest.raises(Fenced):
        env.js.check_fence(first["id"])
    env.js.check_fence(second["id"])
    ingest.write_shard(store, lm, p, 0, records)
    with pytest.raises(Fenced):
        ingest.commit(store, p, before_write=lambda: env.js.check_fence(first["id"]))
    assert manifest_generations(store) == []


def test_registry_survives_redis_losing_its_data(env):
    registry = Registry(env.js, env.store)
    registry.claim(TENANT, "a1", POOL, "model-a")
    registry.claim("u", "b1", POOL)
    registry.ensure_rebuilt()
    for key in env.r.scan_iter(f"{env.js.ns}:*"):  # Redis restarted empty
        env.r.delete(key)
    assert not env.js.registry_complete()
    # A name is found again at once (from the store), before any rebuild...
    assert registry.lookup(TENANT, "a1")["pool"] == POOL
    # ... and the whole list comes back with the controller's (or the gateway's) rebuild.
    env.ctl.tick()
    assert env.js.registry_complete()
    assert registry.names(TENANT) == ["a1"] and registry.names("u") == ["b1"]
    # The store's record keeps the name taken even when Redis forgot it.
    env.js.drop_index(TENANT, "a1")
    with pytest.raises(Exception, match="already exists"):
        registry.claim(TENANT, "a1", POOL)
    assert registry.lookup(TENANT, "a1")["model"] == "model-a"


def test_sweeper_deletes_only_what_nothing_owns(env, lm, tmp_path):
    p = shards_of(env, lm, tmp_path, "kept")
    store = env.store(index_prefix(TENANT, "kept"))
    Registry(env.js, env.store).claim(TENANT, "kept", POOL)
    ingest.commit(store, p)
    store.put("shards/g00000009/shard-000000.safetensors", b"stale")  # no manifest names it
    store.put("ann/g00000001-ivf-flat.faiss", b"ann")  # rise.ann beside the shards: owned
    # A deleted index whose stale writer put a shard afterwards: no record, no manifest.
    gone = env.store(index_prefix(TENANT, "gone"))
    gone.put("shards/g00000001/shard-000000.safetensors", b"late")
    # An index being created right now: a live job owns its shards.
    busy = env.store(index_prefix(TENANT, "busy"))
    env.job("busy")
    busy.put("shards/g00000001/shard-000000.safetensors", b"in progress")
    # An index of older code: manifests but no registry record: never swept.
    old = env.store(index_prefix(TENANT, "old"))
    ingest.commit(old, shards_of(env, lm, tmp_path, "old"))
    before_old = old.list("")
    assert env.ctl.sweep() == 2
    assert "shards/g00000009/shard-000000.safetensors" not in store.list("")
    assert "ann/g00000001-ivf-flat.faiss" in store.list("")
    assert open_index(store).live_count == 5 and gone.list("") == []
    assert busy.list("") == ["shards/g00000001/shard-000000.safetensors"]
    assert old.list("") == before_old
    # Objects younger than the grace are never swept.
    env.settings = env.settings.model_copy(update={"sweep_grace_seconds": 3600})
    env.ctl.s = env.settings
    gone.put("shards/g00000001/shard-000001.safetensors", b"late again")
    assert env.ctl.sweep() == 0


def test_progress_counts_each_example_once(env):
    job = env.job("docs")
    env.js.shard_progress(job["id"], 0, 3, 30)
    env.js.shard_progress(job["id"], 0, 4, 40)  # first attempt, then it dies
    env.js.shard_progress(job["id"], 0, 2, 20)  # the retry starts from 0 again
    env.js.shard_progress(job["id"], 0, 4, 40)
    env.js.shard_progress(job["id"], 1, 4, 44)
    got = env.js.get_any(job["id"])
    assert (got["examples_done"], got["tokens_done"]) == (8, 84)


def test_message_task_reads_celery_messages():
    assert message_task("not json") is None
    assert message_task('{"headers": {"task": "x", "argsrepr": "(\'j\', 3)"}}') == ("x", ("j", 3))


def test_retry_budget_schedule():
    assert retry_delays(0) == []
    delays = retry_delays(300)
    assert sum(delays) >= 300 and sum(delays[:-1]) < 300 and max(delays) == 30
    assert delays[:5] == [1, 2, 4, 8, 16]


def test_shard_key_layout_is_what_the_sweeper_parses():
    assert constants.shard_key(3, 7).startswith(constants.SHARD_DIR + "/")


def test_jobs_come_back_from_their_records_after_redis_lost_its_data(env, lm, tmp_path):
    records = JobRecords(env.store(""))
    cancelled = env.job("c1")
    env.js.set_state(cancelled["id"], CANCELLED)
    records.ended(env.js.get_any(cancelled["id"]))
    unfinished = env.job("c2")
    records.submitted(unfinished)
    p = shards_of(env, lm, tmp_path, "c3")
    committed = env.job("c3")
    records.submitted(committed)
    ingest.commit(env.store(index_prefix(TENANT, "c3")), p)  # committed just before the loss
    for key in env.r.scan_iter(f"{env.js.ns}:*"):  # Redis restarted empty
        env.r.delete(key)
    report = env.ctl.tick()
    assert report.restored == 3
    assert env.js.get_any(cancelled["id"])["state"] == CANCELLED
    got = env.js.get_any(committed["id"])
    assert (got["state"], got["generation"]) == (SUCCEEDED, 1)
    got = env.js.get_any(unfinished["id"])
    assert got["state"] == "QUEUED" and got["request"]["prefix"] == index_prefix(TENANT, "c2")
    assert env.sent == [("rise.ingest.prepare", [unfinished["id"]], env.settings.queue_of(POOL))]
    env.js.check_fence(unfinished["id"])  # it holds its index again
    assert env.ctl.tick().restored == 0  # once


def test_a_job_ended_in_its_record_is_ended_again(env):
    """Redis restarted from a snapshot taken before the cancel: the record wins."""
    job = env.job("docs")
    env.js.set_state(job["id"], RUNNING)
    records = JobRecords(env.store(""))
    records.ended({**env.js.get_any(job["id"]), "state": CANCELLED})
    env.ctl.tick()
    assert env.js.get_any(job["id"])["state"] == CANCELLED
    assert env.r.get(f"{env.js.ns}:lock:{TENANT}:docs") is None
    assert job["id"] not in env.js.active_ids()


def test_ended_jobs_go_to_their_records_and_the_duration_histogram_once(env):
    from rise.metrics import for_service

    metrics = for_service("controller")
    ctl = Controller(env.settings, env.js, env.send, env.store, metrics=metrics,
                     clock=env.clock)
    records = JobRecords(env.store(""))
    done, failed = env.job("docs"), env.job("other", kind="COMPACT")
    for job in (done, failed):
        records.submitted(job)
    env.js.set_state(done["id"], SUCCEEDED, finished_at=done["created_at"] + 42)
    env.js.set_state(failed["id"], FAILED, error_code="INTERNAL", error_message="boom",
                     finished_at=failed["created_at"] + 3)
    assert env.r.ttl(f"{env.js.ns}:job:{done['id']}") == -1
    assert ctl.tick().ended == 2
    assert env.r.ttl(f"{env.js.ns}:job:{done['id']}") > 0  # recorded, then set to expire
    assert records.get(TENANT, done["id"]).state == SUCCEEDED
    assert records.get(TENANT, failed["id"]).error_code == "INTERNAL"
    assert env.js.ended_ids() == []
    assert ctl.tick().ended == 0  # observed once
    reg = metrics.registry

    def sample(name, **labels):
        return reg.get_sample_value(name, {"pool": POOL, **labels})

    assert sample("rise_job_duration_seconds_count", kind="CREATE_INDEX", state="SUCCEEDED") == 1
    assert sample("rise_job_duration_seconds_sum", kind="CREATE_INDEX",
                  state="SUCCEEDED") == pytest.approx(42)
    assert sample("rise_job_duration_seconds_count", kind="COMPACT", state="FAILED") == 1
    # a job whose hash expired after it ended is not brought back by a forced restore
    env.r.delete(f"{env.js.ns}:job:{done['id']}")
    env.clock.offset = env.settings.job_ttl_seconds + 60
    ctl.restore_jobs(force=True)
    with pytest.raises(NotFound):
        env.js.get_any(done["id"])
