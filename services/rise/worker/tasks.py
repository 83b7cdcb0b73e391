"""The Celery tasks: thin, named, with only ids and small JSON values as arguments.

======================  =====================================  ==========================
task                    queue                                  does
======================  =====================================  ==========================
rise.ingest.prepare     the pool's (``rise.pool.<pool>``)      check the data, fix the
                                                               plan, launch the chord
rise.ingest.shard       the pool's                             sketch and put one shard
rise.ingest.commit      control (``rise.control``)             write the manifest (chord
                                                               callback, no model)
rise.index.compact      control                                compact the index
rise.queries.sketch     ``<query_queue>.<pool>``               sketch inline queries,
                                                               return base64 features
======================  =====================================  ==========================

A query never waits for a whole shard: a running shard task answers the pool's waiting
query tasks between two of its batches, with the model it holds (``QueryDrain``).

The names are ``rise.taskclient``'s.  The ingest tasks run the functions ``plan``,
``write_shard`` and ``commit`` of the module ``rise.ingest``, as the CLI does.

Failures: a RiseError fails the job (its gRPC code and message) and releases the index,
and the task returns normally (no retry).  StorageError and Redis/S3 connection errors are
retried with exponential backoff (at most 5 times, 60 s apart at most); when retries run
out, or on any other exception, the job is FAILED (UNAVAILABLE, or INTERNAL with a short
message) and the exception re-raised so Celery records it.  A query task has no job: its
RiseError goes back to the caller (``AsyncResult.get`` re-raises the rise.errors class).
"""

from __future__ import annotations

import base64
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import redis
import urllib3
from celery import Task, chord, shared_task, signals
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from kombu import Queue
from kombu.exceptions import KombuError

from rise import ingest, taskclient
from rise.api import compact as compact_index
from rise.api import explain as explain_hit
from rise.api import generate_queries, pick_query, sketch_queries
from rise.data import FieldMap, records_from_dicts
from rise.datasets import materialize, open_store
from rise.errors import Cancelled, InvalidInput, NotFound, RiseError, StorageError
from rise.generate import GenerateSpec
from rise.index import discard_generation, model_entry, open_index
from rise.jobrecords import JobRecords
from rise.jobs import FAILED, RUNNING, SUCCEEDED, TERMINAL, Fenced, JobStore
from rise.model import LoadedModel
from rise.registry import Registry, free_failed_create
from rise.score import ScoreSpec, queryset_to_bytes
from rise.settings import Settings
from rise.store import CountingStore
from rise.worker import telemetry, work

log = logging.getLogger("rise.worker")


RETRYABLE: tuple[type[BaseException], ...] = (
    StorageError, redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
    urllib3.exceptions.HTTPError, ConnectionError, TimeoutError)
"""Exceptions worth retrying: the store or Redis unreachable for a moment."""
# Job tasks retry in ``_job_task`` on their own schedule, up to the storage retry budget
# (``work.retry_delays``; max_retries=None here); past it the job fails with UNAVAILABLE.
# Query sketching retries automatically, briefly: its caller waits at most the gateway's
# query timeout.


