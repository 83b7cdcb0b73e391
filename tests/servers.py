"""Real Redis and S3 servers for integration tests, each on free loopback ports.

Import the fixtures from conftest (``from servers import redis_server, s3_server``) or
call ``start_redis`` / ``start_s3`` directly for a private instance.  The servers are
started by ``rise.stack`` (the local stack's own launcher): each runs in its
own process group and dies with the test process (``setpriv --pdeathsig``), so neither a
failing test nor a killed pytest leaves one behind.  Redis runs without persistence; S3
(``weed mini``) has one admin identity and no bucket.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from rise import stack

free_port = stack.free_port
START_ATTEMPTS = 3  # fresh ports after a start that died (a port taken meanwhile)


@dataclass
class Server:
    """A started server (a ``stack.Proc``) and how to reach it; ``stop()`` is idempotent."""

    proc: stack.Proc
    workdir: Path
    url: str = ""  # redis: redis://127.0.0.1:PORT/0
    endpoint: str = ""  # s3: 127.0.0.1:PORT
    access_key: str = ""
    secret_key: str = ""
    start_s: float = 0.0  # how long the start took
    _owned_dir: bool = False  # a workdir we made ourselves (removed on stop)

    @property
    def ports(self) -> dict[str, int]:
        return self.proc.ports

    def log_tail(self, n: int = 30) -> str:
        return self.proc.log_tail(n)

    def stop(self) -> None:
        self.proc.stop()
        if self._owned_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def _start(start, workdir: Path, **kw) -> tuple[stack.Proc, float]:
    """``start(workdir, **kw)`` on fresh ports until it does not die while starting."""
    for attempt in range(START_ATTEMPTS):
        t0 = time.monotonic()
        try:
            proc = start(workdir, die_with_parent=True, **kw)
        except stack.ServerExited:
            if attempt + 1 == START_ATTEMPTS:
                raise
            continue
        atexit.register(proc.stop)  # belt and braces outside pytest
        return proc, time.monotonic() - t0
    raise AssertionError("unreachable")


def start_redis(tmpdir: str | os.PathLike | None = None) -> Server:
    """Start a throwaway Redis (no persistence) on a free port."""
    workdir = Path(tmpdir if tmpdir is not None else tempfile.mkdtemp(prefix="redis-"))
    proc, took = _start(stack.start_redis, workdir, persist=False)
    return Server(proc, workdir, url=proc.env["RISE_REDIS_URL"], start_s=took,
                  _owned_dir=tmpdir is None)


def start_s3(tmpdir: str | os.PathLike, access_key: str = "rise-test",
             secret_key: str = "rise-test-secret") -> Server:
    """Start SeaweedFS (``weed mini``) with data under ``tmpdir`` and one admin identity."""
    proc, took = _start(stack.start_s3, Path(tmpdir), access_key=access_key,
                        secret_key=secret_key, bucket=None)
    return Server(proc, Path(tmpdir), endpoint=proc.env["RISE_S3_ENDPOINT"],
                  access_key=access_key, secret_key=secret_key, start_s=took)


def _session_fixture(name: str, start):
    @pytest.fixture(scope="session", name=name)
    def fixture(tmp_path_factory):
        server = start(tmp_path_factory.mktemp(name.removesuffix("_server")))
        try:
            yield server
        finally:
            server.stop()

    return fixture


redis_server = _session_fixture("redis_server", start_redis)
s3_server = _session_fixture("s3_server", start_s3)
