"""Fault shapes over a running ``rise.stack.Stack``.

``Chaos`` wraps a stack: it records how each of its processes was started (the command
and log folder of its ``Proc``, and its environment as ``/proc/<pid>/environ`` shows it,
read while it runs) so that a process stopped or killed here starts again exactly as
before: same command, same ports, same data folder, same environment.  A restarted
process replaces the old ``Proc`` in ``stack.procs`` and ``stack.json`` is saved again,
so ``stack.down()`` stops what runs now.

Each fault is a function ``(chaos, target, tick) -> detail`` that returns once the fault
is over (the restarted process answers again); ``tick()`` is called about twice a second
while it waits, so the caller can watch the job meanwhile.  ``shapes()`` lists them with
the number of trials of the full run and the end each job must reach.

Linux only (``/proc``, process groups).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rise import errors
from rise.stack import (
    BUCKET,
    Proc,
    Stack,
    celery_ping,
    grpc_serving,
    metrics_answer,
    minio_client,
    redis_ping,
    spawn,
    stop_all,
    wait_ready,
)

Tick = Callable[[], None]

SERVERS = ("redis", "s3")
KILL_WAIT_S = 10.0  # a SIGKILLed group is gone within this


def _noop() -> None:
    pass


def pause(seconds: float, tick: Tick = _noop, step: float = 0.5) -> None:
    """Sleep ``seconds``, calling ``tick()`` about every ``step`` seconds."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        tick()
        time.sleep(min(step, max(0.0, deadline - time.monotonic()), left))


def read_environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    out = {}
    for item in raw.split(b"\0"):
        if b"=" in item:
            k, _, v = item.partition(b"=")
            out[k.decode(errors="replace")] = v.decode(errors="replace")
    return out