class RiseTask(Task):
    """Base of the tasks: metrics by outcome, and the job failed when a task finally fails.

    ``job_arg`` is the position of the job id among the task's arguments (None: no job).
    """

    job_arg: int | None = None

    def settings(self) -> Settings:
        return getattr(self.app, "rise_settings", None) or Settings()

    def job_id_of(self, args: Any, kwargs: Any) -> str | None:
        if self.job_arg is None:
            return None
        if kwargs and "job_id" in kwargs:
            return kwargs["job_id"]
        return args[self.job_arg] if args and len(args) > self.job_arg else None

    def on_retry(self, exc, task_id, args, kwargs, einfo) -> None:
        telemetry.record_outcome(self.name, "retry")
        log.warning("%s retrying after %s: %s", self.name, type(exc).__name__, exc)

    def on_failure(self, exc, task_id, args, kwargs, einfo) -> None:
        """Also runs, in the worker's main process, for a task killed at its hard time
        limit (Celery >= 5.7 calls on_failure for hard timeouts), so no job is left
        RUNNING with its index locked."""
        timed_out = isinstance(exc, SoftTimeLimitExceeded | TimeLimitExceeded)
        code = exc.grpc_code if isinstance(exc, RiseError) else \
            "DEADLINE_EXCEEDED" if timed_out else \
            "UNAVAILABLE" if isinstance(exc, RETRYABLE) else "INTERNAL"
        telemetry.record_outcome(self.name, "error")
        telemetry.record_error(code)
        job_id = self.job_id_of(args, kwargs)
        if job_id is None:
            return
        if isinstance(exc, RiseError):
            message = str(exc)
        elif timed_out:
            limit = self.settings().task_time_limit_seconds
            message = (f"{self.name} exceeded the task time limit ({limit} s); raise "
                       "RISE_TASK_TIME_LIMIT_SECONDS or use smaller shards")
        elif code == "UNAVAILABLE":
            budget = self.settings().storage_retry_budget_seconds
            message = (f"the store or the broker stayed unreachable past the retry budget "
                       f"({budget:g} s): {type(exc).__name__}")
        else:
            message = f"internal error in {self.name} ({type(exc).__name__}); see worker logs"
        try:
            fail_job(self.settings(), work.job_store(self.settings()), job_id, code, message)
        except Exception:  # noqa: BLE001 - Redis down too: the controller ends the job later
            log.exception("cannot mark job %s failed", job_id)


def fail_job(settings: Settings, js: JobStore, job_id: str, code: str, message: str) -> None:
    """FAILED with the error's code and message, the index's writer lock released, and
    the name of a create that never committed freed."""
    try:
        job = js.get_any(job_id)
    except NotFound:
        return
    if not js.set_state(job_id, FAILED, error_code=code, error_message=message):
        return  # ended already (cancelled, say): its own ending did the rest
    _discard_planned(settings, job)  # while the lock is held: no next job writes yet
    js.unlock_index(job["tenant"], job["index"], job_id)
    try:
        free_failed_create(Registry(js, lambda prefix: open_store(settings, prefix)), job)
    except RiseError as e:  # the store is away: the controller frees it later
        log.warning("name of failed job %s not freed yet: %s", job_id, e)


DISCARD_ERRORS: tuple[type[BaseException], ...] = (RiseError, *RETRYABLE)


def _discard_planned(settings: Settings, job: dict[str, Any]) -> None:
    """The shards a failed ingest wrote before it failed (a bad record met by one shard
    task while others had written theirs), deleted before the job lets go of the index
    (so no next job's shards of that generation are taken for them); a shard task still
    running may write after, and the controller's sweeper removes that later."""
    plan = job.get("plan")
    if not isinstance(plan, dict) or not isinstance(plan.get("generation"), int):
        return
    try:
        prefix = work.Request.of(job).prefix
        gone = discard_generation(open_store(settings, prefix), plan["generation"])
    except DISCARD_ERRORS as e:  # the store is away: the sweeper takes them later
        log.warning("shards of failed job %s not discarded yet: %s", job.get("id"), e)
        return
    if gone:
        log.info("discarded %d objects of failed job %s", gone, job.get("id"))


def _unlock(js: JobStore, job: dict[str, Any]) -> None:
    js.unlock_index(job["tenant"], job["index"], job["id"])


JobBody = Callable[[Settings, JobStore, dict[str, Any]], str]


