"""The Prometheus metric catalogue: every name the platform exports, in one place.

Names are ``rise_*`` with unit suffixes; labels come from small fixed sets (service,
method, gRPC code, pool, queue, task, state, kind, outcome, gpu) and never name a job, a
shard or an example.  ``pool`` is a worker pool's name (``RISE_POOLS``): every throughput,
job and GPU metric carries it, so a dashboard can show one pool.

Each service builds its metrics on its own registry with ``for_service`` and serves them
with ``serve``; Celery's pre-forked workers use the multiprocess mode of prometheus-client
(``PROMETHEUS_MULTIPROC_DIR``), which ``serve`` honours.

The dashboards and alert rules in ``deploy/`` may use only names from ``CATALOGUE``; a test
checks it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    multiprocess,
    start_http_server,
)

# name -> (type, help, labels, services that export it)
CATALOGUE: dict[str, tuple[str, str, tuple[str, ...], tuple[str, ...]]] = {
    "rise_grpc_requests_total": (
        "counter", "gRPC requests handled, by method and status code",
        ("service", "method", "code"), ("gateway", "scorer")),
    "rise_grpc_request_duration_seconds": (
        "histogram", "gRPC request latency", ("service", "method"), ("gateway", "scorer")),
    "rise_auth_tokens_stale": (
        "gauge", "1 while the auth tokens file cannot be loaded and the last good token map "
        "stays in force (revocations in the file are not applied)", (), ("gateway",)),
    "rise_jobs_submitted_total": (
        "counter", "jobs accepted by the gateway", ("pool", "kind"), ("gateway",)),
    "rise_jobs": (
        "gauge", "jobs not yet ended (QUEUED, RUNNING), from the job store's set of active "
        "jobs (never a scan of every job)", ("pool", "state"), ("gateway",)),
    "rise_queue_depth": (
        "gauge", "messages waiting in a Celery queue (the pool it feeds; empty for the "
        "control queue)", ("pool", "queue"), ("gateway",)),
    "rise_job_duration_seconds": (
        "histogram", "submission to end of a job, observed once as it ends, by end state "
        "(its _count is the rate of jobs completed)", ("pool", "kind", "state"),
        ("controller",)),
    "rise_job_queue_wait_seconds": (
        "histogram", "submission to the start of a job's first task (time in the queue)",
        ("pool", "kind"), ("worker",)),
    "rise_task_duration_seconds": (
        "histogram", "Celery task run time", ("pool", "task"), ("worker",)),
    "rise_tasks_total": (
        "counter", "Celery tasks finished, by outcome (ok, skipped, retry, error)",
        ("pool", "task", "outcome"), ("worker",)),
    "rise_examples_sketched_total": (
        "counter", "examples read out and sketched", ("pool",), ("worker",)),
    "rise_tokens_sketched_total": (
        "counter", "supervised tokens read out and sketched", ("pool",), ("worker",)),
    "rise_model_load_seconds": (
        "histogram", "time to load a model into a worker process", ("pool",), ("worker",)),
    "rise_gpu_memory_allocated_bytes": (
        "gauge", "GPU memory held by tensors of the worker's processes "
        "(torch.cuda.memory_allocated, summed over the live processes)", ("pool", "gpu"),
        ("worker",)),
    "rise_gpu_memory_reserved_bytes": (
        "gauge", "GPU memory reserved by torch's caching allocator in the worker's processes "
        "(torch.cuda.memory_reserved)", ("pool", "gpu"), ("worker",)),
    "rise_gpu_memory_max_allocated_bytes": (
        "gauge", "peak GPU memory held by tensors since each process started "
        "(torch.cuda.max_memory_allocated)", ("pool", "gpu"), ("worker",)),
    "rise_gpu_utilization_ratio": (
        "gauge", "fraction of the last sample period a kernel ran on the GPU (NVML, read at "
        "scrape time; needs nvidia-ml-py)", ("pool", "gpu"), ("worker",)),
    "rise_gpu_memory_used_bytes": (
        "gauge", "GPU memory in use on the device by every process (NVML)", ("pool", "gpu"),
        ("worker",)),
    "rise_storage_bytes_written_total": (
        "counter", "bytes written to the object store", ("service",), ("worker", "gateway")),
    "rise_storage_bytes_read_total": (
        "counter", "bytes read from the object store", ("service",),
        ("worker", "scorer", "gateway")),
    "rise_scorer_shards_scanned_total": (
        "counter", "shards scored", (), ("scorer",)),
    "rise_scorer_bytes_scanned_total": (
        "counter", "sketch bytes scored", (), ("scorer",)),
    "rise_scorer_cache_bytes": (
        "gauge", "bytes of shards held in the scorer's cache", (), ("scorer",)),
    "rise_controller_leader": (
        "gauge", "1 while this controller holds the lease and drives jobs", (), ("controller",)),
    "rise_controller_active_jobs": (
        "gauge", "jobs not yet ended, as the controller last counted them", (),
        ("controller",)),
    "rise_controller_requeued_total": (
        "counter", "lost tasks the controller enqueued again (prepare, shard, compact)",
        ("part",), ("controller",)),
    "rise_controller_commits_total": (
        "counter", "generations the controller committed after a lost chord callback", (),
        ("controller",)),
    "rise_controller_jobs_failed_total": (
        "counter", "jobs the controller ended FAILED (deadline, retry budget), by code",
        ("code",), ("controller",)),
    "rise_controller_swept_objects_total": (
        "counter", "orphan objects the sweeper deleted", (), ("controller",)),
    "rise_controller_errors_total": (
        "counter", "controller passes that failed (Redis or the store away)", (),
        ("controller",)),
    "rise_controller_tick_seconds": (
        "histogram", "time of one controller pass over the jobs", (), ("controller",)),
    "rise_errors_total": (
        "counter", "errors by service and gRPC status code name", ("service", "code"),
        ("gateway", "worker", "scorer")),
}

GPU = frozenset(n for n in CATALOGUE if n.startswith("rise_gpu_"))
"""Exported only by a worker that has a GPU (torch's memory) or NVML (utilisation and device
memory: ``pip install rise[gpu]``); absent elsewhere, never an error."""

NVML = frozenset({"rise_gpu_utilization_ratio", "rise_gpu_memory_used_bytes"})
"""Device-wide GPU figures, read from NVML at scrape time by the worker's serving process
(a collector, ``rise.worker.gpustats``): ``for_service`` creates no object for them."""

# How the live processes of a Celery worker combine a gauge (multiprocess mode): per-process
# memory adds up; everything else is the same value in every process.
GAUGE_MODES = {"rise_gpu_memory_allocated_bytes": "livesum",
               "rise_gpu_memory_reserved_bytes": "livesum",
               "rise_gpu_memory_max_allocated_bytes": "livesum"}

# Latency buckets: gRPC calls from 1 ms to 60 s; shard tasks from 0.1 s to 1 h; jobs and
# their queue wait from 0.5 s to a day.
RPC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TASK_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
JOB_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 3 * 3600, 6 * 3600,
               86400)


@dataclass
class Metrics:
    """The metric objects of one service, by name (without the ``rise_`` prefix)."""

    service: str
    registry: object
    objects: dict

    def __getattr__(self, item: str):
        try:
            return self.objects["rise_" + item]
        except KeyError:
            raise AttributeError(item) from None


def names_for(service: str, optional: bool = False) -> list[str]:
    """The metrics ``service`` always exports; with ``optional``, also those it exports only
    on some machines (``GPU``)."""
    return sorted(n for n, spec in CATALOGUE.items()
                  if service in spec[3] and (optional or n not in GPU))


def for_service(service: str, registry=None) -> Metrics:
    """Create the service's metrics on ``registry`` (a fresh one by default)."""
    registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
    kinds = {"counter": Counter, "gauge": Gauge, "histogram": Histogram}
    objects = {}
    for name in names_for(service, optional=True):
        if name in NVML:
            continue
        kind, doc, labels, _ = CATALOGUE[name]
        kw: dict = {"registry": registry, "labelnames": labels}
        if kind == "histogram":
            kw["buckets"] = (JOB_BUCKETS if name.startswith("rise_job_") else
                             TASK_BUCKETS if "task" in name or "load" in name else RPC_BUCKETS)
        if kind == "gauge" and os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            kw["multiprocess_mode"] = GAUGE_MODES.get(name, "livemax")
        metric_name = name.removesuffix("_total") if kind == "counter" else name
        objects[name] = kinds[kind](metric_name, doc, **kw)
    return Metrics(service=service, registry=registry, objects=objects)


def serve(port: int, registry=None, addr: str = "0.0.0.0", collectors=()) -> object:
    """Serve /metrics on ``port``; in multiprocess mode, aggregate every process's files.
    ``collectors``: more collectors read at scrape time by the serving process."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    for c in collectors:
        (registry if registry is not None else REGISTRY).register(c)
    return start_http_server(port, addr=addr, registry=registry if registry is not None
                             else REGISTRY)
