"""Background processes, each in its own session and process group: starting one with
its output in a log file, waiting until it answers, and stopping its whole tree.

A ``Proc`` records the pid, the process group and the start time of the group leader
(from ``/proc``), so that a recorded process found again later (``stack.json``) is only
signalled while its pid still names the process that was started.  Linux only.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

START_TIMEOUT_S = float(os.environ.get("RISE_STACK_START_TIMEOUT", "180"))
STOP_GRACE_S = 15.0


def process_stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, pgid, session id, start time in clock ticks) of a live process, else None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    f = raw[raw.rindex(")") + 2:].split()
    return f[0], int(f[2]), int(f[3]), int(f[19])


def running(pid: int, start_time: int | None = None) -> bool:
    """``pid`` is alive (not a zombie) and, if given, started at ``start_time``."""
    st = process_stat(pid)
    return st is not None and st[0] not in "ZX" and (start_time is None or st[3] == start_time)


def group_members(pgid: int) -> list[int]:
    """Pids (not zombies) whose process group is ``pgid``."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = process_stat(int(d))
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
        return running(self.pid, self.start_time)

    def members(self) -> list[int]:
        """The live processes of this group, if the group is still ours."""
        self._reap()
        leader = process_stat(self.pid)
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
    st = process_stat(p.pid)
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


def wait_ready(proc: Proc, ready: Callable[[], bool], what: str,
               timeout: float = START_TIMEOUT_S) -> float:
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


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    """This process's environment without RISE_* and Prometheus settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RISE_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    env.update(extra)
    return env