def _job_task(task: RiseTask, job_id: str, body: JobBody, part: str,
              outage_since: float | None = None) -> str:
    """Run ``body(settings, js, job)`` for a job: a RiseError fails the job and returns
    "error"; an unreachable store or broker is retried up to the budget (the task's
    heartbeat for ``part`` covers the wait, so the controller does not take the part for
    lost); unexpected errors propagate (see RiseTask.on_failure)."""
    start = time.perf_counter()
    settings = task.settings()
    js = work.job_store(settings)
    outcome = "error"
    try:
        try:
            try:
                job = js.get_any(job_id)
            except NotFound:
                log.warning("%s: job %s not found; skipped", task.name, job_id)
                outcome = "skipped"
                return outcome
            outcome = body(settings, js, job)
        except Fenced as e:
            log.info("%s: %s", task.name, e)
            outcome = "skipped"
        except RETRYABLE as e:  # StorageError included: wait the outage out, up to the budget
            # The budget is wall time since this task first met the outage (carried in the
            # retries' kwargs), however long each attempt itself took to fail.
            budget = settings.storage_retry_budget_seconds
            since = outage_since if outage_since is not None else time.time()
            left = budget - (time.time() - since)
            if left <= 0:
                raise  # on_failure: the job fails UNAVAILABLE, past the budget
            countdown = max(0.5, min(left, work.retry_countdown(task.request.retries, budget)))
            try:
                js.heartbeat(job_id, part, countdown + 3 * settings.heartbeat_seconds)
            except RETRYABLE:
                pass  # Redis is what is away: the controller re-enqueues once it is back
            kwargs = dict(task.request.kwargs or {}, outage_since=since)
            raise task.retry(exc=e if isinstance(e, Exception) else None, countdown=countdown,
                             kwargs=kwargs, max_retries=None) from None
        except RiseError as e:
            telemetry.record_error(e.grpc_code)
            fail_job(settings, js, job_id, e.grpc_code, str(e))
            outcome = "error"
        return outcome
    except BaseException:
        outcome = ""  # recorded by on_retry / on_failure
        raise
    finally:
        if outcome:
            telemetry.record_outcome(task.name, outcome, time.perf_counter() - start)
        else:
            telemetry.task_seconds(task.name, time.perf_counter() - start)


def _first_task(js: JobStore, job: dict[str, Any]) -> None:
    """The job's first task starts: its queue wait (submission to now), observed once."""
    now = time.time()
    if js.mark_first_task(job["id"], now):
        telemetry.job_started(job, now - float(job["created_at"]))


def _store(settings: Settings, prefix: str) -> CountingStore:
    return CountingStore(open_store(settings, prefix), telemetry.bytes_read,
                         telemetry.bytes_written)


def _model(settings: Settings, pool: str) -> LoadedModel:
    return work.get_model(settings, pool, on_load=telemetry.model_loaded)


@signals.worker_init.connect
def _preload(**_kw: Any) -> None:
    """Main process, before the pool forks: finish importing the model classes once, so
    every child, first or restarted, starts its first task without seconds of imports
    (transformers resolves them lazily).  Importing initialises neither CUDA nor torch's
    thread pools, so forking stays safe; the model itself is loaded in each child
    (rise.worker.work.get_model)."""
    # start-up: the point of this hook; transformers defers these imports until first use.
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401


# ------------------------------------------------------------------------------ ingest


@shared_task(bind=True, base=RiseTask, name=taskclient.INGEST_PREPARE, job_arg=0,
             max_retries=None)
def prepare(self: RiseTask, job_id: str, outage_since: float | None = None) -> str:
    """Plan the ingest (the function ``rise.ingest.plan``), then run the shards and the
    commit as a chord."""

    def body(settings: Settings, js: JobStore, job: dict[str, Any]) -> str:
        if job["state"] in TERMINAL:
            _unlock(js, job)
            return "skipped"
        _first_task(js, job)
        if job.get("chord_id"):  # a redelivered prepare: its chord is already running
            return "skipped"
        with work.Heartbeat(js, job_id, "prepare", settings.heartbeat_seconds,
                            claim=True) as beat:
            if not beat.claimed:  # another worker is preparing this job right now
                return "skipped"
            return _prepare(self, settings, js, job)

    return _job_task(self, job_id, body, part="prepare", outage_since=outage_since)


def _prepare(task: RiseTask, settings: Settings, js: JobStore, job: dict[str, Any]) -> str:
    """``rise.ingest.plan`` for the job's request, then the chord of its shards."""
    job_id = job["id"]
    req = work.Request.of(job)
    pool = work.pool_name(settings, req.pool)
    store = _store(settings, req.prefix)
    lm = _model(settings, pool)
    p, _ = ingest.plan(
        store, lm, materialize(req.dataset_uri, settings), append=req.append,
        fields=work.request_fields(req), config=work.request_config(req),
        # An append keeps the index's shard size, whatever the request says.
        shard_size=None if req.append else req.shard_size, dataset_uri=req.dataset_uri)
    js.update(job_id, plan=p.model_dump(mode="json"), shards_total=p.n_shards,
              examples_total=p.n_records, truncated=p.truncated, tokens_total=p.tokens)
    JobRecords(lambda: open_store(settings, "")).planned(job["tenant"], job_id, p.generation)
    if not js.set_state(job_id, RUNNING):  # cancelled while planning
        _unlock(js, job)
        return "skipped"
    queue = settings.queue_of(pool)
    header = [task.app.signature(taskclient.INGEST_SHARD, args=[job_id, n], queue=queue,
                                 immutable=True) for n in range(p.n_shards)]
    callback = task.app.signature(taskclient.INGEST_COMMIT, args=[job_id],
                                  queue=settings.control_queue)
    result = chord(header, callback, app=task.app).apply_async()
    js.update(job_id, chord_id=result.id)
    for n in range(p.n_shards):
        js.note_enqueued(job_id, str(n), by_controller=False)
    return "ok"


