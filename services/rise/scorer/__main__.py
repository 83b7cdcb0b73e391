"""``python -m rise.scorer``: serve rise.v1.ScorerService with health, reflection and
/metrics, configured by ``RISE_*`` settings; SIGTERM (or SIGINT) drains in-flight calls
and exits 0.

The log line ``scorer serving rise.v1.ScorerService on HOST:PORT, metrics on :PORT``
names the bound ports (port 0 in the settings binds a free one).

Without an internal secret (``RISE_INTERNAL_SECRET`` or ``RISE_INTERNAL_SECRET_FILE``) it
refuses to start (exit 2), unless ``RISE_INTERNAL_AUTH=off``, which it logs as a warning:
then it answers unsigned calls for any index.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence

import torch

from rise import grpcutil
from rise.errors import InvalidInput, RiseError
from rise.internalauth import Verifier
from rise.metrics import for_service, serve
from rise.scorer.cache import StoreFactory
from rise.scorer.server import SERVICE_NAME, Scorer, add_to_server
from rise.settings import Settings

log = logging.getLogger("rise.scorer")

# Seconds in-flight calls get to finish after SIGTERM (below Kubernetes' default 30 s).
GRACE_SECONDS = 20.0


def _share_cores(scoring_threads: int) -> int:
    """Torch intra-op threads per scoring thread: the cores split between them, so shards
    scored in parallel do not oversubscribe the CPU (OMP_NUM_THREADS, if set, wins)."""
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    n = max(1, cores // max(1, scoring_threads))
    torch.set_num_threads(n)
    return n


def main(argv: Sequence[str] | None = None, *, store_factory: StoreFactory | None = None,
         settings: Settings | None = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if argv:
        print("usage: python -m rise.scorer  (configured by RISE_* environment variables)",
              file=sys.stderr)
        return 2
    try:
        settings = settings if settings is not None else Settings()
    except Exception as e:  # noqa: BLE001 - pydantic's validation error: say it, exit 2
        log.error("bad settings: %s", e)
        return 2
    try:
        verifier = Verifier.from_settings(settings)
    except InvalidInput as e:
        log.error("refusing to start: %s", e.message)
        return 2
    if not verifier.enabled:
        log.warning("RISE_INTERNAL_AUTH=off: this scorer answers UNSIGNED calls for ANY "
                    "tenant's index; anyone who reaches its port reads every index")
    torch_threads = _share_cores(settings.scorer_threads)
    metrics = for_service("scorer")
    scorer = Scorer(settings, metrics, store_factory=store_factory, verifier=verifier)
    grpcutil.touch_rpc_metrics(metrics, "scorer", [scorer])
    server = grpcutil.make_server(settings.max_message_bytes)
    add_to_server(scorer, server)
    health = grpcutil.add_health_and_reflection(server, [SERVICE_NAME])
    address = f"{settings.scorer_host}:{settings.scorer_port}"
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as e:
        log.error("cannot bind %s: %s", address, e)
        return 1
    if port == 0:
        log.error("cannot bind %s", address)
        return 1
    try:
        started = serve(settings.metrics_port, metrics.registry, addr=settings.metrics_host)
    except (OSError, RiseError) as e:
        log.error("cannot serve /metrics on port %s: %s", settings.metrics_port, e)
        return 1
    http = started[0] if isinstance(started, tuple) else started
    metrics_port = getattr(http, "server_port", settings.metrics_port)

    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("%s: draining (grace %.0f s)", signal.Signals(signum).name, GRACE_SECONDS)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.start()
    log.info("scorer serving %s on %s:%d, metrics on :%d (replica %d of %d, %d scoring "
             "threads x %d torch threads, cache %d bytes, internal auth %s)", SERVICE_NAME,
             settings.scorer_host, port, metrics_port, settings.scorer_replica,
             settings.scorer_replicas, scorer.threads, torch_threads,
             settings.scorer_cache_bytes, "on" if verifier.enabled else "OFF")
    while not stop.wait(3600):
        pass
    health.enter_graceful_shutdown()  # health checks answer NOT_SERVING from now on
    server.stop(GRACE_SECONDS).wait()
    scorer.close()
    if hasattr(http, "shutdown"):
        http.shutdown()
    log.info("scorer stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
