"""A job task that overruns the time limits, for tests/rise/worker/test_tasks.py: imported
by a test worker with ``celery worker -I stuck_tasks``, never by the product."""

from __future__ import annotations

import time

from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded
from rise.worker.tasks import RiseTask


@shared_task(bind=True, base=RiseTask, name="rise.test.overrun", job_arg=0)
def overrun(self: RiseTask, job_id: str, seconds: float, ignore_soft_limit: bool) -> str:
    """Sleep ``seconds``; with ``ignore_soft_limit`` swallow the soft limit, as a task
    stuck in native code would, so only the hard limit (the child killed) ends it."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            time.sleep(0.05)
        except SoftTimeLimitExceeded:
            if not ignore_soft_limit:
                raise
    return "ok"