def _plan_of(job: dict[str, Any]) -> ingest.IngestPlan:
    if not isinstance(job.get("plan"), dict):
        raise InvalidInput(f"job {job.get('id')} has no ingest plan")
    return ingest.IngestPlan.model_validate(job["plan"])


@shared_task(bind=True, base=RiseTask, name=taskclient.INGEST_SHARD, job_arg=0,
             max_retries=None)
def shard(self: RiseTask, job_id: str, n: int, outage_since: float | None = None) -> str:
    """Write shard ``n`` of the job's plan (``rise.ingest.write_shard``)."""

    def body(settings: Settings, js: JobStore, job: dict[str, Any]) -> str:
        if job["state"] in TERMINAL:
            return "skipped"
        p = _plan_of(job)
        req = work.Request.of(job)
        pool = work.pool_name(settings, req.pool)
        lm = _model(settings, pool)
        store = _store(settings, req.prefix)
        rng = p.shard_range(int(n)) if 0 <= int(n) < p.n_shards else range(0)
        totals = [0, 0]
        queries = QueryDrain(self.app, settings, pool, lm)

        def progress(examples: int, tokens: int) -> None:
            totals[0] += examples
            totals[1] += tokens
            js.shard_progress(job_id, int(n), totals[0], totals[1])
            telemetry.sketched(examples, tokens, pool)
            queries()  # between two batches: the pool's waiting queries go first

        with work.Heartbeat(js, job_id, str(n), settings.heartbeat_seconds):
            records = work.dataset_source(settings, p).read(rng.start, rng.stop)
            try:
                done = ingest.write_shard(
                    store, lm, p, int(n), records, batch_size=settings.pool(pool).batch_size,
                    progress=progress, cancel=work.CancelPoll(js, job_id),
                    before_write=lambda: js.check_fence(job_id))
            except Cancelled:
                return "skipped"
            js.mark_shard_done(job_id, int(n))
        return "ok" if done.written else "skipped"

    return _job_task(self, job_id, body, part=str(int(n)), outage_since=outage_since)


@shared_task(bind=True, base=RiseTask, name=taskclient.INGEST_COMMIT, job_arg=1,
             max_retries=None)
def commit(self: RiseTask, results: Any, job_id: str,
           outage_since: float | None = None) -> str:
    """Chord callback: ``rise.ingest.commit``, then SUCCEEDED and unlock."""

    def body(settings: Settings, js: JobStore, job: dict[str, Any]) -> str:
        if job["state"] in TERMINAL:  # cancelled (or failed by a shard): nothing to commit
            _unlock(js, job)
            return "skipped"
        p = _plan_of(job)
        store = _store(settings, work.Request.of(job).prefix)
        m = ingest.commit(store, p, before_write=lambda: js.check_fence(job_id))
        gen = m.generation
        # Shards count what they truncated (planning does not tokenise): the job's count
        # is the manifest's.
        entry = next((i for i in m.ingests if i.generation == p.generation), None)
        done = {"truncated": entry.truncated} if entry is not None else {}
        if not js.set_state(job_id, SUCCEEDED, generation=gen, **done):
            log.warning("job %s ended (%s) while generation %d was committed", job_id,
                        js.get_any(job_id)["state"], gen)
        _unlock(js, job)
        return "ok"

    return _job_task(self, job_id, body, part="commit", outage_since=outage_since)


@shared_task(bind=True, base=RiseTask, name=taskclient.INDEX_COMPACT, job_arg=0,
             max_retries=None)
