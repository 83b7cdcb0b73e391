"""The Celery application of the worker pools.

``celery -A rise.worker.app worker -Q rise.pool.<pool>,rise.queries.<pool>,rise.control``
runs a worker.  Senders (the gateway) never import this module: they use
``rise.taskclient.TaskClient``, whose ``celery_config`` this app extends.  Building the
app connects to nothing and imports neither torch nor transformers.
"""

from __future__ import annotations

from celery import Celery

from rise.settings import Settings
from rise.taskclient import celery_config

# Seconds between the soft limit (SoftTimeLimitExceeded raised inside the task, so it
# can fail its job cleanly) and the hard limit (the child is killed).
SOFT_LIMIT_MARGIN_S = 60
# A message a worker took but never acked becomes visible again this long after delivery;
# it must outlive the longest task or a running shard would be handed out a second time.
VISIBILITY_MARGIN_S = 600


def make_app(settings: Settings | None = None) -> Celery:
    """The Celery app for ``settings`` (default: from RISE_* environment variables)."""
    settings = settings or Settings()
    app = Celery("rise", broker=settings.redis_url, backend=settings.redis_url,
                 include=["rise.worker.tasks"], set_as_current=False)
    hard = int(settings.task_time_limit_seconds)
    soft = max(1, hard - min(SOFT_LIMIT_MARGIN_S, max(1, hard // 10)))
    app.conf.update(celery_config(settings))
    app.conf.update(
        # A task is acked when it finishes, so a worker that dies mid-shard gives the shard
        # back; prefetch 1 keeps a busy worker from sitting on queued shards.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_time_limit=hard,
        task_soft_time_limit=soft,
        broker_transport_options={
            # Redis has no real acks: kombu keeps delivered messages in an "unacked" hash
            # and gives them back once visibility_timeout has passed.  Above the longest
            # task, or a slow shard would be redelivered while it still runs.
            "visibility_timeout": hard + VISIBILITY_MARGIN_S,
            # How often the unacked hash is swept for messages of a dead worker (kombu 5.7,
            # kombu/transport/redis.py, Channel.from_transport_options lists
            # 'unacked_restore_interval' and 'unacked_restore_throttle').  Defaults are a
            # sweep every 10 s that scans Redis on every 10th call: up to 100 s extra before
            # a lost shard is retried.  Sweep every 10 s and scan every time instead; the
            # scan is one ZRANGEBYSCORE under a mutex, cheap at this rate.
            "unacked_restore_interval": 10,
            "unacked_restore_throttle": 1,
        },
        worker_hijack_root_logger=False,
        # Query sketches go back to the gateway through the result backend.
        task_ignore_result=False,
        task_track_started=False,
    )
    app.rise_settings = settings  # type: ignore[attr-defined]  # the tasks read it
    return app


app = make_app()
