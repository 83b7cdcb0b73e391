"""The rise services (the gateway, one Celery worker per pool, the scorer, the job
controller) on a Redis and an S3 server of their own: ``Stack.up`` starts and checks all of
it, ``stack.json`` in the stack's dir records it, ``Stack.down`` stops exactly what it
records."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from celery import Celery
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rise.modelsource import S3Models, parse_source
from rise.settings import Pool, Settings
from rise.stack.ports import claim_port, free_port
from rise.stack.procs import STOP_GRACE_S, Proc, clean_env, spawn, stop_all, wait_ready
from rise.stack.servers import BUCKET, start_redis, start_s3

# The checkout this package runs from (services/rise/stack/ -> the repository root): the
# default dir and model live in its git-ignored .cache/.
REPO = Path(__file__).resolve().parents[3]
DEFAULT_DIR = str(REPO / ".cache" / "stack")
DEFAULT_POOL = f"smollm2={REPO / '.cache' / 'models' / 'smollm2-135m-instruct'}"
STATE = "stack.json"


# ----------------------------------------------------------------------------- readiness


def grpc_serving(address: str, timeout: float = 2.0) -> bool:
    """grpc.health.v1 Check("") answers SERVING."""
    with grpc.insecure_channel(address) as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""),
                                                    timeout=timeout)
    return resp.status == health_pb2.HealthCheckResponse.SERVING


def metrics_answer(port: int, timeout: float = 2.0) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as r:
        return r.read().decode()


def celery_ping(redis_url: str, node: str, timeout: float = 1.0) -> bool:
    """The worker ``node`` answers a control ping over the broker (it is consuming)."""
    app = Celery("rise-stack-ping", broker=redis_url, set_as_current=False)
    try:
        replies = app.control.ping(destination=[node], timeout=timeout)
    finally:
        app.close()
    return any(node in r for r in replies or [])


# ----------------------------------------------------------------------------- the stack


@dataclass
class Stack:
    """A running local stack: its processes, endpoints and credentials (stack.json)."""

    dir: str
    procs: list[Proc]
    endpoints: dict[str, Any]
    tokens: dict[str, str]  # tenant -> token
    tokens_file: str
    pools: dict[str, str]
    s3: dict[str, str]
    started_at: float = 0.0
    start_seconds: dict[str, float] = field(default_factory=dict)
    models: dict[str, str] = field(default_factory=dict)
    """Pool -> the local folder ``up`` pushed into the stack's S3 as the pool's model."""

    # ------------------------------------------------------------------- state file

    @staticmethod
    def state_path(dir: str | os.PathLike) -> Path:
        return Path(dir).resolve() / STATE

    def to_json(self) -> dict[str, Any]:
        d = {f: getattr(self, f) for f in self.__dataclass_fields__ if f != "procs"}
        d["processes"] = [p.to_json() for p in self.procs]
        return json.loads(json.dumps(d))

    def save(self) -> None:
        path = self.state_path(self.dir)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n")
        tmp.chmod(0o600)
        os.replace(tmp, path)

    @classmethod
    def load(cls, dir: str | os.PathLike = DEFAULT_DIR) -> Stack:
        d = json.loads(cls.state_path(dir).read_text())
        procs = [Proc.from_json(p) for p in d.pop("processes")]
        return cls(procs=procs, **d)

    def proc(self, name: str) -> Proc:
        return next(p for p in self.procs if p.name == name)

    def env(self) -> dict[str, str]:
        """Client settings: the gateway address and the first tenant's token."""
        tenant = next(iter(self.tokens), "")
        return {"RISE_GATEWAY": self.endpoints["gateway"],
                "RISE_TOKEN": self.tokens.get(tenant, "")}

    # ------------------------------------------------------------------------ up

    @classmethod
    def up(cls, dir: str | os.PathLike = DEFAULT_DIR, *, pools: dict[str, str] | None = None,
           tokens: dict[str, str] | None = None, gateway_port: int | str = 50051,
           scorer_port: int | str = 50052, metrics_port: int | str = 9464,
           worker_metrics_port: int | str | None = None,
           scorer_metrics_port: int | str | None = None, redis_port: int | str = "auto",
           s3_port: int | str = "auto", die_with_parent: bool = False,
           env: dict[str, str] | None = None, push_models: bool = True,
           worker_concurrency: int = 1, log=None) -> Stack:
        """Start everything and wait until it answers; on failure stop what was started.

        ``pools``: name -> model folder (or a model source: ``s3://...``, a hub id);
        ``tokens``: tenant -> token; ``env``: more RISE_* settings for every service (e.g.
        the controller's intervals); ``worker_concurrency``: the processes of each pool's
        Celery worker (prefork children).  With ``push_models`` (the default) a model folder
        is pushed into the stack's S3 (``s3://rise/models/<folder name>/``, skipped when
        already there) and the pool names that: the workers fetch it as a cluster's pools
        do (``rise.modelsource``).  Metrics ports of the worker, scorer and controller
        default to ``metrics_port`` + 1, + 2 and + 3 ("auto" when it is)."""
        say = log or (lambda msg: None)
        if isinstance(worker_concurrency, bool) or not isinstance(worker_concurrency, int) \
                or worker_concurrency < 1:
            raise ValueError(f"worker concurrency must be an integer >= 1, got "
                             f"{worker_concurrency!r}")
        root = Path(dir).resolve()
        root.mkdir(parents=True, exist_ok=True)
        if cls.state_path(root).exists():
            old = cls.load(root)
            if any(p.members() for p in old.procs):
                raise RuntimeError(f"a stack is already up in {root} "
                                   "(python -m rise.stack down first)")
            cls.state_path(root).unlink()
        pools = {k: v if parse_source(v).kind != "path" else str(Path(v).resolve())
                 for k, v in (pools or {}).items()} or {
            "smollm2": str(Path(DEFAULT_POOL.split("=", 1)[1]).resolve())}
        for name, model in pools.items():
            if parse_source(model).kind == "path" and not Path(model).exists():
                raise RuntimeError(f"pool {name}: model {model} does not exist")
        folders = {k: v for k, v in pools.items()
                   if push_models and parse_source(v).kind == "path" and Path(v).is_dir()}
        names = [Path(v).name for v in set(folders.values())]
        if len(set(names)) != len(names):
            raise RuntimeError("two pools' model folders share a name: push them yourself "
                               "(rise models push) and give the pools their s3:// URIs")
        tokens = dict(tokens or {"demo": secrets.token_urlsafe(24)})
        if len(set(tokens.values())) != len(tokens):
            raise RuntimeError("two tenants share a token")
        tokens_file = root / "tokens.json"
        tokens_file.write_text(json.dumps({t: tenant for tenant, t in tokens.items()}, indent=2))
        tokens_file.chmod(0o600)
        # The key of the gateway's signed scorer calls (rise.internalauth), fresh each up.
        internal_key = root / "internal.key"
        internal_key.unlink(missing_ok=True)
        fd = os.open(internal_key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(48) + "\n")

        auto = metrics_port in (0, "0", "auto", None)
        gport, sport = claim_port(gateway_port), claim_port(scorer_port)
        mport = claim_port(metrics_port)
        wmport = claim_port(worker_metrics_port if worker_metrics_port is not None else
                            ("auto" if auto else int(metrics_port) + 1))
        smport = claim_port(scorer_metrics_port if scorer_metrics_port is not None else
                            ("auto" if auto else int(metrics_port) + 2))
        cmport = claim_port("auto" if auto else int(metrics_port) + 3)

        procs: list[Proc] = []
        timings: dict[str, float] = {}
        t0 = time.monotonic()
        try:
            say("starting redis and S3 ...")
            redis = start_redis(root / "redis", redis_port, die_with_parent=die_with_parent)
            procs.append(redis)
            timings["redis"] = time.monotonic() - t0
            s3 = start_s3(root / "s3", s3_port, die_with_parent=die_with_parent)
            procs.append(s3)
            timings["s3"] = time.monotonic() - t0
            if folders:
                say("pushing models into S3 ...")
                models = S3Models(Settings.model_construct(
                    s3_endpoint=s3.env["RISE_S3_ENDPOINT"], s3_bucket=BUCKET,
                    s3_access_key=s3.env["RISE_S3_ACCESS_KEY"],
                    s3_secret_key=s3.env["RISE_S3_SECRET_KEY"], cache_dir=str(root / "cache")))
                for name, folder in folders.items():
                    uri = f"s3://{BUCKET}/models/{Path(folder).name}/"
                    models.push(folder, parse_source(uri), skip_same=True)
                    pools[name] = uri
                timings["models"] = time.monotonic() - t0

            base = {**redis.env, **s3.env,
                    "RISE_POOLS": json.dumps({k: {"model": v} for k, v in pools.items()}),
                    "RISE_GATEWAY_HOST": "127.0.0.1", "RISE_GATEWAY_PORT": str(gport),
                    "RISE_SCORER_HOST": "127.0.0.1", "RISE_SCORER_PORT": str(sport),
                    "RISE_SCORER_ADDRESSES": f"127.0.0.1:{sport}",
                    "RISE_AUTH_TOKENS_FILE": str(tokens_file),
                    "RISE_INTERNAL_SECRET_FILE": str(internal_key),
                    "RISE_METRICS_HOST": "127.0.0.1",
                    "RISE_CACHE_DIR": str(root / "cache"), "PYTHONUNBUFFERED": "1",
                    **(env or {})}
            # Queue names as the services derive them (defaults: this process's RISE_*
            # variables are not passed on, so they must not count here either).
            settings = Settings.model_construct(
                pools={k: Pool(model=v) for k, v in pools.items()})
            py = sys.executable
            say("starting gateway, worker(s) and scorer ...")
            gw = spawn("gateway", [py, "-m", "rise.gateway"], root,
                       clean_env({**base, "RISE_METRICS_PORT": str(mport)}),
                       ports={"grpc": gport, "metrics": mport}, settings=base,
                       die_with_parent=die_with_parent)
            procs.append(gw)
            workers = []
            for i, pool in enumerate(pools):
                mp = wmport if i == 0 else free_port()
                prom = root / f"prometheus-worker-{pool}"
                shutil.rmtree(prom, ignore_errors=True)
                prom.mkdir(parents=True)
                node = f"rise-{pool}@{socket.gethostname()}"
                queues = [settings.queue_of(pool), f"{settings.query_queue}.{pool}",
                          settings.control_queue]
                w = spawn(f"worker-{pool}", [
                    py, "-m", "celery", "-A", "rise.worker.app", "worker", "-Q",
                    ",".join(queues), "--concurrency", str(worker_concurrency), "-n", node,
                    "--loglevel", "INFO", "--without-gossip", "--without-mingle"], root,
                    clean_env({**base, "RISE_WORKER_POOL": pool, "RISE_METRICS_PORT": str(mp),
                               "PROMETHEUS_MULTIPROC_DIR": str(prom)}),
                    ports={"metrics": mp}, settings={"node": node, "queues": ",".join(queues)},
                    die_with_parent=die_with_parent)
                procs.append(w)
                workers.append(w)
            sc = spawn("scorer", [py, "-m", "rise.scorer"], root,
                       clean_env({**base, "RISE_METRICS_PORT": str(smport)}),
                       ports={"grpc": sport, "metrics": smport}, settings=base,
                       die_with_parent=die_with_parent)
            procs.append(sc)
            ctl = spawn("controller", [py, "-m", "rise.controller"], root,
                        clean_env({**base, "RISE_METRICS_PORT": str(cmport)}),
                        ports={"metrics": cmport}, settings=base,
                        die_with_parent=die_with_parent)
            procs.append(ctl)

            t1 = time.monotonic()
            wait_ready(gw, lambda: grpc_serving(f"127.0.0.1:{gport}"), "gateway")
            timings["gateway"] = time.monotonic() - t1
            wait_ready(sc, lambda: grpc_serving(f"127.0.0.1:{sport}"), "scorer")
            timings["scorer"] = time.monotonic() - t1
            for w in workers:

                def worker_ready(w: Proc = w) -> bool:
                    return celery_ping(redis.env["RISE_REDIS_URL"], w.env["node"]) \
                        and bool(metrics_answer(w.ports["metrics"]))

                wait_ready(w, worker_ready, w.name)
                timings[w.name] = time.monotonic() - t1
            wait_ready(ctl, lambda: bool(metrics_answer(cmport)), "controller")
            timings["controller"] = time.monotonic() - t1
            timings["total"] = time.monotonic() - t0
            stack = cls(
                dir=str(root), procs=procs, tokens=tokens, tokens_file=str(tokens_file),
                pools=pools, s3={"endpoint": s3.env["RISE_S3_ENDPOINT"], "bucket": BUCKET,
                                 "access_key": s3.env["RISE_S3_ACCESS_KEY"],
                                 "secret_key": s3.env["RISE_S3_SECRET_KEY"]},
                endpoints={"gateway": f"127.0.0.1:{gport}", "scorer": f"127.0.0.1:{sport}",
                           "redis": redis.env["RISE_REDIS_URL"],
                           "s3": f"http://{s3.env['RISE_S3_ENDPOINT']}",
                           "metrics": {"gateway": f"http://127.0.0.1:{mport}/metrics",
                                       "scorer": f"http://127.0.0.1:{smport}/metrics",
                                       "controller": f"http://127.0.0.1:{cmport}/metrics",
                                       **{w.name: f"http://127.0.0.1:{w.ports['metrics']}/metrics"
                                          for w in workers}}},
                started_at=time.time(), start_seconds={k: round(v, 2) for k, v in timings.items()},
                models=folders)
            stack.save()
        except BaseException:
            stop_all(list(reversed(procs)))
            raise
        return stack

    # ---------------------------------------------------------------------- down

    def down(self, grace: float = STOP_GRACE_S) -> list[int]:
        """Stop the recorded processes (services first, then S3 and Redis) and remove
        stack.json; returns the pids that needed SIGKILL."""
        services = [p for p in self.procs if p.name not in ("redis", "s3")]
        killed = stop_all(services, grace)
        killed += stop_all([p for p in self.procs if p.name in ("redis", "s3")], grace)
        self.state_path(self.dir).unlink(missing_ok=True)
        return killed

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for p in self.procs:
            members = p.members()
            row: dict[str, Any] = {"pid": p.pid, "pgid": p.pgid, "running": bool(members),
                                   "processes": members, "ports": p.ports, "log": p.log}
            if members and p.name in ("gateway", "scorer"):
                try:
                    row["serving"] = grpc_serving(f"127.0.0.1:{p.ports['grpc']}")
                except Exception:  # noqa: BLE001
                    row["serving"] = False
            out[p.name] = row
        return out
