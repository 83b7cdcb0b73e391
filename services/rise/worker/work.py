"""What a worker process keeps between tasks, and the glue between a job and the ingest
pipeline: the Redis job store, the cancel poll, the pool's model (loaded once per
process), the records of the datasets it works on, and a job's request.

The ingest itself (plan, write a shard, commit) is ``rise.ingest``: the very functions the
CLI and the Python API call.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import redis
from transformers.utils import logging as hf_logging

from rise import constants
from rise.config import SketchConfig, sketch_config
from rise.data import FieldMap, FileBytes, file_sha256
from rise.datasets import dataset_bytes, materialize
from rise.errors import BudgetExceeded, InvalidInput, Mismatch, RiseError
from rise.ingest import DatasetRecords, IngestPlan, RecordSource
from rise.jobs import JobStore
from rise.model import LoadedModel, load_model
from rise.modelsource import local_model, parse_source
from rise.placement import parse_bytes, plan_placement
from rise.settings import Pool, Settings

log = logging.getLogger("rise.worker")

# How often a running shard asks Redis whether its job was cancelled.
CANCEL_POLL_S = 1.0


# ------------------------------------------------------------------------------ redis


_redis_lock = threading.Lock()
_redis_clients: dict[str, redis.Redis] = {}


def job_store(settings: Settings) -> JobStore:
    """The JobStore of this process (one Redis connection pool per URL and process)."""
    with _redis_lock:
        client = _redis_clients.get(settings.redis_url)
        if client is None:
            client = redis.Redis.from_url(settings.redis_url, decode_responses=True,
                                          **settings.redis_tls())
            _redis_clients[settings.redis_url] = client
    return JobStore(client)


class CancelPoll:
    """A cancel callback for featurize: asks Redis at most once per ``interval`` seconds."""

    def __init__(self, js: JobStore, job_id: str, interval: float = CANCEL_POLL_S) -> None:
        self.js, self.job_id, self.interval = js, job_id, interval
        self.last = float("-inf")
        self.cancelled = False

    def __call__(self) -> bool:
        now = time.monotonic()
        if not self.cancelled and now - self.last >= self.interval:
            self.last = now
            self.cancelled = self.js.is_cancelled(self.job_id)
        return self.cancelled


class Heartbeat:
    """A running task's heartbeat (``JobStore.heartbeat``), renewed by a background thread
    every ``interval`` seconds and living three times as long, so the controller can tell
    a slow task from a dead one.  ``claim`` makes entering fail (``claimed`` False) while
    another live task holds the same part."""

    def __init__(self, js: JobStore, job_id: str, part: str, interval: float,
                 claim: bool = False) -> None:
        self.js, self.job_id, self.part = js, job_id, part
        self.interval, self.claim = interval, claim
        self.claimed = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Heartbeat:
        self.claimed = self.js.heartbeat(self.job_id, self.part, 3 * self.interval,
                                         claim=self.claim)
        if self.claimed:
            self._thread = threading.Thread(target=self._run, daemon=True,
                                            name=f"heartbeat-{self.part}")
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.js.heartbeat(self.job_id, self.part, 3 * self.interval)
            except Exception:  # noqa: BLE001 - Redis away for a moment: beat again later
                log.debug("heartbeat of %s/%s not renewed", self.job_id, self.part,
                          exc_info=True)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval)
            try:
                self.js.end_heartbeat(self.job_id, self.part)
            except Exception:  # noqa: BLE001 - it expires by itself
                log.debug("heartbeat of %s/%s not ended", self.job_id, self.part)


def retry_delays(budget_seconds: float, cap_seconds: float = 30.0) -> list[float]:
    """Nominal waits before each retry (1, 2, 4, ... s, at most ``cap_seconds``) until they
    add up to ``budget_seconds``: a task retries this many times before it gives up."""
    delays: list[float] = []
    while sum(delays) < budget_seconds:
        delays.append(min(cap_seconds, 2.0 ** len(delays)))
    return delays


def retry_countdown(attempt: int, budget_seconds: float) -> float:
    """The wait before retry ``attempt`` (0-based): its nominal delay with +-20% jitter, so
    the tasks of one outage do not all come back in the same second."""
    delays = retry_delays(budget_seconds)
    nominal = delays[min(attempt, len(delays) - 1)] if delays else 1.0
    return nominal * random.uniform(0.8, 1.2)


# ------------------------------------------------------------------------------ models


_models: dict[str, LoadedModel] = {}
_model_lock = threading.Lock()


def pool_name(settings: Settings, requested: str | None = None) -> str:
    """The pool a task runs for: the one asked for, else this worker's, else the only one."""
    name = requested or settings.worker_pool
    if not name and len(settings.pools) == 1:
        name = next(iter(settings.pools))
    if not name:
        raise InvalidInput("no worker pool configured (set RISE_WORKER_POOL)")
    settings.pool(name)  # InvalidInput for an unknown pool
    return name


