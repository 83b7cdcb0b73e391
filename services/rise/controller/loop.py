"""The job controller: drives every job to an end state.

One controller at a time holds a lease in Redis (a second one, in the chart a second
replica, waits and takes over when the lease lapses).  Every ``controller_interval``
seconds it looks at each job that has not ended (``JobStore.active_ids``):

- past its deadline (``job_deadline_seconds`` after submission): FAILED,
  DEADLINE_EXCEEDED, index unlocked;
- waiting to be planned, or running with shards not done: each missing part (the prepare
  task, or shard n) is accounted for when its heartbeat is alive, its message is waiting in
  its queue, or it was enqueued less than ``shard_stall_seconds`` ago; any other missing
  part was lost (a dead worker's message sits in the broker's unacked set until the
  visibility timeout, a retry that could not be published is gone) and is enqueued again.
  Shard tasks are deterministic and idempotent, so a duplicate costs time, never data.
  After ``shard_attempts`` re-enqueues of one part the job fails (UNAVAILABLE);
- every shard done but the job still running (the chord's callback was lost): the
  controller commits itself, with the same ``rise.ingest.commit`` and fence check;
- ended as a failed create that never committed: its name is freed;
- ended: its end state goes to its record in the store (``rise.jobrecords``), its
  duration (submission to end) to ``rise_job_duration_seconds`` once, from the job store's
  ended set (``record_ended``); its hash expires ``job_ttl_seconds`` after the end, the
  record stays.  A job whose record says it ended while Redis (restored from an older
  snapshot) says otherwise is ended again.  After Redis lost its data, every job comes
  back from its record (an ended one only within its TTL).

Every ``sweep_interval`` seconds it also sweeps the bucket (``sweep``): objects under an
index prefix that no committed manifest, registry record or live job owns, older than
``sweep_grace_seconds``, are deleted, so a stale writer's shard cannot linger.

Run it as ``python -m rise.controller`` (the chart's controller Deployment; ``make up``
starts one).  It serves its metrics (``rise_controller_*``) on ``RISE_METRICS_PORT``.
"""

from __future__ import annotations

import ast
import base64
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rise import constants, ingest, taskclient
from rise.ann import ANN_DIR
from rise.errors import NotFound, RiseError
from rise.index import INDEX_PREFIXES, generation_keys, manifest_generations
from rise.jobrecords import JobRecord, JobRecords
from rise.jobs import (
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    TERMINAL,
    JobStore,
    index_prefix,
)
from rise.registry import RECORD_KEY, TENANTS_PREFIX, Registry, free_failed_create
from rise.settings import Settings
from rise.store import Store

log = logging.getLogger("rise.controller")

LEASE = "controller"
# kombu's Redis transport keeps priorities 3, 6 and 9 of a queue in lists of their own.
PRIORITY_SEP = "\x06\x16"
PRIORITY_STEPS = (3, 6, 9)
# Messages of one queue read per tick to find a job's waiting tasks.
QUEUE_SCAN_LIMIT = 100_000


@dataclass
class TickReport:
    """What one pass over the jobs did."""

    jobs: int = 0
    requeued: list[tuple[str, str]] = field(default_factory=list)  # (job, part)
    committed: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (job, code)
    names_freed: int = 0
    restored: int = 0
    ended: int = 0


def waiting_tasks(r: Any, queue: str) -> set[tuple[str, tuple[Any, ...]]]:
    """(task name, args) of the messages waiting in a Celery queue on Redis."""
    out: set[tuple[str, tuple[Any, ...]]] = set()
    for key in [queue] + [f"{queue}{PRIORITY_SEP}{p}" for p in PRIORITY_STEPS]:
        for raw in r.lrange(key, 0, QUEUE_SCAN_LIMIT - 1):
            task = message_task(raw)
            if task is not None:
                out.add(task)
    return out


def message_task(raw: str | bytes) -> tuple[str, tuple[Any, ...]] | None:
    """The task name and positional arguments of one kombu message (protocol 2)."""
    try:
        msg = json.loads(raw)
        headers = msg.get("headers") or {}
        name = headers.get("task")
        if not isinstance(name, str):
            return None
        try:
            body = json.loads(base64.b64decode(msg["body"]))
            args = body[0]
        except (KeyError, ValueError, TypeError, IndexError):
            args = ast.literal_eval(headers.get("argsrepr") or "()")
        return name, tuple(args)
    except (ValueError, TypeError, SyntaxError, AttributeError):
        return None


