"""Run the job controller: ``python -m rise.controller`` (settings from RISE_* variables).

One process per deployment is enough; more wait on the lease and take over when the
leader stops.  SIGTERM and SIGINT stop it at the end of the current pass.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

import redis

from rise.controller.loop import Controller
from rise.datasets import open_store
from rise.jobs import KINDS, TERMINAL, JobStore
from rise.metrics import for_service, serve
from rise.settings import Settings
from rise.taskclient import TaskClient

log = logging.getLogger("rise.controller")


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if argv:
        print("usage: python -m rise.controller  (configured by RISE_* environment variables)",
              file=sys.stderr)
        return 2
    try:
        settings = Settings()
    except Exception as e:  # noqa: BLE001 - pydantic's validation error: say it, exit 2
        log.error("bad settings: %s", e)
        return 2
    metrics = for_service("controller")
    for part in ("prepare", "shard", "compact"):  # export every series from the start
        metrics.controller_requeued_total.labels(part=part)
    for code in ("DEADLINE_EXCEEDED", "UNAVAILABLE", "FAILED_PRECONDITION"):
        metrics.controller_jobs_failed_total.labels(code=code)
    for pool in settings.pools:
        for kind in KINDS:
            for state in sorted(TERMINAL):
                metrics.job_duration_seconds.labels(pool=pool, kind=kind, state=state)
    js = JobStore(redis.Redis.from_url(settings.redis_url, decode_responses=True,
                                       socket_timeout=10, socket_connect_timeout=5,
                                       **settings.redis_tls()),
                  ended_ttl_seconds=settings.job_ttl_seconds)  # the controller expires them
    controller = Controller(settings, js, TaskClient(settings).send,
                            lambda prefix: open_store(settings, prefix), metrics=metrics)
    try:
        serve(settings.metrics_port, metrics.registry, addr=settings.metrics_host)
    except OSError as e:
        log.error("cannot serve /metrics on port %d: %s", settings.metrics_port, e)
        return 1
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: stopping after this pass", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("controller %s started (interval %g s, stall %g s, metrics :%d)",
             controller.holder, settings.controller_interval_seconds,
             settings.shard_stall_seconds, settings.metrics_port)
    controller.run(stop)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
