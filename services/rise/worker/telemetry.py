"""Worker metrics: the ``worker`` catalogue of rise.metrics, in prometheus-client's
multiprocess mode when PROMETHEUS_MULTIPROC_DIR is set (Celery's prefork children each
write their own files; the main process serves the sum on ``settings.metrics_port``).

Every series carries ``pool``: the pool this worker serves (``RISE_WORKER_POOL``, or the
only pool).  GPU figures (``rise.worker.gpustats``) are exported only where there is a GPU.

Signal handlers: ``worker_init`` (main process) starts /metrics; ``worker_process_shutdown``
(each child, as it exits) marks the child dead for the live gauges.
"""

from __future__ import annotations

import logging
import os
import threading

from celery import signals
from prometheus_client import REGISTRY, multiprocess

from rise import errors, taskclient
from rise.jobs import KINDS
from rise.metrics import for_service, serve
from rise.settings import Settings
from rise.worker import gpustats

log = logging.getLogger("rise.worker")

TASK_NAMES = taskclient.ALL
OUTCOMES = ("ok", "skipped", "retry", "error")
SERVICE = "worker"

_lock = threading.Lock()
_metrics = None
_pool: str | None = None


def pool_of(settings: Settings) -> str:
    """The pool label of this worker's series."""
    if settings.worker_pool:
        return settings.worker_pool
    return next(iter(settings.pools)) if len(settings.pools) == 1 else ""


def pool() -> str:
    global _pool
    if _pool is None:
        try:
            _pool = pool_of(Settings())
        except Exception:  # noqa: BLE001 - bad settings fail elsewhere, loudly
            _pool = ""
    return _pool


def set_pool(settings: Settings) -> None:
    global _pool
    _pool = pool_of(settings)


def _error_codes() -> list[str]:
    codes = {"INTERNAL"}
    todo = [errors.RiseError]
    while todo:
        cls = todo.pop()
        codes.add(cls.grpc_code)
        todo.extend(cls.__subclasses__())
    return sorted(codes)


def metrics():
    """The worker's metrics, created once per process on prometheus' default registry."""
    global _metrics
    with _lock:
        if _metrics is None:
            _metrics = for_service(SERVICE, registry=REGISTRY)
    return _metrics


def touch_labels() -> None:
    """Create every label set the worker uses, at zero, so each name is exported (and
    rate() works) before its first event; in multiprocess mode an untouched labelled
    metric writes nothing and would be missing from /metrics."""
    m = metrics()
    p = pool()
    for task in TASK_NAMES:
        m.task_duration_seconds.labels(pool=p, task=task)
        for outcome in OUTCOMES:
            m.tasks_total.labels(pool=p, task=task, outcome=outcome)
    for kind in KINDS:
        m.job_queue_wait_seconds.labels(pool=p, kind=kind)
    m.examples_sketched_total.labels(pool=p)
    m.tokens_sketched_total.labels(pool=p)
    m.model_load_seconds.labels(pool=p)
    m.storage_bytes_written_total.labels(service=SERVICE)
    m.storage_bytes_read_total.labels(service=SERVICE)
    for code in _error_codes():
        m.errors_total.labels(service=SERVICE, code=code)


def record_outcome(task: str, outcome: str, seconds: float | None = None) -> None:
    m = metrics()
    m.tasks_total.labels(pool=pool(), task=task, outcome=outcome).inc()
    if seconds is not None:
        task_seconds(task, seconds)


def task_seconds(task: str, seconds: float) -> None:
    metrics().task_duration_seconds.labels(pool=pool(), task=task).observe(seconds)


def job_started(job: dict, seconds: float) -> None:
    """The first task of ``job`` started ``seconds`` after the job was submitted."""
    metrics().job_queue_wait_seconds.labels(
        pool=str(job.get("pool") or pool()), kind=str(job.get("kind"))).observe(
            max(0.0, seconds))


def record_error(code: str) -> None:
    metrics().errors_total.labels(service=SERVICE, code=code).inc()


def bytes_read(n: int) -> None:
    metrics().storage_bytes_read_total.labels(service=SERVICE).inc(n)


def bytes_written(n: int) -> None:
    metrics().storage_bytes_written_total.labels(service=SERVICE).inc(n)


def sketched(examples: int, tokens: int, pool_name: str | None = None) -> None:
    """Examples and tokens of one batch, for ``pool_name`` (default: the worker's); the
    GPU memory gauges follow, in the process that ran the batch."""
    m = metrics()
    p = pool_name or pool()
    m.examples_sketched_total.labels(pool=p).inc(examples)
    m.tokens_sketched_total.labels(pool=p).inc(tokens)
    gpustats.record_torch_memory(m, p)


def model_loaded(seconds: float) -> None:
    m = metrics()
    m.model_load_seconds.labels(pool=pool()).observe(seconds)
    gpustats.record_torch_memory(m, pool())


@signals.worker_init.connect
def _serve_metrics(sender=None, **_kw) -> None:
    """Main process: create the metrics, then serve /metrics for all the processes."""
    app = getattr(sender, "app", None)
    settings = getattr(app, "rise_settings", None) or Settings()
    set_pool(settings)
    touch_labels()
    try:
        serve(settings.metrics_port, addr=settings.metrics_host,
              collectors=[gpustats.NvmlCollector(pool())])
    except OSError as e:  # a second worker on the same host and port: run without /metrics
        log.warning("cannot serve /metrics on port %s: %s", settings.metrics_port, e)


@signals.worker_process_shutdown.connect
def _child_exit(pid=None, **_kw) -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(pid or os.getpid())
