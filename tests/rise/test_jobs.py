"""Index names: the whole name must match (a trailing newline is not a name)."""

from __future__ import annotations

import pytest
from rise.errors import InvalidInput
from rise.jobs import check_name
from servers import redis_server  # noqa: F401


@pytest.mark.parametrize("name", ["docs\n", "docs\r\n", "\ndocs", "docs/x", "Docs", "",
                                  "-docs", "a" * 64, "docs\x00", "d\u00e9"])
def test_names_are_matched_in_full(name):
    with pytest.raises(InvalidInput, match="index name"):
        check_name(name)


@pytest.mark.parametrize("name", ["docs", "a", "a" * 63, "docs-2.v1_x"])
def test_good_names_pass(name):
    assert check_name(name) == name


def test_a_huge_name_is_not_echoed_whole():
    with pytest.raises(InvalidInput) as e:
        check_name("x" * 100_000 + "/")
    assert len(str(e.value)) < 300


# --- the job store on a real Redis: ended jobs expire, active jobs are counted, not scanned

@pytest.fixture
def js(redis_server):  # noqa: F811
    import uuid

    import redis
    from rise.jobs import JobStore

    r = redis.Redis.from_url(redis_server.url, decode_responses=True)
    store = JobStore(r, namespace=f"t{uuid.uuid4().hex[:8]}", ended_ttl_seconds=600)
    yield store
    for key in r.scan_iter(f"{store.ns}:*"):
        r.delete(key)


def _job(js, pool="p1", kind="CREATE_INDEX", tenant="t"):
    return js.create(tenant, kind, "docs", request={"prefix": "tenants/t/indexes/docs/",
                                                    "pool": pool})


@pytest.mark.integration
def test_ended_jobs_expire_and_leave_the_active_set(js):
    from rise.jobs import RUNNING, SUCCEEDED

    job = _job(js)
    key = f"{js.ns}:job:{job['id']}"
    js.shard_progress(job["id"], 0, 2, 10)
    js.note_enqueued(job["id"], "0", by_controller=False)
    assert js.r.ttl(key) == -1  # a live job never expires
    assert js.set_state(job["id"], RUNNING)
    assert js.r.ttl(key) == -1
    assert js.set_state(job["id"], SUCCEEDED)
    assert js.r.ttl(key) == -1  # not before the controller recorded the end
    assert js.active_ids() == [] and js.ended_ids() == [job["id"]]
    js.expire_ended(job["id"], js.get_any(job["id"])["finished_at"] - 100)
    assert 490 <= js.r.ttl(key) <= 500
    for other in js._job_keys(job["id"]):
        if js.r.exists(other):
            assert 490 <= js.r.ttl(other) <= 500, other
    assert not js.set_state(job["id"], RUNNING)  # terminal stays terminal
    assert js.forget_ended(job["id"]) and not js.forget_ended(job["id"])
    # once the hash is gone the tenant's list forgets the id too
    js.r.delete(key)
    assert js.list("t") == []
    assert js.r.zcard(f"{js.ns}:jobs:t") == 0


@pytest.mark.integration
def test_active_counts_by_pool_and_state(js):
    from rise.jobs import CANCELLED, RUNNING

    a, b, c = _job(js, "p1"), _job(js, "p1"), _job(js, "p2", kind="COMPACT")
    js.set_state(b["id"], RUNNING)
    js.set_state(c["id"], CANCELLED)
    assert js.active_counts() == {("p1", "QUEUED"): 1, ("p1", "RUNNING"): 1}
    assert a["pool"] == "p1"


@pytest.mark.integration
def test_first_task_is_stamped_once(js):
    job = _job(js)
    assert js.mark_first_task(job["id"], 100.0)
    assert not js.mark_first_task(job["id"], 200.0)
    assert js.get_any(job["id"])["first_task_at"] == 100.0
    assert not js.mark_first_task("no-such-job")
    assert not js.r.exists(f"{js.ns}:job:no-such-job")


@pytest.mark.integration
def test_restore_brings_back_ended_jobs_only_within_their_ttl(js):
    import time

    base = {"tenant": "t", "kind": "CREATE_INDEX", "index": "docs", "request": {"pool": "p1"},
            "created_at": time.time() - 5000, "state": "SUCCEEDED"}
    old = dict(base, id="old", finished_at=time.time() - 601)
    recent = dict(base, id="recent", finished_at=time.time() - 100)
    assert not js.restore(old)
    assert js.restore(recent)
    assert 480 <= js.r.ttl(f"{js.ns}:job:recent") <= 500
    assert js.get_any("recent")["pool"] == "p1" and js.active_ids() == []


@pytest.mark.integration
def test_a_lock_without_a_job_leaves_no_job_hash(js):
    """The fuzz run found that every DeleteExamples and DeleteIndex, refused ones included,
    left a hash ``job:delete-<ns>`` holding only a fence: a job of nothing, never expiring,
    that every scan of the jobs met."""
    assert js.lock_index("t", "docs", "delete-1", 60) is None
    assert not js.r.exists(f"{js.ns}:job:delete-1")
    js.unlock_index("t", "docs", "delete-1")
    job = _job(js)
    assert js.lock_index("t", "docs", job["id"], 60) is None
    assert js.r.hget(f"{js.ns}:job:{job['id']}", "fence") == "2"  # a job's lock is fenced


@pytest.mark.integration
def test_job_pages_return_every_job_once_under_concurrent_inserts(js):
    """Pages are cursors (created time, id): jobs created while paging are newer than the
    cursor and never make an older job come twice or be skipped."""
    import threading

    before = {_job(js)["id"] for _ in range(23)}
    _job(js, tenant="other")
    stop = threading.Event()

    def writer() -> None:
        while not stop.is_set():
            _job(js)

    t = threading.Thread(target=writer)
    t.start()
    try:
        seen: list[str] = []
        after = None
        while True:
            page, after = js.page("t", "", 5, after)
            assert len(page) <= 5
            seen += [j["id"] for j in page]
            if after is None:
                break
    finally:
        stop.set()
        t.join()
    assert len(seen) == len(set(seen))
    assert before <= set(seen)
    only_docs, _ = js.page("t", "elsewhere", 5)
    assert only_docs == []
