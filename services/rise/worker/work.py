"""The work behind the Celery tasks, kept out of the task bodies so it reads (and tests)
as plain functions: per-process model and dataset caches, planning an ingest, writing one
shard, committing the manifest, validating inline query records.

Everything here runs in a worker child process; torch and transformers are imported by
the domain modules it calls, never by ``rise.worker.app``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rise import constants
from rise.data import FieldMap, Record
from rise.errors import (
    AlreadyExists,
    BudgetExceeded,
    InvalidInput,
    StorageError,
)
from rise.index import ingest_entry, model_entry
from rise.settings import Pool, Settings

log = logging.getLogger("rise.worker")

# How often a running shard asks Redis whether its job was cancelled.
CANCEL_POLL_S = 1.0
# Datasets whose parsed records a worker process keeps (most recent first).
RECORD_CACHE_ENTRIES = 2
# The set of shard numbers done per job outlives any job by this much.


class ShardsPending(StorageError):
    """Commit found shards not yet written: a redelivered shard task made the chord fire
    early.  A StorageError, so the commit task is retried with backoff."""


# ------------------------------------------------------------------------------ redis


_redis_lock = threading.Lock()
_redis_clients: dict[str, Any] = {}


def job_store(settings: Settings):
    """The JobStore of this process (one Redis connection pool per URL and process)."""
    import redis

    from rise.jobs import JobStore

    with _redis_lock:
        client = _redis_clients.get(settings.redis_url)
        if client is None:
            client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
            _redis_clients[settings.redis_url] = client
    return JobStore(client)


class CancelPoll:
    """A cancel callback for featurize: asks Redis at most once per ``interval`` seconds."""

    def __init__(self, js, job_id: str, interval: float = CANCEL_POLL_S) -> None:
        self.js, self.job_id, self.interval = js, job_id, interval
        self.last = float("-inf")
        self.cancelled = False

    def __call__(self) -> bool:
        now = time.monotonic()
        if not self.cancelled and now - self.last >= self.interval:
            self.last = now
            self.cancelled = self.js.is_cancelled(self.job_id)
        return self.cancelled


# ------------------------------------------------------------------------------ store


# ------------------------------------------------------------------------------ models


_models: dict[str, Any] = {}
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


def load_pool_model(pool: Pool):
    """Load a pool's model: float32 on the CPU, or placed over the GPUs by the planner."""
    from transformers.utils import logging as hf_logging

    from rise.model import load_model

    hf_logging.disable_progress_bar()  # Celery would log every tqdm refresh as a warning
    if pool.gpus == 0:
        return load_model(pool.model, dtype="float32", device_map=None)
    # GPU branch: the planner's device map pins the head and final norm to the last GPU
    # (the head device, where the sketches run) and spreads the layers over the others.
    # Not exercised by the CPU test suite.
    from rise.plan import parse_bytes, plan_model

    plan = plan_model(pool.model, pool.gpus, pool.gpu_memory, batch_size=pool.batch_size,
                      max_length=constants.DEFAULT_MAX_LENGTH, dtype=pool.dtype)
    if not plan.fits:
        raise BudgetExceeded(f"model {pool.model} does not fit the pool's GPUs: {plan.reason}")
    budget = parse_bytes(pool.gpu_memory)
    return load_model(pool.model, dtype=pool.dtype, device_map=plan.device_map,
                      max_memory={i: budget for i in range(pool.gpus)})


def get_model(settings: Settings, name: str, on_load=None):
    """The pool's model, loaded once per worker process; ``on_load(seconds)`` on a load."""
    with _model_lock:
        lm = _models.get(name)
        if lm is None:
            start = time.perf_counter()
            lm = load_pool_model(settings.pool(name))
            seconds = time.perf_counter() - start
            log.info("loaded model of pool %s in %.1f s", name, seconds)
            if on_load is not None:
                on_load(seconds)
            _models[name] = lm
    return lm


# ------------------------------------------------------------------------------ datasets


