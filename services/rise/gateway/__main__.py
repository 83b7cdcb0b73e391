"""Run the gateway: ``python -m rise.gateway`` (settings from RISE_* variables)."""

from __future__ import annotations

import logging
import signal
import threading

import grpc
import redis

from rise.datasets import materialize, open_store
from rise.errors import RiseError
from rise.gateway.service import Auth, Deps, IndexService, JobService, ScoringService
from rise.grpcutil import add_health_and_reflection, make_server, touch_rpc_metrics
from rise.jobs import STATES, JobStore
from rise.metrics import for_service, serve
from rise.registry import Registry
from rise.settings import Settings
from rise.store import CountingStore
from rise.taskclient import TaskClient
from rise.v1 import rise_pb2_grpc, scorer_pb2_grpc

log = logging.getLogger("rise.gateway")
SERVICES = ["rise.v1.IndexService", "rise.v1.JobService", "rise.v1.ScoringService"]


def build(settings: Settings) -> tuple[grpc.Server, Deps]:
    metrics = for_service("gateway")
    read = metrics.storage_bytes_read_total.labels("gateway")
    written = metrics.storage_bytes_written_total.labels("gateway")
    r = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    channels = [grpc.insecure_channel(a.strip(), options=[
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes)])
        for a in settings.scorer_addresses.split(",") if a.strip()]
    deps = Deps(
        settings=settings, jobs=JobStore(r), send_task=TaskClient(settings).send,
        store=lambda prefix: CountingStore(open_store(settings, prefix), read.inc, written.inc),
        scorers=[scorer_pb2_grpc.ScorerServiceStub(c) for c in channels],
        materialize=lambda uri: str(materialize(uri, settings)), metrics=metrics)
    auth = Auth(settings)
    server = make_server(settings.max_message_bytes)
    servicers = [IndexService(deps, auth), JobService(deps, auth), ScoringService(deps, auth)]
    rise_pb2_grpc.add_IndexServiceServicer_to_server(servicers[0], server)
    rise_pb2_grpc.add_JobServiceServicer_to_server(servicers[1], server)
    rise_pb2_grpc.add_ScoringServiceServicer_to_server(servicers[2], server)
    touch_rpc_metrics(metrics, "gateway", servicers)
    add_health_and_reflection(server, SERVICES)
    try:  # after Redis lost its data, the registry copy comes back from the store
        restored = Registry(deps.jobs, deps.store).ensure_rebuilt()
        if restored:
            log.info("restored %d index names from the store's registry records", restored)
    except RiseError as e:  # the controller retries; lookups fall back to the store meanwhile
        log.warning("registry not rebuilt at start: %s", e)
    return server, deps


def _gauges(deps: Deps, stop: threading.Event, every: float = 5.0) -> None:
    """Jobs by state and queue depths, refreshed in the background (never per request)."""
    s = deps.settings
    queues = sorted({s.queue_of(p) for p in s.pools} | {f"{s.query_queue}.{p}" for p in s.pools}
                    | {s.control_queue})
    while not stop.is_set():
        try:
            counts = deps.jobs.state_counts()
            for state in STATES:
                deps.metrics.jobs.labels(state).set(counts[state])
            for q in queues:
                deps.metrics.queue_depth.labels(q).set(deps.jobs.r.llen(q))
        except Exception:  # noqa: BLE001 - metrics must never take the gateway down
            log.warning("could not refresh job/queue gauges", exc_info=True)
        stop.wait(every)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    settings = Settings()
    server, deps = build(settings)
    addr = f"{settings.gateway_host}:{settings.gateway_port}"
    server.add_insecure_port(addr)
    serve(settings.metrics_port, deps.metrics.registry)
    stop = threading.Event()
    threading.Thread(target=_gauges, args=(deps, stop), daemon=True).start()
    server.start()
    log.info("gateway listening on %s, metrics on :%d", addr, settings.metrics_port)

    def shutdown(*_: object) -> None:
        stop.set()
        server.stop(grace=5)

    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
