"""The quick chaos run (one trial of each fault kind, ``tests/chaos/run.py --quick``) as a
test: every job ends, no index is lost, no orphan object is left once the sweeper had its
grace, the S3 outage over the storage budget ends FAILED with UNAVAILABLE, and every
SUCCEEDED index is byte-identical to an undisturbed run.  About 5-9 minutes on 2 cores.
"""

from __future__ import annotations

import pytest

from . import run

pytestmark = pytest.mark.integration


def test_every_job_ends_quick(tmp_path):
    opts = run.parse_args(["--quick", "--out", str(tmp_path / "report"),
                           "--work", str(tmp_path / "work")])
    report = run.run(opts)
    kinds = {r["kind"] for r in report["trials"]}
    assert kinds >= {"none", "worker-child", "worker-tree", "redis-pause", "redis-stop",
                     "redis-lost", "s3-stop", "s3-over-budget", "gateway", "cancel-delete"}
    problems = run.problems(report)
    assert not problems, (f"{len(problems)} check(s) failed (report: "
                          f"{tmp_path / 'report' / 'chaos.md'}):\n" + "\n".join(problems))