_records: OrderedDict[tuple[str, str, str], list[Record]] = OrderedDict()


def _fields_key(fields: FieldMap) -> str:
    return json.dumps(fields.to_dict(), sort_keys=True)


def _cache_records(key: tuple[str, str, str], records: list[Record]) -> None:
    _records[key] = records
    _records.move_to_end(key)
    while len(_records) > RECORD_CACHE_ENTRIES:
        _records.popitem(last=False)


def dataset_records(settings: Settings, uri: str, sha256: str, fields: FieldMap
                    ) -> list[Record]:
    """The validated records of the dataset a plan names, cached per process by sha256.

    The file is fetched again (if not cached on disk) and must still hash to ``sha256``: a
    dataset replaced after planning would otherwise mix two datasets in one index.
    """
    from rise.data import file_sha256, read_records
    from rise.datasets import materialize
    from rise.errors import Mismatch

    key = (uri, sha256, _fields_key(fields))
    if key in _records:
        _records.move_to_end(key)
        return _records[key]
    path = materialize(uri, settings)
    got = file_sha256(path)
    if got != sha256:
        raise Mismatch(f"dataset {uri} changed since the job was planned (sha256 "
                       f"{got[:12]} vs {sha256[:12]})")
    records = read_records(path, fields)
    _cache_records(key, records)
    return records


# ------------------------------------------------------------------------------ ingest


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


@dataclass
class Planned:
    plan: Any  # rise.index.IngestPlan
    truncated: int
    tokens: int


def plan_ingest(settings: Settings, store, lm, req: Request) -> tuple[Planned, list[Record]]:
    """Check the dataset and fix the ingest plan (no shard is written here).

    Create: generation 1, the request's config and shard size; an existing manifest is
    AlreadyExists.  Append: the next generation, the index's config, field map (unless the
    request gives one) and shard size; ids must not clash with live ids; the model must be
    the index's.  Every record is tokenized now so a bad one fails the job before any
    shard task runs.
    """
    from rise.config import SketchConfig
    from rise.data import check_unique_ids, file_sha256, read_records
    from rise.datasets import materialize
    from rise.index import (
        IngestPlan,
        encode_all,
        exact_bytes,
        manifest_generations,
        open_index,
        read_manifest,
    )

    existing = None
    if req.append:
        idx = open_index(store)
        idx.check_model(lm)
        config = idx.config
        first = idx.manifest["ingests"][0]
        fields = FieldMap.from_dict(req.fields) if req.fields else \
            FieldMap.from_dict(first["fields"])
        generation = idx.generation + 1
        shard_size = int(first["shard_size"])  # as rise.index.append: one size per index
    else:
        gens = manifest_generations(store)
        if gens:
            m = read_manifest(store, gens[-1])
            raise AlreadyExists(
                f"an index already exists at {store.describe()} (generation "
                f"{m['generation']}, {m['live_count']} live examples); append to add data")
        try:
            config = SketchConfig(**(req.config or {}))
        except ValueError as e:
            errs = getattr(e, "errors", None)
            detail = "; ".join(x["msg"] for x in errs()) if errs else str(e)
            raise InvalidInput(f"invalid sketch configuration: {detail}") from None
        fields = FieldMap.from_dict(req.fields or {})
        generation = 1
        shard_size = req.shard_size
    path = materialize(req.dataset_uri, settings)
    records = read_records(path, fields)
    if not records:
        raise InvalidInput(f"{req.dataset_uri}: no records")
    if req.append:
        existing = idx.live_ids()
    check_unique_ids(records, existing)
    encoded = encode_all(records, lm, config, fields)
    if not config.sketched:
        est = exact_bytes(encoded, config, lm.head.vocab, lm.head.hidden)
        if est > constants.DEFAULT_EXACT_BUDGET_BYTES:
            raise BudgetExceeded(
                f"{config.mode} mode would store about {est / 2**20:.1f} MiB of per-token "
                f"factors, over the budget of "
                f"{constants.DEFAULT_EXACT_BUDGET_BYTES / 2**20:.1f} MiB")
    sha = file_sha256(path)
    plan = IngestPlan(
        generation=generation, dataset_uri=req.dataset_uri, dataset_sha256=sha,
        fields=fields.to_dict(), config=config.to_dict(), model=model_entry(lm),
        n_records=len(records), shard_size=shard_size,
    )
    _cache_records((req.dataset_uri, sha, _fields_key(fields)), records)
    return Planned(plan, truncated=sum(e.truncated for e in encoded),
                   tokens=sum(e.n_supervised for e in encoded)), records