def children(pid: int) -> list[int]:
    """Live (not zombie) processes whose parent is ``pid``."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            raw = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        f = raw[raw.rindex(")") + 2:].split()
        if int(f[1]) == pid and f[0] not in "ZX":
            out.append(int(d))
    return sorted(out)


class FaultError(RuntimeError):
    """A fault could not be injected as described (the harness's problem, not the
    platform's): the trial is recorded as not run."""


@dataclass
class Launch:
    """How a process of the stack was started."""

    argv: list[str]
    env: dict[str, str]
    cwd: str


@dataclass
class Target:
    """What a trial works on: the gateway client, its job and index."""

    client: Any  # rise.client.RiseClient
    job_id: str
    index: str


class Chaos:
    """Stop, kill and restart the processes of a running stack, each as it was started."""

    def __init__(self, stack: Stack, *, die_with_parent: bool = True,
                 start_timeout: float = 120.0, log: Callable[[str], None] | None = None) -> None:
        self.stack = stack
        self.die_with_parent = die_with_parent
        self.start_timeout = start_timeout
        self.log = log or (lambda msg: None)
        self.launches: dict[str, Launch] = {}
        for p in stack.procs:
            self.launches[p.name] = self.capture(p)

    # ------------------------------------------------------------------ processes

    @staticmethod
    def capture(p: Proc) -> Launch:
        if not p.alive():
            raise FaultError(f"{p.name} is not running: cannot record how it was started")
        return Launch(argv=list(p.argv), env=read_environ(p.pid), cwd=str(Path(p.log).parent))

    def proc(self, name: str) -> Proc:
        return self.stack.proc(name)

    def names(self) -> list[str]:
        return [p.name for p in self.stack.procs]

    def workers(self) -> list[Proc]:
        return [p for p in self.stack.procs if p.name.startswith("worker-")]

    def _replace(self, new: Proc) -> None:
        i = next(i for i, p in enumerate(self.stack.procs) if p.name == new.name)
        self.stack.procs[i] = new
        self.stack.save()

    def add(self, name: str, argv: list[str], env: dict[str, str], cwd: str,
            ports: dict[str, int] | None = None) -> Proc:
        """Start a process the stack did not start (recorded in stack.json from now on)."""
        p = spawn(name, argv, Path(cwd), env, ports=ports, die_with_parent=self.die_with_parent)
        self.stack.procs.append(p)
        self.stack.save()
        self.launches[name] = Launch(argv=list(argv), env=dict(env), cwd=cwd)
        return p

    def kill(self, name: str, sig: int = signal.SIGKILL) -> list[int]:
        """Send ``sig`` to the process group and wait until it is gone; returns its pids."""
        p = self.proc(name)
        pids = p.members()
        p.signal(sig)
        deadline = time.monotonic() + KILL_WAIT_S
        while p.members() and time.monotonic() < deadline:
            time.sleep(0.05)
        if p.members():
            stop_all([p], grace=1)
        if p.popen is not None:
            with contextlib.suppress(Exception):
                p.popen.wait(1)
        return pids

    def stop(self, name: str) -> float:
        """Stop the group the way ``down`` does (its stop signal, SIGKILL after the grace);
        returns the seconds it took."""
        t0 = time.monotonic()
        p = self.proc(name)
        p.signal(signal.SIGCONT)  # a stopped (SIGSTOP) process acts on SIGTERM only then
        stop_all([p])
        return time.monotonic() - t0

    def start(self, name: str, wait: bool = True) -> Proc:
        """Start ``name`` again as it was started (its group must be gone)."""
        old = self.proc(name)
        if old.members():
            raise FaultError(f"{name} is still running (pids {old.members()})")
        launch = self.launches[name]
        if name == "s3":
            # weed mini saves its flags here and loads them on start: rise.stack.start_s3
            # removes it so that the command line wins; so does a restart.
            (Path(launch.cwd) / "data" / "mini.options").unlink(missing_ok=True)
        new = spawn(name, launch.argv, Path(launch.cwd), launch.env, ports=old.ports,
                    settings=old.env, die_with_parent=self.die_with_parent,
                    stop_signal=old.stop_signal)
        self._replace(new)
        if wait:
            wait_ready(new, self.ready_check(name), name, timeout=self.start_timeout)
        return new

    def ready_check(self, name: str) -> Callable[[], bool]:
        p = self.proc(name)
        if name == "redis":
            return lambda: redis_ping(p.ports["redis"])
        if name == "s3":
            s3 = self.s3()
            return lambda: s3.bucket_exists(BUCKET)
        if name.startswith("worker-"):
            url = self.stack.endpoints["redis"]
            return lambda: celery_ping(url, p.env["node"]) and bool(
                metrics_answer(p.ports["metrics"]))
        if "grpc" in p.ports:
            return lambda: grpc_serving(f"127.0.0.1:{p.ports['grpc']}")
        if "metrics" in p.ports:  # the controller
            return lambda: bool(metrics_answer(p.ports["metrics"]))
        started = time.monotonic()
        return lambda: time.monotonic() - started > 1.0  # alive for a second

    def s3(self):
        s = self.stack.s3
        return minio_client(s["endpoint"], s["access_key"], s["secret_key"])

    def responsive(self, name: str, timeout: float) -> bool:
        p = self.proc(name)
        check = self.ready_check(name)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not p.alive():
                return False
            try:
                if check():
                    return True
            except Exception:  # noqa: BLE001 - not answering (yet)
                pass
            time.sleep(0.5)
        return False

    def heal(self, timeout: float = 20.0) -> list[str]:
        """Every process running and answering again: dead ones are started again, and
        ones that do not answer within ``timeout`` are killed and started again.  Returns
        what had to be done (empty when the stack was whole)."""
        done = []
        order = sorted(self.names(), key=lambda n: (n not in SERVERS, n))
        for name in order:
            p = self.proc(name)
            p.signal(signal.SIGCONT)
            if not p.alive():
                if p.members():
                    stop_all([p], grace=2)
                self.start(name)
                done.append(f"{name}: restarted (was not running)")
            elif not self.responsive(name, timeout):
                self.kill(name)
                self.start(name)
                done.append(f"{name}: killed and restarted (did not answer in {timeout:g} s)")
        return done


# ------------------------------------------------------------------------------ faults


def none(c: Chaos, t: Target, tick: Tick) -> dict[str, Any]:
    """No fault: the control trial."""
    return {}


def worker_child_kill(c: Chaos, t: Target, tick: Tick) -> dict[str, Any]:
    """SIGKILL the pool child of every worker (the process running the shard); the
    worker's main process stays and forks a new child."""
    killed = {}
    for w in c.workers():
        kids = children(w.pid)
        if not kids:
            raise FaultError(f"{w.name} has no pool child")
        for k in kids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(k, signal.SIGKILL)
        killed[w.name] = kids
    return {"killed": killed}


def worker_tree_kill(c: Chaos, t: Target, tick: Tick) -> dict[str, Any]:
    """SIGKILL every worker's whole process group, then start it again (same command and
    environment); over when it answers a Celery ping again."""
    out: dict[str, Any] = {}
    for w in c.workers():
        out[w.name] = {"killed": c.kill(w.name)}
    t0 = time.monotonic()
    for w in c.workers():
        c.start(w.name)
    out["restart_s"] = round(time.monotonic() - t0, 2)
    return out


def redis_sigstop(seconds: float):
    def inject(c: Chaos, t: Target, tick: Tick) -> dict[str, Any]:
        """SIGSTOP Redis, SIGCONT after ``seconds``: connections stay open and hang."""
        r = c.proc("redis")
        r.signal(signal.SIGSTOP)
        try:
            pause(seconds, tick)
        finally:
            r.signal(signal.SIGCONT)
        return {"stopped_s": seconds}
    return inject


def redis_stop(seconds: float):
    def inject(c: Chaos, t: Target, tick: Tick) -> dict[str, Any]:
        """Stop Redis cleanly (it saves its data), start it again on the same port and
        data folder ``seconds`` later."""
        stop_s = c.stop("redis")
        pause(seconds, tick)
        t0 = time.monotonic()
        c.start("redis")
        return {"stop_s": round(stop_s, 2), "down_s": seconds,
                "start_s": round(time.monotonic() - t0, 2)}
    return inject


def redis_data_lost(c: Chaos, t: Target, tick: Tick) -> dict[str, Any]:
    """SIGKILL Redis, delete its data (everything in its folder but the log), start it
    empty on the same port."""
    c.kill("redis")
    folder = Path(c.launches["redis"].cwd)
    removed = []
    for f in sorted(folder.iterdir()):
        if f.suffix == ".log":
            continue
        shutil.rmtree(f) if f.is_dir() else f.unlink()
        removed.append(f.name)
    c.start("redis")
    return {"removed": removed}


def s3_stop(seconds: float):
    def inject(c: Chaos, t: Target, tick: Tick) -> dict[str, Any]:
        """Stop the S3 server, start it again on the same ports and data ``seconds``
        later."""
        stop_s = c.stop("s3")
        pause(seconds, tick)
        t0 = time.monotonic()
        c.start("s3")
        return {"stop_s": round(stop_s, 2), "down_s": seconds,
                "start_s": round(time.monotonic() - t0, 2)}
    return inject


def gateway_restart(c: Chaos, t: Target, tick: Tick) -> dict[str, Any]:
    """Stop the gateway (SIGTERM, SIGKILL after the grace) and start it again."""
    stop_s = c.stop("gateway")
    t0 = time.monotonic()
    c.start("gateway")
    return {"stop_s": round(stop_s, 2), "start_s": round(time.monotonic() - t0, 2)}


DELETE_RETRY_S = 30.0


def cancel_then_delete(c: Chaos, t: Target, tick: Tick) -> dict[str, Any]:
    """CancelJob, then at once DeleteIndex (retried while the index is busy, at most
    ``DELETE_RETRY_S``)."""
    t0 = time.monotonic()
    cancelled = t.client.cancel_job(t.job_id)
    out: dict[str, Any] = {"state_after_cancel": cancelled.state}
    attempts, last = 0, ""
    deadline = time.monotonic() + DELETE_RETRY_S
    while True:
        attempts += 1
        try:
            out["objects_deleted"] = t.client.delete_index(t.index)
            break
        except (errors.Mismatch, errors.Unavailable) as e:  # busy, or briefly unreachable
            last = f"{type(e).__name__}: {e}"
            if time.monotonic() > deadline:
                out["delete_error"] = last
                break
            pause(0.5, tick)
    out["delete_attempts"] = attempts
    out["cancel_to_deleted_s"] = round(time.monotonic() - t0, 2)
    return out


# ------------------------------------------------------------------------------ shapes


@dataclass(frozen=True)
class Shape:
    name: str
    kind: str
    """Shapes of one kind differ only in duration; ``--quick`` runs one of each kind."""
    inject: Callable[[Chaos, Target, Tick], dict[str, Any]]
    trials: int
    """Trials in the full run."""
    expect: str
    """The end every job should reach: SUCCEEDED, CANCELLED, FAILED:<code>, or ENDED (any
    terminal state: a job whose record Redis lost may fail rather than finish)."""
    about: str
    quick: bool = False
    """This shape stands for its kind in ``--quick``."""
    meta: dict[str, Any] = field(default_factory=dict)


def shapes(budget_s: float, over_budget_outage_s: float, quick_s3_outage_s: float
           ) -> list[Shape]:
    """Every shape in run order (the destructive ones last).  ``budget_s`` is the storage
    retry budget the services run with; the S3 outages of the full run (30 s, 60 s) must fit
    in it, the over-budget outage must not."""
    ok = "SUCCEEDED"
    return [
        Shape("control", "none", none, 2, ok, "no fault (the harness's control)", True),
        Shape("worker-child-kill", "worker-child", worker_child_kill, 10, ok,
              "SIGKILL the worker's pool child mid-shard", True),
        Shape("gateway-restart", "gateway", gateway_restart, 5, ok,
              "stop the gateway and start it again", True),
        Shape("cancel-then-delete", "cancel-delete", cancel_then_delete, 5, "CANCELLED",
              "CancelJob, then DeleteIndex at once", True),
        Shape("redis-sigstop-10s", "redis-pause", redis_sigstop(10), 5, ok,
              "SIGSTOP Redis for 10 s, then SIGCONT", True),
        Shape("redis-stop-3s", "redis-stop", redis_stop(3), 5, ok,
              "stop Redis, start it 3 s later (same port and data)", True),
        Shape("redis-stop-15s", "redis-stop", redis_stop(15), 5, ok,
              "stop Redis, start it 15 s later (same port and data)"),
        Shape(f"s3-stop-{quick_s3_outage_s:g}s", "s3-stop", s3_stop(quick_s3_outage_s), 0, ok,
              f"stop S3, start it {quick_s3_outage_s:g} s later (within the "
              f"{budget_s:g} s storage budget)", True),
        Shape("s3-stop-30s", "s3-stop", s3_stop(30), 5, ok,
              "stop S3, start it 30 s later (same ports and data)"),
        Shape("s3-stop-60s", "s3-stop", s3_stop(60), 5, ok,
              "stop S3, start it 60 s later (same ports and data)"),
        Shape("s3-over-budget", "s3-over-budget", s3_stop(over_budget_outage_s), 2,
              "FAILED:UNAVAILABLE",
              f"stop S3 for {over_budget_outage_s:g} s, over the {budget_s:g} s storage budget",
              True, {"outage_s": over_budget_outage_s}),
        Shape("worker-tree-kill", "worker-tree", worker_tree_kill, 10, ok,
              "SIGKILL the worker's whole process group, then start it again", True),
        Shape("redis-kill-data-lost", "redis-lost", redis_data_lost, 5, "ENDED",
              "SIGKILL Redis, delete its data, start it empty on the same port", True),
    ]
