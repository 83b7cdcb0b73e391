"""The names of the worker tasks and a client that sends them.

The gateway (and anything else that enqueues work) uses ``TaskClient``: a Celery app that
only sends, built on demand from explicit settings (nothing is built from the environment
at import), so senders never import the worker's modules.  The worker's app
(``rise.worker.app``) takes its Celery configuration from ``celery_config`` here, so the
two sides agree on serialisation by construction.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.result import AsyncResult

from rise.settings import Settings

INGEST_PREPARE = "rise.ingest.prepare"
"""Check the data, fix the plan, launch the chord (the pool's queue)."""
INGEST_SHARD = "rise.ingest.shard"
"""Sketch and put one shard (the pool's queue)."""
INGEST_COMMIT = "rise.ingest.commit"
"""Write the manifest (control queue; no model)."""
INDEX_COMPACT = "rise.index.compact"
"""Compact an index (control queue)."""
QUERIES_SKETCH = "rise.queries.sketch"
"""Sketch inline query records (the pool's query queue)."""
QUERIES_EXPLAIN = "rise.queries.explain"
"""Explain one hit of an inline query, token pair by token pair (the pool's query queue)."""
QUERIES_GENERATE = "rise.queries.generate"
"""Generate the model's responses to inline prompts and sketch them as queries (the pool's
query queue)."""

POOL_IDENTITY = "rise.pool.identity"
"""The identity of the pool's model, as an index's manifest records it (the pool's query
queue): ImportIndex checks an imported index against it."""

ALL = (INGEST_PREPARE, INGEST_SHARD, INGEST_COMMIT, INDEX_COMPACT, QUERIES_SKETCH,
       POOL_IDENTITY,
       QUERIES_EXPLAIN, QUERIES_GENERATE)

RESULT_EXPIRES_S = 7 * 24 * 3600


def celery_config(settings: Settings) -> dict[str, Any]:
    """What senders and workers must agree on: JSON only, where results go, and TLS to a
    ``rediss://`` broker and result backend (both need it spelled out)."""
    conf: dict[str, Any] = dict(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_default_queue=settings.control_queue,
        result_expires=RESULT_EXPIRES_S,
        broker_connection_retry_on_startup=True,
    )
    tls = settings.redis_tls()
    if tls:
        conf.update(broker_use_ssl=dict(tls), redis_backend_use_ssl=dict(tls))
    return conf


class TaskClient:
    """Sends tasks by name to the workers' broker; connects on first use."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = Celery("rise-client", broker=settings.redis_url,
                          backend=settings.redis_url, set_as_current=False)
        self.app.conf.update(celery_config(settings))

    def send(self, name: str, *, args: list[Any], queue: str) -> AsyncResult:
        if name not in ALL:
            raise ValueError(f"unknown task {name!r}")
        return self.app.send_task(name, args=args, queue=queue)