class Controller:
    def __init__(self, settings: Settings, js: JobStore, send: Callable[..., Any],
                 store: Callable[[str], Store], metrics: Any = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.s = settings
        self.js = js
        self.send = send
        self.store = store
        self.metrics = metrics
        self.clock = clock
        self.registry = Registry(js, store)
        self.records = JobRecords(store(""))
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._all_done_since: dict[str, float] = {}
        self._last_sweep = 0.0

    # ------------------------------------------------------------------ the loop

    def run(self, stop: threading.Event) -> None:
        """Tick while holding the lease, until ``stop`` is set."""
        while not stop.is_set():
            started = time.perf_counter()
            try:
                leader = self.js.take_lease(LEASE, self.holder, self.s.controller_lease_seconds)
                self._gauge("controller_leader", 1 if leader else 0)
                if leader:
                    self.tick()
                    if self.clock() - self._last_sweep >= self.s.sweep_interval_seconds:
                        # Also catches jobs lost to a Redis restored from an older snapshot
                        # (its data is not gone, so the restore marker survived).
                        self.restore_jobs(force=True)
                        self.sweep()
                        self.records.expire(self.clock())
                        self._last_sweep = self.clock()
            except Exception:  # noqa: BLE001 - Redis or the store away: try again next tick
                log.warning("controller tick failed", exc_info=True)
                self._count("controller_errors_total")
            finally:
                self._observe("controller_tick_seconds", time.perf_counter() - started)
            stop.wait(self.s.controller_interval_seconds)

    def tick(self) -> TickReport:
        report = TickReport()
        try:
            report.restored = self.restore_jobs()
            self.registry.ensure_rebuilt()
        except RiseError as e:
            log.warning("jobs or registry not restored yet: %s", e)
        try:
            report.ended = self.record_ended()
        except RiseError as e:  # the store is away: the ended set keeps them for next time
            log.warning("ended jobs not recorded yet: %s", e)
        self._gauge("controller_active_jobs", len(self.js.active_ids()))
        queues: dict[str, set[tuple[str, tuple[Any, ...]]]] = {}
        for job_id in self.js.active_ids():
            report.jobs += 1
            try:
                self._drive(job_id, report, queues)
            except RiseError as e:
                log.warning("job %s: %s", job_id, e)
        for job_id in list(self._all_done_since):
            if job_id not in set(self.js.active_ids()):
                self._all_done_since.pop(job_id, None)
        return report

    # ------------------------------------------------------------------- one job

    def _drive(self, job_id: str, report: TickReport,
               queues: dict[str, set[tuple[str, tuple[Any, ...]]]]) -> None:
        try:
            job = self.js.get_any(job_id)
        except NotFound:
            self.js.forget_active(job_id)
            return
        now = self.clock()
        if job["state"] in TERMINAL:
            self.records.ended(job)  # a StorageError keeps it active: again next tick
            self.js.forget_active(job_id)
            if job["state"] == FAILED and free_failed_create(self.registry, job):
                report.names_freed += 1
            return
        record = self.records.get(job["tenant"], job_id)
        if record is not None and record.ended:
            # Redis came back from a snapshot older than the job's end: end it again.
            self.js.set_state(job_id, record.state, error_code=record.error_code,
                              error_message=record.error_message,
                              generation=record.generation)
            self.js.unlock_index(job["tenant"], job["index"], job_id)
            self.js.forget_active(job_id)
            return
        if now - job["created_at"] > self.s.job_deadline_seconds:
            self._fail(job, "DEADLINE_EXCEEDED",
                       f"job did not end within its deadline ({self.s.job_deadline_seconds:g} s)",
                       report)
            return
        request = job.get("request") or {}
        pool = request.get("pool", "")
        if job["kind"] == "COMPACT":
            self._drive_parts(job, ["compact"], taskclient.INDEX_COMPACT,
                              self.s.control_queue, report, queues, now)
            return
        if job["state"] == QUEUED or not isinstance(job.get("plan"), dict):
            if pool not in self.s.pools:
                self._fail(job, "FAILED_PRECONDITION", f"pool {pool!r} is not configured", report)
                return
            self._drive_parts(job, ["prepare"], taskclient.INGEST_PREPARE,
                              self.s.queue_of(pool), report, queues, now)
            return
        if job["state"] != RUNNING:
            return
        done = self.js.shards_done(job_id)
        missing = [str(n) for n in range(job["shards_total"]) if n not in done]
        if missing:
            self._all_done_since.pop(job_id, None)
            if pool in self.s.pools:
                self._drive_parts(job, missing, taskclient.INGEST_SHARD, self.s.queue_of(pool),
                                  report, queues, now)
            return
        since = self._all_done_since.setdefault(job_id, now)
        if now - since >= self.s.controller_interval_seconds:
            self._commit(job, report)

    def _drive_parts(self, job: dict[str, Any], parts: list[str], task: str, queue: str,
                     report: TickReport, queues: dict[str, set[tuple[str, tuple[Any, ...]]]],
                     now: float) -> None:
        job_id = job["id"]
        alive = self.js.alive(job_id, parts)
        if queue not in queues:
            queues[queue] = waiting_tasks(self.js.r, queue)
        waiting = queues[queue]
        enqueued = self.js.enqueued(job_id)
        since_start = job.get("started_at") or job["created_at"]
        for part in parts:
            if part in alive or (task, self._args(job_id, part)) in waiting:
                continue
            if now - enqueued.get(part, since_start) < self.s.shard_stall_seconds:
                continue
            attempts = self.js.note_enqueued(job_id, part, by_controller=True, now=now)
            if attempts > self.s.shard_attempts:
                self._fail(job, "UNAVAILABLE",
                           f"{'the ' + part if not part.isdigit() else 'shard ' + part} task "
                           f"was lost {attempts - 1} times; giving up", report)
                return
            log.info("job %s: %s lost (no heartbeat, not queued); enqueued again (%d)",
                     job_id, part, attempts)
            self.send(task, args=list(self._args(job_id, part)), queue=queue)
            report.requeued.append((job_id, part))
            self._count("controller_requeued_total", part="shard" if part.isdigit() else part)

    def record_ended(self) -> int:
        """The jobs that ended since the last pass: each one's end state to its record in
        the store, then its hash set to expire ``job_ttl_seconds`` after the end, then
        (once, by whoever takes it from the ended set) its duration to
        ``rise_job_duration_seconds``.  A StorageError leaves the rest for the next pass."""
        n = 0
        for job_id in self.js.ended_ids():
            try:
                job = self.js.get_any(job_id)
            except NotFound:  # expired (no controller ran for a whole TTL): nothing to do
                self.js.forget_ended(job_id)
                continue
            if job["state"] in TERMINAL:
                self.records.ended(job)
                self.js.expire_ended(job_id, job.get("finished_at") or self.clock(),
                                     now=self.clock())
            if self.js.forget_ended(job_id) and job["state"] in TERMINAL:
                n += 1
                if self.metrics is not None and job.get("finished_at"):
                    self.metrics.job_duration_seconds.labels(
                        pool=str(job.get("pool") or ""), kind=job["kind"],
                        state=job["state"]).observe(
                            max(0.0, job["finished_at"] - job["created_at"]))
        return n

    def restore_jobs(self, force: bool = False) -> int:
        """After Redis lost its data (or with ``force``): bring back every job that has a
        record but no hash."""
        marker = f"{self.js.ns}:jobs:restored"
        if not force and self.js.r.exists(marker):
            return 0
        restored = 0
        for record in self.records.all():
            job = record.model_dump(exclude={"ended_at"})
            if record.ended:
                job["finished_at"] = record.ended_at  # within its TTL only (JobStore.restore)
            else:
                job["state"] = QUEUED
                done = self._already_committed(record)
                if done:
                    job.update(state=SUCCEEDED, generation=done, finished_at=self.clock())
            if not self.js.restore(job, now=self.clock()):
                continue
            restored += 1
            if job["state"] == QUEUED:
                pool = record.request.get("pool", "")
                holder = self.js.lock_index(record.tenant, record.index, record.id,
                                            self.s.index_lock_seconds)
                if holder is not None:
                    self._fail(self.js.get_any(record.id), "ABORTED",
                               f"index busy with job {holder} after the job store restarted",
                               TickReport())
                    continue
                task, queue = ((taskclient.INDEX_COMPACT, self.s.control_queue)
                               if record.kind == "COMPACT" else
                               (taskclient.INGEST_PREPARE, self.s.queue_of(pool)))
                self.send(task, args=[record.id], queue=queue)
                self.js.note_enqueued(record.id, "compact" if record.kind == "COMPACT"
                                      else "prepare", by_controller=False, now=self.clock())
        self.js.r.set(marker, self.clock())
        if restored:
            log.info("restored %d jobs from their records after the job store lost its data",
                     restored)
        return restored

    def _already_committed(self, record: JobRecord) -> int:
        """The generation an unfinished job had committed before Redis lost it, or 0."""
        if record.kind == "COMPACT":
            return 0
        gens = manifest_generations(self.store(index_prefix(record.tenant, record.index)))
        target = record.generation or (1 if record.kind == "CREATE_INDEX" else 0)
        return target if target and target in gens else 0

    @staticmethod
    def _args(job_id: str, part: str) -> tuple[Any, ...]:
        return (job_id, int(part)) if part.isdigit() else (job_id,)

    def _commit(self, job: dict[str, Any], report: TickReport) -> None:
        """Every shard is done but the job still runs: the chord's callback was lost (or is
        slow).  Commit as the callback would; a callback that comes later finds it done."""
        job_id = job["id"]
        p = ingest.IngestPlan.model_validate(job["plan"])
        store = self.store(job["request"]["prefix"])
        try:
            gen = ingest.commit(store, p, before_write=lambda: self.js.check_fence(job_id))
        except ingest.ShardsPending as e:
            # A shard marked done is not in the store (deleted, or damaged): redo it.
            log.warning("job %s: %s", job_id, e)
            for n in range(p.n_shards):
                if not ingest.shard_is_valid(store, p.shard_key(n), p.shard_meta(n)):
                    self.js.r.srem(f"{self.js.ns}:jobshards:{job_id}", n)
            return
        self._all_done_since.pop(job_id, None)
        if self.js.set_state(job_id, SUCCEEDED, generation=gen.generation):
            log.info("job %s: committed generation %d", job_id, gen.generation)
            report.committed.append(job_id)
            self._count("controller_commits_total")
        self.js.unlock_index(job["tenant"], job["index"], job_id)

    def _fail(self, job: dict[str, Any], code: str, message: str, report: TickReport) -> None:
        if self.js.set_state(job["id"], FAILED, error_code=code, error_message=message):
            report.failed.append((job["id"], code))
            self._count("controller_jobs_failed_total", code=code)
            self.js.unlock_index(job["tenant"], job["index"], job["id"])
            if free_failed_create(self.registry, job):
                report.names_freed += 1

    # --------------------------------------------------------------------- sweep

    def sweep(self) -> int:
        """Delete objects under index prefixes that nothing owns, older than the grace."""
        root = self.store("")
        now = self.clock()
        live = {(j["tenant"], j["index"]): j for j in self._active_jobs()}
        by_index: dict[tuple[str, str], list[tuple[str, float]]] = {}
        for key, mtime in root.list_times(TENANTS_PREFIX):
            parts = key.split("/")
            if len(parts) < 5 or parts[2] != "indexes":
                continue
            by_index.setdefault((parts[1], parts[3]), []).append(("/".join(parts[4:]), mtime))
        deleted = 0
        for (tenant, name), objects in by_index.items():
            prefix = index_prefix(tenant, name)
            owned = self._owned(prefix, live.get((tenant, name)), {k for k, _ in objects})
            for key, mtime in objects:
                if key in owned or now - mtime < self.s.sweep_grace_seconds:
                    continue
                root.delete(prefix + key)
                deleted += 1
        if deleted:
            log.info("swept %d orphan objects", deleted)
            self._count("controller_swept_objects_total", amount=deleted)
        return deleted

    def _active_jobs(self) -> list[dict[str, Any]]:
        out = []
        for job_id in self.js.active_ids():
            try:
                out.append(self.js.get_any(job_id))
            except NotFound:
                continue
        return out

    def _owned(self, prefix: str, job: dict[str, Any] | None, keys: set[str]) -> set[str]:
        """Keys of an index that something owns: its registry record and every manifest
        with the shards they name (when the index is registered), and everything of a
        generation a live job may still write."""
        store = self.store(prefix)
        owned: set[str] = set()
        gens = manifest_generations(store)
        if RECORD_KEY not in keys and gens:
            # Committed but not registered (written before registry records existed, or
            # copied in): never swept.  Registering it is an import, not a sweep.
            log.warning("index at %s has manifests but no registry record; kept", prefix)
            return keys
        if RECORD_KEY in keys:
            owned.add(RECORD_KEY)
            for g in gens:
                owned.add(constants.manifest_key(g))
                try:  # its shards, id files, shard lists and delete files
                    owned.update(generation_keys(store, g))
                except RiseError:
                    continue  # a damaged manifest owns nothing; rise verify reports it
            # ANN indexes beside the shards (rise.ann): compaction deletes the stale ones
            owned.update(k for k in keys if k.startswith(ANN_DIR + "/"))
        if job is not None and job["state"] not in TERMINAL:
            # A live job may write the next generations' shards, id files, shard lists,
            # delete files and manifest.
            owned.update(k for k in keys if k.startswith(INDEX_PREFIXES))
        return owned

    # ------------------------------------------------------------------- metrics

    def _count(self, name: str, amount: float = 1, **labels: str) -> None:
        if self.metrics is not None:
            metric = getattr(self.metrics, name.removeprefix("rise_"))
            (metric.labels(**labels) if labels else metric).inc(amount)

    def _gauge(self, name: str, value: float) -> None:
        if self.metrics is not None:
            getattr(self.metrics, name).set(value)

    def _observe(self, name: str, value: float) -> None:
        if self.metrics is not None:
            getattr(self.metrics, name).observe(value)