def compact(self: RiseTask, job_id: str, outage_since: float | None = None) -> str:
    """Rewrite the live records into new shards and erase deleted data."""

    def body(settings: Settings, js: JobStore, job: dict[str, Any]) -> str:
        if job["state"] in TERMINAL:
            _unlock(js, job)
            return "skipped"
        _first_task(js, job)
        with work.Heartbeat(js, job_id, "compact", settings.heartbeat_seconds, claim=True) as beat:
            if not beat.claimed:  # another worker is compacting this index right now
                return "skipped"
            return _compact(settings, js, job)

    return _job_task(self, job_id, body, part="compact", outage_since=outage_since)


def _compact(settings: Settings, js: JobStore, job: dict[str, Any]) -> str:
    """``rise.api.compact`` of the job's index (its ANN indexes rebuilt), fenced like every
    other write."""
    job_id = job["id"]
    js.set_state(job_id, RUNNING)
    store = _store(settings, work.Request.of(job).prefix)
    gen = compact_index(store, before_write=lambda: js.check_fence(job_id))
    m = open_index(store).manifest
    n = len(m.shards)
    js.update(job_id, shards_total=n, shards_done=n, examples_total=m.live_count,
              examples_done=m.live_count)
    js.set_state(job_id, SUCCEEDED, generation=gen or m.generation)
    _unlock(js, job)
    return "ok"


# ------------------------------------------------------------------------------ queries


@shared_task(bind=True, base=RiseTask, name=taskclient.QUERIES_SKETCH, throws=(RiseError,),
             autoretry_for=RETRYABLE, retry_backoff=True, retry_backoff_max=60, max_retries=5,
             retry_jitter=True)
def sketch(self: RiseTask, tenant: str, prefix: str, records: list[dict[str, Any]],
           fields: dict[str, Any] | None) -> str:
    """Sketch inline query records with the index's configuration; base64 features."""
    start = time.perf_counter()
    settings = self.settings()
    out = sketch_inline(settings, work.pool_name(settings), tenant, prefix, records, fields)
    telemetry.record_outcome(self.name, "ok", time.perf_counter() - start)
    return out


def sketch_inline(settings: Settings, pool: str, tenant: str, prefix: str,
                  records: list[dict[str, Any]], fields: dict[str, Any] | None,
                  lm: LoadedModel | None = None) -> str:
    """What ``rise.queries.sketch`` does, with the pool's model (``lm``, else loaded)."""
    if not isinstance(prefix, str) or not prefix.startswith(f"tenants/{tenant}/indexes/"):
        raise InvalidInput(f"index prefix {prefix!r} is not an index of tenant {tenant!r}")
    if not isinstance(records, list) or not records:
        raise InvalidInput("no query records")
    if lm is None:
        lm = _model(settings, pool)
    index = open_index(_store(settings, prefix))
    fm = FieldMap.from_dict(fields) if fields else index.default_fields
    recs = records_from_dicts(records, fm)
    qs = sketch_queries(index, lm, recs, fm, batch_size=settings.pool(pool).batch_size)
    return base64.b64encode(queryset_to_bytes(qs, index.config.storage_dtype)).decode("ascii")


@shared_task(bind=True, base=RiseTask, name=taskclient.POOL_IDENTITY, throws=(RiseError,),
             autoretry_for=RETRYABLE, retry_backoff=True, retry_backoff_max=60, max_retries=5,
             retry_jitter=True)
def identity(self: RiseTask) -> dict[str, Any]:
    """The manifest ``model`` entry of the pool's model (adapter included): what an index
    must have been built with to be imported for this pool (ImportIndex)."""
    settings = self.settings()
    return model_entry(_model(settings, work.pool_name(settings))).model_dump(mode="json")



def _inline_index(tenant: str, prefix: str, records: list[dict[str, Any]]) -> None:
    """The checks every inline-query task makes before it opens anything."""
    if not isinstance(prefix, str) or not prefix.startswith(f"tenants/{tenant}/indexes/"):
        raise InvalidInput(f"index prefix {prefix!r} is not an index of tenant {tenant!r}")
    if not isinstance(records, list) or not records:
        raise InvalidInput("no query records")


@shared_task(bind=True, base=RiseTask, name=taskclient.QUERIES_EXPLAIN, throws=(RiseError,),
             autoretry_for=RETRYABLE, retry_backoff=True, retry_backoff_max=60, max_retries=5,
             retry_jitter=True)
