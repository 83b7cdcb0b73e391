"""The Celery tasks: thin, named, with only ids and small JSON values as arguments.

======================  =====================================  ==========================
task                    queue                                  does
======================  =====================================  ==========================
rise.ingest.plan        the pool's (``rise.pool.<pool>``)      check the data, fix the
                                                               plan, launch the chord
rise.ingest.shard       the pool's                             sketch and put one shard
rise.ingest.commit      control (``rise.control``)             write the manifest (chord
                                                               callback, no model)
rise.index.compact      control                                compact the index
rise.queries.sketch     ``<query_queue>.<pool>``               sketch inline queries,
                                                               return base64 features
======================  =====================================  ==========================

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
import time
from typing import Any

from celery import Task, chord, shared_task, signals
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded

from rise.data import records_from_dicts
from rise.errors import Cancelled, InvalidInput, NotFound, RiseError, StorageError
from rise.jobs import FAILED, RUNNING, SUCCEEDED, TERMINAL
from rise.settings import Settings
from rise.store import CountingStore
from rise.worker import telemetry, work

log = logging.getLogger("rise.worker")


def _retryable() -> tuple[type[BaseException], ...]:
    """Exceptions worth retrying: the store or Redis unreachable for a moment."""
    import redis
    import urllib3

    return (StorageError, redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
            urllib3.exceptions.HTTPError, ConnectionError, TimeoutError)


RETRYABLE = _retryable()
RETRY = dict(autoretry_for=RETRYABLE, retry_backoff=True, retry_backoff_max=60, max_retries=5,
             retry_jitter=True)


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
            message = f"storage unavailable after {self.max_retries} retries: {type(exc).__name__}"
        else:
            message = f"internal error in {self.name} ({type(exc).__name__}); see worker logs"
        try:
            fail_job(work.job_store(self.settings()), job_id, code, message)
        except Exception:  # noqa: BLE001 - Redis down too: nothing more to do here
            log.exception("cannot mark job %s failed", job_id)


def fail_job(js, job_id: str, code: str, message: str) -> None:
    """FAILED with the error's code and message, and the index's writer lock released."""
    try:
        job = js.get_any(job_id)
    except NotFound:
        return
    js.set_state(job_id, FAILED, error_code=code, error_message=message)
    js.unlock_index(job["tenant"], job["index"], job_id)


def _unlock(js, job: dict[str, Any]) -> None:
    js.unlock_index(job["tenant"], job["index"], job["id"])


def _job_task(task: RiseTask, job_id: str, body) -> str:
    """Run ``body(settings, js, job)`` for a job: a RiseError fails the job and returns
    "error"; retryable and unexpected errors propagate (see RiseTask.on_failure)."""
    start = time.perf_counter()
    settings = task.settings()
    js = work.job_store(settings)
    outcome = "error"
    try:
        try:
            job = js.get_any(job_id)
        except NotFound:
            log.warning("%s: job %s not found; skipped", task.name, job_id)
            outcome = "skipped"
            return outcome
        try:
            outcome = body(settings, js, job)
        except StorageError:
            raise
        except RiseError as e:
            telemetry.record_error(e.grpc_code)
            fail_job(js, job_id, e.grpc_code, str(e))
            outcome = "error"
        return outcome
    except BaseException:
        outcome = ""  # recorded by on_retry / on_failure
        raise
    finally:
        if outcome:
            telemetry.record_outcome(task.name, outcome, time.perf_counter() - start)
        else:
            telemetry.metrics().task_duration_seconds.labels(task=task.name).observe(
                time.perf_counter() - start)


def _store(settings: Settings, prefix: str):
    from rise.datasets import open_store

    return CountingStore(open_store(settings, prefix), telemetry.bytes_read,
                              telemetry.bytes_written)


def _model(settings: Settings, pool: str):
    return work.get_model(settings, pool, on_load=telemetry.model_loaded)


@signals.worker_init.connect
def _preload(**_kw: Any) -> None:
    """Main process, before the pool forks: import the domain (torch, transformers) once
    so every child, first or restarted, starts its first task without seconds of imports.
    Importing initialises neither CUDA nor torch's thread pools, so forking stays safe; the
    model itself is loaded in each child (rise.worker.work.get_model)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    import rise.api  # noqa: F401
    import rise.index  # noqa: F401


# ------------------------------------------------------------------------------ ingest


@shared_task(bind=True, base=RiseTask, name="rise.ingest.plan", job_arg=0, **RETRY)
def plan(self: RiseTask, job_id: str) -> str:
    """Check the dataset, fix the plan, then run the shards and the commit as a chord."""

    def body(settings: Settings, js, job: dict[str, Any]) -> str:
        if job["state"] in TERMINAL:
            _unlock(js, job)
            return "skipped"
        if job.get("chord_id"):  # a redelivered plan: its chord is already running
            return "skipped"
        req = work.Request.of(job)
        pool = work.pool_name(settings, req.pool)
        store = _store(settings, req.prefix)
        lm = _model(settings, pool)
        planned, _ = work.plan_ingest(settings, store, lm, req)
        p = planned.plan
        js.update(job_id, plan=p.to_dict(), shards_total=p.n_shards,
                  examples_total=p.n_records, truncated=planned.truncated,
                  tokens_total=planned.tokens)
        if not js.set_state(job_id, RUNNING):  # cancelled while planning
            _unlock(js, job)
            return "skipped"
        queue = settings.queue_of(pool)
        header = [self.app.signature("rise.ingest.shard", args=[job_id, n], queue=queue,
                                     immutable=True) for n in range(p.n_shards)]
        callback = self.app.signature("rise.ingest.commit", args=[job_id],
                                      queue=settings.control_queue)
        result = chord(header, callback, app=self.app).apply_async()
        js.update(job_id, chord_id=result.id)
        return "ok"

    return _job_task(self, job_id, body)


