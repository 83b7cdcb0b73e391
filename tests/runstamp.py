"""What a long run's report says about where it ran: the code (commit, and whether services/
had uncommitted changes), the date, Python, the CPU and the load at the start.  Shared by
the chaos and fuzz runs (``tests/chaos/run.py``, ``tests/fuzz/run.py``)."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import rise

REPO = Path(__file__).resolve().parents[1]


def git(*args: str) -> str:
    """``git`` in this checkout; "" when it cannot answer."""
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def code_label(given: str | None) -> str:
    """``given``, else the commit of this checkout (and whether services/ has uncommitted
    changes), or a note that rise was imported from elsewhere."""
    if given:
        return given
    if not Path(rise.__file__).resolve().is_relative_to(REPO):
        return "rise imported from outside this checkout"
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "services")
    return (f"commit {git('rev-parse', '--short', 'HEAD') or 'unknown'}"
            + (" plus uncommitted changes under services/" if dirty else ""))


def machine() -> dict[str, Any]:
    """The date, Python, CPU and load average now."""
    return {"date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "python": platform.python_version(), "cpu": cpu_model(),
            "cpu_count": os.cpu_count(),
            "loadavg_start": [round(x, 2) for x in os.getloadavg()]}