def explain(self: RiseTask, tenant: str, prefix: str, records: list[dict[str, Any]],
            fields: dict[str, Any] | None, query_id: str, hit_id: str,
            scoring: dict[str, Any], top: int) -> dict[str, Any]:
    """Explain hit ``hit_id`` of the inline query ``query_id`` (``rise.explain``): the
    explanation's JSON form.  The hit's record is read back from its ingest's dataset."""
    start = time.perf_counter()
    settings = self.settings()
    pool = work.pool_name(settings)
    _inline_index(tenant, prefix, records)
    index = open_index(_store(settings, prefix))
    fm = FieldMap.from_dict(fields) if fields else index.default_fields
    query = pick_query(records_from_dicts(records, fm), query_id or None)
    spec = ScoreSpec(channel=scoring["channel"], score=scoring["score"], lam=scoring["lam"],
                     center=scoring["center"])
    e = explain_hit(index, _model(settings, pool), query, hit_id, fields=fm, spec=spec,
                    top=top, resolve=lambda uri: str(materialize(uri, settings)),
                    batch_size=settings.pool(pool).batch_size)
    telemetry.record_outcome(self.name, "ok", time.perf_counter() - start)
    return e.to_dict()


@shared_task(bind=True, base=RiseTask, name=taskclient.QUERIES_GENERATE, throws=(RiseError,),
             autoretry_for=RETRYABLE, retry_backoff=True, retry_backoff_max=60, max_retries=5,
             retry_jitter=True)
def generate(self: RiseTask, tenant: str, prefix: str, records: list[dict[str, Any]],
             generation: dict[str, Any]) -> dict[str, Any]:
    """The model's responses to inline prompts (``{"id", "text"}`` records), sketched as
    prompt/response queries: base64 features and the generated records."""
    start = time.perf_counter()
    settings = self.settings()
    pool = work.pool_name(settings)
    _inline_index(tenant, prefix, records)
    index = open_index(_store(settings, prefix))
    prompts = records_from_dicts(records, FieldMap())
    chat = bool(generation.get("chat_template", False))
    gen = GenerateSpec(max_new_tokens=int(generation["max_new_tokens"]),
                       temperature=float(generation["temperature"]),
                       seed=int(generation["seed"]))
    lm = _model(settings, pool)
    recs = generate_queries(index, lm, prompts, gen, chat_template=chat)
    fm = FieldMap(prompt_field="prompt", response_field="response", chat_template=chat)
    qs = sketch_queries(index, lm, recs, fm, batch_size=settings.pool(pool).batch_size)
    telemetry.record_outcome(self.name, "ok", time.perf_counter() - start)
    return {"features": base64.b64encode(queryset_to_bytes(qs, index.config.storage_dtype)
                                         ).decode("ascii"),
            "generated": [{"id": r.id, "prompt": r.prompt, "response": r.response}
                          for r in recs]}


QUERY_DRAIN_BUDGET_S = 30.0
"""Longest a shard task answers queries between two of its batches: under a flood of
queries its shard still moves one batch per this long."""
BROKER_RETRY_S = 5.0
"""After the broker failed a drain, the next drain waits this long (the shard goes on)."""

DRAIN_ERRORS: tuple[type[BaseException], ...] = (*RETRYABLE, KombuError)
"""Broker or store errors that skip a drain."""
_drain_queues: dict[tuple[int, str], tuple[Any, Any]] = {}
"""(pid, queue) -> (kombu connection, bound queue) of this process's drains."""