def write_shard(store, lm, plan, n: int, records: Sequence[Record], *, batch_size: int,
                progress=None, cancel=None) -> tuple[bool, int, int]:
    """Write shard ``n`` of ``plan`` unless a valid copy is there.

    Returns (written, examples, supervised tokens) of the shard.
    """
    from rise.config import SketchConfig
    from rise.index import encode_all, shard_is_valid, sketch_shard

    if not 0 <= n < plan.n_shards:
        raise InvalidInput(f"shard {n} out of range: the plan has {plan.n_shards} shards")
    rng = plan.shard_range(n)
    config = SketchConfig(**plan.config)
    fields = FieldMap.from_dict(plan.fields)
    part = records[rng.start:rng.stop]
    encoded = encode_all(part, lm, config, fields)
    tokens = sum(e.n_supervised for e in encoded)
    key = constants.shard_key(plan.generation, n)
    if shard_is_valid(store, key, plan.shard_meta(n)):
        return False, len(part), tokens
    data = sketch_shard(lm, plan, n, part, encoded, batch_size=batch_size, progress=progress,
                        cancel=cancel)
    store.put(key, data)
    return True, len(part), tokens


def commit_ingest(store, plan, truncated: int) -> int:
    """Write the manifest of ``plan``'s generation over its shards; returns the generation.

    Every shard must be present and describe this plan (ShardsPending otherwise: retried).
    An append stacks the new shards on the previous generation's, tombstones carried; the
    previous generation must still be the current one.  Rerunning after the manifest was
    written is a no-op when that manifest holds exactly these shards.
    """
    from rise.config import SketchConfig
    from rise.index import (
        new_manifest,
        open_index,
        read_manifest,
        shard_entry,
        shard_is_valid,
        write_manifest,
    )

    missing = [n for n in range(plan.n_shards)
               if not shard_is_valid(store, constants.shard_key(plan.generation, n),
                                     plan.shard_meta(n))]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise ShardsPending(
            f"shards {', '.join(map(str, missing[:3]))}{more} of generation "
            f"{plan.generation} are missing or invalid")
    entries = [shard_entry(store, constants.shard_key(plan.generation, n), plan.generation, n)
               for n in range(plan.n_shards)]
    config = SketchConfig(**plan.config)
    ingest = ingest_entry(plan, truncated)
    if plan.generation == 1:
        manifest = new_manifest(1, model=plan.model, config=config, ingests=[ingest],
                                shards=entries, tombstones=[])
    else:
        prev = open_index(store)
        if prev.generation == plan.generation and \
                [s["key"] for s in prev.manifest["shards"][-len(entries):]] == \
                [e["key"] for e in entries]:
            return plan.generation  # committed by an earlier run of this task
        if prev.generation != plan.generation - 1:
            raise AlreadyExists(
                f"the index moved to generation {prev.generation} while generation "
                f"{plan.generation} was being ingested")
        m = prev.manifest
        manifest = new_manifest(plan.generation, model=m["model"], config=prev.config,
                                ingests=m["ingests"] + [ingest], shards=m["shards"] + entries,
                                tombstones=m["tombstones"])
    try:
        write_manifest(store, manifest)
    except AlreadyExists:
        there = read_manifest(store, plan.generation)
        if [s["sha256"] for s in there["shards"][-len(entries):]] != \
                [e["sha256"] for e in entries]:
            raise
    return plan.generation