def load_pool_model(pool: Pool, settings: Settings) -> LoadedModel:
    """Load a pool's model: float32 on the CPU, or placed over the GPUs by the planner.
    An S3 or hub source is fetched into the cache first (``rise.modelsource``: once per
    cache, shared by the worker processes)."""
    hf_logging.disable_progress_bar()  # Celery would log every tqdm refresh as a warning
    model = local_model(pool.model, settings)
    adapter = local_model(pool.adapter, settings) if pool.adapter else None
    if pool.gpus == 0:
        return load_model(model, dtype="float32", device_map=None, adapter=adapter)
    # GPU branch: the planner's device map pins the head and final norm to the last GPU
    # (the head device, where the sketches run) and spreads the layers over the others.
    # Not exercised by the CPU test suite.
    plan = plan_placement(model, pool.gpus, pool.gpu_memory, batch_size=pool.batch_size,
                      max_length=constants.DEFAULT_MAX_LENGTH, dtype=pool.dtype)
    if not plan.fits:
        raise BudgetExceeded(f"model {pool.model} does not fit the pool's GPUs: {plan.reason}")
    budget = parse_bytes(pool.gpu_memory)
    return load_model(model, dtype=pool.dtype, device_map=plan.device_map,
                      max_memory={i: budget for i in range(pool.gpus)}, adapter=adapter)


def get_model(settings: Settings, name: str,
              on_load: Callable[[float], None] | None = None) -> LoadedModel:
    """The pool's model, loaded once per worker process; ``on_load(seconds)`` on a load."""
    with _model_lock:
        lm = _models.get(name)
        if lm is None:
            start = time.perf_counter()
            try:
                lm = load_pool_model(settings.pool(name), settings)
            except RiseError as e:
                # Its message names the model's files (a path of this machine, the cache
                # of converted models): the log's, while the job's message reaches the
                # tenant.
                log.error("pool %s: cannot load its model: %s", name, e)
                raise type(e)(f"the model of pool {name!r} cannot be loaded "
                              f"({type(e).__name__}); see the worker log") from None
            source = parse_source(settings.pool(name).model)
            if source.kind == "hub":  # loaded from a snapshot folder named by its commit
                lm.identity = replace(lm.identity, name=source.repo, revision=source.revision)
            seconds = time.perf_counter() - start
            log.info("loaded model of pool %s in %.1f s", name, seconds)
            if on_load is not None:
                on_load(seconds)
            _models[name] = lm
    return lm


# ------------------------------------------------------------------------------ datasets


def dataset_source(settings: Settings, p: IngestPlan) -> RecordSource:
    """The records of the dataset a plan names, read range by range.

    With ranges (JSONL, Parquet) a shard reads only its own bytes, by ranged GETs on S3,
    each range checked against the sha256 the plan recorded for it: a dataset replaced
    after planning is refused (Mismatch naming the range), never mixed into one index.
    Without (gzip), the file is fetched whole (if not cached on disk) and must still hash
    to the plan's sha256.
    """
    if p.ranges:
        return DatasetRecords(p, dataset_bytes(p.dataset_uri, settings), None)
    path = materialize(p.dataset_uri, settings)
    got = file_sha256(path, p.dataset_uri)
    if got != p.dataset_sha256:
        raise Mismatch(f"dataset {p.dataset_uri} changed since the job was planned (sha256 "
                       f"{got[:12]} vs {p.dataset_sha256[:12]})")
    return DatasetRecords(p, FileBytes(path, p.dataset_uri), path)


# ---------------------------------------------------------------------------- requests


@dataclass
class Request:
    """The ``request`` field of an ingest or compaction job, as the gateway writes it."""

    prefix: str
    dataset_uri: str = ""
    fields: dict[str, Any] | None = None
    config: dict[str, Any] | None = None
    shard_size: int = constants.DEFAULT_SHARD_SIZE
    pool: str = ""
    append: bool = False

    @classmethod
    def of(cls, job: Mapping[str, Any]) -> Request:
        raw = job.get("request")
        if not isinstance(raw, Mapping) or not isinstance(raw.get("prefix"), str) \
                or not raw["prefix"]:
            raise InvalidInput(f"job {job.get('id')!r} has no valid request")
        known = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}
        req = cls(**known)
        if not isinstance(req.shard_size, int) or isinstance(req.shard_size, bool) \
                or req.shard_size < 1:
            raise InvalidInput("shard size must be >= 1")
        return req


def request_config(req: Request) -> SketchConfig | None:
    """The sketch configuration a request names (None: the index's, for an append)."""
    if req.config is None:
        return None if req.append else SketchConfig()
    if not isinstance(req.config, Mapping):
        raise InvalidInput("invalid sketch configuration: expected an object")
    return sketch_config(**req.config)


def request_fields(req: Request) -> FieldMap | None:
    """The field map a request names (None: the index's first ingest's, for an append)."""
    if req.fields:
        return FieldMap.from_dict(req.fields)
    return None if req.append else FieldMap()