class QueryDrain:
    """Answers the query tasks waiting for a pool while one of its shard tasks runs.

    A prefork worker process runs one task at a time, and with acks_late and prefetch 1
    its parent takes no message while the child works: a query sent to the pool's query
    queue would wait for the whole shard.  The shard task calls this between two batches
    (featurize's progress callback): it takes the ``rise.queries.sketch`` messages
    waiting in ``<query_queue>.<pool>`` from the broker itself (kombu ``Queue.get``,
    acked once answered), sketches them with the model this process already holds (never
    a second copy of the weights) and stores each answer in the result backend under the
    task's id, exactly as the task would: the gateway waiting on ``AsyncResult.get``
    cannot tell the difference.  A query therefore waits at most one batch of the shard
    (plus the queries ahead of it); an idle worker runs the task as usual.

    Each call answers until the queue is empty or ``QUERY_DRAIN_BUDGET_S`` passed.  A
    message that is not a query task, or whose sketch hit an unreachable store, goes back
    to the queue (its end) and ends the call.  A broker error is logged and skipped for
    ``BROKER_RETRY_S``: queries never fail the shard.
    """

    def __init__(self, app: Any, settings: Settings, pool: str, lm: LoadedModel,
                 budget_s: float = QUERY_DRAIN_BUDGET_S) -> None:
        self.app, self.settings, self.pool, self.lm = app, settings, pool, lm
        self.queue = f"{settings.query_queue}.{pool}"
        self.budget_s = budget_s
        self.answered = 0
        self._retry_at = 0.0

    def __call__(self) -> int:
        """Answer the waiting queries; returns how many."""
        now = time.monotonic()
        if now < self._retry_at:
            return 0
        deadline = now + self.budget_s
        done = 0
        try:
            queue = self._bound_queue()
            while time.monotonic() < deadline:
                msg = queue.get(no_ack=False, accept=["json"])
                if msg is None or not self._answer(msg):
                    break
                done += 1
        except DRAIN_ERRORS as e:
            log.warning("query drain of %s skipped for %.0f s: %s: %s", self.queue,
                        BROKER_RETRY_S, type(e).__name__, e)
            self._retry_at = time.monotonic() + BROKER_RETRY_S
            self._forget_queue()
        self.answered += done
        return done

    def _bound_queue(self) -> Any:
        key = (os.getpid(), self.queue)  # a connection is never shared across a fork
        held = _drain_queues.get(key)
        if held is None:
            conn = self.app.connection_for_read()
            held = (conn, Queue(self.queue, no_declare=True).bind(conn.default_channel))
            _drain_queues[key] = held
        return held[1]

    def _forget_queue(self) -> None:
        held = _drain_queues.pop((os.getpid(), self.queue), None)
        if held is not None:
            try:
                held[0].release()
            except Exception:  # noqa: BLE001 - a broken connection: nothing to give back
                log.debug("drain connection not released", exc_info=True)

    def _answer(self, msg: Any) -> bool:
        """Answer one message; False when it went back to the queue (stop this drain)."""
        headers = msg.headers or {}
        task_id = headers.get("id")
        if headers.get("task") != taskclient.QUERIES_SKETCH or not isinstance(task_id, str):
            msg.requeue()  # not a query task: its own consumer takes it
            return False
        try:
            body = msg.decode()
            args, kwargs = body[0], body[1]  # task protocol 2: [args, kwargs, embed]
            if not isinstance(args, list) or len(args) != 4 or kwargs:
                raise TypeError("not the four arguments of rise.queries.sketch")
        except Exception as e:  # noqa: BLE001 - the caller still gets an answer
            log.error("query message %s is not a rise.queries.sketch call: %s", task_id, e)
            self.app.backend.mark_as_failure(task_id, e)
            msg.ack()
            return True
        start = time.perf_counter()
        try:
            tenant, prefix, records, fields = args
            out = sketch_inline(self.settings, self.pool, tenant, prefix, records, fields,
                                lm=self.lm)
        except SoftTimeLimitExceeded:
            msg.requeue()  # the shard's own time is up: its task ends, the query waits
            raise
        except RETRYABLE as e:
            log.warning("query %s put back (store or broker unreachable): %s", task_id, e)
            msg.requeue()
            return False
        except Exception as e:  # noqa: BLE001 - the caller's answer, as the task would give it
            code = e.grpc_code if isinstance(e, RiseError) else "INTERNAL"
            if not isinstance(e, RiseError):
                log.exception("query %s failed between batches", task_id)
            telemetry.record_outcome(taskclient.QUERIES_SKETCH, "error")
            telemetry.record_error(code)
            self.app.backend.mark_as_failure(task_id, e)
            msg.ack()
            return True
        self.app.backend.mark_as_done(task_id, out)
        telemetry.record_outcome(taskclient.QUERIES_SKETCH, "ok", time.perf_counter() - start)
        msg.ack()
        return True