@shared_task(bind=True, base=RiseTask, name="rise.ingest.shard", job_arg=0, **RETRY)
def shard(self: RiseTask, job_id: str, n: int) -> str:
    """Sketch and put shard ``n`` of the job's plan, unless a valid copy is there."""
    from rise.data import FieldMap
    from rise.index import IngestPlan

    def body(settings: Settings, js, job: dict[str, Any]) -> str:
        if job["state"] in TERMINAL:
            return "skipped"
        if not isinstance(job.get("plan"), dict):
            raise InvalidInput(f"job {job_id} has no ingest plan")
        p = IngestPlan.from_dict(job["plan"])
        req = work.Request.of(job)
        pool = work.pool_name(settings, req.pool)
        lm = _model(settings, pool)
        lm.identity.check_same(p.model)  # a misconfigured pool must not write shards
        store = _store(settings, req.prefix)
        records = work.dataset_records(settings, p.dataset_uri, p.dataset_sha256,
                                       FieldMap.from_dict(p.fields))

        def progress(examples: int, tokens: int) -> None:
            js.add_progress(job_id, examples=examples, tokens=tokens)
            telemetry.sketched(examples, tokens)

        try:
            written, examples, tokens = work.write_shard(
                store, lm, p, int(n), records, batch_size=settings.pool(pool).batch_size,
                progress=progress, cancel=work.CancelPoll(js, job_id))
        except Cancelled:
            return "skipped"
        first = js.mark_shard_done(job_id, int(n))
        if not written and first:  # done by an earlier run: count its work once
            js.add_progress(job_id, examples=examples, tokens=tokens)
        return "ok" if written else "skipped"

    return _job_task(self, job_id, body)


@shared_task(bind=True, base=RiseTask, name="rise.ingest.commit", job_arg=1, **RETRY)
def commit(self: RiseTask, results: Any, job_id: str) -> str:
    """Chord callback: write the generation's manifest, then SUCCEEDED and unlock."""
    from rise.index import IngestPlan

    def body(settings: Settings, js, job: dict[str, Any]) -> str:
        if job["state"] in TERMINAL:  # cancelled (or failed by a shard): nothing to commit
            _unlock(js, job)
            return "skipped"
        p = IngestPlan.from_dict(job["plan"])
        store = _store(settings, work.Request.of(job).prefix)
        gen = work.commit_ingest(store, p, int(job.get("truncated") or 0))
        if not js.set_state(job_id, SUCCEEDED, generation=gen):
            log.warning("job %s ended (%s) while generation %d was committed", job_id,
                        js.get_any(job_id)["state"], gen)
        _unlock(js, job)
        return "ok"

    return _job_task(self, job_id, body)


@shared_task(bind=True, base=RiseTask, name="rise.index.compact", job_arg=0, **RETRY)
def compact(self: RiseTask, job_id: str) -> str:
    """Rewrite the live records into new shards and erase deleted data."""
    from rise.index import compact as compact_index
    from rise.index import open_index

    def body(settings: Settings, js, job: dict[str, Any]) -> str:
        if job["state"] in TERMINAL:
            _unlock(js, job)
            return "skipped"
        js.set_state(job_id, RUNNING)
        store = _store(settings, work.Request.of(job).prefix)
        gen = compact_index(store)
        m = open_index(store).manifest
        n = len(m["shards"])
        js.update(job_id, shards_total=n, shards_done=n, examples_total=m["live_count"],
                  examples_done=m["live_count"])
        js.set_state(job_id, SUCCEEDED, generation=gen or m["generation"])
        _unlock(js, job)
        return "ok"

    return _job_task(self, job_id, body)


# ------------------------------------------------------------------------------ queries


@shared_task(bind=True, base=RiseTask, name="rise.queries.sketch", throws=(RiseError,),
             **RETRY)
def sketch(self: RiseTask, tenant: str, prefix: str, records: list[dict[str, Any]],
           fields: dict[str, Any] | None) -> str:
    """Sketch inline query records with the index's configuration; base64 features."""
    from rise.api import sketch_queries
    from rise.data import FieldMap
    from rise.index import open_index
    from rise.score import queryset_to_bytes

    start = time.perf_counter()
    settings = self.settings()
    if not isinstance(prefix, str) or not prefix.startswith(f"tenants/{tenant}/indexes/"):
        raise InvalidInput(f"index prefix {prefix!r} is not an index of tenant {tenant!r}")
    if not isinstance(records, list) or not records:
        raise InvalidInput("no query records")
    pool = work.pool_name(settings)
    lm = _model(settings, pool)
    index = open_index(_store(settings, prefix))
    fm = FieldMap.from_dict(fields) if fields else \
        FieldMap.from_dict(index.manifest["ingests"][0]["fields"])
    recs = records_from_dicts(records, fm)
    qs = sketch_queries(index, lm, recs, fm, batch_size=settings.pool(pool).batch_size)
    out = base64.b64encode(queryset_to_bytes(qs, index.config.storage_dtype)).decode("ascii")
    telemetry.record_outcome(self.name, "ok", time.perf_counter() - start)
    return out
