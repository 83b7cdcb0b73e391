"""The RISE services run from the CPU image with ``buildah run --isolation chroot`` (as
root; ``podman run`` does not work on every kernel), against a Redis and an S3 server of
this machine (``rise.stack.start_redis`` / ``start_s3``).

Each service gets its own working container (``buildah from``), runs as uid 10001 under
tini with the writable volumes the chart mounts (``/tmp``, ``/cache``, the Prometheus
multiprocess folder) bind-mounted from host folders, its Secrets read-only under
``/etc/rise`` and the model read-only under ``/models``.  chroot isolation shares the host's
network, so the services talk over 127.0.0.1 as in the local stack.

``buildah run`` cannot make the root file system read-only; ``rootfs_snapshot`` lists the
mounted container's files (path, type, size, mode, mtime) so that a test can compare the
lists before and after and find any write outside the volumes.  Used by test_images.py
(``make image-test``).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from rise.stack.procs import Proc, spawn, stop_all

UID = 10001
# The chart's writable volumes (helm/rise/templates: /tmp everywhere, /cache on workers and
# the scorer, the Prometheus multiprocess folder on workers) and what buildah itself mounts.
VOLUMES = ("/tmp", "/cache", "/var/run/prometheus-multiproc")
RUNTIME_MOUNTS = ("/proc", "/sys", "/dev", "/run")
# The image's entrypoint; -s: chroot isolation has no PID namespace, so tini is not PID 1
# here and reaps as a subreaper instead.
TINI = ("/usr/bin/tini", "-s", "--")


def buildah(*args: str, check: bool = True) -> str:
    out = subprocess.run(["buildah", *args], capture_output=True, text=True)
    if check and out.returncode != 0:
        raise RuntimeError(f"buildah {' '.join(args)}: {out.stderr.strip()}")
    return out.stdout.strip()


def image_exists(image: str) -> bool:
    return subprocess.run(["buildah", "inspect", "--type", "image", image],
                          capture_output=True).returncode == 0


@dataclass
class Container:
    """One working container of the image, its host-side volumes and (once started) the
    ``buildah run`` process group."""

    name: str
    id: str
    root: Path  # host folder holding this container's volumes
    proc: Proc | None = None
    mounts: list[str] = field(default_factory=list)

    def remove(self) -> None:
        buildah("rm", self.id, check=False)


def new_container(image: str, name: str, workdir: Path) -> Container:
    cid = buildah("from", "--pull-never", "--name", f"rise-image-test-{name}-{uuid.uuid4().hex[:8]}",
                  image)
    root = workdir / name
    for v in VOLUMES:
        d = root / v.strip("/").replace("/", "_")
        d.mkdir(parents=True, exist_ok=True)
        os.chown(d, UID, UID)
    return Container(name=name, id=cid, root=root)


def run_args(c: Container, env: dict[str, str], ro: dict[str, str]) -> list[str]:
    """``buildah run`` options: uid 10001, the volumes, read-only binds, environment."""
    args = ["buildah", "run", "--isolation", "chroot", "--user", f"{UID}:{UID}"]
    for v in VOLUMES:
        args += ["-v", f"{c.root / v.strip('/').replace('/', '_')}:{v}:rw"]
    for host, inside in ro.items():
        args += ["-v", f"{host}:{inside}:ro"]
    for k, v in env.items():
        args += ["--env", f"{k}={v}"]
    return args


def start(c: Container, argv: list[str], env: dict[str, str], ro: dict[str, str],
          logdir: Path, ports: dict[str, int] | None = None) -> Proc:
    """``argv`` under tini (the image's entrypoint) in the container, in the background."""
    cmd = [*run_args(c, env, ro), c.id, "--", *TINI, *argv]
    c.proc = spawn(c.name, cmd, logdir, dict(os.environ), ports=ports, die_with_parent=True)
    return c.proc


def run(c: Container, argv: list[str], env: dict[str, str], ro: dict[str, str],
        timeout: float = 600) -> subprocess.CompletedProcess:
    cmd = [*run_args(c, env, ro), c.id, "--", *TINI, *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def stop(containers: list[Container]) -> None:
    stop_all([c.proc for c in containers if c.proc is not None])


def rootfs_snapshot(c: Container, binds: tuple[str, ...] = ()) -> dict[str, tuple]:
    """path -> (type, size, mode, uid, mtime_ns) of every file of the container's root file
    system, outside the volumes, the read-only ``binds`` and the runtime's mounts (which
    are mounted over the image's files, not part of them)."""
    top = Path(buildah("mount", c.id))
    skip = {str(top / p.strip("/")) for p in (*VOLUMES, *RUNTIME_MOUNTS, *binds)}
    out: dict[str, tuple] = {}
    try:
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames[:] = [d for d in dirnames if os.path.join(dirpath, d) not in skip]
            for n in (*dirnames, *filenames):
                p = os.path.join(dirpath, n)
                st = os.lstat(p)
                out["/" + os.path.relpath(p, top)] = (
                    stat.S_IFMT(st.st_mode), st.st_size, stat.S_IMODE(st.st_mode), st.st_uid,
                    st.st_mtime_ns)
    finally:
        buildah("umount", c.id, check=False)
    return out


def mount_points(targets: list[str]) -> set[str]:
    """The folders a runtime creates to mount ``targets`` on (each and its parents)."""
    out = set()
    for t in targets:
        p = Path(t)
        out.update(str(q) for q in (p, *p.parents) if str(q) != "/")
    return out


def rootfs_changes(before: dict[str, tuple], after: dict[str, tuple],
                   mounts: set[str] = frozenset()) -> dict[str, list[str]]:
    """Files added, removed or changed.  Not counted: the empty folders a runtime makes as
    mount points, and the new mtime of the folders it made them in."""
    made = {p for p in set(after) - set(before)
            if p in mounts and after[p][0] == stat.S_IFDIR}

    def changed(p: str) -> bool:
        if p in mounts and before[p][0] == after[p][0] == stat.S_IFDIR:
            return before[p][2:4] != after[p][2:4]  # mode, owner
        return before[p] != after[p]

    return {"added": sorted(set(after) - set(before) - made),
            "removed": sorted(set(before) - set(after)),
            "changed": sorted(p for p in set(before) & set(after) if changed(p))}


def volume_files(c: Container) -> dict[str, list[str]]:
    """What each volume holds after the run (relative paths), to show where writes went."""
    out = {}
    for v in VOLUMES:
        d = c.root / v.strip("/").replace("/", "_")
        out[v] = sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())
    return out


def remove_all(containers: list[Container], workdir: Path | None = None) -> None:
    for c in containers:
        c.remove()
    if workdir is not None:
        shutil.rmtree(workdir, ignore_errors=True)

