"""Run the gateway: ``python -m rise.gateway`` (settings from RISE_* variables).

It serves TLS when ``RISE_TLS_CERT_FILE`` and ``RISE_TLS_KEY_FILE`` are set (with
``RISE_HEALTH_PORT``, plaintext grpc.health.v1 alone on that port for probes), signs
its scorer calls with the internal secret (``rise.internalauth``; it refuses to start
without one unless ``RISE_INTERNAL_AUTH=off``) and serves /metrics on
``RISE_METRICS_HOST``.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from typing import Any

import grpc
import redis

from rise.datasets import materialize, open_store
from rise.errors import InvalidInput, RiseError
from rise.gateway.limits import Admission, Limits
from rise.gateway.service import Auth, Deps, IndexService, JobService, ScoringService
from rise.grpcutil import (
    add_health_and_reflection,
    add_port,
    health_server,
    make_server,
    touch_rpc_metrics,
)
from rise.internalauth import Signer
from rise.jobs import KINDS, QUEUED, RUNNING, JobStore
from rise.metrics import for_service, serve
from rise.registry import Registry
from rise.settings import Settings
from rise.store import CountingStore
from rise.taskclient import TaskClient
from rise.v1 import rise_pb2_grpc, scorer_pb2_grpc

log = logging.getLogger("rise.gateway")
SERVICES = ["rise.v1.IndexService", "rise.v1.JobService", "rise.v1.ScoringService"]
ACTIVE_STATES = (QUEUED, RUNNING)


def build(settings: Settings) -> tuple[grpc.Server, Deps, Any]:
    """The gateway's server (no port bound yet), its dependencies and its health servicer;
    InvalidInput when scorer calls cannot be signed (no internal secret)."""
    signer = Signer.from_settings(settings)
    metrics = for_service("gateway")
    read = metrics.storage_bytes_read_total.labels("gateway")
    written = metrics.storage_bytes_written_total.labels("gateway")
    r = redis.Redis.from_url(settings.redis_url, decode_responses=True,
                             **settings.redis_tls())
    channels = [grpc.insecure_channel(a.strip(), options=[
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes)])
        for a in settings.scorer_addresses.split(",") if a.strip()]
    deps = Deps(
        settings=settings, jobs=JobStore(r), send_task=TaskClient(settings).send,
        store=lambda prefix: CountingStore(open_store(settings, prefix), read.inc, written.inc),
        scorers=[scorer_pb2_grpc.ScorerServiceStub(c) for c in channels],
        materialize=lambda uri: str(materialize(uri, settings)), metrics=metrics,
        signer=signer)
    auth = Auth(settings, metrics)  # rise_auth_tokens_stale while the file cannot be loaded
    # Per-tenant and global caps on calls and streams, a reserve of threads for health
    # checks (rise.gateway.limits).
    admission = Admission(Limits.from_settings(settings), auth.tenant, metrics)
    server = make_server(settings.max_message_bytes, threads=settings.gateway_threads,
                         interceptors=[admission])
    servicers = [IndexService(deps, auth), JobService(deps, auth), ScoringService(deps, auth)]
    rise_pb2_grpc.add_IndexServiceServicer_to_server(servicers[0], server)
    rise_pb2_grpc.add_JobServiceServicer_to_server(servicers[1], server)
    rise_pb2_grpc.add_ScoringServiceServicer_to_server(servicers[2], server)
    touch_rpc_metrics(metrics, "gateway", servicers)
    for pool in settings.pools:  # every pool's series from the start, for rate()
        for kind in KINDS:
            metrics.jobs_submitted_total.labels(pool, kind)
    health = add_health_and_reflection(server, SERVICES)
    try:  # after Redis lost its data, the registry copy comes back from the store
        restored = Registry(deps.jobs, deps.store).ensure_rebuilt()
        if restored:
            log.info("restored %d index names from the store's registry records", restored)
    except RiseError as e:  # the controller retries; lookups fall back to the store meanwhile
        log.warning("registry not rebuilt at start: %s", e)
    return server, deps, health


def _gauges(deps: Deps, stop: threading.Event, every: float = 5.0) -> None:
    """Active jobs by pool and state, and queue depths by pool, refreshed in the background
    (never per request).  Jobs are counted from the job store's active set, never by a scan
    of every job (ended jobs are the controller's rise_job_duration_seconds)."""
    s = deps.settings
    queues = sorted({(p, s.queue_of(p)) for p in s.pools}
                    | {(p, f"{s.query_queue}.{p}") for p in s.pools} | {("", s.control_queue)})
    shown = {(p, state) for p in s.pools for state in ACTIVE_STATES}
    while not stop.is_set():
        try:
            counts = deps.jobs.active_counts()
            shown |= set(counts)
            for pool, state in shown:
                deps.metrics.jobs.labels(pool, state).set(counts.get((pool, state), 0))
            for pool, q in queues:
                deps.metrics.queue_depth.labels(pool, q).set(deps.jobs.r.llen(q))
        except Exception:  # noqa: BLE001 - metrics must never take the gateway down
            log.warning("could not refresh job/queue gauges", exc_info=True)
        stop.wait(every)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    settings = Settings()
    try:
        server, deps, health = build(settings)
    except InvalidInput as e:
        log.error("refusing to start: %s", e.message)
        sys.exit(2)
    if deps.signer is None or deps.signer.key is None:
        log.warning("RISE_INTERNAL_AUTH=off: scorer calls go out unsigned")
    addr = f"{settings.gateway_host}:{settings.gateway_port}"
    tls = bool(settings.tls_cert_file or settings.tls_key_file)
    try:
        port = add_port(server, addr, settings.tls_cert_file, settings.tls_key_file)
    except (OSError, ValueError, RuntimeError) as e:  # unreadable TLS files, port taken
        log.error("cannot serve %s: %s", addr, e)
        sys.exit(2)
    if not port:
        log.error("cannot bind %s", addr)
        sys.exit(1)
    probes = None
    if settings.health_port:
        probes, _ = health_server(health, f"{settings.gateway_host}:{settings.health_port}")
    serve(settings.metrics_port, deps.metrics.registry, addr=settings.metrics_host)
    stop = threading.Event()
    threading.Thread(target=_gauges, args=(deps, stop), daemon=True).start()
    server.start()
    if probes is not None:
        probes.start()
    log.info("gateway listening on %s (%s), metrics on %s:%d", addr,
             "TLS" if tls else "plaintext", settings.metrics_host, settings.metrics_port)

    def shutdown(*_: object) -> None:
        stop.set()
        server.stop(grace=5)
        if probes is not None:
            probes.stop(grace=5)

    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
